"""Councils: form, delegates under council mandates, directives, evaluations,
decisions, minutes, dissolution; every council mandate lapses with its council."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pytest
from helpers import T0, assert_order_independent, cell, cells_federation, device, key, member, pub
from hypothesis import given, settings
from hypothesis import strategies as st

from archipel.crdt import DEFAULT_RECORDS, Op, Record, Replica, RuleViolation
from archipel.crdt.councils import (
    DECISION,
    DIRECTIVE,
    DISSOLVE,
    DISSOLVED,
    ENDED,
    EVALUATION,
    FORM,
    MINUTES,
    OPEN,
    Council,
    Councils,
)
from archipel.crdt.mandates import (
    ACT,
    CONCURRENT_WITH_DISSOLUTION,
    CONCURRENT_WITH_RECALL,
    COUNCIL_CLOSED,
    GRANT,
    LIVE,
    RECALL,
    RECALLED,
    RENEW,
    Mandates,
)

RECORDS: tuple[type[Record], ...] = (*DEFAULT_RECORDS, Mandates, Councils)
NORTH, SOUTH, EAST = 0, 1, 2
MEMBERS = [member(c, n) for c in (NORTH, SOUTH, EAST) for n in (1, 2)]
KEY_NUMBER = {pub(n): n for n in MEMBERS}
ENDS = T0 + 10_000
TASK = "Organise the spring seed swap"
Body = dict[str, Any]


def councils(replica: Replica) -> Councils:
    return replica.record(Councils)


def mandates(replica: Replica) -> Mandates:
    return replica.record(Mandates)


def form(
    replica: Replica, genesis: Op, signer: int, cells: Iterable[int], now: int, ends: int
) -> Op:
    ids = [cell(genesis, c) for c in cells]
    body = councils(replica).form_body(TASK, ids, now, ends - now)
    return replica.author(key(signer), FORM, body, now)


def send(replica: Replica, council: Op, signer: int, delegate: int, now: int) -> Op:
    """A council mandate from ``signer``'s cell to ``delegate`` (default expiry)."""
    body = mandates(replica).grant_body(
        pub(delegate), "Bring our seed list", now, council=council.id
    )
    return replica.author(key(signer), GRANT, body, now)


def do(replica: Replica, kind: str, council: Op, mandate: Op, now: int, text: str = "ok") -> Op:
    """A decision, minutes or dissolution by the mandate's delegate."""
    delegate = mandates(replica).mandate(mandate.id)
    assert delegate is not None
    body: Body = {"council": council.id, "mandate": mandate.id, "text": text}
    return replica.author(key(KEY_NUMBER[delegate.delegate]), kind, body, now)


def say(replica: Replica, kind: str, council: Op, signer: int, now: int, text: str = "hi") -> Op:
    """A directive or evaluation."""
    return replica.author(key(signer), kind, {"council": council.id, "text": text}, now)


def copy_of(genesis: Op, *sources: Replica, now: int = T0) -> Replica:
    replica = Replica(genesis.federation, records=RECORDS)
    replica.receive(genesis, now)
    for source in sources:
        deliver(source.graph.topological(), replica, now)
    return replica


def deliver(ops: Iterable[Op], to: Replica, now: int = T0 + 10**7) -> None:
    for op in ops:
        to.receive(op, now)


def merge(*replicas: Replica) -> None:
    for a in replicas:
        for b in replicas:
            deliver(list(a.graph.topological()), b)


def outcome(replica: Replica, times: Iterable[int]) -> tuple[object, ...]:
    """Every council and council-mandate query, at each of ``times``."""
    record, mrecord = councils(replica), mandates(replica)
    times = list(times)
    ids = [s.council.id for s in record.councils(T0)]
    every = mrecord.all()
    return (
        replica.state_hash(),
        [record.councils(t) for t in times],
        [record.state(c, t) for c in ids for t in times],
        [mrecord.state(m.id, t) for m in every for t in times],
        [mrecord.under(m.id) for m in every],
    )


@dataclass
class Scene:
    """North and South in a council until ENDS, each with a delegate (North's
    second member, South's first)."""

    replica: Replica
    genesis: Op
    council: Op
    north: Op  # North's mandate to member(NORTH, 2)
    south: Op  # South's mandate to member(SOUTH, 1)


