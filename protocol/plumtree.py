"""Push: epidemic broadcast along spanning trees, in the spirit of Plumtree.

Theory of operation. One :class:`Broadcast` per node (not per peer) sees every
connected peer (Leitão, Pereira and Rodrigues, "Epidemic Broadcast Trees",
2007). Every op belongs to a *tree*, named by ``tree_of(op)``: the node uses
the op's author, so each author's ops spread along their own tree (as
riak_core's broadcast keeps one tree per root). Per peer and tree the node
keeps one bit, its link is *eager* or *lazy*: a new op is pushed whole
(:class:`Push`) to the peers eager for its tree and announced by id
(:class:`IHave`, batched for ``ihave_delay_ms``) to the others. Links start
eager, so an author's first op floods; then each node asks the peers whose
pushes of that tree only bring duplicates to stop: what remains eager is,
per author, the tree of first arrivals, the shortest paths from wherever the
author writes. Each op then costs close to n - 1 payload sends and as few
hops as the overlay allows.

Why one tree per author, not one for all: under load, ops from many authors
are in flight at once, and each duplicate says which link is redundant *for
that op's source*. With one shared tree, those verdicts contradict each other
(a link redundant for one source is the only path for another), prunes cut
the tree apart faster than grafts mend it, and ops travel by graft, seconds
late. Per author, the verdicts agree. Without ``tree_of`` all ops share one
tree (:data:`ONE_TREE`) and Plumtree's own rule applies: a duplicate cuts the
link both ways and is answered by :class:`Prune` at once.

A duplicate proves the *sender's* push redundant, not ours to it: each side
decides about the pushes it receives. After ``prune_after`` prompt duplicates
in a row from a peer, the node puts the op's id into its next IHave to the
peer (the *prune signal*; Prune names no tree, and the wire is unchanged): a
peer that pushed an op to us and hears it announced by us knows we had it
from elsewhere, and makes that tree lazy towards us. The tree's *parent* (the
peer that brought its latest op first) is never asked to stop, so a node
always keeps a branch; a tree's ops are never announced to a peer that
supplies it (the announcement would read as a signal). A Prune received
makes every tree lazy towards its sender.

Repair. When a node hears of an id (IHave) and the op does not follow within
``ihave_timeout_ms`` (plus a per-node jitter, so that nodes cut off together
do not all graft at once), it sends :class:`Graft` to the announcer: the
announcer makes the op's tree eager towards the grafting node and answers
with the op (a :class:`Push`, which the grafting node takes as the answer,
not as a redundant push). Another ``graft_timeout_ms`` tries the next
announcer, up to ``max_graft_attempts``. Faster paths: when a neighbour goes,
the trees it was the parent of are grafted at once from another peer; and an
op the caller had to pull (``broadcast(..., pulled=True, via=peer)``) grafts
its tree from the peer it came from. As a safety net for lost messages, every
``reannounce_interval_ms`` each node adds the ids it forwarded in the last
``reannounce_horizon_ms`` to its announcements to the peers not known to hold
them (older gaps are the pull protocol's job).

Pushes to a peer within ``push_delay_ms`` of the last go together in one
Push; urgent ops and the answers to grafts are never delayed.

Validation before forwarding. :meth:`Broadcast.receive` never forwards an op:
it returns :class:`Deliver` for each op not seen before. The caller (the
replica) validates it and calls :meth:`Broadcast.broadcast` only once the op
is applied (for an op that waited for its deps, when it is released); an op
the replica rejects is never forwarded, so a forgery dies at its first honest
hop. The caller also calls :meth:`broadcast` for its own new ops and for ops
it pulled (those go down their tree, not up it, and prune nothing).

Urgent ops (alerts: the caller decides, from ``archipel.crdt.alerts
.URGENT_KINDS``) are flooded as ``Push(urgent=True)`` to every connected peer
not known to hold them, and their duplicates change no link.

Link transitions are the table :data:`TRANSITIONS`. Every map and queue that
input can grow is bounded by a field of :class:`PushLimits`: over a bound the
oldest entry is dropped and counted in :class:`PushCounters`, or the peer gets
:class:`RemoteProtocolError` (an oversized message, a malformed id, more
unfetched announcements than ``max_unknown_per_peer``).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol, TypeAlias

from archipel.crdt import op_id as compute_op_id

from .errors import LocalProtocolError, RemoteProtocolError
from .messages import Graft, IHave, Message, Ops, Prune, Push

PeerId: TypeAlias = bytes
"""A peer's id (the device's public key), as in :class:`PeerInfo`."""

ID_BYTES = 32
ONE_TREE = b""
"""The tree of every op when no ``tree_of`` is given: one tree for all."""


class Rng(Protocol):
    """The randomness a node is given (``random.Random`` fits)."""

    def random(self) -> float: ...


@dataclass(frozen=True, slots=True)
class PushLimits:
    """Timers and bounds of the push protocol; the defaults suit internet links."""

    ihave_delay_ms: int = 2_000  # batch announcements to one peer this long
    ihave_timeout_ms: int = 1_000  # announced but not received: graft after this ...
    graft_jitter_ms: int = 1_000  # ... plus a per-node delay drawn below this
    graft_timeout_ms: int = 500  # graft unanswered: try the next announcer after this
    late_after_ms: int = 500  # a duplicate this long after the first copy prunes nothing
    supplier_window_ms: int = 5_000  # a peer whose push brought us a tree's op this
    # recently gets none of that tree's ids announced (only a prune signal names one)
    prune_after: int = 1  # prompt duplicates in a row (per peer and tree) before pruning
    prune_delay_ms: int = 300  # a prune signal waits for other ids at most this long
    push_delay_ms: int = 40  # pushes to a peer within this of the last go together
    max_graft_attempts: int = 4  # then give up (the pull protocol will fetch it)
    reannounce_interval_ms: int = 10_000  # period of the re-announcement safety net
    reannounce_horizon_ms: int = 12_000  # ids forwarded this recently are re-announced
    max_ihave_ids: int = 256  # ids in one IHave, either way
    max_graft_ids: int = 256  # ids in one incoming Graft
    max_push_ops: int = 64  # ops in one incoming Push or Ops (and in one batch sent)
    max_reply_bytes: int = 256 * 1024  # op bytes in one Push we send
    max_peers: int = 64  # peers up at once
    max_trees: int = 1_024  # trees remembered per peer (a forgotten one is eager again)
    max_queued_announcements: int = 1_024  # ids waiting to be announced, per peer
    max_missing: int = 4_096  # announced ids not yet received, tracked
    max_unknown_per_peer: int = 1_024  # of those, listing one peer as announcer
    max_announcers: int = 8  # announcers remembered per missing id
    max_seen: int = 16_384  # ids remembered as received (besides ``has``)
    max_awaiting: int = 4_096  # delivered ops awaiting the caller's verdict
    max_recent: int = 4_096  # forwarded ids kept for re-announcement


@dataclass(slots=True)
class PushCounters:
    """What the broadcast did and what it dropped (for logs and the simulator)."""

    delivered: int = 0
    duplicates: int = 0
    prunes: int = 0  # trees made lazy towards a peer (on a duplicate or a signal)
    prune_signals: int = 0  # ids announced to a peer to tell it its push was redundant
    prunes_sent: int = 0  # Prune messages (one tree for all)
    grafts_sent: int = 0
    grafts_abandoned: int = 0
    grafts_unserved: int = 0  # ids a peer grafted that we could not find
    announcements_dropped: int = 0
    missing_dropped: int = 0
    awaiting_dropped: int = 0
    trees_forgotten: int = 0
    regrafts: int = 0  # trees grafted from another peer when theirs went down


# -- actions ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``message`` to ``peer`` (in order with the other actions)."""

    peer: PeerId
    message: Message


