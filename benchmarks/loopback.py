"""Real daemons on loopback: start-up, idle memory, delivery latency, CPU, the sustained rate.

    .venv/bin/python benchmarks/loopback.py [--nodes 10] [--rates 50,100,200] [--seconds 20]

Starts N daemons (``archipel run`` as separate processes) of one federation
on 127.0.0.1, node 0 being the others' bootstrap. For each rate, notes are
authored through the RPC, round-robin over the nodes, for ``--seconds``. Each
daemon stamps every op with the wall-clock instant it applied it
(``received_ms`` in its event stream, read here by long polls), so the
driver's own delays do not count. Delivery latency = applied at a node -
applied at its author (the instant it was signed), over every (op, other
node) pair; an op counts as delivered when it reached all N nodes within
``--drain`` seconds after the load stops.

Baseline measured in the same run: the authoring RPC call itself (sign, apply,
fsync, answer) as the driver sees it, the floor under which no delivery can
be. Figures go into docs/benchmarks.md with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).parent))
from _machine import describe

from archipel.cli._common import READY
from archipel.client import Client, NodeUnreachable
from archipel.daemon.join import found_on_disk
from archipel.daemon.paths import Home


@dataclass
class Daemon:
    index: int
    home: Home
    process: subprocess.Popen[bytes] | None = None
    ready_s: float = 0.0
    client: Client | None = None
    arrivals: dict[str, float] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)


def setup(root: Path, n: int) -> list[Daemon]:
    homes = [Home(root / f"n{i}") for i in range(n)]
    found_on_disk(homes, [f"cell {i}" for i in range(n)], "Bench", int(time.time() * 1000))
    return [Daemon(i, home) for i, home in enumerate(homes)]


def start(daemon: Daemon, bootstrap: list[str]) -> None:
    boot = ", ".join(f'"{a}"' for a in bootstrap)
    daemon.home.config.write_text(
        f'[network]\nlisten = ["/ip4/127.0.0.1/tcp/0"]\nmdns = false\nbootstrap = [{boot}]\n'
        '[log]\nlevel = "warning"\n'
    )
    began = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "archipel.cli.main", "run", "--home", str(daemon.home.root)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    seen = b""
    while not READY.search(seen):
        ready, _, _ = select.select([process.stderr], [], [], 30)
        if not ready or process.poll() is not None:
            raise SystemExit(f"node {daemon.index} did not start: {seen.decode(errors='replace')}")
        seen += os.read(process.stderr.fileno(), 4096)
    daemon.ready_s = time.perf_counter() - began
    daemon.process = process
    threading.Thread(target=_drain, args=(process,), daemon=True).start()
    daemon.client = Client(daemon.home.root)


def _drain(process: subprocess.Popen[bytes]) -> None:
    assert process.stderr is not None
    for _ in iter(lambda: process.stderr.read(4096) if process.stderr else b"", b""):
        pass


def watch(daemon: Daemon) -> None:
    """Timestamp every op's arrival at this node (long polls on its event stream)."""
    cursor = 0
    with Client(daemon.home.root) as client:
        while not daemon.stop.is_set():
            try:
                page = client.call("events.poll", cursor=cursor, limit=1000, timeout_s=0.5)
            except NodeUnreachable:
                return  # the node stopped (end of the run)
            for event in page["events"]:
                # applied at (wall ms), stamped by the daemon itself: no polling delay
                if event["received_ms"] is not None:
                    daemon.arrivals.setdefault(event["id"], event["received_ms"] / 1000)
            cursor = page["cursor"]


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def load(daemons: list[Daemon], rate: int, seconds: float, drain: float) -> dict[str, Any]:
    procs = [psutil.Process(d.process.pid) for d in daemons if d.process is not None]
    cpu0 = [p.cpu_times() for p in procs]
    sent: dict[str, tuple[float, int]] = {}
    total = int(rate * seconds)
    lock = threading.Lock()
    began = time.perf_counter()

    def author(daemon: Daemon) -> None:
        """This node's share of the load, at its pace, on one kept-alive connection."""
        share = range(daemon.index, total, len(daemons))
        with Client(daemon.home.root) as client:
            for k in share:
                delay = began + k / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                at = time.perf_counter()
                made = client.call("note", text=f"load {rate}/s #{k}")
                with lock:
                    sent[made["id"]] = (time.perf_counter() - at, daemon.index)

    workers = [threading.Thread(target=author, args=(d,)) for d in daemons]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    offered_s = time.perf_counter() - began
    deadline = time.perf_counter() + drain
    while time.perf_counter() < deadline:
        if all(all(i in d.arrivals for i in sent) for d in daemons):
            break
        time.sleep(0.1)
    cpu1 = [p.cpu_times() for p in procs]
    remote = []
    calls = [call for call, _ in sent.values()]
    delivered = 0
    for ident, (_, origin) in sent.items():
        everywhere = True
        at = daemons[origin].arrivals.get(ident, float("nan"))  # authored there, at that instant
        for daemon in daemons:
            arrived = daemon.arrivals.get(ident)
            if arrived is None:
                everywhere = False
                continue
            if daemon.index != origin:
                remote.append(arrived - at)
        delivered += everywhere
    spent = [b.user + b.system - a.user - a.system for a, b in zip(cpu0, cpu1, strict=True)]
    cpu = [s / offered_s for s in spent]
    return {
        "rate": rate,
        "ops": len(sent),
        "offered_s": round(offered_s, 2),
        "delivered_to_all": delivered,
        "full_delivery": delivered == len(sent) == total,
        "p50_ms": round(pct(remote, 50) * 1000, 1),
        "p99_ms": round(pct(remote, 99) * 1000, 1),
        "max_ms": round(max(remote, default=float("nan")) * 1000, 1),
        "baseline_author_call_p50_ms": round(pct(calls, 50) * 1000, 1),
        "baseline_author_call_p99_ms": round(pct(calls, 99) * 1000, 1),
        "cpu_per_daemon_pct_mean": round(statistics.mean(cpu) * 100, 1),
        "cpu_per_daemon_pct_max": round(max(cpu) * 100, 1),
        "rss_mb_max": round(max(p.memory_info().rss for p in procs) / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--rates", default="50,100,200")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--drain", type=float, default=15.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rates = [int(r) for r in args.rates.split(",")]
    print(describe())
    with tempfile.TemporaryDirectory(prefix="archipel-loopback-") as tmp:
        daemons = setup(Path(tmp), args.nodes)
        try:
            start(daemons[0], [])
            assert daemons[0].client is not None
            boot = list(daemons[0].client.call("node.info")["listen"])
            for daemon in daemons[1:]:
                start(daemon, boot)
            for daemon in daemons:
                threading.Thread(target=watch, args=(daemon,), daemon=True).start()
            settle = time.perf_counter() + 30
            while time.perf_counter() < settle:  # every node connected to someone
                if all(d.client and d.client.call("node.status")["connected"] for d in daemons):
                    break
                time.sleep(0.2)
            time.sleep(2)
            idle = [
                psutil.Process(d.process.pid).memory_info().rss / 2**20
                for d in daemons
                if d.process is not None
            ]
            ready = [d.ready_s for d in daemons]
            print(
                f"daemons: {args.nodes}; start-up to ready:"
                f" median {statistics.median(ready):.2f} s,"
                f" max {max(ready):.2f} s; idle RSS: median {statistics.median(idle):.1f} MB,"
                f" max {max(idle):.1f} MB"
            )
            results = []
            for rate in rates:
                result = load(daemons, rate, args.seconds, args.drain)
                results.append(result)
                print(json.dumps(result))
            sustained = max((r["rate"] for r in results if r["full_delivery"]), default=0)
            print(f"highest rate with full delivery: {sustained}/s")
            report = {
                "nodes": args.nodes,
                "startup_s": {"median": statistics.median(ready), "max": max(ready)},
                "idle_rss_mb": {"median": statistics.median(idle), "max": max(idle)},
                "runs": results,
                "sustained_rate": sustained,
            }
            if args.out is not None:
                args.out.write_text(json.dumps(report, indent=2))
        finally:
            for daemon in daemons:
                daemon.stop.set()
                if daemon.process is not None and daemon.process.poll() is None:
                    daemon.process.terminate()
            for daemon in daemons:
                if daemon.process is not None:
                    try:
                        daemon.process.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        daemon.process.kill()


if __name__ == "__main__":
    main()
