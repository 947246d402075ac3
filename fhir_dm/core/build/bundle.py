"""The result transaction Bundle: every entry conditional, so it can be re-posted as it is."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable

from fhir_dm.core.build.common import Json
from fhir_dm.core.ids import FHIR_ID_PATTERN

# Resources that a revision revokes: a conditional create matches only an open one, so a plan
# that comes back after being revoked is created again instead of matching the revoked copy.
OPEN_STATUSES = ("draft", "active", "on-hold")
REVOCABLE_TYPES = frozenset({"CarePlan", "ServiceRequest"})
_LOCAL_REFERENCE = re.compile(r"[A-Z][A-Za-z]+/" + FHIR_ID_PATTERN)


def if_none_exist(resource: Json) -> str:
    """The match of a conditional create: business identifier, scoped to the subject.

    Scoping by subject means another patient's resource can never satisfy the condition (two
    patients may share an identifier in a messy EHR); revocable types only match open ones.
    """
    ident = resource["identifier"][0]
    criteria = [f"identifier={ident['system']}|{ident['value']}"]
    subject = (resource.get("subject") or {}).get("reference")
    if isinstance(subject, str) and _LOCAL_REFERENCE.fullmatch(subject):
        criteria.append(f"subject={subject}")
    if resource["resourceType"] in REVOCABLE_TYPES:
        # Only an open one matches; a resource created closed (a plan whose window has already
        # closed) must satisfy its own condition, so it is matched by its own status.
        status = resource.get("status")
        if isinstance(status, str) and status not in OPEN_STATUSES:
            criteria.append(f"status={status}")
        else:
            criteria.append("status=" + ",".join(OPEN_STATUSES))
    return "&".join(criteria)


def conditional_create(full_url: str, resource: Json) -> Json:
    """POST with ifNoneExist on the resource's first (business) identifier and its subject."""
    return {
        "fullUrl": full_url,
        "resource": resource,
        "request": {
            "method": "POST",
            "url": resource["resourceType"],
            "ifNoneExist": if_none_exist(resource),
        },
    }


def full_url_for(url: str) -> str:
    """A Bundle fullUrl must be absolute: a stable urn:uuid stands for `Type/id`."""
    return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, url)}"


def put_by_id(resource: Json) -> Json:
    """PUT to a client-assigned id (idempotent by construction)."""
    url = f"{resource['resourceType']}/{resource['id']}"
    return {
        "fullUrl": full_url_for(url),
        "resource": resource,
        "request": {"method": "PUT", "url": url},
    }


def transaction(entries: Iterable[Json]) -> Json:
    """A transaction Bundle of the given entries (validated as a whole by the caller's tests)."""
    return {"resourceType": "Bundle", "type": "transaction", "entry": list(entries)}
