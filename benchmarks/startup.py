"""Start-up time with many stored ops: open the database and load a ready replica.

Goal: with 1M stored ops the node is ready within 5 s, without replaying them
all. The database is built once (authoring 1M signed ops takes minutes) and
cached: by default under /tmp, keyed by kind and size, or at ``--db``. It
holds the ops and a snapshot covering all but the last ``--tail`` of them
(the ops a node stored after its last snapshot, e.g. before a crash).

Each measure runs in a fresh process (a clean heap; its peak RSS is its own):

- ``open + load``: :meth:`Store.open` then :meth:`Store.load_replica`, the
  daemon's start-up, with the time of each step (read, MAC, unpickle, tail);
- baselines measured in the same run, the start-up without a snapshot:
  replaying every op as ``load_replica`` rebuilds (stored ops trusted,
  decoded, id-checked; reading the rows not counted), and replaying a prefix
  (``--baseline-ops``) with full decode and signature checks
  (``Replica.receive_bytes``, the naive path), extrapolated to all ops;
- how long :meth:`Store.save_snapshot` holds the event loop to serialise the
  replica, and a full garbage collection with and without ``gc.freeze``.

    .venv/bin/python benchmarks/startup.py [--ops 1000000] [--kind notes|mix]
        [--tail 10000] [--db PATH] [--baseline-ops 20000]

``notes`` are the cheapest op kind (small record state); ``mix`` is the
shared workload's mix of votes, claims, ledger entries, acts, proposals and
the rest (more record state per op), authored on one site.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nacl.signing
import trio
from _machine import describe

from archipel.crdt import Op, Replica, found_federation
from archipel.daemon import snapshot
from archipel.daemon.storage import Store
from archipel.simulations.workload import Workload

KEY = hashlib.blake2b(b"startup-benchmark", digest_size=32).digest()
T0 = 1_750_000_000_000
BUILD_BATCH = 2048


# -- building the database ---------------------------------------------------------


class _Authoring:
    """Authors ops one at a time on one replica: notes, or the workload's mix."""

    def __init__(self, kind: str, seed: int) -> None:
        self.rng = random.Random(seed)
        self.kind = kind
        if kind == "mix":
            # One site, no syncs (a sync re-sorts every op), and the lists of
            # what to refer to kept short: the workload scans them per op.
            self.workload = Workload(self.rng, sites=1, sync_every=2**62)
            self.replica = self.workload.sites[0]
            self.genesis = self.workload.genesis
        else:
            self.keys = [
                nacl.signing.SigningKey(hashlib.blake2b(b"member-%d" % i, digest_size=32).digest())
                for i in range(6)
            ]
            cells = [
                {"name": f"cell-{c}", "members": sorted(bytes(k.verify_key) for k in pair)}
                for c, pair in enumerate(zip(self.keys[::2], self.keys[1::2], strict=True))
            ]
            self.replica, self.genesis = found_federation(self.keys[0], "Startup", cells, T0)
            self.now_ms = T0

    def next(self) -> Op:
        if self.kind == "mix":
            workload = self.workload
            before = len(workload.ops)
            workload.run(1)
            opened = workload._open  # bounded here: see __init__
            opened.proposals = opened.proposals[-32:]
            opened.offers = opened.offers[-32:]
            opened.mandates = opened.mandates[-32:]
            assert len(workload.ops) == before + 1
            return workload.ops.pop()  # the workload keeps every op: it need not
        self.now_ms += self.rng.randint(1, 20)
        author = self.keys[self.rng.randrange(len(self.keys))]
        text = "minutes of the meeting " * self.rng.randint(1, 6)
        return self.replica.author(author, "note", {"text": text}, self.now_ms)


