"""A high-risk patient's plan lived over its three years on a real HAPI FHIR server (§13).

Diagnosed 2024-03-01 (DM, anti-TIF1-gamma positive, 54 at onset, female): rounds at 0, 12, 24
and 36 months. The service re-assesses the patient at pinned dates while tests are reported
on time, late, under several real codes, or never, and a red flag arrives in year 2. At every
date: exactly one CarePlan resource for the whole timeline, revised in place; each (test,
round) ordered at most once; orders only for open rounds; no order revoked unless its item
lapsed (each naming what superseded it); done orders completed with the evidence; the plan
completed at the end with its done items kept.
"""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from fhir_dm.fhir.client import FhirClient
from tests import factories as f
from tests.integration.records import store

pytestmark = pytest.mark.integration

Json = dict[str, Any]
LOINC = "http://loinc.org"
SCT = "http://snomed.info/sct"


@pytest.fixture
def app(open_app: Flask) -> Flask:
    return open_app


def _report(patient: Json, rid: str, system: str, code: str, when: str) -> Json:
    return {
        "resourceType": "DiagnosticReport",
        "id": rid,
        "status": "final",
        "code": f.concept(system, code),
        "subject": f.ref(patient),
        "effectiveDateTime": when,
    }


def _procedure(patient: Json, rid: str, code: str, when: str) -> Json:
    return {
        "resourceType": "Procedure",
        "id": rid,
        "status": "completed",
        "code": f.concept(SCT, code),
        "subject": f.ref(patient),
        "performedDateTime": when,
    }


class Timeline:
    """One patient on the server, assessed through the service at pinned dates."""

    def __init__(self, client: FlaskClient, hapi: FhirClient) -> None:
        self.client = client
        self.hapi = hapi
        self.pid = f"life-{uuid.uuid4().hex[:10]}"
        self.patient = f.patient(self.pid, birth_date="1970-01-01", gender="female")
        store(
            hapi,
            self.patient,
            f.iim_condition(self.patient, id=f"{self.pid}-dm"),
            f.antibody(self.patient, "tif1g", id=f"{self.pid}-tif1g"),
        )

    def assess(self, now: str) -> str:
        url = f"/Patient/{self.pid}/$dm-cancer-screening?now={now}"
        response = self.client.post(url)
        assert response.status_code == 200, response.get_data(as_text=True)
        return str(response.get_json()["entry"][0]["resource"]["issue"][0]["diagnostics"])

    def plans(self) -> list[Json]:
        return self.hapi.search("CarePlan", {"subject": f"Patient/{self.pid}"})

    def requests(self) -> list[Json]:
        return self.hapi.search("ServiceRequest", {"subject": f"Patient/{self.pid}"})

    def orders(self, status: str) -> dict[str, Json]:
        """Our orders with this status, by identifier value (`series.round.test.YYYYMMDD`)."""
        return {r["identifier"][0]["value"]: r for r in self.requests() if r["status"] == status}

    def record(self, *resources: Json) -> None:
        store(self.hapi, *resources)


def _round_test(value: str) -> tuple[str, str]:
    parts = value.rsplit(".", 3)
    return parts[1], parts[2]


def _rounds(orders: dict[str, Json]) -> set[str]:
    return {_round_test(v)[0] for v in orders}


def _activity_statuses(plan: Json) -> Counter[str]:
    return Counter(a["detail"]["status"] for a in plan["activity"] if "detail" in a)


