"""Run a scenario on the virtual network: (scenario, seed) -> report.

Theory of operation. :func:`run` builds one federation (the workload's
genesis and members), one replica and one real :class:`SyncNode` per node on
a :class:`~archipel.simulations.network.Network`, lets the nodes join along
the scenario's topology, then plays a schedule merged from three sources in
time order: operations (Poisson arrivals at ``rate`` per node; a write
authors a real op on the node's own replica and publishes it, a read records
what the node holds), faults (partitions, crashes, losses, churn, clock
skew, each with its heal) and samples (every ``sample_ms``: state-hash
agreement, and whether the ops acknowledged before each heal have reached
every live node). After the workload, crashed nodes come back and the run
goes on quietly until every live node holds the same ops, or ``settle_ms``.

Each replica reports every op it applies (:class:`_Observed`), which gives
delivery times per op and node. Everything random comes from one
``random.Random(seed)`` (the workload and the schedule draw from child
generators seeded from it), so a run is a function of (scenario, seed, code
version). The report holds no wall-clock figure; :class:`Result` carries
the wall time and events per second beside it.
"""

from __future__ import annotations

import heapq
import importlib.metadata
import json
import math
import random
import time
from bisect import bisect_right
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from archipel.crdt import Op, Replica
from archipel.protocol.node import SyncConfig
from archipel.protocol.plumtree import PushLimits

from .network import LinkLatency, Network
from .scenario import Fault, Latency, Scenario
from .workload import Workload

T0 = 1_750_000_000_000
PAYLOAD_KINDS = ("Push", "Ops")
"""Frames that carry ops; every other frame is control."""


@dataclass(frozen=True, slots=True)
class Result:
    """A run's report (deterministic) and how long it took (not)."""

    report: dict[str, Any]
    wall_s: float
    events: int

    @property
    def events_per_s(self) -> float:
        return self.events / self.wall_s if self.wall_s > 0 else 0.0

    def json(self) -> str:
        return report_json(self.report)

    def markdown(self) -> str:
        return summary(self.report, self)


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
    agreement: list[tuple[int, float]] = field(default_factory=list)


def peer_id(index: int) -> bytes:
    return (b"sim-node-%06d" % index).ljust(32, b"\x00")


def run(scenario: Scenario, seed: int | None = None) -> Result:
    """Play ``scenario`` with ``seed`` (default: the scenario's own)."""
    began = time.perf_counter()
    sim = _Simulation(scenario, scenario.seed if seed is None else seed)
    report = sim.play()
    return Result(report, time.perf_counter() - began, sim.net.stats.events)


