"""What has been done (clinical-logic §10): evidence, matching to rounds, status, no re-order.

Dates are pinned: the IIM is diagnosed on 2024-03-01, so the diagnosis round is due
2024-03-01 to 2024-06-01 and (high tier) the 12-month round 2025-03-01 to 2025-06-01.
"""

from __future__ import annotations

from datetime import date
from typing import Any

from fhir_dm.core.assess import Engine, PatientResult
from fhir_dm.core.identifiers import plan_digest
from tests import factories as f
from tests.unit.core.helpers import facts_of, run_one

Json = dict[str, Any]
LOINC = "http://loinc.org"
SCT = "http://snomed.info/sct"
CT = f.concept(LOINC, "89283-6")
MAMMOGRAPHY = f.concept(LOINC, "24606-6")
CBC = f.concept(LOINC, "58410-2")
PET_CT = f.concept(SCT, "443271005")


def high_risk(gender: str = "female") -> list[Json]:
    p = f.patient("done-1", birth_date="1994-01-01", gender=gender)
    return [p, f.iim_condition(p), f.antibody(p, "tif1g")]


def report(subject: Json, code: Json, when: str, status: str = "final", id: str = "ct-1") -> Json:
    return {
        "resourceType": "DiagnosticReport",
        "id": id,
        "status": status,
        "code": code,
        "subject": f.ref(subject),
        "effectiveDateTime": when,
    }


def imaging_study(subject: Json, code: Json, when: str) -> Json:
    return {
        "resourceType": "ImagingStudy",
        "id": "img-1",
        "status": "available",
        "subject": f.ref(subject),
        "started": when,
        "procedureCode": [code],
    }


def procedure(subject: Json, code: Json, when: str) -> Json:
    return {
        "resourceType": "Procedure",
        "id": "proc-1",
        "status": "completed",
        "code": code,
        "subject": f.ref(subject),
        "performedDateTime": when,
    }


def item(result: PatientResult, round_id: str, test_id: str) -> Any:
    return next(i for i in result.plan.items if i.key == (round_id, test_id))


def ordered(result: PatientResult, round_id: str = "diagnosis") -> list[str]:
    """Codes of the ServiceRequests proposed for one round."""
    return [
        r["code"]["coding"][0]["code"]
        for r in result.service_requests
        if r["identifier"][0]["value"].split(".")[-3] == round_id
    ]


def test_a_ct_done_in_the_window_is_done_and_not_ordered_again(engine: Engine) -> None:
    rs = high_risk()
    result = run_one(engine, *rs, report(rs[0], CT, "2024-03-20"))
    ct = item(result, "diagnosis", "ct-ncap")
    assert ct.done is not None and ct.done.reference == "DiagnosticReport/ct-1"
    assert ct.done.when == date(2024, 3, 20) and ct.done.resource_type == "DiagnosticReport"
    assert result.plan.status(ct) == "done"
    assert "89283-6" not in ordered(result)
    assert "58410-2" in ordered(result)  # the rest of the round is still proposed
    assert result.care_plan is not None
    done = [a for a in result.care_plan["activity"] if "outcomeReference" in a]
    assert done == [
        {
            "detail": done[0]["detail"],
            "outcomeReference": [{"reference": "DiagnosticReport/ct-1"}],
        }
    ]
    assert done[0]["detail"]["status"] == "completed"
    assert done[0]["detail"]["code"]["coding"][0]["code"] == "89283-6"
    div = result.care_plan["text"]["div"]
    assert "done (DiagnosticReport/ct-1 (2024-03-20))" in div


def test_a_work_up_ct_before_diagnosis_counts_within_the_lookback_only(engine: Engine) -> None:
    rs = high_risk()
    inside = run_one(engine, *rs, report(rs[0], CT, "2024-01-10"))  # 7 weeks before
    assert item(inside, "diagnosis", "ct-ncap").done is not None
    outside = run_one(engine, *rs, report(rs[0], CT, "2023-11-20"))  # over 3 months before
    assert item(outside, "diagnosis", "ct-ncap").done is None
    assert "89283-6" in ordered(outside)


def test_lookback_comes_from_the_rule_set(engine: Engine) -> None:
    rs = engine.knowledge.ruleset
    assert rs.done_lookback_months.value == 3 and rs.done_lookback_months.source
    assert rs.lookback_months("ct-ncap") == 3
    assert item(run_one(engine, *high_risk()), "diagnosis", "ct-ncap").lookback_months == 3


