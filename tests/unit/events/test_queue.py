"""The re-assessment queue: coalescing, retries with backoff, dead letters, restart, the sweep."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

import pytest
from huey import Huey, SqliteHuey

from fhir_dm.common.errors import KnowledgeError, PatientNotFoundError, UpstreamUnavailableError
from fhir_dm.events.queue import (
    AGAIN_PREFIX,
    DEAD_PREFIX,
    PENDING_PREFIX,
    Jobs,
    Runtime,
    open_huey,
    patient_id_of,
)
from fhir_dm.events.settings import JobsSettings

BASE = "https://fhir.example.org/r4"


@dataclass
class StubWriteBack:
    """Records each assess_patient call; fails the first `failures` calls with `error`."""

    failures: int = 0
    error: Exception = field(default_factory=lambda: UpstreamUnavailableError("down"))
    calls: list[str] = field(default_factory=list)
    delay: float = 0.0
    running: dict[str, int] = field(default_factory=dict)
    overlaps: int = 0
    guard: threading.Lock = field(default_factory=threading.Lock)

    def assess_patient(self, patient_id: str, *, now: date | datetime, preview: bool) -> Any:
        assert preview is False
        with self.guard:
            self.calls.append(patient_id)
            self.running[patient_id] = self.running.get(patient_id, 0) + 1
            if self.running[patient_id] > 1:
                self.overlaps += 1
            fail = len(self.calls) <= self.failures
        try:
            if self.delay:
                time.sleep(self.delay)
            if fail:
                raise self.error
            return type("Write", (), {"status": "written"})()
        finally:
            with self.guard:
                self.running[patient_id] -= 1


@dataclass
class StubFhir:
    plans: list[dict[str, Any]] = field(default_factory=list)
    base_url: str = BASE
    searches: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    def search(self, resource_type: str, params: dict[str, str]) -> list[dict[str, Any]]:
        self.searches.append((resource_type, params))
        return self.plans


def make_jobs(
    huey: Huey, settings: JobsSettings, writeback: StubWriteBack, fhir: StubFhir | None = None
) -> Jobs:
    runtime = Runtime(writeback, fhir or StubFhir(), "https://x.example/sid/plan-series")  # type: ignore[arg-type]
    return Jobs(huey, settings, lambda: runtime)


def immediate(tmp_path: Path, **overrides: Any) -> tuple[JobsSettings, Huey]:
    settings = JobsSettings(sqlite_file=tmp_path / "q.sqlite3", **overrides)
    return settings, open_huey(settings, immediate=True)


def test_a_request_runs_one_reassessment_and_clears_its_mark(tmp_path: Path) -> None:
    settings, huey = immediate(tmp_path, debounce_seconds=0)
    writeback = StubWriteBack()
    jobs = make_jobs(huey, settings, writeback)
    assert jobs.request("p1") is True
    assert writeback.calls == ["p1"]
    # The mark is gone after the run, so the next change is re-assessed again.
    assert jobs.request("p1") is True
    assert writeback.calls == ["p1", "p1"]


def test_a_burst_for_one_patient_gives_one_reassessment(tmp_path: Path) -> None:
    settings, huey = immediate(tmp_path, debounce_seconds=5)
    writeback = StubWriteBack()
    jobs = make_jobs(huey, settings, writeback)
    results = [jobs.request("p1") for _ in range(10)] + [jobs.request("p2")]
    assert results.count(True) == 2
    scheduled = huey.scheduled()
    assert sorted(t.args[0] for t in scheduled) == ["p1", "p2"]
    huey.storage.flush_schedule()
    for task in scheduled:
        huey.execute(task, timestamp=task.eta)  # as a worker does when the delay is over
    assert sorted(writeback.calls) == ["p1", "p2"]


def test_failures_are_retried_with_growing_delays_then_dead_lettered(tmp_path: Path) -> None:
    settings, huey = immediate(
        tmp_path, debounce_seconds=0, retries=3, retry_base_seconds=2, retry_max_seconds=5
    )
    writeback = StubWriteBack(failures=100)
    jobs = make_jobs(huey, settings, writeback)
    jobs.request("p1")
    delays = []
    while scheduled := huey.scheduled():
        (task,) = scheduled
        delays.append((task.eta - datetime.now(task.eta.tzinfo)).total_seconds())
        huey.storage.flush_schedule()
        huey.execute(task, timestamp=task.eta)
    assert len(writeback.calls) == 4  # the first run and three retries
    assert [round(d) for d in delays] == [2, 4, 5]  # doubling, capped at retry_max_seconds
    (record,) = jobs.dead_letters()
    assert record["patient"] == "Patient/p1"
    assert record["error"] == "UpstreamUnavailableError"
    assert record["attempts"] == 4


def test_a_permanent_failure_is_dead_lettered_without_retry(tmp_path: Path) -> None:
    settings, huey = immediate(tmp_path, debounce_seconds=0, retries=5)
    writeback = StubWriteBack(failures=1, error=PatientNotFoundError("gone"))
    jobs = make_jobs(huey, settings, writeback)
    jobs.request("gone-1")
    assert huey.scheduled() == [] and writeback.calls == ["gone-1"]
    (record,) = jobs.dead_letters()
    assert record["error"] == "PatientNotFoundError" and record["attempts"] == 1
    # An operator asks again: the record goes, the patient is re-assessed (now it works).
    assert jobs.requeue_dead() == 1
    assert jobs.dead_letters() == [] and writeback.calls == ["gone-1", "gone-1"]


def test_a_retry_that_succeeds_leaves_no_dead_letter(tmp_path: Path) -> None:
    settings, huey = immediate(tmp_path, debounce_seconds=0, retries=2)
    writeback = StubWriteBack(failures=1)
    jobs = make_jobs(huey, settings, writeback)
    jobs.request("p1")
    (task,) = huey.scheduled()
    huey.storage.flush_schedule()
    huey.execute(task, timestamp=task.eta)
    assert writeback.calls == ["p1", "p1"] and jobs.dead_letters() == []


def test_a_stale_pending_mark_is_taken_over(tmp_path: Path) -> None:
    settings = JobsSettings(
        sqlite_file=tmp_path / "q.sqlite3", debounce_seconds=5, pending_ttl_seconds=60
    )
    huey = open_huey(settings, immediate=True)
    now = [1000.0]
    runtime = Runtime(StubWriteBack(), StubFhir(), "s")  # type: ignore[arg-type]
    jobs = Jobs(huey, settings, lambda: runtime, clock=lambda: now[0])
    assert jobs.request("p1") is True  # its run is due at 1005: the claim lives until 1065
    huey.storage.flush_schedule()  # the job is lost (e.g. a flushed queue); its claim stays
    now[0] += 60
    assert jobs.request("p1") is False
    now[0] += 6
    assert jobs.request("p1") is True
    assert len(huey.scheduled()) == 1


def test_the_embedded_queue_survives_a_restart(tmp_path: Path) -> None:
    settings = JobsSettings(sqlite_file=tmp_path / "q.sqlite3", debounce_seconds=0)
    writeback = StubWriteBack()
    first = make_jobs(open_huey(settings), settings, writeback)
    assert first.request("p1") is True and first.request("p1") is False
    first.huey.storage.close()
    assert writeback.calls == []  # nothing ran: no worker yet
    # A new process on the same file (e.g. after a restart) finds the task and runs it.
    second_huey = SqliteHuey(settings.queue_name, filename=str(settings.sqlite_file), results=False)
    make_jobs(second_huey, settings, writeback)  # registers the task with the new Huey
    assert second_huey.pending_count() == 1
    second_huey.execute(second_huey.dequeue())
    assert writeback.calls == ["p1"]


def test_the_sweep_asks_for_every_patient_with_an_active_plan(tmp_path: Path) -> None:
    settings, huey = immediate(tmp_path, debounce_seconds=0)
    writeback = StubWriteBack()
    plans: list[dict[str, Any]] = [
        {"resourceType": "CarePlan", "subject": {"reference": "Patient/a"}},
        {"resourceType": "CarePlan", "subject": {"reference": f"{BASE}/Patient/b"}},
        {"resourceType": "CarePlan", "subject": {"reference": "Patient/a"}},
        {"resourceType": "CarePlan", "subject": {"reference": "https://other.example/Patient/c"}},
        {"resourceType": "CarePlan"},
    ]
    fhir = StubFhir(plans=plans)
    jobs = make_jobs(huey, settings, writeback, fhir)
    assert jobs.sweep() == 2
    assert sorted(writeback.calls) == ["a", "b"]
    assert fhir.searches == [
        ("CarePlan", {"status": "active", "identifier": "https://x.example/sid/plan-series|"})
    ]


def test_the_daily_sweep_runs_once_a_day_whoever_triggers_it(tmp_path: Path) -> None:
    settings, huey = immediate(tmp_path, debounce_seconds=0)
    fhir = StubFhir(plans=[{"subject": {"reference": "Patient/a"}}])
    writeback = StubWriteBack()
    jobs = make_jobs(huey, settings, writeback, fhir)
    jobs._daily_sweep()
    jobs._daily_sweep()  # a second host's consumer, the same day
    assert writeback.calls == ["a"] and len(fhir.searches) == 1


def test_a_bad_patient_id_is_refused(tmp_path: Path) -> None:
    settings, huey = immediate(tmp_path)
    jobs = make_jobs(huey, settings, StubWriteBack())
    with pytest.raises(Exception, match="not a valid FHIR Patient id"):
        jobs.request("a/b")


def test_dead_letter_keys_do_not_name_patients(tmp_path: Path) -> None:
    settings, huey = immediate(tmp_path, debounce_seconds=5)
    jobs = make_jobs(huey, settings, StubWriteBack())
    jobs.request("secret-patient-id")
    keys = [k.decode() if isinstance(k, bytes) else k for k in huey.storage.result_items()]
    assert keys and all("secret-patient-id" not in k for k in keys)
    assert all(not k.startswith(DEAD_PREFIX) for k in keys)


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ({"reference": "Patient/p-1"}, "p-1"),
        ({"reference": "Patient/p-1/_history/3"}, "p-1"),
        ({"reference": f"{BASE}/Patient/p-1"}, "p-1"),
        ({"reference": "https://elsewhere.example/r4/Patient/p-1"}, None),
        ({"reference": "Group/g"}, None),
        ({"reference": "#contained"}, None),
        ({"identifier": {"value": "x"}}, None),
        ({"reference": "x/Patient/p-1"}, None),
        ("Patient/p-1", None),
    ],
)
def test_patient_references(reference: object, expected: str | None) -> None:
    assert patient_id_of(reference, BASE) == expected


def test_redis_settings_need_a_url() -> None:
    with pytest.raises(ValueError, match="redis_url"):
        JobsSettings(backend="redis")
    with pytest.raises(ValueError, match="at least 32"):
        JobsSettings(notification_secret="short")


# -- coalescing: the first request runs at once, a burst during a run gives one more -----------


def queued(tmp_path: Path, **overrides: Any) -> tuple[JobsSettings, Huey]:
    """A queue a test drains by hand, as a worker would (`run_next`)."""
    settings = JobsSettings(sqlite_file=tmp_path / "q.sqlite3", **overrides)
    return settings, open_huey(settings)


def run_next(huey: Huey) -> bool:
    task = huey.dequeue()
    if task is None:
        return False
    huey.execute(task)
    return True


def test_the_first_request_runs_at_once_by_default(tmp_path: Path) -> None:
    settings, huey = queued(tmp_path)
    assert settings.debounce_seconds == 0
    jobs = make_jobs(huey, settings, StubWriteBack())
    assert jobs.request("p1") is True
    assert huey.pending_count() == 1 and huey.scheduled_count() == 0  # no delay


def test_requests_while_queued_are_read_by_that_run(tmp_path: Path) -> None:
    settings, huey = queued(tmp_path)
    writeback = StubWriteBack()
    jobs = make_jobs(huey, settings, writeback)
    assert [jobs.request("p1") for _ in range(20)].count(True) == 1
    while run_next(huey):
        pass
    assert writeback.calls == ["p1"]  # the run began after all 20: it read them all


class DuringRun(StubWriteBack):
    """A write-back that, during its first call, lets `during` ask for the patient again."""

    def __init__(self, during: Any) -> None:
        super().__init__()
        self.during = during

    def assess_patient(self, patient_id: str, *, now: date | datetime, preview: bool) -> Any:
        if not self.calls:
            self.during()
        return super().assess_patient(patient_id, now=now, preview=preview)


def test_a_burst_during_a_run_gives_exactly_one_more_run(tmp_path: Path) -> None:
    settings, huey = queued(tmp_path)
    answers: list[bool] = []
    writeback = DuringRun(lambda: answers.extend(jobs.request("p1") for _ in range(20)))
    jobs = make_jobs(huey, settings, writeback)
    assert jobs.request("p1") is True
    assert run_next(huey)
    assert answers == [False] * 20  # coalesced: none enqueued while the run is under way
    assert huey.pending_count() == 1  # ... but one more run, after it
    assert run_next(huey) and not run_next(huey)
    assert writeback.calls == ["p1", "p1"]
    # Quiet again: the next change runs at once.
    assert jobs.request("p1") is True


def test_another_patient_is_not_held_up(tmp_path: Path) -> None:
    settings, huey = queued(tmp_path)
    writeback = DuringRun(lambda: jobs.request("p2"))
    jobs = make_jobs(huey, settings, writeback)
    jobs.request("p1")
    while run_next(huey):
        pass
    assert writeback.calls == ["p1", "p2"]


class Interleaved:
    """Storage whose `pop_data` / `delete_data` of one key runs `hook` right after: a request
    from another host landing between the two steps of `_release`."""

    def __init__(self, storage: Any, method: str, prefix: str, hook: Any) -> None:
        self._storage, self._method, self._prefix, self._hook = storage, method, prefix, hook
        self.fired = 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._storage, name)
        if name != self._method:
            return attr

        def wrapped(key: str, *args: Any) -> Any:
            result = attr(key, *args)
            if key.startswith(self._prefix) and not self.fired:
                self.fired += 1
                self._hook()
            return result

        return wrapped


@pytest.mark.parametrize(
    ("method", "prefix"),
    [("pop_data", AGAIN_PREFIX), ("delete_data", PENDING_PREFIX)],
    ids=["after-reading-the-mark", "after-giving-up-the-claim"],
)
def test_a_request_racing_the_end_of_a_run_gives_exactly_one_more_run(
    tmp_path: Path, method: str, prefix: str
) -> None:
    settings, huey = queued(tmp_path)
    writeback = StubWriteBack()
    jobs = make_jobs(huey, settings, writeback)
    jobs.request("p1")
    task = huey.dequeue()
    answers: list[bool] = []
    real = huey.storage
    huey.storage = Interleaved(real, method, prefix, lambda: answers.append(jobs.request("p1")))
    try:
        huey.execute(task)
    finally:
        huey.storage = real
    assert len(answers) == 1  # the request came in between
    assert huey.pending_count() == 1  # either way: one more run, not none, not two
    assert run_next(huey) and not run_next(huey)
    assert writeback.calls == ["p1", "p1"]


def test_a_run_waiting_for_its_retry_keeps_the_claim(tmp_path: Path) -> None:
    settings, huey = immediate(tmp_path, retries=2, retry_base_seconds=30)
    writeback = StubWriteBack(failures=1)
    jobs = make_jobs(huey, settings, writeback)
    assert jobs.request("p1") is True
    (retry,) = huey.scheduled()
    assert jobs.request("p1") is False  # the retry will read this change
    huey.storage.flush_schedule()
    huey.execute(retry, timestamp=retry.eta)
    assert writeback.calls == ["p1", "p1"] and huey.scheduled() == []
    assert jobs.request("p1") is True  # released after the retry


def test_an_idle_worker_polls_the_sqlite_queue_often(tmp_path: Path) -> None:
    """Huey's default backs off to a poll in 10 s: a notification would wait that long."""
    settings, huey = queued(tmp_path)
    consumer = make_jobs(huey, settings, StubWriteBack()).consumer(workers=1, worker_type="thread")
    assert consumer.default_delay == consumer.max_delay == settings.poll_seconds == 0.1


