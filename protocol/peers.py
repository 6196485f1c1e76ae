"""Peer selection: which peers a node keeps connected, in the spirit of HyParView.

Theory of operation. A :class:`PeerSelection` per node keeps two views of the
federation (Leitão, Pereira and Rodrigues, "HyParView", DSN 2007): a small
*active view* (``active_size``, default 5) of peers it stays connected to,
over which the push protocol runs, and a larger *passive view*
(``passive_size``, default 30) of addresses it knows, from which it replaces
an active peer that fails. Links in the active view are symmetric: a peer is
added only once both ends agreed, and a node that drops a peer tells it
(:class:`Disconnect`).

- **Join.** A new node connects to a contact and sends :class:`Join`. The
  contact takes it into its active view and starts a random walk
  (:class:`ForwardJoin`, ``arwl`` hops) through each other active peer; the
  walk adds the newcomer to passive views at ``prwl`` hops left and, where it
  ends, to an active view (a :class:`Neighbor` request with high priority).
- **Neighbor.** A node below ``active_size`` asks a passive peer to become a
  neighbour; the request has high priority, and must be accepted, only when
  the asker has no active peer left. A full node accepting a high-priority
  request (or a Join) drops a random active peer, which moves to its passive
  view.
- **Shuffle.** Every ``shuffle_interval_ms`` (+- ``shuffle_jitter_ms``, drawn
  from the ``rng`` argument) a node sends itself and a sample of both views
  on a random walk (:class:`Shuffle`); where the walk ends, the node answers
  with a sample of its passive view (:class:`ShuffleReply`) and both merge
  what they got into their passive views. The same tick refills an active
  view below its size.
- **Failure.** A connection lost (:meth:`disconnected`) removes the peer from
  the active view and asks a random passive peer to take its place.
- **Refusals.** A node at least half full whose request a full peer turned
  down asks no one else until the next tick (each request is a connection,
  and the other candidates are most likely full too).
- **Probes.** :meth:`probe` opens a connection outside both views for the
  sync protocol to reconcile over (closed after ``probe_linger_ms``);
  :meth:`merge` turns it into a neighbour link, with high priority, when the
  probe revealed a split overlay.

Sans-I/O: the daemon (or the simulator) carries out the actions —
:class:`Connect` (dial, then report :meth:`connected` or
:meth:`connect_failed`), :class:`Close`, :class:`Send` — and reports
:class:`NeighborUp`/:class:`NeighborDown` to the push protocol. How a message
from a peer is handled depends on the state of our link to it; the table
:data:`TRANSITIONS` says which, and a missing pair is a protocol error.

Bounds (:class:`PeerLimits`): both views; the ids and addresses of a
:class:`PeerInfo`; the peers in a Shuffle (over the limit: RemoteProtocolError)
and how many of them one Shuffle inserts; dials and connections at once;
walk lengths. Peers for which ``is_allowed`` is false (not a federation
member) are never admitted to either view.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TypeAlias, TypeVar

from .errors import LocalProtocolError, RemoteProtocolError
from .messages import (
    Disconnect,
    ForwardJoin,
    Join,
    Message,
    Neighbor,
    NeighborReply,
    PeerInfo,
    Shuffle,
    ShuffleReply,
)
from .plumtree import PeerId, Rng, Send

__all__ = [
    "TRANSITIONS",
    "Close",
    "Connect",
    "NeighborDown",
    "NeighborUp",
    "PeerAction",
    "PeerLimits",
    "PeerSelection",
    "Rng",
    "Send",
]


@dataclass(frozen=True, slots=True)
class PeerLimits:
    """Sizes, walk lengths, timers and bounds of peer selection."""

    active_size: int = 5
    passive_size: int = 30
    arwl: int = 6  # active random walk length: hops of a ForwardJoin
    prwl: int = 3  # a ForwardJoin with this many hops left adds to passive views
    shuffle_active: int = 3  # active peers sent in a Shuffle
    shuffle_passive: int = 4  # passive peers sent in a Shuffle
    shuffle_ttl: int = 4  # hops of a Shuffle's walk
    shuffle_interval_ms: int = 30_000
    shuffle_jitter_ms: int = 7_500  # each period is interval +- up to this
    ask_timeout_ms: int = 5_000  # a Neighbor request unanswered: give up
    dial_timeout_ms: int = 10_000  # a Connect unreported: give up
    probe_linger_ms: int = 10_000  # a probe's connection closes after this
    max_dials: int = 8  # connections being opened at once
    max_connections: int = 32  # peers with a connection at once (all kinds)
    max_shuffle_peers: int = 16  # peers in an incoming Shuffle or ShuffleReply
    max_peer_id_bytes: int = 64
    max_peer_addrs: int = 8
    max_addr_chars: int = 256


@dataclass(slots=True)
class PeerCounters:
    """What peer selection did and refused (for logs and the simulator)."""

    joins: int = 0
    evictions: int = 0
    asks_sent: int = 0
    asks_rejected: int = 0
    asks_failed: int = 0  # dial failed, timed out, or connection lost
    failures: int = 0  # active peers lost
    shuffles_sent: int = 0
    shuffle_replies_dropped: int = 0  # no room to dial the origin
    not_allowed: int = 0
    probes: int = 0
    merges: int = 0  # probes that found a split overlay and became neighbours


# -- actions ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connect:
    """Open a connection to ``peer``; report :meth:`PeerSelection.connected`
    or :meth:`PeerSelection.connect_failed`."""

    peer: PeerInfo


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection to ``peer`` once what was sent before is flushed."""

    peer: PeerId


