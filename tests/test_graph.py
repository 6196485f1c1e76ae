"""The op graph: waiting sets, causality rules, equivocation, causal queries."""

from __future__ import annotations

import pytest
from helpers import T0, federation, key, ms, pub, raw_op

from archipel.crdt import (
    CausalityViolation,
    GraphLimits,
    HeldSetFull,
    InvalidOp,
    Notes,
    Op,
    PendingSetFull,
    Replica,
    RuleViolation,
    Status,
    decode_op,
    found_federation,
    make_genesis,
    ts_from_ms,
)


def fresh(genesis: Op | None = None, **limits: int) -> Replica:
    """An empty replica of ``genesis``'s federation (by default: ``federation()``'s)."""
    if genesis is None:
        _, genesis = federation()
    return Replica(genesis.federation, graph_limits=GraphLimits(**limits))


def chain(length: int) -> tuple[Replica, list[Op]]:
    """A replica with a genesis and ``length`` notes by key(1), each on the last."""
    origin, genesis = federation()
    ops = [genesis]
    for i in range(length):
        ops.append(origin.author(key(1), "note", {"text": f"n{i}"}, T0 + 10 * (i + 1)))
    return origin, ops


def test_an_op_waits_for_its_deps_and_applies_exactly_when_the_last_arrives() -> None:
    origin, (genesis, a, b, c) = chain(3)
    replica = fresh()
    assert replica.receive(c, T0).status is Status.PENDING
    assert replica.receive(b, T0).status is Status.PENDING
    assert replica.graph.missing() == {a.id}
    assert replica.receive(a, T0).status is Status.PENDING  # genesis still missing
    assert len(replica.graph) == 0
    assert replica.graph.pending_count() == 3
    assert replica.graph.missing() == {genesis.id}
    result = replica.receive(genesis, T0)
    assert result.status is Status.APPLIED
    assert result.applied == (genesis, a, b, c)
    assert replica.graph.pending_count() == 0
    assert replica.graph.missing() == frozenset()
    assert replica.state_hash() == origin.state_hash()


def test_a_diamond_applies_its_join_only_after_both_sides() -> None:
    origin, genesis = federation()
    left = origin.author(key(1), "note", {"text": "left"}, T0 + 10)
    replica_b = Replica(genesis.federation)
    replica_b.receive(genesis, T0)
    right = replica_b.author(key(2), "note", {"text": "right"}, T0 + 10)
    origin.receive(right, T0 + 20)
    join = origin.author(key(0), "note", {"text": "join"}, T0 + 30)
    # The heads, plus the author's own previous op (key(0) signed the genesis).
    assert set(join.deps) == {left.id, right.id, genesis.id}
    replica = fresh()
    for op in (join, right, genesis):
        replica.receive(op, T0 + 40)
    assert join.id not in replica.graph
    assert right.id in replica.graph
    assert replica.receive(left, T0 + 40).applied == (left, join)
    assert replica.heads() == {join.id}


def test_pending_set_bound_is_enforced_and_overflow_changes_nothing() -> None:
    _, (genesis, *notes) = chain(4)
    replica = fresh(max_pending=2)
    replica.receive(notes[3], T0)
    replica.receive(notes[2], T0)
    with pytest.raises(PendingSetFull):
        replica.receive(notes[1], T0)
    assert replica.graph.pending_count() == 2
    assert not replica.graph.is_pending(notes[1].id)
    replica.receive(genesis, T0)
    replica.receive(notes[0], T0)
    assert replica.receive(notes[1], T0).applied == (notes[1], notes[2], notes[3])


