"""The notification endpoint: secrets, HAPI's delivery shapes, enqueueing, and a plan written."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from fhir_dm.events.queue import Jobs
from fhir_dm.events.settings import JobsSettings
from fhir_dm.events.subscriptions import SECRET_HEADER, subscription_secret
from fhir_dm.web.app import create_app
from fhir_dm.web.notifications import JOBS_KEY
from tests import factories as f
from tests.unit.web.conftest import BASE, FakeFhirServer, make_settings

MASTER = "notification-master-secret-0123456789abcdef"
FHIR = "application/fhir+json"

Json = dict[str, Any]


@pytest.fixture
def app(tmp_path: Path) -> Flask:
    jobs = JobsSettings(
        sqlite_file=tmp_path / "queue.sqlite3", debounce_seconds=0, notification_secret=MASTER
    )
    return create_app(make_settings(tmp_path, jobs=jobs))


@pytest.fixture
def jobs(app: Flask) -> Jobs:
    queue = app.extensions[JOBS_KEY]
    assert isinstance(queue, Jobs)
    return queue


def headers(key: str = "condition", secret: str | None = None) -> dict[str, str]:
    return {
        SECRET_HEADER: secret if secret is not None else subscription_secret(MASTER, key),
        "Content-Type": FHIR,
    }


def condition(patient: str = "p1") -> Json:
    return {
        "resourceType": "Condition",
        "id": "c1",
        "subject": {"reference": f"Patient/{patient}"},
        "code": {"text": "something"},
    }


def pending_patients(jobs: Jobs) -> list[str]:
    return sorted(t.args[0] for t in jobs.huey.pending())


def test_a_notification_enqueues_one_reassessment_per_patient(
    client: FlaskClient, jobs: Jobs
) -> None:
    for _ in range(3):
        response = client.post("/notifications/condition", json=condition(), headers=headers())
        assert response.status_code == 202
        assert response.get_json()["resourceType"] == "OperationOutcome"
    assert pending_patients(jobs) == ["p1"]


def test_hapi_delivers_the_payload_as_an_update(client: FlaskClient, jobs: Jobs) -> None:
    url = "/notifications/condition/Condition/c1"
    assert client.put(url, json=condition("p7"), headers=headers()).status_code == 202
    assert pending_patients(jobs) == ["p7"]
    other = client.put(
        "/notifications/condition/Observation/c1", json=condition(), headers=headers()
    )
    assert other.status_code == 400
    assert client.delete(url, headers=headers()).status_code == 202
    assert pending_patients(jobs) == ["p7"]


def test_a_bundle_names_several_patients(client: FlaskClient, jobs: Jobs) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "history",
        "entry": [{"resource": condition("a")}, {"resource": condition("b")}, {"x": 1}],
    }
    response = client.post("/notifications/condition", json=bundle, headers=headers())
    assert response.status_code == 202
    assert pending_patients(jobs) == ["a", "b"]


@pytest.mark.parametrize(
    ("secret", "key"),
    [
        ("", "condition"),
        ("wrong", "condition"),
        (subscription_secret(MASTER, "observation"), "condition"),  # another channel's secret
        (subscription_secret("another-master-secret-0123456789abcdef", "condition"), "condition"),
    ],
)
def test_a_wrong_secret_is_refused(client: FlaskClient, jobs: Jobs, secret: str, key: str) -> None:
    response = client.post(f"/notifications/{key}", json=condition(), headers=headers(key, secret))
    assert response.status_code == 401
    assert response.get_json()["issue"][0]["code"] == "login"
    assert pending_patients(jobs) == []


def test_a_missing_secret_header_and_an_unknown_channel_are_refused(
    client: FlaskClient, jobs: Jobs
) -> None:
    missing = client.post("/notifications/condition", json=condition(), headers={})
    assert missing.status_code == 401
    unknown = client.post("/notifications/patientx", json=condition(), headers=headers("patientx"))
    assert unknown.status_code == 404
    assert unknown.get_json()["resourceType"] == "OperationOutcome"
    assert pending_patients(jobs) == []


def test_bad_bodies_are_operation_outcomes(client: FlaskClient, jobs: Jobs) -> None:
    url = "/notifications/condition"
    not_json = client.post(url, data=b"{", headers=headers())
    assert not_json.status_code == 400
    assert not_json.get_json()["resourceType"] == "OperationOutcome"
    not_fhir = client.post(url, json={"a": 1}, headers=headers())
    assert not_fhir.status_code == 400
    wrong_type = client.post(
        url,
        json={"resourceType": "Observation", "subject": {"reference": "Patient/p1"}},
        headers=headers(),
    )
    assert wrong_type.status_code == 400
    assert pending_patients(jobs) == []


def test_an_empty_body_and_foreign_references_enqueue_nothing(
    client: FlaskClient, jobs: Jobs
) -> None:
    url = "/notifications/condition"
    empty = client.post(url, headers={SECRET_HEADER: subscription_secret(MASTER, "condition")})
    assert empty.status_code == 202
    foreign = condition()
    foreign["subject"] = {"reference": "https://elsewhere.example/fhir/Patient/p1"}
    assert client.post(url, json=foreign, headers=headers()).status_code == 202
    absolute = condition()
    absolute["subject"] = {"reference": f"{BASE}/Patient/p9"}
    assert client.post(url, json=absolute, headers=headers()).status_code == 202
    assert pending_patients(jobs) == ["p9"]


def test_no_patient_id_reaches_the_log(tmp_path: Path, log_stream: io.StringIO) -> None:
    settings = make_settings(
        tmp_path,
        jobs=JobsSettings(sqlite_file=tmp_path / "q.sqlite3", notification_secret=MASTER),
    )
    client = create_app(settings).test_client()
    assert (
        client.post(
            "/notifications/condition", json=condition("pid-visible-4711"), headers=headers()
        ).status_code
        == 202
    )
    client.post("/notifications/condition", json=condition("pid-visible-4711"), headers={})
    logged = log_stream.getvalue()
    assert "notification on condition: 1 patient(s), 1 enqueued" in logged
    assert "pid-visible-4711" not in logged


def test_without_a_secret_there_is_no_endpoint(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, jobs=JobsSettings(sqlite_file=tmp_path / "q.sqlite3"))
    client = create_app(settings).test_client()
    assert client.post("/notifications/condition", json=condition()).status_code == 404


def test_a_notification_leads_to_a_written_plan(
    client: FlaskClient, jobs: Jobs, fhir_server: FakeFhirServer
) -> None:
    """End to end on the fake server: notification -> queue -> worker -> write-back."""
    patient = f.patient("n-1", birth_date="1970-01-01")
    dm = f.iim_condition(patient)
    fhir_server.put(patient, dm)
    response = client.post("/notifications/condition", json=dm, headers=headers())
    assert response.status_code == 202
    assert fhir_server.all("CarePlan") == []
    task = jobs.huey.dequeue()  # what `fhir-dm worker` does
    jobs.huey.execute(task)
    plans = fhir_server.all("CarePlan")
    assert len(plans) == 1 and plans[0]["subject"]["reference"] == "Patient/n-1"
    # The same change notified again re-assesses, and nothing new is written.
    client.post("/notifications/condition", json=dm, headers=headers())
    jobs.huey.execute(jobs.huey.dequeue())
    assert len(fhir_server.all("CarePlan")) == 1
    assert jobs.dead_letters() == []


def test_the_write_backs_own_resources_enqueue_nothing(
    client: FlaskClient, jobs: Jobs, fhir_server: FakeFhirServer
) -> None:
    """Our plan's ServiceRequests, notified back to us, start no second run; a clinician's do."""
    patient = f.patient("n-2", birth_date="1970-01-01")
    dm = f.iim_condition(patient)
    fhir_server.put(patient, dm)
    client.post("/notifications/condition", json=dm, headers=headers())
    jobs.huey.execute(jobs.huey.dequeue())
    ours = fhir_server.all("ServiceRequest")
    assert ours
    for request in ours:
        url = f"/notifications/servicerequest/ServiceRequest/{request['id']}"
        response = client.put(url, json=request, headers=headers("servicerequest"))
        assert response.status_code == 202
        text = response.get_json()["issue"][0]["diagnostics"]
        assert "0 re-assessment(s) enqueued, 1 resource(s) written by fhir-dm itself ignored" in (
            text
        )
    assert jobs.huey.pending_count() == 0
    theirs = {
        "resourceType": "ServiceRequest",
        "id": "clinician-1",
        "status": "active",
        "intent": "order",
        "subject": {"reference": "Patient/n-2"},
        "code": {"text": "CT chest"},
    }
    client.post("/notifications/servicerequest", json=theirs, headers=headers("servicerequest"))
    assert pending_patients(jobs) == ["n-2"]
