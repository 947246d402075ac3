"""Write-back over time (clinical-logic §10): a test done elsewhere, a cancer found."""

from __future__ import annotations

from typing import Any

import responses
from flask.testing import FlaskClient

from tests import factories as f
from tests.unit.web.conftest import FakeFhirServer, transaction_calls

Json = dict[str, Any]
NOW = "2024-04-15"
CT_CODE = "89283-6"


def _load(server: FakeFhirServer, pid: str) -> Json:
    p = f.patient(pid, birth_date="1994-01-01", gender="female")
    server.put(p, f.iim_condition(p, id=f"{pid}-dm"), f.antibody(p, "tif1g", id=f"{pid}-tif1g"))
    return p


def _run(client: FlaskClient, pid: str, now: str = NOW) -> str:
    response = client.post(f"/Patient/{pid}/$dm-cancer-screening?now={now}")
    assert response.status_code == 200, response.get_json()
    return str(response.get_json()["entry"][0]["resource"]["issue"][0]["diagnostics"])


def _ct_report(p: Json, pid: str) -> Json:
    return {
        "resourceType": "DiagnosticReport",
        "id": f"{pid}-ct",
        "status": "final",
        "code": f.concept("http://loinc.org", CT_CODE),
        "subject": f.ref(p),
        "effectiveDateTime": "2024-04-02",
    }


def _ct_requests(server: FakeFhirServer) -> list[Json]:
    return [r for r in server.all("ServiceRequest") if r["code"]["coding"][0]["code"] == CT_CODE]


def test_a_ct_done_elsewhere_closes_our_request_and_updates_the_plan_in_place(
    client: FlaskClient, fhir_server: FakeFhirServer, rsps: responses.RequestsMock
) -> None:
    p = _load(fhir_server, "done-w1")
    _run(client, "done-w1")
    (plan,) = fhir_server.all("CarePlan")
    requests_before = len(fhir_server.all("ServiceRequest"))
    (ct,) = _ct_requests(fhir_server)
    assert ct["status"] == "active" or ct["status"] == "draft"

    fhir_server.put(_ct_report(p, "done-w1"))
    summary = _run(client, "done-w1")
    assert "updated 1 care plan(s) in place; completed 1 service request(s)" in summary
    assert transaction_calls(rsps) == 2
    last = fhir_server.transactions[-1]
    assert {e["request"]["method"] for e in last["entry"]} == {"PUT"}  # nothing created

    (closed,) = _ct_requests(fhir_server)
    assert closed["id"] == ct["id"] and closed["status"] == "completed"
    assert {"reference": "DiagnosticReport/done-w1-ct"} in closed["supportingInfo"]
    assert "DiagnosticReport/done-w1-ct of 2024-04-02" in closed["note"][-1]["text"]
    assert len(fhir_server.all("ServiceRequest")) == requests_before  # no duplicate

    plans = fhir_server.all("CarePlan")
    assert len(plans) == 1 and plans[0]["id"] == plan["id"] and plans[0]["status"] == "active"
    outcomes = [a["outcomeReference"] for a in plans[0]["activity"] if "outcomeReference" in a]
    assert outcomes == [[{"reference": "DiagnosticReport/done-w1-ct"}]]
    # Activities still pointing at open requests keep the server's references.
    refs = [a["reference"]["reference"] for a in plans[0]["activity"] if "reference" in a]
    assert refs and all(r.startswith("ServiceRequest/") for r in refs)
    assert ct["id"] not in {r.split("/")[1] for r in refs}

    assert "unchanged: the same plan is already active" in _run(client, "done-w1")
    assert transaction_calls(rsps) == 2


def test_a_cancer_found_revokes_the_open_orders_and_says_why(
    client: FlaskClient, fhir_server: FakeFhirServer, rsps: responses.RequestsMock
) -> None:
    p = _load(fhir_server, "onc-w1")
    _run(client, "onc-w1")
    (old_plan,) = fhir_server.all("CarePlan")
    old_requests = {r["id"] for r in fhir_server.all("ServiceRequest")}
    fhir_server.put(
        f.condition(
            p,
            f.concept("http://snomed.info/sct", "363358000", "Malignant tumor of lung (disorder)"),
            onset="2024-04-10",
            id="onc-w1-ca",
        )
    )
    summary = _run(client, "onc-w1")
    assert "revoked 1 care plan(s)" in summary
    assert fhir_server.store["CarePlan"][old_plan["id"]]["status"] == "revoked"
    store = fhir_server.store["ServiceRequest"]
    assert all(store[i]["status"] == "revoked" for i in old_requests)
    active = [c for c in fhir_server.all("CarePlan") if c["status"] == "active"]
    assert len(active) == 1
    div = active[0]["text"]["div"]
    assert "management with oncology" in div
    assert "Malignant tumor of lung (disorder), Condition/onc-w1-ca" in div
    (new_ct,) = [r for r in _ct_requests(fhir_server) if r["id"] not in old_requests]
    assert new_ct["asNeededCodeableConcept"]["text"].startswith("management with oncology")


def test_a_withdrawn_record_leaves_the_updated_plan_alone(
    client: FlaskClient, fhir_server: FakeFhirServer, rsps: responses.RequestsMock
) -> None:
    p = _load(fhir_server, "done-w2")
    _run(client, "done-w2")
    report = _ct_report(p, "done-w2")
    fhir_server.put(report)
    _run(client, "done-w2")
    assert transaction_calls(rsps) == 2
    fhir_server.put(dict(report, status="entered-in-error"))
    summary = _run(client, "done-w2")
    # No in-place update can re-create the request: nothing dangling is written.
    assert "unchanged" in summary and transaction_calls(rsps) == 2
    (plan,) = fhir_server.all("CarePlan")
    assert all(
        not str(a.get("reference", {}).get("reference", "")).startswith("urn:")
        for a in plan["activity"]
    )
