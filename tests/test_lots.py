"""Roles by lot: commit, reveal, close; withholding; concurrent closes; bad input."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import pytest
from helpers import T0, cell, cells_federation, device, fork, key, member, merge, pub
from hypothesis import given, settings
from hypothesis import strategies as st

from archipel.crdt import DEFAULT_RECORDS, Op, Record, Replica, RuleViolation
from archipel.crdt.lots import (
    CLOSE,
    COMMIT,
    OPEN,
    REVEAL,
    DrawState,
    Lots,
    Phase,
    commitment,
    draw_seed,
    recompute_draw,
)

RECORDS: tuple[type[Record], ...] = (*DEFAULT_RECORDS, Lots)
NORTH, SOUTH, EAST = 0, 1, 2
MINUTE = 60_000
OPEN_AT = T0 + MINUTE
COMMIT_BY = OPEN_AT + 10 * MINUTE
REVEAL_BY = COMMIT_BY + 10 * MINUTE
COMMITTING = OPEN_AT + MINUTE  # a time in each phase
REVEALING = COMMIT_BY + MINUTE
CLOSING = REVEAL_BY + MINUTE
LATER = CLOSING + 60 * MINUTE
ELIGIBLE = tuple(sorted(pub(member(c, n)) for c in (NORTH, SOUTH, EAST) for n in (1, 2)))
# The test federation is deterministic, so its cells can be named up front.
_, GENESIS = cells_federation(records=RECORDS)
N, S, E = (cell(GENESIS, i) for i in (NORTH, SOUTH, EAST))


def secret(n: int) -> bytes:
    return hashlib.blake2b(b"lot-secret-%d" % n, digest_size=32).digest()


def cells(genesis: Op, *indexes: int) -> tuple[bytes, ...]:
    return tuple(sorted(cell(genesis, i) for i in indexes))


def open_body(genesis: Op, **changes: object) -> dict[str, object]:
    body: dict[str, object] = {
        "role": "facilitator",
        "eligible": ELIGIBLE,
        "seats": 2,
        "cells": cells(genesis, NORTH, SOUTH, EAST),
        "commit_by": COMMIT_BY,
        "reveal_by": REVEAL_BY,
    }
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


def start(**changes: object) -> tuple[Replica, Op, Op]:
    """The three-cell federation running lots, and a draw opened by North."""
    replica, genesis = cells_federation(records=RECORDS)
    lot = replica.author(key(member(NORTH)), OPEN, open_body(genesis, **changes), OPEN_AT)  # type: ignore[arg-type]
    return replica, genesis, lot


def commit(replica: Replica, genesis: Op, lot: Op, who: int, at: int = COMMITTING,
           n: int | None = None, by: int = 1) -> Op:  # fmt: skip
    """Cell ``who`` (its member ``by``) commits to secret ``n`` (default: its own)."""
    hashed = commitment(lot.id, cell(genesis, who), secret(who if n is None else n))
    return replica.author(key(member(who, by)), COMMIT, {"lot": lot.id, "hash": hashed}, at)


def reveal(replica: Replica, committed: Op, who: int, at: int = REVEALING,
           n: int | None = None, by: int = 1) -> Op:  # fmt: skip
    body = {"commit": committed.id, "secret": secret(who if n is None else n)}
    return replica.author(key(member(who, by)), REVEAL, body, at)


def close(replica: Replica, lot: Op, who: int, at: int = CLOSING, by: int = 1) -> Op:
    return replica.author(key(member(who, by)), CLOSE, {"lot": lot.id}, at)


def lots(replica: Replica) -> Lots:
    return replica.record(Lots)


def state(replica: Replica, lot: Op, now: int = LATER) -> DrawState:
    found = lots(replica).draw(lot.id, now)
    assert found is not None
    return found


def by_hand(lot: Op, pairs: list[tuple[bytes, bytes]]) -> tuple[bytes, ...]:
    """The draw as docs/records/lots.md specifies it, written out independently."""
    seed = hashlib.blake2b(
        b"archipel/lot/seed/v1\x00" + lot.id + b"".join(c + s for c, s in sorted(pairs)),
        digest_size=32,
    ).digest()
    eligible = [k for k in lot.body["eligible"] if isinstance(k, bytes)]  # type: ignore[union-attr]
    eligible.sort(key=lambda k: hashlib.blake2b(b"archipel/lot/rank/v1\x00" + seed + k,
                                                digest_size=32).digest())  # fmt: skip
    seats = lot.body["seats"]
    assert isinstance(seats, int)
    return tuple(eligible[:seats])


def reveals_from_ops(
    replica: Replica, lot: Op, counted: tuple[bytes, ...]
) -> list[tuple[bytes, bytes]]:
    """What an outsider reads from the ops: each counted cell's revealed secret
    (the cell of a reveal is the cell of its commit's author)."""
    pairs = {}
    for op in replica.graph.topological():
        if op.kind == REVEAL:
            committed = replica.graph[op.body["commit"]]  # type: ignore[index]
            if committed.body["lot"] == lot.id:
                owner = replica.authority.cell_of(committed.author)
                if owner in counted:
                    pairs[owner] = op.body["secret"]
    return [(c, s) for c, s in pairs.items() if isinstance(c, bytes) and isinstance(s, bytes)]


# -- a draw from open to result ------------------------------------------------


def test_a_draw_goes_through_its_phases_and_anyone_recomputes_its_result() -> None:
    replica, genesis, lot = start()
    assert state(replica, lot, COMMITTING).phase is Phase.COMMITTING
    commits = {who: commit(replica, genesis, lot, who) for who in (NORTH, SOUTH, EAST)}
    assert state(replica, lot, COMMITTING).committed == cells(genesis, NORTH, SOUTH, EAST)
    assert state(replica, lot, COMMIT_BY).phase is Phase.COMMITTING  # the deadline is in
    assert state(replica, lot, COMMIT_BY + 1).phase is Phase.REVEALING
    for who in (NORTH, SOUTH, EAST):
        reveal(replica, commits[who], who)
    assert state(replica, lot, REVEALING).revealed == cells(genesis, NORTH, SOUTH, EAST)
    assert state(replica, lot, REVEAL_BY + 1).phase is Phase.AWAITING_CLOSE
    close(replica, lot, NORTH)
    one = state(replica, lot, CLOSING)
    assert (one.phase, one.closed_by, one.result) == (Phase.AWAITING_CLOSE, (N,), ())
    assert lots(replica).result(lot.id) is None
    close(replica, lot, SOUTH, CLOSING + 1)
    done = state(replica, lot)
    assert done.phase is Phase.CLOSED
    assert done.counted == cells(genesis, NORTH, SOUTH, EAST)
    assert done.excluded == ()
    assert len(done.result) == 2
    assert len(set(done.result)) == 2
    assert set(done.result) <= set(ELIGIBLE)
    assert lots(replica).result(lot.id) == done.result
    assert not done.settled  # East may still close (and attest a reveal the others missed)
    close(replica, lot, EAST, CLOSING + 2)
    assert state(replica, lot).settled
    assert state(replica, lot).result == done.result
    pairs = reveals_from_ops(replica, lot, done.counted)
    assert by_hand(lot, pairs) == done.result
    assert recompute_draw(lot.id, ELIGIBLE, 2, pairs) == done.result
    assert [d.lot.id for d in lots(replica).draws(LATER)] == [lot.id]


def test_a_withholding_cell_is_excluded_even_with_a_backdated_reveal_and_its_own_close() -> None:
    """East commits, sees the others' reveals and keeps its own. North and South
    close without it. East's reveal, dated inside the window but published after
    the closes, and East's own close, change nothing: no cell attests itself."""
    replica, genesis, lot = start()
    commits = {who: commit(replica, genesis, lot, who) for who in (NORTH, SOUTH, EAST)}
    east = fork(replica, COMMITTING)
    reveal(replica, commits[NORTH], NORTH)
    reveal(replica, commits[SOUTH], SOUTH, REVEALING + 1)
    merge(replica, east, now_ms=REVEALING + 2)  # East sees both reveals
    withheld = reveal(east, commits[EAST], EAST, REVEALING + 3)  # kept to itself
    close(replica, lot, NORTH)
    close(replica, lot, SOUTH, CLOSING + 1)
    decided = state(replica, lot)
    assert decided.phase is Phase.CLOSED
    assert decided.counted == cells(genesis, NORTH, SOUTH)
    assert decided.excluded == cells(genesis, EAST)
    pairs = reveals_from_ops(replica, lot, decided.counted)
    assert sorted(pairs) == [(cell(genesis, w), secret(w)) for w in sorted(
        (NORTH, SOUTH), key=lambda w: cell(genesis, w))]  # fmt: skip
    assert recompute_draw(lot.id, ELIGIBLE, 2, pairs) == decided.result
    assert by_hand(lot, pairs) == decided.result
    # Later, East publishes its withheld reveal and closes on top of it.
    close(east, lot, EAST, CLOSING + 5)
    merge(replica, east, now_ms=CLOSING + 10)
    for side in (replica, east):
        assert withheld.id in side.graph  # valid, kept, visible...
        after = state(side, lot)
        assert EAST in [i for i in (NORTH, SOUTH, EAST) if cell(genesis, i) in after.revealed]
        assert after.counted == decided.counted  # ...but not counted
        assert after.result == decided.result
        assert after.closed_by == cells(genesis, NORTH, SOUTH, EAST)
        assert after.settled


def test_a_reveal_that_does_not_match_its_commitment_is_refused() -> None:
    replica, genesis, lot = start()
    committed = commit(replica, genesis, lot, NORTH)
    before = (replica.state_hash(), state(replica, lot, REVEALING))
    with pytest.raises(RuleViolation, match="does not match the commitment"):
        reveal(replica, committed, NORTH, n=99)
    assert (replica.state_hash(), state(replica, lot, REVEALING)) == before
    assert state(replica, lot, REVEALING).revealed == ()
    reveal(replica, committed, NORTH, REVEALING + 1)  # the right secret passes
    assert state(replica, lot, REVEALING).revealed == cells(genesis, NORTH)


def test_a_commit_after_the_commit_deadline_is_refused() -> None:
    replica, genesis, lot = start()
    commit(replica, genesis, lot, NORTH, COMMIT_BY)  # at the deadline: in time
    before = (replica.state_hash(), state(replica, lot, COMMIT_BY))
    with pytest.raises(RuleViolation, match="commit deadline has passed"):
        commit(replica, genesis, lot, SOUTH, COMMIT_BY + 1)
    assert (replica.state_hash(), state(replica, lot, COMMIT_BY)) == before
    assert state(replica, lot, COMMIT_BY).committed == cells(genesis, NORTH)


def revealed_draw() -> tuple[Replica, Op, Op, dict[int, Op]]:
    """A draw where all three cells committed and North and South revealed."""
    replica, genesis, lot = start()
    commits = {who: commit(replica, genesis, lot, who) for who in (NORTH, SOUTH, EAST)}
    reveal(replica, commits[NORTH], NORTH)
    reveal(replica, commits[SOUTH], SOUTH, REVEALING + 1)
    return replica, genesis, lot, commits


def test_two_concurrent_closes_with_different_cuts_resolve_to_one_result_everywhere() -> None:
    """North closes without having seen East's reveal; South closes having seen
    it. Neither close can hide what the other attests: everywhere, all three
    secrets count, whatever order the ops arrive in."""
    replica, genesis, lot, commits = revealed_draw()
    north_side = fork(replica, REVEALING + 2)
    reveal(replica, commits[EAST], EAST, REVEALING + 3)
    north_close = close(north_side, lot, NORTH)
    south_close = close(replica, lot, SOUTH)
    assert state(north_side, lot).phase is Phase.AWAITING_CLOSE
    assert state(replica, lot).phase is Phase.AWAITING_CLOSE
    merge(replica, north_side, now_ms=CLOSING + 10)
    assert replica.graph.concurrent(north_close.id, south_close.id)
    results = {state(side, lot) for side in (replica, north_side)}
    assert len(results) == 1
    (merged,) = results
    assert merged.phase is Phase.CLOSED
    assert merged.counted == cells(genesis, NORTH, SOUTH, EAST)
    ops = list(replica.graph.topological())
    for order in (ops, list(reversed(ops))):
        fresh = Replica(replica.federation, records=RECORDS)
        for op in order:
            fresh.receive(op, LATER)
        assert state(fresh, lot) == merged
        assert fresh.state_hash() == replica.state_hash()


def test_a_close_made_after_the_draw_is_decided_cannot_add_the_closers_own_reveal() -> None:
    """North and South close having seen only their own reveals; East closes on
    top of its late-delivered reveal. After the merge the result is the one
    North and South decided, on every replica."""
    replica, genesis, lot, commits = revealed_draw()
    east_side = fork(replica, REVEALING + 2)
    reveal(east_side, commits[EAST], EAST, REVEALING + 3)
    close(replica, lot, NORTH)
    close(replica, lot, SOUTH, CLOSING + 1)
    decided = state(replica, lot)
    close(east_side, lot, EAST)
    merge(replica, east_side, now_ms=CLOSING + 10)
    for side in (replica, east_side):
        assert state(side, lot).counted == cells(genesis, NORTH, SOUTH)
        assert state(side, lot).result == decided.result


def test_different_concurrent_commitments_exclude_the_cell_same_ones_do_not() -> None:
    replica, genesis, lot = start()
    other = fork(replica, COMMITTING)
    mine = commit(replica, genesis, lot, NORTH, by=1)  # two North members, cut off
    commit(other, genesis, lot, NORTH, COMMITTING + 1, n=77, by=2)  # a different secret
    same = commit(replica, genesis, lot, SOUTH, by=1)
    commit(other, genesis, lot, SOUTH, COMMITTING + 1, by=2)  # the same secret
    east = commit(other, genesis, lot, EAST, COMMITTING + 2)
    merge(replica, other, now_ms=COMMITTING + 3)
    assert state(replica, lot, COMMITTING + 3).conflicting == cells(genesis, NORTH)
    with pytest.raises(RuleViolation, match="already committed"):
        commit(replica, genesis, lot, NORTH, COMMITTING + 4)
    reveal(replica, mine, NORTH)
    reveal(replica, same, SOUTH, REVEALING + 1)
    reveal(replica, east, EAST, REVEALING + 2)
    close(replica, lot, SOUTH)
    close(replica, lot, EAST, CLOSING + 1)
    merge(replica, other, now_ms=CLOSING + 2)
    for side in (replica, other):
        decided = state(side, lot)
        assert decided.revealed == cells(genesis, NORTH, SOUTH, EAST)
        assert decided.counted == cells(genesis, SOUTH, EAST)
        assert decided.excluded == cells(genesis, NORTH)


@pytest.mark.parametrize("revealing", [(), (NORTH,)])
def test_fewer_than_two_revealed_cells_fail_the_draw(revealing: tuple[int, ...]) -> None:
    replica, genesis, lot = start()
    commits = {who: commit(replica, genesis, lot, who) for who in (NORTH, SOUTH, EAST)}
    for who in revealing:
        reveal(replica, commits[who], who)
    close(replica, lot, SOUTH)
    close(replica, lot, EAST, CLOSING + 1)
    failed = state(replica, lot)
    assert failed.phase is Phase.FAILED
    assert failed.result == ()
    assert failed.counted == cells(genesis, *revealing)
    assert failed.excluded == tuple(c for c in cells(genesis, NORTH, SOUTH, EAST)
                                    if c not in failed.counted)  # fmt: skip
    assert lots(replica).result(lot.id) is None


def test_a_commit_by_a_key_revoked_concurrently_does_not_count_and_the_cell_commits_again() -> None:
    replica, genesis, lot = start()
    cut_off = fork(replica, COMMITTING)
    replica.author(key(member(NORTH, 1)), "key.revoke", {"key": pub(member(NORTH, 2))}, COMMITTING)
    lost = commit(cut_off, genesis, lot, NORTH, COMMITTING + 1, by=2)
    merge(replica, cut_off, now_ms=COMMITTING + 2)
    assert lost.id in replica.graph
    assert state(replica, lot, COMMITTING + 2).committed == ()
    again = commit(replica, genesis, lot, NORTH, COMMITTING + 3, n=5, by=1)
    assert state(replica, lot, COMMITTING + 3).committed == cells(genesis, NORTH)
    commits = {SOUTH: commit(replica, genesis, lot, SOUTH, COMMITTING + 4)}
    with pytest.raises(RuleViolation, match="does not match"):  # the lost commit's secret
        reveal(replica, again, NORTH)
    reveal(replica, again, NORTH, REVEALING + 1, n=5)
    reveal(replica, commits[SOUTH], SOUTH, REVEALING + 2)
    close(replica, lot, SOUTH)
    close(replica, lot, EAST, CLOSING + 1)
    assert lots(replica).counted_reveals(lot.id) == tuple(sorted(
        [(cell(genesis, NORTH), secret(5)), (cell(genesis, SOUTH), secret(SOUTH))]))  # fmt: skip


def test_a_draw_opened_by_a_key_revoked_concurrently_is_void() -> None:
    replica, genesis = cells_federation(records=RECORDS)
    cut_off = fork(replica)
    replica.author(key(member(NORTH, 2)), "key.revoke", {"key": pub(member(NORTH, 1))}, OPEN_AT)
    lot = cut_off.author(key(member(NORTH, 1)), OPEN, open_body(genesis), OPEN_AT)  # type: ignore[arg-type]
    assert [d.lot.id for d in lots(cut_off).draws(COMMITTING)] == [lot.id]
    merge(replica, cut_off, now_ms=COMMITTING)
    assert lots(replica).draws(COMMITTING) == []
    assert state(replica, lot, COMMITTING).phase is Phase.VOID


def test_eligibility_is_judged_in_the_opens_causal_past() -> None:
    replica, genesis = cells_federation(records=RECORDS)
    replica.author(key(member(EAST, 1)), "key.revoke", {"key": pub(member(EAST, 2))}, T0 + 1)
    with pytest.raises(RuleViolation, match="not a member of a live cell"):
        replica.author(key(member(NORTH)), OPEN, open_body(genesis), OPEN_AT)  # type: ignore[arg-type]
    eligible = tuple(k for k in ELIGIBLE if k != pub(member(EAST, 2)))
    lot = replica.author(key(member(NORTH)), OPEN, open_body(genesis, eligible=eligible), OPEN_AT)  # type: ignore[arg-type]
    assert lots(replica).lot(lot.id) is not None
    # A key granted on another branch is not in the open's causal past.
    other = fork(replica)
    other.author(key(member(SOUTH)), "key.add", {"key": pub(60), "role": "member"}, OPEN_AT + 1)
    late = tuple(sorted((*ELIGIBLE[:2], pub(60))))
    with pytest.raises(RuleViolation, match="not a member of a live cell"):
        replica.author(key(member(SOUTH)), OPEN, open_body(genesis, eligible=late), OPEN_AT + 2)  # type: ignore[arg-type]


# -- the pure draw function ----------------------------------------------------


def test_recompute_draw_is_a_pure_function_of_public_data() -> None:
    lot_id = hashlib.blake2b(b"a lot", digest_size=32).digest()
    a, b, c = (hashlib.blake2b(b"cell %d" % i, digest_size=32).digest() for i in range(3))
    pairs = [(a, secret(1)), (b, secret(2)), (c, secret(3))]
    drawn = recompute_draw(lot_id, ELIGIBLE, 3, pairs)
    assert recompute_draw(lot_id, ELIGIBLE, 3, reversed(pairs)) == drawn
    assert recompute_draw(lot_id, ELIGIBLE, 1, pairs) == drawn[:1]
    assert len(set(drawn)) == 3
    assert recompute_draw(lot_id, ELIGIBLE, 6, pairs) != tuple(ELIGIBLE)  # a shuffle
    # Any one secret changes the seed, and over a few changes, the draw.
    seeds = {draw_seed(lot_id, [(a, secret(n)), (b, secret(2))]) for n in range(10)}
    assert len(seeds) == 10
    draws = {recompute_draw(lot_id, ELIGIBLE, 1, [(a, secret(n)), (b, secret(2))])
             for n in range(20)}  # fmt: skip
    assert len(draws) > 1
    for bad, why in [
        ([(a, secret(1))], "at least 2"),
        ([(a, secret(1)), (a, secret(2))], "one secret"),
        ([(a, secret(1)), (b, b"short")], "32 bytes"),
    ]:
        with pytest.raises(ValueError, match=why):
            recompute_draw(lot_id, ELIGIBLE, 1, bad)
    for seats in (0, 7):
        with pytest.raises(ValueError, match="seats"):
            recompute_draw(lot_id, ELIGIBLE, seats, pairs)
    with pytest.raises(ValueError, match="secret"):
        commitment(lot_id, a, b"short")


# -- bad input -----------------------------------------------------------------

YEAR_ISH = 31 * 24 * 60 * MINUTE
AT = COMMITTING + 2  # when the bad open or commit is tried


@dataclass(frozen=True)
class Ref:
    """A body value filled in from the scenario: an op's id, or a hash."""

    name: str


LOT, COMMITTED, NOTE, SOUTH_HASH = Ref("lot"), Ref("commit"), Ref("note"), Ref("south_hash")


@dataclass
class Ctx:
    """A draw North opened for North and South only; North has committed."""

    replica: Replica
    lot: Op
    commit: Op
    note: Op

    def fill(self, body: Mapping[str, object]) -> dict[str, object]:
        refs = {"lot": self.lot.id, "commit": self.commit.id, "note": self.note.id,
                "south_hash": commitment(self.lot.id, S, secret(SOUTH))}  # fmt: skip
        return {k: refs[v.name] if isinstance(v, Ref) else v for k, v in body.items()}


def ctx() -> Ctx:
    replica, genesis = cells_federation(records=RECORDS)
    body = open_body(genesis, cells=tuple(sorted((N, S))))
    lot = replica.author(key(member(NORTH)), OPEN, body, OPEN_AT)  # type: ignore[arg-type]
    committed = commit(replica, genesis, lot, NORTH)
    note = replica.author(key(member(NORTH)), "note", {"text": "hello"}, COMMITTING + 1)
    return Ctx(replica, lot, committed, note)


def opened(**changes: object) -> dict[str, object]:
    return open_body(GENESIS, **changes)


def eligible_with(extra: bytes) -> tuple[bytes, ...]:
    return tuple(sorted((*ELIGIBLE[:2], extra)))


N1, N2, S1, S2, E1 = member(NORTH), member(NORTH, 2), member(SOUTH), member(SOUTH, 2), member(EAST)
SOUTH_COMMIT = {"lot": LOT, "hash": SOUTH_HASH}
NORTH_REVEAL = {"commit": COMMITTED, "secret": secret(NORTH)}
# name: (author key number, op kind, body, time, why it is refused)
BAD: dict[str, tuple[int, str, Mapping[str, object], int, str]] = {
    "open: no role": (N1, OPEN, opened(role=None), AT, "'role'"),
    "open: empty role": (N1, OPEN, opened(role=""), AT, "'role'"),
    "open: role not text": (N1, OPEN, opened(role=5), AT, "'role'"),
    "open: role too long": (N1, OPEN, opened(role="x" * 201), AT, "'role'"),
    "open: extra field": (N1, OPEN, opened(why="because"), AT, "unknown field"),
    "open: no eligible": (N1, OPEN, opened(eligible=None), AT, "'eligible'"),
    "open: no eligible keys": (N1, OPEN, opened(eligible=()), AT, "'eligible'"),
    "open: eligible unsorted": (N1, OPEN, opened(eligible=ELIGIBLE[::-1]), AT, "sorted"),
    "open: eligible not keys": (N1, OPEN, opened(eligible=(b"short",)), AT, "32-byte"),
    "open: eligible a device": (N1, OPEN, opened(eligible=eligible_with(pub(device(EAST)))), AT,
                                "not a member of a live cell"),
    "open: eligible a stranger": (N1, OPEN, opened(eligible=eligible_with(pub(99))), AT,
                                  "not a member of a live cell"),
    "open: no seats": (N1, OPEN, opened(seats=0), AT, "'seats'"),
    "open: more seats than eligible": (N1, OPEN, opened(seats=7), AT, "'seats'"),
    "open: seats not a number": (N1, OPEN, opened(seats="2"), AT, "'seats'"),
    "open: no cells": (N1, OPEN, opened(cells=None), AT, "'cells'"),
    "open: one cell": (N1, OPEN, opened(cells=(N,)), AT, "'cells'"),
    "open: cells unsorted": (N1, OPEN, opened(cells=tuple(sorted((N, S), reverse=True))), AT,
                             "sorted"),
    "open: cells not ids": (N1, OPEN, opened(cells=(b"a", b"b")), AT, "32-byte cell ids"),
    "open: unknown cell": (N1, OPEN, opened(cells=tuple(sorted((N, bytes(32))))), AT,
                           "not a live cell"),
    "open: commit deadline too soon": (N1, OPEN, opened(commit_by=AT + MINUTE - 1), AT,
                                       "'commit_by'"),
    "open: commit deadline past": (N1, OPEN, opened(commit_by=OPEN_AT), AT, "'commit_by'"),
    "open: commit deadline too far": (N1, OPEN, opened(commit_by=AT + YEAR_ISH), AT,
                                      "'commit_by'"),
    "open: commit deadline not a number": (N1, OPEN, opened(commit_by="soon"), AT, "'commit_by'"),
    "open: commit deadline a bool": (N1, OPEN, opened(commit_by=True), AT, "'commit_by'"),
    "open: reveal deadline too soon": (N1, OPEN, opened(reveal_by=COMMIT_BY + MINUTE - 1), AT,
                                       "'reveal_by'"),
    "open: reveal deadline too far": (N1, OPEN, opened(reveal_by=COMMIT_BY + YEAR_ISH), AT,
                                      "'reveal_by'"),
    "open: no reveal deadline": (N1, OPEN, opened(reveal_by=None), AT, "'reveal_by'"),
    "open: by a device": (device(NORTH), OPEN, opened(), AT, "act of a member"),
    "commit: no lot": (S1, COMMIT, {"hash": bytes(32)}, AT, "'lot'"),
    "commit: lot not bytes": (S1, COMMIT, {"lot": "x", "hash": SOUTH_HASH}, AT, "among the deps"),
    "commit: unknown lot": (S1, COMMIT, {"lot": bytes(32), "hash": SOUTH_HASH}, AT,
                            "among the deps"),
    "commit: lot is a note": (S1, COMMIT, {"lot": NOTE, "hash": SOUTH_HASH}, AT, "lot.open op"),
    "commit: lot is a commit": (S1, COMMIT, {"lot": COMMITTED, "hash": SOUTH_HASH}, AT,
                                "lot.open op"),
    "commit: no hash": (S1, COMMIT, {"lot": LOT}, AT, "'hash'"),
    "commit: short hash": (S1, COMMIT, {"lot": LOT, "hash": bytes(31)}, AT, "'hash'"),
    "commit: hash not bytes": (S1, COMMIT, {"lot": LOT, "hash": "h"}, AT, "'hash'"),
    "commit: extra field": (S1, COMMIT, {**SOUTH_COMMIT, "x": 1}, AT, "unknown field"),
    "commit: by a device": (device(SOUTH), COMMIT, SOUTH_COMMIT, AT, "act of a member"),
    "commit: not a participating cell": (E1, COMMIT, SOUTH_COMMIT, AT, "participating cell"),
    "commit: after the deadline": (S1, COMMIT, SOUTH_COMMIT, COMMIT_BY + 1,
                                   "commit deadline has passed"),
    "commit: a second one": (N2, COMMIT, {"lot": LOT, "hash": bytes(32)}, AT, "already committed"),
    "reveal: no commit": (N1, REVEAL, {"secret": secret(NORTH)}, REVEALING, "'commit'"),
    "reveal: unknown commit": (N1, REVEAL, {**NORTH_REVEAL, "commit": bytes(32)}, REVEALING,
                               "among the deps"),
    "reveal: commit is the open": (N1, REVEAL, {**NORTH_REVEAL, "commit": LOT}, REVEALING,
                                   "lot.commit op"),
    "reveal: no secret": (N1, REVEAL, {"commit": COMMITTED}, REVEALING, "'secret'"),
    "reveal: short secret": (N1, REVEAL, {**NORTH_REVEAL, "secret": bytes(16)}, REVEALING,
                             "'secret'"),
    "reveal: secret not bytes": (N1, REVEAL, {**NORTH_REVEAL, "secret": 7}, REVEALING,
                                 "'secret'"),
    "reveal: extra field": (N1, REVEAL, {**NORTH_REVEAL, "x": 1}, REVEALING, "unknown field"),
    "reveal: wrong secret": (N1, REVEAL, {**NORTH_REVEAL, "secret": secret(SOUTH)}, REVEALING,
                             "does not match"),
    "reveal: by another cell": (S1, REVEAL, NORTH_REVEAL, REVEALING, "committing cell"),
    "reveal: by a device": (device(NORTH), REVEAL, NORTH_REVEAL, REVEALING, "act of a member"),
    "reveal: at the commit deadline": (N1, REVEAL, NORTH_REVEAL, COMMIT_BY, "too early"),
    "reveal: after the reveal deadline": (N1, REVEAL, NORTH_REVEAL, REVEAL_BY + 1,
                                          "reveal deadline has passed"),
    "reveal: a second time": (N2, REVEAL, NORTH_REVEAL, REVEALING, "already revealed"),
    "close: no lot": (S1, CLOSE, {}, CLOSING, "'lot'"),
    "close: unknown lot": (S1, CLOSE, {"lot": bytes(32)}, CLOSING, "among the deps"),
    "close: lot is a commit": (S1, CLOSE, {"lot": COMMITTED}, CLOSING, "lot.open op"),
    "close: extra field": (S1, CLOSE, {"lot": LOT, "x": 1}, CLOSING, "unknown field"),
    "close: by a device": (device(SOUTH), CLOSE, {"lot": LOT}, CLOSING, "act of a member"),
    "close: not a participating cell": (E1, CLOSE, {"lot": LOT}, CLOSING, "participating cell"),
    "close: at the reveal deadline": (S1, CLOSE, {"lot": LOT}, REVEAL_BY, "too early"),
    "close: a second time": (S2, CLOSE, {"lot": LOT}, CLOSING, "already closed"),
}  # fmt: skip
FIRST: dict[str, Callable[[Ctx], Op]] = {
    "reveal: a second time": lambda c: reveal(c.replica, c.commit, NORTH, REVEALING - 1),
    "close: a second time": lambda c: close(c.replica, c.lot, SOUTH, CLOSING - 1),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_is_refused_with_a_reason_and_changes_nothing(name: str) -> None:
    who, kind, body, at, why = BAD[name]
    c = ctx()
    if name in FIRST:
        FIRST[name](c)  # the valid op the bad one repeats
    record = lots(c.replica)
    before = (c.replica.state_hash(), record.draws(LATER), record.result(c.lot.id))
    with pytest.raises(RuleViolation, match=why):
        c.replica.author(key(who), kind, c.fill(body), at)  # type: ignore[arg-type]
    assert (c.replica.state_hash(), record.draws(LATER), record.result(c.lot.id)) == before


def test_every_op_kind_has_bad_input_cases() -> None:
    assert {name.split(":")[0] for name in BAD} == {"open", "commit", "reveal", "close"}
    assert Lots.op_kinds == (OPEN, COMMIT, REVEAL, CLOSE)


# -- convergence -----------------------------------------------------------------


@dataclass(frozen=True)
class History:
    federation: bytes
    lot: Op
    ops: list[Op]


def often(draw: st.DrawFn) -> bool:
    """True three times in four (and when Hypothesis shrinks: 0 means yes)."""
    return draw(st.integers(0, 3)) != 3


def seldom(draw: st.DrawFn) -> bool:
    return draw(st.integers(0, 4)) == 4


@st.composite
def histories(draw: st.DrawFn) -> History:
    """Each cell, on one of 2-3 partitioned replicas, often commits (seldom a
    second member commits a different secret elsewhere), often reveals, often
    closes; replicas sync now and then and a member is seldom revoked. Ops a
    replica refuses (a revoked key, a cell that already acted) are not made."""
    origin, genesis = cells_federation(records=RECORDS)
    lot = origin.author(key(member(NORTH)), OPEN, open_body(genesis), OPEN_AT)  # type: ignore[arg-type]
    sides = [fork(origin, OPEN_AT) for _ in range(draw(st.integers(2, 3)))]
    pick = st.integers(0, len(sides) - 1)
    commits: dict[int, list[tuple[int, Op, int]]] = {}  # cell -> (side, commit, secret)
    now = COMMITTING

    def attempt(act: Callable[[], Op]) -> Op | None:
        nonlocal now
        now += draw(st.integers(1, 1000))
        if seldom(draw):
            merge(sides[draw(pick)], sides[draw(pick)], now_ms=now)
        try:
            return act()
        except RuleViolation:
            return None

    for who in (NORTH, SOUTH, EAST):
        for by, n in ((1, who), (2, who + 10)):
            if often(draw) if by == 1 else seldom(draw):
                at = draw(pick)
                made = attempt(lambda: commit(sides[at], genesis, lot, who, now, n=n, by=by))  # noqa: B023
                if made is not None:
                    commits.setdefault(who, []).append((at, made, n))
        if seldom(draw):
            revoked = {"key": pub(member(who, 2))}
            attempt(lambda: sides[draw(pick)].author(key(member(who)), "key.revoke", revoked, now))  # noqa: B023
    now = REVEALING
    for who, options in commits.items():
        at, target, n = options[draw(st.integers(0, len(options) - 1))]
        if often(draw):
            attempt(lambda: reveal(sides[at], target, who, now, n=n))  # noqa: B023
    now = CLOSING
    for who in (NORTH, SOUTH, EAST):
        if often(draw):
            attempt(lambda: close(sides[draw(pick)], lot, who, now, by=draw(st.integers(1, 2))))  # noqa: B023
    everything = {op.id: op for side in sides for op in side.graph.topological()}
    return History(genesis.federation, lot, list(everything.values()))


def outcome(replica: Replica, lot: Op) -> tuple[object, ...]:
    record = lots(replica)
    return (
        replica.state_hash(),
        tuple(state(replica, lot, now) for now in (COMMITTING, REVEALING, CLOSING, LATER)),
        record.draws(LATER),
        record.result(lot.id),
        record.counted_reveals(lot.id),
    )


def deliver(history: History, order: list[Op]) -> Replica:
    replica = Replica(history.federation, records=RECORDS)
    for op in order:
        replica.receive(op, LATER)
    return replica


@given(data=st.data(), history=histories())
def test_any_order_with_duplicates_gives_one_draw(data: st.DataObject, history: History) -> None:
    reference = deliver(history, sorted(history.ops, key=lambda op: (op.ts, op.id)))
    assert len(reference.graph) == len(history.ops)
    expected = outcome(reference, history.lot)
    duplicates = data.draw(st.lists(st.sampled_from(history.ops), max_size=5))
    order = data.draw(st.permutations(history.ops + duplicates))
    assert outcome(deliver(history, order), history.lot) == expected
    decided = state(reference, history.lot)
    if decided.phase is Phase.CLOSED:
        pairs = reveals_from_ops(reference, history.lot, decided.counted)
        assert recompute_draw(history.lot.id, ELIGIBLE, 2, pairs) == decided.result


def test_histories_do_reach_every_outcome() -> None:
    """Guard against a generator that never closes a draw, never fails one, or
    never builds concurrent closes (the property would then prove little)."""
    seen: set[str] = set()

    # A fixed sample (derandomized): a guard that passes only by luck would be flaky.
    @settings(derandomize=True, max_examples=200)
    @given(history=histories())
    def look(history: History) -> None:
        replica = deliver(history, history.ops)
        decided = state(replica, history.lot)
        seen.add(decided.phase.value)
        if decided.conflicting:
            seen.add("conflict")
        if decided.phase is Phase.CLOSED and decided.excluded:
            seen.add("excluded")
        closes = [op for op in replica.graph.topological() if op.kind == CLOSE]
        if any(replica.graph.concurrent(a.id, b.id) for a in closes for b in closes):
            seen.add("concurrent closes")

    look()
    assert {"closed", "failed", "awaiting close", "conflict", "excluded",
            "concurrent closes"} <= seen  # fmt: skip