def scene() -> Scene:
    replica, genesis = cells_federation(records=RECORDS)
    council = form(replica, genesis, member(NORTH, 1), [NORTH, SOUTH], T0 + 10, ENDS)
    north = send(replica, council, member(NORTH, 1), member(NORTH, 2), T0 + 20)
    south = send(replica, council, member(SOUTH, 2), member(SOUTH, 1), T0 + 30)
    return Scene(replica, genesis, council, north, south)


# -- the basics -------------------------------------------------------------


def test_a_council_forms_hears_its_cells_and_records_its_work() -> None:
    s = scene()
    r = s.replica
    directive = say(r, DIRECTIVE, s.council, member(SOUTH, 2), T0 + 40, "No GMO seeds")
    decision = do(r, DECISION, s.council, s.north, T0 + 50, "Swap on 12 April at the library")
    minutes = do(r, MINUTES, s.council, s.south, T0 + 60, "Both delegates present")
    evaluation = say(r, EVALUATION, s.council, member(NORTH, 1), T0 + 70, "Good work")
    state = councils(r).state(s.council.id, T0 + 100)
    assert state.status == OPEN
    assert state.council.task == TASK
    assert state.council.cells == tuple(sorted([cell(s.genesis, NORTH), cell(s.genesis, SOUTH)]))
    assert (state.council.formed_by, state.council.ends_ms) == (cell(s.genesis, NORTH), ENDS)
    assert [d.mandate.id for d in state.delegates] == [s.north.id, s.south.id]
    assert all(d.expires_ms == ENDS for d in state.delegates)  # default expiry capped at the end
    assert [(e.op, e.cell, e.text, e.counted) for e in state.directives] == [
        (directive.id, cell(s.genesis, SOUTH), "No GMO seeds", True)
    ]
    assert [(e.op, e.mandate, e.counted) for e in state.decisions] == [
        (decision.id, s.north.id, True)
    ]
    assert [e.op for e in state.minutes] == [minutes.id]
    assert [e.op for e in state.evaluations] == [evaluation.id]
    assert state.dissolutions == ()
    (summary,) = councils(r).councils(T0 + 100)
    assert (summary.council.id, summary.status) == (s.council.id, OPEN)
    assert [e.op for e in mandates(r).under(s.north.id)] == [decision.id]


def test_a_council_ends_at_its_end_time_and_its_mandates_lapse_with_it() -> None:
    s = scene()
    r = s.replica
    before = r.state_hash()
    assert councils(r).state(s.council.id, ENDS - 1).status == OPEN
    assert councils(r).state(s.council.id, ENDS).status == ENDED
    assert councils(r).state(s.council.id, ENDS).delegates == ()
    assert mandates(r).state(s.north.id, ENDS).status == COUNCIL_CLOSED
    assert mandates(r).live(ENDS) == []
    assert len(mandates(r).live(ENDS - 1)) == 2
    assert r.state_hash() == before


def test_a_council_act_after_the_end_time_is_refused() -> None:
    s = scene()
    r = s.replica
    do(r, DECISION, s.council, s.north, ENDS - 1)  # just in time
    before = outcome(r, [ENDS])
    for kind in (DECISION, MINUTES, DISSOLVE):
        with pytest.raises(RuleViolation, match="end time has passed"):
            do(r, kind, s.council, s.south, ENDS + 5)
    with pytest.raises(RuleViolation, match="too late for a directive"):
        say(r, DIRECTIVE, s.council, member(SOUTH, 2), ENDS + 6)
    with pytest.raises(RuleViolation, match="cannot send a delegate: .*end time has passed"):
        send(r, s.council, member(NORTH, 1), member(NORTH, 1), ENDS + 7)
    assert outcome(r, [ENDS]) == before
    # Evaluating a council's work after it ended is allowed.
    say(r, EVALUATION, s.council, member(SOUTH, 2), ENDS + 8, "It went well")


