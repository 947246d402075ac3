"""A test done elsewhere, on a real HAPI FHIR server (clinical-logic §10)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from fhir_dm.fhir.client import FhirClient
from tests import factories as f
from tests.integration.records import store

pytestmark = pytest.mark.integration

NOW = "2024-04-15"
CT_CODE = "89283-6"
Json = dict[str, Any]


@pytest.fixture
def app(open_app: Flask) -> Flask:
    return open_app


def _run(client: FlaskClient, patient_id: str) -> str:
    response = client.post(f"/Patient/{patient_id}/$dm-cancer-screening?now={NOW}")
    assert response.status_code == 200, response.get_data(as_text=True)
    return str(response.get_json()["entry"][0]["resource"]["issue"][0]["diagnostics"])


def _plans(hapi: FhirClient, patient_id: str) -> list[Json]:
    return hapi.search("CarePlan", {"subject": f"Patient/{patient_id}"})


def _ct_requests(hapi: FhirClient, plan_id: str) -> list[Json]:
    return [
        r
        for r in hapi.search("ServiceRequest", {"based-on": f"CarePlan/{plan_id}"})
        if r["code"]["coding"][0]["code"] == CT_CODE
    ]


def test_a_ct_report_completes_our_request_without_a_duplicate(
    app: Flask, hapi: FhirClient
) -> None:
    client = app.test_client()
    patient_id = f"done-{uuid.uuid4().hex[:10]}"
    p = f.patient(patient_id, birth_date="1994-01-01", gender="female")
    store(
        hapi,
        p,
        f.iim_condition(p, id=f"{patient_id}-dm"),
        f.antibody(p, "tif1g", id=f"{patient_id}-tif1g"),
    )
    assert "; written" in _run(client, patient_id)
    (plan,) = _plans(hapi, patient_id)
    (ct,) = _ct_requests(hapi, plan["id"])
    assert ct["status"] != "completed"
    requests_before = len(hapi.search("ServiceRequest", {"subject": f"Patient/{patient_id}"}))

    report_id = f"{patient_id}-ct"
    store(
        hapi,
        {
            "resourceType": "DiagnosticReport",
            "id": report_id,
            "status": "final",
            "code": f.concept("http://loinc.org", CT_CODE),
            "subject": f.ref(p),
            "effectiveDateTime": "2024-04-02",
        },
    )
    summary = _run(client, patient_id)
    assert "completed 1 service request(s) done elsewhere" in summary

    plans = _plans(hapi, patient_id)
    assert [(x["id"], x["status"]) for x in plans] == [(plan["id"], "active")]
    (closed,) = _ct_requests(hapi, plan["id"])
    assert closed["id"] == ct["id"] and closed["status"] == "completed"
    assert {"reference": f"DiagnosticReport/{report_id}"} in closed["supportingInfo"]
    after = hapi.search("ServiceRequest", {"subject": f"Patient/{patient_id}"})
    assert len(after) == requests_before  # no duplicate request
    outcomes = [a["outcomeReference"] for a in plans[0]["activity"] if "outcomeReference" in a]
    assert outcomes == [[{"reference": f"DiagnosticReport/{report_id}"}]]

    assert "unchanged: the same plan is already active" in _run(client, patient_id)
