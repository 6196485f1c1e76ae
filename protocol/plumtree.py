"""Push: epidemic broadcast along a spanning tree, in the spirit of Plumtree.

Theory of operation. One :class:`Broadcast` per node (not per peer) sees every
connected peer and keeps one bit of state for each: the link is *eager* or
*lazy* (Leitão, Pereira and Rodrigues, "Epidemic Broadcast Trees", 2007).
A new op is pushed whole (:class:`Push`) to the eager peers and announced by
id (:class:`IHave`, batched for ``ihave_delay_ms``) to the lazy ones. All
links start eager, so the first ops flood; a node that receives an op it
already has answers :class:`Prune` and both ends make that link lazy. What
remains eager is a spanning tree: in a stable network each op then costs
close to n - 1 payload sends, whoever broadcasts it.

When a node hears of an id (IHave) and the op itself does not follow within
``ihave_timeout_ms``, it sends :class:`Graft` to the announcer: the announcer
answers with the op (a :class:`Push`, which the grafting node takes as the
answer, not as a redundant push) and both ends make the link eager, which
repairs the tree where a peer died. Another ``graft_timeout_ms`` without the
op tries the next announcer, up to ``max_graft_attempts``. As a safety net for
lost messages, every ``reannounce_interval_ms`` each node announces again the
ids it forwarded in the last ``reannounce_horizon_ms`` to the peers not known
to hold them (older gaps are the pull protocol's job).

Validation before forwarding. :meth:`Broadcast.receive` never forwards an op:
it returns :class:`Deliver` for each op not seen before. The caller (the
replica) validates it and calls :meth:`Broadcast.broadcast` only once the op
is applied (for an op that waited for its deps, when it is released); an op
the replica rejects is never forwarded, so a forgery dies at its first honest
hop. The caller also calls :meth:`broadcast` for its own new ops, and
:meth:`known` for ops that arrived another way (pull), which are not pushed.

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


class Rng(Protocol):
    """The randomness a node is given (``random.Random`` fits)."""

    def random(self) -> float: ...


@dataclass(frozen=True, slots=True)
class PushLimits:
    """Timers and bounds of the push protocol; the defaults suit internet links."""

    ihave_delay_ms: int = 50  # batch announcements to one peer this long
    ihave_timeout_ms: int = 1_000  # announced but not received: graft after this ...
    graft_jitter_ms: int = 1_000  # ... plus a per-node delay drawn below this
    graft_timeout_ms: int = 500  # graft unanswered: try the next announcer after this
    late_after_ms: int = 500  # a duplicate this long after the first copy prunes nothing
    prune_after: int = 2  # prompt duplicates in a row from an eager peer before pruning it
    max_graft_attempts: int = 4  # then give up (the pull protocol will fetch it)
    reannounce_interval_ms: int = 4_000  # period of the re-announcement safety net
    reannounce_horizon_ms: int = 6_000  # ids forwarded this recently are re-announced
    max_ihave_ids: int = 256  # ids in one IHave, either way
    max_graft_ids: int = 256  # ids in one incoming Graft
    max_push_ops: int = 64  # ops in one incoming Push or Ops
    max_reply_bytes: int = 256 * 1024  # op bytes in one Push answering a Graft
    max_peers: int = 64  # peers up at once
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
    prunes_sent: int = 0
    grafts_sent: int = 0
    grafts_abandoned: int = 0
    grafts_unserved: int = 0  # ids a peer grafted that we could not find
    announcements_dropped: int = 0
    missing_dropped: int = 0
    awaiting_dropped: int = 0


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
    EAGER = "eager"  # push ops whole: a branch of the tree
    LAZY = "lazy"  # announce ids only


class Event(Enum):
    PUSH_NEW = "push of an op not seen before"
    PUSH_DUPLICATE = "push of an op seen shortly before"
    PUSH_REDUNDANT = "prune_after prompt duplicates in a row"
    PUSH_LATE = "push of an op seen long before"
    URGENT = "urgent push (flood)"
    OPS = "ops answering a graft"
    IHAVE = "announcement"
    GRAFT = "graft received"
    PRUNE = "prune received"
    GRAFT_SENT = "graft sent"


EAGER, LAZY = Link.EAGER, Link.LAZY

TRANSITIONS: dict[tuple[Link, Event], tuple[Link, bool]] = {
    # (link, event): (next link, answer with Prune)
    (EAGER, Event.PUSH_NEW): (EAGER, False),
    (LAZY, Event.PUSH_NEW): (EAGER, False),  # the sender keeps us eager: so do we
    (EAGER, Event.PUSH_DUPLICATE): (EAGER, False),  # perhaps a redundant branch: wait
    (EAGER, Event.PUSH_REDUNDANT): (LAZY, True),  # a redundant branch: cut it
    (LAZY, Event.PUSH_REDUNDANT): (LAZY, True),
    (LAZY, Event.PUSH_DUPLICATE): (LAZY, True),  # our Prune was lost or crossed
    # A late copy comes from a peer that was cut off and grafted it: the link
    # may be its only branch now, so keep it (a redundant cycle still yields a
    # prompt duplicate where the two wavefronts meet).
    (EAGER, Event.PUSH_LATE): (EAGER, False),
    (LAZY, Event.PUSH_LATE): (LAZY, True),
    (EAGER, Event.URGENT): (EAGER, False),  # floods say nothing about the tree
    (LAZY, Event.URGENT): (LAZY, False),
    (EAGER, Event.OPS): (EAGER, False),
    (LAZY, Event.OPS): (LAZY, False),
    (EAGER, Event.IHAVE): (EAGER, False),
    (LAZY, Event.IHAVE): (LAZY, False),
    (EAGER, Event.GRAFT): (EAGER, False),
    (LAZY, Event.GRAFT): (EAGER, False),  # the peer repairs the tree through us
    (EAGER, Event.PRUNE): (LAZY, False),
    (LAZY, Event.PRUNE): (LAZY, False),
    (EAGER, Event.GRAFT_SENT): (EAGER, False),
    (LAZY, Event.GRAFT_SENT): (EAGER, False),
}
"""How a link changes on each event; every pair is listed."""


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
    """A delivered op awaiting the caller's verdict: its sender, known holders."""

    sender: PeerId
    holders: set[PeerId]


