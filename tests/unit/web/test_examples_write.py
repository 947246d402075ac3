"""The shipped examples write back as they are (preview=false), as docs/service.md shows.

A write needs each Patient's fullUrl to be `{FHIR base}/Patient/{id}` or a `urn:uuid:`; the
examples use `urn:uuid:` fullUrls so that they pass on whichever server the service uses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from tests.unit.web.conftest import BASE, FakeFhirServer

EXAMPLES = sorted((Path(__file__).resolve().parents[3] / "examples").glob("*.json"))
FHIR = {"Content-Type": "application/fhir+json"}
NOW = "2015-10-25"


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_each_example_writes_with_preview_false(
    example: Path, client: FlaskClient, fhir_server: FakeFhirServer
) -> None:
    bundle: dict[str, Any] = json.loads(example.read_text(encoding="utf-8"))
    resources = [e["resource"] for e in bundle["entry"]]
    fhir_server.put(*resources)  # the EHR holds the patient's record
    response = client.post(
        f"/$dm-cancer-screening?preview=false&now={NOW}", json=bundle, headers=FHIR
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    diagnostics = response.get_json()["entry"][0]["resource"]["issue"][0]["diagnostics"]
    assert diagnostics.endswith("written"), diagnostics
    assert fhir_server.all("RiskAssessment")


def test_a_patient_full_url_on_another_server_is_refused(
    client: FlaskClient, fhir_server: FakeFhirServer
) -> None:
    bundle: dict[str, Any] = json.loads(EXAMPLES[0].read_text(encoding="utf-8"))
    fhir_server.put(*(e["resource"] for e in bundle["entry"]))
    patient = next(e for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    patient["fullUrl"] = f"http://elsewhere.example/fhir/Patient/{patient['resource']['id']}"
    refused = client.post(
        f"/$dm-cancer-screening?preview=false&now={NOW}", json=bundle, headers=FHIR
    )
    assert refused.status_code == 400
    patient["fullUrl"] = f"{BASE}/Patient/{patient['resource']['id']}"  # the rule, met
    written = client.post(
        f"/$dm-cancer-screening?preview=false&now={NOW}", json=bundle, headers=FHIR
    )
    assert written.status_code == 200, written.get_data(as_text=True)
