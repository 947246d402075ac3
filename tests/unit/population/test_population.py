"""The population view's pure parts: finder codes, rows, worklist, measures, run state."""

from __future__ import annotations

import io
import json
import threading
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from fhir_dm.common.errors import FhirDmError, UpstreamError
from fhir_dm.core.assess import Engine
from fhir_dm.knowledge.load import load_knowledge
from fhir_dm.knowledge.models import Knowledge
from fhir_dm.population.config import MeasureConfig, PopulationConfig, load_population_config
from fhir_dm.population.finder import iim_search_tokens, patient_id_of, unexpanded_prefixes
from fhir_dm.population.measures import measure_report, units
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
    round_id: str,
    test_id: str,
    end: str,
    status: str,
    done_on: str | None = None,
    *,
    conditional: bool = False,
    imacs: bool | None = None,
    lung: bool = False,
    start: str = "2024-03-01",
) -> ItemRow:
    """An item row; firm items are IMACS cancer screening unless said otherwise."""
    if imacs is None:
        imacs = not conditional and not lung
    return ItemRow(
        round_id,
        round_id,
        test_id,
        test_id,
        start,
        end,
        status,
        conditional,
        done_on,
        imacs_screening=imacs,
        lung=lung,
        not_imacs=lung,
    )


def _row(
    patient: str,
    tier: str,
    *items: ItemRow,
    org: str | None = "Organization/a",
    scope: str = "in-scope",
    plan_open: bool = True,
    now: date = NOW,
) -> PatientRow:
    return PatientRow(
        patient,
        scope == "in-scope",
        tier,
        False,
        now.isoformat(),
        org,
        "Practitioner/x",
        items,
        scope,
        plan_open,
    )


def _measure(population: PopulationConfig, measure_id: str) -> MeasureConfig:
    return next(m for m in population.measures if m.id == measure_id)


def _counts(report: dict[str, Any]) -> list[int]:
    return [p["count"] for p in report["group"][0]["population"]]


def _subjects(report: dict[str, Any], code: str) -> list[tuple[str, str]]:
    lst = next(c for c in report["contained"] if c["id"] == f"{code}-subjects")
    return [
        (e["item"]["reference"], e.get("flag", {}).get("text", "")) for e in lst.get("entry", [])
    ]


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

ALL_FIRM_WORKUP = (
    "history-exam",
    "national-screening",
    "cbc",
    "lft",
    "esr",
    "crp",
    "spep",
    "urinalysis",
    "chest-xray",
    "ct-ncap",
    "cervical-cytology",
    "mammography",
    "ca125",
    "fobt",
    "abdominal-us",
    "transvaginal-us",
    "myositis-antibodies",
)
BASIC = ALL_FIRM_WORKUP[:9]


def _assessed(knowledge: Knowledge, resources: list[dict[str, Any]], now: date) -> PatientRow:
    run = Engine(knowledge).assess(f.bundle(*resources), now=now)
    patient = resources[0]
    return patient_row(run.results[0], patient, knowledge, f"Patient/{patient['id']}")


def test_patient_row_carries_tier_items_and_responsible(knowledge: Knowledge) -> None:
    p = f.patient(
        "r1",
        managingOrganization={"reference": "Organization/o1"},
        generalPractitioner=[{"reference": "Practitioner/g1"}, {"reference": "Practitioner/g2"}],
    )
    done = f.done_request(p, knowledge, "cbc", "2024-03-10")
    late = f.done_request(p, knowledge, "lft", "2024-08-10")
    row = _assessed(knowledge, [p, f.iim_condition(p, recorded="2024-03-01"), done, late], NOW)
    assert (row.patient, row.organization, row.practitioner) == (
        "Patient/r1",
        "Organization/o1",
        "Practitioner/g1",
    )
    assert (row.scope, row.tier, row.plan_open) == ("in-scope", "high", True)
    by_key = {(i.round_id, i.test_id): i for i in row.items}
    cbc, lft = by_key["diagnosis", "cbc"], by_key["diagnosis", "lft"]
    assert cbc.status == "done" and cbc.done_on == "2024-03-10" and cbc.done_on_time()
    assert lft.status == "done-late" and lft.done_late() and not lft.done_on_time()
    assert cbc.imacs_screening and not cbc.lung
    # "Consider" add-ons and the antibody panel are not IMACS screening items for the measures.
    assert by_key["diagnosis", "pet-ct"].conditional
    assert not by_key["diagnosis", "pet-ct"].imacs_screening
    assert not by_key["diagnosis", "myositis-antibodies"].imacs_screening
    # The work-up's undone items are overdue until the window's end date (2027-03-01).
    assert by_key["diagnosis", "esr"].status == "overdue"
    assert by_key["diagnosis", "esr"].lapses_on == "2027-03-01"
    assert PatientRow.from_json(row.to_json()) == row


