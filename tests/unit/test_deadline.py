"""The request deadline: FHIR timeouts, retries, Retry-After and lock waits all stay inside it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import responses

from fhir_dm.common import deadline as deadlines
from fhir_dm.common.deadline import Deadline, within
from fhir_dm.common.errors import (
    DeadlineExceededError,
    PatientBusyError,
    UpstreamThrottledError,
    UpstreamUnavailableError,
)
from fhir_dm.fhir import FhirClient, RetryPolicy
from fhir_dm.writeback.locks import PatientLocks

BASE = "https://fhir.example.org/r4"
PATIENT_URL = f"{BASE}/Patient/p1"


class FakeTime:
    """A monotonic clock that only moves when the client sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()


@pytest.fixture
def rsps() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock() as mock:
        yield mock


@pytest.fixture
def client(fake_time: FakeTime) -> Iterator[FhirClient]:
    with FhirClient(
        BASE,
        timeout=(5.0, 30.0),
        retry=RetryPolicy(max_retries=3, backoff_factor=0.5, max_backoff=30.0),
        sleep=fake_time.sleep,
        clock=fake_time,
    ) as fhir:
        yield fhir


# -- the Deadline itself ---------------------------------------------------------------------


def test_deadline_counts_down_and_refuses_to_start_a_call_when_spent(fake_time: FakeTime) -> None:
    deadline = Deadline.after(25.0, clock=fake_time)
    assert deadline.remaining() == 25.0
    assert deadline.cap(30.0) == 25.0 and deadline.cap(5.0) == 5.0
    fake_time.now += 25.0
    assert deadline.remaining() == 0.0
    with pytest.raises(DeadlineExceededError, match="time limit of 25 s ran out") as excinfo:
        deadline.check("GET metadata")
    assert excinfo.value.status == 504 and excinfo.value.issue_code == "timeout"


def test_within_sets_and_restores_the_current_deadline(fake_time: FakeTime) -> None:
    assert deadlines.current() is None and deadlines.remaining_or_none() is None
    deadline = Deadline.after(3.0, clock=fake_time)
    with within(deadline):
        assert deadlines.current() is deadline
        assert deadlines.remaining_or_none() == 3.0
    assert deadlines.current() is None


# -- FHIR calls ------------------------------------------------------------------------------


def test_retry_after_beyond_max_backoff_fails_fast_with_503_and_the_servers_retry_after(
    client: FhirClient, rsps: responses.RequestsMock, fake_time: FakeTime
) -> None:
    """The reported defect: `429 Retry-After: 3600` used to hold the worker past its timeout."""
    rsps.get(PATIENT_URL, status=429, headers={"Retry-After": "3600"})

    with pytest.raises(UpstreamThrottledError) as excinfo:
        client.read("Patient", "p1")

    assert excinfo.value.status == 503 and excinfo.value.issue_code == "throttled"
    assert excinfo.value.retry_after == 3600
    assert fake_time.sleeps == []
    assert len(rsps.calls) == 1


def test_retry_after_beyond_the_deadline_fails_fast(
    client: FhirClient, rsps: responses.RequestsMock, fake_time: FakeTime
) -> None:
    rsps.get(PATIENT_URL, status=503, headers={"Retry-After": "20"})

    with (
        within(Deadline.after(10.0, clock=fake_time)),
        pytest.raises(UpstreamUnavailableError) as excinfo,
    ):
        client.read("Patient", "p1")

    assert excinfo.value.status == 503 and excinfo.value.retry_after == 20
    assert fake_time.sleeps == []


def test_retry_after_within_the_deadline_is_waited_for(
    client: FhirClient, rsps: responses.RequestsMock, fake_time: FakeTime
) -> None:
    rsps.get(PATIENT_URL, status=429, headers={"Retry-After": "2"})
    rsps.get(PATIENT_URL, json={"resourceType": "Patient", "id": "p1"})

    with within(Deadline.after(10.0, clock=fake_time)):
        assert client.read("Patient", "p1") is not None

    assert fake_time.sleeps == [2.0]


def test_backoff_stops_when_the_next_wait_would_outlast_the_deadline(
    client: FhirClient, rsps: responses.RequestsMock, fake_time: FakeTime
) -> None:
    rsps.get(PATIENT_URL, status=502)

    # Back-off 0.5 s, then 1 s; the third wait (2 s) would end after the 2.5 s budget.
    with within(Deadline.after(2.5, clock=fake_time)), pytest.raises(Exception) as excinfo:
        client.read("Patient", "p1")

    assert fake_time.sleeps == [0.5, 1.0]
    assert len(rsps.calls) == 3
    assert excinfo.value.status == 502  # type: ignore[attr-defined]


