"""Event-driven re-assessment on the real HAPI: Subscription -> notification -> worker -> plan.

The test HAPI as it starts by default (rest-hook Subscriptions on, changes handed to its matcher
every 0.1 s), a real fhir-dm web service on a free loopback port (werkzeug, threaded) and a real
Huey consumer on the same SQLite queue file, with the default job settings (no debounce), as
`fhir-dm serve` and `fhir-dm worker` would run on one host. The last tests swap the endpoint's
app for one on a real Redis queue, run `fhir-dm worker` in two processes (two "hosts": own lock
directories) and reach HAPI through a TCP relay that can be cut, to take the FHIR server away
from the workers for a while.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from huey.constants import EmptyData
from werkzeug.serving import make_server

from fhir_dm.events.queue import (
    PENDING_PREFIX,
    Jobs,
    Runtime,
    open_huey,
    patient_key,
)
from fhir_dm.events.settings import JobsSettings
from fhir_dm.events.subscriptions import WATCHED_TYPES, ensure_subscriptions, inactive_subscriptions
from fhir_dm.fhir.client import FhirClient
from fhir_dm.fhir.config import FhirServerConfig
from fhir_dm.web.app import create_app
from fhir_dm.web.jobs import build_runtime
from fhir_dm.web.settings import Settings
from fhir_dm.web.trust import TrustConfig
from tests import factories as f
from tests.redis_server import RedisServer

pytestmark = pytest.mark.integration

SECRET = "integration-notification-secret-0123456789"
FHIR = {"Content-Type": "application/fhir+json"}
WAIT_S = 60.0
LUNG_CANCER = f.concept(f.SCT, "363358000", "Malignant tumor of lung (disorder)")
CT_LOINC = "89283-6"  # CT neck, chest, abdomen and pelvis: a cancer-screening test
Json = dict[str, Any]
WsgiApp = Callable[..., Any]


@pytest.fixture(scope="module")
def hapi_url() -> Iterator[str]:
    from tools.hapi_server import HapiServer

    server = HapiServer()  # Subscriptions on by default
    try:
        yield server.start()
    finally:
        server.stop()


class Front:
    """The notification endpoint's WSGI app, swappable, so one set of Subscriptions serves all.

    It notes the path of every notification that reaches it (HAPI delivers a payload as
    `PUT /notifications/{key}/{type}/{id}`), so a test can wait until HAPI has delivered.
    """

    def __init__(self, app: WsgiApp) -> None:
        self.app = app
        self.paths: list[str] = []

    def __call__(self, environ: Any, start_response: Any) -> Any:
        path = str(environ.get("PATH_INFO", ""))
        if path.startswith("/notifications/"):
            self.paths.append(path)
        return self.app(environ, start_response)

    def delivered(self, resource_type: str, rid: str) -> bool:
        return any(p.endswith(f"/{resource_type}/{rid}") for p in list(self.paths))


class Runs:
    """Every re-assessment the worker finished: the patient and the write's status."""

    def __init__(self) -> None:
        self.done: list[tuple[str, str]] = []
        self._guard = threading.Lock()

    def runtime(self, settings: Settings) -> Runtime:
        runtime = build_runtime(settings)
        assess = runtime.writeback.assess_patient

        def counted(patient_id: str, **kwargs: Any) -> Any:
            write = assess(patient_id, **kwargs)
            with self._guard:
                self.done.append((patient_id, str(write.status)))
            return write

        setattr(runtime.writeback, "assess_patient", counted)  # noqa: B010 - a method, for mypy
        return runtime

    def of(self, patient_id: str) -> list[str]:
        """The statuses of the patient's runs, in order."""
        with self._guard:
            return [status for pid, status in self.done if pid == patient_id]


