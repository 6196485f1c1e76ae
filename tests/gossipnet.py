"""A tiny deterministic discrete-event network for the push and peer-selection tests.

Events are ``(time, seq, callback)`` in a priority queue; links have a fixed
latency plus optional jitter (which reorders), and messages can be dropped or
duplicated by a seeded ``random.Random``. The protocol objects are the real
ones; this file only carries their actions out.
"""

from __future__ import annotations

import heapq
import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial

from archipel.crdt import op_id
from archipel.protocol.errors import RemoteProtocolError
from archipel.protocol.messages import Message, Ops, PeerInfo, Push
from archipel.protocol.peers import (
    Close,
    Connect,
    NeighborUp,
    PeerAction,
    PeerLimits,
    PeerSelection,
)
from archipel.protocol.plumtree import Broadcast, Deliver, PushAction, PushLimits, Send


class EventLoop:
    """Callbacks in time order; ties in the order they were scheduled."""

    def __init__(self) -> None:
        self.now = 0
        self._heap: list[tuple[int, int, Callable[[], None]]] = []
        self._seq = 0

    def at(self, time: int, callback: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (max(time, self.now), self._seq, callback))

    def run(self, until: int | None = None, max_events: int = 2_000_000) -> None:
        """Run events up to ``until`` (all of them if None), then set now to it."""
        for _ in range(max_events):
            if not self._heap or (until is not None and self._heap[0][0] > until):
                break
            self.now, _, callback = heapq.heappop(self._heap)
            callback()
        else:
            raise AssertionError("the network never became quiet")
        if until is not None:
            self.now = max(self.now, until)

    @property
    def idle(self) -> bool:
        return not self._heap


def node_id(n: int) -> bytes:
    return b"node-%03d" % n


