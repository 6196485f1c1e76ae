"""Real daemons on loopback (issue #8): convergence after a heal, the sustained op
rate with full delivery, and RSS and descriptors over a soak.

Runs ``archipel cluster`` scenarios through the harness (cli/cluster) and
prints what docs/benchmarks.md records. Three parts, each optional:

- ``heal``: the ``partition-halves`` scenario (two halves for 15 s under every
  kind of work) with 5 and with 10 daemons: how long after the heal every op
  acknowledged before it is on every daemon. Baseline in the same run: the
  delivery latency of ops sent while no fault was in force.
- ``rate``: no faults, notes only, at rising rates per daemon: the highest
  total rate at which every acknowledged op reached every daemon and the
  daemons settled within 10 s of the workload's end, with its latency.
- ``soak``: the ``soak`` scenario (10 minutes, 5 daemons, a fault a minute):
  each daemon's RSS and open descriptors in the first and last minute.

    .venv/bin/python benchmarks/cluster.py [heal] [rate] [soak] [--out DIR]

Every run is bounded: scenarios end by themselves (duration plus settle_s).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import trio
from _machine import describe

from archipel.cli.cluster import report as report_mod
from archipel.cli.cluster.daemons import Daemon, free_port
from archipel.cli.cluster.harness import daemon_config, run_cluster
from archipel.cli.cluster.scenario import ClusterScenario, Workload, load, with_nodes
from archipel.daemon import identity as identity_mod
from archipel.daemon.paths import Home

RATES = (5.0, 10.0, 20.0, 40.0)
RATE_NODES = 5
RATE_SECONDS = 30.0


def quiet(_: str) -> None:
    pass


def one(scenario: ClusterScenario, out: Path) -> dict[str, Any]:
    started = time.perf_counter()
    report = trio.run(run_cluster, scenario, out, quiet)
    report_mod.write(report, out)
    print(f"    ({scenario.name}, {scenario.nodes} daemons: {time.perf_counter() - started:.0f} s"
          f" wall, report in {out})")  # fmt: skip
    return report


def heal(root: Path) -> None:
    print("\n## Convergence after a heal (partition-halves: two halves for 15 s)")
    print("| daemons | ops acked before heal | all on every daemon after | calm delivery p50 / p99"
          " | acked ops/s | checks |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---|")
    for n in (5, 10):
        scenario = with_nodes(load("partition-halves"), n)
        report = one(scenario, root / f"heal-{n}")
        h = report["heals"][0]
        calm = report["latency_calm_ms"]
        print(f"| {n} | {h['ops_before']} | {h['convergence_ms']} ms |"
              f" {calm['p50']} / {calm['p99']} ms | {report['ops']['acknowledged_per_s']} |"
              f" {'ok' if report['ok'] else 'FAILED'} |")  # fmt: skip


def rate(root: Path) -> None:
    print(f"\n## Sustained op rate with full delivery ({RATE_NODES} daemons, notes, no faults,"
          f" {RATE_SECONDS:g} s per rate)")  # fmt: skip
    print("| asked (ops/s, all daemons) | acknowledged ops/s | full delivery | settled after"
          " | delivery p50 / p99 / max |")  # fmt: skip
    print("|---:|---:|---|---:|---:|")
    base = ClusterScenario(
        name="rate", nodes=RATE_NODES, duration_s=RATE_SECONDS, settle_s=30.0, faults=()
    )
    best = None
    for per_node in RATES:
        scenario = replace(base, workload=Workload(rate=per_node, mix=(("note", 1.0),)))
        report = one(scenario, root / f"rate-{per_node:g}")
        full = report["ok"] and report["settle_s"] is not None and report["settle_s"] <= 10
        lat = report["latency_ms"]
        print(f"| {per_node * RATE_NODES:g} | {report['ops']['acknowledged_per_s']} |"
              f" {'yes' if full else 'NO'} | {report['settle_s']} s |"
              f" {lat['p50']} / {lat['p99']} / {lat['max']} ms |")  # fmt: skip
        if full:
            best = report["ops"]["acknowledged_per_s"]
    print(f"\nHighest sustained rate with full delivery: {best} ops/s")


def soak(root: Path) -> None:
    print("\n## Soak (10 minutes, 5 daemons, 3 ops/s each, a fault a minute)")
    report = one(load("soak"), root / "soak")
    soaked: dict[str, tuple[float, float, float, float]] = {}
    for name, res in report["resources"].items():
        samples = res["samples"]
        if not samples:
            continue
        end = samples[-1][0]
        first = [s for s in samples if s[0] <= samples[0][0] + 60]
        last = [s for s in samples if s[0] >= end - 60]
        rss0, rss1 = (statistics.median(s[1] for s in part) / 1024 for part in (first, last))
        fd0, fd1 = (statistics.median(s[2] for s in part) for part in (first, last))
        soaked[name] = (rss0, rss1, fd0, fd1)
    acked, settled = report["ops"]["acknowledged"], report["settle_s"]
    verdict = "all passed" if report["ok"] else "FAILED"
    print(f"acknowledged {acked} ops; checks {verdict}; settled in {settled} s")
    print(f"Baseline: the same {len(soaked)} homes (the same stored ops) restarted fresh and"
          f" connected to each other, no workload, RSS median over {FRESH_SAMPLE_S:g} s"
          " once they have met")  # fmt: skip
    fresh = trio.run(_fresh_rss, root / "soak" / "nodes", len(soaked))
    print("| daemon | starts | RSS first → last minute (MiB) | fresh, same ops (MiB) |"
          " soaked - fresh (MiB) | fds first → last | fresh fds |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (rss0, rss1, fd0, fd1) in soaked.items():
        starts = report["resources"][name]["starts"]
        f_rss, f_fds = fresh[name]
        print(f"| {name} | {starts} | {rss0:.0f} → {rss1:.0f} | {f_rss:.0f} |"
              f" {rss1 - f_rss:+.0f} | {fd0:g} → {fd1:g} | {f_fds:g} |")  # fmt: skip


FRESH_SAMPLE_S = 10.0
FRESH_MEET_S = 10.0


async def _fresh_rss(nodes: Path, n: int) -> dict[str, tuple[float, float]]:
    """Start a fresh daemon on each soaked home, all connected directly (no
    proxy), let them meet, and return each one's median RSS (MiB) and fds."""
    daemons = []
    for i in range(n):
        home = Home(nodes / f"node{i}")
        daemons.append(Daemon(i, home, identity_mod.load(home.identity), free_port()))
    direct = {(a.index, b.index): b.port for a in daemons for b in daemons if a is not b}
    for d in daemons:
        d.home.config.write_text(daemon_config(d, daemons, direct), encoding="utf-8")
    async with trio.open_nursery() as nursery:
        try:
            async with trio.open_nursery() as starting:
                for d in daemons:
                    starting.start_soon(d.start, nursery)
            await trio.sleep(FRESH_MEET_S)
            started = trio.current_time()
            while trio.current_time() - started < FRESH_SAMPLE_S:
                for d in daemons:
                    d.sample(trio.current_time() - started)
                await trio.sleep(1.0)
        finally:
            with trio.CancelScope(shield=True):
                for d in daemons:
                    await d.stop()
            nursery.cancel_scope.cancel()
    return {
        d.name: (
            statistics.median(s[1] for s in d.samples) / 1024,
            statistics.median(s[2] for s in d.samples),
        )
        for d in daemons
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("parts", nargs="*", choices=["heal", "rate", "soak"], default=None)
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here")
    args = parser.parse_args()
    parts = args.parts or ["heal", "rate", "soak"]
    root = args.out or Path(tempfile.mkdtemp(prefix="archipel-bench-cluster-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"# benchmarks/cluster.py on {describe()}")
    print(f"runs in {root}")
    for part in parts:
        {"heal": heal, "rate": rate, "soak": soak}[part](root)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
