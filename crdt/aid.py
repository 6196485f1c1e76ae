"""Mutual aid: offers and requests, claims and pledges against them, fulfilments.

Theory of operation. A cell *offers* something (what, how much, where, until
when) or *requests* something (what, how much, needed by when). Members of
other cells *claim* a quantity of an offer, or *pledge* a quantity towards a
request. The giving cell records the handover with a *fulfil*: the offering
cell fulfils a claim, the pledging cell fulfils its pledge. The cell that made
an offer or request may *withdraw* it: no new claims or pledges after that.

The state holds facts only (which ops exist, what they name); every decision
that needs an order is made by a query over the whole set:

- **Allocation.** An offer's claims are ranked fulfilled first, then by
  ``(ts, id)``. Fulfilled claims always hold their goods (they moved). Each
  unfulfilled claim in turn is allocated if it fits in what remains, else it
  waits (waitlist). So no merge leaves an offer over-allocated; only fulfils
  made on both sides of a partition can exceed the quantity, and the
  allocation says so (``overfulfilled``).
- **Remove wins.** A claim that is not in the causal past of a withdrawal of
  its offer is *cancelled* unless it is fulfilled; pledges likewise. Acts by
  keys revoked (or cells expelled) concurrently do not count
  (:meth:`Authority.counts`), and acts that rest on an act that does not count
  (a claim of such an offer) do not count either.
- **Validation** looks only at the op's causal past: a claim of an offer
  withdrawn or expired there is refused; a fulfil is valid only if the claim
  is allocated as seen from the fulfil's causal past.

Quantities are positive integers counted in the unit's smallest step (grams,
not kilograms; portions, not pots): no fractions, so sums are exact.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from ._canonical import Value
from ._errors import RuleViolation
from ._hlc import ts_ms
from ._op import Op
from ._record import Record, field_bytes, field_int, field_str, only_fields
from .genesis import DAY_MS

if TYPE_CHECKING:
    from ._replica import Replica

OFFER = "aid.offer"
REQUEST = "aid.request"
CLAIM = "aid.claim"
PLEDGE = "aid.pledge"
FULFIL = "aid.fulfil"
WITHDRAW = "aid.withdraw"

MAX_QUANTITY = 1_000_000_000
"""Largest quantity in any op: a billion smallest steps (a thousand tonnes in grams)."""
MAX_HORIZON_MS = 366 * DAY_MS
"""How far after the op's own time an offer's ``until`` or a request's ``needed_by`` may be."""
MAX_WHAT = 200
MAX_UNIT = 40
MAX_LOCATION = 500

ALLOCATED = "allocated"
FULFILLED = "fulfilled"
WAITLISTED = "waitlisted"
CANCELLED = "cancelled"
PLEDGED = "pledged"

_T = TypeVar("_T", "Offer", "Request", "Claim", "Pledge")
_OFFER_FIELDS = frozenset({"what", "quantity", "unit", "location", "until"})
_REQUEST_FIELDS = frozenset({"what", "quantity", "unit", "needed_by"})


@dataclass(frozen=True, slots=True)
class Offer:
    id: bytes
    author: bytes
    cell: bytes
    ts: int
    what: str
    quantity: int
    unit: str
    location: str
    until: int  # wall ms, inclusive: claims dated after it are refused


@dataclass(frozen=True, slots=True)
class Request:
    id: bytes
    author: bytes
    cell: bytes
    ts: int
    what: str
    quantity: int
    unit: str
    needed_by: int  # wall ms, inclusive: pledges dated after it are refused


@dataclass(frozen=True, slots=True)
class Claim:
    """A claim of ``quantity`` of offer ``offer``, by a member of ``cell``."""

    id: bytes
    author: bytes
    cell: bytes
    ts: int
    offer: bytes
    quantity: int


@dataclass(frozen=True, slots=True)
class Pledge:
    """A pledge of ``quantity`` towards request ``request``, by a member of ``cell``."""

    id: bytes
    author: bytes
    cell: bytes
    ts: int
    request: bytes
    quantity: int


