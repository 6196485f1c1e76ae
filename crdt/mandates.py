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

Granted by a decision. A grant may name (field ``decision``, a ref) a
mandate proposal of :mod:`archipel.crdt.decisions`: valid only if, in the
grant's causal past, that proposal is sealed and passed, names this delegate
and these acts, its decided text is the instructions, no grant from it is in
view, and the signer is a member of a *deciding cell* (a cell of a member
sitting in its circles). Its issuers are all the deciding cells: a member of
any of them may recall it; no one may renew it (a longer mandate takes a new
decision: one member must not stretch what the circles decided). It lapses
when every issuer is expelled: an act counts unless, for every issuing cell,
some expulsion of it does not follow the act. Of concurrent grants from one
decision, the one with the smallest (ts, id) among those whose signer's key
counts is the mandate; the others are void (``duplicate grant``), as is every
grant whose decision, recounted from everything held, no longer passes.
A council mandate is sent by one cell, never by a decision.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._canonical import Value
from ._errors import RuleViolation
from ._hlc import ts_ms
from ._op import Op
from ._record import Record, field_bytes, field_int, field_str, only_fields
from .authority import MEMBER, Authority
from .decisions import Decisions, field_acts

if TYPE_CHECKING:
    from ._replica import Replica

GRANT = "mandate.grant"
RENEW = "mandate.renew"
RECALL = "mandate.recall"
ACT = "mandate.act"

MAX_TEXT = 4000
MAX_SCOPE = 500
MAX_MS = 2**48 - 1  # the wall-time part of a timestamp has 48 bits
_GRANT_FIELDS = frozenset(
    {"delegate", "instructions", "expires", "council", "acts", "scope", "decision"}
)
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
ISSUER_EXPELLED = "issuing cell expelled"  # every issuing cell, for a decision's mandate
DUPLICATE_GRANT = "duplicate grant"  # another grant from the same decision counts
DECISION_VOID = "decision no longer passes"  # recounted from everything held


@dataclass(frozen=True, slots=True)
class Mandate:
    """A granted mandate; its id is the ``mandate.grant`` op's id."""

    id: bytes
    ts: int
    issuer: bytes  # the signing member's cell
    granted_by: bytes  # the signing member's key
    delegate: bytes
    delegate_cell: bytes
    instructions: str
    expires_ms: int  # as granted; see MandateState.expires_ms for the effective one
    acts: tuple[str, ...]  # general mandates: the kinds of act it covers
    scope: str  # general mandates: free-text scope ("" if none)
    council: bytes | None  # council mandates: the council.form op id
    issuers: tuple[bytes, ...]  # the issuing cells, sorted: (issuer,) or the deciding cells
    decision: bytes | None  # the proposal.open that decided it, if any


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


