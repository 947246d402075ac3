"""Patients for CDS Hooks tests (one per tier and scope) and the prefetch an EHR would send."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from fhir_dm.cds.prefetch import PrefetchTemplate
from tests import factories as f

Json = dict[str, Any]


def _pid(tag: str) -> str:
    return f"cds-{tag}-{uuid.uuid4().hex[:8]}"


def high_risk() -> list[Json]:
    """DM, onset at 53, anti-TIF1-gamma positive: high risk, not preliminary."""
    p = f.patient(_pid("high"), gender="female", birth_date="1970-06-15")
    return [p, f.iim_condition(p), f.antibody(p, "tif1g", "positive")]


def moderate_preliminary() -> list[Json]:
    """DM, onset at 30, no antibody results: moderate risk, preliminary."""
    p = f.patient(_pid("moderate"), birth_date="1994-01-01")
    return [p, f.iim_condition(p)]


def standard_risk() -> list[Json]:
    """Polymyositis, onset at 30, every antibody negative: standard risk."""
    p = f.patient(_pid("standard"), birth_date="1994-01-01")
    return [
        p,
        f.iim_condition(p, code="31384009"),
        *(f.antibody(p, name, "negative") for name in f.ANTIBODY_LOINC),
    ]


def juvenile() -> list[Json]:
    p = f.patient(_pid("juvenile"), birth_date="2014-01-01")
    return [p, f.iim_condition(p, code="1212005")]


def no_iim() -> list[Json]:
    p = f.patient(_pid("none"), birth_date="1980-01-01")
    return [p, f.condition(p, f.concept(f.SCT, "38341003", "Hypertension"))]


def searchset(resources: Iterable[Json], *, next_url: str | None = None) -> Json:
    entries = [{"resource": r, "search": {"mode": "match"}} for r in resources]
    bundle: Json = {"resourceType": "Bundle", "type": "searchset", "total": len(entries)}
    if entries:
        bundle["entry"] = entries
    if next_url:
        bundle["link"] = [{"relation": "next", "url": next_url}]
    return bundle


def full_prefetch(
    templates: Sequence[PrefetchTemplate],
    resources: Sequence[Json],
    *,
    plans: Sequence[Json] = (),
) -> dict[str, Any]:
    """Every template satisfied, as an EHR would: resources by type, plans for existingPlans."""
    patient = next(r for r in resources if r["resourceType"] == "Patient")
    out: dict[str, Any] = {}
    seen: set[str] = set()
    for t in templates:
        if t.use == "patient":
            out[t.key] = patient
        elif t.use == "existing-plans":
            out[t.key] = searchset(plans)
        else:
            kind = t.resource_type
            matching = [r for r in resources if r["resourceType"] == kind]
            out[t.key] = searchset([] if kind in seen else matching)
            seen.add(kind)
    return out


def hook_request(
    patient_id: str,
    prefetch: dict[str, Any] | None,
    *,
    fhir_server: str | None = None,
    token: str | None = None,
    hook_instance: str | None = None,
) -> Json:
    """A patient-view request shaped like the CDS Hooks sandbox's."""
    body: Json = {
        "hook": "patient-view",
        "hookInstance": hook_instance or str(uuid.uuid4()),
        "context": {"userId": "Practitioner/cds-test-user", "patientId": patient_id},
    }
    if fhir_server:
        body["fhirServer"] = fhir_server
    if token:
        body["fhirAuthorization"] = {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "user/Patient.read user/Observation.read user/Condition.read",
            "subject": "fhir-dm-cds",
        }
    if prefetch is not None:
        body["prefetch"] = prefetch
    return body


def accepted(card: Json, at: str) -> Json:
    """Feedback that accepts the card's first suggestion, as the sandbox sends on each click."""
    return {
        "feedback": [
            {
                "card": card["uuid"],
                "outcome": "accepted",
                "acceptedSuggestions": [{"id": card["suggestions"][0]["uuid"]}],
                "outcomeTimestamp": at,
            }
        ]
    }


def suggested_plan(card: Json) -> Json:
    """The CarePlan the card's first suggestion would create."""
    return next(
        a["resource"]
        for a in card["suggestions"][0]["actions"]
        if a["resource"]["resourceType"] == "CarePlan"
    )