def test_future_dated_ops_are_held_until_now_reaches_them() -> None:
    origin, genesis = federation()
    skew = 60_000
    future = origin.author(key(1), "note", {"text": "from the future"}, T0 + 2 * skew)
    child = origin.author(key(2), "note", {"text": "after it"}, T0 + 2 * skew + 1)
    replica = Replica(genesis.federation, graph_limits=GraphLimits(max_skew_ms=skew))
    replica.receive(genesis, T0)
    assert replica.receive(future, T0).status is Status.HELD
    assert replica.graph.is_held(future.id)
    assert future.id not in replica.graph
    assert replica.receive(child, T0).status is Status.HELD
    assert replica.next_deadline_ms() == T0 + 2 * skew
    assert replica.tick(T0 + 2 * skew - 1).applied == ()  # not yet
    assert replica.tick(T0 + 2 * skew).applied == (future,)
    assert replica.tick(T0 + 2 * skew + 1).applied == (child,)
    assert replica.next_deadline_ms() is None
    assert replica.state_hash() == origin.state_hash()


def test_ops_within_the_skew_bound_apply_at_once() -> None:
    origin, genesis = federation()
    soon = origin.author(key(1), "note", {"text": "a little early"}, T0 + 59_000)
    replica = Replica(genesis.federation)
    replica.receive(genesis, T0)
    assert replica.receive(soon, T0).status is Status.APPLIED


def test_held_set_bound_is_enforced() -> None:
    _, (genesis, *notes) = chain(3)
    replica = Replica(genesis.federation, graph_limits=GraphLimits(max_held=1, max_skew_ms=0))
    replica.receive(genesis, T0)
    replica.receive(notes[0], T0)  # dated T0 + 10: in the future at T0, no skew allowed
    with pytest.raises(HeldSetFull):
        replica.receive(notes[1], T0)
    assert replica.graph.held_count() == 1


@pytest.mark.parametrize("offset", [0, -1])
def test_a_timestamp_not_after_a_deps_is_rejected(offset: int) -> None:
    _, genesis = federation()
    replica = fresh()
    replica.receive(genesis, T0)
    op = raw_op(1, genesis, seq=1, deps=[genesis.id], ts=genesis.ts + offset)
    with pytest.raises(CausalityViolation, match="timestamp"):
        replica.receive(op, T0)
    assert op.id not in replica.graph
    assert replica.heads() == {genesis.id}


def test_an_author_must_chain_their_own_ops() -> None:
    _, genesis = federation()
    replica = fresh()
    replica.receive(genesis, T0)
    with pytest.raises(CausalityViolation, match="op 2 of its author"):
        replica.receive(raw_op(1, genesis, seq=2, deps=[genesis.id], ts=ms(5)), T0)
    first = raw_op(1, genesis, seq=1, deps=[genesis.id], ts=ms(5))
    replica.receive(first, T0)
    replica.receive(raw_op(1, genesis, seq=2, deps=[first.id], ts=ms(6)), T0)


def test_ops_of_another_federation_are_rejected() -> None:
    _, other = found_federation(key(5), "Elsewhere", [{"name": "Solo", "members": [pub(5)]}], T0)
    replica = fresh()
    with pytest.raises(CausalityViolation, match="another federation"):
        replica.receive(other, T0)


def test_only_the_federations_own_genesis_is_a_root() -> None:
    _, genesis = federation()
    replica = fresh()
    replica.receive(genesis, T0)
    # A second genesis carrying this federation's id, by someone else.
    impostor = raw_op(
        2,
        genesis,
        seq=1,
        deps=[],
        ts=genesis.ts,
        kind="genesis",
        body={"name": "Mine now", "cells": ({"members": (pub(2),), "name": "X"},)},
    )
    with pytest.raises(RuleViolation, match="does not found this federation"):
        replica.receive(impostor, T0)
    with pytest.raises(RuleViolation, match="only the genesis"):
        replica.receive(raw_op(1, genesis, seq=1, deps=[], ts=ms(1)), T0)
    # The genesis of a federation of the same name is a different federation.
    cells = [{"name": "Founders", "members": [pub(0), pub(1)]}]
    again = make_genesis(key(0), name="Test federation", cells=cells, ts=ts_from_ms(T0 + 1))
    assert again.federation != genesis.federation


