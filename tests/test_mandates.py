"""Mandates: grant, renew, recall, act; lapse at expiry; recall wins."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pytest
from helpers import T0, assert_order_independent, cell, cells_federation, device, key, member, pub
from hypothesis import given, settings
from hypothesis import strategies as st

from archipel.crdt import DEFAULT_RECORDS, Notes, Op, Record, Replica, RuleViolation
from archipel.crdt.genesis import LUNAR_CYCLE_MS
from archipel.crdt.mandates import (
    ACT,
    AFTER_EXPIRY,
    CONCURRENT_WITH_RECALL,
    GRANT,
    LAPSED,
    LIVE,
    RECALL,
    RECALLED,
    RENEW,
    REVOKED_KEY,
    VOID,
    Mandate,
    Mandates,
)

RECORDS: tuple[type[Record], ...] = (*DEFAULT_RECORDS, Mandates)
NORTH, SOUTH, EAST = 0, 1, 2
MEMBERS = [member(c, n) for c in (NORTH, SOUTH, EAST) for n in (1, 2)]
KEY_NUMBER = {pub(n): n for n in MEMBERS}
Body = dict[str, Any]


def world(**params: int) -> tuple[Replica, Op]:
    return cells_federation(records=RECORDS, **params)


def mandates(replica: Replica) -> Mandates:
    return replica.record(Mandates)


def grant(
    replica: Replica,
    signer: int,
    delegate: int,
    now: int,
    *,
    expires: int | None = None,
    acts: tuple[str, ...] = ("negotiate", "sign"),
) -> Op:
    body = mandates(replica).grant_body(
        pub(delegate), "Negotiate the bakery lease; sign only below 900", now,
        acts=acts, expires_ms=expires,
    )  # fmt: skip
    return replica.author(key(signer), GRANT, body, now)


def act(replica: Replica, delegate: int, mandate: Op, now: int, text: str = "signed") -> Op:
    body: Body = {"mandate": mandate.id, "act": "sign", "text": text}
    return replica.author(key(delegate), ACT, body, now)


def copy_of(genesis: Op, *sources: Replica, now: int = T0) -> Replica:
    """A new replica holding every op of ``sources``."""
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
    """Every mandate query, at each of ``times``."""
    record = mandates(replica)
    everything = record.all()
    times = list(times)
    return (
        replica.state_hash(),
        everything,
        [record.state(m.id, t) for m in everything for t in times],
        [record.under(m.id) for m in everything],
        [record.history(pub(n)) for n in MEMBERS],
        [record.live(t) for t in times],
    )


# -- the basics -------------------------------------------------------------


def test_a_cell_grants_and_its_delegate_acts() -> None:
    replica, genesis = world()
    m = grant(replica, member(NORTH, 1), member(SOUTH, 1), T0 + 10, expires=T0 + 1000)
    done = act(replica, member(SOUTH, 1), m, T0 + 20)
    record = mandates(replica)
    mandate = record.mandate(m.id)
    assert mandate is not None
    assert (mandate.issuer, mandate.delegate, mandate.delegate_cell) == (
        cell(genesis, NORTH),
        pub(member(SOUTH, 1)),
        cell(genesis, SOUTH),
    )
    assert mandate.acts == ("negotiate", "sign")
    state = record.state(m.id, T0 + 30)
    assert (state.status, state.expires_ms) == (LIVE, T0 + 1000)
    assert [s.mandate.id for s in record.live(T0 + 30)] == [m.id]
    (entry,) = record.under(m.id)
    assert (entry.op, entry.kind, entry.counted, entry.why, entry.text) == (
        done.id,
        ACT,
        True,
        None,
        "signed",
    )
    assert [e.kind for e in record.history(pub(member(SOUTH, 1)))] == [GRANT, ACT]
    assert record.history(pub(member(NORTH, 1))) == []


def test_default_expiry_is_one_lunar_cycle() -> None:
    replica, _ = world()
    body = mandates(replica).grant_body(pub(member(NORTH, 2)), "Speak for us", T0, acts=("speak",))
    assert body["expires"] == T0 + LUNAR_CYCLE_MS == T0 + 29 * 86_400_000 + 43_200_000
    m = replica.author(key(member(NORTH, 1)), GRANT, body, T0)
    assert mandates(replica).renew_body(m.id, T0 + 5) == {
        "mandate": m.id, "expires": T0 + 5 + LUNAR_CYCLE_MS
    }  # fmt: skip


def test_a_mandate_lapses_at_its_expiry_with_no_op() -> None:
    replica, _ = world()
    m = grant(replica, member(NORTH, 1), member(NORTH, 2), T0 + 10, expires=T0 + 1000)
    record = mandates(replica)
    before = replica.state_hash()
    assert record.state(m.id, T0 + 999).status == LIVE
    assert record.state(m.id, T0 + 1000).status == LAPSED
    assert record.state(m.id, T0 + 5000).status == LAPSED
    assert [s.mandate.id for s in record.live(T0 + 999)] == [m.id]
    assert record.live(T0 + 1000) == []
    assert replica.state_hash() == before  # nothing was written


def test_an_act_at_or_after_expiry_is_refused() -> None:
    replica, _ = world()
    delegate = member(NORTH, 2)
    m = grant(replica, member(NORTH, 1), delegate, T0 + 10, expires=T0 + 1000)
    act(replica, delegate, m, T0 + 999)
    before = outcome(replica, [T0 + 999, T0 + 1000])
    with pytest.raises(RuleViolation, match="lapsed at its expiry"):
        act(replica, delegate, m, T0 + 1000)
    assert outcome(replica, [T0 + 999, T0 + 1000]) == before
    # A renewal in the act's causal past moves the expiry.
    replica2, _ = world()
    m = grant(replica2, member(NORTH, 1), delegate, T0 + 10, expires=T0 + 1000)
    renewal = replica2.author(
        key(member(NORTH, 2)), RENEW, {"mandate": m.id, "expires": T0 + 3000}, T0 + 500
    )
    late = act(replica2, delegate, m, T0 + 2000)
    record = mandates(replica2)
    assert record.state(m.id, T0 + 2000).renewals == (renewal.id,)
    assert record.state(m.id, T0 + 2000).expires_ms == T0 + 3000
    assert [(e.op, e.counted) for e in record.under(m.id)] == [(late.id, True)]
    with pytest.raises(RuleViolation, match="lapsed"):
        act(replica2, delegate, m, T0 + 3000)


def test_an_act_after_a_recall_in_its_causal_past_is_refused() -> None:
    replica, _ = world()
    delegate = member(NORTH, 2)
    m = grant(replica, member(NORTH, 1), delegate, T0 + 10, expires=T0 + 10_000)
    replica.author(key(member(NORTH, 1)), RECALL, {"mandate": m.id, "reason": "lease signed"},
                   T0 + 20)  # fmt: skip
    before = outcome(replica, [T0 + 30])
    with pytest.raises(RuleViolation, match="the mandate was recalled"):
        act(replica, delegate, m, T0 + 30)
    assert outcome(replica, [T0 + 30]) == before
    assert mandates(replica).state(m.id, T0 + 30).status == RECALLED


# -- concurrency: recall wins -----------------------------------------------


def test_recall_concurrent_with_an_act_wins_on_every_replica() -> None:
    origin, genesis = world()
    delegate = member(SOUTH, 1)
    m = grant(origin, member(NORTH, 1), delegate, T0 + 10, expires=T0 + 10_000)
    cell_side = copy_of(genesis, origin)
    delegate_side = copy_of(genesis, origin)
    # Partition: the cell recalls while the delegate, not knowing, acts.
    recall = cell_side.author(key(member(NORTH, 2)), RECALL, {"mandate": m.id}, T0 + 20)
    done = act(delegate_side, delegate, m, T0 + 25, "signed the lease at 950")
    (before_merge,) = mandates(delegate_side).under(m.id)
    assert before_merge.counted  # on its own side, the act counts
    observer = copy_of(genesis)
    deliver([done, recall, m], observer)  # another arrival order
    merge(cell_side, delegate_side)
    results = [outcome(r, [T0 + 30, T0 + 20_000]) for r in (cell_side, delegate_side, observer)]
    assert results[0] == results[1] == results[2]
    for replica in (cell_side, delegate_side, observer):
        record = mandates(replica)
        (entry,) = record.under(m.id)
        assert (entry.op, entry.counted, entry.why) == (done.id, False, CONCURRENT_WITH_RECALL)
        assert record.state(m.id, T0 + 30).status == RECALLED
        assert record.state(m.id, T0 + 30).recalls == (recall.id,)
        assert record.live(T0 + 30) == []
    # Once the recall is known, the delegate can no longer act.
    with pytest.raises(RuleViolation, match="recalled"):
        act(delegate_side, delegate, m, T0 + 40)


def test_recall_concurrent_with_a_renewal_wins_and_the_renewal_extends_nothing() -> None:
    origin, genesis = world()
    delegate = member(NORTH, 2)
    m = grant(origin, member(NORTH, 1), delegate, T0 + 10, expires=T0 + 1000)
    recaller = copy_of(genesis, origin)
    renewer = copy_of(genesis, origin)
    recall = recaller.author(key(member(NORTH, 1)), RECALL, {"mandate": m.id}, T0 + 20)
    renewal = renewer.author(
        key(member(NORTH, 2)), RENEW, {"mandate": m.id, "expires": T0 + 5000}, T0 + 30
    )
    late = act(renewer, delegate, m, T0 + 2000)  # valid on its side: the renewal is in its past
    assert mandates(renewer).state(m.id, T0 + 2000).status == LIVE
    merge(recaller, renewer)
    assert outcome(recaller, [T0 + 500, T0 + 2000]) == outcome(renewer, [T0 + 500, T0 + 2000])
    record = mandates(recaller)
    state = record.state(m.id, T0 + 500)
    assert (state.status, state.expires_ms, state.renewals) == (RECALLED, T0 + 1000, ())
    history = {e.op: (e.kind, e.counted, e.why) for e in record.history(pub(delegate))}
    assert history == {
        m.id: (GRANT, True, None),
        recall.id: (RECALL, True, None),
        renewal.id: (RENEW, False, CONCURRENT_WITH_RECALL),
        late.id: (ACT, False, CONCURRENT_WITH_RECALL),
    }


def test_an_act_by_a_key_revoked_concurrently_does_not_count() -> None:
    origin, genesis = world()
    delegate = member(NORTH, 2)
    m = grant(origin, member(NORTH, 1), delegate, T0 + 10, expires=T0 + 10_000)
    a = copy_of(genesis, origin)
    b = copy_of(genesis, origin)
    a.author(key(member(NORTH, 1)), "key.revoke", {"key": pub(delegate)}, T0 + 20)
    done = act(b, delegate, m, T0 + 25)
    merge(a, b)
    for replica in (a, b):
        record = mandates(replica)
        assert [(e.op, e.why) for e in record.under(m.id)] == [(done.id, REVOKED_KEY)]
        assert record.state(m.id, T0 + 30).status == VOID
    assert outcome(a, [T0 + 30]) == outcome(b, [T0 + 30])


def test_an_act_after_the_effective_expiry_does_not_count() -> None:
    """A renewal whose signer's key was revoked concurrently does not count, so
    an act that relied on it falls after the effective expiry."""
    origin, genesis = world()
    delegate = member(SOUTH, 1)
    m = grant(origin, member(NORTH, 1), delegate, T0 + 10, expires=T0 + 1000)
    a = copy_of(genesis, origin)
    b = copy_of(genesis, origin)
    a.author(key(member(NORTH, 1)), "key.revoke", {"key": pub(member(NORTH, 2))}, T0 + 20)
    b.author(key(member(NORTH, 2)), RENEW, {"mandate": m.id, "expires": T0 + 5000}, T0 + 30)
    late = act(b, delegate, m, T0 + 2000)
    merge(a, b)
    record = mandates(a)
    assert record.state(m.id, T0 + 2000).expires_ms == T0 + 1000
    assert [(e.op, e.why) for e in record.under(m.id)] == [(late.id, AFTER_EXPIRY)]
    assert outcome(a, [T0 + 2000]) == outcome(b, [T0 + 2000])


# -- bad input --------------------------------------------------------------


@dataclass
class Bench:
    """A federation with a live, a lapsed and a recalled mandate of North's, a
    note, and South's second member revoked."""

    replica: Replica
    live: Op
    lapsed: Op
    recalled: Op
    note: Op