class _Simulation:
    def __init__(self, scenario: Scenario, seed: int) -> None:
        self.scenario = scenario
        self.seed = seed
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
        )
        self.members = [list(range(i, len(self.workload.members), n)) for i in range(n)]
        self.state = _State()
        self.known: list[list[int]] = []
        protocol = scenario.protocol
        self.net = Network(
            self.rng,
            T0,
            config=SyncConfig(**protocol.sync) if protocol.sync else None,
            push_limits=PushLimits(**protocol.push) if protocol.push else None,
            link_latency=_link_latency(scenario),
        )
        genesis = self.workload.genesis
        self.replicas: list[Replica] = []
        for i in range(n):
            replica = _Observed(genesis.federation, self._applied_at(i))
            replica.receive(genesis, T0)
            self.replicas.append(replica)
            self.net.add(peer_id(i), replica)
        self.start_ms = T0 + scenario.workload.warmup_ms
        self.end_ms = self.start_ms + scenario.duration_ms

    def _applied_at(self, node: int) -> Callable[[Op], None]:
        def applied(op: Op) -> None:
            if op.id in self.state.written:
                self.state.arrivals[op.id][node] = self.net.now_ms

        return applied

    def live(self) -> list[int]:
        return [i for i in range(self.scenario.nodes) if self.net.is_up(peer_id(i))]

    # -- the run ------------------------------------------------------------------

    def play(self) -> dict[str, Any]:
        self._join()
        schedule = self._schedule()
        at_start = None
        for _ in range(len(schedule)):
            at, _, action = heapq.heappop(schedule)
            self.net.run_until(at)
            if at_start is None and at >= self.start_ms:
                at_start = _snapshot(self.net)
            action()
        self._finish()
        settled = self._settle()
        return self._report(at_start or _snapshot(self.net), settled)

    def _join(self) -> None:
        self.known = known = _known(self.scenario, self.plan_rng)
        for i in range(1, self.scenario.nodes):
            contact = known[i][self.plan_rng.randrange(len(known[i]))]
            self.net.run_until(T0 + i * 10)
            self.net.join(peer_id(i), peer_id(contact), [peer_id(k) for k in known[i]])
        self.net.add_known_to(peer_id(0), [peer_id(k) for k in known[0]])

    def _schedule(self) -> list[tuple[int, int, Callable[[], None]]]:
        s = self.scenario
        events: list[tuple[int, int, Callable[[], None]]] = []

        def add(at: int, action: Callable[[], None]) -> None:
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
        heapq.heapify(events)
        return events

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
        hashes = [self.replicas[i].state_hash() for i in live]
        top = max(hashes.count(h) for h in set(hashes))
        self.state.agreement.append((self.net.now_ms - self.start_ms, top / len(live)))
        for heal in self.state.heals:
            if heal.caught_up_ms is None and self._everywhere(heal.awaited, live):
                heal.caught_up_ms = self.net.now_ms - heal.at_ms

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

    # -- faults ---------------------------------------------------------------------

    def _fault_actions(self, fault: Fault) -> list[tuple[int, Callable[[], None]]]:
        start = self._at(fault.at)
        stop = self._at(fault.until) if fault.until is not None else None
        actions: list[tuple[int, Callable[[], None]]] = []
        if fault.kind == "partition":
            actions.append((start, lambda: self._partition(fault)))
            if stop is not None:
                actions.append((stop, self._heal))
        elif fault.kind in ("crash", "lose"):
            victims: list[int] = []
            actions.append((start, lambda: victims.extend(self._crash(fault))))
            if stop is not None and fault.kind == "crash":
                actions.append((stop, lambda: self._restart(victims, "restart")))
        elif fault.kind == "churn":
            out: list[int] = []
            end = stop if stop is not None else self.end_ms
            steps = range(start + fault.interval_ms, end, fault.interval_ms)
            actions += [(t, lambda: self._churn(out)) for t in steps]
            actions.append((end, lambda: self._restart(out, "churn ends")))
        elif fault.kind == "skew":
            actions.append((start, lambda: self._skew(fault.max_ms)))
        return actions

    def _partition(self, fault: Fault) -> None:
        nodes = list(range(self.scenario.nodes))
        self.plan_rng.shuffle(nodes)
        bridges = [nodes.pop()] if fault.shape == "bridge" else []
        count = 2 if fault.shape == "halves" else max(2, fault.islands)
        groups = [sorted(nodes[k::count]) for k in range(count)]
        self.net.partition([[peer_id(i) for i in g] for g in groups], [peer_id(b) for b in bridges])
        self._log("partition", shape=fault.shape, groups=groups, bridges=bridges)

    def _heal(self) -> None:
        self.net.heal()
        self._healed("heal")

    def _crash(self, fault: Fault) -> list[int]:
        candidates = [i for i in self.live() if i != 0]
        count = min(len(candidates), round(fault.fraction * self.scenario.nodes))
        victims = sorted(self.plan_rng.sample(candidates, count))
        for i in victims:
            self.net.crash(peer_id(i))
            (self.state.down if fault.kind == "crash" else self.state.lost).add(i)
        self._log(fault.kind, nodes=victims)
        return victims

    def _restart(self, nodes: list[int], what: str) -> None:
        back = sorted(i for i in nodes if i in self.state.down)
        for i in back:
            self.state.down.discard(i)
            live = [j for j in self.live() if j != i]
            contact = live[self.plan_rng.randrange(len(live))]
            # Its bootstrap addresses are configuration: they survive a crash.
            self.net.restart(peer_id(i))
            self.net.join(peer_id(i), peer_id(contact), [peer_id(k) for k in self.known[i]])
        nodes.clear()
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

    # -- the end --------------------------------------------------------------------

    def _finish(self) -> None:
        """The workload is over: the network heals, crashed nodes come back."""
        self.net.run_until(self.end_ms)
        if self.net.partitioned:
            self._heal()
        if self.state.down:
            self._restart(sorted(self.state.down), "restart at end")

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

    def _latencies(self, live: Sequence[int]) -> dict[str, Any]:
        st = self.state
        delivery = [
            ms - st.written[i][0]
            for i, per_node in st.arrivals.items()
            for node, ms in per_node.items()
            if node != st.written[i][1]
        ]
        everywhere = [
            max(per_node.values()) - st.written[i][0]
            for i, per_node in st.arrivals.items()
            if all(n in per_node for n in live)
        ]
        stable, unstable = _stable_latencies(st.written, st.arrivals, st.reads, self.scenario.nodes)
        return {
            "delivery": _quantiles(delivery),
            "delivery_to_all_live": _quantiles(everywhere),
            "stable": _quantiles(stable),
            "never_stable": unstable,
        }

    def _report(self, at_start: dict[str, Any], settled: int | None) -> dict[str, Any]:
        s = self.scenario
        st = self.state
        writes, reads = len(st.written), len(st.reads)
        operations = writes + reads
        traffic = _traffic(at_start, _snapshot(self.net), writes, operations)
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
            "latency_ms": self._latencies(live),
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
            "acknowledged_ops_lost": lost,
            "ops_only_on_lost_nodes": only_gone,
            "peak_pending": self.net.stats.peak_pending,
            "faults": st.faults,
            "events": self.net.stats.events,
            "simulated_ms": self.net.now_ms - T0,
        }


