"""CDS Hooks endpoints: signed-JWT trust, every prefetch variant, cards per tier, feedback."""

from __future__ import annotations

import base64
import io
import json
import re
import tempfile
import uuid
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import jwt
import pytest
import requests
import responses
from cryptography.hazmat.primitives.asymmetric import ec
from flask import Flask
from flask.testing import FlaskClient

from fhir_dm.cds.feedback import FeedbackStore
from fhir_dm.cds.prefetch import PrefetchTemplate
from fhir_dm.cds.state import StateSettings
from fhir_dm.core.assess import Engine
from fhir_dm.fhir.client import FhirClient
from fhir_dm.fhir.config import FhirServerConfig
from fhir_dm.fhir.retry import RetryPolicy
from fhir_dm.web import logs, outcomes
from fhir_dm.web.app import create_app
from fhir_dm.web.cds_hooks import (
    CdsSettings,
    PlanWriter,
    current_cds,
    fhir_server_allowed,
    init_app,
)
from fhir_dm.web.settings import Settings, current_service
from fhir_dm.web.trust import IssuerTrust, TrustConfig
from fhir_dm.writeback.locks import PatientLocks
from fhir_dm.writeback.writer import PATIENT_SEARCHES, WriteBack
from tests import factories as f
from tests.unit.cds import scenarios
from tests.unit.web.conftest import BASE

SERVICE = "dm-cancer-screening"
PUBLIC = "https://dm.example.org"
SERVICE_URL = f"{PUBLIC}/cds-services/{SERVICE}"
ISS = "https://ehr.example.org"
JWKS_URL = "https://ehr.example.org/.well-known/jwks.json"
EHR_FHIR = "https://ehr.example.org/fhir/r4"
FHIR_TOKEN = "ehr-access-token-5b1f0c"
PINNED = date(2024, 4, 15)
NOW_EPOCH = 1_713_175_200.0  # 2024-04-15T10:00:00Z
FHIR_JSON = "application/fhir+json"

Json = dict[str, Any]


# --- a small EHR FHIR server ----------------------------------------------------------------


