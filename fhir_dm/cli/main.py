"""fhir-dm: IIM cancer-risk tiers and screening plans (IMACS 2023), as FHIR R4.

One command line for everything a user runs: `assess` / `explain` bundle files with no server,
`serve` the web service (gunicorn), `worker` the re-assessment queue, `subscriptions` on the FHIR
server, `dead-letters` of the queue, `demo` the whole service against a FHIR server.
Contract other tools rely on: `assess FILE...` prints the result transaction Bundle as JSON
(one FILE, no --out) or writes `<name>.result.json` files into --out; exit 0 on success, 1 on
bad input (one line on stderr), 2 on a usage error (argparse), 78 (EX_CONFIG of sysexits.h) on a
bad configuration, settings or FHIR server, one line per problem. The Bundle carries the
input resources it refers to (unless --result-only), so it posts as it is on an empty server;
what it refers to that the input does not hold is said on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from collections.abc import Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, TextIO

from pydantic import ValidationError

from fhir_dm import __version__
from fhir_dm.common.errors import (
    FhirBaseUnreachableError,
    FhirDmError,
    InputError,
    KnowledgeError,
    NotJsonError,
)
from fhir_dm.core.assess import AssessmentRun, Engine, PatientResult
from fhir_dm.core.build.bundle import full_url_for
from fhir_dm.core.inputs import normalise_reference
from fhir_dm.fhir.config import FhirServerConfig
from fhir_dm.fhir.terminology import TerminologyServerConfig, engine_for
from fhir_dm.knowledge.load import CONFIG_DIR_VARIABLE, load_knowledge

EXIT_OK = 0
EXIT_INPUT = 1
# argparse's own code for a bad command line; kept apart from configuration problems so that a
# script can tell "I called it wrong" from "the deployment is wrong".
EXIT_USAGE = 2
# sysexits.h EX_CONFIG: the knowledge base, a FHIR_DM_* setting or the FHIR server is unusable.
EXIT_CONFIG = 78
# The same variable the web service reads (settings `terminology.base_url`).
TERMINOLOGY_VARIABLE = "FHIR_DM_TERMINOLOGY__BASE_URL"
WSGI_APP = "fhir_dm.web.wsgi:app"
# `fhir-dm subscriptions --wait` default (fhir_dm.events.subscriptions.ACTIVATION_WAIT_SECONDS, kept
# here so that --help needs no FHIR client import; a test keeps them equal).
SUBSCRIPTION_WAIT_SECONDS = 30.0
# The service's gunicorn settings (workers, timeouts, limits, log redaction); options given to
# `fhir-dm serve` win over them. Its bind and workers, for --help (a test keeps them equal).
GUNICORN_CONFIG_MODULE = "fhir_dm.web.gunicorn_conf"
DEFAULT_BIND = "127.0.0.1:8080"
DEFAULT_WORKERS = 2
EPILOG = """examples:
  fhir-dm explain examples/seed-case-tif1g.json --now 2015-10-25
  fhir-dm assess patient.json > result.json
  FHIR_DM_FHIR__BASE_URL=http://127.0.0.1:8090/fhir FHIR_DM_TRUST__MODE=off fhir-dm serve
  fhir-dm worker --workers 4
  fhir-dm demo
  fhir-dm population run --server http://127.0.0.1:8090/fhir --preview