def test_a_state_line_from_before_rev_3_is_assessed_again(tmp_path: Path) -> None:
    """A row without `scope` (its items do not say what they count for) is not measured."""
    old = _row("Patient/1", "high", _item("diagnosis", "cbc", "2024-06-01", "overdue"))
    data = old.to_json()
    del data["scope"], data["plan_open"]
    for item in data["items"]:
        item["superseded"] = False
    with pytest.raises(KeyError):
        PatientRow.from_json(data)
    state = StateFile(tmp_path, "r0")
    state.append(Done("1", "written", old))
    state.path.write_text(
        state.path.read_text(encoding="utf-8")
        + json.dumps({"patient_id": "2", "status": "written", "row": data})
        + "\n",
        encoding="utf-8",
    )
    assert set(StateFile(tmp_path, "r0").load()) == {"1"}


def test_diagnosed_2020_nothing_recorded_assessed_2026_lapses_into_one_notice(
    knowledge: Knowledge, population: PopulationConfig
) -> None:
    p = f.patient("old", birth_date="1970-01-15")
    resources = [p, f.iim_condition(p, onset="2020-03-01", recorded="2020-03-01")]
    run = Engine(knowledge).assess(f.bundle(*resources), now=NOW)
    result = run.results[0]
    assert [n.id for n in result.plan.assessment.notices].count("workup-not-recorded") == 1
    assert not any(map(result.plan.orders_now, result.plan.items))  # no firm order years later
    row = patient_row(result, p, knowledge, "Patient/old")
    assert row.scope == "window-closed" and not row.plan_open
    assert {i.status for i in row.items} == {"missed"}
    assert worklist([row], NOW, 30) == []
    overdue = _measure(population, "dm-any-overdue")
    report = measure_report(knowledge, overdue, [row], (date(2026, 1, 1), NOW), subject_list=False)
    assert _counts(report) == [1, 0, 0]  # a plan, not open, not overdue
    # Its work-up, read back over 2020: the round ended then and was not done.
    workup = _measure(population, "dm-workup-at-diagnosis")
    past = measure_report(
        knowledge, workup, [row], (date(2020, 1, 1), date(2020, 12, 31)), subject_list=False
    )
    assert _counts(past) == [1, 1, 0]


def test_high_risk_patient_with_every_firm_item_done_is_owed_nothing(
    knowledge: Knowledge, population: PopulationConfig
) -> None:
    p = f.patient("done", birth_date="1970-01-15")
    resources: list[dict[str, Any]] = [
        p,
        f.iim_condition(p, onset="2024-03-01", recorded="2024-03-01"),
        f.antibody(p, "tif1g", effective="2024-03-05"),
        # The ILD screening at diagnosis (not IMACS), done on time.
        f.done_request(p, knowledge, "hrct-chest", "2024-03-20"),
        f.done_request(p, knowledge, "pft-dlco", "2024-03-20"),
    ]
    resources += [f.done_request(p, knowledge, t, "2024-04-01") for t in ALL_FIRM_WORKUP]
    for when in ("2025-03-15", "2026-03-15"):
        resources += [f.done_request(p, knowledge, t, when) for t in BASIC]
    row = _assessed(knowledge, resources, NOW)
    assert row.tier == "high"
    items = worklist([row], NOW, 30)
    # Nothing firm is owed now (year 3 opens 2027-03-01); the "consider" add-ons stay open in
    # the plan, but their window has passed: the patient is not on the worklist.
    assert items == []
    assert any(i.conditional and i.status == "due" for i in row.items)
    during = worklist([row], date(2024, 5, 1), 30)
    assert {w.test for w in during if w.status == "consider"} >= {
        knowledge.ruleset.tests[t].display for t in ("pet-ct", "upper-gi-endoscopy", "colonoscopy")
    }
    period = (date(2024, 1, 1), NOW)

    def counts(measure_id: str) -> list[int]:
        return _counts(
            measure_report(
                knowledge, _measure(population, measure_id), [row], period, subject_list=False
            )
        )

    assert counts("dm-any-overdue") == [1, 1, 0]
    assert counts("dm-workup-at-diagnosis") == [1, 1, 1]  # undone "consider" items never count
    assert counts("dm-enhanced-panel") == [1, 1, 1]
    assert counts("dm-yearly-rounds-high") == [3, 2, 2]  # year-1, year-2 ended; year-3 not yet
    # Lung: the ILD screening (HRCT and PFTs) done on time.
    assert counts("dm-lung-programme") == [2, 2, 2]