@dataclass(frozen=True, slots=True)
class Allocation:
    """Who gets what of an offer. ``allocated`` holds every claim that has goods
    (fulfilled ones first, then by ``(ts, id)``); ``fulfilled`` is its subset
    already handed over. Claims that do not count are left out entirely."""

    offer: Offer
    counts: bool
    withdrawn: bool
    allocated: tuple[Claim, ...]
    fulfilled: tuple[Claim, ...]
    waitlist: tuple[Claim, ...]
    cancelled: tuple[Claim, ...]
    remaining: int
    overfulfilled: bool

    def state_of(self, claim: bytes) -> str | None:
        """``fulfilled``, ``allocated``, ``waitlisted``, ``cancelled``, or None
        (not a counting claim of this offer)."""
        for state, claims in (
            (FULFILLED, self.fulfilled),
            (ALLOCATED, self.allocated),
            (WAITLISTED, self.waitlist),
            (CANCELLED, self.cancelled),
        ):
            if any(c.id == claim for c in claims):
                return state
        return None


@dataclass(frozen=True, slots=True)
class Coverage:
    """How far a request is covered. Pledges are not capped: ``pledged`` may
    exceed the request, ``outstanding`` is what no standing pledge covers yet."""

    request: Request
    counts: bool
    withdrawn: bool
    pledges: tuple[Pledge, ...]  # standing pledges (fulfilled included), oldest first
    fulfilled: tuple[Pledge, ...]
    cancelled: tuple[Pledge, ...]
    pledged: int
    delivered: int
    outstanding: int

    def state_of(self, pledge: bytes) -> str | None:
        """``fulfilled``, ``pledged``, ``cancelled``, or None (not counting)."""
        for state, pledges in (
            (FULFILLED, self.fulfilled),
            (PLEDGED, self.pledges),
            (CANCELLED, self.cancelled),
        ):
            if any(p.id == pledge for p in pledges):
                return state
        return None


@dataclass(frozen=True, slots=True)
class ClaimStatus:
    claim: Claim
    state: str  # fulfilled, allocated, waitlisted or cancelled


@dataclass(frozen=True, slots=True)
class PledgeStatus:
    pledge: Pledge
    state: str  # fulfilled, pledged or cancelled