def test_an_act_concurrent_with_a_dissolution_does_not_count() -> None:
    s = scene()
    left = copy_of(s.genesis, s.replica)
    right = copy_of(s.genesis, s.replica)
    dissolution = do(left, DISSOLVE, s.council, s.north, T0 + 100, "Task done")
    decision = do(right, DECISION, s.council, s.south, T0 + 110, "Also swap bulbs")
    minutes = do(right, MINUTES, s.council, s.south, T0 + 120, "Notes")
    directive = say(right, DIRECTIVE, s.council, member(SOUTH, 2), T0 + 130)
    assert councils(right).state(s.council.id, T0 + 200).decisions[0].counted  # before the merge
    observer = copy_of(s.genesis, s.replica)
    deliver([directive, minutes, dissolution, decision], observer)
    merge(left, right)
    times = [T0 + 200, ENDS + 1]
    assert outcome(left, times) == outcome(right, times) == outcome(observer, times)
    state = councils(left).state(s.council.id, T0 + 200)
    assert state.status == DISSOLVED
    assert [(e.op, e.counted) for e in state.dissolutions] == [(dissolution.id, True)]
    for entries, op in ((state.decisions, decision), (state.minutes, minutes)):
        assert [(e.op, e.counted, e.why) for e in entries] == [
            (op.id, False, CONCURRENT_WITH_DISSOLUTION)
        ]
    assert [(e.op, e.why) for e in state.directives] == [
        (directive.id, CONCURRENT_WITH_DISSOLUTION)
    ]
    assert state.delegates == ()


def test_mandates_scoped_to_a_dissolved_council_are_no_longer_live() -> None:
    s = scene()
    r = s.replica
    decision = do(r, DECISION, s.council, s.south, T0 + 40)
    do(r, DISSOLVE, s.council, s.north, T0 + 50, "Task done")
    m = mandates(r)
    for mandate in (s.north, s.south):
        assert m.state(mandate.id, T0 + 60).status == COUNCIL_CLOSED
    assert m.live(T0 + 60) == []
    before = outcome(r, [T0 + 60])
    with pytest.raises(RuleViolation, match="the council was dissolved"):
        do(r, MINUTES, s.council, s.south, T0 + 70)
    with pytest.raises(RuleViolation, match="cannot renew: the council was dissolved"):
        r.author(key(member(SOUTH, 2)), RENEW, {"mandate": s.south.id, "expires": ENDS}, T0 + 80)
    with pytest.raises(RuleViolation, match="cannot send a delegate: the council was dissolved"):
        send(r, s.council, member(SOUTH, 2), member(SOUTH, 2), T0 + 90)
    assert outcome(r, [T0 + 60]) == before
    # The archive stays readable.
    state = councils(r).state(s.council.id, T0 + 60)
    assert [(e.op, e.counted) for e in state.decisions] == [(decision.id, True)]


def test_a_dissolution_concurrent_with_its_delegates_recall_still_counts() -> None:
    """Both are removals, and removals always count: the council is dissolved
    and the mandate recalled."""
    s = scene()
    left = copy_of(s.genesis, s.replica)
    right = copy_of(s.genesis, s.replica)
    recall = left.author(key(member(NORTH, 1)), RECALL, {"mandate": s.north.id}, T0 + 100)
    dissolution = do(right, DISSOLVE, s.council, s.north, T0 + 110)
    merge(left, right)
    assert outcome(left, [T0 + 200]) == outcome(right, [T0 + 200])
    assert councils(left).state(s.council.id, T0 + 200).status == DISSOLVED
    assert mandates(left).state(s.north.id, T0 + 200).status == RECALLED
    assert [(e.op, e.counted) for e in mandates(left).under(s.north.id)] == [(dissolution.id, True)]
    assert mandates(left).state(s.north.id, T0 + 200).recalls == (recall.id,)


def test_a_decision_concurrent_with_its_delegates_recall_does_not_count() -> None:
    s = scene()
    left = copy_of(s.genesis, s.replica)
    right = copy_of(s.genesis, s.replica)
    left.author(key(member(SOUTH, 2)), RECALL, {"mandate": s.south.id}, T0 + 100)
    decision = do(right, DECISION, s.council, s.south, T0 + 110)
    merge(left, right)
    (entry,) = councils(left).state(s.council.id, T0 + 200).decisions
    assert (entry.op, entry.counted, entry.why) == (decision.id, False, CONCURRENT_WITH_RECALL)
    assert [d.mandate.id for d in councils(left).state(s.council.id, T0 + 200).delegates] == [
        s.north.id
    ]