class EhrFhir:
    """Reads, searches by patient/subject (other parameters ignored) and HAPI-style paging."""

    def __init__(self, mock: responses.RequestsMock, *, page_size: int = 50) -> None:
        self.resources: list[Json] = []
        self.calls: list[tuple[str, dict[str, str], str | None]] = []
        self.page_size = page_size
        self.fail_with: int | None = None
        self._pages: dict[str, list[Json]] = {}
        mock.add_callback(responses.GET, EHR_FHIR, callback=self._page)
        for kind in ("Patient", *PATIENT_SEARCHES, "CarePlan"):
            mock.add_callback(responses.GET, f"{EHR_FHIR}/{kind}", callback=self._search)
        mock.add_callback(
            responses.GET,
            re.compile(rf"{re.escape(EHR_FHIR)}/[A-Za-z]+/[^/?]+$"),
            callback=self._read,
        )

    def _record(self, request: requests.PreparedRequest) -> tuple[str, dict[str, str]]:
        parts = urlsplit(str(request.url))
        params = dict(parse_qsl(parts.query))
        self.calls.append((parts.path, params, request.headers.get("Authorization")))
        return parts.path, params

    @staticmethod
    def _json(status: int, body: Json) -> tuple[int, dict[str, str], str]:
        return status, {"Content-Type": FHIR_JSON}, json.dumps(body)

    def _bundle(self, matches: list[Json], offset: int, count: int) -> Json:
        bundle: Json = {
            "resourceType": "Bundle",
            "type": "searchset",
            "entry": [
                {"resource": r, "search": {"mode": "match"}}
                for r in matches[offset : offset + count]
            ],
        }
        if offset + count < len(matches):
            key = uuid.uuid4().hex
            self._pages[key] = matches
            query = urlencode(
                {"_getpages": key, "_getpagesoffset": offset + count, "_count": count}
            )
            bundle["link"] = [{"relation": "next", "url": f"{EHR_FHIR}?{query}"}]
        return bundle

    def _search(self, request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        path, params = self._record(request)
        if self.fail_with:
            return self._json(self.fail_with, {"resourceType": "OperationOutcome", "issue": []})
        kind = path.rsplit("/", 1)[-1]
        who = params.get("patient") or params.get("subject", "").removeprefix("Patient/")
        matches = [
            r
            for r in self.resources
            if r["resourceType"] == kind
            and (r.get("subject") or r.get("patient") or {}).get("reference") == f"Patient/{who}"
        ]
        return self._json(200, self._bundle(matches, 0, int(params.get("_count", self.page_size))))

    def _page(self, request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        _, params = self._record(request)
        matches = self._pages[params["_getpages"]]
        offset, count = int(params["_getpagesoffset"]), int(params["_count"])
        return self._json(200, self._bundle(matches, offset, count))

    def _read(self, request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        path, _ = self._record(request)
        kind, rid = path.rsplit("/", 2)[-2:]
        found = next(
            (r for r in self.resources if r["resourceType"] == kind and r["id"] == rid), None
        )
        if found is None:
            return self._json(404, {"resourceType": "OperationOutcome", "issue": []})
        return self._json(200, found)


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


@pytest.fixture
def rsps(ec_key: ec.EllipticCurvePrivateKey) -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        jwk = jwt.algorithms.ECAlgorithm.to_jwk(ec_key.public_key(), as_dict=True)
        mock.get(JWKS_URL, json={"keys": [{**jwk, "kid": "ec-1", "use": "sig", "alg": "ES384"}]})
        yield mock


@pytest.fixture
def ehr(rsps: responses.RequestsMock) -> EhrFhir:
    return EhrFhir(rsps)


def jwt_trust() -> TrustConfig:
    return TrustConfig(mode="jwt", issuers=(IssuerTrust(iss=ISS, jwks_url=JWKS_URL),))


def cds_settings(**settings: Any) -> CdsSettings:
    """Settings with a state file of their own: no test sees another test's cards or jti."""
    state = StateSettings(sqlite_path=Path(tempfile.mkdtemp(prefix="fhir-dm-cds-")) / "s.db")
    return CdsSettings(
        **{
            "public_base_url": PUBLIC,
            "trust": jwt_trust(),
            "allowed_fhir_servers": (EHR_FHIR,),
            "fetch_max_retries": 0,
            "state": state,
            **settings,
        }
    )


def make_app(engine: Engine, **settings: Any) -> Flask:
    """An app with the service's own error handlers and logging, and the CDS Hooks blueprint.

    The session's knowledge and engine are reused (create_app would load them per test);
    `test_wires_into_create_app` checks the real factory.
    """
    app = Flask(__name__)
    logs.init_app(app)
    outcomes.init_app(app)
    init_app(
        app,
        cds_settings(**settings),
        engine=engine,
        knowledge=engine.knowledge,
        clock=lambda: PINNED,
        http_session=requests.Session(),
        trust_clock=lambda: NOW_EPOCH,
    )
    return app


def writing_app(engine: Engine, tmp_path: Path, **settings: Any) -> Flask:
    """The CDS edge with the write-back to the fake FHIR server at BASE (the EHR's, here).

    `write_on_accept` is on unless a test turns it off; other settings pass through.
    """
    app = Flask(__name__)
    logs.init_app(app)
    outcomes.init_app(app)
    client = FhirClient(BASE, retry=RetryPolicy(max_retries=0), page_size=3)
    writer = PlanWriter(WriteBack(client, engine, PatientLocks(tmp_path / "locks")), BASE)
    init_app(
        app,
        CdsSettings(
            **{
                "public_base_url": PUBLIC,
                "trust": TrustConfig(issuers=(IssuerTrust(iss=ISS, jwks_url=JWKS_URL),)),
                "allowed_fhir_servers": (BASE,),
                "state": StateSettings(sqlite_path=tmp_path / "state.sqlite3"),
                "write_on_accept": True,
                **settings,
            }
        ),
        engine=engine,
        knowledge=engine.knowledge,
        clock=lambda: PINNED,
        http_session=requests.Session(),
        trust_clock=lambda: NOW_EPOCH,
        plan_writer=writer,
    )
    return app


def templates_of(app: Flask) -> tuple[PrefetchTemplate, ...]:
    """The prefetch templates the app's CDS edge announces."""
    with app.app_context():
        return current_cds().templates


@pytest.fixture
def app(engine: Engine, rsps: responses.RequestsMock) -> Flask:
    return make_app(engine)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def templates(app: Flask) -> tuple[PrefetchTemplate, ...]:
    with app.app_context():
        return current_cds().templates


def token(
    key: Any, *, aud: str = SERVICE_URL, alg: str = "ES384", kid: str = "ec-1", **claims: Any
) -> str:
    payload = {
        "iss": ISS,
        "aud": aud,
        "iat": int(NOW_EPOCH),
        "exp": int(NOW_EPOCH) + 300,
        "jti": str(uuid.uuid4()),
        "tenant": "hospital-1",
        **claims,
    }
    return jwt.encode(payload, key, algorithm=alg, headers={"kid": kid, "typ": "JWT"})


def auth(key: Any, **kw: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(key, **kw)}"}


Poster = Callable[..., Any]


@pytest.fixture
def call(client: FlaskClient, ec_key: Any) -> Poster:
    """POST a hook request with a fresh valid JWT."""

    def post(body: Json, **kw: Any) -> Any:
        return client.post(f"/cds-services/{SERVICE}", json=body, headers=auth(ec_key), **kw)

    return post


def full_request(templates: tuple[PrefetchTemplate, ...], resources: list[Json], **kw: Any) -> Json:
    prefetch = scenarios.full_prefetch(templates, resources, plans=kw.pop("plans", ()))
    return scenarios.hook_request(resources[0]["id"], prefetch, **kw)


def first_page(resources: list[Json], page_size: int) -> Json:
    """The Conditions of `resources` as HAPI's first page: a searchset linking to the rest."""
    return scenarios.searchset(
        [r for r in resources if r["resourceType"] == "Condition"],
        next_url=f"{EHR_FHIR}?_getpages=abc&_getpagesoffset={page_size}&_count={page_size}",
    )


# --- discovery ------------------------------------------------------------------------------


def test_wires_into_create_app(tmp_path: Path, rsps: responses.RequestsMock, ec_key: Any) -> None:
    app = create_app(
        Settings(
            fhir=FhirServerConfig(base_url="https://fhir.example.org/r4"),
            trust=TrustConfig(mode="off"),
            lock_dir=tmp_path / "locks",
            public_base_url=PUBLIC,
        )
    )
    with app.app_context():
        service = current_service()
    init_app(
        app,
        cds_settings(),
        engine=service.engine,
        knowledge=service.knowledge,
        trust_clock=lambda: NOW_EPOCH,
    )
    client = app.test_client()
    response = client.get("/cds-services", headers=auth(ec_key, aud=f"{PUBLIC}/cds-services"))
    assert response.status_code == 200
    assert client.post(f"/cds-services/{SERVICE}", json={}).status_code == 401
    bad = client.post(f"/cds-services/{SERVICE}", json={}, headers=auth(ec_key))
    assert bad.status_code == 400 and bad.get_json()["resourceType"] == "OperationOutcome"


def test_discovery(client: FlaskClient, ec_key: Any) -> None:
    response = client.get("/cds-services", headers=auth(ec_key, aud=f"{PUBLIC}/cds-services"))
    assert response.status_code == 200
    [service] = response.get_json()["services"]
    assert service["id"] == SERVICE
    assert service["hook"] == "patient-view"
    assert service["title"] and service["description"] and service["usageRequirements"]
    prefetch = service["prefetch"]
    assert prefetch["patient"] == "Patient/{{context.patientId}}"
    assert {
        "conditions",
        "observations",
        "medicationRequests",
        "medicationStatements",
        "familyHistory",
        "procedures",
        "existingPlans",
    } <= set(prefetch)


def test_discovery_needs_a_jwt_unless_configured(engine: Engine, client: FlaskClient) -> None:
    assert client.get("/cds-services").status_code == 401
    open_app = make_app(engine, discovery_requires_auth=False)
    assert open_app.test_client().get("/cds-services").status_code == 200


# --- trust ----------------------------------------------------------------------------------


def test_valid_jwt_is_accepted(call: Poster, templates: Any) -> None:
    response = call(full_request(templates, scenarios.high_risk()))
    assert response.status_code == 200


def _unsigned(claims: Json) -> str:
    def part(data: Json) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT', 'kid': 'ec-1'})}.{part(claims)}."


@pytest.mark.parametrize(
    "bad",
    ["expired", "wrong-aud", "replayed", "alg-none", "hs256", "unknown-kid", "no-header", "iss"],
)
def test_bad_jwt_is_a_bare_401(
    client: FlaskClient, ec_key: Any, templates: Any, bad: str, log_stream: io.StringIO
) -> None:
    body = full_request(templates, scenarios.high_risk())
    claims = {
        "iss": ISS,
        "aud": SERVICE_URL,
        "iat": int(NOW_EPOCH),
        "exp": int(NOW_EPOCH) + 300,
        "jti": str(uuid.uuid4()),
    }
    headers: dict[str, str] = {}
    if bad == "expired":
        headers = auth(ec_key, iat=int(NOW_EPOCH) - 600, exp=int(NOW_EPOCH) - 300)
    elif bad == "wrong-aud":
        headers = auth(ec_key, aud=f"{PUBLIC}/cds-services/other-service")
    elif bad == "replayed":
        headers = auth(ec_key)
        assert (
            client.post(f"/cds-services/{SERVICE}", json=body, headers=headers).status_code == 200
        )
    elif bad == "alg-none":
        headers = {"Authorization": f"Bearer {_unsigned(claims)}"}
    elif bad == "hs256":
        forged = jwt.encode(
            claims, "a-shared-secret-of-32-characters!", algorithm="HS256", headers={"kid": "ec-1"}
        )
        headers = {"Authorization": f"Bearer {forged}"}
    elif bad == "unknown-kid":
        headers = auth(ec_key, kid="rotated-away")
    elif bad == "iss":
        headers = auth(ec_key, iss="https://attacker.example.net")
    response = client.post(f"/cds-services/{SERVICE}", json=body, headers=headers)
    assert response.status_code == 401
    assert response.data == b""
    assert response.headers["WWW-Authenticate"] == "Bearer"
    if headers:
        assert headers["Authorization"].split()[1] not in log_stream.getvalue()


def test_feedback_and_summary_need_the_jwt_for_their_own_url(
    client: FlaskClient, ec_key: Any
) -> None:
    body = {
        "feedback": [
            {"card": "c", "outcome": "overridden", "outcomeTimestamp": "2024-04-15T10:00:00Z"}
        ]
    }
    url = f"/cds-services/{SERVICE}/feedback"
    assert client.post(url, json=body, headers=auth(ec_key)).status_code == 401  # service aud
    assert client.post(url, json=body, headers=auth(ec_key, aud=PUBLIC + url)).status_code == 200
    summary = f"{url}/summary"
    assert client.get(summary).status_code == 401
    assert client.get(summary, headers=auth(ec_key, aud=PUBLIC + summary)).status_code == 200


def test_trust_off_is_development_only_and_must_be_explicit() -> None:
    with pytest.raises(ValueError, match="needs at least one trusted issuer"):
        CdsSettings(trust=TrustConfig())
    with pytest.raises(ValueError, match="signed JWTs"):
        CdsSettings(trust=TrustConfig(mode="static", static_tokens=("x" * 40,)))
    assert CdsSettings(trust=TrustConfig(mode="off")).development
    assert not CdsSettings(trust=jwt_trust()).development


# --- prefetch -------------------------------------------------------------------------------


def test_complete_prefetch_calls_no_fhir_server(call: Poster, templates: Any, ehr: EhrFhir) -> None:
    body = full_request(templates, scenarios.high_risk(), fhir_server=EHR_FHIR, token=FHIR_TOKEN)
    response = call(body)
    assert response.status_code == 200
    assert response.get_json()["cards"][0]["summary"].startswith(
        "IIM cancer screening: High risk — "
    )
    assert ehr.calls == []


@pytest.mark.parametrize("variant", ["missing", "operation-outcome"])
def test_missing_or_failed_key_is_fetched_with_the_ehr_token(
    call: Poster, templates: Any, ehr: EhrFhir, variant: str, log_stream: io.StringIO
) -> None:
    resources = scenarios.moderate_preliminary()
    patient = resources[0]
    antibody = f.antibody(patient, "tif1g", "positive")
    ehr.resources = [*resources, antibody]
    body = full_request(templates, resources, fhir_server=EHR_FHIR, token=FHIR_TOKEN)
    if variant == "missing":
        del body["prefetch"]["observations"]
    else:
        body["prefetch"]["observations"] = {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": "exception", "diagnostics": "timeout"}],
        }
    response = call(body)
    assert response.status_code == 200
    # The antibody only the server had makes DM + anti-TIF1-gamma: high risk.
    assert response.get_json()["cards"][0]["summary"].startswith("IIM cancer screening: High risk")
    [(path, params, authorization)] = ehr.calls
    assert path == "/fhir/r4/Observation"
    assert params["patient"] == patient["id"]
    assert "http://loinc.org|107562-1" in params["code"]
    assert authorization == f"Bearer {FHIR_TOKEN}"
    assert FHIR_TOKEN not in log_stream.getvalue()


def test_null_key_means_no_data(call: Poster, templates: Any, ehr: EhrFhir) -> None:
    resources = scenarios.moderate_preliminary()
    ehr.resources = [*resources, f.antibody(resources[0], "tif1g", "positive")]
    body = full_request(templates, resources, fhir_server=EHR_FHIR, token=FHIR_TOKEN)
    body["prefetch"]["observations"] = None
    response = call(body)
    assert response.status_code == 200
    summary = response.get_json()["cards"][0]["summary"]
    assert summary.startswith("IIM cancer screening: Moderate risk (preliminary) — ")
    assert ehr.calls == []


def test_paged_prefetch_is_fetched_again_following_every_page(
    engine: Engine, rsps: responses.RequestsMock, ec_key: Any
) -> None:
    app = make_app(engine, fetch_page_size=1)
    ehr = EhrFhir(rsps)
    with app.app_context():
        templates = current_cds().templates
    resources = scenarios.moderate_preliminary()
    patient = resources[0]
    ck = f.ck(patient, 180)
    antibody = f.antibody(patient, "tif1g", "positive")
    ehr.resources = [*resources, ck, antibody]
    body = full_request(templates, resources, fhir_server=EHR_FHIR, token=FHIR_TOKEN)
    body["prefetch"]["observations"] = scenarios.searchset(
        [ck], next_url=f"{EHR_FHIR}?_getpages=ehr-own-page&_getpagesoffset=1&_count=1"
    )
    response = app.test_client().post(f"/cds-services/{SERVICE}", json=body, headers=auth(ec_key))
    assert response.status_code == 200
    assert response.get_json()["cards"][0]["summary"].startswith("IIM cancer screening: High risk")
    paths = [c[0] for c in ehr.calls]
    assert paths == ["/fhir/r4/Observation", "/fhir/r4"]  # the query again, then its page 2
    assert all(c[2] == f"Bearer {FHIR_TOKEN}" for c in ehr.calls)


def test_no_prefetch_at_all_reads_everything_from_the_server(
    call: Poster, templates: Any, ehr: EhrFhir
) -> None:
    resources = scenarios.high_risk()
    ehr.resources = resources
    body = scenarios.hook_request(resources[0]["id"], None, fhir_server=EHR_FHIR, token=FHIR_TOKEN)
    response = call(body)
    assert response.status_code == 200
    assert response.get_json()["cards"][0]["summary"].startswith(
        "IIM cancer screening: High risk — "
    )
    assert len(ehr.calls) == len(templates)


def incomplete_detail(response: Any) -> str:
    """The one card of an answer whose data was incomplete: a warning saying so, and why."""
    assert response.status_code == 200
    [card] = response.get_json()["cards"]
    assert card["summary"].startswith("IIM cancer screening: assessment incomplete")
    assert card["indicator"] == "warning"
    assert "suggestions" not in card
    return str(card["detail"])


@pytest.mark.parametrize("why", ["no-fhir-server", "no-token", "not-allowed", "server-fails"])
def test_missing_data_that_cannot_be_fetched_is_an_incomplete_card_never_silence(
    call: Poster, templates: Any, ehr: EhrFhir, why: str
) -> None:
    resources = scenarios.high_risk()
    ehr.resources = resources
    server = {"not-allowed": "https://evil.example.net/fhir"}.get(why, EHR_FHIR)
    body = full_request(
        templates,
        resources,
        fhir_server=None if why == "no-fhir-server" else server,
        token=None if why in ("no-fhir-server", "no-token") else FHIR_TOKEN,
    )
    del body["prefetch"]["conditions"]
    if why == "server-fails":
        ehr.fail_with = 500
    response = call(body)
    # An EHR shows a 412 as no card ("All clear"): the card says the assessment is incomplete.
    assert "prefetch key 'conditions'" in incomplete_detail(response)
    if why != "server-fails":
        assert ehr.calls == []  # the token never left for a server it may not go to


def test_allowlist_matching() -> None:
    allowed = ("https://ehr.example.org/fhir", "http://127.0.0.1:8080/fhir")
    assert fhir_server_allowed("https://ehr.example.org/fhir", allowed, development=False)
    assert fhir_server_allowed("https://ehr.example.org/fhir/tenant-1/", allowed, development=False)
    assert fhir_server_allowed("http://127.0.0.1:8080/fhir", allowed, development=False)
    for url in (
        "https://ehr.example.org/fhirx",
        "https://ehr.example.org.evil.net/fhir",
        "http://ehr.example.org/fhir",
        "https://ehr.example.org:8443/fhir",
        "http://127.0.0.1:8081/fhir",
        "https://evil.example\\@ehr.example.org/fhir",
        "https://user@ehr.example.org/fhir",
    ):
        assert not fhir_server_allowed(url, allowed, development=False), url
    assert fhir_server_allowed("https://anything.example", (), development=True)
    assert not fhir_server_allowed("https://anything.example", (), development=False)


# --- cards ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scenario", "summary", "indicator"),
    [
        (scenarios.high_risk, "IIM cancer screening: High risk — ", "warning"),
        (
            scenarios.moderate_preliminary,
            "IIM cancer screening: Moderate risk (preliminary) — ",
            "warning",
        ),
        (scenarios.standard_risk, "IIM cancer screening: Standard risk — ", "info"),
    ],
)
def test_card_per_tier(
    call: Poster, templates: Any, scenario: Any, summary: str, indicator: str
) -> None:
    response = call(full_request(templates, scenario()))
    assert response.status_code == 200
    assert response.content_type.startswith("application/json")
    [card] = response.get_json()["cards"]
    assert card["summary"].startswith(summary) and len(card["summary"]) < 140
    assert card["indicator"] == indicator
    assert card["suggestions"][0]["isRecommended"] is True
    assert card["selectionBehavior"] == "any"


def test_no_iim_is_no_cards(call: Poster, templates: Any) -> None:
    response = call(full_request(templates, scenarios.no_iim()))
    assert response.status_code == 200
    assert response.get_json() == {"cards": []}


def test_an_iim_outside_the_guideline_is_one_info_card_without_a_suggestion(
    call: Poster, templates: Any
) -> None:
    response = call(full_request(templates, scenarios.juvenile()))
    assert response.status_code == 200
    [card] = response.get_json()["cards"]
    assert card["summary"].startswith("IIM cancer screening: not stratified — ")
    assert card["indicator"] == "info"
    assert "suggestions" not in card


def test_existing_plan_is_not_proposed_again(
    call: Poster, templates: Any, client: FlaskClient
) -> None:
    resources = scenarios.high_risk()
    first = call(full_request(templates, resources)).get_json()["cards"][0]
    plan = scenarios.suggested_plan(first)
    stored = {**plan, "id": "4711", "meta": {**plan["meta"], "lastUpdated": "2024-04-15T11:00:00Z"}}
    response = call(full_request(templates, resources, plans=[stored]))
    [card] = response.get_json()["cards"]
    # What is overdue keeps the card a warning; the plan is not proposed again.
    assert card["indicator"] == "warning"
    assert card["summary"].startswith("Plan on file: High risk; ")
    assert "overdue" in card["summary"]
    assert "suggestions" not in card
    assert "CarePlan/4711" in card["detail"]


# --- bad requests ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mutate", "status", "where"),
    [
        (lambda b: b.update(hook="order-sign"), 400, "hook"),
        (lambda b: b.pop("hookInstance"), 400, "hookInstance"),
        (lambda b: b["context"].update(patientId="a/b"), 400, "context.patientId"),
        (
            lambda b: b.update(fhirAuthorization={"access_token": "t", "token_type": "Bearer"}),
            400,
            "fhirServer is required",
        ),
        (lambda b: b["prefetch"].update(conditions="nope"), 400, "prefetch.conditions"),
        (lambda b: b["prefetch"]["patient"].update(id="someone-else"), 400, "context.patientId"),
    ],
)
def test_bad_requests_are_operation_outcomes(
    call: Poster, templates: Any, mutate: Any, status: int, where: str
) -> None:
    body = full_request(templates, scenarios.high_risk())
    mutate(body)
    response = call(body)
    assert response.status_code == status
    outcome = response.get_json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert where in json.dumps(outcome)


def test_unknown_service_is_404(client: FlaskClient, ec_key: Any) -> None:
    url = "/cds-services/no-such-service"
    response = client.post(url, json={}, headers=auth(ec_key, aud=PUBLIC + url))
    assert response.status_code == 404


def test_not_json_is_400(client: FlaskClient, ec_key: Any) -> None:
    response = client.post(
        f"/cds-services/{SERVICE}", data="{", content_type="application/json", headers=auth(ec_key)
    )
    assert response.status_code == 400


# --- feedback -------------------------------------------------------------------------------


def test_feedback_is_stored_and_counted(
    call: Poster, templates: Any, client: FlaskClient, ec_key: Any
) -> None:
    cards = [
        call(full_request(templates, scenario())).get_json()["cards"][0]
        for scenario in (
            scenarios.high_risk,
            scenarios.moderate_preliminary,
            scenarios.standard_risk,
        )
    ]
    url = f"/cds-services/{SERVICE}/feedback"
    reasons = "http://fhir-dm.org/fhir/CodeSystem/dm-cds-override-reason"
    body = {
        "feedback": [
            {
                "card": cards[0]["uuid"],
                "outcome": "accepted",
                "acceptedSuggestions": [{"id": cards[0]["suggestions"][0]["uuid"]}],
                "outcomeTimestamp": "2024-04-15T10:01:00Z",
            },
            {
                "card": cards[1]["uuid"],
                "outcome": "overridden",
                "overrideReason": {
                    "reason": {"system": reasons, "code": "screened-elsewhere"},
                    "userComment": "done at the district hospital",
                },
                "outcomeTimestamp": "2024-04-15T10:02:00Z",
            },
            {
                "card": cards[2]["uuid"],
                "outcome": "overridden",
                "outcomeTimestamp": "2024-04-15T10:03:00Z",
            },
        ]
    }
    response = client.post(url, json=body, headers=auth(ec_key, aud=PUBLIC + url))
    assert response.status_code == 200
    assert response.get_json() == {"stored": 3, "duplicates": 0}
    again = client.post(url, json=body, headers=auth(ec_key, aud=PUBLIC + url))
    assert again.get_json() == {"stored": 0, "duplicates": 3}

    summary_url = f"{url}/summary"
    summary = client.get(summary_url, headers=auth(ec_key, aud=PUBLIC + summary_url)).get_json()
    assert summary["cardTypes"]["screening-plan"] == {"issued": 3, "accepted": 1, "overridden": 2}
    assert summary["overrideReasons"] == [
        {
            "system": reasons,
            "code": "screened-elsewhere",
            "display": "Already screened or being screened elsewhere",
            "count": 1,
        }
    ]
    assert summary["overriddenWithoutReason"] == 1
    assert "district hospital" not in json.dumps(summary)


def test_bad_feedback_is_400(client: FlaskClient, ec_key: Any) -> None:
    url = f"/cds-services/{SERVICE}/feedback"
    response = client.post(
        url,
        json={"feedback": [{"card": "c", "outcome": "ignored"}]},
        headers=auth(ec_key, aud=PUBLIC + url),
    )
    assert response.status_code == 400


def test_feedback_store_can_be_a_file(
    engine: Engine, tmp_path: Path, rsps: responses.RequestsMock
) -> None:
    path = tmp_path / "state" / "cds.sqlite3"
    app = make_app(engine, state=StateSettings(sqlite_path=path))
    with app.app_context():
        assert isinstance(current_cds().store, FeedbackStore)
    assert path.exists()


# --- CORS -----------------------------------------------------------------------------------


def test_cors_only_for_configured_origins(engine: Engine, rsps: responses.RequestsMock) -> None:
    app = make_app(engine, cors_allowed_origins=("https://sandbox.cds-hooks.org",))
    client = app.test_client()
    preflight = client.options(
        f"/cds-services/{SERVICE}",
        headers={
            "Origin": "https://sandbox.cds-hooks.org",
            "Access-Control-Request-Method": "POST",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://sandbox.cds-hooks.org"
    assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
    other = client.options(f"/cds-services/{SERVICE}", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers


def test_body_limit_is_the_cds_setting(
    engine: Engine, rsps: responses.RequestsMock, ec_key: Any
) -> None:
    app = make_app(engine, max_request_bytes=500)
    with app.app_context():
        templates = current_cds().templates
    body = full_request(templates, scenarios.high_risk())
    response = app.test_client().post(f"/cds-services/{SERVICE}", json=body, headers=auth(ec_key))
    assert response.status_code == 413
    assert response.get_json()["resourceType"] == "OperationOutcome"
