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
dials across them until :meth:`heal` (``bridges`` stay reachable from every
group); :meth:`crash` drops a node with its session state (its replica, the
durable ops, survives) and :meth:`restart` brings it back with a fresh
:class:`SyncNode`. :meth:`set_skew` gives a node a clock offset: every
``now_ms`` it is handed (and every deadline it asks for) is shifted by it.

Links are TCP-like streams: a frame is never lost, duplicated or reordered
on an open connection; what breaks is the connection (a partition, a crash),
and frames in flight on it are lost with it. So message loss is modelled as
connection breaks, not as dropped frames.

Timers: a node is called (:meth:`SyncNode.handle_timer`) only when its
earliest deadline has come. A timer event armed for a deadline that has
since moved is stale: it is skipped (a newer one is queued) or, if the
deadline moved later, re-armed without calling the node.

Latency: ``latency_ms`` (fixed, or drawn per message), or
``link_latency(rng, src, dst)`` per link when set (clusters joined by slower
links); draws come from one generator per direction, seeded from ``rng``.
Bandwidth (``link_bandwidth(src, dst)``, bytes per second, 0: unlimited):
a link direction sends one message at a time, so a message waits until the
link is free (a queue), takes ``size / bandwidth`` to transmit, then the
latency to arrive. A connection that breaks drops its queue. Links exist
between every pair unless ``links`` names the pairs that do (a dial along
any other fails).
Events at the same instant run in an order fixed by their connection, not
by the order a node listed its actions (which may follow a set's iteration
order, and so Python's hash seed): a run is reproducible across processes.
Every frame is classified by its message type (the tag after the length
prefix) into :attr:`Stats.per_kind`.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from archipel.crdt import Op, Replica
from archipel.protocol.messages import PeerInfo
from archipel.protocol.node import Dial, Hangup, SyncConfig, SyncNode, Transmit
from archipel.protocol.plumtree import PushLimits
from archipel.protocol.wire import LENGTH_BYTES, TAGS

_KIND_OF_TAG = {tag: kind.__name__ for kind, tag in TAGS.items()}

LinkLatency = Callable[[random.Random, bytes, bytes], int]
"""Latency of one message from ``src`` to ``dst`` (ms), drawn from the rng."""

LinkBandwidth = Callable[[bytes, bytes], int]
"""Bytes per second of the link from ``src`` to ``dst`` (0: unlimited)."""


@dataclass(slots=True)
class _Host:
    info: PeerInfo
    replica: Replica
    node: SyncNode | None
    timer_at: int | None = None  # when the live timer event fires (virtual time)
    timer_token: int = 0  # which queued timer event is the live one
    deadline: int | None = None  # the node's next_deadline() after the last call into it
    skew_ms: int = 0


@dataclass(slots=True)
class Stats:
    """What crossed the network."""

    frames: int = 0
    bytes: int = 0
    dials: int = 0
    dropped: int = 0
    per_kind: dict[str, int] = field(default_factory=dict)
    """Frames by message type name (``Push``, ``IHave``, ``Reconcile``, ...)."""
    events: int = 0
    """Events processed (calls into nodes, deliveries, timers)."""
    peak_pending: int = 0
    """The largest pending set (ops waiting for deps) any replica had."""
    timers: int = 0
    """Calls to a node's ``handle_timer`` (its deadline had come)."""
    stale_timers: int = 0
    """Timer events skipped or re-armed: the deadline had moved."""
    queued: int = 0
    """Messages that waited for a busy link (bandwidth limits)."""
    queued_ms: int = 0
    """Their total wait (ms), and the longest one."""
    max_queued_ms: int = 0


class Network:
    """Nodes joined by links of ``latency_ms`` (fixed, or drawn per message)."""

    def __init__(
        self,
        rng: random.Random,
        now_ms: int,
        *,
        latency_ms: int | Callable[[random.Random], int] = 20,
        config: SyncConfig | None = None,
        push_limits: PushLimits | None = None,
        link_latency: LinkLatency | None = None,
        link_bandwidth: LinkBandwidth | None = None,
        links: frozenset[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self.rng = rng
        self.now_ms = now_ms
        self.config = config
        self.push_limits = push_limits
        self.link_latency = link_latency
        self.link_bandwidth = link_bandwidth
        self.links = links
        self.stats = Stats()
        self._latency = latency_ms
        # Events at one instant run in an order that depends only on what
        # happened before on the same channel (see _schedule), never on the
        # order a node listed actions for different peers (which may come from
        # iterating a set, and so change with Python's hash seed).
        self._queue: list[tuple[int, bytes, int, Callable[[], None]]] = []
        self._channel_seq: dict[bytes, int] = {}
        self._link_seed = rng.getrandbits(64)
        self._link_rngs: dict[tuple[bytes, bytes], random.Random] = {}
        self._hosts: dict[bytes, _Host] = {}
        # Both directions of every open connection, to the connection's number:
        # a frame sent on one connection is never delivered on a later one.
        self._connections: dict[tuple[bytes, bytes], int] = {}
        self._opened = 0
        self._last_arrival: dict[tuple[bytes, bytes], int] = {}
        self._link_free_us: dict[tuple[bytes, bytes], int] = {}
        self._groups: dict[bytes, int] | None = None
        self._bridges: frozenset[bytes] = frozenset()

    # -- building ---------------------------------------------------------------

    def add(self, peer_id: bytes, replica: Replica) -> SyncNode:
        """A node with this id and replica (its address is a made-up one)."""
        info = PeerInfo(peer_id, (f"/sim/{peer_id.hex()[:8]}",))
        self._hosts[peer_id] = _Host(info, replica, None)
        return self._boot(peer_id)

    def _boot(self, peer_id: bytes) -> SyncNode:
        host = self._hosts[peer_id]
        now = self.now_ms + host.skew_ms
        # The same push protocol; a scenario may tune its timers (push_limits).
        node = SyncNode(
            host.replica, host.info, self.rng, now, config=self.config, push_limits=self.push_limits
        )
        host.node = node
        host.timer_at = None
        host.timer_token += 1
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

    @property
    def partitioned(self) -> bool:
        return self._groups is not None

    def add_known_to(self, peer_id: bytes, known: Iterable[bytes]) -> None:
        """Give a node addresses (bootstrap configuration) without joining."""
        self.node(peer_id).add_known([self.info(k) for k in known if k != peer_id])
        self._after_call(peer_id)

    def is_up(self, peer_id: bytes) -> bool:
        return self._hosts[peer_id].node is not None

    def local_now(self, peer_id: bytes) -> int:
        """The node's clock: virtual time plus its skew."""
        return self.now_ms + self._hosts[peer_id].skew_ms

    def set_skew(self, peer_id: bytes, skew_ms: int) -> None:
        """From now on the node's clock reads ``skew_ms`` ahead (or behind)."""
        host = self._hosts[peer_id]
        host.skew_ms = skew_ms
        host.timer_at = None  # the queued timer event goes stale
        host.timer_token += 1
        self._after_call(peer_id)  # re-arm its timer on the shifted clock

    # -- driving ------------------------------------------------------------------

    def join(self, peer_id: bytes, contact: bytes, known: Iterable[bytes] = ()) -> None:
        """Enter the overlay through ``contact``, knowing ``known`` addresses too."""
        node = self.node(peer_id)
        node.add_known([self.info(k) for k in known if k != peer_id])
        node.join(self.info(contact), self.local_now(peer_id))
        self._after_call(peer_id)

    def publish(self, peer_id: bytes, op: Op) -> None:
        """``op`` was authored on this node's replica: spread it."""
        self.node(peer_id).publish(op, self.local_now(peer_id))
        self._after_call(peer_id)

    def run_until(self, until_ms: int, *, max_events: int = 5_000_000) -> None:
        """Process events up to virtual time ``until_ms`` (bounded in count)."""
        for _ in range(max_events):
            if not self._queue or self._queue[0][0] > until_ms:
                self.now_ms = max(self.now_ms, until_ms)
                return
            at, _, _, call = heapq.heappop(self._queue)
            self.now_ms = at
            self.stats.events += 1
            call()
        raise RuntimeError(f"more than {max_events} events before {until_ms} ms")

    def run_for(self, duration_ms: int) -> None:
        self.run_until(self.now_ms + duration_ms)

    # -- faults -------------------------------------------------------------------

    def partition(self, groups: Iterable[Iterable[bytes]], bridges: Iterable[bytes] = ()) -> None:
        """Cut the network into ``groups``; nodes not named form one more group,
        except ``bridges``, which reach (and are reached from) every group."""
        self._groups = {}
        self._bridges = frozenset(bridges)
        for index, group in enumerate(groups):
            for peer in group:
                self._groups[peer] = index
        for a, b in sorted(pair for pair in self._connections if pair[0] < pair[1]):
            if not self._reachable(a, b):
                self._break(a, b)

    def heal(self) -> None:
        self._groups = None
        self._bridges = frozenset()

    def crash(self, peer_id: bytes) -> None:
        """The node stops: its connections break, its session state is lost."""
        host = self._hosts[peer_id]
        host.node = None
        host.timer_at = None
        for a, b in sorted(p for p in self._connections if p[0] == peer_id):
            self._break(*sorted((a, b)))

    def restart(self, peer_id: bytes, contact: bytes | None = None) -> SyncNode:
        node = self._boot(peer_id)
        if contact is not None:
            self.join(peer_id, contact)
        return node

    # -- internals ----------------------------------------------------------------

    def _schedule(self, at_ms: int, channel: bytes, call: Callable[[], None]) -> None:
        """Queue ``call`` at ``at_ms``; ties go by channel, then in order within one."""
        seq = self._channel_seq.get(channel, 0) + 1
        self._channel_seq[channel] = seq
        heapq.heappush(self._queue, (at_ms, channel, seq, call))

    def _delay(self, src: bytes, dst: bytes) -> int:
        """One message's latency, drawn from the direction's own generator (so
        draws do not depend on the order of sends to different peers)."""
        if self.link_latency is None and not callable(self._latency):
            return self._latency
        rng = self._link_rngs.get((src, dst))
        if rng is None:
            seed = hashlib.blake2b(src + dst, key=self._link_seed.to_bytes(8, "big")).digest()
            rng = self._link_rngs[(src, dst)] = random.Random(seed)  # noqa: S311 (a simulation)
        if self.link_latency is not None:
            return self.link_latency(rng, src, dst)
        assert callable(self._latency)
        return self._latency(rng)

    def _reachable(self, a: bytes, b: bytes) -> bool:
        if self._hosts[a].node is None or self._hosts[b].node is None:
            return False
        if self.links is not None and (a, b) not in self.links:
            return False
        if self._groups is None or a in self._bridges or b in self._bridges:
            return True
        return self._groups.get(a, -1) == self._groups.get(b, -1)

    def _call(self, peer_id: bytes, action: Callable[[SyncNode, int], None]) -> None:
        """Call into a node with its own clock's reading of now."""
        host = self._hosts[peer_id]
        if host.node is not None:
            action(host.node, self.now_ms + host.skew_ms)
            self._after_call(peer_id)

    def _after_call(self, peer_id: bytes) -> None:
        host = self._hosts[peer_id]
        node = host.node
        if node is None:
            return
        pending = host.replica.graph.pending_count()
        self.stats.peak_pending = max(self.stats.peak_pending, pending)
        for action in node.actions():
            if isinstance(action, Transmit):
                self._transmit(peer_id, action.peer, action.data)
            elif isinstance(action, Dial):
                self._dial(peer_id, action.peer.id)
            elif isinstance(action, Hangup):
                self._hangup(peer_id, action.peer)
        host.deadline = node.next_deadline()
        self._arm(peer_id, host, node, host.deadline)

    def _arm(self, peer_id: bytes, host: _Host, node: SyncNode, deadline: int | None) -> None:
        """Queue a timer event for ``deadline`` (the node's clock) unless an
        earlier one is queued already."""
        if deadline is None:
            return
        at = max(deadline - host.skew_ms, self.now_ms)  # the node's clock to virtual time
        if host.timer_at is None or at < host.timer_at:
            host.timer_at = at
            host.timer_token += 1
            token = host.timer_token
            self._schedule(at, b"t" + peer_id, lambda: self._timer(peer_id, node, token))

    def _timer(self, peer_id: bytes, node: SyncNode, token: int) -> None:
        host = self._hosts[peer_id]
        if host.node is not node or host.timer_token != token:
            self.stats.stale_timers += 1
            return  # the node crashed since, or a newer timer event is queued
        host.timer_at = None
        # A node's deadline changes only when it is called, and every call ends
        # in _after_call, which noted it: no need to ask the node again.
        deadline = host.deadline
        if deadline is None or deadline - host.skew_ms > self.now_ms:
            self.stats.stale_timers += 1
            self._arm(peer_id, host, node, deadline)  # the deadline moved later
            return
        self.stats.timers += 1
        node.handle_timer(self.now_ms + host.skew_ms)
        self._after_call(peer_id)

    def _dial(self, src: bytes, dst: bytes) -> None:
        self.stats.dials += 1
        at = self.now_ms + self._delay(src, dst)
        if (
            dst not in self._hosts
            or not self._reachable(src, dst)
            or (src, dst) in self._connections
        ):
            self._schedule(
                at,
                b"c" + src + dst,
                lambda: self._call(src, lambda n, now: n.connection_failed(dst, now)),
            )
            return
        self._opened += 1
        self._connections[(src, dst)] = self._connections[(dst, src)] = self._opened
        self._schedule(at, b"c" + dst + src, lambda: self._made(dst, src, initiator=False))
        self._schedule(at, b"c" + src + dst, lambda: self._made(src, dst, initiator=True))

    def _made(self, end: bytes, other: bytes, *, initiator: bool) -> None:
        self._call(end, lambda n, now: n.connection_made(other, now, initiator=initiator))

    def _lost(self, end: bytes, other: bytes) -> None:
        self._call(end, lambda n, now: n.connection_lost(other, now))

    def _arrival(self, src: bytes, dst: bytes, size: int) -> int:
        """Arrival time of the next message from src to dst: after the link has
        sent what it queued before and this one (bandwidth), then the latency;
        in order per direction."""
        sent = self.now_ms
        if self.link_bandwidth is not None and size:
            per_s = self.link_bandwidth(src, dst)
            if per_s > 0:
                now_us = self.now_ms * 1_000
                start = max(now_us, self._link_free_us.get((src, dst), 0))
                done = start + -(-size * 1_000_000 // per_s)
                self._link_free_us[(src, dst)] = done
                sent = -(-done // 1_000)
                if start > now_us:
                    waited = -(-(start - now_us) // 1_000)
                    stats = self.stats
                    stats.queued += 1
                    stats.queued_ms += waited
                    stats.max_queued_ms = max(stats.max_queued_ms, waited)
        at = max(sent + self._delay(src, dst), self._last_arrival.get((src, dst), 0))
        self._last_arrival[(src, dst)] = at
        return at

    def _transmit(self, src: bytes, dst: bytes, data: bytes) -> None:
        connection = self._connections.get((src, dst))
        if connection is None:
            self.stats.dropped += 1
            return
        self._count(data)
        at = self._arrival(src, dst, len(data))
        self._schedule(at, b"d" + dst + src, lambda: self._deliver(src, dst, data, connection))

    def _deliver(self, src: bytes, dst: bytes, data: bytes, connection: int) -> None:
        if self._connections.get((src, dst)) == connection:
            self._call(dst, lambda n, now: n.data_received(src, data, now))

    def _hangup(self, src: bytes, dst: bytes) -> None:
        connection = self._connections.get((src, dst))
        if connection is None:
            return
        at = self._arrival(src, dst, 0)

        def close() -> None:
            if self._connections.get((src, dst)) == connection:
                self._drop(src, dst)
                self._lost(dst, src)

        self._schedule(at, b"d" + dst + src, close)

    def _drop(self, a: bytes, b: bytes) -> None:
        """Forget the connection between a and b, and what its links queued."""
        for pair in ((a, b), (b, a)):
            self._connections.pop(pair, None)
            self._link_free_us.pop(pair, None)

    def _break(self, a: bytes, b: bytes) -> None:
        """A connection breaks (partition or crash): both ends learn it."""
        self._drop(a, b)
        self._schedule(self.now_ms, b"c" + a + b, lambda: self._lost(a, b))
        self._schedule(self.now_ms, b"c" + b + a, lambda: self._lost(b, a))

    def _count(self, data: bytes) -> None:
        """Count the frames in ``data`` by type: a session writes whole frames,
        each a length prefix then a msgpack array whose second byte is the tag."""
        stats = self.stats
        stats.bytes += len(data)
        per_kind = stats.per_kind
        pos, end = 0, len(data)
        for _ in range(end):  # at most one frame per byte
            if pos + LENGTH_BYTES + 2 > end:
                break
            length = int.from_bytes(data[pos : pos + LENGTH_BYTES], "big")
            kind = _KIND_OF_TAG.get(data[pos + LENGTH_BYTES + 1], "unknown")
            per_kind[kind] = per_kind.get(kind, 0) + 1
            stats.frames += 1
            pos += LENGTH_BYTES + length
