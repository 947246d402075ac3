"""fhir-dm's FHIR R4 Subscriptions: one rest-hook per resource type the rules read, kept in step.

Each Subscription calls `{endpoint base}/notifications/{key}` (key: the resource type in lower
case) with the changed resource as payload and a secret header of its own, derived from the
one configured `jobs.notification_secret` (HMAC-SHA256 of the key), so a leaked header
opens one channel only and rotating the master secret rotates them all. Criteria are by type:
the rules also read results by their text and by unrecognised antibody names (see
`fhir_dm.core.inputs.Relevance`), so narrowing by code would miss changes they read; a
notification that changes nothing costs one re-assessment whose write is "unchanged".

fhir-dm's own writes are notified too (its ServiceRequests are of a watched type): the endpoint
drops a notified resource that `is_own_write` recognises, so a write-back does not start a
second, "unchanged" run. That is done on receipt rather than in the criteria, so it works
whatever search modifiers a server's subscription matcher supports.

`ensure_subscriptions` is idempotent: a Subscription is found by its endpoint (the `url` search
parameter), created when missing, updated when it differs, and extra copies are deleted, all in
one transaction. `inactive_subscriptions` then reads them back until the server has activated
them (a bounded wait): a server with Subscriptions disabled leaves them `requested`.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fhir_dm.fhir.client import FhirClient
from fhir_dm.writeback.writer import PATIENT_SEARCHES

SECRET_HEADER = "X-Fhir-Dm-Notification-Secret"  # noqa: S105 - a header name
NOTIFICATION_PATH = "/notifications"
PAYLOAD = "application/fhir+json"
# What a patient's assessment reads is what a change must be notified for.
WATCHED_TYPES: tuple[str, ...] = tuple(PATIENT_SEARCHES)
ACTIVE_STATUSES = frozenset({"requested", "active"})
SOFTWARE = "fhir-dm"  # how fhir-dm's Provenance agents name it: "fhir-dm <version> (...)"
# Identifier systems of the resources fhir-dm generates, under the rule set's canonical base.
OWN_IDENTIFIER_SYSTEMS = ("/sid/plan-item", "/sid/plan-series")
ACTIVATION_WAIT_SECONDS = 30.0  # HAPI: about 1-3 s, once 17 s under heavy load
REASON = "fhir-dm: re-assess the patient's cancer-screening plan when its record changes"
_SECRET_NAMESPACE = b"fhir-dm subscription secret\x00"

Json = dict[str, Any]


def subscription_key(resource_type: str) -> str:
    """The endpoint key of a watched resource type (`Condition` -> `condition`)."""
    return resource_type.lower()


KEY_TYPES: Mapping[str, str] = {subscription_key(t): t for t in WATCHED_TYPES}


def subscription_secret(master: str, key: str) -> str:
    """The header value of one subscription: HMAC-SHA256(master secret, key), hex."""
    mac = hmac.new(master.encode("utf-8"), _SECRET_NAMESPACE + key.encode("utf-8"), "sha256")
    return mac.hexdigest()


def secret_matches(master: str, key: str, given: str | None) -> bool:
    """Whether a notification's header is the key's secret, compared in constant time."""
    expected = subscription_secret(master, key).encode("ascii")
    offered = (given or "").encode("utf-8", "replace")
    # Hash both first, so the comparison's time does not depend on the offered length either.
    return hmac.compare_digest(hashlib.sha256(expected).digest(), hashlib.sha256(offered).digest())


def endpoint_for(endpoint_base: str, key: str) -> str:
    """Where the FHIR server delivers the notifications of `key`."""
    return f"{endpoint_base.rstrip('/')}{NOTIFICATION_PATH}/{key}"


def desired_subscription(resource_type: str, endpoint_base: str, master: str) -> Json:
    """The Subscription fhir-dm wants for one watched resource type."""
    key = subscription_key(resource_type)
    return {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": REASON,
        "criteria": f"{resource_type}?",
        "channel": {
            "type": "rest-hook",
            "endpoint": endpoint_for(endpoint_base, key),
            "payload": PAYLOAD,
            "header": [f"{SECRET_HEADER}: {subscription_secret(master, key)}"],
        },
    }


@dataclass(slots=True)
class EnsureReport:
    """What `ensure_subscriptions` did, per resource type (never the secrets)."""

    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    deleted: int = 0

    def all(self) -> list[str]:
        """Every resource type the report covers."""
        return [*self.created, *self.updated, *self.unchanged]

    def summary(self) -> str:
        return (
            f"subscriptions: {len(self.created)} created, {len(self.updated)} updated,"
            f" {len(self.unchanged)} unchanged, {self.deleted} duplicate(s) deleted"
        )


def _same(existing: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    channel = existing.get("channel") or {}
    want = wanted["channel"]
    return (
        existing.get("status") in ACTIVE_STATUSES
        and existing.get("criteria") == wanted["criteria"]
        and channel.get("type") == want["type"]
        and channel.get("endpoint") == want["endpoint"]
        and channel.get("payload") == want["payload"]
        and list(channel.get("header") or []) == want["header"]
    )


def ensure_subscriptions(
    client: FhirClient,
    endpoint_base: str,
    master: str,
    *,
    types: Sequence[str] = WATCHED_TYPES,
) -> EnsureReport:
    """Make the FHIR server hold exactly one up-to-date Subscription per watched type."""
    report = EnsureReport()
    entries: list[Json] = []
    for resource_type in types:
        wanted = desired_subscription(resource_type, endpoint_base, master)
        endpoint = wanted["channel"]["endpoint"]
        found = [
            s
            for s in client.search("Subscription", {"url": endpoint})
            if (s.get("channel") or {}).get("endpoint") == endpoint and s.get("id")
        ]
        found.sort(key=lambda s: (not _same(s, wanted), str(s["id"])))
        keep, extra = (found[0], found[1:]) if found else (None, [])
        if keep is None:
            entries.append(
                {
                    "resource": wanted,
                    "request": {"method": "POST", "url": "Subscription"},
                }
            )
            report.created.append(resource_type)
        elif _same(keep, wanted):
            report.unchanged.append(resource_type)
        else:
            entries.append(
                {
                    "resource": {**wanted, "id": keep["id"]},
                    "request": {"method": "PUT", "url": f"Subscription/{keep['id']}"},
                }
            )
            report.updated.append(resource_type)
        for duplicate in extra:
            entries.append(
                {"request": {"method": "DELETE", "url": f"Subscription/{duplicate['id']}"}}
            )
            report.deleted += 1
    if entries:
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
        client.transaction(bundle, idempotent=not report.created)
    return report


def is_own_write(resource: Mapping[str, Any], canonical_base: str) -> bool:
    """Whether fhir-dm generated `resource`: it carries one of fhir-dm's identifier systems
    (its CarePlans, ServiceRequests, RiskAssessments), or it is a Provenance whose agent is
    fhir-dm. The rules never read these as input (our own requests are not evidence of a
    test done), so a change to them changes no assessment.
    """
    base = canonical_base.rstrip("/")
    systems = {base + suffix for suffix in OWN_IDENTIFIER_SYSTEMS}
    identifiers = resource.get("identifier")
    if isinstance(identifiers, Mapping):  # a single identifier (e.g. some R4 types)
        identifiers = [identifiers]
    if isinstance(identifiers, list) and any(
        isinstance(i, Mapping) and i.get("system") in systems for i in identifiers
    ):
        return True
    if resource.get("resourceType") != "Provenance":
        return False
    agents = resource.get("agent")
    return isinstance(agents, list) and any(
        isinstance(a, Mapping)
        and str((a.get("who") or {}).get("display", "")).startswith(SOFTWARE + " ")
        for a in agents
    )


@dataclass(frozen=True, slots=True)
class Inactive:
    """A Subscription of fhir-dm the server has not activated: its type, status and error."""

    resource_type: str
    status: str
    error: str | None = None

    def describe(self) -> str:
        detail = f"status {self.status}"
        return (
            f"{self.resource_type} ({detail}: {self.error})"
            if self.error
            else (f"{self.resource_type} ({detail})")
        )


def subscription_states(
    client: FhirClient, endpoint_base: str, types: Sequence[str] = WATCHED_TYPES
) -> list[Inactive]:
    """fhir-dm's Subscriptions that are not active now (a missing one: status `missing`)."""
    inactive: list[Inactive] = []
    for resource_type in types:
        endpoint = endpoint_for(endpoint_base, subscription_key(resource_type))
        found = [
            s
            for s in client.search("Subscription", {"url": endpoint})
            if (s.get("channel") or {}).get("endpoint") == endpoint
        ]
        if not found:
            inactive.append(Inactive(resource_type, "missing"))
            continue
        if any(s.get("status") == "active" for s in found):
            continue
        error = next((str(s["error"]) for s in found if s.get("error")), None)
        inactive.append(Inactive(resource_type, str(found[0].get("status") or "none"), error))
    return inactive


def inactive_subscriptions(
    client: FhirClient,
    endpoint_base: str,
    *,
    types: Sequence[str] = WATCHED_TYPES,
    wait_seconds: float = ACTIVATION_WAIT_SECONDS,
    poll_seconds: float = 0.5,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[Inactive]:
    """Read fhir-dm's Subscriptions back until the server has activated all (or the wait ends).

    A server activates a `requested` Subscription asynchronously (HAPI within a second or so);
    one with Subscriptions disabled never does, and nothing would ever be notified. Returns
    those still not active (empty: all active). A Subscription in `error` is not waited for.
    """
    deadline = clock() + wait_seconds
    while True:
        inactive = subscription_states(client, endpoint_base, types)
        waiting = [i for i in inactive if i.status == "requested"]
        if not waiting or clock() >= deadline:
            return inactive
        sleep(min(poll_seconds, max(0.0, deadline - clock())))
