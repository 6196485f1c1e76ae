"""The simulator's network model: bandwidth and queueing, topologies (small
world, links only along the topology), faults at random rates, the time
series and fault windows the plots need, and the progress callback."""

from __future__ import annotations

import random
from itertools import pairwise
from typing import Any

import pytest
from helpers import T0, cells_federation, key, member

from archipel.crdt import Replica
from archipel.simulations import run, topology
from archipel.simulations.network import Network
from archipel.simulations.scenario import ScenarioError, load, parse

TINY = {
    "name": "tiny",
    "nodes": 6,
    "duration_ms": 3_000,
    "settle_ms": 30_000,
    "latency": {"kind": "fixed", "ms": 20},
    "workload": {"rate": 3.0, "warmup_ms": 1_500, "mix": {"note": 1}},
}


def tiny(**more: Any) -> dict[str, Any]:
    return {**TINY, **more}


AUTHORS = [member(c, n) for c in range(3) for n in (1, 2)]


def peer(i: int) -> bytes:
    return topology.peer_id(i)


def converged(replicas: list[Replica]) -> bool:
    return len({r.state_hash() for r in replicas}) == 1


# -- bandwidth ------------------------------------------------------------------------


def test_a_limited_link_sends_one_message_at_a_time() -> None:
    """1000 bytes at 100,000 B/s take 10 ms on the wire, then the latency; a
    second message sent at once waits for the first (a queue)."""
    net = Network(random.Random(1), 0, latency_ms=5, link_bandwidth=lambda _s, _d: 100_000)
    a, b = peer(0), peer(1)
    assert net._arrival(a, b, 1_000) == 10 + 5
    assert net._arrival(a, b, 1_000) == 20 + 5
    assert (net.stats.queued, net.stats.queued_ms) == (1, 10)
    assert net._arrival(b, a, 1_000) == 15  # the other direction is its own link
    net.now_ms = 100  # the link has long been free again
    assert net._arrival(a, b, 500) == 100 + 5 + 5
    assert net.stats.queued == 1


def test_a_broken_connection_drops_its_queue() -> None:
    net = Network(random.Random(1), 0, latency_ms=5, link_bandwidth=lambda _s, _d: 1_000)
    a, b = peer(0), peer(1)
    assert net._arrival(a, b, 1_000) == 1_000 + 5
    net._drop(a, b)
    net._last_arrival.clear()
    assert net._arrival(a, b, 1_000) == 1_000 + 5  # not queued behind the lost one


def test_bandwidth_slows_delivery_but_everything_arrives() -> None:
    free = run.run(parse(tiny())).report
    slow = run.run(parse(tiny(bandwidth={"bytes_per_s": 4_000}))).report
    assert slow["convergence"]["converged"]
    assert slow["acknowledged_ops_lost"] == 0
    assert free["network"]["queued_messages"] == 0
    assert slow["network"]["queued_messages"] > 0
    assert slow["latency_ms"]["delivery"]["p50"] > free["latency_ms"]["delivery"]["p50"]


def test_clusters_can_have_slower_bridges() -> None:
    scenario = parse(
        tiny(
            nodes=8,
            topology={"kind": "clusters", "clusters": 2},
            bandwidth={"bytes_per_s": 1_000_000, "bridge_bytes_per_s": 10_000},
        )
    )
    bandwidth = topology.link_bandwidth(scenario)
    assert bandwidth is not None
    assert bandwidth(peer(0), peer(1)) == 1_000_000  # inside the first cluster
    assert bandwidth(peer(0), peer(7)) == 10_000  # between the clusters
    assert topology.link_bandwidth(parse(tiny())) is None  # unlimited: no queueing at all


# -- topologies -----------------------------------------------------------------------


def small_world(n: int, degree: int, rewire: float, seed: int = 1) -> list[list[int]]:
    spec = parse(
        tiny(nodes=n, topology={"kind": "small-world", "degree": degree, "rewire": rewire})
    )
    return topology.known(spec, random.Random(seed))


def edges(known: list[list[int]]) -> set[frozenset[int]]:
    return {frozenset((i, j)) for i, js in enumerate(known) for j in js}


