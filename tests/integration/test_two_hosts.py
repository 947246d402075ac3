"""Two hosts on one HAPI FHIR server: each its own gunicorn and locks, one patient, many calls.

Locks only serialise the workers of one host; across hosts, write-back relies on versioned
updates (`ifMatch`, 412) and subject-scoped conditional creates, and starts a lost race again.
Whatever the timing, the patient ends every round with exactly one active plan and no call
fails with a 5xx. The figures are printed (run with `-s` to see them).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from fhir_dm.fhir.client import FhirClient
from tests import factories as f
from tests.integration.records import store
from tools.hapi_server import free_port

pytestmark = pytest.mark.integration

NOW = "2024-04-15"
HOSTS = 2
PARALLEL = 8
ROUNDS = 10
START_TIMEOUT_S = 90.0
CALL_TIMEOUT_S = 120

Json = dict[str, Any]


def _start_host(fhir_base_url: str, home: Path) -> tuple[subprocess.Popen[bytes], str, Any]:
    """One host: its own gunicorn (1 worker, 4 threads) and its own lock directory."""
    port = free_port()
    env = {
        **os.environ,
        "FHIR_DM_FHIR__BASE_URL": fhir_base_url,
        "FHIR_DM_TRUST__MODE": "off",
        "FHIR_DM_LOCK_DIR": str(home / "locks"),
        "FHIR_DM_LOG_LEVEL": "WARNING",
        # Calls of one host queue on the patient lock; on a loaded test machine the default
        # request deadline would answer some of them 503 (busy) before their turn. This test is
        # about write-back integrity, so the budget is generous.
        "FHIR_DM_REQUEST_DEADLINE_SECONDS": str(CALL_TIMEOUT_S - 10),
    }
    home.mkdir(parents=True)
    log = (home / "gunicorn.log").open("wb")
    command = [sys.executable, "-m", "gunicorn", "-w", "1", "-k", "gthread", "--threads", "4"]
    command += ["-b", f"127.0.0.1:{port}", "fhir_dm.web.wsgi:app"]
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{port}", log


@pytest.fixture
def hosts(fhir_base_url: str, tmp_path: Path) -> Iterator[list[str]]:
    started = [_start_host(fhir_base_url, tmp_path / f"host-{n}") for n in range(HOSTS)]
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        for n, (process, url, log) in enumerate(started):
            while True:
                try:
                    if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                        break
                except requests.RequestException:
                    pass  # not listening yet
                if process.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    text = (tmp_path / f"host-{n}" / "gunicorn.log").read_text()
                    raise RuntimeError(f"host {n} did not start:\n{text}")
                time.sleep(0.2)
        yield [url for _, url, _ in started]
    finally:
        for process, _, log in started:
            process.terminate()
            process.wait(timeout=30)
            log.close()


def test_two_hosts_many_calls_leave_one_active_plan(hosts: list[str], fhir_base_url: str) -> None:
    suffix = uuid.uuid4().hex[:10]
    patient_id = f"hosts-{suffix}"
    p = f.patient(patient_id, birth_date="1994-01-01")
    with FhirClient(fhir_base_url) as hapi:
        store(hapi, p, f.iim_condition(p, id=f"{patient_id}-dm"))
        figures: list[str] = []
        statuses: Counter[int] = Counter()
        started = time.monotonic()
        for round_ in range(ROUNDS):
            # Odd rounds change the data first (anti-TIF1-gamma flips), so the plan is revised
            # (and, from round 3 on, comes back to an earlier plan); even rounds change nothing.
            changed = round_ % 2 == 1
            if changed:
                result = "positive" if round_ % 4 == 1 else "negative"
                store(hapi, f.antibody(p, "tif1g", result, id=f"{patient_id}-tif1g"))

            def call(n: int) -> tuple[int, str]:
                url = f"{hosts[n % HOSTS]}/Patient/{patient_id}/$dm-cancer-screening?now={NOW}"
                response = requests.post(url, timeout=CALL_TIMEOUT_S)
                body = response.json()
                text = (
                    body["entry"][0]["resource"]["issue"][0]["diagnostics"]
                    if (response.status_code == 200)
                    else body["issue"][0]["diagnostics"]
                )
                return response.status_code, text

            t0 = time.monotonic()
            with ThreadPoolExecutor(PARALLEL) as pool:
                answers = list(pool.map(call, range(PARALLEL)))
            elapsed = time.monotonic() - t0
            codes = Counter(code for code, _ in answers)
            statuses.update(codes)
            plans = hapi.search("CarePlan", {"subject": f"Patient/{patient_id}"})
            active = [pl for pl in plans if pl["status"] == "active"]
            requests_ = hapi.search("ServiceRequest", {"patient": patient_id, "status": "active"})
            written = sum(1 for _, text in answers if "; written" in text)
            figures.append(
                f"round {round_ + 1:2d} ({'data changed' if changed else 'no change   '}):"
                f" statuses {dict(sorted(codes.items()))}, written {written},"
                f" active plans {len(active)}, plans {len(plans)},"
                f" active requests {len(requests_)}, {elapsed:.1f} s"
            )
            print(figures[-1], flush=True)
            assert all(code in (200, 409) for code, _ in answers), answers
            assert len(active) == 1, figures[-1]
            active_refs = {
                a["reference"]["reference"] for a in active[0]["activity"] if "reference" in a
            }
            assert {f"ServiceRequest/{r['id']}" for r in requests_} == active_refs
            if not changed and round_ > 0:
                assert written == 0, figures[-1]
        total = time.monotonic() - started
    print(f"{ROUNDS * PARALLEL} calls on {HOSTS} hosts: {dict(statuses)}; {total:.1f} s in all")
    assert statuses[200] >= ROUNDS * PARALLEL * 0.9
