"""Pulse: how the federation is doing, derived from the op graph.

Theory of operation. Three measures, all pure functions of the ops held and
``now_ms``:

- **Divergence index**: how many proposals are open at a moment, sampled over a
  span ("open proposals per round"). Many open proposals at once means the
  federation is deciding more than it settles.
- **Response time**: for an op of one cell, the delay until the first op of
  another cell that names it as a dep (a reply that saw it): the minimum
  (ts, id) over replies, computed from the graph when asked, so arrival order
  does not matter and ingest pays nothing for it.
- **Frustration log**: short entries signed by a cell's *device* key (the
  cell's node, not a person), so the log names the cell and never the member.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._errors import RuleViolation
from ._hlc import ts_ms
from ._op import Op
from ._record import Record, field_str, only_fields
from .authority import DEVICE
from .decisions import Decisions

if TYPE_CHECKING:
    from ._replica import Replica

FRUSTRATION = "pulse.frustration"


@dataclass(frozen=True, slots=True)
class Frustration:
    id: bytes
    cell: bytes
    at_ms: int
    text: str


@dataclass(frozen=True, slots=True)
class ResponseTimes:
    """Delays (ms) between ops of ``cell`` and the first reply of ``by`` (a cell)."""

    cell: bytes
    by: bytes
    count: int
    median_ms: float
    max_ms: int


class Pulse(Record):
    """Frustration entries, and the first replies between cells."""

    op_kinds = (FRUSTRATION,)

    def __init__(self, replica: Replica) -> None:
        super().__init__(replica)
        self._frustrations: dict[bytes, Frustration] = {}

    def validate(self, op: Op) -> None:
        grant = self.replica.authority.author_grant(op)
        if grant.role != DEVICE:
            raise RuleViolation(
                "a frustration entry is signed by the cell's device key, so it names no member"
            )
        only_fields(op.body, frozenset({"text"}))
        field_str(op.body, "text", min_len=1, max_len=2000)

    def apply(self, op: Op) -> None:
        cell = self.replica.authority.cell_of(op.author)
        assert cell is not None
        text = field_str(op.body, "text", max_len=2000)
        self._frustrations[op.id] = Frustration(op.id, cell, ts_ms(op.ts), text)

    # -- queries ------------------------------------------------------------

    def divergence(self, start_ms: int, end_ms: int, step_ms: int) -> list[tuple[int, int]]:
        """(moment, open proposals) from ``start_ms`` to ``end_ms`` every ``step_ms``."""
        if step_ms <= 0 or end_ms < start_ms:
            raise ValueError("need step_ms > 0 and end_ms >= start_ms")
        decisions = self.replica.record(Decisions)
        return [
            (moment, len(decisions.open_at(moment)))
            for moment in range(start_ms, end_ms + 1, step_ms)
        ]

    def response_times(self) -> list[ResponseTimes]:
        """Per (cell, replying cell): how fast the second answered the first.

        Computed from the whole graph when asked (nothing is kept per op): for
        each op, the earliest (ts, id) op of each other cell naming it as a dep.
        """
        cell_of = self.replica.authority.cell_of
        first: dict[tuple[bytes, bytes], tuple[int, bytes]] = {}  # (op, cell) -> reply
        for op in self.graph.topological():
            cell = cell_of(op.author)
            if cell is None:
                continue
            for dep in op.deps:
                key = (dep, cell)
                if key not in first or (op.ts, op.id) < first[key]:
                    first[key] = (op.ts, op.id)
        delays: dict[tuple[bytes, bytes], list[int]] = {}
        for (op_id, by), (reply_ts, _) in first.items():
            original = self.graph[op_id]
            cell = cell_of(original.author)
            if original.kind == "genesis" or cell is None or cell == by:
                continue
            delays.setdefault((cell, by), []).append(ts_ms(reply_ts) - ts_ms(original.ts))
        return [
            ResponseTimes(cell, by, len(d), statistics.median(d), max(d))
            for (cell, by), d in sorted(delays.items())
        ]

    def frustrations(self, cell: bytes | None = None) -> list[Frustration]:
        """The frustration log (of one cell, or all), oldest first; only entries
        that count (a device key revoked concurrently does not)."""
        authority = self.replica.authority
        return sorted(
            (
                f
                for f in self._frustrations.values()
                if (cell is None or f.cell == cell) and authority.counts(f.id)
            ),
            key=lambda f: (f.at_ms, f.id),
        )
