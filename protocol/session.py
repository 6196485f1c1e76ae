"""One sync session per connected peer: handshake, fetch, limits (sans-I/O).

Theory of operation. A :class:`SyncSession` owns one stream to one peer. The
driver (the daemon over a libp2p stream, the simulator over its virtual
network) feeds it bytes with :meth:`~SyncSession.receive_data` and gets back
events; it sends whatever :meth:`~SyncSession.data_to_send` returns, calling
it until it returns ``b""``; it calls :meth:`~SyncSession.handle_timer` at
:meth:`~SyncSession.next_deadline`. Nothing here reads a clock or does I/O.

Rule 1, the handshake. Both sides send :class:`Hello` first (the session
queues ours when it is created) and nothing else until the peer's Hello has
arrived. A Hello for another federation, or one whose version range does not
meet ours, is answered with a :class:`Goodbye` saying why, and the session
waits briefly in CLOSING for the peer's own Goodbye or the end of the stream.

Rule 2, the table. Every received message is looked up in
:data:`TRANSITIONS` by ``(state, message type)``. A missing entry (anything but
Hello before the handshake, a Hello after it) is a protocol error. Every
protocol error, from the table, the wire decoder or a limit, sends a Goodbye
with the reason, moves the session to CLOSED and raises
:class:`RemoteProtocolError`; the events of the chunk that failed are dropped
(the ops can be fetched again from honest peers). Only that session closes.

=============  =====================================  ==========================
state          message                                outcome
=============  =====================================  ==========================
AWAIT_HELLO    Hello, same federation, common version ESTABLISHED, Established
AWAIT_HELLO    Hello, other federation or no version  CLOSING, Goodbye, Closed
AWAIT_HELLO    Goodbye                                CLOSED, Closed(by_peer)
AWAIT_HELLO    anything else                          error: CLOSED
ESTABLISHED    Want                                   queued; answered with Ops
ESTABLISHED    Ops                                    OpsReceived
ESTABLISHED    Push, IHave, Graft (rate limited)      MessageReceived
ESTABLISHED    Prune, Reconcile, membership           MessageReceived
ESTABLISHED    Goodbye                                CLOSED, Closed(by_peer)
ESTABLISHED    Hello                                  error: CLOSED
CLOSING        Goodbye                                CLOSED
CLOSING        anything else                          ignored
CLOSED         (no input is read)                     —
=============  =====================================  ==========================

Fetch. The peer's Wants wait in a bounded queue (over it: protocol error);
each is answered by exactly one :class:`Ops` frame, in order, holding the
requested ops that ``lookup`` finds and that fit one frame (the rest are left
out: the peer asks again). Answers are built lazily, only while the outbox is
below a watermark, so a slow reader throttles its own service. Our side:
:meth:`SyncSession.request` queues ids (bounded), and Wants go out in batches
with a bounded number in flight. A Want is settled when its answer arrives (an
Ops frame holding one of its ids, or an empty one, settles it and every older
Want, since answers come in order) or when it times out; ids it did not bring
are reported in a :class:`WantUnanswered` event.

Defence. Ops we did not ask for (in Push or Ops) draw on a per-peer token
bucket, and announced ids (IHave, Graft) on another; excess is dropped and
counted, not an error (pull reconciliation repairs losses). The caller reports
ops that failed validation with :meth:`SyncSession.report_invalid`; over the
misbehaviour budget (a slowly refilling bucket) the session says Goodbye and
closes. Every buffer and queue is bounded by a field of :class:`SessionLimits`.
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeAlias

from archipel.crdt import op_id

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
    Prune,
    Push,
    Reconcile,
    Shuffle,
    ShuffleReply,
    Want,
)
from .wire import (
    DEFAULT_WIRE_LIMITS,
    ID_BYTES,
    MESSAGE_TYPES,
    OP_ENTRY_OVERHEAD,
    OPS_FRAME_OVERHEAD,
    FrameReader,
    WireLimits,
    encode_message,
)

PROTOCOL_VERSION = 1
"""The sync protocol version this code speaks."""

Lookup: TypeAlias = Callable[[bytes], "bytes | None"]
"""Given an op id, the op's signed bytes, or ``None`` if this node lacks it."""