# --- worklist ----------------------------------------------------------------------------


def test_worklist_sections_overdue_then_due_soon_then_consider() -> None:
    rows = [
        _row("Patient/a", "high", _item("diagnosis", "cbc", "2026-06-01", "overdue")),
        _row(
            "Patient/b",
            "high",
            _item("diagnosis", "cbc", "2025-06-01", "overdue"),
            _item("year-1", "cbc", "2026-12-20", "due"),  # within 30 days
            _item("year-2", "cbc", "2027-12-20", "upcoming"),  # too far
            _item("diagnosis", "lft", "2025-06-01", "done", "2025-05-01"),
            _item("diagnosis", "esr", "2025-06-01", "done-late", "2025-07-01"),
            _item("year-0", "crp", "2025-06-01", "missed"),  # lapsed: never listed
            _item("diagnosis", "pet-ct", "2026-12-20", "due", conditional=True),
            _item("year-2", "pet-ct", "2027-06-01", "upcoming", conditional=True),
            # Past its window: open in the plan, not on the worklist.
            _item("diagnosis", "colonoscopy", "2025-06-01", "due", conditional=True),
            _item("lung-6m", "pft-dlco", "2026-11-01", "overdue", lung=True),
        ),
        _row(
            "Patient/c", "high", _item("diagnosis", "pet-ct", "2027-01-10", "due", conditional=True)
        ),
    ]
    items = worklist(rows, NOW, 30)
    assert [(w.status, w.patient, w.test, w.days_overdue) for w in items] == [
        ("overdue", "Patient/b", "cbc", 549),
        ("overdue", "Patient/a", "cbc", 184),
        ("overdue", "Patient/b", "pft-dlco", 31),
        ("due soon", "Patient/b", "cbc", 0),
        ("consider", "Patient/b", "pet-ct", 0),
        ("consider", "Patient/c", "pet-ct", 0),
    ]
    assert [w.kind for w in items][2] == "lung (not IMACS)"
    csv_text = to_csv(items)
    assert csv_text.splitlines()[0].startswith("section,patient,tier,round,item,kind")
    assert len(csv_text.splitlines()) == 7
    fhir_list = to_fhir_list(items, NOW)
    entries = [(e["item"]["reference"], e["flag"]["text"]) for e in fhir_list["entry"]]
    assert [e[0] for e in entries] == [
        "Patient/b",
        "Patient/a",
        "Patient/b",
        "Patient/b",
        "Patient/c",
    ]
    assert entries[0][1].startswith("overdue: cbc") and "pft-dlco" in entries[0][1]
    assert entries[3][1].startswith("consider: pet-ct")
    assert "emptyReason" in to_fhir_list([], NOW)


# --- measures ----------------------------------------------------------------------------