@dataclass(frozen=True)
class Service:
    jobs: Jobs
    base_url: str
    front: Front
    settings: Settings
    runs: Runs


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
            retry_base_seconds=1.0,
            notification_secret=SECRET,
        ),
    )
    assert settings.jobs is not None
    sqlite_app = create_app(settings)
    front = Front(sqlite_app)
    web = make_server("127.0.0.1", port, front, threaded=True)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    runs = Runs()
    jobs = Jobs(open_huey(settings.jobs), settings.jobs, lambda: runs.runtime(settings))
    consumer = jobs.consumer(workers=2, worker_type="thread")
    consumer.start()
    try:
        with FhirClient(hapi_url) as client:
            report = ensure_subscriptions(client, settings.public_base_url, SECRET)
            assert sorted(report.created) == sorted(WATCHED_TYPES)
            # What `fhir-dm subscriptions` checks: the server activated every one.
            assert inactive_subscriptions(client, settings.public_base_url, wait_seconds=60) == []
            assert all(s["status"] == "active" for s in client.search("Subscription", {}))
            again = ensure_subscriptions(client, settings.public_base_url, SECRET)
            assert sorted(again.unchanged) == sorted(WATCHED_TYPES)
            _wait_delivering(hapi_url, front)
        yield Service(jobs, settings.public_base_url, front, settings, runs)
    finally:
        consumer.stop(graceful=True)
        web.shutdown()
        jobs.close()


def _wait_delivering(hapi_url: str, front: Front) -> None:
    """HAPI marks a Subscription active a little before its matcher has it: probe until then."""
    probe = _post(hapi_url, f.patient(birth_date="1950-01-01"))
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        note = _post(hapi_url, f.condition(probe, {"text": "probe"}))
        for _ in range(20):
            if front.delivered("Condition", note["id"]):
                return
            time.sleep(0.1)
    raise AssertionError("HAPI delivers no notification")


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
        notes = [_post(hapi_url, f.condition(patient, {"text": "unrelated note"})) for _ in "12345"]
        _wait_for(
            lambda: all(service.front.delivered("Condition", n["id"]) for n in notes),
            "the notes notified",
        )
        _wait_for(lambda: _quiet(jobs), "an empty queue")
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


# -- what a notification changes in the plan ------------------------------------------------


def _today() -> str:
    return datetime.now(UTC).date().isoformat()


def _young_dm(hapi_url: str) -> Json:
    """A woman with DM at 32: moderate risk (preliminary) until her antibodies are known."""
    patient = _post(hapi_url, f.patient(birth_date="1994-01-01", gender="female"))
    onset = (datetime.now(UTC).date() - timedelta(days=30)).isoformat()
    _post(hapi_url, f.iim_condition(patient, onset=onset))
    return patient


def _tier(client: FhirClient, plan: Json) -> str:
    """The risk tier code of the RiskAssessment the plan rests on."""
    kind, rid = plan["supportingInfo"][0]["reference"].split("/")
    risk = client.read(kind, rid)
    assert risk is not None
    codings = risk["prediction"][0]["qualitativeRisk"]["coding"]
    return str(codings[0]["code"])


def _one_plan_with_tier(client: FhirClient, patient_id: str, tier: str) -> Json | None:
    plans = _active_plans(client, patient_id)
    if len(plans) == 1 and _tier(client, plans[0]) == tier:
        return plans[0]
    return None


def _quiet(jobs: Jobs) -> bool:
    return bool(jobs.huey.pending_count() == 0 and jobs.huey.scheduled_count() == 0)


def _settled(jobs: Jobs, patient_id: str) -> bool:
    """No run of the patient's claimed (queued, running or waiting to retry)."""
    claim = PENDING_PREFIX + patient_key(patient_id)
    return jobs.huey.storage.peek_data(claim) is EmptyData


def _transaction(hapi_url: str, resources: list[Json]) -> list[Json]:
    """POST the resources in one transaction (one commit): what HAPI created, in order."""
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": r, "request": {"method": "POST", "url": r["resourceType"]}}
            for r in resources
        ],
    }
    response = requests.post(hapi_url, json=bundle, headers=FHIR)
    response.raise_for_status()
    created = []
    for entry in response.json()["entry"]:
        kind, rid = entry["response"]["location"].split("/")[:2]
        created.append({"resourceType": kind, "id": rid})
    return created