def test_kind_rules_apply() -> None:
    _, genesis = federation(members=2)
    replica = fresh(genesis)
    replica.receive(genesis, T0)
    cases = [
        (raw_op(9, genesis, seq=1, deps=[genesis.id], ts=ms(1)), "not authorised"),
        (raw_op(1, genesis, seq=1, deps=[genesis.id], ts=ms(1), kind="vote"), "unknown op kind"),
        (raw_op(1, genesis, seq=1, deps=[genesis.id], ts=ms(1), body={}), "'text'"),
        (raw_op(1, genesis, seq=1, deps=[genesis.id], ts=ms(1), body={"text": ""}), "'text'"),
        (raw_op(1, genesis, seq=1, deps=[genesis.id], ts=ms(1), body={"text": 5}), "'text'"),
        (raw_op(1, genesis, seq=1, deps=[genesis.id], ts=ms(1),
                body={"text": "x" * 4001}), "'text'"),
        (raw_op(1, genesis, seq=1, deps=[genesis.id], ts=ms(1),
                body={"text": "hi", "extra": 1}), "unknown field"),
    ]  # fmt: skip
    for op, why in cases:
        before = (replica.state_hash(), replica.record(Notes).all())
        with pytest.raises(RuleViolation, match=why) as info:
            replica.receive(op, T0)
        assert info.value.op_id == op.id
        assert (replica.state_hash(), replica.record(Notes).all()) == before


def test_ops_depending_on_a_rejected_op_are_rejected_too() -> None:
    _, genesis = federation(members=2)
    outsider = raw_op(9, genesis, seq=1, deps=[genesis.id], ts=ms(1))  # not a member
    child = raw_op(1, genesis, seq=1, deps=[outsider.id], ts=ms(2))
    grandchild = raw_op(1, genesis, seq=2, deps=[child.id], ts=ms(3))
    replica = fresh(genesis)
    replica.receive(genesis, T0)
    assert replica.receive(grandchild, T0).status is Status.PENDING
    assert replica.receive(child, T0).status is Status.PENDING
    with pytest.raises(RuleViolation):
        replica.receive(outsider, T0)
    # Rejected ops waiting on the outsider are refused when it is; not left waiting.
    assert replica.graph.pending_count() == 2  # the outsider itself raised: nothing released
    # Through a release: the same story with the bad op arriving last, behind a good dep.
    replica2 = fresh(genesis)
    for op in (grandchild, child, outsider):
        replica2.receive(op, T0)
    result = replica2.receive(genesis, T0)
    assert result.applied == (genesis,)
    assert {r.op_id for r in result.rejected} == {outsider.id, child.id, grandchild.id}
    assert replica2.graph.pending_count() == 0
    with pytest.raises(InvalidOp, match="previously rejected"):
        replica2.receive(child, T0)


def test_duplicates_change_nothing() -> None:
    _, (genesis, a, b) = chain(2)
    replica = fresh()
    for op in (genesis, a, b):
        replica.receive(op, T0)
    before = (replica.state_hash(), replica.heads(), replica.record(Notes).all())
    for op in (b, a, genesis, b):
        assert replica.receive(op, T0).status is Status.DUPLICATE
    assert (replica.state_hash(), replica.heads(), replica.record(Notes).all()) == before
    pending = fresh()
    pending.receive(b, T0)
    assert pending.receive(b, T0).status is Status.DUPLICATE


def test_equivocation_is_detected_and_both_ops_are_kept() -> None:
    _, genesis = federation()
    replica = fresh()
    replica.receive(genesis, T0)
    one = raw_op(1, genesis, seq=1, deps=[genesis.id], ts=ms(1), body={"text": "we meet at 6"})
    two = raw_op(1, genesis, seq=1, deps=[genesis.id], ts=ms(1), body={"text": "we meet at 9"})
    replica.receive(one, T0)
    assert replica.graph.equivocations() == []
    replica.receive(two, T0)
    assert one.id in replica.graph
    assert two.id in replica.graph
    assert replica.graph.equivocators() == {pub(1)}
    (evidence,) = replica.graph.equivocations()
    assert (evidence.author, evidence.seq) == (pub(1), 1)
    # The evidence stands on its own: both signed ops, verifiable by anyone.
    decoded = [decode_op(data) for data in evidence.ops]
    assert {op.id for op in decoded} == {one.id, two.id}
    assert all(op.author == pub(1) and op.seq == 1 for op in decoded)
    # Both forks may be continued; either satisfies the author-chain rule.
    replica.receive(raw_op(1, genesis, seq=2, deps=[two.id], ts=ms(2)), T0)


