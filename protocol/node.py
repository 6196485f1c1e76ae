"""One node's sync: sessions, push, pull and peer selection over one replica.

Theory of operation. A :class:`SyncNode` is what the daemon (over libp2p) and
the simulator (over its virtual network) both drive. It owns, for one replica:

- a :class:`SyncSession` per connection (handshake, framing, fetch, limits);
- one :class:`Broadcast` (push, Plumtree) over the active view;
- one :class:`PeerSelection` (HyParView) deciding whom to stay connected to;
- the reconciliation runs (Negentropy): on every established connection each
  end runs its own client against the other's server, and pulls (Want) what
  it lacks; again every ``reconcile_interval_ms`` (+- jitter) per connection.

Every op that arrives, by push or pull, is given to the replica first; only
ops the replica applied are forwarded (``Broadcast.broadcast``), including
ops released from its pending set, so a forgery dies at the first honest hop
and an op never travels ahead of its deps. An op that fails validation is
reported to the session that brought it (its misbehaviour budget). Urgent ops
(alerts) are flooded to every connected peer.

Sans-I/O. Inputs: :meth:`connection_made`, :meth:`connection_failed`,
:meth:`connection_lost`, :meth:`data_received`, :meth:`publish`,
:meth:`handle_timer`, each with ``now_ms``. Outputs: :meth:`actions` drains
:class:`Dial`, :class:`Transmit` and :class:`Hangup`; :meth:`next_deadline`
says when to call :meth:`handle_timer`. Randomness comes from ``rng``.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from archipel.crdt import CapacityError, InvalidOp, Op, Replica, Status
from archipel.crdt.alerts import URGENT_KINDS

from .errors import ProtocolError, RemoteProtocolError
from .messages import (
    Disconnect,
    ForwardJoin,
    Graft,
    IHave,
    Join,
    Message,
    Neighbor,
    NeighborReply,
    PeerInfo,
    Prune,
    Push,
    Reconcile,
    Shuffle,
    ShuffleReply,
)
from .negentropy import NegentropyClient, NegentropyServer
from .negentropy_store import SortedItems
from .peers import Close, Connect, NeighborDown, NeighborUp, PeerAction, PeerSelection, Rng
from .plumtree import Broadcast, Deliver, PushAction, Send
from .session import (
    Closed,
    Established,
    Event,
    MessageReceived,
    OpsReceived,
    State,
    SyncSession,
)

PeerId = bytes
_PUSH = (Push, IHave, Graft, Prune)
_MEMBERSHIP = (Join, ForwardJoin, Neighbor, NeighborReply, Disconnect, Shuffle, ShuffleReply)


@dataclass(frozen=True, slots=True)
class Dial:
    """Open a connection to ``peer``; report :meth:`SyncNode.connection_made`
    (with ``initiator=True``) or :meth:`SyncNode.connection_failed`."""

    peer: PeerInfo


@dataclass(frozen=True, slots=True)
class Transmit:
    """Write ``data`` to the connection with ``peer``."""

    peer: PeerId
    data: bytes


@dataclass(frozen=True, slots=True)
class Hangup:
    """Close the connection with ``peer`` once ``Transmit`` before it is written."""

    peer: PeerId
    reason: str


Action = Dial | Transmit | Hangup


@dataclass(frozen=True, slots=True)
class SyncConfig:
    """Timings of the pull protocol."""

    reconcile_interval_ms: int = 60_000
    reconcile_jitter_ms: int = 15_000
    rediscover_interval_ms: int = 10_000
    """How often a node short of neighbours offers peers it knew back to peer
    selection (after a partition heals, that is how the halves find each
    other again; the daemon adds bootstrap and mDNS addresses too)."""
    remembered_peers: int = 256


@dataclass(slots=True)
class _Link:
    """One connection: its session and its reconciliation runs."""

    session: SyncSession
    initiator: bool
    client: NegentropyClient | None = None
    server: NegentropyServer | None = None
    reconcile_at: int | None = None
    established: bool = False
    dialed_by_peers: bool = False


@dataclass(slots=True)
class SyncCounters:
    """What the node did (for reports and tests)."""

    ops_applied: int = 0
    ops_invalid: int = 0
    ops_dropped_full: int = 0
    reconciliations: int = 0
    sessions_closed: int = 0
    duplicate_connections: int = 0
    errors: list[str] = field(default_factory=list)


class SyncNode:
    """The sync protocol of one node, driven by the daemon or the simulator."""

    def __init__(
        self,
        replica: Replica,
        me: PeerInfo,
        rng: Rng,
        now_ms: int,
        *,
        config: SyncConfig | None = None,
        is_allowed: Callable[[PeerId], bool] | None = None,
    ) -> None:
        self.replica = replica
        self.me = me
        self.config = config if config is not None else SyncConfig()
        self.counters = SyncCounters()
        self._rng = rng
        self._links: dict[PeerId, _Link] = {}
        self._out: list[Action] = []
        self.push = Broadcast(has=self._has, get=self._get)
        allowed = is_allowed if is_allowed is not None else _allow_all
        self.peers = PeerSelection(me, rng, now_ms, is_allowed=allowed)
        self._store = SortedItems.from_sorted(*_items_of(replica.graph.topological()))
        self._fresh: list[tuple[int, bytes]] = []
        self._remembered: OrderedDict[PeerId, PeerInfo] = OrderedDict()
        self._rediscover_at = now_ms + self.config.rediscover_interval_ms

    # -- inputs from the driver -----------------------------------------------

    def join(self, contact: PeerInfo, now_ms: int) -> None:
        """Enter the overlay through ``contact`` (a bootstrap address)."""
        self._peer_actions(self.peers.join(contact, now_ms), now_ms)

    def add_known(self, peers: Iterable[PeerInfo]) -> None:
        """Addresses learnt elsewhere (bootstrap configuration, mDNS)."""
        peers = list(peers)
        for info in peers:
            self._remember(info)
        self.peers.add_known(peers)

    def _remember(self, info: PeerInfo) -> None:
        if info.id == self.me.id:
            return
        self._remembered[info.id] = info
        self._remembered.move_to_end(info.id)
        while len(self._remembered) > self.config.remembered_peers:
            self._remembered.popitem(last=False)

    def _rediscover(self, now_ms: int) -> None:
        """Short of neighbours: offer a few remembered peers to peer selection."""
        jitter = int(self._rng.random() * self.config.rediscover_interval_ms)
        self._rediscover_at = now_ms + self.config.rediscover_interval_ms // 2 + jitter
        if len(self.peers.active) >= self.peers.limits.active_size:
            return
        known = self.peers.active.keys() | self.peers.passive.keys()
        candidates = [info for pid, info in self._remembered.items() if pid not in known]
        if candidates:
            count = min(3, len(candidates))
            picks = [candidates[int(self._rng.random() * len(candidates))] for _ in range(count)]
            self.peers.add_known(picks)

    def connection_made(self, peer: PeerId, now_ms: int, *, initiator: bool) -> None:
        """A connection with ``peer`` is up (we dialled it, or it dialled us).

        The driver keeps one connection per peer (connections are named by
        peer id); a second one reported anyway is ignored, and counted."""
        if peer in self._links:
            self.counters.duplicate_connections += 1
            return
        session = SyncSession(self.replica.federation, self._get, now_ms)
        self._links[peer] = _Link(session, initiator)
        self._flush(peer)

    def connection_failed(self, peer: PeerId, now_ms: int) -> None:
        self._peer_actions(self.peers.connect_failed(peer, now_ms), now_ms)

    def connection_lost(self, peer: PeerId, now_ms: int) -> None:
        """The connection closed or broke, not at our request."""
        if self._links.pop(peer, None) is not None:
            self._down(peer, now_ms)

    def data_received(self, peer: PeerId, data: bytes, now_ms: int) -> None:
        link = self._links.get(peer)
        if link is None:
            return
        try:
            events = link.session.receive_data(data, now_ms)
        except ProtocolError as exc:
            self._fail(peer, exc.reason, now_ms)
            return
        for event in events:
            if peer not in self._links:
                break
            try:
                self._on_event(peer, link, event, now_ms)
            except ProtocolError as exc:
                # The peer broke the protocol (or, for a LocalProtocolError, we
                # mishandled its message): either way only this session closes.
                if not link.session.closed:
                    link.session.close(f"protocol error: {exc.reason}", now_ms)
                self._fail(peer, exc.reason, now_ms)
                break
        self._flush(peer)

    def publish(self, op: Op, now_ms: int) -> None:
        """Spread an op this node's replica has just applied (authored here)."""
        self._fresh.append((op.ts, op.id))
        self._push(self.push.broadcast(op.id, op.data, now_ms, op.kind in URGENT_KINDS), now_ms)

    def handle_timer(self, now_ms: int) -> None:
        for op in self.replica.tick(now_ms).applied:  # held ops whose time has come
            self._applied(op, now_ms)
        if now_ms >= self._rediscover_at:
            self._rediscover(now_ms)
        self._push(self.push.handle_timer(now_ms), now_ms)
        self._peer_actions(self.peers.handle_timer(now_ms), now_ms)
        for peer, link in list(self._links.items()):
            try:
                for event in link.session.handle_timer(now_ms):
                    self._on_event(peer, link, event, now_ms)
            except ProtocolError as exc:
                self._fail(peer, exc.reason, now_ms)
                continue
            if link.reconcile_at is not None and now_ms >= link.reconcile_at:
                self._start_reconciliation(link, now_ms)
            self._flush(peer)

    def next_deadline(self) -> int | None:
        deadlines = [
            self.replica.next_deadline_ms(),
            self.push.next_deadline(),
            self.peers.next_deadline(),
            self._rediscover_at,
        ]
        for link in self._links.values():
            deadlines += [link.session.next_deadline(), link.reconcile_at]
        present = [d for d in deadlines if d is not None]
        return min(present) if present else None

    def actions(self) -> list[Action]:
        """What the driver must do now (in order)."""
        out, self._out = self._out, []
        return out

    # -- events from sessions ---------------------------------------------------

    def _on_event(self, peer: PeerId, link: _Link, event: Event, now_ms: int) -> None:
        if isinstance(event, Established):
            link.established = True
            if link.initiator:
                self._peer_actions(self.peers.connected(peer, now_ms), now_ms)
            self._start_reconciliation(link, now_ms)
        elif isinstance(event, OpsReceived):
            self._ingest(peer, link, event.ops, now_ms)
        elif isinstance(event, MessageReceived):
            self._on_message(peer, link, event.message, now_ms)
        elif isinstance(event, Closed):
            self._hangup(peer, event.reason, now_ms)

    def _on_message(self, peer: PeerId, link: _Link, message: Message, now_ms: int) -> None:
        if isinstance(message, _PUSH):
            if peer in self.push.peers:
                self._push(self.push.receive(peer, message, now_ms), now_ms)
            elif isinstance(message, Push):  # an urgent flood from a non-neighbour
                self._ingest(peer, link, message.ops, now_ms)
        elif isinstance(message, Reconcile):
            self._reconcile(peer, link, message, now_ms)
        elif isinstance(message, _MEMBERSHIP):
            self._peer_actions(self.peers.receive(peer, message, now_ms), now_ms)

    # -- pull -------------------------------------------------------------------

    def _items(self) -> SortedItems:
        """What we hold, for reconciliation: the last snapshot plus the ops
        applied since; rebuilt whole if ops reached the replica another way
        (a bundle import, a test)."""
        if self._fresh:
            self._store = self._store.with_items(self._fresh)
            self._fresh = []
        if len(self._store) != len(self.replica.graph):
            self._store = SortedItems.from_sorted(*_items_of(self.replica.graph.topological()))
        return self._store

    def _start_reconciliation(self, link: _Link, now_ms: int) -> None:
        if not _open(link):
            link.reconcile_at = None
            return
        link.client = NegentropyClient(self._items())
        link.session.send(Reconcile(link.client.initiate()))
        self.counters.reconciliations += 1
        jitter = int(self._rng.random() * 2 * self.config.reconcile_jitter_ms)
        interval = self.config.reconcile_interval_ms - self.config.reconcile_jitter_ms + jitter
        link.reconcile_at = now_ms + max(interval, 1)

    def _reconcile(self, peer: PeerId, link: _Link, message: Reconcile, now_ms: int) -> None:
        if not _open(link):
            return
        if not message.reply:
            # A query from the peer's client: answer from what we hold now.
            link.server = NegentropyServer(self._items())
            link.session.send(Reconcile(link.server.reconcile(message.payload), reply=True))
            return
        if link.client is None or link.client.done:
            raise RemoteProtocolError("a reconciliation reply that nothing asked for")
        following, _have, need = link.client.reconcile(message.payload)
        wanted = [i for i in need if not self._has(i)]
        if wanted:
            link.session.request(wanted, now_ms)
        if following is not None:
            link.session.send(Reconcile(following))

    # -- ops in -----------------------------------------------------------------

    def _ingest(self, peer: PeerId, link: _Link, ops: Iterable[bytes], now_ms: int) -> None:
        """Give ops from ``peer`` to the replica; forward what it applies; ask
        the same peer for the deps of ops left waiting."""
        waiting = False
        for data in ops:
            try:
                result = self.replica.receive_bytes(data, now_ms)
            except InvalidOp as exc:
                self.counters.ops_invalid += 1
                for event in link.session.report_invalid(exc.reason, now_ms):
                    self._on_event(peer, link, event, now_ms)
                if peer not in self._links:
                    return  # over its misbehaviour budget: closed
                continue
            except CapacityError:
                self.counters.ops_dropped_full += 1  # it can be fetched again later
                continue
            waiting = waiting or result.status is Status.PENDING
            for op in result.applied:
                self._applied(op, now_ms)
        if waiting:
            asked = set(link.session.pending_requests())
            missing = sorted(i for i in self.replica.graph.missing() if i not in asked)
            if missing:
                link.session.request(missing, now_ms)

    def _applied(self, op: Op, now_ms: int) -> None:
        self.counters.ops_applied += 1
        self._fresh.append((op.ts, op.id))
        self._push(self.push.broadcast(op.id, op.data, now_ms, op.kind in URGENT_KINDS), now_ms)

    def _push(self, actions: list[PushAction], now_ms: int) -> None:
        touched = set()
        for action in actions:
            if isinstance(action, Send):
                link = self._links.get(action.peer)
                if link is not None and _open(link):
                    link.session.send(action.message)
                    touched.add(action.peer)
            elif isinstance(action, Deliver):
                link = self._links.get(action.peer)
                if link is not None:
                    self._ingest(action.peer, link, (action.op,), now_ms)
        for peer in touched:
            self._flush(peer)

    # -- membership -------------------------------------------------------------

    def _peer_actions(self, actions: list[PeerAction], now_ms: int) -> None:
        for action in actions:
            if isinstance(action, Connect):
                self._out.append(Dial(action.peer))
            elif isinstance(action, Close):
                self._hangup(action.peer, "closed by peer selection", now_ms)
            elif isinstance(action, Send):
                link = self._links.get(action.peer)
                if link is not None and _open(link):
                    link.session.send(action.message)
                    self._flush(action.peer)
            elif isinstance(action, NeighborUp):
                self._remember(action.peer)
                if action.peer.id not in self.push.peers:
                    self.push.peer_up(action.peer.id)
            elif isinstance(action, NeighborDown) and action.peer in self.push.peers:
                self.push.peer_down(action.peer)

    # -- connections ------------------------------------------------------------

    def _flush(self, peer: PeerId) -> None:
        link = self._links.get(peer)
        if link is None:
            return
        while data := link.session.data_to_send():
            self._out.append(Transmit(peer, data))

    def _fail(self, peer: PeerId, reason: str, now_ms: int) -> None:
        self.counters.errors.append(reason)
        self._hangup(peer, reason, now_ms)

    def _hangup(self, peer: PeerId, reason: str, now_ms: int) -> None:
        link = self._links.pop(peer, None)
        if link is not None:
            if not link.session.closed:
                link.session.close(reason, now_ms)
            while data := link.session.data_to_send():
                self._out.append(Transmit(peer, data))
            self.counters.sessions_closed += 1
            self._down(peer, now_ms)
        self._out.append(Hangup(peer, reason))

    def _down(self, peer: PeerId, now_ms: int) -> None:
        if peer in self.push.peers:
            self.push.peer_down(peer)
        self._peer_actions(self.peers.disconnected(peer, now_ms), now_ms)

    # -- replica look-ups -------------------------------------------------------

    def _has(self, op_id: bytes) -> bool:
        graph = self.replica.graph
        return (
            op_id in graph
            or graph.is_pending(op_id)
            or graph.is_held(op_id)
            or graph.rejection(op_id) is not None
        )

    def _get(self, op_id: bytes) -> bytes | None:
        op = self.replica.graph.get(op_id)
        return op.data if op is not None else None


def _items_of(ops: Iterable[Op]) -> tuple[array[int], bytes]:
    """Flat arrays of (ts, id) for ops already in (ts, id) order."""
    ts: array[int] = array("Q")
    ids = bytearray()
    for op in ops:
        ts.append(op.ts)
        ids += op.id
    return ts, bytes(ids)


def _open(link: _Link) -> bool:
    """Whether the link's session may send protocol messages now."""
    return link.session.state is State.ESTABLISHED


def _allow_all(peer: PeerId) -> bool:
    return True
