"""A population run: assess and write back (or preview) every IIM patient of a FHIR server.

Bounded concurrency (a thread pool, one FHIR client per thread), progress on stderr (a bar on
a terminal, plain lines otherwise), resumable (each finished patient is appended to the run's
state file `<state dir>/<run id>.jsonl`; a run started again with the same id skips them), and
a failure of one patient never stops the run: it is listed at the end and not recorded as
done, so a resumed run tries it again. Per patient it calls only the write-back's public
`WriteBack.assess_patient`, plus one read of the Patient for its responsible organisation and
practitioner.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, TextIO

from fhir_dm.common.errors import FhirDmError
from fhir_dm.core.assess import Engine
from fhir_dm.fhir.client import FhirClient
from fhir_dm.knowledge.models import Knowledge
from fhir_dm.population.rows import PatientRow, patient_row
from fhir_dm.writeback.locks import PatientLocks
from fhir_dm.writeback.writer import WriteBack

RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
PLAIN_PROGRESS_SECONDS = 10.0
NO_TIER = "none"
UNKNOWN_TIER = "unknown"


def new_run_id() -> str:
    """A run id that sorts by start time and is unique enough for one site's runs."""
    return time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


@dataclass(frozen=True, slots=True)
class Done:
    """One patient finished: how (written / unchanged / preview) and its row."""

    patient_id: str
    status: str
    row: PatientRow


@dataclass(frozen=True, slots=True)
class Failure:
    patient_id: str
    error: str
    message: str


@dataclass
class RunResult:
    run_id: str
    total: int
    done: list[Done] = field(default_factory=list)
    skipped: int = 0  # finished by an earlier, interrupted attempt of this run
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rows(self) -> list[PatientRow]:
        return [d.row for d in self.done]

    def by_tier(self) -> dict[str, dict[str, int]]:
        """Per tier: patients, written (or would be, in a preview), unchanged, failed."""
        table: dict[str, dict[str, int]] = {}

        def bump(tier: str, column: str) -> None:
            counts = table.setdefault(
                tier, {"patients": 0, "written": 0, "unchanged": 0, "failed": 0}
            )
            counts["patients"] += 1
            if column:
                counts[column] += 1

        for d in self.done:
            tier = d.row.tier or NO_TIER
            bump(tier, "unchanged" if d.status == "unchanged" else "written")
        for _ in self.failures:
            bump(UNKNOWN_TIER, "failed")
        return table


class StateFile:
    """The patients a run has finished, one JSON line each (append-only, flushed per line)."""

    def __init__(self, directory: Path, run_id: str) -> None:
        self.check_run_id(run_id)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = directory / f"{run_id}.jsonl"
        self._lock = threading.Lock()

    @staticmethod
    def check_run_id(run_id: str) -> None:
        """A run id names a file: refuse anything that could be a path."""
        if not RUN_ID.fullmatch(run_id):
            raise FhirDmError("a run id is letters, digits, '.', '_' or '-' (at most 64)")

    def load(self) -> dict[str, Done]:
        """What earlier attempts finished (a torn last line from a kill is ignored)."""
        done: dict[str, Done] = {}
        if not self.path.is_file():
            return done
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                data = json.loads(line)
                item = Done(data["patient_id"], data["status"], PatientRow.from_json(data["row"]))
            except (ValueError, KeyError, TypeError):
                continue
            done[item.patient_id] = item
        return done

    def append(self, item: Done) -> None:
        line = json.dumps(
            {"patient_id": item.patient_id, "status": item.status, "row": item.row.to_json()}
        )
        with self._lock, self.path.open("a", encoding="utf-8") as stream:
            stream.write(line + "\n")
            stream.flush()


class Progress:
    """Progress on a stream: a rich bar on a terminal, a plain line every few seconds otherwise."""

    def __init__(self, total: int, stream: TextIO, *, label: str) -> None:
        self._total = total
        self._stream = stream
        self._done = 0
        self._errors = 0
        self._started = time.monotonic()
        self._last = self._started
        self._bar: Any = None
        if stream.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeRemainingColumn,
            )
            from rich.progress import (
                Progress as RichProgress,
            )

            self._bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]:.1f}/s  errors {task.fields[errors]}"),
                TimeRemainingColumn(),
                console=Console(file=stream),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(label, total=total, rate=0.0, errors=0)
        else:
            stream.write(f"{label}: {total} patient(s)\n")

    def advance(self, *, failed: bool) -> None:
        self._done += 1
        self._errors += int(failed)
        now = time.monotonic()
        rate = self._done / max(now - self._started, 1e-9)
        if self._bar is not None:
            self._bar.update(self._task, advance=1, rate=rate, errors=self._errors)
        elif now - self._last >= PLAIN_PROGRESS_SECONDS or self._done == self._total:
            self._last = now
            left = (self._total - self._done) / rate if rate else 0.0
            self._stream.write(
                f"{self._done}/{self._total} patients, {rate:.1f}/s, {self._errors} error(s),"
                f" about {left:.0f} s left\n"
            )
            self._stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