def test_workup_counts_only_firm_imacs_items_on_time(
    knowledge: Knowledge, population: PopulationConfig
) -> None:
    workup = _measure(population, "dm-workup-at-diagnosis")
    others = (
        _item("diagnosis", "pet-ct", "2024-06-01", "due", conditional=True),  # consider
        _item("diagnosis", "myositis-antibodies", "2024-06-01", "overdue", imacs=False),
        _item("lung-baseline", "pft-dlco", "2024-04-01", "missed", lung=True),
    )
    on_time = _row(
        "Patient/1",
        "standard",
        _item("diagnosis", "cbc", "2024-06-01", "done", "2024-05-01"),
        *others,
    )
    late = _row(
        "Patient/2", "standard", _item("diagnosis", "cbc", "2024-06-01", "done-late", "2024-07-01")
    )
    undone = _row("Patient/3", "high", _item("diagnosis", "cbc", "2024-06-01", "missed"), org=None)
    before = _row(
        "Patient/4", "standard", _item("diagnosis", "cbc", "2023-06-01", "done", "2023-05-01")
    )
    only_consider = _row(  # a known cancer: every screening item is "consider"
        "Patient/5", "high", _item("diagnosis", "cbc", "2024-06-01", "due", conditional=True)
    )
    closed = _row(  # the window closed, everything done: still counted
        "Patient/6",
        "moderate",
        _item("diagnosis", "cbc", "2024-06-01", "done", "2024-03-02"),
        scope="window-closed",
        plan_open=False,
    )
    rows = [closed, undone, late, on_time, before, only_consider]
    period = (date(2024, 1, 1), date(2024, 12, 31))
    report = measure_report(knowledge, workup, rows, period, subject_list=True)
    group = report["group"][0]
    assert _counts(report) == [5, 4, 2]
    assert group["measureScore"]["value"] == 0.5
    # Subject lists in patient id order, whatever the rows' order.
    assert _subjects(report, "numerator") == [("Patient/1", ""), ("Patient/6", "")]
    assert [s for s, _ in _subjects(report, "initial-population")] == [
        f"Patient/{n}" for n in (1, 2, 3, 4, 6)
    ]
    org = next(s for s in group["stratifier"] if s["code"][0]["text"] == "organization")
    assert [s["value"]["text"] for s in org["stratum"]] == ["(not recorded)", "Organization/a"]
    tier = next(s for s in group["stratifier"] if s["code"][0]["text"] == "tier")
    assert [
        (s["value"]["text"], [p["count"] for p in s["population"]]) for s in tier["stratum"]
    ] == [
        ("high", [1, 1, 0]),
        ("moderate", [1, 1, 1]),
        ("standard", [3, 2, 1]),
    ]
    # Out of the guideline (juvenile, no tier) never counts.
    juvenile = _row("Patient/7", "high", *on_time.items, scope="juvenile")
    assert units(juvenile, workup, None, period[0], period[1]) == []


def test_a_window_ending_on_the_period_bounds_counts_and_one_ending_later_does_not(
    population: PopulationConfig,
) -> None:
    workup = _measure(population, "dm-workup-at-diagnosis")
    start, end = date(2024, 1, 1), date(2024, 6, 1)
    for due_end, counted in (
        ("2024-01-01", True),
        ("2024-06-01", True),
        ("2023-12-31", False),
        ("2024-06-02", False),
    ):
        row = _row("Patient/1", "high", _item("diagnosis", "cbc", due_end, "due"), now=end)
        assert [u.denominator for u in units(row, workup, None, start, end)] == [counted]
    # A window not yet ended on the evaluation date does not count, whatever the period says.
    row = _row("Patient/1", "high", _item("diagnosis", "cbc", "2024-06-01", "due"), now=start)
    assert not units(row, workup, None, start, end)[0].denominator


def test_enhanced_panel_reads_only_enhanced_tests_of_moderate_and_high(
    knowledge: Knowledge, population: PopulationConfig
) -> None:
    enhanced = _measure(population, "dm-enhanced-panel")
    tests = {t for p in enhanced.panels for t in knowledge.ruleset.panels[p].tests}
    row = _row(
        "Patient/1",
        "moderate",
        _item("diagnosis", "cbc", "2024-06-01", "overdue"),  # basic: not counted
        _item("diagnosis", "ct-ncap", "2024-06-01", "done", "2024-04-01"),
        _item("diagnosis", "pet-ct", "2024-06-01", "due", conditional=True),
    )
    [unit] = units(row, enhanced, tests, date(2024, 1, 1))
    assert unit.denominator and unit.numerator
    standard = _row("Patient/2", "standard", _item("diagnosis", "ct-ncap", "2024-06-01", "done"))
    assert units(standard, enhanced, tests, date(2024, 1, 1)) == []


