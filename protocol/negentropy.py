"""Range-based set reconciliation, wire-compatible with Negentropy protocol v1.

Theory of operation
-------------------
Each side holds a set of items ``(timestamp, id)`` (an op's ``ts`` and its
32-byte id), sorted by timestamp then id. The client (initiator) sends one
message covering the whole ``(timestamp, id)`` space as a list of adjacent
ranges, each with an exclusive upper :class:`Bound` and a payload: ``Skip``
(nothing to do here), a ``Fingerprint`` (16 bytes digesting the sender's ids in
the range) or an ``IdList`` (all of the sender's ids in the range). The
receiver walks the ranges in order: an equal fingerprint closes the range; a
different one is *split*, into fingerprinted buckets or, for a small range, an
IdList. A client that receives an IdList learns which ids it has that the
server lacks (``have``) and which it needs; a server that receives one answers
with its own IdList. The client repeats until its reply would be empty. State
lives in the messages: each reply depends only on the message and the store.

Wire details follow the spec (docs/sync/negentropy.md): version byte ``0x61``;
big-endian base-128 varints; timestamps delta-encoded within a message
(``0`` = infinity, else ``1 + delta``); bounds carry the shortest id prefix
that separates two neighbouring items; a missing tail is an implicit Skip. A
server that gets another version byte in ``0x60..0x6f`` answers ``0x61`` alone.

Bounds: our messages never exceed ``frame_size_limit``. Splits and IdLists
fill up to seven eighths of it; each later range that needs work is then
*echoed* (our fingerprint of it, which the peer will split in the next round,
so work already narrowed down is not lost), and once even that has no room
left the rest is folded into one fingerprint to infinity, as the reference
implementation does with all of it. Every incoming message is decoded
completely, against :class:`NegentropyLimits`, before any of it is acted on;
anything malformed raises :class:`RemoteProtocolError` with a reason.

Storage: the reconciler works over :class:`ItemStore`. :class:`SortedItems` is
an immutable sorted vector in flat arrays (timestamps in an ``array('Q')``,
ids in one ``bytes``, prefix sums of the ids mod 2**256 in another), so a
range fingerprint costs O(1) and a bound lookup O(log n).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from math import isqrt
from typing import Final, TypeAlias

from .errors import LocalProtocolError, RemoteProtocolError

# Storage lives in its own module; its public names are re-exported here.
from .negentropy_store import (
    FINGERPRINT_SIZE,
    ID_SIZE,
    INFINITY,
    ItemStore,
    SortedItems,
    encode_varint,
    fingerprint,
)

__all__ = [
    "CLIENT_POLICY",
    "ECHO_SHARE",
    "FINGERPRINT_SIZE",
    "FRAME_SLACK",
    "ID_SIZE",
    "INFINITE_BOUND",
    "INFINITY",
    "MIN_FRAME_SIZE_LIMIT",
    "PROTOCOL_VERSION",
    "REFERENCE_POLICY",
    "SERVER_POLICY",
    "ZERO_BOUND",
    "Bound",
    "Fingerprint",
    "IdList",
    "ItemStore",
    "Message",
    "Mode",
    "NegentropyClient",
    "NegentropyLimits",
    "NegentropyServer",
    "Range",
    "ReconcileStats",
    "Skip",
    "SortedItems",
    "SplitPolicy",
    "decode_message",
    "encode_message",
    "encode_varint",
    "fingerprint",
]

PROTOCOL_VERSION: Final = 0x61  # v1; the bytes 0x60..0x6f name protocol versions
MIN_FRAME_SIZE_LIMIT: Final = 4096  # as in the reference implementation
FRAME_SLACK: Final = 200  # kept free under the limit for a closing Skip + Fingerprint
ECHO_SHARE: Final = 8  # 1/8 of a frame is kept for echoed fingerprints (see process)


class Mode(enum.IntEnum):
    """The payload kind of a range, as encoded on the wire."""

    SKIP = 0
    FINGERPRINT = 1
    IDLIST = 2


# -- values ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Bound:
    """A point of the ``(timestamp, id)`` space; ``id_prefix`` (0..32 bytes)
    is padded with zero bytes to compare."""

    timestamp: int
    id_prefix: bytes = b""

    def key(self) -> tuple[int, bytes]:
        return (self.timestamp, self.id_prefix.ljust(ID_SIZE, b"\0"))


ZERO_BOUND: Final = Bound(0)
INFINITE_BOUND: Final = Bound(INFINITY)


@dataclass(frozen=True, slots=True)
class Skip:
    """The sender does not want this range processed further."""


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """A digest of the sender's ids in the range (see :func:`fingerprint`)."""

    value: bytes


