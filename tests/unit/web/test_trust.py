"""Tests for inbound trust: CDS Hooks 2.0 client JWTs, static tokens and the off mode."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jwt
import pytest
import requests
import responses
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import ValidationError

from fhir_dm.common.errors import AuthError
from fhir_dm.web.trust import (
    InboundAuth,
    IssuerTrust,
    JwtVerifier,
    Principal,
    ReplayCache,
    TrustConfig,
)
from tests.clock import FakeClock

ISS = "https://ehr.example.org"
JWKS_URL = "https://ehr.example.org/.well-known/jwks.json"
JKU_URL = "https://keys.ehr.example.org/cds/jwks.json"
ROGUE_JKU = "https://attacker.example.net/jwks.json"
AUD = "https://dm.example.org/cds-services/dm-cancer-risk"
# 2026-03-14T09:26:40Z; a fixed instant keeps every time check deterministic.
NOW = 1_773_480_400.0
STATIC_TOKEN = "static-token-for-tests-0123456789abcdef"


@pytest.fixture(scope="module")
def rsa_key_rotated() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def public_jwk(private_key: Any, kid: str) -> dict[str, Any]:
    if isinstance(private_key, rsa.RSAPrivateKey):
        data = jwt.algorithms.RSAAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
    else:
        data = jwt.algorithms.ECAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
    return {**data, "kid": kid, "use": "sig"}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def claims(clock: FakeClock, **overrides: Any) -> dict[str, Any]:
    base = {
        "iss": ISS,
        "aud": AUD,
        "iat": int(clock.now),
        "exp": int(clock.now) + 300,
        "jti": str(uuid.uuid4()),
        "sub": "ehr-client-id",
    }
    base.update(overrides)
    return {name: value for name, value in base.items() if value is not None}


def sign(
    private_key: Any,
    payload: dict[str, Any],
    *,
    alg: str = "RS384",
    kid: str = "rsa-1",
    **headers: Any,
) -> str:
    return jwt.encode(payload, private_key, algorithm=alg, headers={"kid": kid, **headers})


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW)


@pytest.fixture
def rsps() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


@pytest.fixture
def session() -> Iterator[requests.Session]:
    with requests.Session() as http:
        yield http


@pytest.fixture
def jwks(
    rsps: responses.RequestsMock,
    rsa_key: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
) -> dict[str, Any]:
    document = {"keys": [public_jwk(rsa_key, "rsa-1"), public_jwk(ec_key, "ec-1")]}
    rsps.get(JWKS_URL, json=document)
    return document


@pytest.fixture
def config() -> TrustConfig:
    return TrustConfig(
        mode="jwt",
        issuers=(IssuerTrust(iss=ISS, jwks_url=JWKS_URL, allowed_jku=(JKU_URL,)),),
    )


@pytest.fixture
def verifier(
    config: TrustConfig, session: requests.Session, clock: FakeClock, jwks: dict[str, Any]
) -> JwtVerifier:
    return JwtVerifier(config, session=session, clock=clock)


def fetches(rsps: responses.RequestsMock, url: str) -> int:
    return sum(1 for call in rsps.calls if call.request.url == url)


def assert_rejected(verifier: JwtVerifier, token: str, reason: str, audience: str = AUD) -> None:
    with pytest.raises(AuthError) as caught:
        verifier.verify(token, audience=audience)
    assert reason in caught.value.message
    assert token not in caught.value.message
    assert caught.value.status == 401


# --- accepted tokens -------------------------------------------------------------------------


def test_valid_rs384_token_is_accepted(
    verifier: JwtVerifier, rsa_key: rsa.RSAPrivateKey, clock: FakeClock
) -> None:
    payload = claims(clock)
    verified = verifier.verify(sign(rsa_key, payload), audience=AUD)
    assert verified["iss"] == ISS
    assert verified["jti"] == payload["jti"]


def test_valid_es384_token_is_accepted(
    verifier: JwtVerifier, ec_key: ec.EllipticCurvePrivateKey, clock: FakeClock
) -> None:
    token = sign(ec_key, claims(clock), alg="ES384", kid="ec-1", typ="JWT")
    assert verifier.verify(token, audience=AUD)["iss"] == ISS


def test_audience_ignores_one_trailing_slash_and_accepts_an_array(
    verifier: JwtVerifier, rsa_key: rsa.RSAPrivateKey, clock: FakeClock
) -> None:
    verifier.verify(sign(rsa_key, claims(clock, aud=AUD + "/")), audience=AUD)
    verifier.verify(sign(rsa_key, claims(clock)), audience=AUD + "/")
    verifier.verify(sign(rsa_key, claims(clock, aud=["https://other", AUD])), audience=AUD)


def test_tokens_within_leeway_are_accepted(
    verifier: JwtVerifier, rsa_key: rsa.RSAPrivateKey, clock: FakeClock
) -> None:
    now = int(clock.now)
    verifier.verify(sign(rsa_key, claims(clock, iat=now + 20)), audience=AUD)
    verifier.verify(sign(rsa_key, claims(clock, iat=now - 310, exp=now - 10)), audience=AUD)


# --- time and claims -------------------------------------------------------------------------


def test_expired_token_is_rejected(
    verifier: JwtVerifier, rsa_key: rsa.RSAPrivateKey, clock: FakeClock
) -> None:
    now = int(clock.now)
    token = sign(rsa_key, claims(clock, iat=now - 120, exp=now - 60))
    assert_rejected(verifier, token, "expired")


def test_iat_in_the_future_is_rejected(
    verifier: JwtVerifier, rsa_key: rsa.RSAPrivateKey, clock: FakeClock
) -> None:
    now = int(clock.now)
    token = sign(rsa_key, claims(clock, iat=now + 120, exp=now + 400))
    assert_rejected(verifier, token, "iat in the future")


def test_iat_older_than_max_age_is_rejected(
    verifier: JwtVerifier, rsa_key: rsa.RSAPrivateKey, clock: FakeClock
) -> None:
    now = int(clock.now)
    token = sign(rsa_key, claims(clock, iat=now - 400, exp=now + 300))
    assert_rejected(verifier, token, "iat too old")


def test_wrong_audience_is_rejected(
    verifier: JwtVerifier, rsa_key: rsa.RSAPrivateKey, clock: FakeClock
) -> None:
    token = sign(rsa_key, claims(clock, aud="https://dm.example.org/cds-services/other"))
    assert_rejected(verifier, token, "aud does not match")


@pytest.mark.parametrize("claim", ["jti", "exp", "iat", "aud"])
def test_missing_required_claim_is_rejected(
    verifier: JwtVerifier, rsa_key: rsa.RSAPrivateKey, clock: FakeClock, claim: str
) -> None:
    token = sign(rsa_key, claims(clock, **{claim: None}))
    assert_rejected(verifier, token, f"claim {claim} missing")


def test_replayed_jti_is_rejected_on_second_use(
    verifier: JwtVerifier, rsa_key: rsa.RSAPrivateKey, clock: FakeClock
) -> None:
    token = sign(rsa_key, claims(clock))
    verifier.verify(token, audience=AUD)
    clock.advance(5)
    assert_rejected(verifier, token, "jti replayed")


def test_same_jti_from_another_token_is_also_a_replay(
    verifier: JwtVerifier, rsa_key: rsa.RSAPrivateKey, clock: FakeClock
) -> None:
    verifier.verify(sign(rsa_key, claims(clock, jti="fixed")), audience=AUD)
    assert_rejected(verifier, sign(rsa_key, claims(clock, jti="fixed", sub="x")), "replayed")


# --- algorithm attacks -----------------------------------------------------------------------


def test_alg_none_token_is_rejected(
    verifier: JwtVerifier, clock: FakeClock, rsps: responses.RequestsMock
) -> None:
    header = b64url(json.dumps({"alg": "none", "typ": "JWT", "kid": "rsa-1"}).encode())
    payload = b64url(json.dumps(claims(clock)).encode())
    token = f"{header}.{payload}."
    assert_rejected(verifier, token, "alg not allowed")
    assert fetches(rsps, JWKS_URL) == 0


def test_hs256_signed_with_the_public_key_is_rejected(
    verifier: JwtVerifier,
    rsa_key: rsa.RSAPrivateKey,
    clock: FakeClock,
    rsps: responses.RequestsMock,
) -> None:
    public_pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}).encode())
    payload = b64url(json.dumps(claims(clock)).encode())
    signing_input = f"{header}.{payload}".encode()
    signature = b64url(hmac.new(public_pem, signing_input, hashlib.sha256).digest())
    token = f"{header}.{payload}.{signature}"
    assert_rejected(verifier, token, "alg not allowed")
    assert fetches(rsps, JWKS_URL) == 0


def test_allowed_alg_with_a_key_of_another_type_is_rejected(
    verifier: JwtVerifier, ec_key: ec.EllipticCurvePrivateKey, clock: FakeClock
) -> None:
    token = sign(ec_key, claims(clock), alg="ES384", kid="rsa-1")
    assert_rejected(verifier, token, "key type mismatch")


def test_missing_kid_is_rejected(
    verifier: JwtVerifier, rsa_key: rsa.RSAPrivateKey, clock: FakeClock
) -> None:
    token = jwt.encode(claims(clock), rsa_key, algorithm="RS384")
    assert_rejected(verifier, token, "kid missing")


def test_tampered_signature_is_rejected(
    verifier: JwtVerifier, rsa_key: rsa.RSAPrivateKey, clock: FakeClock
) -> None:
    header, _, signature = sign(rsa_key, claims(clock)).split(".")
    forged = b64url(json.dumps(claims(clock, sub="someone-else")).encode())
    assert_rejected(verifier, f"{header}.{forged}.{signature}", "signature invalid")


def test_malformed_token_is_rejected(verifier: JwtVerifier) -> None:
    assert_rejected(verifier, "not-a-jwt", "malformed")


# --- issuers, keys and key sets --------------------------------------------------------------


def test_unknown_issuer_is_rejected(
    verifier: JwtVerifier,
    rsa_key: rsa.RSAPrivateKey,
    clock: FakeClock,
    rsps: responses.RequestsMock,
) -> None:
    token = sign(rsa_key, claims(clock, iss="https://unknown-ehr.example.com"))
    assert_rejected(verifier, token, "iss not trusted")
    assert fetches(rsps, JWKS_URL) == 0


def test_unknown_kid_refetches_once_then_rejects(
    verifier: JwtVerifier,
    rsa_key: rsa.RSAPrivateKey,
    clock: FakeClock,
    rsps: responses.RequestsMock,
) -> None:
    verifier.verify(sign(rsa_key, claims(clock)), audience=AUD)
    assert fetches(rsps, JWKS_URL) == 1
    clock.advance(61)
    assert_rejected(verifier, sign(rsa_key, claims(clock), kid="nope"), "kid unknown")
    assert fetches(rsps, JWKS_URL) == 2
    clock.advance(10)
    assert_rejected(verifier, sign(rsa_key, claims(clock), kid="nope-2"), "kid unknown")
    assert fetches(rsps, JWKS_URL) == 2


def test_rotated_key_is_accepted_after_refetch(
    verifier: JwtVerifier,
    rsa_key: rsa.RSAPrivateKey,
    rsa_key_rotated: rsa.RSAPrivateKey,
    clock: FakeClock,
    rsps: responses.RequestsMock,
) -> None:
    verifier.verify(sign(rsa_key, claims(clock)), audience=AUD)
    rsps.replace(responses.GET, JWKS_URL, json={"keys": [public_jwk(rsa_key_rotated, "rsa-2")]})
    clock.advance(61)
    token = sign(rsa_key_rotated, claims(clock), kid="rsa-2")
    assert verifier.verify(token, audience=AUD)["iss"] == ISS
    assert fetches(rsps, JWKS_URL) == 2


def test_key_set_is_refetched_after_cache_time(
    verifier: JwtVerifier,
    rsa_key: rsa.RSAPrivateKey,
    clock: FakeClock,
    rsps: responses.RequestsMock,
) -> None:
    verifier.verify(sign(rsa_key, claims(clock)), audience=AUD)
    clock.advance(600)
    verifier.verify(sign(rsa_key, claims(clock)), audience=AUD)
    assert fetches(rsps, JWKS_URL) == 1
    clock.advance(3600)
    verifier.verify(sign(rsa_key, claims(clock)), audience=AUD)
    assert fetches(rsps, JWKS_URL) == 2


def test_allowlisted_jku_is_used(
    verifier: JwtVerifier,
    ec_key: ec.EllipticCurvePrivateKey,
    clock: FakeClock,
    rsps: responses.RequestsMock,
) -> None:
    rsps.get(JKU_URL, json={"keys": [public_jwk(ec_key, "jku-ec")]})
    token = sign(ec_key, claims(clock), alg="ES384", kid="jku-ec", jku=JKU_URL)
    assert verifier.verify(token, audience=AUD)["iss"] == ISS
    assert fetches(rsps, JKU_URL) == 1
    assert fetches(rsps, JWKS_URL) == 0


def test_jku_not_allowlisted_is_rejected_without_fetching(
    verifier: JwtVerifier,
    ec_key: ec.EllipticCurvePrivateKey,
    clock: FakeClock,
    rsps: responses.RequestsMock,
) -> None:
    rsps.get(ROGUE_JKU, json={"keys": [public_jwk(ec_key, "rogue")]})
    for jku in (ROGUE_JKU, JKU_URL + "?x=1", JKU_URL + "/"):
        token = sign(ec_key, claims(clock), alg="ES384", kid="rogue", jku=jku)
        assert_rejected(verifier, token, "jku not allowed")
    assert fetches(rsps, ROGUE_JKU) == 0


def test_jwks_endpoint_down_is_an_auth_error(
    config: TrustConfig,
    session: requests.Session,
    clock: FakeClock,
    rsa_key: rsa.RSAPrivateKey,
    rsps: responses.RequestsMock,
) -> None:
    rsps.get(JWKS_URL, body=requests.ConnectionError("connection refused"))
    verifier = JwtVerifier(config, session=session, clock=clock)
    assert_rejected(verifier, sign(rsa_key, claims(clock)), "key set unreachable")


@pytest.mark.parametrize(
    ("response", "reason"),
    [
        ({"status": 503, "body": "down"}, "returned 503"),
        ({"status": 302, "headers": {"Location": ROGUE_JKU}}, "returned 302"),
        ({"body": "<html>"}, "not JSON"),
        ({"json": {"keys": []}}, "no usable keys"),
        ({"json": {"nokeys": True}}, "no keys"),
    ],
)
def test_bad_key_set_responses_are_auth_errors(
    config: TrustConfig,
    session: requests.Session,
    clock: FakeClock,
    rsa_key: rsa.RSAPrivateKey,
    rsps: responses.RequestsMock,
    response: dict[str, Any],
    reason: str,
) -> None:
    rsps.get(JWKS_URL, **response)
    verifier = JwtVerifier(config, session=session, clock=clock)
    assert_rejected(verifier, sign(rsa_key, claims(clock)), reason)


def test_failed_fetch_is_not_retried_immediately(
    config: TrustConfig,
    session: requests.Session,
    clock: FakeClock,
    rsa_key: rsa.RSAPrivateKey,
    rsps: responses.RequestsMock,
) -> None:
    rsps.get(JWKS_URL, status=500)
    verifier = JwtVerifier(config, session=session, clock=clock)
    assert_rejected(verifier, sign(rsa_key, claims(clock)), "returned 500")
    assert_rejected(verifier, sign(rsa_key, claims(clock)), "unavailable")
    assert fetches(rsps, JWKS_URL) == 1
    rsps.replace(responses.GET, JWKS_URL, json={"keys": [public_jwk(rsa_key, "rsa-1")]})
    clock.advance(10)
    verifier.verify(sign(rsa_key, claims(clock)), audience=AUD)


def test_private_and_symmetric_jwks_members_are_ignored(
    config: TrustConfig,
    session: requests.Session,
    clock: FakeClock,
    rsa_key: rsa.RSAPrivateKey,
    rsps: responses.RequestsMock,
) -> None:
    oct_key = {"kty": "oct", "kid": "hmac", "k": b64url(b"0" * 32)}
    private = {**public_jwk(rsa_key, "private"), "d": b64url(b"secret")}
    rsps.get(JWKS_URL, json={"keys": [oct_key, private, public_jwk(rsa_key, "rsa-1")]})
    verifier = JwtVerifier(config, session=session, clock=clock)
    assert_rejected(verifier, sign(rsa_key, claims(clock), kid="private"), "kid unknown")
    verifier.verify(sign(rsa_key, claims(clock)), audience=AUD)


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("algorithms", "message"),
    [
        (["HS256"], r"symmetric \(HMAC\)"),
        (["RS384", "hs512"], "not allowed"),
        (["none"], "'none' is never allowed"),
        (["EdDSA"], "'EdDSA' is not allowed"),
        ([], "at least one algorithm"),
    ],
)
def test_config_rejects_unsafe_algorithms(algorithms: list[str], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        TrustConfig(
            issuers=(IssuerTrust(iss=ISS, jwks_url=JWKS_URL),),
            algorithms=algorithms,
        )


def test_config_defaults_to_jwt_and_needs_an_issuer() -> None:
    with pytest.raises(ValidationError, match="at least one trusted issuer"):
        TrustConfig()


def test_issuer_needs_a_key_source_over_https() -> None:
    with pytest.raises(ValidationError, match="jwks_url, allowed_jku, jwks or jwks_file"):
        IssuerTrust(iss=ISS)
    with pytest.raises(ValidationError, match="must be https"):
        IssuerTrust(iss=ISS, jwks_url="http://ehr.example.org/jwks.json")
    assert IssuerTrust(iss=ISS, allowed_jku=("http://localhost:8080/jwks",)).jwks_url is None


def test_static_mode_needs_long_tokens() -> None:
    with pytest.raises(ValidationError, match="at least one static token"):
        TrustConfig(mode="static")
    with pytest.raises(ValidationError, match="at least 32 characters"):
        TrustConfig(mode="static", static_tokens=("short",))


def test_config_is_frozen_and_strict(config: TrustConfig) -> None:
    with pytest.raises(ValidationError):
        config.mode = "off"  # type: ignore[misc]
    with pytest.raises(ValidationError, match="Extra inputs"):
        TrustConfig(mode="off", allow_all=True)  # type: ignore[call-arg]


# --- InboundAuth -----------------------------------------------------------------------------


def test_inbound_jwt_mode_returns_the_issuer(
    config: TrustConfig,
    session: requests.Session,
    clock: FakeClock,
    jwks: dict[str, Any],
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    auth = InboundAuth(config, session=session, clock=clock)
    principal = auth.authenticate(f"Bearer {sign(rsa_key, claims(clock))}", audience=AUD)
    assert principal == Principal(issuer=ISS, subject="ehr-client-id", mode="jwt")


@pytest.mark.parametrize("header", [None, "", "Basic dXNlcjpwYXNz", "Bearer", "Bearer a b"])
def test_inbound_jwt_mode_rejects_missing_or_non_bearer_headers(
    config: TrustConfig, session: requests.Session, header: str | None
) -> None:
    auth = InboundAuth(config, session=session)
    with pytest.raises(AuthError):
        auth.authenticate(header, audience=AUD)


def test_static_mode_accepts_the_right_token_and_rejects_a_wrong_one(
    session: requests.Session,
) -> None:
    other = "another-static-token-0123456789abcdef"
    config = TrustConfig(mode="static", static_tokens=(other, STATIC_TOKEN))
    auth = InboundAuth(config, session=session)
    principal = auth.authenticate(f"bearer {STATIC_TOKEN}", audience=AUD)
    assert principal == Principal(issuer=None, subject="static-token-2", mode="static")
    wrong = STATIC_TOKEN[:-1] + "X"
    with pytest.raises(AuthError) as caught:
        auth.authenticate(f"Bearer {wrong}", audience=AUD)
    assert wrong not in caught.value.message
    with pytest.raises(AuthError):
        auth.authenticate(None, audience=AUD)


def test_off_mode_returns_an_anonymous_principal(session: requests.Session) -> None:
    auth = InboundAuth(TrustConfig(mode="off"), session=session)
    assert auth.mode == "off"
    assert auth.authenticate(None, audience=AUD) == Principal(issuer=None, subject=None, mode="off")


def test_rejections_never_reveal_the_token(
    verifier: JwtVerifier,
    rsa_key: rsa.RSAPrivateKey,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = int(clock.now)
    tokens = [
        sign(rsa_key, claims(clock, exp=now - 100, iat=now - 200)),
        sign(rsa_key, claims(clock, aud="https://elsewhere")),
        sign(rsa_key, claims(clock, iss="https://unknown")),
        sign(rsa_key, claims(clock), kid="missing-kid"),
        sign(rsa_key, claims(clock)) + "x",
    ]
    with caplog.at_level(logging.DEBUG):
        for token in tokens:
            with pytest.raises(AuthError) as caught:
                verifier.verify(token, audience=AUD)
            assert token not in str(caught.value)
            payload = token.split(".")[1]
            assert payload not in str(caught.value)
    for token in tokens:
        assert token.split(".")[1] not in caplog.text
    assert "jwt rejected" in caplog.text
    assert "https://unknown" not in caplog.text


# --- ReplayCache -----------------------------------------------------------------------------


def test_replay_cache_forgets_after_exp_and_stays_bounded() -> None:
    clock = FakeClock(NOW)
    cache = ReplayCache(3, leeway_seconds=30, clock=clock)
    cache.check_and_remember(ISS, "a", NOW + 10)
    with pytest.raises(AuthError, match="replayed"):
        cache.check_and_remember(ISS, "a", NOW + 10)
    cache.check_and_remember("https://other", "a", NOW + 10)
    clock.advance(41)
    cache.check_and_remember(ISS, "a", NOW + 100)
    cache.check_and_remember(ISS, "b", NOW + 100)
    cache.check_and_remember(ISS, "c", NOW + 100)
    assert len(cache) == 3
    cache.check_and_remember(ISS, "d", NOW + 100)
    assert len(cache) == 3
    cache.check_and_remember(ISS, "a", NOW + 100)


def test_replay_cache_lets_exactly_one_concurrent_use_through() -> None:
    cache = ReplayCache(100, clock=FakeClock(NOW))

    def use() -> bool:
        try:
            cache.check_and_remember(ISS, "same", NOW + 60)
        except AuthError:
            return False
        return True

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda _: use(), range(32)))
    assert results.count(True) == 1


def test_concurrent_cold_start_fetches_the_key_set_once(
    verifier: JwtVerifier,
    rsa_key: rsa.RSAPrivateKey,
    clock: FakeClock,
    rsps: responses.RequestsMock,
) -> None:
    tokens = [sign(rsa_key, claims(clock)) for _ in range(16)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        verified = list(pool.map(lambda token: verifier.verify(token, audience=AUD), tokens))
    assert len(verified) == 16
    assert fetches(rsps, JWKS_URL) == 1