async def _build(path: Path, kind: str, count: int, tail: int, seed: int) -> dict[str, object]:
    started = time.perf_counter()
    authoring = _Authoring(kind, seed)
    info: dict[str, object] = {"kind": kind, "ops": count + 1, "tail": tail, "seed": seed}
    with Store.open(path, snapshot_key=KEY) as store:
        store.load_replica(authoring.genesis.federation, T0, freeze_gc=False)
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            batch = [authoring.genesis]
            for n in range(1, count + 1):
                batch.append(authoring.next())
                if len(batch) >= BUILD_BATCH or n == count - tail:
                    await store.append_remote(batch)
                    batch = []
                if n == count - tail:
                    await store.save_snapshot(authoring.replica)
                    info["snapshot_serialise_s"] = store.stats.snapshot_serialise_s
                    info["snapshot_write_s"] = store.stats.snapshot_write_s
                    info["snapshot_bytes"] = store.stats.snapshot_bytes
                if n % 100_000 == 0:
                    print(f"  built {n:,} ops in {time.perf_counter() - started:.0f} s", flush=True)
            await store.append_remote(batch)
            await store.flush()
            nursery.cancel_scope.cancel()
        info["stored"] = store.stored_count()
        info["federation"] = authoring.genesis.federation.hex()
        info["state_hash"] = authoring.replica.state_hash().hex()
    info["build_s"] = time.perf_counter() - started
    info["db_bytes"] = path.stat().st_size
    return info


def _refresh_snapshot(path: Path, info: dict[str, object]) -> None:
    """Write a new snapshot, covering the same ops, when the code changed since
    the database was built (the old snapshot's format tag no longer matches)."""
    with Store.open(path, snapshot_key=KEY) as store:
        (tag,) = store._read.execute("SELECT format FROM snapshot").fetchone()
        if tag == snapshot.format_tag():
            return
        print("refreshing the snapshot (the code changed since the database was built)")
        covered = int(info["ops"]) - int(info["tail"])  # type: ignore[call-overload]
        replica = Replica(bytes.fromhex(str(info["federation"])))
        gc.disable()
        cursor = 0
        while cursor < covered:
            rows = store.ops_since(cursor, min(10_000, covered - cursor))
            for cursor, data in rows:  # noqa: B007 (the last one is where to go on)
                replica.receive(snapshot.stored_op(data, _id(data)), T0 + 10**10)
        started = time.perf_counter()
        pieces = snapshot.dump(replica)
        info["snapshot_serialise_s"] = time.perf_counter() - started
        # Private: the snapshot covers exactly the first `covered` ops, not all.
        store._write_snapshot(pieces, covered)
        info["snapshot_write_s"] = store.stats.snapshot_write_s
        info["snapshot_bytes"] = store.stats.snapshot_bytes
        gc.enable()


# -- measures, each in its own process ---------------------------------------------


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_load(path: Path, federation: bytes) -> dict[str, object]:
    started = time.perf_counter()
    store = Store.open(path, snapshot_key=KEY)
    opened = time.perf_counter() - started
    replica = store.load_replica(federation, T0 + 10**10)
    ready = time.perf_counter() - started
    report = store.last_load
    assert report is not None
    result: dict[str, object] = {
        "open_s": opened,
        "ready_s": ready,
        "source": report.source,
        "reason": report.reason,
        "read_s": report.read_s,
        "mac_s": report.mac_s,
        "unpickle_s": report.unpickle_s,
        "tail": report.replayed,
        "tail_s": report.replay_s,
        "ops": len(replica.graph),
        "state_hash": replica.state_hash().hex(),
        "rss_mib": _rss_mib(),
    }
    started = time.perf_counter()
    gc.collect()
    result["gc_frozen_s"] = time.perf_counter() - started
    gc.unfreeze()
    started = time.perf_counter()
    gc.collect()
    result["gc_unfrozen_s"] = time.perf_counter() - started
    gc.disable()
    started = time.perf_counter()
    pieces = snapshot.dump(replica)
    result["serialise_s"] = time.perf_counter() - started
    result["snapshot_bytes"] = sum(len(p) for p in pieces)
    store.close()
    return result


