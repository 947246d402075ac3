"""Tests of the retry policy: backoff, Retry-After, and which transactions may repeat."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from fhir_dm.fhir.retry import RetryPolicy, is_idempotent_bundle, parse_retry_after

NOW = datetime(2024, 3, 5, 9, 30, tzinfo=UTC).timestamp()


def test_delay_grows_exponentially_and_is_capped() -> None:
    policy = RetryPolicy(max_retries=6, backoff_factor=0.5, max_backoff=3.0)

    assert [policy.delay(attempt, None) for attempt in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_retry_after_seconds_beats_backoff_and_is_capped() -> None:
    policy = RetryPolicy(backoff_factor=0.5, max_backoff=30.0)

    assert policy.delay(0, "2") == 2.0
    assert policy.delay(0, "3600") == 30.0


def test_retry_after_http_date_counts_from_now() -> None:
    policy = RetryPolicy(max_backoff=30.0)

    assert policy.delay(0, "Tue, 05 Mar 2024 09:30:07 GMT", now=NOW) == 7.0
    assert policy.delay(0, "Tue, 05 Mar 2024 09:29:00 GMT", now=NOW) == 0.0


@pytest.mark.parametrize("header", [None, "", "soon", "-5", "1.5"])
def test_unreadable_retry_after_falls_back_to_backoff(header: str | None) -> None:
    assert parse_retry_after(header, now=NOW) is None
    assert RetryPolicy(backoff_factor=0.5).delay(1, header, now=NOW) == 1.0


def test_default_retry_statuses_are_the_transient_ones() -> None:
    policy = RetryPolicy()

    assert [s for s in (400, 404, 409, 429, 500, 502, 503, 504) if policy.retries_status(s)] == [
        429,
        502,
        503,
        504,
    ]


def test_bundle_of_conditional_writes_is_idempotent() -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"request": {"method": "POST", "url": "CarePlan", "ifNoneExist": "identifier=s|1"}},
            {"request": {"method": "PUT", "url": "ServiceRequest?identifier=s|2"}},
            {"request": {"method": "PATCH", "url": "CarePlan/7", "ifMatch": 'W/"3"'}},
            {"request": {"method": "GET", "url": "Patient/1"}},
        ],
    }

    assert is_idempotent_bundle(bundle)


@pytest.mark.parametrize(
    "request_",
    [
        {"method": "POST", "url": "RiskAssessment"},
        {"method": "PATCH", "url": "CarePlan/7"},
        None,
    ],
)
def test_bundle_with_a_plain_write_is_not_idempotent(request_: dict[str, str] | None) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"request": {"method": "POST", "url": "CarePlan", "ifNoneExist": "identifier=s|1"}},
            {"request": request_} if request_ else {"resource": {"resourceType": "Patient"}},
        ],
    }

    assert not is_idempotent_bundle(bundle)
