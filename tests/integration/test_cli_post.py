"""`fhir-dm assess` output posts as it is to a FHIR server that holds none of the input.

The result Bundle refers to the patient and to the records it was read from; before it carried
them, an input with only `urn:uuid` fullUrls gave placeholders the Bundle did not contain
(HAPI-0541) and the examples named resources an empty server does not have.
"""

from __future__ import annotations

import json
import uuid
from datetime import date
from pathlib import Path
from typing import Any

import pytest
import requests

from fhir_dm.cli import main as cli

pytestmark = pytest.mark.integration

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.json"))
NOW = date(2024, 4, 15)
FHIR = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
SCT = "http://snomed.info/sct"
MRN = "urn:oid:2.16.840.1.113883.19.5.99"

Json = dict[str, Any]


def _urn() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def _urn_only_input() -> Json:
    """No resource has an id: every reference is a urn:uuid fullUrl (an HL7 v2 converter's
    output); one result names the patient by identifier, one sits in a report."""
    patient, dm, obs, report, member = (_urn() for _ in range(5))
    value = f"MRN-{uuid.uuid4().hex[:8]}"
    entries = [
        (
            patient,
            {
                "resourceType": "Patient",
                "identifier": [{"system": MRN, "value": value}],
                "gender": "male",
                "birthDate": "1968",
            },
        ),
        (
            dm,
            {
                "resourceType": "Condition",
                "subject": {"reference": patient},
                "code": {"coding": [{"system": SCT, "code": "396230008"}]},
                "clinicalStatus": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                            "code": "active",
                        }
                    ]
                },
                "onsetDateTime": "2024-03-01",
            },
        ),
        (
            obs,
            {
                "resourceType": "Observation",
                "status": "final",
                "subject": {"identifier": {"system": MRN, "value": value}},
                "code": {
                    "coding": [{"system": "http://lab.example.org/obx3", "code": "TIF"}],
                    "text": "TIF1-gamma Ab",
                },
                "effectiveDateTime": "2024-03-05",
                "valueString": "Positive",
            },
        ),
        (
            report,
            {
                "resourceType": "DiagnosticReport",
                "status": "final",
                "subject": {"reference": patient},
                "code": {"text": "Myositis panel"},
                "effectiveDateTime": "2024-03-05",
                "result": [{"reference": member}],
            },
        ),
        (
            member,
            {
                "resourceType": "Observation",
                "status": "final",
                "code": {"text": "NXP2 Ab"},
                "valueString": "Negative",
            },
        ),
    ]
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"fullUrl": url, "resource": res} for url, res in entries],
    }


def _assess(path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> Json:
    assert cli.main(["assess", str(path), "--now", NOW.isoformat(), *extra]) == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def _post(base: str, bundle: Json) -> requests.Response:
    return requests.post(base, data=json.dumps(bundle), headers=FHIR, timeout=120)


def _statuses(response: requests.Response) -> list[str]:
    return [e["response"]["status"] for e in response.json()["entry"]]


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_the_cli_result_of_each_example_posts_as_it_is(
    fhir_base_url: str, example: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = _assess(example, capsys)
    patient = next(e for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    pid = patient["resource"]["id"]
    if example.stem != "seed-case-transaction":  # the same patient as seed-case-tif1g
        absent = requests.get(f"{fhir_base_url}/Patient/{pid}", headers=FHIR, timeout=60)
        assert absent.status_code in (404, 410)  # the server holds none of the input
    response = _post(fhir_base_url, bundle)
    assert response.status_code == 200, response.text
    assert all(s.startswith(("200", "201")) for s in _statuses(response))
    risk = requests.get(
        f"{fhir_base_url}/RiskAssessment",
        params={"subject": f"Patient/{pid}"},
        headers=FHIR,
        timeout=60,
    ).json()
    assert risk["total"] >= 1


def test_a_urn_uuid_only_input_posts_and_reposts_without_copies(
    fhir_base_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "hl7v2.json"
    path.write_text(json.dumps(_urn_only_input()))
    # The result alone names placeholders it does not hold: the server refuses it.
    alone = _post(fhir_base_url, _assess(path, capsys, "--result-only"))
    assert alone.status_code == 400 and "HAPI-0541" in alone.text
    bundle = _assess(path, capsys)
    first = _post(fhir_base_url, bundle)
    assert first.status_code == 200, first.text
    assert all(s.startswith("201") for s in _statuses(first))
    risk_location = first.json()["entry"][0]["response"]["location"]
    where = risk_location.split("/_history")[0]
    risk = requests.get(f"{fhir_base_url}/{where}", headers=FHIR, timeout=60)
    subject = risk.json()["subject"]["reference"]
    assert requests.get(f"{fhir_base_url}/{subject}", headers=FHIR, timeout=60).status_code == 200
    assert risk.json()["prediction"][0]["qualitativeRisk"]["coding"][0]["code"] == "high"
    # Posting the same file again creates nothing: every entry matches what is there.
    again = _post(fhir_base_url, bundle)
    assert again.status_code == 200, again.text
    assert not [s for s in _statuses(again) if s.startswith("201")]


def test_references_the_input_cannot_carry_are_said_plainly(
    fhir_base_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _urn_only_input()
    data["entry"][1]["resource"]["encounter"] = {"reference": "Encounter/not-in-the-input"}
    path = tmp_path / "dangling.json"
    path.write_text(json.dumps(data))
    assert cli.main(["assess", str(path), "--now", NOW.isoformat()]) == 0
    out, err = capsys.readouterr()
    assert "Encounter/not-in-the-input" in err
    assert "post it to a server that has them" in err
    # And the server says the same thing.
    assert _post(fhir_base_url, json.loads(out)).status_code in (400, 404, 422)
