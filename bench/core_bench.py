"""Core throughput: N synthetic high-risk patients assessed in-process, end to end.

End to end = json.loads of the input, validation and assessment, FHIR resource building,
json.dumps of the result Bundle. The floor is a bare json.loads + json.dumps of the same input
and output. Usage: python -m bench.core_bench [-n 300]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import date

from fhir_dm.core.assess import Engine
from fhir_dm.knowledge.load import load_knowledge
from tests import factories as f

NOW = date(2015, 10, 25)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(engine: Engine, text: str, n: int, label: str) -> None:
    """Time n end-to-end assessments of one input and print the figures."""
    latencies = []
    start = time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter()
        json.dumps(engine.assess(json.loads(text), now=NOW).bundle())
        latencies.append((time.perf_counter() - t0) * 1000)
    total = time.perf_counter() - start
    print(
        f"{label}: {n / total:.1f} patients/s on one core; latency ms median "
        f"{statistics.median(latencies):.2f}, p99 {_percentile(latencies, 0.99):.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=300, help="patients (default 300)")
    args = parser.parse_args()
    knowledge = load_knowledge()
    engine = Engine(knowledge)  # the default: output validation off
    text = json.dumps(f.bundle(*f.seed_case()))
    output = json.dumps(engine.assess(json.loads(text), now=NOW).bundle())
    requests = sum(
        1 for e in json.loads(output)["entry"] if e["resource"]["resourceType"] == "ServiceRequest"
    )

    print(
        f"patients: {args.n} high-risk (seed case; {requests} ServiceRequests, "
        f"{len(output) // 1024} KiB out)"
    )
    measure(engine, text, args.n, "default (output validation off)")
    measure(
        Engine(knowledge, validate_output=True),
        text,
        args.n,
        "validate_output on (every resource through its R4B model)",
    )
    floor = []
    for _ in range(args.n):
        t0 = time.perf_counter()
        json.dumps(json.loads(text))
        json.dumps(json.loads(output))
        floor.append((time.perf_counter() - t0) * 1000)

    print(f"floor (json.loads + json.dumps only) ms: median {statistics.median(floor):.3f}")


if __name__ == "__main__":
    main()