class PopulationRunner:
    """Assesses a list of patients with a bounded thread pool; see the module docstring."""

    def __init__(
        self,
        client_factory: Callable[[], FhirClient],
        engine: Engine,
        knowledge: Knowledge,
        locks: PatientLocks,
    ) -> None:
        self._client_factory = client_factory
        self._engine = engine
        self._knowledge = knowledge
        self._locks = locks
        self._local = threading.local()
        self._clients: list[FhirClient] = []
        self._clients_lock = threading.Lock()

    def _client(self) -> FhirClient:
        client: FhirClient | None = getattr(self._local, "client", None)
        if client is None:
            client = self._client_factory()
            self._local.client = client
            with self._clients_lock:
                self._clients.append(client)
        return client

    def assess_one(self, patient_id: str, *, now: date, preview: bool) -> Done:
        """Assess and write back (or preview) one patient; its row for the worklist/measures."""
        client = self._client()
        write = WriteBack(client, self._engine, self._locks).assess_patient(
            patient_id, now=now, preview=preview
        )
        patient = client.read("Patient", patient_id)
        row = patient_row(write.result, patient, self._knowledge, f"Patient/{patient_id}")
        return Done(patient_id, write.status, row)

    def run(
        self,
        patient_ids: Sequence[str],
        *,
        now: date,
        preview: bool,
        workers: int,
        run_id: str,
        state: StateFile | None = None,
        progress_stream: TextIO = sys.stderr,
        on_done: Callable[[Done], None] | None = None,
    ) -> RunResult:
        """Every patient once (those in `state` skipped); KeyboardInterrupt stops it cleanly."""
        earlier = state.load() if state is not None else {}
        todo = [p for p in patient_ids if p not in earlier]
        result = RunResult(run_id, len(patient_ids))
        result.done.extend(earlier[p] for p in patient_ids if p in earlier)
        result.skipped = len(result.done)
        label = "preview" if preview else "assess and write back"
        progress = Progress(len(todo), progress_stream, label=label)
        started = time.monotonic()
        try:
            with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
                self._drive(pool, todo, now, preview, workers, result, state, progress, on_done)
        finally:
            progress.close()
            result.seconds = time.monotonic() - started
            self.close()
        return result

    def _drive(
        self,
        pool: ThreadPoolExecutor,
        todo: Iterable[str],
        now: date,
        preview: bool,
        workers: int,
        result: RunResult,
        state: StateFile | None,
        progress: Progress,
        on_done: Callable[[Done], None] | None,
    ) -> None:
        """Keep at most 2 x workers patients in flight, so memory stays flat on any size."""
        pending: dict[Future[Done], str] = {}
        queue = iter(todo)
        try:
            while True:
                while len(pending) < 2 * max(1, workers):
                    patient_id = next(queue, None)
                    if patient_id is None:
                        break
                    future = pool.submit(self.assess_one, patient_id, now=now, preview=preview)
                    pending[future] = patient_id
                if not pending:
                    return
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    patient_id = pending.pop(future)
                    try:
                        item = future.result()
                    except FhirDmError as exc:
                        result.failures.append(Failure(patient_id, type(exc).__name__, exc.message))
                        progress.advance(failed=True)
                        continue
                    except Exception as exc:  # one patient never stops the run
                        result.failures.append(
                            Failure(patient_id, type(exc).__name__, "unexpected error")
                        )
                        progress.advance(failed=True)
                        continue
                    result.done.append(item)
                    if state is not None:
                        state.append(item)
                    progress.advance(failed=False)
                    if on_done is not None:
                        on_done(item)
        except BaseException:
            # Patients not started are dropped; those in flight finish (a write is never cut
            # in half) and are recorded, so a resumed run does not assess them again.
            started = [future for future in pending if not future.cancel()]
            for future in started:
                try:
                    item = future.result()
                except Exception:  # noqa: S112 - its failure is retried when the run resumes
                    continue
                result.done.append(item)
                if state is not None:
                    state.append(item)
            raise

    def close(self) -> None:
        with self._clients_lock:
            for client in self._clients:
                client.close()
            self._clients.clear()
        self._local = threading.local()


def summary_table(result: RunResult, *, preview: bool) -> Any:
    """The end-of-run table (rich): per tier, patients, written, unchanged, failed."""
    from rich.table import Table

    title = f"Run {result.run_id}: {result.total} patient(s) in {result.seconds:.1f} s"
    if result.skipped:
        title += f" ({result.skipped} done before the interruption)"
    table = Table(title=title)
    table.add_column("tier")
    for column in ("patients", "would write" if preview else "written", "unchanged", "failed"):
        table.add_column(column, justify="right")
    totals = {"patients": 0, "written": 0, "unchanged": 0, "failed": 0}
    by_tier = result.by_tier()
    order = {lvl: n for n, lvl in enumerate(("high", "moderate", "standard", NO_TIER))}
    for tier in sorted(by_tier, key=lambda t: (order.get(t, 9), t)):
        counts = by_tier[tier]
        table.add_row(tier, *(str(counts[c]) for c in totals))
        for c in totals:
            totals[c] += counts[c]
    table.add_row("all", *(str(totals[c]) for c in totals), style="bold")
    return table