class State(enum.Enum):
    AWAIT_HELLO = "await-hello"
    ESTABLISHED = "established"
    CLOSING = "closing"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """Every bound of a session; the defaults suit a laptop or a Raspberry Pi."""

    wire: WireLimits = DEFAULT_WIRE_LIMITS
    hello_timeout_ms: int = 10_000  # the peer's Hello must arrive by then
    closing_timeout_ms: int = 5_000  # how long CLOSING waits for the peer's Goodbye
    want_batch: int = 512  # ids per Want we send (<= wire.max_ids)
    max_outstanding_wants: int = 4  # our Wants in flight to this peer
    want_timeout_ms: int = 30_000  # a Want unanswered by then is settled as unanswered
    max_request_queue: int = 16_384  # ids waiting to be asked for; more are dropped
    max_queued_wants: int = 16  # the peer's Wants waiting for our answer; more: error
    serve_watermark_bytes: int = 256 * 1024  # build answers only while the outbox is smaller
    max_outbox_bytes: int = 8 << 20  # unsent bytes; the caller must drain data_to_send()
    op_burst: int = 4096  # unsolicited ops: bucket size ...
    op_rate_per_s: int = 2000  # ... and refill per second
    id_burst: int = 16_384  # announced ids (IHave, Graft): bucket size ...
    id_rate_per_s: int = 16_384  # ... and refill per second
    misbehaviour_budget: int = 16  # invalid ops forgiven at once ...
    misbehaviour_refill_ms: int = 60_000  # ... and one more forgiven per this many ms

    def __post_init__(self) -> None:
        if not 0 < self.want_batch <= self.wire.max_ids:
            raise LocalProtocolError("want_batch must be between 1 and wire.max_ids")
        if self.serve_watermark_bytes + self.wire.max_frame_bytes > self.max_outbox_bytes:
            raise LocalProtocolError("max_outbox_bytes must leave room for one answer frame")


DEFAULT_SESSION_LIMITS = SessionLimits()


# -- events ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Established:
    """The handshake succeeded; ``version`` is the protocol version in use."""

    version: int


@dataclass(frozen=True, slots=True)
class OpsReceived:
    """Op bytes from an Ops frame, not yet validated: give them to the replica and
    report the ones that fail with :meth:`SyncSession.report_invalid`."""

    ops: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """A push, pull or membership message for the other state machines
    (Push, IHave, Graft, Prune, Reconcile, Join, ... ShuffleReply)."""

    message: Message


@dataclass(frozen=True, slots=True)
class WantUnanswered:
    """Ids we asked this peer for that its answer lacked, or whose Want timed out."""

    ids: tuple[bytes, ...]
    timed_out: bool


@dataclass(frozen=True, slots=True)
class Closed:
    """The session closed (CLOSING or CLOSED): ``by_peer`` if the peer said
    Goodbye or ended the stream, else we refused the peer for ``reason``."""

    reason: str
    by_peer: bool


Event: TypeAlias = Established | OpsReceived | MessageReceived | WantUnanswered | Closed


@dataclass(slots=True)
class SessionStats:
    """Counters, for logs and tests. Read-only for callers."""

    frames_in: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    frames_ignored: int = 0  # read while CLOSING
    ops_received: int = 0
    ops_dropped: int = 0  # unsolicited ops over the rate limit
    ids_dropped: int = 0  # announced ids over the rate limit
    wants_received: int = 0
    wants_served: int = 0
    ops_served: int = 0
    ops_left_out: int = 0  # asked for, but lookup had none, or it did not fit the answer
    wants_sent: int = 0
    requests_dropped: int = 0  # ids not queued: the request queue was full
    invalid_reported: int = 0


