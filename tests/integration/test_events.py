"""Event-driven re-assessment on the real HAPI: Subscription -> notification -> worker -> plan.

A HAPI with rest-hook subscriptions (`--testserver.subscriptions=true`), a real fhir-dm web
service on a free loopback port (werkzeug, threaded) and a real Huey consumer on the same
SQLite queue file, as `fhir-dm serve` and `fhir-dm worker` would run on one host.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests
from werkzeug.serving import make_server

from fhir_dm.fhir.client import FhirClient
from fhir_dm.fhir.config import FhirServerConfig
from fhir_dm.jobs.queue import Jobs, build_runtime, open_huey
from fhir_dm.jobs.settings import JobsSettings
from fhir_dm.subscriptions import WATCHED_TYPES, ensure_subscriptions
from fhir_dm.web.app import create_app
from fhir_dm.web.settings import Settings
from fhir_dm.web.trust import TrustConfig
from tests import factories as f

pytestmark = pytest.mark.integration

SECRET = "integration-notification-secret-0123456789"
FHIR = {"Content-Type": "application/fhir+json"}
WAIT_S = 60.0
Json = dict[str, Any]


@pytest.fixture(scope="module")
def hapi_url() -> Iterator[str]:
    from tools.hapi_server import HapiServer

    server = HapiServer(extra_args=["--testserver.subscriptions=true"])
    try:
        yield server.start()
    finally:
        server.stop()


@dataclass(frozen=True)
class Service:
    jobs: Jobs
    base_url: str


@pytest.fixture(scope="module")
def service(hapi_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """fhir-dm's web service and a worker of two threads on the same queue file."""
    from tools.hapi_server import free_port

    work = tmp_path_factory.mktemp("events")
    port = free_port()
    settings = Settings(
        fhir=FhirServerConfig(base_url=hapi_url),
        trust=TrustConfig(mode="off"),
        public_base_url=f"http://127.0.0.1:{port}",
        lock_dir=work / "locks",
        jobs=JobsSettings(
            sqlite_file=work / "queue.sqlite3",
            debounce_seconds=1.0,
            retry_base_seconds=1.0,
            notification_secret=SECRET,
        ),
    )
    assert settings.jobs is not None
    web = make_server("127.0.0.1", port, create_app(settings), threaded=True)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    jobs = Jobs(open_huey(settings.jobs), settings.jobs, lambda: build_runtime(settings))
    consumer = jobs.consumer(workers=2, worker_type="thread")
    consumer.start()
    try:
        with FhirClient(hapi_url) as client:
            report = ensure_subscriptions(client, settings.public_base_url, SECRET)
            assert sorted(report.created) == sorted(WATCHED_TYPES)
            again = ensure_subscriptions(client, settings.public_base_url, SECRET)
            assert sorted(again.unchanged) == sorted(WATCHED_TYPES)
            _wait_active(client)
        yield Service(jobs, settings.public_base_url)
    finally:
        consumer.stop(graceful=True)
        web.shutdown()
        jobs.close()


def _wait_active(client: FhirClient) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        subs = client.search("Subscription", {})
        if len(subs) >= len(WATCHED_TYPES) and all(s.get("status") == "active" for s in subs):
            return
        time.sleep(0.5)
    raise AssertionError("HAPI did not activate the Subscriptions")


def _post(hapi_url: str, resource: Json) -> Json:
    body = {k: v for k, v in resource.items() if k != "id"}
    response = requests.post(f"{hapi_url}/{resource['resourceType']}", json=body, headers=FHIR)
    response.raise_for_status()
    created: Json = response.json()
    return created


def _active_plans(client: FhirClient, patient_id: str) -> list[Json]:
    return client.search("CarePlan", {"subject": f"Patient/{patient_id}", "status": "active"})


def _wait_for(check: Any, what: str) -> Any:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_posted_condition_leads_to_one_written_plan(hapi_url: str, service: Service) -> None:
    jobs = service.jobs
    onset = (datetime.now(UTC).date() - timedelta(days=30)).isoformat()
    patient = _post(hapi_url, f.patient(birth_date="1960-01-01"))
    started = time.monotonic()
    _post(hapi_url, f.iim_condition(patient, onset=onset))
    with FhirClient(hapi_url) as client:
        plans = _wait_for(lambda: _active_plans(client, patient["id"]), "a plan")
        latency = time.monotonic() - started
        assert len(plans) == 1
        # A burst of changes for the patient: re-assessed, still exactly one active plan.
        for _ in range(5):
            _post(hapi_url, f.condition(patient, {"text": "unrelated note"}))
        time.sleep(3 * jobs.settings.debounce_seconds + 5)
        _wait_for(
            lambda: jobs.huey.pending_count() == 0 and jobs.huey.scheduled_count() == 0,
            "an empty queue",
        )
        assert len(_active_plans(client, patient["id"])) == 1
    assert jobs.dead_letters() == []
    print(f"notification to written plan: {latency:.2f} s")


def test_a_wrong_secret_is_refused_by_the_real_endpoint(service: Service) -> None:
    response = requests.post(
        f"{service.base_url}/notifications/condition",
        json={"resourceType": "Condition", "subject": {"reference": "Patient/x"}},
        headers={**FHIR, "X-Fhir-Dm-Notification-Secret": "wrong"},
    )
    assert response.status_code == 401
    assert response.json()["resourceType"] == "OperationOutcome"
