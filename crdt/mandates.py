"""Mandates: written, time-bound, recallable authority that a cell gives a delegate.

Theory of operation. A member of a cell signs a ``mandate.grant``: the cell
(the *issuer*) gives a delegate (a member key of a live cell) written
instructions, a scope and an expiry. The scope is either a list of kinds of
act (a general mandate, acted on with ``mandate.act``) or one council (acted
on with the council's own ops, see :mod:`archipel.crdt.councils`). Any member
of the issuing cell may renew the mandate (``mandate.renew``, a later expiry)
or recall it (``mandate.recall``) at any moment. A mandate lapses at its
expiry with no op at all, and a council mandate also lapses when its council
is dissolved or reaches its end time.

Two questions, two answers (as in :mod:`archipel.crdt.authority`):

- **Is an act valid?** Judged against its causal past only
  (:meth:`Mandates.not_live_reason`): by the delegate, no recall of the
  mandate in view, no dissolution of its council in view, and the act's time
  before the expiry seen in view (the grant's or a renewal's in view) and
  before the council's end.
- **Does an act count?** Recall wins: an act counts only if it is in the
  causal past of every recall of its mandate (and of every dissolution of its
  council), its author's key and the grant count for the authority, and its
  time is before the effective expiry. The effective expiry comes from the
  grant and the renewals that count; a renewal not in the causal past of a
  recall does not count, so it extends nothing. Recalls and dissolutions are
  removals: they always count.

Apply only records facts (sets of op ids per mandate); every judgement that
depends on concurrency is made in queries over the whole set, so concurrent
ops commute. The councils record registers its councils, dissolutions and
council acts here (``register_*``), so this module never imports it.

Hook for later: the issuer is the signing member's cell (:func:`_issuer`). A
mandate granted by a sealed decision of several cells would name the seal in a
ref field and take its issuers from it; nothing else here would change.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._canonical import Value
from ._errors import RuleViolation
from ._hlc import ts_ms
from ._op import Op
from ._record import Record, field_bytes, field_int, field_str, only_fields
from .authority import MEMBER, Authority, Grant

if TYPE_CHECKING:
    from ._replica import Replica

GRANT = "mandate.grant"
RENEW = "mandate.renew"
RECALL = "mandate.recall"
ACT = "mandate.act"

MAX_TEXT = 4000
MAX_SCOPE = 500
MAX_ACTS = 16
MAX_MS = 2**48 - 1  # the wall-time part of a timestamp has 48 bits
_ACT_NAME = re.compile(r"[a-z][a-z0-9_-]{0,39}")
_GRANT_FIELDS = frozenset({"delegate", "instructions", "expires", "council", "acts", "scope"})
_RENEW_FIELDS = frozenset({"mandate", "expires"})
_RECALL_FIELDS = frozenset({"mandate", "reason"})
_ACT_FIELDS = frozenset({"mandate", "act", "text"})

# A mandate's status at a given time.
LIVE = "live"
RECALLED = "recalled"
VOID = "void"  # the grant does not count, or the issuer or the delegate was removed
COUNCIL_CLOSED = "council closed"  # its council was dissolved or reached its end time
LAPSED = "lapsed"

# Why an op under a mandate does not count.
CONCURRENT_WITH_RECALL = "concurrent with recall"
CONCURRENT_WITH_DISSOLUTION = "concurrent with council dissolution"
AFTER_EXPIRY = "after expiry"
REVOKED_KEY = "revoked key"  # the author's key was revoked, or their cell expelled
GRANT_VOID = "grant does not count"
ISSUER_EXPELLED = "issuing cell expelled"


@dataclass(frozen=True, slots=True)
class Mandate:
    """A granted mandate; its id is the ``mandate.grant`` op's id."""

    id: bytes
    ts: int
    issuer: bytes  # cell id
    granted_by: bytes  # the signing member's key
    delegate: bytes
    delegate_cell: bytes
    instructions: str
    expires_ms: int  # as granted; see MandateState.expires_ms for the effective one
    acts: tuple[str, ...]  # general mandates: the kinds of act it covers
    scope: str  # general mandates: free-text scope ("" if none)
    council: bytes | None  # council mandates: the council.form op id