def test_every_kind_of_evidence_is_read_through_the_input_filter(engine: Engine) -> None:
    rs = high_risk()
    p = rs[0]
    other_order = f.done_request(p, engine.knowledge, "cbc", "2024-03-10")
    evidence = [
        report(p, CT, "2024-03-20"),
        imaging_study(p, MAMMOGRAPHY, "2024-03-21"),
        f.observation(p, f.concept(LOINC, "10334-1"), effective="2024-03-22", valueString="8"),
        other_order,
    ]
    # run_one goes through Engine.assess, so the Relevance filter is applied.
    result = run_one(engine, *rs, *evidence)
    kinds = {i.test_id: i.done.resource_type for i in result.plan.items if i.done}
    assert kinds == {
        "ct-ncap": "DiagnosticReport",
        "mammography": "ImagingStudy",
        "ca125": "Observation",
        "cbc": "ServiceRequest",
    }
    assert not set(ordered(result)) & {"89283-6", "24606-6", "10334-1", "58410-2"}


def test_a_completed_procedure_counts(engine: Engine) -> None:
    rs = high_risk()
    facts = facts_of(engine, *rs, procedure(rs[0], PET_CT, "2024-04-01"))
    assert [(e.test_id, e.reference) for e in facts.screening_evidence] == [
        ("pet-ct", "Procedure/proc-1")
    ]


def test_records_that_do_not_show_a_test_done_are_ignored(engine: Engine) -> None:
    rs = high_risk()
    ours = f.done_request(rs[0], engine.knowledge, "cbc", "2024-03-10")
    ours["identifier"] = [
        {"system": f"{engine.knowledge.ruleset.canonical_base}/sid/plan-item", "value": "x"}
    ]
    open_order = f.done_request(rs[0], engine.knowledge, "lft", "2024-03-10")
    open_order["status"] = "active"
    facts = facts_of(
        engine,
        *rs,
        report(rs[0], CT, "2024-03-20", status="preliminary"),
        ours,
        open_order,
    )
    assert facts.screening_evidence == ()


def test_one_record_counts_for_one_round_only(engine: Engine) -> None:
    rs = high_risk()
    cbc = f.observation(rs[0], CBC, effective="2024-03-20", valueString="normal")
    result = run_one(engine, *rs, cbc, now=date(2025, 3, 15))
    assert item(result, "diagnosis", "cbc").done is not None
    year1 = item(result, "year-1", "cbc")
    assert year1.done is None and result.plan.status(year1) == "due"
    assert "58410-2" in ordered(result, "year-1")


def test_status_and_overdue_first(engine: Engine) -> None:
    rs = high_risk()
    result = run_one(engine, *rs, report(rs[0], CT, "2024-03-20"), now=date(2024, 7, 1))
    statuses = {result.plan.status(i) for i in result.plan.items}
    assert statuses == {"done", "overdue", "due", "upcoming"}
    # Past the diagnosis round's window only its "consider" items read due: never overdue (§13).
    due = [i for i in result.plan.items if result.plan.status(i) == "due"]
    assert due and all(i.conditional and i.round_id == "diagnosis" for i in due)
    rows = result.explanation.attention_first()
    order = [r.status for r in rows]
    assert order == sorted(order, key=["overdue", "due", "upcoming", "done"].index)
    assert order[0] == "overdue"
    ct_row = next(r for r in rows if r.status == "done")
    assert ct_row.evidence == "DiagnosticReport/ct-1 (2024-03-20)"
    assert result.care_plan is not None
    assert "<b>overdue</b>" in result.care_plan["text"]["div"]


def test_due_now(engine: Engine) -> None:
    result = run_one(engine, *high_risk(), now=date(2024, 4, 15))
    assert result.plan.status(item(result, "diagnosis", "cbc")) == "due"
    assert result.plan.status(item(result, "year-1", "cbc")) == "upcoming"


def test_an_overdue_item_done_late_is_done_late(engine: Engine) -> None:
    rs = high_risk()
    result = run_one(engine, *rs, report(rs[0], CT, "2024-07-10"), now=date(2024, 8, 1))
    ct = item(result, "diagnosis", "ct-ncap")
    assert ct.done is not None and result.plan.status(ct) == "done-late"
    assert "89283-6" not in ordered(result)  # done: not ordered again
    assert result.care_plan is not None
    [activity] = [a for a in result.care_plan["activity"] if "outcomeReference" in a]
    assert activity["detail"]["status"] == "completed"
    assert activity["detail"]["statusReason"] == {"text": "done late"}


def test_a_late_record_belongs_to_the_next_round_when_it_fits_there(engine: Engine) -> None:
    rs = high_risk()
    cbc = f.observation(rs[0], CBC, effective="2025-02-10", valueString="normal")
    result = run_one(engine, *rs, cbc, now=date(2025, 2, 20))
    assert item(result, "diagnosis", "cbc").done is None  # overdue: not this one
    assert item(result, "year-1", "cbc").done is not None  # within its lookback


