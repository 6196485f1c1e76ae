"""Where a running node's memory goes as ops accumulate: the ops it holds, or anything else.

A node keeps every op of its federation in memory (the op graph, the records'
state, the sync index), so its memory must grow with the ops it holds; the
question a soak asks is whether *anything else* grows. This script answers it
with the allocations themselves (tracemalloc), in one process:

- three real nodes (``Node``, loopback sockets, SQLite, the sync protocol) of
  one federation; notes are authored round-robin over them in rounds of
  ``--per-round`` ops; after each round, once all hold every op and their
  timers have run (``--rest`` seconds), the traced memory is read;
- the per-op cost ``s`` is the slope of traced memory over the last half of the
  rounds, and the **residual** is traced memory minus ``s`` times the ops held:
  flat residual = nothing grows but what is proportional to the ops;
- the tables that grow per op only up to a cap (the push protocol's seen and
  recent ids, the arrival stamps) bend the curve once full; the residual
  then drops below its earlier level instead of rising;
- the allocation sites that grew most over the last half, with bytes per op.

    .venv/bin/python benchmarks/memory.py [--rounds 10] [--per-round 2000] [--rest 2]

Tracing slows the nodes several times; the run takes a few minutes. Every wait
is bounded (``CAP_S`` per round).
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path

import trio
from _machine import describe

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import nodes as fixtures  # tests/nodes.py: real nodes on loopback

from archipel.daemon.node import Node

CAP_S = 300.0
MIB = 1024 * 1024


def traced() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def rss_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def held(nodes: Sequence[Node]) -> int:
    return min(len(n.replica.graph) for n in nodes if n.replica is not None)


async def author_round(fed: fixtures.Fed, nodes: Sequence[Node], count: int, start: int) -> None:
    target = held(nodes) + count
    for i in range(count):
        await nodes[i % len(nodes)].author("note", {"text": f"note {start + i}"})
        if i % 64 == 63:
            await trio.sleep(0)  # let the network keep up
    with trio.fail_after(CAP_S):
        await fixtures.until(fed, lambda: fixtures.converged(nodes, target))


async def run(rounds: int, per_round: int, rest_s: float) -> None:
    root = Path(tempfile.mkdtemp(prefix="archipel-bench-memory-"))
    fed = fixtures.federation_on_disk(root, 3)
    rows: list[tuple[int, int, float]] = []
    snapshots: list[tracemalloc.Snapshot] = []
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(fixtures.running(fed, 0))
        boot = [first.listen_addrs[0]]
        nodes = [first]
        for i in (1, 2):
            nodes.append(await stack.enter_async_context(fixtures.running(fed, i, boot)))
        for r in range(rounds + 1):
            if r:
                started = time.perf_counter()
                await author_round(fed, nodes, per_round, (r - 1) * per_round)
                took = time.perf_counter() - started
            else:
                took = 0.0
            await trio.sleep(rest_s)
            rows.append((held(nodes), traced(), rss_mib()))
            if r in (rounds // 2, rounds):
                snapshots.append(tracemalloc.take_snapshot())
            ops, mem, rss = rows[-1]
            print(f"    round {r}: {ops} ops held, traced {mem / MIB:.1f} MiB, RSS {rss:.0f} MiB"
                  f" ({took:.0f} s)", flush=True)  # fmt: skip
    report(rows, snapshots)


def report(
    rows: list[tuple[int, int, float]],
    snapshots: list[tracemalloc.Snapshot],
) -> None:
    half = rows[len(rows) // 2 :]
    (o0, m0, _), (o1, m1, _) = half[0], half[-1]
    slope = (m1 - m0) / (o1 - o0)
    print(f"\nPer-op cost over the last half (slope): {slope / 3:.0f} bytes per op per node")
    print(
        "\n| ops held | traced, 3 nodes (MiB) | residual: traced - slope * ops (MiB) | RSS (MiB) |"
    )
    print("|---:|---:|---:|---:|")
    for ops, mem, rss in rows:
        print(f"| {ops:,} | {mem / MIB:.1f} | {(mem - slope * ops) / MIB:.2f} | {rss:.0f} |")
    last_ops = rows[-1][0]
    if len(snapshots) == 2:
        print(f"\nAllocation sites that grew most between {half[0][0]:,} and {last_ops:,} ops:")
        print("| site (innermost archipel frames) | growth (KiB) | bytes per op per node |")
        print("|---|---:|---:|")
        stats = snapshots[1].compare_to(snapshots[0], "traceback")
        for stat in stats[:15]:
            frames = [f for f in reversed(stat.traceback) if "archipel" in f.filename][:2]
            where = " ← ".join(f"{Path(f.filename).name}:{f.lineno}" for f in frames) or "(other)"
            per_op = stat.size_diff / (last_ops - half[0][0]) / 3
            print(f"| {where} | {stat.size_diff / 1024:.0f} | {per_op:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=2000)
    parser.add_argument("--rest", type=float, default=2.0, help="seconds after each round")
    args = parser.parse_args()
    if args.rounds < 2 or args.per_round < 1:
        parser.error("--rounds must be at least 2 and --per-round at least 1")
    print(f"# benchmarks/memory.py on {describe()}")
    tracemalloc.start(8)
    trio.run(run, args.rounds, args.per_round, args.rest)


if __name__ == "__main__":
    main()
