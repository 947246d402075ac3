"""The population view on a real HAPI FHIR: find the IIM patients, write each once, resume, measure.

The population (`tests/population_data.MEASURE_CASES`: nine IIM patients, two without) is
loaded with transactions built from the test factories; evaluation date 2026-12-02. The
expected measures and worklist are worked out here, independently of the code under test,
from the cases' diagnosis dates and done records by the definitions of clinical-logic §6, §7,
§11 (rev 3) and §13; the test then compares them with what the run on the server gives.
"""

from __future__ import annotations

import calendar
import io
import uuid
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests

from fhir_dm.core.assess import Engine
from fhir_dm.fhir.client import FhirClient
from fhir_dm.knowledge.load import load_knowledge
from fhir_dm.knowledge.models import Knowledge
from fhir_dm.population.config import load_population_config
from fhir_dm.population.finder import find_iim_patients, iim_search_tokens
from fhir_dm.population.measures import measure_report
from fhir_dm.population.run import Done, PopulationRunner, StateFile
from fhir_dm.population.worklist import worklist
from fhir_dm.writeback.locks import PatientLocks
from fhir_dm.writeback.writer import WriteBack
from tests.population_data import MEASURE_CASES, Case, done_tests, measure_population, transactions

pytestmark = pytest.mark.integration
NOW = date(2026, 12, 2)
Json = dict[str, Any]


# --- the §11 definitions, re-implemented from the cases' dates (not the code under test) -----


def _months(day: date, months: int) -> date:
    index = day.year * 12 + day.month - 1 + months
    year, month = divmod(index, 12)
    return date(year, month + 1, min(day.day, calendar.monthrange(year, month + 1)[1]))


@dataclass(frozen=True)
class Expected:
    """One planned item as §6, §7 and §13 date it, and its status on NOW."""

    case: str
    round_id: str
    test: str
    start: date
    end: date
    lapses: date
    kind: str  # imacs (firm IMACS cancer screening), lung, antibodies, consider
    status: str


def _status(
    knowledge: Knowledge, case: Case, round_items: list[tuple[str, str, date, date, date, str]]
) -> list[Expected]:
    """Status on NOW from the case's done dates. A record counts for one item only (one PFT is
    one PFT), items with the earliest due end first, each taking the earliest record that fits:
    on time within [start - lookback, end]; then, for items still undone after their window,
    late: before the item lapses and before a later round of the same test opens (less its
    lookback). Otherwise upcoming, due, overdue (firm only) or missed."""
    rs = knowledge.ruleset
    records: dict[str, list[date]] = {}
    for what, when in case.done:
        for t in done_tests(knowledge, case, what):
            records.setdefault(t, []).append(date.fromisoformat(when))
    free = {t: sorted(dates) for t, dates in records.items()}
    # Earliest due end first (then start, round), as one record serves one item.
    order = sorted(
        range(len(round_items)),
        key=lambda n: (round_items[n][3], round_items[n][2], round_items[n][0]),
    )
    status: dict[int, str] = {}

    def claim(test: str, first: date, last: date) -> bool:
        """Take the earliest free record of the test dated in [first, last]."""
        found = next((d for d in free.get(test, []) if first <= d <= last), None)
        if found is not None:
            free[test].remove(found)
        return found is not None

    for n in order:
        _, test, start, end, _, _ = round_items[n]
        back = _months(start, -rs.lookback_months(test))
        if claim(test, back, end):
            status[n] = "done"
    for n in order:
        _, test, start, end, lapses, _ = round_items[n]
        if n in status or end >= NOW:
            continue
        later = [
            _months(s, -rs.lookback_months(test))
            for _, t, s, _, _, _ in round_items
            if t == test and s > end
        ]
        until = min([lapses, *later])
        if claim(test, end + timedelta(days=1), min(until - timedelta(days=1), NOW)):
            status[n] = "done-late"
    out = []
    for n, (round_id, test, start, end, lapses, kind) in enumerate(round_items):
        if n in status:
            state = status[n]
        elif start > NOW:
            state = "upcoming"
        elif lapses <= NOW:
            state = "missed"
        elif end >= NOW or kind == "consider":
            state = "due"
        else:
            state = "overdue"
        out.append(Expected(case.key, round_id, test, start, end, lapses, kind, state))
    return out


