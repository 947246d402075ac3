"""The queue's commands: dead letters, a clear error without jobs settings, the active check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import responses

from fhir_dm.cli import main as cli
from fhir_dm.common.errors import PatientNotFoundError
from fhir_dm.events.queue import open_huey
from fhir_dm.events.settings import JobsSettings
from fhir_dm.events.subscriptions import ACTIVATION_WAIT_SECONDS, WATCHED_TYPES
from tests.unit.events.test_queue import StubWriteBack, make_jobs
from tests.unit.test_subscriptions import ENDPOINT, MASTER, SubscriptionServer


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


def test_subscriptions_the_server_does_not_activate_fail_plainly(
    service_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A server with Subscriptions disabled stores them and leaves them `requested`."""
    monkeypatch.setenv("FHIR_DM_JOBS__SQLITE_FILE", str(service_env))
    monkeypatch.setenv("FHIR_DM_JOBS__NOTIFICATION_SECRET", MASTER)
    monkeypatch.setenv("FHIR_DM_PUBLIC_BASE_URL", ENDPOINT)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        server = SubscriptionServer(mock)
        assert cli.main(["subscriptions", "--wait", "0"]) == cli.EXIT_CONFIG
        out, err = capsys.readouterr()
        assert out.splitlines() == [
            f"subscriptions: {len(WATCHED_TYPES)} created, 0 updated,"
            " 0 unchanged, 0 duplicate(s) deleted"
        ]
        assert f"{len(WATCHED_TYPES)} Subscription(s) not active" in err
        assert "Condition (status requested)" in err
        assert "Subscriptions disabled" in err
        # Activated (as a server with Subscriptions on does): all well, exit 0.
        for subscription in server.store.values():
            subscription["status"] = "active"
        assert cli.main(["subscriptions", "--wait", "0"]) == cli.EXIT_OK
        out, err = capsys.readouterr()
        assert "unchanged" in out and f"all {len(WATCHED_TYPES)} active" in out and err == ""


def test_the_wait_default_is_the_modules() -> None:
    assert cli.SUBSCRIPTION_WAIT_SECONDS == ACTIVATION_WAIT_SECONDS
