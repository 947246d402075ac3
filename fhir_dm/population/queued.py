"""A population run through the job queue: one task per patient, shared by every worker.

`fhir-dm population run --queue` and `POST /$dm-population-run` enqueue one
`fhir-dm.population-assess` task per found patient onto the Huey queue of `jobs.*` (SQLite on
one host, Redis for several), so any number of `fhir-dm worker` processes on any number of
hosts share the run. Each task writes its outcome into the queue's own key-value storage under
the run's key for the patient (a hash: no patient id in key names); the caller reads those to
show progress and the per-tier summary, then forgets them (its state file keeps what finished).

A patient's record goes queued -> done | failed. Submitting again (a resumed run) enqueues only
the patients with no record or a failed one, so a patient is never queued twice for one run.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date
from typing import TYPE_CHECKING, Any, TextIO

from fhir_dm.common.errors import FhirDmError, KnowledgeError
from fhir_dm.events.queue import PatientLock, patient_key
from fhir_dm.population.rows import PatientRow, patient_row
from fhir_dm.population.run import Done, Failure, Progress, RunResult, StateFile

if TYPE_CHECKING:
    from fhir_dm.events.queue import Jobs

RUN_PREFIX = "fhir-dm:population:"
QUEUED = b'{"state": "queued"}'
POLL_SECONDS = 1.0

Json = dict[str, Any]


def record_key(run_id: str, patient_id: str) -> str:
    """Where a task leaves the outcome of one patient of one run."""
    return f"{RUN_PREFIX}{run_id}:{patient_key(patient_id)}"


def manifest_key(run_id: str) -> str:
    """Where a run submitted by the service keeps its patients, for its status."""
    return f"{RUN_PREFIX}{run_id}"


POPULATION_TASK = "fhir-dm.population-assess"


def register_population_task(jobs: Jobs) -> None:
    """Add the population run's task to the queue (in the service and in every worker)."""

    def population_assess(run_id: str, patient_id: str, now: str, preview: bool) -> None:
        assess_for_run(jobs, jobs.lock, run_id, patient_id, now=now, preview=preview)

    jobs.register(POPULATION_TASK, population_assess)


def assess_for_run(
    jobs: Jobs, lock: PatientLock, run_id: str, patient_id: str, *, now: str, preview: bool
) -> None:
    """The task's body: assess (and write back, unless a preview) one patient; record how."""
    outcome: Json
    try:
        runtime = jobs.runtime()
        if runtime.knowledge is None:
            raise KnowledgeError("the worker's runtime has no knowledge base")
        with lock.hold(patient_id):
            write = runtime.writeback.assess_patient(
                patient_id, now=date.fromisoformat(now), preview=preview
            )
        patient = runtime.fhir.read("Patient", patient_id)
        row = patient_row(write.result, patient, runtime.knowledge, f"Patient/{patient_id}")
        outcome = {"state": "done", "status": write.status, "row": row.to_json()}
    except FhirDmError as exc:
        outcome = {"state": "failed", "error": type(exc).__name__, "message": exc.message}
    except Exception as exc:  # one patient never stops the run; no trace (it may quote data)
        outcome = {"state": "failed", "error": type(exc).__name__, "message": "unexpected error"}
    jobs.huey.storage.put_data(record_key(run_id, patient_id), json.dumps(outcome).encode())