def test_three_years_of_one_high_risk_plan(app: Flask, hapi: FhirClient) -> None:
    t = Timeline(app.test_client(), hapi)
    p = t.patient
    revoked_seen: dict[str, str] = {}

    def check_invariants() -> Json:
        plans = t.plans()
        assert len(plans) == 1, [(x["id"], x["status"]) for x in plans]
        values = [r["identifier"][0]["value"] for r in t.requests()]
        assert len(values) == len(set(values)), "a (test, round) was ordered twice"
        assert all(
            r["basedOn"] == [{"reference": f"CarePlan/{plans[0]['id']}"}] for r in t.requests()
        )
        for value, request in t.orders("revoked").items():
            note = request["note"][-1]["text"]
            assert "missed:" in note, note  # only lapsed items are ever revoked here
            revoked_seen[value] = note
        return plans[0]

    # Diagnosis: orders only for the diagnosis round (the antibody panel included).
    assert "; written" in t.assess("2024-03-10")
    plan = check_invariants()
    active = t.orders("active")
    assert _rounds(active) == {"diagnosis", "lung-baseline"}
    assert len(active) >= 10
    assert _activity_statuses(plan)["not-started"] > 0  # later rounds: activities, not orders
    first_version = plan["meta"]["versionId"]

    # The CT reported as a CT chest/abdomen/pelvis (LOINC 87869-4) and a CBC with differential
    # (57021-8) on time; a mammogram as SNOMED 24623002 (a Procedure); the ILD screening
    # (HRCT and PFTs) on time.
    t.record(
        _report(p, f"{t.pid}-ct", LOINC, "87869-4", "2024-04-02"),
        _report(p, f"{t.pid}-cbc", LOINC, "57021-8", "2024-03-20"),
        _procedure(p, f"{t.pid}-mg", "24623002", "2024-04-10"),
        _procedure(p, f"{t.pid}-hrct", "16335031000119100", "2024-03-20"),
        _report(p, f"{t.pid}-pft", LOINC, "58477-1", "2024-03-22"),
    )
    summary = t.assess("2024-04-20")
    assert "completed 5 service request(s) done elsewhere" in summary, summary
    plan = check_invariants()
    assert plan["meta"]["versionId"] != first_version  # revised in place
    completed = t.orders("completed")
    assert {_round_test(v)[1] for v in completed} == {
        "ct-ncap",
        "cbc",
        "mammography",
        "hrct-chest",
        "pft-dlco",
    }

    # Past the diagnosis window: the rest is overdue, its orders kept, nothing revoked.
    before = set(t.orders("active"))
    t.assess("2024-07-01")
    check_invariants()
    assert set(t.orders("active")) == before
    # A urine dipstick (24357-6) done late still completes the urinalysis order.
    t.record(_report(p, f"{t.pid}-ua", LOINC, "24357-6", "2024-08-01"))
    assert "completed 1 service request(s)" in t.assess("2024-08-05")

    # A month before the 12-month round opens: its orders appear.
    t.assess("2025-02-05")
    check_invariants()
    assert "year-1" in _rounds(t.orders("active"))
    t.record(_report(p, f"{t.pid}-cbc1", LOINC, "58410-2", "2025-03-20"))
    t.assess("2025-07-01")
    check_invariants()
    assert not t.orders("revoked")  # nothing changed clinically: nothing revoked

    # A red flag in year 2: a notice and "consider" items as plan activities, no new order.
    t.record(
        f.condition(
            p,
            f.concept(SCT, "422868009"),
            onset="2025-11-01",
            id=f"{t.pid}-wl",
        )
    )
    orders_before = set(t.orders("active"))
    t.assess("2025-11-10")
    plan = check_invariants()
    assert set(t.orders("active")) == orders_before
    assert "red flag" in plan["text"]["div"].lower()

    # The 24-month round opens: the undone 12-month items lapse, their orders revoked.
    t.assess("2026-03-02")
    check_invariants()
    assert revoked_seen and all(
        "superseded by the 24 months round" in n for v, n in revoked_seen.items() if ".year-1." in v
    )
    assert {_round_test(v)[0] for v in revoked_seen} == {"year-1"}

    # Past the window's end date: the work-up items lapse (one notice), year-2 lapses too.
    t.assess("2027-03-02")
    plan = check_invariants()
    assert "confirm it was done" in plan["text"]["div"]
    assert "diagnosis" not in _rounds(t.orders("active"))
    assert "year-3" in _rounds(t.orders("active"))

    # Every year-3 test done (several codes): completed, never revoked.
    year3 = [v for v in t.orders("active") if ".year-3." in v]
    t.record(
        _report(p, f"{t.pid}-cbc3", LOINC, "58410-2", "2027-03-10"),
        _report(p, f"{t.pid}-lft3", LOINC, "24325-3", "2027-03-10"),
        _report(p, f"{t.pid}-esr3", LOINC, "4537-7", "2027-03-10"),
        _report(p, f"{t.pid}-crp3", LOINC, "1988-5", "2027-03-10"),
        _report(p, f"{t.pid}-ua3", LOINC, "24356-8", "2027-03-10"),
        _report(p, f"{t.pid}-cxr3", LOINC, "42272-5", "2027-03-10"),
        _report(
            p,
            f"{t.pid}-spep3",
            "http://fhir-dm.org/fhir/CodeSystem/dm-screening",
            "serum-protein-electrophoresis",
            "2027-03-10",
        ),
    )
    t.assess("2027-04-01")
    check_invariants()
    completed = t.orders("completed")
    assert set(year3) <= set(completed), set(year3) - set(completed)

    # The grace after the window has passed: nothing firm is owed, the plan completes.
    t.assess("2027-09-02")
    plan = check_invariants()
    assert plan["status"] == "completed"
    statuses = _activity_statuses(plan)
    assert statuses["completed"] >= 5 + 1 + 1 + len(year3)  # done items stay in the plan
    assert not t.orders("active")

    requests = t.requests()
    counts = Counter(r["status"] for r in requests)
    print(
        f"three-year timeline: 1 CarePlan ({plan['meta']['versionId']} versions);"
        f" {len(requests)} ServiceRequests created, {counts['completed']} completed,"
        f" {counts['revoked']} revoked (all lapsed)"
    )
    assert counts["revoked"] == len(revoked_seen)
