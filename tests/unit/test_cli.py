"""The CLI contract: assess / explain / serve / demo, exit codes, one-line errors, no tracebacks."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path
from typing import Any

import pytest
import requests
import responses

from fhir_dm import __version__
from fhir_dm.cli import demo
from fhir_dm.cli import main as cli
from fhir_dm.core.assess import Engine
from fhir_dm.knowledge.load import DEFAULT_CONFIG_DIR, load_knowledge
from fhir_dm.knowledge.models import Knowledge
from fhir_dm.web import gunicorn_conf
from tests import factories as f


@pytest.fixture
def seed_file(tmp_path: Path) -> Path:
    path = tmp_path / "seed.json"
    path.write_text(json.dumps(f.bundle(*f.seed_case())))
    return path


def test_assess_prints_the_transaction_bundle(
    seed_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["assess", str(seed_file), "--now", "2015-10-25"]) == 0
    bundle = json.loads(capsys.readouterr().out)
    assert bundle["type"] == "transaction"
    assert (
        bundle["entry"][0]["resource"]["prediction"][0]["qualitativeRisk"]["coding"][0]["code"]
        == "high"
    )


def test_assess_writes_files_with_out(seed_file: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.json"
    p = f.patient()
    other.write_text(json.dumps(f.bundle(p, f.iim_condition(p))))
    out = tmp_path / "results"
    assert (
        cli.main(["assess", str(seed_file), str(other), "--now", "2024-04-01", "--out", str(out)])
        == 0
    )
    assert sorted(x.name for x in out.iterdir()) == ["other.result.json", "seed.result.json"]


def test_explain_summarises_each_patient(
    seed_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["explain", str(seed_file), "--now", "2015-10-25"]) == 0
    out = capsys.readouterr().out
    assert "High risk of IIM-associated cancer" in out
    assert "CONSIDER" in out and "Chest radiograph" in out


def test_explain_counts_orders_and_activities_apart_and_keeps_rule_ids_out_of_the_reasons(
    seed_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["explain", str(seed_file), "--now", "2015-10-25"]) == 0
    out = capsys.readouterr().out
    why = out[out.index("  Why:") : out.index("  Evidence")]
    assert "(rule " not in why and "[BMJ]" not in why
    assert "    - High-risk factor: anti-TIF1-gamma positive\n" in why
    assert "age at onset over 40 (age at onset 75)" in why  # not the rule's own note
    assert "anti-TIF1-gamma positive: rule ab-tif1g; evidence guideline" in out
    lines = out.splitlines()
    [at] = [i for i, x in enumerate(lines) if x.startswith("  Proposed: ")]
    line = lines[at]
    rows = [x for x in lines[at + 1 :] if x.startswith("    ") and not x.startswith("    - ")]
    counts = line.removeprefix("  Proposed: ").split(";")[0]
    orders, _, rest = counts.partition(" service requests and ")
    activities, _, total = rest.partition(" care-plan activities (")
    assert int(orders) + int(activities) == int(total.removesuffix(" items)")) == len(rows)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read"),
        ("{not json", "not JSON"),
        ('{"hello": "world"}', "not a FHIR resource"),
        ('{"resourceType": "Bundle", "type": "collection", "entry": []}', "no Patient"),
        (
            '{"resourceType": "Bundle", "type": "collection", '
            '"entry": [{"resource": {"resourceType": "Patient", "gender": 5}}]}',
            "gender",
        ),
        ('{"resourceType": "Nope"}', "unknown resourceType"),
    ],
)
def test_bad_input_one_line_and_non_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, message: str
) -> None:
    path = tmp_path / "input.json"
    if content is not None:
        path.write_text(content)
    assert cli.main(["assess", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_bad_configuration_exits_with_the_config_code(
    tmp_path: Path, seed_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["--config", str(tmp_path), "assess", str(seed_file)]) == cli.EXIT_CONFIG
    assert "configuration error" in capsys.readouterr().err


def test_bad_date_is_a_usage_error(seed_file: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["assess", str(seed_file), "--now", "21/11/2026"])
    assert exc.value.code == cli.EXIT_USAGE


def test_validate_output_flag_gives_the_same_result(
    seed_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["assess", str(seed_file), "--now", "2015-10-25"]) == 0
    fast = capsys.readouterr().out
    assert cli.main(["assess", str(seed_file), "--now", "2015-10-25", "--validate-output"]) == 0
    assert capsys.readouterr().out == fast


# --- one command line: --version, serve, demo ------------------------------------------------


def test_version_names_the_package_and_the_loaded_rule_set(
    knowledge: Knowledge, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(cli.CONFIG_DIR_VARIABLE, raising=False)
    assert cli.main(["--version"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"fhir-dm {__version__}", f"rule set {knowledge.ruleset.label}"]


def test_version_with_an_unusable_configuration_exits_with_the_config_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(cli.CONFIG_DIR_VARIABLE, str(tmp_path))
    assert cli.main(["--version"]) == cli.EXIT_CONFIG
    captured = capsys.readouterr()
    assert captured.out == f"fhir-dm {__version__}\n"
    assert "configuration error" in captured.err


def test_config_directory_from_the_environment(
    tmp_path: Path,
    seed_file: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(cli.CONFIG_DIR_VARIABLE, str(tmp_path / "missing"))
    assert cli.main(["explain", str(seed_file)]) == cli.EXIT_CONFIG
    assert "configuration directory not found" in capsys.readouterr().err
    # --config wins over the variable.
    assert cli.main(["--config", str(DEFAULT_CONFIG_DIR), "explain", str(seed_file)]) == 0


def test_a_command_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == cli.EXIT_USAGE
    assert "a command is required" in capsys.readouterr().err


@pytest.fixture
def service_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The smallest valid service settings, and no settings file or config dir around."""
    for name in (cli.CONFIG_DIR_VARIABLE, "FHIR_DM_SETTINGS_FILE"):
        monkeypatch.setenv(name, "")  # recorded, so whatever `serve` sets is undone afterwards
        monkeypatch.delenv(name)
    monkeypatch.setenv("FHIR_DM_FHIR__BASE_URL", "http://127.0.0.1:9/fhir")
    monkeypatch.setenv("FHIR_DM_TRUST__MODE", "off")
    monkeypatch.setenv("FHIR_DM_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.setenv("FHIR_DM_FHIR__CHECK_AT_STARTUP", "false")  # no server at that base


class ExecCalled(Exception):
    """Raised by the fake execv so that the test sees the command line instead of gunicorn."""


def _capture_exec(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    calls: list[list[str]] = []

    def fake_execv(path: str, argv: list[str]) -> None:
        calls.append([path, *argv])
        raise ExecCalled

    monkeypatch.setattr(cli.os, "execv", fake_execv)
    return calls


@pytest.mark.usefixtures("service_env")
def test_serve_checks_the_settings_then_becomes_gunicorn(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _capture_exec(monkeypatch)
    with pytest.raises(ExecCalled):
        cli.main(["serve", "--workers", "3", "--", "--timeout", "60"])
    path, *argv = calls[0]
    assert path == argv[0] and argv[1:3] == ["-m", "gunicorn"]
    assert argv[-1] == "fhir_dm.web.wsgi:app"
    assert argv[argv.index("--workers") + 1] == "3"
    assert argv[-3:-1] == ["--timeout", "60"]
    assert argv[argv.index("--config") + 1] == "python:fhir_dm.web.gunicorn_conf"
    assert "--bind" not in argv  # the config module's, unless given


@pytest.mark.usefixtures("service_env")
@pytest.mark.parametrize(("mode", "warned"), [("off", True), ("static", False)])
def test_serve_with_trust_off_warns_that_every_caller_reaches_every_patient(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], mode: str, warned: bool
) -> None:
    _capture_exec(monkeypatch)
    monkeypatch.setenv("FHIR_DM_TRUST__MODE", mode)
    if mode == "static":
        monkeypatch.setenv(
            "FHIR_DM_TRUST__STATIC_TOKENS", '["a-long-enough-static-token-0123456789"]'
        )
    with pytest.raises(ExecCalled):
        cli.main(["serve"])
    assert (cli.TRUST_OFF_WARNING in capsys.readouterr().err) is warned


@pytest.mark.usefixtures("service_env")
def test_serve_with_bad_settings_exits_with_the_config_code_before_gunicorn(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls = _capture_exec(monkeypatch)
    monkeypatch.setenv("FHIR_DM_FHIR__BASE_URL", "not-a-url")
    assert cli.main(["serve"]) == cli.EXIT_CONFIG
    err = capsys.readouterr().err
    assert "fhir.base_url" in err and "not-a-url" not in err
    assert calls == []


@pytest.mark.usefixtures("service_env")
def test_serve_passes_config_to_the_workers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _capture_exec(monkeypatch)
    # An empty directory: the check before gunicorn reads it, so it fails there.
    assert cli.main(["--config", str(tmp_path), "serve"]) == cli.EXIT_CONFIG
    assert "configuration" in capsys.readouterr().err
    assert cli.os.environ[cli.CONFIG_DIR_VARIABLE] == str(tmp_path)


def test_serve_help_states_the_gunicorn_config_defaults() -> None:
    assert (gunicorn_conf.bind, gunicorn_conf.workers) == (cli.DEFAULT_BIND, cli.DEFAULT_WORKERS)
    argv = cli.gunicorn_argv("0.0.0.0:8080", None, [])
    assert argv[argv.index("--bind") + 1] == "0.0.0.0:8080"
    assert "--workers" not in argv


def test_demo_without_a_server_or_a_clone_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(demo, "SOURCE_ROOT", tmp_path)  # as from an installed wheel
    assert cli.main(["demo"]) == 1
    err = capsys.readouterr().err
    assert "--fhir-base-url" in err and "Traceback" not in err


def test_demo_against_an_unreachable_server_fails_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["demo", "--fhir-base-url", "http://127.0.0.1:9/fhir"]) == cli.EXIT_CONFIG
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if cli.TRUST_OFF_WARNING not in line]
    assert len(lines) == 1 and "FHIR base http://127.0.0.1:9/fhir is not reachable" in err


@pytest.mark.usefixtures("service_env")
@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"status": 404}, "answered 404 to /metadata: wrong path?"),
        (
            {"json": {"resourceType": "CapabilityStatement", "fhirVersion": "3.0.2"}},
            "server speaks FHIR 3.0.2 (STU3); fhir-dm reads R4 (4.0.x)",
        ),
    ],
)
def test_serve_and_worker_check_the_fhir_base_first(
    metadata: dict[str, Any],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    calls = _capture_exec(monkeypatch)
    monkeypatch.setenv("FHIR_DM_FHIR__BASE_URL", "http://h.example/baseR4")
    monkeypatch.setenv("FHIR_DM_FHIR__CHECK_AT_STARTUP", "true")
    with responses.RequestsMock() as rsps:
        rsps.get("http://h.example/baseR4/metadata", **metadata)
        assert cli.main(["serve"]) == cli.EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "FHIR base http://h.example/baseR4" in err and message in err
    assert calls == []  # gunicorn never started


def test_demo_serves_the_app_and_links_each_patient() -> None:
    app = demo.demo_app("http://127.0.0.1:9/fhir")
    with demo.serve_app(app) as url:
        page = requests.get(f"{url}/app/launch", timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["Content-Type"]
    patients = demo.demo_patients(date(2024, 1, 1))
    links = demo.app_links(url, "http://h.example/fhir", patients)
    assert len(links) == len(patients) == 6
    for link, p in zip(links, patients, strict=True):
        assert link.startswith(p.label)
        assert link.endswith(
            f"/app/launch?fhirServiceUrl=http%3A%2F%2Fh.example%2Ffhir&patientId={p.pid}"
        )


# --- the result Bundle posts as it is (no server here; tests/integration/test_cli_post.py) ------


def _types(bundle: dict) -> list[str]:  # type: ignore[type-arg]
    return [e["resource"]["resourceType"] for e in bundle["entry"]]


def test_assess_carries_the_input_resources_the_result_refers_to(
    seed_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["assess", str(seed_file), "--now", "2015-10-25"]) == 0
    out, err = capsys.readouterr()
    bundle = json.loads(out)
    assert err == ""  # everything referred to is in the input
    assert _types(bundle)[0] == "RiskAssessment"  # the result first, then what it refers to
    carried = {
        e["request"]["url"]: e["request"]["method"]
        for e in bundle["entry"]
        if e["resource"]["resourceType"] in ("Patient", "Condition", "Observation")
    }
    assert carried["Patient/seed-case"] == "PUT"
    assert all(method == "PUT" for method in carried.values())  # idempotent: ids kept
    # Every reference now resolves inside the Bundle.
    inside = {e["request"]["url"] for e in bundle["entry"] if e["request"]["method"] == "PUT"}
    inside |= {e["fullUrl"] for e in bundle["entry"]}
    assert {r for r in cli._references(bundle) if not r.startswith("#")} <= inside


def test_assess_result_only_leaves_the_input_out(
    seed_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["assess", str(seed_file), "--now", "2015-10-25", "--result-only"]) == 0
    bundle = json.loads(capsys.readouterr().out)
    assert "Patient" not in _types(bundle)


def test_input_without_ids_gets_conditional_or_derived_ids(tmp_path: Path) -> None:
    p = f.patient(identifier="MRN-1")
    dm = f.iim_condition(p)
    for r in (p, dm):
        r.pop("id")
    data = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"fullUrl": "urn:uuid:0b8f2a4e-9d4c-4f3e-8a1b-111111111111", "resource": p},
            {"fullUrl": "urn:uuid:0b8f2a4e-9d4c-4f3e-8a1b-222222222222", "resource": dm},
        ],
    }
    dm["subject"] = {"reference": "urn:uuid:0b8f2a4e-9d4c-4f3e-8a1b-111111111111"}
    engine = Engine(load_knowledge())
    run = engine.assess(data, now=date(2024, 4, 15))
    bundle, missing = cli.postable_bundle(run.bundle(), data)
    assert missing == []
    requests_by_type = {e["resource"]["resourceType"]: e["request"] for e in bundle["entry"]}
    assert requests_by_type["Patient"] == {
        "method": "POST",
        "url": "Patient",
        "ifNoneExist": "identifier=http://hospital.example.org/mrn|MRN-1",
    }
    condition = requests_by_type["Condition"]
    assert condition["method"] == "PUT" and condition["url"].startswith("Condition/in-")
    assert "id" not in dm  # the input itself is not changed
    # Deterministic: the same input gives the same ids.
    again, _ = cli.postable_bundle(engine.assess(data, now=date(2024, 4, 15)).bundle(), data)
    assert again == bundle


