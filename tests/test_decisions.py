"""Decisions: proposals, votes in circles, seals anyone can recount."""

from __future__ import annotations

import pytest
from helpers import T0, cell, cells_federation, device, fork, key, member, merge, pub
from hypothesis import given
from hypothesis import strategies as st

from archipel.crdt import Notes, Replica, RuleViolation
from archipel.crdt.decisions import Decisions

NORTH, SOUTH, EAST = 0, 1, 2
DAY = 24 * 3600 * 1000
VOTERS = [member(c, n) for c in (NORTH, SOUTH, EAST) for n in (1, 2)]
CIRCLES = (
    {"name": "river", "members": sorted(pub(v) for v in VOTERS[:3])},
    {"name": "hill", "members": sorted(pub(v) for v in VOTERS[3:])},
)


def circle_of(voter: int) -> str:
    return "river" if VOTERS.index(voter) < 3 else "hill"


def propose(replica: Replica, at: int = 1, **extra: object) -> bytes:
    body = {
        "title": "Buy a shared van",
        "text": "For food runs.",
        "options": ("yes", "no", "later"),
        "ballot": "single",
        "circles": CIRCLES,
        "quorum": 50,
        **extra,
    }
    return replica.author(key(member(NORTH)), "proposal.open", body, T0 + at).id  # type: ignore[arg-type]


def vote(replica: Replica, proposal: bytes, voter: int, choices: tuple[int, ...], at: int,
         version: bytes | None = None) -> bytes:  # fmt: skip
    body = {
        "proposal": proposal,
        "version": version or proposal,
        "choices": choices,
        "reasoning": f"reasons of {voter}",
        "circle": circle_of(voter),
    }
    return replica.author(key(voter), "vote.cast", body, T0 + at).id  # type: ignore[arg-type]


def seal(replica: Replica, proposal: bytes, at: int = 3 * DAY, by: int = member(EAST)) -> bytes:
    return replica.author(key(by), "proposal.seal", {"proposal": proposal}, T0 + at).id


def decisions(replica: Replica) -> Decisions:
    return replica.record(Decisions)


def test_a_proposal_is_voted_sealed_and_recounted() -> None:
    replica, _ = cells_federation()
    p = propose(replica)
    for i, (voter, choice) in enumerate(zip(VOTERS[:4], (0, 0, 1, 0), strict=True)):
        vote(replica, p, voter, (choice,), 10 + i)
    provisional = decisions(replica).tally(p, now_ms=T0 + 100)
    assert provisional.status == "open"
    assert not provisional.final
    assert not provisional.passed
    s = seal(replica, p)
    result = decisions(replica).tally(p)
    assert result.status == "sealed"
    assert result.seals == (s,)
    assert result.counts == (3, 1, 0)
    assert result.winners == (0,)
    assert result.voters == 4
    assert result.eligible == 6
    assert result.quorum_met
    assert result.passed
    assert [b.reasoning for b in result.circles["hill"]] == [f"reasons of {VOTERS[3]}"]
    assert len(result.circles["river"]) == 3
    # Anyone recounts the same from the ops alone.
    again = Replica(replica.federation)
    for op in reversed(list(replica.graph.topological())):
        again.receive(op, T0 + 4 * DAY)
    assert decisions(again).tally(p) == result


def test_a_members_latest_vote_in_the_window_counts() -> None:
    replica, _ = cells_federation()
    p = propose(replica)
    vote(replica, p, VOTERS[0], (0,), 10)
    vote(replica, p, VOTERS[0], (1,), 20)
    seal(replica, p)
    assert decisions(replica).tally(p).counts == (0, 1, 0)


def test_quorum_and_ties() -> None:
    replica, _ = cells_federation()
    p = propose(replica)
    vote(replica, p, VOTERS[0], (0,), 10)
    vote(replica, p, VOTERS[1], (1,), 11)
    seal(replica, p)
    result = decisions(replica).tally(p)
    assert result.winners == (0, 1)
    assert not result.quorum_met  # 2 of 6 < 50 %
    assert not result.passed


def test_approval_ballots() -> None:
    replica, _ = cells_federation()
    p = propose(replica, ballot="approval", quorum=0)
    vote(replica, p, VOTERS[0], (0, 2), 10)
    vote(replica, p, VOTERS[1], (2,), 11)
    vote(replica, p, VOTERS[2], (), 12)
    seal(replica, p)
    result = decisions(replica).tally(p)
    assert result.counts == (1, 0, 2)
    assert result.winners == (2,)
    with pytest.raises(RuleViolation, match="sorted and distinct"):
        later = propose(replica, at=3 * DAY + 5, ballot="approval")
        vote(replica, later, VOTERS[0], (2, 0), 3 * DAY + 20)