@dataclass(frozen=True, slots=True)
class Deliver:
    """An op not seen before, from ``peer``: validate it (the replica), and call
    :meth:`Broadcast.broadcast` once it is applied. ``urgent`` is the sender's
    claim only; decide urgency from the op's kind."""

    peer: PeerId
    op_id: bytes
    op: bytes
    urgent: bool


PushAction: TypeAlias = Send | Deliver


# -- link state machine -----------------------------------------------------------


class Link(Enum):
    EAGER = "eager"  # push the tree's ops whole: a branch of the tree
    LAZY = "lazy"  # announce the tree's ops by id only


class Event(Enum):
    PUSH_NEW = "push of an op not seen before"
    PUSH_DUPLICATE = "push of an op seen shortly before"
    PUSH_REDUNDANT = "prune_after prompt duplicates in a row"
    CYCLE = "prune_after prompt duplicates in a row, in the one tree for all"
    PUSH_LATE = "push of an op seen long before"
    URGENT = "urgent push (flood)"
    OPS = "ops answering a Want"
    GRAFT_ANSWER = "push answering our graft"
    ANNOUNCED = "announcement of an op we pushed to the peer"
    GRAFT = "graft received"
    PRUNE = "prune received"


EAGER, LAZY = Link.EAGER, Link.LAZY

TRANSITIONS: dict[tuple[Link, Event], tuple[Link, bool]] = {
    # (our link to the peer for the op's tree, event): (next link, signal the peer)
    # What the peer pushes us tells us about the peer's link, not ours: a
    # duplicate from the peer proves its push redundant, not ours to it (it may
    # be our branch of the tree, and have been beaten once by another path). So
    # duplicates change nothing here; ``prune_after`` of them in a row (or any
    # after that) ask the peer, with a prune signal, to stop pushing the tree.
    **{(link, Event.PUSH_NEW): (link, False) for link in Link},
    **{(link, Event.PUSH_DUPLICATE): (link, False) for link in Link},
    **{(link, Event.PUSH_REDUNDANT): (link, True) for link in Link},
    # In one tree for all (no ``tree_of``), a duplicate shows a cycle, and the
    # link is cut both ways, as in Plumtree: the eager links stay a tree.
    **{(link, Event.CYCLE): (LAZY, True) for link in Link},
    # A late copy comes from a peer that was cut off and grafted it: the link
    # may be its only branch now, so say nothing (a redundant cycle still yields
    # a prompt duplicate where the two wavefronts meet).
    **{(link, Event.PUSH_LATE): (link, False) for link in Link},
    **{(link, Event.URGENT): (link, False) for link in Link},  # floods say nothing
    **{(link, Event.OPS): (link, False) for link in Link},
    # Our link changes on what the peer says of it: it announced an op we pushed
    # to it (it had it from elsewhere: a prune signal, or a crossing), it
    # grafted, it answered our graft (a repaired branch works both ways), or it
    # sent Prune (the older single-tree rule: every tree).
    **{(link, Event.ANNOUNCED): (LAZY, False) for link in Link},
    **{(link, Event.GRAFT): (EAGER, False) for link in Link},
    **{(link, Event.GRAFT_ANSWER): (EAGER, False) for link in Link},
    **{(link, Event.PRUNE): (LAZY, False) for link in Link},
}
"""How a peer's link for one tree changes on each event; every pair is listed."""


