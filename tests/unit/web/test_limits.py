"""Every request is bounded: a deadline, header sizes, patients per request, response size."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import requests
import responses
from flask import Flask

from fhir_dm.common import deadline as deadlines
from fhir_dm.fhir.config import FhirServerConfig
from fhir_dm.web.app import create_app
from fhir_dm.web.http_limits import MAX_HEADER_FIELD_BYTES
from fhir_dm.web.trust import TrustConfig
from tests import factories as f
from tests.unit.web.conftest import (
    BASE,
    STATIC_TOKEN,
    FakeFhirServer,
    make_settings,
    service_of,
    transaction_calls,
)

OP = "/$dm-cancer-screening"
FHIR = {"Content-Type": "application/fhir+json"}
PATIENT = "limit-1"


def _patient_op(id: str = PATIENT) -> str:
    return f"/Patient/{id}/$dm-cancer-screening"


def _outcome(response: Any, status: int, code: str) -> str:
    """Check the OperationOutcome shape (never HTML) and return the diagnostics."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.content_type == "application/fhir+json; charset=utf-8"
    body = response.get_json()
    assert body["resourceType"] == "OperationOutcome"
    issue = body["issue"][0]
    assert issue["severity"] == "error" and issue["code"] == code, issue
    diagnostics: str = issue["diagnostics"]
    return diagnostics


def _app(tmp_path: Path, **overrides: Any) -> Flask:
    retrying = FhirServerConfig(base_url=BASE, max_retries=3, backoff_factor=0.5, max_backoff=30)
    return create_app(make_settings(tmp_path, fhir=overrides.pop("fhir", retrying), **overrides))


def _many_patients(n: int) -> dict[str, Any]:
    resources: list[dict[str, Any]] = []
    for i in range(n):
        p = f.patient(f"many-{i}", birth_date="1994-01-01")
        resources += [p, f.iim_condition(p, id=f"many-{i}-dm")]
    return f.bundle(*resources)


# -- the deadline: FHIR throttling, slowness and held locks answer fast, as FHIR ---------------


def test_fhir_server_throttling_for_an_hour_is_a_fast_503_with_its_retry_after(
    tmp_path: Path, rsps: responses.RequestsMock
) -> None:
    rsps.get(f"{BASE}/Patient/{PATIENT}", status=429, headers={"Retry-After": "3600"})
    client = _app(tmp_path).test_client()

    started = time.monotonic()
    response = client.post(_patient_op())
    elapsed = time.monotonic() - started

    diagnostics = _outcome(response, 503, "throttled")
    assert response.headers["Retry-After"] == "3600"
    assert diagnostics == "GET Patient/{id} failed: HTTP 429"
    assert elapsed < 2.0
    assert len(rsps.calls) == 1


def test_a_retry_after_beyond_the_deadline_is_not_waited_for(
    tmp_path: Path, rsps: responses.RequestsMock
) -> None:
    rsps.get(f"{BASE}/Patient/{PATIENT}", status=503, headers={"Retry-After": "5"})
    client = _app(tmp_path, request_deadline_seconds=2).test_client()

    started = time.monotonic()
    response = client.post(_patient_op())

    _outcome(response, 503, "transient")
    assert response.headers["Retry-After"] == "5"
    assert time.monotonic() - started < 1.5
    assert len(rsps.calls) == 1


def test_a_slow_fhir_server_is_waited_for_only_until_the_deadline(
    tmp_path: Path, rsps: responses.RequestsMock
) -> None:
    timeouts: list[Any] = []

    def slow(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        timeouts.append(request.req_kwargs["timeout"])  # type: ignore[attr-defined]
        time.sleep(0.3)  # the server would answer after 35 s; the read gives up at the deadline
        raise requests.exceptions.ReadTimeout()

    rsps.add_callback(responses.GET, f"{BASE}/Patient/{PATIENT}", callback=slow)
    client = _app(tmp_path, request_deadline_seconds=0.3).test_client()

    started = time.monotonic()
    response = client.post(_patient_op())

    diagnostics = _outcome(response, 504, "timeout")
    assert "time limit of 0.3 s ran out" in diagnostics
    assert time.monotonic() - started < 1.5
    (connect, read) = timeouts[0]
    assert connect <= 0.3 and read <= 0.3  # not the configured 5 s / 30 s
    assert len(timeouts) == 1  # no retry once the budget is spent


def test_a_held_patient_lock_is_a_fast_503_not_a_hung_worker(
    tmp_path: Path, fhir_server: FakeFhirServer
) -> None:
    app = _app(tmp_path, request_deadline_seconds=0.5)
    locks = service_of(app).locks
    held, release = threading.Event(), threading.Event()

    def other_request() -> None:
        with locks.hold(f"Patient/{PATIENT}"):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=other_request, daemon=True)
    thread.start()
    assert held.wait(5)
    try:
        started = time.monotonic()
        response = app.test_client().post(_patient_op())
        elapsed = time.monotonic() - started
    finally:
        release.set()
        thread.join()

    diagnostics = _outcome(response, 503, "lock-error")
    assert "another assessment of this patient is still running" in diagnostics
    assert PATIENT not in diagnostics
    assert response.headers["Retry-After"] == "1"
    assert 0.4 <= elapsed < 2.0


def test_each_request_gets_its_own_deadline_and_leaves_none_behind(
    tmp_path: Path,
) -> None:
    app = _app(tmp_path, request_deadline_seconds=7)
    seen: list[float | None] = []

    @app.get("/probe")
    def probe() -> str:
        seen.append(deadlines.remaining_or_none())
        return "ok"

    client = app.test_client()
    client.get("/probe")
    client.get("/probe")

    assert all(s is not None and 6.5 < s <= 7 for s in seen) and len(seen) == 2
    assert deadlines.current() is None