def test_the_notification_to_plan_lag_is_observed_from_the_request(tmp_path: Path) -> None:
    from prometheus_client import REGISTRY

    settings, huey = immediate(tmp_path, debounce_seconds=0)
    calls: list[float] = []

    def clock() -> float:  # the request reads 1000; everything after it 1042
        calls.append(0.0)
        return 1000.0 if len(calls) == 1 else 1042.0

    jobs = Jobs(
        huey,
        settings,
        lambda: Runtime(StubWriteBack(), StubFhir(), "https://x.example/sid/plan-series"),  # type: ignore[arg-type]
        clock=clock,
    )
    name = "fhir_dm_notification_to_plan_seconds"
    count = REGISTRY.get_sample_value(f"{name}_count") or 0.0
    total = REGISTRY.get_sample_value(f"{name}_sum") or 0.0
    assert jobs.request("p1") is True  # requested at 1000, the plan written at 1042
    assert REGISTRY.get_sample_value(f"{name}_count") == count + 1
    assert REGISTRY.get_sample_value(f"{name}_sum") == total + 42.0


def test_the_queue_knows_no_edge_until_it_registers_its_task(tmp_path: Path) -> None:
    settings, huey = immediate(tmp_path)
    jobs = make_jobs(huey, settings, StubWriteBack())
    with pytest.raises(KnowledgeError, match=r"no task 'edge\.task' is registered"):
        jobs.task("edge.task")
    seen: list[str] = []
    jobs.register("edge.task", seen.append)
    jobs.register("edge.task", lambda value: None)  # a second registration keeps the first
    jobs.task("edge.task")("one")
    assert seen == ["one"]
