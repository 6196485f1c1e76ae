"""The sync protocol's wire format: length-prefixed canonical msgpack frames.

Theory of operation. A stream carries frames back to back. A frame is a 4-byte
big-endian unsigned length ``n`` (1 <= n <= ``max_frame_bytes``) followed by
``n`` bytes of body: the canonical msgpack encoding (shortest forms, as
:func:`archipel.crdt.encode` writes them) of one array ``[tag, field, ...]``.
A fixed 4-byte prefix (rather than a varint) lets the reader refuse an oversize
frame as soon as four bytes have arrived, before buffering any of it.

Each :data:`~archipel.protocol.messages.Message` type has a tag, one encode
function and one decode function (see ``_CODECS``). Encoding checks the message
against :class:`WireLimits` and raises :class:`LocalProtocolError` for a message
this node must not send. Decoding walks the body with a small strict reader
that knows the expected shape in advance: it checks every length against its
limit *before* reading, never materialises a value of an unexpected type, and
refuses non-shortest encodings, so a body decodes only if it is exactly what
:func:`encode_message` would write (one message, one encoding). Anything wrong
raises :class:`RemoteProtocolError` with a reason; no other exception escapes
for any input.

:class:`FrameReader` is the incremental, sans-I/O receive side (as h11's
receive buffer): ``feed`` bytes, then call ``next_message`` until it returns
``None``; ``feed(b"")`` marks the end of the stream. Its buffer holds at most
one partial frame plus one fed chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from archipel.crdt import DEFAULT_LIMITS, Value, encode

from .errors import LocalProtocolError, RemoteProtocolError
from .messages import (
    Disconnect,
    ForwardJoin,
    Goodbye,
    Graft,
    Hello,
    IHave,
    Join,
    Message,
    Neighbor,
    NeighborReply,
    Ops,
    PeerInfo,
    Prune,
    Push,
    Reconcile,
    Shuffle,
    ShuffleReply,
    Want,
)

LENGTH_BYTES = 4
"""Size of the big-endian length prefix of every frame."""
ID_BYTES = 32
"""Op ids, federation ids and peer ids are all 32 bytes."""
OPS_FRAME_OVERHEAD = 8
"""Upper bound on a Push/Ops body beyond its ops' entries (array, tag, count, flag)."""
OP_ENTRY_OVERHEAD = 5
"""Upper bound on the msgpack header of one op's bytes inside a Push/Ops body."""


@dataclass(frozen=True, slots=True)
class WireLimits:
    """Bounds on frames and messages; a peer exceeding one is closed."""

    max_frame_bytes: int = 1 << 20  # 1 MiB of body per frame
    max_op_bytes: int = DEFAULT_LIMITS.max_op_bytes  # 64 KiB, as the op decoder allows
    max_ids: int = 1024  # ids in one IHave, Graft or Want
    max_ops: int = 1024  # ops in one Push or Ops
    max_peers: int = 64  # peers in one Shuffle or ShuffleReply
    max_addrs: int = 8  # addresses of one PeerInfo
    max_addr_bytes: int = 256  # UTF-8 bytes of one address
    max_reason_bytes: int = 1024  # UTF-8 bytes of a Goodbye reason
    max_version: int = 0xFFFF  # protocol versions are uint16
    max_ttl: int = 255  # ForwardJoin and Shuffle hop counts

    @property
    def max_buffer_bytes(self) -> int:
        """What a :class:`FrameReader` may hold: one partial frame and one chunk
        of at most a frame's size."""
        return 2 * (self.max_frame_bytes + LENGTH_BYTES)


DEFAULT_WIRE_LIMITS = WireLimits()


# -- the strict body reader --------------------------------------------------------