def _series(
    rounds: list[tuple[str, tuple[str, ...], date, date]], grace: int, kind: str
) -> list[tuple[str, str, date, date, date, str]]:
    """§13 "next-round" over one series of rounds (id, tests, start, end) in date order: an
    item lapses when the next round that repeats its test opens, never before the day after
    its own due end; when no later round repeats it, at its due end + the grace."""
    out = []
    for n, (round_id, tests, start, end) in enumerate(rounds):
        for t in tests:
            later = [s for _, ts, s, _ in rounds[n + 1 :] if t in ts]
            lapses = max(later[0], end + timedelta(days=1)) if later else _months(end, grace)
            out.append((round_id, t, start, end, lapses, kind))
    return out


def expected_items(knowledge: Knowledge, case: Case) -> list[Expected]:
    """§6: the work-up at diagnosis (basic; and enhanced for moderate and high), high risk a
    basic round at 12, 24 and 36 months, each due within 3 months; PET-CT and GI endoscopy
    "consider" for high risk; sex-specific tests "consider" when the sex is unknown; the
    antibody panel (antibodies untested). §7 (rev 3): lung monitoring (here anti-MDA5) by the
    configured lung rounds, the early round replacing the one it names; every other adult IIM
    patient ILD screening at diagnosis (HRCT and PFT), each test skipped when done in the
    months before the diagnosis. §13: the work-up lapses at the window's end (diagnosis + 36
    months), a yearly item when the next round opens (not before the day after its due end),
    the last one at the window's end + the grace; a lung item when the next lung round that
    repeats its test opens (same bound), else at its due end + the grace."""
    rs = knowledge.ruleset
    grace = rs.plan_life.overdue_grace_months
    d = date.fromisoformat(case.diagnosis)
    window_end = _months(d, 36)
    items: list[tuple[str, str, date, date, date, str]] = []

    def add(round_id: str, tests: list[str], offset: int, lapses: date, kind: str) -> None:
        start = _months(d, offset)
        for t in dict.fromkeys(tests):
            sex = rs.tests[t].sex
            if sex is not None and case.gender is not None and sex != case.gender:
                continue
            firm = kind if sex is None or case.gender is not None else "consider"
            items.append((round_id, t, start, _months(start, 3), lapses, firm))

    panels = ["basic"] + (["enhanced"] if case.tier in ("moderate", "high") else [])
    add("diagnosis", [t for p in panels for t in rs.panels[p].tests], 0, window_end, "imacs")
    add("diagnosis", [rs.antibody_testing.test], 0, window_end, "antibodies")
    if case.tier == "high":
        consider = ["pet-ct", "upper-gi-endoscopy", "colonoscopy"]
        add("diagnosis", consider, 0, window_end, "consider")
        for year in (1, 2, 3):
            end = _months(d, 12 * year + 3)
            if year == 3:
                lapses = _months(window_end, grace)
            else:
                lapses = max(_months(d, 12 * (year + 1)), end + timedelta(days=1))
            add(f"year-{year}", list(rs.panels["basic"].tests), 12 * year, lapses, "imacs")
    lung = rs.lung_surveillance
    if case.mda5:
        rounds = list(lung.rounds)
        if lung.early is not None:  # anti-MDA5: the early round replaces the one it names
            rounds = [lung.early.round if r.id == lung.early.replaces else r for r in rounds]
        rounds.sort(key=lambda r: r.offset_months)
        dated = [
            (
                r.id,
                r.tests,
                _months(d, r.offset_months),
                _months(d, r.offset_months + r.due_within_months),
            )
            for r in rounds
        ]
        items += _series(dated, grace, "lung")
    else:
        assert lung.screening is not None
        rnd = lung.screening.round
        since = _months(d, -lung.screening.unless_done_within_months)
        before = {
            t
            for what, when in case.done
            for t in done_tests(knowledge, case, what)
            if since <= date.fromisoformat(when) < d
        }
        tests = tuple(t for t in rnd.tests if t not in before)
        start = _months(d, rnd.offset_months)
        items += _series(
            [(rnd.id, tests, start, _months(start, rnd.due_within_months))], grace, "lung"
        )
    return _status(knowledge, case, items)


