"""The re-assessment queue (Huey): one task per patient, coalesced, serialised, retried, recorded.

A change on the FHIR server (a notification) or the daily sweep asks for `request(patient_id)`.
Per patient, coalescing instead of a fixed delay (two marks in the queue's own storage, set
atomically, so they hold across hosts with Redis):

- no run claimed for the patient: the request claims one and enqueues it at once (after
  `debounce_seconds`, 0 by default);
- a run claimed (queued or running): the request only sets the patient's "again" mark. A run
  clears that mark before it reads (it reads those changes), and when it ends with the mark
  set it enqueues exactly one more run; otherwise it gives the claim up.

So a burst of notifications gives one run, or two when it overlaps a run, never one each; and
a change made while a run reads is never lost. The task calls the write-back's public
`assess_patient`, under a per-patient lock that holds across hosts (Redis) on top of the
write-back's own per-host file lock. A failure is retried with exponential backoff; a task
that keeps failing, or fails in a way retrying cannot mend, is written to a dead-letter record
an operator lists with `fhir-dm dead-letters`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import redis
from huey import Huey, RedisHuey, SqliteHuey, crontab
from huey.constants import EmptyData
from huey.consumer import Consumer
from huey.exceptions import CancelExecution, RetryTask

from fhir_dm.common.errors import (
    FhirDmError,
    InputError,
    KnowledgeError,
    PatientBusyError,
    PatientNotFoundError,
    QueueUnavailableError,
)
from fhir_dm.common.metrics import NOTIFICATION_LAG
from fhir_dm.core.ids import FHIR_ID_PATTERN, is_fhir_id
from fhir_dm.events.settings import JobsSettings
from fhir_dm.fhir.client import FhirClient
from fhir_dm.knowledge.models import Knowledge
from fhir_dm.writeback.writer import WriteBack

_log = logging.getLogger(__name__)

REASSESS_TASK = "fhir-dm.reassess"
SWEEP_TASK = "fhir-dm.sweep"
PENDING_PREFIX = "fhir-dm:pending:"  # a run is claimed (queued, running, or waiting to retry)
AGAIN_PREFIX = "fhir-dm:again:"  # a change was notified after the claimed run began reading
DEAD_PREFIX = "fhir-dm:dead:"
SWEPT_PREFIX = "fhir-dm:swept:"
LOCK_PREFIX = "fhir-dm:patient-lock:"
KEY_NAMESPACE = b"fhir-dm queue key\x00"
READY_KEY = "fhir-dm:ready"  # read by the readiness probe; never written
# What the queue's storage raises when it cannot be reached (a Redis or SQLite outage).
QUEUE_ERRORS: tuple[type[Exception], ...] = (redis.exceptions.RedisError, sqlite3.Error, OSError)
QUEUE_RETRY_AFTER_SECONDS = 5
REDIS_CONNECT_TIMEOUT_SECONDS = 5.0
# Failures retrying cannot mend: the patient is gone, the input or the configuration is wrong.
PERMANENT_ERRORS: tuple[type[Exception], ...] = (InputError, PatientNotFoundError, KnowledgeError)
_PATIENT_REFERENCE = re.compile(r"(?:^|/)Patient/(" + FHIR_ID_PATTERN + r")(?:/_history/[^/]+)?$")

Json = dict[str, Any]


def patient_key(patient_id: str) -> str:
    """A storage key for a patient: a hash, so no patient id is written into key names."""
    return hashlib.sha256(KEY_NAMESPACE + patient_id.encode("utf-8")).hexdigest()[:40]


def is_patient_id(value: object) -> bool:
    """Whether `value` is a FHIR logical id (what `reassess` accepts)."""
    return is_fhir_id(value)


def patient_id_of(reference: object, base_url: str) -> str | None:
    """The Patient id a Reference names on the FHIR server at `base_url`; None otherwise.

    Relative `Patient/<id>` and absolute references on that server count; a reference to
    another server, a contained or logical reference does not (nothing to re-assess here).
    """
    if not isinstance(reference, Mapping):
        return None
    text = reference.get("reference")
    if not isinstance(text, str):
        return None
    if "://" in text and not text.startswith(base_url.rstrip("/") + "/"):
        return None
    match = _PATIENT_REFERENCE.search(text)
    if match is None or ("://" not in text and text.count("/") not in (1, 3)):
        return None
    return match.group(1)


@dataclass(frozen=True, slots=True)
class Runtime:
    """What a worker needs to re-assess: the write-back, its FHIR client, our plan identifier."""

    writeback: WriteBack
    fhir: FhirClient
    plan_series_system: str
    knowledge: Knowledge | None = None  # for the population task's rows


class PatientLock(Protocol):
    """Serialises the re-assessments of one patient (across hosts where the queue is shared)."""

    def hold(self, patient_id: str) -> AbstractContextManager[None]: ...


class HostLock:
    """Embedded queue (one host): the write-back's own per-host file lock is enough."""

    def hold(self, patient_id: str) -> AbstractContextManager[None]:
        return nullcontext()


