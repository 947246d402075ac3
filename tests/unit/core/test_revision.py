"""Revision: a changed plan revokes the old plan and its open requests; done work stays."""

from __future__ import annotations

from fhir_dm.core.assess import Engine, PatientResult
from fhir_dm.core.revision import plan_revision, write_back_bundle
from tests import factories as f
from tests.unit.core.helpers import run_one


def _stored(resource: dict[str, object], id: str, version: str = "1") -> dict[str, object]:
    """The resource as a server would return it after the transaction."""
    return {**resource, "id": id, "meta": {"versionId": version}}


def _on_server(result: PatientResult) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    assert result.care_plan is not None
    plan = _stored(result.care_plan, "cp1")
    requests = []
    for n, request in enumerate(result.service_requests):
        stored = _stored(request, f"sr{n}")
        stored["basedOn"] = [{"reference": "CarePlan/cp1"}]
        requests.append(stored)
    return [plan], requests


def test_same_plan_on_server_is_unchanged(engine: Engine) -> None:
    p = f.patient(birth_date="1994-01-01")
    result = run_one(engine, p, f.iim_condition(p))
    plans, requests = _on_server(result)
    revision = plan_revision(result, plans, requests)
    assert revision.unchanged and revision.revoke_entries == ()


def test_changed_plan_revokes_old_plan_and_open_requests_only(engine: Engine) -> None:
    p = f.patient(birth_date="1994-01-01")
    cond = f.iim_condition(p)
    old = run_one(engine, p, cond)
    plans, requests = _on_server(old)
    requests[0]["status"] = "completed"
    new = run_one(engine, p, cond, f.antibody(p, "tif1g"))
    revision = plan_revision(new, plans, requests)
    assert not revision.unchanged
    assert revision.revoked_plans == ("CarePlan/cp1",)
    assert "ServiceRequest/sr0" not in revision.revoked_requests
    assert len(revision.revoked_requests) == len(requests) - 1
    for entry in revision.revoke_entries:
        assert entry["resource"]["status"] == "revoked"
        url = f"{entry['resource']['resourceType']}/{entry['resource']['id']}"
        assert entry["request"] == {"method": "PUT", "url": url, "ifMatch": 'W/"1"'}
        assert entry["fullUrl"].startswith("urn:uuid:")
    bundle = write_back_bundle(new, revision)
    assert bundle["entry"][: len(revision.revoke_entries)] == list(revision.revoke_entries)


def test_other_series_is_not_touched(engine: Engine) -> None:
    p = f.patient(birth_date="1994-01-01")
    q = f.patient(birth_date="1994-01-01")
    plans, requests = _on_server(run_one(engine, q, f.iim_condition(q)))
    revision = plan_revision(run_one(engine, p, f.iim_condition(p)), plans, requests)
    assert revision.revoke_entries == () and not revision.unchanged
