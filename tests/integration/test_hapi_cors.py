"""The local HAPI test server answers browser clients on loopback origins (CORS).

The app's SMART client and the CDS Hooks sandbox run in a browser on another origin than the
FHIR server: without CORS the browser refuses every answer.
"""

from __future__ import annotations

import pytest
import requests

pytestmark = pytest.mark.integration

LOCAL_ORIGIN = "http://127.0.0.1:5173"


def _preflight(base: str, origin: str) -> requests.Response:
    return requests.options(
        f"{base}/Patient",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization",
        },
        timeout=30,
    )


def test_a_loopback_browser_origin_may_call_the_local_server(fhir_base_url: str) -> None:
    answer = _preflight(fhir_base_url, LOCAL_ORIGIN)
    assert answer.status_code == 200
    assert answer.headers["Access-Control-Allow-Origin"] == LOCAL_ORIGIN
    assert "authorization" in answer.headers["Access-Control-Allow-Headers"].lower()
    read = requests.get(
        f"{fhir_base_url}/metadata", headers={"Origin": "http://localhost:9000"}, timeout=30
    )
    assert read.status_code == 200
    assert read.headers["Access-Control-Allow-Origin"] == "http://localhost:9000"


def test_another_origin_is_not_allowed(fhir_base_url: str) -> None:
    answer = _preflight(fhir_base_url, "https://elsewhere.example.org")
    assert "Access-Control-Allow-Origin" not in answer.headers