# -- work limits: patients per request, response size --------------------------------------


def test_too_many_patients_are_refused_before_any_assessment(
    tmp_path: Path, rsps: responses.RequestsMock
) -> None:
    bundle = _many_patients(4)
    bundle["entry"].append({"resource": {"resourceType": "Observation", "status": "nonsense"}})
    client = _app(tmp_path, max_patients_per_request=3).test_client()

    response = client.post(OP, json=bundle, headers=FHIR)

    # 413, not the 400 that assessing the invalid Observation would have given.
    diagnostics = _outcome(response, 413, "too-costly")
    assert "4 patients" in diagnostics
    assert "max_patients_per_request is 3" in diagnostics
    assert "fhir-dm assess" in diagnostics
    assert len(rsps.calls) == 0


def test_patients_up_to_the_limit_are_assessed(tmp_path: Path) -> None:
    client = _app(tmp_path, max_patients_per_request=3).test_client()

    response = client.post(f"{OP}?now=2024-04-15", json=_many_patients(3), headers=FHIR)

    assert response.status_code == 200, response.get_data(as_text=True)
    assert len(response.get_json()["entry"][0]["resource"]["issue"]) == 3


def test_patients_inside_parameters_count_too(tmp_path: Path) -> None:
    client = _app(tmp_path, max_patients_per_request=1).test_client()
    parameters = {
        "resourceType": "Parameters",
        "parameter": [{"name": "bundle", "resource": _many_patients(2)}],
    }

    response = client.post(OP, json=parameters, headers=FHIR)

    _outcome(response, 413, "too-costly")


def test_the_default_limit_refuses_ten_thousand_patients_fast(tmp_path: Path) -> None:
    """The reported case: 10,000 patients in 3.2 MB took a worker to 1.2 GB and got it killed."""
    client = _app(tmp_path).test_client()
    patients = [
        {"resource": {"resourceType": "Patient", "id": f"p{n}", "birthDate": "1950-01-01"}}
        for n in range(10_000)
    ]
    body = json.dumps({"resourceType": "Bundle", "type": "collection", "entry": patients}).encode()

    started = time.monotonic()
    response = client.post(OP, data=body, headers=FHIR)

    _outcome(response, 413, "too-costly")
    assert "max_patients_per_request is 100" in response.get_json()["issue"][0]["diagnostics"]
    assert time.monotonic() - started < 2.0


def test_a_preview_over_the_response_limit_is_refused(tmp_path: Path) -> None:
    client = _app(tmp_path, max_response_bytes=20_000).test_client()

    response = client.post(f"{OP}?now=2015-10-25", json=f.bundle(*f.seed_case()), headers=FHIR)

    diagnostics = _outcome(response, 413, "too-costly")
    assert "max_response_bytes is 20000" in diagnostics


def test_a_write_over_the_response_limit_is_refused_before_writing(
    tmp_path: Path, fhir_server: FakeFhirServer, rsps: responses.RequestsMock
) -> None:
    fhir_server.put(*f.seed_case())
    client = _app(tmp_path, max_response_bytes=20_000).test_client()

    response = client.post(
        f"{OP}?now=2015-10-25&preview=false", json=f.bundle(*f.seed_case()), headers=FHIR
    )

    _outcome(response, 413, "too-costly")
    assert transaction_calls(rsps) == 0


def test_the_body_limit_is_enforced(tmp_path: Path) -> None:
    client = _app(tmp_path, max_request_bytes=1000).test_client()

    response = client.post(OP, data=b" " * 1001, headers=FHIR)

    _outcome(response, 413, "too-long")


# -- encodings and headers -------------------------------------------------------------------


def test_a_utf16_body_is_refused_as_not_utf8(tmp_path: Path) -> None:
    client = _app(tmp_path).test_client()
    text = json.dumps(f.bundle(*f.seed_case()))

    for data in (text.encode("utf-16"), text.encode("utf-16-le"), text.encode("utf-32")):
        response = client.post(OP, data=data, headers=FHIR)
        assert "not UTF-8" in _outcome(response, 400, "structure")


def test_a_utf8_byte_order_mark_is_tolerated(tmp_path: Path) -> None:
    client = _app(tmp_path).test_client()
    data = json.dumps(f.bundle(*f.seed_case())).encode("utf-8-sig")

    response = client.post(f"{OP}?now=2015-10-25", data=data, headers=FHIR)

    assert response.status_code == 200, response.get_data(as_text=True)


def test_an_oversized_authorization_header_is_431_not_401(tmp_path: Path) -> None:
    trust = TrustConfig(mode="static", static_tokens=(STATIC_TOKEN,))
    client = _app(tmp_path, trust=trust).test_client()
    field_overhead = len("Authorization") + len(": ") + len("\r\n")
    fits = "Bearer " + "x" * (MAX_HEADER_FIELD_BYTES - field_overhead - len("Bearer "))

    too_large = client.post(_patient_op(), headers={"Authorization": fits + "x"})
    just_fits = client.post(_patient_op(), headers={"Authorization": fits})

    diagnostics = _outcome(too_large, 431, "too-long")
    assert f"exceeds the limit of {MAX_HEADER_FIELD_BYTES} bytes" in diagnostics
    assert "WWW-Authenticate" not in too_large.headers
    _outcome(just_fits, 401, "login")


def test_too_many_header_fields_are_431(tmp_path: Path) -> None:
    client = _app(tmp_path).test_client()
    headers = {f"X-Filler-{n}": "1" for n in range(101)}

    _outcome(client.get("/healthz", headers=headers), 431, "too-long")