NOW = T0 + 2000


def bench() -> Bench:
    replica, _ = world()
    north1, north2 = member(NORTH, 1), member(NORTH, 2)
    lapsed = grant(replica, north1, north2, T0 + 10, expires=T0 + 100)
    recalled = grant(replica, north1, north2, T0 + 20, expires=T0 + 100_000)
    replica.author(key(north1), RECALL, {"mandate": recalled.id}, T0 + 30)
    live = grant(replica, north1, north2, T0 + 40, expires=T0 + 100_000)
    note = replica.author(key(north1), "note", {"text": "hello"}, T0 + 50)
    replica.author(key(member(SOUTH, 1)), "key.revoke", {"key": pub(member(SOUTH, 2))}, T0 + 60)
    return Bench(replica, live, lapsed, recalled, note)


Case = tuple[int, str, Callable[[Bench], Body], str]
NORTH1, NORTH2, SOUTH1 = member(NORTH, 1), member(NORTH, 2), member(SOUTH, 1)
UNKNOWN = bytes(32)
MAX = 3 * LUNAR_CYCLE_MS


def g(**fields: object) -> Callable[[Bench], Body]:
    """A grant body: a valid one with ``fields`` changed (None removes a field)."""

    def build(b: Bench) -> Body:
        body: Body = {
            "delegate": pub(NORTH2), "instructions": "Speak", "acts": ("speak",),
            "expires": NOW + 1000,
        }  # fmt: skip
        body.update({k: (v(b) if callable(v) else v) for k, v in fields.items()})
        return {k: v for k, v in body.items() if v is not None}

    return build


