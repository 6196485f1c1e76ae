"""Pulse: divergence index, response times, the anonymous frustration log."""

from __future__ import annotations

import pytest
from helpers import T0, cell, cells_federation, device, fork, key, member, merge, pub
from test_decisions import CIRCLES

from archipel.crdt import RuleViolation
from archipel.crdt.pulse import Pulse

NORTH, SOUTH, EAST = 0, 1, 2
HOUR = 3600 * 1000


def test_divergence_counts_open_proposals_over_time() -> None:
    replica, _ = cells_federation()
    body = {"title": "t", "options": ("a", "b"), "ballot": "single", "circles": CIRCLES}
    replica.author(key(member(NORTH)), "proposal.open", {**body, "window_ms": 2 * HOUR}, T0 + HOUR)
    replica.author(
        key(member(SOUTH)), "proposal.open", {**body, "window_ms": 4 * HOUR}, T0 + 2 * HOUR
    )
    series = replica.record(Pulse).divergence(T0, T0 + 7 * HOUR, HOUR)
    # A window includes its closing instant (votes dated then still count).
    assert [n for _, n in series] == [0, 1, 2, 2, 1, 1, 1, 0]
    with pytest.raises(ValueError, match="step_ms"):
        replica.record(Pulse).divergence(T0, T0 + 1, 0)


def test_response_time_is_the_first_reply_from_another_cell() -> None:
    north, genesis = cells_federation()
    statement = north.author(key(member(NORTH)), "note", {"text": "we need a van"}, T0 + 1000)
    south = fork(north)
    east = fork(north)
    south.author(key(member(SOUTH)), "note", {"text": "we have one"}, T0 + 5000)
    south.author(
        key(member(SOUTH, 2)), "note", {"text": "and a driver"}, T0 + 9000
    )  # not a reply to it
    east.author(key(member(EAST)), "note", {"text": "ask the south"}, T0 + 3000)
    north.author(key(member(NORTH, 2)), "note", {"text": "own cell: not a reply"}, T0 + 2000)
    merge(north, south, east)
    times = {(t.cell, t.by): t for t in north.record(Pulse).response_times()}
    assert times[(cell(genesis, NORTH), cell(genesis, EAST))].median_ms == 2000
    assert times[(cell(genesis, NORTH), cell(genesis, SOUTH))].median_ms == 4000
    assert times[(cell(genesis, NORTH), cell(genesis, SOUTH))].count == 1
    assert statement.id in north.graph
    assert north.record(Pulse).response_times() == south.record(Pulse).response_times()


def test_frustration_log_names_the_cell_never_the_member() -> None:
    replica, genesis = cells_federation()
    replica.author(key(device(EAST)), "pulse.frustration", {"text": "meetings run long"}, T0 + 1)
    (entry,) = replica.record(Pulse).frustrations()
    assert entry.cell == cell(genesis, EAST)
    assert entry.text == "meetings run long"
    assert not hasattr(entry, "author")
    with pytest.raises(RuleViolation, match="device key"):
        replica.author(key(member(EAST)), "pulse.frustration", {"text": "signed by me"}, T0 + 2)
    for bad in ({}, {"text": ""}, {"text": 3}, {"text": "x", "who": "me"}):
        with pytest.raises(RuleViolation):
            replica.author(key(device(EAST)), "pulse.frustration", bad, T0 + 3)  # type: ignore[arg-type]
    assert len(replica.record(Pulse).frustrations(cell(genesis, EAST))) == 1
    assert replica.record(Pulse).frustrations(cell(genesis, NORTH)) == []


def test_a_device_revoked_concurrently_does_not_count_in_the_log() -> None:
    cell_side, _genesis = cells_federation()
    device_side = fork(cell_side)
    device_side.author(key(device(EAST)), "pulse.frustration", {"text": "stolen laptop"}, T0 + 5)
    cell_side.author(key(member(EAST)), "key.revoke", {"key": pub(device(EAST))}, T0 + 5)
    merge(cell_side, device_side)
    assert cell_side.record(Pulse).frustrations() == []
    assert device_side.record(Pulse).frustrations() == []