def test_an_undone_yearly_round_is_overdue_until_the_next_round_opens(engine: Engine) -> None:
    rs = high_risk()  # lungs screened before the diagnosis: only the cancer rounds are planned
    result = run_one(engine, *rs, *f.lung_screened(rs[0]), now=date(2025, 7, 1))
    cbc = item(result, "year-1", "cbc")
    assert result.plan.status(cbc) == "overdue" and result.plan.missed() == ()
    assert "58410-2" in ordered(result, "year-1")  # still owed, still ordered
    assert result.explanation.missed == ()


def test_a_missed_round_is_kept_and_said_not_dropped_silently(engine: Engine) -> None:
    # The 24-month round opens on 2026-03-01: the undone 12-month round lapses then (§13).
    rs = high_risk()  # lungs screened before the diagnosis: only the cancer rounds are planned
    result = run_one(engine, *rs, *f.lung_screened(rs[0]), now=date(2026, 3, 2))
    missed = result.plan.missed()
    assert {i.round_id for i in missed} == {"year-1"}
    cbc = item(result, "year-1", "cbc")  # kept in the plan's history
    assert result.plan.status(cbc) == "missed" and not result.plan.orders_now(cbc)
    assert ordered(result, "year-1") == []
    assert "58410-2" in ordered(result, "year-2")
    lines = result.explanation.missed
    assert any(
        line.startswith("12 months: Complete blood count (due 2025-03-01 to 2025-06-01)")
        and line.endswith("missed: superseded by the 24 months round")
        for line in lines
    )
    assert result.care_plan is not None
    cancelled = [
        a["detail"]
        for a in result.care_plan["activity"]
        if "detail" in a and a["detail"]["status"] == "cancelled"
    ]
    assert len(cancelled) == len(missed)
    assert {d["statusReason"]["text"] for d in cancelled} == {
        "missed: superseded by the 24 months round"
    }
    assert "Missed (no longer owed)" in result.care_plan["text"]["div"]


def test_a_done_past_round_stays_as_done(engine: Engine) -> None:
    rs = high_risk()
    cbc = f.observation(rs[0], CBC, effective="2025-03-20", valueString="normal")
    for now in (date(2025, 7, 1), date(2026, 3, 2)):
        result = run_one(engine, *rs, cbc, now=now)
        year1 = item(result, "year-1", "cbc")
        assert year1.done is not None and result.plan.status(year1) == "done"
        assert year1 not in result.plan.missed()


def test_done_state_is_not_part_of_the_digest(engine: Engine) -> None:
    rs = high_risk()
    before = run_one(engine, *rs)
    after = run_one(engine, *rs, report(rs[0], CT, "2024-03-20"))
    assert plan_digest(before.plan) == plan_digest(after.plan)
    assert before.identity.value("plan") == after.identity.value("plan")
    assert len(after.service_requests) == len(before.service_requests) - 1


def test_an_active_cancer_is_named_and_deferred_to_oncology(engine: Engine) -> None:
    rs = high_risk()
    cancer = f.condition(
        rs[0],
        f.concept(SCT, "363358000", "Malignant tumor of lung (disorder)"),
        onset="2024-04-01",
        id="lung-ca",
    )
    result = run_one(engine, *rs, cancer)
    screening = [i for i in result.plan.items if i.test_id == "ct-ncap"]
    assert screening and all(i.conditional for i in screening)
    assert result.care_plan is not None
    div = result.care_plan["text"]["div"]
    assert "management with oncology" in div
    assert "Malignant tumor of lung (disorder), Condition/lung-ca" in div


def test_the_cli_summary_and_the_card_show_status_overdue_first(engine: Engine) -> None:
    from fhir_dm.cds.cards import render_detail
    from fhir_dm.cli.main import render_summary

    rs = high_risk()
    result = run_one(engine, *rs, report(rs[0], CT, "2024-03-20"), now=date(2026, 3, 2))
    summary = render_summary(result)
    lines = [line for line in summary.splitlines() if line.startswith("    ") and " to " in line]
    assert "OVERDUE" in lines[0]
    assert "done by DiagnosticReport/ct-1 (2024-03-20)" in summary
    assert "Not done, missed: 12 months: Complete blood count" in summary
    detail = render_detail(result.explanation, max_findings=0, orders=None)
    table = [line for line in detail.splitlines() if line.startswith("| ")][1:]
    assert "**overdue**" in table[0]
    assert any("done" in row and "(by DiagnosticReport/ct-1 (2024-03-20))" in row for row in table)
    assert "**Missed (no longer owed)**" in detail
    assert "missed: superseded by the 24 months round" in detail
