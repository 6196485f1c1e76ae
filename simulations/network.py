"""A deterministic virtual network that drives real :class:`SyncNode` objects.

Theory of operation. One event queue ordered by (virtual time, sequence);
every event is a call into one node (a connection made or lost, bytes
received, a timer). After each call the network carries out the node's
actions: a :class:`Dial` becomes a connection after one link latency (or a
failure, if the pair is partitioned or the target is down), a
:class:`Transmit` arrives after the link latency, in order per direction,
and a :class:`Hangup` closes the connection at the other end after the bytes
sent before it. Nodes' timers are events too. Everything is decided by the
seeded ``rng``: the same seed gives the same run.

Faults: :meth:`partition` cuts every connection between groups and refuses
dials across them until :meth:`heal`; :meth:`crash` drops a node with its
session state (its replica, the durable ops, survives) and :meth:`restart`
brings it back with a fresh :class:`SyncNode`.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from archipel.crdt import Op, Replica
from archipel.protocol.messages import PeerInfo
from archipel.protocol.node import Dial, Hangup, SyncConfig, SyncNode, Transmit


@dataclass(slots=True)
class _Host:
    info: PeerInfo
    replica: Replica
    node: SyncNode | None
    timer_at: int | None = None


@dataclass(slots=True)
class Stats:
    """What crossed the network."""

    frames: int = 0
    bytes: int = 0
    dials: int = 0
    dropped: int = 0
    per_kind: dict[str, int] = field(default_factory=dict)


class Network:
    """Nodes joined by links of ``latency_ms`` (fixed, or drawn per message)."""

    def __init__(
        self,
        rng: random.Random,
        now_ms: int,
        *,
        latency_ms: int | Callable[[random.Random], int] = 20,
        config: SyncConfig | None = None,
    ) -> None:
        self.rng = rng
        self.now_ms = now_ms
        self.config = config
        self.stats = Stats()
        self._latency = latency_ms
        self._queue: list[tuple[int, int, Callable[[], None]]] = []
        self._seq = 0
        self._hosts: dict[bytes, _Host] = {}
        self._connections: set[frozenset[bytes]] = set()
        self._last_arrival: dict[tuple[bytes, bytes], int] = {}
        self._groups: dict[bytes, int] | None = None

    # -- building ---------------------------------------------------------------

    def add(self, peer_id: bytes, replica: Replica) -> SyncNode:
        """A node with this id and replica (its address is a made-up one)."""
        info = PeerInfo(peer_id, (f"/sim/{peer_id.hex()[:8]}",))
        self._hosts[peer_id] = _Host(info, replica, None)
        return self._boot(peer_id)

    def _boot(self, peer_id: bytes) -> SyncNode:
        host = self._hosts[peer_id]
        node = SyncNode(host.replica, host.info, self.rng, self.now_ms, config=self.config)
        host.node = node
        host.timer_at = None
        self._after_call(peer_id)
        return node

    def info(self, peer_id: bytes) -> PeerInfo:
        return self._hosts[peer_id].info

    def node(self, peer_id: bytes) -> SyncNode:
        node = self._hosts[peer_id].node
        if node is None:
            raise KeyError(f"node {peer_id.hex()[:8]} is down")
        return node

    def replicas(self, live_only: bool = True) -> list[Replica]:
        return [h.replica for h in self._hosts.values() if h.node is not None or not live_only]

    # -- driving ------------------------------------------------------------------

    def join(self, peer_id: bytes, contact: bytes) -> None:
        self.node(peer_id).join(self.info(contact), self.now_ms)
        self._after_call(peer_id)

    def publish(self, peer_id: bytes, op: Op) -> None:
        """``op`` was authored on this node's replica: spread it."""
        self.node(peer_id).publish(op, self.now_ms)
        self._after_call(peer_id)

    def run_until(self, until_ms: int, *, max_events: int = 5_000_000) -> None:
        """Process events up to virtual time ``until_ms`` (bounded in count)."""
        for _ in range(max_events):
            if not self._queue or self._queue[0][0] > until_ms:
                self.now_ms = max(self.now_ms, until_ms)
                return
            at, _, call = heapq.heappop(self._queue)
            self.now_ms = at
            call()
        raise RuntimeError(f"more than {max_events} events before {until_ms} ms")

    def run_for(self, duration_ms: int) -> None:
        self.run_until(self.now_ms + duration_ms)

    # -- faults -------------------------------------------------------------------

    def partition(self, groups: Iterable[Iterable[bytes]]) -> None:
        """Cut the network into ``groups``; nodes not named form one more group."""
        self._groups = {}
        for index, group in enumerate(groups):
            for peer in group:
                self._groups[peer] = index
        for pair in list(self._connections):
            a, b = sorted(pair)
            if not self._reachable(a, b):
                self._break(a, b)

    def heal(self) -> None:
        self._groups = None

    def crash(self, peer_id: bytes) -> None:
        """The node stops: its connections break, its session state is lost."""
        host = self._hosts[peer_id]
        host.node = None
        for pair in [p for p in self._connections if peer_id in p]:
            a, b = sorted(pair)
            self._break(a, b)

    def restart(self, peer_id: bytes, contact: bytes | None = None) -> SyncNode:
        node = self._boot(peer_id)
        if contact is not None:
            self.join(peer_id, contact)
        return node

    # -- internals ----------------------------------------------------------------

    def _schedule(self, at_ms: int, call: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (at_ms, self._seq, call))

    def _delay(self) -> int:
        return self._latency(self.rng) if callable(self._latency) else self._latency

    def _reachable(self, a: bytes, b: bytes) -> bool:
        if self._hosts[a].node is None or self._hosts[b].node is None:
            return False
        return self._groups is None or self._groups.get(a, -1) == self._groups.get(b, -1)

    def _call(self, peer_id: bytes, action: Callable[[SyncNode], None]) -> None:
        node = self._hosts[peer_id].node
        if node is not None:
            action(node)
            self._after_call(peer_id)

    def _after_call(self, peer_id: bytes) -> None:
        host = self._hosts[peer_id]
        node = host.node
        if node is None:
            return
        for action in node.actions():
            if isinstance(action, Dial):
                self._dial(peer_id, action.peer.id)
            elif isinstance(action, Transmit):
                self._transmit(peer_id, action.peer, action.data)
            elif isinstance(action, Hangup):
                self._hangup(peer_id, action.peer)
        deadline = node.next_deadline()
        if deadline is not None and (host.timer_at is None or deadline < host.timer_at):
            host.timer_at = deadline
            self._schedule(max(deadline, self.now_ms), lambda: self._timer(peer_id, node))

    def _timer(self, peer_id: bytes, node: SyncNode) -> None:
        host = self._hosts[peer_id]
        if host.node is not node:
            return  # the node crashed since
        host.timer_at = None
        node.handle_timer(self.now_ms)
        self._after_call(peer_id)

    def _dial(self, src: bytes, dst: bytes) -> None:
        self.stats.dials += 1
        pair = frozenset((src, dst))
        at = self.now_ms + self._delay()
        if dst not in self._hosts or not self._reachable(src, dst) or pair in self._connections:
            self._schedule(at, lambda: self._call(src, lambda n: n.connection_failed(dst, at)))
            return
        self._connections.add(pair)
        self._schedule(at, lambda: self._made(dst, src, initiator=False))
        self._schedule(at, lambda: self._made(src, dst, initiator=True))

    def _made(self, end: bytes, other: bytes, *, initiator: bool) -> None:
        self._call(end, lambda n: n.connection_made(other, self.now_ms, initiator=initiator))

    def _lost(self, end: bytes, other: bytes) -> None:
        self._call(end, lambda n: n.connection_lost(other, self.now_ms))

    def _arrival(self, src: bytes, dst: bytes) -> int:
        """Arrival time of the next message from src to dst: in order per direction."""
        at = max(self.now_ms + self._delay(), self._last_arrival.get((src, dst), 0))
        self._last_arrival[(src, dst)] = at
        return at

    def _transmit(self, src: bytes, dst: bytes, data: bytes) -> None:
        if frozenset((src, dst)) not in self._connections:
            self.stats.dropped += 1
            return
        self.stats.frames += 1
        self.stats.bytes += len(data)
        at = self._arrival(src, dst)
        self._schedule(at, lambda: self._deliver(src, dst, data))

    def _deliver(self, src: bytes, dst: bytes, data: bytes) -> None:
        if frozenset((src, dst)) in self._connections:
            self._call(dst, lambda n: n.data_received(src, data, self.now_ms))

    def _hangup(self, src: bytes, dst: bytes) -> None:
        pair = frozenset((src, dst))
        if pair not in self._connections:
            return
        at = self._arrival(src, dst)

        def close() -> None:
            if pair in self._connections:
                self._connections.discard(pair)
                self._lost(dst, src)

        self._schedule(at, close)

    def _break(self, a: bytes, b: bytes) -> None:
        """A connection breaks (partition or crash): both ends learn it."""
        self._connections.discard(frozenset((a, b)))
        self._schedule(self.now_ms, lambda: self._lost(a, b))
        self._schedule(self.now_ms, lambda: self._lost(b, a))
