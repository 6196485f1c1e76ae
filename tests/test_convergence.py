"""Convergence: the same ops, delivered in any order any number of times, give
one result on every replica (heads, state hash, record state, evidence)."""

from __future__ import annotations

from dataclasses import dataclass

from helpers import T0, federation, key
from hypothesis import given, settings
from hypothesis import strategies as st

from archipel.crdt import Notes, Op, Replica


@dataclass(frozen=True)
class History:
    genesis: Op
    ops: list[Op]  # every op authored, genesis first


@st.composite
def histories(draw: st.DrawFn) -> History:
    """Authors on their own replicas write notes, sometimes sync with each other
    (so ops are concurrent or causally ordered), and sometimes lose their
    replica and start again from the genesis, equivocating."""
    authors = draw(st.integers(1, 4))
    _, genesis = federation(members=4)
    replicas = [Replica(genesis.federation) for _ in range(authors)]
    for replica in replicas:
        replica.receive(genesis, T0)
    ops = [genesis]
    now = T0
    for _ in range(draw(st.integers(1, 20))):
        now += draw(st.integers(0, 50))
        who = draw(st.integers(0, authors - 1))
        action = draw(st.sampled_from(["write", "write", "sync", "reset"]))
        if action == "sync":
            other = replicas[draw(st.integers(0, authors - 1))]
            for op in other.graph.topological():
                replicas[who].receive(op, now)
        elif action == "reset":
            replicas[who] = Replica(genesis.federation)
            replicas[who].receive(genesis, now)
        ops.append(replicas[who].author(key(who), "note", {"text": f"{who}@{now}"}, now))
    return History(genesis, ops)


def outcome(replica: Replica) -> tuple[object, ...]:
    return (
        replica.state_hash(),
        replica.heads(),
        replica.record(Notes).all(),
        replica.graph.equivocations(),
        replica.graph.pending_count(),
    )


def deliver(history: History, order: list[Op], via_bytes: bool) -> Replica:
    replica = Replica(history.genesis.federation)
    for op in order:
        if via_bytes:
            replica.receive_bytes(op.data, T0 + 10**6)
        else:
            replica.receive(op, T0 + 10**6)
    return replica


@given(data=st.data(), history=histories())
def test_any_order_with_duplicates_gives_one_state(data: st.DataObject, history: History) -> None:
    reference = deliver(history, sorted(history.ops, key=lambda op: (op.ts, op.id)), False)
    assert len(reference.graph) == len(set(history.ops))  # a reset can re-sign an identical op
    assert reference.graph.pending_count() == 0
    for via_bytes in (False, True):
        duplicates = data.draw(st.lists(st.sampled_from(history.ops), max_size=10))
        order = data.draw(st.permutations(history.ops + duplicates))
        assert outcome(deliver(history, order, via_bytes)) == outcome(reference)


@given(history=histories())
def test_incremental_state_matches_a_fold_in_topological_order(history: History) -> None:
    """Live application (arrival order) and a rebuild from the graph agree."""
    live = deliver(history, list(reversed(history.ops)), False)
    rebuilt = deliver(history, list(live.graph.topological()), False)
    assert outcome(rebuilt) == outcome(live)


def test_histories_do_produce_concurrency_and_equivocation() -> None:
    """Guard against a generator that only ever builds a chain (the property
    would then prove little)."""
    seen = {"concurrent": False, "equivocation": False}

    # A fixed sample (derandomized): a guard that passes only by luck would be flaky.
    @settings(derandomize=True, max_examples=200)
    @given(history=histories())
    def look(history: History) -> None:
        replica = deliver(history, history.ops, False)
        if len(replica.heads()) > 1:
            seen["concurrent"] = True
        if replica.graph.equivocations():
            seen["equivocation"] = True

    look()
    assert seen == {"concurrent": True, "equivocation": True}
