"""Storage for set reconciliation: the items a node holds, sorted, with O(1)
range fingerprints (Negentropy v1's fingerprint algorithm).

Items are ``(timestamp, 32-byte id)``; :class:`SortedItems` keeps them in flat
arrays (timestamps in an ``array('Q')``, ids in one ``bytes``, prefix sums of
the ids modulo 2**256 in another), so a range fingerprint costs O(1) and a
bound lookup O(log n). :mod:`archipel.protocol.negentropy` reconciles over any
:class:`ItemStore`.
"""

from __future__ import annotations

import hashlib
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable
from typing import Final, Protocol

from .errors import LocalProtocolError

ID_SIZE: Final = 32
FINGERPRINT_SIZE: Final = 16
INFINITY: Final = 2**64 - 1  # the reserved timestamp above every item's
_MASK: Final = (1 << 256) - 1
_ZERO_ID: Final = bytes(ID_SIZE)


def encode_varint(n: int) -> bytes:
    """Base-128, most significant digit first, high bit on all but the last byte."""
    if not 0 <= n <= INFINITY:
        raise LocalProtocolError(f"varint out of range: {n}")
    out = bytearray((n & 0x7F,))
    n >>= 7
    while n:
        out.append(0x80 | (n & 0x7F))
        n >>= 7
    out.reverse()
    return bytes(out)


def _fingerprint_of_sum(total: int, count: int) -> bytes:
    data = (total & _MASK).to_bytes(ID_SIZE, "little") + encode_varint(count)
    return hashlib.sha256(data).digest()[:FINGERPRINT_SIZE]


def fingerprint(ids: Iterable[bytes]) -> bytes:
    """The spec's fingerprint: SHA-256 of (the sum of the ids as little-endian
    integers mod 2**256, then their count as a varint), first 16 bytes."""
    total = count = 0
    for item_id in ids:
        total += int.from_bytes(item_id, "little")
        count += 1
    return _fingerprint_of_sum(total, count)


# -- encoding and decoding --------------------------------------------------------


class ItemStore(Protocol):
    """What the reconciler needs from a sorted item set; an index is a
    position in ``(timestamp, id)`` order, a range ``lo..hi`` excludes ``hi``."""

    def __len__(self) -> int: ...
    def timestamp(self, i: int) -> int: ...
    def item_id(self, i: int) -> bytes: ...
    def ids(self, lo: int, hi: int) -> bytes: ...  # the range's ids, concatenated
    def lower_bound(self, ts: int, id32: bytes, lo: int, hi: int) -> int: ...
    def fingerprint(self, lo: int, hi: int) -> bytes: ...


