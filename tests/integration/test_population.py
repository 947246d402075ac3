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
from datetime import date
from pathlib import Path
from typing import Any

import pytest
import requests

from fhir_dm.core.assess import Engine
from fhir_dm.fhir.client import FhirClient
from fhir_dm.knowledge.load import load_knowledge
from fhir_dm.knowledge.models import Knowledge
from fhir_dm.locks import PatientLocks
from fhir_dm.population.config import load_population_config
from fhir_dm.population.finder import find_iim_patients, iim_search_tokens
from fhir_dm.population.measures import measure_report
from fhir_dm.population.run import Done, PopulationRunner, StateFile
from fhir_dm.population.worklist import worklist
from fhir_dm.writeback import WriteBack
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
    """Status on NOW from the case's done dates: on time within [start - lookback, end]; late
    after the window, before it lapses and before a later round of the same test opens (less
    its lookback); otherwise upcoming, due, overdue (firm only) or missed."""
    rs = knowledge.ruleset
    done: dict[str, list[date]] = {}
    for what, when in case.done:
        for t in done_tests(knowledge, case, what):
            done.setdefault(t, []).append(date.fromisoformat(when))
    out = []
    for round_id, test, start, end, lapses, kind in round_items:
        back = _months(start, -rs.lookback_months(test))
        later = [
            _months(s, -rs.lookback_months(test))
            for r, t, s, _, _, _ in round_items
            if t == test and s > end
        ]
        until = min([lapses, *later])
        dates = done.get(test, [])
        if any(back <= d <= end for d in dates):
            status = "done"
        elif any(end < d < until and d <= NOW for d in dates):
            status = "done-late"
        elif start > NOW:
            status = "upcoming"
        elif lapses <= NOW:
            status = "missed"
        elif end >= NOW or kind == "consider":
            status = "due"
        else:
            status = "overdue"
        out.append(Expected(case.key, round_id, test, start, end, lapses, kind, status))
    return out


def expected_items(knowledge: Knowledge, case: Case) -> list[Expected]:
    """§6: the work-up at diagnosis (basic; and enhanced for moderate and high), high risk a
    basic round at 12, 24 and 36 months, each due within 3 months; PET-CT and GI endoscopy
    "consider" for high risk; sex-specific tests "consider" when the sex is unknown; the
    antibody panel (antibodies untested). §7: the lung rounds of the configuration.
    §13: the work-up lapses at the window's end (diagnosis + 36 months), a yearly round when
    the next opens, the last one at the window's end + the grace; a lung round when the next
    lung round opens, the last at its due end + the grace."""
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
            last = year == 3
            lapses = _months(window_end, grace) if last else _months(d, 12 * (year + 1))
            add(f"year-{year}", list(rs.panels["basic"].tests), 12 * year, lapses, "imacs")
    if case.mda5:
        rounds = sorted(rs.lung_surveillance.rounds, key=lambda r: r.offset_months)
        for n, rnd in enumerate(rounds):
            start = _months(d, rnd.offset_months)
            end = _months(start, rnd.due_within_months)
            nxt = rounds[n + 1] if n + 1 < len(rounds) else None
            lapses = _months(d, nxt.offset_months) if nxt else _months(end, grace)
            items += [(rnd.id, t, start, end, lapses, "lung") for t in rnd.tests]
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
                if e.status == "due":
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
