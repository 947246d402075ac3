"""Write-back details: results without a plan, failures mid-bundle, server locations."""

from __future__ import annotations

import responses
from flask.testing import FlaskClient

from fhir_dm.writeback import WriteBack
from tests import factories as f
from tests.unit.web.conftest import BASE, FakeFhirServer, transaction_calls

FHIR = {"Content-Type": "application/fhir+json"}
OP = "/$dm-cancer-screening"


def test_a_result_without_plan_is_written_once(
    client: FlaskClient, fhir_server: FakeFhirServer, rsps: responses.RequestsMock
) -> None:
    p = f.patient("juvenile-1", birth_date="2014-01-01")
    fhir_server.put(p, f.iim_condition(p, id="juvenile-1-dm"))
    url = "/Patient/juvenile-1/$dm-cancer-screening?now=2024-04-15"
    first = client.post(url).get_json()
    assert first["entry"][0]["resource"]["issue"][0]["diagnostics"].endswith("; written")
    assert transaction_calls(rsps) == 1
    assert fhir_server.all("CarePlan") == [] and len(fhir_server.all("RiskAssessment")) == 1
    second = client.post(url).get_json()
    diagnostics = second["entry"][0]["resource"]["issue"][0]["diagnostics"]
    assert "no tier" in diagnostics
    assert "unchanged: the same assessment is already recorded" in diagnostics
    assert transaction_calls(rsps) == 1


def test_a_failure_stops_the_bundle_and_re_posting_is_safe(
    client: FlaskClient, fhir_server: FakeFhirServer, rsps: responses.RequestsMock
) -> None:
    a = f.patient("mid-a", birth_date="1994-01-01")
    c = f.patient("mid-c", birth_date="1994-01-01")
    written = f.bundle(a, f.iim_condition(a))
    assert (
        client.post(f"{OP}?preview=false&now=2024-04-15", json=written, headers=FHIR).status_code
        == 200
    )
    assert transaction_calls(rsps) == 1
    fhir_server.reject_transaction = (500, {"resourceType": "OperationOutcome", "issue": []})
    both = f.bundle(a, f.iim_condition(a), c, f.iim_condition(c))
    response = client.post(f"{OP}?preview=false&now=2024-04-15", json=both, headers=FHIR)
    # The first patient is unchanged (nothing posted); the second one's transaction fails.
    assert response.status_code == 502
    assert transaction_calls(rsps) == 2
    assert len(fhir_server.all("CarePlan")) == 1


def test_server_locations_become_absolute_full_urls(fhir_server: FakeFhirServer) -> None:
    from fhir_dm.fhir.client import FhirClient

    writeback = WriteBack(FhirClient(BASE), None, None)  # type: ignore[arg-type]
    assert writeback._parse_location("CarePlan/7/_history/2") == ("CarePlan", "7", "2")
    assert writeback._parse_location(f"{BASE}/ServiceRequest/x-1") == (
        "ServiceRequest",
        "x-1",
        None,
    )
    assert writeback._parse_location("nonsense") is None
