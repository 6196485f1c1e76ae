"""Every record kind together: a realistic workload of all of them, authored on
several sites with partial syncs, converges to one state in any delivery order."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from archipel.crdt import Notes, Op, Replica
from archipel.crdt.aid import Aid
from archipel.crdt.alerts import Alerts
from archipel.crdt.councils import Councils
from archipel.crdt.decisions import Decisions
from archipel.crdt.ledger import Ledger
from archipel.crdt.lots import Lots
from archipel.crdt.mandates import Mandates
from archipel.crdt.pulse import Pulse
from archipel.simulations.workload import Workload


def snapshot(replica: Replica, now_ms: int) -> tuple[object, ...]:
    """What every query of every record kind answers at ``now_ms``."""
    decisions = replica.record(Decisions)
    mandates = replica.record(Mandates)
    aid = replica.record(Aid)
    pulse = replica.record(Pulse)
    authority = replica.authority
    return (
        replica.state_hash(),
        replica.heads(),
        [(c.id, authority.keys_of(c.id)) for c in authority.cells()],
        [decisions.tally(p.id, now_ms=now_ms) for p in decisions.proposals()],
        [mandates.state(m.id, now_ms) for m in mandates.all()],
        [mandates.under(m.id) for m in mandates.all()],
        [aid.allocation(o.id) for o in aid.open_offers(now_ms)],
        replica.record(Ledger).balances(),
        replica.record(Alerts).active(now_ms),
        replica.record(Councils).councils(now_ms),
        replica.record(Lots).draws(now_ms),
        replica.record(Notes).all(),
        pulse.response_times(),
        pulse.divergence(now_ms - 120_000, now_ms, 10_000),
    )


def workload_ops(seed: int, count: int) -> tuple[Workload, list[Op]]:
    workload = Workload(random.Random(seed), cells=3, members_per_cell=3, sync_every=8)
    return workload, list(workload.run(count, step_ms=400))


@settings(max_examples=25)
@given(seed=st.integers(0, 2**32), data=st.data())
def test_all_records_converge_in_any_order(seed: int, data: st.DataObject) -> None:
    workload, ops = workload_ops(seed, 120)
    now = workload.now_ms + 1
    results = []
    for _ in range(2):
        extra = data.draw(st.lists(st.sampled_from(ops), max_size=10))
        order = data.draw(st.permutations(ops + extra))
        replica = Replica(workload.genesis.federation)
        for op in order:
            replica.receive(op, now)
        assert len(replica.graph) == len(ops)
        results.append(snapshot(replica, now))
    assert results[0] == results[1]


def test_the_workload_exercises_every_common_kind() -> None:
    """Guard: the property above only proves something if the workload really
    produces these kinds, with concurrency between sites."""
    workload, ops = workload_ops(7, 400)
    kinds = {op.kind for op in ops}
    assert {"vote.cast", "proposal.open", "proposal.seal", "aid.offer", "aid.claim"} <= kinds
    assert {"ledger.entry", "mandate.grant", "mandate.act", "note"} <= kinds
    replica = Replica(workload.genesis.federation)
    for op in ops:
        replica.receive(op, workload.now_ms + 1)
    concurrent = sum(1 for op in ops if len(op.deps) > 2)
    assert concurrent > 20