@dataclass(frozen=True, slots=True)
class NeighborUp:
    """``peer`` joined the active view: run the push protocol with it."""

    peer: PeerInfo


@dataclass(frozen=True, slots=True)
class NeighborDown:
    """``peer`` left the active view."""

    peer: PeerId


PeerAction: TypeAlias = Connect | Close | Send | NeighborUp | NeighborDown


# -- link state machine -----------------------------------------------------------


class LinkState(Enum):
    DIALING = "dialing"  # we asked the daemon to connect
    OPEN = "open"  # connected, not a neighbour (inbound, or transient)
    ASKING = "asking"  # we sent Neighbor and await the reply
    ACTIVE = "active"  # in the active view


class Purpose(Enum):
    JOIN = "join"  # send Join when connected; the contact becomes active
    ASK = "ask"  # send Neighbor when connected
    REPLY = "reply"  # send the queued messages, then close
    PROBE = "probe"  # stay open a while, for the sync protocol to reconcile over it


class Rule(Enum):
    JOIN = "join"
    FORWARD_JOIN = "forward join"
    NEIGHBOR = "neighbor"
    NEIGHBOR_REPLY = "neighbor reply"
    DISCONNECT = "disconnect"
    SHUFFLE = "shuffle"
    SHUFFLE_REPLY = "shuffle reply"
    IGNORE = "ignore (a race with our own change of the link)"


DIALING, OPEN, ASKING, ACTIVE = LinkState
_MEMBERSHIP = (Join, ForwardJoin, Neighbor, NeighborReply, Disconnect, Shuffle, ShuffleReply)

TRANSITIONS: dict[tuple[LinkState, type[Message]], Rule] = {
    # A dialing link may also carry the peer's own inbound messages.
    **{(s, Join): Rule.JOIN for s in LinkState},
    **{(s, Neighbor): Rule.NEIGHBOR for s in LinkState},
    **{(s, ShuffleReply): Rule.SHUFFLE_REPLY for s in LinkState},
    # Walks and disconnects travel active links; elsewhere they crossed our Disconnect.
    **{(s, m): Rule.IGNORE for s in (DIALING, OPEN, ASKING) for m in (ForwardJoin, Disconnect)},
    **{(s, Shuffle): Rule.IGNORE for s in (DIALING, OPEN, ASKING)},
    (ACTIVE, ForwardJoin): Rule.FORWARD_JOIN,
    (ACTIVE, Disconnect): Rule.DISCONNECT,
    (ACTIVE, Shuffle): Rule.SHUFFLE,
    (ASKING, NeighborReply): Rule.NEIGHBOR_REPLY,
    (ACTIVE, NeighborReply): Rule.IGNORE,  # our request crossed theirs: already active
    # (DIALING | OPEN, NeighborReply) is missing: a reply nobody asked for.
}
"""Which rule handles a message, by the state of our link to its sender."""


