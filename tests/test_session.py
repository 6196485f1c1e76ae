"""The per-peer sync session: handshake, fetch between two replicas, the
transition table, timers, and hostile peers (typed errors, bounded memory,
only the offending session closes)."""

from __future__ import annotations

import random
import tracemalloc
from collections.abc import Callable, Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_wire import MESSAGES

from archipel.crdt import InvalidOp, Replica, op_id
from archipel.protocol.errors import LocalProtocolError, RemoteProtocolError
from archipel.protocol.messages import (
    Goodbye,
    Hello,
    IHave,
    Message,
    Ops,
    Push,
    Reconcile,
    Want,
)
from archipel.protocol.session import (
    TRANSITIONS,
    Closed,
    Established,
    Event,
    MessageReceived,
    OpsReceived,
    SessionLimits,
    State,
    SyncSession,
    TokenBucket,
    WantUnanswered,
)
from archipel.protocol.wire import (
    DEFAULT_WIRE_LIMITS,
    MESSAGE_TYPES,
    FrameReader,
    batch_ids,
    encode_message,
)
from archipel.simulations.workload import Workload

T = 1_750_000_000_000
FED = bytes(range(32))
OTHER_FED = bytes(range(1, 33))


def nothing(_: bytes) -> bytes | None:
    return None


def decode_stream(data: bytes) -> list[Message]:
    reader = FrameReader()
    out: list[Message] = []
    for start in range(0, len(data), DEFAULT_WIRE_LIMITS.max_frame_bytes):
        reader.feed(data[start : start + DEFAULT_WIRE_LIMITS.max_frame_bytes])
        while (message := reader.next_message()) is not None:
            out.append(message)
    return out


def hello(fed: bytes = FED, low: int = 1, high: int = 1) -> bytes:
    return encode_message(Hello(low, high, fed))


def established(lookup: Callable[[bytes], bytes | None] = nothing, **limits: int) -> SyncSession:
    """A session that has done its handshake, with its Hello already sent."""
    session = SyncSession(FED, lookup, T, limits=SessionLimits(**limits))
    assert session.receive_data(hello(), T) == [Established(1)]
    session.data_to_send()
    return session


# -- the pair harness: two nodes, each a replica driving a session -------------------------


class Node:
    """A minimal driver: announces what it holds, asks for what it lacks,
    feeds received ops to its replica."""

    def __init__(
        self,
        replica: Replica,
        now: int,
        *,
        fed: bytes | None = None,
        versions: tuple[int, int] = (1, 1),
        limits: SessionLimits | None = None,
    ) -> None:
        self.replica = replica
        self.session = SyncSession(
            fed if fed is not None else replica.federation,
            self.lookup,
            now,
            versions=versions,
            limits=limits or SessionLimits(),
        )
        self.events: list[Event] = []

    def lookup(self, op: bytes) -> bytes | None:
        found = self.replica.graph.get(op)
        return found.data if found is not None else None

    def react(self, events: list[Event], now: int) -> None:
        self.events.extend(events)
        for event in events:
            if isinstance(event, Established):
                held = (op.id for op in self.replica.graph.topological())
                for batch in batch_ids(held):
                    self.session.send(IHave(batch))
            elif isinstance(event, MessageReceived) and isinstance(event.message, IHave):
                lacking = [i for i in event.message.ids if i not in self.replica.graph]
                self.session.request(lacking, now)
            elif isinstance(event, OpsReceived):
                for data in event.ops:
                    try:
                        self.replica.receive_bytes(data, now)
                    except InvalidOp as exc:
                        self.react(self.session.report_invalid(exc.reason, now), now)
                self.session.request(self.replica.graph.missing(), now)