def test_a_write_back_starts_no_second_run(hapi_url: str, service: Service) -> None:
    """HAPI notifies fhir-dm of the ServiceRequests its write-back stored: they are ignored."""
    onset = (datetime.now(UTC).date() - timedelta(days=30)).isoformat()
    patient = _post(hapi_url, f.patient(birth_date="1960-01-01"))
    _post(hapi_url, f.iim_condition(patient, onset=onset))
    with FhirClient(hapi_url) as client:
        _wait_for(lambda: _active_plans(client, patient["id"]), "a plan")
        ours = client.search("ServiceRequest", {"subject": f"Patient/{patient['id']}"})
        assert ours
        _wait_for(
            lambda: all(service.front.delivered("ServiceRequest", r["id"]) for r in ours),
            "HAPI's notifications of our ServiceRequests",
        )
        _wait_for(lambda: _settled(service.jobs, patient["id"]), "no run claimed")
    assert service.runs.of(patient["id"]) == ["written"]


def test_a_burst_of_20_changes_gives_one_revision(hapi_url: str, service: Service) -> None:
    """20 changes in one commit: 20 notifications, the plan revised once, one run extra at most."""
    patient = _young_dm(hapi_url)
    with FhirClient(hapi_url) as client:
        first = _wait_for(
            lambda: _one_plan_with_tier(client, patient["id"], "moderate"), "a moderate plan"
        )
        _wait_for(lambda: _settled(service.jobs, patient["id"]), "no run claimed")
        before = len(service.runs.of(patient["id"]))
        burst = [f.antibody(patient, "tif1g", "positive", effective=_today())]
        burst += [f.condition(patient, {"text": f"note {n}"}) for n in range(19)]
        created = _transaction(hapi_url, burst)
        _wait_for(
            lambda: all(service.front.delivered(r["resourceType"], r["id"]) for r in created),
            "20 notifications",
        )
        _wait_for(lambda: _settled(service.jobs, patient["id"]), "no run claimed")
        high = _one_plan_with_tier(client, patient["id"], "high")
        # The one plan, revised in place (clinical-logic §13), once.
        assert high is not None and high["id"] == first["id"]
        runs = service.runs.of(patient["id"])[before:]
        print(f"burst of 20 notifications: runs {runs}")
        assert runs.count("written") == 1 and len(runs) <= 2
        plans = client.search("CarePlan", {"subject": f"Patient/{patient['id']}"})
        assert [p["status"] for p in plans] == ["active"]
        assert int(high["meta"]["versionId"]) == int(first["meta"]["versionId"]) + 1
    assert service.jobs.dead_letters() == []


def test_a_positive_anti_tif1_gamma_revises_the_plan_to_high(
    hapi_url: str, service: Service
) -> None:
    patient = _young_dm(hapi_url)
    with FhirClient(hapi_url) as client:
        first = _wait_for(
            lambda: _one_plan_with_tier(client, patient["id"], "moderate"), "a moderate plan"
        )
        started = time.monotonic()
        _post(hapi_url, f.antibody(patient, "tif1g", "positive", effective=_today()))
        high = _wait_for(lambda: _one_plan_with_tier(client, patient["id"], "high"), "high")
        print(f"anti-TIF1-gamma posted to high plan written: {time.monotonic() - started:.2f} s")
        # The same plan revised in place: its version history is the plan's history.
        assert high["id"] == first["id"]
        assert int(high["meta"]["versionId"]) > int(first["meta"]["versionId"])
        _wait_for(lambda: _quiet(service.jobs), "an empty queue")
    assert service.jobs.dead_letters() == []


