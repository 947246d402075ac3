"""Write-back details: results without a plan, failures mid-bundle, server locations."""

from __future__ import annotations

from collections import Counter
from typing import Any

import responses
from flask.testing import FlaskClient

from fhir_dm.writeback.writer import MAX_WRITE_ATTEMPTS, WriteBack
from tests import factories as f
from tests.unit.web.conftest import BASE, FakeFhirServer, transaction_calls

FHIR = {"Content-Type": "application/fhir+json"}
OP = "/$dm-cancer-screening"
Json = dict[str, Any]


def test_a_result_without_plan_is_written_once(
    client: FlaskClient, fhir_server: FakeFhirServer, rsps: responses.RequestsMock
) -> None:
    p = f.patient("juvenile-1", birth_date="2014-01-01")
    fhir_server.put(p, f.iim_condition(p, id="juvenile-1-dm"))
    url = "/Patient/juvenile-1/$dm-cancer-screening?now=2024-04-15"
    first = client.post(url).get_json()
    assert first["entry"][0]["resource"]["issue"][0]["diagnostics"].endswith("; written")
    assert transaction_calls(rsps) == 1
    assert fhir_server.all("CarePlan") == [] and len(fhir_server.all("RiskAssessment")) == 1
    second = client.post(url).get_json()
    diagnostics = second["entry"][0]["resource"]["issue"][0]["diagnostics"]
    assert "no tier" in diagnostics
    assert "unchanged: the same assessment is already recorded" in diagnostics
    assert transaction_calls(rsps) == 1


def test_a_patient_without_iim_has_nothing_written(
    client: FlaskClient, fhir_server: FakeFhirServer, rsps: responses.RequestsMock
) -> None:
    fhir_server.put(f.patient("no-iim-1", birth_date="1994-01-01"))
    url = "/Patient/no-iim-1/$dm-cancer-screening?now=2024-04-15"
    for _ in range(2):
        body = client.post(url).get_json()
        diagnostics = body["entry"][0]["resource"]["issue"][0]["diagnostics"]
        assert "no tier" in diagnostics
        assert "unchanged: no IIM diagnosis, nothing is written" in diagnostics
        assert [e["resource"]["resourceType"] for e in body["entry"]] == ["OperationOutcome"]
    assert transaction_calls(rsps) == 0
    assert fhir_server.all("RiskAssessment") == []


def test_a_closed_window_writes_the_completed_plan_once_and_no_order(
    client: FlaskClient, fhir_server: FakeFhirServer, rsps: responses.RequestsMock
) -> None:
    p = f.patient("closed-1", birth_date="1994-01-01")
    # Anti-TIF1-gamma positive: a flare later gets its own round (1.2.0: only with a high-risk
    # antibody or a past cancer).
    tif1g = f.antibody(p, "tif1g", effective="2020-01-20")
    fhir_server.put(p, f.iim_condition(p, id="closed-1-dm", onset="2020-01-15"), tif1g)
    url = "/Patient/closed-1/$dm-cancer-screening?now=2026-06-01"
    first = client.post(url).get_json()["entry"][0]["resource"]["issue"][0]["diagnostics"]
    assert first.endswith("; written") and "0 service requests" in first
    (plan,) = fhir_server.all("CarePlan")
    assert plan["status"] == "completed"  # the missed work-up is kept as its history
    assert {a["detail"]["status"] for a in plan["activity"]} == {"cancelled"}
    assert fhir_server.all("ServiceRequest") == []
    second = client.post(url).get_json()["entry"][0]["resource"]["issue"][0]["diagnostics"]
    assert "unchanged: the same plan is already completed" in second
    assert transaction_calls(rsps) == 1
    # A flare after the window: the same plan is revised in place with the flare round to
    # consider (activities, never orders: 1.2.0); "consider" items never re-open it.
    flare = f.condition(p, f.concept(f.LOCAL_PROBLEMS, "DM-FLARE"), onset="2026-05-20")
    fhir_server.put(flare)
    third = client.post(url).get_json()["entry"][0]["resource"]["issue"][0]["diagnostics"]
    assert "updated 1 care plan(s) in place" in third
    (reopened,) = fhir_server.all("CarePlan")
    assert reopened["id"] == plan["id"] and reopened["status"] == "completed"
    assert fhir_server.all("ServiceRequest") == []
    open_details = [
        a["detail"] for a in reopened["activity"] if a["detail"]["status"] == "not-started"
    ]
    assert open_details
    assert all(d["scheduledPeriod"]["start"] == "2026-05-20" for d in open_details)
    assert all(d["statusReason"]["coding"][0]["code"] == "consider" for d in open_details)


