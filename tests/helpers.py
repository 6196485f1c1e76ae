"""Builders for signed ops and small federations, shared by the tests."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import nacl.signing

from archipel.crdt import Op, Replica, found_federation, sign_op, ts_from_ms

T0 = 1_750_000_000_000  # a fixed "now" in ms, so tests never read a clock


def key(n: int) -> nacl.signing.SigningKey:
    """A deterministic signing key: the same ``n`` always gives the same key."""
    return nacl.signing.SigningKey(hashlib.blake2b(b"test-key-%d" % n, digest_size=32).digest())


def pub(n: int) -> bytes:
    return bytes(key(n).verify_key)


def federation(members: int = 3, now_ms: int = T0) -> tuple[Replica, Op]:
    """A new federation founded by key(0), with key(0)..key(members-1) as founders."""
    return found_federation(key(0), "Test federation", [pub(i) for i in range(members)], now_ms)


def raw_op(
    n: int,
    genesis: Op,
    *,
    seq: int,
    deps: Sequence[bytes],
    ts: int,
    kind: str = "note",
    body: dict[str, object] | None = None,
) -> Op:
    """An op signed by key(n) with every field chosen by the test, valid or not."""
    return sign_op(
        key(n),
        federation=genesis.federation,
        seq=seq,
        deps=deps,
        ts=ts,
        kind=kind,
        body=body if body is not None else {"text": f"note {seq} by {n}"},  # type: ignore[arg-type]
    )


def ms(offset_ms: int) -> int:
    """A timestamp ``offset_ms`` after T0."""
    return ts_from_ms(T0 + offset_ms)
