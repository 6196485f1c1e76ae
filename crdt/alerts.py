"""Alerts: urgent notices (a raid, an arrest, a call to act now).

Theory of operation. Any key of a cell, a member's or a device's, may *raise*
an alert: a text, an area and an expiry at most :data:`MAX_ALERT_MS` (7 days)
after the alert's own time. Devices may raise alerts so that a node can be a
panic button (a script, a hardware switch) when no person can type. The
issuing cell is the author's cell. An alert is shown until it expires, or
until a member (a person, not a device) of the issuing cell *withdraws* it.

The sync protocol floods the op kinds in :data:`URGENT_KINDS` to every
connected peer at once instead of only along the gossip tree: an alert, and
the withdrawal that calls off a false alarm, must travel as fast as possible.

State is two sets of facts (alerts, withdrawals); whether an alert is shown is
decided by queries at ``now_ms``. A withdrawal always has its alert in its
causal past, so there is nothing to order. Raises and withdrawals by keys
revoked (or cells expelled) concurrently do not count
(:meth:`Authority.counts`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._errors import RuleViolation
from ._hlc import ts_ms
from ._op import Op
from ._record import Record, field_bytes, field_int, field_str, only_fields
from .authority import DEVICE
from .genesis import DAY_MS

if TYPE_CHECKING:
    from ._replica import Replica

RAISE = "alert.raise"
WITHDRAW = "alert.withdraw"

URGENT_KINDS: frozenset[str] = frozenset({RAISE, WITHDRAW})
"""Op kinds the sync protocol must push to every connected peer at once."""

MAX_ALERT_MS = 7 * DAY_MS
"""The longest an alert may be shown: its expiry is at most this long after it."""
MAX_TEXT = 1000
MAX_AREA = 200

ACTIVE = "active"
EXPIRED = "expired"
WITHDRAWN = "withdrawn"
VOID = "void"  # raised by a key revoked, or a cell expelled, concurrently

_RAISE_FIELDS = frozenset({"text", "area", "expires"})


@dataclass(frozen=True, slots=True)
class Alert:
    id: bytes
    author: bytes
    cell: bytes  # the issuing cell
    ts: int
    text: str
    area: str
    expires: int  # wall ms: shown while now_ms < expires
    by_device: bool


class Alerts(Record):
    """Every alert raised in the federation, and their withdrawals."""

    op_kinds = (RAISE, WITHDRAW)
    ref_fields = {WITHDRAW: ("ref",)}

    def __init__(self, replica: Replica) -> None:
        super().__init__(replica)
        self._alerts: dict[bytes, Alert] = {}
        self._withdrawals: dict[bytes, list[bytes]] = {}  # alert -> withdraw op ids

    def validate(self, op: Op) -> None:
        if op.kind == RAISE:
            _parse_alert(op, self.replica.authority.author_grant(op).cell, by_device=False)
            return
        grant = self.replica.authority.require_member(op)
        only_fields(op.body, frozenset({"ref"}))
        alert = self._alerts.get(field_bytes(op.body, "ref"))
        if alert is None:
            raise RuleViolation("field 'ref' must name an alert.raise op")
        if alert.cell != grant.cell:
            raise RuleViolation("only a member of the issuing cell can withdraw an alert")
        if ts_ms(op.ts) >= alert.expires:
            raise RuleViolation("the alert has already expired")
        earlier = self._withdrawals.get(alert.id, ())
        if any(
            self.graph.precedes(w, op) and self.replica.authority.counts(w, op) for w in earlier
        ):
            raise RuleViolation("the alert is already withdrawn")

    def apply(self, op: Op) -> None:
        grant = self.replica.authority.author_grant(op)
        if op.kind == RAISE:
            self._alerts[op.id] = _parse_alert(op, grant.cell, by_device=grant.role == DEVICE)
        else:
            self._withdrawals.setdefault(field_bytes(op.body, "ref"), []).append(op.id)

    # -- queries ------------------------------------------------------------

    def active(self, now_ms: int) -> list[Alert]:
        """Alerts to show at ``now_ms``: counting, not expired, not withdrawn;
        newest first."""
        shown = (a for a in self._alerts.values() if self.status(a.id, now_ms) == ACTIVE)
        return sorted(shown, key=lambda a: (a.ts, a.id), reverse=True)

    def alert(self, alert_id: bytes) -> Alert | None:
        return self._alerts.get(alert_id)

    def status(self, alert_id: bytes, now_ms: int) -> str | None:
        """``active``, ``expired``, ``withdrawn`` or ``void`` at ``now_ms``; None if
        no such alert. A withdrawn alert that has also expired is ``withdrawn``."""
        alert = self._alerts.get(alert_id)
        if alert is None:
            return None
        authority = self.replica.authority
        if not authority.counts(alert.id):
            return VOID
        if any(authority.counts(w) for w in self._withdrawals.get(alert.id, ())):
            return WITHDRAWN
        return ACTIVE if now_ms < alert.expires else EXPIRED


def _parse_alert(op: Op, cell: bytes, *, by_device: bool) -> Alert:
    only_fields(op.body, _RAISE_FIELDS)
    text = field_str(op.body, "text", min_len=1, max_len=MAX_TEXT)
    area = field_str(op.body, "area", min_len=1, max_len=MAX_AREA)
    expires = field_int(op.body, "expires", 0, 2**63 - 1)
    made = ts_ms(op.ts)
    if expires <= made:
        raise RuleViolation("field 'expires' must be after the time the alert is raised")
    if expires > made + MAX_ALERT_MS:
        raise RuleViolation("field 'expires' must be at most 7 days after the alert is raised")
    return Alert(op.id, op.author, cell, op.ts, text, area, expires, by_device)
