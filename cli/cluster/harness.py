"""The live-cluster harness: N real daemons on loopback, a workload, faults, checks.

Theory of operation. The harness creates a federation whose founding cells
each have a home (``found_on_disk``), picks a loopback port for each daemon,
and opens one proxy link per ordered pair of daemons. Every daemon's config
pins each peer's address to its own link to that peer
(``[network.peer_addresses]``), so every byte from daemon i to daemon j
crosses link ``i>j`` whatever addresses the peers gossip: cutting links is a
partition, a black-holed link a dead route, a delayed link a slow one.

Then the daemons start (``archipel run`` processes) and the run begins: one
workload task per daemon authors ops through its RPC at the scenario's rate,
a fault task applies the scenario's faults at their times (partitions and
heals through the proxy; SIGKILL and restart; SIGSTOP and SIGCONT; a full
tmpfs under a daemon's home), and a sampler records each daemon's RSS and
open descriptors every second. When the workload ends every fault is undone
and the harness waits (on the nodes' event streams, not by polling) until all
daemons report one state hash, then runs the checkers of ``checks.py`` and
writes the report.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from archipel.daemon.join import found_on_disk
from archipel.daemon.paths import Home
from archipel.daemon.transport import peer_id_of
from archipel.simulations import plots

from . import checks
from . import report as report_mod
from .checks import Check, NodeOps
from .daemons import ClusterError, Daemon, free_port
from .proxy import FaultProxy
from .scenario import ClusterScenario, Fault
from .workload import Driver, Knowledge, circles_of

SAMPLE_EVERY_S = 1.0
FILLER = "filler.bin"
HEALS = ("heal", "restart", "cont", "undrop", "disk_free")
CALM_AFTER_S = 2.0
"""Ops sent this long after a fault ends still count as sent in trouble."""


@dataclass
class Applied:
    at_s: float
    fault: Fault


@dataclass
class Run:
    scenario: ClusterScenario
    out: Path
    say: Callable[[str], None]
    daemons: list[Daemon] = field(default_factory=list)
    proxy: FaultProxy = field(default_factory=FaultProxy)
    knowledge: Knowledge | None = None
    applied: list[Applied] = field(default_factory=list)
    cut: set[str] = field(default_factory=set)
    dropped: set[int] = field(default_factory=set)
    delayed: set[int] = field(default_factory=set)
    mounts: list[Path] = field(default_factory=list)
    started: float = 0.0
    started_wall_ms: int = 0
    views: dict[str, NodeOps] = field(default_factory=dict)

    def t(self) -> float:
        return trio.current_time() - self.started


async def run_cluster(
    scenario: ClusterScenario, out: Path, say: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run ``scenario`` with its homes, logs and report under ``out``; return the report."""
    out.mkdir(parents=True, exist_ok=True)
    run = Run(scenario, out, say)
    wall_started = time.monotonic()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(run.proxy.run)
            try:
                await _setup(run, nursery)
                report = await _drive(run, nursery)
            finally:
                with trio.CancelScope(shield=True):
                    await _teardown(run)
                nursery.cancel_scope.cancel()
    finally:
        _unmount(run)
    report["wall_s"] = round(time.monotonic() - wall_started, 2)
    return report


# -- setting up -------------------------------------------------------------------


async def _setup(run: Run, nursery: trio.Nursery) -> None:
    scenario = run.scenario
    n = scenario.nodes
    root = run.out / "nodes"
    if root.exists():
        raise ClusterError(f"{root} exists: give an empty --out directory")
    homes = []
    for i in range(n):
        path = root / f"node{i}"
        path.mkdir(parents=True)
        if i in scenario.disk_nodes:
            _mount_tmpfs(path, scenario.disk_mb)
            run.mounts.append(path)
        homes.append(Home(path))
    _, identities = found_on_disk(
        homes, [f"cell {i}" for i in range(n)], f"cluster {scenario.name}", _wall_ms()
    )
    offsets = dict(scenario.clock_offsets_ms)
    run.daemons = [
        Daemon(i, homes[i], identities[i], free_port(), offsets.get(i, 0)) for i in range(n)
    ]
    links: dict[tuple[int, int], int] = {}
    for a in run.daemons:
        for b in run.daemons:
            if a is not b:
                links[a.index, b.index] = await run.proxy.add(
                    _link(a.index, b.index), ("127.0.0.1", b.port)
                )
    for d in run.daemons:
        d.home.config.write_text(daemon_config(d, run.daemons, links), encoding="utf-8")
    run.knowledge = Knowledge(
        members=[ident.member_public.hex() for ident in identities], circles=circles_of(n)
    )
    run.say(f"starting {n} daemons")
    async with trio.open_nursery() as starting:
        for d in run.daemons:
            starting.start_soon(d.start, nursery)