@dataclass(frozen=True, slots=True)
class CouncilTerms:
    """What mandates need to know of a council (registered by the councils record)."""

    id: bytes
    cells: frozenset[bytes]
    ends_ms: int


@dataclass(frozen=True, slots=True)
class Renewal:
    id: bytes
    mandate: bytes
    expires_ms: int


@dataclass(frozen=True, slots=True)
class MandateState:
    """A mandate as seen at ``now_ms``: its status and effective expiry."""

    mandate: Mandate
    status: str  # LIVE, RECALLED, VOID, COUNCIL_CLOSED or LAPSED
    expires_ms: int  # from the grant and counted renewals, capped at the council's end
    renewals: tuple[bytes, ...]  # the renewals that count
    recalls: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Entry:
    """One op in a mandate's story, with whether it counts and why not."""

    op: bytes
    kind: str
    mandate: bytes
    author: bytes
    ts: int
    text: str
    counted: bool
    why: str | None


def _issuer(grant: Grant) -> bytes:
    """The cell that issues a mandate: the signing member's cell (see the hook
    in the module docstring for grants by a sealed decision)."""
    return grant.cell


def _field_acts(body: Mapping[str, Value]) -> tuple[str, ...]:
    """The field 'acts': distinct names of the kinds of act a mandate covers."""
    value = body.get("acts")
    if not isinstance(value, tuple) or not 1 <= len(value) <= MAX_ACTS:
        raise RuleViolation(f"field 'acts' must be an array of 1 to {MAX_ACTS} kinds of act")
    for act in value:
        if not isinstance(act, str) or not _ACT_NAME.fullmatch(act):
            raise RuleViolation("field 'acts' must hold names like 'sign' (a-z0-9_-, 1-40)")
    if len(set(value)) != len(value):
        raise RuleViolation("field 'acts' must not repeat a kind of act")
    return tuple(str(act) for act in value)


