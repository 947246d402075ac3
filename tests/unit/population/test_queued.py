"""The population run through the job queue: immediate mode, and real Redis with two workers."""

from __future__ import annotations

import io
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest
import responses
from huey import Huey
from huey.constants import EmptyData

from fhir_dm import __version__
from fhir_dm.core.identifiers import Identity
from fhir_dm.events.queue import Jobs, Runtime, open_huey
from fhir_dm.events.settings import JobsSettings
from fhir_dm.fhir.client import client_from_config
from fhir_dm.fhir.config import FhirServerConfig
from fhir_dm.fhir.terminology import engine_for
from fhir_dm.knowledge.load import load_knowledge
from fhir_dm.population.config import load_population_config
from fhir_dm.population.finder import find_iim_patients, iim_search_tokens
from fhir_dm.population.queued import QueuedRun, record_key, register_population_task, run_queued
from fhir_dm.population.run import Done, StateFile
from fhir_dm.writeback.locks import PatientLocks
from fhir_dm.writeback.writer import WriteBack
from tests import factories as f
from tests.redis_server import RedisServer
from tests.unit.web.conftest import BASE, FakeFhirServer

NOW = date(2026, 12, 2)


@pytest.fixture
def fake() -> Iterator[FakeFhirServer]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        server = FakeFhirServer(mock)
        for pid in ("q1", "q2", "q3"):
            p = f.patient(pid, managingOrganization={"reference": "Organization/o1"})
            server.put(p, f.iim_condition(p, id=f"{pid}-dm"))
        server.put(f.patient("healthy-1"))
        yield server


def _runtime(tmp_path: Path) -> Runtime:
    knowledge = load_knowledge()
    engine = engine_for(knowledge, None, software_version=__version__)
    fhir = client_from_config(FhirServerConfig(base_url=BASE, max_retries=0, page_size=3))
    series = Identity(knowledge.ruleset.canonical_base, "", "").series_system
    writeback = WriteBack(fhir, engine, PatientLocks(tmp_path / "locks"))
    return Runtime(writeback, fhir, series, knowledge)


def _jobs(huey: Huey, settings: JobsSettings, runtime: Runtime) -> Jobs:
    """The queue as the service opens it: the population run's task registered."""
    jobs = Jobs(huey, settings, lambda: runtime)
    register_population_task(jobs)
    return jobs


def _found(runtime: Runtime) -> list[str]:
    assert runtime.knowledge is not None
    population = load_population_config(runtime.knowledge)
    return find_iim_patients(runtime.fhir, iim_search_tokens(runtime.knowledge, population.finder))


def test_a_queued_run_assesses_each_found_patient_once_and_resumes(
    fake: FakeFhirServer, tmp_path: Path
) -> None:
    runtime = _runtime(tmp_path)
    settings = JobsSettings(sqlite_file=tmp_path / "q.sqlite3")
    jobs = _jobs(open_huey(settings, immediate=True), settings, runtime)
    found = _found(runtime)
    assert found == ["q1", "q2", "q3"]  # the healthy patient is not found
    # A Condition whose subject is gone: that patient fails, the run goes on.
    fake.put(f.iim_condition({"resourceType": "Patient", "id": "ghost"}, id="ghost-dm"))
    state = StateFile(tmp_path / "state", "r1")
    result = run_queued(
        QueuedRun(jobs, "r1"),
        [*found, "ghost"],
        now=NOW,
        preview=False,
        state=state,
        progress_stream=io.StringIO(),
    )
    assert sorted(d.patient_id for d in result.done) == ["q1", "q2", "q3"]
    assert {d.status for d in result.done} == {"written"}
    assert [x.patient_id for x in result.failures] == ["ghost"]
    assert sum(c["written"] for c in result.by_tier().values()) == 3
    assert sorted(state.load()) == ["q1", "q2", "q3"]
    plans = [p for p in fake.all("CarePlan") if p.get("status") == "active"]
    assert len(plans) == 3
    # The run's records are forgotten once summarised; the state file keeps what finished.
    assert jobs.huey.storage.peek_data(record_key("r1", "q1")) is EmptyData

    # Resumed: only the failed patient is asked again; a fresh run writes nothing new.
    fake.put(f.patient("ghost"))
    again = run_queued(
        QueuedRun(jobs, "r1"), [*found, "ghost"], now=NOW, preview=False, state=state,
        progress_stream=io.StringIO(),
    )  # fmt: skip
    assert again.skipped == 3
    assert [d.patient_id for d in again.done[3:]] == ["ghost"]
    rerun = run_queued(
        QueuedRun(jobs, "r2"), found, now=NOW, preview=False, progress_stream=io.StringIO()
    )
    assert {d.status for d in rerun.done} == {"unchanged"}