def test_a_cancer_makes_screening_conditional_and_revokes_the_open_orders(
    hapi_url: str, service: Service
) -> None:
    patient = _young_dm(hapi_url)
    _post(hapi_url, f.antibody(patient, "tif1g", "positive", effective=_today()))
    subject = f"Patient/{patient['id']}"
    with FhirClient(hapi_url) as client:
        before = _wait_for(lambda: _one_plan_with_tier(client, patient["id"], "high"), "high")
        _wait_for(lambda: _quiet(service.jobs), "an empty queue")
        open_before = [
            r
            for r in client.search("ServiceRequest", {"based-on": f"CarePlan/{before['id']}"})
            if r["status"] == "active"
        ]
        assert any(r["code"]["coding"][0]["code"] == CT_LOINC for r in open_before)
        assert not any("asNeededCodeableConcept" in r for r in open_before if _is_ct(r))

        _post(hapi_url, f.condition(patient, LUNG_CANCER, onset=_today()))

        def revised() -> Json | None:
            plans = _active_plans(client, patient["id"])
            if len(plans) == 1 and "management with oncology" in plans[0]["text"]["div"]:
                return plans[0]
            return None

        after = _wait_for(revised, "the plan revised for the cancer")
        assert after["id"] == before["id"]  # revised in place (§13)
        assert "Malignant tumor of lung (disorder)" in after["text"]["div"]
        # A cancer found after the diagnosis ends the IMACS rounds (§6 rev 3): every
        # cancer-screening order open before is revoked with that reason; lung and antibody
        # orders are unaffected.
        kept_kinds = {"58477-1", "16335031000119100"}  # PFT, HRCT (not IMACS)
        for request in open_before:
            now = client.read("ServiceRequest", request["id"])
            assert now is not None
            if request["code"]["coding"][0]["code"] in kept_kinds:
                assert now["status"] == "active", request["id"]
            elif _is_ct(request) or now["status"] == "revoked":
                assert now["status"] == "revoked", request["id"]
                assert "ended: a cancer was found" in now["note"][-1]["text"]
        # No cancer-screening test is ordered any more: the CT is an activity, not an order.
        open_after = client.search("ServiceRequest", {"subject": subject, "status": "active"})
        assert not [r for r in open_after if _is_ct(r)]
        ct_activities = [
            a["detail"]
            for a in after["activity"]
            if "detail" in a and a["detail"]["code"]["coding"][0]["code"] == CT_LOINC
        ]
        assert ct_activities and all(d["status"] != "not-started" for d in ct_activities)
        assert all(r["basedOn"] == [{"reference": f"CarePlan/{after['id']}"}] for r in open_after)
    assert service.jobs.dead_letters() == []


def test_a_ct_report_posted_completes_the_ct_order_in_place(
    hapi_url: str, service: Service
) -> None:
    """A CT done elsewhere: the plan's CT item becomes done with the report, no duplicate."""
    patient = _young_dm(hapi_url)
    _post(hapi_url, f.antibody(patient, "tif1g", "positive", effective=_today()))
    subject = f"Patient/{patient['id']}"
    with FhirClient(hapi_url) as client:
        plan = _wait_for(lambda: _one_plan_with_tier(client, patient["id"], "high"), "high")
        _wait_for(lambda: _quiet(service.jobs), "an empty queue")
        ct_order = next(
            r
            for r in client.search("ServiceRequest", {"based-on": f"CarePlan/{plan['id']}"})
            if _is_ct(r) and r["status"] == "active"
        )
        report = _post(
            hapi_url,
            {
                "resourceType": "DiagnosticReport",
                "status": "final",
                "subject": {"reference": subject},
                "code": f.concept(f.LOINC, CT_LOINC),
                "effectiveDateTime": _today(),
            },
        )

        def completed() -> Json | None:
            order = client.read("ServiceRequest", ct_order["id"])
            return order if order is not None and order["status"] == "completed" else None

        order = _wait_for(completed, "the CT order completed by the report")
        evidence = {r["reference"] for r in order.get("supportingInfo", [])}
        assert f"DiagnosticReport/{report['id']}" in evidence
        _wait_for(lambda: _quiet(service.jobs), "an empty queue")
        plans = _active_plans(client, patient["id"])
        assert [p["id"] for p in plans] == [plan["id"]]  # updated in place, not re-created
        open_ct = [
            r
            for r in client.search("ServiceRequest", {"subject": subject, "status": "active"})
            if _is_ct(r)
        ]
        assert open_ct == []  # the done test is not proposed again
    assert service.jobs.dead_letters() == []


