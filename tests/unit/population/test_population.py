"""The population view's pure parts: finder codes, rows, worklist, measures, run state."""

from __future__ import annotations

import io
import threading
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from fhir_dm.core.assess import Engine
from fhir_dm.errors import FhirDmError, UpstreamError
from fhir_dm.knowledge.load import load_knowledge
from fhir_dm.knowledge.models import Knowledge
from fhir_dm.population.config import PopulationConfig, load_population_config
from fhir_dm.population.finder import iim_search_tokens, patient_id_of, unexpanded_prefixes
from fhir_dm.population.measures import measure_report, membership
from fhir_dm.population.rows import ItemRow, PatientRow, patient_row
from fhir_dm.population.run import Done, PopulationRunner, StateFile
from fhir_dm.population.worklist import to_csv, to_fhir_list, worklist
from tests import factories as f

NOW = date(2026, 12, 2)


@pytest.fixture(scope="module")
def knowledge() -> Knowledge:
    return load_knowledge()


@pytest.fixture(scope="module")
def population(knowledge: Knowledge) -> PopulationConfig:
    return load_population_config(knowledge)


def _item(
    round_id: str, test_id: str, end: str, status: str, done_on: str | None = None
) -> ItemRow:
    return ItemRow(round_id, round_id, test_id, test_id, "2024-03-01", end, status, False, done_on)


def _row(
    patient: str, tier: str, *items: ItemRow, org: str | None = "Organization/a"
) -> PatientRow:
    return PatientRow(patient, True, tier, False, NOW.isoformat(), org, "Practitioner/x", items)


# --- finder -----------------------------------------------------------------------------


def test_tokens_hold_exact_codes_prefix_expansions_oid_and_dotless(
    knowledge: Knowledge, population: PopulationConfig
) -> None:
    tokens = iim_search_tokens(knowledge, population.finder)
    assert f"{f.SCT}|{f.DM_SNOMED}" in tokens
    assert f"{f.ICD10CM}|M33.13" in tokens  # listed under the M33.1 prefix
    assert f"{f.ICD10CM}|M3313" in tokens  # dotless system
    assert "urn:oid:2.16.840.1.113883.6.90|M33.13" in tokens  # ICD-10-CM's OID alias
    assert f"{f.ICD10}|M33.1" in tokens
    assert len(tokens) == len(set(tokens))
    assert not any("|40739000" in t for t in tokens)  # dysphagia is not an IIM
    assert unexpanded_prefixes(knowledge, population.finder) == []


def test_patient_id_of_reads_relative_and_absolute_references() -> None:
    assert patient_id_of("Patient/12") == "12"
    assert patient_id_of("http://x/fhir/Patient/ab-1/_history/3") == "ab-1"
    assert patient_id_of("Group/1") is None


# --- rows from a real assessment ---------------------------------------------------------


def test_patient_row_carries_tier_items_and_responsible(knowledge: Knowledge) -> None:
    p = f.patient(
        "r1",
        managingOrganization={"reference": "Organization/o1"},
        generalPractitioner=[{"reference": "Practitioner/g1"}, {"reference": "Practitioner/g2"}],
    )
    done = f.done_request(p, knowledge, "cbc", "2024-03-10")
    run = Engine(knowledge).assess(
        f.bundle(p, f.iim_condition(p, recorded="2024-03-01"), done), now=NOW
    )
    row = patient_row(run.results[0], p, knowledge, "Patient/r1")
    assert (row.patient, row.organization, row.practitioner) == (
        "Patient/r1",
        "Organization/o1",
        "Practitioner/g1",
    )
    cbc = next(i for i in row.items if i.round_id == "diagnosis" and i.test_id == "cbc")
    assert cbc.status == "done" and cbc.done_on == "2024-03-10" and cbc.done_on_time()
    assert any(i.status == "overdue" for i in row.items)
    assert PatientRow.from_json(row.to_json()) == row


# --- worklist ----------------------------------------------------------------------------