def test_council_mandate_rules() -> None:
    s = scene()
    r = s.replica
    m = mandates(r)
    east = m.grant_body(pub(member(EAST, 1)), "x", T0 + 40, council=s.council.id)
    with pytest.raises(RuleViolation, match="only a member cell of the council"):
        r.author(key(member(EAST, 1)), GRANT, east, T0 + 40)
    other_cell = m.grant_body(pub(member(SOUTH, 2)), "x", T0 + 40, council=s.council.id)
    with pytest.raises(RuleViolation, match="member of the cell that sends them"):
        r.author(key(member(NORTH, 1)), GRANT, other_cell, T0 + 40)
    too_long = m.grant_body(pub(member(NORTH, 1)), "x", T0 + 40, council=s.council.id,
                            expires_ms=ENDS + 1)  # fmt: skip
    with pytest.raises(RuleViolation, match="no later than the council's end"):
        r.author(key(member(NORTH, 1)), GRANT, too_long, T0 + 40)
    with pytest.raises(RuleViolation, match="no later than the council's end"):
        r.author(key(member(NORTH, 1)), RENEW, {"mandate": s.north.id, "expires": ENDS + 1},
                 T0 + 40)  # fmt: skip
    with pytest.raises(RuleViolation, match="under a council mandate, act with council"):
        r.author(key(member(NORTH, 2)), ACT,
                 {"mandate": s.north.id, "act": "sign", "text": "x"}, T0 + 40)  # fmt: skip
    assert (
        m.grant_body(pub(member(NORTH, 1)), "x", T0 + 40, council=s.council.id)["expires"] == ENDS
    )


# -- bad input --------------------------------------------------------------

Case = tuple[int, str, Callable[[Scene], Body], str]
NORTH1, NORTH2, SOUTH1, SOUTH2, EAST1 = (
    member(NORTH, 1), member(NORTH, 2), member(SOUTH, 1), member(SOUTH, 2), member(EAST, 1)
)  # fmt: skip
NOW = T0 + 1000
UNKNOWN = bytes(32)


@dataclass
class Bench(Scene):
    """The scene, plus: a general mandate of North's, a note, a second council
    (North and East) with North's delegate, and East's second member revoked."""

    general: Op
    note: Op
    other: Op
    other_north: Op


def bench() -> Bench:
    s = scene()
    r = s.replica
    general_body = mandates(r).grant_body(pub(NORTH2), "x", T0 + 40, acts=("sign",))
    general = r.author(key(NORTH1), GRANT, general_body, T0 + 40)
    note = r.author(key(NORTH1), "note", {"text": "hello"}, T0 + 50)
    other = form(r, s.genesis, NORTH1, [NORTH, EAST], T0 + 60, ENDS)
    other_north = send(r, other, NORTH1, NORTH2, T0 + 70)
    r.author(key(EAST1), "key.revoke", {"key": pub(member(EAST, 2))}, T0 + 80)
    return Bench(r, s.genesis, s.council, s.north, s.south, general, note, other, other_north)


def f(**fields: object) -> Callable[[Scene], Body]:
    """A council.form body for North and South: a valid one with ``fields``
    changed (None removes a field; a callable is given the bench)."""

    def build(b: Scene) -> Body:
        ids = sorted([cell(b.genesis, NORTH), cell(b.genesis, SOUTH)])
        body: Body = {"task": "t", "cells": tuple(ids), "ends": NOW + 1000}
        body.update({k: (v(b) if callable(v) else v) for k, v in fields.items()})
        return {k: v for k, v in body.items() if v is not None}

    return build


def c(
    council: str | None = "council", mandate: str | None = None, **fields: object
) -> Callable[[Scene], Body]:
    """A body naming the bench's op ``council`` ("" for an unknown id, None for
    none), its op ``mandate`` if given, a text, and ``fields`` (None removes)."""

    def build(b: Scene) -> Body:
        body: Body = {"text": "t"}
        if council is not None:
            body["council"] = getattr(b, council).id if council else UNKNOWN
        if mandate is not None:
            body["mandate"] = getattr(b, mandate).id
        body.update(fields)
        return {k: v for k, v in body.items() if v is not None}

    return build