def _is_ct(request: Json) -> bool:
    return any(c.get("code") == CT_LOINC for c in request["code"]["coding"])


# -- several worker processes on Redis; the FHIR server away for a while ---------------------


class Relay:
    """A TCP relay to HAPI that can be cut (connections refused) and restored on the same port.

    Workers given the relay's URL see the FHIR server go down and come back, while HAPI (and
    its in-memory data) stays up for the test and the notifications.
    """

    def __init__(self, target_port: int) -> None:
        self._target = ("127.0.0.1", target_port)
        self._listener: socket.socket | None = None
        self._open: list[socket.socket] = []
        self._guard = threading.Lock()
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        """Refuse new connections and cut the open ones."""
        with self._guard:
            listener, self._listener = self._listener, None
            sockets, self._open = self._open, []
        for sock in [s for s in (listener,) if s is not None] + sockets:
            with contextlib.suppress(OSError):  # already closed by its peer
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(self._target)
            except OSError:
                client.close()
                continue
            with self._guard:
                self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass  # the other side or the relay closed
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):  # already shut
                    sock.shutdown(socket.SHUT_RDWR)


@dataclass(frozen=True)
class RedisSetup:
    jobs: Jobs
    front: Front
    relay: Relay
    start_workers: Callable[[int], None]
    logs: list[Path]


@pytest.fixture
def on_redis(hapi_url: str, service: Service, tmp_path: Path) -> Iterator[RedisSetup]:
    """The endpoint now enqueues on a real Redis; `fhir-dm worker` processes start on demand.

    The workers reach HAPI through a Relay; each has its own lock directory (as on its own
    host), so only the Redis marks and lock serialise them. Default job settings (no delay).
    """
    redis_server = RedisServer(tmp_path)
    redis_url = redis_server.start()
    relay = Relay(int(hapi_url.split(":")[2].split("/")[0]))
    relay.up()
    jobs_settings = JobsSettings(
        backend="redis",
        redis_url=redis_url,
        retry_base_seconds=1.0,
        lock_wait_seconds=60.0,
        notification_secret=SECRET,
    )
    settings = service.settings.model_copy(update={"jobs": jobs_settings})
    jobs = Jobs(open_huey(jobs_settings), jobs_settings, lambda: build_runtime(settings))
    service.front.app = create_app(settings)
    workers: list[tuple[subprocess.Popen[bytes], Any]] = []
    logs: list[Path] = []

    def start_workers(count: int) -> None:
        for n in range(count):
            home = tmp_path / f"worker-{len(workers)}"
            home.mkdir()
            env = {
                **os.environ,
                "FHIR_DM_FHIR__BASE_URL": f"http://127.0.0.1:{relay.port}/fhir",
                "FHIR_DM_TRUST__MODE": "off",
                "FHIR_DM_LOCK_DIR": str(home / "locks"),
                "FHIR_DM_LOG_LEVEL": "INFO",
                "FHIR_DM_JOBS__BACKEND": "redis",
                "FHIR_DM_JOBS__REDIS_URL": redis_url,
                "FHIR_DM_JOBS__RETRY_BASE_SECONDS": "1",
                "FHIR_DM_JOBS__LOCK_WAIT_SECONDS": "60",
            }
            log_path = home / "worker.log"
            log = log_path.open("wb")
            command = [sys.executable, "-c", "import sys; from fhir_dm.cli.main import main; "]
            command[-1] += "sys.exit(main(sys.argv[1:]))"
            command += ["worker", "--workers", "2", "--worker-type", "thread"]
            process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
            workers.append((process, log))
            logs.append(log_path)
            del n

    try:
        yield RedisSetup(jobs, service.front, relay, start_workers, logs)
    finally:
        service.front.app = create_app(service.settings)
        for process, log in workers:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()
        relay.down()
        jobs.close()
        redis_server.stop()


