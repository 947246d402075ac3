"""Attack-run regressions: queue outages, date bounds, dot-segment ids, run and notification
limits, readiness of every backend, deadlines, and the app's CSP."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import responses
from flask.testing import FlaskClient

from fhir_dm.common.errors import DeadlineExceededError, InputError
from fhir_dm.events.queue import patient_id_of
from fhir_dm.events.settings import JobsSettings
from fhir_dm.events.subscriptions import SECRET_HEADER, subscription_secret
from fhir_dm.fhir.client import client_from_config
from fhir_dm.fhir.config import FhirServerConfig
from fhir_dm.web.app import create_app
from fhir_dm.web.trust import TrustConfig
from tests import factories as f
from tests.unit.web.conftest import BASE, STATIC_TOKEN, FakeFhirServer, make_settings

AUTH = {"Authorization": f"Bearer {STATIC_TOKEN}"}
RUN = "/$dm-population-run"
MEASURE = "/Measure/dm-workup-at-diagnosis/$evaluate-measure"
MASTER = "notification-master-secret-0123456789abcdef"
FHIR = "application/fhir+json"

Json = dict[str, Any]


def _client(tmp_path: Path, **overrides: Any) -> FlaskClient:
    trust = TrustConfig(mode="static", static_tokens=(STATIC_TOKEN,))
    return create_app(make_settings(tmp_path, trust=trust, **overrides)).test_client()


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _down_redis() -> JobsSettings:
    return JobsSettings(
        backend="redis",
        redis_url=f"redis://127.0.0.1:{_closed_port()}/0",
        notification_secret=MASTER,
    )


def _load(server: FakeFhirServer, n: int = 2) -> None:
    for k in range(n):
        p = f.patient(f"m{k}")
        server.put(p, f.iim_condition(p, id=f"m{k}-dm"))


def _outcome(answer: Any) -> str:
    body = answer.get_json()
    assert body["resourceType"] == "OperationOutcome", body
    return " ".join(str(i.get("diagnostics", "")) for i in body["issue"])


# -- 1. the queue backend down: 503 + Retry-After everywhere ----------------------------------


def test_a_population_run_with_the_queue_down_is_503_with_retry_after(
    tmp_path: Path, fhir_server: FakeFhirServer
) -> None:
    _load(fhir_server)
    client = _client(tmp_path, jobs=_down_redis())
    answer = client.post(RUN, headers=AUTH)
    assert answer.status_code == 503, answer.get_json()
    assert int(answer.headers["Retry-After"]) > 0
    assert "queue" in _outcome(answer)
    status = client.get(RUN + "/run-1", headers=AUTH)
    assert status.status_code == 503
    assert "Retry-After" in status.headers


# -- 2. date parameters bounded ---------------------------------------------------------------

FAR_DATES = ("9999-12-31", "0001-01-01", "1899-12-31", "2201-01-01")


@pytest.mark.parametrize("day", FAR_DATES)
def test_far_dates_are_400_naming_the_bounds(
    tmp_path: Path, fhir_server: FakeFhirServer, day: str
) -> None:
    _load(fhir_server)
    client = _client(tmp_path)
    calls = [
        client.post(f"/Patient/m0/$dm-cancer-screening?preview=true&now={day}", headers=AUTH),
        client.post(f"{RUN}?now={day}", headers=AUTH),
        client.get(f"{MEASURE}?periodStart={day}&periodEnd=2026-12-31", headers=AUTH),
        client.get(f"{MEASURE}?periodStart=2026-01-01&periodEnd={day}", headers=AUTH),
        client.post(f"/app/api/clinic?now={day}", headers=AUTH),
        client.post(f"/app/api/clinic?now=2026-06-01&start={day}", headers=AUTH),
        client.post(f"/app/api/Patient/m0/view?now={day}", headers=AUTH),
        client.post(
            "/$dm-cancer-screening",
            json={
                "resourceType": "Parameters",
                "parameter": [
                    {"name": "bundle", "resource": f.bundle(f.patient("x"))},
                    {"name": "now", "valueDate": day},
                ],
            },
            headers=AUTH,
        ),
    ]
    for n, answer in enumerate(calls):
        assert answer.status_code == 400, (n, answer.get_json())
        assert "1900-01-01" in _outcome(answer) and "2200-12-31" in _outcome(answer), n


def test_the_bounds_themselves_are_accepted(tmp_path: Path, fhir_server: FakeFhirServer) -> None:
    _load(fhir_server)
    client = _client(tmp_path)
    for day in ("1900-01-01", "2200-12-31"):
        answer = client.post(
            f"/Patient/m0/$dm-cancer-screening?preview=true&now={day}", headers=AUTH
        )
        assert answer.status_code == 200, (day, answer.get_json())
        report = client.get(f"{MEASURE}?periodStart=1900-01-01&periodEnd={day}", headers=AUTH)
        assert report.status_code == 200, (day, report.get_json())
        clinic = client.post(f"/app/api/clinic?now={day}&start=1900-01-01", headers=AUTH)
        assert clinic.status_code == 200, (day, clinic.get_json())


# -- 3. ids: the FHIR grammar, and never '.' or '..' -------------------------------------------


@pytest.mark.parametrize("bad", ["%2E", "%2E%2E"])
def test_dot_segment_patient_ids_in_paths_are_400(
    tmp_path: Path, fhir_server: FakeFhirServer, rsps: responses.RequestsMock, bad: str
) -> None:
    client = _client(tmp_path)
    for answer in (
        client.post(f"/Patient/{bad}/$dm-cancer-screening?preview=true", headers=AUTH),
        client.post(f"/app/api/Patient/{bad}/view", headers=AUTH),
    ):
        assert answer.status_code == 400, answer.get_json()
        assert "'..'" in _outcome(answer)
    assert len(rsps.calls) == 0  # nothing reached the FHIR server


def test_a_posted_bundle_patient_with_a_dot_segment_id_is_refused(
    tmp_path: Path, fhir_server: FakeFhirServer, rsps: responses.RequestsMock
) -> None:
    bundle = f.bundle(f.patient(".."))
    answer = _client(tmp_path).post(
        "/$dm-cancer-screening?preview=false", json=bundle, headers=AUTH
    )
    assert answer.status_code == 400, answer.get_json()
    assert all("/Patient/.." not in str(c.request.url) for c in rsps.calls)


def test_the_fhir_client_refuses_dot_segment_ids() -> None:
    client = client_from_config(FhirServerConfig(base_url=BASE, max_retries=0))
    for bad in (".", ".."):
        with pytest.raises(InputError):
            client.read("Patient", bad)


def test_a_dot_segment_reference_names_no_patient() -> None:
    assert patient_id_of({"reference": "Patient/.."}, BASE) is None
    assert patient_id_of({"reference": f"{BASE}/Patient/."}, BASE) is None
    assert patient_id_of({"reference": "Patient/..a"}, BASE) == "..a"


def _notify_client(tmp_path: Path, **jobs: Any) -> FlaskClient:
    settings = JobsSettings(
        sqlite_file=tmp_path / "queue.sqlite3", notification_secret=MASTER, **jobs
    )
    return create_app(make_settings(tmp_path, jobs=settings)).test_client()


def _notify_headers() -> dict[str, str]:
    return {SECRET_HEADER: subscription_secret(MASTER, "condition"), "Content-Type": FHIR}


def _condition(patient: str) -> Json:
    return {
        "resourceType": "Condition",
        "id": "c1",
        "subject": {"reference": f"Patient/{patient}"},
        "code": {"text": "x"},
    }


@pytest.mark.parametrize("bad", [".", ".."])
def test_a_dot_segment_patient_notification_is_refused_not_queued(tmp_path: Path, bad: str) -> None:
    client = _notify_client(tmp_path)
    answer = client.post(
        "/notifications/condition", json=_condition(bad), headers=_notify_headers()
    )
    assert answer.status_code == 400, answer.get_json()
    patient = {"resourceType": "Patient", "id": bad}
    other = client.post("/notifications/condition", json=patient, headers=_notify_headers())
    assert other.status_code == 400, other.get_json()
    jobs = client.application.extensions["fhir_dm_jobs"]
    assert list(jobs.huey.pending()) == []


# -- 4. limits: one population run at a time; patients per notification -----------------------


def test_a_second_population_run_while_one_is_queued_is_409_naming_it(
    tmp_path: Path, fhir_server: FakeFhirServer
) -> None:
    _load(fhir_server)
    client = _client(tmp_path, jobs=JobsSettings(sqlite_file=tmp_path / "q.sqlite3"))
    first = client.post(RUN, headers=AUTH)
    assert first.status_code == 202
    run_id = first.headers["Location"].rsplit("/", 1)[-1]
    for _ in range(3):
        again = client.post(RUN, headers=AUTH)
        assert again.status_code == 409, again.get_json()
        assert run_id in _outcome(again)
        assert again.headers["Content-Location"] == first.headers["Location"]


def test_a_finished_run_lets_the_next_one_start(
    tmp_path: Path, fhir_server: FakeFhirServer
) -> None:
    client = _client(tmp_path, jobs=JobsSettings(sqlite_file=tmp_path / "q.sqlite3"))
    # No IIM patient: each run has nothing queued, so it has finished when the next comes.
    first = client.post(RUN, headers=AUTH)
    second = client.post(RUN, headers=AUTH)
    assert (first.status_code, second.status_code) == (202, 202)
    assert first.headers["Location"] != second.headers["Location"]


def test_a_notification_naming_too_many_patients_is_refused_whole(tmp_path: Path) -> None:
    client = _notify_client(tmp_path, max_patients_per_notification=5)
    bundle = {
        "resourceType": "Bundle",
        "type": "history",
        "entry": [{"resource": {**_condition(f"p{k}"), "id": f"c{k}"}} for k in range(6)],
    }
    answer = client.post("/notifications/condition", json=bundle, headers=_notify_headers())
    assert answer.status_code == 413, answer.get_json()
    assert "max_patients_per_notification" in _outcome(answer)
    jobs = client.application.extensions["fhir_dm_jobs"]
    assert list(jobs.huey.pending()) == []
    bundle["entry"] = bundle["entry"][:5]
    assert (
        client.post("/notifications/condition", json=bundle, headers=_notify_headers()).status_code
        == 202
    )


# -- 6. /readyz checks every configured backend ------------------------------------------------


def test_readyz_reports_a_down_queue(tmp_path: Path, fhir_server: FakeFhirServer) -> None:
    client = _client(tmp_path, jobs=_down_redis())
    answer = client.get("/readyz")
    assert answer.status_code == 503
    assert "queue" in _outcome(answer)


def test_readyz_checks_the_sqlite_job_store(tmp_path: Path, fhir_server: FakeFhirServer) -> None:
    ok = _client(tmp_path, jobs=JobsSettings(sqlite_file=tmp_path / "q.sqlite3"))
    assert ok.get("/readyz").status_code == 200
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("x")
    down = _client(tmp_path, jobs=JobsSettings(sqlite_file=blocked / "q.sqlite3"))
    answer = down.get("/readyz")
    assert answer.status_code == 503
    assert "queue" in _outcome(answer)


# -- 7. a deadline is 504 -----------------------------------------------------------------------


def test_evaluate_measure_at_its_deadline_is_504(
    tmp_path: Path, fhir_server: FakeFhirServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    _load(fhir_server)
    client = _client(tmp_path)
    writeback = client.application.extensions["fhir_dm"].writeback

    def out_of_time(*args: Any, **kwargs: Any) -> Any:
        raise DeadlineExceededError("GET Condition: the request's time limit of 25 s ran out")

    monkeypatch.setattr(writeback, "assess_patient", out_of_time)
    answer = client.get(f"{MEASURE}?periodStart=2026-01-01&periodEnd=2026-12-31", headers=AUTH)
    assert answer.status_code == 504, answer.get_json()
    assert answer.get_json()["issue"][0]["code"] == "timeout"


# -- 8. the app's CSP ---------------------------------------------------------------------------


def test_the_app_csp_names_its_frame_ancestors_and_fhir_servers(tmp_path: Path) -> None:
    with _client(tmp_path).get("/app/launch") as page:
        default = page.headers["Content-Security-Policy"]
    assert "frame-ancestors 'self';" in default + ";"
    assert "connect-src 'self' https://fhir.example.org;" in default + ";"
    assert "https: http:" not in default and "*" not in default
    client = _client(
        tmp_path,
        app_frame_ancestors=("https://ehr.example.org",),
        app_connect_origins=("https://auth.example.org",),
    )
    with client.get("/app/") as page:
        csp = page.headers["Content-Security-Policy"]
    assert "frame-ancestors 'self' https://ehr.example.org" in csp
    assert "connect-src 'self' https://fhir.example.org https://auth.example.org" in csp


@pytest.mark.integration  # starts a real redis-server
def test_readyz_checks_the_cds_state_on_redis(tmp_path: Path, fhir_server: FakeFhirServer) -> None:
    from fhir_dm.cds.state import StateSettings
    from fhir_dm.web.cds_hooks import CdsSettings
    from tests.redis_server import RedisServer

    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis")
    url = server.start()
    try:
        state = StateSettings(backend="redis", redis_url=url)
        cds = CdsSettings(enabled=False, trust=TrustConfig(mode="off"), state=state)
        client = _client(tmp_path, cds=cds)
        assert client.get("/readyz").status_code == 200
    finally:
        server.stop()
    answer = client.get("/readyz")
    assert answer.status_code == 503
    assert "CDS Hooks state" in _outcome(answer)
