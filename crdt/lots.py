"""Roles by lot: a verifiable draw among eligible members, by commit and reveal.

Theory of operation. A ``lot.open`` names a role, the eligible members, the
number of seats, the participating cells and two deadlines. Until the commit
deadline each participating cell commits to a 32-byte secret (``lot.commit``,
a BLAKE2b hash bound to the draw and the cell); between the two deadlines it
reveals the secret (``lot.reveal``). After the reveal deadline each cell
*closes* the draw once (``lot.close``): the close attests the commits and
reveals in its causal past.

Which reveals count is decided by the closes, not by timestamps (a timestamp
is whatever its author wrote, so a cell could backdate a reveal it withheld).
A cell's secret counts when a close **by another cell** has the cell's reveal
in its causal past: no cell can attest itself, and a close can add reveals
but never hide one that another close attests. The draw is decided once
closes from two cells count; the seed is BLAKE2b over the draw's id and the
counted ``(cell, secret)`` pairs, and the seats go to the eligible keys with
the smallest ``BLAKE2b(seed || key)`` (:func:`recompute_draw`, usable by
anyone outside a replica). A cell with two different commitments attested is
excluded, so a hidden, backdated second commitment never gives it a choice.
Fewer than two counted cells: the draw fails and must be opened again. A
window includes its closing instant: a commit dated at the commit deadline
is in time, a reveal must be dated after it and at the latest at the reveal
deadline, a close after that.

``apply`` only stores facts (opens, commits, reveals, closes by op id); every
decision is a query over the whole set, so delivery order does not matter.
Remove wins: an op whose author was revoked (or cell expelled) concurrently
does not count. See docs/records/lots.md for the rules as tables.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from ._canonical import Value
from ._errors import RuleViolation
from ._hlc import ts_ms
from ._op import Op
from ._record import Record, field_bytes, field_int, field_keys, field_str, only_fields
from .authority import MEMBER, Grant

if TYPE_CHECKING:
    from ._replica import Replica

OPEN = "lot.open"
COMMIT = "lot.commit"
REVEAL = "lot.reveal"
CLOSE = "lot.close"

COMMIT_DOMAIN = b"archipel/lot/commit/v1\x00"
SEED_DOMAIN = b"archipel/lot/seed/v1\x00"
RANK_DOMAIN = b"archipel/lot/rank/v1\x00"

ID_SIZE = 32
SECRET_SIZE = 32
MAX_ROLE = 200
MAX_ELIGIBLE = 256
MIN_CELLS = 2
MAX_CELLS = 64
MIN_REVEALS = 2
"""A draw needs the secrets of at least this many cells, or it fails."""
MIN_CLOSERS = 2
"""Closes from this many distinct cells decide a draw (each attests the other)."""
MIN_WINDOW_MS = 60_000
MAX_WINDOW_MS = 30 * 24 * 3600 * 1000

_OPEN_FIELDS = frozenset({"role", "eligible", "seats", "cells", "commit_by", "reveal_by"})
_COMMIT_FIELDS = frozenset({"lot", "hash"})
_REVEAL_FIELDS = frozenset({"commit", "secret"})
_CLOSE_FIELDS = frozenset({"lot"})


class Phase(Enum):
    """Where a draw stands, at a given time and with the ops held."""

    COMMITTING = "committing"
    REVEALING = "revealing"
    AWAITING_CLOSE = "awaiting close"
    CLOSED = "closed"
    FAILED = "failed"
    VOID = "void"
    """The open does not count: its author's key was revoked (or cell expelled)
    concurrently with it."""


@dataclass(frozen=True, slots=True)
class Lot:
    """A draw as opened: what is drawn, among whom, by which cells, until when."""

    id: bytes
    opener: bytes
    ts: int
    role: str
    eligible: tuple[bytes, ...]
    seats: int
    cells: tuple[bytes, ...]
    commit_by: int
    reveal_by: int


@dataclass(frozen=True, slots=True)
class DrawState:
    """A draw's state at ``now``. Cell tuples are sorted by cell id; ``result``
    lists the drawn keys in draw order (empty unless the phase is CLOSED)."""

    lot: Lot
    phase: Phase
    committed: tuple[bytes, ...]
    """Cells with a commitment that counts (everything held)."""
    conflicting: tuple[bytes, ...]
    """Cells with two different commitments that count: they will be excluded."""
    revealed: tuple[bytes, ...]
    """Cells with a matching reveal that counts (everything held)."""
    closed_by: tuple[bytes, ...]
    settled: bool
    """Every participating cell has closed: no cell acting alone can change the
    result any more (only a revocation concurrent with an act it rests on)."""
    counted: tuple[bytes, ...]
    """Cells whose secrets make the seed (attested by another cell's close)."""
    excluded: tuple[bytes, ...]
    """Participating cells whose secret is not in the seed (once decided)."""
    result: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class _Commit:
    id: bytes
    lot: bytes
    cell: bytes
    hash: bytes


@dataclass(frozen=True, slots=True)
class _Reveal:
    id: bytes
    commit: bytes
    cell: bytes
    secret: bytes


@dataclass(frozen=True, slots=True)
class _Close:
    id: bytes
    cell: bytes


# -- the draw itself: pure functions anyone can run -------------------------


def commitment(lot_id: bytes, cell: bytes, secret: bytes) -> bytes:
    """The hash a cell commits to. Bound to the draw and the cell, so a cell
    cannot copy another's commitment and mirror its reveal, nor reuse one."""
    for name, value, size in (("lot", lot_id, ID_SIZE), ("cell", cell, ID_SIZE),
                              ("secret", secret, SECRET_SIZE)):  # fmt: skip
        if len(value) != size:
            raise ValueError(f"{name} must be {size} bytes")
    return hashlib.blake2b(COMMIT_DOMAIN + lot_id + cell + secret, digest_size=32).digest()


def draw_seed(lot_id: bytes, reveals: Iterable[tuple[bytes, bytes]]) -> bytes:
    """BLAKE2b-256 over the domain, the draw's id and the ``(cell, secret)``
    pairs sorted by cell. Raises ValueError for fewer than two cells, repeated
    cells or wrong sizes (every part has a fixed size, so no ambiguity)."""
    pairs = sorted(reveals)
    if len(pairs) < MIN_REVEALS:
        raise ValueError(f"a draw needs the secrets of at least {MIN_REVEALS} cells")
    if len(lot_id) != ID_SIZE:
        raise ValueError(f"the draw id must be {ID_SIZE} bytes")
    seed = hashlib.blake2b(SEED_DOMAIN + lot_id, digest_size=32)
    previous = b""
    for cell, secret in pairs:
        if len(cell) != ID_SIZE or len(secret) != SECRET_SIZE:
            raise ValueError(f"cells and secrets must be {ID_SIZE} and {SECRET_SIZE} bytes")
        if cell == previous:
            raise ValueError("each cell may contribute one secret")
        previous = cell
        seed.update(cell + secret)
    return seed.digest()


def recompute_draw(
    open_op_id: bytes,
    eligible: Iterable[bytes],
    seats: int,
    reveals: Iterable[tuple[bytes, bytes]],
) -> tuple[bytes, ...]:
    """The drawn keys, in draw order: the ``seats`` eligible keys with the
    smallest ``BLAKE2b(domain || seed || key)`` (ties, never expected, by key).

    ``reveals`` are the counted ``(cell id, secret)`` pairs in any order. A
    pure function of public data: anyone can check a replica's result.
    """
    keys = sorted(set(eligible))
    if any(len(k) != 32 for k in keys):
        raise ValueError("eligible keys must be 32 bytes")
    if not 1 <= seats <= len(keys):
        raise ValueError(f"seats must be from 1 to {len(keys)} (the eligible keys)")
    seed = draw_seed(open_op_id, reveals)

    def rank(key: bytes) -> tuple[bytes, bytes]:
        return hashlib.blake2b(RANK_DOMAIN + seed + key, digest_size=32).digest(), key

    return tuple(sorted(keys, key=rank)[:seats])


# -- parsing ------------------------------------------------------------------


def _field_ids(body: Mapping[str, Value], name: str, low: int, high: int) -> tuple[bytes, ...]:
    """The field ``name``: a sorted array of ``low`` to ``high`` distinct 32-byte ids."""
    value = body.get(name)
    if not isinstance(value, tuple) or not low <= len(value) <= high:
        raise RuleViolation(f"field {name!r} must be an array of {low} to {high} cell ids")
    previous = b""
    for item in value:
        if not isinstance(item, bytes) or len(item) != ID_SIZE:
            raise RuleViolation(f"field {name!r} must hold {ID_SIZE}-byte cell ids")
        if item <= previous:
            raise RuleViolation(f"field {name!r} must be sorted without repeats")
        previous = item
    return value


def parse_open(op: Op) -> Lot:
    """A ``lot.open`` body, checked on its own (the causal-past checks are
    :meth:`Lots.validate`'s). Deadlines are wall ms after the open's time."""
    body = op.body
    only_fields(body, _OPEN_FIELDS)
    eligible = field_keys(body, "eligible", min_count=1, max_count=MAX_ELIGIBLE)
    opened = ts_ms(op.ts)
    commit_by = _deadline(body, "commit_by", opened, "the open")
    return Lot(
        id=op.id,
        opener=op.author,
        ts=op.ts,
        role=field_str(body, "role", min_len=1, max_len=MAX_ROLE),
        eligible=eligible,
        seats=field_int(body, "seats", 1, len(eligible)),
        cells=_field_ids(body, "cells", MIN_CELLS, MAX_CELLS),
        commit_by=commit_by,
        reveal_by=_deadline(body, "reveal_by", commit_by, "the commit deadline"),
    )


def _deadline(body: Mapping[str, Value], name: str, after: int, what: str) -> int:
    value = body.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise RuleViolation(f"field {name!r} must be an integer (wall ms)")
    if not after + MIN_WINDOW_MS <= value <= after + MAX_WINDOW_MS:
        raise RuleViolation(
            f"field {name!r} must be 1 minute to 30 days after {what} ({after} ms), not {value}"
        )
    return value


# -- the record ---------------------------------------------------------------


class Lots(Record):
    """Every draw in the federation: its commits, reveals, closes and result."""

    op_kinds = (OPEN, COMMIT, REVEAL, CLOSE)
    ref_fields = {COMMIT: ("lot",), REVEAL: ("commit",), CLOSE: ("lot",)}

    def __init__(self, replica: Replica) -> None:
        super().__init__(replica)
        self._lots: dict[bytes, Lot] = {}
        self._commits: dict[bytes, dict[bytes, _Commit]] = {}  # lot -> commit id -> commit
        self._commit_index: dict[bytes, _Commit] = {}  # commit id -> commit
        self._reveals: dict[bytes, dict[bytes, _Reveal]] = {}  # lot -> reveal id -> reveal
        self._closes: dict[bytes, dict[bytes, _Close]] = {}  # lot -> close id -> close

    # -- validation -----------------------------------------------------------

    def validate(self, op: Op) -> None:
        grant = self.replica.authority.require_member(op)
        if op.kind == OPEN:
            self._validate_open(op)
        elif op.kind == COMMIT:
            self._validate_commit(op, grant)
        elif op.kind == REVEAL:
            self._validate_reveal(op, grant)
        elif op.kind == CLOSE:
            self._validate_close(op, grant)

    def _validate_open(self, op: Op) -> None:
        lot = self.parse_once(op, parse_open)
        authority = self.replica.authority
        live: dict[bytes, bool] = {}
        for key in lot.eligible:
            grant = authority.grant_in_view(key, op)
            if (
                grant is None
                or grant.role != MEMBER
                or authority.is_revoked(key, op)
                or not self._cell_live(grant.cell, op, live)
            ):
                raise RuleViolation(f"eligible key {key.hex()[:16]} is not a member of a live cell")
        for cell in lot.cells:
            if not self._cell_live(cell, op, live):
                raise RuleViolation(f"participating cell {cell.hex()[:16]} is not a live cell")

    def _validate_commit(self, op: Op, grant: Grant) -> None:
        only_fields(op.body, _COMMIT_FIELDS)
        lot = self._lot_named(op)
        field_bytes(op.body, "hash", 32)
        self._require_participant(lot, grant, "commit")
        if ts_ms(op.ts) > lot.commit_by:
            raise RuleViolation("the commit deadline has passed")
        for earlier in self._commits.get(lot.id, {}).values():
            if earlier.cell == grant.cell and self._counts_before(earlier.id, op):
                raise RuleViolation("this cell has already committed to this draw")

    def _validate_reveal(self, op: Op, grant: Grant) -> None:
        only_fields(op.body, _REVEAL_FIELDS)
        ref = field_bytes(op.body, "commit")
        if self.graph[ref].kind != COMMIT:
            raise RuleViolation("field 'commit' must name a lot.commit op")
        commit = self._commit_index[ref]
        lot = self._lots[commit.lot]
        secret = field_bytes(op.body, "secret", SECRET_SIZE)
        if grant.cell != commit.cell:
            raise RuleViolation("only a member of the committing cell can reveal its secret")
        at = ts_ms(op.ts)
        if at <= lot.commit_by:
            raise RuleViolation("too early: reveal after the commit deadline")
        if at > lot.reveal_by:
            raise RuleViolation("the reveal deadline has passed")
        if commitment(lot.id, commit.cell, secret) != commit.hash:
            raise RuleViolation("the secret does not match the commitment")
        for earlier in self._reveals.get(lot.id, {}).values():
            if earlier.commit == ref and self._counts_before(earlier.id, op):
                raise RuleViolation("this commitment is already revealed")

    def _validate_close(self, op: Op, grant: Grant) -> None:
        only_fields(op.body, _CLOSE_FIELDS)
        lot = self._lot_named(op)
        self._require_participant(lot, grant, "close")
        if ts_ms(op.ts) <= lot.reveal_by:
            raise RuleViolation("too early: a draw is closed after its reveal deadline")
        for earlier in self._closes.get(lot.id, {}).values():
            if earlier.cell == grant.cell and self._counts_before(earlier.id, op):
                raise RuleViolation("this cell has already closed this draw")

    def _lot_named(self, op: Op) -> Lot:
        ref = field_bytes(op.body, "lot")
        if self.graph[ref].kind != OPEN:
            raise RuleViolation("field 'lot' must name a lot.open op")
        return self._lots[ref]

    @staticmethod
    def _require_participant(lot: Lot, grant: Grant, act: str) -> None:
        if grant.cell not in lot.cells:
            raise RuleViolation(f"only a member of a participating cell can {act} this draw")

    def _counts_before(self, earlier: bytes, op: Op) -> bool:
        """``earlier`` is in ``op``'s causal past and counts there. The counting
        check (a slow path) runs only for the rare op that has such a past."""
        return self.graph.precedes(earlier, op) and self.replica.authority.counts(earlier, op)

    def _cell_live(self, cell: bytes, view: Op, cache: dict[bytes, bool]) -> bool:
        """``authority.cell_is_live``, cached for the many keys of one cell."""
        if cell not in cache:
            cache[cell] = self.replica.authority.cell_is_live(cell, view)
        return cache[cell]

    # -- applying -------------------------------------------------------------

    def apply(self, op: Op) -> None:
        if op.kind == OPEN:
            self._lots[op.id] = self.parse_once(op, parse_open)
        elif op.kind == COMMIT:
            lot = field_bytes(op.body, "lot")
            cell = self.replica.authority.author_grant(op).cell
            commit = _Commit(op.id, lot, cell, field_bytes(op.body, "hash"))
            self._commits.setdefault(lot, {})[op.id] = commit
            self._commit_index[op.id] = commit
        elif op.kind == REVEAL:
            commit = self._commit_index[field_bytes(op.body, "commit")]
            secret = field_bytes(op.body, "secret", SECRET_SIZE)
            reveal = _Reveal(op.id, commit.id, commit.cell, secret)
            self._reveals.setdefault(commit.lot, {})[op.id] = reveal
        elif op.kind == CLOSE:
            close = _Close(op.id, self.replica.authority.author_grant(op).cell)
            self._closes.setdefault(field_bytes(op.body, "lot"), {})[op.id] = close

    # -- queries --------------------------------------------------------------

    def lot(self, lot_id: bytes) -> Lot | None:
        """The draw opened by op ``lot_id``, as opened (whether it counts or not)."""
        return self._lots.get(lot_id)

    def draws(self, now_ms: int) -> list[DrawState]:
        """Every draw whose open counts, oldest first (ties by id)."""
        counts = self.replica.authority.counts
        lots = sorted((lot for lot in self._lots.values() if counts(lot.id)),
                      key=lambda lot: (lot.ts, lot.id))  # fmt: skip
        return [self._state(lot, now_ms) for lot in lots]

    def draw(self, lot_id: bytes, now_ms: int) -> DrawState | None:
        """The state of one draw at ``now_ms``; None if no such draw is held."""
        lot = self._lots.get(lot_id)
        return self._state(lot, now_ms) if lot is not None else None

    def result(self, lot_id: bytes) -> tuple[bytes, ...] | None:
        """The drawn keys in draw order once the draw is decided; None while it
        is not, or if it failed or does not count."""
        lot = self._lots.get(lot_id)
        if lot is None or not self.replica.authority.counts(lot.id):
            return None
        closers, counted = self._tally(lot)
        if len(closers) < MIN_CLOSERS or len(counted) < MIN_REVEALS:
            return None
        return recompute_draw(lot.id, lot.eligible, lot.seats, counted.items())

    def counted_reveals(self, lot_id: bytes) -> tuple[tuple[bytes, bytes], ...]:
        """The ``(cell, secret)`` pairs attested so far, sorted by cell."""
        lot = self._lots.get(lot_id)
        return tuple(sorted(self._tally(lot)[1].items())) if lot is not None else ()

    def _state(self, lot: Lot, now_ms: int) -> DrawState:
        counts = self.replica.authority.counts
        commits = [c for c in self._commits.get(lot.id, {}).values() if counts(c.id)]
        hashes: dict[bytes, set[bytes]] = {}
        for commit in commits:
            hashes.setdefault(commit.cell, set()).add(commit.hash)
        live_commits = {c.id for c in commits}
        revealed = {r.cell for r in self._reveals.get(lot.id, {}).values()
                    if r.commit in live_commits and counts(r.id)}  # fmt: skip
        closers, counted = self._tally(lot)
        decided = len(closers) >= MIN_CLOSERS
        result: tuple[bytes, ...] = ()
        if not counts(lot.id):
            phase = Phase.VOID
        elif decided:
            phase = Phase.CLOSED if len(counted) >= MIN_REVEALS else Phase.FAILED
            if phase is Phase.CLOSED:
                result = recompute_draw(lot.id, lot.eligible, lot.seats, counted.items())
        elif now_ms <= lot.commit_by:
            phase = Phase.COMMITTING
        elif now_ms <= lot.reveal_by:
            phase = Phase.REVEALING
        else:
            phase = Phase.AWAITING_CLOSE
        shown = decided and phase is not Phase.VOID
        return DrawState(
            lot=lot,
            phase=phase,
            committed=tuple(sorted(hashes)),
            conflicting=tuple(sorted(c for c, h in hashes.items() if len(h) > 1)),
            revealed=tuple(sorted(revealed)),
            closed_by=tuple(sorted(closers)),
            settled=shown and closers >= set(lot.cells),
            counted=tuple(sorted(counted)) if shown else (),
            excluded=tuple(c for c in lot.cells if c not in counted) if shown else (),
            result=result,
        )

    def _tally(self, lot: Lot) -> tuple[frozenset[bytes], dict[bytes, bytes]]:
        """The cells that closed, and each counted cell's secret.

        A cell's secret counts when a close that counts, by *another* cell, has
        in its causal past a reveal (that counts) of the cell's commitment, and
        the cell has no second, different commitment in any such close's past.
        """
        counts = self.replica.authority.counts
        closes = [c for c in self._closes.get(lot.id, {}).values() if counts(c.id)]
        commits = [c for c in self._commits.get(lot.id, {}).values() if counts(c.id)]
        reveals = [r for r in self._reveals.get(lot.id, {}).values() if counts(r.id)]
        counted: dict[bytes, bytes] = {}
        for cell in lot.cells:
            witnesses = [c.id for c in closes if c.cell != cell]
            own = {c.id: c.hash for c in commits
                   if c.cell == cell and self._attested(c.id, witnesses)}  # fmt: skip
            if len(set(own.values())) != 1:
                continue  # no commitment attested, or two different ones
            for reveal in reveals:
                if reveal.commit in own and self._attested(reveal.id, witnesses):
                    counted[cell] = reveal.secret
                    break
        return frozenset(c.cell for c in closes), counted

    def _attested(self, op_id: bytes, witnesses: list[bytes]) -> bool:
        """Whether op ``op_id`` is in the causal past of one of the ``witnesses``."""
        return any(self.graph.precedes(op_id, w) for w in witnesses)