"""


def _date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fhir-dm",
        description=__doc__.splitlines()[0].removeprefix("fhir-dm: "),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version",
        action="store_true",
        help="print the package version and the loaded rule set's name and version",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"knowledge base directory (default: ${CONFIG_DIR_VARIABLE}, else the bundled one)",
    )
    sub = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    for name, text in (
        ("assess", "print or write the result transaction Bundle of each FILE (no server)"),
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
        cmd.add_argument(
            "--terminology-server",
            default=os.environ.get(TERMINOLOGY_VARIABLE) or None,
            metavar="URL",
            help="FHIR terminology server base URL for codes the offline value sets miss"
            f" ($subsumes/$expand; default: ${TERMINOLOGY_VARIABLE}, else none)",
        )
        if name == "assess":
            cmd.add_argument(
                "--out", type=Path, default=None, help="write <name>.result.json files here"
            )
            cmd.add_argument(
                "--result-only",
                action="store_true",
                help="leave out the input resources the result refers to (for posting to the"
                " server the input came from, which holds them)",
            )
    serve = sub.add_parser(
        "serve",
        help="run the web service under gunicorn (settings: FHIR_DM_* variables)",
        description="Run the web service under gunicorn. Settings come from FHIR_DM_* variables"
        " or the file named by FHIR_DM_SETTINGS_FILE (docs/settings.md); they are checked"
        " before gunicorn starts. Options after -- go to gunicorn unchanged.",
    )
    serve.add_argument(
        "--bind", default=None, metavar="HOST:PORT", help=f"listen address (default {DEFAULT_BIND})"
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help=f"worker processes (default {DEFAULT_WORKERS})",
    )
    serve.add_argument("gunicorn_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    worker = sub.add_parser(
        "worker",
        help="run the re-assessment queue's workers and daily sweep (settings: jobs.*)",
        description="Run Huey consumers for the re-assessment queue: each notified patient is"
        " re-assessed and its plan written back; once a day every patient with an active plan"
        " is swept. Settings as for serve (FHIR_DM_* variables, FHIR_DM_SETTINGS_FILE); the"
        " queue is jobs.* (embedded SQLite by default, or Redis for several hosts).",
    )
    worker.add_argument(
        "--workers", type=int, default=None, metavar="N", help="worker count (default jobs.workers)"
    )
    worker.add_argument(
        "--worker-type",
        choices=("process", "thread"),
        default=None,
        help="worker processes or threads (default jobs.worker_type)",
    )
    dead = sub.add_parser(
        "dead-letters",
        help="list the re-assessments that kept failing (JSON lines), or ask for them again",
        description="Print one JSON line per failed re-assessment: task id, patient, error"
        " class and message, attempts, time. --requeue asks for each patient again and drops"
        " its record.",
    )
    dead.add_argument("--requeue", action="store_true", help="enqueue each patient again")
    subs = sub.add_parser(
        "subscriptions",
        help="create or update fhir-dm's Subscriptions on the FHIR server (idempotent)",
        description="Make the FHIR server hold one rest-hook Subscription per resource type"
        " the rules read, calling <jobs.notification_base_url or public_base_url>/notifications"
        "/<type> with its own secret header, then check that the server activated each (exit 78"
        " naming those it did not). Re-running changes nothing when all are in place.",
    )
    subs.add_argument(
        "--sweep", action="store_true", help="also enqueue every patient with an active plan now"
    )
    subs.add_argument(
        "--wait",
        type=float,
        default=SUBSCRIPTION_WAIT_SECONDS,
        metavar="SECONDS",
        help="how long to wait for the server to activate them (default 30); exit 78 if not",
    )
    demo = sub.add_parser(
        "demo",
        help="load synthetic patients into a FHIR server, assess and write back, twice",
        description="Load six synthetic patients into a FHIR server, assess each through the"
        " service and write the plans back, then run again to show that nothing changes, and"
        " print the clinician app's link for each patient, served until Ctrl-C."
        " Without --fhir-base-url it builds and starts a local HAPI FHIR server with Maven"
        " (a clone of the repository, a JDK 17+ and Maven needed).",
    )
    demo.add_argument(
        "--fhir-base-url", default=None, metavar="URL", help="use this FHIR server instead"
    )
    demo.add_argument(
        "--keep-running",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep the service (and its app) and the local HAPI running until Ctrl-C, so the"
        " printed links work (default); --no-keep-running ends at once, for scripts",
    )
    from fhir_dm.cli.population import add_parser as add_population_parser

    add_population_parser(sub)
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
        *(f"  Date used: {d}" for d in e.dates),
    ]
    lines += [f"  ! {n}" for n in e.notices]
    if e.reasons:
        lines.append("  Why:")
        lines += [f"    - {r}" for r in e.reasons]
    if e.evidence:
        lines.append("  Evidence (rule; level; sources):")
        lines += [f"    - {r}" for r in e.evidence]
    if e.schedule:
        lines.append(
            f"  {e.counts_line()}; care-plan activities are later rounds, 'consider' items,"
            " tests done or missed, and examinations:"
        )
        for row in e.attention_first():
            consider = f"CONSIDER ({row.condition}) " if row.consider else ""
            status = row.status.upper() if row.status == "overdue" else row.status
            done = f" by {row.evidence}" if row.evidence else ""
            note = f" ({row.note})" if row.note else ""
            lines.append(
                f"    {row.round_label:<14} {row.due_start} to {row.due_end} {status}{done}"
                f"  {consider}{row.test}{note}"
            )
    else:
        lines.append("  " + e.counts_line())
    lines += [f"  Not done, missed: {s}" for s in e.missed]
    if e.unknown_facts:
        lines.append("  Not recorded (unknown, not negative): " + ", ".join(e.unknown_facts))
    lines += [f"  Input not used: {f}" for f in e.findings]
    return "\n".join(lines)


# How many of the references a result Bundle cannot carry the CLI names on stderr.
SHOWN_MISSING = 3


def _references(data: Any) -> list[str]:
    """Every `reference` string in a resource (nested), in order."""
    found: list[str] = []
    todo = [data]
    while todo:
        item = todo.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if key == "reference" and isinstance(value, str):
                    found.append(value)
                elif isinstance(value, dict | list):
                    todo.append(value)
        elif isinstance(item, list):
            todo.extend(item)
    return found


def _input_entries(data: Any) -> list[tuple[dict[str, Any], str | None]]:
    """(resource, fullUrl) of every input resource (a Bundle's entries, or the one resource)."""
    if data.get("resourceType") != "Bundle":
        return [(data, None)]
    return [
        (e["resource"], e.get("fullUrl") if isinstance(e.get("fullUrl"), str) else None)
        for e in data.get("entry") or []
        if isinstance(e, dict) and isinstance(e.get("resource"), dict)
    ]


def _keys(resource: dict[str, Any], full_url: str | None) -> list[str]:
    keys = [normalise_reference(full_url)] if full_url else []
    if resource.get("id"):
        keys.append(f"{resource['resourceType']}/{resource['id']}")
    return keys


def _input_entry(resource: dict[str, Any], full_url: str | None) -> dict[str, Any]:
    """An input resource as a transaction entry, so that posting twice changes nothing: PUT to
    its id; without one, a create conditional on its first identifier, else a PUT to an id
    derived from its fullUrl (the server would otherwise make a second copy)."""
    kind = resource["resourceType"]
    ident = next(
        (i for i in resource.get("identifier") or [] if i.get("system") and i.get("value")), None
    )
    if not resource.get("id") and full_url and ident is not None:
        return {
            "fullUrl": full_url,
            "resource": resource,
            "request": {
                "method": "POST",
                "url": kind,
                "ifNoneExist": f"identifier={ident['system']}|{ident['value']}",
            },
        }
    if not resource.get("id"):
        assert full_url is not None  # only what a reference reaches is carried
        resource = {**resource, "id": f"in-{uuid.uuid5(uuid.NAMESPACE_URL, full_url).hex}"}
    url = f"{kind}/{resource['id']}"
    return {
        "fullUrl": full_url or full_url_for(url),
        "resource": resource,
        "request": {"method": "PUT", "url": url},
    }


def postable_bundle(bundle: dict[str, Any], data: Any) -> tuple[dict[str, Any], list[str]]:
    """The result Bundle plus every input resource it refers to, directly or through them, so
    that it posts as it is on a server that holds none of them; and the references left that
    neither holds (the server must already have those)."""
    inputs = _input_entries(data)
    by_key = {key: n for n, (res, url) in enumerate(inputs) for key in _keys(res, url)}
    have = {
        key
        for entry in bundle["entry"]
        for key in _keys(entry["resource"], entry.get("fullUrl"))
        if entry["request"]["method"] == "PUT" or key.startswith("urn:")
    }
    added: list[int] = []
    missing: list[str] = []
    todo = [ref for entry in bundle["entry"] for ref in _references(entry["resource"])]
    todo.reverse()
    while todo:
        ref = todo.pop()
        if ref.startswith("#"):
            continue
        key = normalise_reference(ref)
        if key in have:
            continue
        have.add(key)
        n = by_key.get(key)
        if n is None:
            missing.append(key)
            continue
        if n in added:
            continue
        added.append(n)
        resource, full_url = inputs[n]
        have.update(_keys(resource, full_url))
        todo.extend(reversed(_references(resource)))
    entries = [*bundle["entry"], *(_input_entry(*inputs[n]) for n in added)]
    return {**bundle, "entry": entries}, missing


def _result_bundle(path: Path, run: AssessmentRun, data: Any, result_only: bool) -> Any:
    """The Bundle `assess` writes; says on stderr what it refers to that it cannot carry."""
    if result_only:
        return run.bundle()
    bundle, missing = postable_bundle(run.bundle(), data)
    if missing:
        shown = ", ".join(missing[:SHOWN_MISSING])
        more = f" and {len(missing) - SHOWN_MISSING} more" if len(missing) > SHOWN_MISSING else ""
        sys.stderr.write(
            f"fhir-dm: {path}: the result refers to {len(missing)} resource(s) the input does"
            f" not hold ({shown}{more}): post it to a server that has them, or add them to"
            " the input\n"
        )
    return bundle


def _run(args: argparse.Namespace, engine: Engine) -> int:
    now = args.now or datetime.now(UTC).date()
    runs: list[tuple[Path, AssessmentRun, Any]] = []
    for path in args.files:
        try:
            data = read_json_file(path)
            runs.append((path, engine.assess(data, now=now), data))
        except FhirDmError as exc:
            if exc.message.startswith(str(path)):
                raise
            raise type(exc)(f"{path}: {exc.message}", expression=exc.expression) from None
    if args.command == "explain":
        sys.stdout.write(
            "\n\n".join(render_summary(r) for _, run, _ in runs for r in run.results) + "\n"
        )
        return EXIT_OK
    if args.out is None and len(runs) == 1:
        path, run, data = runs[0]
        _dump(_result_bundle(path, run, data, args.result_only), sys.stdout)
        return EXIT_OK
    out_dir = args.out or Path()
    out_dir.mkdir(parents=True, exist_ok=True)
    for path, run, data in runs:
        target = out_dir / f"{path.stem}.result.json"
        bundle = _result_bundle(path, run, data, args.result_only)
        with target.open("w", encoding="utf-8") as stream:
            _dump(bundle, stream)
        sys.stderr.write(f"{path}: {len(run.results)} patient(s) -> {target}\n")
    return EXIT_OK


def _version(config: Path | None) -> int:
    sys.stdout.write(f"fhir-dm {__version__}\n")
    knowledge = load_knowledge(config)
    sys.stdout.write(f"rule set {knowledge.ruleset.label}\n")
    return EXIT_OK


def gunicorn_argv(bind: str | None, workers: int | None, extra: Sequence[str]) -> list[str]:
    """The gunicorn command line of `fhir-dm serve`: the service's settings, then ours."""
    argv = [sys.executable, "-m", "gunicorn", "--config", f"python:{GUNICORN_CONFIG_MODULE}"]
    if bind:
        argv += ["--bind", bind]
    if workers:
        argv += ["--workers", str(workers)]
    extra = list(extra)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    return [*argv, *extra, WSGI_APP]


# Said at every start with trust off: nothing limits who reads what (docs/decisions.md).
TRUST_OFF_WARNING = (
    "trust.mode is off: every caller is anonymous and reaches every patient (the app, the"
    " clinic page, population operations); for development only, never on a network"
)


def _serve(args: argparse.Namespace) -> int:
    """Check settings and knowledge once, then become gunicorn (workers build the app again)."""
    from fhir_dm.web.app import create_app  # the web stack is not needed by assess/explain
    from fhir_dm.web.settings import load_settings

    if args.config is not None:
        os.environ[CONFIG_DIR_VARIABLE] = str(args.config)
    create_app()  # raises KnowledgeError with one line per problem, before any worker starts
    settings = load_settings()
    check_fhir_server(settings.fhir)
    if settings.trust.mode == "off":
        sys.stderr.write(f"fhir-dm: warning: {TRUST_OFF_WARNING}\n")
    argv = gunicorn_argv(args.bind, args.workers, args.gunicorn_args)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)  # noqa: S606 - our own interpreter, a fixed module, user's options
    return EXIT_OK  # pragma: no cover - execv does not return


