"""Service throughput: the web service under gunicorn, over loopback, with and without HAPI.

(a) Bundle preview: N requests of `POST /$dm-cancer-screening` (the seed case, high risk) from K
    client threads; no FHIR server is touched.
(b) Pull and write-back (with --fhir-base-url URL, or --start-hapi for a local HAPI server):
    M fresh patients are loaded, then `POST /Patient/<id>/$dm-cancer-screening` runs for each,
    first run (writes) and re-run (unchanged).

Every phase is bounded by a request count and by --max-seconds. Usage:
python -m bench.service_bench [-n 200] [-k 8] [-m 20] [--start-hapi | --fhir-base-url URL]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests

from fhir_dm.fhir.client import FhirClient
from tests import factories as f
from tools.hapi_server import HapiServer, free_port

HOST = "127.0.0.1"
NOW = "2015-10-25"
WORKERS = 2
START_TIMEOUT_S = 60.0
UNUSED_FHIR_URL = "http://127.0.0.1:9/fhir"  # preview never calls it; readiness would fail
FHIR = {"Content-Type": "application/fhir+json"}

_local = threading.local()


def _session() -> requests.Session:
    """One keep-alive session per client thread; never through a proxy."""
    session = getattr(_local, "session", None)
    if session is None:
        session = requests.Session()
        session.trust_env = False
        _local.session = session
    return session


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@contextmanager
def gunicorn(fhir_base_url: str, workdir: Path) -> Iterator[str]:
    """The production command on a free loopback port; yields the service URL."""
    port = free_port()
    env = {
        **os.environ,
        "FHIR_DM_FHIR__BASE_URL": fhir_base_url,
        "FHIR_DM_TRUST__MODE": "off",
        "FHIR_DM_LOCK_DIR": str(workdir / "locks"),
        "FHIR_DM_LOG_LEVEL": "WARNING",
        "FHIR_DM_PUBLIC_BASE_URL": f"http://{HOST}:{port}",
    }
    log_path = workdir / "gunicorn.log"
    command = [
        sys.executable,
        "-m",
        "gunicorn",
        "-w",
        str(WORKERS),
        "-b",
        f"{HOST}:{port}",
        "fhir_dm.web.wsgi:app",
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://{HOST}:{port}"
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                try:
                    if _session().get(f"{url}/healthz", timeout=5).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("gunicorn did not start:\n" + log_path.read_text())
                time.sleep(0.2)
            yield url
        finally:
            process.terminate()
            process.wait(timeout=30)


def run_phase(
    label: str,
    call: Callable[[int], None],
    count: int,
    threads: int,
    max_seconds: float,
) -> None:
    """Run `call(i)` for i < count from `threads` threads, stopping at max_seconds; print."""
    latencies: list[float] = []
    failures = 0
    first_failure: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + max_seconds

    def one(i: int) -> None:
        nonlocal failures
        if time.monotonic() > deadline:
            return
        t0 = time.perf_counter()
        try:
            call(i)
        except Exception as exc:  # a bench counts failures; it does not stop at the first
            with lock:
                failures += 1
                if not first_failure:
                    first_failure.append(f"{type(exc).__name__}: {exc}"[:300])
            return
        with lock:
            latencies.append((time.perf_counter() - t0) * 1000)

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(count)))
    total = time.perf_counter() - start
    done = len(latencies)
    if not done:
        print(f"{label}: no successful request ({failures} failed)")
        return
    print(
        f"{label}: {done} requests in {total:.1f} s, {done / total:.1f} req/s with {threads}"
        f" client threads; latency ms p50 {statistics.median(latencies):.0f},"
        f" p99 {_percentile(latencies, 0.99):.0f}" + (f"; {failures} failed" if failures else "")
    )
    if first_failure:
        print(f"      first failure: {first_failure[0]}")


def _expect(response: requests.Response, marker: str) -> None:
    if response.status_code != 200:
        issue = (response.json().get("issue") or [{}])[0]
        raise RuntimeError(f"HTTP {response.status_code}: {issue.get('diagnostics', '')}")
    diagnostics = response.json()["entry"][0]["resource"]["issue"][0]["diagnostics"]
    if marker not in diagnostics:
        raise RuntimeError(diagnostics)


def bench_bundle_preview(url: str, count: int, threads: int, max_seconds: float) -> None:
    body = json.dumps(f.bundle(*f.seed_case()))
    print(f"(a) bundle preview: seed case, {len(body) // 1024} KiB in")

    def call(_: int) -> None:
        response = _session().post(
            f"{url}/$dm-cancer-screening?now={NOW}", data=body, headers=FHIR, timeout=60
        )
        _expect(response, "; preview")

    run_phase("    bundle preview", call, count, threads, max_seconds)


def _bench_patient(patient_id: str) -> list[dict[str, Any]]:
    """A high-risk adult with DM (TIF1-gamma positive, smoker, dysphagia, high CK)."""
    p = f.patient(patient_id, gender="male", birth_date="1940-06-15")
    return [
        p,
        f.iim_condition(p, onset="2015-09-01", id=f"{patient_id}-dm"),
        f.condition(p, f.concept(f.SCT, "40739000"), onset="2015-10-01", id=f"{patient_id}-dys"),
        f.smoking(p, effective="2015-10-20", id=f"{patient_id}-smoke"),
        f.ck(p, 15242, effective="2015-10-20", id=f"{patient_id}-ck"),
        f.antibody(p, "tif1g", effective="2015-10-22", id=f"{patient_id}-tif1g"),
    ]


def bench_write_back(
    url: str, fhir_base_url: str, patients: int, threads: int, max_seconds: float
) -> None:
    run = uuid.uuid4().hex[:8]
    ids = [f"bench-{run}-{n}" for n in range(patients)]
    with FhirClient(fhir_base_url) as fhir:
        entries = [
            {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
            for patient_id in ids
            for r in _bench_patient(patient_id)
        ]
        fhir.transaction(
            {"resourceType": "Bundle", "type": "transaction", "entry": entries}, idempotent=True
        )
    print(f"(b) pull + write-back against {fhir_base_url}: {patients} high-risk patients loaded")

    def make_call(marker: str) -> Callable[[int], None]:
        def call(i: int) -> None:
            response = _session().post(
                f"{url}/Patient/{ids[i]}/$dm-cancer-screening?now={NOW}", timeout=120
            )
            _expect(response, marker)

        return call

    run_phase("    first run (writes)", make_call("; written"), patients, threads, max_seconds)
    run_phase("    re-run (unchanged)", make_call("unchanged"), patients, threads, max_seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200, help="bundle requests (default 200)")
    parser.add_argument("-k", type=int, default=8, help="client threads (default 8)")
    parser.add_argument("-m", type=int, default=20, help="patients for write-back (default 20)")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="per phase (120)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--fhir-base-url", default=None, help="a FHIR server for phase (b)")
    where.add_argument("--start-hapi", action="store_true", help="start the local HAPI for (b)")
    args = parser.parse_args()

    hapi: HapiServer | None = None
    fhir_base_url: str | None = args.fhir_base_url
    try:
        if args.start_hapi:
            hapi = HapiServer()
            fhir_base_url = hapi.start()
        with (
            tempfile.TemporaryDirectory(prefix="fhir-dm-bench-") as tmp,
            gunicorn(fhir_base_url or UNUSED_FHIR_URL, Path(tmp)) as url,
        ):
            print(f"service: gunicorn -w {WORKERS} (sync) on {url}")
            bench_bundle_preview(url, args.n, args.k, args.max_seconds)
            if fhir_base_url:
                bench_write_back(url, fhir_base_url, args.m, args.k, args.max_seconds)
    finally:
        if hapi is not None:
            hapi.stop()


if __name__ == "__main__":
    main()
