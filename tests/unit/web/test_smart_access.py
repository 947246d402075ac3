"""SMART access tokens: scopes (v1 and v2), patient context, JWT and introspected tokens.

The authorization server is faked with `responses` at unit level (smart-configuration, JWKS,
introspection); tests/integration/test_smart_auth.py runs a real one.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
import responses
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from flask.testing import FlaskClient

from fhir_dm.common.errors import AuthError, ForbiddenError, UpstreamUnavailableError
from fhir_dm.web.access_tokens import AccessTokenVerifier, IntrospectionClient, SmartTrust
from fhir_dm.web.app import create_app
from fhir_dm.web.authorize import require_patient, require_population
from fhir_dm.web.scopes import Need, missing_permissions, parse_scopes
from fhir_dm.web.trust import Principal, TrustConfig
from tests import factories as f
from tests.clock import FakeClock
from tests.unit.web.conftest import BASE, FakeFhirServer, make_settings, transaction_calls

AS = "https://auth.example.org"
JWKS = f"{AS}/jwks"
INTROSPECT = f"{AS}/token/introspection"
SMART_CONFIG = f"{BASE}/.well-known/smart-configuration"
SERVICE = "https://dm.example.org"
PATIENT_READ = "launch openid fhirUser patient/*.rs"
PATIENT_WRITE = PATIENT_READ + (
    " patient/RiskAssessment.c patient/CarePlan.cu patient/ServiceRequest.cu patient/Provenance.c"
)
Json = dict[str, Any]


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _jwks(rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey) -> Json:
    keys = [
        {**jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True), "kid": "r1"},
        {**jwt.algorithms.ECAlgorithm.to_jwk(ec_key.public_key(), as_dict=True), "kid": "e1"},
    ]
    return {"keys": [{**k, "use": "sig"} for k in keys]}


@pytest.fixture
def auth_server(
    rsps: responses.RequestsMock, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> responses.RequestsMock:
    """The EHR's authorization server as its smart-configuration describes it."""
    config = {
        "issuer": AS,
        "jwks_uri": JWKS,
        "authorization_endpoint": f"{AS}/auth",
        "token_endpoint": f"{AS}/token",
        "introspection_endpoint": INTROSPECT,
        "capabilities": ["launch-ehr", "context-ehr-patient", "permission-v2"],
    }
    rsps.add(responses.GET, SMART_CONFIG, json=config)
    rsps.add(responses.GET, JWKS, json=_jwks(rsa_key, ec_key))
    return rsps


def token(key: Any, clock: FakeClock, *, alg: str = "RS384", kid: str = "r1", **claims: Any) -> str:
    payload = {
        "iss": AS,
        "aud": BASE,
        "sub": "dr-who",
        "client_id": "fhir-dm",
        "iat": int(clock.now),
        "exp": int(clock.now) + 3600,
        "jti": str(uuid.uuid4()),
        "scope": PATIENT_WRITE,
        "patient": "pa",
        **claims,
    }
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode(payload, key, algorithm=alg, headers={"kid": kid, "typ": "at+jwt"})


def verifier(clock: FakeClock, **config: Any) -> AccessTokenVerifier:
    return AccessTokenVerifier(
        SmartTrust(**config), fhir_base_url=BASE, session=requests.Session(), clock=clock
    )


# -- scopes ---------------------------------------------------------------------------------


def test_v1_and_v2_scopes_parse_into_the_same_permissions() -> None:
    v1 = parse_scopes("openid launch/patient patient/*.read user/Observation.write system/*.*")
    v2 = parse_scopes("fhirUser patient/*.rs user/Observation.cud system/*.cruds")
    assert v1 == v2
    assert [(s.level, s.resource_type, "".join(sorted(s.permissions))) for s in v2] == [
        ("patient", "*", "rs"),
        ("user", "Observation", "cdu"),
        ("system", "*", "cdrsu"),
    ]


def test_malformed_and_granular_scopes_grant_nothing() -> None:
    assert parse_scopes("patient/*.sr patient/*.x user/observation.read patient/Observation") == ()
    assert parse_scopes("patient/Observation.rs?category=laboratory launch openid") == ()


def test_missing_permissions_names_the_letters_not_granted() -> None:
    scopes = parse_scopes("patient/*.rs patient/CarePlan.c")
    needs = [Need("CarePlan", "cu"), Need("Observation", "rs")]
    assert missing_permissions(scopes, needs, levels={"patient"}) == [Need("CarePlan", "u")]
    assert missing_permissions(scopes, needs, levels={"user"}) == needs


