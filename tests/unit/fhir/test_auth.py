"""Tests of the auth edge: bearer, SMART Backend Services tokens, and AuthConfig validation."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import jwt
import pytest
import requests
import responses
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import ValidationError

from fhir_dm.common.deadline import Deadline, within
from fhir_dm.common.errors import KnowledgeError, UpstreamRejectedError, UpstreamTimeoutError
from fhir_dm.fhir import (
    AuthConfig,
    BearerAuth,
    FhirClient,
    NoAuth,
    SmartBackendAuth,
    auth_from_config,
    upstream_status,
)
from tests.clock import FakeClock

BASE = "https://fhir.example.org/r4"
TOKEN_URL = "https://auth.example.org/oauth/token"
CLIENT_ID = "fhir-dm-test"
KEY_ID = "key-2024-03"
START = 1_709_631_000.0  # a fixed instant; decoding below skips PyJWT's wall-clock checks


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


@pytest.fixture
def rsps() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock() as mock:
        yield mock


def pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def smart_auth(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    session: requests.Session,
    clock: FakeClock,
    algorithm: str = "RS384",
) -> SmartBackendAuth:
    return SmartBackendAuth(
        token_url=TOKEN_URL,
        client_id=CLIENT_ID,
        private_key_pem=pem(key),
        key_id=KEY_ID,
        session=session,
        algorithm=algorithm,
        scope="system/Patient.read system/CarePlan.*",
        clock=clock,
    )


def token_response(token: str, expires_in: int = 300) -> dict[str, Any]:
    return {"access_token": token, "token_type": "bearer", "expires_in": expires_in}


def form_of(call: Any) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(call.request.body).items()}


def decode_assertion(assertion: str, public_key: Any, algorithm: str) -> dict[str, Any]:
    return jwt.decode(
        assertion,
        public_key,
        algorithms=[algorithm],
        audience=TOKEN_URL,
        issuer=CLIENT_ID,
        options={"verify_exp": False, "verify_iat": False},
    )


def test_no_auth_sends_no_authorization(rsps: responses.RequestsMock) -> None:
    rsps.get(f"{BASE}/metadata", json={"resourceType": "CapabilityStatement"})

    with FhirClient(BASE, auth=NoAuth()) as fhir:
        fhir.capabilities()

    assert "Authorization" not in rsps.calls[0].request.headers


def test_bearer_auth_hides_the_token_in_repr() -> None:
    assert "s3cr3t" not in repr(BearerAuth("s3cr3t"))


def test_token_request_form_is_a_client_credentials_grant(
    rsa_key: rsa.RSAPrivateKey, rsps: responses.RequestsMock
) -> None:
    rsps.post(TOKEN_URL, json=token_response("access-1"))
    session = requests.Session()

    assert smart_auth(rsa_key, session, FakeClock(START)).access_token() == "access-1"

    form = form_of(rsps.calls[0])
    assert form["grant_type"] == "client_credentials"
    assert form["scope"] == "system/Patient.read system/CarePlan.*"
    assert form["client_assertion_type"] == (
        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    )
    assert "Authorization" not in rsps.calls[0].request.headers


@pytest.mark.parametrize("algorithm", ["RS384", "ES384"])
def test_client_assertion_verifies_with_the_public_key(
    rsa_key: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
    rsps: responses.RequestsMock,
    algorithm: str,
) -> None:
    key = rsa_key if algorithm == "RS384" else ec_key
    rsps.post(TOKEN_URL, json=token_response("access-1"))

    smart_auth(key, requests.Session(), FakeClock(START), algorithm).access_token()

    assertion = form_of(rsps.calls[0])["client_assertion"]
    header = jwt.get_unverified_header(assertion)
    assert (header["alg"], header["kid"], header["typ"]) == (algorithm, KEY_ID, "JWT")
    claims = decode_assertion(assertion, key.public_key(), algorithm)
    assert claims["sub"] == CLIENT_ID
    assert claims["iat"] == int(START)
    assert 0 < claims["exp"] - claims["iat"] <= 300
    assert uuid.UUID(claims["jti"]).version == 4


def test_each_assertion_has_a_new_jti(rsa_key: rsa.RSAPrivateKey) -> None:
    auth = smart_auth(rsa_key, requests.Session(), FakeClock(START))

    first, second = (
        decode_assertion(auth.client_assertion(), rsa_key.public_key(), "RS384") for _ in range(2)
    )

    assert first["jti"] != second["jti"]


def test_token_is_cached_then_refreshed_after_expiry(
    rsa_key: rsa.RSAPrivateKey, rsps: responses.RequestsMock
) -> None:
    rsps.post(TOKEN_URL, json=token_response("access-1", expires_in=300))
    rsps.post(TOKEN_URL, json=token_response("access-2", expires_in=300))
    rsps.get(f"{BASE}/metadata", json={"resourceType": "CapabilityStatement"})
    clock = FakeClock(START)
    session = requests.Session()
    fhir = FhirClient(BASE, session=session, auth=smart_auth(rsa_key, session, clock))

    fhir.capabilities()
    clock.now = START + 239  # 300 s lifetime minus 60 s skew: still valid
    fhir.capabilities()
    clock.now = START + 240
    fhir.capabilities()

    token_calls = [c for c in rsps.calls if c.request.url == TOKEN_URL]
    fhir_auth = [
        c.request.headers["Authorization"] for c in rsps.calls if c.request.url != TOKEN_URL
    ]
    assert len(token_calls) == 2
    assert fhir_auth == ["Bearer access-1", "Bearer access-1", "Bearer access-2"]


def test_token_endpoint_401_is_an_upstream_rejection(
    rsa_key: rsa.RSAPrivateKey, rsps: responses.RequestsMock
) -> None:
    rsps.post(
        TOKEN_URL,
        status=401,
        json={"error": "invalid_client", "error_description": "bad signature"},
    )
    session = requests.Session()
    fhir = FhirClient(BASE, session=session, auth=smart_auth(rsa_key, session, FakeClock(START)))

    with pytest.raises(UpstreamRejectedError) as excinfo:
        fhir.capabilities()

    assert str(excinfo.value) == (
        "token request to the authorization server failed: HTTP 401: invalid_client"
    )
    assert upstream_status(excinfo.value) == 401
    assert [c.request.url for c in rsps.calls] == [TOKEN_URL]  # the FHIR call is never made


def test_token_endpoint_timeout_is_an_upstream_timeout(
    rsa_key: rsa.RSAPrivateKey, rsps: responses.RequestsMock
) -> None:
    rsps.post(TOKEN_URL, body=requests.exceptions.ReadTimeout())

    with pytest.raises(UpstreamTimeoutError, match=r"^token request .* timed out$"):
        smart_auth(rsa_key, requests.Session(), FakeClock(START)).access_token()


def test_key_that_cannot_sign_with_the_algorithm_fails_at_startup(
    ec_key: ec.EllipticCurvePrivateKey,
) -> None:
    with pytest.raises(KnowledgeError, match="RS384 needs an RSA key"):
        smart_auth(ec_key, requests.Session(), FakeClock(START), "RS384")


def test_auth_from_config_builds_each_kind(
    rsa_key: rsa.RSAPrivateKey, tmp_path: Path, rsps: responses.RequestsMock
) -> None:
    key_file = tmp_path / "key.pem"
    key_file.write_text(pem(rsa_key))
    session = requests.Session()
    smart_cfg = AuthConfig(
        kind="smart-backend",
        token_url=TOKEN_URL,
        client_id=CLIENT_ID,
        key_id=KEY_ID,
        private_key_file=key_file,
    )

    assert isinstance(auth_from_config(AuthConfig(), session), NoAuth)
    assert isinstance(auth_from_config(AuthConfig(kind="bearer", token="t"), session), BearerAuth)
    assert isinstance(auth_from_config(smart_cfg, session), SmartBackendAuth)


def test_auth_from_config_reports_an_unreadable_key_file(tmp_path: Path) -> None:
    cfg = AuthConfig(
        kind="smart-backend",
        token_url=TOKEN_URL,
        client_id=CLIENT_ID,
        key_id=KEY_ID,
        private_key_file=tmp_path / "missing.pem",
    )

    with pytest.raises(KnowledgeError, match=r"auth\.private_key_file cannot be read"):
        auth_from_config(cfg, requests.Session())


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kind": "bearer"}, "auth.kind 'bearer' requires auth.token"),
        ({"token": "t"}, "auth.token is set but auth.kind is 'none'"),
        (
            {"kind": "smart-backend", "private_key_pem": "x"},
            "requires auth.token_url, auth.client_id, auth.key_id",
        ),
        (
            {"kind": "smart-backend", "token_url": TOKEN_URL, "client_id": "c", "key_id": "k"},
            "exactly one of auth.private_key_pem and auth.private_key_file",
        ),
        ({"token_lifetime_seconds": 301}, "less than or equal to 300"),
    ],
)
def test_auth_config_names_what_is_missing(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        AuthConfig(**fields)


def test_token_request_shares_the_request_deadline(
    rsa_key: rsa.RSAPrivateKey, rsps: responses.RequestsMock
) -> None:
    rsps.post(TOKEN_URL, json=token_response("t-1"))

    with within(Deadline.after(3.0)):
        smart_auth(rsa_key, requests.Session(), FakeClock(START)).access_token()

    connect, read = rsps.calls[0].request.req_kwargs["timeout"]  # type: ignore[attr-defined]
    assert 2.0 < connect <= 3.0 and 2.0 < read <= 3.0  # not the configured (5 s, 30 s)
