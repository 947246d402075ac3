"""Revise what a server already holds: one plan per patient, revised in place (pure).

The write-back edge reads every open plan of the patient (the server Patient the plan is
written for) that belongs to this rule-set family, and the requests based on them; this module
decides, without I/O, what one transaction must change so that the server holds the new
assessment (clinical-logic §13):

- **one CarePlan per patient**, revised in place: its activities, narrative, status and version
  marker are updated (a PUT guarded by the version read); any other open plan of the family
  (a duplicate from a race, a plan of an earlier identifier format) is revoked;
- an open order still proposed is **kept untouched** (the same resource; only re-pointed at the
  plan when it was based on another one); only orders not on the server are created;
- an open order for a test the record shows done is **completed**, pointing at the evidence —
  a done order is never revoked;
- an open order no longer proposed is **revoked with the reason**: missed (superseded by the
  next round, or the window closed) — the only revocation when nothing changed clinically —,
  now a "consider" item, or dropped from the plan;
- no plan any more (deceased, out of scope, no IIM): every open plan is revoked and so are its
  open orders (done ones completed).

Nothing is deleted. Every update is guarded by the version read (`ifMatch`), so a concurrent
writer that changed a plan in between makes the whole transaction fail instead of being
overwritten. Each write carries one Provenance naming what it wrote, recorded when it is
written (`write_back_bundle`).
"""

from __future__ import annotations

import copy
import hashlib
import html
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fhir_dm.core.assess import PatientResult
from fhir_dm.core.build.bundle import OPEN_STATUSES, full_url_for
from fhir_dm.core.build.common import Json, instant, reference
from fhir_dm.core.facts import Evidence
from fhir_dm.core.identifiers import Identity, parse_item_value
from fhir_dm.core.plan import PlanItem

OPEN_PLAN_STATUSES = frozenset(OPEN_STATUSES)
OPEN_REQUEST_STATUSES = frozenset(OPEN_STATUSES)
# What write-back reads of our requests: open ones to revise, completed ones not to re-order.
READ_REQUEST_STATUSES = OPEN_REQUEST_STATUSES | {"completed"}
REVOKED = "revoked"
COMPLETED = "completed"
# How our completion of an order begins its note (a clinician's completion has no such note).
COMPLETED_BY_US = "Completed by the assessment of "
# The patient's plan is revised whether open or completed (its window closed): one CarePlan for
# the whole window, never a second one for a re-assessment after it closed (§13).
REVISABLE_PLAN_STATUSES = OPEN_PLAN_STATUSES | {COMPLETED}
# The parts of our CarePlan that a revision rewrites; anything else a server or a clinician
# added (extensions, notes, meta) is kept.
REVISED_PLAN_FIELDS = (
    "identifier",
    "instantiatesCanonical",
    "status",
    "intent",
    "category",
    "title",
    "description",
    "subject",
    "period",
    "addresses",
    "activity",
)
ItemKey = tuple[str, str, str]  # (round, test, due start YYYYMMDD)


@dataclass(frozen=True, slots=True)
class Revision:
    """What write-back must do for one patient, given what the server holds."""

    unchanged: bool
    # The transaction entries in order (PUTs of existing resources, then creates); no Provenance.
    entries: tuple[Json, ...]
    revoked_plans: tuple[str, ...] = ()
    revoked_requests: tuple[str, ...] = ()
    completed_plans: tuple[str, ...] = ()
    # The patient's plan is on the server and is revised in place (or left as it is).
    plan_on_server: bool = False
    completed_requests: tuple[str, ...] = ()
    updated_plans: tuple[str, ...] = ()
    kept_requests: tuple[str, ...] = ()
    created_requests: int = 0


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


def _put(resource: Json) -> Json:
    """A PUT entry, guarded by the version read (optimistic locking)."""
    url = f"{resource['resourceType']}/{resource['id']}"
    request: Json = {"method": "PUT", "url": url}
    version = (resource.get("meta") or {}).get("versionId")
    if version:
        request["ifMatch"] = f'W/"{version}"'
    return {"fullUrl": full_url_for(url), "resource": resource, "request": request}


def _end(resource: Mapping[str, Any], status: str, reason: str) -> Json:
    """A PUT entry ending a resource, with the reason as a note (R4 has no statusReason)."""
    updated = copy.deepcopy(dict(resource))
    updated["status"] = status
    updated["note"] = [*(updated.get("note") or []), {"text": reason}]
    return _put(updated)


