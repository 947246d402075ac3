"""`fhir-dm population run | worklist | measure`: the population view on the command line."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from fhir_dm import __version__
from fhir_dm.common.errors import FhirDmError, InputError
from fhir_dm.fhir.client import FhirClient
from fhir_dm.fhir.terminology import engine_for
from fhir_dm.knowledge.load import load_knowledge
from fhir_dm.knowledge.models import Knowledge
from fhir_dm.population.config import PopulationConfig, load_population_config
from fhir_dm.population.finder import find_iim_patients, iim_search_tokens, unexpanded_prefixes
from fhir_dm.population.measures import measure_report
from fhir_dm.population.run import (
    PopulationRunner,
    RunResult,
    StateFile,
    new_run_id,
    summary_table,
)
from fhir_dm.population.worklist import to_csv, to_fhir_list, worklist
from fhir_dm.writeback.locks import PatientLocks

DEFAULT_STATE_DIR = Path(".fhir-dm-population")
DEFAULT_WORKERS = 4
# The finding search pages through every IIM Condition: large pages, and enough of them.
FINDER_PAGE_SIZE = 1000
FINDER_MAX_PAGES = 10_000


def _date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def _workers(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= 64:
        raise argparse.ArgumentTypeError("workers must be a whole number from 1 to 64")
    return n


def add_parser(sub: Any) -> None:
    """Add `population` and its commands to the CLI's sub-parsers."""
    pop = sub.add_parser(
        "population",
        help="every IIM patient of a FHIR server: run, worklist, measures",
        description="The population view (clinical-logic §11). Patients are found with one"
        " search of the IIM Conditions (their subjects only), never a scan of all patients.",
    )
    cmds = pop.add_subparsers(dest="population_command", metavar="COMMAND", required=True)
    run = cmds.add_parser(
        "run",
        help="assess and write back (or --preview) every IIM patient; resumable",
        description="Assess every patient with an IIM Condition and write back each plan"
        " revision (or only preview). A run is resumable: start it again with the same"
        " --run-id and patients it already finished are skipped. Exit 1 when a patient failed.",
    )
    run.add_argument("--preview", action="store_true", help="write nothing; show what would be")
    run.add_argument("--run-id", default=None, help="resume this run (default: a new run)")
    run.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        metavar="DIR",
        help=f"where runs record finished patients (default {DEFAULT_STATE_DIR})",
    )
    work = cmds.add_parser(
        "worklist",
        help="overdue and soon-due items, most overdue first (CSV; --fhir-list for a List)",
        description="Preview-assess every IIM patient (nothing is written) and print the"
        " overdue and soon-due items as CSV, most overdue first.",
    )
    work.add_argument("--fhir-list", type=Path, default=None, metavar="FILE", help="write List")
    measure = cmds.add_parser(
        "measure",
        help="evaluate the §11 measures for a period: a Bundle of MeasureReports",
        description="Preview-assess every IIM patient on the period's last day (nothing is"
        " written) and print a collection Bundle with one MeasureReport per measure,"
        " stratified by tier, managing organisation and general practitioner.",
    )
    measure.add_argument("--start", type=_date, required=True, help="period start YYYY-MM-DD")
    measure.add_argument("--end", type=_date, required=True, help="period end YYYY-MM-DD")
    measure.add_argument(
        "--subject-list", action="store_true", help="list the patients of each population"
    )
    run.add_argument(
        "--queue",
        action="store_true",
        help="one task per patient on the job queue (settings jobs.*), shared by every"
        " `fhir-dm worker`; the FHIR server is the service's (settings fhir.*)",
    )
    for cmd in (run, work, measure):
        cmd.add_argument(
            "--server",
            required=cmd is not run,
            metavar="URL",
            help="FHIR server base URL" + (" (not with --queue)" if cmd is run else ""),
        )
        cmd.add_argument(
            "--workers",
            type=_workers,
            default=DEFAULT_WORKERS,
            metavar="N",
            help=f"patients assessed at once (default {DEFAULT_WORKERS})",
        )
        if cmd is not measure:
            cmd.add_argument(
                "--now", type=_date, default=None, help="evaluation date (default: today)"
            )


@dataclass(frozen=True, slots=True)
class _Setup:
    knowledge: Knowledge
    population: PopulationConfig
    runner: PopulationRunner
    patient_ids: list[str]


def _setup(args: argparse.Namespace, config: Path | None, lock_dir: Path) -> _Setup:
    if not args.server.startswith(("http://", "https://")):
        raise InputError("--server must be an absolute http(s) URL")
    if getattr(args, "run_id", None) is not None:
        StateFile.check_run_id(args.run_id)
    knowledge = load_knowledge(config)
    population = load_population_config(knowledge, config)
    engine = engine_for(knowledge, None, software_version=__version__)
    for prefix in unexpanded_prefixes(knowledge, population.finder):
        sys.stderr.write(f"note: only the code itself is searched for {prefix}\n")
    tokens = iim_search_tokens(knowledge, population.finder)
    with FhirClient(args.server, page_size=FINDER_PAGE_SIZE, max_pages=FINDER_MAX_PAGES) as finder:
        patient_ids = find_iim_patients(finder, tokens)
    runner = PopulationRunner(
        lambda: FhirClient(args.server), engine, knowledge, PatientLocks(lock_dir)
    )
    return _Setup(knowledge, population, runner, patient_ids)


