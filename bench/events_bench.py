"""Event-driven re-assessment: notification-to-revised-plan latency and the daily sweep's rate.

A local HAPI with rest-hook Subscriptions (its matcher run every --interval-ms), fhir-dm's web
service on a free loopback port (werkzeug, threaded) and a Huey consumer of --workers threads on
a SQLite queue file, as `fhir-dm serve` and `fhir-dm worker` run on one host.

(a) Latency: N young women with dermatomyositis get a first plan (moderate risk, preliminary);
    then, one patient at a time, a positive anti-TIF1-gamma Observation is posted and the clock
    runs until the re-assessment that wrote the high-risk plan returns. Reported: end to end
    (POST to HAPI -> plan written) and the fhir-dm part (notification received by the endpoint
    -> plan written, which includes --debounce).
(b) Daily sweep: `Jobs.sweep()` over every patient with an active plan (nothing changed, so
    each run reads and compares, and writes nothing); patients per second until all are done.

Usage: python -m bench.events_bench [-n 20] [--interval-ms 500] [--debounce 0]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import requests
from werkzeug.serving import make_server

from fhir_dm.fhir.client import FhirClient
from fhir_dm.fhir.config import FhirServerConfig
from fhir_dm.jobs.queue import Jobs, Runtime, build_runtime, open_huey
from fhir_dm.jobs.settings import JobsSettings
from fhir_dm.subscriptions import ensure_subscriptions
from fhir_dm.web.app import create_app
from fhir_dm.web.settings import Settings
from fhir_dm.web.trust import TrustConfig
from tests import factories as f
from tools.hapi_server import HapiServer, free_port

SECRET = "bench-notification-secret-0123456789abcdef"
FHIR = {"Content-Type": "application/fhir+json"}
WAIT_S = 120.0
QUIET_S = 1.0
Json = dict[str, Any]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _wait(check: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


class RunClock:
    """When each re-assessment of a patient returned: wraps the worker's write-back."""

    def __init__(self) -> None:
        self.done: dict[str, list[float]] = {}
        self._guard = threading.Lock()

    def runtime(self, settings: Settings) -> Runtime:
        """The worker's runtime, its `assess_patient` noting the time each call returns."""
        runtime = build_runtime(settings)
        assess = runtime.writeback.assess_patient

        def timed(patient_id: str, **kwargs: Any) -> Any:
            result = assess(patient_id, **kwargs)
            with self._guard:
                self.done.setdefault(patient_id, []).append(time.monotonic())
            return result

        setattr(runtime.writeback, "assess_patient", timed)  # noqa: B010 - a method, for mypy
        return runtime

    def runs(self) -> int:
        with self._guard:
            return sum(len(v) for v in self.done.values())

    def first_after(self, patient_id: str, since: float) -> float | None:
        with self._guard:
            return next((t for t in self.done.get(patient_id, []) if t >= since), None)