class RedisPatientLock:
    """A Redis lock per patient, with a lease, so workers on several hosts take turns.

    A worker that dies releases it when the lease ends; a run longer than the lease is still
    safe, because every plan update is versioned (`ifMatch`) by the write-back.
    """

    def __init__(self, client: redis.Redis, *, lease_seconds: float, wait_seconds: float) -> None:
        self._client = client
        self._lease = lease_seconds
        self._wait = wait_seconds

    def close(self) -> None:
        self._client.close()

    @contextmanager
    def hold(self, patient_id: str) -> Iterator[None]:
        lock = self._client.lock(
            LOCK_PREFIX + patient_key(patient_id),
            timeout=self._lease,
            blocking_timeout=self._wait,
        )
        if not lock.acquire():
            raise PatientBusyError("another worker is re-assessing this patient")
        try:
            yield
        finally:
            try:
                lock.release()
            except redis.exceptions.LockError:
                _log.warning("patient lock lease ended before the re-assessment did")


@contextmanager
def queue_available() -> Iterator[None]:
    """Turn an outage of the queue's storage into QueueUnavailableError (503, Retry-After).

    So a caller (the FHIR server's notification, an operator's population run) is told to come
    back later rather than given a 500, and nothing is half-enqueued silently.
    """
    try:
        yield
    except QUEUE_ERRORS:
        _log.warning("job queue unavailable")
        raise QueueUnavailableError(
            "the job queue is unavailable; try again later",
            retry_after=QUEUE_RETRY_AFTER_SECONDS,
        ) from None


def open_huey(settings: JobsSettings, *, immediate: bool = False) -> Huey:
    """The Huey of the configured backend; results are not kept (tasks return nothing)."""
    if settings.backend == "redis" and settings.redis_url is not None:  # validated as a pair
        # A connect timeout, so an unreachable Redis fails fast (503) instead of hanging a
        # request thread; reads keep no timeout (a worker's blocking pop waits on purpose).
        pool = redis.ConnectionPool.from_url(
            settings.redis_url, socket_connect_timeout=REDIS_CONNECT_TIMEOUT_SECONDS
        )
        return RedisHuey(settings.queue_name, connection_pool=pool, results=False, utc=True)
    settings.sqlite_file.parent.mkdir(parents=True, exist_ok=True)
    return SqliteHuey(
        settings.queue_name,
        filename=str(settings.sqlite_file),
        results=False,
        utc=True,
        immediate=immediate,
    )


def open_huey_checked(settings: JobsSettings) -> Huey:
    """`open_huey`, with a storage that cannot be opened as QueueUnavailableError (503)."""
    with queue_available():
        return open_huey(settings)


def patient_lock_for(settings: JobsSettings) -> PatientLock:
    """Redis lock with the Redis queue (several hosts); the host's file lock otherwise."""
    if settings.backend == "redis" and settings.redis_url:
        return RedisPatientLock(
            redis.Redis.from_url(settings.redis_url),
            lease_seconds=settings.lock_lease_seconds,
            wait_seconds=settings.lock_wait_seconds,
        )
    return HostLock()


