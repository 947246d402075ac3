"""Tests of FhirClient against a faked FHIR server: paging, retries, error mapping, logging."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import requests
import responses
from responses import matchers

from fhir_dm.common.errors import (
    InputError,
    UpstreamError,
    UpstreamRejectedError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from fhir_dm.fhir import (
    AuthConfig,
    BearerAuth,
    FhirClient,
    FhirServerConfig,
    RetryPolicy,
    client_from_config,
    upstream_status,
)

BASE = "https://fhir.example.org/r4"
PATIENT_ID = "pat-8f3a91"
NOW = datetime(2024, 3, 5, 9, 30, tzinfo=UTC).timestamp()
CONDITIONAL_BUNDLE: dict[str, Any] = {
    "resourceType": "Bundle",
    "type": "transaction",
    "entry": [
        {
            "resource": {"resourceType": "CarePlan", "status": "active"},
            "request": {"method": "POST", "url": "CarePlan", "ifNoneExist": "identifier=s|1"},
        }
    ],
}
PLAIN_BUNDLE: dict[str, Any] = {
    "resourceType": "Bundle",
    "type": "transaction",
    "entry": [
        {
            "resource": {"resourceType": "RiskAssessment", "status": "final"},
            "request": {"method": "POST", "url": "RiskAssessment"},
        }
    ],
}
TRANSACTION_RESPONSE = {"resourceType": "Bundle", "type": "transaction-response", "entry": []}


@pytest.fixture
def rsps() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock() as mock:
        yield mock


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def client(sleeps: list[float]) -> Iterator[FhirClient]:
    with FhirClient(
        BASE,
        timeout=(2.0, 9.0),
        retry=RetryPolicy(max_retries=3, backoff_factor=0.5, max_backoff=30.0),
        page_size=50,
        max_pages=5,
        sleep=sleeps.append,
        clock=lambda: NOW,
    ) as fhir:
        yield fhir


def searchset(resources: list[dict[str, Any]], next_url: str | None = None) -> dict[str, Any]:
    links = [{"relation": "self", "url": f"{BASE}/Observation"}]
    if next_url:
        links.append({"relation": "next", "url": next_url})
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "link": links,
        "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources],
    }


def observation(n: int) -> dict[str, Any]:
    return {"resourceType": "Observation", "id": f"obs-{n}", "status": "final"}


def outcome(diagnostics: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "processing", "diagnostics": diagnostics}],
    }


def test_search_follows_next_links_and_sets_count(
    client: FhirClient, rsps: responses.RequestsMock
) -> None:
    page2 = f"{BASE}?_getpages=abc&_getpagesoffset=50&_count=50"
    page3 = f"{BASE}?_getpages=abc&_getpagesoffset=100&_count=50"
    rsps.get(
        f"{BASE}/Observation",
        json=searchset([observation(1), observation(2)], page2),
        match=[matchers.query_param_matcher({"subject": "Patient/1", "_count": "50"})],
    )
    rsps.get(page2, json=searchset([observation(3)], page3))
    rsps.get(page3, json=searchset([observation(4)]))

    found = client.search("Observation", {"subject": "Patient/1"})

    assert [r["id"] for r in found] == ["obs-1", "obs-2", "obs-3", "obs-4"]
    assert len(rsps.calls) == 3


def test_search_keeps_callers_count_and_repeats_list_params(
    client: FhirClient, rsps: responses.RequestsMock
) -> None:
    rsps.get(f"{BASE}/Condition", json=searchset([]))

    client.search("Condition", {"_count": "10", "code": ["a", "b"], "patient": "1"})

    assert rsps.calls[0].request.url == f"{BASE}/Condition?_count=10&code=a&code=b&patient=1"


def test_search_returns_includes_but_not_outcomes(
    client: FhirClient, rsps: responses.RequestsMock
) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [
            {"resource": {"resourceType": "Condition", "id": "c"}},
            {"resource": {"resourceType": "Patient", "id": "p"}, "search": {"mode": "include"}},
            {"resource": outcome("slow query"), "search": {"mode": "outcome"}},
        ],
    }
    rsps.get(f"{BASE}/Condition", json=bundle)

    assert [r["id"] for r in client.search("Condition", {"patient": "p"})] == ["c", "p"]


def test_next_link_to_another_host_is_refused(
    client: FhirClient, rsps: responses.RequestsMock
) -> None:
    rsps.get(
        f"{BASE}/Observation",
        json=searchset([observation(1)], "https://evil.example.com/r4?_getpages=abc"),
    )

    with pytest.raises(UpstreamError, match="another host") as excinfo:
        client.search("Observation", {"subject": "Patient/1"})

    assert len(rsps.calls) == 1
    assert "evil" not in str(excinfo.value)


@pytest.mark.parametrize(
    "next_url",
    [
        "https://evil.example\\@fhir.example.org/r4?_getpages=abc",
        "https://user@fhir.example.org/r4?_getpages=abc",
        "https://evil.example%40fhir.example.org/r4?_getpages=abc",
    ],
)
def test_next_link_that_parsers_read_differently_is_refused(
    client: FhirClient, rsps: responses.RequestsMock, next_url: str
) -> None:
    rsps.get(f"{BASE}/Observation", json=searchset([observation(1)], next_url))

    with pytest.raises(UpstreamError, match="another host"):
        client.search("Observation", {"subject": "Patient/1"})

    assert len(rsps.calls) == 1


def test_paging_stops_at_max_pages(client: FhirClient, rsps: responses.RequestsMock) -> None:
    rsps.get(f"{BASE}/Observation", json=searchset([observation(0)], f"{BASE}?page=1"))
    for n in range(1, 5):
        rsps.get(f"{BASE}?page={n}", json=searchset([observation(n)], f"{BASE}?page={n + 1}"))

    with pytest.raises(UpstreamError, match=r"paging limit exceeded \(5 pages\)"):
        client.search("Observation", {"subject": "Patient/1"})

    assert len(rsps.calls) == 5


@pytest.mark.parametrize("status", [404, 410])
def test_read_of_a_missing_resource_is_none(
    client: FhirClient, rsps: responses.RequestsMock, status: int
) -> None:
    rsps.get(f"{BASE}/Patient/{PATIENT_ID}", status=status, json=outcome("not found"))

    assert client.read("Patient", PATIENT_ID) is None


def test_read_sends_fhir_accept_and_both_timeouts(
    client: FhirClient, rsps: responses.RequestsMock
) -> None:
    rsps.get(f"{BASE}/Patient/{PATIENT_ID}", json={"resourceType": "Patient", "id": PATIENT_ID})

    assert client.read("Patient", PATIENT_ID) == {"resourceType": "Patient", "id": PATIENT_ID}
    request = rsps.calls[0].request
    assert request.headers["Accept"] == "application/fhir+json"
    assert "Content-Type" not in request.headers
    assert request.req_kwargs["timeout"] == (2.0, 9.0)  # type: ignore[attr-defined]


def test_read_refuses_an_id_that_would_change_the_path(client: FhirClient) -> None:
    with pytest.raises(InputError, match="must be a FHIR id") as excinfo:
        client.read("Patient", "../metadata")

    assert "metadata" not in str(excinfo.value)


@pytest.mark.parametrize(
    "timeout", [requests.exceptions.ConnectTimeout(), requests.exceptions.ReadTimeout()]
)
def test_timeouts_are_retried_then_raise_504(
    client: FhirClient,
    rsps: responses.RequestsMock,
    sleeps: list[float],
    timeout: requests.Timeout,
) -> None:
    rsps.get(f"{BASE}/Patient/{PATIENT_ID}", body=timeout)

    with pytest.raises(UpstreamTimeoutError, match=r"^GET Patient/\{id\} timed out$") as excinfo:
        client.read("Patient", PATIENT_ID)

    assert excinfo.value.status == 504
    assert len(rsps.calls) == 4
    assert sleeps == [0.5, 1.0, 2.0]


def test_connection_error_is_retried_then_raises_upstream_error(
    client: FhirClient, rsps: responses.RequestsMock, sleeps: list[float]
) -> None:
    rsps.get(f"{BASE}/metadata", body=requests.exceptions.ConnectionError())

    with pytest.raises(UpstreamError, match="GET metadata failed: cannot connect") as excinfo:
        client.capabilities()

    assert type(excinfo.value) is UpstreamError
    assert len(sleeps) == 3


def test_503_then_200_succeeds(
    client: FhirClient, rsps: responses.RequestsMock, sleeps: list[float]
) -> None:
    url = f"{BASE}/Patient/{PATIENT_ID}"
    rsps.get(url, status=503)
    rsps.get(url, json={"resourceType": "Patient", "id": PATIENT_ID})

    assert client.read("Patient", PATIENT_ID) is not None
    assert sleeps == [0.5]


def test_429_honours_retry_after_seconds(
    client: FhirClient, rsps: responses.RequestsMock, sleeps: list[float]
) -> None:
    rsps.get(f"{BASE}/metadata", status=429, headers={"Retry-After": "2"})
    rsps.get(f"{BASE}/metadata", json={"resourceType": "CapabilityStatement"})

    client.capabilities()

    assert sleeps == [2.0]


def test_429_honours_retry_after_http_date(
    client: FhirClient, rsps: responses.RequestsMock, sleeps: list[float]
) -> None:
    rsps.get(
        f"{BASE}/metadata", status=429, headers={"Retry-After": "Tue, 05 Mar 2024 09:30:04 GMT"}
    )
    rsps.get(f"{BASE}/metadata", json={"resourceType": "CapabilityStatement"})

    client.capabilities()

    assert sleeps == [4.0]


def test_capabilities_without_retry_fails_at_once(
    client: FhirClient, rsps: responses.RequestsMock, sleeps: list[float]
) -> None:
    rsps.get(f"{BASE}/metadata", status=503)

    with pytest.raises(UpstreamError, match="GET metadata failed: HTTP 503"):
        client.capabilities(retry=False)

    assert sleeps == []


def test_gateway_timeout_after_retries_is_an_upstream_timeout(
    client: FhirClient, rsps: responses.RequestsMock
) -> None:
    rsps.get(f"{BASE}/metadata", status=504)

    with pytest.raises(UpstreamTimeoutError, match="GET metadata failed: HTTP 504") as excinfo:
        client.capabilities()

    assert upstream_status(excinfo.value) == 504
    assert len(rsps.calls) == 4


def test_5xx_after_retries_names_the_call_without_ids(
    client: FhirClient, rsps: responses.RequestsMock
) -> None:
    rsps.get(f"{BASE}/Patient/{PATIENT_ID}", status=503, json=outcome(f"Patient/{PATIENT_ID}"))

    with pytest.raises(UpstreamError) as excinfo:
        client.read("Patient", PATIENT_ID)

    assert str(excinfo.value) == "GET Patient/{id} failed: HTTP 503"
    assert type(excinfo.value) is UpstreamUnavailableError  # 503, not quoting the read's body
    assert excinfo.value.status == 503 and excinfo.value.retry_after is None
    assert upstream_status(excinfo.value) == 503
    assert len(rsps.calls) == 4


def test_search_errors_contain_no_query_values(
    client: FhirClient, rsps: responses.RequestsMock, sleeps: list[float]
) -> None:
    rsps.get(f"{BASE}/Observation", status=400, json=outcome(f"bad subject {PATIENT_ID}"))

    with pytest.raises(UpstreamRejectedError) as excinfo:
        client.search("Observation", {"subject": f"Patient/{PATIENT_ID}"})

    assert str(excinfo.value) == "GET Observation?… failed: HTTP 400"
    assert PATIENT_ID not in str(excinfo.value)
    assert sleeps == []


def test_logs_name_method_type_and_status_but_no_ids(
    client: FhirClient, rsps: responses.RequestsMock, caplog: pytest.LogCaptureFixture
) -> None:
    rsps.get(f"{BASE}/Patient/{PATIENT_ID}", status=503)
    rsps.get(f"{BASE}/Patient/{PATIENT_ID}", json={"resourceType": "Patient", "id": PATIENT_ID})
    caplog.set_level(logging.DEBUG, logger="fhir_dm")

    client.read("Patient", PATIENT_ID)

    messages = [record.getMessage() for record in caplog.records]
    assert any(m.startswith("FHIR GET Patient -> 200 in ") for m in messages)
    assert any("FHIR GET Patient -> 503; retry 1 of 3" in m for m in messages)
    assert not any(PATIENT_ID in m for m in messages)


def test_non_idempotent_transaction_is_not_retried(
    client: FhirClient, rsps: responses.RequestsMock, sleeps: list[float]
) -> None:
    rsps.post(BASE, status=500, json=outcome("database unavailable"))

    with pytest.raises(UpstreamRejectedError, match="HTTP 500: database unavailable"):
        client.transaction(PLAIN_BUNDLE, idempotent=False)

    assert len(rsps.calls) == 1
    assert sleeps == []


def test_non_idempotent_transaction_is_not_retried_on_timeout(
    client: FhirClient, rsps: responses.RequestsMock, sleeps: list[float]
) -> None:
    rsps.post(BASE, body=requests.exceptions.ReadTimeout())

    with pytest.raises(UpstreamTimeoutError, match="POST transaction bundle timed out"):
        client.transaction(PLAIN_BUNDLE, idempotent=False)

    assert len(rsps.calls) == 1


def test_transaction_redirect_is_not_followed(
    client: FhirClient, rsps: responses.RequestsMock
) -> None:
    rsps.post(BASE, status=302, headers={"Location": f"{BASE}/elsewhere"})

    with pytest.raises(UpstreamRejectedError, match="POST transaction bundle failed: HTTP 302"):
        client.transaction(PLAIN_BUNDLE, idempotent=False)

    assert len(rsps.calls) == 1


def test_idempotent_transaction_is_retried_on_503(
    client: FhirClient, rsps: responses.RequestsMock, sleeps: list[float]
) -> None:
    rsps.post(BASE, status=503)
    rsps.post(BASE, json=TRANSACTION_RESPONSE)

    assert client.transaction(CONDITIONAL_BUNDLE, idempotent=True) == TRANSACTION_RESPONSE
    assert len(rsps.calls) == 2
    assert sleeps == [0.5]
    request = rsps.calls[1].request
    assert request.headers["Content-Type"] == "application/fhir+json; charset=utf-8"
    assert request.url == BASE
    assert json.loads(request.body or b"") == CONDITIONAL_BUNDLE


def test_idempotent_claim_for_a_plain_write_is_refused(client: FhirClient) -> None:
    with pytest.raises(ValueError, match="non-conditional write"):
        client.transaction(PLAIN_BUNDLE, idempotent=True)


def test_rejected_transaction_quotes_the_operation_outcome(
    client: FhirClient, rsps: responses.RequestsMock
) -> None:
    long_text = "Profile violation: " + "x" * 400
    body = {
        "resourceType": "OperationOutcome",
        "issue": [
            {"severity": "error", "code": "invariant", "diagnostics": "CarePlan.intent missing"},
            {"severity": "error", "code": "invariant", "details": {"text": long_text}},
        ],
    }
    rsps.post(BASE, status=422, json=body)

    with pytest.raises(UpstreamRejectedError) as excinfo:
        client.transaction(CONDITIONAL_BUNDLE, idempotent=True)

    message = str(excinfo.value)
    prefix = "POST transaction bundle failed: HTTP 422: "
    assert message.startswith(prefix + "CarePlan.intent missing; Profile violation: xxx")
    assert len(message) == len(prefix) + 300
    assert message.endswith("…")
    assert upstream_status(excinfo.value) == 422
    assert len(rsps.calls) == 1


@pytest.mark.parametrize(
    "body", ["<html>Bad gateway</html>", '{"id": "no-resource-type"}', "[1, 2]"]
)
def test_malformed_json_is_an_upstream_error(
    client: FhirClient, rsps: responses.RequestsMock, body: str
) -> None:
    rsps.get(f"{BASE}/Patient/{PATIENT_ID}", body=body, content_type="application/fhir+json")

    with pytest.raises(UpstreamError, match=r"^GET Patient/\{id\} returned a body that is not"):
        client.read("Patient", PATIENT_ID)


def test_search_page_that_is_not_a_bundle_is_an_upstream_error(
    client: FhirClient, rsps: responses.RequestsMock
) -> None:
    rsps.get(f"{BASE}/Observation", json=outcome("oops"))

    with pytest.raises(UpstreamError, match="returned OperationOutcome instead of a Bundle"):
        client.search("Observation", {"subject": "Patient/1"})


def test_bearer_token_is_sent(rsps: responses.RequestsMock) -> None:
    rsps.get(f"{BASE}/metadata", json={"resourceType": "CapabilityStatement"})

    with FhirClient(BASE, auth=BearerAuth("t0k3n")) as fhir:
        fhir.capabilities()

    assert rsps.calls[0].request.headers["Authorization"] == "Bearer t0k3n"


def test_reads_and_searches_bypass_server_caches(rsps: responses.RequestsMock) -> None:
    rsps.get(f"{BASE}/Condition", json={"resourceType": "Bundle", "type": "searchset"})

    with FhirClient(BASE) as fhir:
        fhir.search("Condition", {"patient": "p1"})

    assert rsps.calls[0].request.headers["Cache-Control"] == "no-cache"


def test_client_from_config_applies_settings(rsps: responses.RequestsMock) -> None:
    cfg = FhirServerConfig(
        base_url=f"{BASE}/",
        connect_timeout=1.5,
        read_timeout=12,
        page_size=25,
        auth=AuthConfig(kind="bearer", token="t0k3n"),
    )
    rsps.get(f"{BASE}/Condition", json=searchset([]))

    with client_from_config(cfg) as fhir:
        fhir.search("Condition", {"patient": "1"})

    request = rsps.calls[0].request
    assert request.url == f"{BASE}/Condition?patient=1&_count=25"
    assert request.headers["Authorization"] == "Bearer t0k3n"
    assert request.req_kwargs["timeout"] == (1.5, 12.0)  # type: ignore[attr-defined]


def test_server_config_defaults_and_validation() -> None:
    cfg = FhirServerConfig(base_url="http://localhost:8080/fhir")

    assert (cfg.connect_timeout, cfg.read_timeout, cfg.max_retries) == (5.0, 30.0, 3)
    assert (cfg.page_size, cfg.max_pages, cfg.auth.kind) == (200, 100, "none")
    with pytest.raises(ValueError, match="base_url must be an absolute http"):
        FhirServerConfig(base_url="localhost:8080/fhir")


def test_idempotent_transaction_is_repeated_after_a_rolled_back_500(
    rsps: responses.RequestsMock,
) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": {"resourceType": "Patient"},
                "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=a|b"},
            }
        ],
    }
    rolled_back = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "exception"}],
    }
    ok = {"resourceType": "Bundle", "type": "transaction-response", "entry": []}
    rsps.post(BASE, status=500, json=rolled_back)
    rsps.post(BASE, json=ok)
    sleeps: list[float] = []

    with FhirClient(BASE, sleep=sleeps.append) as fhir:
        assert fhir.transaction(bundle, idempotent=True)["type"] == "transaction-response"

    assert len(rsps.calls) == 2 and len(sleeps) == 1