def check_fhir_server(fhir: FhirServerConfig) -> None:
    """Unless `fhir.check_at_startup` is off: KnowledgeError if the base answers but is not a
    FHIR R4 server; a warning only if it does not answer (it may be away for a while: /readyz
    says so, and the worker retries)."""
    from fhir_dm.fhir.client import check_fhir_base, client_from_config

    if not fhir.check_at_startup:
        return
    try:
        with client_from_config(fhir) as client:
            check_fhir_base(client)
    except FhirBaseUnreachableError as exc:
        sys.stderr.write(f"fhir-dm: warning: {exc.message}; starting anyway\n")


def _demo(args: argparse.Namespace, config: Path | None) -> int:
    from fhir_dm.cli import demo  # the web stack is not needed by assess/explain

    return demo.main(args.fhir_base_url, keep_running=args.keep_running, config_dir=config)


def _jobs_of(config: Path | None) -> tuple[Any, Any]:
    """The queue (`Jobs`) and the service's `Settings`; KnowledgeError without jobs.*."""
    from fhir_dm.web.jobs import open_jobs  # not needed by assess

    return open_jobs(config)


def _worker(args: argparse.Namespace, config: Path | None) -> int:
    """Run the consumers until stopped (SIGINT/SIGTERM end them gracefully)."""
    from fhir_dm.web import logs

    jobs, settings = _jobs_of(config)
    logs.configure_logging(settings.log_level)
    jobs.runtime()  # a bad knowledge base or FHIR setting fails here, before any task runs
    check_fhir_server(settings.fhir)
    jobs.consumer(args.workers, args.worker_type).run()
    return EXIT_OK