def daemon_config(me: Daemon, daemons: list[Daemon], links: dict[tuple[int, int], int]) -> str:
    peers = [d for d in daemons if d is not me]
    first = peers[0] if me.index != 0 else peers[-1]
    boot = [first, daemons[0]] if me.index != 0 else [first]

    def addr(d: Daemon) -> str:
        return f"/ip4/127.0.0.1/tcp/{links[me.index, d.index]}"

    bootstrap = ", ".join(
        f'"{addr(d)}/p2p/{peer_id_of(d.identity.device_public)}"' for d in dict.fromkeys(boot)
    )
    pinned = "\n".join(f'"{peer_id_of(d.identity.device_public)}" = ["{addr(d)}"]' for d in peers)
    return (
        "# written by archipel cluster run\n"
        "[network]\n"
        f'listen = ["{me.listen}"]\n'
        "mdns = false\n"
        "dial_timeout_s = 5.0\n"
        f"bootstrap = [{bootstrap}]\n\n"
        "[network.peer_addresses]\n"
        f"{pinned}\n\n"
        "[clock]\n"
        f"offset_ms = {me.offset_ms}\n"
    )


# -- running ------------------------------------------------------------------------


async def _drive(run: Run, nursery: trio.Nursery) -> dict[str, Any]:
    scenario, k = run.scenario, run.knowledge
    assert k is not None
    run.started = trio.current_time()
    run.started_wall_ms = _wall_ms()
    run.say(f"workload: {scenario.workload.rate:g} ops/s per node for {scenario.duration_s:g} s")
    async with trio.open_nursery() as work:
        sampler = trio.CancelScope()
        work.start_soon(_sample, run, sampler)
        async with trio.open_nursery() as timed:
            for d in run.daemons:
                rng = random.Random(scenario.seed * 1_000_003 + d.index)  # noqa: S311 (a workload)
                driver = Driver(
                    daemon=d,
                    knowledge=k,
                    workload=scenario.workload,
                    rng=rng,
                    started=run.started,
                    nodes=scenario.nodes,
                )
                timed.start_soon(driver.run, scenario.duration_s)
            timed.start_soon(_faults, run, nursery)
        workload_end = run.t()
        run.say(f"workload done at {workload_end:.1f} s: {len(k.acks)} ops acknowledged")
        await _undo_faults(run, nursery)
        settled = await _settle(run)
        sampler.cancel()
    statuses = {}
    for d in run.daemons:
        with d.blame("reading its status and ops"):
            statuses[d.name] = await d.rpc.call("node.status")
            await run.views.setdefault(d.name, NodeOps()).refresh(d.rpc)
    results = await _check(run, statuses)
    return _report(run, statuses, results, workload_end, settled)


async def _faults(run: Run, nursery: trio.Nursery) -> None:
    for fault in run.scenario.faults:
        await trio.sleep_until(run.started + fault.at_s)
        await _apply(run, fault, nursery)


async def _apply(run: Run, fault: Fault, nursery: trio.Nursery) -> None:
    at = run.t()
    await _APPLY[fault.kind](run, fault, nursery)
    run.applied.append(Applied(round(at, 3), fault))
    run.say(f"{at:6.1f} s  {_describe(fault)}")


async def _partition(run: Run, fault: Fault, nursery: trio.Nursery) -> None:
    side = {i: g for g, group in enumerate(fault.groups) for i in group}
    rest = len(fault.groups)  # nodes in no group are a group of their own
    for a in run.daemons:
        for b in run.daemons:
            if a is not b and side.get(a.index, rest) != side.get(b.index, rest):
                run.proxy.cut(_link(a.index, b.index))
                run.cut.add(_link(a.index, b.index))


