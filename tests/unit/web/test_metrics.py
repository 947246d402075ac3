"""The operators' /metrics: registry contents after requests, protection, no patient data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from prometheus_client import REGISTRY

from fhir_dm.common.errors import UpstreamRejectedError
from fhir_dm.events.queue import Jobs
from fhir_dm.events.settings import JobsSettings
from fhir_dm.web.app import create_app
from fhir_dm.web.trust import TrustConfig
from tests import factories as f
from tests.unit.web.conftest import STATIC_TOKEN, FakeFhirServer, make_settings

AUTH = {"Authorization": f"Bearer {STATIC_TOKEN}"}
SECRET_PATIENT = "pt-secret-4711"


def _client(tmp_path: Path, **overrides: Any) -> FlaskClient:
    trust = TrustConfig(mode="static", static_tokens=(STATIC_TOKEN,))
    return create_app(make_settings(tmp_path, trust=trust, **overrides)).test_client()


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_metrics_needs_the_operators_token(tmp_path: Path) -> None:
    client = _client(tmp_path)
    refused = client.get("/metrics")
    assert refused.status_code == 401
    assert refused.get_json()["resourceType"] == "OperationOutcome"
    answer = client.get("/metrics", headers=AUTH)
    assert answer.status_code == 200
    assert answer.content_type.startswith("text/plain")


def test_requests_are_counted_by_route_template_and_status(
    tmp_path: Path, fhir_server: FakeFhirServer
) -> None:
    p = f.patient(SECRET_PATIENT)
    fhir_server.put(p, f.iim_condition(p, id="c-secret"))
    client = _client(tmp_path)
    route = "/Patient/<id>/$dm-cancer-screening"
    labels = {"method": "POST", "route": route}
    before_ok = _sample("fhir_dm_http_requests_total", **labels, status="200")
    before_bad = _sample("fhir_dm_http_requests_total", **labels, status="400")
    before_hist = _sample("fhir_dm_http_request_duration_seconds_count", **labels)
    before_written = _sample("fhir_dm_assessments_total", outcome="written")
    before_unchanged = _sample("fhir_dm_assessments_total", outcome="unchanged")
    url = f"/Patient/{SECRET_PATIENT}/$dm-cancer-screening?now=2026-06-01"
    assert client.post(url, headers=AUTH).status_code == 200
    assert client.post(url, headers=AUTH).status_code == 200
    bad = client.post("/Patient/%2E%2E/$dm-cancer-screening", headers=AUTH)
    assert bad.status_code == 400
    assert _sample("fhir_dm_http_requests_total", **labels, status="200") == before_ok + 2
    assert _sample("fhir_dm_http_requests_total", **labels, status="400") == before_bad + 1
    assert _sample("fhir_dm_http_request_duration_seconds_count", **labels) == before_hist + 3
    assert _sample("fhir_dm_assessments_total", outcome="written") == before_written + 1
    assert _sample("fhir_dm_assessments_total", outcome="unchanged") == before_unchanged + 1
    text = client.get("/metrics", headers=AUTH).get_data(as_text=True)
    assert 'route="/Patient/<id>/$dm-cancer-screening"' in text
    assert SECRET_PATIENT not in text and "2026-06-01" not in text
    unrouted = client.get(f"/nowhere/{SECRET_PATIENT}")
    assert unrouted.status_code == 404
    assert SECRET_PATIENT not in client.get("/metrics", headers=AUTH).get_data(as_text=True)


def test_refused_writes_and_fhir_errors_are_counted(
    tmp_path: Path, fhir_server: FakeFhirServer
) -> None:
    p = f.patient("pt-refused")
    fhir_server.put(p, f.iim_condition(p, id="c-refused"))
    fhir_server.reject_transaction = (
        422,
        {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "invalid"}]},
    )
    before_refused = _sample("fhir_dm_assessments_total", outcome="refused")
    before_errors = _sample("fhir_dm_fhir_errors_total", error=UpstreamRejectedError.__name__)
    answer = _client(tmp_path).post("/Patient/pt-refused/$dm-cancer-screening", headers=AUTH)
    assert answer.status_code == 502
    assert _sample("fhir_dm_assessments_total", outcome="refused") == before_refused + 1
    assert (
        _sample("fhir_dm_fhir_errors_total", error=UpstreamRejectedError.__name__)
        == before_errors + 1
    )


def test_queue_depth_and_dead_letters_are_read_at_scrape_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = JobsSettings(sqlite_file=tmp_path / "q.sqlite3", notification_secret="x" * 40)
    client = _client(tmp_path, jobs=jobs)
    queue = client.application.extensions["fhir_dm_jobs"]
    assert isinstance(queue, Jobs)
    queue.request("p1")
    queue.request("p2")
    queue.huey.storage.put_data("fhir-dm:dead:t1", b'{"task_id": "t1", "patient": "Patient/p9"}')
    text = client.get("/metrics", headers=AUTH).get_data(as_text=True)
    assert "fhir_dm_queue_up 1.0" in text
    assert "fhir_dm_queue_depth 2.0" in text
    assert "fhir_dm_dead_letters 1.0" in text
    assert "p9" not in text


def test_a_down_queue_is_reported_not_a_failed_scrape(tmp_path: Path) -> None:
    jobs = JobsSettings(backend="redis", redis_url="redis://127.0.0.1:1/0")
    answer = _client(tmp_path, jobs=jobs).get("/metrics", headers=AUTH)
    assert answer.status_code == 200
    assert "fhir_dm_queue_up 0.0" in answer.get_data(as_text=True)