def expected_measures(
    knowledge: Knowledge, period: tuple[date, date]
) -> dict[str, tuple[list[int], list[tuple[str, str]]]]:
    """Per measure: [initial, denominator, numerator] and the numerator's (case, unit)."""
    start, end = period
    rs = knowledge.ruleset
    enhanced = set(rs.panels["enhanced"].tests)
    out: dict[str, tuple[list[int], list[tuple[str, str]]]] = {}

    def completion(
        measure_id: str, tiers: set[str], pick: Any, unit: Any
    ) -> tuple[list[int], list[tuple[str, str]]]:
        counts, numerator = [0, 0, 0], []
        for case in MEASURE_CASES:
            if case.tier not in tiers:
                continue
            groups: dict[str, list[Expected]] = {}
            for e in expected_items(knowledge, case):
                if pick(e):
                    groups.setdefault(unit(e), []).append(e)
            for label, group in groups.items():
                counts[0] += 1
                ended = [e for e in group if start <= e.end <= min(end, NOW)]
                if ended:
                    counts[1] += 1
                    if all(e.status == "done" for e in ended):
                        counts[2] += 1
                        numerator.append((case.key, label))
        return counts, numerator

    every = {"standard", "moderate", "high"}
    out["dm-workup-at-diagnosis"] = completion(
        "w", every, lambda e: e.kind == "imacs" and e.round_id == "diagnosis", lambda e: ""
    )
    out["dm-enhanced-panel"] = completion(
        "e",
        {"moderate", "high"},
        lambda e: e.kind == "imacs" and e.round_id == "diagnosis" and e.test in enhanced,
        lambda e: "",
    )
    out["dm-yearly-rounds-high"] = completion(
        "y",
        {"high"},
        lambda e: e.kind == "imacs" and e.round_id.startswith("year-"),
        lambda e: e.round_id,
    )
    out["dm-lung-programme"] = completion(
        "l", every, lambda e: e.kind == "lung", lambda e: f"{e.round_id}: {e.test}"
    )
    counts, numerator = [0, 0, 0], []
    for case in MEASURE_CASES:
        items = expected_items(knowledge, case)
        firm = [e for e in items if e.kind != "consider"]
        window_end = _months(date.fromisoformat(case.diagnosis), 36)
        owed = any(e.status in ("upcoming", "due", "overdue") for e in firm)
        open_plan = window_end >= NOW or owed
        counts[0] += 1
        counts[1] += open_plan
        if open_plan and any(e.kind == "imacs" and e.status == "overdue" for e in items):
            counts[2] += 1
            numerator.append((case.key, ""))
    out["dm-any-overdue"] = (counts, numerator)
    return out


@pytest.fixture(scope="module")
def knowledge() -> Knowledge:
    return load_knowledge()


@pytest.fixture(scope="module")
def loaded(fhir_base_url: str, knowledge: Knowledge) -> dict[str, str]:
    """Load the population; returns {case key: patient id} and its "tag"."""
    tag = f"pop{uuid.uuid4().hex[:6]}"
    resources, ids = measure_population(tag, knowledge)
    for bundle in transactions(resources):
        response = requests.post(
            fhir_base_url,
            json=bundle,
            headers={"Content-Type": "application/fhir+json"},
            timeout=120,
        )
        assert response.status_code == 200, response.text[:500]
    return {**ids, "tag": tag}


def _runner(base: str, knowledge: Knowledge, tmp: Path) -> PopulationRunner:
    return PopulationRunner(
        lambda: FhirClient(base), Engine(knowledge), knowledge, PatientLocks(tmp)
    )


