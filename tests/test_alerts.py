"""Alerts: urgent notices shown until they expire or their cell withdraws them."""

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
from archipel.crdt.alerts import (
    ACTIVE,
    EXPIRED,
    MAX_ALERT_MS,
    URGENT_KINDS,
    VOID,
    WITHDRAWN,
    Alerts,
)

NORTH, SOUTH, EAST = 0, 1, 2
HOUR_MS = 3600 * 1000


def alerts(replica: Replica) -> Alerts:
    return replica.record(Alerts)


def raise_alert(replica: Replica, who: int, now: int, expires: int, text: str = "raid") -> Op:
    body = {"text": text, "area": "Canal St and the bridge", "expires": expires}
    return replica.author(key(who), "alert.raise", body, now)


def withdraw(replica: Replica, who: int, alert: Op, now: int) -> Op:
    return replica.author(key(who), "alert.withdraw", {"ref": alert.id}, now)


def ids(items: Any) -> list[bytes]:
    return [item.id for item in items]


def test_urgent_kinds_name_the_alert_ops() -> None:
    assert frozenset({"alert.raise", "alert.withdraw"}) == URGENT_KINDS
    assert set(Alerts.op_kinds) >= URGENT_KINDS


def test_alerts_are_shown_newest_first_until_they_expire() -> None:
    replica, genesis = cells_federation()
    raid = raise_alert(replica, member(NORTH), T0 + 10, T0 + HOUR_MS)
    arrest = raise_alert(replica, member(SOUTH), T0 + 20, T0 + 2 * HOUR_MS, "arrest at the march")
    records = alerts(replica)
    assert ids(records.active(T0 + 30)) == [arrest.id, raid.id]
    assert ids(records.active(T0 + HOUR_MS - 1)) == [arrest.id, raid.id]
    assert ids(records.active(T0 + HOUR_MS)) == [arrest.id]  # expired at its expiry
    assert records.status(raid.id, T0 + HOUR_MS) == EXPIRED
    assert records.active(T0 + 2 * HOUR_MS) == []
    shown = records.alert(arrest.id)
    assert shown is not None
    assert (shown.cell, shown.text, shown.by_device) == (
        cell(genesis, SOUTH), "arrest at the march", False,
    )  # fmt: skip


def test_a_device_may_raise_an_alert_as_a_panic_button() -> None:
    replica, genesis = cells_federation()
    panic = raise_alert(replica, device(EAST), T0 + 10, T0 + HOUR_MS, "panic button pressed")
    shown = alerts(replica).alert(panic.id)
    assert shown is not None
    assert (shown.cell, shown.by_device) == (cell(genesis, EAST), True)
    # Calling it off is a person's judgement: members of East only.
    with pytest.raises(RuleViolation, match="not of a device"):
        withdraw(replica, device(EAST), panic, T0 + 20)
    with pytest.raises(RuleViolation, match="only a member of the issuing cell"):
        withdraw(replica, member(NORTH), panic, T0 + 20)
    withdraw(replica, member(EAST, 2), panic, T0 + 30)
    assert alerts(replica).active(T0 + 40) == []
    assert alerts(replica).status(panic.id, T0 + 40) == WITHDRAWN


def test_withdrawals_must_come_in_time_and_once() -> None:
    replica, _ = cells_federation()
    raid = raise_alert(replica, member(NORTH), T0 + 10, T0 + 100)
    with pytest.raises(RuleViolation, match="already expired"):
        withdraw(replica, member(NORTH), raid, T0 + 100)
    other = raise_alert(replica, member(NORTH), T0 + 200, T0 + HOUR_MS)
    withdraw(replica, member(NORTH, 2), other, T0 + 210)
    before = replica.state_hash()
    with pytest.raises(RuleViolation, match="already withdrawn"):
        withdraw(replica, member(NORTH), other, T0 + 220)
    assert replica.state_hash() == before


def test_a_withdrawal_on_one_side_hides_the_alert_everywhere_after_merge() -> None:
    origin, genesis = cells_federation()
    raid = raise_alert(origin, device(NORTH), T0 + 10, T0 + HOUR_MS)
    one, two = replica_of(genesis, origin), replica_of(genesis, origin)
    withdraw(one, member(NORTH, 1), raid, T0 + 20)
    withdraw(two, member(NORTH, 2), raid, T0 + 20)  # both call it off at once: fine
    later = raise_alert(two, member(SOUTH), T0 + 30, T0 + HOUR_MS)
    assert ids(alerts(two).active(T0 + 40)) == [later.id]
    sync(two, one)
    sync(one, two)
    for side in (one, two):
        assert ids(alerts(side).active(T0 + 40)) == [later.id]
        assert alerts(side).status(raid.id, T0 + 40) == WITHDRAWN


def test_alerts_and_withdrawals_by_keys_revoked_concurrently_do_not_count() -> None:
    origin, genesis = cells_federation()
    real = raise_alert(origin, member(NORTH, 1), T0 + 10, T0 + HOUR_MS)
    cell_side, member_side = replica_of(genesis, origin), replica_of(genesis, origin)
    cell_side.author(key(member(NORTH, 1)), "key.revoke", {"key": pub(member(NORTH, 2))}, T0 + 20)
    fake = raise_alert(member_side, member(NORTH, 2), T0 + 20, T0 + HOUR_MS, "false alarm bait")
    withdraw(member_side, member(NORTH, 2), real, T0 + 30)
    assert ids(alerts(member_side).active(T0 + 40)) == [fake.id]
    sync(member_side, cell_side)
    sync(cell_side, member_side)
    for side in (cell_side, member_side):
        assert ids(alerts(side).active(T0 + 40)) == [real.id]
        assert alerts(side).status(fake.id, T0 + 40) == VOID
        assert alerts(side).status(real.id, T0 + 40) == ACTIVE
        assert alerts(side).status(bytes(32), T0 + 40) is None


