"""The web service against a real HAPI FHIR server: pull, write back, re-run, revise, race, fail."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from fhir_dm.fhir.client import FhirClient
from fhir_dm.knowledge.models import Knowledge
from tests import factories as f
from tests.integration.records import store
from tools.hapi_server import free_port

pytestmark = pytest.mark.integration

NOW = date(2024, 4, 15)
FHIR = {"Content-Type": "application/fhir+json"}
PARALLEL = 6
GUNICORN_START_TIMEOUT_S = 60.0

Json = dict[str, Any]


@pytest.fixture
def app(open_app: Flask) -> Flask:
    return open_app


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def _new_patient(hapi: FhirClient, tag: str) -> tuple[str, list[Json]]:
    """A fresh adult with dermatomyositis on HAPI (unique ids per test)."""
    suffix = uuid.uuid4().hex[:10]
    patient_id = f"svc-{tag}-{suffix}"
    p = f.patient(patient_id, birth_date="1994-01-01")
    resources = [p, f.iim_condition(p, id=f"{patient_id}-dm"), f.ck(p, 900, id=f"{patient_id}-ck")]
    store(hapi, *resources)
    return patient_id, resources


def _operation(patient_id: str, **query: str) -> str:
    params = "&".join(f"{k}={v}" for k, v in {"now": NOW.isoformat(), **query}.items())
    return f"/Patient/{patient_id}/$dm-cancer-screening?{params}"


def _ok(response: Any) -> Json:
    assert response.status_code == 200, response.get_data(as_text=True)
    body: Json = response.get_json()
    assert body["type"] == "collection"
    return body


def _diagnostics(body: Json) -> str:
    text: str = body["entry"][0]["resource"]["issue"][0]["diagnostics"]
    return text


def _written(body: Json, resource_type: str) -> list[Json]:
    return [e for e in body["entry"][1:] if e["resource"]["resourceType"] == resource_type]


def _series(hapi: FhirClient, plan: Json) -> tuple[list[Json], list[Json]]:
    """Every plan of the plan's series, and every request based on any of them."""
    series = next(i for i in plan["identifier"] if i["system"].endswith("/sid/plan-series"))
    plans = hapi.search("CarePlan", {"identifier": f"{series['system']}|{series['value']}"})
    requests_: list[Json] = []
    for p in plans:
        requests_ += hapi.search("ServiceRequest", {"based-on": f"CarePlan/{p['id']}"})
    return plans, requests_


def _history_count(fhir_base_url: str, fhir_http: requests.Session, reference: str) -> int:
    response = fhir_http.get(f"{fhir_base_url}/{reference}/_history", timeout=60)
    response.raise_for_status()
    return len(response.json().get("entry") or [])


def test_pull_write_then_rerun_changes_nothing(
    client: FlaskClient, hapi: FhirClient, fhir_base_url: str, fhir_http: requests.Session
) -> None:
    patient_id, _ = _new_patient(hapi, "rerun")
    body = _ok(client.post(_operation(patient_id)))
    assert _diagnostics(body).startswith(f"Patient/{patient_id}: tier ")
    assert _diagnostics(body).endswith("; written")
    (plan_entry,) = _written(body, "CarePlan")
    assert plan_entry["fullUrl"].startswith(f"{fhir_base_url}/CarePlan/")
    plan = hapi.read("CarePlan", plan_entry["resource"]["id"])
    assert plan is not None and plan["status"] == "active"
    assert plan["subject"]["reference"] == f"Patient/{patient_id}"
    plans, requests_ = _series(hapi, plan)
    assert len(plans) == 1 and len(requests_) == len(_written(body, "ServiceRequest")) > 0
    risks = hapi.search("RiskAssessment", {"subject": f"Patient/{patient_id}"})
    history = _history_count(fhir_base_url, fhir_http, f"CarePlan/{plan['id']}")

    again = _ok(client.post(_operation(patient_id)))
    assert "unchanged: the same plan is already active" in _diagnostics(again)
    plans_after, requests_after = _series(hapi, plan)
    assert len(plans_after) == len(plans) and len(requests_after) == len(requests_)
    assert len(hapi.search("RiskAssessment", {"subject": f"Patient/{patient_id}"})) == len(risks)
    assert _history_count(fhir_base_url, fhir_http, f"CarePlan/{plan['id']}") == history