class Aid(Record):
    """Every offer, request, claim, pledge, fulfilment and withdrawal."""

    op_kinds = (OFFER, REQUEST, CLAIM, PLEDGE, FULFIL, WITHDRAW)
    ref_fields = {
        CLAIM: ("offer",),
        PLEDGE: ("request",),
        FULFIL: ("claim", "pledge"),
        WITHDRAW: ("ref",),
    }

    def __init__(self, replica: Replica) -> None:
        super().__init__(replica)
        self._offers: dict[bytes, Offer] = {}
        self._requests: dict[bytes, Request] = {}
        self._claims: dict[bytes, Claim] = {}
        self._pledges: dict[bytes, Pledge] = {}
        self._claims_of: dict[bytes, list[bytes]] = {}  # offer or cell -> claim ids
        self._pledges_of: dict[bytes, list[bytes]] = {}  # request or cell -> pledge ids
        self._fulfils: dict[bytes, list[bytes]] = {}  # claim or pledge -> fulfil op ids
        self._withdrawals: dict[bytes, list[bytes]] = {}  # offer or request -> op ids

    # -- validation ---------------------------------------------------------

    def validate(self, op: Op) -> None:
        grant = self.replica.authority.require_member(op)
        if op.kind == OFFER:
            self.parse_once(op, lambda o: _parse_offer(o, grant.cell))
        elif op.kind == REQUEST:
            self.parse_once(op, lambda o: _parse_request(o, grant.cell))
        elif op.kind == CLAIM:
            self._check_claim(op, grant.cell)
        elif op.kind == PLEDGE:
            self._check_pledge(op, grant.cell)
        elif op.kind == FULFIL:
            self._check_fulfil(op, grant.cell)
        elif op.kind == WITHDRAW:
            self._check_withdraw(op, grant.cell)

    def _check_claim(self, op: Op, cell: bytes) -> None:
        only_fields(op.body, frozenset({"offer", "quantity"}))
        offer = self._offers.get(field_bytes(op.body, "offer"))
        if offer is None:
            raise RuleViolation("field 'offer' must name an aid.offer op")
        field_int(op.body, "quantity", 1, offer.quantity)
        if offer.cell == cell:
            raise RuleViolation("a cell cannot claim its own offer (withdraw it instead)")
        if not self.replica.authority.counts(offer.id, op):
            raise RuleViolation(_GONE.format("offer"))
        if ts_ms(op.ts) > offer.until:
            raise RuleViolation("the offer expired: this claim is dated after its 'until'")
        if self._removers(offer.id, op):
            raise RuleViolation("the offer was withdrawn")

    def _check_pledge(self, op: Op, cell: bytes) -> None:
        only_fields(op.body, frozenset({"request", "quantity"}))
        request = self._requests.get(field_bytes(op.body, "request"))
        if request is None:
            raise RuleViolation("field 'request' must name an aid.request op")
        field_int(op.body, "quantity", 1, request.quantity)
        if request.cell == cell:
            raise RuleViolation("a cell cannot pledge to its own request")
        if not self.replica.authority.counts(request.id, op):
            raise RuleViolation(_GONE.format("request"))
        if ts_ms(op.ts) > request.needed_by:
            raise RuleViolation("the request's needed-by time has passed")
        if self._removers(request.id, op):
            raise RuleViolation("the request was withdrawn")

    def _check_fulfil(self, op: Op, cell: bytes) -> None:
        only_fields(op.body, frozenset({"claim", "pledge"}))
        if ("claim" in op.body) == ("pledge" in op.body):
            raise RuleViolation("a fulfil names exactly one of 'claim' or 'pledge'")
        if "claim" in op.body:
            claim = self._claims.get(field_bytes(op.body, "claim"))
            if claim is None:
                raise RuleViolation("field 'claim' must name an aid.claim op")
            offer = self._offers[claim.offer]
            if offer.cell != cell:
                raise RuleViolation("only the offering cell can fulfil a claim of its offer")
            self._require_unfulfilled(claim.id, op)
            allocation = self._allocate(offer, op)
            if not allocation.counts:
                raise RuleViolation(_GONE.format("offer"))
            state = allocation.state_of(claim.id)
            if state != ALLOCATED:
                raise RuleViolation(_NOT_ALLOCATED.get(state or "", "the claim no longer counts"))
        else:
            pledge = self._pledges.get(field_bytes(op.body, "pledge"))
            if pledge is None:
                raise RuleViolation("field 'pledge' must name an aid.pledge op")
            if pledge.cell != cell:
                raise RuleViolation("only the pledging cell can fulfil its pledge")
            self._require_unfulfilled(pledge.id, op)
            coverage = self._cover(self._requests[pledge.request], op)
            if not coverage.counts:
                raise RuleViolation(_GONE.format("request"))
            state = coverage.state_of(pledge.id)
            if state != PLEDGED:
                raise RuleViolation(_NOT_STANDING.get(state or "", "the pledge no longer counts"))

    def _require_unfulfilled(self, act: bytes, view: Op) -> None:
        if self._fulfilled(act, view):
            raise RuleViolation("it is already fulfilled")

    def _check_withdraw(self, op: Op, cell: bytes) -> None:
        only_fields(op.body, frozenset({"ref"}))
        ref = field_bytes(op.body, "ref")
        target = self._offers.get(ref) or self._requests.get(ref)
        if target is None:
            raise RuleViolation("field 'ref' must name an aid.offer or aid.request op")
        if target.cell != cell:
            raise RuleViolation("only the cell that made an offer or request can withdraw it")
        if self._removers(ref, op):
            raise RuleViolation("it is already withdrawn")

    # -- applying -----------------------------------------------------------

    def apply(self, op: Op) -> None:
        cell = self.replica.authority.author_grant(op).cell
        if op.kind == OFFER:
            self._offers[op.id] = self.parse_once(op, lambda o: _parse_offer(o, cell))
        elif op.kind == REQUEST:
            self._requests[op.id] = self.parse_once(op, lambda o: _parse_request(o, cell))
        elif op.kind == CLAIM:
            offer = field_bytes(op.body, "offer")
            quantity = field_int(op.body, "quantity", 1, MAX_QUANTITY)
            self._claims[op.id] = Claim(op.id, op.author, cell, op.ts, offer, quantity)
            for index in (offer, cell):
                self._claims_of.setdefault(index, []).append(op.id)
        elif op.kind == PLEDGE:
            request = field_bytes(op.body, "request")
            quantity = field_int(op.body, "quantity", 1, MAX_QUANTITY)
            self._pledges[op.id] = Pledge(op.id, op.author, cell, op.ts, request, quantity)
            for index in (request, cell):
                self._pledges_of.setdefault(index, []).append(op.id)
        elif op.kind == FULFIL:
            act = field_bytes(op.body, "claim" if "claim" in op.body else "pledge")
            self._fulfils.setdefault(act, []).append(op.id)
        elif op.kind == WITHDRAW:
            self._withdrawals.setdefault(field_bytes(op.body, "ref"), []).append(op.id)

    # -- the rules, seen from a view (None: everything held) -----------------

    def _counting(self, ids: Iterable[bytes], view: Op | None) -> list[bytes]:
        """The ids visible from ``view`` whose ops count there."""
        authority = self.replica.authority
        return [i for i in ids if self.graph.in_view(i, view) and authority.counts(i, view)]

    def _removers(self, target: bytes, view: Op | None) -> list[bytes]:
        """Counting withdrawals of an offer or request, seen from ``view``."""
        return self._counting(self._withdrawals.get(target, ()), view)

    def _fulfilled(self, act: bytes, view: Op | None) -> bool:
        return bool(self._counting(self._fulfils.get(act, ()), view))

    def _cut(self, act: bytes, removers: list[bytes]) -> bool:
        """Remove wins: an act not in the causal past of every withdrawal is cut."""
        return any(not self.graph.precedes(act, w) for w in removers)

    def _allocate(self, offer: Offer, view: Op | None) -> Allocation:
        counts = self.replica.authority.counts(offer.id, view)
        removers = self._removers(offer.id, view)
        ids = self._counting(self._claims_of.get(offer.id, ()), view)
        claims = _oldest(self._claims[i] for i in ids)
        if not counts:
            return Allocation(offer, False, bool(removers), (), (), (), tuple(claims), 0, False)
        done = {c.id for c in claims if self._fulfilled(c.id, view)}
        cancelled = [c for c in claims if c.id not in done and self._cut(c.id, removers)]
        cut = {c.id for c in cancelled}
        ranked = sorted(
            (c for c in claims if c.id not in cut), key=lambda c: (c.id not in done, c.ts, c.id)
        )
        left = offer.quantity
        allocated, waitlist = [], []
        for claim in ranked:
            if claim.id in done or claim.quantity <= left:
                allocated.append(claim)
                left -= claim.quantity
            else:
                waitlist.append(claim)
        fulfilled = tuple(c for c in allocated if c.id in done)
        return Allocation(
            offer=offer,
            counts=True,
            withdrawn=bool(removers),
            allocated=tuple(allocated),
            fulfilled=fulfilled,
            waitlist=tuple(waitlist),
            cancelled=tuple(cancelled),
            remaining=max(0, left),
            overfulfilled=sum(c.quantity for c in fulfilled) > offer.quantity,
        )

    def _cover(self, request: Request, view: Op | None) -> Coverage:
        counts = self.replica.authority.counts(request.id, view)
        removers = self._removers(request.id, view)
        ids = self._counting(self._pledges_of.get(request.id, ()), view)
        pledges = _oldest(self._pledges[i] for i in ids)
        done = {p.id for p in pledges if self._fulfilled(p.id, view)}
        if counts:
            cancelled = [p for p in pledges if p.id not in done and self._cut(p.id, removers)]
        else:
            cancelled, done = list(pledges), set()
        cut = {p.id for p in cancelled}
        standing = tuple(p for p in pledges if p.id not in cut)
        pledged = sum(p.quantity for p in standing)
        return Coverage(
            request=request,
            counts=counts,
            withdrawn=bool(removers),
            pledges=standing,
            fulfilled=tuple(p for p in standing if p.id in done),
            cancelled=tuple(cancelled),
            pledged=pledged,
            delivered=sum(p.quantity for p in standing if p.id in done),
            outstanding=max(0, request.quantity - pledged) if counts else 0,
        )

    # -- queries ------------------------------------------------------------

    def offer(self, offer_id: bytes) -> Offer | None:
        return self._offers.get(offer_id)

    def request(self, request_id: bytes) -> Request | None:
        return self._requests.get(request_id)

    def open_offers(self, now_ms: int) -> list[Offer]:
        """Offers that can be claimed at ``now_ms``: counting, not withdrawn, not
        expired (``now_ms <= until``), oldest first. A fully allocated offer is
        still open (new claims wait); see :meth:`allocation`."""
        return _oldest(
            o for o in self._offers.values() if now_ms <= o.until and self._is_open(o.id)
        )

    def open_requests(self, now_ms: int) -> list[Request]:
        """Requests that can be pledged to at ``now_ms``, oldest first."""
        return _oldest(
            r for r in self._requests.values() if now_ms <= r.needed_by and self._is_open(r.id)
        )

    def _is_open(self, target: bytes) -> bool:
        return self.replica.authority.counts(target) and not self._removers(target, None)

    def allocation(self, offer_id: bytes) -> Allocation | None:
        """The offer's allocation over every claim held; None if no such offer."""
        offer = self._offers.get(offer_id)
        return self._allocate(offer, None) if offer is not None else None

    def coverage(self, request_id: bytes) -> Coverage | None:
        """The request's pledges over every pledge held; None if no such request."""
        request = self._requests.get(request_id)
        return self._cover(request, None) if request is not None else None

    def claims_of(self, cell: bytes) -> list[ClaimStatus]:
        """The counting claims made by members of ``cell``, oldest first, each
        with its state in its offer's allocation."""
        claims = _oldest(
            self._claims[i] for i in self._counting(self._claims_of.get(cell, ()), None)
        )
        allocations: dict[bytes, Allocation] = {}
        result = []
        for claim in claims:
            if claim.offer not in allocations:
                allocations[claim.offer] = self._allocate(self._offers[claim.offer], None)
            state = allocations[claim.offer].state_of(claim.id)
            result.append(ClaimStatus(claim, state or CANCELLED))
        return result

    def pledges_of(self, cell: bytes) -> list[PledgeStatus]:
        """The counting pledges made by members of ``cell``, oldest first."""
        ids = self._counting(self._pledges_of.get(cell, ()), None)
        result = []
        for pledge in _oldest(self._pledges[i] for i in ids):
            state = self._cover(self._requests[pledge.request], None).state_of(pledge.id)
            result.append(PledgeStatus(pledge, state or CANCELLED))
        return result