def test_two_concurrent_seals_resolve_to_one_result_everywhere() -> None:
    """Each side seals with a different cut: one side saw a vote the other did
    not. After the heal, every replica counts the union of the two cuts."""
    left, _ = cells_federation()
    p = propose(left)
    vote(left, p, VOTERS[0], (0,), 10)
    right = fork(left)
    vote(right, p, VOTERS[1], (1,), 11)  # only the right side sees this vote before sealing
    s_left = seal(left, p, at=3 * DAY, by=member(EAST, 1))
    s_right = seal(right, p, at=3 * DAY, by=member(EAST, 2))
    merge(left, right)
    results = [decisions(r).tally(p) for r in (left, right)]
    assert results[0] == results[1]
    assert set(results[0].seals) == {s_left, s_right}
    assert results[0].counts == (1, 1, 0)
    assert results[0].late == ()


def test_a_backdated_seal_cannot_shut_out_votes_an_honest_seal_saw() -> None:
    """A member signs a seal dated right at the window's close, with deps from
    before the last votes. An honest seal made concurrently keeps them in."""
    honest, _ = cells_federation()
    p = propose(honest)
    vote(honest, p, VOTERS[0], (0,), 10)
    cheat = fork(honest)  # the cheater's view stops here
    for i, voter in enumerate(VOTERS[1:4]):
        vote(honest, p, voter, (1,), 2 * DAY - 100 + i)
    backdated = seal(cheat, p, at=2 * DAY + 2, by=member(EAST, 1))  # the earliest allowed
    fair = seal(honest, p, at=3 * DAY, by=member(EAST, 2))
    merge(honest, cheat)
    result = decisions(honest).tally(p)
    assert result.seals == (backdated, fair)
    assert result.counts == (1, 3, 0)


def test_a_vote_arriving_after_the_seal_is_late_not_counted() -> None:
    sealer, _ = cells_federation()
    p = propose(sealer)
    vote(sealer, p, VOTERS[0], (0,), 10)
    voter_side = fork(sealer)
    late = vote(voter_side, p, VOTERS[1], (1,), 2 * DAY - 1)  # inside the window, but cut off
    s = seal(sealer, p)
    merge(sealer, voter_side)
    result = decisions(sealer).tally(p)
    assert result.seals == (s,)
    assert result.counts == (1, 0, 0)
    assert result.late == (late,)
    with pytest.raises(RuleViolation, match="already sealed|window has closed"):
        vote(sealer, p, VOTERS[2], (1,), 3 * DAY + 10)


def test_revocation_concurrent_with_a_vote_discounts_the_vote() -> None:
    cell_side, _ = cells_federation()
    p = propose(cell_side)
    voter_side = fork(cell_side)
    cast = vote(voter_side, p, member(NORTH, 2), (1,), 10)
    vote(voter_side, p, member(SOUTH, 1), (0,), 11)
    revoke = {"key": pub(member(NORTH, 2))}
    cell_side.author(key(member(NORTH, 1)), "key.revoke", revoke, T0 + 10)
    merge(cell_side, voter_side)
    seal(cell_side, p)
    merge(cell_side, voter_side)
    for replica in (cell_side, voter_side):
        result = decisions(replica).tally(p)
        assert result.counts == (1, 0, 0)
        assert (cast, "the voter's key or cell was removed concurrently") in result.void


def test_amendments_before_the_first_vote_only() -> None:
    replica, _ = cells_federation()
    p = propose(replica)
    amendment = replica.author(
        key(member(NORTH)), "proposal.amend", {"proposal": p, "options": ("yes", "no")}, T0 + 5
    ).id
    with pytest.raises(RuleViolation, match="latest text"):
        vote(replica, p, VOTERS[1], (0,), 10)  # names the superseded text
    vote(replica, p, VOTERS[1], (1,), 11, version=amendment)
    with pytest.raises(RuleViolation, match="no longer change"):
        replica.author(key(member(NORTH)), "proposal.amend", {"proposal": p, "title": "x"}, T0 + 12)
    with pytest.raises(RuleViolation, match="only the proposal's author"):
        replica.author(key(member(SOUTH)), "proposal.amend", {"proposal": p, "title": "y"}, T0 + 13)
    seal(replica, p)
    result = decisions(replica).tally(p)
    assert result.version.options == ("yes", "no")
    assert result.counts == (0, 1)


