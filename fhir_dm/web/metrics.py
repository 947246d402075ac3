"""`GET /metrics`: the Prometheus exposition, and the per-request samples behind it.

Every request is counted by method, URL rule (the template, `/Patient/<id>/...`, never the
path) and status, and timed into a histogram. The endpoint authenticates like the operations
(a bearer token under `trust.*`), so Prometheus scrapes with a static token. See
docs/metrics.md for the metrics and example alert rules.
"""

from __future__ import annotations

import time
from contextlib import suppress
from typing import TYPE_CHECKING

from flask import Blueprint, Flask, Response, g, request

from fhir_dm.common.metrics import (
    CONTENT_TYPE,
    HTTP_LATENCY,
    HTTP_REQUESTS,
    QueueCollector,
    exposition,
)
from fhir_dm.web.logs import UNMATCHED_ROUTE
from fhir_dm.web.operations import authenticate
from fhir_dm.web.settings import Service, current_service

if TYPE_CHECKING:
    from fhir_dm.events.queue import Runtime

bp = Blueprint("metrics", __name__)

METRICS_PATH = "/metrics"


def _start() -> None:
    g.metrics_started = time.perf_counter()


def _observe(response: Response) -> Response:
    rule = request.url_rule.rule if request.url_rule is not None else UNMATCHED_ROUTE
    started = g.get("metrics_started")
    HTTP_REQUESTS.labels(method=request.method, route=rule, status=str(response.status_code)).inc()
    if started is not None:
        HTTP_LATENCY.labels(method=request.method, route=rule).observe(
            time.perf_counter() - started
        )
    return response


def _queue_counts(service: Service) -> tuple[int, int] | None:
    """(tasks waiting, dead letters) of the job queue; None when it cannot be read."""
    from fhir_dm.common.errors import FhirDmError
    from fhir_dm.events.queue import QUEUE_ERRORS, Jobs, open_huey_checked

    settings = service.settings.jobs
    assert settings is not None
    try:
        jobs = Jobs(open_huey_checked(settings), settings, _no_runtime)
    except FhirDmError:
        return None
    try:
        return int(jobs.huey.pending_count()), len(jobs.dead_letters())
    except QUEUE_ERRORS:
        return None
    finally:
        with suppress(Exception):
            jobs.close()


def _no_runtime() -> Runtime:
    raise RuntimeError("a metrics scrape runs no task")


@bp.get(METRICS_PATH)
def metrics() -> Response:
    """Every metric of this host's service processes (and workers sharing their directory)."""
    service = current_service()
    authenticate(service)
    extra = []
    if service.settings.jobs is not None:
        extra.append(QueueCollector(lambda: _queue_counts(service)))
    response = Response(exposition(extra), content_type=CONTENT_TYPE)
    response.headers["Cache-Control"] = "no-store"
    return response


def init_app(app: Flask) -> None:
    """Count and time every request; serve /metrics."""
    app.before_request(_start)
    app.after_request(_observe)
    app.register_blueprint(bp)
