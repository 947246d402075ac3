"""The result transaction Bundle: every entry conditional, so it can be re-posted as it is."""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from fhir_dm.core.build.common import Json


def conditional_create(full_url: str, resource: Json) -> Json:
    """POST with ifNoneExist on the resource's first (business) identifier."""
    ident = resource["identifier"][0]
    return {
        "fullUrl": full_url,
        "resource": resource,
        "request": {
            "method": "POST",
            "url": resource["resourceType"],
            "ifNoneExist": f"identifier={ident['system']}|{ident['value']}",
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
