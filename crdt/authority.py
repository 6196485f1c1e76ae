"""Authority: who may sign ops in a federation, and whose ops still count.

Theory of operation. Cells are the federation's members; keys belong to
cells, as a *member* (a person) or a *device* (a node). A key is *granted* by
the genesis (founding cells), by the admission of a new cell (its first
keys), or by a ``key.add`` from a member of its cell. A member can revoke any
key of their own cell with ``key.revoke``; the federation expels a cell by a
sealed decision (see :mod:`archipel.crdt.decisions`).

Two questions, two answers:

- **Is an op valid?** Judged only against its causal past (its *view*): its
  author has exactly one grant in the view, the grant itself counts in the
  view, no revocation of the key and no expulsion of its cell is in the view,
  and an admitted cell's admission is complete in the view.
- **Does an op count?** Removal wins over concurrent use: an op counts only
  if it is in the causal past of every revocation of its author and every
  expulsion of its cell, and the grant that authorised its author counts too
  (a key added by a member concurrently revoked never counted). Removals
  always count: two members who revoke each other at once are both revoked.

Positive facts are made cheap: a key's grant is checked against the view once,
at the key's first op (seq 1); later ops inherit it through the author chain.
Negative facts (removals) are rare, and only keys they touch, directly or
through their grant, take the exact path, which searches the graph.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._errors import RuleViolation
from ._op import Op
from ._record import Record, field_bytes, field_choice, field_str, only_fields
from .genesis import KIND as GENESIS
from .genesis import Federation, FoundingCell, Params, cell_id, parse_cell, parse_genesis

if TYPE_CHECKING:
    from ._replica import Replica

ADMIT = "cell.admit"
ENDORSE = "cell.endorse"
KEY_ADD = "key.add"
KEY_REVOKE = "key.revoke"
MEMBER = "member"
DEVICE = "device"
ROLES = (MEMBER, DEVICE)

ExpellingSeals = Callable[[bytes, Op | None], tuple[bytes, ...]]


@dataclass(frozen=True, slots=True)
class Grant:
    """``key`` belongs to ``cell`` in ``role``, by op ``op``."""

    key: bytes
    cell: bytes
    role: str
    op: bytes


@dataclass(frozen=True, slots=True)
class Cell:
    id: bytes
    name: str
    created_by: bytes  # the genesis or the cell.admit op
    founding: bool


class Authority(Record):
    """Cells and keys. Owns the genesis, admissions, endorsements, key grants
    and revocations; answers validity and counting questions for every record."""

    op_kinds = (GENESIS, ADMIT, ENDORSE, KEY_ADD, KEY_REVOKE)
    ref_fields = {ENDORSE: ("admission",)}

    def __init__(self, replica: Replica) -> None:
        super().__init__(replica)
        self.federation: Federation | None = None
        self._cells: dict[bytes, Cell] = {}
        self._grants: dict[bytes, list[Grant]] = {}
        self._revocations: dict[bytes, list[bytes]] = {}  # key -> revoking op ids
        self._endorsements: dict[bytes, list[bytes]] = {}  # admission op -> endorsing op ids
        self._expel_proposals: dict[bytes, list[bytes]] = {}  # cell -> proposal op ids
        self._expelling_seals: ExpellingSeals | None = None
        self._tainted: dict[bytes, bool] = {}

    # -- validation ---------------------------------------------------------

    def validate(self, op: Op) -> None:
        if op.kind == GENESIS:
            parse_genesis(op)
            return
        grant = self.require_member(op)
        if op.kind == ADMIT:
            only_fields(op.body, frozenset({"name", "members", "devices"}))
            cell = parse_cell(op.body)
            for key in (*cell.members, *cell.devices):
                self._check_new_key(key, op)
        elif op.kind == ENDORSE:
            only_fields(op.body, frozenset({"admission"}))
            admission = self.graph[field_bytes(op.body, "admission")]
            if admission.kind != ADMIT:
                raise RuleViolation("field 'admission' must name a cell.admit op")
            if grant.cell == cell_id(admission.id, 0):
                raise RuleViolation("a cell cannot endorse its own admission")
        elif op.kind == KEY_ADD:
            only_fields(op.body, frozenset({"key", "role"}))
            field_choice(op.body, "role", ROLES)
            self._check_new_key(field_bytes(op.body, "key"), op)
        elif op.kind == KEY_REVOKE:
            only_fields(op.body, frozenset({"key"}))
            target = self.grant_in_view(field_bytes(op.body, "key"), op)
            if target is None or target.cell != grant.cell:
                raise RuleViolation("a member can revoke only keys of their own cell")

    def _check_new_key(self, key: bytes, view: Op) -> None:
        if any(self.graph.in_view(g.op, view) for g in self._grants.get(key, ())):
            raise RuleViolation(f"key {key.hex()[:16]} is already granted: make a new key")

    def check_author(self, op: Op) -> Grant:
        """The grant under which ``op``'s author may sign it, judged in its causal
        past; raises :class:`RuleViolation` saying why not."""
        grants = self._grants.get(op.author)
        if not grants:
            raise RuleViolation("the author's key is not authorised in this federation")
        if not self._is_tainted(op.author):
            (grant,) = grants
            if op.seq == 1 and grant.op != self._genesis_id():
                self._check_first_use(grant, op)
            return grant
        visible = self.grant_in_view(op.author, op)
        if visible is None:
            raise RuleViolation("the author's key is not (or not unambiguously) authorised")
        reason = self._discount_reason(op, op)
        if reason is not None:
            raise RuleViolation(reason)
        return visible

    def _check_first_use(self, grant: Grant, op: Op) -> None:
        if not self.graph.in_view(grant.op, op):
            raise RuleViolation("the author's key grant is not in the op's causal past")
        source = self.graph[grant.op]
        if source.kind == ADMIT and not self._admission_complete(source, op):
            raise RuleViolation("the author's cell is not admitted yet in the op's causal past")

    # -- applying -----------------------------------------------------------

    def apply(self, op: Op) -> None:
        if op.kind == GENESIS:
            self.federation = parse_genesis(op)
            for index, cell in enumerate(self.federation.cells):
                self._add_cell(cell_id(op.id, index), cell.name, op.id, cell, founding=True)
        elif op.kind == ADMIT:
            self._add_cell(cell_id(op.id, 0), field_str(op.body, "name"), op.id,
                           parse_cell(op.body), founding=False)  # fmt: skip
        elif op.kind == ENDORSE:
            self._endorsements.setdefault(field_bytes(op.body, "admission"), []).append(op.id)
        elif op.kind == KEY_ADD:
            own_cell = self.author_grant(op).cell
            role = field_choice(op.body, "role", ROLES)
            self._add_grant(Grant(field_bytes(op.body, "key"), own_cell, role, op.id))
        elif op.kind == KEY_REVOKE:
            self._revocations.setdefault(field_bytes(op.body, "key"), []).append(op.id)
            self._tainted.clear()

    def _add_cell(
        self, ident: bytes, name: str, by: bytes, cell: FoundingCell, founding: bool
    ) -> None:
        self._cells[ident] = Cell(ident, name, by, founding)
        for key in cell.members:
            self._add_grant(Grant(key, ident, MEMBER, by))
        for key in cell.devices:
            self._add_grant(Grant(key, ident, DEVICE, by))

    def _add_grant(self, grant: Grant) -> None:
        self._grants.setdefault(grant.key, []).append(grant)
        if len(self._grants[grant.key]) > 1:
            self._tainted.clear()

    def register_expulsion_proposal(
        self, cell: bytes, proposal: bytes, expelling_seals: ExpellingSeals
    ) -> None:
        """Called by the decisions record when a proposal to expel ``cell`` opens.

        ``expelling_seals(proposal, view)`` answers with the seals that carried
        the expulsion, as seen from ``view`` (none: not sealed, or not passed).
        """
        self._expel_proposals.setdefault(cell, []).append(proposal)
        self._expelling_seals = expelling_seals
        self._tainted.clear()

    # -- counting (remove wins) ---------------------------------------------

    def counts(self, op: Op | bytes, view: Op | None = None) -> bool:
        """Whether ``op`` counts, seen from ``view`` (default: everything held)."""
        if isinstance(op, bytes):
            op = self.graph[op]
        # An untouched key's ops count from any view that sees them.
        if op.kind == GENESIS or not self._is_tainted(op.author):
            return True
        return self._discount_reason(op, view) is None

    def _discount_reason(self, op: Op, view: Op | None) -> str | None:
        """Why ``op`` does not count from ``view``, or None if it does.

        Walks the chain of grants iteratively: the op's author's grant, the
        grant of that grant's signer, and so on back to the genesis.
        """
        current = op
        while current.kind != GENESIS:
            grant = self.grant_in_view(current.author, view)
            if grant is None:
                return "the key is not (or not unambiguously) authorised"
            for revocation in self._revocations.get(current.author, ()):
                if revocation != current.id and self._removes(revocation, current, view):
                    return "the key was revoked (a revocation not after this op)"
            for expulsion in self.expulsions(grant.cell, view):
                if self._removes(expulsion, current, view):
                    return "the cell was expelled (an expulsion not after this op)"
            source = self.graph[grant.op]
            if source.kind == ADMIT and not self._admission_complete(source, view):
                return "the cell's admission is not complete"
            current = source
        return None

    def _removes(self, remover: bytes, op: Op, view: Op | None) -> bool:
        """A visible remover discounts ``op`` unless ``op`` is in its causal past."""
        if not self.graph.in_view(remover, view):
            return False
        return op.id not in self.graph or not self.graph.precedes(op.id, remover)

    def _admission_complete(self, admission: Op, view: Op | None) -> bool:
        """Enough live cells back the admission, seen from ``view``."""
        assert self.federation is not None
        backers = {self._grants[admission.author][0].cell}
        for endorsement in self._endorsements.get(admission.id, ()):
            endorser = self.graph[endorsement]
            if self.graph.in_view(endorsement, view) and self.counts(endorser, view):
                grant = self.grant_in_view(endorser.author, view)
                if grant is not None:
                    backers.add(grant.cell)
        return len(backers) >= self.federation.params.admission_endorsements

    def _is_tainted(self, key: bytes) -> bool:
        """Whether a removal, a conflicting grant or an expulsion proposal touches
        ``key`` or anything its authority rests on (exact checks needed)."""
        cached = self._tainted.get(key)
        if cached is not None:
            return cached
        chain = []
        tainted = False
        stack = [key]
        while stack:
            current = stack.pop()
            known = self._tainted.get(current)
            if known is not None:
                tainted = tainted or known
                continue
            chain.append(current)
            grants = self._grants.get(current, ())
            if len(grants) != 1 or current in self._revocations:
                tainted = True
                break
            (grant,) = grants
            if grant.cell in self._expel_proposals:
                tainted = True
                break
            source = self.graph[grant.op]
            if source.kind != GENESIS:
                stack.append(source.author)
                if source.kind == ADMIT:
                    stack.extend(
                        self.graph[e].author for e in self._endorsements.get(source.id, ())
                    )
        for visited in chain:
            self._tainted[visited] = tainted
        return tainted

    # -- queries ------------------------------------------------------------

    def _genesis_id(self) -> bytes:
        assert self.federation is not None
        return self.federation.genesis

    @property
    def params(self) -> Params:
        assert self.federation is not None, "no genesis applied yet"
        return self.federation.params

    def grant_in_view(self, key: bytes, view: Op | None = None) -> Grant | None:
        """The grant of ``key`` visible from ``view``, if exactly one is."""
        visible = [g for g in self._grants.get(key, ()) if self.graph.in_view(g.op, view)]
        return visible[0] if len(visible) == 1 else None

    def author_grant(self, op: Op) -> Grant:
        """The grant of an op's author (call after :meth:`check_author` passed)."""
        grant = self.grant(op.author) or self.grant_in_view(op.author, op)
        assert grant is not None, "author_grant() before check_author()"
        return grant

    def require_member(self, op: Op) -> Grant:
        """The author's grant; raises unless the author is a member (a person)."""
        grant = self.author_grant(op)
        if grant.role != MEMBER:
            raise RuleViolation(f"{op.kind} is an act of a member, not of a device")
        return grant

    def grant(self, key: bytes) -> Grant | None:
        """The key's grant, if it has exactly one (whatever its state)."""
        grants = self._grants.get(key, ())
        return grants[0] if len(grants) == 1 else None

    def cell_of(self, key: bytes) -> bytes | None:
        grant = self.grant(key)
        return grant.cell if grant is not None else None

    def expulsions(self, cell: bytes, view: Op | None = None) -> Iterator[bytes]:
        """Ids of the seals that expel ``cell``, as seen from ``view``."""
        if cell not in self._expel_proposals or self._expelling_seals is None:
            return
        for proposal in self._expel_proposals[cell]:
            yield from self._expelling_seals(proposal, view)

    def cell(self, ident: bytes) -> Cell | None:
        return self._cells.get(ident)

    def cells(self, view: Op | None = None) -> list[Cell]:
        """The cells admitted and not expelled, as seen from ``view``."""
        return [c for c in self._cells.values() if self.cell_is_live(c.id, view)]

    def cell_is_live(self, ident: bytes, view: Op | None = None) -> bool:
        cell = self._cells.get(ident)
        if cell is None or not self.graph.in_view(cell.created_by, view):
            return False
        if not cell.founding:
            admission = self.graph[cell.created_by]
            if not self.counts(admission, view) or not self._admission_complete(admission, view):
                return False
        return not any(True for _ in self.expulsions(ident, view))

    def keys_of(self, cell: bytes, view: Op | None = None, role: str | None = None) -> list[bytes]:
        """The keys of ``cell`` that are granted and not revoked, seen from ``view``."""
        keys = []
        for key in self._grants:
            grant = self.grant_in_view(key, view)
            if grant is None or grant.cell != cell or (role is not None and grant.role != role):
                continue
            if any(self.graph.in_view(r, view) for r in self._revocations.get(key, ())):
                continue
            keys.append(key)
        return sorted(keys)

    def is_live_member(self, key: bytes, view: Op | None = None) -> bool:
        """Whether ``key`` is a member (a person) of a live cell, seen from ``view``.

        O(1) for a founding key no removal touches; otherwise the exact checks.
        """
        grant = self.grant(key)
        if grant is not None and not self._is_tainted(key) and grant.op == self._genesis_id():
            return grant.role == MEMBER
        grant = self.grant_in_view(key, view)
        return (
            grant is not None
            and grant.role == MEMBER
            and not self.is_revoked(key, view)
            and self.cell_is_live(grant.cell, view)
        )

    def is_revoked(self, key: bytes, view: Op | None = None) -> bool:
        return any(self.graph.in_view(r, view) for r in self._revocations.get(key, ()))

    def role_of(self, key: bytes) -> str | None:
        grant = self.grant(key)
        return grant.role if grant is not None else None
