"""The start-up check of the FHIR base: reachable, the right path, FHIR R4; else one clear line."""

from __future__ import annotations

from typing import Any

import pytest
import responses

from fhir_dm.common.errors import KnowledgeError
from fhir_dm.fhir.client import FhirClient, check_fhir_base

BASE = "http://h.example/fhir"


def capability(version: str) -> dict[str, Any]:
    return {"resourceType": "CapabilityStatement", "status": "active", "fhirVersion": version}


@responses.activate
def test_an_r4_server_passes_and_says_its_version() -> None:
    responses.get(f"{BASE}/metadata", json=capability("4.0.1"))
    with FhirClient(BASE) as client:
        assert check_fhir_base(client) == "4.0.1"


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ({"status": 404}, f"FHIR base {BASE} answered 404 to /metadata: wrong path?"),
        (
            {"json": capability("3.0.2")},
            f"FHIR base {BASE}: server speaks FHIR 3.0.2 (STU3); fhir-dm reads R4 (4.0.x)",
        ),
        ({"json": capability("5.0.0")}, "server speaks FHIR 5.0.0 (R5)"),
        ({"json": {"resourceType": "Bundle"}}, "with a Bundle, not a CapabilityStatement"),
        (
            {"body": "<html>Welcome</html>", "content_type": "text/html"},
            "something that is not FHIR JSON: wrong path?",
        ),
        ({"status": 401}, "answered 401 to /metadata: check fhir.auth"),
        ({"status": 500}, "GET metadata failed: HTTP 500"),
    ],
)
@responses.activate
def test_a_wrong_base_is_named_with_its_problem(answer: dict[str, Any], message: str) -> None:
    responses.get(f"{BASE}/metadata", **answer)
    with FhirClient(BASE) as client, pytest.raises(KnowledgeError) as exc:
        check_fhir_base(client)
    assert message in exc.value.message and "\n" not in exc.value.message


def test_an_unreachable_base_is_named() -> None:
    with FhirClient("http://127.0.0.1:9/fhir") as client, pytest.raises(KnowledgeError) as exc:
        check_fhir_base(client)
    assert exc.value.message.startswith("FHIR base http://127.0.0.1:9/fhir is not reachable")
