"""The Redis queue with a real redis-server: two "hosts", several workers, one burst."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from fhir_dm.common.errors import PatientBusyError, UpstreamUnavailableError
from fhir_dm.events.queue import Jobs, RedisPatientLock, open_huey
from fhir_dm.events.settings import JobsSettings
from tests.redis_server import RedisServer
from tests.unit.events.test_queue import StubWriteBack, make_jobs

# A real redis-server: not part of a `-m "not integration"` run.
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    url = server.start()
    yield url
    server.stop()


def redis_settings(url: str, **overrides: object) -> JobsSettings:
    return JobsSettings(
        backend="redis",
        redis_url=url,
        queue_name=f"t-{uuid.uuid4().hex[:12]}",
        **overrides,
    )


def _drain(hosts: list[Jobs], until: float) -> None:
    while time.monotonic() < until:
        huey = hosts[0].huey
        if huey.pending_count() == 0 and huey.scheduled_count() == 0:
            return
        time.sleep(0.05)


def test_two_hosts_and_a_burst_give_one_reassessment_per_patient(
    redis_url: str, tmp_path: Path
) -> None:
    settings = redis_settings(redis_url, debounce_seconds=0.3, lock_wait_seconds=10)
    writeback = StubWriteBack(delay=0.2)  # an optional delay: all 30 come before the runs
    # Two hosts: each its own Huey (connection) and Jobs on the same Redis queue.
    hosts = [make_jobs(open_huey(settings), settings, writeback) for _ in range(2)]
    consumers = [h.consumer(workers=2, worker_type="thread") for h in hosts]
    for consumer in consumers:
        consumer.start()
    try:
        enqueued = [hosts[n % 2].request(f"p{n % 3}") for n in range(30)]
        assert enqueued.count(True) == 3
        _drain(hosts, time.monotonic() + 15)
        time.sleep(0.5)  # let the last task finish
    finally:
        for consumer in consumers:
            consumer.stop(graceful=True)
        for host in hosts:
            host.close()
    assert Counter(writeback.calls) == {"p0": 1, "p1": 1, "p2": 1}
    assert writeback.overlaps == 0


class Gate(StubWriteBack):
    """A write-back whose first run waits, under way, until the test lets it finish."""

    def __init__(self) -> None:
        super().__init__()
        self.started = threading.Event()
        self.release = threading.Event()

    def assess_patient(self, patient_id: str, **kwargs: Any) -> Any:
        first = not self.calls
        result = super().assess_patient(patient_id, **kwargs)
        if first:
            self.started.set()
            assert self.release.wait(30)
        return result


def test_a_burst_from_two_hosts_during_a_run_gives_exactly_one_more_run(
    redis_url: str,
) -> None:
    """Two hosts, two worker threads each, no delay: run, burst of 20, exactly one more run."""
    settings = redis_settings(redis_url, lock_wait_seconds=10)
    assert settings.debounce_seconds == 0
    writeback = Gate()
    hosts = [make_jobs(open_huey(settings), settings, writeback) for _ in range(2)]
    consumers = [h.consumer(workers=2, worker_type="thread") for h in hosts]
    for consumer in consumers:
        consumer.start()
    try:
        assert hosts[0].request("burst") is True
        assert writeback.started.wait(15)  # the first run is under way at once
        answers: list[bool] = []
        threads = [
            threading.Thread(target=lambda n=n: answers.append(hosts[n % 2].request("burst")))
            for n in range(20)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert answers == [False] * 20
        writeback.release.set()
        deadline = time.monotonic() + 15
        while len(writeback.calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        _drain(hosts, time.monotonic() + 15)
        time.sleep(0.5)  # a third run, were there one, would have started by now
    finally:
        writeback.release.set()
        for consumer in consumers:
            consumer.stop(graceful=True)
        for host in hosts:
            host.close()
    assert writeback.calls == ["burst", "burst"] and writeback.overlaps == 0


def test_the_patient_lock_holds_across_hosts(redis_url: str) -> None:
    one = RedisPatientLock(redis.Redis.from_url(redis_url), lease_seconds=5, wait_seconds=0.2)
    other = RedisPatientLock(redis.Redis.from_url(redis_url), lease_seconds=5, wait_seconds=0.2)
    with one.hold("p-lock"):
        with pytest.raises(PatientBusyError), other.hold("p-lock"):
            pass
        with other.hold("p-other"):  # another patient is not blocked
            pass
    with other.hold("p-lock"):
        pass
    one.close()
    other.close()


def test_concurrent_runs_for_one_patient_take_turns(redis_url: str) -> None:
    settings = redis_settings(redis_url, debounce_seconds=0, lock_wait_seconds=10)
    writeback = StubWriteBack(delay=0.2)
    hosts = [make_jobs(open_huey(settings), settings, writeback) for _ in range(2)]
    threads = [threading.Thread(target=hosts[n % 2]._reassess, args=("same",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for host in hosts:
        host.close()
    assert writeback.calls == ["same"] * 4 and writeback.overlaps == 0


def test_a_request_while_redis_is_down_is_unavailable_not_lost(tmp_path: Path) -> None:
    """503 to the notifier (which delivers again), not a silent drop."""
    server = RedisServer(tmp_path)
    url = server.start()
    settings = redis_settings(url, debounce_seconds=5)
    jobs = make_jobs(open_huey(settings), settings, StubWriteBack())
    assert jobs.request("p1") is True
    server.stop()
    with pytest.raises(UpstreamUnavailableError):
        jobs.request("p2")
    jobs.close()
