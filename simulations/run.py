"""Run a scenario on the virtual network: (scenario, seed) -> report.

Theory of operation. :func:`run` builds one federation (the workload's
genesis and members), one replica and one real :class:`SyncNode` per node on
a :class:`~archipel.simulations.network.Network`, lets the nodes join along
the scenario's topology (:mod:`.topology`), then plays a schedule merged
from three sources in time order: operations (Poisson arrivals at ``rate``
per node; a write authors a real op on the node's own replica and publishes
it, a read records what the node holds), faults (partitions, crashes,
losses, churn, clock skew, each with its heal; scheduled, or arriving at
random at a rate) and samples (every ``sample_ms``: state-hash agreement,
traffic so far for the time series, and whether the ops acknowledged before
each heal have reached every live node). After the workload, crashed nodes
come back and the run goes on quietly until every live node holds the same
ops, or ``settle_ms``.

Each replica reports every op it applies (:class:`_Observed`), which gives
delivery times per op and node. Everything random comes from one
``random.Random(seed)`` (the workload, the schedule and each fault arriving
at a rate draw from child generators seeded from it), so a run is a function
of (scenario, seed, code version). The report holds no wall-clock figure;
:class:`Result` carries the wall time and events per second beside it, and
the optional ``progress`` callback sees simulated time only.
"""

from __future__ import annotations

import heapq
import importlib.metadata
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from archipel.crdt import Op, Replica
from archipel.protocol.node import SyncConfig
from archipel.protocol.plumtree import PushLimits

from . import topology
from .network import Network
from .plots import PAYLOAD_KINDS, latencies, report_json, summary
from .plots import traffic as _traffic
from .scenario import Fault, Scenario
from .topology import peer_id
from .workload import Workload

__all__ = ["T0", "Progress", "Result", "peer_id", "report_json", "run", "summary", "write"]

T0 = 1_750_000_000_000

Progress = Callable[[int, int], None]
"""``progress(sim_ms_done, sim_ms_total)``, called as simulated time passes."""

Action = Callable[[], None]


@dataclass(frozen=True, slots=True)
class Result:
    """A run's report (deterministic) and how long it took (not)."""

    report: dict[str, Any]
    wall_s: float
    events: int
    cpu_s: float = 0.0  # this process's CPU time: steadier than wall time on a busy machine

    @property
    def events_per_s(self) -> float:
        return self.events / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def events_per_cpu_s(self) -> float:
        return self.events / self.cpu_s if self.cpu_s > 0 else 0.0

    def json(self) -> str:
        return report_json(self.report)

    def markdown(self) -> str:
        return summary(self.report, self.wall_s, self.cpu_s)


class _Observed(Replica):
    """A replica that tells the run about every op it applies."""

    def __init__(self, federation: bytes, on_apply: Callable[[Op], None]) -> None:
        super().__init__(federation)
        self._on_apply = on_apply

    def apply(self, op: Op) -> None:
        super().apply(op)
        self._on_apply(op)


@dataclass(slots=True)
class _Heal:
    """A moment the network became whole again, and what must then spread."""

    at_ms: int
    what: str
    awaited: list[bytes]
    caught_up_ms: int | None = None
    checked: int = 0  # awaited[:checked] were on every live node when last sampled
    live: tuple[int, ...] = ()  # ... which were these


@dataclass(slots=True)
class _Window:
    """A stretch of the run a fault lasted (for the plots' shading)."""

    kind: str
    from_ms: int
    to_ms: int | None = None


SERIES = ("t_ms", "live_nodes", "writes", "reads", "frames", "payload_frames", "bytes")
"""The time series sampled every ``sample_ms`` (cumulative from the workload's start)."""