def cells_of(*indexes: int) -> Callable[[Scene], tuple[bytes, ...]]:
    return lambda b: tuple(cell(b.genesis, i) for i in indexes)


FORM_CASES: list[Case] = [
    (NORTH1, FORM, f(task=None), "'task'"),
    (NORTH1, FORM, f(task=""), "'task'"),
    (NORTH1, FORM, f(task=3), "'task'"),
    (NORTH1, FORM, f(cells=None), "'cells'"),
    (NORTH1, FORM, f(cells="north"), "'cells'"),
    (NORTH1, FORM, f(cells=lambda b: (cell(b.genesis, NORTH),)), "2 to 64"),
    (NORTH1, FORM, f(cells=lambda b: tuple(sorted(cells_of(NORTH, SOUTH)(b)))[::-1]), "sorted"),
    (NORTH1, FORM, f(cells=cells_of(NORTH, NORTH)), "sorted without repeats"),
    (NORTH1, FORM, f(cells=lambda b: (*cells_of(NORTH)(b), b"x")), "32-byte"),
    (NORTH1, FORM, f(cells=lambda b: tuple(sorted((*cells_of(NORTH)(b), UNKNOWN)))),
     "not a live cell"),
    (NORTH1, FORM, f(cells=lambda b: tuple(sorted(cells_of(SOUTH, EAST)(b)))), "forming member"),
    (NORTH1, FORM, f(ends=None), "'ends'"),
    (NORTH1, FORM, f(ends="later"), "'ends'"),
    (NORTH1, FORM, f(ends=NOW), "must be after the op's time"),
    (NORTH1, FORM, f(ends=NOW + 365 * 86_400_000 + 1), "council_max_ms"),
    (NORTH1, FORM, f(extra=1), "unknown field"),
    (device(NORTH), FORM, f(), "act of a member"),
]  # fmt: skip
ADDRESS_CASES: list[Case] = [
    *[
        case
        for kind in (DIRECTIVE, EVALUATION)
        for case in [
            (SOUTH2, kind, c(council=None), "'council'"),
            (SOUTH2, kind, c(council=""), "among the deps"),
            (SOUTH2, kind, c(council="note"), "must name a council.form"),
            (SOUTH2, kind, c(council="north"), "must name a council.form"),
            (SOUTH2, kind, c(text=None), "'text'"),
            (SOUTH2, kind, c(text=""), "'text'"),
            (SOUTH2, kind, c(text=5), "'text'"),
            (SOUTH2, kind, c(mandate="south"), "unknown field"),
            (EAST1, kind, c(), f"only members of the council's cells may send a {kind}"),
            (device(SOUTH), kind, c(), "act of a member"),
        ]
    ]
]
ACT_CASES: list[Case] = [
    *[
        case
        for kind in (DECISION, MINUTES, DISSOLVE)
        for case in [
            (SOUTH1, kind, c(), "'mandate'"),
            (SOUTH1, kind, c(mandate="note"), "must name a mandate.grant"),
            (SOUTH1, kind, c(council="note", mandate="south"), "must name a council.form"),
            (NORTH2, kind, c(mandate="general"), "not scoped to this council"),
            (NORTH2, kind, c(mandate="other_north"), "not scoped to this council"),
            (NORTH2, kind, c(council="other", mandate="north"), "not scoped to this council"),
            (NORTH1, kind, c(mandate="north"), "only the mandate's delegate"),
            (SOUTH1, kind, c(mandate="south", text=None), "'text'"),
            (SOUTH1, kind, c(mandate="south", text=""), "'text'"),
            (SOUTH1, kind, c(mandate="south", reason="x"), "unknown field"),
        ]
    ]
]


@pytest.mark.parametrize(("signer", "kind", "body", "why"), FORM_CASES + ADDRESS_CASES + ACT_CASES)
def test_bad_input_is_refused_and_changes_nothing(
    signer: int, kind: str, body: Callable[[Scene], Body], why: str
) -> None:
    b = bench()
    times = [NOW, ENDS]
    before = outcome(b.replica, times)
    with pytest.raises(RuleViolation, match=why):
        b.replica.author(key(signer), kind, body(b), NOW)
    assert outcome(b.replica, times) == before