def _runs(logs: list[Path], status: str = "") -> list[int]:
    """Re-assessments each worker process finished (its log, one line each), of `status`."""
    return [
        p.read_text(encoding="utf-8", errors="replace").count(f"re-assessed: {status}")
        for p in logs
    ]


def test_two_worker_processes_and_a_burst_give_exactly_one_active_plan(
    hapi_url: str, on_redis: RedisSetup
) -> None:
    jobs = on_redis.jobs
    # A notification while no worker runs: queued in Redis, run when the workers start.
    waiting = _young_dm(hapi_url)
    _wait_for(lambda: jobs.huey.pending_count() > 0, "the notification queued")
    time.sleep(2)
    with FhirClient(hapi_url) as client:
        assert _active_plans(client, waiting["id"]) == []
        started = time.monotonic()
        on_redis.start_workers(2)
        _wait_for(lambda: _active_plans(client, waiting["id"]), "the queued plan")
        print(f"worker down: queued work written {time.monotonic() - started:.2f} s after start")
        # The plan is on the server before the worker logs its run: count the burst's runs
        # only once that run is logged and settled.
        _wait_for(lambda: sum(_runs(on_redis.logs, "w")) >= 1, "the queued run logged")
        _wait_for(lambda: _settled(jobs, waiting["id"]), "no run of the queued patient claimed")

        # A burst for one new patient, 20 changes in one commit: 20 notifications reach the
        # endpoint, both worker processes wait for work; one plan written, one run extra at most.
        patient = _post(hapi_url, f.patient(birth_date="1994-01-01", gender="female"))
        onset = (datetime.now(UTC).date() - timedelta(days=30)).isoformat()
        burst = [f.iim_condition(patient, onset=onset), f.antibody(patient, "tif1g")]
        burst += [f.condition(patient, {"text": f"note {n}"}) for n in range(18)]
        runs_before, written_before = sum(_runs(on_redis.logs)), sum(_runs(on_redis.logs, "w"))
        created = _transaction(hapi_url, burst)
        _wait_for(lambda: _one_plan_with_tier(client, patient["id"], "high"), "a high plan")
        _wait_for(
            lambda: all(on_redis.front.delivered(r["resourceType"], r["id"]) for r in created),
            "20 notifications",
        )
        _wait_for(lambda: _settled(jobs, patient["id"]), "no run claimed")
        assert len(_active_plans(client, patient["id"])) == 1
        assert len(_active_plans(client, waiting["id"])) == 1
    runs = _runs(on_redis.logs)
    burst_runs = sum(runs) - runs_before
    print(f"re-assessments per worker process: {runs} ({burst_runs} for the burst of 20)")
    assert sum(_runs(on_redis.logs, "w")) - written_before == 1 and burst_runs <= 2
    assert jobs.dead_letters() == []


def test_the_fhir_server_away_for_a_while_is_retried_and_converges(
    hapi_url: str, on_redis: RedisSetup
) -> None:
    jobs = on_redis.jobs
    on_redis.start_workers(1)
    on_redis.relay.down()
    patient = _young_dm(hapi_url)
    _post(hapi_url, f.antibody(patient, "tif1g", effective=_today()))
    away = time.monotonic()
    # The worker fails and retries (after 1 s, 2 s, 4 s ...) while the server is away.
    _wait_for(
        lambda: "retry in" in on_redis.logs[0].read_text(encoding="utf-8", errors="replace"),
        "a failed attempt",
    )
    time.sleep(max(0.0, 6 - (time.monotonic() - away)))
    with FhirClient(hapi_url) as client:
        assert _active_plans(client, patient["id"]) == []
        on_redis.relay.up()
        back = time.monotonic()
        _wait_for(lambda: _one_plan_with_tier(client, patient["id"], "high"), "the plan")
        print(
            f"FHIR server away {back - away:.1f} s; plan written {time.monotonic() - back:.1f} s "
            "after it came back"
        )
        _wait_for(lambda: _quiet(jobs), "an empty queue")
        assert len(_active_plans(client, patient["id"])) == 1
    assert jobs.dead_letters() == []