def on(target: str | bytes, **fields: object) -> Callable[[Bench], Body]:
    """A body naming op ``target`` of the bench (or raw id bytes), plus ``fields``."""

    def build(b: Bench) -> Body:
        ref = getattr(b, target).id if isinstance(target, str) else target
        body: Body = {"mandate": ref}
        body.update(fields)
        return {k: v for k, v in body.items() if v is not None}

    return build


def raw(body: Body) -> Callable[[Bench], Body]:
    return lambda _: body


GRANT_CASES: list[Case] = [
    (NORTH1, GRANT, g(delegate=None), "'delegate'"),
    (NORTH1, GRANT, g(delegate="north two"), "'delegate'"),
    (NORTH1, GRANT, g(delegate=pub(99)), "granted in the grant's causal past"),
    (NORTH1, GRANT, g(delegate=pub(device(SOUTH))), "not a device"),
    (NORTH1, GRANT, g(delegate=pub(member(SOUTH, 2))), "delegate's key was revoked"),
    (NORTH1, GRANT, g(instructions=None), "'instructions'"),
    (NORTH1, GRANT, g(instructions=""), "'instructions'"),
    (NORTH1, GRANT, g(instructions="x" * 4001), "'instructions'"),
    (NORTH1, GRANT, g(instructions=7), "'instructions'"),
    (NORTH1, GRANT, g(expires=None), "'expires'"),
    (NORTH1, GRANT, g(expires="soon"), "'expires'"),
    (NORTH1, GRANT, g(expires=True), "'expires'"),
    (NORTH1, GRANT, g(expires=-5), "'expires'"),
    (NORTH1, GRANT, g(expires=NOW), "must be after the op's time"),
    (NORTH1, GRANT, g(expires=NOW - 500), "must be after the op's time"),
    (NORTH1, GRANT, g(expires=NOW + MAX + 1), "at most .*mandate_max_ms"),
    (NORTH1, GRANT, g(acts=None), "exactly one"),
    (NORTH1, GRANT, g(council=lambda b: b.note.id), "exactly one"),
    (NORTH1, GRANT, g(acts=None, council=lambda b: b.note.id), "must name a council.form"),
    (NORTH1, GRANT, g(acts=None, council=UNKNOWN), "among the deps"),
    (NORTH1, GRANT, g(acts=None, council="c"), "among the deps"),
    (NORTH1, GRANT, g(acts=()), "'acts'"),
    (NORTH1, GRANT, g(acts="speak"), "'acts'"),
    (NORTH1, GRANT, g(acts=("Speak",)), "'acts'"),
    (NORTH1, GRANT, g(acts=("speak", 3)), "'acts'"),
    (NORTH1, GRANT, g(acts=("speak", "speak")), "repeat"),
    (NORTH1, GRANT, g(acts=tuple(f"a{i}" for i in range(17))), "'acts'"),
    (NORTH1, GRANT, g(scope=""), "'scope'"),
    (NORTH1, GRANT, g(scope=5), "'scope'"),
    (NORTH1, GRANT, g(extra=1), "unknown field"),
    (device(NORTH), GRANT, g(), "act of a member"),
]
RENEW_CASES: list[Case] = [
    (NORTH1, RENEW, raw({"expires": NOW + 1000}), "'mandate'"),
    (NORTH1, RENEW, on(UNKNOWN, expires=NOW + 1000), "among the deps"),
    (NORTH1, RENEW, raw({"mandate": "m", "expires": NOW + 1000}), "among the deps"),
    (NORTH1, RENEW, on("note", expires=NOW + 1000), "must name a mandate.grant"),
    (NORTH1, RENEW, on("live"), "'expires'"),
    (NORTH1, RENEW, on("live", expires="later"), "'expires'"),
    (NORTH1, RENEW, on("live", expires=T0 + 100_000), "must extend the expiry"),
    (NORTH1, RENEW, on("live", expires=NOW + MAX + 1), "at most"),
    (SOUTH1, RENEW, on("live", expires=NOW + 1000 + 100_000), "issuing cell"),
    (NORTH1, RENEW, on("lapsed", expires=NOW + 1000), "cannot renew: .*lapsed"),
    (NORTH1, RENEW, on("recalled", expires=NOW + 1000), "cannot renew: .*recalled"),
    (NORTH1, RENEW, on("live", expires=T0 + 200_000, why="x"), "unknown field"),
    (device(NORTH), RENEW, on("live", expires=T0 + 200_000), "act of a member"),
]
RECALL_CASES: list[Case] = [
    (NORTH1, RECALL, raw({}), "'mandate'"),
    (NORTH1, RECALL, on(UNKNOWN), "among the deps"),
    (NORTH1, RECALL, on("note"), "must name a mandate.grant"),
    (SOUTH1, RECALL, on("live"), "issuing cell"),
    (NORTH1, RECALL, on("recalled"), "already recalled"),
    (NORTH1, RECALL, on("live", reason=""), "'reason'"),
    (NORTH1, RECALL, on("live", reason=3), "'reason'"),
    (NORTH1, RECALL, on("live", extra=1), "unknown field"),
    (device(NORTH), RECALL, on("live"), "act of a member"),
]
ACT_CASES: list[Case] = [
    (NORTH2, ACT, raw({"act": "speak", "text": "t"}), "'mandate'"),
    (NORTH2, ACT, on(UNKNOWN, act="speak", text="t"), "among the deps"),
    (NORTH2, ACT, on("note", act="speak", text="t"), "must name a mandate.grant"),
    (NORTH1, ACT, on("live", act="sign", text="t"), "only the mandate's delegate"),
    (NORTH2, ACT, on("live", act="vote", text="t"), "outside the mandate's scope"),
    (NORTH2, ACT, on("live", text="t"), "'act'"),
    (NORTH2, ACT, on("live", act=1, text="t"), "'act'"),
    (NORTH2, ACT, on("live", act="sign"), "'text'"),
    (NORTH2, ACT, on("live", act="sign", text=""), "'text'"),
    (NORTH2, ACT, on("live", act="sign", text="t", extra=1), "unknown field"),
    (NORTH2, ACT, on("lapsed", act="sign", text="t"), "lapsed at its expiry"),
    (NORTH2, ACT, on("recalled", act="sign", text="t"), "recalled"),
]