def _today() -> date:
    return datetime.now(UTC).date()


def _failures(result: RunResult) -> None:
    for f in result.failures:
        sys.stdout.write(f"failed: Patient/{f.patient_id}: {f.error}: {f.message}\n")


def _run(args: argparse.Namespace, config: Path | None) -> int:
    from rich.console import Console

    if args.queue:
        return _run_queued(args, config)
    if args.server is None:
        raise InputError("--server is required (or --queue, to use the service's server)")
    run_id = args.run_id or new_run_id()
    setup = _setup(args, config, args.state_dir / "locks")
    state = StateFile(args.state_dir, run_id)
    sys.stderr.write(f"run {run_id}: {len(setup.patient_ids)} patient(s) with an IIM Condition\n")
    try:
        result = setup.runner.run(
            setup.patient_ids,
            now=args.now or _today(),
            preview=args.preview,
            workers=args.workers,
            run_id=run_id,
            state=state,
        )
    except KeyboardInterrupt:
        sys.stderr.write(f"interrupted; resume with: --run-id {run_id}\n")
        return 130
    Console(file=sys.stdout).print(summary_table(result, preview=args.preview))
    _failures(result)
    return 1 if result.failures else 0


def _run_queued(args: argparse.Namespace, config: Path | None) -> int:
    """The run on the job queue: enqueue, wait for the workers' outcomes, summarise."""
    from rich.console import Console

    from fhir_dm.fhir.client import client_from_config
    from fhir_dm.population.queued import QueuedRun, run_queued
    from fhir_dm.web.jobs import open_jobs

    run_id = args.run_id or new_run_id()
    StateFile.check_run_id(run_id)
    jobs, settings = open_jobs(config)
    base = settings.fhir.base_url.rstrip("/")
    if args.server is not None and args.server.rstrip("/") != base:
        raise InputError("with --queue the workers use the service's FHIR server; omit --server")
    knowledge = load_knowledge(settings.config_dir)
    population = load_population_config(knowledge, config)
    tokens = iim_search_tokens(knowledge, population.finder)
    with client_from_config(settings.fhir) as finder:
        patient_ids = find_iim_patients(finder, tokens)
    state = StateFile(args.state_dir, run_id)
    sys.stderr.write(
        f"run {run_id}: {len(patient_ids)} patient(s) with an IIM Condition; queued for"
        f" `fhir-dm worker` ({jobs.settings.backend} queue)\n"
    )
    try:
        result = run_queued(
            QueuedRun(jobs, run_id),
            patient_ids,
            now=args.now or _today(),
            preview=args.preview,
            state=state,
        )
    except KeyboardInterrupt:
        sys.stderr.write(f"stopped waiting; the tasks stay queued. Resume: --run-id {run_id}\n")
        return 130
    finally:
        jobs.close()
    Console(file=sys.stdout).print(summary_table(result, preview=args.preview))
    _failures(result)
    return 1 if result.failures else 0


def _survey(args: argparse.Namespace, config: Path | None, now: date) -> tuple[_Setup, RunResult]:
    """Preview-assess every IIM patient (nothing written, no state kept)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fhir-dm-locks-") as lock_dir:
        setup = _setup(args, config, Path(lock_dir))
        result = setup.runner.run(
            setup.patient_ids, now=now, preview=True, workers=args.workers, run_id="survey"
        )
    return setup, result


def _worklist(args: argparse.Namespace, config: Path | None) -> int:
    now = args.now or _today()
    setup, result = _survey(args, config, now)
    items = worklist(result.rows, now, setup.population.worklist.soon_due_days)
    sys.stdout.write(to_csv(items))
    if args.fhir_list is not None:
        args.fhir_list.write_text(
            json.dumps(to_fhir_list(items, now), indent=2) + "\n", encoding="utf-8"
        )
    _failures(result)
    return 1 if result.failures else 0


def _measure(args: argparse.Namespace, config: Path | None) -> int:
    if args.end < args.start:
        raise InputError("--end is before --start")
    setup, result = _survey(args, config, args.end)
    reports = [
        measure_report(
            setup.knowledge,
            m,
            result.rows,
            (args.start, args.end),
            subject_list=args.subject_list,
        )
        for m in setup.population.measures
    ]
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": r} for r in reports],
    }
    sys.stdout.write(json.dumps(bundle, indent=2, ensure_ascii=False) + "\n")
    for f in result.failures:
        sys.stderr.write(f"failed: Patient/{f.patient_id}: {f.error}: {f.message}\n")
    return 1 if result.failures else 0


def main(args: argparse.Namespace, config: Path | None) -> int:
    """Run one population command; FhirDmError reaches the CLI's usual handling."""
    command = args.population_command
    if command == "run":
        return _run(args, config)
    if command == "worklist":
        return _worklist(args, config)
    if command == "measure":
        return _measure(args, config)
    raise FhirDmError(f"unknown population command {command!r}")
