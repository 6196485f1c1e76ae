"""Where a daemon's CPU goes under load: benchmarks/loopback.py with counters and profilers.

    .venv/bin/python benchmarks/profile_loopback.py [--nodes 10] [--rate 100] [--seconds 20]
        [--count] [--no-watch] [--patches P1,P2] [--env NAME=VALUE]
        [--pyspy PATH --pyspy-node 3 --pyspy-out FILE --pyspy-args=--gil]
        [--perf-out FILE --perf-node 5]

The same daemons and load as benchmarks/loopback.py (one rate); the daemons run
under benchmarks/_bench_daemon.py, which can count and patch. Besides
loopback.py's figures it prints the daemons' CPU per op (their CPU seconds from
the start of the load until every node holds every op, over the ops), the
driver's own CPU, and how busy the whole machine was and how much of that was
other work (from /proc/stat), to tell a run on a quiet machine from one on a
shared one.

- ``--count``: per-op counts over the load (socket writes, Noise messages,
  Yamux frames, channel records, sync messages, SQLite transactions, thread
  hops and their wall time, log records, RPC calls, trio task steps per task),
  summed over the daemons and divided by the ops applied (snapshots just
  before the load and after the drain). The counting costs CPU itself.
- ``--no-watch``: no event pollers (no latency figures then), to see what the
  driver's long polls cost the daemons; ``--poll-interval S``: the pollers
  rest S seconds after each page (loopback.py polls again at once: a poll per
  op or two).
- ``--patches``: changes proposed for modules other than daemon/node.py,
  applied in the daemons only (see benchmarks/_bench_daemon.py).
- ``--pyspy`` / ``--perf-out`` / ``--cprofile-out``: py-spy (raw, collapsed
  stacks), perf, or cProfile (the event loop thread's CPU clock) records one
  daemon during the load.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).parent))
import loopback
from _machine import describe
from loopback import Daemon

from archipel.client import Client, NodeUnreachable

_LOSSY_WITHOUT_WATCH = ("p50_ms", "p99_ms", "max_ms", "delivered_to_all", "full_delivery")


def start(daemon: Daemon, bootstrap: list[str], argv: list[str], env: dict[str, str]) -> None:
    """loopback.start, with another command line and environment for the daemon."""
    boot = ", ".join(f'"{a}"' for a in bootstrap)
    daemon.home.config.write_text(
        f'[network]\nlisten = ["/ip4/127.0.0.1/tcp/0"]\nmdns = false\nbootstrap = [{boot}]\n'
        '[log]\nlevel = "warning"\n'
    )
    began = time.perf_counter()
    process = subprocess.Popen(
        [*argv, "run", "--home", str(daemon.home.root)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert process.stderr is not None
    seen = b""
    while b"listening on" not in seen:
        ready, _, _ = select.select([process.stderr], [], [], 30)
        if not ready or process.poll() is not None:
            raise SystemExit(f"node {daemon.index} did not start: {seen.decode(errors='replace')}")
        seen += os.read(process.stderr.fileno(), 4096)
    daemon.ready_s = time.perf_counter() - began
    daemon.process = process
    threading.Thread(target=loopback._drain, args=(process,), daemon=True).start()
    daemon.client = Client(daemon.home.root)


def _machine_busy_s() -> tuple[float, float]:
    """CPU seconds the whole machine was busy (all cores), and wall seconds, so far."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(f) for f in fields]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK"), time.monotonic()


def _pid(daemon: Daemon) -> int:
    assert daemon.process is not None
    return daemon.process.pid


def _ops(daemons: list[Daemon]) -> list[int]:
    return [d.client.call("node.status")["ops"] for d in daemons if d.client is not None]


def snapshot(daemons: list[Daemon], count_dir: Path, n: int) -> list[dict[str, Any]]:
    """Ask every counted daemon for snapshot ``n`` and read them."""
    for d in daemons:
        os.kill(_pid(d), signal.SIGUSR1)
    out = []
    for d in daemons:
        path = count_dir / f"{_pid(d)}.{n}.json"
        deadline = time.monotonic() + 30
        while not path.exists():
            if time.monotonic() > deadline:
                raise SystemExit(f"no counters from node {d.index}")
            time.sleep(0.05)
        out.append(json.loads(path.read_text()))
    return out


