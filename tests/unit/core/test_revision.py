"""Revision (clinical-logic §13): one plan revised in place; orders kept, created, completed or
revoked with the reason, never churned when nothing changed clinically.

Pinned dates: a high-risk DM diagnosed 2024-03-01 (rounds at 0, 12, 24 and 36 months).
"""

from __future__ import annotations

import copy
from datetime import UTC, date, datetime
from typing import Any

from fhir_dm.core.assess import Engine, PatientResult
from fhir_dm.core.revision import plan_revision, write_back_bundle
from tests import factories as f
from tests.unit.core.helpers import run_one

Json = dict[str, Any]
LOINC = "http://loinc.org"


def _stored(resource: Json, id: str, version: str = "1") -> Json:
    """The resource as a server would return it after the transaction."""
    return {**copy.deepcopy(resource), "id": id, "meta": {"versionId": version}}


def _on_server(result: PatientResult) -> tuple[list[Json], list[Json]]:
    """What a server holds after writing the result: ids assigned, references resolved."""
    assert result.care_plan is not None
    urls = {e["fullUrl"]: e["resource"] for e in result.entries}
    ids: dict[str, str] = {}
    requests = []
    for n, request in enumerate(result.service_requests):
        url = next(u for u, r in urls.items() if r is request)
        ids[url] = f"ServiceRequest/sr{n}"
        stored = _stored(request, f"sr{n}")
        stored["basedOn"] = [{"reference": "CarePlan/cp1"}]
        requests.append(stored)
    plan = _stored(result.care_plan, "cp1")
    plan["supportingInfo"] = [{"reference": "RiskAssessment/ra1"}]
    for activity in plan["activity"]:
        if "reference" in activity:
            activity["reference"] = {"reference": ids[activity["reference"]["reference"]]}
    return [plan], requests


def _lung_done(p: Json) -> list[Json]:
    """HRCT and PFTs done a month before the diagnosis: no ILD screening round is planned."""
    return [
        {
            "resourceType": "Procedure",
            "id": f"lung-{code}",
            "status": "completed",
            "code": f.concept(system, code),
            "subject": f.ref(p),
            "performedDateTime": "2024-02-01",
        }
        for system, code in (
            ("http://snomed.info/sct", "16335031000119100"),
            (LOINC, "58477-1"),
        )
    ]


def _high(engine: Engine, *extra: Any, now: date) -> PatientResult:
    """A high-risk woman (DM, anti-TIF1-gamma, 54 at onset); `extra` builds more resources."""
    p = f.patient("rev-1", birth_date="1970-01-01", gender="female")
    more = [make(p) for make in extra]
    base = [p, f.iim_condition(p), f.antibody(p, "tif1g"), *_lung_done(p)]
    return run_one(engine, *base, *more, now=now)


def _keys(requests: list[Json]) -> set[str]:
    return {r["identifier"][0]["value"] for r in requests}


def test_same_plan_on_server_is_unchanged(engine: Engine) -> None:
    result = _high(engine, now=date(2024, 3, 10))
    plans, requests = _on_server(result)
    revision = plan_revision(result, plans, requests)
    assert revision.unchanged and revision.entries == ()


def test_orders_only_for_the_open_round(engine: Engine) -> None:
    result = _high(engine, now=date(2024, 3, 10))
    rounds = {r["requisition"]["value"].split(".")[-2] for r in result.service_requests}
    assert rounds == {"diagnosis"}
    later = [i for i in result.plan.items if i.round_id.startswith("year-")]
    assert later and not any(result.plan.orders_now(i) for i in later)
    # Later rounds are CarePlan activities with their scheduled period, not orders.
    assert result.care_plan is not None
    details = [a["detail"] for a in result.care_plan["activity"] if "detail" in a]
    assert any(d["scheduledPeriod"]["start"] == "2025-03-01" for d in details)


def test_next_round_opens_the_plan_is_revised_in_place(engine: Engine) -> None:
    """A month before the 12-month round: its orders are created, the plan updated in place,
    and the diagnosis round's open orders kept untouched (still overdue, not lapsed)."""
    plans, requests = _on_server(_high(engine, now=date(2024, 3, 10)))
    later = _high(engine, now=date(2025, 2, 5))
    revision = plan_revision(later, plans, requests)
    assert not revision.unchanged
    assert revision.updated_plans == ("CarePlan/cp1",)
    assert revision.revoked_requests == () and revision.revoked_plans == ()
    assert set(revision.kept_requests) == {f"ServiceRequest/{r['id']}" for r in requests}
    created = [e["resource"] for e in revision.entries if e["request"]["method"] == "POST"]
    new_requests = [r for r in created if r["resourceType"] == "ServiceRequest"]
    assert new_requests and all(
        r["basedOn"] == [{"reference": "CarePlan/cp1"}] for r in new_requests
    )
    assert {r["requisition"]["value"].split(".")[-2] for r in new_requests} == {"year-1"}
    assert not _keys(new_requests) & _keys(requests)  # each (test, round) ordered once
    put = next(e for e in revision.entries if e["request"]["url"] == "CarePlan/cp1")
    assert put["request"]["ifMatch"] == 'W/"1"' and put["resource"]["id"] == "cp1"


