"""The two operations: bundle preview and write, Patient pull-assess-write, revision, re-runs."""

from __future__ import annotations

from typing import Any

import pytest
import responses
from fhir.resources.R4B.bundle import Bundle
from flask.testing import FlaskClient

from tests import factories as f
from tests.unit.web.conftest import BASE, PAGE_SIZE, FakeFhirServer, transaction_calls

Json = dict[str, Any]
OP = "/$dm-cancer-screening"
NOW = "2024-04-15"


def _patient_op(id: str) -> str:
    return f"/Patient/{id}/$dm-cancer-screening"


def _post(client: FlaskClient, url: str, body: Json | None = None, **kw: Any) -> Any:
    headers = {"Content-Type": "application/fhir+json"} if body is not None else {}
    return client.post(url, json=body, headers=headers, **kw)


def _ok(response: Any) -> Json:
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.content_type == "application/fhir+json; charset=utf-8"
    body: Json = response.get_json()
    Bundle.model_validate(body)
    assert body["type"] == "collection"
    assert body["entry"][0]["resource"]["resourceType"] == "OperationOutcome"
    return body


def _diagnostics(body: Json) -> list[str]:
    return [i["diagnostics"] for i in body["entry"][0]["resource"]["issue"]]


def _types(body: Json) -> list[str]:
    return [e["resource"]["resourceType"] for e in body["entry"][1:]]


def _dm_patient(id: str, *extra: str) -> list[Json]:
    p = f.patient(id, birth_date="1994-01-01")
    resources = [p, f.iim_condition(p, id=f"{id}-dm")]
    if "tif1g" in extra:
        resources.append(f.antibody(p, "tif1g", id=f"{id}-tif1g"))
    return resources


# -- POST /$dm-cancer-screening --------------------------------------------------------------


def test_bundle_preview_is_the_default_and_reads_no_server(
    client: FlaskClient, rsps: responses.RequestsMock
) -> None:
    body = _ok(_post(client, f"{OP}?now=2015-10-25", f.bundle(*f.seed_case())))
    (diagnostics,) = _diagnostics(body)
    assert diagnostics.startswith("Patient/seed-case: tier high; ")
    assert diagnostics.endswith(" care-plan activities; preview")
    types = _types(body)
    assert types[:2] == ["RiskAssessment", "CarePlan"]
    assert types[-1] == "Provenance"
    assert set(types[2:-1]) == {"ServiceRequest"}
    # Orders and the plan's other activities (later rounds, "consider" items) add up.
    orders = types.count("ServiceRequest")
    activities = len(body["entry"][2]["resource"]["activity"])
    assert (
        f"; {orders} service requests, {activities - orders} care-plan activities;" in diagnostics
    )
    assert 0 < orders < activities
    assert all(e["fullUrl"].startswith("urn:uuid:") for e in body["entry"][1:-1])
    assert body["entry"][-1]["fullUrl"].startswith(f"{BASE}/Provenance/")
    assert all("request" not in e for e in body["entry"])
    assert len(rsps.calls) == 0


def test_parameters_body_carries_bundle_preview_and_now(client: FlaskClient) -> None:
    parameters = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "bundle", "resource": f.bundle(*f.seed_case())},
            {"name": "preview", "valueBoolean": True},
            {"name": "now", "valueDate": "2015-10-25"},
        ],
    }
    body = _ok(_post(client, OP, parameters))
    assert "tier high" in _diagnostics(body)[0]
    risk = body["entry"][1]["resource"]
    assert risk["occurrenceDateTime"].startswith("2015-10-25")


def test_several_patients_get_one_issue_each_in_input_order(client: FlaskClient) -> None:
    a, b = _dm_patient("ops-a"), _dm_patient("ops-b", "tif1g")
    body = _ok(_post(client, f"{OP}?now={NOW}", f.bundle(*a, *b)))
    diagnostics = _diagnostics(body)
    assert [d.split(":")[0] for d in diagnostics] == ["Patient/ops-a", "Patient/ops-b"]


def test_bundle_preview_false_writes_one_transaction_per_patient(
    client: FlaskClient, fhir_server: FakeFhirServer, rsps: responses.RequestsMock
) -> None:
    a, b = _dm_patient("wr-a"), _dm_patient("wr-b", "tif1g")
    fhir_server.put(a[0], b[0])
    posted = f.bundle(*a, *b, full_urls="none")
    body = _ok(_post(client, f"{OP}?now={NOW}&preview=false", posted))
    assert transaction_calls(rsps) == 2
    assert all(d.endswith("; written") for d in _diagnostics(body))
    assert len(fhir_server.all("CarePlan")) == 2
    written = body["entry"][1:]
    assert all(e["fullUrl"].startswith(f"{BASE}/") for e in written)
    assert all(e["fullUrl"].endswith("/" + e["resource"]["id"]) for e in written)
    # The patients' open plans were looked up by subject and series system (any series).
    care_plan_searches = [p for t, p in fhir_server.searches if t == "CarePlan"]
    assert {p["subject"] for p in care_plan_searches} == {"Patient/wr-a", "Patient/wr-b"}
    assert all(p["identifier"].endswith("/sid/plan-series|") for p in care_plan_searches)

    again = _ok(_post(client, f"{OP}?now={NOW}&preview=false", posted))
    assert transaction_calls(rsps) == 2
    assert all("unchanged: the same plan is already active" in d for d in _diagnostics(again))


