"""The signed op envelope: canonical, authenticated, content-addressed."""

from __future__ import annotations

import hashlib

import pytest
from helpers import federation, key, ms, pub, raw_op
from hypothesis import given
from hypothesis import strategies as st

from archipel.crdt import (
    OP_SIGNING_DOMAIN,
    BadSignature,
    IdMismatch,
    InvalidOp,
    LimitExceeded,
    MalformedOp,
    NonCanonical,
    Value,
    decode_op,
    encode,
    sign_op,
)

_, GENESIS = federation()
FED = GENESIS.federation


def signed_fields(fields: list[Value], signer: int = 1, domain: bytes = OP_SIGNING_DOMAIN) -> bytes:
    """Bytes of an op with arbitrary fields and a genuine signature over them, so
    that only the field checks can refuse it."""
    signature = key(signer).sign(domain + encode(fields)).signature
    return encode([*fields, signature])


def good_fields() -> list[Value]:
    return [1, FED, pub(1), 1, (GENESIS.id,), ms(10), "note", {"text": "hi"}]


def test_sign_then_decode_round_trips() -> None:
    op = raw_op(1, GENESIS, seq=1, deps=[GENESIS.id], ts=ms(10))
    again = decode_op(op.data)
    assert again == op
    assert (again.author, again.seq, again.deps, again.ts, again.kind) == (
        pub(1), 1, (GENESIS.id,), ms(10), "note",
    )  # fmt: skip
    assert dict(again.body) == {"text": "note 1 by 1"}
    assert op.id == hashlib.blake2b(op.data, digest_size=32).digest()
    assert decode_op(signed_fields(good_fields())).id != op.id


def test_deps_are_stored_sorted_and_deduplicated() -> None:
    a, b = sorted([GENESIS.id, bytes(32)])
    op = raw_op(1, GENESIS, seq=1, deps=[b, a, b], ts=ms(10))
    assert op.deps == (a, b)


def test_signature_is_domain_separated() -> None:
    """A signature over the same bytes without (or with another) domain prefix fails."""
    decode_op(signed_fields(good_fields()))
    for domain in (b"", b"archipel/other/v1\x00", b"libp2p-noise:"):
        with pytest.raises(BadSignature):
            decode_op(signed_fields(good_fields(), domain=domain))


def test_signature_by_another_key_is_refused() -> None:
    fields = good_fields()
    with pytest.raises(BadSignature):
        decode_op(signed_fields(fields, signer=2))


def test_expected_id_must_match() -> None:
    op = raw_op(1, GENESIS, seq=1, deps=[GENESIS.id], ts=ms(10))
    assert decode_op(op.data, expected_id=op.id) == op
    with pytest.raises(IdMismatch):
        decode_op(op.data, expected_id=GENESIS.id)


@pytest.mark.parametrize(
    ("index", "bad", "why"),
    [
        (0, 2, "unknown format version"),
        (0, True, "bool as version"),
        (1, b"short", "federation length"),
        (2, "text", "author type"),
        (3, 0, "seq zero"),
        (3, -1, "negative seq"),
        (3, 2**63, "seq beyond 63 bits"),
        (4, (b"\x01" * 32, b"\x00" * 32), "deps unsorted"),
        (4, (b"\x01" * 32, b"\x01" * 32), "deps repeated"),
        (4, (b"\x01" * 31,), "dep length"),
        (4, b"\x01" * 32, "deps not an array"),
        (5, -1, "negative ts"),
        (5, "soon", "ts type"),
        (6, "Note", "kind with capitals"),
        (6, "", "empty kind"),
        (6, "x" * 65, "kind too long"),
        (7, ("text",), "body not a map"),
    ],
)
def test_each_field_is_checked(index: int, bad: Value, why: str) -> None:
    fields = good_fields()
    fields[index] = bad
    with pytest.raises(MalformedOp):
        decode_op(signed_fields(fields))


def test_shape_is_checked() -> None:
    with pytest.raises(MalformedOp):
        decode_op(encode(good_fields()))  # unsigned: 8 fields
    with pytest.raises(MalformedOp):
        decode_op(encode({"not": "an array"}))
    with pytest.raises(LimitExceeded):
        decode_op(signed_fields([*good_fields()[:4], tuple(bytes([i]) * 32 for i in range(65)),
                                 *good_fields()[5:]]))  # fmt: skip


def test_non_canonical_op_bytes_are_refused() -> None:
    op = raw_op(1, GENESIS, seq=1, deps=[GENESIS.id], ts=ms(10))
    # seq 1 re-encoded as uint8 (0xcc 0x01) instead of a positive fixint (0x01).
    position = op.data.index(b"\x01" + b"\x91")  # seq, then a 1-element deps array
    longer = op.data[:position] + b"\xcc\x01" + op.data[position + 1 :]
    with pytest.raises(NonCanonical):
        decode_op(longer)


def flipped(data: bytes, bit: int) -> bytes:
    mutable = bytearray(data)
    mutable[bit // 8] ^= 1 << (bit % 8)
    return bytes(mutable)


@pytest.mark.parametrize("which", ["genesis", "note"])
def test_every_single_bit_flip_is_rejected(which: str) -> None:
    """Exhaustively: no bit of a signed op can change without the op being refused."""
    op = GENESIS if which == "genesis" else raw_op(1, GENESIS, seq=1, deps=[GENESIS.id], ts=ms(9))
    for bit in range(len(op.data) * 8):
        with pytest.raises(InvalidOp):
            decode_op(flipped(op.data, bit))


@given(
    text=st.text(min_size=1, max_size=200),
    seq=st.integers(1, 2**63 - 1),
    ts=st.integers(0, 2**64 - 1),
    bit=st.integers(min_value=0),
)
def test_bit_flips_in_random_ops_are_rejected(text: str, seq: int, ts: int, bit: int) -> None:
    op = sign_op(key(1), federation=FED, seq=seq, deps=[GENESIS.id], ts=ts, kind="note",
                 body={"text": text})  # fmt: skip
    data = flipped(op.data, bit % (len(op.data) * 8))
    with pytest.raises(InvalidOp):
        decode_op(data, expected_id=op.id)
    with pytest.raises(InvalidOp):
        decode_op(data)


edits = st.lists(
    st.tuples(
        st.sampled_from(["insert", "delete", "replace"]), st.integers(0), st.integers(0, 255)
    ),
    min_size=1,
    max_size=4,
)


@given(edits)
def test_fuzz_mutated_ops_raise_only_typed_errors(changes: list[tuple[str, int, int]]) -> None:
    op = raw_op(1, GENESIS, seq=1, deps=[GENESIS.id], ts=ms(10))
    data = bytearray(op.data)
    for action, where, byte in changes:
        at = where % (len(data) + 1)
        if action == "insert":
            data.insert(at, byte)
        elif data and action == "delete":
            del data[at % len(data)]
        elif data:
            data[at % len(data)] = byte
    try:
        decoded = decode_op(bytes(data))
    except InvalidOp:
        return
    assert decoded.data == op.data  # the edits happened to cancel out


@given(st.binary(max_size=400))
def test_fuzz_arbitrary_bytes_into_decode_op(data: bytes) -> None:
    with pytest.raises(InvalidOp):
        decode_op(data)
