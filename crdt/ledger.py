"""The commons ledger: contributions, uses and gifts returned, public to all.

Theory of operation. A member logs an *entry* for their own cell: a
contribution to the commons, a use of it, or a gift returned, of a quantity of
a resource in a unit, naming the cells on the other side (counterparties) and a
note. A cell's **balance** per (resource, unit) is a counter:

    balance = contributions + gifts returned - uses

Entries are never edited. A mistake is put right by a *correction*
(``ledger.correct``) from any member of the entry's cell: it names the entry
and states the quantity the entry should have had (0 voids it). A correction
supersedes every correction of the same entry in its causal past, so a
correction of a correction is simply a newer correction of the entry. Stating
the value rather than a delta keeps two members who fix the same mistake during
a partition from fixing it twice. If corrections conflict (concurrent, stating
different quantities), the one with the greatest ``(ts, id)`` is in effect and
the entry is flagged ``disputed`` until a later correction settles it.

Entries and corrections by keys revoked (or cells expelled) concurrently do
not count (:meth:`Authority.counts`); they stay visible, flagged. Balances are
computed by queries from the set of entries, so they converge whatever the
delivery order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from ._canonical import Value
from ._errors import RuleViolation
from ._op import Op
from ._record import (
    Record,
    field_bytes,
    field_choice,
    field_ids,
    field_int,
    field_str,
    only_fields,
)

if TYPE_CHECKING:
    from ._replica import Replica

ENTRY = "ledger.entry"
CORRECT = "ledger.correct"

CONTRIBUTION = "contribution"
USE = "use"
GIFT_RETURNED = "gift_returned"
TYPES = (CONTRIBUTION, USE, GIFT_RETURNED)
SIGN = {CONTRIBUTION: 1, USE: -1, GIFT_RETURNED: 1}
"""How each type of entry moves its cell's balance."""

MAX_QUANTITY = 1_000_000_000
MAX_RESOURCE = 200
MAX_UNIT = 40
MAX_NOTE = 1000
MAX_COUNTERPARTIES = 16

_T = TypeVar("_T", "Entry", "Correction")
_ENTRY_FIELDS = frozenset({"type", "resource", "quantity", "unit", "counterparties", "note"})
_CORRECT_FIELDS = frozenset({"ref", "quantity", "note"})


@dataclass(frozen=True, slots=True)
class Entry:
    id: bytes
    author: bytes
    cell: bytes
    ts: int
    type: str  # contribution, use or gift_returned
    resource: str
    quantity: int  # as logged; see EntryStatus.quantity for the corrected value
    unit: str
    counterparties: tuple[bytes, ...]  # cell ids, sorted
    note: str


@dataclass(frozen=True, slots=True)
class Correction:
    id: bytes
    author: bytes
    cell: bytes
    ts: int
    entry: bytes
    quantity: int  # what the entry's quantity should be; 0 voids it
    note: str


@dataclass(frozen=True, slots=True)
class EntryStatus:
    """An entry with its corrections and the quantity that is in effect."""

    entry: Entry
    counts: bool
    corrections: tuple[Correction, ...]  # counting corrections, oldest first
    in_effect: Correction | None  # the correction that sets ``quantity``, if any
    quantity: int  # the corrected quantity (0 if the entry does not count)
    disputed: bool  # concurrent corrections state different quantities

    @property
    def delta(self) -> int:
        """What this entry adds to its cell's balance."""
        return SIGN[self.entry.type] * self.quantity


@dataclass(frozen=True, slots=True)
class Balance:
    cell: bytes
    resource: str
    unit: str
    contributions: int
    uses: int
    gifts_returned: int

    @property
    def balance(self) -> int:
        return self.contributions + self.gifts_returned - self.uses


