"""Authority: founding cells, key grants and revocations, admission, remove wins."""

from __future__ import annotations

import pytest
from helpers import T0, cell, cells_federation, device, fork, key, member, merge, ms, pub, raw_op
from hypothesis import given
from hypothesis import strategies as st

from archipel.crdt import Authority, Notes, Replica, RuleViolation

NORTH, SOUTH, EAST = 0, 1, 2


def note(replica: Replica, who: int, text: str, at: int) -> bytes:
    return replica.author(key(who), "note", {"text": text}, T0 + at).id


def texts(replica: Replica) -> list[str]:
    return [n.text for n in replica.record(Notes).all()]


def test_founding_cells_and_their_keys() -> None:
    replica, genesis = cells_federation()
    authority = replica.authority
    assert [c.name for c in authority.cells()] == ["North", "South", "East"]
    assert authority.keys_of(cell(genesis, NORTH)) == sorted(
        [pub(member(NORTH, 1)), pub(member(NORTH, 2)), pub(device(NORTH))]
    )
    assert authority.keys_of(cell(genesis, SOUTH), role="device") == [pub(device(SOUTH))]
    note(replica, member(SOUTH), "members write", 1)
    note(replica, device(EAST), "devices write notes too", 2)
    with pytest.raises(RuleViolation, match="not authorised"):
        note(replica, 99, "outsider", 3)


def test_a_member_adds_a_key_that_can_then_write() -> None:
    replica, _ = cells_federation()
    replica.author(key(member(NORTH)), "key.add", {"key": pub(50), "role": "member"}, T0 + 1)
    note(replica, 50, "new member here", 2)
    assert replica.authority.cell_of(pub(50)) == replica.authority.cell_of(pub(member(NORTH)))
    with pytest.raises(RuleViolation, match="already granted"):
        replica.author(key(member(SOUTH)), "key.add", {"key": pub(50), "role": "member"}, T0 + 3)
    with pytest.raises(RuleViolation, match="act of a member"):
        replica.author(key(device(NORTH)), "key.add", {"key": pub(51), "role": "device"}, T0 + 4)


def test_a_keys_first_op_must_have_its_grant_in_its_causal_past() -> None:
    replica, genesis = cells_federation()
    replica.author(key(member(NORTH)), "key.add", {"key": pub(50), "role": "member"}, T0 + 1)
    blind = raw_op(50, genesis, seq=1, deps=[genesis.id], ts=ms(5))  # never saw its grant
    with pytest.raises(RuleViolation, match="grant is not in the op's causal past"):
        replica.receive(blind, T0 + 5)


def test_a_revoked_key_cannot_sign_once_it_has_seen_the_revocation() -> None:
    replica, _ = cells_federation()
    revoke = {"key": pub(member(NORTH, 2))}
    replica.author(key(member(NORTH, 1)), "key.revoke", revoke, T0 + 1)
    with pytest.raises(RuleViolation, match="revoked"):
        note(replica, member(NORTH, 2), "still here?", 2)
    assert replica.authority.is_revoked(pub(member(NORTH, 2)))
    assert pub(member(NORTH, 2)) not in replica.authority.keys_of(replica.authority.cells()[0].id)


def test_only_own_cell_keys_can_be_revoked() -> None:
    replica, _ = cells_federation()
    with pytest.raises(RuleViolation, match="own cell"):
        replica.author(key(member(SOUTH)), "key.revoke", {"key": pub(member(NORTH))}, T0 + 1)