def test_preview_writes_nothing(client: FlaskClient, hapi: FhirClient) -> None:
    patient_id, _ = _new_patient(hapi, "preview")
    body = _ok(client.post(_operation(patient_id, preview="true")))
    assert _diagnostics(body).endswith("; preview")
    assert _written(body, "CarePlan")
    assert hapi.search("CarePlan", {"subject": f"Patient/{patient_id}"}) == []
    assert hapi.search("RiskAssessment", {"subject": f"Patient/{patient_id}"}) == []


def _test_of(request: Json) -> str:
    """The test id of one of our orders (`series.round.test.YYYYMMDD`)."""
    return str(request["identifier"][0]["value"].split(".")[-2])


def test_new_antibodies_revise_the_plan_in_place_and_keep_completed_work(
    client: FlaskClient, hapi: FhirClient, knowledge: Knowledge
) -> None:
    """§13: the one plan is revised in place; orders still proposed are kept, the one no
    longer proposed is revoked with the reason, one completed on the server is left alone."""
    patient_id, resources = _new_patient(hapi, "revise")
    first = _ok(client.post(_operation(patient_id)))
    plan_id = _written(first, "CarePlan")[0]["resource"]["id"]
    plan = hapi.read("CarePlan", plan_id)
    assert plan is not None
    _, old_requests = _series(hapi, plan)
    by_test = {_test_of(r): r for r in old_requests}
    assert {"cbc", "myositis-antibodies"} <= set(by_test)
    # The clinic files the CBC result and completes our order (an order of ours completed
    # without a result in the record is not evidence: it would be ordered again).
    p = resources[0]
    done = dict(by_test["cbc"], status="completed")
    store(hapi, f.done_request(p, knowledge, "cbc", "2024-04-05"), done)
    # Anti-TIF1-gamma positive (high risk); anti-NXP2 and anti-SAE1 negative: no cancer
    # antibody left untested, so the antibody panel is no longer proposed.
    store(
        hapi,
        f.antibody(p, "tif1g", id=f"{patient_id}-tif1g"),
        f.antibody(p, "nxp2", "negative", id=f"{patient_id}-nxp2"),
        f.antibody(p, "sae1", "negative", id=f"{patient_id}-sae1"),
    )

    body = _ok(client.post(_operation(patient_id)))
    diagnostics = _diagnostics(body)
    assert f"Patient/{patient_id}: tier high;" in diagnostics
    assert " care-plan activities; written; revoked 0 care plan(s) and 1 service request(s);" in (
        diagnostics
    )
    kept = [
        r for r in old_requests if r["id"] not in (done["id"], by_test["myositis-antibodies"]["id"])
    ]
    assert "updated 1 care plan(s) in place;" in diagnostics
    assert diagnostics.endswith(f"kept {len(kept)} open service request(s); created 0")

    plans, requests_ = _series(hapi, plan)
    assert [(p["id"], p["status"]) for p in plans] == [(plan_id, "active")]  # in place
    revised = plans[0]
    assert int(revised["meta"]["versionId"]) > int(plan["meta"]["versionId"])
    status = {r["id"]: r["status"] for r in requests_}
    assert set(status) == {r["id"] for r in old_requests}  # nothing new to order yet
    assert status.pop(done["id"]) == "completed"
    assert status.pop(by_test["myositis-antibodies"]["id"]) == "revoked"
    assert set(status.values()) == {"active"}
    revoked = next(r for r in requests_ if r["id"] == by_test["myositis-antibodies"]["id"])
    assert "no longer proposed" in revoked["note"][-1]["text"]
    assert all(r["basedOn"] == [{"reference": f"CarePlan/{plan_id}"}] for r in requests_)


def test_a_bundle_written_once_is_unchanged_for_the_patient_operation(
    client: FlaskClient, hapi: FhirClient
) -> None:
    patient_id, resources = _new_patient(hapi, "bundle")
    posted = client.post(
        f"/$dm-cancer-screening?preview=false&now={NOW}",
        json=f.bundle(*resources, full_urls="none"),
        headers=FHIR,
    )
    assert _diagnostics(_ok(posted)).endswith("; written")
    pulled = _ok(client.post(_operation(patient_id)))
    assert "unchanged" in _diagnostics(pulled)
    assert len(hapi.search("CarePlan", {"subject": f"Patient/{patient_id}"})) == 1


def _assert_one_plan_no_duplicates(hapi: FhirClient, patient_id: str) -> None:
    plans = hapi.search("CarePlan", {"subject": f"Patient/{patient_id}"})
    assert [p["status"] for p in plans] == ["active"]
    requests_ = hapi.search("ServiceRequest", {"patient": patient_id})
    identifiers = Counter(
        f"{i['system']}|{i['value']}" for r in requests_ for i in r["identifier"][:1]
    )
    assert requests_ and max(identifiers.values()) == 1
    risks = hapi.search("RiskAssessment", {"subject": f"Patient/{patient_id}"})
    assert len(risks) == 1