class SortedItems:
    """An immutable sorted item set in flat arrays, 72 bytes an item (8 for
    the timestamp, 32 the id, 32 a prefix sum of the ids): O(1) fingerprints,
    O(log n) bound lookups. Items are ``(timestamp, 32-byte id)``, unique."""

    __slots__ = ("_ids", "_sums", "_ts")

    def __init__(self, items: Iterable[tuple[int, bytes]] = ()) -> None:
        ordered = sorted(items)
        _check_items(ordered)
        ts = array("Q", [t for t, _ in ordered])
        self._setup(ts, b"".join(i for _, i in ordered), 0, check=False)

    @classmethod
    def from_sorted(cls, timestamps: array[int], ids: bytes, *, check: bool = True) -> SortedItems:
        """Wrap arrays already in ``(timestamp, id)`` order (``ids``: the 32-byte
        ids concatenated); ``check`` verifies the order, in O(n)."""
        if timestamps.typecode != "Q" or len(ids) != ID_SIZE * len(timestamps):
            raise LocalProtocolError("need an array('Q') of timestamps and 32 bytes per id")
        self = cls.__new__(cls)
        self._setup(timestamps, bytes(ids), 0, check=check)
        return self

    def _setup(self, ts: array[int], ids: bytes, start: int, head: bytes = _ZERO_ID,
               *, check: bool = True) -> None:  # fmt: skip
        if check:
            _check_sorted(ts, ids, max(start - 1, 0))
        self._ts, self._ids = ts, ids
        self._sums = _prefix_sums(ids, start, head)

    def __len__(self) -> int:
        return len(self._ts)

    def timestamp(self, i: int) -> int:
        return self._ts[i]

    def item_id(self, i: int) -> bytes:
        return self._ids[ID_SIZE * i : ID_SIZE * i + ID_SIZE]

    def ids(self, lo: int, hi: int) -> bytes:
        return self._ids[ID_SIZE * lo : ID_SIZE * hi]

    def lower_bound(self, ts: int, id32: bytes, lo: int, hi: int) -> int:
        """The first index in ``lo..hi`` whose item is ``>= (ts, id32)``, else ``hi``."""
        lo = bisect_left(self._ts, ts, lo, hi)
        if lo == hi or self._ts[lo] != ts or id32 == _ZERO_ID:
            return lo
        hi, ids = bisect_right(self._ts, ts, lo, hi), self._ids
        while lo < hi:
            mid = (lo + hi) // 2
            if ids[ID_SIZE * mid : ID_SIZE * mid + ID_SIZE] < id32:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def fingerprint(self, lo: int, hi: int) -> bytes:
        """The spec's fingerprint of the ids of items ``lo..hi``, from two prefix sums."""
        sums = self._sums
        total = int.from_bytes(sums[ID_SIZE * hi : ID_SIZE * hi + ID_SIZE], "little")
        total -= int.from_bytes(sums[ID_SIZE * lo : ID_SIZE * lo + ID_SIZE], "little")
        return _fingerprint_of_sum(total, hi - lo)

    def __contains__(self, item: object) -> bool:
        if not (isinstance(item, tuple) and len(item) == 2):
            return False
        at = self.lower_bound(item[0], item[1], 0, len(self))
        return at < len(self) and self._ts[at] == item[0] and self.item_id(at) == item[1]

    def with_items(self, items: Iterable[tuple[int, bytes]]) -> SortedItems:
        """A new set with ``items`` added (those already here are ignored).
        Cheap for recent items: only the tail after the first insertion point
        is re-sorted and gets new prefix sums."""
        new = sorted(set(items))
        _check_items(new)
        new = [item for item in new if item not in self]
        if not new:
            return self
        first = self.lower_bound(new[0][0], new[0][1], 0, len(self))
        tail = sorted([*zip(self._ts[first:], self._iter_ids(first), strict=True), *new])
        out = SortedItems.__new__(SortedItems)
        ts = self._ts[:first] + array("Q", [t for t, _ in tail])
        ids = self._ids[: ID_SIZE * first] + b"".join(i for _, i in tail)
        out._setup(ts, ids, first, self._sums[: ID_SIZE * (first + 1)], check=False)
        return out

    def _iter_ids(self, start: int) -> Iterable[bytes]:
        ids = self._ids
        return (ids[o : o + ID_SIZE] for o in range(ID_SIZE * start, len(ids), ID_SIZE))


def _check_items(items: list[tuple[int, bytes]]) -> None:
    """Each item a ``(timestamp below infinity, 32-byte id)``; no duplicates."""
    for k, (t, i) in enumerate(items):
        if not (isinstance(t, int) and 0 <= t < INFINITY and isinstance(i, bytes)
                and len(i) == ID_SIZE):  # fmt: skip
            raise LocalProtocolError("an item is (timestamp < 2**64-1, 32-byte id)")
        if k and items[k - 1] == (t, i):
            raise LocalProtocolError("duplicate item")


def _check_sorted(ts: array[int], ids: bytes, start: int) -> None:
    """Strictly increasing ``(timestamp, id)`` from ``start`` on, none at infinity."""
    if ts and ts[-1] >= INFINITY:
        raise LocalProtocolError("an item's timestamp must be below 2**64-1")
    for i in range(start + 1, len(ts)):
        at = ID_SIZE * i
        if ts[i - 1] > ts[i] or (
            ts[i - 1] == ts[i] and ids[at - ID_SIZE : at] >= ids[at : at + 32]
        ):
            raise LocalProtocolError(f"items out of order or duplicated at index {i}")


def _prefix_sums(ids: bytes, start: int, head: bytes) -> bytes:
    """Prefix sums of the ids mod 2**256, 32 bytes little-endian each, for
    indices after ``start`` (``head`` holds the sums up to ``start``). Built in
    chunks, so the transient memory stays small next to the result."""
    acc = int.from_bytes(head[-ID_SIZE:], "little")
    out, parts = bytearray(head), list[bytes]()
    append, from_bytes = parts.append, int.from_bytes
    for offset in range(ID_SIZE * start, len(ids), ID_SIZE):
        acc += from_bytes(ids[offset : offset + ID_SIZE], "little")
        append((acc & _MASK).to_bytes(ID_SIZE, "little"))
        if len(parts) == 4096:
            out += b"".join(parts)
            parts.clear()
    out += b"".join(parts)
    return bytes(out)


# -- reconciliation ---------------------------------------------------------------
