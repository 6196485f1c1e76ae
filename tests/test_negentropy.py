"""Negentropy v1 reconciliation: exact wire bytes, agreement with plain set
difference, the spec's edge cases, and hostile input.

Reference vectors (fingerprints, the initial message, the version reply) are
from the hoytech/negentropy repository's Kotlin tests (FingerprintTest,
MessageBuilderTest, NegentropyBasicTest); the others are computed here by hand
with hashlib.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import tracemalloc
from array import array

import pytest
from hypothesis import given, target
from hypothesis import strategies as st

from archipel.protocol.errors import LocalProtocolError, RemoteProtocolError
from archipel.protocol.negentropy import (
    CLIENT_POLICY,
    FRAME_SLACK,
    INFINITY,
    REFERENCE_POLICY,
    Bound,
    Fingerprint,
    IdList,
    Message,
    NegentropyClient,
    NegentropyLimits,
    NegentropyServer,
    Range,
    Skip,
    SortedItems,
    SplitPolicy,
    _Reader,
    decode_message,
    encode_message,
    encode_varint,
    fingerprint,
)

Item = tuple[int, bytes]

KOTLIN_ITEMS = [
    (1678011277, bytes.fromhex("eb6b05c2e3b008592ac666594d78ed83e7b9ab30f825b9b08878128f7500008c")),
    (1678011278, bytes.fromhex("39b916432333e069a4386917609215cc688eb99f06fed01aadc29b1b4b92d6f0")),
    (1678011279, bytes.fromhex("abc81d58ebe3b9a87100d47f58bf15e9b1cbf62d38623f11d0f0d17179f5f3ba")),
]


def sha16(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()[:16]


def ident(n: int) -> bytes:
    return hashlib.sha256(b"item %d" % n).digest()


def assert_truthful(message: bytes, store: SortedItems) -> None:
    """Every range of a message tells the truth about its sender's items in it:
    a fingerprint is theirs, an IdList lists exactly their ids there."""
    lower = 0
    for r in decode_message(message, NegentropyLimits(max_message_bytes=10**8)).ranges:
        upper = store.lower_bound(*r.upper.key(), lower, len(store))
        if isinstance(r.payload, Fingerprint):
            assert r.payload.value == store.fingerprint(lower, upper)
        elif isinstance(r.payload, IdList):
            assert b"".join(r.payload.ids) == store.ids(lower, upper)
        lower = upper


def run(
    client_items: SortedItems | list[Item],
    server_items: SortedItems | list[Item],
    limits: NegentropyLimits | None = None,
    policy: SplitPolicy = CLIENT_POLICY,
) -> tuple[list[bytes], list[bytes], NegentropyClient, list[bytes]]:
    """Run a whole session; returns have, need, the client and every message sent."""
    cs = client_items if isinstance(client_items, SortedItems) else SortedItems(client_items)
    ss = server_items if isinstance(server_items, SortedItems) else SortedItems(server_items)
    client = NegentropyClient(cs, limits, policy)
    server = NegentropyServer(ss, limits)
    have: list[bytes] = []
    need: list[bytes] = []
    msg: bytes | None = client.initiate()
    sent: list[bytes] = []
    while msg is not None:
        reply = server.reconcile(msg)
        assert_truthful(msg, cs)
        assert_truthful(reply, ss)
        sent += [msg, reply]
        msg, h, n = client.reconcile(reply)
        have += h
        need += n
    return have, need, client, sent


# -- (1) encoding: exact bytes ----------------------------------------------------


@pytest.mark.parametrize(
    ("n", "encoded"),
    [
        (0, "00"),
        (1, "01"),
        (127, "7f"),
        (128, "8100"),
        (300, "822c"),
        (16383, "ff7f"),
        (16384, "818000"),
        (1678011278, "86a091d70e"),
        (2**64 - 1, "81" + "ff" * 8 + "7f"),
    ],
)
def test_varints_encode_big_endian_base_128_and_decode_back(n: int, encoded: str) -> None:
    assert encode_varint(n).hex() == encoded
    reader = _Reader(b"\x61" + bytes.fromhex(encoded))
    assert reader.varint("test") == n
    assert reader.pos == 1 + len(encoded) // 2


def test_varint_out_of_range_is_our_error() -> None:
    with pytest.raises(LocalProtocolError):
        encode_varint(2**64)
    with pytest.raises(LocalProtocolError):
        encode_varint(-1)


def test_fingerprints_match_the_reference_vectors() -> None:
    ids = [i for _, i in KOTLIN_ITEMS]
    store = SortedItems(KOTLIN_ITEMS)
    assert fingerprint(ids[:1]).hex() == "6d74e1212fcafc8a81d090f0ffbde8b0"
    assert fingerprint(ids[:2]).hex() == "96b26d110825d4b1805fc56988a3e65d"
    assert fingerprint(ids).hex() == "c15ce60f185fd24ae341076caa93daa5"
    assert store.fingerprint(0, 2).hex() == "96b26d110825d4b1805fc56988a3e65d"
    assert store.fingerprint(0, 3).hex() == "c15ce60f185fd24ae341076caa93daa5"


def test_fingerprint_is_the_little_endian_sum_mod_2_256_then_the_count() -> None:
    # 0xff..ff + 1 wraps to zero: the carry runs through all 32 bytes.
    ones, one = b"\xff" * 32, b"\x01" + bytes(31)
    assert fingerprint([ones, one]) == sha16(bytes(32) + b"\x02")
    # 2 + 3 in the first (least significant) byte; a count of 200 is a 2-byte varint.
    assert fingerprint([b"\x02" + bytes(31), b"\x03" + bytes(31)]) == sha16(
        b"\x05" + bytes(31) + b"\x02"
    )
    assert fingerprint([bytes(32)] * 200) == sha16(bytes(32) + b"\x81\x48")
    assert fingerprint([]) == sha16(bytes(32) + b"\x00")
    # The store's O(1) prefix-sum fingerprint agrees on every sub-range.
    items = [(i // 3, ident(i)) for i in range(40)]
    store = SortedItems(items)
    ordered = [store.item_id(i) for i in range(len(store))]
    for lo in range(0, 40, 7):
        for hi in range(lo, 41, 5):
            assert store.fingerprint(lo, hi) == fingerprint(ordered[lo:hi])


def test_initial_message_matches_the_reference() -> None:
    """Three items: one IdList to infinity (0x00 timestamp, 0x00 prefix, mode 2, 3 ids)."""
    client = NegentropyClient(SortedItems(KOTLIN_ITEMS), policy=REFERENCE_POLICY)
    expected = "6100000203" + "".join(i.hex() for _, i in KOTLIN_ITEMS)
    assert client.initiate().hex() == expected


def test_bound_with_full_id_encodes_as_in_the_reference() -> None:
    _, first = KOTLIN_ITEMS[0]
    message = Message((Range(Bound(1678011277, first), Skip()),))
    assert encode_message(message).hex() == "61" + "86a091d70e20" + first.hex() + "00"


def test_timestamps_are_deltas_within_a_message_and_infinity_is_zero() -> None:
    message = Message(
        (
            Range(Bound(1678011277), Skip()),
            Range(Bound(1678011278), Skip()),
            Range(Bound(1678011278, b"\x07"), Skip()),
            Range(Bound(INFINITY), Skip()),
        )
    )
    data = encode_message(message)
    assert data.hex() == "61" + "86a091d70e0000" + "020000" + "01010700" + "000000"
    assert decode_message(data) == message


def test_split_bounds_use_the_shortest_id_prefix() -> None:
    """32 items at one timestamp split into 16 buckets of 2; neighbours share
    5 id bytes, so each inner bound carries a 6-byte prefix."""
    ts = 1_000_000
    ids = [b"\xaa" * 5 + bytes([k]) + b"\x5a" * 26 for k in range(32)]
    client = NegentropyClient(SortedItems((ts, i) for i in ids), policy=REFERENCE_POLICY)
    expected = bytearray(b"\x61")
    for b in range(16):
        if b == 15:
            expected += b"\x00\x00"  # infinity, no prefix
        else:
            expected += encode_varint(ts + 1 if b == 0 else 1)  # then deltas of 0
            expected += b"\x06" + ids[2 * b + 2][:6]
        expected += b"\x01" + fingerprint(ids[2 * b : 2 * b + 2])
    assert client.initiate() == bytes(expected)


def test_ids_differing_only_in_the_last_byte_need_a_32_byte_prefix() -> None:
    ts = 77
    ids = [bytes(31) + bytes([k]) for k in range(40)]
    client = NegentropyClient(SortedItems((ts, i) for i in ids), policy=REFERENCE_POLICY)
    ranges = decode_message(client.initiate()).ranges
    assert [len(r.upper.id_prefix) for r in ranges[:-1]] == [32] * 15
    assert ranges[0].upper == Bound(ts, ids[3])  # buckets of 3, 3, ..., then of 2


message_strategy = st.builds(
    lambda bounds, payloads: Message(
        tuple(Range(b, p) for b, p in zip(sorted(bounds, key=Bound.key), payloads, strict=False))
    ),
    st.lists(
        st.builds(
            Bound,
            st.one_of(st.integers(0, 50), st.integers(0, 2**64 - 2)),
            st.binary(max_size=32),
        ),
        max_size=12,
        unique_by=Bound.key,
    ),
    st.lists(
        st.one_of(
            st.just(Skip()),
            st.builds(Fingerprint, st.binary(min_size=16, max_size=16)),
            st.builds(IdList, st.lists(st.binary(min_size=32, max_size=32), max_size=4).map(tuple)),
        ),
        min_size=12,
        max_size=12,
    ),
)


@given(message_strategy, st.booleans())
def test_messages_round_trip(message: Message, end_at_infinity: bool) -> None:
    if end_at_infinity:
        message = Message((*message.ranges, Range(Bound(INFINITY), Skip())))
    assert decode_message(encode_message(message)) == message


# -- (2) against plain set difference ---------------------------------------------

PREFIXES = [bytes(32), b"\x11" * 32, b"\x11" * 20 + b"\x22" * 12]


@st.composite
def item_sets(draw: st.DrawFn, max_items: int = 120) -> tuple[list[Item], list[Item]]:
    """Items drawn on the client only, the server only, or both; timestamps
    collide often and ids often share long prefixes. An id is unique (it names
    one op, which has one timestamp)."""
    n = draw(st.integers(0, max_items))
    seed = draw(st.integers(0, 2**32))
    rng = random.Random(seed)
    weights = draw(st.sampled_from([(1, 1, 8), (1, 0, 3), (0, 1, 3), (1, 1, 0), (0, 0, 1)]))
    client, server, seen = [], [], set()
    for _ in range(n):
        ts = rng.choice([rng.randrange(6), rng.randrange(2**64 - 1), 2**64 - 2])
        prefix = rng.choice(PREFIXES)[: rng.randrange(33)]
        item = (ts, (prefix + rng.randbytes(32))[:32])
        if item[1] in seen:
            continue
        seen.add(item[1])
        side = rng.choices(range(3), weights)[0]
        if side != 1:
            client.append(item)
        if side != 0:
            server.append(item)
    return client, server


def check_session(
    client: list[Item], server: list[Item], limits: NegentropyLimits, policy: SplitPolicy
) -> list[bytes]:
    client, server = list(set(client)), list(set(server))
    have, need, _, sent = run(client, server, limits, policy)
    client_ids, server_ids = {i for _, i in client}, {i for _, i in server}
    assert sorted(have) == sorted(client_ids - server_ids)
    assert sorted(need) == sorted(server_ids - client_ids)
    assert all(len(m) <= limits.frame_size_limit for m in sent)
    # Exchange what is missing: both sides now hold the union, and agree at once.
    by_id = {i: (t, i) for t, i in client + server}
    union = SortedItems(set(client) | set(server))
    new_client = SortedItems(client).with_items(by_id[i] for i in need)
    new_server = SortedItems(server).with_items(by_id[i] for i in have)
    for store in (new_client, new_server):
        assert store.ids(0, len(store)) == union.ids(0, len(union))
        assert store.fingerprint(0, len(store)) == union.fingerprint(0, len(union))
    have, need, again, _ = run(new_client, new_server, limits, policy)
    assert (have, need, again.stats.rounds) == ([], [], 1)
    return sent


@given(item_sets(), st.sampled_from([CLIENT_POLICY, REFERENCE_POLICY]))
def test_have_and_need_are_exactly_the_set_differences(
    sets: tuple[list[Item], list[Item]], policy: SplitPolicy
) -> None:
    check_session(*sets, NegentropyLimits(), policy)


@given(item_sets(max_items=400), st.integers(4096, 9000))
def test_small_frames_still_reconcile_exactly(
    sets: tuple[list[Item], list[Item]], frame: int
) -> None:
    sent = check_session(*sets, NegentropyLimits(frame_size_limit=frame), CLIENT_POLICY)
    target(float(len(sent)))  # steer towards sessions of many rounds


# -- (3) edge cases from the spec -------------------------------------------------


def test_both_sets_empty() -> None:
    client = NegentropyClient(SortedItems())
    server = NegentropyServer(SortedItems())
    first = client.initiate()
    assert first == b"\x61\x00\x00\x02\x00"  # IdList of nothing, up to infinity
    reply = server.reconcile(first)
    assert reply == b"\x61\x00\x00\x02\x00"
    assert client.reconcile(reply) == (None, [], [])
    assert client.done


def test_one_side_empty() -> None:
    items = [(i, ident(i)) for i in range(100)]
    have, need, client, _ = run([], items)
    assert (have, sorted(need)) == ([], sorted(i for _, i in items))
    assert client.stats.rounds == 1
    have, need, client, _ = run(items, [])
    assert (sorted(have), need) == (sorted(i for _, i in items), [])


def test_identical_sets_take_one_round_trip_and_an_empty_reply() -> None:
    items = [(i * 1000, ident(i)) for i in range(5000)]
    have, need, client, sent = run(items, items)
    assert (have, need) == ([], [])
    assert sent[1] == b"\x61"  # every fingerprint matched: one implicit Skip
    assert client.stats.rounds == 1
    assert client.stats.bytes_sent < 16 * 24


def test_server_answers_an_idlist_with_all_of_its_ids() -> None:
    items = [(5, ident(1)), (9, ident(2))]
    server = NegentropyServer(SortedItems(items))
    reply = server.reconcile(b"\x61\x00\x00\x02\x01" + b"\x33" * 32)
    assert reply == b"\x61\x00\x00\x02\x02" + ident(1) + ident(2)


def test_timestamp_just_below_infinity_is_an_item_and_infinity_is_not() -> None:
    top = 2**64 - 2
    client = [(top, ident(1)), (top, ident(2)), (0, ident(3))]
    server = [(top, ident(2)), (top, ident(4))]
    have, need, _, _ = run(client, server)
    assert sorted(have) == sorted([ident(1), ident(3)])
    assert need == [ident(4)]
    message = Message((Range(Bound(top, b"\x01"), Skip()),))
    assert decode_message(encode_message(message)) == message
    with pytest.raises(LocalProtocolError):
        SortedItems([(2**64 - 1, ident(1))])


def test_frame_size_limit_forces_many_rounds_and_is_never_exceeded() -> None:
    rng = random.Random(7)
    base = [(rng.randrange(10**6) << 16, rng.randbytes(32)) for _ in range(6000)]
    client = [it for k, it in enumerate(base) if k % 20 != 1]
    server = [it for k, it in enumerate(base) if k % 20 != 2 and k < 5000]
    limits = NegentropyLimits(frame_size_limit=4096)
    have, need, session, sent = run(client, server, limits)
    assert sorted(have) == sorted({i for _, i in client} - {i for _, i in server})
    assert sorted(need) == sorted({i for _, i in server} - {i for _, i in client})
    assert session.stats.rounds > 10
    assert max(len(m) for m in sent) <= 4096
    # Both directions were cut short at least once (a message close to the limit).
    assert max(len(m) for m in sent[0::2]) > 4096 - FRAME_SLACK - 1100
    assert max(len(m) for m in sent[1::2]) > 4096 - FRAME_SLACK - 64
    unlimited = run(client, server, NegentropyLimits(frame_size_limit=10**7))[2]
    assert unlimited.stats.rounds < session.stats.rounds


def test_ranges_past_the_split_budget_are_echoed_as_fingerprints() -> None:
    """The server must split 8 of the client's 16 buckets, which does not fit
    in 4096 bytes: the later ones go back as one fingerprint each (after the
    Skip of the matching bucket before them) for the client to split."""
    items = [(i << 48, ident(i)) for i in range(1024)]
    server_items = [it for k, it in enumerate(items) if (k // 64) % 2 == 0 or k % 64 != 7]
    limits = NegentropyLimits(frame_size_limit=4096)
    client = NegentropyClient(SortedItems(items), limits, REFERENCE_POLICY)
    reply = NegentropyServer(SortedItems(server_items), limits).reconcile(client.initiate())
    assert_truthful(reply, SortedItems(server_items))
    kinds = [type(r.payload).__name__ for r in decode_message(reply).ranges]
    assert 0 < kinds.count("Fingerprint") < 8 * 16
    assert kinds.count("Fingerprint") % 16 != 0  # whole splits, then echoes
    assert kinds[-2:] == ["Skip", "Fingerprint"]  # a matching bucket, then an echo
    have, need, _, _ = run(items, server_items, limits, REFERENCE_POLICY)
    assert (sorted(have), need) == (sorted(ident(k) for k in range(1024) if k % 128 == 71), [])


def test_a_long_id_list_reply_is_cut_to_the_frame_and_continued() -> None:
    items = [(i // 2, ident(i)) for i in range(3000)]
    have, need, client, sent = run([items[5]], items, NegentropyLimits(frame_size_limit=4096))
    assert (have, sorted(need)) == ([], sorted(i for _, i in items[:5] + items[6:]))
    assert client.stats.rounds >= 3000 * 32 // 4096
    assert max(len(m) for m in sent) <= 4096


def test_one_difference_in_many_items_is_cheap() -> None:
    items = [(i << 16, ident(i)) for i in range(20_000)]
    have, need, client, _ = run(items, items[:777] + items[778:])
    assert (have, need) == ([ident(777)], [])
    stats = client.stats
    assert stats.rounds <= 3
    assert stats.bytes_sent + stats.bytes_received < 2000


# -- storage ----------------------------------------------------------------------


@given(item_sets(max_items=60), st.data())
def test_store_lookups_agree_with_a_sorted_list(
    sets: tuple[list[Item], list[Item]], data: st.DataObject
) -> None:
    items = sorted(set(sets[0] + sets[1]))
    store = SortedItems(items)
    assert len(store) == len(items)
    for _ in range(5):
        bound = Bound(
            data.draw(st.sampled_from([0, 3, 2**64 - 2, INFINITY, *(t for t, _ in items)])),
            data.draw(st.binary(max_size=32)),
        )
        lo = data.draw(st.integers(0, len(items)))
        expected = next((k for k in range(lo, len(items)) if items[k] >= bound.key()), len(items))
        assert store.lower_bound(*bound.key(), lo, len(items)) == expected


@given(item_sets(max_items=60), item_sets(max_items=30))
def test_adding_items_equals_building_from_scratch(
    base: tuple[list[Item], list[Item]], extra: tuple[list[Item], list[Item]]
) -> None:
    old = SortedItems(set(base[0]))
    new = old.with_items(extra[0] + base[0][:3])
    whole = SortedItems(set(base[0]) | set(extra[0]))
    assert new.ids(0, len(new)) == whole.ids(0, len(whole))
    assert [new.timestamp(i) for i in range(len(new))] == [
        whole.timestamp(i) for i in range(len(whole))
    ]
    for lo in range(0, len(new) + 1, 7):
        assert new.fingerprint(lo, len(new)) == whole.fingerprint(lo, len(whole))
    assert len(old) == len(set(base[0]))  # the old set is unchanged


def test_stores_reject_bad_items() -> None:
    with pytest.raises(LocalProtocolError):
        SortedItems([(1, b"short")])
    with pytest.raises(LocalProtocolError):
        SortedItems([(1, ident(1)), (1, ident(1))])
    with pytest.raises(LocalProtocolError):
        SortedItems([(-1, ident(1))])
    with pytest.raises(LocalProtocolError):
        SortedItems.from_sorted(array("Q", [2, 1]), ident(1) + ident(2))
    lo, hi = sorted([ident(1), ident(2)])
    with pytest.raises(LocalProtocolError):
        SortedItems.from_sorted(array("Q", [1, 1]), hi + lo)
    with pytest.raises(LocalProtocolError):
        SortedItems.from_sorted(array("Q", [1]), lo + hi)
    assert len(SortedItems.from_sorted(array("Q", [1, 1]), lo + hi)) == 2


def test_limits_and_policies_are_checked() -> None:
    with pytest.raises(LocalProtocolError):
        NegentropyLimits(frame_size_limit=4095)
    with pytest.raises(LocalProtocolError):
        NegentropyLimits(max_rounds=0)
    with pytest.raises(LocalProtocolError):
        SplitPolicy(buckets=1)
    with pytest.raises(LocalProtocolError):
        SplitPolicy(idlist_below=1)  # a 1-item range would bounce between the sides
    assert [CLIENT_POLICY.plan(k) for k in (0, 1, 2, 15, 31, 32, 10**6)] == [0, 0, 2, 4, 6, 16, 16]
    assert [REFERENCE_POLICY.plan(k) for k in (0, 31, 32)] == [0, 0, 16]


# -- (4) hostile input --------------------------------------------------------------


def fresh_client(items: list[Item] | None = None, **limits: int) -> NegentropyClient:
    client = NegentropyClient(SortedItems(items or []), NegentropyLimits(**limits))
    client.initiate()
    return client


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty message"),
        (b"\x61\x05", "ends inside a bound's prefix length"),
        (b"\x61\x01\x03\xaa", "ends inside a bound's id prefix"),
        (b"\x61\x00\x00\x01" + bytes(15), "ends inside a fingerprint"),
        (b"\x61\x00\x00\x02\x02" + bytes(63), "id list claims 2 ids, bytes missing"),
        (b"\x61\x00\x00\x02", "ends inside an id list's length"),
        (b"\x61\x00\x00", "ends inside a range's mode"),
        (b"\x61" + b"\xff" * 10 + b"\x7f", "varint over 64 bits"),
        (b"\x61\x82\x80\x80\x80\x80\x80\x80\x80\x80\x00", "varint over 64 bits"),  # 2**64
        (b"\x61\x80\x01\x00\x00", "non-minimal varint"),
        (b"\x61\x01\x21" + bytes(33) + b"\x00", "id prefix of 33 bytes"),
        (b"\x61\x01\x01\x05\x00\x01\x01\x03\x00", "ranges out of order"),
        (b"\x61\x00\x00\x00\x00\x00\x00", "range after the infinity bound"),
        (b"\x61" + encode_varint(2**64 - 1) + b"\x00\x00\x02\x00\x00", "timestamp past infinity"),
        (b"\x61\x00\x00\x03", "unknown range mode 3"),
        (b"\x61\x00\x00\x02" + encode_varint(2**40), "id list claims 1099511627776 ids"),
        (b"\x62", "unsupported protocol version"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_malformed_messages_are_remote_errors_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(RemoteProtocolError, match=reason):
        decode_message(data)
    client = fresh_client()
    with pytest.raises(RemoteProtocolError):
        client.reconcile(data)
    with pytest.raises(LocalProtocolError):  # the session is over
        client.reconcile(b"\x61")


def test_truncations_of_a_real_message_fail_cleanly() -> None:
    items = [(i % 7, ident(i)) for i in range(300)]
    reply = NegentropyServer(SortedItems(items[:250])).reconcile(
        NegentropyClient(SortedItems(items[100:])).initiate()
    )
    failures = 0
    for cut in range(1, len(reply)):
        try:
            decode_message(reply[:cut])  # a cut between ranges is a valid, shorter message
        except RemoteProtocolError:
            failures += 1
    assert failures > len(reply) // 2


def test_version_bytes() -> None:
    server = NegentropyServer(SortedItems([(1, ident(1))]))
    assert server.reconcile(b"\x62\xaa\xbb\xcc\xdd\xee\xff") == b"\x61"  # as the reference
    assert server.reconcile(b"\x60\x00\x00\x02\x00") == b"\x61"
    assert server.reconcile(b"\x6f") == b"\x61"
    with pytest.raises(RemoteProtocolError, match="unsupported protocol version byte 0x70"):
        server.reconcile(b"\x70")
    client = fresh_client()
    with pytest.raises(RemoteProtocolError, match="does not speak v1"):
        client.reconcile(b"\x62")


def test_huge_id_list_claims_allocate_nothing() -> None:
    data = b"\x61\x00\x00\x02" + encode_varint(2**63) + bytes(64)
    tracemalloc.start()
    try:
        with pytest.raises(RemoteProtocolError, match="claims"):
            NegentropyServer(SortedItems()).reconcile(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100_000


def test_message_size_and_range_count_limits() -> None:
    limits = NegentropyLimits(max_message_bytes=100, max_ranges=10)
    with pytest.raises(RemoteProtocolError, match="101 bytes over the 100 limit"):
        decode_message(b"\x61" + b"\x01\x00\x00" * 33 + b"\x01", limits)
    eleven_skips = b"\x61" + b"\x01\x00\x00" * 11
    with pytest.raises(RemoteProtocolError, match="over 10 ranges"):
        decode_message(eleven_skips, limits)
    assert len(decode_message(eleven_skips[:-3], limits).ranges) == 10
    server = NegentropyServer(SortedItems(), limits)
    with pytest.raises(RemoteProtocolError):
        server.reconcile(b"\x61" + bytes(200))


def test_a_client_gives_up_after_max_rounds() -> None:
    items = [(i, ident(i)) for i in range(3000)]
    client = NegentropyClient(SortedItems(), NegentropyLimits(max_rounds=3))
    server = NegentropyServer(SortedItems(items), NegentropyLimits(frame_size_limit=4096))
    msg: bytes | None = client.initiate()
    with pytest.raises(RemoteProtocolError, match="over 3 rounds"):
        for _ in range(5):
            assert msg is not None
            msg, _, _ = client.reconcile(server.reconcile(msg))


def test_a_server_stops_answering_after_max_rounds() -> None:
    server = NegentropyServer(SortedItems(), NegentropyLimits(max_rounds=2))
    for _ in range(2):
        assert server.reconcile(b"\x61") == b"\x61"
    with pytest.raises(RemoteProtocolError, match="over 2 rounds"):
        server.reconcile(b"\x61")


def test_sessions_refuse_calls_out_of_order() -> None:
    client = NegentropyClient(SortedItems())
    with pytest.raises(LocalProtocolError, match="cannot message when idle"):
        client.reconcile(b"\x61")
    first = client.initiate()
    with pytest.raises(LocalProtocolError, match="cannot initiate when waiting"):
        client.initiate()
    assert client.reconcile(NegentropyServer(SortedItems()).reconcile(first))[0] is None
    with pytest.raises(LocalProtocolError, match="when done"):
        client.reconcile(b"\x61")
    server = NegentropyServer(SortedItems())
    with pytest.raises(RemoteProtocolError):
        server.reconcile(b"\x61\x00")
    with pytest.raises(LocalProtocolError, match="when failed"):
        server.reconcile(first)


@given(st.binary(max_size=300))
def test_random_bytes_never_raise_anything_but_remote_errors(data: bytes) -> None:
    items = [(i % 5, ident(i)) for i in range(80)]
    for side in (NegentropyServer(SortedItems(items)), fresh_client(items)):
        with contextlib.suppress(RemoteProtocolError):
            side.reconcile(data)


@given(st.binary(min_size=1, max_size=120), st.integers(1, 200))
def test_mutated_real_messages_never_raise_anything_but_remote_errors(
    noise: bytes, at: int
) -> None:
    items = [(i % 5, ident(i)) for i in range(80)]
    real = NegentropyClient(SortedItems(items[:60])).initiate()
    at %= len(real)
    data = real[:at] + noise + real[at + len(noise) :]
    with contextlib.suppress(RemoteProtocolError):
        NegentropyServer(SortedItems(items[20:])).reconcile(data)