def test_parallel_requests_in_one_process_write_once(app: Flask, hapi: FhirClient) -> None:
    patient_id, _ = _new_patient(hapi, "threads")

    def call(_: int) -> str:
        return _diagnostics(_ok(app.test_client().post(_operation(patient_id))))

    with ThreadPoolExecutor(PARALLEL) as pool:
        outcomes = list(pool.map(call, range(PARALLEL)))
    assert sum(o.endswith("; written") for o in outcomes) == 1
    assert sum("unchanged" in o for o in outcomes) == PARALLEL - 1
    _assert_one_plan_no_duplicates(hapi, patient_id)


@pytest.fixture
def gunicorn_url(fhir_base_url: str, tmp_path: Path) -> Iterator[str]:
    """The service under gunicorn: 2 workers x 3 threads, so both lock layers are needed."""
    port = free_port()
    env = {
        **os.environ,
        "FHIR_DM_FHIR__BASE_URL": fhir_base_url,
        "FHIR_DM_TRUST__MODE": "off",
        "FHIR_DM_LOCK_DIR": str(tmp_path / "locks"),
        "FHIR_DM_LOG_LEVEL": "WARNING",
    }
    log = (tmp_path / "gunicorn.log").open("wb")
    command = [
        sys.executable,
        "-m",
        "gunicorn",
        "-w",
        "2",
        "-k",
        "gthread",
        "--threads",
        "3",
        "-b",
        f"127.0.0.1:{port}",
        "fhir_dm.web.wsgi:app",
    ]
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + GUNICORN_START_TIMEOUT_S
        while True:
            try:
                if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass  # not listening yet, or the workers are still loading the knowledge
            if process.poll() is not None or time.monotonic() > deadline:
                log.flush()
                raise RuntimeError(
                    "gunicorn did not start:\n" + (tmp_path / "gunicorn.log").read_text()
                )
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def test_parallel_requests_across_gunicorn_workers_write_once(
    gunicorn_url: str, hapi: FhirClient
) -> None:
    patient_id, _ = _new_patient(hapi, "workers")

    def call(_: int) -> str:
        response = requests.post(f"{gunicorn_url}{_operation(patient_id)}", timeout=120)
        assert response.status_code == 200, response.text
        return _diagnostics(response.json())

    with ThreadPoolExecutor(PARALLEL) as pool:
        outcomes = list(pool.map(call, range(PARALLEL)))
    assert sum(o.endswith("; written") for o in outcomes) == 1
    _assert_one_plan_no_duplicates(hapi, patient_id)


def test_unknown_patient_is_404(client: FlaskClient) -> None:
    response = client.post(_operation(f"svc-nobody-{uuid.uuid4().hex[:10]}"))
    assert response.status_code == 404
    outcome = response.get_json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["code"] == "not-found"


def test_a_bundle_write_for_a_patient_unknown_to_hapi_is_404_and_writes_nothing(
    client: FlaskClient, hapi: FhirClient
) -> None:
    p = f.patient(f"svc-absent-{uuid.uuid4().hex[:10]}", birth_date="1994-01-01")
    bundle = f.bundle(p, f.iim_condition(p), full_urls="none")
    response = client.post(
        f"/$dm-cancer-screening?preview=false&now={NOW}", json=bundle, headers=FHIR
    )
    assert response.status_code == 404
    outcome = response.get_json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["code"] == "not-found"
    assert hapi.search("CarePlan", {"subject": f"Patient/{p['id']}"}) == []


def test_patients_sharing_an_identifier_each_get_their_own_plan(
    client: FlaskClient, hapi: FhirClient
) -> None:
    mrn = f"SHARED-{uuid.uuid4().hex[:8]}"
    ids = []
    for tag in ("twin-a", "twin-b"):
        patient_id = f"svc-{tag}-{uuid.uuid4().hex[:10]}"
        p = f.patient(patient_id, birth_date="1994-01-01", identifier=mrn)
        store(hapi, p, f.iim_condition(p, id=f"{patient_id}-dm"))
        assert _diagnostics(_ok(client.post(_operation(patient_id)))).endswith("; written")
        ids.append(patient_id)
    for patient_id in ids:
        _assert_one_plan_no_duplicates(hapi, patient_id)
