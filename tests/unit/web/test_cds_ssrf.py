"""CDS fetches stay inside the allowed FHIR server: dot segments, redirects, next links, ids."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import requests
import responses
from flask import Flask

from fhir_dm.core.assess import Engine
from fhir_dm.web.cds_hooks import current_cds, fhir_server_allowed
from tests.unit.cds import scenarios
from tests.unit.web.test_cds_hooks import (
    EHR_FHIR,
    FHIR_TOKEN,
    SERVICE,
    EhrFhir,
    auth,
    ec_key,
    full_request,
    incomplete_detail,
    make_app,
    rsps,
)

__all__ = ["ec_key", "rsps"]  # fixtures shared with test_cds_hooks

EHR_ORIGIN = "https://ehr.example.org"
EVIL = "https://evil.example.net"

Json = dict[str, Any]


class Recorder:
    """Every request that reached a URL outside the allowed base, with its Authorization."""

    def __init__(self, mock: responses.RequestsMock) -> None:
        self.hits: list[tuple[str, str | None]] = []
        for base in (f"{EHR_ORIGIN}/fhir/other", f"{EHR_ORIGIN}/other", EVIL):
            mock.add_callback(responses.GET, re.compile(re.escape(base) + ".*"), callback=self._hit)

    def _hit(self, request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        self.hits.append((str(request.url), request.headers.get("Authorization")))
        bundle = {"resourceType": "Bundle", "type": "searchset", "entry": []}
        return 200, {"Content-Type": "application/fhir+json"}, json.dumps(bundle)


@pytest.fixture
def app(engine: Engine, rsps: responses.RequestsMock) -> Flask:
    return make_app(engine)


@pytest.fixture
def outside(rsps: responses.RequestsMock) -> Recorder:
    return Recorder(rsps)


def post(app: Flask, key: Any, body: Json) -> Any:
    return app.test_client().post(f"/cds-services/{SERVICE}", json=body, headers=auth(key))


@pytest.mark.parametrize(
    "server",
    [
        f"{EHR_FHIR}/../other",
        f"{EHR_FHIR}/%2e%2e/other",
        f"{EHR_FHIR}/%2E%2e/other",
        f"{EHR_FHIR}/.%2e/other",
        f"{EHR_FHIR}/./x",
        f"{EHR_FHIR}/%252e%252e/other",
    ],
)
def test_fhir_server_with_dot_segments_is_400_and_gets_no_token(
    app: Flask, ec_key: Any, rsps: responses.RequestsMock, outside: Recorder, server: str
) -> None:
    ehr = EhrFhir(rsps)
    resources = scenarios.high_risk()
    ehr.resources = resources
    body = full_request(app_templates(app), resources, fhir_server=server, token=FHIR_TOKEN)
    del body["prefetch"]["conditions"]
    response = post(app, ec_key, body)
    assert response.status_code == 400
    outcome = response.get_json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert "fhirServer" in json.dumps(outcome)
    assert outside.hits == []
    assert ehr.calls == []


def test_dot_segments_are_never_allowed() -> None:
    allowed = (EHR_FHIR,)
    for url in (
        f"{EHR_FHIR}/../other",
        f"{EHR_FHIR}/%2e%2e/other",
        f"{EHR_FHIR}/a/..",
        f"{EHR_FHIR}/%2E",
        f"{EHR_FHIR}/..;x/other",
        f"{EHR_FHIR}/%252E%252E/other",
    ):
        assert not fhir_server_allowed(url, allowed, development=False), url
        assert not fhir_server_allowed(url, (), development=True), url
    assert fhir_server_allowed(f"{EHR_FHIR}/tenant..1", allowed, development=False)


@pytest.mark.parametrize(
    "target", [f"{EVIL}/fhir/Condition?x=1", f"{EHR_ORIGIN}/other/Condition?x=1"]
)
def test_a_redirect_is_not_followed(
    app: Flask, ec_key: Any, rsps: responses.RequestsMock, outside: Recorder, target: str
) -> None:
    rsps.get(f"{EHR_FHIR}/Condition", status=302, headers={"Location": target})
    ehr = EhrFhir(rsps)
    resources = scenarios.high_risk()
    ehr.resources = resources
    body = full_request(app_templates(app), resources, fhir_server=EHR_FHIR, token=FHIR_TOKEN)
    del body["prefetch"]["conditions"]
    response = post(app, ec_key, body)
    assert "conditions" in incomplete_detail(response)
    assert outside.hits == []


@pytest.mark.parametrize(
    "next_url",
    [
        f"{EHR_ORIGIN}/other/Condition?page=2",
        f"{EHR_ORIGIN}/fhir/other?page=2",
        f"{EHR_FHIR}/../other?page=2",
        f"{EHR_FHIR}/%2e%2e/other?page=2",
    ],
)
def test_a_next_link_outside_the_base_path_is_not_followed(
    app: Flask, ec_key: Any, rsps: responses.RequestsMock, outside: Recorder, next_url: str
) -> None:
    page = scenarios.searchset([], next_url=next_url)
    rsps.get(f"{EHR_FHIR}/Condition", json=page)
    ehr = EhrFhir(rsps)
    resources = scenarios.high_risk()
    ehr.resources = resources
    body = full_request(app_templates(app), resources, fhir_server=EHR_FHIR, token=FHIR_TOKEN)
    del body["prefetch"]["conditions"]
    response = post(app, ec_key, body)
    assert "conditions" in incomplete_detail(response)
    assert outside.hits == []


@pytest.mark.parametrize("patient_id", ["..", ".", "a/b", "%2e%2e"])
def test_a_patient_id_that_is_a_dot_segment_or_no_fhir_id_is_400(
    app: Flask, ec_key: Any, rsps: responses.RequestsMock, outside: Recorder, patient_id: str
) -> None:
    ehr = EhrFhir(rsps)
    body = scenarios.hook_request(patient_id, None, fhir_server=EHR_FHIR, token=FHIR_TOKEN)
    response = post(app, ec_key, body)
    assert response.status_code == 400
    assert response.get_json()["resourceType"] == "OperationOutcome"
    assert ehr.calls == []
    assert outside.hits == []


def app_templates(app: Flask) -> Any:
    with app.app_context():
        return current_cds().templates
