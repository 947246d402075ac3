"""Per-request bounds: a deadline, header sizes, patients per request, response size.

One worker thread serves one request; these keep any single request from holding it past the
server's worker timeout or from growing it past a sane size. Requests over a work limit are
refused before the work starts, with an OperationOutcome naming the limit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Flask, g, request

from fhir_dm.common import deadline as deadlines
from fhir_dm.common.deadline import Deadline
from fhir_dm.common.errors import HeaderTooLargeError, TooCostlyError
from fhir_dm.web.http_limits import MAX_HEADER_FIELD_BYTES, MAX_HEADER_FIELDS
from fhir_dm.web.settings import current_service

LARGER_WORK = (
    "assess larger populations offline (`fhir-dm assess`) or split the Bundle into several requests"
)


def check_headers() -> None:
    """431 for an oversized header field or too many fields, before anything reads them.

    Runs before authentication: an oversized token is a framing problem, not a failed login.
    """
    headers = list(request.headers.items())
    if len(headers) > MAX_HEADER_FIELDS:
        raise HeaderTooLargeError(f"the request has more than {MAX_HEADER_FIELDS} header fields")
    for name, value in headers:
        if len(name) + len(value) + 4 > MAX_HEADER_FIELD_BYTES:
            raise HeaderTooLargeError(
                f"request header field {name} exceeds the limit of {MAX_HEADER_FIELD_BYTES} bytes"
            )


def count_patients(data: Any) -> int:
    """How many Patients a Bundle (or a single resource) holds, read off the raw JSON.

    Counts what the core would assess (each entry whose resource is a Patient), without
    validating anything, so an oversized request is refused before the costly part.
    """
    if not isinstance(data, Mapping):
        return 0
    if data.get("resourceType") != "Bundle":
        return 1 if data.get("resourceType") == "Patient" else 0
    entries = data.get("entry")
    if not isinstance(entries, list):
        return 0
    return sum(
        1
        for entry in entries
        if isinstance(entry, Mapping)
        and isinstance(entry.get("resource"), Mapping)
        and entry["resource"].get("resourceType") == "Patient"
    )


def check_patient_count(data: Any, limit: int) -> None:
    """413 too-costly when a posted Bundle holds more Patients than one request may assess."""
    count = count_patients(data)
    if count > limit:
        raise TooCostlyError(
            f"the Bundle holds {count} patients; max_patients_per_request is {limit}: {LARGER_WORK}"
        )


def check_response_size(size: int, limit: int) -> None:
    """413 too-costly when the answer would exceed max_response_bytes."""
    if size > limit:
        raise TooCostlyError(
            f"the response would be {size} bytes; max_response_bytes is {limit}: {LARGER_WORK}"
        )


def _start_request() -> None:
    """Check the headers and start the request's clock (see fhir_dm.common.deadline)."""
    seconds = current_service().settings.request_deadline_seconds
    g.deadline_token = deadlines.enter(Deadline.after(seconds))
    check_headers()


def _end_request(_exc: BaseException | None) -> None:
    token = g.pop("deadline_token", None)
    if token is not None:
        deadlines.leave(token)


def init_app(app: Flask) -> None:
    """Give every request a deadline and check its headers first."""
    app.before_request(_start_request)
    app.teardown_request(_end_request)