# -- helpers ----------------------------------------------------------------------


def _draw(rng: random.Random, latency: Latency) -> int:
    if latency.kind == "uniform":
        return rng.randint(latency.low_ms, latency.high_ms)
    if latency.kind == "lognormal":
        drawn = rng.lognormvariate(math.log(max(latency.median_ms, 1)), latency.sigma)
        return max(1, min(int(drawn), 60_000))
    return latency.ms


def _link_latency(scenario: Scenario) -> LinkLatency:
    topology = scenario.topology
    if topology.kind != "clusters":
        return lambda rng, _src, _dst: _draw(rng, scenario.latency)
    size = scenario.nodes
    cluster = {peer_id(i): i * topology.clusters // size for i in range(size)}

    def latency(rng: random.Random, src: bytes, dst: bytes) -> int:
        same = cluster.get(src) == cluster.get(dst)
        return _draw(rng, scenario.latency if same else topology.bridge)

    return latency


def _known(scenario: Scenario, rng: random.Random) -> list[list[int]]:
    """The addresses each node starts with (it joins through one of them)."""
    n = scenario.nodes
    topology = scenario.topology
    if topology.kind == "full-mesh":
        return [[j for j in range(n) if j != i] for i in range(n)]
    if topology.kind == "random-regular":
        # A union of degree/2 random Hamiltonian cycles: every node has at
        # most ``degree`` neighbours, nearly always exactly that many.
        edges: list[set[int]] = [set() for _ in range(n)]
        for _ in range(max(1, topology.degree // 2)):
            order = list(range(n))
            rng.shuffle(order)
            for k in range(n):
                a, b = order[k], order[(k + 1) % n]
                if a != b:
                    edges[a].add(b)
                    edges[b].add(a)
        return [sorted(e) for e in edges]
    clusters = max(1, min(topology.clusters, n))
    members: list[list[int]] = [[] for _ in range(clusters)]
    for i in range(n):
        members[i * clusters // n].append(i)
    gateways = [m[0] for m in members if m]
    return [
        sorted({j for j in members[i * clusters // n] if j != i} | {g for g in gateways if g != i})
        for i in range(n)
    ]


def _snapshot(net: Network) -> dict[str, Any]:
    return {"frames": net.stats.frames, "bytes": net.stats.bytes, "kinds": dict(net.stats.per_kind)}


def _traffic(
    before: Mapping[str, Any], after: Mapping[str, Any], writes: int, operations: int
) -> dict[str, Any]:
    """Frames and bytes from the workload's start to the end of the run."""
    kinds = {k: v - before["kinds"].get(k, 0) for k, v in sorted(after["kinds"].items())}
    frames = after["frames"] - before["frames"]
    payload = sum(kinds.get(k, 0) for k in PAYLOAD_KINDS)
    per_write = max(writes, 1)
    return {
        "frames": frames,
        "bytes": after["bytes"] - before["bytes"],
        "by_kind": {k: v for k, v in kinds.items() if v},
        "msgs_per_op": round(frames / max(operations, 1), 3),
        "payload_per_write": round(payload / per_write, 3),
        "control_per_write": round((frames - payload) / per_write, 3),
        "bytes_per_write": round((after["bytes"] - before["bytes"]) / per_write, 1),
    }


def _stable_latencies(
    written: Mapping[bytes, tuple[int, int]],
    arrivals: Mapping[bytes, Mapping[int, int]],
    reads: Sequence[tuple[int, int]],
    nodes: int,
) -> tuple[list[int], int]:
    """Maelstrom's stable latency: for each written op, the time from its write
    to the first read after which every read (on any node) includes it. An op
    missing from the last read that could see it is never stable."""
    times = [t for t, _ in reads]
    stable: list[int] = []
    unstable = 0
    for op_id, (at, _) in written.items():
        seen = arrivals[op_id]
        first = bisect_right(times, at)
        last_miss = None
        done = max(seen.values())
        for k in range(first, len(reads)):
            t, node = reads[k]
            if node not in seen or seen[node] > t:
                last_miss = k
            elif t > done and len(seen) == nodes:
                break  # on every node: no later read can miss it
        if last_miss is None:
            if first < len(reads):
                stable.append(reads[first][0] - at)
        elif last_miss + 1 < len(reads):
            stable.append(reads[last_miss + 1][0] - at)
        else:
            unstable += 1
    return stable, unstable


def _quantiles(samples: Sequence[int]) -> dict[str, int | None]:
    ordered = sorted(samples)
    if not ordered:
        return {"count": 0, "p50": None, "p90": None, "p99": None, "max": None}

    def q(p: float) -> int:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))]

    return {"count": len(ordered), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": ordered[-1]}


def report_json(report: Mapping[str, Any]) -> str:
    return json.dumps(report, sort_keys=True, indent=1) + "\n"


def summary(report: Mapping[str, Any], result: Result | None = None) -> str:
    """A short Markdown summary of a report."""
    m = report["messages"]
    lat = report["latency_ms"]
    conv = report["convergence"]
    ops = report["operations"]
    lines = [
        f"# {report['scenario']} (seed {report['seed']}, archipel {report['version']})",
        "",
        f"- operations: {ops['writes']} writes, {ops['reads']} reads;"
        f" {ops['live_nodes_at_end']} live nodes at the end",
        f"- messages per op (all frames / all operations): {m['msgs_per_op']};"
        f" per write: {m['payload_per_write']} payload, {m['control_per_write']} control,"
        f" {m['bytes_per_write']} bytes",
        f"- delivery latency ms (p50 / p99 / max): {_pq(lat['delivery'])}",
        f"- stable latency ms (p50 / p99 / max): {_pq(lat['stable'])};"
        f" never stable: {lat['never_stable']}",
        f"- converged: {'yes' if conv['converged'] else 'NO'}"
        f" ({conv['converged_ms_after_workload']} ms after the workload)",
        "- caught up after heals (ms): "
        + (", ".join(f"{h['after']} {h['caught_up_ms']}" for h in conv["heals"]) or "no heals"),
        f"- acknowledged ops lost: {report['acknowledged_ops_lost']};"
        f" peak pending set: {report['peak_pending']}",
        f"- events: {report['events']}",
    ]
    if result is not None:
        lines.append(f"- wall time: {result.wall_s:.2f} s ({result.events_per_s:,.0f} events/s)")
    return "\n".join(lines) + "\n"


def _pq(q: Mapping[str, int | None]) -> str:
    return f"{q['p50']} / {q['p99']} / {q['max']}"


def write(result: Result, out: Path) -> None:
    """``report.json`` and ``summary.md`` into the directory ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(result.json())
    (out / "summary.md").write_text(result.markdown())