def _dead_letters(args: argparse.Namespace, config: Path | None) -> int:
    jobs, _ = _jobs_of(config)
    if args.requeue:
        sys.stderr.write(f"{jobs.requeue_dead()} patient(s) enqueued again\n")
        return EXIT_OK
    for record in jobs.dead_letters():
        sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
    return EXIT_OK


def _subscriptions(args: argparse.Namespace, config: Path | None) -> int:
    """Ensure the Subscriptions, then check the server activated them (EXIT_CONFIG if not)."""
    from fhir_dm.events.subscriptions import ensure_subscriptions, inactive_subscriptions

    jobs, service_settings = _jobs_of(config)
    settings = jobs.settings
    if settings.notification_secret is None:
        raise KnowledgeError("settings: jobs.notification_secret is not set")
    base = settings.notification_base_url or service_settings.public_base_url
    runtime = jobs.runtime()
    report = ensure_subscriptions(
        runtime.fhir, base, settings.notification_secret.get_secret_value()
    )
    sys.stdout.write(report.summary() + "\n")
    inactive = inactive_subscriptions(runtime.fhir, base, wait_seconds=args.wait)
    if inactive:
        sys.stderr.write(
            f"fhir-dm: {len(inactive)} Subscription(s) not active on the FHIR server after"
            f" {args.wait:g} s: {', '.join(i.describe() for i in inactive)}. Nothing will be"
            " notified for them: the server may have Subscriptions disabled (HAPI: rest-hook"
            " subscriptions must be enabled), or refused the channel (see its error).\n"
        )
        return EXIT_CONFIG
    sys.stdout.write(f"subscriptions: all {len(report.all())} active\n")
    if args.sweep:
        sys.stdout.write(f"sweep: {jobs.sweep()} patient(s) with an active plan\n")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit code (never raises for expected failures)."""
    parser = _parser()
    args = parser.parse_args(argv)
    env_config = os.environ.get(CONFIG_DIR_VARIABLE)
    config: Path | None = args.config or (Path(env_config) if env_config else None)
    if not args.version and args.command is None:
        parser.error("a command is required (see fhir-dm --help)")
    try:
        if args.version:
            return _version(config)
        if args.command == "serve":
            return _serve(args)
        if args.command == "demo":
            return _demo(args, config)
        if args.command == "worker":
            return _worker(args, config)
        if args.command == "dead-letters":
            return _dead_letters(args, config)
        if args.command == "subscriptions":
            return _subscriptions(args, config)
        if args.command == "population":
            from fhir_dm.cli.population import main as population_main

            return population_main(args, config)
        engine = engine_for(
            load_knowledge(config),
            _terminology_config(args.terminology_server),
            software_version=__version__,
            validate_output=args.validate_output,
        )
        return _run(args, engine)
    except KnowledgeError as exc:
        sys.stderr.write(f"fhir-dm: configuration error: {exc.message}\n")
        return EXIT_CONFIG
    except FhirDmError as exc:
        sys.stderr.write(f"fhir-dm: {exc.message}\n")
        return EXIT_INPUT


def _terminology_config(url: str | None) -> TerminologyServerConfig | None:
    """The terminology server the CLI uses, if one is named; a bad URL is a config error."""
    if url is None:
        return None
    try:
        return TerminologyServerConfig(base_url=url)
    except ValidationError:
        raise KnowledgeError("--terminology-server must be an absolute http(s) URL") from None


def main_cli() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    main_cli()