def test_the_bench_itself_is_valid() -> None:
    """Guard: the valid variants of the bad-input bodies do pass."""
    b = bench()
    r = b.replica
    r.author(key(NORTH1), FORM, f()(b), NOW)
    r.author(key(SOUTH2), DIRECTIVE, c()(b), NOW + 1)
    r.author(key(SOUTH2), EVALUATION, c()(b), NOW + 2)
    r.author(key(SOUTH1), DECISION, c(mandate="south")(b), NOW + 3)
    r.author(key(SOUTH1), MINUTES, c(mandate="south")(b), NOW + 4)
    r.author(key(SOUTH1), DISSOLVE, c(mandate="south")(b), NOW + 5)
    assert councils(r).state(b.council.id, NOW + 6).status == DISSOLVED
    assert len(councils(r).councils(NOW + 6)) == 3


def test_a_recalled_or_lapsed_council_mandate_cannot_be_used() -> None:
    s = scene()
    r = s.replica
    r.author(key(member(NORTH, 1)), RECALL, {"mandate": s.north.id}, T0 + 40)
    short = mandates(r).grant_body(pub(member(SOUTH, 2)), "x", T0 + 50, council=s.council.id,
                                   expires_ms=T0 + 100)  # fmt: skip
    lapsing = r.author(key(member(SOUTH, 1)), GRANT, short, T0 + 50)
    before = outcome(r, [T0 + 200])
    with pytest.raises(RuleViolation, match="recalled"):
        do(r, DECISION, s.council, s.north, T0 + 150)
    with pytest.raises(RuleViolation, match="lapsed at its expiry"):
        do(r, MINUTES, s.council, lapsing, T0 + 160)
    assert outcome(r, [T0 + 200]) == before


# -- convergence ------------------------------------------------------------


@dataclass(frozen=True)
class History:
    genesis: Op
    ops: list[Op]


ACTIONS = ["form", "send", "send", "send", "direct", "evaluate", "decide", "decide", "minutes",
           "dissolve", "recall", "sync", "sync", "race", "race"]  # fmt: skip
CELL_OF = {m: c for c in (NORTH, SOUTH, EAST) for m in (member(c, 1), member(c, 2))}


def attempt_form(draw: st.DrawFn, genesis: Op, replica: Replica, now: int) -> Op | None:
    """Form a council of two or three cells, by a member of one of them."""
    own, other = draw(st.permutations([NORTH, SOUTH, EAST]))[:2]
    ids = [cell(genesis, c) for c in draw(st.sampled_from([{own, other}, {NORTH, SOUTH, EAST}]))]
    body = councils(replica).form_body("t", ids, now, draw(st.integers(300, 800)))
    return try_author(replica, member(own, draw(st.sampled_from([1, 2]))), FORM, body, now)


def attempt(draw: st.DrawFn, genesis: Op, replica: Replica, action: str, now: int) -> Op | None:
    """Author one op of ``action`` on ``replica``; None if there is nothing to
    act on or the drawn op is refused."""
    if action == "form":
        return attempt_form(draw, genesis, replica, now)
    known = councils(replica).councils(T0)
    if not known:
        return None
    council = draw(st.sampled_from(known)).council
    # Mostly members of the council's cells, sometimes anyone.
    index = {cell(genesis, i): i for i in (NORTH, SOUTH, EAST)}
    signer = draw(
        st.sampled_from([member(index[c], n) for c in council.cells for n in (1, 2)])
        | st.sampled_from(MEMBERS)
    )
    if action in ("direct", "evaluate"):
        kind = DIRECTIVE if action == "direct" else EVALUATION
        return try_author(replica, signer, kind, {"council": council.id, "text": "t"}, now)
    if action == "send":
        delegate = member(CELL_OF[signer], draw(st.sampled_from([1, 2])))
        expires = draw(st.none() | st.integers(50, 600).map(lambda ms: now + ms))
        body = mandates(replica).grant_body(
            pub(delegate), "go", now, council=council.id, expires_ms=expires
        )
        return try_author(replica, signer, GRANT, body, now)
    return attempt_under_mandate(draw, genesis, replica, council, action, now)


