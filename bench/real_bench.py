"""Real-size records: the core's time against json.loads of the same text, and its growth.

For Synthea-shaped records of several sizes (tests/synthea.py) this times what `fhir-dm assess`
does per file: json.loads of the text, reading and validating the input, facts, rules, plan,
FHIR build and json.dumps of the result Bundle. The floor is json.loads of the same text,
timed in the same run, interleaved. Times are CPU seconds of this process (steadier than wall
time on a shared machine), each from a collected heap.
Usage: python -m bench.real_bench [-n 15] [--sizes 500 1500 5000] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import pstats
import statistics
import time
from datetime import date

from fhir_dm.core.assess import Engine
from fhir_dm.knowledge.load import load_knowledge
from tests import synthea

NOW = date(2015, 10, 25)


def _assess(engine: Engine, text: str) -> str:
    return json.dumps(engine.assess(json.loads(text), now=NOW).bundle())


def measure(engine: Engine, text: str, runs: int, *, collector: bool) -> tuple[float, float]:
    """Median milliseconds of the core and of json.loads alone, interleaved run by run.

    collector=False times both with the garbage collector off: a large parse triggers full
    collections of the whole heap, which inflate the floor more than the core.
    """
    core: list[float] = []
    floor: list[float] = []
    _assess(engine, text)  # warm-up: imports, model classes, regex caches
    if not collector:
        gc.disable()
    for _ in range(runs):
        # Each timing starts from a collected heap, so one's garbage is not charged to the other.
        gc.collect()
        t0 = time.process_time()
        json.loads(text)
        t1 = time.process_time()
        gc.collect()
        t2 = time.process_time()
        _assess(engine, text)
        t3 = time.process_time()
        floor.append((t1 - t0) * 1000)
        core.append((t3 - t2) * 1000)
    gc.enable()
    return statistics.median(core), statistics.median(floor)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=15, help="timed runs per size (default 15)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 1500, 5000])
    parser.add_argument("--profile", action="store_true", help="print the top functions")
    args = parser.parse_args()
    engine = Engine(load_knowledge())  # as the CLI builds it: output validation off
    rows = []
    for size in args.sizes:
        text = json.dumps(synthea.record(size))
        run = engine.assess(json.loads(text), now=NOW)
        tier = run.results[0].tier
        core, floor = measure(engine, text, args.n, collector=True)
        rows.append((size, core))
        print(
            f"{size:>5} entries, {len(text) // 1024:>5} KiB, tier {tier}: core median "
            f"{core:7.1f} ms, json.loads {floor:6.1f} ms, ratio {core / floor:4.1f}x, "
            f"{core / size * 1000:5.1f} us/entry"
        )
        core, floor = measure(engine, text, args.n, collector=False)
        print(
            f"{'':>33}collector off: core {core:7.1f} ms, json.loads {floor:6.1f} ms, "
            f"ratio {core / floor:4.1f}x"
        )
        if args.profile:
            profile = cProfile.Profile()
            profile.runcall(_assess, engine, text)
            pstats.Stats(profile).sort_stats("cumulative").print_stats(25)
    if len(rows) > 1:
        (n0, t0), (n1, t1) = rows[0], rows[-1]
        print(
            f"growth {n0} -> {n1} entries: {(t1 - t0) / (n1 - n0) * 1000:.1f} us per added entry "
            f"(time x{t1 / t0:.1f} for entries x{n1 / n0:.1f})"
        )


if __name__ == "__main__":
    main()