def test_bundle_preview_false_in_the_body(
    client: FlaskClient, fhir_server: FakeFhirServer, rsps: responses.RequestsMock
) -> None:
    resources = _dm_patient("wr-body")
    fhir_server.put(resources[0])
    parameters = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "bundle", "resource": f.bundle(*resources, full_urls="none")},
            {"name": "preview", "valueBoolean": False},
            {"name": "now", "valueDate": NOW},
        ],
    }
    _ok(_post(client, OP, parameters))
    assert transaction_calls(rsps) == 1


# -- POST /Patient/<id>/$dm-cancer-screening --------------------------------------------------


def _load_patient(server: FakeFhirServer, id: str, *extra: str, observations: int = 0) -> None:
    resources = _dm_patient(id, *extra)
    p = resources[0]
    for n in range(observations):
        resources.append(f.ck(p, 250 + n, id=f"{id}-ck-{n}"))
    server.put(*resources)


def test_patient_operation_pulls_with_paging_then_writes_once(
    client: FlaskClient, fhir_server: FakeFhirServer, rsps: responses.RequestsMock
) -> None:
    _load_patient(fhir_server, "pull-1", "tif1g", observations=2 * PAGE_SIZE)
    body = _ok(_post(client, f"{_patient_op('pull-1')}?now={NOW}"))
    (diagnostics,) = _diagnostics(body)
    assert diagnostics.startswith("Patient/pull-1: tier high; ")
    assert diagnostics.endswith("; written")
    assert transaction_calls(rsps) == 1
    # Paging: the Observation search needed three pages of PAGE_SIZE.
    observation_pages = [c for c in rsps.calls if "/Observation" in str(c.request.url)]
    assert len(observation_pages) == 3
    searched = {t for t, _ in fhir_server.searches}
    assert searched >= {
        "Condition",
        "Observation",
        "MedicationRequest",
        "MedicationStatement",
        "FamilyMemberHistory",
        "Procedure",
        "DiagnosticReport",
        "ServiceRequest",
        "CarePlan",
    }
    assert any(
        t == "CarePlan" and p["subject"] == "Patient/pull-1" for t, p in fhir_server.searches
    )
    (plan,) = fhir_server.all("CarePlan")
    assert plan["status"] == "active"
    assert plan["subject"] == {"reference": "Patient/pull-1"}
    # The answer shows the resources as the server holds them: ids and references resolved.
    written_plan = next(e for e in body["entry"] if e["resource"]["resourceType"] == "CarePlan")
    assert written_plan["fullUrl"] == f"{BASE}/CarePlan/{plan['id']}"
    refs = [
        a["reference"]["reference"]
        for a in written_plan["resource"]["activity"]
        if "reference" in a
    ]
    assert refs and all(r.startswith("ServiceRequest/") for r in refs)


def test_patient_operation_second_run_writes_nothing(
    client: FlaskClient, fhir_server: FakeFhirServer, rsps: responses.RequestsMock
) -> None:
    _load_patient(fhir_server, "again-1")
    _ok(_post(client, f"{_patient_op('again-1')}?now={NOW}"))
    assert transaction_calls(rsps) == 1
    body = _ok(_post(client, f"{_patient_op('again-1')}?now={NOW}"))
    assert transaction_calls(rsps) == 1
    assert "unchanged: the same plan is already active" in _diagnostics(body)[0]
    assert len(fhir_server.all("CarePlan")) == 1


def test_patient_operation_preview_returns_what_would_be_written(
    client: FlaskClient, fhir_server: FakeFhirServer, rsps: responses.RequestsMock
) -> None:
    _load_patient(fhir_server, "prev-1")
    body = _ok(_post(client, f"{_patient_op('prev-1')}?now={NOW}&preview=true"))
    assert transaction_calls(rsps) == 0
    assert _diagnostics(body)[0].endswith("; preview")
    assert "CarePlan" in _types(body)
    assert fhir_server.all("CarePlan") == []