def test_a_vote_concurrent_with_an_amendment_is_void() -> None:
    author_side, _ = cells_federation()
    p = propose(author_side)
    voter_side = fork(author_side)
    early = vote(voter_side, p, VOTERS[3], (2,), 10)
    author_side.author(key(member(NORTH)), "proposal.amend", {"proposal": p, "text": "v2"}, T0 + 10)
    merge(author_side, voter_side)
    seal(author_side, p)
    result = decisions(author_side).tally(p)
    assert result.counts == (0, 0, 0)
    assert result.void == ((early, "cast on a text amended since"),)


def test_withdrawal() -> None:
    replica, _ = cells_federation()
    p = propose(replica)
    replica.author(key(member(NORTH)), "proposal.withdraw", {"proposal": p}, T0 + 5)
    with pytest.raises(RuleViolation, match="withdrawn"):
        vote(replica, p, VOTERS[0], (0,), 10)
    with pytest.raises(RuleViolation, match="withdrawn"):
        seal(replica, p)
    assert decisions(replica).tally(p).status == "withdrawn"
    assert decisions(replica).open_at(T0 + 10) == []


def test_window_rules() -> None:
    replica, _ = cells_federation()
    p = propose(replica, window_ms=DAY)
    with pytest.raises(RuleViolation, match="still open"):
        seal(replica, p, at=DAY - 5)
    with pytest.raises(RuleViolation, match="window has closed"):
        vote(replica, p, VOTERS[0], (0,), DAY + 5)
    seal(replica, p, at=DAY + 6)
    with pytest.raises(RuleViolation, match="already sealed"):
        seal(replica, p, at=DAY + 7, by=member(SOUTH))


def test_who_may_vote() -> None:
    replica, _ = cells_federation()
    p = propose(replica)
    with pytest.raises(RuleViolation, match="does not sit in circle"):
        body = {"proposal": p, "version": p, "choices": (0,), "reasoning": "", "circle": "hill"}
        replica.author(key(VOTERS[0]), "vote.cast", body, T0 + 10)  # type: ignore[arg-type]
    with pytest.raises(RuleViolation, match="act of a member"):
        body = {"proposal": p, "version": p, "choices": (0,), "reasoning": "", "circle": "river"}
        replica.author(key(19), "vote.cast", body, T0 + 10)  # type: ignore[arg-type]


def test_a_sealed_expulsion_removes_a_cell_and_remove_wins() -> None:
    federation, genesis = cells_federation()
    east = cell(genesis, EAST)
    p = propose(federation, options=("yes", "no"), action={"expel": east}, quorum=50)
    east_side = fork(federation)
    for i, voter in enumerate(VOTERS[:4]):
        vote(federation, p, voter, (0,), 10 + i)
    s = seal(federation, p, by=member(NORTH))
    concurrent = east_side.author(key(member(EAST)), "note", {"text": "still here"}, T0 + 3 * DAY)
    merge(federation, east_side)
    for replica in (federation, east_side):
        assert list(replica.authority.expulsions(east)) == [s]
        assert "East" not in [c.name for c in replica.authority.cells()]
        assert not replica.authority.counts(concurrent.id)
        assert "still here" not in [n.text for n in replica.record(Notes).all()]
    with pytest.raises(RuleViolation, match="expelled"):
        federation.author(key(member(EAST)), "note", {"text": "after"}, T0 + 4 * DAY)


def test_a_failed_expulsion_expels_nobody() -> None:
    replica, genesis = cells_federation()
    east = cell(genesis, EAST)
    p = propose(replica, options=("yes", "no"), action={"expel": east})
    for i, voter in enumerate(VOTERS[:4]):
        vote(replica, p, voter, (1,), 10 + i)
    seal(replica, p)
    assert list(replica.authority.expulsions(east)) == []
    replica.author(key(member(EAST)), "note", {"text": "we stay"}, T0 + 4 * DAY)


YES_NO: dict[str, object] = {"options": ("yes", "no")}
MANDATE: dict[str, object] = YES_NO | {
    "action": {"mandate": pub(member(EAST)), "acts": ("negotiate", "sign")}
}


