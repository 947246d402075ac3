"""Every failure is an OperationOutcome with the right status and issue code, never a trace."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import requests
import responses
from flask import Flask
from flask.testing import FlaskClient

from fhir_dm.web.app import create_app
from tests import factories as f
from tests.unit.web.conftest import (
    BASE,
    STATIC_TOKEN,
    FakeFhirServer,
    make_settings,
    service_of,
    transaction_calls,
)

OP = "/$dm-cancer-screening"
FHIR = {"Content-Type": "application/fhir+json"}


def _outcome(response: Any, status: int, code: str) -> dict[str, Any]:
    """Check the shape every error shares and return the first issue."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.content_type == "application/fhir+json; charset=utf-8"
    body = response.get_json()
    assert body["resourceType"] == "OperationOutcome"
    issue: dict[str, Any] = body["issue"][0]
    assert issue["severity"] == "error"
    assert issue["code"] == code
    assert "Traceback" not in response.get_data(as_text=True)
    return issue


def _bundle() -> dict[str, Any]:
    p = f.patient("err-1", birth_date="1994-01-01")
    return f.bundle(p, f.iim_condition(p))


def test_400_malformed_json(client: FlaskClient) -> None:
    response = client.post(OP, data=b'{"resourceType": "Bundle",', headers=FHIR)
    issue = _outcome(response, 400, "structure")
    assert "not JSON" in issue["diagnostics"]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xff\xfe\x00garbage", "not"),
        (b'{"value": NaN}', "NaN"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b"   ", "empty"),
    ],
)
def test_400_other_non_json_bodies(client: FlaskClient, data: bytes, reason: str) -> None:
    issue = _outcome(client.post(OP, data=data, headers=FHIR), 400, "structure")
    assert reason in issue["diagnostics"]


def test_400_not_fhir_names_the_path(client: FlaskClient) -> None:
    bundle = _bundle()
    bundle["entry"][0]["resource"]["birthDate"] = "the fifth of May"
    issue = _outcome(client.post(OP, json=bundle, headers=FHIR), 400, "structure")
    assert issue["expression"] == ["Bundle.entry[0].resource.birthDate"]


def test_400_not_fhir_inside_parameters_names_the_parameter_path(client: FlaskClient) -> None:
    bundle = _bundle()
    bundle["entry"][0]["resource"]["birthDate"] = "the fifth of May"
    parameters = {
        "resourceType": "Parameters",
        "parameter": [{"name": "bundle", "resource": bundle}],
    }
    issue = _outcome(client.post(OP, json=parameters, headers=FHIR), 400, "structure")
    assert issue["expression"] == ["Parameters.parameter[0].resource.entry[0].resource.birthDate"]


def test_400_json_that_is_no_resource(client: FlaskClient) -> None:
    _outcome(client.post(OP, json=[1, 2], headers=FHIR), 400, "structure")


def test_400_a_resource_that_is_neither_bundle_nor_parameters(client: FlaskClient) -> None:
    issue = _outcome(client.post(OP, json=f.patient("x-1"), headers=FHIR), 400, "invalid")
    assert issue["expression"] == ["Patient"]


def test_400_unknown_parameter(client: FlaskClient) -> None:
    parameters = {
        "resourceType": "Parameters",
        "parameter": [{"name": "dryrun", "valueBoolean": True}],
    }
    issue = _outcome(client.post(OP, json=parameters, headers=FHIR), 400, "invalid")
    assert issue["expression"] == ["Parameters.parameter[0].name"]


def test_400_no_patient(client: FlaskClient) -> None:
    p = f.patient("gone-1")
    bundle = f.bundle(f.iim_condition(p))
    issue = _outcome(client.post(OP, json=bundle, headers=FHIR), 400, "required")
    assert "no Patient" in issue["diagnostics"]


def test_400_bad_patient_id(client: FlaskClient, rsps: responses.RequestsMock) -> None:
    _outcome(client.post("/Patient/a_b/$dm-cancer-screening"), 400, "invalid")
    assert len(rsps.calls) == 0


def test_413_declared_length_is_refused_before_reading(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path, max_request_bytes=2000))
    body = json.dumps(f.bundle(*f.seed_case())).encode()
    assert len(body) > 2000
    issue = _outcome(app.test_client().post(OP, data=body, headers=FHIR), 413, "too-long")
    assert "2000 bytes" in issue["diagnostics"]