@dataclass(slots=True)
class _Link:
    state: LinkState
    info: PeerInfo | None  # known for links we opened and for neighbours
    purpose: Purpose | None = None
    deadline: int | None = None  # give up dialling, asking, or an idle open link
    high_priority: bool = False  # for a Neighbor request sent once connected
    outbox: list[Message] = field(default_factory=list)


T = TypeVar("T")


def _pick(rng: Rng, items: Sequence[T]) -> T:
    return items[min(int(rng.random() * len(items)), len(items) - 1)]


def _sample(rng: Rng, items: Iterable[T], k: int) -> list[T]:
    pool = list(items)
    for i in range(min(k, len(pool))):
        j = i + min(int(rng.random() * (len(pool) - i)), len(pool) - i - 1)
        pool[i], pool[j] = pool[j], pool[i]
    return pool[: max(k, 0)]


def _allow_all(_peer: PeerId) -> bool:
    return True


class PeerSelection:
    """The active and passive views of one node, and the protocol that keeps them."""

    def __init__(
        self,
        me: PeerInfo,
        rng: Rng,
        now_ms: int,
        *,
        is_allowed: Callable[[PeerId], bool] = _allow_all,
        limits: PeerLimits | None = None,
    ) -> None:
        self.me = me
        self.limits = limits if limits is not None else PeerLimits()
        self.counters = PeerCounters()
        self._rng = rng
        self._is_allowed = is_allowed
        self._active: dict[PeerId, PeerInfo] = {}
        self._passive: OrderedDict[PeerId, PeerInfo] = OrderedDict()
        self._links: dict[PeerId, _Link] = {}
        self._tried: set[PeerId] = set()  # asked since the last tick
        # A full peer turned down our request: the others are likely full too,
        # and each request costs a connection. A node at least half full waits
        # for the next tick.
        self._asks_paused = False
        self._shuffled: dict[PeerId, None] | None = None  # ids sent in our pending Shuffle
        self._tick_at = self._next_tick(now_ms)

    # -- views ----------------------------------------------------------------

    @property
    def active(self) -> dict[PeerId, PeerInfo]:
        return dict(self._active)

    @property
    def passive(self) -> dict[PeerId, PeerInfo]:
        return dict(self._passive)

    @property
    def isolated(self) -> bool:
        """No neighbour and nobody to ask: the daemon should :meth:`join` a contact."""
        return not self._active and not self._passive and not self._links

    # -- inputs from the daemon -----------------------------------------------

    def join(self, contact: PeerInfo, now_ms: int) -> list[PeerAction]:
        """Enter the overlay through ``contact`` (a bootstrap address or an invite)."""
        if contact.id == self.me.id:
            raise LocalProtocolError("a node cannot join through itself")
        if contact.id in self._links:
            return []
        return self._dial(contact, Purpose.JOIN, now_ms)

    def add_known(self, peers: Iterable[PeerInfo]) -> None:
        """Add addresses learnt elsewhere (configuration, mDNS, remembered
        peers offered again) to the passive view; they may be asked at once,
        even if they failed earlier in this shuffle period."""
        for info in peers:
            self._tried.discard(info.id)
            self._add_passive(info)

    def connected(self, peer: PeerId, now_ms: int) -> list[PeerAction]:
        """A :class:`Connect` succeeded (a race may have made it unneeded)."""
        link = self._links.get(peer)
        if link is None:
            return [Close(peer)]  # given up meanwhile
        if link.state is not DIALING or link.info is None:
            return []  # the peer reached us first on its own connection
        actions: list[PeerAction] = [Send(peer, m) for m in link.outbox]
        link.outbox.clear()
        if link.purpose is Purpose.JOIN:
            self.counters.joins += 1
            actions += self._add_active(link.info)
            actions.append(Send(peer, Join(self.me)))
        elif link.purpose is Purpose.ASK:
            actions += self._send_ask(peer, link, now_ms, link.high_priority)
        elif link.purpose is Purpose.PROBE:
            link.state, link.purpose = OPEN, None
            link.deadline = now_ms + self.limits.probe_linger_ms
        else:
            del self._links[peer]
            actions.append(Close(peer))
        return actions

    def probe(self, info: PeerInfo, now_ms: int) -> list[PeerAction]:
        """Open a short-lived connection to ``info``, outside both views.

        The sync protocol reconciles over it: a node whose neighbours all sit
        on its side of a healed partition learns the other side's ops this way
        (peer selection alone would never look across: nobody is short of
        neighbours). The connection closes after ``probe_linger_ms``."""
        if info.id == self.me.id or info.id in self._links or not self._is_allowed(info.id):
            return []
        self.counters.probes += 1
        return self._dial(info, Purpose.PROBE, now_ms)

    def merge(self, peer: PeerId, now_ms: int) -> list[PeerAction]:
        """A probe brought ops that neither this node's neighbours nor the
        probed peer's had passed on: the overlay is split (a partition healed
        and both sides filled their views among themselves). Ask the probed
        peer, over the probe's connection, to become a neighbour, with high
        priority (it must accept): one such link joins the two overlays."""
        link = self._links.get(peer)
        if link is None or link.state is not OPEN or link.info is None:
            return []
        self.counters.merges += 1
        return self._send_ask(peer, link, now_ms, high_priority=True)

    def connect_failed(self, peer: PeerId, now_ms: int) -> list[PeerAction]:
        """A :class:`Connect` failed: forget the address, ask someone else."""
        link = self._links.get(peer)
        if link is None or link.state is not DIALING:
            return []  # given up meanwhile, or the peer reached us first
        del self._links[peer]
        if link.purpose is Purpose.PROBE:
            return []  # perhaps across a partition: keep the address
        self._passive.pop(peer, None)
        if link.purpose is Purpose.ASK:
            self.counters.asks_failed += 1
        return self._refill(now_ms)

    def disconnected(self, peer: PeerId, now_ms: int) -> list[PeerAction]:
        """The connection to ``peer`` closed or failed (not at our request)."""
        link = self._links.pop(peer, None)
        if link is None:
            return []
        actions: list[PeerAction] = []
        if link.state is ACTIVE:
            self.counters.failures += 1
            del self._active[peer]
            actions.append(NeighborDown(peer))
        elif link.state in (ASKING, DIALING) and link.purpose is Purpose.ASK:
            self.counters.asks_failed += 1
        return actions + self._refill(now_ms)

    def receive(self, peer: PeerId, message: Message, now_ms: int) -> list[PeerAction]:
        """Handle a membership message from ``peer`` (authenticated by the transport).

        Raises :class:`RemoteProtocolError` if the message is not allowed in
        the link's state or breaks a limit, :class:`LocalProtocolError` if it
        is not a membership message.
        """
        if not isinstance(message, _MEMBERSHIP):
            raise LocalProtocolError(f"{type(message).__name__} is not a membership message")
        link = self._links.get(peer)
        state = link.state if link is not None else OPEN
        rule = TRANSITIONS.get((state, type(message)))
        if rule is None:
            raise RemoteProtocolError(
                f"{type(message).__name__} is not expected on a {state.value} link"
            )
        if rule is Rule.IGNORE:
            return []
        if link is None:
            if len(self._links) >= self.limits.max_connections:
                raise RemoteProtocolError(f"more than {self.limits.max_connections} connections")
            link = self._links[peer] = _Link(OPEN, None, deadline=self._idle_deadline(now_ms))
        return self._apply(rule, peer, link, message, now_ms)

    # -- timers ---------------------------------------------------------------

    def next_deadline(self) -> int | None:
        best = self._tick_at
        for link in self._links.values():
            due = link.deadline
            if due is not None and due < best:
                best = due
        return best

    def handle_timer(self, now_ms: int) -> list[PeerAction]:
        """Give up on overdue dials and requests; shuffle and refill when due."""
        actions: list[PeerAction] = []
        for peer, link in list(self._links.items()):
            if link.deadline is not None and link.deadline <= now_ms:
                del self._links[peer]
                actions.append(Close(peer))
                if link.state is OPEN or link.purpose is Purpose.PROBE:
                    continue  # an idle connection, or a probe: nothing known against the peer
                self._passive.pop(peer, None)  # unreachable or unresponsive
                if link.purpose is Purpose.ASK:
                    self.counters.asks_failed += 1
        if self._tick_at <= now_ms:
            self._tick_at = self._next_tick(now_ms)
            self._tried.clear()
            self._asks_paused = False
            actions += self._shuffle()
        return actions + self._refill(now_ms)

    def _idle_deadline(self, now_ms: int) -> int:
        return now_ms + self.limits.ask_timeout_ms

    def _next_tick(self, now_ms: int) -> int:
        jitter = self.limits.shuffle_jitter_ms
        return (
            now_ms + self.limits.shuffle_interval_ms + round((2 * self._rng.random() - 1) * jitter)
        )

    # -- rules ----------------------------------------------------------------

    def _apply(
        self, rule: Rule, peer: PeerId, link: _Link, message: Message, now_ms: int
    ) -> list[PeerAction]:
        actions: list[PeerAction] = []
        if isinstance(message, Join) and rule is Rule.JOIN:
            actions = self._on_join(peer, link, message.peer)
        elif isinstance(message, ForwardJoin) and rule is Rule.FORWARD_JOIN:
            actions = self._on_forward_join(peer, message, now_ms)
        elif isinstance(message, Neighbor) and rule is Rule.NEIGHBOR:
            actions = self._on_neighbor(peer, link, message)
        elif isinstance(message, NeighborReply) and rule is Rule.NEIGHBOR_REPLY:
            actions = self._on_neighbor_reply(peer, link, message.accepted, now_ms)
        elif rule is Rule.DISCONNECT:
            info = self._active.pop(peer)
            link.state = OPEN  # the sender closes the connection
            link.deadline = self._idle_deadline(now_ms)
            self._add_passive(info)
            actions = [NeighborDown(peer), *self._refill(now_ms)]
        elif isinstance(message, Shuffle) and rule is Rule.SHUFFLE:
            actions = self._on_shuffle(peer, message, now_ms)
        elif isinstance(message, ShuffleReply) and rule is Rule.SHUFFLE_REPLY:
            self._on_shuffle_reply(message.peers)
        return actions

    def _check_sender(self, peer: PeerId, info: PeerInfo, what: str) -> None:
        self._check_info(info)
        if info.id != peer:
            raise RemoteProtocolError(f"{what} names another peer than its sender")

    def _refuse(self, peer: PeerId, reply: Message | None) -> list[PeerAction]:
        """Turn away a peer that is not a federation member."""
        self.counters.not_allowed += 1
        if self._links.pop(peer).state is ACTIVE:
            del self._active[peer]
            return [NeighborDown(peer), Close(peer)]
        return [*([Send(peer, reply)] if reply is not None else []), Close(peer)]

    def _on_join(self, peer: PeerId, link: _Link, info: PeerInfo) -> list[PeerAction]:
        self._check_sender(peer, info, "Join")
        if not self._is_allowed(peer):
            return self._refuse(peer, None)
        link.info = info
        actions = self._add_active(info)
        walk = ForwardJoin(info, self.limits.arwl)
        actions += [Send(other, walk) for other in self._active if other != peer]
        return actions

    def _on_forward_join(self, peer: PeerId, walk: ForwardJoin, now_ms: int) -> list[PeerAction]:
        new = walk.peer
        self._check_info(new)
        if new.id == self.me.id or not self._is_allowed(new.id):
            return []
        ttl = min(walk.ttl, self.limits.arwl)
        if ttl > 0 and len(self._active) > 1:
            if ttl == self.limits.prwl:
                self._add_passive(new)
            onward = [p for p in self._active if p not in (peer, new.id)]
            if onward:
                return [Send(_pick(self._rng, onward), ForwardJoin(new, ttl - 1))]
        return self._ask(new, now_ms, high_priority=True)

    def _on_neighbor(self, peer: PeerId, link: _Link, request: Neighbor) -> list[PeerAction]:
        self._check_sender(peer, request.peer, "Neighbor")
        if not self._is_allowed(peer):
            return self._refuse(peer, NeighborReply(False))
        link.info = request.peer
        room = len(self._active) < self.limits.active_size
        if link.state in (ACTIVE, ASKING) or request.high_priority or room:
            return [*self._add_active(request.peer), Send(peer, NeighborReply(True))]
        if link.state is DIALING:
            return [Send(peer, NeighborReply(False))]  # our own dial goes on
        del self._links[peer]
        return [Send(peer, NeighborReply(False)), Close(peer)]

    def _on_neighbor_reply(
        self, peer: PeerId, link: _Link, accepted: bool, now_ms: int
    ) -> list[PeerAction]:
        assert link.info is not None  # an asking link was opened by us
        if accepted:
            return self._add_active(link.info)
        self.counters.asks_rejected += 1
        self._asks_paused = True
        del self._links[peer]
        return [Close(peer), *self._refill(now_ms)]

    def _on_shuffle(self, peer: PeerId, shuffle: Shuffle, now_ms: int) -> list[PeerAction]:
        self._check_peers(shuffle.peers)
        self._check_info(shuffle.origin)
        origin = shuffle.origin
        if origin.id == self.me.id or not self._is_allowed(origin.id):
            return []
        ttl = min(shuffle.ttl, self.limits.shuffle_ttl) - 1
        onward = [p for p in self._active if p not in (peer, origin.id)]
        if ttl > 0 and onward:
            return [Send(_pick(self._rng, onward), Shuffle(origin, shuffle.peers, ttl))]
        sample = _sample(self._rng, self._passive.values(), len(shuffle.peers))
        actions = self._send_to(origin, ShuffleReply(tuple(sample)), now_ms)
        self._merge(shuffle.peers, evict_first=dict.fromkeys(info.id for info in sample))
        return actions

    def _on_shuffle_reply(self, peers: tuple[PeerInfo, ...]) -> None:
        self._check_peers(peers)
        if self._shuffled is None:
            return  # not asked for (or a second reply): take nothing
        self._merge(peers, evict_first=self._shuffled)
        self._shuffled = None

    # -- views ----------------------------------------------------------------

    def _check_info(self, info: PeerInfo) -> None:
        limits = self.limits
        if not 0 < len(info.id) <= limits.max_peer_id_bytes:
            raise RemoteProtocolError(f"a peer id of {len(info.id)} bytes")
        if len(info.addrs) > limits.max_peer_addrs:
            raise RemoteProtocolError(f"a peer with {len(info.addrs)} addresses")
        if any(len(addr) > limits.max_addr_chars for addr in info.addrs):
            raise RemoteProtocolError(f"an address longer than {limits.max_addr_chars} chars")

    def _check_peers(self, peers: tuple[PeerInfo, ...]) -> None:
        if len(peers) > self.limits.max_shuffle_peers:
            raise RemoteProtocolError(f"{len(peers)} peers in a shuffle")
        for info in peers:
            self._check_info(info)

    def _add_active(self, info: PeerInfo) -> list[PeerAction]:
        """Make ``info`` a neighbour, dropping a random one if the view is full."""
        actions: list[PeerAction] = []
        link = self._links.setdefault(info.id, _Link(OPEN, info))
        link.state, link.info, link.purpose, link.deadline = ACTIVE, info, None, None
        if info.id in self._active:
            return actions
        if len(self._active) >= self.limits.active_size:
            evicted = _pick(self._rng, list(self._active))
            self.counters.evictions += 1
            self._add_passive(self._active.pop(evicted))
            del self._links[evicted]
            actions += [NeighborDown(evicted), Send(evicted, Disconnect()), Close(evicted)]
        self._active[info.id] = info
        self._passive.pop(info.id, None)
        actions.append(NeighborUp(info))
        return actions

    def _add_passive(self, info: PeerInfo, evict_first: Iterable[PeerId] = ()) -> None:
        if info.id == self.me.id or info.id in self._active or info.id in self._passive:
            return
        if not self._is_allowed(info.id):
            self.counters.not_allowed += 1
            return
        if len(self._passive) >= self.limits.passive_size:
            preferred = [p for p in evict_first if p in self._passive]
            victim = preferred[0] if preferred else _pick(self._rng, list(self._passive))
            del self._passive[victim]
        self._passive[info.id] = info

    def _merge(self, peers: Iterable[PeerInfo], evict_first: dict[PeerId, None]) -> None:
        """Insert shuffled peers (at most ``max_shuffle_peers``) into the passive view."""
        for info in list(peers)[: self.limits.max_shuffle_peers]:
            self._add_passive(info, evict_first)
            evict_first.pop(info.id, None)

    # -- asking, dialling, shuffling ------------------------------------------

    def _dials(self) -> int:
        return sum(link.state is DIALING for link in self._links.values())

    def _dial(self, info: PeerInfo, purpose: Purpose, now_ms: int) -> list[PeerAction]:
        if (
            self._dials() >= self.limits.max_dials
            or len(self._links) >= self.limits.max_connections
        ):
            return []
        self._links[info.id] = _Link(DIALING, info, purpose, now_ms + self.limits.dial_timeout_ms)
        return [Connect(info)]

    def _ask(self, info: PeerInfo, now_ms: int, high_priority: bool) -> list[PeerAction]:
        """Ask ``info`` to become a neighbour (dialling it first if need be)."""
        link = self._links.get(info.id)
        if link is None:
            actions = self._dial(info, Purpose.ASK, now_ms)
            if actions:
                self._links[info.id].high_priority = high_priority
            return actions
        if link.state is OPEN:
            link.info = info
            return self._send_ask(info.id, link, now_ms, high_priority)
        if link.state is DIALING:
            link.purpose, link.high_priority = Purpose.ASK, high_priority
        return []

    def _send_ask(
        self, peer: PeerId, link: _Link, now_ms: int, high_priority: bool
    ) -> list[PeerAction]:
        self.counters.asks_sent += 1
        link.state, link.purpose = ASKING, Purpose.ASK
        link.deadline = now_ms + self.limits.ask_timeout_ms
        # A node left with no neighbour at all must be taken in.
        return [Send(peer, Neighbor(self.me, high_priority or not self._active))]

    def _refill(self, now_ms: int) -> list[PeerAction]:
        """Ask passive peers to fill the active view's free places."""
        asking = sum(
            link.purpose is Purpose.ASK and link.state in (DIALING, ASKING)
            for link in self._links.values()
        )
        if self._asks_paused and 2 * len(self._active) >= self.limits.active_size:
            return []  # half full or better: that can wait for the next tick
        free = self.limits.active_size - len(self._active) - asking
        candidates = [
            info
            for p, info in self._passive.items()
            if p not in self._links and p not in self._tried
        ]
        actions: list[PeerAction] = []
        for info in _sample(self._rng, candidates, free):
            if len(self._tried) >= self.limits.passive_size:
                self._tried.clear()
            self._tried.add(info.id)
            actions += self._ask(info, now_ms, high_priority=not self._active)
        return actions

    def _send_to(self, info: PeerInfo, message: Message, now_ms: int) -> list[PeerAction]:
        """Send over an existing link, or over a connection opened for it."""
        link = self._links.get(info.id)
        if link is not None and link.state is not DIALING:
            return [Send(info.id, message)]
        if link is not None:
            link.outbox = [*link.outbox, message][-4:]
            return []
        actions = self._dial(info, Purpose.REPLY, now_ms)
        if not actions:
            self.counters.shuffle_replies_dropped += 1
            return []
        self._links[info.id].outbox.append(message)
        return actions

    def _shuffle(self) -> list[PeerAction]:
        if not self._active:
            return []
        target = _pick(self._rng, list(self._active))
        others = [info for p, info in self._active.items() if p != target]
        sample = _sample(self._rng, others, self.limits.shuffle_active)
        sample += _sample(self._rng, self._passive.values(), self.limits.shuffle_passive)
        self._shuffled = dict.fromkeys(info.id for info in sample)
        self.counters.shuffles_sent += 1
        return [Send(target, Shuffle(self.me, tuple(sample), self.limits.shuffle_ttl))]