@dataclass(frozen=True, slots=True)
class IdList:
    """All of the sender's ids in the range."""

    ids: tuple[bytes, ...]


Payload: TypeAlias = Skip | Fingerprint | IdList


@dataclass(frozen=True, slots=True)
class Range:
    """A range from the previous range's upper bound (or zero) up to ``upper``."""

    upper: Bound
    payload: Payload


@dataclass(frozen=True, slots=True)
class Message:
    """One reconciliation message: its ranges in order, from zero upwards."""

    ranges: tuple[Range, ...]


@dataclass(frozen=True, slots=True)
class NegentropyLimits:
    """Bounds on what a peer can make us read or send, and on a session's length."""

    frame_size_limit: int = 60_000  # bytes of one message we send (>= 4096)
    max_message_bytes: int = 1 << 20  # bytes of one message we accept
    max_ranges: int = 1 << 16  # ranges in one message we accept
    max_rounds: int = 1 << 16  # messages either side processes in one session

    def __post_init__(self) -> None:
        if self.frame_size_limit < MIN_FRAME_SIZE_LIMIT:
            raise LocalProtocolError(f"frame_size_limit must be >= {MIN_FRAME_SIZE_LIMIT}")
        if min(self.max_message_bytes, self.max_ranges, self.max_rounds) < 1:
            raise LocalProtocolError("limits must be positive")