def test_assess_says_what_the_input_cannot_supply(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = f.patient()
    dm = f.iim_condition(p, encounter={"reference": "Encounter/e-1"})
    path = tmp_path / "dangling.json"
    path.write_text(json.dumps(f.bundle(p, dm)))
    assert cli.main(["assess", str(path), "--now", "2024-04-15"]) == 0
    err = capsys.readouterr().err
    assert "refers to 1 resource(s) the input does not hold (Encounter/e-1)" in err


def test_python_dash_m_runs_the_same_command_line() -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "fhir_dm", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "rule set imacs-2023" in done.stdout


# --- settings errors: one line per problem, the config code, apart from usage errors ---------


@pytest.mark.usefixtures("service_env")
@pytest.mark.parametrize("command", ["serve", "worker", "dead-letters"])
def test_a_setting_that_is_not_json_is_one_line_naming_the_variable(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _capture_exec(monkeypatch)
    monkeypatch.setenv("FHIR_DM_TRUST__STATIC_TOKENS", "abc-secret-looking")
    assert cli.main([command]) == cli.EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "FHIR_DM_TRUST__STATIC_TOKENS" in err and "not valid JSON" in err
    assert "abc-secret-looking" not in err


@pytest.mark.usefixtures("service_env")
def test_serve_starts_with_a_warning_when_the_fhir_base_does_not_answer(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A server that is away may come back (/readyz says so meanwhile); a wrong one does not."""
    calls = _capture_exec(monkeypatch)
    monkeypatch.setenv("FHIR_DM_FHIR__CHECK_AT_STARTUP", "true")  # base: 127.0.0.1:9, closed
    with pytest.raises(ExecCalled):
        cli.main(["serve"])
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "FHIR base" in line]
    assert (
        len(warnings) == 1 and "warning: FHIR base http://127.0.0.1:9/fhir is not reachable" in err
    )
    assert len(calls) == 1


def test_usage_and_configuration_exit_codes_differ() -> None:
    assert len({cli.EXIT_OK, cli.EXIT_INPUT, cli.EXIT_USAGE, cli.EXIT_CONFIG}) == 4
    assert cli.EXIT_USAGE == 2  # what argparse itself uses


def test_every_exit_code_is_in_the_cli_docs() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text(encoding="utf-8")
    for code in (cli.EXIT_OK, cli.EXIT_INPUT, cli.EXIT_USAGE, cli.EXIT_CONFIG):
        assert f"| `{code}` |" in text