def watch_paced(daemon: Daemon, interval_s: float) -> None:
    """loopback.watch, resting ``interval_s`` after each page: the ops applied
    meanwhile come in the next page. The daemons stamp the arrivals themselves,
    so the latency figures do not change; only the polls' own load does."""
    cursor = 0
    with Client(daemon.home.root) as client:
        while not daemon.stop.is_set():
            try:
                page = client.call("events.poll", cursor=cursor, limit=1000, timeout_s=0.5)
            except NodeUnreachable:
                return  # the node stopped (end of the run)
            for event in page["events"]:
                if event["received_ms"] is not None:
                    daemon.arrivals.setdefault(event["id"], event["received_ms"] / 1000)
            cursor = page["cursor"]
            if len(page["events"]) < 1000:
                daemon.stop.wait(interval_s)


_boot: list[str] = []


def launch(args: argparse.Namespace, root: Path, env: dict[str, str]) -> list[Daemon]:
    """Start the daemons (node 0 the others' bootstrap) and, unless --no-watch, the pollers."""
    argv = [sys.executable, str(Path(__file__).parent / "_bench_daemon.py")]
    daemons = loopback.setup(root, args.nodes)
    for daemon in daemons:
        own = dict(env)
        if args.cprofile_out is not None and daemon.index == args.cprofile_node:
            own["CPROFILE_OUT"] = str(args.cprofile_out.resolve())
        boot = [] if daemon.index == 0 else _boot
        start(daemon, boot, argv, own)
        if daemon.index == 0:
            assert daemon.client is not None
            _boot[:] = daemon.client.call("node.info")["listen"]
    if not args.no_watch:
        for daemon in daemons:
            if args.poll_interval > 0:
                watcher = threading.Thread(
                    target=watch_paced, args=(daemon, args.poll_interval), daemon=True
                )
            else:
                watcher = threading.Thread(target=loopback.watch, args=(daemon,), daemon=True)
            watcher.start()
    settle = time.perf_counter() + 30
    while time.perf_counter() < settle:  # every node connected to someone
        if all(d.client and d.client.call("node.status")["connected"] for d in daemons):
            break
        time.sleep(0.2)
    time.sleep(2)
    return daemons


def profilers(args: argparse.Namespace, daemons: list[Daemon]) -> list[subprocess.Popen[bytes]]:
    """py-spy and perf on one daemon each, for the load's duration, if asked."""
    out = []
    seconds = str(int(args.seconds))
    if args.pyspy is not None:
        pid = str(_pid(daemons[args.pyspy_node]))
        command = [str(args.pyspy), "record", "--pid", pid, "--rate", "100", "--nonblocking"]
        command += ["--format", "raw", "-o", str(args.pyspy_out), "--duration", seconds]
        out.append(subprocess.Popen([*command, *args.pyspy_args.split()]))
    if args.perf_out is not None:
        pid = str(_pid(daemons[args.perf_node]))
        command = ["perf", "record", "-F", "499", "-p", pid, "-o", str(args.perf_out)]
        out.append(subprocess.Popen([*command, "--", "sleep", seconds]))
    return out


