"""Per-patient locks: one holder per patient across threads and open files, none on disk by name."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

import pytest

from fhir_dm.writeback.locks import PatientLocks, lock_name


def _locked_elsewhere(path: Path) -> bool:
    """Whether another open file description holds the flock (as another worker would see it)."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def test_the_file_lock_is_held_exactly_while_inside(tmp_path: Path) -> None:
    locks = PatientLocks(tmp_path / "locks")
    path = tmp_path / "locks" / lock_name("Patient/123")
    with locks.hold("Patient/123"):
        assert _locked_elsewhere(path)
    assert not _locked_elsewhere(path)


def test_lock_files_are_named_by_hash_only(tmp_path: Path) -> None:
    locks = PatientLocks(tmp_path)
    with locks.hold("Patient/pat-secret-42"):
        pass
    (name,) = [p.name for p in tmp_path.iterdir()]
    assert "pat-secret-42" not in name and name.endswith(".lock") and len(name) == 64 + 5


def test_different_patients_do_not_wait_for_each_other(tmp_path: Path) -> None:
    locks = PatientLocks(tmp_path)
    with locks.hold("Patient/a"), locks.hold("Patient/b"):
        assert len(list(tmp_path.iterdir())) == 2


def test_threads_of_one_process_take_turns(tmp_path: Path) -> None:
    locks = PatientLocks(tmp_path)
    inside = 0
    most_inside = 0
    guard = threading.Lock()
    start = threading.Barrier(8)

    def work() -> None:
        nonlocal inside, most_inside
        start.wait()
        for _ in range(20):
            with locks.hold("Patient/same"):
                with guard:
                    inside += 1
                    most_inside = max(most_inside, inside)
                with guard:
                    inside -= 1

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most_inside == 1


def test_the_table_of_in_process_locks_does_not_grow(tmp_path: Path) -> None:
    locks = PatientLocks(tmp_path)
    for n in range(50):
        with locks.hold(f"Patient/{n}"):
            pass
    assert locks._slots == {}


def test_the_lock_is_released_when_the_body_fails(tmp_path: Path) -> None:
    locks = PatientLocks(tmp_path)
    with pytest.raises(RuntimeError), locks.hold("Patient/x"):
        raise RuntimeError
    assert not _locked_elsewhere(tmp_path / lock_name("Patient/x"))
