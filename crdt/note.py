"""Signed notes: the simplest record kind, a public message to the federation.

It exists to exercise the op machinery end to end (and stays useful as an
announcement line). Any key of a live cell may write one. Notes are a
grow-only set: applying them in any order gives the same state, and the
listing is ordered by ``(ts, id)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._op import Op
from ._record import Record, field_str, only_fields

if TYPE_CHECKING:
    from ._replica import Replica

KIND = "note"
MAX_TEXT = 4000
_FIELDS = frozenset({"text"})


@dataclass(frozen=True, slots=True)
class Note:
    id: bytes
    author: bytes
    ts: int
    text: str


class Notes(Record):
    """Every note in the federation."""

    op_kinds = (KIND,)

    def __init__(self, replica: Replica) -> None:
        super().__init__(replica)
        self._notes: dict[bytes, Note] = {}

    def validate(self, op: Op) -> None:
        only_fields(op.body, _FIELDS)
        field_str(op.body, "text", min_len=1, max_len=MAX_TEXT)

    def apply(self, op: Op) -> None:
        self._notes[op.id] = Note(op.id, op.author, op.ts, field_str(op.body, "text"))

    def all(self) -> list[Note]:
        """Every note that counts, oldest first (ties by id). A note by a key
        revoked, or a cell expelled, concurrently with it does not count."""
        counts = self.replica.authority.counts
        return sorted((n for n in self._notes.values() if counts(n.id)), key=lambda n: (n.ts, n.id))