@dataclass(slots=True)
class _Recent:
    """A forwarded op: when, and which peers are known to hold it."""

    first_ms: int
    holders: set[PeerId]


@dataclass(slots=True)
class _Queue:
    """Ids waiting to be announced to one peer, and when to send them."""

    ids: OrderedDict[bytes, None] = field(default_factory=OrderedDict)
    deadline: int | None = None


def _never(_op_id: bytes) -> bool:
    return False


def _nothing(_op_id: bytes) -> bytes | None:
    return None


def _chunks(items: list[bytes], size: int) -> Iterable[tuple[bytes, ...]]:
    for start in range(0, len(items), size):
        yield tuple(items[start : start + size])


class Broadcast:
    """The push protocol of one node over all its connected peers.

    ``has(id)`` says whether the replica already holds an op (applied,
    pending, held or rejected); ``get(id)`` returns an op's signed bytes, to
    answer grafts. Both are pure look-ups into the replica.
    """

    def __init__(
        self,
        *,
        has: Callable[[bytes], bool] = _never,
        get: Callable[[bytes], bytes | None] = _nothing,
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
        self._links: dict[PeerId, Link] = {}
        self._queues: dict[PeerId, _Queue] = {}
        self._unknown: dict[PeerId, int] = {}  # missing entries listing the peer
        self._duplicates: dict[PeerId, int] = {}  # prompt duplicates in a row, per peer
        self._seen: OrderedDict[bytes, int | None] = OrderedDict()  # id -> first seen
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
        return frozenset(self._links)

    @property
    def eager(self) -> frozenset[PeerId]:
        return frozenset(p for p, link in self._links.items() if link is EAGER)

    @property
    def lazy(self) -> frozenset[PeerId]:
        return frozenset(p for p, link in self._links.items() if link is LAZY)

    @property
    def missing(self) -> int:
        """How many announced ids are awaited."""
        return len(self._waiting) + len(self._grafting)

    # -- peers ----------------------------------------------------------------

    def peer_up(self, peer: PeerId) -> None:
        """A peer joined this node's active view: its link starts eager."""
        if peer in self._links:
            raise LocalProtocolError(f"peer {peer.hex()[:16]} is already up")
        if len(self._links) >= self.limits.max_peers:
            raise LocalProtocolError(f"more than {self.limits.max_peers} peers up")
        self._links[peer] = EAGER
        self._unknown[peer] = 0

    def peer_down(self, peer: PeerId) -> None:
        """A peer left the active view (or its connection died)."""
        if self._links.pop(peer, None) is None:
            raise LocalProtocolError(f"peer {peer.hex()[:16]} is not up")
        self._queues.pop(peer, None)
        self._unknown.pop(peer, None)
        for entry in (*self._waiting.values(), *self._grafting.values()):
            if peer in entry.announcers:
                entry.announcers.remove(peer)

    # -- inputs ---------------------------------------------------------------

    def broadcast(
        self, op_id: bytes, op: bytes, now_ms: int, urgent: bool = False
    ) -> list[PushAction]:
        """Forward an op this node authored or has just applied.

        Eager peers get it whole, lazy peers by id a little later; an urgent op
        goes whole to every peer. Calling it again for the same op does nothing.
        """
        if len(op_id) != ID_BYTES:
            raise LocalProtocolError(f"an op id has {ID_BYTES} bytes, not {len(op_id)}")
        if op_id in self._recent:
            return []
        awaiting = self._awaiting.pop(op_id, None)
        sender = awaiting.sender if awaiting is not None else None
        holders = awaiting.holders if awaiting is not None else set()
        holders |= self._forget_missing(op_id)
        self._see(op_id, now_ms)
        self._remember_recent(op_id, now_ms, holders)
        actions: list[PushAction] = []
        for peer, link in self._links.items():
            if peer == sender or peer in holders:
                continue
            if urgent:
                actions.append(Send(peer, Push((op,), urgent=True)))
            elif link is EAGER:
                actions.append(Send(peer, Push((op,))))
            else:
                actions += self._announce(peer, op_id, now_ms)
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
        if peer not in self._links:
            raise LocalProtocolError(f"message from peer {peer.hex()[:16]}, which is not up")
        if isinstance(message, Push):
            return self._on_ops(peer, message.ops, now_ms, message.urgent, push=True)
        if isinstance(message, Ops):
            return self._on_ops(peer, message.ops, now_ms, urgent=False, push=False)
        if isinstance(message, IHave):
            self._on_ihave(peer, message.ids, now_ms)
            return []
        if isinstance(message, Graft):
            return self._on_graft(peer, message.ids)
        if isinstance(message, Prune):
            self._transition(peer, Event.PRUNE)
            return []
        raise LocalProtocolError(f"{type(message).__name__} is not a push message")

    # -- timers ---------------------------------------------------------------

    def next_deadline(self) -> int | None:
        """When :meth:`handle_timer` must next be called, or None."""
        deadlines = [q.deadline for q in self._queues.values() if q.deadline is not None]
        for phase in (self._waiting, self._grafting):
            if phase:
                deadlines.append(next(iter(phase.values())).deadline)
        if self._reannounce_at is not None:
            deadlines.append(self._reannounce_at)
        return min(deadlines, default=None)

    def handle_timer(self, now_ms: int) -> list[PushAction]:
        """Send due announcements, graft ids overdue, re-announce recent ids."""
        actions: list[PushAction] = []
        for peer, queue in self._queues.items():
            if queue.deadline is not None and queue.deadline <= now_ms:
                actions += self._flush(peer, queue)
        grafts: dict[PeerId, list[bytes]] = {}
        for phase in (self._waiting, self._grafting):
            while phase and next(iter(phase.values())).deadline <= now_ms:
                missing_id, entry = phase.popitem(last=False)
                self._graft(missing_id, entry, now_ms, grafts)
        for peer, ids in grafts.items():
            self._transition(peer, Event.GRAFT_SENT)
            self.counters.grafts_sent += 1
            actions += [Send(peer, Graft(chunk)) for chunk in _chunks(ids, self._max_ids)]
        if self._reannounce_at is not None and self._reannounce_at <= now_ms:
            actions += self._reannounce(now_ms)
        return actions

    # -- receiving ------------------------------------------------------------

    @property
    def _max_ids(self) -> int:
        return min(self.limits.max_ihave_ids, self.limits.max_graft_ids)

    def _transition(self, peer: PeerId, event: Event) -> bool:
        """Apply :data:`TRANSITIONS`; True if the peer must be answered Prune."""
        link, prune = TRANSITIONS[self._links[peer], event]
        self._links[peer] = link
        return prune

    def _on_ops(
        self, peer: PeerId, ops: tuple[bytes, ...], now_ms: int, urgent: bool, push: bool
    ) -> list[PushAction]:
        if len(ops) > self.limits.max_push_ops:
            raise RemoteProtocolError(
                f"{len(ops)} ops in one message (limit {self.limits.max_push_ops})"
            )
        actions: list[PushAction] = []
        prune = False
        for op in ops:
            op_id = compute_op_id(op)
            grafting = self._grafting.get(op_id)
            answer = push and grafting is not None and grafting.grafted == peer
            new = not self._knows(op_id)
            if new:
                actions.append(self._accept(peer, op_id, op, now_ms, urgent))
            else:
                self.counters.duplicates += 1
                self._note_holder(op_id, peer)
            if urgent:
                event = Event.URGENT
            elif not push or answer:  # a graft's answer is no redundant push
                event = Event.OPS
            elif new:
                event = Event.PUSH_NEW
                self._duplicates.pop(peer, None)
            else:
                event = self._duplicate(peer, op_id, now_ms)
            prune |= self._transition(peer, event)
        if prune:
            self.counters.prunes_sent += 1
            actions.append(Send(peer, Prune()))
        return actions

    def _duplicate(self, peer: PeerId, op_id: bytes, now_ms: int) -> Event:
        """Classify a pushed duplicate: late, prompt, or the last straw."""
        first = self._seen.get(op_id)
        if first is None or now_ms - first > self.limits.late_after_ms:
            return Event.PUSH_LATE
        count = self._duplicates.get(peer, 0) + 1
        if count >= self.limits.prune_after:
            self._duplicates.pop(peer, None)
            return Event.PUSH_REDUNDANT
        self._duplicates[peer] = count
        return Event.PUSH_DUPLICATE

    def _accept(self, peer: PeerId, op_id: bytes, op: bytes, now_ms: int, urgent: bool) -> Deliver:
        holders = self._forget_missing(op_id) | {peer}
        self._see(op_id, now_ms)
        if len(self._awaiting) >= self.limits.max_awaiting:
            self._awaiting.popitem(last=False)
            self.counters.awaiting_dropped += 1
        self._awaiting[op_id] = _Awaiting(peer, holders)
        self.counters.delivered += 1
        return Deliver(peer, op_id, op, urgent)

    def _on_ihave(self, peer: PeerId, ids: tuple[bytes, ...], now_ms: int) -> None:
        if len(ids) > self.limits.max_ihave_ids:
            raise RemoteProtocolError(
                f"{len(ids)} ids in one IHave (limit {self.limits.max_ihave_ids})"
            )
        self._transition(peer, Event.IHAVE)
        for op_id in ids:
            self._check_id(op_id)
            if self._note_holder(op_id, peer) or self._knows(op_id):
                continue
            entry = self._waiting.get(op_id) or self._grafting.get(op_id)
            if entry is not None and (
                peer in entry.announcers or len(entry.announcers) >= self.limits.max_announcers
            ):
                continue
            if self._unknown[peer] >= self.limits.max_unknown_per_peer:
                raise RemoteProtocolError(
                    f"peer announced more than {self.limits.max_unknown_per_peer} ops"
                    " it has not delivered"
                )
            if entry is None:
                entry = self._track_missing(op_id, now_ms)
            entry.announcers.append(peer)
            self._unknown[peer] += 1

    def _on_graft(self, peer: PeerId, ids: tuple[bytes, ...]) -> list[PushAction]:
        if len(ids) > self.limits.max_graft_ids:
            raise RemoteProtocolError(
                f"{len(ids)} ids in one Graft (limit {self.limits.max_graft_ids})"
            )
        self._transition(peer, Event.GRAFT)
        actions: list[PushAction] = []
        batch: list[bytes] = []
        size = 0
        for op_id in ids:
            self._check_id(op_id)
            op = self._get(op_id)
            if op is None:
                self.counters.grafts_unserved += 1
                continue
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

    def _remember_recent(self, op_id: bytes, now_ms: int, holders: set[PeerId]) -> None:
        self._recent[op_id] = _Recent(now_ms, holders)
        if len(self._recent) > self.limits.max_recent:
            self._recent.popitem(last=False)
        if self._reannounce_at is None and self.limits.reannounce_interval_ms > 0:
            self._reannounce_at = now_ms + self.limits.reannounce_interval_ms

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
            self._unknown[peer] -= 1
        entry.announcers.clear()

    # -- sending --------------------------------------------------------------

    def _announce(self, peer: PeerId, op_id: bytes, now_ms: int) -> list[PushAction]:
        queue = self._queues.setdefault(peer, _Queue())
        queue.ids[op_id] = None
        if len(queue.ids) > self.limits.max_queued_announcements:
            queue.ids.popitem(last=False)
            self.counters.announcements_dropped += 1
        if queue.deadline is None:
            queue.deadline = now_ms + self.limits.ihave_delay_ms
        if len(queue.ids) >= self.limits.max_ihave_ids:
            return self._flush(peer, queue)
        return []

    def _flush(self, peer: PeerId, queue: _Queue) -> list[PushAction]:
        ids = list(queue.ids)
        queue.ids.clear()
        queue.deadline = None
        return [Send(peer, IHave(chunk)) for chunk in _chunks(ids, self.limits.max_ihave_ids)]

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

    def _reannounce(self, now_ms: int) -> list[PushAction]:
        """Announce recent ids again to the peers not known to hold them."""
        oldest = now_ms - self.limits.reannounce_horizon_ms
        per_peer: dict[PeerId, list[bytes]] = {peer: [] for peer in self._links}
        for op_id, recent in reversed(self._recent.items()):
            if recent.first_ms < oldest:
                break
            for peer, ids in per_peer.items():
                if peer not in recent.holders and len(ids) < self.limits.max_ihave_ids:
                    ids.append(op_id)
        newest = next(reversed(self._recent.values()), None)
        if newest is not None and newest.first_ms + self.limits.reannounce_horizon_ms > now_ms:
            self._reannounce_at = now_ms + self.limits.reannounce_interval_ms
        else:
            self._reannounce_at = None
        return [Send(peer, IHave(tuple(ids))) for peer, ids in per_peer.items() if ids]