_GONE = "the {} no longer counts: its author's key was revoked or its cell expelled"
_NOT_ALLOCATED = {
    WAITLISTED: "the claim is waitlisted: the offer has nothing left for it",
    CANCELLED: "the offer was withdrawn before this claim could be allocated",
    FULFILLED: "it is already fulfilled",
}
_NOT_STANDING = {
    CANCELLED: "the request was withdrawn before this pledge was made",
    FULFILLED: "it is already fulfilled",
}


def _oldest(items: Iterable[_T]) -> list[_T]:
    return sorted(items, key=lambda item: (item.ts, item.id))


def _field_time(op: Op, name: str) -> int:
    """A wall-clock field (ms) after the op's own time, at most MAX_HORIZON_MS later."""
    value = field_int(op.body, name, 0, 2**63 - 1)
    made = ts_ms(op.ts)
    if value <= made:
        raise RuleViolation(f"field {name!r} must be after the time the op is made")
    if value > made + MAX_HORIZON_MS:
        raise RuleViolation(f"field {name!r} must be at most {MAX_HORIZON_MS // DAY_MS} days ahead")
    return value


def _goods(body: Mapping[str, Value]) -> tuple[str, int, str]:
    return (
        field_str(body, "what", min_len=1, max_len=MAX_WHAT),
        field_int(body, "quantity", 1, MAX_QUANTITY),
        field_str(body, "unit", min_len=1, max_len=MAX_UNIT),
    )


def _parse_offer(op: Op, cell: bytes) -> Offer:
    only_fields(op.body, _OFFER_FIELDS)
    what, quantity, unit = _goods(op.body)
    location = field_str(op.body, "location", min_len=1, max_len=MAX_LOCATION)
    until = _field_time(op, "until")
    return Offer(op.id, op.author, cell, op.ts, what, quantity, unit, location, until)


def _parse_request(op: Op, cell: bytes) -> Request:
    only_fields(op.body, _REQUEST_FIELDS)
    what, quantity, unit = _goods(op.body)
    needed_by = _field_time(op, "needed_by")
    return Request(op.id, op.author, cell, op.ts, what, quantity, unit, needed_by)
