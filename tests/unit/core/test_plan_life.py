"""The plan's life over its three years (clinical-logic §13), on pinned dates.

A high-risk patient (TIF1-gamma positive, female) diagnosed on 2024-03-01: the work-up at
diagnosis is due 2024-03-01 to 2024-06-01, the yearly rounds from 2025-03-01, 2026-03-01 and
2027-03-01 (each due within 3 months); the window ends on 2027-03-01. The record is the same
on every date except that only tests dated by then are in it.
"""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

import pytest

from fhir_dm.core.assess import Engine, PatientResult
from tests import factories as f
from tests.unit.core.helpers import run_one

Json = dict[str, Any]
ROUNDS = ("diagnosis", "year-1", "year-2", "year-3")
WORKUP_NOTICE = "workup-not-recorded"

# When each round's tests were done, per course of events (none: never done).
ON_TIME = {"diagnosis": "2024-03-20", "year-1": "2025-03-20", "year-2": "2026-03-20",
           "year-3": "2027-03-20"}  # fmt: skip
LATE = {"diagnosis": "2024-08-01", "year-1": "2025-08-01", "year-2": "2026-08-01",
        "year-3": "2027-07-01"}  # fmt: skip
NEVER: dict[str, str] = {}

# Statuses, one letter each: Upcoming, Due, Overdue, done (X), done Late, Missed.
STATUS = {"U": "upcoming", "D": "due", "O": "overdue", "X": "done", "L": "done-late",
          "M": "missed"}  # fmt: skip
OPEN, CLOSED = "in-scope", "window-closed"
# date: (the status of the firm items of each round in ROUNDS order, of the "consider" items
# of the diagnosis round, the rounds with orders, the scope)
Row = tuple[str, str, str, str]
NEVER_DONE: dict[str, Row] = {
    "2024-03-10": ("D U U U", "D", "diagnosis", OPEN),
    "2024-07-01": ("O U U U", "D", "diagnosis", OPEN),
    # a month before the 12-month round opens: it is ordered ahead (the lead time)
    "2025-02-05": ("O U U U", "D", "diagnosis year-1", OPEN),
    "2025-07-01": ("O O U U", "D", "diagnosis year-1", OPEN),
    # the 24-month round opened on 2026-03-01: the 12-month one lapsed
    "2026-03-02": ("O M D U", "D", "diagnosis year-2", OPEN),
    "2027-02-15": ("O M O U", "D", "diagnosis year-2 year-3", OPEN),
    # the window's end date (2027-03-01) passed: the work-up lapsed into one notice
    "2027-03-02": ("M M M D", "M", "year-3", OPEN),
    "2027-08-01": ("M M M O", "M", "year-3", OPEN),
    # the last round lapsed at the window's end + 6 months (2027-09-01): the window closed
    "2027-09-02": ("M M M M", "M", "", CLOSED),
    "2028-01-01": ("M M M M", "M", "", CLOSED),
}
DONE_ON_TIME: dict[str, Row] = {
    "2024-03-10": ("D U U U", "D", "diagnosis", OPEN),
    "2024-07-01": ("X U U U", "D", "", OPEN),
    "2025-02-05": ("X U U U", "D", "year-1", OPEN),
    "2025-07-01": ("X X U U", "D", "", OPEN),
    "2026-03-02": ("X X D U", "D", "year-2", OPEN),
    "2027-02-15": ("X X X U", "D", "year-3", OPEN),
    "2027-03-02": ("X X X D", "M", "year-3", OPEN),
    # past the window's end date and nothing firm owed: the window closed
    "2027-08-01": ("X X X X", "M", "", CLOSED),
    "2027-09-02": ("X X X X", "M", "", CLOSED),
    "2028-01-01": ("X X X X", "M", "", CLOSED),
}
DONE_LATE: dict[str, Row] = {
    "2024-03-10": ("D U U U", "D", "diagnosis", OPEN),
    "2024-07-01": ("O U U U", "D", "diagnosis", OPEN),
    "2025-02-05": ("L U U U", "D", "year-1", OPEN),
    "2025-07-01": ("L O U U", "D", "year-1", OPEN),
    "2026-03-02": ("L L D U", "D", "year-2", OPEN),
    "2027-02-15": ("L L L U", "D", "year-3", OPEN),
    "2027-03-02": ("L L L D", "M", "year-3", OPEN),
    "2027-08-01": ("L L L L", "M", "", CLOSED),
    "2027-09-02": ("L L L L", "M", "", CLOSED),
    "2028-01-01": ("L L L L", "M", "", CLOSED),
}
COURSES = {
    "never-done": (NEVER, NEVER_DONE),
    "done-on-time": (ON_TIME, DONE_ON_TIME),
    "done-late": (LATE, DONE_LATE),
}
CASES = [
    pytest.param(course, day, id=f"{course}-{day}")
    for course, (_, table) in COURSES.items()
    for day in table
]


