"""Put a patient's record on the test FHIR server as an EHR holds it (ids kept)."""

from __future__ import annotations

from typing import Any

from fhir_dm.fhir.client import FhirClient

Json = dict[str, Any]


def store(hapi: FhirClient, *resources: Json) -> None:
    """PUT every resource to its id in one transaction."""
    entries = [
        {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
        for r in resources
    ]
    hapi.transaction(
        {"resourceType": "Bundle", "type": "transaction", "entry": entries}, idempotent=True
    )
