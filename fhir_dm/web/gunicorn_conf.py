"""gunicorn settings of the web service; `fhir-dm serve` and the container use them.

    gunicorn --config python:fhir_dm.web.gunicorn_conf 'fhir_dm.web.wsgi:app'

Options on gunicorn's command line (or GUNICORN_CMD_ARGS) win over these.

- `gthread` workers: a connection that sends its request slowly holds one thread, not a whole
  worker (two slow clients used to freeze a two-worker `sync` instance for its 30 s timeout).
  Threads also suit the work: most of a request is waiting for the FHIR server.
- `timeout` (30 s) stays above the service's own request deadline (`request_deadline_seconds`,
  25 s), so a slow FHIR server gets the service's 503/504 OperationOutcome, never a killed
  worker and an HTML 500.
- Request line and header limits are the ones the app enforces itself (`http_limits`).
- Logs hold no request path or query (patient ids, dates): the access log (off by default,
  since the service writes its own access line; `--access-logfile -` turns it on) logs the
  URL rule, and `RedactingLogger` cuts paths in gunicorn's own messages to their first segment.
- Prometheus metrics are multiprocess: `on_starting` gives the workers a fresh
  `PROMETHEUS_MULTIPROC_DIR` (the operator's, emptied, or a temporary one) before any of them
  imports `prometheus_client`, and `child_exit` marks a dead worker's files, so `/metrics`
  adds up every worker (see docs/metrics.md).
- Every line is JSON: `logconfig_dict` gives gunicorn's own log (start, workers, signals, stop)
  the service's JSON formatter on stderr; the access log's message is already a JSON object
  (`access_log_format`) and is written as it is, on stdout.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from gunicorn.glogging import Logger  # type: ignore[import-untyped]

from fhir_dm.web.http_limits import (
    MAX_HEADER_FIELD_BYTES,
    MAX_HEADER_FIELDS,
    MAX_REQUEST_LINE_BYTES,
)
from fhir_dm.web.logs import ROUTE_ENVIRON_KEY, JsonFormatter

bind = "127.0.0.1:8080"
workers = 2
worker_class = "gthread"
threads = 4
timeout = 30
graceful_timeout = 30
keepalive = 5

limit_request_line = MAX_REQUEST_LINE_BYTES
limit_request_fields = MAX_HEADER_FIELDS
limit_request_field_size = MAX_HEADER_FIELD_BYTES

accesslog = None
errorlog = "-"
# One JSON line per request: method, URL rule (`-` when the app did not route it), status,
# duration and the request id the service echoed. Never %(r)s, %(U)s, %(q)s, %(f)s or headers.
access_log_format = (
    '{"logger": "gunicorn.access", "method": "%(m)s", '
    f'"route": "%({{{ROUTE_ENVIRON_KEY}}}e)s", '
    '"status": "%(s)s", "duration_ms": %(M)s, "request_id": "%({x-request-id}o)s"}'
)

# gunicorn's own loggers through the same JSON formatter as the service's. They do not
# propagate: the workers' root logger holds the service's handler, which would repeat them.
# The root logger gets no handler here for the same reason (the app installs its own).
logconfig_dict: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "root": {"level": "INFO", "handlers": []},
    "loggers": {
        "gunicorn.error": {"level": "INFO", "handlers": ["json_stderr"], "propagate": False},
        "gunicorn.access": {"level": "INFO", "handlers": ["access_stdout"], "propagate": False},
    },
    "handlers": {
        "json_stderr": {
            "class": "logging.StreamHandler",
            "formatter": "json",
            "stream": "ext://sys.stderr",
        },
        "access_stdout": {
            "class": "logging.StreamHandler",
            "formatter": "message_only",
            "stream": "ext://sys.stdout",
        },
    },
    "formatters": {
        "json": {"()": JsonFormatter},
        "message_only": {"format": "%(message)s"},
    },
}

# A slash not preceded by a word character, `.`, `:` or `/` starts a request path: this keeps
# URLs such as http://127.0.0.1:8080 (listening messages) and unix:/path sockets whole.
_PATH = re.compile(r"(?<![\w.:/])/[^\s'\"]*")


def redact_paths(text: str) -> str:
    """Every request path in `text` cut to its first segment: `/Patient/…`, query dropped."""

    def first_segment(match: re.Match[str]) -> str:
        path = match.group(0).split("?", 1)[0]
        head, _, rest = path.lstrip("/").partition("/")
        return f"/{head}/…" if rest else f"/{head}"

    return _PATH.sub(first_segment, text)


class RedactingLogger(Logger):  # type: ignore[misc]
    """gunicorn's logger, with request paths cut from its error-log messages.

    gunicorn logs `Error handling request POST /Patient/<id>/...?now=...` when a request
    breaks below the app (a worker aborted, a socket error), and quotes a malformed request
    line in warnings; both would put patient ids in the log.
    """

    def _message(self, msg: Any, args: tuple[Any, ...]) -> str:
        text = str(msg)
        if args:
            try:
                text = text % args
            except (TypeError, ValueError):
                text = " ".join([text, *map(str, args)])
        return redact_paths(text)

    def critical(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        self.error_log.critical(self._message(msg, args), **kwargs)

    def error(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        self.error_log.error(self._message(msg, args), **kwargs)

    def warning(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        self.error_log.warning(self._message(msg, args), **kwargs)

    def info(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        self.error_log.info(self._message(msg, args), **kwargs)

    def debug(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        self.error_log.debug(self._message(msg, args), **kwargs)

    def exception(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        self.error_log.exception(self._message(msg, args), **kwargs)

    def log(self, lvl: Any, msg: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(lvl, str):
            lvl = self.LOG_LEVELS.get(lvl.lower(), 20)
        self.error_log.log(lvl, self._message(msg, args), **kwargs)


logger_class = RedactingLogger


PROMETHEUS_MULTIPROC_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
_created_metrics_dir: list[str] = []


def on_starting(server: Any) -> None:
    """Before the workers fork: a metrics directory of this server only, empty."""
    directory = os.environ.get(PROMETHEUS_MULTIPROC_VARIABLE)
    if directory:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):  # a previous run's samples would be added up
            stale.unlink()
    else:
        directory = tempfile.mkdtemp(prefix="fhir-dm-metrics-")
        _created_metrics_dir.append(directory)
        os.environ[PROMETHEUS_MULTIPROC_VARIABLE] = directory


def child_exit(server: Any, worker: Any) -> None:
    """A worker is gone: its live gauges no longer count (its counters stay added up)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


def on_exit(server: Any) -> None:
    """Remove the metrics directory this server made for itself."""
    for directory in _created_metrics_dir:
        shutil.rmtree(directory, ignore_errors=True)