def test_partitioned_member_keeps_writing_after_revocation_remove_wins() -> None:
    """The cell revokes a member on one side; the member, cut off, keeps
    writing and even adds a key. After the heal every replica accepts those ops
    (valid in their causal past) but none of them counts."""
    cell_side, _ = cells_federation()
    note(cell_side, member(NORTH, 2), "before the split", 1)
    member_side = fork(cell_side)
    cell_side.author(key(member(NORTH, 1)), "key.revoke", {"key": pub(member(NORTH, 2))}, T0 + 10)
    lost = note(member_side, member(NORTH, 2), "written while cut off", 11)
    member_side.author(
        key(member(NORTH, 2)), "key.add", {"key": pub(60), "role": "member"}, T0 + 12
    )
    accomplice = note(member_side, 60, "added by a revoked member", 13)
    note(cell_side, member(SOUTH), "meanwhile in the south", 14)
    merge(cell_side, member_side)
    for replica in (cell_side, member_side):
        assert lost in replica.graph
        assert accomplice in replica.graph
        assert not replica.authority.counts(lost)
        assert not replica.authority.counts(accomplice)
        assert texts(replica) == ["before the split", "meanwhile in the south"]
    # Once the revocation is in its past, the revoked member cannot sign at all.
    with pytest.raises(RuleViolation, match="revoked"):
        note(member_side, member(NORTH, 2), "after the heal", 20)


def test_two_members_revoking_each_other_are_both_revoked() -> None:
    one, _ = cells_federation()
    two = fork(one)
    one.author(key(member(NORTH, 1)), "key.revoke", {"key": pub(member(NORTH, 2))}, T0 + 1)
    two.author(key(member(NORTH, 2)), "key.revoke", {"key": pub(member(NORTH, 1))}, T0 + 1)
    merge(one, two)
    for replica in (one, two):
        assert replica.authority.is_revoked(pub(member(NORTH, 1)))
        assert replica.authority.is_revoked(pub(member(NORTH, 2)))


def test_a_key_granted_to_two_cells_concurrently_counts_nowhere() -> None:
    north, _ = cells_federation()
    south = fork(north)
    north.author(key(member(NORTH)), "key.add", {"key": pub(70), "role": "member"}, T0 + 1)
    south.author(key(member(SOUTH)), "key.add", {"key": pub(70), "role": "member"}, T0 + 1)
    early = note(north, 70, "hello from north", 2)
    merge(north, south)
    assert not north.authority.counts(early)
    assert north.authority.cell_of(pub(70)) is None
    with pytest.raises(RuleViolation, match="not unambiguously"):
        note(north, 70, "which cell am I?", 3)


def admit(replica: Replica, by: int, at: int) -> bytes:
    body = {"name": "Harbour", "members": (pub(80), pub(81)), "devices": (pub(89),)}
    return replica.author(key(by), "cell.admit", body, T0 + at).id


def test_admission_needs_the_backing_of_k_cells() -> None:
    replica, _ = cells_federation(admission_endorsements=2)
    admission = admit(replica, member(NORTH), 1)
    with pytest.raises(RuleViolation, match="not admitted yet"):
        note(replica, 80, "too early", 2)
    with pytest.raises(RuleViolation, match="not admitted yet"):
        replica.author(key(80), "cell.endorse", {"admission": admission}, T0 + 3)
    replica.author(key(member(SOUTH)), "cell.endorse", {"admission": admission}, T0 + 4)
    note(replica, 80, "we are in", 5)
    with pytest.raises(RuleViolation, match="own admission"):
        replica.author(key(80), "cell.endorse", {"admission": admission}, T0 + 6)
    assert "Harbour" in [c.name for c in replica.authority.cells()]


def test_admission_with_k_one_is_immediate() -> None:
    replica, _ = cells_federation(admission_endorsements=1)
    admit(replica, member(EAST), 1)
    note(replica, 81, "straight in", 2)


def test_endorsing_something_else_is_refused() -> None:
    replica, genesis = cells_federation()
    other = note(replica, member(NORTH), "not an admission", 1)
    with pytest.raises(RuleViolation, match="cell.admit"):
        replica.author(key(member(SOUTH)), "cell.endorse", {"admission": other}, T0 + 2)
    stray = raw_op(member(SOUTH), genesis, seq=1, deps=[genesis.id], ts=ms(3), kind="cell.endorse",
                   body={"admission": other})  # fmt: skip
    with pytest.raises(RuleViolation, match="among the deps"):
        replica.receive(stray, T0 + 3)


