"""The wire format: every message round-trips, one encoding per message, and no
input, however hostile, raises anything but RemoteProtocolError."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from archipel.protocol.errors import LocalProtocolError, RemoteProtocolError
from archipel.protocol.messages import (
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
from archipel.protocol.wire import (
    DEFAULT_WIRE_LIMITS,
    MESSAGE_TYPES,
    TAGS,
    FrameReader,
    WireLimits,
    batch_ids,
    batch_ops,
    decode_body,
    encode_body,
    encode_message,
)

LIM = DEFAULT_WIRE_LIMITS
FED = bytes(range(32))

# -- strategies -------------------------------------------------------------------------

ids = st.binary(min_size=32, max_size=32)
id_tuples = st.lists(ids, min_size=1, max_size=12, unique=True).map(tuple)
op_bytes = st.binary(min_size=1, max_size=300)
addrs = st.lists(st.text(max_size=24), max_size=3).map(tuple)
peers = st.builds(PeerInfo, ids, addrs)
peer_tuples = st.lists(peers, max_size=4).map(tuple)
ttls = st.integers(0, LIM.max_ttl)
versions = st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)).map(sorted)

MESSAGES: dict[type[Message], st.SearchStrategy[Message]] = {
    Hello: st.builds(lambda v, f: Hello(v[0], v[1], f), versions, ids),
    Goodbye: st.builds(Goodbye, st.text(max_size=60)),
    Push: st.builds(Push, st.lists(op_bytes, min_size=1, max_size=6).map(tuple), st.booleans()),
    IHave: st.builds(IHave, id_tuples),
    Graft: st.builds(Graft, id_tuples),
    Prune: st.just(Prune()),
    Reconcile: st.builds(Reconcile, st.binary(min_size=1, max_size=200), st.booleans()),
    Want: st.builds(Want, id_tuples),
    Ops: st.builds(Ops, st.lists(op_bytes, max_size=6).map(tuple)),
    Join: st.builds(Join, peers),
    ForwardJoin: st.builds(ForwardJoin, peers, ttls),
    Neighbor: st.builds(Neighbor, peers, st.booleans()),
    NeighborReply: st.builds(NeighborReply, st.booleans()),
    Disconnect: st.just(Disconnect()),
    Shuffle: st.builds(Shuffle, peers, peer_tuples, ttls),
    ShuffleReply: st.builds(ShuffleReply, peer_tuples),
}
messages = st.one_of(*MESSAGES.values())


def read_all(reader: FrameReader) -> list[Message]:
    out = []
    while (message := reader.next_message()) is not None:
        out.append(message)
    return out


def frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def raw(*items: object) -> bytes:
    """A body built with msgpack directly (for inputs our encoder would refuse)."""
    return msgpack.packb(list(items), use_bin_type=True)  # type: ignore[no-any-return]


def refused(body: bytes) -> str:
    with pytest.raises(RemoteProtocolError) as info:
        decode_body(body)
    return info.value.reason


# -- round trips ------------------------------------------------------------------------


def test_every_message_type_has_a_strategy_and_a_distinct_tag() -> None:
    assert set(MESSAGES) == set(MESSAGE_TYPES)
    assert len(set(TAGS.values())) == len(TAGS) == 16


@given(messages)
def test_a_message_round_trips(message: Message) -> None:
    body = encode_body(message)
    assert decode_body(body) == message
    assert body[1] == TAGS[type(message)]  # [tag, ...]: the tag follows the array header
    assert encode_message(message) == frame(body)


@given(st.lists(messages, max_size=8), st.lists(st.integers(1, 64), min_size=1))
def test_the_reader_yields_the_same_messages_however_the_stream_is_cut(
    sent: list[Message], cuts: list[int]
) -> None:
    stream = b"".join(encode_message(m) for m in sent)
    reader = FrameReader()
    got: list[Message] = []
    pos, i = 0, 0
    while pos < len(stream):
        step = cuts[i % len(cuts)]
        reader.feed(stream[pos : pos + step])
        got.extend(read_all(reader))
        pos, i = pos + step, i + 1
    reader.feed(b"")
    got.extend(read_all(reader))
    assert got == sent
    assert reader.at_eof


def test_limits_are_inclusive() -> None:
    full = tuple(i.to_bytes(32, "big") for i in range(LIM.max_ids))
    for kind in (IHave, Graft, Want):
        assert decode_body(encode_body(kind(full))) == kind(full)
    big_op = b"x" * LIM.max_op_bytes
    assert decode_body(encode_body(Ops((big_op,)))) == Ops((big_op,))
    many = tuple(PeerInfo(bytes(32), ()) for _ in range(LIM.max_peers))
    assert decode_body(encode_body(ShuffleReply(many))) == ShuffleReply(many)
    reason = "é" * (LIM.max_reason_bytes // 2)
    assert decode_body(encode_body(Goodbye(reason))) == Goodbye(reason)


# -- canonical: one message, one encoding -------------------------------------------------


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (bytes.fromhex("92cc05c0"), "not canonically encoded"),  # tag 5 as uint8
        (bytes.fromhex("dc000105"), "not canonically encoded"),  # array16 of 1 item
        (bytes.fromhex("9203d90141"), "wrong type"),  # IHave with a str8 where ids go
        (bytes.fromhex("920391c40141"), "1 bytes, expected 32"),  # a 1-byte id
        (bytes.fromhex("9201d90141"), "not canonically encoded"),  # "A" as str8
        (bytes.fromhex("92cd0005c0"), "not canonically encoded"),  # tag as uint16
    ],
)
def test_non_canonical_and_mistyped_bodies_are_refused(body: bytes, why: str) -> None:
    assert why in refused(body)


@given(messages, st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4))
def test_a_mutated_body_decodes_only_to_its_own_encoding(
    message: Message, flips: list[tuple[int, int]]
) -> None:
    body = bytearray(encode_body(message))
    for index, value in flips:
        body[index % len(body)] = value
    try:
        decoded = decode_body(bytes(body))
    except RemoteProtocolError as exc:
        reason = exc.reason
    else:
        assert encode_body(decoded) == bytes(body)
        return
    assert reason


@given(messages, st.integers(0, 10_000), st.binary(max_size=8), st.integers(0, 8))
def test_truncated_extended_or_spliced_bodies_raise_only_protocol_errors(
    message: Message, at: int, insert: bytes, cut: int
) -> None:
    body = encode_body(message)
    at %= len(body) + 1
    for candidate in (body[:at], body + insert, body[:at] + insert + body[at + cut :]):
        try:
            decoded = decode_body(candidate)
        except RemoteProtocolError:
            continue
        assert encode_body(decoded) == candidate


@given(st.binary(max_size=2000))
def test_arbitrary_bytes_raise_only_protocol_errors(data: bytes) -> None:
    reader = FrameReader()
    try:
        if data:  # b"" would mean the end of the stream
            reader.feed(data)
            read_all(reader)
        reader.feed(b"")
        read_all(reader)
    except RemoteProtocolError as exc:
        reason = exc.reason
    else:
        assert reader.at_eof
        return
    assert reason
    with pytest.raises(RemoteProtocolError):  # the reader stays broken
        reader.next_message()


@given(st.binary(max_size=200))
def test_arbitrary_bodies_raise_only_protocol_errors(data: bytes) -> None:
    try:
        decoded = decode_body(data)
    except RemoteProtocolError:
        return
    assert encode_body(decoded) == data


def test_kept_regression_inputs_are_refused() -> None:
    path = Path(__file__).parent / "regressions" / "wire.txt"
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    cases = [bytes.fromhex(line) for line in lines if line]
    assert len(cases) >= 10
    for body in cases:
        with pytest.raises(RemoteProtocolError):
            decode_body(body)


# -- hostile shapes, each with its reason ----------------------------------------------------


def test_unknown_tags_wrong_counts_and_extra_bytes() -> None:
    assert "unknown message type tag 99" in refused(raw(99))
    assert "unknown message type tag 16" in refused(raw(16, 1))
    assert "Hello has 4 fields, expected 3" in refused(raw(0, 1, 1, FED, 7))
    assert "Hello has 2 fields, expected 3" in refused(raw(0, 1, 1))
    assert "Prune has 1 fields, expected 0" in refused(raw(5, 0))
    assert "extra bytes after Prune" in refused(raw(5) + b"\x00")
    assert "a message has 0 items" in refused(raw())
    assert "wrong type" in refused(msgpack.packb({"t": 0}))
    assert "not an unsigned integer" in refused(raw(-1))
    assert "not an unsigned integer" in refused(raw("hello"))


def test_wrong_field_types() -> None:
    assert "Hello.federation" in refused(raw(0, 1, 1, "not bytes"))
    assert "Hello.federation is 31 bytes" in refused(raw(0, 1, 1, FED[:31]))
    assert "Hello.max_version is 65536" in refused(raw(0, 1, 65536, FED))
    assert "empty version range 3..2" in refused(raw(0, 3, 2, FED))
    assert "Push.urgent is not a boolean" in refused(raw(2, [b"op"], 1))
    assert "Goodbye.reason" in refused(raw(1, b"bytes, not str"))
    assert "not valid UTF-8" in refused(bytes.fromhex("9201a2c328"))
    assert "an op in Ops.ops" in refused(raw(8, ["str op"]))
    assert "Reconcile.payload is 0 bytes" in refused(raw(6, b"", False))
    assert "ForwardJoin.ttl is 256" in refused(raw(10, [FED, []], 256))
    assert "the id of Join.peer" in refused(raw(9, [FED[:5], []]))
    assert "Join.peer has 3 items" in refused(raw(9, [FED, [], 1]))


def test_ids_must_be_32_bytes_distinct_and_few() -> None:
    assert "an id in Want.ids is 33 bytes" in refused(raw(7, [FED + b"x"]))
    assert "Want.ids repeats an id" in refused(raw(7, [FED, FED]))
    assert "IHave.ids has 0 items" in refused(raw(3, []))
    too_many = [i.to_bytes(32, "big") for i in range(LIM.max_ids + 1)]
    for tag, name in ((3, "IHave"), (4, "Graft"), (7, "Want")):
        assert f"{name}.ids has 1025 items, allowed 1 to 1024" in refused(raw(tag, too_many))


def test_too_many_or_too_big_ops_peers_and_addresses() -> None:
    assert "Push.ops has 1025 items" in refused(raw(2, [b"o"] * 1025, False))
    assert "Push.ops has 0 items" in refused(raw(2, [], False))
    big = b"x" * (LIM.max_op_bytes + 1)
    assert "an op in Ops.ops is 65537 bytes" in refused(raw(8, [big]))
    peer = [FED, []]
    assert "ShuffleReply.peers has 65 items" in refused(raw(15, [peer] * 65))
    assert "has 9 items" in refused(raw(9, [FED, ["a"] * 9]))
    assert "over the limit of 256" in refused(raw(9, [FED, ["a" * 257]]))
    assert "over the limit of 1024" in refused(raw(1, "r" * 1025))


def test_a_body_over_the_frame_limit_is_refused() -> None:
    small = WireLimits(max_frame_bytes=100)
    with pytest.raises(RemoteProtocolError, match="over the limit"):
        decode_body(raw(6, b"x" * 200), small)


# -- the reader's bounds ---------------------------------------------------------------------


def test_an_oversize_frame_is_refused_from_its_length_alone() -> None:
    reader = FrameReader()
    reader.feed((LIM.max_frame_bytes + 1).to_bytes(4, "big"))
    with pytest.raises(RemoteProtocolError, match="frame of 1048577 bytes is over the limit"):
        reader.next_message()
    assert reader.buffered == 4  # nothing of the body was waited for


def test_a_want_for_a_million_ids_is_refused_before_it_is_read() -> None:
    million = 1_000_000 * 34 + 6  # a million bin8 ids and the headers
    reader = FrameReader()
    reader.feed(million.to_bytes(4, "big") + raw(7)[:2])
    with pytest.raises(RemoteProtocolError, match="over the limit"):
        reader.next_message()


@pytest.mark.parametrize(
    ("stream", "why"),
    [
        (b"\x00\x00", "inside a frame's length prefix"),
        (b"\x00\x00\x00\x05\x92", "inside a frame (1 of 5 bytes)"),
        (b"\x00\x00\x00\x00", "empty frame"),
    ],
)
def test_truncated_and_empty_frames(stream: bytes, why: str) -> None:
    reader = FrameReader()
    reader.feed(stream)
    if why != "empty frame":
        assert reader.next_message() is None  # incomplete: waits for more
        reader.feed(b"")
    with pytest.raises(RemoteProtocolError) as info:
        reader.next_message()
    assert why in info.value.reason
    with pytest.raises(RemoteProtocolError):
        reader.next_message()


def test_the_buffer_is_bounded_and_feeding_after_the_end_is_a_local_error() -> None:
    reader = FrameReader(WireLimits(max_frame_bytes=1000))
    reader.feed(b"\x00" * 3)
    with pytest.raises(LocalProtocolError, match="receive buffer full"):
        reader.feed(b"\x00" * 2008)
    reader.feed(b"")
    with pytest.raises(LocalProtocolError, match="after the end"):
        reader.feed(b"x")


def test_a_drained_reader_holds_at_most_one_partial_frame() -> None:
    frames = b"".join(encode_message(IHave((bytes([i]) * 32,))) for i in range(200))
    reader = FrameReader()
    for start in range(0, len(frames), 997):
        reader.feed(frames[start : start + 997])
        read_all(reader)
        assert reader.buffered < len(encode_message(IHave((FED,))))


# -- what we send ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        Hello(2, 1, FED),
        Hello(0, 1, FED[:31]),
        Hello(0, 70_000, FED),
        Want(()),
        Want((FED, FED)),
        Want(tuple(i.to_bytes(32, "big") for i in range(1025))),
        IHave((b"short",)),
        Push((), False),
        Push((b"op",), 1),  # type: ignore[arg-type]
        Ops((b"x" * (LIM.max_op_bytes + 1),)),
        Ops(tuple(b"x" * 60_000 for _ in range(20))),  # 1.2 MB: over one frame
        Goodbye("x" * 2000),
        Goodbye("\ud800"),
        ForwardJoin(PeerInfo(FED, ()), 300),
        Join(PeerInfo(FED, ("a" * 300,))),
        Shuffle(PeerInfo(FED, ()), tuple(PeerInfo(FED, ()) for _ in range(65)), 1),
        Neighbor("peer", True),  # type: ignore[arg-type]
    ],
)
def test_the_encoder_refuses_what_a_peer_would_refuse(message: Message) -> None:
    with pytest.raises(LocalProtocolError, match="malformed|over the frame limit"):
        encode_message(message)


def test_the_encoder_refuses_non_messages() -> None:
    with pytest.raises(LocalProtocolError, match="not a sync protocol message"):
        encode_message(PeerInfo(FED, ()))  # type: ignore[arg-type]


@given(st.lists(st.integers(1, LIM.max_op_bytes), max_size=40))
def test_op_batches_fit_one_frame_and_keep_every_op(sizes: list[int]) -> None:
    ops = [bytes([i % 256]) * size for i, size in enumerate(sizes)]
    batches = list(batch_ops(ops))
    assert [op for batch in batches for op in batch] == ops
    for batch in batches:
        assert len(encode_message(Ops(batch))) <= LIM.max_frame_bytes + 4
        assert len(encode_message(Push(batch, True))) <= LIM.max_frame_bytes + 4


def test_many_small_ops_are_batched_by_count() -> None:
    batches = list(batch_ops([b"o"] * 2500))
    assert [len(b) for b in batches] == [1024, 1024, 452]
    with pytest.raises(LocalProtocolError):
        list(batch_ops([b""]))


def test_id_batches_drop_repeats_and_respect_the_limit() -> None:
    many = [i.to_bytes(32, "big") for i in range(2100)]
    batches = list(batch_ids(many + many[:10]))
    assert [len(b) for b in batches] == [1024, 1024, 52]
    assert [i for b in batches for i in b] == many
    for batch in batches:
        encode_message(Want(batch))
