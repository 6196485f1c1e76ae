"""The commons ledger: entries, balances as counters, corrections."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from helpers import (
    T0,
    assert_order_independent,
    cell,
    cells_federation,
    deliver,
    device,
    key,
    member,
    pub,
    replica_of,
    sync,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from archipel.crdt import InvalidOp, Op, Replica, RuleViolation, cell_id
from archipel.crdt.ledger import MAX_COUNTERPARTIES, MAX_QUANTITY, Balance, Ledger

NORTH, SOUTH, EAST = 0, 1, 2


def ledger(replica: Replica) -> Ledger:
    return replica.record(Ledger)


def entry(
    replica: Replica, who: int, kind: str, quantity: int, now: int, *,
    resource: str = "rice", unit: str = "kg", counterparties: tuple[bytes, ...] = (),
) -> Op:  # fmt: skip
    body: dict[str, Any] = {"type": kind, "resource": resource, "quantity": quantity,
                            "unit": unit, "note": "from the market run"}  # fmt: skip
    if counterparties:
        body["counterparties"] = tuple(sorted(counterparties))
    return replica.author(key(who), "ledger.entry", body, now)


def correct(replica: Replica, who: int, target: Op, quantity: int, now: int) -> Op:
    body = {"ref": target.id, "quantity": quantity, "note": "miscounted"}
    return replica.author(key(who), "ledger.correct", body, now)


def test_balances_are_contributions_plus_gifts_returned_minus_uses() -> None:
    replica, genesis = cells_federation()
    north, south = cell(genesis, NORTH), cell(genesis, SOUTH)
    entry(replica, member(NORTH), "contribution", 10, T0 + 10, counterparties=(south,))
    entry(replica, member(NORTH, 2), "use", 4, T0 + 20)
    entry(replica, member(NORTH), "gift_returned", 1, T0 + 30)
    entry(replica, member(NORTH), "contribution", 3, T0 + 40, unit="sack")
    entry(replica, member(SOUTH), "use", 2, T0 + 50, counterparties=(north,))
    assert ledger(replica).balance(north, "rice", "kg") == 7
    assert ledger(replica).balance(north, "rice", "sack") == 3
    assert ledger(replica).balance(south, "rice", "kg") == -2
    assert ledger(replica).balance(south, "beans", "kg") == 0
    assert ledger(replica).balances(north) == [
        Balance(north, "rice", "kg", contributions=10, uses=4, gifts_returned=1),
        Balance(north, "rice", "sack", contributions=3, uses=0, gifts_returned=0),
    ]
    assert len(ledger(replica).balances()) == 3
    assert [s.entry.quantity for s in ledger(replica).entries("rice")] == [10, 4, 1, 3, 2]
    assert ledger(replica).entries("beans") == []


def test_counterparties_must_be_other_live_cells_in_the_entrys_past() -> None:
    replica, genesis = cells_federation()
    with pytest.raises(RuleViolation, match="its own counterparty"):
        entry(replica, member(NORTH), "use", 1, T0 + 10, counterparties=(cell(genesis, NORTH),))
    with pytest.raises(RuleViolation, match="not a live cell"):
        entry(replica, member(NORTH), "use", 1, T0 + 10, counterparties=(bytes(32),))
    # A cell whose admission is not complete yet is not a counterparty.
    admission = replica.author(
        key(member(NORTH)), "cell.admit", {"name": "West", "members": (pub(40),)}, T0 + 20
    )
    west = cell_id(admission.id, 0)
    with pytest.raises(RuleViolation, match="not a live cell"):
        entry(replica, member(NORTH), "use", 1, T0 + 30, counterparties=(west,))
    replica.author(key(member(SOUTH)), "cell.endorse", {"admission": admission.id}, T0 + 40)
    made = entry(replica, member(NORTH), "use", 1, T0 + 50, counterparties=(west,))
    status = ledger(replica).entry(made.id)
    assert status is not None
    assert status.entry.counterparties == (west,)


def test_a_correction_states_the_right_quantity_and_a_later_one_supersedes_it() -> None:
    replica, genesis = cells_federation()
    north = cell(genesis, NORTH)
    wrong = entry(replica, member(NORTH), "contribution", 10, T0 + 10)
    entry(replica, member(NORTH), "contribution", 5, T0 + 15)
    first = correct(replica, member(NORTH, 2), wrong, 8, T0 + 20)  # any member of the cell
    assert ledger(replica).balance(north, "rice", "kg") == 13
    second = correct(replica, member(NORTH), wrong, 0, T0 + 30)  # it never happened
    assert ledger(replica).balance(north, "rice", "kg") == 5
    status = ledger(replica).entry(wrong.id)
    assert status is not None
    assert [c.id for c in status.corrections] == [first.id, second.id]
    assert status.in_effect is not None
    assert status.in_effect.id == second.id
    assert (status.entry.quantity, status.quantity, status.delta) == (10, 0, 0)
    assert not status.disputed


def test_only_the_entrys_cell_corrects_it_and_only_entries_are_corrected() -> None:
    replica, _ = cells_federation()
    made = entry(replica, member(NORTH), "use", 3, T0 + 10)
    fix = correct(replica, member(NORTH), made, 2, T0 + 20)
    before = replica.state_hash()
    with pytest.raises(RuleViolation, match="only the cell that made"):
        correct(replica, member(SOUTH), made, 1, T0 + 30)
    with pytest.raises(RuleViolation, match="correct the entry again"):
        correct(replica, member(NORTH), fix, 1, T0 + 30)
    with pytest.raises(RuleViolation, match="not of a device"):
        correct(replica, device(NORTH), made, 1, T0 + 30)
    with pytest.raises(RuleViolation, match="not of a device"):
        entry(replica, device(NORTH), "use", 1, T0 + 30)
    assert replica.state_hash() == before


def test_two_members_fixing_the_same_mistake_in_a_partition_fix_it_once() -> None:
    origin, genesis = cells_federation()
    north = cell(genesis, NORTH)
    wrong = entry(origin, member(NORTH), "contribution", 10, T0 + 10)
    one, two = replica_of(genesis, origin), replica_of(genesis, origin)
    correct(one, member(NORTH, 1), wrong, 7, T0 + 20)
    correct(two, member(NORTH, 2), wrong, 7, T0 + 20)
    sync(one, two)
    sync(two, one)
    for side in (one, two):
        assert ledger(side).balance(north, "rice", "kg") == 7
        status = ledger(side).entry(wrong.id)
        assert status is not None
        assert len(status.corrections) == 2
        assert not status.disputed


def test_conflicting_corrections_are_flagged_until_a_later_one_settles_them() -> None:
    origin, genesis = cells_federation()
    north = cell(genesis, NORTH)
    wrong = entry(origin, member(NORTH), "use", 10, T0 + 10)
    one, two = replica_of(genesis, origin), replica_of(genesis, origin)
    low = correct(one, member(NORTH, 1), wrong, 6, T0 + 20)
    high = correct(two, member(NORTH, 2), wrong, 9, T0 + 20)
    sync(one, two)
    sync(two, one)
    winner = max((low, high), key=lambda op: (op.ts, op.id))
    for side in (one, two):
        status = ledger(side).entry(wrong.id)
        assert status is not None
        assert status.disputed
        assert status.in_effect is not None
        assert status.in_effect.id == winner.id
        assert ledger(side).balance(north, "rice", "kg") == -winner.body["quantity"]  # type: ignore[operator]
    settle = correct(one, member(NORTH), wrong, 8, T0 + 30)
    status = ledger(one).entry(wrong.id)
    assert status is not None
    assert not status.disputed
    assert status.in_effect is not None
    assert status.in_effect.id == settle.id
    assert ledger(one).balance(north, "rice", "kg") == -8


def test_entries_and_corrections_by_a_key_revoked_concurrently_do_not_count() -> None:
    origin, genesis = cells_federation()
    north = cell(genesis, NORTH)
    kept = entry(origin, member(NORTH, 1), "contribution", 5, T0 + 10)
    cell_side, member_side = replica_of(genesis, origin), replica_of(genesis, origin)
    cell_side.author(key(member(NORTH, 1)), "key.revoke", {"key": pub(member(NORTH, 2))}, T0 + 20)
    rogue = entry(member_side, member(NORTH, 2), "use", 50, T0 + 20)
    correct(member_side, member(NORTH, 2), kept, 500, T0 + 30)
    assert ledger(member_side).balance(north, "rice", "kg") == 500 - 50
    sync(member_side, cell_side)
    sync(cell_side, member_side)
    for side in (cell_side, member_side):
        assert ledger(side).balance(north, "rice", "kg") == 5
        listed = ledger(side).entries("rice")
        assert [(s.entry.id, s.counts) for s in listed] == [(kept.id, True), (rogue.id, False)]
        status = ledger(side).entry(kept.id)
        assert status is not None
        assert (status.corrections, status.quantity) == ((), 5)


# -- bad input ------------------------------------------------------------------


def snapshot(replica: Replica) -> tuple[object, ...]:
    records = ledger(replica)
    return (
        replica.state_hash(),
        records.balances(),
        records.entries("rice"),
        [records.entry(op.id) for op in replica.graph.topological()],
    )


ENTRY = {"type": "use", "resource": "rice", "quantity": 2, "unit": "kg", "note": "n"}


def without(body: dict[str, Any], name: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != name}


def test_bad_entries_and_corrections_are_refused() -> None:
    replica, genesis = cells_federation()
    made = entry(replica, member(NORTH), "use", 3, T0 + 10)
    note = replica.author(key(member(NORTH)), "note", {"text": "hi"}, T0 + 15)
    south, east = cell(genesis, SOUTH), cell(genesis, EAST)
    many = tuple(sorted(bytes([i]) * 32 for i in range(1, MAX_COUNTERPARTIES + 2)))
    cases: list[tuple[str, dict[str, Any], str]] = [
        *[("ledger.entry", without(ENTRY, name), repr(name)) for name in ENTRY if name != "note"],
        ("ledger.entry", {**ENTRY, "colour": "red"}, "unknown field"),
        ("ledger.entry", {**ENTRY, "type": "theft"}, "'type'"),
        ("ledger.entry", {**ENTRY, "type": 1}, "'type'"),
        ("ledger.entry", {**ENTRY, "resource": ""}, "'resource'"),
        ("ledger.entry", {**ENTRY, "resource": "r" * 201}, "'resource'"),
        ("ledger.entry", {**ENTRY, "quantity": 0}, "'quantity'"),
        ("ledger.entry", {**ENTRY, "quantity": -2}, "'quantity'"),
        ("ledger.entry", {**ENTRY, "quantity": MAX_QUANTITY + 1}, "'quantity'"),
        ("ledger.entry", {**ENTRY, "quantity": "2"}, "'quantity'"),
        ("ledger.entry", {**ENTRY, "quantity": False}, "'quantity'"),
        ("ledger.entry", {**ENTRY, "unit": ""}, "'unit'"),
        ("ledger.entry", {**ENTRY, "note": 5}, "'note'"),
        ("ledger.entry", {**ENTRY, "note": "x" * 1001}, "'note'"),
        ("ledger.entry", {**ENTRY, "counterparties": south}, "'counterparties'"),
        ("ledger.entry", {**ENTRY, "counterparties": (b"short",)}, "'counterparties'"),
        ("ledger.entry", {**ENTRY, "counterparties": tuple(sorted((south, east)))[::-1]},
         "sorted"),
        ("ledger.entry", {**ENTRY, "counterparties": (south, south)}, "sorted"),
        ("ledger.entry", {**ENTRY, "counterparties": many}, "at most"),
        ("ledger.entry", {**ENTRY, "counterparties": (made.id,)}, "not a live cell"),
        ("ledger.correct", {"quantity": 1}, "'ref'"),
        ("ledger.correct", {"ref": made.id}, "'quantity'"),
        ("ledger.correct", {"ref": made.id, "quantity": -1}, "'quantity'"),
        ("ledger.correct", {"ref": made.id, "quantity": MAX_QUANTITY + 1}, "'quantity'"),
        ("ledger.correct", {"ref": made.id, "quantity": "1"}, "'quantity'"),
        ("ledger.correct", {"ref": made.id, "quantity": 1, "x": 1}, "unknown field"),
        ("ledger.correct", {"ref": made.id, "quantity": 1, "note": b"n"}, "'note'"),
        ("ledger.correct", {"ref": note.id, "quantity": 1}, "ledger.entry"),
        ("ledger.correct", {"ref": bytes(32), "quantity": 1}, "'ref'"),
        ("ledger.correct", {"ref": "entry", "quantity": 1}, "'ref'"),
    ]  # fmt: skip
    for kind, body, why in cases:
        before = snapshot(replica)
        with pytest.raises(RuleViolation, match=why):
            replica.author(key(member(NORTH)), kind, body, T0 + 20)
        assert snapshot(replica) == before, (kind, body)


# -- convergence ----------------------------------------------------------------


@dataclass(frozen=True)
class History:
    genesis: Op
    ops: list[Op]


ACTIONS = ["entry", "entry", "correct", "correct", "correct", "revoke"]


@st.composite
def histories(draw: st.DrawFn) -> History:
    """Three replicas; each cell's first member works on their cell's replica,
    the second on the next one (so a revocation is concurrent with their
    entries). Replicas often pull from one another; refused attempts are skipped."""
    _, genesis = cells_federation()
    first = replica_of(genesis)
    # One entry per cell, seen by everyone, for corrections to contend over.
    ops = [genesis, *(entry(first, member(i), "use", 3, T0 + 10 + i) for i in range(3))]
    replicas = [first, replica_of(genesis, first), replica_of(genesis, first)]
    now = T0 + 12
    for _ in range(draw(st.integers(2, 10))):
        now += draw(st.integers(0, 30))
        who = draw(st.integers(0, 2))
        action = draw(st.sampled_from(ACTIONS))
        n = 1 if action == "revoke" else draw(st.integers(1, 2))
        replica = replicas[(who + n - 1) % 3]
        if draw(st.integers(0, 2)):
            for op in replicas[draw(st.integers(0, 2))].graph.topological():
                replica.receive(op, now)
        try:
            made = act(draw, replica, action, (who, n), cell(genesis, who), now)
        except InvalidOp:
            continue
        if made is not None:
            ops.append(made)
    return History(genesis, ops)


def act(
    draw: st.DrawFn, replica: Replica, action: str, who: tuple[int, int], own: bytes, now: int
) -> Op | None:
    """One attempt by member ``who`` (cell index, member number) of cell ``own``."""
    author = member(*who)
    if action == "revoke":
        return replica.author(key(author), "key.revoke", {"key": pub(member(who[0], 2))}, now)
    if action == "entry":
        kind = draw(st.sampled_from(["contribution", "use", "gift_returned"]))
        resource = draw(st.sampled_from(["rice", "tools"]))
        return entry(replica, author, kind, draw(st.integers(1, 5)), now, resource=resource)
    ours = [
        op for op in replica.graph.topological()
        if op.kind == "ledger.entry" and replica.authority.cell_of(op.author) == own
    ]  # fmt: skip
    if not ours:
        return None
    return correct(replica, author, draw(st.sampled_from(ours)), draw(st.integers(0, 5)), now)


def outcome(replica: Replica) -> tuple[object, ...]:
    records = ledger(replica)
    return (snapshot(replica), records.entries("tools"), [b.balance for b in records.balances()])


@given(data=st.data(), history=histories())
def test_any_order_with_duplicates_gives_one_ledger(data: st.DataObject, history: History) -> None:
    assert_order_independent(data, history.genesis, history.ops, outcome)


def test_ledger_histories_do_produce_corrections_and_discounted_entries() -> None:
    """Guard: the generator must build the cases the property is about."""
    seen: set[str] = set()

    # A fixed sample (derandomized): a guard that passes only by luck would be flaky.
    @settings(derandomize=True, max_examples=200)
    @given(history=histories())
    def look(history: History) -> None:
        replica = deliver(history.genesis, history.ops)
        if len(replica.heads()) > 1:
            seen.add("concurrent")
        for op in history.ops:
            status = ledger(replica).entry(op.id)
            if status is None:
                continue
            if not status.counts:
                seen.add("discounted")
            if status.corrections:
                seen.add("corrected")
            if status.disputed:
                seen.add("disputed")

    look()
    assert seen >= {"concurrent", "discounted", "corrected", "disputed"}