def measure_replay(path: Path, federation: bytes, count: int, verify: bool) -> dict[str, object]:
    """Replay the first ``count`` stored ops into a fresh replica."""
    with Store.open(path, snapshot_key=KEY) as store:
        rows = []
        while len(rows) < count:
            more = store.ops_since(rows[-1][0] if rows else 0, count - len(rows))
            if not more:
                break
            rows += more
    replica = Replica(federation)
    now = T0 + 10**10
    gc.disable()
    started = time.perf_counter()
    for _, data in rows:
        if verify:
            replica.receive_bytes(data, now)
        else:
            replica.receive(snapshot.stored_op(data, _id(data)), now)
    seconds = time.perf_counter() - started
    assert len(replica.graph) == len(rows)
    return {"ops": len(rows), "seconds": seconds}


def measure_writer(path: Path, federation: bytes, count: int) -> dict[str, object]:
    """Write ``count`` stored ops into a new database through the writer:
    remote batches, with one op in 256 through ``append_local`` (a local op
    among peers' ops), while a task measures how late a 1 ms sleep wakes up."""
    with Store.open(path, snapshot_key=KEY) as source:
        rows: list[tuple[int, bytes]] = []
        while len(rows) < count:
            more = source.ops_since(rows[-1][0] if rows else 0, count - len(rows))
            if not more:
                break
            rows += more
    ops = [snapshot.stored_op(data, _id(data)) for _, data in rows]
    target = Path(tempfile.mkdtemp(prefix="archipel-writer-")) / "node.db"
    result: dict[str, object] = {"ops": len(ops)}

    async def run() -> None:
        worst = 0.0
        latencies: list[float] = []

        async def ticker() -> None:
            nonlocal worst
            while True:
                before = trio.current_time()
                await trio.sleep(0.001)
                worst = max(worst, trio.current_time() - before - 0.001)

        async def local(op: Op) -> None:
            before = time.perf_counter()
            await store.append_local(op)
            latencies.append(time.perf_counter() - before)

        with trio.move_on_after(2):  # the control: how late it wakes with no writes
            await ticker()
        result["idle_stall_ms"] = worst * 1000
        worst = 0.0
        with Store.open(target, snapshot_key=KEY) as store:
            store.load_replica(federation, T0, freeze_gc=False)
            async with trio.open_nursery() as nursery:
                await nursery.start(store.run)
                nursery.start_soon(ticker)
                started = time.perf_counter()
                async with trio.open_nursery() as locals_:
                    for i in range(0, len(ops), 256):
                        chunk = ops[i : i + 256]
                        await store.append_remote(chunk[:-1])
                        locals_.start_soon(local, chunk[-1])
                    await store.flush()
                result["seconds"] = time.perf_counter() - started
                nursery.cancel_scope.cancel()
            result["transactions"] = store.stats.transactions
        latencies.sort()
        result["local_p50_ms"] = latencies[len(latencies) // 2] * 1000
        result["local_p99_ms"] = latencies[len(latencies) * 99 // 100] * 1000
        result["worst_stall_ms"] = worst * 1000

    trio.run(run)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{target}{suffix}").unlink(missing_ok=True)
    target.parent.rmdir()
    return result


def _id(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=32).digest()


def _child(*args: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, __file__, "--measure", *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


# -- main ---------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=1_000_000, help="ops besides the genesis")
    parser.add_argument("--kind", choices=("notes", "mix"), default="notes")
    parser.add_argument("--tail", type=int, default=10_000, help="ops stored after the snapshot")
    parser.add_argument("--db", type=Path, help="database to build or reuse")
    parser.add_argument("--baseline-ops", type=int, default=20_000)
    parser.add_argument("--writer-ops", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--measure", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.measure:
        what, path, federation, *rest = args.measure
        fed = bytes.fromhex(federation)
        if what == "load":
            result = measure_load(Path(path), fed)
        elif what == "writer":
            result = measure_writer(Path(path), fed, int(rest[0]))
        else:
            result = measure_replay(Path(path), fed, int(rest[0]), what == "verify")
        print(json.dumps(result))
        return 0

    path = args.db or Path(f"/tmp/archipel-startup-{args.kind}-{args.ops}-{args.tail}.db")
    meta = Path(f"{path}.json")
    if not (path.exists() and meta.exists()):
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        print(f"building {path} ({args.ops:,} {args.kind} ops; cached for later runs)")
        info = trio.run(_build, path, args.kind, args.ops, args.tail, args.seed)
        meta.write_text(json.dumps(info, indent=1))
    info = json.loads(meta.read_text())
    _refresh_snapshot(path, info)
    meta.write_text(json.dumps(info, indent=1))
    federation = info["federation"]
    total = info["ops"]

    load = _child("load", str(path), federation)
    verify = _child("verify", str(path), federation, str(args.baseline_ops))
    trusted = _child("trusted", str(path), federation, str(total))
    writer = _child("writer", str(path), federation, str(args.writer_ops))
    assert load["state_hash"] == info["state_hash"], "the loaded replica holds other ops"
    assert load["source"] == "snapshot", load["reason"]

    _report(path, info, load=load, verify=verify, trusted=trusted, writer=writer)
    ready = float(load["ready_s"])  # type: ignore[arg-type]
    verdict = "meets" if ready <= 5 else "MISSES"
    print(f"Goal: ready within 5 s with {total:,} ops; it took {ready:.2f} s: {verdict} it.")
    return 0 if ready <= 5 else 1


Result = dict[str, object]


def _report(
    path: Path, info: Result, *, load: Result, verify: Result, trusted: Result, writer: Result
) -> None:
    total = int(info["ops"])  # type: ignore[call-overload]

    def extrapolate(r: Result) -> float:
        return float(r["seconds"]) / int(r["ops"]) * total  # type: ignore[arg-type, call-overload]

    print(f"machine: {describe()}; load average {os.getloadavg()[0]:.2f} at the start")
    print(
        f"database: {path} ({info['db_bytes'] / 2**20:,.0f} MiB), {total:,} {info['kind']} ops,"
        f" snapshot of {info['snapshot_bytes'] / 2**20:,.0f} MiB covering all but the last"
        f" {info['tail']:,}; built in {info['build_s']:.0f} s"
    )
    print()
    print(f"| {'measure':<66} | {'seconds':>8} |")
    print(f"|{'-' * 68}|{'-' * 10}|")
    rows = [
        ("open (Store.open)", load["open_s"]),
        ("  read the snapshot", load["read_s"]),
        ("  check its MAC", load["mac_s"]),
        ("  unpickle the replica", load["unpickle_s"]),
        (f"  replay the tail ({load['tail']:,} ops)", load["tail_s"]),
        ("open + load: ready replica (goal <= 5 s)", load["ready_s"]),
        ("baseline: replay all ops as a rebuild does (trusted)", trusted["seconds"]),
        (
            f"baseline: replay all, receive_bytes (on {verify['ops']:,}, extrapolated)",
            extrapolate(verify),
        ),
        ("save_snapshot: serialise (holds the event loop)", load["serialise_s"]),
        ("save_snapshot: write, in the writer's thread (at build)", info["snapshot_write_s"]),
        ("full gc.collect() after load, heap frozen (default)", load["gc_frozen_s"]),
        ("full gc.collect() after load, heap not frozen", load["gc_unfrozen_s"]),
    ]
    for name, seconds in rows:
        print(f"| {name:<66} | {seconds:>8.2f} |")
    print(f"\npeak RSS of the loading process: {load['rss_mib']:,.0f} MiB")
    print(
        f"writer: {writer['ops']:,} ops into a new database (one in 256 through append_local)"
        f" in {writer['seconds']:.2f} s = {writer['ops'] / writer['seconds']:,.0f} ops/s,"
        f" {writer['transactions']:,} transactions; append_local returned in"
        f" {writer['local_p50_ms']:.1f} ms (median), {writer['local_p99_ms']:.1f} ms (p99);"
        f" worst event-loop stall {writer['worst_stall_ms']:.1f} ms (in 2 s with no writes,"
        f" same ticker: {writer['idle_stall_ms']:.1f} ms)"
    )


if __name__ == "__main__":
    sys.exit(main())