async def _heal(run: Run, fault: Fault, nursery: trio.Nursery) -> None:
    for name in sorted(run.cut):
        run.proxy.heal(name)
    run.cut.clear()


async def _kill(run: Run, fault: Fault, nursery: trio.Nursery) -> None:
    for d in (run.daemons[i] for i in fault.nodes):
        if d.state != "down":
            d.kill()
            await d.reap()


async def _restart(run: Run, fault: Fault, nursery: trio.Nursery) -> None:
    for d in (run.daemons[i] for i in fault.nodes):
        if d.state == "down":
            await d.start(nursery)


async def _stop(run: Run, fault: Fault, nursery: trio.Nursery) -> None:
    for d in (run.daemons[i] for i in fault.nodes):
        if d.state == "up":
            d.pause()


async def _cont(run: Run, fault: Fault, nursery: trio.Nursery) -> None:
    for d in (run.daemons[i] for i in fault.nodes):
        if d.state == "paused":
            d.resume()


async def _links(run: Run, fault: Fault, nursery: trio.Nursery) -> None:
    touched = run.delayed if fault.kind == "delay" else run.dropped
    if fault.kind in ("drop", "delay") and (fault.kind == "drop" or fault.ms > 0):
        touched.update(fault.nodes)
    else:
        touched.difference_update(fault.nodes)
    for name in _links_of(run, fault.nodes):
        if fault.kind == "delay":
            run.proxy.delay(name, fault.ms)
        else:
            run.proxy.drop(name, fault.kind == "drop")


async def _disk_full(run: Run, fault: Fault, nursery: trio.Nursery) -> None:
    for i in fault.nodes:
        _fill(run.daemons[i].home.root)


async def _disk_free(run: Run, fault: Fault, nursery: trio.Nursery) -> None:
    for i in fault.nodes:
        with contextlib.suppress(FileNotFoundError):
            (run.daemons[i].home.root / FILLER).unlink()


_APPLY: dict[str, Callable[[Run, Fault, trio.Nursery], Awaitable[None]]] = {
    "partition": _partition,
    "heal": _heal,
    "kill": _kill,
    "restart": _restart,
    "stop": _stop,
    "cont": _cont,
    "delay": _links,
    "drop": _links,
    "undrop": _links,
    "disk_full": _disk_full,
    "disk_free": _disk_free,
}


async def _undo_faults(run: Run, nursery: trio.Nursery) -> None:
    """Undo what is still in force, for the final settling."""
    daemons, t = run.daemons, run.t()
    undo = []
    if run.cut:
        undo.append(Fault(t, "heal"))
    if run.dropped:
        undo.append(Fault(t, "undrop", nodes=tuple(sorted(run.dropped))))
    if run.delayed:
        undo.append(Fault(t, "delay", nodes=tuple(sorted(run.delayed)), ms=0))
    full = tuple(i for i in run.scenario.disk_nodes if (daemons[i].home.root / FILLER).exists())
    if full:
        undo.append(Fault(t, "disk_free", nodes=full))
    for kind, state in (("cont", "paused"), ("restart", "down")):
        nodes = tuple(d.index for d in daemons if d.state == state)
        if nodes:
            undo.append(Fault(t, kind, nodes=nodes))
    for fault in undo:
        await _apply(run, fault, nursery)


async def _settle(run: Run) -> float | None:
    """Seconds until every daemon reports one state hash; None past ``settle_s``."""
    started = time.monotonic()
    deadline = started + run.scenario.settle_s
    views = {d.name: run.views.setdefault(d.name, NodeOps()) for d in run.daemons}
    while True:
        hashes = set()
        for d in run.daemons:
            with d.blame("node.status"):
                hashes.add((await d.rpc.call("node.status"))["state_hash"])
        if len(hashes) == 1:
            return round(time.monotonic() - started, 3)
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        # Wait until some daemon stores a new op (a long poll on each), then look again.
        with trio.move_on_after(min(left, 5.0)):
            async with trio.open_nursery() as waiting:
                for d in run.daemons:
                    waiting.start_soon(_changed, d, views[d.name], waiting.cancel_scope)