# -- patient context and write scopes -------------------------------------------------------


def principal(scope: str, patient: str | None = "pa") -> Principal:
    from fhir_dm.web.access_tokens import AccessGrant

    grant = AccessGrant(AS, "dr", "fhir-dm", parse_scopes(scope), patient, None, 0.0, "jwt")
    return Principal(issuer=AS, subject="dr", mode="smart", grant=grant)


def test_a_patient_scoped_token_reaches_its_patient_only() -> None:
    p = principal(PATIENT_WRITE)
    require_patient(p, "pa", write=False)
    require_patient(p, "pa", write=True)
    for write in (False, True):
        with pytest.raises(ForbiddenError, match="another patient"):
            require_patient(p, "pb", write=write)
    with pytest.raises(ForbiddenError, match="no patient in context"):
        require_patient(principal(PATIENT_WRITE, patient=None), "pa", write=False)


def test_a_read_only_token_may_not_write_and_is_told_the_missing_scopes() -> None:
    for scope in (PATIENT_READ, "launch patient/*.read"):  # v2 and v1
        with pytest.raises(ForbiddenError) as refused:
            require_patient(principal(scope), "pa", write=True)
        message = refused.value.message
        for needed in ("RiskAssessment.c", "CarePlan.cu", "ServiceRequest.cu", "Provenance.c"):
            assert f"patient/{needed}" in message
    require_patient(principal("patient/*.read patient/*.write"), "pa", write=True)  # v1 write


def test_user_scopes_reach_every_patient_and_the_clinic() -> None:
    reader = principal("openid user/*.rs patient/*.rs")
    require_patient(reader, "pb", write=False)
    require_population(reader, write=False)
    with pytest.raises(ForbiddenError, match=r"user/CarePlan\.cu"):
        require_patient(reader, "pb", write=True)
    with pytest.raises(ForbiddenError, match="user-level"):
        require_population(principal(PATIENT_WRITE), write=False)
    require_population(principal("system/*.cruds", patient=None), write=True)


def test_callers_without_a_grant_are_not_limited_by_scopes() -> None:
    for mode in ("static", "off", "jwt"):
        p = Principal(issuer=None, subject=None, mode=mode)  # type: ignore[arg-type]
        require_patient(p, "anyone", write=True)
        require_population(p, write=True)


# -- JWT access tokens ------------------------------------------------------------------------


def test_ehr_style_tokens_are_accepted_by_the_fhir_servers_audience(
    auth_server: responses.RequestsMock, rsa_key: Any, ec_key: Any
) -> None:
    """RS256 (the SMART launcher's), RS384 and ES256 with aud = the FHIR base URL."""
    clock = FakeClock()
    check = verifier(clock)
    for alg, key, kid in (
        ("RS256", rsa_key, "r1"),
        ("RS384", rsa_key, "r1"),
        ("ES256", ec_key, "e1"),
    ):
        grant = check.verify(token(key, clock, alg=alg, kid=kid))
        assert grant.patient == "pa" and grant.via == "jwt" and grant.client_id == "fhir-dm"
        assert {s.resource_type for s in grant.scopes} >= {"*", "CarePlan"}


def test_an_access_token_is_reused_and_may_be_old(
    auth_server: responses.RequestsMock, rsa_key: Any
) -> None:
    """Bearer tokens are used many times (no jti replay) until exp (no iat age limit)."""
    clock = FakeClock()
    check = verifier(clock)
    issued_long_ago = token(rsa_key, clock, iat=int(clock.now) - 600)
    for _ in range(3):
        check.verify(issued_long_ago)
    # A new verifier (another worker) accepts it too: nothing was remembered as "used".
    verifier(clock).verify(issued_long_ago)


def test_the_audience_is_the_fhir_server_or_the_service_as_configured(
    auth_server: responses.RequestsMock, rsa_key: Any
) -> None:
    clock = FakeClock()
    endpoint = token(rsa_key, clock, aud=f"{SERVICE}/app/api/Patient/pa/view")
    with pytest.raises(AuthError, match="aud"):
        verifier(clock).verify(endpoint)
    with pytest.raises(AuthError, match="aud"):
        verifier(clock).verify(token(rsa_key, clock, aud=SERVICE))
    for_service = verifier(clock, audiences=(SERVICE, BASE))
    for_service.verify(token(rsa_key, clock, aud=[SERVICE + "/"]))
    for_service.verify(token(rsa_key, clock, aud=BASE))


