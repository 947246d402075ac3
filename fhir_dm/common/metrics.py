"""Prometheus metrics of the service and its queue workers: what operators watch.

Labels hold only route templates, status codes, outcomes and error classes, never a patient
id, path or query value. Under gunicorn every worker writes its samples to files in
`PROMETHEUS_MULTIPROC_DIR` (set up by `fhir_dm.web.gunicorn_conf`), and a scrape adds them up;
a `fhir-dm worker` on the same host given the same directory adds its assessments, writes and
notification-to-plan lag. Queue depth and dead letters are read from the queue at scrape time.

    fhir_dm_http_requests_total{method,route,status}
    fhir_dm_http_request_duration_seconds{method,route}            histogram
    fhir_dm_assessments_total{outcome}   previewed | written | unchanged | refused | failed
    fhir_dm_fhir_errors_total{error}     the UpstreamError class of a failed FHIR call
    fhir_dm_notification_to_plan_seconds                            histogram
    fhir_dm_queue_depth, fhir_dm_dead_letters                       gauges (scrape time)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from fhir_dm.common.errors import (
    AuthError,
    ConflictError,
    FhirDmError,
    InputError,
    PatientNotFoundError,
    UpstreamRejectedError,
)

MULTIPROC_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST
# Seconds: a preview answers in well under one; a clinic call or a measure may take the deadline.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0)
# From a notification to the plan written: a queue wait, a debounce, retries with backoff.
LAG_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 6 * 3600.0, 24 * 3600.0)
# A write the checks or the server refused (retrying as-is would not help) vs. one that failed.
REFUSED_ERRORS: tuple[type[FhirDmError], ...] = (
    InputError,
    ConflictError,
    AuthError,
    PatientNotFoundError,
    UpstreamRejectedError,
)

HTTP_REQUESTS = Counter(
    "fhir_dm_http_requests",
    "HTTP requests answered, by method, URL rule and status.",
    ("method", "route", "status"),
)
HTTP_LATENCY = Histogram(
    "fhir_dm_http_request_duration_seconds",
    "Time to answer an HTTP request, by method and URL rule.",
    ("method", "route"),
    buckets=LATENCY_BUCKETS,
)
ASSESSMENTS = Counter(
    "fhir_dm_assessments",
    "Patient assessments by outcome: previewed, written, unchanged, refused, failed.",
    ("outcome",),
)
FHIR_ERRORS = Counter(
    "fhir_dm_fhir_errors",
    "Failed calls to the FHIR server, by error class.",
    ("error",),
)
NOTIFICATION_LAG = Histogram(
    "fhir_dm_notification_to_plan_seconds",
    "Time from a notified change (its re-assessment requested) to the plan written.",
    buckets=LAG_BUCKETS,
)

T = TypeVar("T")


def outcome_of_error(exc: BaseException) -> str:
    """`refused` or `failed`, for an assessment that raised `exc`."""
    return "refused" if isinstance(exc, REFUSED_ERRORS) else "failed"


@contextmanager
def counting_assessment() -> Iterator[Callable[[str], None]]:
    """Count one assessment: the body reports its status; an exception counts by its class."""
    done: list[str] = []
    try:
        yield done.append
    except BaseException as exc:
        ASSESSMENTS.labels(outcome=outcome_of_error(exc)).inc()
        raise
    outcome = done[-1] if done else "failed"
    ASSESSMENTS.labels(outcome="previewed" if outcome == "preview" else outcome).inc()


class QueueCollector(Collector):
    """Queue depth and dead letters, read from the queue's storage when scraped."""

    def __init__(self, read: Callable[[], tuple[int, int] | None]) -> None:
        self._read = read

    def collect(self) -> Iterable[GaugeMetricFamily]:
        counts = self._read()
        up = GaugeMetricFamily("fhir_dm_queue_up", "1 when the job queue's storage answered.")
        up.add_metric([], 0.0 if counts is None else 1.0)
        yield up
        if counts is None:
            return
        depth, dead = counts
        yield GaugeMetricFamily(
            "fhir_dm_queue_depth", "Tasks waiting in the job queue.", value=float(depth)
        )
        yield GaugeMetricFamily(
            "fhir_dm_dead_letters", "Re-assessments that failed for good.", value=float(dead)
        )


def exposition(extra: Iterable[Collector] = ()) -> bytes:
    """The text exposition of every metric: of all gunicorn workers when multiprocess."""
    if os.environ.get(MULTIPROC_VARIABLE):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry = CollectorRegistry()
        registry.register(_Default())
    for collector in extra:
        registry.register(collector)
    return generate_latest(registry)


class _Default(Collector):
    """The process's own default registry, inside a registry of this scrape."""

    def collect(self) -> Iterable[object]:  # type: ignore[override]
        return REGISTRY.collect()
