"""`$dm-population-run` and `Measure/{id}/$evaluate-measure` on the fake FHIR server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flask.testing import FlaskClient

from fhir_dm.events.settings import JobsSettings
from fhir_dm.knowledge.load import load_knowledge
from fhir_dm.web.app import create_app
from fhir_dm.web.trust import TrustConfig
from tests import factories as f
from tests.unit.web.conftest import STATIC_TOKEN, FakeFhirServer, make_settings

RUN = "/$dm-population-run"
MEASURE = "/Measure/dm-workup-at-diagnosis/$evaluate-measure"
AUTH = {"Authorization": f"Bearer {STATIC_TOKEN}"}


def _load(server: FakeFhirServer, n: int = 3) -> None:
    for k in range(n):
        p = f.patient(f"m{k}", managingOrganization={"reference": "Organization/o1"})
        server.put(p, f.iim_condition(p, id=f"m{k}-dm"))
    server.put(f.patient("healthy-1"))


def _client(tmp_path: Path, **overrides: Any) -> FlaskClient:
    trust = TrustConfig(mode="static", static_tokens=(STATIC_TOKEN,))
    return create_app(make_settings(tmp_path, trust=trust, **overrides)).test_client()


def _param(body: dict[str, Any], name: str) -> Any:
    for p in body["parameter"]:
        if p["name"] == name:
            return next(v for k, v in p.items() if k.startswith("value"))
    raise KeyError(name)


def test_the_operations_need_authentication(tmp_path: Path, fhir_server: FakeFhirServer) -> None:
    client = _client(tmp_path)
    assert client.post(RUN).status_code == 401
    answer = client.get(MEASURE + "?periodStart=2026-01-01&periodEnd=2026-12-31")
    assert answer.status_code == 401
    assert answer.get_json()["resourceType"] == "OperationOutcome"


def test_a_run_without_queue_previews_by_default(
    tmp_path: Path, fhir_server: FakeFhirServer
) -> None:
    _load(fhir_server)
    answer = _client(tmp_path).post(RUN, headers=AUTH)
    assert answer.status_code == 200, answer.get_json()
    body = answer.get_json()
    assert _param(body, "total") == 3  # the healthy patient is not found
    assert _param(body, "preview") is True
    assert fhir_server.transactions == []
    written = _client(tmp_path).post(RUN + "?preview=false", headers=AUTH)
    assert written.status_code == 200
    assert len([p for p in fhir_server.all("CarePlan") if p["status"] == "active"]) == 3


def test_a_population_over_the_limit_without_queue_is_refused(
    tmp_path: Path, fhir_server: FakeFhirServer
) -> None:
    _load(fhir_server, 3)
    answer = _client(tmp_path, max_patients_per_request=2).post(RUN, headers=AUTH)
    assert answer.status_code == 413
    assert answer.get_json()["resourceType"] == "OperationOutcome"
    assert fhir_server.transactions == []


def test_with_a_queue_the_run_is_accepted_and_its_status_is_readable(
    tmp_path: Path, fhir_server: FakeFhirServer
) -> None:
    _load(fhir_server, 3)
    jobs = JobsSettings(sqlite_file=tmp_path / "q.sqlite3")
    client = _client(tmp_path, jobs=jobs, max_patients_per_request=1)
    answer = client.post(RUN, headers=AUTH)
    assert answer.status_code == 202
    location = answer.headers["Content-Location"]
    assert location.startswith("https://dm.example.org/$dm-population-run/")
    status = client.get(location.removeprefix("https://dm.example.org"), headers=AUTH)
    # No worker has run: every patient is still queued.
    assert status.status_code == 202
    assert _param(status.get_json(), "total") == 3
    assert _param(status.get_json(), "finished") == 0
    assert client.get(RUN + "/no-such-run", headers=AUTH).status_code == 404
    assert client.get(RUN + "/..%2Fx", headers=AUTH).status_code in (400, 404)


def test_bad_run_input_is_an_operation_outcome(tmp_path: Path, fhir_server: FakeFhirServer) -> None:
    client = _client(tmp_path)
    for url in (RUN + "?preview=maybe", RUN + "?nope=1", RUN + "?now=2026-13-01"):
        answer = client.post(url, headers=AUTH)
        assert answer.status_code == 400, url
        assert answer.get_json()["resourceType"] == "OperationOutcome"


def test_evaluate_measure_answers_a_measure_report(
    tmp_path: Path, fhir_server: FakeFhirServer
) -> None:
    _load(fhir_server, 2)
    client = _client(tmp_path)
    period = "periodStart=2026-01-01&periodEnd=2026-12-31"
    summary = client.get(f"{MEASURE}?{period}", headers=AUTH)
    assert summary.status_code == 200, summary.get_json()
    report = summary.get_json()
    assert report["resourceType"] == "MeasureReport"
    assert report["type"] == "summary"
    assert report["period"]["start"].startswith("2026-01-01")
    assert report["period"]["end"].startswith("2026-12-31")
    initial = next(
        p
        for p in report["group"][0]["population"]
        if p["code"]["coding"][0]["code"] == "initial-population"
    )
    assert initial["count"] == 2  # the two IIM patients; the healthy one is not found
    listed = client.post(
        MEASURE,
        headers=AUTH,
        json={
            "resourceType": "Parameters",
            "parameter": [
                {"name": "periodStart", "valueDate": "2026-01-01"},
                {"name": "periodEnd", "valueDate": "2026-12-31"},
                {"name": "reportType", "valueCode": "subject-list"},
            ],
        },
    )
    assert listed.status_code == 200, listed.get_json()
    assert listed.get_json()["type"] == "subject-list"
    lists = listed.get_json().get("contained", [])
    listed_patients = {e["item"]["reference"] for li in lists for e in li.get("entry", [])}
    assert listed_patients == {"Patient/m0", "Patient/m1"}
    assert fhir_server.transactions == []  # a measure writes nothing


def test_evaluate_measure_answers_the_lung_programme_in_item_units(
    tmp_path: Path, fhir_server: FakeFhirServer
) -> None:
    """The fifth measure: each lung item a unit, its subject the patient, named in the flag."""
    p = f.patient("lung-1")
    fhir_server.put(
        p,
        f.iim_condition(p, id="lung-1-dm", onset="2026-01-10", recorded="2026-01-10"),
        f.antibody(p, "mda5", effective="2026-01-12"),
    )
    fhir_server.put(f.done_request(p, load_knowledge(), "hrct-chest", "2026-01-20"))
    answer = _client(tmp_path).get(
        "/Measure/dm-lung-programme/$evaluate-measure"
        "?periodStart=2026-01-01&periodEnd=2026-12-02&reportType=subject-list",
        headers=AUTH,
    )
    assert answer.status_code == 200, answer.get_json()
    report = answer.get_json()
    assert report["measure"].split("|")[0].endswith("/Measure/dm-lung-programme")
    counts = [p["count"] for p in report["group"][0]["population"]]
    # Rule set 1.2.0 (anti-MDA5): 16 lung items over three years; the baseline HRCT and PFT,
    # the 1-3-month PFT, the 6-month PFT and desaturation test and the 9-month PFT ended in the
    # period (the 12-month round not yet); only the HRCT was done on time.
    assert counts == [16, 6, 1]
    denominator = next(c for c in report["contained"] if c["id"] == "denominator-subjects")
    assert sorted(e["flag"]["text"] for e in denominator["entry"]) == [
        "Lung 1-3 months: Pulmonary function tests with DLCO",
        "Lung 6 months: Ambulatory desaturation test (6-minute walk with pulse oximetry)",
        "Lung 6 months: Pulmonary function tests with DLCO",
        "Lung 9 months: Pulmonary function tests with DLCO",
        "Lung baseline: High-resolution CT of the chest",
        "Lung baseline: Pulmonary function tests with DLCO",
    ]
    numerator = next(c for c in report["contained"] if c["id"] == "numerator-subjects")
    assert [e["item"]["reference"] for e in numerator["entry"]] == ["Patient/lung-1"]
    assert numerator["entry"][0]["flag"]["text"] == "Lung baseline: High-resolution CT of the chest"


def test_bad_measure_input_is_an_operation_outcome(
    tmp_path: Path, fhir_server: FakeFhirServer
) -> None:
    client = _client(tmp_path)
    cases = {
        "/Measure/unknown/$evaluate-measure?periodStart=2026-01-01&periodEnd=2026-12-31": 404,
        MEASURE + "?periodStart=2026-01-01": 400,
        MEASURE + "?periodStart=2026-12-31&periodEnd=2026-01-01": 400,
        MEASURE + "?periodStart=2026-01-01&periodEnd=2026-12-31&reportType=population": 400,
        MEASURE + "?periodStart=yesterday&periodEnd=2026-12-31": 400,
    }
    for url, status in cases.items():
        answer = client.get(url, headers=AUTH)
        assert answer.status_code == status, url
        assert answer.get_json()["resourceType"] == "OperationOutcome"