class Pair:
    """Two nodes joined by an in-memory byte pipe cut into chunks; time steps."""

    def __init__(self, a: Node, b: Node, now: int, chunk: int = 1 << 16) -> None:
        self.a, self.b, self.now, self.chunk = a, b, now, chunk
        self.wire: list[tuple[str, bytes]] = []  # every chunk, for inspection

    def deliver(self, src: Node, dst: Node, name: str) -> bool:
        moved = False
        while data := src.session.data_to_send():
            moved = True
            for start in range(0, len(data), self.chunk):
                piece = data[start : start + self.chunk]
                self.wire.append((name, piece))
                dst.react(dst.session.receive_data(piece, self.now), self.now)
        return moved

    def run(self, rounds: int = 500, step_ms: int = 10) -> int:
        """Exchange until both outboxes are empty; return the rounds it took."""
        for count in range(rounds):
            moved = self.deliver(self.a, self.b, "a->b") | self.deliver(self.b, self.a, "b->a")
            self.now += step_ms
            for node in (self.a, self.b):
                deadline = node.session.next_deadline()
                if deadline is not None and deadline <= self.now:
                    node.react(node.session.handle_timer(self.now), self.now)
                    moved = True
            if not moved:
                return count
        raise AssertionError("the pair did not go quiet")


def diverged_replicas(seed: int, ops: int) -> tuple[Replica, Replica, int]:
    """Two replicas of one federation with different (overlapping) op sets."""
    workload = Workload(random.Random(seed), cells=3, sites=2, sync_every=25)
    workload.run(ops)
    a, b = workload.sites
    return a, b, workload.now_ms


def ids_of(replica: Replica) -> set[bytes]:
    return {op.id for op in replica.graph.topological()}


@settings(max_examples=30)
@given(
    st.integers(0, 2**32),
    st.integers(10, 40),
    st.sampled_from([7, 100, 4096, 1 << 16]),
    st.sampled_from([1, 3, 512]),
)
def test_two_replicas_reach_the_union_through_want_and_ops(
    seed: int, ops: int, chunk: int, want_batch: int
) -> None:
    a, b, now = diverged_replicas(seed, ops)
    union = ids_of(a) | ids_of(b)
    limits = SessionLimits(want_batch=want_batch, max_outstanding_wants=2)
    pair = Pair(Node(a, now, limits=limits), Node(b, now, limits=limits), now, chunk)
    pair.run()
    assert ids_of(a) == ids_of(b) == union
    assert a.state_hash() == b.state_hash()
    for node in (pair.a, pair.b):
        assert node.session.state is State.ESTABLISHED
        assert node.events[0] == Established(1)
        assert node.session.stats.invalid_reported == 0
        assert node.session.pending_requests() == ()


def test_the_highest_common_version_is_chosen() -> None:
    a, b, now = diverged_replicas(1, 5)
    pair = Pair(Node(a, now, versions=(1, 3)), Node(b, now, versions=(2, 5)), now)
    pair.run()
    assert pair.a.session.version == pair.b.session.version == 3
    assert pair.a.events[0] == pair.b.events[0] == Established(3)


@pytest.mark.parametrize(
    ("fed_b", "versions_b", "why"),
    [
        (OTHER_FED, (1, 1), "wrong federation"),
        (None, (2, 4), "no common protocol version"),
    ],
)
def test_a_mismatch_closes_both_sides_cleanly_with_the_reason(
    fed_b: bytes | None, versions_b: tuple[int, int], why: str
) -> None:
    a, b, now = diverged_replicas(2, 5)
    pair = Pair(Node(a, now, versions=(1, 1)), Node(b, now, fed=fed_b, versions=versions_b), now)
    pair.run()
    for node in (pair.a, pair.b):
        (closed,) = node.events  # no Established, no exception: one Closed event
        assert isinstance(closed, Closed)
        assert why in closed.reason
        assert not closed.by_peer
        assert node.session.state is State.CLOSED  # the peer's Goodbye ended CLOSING
    sent = decode_stream(b"".join(data for name, data in pair.wire if name == "a->b"))
    assert isinstance(sent[0], Hello)
    assert isinstance(sent[-1], Goodbye)
    assert why in sent[-1].reason


