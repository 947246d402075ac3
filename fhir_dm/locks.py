"""Per-patient locks, so concurrent assessments of one patient never write duplicates."""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAMESPACE = b"fhir-dm patient lock\x00"
LOCK_SUFFIX = ".lock"


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
    and an exclusive `flock` on a file in `directory` (gunicorn workers on one host wait for each
    other; the kernel releases it when a worker dies). Lock files are empty, named by a hash of
    the key, and kept: deleting them while another process waits would split the lock in two.
    Waiting is unbounded; the server's worker timeout bounds a stuck holder.
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
        """Hold the lock of `key` for the body of the `with` block."""
        name = lock_name(key)
        slot = self._enter(name)
        try:
            with slot.lock, self._file_lock(name):
                yield
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
    def _file_lock(self, name: str) -> Iterator[None]:
        fd = os.open(self._directory / name, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