def test_a_lapsed_item_s_order_is_revoked_with_what_superseded_it(engine: Engine) -> None:
    plans, requests = _on_server(_high(engine, now=date(2025, 3, 5)))
    year1 = [r for r in requests if ".year-1." in r["identifier"][0]["value"]]
    assert year1
    later = _high(engine, now=date(2026, 3, 2))  # the 24-month round has opened
    revision = plan_revision(later, plans, requests)
    revoked = {
        e["resource"]["id"]: e["resource"]
        for e in revision.entries
        if e["resource"].get("status") == "revoked"
    }
    assert {r["id"] for r in year1} <= set(revoked)
    for r in year1:
        assert "missed: superseded by the 24 months round" in revoked[r["id"]]["note"][-1]["text"]
    # The diagnosis round is still owed (until the window's end): its orders are kept.
    diagnosis = {
        f"ServiceRequest/{r['id']}"
        for r in requests
        if ".diagnosis." in r["identifier"][0]["value"]
    }
    assert diagnosis <= set(revision.kept_requests)


def test_a_done_order_is_completed_never_revoked(engine: Engine) -> None:
    plans, requests = _on_server(_high(engine, now=date(2024, 3, 10)))

    def cbc(p: Json) -> Json:
        return f.observation(
            p, f.concept(LOINC, "58410-2"), valueString="normal", effective="2024-08-01"
        )

    later = _high(engine, cbc, now=date(2024, 9, 1))  # done late, before it lapses
    revision = plan_revision(later, plans, requests)
    [cbc_request] = [r for r in requests if r["identifier"][0]["value"].split(".")[-2] == "cbc"]
    ref = f"ServiceRequest/{cbc_request['id']}"
    assert ref in revision.completed_requests and ref not in revision.revoked_requests
    item = next(i for i in later.plan.items if i.key == ("diagnosis", "cbc"))
    assert later.plan.status(item) == "done-late"


def test_a_cancer_found_after_the_diagnosis_ends_the_rounds_and_orders_nothing_new(
    engine: Engine,
) -> None:
    plans, requests = _on_server(_high(engine, now=date(2024, 3, 10)))

    def cancer(p: Json) -> Json:
        return f.condition(p, f.concept("http://snomed.info/sct", "254637007"), onset="2024-03-20")

    later = _high(engine, cancer, now=date(2024, 4, 1))
    revision = plan_revision(later, plans, requests)
    created = [e for e in revision.entries if e["request"]["method"] == "POST"]
    assert not [e for e in created if e["resource"]["resourceType"] == "ServiceRequest"]
    screening = [e for e in revision.entries if e["resource"].get("status") == "revoked"]
    assert screening
    # Cancer-associated myositis (§6 rev 3): the occult-cancer rounds answered their question.
    for entry in screening:
        assert "ended: a cancer was found (2024-03-20)" in entry["resource"]["note"][-1]["text"]
    assert revision.updated_plans == ("CarePlan/cp1",)
    assert not any(i.round_id.startswith("year-") for i in later.plan.items)


def test_a_cancer_known_at_diagnosis_makes_screening_consider_items(engine: Engine) -> None:
    def cancer(p: Json) -> Json:
        return f.condition(p, f.concept("http://snomed.info/sct", "254637007"), onset="2024-02-01")

    result = _high(engine, cancer, now=date(2024, 3, 10))
    screening = [
        i for i in result.plan.items if i.round_id == "diagnosis" and i.test_id == "ct-ncap"
    ]
    assert screening and all(i.conditional for i in screening)
    assert not any(r["code"]["coding"][0]["code"] == "89283-6" for r in result.service_requests)


def test_other_series_is_not_touched(engine: Engine) -> None:
    q = f.patient(birth_date="1994-01-01")
    plans, requests = _on_server(run_one(engine, q, f.iim_condition(q)))
    revision = plan_revision(_high(engine, now=date(2024, 3, 10)), plans, requests)
    assert not any(e["request"]["method"] == "PUT" for e in revision.entries)
    assert not revision.unchanged and not revision.plan_on_server


def test_each_write_has_one_provenance_naming_what_it_wrote(engine: Engine) -> None:
    plans, requests = _on_server(_high(engine, now=date(2024, 3, 10)))
    later = _high(engine, now=date(2025, 2, 5))
    revision = plan_revision(later, plans, requests)
    when = datetime(2025, 2, 5, 14, 3, 7, tzinfo=UTC)
    bundle = write_back_bundle(later, revision, when)
    provenance = bundle["entry"][-1]["resource"]
    assert provenance["resourceType"] == "Provenance"
    assert provenance["recorded"] == "2025-02-05T14:03:07+00:00"
    targets = [t["reference"] for t in provenance["target"]]
    assert "CarePlan/cp1" in targets and len(targets) == len(revision.entries)
    again = write_back_bundle(later, revision, datetime(2025, 2, 5, 15, 0, tzinfo=UTC))
    assert again["entry"][-1]["resource"]["id"] == provenance["id"]  # a retry writes it once


def test_an_order_of_ours_a_clinician_completed_is_not_ordered_again(engine: Engine) -> None:
    plans, requests = _on_server(_high(engine, now=date(2024, 3, 10)))
    cbc = next(r for r in requests if r["identifier"][0]["value"].split(".")[-2] == "cbc")
    cbc["status"] = "completed"  # marked done in the EHR, no result filed under our codes
    later = _high(engine, now=date(2024, 4, 1))
    revision = plan_revision(later, plans, requests)
    created = [e["resource"] for e in revision.entries if e["request"]["method"] == "POST"]
    assert not any(r["identifier"][0]["value"] == cbc["identifier"][0]["value"] for r in created)
    assert f"ServiceRequest/{cbc['id']}" not in revision.revoked_requests