def _item_values(request: Mapping[str, Any], identity: Identity) -> list[str]:
    return [
        value
        for ident in request.get("identifier") or []
        if ident.get("system") == identity.item_system
        and isinstance(value := ident.get("value"), str)
    ]


def _item_key(request: Mapping[str, Any], identity: Identity) -> ItemKey | None:
    """(round, test, due start) of one of our orders, from `series.round.test.YYYYMMDD`."""
    for value in _item_values(request, identity):
        if value.startswith(identity.series + "."):
            parsed = parse_item_value(value)
            if parsed is not None:
                return parsed
    return None


def _legacy_key(request: Mapping[str, Any], identity: Identity) -> tuple[str, str] | None:
    """(round, test) of an order written under the earlier `series.digest.round.test` format."""
    for value in _item_values(request, identity):
        parts = value.rsplit(".", 2)
        if len(parts) == 3 and parse_item_value(value) is None:
            return parts[1], parts[2]
    return None


def key_of(item: PlanItem) -> ItemKey:
    return (item.round_id, item.test_id, item.due_start.strftime("%Y%m%d"))


def _complete(request: Mapping[str, Any], evidence: Evidence, result: PatientResult) -> Json:
    """A PUT entry completing one of our requests whose test was done (versioned)."""
    a = result.plan.assessment
    note = f" ({evidence.note})" if evidence.note else ""  # what a partial match covered
    entry = _end(
        request,
        COMPLETED,
        f"{COMPLETED_BY_US}{a.now.isoformat()} (rule set {a.ruleset}): the test"
        f" was done, see {evidence.reference} of {evidence.when.isoformat()}{note}",
    )
    resource = entry["resource"]
    shown = [reference(evidence.reference)]
    if shown[0] not in (resource.get("supportingInfo") or []):
        resource["supportingInfo"] = [*(resource.get("supportingInfo") or []), *shown]
    return entry


def _completion_withdrawn(request: Mapping[str, Any], result: PatientResult) -> bool:
    """Completed by an earlier revision on a record the patient's data no longer shows done
    (entered in error, deleted): that completion no longer stands and the test is owed again.
    A completion by a clinician (no note of ours) always stands."""
    notes = [str(n.get("text") or "") for n in request.get("note") or []]
    if not any(t.startswith(COMPLETED_BY_US) for t in notes):
        return False
    shown = {
        str(s.get("reference") or "")
        for s in request.get("supportingInfo") or []
        if not str(s.get("reference") or "").startswith(("RiskAssessment/", "urn:"))
    }
    current = {e.reference for e in result.plan.assessment.facts.screening_evidence}
    return bool(shown) and not shown & current


def _same_text(old: Any, new: Any) -> bool:
    """Narratives equal once entities are resolved: servers re-serialise XHTML (HAPI writes
    `&#x27;` back as `'`), which must not make every run update the plan again."""
    if not isinstance(old, Mapping) or not isinstance(new, Mapping):
        return bool(old == new)
    return old.get("status") == new.get("status") and html.unescape(
        str(old.get("div"))
    ) == html.unescape(str(new.get("div")))


def _revoke_reason(result: PatientResult, item: PlanItem | None, *, legacy: bool = False) -> str:
    a = result.plan.assessment
    plan = result.plan
    if legacy and result.care_plan is not None:
        why = "re-issued under the plan revised in place (an earlier identifier format)"
    elif item is not None and plan.status(item) == "missed":
        why = item.lapse_note
    elif item is not None and item.conditional:
        why = f'now a "consider" item ({item.condition_text}): shown in the plan, not ordered'
    elif item is not None and item.done is None:
        why = "its round is not open yet: shown in the plan until it opens"
    elif result.care_plan is None:
        why = a.scope_reason.strip() or "the new assessment proposes no plan"
    else:
        why = "no longer proposed by the plan (the facts or the tier changed)"
    return f"Revoked by the assessment of {a.now.isoformat()} (rule set {a.ruleset}): {why}"


def _plan_end_reason(result: PatientResult, status: str) -> str:
    a = result.plan.assessment
    verb = "Completed" if status == COMPLETED else "Revoked"
    if result.care_plan is not None:
        why = "another open plan of this patient is the one revised (duplicate)"
    else:
        why = a.scope_reason.strip() or "the new assessment proposes no plan"
    return f"{verb} by the assessment of {a.now.isoformat()} (rule set {a.ruleset}): {why}"


