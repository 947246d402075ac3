"""The clinician's app: its pages and settings, and the JSON view the patient page renders."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import responses
from flask.testing import FlaskClient

from fhir_dm.web import app_ui
from tests import factories as f
from tests.unit.web.conftest import FakeFhirServer, transaction_calls

VIEW = "/app/api/Patient/{id}/view?now=2024-04-15"
Json = dict[str, Any]


def _high_risk(fhir_server: FakeFhirServer, pid: str) -> None:
    p = f.patient(pid, birth_date="1970-01-01")
    fhir_server.put(p, f.iim_condition(p, id=f"{pid}-dm"), f.antibody(p, "tif1g", id=f"{pid}-ab"))


def test_the_launch_and_app_pages_load_the_vendored_client_and_a_strict_policy(
    client: FlaskClient,
) -> None:
    for path in ("/app/launch", "/app/"):
        with client.get(path) as page:
            assert page.status_code == 200
            assert "static/vendor/fhir-client-2.6.3.min.js" in page.get_data(as_text=True)
            assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    with client.get("/app/static/vendor/fhir-client-2.6.3.min.js") as library:
        assert library.status_code == 200
        assert library.get_data(as_text=True).startswith("/*! fhirclient 2.6.3")
    with client.get("/app/static/app.js") as script:
        assert script.status_code == 200


def test_the_app_settings_give_the_client_id_and_patient_scopes(client: FlaskClient) -> None:
    config = client.get("/app/config.json").get_json()
    assert config["clientId"] == "fhir-dm"
    assert "launch/patient" in config["scope"].split()
    scopes = config["scope"].split()
    # Read what the page shows, write what its button writes, read the clinic (user level).
    assert {"patient/*.rs", "patient/CarePlan.cu", "patient/Provenance.c", "user/*.rs"} <= set(
        scopes
    )


def test_the_view_is_the_explanation_with_item_statuses_and_writes_nothing(
    client: FlaskClient, fhir_server: FakeFhirServer, rsps: responses.RequestsMock
) -> None:
    _high_risk(fhir_server, "ui-1")
    response = client.post(VIEW.format(id="ui-1"))
    assert response.status_code == 200, response.get_data(as_text=True)
    view: Json = response.get_json()
    assert view["tier"] == "high" and view["patient"] == "Patient/ui-1"
    assert view["today"] == "2024-04-15"
    assert view["diagnosis"]["date"] == "2024-03-01"
    schedule = view["explanation"]["schedule"]
    assert sum(view["counts"].values()) == len(schedule) > 0
    assert {row["status"] for row in schedule} <= {"done", "due", "overdue", "upcoming"}
    assert view["rounds"][0]["start"] <= view["rounds"][-1]["start"]
    assert any(fa["evidence"] for fa in view["factors"])
    assert view["plan"] == {
        "status": "preview",
        "summary": view["plan"]["summary"],
        "proposed": True,
        "onFile": False,
        "writable": True,
        "revision": False,
    }
    assert transaction_calls(rsps) == 0


def test_after_a_write_the_plan_is_on_file_and_not_writable(
    client: FlaskClient, fhir_server: FakeFhirServer, rsps: responses.RequestsMock
) -> None:
    _high_risk(fhir_server, "ui-2")
    written = client.post("/Patient/ui-2/$dm-cancer-screening?preview=false&now=2024-04-15")
    assert written.status_code == 200
    view = client.post(VIEW.format(id="ui-2")).get_json()
    assert view["plan"]["status"] == "unchanged"
    assert view["plan"]["onFile"] is True and view["plan"]["writable"] is False
    assert transaction_calls(rsps) == 1


def test_the_view_refuses_bad_ids_unknown_parameters_and_unknown_patients(
    client: FlaskClient, fhir_server: FakeFhirServer
) -> None:
    bad = client.post("/app/api/Patient/a%20b/view")
    assert bad.status_code == 400 and bad.get_json()["resourceType"] == "OperationOutcome"
    assert client.post("/app/api/Patient/x/view?preview=false").status_code == 400
    assert client.post("/app/api/Patient/x/view?now=2024-02-30").status_code == 400
    assert client.post("/app/api/Patient/nobody/view").status_code == 404


def test_the_view_needs_a_token_when_the_service_does(client_static: FlaskClient) -> None:
    response = client_static.post("/app/api/Patient/x/view")
    assert response.status_code == 401
    assert response.get_json()["issue"][0]["code"] == "login"
    with client_static.get("/app/") as page:
        assert page.status_code == 200  # the pages themselves are public


MR = {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}


def test_the_header_names_the_patient_with_age_sex_mrn_and_one_diagnosis_date(
    client: FlaskClient, fhir_server: FakeFhirServer
) -> None:
    p = f.patient(
        "ui-h",
        birth_date="1970-01-01",
        name=[{"use": "official", "given": ["Ada"], "family": "Lovelace"}],
    )
    p["identifier"] = [
        {"system": "urn:other", "value": "not-the-mrn"},
        {"type": {"coding": [MR]}, "system": "urn:hospital:mrn", "value": "MRN-0042"},
    ]
    fhir_server.put(
        p, f.iim_condition(p, id="ui-h-dm", onset="2024-02-10", recordedDate="2024-03-01")
    )
    view = client.post(VIEW.format(id="ui-h")).get_json()
    assert view["header"] == {
        "name": "Ada Lovelace",
        "age": "54",
        "sex": "female",
        "sexNote": "",
        "mrn": "MRN-0042",
        "diagnosis": {"date": "2024-03-01", "source": "recordedDate"},
        "onset": {"date": "2024-02-10", "source": "onsetDateTime"},
        "condition": "Condition/ui-h-dm",
    }
    # One diagnosis date on the page: the one the schedule is dated from.
    assert view["diagnosis"]["date"] == view["header"]["diagnosis"]["date"]


def test_the_factor_table_says_what_each_factor_contributed_to_the_tier(
    client: FlaskClient, fhir_server: FakeFhirServer
) -> None:
    _high_risk(fhir_server, "ui-f")
    view = client.post(VIEW.format(id="ui-f")).get_json()
    contributions = {fa["factor"]: fa["contribution"] for fa in view["factors"]}
    assert contributions["anti-TIF1-gamma positive"] == "high-risk factor"
    assert contributions["Dermatomyositis"] == "high-risk factor"
    assert view["tierLabel"] == "High risk"
    assert view["tierBasis"].startswith("High risk: ")
    assert "high-risk factors (at least 2)" in view["tierBasis"]


def test_one_high_risk_factor_gives_moderate_and_the_table_says_so(
    client: FlaskClient, fhir_server: FakeFhirServer
) -> None:
    p = f.patient("ui-m", birth_date="1994-01-01")
    fhir_server.put(p, f.iim_condition(p, id="ui-m-dm"))
    view = client.post(VIEW.format(id="ui-m")).get_json()
    assert view["tier"] == "moderate"
    assert [(fa["factor"], fa["contribution"]) for fa in view["factors"]] == [
        ("Dermatomyositis", "high-risk factor")
    ]
    assert view["tierBasis"] == "Moderate risk: 1 high-risk factor (at least 1)"


def test_a_patient_who_is_not_stratified_gets_no_factor_table_and_no_tier(
    client: FlaskClient, fhir_server: FakeFhirServer
) -> None:
    p = f.patient("ui-ibm", birth_date="1958-06-01", gender="male")
    fhir_server.put(p, f.iim_condition(p, id="ui-ibm-dm", code="72315009"))
    view = client.post(VIEW.format(id="ui-ibm")).get_json()
    assert view["factors"] == [] and view["tierBasis"] is None
    assert view["tier"] is None and view["tierLabel"] is None
    assert view["explanation"]["headline"].startswith("Not stratified")


def test_the_reasons_are_clinical_words_and_the_rules_are_in_the_evidence(
    client: FlaskClient, fhir_server: FakeFhirServer
) -> None:
    _high_risk(fhir_server, "ui-r")
    e = client.post(VIEW.format(id="ui-r")).get_json()["explanation"]
    for reason in e["reasons"]:
        assert "rule " not in reason and "[BMJ]" not in reason and "[AT]" not in reason
    assert "High-risk factor: anti-TIF1-gamma positive" in e["reasons"]
    assert any(line.startswith("anti-TIF1-gamma positive: rule ab-tif1g") for line in e["evidence"])


def test_the_counts_of_orders_and_activities_add_up_to_the_items(
    client: FlaskClient, fhir_server: FakeFhirServer
) -> None:
    _high_risk(fhir_server, "ui-c")
    view = client.post(VIEW.format(id="ui-c")).get_json()
    items = view["items"]
    schedule = view["explanation"]["schedule"]
    assert items["orders"] + items["activities"] == items["total"] == len(schedule)
    assert items["orders"] == sum(row["order"] for row in schedule) > 0
    assert items["activities"] > 0
    assert items["line"] == (
        f"Proposed: {items['orders']} service requests and {items['activities']} care-plan"
        f" activities ({items['total']} items)"
    )
    # The orders are the ServiceRequests the preview would write.
    assert f"{items['orders']} service requests" in view["plan"]["summary"]


def _luminance(hex_colour: str) -> float:
    channels = [int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def _contrast(a: str, b: str) -> float:
    high, low = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def test_the_focus_ring_has_3_to_1_contrast_against_every_neighbouring_colour() -> None:
    """WCAG 2.2 AA (focus appearance, non-text contrast): the ring against the white gap,
    the cards, the page and the dark button."""
    css = (Path(app_ui.__file__).parent / "static" / "app.css").read_text(encoding="utf-8")
    variables = dict(re.findall(r"--([a-z]+): (#[0-9a-f]{6})", css))
    rule = re.search(r":focus-visible \{([^}]*)\}", css)
    assert rule is not None
    outline = re.search(r"outline: 3px solid var\(--([a-z]+)\)", rule.group(1))
    assert outline is not None
    ring = variables[outline.group(1)]
    for neighbour in ("#ffffff", variables["page"], variables["bg"]):
        assert _contrast(ring, neighbour) >= 3, neighbour
    assert _contrast("#ffbf47", "#ffffff") < 3  # the old ring, for comparison