class Jobs:
    """The queue's tasks and the operations around them.

    Usage::

        jobs = queue_for(settings, settings.jobs)   # fhir_dm.web.jobs: every task registered
        jobs.request("123")          # from a notification: enqueue, or mark for one more run
        jobs.consumer().run()        # in `fhir-dm worker`
        jobs.dead_letters()          # what kept failing, for an operator

    `runtime` is called lazily, once per process (Huey's process workers fork).
    """

    def __init__(
        self,
        huey: Huey,
        settings: JobsSettings,
        runtime: Callable[[], Runtime],
        *,
        lock: PatientLock | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.huey = huey
        self.settings = settings
        self._make_runtime = runtime
        self._runtime: tuple[int, Runtime] | None = None
        self._runtime_guard = threading.Lock()
        self._lock = lock if lock is not None else patient_lock_for(settings)
        self._clock = clock
        self.reassess = huey.task(retries=settings.retries, context=True, name=REASSESS_TASK)(
            self._reassess
        )
        self.sweep_task = huey.periodic_task(
            crontab(minute=str(settings.sweep_minute), hour=str(settings.sweep_hour)),
            name=SWEEP_TASK,
        )(self._daily_sweep)
        self._tasks: dict[str, Any] = {}

    # -- asking for a re-assessment -------------------------------------------------------

    def request(self, patient_id: str) -> bool:
        """Enqueue a re-assessment unless one is claimed; True when one was enqueued.

        When one is claimed (queued or running), the patient is marked for one more run after
        it instead (False).

        UpstreamUnavailableError (503) when the queue's storage cannot be reached, so the FHIR
        server delivers the notification again later rather than it being lost.
        """
        if not is_patient_id(patient_id):
            raise InputError("not a valid FHIR Patient id")
        with queue_available():
            return self._request(patient_id)

    def ping(self) -> None:
        """Read one key of the queue's storage; QueueUnavailableError (503) when it is down."""
        with queue_available():
            self.huey.storage.peek_data(READY_KEY)

    def _request(self, patient_id: str) -> bool:
        claim, again = _keys(patient_id)
        now = self._clock()
        delay = self.settings.debounce_seconds
        storage = self.huey.storage
        if not storage.put_if_empty(claim, _number(now + delay)):
            marked = _read_number(storage.peek_data(claim))
            if marked is not None and now - marked < self.settings.pending_ttl_seconds:
                # A run is queued or running: it, or the one more run it then enqueues, reads
                # this change. Several notifications set the same mark: one more run at most.
                storage.put_data(again, _number(now))
                return False
            # A claim older than its run could be: that run was lost (a worker killed mid-run,
            # a flushed queue). Take it over rather than block the patient.
            storage.put_data(claim, _number(now + delay))
        self._enqueue(patient_id, claim, delay, now)
        return True

    def _enqueue(self, patient_id: str, claim: str, delay: float, requested_at: float) -> None:
        try:
            if delay > 0:
                self.reassess.schedule(args=(patient_id, requested_at), delay=delay)
            else:
                self.reassess(patient_id, requested_at)
        except QUEUE_ERRORS:
            # Not enqueued: drop our claim (if we still can), so the next notification tries.
            with suppress(*QUEUE_ERRORS):
                self.huey.storage.delete_data(claim)
            raise

    def _release(self, patient_id: str) -> None:
        """End a run's claim: one more run if a change was notified meanwhile, else give it up.

        A request can come between reading the "again" mark and deleting the claim: it saw the
        claim and only set the mark. So after deleting, look again: a mark left behind is taken
        back up here, unless a newer request claimed a run already (that run reads the change).
        """
        claim, again = _keys(patient_id)
        storage = self.huey.storage
        while True:
            marked = storage.pop_data(again)
            if marked is not EmptyData:
                now = self._clock()
                storage.put_data(claim, _number(now))
                requested = _read_number(marked)
                self._enqueue(patient_id, claim, 0.0, now if requested is None else requested)
                return
            storage.delete_data(claim)
            if storage.peek_data(again) is EmptyData:
                return
            if not storage.put_if_empty(claim, _number(self._clock())):
                return

    def backoff(self, attempt: int) -> float:
        """Seconds before retry `attempt` (0-based): doubling from the base, capped."""
        base = self.settings.retry_base_seconds
        return float(min(self.settings.retry_max_seconds, base * (2**attempt)))

    # -- the tasks ---------------------------------------------------------------------------

    def _reassess(
        self, patient_id: str, requested_at: float | None = None, task: Any = None
    ) -> None:
        """Re-assess one patient and write the revision; retry, or record, on failure.

        The run holds the patient's claim (refreshed now: it is alive) and clears the "again"
        mark before it reads, since it reads what those notifications announced. A run that
        ends with the plan up to date observes the notification-to-plan lag (`requested_at`:
        when the change was notified; absent from tasks queued by an older version).
        """
        claim, again = _keys(patient_id)
        self.huey.storage.put_data(claim, _number(self._clock()))
        self.huey.storage.delete_data(again)
        try:
            with self._lock.hold(patient_id):
                write = self.runtime().writeback.assess_patient(
                    patient_id, now=datetime.now(UTC).date(), preview=False
                )
        except Exception as exc:
            # Retried (RetryTask raised): the claim stays, the retry is the patient's run.
            self._failed(patient_id, task, exc)
            self._release(patient_id)
            # Recorded: end it quietly (Huey logs the task id only, no trace that might quote
            # an upstream URL naming the patient).
            raise CancelExecution(retry=False) from None
        _log.info("re-assessed: %s", write.status)
        if requested_at is not None:
            NOTIFICATION_LAG.observe(max(0.0, self._clock() - requested_at))
        self._release(patient_id)

    def _failed(self, patient_id: str, task: Any, exc: Exception) -> None:
        """Retry with backoff while the budget lasts; else write the dead-letter record."""
        left = int(getattr(task, "retries", 0) or 0)
        permanent = isinstance(exc, PERMANENT_ERRORS)
        if left > 0 and not permanent:
            attempt = self.settings.retries - left
            delay = self.backoff(attempt)
            _log.warning(
                "re-assessment failed; retry in %.0f s",
                delay,
                extra={"error": type(exc).__name__},
            )
            # RetryTask keeps Huey's retry budget as it is; this attempt spends one.
            task.retries = left - 1
            # The claim stays alive until the retry is due (see `pending_ttl_seconds`).
            self.huey.storage.put_data(_keys(patient_id)[0], _number(self._clock() + delay))
            raise RetryTask(delay=delay) from None
        attempts = self.settings.retries + 1 - left
        if task is not None:
            task.retries = 0  # no further retry by Huey for a permanent failure
        self._record_dead(patient_id, task, exc, attempts)

    def _record_dead(self, patient_id: str, task: Any, exc: Exception, attempts: int) -> None:
        task_id = str(getattr(task, "id", "") or f"immediate-{time.time_ns()}")
        record = {
            "task_id": task_id,
            "task": REASSESS_TASK,
            "patient": f"Patient/{patient_id}",
            "error": type(exc).__name__,
            # Our messages never name patient data; anything else is reduced to its class.
            "message": exc.message if isinstance(exc, FhirDmError) else "",
            "attempts": attempts,
            "failed_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        self.huey.storage.put_data(DEAD_PREFIX + task_id, json.dumps(record).encode("utf-8"))
        _log.error("re-assessment failed for good", extra={"error": type(exc).__name__})

    # -- tasks of other edges -------------------------------------------------------------

    def register(self, name: str, body: Callable[..., None]) -> None:
        """Add another edge's task (no Huey retry: its owner records failures).

        The queue knows no edge: an edge registers its task in every process that enqueues or
        runs it (the service and `fhir-dm worker` both open the queue through one function).
        Registering a name twice keeps the first.
        """
        if name not in self._tasks:
            self._tasks[name] = self.huey.task(name=name)(body)

    def task(self, name: str) -> Any:
        """A registered task, to enqueue with its arguments; KnowledgeError when missing."""
        try:
            return self._tasks[name]
        except KeyError:
            raise KnowledgeError(f"job queue: no task {name!r} is registered") from None

    @property
    def lock(self) -> PatientLock:
        """The cross-host per-patient lock every task that writes holds."""
        return self._lock

    def _daily_sweep(self) -> None:
        """Once a day across all hosts: every patient with an active plan of ours."""
        day = datetime.now(UTC).date().isoformat()
        if not self.huey.storage.put_if_empty(SWEPT_PREFIX + day, b"1"):
            return  # another host's consumer swept today already
        count = self.sweep()
        _log.info("daily sweep: %d patient(s) with an active plan", count)

    def sweep(self) -> int:
        """Ask for a re-assessment of every patient with an active fhir-dm plan; how many."""
        runtime = self.runtime()
        plans = runtime.fhir.search(
            "CarePlan",
            {"status": "active", "identifier": f"{runtime.plan_series_system}|"},
        )
        ids = sorted(
            {
                pid
                for plan in plans
                if (pid := patient_id_of(plan.get("subject"), runtime.fhir.base_url))
            }
        )
        for pid in ids:
            self.request(pid)
        return len(ids)

    # -- operators and workers ---------------------------------------------------------------

    def runtime(self) -> Runtime:
        """The write-back of this process, built on first use (after a worker fork)."""
        pid = os.getpid()
        with self._runtime_guard:
            if self._runtime is None or self._runtime[0] != pid:
                self._runtime = (pid, self._make_runtime())
            return self._runtime[1]

    def dead_letters(self) -> list[Json]:
        """Every dead-letter record, oldest first."""
        records: list[Json] = []
        for key, value in self.huey.storage.result_items().items():
            name = key.decode("utf-8") if isinstance(key, bytes) else str(key)
            if not name.startswith(DEAD_PREFIX):
                continue
            try:
                record = json.loads(bytes(value).decode("utf-8"))
            except (ValueError, TypeError):
                continue
            if isinstance(record, dict):
                records.append(record)
        return sorted(records, key=lambda r: str(r.get("failed_at", "")))

    def requeue_dead(self) -> int:
        """Ask again for every dead-lettered patient and drop its record; how many."""
        count = 0
        for record in self.dead_letters():
            patient = str(record.get("patient", "")).removeprefix("Patient/")
            self.huey.storage.delete_data(DEAD_PREFIX + str(record.get("task_id", "")))
            if is_patient_id(patient):
                self.request(patient)
                count += 1
        return count

    def close(self) -> None:
        """Release the queue's and the lock's connections."""
        storage = self.huey.storage
        pool = getattr(storage, "pool", None)
        if pool is not None:
            pool.disconnect()
        storage.close()
        close_lock = getattr(self._lock, "close", None)
        if callable(close_lock):
            close_lock()

    def consumer(self, workers: int | None = None, worker_type: str | None = None) -> Consumer:
        """A Huey consumer running the tasks and the daily sweep.

        An idle worker of the SQLite queue polls it every `poll_seconds` (Huey's own default
        backs off to one poll in 10 s, which a notification after a quiet spell waited for);
        the Redis queue wakes a waiting worker at once (a blocking pop).
        """
        poll = self.settings.poll_seconds
        return self.huey.create_consumer(
            workers=workers or self.settings.workers,
            worker_type=worker_type or self.settings.worker_type,
            periodic=True,
            check_worker_health=True,
            initial_delay=poll,
            max_delay=poll,
        )


def _keys(patient_id: str) -> tuple[str, str]:
    """The patient's claim and "again" keys in the queue's storage."""
    key = patient_key(patient_id)
    return PENDING_PREFIX + key, AGAIN_PREFIX + key


def _number(value: float) -> bytes:
    return repr(value).encode("ascii")


def _read_number(value: object) -> float | None:
    if not isinstance(value, bytes | bytearray | memoryview):
        return None
    try:
        return float(bytes(value).decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        return None
