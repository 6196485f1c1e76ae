"""The simulator founds a federation of any size: at most GENESIS_CELLS_MAX
cells in the genesis, the others admitted by real ``cell.admit`` and
``cell.endorse`` ops that every node holds before the run; the admitted
cells' members then write like any other, and the run converges."""

from __future__ import annotations

import random
from typing import Any

import pytest

from archipel.crdt import Replica
from archipel.crdt.authority import ADMIT, ENDORSE
from archipel.simulations import run
from archipel.simulations.scenario import ScenarioError, parse
from archipel.simulations.workload import GENESIS_CELLS_MAX, PROPOSAL_CIRCLES_MAX, Workload

MIX = {"note": 3, "ledger": 3, "offer": 1, "claim": 2, "proposal": 1, "vote": 3}

# 30 nodes: 10 cells of 3 members; the genesis founds 3, the other 7 are admitted.
GROWN: dict[str, Any] = {
    "name": "grown",
    "nodes": 30,
    "duration_ms": 3_000,
    "settle_ms": 30_000,
    "sample_ms": 100,
    "latency": {"kind": "uniform", "low_ms": 10, "high_ms": 40},
    "topology": {"kind": "random-regular", "degree": 6},
    "workload": {"rate": 1.0, "warmup_ms": 2_000, "mix": MIX, "genesis_cells": 3},
    "faults": [{"kind": "partition", "shape": "halves", "at": 0.2, "until": 0.5}],
}


def test_cells_beyond_the_genesis_are_admitted_before_the_run() -> None:
    workload = Workload(random.Random(1), cells=8, sites=2, genesis_cells=2)
    genesis, *admissions = workload.founding
    assert len(genesis.body["cells"]) == 2  # type: ignore[arg-type]
    assert [op.kind for op in admissions] == [ADMIT, ENDORSE] * 6
    site = workload.sites[1]
    authority = site.authority
    assert len(authority.cells()) == 8  # every admission is complete
    # A member of the last admitted cell writes, and the op counts everywhere.
    newcomer = workload.members[-1]
    op = site.author(newcomer.key, "note", {"text": "hello"}, workload.now_ms + 1)
    other = workload.sites[0]
    other.receive(op, workload.now_ms + 1)
    assert authority.counts(op)
    assert other.authority.counts(op)


def test_a_workload_of_the_default_size_is_unchanged() -> None:
    """No admission when the genesis holds every cell: ops are what they were."""
    small = Workload(random.Random(5), cells=6)
    assert small.founding == [small.genesis]
    assert len(small.genesis.body["cells"]) == 6  # type: ignore[arg-type]


def test_a_proposal_in_a_large_federation_seats_at_most_the_circles_allowed() -> None:
    cells = 2 * PROPOSAL_CIRCLES_MAX  # 3 members each: one circle per cell
    workload = Workload(random.Random(2), cells=cells, sites=1, genesis_cells=GENESIS_CELLS_MAX)
    site = workload.sites[0]
    everyone = list(range(len(workload.members)))
    proposal = workload.author_on(site, everyone, workload.now_ms + 10, "proposal")
    assert proposal is not None
    assert len(proposal.body["circles"]) == PROPOSAL_CIRCLES_MAX  # type: ignore[arg-type]
    circles: Any = proposal.body["circles"]
    seated = {key for circle in circles for key in circle["members"]}
    inside = [i for i, m in enumerate(workload.members) if m.public in seated]
    outside = [i for i, m in enumerate(workload.members) if m.public not in seated]
    assert len(inside) == 3 * PROPOSAL_CIRCLES_MAX
    # Only members seated in one of its circles may vote on it.
    now = workload.now_ms + 20
    assert workload.author_on(site, inside[:1], now, "vote") is not None
    assert workload.author_on(site, inside[-1:], now, "vote") is not None
    assert workload.author_on(site, outside[:1], now, "vote") is None


def test_a_federation_larger_than_its_genesis_runs_and_converges() -> None:
    report = run.run(parse(GROWN)).report
    assert report["convergence"]["converged"], report["convergence"]
    assert report["acknowledged_ops_lost"] == 0
    assert all(h["caught_up_ms"] is not None for h in report["convergence"]["heals"])
    assert report["operations"]["writes"] > 30


def test_members_of_admitted_cells_write_and_their_ops_count_on_every_node() -> None:
    sim = run._Simulation(parse(GROWN), seed=1)
    report = sim.play()
    assert report["convergence"]["converged"]
    founding = sim.workload.founding
    admitted = {m.public for m in sim.workload.members if m.cell >= 3}  # cells 3..9: admitted
    written = [op for op in sim.replicas[0].graph.topological() if op.id in sim.state.written]
    by_newcomers = [op for op in written if op.author in admitted]
    assert by_newcomers, "no admitted member wrote"
    replicas: list[Replica] = sim.replicas
    for replica in replicas:
        assert all(op.id in replica.graph for op in founding)
        assert all(replica.authority.counts(op) for op in by_newcomers)


def test_the_same_seed_gives_the_same_report_with_admissions() -> None:
    short = {**GROWN, "nodes": 12, "duration_ms": 1_500, "faults": []}
    first = run.run(parse(short)).json()
    assert run.run(parse(short)).json() == first


@pytest.mark.parametrize("value", [0, 1, GENESIS_CELLS_MAX + 1, "many"])
def test_a_genesis_cap_out_of_range_is_refused(value: object) -> None:
    with pytest.raises(ScenarioError, match="genesis_cells"):
        parse({**GROWN, "workload": {**GROWN["workload"], "genesis_cells": value}})
