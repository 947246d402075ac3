"""Every failure becomes an OperationOutcome; request guards (size, media type, JSON) raise them."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fhir.resources.R4B.operationoutcome import OperationOutcome
from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from fhir_dm.common.errors import (
    AuthError,
    FhirDmError,
    ForbiddenError,
    NotJsonError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from fhir_dm.web.logs import current_request_id, exception_summary

FHIR_JSON = "application/fhir+json"
FHIR_JSON_UTF8 = f"{FHIR_JSON}; charset=utf-8"
JSON_MEDIA_TYPES = frozenset({FHIR_JSON, "application/json"})
READ_CHUNK_BYTES = 64 * 1024
# FHIR issue types for errors werkzeug raises itself (routing, body limits).
HTTP_ISSUE_CODES = {
    400: "invalid",
    401: "login",
    403: "forbidden",
    404: "not-found",
    405: "not-supported",
    406: "not-supported",
    408: "timeout",
    413: "too-long",
    415: "not-supported",
    429: "throttled",
    431: "too-long",
}

_log = logging.getLogger(__name__)

Json = dict[str, Any]


def issue(severity: str, code: str, diagnostics: str, *, expression: Sequence[str] = ()) -> Json:
    """One OperationOutcome.issue."""
    item: Json = {"severity": severity, "code": code, "diagnostics": diagnostics}
    if expression:
        item["expression"] = list(expression)
    return item


def outcome_of(issues: Sequence[Json]) -> Json:
    """An OperationOutcome of the given issues, validated as R4B."""
    outcome: Json = {"resourceType": "OperationOutcome", "issue": list(issues)}
    OperationOutcome.model_validate(outcome)
    return outcome


def operation_outcome(
    severity: str, code: str, diagnostics: str, *, expression: Sequence[str] = ()
) -> Json:
    """A one-issue OperationOutcome, validated as R4B."""
    return outcome_of([issue(severity, code, diagnostics, expression=expression)])


def fhir_json(resource: Mapping[str, Any]) -> bytes:
    """A resource as compact UTF-8 JSON, keys in the order built."""
    return json.dumps(resource, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def fhir_response(
    resource: Mapping[str, Any] | bytes,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """A FHIR JSON response; `resource` may already be serialised by `fhir_json`."""
    body = resource if isinstance(resource, bytes) else fhir_json(resource)
    return Response(body, status=status, content_type=FHIR_JSON_UTF8, headers=dict(headers or {}))


def outcome_response(
    status: int,
    code: str,
    diagnostics: str,
    *,
    expression: Sequence[str] = (),
    headers: Mapping[str, str] | None = None,
) -> Response:
    """An error response: an OperationOutcome with one `error` issue."""
    outcome = operation_outcome("error", code, diagnostics, expression=expression)
    return fhir_response(outcome, status, headers)


def _handle_fhir_dm_error(exc: FhirDmError) -> Response:
    """Status and issue code come from the error class; the message is written for callers."""
    headers: dict[str, str] = {}
    if isinstance(exc, ForbiddenError):
        headers["WWW-Authenticate"] = 'Bearer error="insufficient_scope"'
    elif isinstance(exc, AuthError):
        headers["WWW-Authenticate"] = "Bearer"
    if exc.retry_after is not None:
        headers["Retry-After"] = str(exc.retry_after)
    # Only the class goes to the log: an upstream server's quoted diagnostics may name ids.
    _log.warning("request failed", extra={"status": exc.status, "error": type(exc).__name__})
    return outcome_response(
        exc.status, exc.issue_code, exc.message, expression=exc.expression, headers=headers
    )


def _handle_http_exception(exc: HTTPException) -> Response:
    """Routing and protocol errors (404, 405, 413, ...) in the same shape as ours."""
    status = exc.code or 500
    code = HTTP_ISSUE_CODES.get(status, "exception" if status >= 500 else "invalid")
    headers: dict[str, str] = {}
    allowed = getattr(exc, "valid_methods", None)
    if status == 405 and allowed:
        headers["Allow"] = ", ".join(allowed)
    return outcome_response(status, code, f"{status} {exc.name}", headers=headers)


def _handle_unexpected(exc: Exception) -> Response:
    """Last resort: log where it happened, tell the caller only the request id."""
    if isinstance(exc, HTTPException):  # pragma: no cover - routed to its own handler
        return _handle_http_exception(exc)
    request_id = current_request_id() or "unknown"
    _log.error(
        "internal error",
        extra={"status": 500, "error": exception_summary(exc)},
    )
    return outcome_response(500, "exception", f"internal error (request id {request_id})")


def init_app(app: Flask) -> None:
    """Register the handlers on the app, not a blueprint: blueprints miss routing 404/405."""
    app.register_error_handler(FhirDmError, _handle_fhir_dm_error)
    app.register_error_handler(HTTPException, _handle_http_exception)
    app.register_error_handler(Exception, _handle_unexpected)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def check_content_length(max_bytes: int) -> None:
    """Refuse a declared-too-large body before reading a byte of it."""
    length = request.content_length
    if length is not None and length > max_bytes:
        raise PayloadTooLargeError(f"request body exceeds the limit of {max_bytes} bytes")


def check_media_type() -> None:
    """Only FHIR JSON (or plain JSON), in UTF-8."""
    if request.mimetype not in JSON_MEDIA_TYPES:
        raise UnsupportedMediaTypeError(
            "Content-Type must be application/fhir+json or application/json"
        )
    charset = request.mimetype_params.get("charset")
    if charset is not None and charset.lower().replace("_", "-") not in ("utf-8", "utf8"):
        raise UnsupportedMediaTypeError("the request body must be UTF-8")


def _read_body(max_bytes: int) -> bytes:
    """Read at most `max_bytes`, failing as soon as there is more (chunked bodies too).

    Werkzeug's own limit on an unsized stream stops reading at the limit without an error,
    which would hand a truncated body to the JSON parser.
    """
    stream = request.stream
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = stream.read(min(READ_CHUNK_BYTES, max_bytes + 1 - total))
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > max_bytes:
            raise PayloadTooLargeError(f"request body exceeds the limit of {max_bytes} bytes")
        chunks.append(chunk)


def _utf8_text(data: bytes) -> str:
    """The body as UTF-8 text (a leading byte order mark is ignored, as RFC 8259 allows).

    `json.loads` on bytes would also guess UTF-16 and UTF-32; the service takes UTF-8 only,
    so anything else is a malformed body (400), whatever the Content-Type claimed.
    """
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in data:
        raise NotJsonError("the request body is not UTF-8 text (UTF-16 or UTF-32 is not accepted)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise NotJsonError("the request body is not UTF-8 text") from None


def read_json_body(max_bytes: int, *, required: bool = True) -> Any:
    """The request body as JSON; None when empty and not `required`.

    Order matters: size first (declared, then actual), then media type, then parsing, so an
    oversized or wrongly typed body is never parsed.
    """
    check_content_length(max_bytes)
    if not required and not request.content_length and not request.headers.get("Transfer-Encoding"):
        return None
    check_media_type()
    data = _read_body(max_bytes)
    if not data.strip():
        if required:
            raise NotJsonError("the request body is empty")
        return None
    text = _utf8_text(data)
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise NotJsonError(
            f"the request body is not JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from None
    except ValueError as exc:
        raise NotJsonError(f"the request body is not JSON: {exc}") from None
    except RecursionError:
        raise NotJsonError("the request body is nested too deeply") from None