def test_the_plan_completes_in_place_when_its_window_closes(
    client: FlaskClient, fhir_server: FakeFhirServer, rsps: responses.RequestsMock
) -> None:
    p = f.patient("closing-1", birth_date="1994-01-01")
    fhir_server.put(p, f.iim_condition(p, id="closing-1-dm"))  # diagnosed 2024-03-01
    url = "/Patient/closing-1/$dm-cancer-screening?now="
    client.post(url + "2024-04-15")
    (plan,) = fhir_server.all("CarePlan")
    orders = {r["id"] for r in fhir_server.all("ServiceRequest")}
    assert plan["status"] == "active" and orders
    # The window's end date (2027-03-01) passed with the work-up undone: it lapsed.
    text = client.post(url + "2027-03-02").get_json()["entry"][0]["resource"]["issue"][0]
    assert f"revoked 0 care plan(s) and {len(orders)} service request(s)" in text["diagnostics"]
    (closed,) = fhir_server.all("CarePlan")
    assert closed["id"] == plan["id"] and closed["status"] == "completed"
    # The ILD screening lapsed long before (its round passed); the work-up with the window.
    reasons = {}
    for r in fhir_server.all("ServiceRequest"):
        assert r["status"] == "revoked"
        round_id = r["identifier"][0]["value"].split(".")[-3]
        reasons.setdefault(round_id, set()).add(r["note"][-1]["text"].partition("): ")[2])
    assert reasons == {
        "diagnosis": {"missed: window closed"},
        "lung-baseline": {"missed: its round has passed"},
    }
    # Later re-assessments find the completed plan: nothing is written again.
    again = client.post(url + "2027-06-01").get_json()["entry"][0]["resource"]["issue"][0]
    assert "unchanged: the same plan is already completed" in again["diagnostics"]
    assert transaction_calls(rsps) == 2
    assert len(fhir_server.all("CarePlan")) == 1


def test_a_failure_stops_the_bundle_and_re_posting_is_safe(
    client: FlaskClient, fhir_server: FakeFhirServer, rsps: responses.RequestsMock
) -> None:
    a = f.patient("mid-a", birth_date="1994-01-01")
    c = f.patient("mid-c", birth_date="1994-01-01")
    fhir_server.put(a, c)
    written = f.bundle(a, f.iim_condition(a), full_urls="none")
    assert (
        client.post(f"{OP}?preview=false&now=2024-04-15", json=written, headers=FHIR).status_code
        == 200
    )
    assert transaction_calls(rsps) == 1
    fhir_server.reject_transaction = (500, {"resourceType": "OperationOutcome", "issue": []})
    both = f.bundle(a, f.iim_condition(a), c, f.iim_condition(c), full_urls="none")
    response = client.post(f"{OP}?preview=false&now=2024-04-15", json=both, headers=FHIR)
    # The first patient is unchanged (nothing posted); the second one's transaction fails.
    assert response.status_code == 502
    assert transaction_calls(rsps) == 2
    assert len(fhir_server.all("CarePlan")) == 1


def test_server_locations_become_absolute_full_urls(fhir_server: FakeFhirServer) -> None:
    from fhir_dm.fhir.client import FhirClient

    writeback = WriteBack(FhirClient(BASE), None, None)  # type: ignore[arg-type]
    assert writeback._parse_location("CarePlan/7/_history/2") == ("CarePlan", "7", "2")
    assert writeback._parse_location(f"{BASE}/ServiceRequest/x-1") == (
        "ServiceRequest",
        "x-1",
        None,
    )
    assert writeback._parse_location("nonsense") is None


# -- One active plan per patient, whatever changes ------------------------------------------

NOW = "2024-04-15"


def _patient_op(id: str, **query: str) -> str:
    params = "&".join(f"{k}={v}" for k, v in {"now": NOW, **query}.items())
    return f"/Patient/{id}/$dm-cancer-screening?{params}"


def _bundle_op(**query: str) -> str:
    params = "&".join(f"{k}={v}" for k, v in {"now": NOW, "preview": "false", **query}.items())
    return f"{OP}?{params}"


def _status(fhir_server: FakeFhirServer, resource_type: str, patient: str) -> Counter[str]:
    return Counter(
        r["status"]
        for r in fhir_server.all(resource_type)
        if r["subject"]["reference"] == f"Patient/{patient}"
    )


def _diagnostics(response: Any) -> str:
    assert response.status_code == 200, response.get_data(as_text=True)
    text: str = response.get_json()["entry"][0]["resource"]["issue"][0]["diagnostics"]
    return text


