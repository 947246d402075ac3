"""Revise what a server already holds: end superseded plans and their open requests (pure).

The write-back edge reads every open plan of the patient (the server Patient the plan is
written for) that belongs to this rule-set family, and the requests based on them; this module
decides, without I/O, which of them the new assessment supersedes. There is at most one open
plan per patient and family afterwards:

- a new plan: every other open plan of the family is revoked (also plans of an earlier series
  format, e.g. keyed by an old identifier or window start), and so are their open requests;
- no plan any more (deceased, out of scope): every open plan is revoked, or completed when the
  guideline window has closed, and its open requests are revoked;
- the same plan: nothing to do, unless what has been done changed (clinical-logic §10). What
  has been done is not part of the plan's digest, so a test getting done keeps the plan: it is
  updated in place (its activities and narrative, versioned) and our open requests for tests now
  done are completed, pointing at the record that shows them done;
- an open request of ours for a test the new plan shows done is completed (with the evidence),
  never revoked or left open, also when its plan is superseded.

Nothing is deleted; completed requests are left alone; each ended resource gets a note saying
why. Every update is guarded by the version read (`ifMatch`), so a concurrent writer that
changed a plan in between makes the whole transaction fail instead of being overwritten.
"""

from __future__ import annotations

import copy
import html
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fhir_dm.core.assess import PatientResult
from fhir_dm.core.build.bundle import OPEN_STATUSES, full_url_for
from fhir_dm.core.build.common import Json, reference
from fhir_dm.core.facts import Evidence
from fhir_dm.core.identifiers import Identity

OPEN_PLAN_STATUSES = frozenset(OPEN_STATUSES)
OPEN_REQUEST_STATUSES = frozenset(OPEN_STATUSES)
REVOKED = "revoked"
COMPLETED = "completed"
# A plan that ends because its guideline window closed has run its course; anything else that
# ends a plan (a newer plan, death, leaving the guideline) terminates it early.
COMPLETING_SCOPES = frozenset({"window-closed"})


@dataclass(frozen=True, slots=True)
class Revision:
    """What write-back must do for one patient, given what the server holds."""

    unchanged: bool
    revoke_entries: tuple[Json, ...]
    revoked_plans: tuple[str, ...]
    revoked_requests: tuple[str, ...]
    completed_plans: tuple[str, ...] = ()
    # The new plan is already open on the server (only duplicates of it are to be revoked).
    plan_on_server: bool = False
    # Requests of ours completed because their test was done, and plans updated in place.
    completed_requests: tuple[str, ...] = ()
    updated_plans: tuple[str, ...] = ()


def _has_identifier(resource: Mapping[str, Any], system: str, value: str) -> bool:
    return any(
        i.get("system") == system and i.get("value") == value
        for i in resource.get("identifier") or []
    )


def is_family_plan(plan: Mapping[str, Any], identity: Identity) -> bool:
    """Whether a CarePlan is one of ours for this rule-set family (any series format)."""
    for ident in plan.get("identifier") or []:
        if ident.get("system") != identity.series_system:
            continue
        value = ident.get("value")
        if value == identity.series:
            return True
        if identity.family and isinstance(value, str) and value.startswith(identity.family_prefix):
            return True
    return False


def _subject(resource: Mapping[str, Any]) -> str:
    reference = (resource.get("subject") or {}).get("reference")
    return reference if isinstance(reference, str) else ""


def _end(resource: Mapping[str, Any], status: str, reason: str) -> Json:
    """A PUT entry ending a resource, guarded by the version read (optimistic locking)."""
    updated = copy.deepcopy(dict(resource))
    updated["status"] = status
    # R4 CarePlan and ServiceRequest have no statusReason: the reason goes into a note.
    updated["note"] = [*(updated.get("note") or []), {"text": reason}]
    url = f"{resource['resourceType']}/{resource['id']}"
    request: Json = {"method": "PUT", "url": url}
    version = (resource.get("meta") or {}).get("versionId")
    if version:
        request["ifMatch"] = f'W/"{version}"'
    return {"fullUrl": full_url_for(url), "resource": updated, "request": request}


def _item_key(request: Mapping[str, Any], identity: Identity) -> tuple[str, str] | None:
    """(round, test) of one of our requests, from its item identifier `series.digest.round.test`."""
    for ident in request.get("identifier") or []:
        value = ident.get("value")
        if ident.get("system") == identity.item_system and isinstance(value, str):
            parts = value.rsplit(".", 2)
            if len(parts) == 3:
                return parts[1], parts[2]
    return None


def _complete(request: Mapping[str, Any], evidence: Evidence, result: PatientResult) -> Json:
    """A PUT entry completing one of our requests whose test was done (versioned)."""
    a = result.plan.assessment
    entry = _end(
        request,
        COMPLETED,
        f"Completed by the assessment of {a.now.isoformat()} (rule set {a.ruleset}): the test"
        f" was done, see {evidence.reference} of {evidence.when.isoformat()}",
    )
    resource = entry["resource"]
    shown = [reference(evidence.reference)]
    if shown[0] not in (resource.get("supportingInfo") or []):
        resource["supportingInfo"] = [*(resource.get("supportingInfo") or []), *shown]
    return entry