def _ours(found: list[str], tag: str) -> list[str]:
    """Other tests share the server: keep this population's patients."""
    return [p for p in found if p.startswith(f"{tag}-")]


def test_population_run_finds_writes_once_resumes_and_measures(
    fhir_base_url: str, knowledge: Knowledge, loaded: dict[str, str], tmp_path: Path
) -> None:
    tag = loaded["tag"]
    cfg = load_population_config(knowledge)
    with FhirClient(fhir_base_url) as client:
        found = _ours(find_iim_patients(client, iim_search_tokens(knowledge, cfg.finder)), tag)
    everyone = sorted(loaded[c.key] for c in MEASURE_CASES)
    assert found == everyone  # exactly the IIM patients

    # An interrupted run: stopped after two patients, then resumed with the same run id.
    stop_after: list[Done] = []

    def interrupt(done: Done) -> None:
        stop_after.append(done)
        if len(stop_after) == 2:
            raise KeyboardInterrupt

    quiet = io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        _runner(fhir_base_url, knowledge, tmp_path).run(
            found,
            now=NOW,
            preview=False,
            workers=1,
            run_id="first",
            state=StateFile(tmp_path, "first"),
            progress_stream=quiet,
            on_done=interrupt,
        )
    resumed: list[str] = []
    result = _runner(fhir_base_url, knowledge, tmp_path).run(
        found,
        now=NOW,
        preview=False,
        workers=2,
        run_id="first",
        state=StateFile(tmp_path, "first"),
        progress_stream=quiet,
        on_done=lambda d: resumed.append(d.patient_id),
    )
    assert not result.failures, result.failures
    # Two seen through, those in flight then finished and recorded; the rest resumed.
    assert result.skipped >= 2 and len(resumed) == len(found) - result.skipped
    assert not set(resumed) & {d.patient_id for d in stop_after}
    statuses = sorted((d.status, d.patient_id) for d in result.done)
    assert [s for s, _ in statuses] == ["written"] * len(found), statuses  # each written once
    closed = {loaded["lapsed"], loaded["closed"]}  # their window closed, nothing owed
    with FhirClient(fhir_base_url) as client:
        for patient_id in found:
            plans = client.search(
                "CarePlan", {"subject": f"Patient/{patient_id}", "status": "active"}
            )
            assert len(plans) == (0 if patient_id in closed else 1), patient_id
            orders = client.search(
                "ServiceRequest", {"subject": f"Patient/{patient_id}", "status": "active"}
            )
            if patient_id in closed:
                assert orders == [], patient_id  # never firm orders years later

    again = _runner(fhir_base_url, knowledge, tmp_path).run(
        found,
        now=NOW,
        preview=False,
        workers=2,
        run_id="second",
        state=StateFile(tmp_path, "second"),
        progress_stream=quiet,
    )
    # A re-run writes nothing.
    assert sorted(d.status for d in again.done) == ["unchanged"] * len(found)