def _dm(id: str, **patient: Any) -> list[Json]:
    p = f.patient(id, birth_date="1994-01-01", **patient)
    return [p, f.iim_condition(p, id=f"{id}-dm")]


def test_a_corrected_onset_date_revises_the_one_plan_and_re_dates_its_orders(
    client: FlaskClient, fhir_server: FakeFhirServer
) -> None:
    p, dm = _dm("onset-1")
    fhir_server.put(p, dm)
    _diagnostics(client.post(_patient_op("onset-1")))
    (plan_before,) = fhir_server.all("CarePlan")
    first = {r["id"] for r in fhir_server.all("ServiceRequest")}
    fhir_server.store["Condition"][dm["id"]]["onsetDateTime"] = "2023-11-01"
    text = _diagnostics(client.post(_patient_op("onset-1")))
    # The rounds move: each order is one test of one round with its due start, so the old
    # orders are revoked with the reason and re-dated ones created; the plan is revised.
    assert f"revoked 0 care plan(s) and {len(first)} service request(s)" in text
    assert "updated 1 care plan(s) in place" in text
    assert _status(fhir_server, "CarePlan", "onset-1") == {"active": 1}
    (active_plan,) = fhir_server.all("CarePlan")
    assert active_plan["id"] == plan_before["id"]
    requests = _status(fhir_server, "ServiceRequest", "onset-1")
    assert requests == {"revoked": len(first), "active": len(first)}
    for r in fhir_server.all("ServiceRequest"):
        if r["id"] in first:
            assert r["status"] == "revoked" and "no longer proposed" in r["note"][-1]["text"]
        else:
            assert r["identifier"][0]["value"].endswith(".20231101")
    active_refs = {
        f"ServiceRequest/{r['id']}"
        for r in fhir_server.all("ServiceRequest")
        if r["status"] == "active"
    }
    assert active_refs == {
        a["reference"]["reference"] for a in active_plan["activity"] if "reference" in a
    }


def test_a_new_first_identifier_leaves_one_active_plan(
    client: FlaskClient, fhir_server: FakeFhirServer
) -> None:
    p, dm = _dm("ident-1")
    fhir_server.put(p, dm)
    _diagnostics(client.post(_patient_op("ident-1")))
    fhir_server.store["Patient"]["ident-1"]["identifier"] = [
        {"system": "http://hospital.example.org/mrn", "value": "MRN-NEW-1"}
    ]
    text = _diagnostics(client.post(_patient_op("ident-1")))
    assert "unchanged" in text
    assert _status(fhir_server, "CarePlan", "ident-1") == {"active": 1}


def test_patients_sharing_an_identifier_each_get_their_own_plan(
    client: FlaskClient, fhir_server: FakeFhirServer
) -> None:
    for id in ("twin-a", "twin-b"):
        fhir_server.put(*_dm(id, identifier="SHARED-1"))
        assert _diagnostics(client.post(_patient_op(id))).endswith("; written")
    for id in ("twin-a", "twin-b"):
        assert _status(fhir_server, "CarePlan", id) == {"active": 1}
        assert _status(fhir_server, "RiskAssessment", id).total() == 1
    for body in fhir_server.transactions:
        for entry in body["entry"]:
            if entry["request"]["method"] == "POST":
                assert "subject=Patient%2F" in entry["request"]["ifNoneExist"] or (
                    "subject=Patient/" in entry["request"]["ifNoneExist"]
                )


# -- Earlier plans end when the patient dies or leaves the guideline -------------------------


def test_a_deceased_patient_has_the_earlier_plan_revoked(
    client: FlaskClient, fhir_server: FakeFhirServer
) -> None:
    fhir_server.put(*_dm("dead-1"))
    _diagnostics(client.post(_patient_op("dead-1")))
    fhir_server.store["Patient"]["dead-1"]["deceasedBoolean"] = True
    text = _diagnostics(client.post(_patient_op("dead-1")))
    assert "no tier" in text and "revoked 1 care plan(s)" in text
    assert _status(fhir_server, "CarePlan", "dead-1") == {"revoked": 1}
    assert set(_status(fhir_server, "ServiceRequest", "dead-1")) == {"revoked"}
    (plan,) = fhir_server.all("CarePlan")
    assert "deceased" in plan["note"][-1]["text"].lower()


