"""The clinic page's JSON: the population module's finder, rows, worklist and measures."""

from __future__ import annotations

from datetime import date
from typing import Any

import pytest
import responses
from flask.testing import FlaskClient

from fhir_dm.common import deadline
from fhir_dm.web import app_ui
from tests import factories as f
from tests.unit.web.conftest import FakeFhirServer, transaction_calls

CLINIC = "/app/api/clinic?now=2024-09-15"
NORTH = {"reference": "Organization/north"}
SOUTH = {"reference": "Organization/south"}
Json = dict[str, Any]


def _clinic(fhir_server: FakeFhirServer) -> None:
    """A high-risk patient whose at-diagnosis round closed undone (overdue on 2024-09-15), a
    moderate one diagnosed in July (due soon; sex not recorded, so the sex-specific tests are
    "consider" items inside their window), and a patient without an IIM Condition."""
    a = f.patient(
        "c-a",
        birth_date="1970-01-01",
        managingOrganization=NORTH,
        generalPractitioner=[{"reference": "Practitioner/p1"}],
    )
    b = f.patient("c-b", birth_date="1990-01-01", gender=None, managingOrganization=SOUTH)
    other = f.patient("c-other", birth_date="1970-01-01", managingOrganization=NORTH)
    fhir_server.put(
        a,
        f.iim_condition(a, id="c-a-dm"),
        f.antibody(a, "tif1g", id="c-a-ab"),
        b,
        f.iim_condition(b, id="c-b-dm", onset="2024-07-10"),
        other,
    )


def _post(client: FlaskClient, url: str = CLINIC) -> Json:
    response = client.post(url)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.headers["Cache-Control"] == "no-store"
    body: Json = response.get_json()
    return body


def test_the_clinic_lists_the_overdue_patient_first_and_writes_nothing(
    client: FlaskClient, fhir_server: FakeFhirServer, rsps: responses.RequestsMock
) -> None:
    _clinic(fhir_server)
    view = _post(client)
    assert view["found"] == view["assessed"] == 2  # c-other has no IIM Condition
    assert view["truncated"] is None and view["failed"] == []
    assert [p["patient"] for p in view["patients"]] == ["Patient/c-a", "Patient/c-b"]
    items = view["worklist"]
    assert items and items[0]["patient"] == "Patient/c-a"
    assert items[0]["status"] == "overdue" and items[0]["days_overdue"] > 0
    assert items[0]["organization"] == "Organization/north"
    assert items[0]["practitioner"] == "Practitioner/p1"
    days = [w["days_overdue"] for w in items]
    assert days == sorted(days, reverse=True)
    assert any(w["patient"] == "Patient/c-b" and w["status"] == "due soon" for w in items)
    # Then the open "consider" items inside their window, in a section of their own: c-b's
    # sex-specific tests; c-a's add-ons (PET-CT, endoscopy) are past theirs and not listed.
    sections = [w["status"] for w in items]
    assert sections == sorted(sections, key=("overdue", "due soon", "consider").index)
    consider = [w for w in items if w["status"] == "consider"]
    assert consider and all(w["conditional"] and w["patient"] == "Patient/c-b" for w in consider)
    assert all(w["due_end"] >= "2024-09-15" for w in consider)
    assert not any(w["patient"] == "Patient/c-a" and w["conditional"] for w in items)
    assert not any(w["conditional"] for w in items if w["status"] != "consider")
    south = [w for w in items if w["patient"] == "Patient/c-b"]
    assert all(w["practitioner"] == view["noValue"] for w in south)
    assert transaction_calls(rsps) == 0