class TokenBucket:
    """An integer token bucket driven by the caller's clock: ``capacity`` tokens,
    ``refill_tokens`` more every ``refill_ms``. Exact, no floats."""

    __slots__ = ("_capacity", "_last_ms", "_refill_ms", "_refill_tokens", "_units")

    def __init__(self, capacity: int, refill_tokens: int, refill_ms: int, now_ms: int) -> None:
        # One token is ``refill_ms`` units; each elapsed ms adds ``refill_tokens`` units.
        self._refill_tokens, self._refill_ms = refill_tokens, refill_ms
        self._capacity = capacity * refill_ms
        self._units = self._capacity
        self._last_ms = now_ms

    def take(self, n: int, now_ms: int) -> int:
        """Take up to ``n`` tokens; return how many were available and taken."""
        if now_ms > self._last_ms:
            gained = (now_ms - self._last_ms) * self._refill_tokens
            self._units = min(self._capacity, self._units + gained)
            self._last_ms = now_ms
        taken = min(n, self._units // self._refill_ms)
        self._units -= taken * self._refill_ms
        return taken


@dataclass(slots=True)
class _WantSent:
    """One of our Wants in flight: what it asked, what has not come yet."""

    serial: int
    ids: tuple[bytes, ...]
    pending: set[bytes]
    deadline_ms: int


def _truncate_utf8(text: str, limit: int) -> str:
    data = text.encode("utf-8", "replace")[:limit]
    return data.decode("utf-8", "ignore")


class SyncSession:
    """The sync protocol with one peer (see the module docstring)."""

    def __init__(
        self,
        federation: bytes,
        lookup: Lookup,
        now_ms: int,
        *,
        versions: tuple[int, int] = (PROTOCOL_VERSION, PROTOCOL_VERSION),
        limits: SessionLimits = DEFAULT_SESSION_LIMITS,
    ) -> None:
        self.federation = federation
        self.versions = versions
        self.limits = limits
        self.state = State.AWAIT_HELLO
        self.version: int | None = None
        self.close_reason: str | None = None  # ours or the peer's, once closing
        self.stats = SessionStats()
        self._lookup = lookup
        self._reader = FrameReader(limits.wire)
        self._outbox = bytearray()
        self._deadline: int | None = now_ms + limits.hello_timeout_ms  # hello or closing
        self._requests: dict[bytes, None] = {}  # ids to ask for, in order (a bounded set)
        self._outstanding: deque[_WantSent] = deque()
        self._want_of: dict[bytes, _WantSent] = {}  # every id of every Want in flight
        self._serials = itertools.count()
        self._serving: deque[tuple[bytes, ...]] = deque()  # the peer's Wants, to answer
        self._op_bucket = TokenBucket(limits.op_burst, limits.op_rate_per_s, 1000, now_ms)
        self._id_bucket = TokenBucket(limits.id_burst, limits.id_rate_per_s, 1000, now_ms)
        self._blame = TokenBucket(
            limits.misbehaviour_budget, 1, limits.misbehaviour_refill_ms, now_ms
        )
        self._emit(Hello(versions[0], versions[1], federation))

    @property
    def closed(self) -> bool:
        """The session is CLOSED: drop the stream after sending data_to_send()."""
        return self.state is State.CLOSED

    # -- driver API -------------------------------------------------------------------

    def receive_data(self, data: bytes, now_ms: int) -> list[Event]:
        """Take bytes from the peer (``b""``: it closed its side); return events.

        Raises :class:`RemoteProtocolError` if the peer broke the protocol; the
        session is then CLOSED with a Goodbye in :meth:`data_to_send`.
        """
        if self.state is State.CLOSED:
            return []
        self.stats.bytes_in += len(data)
        events: list[Event] = []
        try:
            if not data:
                self._reader.feed(b"")
                self._drain(events, now_ms)
                events.extend(self._on_end_of_stream())
            step = self.limits.wire.max_frame_bytes
            for start in range(0, len(data), step):
                if self.closed:
                    break
                self._reader.feed(data[start : start + step])
                self._drain(events, now_ms)
            self._pump(now_ms)
        except RemoteProtocolError as exc:
            self._fail(exc.reason)
            raise
        return events

    def data_to_send(self) -> bytes:
        """Bytes to write to the peer. Call until it returns ``b""``: each call
        may build answers to the peer's Wants while the outbox is short."""
        if self._serving and self.state is State.ESTABLISHED:
            while self._serving and len(self._outbox) < self.limits.serve_watermark_bytes:
                self._serve(self._serving.popleft())
        if not self._outbox:
            return b""  # the usual last call of a drain loop: nothing to copy
        out = bytes(self._outbox)
        self._outbox.clear()
        self.stats.bytes_out += len(out)
        return out

    def next_deadline(self) -> int | None:
        """When :meth:`handle_timer` must be called next (ms), if ever."""
        if self.state is State.ESTABLISHED:
            return self._outstanding[0].deadline_ms if self._outstanding else None
        return None if self.state is State.CLOSED else self._deadline

    def handle_timer(self, now_ms: int) -> list[Event]:
        """Act on deadlines that have passed: a missing Hello, a CLOSING that
        lasted long enough, Wants that timed out."""
        events: list[Event] = []
        due = self._deadline is not None and now_ms >= self._deadline
        if self.state is State.AWAIT_HELLO and due:
            reason = f"no Hello within {self.limits.hello_timeout_ms} ms"
            events.append(self._close_now(reason))
        elif self.state is State.CLOSING and due:
            self._enter_closed()
        elif self.state is State.ESTABLISHED:
            while self._outstanding and self._outstanding[0].deadline_ms <= now_ms:
                events.extend(self._settle(self._outstanding[0].serial, timed_out=True))
            self._pump(now_ms)
        return events

    # -- caller API -------------------------------------------------------------------

    def send(self, message: Message) -> None:
        """Queue a push, pull, membership or Ops message for the peer.

        Raises :class:`LocalProtocolError` outside ESTABLISHED, for Hello,
        Goodbye and Want (use :meth:`close` and :meth:`request`), for an empty
        Ops (it would read as the answer to a Want), for a message over a wire
        limit, or if the outbox is full.
        """
        if self.state is not State.ESTABLISHED:
            raise LocalProtocolError(
                f"cannot send {type(message).__name__}: session is {self.state.value}"
            )
        if isinstance(message, Hello | Goodbye | Want):
            raise LocalProtocolError(
                f"{type(message).__name__} is the session's own: use close() or request()"
            )
        if isinstance(message, Ops) and not message.ops:
            raise LocalProtocolError("an empty Ops answers a Want: only the session sends one")
        self._emit(message)

    def request(self, ids: Iterable[bytes], now_ms: int) -> int:
        """Ask the peer for these ops; return how many ids were newly queued.

        Ids already queued or in flight are skipped; ids beyond
        ``max_request_queue`` are dropped (counted). Nothing is queued once the
        session is closing.
        """
        if self.state in (State.CLOSING, State.CLOSED):
            return 0
        queued = 0
        for op in ids:
            if not isinstance(op, bytes) or len(op) != ID_BYTES:
                raise LocalProtocolError("op ids are 32 bytes")
            if op in self._requests or op in self._want_of:
                continue
            if len(self._requests) >= self.limits.max_request_queue:
                self.stats.requests_dropped += 1
                continue
            self._requests[op] = None
            queued += 1
        self._pump(now_ms)
        return queued

    def pending_requests(self) -> tuple[bytes, ...]:
        """Ids requested from this peer that have not arrived (queued or in flight),
        e.g. to ask another peer once this session has closed."""
        in_flight = (i for want in self._outstanding for i in want.ids if i in want.pending)
        return (*self._requests, *in_flight)

    def report_invalid(self, reason: str, now_ms: int) -> list[Event]:
        """Count an op from this peer that failed validation. Over the
        misbehaviour budget, say Goodbye and close (returns the Closed event)."""
        self.stats.invalid_reported += 1
        if self.state in (State.CLOSING, State.CLOSED) or self._blame.take(1, now_ms) == 1:
            return []
        why = f"too many invalid ops ({self.stats.invalid_reported}); the last: {reason}"
        return [self._close_now(why)]

    def close(self, reason: str, now_ms: int) -> None:
        """Say Goodbye with ``reason`` and wait (CLOSING) for the peer's Goodbye."""
        if self.state in (State.AWAIT_HELLO, State.ESTABLISHED):
            self._start_closing(reason, now_ms)

    # -- internals: receiving -----------------------------------------------------------

    def _drain(self, events: list[Event], now_ms: int) -> None:
        while self.state is not State.CLOSED:
            message = self._reader.next_message()
            if message is None:
                return
            self.stats.frames_in += 1
            transition = TRANSITIONS.get((self.state, type(message)))
            if transition is None:
                name = type(message).__name__
                if self.state is State.AWAIT_HELLO:
                    raise RemoteProtocolError(f"{name} before the handshake (Hello comes first)")
                raise RemoteProtocolError(f"{name} after the handshake")
            events.extend(transition.action(self, message, now_ms))

    def _on_end_of_stream(self) -> list[Event]:
        if self.state is State.CLOSING:
            self._enter_closed()
            return []
        if self.state is State.CLOSED:
            return []
        reason = "the peer ended the stream without a Goodbye"
        self.close_reason = reason
        self._enter_closed()
        return [Closed(reason, by_peer=True)]

    def _on_hello(self, message: Hello, now_ms: int) -> list[Event]:
        if message.federation != self.federation:
            return self._refuse(
                f"wrong federation: this node is in federation {self.federation.hex()[:16]}, "
                f"the peer in {message.federation.hex()[:16]}",
                now_ms,
            )
        low = max(self.versions[0], message.min_version)
        high = min(self.versions[1], message.max_version)
        if low > high:
            return self._refuse(
                f"no common protocol version: this node speaks {self.versions[0]} to "
                f"{self.versions[1]}, the peer {message.min_version} to {message.max_version}",
                now_ms,
            )
        self.state, self.version, self._deadline = State.ESTABLISHED, high, None
        return [Established(high)]

    def _on_goodbye(self, message: Goodbye, now_ms: int) -> list[Event]:
        self.close_reason = message.reason
        self._enter_closed()
        return [Closed(message.reason, by_peer=True)]

    def _on_goodbye_closing(self, message: Goodbye, now_ms: int) -> list[Event]:
        self._enter_closed()
        return []

    def _on_ignore(self, message: Message, now_ms: int) -> list[Event]:
        self.stats.frames_ignored += 1
        return []

    def _on_pass(self, message: Message, now_ms: int) -> list[Event]:
        return [MessageReceived(message)]

    def _on_announce(self, message: IHave | Graft, now_ms: int) -> list[Event]:
        allowed = self._id_bucket.take(len(message.ids), now_ms)
        self.stats.ids_dropped += len(message.ids) - allowed
        if allowed == 0:
            return []
        if allowed < len(message.ids):
            message = type(message)(message.ids[:allowed])
        return [MessageReceived(message)]

    def _on_push(self, message: Push, now_ms: int) -> list[Event]:
        ops, _ = self._admit(message.ops, now_ms)
        return [MessageReceived(Push(ops, message.urgent))] if ops else []

    def _on_ops(self, message: Ops, now_ms: int) -> list[Event]:
        ops, answered = self._admit(message.ops, now_ms)
        events: list[Event] = [OpsReceived(ops)] if ops else []
        if answered is None and not message.ops and self._outstanding:
            answered = self._outstanding[0]  # an empty Ops answers the oldest Want
        if answered is not None:
            events.extend(self._settle(answered.serial, timed_out=False))
        return events

    def _on_want(self, message: Want, now_ms: int) -> list[Event]:
        if len(self._serving) >= self.limits.max_queued_wants:
            raise RemoteProtocolError(
                f"more than {self.limits.max_queued_wants} Wants waiting for an answer"
            )
        self.stats.wants_received += 1
        self._serving.append(message.ids)
        return []

    def _admit(
        self, ops: tuple[bytes, ...], now_ms: int
    ) -> tuple[tuple[bytes, ...], _WantSent | None]:
        """The ops to deliver: those we asked for, and unsolicited ones while the
        rate bucket lasts. Also returns the newest Want these ops answer."""
        accepted: list[bytes] = []
        newest: _WantSent | None = None
        for op in ops:
            oid = op_id(op) if self._want_of else b""
            want = self._want_of.get(oid) if oid else None
            if want is not None:
                want.pending.discard(oid)
                if newest is None or want.serial > newest.serial:
                    newest = want
            elif self._op_bucket.take(1, now_ms) == 0:
                self.stats.ops_dropped += 1
                continue
            accepted.append(op)
        self.stats.ops_received += len(accepted)
        return tuple(accepted), newest

    # -- internals: fetching and serving ---------------------------------------------------

    def _pump(self, now_ms: int) -> None:
        """Send Wants for queued ids while fewer than the limit are in flight."""
        while (
            self.state is State.ESTABLISHED
            and self._requests
            and len(self._outstanding) < self.limits.max_outstanding_wants
        ):
            ids = tuple(itertools.islice(self._requests, self.limits.want_batch))
            for op in ids:
                del self._requests[op]
            want = _WantSent(
                next(self._serials), ids, set(ids), now_ms + self.limits.want_timeout_ms
            )
            self._outstanding.append(want)
            self._want_of.update(dict.fromkeys(ids, want))
            self.stats.wants_sent += 1
            self._emit(Want(ids))

    def _settle(self, serial: int, *, timed_out: bool) -> list[Event]:
        """Settle every Want in flight up to ``serial``; report what did not come."""
        events: list[Event] = []
        while self._outstanding and self._outstanding[0].serial <= serial:
            want = self._outstanding.popleft()
            for op in want.ids:
                del self._want_of[op]
            missing = tuple(op for op in want.ids if op in want.pending)
            if missing:
                events.append(WantUnanswered(missing, timed_out))
        return events

    def _serve(self, ids: tuple[bytes, ...]) -> None:
        """Answer one Want with one Ops frame: the ops we hold that fit."""
        wire = self.limits.wire
        batch: list[bytes] = []
        size = OPS_FRAME_OVERHEAD
        for op_id_ in ids:
            op = self._lookup(op_id_)
            entry = len(op) + OP_ENTRY_OVERHEAD if op is not None else 0
            if (
                op is None
                or not 0 < len(op) <= wire.max_op_bytes
                or size + entry > wire.max_frame_bytes
                or len(batch) >= wire.max_ops
            ):
                self.stats.ops_left_out += 1
                continue
            batch.append(op)
            size += entry
        self.stats.wants_served += 1
        self.stats.ops_served += len(batch)
        self._emit(Ops(tuple(batch)))

    # -- internals: sending and closing ----------------------------------------------------

    def _emit(self, message: Message) -> None:
        frame = encode_message(message, self.limits.wire)
        if len(self._outbox) + len(frame) > self.limits.max_outbox_bytes:
            raise LocalProtocolError("outbox full: send data_to_send() to the peer first")
        self._outbox += frame

    def _goodbye(self, reason: str) -> None:
        """Queue a Goodbye, whatever the outbox holds (it is the last message)."""
        limit = self.limits.wire.max_reason_bytes
        self._outbox += encode_message(Goodbye(_truncate_utf8(reason, limit)), self.limits.wire)

    def _refuse(self, reason: str, now_ms: int) -> list[Event]:
        self._start_closing(reason, now_ms)
        return [Closed(reason, by_peer=False)]

    def _start_closing(self, reason: str, now_ms: int) -> None:
        self._goodbye(reason)
        self.close_reason = reason
        self.state = State.CLOSING
        self._deadline = now_ms + self.limits.closing_timeout_ms
        self._serving.clear()

    def _close_now(self, reason: str) -> Closed:
        self._goodbye(reason)
        self.close_reason = reason
        self._enter_closed()
        return Closed(reason, by_peer=False)

    def _fail(self, reason: str) -> None:
        """The peer broke the protocol: Goodbye with the reason (unless we said
        Goodbye already), then CLOSED."""
        if self.state is State.CLOSING:
            self._enter_closed()
        elif self.state is not State.CLOSED:
            self._close_now(f"protocol error: {reason}")

    def _enter_closed(self) -> None:
        self.state = State.CLOSED
        self._deadline = None
        self._serving.clear()


# -- the transition table -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Transition:
    """What a message does in a state: the handler, and the states it may lead to."""

    action: Callable[[SyncSession, Any, int], list[Event]]
    next: frozenset[State]


def _t(action: Callable[[SyncSession, Any, int], list[Event]], *next_: State) -> Transition:
    return Transition(action, frozenset(next_))


_AWAIT, _EST, _CLOSING = State.AWAIT_HELLO, State.ESTABLISHED, State.CLOSING
_PASS_THROUGH: tuple[type[Message], ...] = (
    Prune, Reconcile, Join, ForwardJoin, Neighbor, NeighborReply, Disconnect, Shuffle,
    ShuffleReply,
)  # fmt: skip

TRANSITIONS: dict[tuple[State, type[Message]], Transition] = {
    (_AWAIT, Hello): _t(SyncSession._on_hello, _EST, _CLOSING),
    (_AWAIT, Goodbye): _t(SyncSession._on_goodbye, State.CLOSED),
    (_EST, Goodbye): _t(SyncSession._on_goodbye, State.CLOSED),
    (_EST, Want): _t(SyncSession._on_want, _EST),
    (_EST, Ops): _t(SyncSession._on_ops, _EST),
    (_EST, Push): _t(SyncSession._on_push, _EST),
    (_EST, IHave): _t(SyncSession._on_announce, _EST),
    (_EST, Graft): _t(SyncSession._on_announce, _EST),
    **{(_EST, kind): _t(SyncSession._on_pass, _EST) for kind in _PASS_THROUGH},
    (_CLOSING, Goodbye): _t(SyncSession._on_goodbye_closing, State.CLOSED),
    **{
        (_CLOSING, kind): _t(SyncSession._on_ignore, _CLOSING)
        for kind in MESSAGE_TYPES
        if kind is not Goodbye
    },
}
"""``(state, message type) -> Transition``; a pair not listed is a protocol error.
CLOSED reads no input at all."""