def _update_plan(plan: Mapping[str, Any], new: Mapping[str, Any]) -> Json | None:
    """The server's plan with the new activities and narrative, or None if nothing changed.

    Items are the same (same digest), in the same order; an activity that still references its
    request keeps the server's reference (the server resolved it when the plan was written).
    """
    old_activities = list(plan.get("activity") or [])
    new_activities = list(new.get("activity") or [])
    if len(old_activities) != len(new_activities):
        return None
    if any(
        "reference" in fresh and "reference" not in old
        for old, fresh in zip(old_activities, new_activities, strict=True)
    ):
        # A done item is undone again (its record withdrawn): an in-place update cannot
        # re-create its request, so the plan is left as it is (docs/decisions.md).
        return None
    merged = [
        old if "reference" in fresh and "reference" in old else fresh
        for old, fresh in zip(old_activities, new_activities, strict=True)
    ]
    if merged == old_activities and _same_text(plan.get("text"), new.get("text")):
        return None
    updated = copy.deepcopy(dict(plan))
    updated["activity"] = merged
    updated["text"] = copy.deepcopy(new["text"])
    return _put(updated)


def _same_text(old: Any, new: Any) -> bool:
    """Narratives equal once entities are resolved: servers re-serialise XHTML (HAPI writes
    `&#x27;` back as `'`), which must not make every run update the plan again."""
    if not isinstance(old, Mapping) or not isinstance(new, Mapping):
        return bool(old == new)
    return old.get("status") == new.get("status") and html.unescape(
        str(old.get("div"))
    ) == html.unescape(str(new.get("div")))


def _put(resource: Json) -> Json:
    url = f"{resource['resourceType']}/{resource['id']}"
    request: Json = {"method": "PUT", "url": url}
    version = (resource.get("meta") or {}).get("versionId")
    if version:
        request["ifMatch"] = f'W/"{version}"'
    return {"fullUrl": full_url_for(url), "resource": resource, "request": request}


def _reason(result: PatientResult, status: str) -> str:
    a = result.plan.assessment
    verb = "Completed" if status == COMPLETED else "Revoked"
    if result.care_plan is not None:
        why = "superseded by a newer assessment"
    else:
        why = a.scope_reason.strip() or "the new assessment proposes no plan"
    return f"{verb} by the assessment of {a.now.isoformat()} (rule set {a.ruleset}): {why}"


def plan_revision(
    result: PatientResult,
    existing_plans: Sequence[Mapping[str, Any]],
    existing_requests: Iterable[Mapping[str, Any]],
) -> Revision:
    """Compare the new result with the patient's open plans of this family on the server."""
    identity = result.identity
    plan_value = identity.value("plan")
    subject = result.patient_reference
    open_plans = sorted(
        (
            p
            for p in existing_plans
            if p.get("status") in OPEN_PLAN_STATUSES
            and p.get("id")
            and _subject(p) == subject
            and is_family_plan(p, identity)
        ),
        key=lambda p: str(p["id"]),
    )
    current = [
        p
        for p in open_plans
        if result.care_plan is not None
        and _has_identifier(p, identity.series_system, identity.series)
        and _has_identifier(p, identity.item_system, plan_value)
    ][:1]  # duplicates of the current plan (a lost race elsewhere) are revoked too
    superseded = [p for p in open_plans if p not in current]
    plan_status = REVOKED
    if result.care_plan is None and result.plan.assessment.scope in COMPLETING_SCOPES:
        plan_status = COMPLETED
    superseded_refs = {f"CarePlan/{p['id']}" for p in superseded}
    current_refs = {f"CarePlan/{p['id']}" for p in current}
    open_requests = [
        r for r in existing_requests if r.get("status") in OPEN_REQUEST_STATUSES and r.get("id")
    ]
    done = {i.key: i.done for i in result.plan.items if i.done is not None}

    def based_on(request: Mapping[str, Any], refs: set[str]) -> bool:
        return any((b.get("reference") or "") in refs for b in request.get("basedOn") or [])

    def done_for(request: Mapping[str, Any]) -> Evidence | None:
        key = _item_key(request, identity)
        return done.get(key) if key is not None else None

    # Open requests of ours whose test the new plan shows done: completed, with the evidence.
    completing = [
        (r, e)
        for r in open_requests
        if based_on(r, superseded_refs | current_refs) and (e := done_for(r)) is not None
    ]
    completing_ids = {id(r) for r, _ in completing}
    revoking = [
        r for r in open_requests if based_on(r, superseded_refs) and id(r) not in completing_ids
    ]
    plan_reason = _reason(result, plan_status)
    request_reason = _reason(result, REVOKED)
    updates = [_complete(r, e, result) for r, e in completing]
    updated_plans: list[str] = []
    if current and result.care_plan is not None:
        plan_update = _update_plan(current[0], result.care_plan)
        if plan_update is not None:
            updates.insert(0, plan_update)
            updated_plans.append(f"CarePlan/{current[0]['id']}")
    entries = [_end(p, plan_status, plan_reason) for p in superseded] + [
        _end(r, REVOKED, request_reason) for r in revoking
    ]
    ended = tuple(sorted(superseded_refs))
    return Revision(
        unchanged=bool(current) and not superseded and not updates,
        revoke_entries=tuple(entries) + tuple(updates),
        revoked_plans=ended if plan_status == REVOKED else (),
        revoked_requests=tuple(f"ServiceRequest/{r['id']}" for r in revoking),
        completed_plans=ended if plan_status == COMPLETED else (),
        plan_on_server=bool(current),
        completed_requests=tuple(f"ServiceRequest/{r['id']}" for r, _ in completing),
        updated_plans=tuple(updated_plans),
    )


def write_back_bundle(result: PatientResult, revision: Revision) -> Json:
    """One transaction: revocations first, then the new plan (all or nothing).

    When the plan is already on the server (a race left a duplicate of it), only the duplicate
    is revoked: re-sending the conditional creates would match two plans and fail.
    """
    new = () if revision.plan_on_server else result.entries
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [*revision.revoke_entries, *new],
    }