async def _changed(d: Daemon, view: NodeOps, done: trio.CancelScope) -> None:
    with d.blame("events.poll"):
        changed = await view.refresh(d.rpc, wait_s=1.0)
    if changed:
        done.cancel()


async def _sample(run: Run, scope: trio.CancelScope) -> None:
    with scope:
        while True:
            for d in run.daemons:
                d.sample(run.t())
            await trio.sleep(SAMPLE_EVERY_S)


async def _check(run: Run, statuses: dict[str, Any]) -> list[Check]:
    k = run.knowledge
    assert k is not None
    pairs = {d.name: (d.rpc, run.views[d.name]) for d in run.daemons}
    results = [
        checks.same_state(statuses),
        checks.acknowledged_present(k.acks, run.views),
        checks.work_was_done(k.acks, k.refused, k.examples),
        await checks.no_act_after_recall(pairs),
        await checks.no_offer_over_allocated(pairs),
        await checks.no_vote_outside_cut(pairs),
    ]
    for check in results:
        mark = "ok  " if check.ok else "FAIL"
        run.say(f"  {mark} {check.name} ({check.checked} checked)")
        for problem in check.problems[:5]:
            run.say(f"       {problem}")
    return results


async def _teardown(run: Run) -> None:
    async with trio.open_nursery() as stopping:
        for d in run.daemons:
            stopping.start_soon(d.stop)


# -- the report ---------------------------------------------------------------------


def _report(
    run: Run,
    statuses: dict[str, Any],
    results: list[Check],
    workload_end: float,
    settled: float | None,
) -> dict[str, Any]:
    k = run.knowledge
    assert k is not None
    scenario = run.scenario
    arrivals = _arrivals(run)
    births = {a.id: arrivals[a.node].get(a.id) for a in k.acks}
    faults = [{"at_s": a.at_s, **_fault_json(a.fault)} for a in run.applied]
    troubled = [
        (start, (stop if stop is not None else workload_end) + CALM_AFTER_S)
        for _, start, stop in report_mod.windows({"faults": faults})
    ]
    latencies, calm = [], []
    for ack in k.acks:
        born = births[ack.id]
        if born is None:
            continue
        quiet = not any(start <= ack.sent_s <= stop for start, stop in troubled)
        for d in run.daemons:
            got = arrivals[d.index].get(ack.id)
            if d.index != ack.node and got is not None:
                latencies.append(max(0, got - born))
                if quiet:
                    calm.append(max(0, got - born))
    heals = []
    for applied in run.applied:
        if applied.fault.kind not in HEALS or applied.at_s >= workload_end:
            continue
        heal_ms = run.started_wall_ms + int(applied.at_s * 1000)
        before = [a.id for a in k.acks if a.acked_s < applied.at_s]
        lag, never = 0, 0
        for d in run.daemons:
            for ident in before:
                got = arrivals[d.index].get(ident)
                if ident not in run.views[d.name].ops:
                    never += 1
                elif got is not None and got > heal_ms:
                    lag = max(lag, got - heal_ms)
        heals.append(
            {
                "at_s": applied.at_s,
                "kind": applied.fault.kind,
                "ops_before": len(before),
                "convergence_ms": lag,
                "never_arrived": never,
            }
        )
    span = max(workload_end, 1e-9)
    return {
        "scenario": scenario.name,
        "description": scenario.description,
        "seed": scenario.seed,
        "nodes": scenario.nodes,
        "duration_s": scenario.duration_s,
        "ok": all(c.ok for c in results) and settled is not None,
        "ops": {
            "acknowledged": len(k.acks),
            "acknowledged_per_s": round(len(k.acks) / span, 2),
            "refused": dict(sorted(k.refused.items())),
            "refused_examples": dict(sorted(k.examples.items())),
            "skipped_node_down": k.skipped,
            "by_kind": _count(a.kind for a in k.acks),
        },
        "faults": faults,
        "heals": heals,
        "settle_s": settled,
        "latency_ms": plots.quantiles(latencies),
        "latency_calm_ms": plots.quantiles(calm),
        "latency_samples": len(latencies),
        "latency_percentiles_ms": plots.percentiles(latencies),
        "checks": {c.name: c.json() for c in results},
        "final": {
            name: {"ops": s["ops"], "state_hash": s["state_hash"]} for name, s in statuses.items()
        },
        "resources": {d.name: {"samples": d.samples, "starts": d.starts} for d in run.daemons},
        "missing_over_time": _missing_over_time(run, arrivals),
        "proxy": _proxy_totals(run),
    }


