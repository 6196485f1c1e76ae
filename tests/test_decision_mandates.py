"""Mandates granted by a sealed decision of several cells.

The circles of a mandate proposal decide (yes beats no, quorum met, sealed); a
member of a deciding cell then signs the ``mandate.grant`` naming the
proposal. Its issuers are all the deciding cells: a member of any of them may
recall it, no one may renew it, and it lapses only when every issuer is expelled.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from helpers import (
    T0,
    assert_order_independent,
    cell,
    cells_federation,
    fork,
    key,
    member,
    merge,
    pub,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from test_mandates import copy_of, deliver, outcome

from archipel.crdt import Op, Replica, RuleViolation, ts_ms
from archipel.crdt.decisions import Decisions
from archipel.crdt.mandates import (
    ACT,
    CONCURRENT_WITH_RECALL,
    DECISION_VOID,
    DUPLICATE_GRANT,
    GRANT,
    GRANT_VOID,
    ISSUER_EXPELLED,
    LIVE,
    RECALL,
    RECALLED,
    RENEW,
    VOID,
    Mandates,
)

NORTH, SOUTH, EAST = 0, 1, 2
N1, N2, S1, S2, E1, E2 = (member(c, n) for c in (NORTH, SOUTH, EAST) for n in (1, 2))
MEMBERS = [N1, N2, S1, S2, E1, E2]
KEY_NUMBER = {pub(n): n for n in MEMBERS}
WINDOW = 60_000
TEXT = "Negotiate the bakery lease; sign only below 900"
ACTS = ("negotiate", "sign")
DELEGATE = E1  # a member of East, a cell that does not sit in the circle
Body = dict[str, Any]


def circle(*voters: int) -> tuple[Body, ...]:
    return ({"name": "river", "members": tuple(sorted(pub(v) for v in voters))},)


def propose(
    replica: Replica, at: int, delegate: int = DELEGATE, voters: tuple[int, ...] = (N1, N2, S1)
) -> Op:
    """A mandate proposal decided by a circle of North and South members."""
    body: Body = {
        "title": "Send a delegate to the bakery",
        "text": TEXT,
        "options": ("yes", "no"),
        "ballot": "single",
        "circles": circle(*voters),
        "window_ms": WINDOW,
        "quorum": 50,
        "action": {"mandate": pub(delegate), "acts": ACTS},
    }
    return replica.author(key(voters[0]), "proposal.open", body, T0 + at)


def vote(replica: Replica, proposal: Op, voter: int, choice: int, at: int) -> Op:
    body: Body = {
        "proposal": proposal.id, "version": proposal.id, "choices": (choice,),
        "reasoning": "why not", "circle": "river",
    }  # fmt: skip
    return replica.author(key(voter), "vote.cast", body, T0 + at)


def seal(replica: Replica, proposal: Op, by: int = N1) -> Op:
    at = ts_ms(proposal.ts) + WINDOW + 1
    return replica.author(key(by), "proposal.seal", {"proposal": proposal.id}, at)


def decide(replica: Replica, at: int = 10, choices: tuple[int, ...] = (0, 0, 1)) -> Op:
    """Open a mandate proposal, vote (yes, yes, no by default) and seal it."""
    p = propose(replica, at)
    for i, (voter, choice) in enumerate(zip((N1, N2, S1), choices, strict=True)):
        vote(replica, p, voter, choice, at + 1 + i)
    seal(replica, p)
    return p


def grant(replica: Replica, signer: int, decision: Op, at: int, **change: object) -> Op:
    body = mandates(replica).grant_body(
        pub(DELEGATE), TEXT, at, acts=ACTS, decision=decision.id, expires_ms=at + 10**6
    )
    body.update(change)
    return replica.author(key(signer), GRANT, {k: v for k, v in body.items() if v is not None}, at)


def act(replica: Replica, mandate: Op, at: int) -> Op:
    body: Body = {"mandate": mandate.id, "act": "sign", "text": f"signed at {at}"}
    return replica.author(key(DELEGATE), ACT, body, at)


def mandates(replica: Replica) -> Mandates:
    return replica.record(Mandates)


AFTER = T0 + 10 * WINDOW  # after every seal of the benches


# -- the happy path ---------------------------------------------------------


def test_a_passed_decision_grants_a_mandate_from_all_deciding_cells() -> None:
    replica, genesis = cells_federation()
    p = decide(replica)
    assert replica.record(Decisions).tally(p.id).passed
    m = grant(replica, S1, p, AFTER)
    done = act(replica, m, AFTER + 10)
    mandate = mandates(replica).mandate(m.id)
    assert mandate is not None
    assert mandate.decision == p.id
    assert mandate.issuer == cell(genesis, SOUTH)
    assert mandate.issuers == tuple(sorted((cell(genesis, NORTH), cell(genesis, SOUTH))))
    assert (mandate.delegate, mandate.acts, mandate.instructions) == (pub(DELEGATE), ACTS, TEXT)
    assert mandates(replica).state(m.id, AFTER + 20).status == LIVE
    (entry,) = mandates(replica).under(m.id)
    assert (entry.op, entry.counted, entry.why) == (done.id, True, None)


def test_a_member_of_any_issuing_cell_may_recall_but_no_one_may_renew() -> None:
    replica, _ = cells_federation()
    m = grant(replica, S1, decide(replica), AFTER)
    with pytest.raises(RuleViolation, match="cannot be renewed"):
        replica.author(key(S2), RENEW, {"mandate": m.id, "expires": AFTER + 10**7}, AFTER + 1)
    with pytest.raises(RuleViolation, match="issuing cell"):
        replica.author(key(E2), RECALL, {"mandate": m.id}, AFTER + 2)
    replica.author(key(N2), RECALL, {"mandate": m.id}, AFTER + 3)  # North did not sign it
    assert mandates(replica).state(m.id, AFTER + 4).status == RECALLED


# -- refused grants ---------------------------------------------------------


@dataclass
class Bench:
    replica: Replica
    passed: Op  # a sealed, passed mandate proposal
    failed: Op  # sealed, no beats yes
    unsealed: Op  # passed its window, never sealed
    other: Op  # sealed and passed, for another delegate
    plain: Op  # a sealed, passed proposal with no action
    granted: Op  # a grant from ``passed``


def bench() -> Bench:
    replica, _ = cells_federation()
    passed = decide(replica, 10)
    failed = decide(replica, 70_000, (0, 1, 1))
    unsealed = propose(replica, 140_000)
    other = propose(replica, 150_000, delegate=S2)
    for voter in (N1, N2, S1):
        vote(replica, unsealed, voter, 0, 150_001)
        vote(replica, other, voter, 0, 150_002)
    seal(replica, other)
    body: Body = {
        "title": "Plain", "options": ("yes", "no"), "ballot": "single",
        "circles": circle(N1, N2, S1), "window_ms": WINDOW,
    }  # fmt: skip
    plain = replica.author(key(N1), "proposal.open", body, T0 + 220_000)
    vote(replica, plain, N1, 0, 220_001)
    seal(replica, plain)
    again = decide(replica, 290_000)
    granted = grant(replica, N1, again, AFTER)
    return Bench(replica, passed, failed, unsealed, other, plain, granted)


Case = tuple[int, Callable[[Bench], Body], str]


def g(target: str = "passed", **change: object) -> Callable[[Bench], Body]:
    def build(b: Bench) -> Body:
        decision = getattr(b, target)
        body = mandates(b.replica).grant_body(
            pub(DELEGATE), TEXT, AFTER, acts=ACTS, decision=decision.id, expires_ms=AFTER + 10**6
        )
        body.update(change)
        return {k: v for k, v in body.items() if v is not None}

    return build


BAD_GRANTS: list[Case] = [
    (N1, g("failed"), "did not pass"),
    (N1, g("unsealed"), "not sealed"),
    (N1, g("other"), "another delegate"),
    (N1, g("plain"), "not a mandate proposal"),
    (N1, g("granted"), "must name a proposal.open"),
    (E2, g(), "deciding cell"),
    (N1, g(acts=("sign",)), "exactly the acts negotiate, sign"),
    (N1, g(instructions="Sign at any price"), "the text the decision adopted"),
    (N1, g(decision=b"x" * 32), "among the deps"),
    (N1, g(decision="p"), "among the deps"),
    (N1, g(acts=None), "exactly one"),
    (N1, g(decision=None, extra=1), "unknown field"),
]


@pytest.mark.parametrize(("signer", "body", "why"), BAD_GRANTS)
def test_bad_grants_from_a_decision_are_refused(
    signer: int, body: Callable[[Bench], Body], why: str
) -> None:
    b = bench()
    times = [AFTER, AFTER + 10**5]
    before = outcome(b.replica, times)
    with pytest.raises(RuleViolation, match=why):
        b.replica.author(key(signer), GRANT, body(b), AFTER + 5)
    assert outcome(b.replica, times) == before


def test_a_council_mandate_cannot_come_from_a_decision() -> None:
    b = bench()
    body = g(acts=None, council=b.granted.id)(b)
    with pytest.raises(RuleViolation, match="not by a decision"):
        b.replica.author(key(N1), GRANT, body, AFTER + 5)


def test_one_grant_per_decision_in_the_causal_past() -> None:
    b = bench()
    b.replica.author(key(N1), GRANT, g()(b), AFTER + 5)
    with pytest.raises(RuleViolation, match="already granted"):
        b.replica.author(key(S1), GRANT, g()(b), AFTER + 6)


def test_the_bench_grant_is_valid() -> None:
    b = bench()
    m = b.replica.author(key(S1), GRANT, g()(b), AFTER + 5)
    assert mandates(b.replica).state(m.id, AFTER + 6).status == LIVE


# -- concurrency ------------------------------------------------------------


def test_a_recall_by_another_issuing_cell_wins_over_a_concurrent_act() -> None:
    """North's member grants; cut off, a South member recalls while the
    delegate signs. After the heal, the act does not count, everywhere."""
    north, _ = cells_federation()
    m = grant(north, N1, decide(north), AFTER)
    south = fork(north)
    recall = south.author(key(S2), RECALL, {"mandate": m.id, "reason": "too dear"}, AFTER + 10)
    done = act(north, m, AFTER + 20)
    assert mandates(north).under(m.id)[0].counted  # before the heal
    merge(north, south)
    for replica in (north, south):
        (entry,) = mandates(replica).under(m.id)
        assert (entry.op, entry.counted, entry.why) == (done.id, False, CONCURRENT_WITH_RECALL)
        state = mandates(replica).state(m.id, AFTER + 30)
        assert (state.status, state.recalls) == (RECALLED, (recall.id,))
    assert outcome(north, [AFTER + 30]) == outcome(south, [AFTER + 30])


def test_of_two_concurrent_grants_from_one_decision_one_counts() -> None:
    a, _ = cells_federation()
    p = decide(a)
    b = fork(a)
    first = grant(a, N1, p, AFTER)
    second = grant(b, S1, p, AFTER + 1)
    act(a, first, AFTER + 2)
    act(b, second, AFTER + 3)
    merge(a, b)
    for replica in (a, b):
        record = mandates(replica)
        assert record.state(first.id, AFTER + 5).status == LIVE
        assert record.state(second.id, AFTER + 5).status == VOID
        assert [e.counted for e in record.under(first.id)] == [True]
        assert [e.why for e in record.under(second.id)] == [GRANT_VOID]
        whys = {e.op: e.why for e in record.history(pub(DELEGATE)) if e.kind == GRANT}
        assert whys == {first.id: None, second.id: DUPLICATE_GRANT}
    assert outcome(a, [AFTER + 5]) == outcome(b, [AFTER + 5])


def test_a_grant_is_void_once_its_decision_no_longer_passes() -> None:
    """A yes vote whose key is revoked concurrently stops counting after the
    heal; the decision fails on recount, so its grant and acts are void."""
    a, _ = cells_federation()
    p = propose(a, 10, voters=(S1, S2, N1))
    vote(a, p, S1, 0, 11)
    vote(a, p, S2, 1, 12)
    b = fork(a)
    b.author(key(N2), "key.revoke", {"key": pub(N1)}, T0 + 20)
    vote(a, p, N1, 0, 21)
    seal(a, p, by=S1)
    m = grant(a, S1, p, AFTER)
    done = act(a, m, AFTER + 1)
    assert mandates(a).state(m.id, AFTER + 2).status == LIVE
    merge(a, b)
    for replica in (a, b):
        assert not replica.record(Decisions).tally(p.id).passed
        whys = {e.op: e.why for e in mandates(replica).history(pub(DELEGATE))}
        assert whys == {m.id: DECISION_VOID, done.id: GRANT_VOID}
        assert mandates(replica).state(m.id, AFTER + 2).status == VOID


def expel(replica: Replica, target: int, voters: tuple[int, ...], at: int) -> Op:
    body: Body = {
        "title": "Expel", "options": ("yes", "no"), "ballot": "single",
        "circles": circle(*voters), "window_ms": WINDOW,
        "action": {"expel": cell_id(replica, target)},
    }  # fmt: skip
    p = replica.author(key(voters[0]), "proposal.open", body, at)
    for voter in voters:
        vote(replica, p, voter, 0, at - T0 + 1)
    return seal(replica, p, by=voters[0])


def cell_id(replica: Replica, index: int) -> bytes:
    owner = replica.authority.cell_of(pub(member(index, 1)))
    assert owner is not None
    return owner


def test_a_decision_mandate_lapses_only_when_every_issuer_is_expelled() -> None:
    """North and South issue it. South's expulsion leaves it live; an act
    concurrent with North's expulsion, after South's, does not count."""
    replica, _ = cells_federation()
    m = grant(replica, N1, decide(replica), AFTER)
    expel(replica, SOUTH, (N1, N2, E2), AFTER + 10)
    after_south = act(replica, m, AFTER + WINDOW + 100)
    assert mandates(replica).state(m.id, AFTER + WINDOW + 200).status == LIVE
    assert mandates(replica).under(m.id)[0].counted
    other = fork(replica)
    concurrent = act(replica, m, AFTER + WINDOW + 300)
    expel(other, NORTH, (N1, N2, E2), AFTER + WINDOW + 200)
    merge(replica, other)
    for r in (replica, other):
        whys = {e.op: e.why for e in mandates(r).under(m.id)}
        assert whys == {after_south.id: None, concurrent.id: ISSUER_EXPELLED}
        assert mandates(r).state(m.id, AFTER + 4 * WINDOW).status == VOID


# -- convergence ------------------------------------------------------------


@dataclass(frozen=True)
class History:
    genesis: Op
    ops: list[Op]


def prelude() -> tuple[Op, list[Op]]:
    replica, genesis = cells_federation(mandate_default_ms=300, mandate_max_ms=600)
    decide(replica)
    return genesis, [op for op in replica.graph.topological() if op.id != genesis.id]


GENESIS, PRELUDE = prelude()
ACTIONS = ["grant", "grant", "act", "act", "act", "recall", "revoke", "sync", "sync", "race"]


def attempt(draw: st.DrawFn, replica: Replica, action: str, now: int) -> Op | None:
    """One op of ``action`` by a drawn member; None if it is refused."""
    decision = PRELUDE[0].id
    record = mandates(replica)
    known = record.all()
    signer = draw(st.sampled_from(MEMBERS))
    if action == "grant" or not known:
        expires = now + draw(st.integers(100, 600))
        body = record.grant_body(
            pub(DELEGATE), TEXT, now, acts=ACTS, decision=decision, expires_ms=expires
        )
        kind = GRANT
    elif action == "revoke":
        c, n = draw(st.sampled_from([NORTH, SOUTH, EAST])), draw(st.sampled_from([1, 2]))
        signer, kind, body = member(c, n), "key.revoke", {"key": pub(member(c, 3 - n))}
    else:
        m = draw(st.sampled_from(known))
        kind, body = RECALL, {"mandate": m.id}
        if action == "act":
            signer, kind = KEY_NUMBER[m.delegate], ACT
            body = {"mandate": m.id, "act": "sign", "text": f"at {now}"}
    try:
        return replica.author(key(signer), kind, body, now)
    except RuleViolation:
        return None


def race(draw: st.DrawFn, replicas: list[Replica], now: int) -> list[Op]:
    """Sync ``b`` from ``a``; then a member recalls on ``a`` while the delegate acts on ``b``."""
    a, b = draw(st.permutations(replicas))[:2]
    deliver(list(a.graph.topological()), b, now)
    known = mandates(a).all()
    if not known:
        return []
    m = draw(st.sampled_from(known))
    made = []
    for replica, signer, kind, body in (
        (a, draw(st.sampled_from([N1, N2, S1, S2])), RECALL, {"mandate": m.id}),
        (b, DELEGATE, ACT, {"mandate": m.id, "act": "sign", "text": "now"}),
    ):
        with contextlib.suppress(RuleViolation):
            made.append(replica.author(key(signer), kind, body, now))
    return made


@st.composite
def histories(draw: st.DrawFn) -> History:
    """From a passed decision, members on 2-3 replicas grant from it (often
    concurrently), act, recall and revoke keys, with occasional syncs; a race
    recalls on one replica while the delegate acts on another."""
    replicas = [copy_of(GENESIS) for _ in range(draw(st.integers(2, 3)))]
    for replica in replicas:
        deliver(PRELUDE, replica)
    ops = [GENESIS, *PRELUDE]
    now = AFTER
    for _ in range(draw(st.integers(1, 12))):
        now += draw(st.integers(1, 100))
        replica = draw(st.sampled_from(replicas))
        action = draw(st.sampled_from(ACTIONS))
        if action == "sync":
            deliver(list(draw(st.sampled_from(replicas)).graph.topological()), replica, now)
        elif action == "race":
            ops.extend(race(draw, replicas, now))
        elif (op := attempt(draw, replica, action, now)) is not None:
            ops.append(op)
    return History(GENESIS, ops)


TIMES = [AFTER + 100 * k for k in range(0, 12, 2)]


@given(data=st.data(), history=histories())
def test_decision_mandates_converge_in_any_order(data: st.DataObject, history: History) -> None:
    assert_order_independent(data, history.genesis, history.ops, lambda r: outcome(r, TIMES))


def test_histories_produce_duplicate_grants_and_recalls() -> None:
    """Guard: the generator builds concurrent grants and recalled acts."""
    seen: set[str | None] = set()

    # A fixed sample (derandomized): a guard that passes only by luck would be flaky.
    @settings(derandomize=True, max_examples=200)
    @given(history=histories())
    def look(history: History) -> None:
        replica = copy_of(history.genesis)
        deliver(history.ops, replica)
        for m in mandates(replica).all():
            seen.update(e.why for e in mandates(replica).history(m.delegate))

    look()
    assert {DUPLICATE_GRANT, CONCURRENT_WITH_RECALL, None} <= seen
