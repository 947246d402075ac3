"""The optional terminology server: answers widen value sets; failures leave facts unknown."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import responses

from fhir_dm.cli.main import EXIT_CONFIG, main
from fhir_dm.common import deadline as deadlines
from fhir_dm.core.assess import Engine, PatientResult
from fhir_dm.fhir.terminology import (
    ServerCheckedEngine,
    TerminologyServer,
    TerminologyServerConfig,
    engine_for,
)
from fhir_dm.knowledge.models import Knowledge
from tests.clock import FakeClock
from tests.conftest import NOW
from tests.factories import bundle, concept, condition, iim_condition, patient
from tests.terminology_server import TEST_SYSTEM, TEST_VALUE_SET, knowledge_with_test_checks

BASE = "http://tx.test/fhir"
SUBSUMES = f"{BASE}/CodeSystem/$subsumes"
EXPAND = f"{BASE}/ValueSet/$expand"
NOT_CHECKED = "code not checked with the terminology server"

Json = dict[str, Any]


@pytest.fixture(scope="module")
def tx_knowledge(tmp_path_factory: pytest.TempPathFactory) -> Knowledge:
    return knowledge_with_test_checks(tmp_path_factory.mktemp("tx"))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1000.0)  # a monotonic reading


@pytest.fixture
def mocked() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


def engine(knowledge: Knowledge, clock: FakeClock, **config: Any) -> ServerCheckedEngine:
    server = TerminologyServer(
        TerminologyServerConfig(base_url=BASE, **config), knowledge.terminology, clock=clock
    )
    return ServerCheckedEngine(knowledge, server, software_version="test")


def outcome(value: str) -> Json:
    return {"resourceType": "Parameters", "parameter": [{"name": "outcome", "valueCode": value}]}


def subsumes_by_code(members: set[str]) -> Any:
    """A $subsumes callback: codeB in `members` is subsumed by the root, others not."""

    def answer(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        query = parse_qs(urlsplit(str(request.url)).query)
        value = "subsumes" if query["codeB"][0] in members else "not-subsumed"
        return 200, {"Content-Type": "application/fhir+json"}, json.dumps(outcome(value))

    return answer


def patient_with(*codes: str) -> list[Json]:
    pat = patient()
    return [
        pat,
        iim_condition(pat),
        *(condition(pat, concept(TEST_SYSTEM, code), id=f"c-{code}") for code in codes),
    ]


def run(eng: Engine, resources: list[Json]) -> PatientResult:
    (result,) = eng.assess(bundle(*resources), now=NOW).results
    return result


def feature(result: PatientResult, name: str) -> Any:
    return result.plan.assessment.facts.feature(name)


def not_checked_lines(result: PatientResult) -> list[str]:
    return [f for f in result.plan.assessment.facts.findings if NOT_CHECKED in f]


# --- answers ------------------------------------------------------------------------------


def test_a_subsumed_code_joins_the_value_set(
    tx_knowledge: Knowledge, clock: FakeClock, mocked: responses.RequestsMock
) -> None:
    mocked.add_callback(responses.GET, SUBSUMES, callback=subsumes_by_code({"nsclc"}))
    mocked.add(responses.GET, EXPAND, json=expansion([]))
    result = run(engine(tx_knowledge, clock), patient_with("nsclc"))
    assert feature(result, "active_malignancy").is_true()
    assert not feature(result, "personal_history_cancer").known
    assert not not_checked_lines(result)
    (call,) = [c for c in mocked.calls if "$subsumes" in str(c.request.url)]
    query = parse_qs(urlsplit(str(call.request.url)).query)
    assert query == {"system": [TEST_SYSTEM], "codeA": ["cancer"], "codeB": ["nsclc"]}


def test_without_a_server_the_same_code_is_not_recognised(tx_knowledge: Knowledge) -> None:
    result = run(Engine(tx_knowledge), patient_with("nsclc"))
    assert not feature(result, "active_malignancy").known


def test_a_code_the_server_rejects_as_not_subsumed_stays_unknown_without_a_failure_note(
    tx_knowledge: Knowledge, clock: FakeClock, mocked: responses.RequestsMock
) -> None:
    mocked.add_callback(responses.GET, SUBSUMES, callback=subsumes_by_code(set()))
    mocked.add(responses.GET, EXPAND, json=expansion([]))
    result = run(engine(tx_knowledge, clock), patient_with("sprain"))
    assert not feature(result, "active_malignancy").known
    assert not not_checked_lines(result)
    assert any("condition code not recognised" in f for f in result.plan.assessment.facts.findings)


def test_codes_recognised_offline_are_never_sent(
    tx_knowledge: Knowledge, clock: FakeClock, mocked: responses.RequestsMock
) -> None:
    result = run(engine(tx_knowledge, clock), patient_with())
    assert result.plan.assessment.facts.iim is not None
    assert len(mocked.calls) == 0


def test_answers_are_cached_across_requests(
    tx_knowledge: Knowledge, clock: FakeClock, mocked: responses.RequestsMock
) -> None:
    mocked.add_callback(responses.GET, SUBSUMES, callback=subsumes_by_code({"nsclc"}))
    mocked.add(responses.GET, EXPAND, json=expansion([]))
    eng = engine(tx_knowledge, clock)
    for _ in range(3):
        assert feature(run(eng, patient_with("nsclc")), "active_malignancy").is_true()
    assert len(mocked.calls) == 2  # one $subsumes, one $expand
    clock.now += TerminologyServerConfig(base_url=BASE).cache_ttl_seconds + 1
    run(eng, patient_with("nsclc"))
    assert len(mocked.calls) == 4


def expansion(codes: list[str], *, total: int | None = None, nested: bool = False) -> Json:
    contains: list[Json] = [{"system": TEST_SYSTEM, "code": c} for c in codes]
    if nested and contains:
        contains = [{"system": TEST_SYSTEM, "code": "group", "contains": contains}]
    exp: Json = {"contains": contains}
    exp["total"] = len(codes) if total is None else total
    return {"resourceType": "ValueSet", "url": TEST_VALUE_SET, "expansion": exp}


def test_a_code_in_the_expansion_joins_the_value_set(
    tx_knowledge: Knowledge, clock: FakeClock, mocked: responses.RequestsMock
) -> None:
    mocked.add_callback(responses.GET, SUBSUMES, callback=subsumes_by_code(set()))
    mocked.add(
        responses.GET, EXPAND, json=expansion(["history-of-lung-cancer"], total=2, nested=True)
    )
    result = run(engine(tx_knowledge, clock), patient_with("history-of-lung-cancer"))
    assert feature(result, "personal_history_cancer").is_true()
    expand_call = next(c for c in mocked.calls if "$expand" in str(c.request.url))
    assert parse_qs(urlsplit(str(expand_call.request.url)).query)["url"] == [TEST_VALUE_SET]


def test_an_incomplete_expansion_without_the_code_leaves_it_unchecked(
    tx_knowledge: Knowledge, clock: FakeClock, mocked: responses.RequestsMock
) -> None:
    mocked.add_callback(responses.GET, SUBSUMES, callback=subsumes_by_code(set()))
    mocked.add(responses.GET, EXPAND, json=expansion(["history-of-cancer"], total=500))
    result = run(engine(tx_knowledge, clock), patient_with("history-of-lung-cancer"))
    assert not feature(result, "personal_history_cancer").known
    assert not_checked_lines(result) == [
        f"{NOT_CHECKED} (value-set expansion larger than the limit); the facts it may record"
        " are unknown: Condition/c-history-of-lung-cancer"
    ]


# --- failures -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ({"body": requests.exceptions.ConnectTimeout()}, "no answer in time"),
        ({"body": requests.exceptions.ReadTimeout()}, "no answer in time"),
        ({"body": requests.exceptions.ConnectionError()}, "server unreachable"),
        ({"status": 500, "json": {"resourceType": "OperationOutcome"}}, "server error"),
        ({"status": 400, "json": {"resourceType": "OperationOutcome"}}, "server refused the check"),
        ({"body": "<html>not json</html>"}, "unreadable answer"),
        ({"json": {"resourceType": "Bundle"}}, "unreadable answer"),
        ({"json": outcome("maybe")}, "unreadable answer"),
        ({"json": {"resourceType": "Parameters", "parameter": "x"}}, "unreadable answer"),
    ],
)
def test_a_failed_check_leaves_the_fact_unknown_and_says_so(
    tx_knowledge: Knowledge,
    clock: FakeClock,
    mocked: responses.RequestsMock,
    answer: dict[str, Any],
    reason: str,
) -> None:
    mocked.add(responses.GET, SUBSUMES, **answer)
    mocked.add(responses.GET, EXPAND, json=expansion([]))
    result = run(engine(tx_knowledge, clock), patient_with("nsclc", "lung-cancer"))
    assert not feature(result, "active_malignancy").known
    assert "active_malignancy" in [
        f for f, fact in result.plan.assessment.facts.features.items() if not fact.known
    ]
    # One grouped line per reason, naming every resource it concerns.
    assert not_checked_lines(result) == [
        f"2 x {NOT_CHECKED} ({reason}); the facts it may record are unknown:"
        " Condition/c-nsclc, Condition/c-lung-cancer"
    ]


def test_after_a_timeout_the_server_is_left_alone_for_a_while(
    tx_knowledge: Knowledge, clock: FakeClock, mocked: responses.RequestsMock
) -> None:
    mocked.add(responses.GET, SUBSUMES, body=requests.exceptions.ReadTimeout())
    mocked.add(responses.GET, EXPAND, json=expansion([]))
    eng = engine(tx_knowledge, clock, pause_after_failure_seconds=30)
    run(eng, patient_with("nsclc", "lung-cancer"))
    assert len(mocked.calls) == 1  # the second code is not asked once the server timed out
    paused = run(eng, patient_with("nsclc"))
    assert len(mocked.calls) == 1
    assert "server failed recently; not asked" in not_checked_lines(paused)[0]
    clock.now += 31
    mocked.replace(responses.GET, SUBSUMES, json=outcome("subsumes"))
    assert feature(run(eng, patient_with("nsclc")), "active_malignancy").is_true()


def test_the_time_budget_bounds_one_request(
    tx_knowledge: Knowledge, clock: FakeClock, mocked: responses.RequestsMock
) -> None:
    def slow(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        clock.now += 2.0
        return 200, {}, json.dumps(outcome("subsumes"))

    mocked.add_callback(responses.GET, SUBSUMES, callback=slow)
    mocked.add(responses.GET, EXPAND, json=expansion([]))
    result = run(engine(tx_knowledge, clock, budget_seconds=1.5), patient_with("nsclc", "sprain"))
    assert len(mocked.calls) == 1
    # "nsclc" joined `malignancy`; its $expand check and all of "sprain" found no time left.
    assert not_checked_lines(result) == [
        f"2 x {NOT_CHECKED} (time budget for the request spent); the facts it may record are"
        " unknown: Condition/c-nsclc, Condition/c-sprain"
    ]
    assert feature(result, "active_malignancy").is_true()


def test_the_request_deadline_cuts_the_budget(
    tx_knowledge: Knowledge, mocked: responses.RequestsMock
) -> None:
    eng = engine(tx_knowledge, FakeClock())
    with deadlines.within(deadlines.Deadline.after(0.0)):
        result = run(eng, patient_with("nsclc"))
    assert len(mocked.calls) == 0
    assert "time budget for the request spent" in not_checked_lines(result)[0]


def test_codes_beyond_the_per_request_limit_are_not_checked(
    tx_knowledge: Knowledge, clock: FakeClock, mocked: responses.RequestsMock
) -> None:
    mocked.add_callback(responses.GET, SUBSUMES, callback=subsumes_by_code({"lung-cancer"}))
    mocked.add(responses.GET, EXPAND, json=expansion([]))
    result = run(
        engine(tx_knowledge, clock, max_codes_per_request=1), patient_with("nsclc", "lung-cancer")
    )
    assert feature(result, "active_malignancy").is_true()  # "lung-cancer" sorts first
    assert not_checked_lines(result) == [
        f"{NOT_CHECKED} (more unknown codes than the per-request limit); the facts it may"
        " record are unknown: Condition/c-nsclc"
    ]


# --- settings and entry points ------------------------------------------------------------


def test_no_server_configured_means_the_plain_engine(knowledge: Knowledge) -> None:
    assert type(engine_for(knowledge, None)) is Engine
    configured = engine_for(knowledge, TerminologyServerConfig(base_url=BASE))
    assert isinstance(configured, ServerCheckedEngine)


def test_the_base_url_must_be_absolute() -> None:
    with pytest.raises(ValueError, match="absolute"):
        TerminologyServerConfig(base_url="tx.example.org/fhir")


def test_the_cli_uses_a_terminology_server_when_named(
    mocked: responses.RequestsMock,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    mocked.add(responses.GET, SUBSUMES, status=503)
    mocked.add(responses.GET, EXPAND, json=expansion([]))
    source = tmp_path / "in.json"
    source.write_text(json.dumps(bundle(*patient_with("nsclc"))), encoding="utf-8")
    config = str(tmp_path / "config")
    knowledge_with_test_checks(tmp_path)
    args = ["--config", config, "explain", str(source), "--now", NOW.isoformat()]
    assert main([*args, "--terminology-server", BASE]) == 0
    assert "code not checked with the terminology server (server error)" in capsys.readouterr().out
    assert len(mocked.calls) == 2
    assert main(args) == 0
    assert NOT_CHECKED not in capsys.readouterr().out
    assert len(mocked.calls) == 2


def test_the_cli_refuses_a_bad_terminology_server_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in.json"
    source.write_text(json.dumps(bundle(*patient_with())), encoding="utf-8")
    assert main(["explain", str(source), "--terminology-server", "not a url"]) == EXIT_CONFIG
    assert "--terminology-server" in capsys.readouterr().err


def test_the_cli_reads_the_service_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FHIR_DM_TERMINOLOGY__BASE_URL", "ftp://nowhere")
    source = tmp_path / "in.json"
    source.write_text(json.dumps(bundle(*patient_with())), encoding="utf-8")
    assert main(["explain", str(source)]) == EXIT_CONFIG


def test_the_service_reads_the_setting_and_builds_a_checking_engine(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from fhir_dm.web.app import create_app
    from fhir_dm.web.settings import current_service, load_settings

    monkeypatch.setenv("FHIR_DM_FHIR__BASE_URL", "http://hapi.local/fhir")
    monkeypatch.setenv("FHIR_DM_TRUST__MODE", "off")
    monkeypatch.setenv("FHIR_DM_LOCK_DIR", str(tmp_path))
    assert load_settings().terminology is None
    monkeypatch.setenv("FHIR_DM_TERMINOLOGY__BASE_URL", f"{BASE}/")
    monkeypatch.setenv("FHIR_DM_TERMINOLOGY__BUDGET_SECONDS", "2.5")
    settings = load_settings()
    assert settings.terminology == TerminologyServerConfig(base_url=BASE, budget_seconds=2.5)
    app = create_app(settings)
    with app.app_context():
        assert isinstance(current_service().engine, ServerCheckedEngine)
