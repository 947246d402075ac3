"""Population run throughput on a real HAPI FHIR: 1,000 synthetic patients, 100 with an IIM.

Loads the population with transactions built from the test factories (a fresh tag each time),
then measures the finding search (time, Conditions returned) and patients per second of a
preview pass with 1 and with 4 workers, a writing pass and a re-run (unchanged) with 4.

    python -m bench.population_bench --fhir-base-url http://127.0.0.1:8080/fhir
    python -m bench.population_bench            # starts the local test HAPI (Maven, JDK 17+)
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
import uuid
from datetime import date
from pathlib import Path

import requests

from fhir_dm.core.assess import Engine
from fhir_dm.fhir.client import FhirClient
from fhir_dm.knowledge.load import load_knowledge
from fhir_dm.population.config import load_population_config
from fhir_dm.population.finder import find_iim_patients, iim_search_tokens
from fhir_dm.population.run import PopulationRunner
from fhir_dm.writeback.locks import PatientLocks
from tests.population_data import population, transactions

NOW = date(2026, 12, 2)


def _load(base: str, tag: str, size: int, iim: int) -> float:
    started = time.perf_counter()
    for bundle in transactions(population(tag, size, iim), per_bundle=500):
        response = requests.post(
            base, json=bundle, headers={"Content-Type": "application/fhir+json"}, timeout=600
        )
        response.raise_for_status()
    return time.perf_counter() - started


def bench(base: str, size: int, iim: int) -> None:
    knowledge = load_knowledge()
    cfg = load_population_config(knowledge)
    engine = Engine(knowledge)
    tag = f"bench{uuid.uuid4().hex[:6]}"
    print(f"loading {size} patients ({iim} with an IIM): {_load(base, tag, size, iim):.1f} s")
    tokens = iim_search_tokens(knowledge, cfg.finder)
    with FhirClient(base, page_size=1000, max_pages=10_000) as client:
        timings = []
        for _ in range(3):
            started = time.perf_counter()
            found = find_iim_patients(client, tokens)
            timings.append(time.perf_counter() - started)
    ours = [p for p in found if p.startswith(f"{tag}-")]
    print(
        f"finding search: {len(tokens)} codes, {len(found)} IIM patient(s) on the server"
        f" ({len(ours)} of this population), best of 3: {min(timings) * 1000:.0f} ms"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for label, workers, preview in (
            ("preview", 1, True),
            ("preview", 4, True),
            ("write", 4, False),
            ("re-run (unchanged)", 4, False),
        ):
            runner = PopulationRunner(
                lambda: FhirClient(base), engine, knowledge, PatientLocks(Path(tmp))
            )
            result = runner.run(
                ours,
                now=NOW,
                preview=preview,
                workers=workers,
                run_id="bench",
                progress_stream=io.StringIO(),
            )
            rate = len(result.done) / result.seconds
            print(
                f"{label:<20} workers {workers}: {len(result.done)} patients in"
                f" {result.seconds:.1f} s = {rate:.1f} patients/s, {len(result.failures)} failed"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fhir-base-url", default=None)
    parser.add_argument("--patients", type=int, default=1000)
    parser.add_argument("--iim", type=int, default=100)
    args = parser.parse_args()
    from tools.hapi_server import fhir_base

    with fhir_base(args.fhir_base_url) as base:
        bench(base, args.patients, args.iim)


if __name__ == "__main__":
    main()
