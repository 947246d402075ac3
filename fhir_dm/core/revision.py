"""Revise what a server already holds: revoke a superseded plan and its open requests (pure).

The write-back edge reads the patient's plans of the same series (patient, rule set, window)
and the requests based on them; this module decides, without I/O, which of them the new
assessment supersedes. Nothing is deleted: superseded plans and their not-yet-done requests
become `revoked`; completed requests are left alone.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fhir_dm.core.assess import PatientResult
from fhir_dm.core.build.bundle import full_url_for
from fhir_dm.core.build.common import Json

OPEN_PLAN_STATUSES = frozenset({"draft", "active", "on-hold"})
OPEN_REQUEST_STATUSES = frozenset({"draft", "active", "on-hold"})
REVOKED = "revoked"


@dataclass(frozen=True, slots=True)
class Revision:
    """What write-back must do for one patient, given what the server holds."""

    unchanged: bool
    revoke_entries: tuple[Json, ...]
    revoked_plans: tuple[str, ...]
    revoked_requests: tuple[str, ...]


def _has_identifier(resource: Mapping[str, Any], system: str, value: str) -> bool:
    return any(
        i.get("system") == system and i.get("value") == value
        for i in resource.get("identifier") or []
    )


def _revoke(resource: Mapping[str, Any]) -> Json:
    """A PUT entry setting status revoked, guarded by the version read (optimistic locking)."""
    updated = copy.deepcopy(dict(resource))
    updated["status"] = REVOKED
    url = f"{resource['resourceType']}/{resource['id']}"
    request: Json = {"method": "PUT", "url": url}
    version = (resource.get("meta") or {}).get("versionId")
    if version:
        request["ifMatch"] = f'W/"{version}"'
    return {"fullUrl": full_url_for(url), "resource": updated, "request": request}


def plan_revision(
    result: PatientResult,
    existing_plans: Sequence[Mapping[str, Any]],
    existing_requests: Iterable[Mapping[str, Any]],
) -> Revision:
    """Compare the new result with the series' plans on the server."""
    identity = result.identity
    plan_value = identity.value("plan")
    open_plans = [
        p
        for p in existing_plans
        if p.get("status") in OPEN_PLAN_STATUSES
        and _has_identifier(p, identity.series_system, identity.series)
    ]
    current = [p for p in open_plans if _has_identifier(p, identity.item_system, plan_value)]
    superseded = [p for p in open_plans if p not in current]
    if result.care_plan is None:
        # Out of scope now (e.g. the window closed): nothing new, but old plans stay as they are;
        # a plan is only revoked by a newer plan.
        superseded = []
    superseded_refs = {f"CarePlan/{p['id']}" for p in superseded}
    requests = [
        r
        for r in existing_requests
        if r.get("status") in OPEN_REQUEST_STATUSES
        and any((b.get("reference") or "") in superseded_refs for b in r.get("basedOn") or [])
    ]
    entries = [_revoke(p) for p in superseded] + [_revoke(r) for r in requests]
    return Revision(
        unchanged=bool(current) and not superseded,
        revoke_entries=tuple(entries),
        revoked_plans=tuple(sorted(superseded_refs)),
        revoked_requests=tuple(f"ServiceRequest/{r['id']}" for r in requests),
    )


def write_back_bundle(result: PatientResult, revision: Revision) -> Json:
    """One transaction: revocations first, then the new plan (all or nothing)."""
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [*revision.revoke_entries, *result.entries],
    }