class Mandates(Record):
    """Every mandate in the federation: grants, renewals, recalls and acts."""

    op_kinds = (GRANT, RENEW, RECALL, ACT)
    ref_fields = {
        GRANT: ("council",),
        RENEW: ("mandate",),
        RECALL: ("mandate",),
        ACT: ("mandate",),
    }

    def __init__(self, replica: Replica) -> None:
        super().__init__(replica)
        self._mandates: dict[bytes, Mandate] = {}
        self._renewals: dict[bytes, list[Renewal]] = {}
        self._recalls: dict[bytes, list[bytes]] = {}
        self._uses: dict[bytes, list[bytes]] = {}  # mandate -> ops done under it
        self._removals: set[bytes] = set()  # uses that are removals: they always count
        self._by_delegate: dict[bytes, list[bytes]] = {}
        self._by_council: dict[bytes, list[bytes]] = {}
        self._councils: dict[bytes, CouncilTerms] = {}
        self._dissolutions: dict[bytes, list[bytes]] = {}

    @property
    def _authority(self) -> Authority:
        return self.replica.authority

    # -- validation ---------------------------------------------------------

    def validate(self, op: Op) -> None:
        if op.kind == GRANT:
            self._validate_grant(op)
        elif op.kind == RENEW:
            self._validate_renew(op)
        elif op.kind == RECALL:
            only_fields(op.body, _RECALL_FIELDS)
            mandate = self._mandate_ref(op)
            self._require_issuer(op, mandate, "recall")
            if "reason" in op.body:
                field_str(op.body, "reason", min_len=1, max_len=MAX_TEXT)
            if any(self.graph.in_view(r, op) for r in self._recalls.get(mandate.id, ())):
                raise RuleViolation("the mandate was already recalled")
        elif op.kind == ACT:
            only_fields(op.body, _ACT_FIELDS)
            mandate = self._mandate_ref(op)
            act = field_str(op.body, "act", min_len=1, max_len=40)
            field_str(op.body, "text", min_len=1, max_len=MAX_TEXT)
            if mandate.council is not None:
                raise RuleViolation(
                    "under a council mandate, act with council.decision, council.minutes"
                    " or council.dissolve"
                )
            if act not in mandate.acts:
                raise RuleViolation(
                    f"act {act!r} is outside the mandate's scope ({', '.join(mandate.acts)})"
                )
            self.check_use(op, mandate.id)

    def _validate_grant(self, op: Op) -> None:
        only_fields(op.body, _GRANT_FIELDS)
        issuer = _issuer(self._authority.require_member(op))
        delegate = field_bytes(op.body, "delegate")
        field_str(op.body, "instructions", min_len=1, max_len=MAX_TEXT)
        expires = field_int(op.body, "expires", 1, MAX_MS)
        if ("council" in op.body) == ("acts" in op.body):
            raise RuleViolation("a mandate's scope is either 'council' or 'acts': give exactly one")
        terms = None
        if "council" in op.body:
            if "scope" in op.body:
                raise RuleViolation("field 'scope' (free text) is for general mandates only")
            terms = self._council_ref(op)
        else:
            _field_acts(op.body)
            if "scope" in op.body:
                field_str(op.body, "scope", min_len=1, max_len=MAX_SCOPE)
        delegate_cell = self._check_delegate(delegate, op)
        if terms is not None:
            self._check_council_grant(op, terms, issuer, delegate_cell, expires)
        self._check_expiry(op, expires)

    def _validate_renew(self, op: Op) -> None:
        only_fields(op.body, _RENEW_FIELDS)
        mandate = self._mandate_ref(op)
        self._require_issuer(op, mandate, "renew")
        expires = field_int(op.body, "expires", 1, MAX_MS)
        reason = self.not_live_reason(mandate.id, op)
        if reason is not None:
            raise RuleViolation(f"cannot renew: {reason} (grant a new mandate instead)")
        current = self._expiry_in_view(mandate, op)
        if expires <= current:
            raise RuleViolation(f"a renewal must extend the expiry beyond {current}")
        self._check_expiry(op, expires)
        if mandate.council is not None and expires > self._councils[mandate.council].ends_ms:
            raise RuleViolation("a council mandate must expire no later than the council's end")

    def _mandate_ref(self, op: Op) -> Mandate:
        mandate = self._mandates.get(field_bytes(op.body, "mandate"))
        if mandate is None:
            raise RuleViolation("field 'mandate' must name a mandate.grant op")
        return mandate

    def _council_ref(self, op: Op) -> CouncilTerms:
        terms = self._councils.get(field_bytes(op.body, "council"))
        if terms is None:
            raise RuleViolation("field 'council' must name a council.form op")
        return terms

    def _require_issuer(self, op: Op, mandate: Mandate, what: str) -> None:
        if self._authority.require_member(op).cell != mandate.issuer:
            raise RuleViolation(f"only a member of the issuing cell may {what} a mandate")

    def _check_expiry(self, op: Op, expires: int) -> None:
        """The expiry is after the op's time and at most mandate_max_ms after it."""
        at = ts_ms(op.ts)
        if expires <= at:
            raise RuleViolation(f"the expiry ({expires}) must be after the op's time ({at})")
        longest = self._authority.params.mandate_max_ms
        if expires > at + longest:
            raise RuleViolation(
                f"the expiry may be at most {longest} ms after the op's time (mandate_max_ms)"
            )

    def _check_delegate(self, delegate: bytes, view: Op) -> bytes:
        """The delegate's cell; raises unless the delegate is a member key, not
        revoked, of a live cell, all in ``view``'s causal past."""
        grant = self._authority.grant_in_view(delegate, view)
        if grant is None:
            raise RuleViolation("the delegate must be a key granted in the grant's causal past")
        if grant.role != MEMBER:
            raise RuleViolation("the delegate must be a member (a person), not a device")
        if self._authority.is_revoked(delegate, view):
            raise RuleViolation("the delegate's key was revoked")
        if not self._authority.cell_is_live(grant.cell, view):
            raise RuleViolation("the delegate's cell is not live")
        return grant.cell

    def _check_council_grant(
        self, op: Op, terms: CouncilTerms, issuer: bytes, delegate_cell: bytes, expires: int
    ) -> None:
        if issuer not in terms.cells:
            raise RuleViolation("only a member cell of the council may send a delegate to it")
        if delegate_cell != issuer:
            raise RuleViolation("a council delegate must be a member of the cell that sends them")
        closed = self.council_closed(terms.id, op)
        if closed is not None:
            raise RuleViolation(f"cannot send a delegate: {closed}")
        if expires > terms.ends_ms:
            raise RuleViolation("a council mandate must expire no later than the council's end")

    # -- the liveness rule (shared with councils) ---------------------------

    def check_use(self, op: Op, mandate_id: bytes) -> Mandate:
        """The mandate ``op`` acts under; raises unless ``op``'s author is its
        delegate and it is live in ``op``'s causal past."""
        mandate = self._mandates.get(mandate_id)
        if mandate is None:
            raise RuleViolation("field 'mandate' must name a mandate.grant op")
        if op.author != mandate.delegate:
            raise RuleViolation("only the mandate's delegate may act under it")
        reason = self.not_live_reason(mandate_id, op)
        if reason is not None:
            raise RuleViolation(f"the mandate is not live: {reason}")
        return mandate

    def not_live_reason(self, mandate_id: bytes, view: Op) -> str | None:
        """Why the mandate is not live at ``view``'s time, judged in ``view``'s
        causal past (recall, council closed, expiry), or None if it is live."""
        mandate = self._mandates[mandate_id]
        if any(self.graph.in_view(r, view) for r in self._recalls.get(mandate_id, ())):
            return "the mandate was recalled"
        if mandate.council is not None:
            closed = self.council_closed(mandate.council, view)
            if closed is not None:
                return closed
        if ts_ms(view.ts) >= self._expiry_in_view(mandate, view):
            return "the mandate lapsed at its expiry"
        return None

    def council_closed(self, council: bytes, view: Op) -> str | None:
        """Why the council is closed in ``view``'s causal past, or None if open."""
        if any(self.graph.in_view(d, view) for d in self._dissolutions.get(council, ())):
            return "the council was dissolved"
        if ts_ms(view.ts) >= self._councils[council].ends_ms:
            return "the council's end time has passed"
        return None

    def _expiry_in_view(self, mandate: Mandate, view: Op) -> int:
        """The latest expiry among the grant and the renewals in ``view``'s past."""
        expires = mandate.expires_ms
        for renewal in self._renewals.get(mandate.id, ()):
            if renewal.expires_ms > expires and self.graph.in_view(renewal.id, view):
                expires = renewal.expires_ms
        return expires

    # -- applying -----------------------------------------------------------

    def apply(self, op: Op) -> None:
        if op.kind == GRANT:
            mandate = self._parse_grant(op)
            self._mandates[op.id] = mandate
            self._by_delegate.setdefault(mandate.delegate, []).append(op.id)
            if mandate.council is not None:
                self._by_council.setdefault(mandate.council, []).append(op.id)
        elif op.kind == RENEW:
            ident = field_bytes(op.body, "mandate")
            expires = field_int(op.body, "expires", 1, MAX_MS)
            self._renewals.setdefault(ident, []).append(Renewal(op.id, ident, expires))
        elif op.kind == RECALL:
            self._recalls.setdefault(field_bytes(op.body, "mandate"), []).append(op.id)
        elif op.kind == ACT:
            self.register_use(field_bytes(op.body, "mandate"), op.id)

    def _parse_grant(self, op: Op) -> Mandate:
        delegate = field_bytes(op.body, "delegate")
        delegate_grant = self._authority.grant_in_view(delegate, op)
        assert delegate_grant is not None  # validated
        council = op.body.get("council")
        return Mandate(
            id=op.id,
            ts=op.ts,
            issuer=_issuer(self._authority.author_grant(op)),
            granted_by=op.author,
            delegate=delegate,
            delegate_cell=delegate_grant.cell,
            instructions=field_str(op.body, "instructions", max_len=MAX_TEXT),
            expires_ms=field_int(op.body, "expires", 1, MAX_MS),
            acts=_field_acts(op.body) if "acts" in op.body else (),
            scope=field_str(op.body, "scope", max_len=MAX_SCOPE) if "scope" in op.body else "",
            council=council if isinstance(council, bytes) else None,
        )

    def register_council(self, terms: CouncilTerms) -> None:
        """Called by the councils record when a ``council.form`` is applied."""
        self._councils[terms.id] = terms

    def register_dissolution(self, council: bytes, op_id: bytes) -> None:
        """Called by the councils record when a ``council.dissolve`` is applied."""
        self._dissolutions.setdefault(council, []).append(op_id)

    def register_use(self, mandate: bytes, op_id: bytes, *, removal: bool = False) -> None:
        """Note that op ``op_id`` was done under ``mandate`` (validated with
        :meth:`check_use`). A removal (a dissolution) always counts."""
        self._uses.setdefault(mandate, []).append(op_id)
        if removal:
            self._removals.add(op_id)

    # -- counting (recall wins) ---------------------------------------------

    def _sorted(self, ids: Iterable[bytes]) -> list[Op]:
        """The ops with these ids, oldest first (ties by id)."""
        return sorted((self.graph[i] for i in ids), key=lambda op: (op.ts, op.id))

    def _removed_before(self, op_id: bytes, mandate: Mandate) -> str | None:
        """Which removal is not after ``op_id`` (remove wins): an expulsion of the
        issuing cell, a recall of ``mandate``, a dissolution of its council."""
        graph = self.graph
        if any(not graph.precedes(op_id, s) for s in self._authority.expulsions(mandate.issuer)):
            return ISSUER_EXPELLED
        if any(not graph.precedes(op_id, r) for r in self._recalls.get(mandate.id, ())):
            return CONCURRENT_WITH_RECALL
        if mandate.council is not None and any(
            not graph.precedes(op_id, d) for d in self._dissolutions.get(mandate.council, ())
        ):
            return CONCURRENT_WITH_DISSOLUTION
        return None

    def _renewal_why(self, renewal: Renewal, mandate: Mandate) -> str | None:
        if not self._authority.counts(renewal.id):
            return REVOKED_KEY
        return self._removed_before(renewal.id, mandate)

    def _expiry(self, mandate: Mandate) -> int:
        """The effective expiry: the latest of the grant's and the counted
        renewals', capped at the council's end."""
        expires = mandate.expires_ms
        for renewal in self._renewals.get(mandate.id, ()):
            if renewal.expires_ms > expires and self._renewal_why(renewal, mandate) is None:
                expires = renewal.expires_ms
        if mandate.council is not None:
            expires = min(expires, self._councils[mandate.council].ends_ms)
        return expires

    def why_not_counted(self, op_id: bytes) -> str | None:
        """Why an op done under a mandate does not count, or None if it does."""
        op = self.graph[op_id]
        return self._use_why(op, self._mandates[field_bytes(op.body, "mandate")])

    def _use_why(self, op: Op, mandate: Mandate) -> str | None:
        if op.id in self._removals:
            return None
        if not self._authority.counts(op):
            return REVOKED_KEY
        if not self._authority.counts(mandate.id):
            return GRANT_VOID
        removed = self._removed_before(op.id, mandate)
        if removed is None and ts_ms(op.ts) >= self._expiry(mandate):
            return AFTER_EXPIRY
        return removed

    # -- queries ------------------------------------------------------------

    def mandate(self, ident: bytes) -> Mandate | None:
        return self._mandates.get(ident)

    def all(self) -> list[Mandate]:
        """Every mandate ever granted (the archive), oldest first."""
        return sorted(self._mandates.values(), key=lambda m: (m.ts, m.id))

    def scoped_to(self, council: bytes) -> list[Mandate]:
        """Every mandate granted for ``council``, oldest first."""
        return sorted(
            (self._mandates[i] for i in self._by_council.get(council, ())),
            key=lambda m: (m.ts, m.id),
        )

    def state(self, ident: bytes, now_ms: int) -> MandateState:
        """The mandate's status and effective expiry at ``now_ms``."""
        mandate = self._mandates[ident]
        renewals = (
            r.id for r in self._renewals.get(ident, ()) if not self._renewal_why(r, mandate)
        )
        recalls = tuple(op.id for op in self._sorted(self._recalls.get(ident, ())))
        expires = self._expiry(mandate)
        status = self._status(mandate, now_ms, expires, recalls)
        renewed = tuple(op.id for op in self._sorted(renewals))
        return MandateState(mandate, status, expires, renewed, recalls)

    def _status(self, mandate: Mandate, now_ms: int, expires: int, recalls: Sequence[bytes]) -> str:
        authority = self._authority
        if recalls:
            return RECALLED
        if (
            not authority.counts(mandate.id)
            or any(True for _ in authority.expulsions(mandate.issuer))
            or authority.is_revoked(mandate.delegate)
            or any(True for _ in authority.expulsions(mandate.delegate_cell))
        ):
            return VOID
        if mandate.council is not None and (
            self._dissolutions.get(mandate.council)
            or now_ms >= self._councils[mandate.council].ends_ms
        ):
            return COUNCIL_CLOSED
        return LAPSED if now_ms >= expires else LIVE

    def live(self, now_ms: int) -> list[MandateState]:
        """The mandates live at ``now_ms``, oldest grant first."""
        states = (self.state(m.id, now_ms) for m in self.all())
        return [s for s in states if s.status == LIVE]

    def under(self, ident: bytes) -> list[Entry]:
        """Everything done under the mandate, oldest first: counted ops, and the
        others with why they do not count."""
        mandate = self._mandates[ident]
        uses = self._sorted(self._uses.get(ident, ()))
        return [self._entry(op, mandate, self._use_why(op, mandate)) for op in uses]

    def history(self, delegate: bytes) -> list[Entry]:
        """A delegate's story, oldest first: the grants naming them, their
        renewals and recalls, and what they did under them."""
        entries = []
        for ident in self._by_delegate.get(delegate, ()):
            mandate = self._mandates[ident]
            grant = self.graph[ident]
            entries.append(
                self._entry(grant, mandate, None if self._authority.counts(grant) else REVOKED_KEY)
            )
            for renewal in self._renewals.get(ident, ()):
                why = self._renewal_why(renewal, mandate)
                entries.append(self._entry(self.graph[renewal.id], mandate, why))
            for recall in self._recalls.get(ident, ()):
                entries.append(self._entry(self.graph[recall], mandate, None))
            entries.extend(self.under(ident))
        return sorted(entries, key=lambda e: (e.ts, e.op))

    def _entry(self, op: Op, mandate: Mandate, why: str | None) -> Entry:
        if op.kind == GRANT:
            text = mandate.instructions
        else:
            raw = op.body.get("text", op.body.get("reason", ""))
            text = raw if isinstance(raw, str) else ""
        return Entry(op.id, op.kind, mandate.id, op.author, op.ts, text, why is None, why)

    # -- building bodies ----------------------------------------------------

    def grant_body(
        self,
        delegate: bytes,
        instructions: str,
        now_ms: int,
        *,
        acts: Sequence[str] = (),
        scope: str | None = None,
        council: bytes | None = None,
        expires_ms: int | None = None,
    ) -> dict[str, Value]:
        """The body of a ``mandate.grant``. With no expiry given, the mandate
        runs for ``mandate_default_ms`` (one lunar cycle by default) from
        ``now_ms``, or until its council's end if that comes first."""
        body: dict[str, Value] = {"delegate": delegate, "instructions": instructions}
        if council is not None:
            body["council"] = council
        else:
            body["acts"] = tuple(acts)
        if scope is not None:
            body["scope"] = scope
        body["expires"] = self._default_expiry(now_ms, council, expires_ms)
        return body

    def renew_body(
        self, mandate: bytes, now_ms: int, expires_ms: int | None = None
    ) -> dict[str, Value]:
        """The body of a ``mandate.renew``, by default for ``mandate_default_ms``
        from ``now_ms`` (capped at the council's end for a council mandate)."""
        council = self._mandates[mandate].council
        return {"mandate": mandate, "expires": self._default_expiry(now_ms, council, expires_ms)}

    def _default_expiry(self, now_ms: int, council: bytes | None, expires_ms: int | None) -> int:
        if expires_ms is not None:
            return expires_ms
        expires = now_ms + self._authority.params.mandate_default_ms
        terms = self._councils.get(council) if council is not None else None
        return min(expires, terms.ends_ms) if terms is not None else expires