def test_a_patient_now_out_of_scope_has_the_earlier_plan_revoked(
    client: FlaskClient, fhir_server: FakeFhirServer
) -> None:
    p, dm = _dm("scope-1")
    fhir_server.put(p, dm)
    _diagnostics(client.post(_patient_op("scope-1")))
    fhir_server.store["Condition"][dm["id"]]["verificationStatus"] = f.concept(
        "http://terminology.hl7.org/CodeSystem/condition-ver-status", "refuted"
    )
    text = _diagnostics(client.post(_patient_op("scope-1")))
    assert "revoked 1 care plan(s)" in text
    assert _status(fhir_server, "CarePlan", "scope-1") == {"revoked": 1}
    assert set(_status(fhir_server, "ServiceRequest", "scope-1")) == {"revoked"}


# -- A posted bundle never acts on another patient --------------------------------------------


def _refused(response: Any, status: int, words: str) -> None:
    assert response.status_code == status, response.get_data(as_text=True)
    outcome = response.get_json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert words in outcome["issue"][0]["diagnostics"]


def test_a_posted_patient_carrying_another_patients_identifier_is_refused(
    client: FlaskClient, fhir_server: FakeFhirServer, rsps: responses.RequestsMock
) -> None:
    fhir_server.put(*_dm("victim-1", identifier="MRN-V"))
    _diagnostics(client.post(_patient_op("victim-1")))
    fhir_server.put(f.patient("other-1", birth_date="1994-01-01", identifier="MRN-O"))
    posted = _dm("other-1", identifier="MRN-V")
    posted.append(f.antibody(posted[0], "tif1g", id="other-1-tif1g"))
    response = client.post(_bundle_op(), json=f.bundle(*posted, full_urls="none"), headers=FHIR)
    _refused(response, 409, "identifier")
    assert transaction_calls(rsps) == 1
    assert _status(fhir_server, "CarePlan", "victim-1") == {"active": 1}
    assert set(_status(fhir_server, "ServiceRequest", "victim-1")) == {"active"}


def test_a_posted_patient_without_id_is_refused(
    client: FlaskClient, fhir_server: FakeFhirServer, rsps: responses.RequestsMock
) -> None:
    p, dm = _dm("input-1")
    fhir_server.put(p)
    del p["id"]
    dm["subject"] = {"reference": "Patient/input-1"}
    response = client.post(
        _bundle_op(),
        json=f.bundle(dm, full_urls="none") | {"entry": [{"resource": p}, {"resource": dm}]},
        headers=FHIR,
    )
    _refused(response, 400, "id")
    assert transaction_calls(rsps) == 0
    assert fhir_server.all("CarePlan") == []


def test_a_posted_patient_of_another_server_is_refused(
    client: FlaskClient, fhir_server: FakeFhirServer, rsps: responses.RequestsMock
) -> None:
    p, dm = _dm("far-1")
    fhir_server.put(p)
    del p["id"]
    url = "https://elsewhere.example.net/fhir/Patient/far-1"
    body = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"fullUrl": url, "resource": p},
            {"resource": dm | {"subject": {"reference": url}}},
        ],
    }
    response = client.post(_bundle_op(), json=body, headers=FHIR)
    _refused(response, 400, "id")
    assert transaction_calls(rsps) == 0


def test_a_posted_patient_unknown_to_the_server_is_refused(
    client: FlaskClient, fhir_server: FakeFhirServer, rsps: responses.RequestsMock
) -> None:
    known = _dm("known-1")
    fhir_server.put(known[0])
    body = f.bundle(*known, *_dm("ghost-1"), full_urls="none")
    response = client.post(_bundle_op(), json=body, headers=FHIR)
    _refused(response, 404, "no Patient")
    assert transaction_calls(rsps) == 0


def test_a_partial_bundle_is_assessed_with_the_server_record(
    client: FlaskClient, fhir_server: FakeFhirServer, rsps: responses.RequestsMock
) -> None:
    p, dm = _dm("part-1")
    fhir_server.put(p, dm, f.antibody(p, "tif1g", id="part-1-tif1g"))
    assert "tier high" in _diagnostics(client.post(_patient_op("part-1")))
    # The engine posts only the Patient and its diagnosis: the server's antibody still counts.
    text = _diagnostics(
        client.post(_bundle_op(), json=f.bundle(p, dm, full_urls="none"), headers=FHIR)
    )
    assert "tier high" in text and "unchanged" in text
    assert transaction_calls(rsps) == 1
    assert _status(fhir_server, "CarePlan", "part-1") == {"active": 1}


# -- Concurrency: a lost race is read again, then 409 -----------------------------------------

CONFLICT = (412, {"resourceType": "OperationOutcome", "issue": []})