def test_the_measures_are_the_measure_reports_read_back_per_tier_and_filter(
    client: FlaskClient, fhir_server: FakeFhirServer
) -> None:
    _clinic(fhir_server)
    view = _post(client)
    assert view["period"] == {"start": "2023-09-16", "end": "2024-09-15"}
    ids = [m["id"] for m in view["measures"]]
    assert [r["resourceType"] for r in view["reports"]] == ["MeasureReport"] * len(ids)
    everyone = view["results"][0]
    assert everyone["organization"] is None and everyone["practitioner"] is None
    workup = dict(zip(ids, everyone["measures"], strict=True))["dm-workup-at-diagnosis"]
    # Only c-a's at-diagnosis round closed in the period, and it was not done.
    assert (workup["initial"], workup["denominator"], workup["numerator"]) == (2, 1, 0)
    assert workup["score"] == 0.0
    assert {t["tier"]: t["denominator"] for t in workup["byTier"]} == {"high": 1, "moderate": 0}
    report = view["reports"][ids.index("dm-workup-at-diagnosis")]
    assert report["group"][0]["measureScore"] == {"value": 0.0}
    overdue = dict(zip(ids, everyone["measures"], strict=True))["dm-any-overdue"]
    assert (overdue["denominator"], overdue["numerator"]) == (2, 1)
    yearly = dict(zip(ids, everyone["measures"], strict=True))["dm-yearly-rounds-high"]
    assert [r["round"] for r in yearly["byRound"]] == ["year-1", "year-2", "year-3"]
    # One result per filter the page can choose; South alone has nobody overdue.
    keys = {(r["organization"], r["practitioner"]) for r in view["results"]}
    assert ("Organization/south", None) in keys
    assert (None, "Practitioner/p1") in keys
    assert ("Organization/north", "Practitioner/p1") in keys
    south = next(r for r in view["results"] if r["organization"] == "Organization/south")
    south_overdue = dict(zip(ids, south["measures"], strict=True))["dm-any-overdue"]
    assert (south_overdue["denominator"], south_overdue["numerator"]) == (1, 0)
    assert view["labels"]["tiers"]["high"] == "High risk"