def test_a_mandate_proposal_passes_when_yes_beats_no() -> None:
    replica, genesis = cells_federation()
    p = propose(replica, **MANDATE)
    proposal = decisions(replica).proposal(p)
    assert proposal is not None
    assert (proposal.delegate, proposal.acts) == (pub(member(EAST)), ("negotiate", "sign"))
    # The circles seat North, South and East members: all three decide.
    assert decisions(replica).deciding_cells(p) == tuple(sorted(cell(genesis, i) for i in range(3)))
    with pytest.raises(RuleViolation, match="not sealed"):
        decisions(replica).mandate_terms(p)
    for i, (voter, choice) in enumerate(zip(VOTERS[:4], (0, 0, 1, 1), strict=True)):
        vote(replica, p, voter, (choice,), 10 + i)
    tied = seal(replica, p)
    assert decisions(replica).tally(p).counts == (2, 2)
    assert not decisions(replica).tally(p).passed
    with pytest.raises(RuleViolation, match="did not pass"):
        decisions(replica).mandate_terms(p)
    q = propose(replica, at=4 * DAY, **MANDATE)
    for i, voter in enumerate(VOTERS[:4]):
        vote(replica, q, voter, (0,) if i else (1,), 4 * DAY + 10 + i)
    seal(replica, q, at=7 * DAY)
    terms = decisions(replica).mandate_terms(q)
    assert (terms.delegate, terms.instructions, len(terms.cells)) == (
        pub(member(EAST)), "For food runs.", 3,
    )  # fmt: skip
    assert tied not in decisions(replica).seals(q)
    with pytest.raises(RuleViolation, match="not a mandate proposal"):
        decisions(replica).mandate_terms(propose(replica, at=7 * DAY + 1))


def test_a_mandate_proposal_keeps_its_options_and_a_text() -> None:
    replica, _ = cells_federation()
    p = propose(replica, **MANDATE)
    author = key(member(NORTH))
    with pytest.raises(RuleViolation, match="cannot change"):
        replica.author(author, "proposal.amend", {"proposal": p, "options": ("a", "b")}, T0 + 2)
    with pytest.raises(RuleViolation, match="needs a 'text'"):
        replica.author(author, "proposal.amend", {"proposal": p, "text": ""}, T0 + 3)
    amended = {"proposal": p, "text": "Sign below 900"}
    replica.author(author, "proposal.amend", amended, T0 + 4)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"title": ""}, "title"),
        ({"title": None}, "title"),
        ({"options": ("only",)}, "options"),
        ({"options": ("a", 2)}, "options"),
        ({"ballot": "ranked"}, "ballot"),
        ({"circles": ()}, "circles"),
        ({"circles": ({"name": "x", "members": (pub(VOTERS[0]), pub(VOTERS[1]))},)}, "members"),
        (
            {
                "circles": (
                    {
                        "name": "x",
                        "members": tuple(sorted([pub(99), pub(VOTERS[0]), pub(VOTERS[1])])),
                    },
                )
            },
            "not a member",
        ),
        ({"circles": (CIRCLES[0], {**CIRCLES[0], "name": "again"})}, "one only"),
        ({"window_ms": 10}, "window_ms"),
        ({"quorum": 101}, "quorum"),
        ({"quorum": True}, "quorum"),
        ({"colour": "red"}, "unknown field"),
        ({"action": {"expel": b"\x00" * 32}}, "not a live cell"),
        ({"action": {"expel": b"\x00" * 3}}, "32 bytes"),
        ({"action": {"dissolve": b"\x00" * 32}}, "unknown field"),
        ({"action": {}}, "an action is"),
        ({"action": "mandate"}, "'action' must be a map"),
        ({"action": {"mandate": pub(member(EAST)), "acts": ("sign",)}}, "ballot on"),
        (YES_NO | {"action": {"mandate": pub(member(EAST))}}, "'acts'"),
        (YES_NO | {"action": {"mandate": pub(member(EAST)), "acts": ()}}, "'acts'"),
        (YES_NO | {"action": {"mandate": pub(member(EAST)), "acts": ("Sign",)}}, "'acts'"),
        (YES_NO | {"action": {"mandate": pub(member(EAST)), "acts": ("a", "a")}}, "repeat"),
        (YES_NO | {"action": {"mandate": pub(99), "acts": ("sign",)}}, "must be a member"),
        (YES_NO | {"action": {"mandate": pub(device(EAST)), "acts": ("sign",)}}, "a member"),
        (YES_NO | {"action": {"mandate": b"\x01" * 3, "acts": ("sign",)}}, "32 bytes"),
        (YES_NO | {"action": {"mandate": pub(member(EAST)), "acts": ("s",), "x": 1}}, "unknown"),
        (
            YES_NO | {"action": {"expel": b"\x00" * 32, "mandate": pub(member(EAST))}},
            "unknown field",
        ),
        (MANDATE | {"text": ""}, "needs a 'text'"),
        ({**MANDATE, "text": None}, "'text' must be a string"),
        (MANDATE | {"ballot": "approval"}, "ballot on"),
    ],
)
def test_bad_proposals_are_refused_and_change_nothing(change: dict[str, object], why: str) -> None:
    replica, _ = cells_federation()
    before = (replica.state_hash(), decisions(replica).proposals())
    with pytest.raises(RuleViolation, match=why):
        propose(replica, **change)
    assert (replica.state_hash(), decisions(replica).proposals()) == before