def _read(raw: object) -> Json | None:
    if not isinstance(raw, bytes | bytearray | memoryview):
        return None
    try:
        data = json.loads(bytes(raw).decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


@dataclass(frozen=True, slots=True)
class QueuedRun:
    """One run on the queue: submit its patients, read their outcomes, forget them."""

    jobs: Jobs
    run_id: str

    def __post_init__(self) -> None:
        StateFile.check_run_id(self.run_id)

    def submit(self, patient_ids: Iterable[str], *, now: date, preview: bool) -> int:
        """Enqueue each patient with no record, or a failed one; how many were enqueued."""
        storage = self.jobs.huey.storage
        count = 0
        for patient_id in patient_ids:
            key = record_key(self.run_id, patient_id)
            if not storage.put_if_empty(key, QUEUED):
                record = _read(storage.peek_data(key))
                if record is None or record.get("state") != "failed":
                    continue  # queued or done already
                storage.put_data(key, QUEUED)
            self.jobs.task(POPULATION_TASK)(self.run_id, patient_id, now.isoformat(), preview)
            count += 1
        return count

    def outcome(self, patient_id: str) -> Done | Failure | None:
        """The patient's outcome, or None while it is queued (or was never submitted)."""
        record = _read(self.jobs.huey.storage.peek_data(record_key(self.run_id, patient_id)))
        if record is None:
            return None
        if record.get("state") == "done":
            try:
                row = PatientRow.from_json(record["row"])
            except (KeyError, TypeError, ValueError):
                return Failure(patient_id, "ValueError", "unreadable task result")
            return Done(patient_id, str(record.get("status", "")), row)
        if record.get("state") == "failed":
            return Failure(patient_id, str(record.get("error", "")), str(record.get("message", "")))
        return None

    def forget(self, patient_ids: Iterable[str]) -> None:
        """Drop the run's records (the caller's state file keeps what finished)."""
        storage = self.jobs.huey.storage
        for patient_id in patient_ids:
            storage.delete_data(record_key(self.run_id, patient_id))
        storage.delete_data(manifest_key(self.run_id))

    # -- a run submitted by the service, read back by its status endpoint ----------------------

    def save_manifest(self, patient_ids: Sequence[str], *, now: date, preview: bool) -> None:
        manifest = {"patients": list(patient_ids), "now": now.isoformat(), "preview": preview}
        self.jobs.huey.storage.put_data(manifest_key(self.run_id), json.dumps(manifest).encode())

    def status(self) -> RunResult | None:
        """What the run has finished so far (failures listed); None for an unknown run."""
        manifest = _read(self.jobs.huey.storage.peek_data(manifest_key(self.run_id)))
        if manifest is None or not isinstance(manifest.get("patients"), list):
            return None
        patients = [str(p) for p in manifest["patients"]]
        result = RunResult(self.run_id, len(patients))
        for patient_id in patients:
            item = self.outcome(patient_id)
            if isinstance(item, Done):
                result.done.append(item)
            elif isinstance(item, Failure):
                result.failures.append(item)
        return result


def run_queued(
    queued: QueuedRun,
    patient_ids: Sequence[str],
    *,
    now: date,
    preview: bool,
    state: StateFile | None = None,
    progress_stream: TextIO = sys.stderr,
    poll_seconds: float = POLL_SECONDS,
    sleep: Callable[[float], None] = time.sleep,
) -> RunResult:
    """Submit the patients not in `state`, wait for every outcome, record and summarise.

    KeyboardInterrupt stops the waiting only: the tasks stay queued and finish; starting the
    run again with the same id picks up their outcomes and enqueues nothing twice.
    """
    earlier = state.load() if state is not None else {}
    todo = [p for p in patient_ids if p not in earlier]
    result = RunResult(queued.run_id, len(patient_ids))
    result.done.extend(earlier[p] for p in patient_ids if p in earlier)
    result.skipped = len(result.done)
    started = time.monotonic()
    queued.submit(todo, now=now, preview=preview)
    label = "preview (queue)" if preview else "assess and write back (queue)"
    progress = Progress(len(todo), progress_stream, label=label)
    outstanding = list(todo)
    try:
        while outstanding:
            waiting: list[str] = []
            for patient_id in outstanding:
                item = queued.outcome(patient_id)
                if item is None:
                    waiting.append(patient_id)
                elif isinstance(item, Failure):
                    result.failures.append(item)
                    progress.advance(failed=True)
                else:
                    result.done.append(item)
                    if state is not None:
                        state.append(item)
                    progress.advance(failed=False)
            outstanding = waiting
            if outstanding:
                sleep(poll_seconds)
    finally:
        progress.close()
        result.seconds = time.monotonic() - started
    queued.forget(todo)
    return result
