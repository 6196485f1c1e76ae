"""Canonical msgpack: one encoding per value, every other encoding refused."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from archipel.crdt import (
    ArchipelError,
    LimitExceeded,
    Limits,
    MalformedOp,
    NonCanonical,
    Value,
    decode,
    encode,
)

values: st.SearchStrategy[Value] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.text(max_size=40)
    | st.binary(max_size=40),
    lambda children: (
        st.lists(children, max_size=5).map(tuple)
        | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)


@given(values)
def test_decode_inverts_encode(value: Value) -> None:
    data = encode(value)
    assert decode(data) == value
    assert encode(decode(data)) == data


@given(st.dictionaries(st.text(max_size=8), st.integers(-(2**63), 2**63), min_size=2, max_size=8))
def test_map_key_order_does_not_change_the_encoding(mapping: dict[str, int]) -> None:
    reordered = dict(reversed(list(mapping.items())))
    assert encode(mapping) == encode(reordered)


@pytest.mark.parametrize(
    ("hex_bytes", "what"),
    [
        ("d005", "5 as int8"),
        ("cc05", "5 as uint8"),
        ("cd0005", "5 as uint16"),
        ("d1ffff", "-1 as int16"),
        ("d90161", "'a' as str8"),
        ("c50001" + "61", "b'a' as bin16"),
        ("dc0001c0", "one-element array as array16"),
        ("de0001a161c0", "one-entry map as map16"),
        ("82a162c0a161c0", "map keys out of order"),
    ],
)
def test_non_minimal_forms_are_refused(hex_bytes: str, what: str) -> None:
    with pytest.raises(NonCanonical):
        decode(bytes.fromhex(hex_bytes))


def test_duplicate_map_keys_are_refused() -> None:
    with pytest.raises(NonCanonical):
        decode(bytes.fromhex("82a161c0a161c3"))


@pytest.mark.parametrize(
    ("hex_bytes", "what"),
    [
        ("ca00000000", "float32"),
        ("cb0000000000000000", "float64"),
        ("c70105" + "78", "ext type"),
        ("d6ff00000000", "timestamp ext"),
        ("c1", "reserved byte"),
        ("0102", "trailing bytes"),
        ("92", "truncated array"),
        ("", "no bytes"),
        ("d902fffe", "invalid UTF-8"),
        ("8101c0", "integer map key"),
        ("81c40161c0", "bytes map key"),
    ],
)
def test_values_outside_the_model_are_refused(hex_bytes: str, what: str) -> None:
    with pytest.raises(MalformedOp):
        decode(bytes.fromhex(hex_bytes))


def test_limits() -> None:
    limits = Limits(max_op_bytes=100, max_depth=3, max_items=4, max_str_bytes=5, max_bin_bytes=6)
    decode(encode(((("ok",),),)), limits)
    for too_much in [
        b"x" * 101,
        encode((((("deep",),),),)),
        encode((1, 2, 3, 4, 5)),
        encode({"a": 1, "b": 2, "c": 3, "d": 4, "e": 5}),
        encode("sixsix"),
        encode(b"sevense"),
    ]:
        with pytest.raises((LimitExceeded, MalformedOp)):
            decode(too_much, limits)


def test_encode_refuses_what_has_no_canonical_form() -> None:
    for bad in [1.5, {1: "int key"}, 2**64, -(2**63) - 1, {"set": {1, 2}}]:
        with pytest.raises(MalformedOp):
            encode(bad)  # type: ignore[arg-type]


def regression_inputs() -> list[bytes]:
    """Inputs kept from fuzzing and from reading msgpack's source: each once
    risked an exception other than ours, a huge allocation or deep recursion."""
    path = Path(__file__).parent / "regressions" / "decoder.txt"
    lines = path.read_text().splitlines()
    return [
        bytes.fromhex(line.split("#")[0].strip()) for line in lines if line.split("#")[0].strip()
    ]


@pytest.mark.parametrize("data", regression_inputs(), ids=lambda d: d[:8].hex())
def test_regression_inputs_raise_typed_errors(data: bytes) -> None:
    with pytest.raises(ArchipelError):
        decode(data)


@given(st.binary(max_size=300))
def test_fuzz_arbitrary_bytes_raise_only_typed_errors(data: bytes) -> None:
    try:
        value = decode(data)
    except ArchipelError:
        return
    assert encode(value) == data  # anything accepted is canonical


def test_deep_nesting_from_the_wire_is_refused_without_recursion() -> None:
    for depth in (9, 200, 5000, 100_000):
        with pytest.raises(MalformedOp):
            decode(b"\x91" * depth + b"\xc0", Limits(max_op_bytes=10**6))


def test_msgpack_still_packs_minimally() -> None:
    """The canonicity check relies on msgpack-python choosing the shortest form."""
    assert msgpack.packb(200) == b"\xcc\xc8"
    assert msgpack.packb(-33) == b"\xd0\xdf"
    assert msgpack.packb("a" * 32, use_bin_type=True)[:2] == b"\xd9\x20"
