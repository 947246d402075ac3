"""The core's transaction Bundle on a real HAPI FHIR server: idempotent, revisable, never lossy."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import date
from typing import Any

import pytest

from fhir_dm.core.assess import Engine, PatientResult
from fhir_dm.core.revision import plan_revision, write_back_bundle
from fhir_dm.fhir.client import FhirClient
from tests import factories as f

pytestmark = pytest.mark.integration

NOW = date(2024, 4, 15)


@pytest.fixture
def client(fhir_base_url: str) -> Iterator[FhirClient]:
    with FhirClient(fhir_base_url) as c:
        yield c


def _store(client: FhirClient, resources: list[dict[str, Any]]) -> None:
    """Put the input on the server with its ids, as an EHR would hold it."""
    entries = [
        {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
        for r in resources
    ]
    client.transaction(
        {"resourceType": "Bundle", "type": "transaction", "entry": entries}, idempotent=True
    )


def _patient(tag: str, *, tif1g: bool = False) -> list[dict[str, Any]]:
    suffix = uuid.uuid4().hex[:10]
    p = f.patient(f"wb-{tag}-{suffix}", birth_date="1994-01-01")
    resources = [p, f.iim_condition(p, id=f"wb-c-{suffix}")]
    if tif1g:
        resources.append(f.antibody(p, "tif1g", id=f"wb-ab-{suffix}"))
    return resources


def _count(client: FhirClient, resource_type: str, system: str, value: str) -> int:
    return len(client.search(resource_type, {"identifier": f"{system}|{value}"}))


def _series_state(
    client: FhirClient, result: PatientResult
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    ident = result.identity
    plans = client.search("CarePlan", {"identifier": f"{ident.series_system}|{ident.series}"})
    requests: list[dict[str, Any]] = []
    for plan in plans:
        requests += client.search("ServiceRequest", {"based-on": f"CarePlan/{plan['id']}"})
    return plans, requests


def test_transaction_bundle_is_idempotent_for_several_patients(
    engine: Engine, client: FhirClient
) -> None:
    patients = [_patient("a", tif1g=True), _patient("b"), _patient("c", tif1g=True)]
    for resources in patients:
        _store(client, resources)
    run = engine.assess(f.bundle(*[r for p in patients for r in p]), now=NOW)
    bundle = run.bundle()

    first = client.transaction(bundle, idempotent=True)
    assert [e["response"]["status"][:3] for e in first["entry"]].count("201") == len(
        bundle["entry"]
    )
    second = client.transaction(bundle, idempotent=True)
    assert all(e["response"]["status"][:3] in ("200", "304") for e in second["entry"])

    for result in run.results:
        item_system = result.identity.item_system
        assert _count(client, "CarePlan", item_system, result.identity.value("plan")) == 1
        assert _count(client, "RiskAssessment", item_system, result.identity.value("risk")) == 1
        for request in result.service_requests:
            assert (
                _count(client, "ServiceRequest", item_system, request["identifier"][0]["value"])
                == 1
            )
    stored_plan = client.read("CarePlan", first["entry"][1]["response"]["location"].split("/")[1])
    assert stored_plan is not None and stored_plan["text"]["div"].startswith("<div")


def test_changed_input_revokes_old_plan_and_open_requests_but_not_completed(
    engine: Engine, client: FhirClient
) -> None:
    resources = _patient("rev")
    _store(client, resources)
    old = engine.assess(f.bundle(*resources), now=NOW).results[0]
    client.transaction(write_back_bundle(old, plan_revision(old, [], [])), idempotent=True)
    plans, requests = _series_state(client, old)
    assert len(plans) == 1 and plans[0]["status"] == "active"

    done = dict(requests[0], status="completed")
    client.transaction(
        {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {
                    "resource": done,
                    "request": {"method": "PUT", "url": f"ServiceRequest/{done['id']}"},
                }
            ],
        },
        idempotent=True,
    )

    # Same input again: nothing to revoke, the same plan is already there.
    plans, requests = _series_state(client, old)
    assert plan_revision(old, plans, requests).unchanged

    # A new positive anti-TIF1-gamma result changes the tier and so the plan.
    p = resources[0]
    positive = f.antibody(p, "tif1g", id=f"wb-new-{uuid.uuid4().hex[:8]}")
    _store(client, [positive])
    new = engine.assess(f.bundle(*resources, positive), now=NOW).results[0]
    assert (old.tier, new.tier) == ("moderate", "high")
    revision = plan_revision(new, plans, requests)
    client.transaction(write_back_bundle(new, revision), idempotent=False)

    plans, requests = _series_state(client, new)
    by_id = {pl["id"]: pl for pl in plans}
    old_plan = next(
        pl
        for pl in plans
        if any(i["value"] == old.identity.value("plan") for i in pl["identifier"])
    )
    new_plan = next(
        pl
        for pl in plans
        if any(i["value"] == new.identity.value("plan") for i in pl["identifier"])
    )
    assert (old_plan["status"], new_plan["status"]) == ("revoked", "active")
    assert len(by_id) == 2
    old_requests = [
        r for r in requests if r["basedOn"][0]["reference"] == f"CarePlan/{old_plan['id']}"
    ]
    assert {r["id"]: r["status"] for r in old_requests if r["id"] == done["id"]} == {
        done["id"]: "completed"
    }
    assert {r["status"] for r in old_requests if r["id"] != done["id"]} == {"revoked"}
    assert {
        r["status"]
        for r in requests
        if r["basedOn"][0]["reference"] == f"CarePlan/{new_plan['id']}"
    } == {"active"}