def test_413_without_content_length_is_cut_off_by_the_stream_limit(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path, max_request_bytes=2000))
    body = json.dumps(f.bundle(*f.seed_case())).encode()
    response = app.test_client().post(
        OP,
        input_stream=io.BytesIO(body),
        headers={**FHIR, "Transfer-Encoding": "chunked"},
        # What gunicorn sets for a chunked body, so the app may read it to its end.
        environ_overrides={"wsgi.input_terminated": True},
    )
    _outcome(response, 413, "too-long")


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", None])
def test_415_wrong_content_type(client: FlaskClient, content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post(OP, data=json.dumps(_bundle()), headers=headers)
    _outcome(response, 415, "not-supported")


def test_415_non_utf8_charset(client: FlaskClient) -> None:
    headers = {"Content-Type": "application/fhir+json; charset=latin-1"}
    _outcome(client.post(OP, data=json.dumps(_bundle()), headers=headers), 415, "not-supported")


def test_json_with_charset_is_accepted(client: FlaskClient) -> None:
    headers = {"Content-Type": "application/json; charset=UTF-8"}
    assert client.post(OP, data=json.dumps(_bundle()), headers=headers).status_code == 200


def test_404_unknown_patient(client: FlaskClient, fhir_server: FakeFhirServer) -> None:
    response = client.post("/Patient/nobody-here/$dm-cancer-screening")
    issue = _outcome(response, 404, "not-found")
    assert "nobody-here" not in issue["diagnostics"]


def test_404_unknown_route(client: FlaskClient) -> None:
    _outcome(client.get("/Patient/1/$everything"), 404, "not-found")


def test_405_wrong_method(client: FlaskClient) -> None:
    response = client.get(OP)
    _outcome(response, 405, "not-supported")
    assert "POST" in response.headers["Allow"]


def test_401_static_mode_wrong_token(client_static: FlaskClient) -> None:
    response = client_static.post(
        OP, json=_bundle(), headers={**FHIR, "Authorization": "Bearer not-the-right-token"}
    )
    _outcome(response, 401, "login")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_401_missing_token_is_checked_before_the_body(client_static: FlaskClient) -> None:
    response = client_static.post(OP, data=b"{not json", headers=FHIR)
    _outcome(response, 401, "login")


def test_static_mode_right_token_passes(client_static: FlaskClient) -> None:
    response = client_static.post(
        OP, json=_bundle(), headers={**FHIR, "Authorization": f"Bearer {STATIC_TOKEN}"}
    )
    assert response.status_code == 200


def test_401_on_the_patient_operation(client_static: FlaskClient) -> None:
    response = client_static.post("/Patient/1/$dm-cancer-screening")
    _outcome(response, 401, "login")


def test_502_upstream_500(client: FlaskClient, rsps: responses.RequestsMock) -> None:
    rsps.get(f"{BASE}/Patient/up-1", status=500)
    issue = _outcome(client.post("/Patient/up-1/$dm-cancer-screening"), 502, "exception")
    assert issue["diagnostics"] == "GET Patient/{id} failed: HTTP 500"


def test_504_upstream_timeout(client: FlaskClient, rsps: responses.RequestsMock) -> None:
    rsps.get(f"{BASE}/Patient/up-2", body=requests.ReadTimeout())
    issue = _outcome(client.post("/Patient/up-2/$dm-cancer-screening"), 504, "timeout")
    assert "timed out" in issue["diagnostics"]


def test_502_transaction_rejected_quotes_the_server(
    client: FlaskClient, fhir_server: FakeFhirServer, rsps: responses.RequestsMock
) -> None:
    fhir_server.reject_transaction = (
        422,
        {
            "resourceType": "OperationOutcome",
            "issue": [
                {
                    "severity": "error",
                    "code": "processing",
                    "diagnostics": "Unknown profile on CarePlan",
                }
            ],
        },
    )
    fhir_server.put(f.patient("err-1", birth_date="1994-01-01"))
    bundle = _bundle()
    for entry in bundle["entry"]:
        del entry["fullUrl"]  # a write names the Patient by its id on this server
    response = client.post(f"{OP}?preview=false", json=bundle, headers=FHIR)
    issue = _outcome(response, 502, "processing")
    assert issue["diagnostics"] == (
        "POST transaction bundle failed: HTTP 422: Unknown profile on CarePlan"
    )
    assert transaction_calls(rsps) == 1


def test_500_last_resort_hides_the_exception(
    app: Flask, client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret detail: Patient/err-1 born 1994-01-01")

    monkeypatch.setattr(service_of(app).engine, "assess", boom)
    response = client.post(OP, json=_bundle(), headers={**FHIR, "X-Request-ID": "req-500-test"})
    issue = _outcome(response, 500, "exception")
    assert issue["diagnostics"] == "internal error (request id req-500-test)"
    text = response.get_data(as_text=True)
    assert "secret" not in text and "RuntimeError" not in text
    assert response.headers["X-Request-ID"] == "req-500-test"


def test_502_when_the_server_returns_invalid_fhir(
    client: FlaskClient, fhir_server: FakeFhirServer
) -> None:
    p = f.patient("bad-data-1", birth_date="1994-01-01")
    broken = dict(f.iim_condition(p, id="bad-data-1-dm"), onsetDateTime="yesterday")
    fhir_server.put(p, broken)
    response = client.post("/Patient/bad-data-1/$dm-cancer-screening")
    issue = _outcome(response, 502, "exception")
    assert issue["diagnostics"].startswith(
        "the FHIR server returned a resource that is not valid FHIR R4: Condition.onsetDateTime"
    )