def measure(args: argparse.Namespace, daemons: list[Daemon]) -> dict[str, Any]:
    """loopback.load, plus CPU per op, the driver's CPU and the machine's other work."""
    procs = [psutil.Process(_pid(d)) for d in daemons]
    cpu0 = [sum(p.cpu_times()[:2]) for p in procs]
    ops0 = _ops(daemons)
    driver0, machine0 = os.times(), _machine_busy_s()
    result = loopback.load(daemons, args.rate, args.seconds, 0 if args.no_watch else args.drain)
    if args.no_watch:  # wait until every node holds every op (1 s polls)
        deadline = time.perf_counter() + args.drain
        while time.perf_counter() < deadline:
            if all(b - a >= result["ops"] for a, b in zip(ops0, _ops(daemons), strict=True)):
                break
            time.sleep(1)
        for key in _LOSSY_WITHOUT_WATCH:
            result.pop(key)
    driver1, machine1 = os.times(), _machine_busy_s()
    spent = [sum(p.cpu_times()[:2]) - c for p, c in zip(procs, cpu0, strict=True)]
    driver_s = driver1.user + driver1.system - driver0.user - driver0.system
    busy_s, wall_s = machine1[0] - machine0[0], machine1[1] - machine0[1]
    result["cpu_ms_per_op_per_daemon"] = round(1000 * statistics.mean(spent) / result["ops"], 3)
    result["driver_cores"] = round(driver_s / wall_s, 2)
    result["machine_busy_cores"] = round(busy_s / wall_s, 2)
    result["other_work_cores"] = round(max(0.0, busy_s - sum(spent) - driver_s) / wall_s, 2)
    return result


def report(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> None:
    """Per-op counts over the load, summed over the daemons."""
    total: Counter[str] = Counter()
    cpu = user = 0.0
    for a, b in zip(before, after, strict=True):
        for key, value in b["counts"].items():
            total[key] += value - a["counts"].get(key, 0)
        cpu += b["cpu_s"] - a["cpu_s"]
        user += b["user_s"] - a["user_s"]
    applied = total["ops.applied"]
    print(f"ops applied (all daemons): {applied}; per daemon: {applied / len(after):.0f}")
    print(f"CPU per applied op (counted run, counting included): {cpu / applied * 1000:.2f} ms")
    print(f"  of which user {100 * user / cpu:.0f} %, system {100 - 100 * user / cpu:.0f} %")
    print("per op applied (i.e. per op per daemon):")
    for key, value in sorted(total.items()):
        if value:
            print(f"  {key:60s} {value / applied:9.3f}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--rate", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--drain", type=float, default=15.0)
    parser.add_argument("--no-watch", action="store_true")
    parser.add_argument("--count", action="store_true")
    parser.add_argument(
        "--poll-interval", type=float, default=0.0, help="seconds between event polls (0: at once)"
    )
    parser.add_argument("--patches", default="", help="see benchmarks/_bench_daemon.py")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the daemons")
    parser.add_argument("--pyspy", type=Path, default=None, help="the py-spy executable")
    parser.add_argument("--pyspy-node", type=int, default=3)
    parser.add_argument("--pyspy-out", type=Path, default=Path("pyspy-raw.txt"))
    parser.add_argument("--pyspy-args", default="", help="more py-spy options, e.g. --gil")
    parser.add_argument("--cprofile-out", type=Path, default=None)
    parser.add_argument("--cprofile-node", type=int, default=3)
    parser.add_argument("--perf-out", type=Path, default=None)
    parser.add_argument("--perf-node", type=int, default=5)
    return parser


def main() -> None:
    args = _parser().parse_args()
    print(describe(), "| load average at start:", os.getloadavg())
    print("patches:", args.patches or "none", "| env:", " ".join(args.env) or "none")
    with tempfile.TemporaryDirectory(prefix="archipel-profile-") as tmp:
        count_dir = Path(tmp) / "counts"
        count_dir.mkdir()
        env = {**os.environ, "BENCH_PATCHES": args.patches}
        if args.count:
            env["COUNT_DIR"] = str(count_dir)
        env.update(a.partition("=")[::2] for a in args.env)
        daemons: list[Daemon] = []
        spies: list[subprocess.Popen[bytes]] = []
        try:
            daemons = launch(args, Path(tmp), env)
            before = snapshot(daemons, count_dir, 1) if args.count else []
            spies = profilers(args, daemons)
            if args.cprofile_out is not None:
                os.kill(_pid(daemons[args.cprofile_node]), signal.SIGUSR2)
            print(json.dumps(measure(args, daemons)))
            if args.cprofile_out is not None:
                os.kill(_pid(daemons[args.cprofile_node]), signal.SIGUSR2)
            print("load average at end:", os.getloadavg())
            if args.count:
                report(before, snapshot(daemons, count_dir, 2))
        finally:
            for spy in spies:
                spy.wait(timeout=60)
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