def _revised_plan(
    server: Mapping[str, Any], new: Mapping[str, Any], risk_url: str
) -> tuple[Json, bool]:
    """The server's plan with the new content, and whether anything it says changed."""
    updated = copy.deepcopy(dict(server))
    for name in REVISED_PLAN_FIELDS:
        if name in new:
            updated[name] = copy.deepcopy(new[name])
        else:
            updated.pop(name, None)
    digest_changed = updated.get("identifier") != server.get("identifier")
    # The RiskAssessment is new only when the assessment says something new (its digest).
    if digest_changed or not server.get("supportingInfo"):
        updated["supportingInfo"] = [{"reference": risk_url}]
    changed = digest_changed or any(
        updated.get(name) != server.get(name) for name in REVISED_PLAN_FIELDS
    )
    if not _same_text(server.get("text"), new.get("text")):
        updated["text"] = copy.deepcopy(new["text"])
        changed = True
    return updated, changed


def plan_revision(
    result: PatientResult,
    existing_plans: Sequence[Mapping[str, Any]],
    existing_requests: Iterable[Mapping[str, Any]],
) -> Revision:
    """Compare the new result with the patient's plans of this family on the server (the open
    ones, and the patient's own plan once completed: it is revised, never duplicated)."""
    identity = result.identity
    plan = result.plan
    subject = result.patient_reference
    family = sorted(
        (
            p
            for p in existing_plans
            if p.get("status") in REVISABLE_PLAN_STATUSES
            and p.get("id")
            and _subject(p) == subject
            and is_family_plan(p, identity)
        ),
        key=lambda p: (p.get("status") not in OPEN_PLAN_STATUSES, str(p["id"])),
    )
    open_plans = [p for p in family if p.get("status") in OPEN_PLAN_STATUSES]
    plan_value = identity.value("plan")
    current = next(
        (
            p
            for p in family
            if result.care_plan is not None
            and _has_identifier(p, identity.series_system, identity.series)
            and _has_identifier(p, identity.item_system, plan_value)
        ),
        None,
    )
    others = [p for p in open_plans if p is not current]
    plan_refs = {f"CarePlan/{p['id']}" for p in [*open_plans, *([current] if current else [])]}
    current_ref = f"CarePlan/{current['id']}" if current is not None else None
    new_plan_ref = current_ref or identity.full_url(plan_value)

    items = {key_of(i): i for i in plan.items}
    done_legacy = {(i.round_id, i.test_id): i.done for i in plan.items if i.done is not None}
    proposed = {key_of(i) for i in plan.items if plan.orders_now(i)}

    def based_on(request: Mapping[str, Any], refs: set[str]) -> bool:
        return any((b.get("reference") or "") in refs for b in request.get("basedOn") or [])

    open_requests = sorted(
        (
            r
            for r in existing_requests
            if r.get("status") in OPEN_REQUEST_STATUSES and r.get("id") and based_on(r, plan_refs)
        ),
        key=lambda r: str(r["id"]),
    )
    # Our orders a clinician (or an earlier revision) completed: the item is not ordered again,
    # and its activity points at the completed order, unless the record an earlier revision
    # completed it on has been withdrawn.
    finished: dict[ItemKey, str] = {}
    for r in existing_requests:
        key = _item_key(r, identity)
        if r.get("status") != COMPLETED or not r.get("id") or key is None:
            continue
        if not _completion_withdrawn(r, result):
            finished.setdefault(key, f"ServiceRequest/{r['id']}")
    entries: list[Json] = []
    kept: dict[ItemKey, str] = {}
    completed: list[str] = []
    revoked: list[str] = []
    for request in open_requests:
        ref = f"ServiceRequest/{request['id']}"
        key = _item_key(request, identity)
        item = items.get(key) if key is not None else None
        legacy = _legacy_key(request, identity) if key is None else None
        evidence = item.done if item is not None else done_legacy.get(legacy) if legacy else None
        if evidence is not None:
            entries.append(_complete(request, evidence, result))
            completed.append(ref)
        elif key is not None and key in proposed and key not in kept:
            kept[key] = ref
            if not based_on(request, {new_plan_ref}):
                # Kept, re-pointed at the plan that is revised (it was based on a duplicate).
                rebased = copy.deepcopy(dict(request))
                rebased["basedOn"] = [{"reference": new_plan_ref}]
                entries.append(_put(rebased))
        else:
            reason = _revoke_reason(result, item, legacy=legacy is not None)
            entries.append(_end(request, REVOKED, reason))
            revoked.append(ref)

    # A plan that ends because its window closed has run its course; anything else that ends
    # one (death, leaving the guideline, a duplicate) ends it early.
    closed = result.care_plan is None and plan.assessment.scope == "window-closed"
    plan_status = COMPLETED if closed else REVOKED
    ended = [_end(p, plan_status, _plan_end_reason(result, plan_status)) for p in others]
    creates: list[Json] = []
    updated_plans: list[str] = []
    risk_entry = next(
        (e for e in result.entries if e["resource"]["resourceType"] == "RiskAssessment"), None
    )
    if result.care_plan is not None:
        risk_url = risk_entry["fullUrl"] if risk_entry else ""
        new_plan = _with_request_refs(result.care_plan, {**finished, **kept}, result)
        if current is not None:
            revised, changed = _revised_plan(current, new_plan, risk_url)
            if changed:
                entries.insert(0, _put(revised))
                updated_plans.append(current_ref or "")
        else:
            creates.append(_entry_of(result, "CarePlan", new_plan))
        for entry in result.entries:
            resource = entry["resource"]
            if resource["resourceType"] != "ServiceRequest":
                continue
            key = _item_key(resource, identity)
            if key is None or key in kept or key in finished:
                continue
            created: Json = copy.deepcopy(dict(resource))
            created["basedOn"] = [{"reference": new_plan_ref}]
            creates.append({**entry, "resource": created})
    changed_anything = bool(entries or ended or creates)
    if changed_anything and risk_entry is not None and plan.assessment.scope != "no-iim":
        creates.insert(0, risk_entry)
    all_entries = [*ended, *entries, *creates]
    return Revision(
        unchanged=current is not None and not all_entries,
        entries=tuple(all_entries),
        revoked_plans=tuple(f"CarePlan/{p['id']}" for p in others)
        if plan_status == REVOKED
        else (),
        revoked_requests=tuple(revoked),
        completed_plans=tuple(f"CarePlan/{p['id']}" for p in others)
        if plan_status == COMPLETED
        else (),
        plan_on_server=current is not None,
        completed_requests=tuple(completed),
        updated_plans=tuple(updated_plans),
        kept_requests=tuple(kept.values()),
        created_requests=sum(
            1 for e in creates if e["resource"]["resourceType"] == "ServiceRequest"
        ),
    )