class Mandates(Record):
    """Every mandate in the federation: grants, renewals, recalls and acts."""

    op_kinds = (GRANT, RENEW, RECALL, ACT)
    ref_fields = {
        GRANT: ("council", "decision"),
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
        self._by_decision: dict[bytes, list[bytes]] = {}
        self._councils: dict[bytes, CouncilTerms] = {}
        self._dissolutions: dict[bytes, list[bytes]] = {}

    @property
    def _authority(self) -> Authority:
        return self.replica.authority

    @property
    def _decisions(self) -> Decisions:
        try:
            return self.replica.record(Decisions)
        except KeyError:
            raise RuleViolation("this node does not run the decisions record") from None

    # -- validation ---------------------------------------------------------

    def validate(self, op: Op) -> None:
        if op.kind == GRANT:
            self.parse_once(op, self._parse_grant)
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

    def _parse_grant(self, op: Op) -> Mandate:
        """Check a ``mandate.grant`` against its causal past; the mandate it gives."""
        body = op.body
        only_fields(body, _GRANT_FIELDS)
        issuer = self._authority.require_member(op).cell
        delegate = field_bytes(body, "delegate")
        instructions = field_str(body, "instructions", min_len=1, max_len=MAX_TEXT)
        expires = field_int(body, "expires", 1, MAX_MS)
        if ("council" in body) == ("acts" in body):
            raise RuleViolation("a mandate's scope is either 'council' or 'acts': give exactly one")
        terms: CouncilTerms | None = None
        acts: tuple[str, ...] = ()
        if "council" in body:
            if "scope" in body:
                raise RuleViolation("field 'scope' (free text) is for general mandates only")
            if "decision" in body:
                raise RuleViolation("a council delegate is sent by one cell, not by a decision")
            terms = self._council_ref(op)
        else:
            acts = field_acts(body)
            if "scope" in body:
                field_str(body, "scope", min_len=1, max_len=MAX_SCOPE)
        delegate_cell = self._check_delegate(delegate, op)
        issuers: tuple[bytes, ...] = (issuer,)
        if "decision" in body:
            issuers = self._check_decision(op, issuer, delegate, acts, instructions)
        if terms is not None:
            self._check_council_grant(op, terms, issuer, delegate_cell, expires)
        self._check_expiry(op, expires)
        scope = body.get("scope", "")
        return Mandate(
            id=op.id,
            ts=op.ts,
            issuer=issuer,
            granted_by=op.author,
            delegate=delegate,
            delegate_cell=delegate_cell,
            instructions=instructions,
            expires_ms=expires,
            acts=acts,
            scope=scope if isinstance(scope, str) else "",
            council=terms.id if terms is not None else None,
            issuers=issuers,
            decision=field_bytes(body, "decision") if "decision" in body else None,
        )

    def _check_decision(
        self, op: Op, cell: bytes, delegate: bytes, acts: tuple[str, ...], instructions: str
    ) -> tuple[bytes, ...]:
        """The issuing cells of a grant naming a decision; raises unless the
        decision, in the grant's causal past, gives exactly this mandate and
        the signer's cell is one of the deciding cells."""
        decision = field_bytes(op.body, "decision")
        terms = self._decisions.mandate_terms(decision, op)
        if delegate != terms.delegate:
            raise RuleViolation("the decision gives the mandate to another delegate")
        if acts != terms.acts:
            raise RuleViolation(f"the decision covers exactly the acts {', '.join(terms.acts)}")
        if instructions != terms.instructions:
            raise RuleViolation("the instructions must be the text the decision adopted")
        if cell not in terms.cells:
            raise RuleViolation("only a member of a deciding cell may grant the mandate")
        if any(self.graph.precedes(g, op) for g in self._by_decision.get(decision, ())):
            raise RuleViolation("a mandate was already granted from this decision")
        return terms.cells

    def _validate_renew(self, op: Op) -> None:
        only_fields(op.body, _RENEW_FIELDS)
        mandate = self._mandate_ref(op)
        self._require_issuer(op, mandate, "renew")
        if mandate.decision is not None:
            raise RuleViolation(
                "a mandate granted by a decision cannot be renewed: decide a new one"
            )
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
        if self._authority.require_member(op).cell not in mandate.issuers:
            raise RuleViolation(f"only a member of an issuing cell may {what} a mandate")

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
            mandate = self.parse_once(op, self._parse_grant)
            self._mandates[op.id] = mandate
            self._by_delegate.setdefault(mandate.delegate, []).append(op.id)
            if mandate.council is not None:
                self._by_council.setdefault(mandate.council, []).append(op.id)
            if mandate.decision is not None:
                self._by_decision.setdefault(mandate.decision, []).append(op.id)
        elif op.kind == RENEW:
            ident = field_bytes(op.body, "mandate")
            expires = field_int(op.body, "expires", 1, MAX_MS)
            self._renewals.setdefault(ident, []).append(Renewal(op.id, ident, expires))
        elif op.kind == RECALL:
            self._recalls.setdefault(field_bytes(op.body, "mandate"), []).append(op.id)
        elif op.kind == ACT:
            self.register_use(field_bytes(op.body, "mandate"), op.id)

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
        """Which removal is not after ``op_id`` (remove wins): an expulsion of
        every issuing cell, a recall of ``mandate``, a dissolution of its council."""
        graph, authority = self.graph, self._authority
        if all(
            any(not graph.precedes(op_id, s) for s in authority.expulsions(cell))
            for cell in mandate.issuers
        ):
            return ISSUER_EXPELLED
        if any(not graph.precedes(op_id, r) for r in self._recalls.get(mandate.id, ())):
            return CONCURRENT_WITH_RECALL
        if mandate.council is not None and any(
            not graph.precedes(op_id, d) for d in self._dissolutions.get(mandate.council, ())
        ):
            return CONCURRENT_WITH_DISSOLUTION
        return None

    def _grant_why(self, mandate: Mandate) -> str | None:
        """Why the grant does not count, or None: its signer's key was removed;
        or, for a decision's grant, an earlier one from the same decision counts
        (smallest (ts, id) among those whose key counts), or the decision,
        recounted from everything held, no longer gives this mandate."""
        authority = self._authority
        if not authority.counts(mandate.id):
            return REVOKED_KEY
        if mandate.decision is None:
            return None
        rivals = (g for g in self._by_decision[mandate.decision] if authority.counts(g))
        if min(rivals, key=lambda g: (self.graph[g].ts, g)) != mandate.id:
            return DUPLICATE_GRANT
        try:
            terms = self._decisions.mandate_terms(mandate.decision)
        except RuleViolation:
            return DECISION_VOID
        return None if terms.instructions == mandate.instructions else DECISION_VOID

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
        if self._grant_why(mandate) is not None:
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
            self._grant_why(mandate) is not None
            or all(any(True for _ in authority.expulsions(c)) for c in mandate.issuers)
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
            entries.append(self._entry(grant, mandate, self._grant_why(mandate)))
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
        decision: bytes | None = None,
    ) -> dict[str, Value]:
        """The body of a ``mandate.grant``. With no expiry given, the mandate
        runs for ``mandate_default_ms`` (one lunar cycle by default) from
        ``now_ms``, or until its council's end if that comes first."""
        body: dict[str, Value] = {"delegate": delegate, "instructions": instructions}
        if decision is not None:
            body["decision"] = decision
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