@dataclass(slots=True)
class _State:
    written: dict[bytes, tuple[int, int]] = field(default_factory=dict)  # id -> (ms, node)
    arrivals: dict[bytes, dict[int, int]] = field(default_factory=dict)  # id -> node -> ms
    reads: list[tuple[int, int]] = field(default_factory=list)  # (ms, node)
    refused: int = 0
    down: set[int] = field(default_factory=set)  # crashed, will come back
    lost: set[int] = field(default_factory=set)  # gone for good
    heals: list[_Heal] = field(default_factory=list)
    faults: list[dict[str, Any]] = field(default_factory=list)
    windows: list[_Window] = field(default_factory=list)
    agreement: list[tuple[int, float]] = field(default_factory=list)
    series: dict[str, list[int]] = field(default_factory=lambda: {k: [] for k in SERIES})


def run(scenario: Scenario, seed: int | None = None, progress: Progress | None = None) -> Result:
    """Play ``scenario`` with ``seed`` (default: the scenario's own); call
    ``progress`` as simulated time passes (nothing in the report depends on it)."""
    began, cpu = time.perf_counter(), time.process_time()
    sim = _Simulation(scenario, scenario.seed if seed is None else seed, progress)
    report = sim.play()
    wall_s, cpu_s = time.perf_counter() - began, time.process_time() - cpu
    return Result(report, wall_s, sim.net.stats.events, cpu_s)


