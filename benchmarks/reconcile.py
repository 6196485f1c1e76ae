"""Set reconciliation (Negentropy v1, protocol/negentropy.py) beside a naive exchange.

For n items and d differences, half of the differing items are on the client
only and half on the server only (each side holds n - d/2 items, the union n).
The differences are either *clustered* (the newest d items, as after a
partition) or *scattered* uniformly. For each case the script prints the
round trips, the bytes each way, the CPU time each side spends in the
protocol, and, measured in the same run, a naive full id-list exchange: each
side sends all its ids (32 B each) and diffs the other's list against its own.
It checks that the client's have/need ids are exactly the set differences,
and prints the goals as met or missed.

    .venv/bin/python benchmarks/reconcile.py [--sizes 10000,100000,1000000]
        [--diffs 0,1,100,10000] [--layouts clustered,scattered] [--frame 60000]
        [--policy ours|reference] [--seed 1]

Items look like Archipel ops: hybrid-clock timestamps (ms << 16 | counter),
about one op a second, and random 32-byte ids. Building a side's store (sort
order is given, the prefix sums are computed) is timed apart from the
protocol: a node keeps its store and updates it as ops arrive.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from array import array
from dataclasses import dataclass

from _machine import describe, pin_to_one_core

from archipel.protocol.negentropy import (
    CLIENT_POLICY,
    ID_SIZE,
    REFERENCE_POLICY,
    SERVER_POLICY,
    NegentropyClient,
    NegentropyLimits,
    NegentropyServer,
    SortedItems,
)

T0_MS = 1_750_000_000_000


@dataclass
class Base:
    """n items in (timestamp, id) order, as flat arrays reused by every case."""

    ts: array[int]
    ids: bytes


@dataclass
class Result:
    rounds: int
    up: int
    down: int
    cpu_client: float
    cpu_server: float
    build: float
    naive_cpu: float


def make_base(n: int, rng: random.Random) -> Base:
    ts = array("Q")
    ms = T0_MS
    for _ in range(n):
        ms += int(rng.expovariate(1 / 1000)) + 1
        ts.append(ms << 16 | rng.randrange(4))
    return Base(ts, os.urandom(ID_SIZE * n))


def split_sides(
    base: Base, diff: list[int]
) -> tuple[SortedItems, SortedItems, set[bytes], set[bytes]]:
    """Client and server stores: differing item k goes to the client alone if
    its rank in ``diff`` is even, to the server alone if odd."""
    only_client = sorted(diff[0::2])
    only_server = sorted(diff[1::2])

    def without(drop: list[int]) -> SortedItems:
        ts, ids, prev = array("Q"), bytearray(), 0
        for i in drop:
            ts.extend(base.ts[prev:i])
            ids += base.ids[ID_SIZE * prev : ID_SIZE * i]
            prev = i + 1
        ts.extend(base.ts[prev:])
        ids += base.ids[ID_SIZE * prev :]
        return SortedItems.from_sorted(ts, bytes(ids), check=False)

    def id_set(index: list[int]) -> set[bytes]:
        return {base.ids[ID_SIZE * i : ID_SIZE * i + ID_SIZE] for i in index}

    return without(only_server), without(only_client), id_set(only_client), id_set(only_server)


def naive(client: SortedItems, server: SortedItems) -> float:
    """CPU seconds for one side of a full id exchange: take the peer's list, diff."""
    start = time.process_time()
    mine = client.ids(0, len(client))
    theirs = bytes(server.ids(0, len(server)))  # as received
    a = {mine[i : i + ID_SIZE] for i in range(0, len(mine), ID_SIZE)}
    b = {theirs[i : i + ID_SIZE] for i in range(0, len(theirs), ID_SIZE)}
    _ = (a - b, b - a)
    return time.process_time() - start


def run_case(base: Base, diff: list[int], limits: NegentropyLimits, reference: bool) -> Result:
    start = time.process_time()
    client_store, server_store, want_have, want_need = split_sides(base, diff)
    build = (time.process_time() - start) / 2
    policies = (REFERENCE_POLICY, REFERENCE_POLICY) if reference else (CLIENT_POLICY, SERVER_POLICY)
    client = NegentropyClient(client_store, limits, policies[0])
    server = NegentropyServer(server_store, limits, policies[1])
    cpu_c = cpu_s = 0.0
    have: set[bytes] = set()
    need: set[bytes] = set()
    reported = 0
    t = time.process_time()
    msg: bytes | None = client.initiate()
    cpu_c += time.process_time() - t
    while msg is not None:
        t = time.process_time()
        reply = server.reconcile(msg)
        t2 = time.process_time()
        msg, h, n = client.reconcile(reply)
        cpu_s += t2 - t
        cpu_c += time.process_time() - t2
        have.update(h)
        need.update(n)
        reported += len(h) + len(n)
    if have != want_have or need != want_need or reported != len(have) + len(need):
        raise SystemExit(f"WRONG RESULT: have {len(have)}/{len(want_have)}, need {len(need)}")
    s = client.stats
    return Result(
        server.stats.messages_received,
        s.bytes_sent,
        s.bytes_received,
        cpu_c,
        cpu_s,
        build,
        naive(client_store, server_store),
    )