def test_each_calls_timeouts_are_cut_to_the_time_left(
    client: FhirClient, rsps: responses.RequestsMock, fake_time: FakeTime
) -> None:
    rsps.get(PATIENT_URL, json={"resourceType": "Patient", "id": "p1"})

    with within(Deadline.after(4.0, clock=fake_time)):
        client.read("Patient", "p1")

    assert rsps.calls[0].request.req_kwargs["timeout"] == (4.0, 4.0)  # type: ignore[attr-defined]


def test_a_timeout_cut_by_the_deadline_is_reported_as_the_deadline(
    client: FhirClient, rsps: responses.RequestsMock, fake_time: FakeTime
) -> None:

    def slow_timeout(_request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        fake_time.now += 4.0  # the read timed out after all the time that was left
        raise requests.exceptions.ReadTimeout()

    rsps.add_callback(responses.GET, PATIENT_URL, callback=slow_timeout)

    with (
        within(Deadline.after(4.0, clock=fake_time)),
        pytest.raises(
            DeadlineExceededError, match=r"^GET Patient/\{id\} timed out: the request's time limit"
        ) as excinfo,
    ):
        client.read("Patient", "p1")

    assert excinfo.value.status == 504
    assert len(rsps.calls) == 1 and fake_time.sleeps == []


def test_no_call_is_started_once_the_deadline_has_passed(
    client: FhirClient, rsps: responses.RequestsMock, fake_time: FakeTime
) -> None:
    deadline = Deadline.after(1.0, clock=fake_time)
    fake_time.now += 1.0

    with within(deadline), pytest.raises(DeadlineExceededError, match=r"GET Patient/\{id\}"):
        client.read("Patient", "p1")

    assert len(rsps.calls) == 0


def test_an_explicit_deadline_binds_a_client_used_from_other_threads(
    rsps: responses.RequestsMock, fake_time: FakeTime
) -> None:
    """CDS Hooks fetches in a thread pool, where the request's context variable is not set."""
    deadline = Deadline.after(1.0, clock=fake_time)
    fake_time.now += 1.0
    fhir = FhirClient(BASE, clock=fake_time, sleep=fake_time.sleep, deadline=deadline)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            fhir.read("Patient", "p1")
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()

    assert [type(e) for e in errors] == [DeadlineExceededError]
    assert len(rsps.calls) == 0


# -- patient locks ---------------------------------------------------------------------------


def _hold_in_thread(locks: PatientLocks, key: str) -> tuple[threading.Event, threading.Thread]:
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with locks.hold(key):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=holder, daemon=True)
    thread.start()
    assert held.wait(5)
    return release, thread


def test_a_held_lock_is_waited_for_only_until_the_deadline(tmp_path: Path) -> None:
    locks = PatientLocks(tmp_path)
    release, thread = _hold_in_thread(locks, "Patient/1")
    try:
        started = time.monotonic()
        with within(Deadline.after(0.3)), pytest.raises(PatientBusyError) as excinfo:  # noqa: SIM117
            with locks.hold("Patient/1"):
                pytest.fail("the lock was held by another thread")
        waited = time.monotonic() - started
    finally:
        release.set()
        thread.join()
    assert 0.25 <= waited < 1.5
    assert excinfo.value.status == 503 and excinfo.value.issue_code == "lock-error"
    assert excinfo.value.retry_after == 1
    assert "Patient/1" not in excinfo.value.message


def test_a_lock_held_by_another_process_is_waited_for_only_until_the_deadline(
    tmp_path: Path,
) -> None:
    """Two PatientLocks on one directory stand for two gunicorn workers (the flock layer)."""
    other_worker = PatientLocks(tmp_path)
    release, thread = _hold_in_thread(other_worker, "Patient/1")
    try:
        started = time.monotonic()
        with within(Deadline.after(0.3)), pytest.raises(PatientBusyError):  # noqa: SIM117
            with PatientLocks(tmp_path).hold("Patient/1"):
                pytest.fail("the lock was held by another worker")
        waited = time.monotonic() - started
    finally:
        release.set()
        thread.join()
    assert 0.25 <= waited < 1.5


def test_a_lock_released_in_time_is_taken(tmp_path: Path) -> None:
    locks = PatientLocks(tmp_path)
    release, thread = _hold_in_thread(locks, "Patient/1")
    timer = threading.Timer(0.2, release.set)
    timer.start()
    try:
        with within(Deadline.after(5.0)), locks.hold("Patient/1"):
            pass
    finally:
        release.set()
        thread.join()
        timer.cancel()
