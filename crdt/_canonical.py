"""Canonical msgpack: exactly one byte string for each value.

Theory of operation. Values are a small closed set: nil, bool, int (64-bit),
str (UTF-8), bytes, arrays and maps with str keys. Floats, ext types and
timestamps are refused: they have several encodings or none that all
platforms agree on. A value's canonical encoding is what ``msgpack.packb``
produces with bin types on, maps written with keys in ascending code-point
order. msgpack-python already picks the shortest form for every int, str, bin,
array and map header, so the decoder can check canonicity by re-encoding and
comparing bytes, after it has checked that map keys are sorted (the one thing
a re-encode would preserve rather than fix).

Decoding untrusted bytes checks every limit before and while walking the value,
and turns every msgpack failure into :class:`MalformedOp` at this edge.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import msgpack

from ._errors import LimitExceeded, MalformedOp, NonCanonical

Value: TypeAlias = bool | int | str | bytes | Sequence["Value"] | Mapping[str, "Value"] | None
"""A value that can appear in an op. Decoded arrays are tuples."""

INT_MIN = -(2**63)
INT_MAX = 2**64 - 1


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what the decoder accepts. The defaults suit every record kind."""

    max_op_bytes: int = 64 * 1024
    max_depth: int = 8
    max_items: int = 1024
    max_str_bytes: int = 32 * 1024
    max_bin_bytes: int = 4 * 1024
    max_deps: int = 64


DEFAULT_LIMITS = Limits()


def encode(value: Value) -> bytes:
    """The canonical bytes of ``value``. Raises :class:`MalformedOp` if ``value``
    holds something that has no canonical encoding (a float, a non-str map key)."""
    _check_encodable(value, 0)
    try:
        return msgpack.packb(_sorted(value), use_bin_type=True)  # type: ignore[no-any-return]
    except (ValueError, TypeError, OverflowError) as exc:
        raise MalformedOp(f"value cannot be encoded: {exc}") from None


def decode(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Value:
    """Decode canonical bytes into a value, checking every limit.

    Raises :class:`LimitExceeded`, :class:`NonCanonical` or :class:`MalformedOp`;
    never a msgpack, Unicode or type error.
    """
    if len(data) > limits.max_op_bytes:
        raise LimitExceeded(f"op is {len(data)} bytes, over the limit of {limits.max_op_bytes}")
    n = len(data)
    try:
        value = msgpack.unpackb(
            data,
            raw=False,
            use_list=False,
            strict_map_key=True,
            max_str_len=min(n, limits.max_str_bytes),
            max_bin_len=min(n, limits.max_bin_bytes),
            max_array_len=min(n, limits.max_items),
            max_map_len=min(n, limits.max_items),
            max_ext_len=0,
        )
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as exc:
        detail = str(exc) or type(exc).__name__
        raise MalformedOp(f"not a single well-formed msgpack value: {detail}") from None
    _check_decoded(value, 0, limits)
    if msgpack.packb(value, use_bin_type=True) != data:
        raise NonCanonical("bytes are not the canonical encoding of the value they hold")
    return value  # type: ignore[no-any-return]


def _check_decoded(value: object, depth: int, limits: Limits) -> None:
    """Refuse types outside :data:`Value`, over-deep nesting and unsorted map keys.

    Recursion is bounded by ``limits.max_depth`` (checked before descending).
    """
    if value is None or isinstance(value, bool | str | bytes):
        return
    if isinstance(value, int):
        if not INT_MIN <= value <= INT_MAX:  # pragma: no cover - msgpack cannot produce these
            raise MalformedOp("integer out of range")
        return
    if isinstance(value, tuple | dict):
        if depth >= limits.max_depth:
            raise LimitExceeded(f"values nested deeper than {limits.max_depth} levels")
        if isinstance(value, tuple):
            for item in value:
                _check_decoded(item, depth + 1, limits)
            return
        previous: str | None = None
        for key, item in value.items():
            if not isinstance(key, str):
                raise MalformedOp("map keys must be strings")
            if previous is not None and key <= previous:
                raise NonCanonical(f"map keys out of order or repeated at {key!r}")
            previous = key
            _check_decoded(item, depth + 1, limits)
        return
    raise MalformedOp(f"values of type {type(value).__name__} are not allowed in an op")


def _check_encodable(value: object, depth: int) -> None:
    if value is None or isinstance(value, bool | str | bytes):
        return
    if isinstance(value, int):
        if not INT_MIN <= value <= INT_MAX:
            raise MalformedOp(f"integer {value} does not fit in 64 bits")
        return
    if depth > 64:
        raise MalformedOp("value nested too deeply to encode")
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise MalformedOp(f"map key {key!r} is not a string")
            _check_encodable(item, depth + 1)
        return
    if isinstance(value, list | tuple):
        for item in value:
            _check_encodable(item, depth + 1)
        return
    raise MalformedOp(f"values of type {type(value).__name__} cannot be put in an op")


def _sorted(value: Value) -> object:
    """``value`` with every map's keys in canonical (code-point) order."""
    if isinstance(value, Mapping):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list | tuple):
        return [_sorted(v) for v in value]
    return value