def attempt_under_mandate(
    draw: st.DrawFn, genesis: Op, replica: Replica, council: Council, action: str, now: int
) -> Op | None:
    """A recall of a council mandate, or a delegate's decision, minutes or dissolution."""
    scoped = mandates(replica).scoped_to(council.id)
    if not scoped:
        return None
    m = draw(st.sampled_from(scoped))
    if action == "recall":
        issuer = next(i for i in (NORTH, SOUTH, EAST) if cell(genesis, i) == m.issuer)
        signer = member(issuer, draw(st.sampled_from([1, 2])))
        return try_author(replica, signer, RECALL, {"mandate": m.id}, now)
    kind = {"decide": DECISION, "minutes": MINUTES, "dissolve": DISSOLVE}[action]
    body: Body = {"council": council.id, "mandate": m.id, "text": f"{action} {now}"}
    return try_author(replica, KEY_NUMBER[m.delegate], kind, body, now)


def try_author(replica: Replica, signer: int, kind: str, body: Body, now: int) -> Op | None:
    try:
        return replica.author(key(signer), kind, body, now)
    except RuleViolation:
        return None


@st.composite
def histories(draw: st.DrawFn) -> History:
    """Members on 2-3 replicas form councils, send delegates, address and act in
    councils, recall and dissolve, sometimes syncing; a race syncs one replica
    from another and then acts on both."""
    _, genesis = cells_federation(
        records=RECORDS, mandate_default_ms=300, mandate_max_ms=600, council_max_ms=800
    )
    first = copy_of(genesis)
    ops = [genesis, *filter(None, [attempt_form(draw, genesis, first, T0 + 1)])]
    (council,) = councils(first).councils(T0)
    index = {cell(genesis, i): i for i in (NORTH, SOUTH, EAST)}
    for n, c in enumerate(council.council.cells):  # every member cell sends a delegate
        body = mandates(first).grant_body(
            pub(member(index[c], 2)), "go", T0 + 2 + n, council=council.council.id
        )
        ops.append(first.author(key(member(index[c], 1)), GRANT, body, T0 + 2 + n))
    replicas = [first, *(copy_of(genesis, first) for _ in range(draw(st.integers(1, 2))))]
    now = T0 + 5
    for _ in range(draw(st.integers(1, 16))):
        now += draw(st.integers(1, 100))
        replica = draw(st.sampled_from(replicas))
        action = draw(st.sampled_from(ACTIONS))
        if action == "sync":
            deliver(list(draw(st.sampled_from(replicas)).graph.topological()), replica, now)
            continue
        if action == "race":
            a, b = draw(st.permutations(replicas))[:2]
            deliver(list(a.graph.topological()), b, now)
            sides = [(a, draw(st.sampled_from(["dissolve", "recall"]))),
                     (b, draw(st.sampled_from(["decide", "minutes", "direct"])))]  # fmt: skip
        else:
            sides = [(replica, action)]
        for side, chosen in sides:
            if (op := attempt(draw, genesis, side, chosen, now)) is not None:
                ops.append(op)
    return History(genesis, ops)


TIMES = [T0 + 150 * k for k in range(0, 16, 3)]


@given(data=st.data(), history=histories())
def test_any_order_with_duplicates_gives_one_result(data: st.DataObject, history: History) -> None:
    assert_order_independent(data, history.genesis, history.ops, lambda r: outcome(r, TIMES))


def test_histories_produce_concurrency_and_discounted_council_acts() -> None:
    """Guard: the generator does build the cases the property is about."""
    seen: set[str] = set()

    # A fixed sample (derandomized): a guard that passes only by luck would be flaky.
    @settings(derandomize=True, max_examples=200)
    @given(history=histories())
    def look(history: History) -> None:
        replica = copy_of(history.genesis)
        deliver(history.ops, replica)
        if len(replica.heads()) > 1:
            seen.add("concurrent")
        for summary in councils(replica).councils(T0):
            state = councils(replica).state(summary.council.id, T0 + 300)
            seen.add(state.status)
            for entry in (*state.decisions, *state.minutes, *state.directives):
                seen.add(str(entry.why))
            if state.delegates:
                seen.add(LIVE)

    look()
    assert {"concurrent", CONCURRENT_WITH_DISSOLUTION, "None", DISSOLVED, OPEN, LIVE} <= seen
