"""The queue's commands: dead letters for an operator, a clear error without jobs settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fhir_dm import cli
from fhir_dm.errors import PatientNotFoundError
from fhir_dm.jobs.queue import open_huey
from fhir_dm.jobs.settings import JobsSettings
from tests.unit.jobs.test_queue import StubWriteBack, make_jobs


@pytest.fixture
def service_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in ("FHIR_DM_SETTINGS_FILE", cli.CONFIG_DIR_VARIABLE):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FHIR_DM_FHIR__BASE_URL", "https://fhir.example.org/r4")
    monkeypatch.setenv("FHIR_DM_TRUST__MODE", "off")
    return tmp_path / "queue.sqlite3"


def test_dead_letters_lists_what_kept_failing(
    service_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = JobsSettings(sqlite_file=service_env, debounce_seconds=0, retries=0)
    jobs = make_jobs(
        open_huey(settings), settings, StubWriteBack(failures=1, error=PatientNotFoundError("x"))
    )
    jobs.request("gone-2")
    jobs.huey.execute(jobs.huey.dequeue())
    monkeypatch.setenv("FHIR_DM_JOBS__SQLITE_FILE", str(service_env))
    assert cli.main(["dead-letters"]) == cli.EXIT_OK
    (line,) = capsys.readouterr().out.splitlines()
    record = json.loads(line)
    assert record["patient"] == "Patient/gone-2" and record["error"] == "PatientNotFoundError"


def test_queue_commands_need_jobs_settings(
    service_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["worker"]) == cli.EXIT_CONFIG
    assert "jobs is not configured" in capsys.readouterr().err
    assert cli.main(["dead-letters"]) == cli.EXIT_CONFIG


def test_subscriptions_need_a_secret(
    service_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FHIR_DM_JOBS__SQLITE_FILE", str(service_env))
    assert cli.main(["subscriptions"]) == cli.EXIT_CONFIG
    assert "notification_secret" in capsys.readouterr().err
