"""Mutual aid: offers, requests, claims, pledges, fulfilments, withdrawals, and
the allocation rule that no merge can leave an offer over-allocated."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from helpers import (
    T0,
    assert_order_independent,
    cell,
    cells_federation,
    deliver,
    device,
    key,
    member,
    pub,
    replica_of,
    sync,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from archipel.crdt import InvalidOp, Op, Replica, RuleViolation
from archipel.crdt.aid import (
    ALLOCATED,
    CANCELLED,
    FULFILLED,
    MAX_QUANTITY,
    PLEDGED,
    WAITLISTED,
    Aid,
)
from archipel.crdt.genesis import DAY_MS

NORTH, SOUTH, EAST = 0, 1, 2


def aid(replica: Replica) -> Aid:
    return replica.record(Aid)


def offer(
    replica: Replica, who: int = member(NORTH), *, quantity: int = 1, until: int = T0 + DAY_MS,
    now: int = T0 + 10,
) -> Op:  # fmt: skip
    body = {"what": "bread", "quantity": quantity, "unit": "loaf", "location": "Canal St kitchen",
            "until": until}  # fmt: skip
    return replica.author(key(who), "aid.offer", body, now)


def request(
    replica: Replica, who: int = member(SOUTH), *, quantity: int = 5,
    needed_by: int = T0 + DAY_MS, now: int = T0 + 10,
) -> Op:  # fmt: skip
    body = {"what": "tarps", "quantity": quantity, "unit": "tarp", "needed_by": needed_by}
    return replica.author(key(who), "aid.request", body, now)


def claim(replica: Replica, who: int, target: Op, now: int, quantity: int = 1) -> Op:
    return replica.author(key(who), "aid.claim", {"offer": target.id, "quantity": quantity}, now)


def pledge(replica: Replica, who: int, target: Op, now: int, quantity: int = 1) -> Op:
    body = {"request": target.id, "quantity": quantity}
    return replica.author(key(who), "aid.pledge", body, now)


def fulfil(replica: Replica, who: int, act: Op, now: int) -> Op:
    field = "claim" if act.kind == "aid.claim" else "pledge"
    return replica.author(key(who), "aid.fulfil", {field: act.id}, now)


def withdraw(replica: Replica, who: int, target: Op, now: int) -> Op:
    return replica.author(key(who), "aid.withdraw", {"ref": target.id}, now)


def ids(items: Any) -> list[bytes]:
    return [item.id for item in items]


# -- offers and claims ----------------------------------------------------------


def test_claims_are_allocated_in_order_and_the_overflow_waits() -> None:
    replica, genesis = cells_federation()
    bread = offer(replica, quantity=3)
    first = claim(replica, member(SOUTH), bread, T0 + 20, quantity=2)
    second = claim(replica, member(EAST), bread, T0 + 30, quantity=2)
    third = claim(replica, member(EAST, 2), bread, T0 + 40, quantity=1)
    allocation = aid(replica).allocation(bread.id)
    assert allocation is not None
    # First fit: the 2 after the first 2 does not fit, the 1 after it does.
    assert ids(allocation.allocated) == [first.id, third.id]
    assert ids(allocation.waitlist) == [second.id]
    assert allocation.remaining == 0
    assert not allocation.overfulfilled
    assert [(s.claim.id, s.state) for s in aid(replica).claims_of(cell(genesis, EAST))] == [
        (second.id, WAITLISTED),
        (third.id, ALLOCATED),
    ]


def test_two_cells_claim_the_last_unit_during_a_partition() -> None:
    """Both sides allocate the last loaf to their own claimant; after the merge
    every replica allocates it to the same one and waitlists the other."""
    origin, genesis = cells_federation()
    bread = offer(origin, quantity=2)
    claim(origin, member(EAST, 2), bread, T0 + 15)  # takes the first loaf
    south_side, east_side = replica_of(genesis, origin), replica_of(genesis, origin)
    from_south = claim(south_side, member(SOUTH), bread, T0 + 20)
    from_east = claim(east_side, member(EAST), bread, T0 + 20)
    for side, mine in ((south_side, from_south), (east_side, from_east)):
        allocation = aid(side).allocation(bread.id)
        assert allocation is not None
        assert mine.id in ids(allocation.allocated)
        assert allocation.remaining == 0
    sync(south_side, east_side)
    sync(east_side, south_side)
    late = replica_of(genesis, east_side)  # a third replica that only ever saw the merge
    results = [aid(r).allocation(bread.id) for r in (south_side, east_side, late)]
    assert results[0] == results[1] == results[2]
    allocation = results[0]
    assert allocation is not None
    winner, loser = sorted([from_south, from_east], key=lambda op: (op.ts, op.id))
    assert ids(allocation.allocated) == [allocation.allocated[0].id, winner.id]
    assert ids(allocation.waitlist) == [loser.id]
    assert allocation.remaining == 0
    assert sum(c.quantity for c in allocation.allocated) == bread.body["quantity"]


def test_a_fulfilled_claim_keeps_its_goods_when_an_earlier_claim_arrives_later() -> None:
    origin, genesis = cells_federation()
    bread = offer(origin)
    south_side, east_side = replica_of(genesis, origin), replica_of(genesis, origin)
    early = claim(east_side, member(EAST), bread, T0 + 20)
    later = claim(south_side, member(SOUTH), bread, T0 + 30)
    handed = fulfil(south_side, member(NORTH), later, T0 + 40)
    assert early.ts < later.ts
    sync(east_side, south_side)
    sync(south_side, east_side)
    for side in (south_side, east_side):
        allocation = aid(side).allocation(bread.id)
        assert allocation is not None
        assert ids(allocation.allocated) == ids(allocation.fulfilled) == [later.id]
        assert ids(allocation.waitlist) == [early.id]
        assert not allocation.overfulfilled
    # The waitlisted claim cannot be fulfilled now that the merge is seen.
    with pytest.raises(RuleViolation, match="waitlisted"):
        fulfil(east_side, member(NORTH), early, T0 + 50)
    assert handed.id in east_side.graph


def test_a_fulfil_is_judged_by_the_allocation_in_its_causal_past() -> None:
    replica, _ = cells_federation()
    bread = offer(replica)
    first = claim(replica, member(SOUTH), bread, T0 + 20)
    second = claim(replica, member(EAST), bread, T0 + 30)
    with pytest.raises(RuleViolation, match="waitlisted"):
        fulfil(replica, member(NORTH), second, T0 + 40)
    fulfil(replica, member(NORTH), first, T0 + 50)
    with pytest.raises(RuleViolation, match="already fulfilled"):
        fulfil(replica, member(NORTH, 2), first, T0 + 60)


def test_concurrent_fulfils_beyond_the_quantity_are_reported_not_hidden() -> None:
    """North hands out its one loaf twice during a partition: both handovers
    happened, so both stay allocated, and the offer says it was overfulfilled;
    nothing unfulfilled is allocated on top."""
    origin, genesis = cells_federation()
    bread = offer(origin)
    one, two = replica_of(genesis, origin), replica_of(genesis, origin)
    to_south = claim(one, member(SOUTH), bread, T0 + 20)
    fulfil(one, member(NORTH, 1), to_south, T0 + 30)
    to_east = claim(two, member(EAST), bread, T0 + 20)
    fulfil(two, member(NORTH, 2), to_east, T0 + 30)
    sync(one, two)
    late = claim(two, member(SOUTH, 2), bread, T0 + 40)  # the offer is still open
    sync(two, one)
    for side in (one, two):
        allocation = aid(side).allocation(bread.id)
        assert allocation is not None
        assert set(ids(allocation.fulfilled)) == {to_south.id, to_east.id}
        assert set(ids(allocation.allocated)) == {to_south.id, to_east.id}
        assert ids(allocation.waitlist) == [late.id]
        assert allocation.remaining == 0
        assert allocation.overfulfilled
    with pytest.raises(RuleViolation, match="waitlisted"):
        fulfil(one, member(NORTH), late, T0 + 50)


def test_a_claim_concurrent_with_a_withdrawal_is_cancelled() -> None:
    origin, genesis = cells_federation()
    bread = offer(origin, quantity=3)
    before = claim(origin, member(EAST), bread, T0 + 15)
    north_side, south_side = replica_of(genesis, origin), replica_of(genesis, origin)
    withdraw(north_side, member(NORTH, 2), bread, T0 + 20)
    during = claim(south_side, member(SOUTH), bread, T0 + 30)
    # On its own side the claim is allocated...
    assert aid(south_side).claims_of(cell(genesis, SOUTH))[0].state == ALLOCATED
    sync(north_side, south_side)
    sync(south_side, north_side)
    for side in (north_side, south_side):
        allocation = aid(side).allocation(bread.id)
        assert allocation is not None
        assert allocation.withdrawn
        # ...after the merge remove wins; the claim made before the withdrawal stands.
        assert ids(allocation.allocated) == [before.id]
        assert ids(allocation.cancelled) == [during.id]
        assert allocation.remaining == 2
        assert aid(side).claims_of(cell(genesis, SOUTH))[0].state == CANCELLED
        assert aid(side).open_offers(T0 + 100) == []
    with pytest.raises(RuleViolation, match="withdrawn before"):
        fulfil(north_side, member(NORTH), during, T0 + 40)
    fulfil(north_side, member(NORTH), before, T0 + 40)  # promised before: still honoured


def test_a_fulfilled_claim_survives_a_concurrent_withdrawal() -> None:
    origin, genesis = cells_federation()
    bread = offer(origin)
    taken = claim(origin, member(SOUTH), bread, T0 + 15)
    one, two = replica_of(genesis, origin), replica_of(genesis, origin)
    withdraw(one, member(NORTH, 1), bread, T0 + 20)
    # The claim is in the withdrawal's past, so it stands; a newer one would not.
    fulfil(two, member(NORTH, 2), taken, T0 + 20)
    other = replica_of(genesis, origin)
    concurrent = claim(other, member(EAST), bread, T0 + 16)
    sync(two, one)
    sync(other, one)
    allocation = aid(one).allocation(bread.id)
    assert allocation is not None
    assert ids(allocation.fulfilled) == [taken.id]
    assert ids(allocation.cancelled) == [concurrent.id]


def test_remove_wins_unless_the_claim_was_already_fulfilled() -> None:
    """A claim concurrent with the withdrawal, fulfilled concurrently with it
    too (North's two members on two sides), keeps its goods."""
    origin, genesis = cells_federation()
    bread = offer(origin, quantity=2)
    one, two = replica_of(genesis, origin), replica_of(genesis, origin)
    withdraw(one, member(NORTH, 1), bread, T0 + 20)
    taken = claim(two, member(SOUTH), bread, T0 + 20)
    fulfil(two, member(NORTH, 2), taken, T0 + 30)
    unfulfilled = claim(two, member(EAST), bread, T0 + 35)
    sync(two, one)
    sync(one, two)
    for side in (one, two):
        allocation = aid(side).allocation(bread.id)
        assert allocation is not None
        assert ids(allocation.fulfilled) == ids(allocation.allocated) == [taken.id]
        assert ids(allocation.cancelled) == [unfulfilled.id]
        assert allocation.remaining == 1


def test_claims_after_expiry_or_withdrawal_are_refused() -> None:
    replica, _ = cells_federation()
    soon = offer(replica, until=T0 + 1000)
    claim(replica, member(SOUTH), soon, T0 + 1000)  # "until" is inclusive
    before = replica.state_hash()
    with pytest.raises(RuleViolation, match="expired"):
        claim(replica, member(EAST), soon, T0 + 1001)
    assert replica.state_hash() == before
    bread = offer(replica, now=T0 + 1100)
    withdraw(replica, member(NORTH, 2), bread, T0 + 1200)
    before = replica.state_hash()
    with pytest.raises(RuleViolation, match="withdrawn"):
        claim(replica, member(EAST), bread, T0 + 1300)
    with pytest.raises(RuleViolation, match="already withdrawn"):
        withdraw(replica, member(NORTH), bread, T0 + 1300)
    assert replica.state_hash() == before
    assert aid(replica).open_offers(T0 + 1300) == []


def test_open_offers_and_requests_follow_time_and_withdrawal() -> None:
    replica, _ = cells_federation()
    short = offer(replica, until=T0 + 500)
    long = offer(replica, member(EAST), until=T0 + 5000, now=T0 + 20)
    tarps = request(replica, needed_by=T0 + 800)
    assert ids(aid(replica).open_offers(T0 + 500)) == [short.id, long.id]
    assert ids(aid(replica).open_offers(T0 + 501)) == [long.id]
    assert ids(aid(replica).open_requests(T0 + 800)) == [tarps.id]
    assert aid(replica).open_requests(T0 + 801) == []
    withdraw(replica, member(SOUTH, 2), tarps, T0 + 100)
    assert aid(replica).open_requests(T0 + 200) == []


def test_claims_by_a_key_revoked_concurrently_do_not_count() -> None:
    origin, genesis = cells_federation()
    bread = offer(origin)
    cell_side, member_side = replica_of(genesis, origin), replica_of(genesis, origin)
    cell_side.author(key(member(SOUTH, 1)), "key.revoke", {"key": pub(member(SOUTH, 2))}, T0 + 20)
    rogue = claim(member_side, member(SOUTH, 2), bread, T0 + 20)
    honest = claim(cell_side, member(EAST), bread, T0 + 30)
    assert rogue.ts < honest.ts
    sync(member_side, cell_side)
    allocation = aid(cell_side).allocation(bread.id)
    assert allocation is not None
    assert ids(allocation.allocated) == [honest.id]
    assert allocation.state_of(rogue.id) is None
    assert aid(cell_side).claims_of(cell(genesis, SOUTH)) == []


def expel(replica: Replica, target: bytes, at: int) -> Op:
    """Propose to expel cell ``target``, have North and South vote yes, and
    seal it at ``at`` (after the 48 h window); returns the seal."""
    voters = [member(c, n) for c in (NORTH, SOUTH) for n in (1, 2)]
    circle = {"name": "all", "members": tuple(sorted(map(pub, voters)))}
    body = {"title": "Expel", "text": "Broke the agreements.", "options": ("yes", "no"),
            "ballot": "single", "quorum": 50, "action": {"expel": target},
            "circles": (circle,)}  # fmt: skip
    proposal = replica.author(key(member(NORTH)), "proposal.open", body, T0 + 1)
    for i, voter in enumerate(voters):
        ballot = {"proposal": proposal.id, "version": proposal.id, "choices": (0,),
                  "reasoning": "", "circle": "all"}  # fmt: skip
        replica.author(key(voter), "vote.cast", ballot, T0 + 2 + i)
    return replica.author(key(member(NORTH)), "proposal.seal", {"proposal": proposal.id}, at)


def test_claims_and_offers_of_a_cell_expelled_concurrently_do_not_count() -> None:
    origin, genesis = cells_federation()
    bread = offer(origin, until=T0 + 5 * DAY_MS)
    east_side = replica_of(genesis, origin)
    east_offer = offer(east_side, member(EAST), until=T0 + 5 * DAY_MS, now=T0 + 20)
    sync(east_side, origin)
    expel(origin, cell(genesis, EAST), T0 + 3 * DAY_MS)
    # Cut off, East keeps claiming and offering, not knowing it was expelled.
    from_east = claim(east_side, member(EAST), bread, T0 + 3 * DAY_MS)
    offer(east_side, member(EAST, 2), until=T0 + 5 * DAY_MS, now=T0 + 3 * DAY_MS)
    from_south = claim(origin, member(SOUTH), bread, T0 + 3 * DAY_MS + 10)
    assert from_east.ts < from_south.ts
    sync(east_side, origin)
    sync(origin, east_side)
    for side in (origin, east_side):
        allocation = aid(side).allocation(bread.id)
        assert allocation is not None
        assert ids(allocation.allocated) == [from_south.id]
        assert allocation.state_of(from_east.id) is None
        # East's offer from before the expulsion still counts; the later one does not.
        assert ids(aid(side).open_offers(T0 + 3 * DAY_MS + 20)) == [bread.id, east_offer.id]
    with pytest.raises(RuleViolation, match="expelled"):
        claim(origin, member(EAST), bread, T0 + 3 * DAY_MS + 30)


def test_an_offer_by_a_key_revoked_concurrently_does_not_count() -> None:
    origin, genesis = cells_federation()
    cell_side, member_side = replica_of(genesis, origin), replica_of(genesis, origin)
    cell_side.author(key(member(NORTH, 1)), "key.revoke", {"key": pub(member(NORTH, 2))}, T0 + 20)
    rogue = offer(member_side, member(NORTH, 2), now=T0 + 20)
    taken = claim(member_side, member(SOUTH), rogue, T0 + 30)
    sync(member_side, cell_side)
    assert aid(cell_side).open_offers(T0 + 100) == []
    allocation = aid(cell_side).allocation(rogue.id)
    assert allocation is not None
    assert not allocation.counts
    assert allocation.allocated == ()
    assert ids(allocation.cancelled) == [taken.id]
    with pytest.raises(RuleViolation, match="no longer counts"):
        claim(cell_side, member(EAST), rogue, T0 + 40)
    with pytest.raises(RuleViolation, match="no longer counts"):
        fulfil(cell_side, member(NORTH, 1), taken, T0 + 40)


def test_who_may_do_what() -> None:
    replica, _ = cells_federation()
    bread = offer(replica)
    with pytest.raises(RuleViolation, match="own offer"):
        claim(replica, member(NORTH, 2), bread, T0 + 20)
    with pytest.raises(RuleViolation, match="not of a device"):
        claim(replica, device(SOUTH), bread, T0 + 20)
    with pytest.raises(RuleViolation, match="not of a device"):
        offer(replica, device(NORTH), now=T0 + 20)
    taken = claim(replica, member(SOUTH), bread, T0 + 20)
    with pytest.raises(RuleViolation, match="only the offering cell"):
        fulfil(replica, member(SOUTH), taken, T0 + 30)
    with pytest.raises(RuleViolation, match="only the cell that made"):
        withdraw(replica, member(EAST), bread, T0 + 30)
    tarps = request(replica)
    with pytest.raises(RuleViolation, match="own request"):
        pledge(replica, member(SOUTH, 2), tarps, T0 + 30)
    promised = pledge(replica, member(EAST), tarps, T0 + 30)
    with pytest.raises(RuleViolation, match="only the pledging cell"):
        fulfil(replica, member(SOUTH), promised, T0 + 40)


# -- requests and pledges -------------------------------------------------------


def test_pledges_cover_a_request_and_are_fulfilled_by_the_pledging_cell() -> None:
    replica, genesis = cells_federation()
    tarps = request(replica, quantity=5)
    east = pledge(replica, member(EAST), tarps, T0 + 20, quantity=3)
    north = pledge(replica, member(NORTH), tarps, T0 + 30, quantity=4)
    fulfil(replica, member(EAST, 2), east, T0 + 40)
    coverage = aid(replica).coverage(tarps.id)
    assert coverage is not None
    assert ids(coverage.pledges) == [east.id, north.id]
    assert ids(coverage.fulfilled) == [east.id]
    assert (coverage.pledged, coverage.delivered, coverage.outstanding) == (7, 3, 0)
    assert [s.state for s in aid(replica).pledges_of(cell(genesis, EAST))] == [FULFILLED]
    assert [s.state for s in aid(replica).pledges_of(cell(genesis, NORTH))] == [PLEDGED]
    with pytest.raises(RuleViolation, match="already fulfilled"):
        fulfil(replica, member(EAST), east, T0 + 50)


def test_a_pledge_concurrent_with_the_requests_withdrawal_is_cancelled() -> None:
    origin, genesis = cells_federation()
    tarps = request(origin, quantity=5)
    one, two = replica_of(genesis, origin), replica_of(genesis, origin)
    withdraw(one, member(SOUTH, 2), tarps, T0 + 20)
    late = pledge(two, member(EAST), tarps, T0 + 20, quantity=2)
    sync(two, one)
    coverage = aid(one).coverage(tarps.id)
    assert coverage is not None
    assert coverage.withdrawn
    assert ids(coverage.cancelled) == [late.id]
    assert coverage.pledged == 0
    with pytest.raises(RuleViolation, match="withdrawn before"):
        fulfil(one, member(EAST), late, T0 + 30)
    with pytest.raises(RuleViolation, match="withdrawn"):
        pledge(one, member(NORTH), tarps, T0 + 30)


def test_a_pledge_after_the_needed_by_time_is_refused() -> None:
    replica, _ = cells_federation()
    tarps = request(replica, needed_by=T0 + 100)
    pledge(replica, member(EAST), tarps, T0 + 100)
    with pytest.raises(RuleViolation, match="needed-by"):
        pledge(replica, member(NORTH), tarps, T0 + 101)


# -- bad input ------------------------------------------------------------------


def snapshot(replica: Replica) -> tuple[object, ...]:
    records = aid(replica)
    ops = list(replica.graph.topological())
    return (
        replica.state_hash(),
        records.open_offers(T0),
        records.open_requests(T0),
        [records.allocation(op.id) for op in ops],
        [records.coverage(op.id) for op in ops],
        [records.claims_of(cell_id) for cell_id in (c.id for c in replica.authority.cells())],
        [records.pledges_of(cell_id) for cell_id in (c.id for c in replica.authority.cells())],
    )


GOODS = {"what": "bread", "quantity": 2, "unit": "loaf"}
OFFER = {**GOODS, "location": "kitchen", "until": T0 + DAY_MS}
REQUEST = {**GOODS, "needed_by": T0 + DAY_MS}


def without(body: dict[str, Any], name: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != name}


BAD_OFFERS = [
    *[(without(OFFER, name), repr(name)) for name in OFFER],
    ({**OFFER, "colour": "red"}, "unknown field"),
    ({**OFFER, "what": ""}, "'what'"),
    ({**OFFER, "what": 7}, "'what'"),
    ({**OFFER, "what": "x" * 201}, "'what'"),
    ({**OFFER, "quantity": 0}, "'quantity'"),
    ({**OFFER, "quantity": -3}, "'quantity'"),
    ({**OFFER, "quantity": MAX_QUANTITY + 1}, "'quantity'"),
    ({**OFFER, "quantity": "2"}, "'quantity'"),
    ({**OFFER, "quantity": True}, "'quantity'"),
    ({**OFFER, "unit": b"kg"}, "'unit'"),
    ({**OFFER, "location": ""}, "'location'"),
    ({**OFFER, "until": T0 - 1}, "'until' must be after"),
    ({**OFFER, "until": T0 + 367 * DAY_MS}, "'until' must be at most"),
    ({**OFFER, "until": str(T0 + DAY_MS)}, "'until'"),
]
BAD_REQUESTS = [
    *[(without(REQUEST, name), repr(name)) for name in REQUEST],
    ({**REQUEST, "location": "kitchen"}, "unknown field"),
    ({**REQUEST, "quantity": 0}, "'quantity'"),
    ({**REQUEST, "needed_by": T0}, "'needed_by' must be after"),
    ({**REQUEST, "needed_by": None}, "'needed_by'"),
    ({**REQUEST, "needed_by": T0 + 400 * DAY_MS}, "'needed_by' must be at most"),
]


@pytest.mark.parametrize(("kind", "body", "why"), [
    *[("aid.offer", body, why) for body, why in BAD_OFFERS],
    *[("aid.request", body, why) for body, why in BAD_REQUESTS],
])  # fmt: skip
def test_bad_offers_and_requests_are_refused(kind: str, body: dict[str, Any], why: str) -> None:
    replica, _ = cells_federation()
    before = snapshot(replica)
    with pytest.raises(RuleViolation, match=why):
        replica.author(key(member(NORTH)), kind, body, T0 + 10)
    assert snapshot(replica) == before


def test_bad_claims_pledges_fulfils_and_withdrawals_are_refused() -> None:
    replica, _ = cells_federation()
    bread = offer(replica, quantity=2)
    tarps = request(replica, quantity=2)
    taken = claim(replica, member(SOUTH), bread, T0 + 20)
    promised = pledge(replica, member(EAST), tarps, T0 + 20)
    note = replica.author(key(member(EAST)), "note", {"text": "hello"}, T0 + 25)
    unknown = bytes(32)
    cases: list[tuple[int, str, dict[str, Any], str]] = [
        (member(EAST), "aid.claim", {"quantity": 1}, "'offer'"),
        (member(EAST), "aid.claim", {"offer": bread.id}, "'quantity'"),
        (member(EAST), "aid.claim", {"offer": bread.id, "quantity": 1, "x": 1}, "unknown field"),
        (member(EAST), "aid.claim", {"offer": bread.id, "quantity": 3}, "'quantity'"),
        (member(EAST), "aid.claim", {"offer": bread.id, "quantity": 0}, "'quantity'"),
        (member(EAST), "aid.claim", {"offer": bread.id, "quantity": "1"}, "'quantity'"),
        (member(EAST), "aid.claim", {"offer": "bread", "quantity": 1}, "'offer'"),
        (member(EAST), "aid.claim", {"offer": unknown, "quantity": 1}, "'offer'"),
        (member(EAST), "aid.claim", {"offer": tarps.id, "quantity": 1}, "aid.offer"),
        (member(EAST), "aid.claim", {"offer": note.id, "quantity": 1}, "aid.offer"),
        (member(NORTH), "aid.pledge", {"quantity": 1}, "'request'"),
        (member(NORTH), "aid.pledge", {"request": tarps.id}, "'quantity'"),
        (member(NORTH), "aid.pledge", {"request": tarps.id, "quantity": 3}, "'quantity'"),
        (member(NORTH), "aid.pledge", {"request": tarps.id, "quantity": 1, "x": 1}, "unknown"),
        (member(NORTH), "aid.pledge", {"request": bread.id, "quantity": 1}, "aid.request"),
        (member(NORTH), "aid.pledge", {"request": unknown, "quantity": 1}, "'request'"),
        (member(NORTH), "aid.fulfil", {}, "exactly one"),
        (member(NORTH), "aid.fulfil", {"claim": taken.id, "pledge": promised.id}, "exactly one"),
        (member(NORTH), "aid.fulfil", {"claim": taken.id, "x": 1}, "unknown field"),
        (member(NORTH), "aid.fulfil", {"claim": bread.id}, "aid.claim"),
        (member(NORTH), "aid.fulfil", {"claim": 5}, "'claim'"),
        (member(NORTH), "aid.fulfil", {"claim": unknown}, "'claim'"),
        (member(EAST), "aid.fulfil", {"pledge": taken.id}, "aid.pledge"),
        (member(NORTH), "aid.withdraw", {}, "'ref'"),
        (member(NORTH), "aid.withdraw", {"ref": bread.id, "x": 1}, "unknown field"),
        (member(NORTH), "aid.withdraw", {"ref": taken.id}, "aid.offer or aid.request"),
        (member(NORTH), "aid.withdraw", {"ref": unknown}, "'ref'"),
        (member(NORTH), "aid.withdraw", {"ref": [bread.id]}, "'ref'"),
    ]
    for who, kind, body, why in cases:
        before = snapshot(replica)
        with pytest.raises(RuleViolation, match=why):
            replica.author(key(who), kind, body, T0 + 30)
        assert snapshot(replica) == before, (kind, body)


def test_fulfil_of_an_expired_offers_allocated_claim_is_still_allowed() -> None:
    """Expiry stops new claims, not the handover of what was promised."""
    replica, _ = cells_federation()
    bread = offer(replica, until=T0 + 100)
    taken = claim(replica, member(SOUTH), bread, T0 + 50)
    fulfil(replica, member(NORTH), taken, T0 + 5000)
    allocation = aid(replica).allocation(bread.id)
    assert allocation is not None
    assert ids(allocation.fulfilled) == [taken.id]


# -- convergence ----------------------------------------------------------------


@dataclass(frozen=True)
class History:
    genesis: Op
    ops: list[Op]


ACTIONS = ["offer", "request", "claim", "claim", "claim", "claim", "pledge", "fulfil", "fulfil",
           "withdraw", "withdraw", "revoke"]  # fmt: skip


@st.composite
def histories(draw: st.DrawFn) -> History:
    """Three replicas; each cell's first member works on their cell's replica,
    the second member travels and works on the next one (so a revocation by
    the first is concurrent with what the second does). Replicas often pull
    from one another. Attempts the rules refuse are skipped: the property is
    about valid histories."""
    _, genesis = cells_federation()
    first = replica_of(genesis)
    # Something to claim and pledge to from the start, seen by everyone.
    ops: list[Op] = [
        genesis,
        offer(first, member(NORTH), quantity=draw(st.integers(1, 2)), until=T0 + 300),
        offer(first, member(SOUTH), quantity=1, until=T0 + 100, now=T0 + 11),
        request(first, member(EAST), quantity=2, needed_by=T0 + 200, now=T0 + 12),
    ]
    replicas = [first, replica_of(genesis, first), replica_of(genesis, first)]
    now = T0 + 12
    for _ in range(draw(st.integers(4, 16))):
        now += draw(st.integers(0, 40))
        who = draw(st.integers(0, 2))
        action = draw(st.sampled_from(ACTIONS))
        n = 1 if action == "revoke" else draw(st.integers(1, 2))
        replica = replicas[(who + n - 1) % 3]
        if draw(st.integers(0, 2)):
            for op in replicas[draw(st.integers(0, 2))].graph.topological():
                replica.receive(op, now)
        try:
            made = act(draw, replica, action, (who, n), cell(genesis, who), now)
        except InvalidOp:
            continue
        if made is not None:
            ops.append(made)
    return History(genesis, ops)


def act(
    draw: st.DrawFn, replica: Replica, action: str, who: tuple[int, int], own: bytes, now: int
) -> Op | None:
    """One attempt by member ``who`` (cell index, member number) of cell ``own``."""
    author = member(*who)
    quantity = draw(st.integers(1, 2))
    if action == "offer":
        until = now + draw(st.integers(1, 200))
        return offer(replica, author, quantity=quantity, until=until, now=now)
    if action == "request":
        return request(replica, author, quantity=quantity, needed_by=now + 100, now=now)
    if action == "revoke":
        return replica.author(key(author), "key.revoke", {"key": pub(member(who[0], 2))}, now)
    target = target_for(draw, replica, action, own)
    makers = {
        "claim": lambda op: claim(replica, author, op, now, quantity),
        "pledge": lambda op: pledge(replica, author, op, now, quantity),
        "withdraw": lambda op: withdraw(replica, author, op, now),
        "fulfil": lambda op: fulfil(replica, author, op, now),
    }
    return makers[action](target) if target is not None else None


def target_for(draw: st.DrawFn, replica: Replica, action: str, own: bytes) -> Op | None:
    """Something ``action`` by cell ``own`` could apply to, if there is any."""
    records = aid(replica)

    def ours(op: Op) -> bool:
        return replica.authority.cell_of(op.author) == own

    def our_offer(op: Op) -> bool:
        offered = records.offer(op.body["offer"])  # type: ignore[arg-type]
        return offered is not None and offered.cell == own

    wanted = {
        "claim": lambda op: op.kind == "aid.offer" and not ours(op),
        "pledge": lambda op: op.kind == "aid.request" and not ours(op),
        "withdraw": lambda op: op.kind in {"aid.offer", "aid.request"} and ours(op),
        "fulfil": lambda op: (
            (op.kind == "aid.pledge" and ours(op)) or (op.kind == "aid.claim" and our_offer(op))
        ),
    }[action]
    targets = [op for op in replica.graph.topological() if wanted(op)]
    return draw(st.sampled_from(targets)) if targets else None


def outcome(replica: Replica) -> tuple[object, ...]:
    records = aid(replica)
    return (
        snapshot(replica),
        [records.open_offers(T0 + t) for t in (0, 100, 300, 600)],
        [records.open_requests(T0 + t) for t in (0, 300, 700)],
    )


@given(data=st.data(), history=histories())
def test_any_order_with_duplicates_gives_one_aid_state(
    data: st.DataObject, history: History
) -> None:
    reference = assert_order_independent(data, history.genesis, history.ops, outcome)
    for op in history.ops:
        allocation = aid(reference).allocation(op.id)
        if allocation is None or not allocation.counts:
            continue
        handed = sum(c.quantity for c in allocation.fulfilled)
        promised = sum(c.quantity for c in allocation.allocated) - handed
        # Never over-allocated: unfulfilled claims only ever share what is left.
        assert promised <= max(0, allocation.offer.quantity - handed)
        assert allocation.overfulfilled == (handed > allocation.offer.quantity)
        assert allocation.remaining == max(0, allocation.offer.quantity - handed - promised)


def test_aid_histories_do_produce_contention() -> None:
    """Guard: the generator must build the cases the property is about."""
    seen: set[str] = set()

    # A fixed sample (derandomized): a guard that passes only by luck would be flaky.
    @settings(derandomize=True, max_examples=200)
    @given(history=histories())
    def look(history: History) -> None:
        replica = deliver(history.genesis, history.ops)
        records = aid(replica)
        if len(replica.heads()) > 1:
            seen.add("concurrent")
        for op in history.ops:
            allocation = records.allocation(op.id)
            if allocation is not None:
                seen.update(
                    name
                    for name, items in (("waitlisted", allocation.waitlist),
                                        ("cancelled", allocation.cancelled),
                                        ("fulfilled", allocation.fulfilled))
                    if items
                )  # fmt: skip
            if op.kind.startswith("aid.") and not replica.authority.counts(op):
                seen.add("discounted")

    look()
    assert seen >= {"concurrent", "waitlisted", "cancelled", "fulfilled", "discounted"}