def _request_url(result: PatientResult, item: PlanItem) -> str | None:
    """The urn:uuid of the item's order in the result, if the plan orders it now."""
    if not result.plan.orders_now(item):
        return None
    identity = result.identity
    return identity.full_url(identity.item_value(item.round_id, item.test_id, item.due_start))


def _with_request_refs(
    care_plan: Mapping[str, Any], refs: Mapping[ItemKey, str], result: PatientResult
) -> Json:
    """The CarePlan with each order's activity pointing at the kept order, else the new one."""
    by_urn = {
        url: refs[key_of(item)]
        for item in result.plan.items
        if key_of(item) in refs and (url := _request_url(result, item)) is not None
    }
    updated = copy.deepcopy(dict(care_plan))
    for activity in updated.get("activity") or []:
        ref = (activity.get("reference") or {}).get("reference")
        if isinstance(ref, str) and ref in by_urn:
            activity["reference"] = {"reference": by_urn[ref]}
    return updated


def _entry_of(result: PatientResult, resource_type: str, resource: Json) -> Json:
    entry = next(e for e in result.entries if e["resource"]["resourceType"] == resource_type)
    return {**entry, "resource": resource}


def write_back_bundle(result: PatientResult, revision: Revision, recorded: datetime) -> Json:
    """One transaction (all or nothing) with one Provenance for what it writes.

    The Provenance names every resource the transaction creates, updates, completes or revokes,
    and is `recorded` at the time of writing (the edge passes it: the core has no clock); its
    id is derived from the transaction's content, so a retried transaction writes it once.
    """
    entries = list(revision.entries)
    targets = [
        e["request"]["url"] if e["request"]["method"] == "PUT" else e["fullUrl"] for e in entries
    ]
    raw = json.dumps(entries, sort_keys=True, default=str).encode()
    provenance = copy.deepcopy(result.provenance)
    provenance["id"] = "fhir-dm-" + hashlib.sha256(raw).hexdigest()[:32]
    provenance["target"] = [{"reference": t} for t in targets]
    provenance["recorded"] = instant(recorded)
    url = f"Provenance/{provenance['id']}"
    entries.append(
        {
            "fullUrl": full_url_for(url),
            "resource": provenance,
            "request": {"method": "PUT", "url": url},
        }
    )
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}