class _Cursor:
    """Reads the msgpack subset the protocol uses, checking shape and limits."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def _take(self, n: int, what: str) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise RemoteProtocolError(f"message ends inside {what}")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def _byte(self, what: str) -> int:
        return self._take(1, what)[0]

    def _uint_be(self, n: int, what: str) -> int:
        return int.from_bytes(self._take(n, what), "big")

    def _length(self, lead: int, fix: tuple[int, int], wide: Sequence[int], what: str) -> int:
        """A length header: a fix form in ``fix`` (first, last lead byte), or
        one of ``wide`` lead bytes followed by 1, 2, 4 bytes (bin/str) or 2, 4
        (array). Non-shortest forms are refused."""
        first, last = fix
        if first <= lead <= last:
            return lead - first
        sizes = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4, 0xDC: 2, 0xDD: 4}
        if lead not in wide:
            raise RemoteProtocolError(f"{what} has the wrong type")
        size = sizes[lead]
        n = self._uint_be(size, what)
        smallest = {1: last - first + 1, 2: 1 << 8, 4: 1 << 16}[size]
        if lead == 0xDC:  # array16 is the first wide array form
            smallest = last - first + 1
        if n < smallest:
            raise RemoteProtocolError(f"{what} is not canonically encoded")
        return n

    def array(self, low: int, high: int, what: str) -> int:
        n = self._length(self._byte(what), (0x90, 0x9F), (0xDC, 0xDD), what)
        if not low <= n <= high:
            raise RemoteProtocolError(f"{what} has {n} items, allowed {low} to {high}")
        return n

    def uint(self, high: int, what: str) -> int:
        lead = self._byte(what)
        if lead <= 0x7F:
            return lead
        if not 0xCC <= lead <= 0xCF:
            raise RemoteProtocolError(f"{what} is not an unsigned integer")
        size = 1 << (lead - 0xCC)
        value = self._uint_be(size, what)
        if value < (0x80 if size == 1 else 1 << (4 * size)):
            raise RemoteProtocolError(f"{what} is not canonically encoded")
        if value > high:
            raise RemoteProtocolError(f"{what} is {value}, over the limit of {high}")
        return value

    def boolean(self, what: str) -> bool:
        lead = self._byte(what)
        if lead not in (0xC2, 0xC3):
            raise RemoteProtocolError(f"{what} is not a boolean")
        return lead == 0xC3

    def bin(self, low: int, high: int, what: str) -> bytes:
        n = self._length(self._byte(what), (1, 0), (0xC4, 0xC5, 0xC6), what)
        if not low <= n <= high:
            expect = f"{low}" if low == high else f"{low} to {high}"
            raise RemoteProtocolError(f"{what} is {n} bytes, expected {expect}")
        return self._take(n, what)

    def string(self, high: int, what: str) -> str:
        n = self._length(self._byte(what), (0xA0, 0xBF), (0xD9, 0xDA, 0xDB), what)
        if n > high:
            raise RemoteProtocolError(f"{what} is {n} bytes, over the limit of {high}")
        try:
            return self._take(n, what).decode("utf-8")
        except UnicodeDecodeError:
            raise RemoteProtocolError(f"{what} is not valid UTF-8") from None

    def distinct_ids(self, limits: WireLimits, what: str) -> tuple[bytes, ...]:
        n = self.array(1, limits.max_ids, what)
        ids = self._packed_ids(n)
        if ids is None:  # not the plain form: read one by one, to say what is wrong
            ids = tuple(self.bin(ID_BYTES, ID_BYTES, f"an id in {what}") for _ in range(n))
        if len(set(ids)) != n:
            raise RemoteProtocolError(f"{what} repeats an id")
        return ids

    def _packed_ids(self, n: int) -> tuple[bytes, ...] | None:
        """Fast path: ``n`` ids, each a bin8 header (c4 20) and 32 bytes."""
        step = 2 + ID_BYTES
        chunk = self.data[self.pos : self.pos + n * step]
        if len(chunk) != n * step or chunk[0::step] != b"\xc4" * n:
            return None
        if chunk[1::step] != bytes([ID_BYTES]) * n:
            return None
        self.pos += n * step
        return tuple(chunk[i + 2 : i + step] for i in range(0, n * step, step))

    def op_list(self, low: int, limits: WireLimits, what: str) -> tuple[bytes, ...]:
        n = self.array(low, limits.max_ops, what)
        return tuple(self.bin(1, limits.max_op_bytes, f"an op in {what}") for _ in range(n))

    def peer(self, limits: WireLimits, what: str) -> PeerInfo:
        self.array(2, 2, what)
        peer_id = self.bin(ID_BYTES, ID_BYTES, f"the id of {what}")
        n = self.array(0, limits.max_addrs, f"the addresses of {what}")
        addrs = tuple(self.string(limits.max_addr_bytes, f"an address of {what}") for _ in range(n))
        return PeerInfo(peer_id, addrs)

    def peers(self, limits: WireLimits, what: str) -> tuple[PeerInfo, ...]:
        n = self.array(0, limits.max_peers, what)
        return tuple(self.peer(limits, f"a peer in {what}") for _ in range(n))


# -- one decoder per message type -----------------------------------------------------


def _d_hello(c: _Cursor, lim: WireLimits) -> Hello:
    low = c.uint(lim.max_version, "Hello.min_version")
    high = c.uint(lim.max_version, "Hello.max_version")
    if low > high:
        raise RemoteProtocolError(f"Hello offers an empty version range {low}..{high}")
    return Hello(low, high, c.bin(ID_BYTES, ID_BYTES, "Hello.federation"))


def _d_goodbye(c: _Cursor, lim: WireLimits) -> Goodbye:
    return Goodbye(c.string(lim.max_reason_bytes, "Goodbye.reason"))


def _d_push(c: _Cursor, lim: WireLimits) -> Push:
    return Push(c.op_list(1, lim, "Push.ops"), c.boolean("Push.urgent"))


def _d_ihave(c: _Cursor, lim: WireLimits) -> IHave:
    return IHave(c.distinct_ids(lim, "IHave.ids"))


def _d_graft(c: _Cursor, lim: WireLimits) -> Graft:
    return Graft(c.distinct_ids(lim, "Graft.ids"))


def _d_prune(c: _Cursor, lim: WireLimits) -> Prune:
    return Prune()


def _d_reconcile(c: _Cursor, lim: WireLimits) -> Reconcile:
    return Reconcile(
        c.bin(1, lim.max_frame_bytes, "Reconcile.payload"), c.boolean("Reconcile.reply")
    )


def _d_want(c: _Cursor, lim: WireLimits) -> Want:
    return Want(c.distinct_ids(lim, "Want.ids"))


def _d_ops(c: _Cursor, lim: WireLimits) -> Ops:
    return Ops(c.op_list(0, lim, "Ops.ops"))


def _d_join(c: _Cursor, lim: WireLimits) -> Join:
    return Join(c.peer(lim, "Join.peer"))


def _d_forward_join(c: _Cursor, lim: WireLimits) -> ForwardJoin:
    return ForwardJoin(c.peer(lim, "ForwardJoin.peer"), c.uint(lim.max_ttl, "ForwardJoin.ttl"))


def _d_neighbor(c: _Cursor, lim: WireLimits) -> Neighbor:
    return Neighbor(c.peer(lim, "Neighbor.peer"), c.boolean("Neighbor.high_priority"))


def _d_neighbor_reply(c: _Cursor, lim: WireLimits) -> NeighborReply:
    return NeighborReply(c.boolean("NeighborReply.accepted"))


def _d_disconnect(c: _Cursor, lim: WireLimits) -> Disconnect:
    return Disconnect()


def _d_shuffle(c: _Cursor, lim: WireLimits) -> Shuffle:
    origin = c.peer(lim, "Shuffle.origin")
    peers = c.peers(lim, "Shuffle.peers")
    return Shuffle(origin, peers, c.uint(lim.max_ttl, "Shuffle.ttl"))


def _d_shuffle_reply(c: _Cursor, lim: WireLimits) -> ShuffleReply:
    return ShuffleReply(c.peers(lim, "ShuffleReply.peers"))


# -- one encoder per message type: checks what we send against the same limits ---------


def _need(ok: bool, why: str) -> None:
    if not ok:
        raise LocalProtocolError(f"refusing to send a malformed message: {why}")


def _e_uint(value: object, high: int, what: str) -> int:
    _need(type(value) is int and 0 <= value <= high, f"{what} must be an int in 0..{high}")
    return value  # type: ignore[return-value]


def _e_bool(value: object, what: str) -> bool:
    _need(isinstance(value, bool), f"{what} must be a bool")
    return value  # type: ignore[return-value]


def _e_bin(value: object, low: int, high: int, what: str) -> bytes:
    _need(
        isinstance(value, bytes) and low <= len(value) <= high,
        f"{what} must be {low} to {high} bytes",
    )
    return value  # type: ignore[return-value]


def _e_str(value: object, high: int, what: str) -> str:
    if not isinstance(value, str):
        raise LocalProtocolError(f"refusing to send a malformed message: {what} must be a str")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        size = -1
    _need(0 <= size <= high, f"{what} must be at most {high} bytes of UTF-8")
    return value


def _e_seq(value: object, low: int, high: int, what: str) -> tuple[object, ...]:
    _need(isinstance(value, tuple) and low <= len(value) <= high, f"{what}: {low} to {high}")
    return value  # type: ignore[return-value]


def _e_ids(ids: object, lim: WireLimits, what: str) -> list[Value]:
    items = _e_seq(ids, 1, lim.max_ids, what)
    _need(len(set(items)) == len(items), f"{what} repeats an id")
    return [_e_bin(i, ID_BYTES, ID_BYTES, f"an id in {what}") for i in items]


def _e_ops(ops: object, low: int, lim: WireLimits, what: str) -> list[Value]:
    items = _e_seq(ops, low, lim.max_ops, what)
    return [_e_bin(o, 1, lim.max_op_bytes, f"an op in {what}") for o in items]


def _e_peer(peer: object, lim: WireLimits, what: str) -> list[Value]:
    if not isinstance(peer, PeerInfo):
        raise LocalProtocolError(f"refusing to send a malformed message: {what} is no PeerInfo")
    addrs = _e_seq(peer.addrs, 0, lim.max_addrs, f"the addresses of {what}")
    return [
        _e_bin(peer.id, ID_BYTES, ID_BYTES, f"the id of {what}"),
        [_e_str(a, lim.max_addr_bytes, f"an address of {what}") for a in addrs],
    ]


def _e_peers(peers: object, lim: WireLimits, what: str) -> list[Value]:
    return [_e_peer(p, lim, what) for p in _e_seq(peers, 0, lim.max_peers, what)]


def _e_hello(m: Hello, lim: WireLimits) -> list[Value]:
    low = _e_uint(m.min_version, lim.max_version, "Hello.min_version")
    high = _e_uint(m.max_version, lim.max_version, "Hello.max_version")
    _need(low <= high, "Hello's version range is empty")
    return [low, high, _e_bin(m.federation, ID_BYTES, ID_BYTES, "Hello.federation")]


def _e_goodbye(m: Goodbye, lim: WireLimits) -> list[Value]:
    return [_e_str(m.reason, lim.max_reason_bytes, "Goodbye.reason")]


def _e_push(m: Push, lim: WireLimits) -> list[Value]:
    return [_e_ops(m.ops, 1, lim, "Push.ops"), _e_bool(m.urgent, "Push.urgent")]


def _e_ihave(m: IHave, lim: WireLimits) -> list[Value]:
    return [_e_ids(m.ids, lim, "IHave.ids")]


def _e_graft(m: Graft, lim: WireLimits) -> list[Value]:
    return [_e_ids(m.ids, lim, "Graft.ids")]


def _e_prune(m: Prune, lim: WireLimits) -> list[Value]:
    return []


def _e_reconcile(m: Reconcile, lim: WireLimits) -> list[Value]:
    return [
        _e_bin(m.payload, 1, lim.max_frame_bytes, "Reconcile.payload"),
        _e_bool(m.reply, "Reconcile.reply"),
    ]


def _e_want(m: Want, lim: WireLimits) -> list[Value]:
    return [_e_ids(m.ids, lim, "Want.ids")]


def _e_ops_msg(m: Ops, lim: WireLimits) -> list[Value]:
    return [_e_ops(m.ops, 0, lim, "Ops.ops")]


def _e_join(m: Join, lim: WireLimits) -> list[Value]:
    return [_e_peer(m.peer, lim, "Join.peer")]


def _e_forward_join(m: ForwardJoin, lim: WireLimits) -> list[Value]:
    return [_e_peer(m.peer, lim, "ForwardJoin.peer"), _e_uint(m.ttl, lim.max_ttl, "ttl")]


def _e_neighbor(m: Neighbor, lim: WireLimits) -> list[Value]:
    return [_e_peer(m.peer, lim, "Neighbor.peer"), _e_bool(m.high_priority, "high_priority")]


def _e_neighbor_reply(m: NeighborReply, lim: WireLimits) -> list[Value]:
    return [_e_bool(m.accepted, "NeighborReply.accepted")]


def _e_disconnect(m: Disconnect, lim: WireLimits) -> list[Value]:
    return []


def _e_shuffle(m: Shuffle, lim: WireLimits) -> list[Value]:
    return [
        _e_peer(m.origin, lim, "Shuffle.origin"),
        _e_peers(m.peers, lim, "Shuffle.peers"),
        _e_uint(m.ttl, lim.max_ttl, "Shuffle.ttl"),
    ]


def _e_shuffle_reply(m: ShuffleReply, lim: WireLimits) -> list[Value]:
    return [_e_peers(m.peers, lim, "ShuffleReply.peers")]


# -- the codec table ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Codec:
    tag: int
    fields: int
    encode: Callable[[object, WireLimits], list[Value]]
    decode: Callable[[_Cursor, WireLimits], Message]


def _codec(
    tag: int, fields: int, enc: Callable[..., list[Value]], dec: Callable[..., Message]
) -> _Codec:
    return _Codec(tag, fields, enc, dec)


_CODECS: dict[type[Message], _Codec] = {
    # handshake
    Hello: _codec(0, 3, _e_hello, _d_hello),
    Goodbye: _codec(1, 1, _e_goodbye, _d_goodbye),
    # push
    Push: _codec(2, 2, _e_push, _d_push),
    IHave: _codec(3, 1, _e_ihave, _d_ihave),
    Graft: _codec(4, 1, _e_graft, _d_graft),
    Prune: _codec(5, 0, _e_prune, _d_prune),
    # pull
    Reconcile: _codec(6, 2, _e_reconcile, _d_reconcile),
    # fetch
    Want: _codec(7, 1, _e_want, _d_want),
    Ops: _codec(8, 1, _e_ops_msg, _d_ops),
    # membership
    Join: _codec(9, 1, _e_join, _d_join),
    ForwardJoin: _codec(10, 2, _e_forward_join, _d_forward_join),
    Neighbor: _codec(11, 2, _e_neighbor, _d_neighbor),
    NeighborReply: _codec(12, 1, _e_neighbor_reply, _d_neighbor_reply),
    Disconnect: _codec(13, 0, _e_disconnect, _d_disconnect),
    Shuffle: _codec(14, 3, _e_shuffle, _d_shuffle),
    ShuffleReply: _codec(15, 1, _e_shuffle_reply, _d_shuffle_reply),
}
_BY_TAG: dict[int, tuple[type[Message], _Codec]] = {c.tag: (t, c) for t, c in _CODECS.items()}

TAGS: dict[type[Message], int] = {t: c.tag for t, c in _CODECS.items()}
"""The wire tag of each message type (the first element of every body)."""
MESSAGE_TYPES: tuple[type[Message], ...] = tuple(_CODECS)
"""Every message type, in tag order."""


def encode_body(message: Message, limits: WireLimits = DEFAULT_WIRE_LIMITS) -> bytes:
    """The canonical body of ``message`` (no length prefix).

    Raises :class:`LocalProtocolError` if the message breaks a limit or a field
    has the wrong type: this node must never send what a peer would refuse.
    """
    codec = _CODECS.get(type(message))
    if codec is None:
        raise LocalProtocolError(f"{type(message).__name__} is not a sync protocol message")
    body = encode([codec.tag, *codec.encode(message, limits)])
    if len(body) > limits.max_frame_bytes:
        raise LocalProtocolError(
            f"{type(message).__name__} of {len(body)} bytes is over the frame limit of "
            f"{limits.max_frame_bytes}; split it into smaller batches"
        )
    return body


def encode_message(message: Message, limits: WireLimits = DEFAULT_WIRE_LIMITS) -> bytes:
    """One frame: the 4-byte big-endian length, then :func:`encode_body`."""
    body = encode_body(message, limits)
    return len(body).to_bytes(LENGTH_BYTES, "big") + body


def decode_body(body: bytes, limits: WireLimits = DEFAULT_WIRE_LIMITS) -> Message:
    """The message a frame body holds. Raises :class:`RemoteProtocolError` (with
    a reason) for anything but the canonical encoding of a message within
    ``limits``; never any other exception."""
    if len(body) > limits.max_frame_bytes:
        raise RemoteProtocolError(f"frame of {len(body)} bytes is over the limit")
    cursor = _Cursor(body)
    count = cursor.array(1, 16, "a message")
    tag = cursor.uint(0xFFFF, "the message type tag")
    entry = _BY_TAG.get(tag)
    if entry is None:
        raise RemoteProtocolError(f"unknown message type tag {tag}")
    kind, codec = entry
    if count - 1 != codec.fields:
        raise RemoteProtocolError(
            f"{kind.__name__} has {count - 1} fields, expected {codec.fields}"
        )
    message = codec.decode(cursor, limits)
    if cursor.pos != len(body):
        raise RemoteProtocolError(f"{len(body) - cursor.pos} extra bytes after {kind.__name__}")
    return message


# -- batching helpers for senders --------------------------------------------------------


def batch_ops(
    ops: Iterable[bytes], limits: WireLimits = DEFAULT_WIRE_LIMITS
) -> Iterator[tuple[bytes, ...]]:
    """Split op bytes into batches that each fit one Push or Ops frame.

    An op over ``limits.max_op_bytes`` raises :class:`LocalProtocolError`.
    """
    batch: list[bytes] = []
    size = OPS_FRAME_OVERHEAD
    for op in ops:
        if not 0 < len(op) <= limits.max_op_bytes:
            raise LocalProtocolError(f"an op of {len(op)} bytes cannot be sent")
        entry = len(op) + OP_ENTRY_OVERHEAD
        if batch and (size + entry > limits.max_frame_bytes or len(batch) >= limits.max_ops):
            yield tuple(batch)
            batch, size = [], OPS_FRAME_OVERHEAD
        batch.append(op)
        size += entry
    if batch:
        yield tuple(batch)


def batch_ids(
    ids: Iterable[bytes], limits: WireLimits = DEFAULT_WIRE_LIMITS
) -> Iterator[tuple[bytes, ...]]:
    """Split ids (repeats removed) into batches for IHave, Graft or Want."""
    batch: list[bytes] = []
    for op_id in dict.fromkeys(ids):
        batch.append(op_id)
        if len(batch) == limits.max_ids:
            yield tuple(batch)
            batch = []
    if batch:
        yield tuple(batch)


# -- the incremental reader --------------------------------------------------------------


class FrameReader:
    """Sans-I/O receive buffer: bytes in, messages out.

    ``feed(data)`` appends a chunk (``b""`` marks the end of the stream);
    ``next_message()`` returns the next complete message or ``None`` if more
    bytes are needed. Once it has raised :class:`RemoteProtocolError` the
    reader is broken and raises the same error again.
    """

    def __init__(self, limits: WireLimits = DEFAULT_WIRE_LIMITS) -> None:
        self.limits = limits
        self._buffer = bytearray()
        self._start = 0  # bytes before this offset are consumed
        self._eof = False
        self._error: RemoteProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as a message."""
        return len(self._buffer) - self._start

    @property
    def at_eof(self) -> bool:
        """The stream ended and every byte of it has been consumed."""
        return self._eof and self.buffered == 0

    def feed(self, data: bytes) -> None:
        """Append ``data``; ``b""`` means the peer closed its side.

        Raises :class:`LocalProtocolError` if fed after the end of the stream,
        or if the caller feeds more than :attr:`WireLimits.max_buffer_bytes`
        without draining complete messages in between.
        """
        if self._eof:
            raise LocalProtocolError("data fed after the end of the stream")
        if not data:
            self._eof = True
            return
        if self.buffered + len(data) > self.limits.max_buffer_bytes:
            raise LocalProtocolError(
                "receive buffer full: feed chunks of at most one frame and drain "
                "next_message() in between"
            )
        if self._start:
            del self._buffer[: self._start]
            self._start = 0
        self._buffer += data

    def next_message(self) -> Message | None:
        """The next complete message, or ``None`` until more bytes arrive."""
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except RemoteProtocolError as exc:
            self._error = exc
            raise

    def _next(self) -> Message | None:
        available = self.buffered
        if available < LENGTH_BYTES:
            if self._eof and available:
                raise RemoteProtocolError("stream ended inside a frame's length prefix")
            return None
        start = self._start
        length = int.from_bytes(self._buffer[start : start + LENGTH_BYTES], "big")
        if length > self.limits.max_frame_bytes:
            raise RemoteProtocolError(
                f"frame of {length} bytes is over the limit of {self.limits.max_frame_bytes}"
            )
        if length == 0:
            raise RemoteProtocolError("empty frame")
        if available < LENGTH_BYTES + length:
            if self._eof:
                raise RemoteProtocolError(
                    f"stream ended inside a frame ({available - LENGTH_BYTES} of {length} bytes)"
                )
            return None
        body = bytes(self._buffer[start + LENGTH_BYTES : start + LENGTH_BYTES + length])
        self._start += LENGTH_BYTES + length
        if self._start == len(self._buffer):
            self._buffer.clear()
            self._start = 0
        return decode_body(body, self.limits)
