"""The clinician's app: its pages and settings, and the JSON view the patient page renders."""

from __future__ import annotations

from typing import Any

import responses
from flask.testing import FlaskClient

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