class NotificationClock:
    """WSGI middleware: when each notification reached the endpoint, and on which channel."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self._app = app
        self.times: list[tuple[float, str]] = []

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path = str(environ.get("PATH_INFO", ""))
        if path.startswith("/notifications/"):
            self.times.append((time.monotonic(), path.split("/")[2]))
        return self._app(environ, start_response)

    def first_after(self, since: float, channel: str) -> float | None:
        return next((t for t, c in list(self.times) if t >= since and c == channel), None)


def _post(base_url: str, resource: Json) -> Json:
    body = {k: v for k, v in resource.items() if k != "id"}
    response = requests.post(f"{base_url}/{resource['resourceType']}", json=body, headers=FHIR)
    response.raise_for_status()
    created: Json = response.json()
    return created


def _quiet(jobs: Jobs, runs: RunClock) -> None:
    """Wait until the queue is empty and no re-assessment has returned for QUIET_S."""
    while True:
        count = runs.runs()
        time.sleep(QUIET_S)
        empty = jobs.huey.pending_count() == 0 and jobs.huey.scheduled_count() == 0
        if empty and runs.runs() == count:
            return


def _wait_delivering(hapi_url: str, clock: NotificationClock) -> None:
    """HAPI marks a Subscription active a little before its matcher has it: probe until then."""
    probe = _post(hapi_url, f.patient(birth_date="1950-01-01"))
    for _ in range(60):
        since = time.monotonic()
        _post(hapi_url, f.condition(probe, {"text": "probe"}))
        deadline = since + 3
        while time.monotonic() < deadline:
            if clock.first_after(since, "condition") is not None:
                return
            time.sleep(0.05)
    raise SystemExit("HAPI delivers no notification")


def _first_run(runs: RunClock, patient_id: str, since: float) -> float:
    """When the first re-assessment of the patient after `since` returned."""
    _wait(lambda: runs.first_after(patient_id, since) is not None, "a re-assessment")
    written = runs.first_after(patient_id, since)
    assert written is not None
    return written


def _tier(client: FhirClient, patient_id: str) -> str:
    plans = client.search("CarePlan", {"subject": f"Patient/{patient_id}", "status": "active"})
    if len(plans) != 1:
        return f"{len(plans)} active plans"
    kind, rid = plans[0]["supportingInfo"][0]["reference"].split("/")
    risk = client.read(kind, rid) or {}
    return str(risk["prediction"][0]["qualitativeRisk"]["coding"][0]["code"])


def run(hapi_url: str, count: int, workers: int, debounce: float, workdir: Path) -> None:
    port = free_port()
    settings = Settings(
        fhir=FhirServerConfig(base_url=hapi_url),
        trust=TrustConfig(mode="off"),
        public_base_url=f"http://127.0.0.1:{port}",
        lock_dir=workdir / "locks",
        log_level="WARNING",
        jobs=JobsSettings(
            sqlite_file=workdir / "queue.sqlite3",
            debounce_seconds=debounce,
            notification_secret=SECRET,
        ),
    )
    assert settings.jobs is not None
    clock = NotificationClock(create_app(settings))
    web = make_server("127.0.0.1", port, clock, threaded=True)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    runs = RunClock()
    jobs = Jobs(open_huey(settings.jobs), settings.jobs, lambda: runs.runtime(settings))
    consumer = jobs.consumer(workers=workers, worker_type="thread")
    consumer.start()
    try:
        with FhirClient(hapi_url) as client:
            ensure_subscriptions(client, settings.public_base_url, SECRET)
            _wait(
                lambda: all(s.get("status") == "active" for s in client.search("Subscription", {})),
                "active Subscriptions",
            )
            _wait_delivering(hapi_url, clock)
            onset = (datetime.now(UTC).date() - timedelta(days=30)).isoformat()
            today = datetime.now(UTC).date().isoformat()
            patients = []
            for _ in range(count):
                patient = _post(hapi_url, f.patient(birth_date="1994-01-01", gender="female"))
                _post(hapi_url, f.iim_condition(patient, onset=onset))
                patients.append(patient)
            _wait(lambda: all(p["id"] in runs.done for p in patients), "the first plans")
            _quiet(jobs, runs)

            end_to_end: list[float] = []
            ours: list[float] = []
            for patient in patients:
                posted = time.monotonic()
                _post(hapi_url, f.antibody(patient, "tif1g", "positive", effective=today))
                written = _first_run(runs, patient["id"], posted)
                received = clock.first_after(posted, "observation")
                assert received is not None
                if _tier(client, patient["id"]) != "high":
                    raise SystemExit("the revised plan is not high risk")
                end_to_end.append(written - posted)
                ours.append(written - received)
                _quiet(jobs, runs)
            for label, values in (("end to end", end_to_end), ("fhir-dm part", ours)):
                print(
                    f"(a) {label:13}: n={len(values)} p50 {statistics.median(values):.2f} s, "
                    f"p99 {_percentile(values, 0.99):.2f} s, max {max(values):.2f} s"
                )

            runs_before = runs.runs()
            started = time.monotonic()
            swept = jobs.sweep()
            _wait(lambda: runs.runs() - runs_before >= swept, "the sweep", timeout=600)
            elapsed = time.monotonic() - started
            print(
                f"(b) daily sweep: {swept} patients in {elapsed:.1f} s = "
                f"{swept / elapsed:.1f} patients/s ({workers} worker threads)"
            )
    finally:
        consumer.stop(graceful=True)
        web.shutdown()
        jobs.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("-n", type=int, default=20, help="patients (default 20)")
    parser.add_argument("--workers", type=int, default=2, help="worker threads (default 2)")
    parser.add_argument("--debounce", type=float, default=0.0, help="jobs.debounce_seconds (0)")
    parser.add_argument(
        "--interval-ms", type=int, default=500, help="HAPI's subscription interval (500)"
    )
    parser.add_argument("--fhir-base-url", default=None, help="a running HAPI with subscriptions")
    args = parser.parse_args()
    print(
        f"{args.n} patients, {args.workers} worker threads, debounce {args.debounce} s, "
        f"HAPI subscription interval {args.interval_ms} ms"
    )
    with tempfile.TemporaryDirectory(prefix="fhir-dm-events-bench-") as tmp:
        if args.fhir_base_url:
            run(args.fhir_base_url, args.n, args.workers, args.debounce, Path(tmp))
            return
        hapi = HapiServer(
            extra_args=[
                "--testserver.subscriptions=true",
                f"--testserver.subscription-interval-ms={args.interval_ms}",
                "--testserver.request-logging=false",
            ]
        )
        try:
            run(hapi.start(), args.n, args.workers, args.debounce, Path(tmp))
        finally:
            hapi.stop()


if __name__ == "__main__":
    main()