@pytest.mark.parametrize(
    ("kind", "body", "why"),
    [
        ("cell.admit", {"name": "X"}, "members"),
        ("cell.admit", {"name": "", "members": (b"\x01" * 32,)}, "name"),
        ("cell.admit", {"name": "X", "members": (b"\x01" * 32,), "colour": "red"}, "unknown field"),
        ("cell.admit", {"name": "X", "members": (b"\x02" * 32, b"\x01" * 32)}, "sorted"),
        ("cell.admit", {"name": "X", "members": ("not a key",)}, "keys"),
        ("key.add", {"key": b"\x01" * 32}, "role"),
        ("key.add", {"key": b"\x01" * 32, "role": "boss"}, "role"),
        ("key.add", {"key": b"\x01" * 31, "role": "member"}, "32 bytes"),
        ("key.add", {"role": "member"}, "key"),
        ("key.revoke", {}, "key"),
        ("key.revoke", {"key": b"\x01" * 32}, "own cell"),
        ("cell.endorse", {"admission": b"\x01" * 32}, "deps"),
        ("cell.endorse", {"admission": 7}, "deps"),
    ],
)
def test_bad_authority_ops_are_refused_and_change_nothing(
    kind: str, body: dict[str, object], why: str
) -> None:
    replica, _ = cells_federation()
    before = (replica.state_hash(), replica.authority.keys_of(replica.authority.cells()[0].id))
    with pytest.raises(RuleViolation, match=why):
        replica.author(key(member(NORTH)), kind, body, T0 + 1)  # type: ignore[arg-type]
    assert (
        replica.state_hash(),
        replica.authority.keys_of(replica.authority.cells()[0].id),
    ) == before


# -- convergence ----------------------------------------------------------------

ACTORS = [member(c, n) for c in (NORTH, SOUTH, EAST) for n in (1, 2)] + [device(NORTH)]


@st.composite
def authority_histories(draw: st.DrawFn) -> list[object]:
    base, _ = cells_federation()
    sides = [base, fork(base)]
    fresh_keys = iter(range(100, 200))
    now = 0
    for _ in range(draw(st.integers(1, 14))):
        now += 1
        side = sides[draw(st.integers(0, 1))]
        who = draw(st.sampled_from(ACTORS))
        action = draw(st.sampled_from(["note", "note", "add", "revoke", "sync"]))
        try:
            if action == "note":
                note(side, who, f"{who}@{now}", now)
            elif action == "add":
                body = {"key": pub(next(fresh_keys)), "role": "member"}
                side.author(key(who), "key.add", body, T0 + now)
            elif action == "revoke":
                target = draw(st.sampled_from(ACTORS))
                side.author(key(who), "key.revoke", {"key": pub(target)}, T0 + now)
            else:
                merge(*sides, now_ms=T0 + now)
        except RuleViolation:
            pass  # not allowed at this point: the history simply goes on
    return [op for side in sides for op in side.graph.topological()]


@given(data=st.data(), ops=authority_histories())
def test_authority_converges_in_any_order(data: st.DataObject, ops: list[object]) -> None:
    results = []
    for _ in range(2):
        order = data.draw(st.permutations(ops))
        replica = Replica(order[0].federation)  # type: ignore[attr-defined]
        for op in order:
            replica.receive(op, T0 + 10**6)  # type: ignore[arg-type]
        authority = replica.authority
        results.append(
            (
                replica.state_hash(),
                texts(replica),
                [(c.id, authority.keys_of(c.id)) for c in authority.cells()],
                sorted(op_id for op_id in replica.graph._ops if authority.counts(op_id)),
            )
        )
    assert results[0] == results[1]


def test_counting_is_cheap_for_untouched_keys() -> None:
    """Keys no removal touches answer from a cache: no graph search."""
    replica, _ = cells_federation()
    ids = [note(replica, member(SOUTH), f"n{i}", i + 1) for i in range(50)]
    authority: Authority = replica.authority
    calls = 0
    original = replica.graph.precedes

    def counting(*args: object) -> bool:
        nonlocal calls
        calls += 1
        return original(*args)  # type: ignore[arg-type]

    replica.graph.precedes = counting  # type: ignore[method-assign]
    assert all(authority.counts(i) for i in ids)
    note(replica, member(SOUTH), "one more", 99)
    assert calls == 0
