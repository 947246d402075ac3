"""Logs: one JSON line per request with a request id and the URL rule, and no patient data."""

from __future__ import annotations

import copy
import io
import json
import logging
from typing import Any

import pytest
import responses
from flask import Flask
from flask.testing import FlaskClient

from tests import factories as f
from tests.unit.web.conftest import FakeFhirServer, service_of

PATIENT_ID = "pat-7f3a9c1e"
BIRTH_DATE = "1951-02-03"
OP = "/$dm-cancer-screening"
FHIR = {"Content-Type": "application/fhir+json"}


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def _access(stream: io.StringIO) -> list[dict[str, Any]]:
    return [line for line in _lines(stream) if line["logger"] == "fhir_dm.web.access"]


def test_every_request_gets_an_id_echoed_in_the_response(
    log_stream: io.StringIO, client: FlaskClient
) -> None:
    response = client.get("/healthz")
    request_id = response.headers["X-Request-ID"]
    assert len(request_id) == 32
    (line,) = _access(log_stream)
    assert line["request_id"] == request_id
    assert line["method"] == "GET" and line["route"] == "/healthz" and line["status"] == 200
    assert isinstance(line["duration_ms"], float)


def test_a_sane_incoming_request_id_is_kept(client: FlaskClient) -> None:
    response = client.get("/healthz", headers={"X-Request-ID": "edge-4f1c.77"})
    assert response.headers["X-Request-ID"] == "edge-4f1c.77"


@pytest.mark.parametrize("incoming", ["has spaces", "x" * 200, "<script>", "a\tb"])
def test_an_odd_incoming_request_id_is_replaced(client: FlaskClient, incoming: str) -> None:
    response = client.get("/healthz", headers={"X-Request-ID": incoming})
    assert response.headers["X-Request-ID"] != incoming


def test_the_access_line_names_the_rule_not_the_path(
    log_stream: io.StringIO, client: FlaskClient, fhir_server: FakeFhirServer
) -> None:
    client.post(f"/Patient/{PATIENT_ID}/$dm-cancer-screening?now=2024-04-15")
    (line,) = _access(log_stream)
    assert line["route"] == "/Patient/<id>/$dm-cancer-screening"
    assert line["status"] == 404
    assert PATIENT_ID not in log_stream.getvalue()


def test_no_patient_data_in_any_log_line(
    log_stream: io.StringIO,
    caplog: pytest.LogCaptureFixture,
    app: Flask,
    client: FlaskClient,
    fhir_server: FakeFhirServer,
    rsps: responses.RequestsMock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG)
    p = f.patient(PATIENT_ID, birth_date=BIRTH_DATE, gender="male")
    resources = [p, f.iim_condition(p, id=f"{PATIENT_ID}-dm"), f.antibody(p, "tif1g")]
    fhir_server.put(*resources)
    op = f"/Patient/{PATIENT_ID}/$dm-cancer-screening?now=2024-04-15"

    assert client.post(op).status_code == 200  # pull and write
    assert client.post(op).status_code == 200  # unchanged
    assert client.post(OP, json=f.bundle(*resources), headers=FHIR).status_code == 200
    bad = copy.deepcopy(f.bundle(*resources))
    bad["entry"][0]["resource"]["birthDate"] = f"{BIRTH_DATE}T99"
    assert client.post(OP, json=bad, headers=FHIR).status_code == 400
    fhir_server.reject_transaction = (
        422,
        {
            "resourceType": "OperationOutcome",
            "issue": [
                {
                    "severity": "error",
                    "code": "processing",
                    "diagnostics": f"Resource Patient/{PATIENT_ID} born {BIRTH_DATE} rejected",
                }
            ],
        },
    )
    other = f.bundle(*resources, f.antibody(p, "nxp2"), full_urls="none")
    assert client.post(f"{OP}?preview=false", json=other, headers=FHIR).status_code == 502

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise ValueError(f"cannot handle Patient/{PATIENT_ID} born {BIRTH_DATE}")

    monkeypatch.setattr(service_of(app).engine, "assess", boom)
    assert client.post(OP, json=f.bundle(*resources), headers=FHIR).status_code == 500

    captured = log_stream.getvalue() + caplog.text
    assert len(_access(log_stream)) == 6
    assert PATIENT_ID not in captured
    assert BIRTH_DATE not in captured
    assert "ValueError" in captured  # the last resort says what failed, not with which data
