"""Crash safety: kill -9 the writer at random instants; no acknowledged op is lost.

A child process opens the store, loads its replica (snapshot plus tail, as
the daemon does) and writes in bursts: concurrent ``Store.append_local``
calls (each prints the op's id on stdout once the call has returned: the op
is then acknowledged), batches of "remote" ops through ``append_remote``,
and now and then a snapshot. The parent SIGKILLs it by PID at a random
instant, reopens the database and checks that every op ever acknowledged is
stored, that ``PRAGMA integrity_check`` says ok, and that the replica loads
and holds them. The same database is used across runs, so each child also
starts from what the previous kill left.

    .venv/bin/python benchmarks/crash.py [--runs 100] [--dir DIR] [--max-delay 2.0]

Exit status 0 only if every run passed. What this does not test: a kill -9
leaves the kernel's page cache intact, so it shows that commits are atomic
and that the database always opens, not that fsync reached the disk (that
needs a power cut, or a filesystem that drops unsynced writes).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import nacl.signing
import trio

from archipel.crdt import Op, Replica, found_federation
from archipel.daemon.storage import Store

KEY = hashlib.blake2b(b"crash-benchmark", digest_size=32).digest()
T0 = 1_750_000_000_000
READY = "ready"
SNAPSHOT_BEGIN = "snapshot-begin"
SNAPSHOT_END = "snapshot-end"


def _member(n: int) -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey(hashlib.blake2b(b"crash-%d" % n, digest_size=32).digest())


def _genesis() -> tuple[Replica, Op]:
    """The same federation every run: founded at T0 by member 0 of one cell."""
    cell = {"name": "crash", "members": sorted(bytes(_member(i).verify_key) for i in range(3))}
    return found_federation(_member(0), "Crash", [cell], T0)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


# -- the child: writes until killed ---------------------------------------------------


async def child(path: Path, seed: int, max_ops: int) -> None:
    rng = random.Random(seed)
    _, genesis = _genesis()
    store = Store.open(path, snapshot_key=KEY)
    replica = store.load_replica(genesis.federation, _now_ms())
    report = store.last_load
    assert report is not None
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        if genesis.id not in replica.graph:
            replica.receive(genesis, _now_ms())
            await store.append_local(genesis)
            print(genesis.id.hex(), flush=True)
        print(f"{READY} {report.source} {len(replica.graph)}", flush=True)

        async def local() -> None:
            op = replica.author(_member(1), "note", {"text": "x" * rng.randint(1, 200)}, _now_ms())
            await store.append_local(op)
            print(op.id.hex(), flush=True)

        written = 0
        while written < max_ops:
            burst = rng.randint(1, 40)
            async with trio.open_nursery() as tasks:
                for _ in range(burst):
                    tasks.start_soon(local)
            remote = [
                replica.author(_member(2), "note", {"text": "y" * rng.randint(1, 200)}, _now_ms())
                for _ in range(rng.randint(0, 100))
            ]
            await store.append_remote(remote)
            written += burst + len(remote)
            if rng.randrange(20) == 0:
                print(SNAPSHOT_BEGIN, flush=True)
                await store.save_snapshot(replica)
                print(SNAPSHOT_END, flush=True)
        nursery.cancel_scope.cancel()
    store.close()


# -- the parent: kills and checks --------------------------------------------------------


class _Lines:
    """Reads a child's stdout on a thread, so that its pipe never fills."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self.ready = threading.Event()
        assert process.stdout is not None
        self._stdout = process.stdout
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self._stdout:
            if not line.endswith("\n"):
                break  # cut by the kill: not acknowledged as a whole
            self.lines.append(line.rstrip("\n"))
            if line.startswith(READY):
                self.ready.set()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def run_once(path: Path, seed: int, max_delay: float, acked: set[bytes]) -> dict[str, object]:
    process = subprocess.Popen(
        [sys.executable, __file__, "--child", str(path), "--seed", str(seed)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = _Lines(process)
    result: dict[str, object] = {"seed": seed}
    if not lines.ready.wait(timeout=600):
        process.kill()
        process.wait(timeout=60)
        assert process.stderr is not None
        result["failure"] = "the child never became ready: " + process.stderr.read()[-2000:]
        return result
    delay = random.Random(seed).uniform(0, max_delay)
    time.sleep(delay)  # the random instant (the parent is not a trio program)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    lines.join(timeout=60)
    ready = next(line for line in lines.lines if line.startswith(READY))
    result["start"] = ready.split()[1]
    new = {bytes.fromhex(line) for line in lines.lines if len(line) == 64}
    marks = [line for line in lines.lines if line in (SNAPSHOT_BEGIN, SNAPSHOT_END)]
    result["snapshots"] = marks.count(SNAPSHOT_END)
    result["in_snapshot"] = bool(marks) and marks[-1] == SNAPSHOT_BEGIN
    acked |= new
    result["acked"] = len(new)
    result["delay"] = delay

    conn = sqlite3.connect(path)
    try:
        integrity = conn.execute("PRAGMA integrity_check").fetchall()
        stored = {bytes(i) for (i,) in conn.execute("SELECT id FROM ops")}
    finally:
        conn.close()
    missing = acked - stored
    result["integrity"] = integrity == [("ok",)]
    result["missing"] = len(missing)
    _, genesis = _genesis()
    try:
        with Store.open(path, snapshot_key=KEY) as store:
            replica = store.load_replica(genesis.federation, _now_ms(), freeze_gc=False)
            report = store.last_load
            assert report is not None
            result["loads"] = all(i in replica.graph for i in acked)
            result["stored"] = store.stored_count()
            result["load_source"] = report.source
            if report.source != "snapshot":
                result["load_reason"] = report.reason
    except Exception as exc:  # the check reports, it does not stop the runs
        result["loads"] = False
        result["failure"] = f"{type(exc).__name__}: {exc}"
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--dir", type=Path, help="database directory (default: a new temp dir)")
    parser.add_argument("--max-delay", type=float, default=2.0, help="latest kill, s after ready")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--max-ops", type=int, default=10_000_000, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        trio.run(child, args.child, args.seed, args.max_ops)
        return 0

    directory = args.dir or Path(tempfile.mkdtemp(prefix="archipel-crash-"))
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "node.db"
    acked: set[bytes] = set()
    failures = 0
    started = time.perf_counter()
    starts: dict[str, int] = {}
    snapshots = in_snapshot = 0
    for run in range(args.runs):
        result = run_once(path, args.seed * 1_000_003 + run, args.max_delay, acked)
        ok = (
            "failure" not in result
            and result["missing"] == 0
            and result["integrity"]
            and result["loads"]
        )
        failures += not ok
        snapshots += int(result.get("snapshots", 0))  # type: ignore[call-overload]
        in_snapshot += bool(result.get("in_snapshot"))
        start = str(result.get("start", "?"))
        starts[start] = starts.get(start, 0) + 1
        print(
            f"run {run + 1:>3}: killed {result.get('delay', 0):.2f} s after ready (started from"
            f" {start}), {result.get('acked', 0)} acknowledged, {result.get('stored', '?')}"
            f" stored, missing {result.get('missing', '?')}, integrity"
            f" {'ok' if result.get('integrity') else 'FAILED'},"
            f" loads {'ok' if result.get('loads') else 'FAILED'}"
            + (" (killed while saving a snapshot)" if result.get("in_snapshot") else "")
            + (
                f"; reloaded by a rebuild: {result['load_reason']}"
                if "load_reason" in result
                else ""
            )
            + (f" -- {result['failure']}" if "failure" in result else ""),
            flush=True,
        )
    seconds = time.perf_counter() - started
    print(
        f"\nsummary: {args.runs} runs in {seconds:.0f} s; {len(acked)} ops acknowledged in all;"
        f" runs started from {starts}; {snapshots} snapshots saved, {in_snapshot} kills"
        f" while one was being saved; failed runs: {failures}"
        f" (missing acknowledged ops, integrity_check not ok, or a load that failed)"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
