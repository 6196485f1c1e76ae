"""Decisions: federated micro-votes, sealed so that anyone can recount them.

Theory of operation. A member opens a proposal: options, a ballot kind
(single choice or approval), the circles that deliberate (groups of 3-5
members, who are the eligible voters), a voting window (default 48 h) and a
quorum. Before the first vote its author may amend or withdraw it. Members of
its circles vote within the window, with their reasoning; a member's latest
vote counts. After the window any member may seal it.

The seal fixes the count: the tally is computed from the votes in the seal's
causal past, so every node that holds the seal recounts the same result.
Votes not in that cut are *late*: shown, never counted. Concurrent seals
(made without seeing each other) resolve to one cut, the union of their causal
pasts: a member who backdates a seal, choosing deps that leave votes out,
cannot shut out the votes an honest seal made at the same time saw. (With the
rule "the smallest (ts, id) seal wins", a backdated seal would have beaten
every honest one.) A vote cast on a text that
was amended after (the author amended concurrently with the vote) is *void*:
the voter did not see the text being decided. Remove wins here too: the vote
of a key revoked concurrently with it does not count, even after the seal.

A proposal may carry an action, decided by a single-choice ballot on
("yes", "no") that passes when sealed, yes beats no and the quorum is met.
``{"expel": cell_id}`` expels a cell: the authority record asks this module
which seals expel which cells. ``{"mandate": key, "acts": [...]}`` decides to
give that member a mandate for those kinds of act, with the proposal's text
as instructions: a member of a *deciding cell* (a cell of a member sitting in
the circles) then signs the ``mandate.grant`` naming the proposal, and the
mandates record asks :meth:`Decisions.mandate_terms` whether it may.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ._canonical import Value
from ._errors import RuleViolation
from ._hlc import ts_ms
from ._op import Op
from ._record import (
    Record,
    field_bytes,
    field_choice,
    field_int,
    field_keys,
    field_map,
    field_str,
    field_strs,
    only_fields,
)

if TYPE_CHECKING:
    from ._replica import Replica

OPEN = "proposal.open"
AMEND = "proposal.amend"
WITHDRAW = "proposal.withdraw"
VOTE = "vote.cast"
SEAL = "proposal.seal"
SINGLE = "single"
APPROVAL = "approval"
MIN_WINDOW_MS = 60_000
MAX_WINDOW_MS = 30 * 24 * 3600 * 1000
_OPEN_FIELDS = frozenset(
    {"title", "text", "options", "ballot", "circles", "window_ms", "quorum", "action"}
)
_TEXT_FIELDS = ("title", "text", "options")
MAX_ACTS = 16
_ACT_NAME = re.compile(r"[a-z][a-z0-9_-]{0,39}")


def field_acts(body: Mapping[str, Value]) -> tuple[str, ...]:
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


@dataclass(frozen=True, slots=True)
class Circle:
    name: str
    members: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Version:
    """The text being decided: the proposal as opened, or as last amended."""

    op: bytes
    title: str
    text: str
    options: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Proposal:
    id: bytes
    author: bytes
    opened_ms: int
    closes_ms: int
    ballot: str
    circles: tuple[Circle, ...]
    quorum: int  # percent of eligible voters
    expel: bytes | None  # the cell to expel, for an expulsion proposal
    original: Version
    delegate: bytes | None = None  # the member to mandate, for a mandate proposal
    acts: tuple[str, ...] = ()  # mandate proposals: the kinds of act it covers
    seats: Mapping[bytes, Circle] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.seats:
            seats = {key: circle for circle in self.circles for key in circle.members}
            object.__setattr__(self, "seats", seats)

    def circle_of(self, key: bytes) -> Circle | None:
        return self.seats.get(key)

    @property
    def eligible(self) -> int:
        return sum(len(c.members) for c in self.circles)

    @property
    def yes_no(self) -> bool:
        """Whether the proposal carries an action (decided by yes beating no)."""
        return self.expel is not None or self.delegate is not None


@dataclass(frozen=True, slots=True)
class MandateTerms:
    """What a passed mandate proposal decided, as seen from a grant."""

    proposal: bytes
    delegate: bytes
    acts: tuple[str, ...]
    instructions: str  # the decided text
    cells: tuple[bytes, ...]  # the deciding cells, sorted


@dataclass(frozen=True, slots=True)
class Ballot:
    """One vote as counted (or not) in a tally."""

    op: bytes
    voter: bytes
    circle: str
    choices: tuple[int, ...]
    reasoning: str


@dataclass(frozen=True, slots=True)
class Tally:
    """A proposal's result. ``final`` once sealed; before that, a provisional
    count of the votes held so far."""

    proposal: bytes
    status: str  # open | awaiting seal | sealed | withdrawn
    final: bool
    seals: tuple[bytes, ...]  # the concurrent seals whose causal pasts make the cut
    version: Version
    counts: tuple[int, ...]  # per option
    circles: Mapping[str, tuple[Ballot, ...]]  # counted ballots with reasoning, per circle
    eligible: int
    voters: int
    quorum_met: bool
    winners: tuple[int, ...]  # options with the most votes (several on a tie)
    passed: bool  # quorum met and a single winner (for expulsions: yes beats no)
    late: tuple[bytes, ...] = ()  # votes outside the seal's cut
    void: tuple[tuple[bytes, str], ...] = ()  # (vote, why it does not count)


@dataclass(slots=True)
class _Facts:
    """Everything applied about one proposal (sets: order-independent)."""

    proposal: Proposal
    amendments: dict[bytes, Version] = field(default_factory=dict)
    withdrawals: list[bytes] = field(default_factory=list)
    votes: dict[bytes, Ballot] = field(default_factory=dict)
    seals: list[bytes] = field(default_factory=list)


class Decisions(Record):
    """Proposals, votes and seals."""

    op_kinds = (OPEN, AMEND, WITHDRAW, VOTE, SEAL)
    ref_fields = {
        AMEND: ("proposal",),
        WITHDRAW: ("proposal",),
        VOTE: ("proposal", "version"),
        SEAL: ("proposal",),
    }

    def __init__(self, replica: Replica) -> None:
        super().__init__(replica)
        self._facts: dict[bytes, _Facts] = {}
        self._validated_ballot: Ballot | None = None
        self._cuts: dict[bytes, frozenset[bytes]] = {}  # seal -> its causal past since opening
        self._tallying: set[bytes] = set()

    # -- validation ---------------------------------------------------------

    def validate(self, op: Op) -> None:
        self.replica.authority.require_member(op)
        if op.kind == OPEN:
            self.parse_once(op, self._parse_open)
            return
        facts = self._facts_for(op)
        proposal = facts.proposal
        now = ts_ms(op.ts)
        if any(self.graph.precedes(w, op) for w in facts.withdrawals):
            raise RuleViolation("the proposal was withdrawn")
        if op.kind in (AMEND, WITHDRAW):
            self._check_before_votes(op, facts)
        elif op.kind == VOTE:
            self._check_vote(op, facts)
        elif op.kind == SEAL:
            only_fields(op.body, frozenset({"proposal"}))
            if now <= proposal.closes_ms:
                raise RuleViolation("the voting window is still open; seal after it closes")
            if any(self.graph.precedes(s, op) for s in facts.seals):
                raise RuleViolation("the proposal is already sealed")

    def _facts_for(self, op: Op) -> _Facts:
        facts = self._facts.get(field_bytes(op.body, "proposal"))
        if facts is None:
            raise RuleViolation("field 'proposal' must name a proposal.open op")
        return facts

    def _parse_open(self, op: Op) -> Proposal:
        body = op.body
        only_fields(body, _OPEN_FIELDS)
        params = self.replica.authority.params
        window = field_int(body, "window_ms", MIN_WINDOW_MS, MAX_WINDOW_MS,
                           default=params.vote_window_ms)  # fmt: skip
        ballot = field_choice(body, "ballot", (SINGLE, APPROVAL))
        options = field_strs(body, "options", min_count=2, max_count=20)
        expel, delegate, acts = self._parse_action(body, op)
        if (expel is not None or delegate is not None) and (
            options != ("yes", "no") or ballot != SINGLE
        ):
            raise RuleViolation("an action is decided by a single-choice ballot on ('yes', 'no')")
        text = field_str(body, "text", max_len=20_000) if "text" in body else ""
        if delegate is not None and not text:
            raise RuleViolation("a mandate proposal needs a 'text': the delegate's instructions")
        return Proposal(
            id=op.id,
            author=op.author,
            opened_ms=ts_ms(op.ts),
            closes_ms=ts_ms(op.ts) + window,
            ballot=ballot,
            circles=self._parse_circles(body, op),
            quorum=field_int(body, "quorum", 0, 100, default=0),
            expel=expel,
            original=Version(
                op.id, field_str(body, "title", min_len=1, max_len=200), text, options
            ),
            delegate=delegate,
            acts=acts,
        )

    def _parse_action(
        self, body: Mapping[str, Value], op: Op
    ) -> tuple[bytes | None, bytes | None, tuple[str, ...]]:
        """The action: (cell to expel, None, ()) or (None, delegate, acts)."""
        if "action" not in body:
            return None, None, ()
        action = field_map(body, "action")
        authority = self.replica.authority
        only_fields(action, frozenset({"expel", "mandate", "acts"}))
        if "expel" in action:
            only_fields(action, frozenset({"expel"}))
            expel = field_bytes(action, "expel")
            if not authority.cell_is_live(expel, op):
                raise RuleViolation("the cell to expel is not a live cell of the federation")
            return expel, None, ()
        if "mandate" not in action:
            raise RuleViolation("an action is {'expel': cell} or {'mandate': key, 'acts': [...]}")
        delegate = field_bytes(action, "mandate")
        if not authority.is_live_member(delegate, op):
            raise RuleViolation("the delegate must be a member (a person) of a live cell")
        return None, delegate, field_acts(action)

    def _parse_circles(self, body: Mapping[str, Value], op: Op) -> tuple[Circle, ...]:
        raw = body.get("circles")
        if not isinstance(raw, tuple) or not 1 <= len(raw) <= 64:
            raise RuleViolation("field 'circles' must be an array of 1 to 64 circles")
        circles = []
        authority = self.replica.authority
        for item in raw:
            circle = field_map({"circle": item}, "circle")
            only_fields(circle, frozenset({"name", "members"}))
            members = field_keys(circle, "members", min_count=3, max_count=5)
            for key in members:
                if not authority.is_live_member(key, op):
                    raise RuleViolation(f"circle member {key.hex()[:16]} is not a member")
            circles.append(Circle(field_str(circle, "name", min_len=1, max_len=100), members))
        keys = [k for c in circles for k in c.members]
        if len(set(keys)) != len(keys) or len({c.name for c in circles}) != len(circles):
            raise RuleViolation("circles need distinct names and a member may sit in one only")
        return tuple(circles)

    def _check_before_votes(self, op: Op, facts: _Facts) -> None:
        if op.author != facts.proposal.author:
            raise RuleViolation("only the proposal's author may amend or withdraw it")
        if ts_ms(op.ts) > facts.proposal.closes_ms:
            raise RuleViolation("the voting window has closed")
        if any(self.graph.precedes(v, op) for v in facts.votes):
            raise RuleViolation("votes have been cast: the proposal can no longer change")
        if op.kind == WITHDRAW:
            only_fields(op.body, frozenset({"proposal"}))
            return
        only_fields(op.body, frozenset({"proposal", *_TEXT_FIELDS}))
        if not any(name in op.body for name in _TEXT_FIELDS):
            raise RuleViolation("an amendment changes the title, the text or the options")
        if "options" in op.body and facts.proposal.yes_no:
            raise RuleViolation("the options of a proposal with an action cannot change")
        if facts.proposal.delegate is not None and op.body.get("text", "-") == "":
            raise RuleViolation("a mandate proposal needs a 'text': the delegate's instructions")
        self._amended_version(op, self._version_in_view(facts, op))

    def _check_vote(self, op: Op, facts: _Facts) -> None:
        proposal = facts.proposal
        only_fields(op.body, frozenset({"proposal", "version", "choices", "reasoning", "circle"}))
        if ts_ms(op.ts) > proposal.closes_ms:
            raise RuleViolation("the voting window has closed")
        if any(self.graph.precedes(s, op) for s in facts.seals):
            raise RuleViolation("the proposal is already sealed")
        circle = proposal.circle_of(op.author)
        name = field_str(op.body, "circle", min_len=1, max_len=100)
        if circle is None or circle.name != name:
            raise RuleViolation(f"the voter does not sit in circle {name!r} of this proposal")
        version = self._version_in_view(facts, op)
        if field_bytes(op.body, "version") != version.op:
            raise RuleViolation("the vote must name the latest text of the proposal it has seen")
        ballot = Ballot(
            op.id,
            op.author,
            name,
            self._choices(op.body, proposal.ballot, len(version.options)),
            field_str(op.body, "reasoning", max_len=4000),
        )
        self._validated_ballot = ballot

    @staticmethod
    def _choices(body: Mapping[str, Value], ballot: str, n_options: int) -> tuple[int, ...]:
        choices = body.get("choices")
        if not isinstance(choices, tuple) or not all(
            isinstance(c, int) and not isinstance(c, bool) and 0 <= c < n_options for c in choices
        ):
            raise RuleViolation(
                f"field 'choices' must list option numbers from 0 to {n_options - 1}"
            )
        if ballot == SINGLE and len(choices) != 1:
            raise RuleViolation("a single-choice ballot takes exactly one choice")
        if list(choices) != sorted(set(choices)):
            raise RuleViolation("approval choices must be sorted and distinct")
        return choices

    def _version_in_cut(
        self, facts: _Facts, cut: frozenset[bytes] | None, view: Op | None
    ) -> Version:
        """The latest amendment inside the seals' cut (or visible, if unsealed)."""
        if cut is None:
            return self._version_in_view(facts, view)
        inside = [(self.graph[a].ts, a) for a in facts.amendments if a in cut]
        return facts.amendments[max(inside)[1]] if inside else facts.proposal.original

    def _version_in_view(self, facts: _Facts, view: Op | None) -> Version:
        """The latest amendment of the proposal visible from ``view``, or the original."""
        visible = [(self.graph[a].ts, a) for a in facts.amendments if self.graph.in_view(a, view)]
        return facts.amendments[max(visible)[1]] if visible else facts.proposal.original

    @staticmethod
    def _amended_version(op: Op, previous: Version) -> Version:
        body = op.body
        return Version(
            op.id,
            field_str(body, "title", min_len=1, max_len=200) if "title" in body else previous.title,
            field_str(body, "text", max_len=20_000) if "text" in body else previous.text,
            field_strs(body, "options", min_count=2, max_count=20)
            if "options" in body
            else previous.options,
        )

    # -- applying -----------------------------------------------------------

    def apply(self, op: Op) -> None:
        if op.kind == OPEN:
            proposal = self.parse_once(op, self._parse_open)
            self._facts[op.id] = _Facts(proposal)
            if proposal.expel is not None:
                self.replica.authority.register_expulsion_proposal(
                    proposal.expel, op.id, self.expelling_seals
                )
            return
        facts = self._facts[field_bytes(op.body, "proposal")]
        if op.kind == AMEND:
            facts.amendments[op.id] = self._amended_version(op, self._version_in_view(facts, op))
        elif op.kind == WITHDRAW:
            facts.withdrawals.append(op.id)
        elif op.kind == VOTE:
            ballot, self._validated_ballot = self._validated_ballot, None
            if ballot is None or ballot.op != op.id:  # pragma: no cover - apply follows validate
                raise AssertionError("vote applied without being validated")
            facts.votes[op.id] = ballot
        elif op.kind == SEAL:
            facts.seals.append(op.id)  # its cut is worked out when first counted

    # -- queries ------------------------------------------------------------

    def proposal(self, proposal: bytes) -> Proposal | None:
        facts = self._facts.get(proposal)
        return facts.proposal if facts is not None else None

    def proposals(self) -> list[Proposal]:
        """Every proposal, oldest first."""
        return sorted((f.proposal for f in self._facts.values()), key=lambda p: (p.opened_ms, p.id))

    def seals(self, proposal: bytes, view: Op | None = None) -> tuple[bytes, ...]:
        """The seals of ``proposal`` that count, as seen from ``view``, oldest
        first. Several only when they were made concurrently."""
        facts = self._facts.get(proposal)
        if facts is None:
            return ()
        authority = self.replica.authority
        seals = [
            (self.graph[s].ts, s)
            for s in facts.seals
            if self.graph.in_view(s, view) and authority.counts(s, view)
        ]
        return tuple(s for _, s in sorted(seals))

    def status(self, proposal: bytes, now_ms: int, view: Op | None = None) -> str:
        facts = self._facts[proposal]
        if any(self.graph.in_view(w, view) for w in facts.withdrawals):
            return "withdrawn"
        if self.seals(proposal, view):
            return "sealed"
        return "open" if now_ms <= facts.proposal.closes_ms else "awaiting seal"

    def open_at(self, now_ms: int) -> list[Proposal]:
        """Proposals whose window is open at ``now_ms`` (not withdrawn or sealed)."""
        return [
            f.proposal
            for f in self._facts.values()
            if f.proposal.opened_ms <= now_ms and self.status(f.proposal.id, now_ms) == "open"
        ]

    def expelling_seals(self, proposal: bytes, view: Op | None) -> tuple[bytes, ...]:
        """The seals by which ``proposal`` expels its cell, seen from ``view``.

        While this is being worked out, the proposal's own expulsion does not
        discount the votes and seals deciding it (a member of the cell to be
        expelled may seal it); this also ends what would be endless recursion.
        """
        if proposal in self._tallying:
            return ()
        self._tallying.add(proposal)
        try:
            result = self._count(self._facts[proposal], None, view)
            return result.seals if result.passed else ()
        finally:
            self._tallying.discard(proposal)

    def deciding_cells(self, proposal: bytes) -> tuple[bytes, ...]:
        """The cells of the members sitting in the proposal's circles, sorted
        (judged in the proposal's causal past, where each was a live member)."""
        authority, opened = self.replica.authority, self.graph[proposal]
        cells = set()
        for key in self._facts[proposal].proposal.seats:
            grant = authority.grant_in_view(key, opened)
            assert grant is not None  # validated: a live member when it opened
            cells.add(grant.cell)
        return tuple(sorted(cells))

    def mandate_terms(self, proposal: bytes, view: Op | None = None) -> MandateTerms:
        """What mandate proposal ``proposal`` decided, seen from ``view``; raises
        :class:`RuleViolation` unless it is a mandate proposal, sealed and passed."""
        facts = self._facts.get(proposal)
        if facts is None:
            raise RuleViolation("field 'decision' must name a proposal.open op")
        if facts.proposal.delegate is None:
            raise RuleViolation("the decision named is not a mandate proposal")
        result = self.tally(proposal, view=view)
        if not result.final:
            raise RuleViolation("the decision is not sealed (or was withdrawn)")
        if not result.passed:
            raise RuleViolation("the decision did not pass: no mandate may be granted from it")
        return MandateTerms(
            proposal,
            facts.proposal.delegate,
            facts.proposal.acts,
            result.version.text,
            self.deciding_cells(proposal),
        )

    def tally(self, proposal: bytes, now_ms: int | None = None, view: Op | None = None) -> Tally:
        """Recount ``proposal`` from the ops held (or visible from ``view``)."""
        facts = self._facts.get(proposal)
        if facts is None:
            raise KeyError(proposal)
        self._tallying.add(proposal)
        try:
            return self._count(facts, now_ms, view)
        finally:
            self._tallying.discard(proposal)

    def _cut(self, seal: bytes, proposal: Proposal) -> frozenset[bytes]:
        """The seal's causal past since the proposal opened (computed once: a
        seal's past never changes). Worked out when first needed, not at
        ingest, where it cost a walk of the whole voting window per seal."""
        cut = self._cuts.get(seal)
        if cut is None:
            cut = self.graph.past_since(seal, self.graph[proposal.id].ts)
            self._cuts[seal] = cut
        return cut

    def _count(self, facts: _Facts, now_ms: int | None, view: Op | None) -> Tally:
        proposal = facts.proposal
        seals = self.seals(proposal.id, view)
        # The cut is the union of the concurrent seals' causal pasts: a sealer
        # who backdates a seal to leave votes out cannot outvote the cut of an
        # honest seal made at the same time.
        cut = frozenset().union(*(self._cut(s, proposal) for s in seals)) if seals else None
        version = self._version_in_cut(facts, cut, view)
        authority = self.replica.authority
        late: list[bytes] = []
        latest: dict[bytes, Op] = {}
        for vote_id in facts.votes:
            if not self.graph.in_view(vote_id, view):
                continue
            if cut is not None and vote_id not in cut:
                late.append(vote_id)
                continue
            vote = self.graph[vote_id]
            held = latest.get(vote.author)
            if held is None or (vote.ts, vote.id) > (held.ts, held.id):
                latest[vote.author] = vote
        void: list[tuple[bytes, str]] = []
        counted: list[Ballot] = []
        for vote in latest.values():
            if vote.body["version"] != version.op:
                void.append((vote.id, "cast on a text amended since"))
            elif not authority.counts(vote, view):
                void.append((vote.id, "the voter's key or cell was removed concurrently"))
            else:
                counted.append(facts.votes[vote.id])
        return self._result(
            facts,
            counted,
            seals=seals,
            version=version,
            now_ms=now_ms,
            view=view,
            late=late,
            void=void,
        )

    def _result(
        self,
        facts: _Facts,
        counted: list[Ballot],
        *,
        seals: tuple[bytes, ...],
        version: Version,
        now_ms: int | None,
        view: Op | None,
        late: list[bytes],
        void: list[tuple[bytes, str]],
    ) -> Tally:
        proposal = facts.proposal
        counts = [0] * len(version.options)
        circles: dict[str, list[Ballot]] = {c.name: [] for c in proposal.circles}
        for ballot in sorted(counted, key=lambda b: b.op):
            for choice in ballot.choices:
                counts[choice] += 1
            circles[ballot.circle].append(ballot)
        best = max(counts)
        winners = tuple(i for i, c in enumerate(counts) if c == best and best > 0)
        quorum_met = len(counted) * 100 >= proposal.quorum * proposal.eligible
        withdrawn = any(self.graph.in_view(w, view) for w in facts.withdrawals)
        if proposal.yes_no:
            passed = quorum_met and counts[0] > counts[1]
        else:
            passed = quorum_met and len(winners) == 1
        if withdrawn:
            status = "withdrawn"
        elif seals:
            status = "sealed"
        elif now_ms is not None and now_ms <= proposal.closes_ms:
            status = "open"
        else:
            status = "awaiting seal"
        return Tally(
            proposal=proposal.id,
            status=status,
            final=bool(seals) and not withdrawn,
            seals=seals,
            version=version,
            counts=tuple(counts),
            circles={name: tuple(b) for name, b in circles.items()},
            eligible=proposal.eligible,
            voters=len(counted),
            quorum_met=quorum_met,
            winners=winners,
            passed=passed and bool(seals) and not withdrawn,
            late=tuple(sorted(late)),
            void=tuple(sorted(void)),
        )