def _proxy_totals(run: Run) -> dict[str, int]:
    """What crossed the proxy links, summed: proof that the daemons talked through it."""
    stats = run.proxy.stats().values()
    return {
        "links": len(stats),
        "connections_accepted": sum(s.accepted for s in stats),
        "connections_refused": sum(s.refused for s in stats),
        "bytes_forwarded": sum(s.bytes_up + s.bytes_down for s in stats),
        "bytes_dropped": sum(s.dropped_up + s.dropped_down for s in stats),
    }


def _arrivals(run: Run) -> list[dict[str, int]]:
    """Per daemon: op id -> when it arrived there (ms on the harness's clock)."""
    out = []
    for d in run.daemons:
        seen = {}
        for ident, event in run.views[d.name].ops.items():
            got = event.get("received_ms")
            if got is not None:
                seen[ident] = got - d.offset_ms
        out.append(seen)
    return out


def _missing_over_time(run: Run, arrivals: list[dict[str, int]]) -> dict[str, Any]:
    """For plots: per daemon, acknowledged ops not yet there, each half second."""
    k = run.knowledge
    assert k is not None
    end = max([a.acked_s for a in k.acks] + [run.scenario.duration_s]) + 5
    steps = [round(i * 0.5, 1) for i in range(int(end / 0.5) + 1)]
    series = {}
    for d in run.daemons:
        when = []
        for ack in k.acks:
            got = arrivals[d.index].get(ack.id)
            at = (got - run.started_wall_ms) / 1000 if got is not None else ack.acked_s
            when.append((ack.acked_s, max(at, ack.acked_s)))
        series[d.name] = [sum(1 for acked, at in when if acked <= t < at) for t in steps]
    return {"t_s": steps, "missing": series}


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return dict(sorted(out.items()))


def _fault_json(fault: Fault) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": fault.kind}
    if fault.nodes:
        out["nodes"] = list(fault.nodes)
    if fault.groups:
        out["groups"] = [list(g) for g in fault.groups]
    if fault.kind == "delay":
        out["ms"] = fault.ms
    return out


def _describe(fault: Fault) -> str:
    if fault.kind == "partition":
        return "partition " + " | ".join(",".join(map(str, g)) for g in fault.groups)
    if fault.kind == "delay":
        return f"delay {fault.ms} ms on nodes {','.join(map(str, fault.nodes))}"
    nodes = f" nodes {','.join(map(str, fault.nodes))}" if fault.nodes else ""
    return fault.kind + nodes


# -- helpers --------------------------------------------------------------------------


def _link(a: int, b: int) -> str:
    return f"{a}>{b}"


def _links_of(run: Run, nodes: tuple[int, ...]) -> list[str]:
    chosen = set(nodes)
    return [
        _link(a.index, b.index)
        for a in run.daemons
        for b in run.daemons
        if a is not b and (a.index in chosen or b.index in chosen)
    ]


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


def _mount_tmpfs(path: Path, size_mb: int) -> None:
    if os.geteuid() != 0:
        raise ClusterError("disk.nodes needs a tmpfs mount, which needs root: run as root")
    done = subprocess.run(  # noqa: S603 (fixed arguments)
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0700", "tmpfs", str(path)],  # noqa: S607
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise ClusterError(f"cannot mount a tmpfs on {path}: {done.stderr.strip()}")


def _unmount(run: Run) -> None:
    for path in run.mounts:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)  # noqa: S603, S607


def _fill(root: Path) -> None:
    """Fill the file system under ``root`` to the last byte (unbuffered writes,
    smaller and smaller, until even one byte does not fit)."""
    fd = os.open(root / FILLER, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (1 << 20, 65536, 4096, 512, 1):
            block = b"\0" * size
            while True:
                try:
                    os.write(fd, block)
                except OSError as exc:
                    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    break
    finally:
        os.close(fd)
