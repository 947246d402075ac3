"""The clinic page's view for 100 and 1,000 IIM patients on a real HAPI FHIR server.

Loads IIM patients (the population benchmark's synthetic data: two organisations, two
practitioners) in two steps, 100 then 900 more, and after each step times the clinic view as
`POST /app/api/clinic` builds it (`app_ui.clinic_view`: the finder, a preview assessment per
patient, the names fetched in batch, the worklist, the measures per filter), called in-process
with the per-call limit raised to the clinic's size. The floor, measured in the same run: a
plain FHIR search of the same patients (`Patient?_id=...`, 100 ids per search). Each figure is
the best of `--repeat` runs; the ratio is clinic view / floor.

    python -m bench.clinic_bench --fhir-base-url http://127.0.0.1:8080/fhir
    python -m bench.clinic_bench            # starts the local test HAPI (Maven, JDK 17+)

On a server that already holds IIM patients, the clinic is every IIM patient the finder
returns, cut to the size measured (first by id), as the page does.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import date, timedelta
from functools import partial
from pathlib import Path

import requests
from flask import Flask

from fhir_dm.fhir.client import FhirClient
from fhir_dm.fhir.config import FhirServerConfig
from fhir_dm.population.config import load_population_config
from fhir_dm.web import app_ui
from fhir_dm.web.app import create_app
from fhir_dm.web.settings import Service, Settings, current_service
from fhir_dm.web.trust import TrustConfig
from tests.population_data import population, transactions

NOW = date(2024, 9, 15)  # the at-diagnosis round of the population (onset 2024-03-01) is overdue
SIZES = (100, 1000)


def _load(base: str, tag: str, count: int) -> float:
    """`count` IIM patients (and their organisations and practitioners) under `tag`."""
    started = time.perf_counter()
    for bundle in transactions(population(tag, count, count), per_bundle=500):
        response = requests.post(
            base, json=bundle, headers={"Content-Type": "application/fhir+json"}, timeout=600
        )
        response.raise_for_status()
    return time.perf_counter() - started


def _best(repeat: int, run: Callable[[], object]) -> float:
    timings = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        timings.append(time.perf_counter() - started)
    return min(timings)


def _floor(base: str, ids: list[str]) -> None:
    with FhirClient(base, page_size=100) as client:
        for start in range(0, len(ids), app_ui.IDS_PER_SEARCH):
            chunk = ids[start : start + app_ui.IDS_PER_SEARCH]
            client.search("Patient", {"_id": ",".join(chunk), "_count": str(len(chunk))})


def bench(base: str, repeat: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            fhir=FhirServerConfig(base_url=base),
            trust=TrustConfig(mode="off"),
            public_base_url="http://127.0.0.1:8080",
            lock_dir=Path(tmp) / "locks",
            log_level="WARNING",
        )
        app = create_app(settings)
        loaded = 0
        for size in SIZES:
            tag = f"clinic{uuid.uuid4().hex[:6]}"
            seconds = _load(base, tag, size - loaded)
            print(f"loaded {size - loaded} IIM patients ({size} in all) in {seconds:.1f} s")
            loaded = size
            _measure(app, base, size, repeat)


def _measure(app: Flask, base: str, size: int, repeat: int) -> None:
    """The clinic view of `size` patients, best of `repeat`, against the floor."""
    with app.test_request_context():
        service: Service = current_service()
        population_cfg = load_population_config(service.knowledge)
        start = NOW - timedelta(days=app_ui.CLINIC_PERIOD_DAYS)
        view = app_ui.clinic_view(service, population_cfg, NOW, start, limit=size)
        clinic = _best(
            repeat, partial(app_ui.clinic_view, service, population_cfg, NOW, start, limit=size)
        )
    ids = [p["patient"].split("/", 1)[1] for p in view["patients"]]
    floor = _best(repeat, partial(_floor, base, ids))
    named = sum(1 for p in view["patients"] if p["organizationName"] != p["organization"])
    print(
        f"clinic view, {view['assessed']} patients ({len(view['failed'])} failed,"
        f" {named} with their organisation's name): {clinic:.2f} s"
        f" ({clinic / view['assessed'] * 1000:.0f} ms per patient);"
        f" floor (Patient?_id search of the same patients): {floor * 1000:.0f} ms;"
        f" ratio {clinic / floor:.0f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fhir-base-url", default=None)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    from tools.hapi_server import fhir_base

    with fhir_base(args.fhir_base_url) as base:
        bench(base, args.repeat)


if __name__ == "__main__":
    main()
