"""The core's transaction Bundle on a real HAPI FHIR server: idempotent, revisable, never lossy."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime
from typing import Any

import pytest

from fhir_dm.core.assess import Engine, PatientResult
from fhir_dm.core.build.service_request import CONSIDER_CODE
from fhir_dm.core.revision import plan_revision, write_back_bundle
from fhir_dm.fhir.client import FhirClient
from fhir_dm.knowledge.models import Knowledge
from tests import factories as f
from tests.integration.records import store

pytestmark = pytest.mark.integration

NOW = date(2024, 4, 15)
WRITTEN = datetime(2024, 4, 15, 9, 30, tzinfo=UTC)


@pytest.fixture
def client(fhir_base_url: str) -> Iterator[FhirClient]:
    with FhirClient(fhir_base_url) as c:
        yield c


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
        store(client, *resources)
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
        risk = result.identity.digest_value("risk")
        assert _count(client, "RiskAssessment", item_system, risk) == 1
        for request in result.service_requests:
            assert (
                _count(client, "ServiceRequest", item_system, request["identifier"][0]["value"])
                == 1
            )
    stored_plan = client.read("CarePlan", first["entry"][1]["response"]["location"].split("/")[1])
    assert stored_plan is not None and stored_plan["text"]["div"].startswith("<div")


def _put_back(client: FhirClient, resource: dict[str, Any]) -> None:
    """A clinician's system updating one resource on the server."""
    url = f"{resource['resourceType']}/{resource['id']}"
    client.transaction(
        {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [{"resource": resource, "request": {"method": "PUT", "url": url}}],
        },
        idempotent=True,
    )


def _test_of(request: dict[str, Any]) -> str:
    """The test id of one of our orders (`series.round.test.YYYYMMDD`)."""
    return str(request["identifier"][0]["value"].split(".")[-2])


def test_changed_input_revises_the_one_plan_in_place_keeps_orders_and_leaves_completed(
    engine: Engine, knowledge: Knowledge, client: FhirClient
) -> None:
    """§13: a new fact revises the patient's one CarePlan in place; open orders still proposed
    are kept untouched, a dropped one is revoked with the reason, a done one completed with its
    evidence, and an order completed on the server is left alone."""
    resources = _patient("rev")
    store(client, *resources)
    old = engine.assess(f.bundle(*resources), now=NOW).results[0]
    client.transaction(write_back_bundle(old, plan_revision(old, [], []), WRITTEN), idempotent=True)
    plans, requests = _series_state(client, old)
    assert len(plans) == 1 and plans[0]["status"] == "active"
    plan_id, plan_version = plans[0]["id"], int(plans[0]["meta"]["versionId"])
    by_test = {_test_of(r): r for r in requests}
    assert len(by_test) == len(requests)  # one order per test of the open round
    assert {"cbc", "esr", "myositis-antibodies"} <= set(by_test)
    assert {r["status"] for r in requests} == {"active"}

    assert plan_revision(old, plans, requests).unchanged  # same input: nothing to write

    # The clinic completes the CBC order and files the result (the record shows it done; an
    # order of ours completed without a result is not evidence, and would be re-ordered).
    p = resources[0]
    tag = uuid.uuid4().hex[:8]
    cbc_result = dict(f.done_request(p, knowledge, "cbc", "2024-04-05"), id=f"wb-cbc-{tag}")
    store(client, cbc_result)
    _put_back(client, dict(by_test["cbc"], status="completed"))
    plans, requests = _series_state(client, old)
    before = {r["id"]: r for r in requests}

    # New facts: anti-TIF1-gamma positive, anti-NXP2 and anti-SAE1 negative (high risk, no
    # antibody still untested: the panel is no longer proposed), and an ESR done in its window.
    new_facts = [
        cbc_result,
        f.antibody(p, "tif1g", id=f"wb-t-{tag}"),
        f.antibody(p, "nxp2", "negative", id=f"wb-n-{tag}"),
        f.antibody(p, "sae1", "negative", id=f"wb-s-{tag}"),
        dict(f.done_request(p, knowledge, "esr", "2024-04-10"), id=f"wb-esr-{tag}"),
    ]
    store(client, *new_facts)
    new = engine.assess(f.bundle(*resources, *new_facts), now=NOW).results[0]
    assert (old.tier, new.tier) == ("moderate", "high")
    assert new.identity.series == old.identity.series  # the same plan, another content
    revision = plan_revision(new, plans, requests)
    assert revision.updated_plans == (f"CarePlan/{plan_id}",)
    client.transaction(write_back_bundle(new, revision, WRITTEN), idempotent=False)

    plans, requests = _series_state(client, new)
    assert [pl["id"] for pl in plans] == [plan_id]  # revised in place, never a second plan
    plan = plans[0]
    assert plan["status"] == "active" and int(plan["meta"]["versionId"]) > plan_version
    assert {
        "system": new.identity.digest_system,
        "value": new.identity.digest_value(),
    } in plan["identifier"]
    after = {r["id"]: r for r in requests}
    assert set(after) == set(before)  # no order created: the new rounds are not open yet
    cbc, esr, panel = (by_test[t]["id"] for t in ("cbc", "esr", "myositis-antibodies"))
    # Completed on the server (its result in the record): left alone, never revoked.
    assert after[cbc]["status"] == "completed"
    assert after[cbc]["meta"]["versionId"] == before[cbc]["meta"]["versionId"]
    # Done: completed with the evidence, never revoked.
    assert after[esr]["status"] == "completed"
    assert {"reference": f"ServiceRequest/wb-esr-{tag}"} in after[esr]["supportingInfo"]
    assert "the test was done" in after[esr]["note"][-1]["text"]
    # No longer proposed: revoked with the reason.
    assert after[panel]["status"] == "revoked"
    assert "no longer proposed" in after[panel]["note"][-1]["text"]
    # Every other open order is still proposed: kept untouched (same version), on the plan.
    kept = set(before) - {cbc, esr, panel}
    assert kept and {after[r]["status"] for r in kept} == {"active"}
    assert all(after[r]["meta"]["versionId"] == before[r]["meta"]["versionId"] for r in kept)
    assert all(after[r]["basedOn"] == [{"reference": f"CarePlan/{plan_id}"}] for r in kept)
    # The high-risk "consider" items (PET-CT, GI endoscopy) are plan activities marked
    # "consider", never orders.
    consider = [
        a["detail"]
        for a in plan["activity"]
        if any(
            c.get("code") == CONSIDER_CODE
            for c in (a.get("detail", {}).get("statusReason") or {}).get("coding", [])
        )
    ]
    assert len(consider) >= 3 and {d["status"] for d in consider} == {"not-started"}
