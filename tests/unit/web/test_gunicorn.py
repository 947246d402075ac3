"""The production server: gunicorn with fhir_dm.web.gunicorn_conf, and a misbehaving FHIR server.

A real gunicorn on a free loopback port (2 workers, as in production) and a tiny local HTTP
server standing in for the FHIR server: one that throttles for an hour, one that answers late.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from gunicorn.config import Config

from fhir_dm.web import gunicorn_conf
from fhir_dm.web.gunicorn_conf import RedactingLogger, redact_paths
from fhir_dm.web.http_limits import MAX_HEADER_FIELD_BYTES

DEADLINE_SECONDS = 1.5
THROTTLED = "pt-throttled-4711"
SLOW = "pt-slow-0815"
NOW = "2015-10-25"
OPERATION = "$dm-cancer-screening"


class FhirUpstream(BaseHTTPRequestHandler):
    """A FHIR server that throttles one patient for an hour and answers another one late."""

    def do_GET(self) -> None:
        if self.path.startswith(f"/fhir/Patient/{THROTTLED}"):
            self._send(429, {"resourceType": "OperationOutcome"}, {"Retry-After": "3600"})
        elif self.path.startswith(f"/fhir/Patient/{SLOW}"):
            time.sleep(DEADLINE_SECONDS + 3)  # past the deadline: the service must not wait
            self._send(200, {"resourceType": "Patient", "id": SLOW})
        else:
            self._send(200, {"resourceType": "CapabilityStatement", "status": "active"})

    def _send(
        self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/fhir+json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            pass  # the service gave up on us, as it should

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FhirUpstream)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/fhir"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def service(upstream: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """gunicorn as the README runs it, plus its access log; yields (base URL, log file)."""
    tmp = tmp_path_factory.mktemp("gunicorn")
    port = _free_port()
    env = {
        **os.environ,
        "FHIR_DM_FHIR__BASE_URL": upstream,
        "FHIR_DM_FHIR__MAX_RETRIES": "3",
        "FHIR_DM_TRUST__MODE": "off",
        "FHIR_DM_REQUEST_DEADLINE_SECONDS": str(DEADLINE_SECONDS),
        "FHIR_DM_LOCK_DIR": str(tmp / "locks"),
    }
    env.pop("FHIR_DM_SETTINGS_FILE", None)
    log_path = tmp / "gunicorn.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "--config",
                "python:fhir_dm.web.gunicorn_conf",
                "--bind",
                f"127.0.0.1:{port}",
                "--access-logfile",
                "-",
                "fhir_dm.web.wsgi:app",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                pytest.fail("gunicorn did not start:\n" + log_path.read_text())
            try:
                if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass  # not listening yet, or the worker is still loading the app
            if time.monotonic() > deadline:
                pytest.fail("gunicorn did not answer:\n" + log_path.read_text())
            time.sleep(0.1)
        yield url, log_path
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _operation(patient: str) -> str:
    return f"/Patient/{patient}/{OPERATION}?now={NOW}"


def _outcome(response: requests.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/fhir+json; charset=utf-8"
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["code"] == code


def test_an_hour_of_throttling_is_a_fast_503_outcome(service: tuple[str, Path]) -> None:
    url, _ = service
    started = time.monotonic()
    response = requests.post(url + _operation(THROTTLED), timeout=10)

    _outcome(response, 503, "throttled")
    assert response.headers["Retry-After"] == "3600"
    assert time.monotonic() - started < 3


def test_a_fhir_server_slower_than_the_deadline_is_a_504_outcome_at_the_deadline(
    service: tuple[str, Path],
) -> None:
    url, _ = service
    started = time.monotonic()
    response = requests.post(url + _operation(SLOW), timeout=10)
    elapsed = time.monotonic() - started

    _outcome(response, 504, "timeout")
    assert DEADLINE_SECONDS - 0.2 < elapsed < DEADLINE_SECONDS + 1.5


def test_slow_clients_do_not_freeze_the_service(service: tuple[str, Path]) -> None:
    """Connections dribbling their headers hold a thread each, not a worker each."""
    url, _ = service
    port = int(url.rsplit(":", 1)[1])
    stop = threading.Event()
    slow: list[socket.socket] = []
    for _ in range(3):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        slow.append(s)

    def dribble() -> None:
        while not stop.wait(0.3):
            for s in slow:
                try:
                    s.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    return

    dribbler = threading.Thread(target=dribble, daemon=True)
    dribbler.start()
    try:
        time.sleep(0.5)  # let them reach the workers
        for _ in range(6):  # enough to reach both workers
            started = time.monotonic()
            response = requests.get(f"{url}/healthz", timeout=5)
            assert response.status_code == 200
            assert time.monotonic() - started < 2
    finally:
        stop.set()
        dribbler.join()
        for s in slow:
            s.close()


def test_an_oversized_header_is_431(service: tuple[str, Path]) -> None:
    url, _ = service
    response = requests.get(
        f"{url}/healthz", headers={"Authorization": "Bearer " + "x" * MAX_HEADER_FIELD_BYTES}
    )
    assert response.status_code == 431


def test_logs_hold_no_patient_ids_or_query_strings(service: tuple[str, Path]) -> None:
    url, log_path = service
    requests.post(url + _operation(THROTTLED), timeout=10)
    # A request line gunicorn itself refuses (a control character), quoting it in a warning.
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as s:
        s.sendall(f"POST /Patient/{THROTTLED}\x01?now={NOW} HTTP/1.1\r\n\r\n".encode())
        assert s.recv(4096).startswith(b"HTTP/1.1 400")
    time.sleep(0.3)  # let the access line reach the file

    text = log_path.read_text()
    assert "Invalid HTTP request line: 'POST /Patient/… HTTP/1.1'" in text
    assert THROTTLED not in text and SLOW not in text
    assert NOW not in text and "now=" not in text
    access = [
        json.loads(line) for line in text.splitlines() if line.startswith('{"logger": "gunicorn')
    ]
    assert any(
        a["method"] == "POST"
        and a["route"] == "/Patient/<id>/$dm-cancer-screening"
        and a["status"] == "503"
        for a in access
    ), access
    assert all(isinstance(a["duration_ms"], int) for a in access)


def _healthz_count(url: str) -> float:
    text = requests.get(f"{url}/metrics", timeout=10).text
    line = 'fhir_dm_http_requests_total{method="GET",route="/healthz",status="200"}'
    found = [row for row in text.splitlines() if row.startswith(line)]
    return float(found[0].split()[-1]) if found else 0.0


def test_metrics_add_up_every_worker(service: tuple[str, Path]) -> None:
    """Multiprocess: whichever worker serves the scrape, it counts the requests of both."""
    url, _ = service
    before = _healthz_count(url)
    for _ in range(12):
        with requests.Session() as fresh:  # a new connection each time, spread over workers
            assert fresh.get(f"{url}/healthz", timeout=5).status_code == 200
    for _ in range(4):  # each scrape may land on either worker: every one sees all twelve
        assert _healthz_count(url) == before + 12
    text = requests.get(f"{url}/metrics", timeout=10).text
    assert "python_gc_objects_collected_total" not in text  # the multiprocess collector
    assert THROTTLED not in text and SLOW not in text


# -- the config module on its own ------------------------------------------------------------


def test_the_config_keeps_gunicorns_timeout_above_the_service_deadline() -> None:
    from fhir_dm.web.settings import DEFAULT_REQUEST_DEADLINE_SECONDS

    assert gunicorn_conf.worker_class == "gthread" and gunicorn_conf.threads >= 2
    assert gunicorn_conf.timeout >= DEFAULT_REQUEST_DEADLINE_SECONDS + 5
    for banned in ("%(r)s", "%(U)s", "%(q)s", "%(f)s", "{authorization}i"):
        assert banned not in gunicorn_conf.access_log_format


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "Error handling request POST /Patient/pt-1/$dm-cancer-screening?now=2015-10-25",
            "Error handling request POST /Patient/…",
        ),
        ("Invalid request line 'GET /x?id=7 HTTP/9.9'", "Invalid request line 'GET /x HTTP/9.9'"),
        ("Listening at: http://127.0.0.1:8080 (42)", "Listening at: http://127.0.0.1:8080 (42)"),
        ("Listening at: unix:/run/fhir-dm.sock (42)", "Listening at: unix:/run/fhir-dm.sock (42)"),
    ],
)
def test_paths_are_cut_to_their_first_segment(text: str, expected: str) -> None:
    assert redact_paths(text) == expected


def test_gunicorns_error_handling_message_loses_the_path() -> None:
    stream = io.StringIO()
    log = RedactingLogger(Config())
    handler = logging.StreamHandler(stream)
    log.error_log.addHandler(handler)
    try:
        try:
            raise SystemExit(1)
        except SystemExit:
            log.exception(
                "Error handling request %s %s", "POST", f"/Patient/{THROTTLED}/x?now={NOW}"
            )
    finally:
        log.error_log.removeHandler(handler)

    assert "Error handling request POST /Patient/…" in stream.getvalue()
    assert THROTTLED not in stream.getvalue() and NOW not in stream.getvalue()


def test_every_line_gunicorn_writes_from_start_to_stop_is_json(tmp_path: Path) -> None:
    port = _free_port()
    env = {
        **os.environ,
        "FHIR_DM_FHIR__BASE_URL": "http://127.0.0.1:9/fhir",
        "FHIR_DM_TRUST__MODE": "off",
        "FHIR_DM_LOCK_DIR": str(tmp_path / "locks"),
    }
    env.pop("FHIR_DM_SETTINGS_FILE", None)
    log_path = tmp_path / "gunicorn.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "gunicorn", "--config", "python:fhir_dm.web.gunicorn_conf"),
                *("--bind", f"127.0.0.1:{port}", "--workers", "1", "--access-logfile", "-"),
                "fhir_dm.web.wsgi:app",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, log_path.read_text()
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).ok:
                    break
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
    finally:
        process.terminate()
        process.wait(30)
    lines = [line for line in log_path.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # fails on any plain-text line
    messages = " | ".join(str(r.get("message", "")) for r in records)
    for said in ("Starting gunicorn", "Listening at", "Booting worker", "Shutting down"):
        assert said in messages, messages
    assert any(r.get("logger") == "gunicorn.access" and r["route"] == "/healthz" for r in records)
    assert all(r["logger"] != "gunicorn.error" or "level" in r for r in records)