class _Simulation:
    def __init__(self, scenario: Scenario, seed: int, progress: Progress | None = None) -> None:
        self.scenario = scenario
        self.seed = seed
        self.progress = progress
        # Seeded simulation randomness, not cryptography (S311).
        self.rng = random.Random(seed)  # noqa: S311
        self.plan_rng = random.Random(self.rng.getrandbits(64))  # noqa: S311
        n = scenario.nodes
        self.workload = Workload(
            random.Random(self.rng.getrandbits(64)),  # noqa: S311
            cells=max(2, math.ceil(n / 3)),
            members_per_cell=3,
            sites=1,
            now_ms=T0,
            mix=dict(scenario.workload.mix),
            genesis_cells=scenario.workload.genesis_cells,
        )
        self.members = [list(range(i, len(self.workload.members), n)) for i in range(n)]
        self.state = _State()
        self.known = topology.known(scenario, self.plan_rng)
        protocol = scenario.protocol
        self.net = Network(
            self.rng,
            T0,
            config=SyncConfig(**protocol.sync) if protocol.sync else None,
            push_limits=PushLimits(**protocol.push) if protocol.push else None,
            latency_ms=scenario.latency.ms,
            link_latency=topology.link_latency(scenario),
            link_bandwidth=topology.link_bandwidth(scenario),
            links=topology.links(scenario, self.known),
        )
        # Every node starts holding the genesis and the admissions of the cells
        # it could not found (more than GENESIS_CELLS_MAX): as if they had
        # synced before the run.
        founding = self.workload.founding
        self.replicas: list[Replica] = []
        for i in range(n):
            replica = _Observed(founding[0].federation, self._applied_at(i))
            for op in founding:
                replica.receive(op, T0)
            self.replicas.append(replica)
            self.net.add(peer_id(i), replica)
        self.start_ms = T0 + scenario.workload.warmup_ms
        self.end_ms = self.start_ms + scenario.duration_ms
        self.total_ms = self.end_ms + scenario.settle_ms - T0
        self.at_start = _snapshot(self.net)
        self._partition_window: _Window | None = None

    def _applied_at(self, node: int) -> Callable[[Op], None]:
        written = self.state.written
        arrivals = self.state.arrivals

        def applied(op: Op) -> None:
            if op.id in written:
                arrivals[op.id][node] = self.net.now_ms

        return applied

    def live(self) -> list[int]:
        return [i for i in range(self.scenario.nodes) if self.net.is_up(peer_id(i))]

    # -- the run ------------------------------------------------------------------

    def play(self) -> dict[str, Any]:
        self._join()
        schedule = self._schedule()
        started = False
        for _ in range(len(schedule)):
            at, _, action = heapq.heappop(schedule)
            self.net.run_until(at)
            if not started and at >= self.start_ms:
                started = True
                self.at_start = _snapshot(self.net)
            action()
        self._finish()
        settled = self._settle()
        if self.progress is not None:
            self.progress(self.total_ms, self.total_ms)
        return self._report(settled)

    def _join(self) -> None:
        known = self.known
        for i in range(1, self.scenario.nodes):
            contact = known[i][self.plan_rng.randrange(len(known[i]))]
            self.net.run_until(T0 + i * 10)
            self.net.join(peer_id(i), peer_id(contact), [peer_id(k) for k in known[i]])
        self.net.add_known_to(peer_id(0), [peer_id(k) for k in known[0]])

    def _schedule(self) -> list[tuple[int, int, Action]]:
        s = self.scenario
        events: list[tuple[int, int, Action]] = []

        def add(at: int, action: Action) -> None:
            events.append((at, len(events), action))

        total_rate = s.workload.rate * s.nodes / 1_000  # per ms
        at = float(self.start_ms)
        # Bounded: four times the expected count of a Poisson process is never
        # reached in practice (the loop ends at end_ms).
        for _ in range(int(total_rate * s.duration_ms * 4) + 16):
            at += self.plan_rng.expovariate(total_rate) if total_rate > 0 else math.inf
            if at >= self.end_ms:
                break
            read = self.plan_rng.random() < s.workload.reads
            add(int(at), self._read if read else self._write)
        for fault in s.faults:
            for when, action in self._fault_actions(fault):
                add(when, action)
        for t in range(self.start_ms, self.end_ms, s.sample_ms):
            add(t, self._sample)
        # Progress during the warm-up; running the network in steps changes
        # nothing (events run in the same order whatever the steps).
        for t in range(self.net.now_ms, self.start_ms, s.sample_ms):
            add(t, self._tick)
        heapq.heapify(events)
        return events

    def _tick(self) -> None:
        if self.progress is not None:
            self.progress(self.net.now_ms - T0, self.total_ms)

    def _at(self, fraction: float) -> int:
        return self.start_ms + int(fraction * self.scenario.duration_ms)

    def _write(self) -> None:
        live = self.live()
        node = live[self.workload.rng.randrange(len(live))]
        replica = self.replicas[node]
        now = self.net.local_now(peer_id(node))
        op = self.workload.author_on(replica, self.members[node], now)
        if op is None:
            self.state.refused += 1
            return
        self.state.written[op.id] = (self.net.now_ms, node)
        self.state.arrivals[op.id] = {node: self.net.now_ms}
        self.net.publish(peer_id(node), op)

    def _read(self) -> None:
        live = self.live()
        self.state.reads.append((self.net.now_ms, live[self.workload.rng.randrange(len(live))]))

    def _sample(self) -> None:
        live = self.live()
        # The most common state hash: a count per hash (with 1000 nodes, most
        # of them distinct while ops spread, list.count per hash was quadratic).
        top = max(Counter(self.replicas[i].state_hash() for i in live).values())
        st = self.state
        st.agreement.append((self.net.now_ms - self.start_ms, top / len(live)))
        stats, base = self.net.stats, self.at_start
        kinds, base_kinds = stats.per_kind, base["kinds"]
        payload = sum(kinds.get(k, 0) - base_kinds.get(k, 0) for k in PAYLOAD_KINDS)
        row = (
            self.net.now_ms - self.start_ms,
            len(live),
            len(st.written),
            len(st.reads),
            stats.frames - base["frames"],
            payload,
            stats.bytes - base["bytes"],
        )
        for key, value in zip(SERIES, row, strict=True):
            st.series[key].append(value)
        for heal in st.heals:
            if heal.caught_up_ms is None and self._caught_up(heal, live):
                heal.caught_up_ms = self.net.now_ms - heal.at_ms
        self._tick()

    def _caught_up(self, heal: _Heal, live: Sequence[int]) -> bool:
        """Whether every op awaited after ``heal`` is on every live node. An
        op once everywhere stays there while the same nodes are live, so the
        check resumes where the last one stopped."""
        if heal.live != tuple(live):
            heal.live, heal.checked = tuple(live), 0
        arrivals = self.state.arrivals
        for k in range(heal.checked, len(heal.awaited)):
            seen = arrivals[heal.awaited[k]]
            if len(seen) < len(live) or any(node not in seen for node in live):
                heal.checked = k
                return False
        heal.checked = len(heal.awaited)
        return True

    def _everywhere(self, ids: Sequence[bytes], live: Sequence[int]) -> bool:
        arrivals = self.state.arrivals
        return all(node in arrivals[i] for i in ids for node in live)

    def _acknowledged(self) -> list[bytes]:
        """Ops written so far that some node not lost for good holds (an op
        that never left a lost node is gone with it, and counted apart)."""
        lost = self.state.lost
        return [i for i, seen in self.state.arrivals.items() if seen.keys() - lost]

    def _healed(self, what: str) -> None:
        self.state.heals.append(_Heal(self.net.now_ms, what, self._acknowledged()))
        self._log(f"{what}")

    def _log(self, what: str, **details: Any) -> None:
        self.state.faults.append(
            {"at_ms": self.net.now_ms - self.start_ms, "event": what, **details}
        )

    def _open(self, kind: str, instant: bool = False) -> _Window:
        now = self.net.now_ms - self.start_ms
        window = _Window(kind, now, now if instant else None)
        self.state.windows.append(window)
        return window

    def _close(self, window: _Window | None) -> None:
        if window is not None and window.to_ms is None:
            window.to_ms = self.net.now_ms - self.start_ms

    # -- faults ---------------------------------------------------------------------

    def _fault_actions(self, fault: Fault) -> list[tuple[int, Action]]:
        if fault.rate_per_min > 0:
            return self._random_fault_actions(fault)
        start = self._at(fault.at)
        stop = self._at(fault.until) if fault.until is not None else None
        actions: list[tuple[int, Action]] = []
        if fault.kind == "partition":
            actions.append((start, lambda: self._partition(fault, self.plan_rng)))
            if stop is not None:
                actions.append((stop, self._heal))
        elif fault.kind in ("crash", "lose"):
            actions += self._outage(fault, self.plan_rng, start, stop)
        elif fault.kind == "churn":
            out: list[int] = []
            end = stop if stop is not None else self.end_ms
            window: list[_Window] = []
            actions.append((start, lambda: window.append(self._open("churn"))))
            steps = range(start + fault.interval_ms, end, fault.interval_ms)
            actions += [(t, lambda: self._churn(out)) for t in steps]
            actions.append((end, lambda: self._restart(out, "churn ends", window)))
        elif fault.kind == "skew":
            actions.append((start, lambda: self._skew(fault.max_ms)))
        return actions

    def _random_fault_actions(self, fault: Fault) -> list[tuple[int, Action]]:
        """Arrivals of ``fault`` at ``rate_per_min`` (a Poisson process) between
        ``at`` and ``until``, from a generator of its own. A partition lasts a
        drawn duration and the next one starts after its heal; crashes may
        overlap. A heal or restart due after the workload happens at its end."""
        rng = random.Random(self.plan_rng.getrandbits(64))  # noqa: S311 (a simulation)
        start = self._at(fault.at)
        stop = self._at(fault.until if fault.until is not None else 1.0)
        per_ms = fault.rate_per_min / 60_000
        actions: list[tuple[int, Action]] = []
        at = float(start)
        for _ in range(int(per_ms * (stop - start) * 4) + 16):  # bounded, as for the workload
            at += rng.expovariate(per_ms)
            if at >= stop:
                break
            when = int(at)
            lasts = max(1, topology.draw(rng, fault.duration)) if fault.duration else None
            end = when + lasts if lasts is not None and when + lasts < self.end_ms else None
            if fault.kind == "partition":
                actions.append((when, partial(self._partition, fault, rng)))
                if end is not None:
                    actions.append((end, self._heal))
                at += lasts or 0
            elif fault.kind in ("crash", "lose"):
                actions += self._outage(fault, rng, when, end if fault.kind == "crash" else None)
            elif fault.kind == "skew":
                actions.append((when, partial(self._jump, fault.max_ms, rng)))
        return actions

    def _outage(
        self, fault: Fault, rng: random.Random, start: int, stop: int | None
    ) -> list[tuple[int, Action]]:
        """A crash (or loss) at ``start``; the victims restart at ``stop``."""
        victims: list[int] = []
        window: list[_Window] = []

        def crash() -> None:
            victims.extend(self._crash(fault, rng))
            window.append(self._open(fault.kind, instant=fault.kind == "lose"))

        actions: list[tuple[int, Action]] = [(start, crash)]
        if stop is not None and fault.kind == "crash":
            actions.append((stop, lambda: self._restart(victims, "restart", window)))
        return actions

    def _partition(self, fault: Fault, rng: random.Random) -> None:
        nodes = list(range(self.scenario.nodes))
        rng.shuffle(nodes)
        bridges = [nodes.pop()] if fault.shape == "bridge" else []
        count = 2 if fault.shape == "halves" else max(2, fault.islands)
        groups = [sorted(nodes[k::count]) for k in range(count)]
        self.net.partition([[peer_id(i) for i in g] for g in groups], [peer_id(b) for b in bridges])
        self._log("partition", shape=fault.shape, groups=groups, bridges=bridges)
        self._close(self._partition_window)  # a new partition replaces the one in place
        self._partition_window = self._open("partition")

    def _heal(self) -> None:
        self.net.heal()
        self._close(self._partition_window)
        self._partition_window = None
        self._healed("heal")

    def _crash(self, fault: Fault, rng: random.Random) -> list[int]:
        candidates = [i for i in self.live() if i != 0]
        wanted = round(fault.fraction * self.scenario.nodes)
        if fault.rate_per_min > 0 and fault.fraction == 0:
            wanted = 1  # at a rate, one node at a time unless a fraction is given
        count = min(len(candidates), wanted)
        victims = sorted(rng.sample(candidates, count))
        for i in victims:
            self.net.crash(peer_id(i))
            (self.state.down if fault.kind == "crash" else self.state.lost).add(i)
        self._log(fault.kind, nodes=victims)
        return victims

    def _restart(self, nodes: list[int], what: str, window: Sequence[_Window] = ()) -> None:
        back = sorted(i for i in nodes if i in self.state.down)
        for i in back:
            self.state.down.discard(i)
            live = [j for j in self.live() if j != i]
            contact = live[self.plan_rng.randrange(len(live))]
            # Its bootstrap addresses are configuration: they survive a crash.
            self.net.restart(peer_id(i))
            self.net.join(peer_id(i), peer_id(contact), [peer_id(k) for k in self.known[i]])
        nodes.clear()
        for w in window:
            self._close(w)
        if back:
            self._healed(what)

    def _churn(self, out: list[int]) -> None:
        """One node leaves; the one that left longest ago comes back."""
        if out:
            self._restart([out.pop(0)], "rejoin")
        candidates = [i for i in self.live() if i != 0]
        if len(candidates) > 1:
            leaver = candidates[self.plan_rng.randrange(len(candidates))]
            self.net.crash(peer_id(leaver))
            self.state.down.add(leaver)
            out.append(leaver)
            self._log("leave", nodes=[leaver])

    def _skew(self, max_ms: int) -> None:
        offsets = [self.plan_rng.randint(-max_ms, max_ms) for _ in range(self.scenario.nodes)]
        for i, offset in enumerate(offsets):
            self.net.set_skew(peer_id(i), offset)
        self._log("skew", offsets_ms=offsets)
        self._open("skew", instant=True)

    def _jump(self, max_ms: int, rng: random.Random) -> None:
        """One node's clock jumps to a new offset (a skew fault at a rate)."""
        node = rng.randrange(self.scenario.nodes)
        offset = rng.randint(-max_ms, max_ms)
        self.net.set_skew(peer_id(node), offset)
        self._log("clock jump", node=node, offset_ms=offset)
        self._open("skew", instant=True)

    # -- the end --------------------------------------------------------------------

    def _finish(self) -> None:
        """The workload is over: the network heals, crashed nodes come back."""
        self.net.run_until(self.end_ms)
        if self.net.partitioned:
            self._heal()
        if self.state.down:
            self._restart(sorted(self.state.down), "restart at end")
        for window in self.state.windows:
            self._close(window)

    def _settle(self) -> int | None:
        """Run quietly until every live node holds the same ops; when, or None."""
        s = self.scenario
        for t in range(self.end_ms, self.end_ms + s.settle_ms + 1, s.sample_ms):
            self.net.run_until(t)
            self._sample()
            live = self.live()
            if len({self.replicas[i].state_hash() for i in live}) == 1 and self._everywhere(
                self._acknowledged(), live
            ):
                break
        else:
            t = -1
        # Maelstrom's final reads: one on every live node once the run is quiet.
        self.state.reads += [(self.net.now_ms, i) for i in self.live()]
        return t - self.end_ms if t >= 0 else None

    def _report(self, settled: int | None) -> dict[str, Any]:
        s = self.scenario
        st = self.state
        net = self.net.stats
        writes, reads = len(st.written), len(st.reads)
        operations = writes + reads
        traffic = _traffic(self.at_start, _snapshot(self.net), writes, operations)
        live = self.live()
        gone = st.lost
        acked = self._acknowledged()
        lost = sum(1 for i in acked if any(n not in st.arrivals[i] for n in live))
        # An op written on a node lost for good that reached no other node.
        only_gone = sum(
            1
            for i, (_, node) in st.written.items()
            if node in gone and not st.arrivals[i].keys() - gone
        )
        return {
            "scenario": s.name,
            "seed": self.seed,
            "version": importlib.metadata.version("archipel"),
            "parameters": asdict(s),
            "operations": {
                "writes": writes,
                "reads": reads,
                "refused_by_workload": st.refused,
                "live_nodes_at_end": len(live),
            },
            "messages": traffic,
            "network": {
                "dials": net.dials,
                "frames_dropped": net.dropped,
                "timer_calls": net.timers,
                "stale_timer_events": net.stale_timers,
                "queued_messages": net.queued,
                "queued_ms_total": net.queued_ms,
                "queued_ms_max": net.max_queued_ms,
            },
            "latency_ms": latencies(st.written, st.arrivals, st.reads, live, s.nodes),
            "convergence": {
                "heals": [
                    {
                        "at_ms": h.at_ms - self.start_ms,
                        "after": h.what,
                        "caught_up_ms": h.caught_up_ms,
                    }
                    for h in st.heals
                ],
                "converged": settled is not None,
                "converged_ms_after_workload": settled,
                "hash_agreement": [[t, round(f, 4)] for t, f in st.agreement],
            },
            "series": {"interval_ms": s.sample_ms, **st.series},
            "acknowledged_ops_lost": lost,
            "ops_only_on_lost_nodes": only_gone,
            "peak_pending": net.peak_pending,
            "faults": st.faults,
            "fault_windows": [
                {"kind": w.kind, "from_ms": w.from_ms, "to_ms": w.to_ms} for w in st.windows
            ],
            "events": net.events,
            "simulated_ms": self.net.now_ms - T0,
        }


# -- helpers ----------------------------------------------------------------------


def _snapshot(net: Network) -> dict[str, Any]:
    return {"frames": net.stats.frames, "bytes": net.stats.bytes, "kinds": dict(net.stats.per_kind)}


def write(result: Result, out: Path) -> list[Path]:
    """``report.json`` and ``summary.md`` into the directory ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.json", out / "summary.md"]
    paths[0].write_text(result.json())
    paths[1].write_text(result.markdown())
    return paths
