"""Councils: time-bound bodies that member cells form for one task.

Theory of operation. A member of a cell forms a council (``council.form``):
a task, the member cells (at least two, the former's own among them, all live
in the op's causal past) and an end time. Each member cell sends a delegate
under a mandate scoped to the council (a ``mandate.grant`` with a ``council``
field, checked by :mod:`archipel.crdt.mandates`). Members of member cells
address the council with directives and evaluations (reverse mandates).
Delegates act for the council with decisions, minutes and dissolution, each
naming the mandate it is done under; the liveness rule is the mandates
module's (:meth:`Mandates.check_use`), which also closes every mandate of a
council once it is dissolved or past its end time.

Counting follows the mandates rule: a decision or minutes counts only if it is
in the causal past of every dissolution of the council (and of every recall
of its mandate, and is not discounted by the authority). A dissolution is a
removal and always counts. A directive concurrent with a dissolution is kept
but marked as not counted; evaluations may come at any time, also after the
council closed (cells judge a council's work after it is done). A closed
council stays readable as an archive.

This record needs :class:`~archipel.crdt.mandates.Mandates` in the same
replica: it registers its councils, dissolutions and council acts there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._canonical import Value
from ._errors import RuleViolation
from ._hlc import ts_ms
from ._op import Op
from ._record import Record, field_bytes, field_ids, field_int, field_str, only_fields
from .mandates import (
    CONCURRENT_WITH_DISSOLUTION,
    LIVE,
    MAX_MS,
    MAX_TEXT,
    REVOKED_KEY,
    CouncilTerms,
    Mandates,
    MandateState,
)

if TYPE_CHECKING:
    from ._replica import Replica

FORM = "council.form"
DIRECTIVE = "council.directive"
EVALUATION = "council.evaluation"
DECISION = "council.decision"
MINUTES = "council.minutes"
DISSOLVE = "council.dissolve"
DELEGATE_ACTS = (DECISION, MINUTES, DISSOLVE)

MAX_CELLS = 64
_FORM_FIELDS = frozenset({"task", "cells", "ends"})
_ADDRESS_FIELDS = frozenset({"council", "text"})
_ACT_FIELDS = frozenset({"council", "mandate", "text"})

# A council's status at a given time.
OPEN = "open"
DISSOLVED = "dissolved"
ENDED = "ended"


@dataclass(frozen=True, slots=True)
class Council:
    """A formed council; its id is the ``council.form`` op's id."""

    id: bytes
    ts: int
    task: str
    cells: tuple[bytes, ...]  # sorted cell ids
    formed_by: bytes  # the forming member's cell
    author: bytes
    ends_ms: int


@dataclass(frozen=True, slots=True)
class CouncilEntry:
    """A directive, evaluation, decision, minutes or dissolution."""

    op: bytes
    kind: str
    author: bytes
    cell: bytes
    ts: int
    text: str
    mandate: bytes | None  # delegate acts: the mandate they were done under
    counted: bool
    why: str | None


@dataclass(frozen=True, slots=True)
class CouncilState:
    """A council as seen at ``now_ms``: everything it holds, and what counts."""

    council: Council
    status: str  # OPEN, DISSOLVED or ENDED
    delegates: tuple[MandateState, ...]  # live council mandates at now_ms
    directives: tuple[CouncilEntry, ...]
    evaluations: tuple[CouncilEntry, ...]
    decisions: tuple[CouncilEntry, ...]
    minutes: tuple[CouncilEntry, ...]
    dissolutions: tuple[CouncilEntry, ...]


@dataclass(frozen=True, slots=True)
class CouncilSummary:
    council: Council
    status: str


def _field_cells(body: Mapping[str, Value]) -> tuple[bytes, ...]:
    """The field 'cells': 2 to MAX_CELLS cell ids, sorted, without repeats."""
    return field_ids(body, "cells", noun="cell ids", min_count=2, max_count=MAX_CELLS)