def _patient(pid: str = "life-1", diagnosed: str = "2024-03-01") -> list[Json]:
    """HRCT and PFTs done a month before the diagnosis: no ILD screening round, only the
    cancer plan (the lung programme is tested in test_ruleset_1_2)."""
    p = f.patient(pid, birth_date="1994-01-01", gender="female")
    screened = (date.fromisoformat(diagnosed) - timedelta(days=30)).isoformat()
    return [
        p,
        f.iim_condition(p, onset=diagnosed),
        f.antibody(p, "tif1g"),
        *f.lung_screened(p, screened),
    ]


def _firm_tests(engine: Engine, resources: list[Json], round_id: str) -> list[str]:
    """The firm tests of a round, as the plan schedules them for this patient."""
    plan = run_one(engine, *resources, now=date(2024, 3, 10)).plan
    return [i.test_id for i in plan.items if i.round_id == round_id and not i.conditional]


def _assess(engine: Engine, course: str, day: str) -> PatientResult:
    """The patient on `day`, with the tests of each round done as the course says (only
    records dated by then)."""
    resources = _patient()
    done_on, _ = COURSES[course]
    records = [
        f.done_request(resources[0], engine.knowledge, test_id, when)
        for round_id, when in done_on.items()
        if when <= day
        for test_id in _firm_tests(engine, resources, round_id)
    ]
    return run_one(engine, *resources, *records, now=date.fromisoformat(day))


def _statuses(result: PatientResult, round_id: str, *, conditional: bool) -> set[str]:
    plan = result.plan
    return {
        plan.status(i)
        for i in plan.items
        if i.round_id == round_id and i.conditional == conditional
    }


def _ordered(result: PatientResult) -> dict[str, set[str]]:
    """The tests ordered now, per round (from each order's identifier)."""
    out: dict[str, set[str]] = {}
    for r in result.service_requests:
        round_id, test_id = r["identifier"][0]["value"].split(".")[-3:-1]
        out.setdefault(round_id, set()).add(test_id)
    return out


@pytest.mark.parametrize(("course", "day"), CASES)
def test_every_item_has_its_status_and_only_open_rounds_are_ordered(
    engine: Engine, course: str, day: str
) -> None:
    firm, consider, rounds_ordered, scope = COURSES[course][1][day]
    ordered_rounds = set(rounds_ordered.split())
    result = _assess(engine, course, day)
    plan = result.plan
    # Nothing is ever dropped: every round keeps its items, whatever their status.
    assert [r[0] for r in plan.rounds()] == list(ROUNDS)
    for round_id, expected in zip(ROUNDS, firm.split(), strict=True):
        assert _statuses(result, round_id, conditional=False) == {STATUS[expected]}, round_id
    # "Consider" items are never overdue: due until their round lapses, then missed.
    assert _statuses(result, "diagnosis", conditional=True) == {STATUS[consider]}
    assert not any(i.conditional for i in plan.items if plan.status(i) == "overdue")
    # Orders only for the open round(s): every firm, orderable, undone item of them.
    ordered = _ordered(result)
    assert set(ordered) == ordered_rounds
    for round_id in ordered_rounds:
        expected_tests = {
            i.test_id
            for i in plan.items
            if i.round_id == round_id and i.orderable and not i.conditional and i.done is None
        }
        assert ordered[round_id] == expected_tests
    assert plan.assessment.scope == scope
    # The work-up notice only once the undone work-up lapsed.
    notices = [n for n in plan.assessment.notices if n.id == WORKUP_NOTICE]
    assert len(notices) == (1 if course == "never-done" and day >= "2027-03-02" else 0)


