"""Command line: assess FHIR bundle files with no server (`fhir-dm assess`, `fhir-dm explain`).

Contract other tools rely on: `assess FILE...` prints the result transaction Bundle as JSON
(one FILE, no --out) or writes `<name>.result.json` files into --out; exit 0 on success, 1 on
bad input (one line on stderr), 2 on a bad configuration.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, TextIO

from fhir_dm import __version__
from fhir_dm.core.assess import AssessmentRun, Engine, PatientResult
from fhir_dm.errors import FhirDmError, InputError, KnowledgeError, NotJsonError
from fhir_dm.knowledge.load import load_knowledge

EXIT_OK = 0
EXIT_INPUT = 1
EXIT_CONFIG = 2


def _date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fhir-dm", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"fhir-dm {__version__}")
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="configuration directory (default: bundled config/)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("assess", "print or write the result transaction Bundle"),
        ("explain", "print a readable summary per patient: tier, why, what is proposed, when"),
    ):
        cmd = sub.add_parser(name, help=text, description=text)
        cmd.add_argument(
            "files",
            nargs="+",
            type=Path,
            metavar="FILE",
            help="FHIR JSON (a Bundle of any type, or a Patient)",
        )
        cmd.add_argument(
            "--now", type=_date, default=None, help="evaluation date YYYY-MM-DD (default: today)"
        )
        cmd.add_argument(
            "--validate-output",
            action="store_true",
            help="validate every generated resource against its FHIR R4B model (slower)",
        )
        if name == "assess":
            cmd.add_argument(
                "--out", type=Path, default=None, help="write <name>.result.json files here"
            )
    return parser


def read_json_file(path: Path) -> Any:
    """Read one input file; raise InputError subclasses with a one-line reason."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = (
            exc.strerror
            if isinstance(exc, OSError) and exc.strerror
            else "not readable as UTF-8 text"
        )
        raise InputError(f"{path}: cannot read: {reason}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise NotJsonError(
            f"{path}: not JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from None


def _dump(data: Any, stream: TextIO) -> None:
    json.dump(data, stream, indent=2, ensure_ascii=False)
    stream.write("\n")


def render_summary(result: PatientResult) -> str:
    """The human-readable summary of one patient's result."""
    e = result.explanation
    lines = [
        f"Patient {result.patient_reference}: {e.headline}",
        f"  Rule set: {e.ruleset}",
        f"  Onset: {e.onset}",
    ]
    lines += [f"  ! {n}" for n in e.notices]
    if e.reasons:
        lines.append("  Why:")
        lines += [f"    - {r}" for r in e.reasons]
    if e.schedule:
        lines.append(f"  Proposed ({len(result.service_requests)} service requests):")
        for row in e.schedule:
            consider = f"CONSIDER ({row.condition}) " if row.consider else ""
            overdue = " OVERDUE" if row.overdue else ""
            lines.append(
                f"    {row.round_label:<14} {row.due_start} to {row.due_end}{overdue}"
                f"  {consider}{row.test}"
            )
    else:
        lines.append("  Proposed: nothing.")
    if e.unknown_facts:
        lines.append("  Not recorded (unknown, not negative): " + ", ".join(e.unknown_facts))
    lines += [f"  Input not used: {f}" for f in e.findings]
    return "\n".join(lines)


def _run(args: argparse.Namespace, engine: Engine) -> int:
    now = args.now or datetime.now(UTC).date()
    runs: list[tuple[Path, AssessmentRun]] = []
    for path in args.files:
        try:
            runs.append((path, engine.assess(read_json_file(path), now=now)))
        except FhirDmError as exc:
            if exc.message.startswith(str(path)):
                raise
            raise type(exc)(f"{path}: {exc.message}", expression=exc.expression) from None
    if args.command == "explain":
        sys.stdout.write(
            "\n\n".join(render_summary(r) for _, run in runs for r in run.results) + "\n"
        )
        return EXIT_OK
    if args.out is None and len(runs) == 1:
        _dump(runs[0][1].bundle(), sys.stdout)
        return EXIT_OK
    out_dir = args.out or Path()
    out_dir.mkdir(parents=True, exist_ok=True)
    for path, run in runs:
        target = out_dir / f"{path.stem}.result.json"
        with target.open("w", encoding="utf-8") as stream:
            _dump(run.bundle(), stream)
        sys.stderr.write(f"{path}: {len(run.results)} patient(s) -> {target}\n")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit code (never raises for expected failures)."""
    args = _parser().parse_args(argv)
    try:
        knowledge = load_knowledge(args.config)
    except KnowledgeError as exc:
        sys.stderr.write(f"fhir-dm: configuration error: {exc.message}\n")
        return EXIT_CONFIG
    try:
        engine = Engine(
            knowledge, software_version=__version__, validate_output=args.validate_output
        )
        return _run(args, engine)
    except FhirDmError as exc:
        sys.stderr.write(f"fhir-dm: {exc.message}\n")
        return EXIT_INPUT


def main_cli() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    main_cli()
