"""The sync protocol's messages: one closed union of frozen values.

Every message two nodes exchange on the sync stream is one of these. The wire
module (:mod:`archipel.protocol.wire`) encodes and decodes them; the session
state machines consume and produce them. Ops travel as their signed bytes and
are decoded and validated by the receiving replica; ids are 32-byte op ids.

Families:

- handshake: :class:`Hello`, :class:`Goodbye`
- push (epidemic broadcast, Plumtree): :class:`Push`, :class:`IHave`,
  :class:`Graft`, :class:`Prune`
- pull (set reconciliation, Negentropy v1): :class:`Reconcile`
- fetch (after reconciliation or an announcement): :class:`Want`, :class:`Ops`
- membership (peer selection, HyParView): :class:`Join`, :class:`ForwardJoin`,
  :class:`Neighbor`, :class:`NeighborReply`, :class:`Disconnect`,
  :class:`Shuffle`, :class:`ShuffleReply`
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """A node as others can reach it: its peer id (the device's public key)
    and the addresses it listens on (multiaddr strings)."""

    id: bytes
    addrs: tuple[str, ...]


# -- handshake ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """First message each side sends: the protocol versions it speaks (an
    inclusive range) and the federation it belongs to."""

    min_version: int
    max_version: int
    federation: bytes


@dataclass(frozen=True, slots=True)
class Goodbye:
    """Last message before a clean close, saying why (shown to the peer's user)."""

    reason: str


# -- push -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Push:
    """Eager push of new ops (signed bytes). ``urgent`` ops (alerts) are
    flooded to every connected peer rather than along the tree."""

    ops: tuple[bytes, ...]
    urgent: bool = False


@dataclass(frozen=True, slots=True)
class IHave:
    """Lazy announcement: ids of ops the sender holds."""

    ids: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Graft:
    """Ask for these announced ops, and make the link to the sender eager."""

    ids: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Prune:
    """Make the link to the sender lazy (it sent a duplicate)."""


# -- pull -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reconcile:
    """One Negentropy protocol v1 message (its own binary format).

    Both ends of a connection run their own reconciliation as the client and
    pull what they lack; ``reply`` tells a server's answer (to our client)
    from a query (from the peer's client) on the one stream."""

    payload: bytes
    reply: bool = False


# -- fetch ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Want:
    """Ask for ops by id (a bounded batch)."""

    ids: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Ops:
    """Ops sent in answer to :class:`Want`, one Ops per Want, in order (signed
    bytes). A :class:`Graft` is answered by a :class:`Push`."""

    ops: tuple[bytes, ...]


# -- membership -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Join:
    """A new node asks its contact to bring it into the overlay."""

    peer: PeerInfo


@dataclass(frozen=True, slots=True)
class ForwardJoin:
    """A join travelling a random walk of ``ttl`` more hops."""

    peer: PeerInfo
    ttl: int


@dataclass(frozen=True, slots=True)
class Neighbor:
    """Ask to become an active neighbour; ``high_priority`` when the asker
    has no active neighbour left."""

    peer: PeerInfo
    high_priority: bool


@dataclass(frozen=True, slots=True)
class NeighborReply:
    accepted: bool


@dataclass(frozen=True, slots=True)
class Disconnect:
    """The sender drops the receiver from its active view."""


@dataclass(frozen=True, slots=True)
class Shuffle:
    """Exchange of passive-view samples travelling ``ttl`` more hops."""

    origin: PeerInfo
    peers: tuple[PeerInfo, ...]
    ttl: int


@dataclass(frozen=True, slots=True)
class ShuffleReply:
    peers: tuple[PeerInfo, ...]


Message: TypeAlias = (
    Hello
    | Goodbye
    | Push
    | IHave
    | Graft
    | Prune
    | Reconcile
    | Want
    | Ops
    | Join
    | ForwardJoin
    | Neighbor
    | NeighborReply
    | Disconnect
    | Shuffle
    | ShuffleReply
)
"""Every message of the sync protocol."""