def test_population_measures_and_worklist_follow_the_definitions(
    fhir_base_url: str, knowledge: Knowledge, loaded: dict[str, str], tmp_path: Path
) -> None:
    """Every patient previewed on NOW; rows, measures and worklist against the definitions."""
    tag = loaded["tag"]
    cfg = load_population_config(knowledge)
    with FhirClient(fhir_base_url) as client:
        found = _ours(find_iim_patients(client, iim_search_tokens(knowledge, cfg.finder)), tag)
    result = _runner(fhir_base_url, knowledge, tmp_path).run(
        found,
        now=NOW,
        preview=True,
        workers=2,
        run_id="measures",
        progress_stream=io.StringIO(),
    )
    assert not result.failures, result.failures
    rows = sorted(result.rows, key=lambda r: r.patient)
    by_case = {c.key: r for c, r in zip(MEASURE_CASES, rows, strict=True)}
    assert {k: r.tier for k, r in by_case.items()} == {c.key: c.tier for c in MEASURE_CASES}
    cfg_measures = {m.id: m for m in cfg.measures}
    assert set(cfg_measures) == {
        "dm-workup-at-diagnosis",
        "dm-enhanced-panel",
        "dm-yearly-rounds-high",
        "dm-any-overdue",
        "dm-lung-programme",
    }

    # The rows' statuses are those the definitions give, item by item (firm and "consider").
    for case in MEASURE_CASES:
        want = {(e.round_id, e.test): e.status for e in expected_items(knowledge, case)}
        got = {(i.round_id, i.test_id): i.status for i in by_case[case.key].items}
        assert got == want, case.key

    key_of = {f"Patient/{loaded[c.key]}": c.key for c in MEASURE_CASES}
    for period in ((date(2026, 1, 1), NOW), (date(2024, 1, 1), NOW)):
        expected = expected_measures(knowledge, period)
        for measure_id, measure in cfg_measures.items():
            report = measure_report(knowledge, measure, rows, period, subject_list=True)
            group = report["group"][0]
            counts = [p["count"] for p in group["population"]]
            numerator = next(c for c in report["contained"] if c["id"] == "numerator-subjects")
            subjects = [key_of[e["item"]["reference"]] for e in numerator.get("entry", [])]
            want_counts, want_numerator = expected[measure_id]
            assert counts == want_counts, (measure_id, period)
            assert subjects == [k for k, _ in want_numerator], (measure_id, period)
            print(f"{measure_id} {period[0]}..{period[1]}: {counts}")

    # The cases the brief names, said plainly (the figures above already hold them).
    overdue = measure_report(
        knowledge, cfg_measures["dm-any-overdue"], rows, (date(2026, 1, 1), NOW), subject_list=True
    )
    numerator = next(c for c in overdue["contained"] if c["id"] == "numerator-subjects")
    in_numerator = {key_of[e["item"]["reference"]] for e in numerator["entry"]}
    assert "lapsed" not in in_numerator and "all-done" not in in_numerator
    assert {"late", "nothing", "moderate"} <= in_numerator
    with FhirClient(fhir_base_url) as client:
        lapsed = WriteBack(client, Engine(knowledge), PatientLocks(tmp_path)).assess_patient(
            loaded["lapsed"], now=NOW, preview=True
        )
    notices = [n.id for n in lapsed.result.plan.assessment.notices]
    assert notices.count("workup-not-recorded") == 1
    assert not any(map(lapsed.result.plan.orders_now, lapsed.result.plan.items))

    # The worklist: overdue firm items, then due within 30 days, then open "consider" items.
    items = worklist(rows, NOW, cfg.worklist.soon_due_days)
    sections = [w.status for w in items]
    assert sections == sorted(sections, key=("overdue", "due soon", "consider").index)
    want_sections: dict[str, set[str]] = {"overdue": set(), "due soon": set(), "consider": set()}
    horizon = date.fromordinal(NOW.toordinal() + cfg.worklist.soon_due_days)
    for case in MEASURE_CASES:
        for e in expected_items(knowledge, case):
            if e.kind == "consider":
                # Open and inside its own window: past it, no longer on the worklist.
                if e.status == "due" and e.end >= NOW:
                    want_sections["consider"].add(case.key)
            elif e.status == "overdue":
                want_sections["overdue"].add(case.key)
            elif e.status in ("due", "upcoming") and e.end <= horizon:
                want_sections["due soon"].add(case.key)
    got_sections = {
        section: {key_of[w.patient] for w in items if w.status == section}
        for section in want_sections
    }
    assert got_sections == want_sections
    # Every firm item of the high-risk patient is done: in no firm section; lapsed: nowhere.
    assert "all-done" not in got_sections["overdue"] | got_sections["due soon"]
    assert "lapsed" not in set().union(*got_sections.values())
    assert got_sections["due soon"] == {"new"}
    overdue_days = [w.days_overdue for w in items if w.status == "overdue"]
    assert overdue_days == sorted(overdue_days, reverse=True)
    print("worklist sections:", {k: sorted(v) for k, v in got_sections.items()})