class Councils(Record):
    """Every council in the federation and what was said and done in it."""

    op_kinds = (FORM, DIRECTIVE, EVALUATION, DECISION, MINUTES, DISSOLVE)
    ref_fields = {
        DIRECTIVE: ("council",),
        EVALUATION: ("council",),
        DECISION: ("council", "mandate"),
        MINUTES: ("council", "mandate"),
        DISSOLVE: ("council", "mandate"),
    }

    def __init__(self, replica: Replica) -> None:
        super().__init__(replica)
        self._councils: dict[bytes, Council] = {}
        self._entries: dict[bytes, list[bytes]] = {}  # council -> op ids addressed to it

    @property
    def _mandates(self) -> Mandates:
        try:
            return self.replica.record(Mandates)
        except KeyError:
            raise RuntimeError("the councils record needs the mandates record") from None

    # -- validation ---------------------------------------------------------

    def validate(self, op: Op) -> None:
        if op.kind == FORM:
            self._validate_form(op)
            return
        if op.kind in (DIRECTIVE, EVALUATION):
            only_fields(op.body, _ADDRESS_FIELDS)
        else:
            only_fields(op.body, _ACT_FIELDS)
        council = self._council_ref(op)
        field_str(op.body, "text", min_len=1, max_len=MAX_TEXT)
        if op.kind in (DIRECTIVE, EVALUATION):
            cell = self.replica.authority.require_member(op).cell
            if cell not in council.cells:
                raise RuleViolation(f"only members of the council's cells may send a {op.kind}")
            closed = self._mandates.council_closed(council.id, op) if op.kind == DIRECTIVE else None
            if closed is not None:
                raise RuleViolation(f"too late for a directive: {closed}")
            return
        mandate = self._mandates.mandate(field_bytes(op.body, "mandate"))
        if mandate is None:
            raise RuleViolation("field 'mandate' must name a mandate.grant op")
        if mandate.council != council.id:
            raise RuleViolation("the mandate is not scoped to this council")
        self._mandates.check_use(op, mandate.id)

    def _validate_form(self, op: Op) -> None:
        only_fields(op.body, _FORM_FIELDS)
        own = self.replica.authority.require_member(op).cell
        field_str(op.body, "task", min_len=1, max_len=MAX_TEXT)
        cells = _field_cells(op.body)
        ends = field_int(op.body, "ends", 1, MAX_MS)
        if own not in cells:
            raise RuleViolation("the forming member's cell must be among the council's cells")
        for cell in cells:
            if not self.replica.authority.cell_is_live(cell, op):
                raise RuleViolation(f"cell {cell.hex()[:16]} is not a live cell")
        at = ts_ms(op.ts)
        if ends <= at:
            raise RuleViolation(f"the end time ({ends}) must be after the op's time ({at})")
        longest = self.replica.authority.params.council_max_ms
        if ends > at + longest:
            raise RuleViolation(
                f"the end time may be at most {longest} ms after the op's time (council_max_ms)"
            )

    def _council_ref(self, op: Op) -> Council:
        council = self._councils.get(field_bytes(op.body, "council"))
        if council is None:
            raise RuleViolation("field 'council' must name a council.form op")
        return council

    # -- applying -----------------------------------------------------------

    def apply(self, op: Op) -> None:
        if op.kind == FORM:
            council = Council(
                id=op.id,
                ts=op.ts,
                task=field_str(op.body, "task", max_len=MAX_TEXT),
                cells=_field_cells(op.body),
                formed_by=self.replica.authority.author_grant(op).cell,
                author=op.author,
                ends_ms=field_int(op.body, "ends", 1, MAX_MS),
            )
            self._councils[op.id] = council
            self._mandates.register_council(
                CouncilTerms(council.id, frozenset(council.cells), council.ends_ms)
            )
            return
        council_id = field_bytes(op.body, "council")
        self._entries.setdefault(council_id, []).append(op.id)
        if op.kind in DELEGATE_ACTS:
            mandate = field_bytes(op.body, "mandate")
            self._mandates.register_use(mandate, op.id, removal=op.kind == DISSOLVE)
        if op.kind == DISSOLVE:
            self._mandates.register_dissolution(council_id, op.id)

    # -- queries ------------------------------------------------------------

    def council(self, ident: bytes) -> Council | None:
        return self._councils.get(ident)

    def councils(self, now_ms: int) -> list[CouncilSummary]:
        """Every council ever formed, oldest first, with its status at ``now_ms``."""
        ordered = sorted(self._councils.values(), key=lambda c: (c.ts, c.id))
        return [CouncilSummary(c, self._status(c, now_ms)) for c in ordered]

    def _status(self, council: Council, now_ms: int) -> str:
        if any(self.graph[i].kind == DISSOLVE for i in self._entries.get(council.id, ())):
            return DISSOLVED
        return ENDED if now_ms >= council.ends_ms else OPEN

    def state(self, ident: bytes, now_ms: int) -> CouncilState:
        """The council at ``now_ms``: its status, its delegates with live
        mandates, and everything addressed to it or done in it."""
        council = self._councils[ident]
        ops = sorted((self.graph[i] for i in self._entries.get(ident, ())),
                     key=lambda op: (op.ts, op.id))  # fmt: skip
        dissolutions = [op.id for op in ops if op.kind == DISSOLVE]
        by_kind: dict[str, list[CouncilEntry]] = {kind: [] for kind in self.op_kinds}
        for op in ops:
            by_kind[op.kind].append(self._entry(op, dissolutions))
        states = (self._mandates.state(m.id, now_ms) for m in self._mandates.scoped_to(ident))
        return CouncilState(
            council=council,
            status=self._status(council, now_ms),
            delegates=tuple(s for s in states if s.status == LIVE),
            directives=tuple(by_kind[DIRECTIVE]),
            evaluations=tuple(by_kind[EVALUATION]),
            decisions=tuple(by_kind[DECISION]),
            minutes=tuple(by_kind[MINUTES]),
            dissolutions=tuple(by_kind[DISSOLVE]),
        )

    def _entry(self, op: Op, dissolutions: list[bytes]) -> CouncilEntry:
        mandate = op.body.get("mandate")
        why: str | None
        if op.kind in DELEGATE_ACTS:
            why = self._mandates.why_not_counted(op.id)
        elif not self.replica.authority.counts(op):
            why = REVOKED_KEY
        elif op.kind == DIRECTIVE and any(not self.graph.precedes(op.id, d) for d in dissolutions):
            why = CONCURRENT_WITH_DISSOLUTION
        else:
            why = None
        return CouncilEntry(
            op=op.id,
            kind=op.kind,
            author=op.author,
            cell=self.replica.authority.author_grant(op).cell,
            ts=op.ts,
            text=field_str(op.body, "text", max_len=MAX_TEXT),
            mandate=mandate if isinstance(mandate, bytes) else None,
            counted=why is None,
            why=why,
        )

    # -- building bodies ----------------------------------------------------

    def form_body(
        self, task: str, cells: list[bytes], now_ms: int, duration_ms: int
    ) -> dict[str, Value]:
        """The body of a ``council.form`` for ``cells`` (any order), ending
        ``duration_ms`` after ``now_ms``."""
        return {"task": task, "cells": tuple(sorted(set(cells))), "ends": now_ms + duration_ms}
