"""The simulator's library scenarios: the figures of docs/simulations.md, and
the simulator's speed (wall time, events per second), optionally profiled.

Each scenario runs in this process with its own seed, so the figures are
exact for a given version of the code (run with PYTHONHASHSEED=0 to match
the docs); the time is this process's CPU time (steadier than wall time when
the machine is shared) and depends on the machine. ``large-1000`` runs
shortened (200 nodes, 10 s of workload, 10 s of warm-up) unless ``--full``.
``--profile`` prints the top costs (cProfile, by own time) of each scenario
run.

``--heal-1000 SEED ...`` measures instead the convergence after a heal at
N = 1000 as docs/simulations.md reports it: ``large-1000`` at full size
(1000 nodes, 334 cells: 256 founded, 78 admitted), but 20 s of workload at
10 operations per second over the federation (``workload.rate`` 0.01), the
halves split from 5 s to 15 s, sampled every 100 ms: 3 to 4 CPU minutes per
seed here. ``--set KEY=VALUE`` changes one more field (``workload.rate=0.05``).

    PYTHONHASHSEED=0 .venv/bin/python benchmarks/simulator.py [NAME ...] [--profile] [--full]
    PYTHONHASHSEED=0 .venv/bin/python benchmarks/simulator.py --heal-1000 1 2 3
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tomllib
from typing import Any

from _machine import describe

from archipel.simulations import run, scenario

SHORT_LARGE = {"nodes": 200, "duration_ms": 10_000, "workload.warmup_ms": 10_000}

HEAL_1000: dict[str, Any] = {
    "duration_ms": 20_000,
    "settle_ms": 60_000,
    "sample_ms": 100,
    "workload.rate": 0.01,
    "faults.0.at": 0.25,
    "faults.0.until": 0.75,
}
"""large-1000 at full size around one partition and its heal, at a low op rate."""

HEADER = (
    "| scenario | writes / reads | msgs/op | payload / control per write | bytes/write"
    " | delivery p50 / p99 / max | stable p50 / max | caught up after heals"
    " | converged after | lost | peak pending | events | CPU s, events/s of CPU |"
)


def row(name: str, result: run.Result) -> str:
    r = result.report
    ops, m, lat, conv = r["operations"], r["messages"], r["latency_ms"], r["convergence"]
    heals = "; ".join(f"{h['caught_up_ms']}" for h in conv["heals"]) or "(no heal)"
    has_reads = ops["reads"] > ops["live_nodes_at_end"]
    stable = f"{lat['stable']['p50']} / {lat['stable']['max']}" if has_reads else "—"
    d = lat["delivery"]
    cells: list[Any] = [
        name,
        f"{ops['writes']} / {ops['reads']}",
        m["msgs_per_op"],
        f"{m['payload_per_write']} / {m['control_per_write']}",
        m["bytes_per_write"],
        f"{d['p50']} / {d['p99']} / {d['max']}",
        stable,
        heals,
        conv["converged_ms_after_workload"],
        r["acknowledged_ops_lost"],
        r["peak_pending"],
        r["events"],
        f"{result.cpu_s:.1f} s, {result.events_per_cpu_s:,.0f}",
    ]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="library scenarios (default: all)")
    parser.add_argument("--profile", action="store_true", help="print each run's top costs")
    parser.add_argument("--full", action="store_true", help="large-1000 in full (very slow)")
    parser.add_argument(
        "--heal-1000", type=int, nargs="+", metavar="SEED", help="the N = 1000 heal, per seed"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="with --heal-1000"
    )
    args = parser.parse_args()
    print(f"# {describe()}")
    print(HEADER)
    print("|" + "---|" * HEADER.count(" | ") + "---|")
    if args.heal_1000:
        overrides = dict(HEAL_1000)
        for item in args.set:
            key, _, value = item.partition("=")
            overrides[key] = tomllib.loads(f"v = {value}")["v"]
        spec = scenario.load("large-1000", overrides)
        for seed in args.heal_1000:
            result = run.run(spec, seed=seed)
            print(row(f"large-1000 heal ({spec.nodes} nodes), seed {seed}", result), flush=True)
        return
    for name in args.names or scenario.library():
        short = name == "large-1000" and not args.full
        spec = scenario.load(name, SHORT_LARGE if short else None)
        profile = cProfile.Profile() if args.profile else None
        if profile is not None:
            profile.enable()
        result = run.run(spec)
        if profile is not None:
            profile.disable()
        label = f"{name} (200 nodes, 10 s, 10 s warm-up)" if short else name
        print(row(label, result), flush=True)
        if profile is not None:
            stats = pstats.Stats(profile, stream=sys.stdout)
            stats.sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