@pytest.mark.parametrize(
    ("signer", "kind", "body", "why"), GRANT_CASES + RENEW_CASES + RECALL_CASES + ACT_CASES
)
def test_bad_input_is_refused_and_changes_nothing(
    signer: int, kind: str, body: Callable[[Bench], Body], why: str
) -> None:
    b = bench()
    times = [NOW, T0 + 200_000]
    before = (outcome(b.replica, times), b.replica.record(Notes).all())
    with pytest.raises(RuleViolation, match=why):
        b.replica.author(key(signer), kind, body(b), NOW)
    assert (outcome(b.replica, times), b.replica.record(Notes).all()) == before


def test_the_bench_itself_is_valid() -> None:
    """Guard: the valid variants of the bad-input bodies do pass."""
    b = bench()
    b.replica.author(key(NORTH1), GRANT, g()(b), NOW)
    b.replica.author(key(NORTH2), ACT, on("live", act="sign", text="t")(b), NOW + 1)
    b.replica.author(key(NORTH1), RENEW, on("live", expires=T0 + 200_000)(b), NOW + 2)
    b.replica.author(key(NORTH1), RECALL, on("live", reason="done")(b), NOW + 3)
    assert mandates(b.replica).state(b.live.id, NOW + 4).status == RECALLED


# -- convergence ------------------------------------------------------------