@pytest.mark.parametrize(
    ("kind", "body", "why"),
    [
        ("vote.cast", {"choices": (0,), "reasoning": "", "circle": "river"}, "proposal"),
        ("vote.cast", {"choices": (7,), "reasoning": "", "circle": "river"}, "option numbers"),
        ("vote.cast", {"choices": (0, 1), "reasoning": "", "circle": "river"}, "exactly one"),
        ("vote.cast", {"choices": 0, "reasoning": "", "circle": "river"}, "option numbers"),
        ("vote.cast", {"choices": (0,), "reasoning": 5, "circle": "river"}, "reasoning"),
        ("vote.cast", {"choices": (0,), "circle": "river"}, "reasoning"),
        ("vote.cast", {"choices": (0,), "reasoning": "", "circle": "river", "x": 1}, "unknown"),
        ("proposal.seal", {"when": 1}, "unknown|deps|proposal"),
        ("proposal.amend", {}, "changes the title"),
        ("proposal.withdraw", {"reason": "x"}, "unknown"),
    ],
)
def test_bad_votes_and_seals_are_refused(kind: str, body: dict[str, object], why: str) -> None:
    replica, _ = cells_federation()
    p = propose(replica)
    full = {"proposal": p, **({"version": p} if kind == "vote.cast" else {}), **body}
    if why == "proposal":
        full = body
    before = (replica.state_hash(), decisions(replica).tally(p, now_ms=T0))
    with pytest.raises(RuleViolation, match=why):
        replica.author(key(VOTERS[0]), kind, full, T0 + 10)  # type: ignore[arg-type]
    assert (replica.state_hash(), decisions(replica).tally(p, now_ms=T0)) == before


def test_an_unknown_proposal_reference_is_refused() -> None:
    replica, _ = cells_federation()
    not_a_proposal = replica.author(key(VOTERS[0]), "note", {"text": "hi"}, T0 + 1).id
    with pytest.raises(RuleViolation, match="must name a proposal"):
        seal(replica, not_a_proposal)


# -- convergence ----------------------------------------------------------------


@st.composite
def voting_histories(draw: st.DrawFn) -> tuple[bytes, list[object]]:
    base, _ = cells_federation()
    p = propose(base)
    sides = [base, fork(base)]
    at = 10
    for _ in range(draw(st.integers(1, 12))):
        at += draw(st.integers(1, DAY // 4))
        side = sides[draw(st.integers(0, 1))]
        action = draw(st.sampled_from(["vote", "vote", "vote", "seal", "sync", "revoke"]))
        voter = draw(st.sampled_from(VOTERS))
        try:
            if action == "vote":
                vote(side, p, voter, (draw(st.integers(0, 2)),), at)
            elif action == "seal":
                at = max(at, 2 * DAY + 1)  # the node's clock moves on; it never goes back
                seal(side, p, at=at, by=voter)
            elif action == "revoke":
                side.author(key(member(SOUTH, 1)), "key.revoke", {"key": pub(member(SOUTH, 2))},
                            T0 + at)  # fmt: skip
            else:
                merge(*sides, now_ms=T0 + at)
        except RuleViolation:
            pass
    return p, [op for side in sides for op in side.graph.topological()]


@given(data=st.data(), history=voting_histories())
def test_tallies_converge_in_any_order(
    data: st.DataObject, history: tuple[bytes, list[object]]
) -> None:
    proposal, ops = history
    tallies = []
    for _ in range(2):
        order = data.draw(st.permutations(ops))
        replica = Replica(order[0].federation)  # type: ignore[attr-defined]
        for op in order:
            replica.receive(op, T0 + 10 * DAY)  # type: ignore[arg-type]
        tallies.append((replica.state_hash(), decisions(replica).tally(proposal, now_ms=T0 + DAY)))
    assert tallies[0] == tallies[1]
