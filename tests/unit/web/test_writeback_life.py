"""Write-back over the plan's life (clinical-logic §13), on the fake FHIR server.

Only IIM patients' charts are written; each write carries one Provenance recorded when it is
written; the plan is one resource, revised in place from round to round.
"""

from __future__ import annotations

from datetime import UTC, datetime

import responses
from flask.testing import FlaskClient

from tests import factories as f
from tests.unit.web.conftest import FakeFhirServer, transaction_calls


def _op(patient_id: str, now: str) -> str:
    return f"/Patient/{patient_id}/$dm-cancer-screening?now={now}"


def _diagnostics(client: FlaskClient, url: str) -> str:
    response = client.post(url)
    assert response.status_code == 200, response.get_data(as_text=True)
    return str(response.get_json()["entry"][0]["resource"]["issue"][0]["diagnostics"])


def test_a_patient_without_iim_is_never_written_to(
    client: FlaskClient, fhir_server: FakeFhirServer, rsps: responses.RequestsMock
) -> None:
    p = f.patient("no-iim-1", birth_date="1970-01-01")
    fhir_server.put(p)
    said = _diagnostics(client, _op("no-iim-1", "2024-04-15"))
    assert "unchanged" in said
    assert transaction_calls(rsps) == 0
    for resource_type in ("RiskAssessment", "Provenance", "CarePlan", "ServiceRequest"):
        assert fhir_server.all(resource_type) == []


def test_no_iim_any_more_revokes_our_open_plan_and_writes_nothing_else(
    client: FlaskClient, fhir_server: FakeFhirServer, rsps: responses.RequestsMock
) -> None:
    p = f.patient("gone-1", birth_date="1970-01-01", gender="female")
    dm = f.iim_condition(p, id="gone-1-dm")
    fhir_server.put(p, dm)
    assert "; written" in _diagnostics(client, _op("gone-1", "2024-03-10"))
    risk_before = len(fhir_server.all("RiskAssessment"))
    fhir_server.put(
        {
            **dm,
            "verificationStatus": f.concept(
                "http://terminology.hl7.org/CodeSystem/condition-ver-status", "entered-in-error"
            ),
        }
    )
    assert "; written" in _diagnostics(client, _op("gone-1", "2024-03-20"))
    assert [c["status"] for c in fhir_server.all("CarePlan")] == ["revoked"]
    assert all(r["status"] == "revoked" for r in fhir_server.all("ServiceRequest"))
    assert len(fhir_server.all("RiskAssessment")) == risk_before  # no "not stratified" record
    assert transaction_calls(rsps) == 2


def test_each_write_has_a_provenance_recorded_at_the_time_of_writing(
    client: FlaskClient, fhir_server: FakeFhirServer
) -> None:
    p = f.patient("prov-1", birth_date="1970-01-01", gender="female")
    fhir_server.put(p, f.iim_condition(p, id="prov-1-dm"), f.antibody(p, "tif1g", id="prov-1-ab"))
    before = datetime.now(UTC).replace(microsecond=0)
    _diagnostics(client, _op("prov-1", "2024-03-10"))
    _diagnostics(client, _op("prov-1", "2025-02-05"))  # the 12-month round's orders appear
    provenances = fhir_server.all("Provenance")
    assert len(provenances) == 2
    for provenance in provenances:
        recorded = datetime.fromisoformat(provenance["recorded"])
        assert recorded >= before  # the time of writing, not midnight of the evaluation date
    second = max(provenances, key=lambda p: len(p["target"]))
    assert any(t["reference"].startswith("CarePlan/") for t in second["target"])
    assert len(fhir_server.all("CarePlan")) == 1  # revised in place
