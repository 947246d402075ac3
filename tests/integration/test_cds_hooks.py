"""CDS Hooks on a real HAPI FHIR server: sandbox-shaped call, suggestion applied, fallback fetch.

The suggestion is applied as one transaction, following the documented client convention,
and every created resource is validated against its profile; missing prefetch is read from
HAPI with the EHR's token.
"""

from __future__ import annotations

import io
import json
import time
import uuid
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ec
from flask import Flask
from flask.testing import FlaskClient

from fhir_dm.cds.prefetch import render
from fhir_dm.cds.state import StateSettings
from fhir_dm.core.assess import Engine
from fhir_dm.fhir.auth import BearerAuth
from fhir_dm.fhir.client import FhirClient
from fhir_dm.fhir.retry import RetryPolicy
from fhir_dm.web import cds_hooks, logs, outcomes
from fhir_dm.web.cds_hooks import CdsSettings, PlanWriter, current_cds, init_app
from fhir_dm.web.trust import IssuerTrust, TrustConfig
from fhir_dm.writeback.locks import PatientLocks
from fhir_dm.writeback.writer import WriteBack
from tests import factories as f
from tests.unit.cds import scenarios

pytestmark = pytest.mark.integration

SERVICE = "dm-cancer-screening"
PUBLIC = "https://dm.example.org"
SERVICE_URL = f"{PUBLIC}/cds-services/{SERVICE}"
# The CDS Hooks sandbox signs with ES384 and names its key set in `jku`.
SANDBOX_ISS = "https://sandbox.cds-hooks.org"
SANDBOX_JWKS = "https://sandbox.cds-hooks.org/.well-known/jwks.json"
NOW = date(2024, 4, 15)
FHIR_JSON = "application/fhir+json"

Json = dict[str, Any]


class KeySetAdapter(requests.adapters.BaseAdapter):
    """Serves the test's public key set at the sandbox's JWKS URL (no network)."""

    def __init__(self, key_set: Json) -> None:
        super().__init__()
        self.body = json.dumps(key_set).encode()

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        response = requests.Response()
        response.status_code = 200 if request.url == SANDBOX_JWKS else 404
        response.raw = io.BytesIO(self.body if response.status_code == 200 else b"")
        response.headers["Content-Type"] = "application/json"
        response.url = str(request.url)
        response.request = request
        return response

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def make_app(
    engine: Engine, fhir_base_url: str, ec_key: Any, state_dir: Path, **extra: Any
) -> Flask:
    jwk = jwt.algorithms.ECAlgorithm.to_jwk(ec_key.public_key(), as_dict=True)
    key_session = requests.Session()
    key_session.mount(
        "https://sandbox.cds-hooks.org/",
        KeySetAdapter({"keys": [{**jwk, "kid": "sandbox-key", "use": "sig", "alg": "ES384"}]}),
    )
    settings = CdsSettings(
        public_base_url=PUBLIC,
        trust=TrustConfig(
            mode="jwt",
            issuers=(IssuerTrust(iss=SANDBOX_ISS, jwks_url=SANDBOX_JWKS),),
            algorithms=("ES384",),
        ),
        allowed_fhir_servers=(fhir_base_url,),
        state=StateSettings(sqlite_path=state_dir / "cds.sqlite3"),
        **extra,
    )
    app = Flask(__name__)
    logs.init_app(app)
    outcomes.init_app(app)
    writeback = WriteBack(
        FhirClient(fhir_base_url, retry=RetryPolicy(max_retries=1)),
        engine,
        PatientLocks(state_dir / "locks"),
    )
    init_app(
        app,
        settings,
        engine=engine,
        knowledge=engine.knowledge,
        clock=lambda: NOW,
        http_session=key_session,
        plan_writer=PlanWriter(writeback, fhir_base_url),
    )
    return app