# -- fetch in bounded batches -----------------------------------------------------------------


def blobs(count: int, size: int = 200) -> dict[bytes, bytes]:
    """Fake op bytes keyed by their id (the session does not validate ops)."""
    data = [i.to_bytes(4, "big") * (size // 4) for i in range(count)]
    return {op_id(d): d for d in data}


def exchange(server: SyncSession, client: SyncSession, now: int) -> list[Event]:
    """Move bytes both ways until quiet; return the client's events."""
    events: list[Event] = []
    while True:
        to_client = server.data_to_send()
        events += client.receive_data(to_client, now) if to_client else []
        to_server = client.data_to_send()
        if to_server:
            server.receive_data(to_server, now)
        if not to_client and not to_server:
            return events


def test_a_large_request_is_served_in_bounded_batches_with_a_bounded_window() -> None:
    store = blobs(10_000)
    server = established(store.get)
    client = established()
    limits = client.limits
    assert client.request(list(store), T) == 10_000
    received: list[bytes] = []
    in_flight_max = 0
    while True:
        frames = decode_stream(client.data_to_send())
        wants = [m for m in frames if isinstance(m, Want)]
        assert all(len(w.ids) <= limits.want_batch for w in wants)
        in_flight_max = max(in_flight_max, client.stats.wants_sent - server.stats.wants_served)
        if frames:
            server.receive_data(encode_many(frames), T)
        answer = server.data_to_send()
        if not frames and not answer:
            break
        assert len(answer) <= limits.serve_watermark_bytes + DEFAULT_WIRE_LIMITS.max_frame_bytes
        events = client.receive_data(answer, T)
        received += [op for e in events if isinstance(e, OpsReceived) for op in e.ops]
    assert sorted(received) == sorted(store.values())
    assert in_flight_max <= limits.max_outstanding_wants
    assert client.stats.wants_sent == 10_000 // limits.want_batch + 1
    assert server.stats.ops_served == 10_000
    assert client.next_deadline() is None  # nothing left in flight


def encode_many(messages: Iterable[Message]) -> bytes:
    return b"".join(encode_message(m) for m in messages)


def test_ids_the_peer_lacks_are_reported_unanswered() -> None:
    store = blobs(10)
    present = dict(list(store.items())[:6])
    server, client = established(present.get), established()
    client.request(list(store), T)
    events = exchange(server, client, T)
    got = [op for e in events if isinstance(e, OpsReceived) for op in e.ops]
    assert sorted(got) == sorted(present.values())
    (unanswered,) = [e for e in events if isinstance(e, WantUnanswered)]
    assert set(unanswered.ids) == set(store) - set(present)
    assert not unanswered.timed_out
    assert client.pending_requests() == ()


def test_ops_that_do_not_fit_one_frame_are_left_out_and_asked_again() -> None:
    store = blobs(40, size=60_000)  # 2.4 MB: an answer holds at most 17 of them
    server, client = established(store.get), established()
    client.request(list(store), T)
    events = exchange(server, client, T)
    first = [op for e in events if isinstance(e, OpsReceived) for op in e.ops]
    (unanswered,) = [e for e in events if isinstance(e, WantUnanswered)]
    assert 0 < len(first) < 40
    assert len(first) + len(unanswered.ids) == 40
    while unanswered.ids:  # the caller asks again for what did not come
        client.request(unanswered.ids, T)
        events = exchange(server, client, T)
        first += [op for e in events if isinstance(e, OpsReceived) for op in e.ops]
        rest = [e for e in events if isinstance(e, WantUnanswered)]
        unanswered = rest[0] if rest else WantUnanswered((), False)
    assert sorted(first) == sorted(store.values())


def test_an_unanswered_want_times_out_and_frees_its_slot() -> None:
    limits = {"max_outstanding_wants": 1, "want_batch": 2, "want_timeout_ms": 1000}
    client = established(**limits)
    ids = list(blobs(4))
    client.request(ids, T)
    (first,) = decode_stream(client.data_to_send())
    assert first == Want(tuple(ids[:2]))
    assert client.next_deadline() == T + 1000
    assert client.handle_timer(T + 999) == []
    events = client.handle_timer(T + 1000)
    assert events == [WantUnanswered(tuple(ids[:2]), timed_out=True)]
    (second,) = decode_stream(client.data_to_send())
    assert second == Want(tuple(ids[2:]))
    assert client.next_deadline() == T + 2000


def test_an_empty_ops_answers_the_oldest_want() -> None:
    client = established(want_batch=1)
    a, b = list(blobs(2))
    client.request([a, b], T)
    client.data_to_send()
    assert client.receive_data(encode_message(Ops(())), T) == [WantUnanswered((a,), False)]
    assert client.pending_requests() == (b,)


def test_requests_are_bounded_and_deduplicated() -> None:
    client = SyncSession(FED, nothing, T, limits=SessionLimits(max_request_queue=100))
    ids = [i.to_bytes(32, "big") for i in range(150)]
    assert client.request(ids, T) == 100  # not established yet: queued only
    assert client.request(ids, T) == 0
    assert client.stats.requests_dropped == 100
    assert len(client.pending_requests()) == 100
    with pytest.raises(LocalProtocolError, match="32 bytes"):
        client.request([b"short"], T)


# -- the transition table -------------------------------------------------------------------


def session_in(state: State) -> SyncSession:
    session = SyncSession(FED, nothing, T)
    if state is not State.AWAIT_HELLO:
        session.receive_data(hello(), T)
    if state is State.CLOSING:
        session.close("bye", T)
    if state is State.CLOSED:
        session.receive_data(encode_message(Goodbye("done")), T)
    session.data_to_send()
    assert session.state is state
    return session


def test_the_table_allows_exactly_the_documented_pairs() -> None:
    allowed = {(s, t) for s, t in TRANSITIONS}
    assert {t for s, t in allowed if s is State.AWAIT_HELLO} == {Hello, Goodbye}
    assert {t for s, t in allowed if s is State.ESTABLISHED} == set(MESSAGE_TYPES) - {Hello}
    assert {t for s, t in allowed if s is State.CLOSING} == set(MESSAGE_TYPES)
    assert not any(s is State.CLOSED for s, _ in allowed)


@pytest.mark.parametrize("kind", MESSAGE_TYPES, ids=lambda kind: kind.__name__)
@pytest.mark.parametrize("state", list(State), ids=lambda state: state.value)
@settings(max_examples=10)
@given(data=st.data())
def test_every_state_and_message_either_transitions_or_closes_with_an_error(
    state: State, kind: type[Message], data: st.DataObject
) -> None:
    message = data.draw(MESSAGES[kind])
    session = session_in(state)
    transition = TRANSITIONS.get((state, kind))
    if state is State.CLOSED:
        assert session.receive_data(encode_message(message), T) == []
        assert session.data_to_send() == b""
    elif transition is None:
        with pytest.raises(RemoteProtocolError) as info:
            session.receive_data(encode_message(message), T)
        assert session.state is State.CLOSED
        (goodbye,) = decode_stream(session.data_to_send())
        assert goodbye == Goodbye(f"protocol error: {info.value.reason}")
        assert kind.__name__ in info.value.reason
    else:
        session.receive_data(encode_message(message), T)
        assert session.state in transition.next


def test_hello_must_come_first_and_only_once() -> None:
    early = SyncSession(FED, nothing, T)
    with pytest.raises(RemoteProtocolError, match="Want before the handshake"):
        early.receive_data(encode_message(Want((FED,))), T)
    late = established()
    with pytest.raises(RemoteProtocolError, match="Hello after the handshake"):
        late.receive_data(hello(), T)


def test_a_hello_and_messages_in_one_chunk_are_all_read() -> None:
    session = SyncSession(FED, nothing, T)
    chunk = hello() + encode_message(Reconcile(b"a")) + encode_message(Goodbye("bye"))
    assert session.receive_data(chunk, T) == [
        Established(1),
        MessageReceived(Reconcile(b"a")),
        Closed("bye", by_peer=True),
    ]
    assert session.receive_data(hello(), T) == []  # CLOSED reads nothing


# -- timers and closing -------------------------------------------------------------------


def test_a_peer_that_never_says_hello_is_closed_at_the_deadline() -> None:
    session = SyncSession(FED, nothing, T)
    assert session.next_deadline() == T + 10_000
    assert session.handle_timer(T + 9_999) == []
    (closed,) = session.handle_timer(T + 10_000)
    assert closed == Closed("no Hello within 10000 ms", by_peer=False)
    assert decode_stream(session.data_to_send())[-1] == Goodbye("no Hello within 10000 ms")
    assert session.closed
    assert session.next_deadline() is None


def test_close_waits_for_the_peers_goodbye_or_the_timeout() -> None:
    session = established()
    session.close("shutting down", T)
    assert decode_stream(session.data_to_send()) == [Goodbye("shutting down")]
    assert session.state is State.CLOSING
    assert session.receive_data(encode_message(IHave((FED,))), T) == []  # in flight: ignored
    assert session.stats.frames_ignored == 1
    assert session.next_deadline() == T + 5_000
    session.handle_timer(T + 5_000)
    assert session.closed
    other = established()
    other.close("bye", T)
    other.receive_data(encode_message(Goodbye("bye too")), T)
    assert other.closed
    broken = established()
    broken.close("bye", T)
    broken.data_to_send()
    with pytest.raises(RemoteProtocolError):
        broken.receive_data(b"\x00\x00\x00\x00", T)
    assert broken.closed
    assert broken.data_to_send() == b""  # one Goodbye only


def test_the_end_of_the_stream() -> None:
    clean = established()
    assert clean.receive_data(b"", T) == [
        Closed("the peer ended the stream without a Goodbye", by_peer=True)
    ]
    cut = established()
    cut.receive_data(encode_message(Reconcile(b"abc"))[:-1], T)
    with pytest.raises(RemoteProtocolError, match="stream ended inside a frame"):
        cut.receive_data(b"", T)
    assert cut.closed


def test_send_is_refused_outside_established_and_for_session_messages() -> None:
    session = SyncSession(FED, nothing, T)
    with pytest.raises(LocalProtocolError, match="await-hello"):
        session.send(IHave((FED,)))
    session.receive_data(hello(), T)
    for message in (Hello(1, 1, FED), Goodbye("x"), Want((FED,))):
        with pytest.raises(LocalProtocolError, match="session's own"):
            session.send(message)
    with pytest.raises(LocalProtocolError, match="answers a Want"):
        session.send(Ops(()))
    with pytest.raises(LocalProtocolError, match="malformed"):
        session.send(IHave(()))


def test_the_outbox_is_bounded() -> None:
    session = established()
    op = b"x" * 60_000
    with pytest.raises(LocalProtocolError, match="outbox full"):
        for _ in range(1000):
            session.send(Push((op,) * 16, False))
    assert len(session.data_to_send()) <= session.limits.max_outbox_bytes


# -- defence: rate limits and the misbehaviour budget ------------------------------------------


def test_the_token_bucket_refills_exactly() -> None:
    bucket = TokenBucket(10, 3, 1000, now_ms=0)
    assert bucket.take(15, 0) == 10
    assert bucket.take(1, 333) == 0  # 0.999 of a token
    assert bucket.take(5, 334) == 1
    assert bucket.take(100, 100_000) == 10  # capped at the capacity
    assert bucket.take(1, 50_000) == 0  # time going back refills nothing


def test_unsolicited_ops_beyond_the_rate_are_dropped_and_counted() -> None:
    session = established(op_burst=100, op_rate_per_s=50)
    flood = [bytes([i % 256, i // 256]) * 10 for i in range(300)]
    frames = encode_many(Push(tuple(flood[i : i + 50]), False) for i in range(0, 300, 50))
    events = session.receive_data(frames, T)
    delivered = [op for e in events if isinstance(e, MessageReceived) for op in e.message.ops]  # type: ignore[union-attr]
    assert delivered == flood[:100]
    assert session.stats.ops_dropped == 200
    events = session.receive_data(encode_message(Ops(tuple(flood[:60]))), T + 1000)
    assert events == [OpsReceived(tuple(flood[:50]))]  # one second refilled 50
    assert session.state is State.ESTABLISHED


def test_requested_ops_are_not_rate_limited() -> None:
    store = blobs(300)
    server = established(store.get)
    client = established(op_burst=10, op_rate_per_s=1)
    client.request(list(store), T)
    events = exchange(server, client, T)
    assert sum(len(e.ops) for e in events if isinstance(e, OpsReceived)) == 300
    assert client.stats.ops_dropped == 0


def test_a_flood_of_announced_ids_is_cut_to_the_rate() -> None:
    session = established(id_burst=2048, id_rate_per_s=1024)
    flood = encode_many(IHave(tuple(batch)) for batch in batch_ids(all_ids(100_000)))
    events = session.receive_data(flood, T)
    announced = sum(len(e.message.ids) for e in events if isinstance(e, MessageReceived))  # type: ignore[union-attr]
    assert announced == 2048
    assert session.stats.ids_dropped == 100_000 - 2048
    assert session.state is State.ESTABLISHED


def all_ids(count: int) -> list[bytes]:
    return [i.to_bytes(32, "big") for i in range(count)]


def test_the_misbehaviour_budget_closes_the_session_with_the_reason() -> None:
    session = established(misbehaviour_budget=3, misbehaviour_refill_ms=1000)
    for _ in range(3):
        assert session.report_invalid("bad signature", T) == []
    assert session.report_invalid("bad signature", T + 1000) == []  # one forgiven by then
    (closed,) = session.report_invalid("unknown kind", T + 1000)
    assert closed == Closed("too many invalid ops (5); the last: unknown kind", by_peer=False)
    assert session.closed
    assert decode_stream(session.data_to_send()) == [Goodbye(closed.reason)]


# -- hostile peers: typed errors, bounded memory, only that session closes ---------------------


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\x00\x00\x00\x02\x91\x63", "unknown message type tag 99"),
        (b"\x00\x00\x00\x03\x92\x07\x90", "Want.ids has 0 items"),
        ((1 << 21).to_bytes(4, "big"), "frame of 2097152 bytes is over the limit"),
        ((34_000_006).to_bytes(4, "big") + b"\x92\x07\xdd", "over the limit"),  # a million ids
        (b"\x00\x00\x00\x00", "empty frame"),
        (b"\x00\x00\x00\x02\x91\xc0", "not an unsigned integer"),
    ],
)
def test_malformed_input_closes_the_session_with_a_typed_error(data: bytes, why: str) -> None:
    session = established()
    with pytest.raises(RemoteProtocolError, match=why):
        session.receive_data(data, T)
    assert session.closed
    (goodbye,) = decode_stream(session.data_to_send())
    assert isinstance(goodbye, Goodbye)
    assert why in goodbye.reason


def test_too_many_queued_wants_is_a_protocol_error() -> None:
    session = established()
    wants = encode_many(Want(tuple(batch)) for batch in batch_ids(all_ids(17 * 1024)))
    with pytest.raises(RemoteProtocolError, match="more than 16 Wants waiting"):
        session.receive_data(wants, T)
    assert session.closed


def test_wants_are_answered_only_as_fast_as_the_outbox_drains() -> None:
    store = blobs(16 * 1024, size=64)
    session = established(store.get)
    session.receive_data(encode_many(Want(b) for b in batch_ids(store)), T)
    first = session.data_to_send()
    assert 0 < len(first) <= session.limits.serve_watermark_bytes + (1 << 20)
    answers = [m for m in decode_stream(first) if isinstance(m, Ops)]
    assert 0 < len(answers) < 16  # the rest wait for the next call
    total = len(answers)
    while more := session.data_to_send():
        total += sum(isinstance(m, Ops) for m in decode_stream(more))
    assert total == 16


@settings(max_examples=50)
@given(st.binary(max_size=3000), st.integers(1, 50))
def test_arbitrary_bytes_after_the_handshake_raise_only_protocol_errors(
    junk: bytes, chunk: int
) -> None:
    session = established(lambda _: b"op")
    try:
        for start in range(0, len(junk), chunk):
            session.receive_data(junk[start : start + chunk], T)
            session.data_to_send()
    except RemoteProtocolError:
        assert session.closed
        assert isinstance(decode_stream(session.data_to_send())[-1], Goodbye)
    else:
        assert session.state in (State.ESTABLISHED, State.CLOSED)
    assert session._reader.buffered <= session.limits.wire.max_buffer_bytes


@settings(max_examples=50)
@given(
    st.lists(st.one_of(*MESSAGES.values()), max_size=10),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=3),
)
def test_mutated_streams_of_valid_frames_raise_only_protocol_errors(
    sent: list[Message], flips: list[tuple[int, int]]
) -> None:
    stream = bytearray(encode_many(sent))
    for index, value in flips:
        if stream:
            stream[index % len(stream)] = value
    session = established(lambda _: b"op")
    try:
        session.receive_data(bytes(stream), T)
        session.data_to_send()
    except RemoteProtocolError:
        assert session.closed
        return
    assert session.state in (State.ESTABLISHED, State.CLOSED)


def test_a_flood_keeps_memory_bounded() -> None:
    """10 MB of announcements pass through; the session never holds 4 MB."""
    session = established(lambda _: b"o" * 100)
    ihave = encode_message(IHave(tuple(all_ids(1024))))
    chunk = ihave * 30  # ~1 MB per delivery
    tracemalloc.start()
    try:
        for step in range(10):
            events = session.receive_data(chunk, T + step)
            del events
            session.data_to_send()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert session.state is State.ESTABLISHED
    assert session.stats.ids_dropped > 250_000
    assert peak < 4 << 20


def test_a_hostile_peer_closes_only_its_own_session() -> None:
    a, b, now = diverged_replicas(3, 20)
    honest_node, hostile_side = Node(a, now, versions=(1, 1)), Node(b, now, versions=(1, 1))
    attacked = SyncSession(a.federation, honest_node.lookup, now)
    attacked.receive_data(hello(a.federation), now)
    with pytest.raises(RemoteProtocolError):
        attacked.receive_data(b"\x00\x00\x00\x05garbage", now)
    assert attacked.closed
    pair = Pair(honest_node, hostile_side, now)
    pair.run()
    assert ids_of(a) == ids_of(b)
    assert honest_node.session.state is State.ESTABLISHED


def test_an_invalid_op_is_counted_against_the_peer_that_sent_it() -> None:
    a, b, now = diverged_replicas(4, 10)
    node = Node(a, now, versions=(1, 1))
    node.react(node.session.receive_data(hello(a.federation), now), now)
    forged = bytearray(next(iter(b.graph.topological())).data)
    forged[-1] ^= 1  # breaks the signature
    node.react(node.session.receive_data(encode_message(Ops((bytes(forged),))), now), now)
    assert node.session.stats.invalid_reported == 1
    assert node.session.state is State.ESTABLISHED
