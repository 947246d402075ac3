"""fhir-dm's Subscriptions: created once, kept in step, never duplicated, checked active."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
import requests
import responses

from fhir_dm.events.subscriptions import (
    SECRET_HEADER,
    WATCHED_TYPES,
    Inactive,
    desired_subscription,
    ensure_subscriptions,
    inactive_subscriptions,
    is_own_write,
    secret_matches,
    subscription_secret,
)
from fhir_dm.fhir.client import FhirClient

BASE = "https://fhir.example.org/r4"
ENDPOINT = "https://dm.example.org"
MASTER = "subscription-master-secret-0123456789abcdef"
Json = dict[str, Any]
Reply = tuple[int, dict[str, str], str]


class SubscriptionServer:
    """Subscription search by `url` (the channel endpoint) and transactions of POST/PUT/DELETE."""

    def __init__(self, mock: responses.RequestsMock) -> None:
        self.store: dict[str, Json] = {}
        self.transactions: list[Json] = []
        self._ids = itertools.count(1)
        mock.add_callback(responses.GET, f"{BASE}/Subscription", callback=self._search)
        mock.add_callback(responses.POST, BASE, callback=self._transaction)

    def _search(self, request: requests.PreparedRequest) -> Reply:
        params = dict(parse_qsl(urlsplit(str(request.url)).query))
        hits = [s for s in self.store.values() if s["channel"]["endpoint"] == params.get("url")]
        bundle = {
            "resourceType": "Bundle",
            "type": "searchset",
            "entry": [{"resource": s, "search": {"mode": "match"}} for s in hits],
        }
        return 200, {"Content-Type": "application/fhir+json"}, json.dumps(bundle)

    def _transaction(self, request: requests.PreparedRequest) -> Reply:
        body = json.loads(request.body or b"{}")
        self.transactions.append(body)
        answers = []
        for entry in body["entry"]:
            method, url = entry["request"]["method"], entry["request"]["url"]
            if method == "POST":
                resource = {**entry["resource"], "id": str(next(self._ids))}
                self.store[resource["id"]] = resource
            elif method == "PUT":
                self.store[url.split("/")[1]] = entry["resource"]
            else:
                self.store.pop(url.split("/")[1], None)
            answers.append({"response": {"status": "200 OK"}})
        reply = {"resourceType": "Bundle", "type": "transaction-response", "entry": answers}
        return 200, {"Content-Type": "application/fhir+json"}, json.dumps(reply)


@pytest.fixture
def server() -> Iterator[SubscriptionServer]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield SubscriptionServer(mock)


def test_subscriptions_are_created_once(server: SubscriptionServer) -> None:
    client = FhirClient(BASE)
    first = ensure_subscriptions(client, ENDPOINT, MASTER)
    assert sorted(first.created) == sorted(WATCHED_TYPES)
    assert {"Condition", "Observation", "DiagnosticReport", "Procedure"} <= set(first.created)
    assert len(server.store) == len(WATCHED_TYPES)
    condition = next(s for s in server.store.values() if s["criteria"] == "Condition?")
    channel = condition["channel"]
    assert channel["type"] == "rest-hook" and channel["payload"] == "application/fhir+json"
    assert channel["endpoint"] == f"{ENDPOINT}/notifications/condition"
    assert channel["header"] == [f"{SECRET_HEADER}: {subscription_secret(MASTER, 'condition')}"]
    second = ensure_subscriptions(client, ENDPOINT, MASTER)
    assert sorted(second.unchanged) == sorted(WATCHED_TYPES)
    assert len(server.transactions) == 1 and len(server.store) == len(WATCHED_TYPES)


def test_a_changed_or_failed_subscription_is_updated_and_duplicates_removed(
    server: SubscriptionServer,
) -> None:
    client = FhirClient(BASE)
    ensure_subscriptions(client, ENDPOINT, MASTER)
    errored = next(s for s in server.store.values() if s["criteria"] == "Observation?")
    errored["status"] = "error"
    copy = {**desired_subscription("Condition", ENDPOINT, MASTER), "id": "dup", "status": "active"}
    server.store["dup"] = copy
    report = ensure_subscriptions(client, ENDPOINT, MASTER)
    assert report.updated == ["Observation"] and report.deleted == 1
    assert len(server.store) == len(WATCHED_TYPES)
    assert server.store[errored["id"]]["status"] == "requested"
    # A new master secret rotates every header.
    rotated = ensure_subscriptions(client, ENDPOINT, "another-master-secret-0123456789abcdef")
    assert sorted(rotated.updated) == sorted(WATCHED_TYPES)


def test_each_channel_has_its_own_secret() -> None:
    secrets = {subscription_secret(MASTER, t.lower()) for t in WATCHED_TYPES}
    assert len(secrets) == len(WATCHED_TYPES)
    good = subscription_secret(MASTER, "condition")
    assert secret_matches(MASTER, "condition", good)
    assert not secret_matches(MASTER, "observation", good)
    assert not secret_matches(MASTER, "condition", None)
    assert not secret_matches(MASTER, "condition", good[:-1])
    assert not secret_matches(MASTER, "condition", "é" + good)


# -- the server activated them? ------------------------------------------------------------


def test_activation_is_awaited_until_the_server_activates_them(server: SubscriptionServer) -> None:
    client = FhirClient(BASE)
    ensure_subscriptions(client, ENDPOINT, MASTER)
    now = [0.0]
    polls: list[float] = []

    def sleep(seconds: float) -> None:
        polls.append(seconds)
        now[0] += seconds
        if len(polls) == 2:  # the server activates them a moment later
            for s in server.store.values():
                s["status"] = "active"

    left = inactive_subscriptions(client, ENDPOINT, clock=lambda: now[0], sleep=sleep)
    assert left == [] and polls == [0.5, 0.5]


def test_subscriptions_left_requested_or_in_error_are_named(server: SubscriptionServer) -> None:
    client = FhirClient(BASE)
    ensure_subscriptions(client, ENDPOINT, MASTER)
    for s in server.store.values():
        s["status"] = "active"
    condition = next(s for s in server.store.values() if s["criteria"] == "Condition?")
    condition["status"] = "requested"  # never activated: Subscriptions disabled
    observation = next(s for s in server.store.values() if s["criteria"] == "Observation?")
    observation.update(status="error", error="endpoint refused")
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    left = inactive_subscriptions(
        client, ENDPOINT, wait_seconds=3, clock=lambda: now[0], sleep=sleep
    )
    assert left == [
        Inactive("Condition", "requested"),
        Inactive("Observation", "error", "endpoint refused"),
    ]
    assert now[0] == 3  # waited (bounded) for the requested one, not for the errored one
    assert left[1].describe() == "Observation (status error: endpoint refused)"
    server.store.pop(condition["id"])
    assert inactive_subscriptions(client, ENDPOINT, wait_seconds=0)[0] == Inactive(
        "Condition", "missing"
    )


CANONICAL = "http://fhir-dm.org/fhir"


@pytest.mark.parametrize(
    ("resource", "ours"),
    [
        (
            {
                "resourceType": "ServiceRequest",
                "identifier": [{"system": f"{CANONICAL}/sid/plan-item", "value": "a.b.ct"}],
            },
            True,
        ),
        (
            {
                "resourceType": "CarePlan",
                "identifier": [
                    {"system": "urn:other", "value": "1"},
                    {"system": f"{CANONICAL}/sid/plan-series", "value": "a"},
                ],
            },
            True,
        ),
        (
            {
                "resourceType": "Provenance",
                "agent": [{"who": {"display": "fhir-dm 1.2.0 (rule set IMACS 2023)"}}],
            },
            True,
        ),
        # A clinician's order, or one naming our system under another base: not ours.
        (
            {"resourceType": "ServiceRequest", "identifier": [{"system": "urn:x", "value": "1"}]},
            False,
        ),
        (
            {
                "resourceType": "ServiceRequest",
                "identifier": [{"system": "http://else.example/sid/plan-item", "value": "1"}],
            },
            False,
        ),
        ({"resourceType": "Provenance", "agent": [{"who": {"display": "fhir-dmx"}}]}, False),
        ({"resourceType": "Condition"}, False),
    ],
)
def test_own_writes_are_recognised(resource: Json, ours: bool) -> None:
    assert is_own_write(resource, CANONICAL) is ours
