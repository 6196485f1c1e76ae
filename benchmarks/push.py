"""Push and peer selection on the in-memory network: messages per op, payload
sends per op, delivery latency, repair after a death, overlay refill.

Deterministic (simulated time, seeded), so the figures are exact for a given
version of protocol/plumtree.py and protocol/peers.py; the wall time is the
whole simulation's, harness included.

    .venv/bin/python benchmarks/push.py
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _machine import describe
from gossipnet import PeerNet, PushNet, connected, regular_graph

from archipel.crdt import op_id
from archipel.protocol.messages import Graft, IHave, Ops, Prune, Push
from archipel.protocol.peers import PeerLimits

N = 25
LATENCY = 100


def push_row(name: str, edges: list[tuple[int, int]], every: int, kill: bool = False) -> str:
    net = PushNet(N, edges, latency=LATENCY)
    rng = random.Random(1)
    warm, measured = 20, 100
    start = 1_000
    for k in range(warm):
        net.originate_at(start + k * 1_000, rng.randrange(N), b"warm-%d" % k)
    t0 = start + warm * 1_000 + 5_000
    if kill:
        net.run(until=t0 - 10)
        victim = max(net.nodes, key=lambda node: len(node.broadcast.eager)).index
        net.kill(victim, detect_after=3_000)
    ids = []
    live = [node.index for node in net.nodes if node.alive]
    for k in range(measured):
        data = b"op-%06d" % k
        net.originate_at(t0 + k * every, rng.choice(live), data)
        ids.append(op_id(data))
    began = time.perf_counter()
    net.run()
    wall = time.perf_counter() - began
    window = [s for s in net.log if s.time >= t0]
    kinds = {kind: sum(isinstance(s.message, kind) for s in window)
             for kind in (Push, Ops, IHave, Graft, Prune)}  # fmt: skip
    ids_announced = sum(len(s.message.ids) for s in window if isinstance(s.message, IHave))
    payload = [net.payload[i] for i in ids]
    origin_time = {i: t0 + k * every for k, i in enumerate(ids)}
    lat = [node.arrived_at[i] - origin_time[i] for node in net.nodes if node.alive
           for i in ids if i in node.arrived_at]  # fmt: skip
    alive = sum(node.alive for node in net.nodes)
    complete = all(i in node.store for node in net.nodes if node.alive for i in ids)
    late = payload[measured // 2 :]
    return (
        f"| {name} | {every} | {sum(payload) / measured:.1f} | {sum(late) / len(late):.1f}"
        f" ({alive - 1}) | {len(window) / measured:.1f} | {kinds[Push] / measured:.1f}"
        f" / {kinds[IHave] / measured:.1f} / {(kinds[Graft] + kinds[Ops]) / measured:.2f}"
        f" / {kinds[Prune] / measured:.2f} | {ids_announced / measured:.0f}"
        f" | {statistics.median(lat):.0f} / {max(lat):.0f} | {'yes' if complete else 'NO'}"
        f" | {wall:.2f} |"
    )


def overlay_row(n: int, seed: int) -> str:
    limits = PeerLimits()
    net = PeerNet(n, seed=seed)
    for i in range(1, n):
        net.join_at(i * 200, i, random.Random(seed + i).randrange(min(i, 3)))
    settle = 200 * n + 4 * limits.shuffle_interval_ms
    net.loop.run(settle)
    sent_before = sum(node.selection.counters.asks_sent for node in net.nodes)
    sizes = [len(node.selection.active) for node in net.nodes]
    ok = connected(range(n), net.active_edges())
    victims = random.Random(seed).sample(range(n), n * 3 // 10)
    for victim in victims:
        net.kill(victim)
    killed_at = net.loop.now
    full_at = None
    for step in range(1, 121):
        net.loop.run(killed_at + step * 1_000)
        if full_at is None and all(
            len(node.selection.active) >= limits.active_size - 1 for node in net.live()
        ):
            full_at = step * 1_000
    after = [len(node.selection.active) for node in net.live()]
    ok_after = connected([node.index for node in net.live()], net.active_edges())
    asks = sum(node.selection.counters.asks_sent for node in net.nodes) - sent_before
    return (
        f"| {n} | {seed} | {statistics.mean(sizes):.2f} (min {min(sizes)})"
        f" | {'yes' if ok else 'NO'}"
        f" | {len(victims)} | {statistics.mean(after):.2f} (min {min(after)})"
        f" | {'yes' if ok_after else 'NO'} | {full_at} | {asks} |"
    )


def main() -> None:
    print(f"Machine: {describe()}\n")
    print(f"Push: {N} nodes, {LATENCY} ms links, 20 warm-up ops, then 100 measured ops"
          " from random nodes; per measured op:\n")  # fmt: skip
    print("| topology | ms between ops | payload sends (all) | payload sends (last 50)"
          " (n-1) | messages | Push / IHave / Graft+Ops / Prune | ids announced"
          " | latency median / max (ms) | all delivered | wall s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    regular = regular_graph(N, 6, random.Random(7))
    mesh = [(a, b) for a in range(N) for b in range(a + 1, N)]
    for name, edges in (("6-regular", regular), ("full mesh", mesh)):
        for every in (1_000, 20):
            print(push_row(name, edges, every))
    print(push_row("6-regular, tree node dies", regular, 500, kill=True))
    print("\nPeer selection: n nodes join through 3 contacts, settle, 30% die at once:\n")
    print("| n | seed | active size after join | connected | killed | active size 60 s"
          " after | connected | all >= 4 after (ms) | Neighbor requests |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for n, seed in ((50, 1), (50, 2), (200, 1)):
        print(overlay_row(n, seed))


if __name__ == "__main__":
    main()