def test_a_patient_queued_or_done_is_not_enqueued_again(
    fake: FakeFhirServer, tmp_path: Path
) -> None:
    runtime = _runtime(tmp_path)
    settings = JobsSettings(sqlite_file=tmp_path / "q.sqlite3")
    jobs = _jobs(open_huey(settings, immediate=True), settings, runtime)
    run = QueuedRun(jobs, "r3")
    assert run.submit(["q1", "q2"], now=NOW, preview=True) == 2
    assert run.submit(["q1", "q2", "q3"], now=NOW, preview=True) == 1
    item = run.outcome("q1")
    assert isinstance(item, Done) and item.status in {"preview", "written"}
    assert fake.all("CarePlan") == []  # a preview writes nothing
    with pytest.raises(Exception, match="run id"):
        QueuedRun(jobs, "../x")


@pytest.mark.integration  # a real redis-server
def test_two_workers_on_redis_share_one_run(fake: FakeFhirServer, tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    url = server.start()
    try:
        settings = JobsSettings(
            backend="redis", redis_url=url, queue_name=f"t-{uuid.uuid4().hex[:12]}"
        )
        runtime = _runtime(tmp_path)
        seen: dict[str, set[int]] = {}
        guard = threading.Lock()
        assess = runtime.writeback.assess_patient

        def counting(patient_id: str, **kw: object) -> object:
            with guard:
                seen.setdefault(patient_id, set()).add(threading.get_ident())
            # A patient takes a moment, as on a real server, so the second consumer (polling
            # with backoff) gets work too, whatever the scheduling.
            time.sleep(0.25)
            return assess(patient_id, **kw)  # type: ignore[arg-type]

        object.__setattr__(runtime.writeback, "assess_patient", counting)
        caller = _jobs(open_huey(settings), settings, runtime)
        # Two "hosts", each a consumer with one worker thread, on the same Redis queue.
        hosts = [_jobs(open_huey(settings), settings, runtime) for _ in range(2)]
        consumers = [h.consumer(workers=1, worker_type="thread") for h in hosts]
        for consumer in consumers:
            consumer.start()
        try:
            patients = [f"s{n}" for n in range(8)]
            for pid in patients:
                p = f.patient(pid)
                fake.put(p, f.iim_condition(p, id=f"{pid}-dm"))
            result = run_queued(
                QueuedRun(caller, "redis-run"),
                patients,
                now=NOW,
                preview=False,
                progress_stream=io.StringIO(),
                poll_seconds=0.05,
            )
        finally:
            for consumer in consumers:
                consumer.stop(graceful=True)
            for jobs in (caller, *hosts):
                jobs.close()
        assert sorted(d.patient_id for d in result.done) == patients
        assert result.failures == []
        assert all(len(threads) == 1 for threads in seen.values())
        assert sorted(seen) == patients  # each patient assessed exactly once
        assert len(set().union(*seen.values())) == 2  # both workers took part
    finally:
        server.stop()


def test_the_cli_runs_through_the_queue_and_prints_the_summary(
    fake: FakeFhirServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from fhir_dm.cli import main as cli
    from fhir_dm.web import jobs

    monkeypatch.setenv("FHIR_DM_FHIR__BASE_URL", BASE)
    monkeypatch.setenv("FHIR_DM_FHIR__MAX_RETRIES", "0")
    monkeypatch.setenv("FHIR_DM_TRUST__MODE", "off")
    monkeypatch.setenv("FHIR_DM_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.setenv("FHIR_DM_JOBS__SQLITE_FILE", str(tmp_path / "q.sqlite3"))
    # Immediate mode: the enqueued tasks run at once, as a worker would run them.
    monkeypatch.setattr(jobs, "open_huey_checked", lambda s: open_huey(s, immediate=True))
    state = tmp_path / "state"
    argv = ["population", "run", "--queue", "--preview", "--state-dir", str(state)]
    assert cli.main([*argv, "--run-id", "cli-1", "--now", NOW.isoformat()]) == 0
    out = capsys.readouterr().out
    assert "Run cli-1: 3 patient(s)" in out
    assert fake.all("CarePlan") == []  # a preview
    assert len(StateFile(state, "cli-1").load()) == 3
    assert cli.main([*argv, "--server", "https://other.example.org/fhir"]) != 0
