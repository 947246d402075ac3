"""Per-patient locks, so concurrent assessments of one patient never write duplicates."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from fhir_dm.common import deadline as deadlines
from fhir_dm.common.deadline import Deadline
from fhir_dm.common.errors import PatientBusyError

LOCK_NAMESPACE = b"fhir-dm patient lock\x00"
LOCK_SUFFIX = ".lock"
# A bounded wait for another process's lock polls this often (filelock's poll interval).
POLL_SECONDS = 0.02


def lock_name(key: str) -> str:
    """The lock file name for a key: a hash, so no patient reference is ever written to disk."""
    return hashlib.sha256(LOCK_NAMESPACE + key.encode("utf-8")).hexdigest() + LOCK_SUFFIX


class _Slot:
    """One key's in-process lock and how many threads currently want it."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0


class PatientLocks:
    """Serialises read-assess-write per patient across threads and across processes of one host.

    Usage::

        locks = PatientLocks(Path("/var/lib/fhir-dm/locks"))
        with locks.hold("Patient/123"):
            ...  # read what the server holds, decide, write one transaction

    Two layers: an in-process lock (threads of one worker wait cheaply, without file handles)
    and an exclusive file lock (filelock, `flock` underneath) on a file in `directory` (gunicorn
    workers on one host wait for each other; the kernel releases it when a worker dies). Lock
    files are empty, named by a hash of the key, and kept: deleting them while another process
    waits would split the lock in two.
    Waiting ends at the current request deadline (`fhir_dm.common.deadline`) with PatientBusyError;
    without one (the CLI, tests) it is unbounded.
    """

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._slots: dict[str, _Slot] = {}
        self._guard = threading.Lock()

    @property
    def directory(self) -> Path:
        """Where the lock files live."""
        return self._directory

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        """Hold the lock of `key` for the body of the `with` block.

        PatientBusyError when the current deadline passes first; the message names no key.
        """
        deadline = deadlines.current()
        name = lock_name(key)
        slot = self._enter(name)
        try:
            left = -1.0 if deadline is None else deadline.remaining()
            if not slot.lock.acquire(timeout=left):
                raise _busy(deadline)
            try:
                with self._file_lock(name, deadline):
                    yield
            finally:
                slot.lock.release()
        finally:
            self._leave(name, slot)

    def _enter(self, name: str) -> _Slot:
        with self._guard:
            slot = self._slots.setdefault(name, _Slot())
            slot.users += 1
            return slot

    def _leave(self, name: str, slot: _Slot) -> None:
        """Forget a slot nobody waits for, so the table does not grow with every patient seen."""
        with self._guard:
            slot.users -= 1
            if slot.users == 0:
                del self._slots[name]

    @contextmanager
    def _file_lock(self, name: str, deadline: Deadline | None) -> Iterator[None]:
        """Hold the key's file lock; without a deadline wait for it, else until the deadline."""
        timeout = -1.0 if deadline is None else max(deadline.remaining(), 0.0)
        lock = FileLock(
            self._directory / name, mode=0o600, thread_local=False, poll_interval=POLL_SECONDS
        )
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            raise _busy(deadline) from None
        try:
            yield
        finally:
            lock.release()


def _busy(deadline: Deadline | None) -> PatientBusyError:
    """Another assessment of the patient runs; it ends within its own deadline, like ours."""
    return PatientBusyError(
        "another assessment of this patient is still running; try again later",
        retry_after=None if deadline is None else deadline.retry_after(),
    )