def test_worklist_orders_most_overdue_first_and_keeps_soon_due_only() -> None:
    rows = [
        _row("Patient/a", "high", _item("diagnosis", "cbc", "2026-06-01", "overdue")),
        _row(
            "Patient/b",
            "high",
            _item("diagnosis", "cbc", "2025-06-01", "overdue"),
            _item("year-1", "cbc", "2026-12-20", "due"),  # within 30 days
            _item("year-2", "cbc", "2027-12-20", "upcoming"),  # too far
            _item("diagnosis", "lft", "2025-06-01", "done", "2025-05-01"),
        ),
    ]
    items = worklist(rows, NOW, 30)
    assert [(w.patient, w.status, w.days_overdue) for w in items] == [
        ("Patient/b", "overdue", 549),
        ("Patient/a", "overdue", 184),
        ("Patient/b", "due soon", 0),
    ]
    csv_text = to_csv(items)
    assert csv_text.splitlines()[0].startswith("patient,tier,round,item")
    assert len(csv_text.splitlines()) == 4
    fhir_list = to_fhir_list(items, NOW)
    assert [e["item"]["reference"] for e in fhir_list["entry"]] == ["Patient/b", "Patient/a"]
    assert "emptyReason" in to_fhir_list([], NOW)


# --- measures ----------------------------------------------------------------------------


def test_completion_measure_counts_on_time_items_of_rounds_closed_in_period(
    knowledge: Knowledge, population: PopulationConfig
) -> None:
    workup = next(m for m in population.measures if m.id == "dm-workup-at-diagnosis")
    on_time = _row(
        "Patient/1", "standard", _item("diagnosis", "cbc", "2024-06-01", "done", "2024-05-01")
    )
    late = _row(
        "Patient/2", "standard", _item("diagnosis", "cbc", "2024-06-01", "done", "2024-07-01")
    )
    undone = _row("Patient/3", "high", _item("diagnosis", "cbc", "2024-06-01", "overdue"), org=None)
    before = _row(
        "Patient/4", "standard", _item("diagnosis", "cbc", "2023-06-01", "done", "2023-05-01")
    )
    rows = [on_time, late, undone, before]
    report = measure_report(
        knowledge, workup, rows, (date(2024, 1, 1), date(2024, 12, 31)), subject_list=True
    )
    group = report["group"][0]
    counts = {p["code"]["coding"][0]["code"]: p["count"] for p in group["population"]}
    assert counts == {"initial-population": 4, "denominator": 3, "numerator": 1}
    assert group["measureScore"]["value"] == pytest.approx(1 / 3, abs=1e-4)
    numerator_list = next(c for c in report["contained"] if c["id"] == "numerator-subjects")
    assert [e["item"]["reference"] for e in numerator_list["entry"]] == ["Patient/1"]
    org = next(s for s in group["stratifier"] if s["code"][0]["text"] == "organization")
    assert [s["value"]["text"] for s in org["stratum"]] == ["(not recorded)", "Organization/a"]
    assert membership(before, workup, None, date(2024, 1, 1)).denominator is False


def test_enhanced_panel_measure_reads_only_enhanced_tests_of_moderate_and_high(
    knowledge: Knowledge, population: PopulationConfig
) -> None:
    enhanced = next(m for m in population.measures if m.id == "dm-enhanced-panel")
    tests = {t for p in enhanced.panels for t in knowledge.ruleset.panels[p].tests}
    row = _row(
        "Patient/1",
        "moderate",
        _item("diagnosis", "cbc", "2024-06-01", "overdue"),  # basic: not counted
        _item("diagnosis", "ct-ncap", "2024-06-01", "done", "2024-04-01"),
    )
    assert membership(row, enhanced, tests, date(2024, 1, 1)).numerator is True
    standard = _row("Patient/2", "standard", _item("diagnosis", "ct-ncap", "2024-06-01", "done"))
    assert membership(standard, enhanced, tests, date(2024, 1, 1)).initial is False