def test_a_version_conflict_is_read_again_and_written_once(
    client: FlaskClient, fhir_server: FakeFhirServer, rsps: responses.RequestsMock
) -> None:
    fhir_server.put(*_dm("race-1"))
    fhir_server.reject_transaction, fhir_server.reject_times = CONFLICT, 1
    assert _diagnostics(client.post(_patient_op("race-1"))).endswith("; written")
    assert transaction_calls(rsps) == 2
    assert _status(fhir_server, "CarePlan", "race-1") == {"active": 1}


def test_a_conflict_that_persists_is_409_and_writes_nothing(
    client: FlaskClient, fhir_server: FakeFhirServer, rsps: responses.RequestsMock
) -> None:
    fhir_server.put(*_dm("race-2"))
    fhir_server.reject_transaction = CONFLICT
    response = client.post(_patient_op("race-2"))
    _refused(response, 409, "another writer")
    assert transaction_calls(rsps) == MAX_WRITE_ATTEMPTS
    assert fhir_server.all("CarePlan") == []


def test_orders_that_come_back_after_revocation_are_active_again(
    client: FlaskClient, fhir_server: FakeFhirServer
) -> None:
    p, dm = _dm("back-1")
    fhir_server.put(p, dm)
    _diagnostics(client.post(_patient_op("back-1")))
    first = {r["identifier"][0]["value"] for r in fhir_server.all("ServiceRequest")}
    fhir_server.store["Condition"][dm["id"]]["onsetDateTime"] = "2023-11-01"
    _diagnostics(client.post(_patient_op("back-1")))
    fhir_server.store["Condition"][dm["id"]]["onsetDateTime"] = dm["onsetDateTime"]
    text = _diagnostics(client.post(_patient_op("back-1")))
    assert f"revoked 0 care plan(s) and {len(first)} service request(s)" in text
    # The revoked copies are not matched: the orders are created again, active.
    assert f"created {len(first)}" in text
    assert _status(fhir_server, "CarePlan", "back-1") == {"active": 1}
    assert _status(fhir_server, "ServiceRequest", "back-1") == {
        "active": len(first),
        "revoked": 2 * len(first),
    }
    active = [r for r in fhir_server.all("ServiceRequest") if r["status"] == "active"]
    assert {r["identifier"][0]["value"] for r in active} == first
    (plan,) = fhir_server.all("CarePlan")
    assert {a["reference"]["reference"] for a in plan["activity"] if "reference" in a} == {
        f"ServiceRequest/{r['id']}" for r in active
    }


def test_a_duplicate_of_the_current_plan_is_revoked(
    client: FlaskClient, fhir_server: FakeFhirServer
) -> None:
    fhir_server.put(*_dm("dup-1"))
    _diagnostics(client.post(_patient_op("dup-1")))
    (plan,) = fhir_server.all("CarePlan")
    requests = len(fhir_server.all("ServiceRequest"))
    fhir_server.store["CarePlan"]["careplan-dup"] = {**plan, "id": "careplan-dup"}
    text = _diagnostics(client.post(_patient_op("dup-1")))
    assert "revoked 1 care plan(s)" in text
    assert _status(fhir_server, "CarePlan", "dup-1") == {"active": 1, "revoked": 1}
    assert fhir_server.store["CarePlan"]["careplan-dup"]["status"] == "revoked"
    assert fhir_server.store["CarePlan"][plan["id"]]["status"] == "active"
    # Only the duplicate is written: no plan or order is created again.
    (last,) = fhir_server.transactions[-1:]
    writes = {(e["request"]["method"], e["request"]["url"]) for e in last["entry"]}
    assert ("PUT", "CarePlan/careplan-dup") in writes
    assert not {w for w in writes if w[0] == "POST" and w[1] in ("CarePlan", "ServiceRequest")}
    assert len(fhir_server.all("ServiceRequest")) == requests
    assert _status(fhir_server, "RiskAssessment", "dup-1").total() == 1


def test_a_legacy_plan_of_an_older_series_format_is_revised(
    client: FlaskClient, fhir_server: FakeFhirServer
) -> None:
    fhir_server.put(*_dm("legacy-1"))
    _diagnostics(client.post(_patient_op("legacy-1")))
    (plan,) = fhir_server.all("CarePlan")
    # The series format before plans were keyed by the Patient id: MRN hash and window start.
    for ident in plan["identifier"]:
        family, _, rest = ident["value"].partition(".")
        ident["value"] = f"{family}.0123456789abcdef.20240301{rest[16:]}"
    text = _diagnostics(client.post(_patient_op("legacy-1")))
    assert "revoked 1 care plan(s)" in text
    assert _status(fhir_server, "CarePlan", "legacy-1") == {"active": 1, "revoked": 1}