def test_expired_foreign_and_unsigned_tokens_are_refused(
    auth_server: responses.RequestsMock, rsa_key: Any
) -> None:
    clock = FakeClock()
    check = verifier(clock)
    with pytest.raises(AuthError, match="expired"):
        check.verify(token(rsa_key, clock, exp=int(clock.now) - 60))
    check.verify(token(rsa_key, clock, exp=int(clock.now) - 10))  # within the leeway
    with pytest.raises(AuthError, match="iss"):
        check.verify(token(rsa_key, clock, iss="https://other.example.org"))
    with pytest.raises(AuthError, match="alg not allowed"):
        check.verify(token(rsa_key, clock, alg="RS512"))
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(AuthError, match="signature"):
        check.verify(token(other, clock))
    with pytest.raises(AuthError, match="not a JWT"):
        check.verify("opaque-token-without-introspection")


def test_a_verified_token_is_cached_until_it_expires(
    auth_server: responses.RequestsMock, rsa_key: Any
) -> None:
    clock = FakeClock()
    check = verifier(clock, leeway_seconds=0)
    short = token(rsa_key, clock, exp=int(clock.now) + 120)
    check.verify(short)
    check.verify(short)
    fetches = [c.request.url for c in auth_server.calls]
    assert fetches.count(SMART_CONFIG) == 1 and fetches.count(JWKS) == 1
    clock.now += 121
    with pytest.raises(AuthError, match="expired"):
        check.verify(short)


# -- introspection (RFC 7662) -----------------------------------------------------------------