def test_small_world_without_rewiring_is_a_ring_lattice() -> None:
    known = small_world(20, 6, 0.0)
    for i, neighbours in enumerate(known):
        assert neighbours == sorted({(i + d) % 20 for d in (-3, -2, -1, 1, 2, 3)})


def test_small_world_rewires_some_links_and_keeps_their_number() -> None:
    lattice = edges(small_world(60, 6, 0.0))
    rewired = small_world(60, 6, 0.3)
    assert all(i not in js for i, js in enumerate(rewired))  # no self-links
    assert all(i in rewired[j] for i, js in enumerate(rewired) for j in js)  # symmetric
    assert all(js for js in rewired)  # nobody is left alone
    assert len(edges(rewired)) == len(lattice) == 60 * 3
    moved = len(edges(rewired) - lattice)
    assert 0.15 * 180 < moved < 0.45 * 180  # about 30 % of the links
    assert rewired == small_world(60, 6, 0.3)  # the same seed, the same graph
    assert rewired != small_world(60, 6, 0.3, seed=2)


def test_with_links_only_along_the_topology_nodes_talk_to_neighbours_only() -> None:
    """A line 0 - 1 - 2: 0 and 2 never connect, yet ops reach every node via 1."""
    origin, genesis = cells_federation()
    replicas = [origin]
    for _ in range(2):
        replica = Replica(genesis.federation)
        replica.receive(genesis, T0)
        replicas.append(replica)
    line = frozenset(
        {(peer(0), peer(1)), (peer(1), peer(0)), (peer(1), peer(2)), (peer(2), peer(1))}
    )
    net = Network(random.Random(3), T0, latency_ms=20, links=line)
    for i, replica in enumerate(replicas):
        net.add(peer(i), replica)
    net.join(peer(1), peer(0))
    net.join(peer(2), peer(1), [peer(0)])  # it knows 0's address, but no link reaches it
    net.run_for(3_000)
    for i in range(6):
        op = replicas[i % 3].author(key(AUTHORS[i % 3]), "note", {"text": f"n{i}"}, net.now_ms)
        net.publish(peer(i % 3), op)
        net.run_for(100)
    net.run_for(5_000)
    assert converged(replicas)
    assert all(len(r.graph) == 7 for r in replicas)
    assert peer(2) not in net.node(peer(0)).peers.active
    assert peer(0) not in net.node(peer(2)).peers.active
    assert (peer(0), peer(2)) not in net._connections


def test_a_small_world_mesh_scenario_converges() -> None:
    spec = parse(
        tiny(
            nodes=12,
            topology={"kind": "small-world", "degree": 4, "rewire": 0.2, "links": "topology"},
            bandwidth={"bytes_per_s": 32_000},
        )
    )
    report = run.run(spec).report
    assert report["convergence"]["converged"]
    assert report["acknowledged_ops_lost"] == 0


# -- faults at random rates -------------------------------------------------------------


def test_crashes_at_a_rate_come_back_after_their_duration() -> None:
    faults = [{"kind": "crash", "rate_per_min": 60, "duration": {"kind": "fixed", "ms": 400}}]
    report = run.run(parse(tiny(duration_ms=6_000, faults=faults))).report
    crashes = [f for f in report["faults"] if f["event"] == "crash"]
    restarts = [f for f in report["faults"] if f["event"] == "restart"]
    assert len(crashes) >= 2  # about 6 expected in 6 s at 1 per second
    assert all(len(c["nodes"]) == 1 for c in crashes)  # one node at a time
    windows = [w for w in report["fault_windows"] if w["kind"] == "crash"]
    assert len(windows) == len(crashes)
    # Each crash lasts 400 ms, unless the workload ended first.
    ended = [w for w in windows if w["to_ms"] - w["from_ms"] == 400]
    assert len(ended) == len(restarts) >= len(crashes) - 1
    assert report["convergence"]["converged"]
    assert report["acknowledged_ops_lost"] == 0