@dataclass(frozen=True)
class History:
    genesis: Op
    ops: list[Op]


ACTIONS = ["grant", "grant", "act", "act", "act", "renew", "recall", "recall", "revoke"]
ACTIONS += ["sync"] * 3 + ["race"] * 2


def attempt(
    draw: st.DrawFn, genesis: Op, replica: Replica, action: str, now: int, on: Mandate | None = None
) -> Op | None:
    """Author one op of ``action`` on ``replica`` (about mandate ``on``, or a drawn
    one); None if the drawn op is refused."""
    record = mandates(replica)
    known = record.all()
    if action == "grant" or (action != "revoke" and not known):
        signer, delegate = draw(st.sampled_from(MEMBERS)), draw(st.sampled_from(MEMBERS))
        expires = now + draw(st.integers(100, 600))
        body = record.grant_body(pub(delegate), "go", now, acts=("sign",), expires_ms=expires)
        kind = GRANT
    elif action == "revoke":
        c, n = draw(st.sampled_from([NORTH, SOUTH, EAST])), draw(st.sampled_from([1, 2]))
        signer, kind, body = member(c, n), "key.revoke", {"key": pub(member(c, 3 - n))}
    else:
        m = record.mandate(on.id) if on is not None else None
        m = m if m is not None else draw(st.sampled_from(known))
        issuer = next(i for i in (NORTH, SOUTH, EAST) if cell(genesis, i) == m.issuer)
        signer = member(issuer, draw(st.sampled_from([1, 2])))
        if action == "act":
            signer, kind = KEY_NUMBER[m.delegate], ACT
            body = {"mandate": m.id, "act": "sign", "text": f"at {now}"}
        elif action == "renew":
            kind, body = RENEW, {"mandate": m.id, "expires": now + draw(st.integers(300, 600))}
        else:
            kind, body = RECALL, {"mandate": m.id}
    try:
        return replica.author(key(signer), kind, body, now)
    except RuleViolation:
        return None


