"""System endpoints: liveness, readiness against the FHIR server, the CapabilityStatement."""

from __future__ import annotations

import json
from pathlib import Path

import requests
import responses
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from flask.testing import FlaskClient

from fhir_dm.knowledge.models import Knowledge
from tests.unit.web.conftest import BASE, FakeFhirServer


def test_healthz_is_alive_without_any_server(client: FlaskClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json()["status"] == "ok"


def test_readyz_ok_when_the_fhir_server_answers(
    client: FlaskClient, fhir_server: FakeFhirServer
) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ready"}


def test_readyz_503_names_the_failed_call(
    client: FlaskClient, rsps: responses.RequestsMock
) -> None:
    rsps.get(f"{BASE}/metadata", status=500)
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.content_type.startswith("application/fhir+json")
    outcome = response.get_json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["code"] == "exception"
    assert "GET metadata failed: HTTP 500" in outcome["issue"][0]["diagnostics"]


def test_readyz_503_on_timeout_does_not_retry(
    client: FlaskClient, rsps: responses.RequestsMock
) -> None:
    rsps.get(f"{BASE}/metadata", body=requests.ConnectTimeout())
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.get_json()["issue"][0]["code"] == "timeout"
    assert len(rsps.calls) == 1


def test_metadata_is_an_r4_capability_statement_with_both_operations(
    client: FlaskClient, knowledge: Knowledge
) -> None:
    response = client.get("/metadata")
    assert response.status_code == 200
    assert response.content_type == "application/fhir+json; charset=utf-8"
    statement = response.get_json()
    CapabilityStatement.model_validate(statement)
    assert statement["fhirVersion"] == "4.0.1"
    base = knowledge.ruleset.canonical_base
    rest = statement["rest"][0]
    assert rest["operation"] == [
        {
            "name": "dm-cancer-screening",
            "definition": f"{base}/OperationDefinition/dm-cancer-screening",
        }
    ]
    patient = rest["resource"][0]
    assert patient["type"] == "Patient"
    assert patient["operation"][0]["definition"] == (
        f"{base}/OperationDefinition/Patient-dm-cancer-screening"
    )
    assert statement["implementation"]["url"] == "https://dm.example.org"


def test_metadata_names_the_operation_definitions_of_profiles(client: FlaskClient) -> None:
    statement = client.get("/metadata").get_json()
    rest = statement["rest"][0]
    named = {rest["operation"][0]["definition"], rest["resource"][0]["operation"][0]["definition"]}
    profiles = Path(__file__).resolve().parents[3] / "profiles"
    urls = {
        json.loads(p.read_text(encoding="utf-8"))["url"]
        for p in profiles.glob("OperationDefinition-*.json")
    }
    assert named <= urls


def test_system_endpoints_need_no_token_in_static_mode(client_static: FlaskClient) -> None:
    assert client_static.get("/healthz").status_code == 200
    assert client_static.get("/metadata").status_code == 200