def pick(n: int, d: int, layout: str, rng: random.Random) -> list[int]:
    if layout == "clustered":
        return list(range(n - d, n))
    return rng.sample(range(n), d)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--diffs", default="0,1,100,10000")
    parser.add_argument("--layouts", default="clustered,scattered")
    parser.add_argument("--frame", type=int, default=NegentropyLimits().frame_size_limit)
    parser.add_argument("--policy", choices=("ours", "reference"), default="ours")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    pinned = pin_to_one_core()
    rng = random.Random(args.seed)
    limits = NegentropyLimits(frame_size_limit=args.frame)
    reference = args.policy == "reference"
    sizes = [int(x) for x in args.sizes.split(",")]
    diffs = [int(x) for x in args.diffs.split(",")]
    layouts = args.layouts.split(",")
    print(f"machine: {describe()}; {pinned}")
    print(f"frame size limit {args.frame} B; split policy: {args.policy}; seed {args.seed}")
    print()
    print(
        "|       n |      d | layout    | RTs |    up B |  down B | B/diff | cpu cl s | cpu sv s"
        " | build s | naive B each way | naive cpu s |"
    )
    print("|" + "|".join("-" * w for w in (9, 8, 11, 5, 9, 9, 8, 10, 10, 9, 18, 13)) + "|")
    results: dict[tuple[int, int, str], Result] = {}
    for n in sizes:
        base = make_base(n, rng)
        cases = [(d, lay) for d in diffs for lay in layouts if d <= n]
        if n == 100_000 and "clustered" in layouts:
            cases.append((1000, "clustered"))  # the CPU goal's case
        for d, layout in cases:
            if d == 0 and layout != layouts[0]:
                continue  # no differences: the layouts are the same case
            r = run_case(base, pick(n, d, layout, rng), limits, reference)
            results[n, d, layout] = r
            per = f"{(r.up + r.down) / d:6.1f}" if d else "     -"
            print(
                f"| {n:7d} | {d:6d} | {layout:9s} | {r.rounds:3d} | {r.up:7d} | {r.down:7d} |"
                f" {per} | {r.cpu_client:8.3f} | {r.cpu_server:8.3f} | {r.build:7.2f} |"
                f" {(n - d // 2) * ID_SIZE:16d} | {r.naive_cpu:11.3f} |"
            )
            sys.stdout.flush()
    print()
    report_goals(results)
    return 0


def report_goals(results: dict[tuple[int, int, str], Result]) -> None:
    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    for layout in ("clustered", "scattered"):
        r = results.get((1_000_000, 1, layout))
        if r:
            ok = r.rounds <= 3 and r.up + r.down <= 2000
            print(
                f"goal 1 diff in 1M ({layout}): <= 3 round trips and <= 2 kB:"
                f" {r.rounds} RTs, {r.up + r.down} B: {verdict(ok)}"
            )
    for (n, d, layout), r in sorted(results.items()):
        if layout == "clustered" and d >= 100:
            per = (r.up + r.down) / d
            met = verdict(per <= 40)
            print(f"goal clustered d >= 100: <= 40 B/diff, n={n} d={d}: {per:.1f} B: {met}")
    for (n, d, layout), r in sorted(results.items()):
        if layout == "scattered" and d:
            ratio = (r.up + r.down) / (2 * (n - d // 2) * ID_SIZE)
            print(
                f"scattered n={n} d={d}: {(r.up + r.down) / d:.0f} B/diff,"
                f" {ratio:.1%} of the naive exchange's bytes"
            )
    r = results.get((100_000, 1000, "clustered"))
    if r:
        worst = max(r.cpu_client, r.cpu_server)
        print(
            f"goal 100k items, 1k clustered diffs: <= 1 s CPU per side:"
            f" client {r.cpu_client:.3f} s,"
            f" server {r.cpu_server:.3f} s: {verdict(worst <= 1.0)}"
        )


if __name__ == "__main__":
    sys.exit(main())
