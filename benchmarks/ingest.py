"""Ingest speed: decode + verify + validate + apply of signed ops, on one core.

Prints ops/s for the full path next to the raw pynacl (libsodium) Ed25519
verify rate over the same ops, measured in the same run: verification is the
physical bound for ingest, and the goal is to reach at least half of it. Also
prints the rate of state apply alone (ops already decoded and verified), whose
goal is 100k ops/s.

    .venv/bin/python benchmarks/ingest.py [--ops N] [--rounds R] [--seed S]

The ops come from the shared workload generator (simulations/workload.py): a
realistic mix dominated by votes, aid claims, ledger entries and acts under
mandates, authored on three sites that sync now and then, so the graph has
concurrency and ops refer to each other as in real use. They are generated
first (not timed), then ingested by fresh replicas in causal order (the
common case: live push) and shuffled (ops that arrive early wait in the
pending set).
"""

from __future__ import annotations

import argparse
import collections
import random
import statistics
import sys
import time
from collections.abc import Callable

import nacl
import nacl.bindings
import nacl.signing
from _machine import describe, pin_to_one_core

from archipel.crdt import OP_SIGNING_DOMAIN, GraphLimits, Replica
from archipel.simulations.workload import Workload

T0 = 1_750_000_000_000


def best_rate(run: Callable[[], int], rounds: int) -> float:
    """Ops per second of the fastest of ``rounds`` runs (least disturbed by noise)."""
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        n = run()
        rates.append(n / (time.perf_counter() - start))
    return max(rates)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=20_000, help="ops to ingest (default 20000)")
    parser.add_argument("--rounds", type=int, default=5, help="runs of each measure (best kept)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    pinned = pin_to_one_core()
    rng = random.Random(args.seed)
    workload = Workload(rng)
    ops = workload.run(args.ops)
    federation = workload.genesis.federation
    blobs = [op.data for op in ops]
    shuffled = blobs[:]
    rng.shuffle(shuffled)
    deliver_at = workload.now_ms + 1

    # Raw verify, as the op decoder calls it: domain + unsigned bytes, signature.
    prepared = [(OP_SIGNING_DOMAIN + b"\x98" + d[1:-66], d[-64:], d) for d in blobs]
    authors = [op.author for op in ops]

    def raw_verify_key() -> int:
        for (message, signature, _), author in zip(prepared, authors, strict=True):
            nacl.signing.VerifyKey(author).verify(message, signature)
        return len(prepared)

    def raw_bindings() -> int:
        verify = nacl.bindings.crypto_sign_open
        for (message, signature, _), author in zip(prepared, authors, strict=True):
            verify(signature + message, author)
        return len(prepared)

    def ingest(order: list[bytes]) -> Callable[[], int]:
        def run() -> int:
            # A full shuffle can leave nearly every op waiting: size the bound to it.
            limits = GraphLimits(max_pending=len(order))
            replica = Replica(federation, graph_limits=limits)
            for data in order:
                replica.receive_bytes(data, deliver_at)
            assert len(replica.graph) == len(order), "not every op was applied"
            return len(order)

        return run

    def apply_only() -> int:
        replica = Replica(federation)
        for op in ops:
            replica.receive(op, deliver_at)
        return len(ops)

    measures = [
        ("raw verify: VerifyKey(author).verify (baseline)", raw_verify_key),
        ("raw verify: bindings.crypto_sign_open", raw_bindings),
        ("ingest, causal order (decode+verify+validate+apply)", ingest(blobs)),
        ("ingest, shuffled order (pending set in use)", ingest(shuffled)),
        ("state apply only (decoded, verified; goal 100k/s)", apply_only),
    ]
    rows = [(name, best_rate(run, args.rounds)) for name, run in measures]
    baseline = rows[0][1]
    sizes = [len(b) for b in blobs]
    print(f"machine: {describe()}; {pinned}")
    print(f"pynacl {nacl.__version__} (bundled libsodium)")
    kinds = collections.Counter(op.kind for op in ops)
    print(
        f"{len(ops)} ops by {len(workload.members)} members of {len(workload.sites)} sites;"
        f" op size median {statistics.median(sizes):.0f} B;"
        f" deps per op mean {statistics.mean(len(op.deps) for op in ops):.2f};"
        f" best of {args.rounds} runs"
    )
    print("mix: " + ", ".join(f"{kind} {n}" for kind, n in kinds.most_common()))
    print()
    print(f"| {'measure':<52} | {'ops/s':>9} | {'µs/op':>7} | {'vs verify':>9} |")
    print(f"|{'-' * 54}|{'-' * 11}|{'-' * 9}|{'-' * 11}|")
    for name, rate in rows:
        print(f"| {name:<52} | {rate:>9,.0f} | {1e6 / rate:>7.1f} | {rate / baseline:>8.0%} |")
    ratio = rows[2][1] / baseline
    verdict = "meets" if ratio >= 0.5 else "MISSES"
    apply_rate = rows[4][1]
    print(
        f"Goal: state apply >= 100,000 ops/s; it is {apply_rate:,.0f}:"
        f" {'meets' if apply_rate >= 100_000 else 'MISSES'} it."
    )
    print(
        f"\nGoal: ingest >= 50% of raw verify; causal-order ingest is at {ratio:.0%}: {verdict} it."
    )
    return 0 if ratio >= 0.5 and apply_rate >= 100_000 else 1


if __name__ == "__main__":
    sys.exit(main())