@pytest.mark.parametrize(("course", "day"), CASES)
def test_the_care_plan_holds_every_item_with_its_status(
    engine: Engine, course: str, day: str
) -> None:
    result = _assess(engine, course, day)
    plan = result.plan
    assert result.care_plan is not None  # also after the window: the plan keeps its history
    activities = result.care_plan["activity"]
    assert len(activities) == len(plan.items)
    by_status: dict[str, int] = {}
    for a in activities:
        status = a["detail"]["status"] if "detail" in a else "ordered"
        by_status[status] = by_status.get(status, 0) + 1
    statuses = [plan.status(i) for i in plan.items]
    assert by_status.get("ordered", 0) == len(result.service_requests)
    assert by_status.get("completed", 0) == sum(s in ("done", "done-late") for s in statuses)
    assert by_status.get("cancelled", 0) == statuses.count("missed")
    closed = plan.assessment.scope == "window-closed"
    assert result.care_plan["status"] == ("completed" if closed else "active")


def test_done_items_are_kept_as_completed_activities_after_the_window(engine: Engine) -> None:
    for course in ("done-on-time", "done-late"):
        result = _assess(engine, course, "2028-01-01")
        assert result.plan.assessment.scope == "window-closed"
        assert result.care_plan is not None and result.care_plan["status"] == "completed"
        done = [i for i in result.plan.items if i.done is not None]
        assert {i.round_id for i in done} == set(ROUNDS)
        completed = [a for a in result.care_plan["activity"] if "outcomeReference" in a]
        assert len(completed) == len(done) and result.service_requests == ()
        late = {a["detail"].get("statusReason", {}).get("text") for a in completed}
        assert late == ({"done late"} if course == "done-late" else {None})


def test_missed_items_say_why_they_lapsed(engine: Engine) -> None:
    result = _assess(engine, "never-done", "2028-01-01")
    assert result.care_plan is not None
    reasons = {
        a["detail"]["scheduledPeriod"]["start"]: a["detail"]["statusReason"]["text"]
        for a in result.care_plan["activity"]
        if a["detail"]["status"] == "cancelled"
    }
    assert reasons == {
        "2024-03-01": "missed: window closed",
        "2025-03-01": "missed: superseded by the 24 months round",
        "2026-03-01": "missed: superseded by the 36 months round",
        "2027-03-01": "missed: window closed",
    }
    lines = result.explanation.missed
    assert len(lines) == len(result.plan.items)
    assert any(line.startswith("At diagnosis: consider item ") for line in lines)


def test_lapse_dates_follow_the_rules(engine: Engine) -> None:
    result = _assess(engine, "never-done", "2024-03-10")
    lapses = {i.round_id: i.lapses_on for i in result.plan.items}
    assert lapses == {
        "diagnosis": date(2027, 3, 1),  # the window's end date
        "year-1": date(2026, 3, 1),  # when the next round opens
        "year-2": date(2027, 3, 1),
        "year-3": date(2027, 9, 1),  # the window's end date + 6 months
    }


def test_the_work_up_notice_names_the_tests_and_replaces_the_orders(engine: Engine) -> None:
    result = _assess(engine, "never-done", "2027-03-02")
    (notice,) = [n for n in result.plan.assessment.notices if n.id == WORKUP_NOTICE]
    assert notice.text.startswith("No record of the work-up at diagnosis (")
    assert notice.text.endswith("): confirm it was done.")
    assert "Complete blood count" in notice.text and "Chest radiograph" in notice.text
    assert "PET" not in notice.text  # "consider" items are not owed
    assert notice.text in result.explanation.notices
    assert "diagnosis" not in _ordered(result)


def test_diagnosed_long_ago_with_nothing_recorded(engine: Engine) -> None:
    """Diagnosed 2020-01-15, assessed 2026-06-01: every round lapsed; no firm order years
    later, one notice to confirm the work-up at diagnosis."""
    result = run_one(engine, *_patient("life-2", "2020-01-15"), now=date(2026, 6, 1))
    plan = result.plan
    assert plan.assessment.scope == "window-closed"
    assert result.service_requests == ()
    assert plan.items and all(plan.status(i) == "missed" for i in plan.items)
    notices = [n for n in plan.assessment.notices if n.id == WORKUP_NOTICE]
    assert len(notices) == 1
    assert result.care_plan is not None and result.care_plan["status"] == "completed"