def race(draw: st.DrawFn, genesis: Op, replicas: list[Replica], now: int) -> list[Op]:
    a, b = draw(st.permutations(replicas))[:2]
    deliver(list(a.graph.topological()), b, now)
    known = mandates(a).all()
    if not known:
        return []
    m = draw(st.sampled_from(known))
    remover = draw(st.sampled_from(["recall", "renew"]))
    ops = [attempt(draw, genesis, a, remover, now, m), attempt(draw, genesis, b, "act", now, m)]
    return [op for op in ops if op is not None]


@st.composite
def histories(draw: st.DrawFn) -> History:
    """Members on 2-3 replicas grant, act, renew, recall and revoke keys, and
    sometimes sync, so ops are concurrent or causally ordered. A race syncs one
    replica from another, then recalls or renews there while the delegate acts
    on the other: the concurrent pairs the rules are about."""
    _, genesis = world(mandate_default_ms=300, mandate_max_ms=600)
    replicas = [copy_of(genesis) for _ in range(draw(st.integers(2, 3)))]
    ops = [genesis]
    now = T0
    for _ in range(draw(st.integers(1, 16))):
        now += draw(st.integers(1, 100))
        replica = draw(st.sampled_from(replicas))
        action = draw(st.sampled_from(ACTIONS))
        if action == "sync":
            deliver(list(draw(st.sampled_from(replicas)).graph.topological()), replica, now)
        elif action == "race":
            ops.extend(race(draw, genesis, replicas, now))
        elif (op := attempt(draw, genesis, replica, action, now)) is not None:
            ops.append(op)
    return History(genesis, ops)


TIMES = [T0 + 100 * k for k in range(0, 30, 3)]


@given(data=st.data(), history=histories())
def test_any_order_with_duplicates_gives_one_result(data: st.DataObject, history: History) -> None:
    # Validation is a function of the causal past: every op valid where it was
    # authored is valid everywhere.
    assert_order_independent(data, history.genesis, history.ops, lambda r: outcome(r, TIMES))


def test_histories_produce_concurrency_and_discounted_acts() -> None:
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
        for m in mandates(replica).all():
            seen.update(str(e.why) for e in mandates(replica).under(m.id) if not e.counted)
            seen.update(s.status for s in [mandates(replica).state(m.id, T0 + 500)])

    look()
    assert {"concurrent", CONCURRENT_WITH_RECALL, RECALLED, LIVE, LAPSED} <= seen
