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
    # Nothing created: the plan and the order are PUT; the only POST is the RiskAssessment's
    # conditional create, which matches the one on the server (the same digest).
    posts = [e["request"]["url"] for e in last["entry"] if e["request"]["method"] == "POST"]
    assert posts == ["RiskAssessment"]
    assert len(fhir_server.all("RiskAssessment")) == 1

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
    assert "revoked 0 care plan(s) and " in summary
    assert "updated 1 care plan(s) in place" in summary and "created 0" in summary
    # The one plan is revised in place; the screening orders are revoked with the reason: a
    # cancer found after the diagnosis ends the IMACS rounds (1.2.0, cancer-associated).
    (plan,) = fhir_server.all("CarePlan")
    assert plan["id"] == old_plan["id"] and plan["status"] == "active"
    store = fhir_server.store["ServiceRequest"]
    assert set(store) == old_requests  # nothing new ordered
    revoked = [store[i] for i in old_requests if store[i]["status"] == "revoked"]
    assert revoked and f"and {len(revoked)} service request(s)" in summary
    ended = "ended: a cancer was found (2024-04-10); the occult-cancer rounds answered"
    for r in revoked:
        assert ended in r["note"][-1]["text"]
    (ct,) = _ct_requests(fhir_server)
    assert ct["status"] == "revoked"
    # What is not cancer screening (the antibody panel, the ILD screening) stays ordered,
    # untouched.
    kept = [store[i] for i in old_requests if store[i]["status"] != "revoked"]
    assert sorted(".".join(r["identifier"][0]["value"].split(".")[-3:-1]) for r in kept) == [
        "diagnosis.myositis-antibodies",
        "lung-baseline.hrct-chest",
        "lung-baseline.pft-dlco",
    ]
    assert all(r["meta"]["versionId"] == "1" for r in kept)
    div = plan["text"]["div"]
    assert "management with oncology" in div
    assert "Malignant tumor of lung (disorder), Condition/onc-w1-ca" in div
    # The CT is now an ended activity of the plan, not an order, and says why; the later
    # rounds are not planned.
    [ct_activity] = [
        a["detail"]
        for a in plan["activity"]
        if "detail" in a and a["detail"]["code"]["coding"][0]["code"] == CT_CODE
    ]
    assert ct_activity["status"] == "cancelled"
    assert ct_activity["statusReason"]["text"].startswith(ended)
    assert "Consider: management with oncology" in ct_activity["description"]
    starts = {a["detail"]["scheduledPeriod"]["start"] for a in plan["activity"] if "detail" in a}
    assert starts == {"2024-03-01"}


def test_a_withdrawn_record_orders_the_test_again(
    client: FlaskClient, fhir_server: FakeFhirServer, rsps: responses.RequestsMock
) -> None:
    p = _load(fhir_server, "done-w2")
    _run(client, "done-w2")
    report = _ct_report(p, "done-w2")
    fhir_server.put(report)
    _run(client, "done-w2")
    assert transaction_calls(rsps) == 2
    (done,) = _ct_requests(fhir_server)
    assert done["status"] == "completed"
    fhir_server.put(dict(report, status="entered-in-error"))
    summary = _run(client, "done-w2")
    # The CT is owed again: ordered anew (the completed order is left as it is), and the
    # plan revised in place points at the new order; nothing dangling is written.
    assert "updated 1 care plan(s) in place" in summary and "created 1" in summary
    assert transaction_calls(rsps) == 3
    completed, again = sorted(_ct_requests(fhir_server), key=lambda r: r["id"] != done["id"])
    assert completed["id"] == done["id"] and completed["status"] == "completed"
    assert again["status"] == "active"
    (plan,) = fhir_server.all("CarePlan")
    refs = [str(a.get("reference", {}).get("reference", "")) for a in plan["activity"]]
    assert not any(r.startswith("urn:") for r in refs)
    assert f"ServiceRequest/{again['id']}" in refs
    assert not any("outcomeReference" in a for a in plan["activity"])
    assert "unchanged" in _run(client, "done-w2") and transaction_calls(rsps) == 3