def test_yearly_rounds_count_each_round_ended_in_the_period(
    knowledge: Knowledge, population: PopulationConfig
) -> None:
    yearly = _measure(population, "dm-yearly-rounds-high")
    a = _row(
        "Patient/a",
        "high",
        _item("year-1", "cbc", "2025-06-01", "done", "2025-03-10", start="2025-03-01"),
        _item("year-1", "lft", "2025-06-01", "done", "2025-03-10", start="2025-03-01"),
        _item("year-2", "cbc", "2026-06-01", "done-late", "2026-07-01", start="2026-03-01"),
        _item("year-3", "cbc", "2026-11-01", "done", "2026-08-10", start="2026-08-01"),
        _item("year-3", "pet-ct", "2026-11-01", "due", conditional=True, start="2026-08-01"),
    )
    b = _row(
        "Patient/b",
        "high",
        _item("year-1", "cbc", "2026-04-01", "missed", start="2026-01-01"),
        _item("year-2", "cbc", "2027-04-01", "upcoming", start="2027-01-01"),
    )
    moderate = _row("Patient/c", "moderate", _item("year-1", "cbc", "2026-04-01", "overdue"))
    report = measure_report(
        knowledge, yearly, [b, moderate, a], (date(2025, 7, 1), NOW), subject_list=True
    )
    # a: year-2 (late) and year-3 (on time; the last round counts like the others); b: year-1.
    assert _counts(report) == [5, 3, 1]
    assert _subjects(report, "denominator") == [
        ("Patient/a", "year-2"),
        ("Patient/a", "year-3"),
        ("Patient/b", "year-1"),
    ]
    assert _subjects(report, "numerator") == [("Patient/a", "year-3")]


def test_overdue_counts_open_plans_with_a_firm_imacs_item_overdue(
    knowledge: Knowledge, population: PopulationConfig
) -> None:
    overdue = _measure(population, "dm-any-overdue")
    rows = [
        _row("Patient/1", "high", _item("diagnosis", "cbc", "2026-06-01", "overdue")),
        _row("Patient/2", "high", _item("diagnosis", "cbc", "2024-06-01", "done", "2024-05-01")),
        _row("Patient/3", "high", _item("lung-6m", "pft-dlco", "2026-11-01", "overdue", lung=True)),
        _row(
            "Patient/4",
            "high",
            _item("diagnosis", "myositis-antibodies", "2026-11-01", "overdue", imacs=False),
        ),
        _row("Patient/5", "high", _item("year-1", "cbc", "2025-06-01", "missed")),
        _row(
            "Patient/6",
            "high",
            _item("diagnosis", "cbc", "2020-06-01", "missed"),
            scope="window-closed",
            plan_open=False,
        ),
        _row(
            "Patient/7", "high", _item("diagnosis", "pet-ct", "2026-06-01", "due", conditional=True)
        ),
    ]
    report = measure_report(knowledge, overdue, rows, (date(2026, 1, 1), NOW), subject_list=True)
    assert _counts(report) == [7, 6, 1] and report["type"] == "subject-list"
    assert _subjects(report, "numerator") == [("Patient/1", "")]
    summary = measure_report(knowledge, overdue, rows, (date(2026, 1, 1), NOW), subject_list=False)
    assert summary["type"] == "summary" and "contained" not in summary


def test_lung_programme_counts_lung_items_due_in_the_period(
    knowledge: Knowledge, population: PopulationConfig
) -> None:
    lung = _measure(population, "dm-lung-programme")
    row = _row(
        "Patient/1",
        "standard",
        _item("lung-baseline", "hrct-chest", "2026-04-01", "done", "2026-03-20", lung=True),
        _item("lung-baseline", "pft-dlco", "2026-04-01", "done-late", "2026-05-01", lung=True),
        _item("lung-6m", "pft-dlco", "2026-12-01", "overdue", lung=True),
        _item("lung-12m", "pft-dlco", "2027-06-01", "upcoming", lung=True),
        _item("diagnosis", "cbc", "2026-06-01", "done", "2026-04-01"),  # IMACS: not counted
    )
    report = measure_report(knowledge, lung, [row], (date(2026, 1, 1), NOW), subject_list=True)
    assert _counts(report) == [4, 3, 1]
    assert _subjects(report, "numerator") == [("Patient/1", "lung-baseline: hrct-chest")]
    workup = _measure(population, "dm-workup-at-diagnosis")
    [unit] = units(row, workup, None, date(2026, 1, 1))
    assert unit.numerator  # lung items never count in the screening measures


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
    from fhir_dm.cli.main import main

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