def test_a_clinic_over_the_limit_is_cut_and_says_so(
    client: FlaskClient, fhir_server: FakeFhirServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    _clinic(fhir_server)
    monkeypatch.setattr(app_ui, "CLINIC_MAX_PATIENTS", 1)
    view = _post(client)
    assert view["found"] == 2 and view["assessed"] == 1 and view["limit"] == 1
    assert view["truncated"]["reason"] == "limit"
    assert "2 patients found" in view["truncated"]["message"]
    assert {w["patient"] for w in view["worklist"]} == {"Patient/c-a"}


def test_a_clinic_cut_short_by_the_deadline_says_so(
    client: FlaskClient, fhir_server: FakeFhirServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    _clinic(fhir_server)
    monkeypatch.setattr(deadline, "remaining_or_none", lambda: 1.0)
    view = _post(client)
    assert view["assessed"] == 0 and view["truncated"]["reason"] == "time"
    assert view["worklist"] == []


def test_a_patient_that_fails_is_listed_and_the_others_shown(
    client: FlaskClient, fhir_server: FakeFhirServer
) -> None:
    _clinic(fhir_server)
    gone = f.patient("c-gone")
    fhir_server.put(f.iim_condition(gone, id="c-gone-dm"))  # the Patient itself is not there
    view = _post(client)
    assert view["found"] == 3 and view["assessed"] == 2
    assert view["failed"] == [
        {"patient": "Patient/c-gone", "error": "PatientNotFoundError", "name": None}
    ]


def test_the_clinic_refuses_bad_parameters(
    client: FlaskClient, fhir_server: FakeFhirServer
) -> None:
    for query in ("?preview=false", "?now=2024-02-30", "?start=2024-10-01&now=2024-09-15"):
        response = client.post("/app/api/clinic" + query)
        assert response.status_code == 400, query
        assert response.get_json()["resourceType"] == "OperationOutcome"


def test_the_clinic_needs_a_token_when_the_service_does(client_static: FlaskClient) -> None:
    response = client_static.post("/app/api/clinic")
    assert response.status_code == 401
    assert response.get_json()["issue"][0]["code"] == "login"
    with client_static.get("/app/clinic") as page:
        assert page.status_code == 200  # the page itself is public
        assert "static/clinic.js" in page.get_data(as_text=True)


def test_the_quarters_end_on_the_evaluation_date_and_meet_without_a_gap() -> None:
    assert app_ui.quarters(date(2024, 5, 31)) == [
        (date(2023, 6, 1), date(2023, 8, 31)),
        (date(2023, 9, 1), date(2023, 11, 30)),
        (date(2023, 12, 1), date(2024, 2, 29)),  # a shorter month: its last day
        (date(2024, 3, 1), date(2024, 5, 31)),
    ]


def test_a_round_counts_in_the_quarter_it_closed_in_and_not_later(
    client: FlaskClient, fhir_server: FakeFhirServer
) -> None:
    _clinic(fhir_server)
    view = _post(client)
    everyone = view["results"][0]
    quarters = everyone["overTime"]
    assert [q["period"] for q in quarters] == [
        {"start": "2023-09-16", "end": "2023-12-15"},
        {"start": "2023-12-16", "end": "2024-03-15"},
        {"start": "2024-03-16", "end": "2024-06-15"},
        {"start": "2024-06-16", "end": "2024-09-15"},
    ]
    # Only the completion measures: a past day's overdue status is not in today's rows.
    completion = [m["id"] for m in view["measures"] if m["kind"] == "completion"]
    assert all([m["id"] for m in q["measures"]] == completion for q in quarters)

    def workup(q: Json) -> tuple[int, int, float | None]:
        m = next(m for m in q["measures"] if m["id"] == "dm-workup-at-diagnosis")
        return m["denominator"], m["numerator"], m["score"]

    # c-a (onset 2024-03-01): the diagnosis round's window closed 2024-06-01, undone; c-b's
    # (onset 2024-07-10) is still open on 2024-09-15.
    assert [workup(q) for q in quarters] == [(0, 0, None), (0, 0, None), (1, 0, 0.0), (0, 0, None)]
    # The quarters tile the year: their denominators add up to the year's.
    year = dict(zip([m["id"] for m in view["measures"]], everyone["measures"], strict=True))
    assert sum(workup(q)[0] for q in quarters) == year["dm-workup-at-diagnosis"]["denominator"]
    # Per filter too: South (c-b only) has nobody in any quarter's denominator.
    south = next(r for r in view["results"] if r["organization"] == "Organization/south")
    assert [workup(q)[0] for q in south["overTime"]] == [0, 0, 0, 0]


def test_the_clinic_shows_one_row_per_patient_with_names_fetched_once_per_type(
    client: FlaskClient, fhir_server: FakeFhirServer
) -> None:
    _clinic(fhir_server)
    fhir_server.put(
        {"resourceType": "Organization", "id": "north", "name": "North Valley Rheumatology"},
        {"resourceType": "Organization", "id": "south", "name": "South Clinic"},
        {
            "resourceType": "Practitioner",
            "id": "p1",
            "name": [{"prefix": ["Dr"], "given": ["Grace"], "family": "Hopper"}],
        },
    )
    fhir_server.store["Patient"]["c-a"]["name"] = [{"text": "Ann Able"}]
    fhir_server.store["Patient"]["c-b"]["name"] = [{"given": ["Ben"], "family": "Baker"}]
    fhir_server.searches.clear()
    view = _post(client)
    by_id = [s for s in fhir_server.searches if "_id" in s[1]]
    # One search per type for every name on the page, not one read per row.
    assert sorted(kind for kind, _ in by_id) == ["Organization", "Patient", "Practitioner"]
    assert dict(by_id)["Organization"]["_id"].split(",") == ["north", "south"]
    rows = view["patients"]
    assert [r["name"] for r in rows] == ["Ann Able", "Ben Baker"]  # the overdue patient first
    first = rows[0]
    assert first["organizationName"] == "North Valley Rheumatology"
    assert first["practitionerName"] == "Dr Grace Hopper"
    assert first["mostOverdue"]["daysOverdue"] > 0
    assert first["counts"]["overdue"] >= 1
    assert sum(first["counts"].values()) == len(first["items"])
    assert first["items"][0]["status"] == "overdue"
    second = rows[1]
    assert second["mostOverdue"]["daysOverdue"] < first["mostOverdue"]["daysOverdue"]
    assert second["nextDue"] >= "2024-09-15"
    assert second["organizationName"] == "South Clinic"
    assert second["practitionerName"] == view["noValue"]


def test_names_are_fetched_in_chunks_and_unknown_references_are_left_as_given(
    fhir_server: FakeFhirServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fhir_dm.fhir.client import FhirClient
    from tests.unit.web.conftest import BASE

    fhir_server.put(*(f.patient(f"n{i}", name=[{"text": f"Person {i}"}]) for i in range(5)))
    monkeypatch.setattr(app_ui, "IDS_PER_SEARCH", 2)
    with FhirClient(BASE) as fhir:
        names = app_ui.fetch_names(
            fhir, [*(f"Patient/n{i}" for i in range(5)), "Patient/gone", "Group/g1", "Some clinic"]
        )
    assert names == {f"Patient/n{i}": f"Person {i}" for i in range(5)}
    assert [kind for kind, _ in fhir_server.searches] == ["Patient"] * 3  # 6 ids, 2 per search