# -- bookkeeping ------------------------------------------------------------------


@dataclass(slots=True)
class _Missing:
    """An announced id not received yet: who announced it, when to act next."""

    announcers: deque[PeerId]
    deadline: int
    attempts: int = 0
    grafted: PeerId | None = None  # the peer last asked for it (its Push answers us)


@dataclass(slots=True)
class _Awaiting:
    """A delivered op awaiting the caller's verdict: its sender, known holders,
    and whether it came along its tree (a push, not a graft's answer or a flood)."""

    sender: PeerId
    holders: set[PeerId]
    by_tree: bool


@dataclass(slots=True)
class _Recent:
    """A forwarded op: when, its tree, the peers known to hold it, and the peers
    it was pushed to (an announcement from one of those is a prune signal)."""

    first_ms: int
    tree: bytes
    holders: set[PeerId]
    pushed: set[PeerId] = field(default_factory=set)


@dataclass(slots=True)
class _Tree:
    """One tree's link towards one peer, and what the peer does for that tree."""

    link: Link
    duplicates: int = 0  # prompt duplicates in a row from the peer
    redundant: bool = False  # we asked the peer to stop pushing this tree
    supplied_ms: int | None = None  # when the peer last pushed us a new op of the tree


@dataclass(slots=True)
class _Peer:
    """What the broadcast keeps about one connected peer."""

    default: Link = EAGER  # the link of a tree not remembered
    trees: OrderedDict[bytes, _Tree] = field(default_factory=OrderedDict)  # oldest first
    unknown: int = 0  # missing entries listing the peer as announcer
    announce: OrderedDict[bytes, None] = field(default_factory=OrderedDict)
    signals: OrderedDict[bytes, None] = field(default_factory=OrderedDict)  # prune signals
    announce_at: int | None = None
    pushes: list[bytes] = field(default_factory=list)
    push_bytes: int = 0
    push_at: int | None = None
    pushed_ms: int | None = None  # when pushes to the peer last went out


def _never(_op_id: bytes) -> bool:
    return False


def _nothing(_op_id: bytes) -> bytes | None:
    return None


def _one_tree(_op: bytes) -> bytes:
    return ONE_TREE


def _chunks(items: list[bytes], size: int) -> Iterable[tuple[bytes, ...]]:
    for start in range(0, len(items), size):
        yield tuple(items[start : start + size])