def test_causal_queries() -> None:
    origin, genesis = federation()
    a = origin.author(key(1), "note", {"text": "a"}, T0 + 1)
    side = Replica(genesis.federation)
    side.receive(genesis, T0)
    b = side.author(key(2), "note", {"text": "b"}, T0 + 2)
    origin.receive(b, T0 + 3)
    c = origin.author(key(1), "note", {"text": "c"}, T0 + 4)
    graph = origin.graph
    assert graph.causal_past(c.id) == {genesis.id, a.id, b.id}
    assert graph.causal_past(genesis.id) == frozenset()
    assert graph.precedes(genesis.id, c.id)
    assert graph.precedes(a.id, c.id)
    assert not graph.precedes(c.id, a.id)
    assert not graph.precedes(a.id, a.id)
    assert graph.concurrent(a.id, b.id)
    assert not graph.concurrent(a.id, c.id)
    order = [op.id for op in graph.topological()]
    assert order[0] == genesis.id
    assert order[-1] == c.id
    for op in graph.topological():
        assert all(order.index(dep) < order.index(op.id) for dep in op.deps)
    assert graph.author_head(pub(1)) == c
    assert graph.author_head(pub(9)) is None


def test_a_far_future_op_does_not_drag_our_clock_along() -> None:
    """An op dated years ahead is held; ops we author meanwhile keep our time,
    so peers do not hold them in turn."""
    _, genesis = federation()
    replica = Replica(genesis.federation)
    replica.receive(genesis, T0)
    year_3000 = raw_op(1, genesis, seq=1, deps=[genesis.id], ts=ts_from_ms(32_503_680_000_000))
    assert replica.receive(year_3000, T0).status is Status.HELD
    # Refused (not a member), dated 50 s ahead: within the skew, so judged now.
    with pytest.raises(RuleViolation):
        replica.receive(raw_op(9, genesis, seq=1, deps=[genesis.id], ts=ms(50_000)), T0)
    mine = replica.author(key(2), "note", {"text": "still today"}, T0 + 5)
    assert mine.ts == ts_from_ms(T0 + 5)


def test_authoring_with_a_clock_far_behind_the_graph_is_refused() -> None:
    replica, _genesis = federation()
    replica.author(key(1), "note", {"text": "from a fast clock"}, T0 + 50_000)
    before = replica.state_hash()
    with pytest.raises(CausalityViolation, match="clock"):
        replica.author(key(2), "note", {"text": "from a slow clock"}, T0 - 20_000)
    assert replica.state_hash() == before
    assert replica.graph.held_count() == 0


def test_authoring_over_many_heads_stays_within_the_deps_limit() -> None:
    """70 concurrent heads; the new op must also name its author's previous op
    and the proposal it votes on: it names exactly max_deps deps, those two
    among them (signing more would be refused as malformed)."""
    origin, genesis = federation(members=3)
    circle = {"name": "all", "members": sorted(pub(i) for i in range(3))}
    body = {"title": "t", "options": ("a", "b"), "ballot": "single", "circles": (circle,)}
    proposal = origin.author(key(0), "proposal.open", body, T0 + 1)
    mine = origin.author(key(2), "note", {"text": "mine"}, T0 + 2)
    for i in range(70):
        side = Replica(genesis.federation)
        for op in (genesis, proposal):
            side.receive(op, T0 + 3)
        origin.receive(side.author(key(1), "note", {"text": f"{i}"}, T0 + 3), T0 + 3)
    assert len(origin.heads()) > 64
    vote = {"proposal": proposal.id, "version": proposal.id, "choices": (0,), "reasoning": "",
            "circle": "all"}  # fmt: skip
    op = origin.author(key(2), "vote.cast", vote, T0 + 4)
    assert len(op.deps) == 64
    assert mine.id in op.deps
    assert proposal.id in op.deps