# -- bad input ------------------------------------------------------------------


def snapshot(replica: Replica) -> tuple[object, ...]:
    records = alerts(replica)
    return (
        replica.state_hash(),
        records.active(T0),
        [records.status(op.id, T0) for op in replica.graph.topological()],
    )


RAISE = {"text": "raid", "area": "north bank", "expires": T0 + HOUR_MS}


def without(body: dict[str, Any], name: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != name}


def test_bad_alerts_and_withdrawals_are_refused() -> None:
    replica, _ = cells_federation()
    raid = raise_alert(replica, member(NORTH), T0 + 10, T0 + HOUR_MS)
    note = replica.author(key(member(NORTH)), "note", {"text": "hi"}, T0 + 15)
    cases: list[tuple[str, dict[str, Any], str]] = [
        *[("alert.raise", without(RAISE, name), repr(name)) for name in RAISE],
        ("alert.raise", {**RAISE, "urgency": 5}, "unknown field"),
        ("alert.raise", {**RAISE, "text": ""}, "'text'"),
        ("alert.raise", {**RAISE, "text": "x" * 1001}, "'text'"),
        ("alert.raise", {**RAISE, "text": 3}, "'text'"),
        ("alert.raise", {**RAISE, "area": ""}, "'area'"),
        ("alert.raise", {**RAISE, "area": ("north",)}, "'area'"),
        ("alert.raise", {**RAISE, "expires": "soon"}, "'expires'"),
        ("alert.raise", {**RAISE, "expires": True}, "'expires'"),
        ("alert.raise", {**RAISE, "expires": -1}, "'expires'"),
        ("alert.raise", {**RAISE, "expires": T0}, "after the time"),
        ("alert.raise", {**RAISE, "expires": T0 + 20 + MAX_ALERT_MS + 1}, "at most 7 days"),
        ("alert.withdraw", {}, "'ref'"),
        ("alert.withdraw", {"ref": raid.id, "why": "over"}, "unknown field"),
        ("alert.withdraw", {"ref": note.id}, "alert.raise"),
        ("alert.withdraw", {"ref": bytes(32)}, "'ref'"),
        ("alert.withdraw", {"ref": raid.id.hex()}, "'ref'"),
    ]
    for kind, body, why in cases:
        before = snapshot(replica)
        with pytest.raises(RuleViolation, match=why):
            replica.author(key(member(NORTH)), kind, body, T0 + 20)
        assert snapshot(replica) == before, (kind, body)
    # The longest allowed expiry is accepted.
    raise_alert(replica, member(NORTH), T0 + 30, T0 + 30 + MAX_ALERT_MS)


# -- convergence ----------------------------------------------------------------


@dataclass(frozen=True)
class History:
    genesis: Op
    ops: list[Op]


ACTIONS = ["raise", "raise", "withdraw", "withdraw", "revoke"]


@st.composite
def histories(draw: st.DrawFn) -> History:
    """Three replicas; each cell's first member and device work on their cell's
    replica, the second member on the next one (so a revocation is concurrent
    with what they do). Replicas often pull from one another; refused attempts
    are skipped."""
    _, genesis = cells_federation()
    replicas = [replica_of(genesis) for _ in range(3)]
    ops: list[Op] = [genesis]
    now = T0
    for _ in range(draw(st.integers(2, 12))):
        now += draw(st.integers(0, 40))
        who = draw(st.integers(0, 2))
        action = draw(st.sampled_from(ACTIONS))
        n = 1 if action == "revoke" else draw(st.sampled_from([1, 2, 9]))
        replica = replicas[(who + (n == 2)) % 3]
        if draw(st.integers(0, 2)):
            for op in replicas[draw(st.integers(0, 2))].graph.topological():
                replica.receive(op, now)
        author = device(who) if n == 9 else member(who, n)
        try:
            if action == "revoke":
                made = replica.author(key(author), "key.revoke", {"key": pub(member(who, 2))}, now)
            elif action == "raise":
                made = raise_alert(replica, author, now, now + draw(st.integers(1, 300)))
            else:
                targets = [op for op in replica.graph.topological() if op.kind == "alert.raise"]
                if not targets:
                    continue
                made = withdraw(replica, author, draw(st.sampled_from(targets)), now)
        except InvalidOp:
            continue
        ops.append(made)
    return History(genesis, ops)


def outcome(replica: Replica) -> tuple[object, ...]:
    records = alerts(replica)
    ops = list(replica.graph.topological())
    return (
        replica.state_hash(),
        [records.active(T0 + t) for t in (0, 100, 200, 400, 800)],
        [records.status(op.id, T0 + 200) for op in ops],
        [records.alert(op.id) for op in ops],
    )


@given(data=st.data(), history=histories())
def test_any_order_with_duplicates_gives_one_set_of_alerts(
    data: st.DataObject, history: History
) -> None:
    assert_order_independent(data, history.genesis, history.ops, outcome)


def test_alert_histories_do_produce_withdrawals_and_void_alerts() -> None:
    """Guard: the generator must build the cases the property is about."""
    seen: set[str] = set()

    # A fixed sample (derandomized): a guard that passes only by luck would be flaky.
    @settings(derandomize=True, max_examples=200)
    @given(history=histories())
    def look(history: History) -> None:
        replica = deliver(history.genesis, history.ops)
        if len(replica.heads()) > 1:
            seen.add("concurrent")
        seen.update(
            status
            for op in history.ops
            if (status := alerts(replica).status(op.id, T0 + 100)) is not None
        )

    look()
    assert seen >= {"concurrent", ACTIVE, EXPIRED, WITHDRAWN, VOID}