@pytest.fixture
def app(
    engine: Engine,
    fhir_base_url: str,
    loaded_profiles: dict[str, Json],
    ec_key: Any,
    tmp_path: Path,
) -> Iterator[Flask]:
    app = make_app(engine, fhir_base_url, ec_key, tmp_path)
    yield app
    with app.app_context():
        current_cds().store.close()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def fhir(fhir_base_url: str) -> Iterator[requests.Session]:
    with requests.Session() as session:
        session.headers.update({"Accept": FHIR_JSON, "Content-Type": FHIR_JSON})
        yield session


def sandbox_jwt(key: Any, aud: str = SERVICE_URL) -> str:
    now = int(time.time())
    claims = {
        "iss": SANDBOX_ISS,
        "aud": aud,
        "exp": now + 300,
        "iat": now,
        "jti": str(uuid.uuid4()),
    }
    headers = {"kid": "sandbox-key", "typ": "JWT", "jku": SANDBOX_JWKS}
    return jwt.encode(claims, key, algorithm="ES384", headers=headers)


def store(fhir: requests.Session, base: str, resources: list[Json]) -> None:
    """Put the patient's record on the server with its ids, as the EHR holds it."""
    entries = [
        {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
        for r in resources
    ]
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    response = fhir.post(base, data=json.dumps(bundle), timeout=60)
    assert response.status_code == 200, response.text


def sandbox_prefetch(
    client: FlaskClient, fhir: requests.Session, base: str, key: Any, patient_id: str
) -> Json:
    """What the sandbox does: read discovery, run every template against its FHIR server."""
    discovery = client.get(
        "/cds-services",
        headers={"Authorization": f"Bearer {sandbox_jwt(key, PUBLIC + '/cds-services')}"},
    )
    assert discovery.status_code == 200
    [service] = discovery.get_json()["services"]
    prefetch: Json = {}
    for name, template in service["prefetch"].items():
        response = fhir.get(f"{base}/{render(template, {'patientId': patient_id})}", timeout=60)
        assert response.status_code in (200, 404), (name, response.text[:300])
        prefetch[name] = response.json() if response.status_code == 200 else None
    return prefetch


def call_hook(client: FlaskClient, key: Any, body: Json) -> Any:
    return client.post(
        f"/cds-services/{SERVICE}",
        json=body,
        headers={"Authorization": f"Bearer {sandbox_jwt(key)}"},
    )


def accept(client: FlaskClient, key: Any, card: Json, at: str) -> Json:
    """Accept the card's first suggestion as the sandbox does; the feedback answer."""
    url = f"/cds-services/{SERVICE}/feedback"
    answer = client.post(
        url,
        json=scenarios.accepted(card, at),
        headers={"Authorization": f"Bearer {sandbox_jwt(key, PUBLIC + url)}"},
    )
    assert answer.status_code == 200, answer.get_data(as_text=True)
    return dict(answer.get_json())


def transaction_from_suggestion(suggestion: Json, fhir_server: str) -> Json:
    """The documented client convention: the actions as one transaction, each entry's fullUrl
    inferred as `{fhirServer}/{type}/{id}`, creates POSTed, updates PUT by id."""
    entries = []
    for action in suggestion["actions"]:
        if action["type"] == "delete":
            entries.append({"request": {"method": "DELETE", "url": action["resourceId"]}})
            continue
        resource = action["resource"]
        kind, rid = resource["resourceType"], resource["id"]
        request = (
            {"method": "POST", "url": kind}
            if action["type"] == "create"
            else {"method": "PUT", "url": f"{kind}/{rid}"}
        )
        entries.append(
            {"fullUrl": f"{fhir_server}/{kind}/{rid}", "resource": resource, "request": request}
        )
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def validation_errors(fhir: requests.Session, base: str, resource: Json) -> list[str]:
    profile = resource["meta"]["profile"][0]
    response = fhir.post(
        f"{base}/{resource['resourceType']}/$validate",
        params={"profile": profile},
        data=json.dumps(resource),
        timeout=120,
    )
    outcome = response.json()
    return [
        f"{i.get('severity')}: {i.get('diagnostics')} @ {i.get('expression') or i.get('location')}"
        for i in outcome.get("issue", [])
        if i.get("severity") in ("error", "fatal")
    ]


def test_sandbox_call_suggestion_applies_as_one_transaction_and_validates(
    client: FlaskClient, fhir: requests.Session, fhir_base_url: str, ec_key: Any
) -> None:
    resources = scenarios.high_risk()
    patient_id = resources[0]["id"]
    store(fhir, fhir_base_url, resources)
    prefetch = sandbox_prefetch(client, fhir, fhir_base_url, ec_key, patient_id)
    body = scenarios.hook_request(patient_id, prefetch, fhir_server=fhir_base_url)

    response = call_hook(client, ec_key, body)
    assert response.status_code == 200, response.get_data(as_text=True)
    [card] = response.get_json()["cards"]
    assert card["summary"].startswith("IIM cancer screening: High risk — ")
    [suggestion] = card["suggestions"]

    bundle = transaction_from_suggestion(suggestion, fhir_base_url)
    applied = fhir.post(fhir_base_url, data=json.dumps(bundle), timeout=120)
    assert applied.status_code == 200, applied.text[:2000]
    locations = [e["response"]["location"].split("/_history")[0] for e in applied.json()["entry"]]
    assert len(locations) == len(suggestion["actions"])

    stored: dict[str, list[Json]] = {}
    for location in locations:
        resource = fhir.get(f"{fhir_base_url}/{location}", timeout=60).json()
        stored.setdefault(resource["resourceType"], []).append(resource)
    [risk] = stored["RiskAssessment"]
    [plan] = stored["CarePlan"]
    requests_ = stored["ServiceRequest"]
    assert len(requests_) == len(card["suggestions"][0]["actions"]) - 3
    # Intra-suggestion references now point at the ids the server assigned.
    assert plan["supportingInfo"] == [{"reference": f"RiskAssessment/{risk['id']}"}]
    assert {a["reference"]["reference"] for a in plan["activity"] if "reference" in a} == {
        f"ServiceRequest/{r['id']}" for r in requests_
    }
    assert all(r["basedOn"] == [{"reference": f"CarePlan/{plan['id']}"}] for r in requests_)
    [provenance] = stored["Provenance"]
    assert f"CarePlan/{plan['id']}" in {t["reference"] for t in provenance["target"]}

    for resource in [risk, plan, *requests_]:
        assert validation_errors(fhir, fhir_base_url, resource) == [], resource["resourceType"]

    # The chart is opened again: the plan is on file, nothing is proposed twice.
    prefetch = sandbox_prefetch(client, fhir, fhir_base_url, ec_key, patient_id)
    assert len(prefetch["existingPlans"]["entry"]) == 1
    again = call_hook(client, ec_key, scenarios.hook_request(patient_id, prefetch))
    [card] = again.get_json()["cards"]
    assert card["summary"].startswith("Plan on file: High risk; ")
    assert "suggestions" not in card
    assert f"CarePlan/{plan['id']}" in card["detail"]


def test_missing_prefetch_is_read_from_the_fhir_server_with_the_ehr_token(
    client: FlaskClient,
    fhir: requests.Session,
    fhir_base_url: str,
    ec_key: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    patient = f.patient(f"cds-fallback-{uuid.uuid4().hex[:8]}", birth_date="1994-01-01")
    resources = [patient, f.iim_condition(patient), f.antibody(patient, "tif1g", "positive")]
    store(fhir, fhir_base_url, resources)
    sent: list[str] = []

    class RecordingBearerAuth(BearerAuth):
        def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
            prepared = super().__call__(r)
            sent.append(prepared.headers["Authorization"])
            return prepared

    monkeypatch.setattr(cds_hooks, "BearerAuth", RecordingBearerAuth)
    body = scenarios.hook_request(
        patient["id"], None, fhir_server=fhir_base_url, token="dummy-ehr-token"
    )
    response = call_hook(client, ec_key, body)
    assert response.status_code == 200, response.get_data(as_text=True)
    [card] = response.get_json()["cards"]
    # DM and anti-TIF1-gamma, both read from HAPI: high risk.
    assert card["summary"].startswith("IIM cancer screening: High risk — ")
    with client.application.app_context():
        keys = len(current_cds().templates)
    assert len(sent) >= keys and set(sent) == {"Bearer dummy-ehr-token"}


def test_missing_prefetch_without_a_token_is_412_for_the_patient_itself(
    client: FlaskClient, fhir: requests.Session, fhir_base_url: str, ec_key: Any
) -> None:
    resources = scenarios.high_risk()
    store(fhir, fhir_base_url, resources)
    body = scenarios.hook_request(resources[0]["id"], None, fhir_server=fhir_base_url)
    response = call_hook(client, ec_key, body)
    assert response.status_code == 412
    assert response.get_json()["issue"][0]["code"] == "incomplete"


def _many_conditions(patient: Json, count: int) -> list[Json]:
    return [
        {
            "resourceType": "Condition",
            "id": f"{patient['id']}-many-{n}",
            "subject": {"reference": f"Patient/{patient['id']}"},
            "code": {"text": f"Unrelated finding {n}"},
        }
        for n in range(count)
    ]


@pytest.mark.parametrize("server_open", [True, False])
def test_more_than_200_results_in_one_key_without_a_token(
    engine: Engine,
    fhir: requests.Session,
    fhir_base_url: str,
    loaded_profiles: dict[str, Json],
    ec_key: Any,
    tmp_path: Path,
    server_open: bool,
) -> None:
    """The sandbox on HAPI: 200 is HAPI's page cap, the sandbox forwards the first page with
    its `next` link and no fhirAuthorization. An open server is read for the rest; otherwise
    the card says the assessment is incomplete and why (it was a 412, shown as "All clear")."""
    extra = {"open_fhir_servers": (fhir_base_url,)} if server_open else {}
    client = make_app(engine, fhir_base_url, ec_key, tmp_path, **extra).test_client()
    resources = scenarios.high_risk()
    patient = resources[0]
    store(fhir, fhir_base_url, [*resources, *_many_conditions(patient, 205)])
    prefetch = sandbox_prefetch(client, fhir, fhir_base_url, ec_key, patient["id"])
    conditions = prefetch["conditions"]
    assert len(conditions["entry"]) == 200
    assert any(link["relation"] == "next" for link in conditions.get("link", []))
    body = scenarios.hook_request(patient["id"], prefetch, fhir_server=fhir_base_url)
    response = call_hook(client, ec_key, body)
    assert response.status_code == 200, response.get_data(as_text=True)
    [card] = response.get_json()["cards"]
    if server_open:
        assert card["summary"].startswith("IIM cancer screening: High risk — ")
    else:
        assert card["indicator"] == "warning"
        assert "assessment incomplete" in card["summary"]
        assert "conditions" in card["detail"] and "next link" in card["detail"]


def test_more_than_a_default_page_of_results_reaches_the_service_in_one_prefetch(
    client: FlaskClient, fhir: requests.Session, fhir_base_url: str, ec_key: Any
) -> None:
    """HAPI pages at 20; the templates ask for `_count`, so a sandbox-like client that forwards
    only the first page, without a token, still forwards everything."""
    resources = scenarios.high_risk()
    patient = resources[0]
    extra = [
        {
            "resourceType": "Condition",
            "id": f"{patient['id']}-extra-{n}",
            "subject": {"reference": f"Patient/{patient['id']}"},
            "code": {"text": f"Unrelated finding {n}"},
        }
        for n in range(25)
    ]
    store(fhir, fhir_base_url, [*resources, *extra])
    unpaged = fhir.get(f"{fhir_base_url}/Condition", params={"patient": patient["id"]}, timeout=60)
    assert any(link["relation"] == "next" for link in unpaged.json().get("link", []))
    prefetch = sandbox_prefetch(client, fhir, fhir_base_url, ec_key, patient["id"])
    conditions = prefetch["conditions"]
    assert len(conditions["entry"]) > 25
    assert not any(link["relation"] == "next" for link in conditions.get("link", []))
    body = scenarios.hook_request(patient["id"], prefetch, fhir_server=fhir_base_url)
    response = call_hook(client, ec_key, body)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json()["cards"][0]["summary"].startswith("IIM cancer screening: High")


def test_an_accepted_suggestion_is_written_by_fhir_dm_once_when_the_site_asks(
    engine: Engine,
    fhir: requests.Session,
    fhir_base_url: str,
    loaded_profiles: dict[str, Json],
    ec_key: Any,
    tmp_path: Path,
) -> None:
    """The sandbox records "accepted" and applies nothing: write_on_accept writes the plan."""
    client = make_app(engine, fhir_base_url, ec_key, tmp_path, write_on_accept=True).test_client()
    resources = scenarios.high_risk()
    patient_id = resources[0]["id"]
    store(fhir, fhir_base_url, resources)
    prefetch = sandbox_prefetch(client, fhir, fhir_base_url, ec_key, patient_id)
    body = scenarios.hook_request(patient_id, prefetch, fhir_server=fhir_base_url)
    [card] = call_hook(client, ec_key, body).get_json()["cards"]
    assert accept(client, ec_key, card, "2024-04-15T10:01:00Z")["plans"]["written"] == 1
    assert accept(client, ec_key, card, "2024-04-15T10:02:00Z")["plans"]["alreadyHandled"] == 1
    plans = fhir.get(
        f"{fhir_base_url}/CarePlan", params={"subject": f"Patient/{patient_id}"}, timeout=60
    ).json()
    assert len(plans.get("entry", [])) == 1
    prefetch = sandbox_prefetch(client, fhir, fhir_base_url, ec_key, patient_id)
    again = call_hook(client, ec_key, scenarios.hook_request(patient_id, prefetch))
    [on_file] = again.get_json()["cards"]
    assert "suggestions" not in on_file


def test_a_tier_rise_after_the_plan_is_written_is_a_warning_and_the_revision_is_written(
    engine: Engine,
    fhir: requests.Session,
    fhir_base_url: str,
    loaded_profiles: dict[str, Json],
    ec_key: Any,
    tmp_path: Path,
) -> None:
    """The sandbox run: a Moderate plan was written, then a TIF1-gamma result arrives. The card
    was a blue info card with nothing to do; it is a warning naming both plans, and accepting
    its suggestion revises the plan on file (write_on_accept)."""
    client = make_app(engine, fhir_base_url, ec_key, tmp_path, write_on_accept=True).test_client()
    resources = scenarios.moderate_preliminary()
    patient = resources[0]
    store(fhir, fhir_base_url, resources)

    def card_now() -> Json:
        prefetch = sandbox_prefetch(client, fhir, fhir_base_url, ec_key, patient["id"])
        body = scenarios.hook_request(patient["id"], prefetch, fhir_server=fhir_base_url)
        response = call_hook(client, ec_key, body)
        assert response.status_code == 200, response.get_data(as_text=True)
        [card] = response.get_json()["cards"]
        return dict(card)

    def plans(**params: str) -> list[Json]:
        found = fhir.get(
            f"{fhir_base_url}/CarePlan",
            params={"subject": f"Patient/{patient['id']}", **params},
            timeout=60,
        ).json()
        return [e["resource"] for e in found.get("entry", [])]

    first = card_now()
    assert "Moderate risk" in first["summary"]
    assert accept(client, ec_key, first, "2024-04-15T10:01:00Z")["plans"]["written"] == 1
    [plan] = plans()
    orders = sum(1 for a in plan["activity"] if "reference" in a)

    store(fhir, fhir_base_url, [f.antibody(patient, "tif1g", "positive")])
    changed = card_now()
    assert changed["indicator"] == "warning"
    assert changed["summary"].startswith(
        f"Plan on file: Moderate risk (preliminary), {orders} orders; record now gives: High risk"
    )
    [suggestion] = changed["suggestions"]
    assert suggestion["label"].startswith("Revise the plan on file to High risk")

    answer = accept(client, ec_key, changed, "2024-04-15T10:02:00Z")
    assert answer["plans"]["written"] == 1, answer
    [active] = plans(status="active")
    assert "High risk" in active["title"]
    after = card_now()
    assert after["summary"].startswith("Plan on file: High risk; ")
    assert "suggestions" not in after
