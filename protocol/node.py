"""One node's sync: sessions, push, pull and peer selection over one replica.

Theory of operation. A :class:`SyncNode` is what the daemon (over libp2p) and
the simulator (over its virtual network) both drive. It owns, for one replica:

- a :class:`SyncSession` per connection (handshake, framing, fetch, limits);
- one :class:`Broadcast` (push, Plumtree) over the active view;
- one :class:`PeerSelection` (HyParView) deciding whom to stay connected to;
- the reconciliation runs (Negentropy): when a peer becomes a neighbour each
  end runs its own client against the other's server, and pulls (Want) what
  it lacks; again every ``reconcile_interval_ms`` (+- jitter) per neighbour.
  A node answers a peer's round with its own (so both ends pull). Short
  connections that bring no neighbour do not reconcile, except *probes*:
  every ``probe_interval_ms`` a node reconciles with a remembered peer that
  is not connected; old ops found that way reveal a split overlay (a healed
  partition whose halves filled their views among themselves): the probed
  peer becomes a neighbour, and the node reconciles with its other
  neighbours once caught up, a wave that carries the ops across.

Every op that arrives, by push or pull, is given to the replica first; only
ops the replica applied are forwarded (``Broadcast.broadcast``), including
ops released from its pending set, so a forgery dies at the first honest hop
and an op never travels ahead of its deps. Push runs one tree per author
(:func:`author_of`). An op that arrives before its deps waits
``dep_fetch_delay_ms`` for them (they are usually a hop behind, on their own
trees) before the node asks the sender for them. An op that fails validation is
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

from archipel.crdt import CapacityError, InvalidOp, Op, Replica, Status, ts_ms
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
from .plumtree import ONE_TREE, Broadcast, Deliver, PushAction, PushLimits, Send
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
_ERRORS_KEPT = 64  # SyncCounters.errors keeps the latest reasons only (a peer can cause many)
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
    """Close the connection with ``peer`` once ``Transmit`` before it is written.

    ``offence``: the peer misbehaved (it broke the protocol, or sent more
    invalid ops than its budget forgives), as opposed to a routine close; the
    driver may log it as a warning and remember it against the peer."""

    peer: PeerId
    reason: str
    offence: bool = False


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
    rediscover_first_ms: int = 1_000
    """After a neighbour is lost, the first such offer comes this soon, then
    twice as late each time while still short, up to the interval; a node
    with no neighbour at all keeps offering at about this pace. A healed
    partition or a restarted neighbour is found again within seconds (0: only
    the interval's rounds)."""
    remembered_peers: int = 256
    probe_interval_ms: int = 30_000
    """How often (on average, jittered) a node opens a short connection to a
    peer it knew that is not a neighbour, and reconciles over it: after a
    partition heals, the halves' neighbours are all on their own side, and this
    is how the ops cross (0: never)."""
    split_evidence_ms: int = 2_000
    """An op fetched over a probe that is older than this (by its timestamp)
    went round neither side's neighbours: the probed peer becomes a neighbour,
    joining the two overlays."""
    reconcile_again_after_ms: int = 2_000
    """A round with a peer does not start sooner than this after the last one
    (answering a peer's round with our own, passing pulled ops on)."""
    dep_fetch_delay_ms: int = 250
    """How long an op that arrived before its deps waits for them to come by
    push (along their authors' trees, usually a hop behind) before the node
    asks the peer that sent it for them (0: ask at once)."""


@dataclass(slots=True)
class _Link:
    """One connection: its session and its reconciliation runs."""

    session: SyncSession
    initiator: bool
    client: NegentropyClient | None = None
    server: NegentropyServer | None = None
    reconcile_at: int | None = None
    deps_at: int | None = None  # when to ask this peer for deps ops wait for
    wave_at: int | None = None  # old ops came from this peer: pass them on by then
    established: bool = False
    dialed_by_peers: bool = False
    probe: bool = False  # we opened it to probe (see SyncConfig.probe_interval_ms)
    neighbour: bool = False  # in the active view: reconciles periodically
    reconciled_ms: int | None = None  # when our last round started


@dataclass(slots=True)
class SyncCounters:
    """What the node did (for reports and tests)."""

    ops_applied: int = 0
    ops_invalid: int = 0
    ops_dropped_full: int = 0
    reconciliations: int = 0
    sessions_closed: int = 0
    duplicate_connections: int = 0
    errors: list[str] = field(default_factory=list)  # the latest _ERRORS_KEPT reasons


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
        push_limits: PushLimits | None = None,
    ) -> None:
        self.replica = replica
        self.me = me
        self.config = config if config is not None else SyncConfig()
        self.counters = SyncCounters()
        self._rng = rng
        self._links: dict[PeerId, _Link] = {}
        self._out: list[Action] = []
        self.push = Broadcast(
            has=self._has, get=self._get, tree_of=author_of, rng=rng, limits=push_limits
        )
        allowed = is_allowed if is_allowed is not None else _allow_all
        self.peers = PeerSelection(me, rng, now_ms, is_allowed=allowed)
        self._store = SortedItems.from_sorted(*_items_of(replica.graph.topological()))
        self._fresh: list[tuple[int, bytes]] = []
        self._remembered: OrderedDict[PeerId, PeerInfo] = OrderedDict()
        self._rediscover_at = now_ms + self.config.rediscover_interval_ms
        self._rediscover_backoff_ms = 0
        self._probe_at = self._next_probe(now_ms)
        self._probes: dict[PeerId, int] = {}  # probe dials not yet connected: since when

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
        """Short of neighbours: offer a few remembered peers to peer selection
        (soon after a neighbour is lost: :attr:`SyncConfig.rediscover_first_ms`)."""
        interval = self.config.rediscover_interval_ms
        if len(self.peers.active) >= self.peers.limits.active_size:
            self._rediscover_backoff_ms = 0
            jitter = int(self._rng.random() * interval)
            self._rediscover_at = now_ms + interval // 2 + jitter
            return
        first = self.config.rediscover_first_ms
        if first > 0 and not self.peers.active:  # alone: keep looking, every second or so
            self._rediscover_at = now_ms + first // 2 + int(self._rng.random() * first)
        elif self._rediscover_backoff_ms:
            backoff = self._rediscover_backoff_ms
            self._rediscover_backoff_ms = min(2 * backoff, interval)
            self._rediscover_at = now_ms + backoff // 2 + int(self._rng.random() * backoff)
        else:
            jitter = int(self._rng.random() * interval)
            self._rediscover_at = now_ms + interval // 2 + jitter
        known = self.peers.active.keys() | self.peers.passive.keys()
        candidates = [info for pid, info in self._remembered.items() if pid not in known]
        if candidates:
            count = min(3, len(candidates))
            picks = [candidates[int(self._rng.random() * len(candidates))] for _ in range(count)]
            self.peers.add_known(picks)

    def _next_probe(self, now_ms: int) -> int | None:
        interval = self.config.probe_interval_ms
        if interval <= 0:
            return None
        return now_ms + interval // 2 + int(self._rng.random() * interval)

    def _probe(self, now_ms: int) -> None:
        """Reconcile with a peer we knew that is not a neighbour (see
        :attr:`SyncConfig.probe_interval_ms`)."""
        self._probe_at = self._next_probe(now_ms)
        stale = now_ms - self.peers.limits.dial_timeout_ms
        self._probes = {p: t for p, t in self._probes.items() if t > stale}
        candidates = [info for pid, info in self._remembered.items() if pid not in self._links]
        if not candidates or self._probes:
            return
        info = candidates[int(self._rng.random() * len(candidates))]
        actions = self.peers.probe(info, now_ms)
        if actions:
            self._probes[info.id] = now_ms
        self._peer_actions(actions, now_ms)

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
        self._probes.pop(peer, None)
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
            self._fail(peer, exc, now_ms)
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
                self._fail(peer, exc, now_ms)
                break
        self._flush(peer)

    def publish(self, op: Op, now_ms: int) -> None:
        """Spread an op this node's replica has just applied (authored here)."""
        self._fresh.append((op.ts, op.id))
        self._push(self.push.broadcast(op.id, op.data, now_ms, op.kind in URGENT_KINDS), now_ms)

    def handle_timer(self, now_ms: int) -> None:
        for op in self.replica.tick(now_ms).applied:  # held ops whose time has come
            self._applied(op, now_ms, pulled=True)
        if now_ms >= self._rediscover_at:
            self._rediscover(now_ms)
        if self._probe_at is not None and now_ms >= self._probe_at:
            self._probe(now_ms)
        self._push(self.push.handle_timer(now_ms), now_ms)
        self._peer_actions(self.peers.handle_timer(now_ms), now_ms)
        for peer, link in list(self._links.items()):
            try:
                for event in link.session.handle_timer(now_ms):
                    self._on_event(peer, link, event, now_ms)
            except ProtocolError as exc:
                self._fail(peer, exc, now_ms)
                continue
            if link.reconcile_at is not None and now_ms >= link.reconcile_at:
                if link.client is not None and not link.client.done:
                    link.reconcile_at = now_ms + self.config.reconcile_again_after_ms
                else:
                    self._start_reconciliation(link, now_ms)
            if link.deps_at is not None and now_ms >= link.deps_at and _open(link):
                self._fetch_deps(link, now_ms)
            if link.wave_at is not None and now_ms >= link.wave_at:
                self._wave(peer, link, now_ms)
            self._flush(peer)

    def next_deadline(self) -> int | None:
        """When :meth:`handle_timer` must be called next (ms).

        The driver asks after every call into the node, so this is a plain
        loop that builds nothing (it walks every connection)."""
        best = self._rediscover_at  # always set
        for due in (
            self.replica.next_deadline_ms(),
            self.push.next_deadline(),
            self.peers.next_deadline(),
            self._probe_at,
        ):
            if due is not None and due < best:
                best = due
        for link in self._links.values():
            due = link.session.next_deadline()
            if due is not None and due < best:
                best = due
            due = link.reconcile_at
            if due is not None and due < best:
                best = due
            due = link.deps_at
            if due is not None and due < best:
                best = due
            due = link.wave_at
            if due is not None and due < best:
                best = due
        return best

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
                if self._probes.pop(peer, None) is not None:
                    link.probe = True
                    if peer in self._links and link.client is None:
                        self._start_reconciliation(link, now_ms)
        elif isinstance(event, OpsReceived):
            self._ingest(peer, link, event.ops, now_ms, pulled=True)
        elif isinstance(event, MessageReceived):
            self._on_message(peer, link, event.message, now_ms)
        elif isinstance(event, Closed):
            self._hangup(peer, event.reason, now_ms)

    def _on_message(self, peer: PeerId, link: _Link, message: Message, now_ms: int) -> None:
        if isinstance(message, _PUSH):
            if peer in self.push.peers:
                self._push(self.push.receive(peer, message, now_ms), now_ms)
            elif isinstance(message, Push):  # an urgent flood from a non-neighbour
                self._ingest(peer, link, message.ops, now_ms, pulled=True)
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
        link.reconciled_ms = now_ms
        link.reconcile_at = now_ms + self._reconcile_interval() if link.neighbour else None

    def _may_reconcile(self, link: _Link, now_ms: int) -> bool:
        """Whether a round may start now: none running, none started lately."""
        if link.client is not None and not link.client.done:
            return False
        last = link.reconciled_ms
        return last is None or now_ms - last >= self.config.reconcile_again_after_ms

    def _reconcile_interval(self) -> int:
        jitter = int(self._rng.random() * 2 * self.config.reconcile_jitter_ms)
        interval = self.config.reconcile_interval_ms - self.config.reconcile_jitter_ms + jitter
        return max(interval, 1)

    def _reconcile(self, peer: PeerId, link: _Link, message: Reconcile, now_ms: int) -> None:
        if not _open(link):
            return
        if not message.reply:
            # A query from the peer's client: answer from what we hold now.
            link.server = NegentropyServer(self._items())
            link.session.send(Reconcile(link.server.reconcile(message.payload), reply=True))
            if self._may_reconcile(link, now_ms):
                # The server learns nothing: a peer that reconciles with us
                # (probing, or passing on what it just pulled) gets a round
                # from us too, so that both ends pull.
                self._start_reconciliation(link, now_ms)
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

    def _ingest(
        self, peer: PeerId, link: _Link, ops: Iterable[bytes], now_ms: int, *, pulled: bool
    ) -> None:
        """Give ops from ``peer`` to the replica; forward what it applies; ask
        the same peer for the deps of ops left waiting. ``pulled``: the ops came
        by fetch (Want, reconciliation), not by push."""
        waiting = False
        for data in ops:
            try:
                result = self.replica.receive_bytes(data, now_ms)
            except InvalidOp as exc:
                self._invalid(peer, link, exc.reason, now_ms)
                if peer not in self._links:
                    return  # over its misbehaviour budget: closed
                continue
            except CapacityError:
                self.counters.ops_dropped_full += 1  # it can be fetched again later
                continue
            waiting = waiting or result.status is Status.PENDING
            for op in result.applied:
                self._applied(op, now_ms, pulled=pulled, via=peer)
                if ts_ms(op.ts) < now_ms - self.config.split_evidence_ms and pulled:
                    self._split_evidence(peer, link, now_ms)
        if link.wave_at is not None and not link.session.pending_requests():
            self._wave(peer, link, now_ms)  # caught up from this peer: pass it on
        if waiting:
            if self.config.dep_fetch_delay_ms <= 0:
                self._fetch_deps(link, now_ms)
            elif link.deps_at is None:
                link.deps_at = now_ms + self.config.dep_fetch_delay_ms

    def _invalid(self, peer: PeerId, link: _Link, reason: str, now_ms: int) -> None:
        """An op from ``peer`` failed validation: charge its misbehaviour budget;
        over it, the session has closed and the peer is hung up on (an offence)."""
        self.counters.ops_invalid += 1
        for event in link.session.report_invalid(reason, now_ms):
            if isinstance(event, Closed):
                self._hangup(peer, event.reason, now_ms, offence=True)
            else:
                self._on_event(peer, link, event, now_ms)

    def _fetch_deps(self, link: _Link, now_ms: int) -> None:
        """Ask the peer for the deps ops still wait for (it holds them: a node
        forwards only ops it applied)."""
        link.deps_at = None
        asked = set(link.session.pending_requests())
        missing = sorted(i for i in self.replica.graph.missing() if i not in asked)
        if missing:
            link.session.request(missing, now_ms)

    def _split_evidence(self, peer: PeerId, link: _Link, now_ms: int) -> None:
        """We just pulled an op that is old: our side of the network never had
        it. Join the overlays if the peer was only probed, and once we have
        caught up from it (our Wants answered), pass it on (:meth:`_wave`)."""
        if link.probe:
            link.probe = False  # once
            self._peer_actions(self.peers.merge(peer, now_ms), now_ms)
        if link.wave_at is None:
            link.wave_at = now_ms + self.config.reconcile_again_after_ms  # at the latest

    def _wave(self, peer: PeerId, link: _Link, now_ms: int) -> None:
        """Reconcile with every other neighbour: each answers with a round of its
        own, pulls the old ops, and does the same, a wave that carries them
        across this side of a healed partition in a few round trips."""
        link.wave_at = None
        for other, other_link in list(self._links.items()):
            if (
                other != peer
                and other_link.neighbour
                and _open(other_link)
                and self._may_reconcile(other_link, now_ms)
            ):
                self._start_reconciliation(other_link, now_ms)
                self._flush(other)

    def _applied(self, op: Op, now_ms: int, *, pulled: bool, via: PeerId | None = None) -> None:
        self.counters.ops_applied += 1
        self._fresh.append((op.ts, op.id))
        urgent = op.kind in URGENT_KINDS
        actions = self.push.broadcast(op.id, op.data, now_ms, urgent, pulled=pulled, via=via)
        self._push(actions, now_ms)

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
                    self._ingest(action.peer, link, (action.op,), now_ms, pulled=False)
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
                    self._neighbour_up(action.peer.id, now_ms)
            elif isinstance(action, NeighborDown) and action.peer in self.push.peers:
                self.push.peer_down(action.peer)
                link = self._links.get(action.peer)
                if link is not None:
                    link.neighbour = False
                    link.reconcile_at = None  # no longer a neighbour: no more rounds

    def _neighbour_up(self, peer: PeerId, now_ms: int) -> None:
        """A new neighbour: reconcile with it now, and then periodically.

        Only neighbours reconcile: peer selection also opens short-lived
        connections (a ShuffleReply, a Neighbor request turned down), and a
        reconciliation on each of those would cost messages for nothing, since
        the node's neighbours bring it every op anyway."""
        link = self._links.get(peer)
        if link is None:
            return
        link.neighbour = True
        if link.client is not None and not link.client.done:
            if link.reconcile_at is None:  # a round is running: it will do; the next later
                link.reconcile_at = now_ms + self._reconcile_interval()
            return
        self._start_reconciliation(link, now_ms)
        self._flush(peer)

    # -- connections ------------------------------------------------------------

    def _flush(self, peer: PeerId) -> None:
        link = self._links.get(peer)
        if link is None:
            return
        while data := link.session.data_to_send():
            self._out.append(Transmit(peer, data))

    def _fail(self, peer: PeerId, exc: ProtocolError, now_ms: int) -> None:
        """Close the session after a protocol error: the peer's offence if it
        sent what broke the protocol, not if we mishandled it (a local error)."""
        self.counters.errors.append(exc.reason)
        del self.counters.errors[:-_ERRORS_KEPT]
        offence = isinstance(exc, RemoteProtocolError)
        self._hangup(peer, exc.reason, now_ms, offence=offence)

    def _hangup(self, peer: PeerId, reason: str, now_ms: int, *, offence: bool = False) -> None:
        link = self._links.pop(peer, None)
        if link is not None:
            if not link.session.closed:
                link.session.close(reason, now_ms)
            while data := link.session.data_to_send():
                self._out.append(Transmit(peer, data))
            self.counters.sessions_closed += 1
            self._down(peer, now_ms)
        self._out.append(Hangup(peer, reason, offence))

    def _down(self, peer: PeerId, now_ms: int) -> None:
        first = self.config.rediscover_first_ms
        if first > 0 and peer in self.peers.active:  # a neighbour lost: look for others soon
            self._rediscover_backoff_ms = first
            self._rediscover_at = min(self._rediscover_at, now_ms + first)
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


_AUTHOR_AT = 1 + 1 + 2 + 32 + 2
"""Where the author key starts in an op's canonical bytes: the array header,
the format version (a fixint), the federation (bin8 of 32 bytes), the author's
bin8 header."""


def author_of(op: bytes) -> bytes:
    """The author key of an op's signed bytes: the tree it is pushed along.

    Read from the canonical layout without decoding the op (the replica decodes
    and validates it later). Bytes that do not have that layout go along one
    common tree: whatever they are, the replica refuses or accepts them.
    """
    if (
        len(op) >= _AUTHOR_AT + 32
        and op[0] == 0x99  # an array of 9 fields
        and op[1] < 0x80  # a small format version
        and op[2:4] == b"\xc4\x20"
        and op[_AUTHOR_AT - 2 : _AUTHOR_AT] == b"\xc4\x20"
    ):
        return op[_AUTHOR_AT : _AUTHOR_AT + 32]
    return ONE_TREE


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