def test_overdue_measure_counts_patients_with_any_overdue_item(
    knowledge: Knowledge, population: PopulationConfig
) -> None:
    overdue = next(m for m in population.measures if m.kind == "overdue")
    rows = [
        _row("Patient/1", "high", _item("diagnosis", "cbc", "2024-06-01", "overdue")),
        _row("Patient/2", "high", _item("diagnosis", "cbc", "2024-06-01", "done", "2024-05-01")),
    ]
    report = measure_report(knowledge, overdue, rows, (date(2026, 1, 1), NOW), subject_list=False)
    counts = [p["count"] for p in report["group"][0]["population"]]
    assert counts == [2, 2, 1] and report["type"] == "summary" and "contained" not in report


# --- the run: state, resumption, one failure does not stop it -----------------------------


class _FakeRunner(PopulationRunner):
    """Assess without a server: one patient fails, the others give a fixed row."""

    def __init__(self, failing: str) -> None:
        self.failing = failing
        self.seen: list[str] = []
        self.lock = threading.Lock()

    def assess_one(self, patient_id: str, *, now: date, preview: bool) -> Done:
        with self.lock:
            self.seen.append(patient_id)
        if patient_id == self.failing:
            raise UpstreamError("the FHIR server failed")
        return Done(patient_id, "written", _row(f"Patient/{patient_id}", "high"))

    def close(self) -> None:
        pass


def _run(runner: _FakeRunner, ids: list[str], state: StateFile, **kw: Any) -> Any:
    return runner.run(
        ids,
        now=NOW,
        preview=False,
        workers=2,
        run_id="r1",
        state=state,
        progress_stream=io.StringIO(),
        **kw,
    )


def test_run_lists_failures_and_resumes_skipping_done_patients(tmp_path: Path) -> None:
    ids = [str(n) for n in range(10)]
    state = StateFile(tmp_path, "r1")
    stopped: list[str] = []

    def interrupt(done: Done) -> None:
        stopped.append(done.patient_id)
        if len(stopped) == 4:
            raise KeyboardInterrupt

    first = _FakeRunner(failing="3")
    with pytest.raises(KeyboardInterrupt):
        _run(first, ids, state, on_done=interrupt)
    finished = set(StateFile(tmp_path, "r1").load())
    # Four seen through, plus those in flight (at most 2 x 2 workers) finished and recorded.
    assert 4 <= len(finished) <= 8
    assert "3" not in finished
    second = _FakeRunner(failing="3")
    result = _run(second, ids, StateFile(tmp_path, "r1"))
    assert not finished & set(second.seen)  # nothing done twice
    assert result.skipped == len(finished)
    assert [x.patient_id for x in result.failures] == ["3"]
    assert sorted(d.patient_id for d in result.done) == sorted(set(ids) - {"3"})
    assert result.by_tier() == {
        "high": {"patients": 9, "written": 9, "unchanged": 0, "failed": 0},
        "unknown": {"patients": 1, "written": 0, "unchanged": 0, "failed": 1},
    }


def test_state_file_refuses_a_run_id_that_is_a_path(tmp_path: Path) -> None:
    with pytest.raises(FhirDmError):
        StateFile(tmp_path, "../x")


def test_cli_refuses_a_server_that_is_not_a_url(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from fhir_dm.cli import main

    state = tmp_path / "state"
    assert main(["population", "run", "--server", "file:///etc", "--state-dir", str(state)]) == 1
    assert "--server must be an absolute http(s) URL" in capsys.readouterr().err
    assert not state.exists()
    with pytest.raises(SystemExit):
        main(
            [
                "population",
                "measure",
                "--server",
                "http://x",
                "--start",
                "2024-13-01",
                "--end",
                "2024-12-31",
            ]
        )


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_otherwise() -> None:
    from fhir_dm.population.run import Progress

    for stream in (_Tty(), io.StringIO()):
        progress = Progress(2, stream, label="run")
        progress.advance(failed=False)
        progress.advance(failed=True)
        progress.close()
        text = stream.getvalue()
        if isinstance(stream, _Tty):
            assert "\x1b[" in text and "2/2" in text and "errors 1" in text
        else:
            assert "\x1b[" not in text and "2/2 patients" in text and "1 error(s)" in text