def regular_graph(n: int, degree: int, rng: random.Random) -> list[tuple[int, int]]:
    """A random connected ``degree``-regular graph on ``n`` nodes (``degree`` even):
    a ring lattice scrambled by random degree-preserving edge swaps."""
    edges = {frozenset((v, (v + k) % n)) for v in range(n) for k in range(1, degree // 2 + 1)}
    for _ in range(20 * len(edges)):
        e1, e2 = rng.sample(sorted(tuple(sorted(e)) for e in edges), 2)
        (a, b), (c, d) = e1, e2
        new1, new2 = frozenset((a, d)), frozenset((c, b))
        if len(new1) == 2 and len(new2) == 2 and new1 not in edges and new2 not in edges:
            trial = (edges - {frozenset(e1), frozenset(e2)}) | {new1, new2}
            if connected(range(n), [tuple(e) for e in trial]):  # type: ignore[misc]
                edges = trial
    return sorted(tuple(sorted(e)) for e in edges)  # type: ignore[misc]


def connected(nodes: Iterable[int], edges: Iterable[tuple[int, int]]) -> bool:
    nodes = list(nodes)
    if not nodes:
        return True
    adjacent: dict[int, set[int]] = {v: set() for v in nodes}
    for a, b in edges:
        adjacent[a].add(b)
        adjacent[b].add(a)
    seen = {nodes[0]}
    todo = [nodes[0]]
    while todo:
        for w in adjacent[todo.pop()] - seen:
            seen.add(w)
            todo.append(w)
    return len(seen) == len(nodes)


# -- push -------------------------------------------------------------------------


@dataclass
class PushNode:
    """A node: its Broadcast, a stand-in replica (a dict), what it rejects."""

    index: int
    broadcast: Broadcast
    store: dict[bytes, bytes] = field(default_factory=dict)
    rejects: set[bytes] = field(default_factory=set)  # ids its replica finds invalid
    delivered: Counter[bytes] = field(default_factory=Counter)  # Deliver actions per id
    arrived_at: dict[bytes, int] = field(default_factory=dict)  # id -> time of first Deliver
    alive: bool = True
    timer_at: int | None = None

    @property
    def id(self) -> bytes:
        return node_id(self.index)


@dataclass
class Sent:
    time: int
    src: int
    dst: int
    message: Message


def is_urgent(op: bytes) -> bool:
    """The stand-in replica's kind check: urgent ops are those starting with b'urgent'."""
    return op.startswith(b"urgent")


class PushNet:
    """N nodes running :class:`Broadcast` over the links ``edges``."""

    def __init__(
        self,
        n: int,
        edges: Iterable[tuple[int, int]],
        *,
        latency: int = 100,
        jitter: int = 0,
        drop: float = 0.0,
        duplicate: float = 0.0,
        faults_until: int | None = None,
        seed: int = 0,
        limits: PushLimits | None = None,
    ) -> None:
        self.loop = EventLoop()
        self.rng = random.Random(seed)
        self.latency, self.jitter = latency, jitter
        self.drop, self.duplicate = drop, duplicate
        self.faults_until = faults_until  # drops/duplicates only before this time
        self.nodes = [self._make_node(i, limits) for i in range(n)]
        self.log: list[Sent] = []
        self.payload: Counter[bytes] = Counter()  # op id -> copies sent whole
        for a, b in edges:
            self.nodes[a].broadcast.peer_up(node_id(b))
            self.nodes[b].broadcast.peer_up(node_id(a))

    def _make_node(self, index: int, limits: PushLimits | None) -> PushNode:
        store: dict[bytes, bytes] = {}
        rng = random.Random(self.rng.random())
        broadcast = Broadcast(has=store.__contains__, get=store.get, rng=rng, limits=limits)
        return PushNode(index, broadcast, store)

    # -- driving --------------------------------------------------------------

    def originate(self, index: int, op: bytes) -> bytes:
        """Node ``index`` authors ``op`` now; returns its id."""
        node = self.nodes[index]
        oid = op_id(op)
        node.store[oid] = op
        self._act(node, node.broadcast.broadcast(oid, op, self.loop.now, urgent=is_urgent(op)))
        return oid

    def originate_at(self, time: int, index: int, op: bytes) -> None:
        def go() -> None:
            self.originate(index, op)

        self.loop.at(time, go)

    def kill(self, index: int, detect_after: int | None) -> None:
        """Node ``index`` dies; its neighbours notice after ``detect_after`` ms (or never)."""
        dead = self.nodes[index]
        dead.alive = False
        if detect_after is None:
            return
        for node in self.nodes:
            if node.alive and dead.id in node.broadcast.peers:
                self.loop.at(self.loop.now + detect_after, self._down(node, dead.id))

    def _down(self, node: PushNode, peer: bytes) -> Callable[[], None]:
        return lambda: node.broadcast.peer_down(peer)

    def run(self, until: int | None = None) -> None:
        self.loop.run(until)

    # -- carrying actions out -------------------------------------------------

    def _act(self, node: PushNode, actions: list[PushAction]) -> None:
        for action in actions:
            if isinstance(action, Send):
                self._send(node, int(action.peer[5:]), action.message)
            else:
                self._deliver(node, action)
        self._arm(node)

    def _deliver(self, node: PushNode, action: Deliver) -> None:
        node.delivered[action.op_id] += 1
        node.arrived_at.setdefault(action.op_id, self.loop.now)
        if action.op_id in node.rejects:
            return  # the replica refused it: never forwarded
        node.store[action.op_id] = action.op
        now = self.loop.now
        self._act(
            node, node.broadcast.broadcast(action.op_id, action.op, now, is_urgent(action.op))
        )

    def _send(self, node: PushNode, dst: int, message: Message) -> None:
        now = self.loop.now
        self.log.append(Sent(now, node.index, dst, message))
        if isinstance(message, Push | Ops):
            for op in message.ops:
                self.payload[op_id(op)] += 1
        faulty = self.faults_until is None or now < self.faults_until
        if faulty and self.drop and self.rng.random() < self.drop:
            return
        copies = 2 if faulty and self.duplicate and self.rng.random() < self.duplicate else 1
        for _ in range(copies):
            delay = self.latency + (self.rng.randrange(self.jitter + 1) if self.jitter else 0)
            self.loop.at(now + delay, self._arrive(node.index, dst, message))

    def _arrive(self, src: int, dst: int, message: Message) -> Callable[[], None]:
        def arrive() -> None:
            node = self.nodes[dst]
            if node.alive and node_id(src) in node.broadcast.peers:
                self._act(node, node.broadcast.receive(node_id(src), message, self.loop.now))

        return arrive

    def _arm(self, node: PushNode) -> None:
        deadline = node.broadcast.next_deadline()
        if deadline is not None and (node.timer_at is None or deadline < node.timer_at):
            node.timer_at = deadline
            self.loop.at(deadline, self._fire(node, deadline))

    def _fire(self, node: PushNode, deadline: int) -> Callable[[], None]:
        def fire() -> None:
            if node.timer_at != deadline or not node.alive:
                return
            node.timer_at = None
            self._act(node, node.broadcast.handle_timer(self.loop.now))

        return fire

    # -- observing ------------------------------------------------------------

    def eager_edges(self) -> set[frozenset[int]]:
        """Links eager at both ends among live nodes."""
        edges = set()
        for node in self.nodes:
            if not node.alive:
                continue
            for peer in node.broadcast.eager:
                other = self.nodes[int(peer[5:])]
                if other.alive and node.id in other.broadcast.eager:
                    edges.add(frozenset((node.index, other.index)))
        return edges


# -- peer selection -----------------------------------------------------------------


def peer_info(n: int) -> PeerInfo:
    return PeerInfo(node_id(n), (f"/ip4/192.0.2.{n % 250}/tcp/{4000 + n}",))


def index_of(peer: bytes) -> int:
    return int(peer[5:])


@dataclass
class PeerNode:
    index: int
    selection: PeerSelection
    alive: bool = True
    timer_at: int | None = None
    neighbor_events: list[str] = field(default_factory=list)


@dataclass
class Connection:
    """One connection between two nodes; ``open`` holds the ends that still use it."""

    open: set[int]


class PeerNet:
    """Nodes running :class:`PeerSelection` over connections that open, close and fail.

    A closed connection still delivers what its closer sent before closing (as
    TCP does); what the other end sends after that is lost. Dials to a dead
    node fail after one latency; a dead node's connections are noticed by
    the other end after ``detect_ms``.
    """

    def __init__(
        self,
        n: int,
        *,
        latency: int = 50,
        detect_ms: int = 1_000,
        seed: int = 0,
        limits: PeerLimits | None = None,
        is_allowed: Callable[[bytes], bool] | None = None,
    ) -> None:
        self.loop = EventLoop()
        self.latency, self.detect_ms = latency, detect_ms
        self.rng = random.Random(seed)
        self.connections: dict[frozenset[int], Connection] = {}
        self.errors: list[tuple[int, int, str]] = []  # (node, peer, reason)
        self.lost_sends = 0
        self.frozen = False
        extra = {} if is_allowed is None else {"is_allowed": is_allowed}
        self.nodes = [
            PeerNode(
                i,
                PeerSelection(
                    peer_info(i), random.Random(seed * 1000 + i), 0, limits=limits, **extra
                ),
            )
            for i in range(n)
        ]
        for node in self.nodes:
            self._arm(node)

    # -- driving --------------------------------------------------------------

    def join_at(self, time: int, index: int, contact: int) -> None:
        def go() -> None:
            node = self.nodes[index]
            if node.alive:
                self._act(node, node.selection.join(peer_info(contact), self.loop.now))

        self.loop.at(time, go)

    def kill(self, index: int) -> None:
        node = self.nodes[index]
        node.alive = False
        for pair, conn in list(self.connections.items()):
            if index in pair:
                conn.open.discard(index)
                (other,) = pair - {index}
                self._notify_close(conn, pair, other, index, self.detect_ms)

    def quiesce(self, until: int) -> None:
        """Run to ``until``, then stop the timers and let messages in flight land."""
        self.loop.run(until)
        self.frozen = True
        self.loop.run()

    def live(self) -> list[PeerNode]:
        return [node for node in self.nodes if node.alive]

    def active_edges(self) -> list[tuple[int, int]]:
        return [(node.index, index_of(p)) for node in self.live() for p in node.selection.active]

    # -- carrying actions out -------------------------------------------------

    def _act(self, node: PeerNode, actions: list[PeerAction]) -> None:
        for action in actions:
            if isinstance(action, Connect):
                self._connect(node, index_of(action.peer.id))
            elif isinstance(action, Send):
                self._send(node, index_of(action.peer), action.message)
            elif isinstance(action, Close):
                self._close(node.index, index_of(action.peer))
            elif isinstance(action, NeighborUp):
                node.neighbor_events.append(f"up {index_of(action.peer.id)}")
            else:
                node.neighbor_events.append(f"down {index_of(action.peer)}")
        self._arm(node)

    def _call(self, node: PeerNode, peer: int, call: Callable[[], list[PeerAction]]) -> None:
        """Run one input; a RemoteProtocolError closes that connection only."""
        try:
            actions = call()
        except RemoteProtocolError as error:
            self.errors.append((node.index, peer, error.reason))
            actions = [Close(node_id(peer))]
        self._act(node, actions)

    def _connect(self, node: PeerNode, target: int) -> None:
        pair = frozenset((node.index, target))

        def done() -> None:
            if not node.alive:
                return
            if not self.nodes[target].alive:
                failed = partial(node.selection.connect_failed, node_id(target), self.loop.now)
                self._call(node, target, failed)
                return
            conn = self.connections.get(pair)
            if conn is None or node.index not in conn.open:
                self.connections[pair] = Connection({node.index, target})
            self._call(
                node, target, lambda: node.selection.connected(node_id(target), self.loop.now)
            )

        self.loop.at(self.loop.now + self.latency, done)

    def _send(self, node: PeerNode, target: int, message: Message) -> None:
        pair = frozenset((node.index, target))
        conn = self.connections.get(pair)
        if conn is None or node.index not in conn.open:
            self.lost_sends += 1
            return

        def arrive() -> None:
            receiver = self.nodes[target]
            if self.connections.get(pair) is conn and target in conn.open and receiver.alive:
                take = partial(receiver.selection.receive, sender, message, self.loop.now)
                self._call(receiver, node.index, take)

        sender = node_id(node.index)
        self.loop.at(self.loop.now + self.latency, arrive)

    def _close(self, closer: int, other: int) -> None:
        pair = frozenset((closer, other))
        conn = self.connections.get(pair)
        if conn is None or closer not in conn.open:
            return
        conn.open.discard(closer)
        self._notify_close(conn, pair, other, closer, self.latency)

    def _notify_close(
        self, conn: Connection, pair: frozenset[int], other: int, closer: int, delay: int
    ) -> None:
        def notify() -> None:
            if self.connections.get(pair) is conn and not (conn.open - {other}):
                del self.connections[pair]
            if other in conn.open:
                conn.open.discard(other)
                node = self.nodes[other]
                if node.alive:
                    lost = partial(node.selection.disconnected, node_id(closer), self.loop.now)
                    self._call(node, closer, lost)

        self.loop.at(self.loop.now + delay, notify)

    def _arm(self, node: PeerNode) -> None:
        deadline = node.selection.next_deadline()
        if deadline is not None and (node.timer_at is None or deadline < node.timer_at):
            node.timer_at = deadline
            self.loop.at(deadline, self._fire(node, deadline))

    def _fire(self, node: PeerNode, deadline: int) -> Callable[[], None]:
        def fire() -> None:
            if node.timer_at != deadline or not node.alive or self.frozen:
                return
            node.timer_at = None
            self._act(node, node.selection.handle_timer(self.loop.now))

        return fire