class Ledger(Record):
    """Every ledger entry and correction in the federation."""

    op_kinds = (ENTRY, CORRECT)
    ref_fields = {CORRECT: ("ref",)}

    def __init__(self, replica: Replica) -> None:
        super().__init__(replica)
        self._entries: dict[bytes, Entry] = {}
        self._corrections: dict[bytes, Correction] = {}
        self._corrections_of: dict[bytes, list[bytes]] = {}  # entry -> correction ids
        self._by_resource: dict[str, list[bytes]] = {}  # resource -> entry ids

    # -- validation and applying --------------------------------------------

    def validate(self, op: Op) -> None:
        grant = self.replica.authority.require_member(op)
        if op.kind == ENTRY:
            entry = self.parse_once(op, lambda o: _parse_entry(o, grant.cell))
            for cell in entry.counterparties:
                if cell == grant.cell:
                    raise RuleViolation("a cell cannot be its own counterparty")
                if not self.replica.authority.cell_is_live(cell, op):
                    raise RuleViolation(
                        f"counterparty {cell.hex()[:16]} is not a live cell of the federation"
                    )
        elif op.kind == CORRECT:
            correction = self.parse_once(op, lambda o: _parse_correction(o, grant.cell))
            corrected = self._entries.get(correction.entry)
            if corrected is None:
                raise RuleViolation(
                    "field 'ref' must name a ledger.entry op "
                    "(to correct a correction, correct the entry again)"
                )
            if corrected.cell != grant.cell:
                raise RuleViolation("only the cell that made an entry can correct it")

    def apply(self, op: Op) -> None:
        cell = self.replica.authority.author_grant(op).cell
        if op.kind == ENTRY:
            entry = self.parse_once(op, lambda o: _parse_entry(o, cell))
            self._entries[op.id] = entry
            self._by_resource.setdefault(entry.resource, []).append(op.id)
        elif op.kind == CORRECT:
            correction = self.parse_once(op, lambda o: _parse_correction(o, cell))
            self._corrections[op.id] = correction
            self._corrections_of.setdefault(correction.entry, []).append(op.id)

    # -- queries ------------------------------------------------------------

    def entry(self, entry_id: bytes) -> EntryStatus | None:
        """An entry with its corrections; None if no such entry."""
        entry = self._entries.get(entry_id)
        return self._status(entry) if entry is not None else None

    def entries(self, resource: str) -> list[EntryStatus]:
        """Every entry of ``resource`` (exact text), oldest first; entries that do
        not count are listed too, flagged, since the ledger is public."""
        ids = self._by_resource.get(resource, ())
        return [self._status(e) for e in _oldest(self._entries[i] for i in ids)]

    def balances(self, cell: bytes | None = None) -> list[Balance]:
        """Balances per (cell, resource, unit) over the counting entries, sorted;
        only those of ``cell`` if given."""
        sums: dict[tuple[bytes, str, str], dict[str, int]] = {}
        for entry in self._entries.values():
            if cell is not None and entry.cell != cell:
                continue
            status = self._status(entry)
            if not status.counts:
                continue
            where = (entry.cell, entry.resource, entry.unit)
            totals = sums.setdefault(where, dict.fromkeys(TYPES, 0))
            totals[entry.type] += status.quantity
        return [
            Balance(c, r, u, t[CONTRIBUTION], t[USE], t[GIFT_RETURNED])
            for (c, r, u), t in sorted(sums.items())
        ]

    def balance(self, cell: bytes, resource: str, unit: str) -> int:
        """One cell's balance of one resource in one unit (0 if nothing is logged)."""
        return sum(
            b.balance for b in self.balances(cell) if (b.resource, b.unit) == (resource, unit)
        )

    def _status(self, entry: Entry) -> EntryStatus:
        authority = self.replica.authority
        if not authority.counts(entry.id):
            return EntryStatus(entry, False, (), None, 0, False)
        ids = [i for i in self._corrections_of.get(entry.id, ()) if authority.counts(i)]
        corrections = _oldest(self._corrections[i] for i in ids)
        # The latest corrections: those no other counting correction has seen.
        latest = [
            c
            for c in corrections
            if not any(o is not c and self.graph.precedes(c.id, o.id) for o in corrections)
        ]
        in_effect = latest[-1] if latest else None
        return EntryStatus(
            entry=entry,
            counts=True,
            corrections=tuple(corrections),
            in_effect=in_effect,
            quantity=in_effect.quantity if in_effect is not None else entry.quantity,
            disputed=len({c.quantity for c in latest}) > 1,
        )


def _oldest(items: Iterable[_T]) -> list[_T]:
    return sorted(items, key=lambda item: (item.ts, item.id))


def _counterparties(body: Mapping[str, Value]) -> tuple[bytes, ...]:
    """The optional field 'counterparties': sorted distinct 32-byte cell ids."""
    return field_ids(
        body, "counterparties", noun="cell ids", min_count=0, max_count=MAX_COUNTERPARTIES,
        optional=True,
    )  # fmt: skip


def _note(body: Mapping[str, Value]) -> str:
    return field_str(body, "note", max_len=MAX_NOTE) if "note" in body else ""


def _parse_entry(op: Op, cell: bytes) -> Entry:
    body = op.body
    only_fields(body, _ENTRY_FIELDS)
    return Entry(
        id=op.id,
        author=op.author,
        cell=cell,
        ts=op.ts,
        type=field_choice(body, "type", TYPES),
        resource=field_str(body, "resource", min_len=1, max_len=MAX_RESOURCE),
        quantity=field_int(body, "quantity", 1, MAX_QUANTITY),
        unit=field_str(body, "unit", min_len=1, max_len=MAX_UNIT),
        counterparties=_counterparties(body),
        note=_note(body),
    )


def _parse_correction(op: Op, cell: bytes) -> Correction:
    only_fields(op.body, _CORRECT_FIELDS)
    return Correction(
        id=op.id,
        author=op.author,
        cell=cell,
        ts=op.ts,
        entry=field_bytes(op.body, "ref"),
        quantity=field_int(op.body, "quantity", 0, MAX_QUANTITY),
        note=_note(op.body),
    )
