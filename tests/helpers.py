"""Builders for signed ops and small federations, shared by the tests."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import nacl.signing
from hypothesis import strategies as st

from archipel.crdt import (
    DEFAULT_RECORDS,
    Op,
    Params,
    Record,
    Replica,
    cell_id,
    found_federation,
    sign_op,
    ts_from_ms,
    ts_ms,
)

T0 = 1_750_000_000_000  # a fixed "now" in ms, so tests never read a clock


def key(n: int) -> nacl.signing.SigningKey:
    """A deterministic signing key: the same ``n`` always gives the same key."""
    return nacl.signing.SigningKey(hashlib.blake2b(b"test-key-%d" % n, digest_size=32).digest())


def pub(n: int) -> bytes:
    return bytes(key(n).verify_key)


def federation(members: int = 3, now_ms: int = T0) -> tuple[Replica, Op]:
    """A new federation founded by key(0): one cell whose members are key(0)..key(members-1)."""
    cell = {"name": "Founders", "members": [pub(i) for i in range(members)]}
    return found_federation(key(0), "Test federation", [cell], now_ms)


# Three founding cells: North (members key 10, 11; device 19), South (20, 21;
# 29) and East (30, 31; 39). Admission needs the backing of 2 cells.
CELLS = ("North", "South", "East")


def member(cell: int, n: int = 1) -> int:
    """Key number of member ``n`` (1 or 2) of cell ``cell`` (0 North, 1 South, 2 East)."""
    return 10 * (cell + 1) + n


def device(cell: int) -> int:
    return 10 * (cell + 1) + 9


def cells_federation(
    now_ms: int = T0, records: Sequence[type[Record]] = DEFAULT_RECORDS, **params: int
) -> tuple[Replica, Op]:
    """The three-cell federation, founded by North's first member, running ``records``."""
    cells = [
        {
            "name": name,
            "members": [pub(member(i, 1)), pub(member(i, 2))],
            "devices": [pub(device(i))],
        }
        for i, name in enumerate(CELLS)
    ]
    return found_federation(
        key(member(0)), "River cells", cells, now_ms, params=Params(**params), records=records
    )


def cell(genesis: Op, index: int) -> bytes:
    """The id of founding cell ``index`` of ``genesis``."""
    return cell_id(genesis.id, index)


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


def _latest_ms(ops: Sequence[Op]) -> int:
    return max(ts_ms(op.ts) for op in ops)


def fork(replica: Replica, now_ms: int | None = None) -> Replica:
    """A second replica of the same federation holding every op ``replica`` holds
    (one side of a partition that starts now: by default, at its newest op)."""
    other = Replica(replica.federation, records=replica.record_classes)
    ops = list(replica.graph.topological())
    for op in ops:
        other.receive(op, now_ms if now_ms is not None else _latest_ms(ops))
    return other


def merge(*replicas: Replica, now_ms: int | None = None) -> None:
    """Heal a partition: every replica receives every op any of them holds
    (delivered at ``now_ms``, by default the newest op's time)."""
    everything = {op.id: op for r in replicas for op in r.graph.topological()}
    ordered = sorted(everything.values(), key=lambda op: (op.ts, op.id))
    if now_ms is None:
        now_ms = _latest_ms(ordered)
    for replica in replicas:
        for op in ordered:
            replica.receive(op, now_ms)
    hashes = {r.state_hash() for r in replicas}
    assert len(hashes) == 1, "replicas hold different op sets after merging"


LATE_MS = T0 + 30 * 24 * 3600 * 1000
"""A delivery time late enough that no test op is held as future-dated."""


def sync(source: Replica, target: Replica, now_ms: int = LATE_MS) -> None:
    """``target`` receives everything ``source`` holds."""
    for op in source.graph.topological():
        target.receive(op, now_ms)


def replica_of(genesis: Op, *sources: Replica) -> Replica:
    """A new replica of ``genesis``'s federation holding everything ``sources``
    hold (one side of a partition)."""
    replica = Replica(genesis.federation)
    replica.receive(genesis, T0)
    for source in sources:
        sync(source, replica)
    return replica


def deliver(genesis: Op, ops: Sequence[Op], now_ms: int = LATE_MS) -> Replica:
    """A fresh replica that received ``ops`` in the given order."""
    replica = Replica(genesis.federation)
    for op in ops:
        replica.receive(op, now_ms)
    return replica


def assert_order_independent(
    data: st.DataObject,
    genesis: Op,
    ops: Sequence[Op],
    outcome: Callable[[Replica], object],
    *,
    max_duplicates: int = 6,
) -> Replica:
    """The convergence law: ``ops`` delivered in any drawn order, with drawn
    duplicates, give the same ``outcome`` as in (ts, id) order. Returns the
    replica that received them in (ts, id) order."""
    reference = deliver(genesis, sorted(ops, key=lambda op: (op.ts, op.id)))
    assert len(reference.graph) == len(set(ops))
    duplicates = data.draw(st.lists(st.sampled_from(list(ops)), max_size=max_duplicates))
    order = data.draw(st.permutations([*ops, *duplicates]))
    assert outcome(deliver(genesis, order)) == outcome(reference)
    return reference