def _introspection(rsps: responses.RequestsMock, answer: Json) -> list[Any]:
    seen: list[Any] = []

    def reply(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        seen.append(request)
        return 200, {"Content-Type": "application/json"}, json.dumps(answer)

    rsps.add_callback(responses.POST, INTROSPECT, callback=reply)
    return seen


def test_opaque_tokens_are_introspected_with_the_services_credentials_and_cached(
    auth_server: responses.RequestsMock,
) -> None:
    clock = FakeClock()
    calls = _introspection(
        auth_server,
        {
            "active": True,
            "scope": "launch patient/*.read",
            "patient": "pa",
            "client_id": "fhir-dm",
            "exp": int(clock.now) + 300,
            "token_type": "Bearer",
        },
    )
    check = verifier(
        clock, introspection=IntrospectionClient(client_id="dm-rs", client_secret="s3cret")
    )
    grant = check.verify("an-opaque-token")
    assert grant.via == "introspection" and grant.patient == "pa"
    assert [(s.level, "".join(sorted(s.permissions))) for s in grant.scopes] == [("patient", "rs")]
    check.verify("an-opaque-token")
    assert len(calls) == 1  # cached
    body = calls[0].body if isinstance(calls[0].body, str) else calls[0].body.decode()
    assert "token=an-opaque-token" in body and "token_type_hint=access_token" in body
    assert calls[0].headers["Authorization"].startswith("Basic ")


def test_an_inactive_token_is_refused_and_the_token_never_logged(
    auth_server: responses.RequestsMock, caplog: pytest.LogCaptureFixture
) -> None:
    _introspection(auth_server, {"active": False})
    check = verifier(
        FakeClock(), introspection=IntrospectionClient(client_id="dm-rs", client_secret="s3cret")
    )
    with pytest.raises(AuthError, match="not active"):
        check.verify("revoked-token-value")
    assert "revoked-token-value" not in caplog.text


def test_without_a_smart_configuration_the_answer_is_503_not_401(
    rsps: responses.RequestsMock, rsa_key: Any
) -> None:
    """The token may be fine: the service cannot check it, which is not the caller's fault."""
    rsps.add(responses.GET, SMART_CONFIG, status=404)
    clock = FakeClock()
    with pytest.raises(UpstreamUnavailableError, match="smart-configuration"):
        verifier(clock).verify(token(rsa_key, clock))


# -- the service's endpoints with trust mode smart ------------------------------------------


@pytest.fixture
def smart_client(tmp_path: Path, auth_server: responses.RequestsMock) -> FlaskClient:
    trust = TrustConfig(mode="smart")
    return create_app(make_settings(tmp_path, trust=trust)).test_client()


def _two_patients(fhir_server: FakeFhirServer) -> None:
    for pid in ("pa", "pb"):
        p = f.patient(pid, birth_date="1970-01-01")
        fhir_server.put(
            p, f.iim_condition(p, id=f"{pid}-dm"), f.antibody(p, "tif1g", id=f"{pid}-ab")
        )


def _bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


def test_the_app_view_under_a_token_for_a_refuses_b(
    smart_client: FlaskClient, fhir_server: FakeFhirServer, rsa_key: Any
) -> None:
    _two_patients(fhir_server)
    headers = _bearer(token(rsa_key, FakeClock(), scope=PATIENT_READ))
    own = smart_client.post("/app/api/Patient/pa/view?now=2024-04-15", headers=headers)
    assert own.status_code == 200, own.get_data(as_text=True)
    other = smart_client.post("/app/api/Patient/pb/view?now=2024-04-15", headers=headers)
    assert other.status_code == 403
    body = other.get_json()
    assert body["resourceType"] == "OperationOutcome" and body["issue"][0]["code"] == "forbidden"
    assert "another patient" in body["issue"][0]["diagnostics"]


def test_writing_needs_write_scopes_for_every_type_written(
    smart_client: FlaskClient,
    fhir_server: FakeFhirServer,
    rsps: responses.RequestsMock,
    rsa_key: Any,
) -> None:
    _two_patients(fhir_server)
    url = "/Patient/pa/$dm-cancer-screening?preview=false&now=2024-04-15"
    read_only = smart_client.post(
        url, headers=_bearer(token(rsa_key, FakeClock(), scope=PATIENT_READ))
    )
    assert read_only.status_code == 403
    assert "patient/CarePlan.cu" in read_only.get_json()["issue"][0]["diagnostics"]
    assert "insufficient_scope" in read_only.headers["WWW-Authenticate"]
    assert transaction_calls(rsps) == 0
    other = smart_client.post(
        url.replace("/pa/", "/pb/"), headers=_bearer(token(rsa_key, FakeClock()))
    )
    assert other.status_code == 403 and transaction_calls(rsps) == 0
    written = smart_client.post(url, headers=_bearer(token(rsa_key, FakeClock())))
    assert written.status_code == 200, written.get_data(as_text=True)
    assert transaction_calls(rsps) == 1


def test_the_clinic_needs_user_scopes(
    smart_client: FlaskClient, fhir_server: FakeFhirServer, rsa_key: Any
) -> None:
    patient_token = _bearer(token(rsa_key, FakeClock()))
    refused = smart_client.post("/app/api/clinic?now=2024-04-15", headers=patient_token)
    assert refused.status_code == 403
    assert "user-level" in refused.get_json()["issue"][0]["diagnostics"]
    bundle = smart_client.post(
        "/$dm-cancer-screening",
        headers=patient_token,
        json={"resourceType": "Bundle", "type": "collection", "entry": []},
    )
    assert bundle.status_code in (400, 403)


def test_an_expired_or_garbage_token_is_401(smart_client: FlaskClient, rsa_key: Any) -> None:
    clock = FakeClock()
    for bad in (token(rsa_key, clock, exp=int(clock.now) - 3600), "garbage"):
        answer = smart_client.post("/app/api/Patient/pa/view", headers=_bearer(bad))
        assert answer.status_code == 401
        assert answer.get_json()["issue"][0]["code"] == "login"
        assert answer.headers["WWW-Authenticate"] == "Bearer"


def test_smart_mode_is_for_the_service_not_for_cds_clients() -> None:
    """CDS clients sign one-shot JWTs; `trust.smart` is read in mode smart only."""
    from pydantic import ValidationError

    from fhir_dm.web.cds_hooks import CdsSettings

    with pytest.raises(ValidationError, match="signed JWTs"):
        CdsSettings(trust=TrustConfig(mode="smart"))
    with pytest.raises(ValidationError, match="mode 'smart' only"):
        TrustConfig(mode="off", smart=SmartTrust())
    with pytest.raises(ValidationError, match="HS256"):
        SmartTrust(algorithms=("HS256",))
    with pytest.raises(ValidationError, match="https"):
        SmartTrust(smart_configuration_url="http://ehr.example.org/.well-known/smart-configuration")