@dataclass(frozen=True, slots=True)
class SplitPolicy:
    """How a range whose fingerprints differ is split. Every policy sends valid
    v1 messages; it only changes bytes and round trips. A range of ``k`` items
    goes as an IdList when ``k < idlist_below``, as ``buckets`` fingerprinted
    buckets when ``k >= 2 * buckets``, and in between as about ``sqrt(1.5 k)``
    buckets (balancing fingerprint bytes against those of the IdList that
    follows). Bounded so that one range's output always fits in a frame."""

    buckets: int = 16
    idlist_below: int = 32

    def __post_init__(self) -> None:
        if not (2 <= self.buckets <= 48 and 2 <= self.idlist_below <= 96):
            raise LocalProtocolError("need 2 <= buckets <= 48 and 2 <= idlist_below <= 96")

    def plan(self, k: int) -> int:
        """Buckets for a ``k``-item range; 0 means: send it as an IdList."""
        if k < self.idlist_below:
            return 0
        if k >= 2 * self.buckets:
            return self.buckets
        return max(2, min(self.buckets, isqrt(3 * k // 2)))


REFERENCE_POLICY: Final = SplitPolicy(buckets=16, idlist_below=32)
"""The reference implementation's rule: fewer than 32 items -> IdList, else 16 buckets."""
CLIENT_POLICY: Final = SplitPolicy(buckets=16, idlist_below=2)
"""Our client's rule: a client's IdList only makes the server send its own, so
the client keeps splitting small ranges and lets the server's IdList end them."""
SERVER_POLICY: Final = REFERENCE_POLICY


@dataclass(frozen=True, slots=True)
class ReconcileStats:
    """Counters for benchmarks and logs: rounds, messages and bytes each way."""

    rounds: int
    messages_sent: int
    messages_received: int
    bytes_sent: int
    bytes_received: int


# -- varints and fingerprints -----------------------------------------------------


class _Writer:
    """Builds one message; ``mark``/``rollback`` undo what did not fit."""

    __slots__ = ("buf", "last_ts")

    def __init__(self) -> None:
        self.buf = bytearray((PROTOCOL_VERSION,))
        self.last_ts = 0

    def bound(self, bound: Bound, mode: Mode) -> None:
        ts = bound.timestamp
        if ts == INFINITY:
            self.buf.append(0)
        elif ts < self.last_ts:
            raise LocalProtocolError("bounds must not decrease")
        else:
            self.buf += encode_varint(ts - self.last_ts + 1)
        self.last_ts = ts
        self.buf += encode_varint(len(bound.id_prefix))
        self.buf += bound.id_prefix
        self.buf.append(mode)

    def fingerprint(self, bound: Bound, value: bytes) -> None:
        self.bound(bound, Mode.FINGERPRINT)
        self.buf += value

    def idlist(self, bound: Bound, ids: bytes) -> None:
        self.bound(bound, Mode.IDLIST)
        self.buf += encode_varint(len(ids) // ID_SIZE)
        self.buf += ids

    def mark(self) -> tuple[int, int]:
        return len(self.buf), self.last_ts

    def rollback(self, mark: tuple[int, int]) -> None:
        del self.buf[mark[0] :]
        self.last_ts = mark[1]


def encode_message(message: Message) -> bytes:
    """The wire bytes of ``message``, version byte first."""
    w = _Writer()
    for r in message.ranges:
        if not (len(r.upper.id_prefix) <= ID_SIZE and 0 <= r.upper.timestamp <= INFINITY):
            raise LocalProtocolError(f"bad bound {r.upper}")
        match r.payload:
            case Skip():
                w.bound(r.upper, Mode.SKIP)
            case Fingerprint(value=value) if len(value) == FINGERPRINT_SIZE:
                w.fingerprint(r.upper, value)
            case IdList(ids=ids) if all(len(i) == ID_SIZE for i in ids):
                w.idlist(r.upper, b"".join(ids))
            case _:
                raise LocalProtocolError(f"bad payload {r.payload}")
    return bytes(w.buf)


class _Reader:
    """Reads one untrusted message; every failure is a RemoteProtocolError."""

    __slots__ = ("data", "last_ts", "pos")

    def __init__(self, data: bytes) -> None:
        self.data, self.pos, self.last_ts = data, 1, 0

    def take(self, n: int, what: str) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise RemoteProtocolError(f"negentropy: message ends inside {what}")
        chunk, self.pos = self.data[self.pos : end], end
        return chunk

    def varint(self, what: str) -> int:
        data, pos, value = self.data, self.pos, 0
        if pos < len(data) and data[pos] == 0x80:
            raise RemoteProtocolError(f"negentropy: non-minimal varint in {what}")
        while True:
            if pos >= len(data):
                raise RemoteProtocolError(f"negentropy: message ends inside {what}")
            byte = data[pos]
            pos += 1
            value = (value << 7) | (byte & 0x7F)
            if value > INFINITY:
                raise RemoteProtocolError(f"negentropy: varint over 64 bits in {what}")
            if not byte & 0x80:
                self.pos = pos
                return value

    def bound(self) -> Bound:
        encoded = self.varint("a bound's timestamp")
        ts = INFINITY if encoded == 0 else self.last_ts + encoded - 1
        if encoded and ts >= INFINITY:
            raise RemoteProtocolError("negentropy: timestamp past infinity")
        self.last_ts = ts
        length = self.varint("a bound's prefix length")
        if length > ID_SIZE:
            raise RemoteProtocolError(f"negentropy: id prefix of {length} bytes (max 32)")
        return Bound(ts, self.take(length, "a bound's id prefix"))

    def payload(self) -> Payload:
        mode = self.varint("a range's mode")
        if mode == Mode.SKIP:
            return Skip()
        if mode == Mode.FINGERPRINT:
            return Fingerprint(self.take(FINGERPRINT_SIZE, "a fingerprint"))
        if mode != Mode.IDLIST:
            raise RemoteProtocolError(f"negentropy: unknown range mode {mode}")
        count = self.varint("an id list's length")
        if count * ID_SIZE > len(self.data) - self.pos:  # before allocating anything
            raise RemoteProtocolError(f"negentropy: id list claims {count} ids, bytes missing")
        blob = self.take(count * ID_SIZE, "an id list")
        return IdList(tuple(blob[i : i + ID_SIZE] for i in range(0, len(blob), ID_SIZE)))


def decode_message(data: bytes, limits: NegentropyLimits | None = None) -> Message:
    """Decode and check one untrusted message against ``limits``: its size, the
    version byte, bounds in order and none past infinity, id list lengths and
    the number of ranges."""
    limits = limits or NegentropyLimits()
    data = bytes(data)
    if not data:
        raise RemoteProtocolError("negentropy: empty message")
    if len(data) > limits.max_message_bytes:
        raise RemoteProtocolError(
            f"negentropy: message of {len(data)} bytes over the {limits.max_message_bytes} limit"
        )
    if data[0] != PROTOCOL_VERSION:
        raise RemoteProtocolError(f"negentropy: unsupported protocol version byte {data[0]:#x}")
    reader = _Reader(data)
    ranges: list[Range] = []
    previous = ZERO_BOUND.key()
    while reader.pos < len(data):
        if len(ranges) >= limits.max_ranges:
            raise RemoteProtocolError(f"negentropy: over {limits.max_ranges} ranges")
        if previous[0] == INFINITY:
            raise RemoteProtocolError("negentropy: range after the infinity bound")
        upper = reader.bound()
        if upper.key() < previous:
            raise RemoteProtocolError("negentropy: ranges out of order")
        previous = upper.key()
        ranges.append(Range(upper, reader.payload()))
    return Message(tuple(ranges))


# -- storage --------------------------------------------------------------------


def _minimal_bound(store: ItemStore, i: int) -> Bound:
    """The shortest bound above item ``i - 1`` and at most item ``i``."""
    ts = store.timestamp(i)
    if store.timestamp(i - 1) != ts:
        return Bound(ts)
    prev, curr = store.item_id(i - 1), store.item_id(i)
    shared = next((k for k in range(ID_SIZE) if prev[k] != curr[k]), ID_SIZE - 1)
    return Bound(ts, curr[: shared + 1])


class _Reconciler:
    """Turns one decoded message into the reply; shared by client and server."""

    def __init__(self, store: ItemStore, limits: NegentropyLimits, policy: SplitPolicy) -> None:
        self.store, self.limits, self.policy = store, limits, policy

    def split(self, w: _Writer, lower: int, upper: int, upper_bound: Bound) -> None:
        """Describe our items ``lower..upper`` (the range ends at ``upper_bound``)
        so the peer can find what differs: as an IdList or fingerprinted buckets."""
        store, k = self.store, upper - lower
        buckets = self.policy.plan(k)
        if buckets == 0:
            w.idlist(upper_bound, store.ids(lower, upper))
            return
        per, extra = divmod(k, buckets)
        curr = lower
        for b in range(buckets):
            end = curr + per + (1 if b < extra else 0)
            bound = upper_bound if end == upper else _minimal_bound(store, end)
            w.fingerprint(bound, store.fingerprint(curr, end))
            curr = end

    def process(
        self, message: Message, client: bool, have: list[bytes], need: list[bytes]
    ) -> bytes:
        """The reply to ``message``, range by range, within the frame size limit.
        Once splits have filled ``split_until`` bytes, each range still to work
        on is only echoed (our fingerprint of it, for the peer to split in the
        next round), and when even that has no room left, the rest is folded
        into one fingerprint to infinity."""
        store, n, limit = self.store, len(self.store), self.limits.frame_size_limit
        split_until = limit - FRAME_SLACK - limit // ECHO_SHARE
        w = _Writer()
        lower, prev_bound, skipping, echoing = 0, ZERO_BOUND, False, False
        for r in message.ranges:
            ts, id32 = r.upper.key()
            upper, p = store.lower_bound(ts, id32, lower, n), r.payload
            if isinstance(p, Skip) or (
                isinstance(p, Fingerprint) and p.value == store.fingerprint(lower, upper)
            ):
                skipping = True
            elif isinstance(p, IdList) and client:
                self.compare(p.ids, lower, upper, have, need)
                skipping = True
            elif echoing and len(w.buf) > limit - FRAME_SLACK:
                break
            else:  # Skips are written lazily (merged, and never last) before work
                skip_to = prev_bound if skipping else None
                echoing = self.answer(
                    w, p, lower, upper, skip_to=skip_to, bound=r.upper, echoing=echoing,
                    split_until=split_until,
                )  # fmt: skip
                skipping = False
            lower, prev_bound = upper, r.upper
        else:
            return bytes(w.buf)
        if skipping:
            w.bound(prev_bound, Mode.SKIP)
        w.fingerprint(INFINITE_BOUND, store.fingerprint(lower, n))
        return bytes(w.buf)

    def answer(
        self,
        w: _Writer,
        payload: Payload,
        lower: int,
        upper: int,
        *,
        skip_to: Bound | None,
        bound: Bound,
        echoing: bool,
        split_until: int,
    ) -> bool:
        """Write our answer to one range that needs work: a split, our IdList,
        or (when echoing, or out of room for more) our fingerprint of it.
        Returns whether we are echoing from now on."""
        store, mark = self.store, w.mark()
        if skip_to is not None:
            w.bound(skip_to, Mode.SKIP)
        if echoing:
            w.fingerprint(bound, store.fingerprint(lower, upper))
            return True
        if isinstance(payload, Fingerprint):
            self.split(w, lower, upper, bound)
        elif (stop := self.reply_ids(w, lower, upper, bound, split_until)) < upper:
            w.fingerprint(bound, store.fingerprint(stop, upper))  # the ids that did not fit
            return True
        if len(w.buf) <= split_until:
            return False
        w.rollback(mark)
        if skip_to is not None:
            w.bound(skip_to, Mode.SKIP)
        w.fingerprint(bound, store.fingerprint(lower, upper))
        return True

    def compare(
        self, ids: tuple[bytes, ...], lower: int, upper: int, have: list[bytes], need: list[bytes]
    ) -> None:
        """Client side of an IdList: our ids not in it are ``have``, its ids not
        among ours ``need``."""
        theirs = dict.fromkeys(ids)
        for i in range(lower, upper):
            item_id = self.store.item_id(i)
            if item_id in theirs:
                del theirs[item_id]
            else:
                have.append(item_id)
        need.extend(theirs)

    def reply_ids(self, w: _Writer, lower: int, upper: int, bound: Bound, budget: int) -> int:
        """Server side of an IdList: send our ids in the range, as many as fit,
        and return the index after the last one sent."""
        room = (budget - len(w.buf) - 2 * ID_SIZE) // ID_SIZE  # a bound + count take < 64 B
        stop = upper if upper - lower <= room else lower + max(room, 0)
        if stop > lower or stop == upper:
            end = bound if stop == upper else _minimal_bound(self.store, stop)
            w.idlist(end, self.store.ids(lower, stop))
        return stop


# -- sessions -------------------------------------------------------------------


class _State(enum.Enum):
    IDLE = "idle"  # client: nothing sent yet
    WAITING = "waiting"  # client: a message is out, its reply awaited
    OPEN = "open"  # server: answering queries
    DONE = "done"  # client: nothing left to ask
    FAILED = "failed"  # the peer broke the protocol: this session is over


class _Event(enum.Enum):
    INITIATE = "initiate"
    MESSAGE = "message"  # a message that leaves work to do
    FINISHED = "finished"  # a reply after which the client has nothing to send
    ERROR = "error"  # a malformed message or a limit exceeded


_TRANSITIONS: Final[dict[tuple[_State, _Event], _State]] = {
    (_State.IDLE, _Event.INITIATE): _State.WAITING,
    (_State.WAITING, _Event.MESSAGE): _State.WAITING,
    (_State.WAITING, _Event.FINISHED): _State.DONE,
    (_State.WAITING, _Event.ERROR): _State.FAILED,
    (_State.OPEN, _Event.MESSAGE): _State.OPEN,
    (_State.OPEN, _Event.ERROR): _State.FAILED,
}


class _Side:
    """What client and server share: the state, a reconciler and counters."""

    def __init__(
        self, store: ItemStore, limits: NegentropyLimits | None, policy: SplitPolicy, state: _State
    ) -> None:
        self.limits = limits or NegentropyLimits()
        self._store = store
        self._reconciler = _Reconciler(store, self.limits, policy)
        self._state = state
        self._counts = [0, 0, 0, 0, 0]  # rounds, sent, received, bytes sent, bytes received

    @property
    def stats(self) -> ReconcileStats:
        return ReconcileStats(*self._counts)

    def _check(self, event: _Event) -> None:
        if (self._state, event) not in _TRANSITIONS:
            raise LocalProtocolError(f"negentropy: cannot {event.value} when {self._state.value}")

    def _move(self, event: _Event) -> None:
        self._check(event)
        self._state = _TRANSITIONS[self._state, event]

    def _receive(self, data: bytes) -> None:
        self._check(_Event.MESSAGE)
        self._counts[0] += 1
        self._counts[2] += 1
        self._counts[4] += len(data)

    def _check_rounds(self) -> None:
        if self._counts[0] > self.limits.max_rounds:
            raise RemoteProtocolError(f"negentropy: over {self.limits.max_rounds} rounds")

    def _send(self, data: bytes) -> bytes:
        self._counts[1] += 1
        self._counts[3] += len(data)
        return data


class NegentropyClient(_Side):
    """The initiator: learns which ids it has that the server lacks (``have``)
    and which it lacks (``need``). Call ``initiate()`` once, then feed each
    reply to ``reconcile()`` until the next message it returns is ``None``."""

    def __init__(
        self,
        store: ItemStore,
        limits: NegentropyLimits | None = None,
        policy: SplitPolicy = CLIENT_POLICY,
    ) -> None:
        super().__init__(store, limits, policy, _State.IDLE)

    @property
    def done(self) -> bool:
        return self._state is _State.DONE

    def initiate(self) -> bytes:
        """The first message: our whole set, split as the policy says."""
        self._move(_Event.INITIATE)
        w = _Writer()
        self._reconciler.split(w, 0, len(self._store), INFINITE_BOUND)
        return self._send(bytes(w.buf))

    def reconcile(self, reply: bytes) -> tuple[bytes | None, list[bytes], list[bytes]]:
        """Process the server's reply: (the next message, or None when done;
        ids we have that it lacks; ids it has that we lack). Raises
        RemoteProtocolError on a malformed reply or too many rounds."""
        self._receive(reply)
        have: list[bytes] = []
        need: list[bytes] = []
        try:
            self._check_rounds()
            if reply[:1] and reply[0] != PROTOCOL_VERSION:
                raise RemoteProtocolError(f"negentropy: server does not speak v1 ({reply[0]:#x})")
            out = self._reconciler.process(decode_message(reply, self.limits), True, have, need)
        except RemoteProtocolError:
            self._move(_Event.ERROR)
            raise
        if len(out) == 1:  # the version byte alone: nothing left to ask
            self._move(_Event.FINISHED)
            return None, have, need
        self._move(_Event.MESSAGE)
        return self._send(out), have, need


class NegentropyServer(_Side):
    """The responder: answers each client message; it learns nothing itself
    (the client pushes what the server lacks and fetches what it needs)."""

    def __init__(
        self,
        store: ItemStore,
        limits: NegentropyLimits | None = None,
        policy: SplitPolicy = SERVER_POLICY,
    ) -> None:
        super().__init__(store, limits, policy, _State.OPEN)

    def reconcile(self, query: bytes) -> bytes:
        """The reply to one client message. Another version byte in
        ``0x60..0x6f`` gets ``b"\\x61"`` alone: the version we speak."""
        self._receive(query)
        try:
            self._check_rounds()
            if query[:1] and query[0] != PROTOCOL_VERSION and 0x60 <= query[0] <= 0x6F:
                return self._send(bytes((PROTOCOL_VERSION,)))
            out = self._reconciler.process(decode_message(query, self.limits), False, [], [])
        except RemoteProtocolError:
            self._move(_Event.ERROR)
            raise
        return self._send(out)