class Broadcast:
    """The push protocol of one node over all its connected peers.

    ``has(id)`` says whether the replica already holds an op (applied,
    pending, held or rejected); ``get(id)`` returns an op's signed bytes, to
    answer grafts; ``tree_of(op)`` names the tree an op's bytes travel along
    (the same on every node; default: one tree for all). All are pure look-ups.
    """

    def __init__(
        self,
        *,
        has: Callable[[bytes], bool] = _never,
        get: Callable[[bytes], bytes | None] = _nothing,
        tree_of: Callable[[bytes], bytes] = _one_tree,
        rng: Rng | None = None,
        limits: PushLimits | None = None,
    ) -> None:
        self.limits = limits if limits is not None else PushLimits()
        # Nodes cut off together wait different times before grafting, so the
        # first graft usually reconnects them all and the others are not sent.
        jitter = int(rng.random() * self.limits.graft_jitter_ms) if rng is not None else 0
        self._graft_delay = self.limits.ihave_timeout_ms + jitter
        self.counters = PushCounters()
        self._has = has
        self._get = get
        self._tree_of = tree_of
        self._peers: dict[PeerId, _Peer] = {}
        # id -> when its first copy came along its tree (None: another way, or long ago)
        self._seen: OrderedDict[bytes, int | None] = OrderedDict()
        # tree -> the peer that last pushed us a new op of it, and that op's id
        self._parents: OrderedDict[bytes, tuple[PeerId, bytes]] = OrderedDict()
        # tree -> an op id to graft it with, and from whom (None: any lazy peer)
        self._orphans: OrderedDict[bytes, tuple[bytes, PeerId | None]] = OrderedDict()
        self._repaired: OrderedDict[bytes, int] = OrderedDict()  # tree -> last graft by pull
        self._awaiting: OrderedDict[bytes, _Awaiting] = OrderedDict()
        self._recent: OrderedDict[bytes, _Recent] = OrderedDict()
        # Missing ids before their first graft, then after: each in deadline
        # order, because each phase adds one constant timeout to a rising now.
        self._waiting: OrderedDict[bytes, _Missing] = OrderedDict()
        self._grafting: OrderedDict[bytes, _Missing] = OrderedDict()
        self._reannounce_at: int | None = None

    # -- views ----------------------------------------------------------------

    @property
    def peers(self) -> frozenset[PeerId]:
        return frozenset(self._peers)

    @property
    def eager(self) -> frozenset[PeerId]:
        """Peers some remembered tree pushes to (or, if none is remembered,
        the peers a new tree would push to)."""
        return frozenset(p for p, state in self._peers.items() if _eager_somewhere(state))

    @property
    def lazy(self) -> frozenset[PeerId]:
        """Peers every remembered tree only announces to."""
        return self.peers - self.eager

    def eager_for(self, tree: bytes) -> frozenset[PeerId]:
        """Peers the ops of ``tree`` are pushed to."""
        return frozenset(p for p, state in self._peers.items() if _link(state, tree) is EAGER)

    @property
    def missing(self) -> int:
        """How many announced ids are awaited."""
        return len(self._waiting) + len(self._grafting)

    # -- peers ----------------------------------------------------------------

    def peer_up(self, peer: PeerId) -> None:
        """A peer joined this node's active view: every tree starts eager."""
        if peer in self._peers:
            raise LocalProtocolError(f"peer {peer.hex()[:16]} is already up")
        if len(self._peers) >= self.limits.max_peers:
            raise LocalProtocolError(f"more than {self.limits.max_peers} peers up")
        self._peers[peer] = _Peer()

    def peer_down(self, peer: PeerId) -> None:
        """A peer left the active view (or its connection died)."""
        if self._peers.pop(peer, None) is None:
            raise LocalProtocolError(f"peer {peer.hex()[:16]} is not up")
        for tree, (parent, last) in list(self._parents.items()):
            if parent == peer:
                # The branch that brought us this tree is gone: graft another
                # at the next timer, rather than wait for an announcement.
                del self._parents[tree]
                if tree != ONE_TREE:
                    self._orphans[tree] = (last, None)
        while len(self._orphans) > self.limits.max_trees:
            self._orphans.popitem(last=False)
        for entry in (*self._waiting.values(), *self._grafting.values()):
            if peer in entry.announcers:
                entry.announcers.remove(peer)

    # -- inputs ---------------------------------------------------------------

    def broadcast(
        self,
        op_id: bytes,
        op: bytes,
        now_ms: int,
        urgent: bool = False,
        *,
        pulled: bool = False,
        via: PeerId | None = None,
    ) -> list[PushAction]:
        """Forward an op this node authored or has just applied.

        Peers eager for its tree get it whole, the others by id a little later;
        an urgent op goes whole to every peer at once. Calling it again for the
        same op does nothing.

        ``pulled``: the op came another way than this broadcast's :meth:`receive`
        (the caller fetched it: a dep, a reconciliation). It is still pushed down
        its tree (the peers below may need it), but not to the peer the tree
        comes from; the copies it meets say nothing about which links are
        redundant, and prune none. ``via``: the peer it was pulled from. An op
        we had to pull should have come by push: our branch of its tree may be
        gone, so we graft the tree from that peer (at most once per tree every
        ``late_after_ms``).
        """
        if len(op_id) != ID_BYTES:
            raise LocalProtocolError(f"an op id has {ID_BYTES} bytes, not {len(op_id)}")
        if op_id in self._recent:
            return []
        awaiting = self._awaiting.pop(op_id, None)
        sender = awaiting.sender if awaiting is not None else None
        holders = awaiting.holders if awaiting is not None else set()
        by_tree = awaiting.by_tree if awaiting is not None else not pulled
        holders |= self._forget_missing(op_id)
        self._see(op_id, now_ms if by_tree else None)
        tree = self._tree_of(op)
        recent = self._remember_recent(op_id, now_ms, tree, holders)
        parent = None if by_tree else self._parents.get(tree, (None, b""))[0]
        if awaiting is None and pulled and via in self._peers and tree != ONE_TREE:
            self._repair(tree, op_id, via, now_ms)
        # Our own op goes to every peer when trees are per author: we are its
        # root, unless the author writes from another node too (an author on
        # two devices, or equivocating), whose tree our neighbours may have
        # asked us to stop pushing. (In one tree for all, we are no root.)
        own = awaiting is None and not pulled and tree != ONE_TREE
        actions: list[PushAction] = []
        for peer, state in self._peers.items():
            if peer in (sender, parent) or peer in holders:
                continue
            if urgent:
                actions.append(Send(peer, Push((op,), urgent=True)))
            elif own or _link(state, tree) is EAGER:
                recent.pushed.add(peer)
                actions += self._queue_push(peer, state, op, now_ms)
            elif not self._supplies(state, tree, now_ms):
                actions += self._announce(peer, state, op_id, now_ms)
        return actions

    def known(self, op_id: bytes) -> None:
        """The replica got this op another way (pull): stop waiting for it,
        and do not push it (peers that lack it will pull it too)."""
        self._see(op_id, None)
        self._forget_missing(op_id)

    def receive(self, peer: PeerId, message: Message, now_ms: int) -> list[PushAction]:
        """Take a Push, Ops, IHave, Graft or Prune from a peer that is up.

        Raises :class:`RemoteProtocolError` if the message breaks a limit (close
        that peer's session), :class:`LocalProtocolError` if the peer is not
        up or the message is not one of the push family.
        """
        state = self._peers.get(peer)
        if state is None:
            raise LocalProtocolError(f"message from peer {peer.hex()[:16]}, which is not up")
        if isinstance(message, Push):
            return self._on_ops(peer, state, message.ops, now_ms, urgent=message.urgent, push=True)
        if isinstance(message, Ops):
            return self._on_ops(peer, state, message.ops, now_ms, urgent=False, push=False)
        if isinstance(message, IHave):
            self._on_ihave(peer, state, message.ids, now_ms)
            return []
        if isinstance(message, Graft):
            return self._on_graft(peer, state, message.ids)
        if isinstance(message, Prune):
            state.default = LAZY
            for tree in list(state.trees):
                self._transition(state, tree, Event.PRUNE)
            return []
        raise LocalProtocolError(f"{type(message).__name__} is not a push message")

    # -- timers ---------------------------------------------------------------

    def next_deadline(self) -> int | None:
        """When :meth:`handle_timer` must next be called, or None."""
        deadlines = []
        for state in self._peers.values():
            if state.announce_at is not None:
                deadlines.append(state.announce_at)
            if state.push_at is not None:
                deadlines.append(state.push_at)
        for phase in (self._waiting, self._grafting):
            if phase:
                deadlines.append(next(iter(phase.values())).deadline)
        if self._reannounce_at is not None:
            deadlines.append(self._reannounce_at)
        if self._orphans and self._peers:
            deadlines.append(0)  # at once
        return min(deadlines, default=None)

    def handle_timer(self, now_ms: int) -> list[PushAction]:
        """Send due pushes and announcements, graft ids overdue, re-announce."""
        actions: list[PushAction] = []
        if self._reannounce_at is not None and self._reannounce_at <= now_ms:
            self._reannounce(now_ms)
        for peer, state in self._peers.items():
            if state.push_at is not None and state.push_at <= now_ms:
                actions += self._flush_pushes(peer, state)
            if state.announce_at is not None and state.announce_at <= now_ms:
                actions += self._flush_announcements(peer, state, now_ms)
        grafts: dict[PeerId, list[bytes]] = {}
        self._regraft(now_ms, grafts)
        for phase in (self._waiting, self._grafting):
            while phase and next(iter(phase.values())).deadline <= now_ms:
                missing_id, entry = phase.popitem(last=False)
                self._graft(missing_id, entry, now_ms, grafts)
        for peer, ids in grafts.items():
            self.counters.grafts_sent += 1
            actions += [Send(peer, Graft(chunk)) for chunk in _chunks(ids, self._max_ids)]
        return actions

    # -- receiving ------------------------------------------------------------

    @property
    def _max_ids(self) -> int:
        return min(self.limits.max_ihave_ids, self.limits.max_graft_ids)

    def _tree(self, state: _Peer, tree: bytes) -> _Tree:
        """The peer's entry for ``tree``, remembered from now on (bounded)."""
        entry = state.trees.get(tree)
        if entry is None:
            entry = state.trees[tree] = _Tree(state.default)
            if len(state.trees) > self.limits.max_trees:
                state.trees.popitem(last=False)
                self.counters.trees_forgotten += 1
        else:
            state.trees.move_to_end(tree)
        return entry

    def _transition(self, state: _Peer, tree: bytes, event: Event) -> bool:
        """Apply :data:`TRANSITIONS`; True if the peer must be sent a prune signal."""
        entry = self._tree(state, tree)
        link, signal = TRANSITIONS[entry.link, event]
        if link is LAZY and entry.link is EAGER:
            self.counters.prunes += 1
        entry.link = link
        return signal

    def _on_ops(
        self,
        peer: PeerId,
        state: _Peer,
        ops: tuple[bytes, ...],
        now_ms: int,
        *,
        urgent: bool,
        push: bool,
    ) -> list[PushAction]:
        if len(ops) > self.limits.max_push_ops:
            raise RemoteProtocolError(
                f"{len(ops)} ops in one message (limit {self.limits.max_push_ops})"
            )
        actions: list[PushAction] = []
        prune = False
        for op in ops:
            op_id = compute_op_id(op)
            tree = self._tree_of(op)
            grafting = self._grafting.get(op_id)
            answer = push and grafting is not None and grafting.grafted == peer
            new = not self._knows(op_id)
            if new:
                by_tree = push and not urgent and not answer
                actions.append(
                    self._take(peer, state, op_id, op, now_ms, urgent=urgent, by_tree=by_tree)
                )
            else:
                self.counters.duplicates += 1
                self._note_holder(op_id, peer)
                if answer:
                    self._grafting.pop(op_id, None)  # a regraft's answer
            if urgent:
                event = Event.URGENT
            elif answer:  # a graft's answer is no redundant push
                event = self._supplied(state, tree, now_ms, Event.GRAFT_ANSWER)
            elif push:
                event = (
                    self._supplied(state, tree, now_ms, Event.PUSH_NEW)
                    if new
                    else self._duplicate(peer, state, tree, op_id, now_ms)
                )
            else:
                event = Event.OPS
            if not self._transition(state, tree, event):
                continue
            if tree != ONE_TREE:
                actions += self._signal(peer, state, op_id, now_ms)
            elif not prune:
                prune = True  # one tree: Plumtree's own Prune, at once
                self.counters.prunes_sent += 1
                actions.append(Send(peer, Prune()))
        return actions

    def _take(
        self,
        peer: PeerId,
        state: _Peer,
        op_id: bytes,
        op: bytes,
        now_ms: int,
        *,
        urgent: bool,
        by_tree: bool,
    ) -> Deliver:
        """A new op: deliver it, and note the peer as its tree's branch."""
        deliver = self._accept(peer, op_id, op, now_ms, urgent=urgent, by_tree=by_tree)
        tree = self._tree_of(op)
        entry = state.trees.get(tree)
        if by_tree and (entry is None or not entry.redundant):
            # (A peer we asked to stop, whose push was in flight, is none.)
            self._remember_parent(tree, peer, deliver.op_id)
        return deliver

    def _remember_parent(self, tree: bytes, peer: PeerId, op_id: bytes) -> None:
        self._parents[tree] = (peer, op_id)
        self._parents.move_to_end(tree)
        self._orphans.pop(tree, None)
        if len(self._parents) > self.limits.max_trees:
            self._parents.popitem(last=False)

    def _supplied(self, state: _Peer, tree: bytes, now_ms: int, event: Event) -> Event:
        """The peer brought us a new op of the tree (pushed, or answering our graft)."""
        entry = self._tree(state, tree)
        entry.duplicates = 0
        if event is Event.GRAFT_ANSWER:
            entry.redundant = False  # our branch again
        if not entry.redundant:  # a peer we asked to stop is no branch of ours
            entry.supplied_ms = now_ms
        return event

    def _supplies(self, state: _Peer, tree: bytes, now_ms: int) -> bool:
        """Whether the peer pushes us this tree's ops (so it has them).

        Announcing one to it anyway would read, to the peer, as a prune signal
        whenever it had pushed us that op too and its copy was merely slower
        than another: a prune that bypasses ``prune_after``."""
        if tree == ONE_TREE:
            return False  # one tree for all: a peer bringing us ops may lack ours
        entry = state.trees.get(tree)
        return (
            entry is not None
            and entry.supplied_ms is not None
            and now_ms - entry.supplied_ms <= self.limits.supplier_window_ms
        )

    def _duplicate(
        self, peer: PeerId, state: _Peer, tree: bytes, op_id: bytes, now_ms: int
    ) -> Event:
        """Classify a pushed duplicate: late, prompt, or the last straw. A copy
        of an op whose first copy did not come along its tree is "late" too: it
        says nothing about which branch is redundant."""
        first = self._seen.get(op_id)
        if first is None or now_ms - first > self.limits.late_after_ms:
            return Event.PUSH_LATE
        entry = self._tree(state, tree)
        entry.duplicates += 1
        if not entry.redundant and entry.duplicates < self.limits.prune_after:
            return Event.PUSH_DUPLICATE
        entry.duplicates = 0
        if tree == ONE_TREE:
            entry.redundant = True
            return Event.CYCLE
        parent = self._parents.get(tree)
        if not entry.redundant and (parent is None or parent[0] == peer):
            # Never ask the peer that brought us this tree's latest op to stop:
            # it is our branch (the op reached it before us, so not through
            # us). Ties between two branches go either way, and one peer pushes
            # on while our signal to the other is in flight: asking every peer
            # that ever brought an op would cut us off.
            return Event.PUSH_DUPLICATE
        entry.redundant = True
        return Event.PUSH_REDUNDANT

    def _accept(
        self, peer: PeerId, op_id: bytes, op: bytes, now_ms: int, *, urgent: bool, by_tree: bool
    ) -> Deliver:
        holders = self._forget_missing(op_id) | {peer}
        self._see(op_id, now_ms if by_tree else None)
        if len(self._awaiting) >= self.limits.max_awaiting:
            self._awaiting.popitem(last=False)
            self.counters.awaiting_dropped += 1
        self._awaiting[op_id] = _Awaiting(peer, holders, by_tree)
        self.counters.delivered += 1
        return Deliver(peer, op_id, op, urgent)

    def _on_ihave(self, peer: PeerId, state: _Peer, ids: tuple[bytes, ...], now_ms: int) -> None:
        if len(ids) > self.limits.max_ihave_ids:
            raise RemoteProtocolError(
                f"{len(ids)} ids in one IHave (limit {self.limits.max_ihave_ids})"
            )
        for op_id in ids:
            self._check_id(op_id)
            recent = self._recent.get(op_id)
            if recent is not None and recent.tree != ONE_TREE and peer in recent.pushed:
                # The peer had it from elsewhere: our push of this tree is redundant.
                self._transition(state, recent.tree, Event.ANNOUNCED)
            if self._note_holder(op_id, peer) or self._knows(op_id):
                continue
            entry = self._waiting.get(op_id) or self._grafting.get(op_id)
            if entry is not None and (
                peer in entry.announcers or len(entry.announcers) >= self.limits.max_announcers
            ):
                continue
            if state.unknown >= self.limits.max_unknown_per_peer:
                raise RemoteProtocolError(
                    f"peer announced more than {self.limits.max_unknown_per_peer} ops"
                    " it has not delivered"
                )
            if entry is None:
                entry = self._track_missing(op_id, now_ms)
            entry.announcers.append(peer)
            state.unknown += 1

    def _on_graft(self, peer: PeerId, state: _Peer, ids: tuple[bytes, ...]) -> list[PushAction]:
        if len(ids) > self.limits.max_graft_ids:
            raise RemoteProtocolError(
                f"{len(ids)} ids in one Graft (limit {self.limits.max_graft_ids})"
            )
        actions: list[PushAction] = []
        batch: list[bytes] = []
        size = 0
        for op_id in ids:
            self._check_id(op_id)
            op = self._get(op_id)
            if op is None:
                self.counters.grafts_unserved += 1
                continue
            self._transition(state, self._tree_of(op), Event.GRAFT)
            if batch and (
                size + len(op) > self.limits.max_reply_bytes
                or len(batch) >= self.limits.max_push_ops
            ):
                actions.append(Send(peer, Push(tuple(batch))))
                batch, size = [], 0
            batch.append(op)
            size += len(op)
        if batch:
            actions.append(Send(peer, Push(tuple(batch))))
        return actions

    @staticmethod
    def _check_id(op_id: bytes) -> None:
        if len(op_id) != ID_BYTES:
            raise RemoteProtocolError(f"an op id of {len(op_id)} bytes (ids have {ID_BYTES})")

    # -- bookkeeping ----------------------------------------------------------

    def _knows(self, op_id: bytes) -> bool:
        return (
            op_id in self._seen
            or op_id in self._awaiting
            or op_id in self._recent
            or self._has(op_id)
        )

    def _worth_announcing(self, peer: PeerId, state: _Peer, op_id: bytes, now_ms: int) -> bool:
        """Whether ``peer`` may lack an op we forwarded (as far as we know)."""
        recent = self._recent.get(op_id)
        if recent is None:
            return True
        return peer not in recent.holders and not self._supplies(state, recent.tree, now_ms)

    def _note_holder(self, op_id: bytes, peer: PeerId) -> bool:
        """Record that ``peer`` holds an op we hold; False if we do not hold it."""
        entry = self._recent.get(op_id) or self._awaiting.get(op_id)
        if entry is None:
            return False
        if len(entry.holders) < self.limits.max_peers:
            entry.holders.add(peer)
        return True

    def _see(self, op_id: bytes, now_ms: int | None) -> None:
        """Remember that we hold ``op_id`` since ``now_ms`` (None: since long)."""
        if op_id not in self._seen:
            self._seen[op_id] = now_ms
            if len(self._seen) > self.limits.max_seen:
                self._seen.popitem(last=False)

    def _remember_recent(
        self, op_id: bytes, now_ms: int, tree: bytes, holders: set[PeerId]
    ) -> _Recent:
        recent = self._recent[op_id] = _Recent(now_ms, tree, holders)
        if len(self._recent) > self.limits.max_recent:
            self._recent.popitem(last=False)
        if self._reannounce_at is None and self.limits.reannounce_interval_ms > 0:
            self._reannounce_at = now_ms + self.limits.reannounce_interval_ms
        return recent

    def _track_missing(self, op_id: bytes, now_ms: int) -> _Missing:
        if self.missing >= self.limits.max_missing:
            oldest = self._grafting if self._grafting else self._waiting
            _, dropped = oldest.popitem(last=False)
            self._release(dropped)
            self.counters.missing_dropped += 1
        entry = _Missing(deque(), now_ms + self._graft_delay)
        self._waiting[op_id] = entry
        return entry

    def _forget_missing(self, op_id: bytes) -> set[PeerId]:
        """Stop waiting for ``op_id``; return the peers that announced it."""
        entry = self._waiting.pop(op_id, None) or self._grafting.pop(op_id, None)
        if entry is None:
            return set()
        self._release(entry)
        return set(entry.announcers)

    def _release(self, entry: _Missing) -> None:
        for peer in entry.announcers:
            self._peers[peer].unknown -= 1
        entry.announcers.clear()

    # -- sending --------------------------------------------------------------

    def _queue_push(self, peer: PeerId, state: _Peer, op: bytes, now_ms: int) -> list[PushAction]:
        delay = self.limits.push_delay_ms
        if delay <= 0:
            return [Send(peer, Push((op,)))]
        if state.push_at is None and (state.pushed_ms is None or now_ms - state.pushed_ms >= delay):
            # Nothing sent to the peer lately: this op goes at once, and the
            # ones that follow it within the delay go together after it.
            state.pushed_ms = now_ms
            return [Send(peer, Push((op,)))]
        actions: list[PushAction] = []
        if state.pushes and (
            state.push_bytes + len(op) > self.limits.max_reply_bytes
            or len(state.pushes) >= self.limits.max_push_ops
        ):
            actions = self._flush_pushes(peer, state)
        state.pushes.append(op)
        state.push_bytes += len(op)
        if state.push_at is None:
            last = state.pushed_ms if state.pushed_ms is not None else now_ms
            state.push_at = max(now_ms, last + delay)
        return actions

    def _flush_pushes(self, peer: PeerId, state: _Peer) -> list[PushAction]:
        if state.push_at is not None:
            state.pushed_ms = state.push_at
        ops = tuple(state.pushes)
        state.pushes.clear()
        state.push_bytes = 0
        state.push_at = None
        return [Send(peer, Push(ops))] if ops else []

    def _announce(self, peer: PeerId, state: _Peer, op_id: bytes, now_ms: int) -> list[PushAction]:
        return self._enqueue(peer, state, state.announce, op_id, now_ms)

    def _signal(self, peer: PeerId, state: _Peer, op_id: bytes, now_ms: int) -> list[PushAction]:
        """Tell the peer, in our next IHave, that its push of ``op_id`` was redundant."""
        if op_id in state.signals:
            return []
        self.counters.prune_signals += 1
        actions = self._enqueue(peer, state, state.signals, op_id, now_ms)
        soon = now_ms + self.limits.prune_delay_ms
        if state.announce_at is not None and state.announce_at > soon:
            state.announce_at = soon  # every push until then is wasted
        return actions

    def _enqueue(
        self,
        peer: PeerId,
        state: _Peer,
        queue: OrderedDict[bytes, None],
        op_id: bytes,
        now_ms: int,
    ) -> list[PushAction]:
        queue[op_id] = None
        if len(queue) > self.limits.max_queued_announcements:
            queue.popitem(last=False)
            self.counters.announcements_dropped += 1
        if state.announce_at is None:
            state.announce_at = now_ms + self.limits.ihave_delay_ms
        if len(state.announce) + len(state.signals) >= self.limits.max_ihave_ids:
            return self._flush_announcements(peer, state, now_ms)
        return []

    def _flush_announcements(self, peer: PeerId, state: _Peer, now_ms: int) -> list[PushAction]:
        # Leave out what the peer announced or pushed to us while the batch
        # waited, and the trees it became our branch of; prune signals go in
        # whatever the peer holds (that is their point).
        ids = dict.fromkeys(
            i for i in state.announce if self._worth_announcing(peer, state, i, now_ms)
        )
        ids.update(state.signals)
        state.announce.clear()
        state.signals.clear()
        state.announce_at = None
        return [Send(peer, IHave(chunk)) for chunk in _chunks(list(ids), self.limits.max_ihave_ids)]

    def _graft(
        self, op_id: bytes, entry: _Missing, now_ms: int, grafts: dict[PeerId, list[bytes]]
    ) -> None:
        """The op announced as ``op_id`` is overdue: graft the next announcer."""
        if not entry.announcers or entry.attempts >= self.limits.max_graft_attempts:
            self._release(entry)
            self.counters.grafts_abandoned += 1
            return
        peer = entry.announcers[0]
        entry.announcers.rotate(-1)  # a further timeout tries the next one
        entry.attempts += 1
        entry.grafted = peer
        entry.deadline = now_ms + self.limits.graft_timeout_ms
        self._grafting[op_id] = entry
        grafts.setdefault(peer, []).append(op_id)

    def _repair(self, tree: bytes, op_id: bytes, via: PeerId, now_ms: int) -> None:
        last = self._repaired.get(tree)
        if last is not None and now_ms - last < self.limits.late_after_ms:
            return
        self._repaired[tree] = now_ms
        self._repaired.move_to_end(tree)
        if len(self._repaired) > self.limits.max_trees:
            self._repaired.popitem(last=False)
        self._orphans[tree] = (op_id, via)
        self._orphans.move_to_end(tree)
        while len(self._orphans) > self.limits.max_trees:
            self._orphans.popitem(last=False)

    def _regraft(self, now_ms: int, grafts: dict[PeerId, list[bytes]]) -> None:
        """Graft each orphaned tree from a peer we do not push it to (so not
        one below us in it), naming the last op it brought: the answer is that
        op again, and the tree is eager from that peer on."""
        while self._orphans and self._peers:
            tree, (op_id, peer) = self._orphans.popitem(last=False)
            if peer is None or peer not in self._peers:
                lazy = [p for p, state in self._peers.items() if _link(state, tree) is LAZY]
                if not lazy:
                    continue  # every peer is below us: wait for announcements
                peer = lazy[0]
            if op_id in self._waiting or op_id in self._grafting:
                continue
            self._grafting[op_id] = _Missing(
                deque(), now_ms + self.limits.graft_timeout_ms, attempts=1, grafted=peer
            )
            self.counters.regrafts += 1
            grafts.setdefault(peer, []).append(op_id)

    def _reannounce(self, now_ms: int) -> None:
        """Queue recent ids again for the peers not known to hold them (they go
        with the next announcement to each peer)."""
        oldest = now_ms - self.limits.reannounce_horizon_ms
        # Ids forwarded just now may still be on their way from a peer; naming
        # them to it would read as a prune signal.
        newest = now_ms - self.limits.late_after_ms
        per_peer: dict[PeerId, list[bytes]] = {peer: [] for peer in self._peers}
        for op_id, recent in reversed(self._recent.items()):
            if recent.first_ms < oldest:
                break
            if recent.first_ms > newest:
                continue
            for peer, ids in per_peer.items():
                if (
                    peer not in recent.holders
                    and len(ids) < self.limits.max_ihave_ids
                    and not self._supplies(self._peers[peer], recent.tree, now_ms)
                ):
                    ids.append(op_id)
        last = next(reversed(self._recent.values()), None)
        if last is not None and last.first_ms + self.limits.reannounce_horizon_ms > now_ms:
            self._reannounce_at = now_ms + self.limits.reannounce_interval_ms
        else:
            self._reannounce_at = None
        for peer, ids in per_peer.items():
            state = self._peers[peer]
            for op_id in reversed(ids):  # oldest first, as they were forwarded
                state.announce[op_id] = None
            while len(state.announce) > self.limits.max_queued_announcements:
                state.announce.popitem(last=False)
                self.counters.announcements_dropped += 1
            if ids and state.announce_at is None:
                state.announce_at = now_ms


def _link(state: _Peer, tree: bytes) -> Link:
    entry = state.trees.get(tree)
    return entry.link if entry is not None else state.default


def _eager_somewhere(state: _Peer) -> bool:
    if not state.trees:
        return state.default is EAGER
    return any(entry.link is EAGER for entry in state.trees.values())
