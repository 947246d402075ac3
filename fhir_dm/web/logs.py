"""Structured JSON log lines with a request id; never patient data, bodies, ids or tokens."""

from __future__ import annotations

import logging
import re
import sys
import time
import traceback
import uuid
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from typing import Any, TextIO

from flask import Flask, Response, g, request
from pythonjsonlogger.json import JsonFormatter as _LibraryJsonFormatter

REQUEST_ID_HEADER = "X-Request-ID"
# An incoming id is kept only if it is short and plain: it is echoed into logs and headers.
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
# Fields a record may carry (via `extra=`) that the formatter writes out.
EXTRA_FIELDS = ("method", "route", "status", "duration_ms", "error")
UNMATCHED_ROUTE = "-"
# The WSGI environ key that hands the URL rule to gunicorn's access log (`%({fhir_dm.route}e)s`
# in fhir_dm.web.gunicorn_conf), which must never log the concrete path.
ROUTE_ENVIRON_KEY = "fhir_dm.route"
# Libraries that log full URLs (patient ids, query values) below WARNING: kept at WARNING.
URL_LOGGING_LIBRARIES = ("urllib3", "werkzeug")

access_log = logging.getLogger("fhir_dm.web.access")
_request_id: ContextVar[str | None] = ContextVar("fhir_dm_request_id", default=None)


def current_request_id() -> str | None:
    """The id of the request being handled in this context, if any."""
    return _request_id.get()


class RequestIdFilter(logging.Filter):
    """Stamps every record with the current request id (also records of the FHIR client)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = _request_id.get()
        return True


class JsonFormatter(_LibraryJsonFormatter):
    """One JSON object per line; exceptions as type and stack frames, never their message.

    python-json-logger does the serialising; this class only decides the fields: a fixed
    allow-list (EXTRA_FIELDS), never whatever else a record carries, and an exception's
    summary instead of its text, since that text may quote the data that caused it. Used by
    the service's handler and, through `logconfig_dict`, by gunicorn's own log.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, json_default=str, json_ensure_ascii=False, **kwargs)

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        log_data["time"] = datetime.fromtimestamp(record.created, UTC).isoformat(
            timespec="milliseconds"
        )
        log_data["level"] = record.levelname
        log_data["logger"] = record.name
        log_data["message"] = record.getMessage()
        request_id = getattr(record, "request_id", None)
        if request_id:
            log_data["request_id"] = request_id
        for name in EXTRA_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                log_data[name] = value
        if record.exc_info and record.exc_info[0] is not None:
            log_data["exception"] = exception_summary(record.exc_info[1])

    def formatException(self, ei: Any) -> str:
        """Never the traceback's text (add_fields writes the summary instead)."""
        return ""


def exception_summary(exc: BaseException | None) -> dict[str, Any]:
    """The exception's class and frames (file, line, function); no message, no locals."""
    if exc is None:
        return {}
    frames = traceback.extract_tb(exc.__traceback__)
    return {
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "frames": [f"{f.filename}:{f.lineno} in {f.name}" for f in frames],
    }


class _ServiceHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler this module installed, so configuring twice does not add another."""


def configure_logging(level: str, *, stream: TextIO | None = None) -> logging.Handler:
    """Send every log record as a JSON line to stderr (or `stream`), at `level` and above."""
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, _ServiceHandler)), None)
    if handler is None:
        handler = _ServiceHandler(stream if stream is not None else sys.stderr)
        handler.setFormatter(JsonFormatter())
        handler.addFilter(RequestIdFilter())
        root.addHandler(handler)
    elif stream is not None:
        handler.setStream(stream)
    root.setLevel(level)
    for name in URL_LOGGING_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)
    return handler


def _request_id_from(header: str | None) -> str:
    if header and _SANE_REQUEST_ID.fullmatch(header):
        return header
    return uuid.uuid4().hex


def _start_request() -> None:
    g.request_started = time.perf_counter()
    g.request_id = _request_id_from(request.headers.get(REQUEST_ID_HEADER))
    g.request_id_token = _request_id.set(g.request_id)


def _finish_request(response: Response) -> Response:
    """Echo the request id and write the access line: the URL rule, never the concrete path."""
    request_id = g.get("request_id")
    if request_id:
        response.headers[REQUEST_ID_HEADER] = request_id
    rule = request.url_rule.rule if request.url_rule is not None else UNMATCHED_ROUTE
    request.environ[ROUTE_ENVIRON_KEY] = rule
    started = g.get("request_started", time.perf_counter())
    elapsed_ms = round((time.perf_counter() - started) * 1000, 1)
    access_log.info(
        "request",
        extra={
            "method": request.method,
            "route": rule,
            "status": response.status_code,
            "duration_ms": elapsed_ms,
        },
    )
    return response


def _end_request(_exc: BaseException | None) -> None:
    token: Token[str | None] | None = g.pop("request_id_token", None)
    if token is not None:
        try:
            _request_id.reset(token)
        except ValueError:  # torn down in another context: just forget the id
            _request_id.set(None)


def init_app(app: Flask) -> None:
    """Give every request an id and one access log line."""
    app.before_request(_start_request)
    app.after_request(_finish_request)
    app.teardown_request(_end_request)