def test_changed_plan_is_revised_in_place_keeping_open_and_completed_orders(
    client: FlaskClient, fhir_server: FakeFhirServer, rsps: responses.RequestsMock
) -> None:
    _load_patient(fhir_server, "rev-1")
    _ok(_post(client, f"{_patient_op('rev-1')}?now={NOW}"))
    (old_plan,) = fhir_server.all("CarePlan")
    requests_before = fhir_server.all("ServiceRequest")
    # The antibody panel was run (its order completed) and found TIF1-gamma: tier high.
    done = next(
        r for r in requests_before if ".myositis-antibodies." in r["identifier"][0]["value"]
    )
    done["status"] = "completed"
    p = f.patient("rev-1")
    fhir_server.put(
        *(
            f.antibody(p, ab, "positive" if ab == "tif1g" else "negative", id=f"rev-1-{ab}")
            for ab in f.ANTIBODY_LOINC
        )
    )
    open_before = [r for r in requests_before if r["id"] != done["id"]]

    preview = _ok(_post(client, f"{_patient_op('rev-1')}?now={NOW}&preview=true"))
    (text,) = _diagnostics(preview)
    assert "tier high" in text and "would update 1 care plan(s) in place" in text
    assert f"kept {len(open_before)} open service request(s); would create 0" in text
    assert "revoke" not in text
    revised = [e for e in preview["entry"][1:] if e["resource"]["resourceType"] == "CarePlan"]
    assert [e["fullUrl"] for e in revised] == [f"{BASE}/CarePlan/{old_plan['id']}"]
    assert transaction_calls(rsps) == 1

    body = _ok(_post(client, f"{_patient_op('rev-1')}?now={NOW}"))
    assert transaction_calls(rsps) == 2
    assert "; written; updated 1 care plan(s) in place; " in _diagnostics(body)[0]
    # One plan, revised in place (a new version), still active.
    (plan,) = fhir_server.all("CarePlan")
    assert plan["id"] == old_plan["id"] and plan["status"] == "active"
    assert plan["meta"]["versionId"] == "2"
    # The completed order is left alone; the open ones still proposed are kept untouched.
    assert fhir_server.store["ServiceRequest"][done["id"]]["status"] == "completed"
    for r in open_before:
        stored = fhir_server.store["ServiceRequest"][r["id"]]
        assert stored["status"] == "active" and stored["meta"]["versionId"] == "1"
    assert len(fhir_server.all("ServiceRequest")) == len(requests_before)
    refs = {a["reference"]["reference"] for a in plan["activity"] if "reference" in a}
    assert refs == {f"ServiceRequest/{r['id']}" for r in open_before}


def test_patient_operation_accepts_parameters_without_bundle(
    client: FlaskClient, fhir_server: FakeFhirServer, rsps: responses.RequestsMock
) -> None:
    _load_patient(fhir_server, "params-1")
    parameters = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "preview", "valueBoolean": True},
            {"name": "now", "valueDate": NOW},
        ],
    }
    body = _ok(_post(client, _patient_op("params-1"), parameters))
    assert _diagnostics(body)[0].endswith("; preview")
    assert transaction_calls(rsps) == 0


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("preview=maybe", "preview must be true or false"),
        ("now=2024-02", "full date"),
        ("now=2024-02-30", "not a valid date"),
        ("preveiw=true", "unknown query parameter(s): preveiw"),
        ("preview=true&preview=false", "more than once"),
    ],
)
def test_bad_query_parameters_are_refused_before_anything_is_read(
    client: FlaskClient, rsps: responses.RequestsMock, query: str, expected: str
) -> None:
    response = _post(client, f"{_patient_op('q-1')}?{query}")
    assert response.status_code == 400
    outcome = response.get_json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["code"] == "invalid"
    assert expected in outcome["issue"][0]["diagnostics"]
    assert len(rsps.calls) == 0


def test_query_and_body_must_agree(client: FlaskClient) -> None:
    parameters = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "bundle", "resource": f.bundle(*_dm_patient("agree-1"))},
            {"name": "preview", "valueBoolean": True},
        ],
    }
    response = _post(client, f"{OP}?preview=false", parameters)
    assert response.status_code == 400
    assert "different values" in response.get_json()["issue"][0]["diagnostics"]


def test_patient_operation_refuses_a_posted_bundle(client: FlaskClient) -> None:
    parameters = {
        "resourceType": "Parameters",
        "parameter": [{"name": "bundle", "resource": f.bundle(*_dm_patient("nb-1"))}],
    }
    response = _post(client, _patient_op("nb-1"), parameters)
    assert response.status_code == 400
    issue = response.get_json()["issue"][0]
    assert issue["expression"] == ["Parameters.parameter[0].resource"]


def test_bundle_write_needs_server_patient_ids(client: FlaskClient) -> None:
    patient = f.patient("x")
    del patient["id"]
    data = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"fullUrl": "urn:uuid:0b9d5a8e-0000-4000-8000-000000000001", "resource": patient},
            {
                "resource": f.iim_condition(f.patient("x"))
                | {"subject": {"reference": "urn:uuid:0b9d5a8e-0000-4000-8000-000000000001"}}
            },
        ],
    }
    response = _post(client, f"{OP}?now={NOW}&preview=false", data)
    assert response.status_code == 400
    body = response.get_json()
    assert body["resourceType"] == "OperationOutcome"
    assert "needs its id on the FHIR server" in body["issue"][0]["diagnostics"]