def test_partitions_at_a_rate_heal_before_the_next_one() -> None:
    faults = [
        {
            "kind": "partition",
            "shape": "islands",
            "rate_per_min": 40,
            "duration": {"kind": "uniform", "low_ms": 200, "high_ms": 600},
        }
    ]
    report = run.run(parse(tiny(duration_ms=8_000, faults=faults))).report
    events = [f["event"] for f in report["faults"]]
    assert events.count("partition") >= 2
    # partition, heal, partition, heal, ...: never two partitions at once.
    assert events == ["partition", "heal"] * (len(events) // 2)
    for w in report["fault_windows"]:
        assert 200 <= w["to_ms"] - w["from_ms"] <= 600 or w["to_ms"] == 8_000
    assert report["convergence"]["converged"]


def test_random_faults_are_deterministic_and_follow_the_seed() -> None:
    faults = [
        {"kind": "crash", "rate_per_min": 30, "duration": {"kind": "exponential", "ms": 500}},
        {"kind": "skew", "rate_per_min": 30, "max_ms": 1_000},
    ]
    spec = parse(tiny(faults=faults, bandwidth={"bytes_per_s": 20_000}))
    first = run.run(spec).json()
    assert run.run(spec).json() == first
    assert run.run(spec, seed=2).json() != first


def test_a_fault_at_a_rate_needs_what_it_needs() -> None:
    with pytest.raises(ScenarioError, match="duration"):
        parse(tiny(faults=[{"kind": "crash", "rate_per_min": 5}]))
    with pytest.raises(ScenarioError, match="churn has no rate_per_min"):
        parse(tiny(faults=[{"kind": "churn", "rate_per_min": 5}]))
    with pytest.raises(ScenarioError, match="rate_per_min"):
        parse(tiny(faults=[{"kind": "lose", "rate_per_min": -1}]))
    with pytest.raises(ScenarioError, match=r"faults\.0\.duration: kind"):
        parse(tiny(faults=[{"kind": "crash", "rate_per_min": 5, "duration": {"kind": "x"}}]))


# -- what the plots need, and progress --------------------------------------------------


def test_the_report_holds_the_time_series_and_fault_windows() -> None:
    spec = load("partition-halves", {"nodes": 8, "duration_ms": 4_000, "workload.warmup_ms": 2_000})
    report = run.run(spec).report
    series = report["series"]
    agreement = report["convergence"]["hash_agreement"]
    assert series["interval_ms"] == spec.sample_ms
    assert series["t_ms"] == [t for t, _ in agreement]
    assert all(b - a == spec.sample_ms for a, b in pairwise(series["t_ms"]))
    for key_ in ("frames", "payload_frames", "bytes", "writes", "reads"):
        values = series[key_]
        assert len(values) == len(agreement)
        assert values == sorted(values)  # cumulative
    assert series["frames"][-1] <= report["messages"]["frames"]
    assert series["writes"][-1] == report["operations"]["writes"]
    partition = next(f for f in report["faults"] if f["event"] == "partition")
    heal = next(f for f in report["faults"] if f["event"] == "heal")
    assert report["fault_windows"] == [
        {"kind": "partition", "from_ms": partition["at_ms"], "to_ms": heal["at_ms"]}
    ]
    cdf = report["latency_ms"]["delivery_cdf"]
    assert len(cdf) == 101
    assert cdf == sorted(cdf)
    assert cdf[50] == report["latency_ms"]["delivery"]["p50"]
    assert cdf[100] == report["latency_ms"]["delivery"]["max"]


def test_progress_is_reported_and_changes_nothing() -> None:
    spec = parse(tiny(faults=[{"kind": "partition", "at": 0.2, "until": 0.5}]))
    seen: list[tuple[int, int]] = []
    with_progress = run.run(spec, progress=lambda done, total: seen.append((done, total)))
    assert with_progress.json() == run.run(spec).json()
    total = 1_500 + 3_000 + 30_000
    assert {t for _, t in seen} == {total}
    done = [d for d, _ in seen]
    assert done == sorted(done)
    assert done[-1] == total
    assert len(done) > 30  # during the warm-up, the workload and the settling
    assert any(d < 1_500 for d in done)
