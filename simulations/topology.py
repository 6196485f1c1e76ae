"""The shape of the simulated network: who knows whom, and what each link is like.

A topology gives every node its bootstrap addresses (:func:`known`): every
other node (full mesh), ``degree`` random others (random regular), a ring
lattice with some links rewired at random (small world, Watts and Strogatz
1998), or its own group plus one gateway of every other group (clusters).
With ``links = "topology"`` those are also the only links that exist: a dial
along any other pair fails, as on a mesh network where only neighbours hear
each other. Each link direction has a latency distribution (clusters: a
slower one between groups) and optionally a bandwidth, which the network
turns into a transmission delay and a queue (:mod:`.network`).

Everything random is drawn from the generator passed in, so a topology is a
function of (scenario, seed).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

from .scenario import Latency, Scenario

LinkLatency = Callable[[random.Random, bytes, bytes], int]
"""Latency of one message from ``src`` to ``dst`` (ms), drawn from the rng."""

LinkBandwidth = Callable[[bytes, bytes], int]
"""Bytes per second of the link from ``src`` to ``dst`` (0: unlimited)."""

MAX_DELAY_MS = 60_000
"""Drawn delays are capped (a lognormal or exponential tail is unbounded)."""


def peer_id(index: int) -> bytes:
    """The simulated node ``index``'s peer id."""
    return (b"sim-node-%06d" % index).ljust(32, b"\x00")


def draw(rng: random.Random, latency: Latency) -> int:
    """One delay (ms) from the distribution ``latency``."""
    if latency.kind == "uniform":
        return rng.randint(latency.low_ms, latency.high_ms)
    if latency.kind == "lognormal":
        drawn = rng.lognormvariate(math.log(max(latency.median_ms, 1)), latency.sigma)
        return max(1, min(int(drawn), MAX_DELAY_MS))
    if latency.kind == "exponential":
        drawn = rng.expovariate(1 / latency.ms) if latency.ms > 0 else 0.0
        return min(int(drawn), MAX_DELAY_MS)
    return latency.ms


def _cluster_of(scenario: Scenario) -> dict[bytes, int]:
    n = scenario.nodes
    clusters = max(1, min(scenario.topology.clusters, n))
    return {peer_id(i): i * clusters // n for i in range(n)}


def link_latency(scenario: Scenario) -> LinkLatency | None:
    """Per-message latency of each link (clusters: the bridge's between
    groups), or None when every message takes the same fixed latency."""
    topology = scenario.topology
    if topology.kind != "clusters":
        if scenario.latency.kind == "fixed":
            return None  # no draw at all: the network adds latency.ms
        return lambda rng, _src, _dst: draw(rng, scenario.latency)
    cluster = _cluster_of(scenario)

    def latency(rng: random.Random, src: bytes, dst: bytes) -> int:
        same = cluster.get(src) == cluster.get(dst)
        return draw(rng, scenario.latency if same else topology.bridge)

    return latency


def link_bandwidth(scenario: Scenario) -> LinkBandwidth | None:
    """Bytes per second of each link direction, or None if no link is limited."""
    bandwidth = scenario.bandwidth
    inside = bandwidth.bytes_per_s
    between = bandwidth.bridge_bytes_per_s or inside
    if scenario.topology.kind != "clusters" or between == inside:
        return (lambda _src, _dst: inside) if inside else None
    cluster = _cluster_of(scenario)
    return lambda src, dst: inside if cluster.get(src) == cluster.get(dst) else between


def known(scenario: Scenario, rng: random.Random) -> list[list[int]]:
    """The addresses each node starts with (it joins through one of them)."""
    n = scenario.nodes
    topology = scenario.topology
    if topology.kind == "full-mesh":
        return [[j for j in range(n) if j != i] for i in range(n)]
    if topology.kind == "random-regular":
        return _random_regular(n, topology.degree, rng)
    if topology.kind == "small-world":
        return _small_world(n, topology.degree, topology.rewire, rng)
    clusters = max(1, min(topology.clusters, n))
    members: list[list[int]] = [[] for _ in range(clusters)]
    for i in range(n):
        members[i * clusters // n].append(i)
    gateways = [m[0] for m in members if m]
    return [
        sorted({j for j in members[i * clusters // n] if j != i} | {g for g in gateways if g != i})
        for i in range(n)
    ]


def links(
    scenario: Scenario, known_lists: list[list[int]]
) -> frozenset[tuple[bytes, bytes]] | None:
    """The links that exist (both directions of every known address), or None
    when any node may reach any other (``links = "any"``, the default)."""
    if scenario.topology.links == "any" or scenario.topology.kind == "full-mesh":
        return None
    pairs: set[tuple[bytes, bytes]] = set()
    for i, neighbours in enumerate(known_lists):
        for j in neighbours:
            pairs.add((peer_id(i), peer_id(j)))
            pairs.add((peer_id(j), peer_id(i)))
    return frozenset(pairs)


def _random_regular(n: int, degree: int, rng: random.Random) -> list[list[int]]:
    """A union of degree/2 random Hamiltonian cycles: every node has at most
    ``degree`` neighbours, nearly always exactly that many."""
    edges: list[set[int]] = [set() for _ in range(n)]
    for _ in range(max(1, degree // 2)):
        order = list(range(n))
        rng.shuffle(order)
        for k in range(n):
            a, b = order[k], order[(k + 1) % n]
            if a != b:
                edges[a].add(b)
                edges[b].add(a)
    return [sorted(e) for e in edges]


def _small_world(n: int, degree: int, rewire: float, rng: random.Random) -> list[list[int]]:
    """Watts-Strogatz: a ring where each node links to its ``degree / 2``
    nearest on either side; then each link (i, i + j) is moved, with
    probability ``rewire``, to (i, r) for a random r not yet linked to i.
    A link is not moved away from a node it would leave with no link."""
    half = max(1, min(degree, n - 1) // 2)
    edges: list[set[int]] = [set() for _ in range(n)]
    for i in range(n):
        for j in range(1, half + 1):
            b = (i + j) % n
            if b != i:
                edges[i].add(b)
                edges[b].add(i)
    for j in range(1, half + 1):
        for i in range(n):
            b = (i + j) % n
            if rng.random() >= rewire or b not in edges[i] or len(edges[b]) <= 1:
                continue
            free = [c for c in range(n) if c != i and c not in edges[i]]
            if not free:
                continue
            c = free[rng.randrange(len(free))]
            edges[i].discard(b)
            edges[b].discard(i)
            edges[i].add(c)
            edges[c].add(i)
    return [sorted(e) for e in edges]
