"""A workload of real record ops: what cells do, at a chosen mix and pace.

The benchmarks, the cross-record convergence tests and the simulator all use
it. It authors real, signed ops through :meth:`Replica.author` on several
replicas (sites) that sync now and then, so the ops it produces are valid,
concurrent where sites diverge, and reference each other the way real use
does: votes on open proposals, claims on live offers, acts under live
mandates. Everything is decided by the ``rng`` passed in: the same seed gives
the same ops.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import nacl.signing

from archipel.crdt import InvalidOp, Op, Params, Replica, found_federation
from archipel.crdt._canonical import Value

DEFAULT_MIX: Mapping[str, int] = {
    "vote": 30,
    "claim": 15,
    "ledger": 15,
    "act": 15,
    "note": 6,
    "proposal": 5,
    "offer": 5,
    "grant": 4,
    "seal": 3,
    "recall": 1,
    "alert": 1,
}
"""Relative weights of the actions; votes, claims, ledger entries and acts
under mandates dominate, as in a federation's ordinary week."""

PROPOSAL_WINDOW_MS = 60_000

GENESIS_CELLS_MAX = 256
"""The most cells a genesis may found (``crdt/genesis.py``, ``parse_genesis``);
a larger federation admits the others (``cell.admit``, ``cell.endorse``)."""

PROPOSAL_CIRCLES_MAX = 64
"""The most circles a proposal may name (``crdt/decisions.py``): in a larger
federation each proposal seats a random 64 of them."""


@dataclass(frozen=True, slots=True)
class Member:
    key: nacl.signing.SigningKey
    cell: int

    @property
    def public(self) -> bytes:
        return bytes(self.key.verify_key)


@dataclass(slots=True)
class _Open:
    """What the workload may refer to next (ids it authored, with their terms)."""

    proposals: list[tuple[bytes, int, int]] = field(default_factory=list)  # id, closes, options
    offers: list[tuple[bytes, int]] = field(default_factory=list)  # id, offering cell
    mandates: list[tuple[bytes, int]] = field(default_factory=list)  # id, delegate index


class Workload:
    """Authors a mix of record ops over ``sites`` replicas of one federation."""

    def __init__(
        self,
        rng: random.Random,
        *,
        cells: int = 6,
        members_per_cell: int = 3,
        sites: int = 3,
        now_ms: int = 1_750_000_000_000,
        mix: Mapping[str, int] = DEFAULT_MIX,
        sync_every: int = 20,
        genesis_cells: int = GENESIS_CELLS_MAX,
    ) -> None:
        if members_per_cell < 3 and cells * members_per_cell < 3:
            raise ValueError("a workload needs at least 3 members (circles of 3)")
        if not 2 <= genesis_cells <= GENESIS_CELLS_MAX:
            raise ValueError(
                f"genesis_cells must be 2 to {GENESIS_CELLS_MAX} (an admission needs two"
                " founding cells to back it)"
            )
        self.rng = rng
        self.now_ms = now_ms
        self.sync_every = sync_every
        seed = rng.getrandbits(64)
        self.members = [
            Member(_key(seed, i), i // members_per_cell) for i in range(cells * members_per_cell)
        ]
        cell_bodies: list[Mapping[str, Value]] = [
            {
                "name": f"cell-{c}",
                "members": tuple(sorted(m.public for m in self.members if m.cell == c)),
            }
            for c in range(cells)
        ]
        params = Params(admission_endorsements=2)
        first, self.genesis = found_federation(
            self.members[0].key, "Workload", cell_bodies[:genesis_cells], now_ms, params=params
        )
        admitted = self._admit(first, cell_bodies, genesis_cells, members_per_cell)
        self.founding: list[Op] = [self.genesis, *admitted]
        """The genesis and the admissions of the cells it could not hold: what
        every site (every simulated node) holds before the workload starts."""
        self.sites = [first] + [Replica(self.genesis.federation) for _ in range(sites - 1)]
        for site in self.sites[1:]:
            for op in self.founding:
                site.receive(op, now_ms)
        groups = [tuple(sorted(m.public for m in g)) for g in _chunks(self.members, 3)]
        self._circle_of = {key: f"circle-{i}" for i, g in enumerate(groups) for key in g}
        self.circles: tuple[Value, ...] = tuple(
            {"name": f"circle-{i}", "members": group} for i, group in enumerate(groups)
        )
        self.ops: list[Op] = list(self.founding)
        self._open = _Open()
        self._seated: dict[bytes, frozenset[str]] = {}  # proposal -> its circles, if not all
        self._actions: dict[str, Callable[[Replica, int], Op]] = {
            "vote": self._vote,
            "claim": self._claim,
            "ledger": self._ledger,
            "act": self._act,
            "note": self._note,
            "proposal": self._proposal,
            "offer": self._offer,
            "grant": self._grant,
            "seal": self._seal,
            "recall": self._recall,
            "alert": self._alert,
        }
        self._names = list(mix)
        self._weights = [mix[name] for name in self._names]
        self.refused = 0
        self._may_author: Callable[[int], bool] = _anyone

    def author_on(
        self, site: Replica, members: Sequence[int], now_ms: int, action: str | None = None
    ) -> Op | None:
        """One op of the mix (or ``action``) on ``site`` at ``now_ms``, by one of
        ``members`` (indices into :attr:`members`); None if it was not possible.

        The simulator gives each node its own members: two nodes authoring as
        the same member would fork that member's chain (an equivocation). A
        mandate act is authored by the delegate, so only mandates delegated to
        one of ``members`` are acted under.
        """
        self.now_ms = now_ms
        if action is None:
            action = self.rng.choices(self._names, self._weights)[0]
        who = members[self.rng.randrange(len(members))]
        mine = frozenset(members)
        self._may_author = mine.__contains__
        try:
            op = self._actions[action](site, who)
        except (InvalidOp, LookupError):
            self.refused += 1
            return None
        finally:
            self._may_author = _anyone
        self.ops.append(op)
        return op

    def run(self, count: int, step_ms: int = 10) -> list[Op]:
        """Author ``count`` ops (:attr:`founding` excluded), ``step_ms`` apart on average;
        return every op authored so far, in authoring order."""
        target = len(self.ops) + count
        while len(self.ops) < target:
            self.now_ms += self.rng.randint(1, 2 * step_ms)
            if self.rng.randrange(self.sync_every) == 0:
                self.sync()
            site = self.rng.choice(self.sites)
            action = self.rng.choices(self._names, self._weights)[0]
            who = self.rng.randrange(len(self.members))
            try:
                op = self._actions[action](site, who)
            except (InvalidOp, LookupError):
                # Not possible right now on this site (nothing to vote on yet,
                # a recalled mandate, a closed window): another action follows.
                self.refused += 1
                continue
            self.ops.append(op)
        return self.ops

    def _admit(
        self, site: Replica, bodies: Sequence[Mapping[str, Value]], founding: int, size: int
    ) -> list[Op]:
        """Admit the cells ``bodies[founding:]`` on ``site``: for each, a
        ``cell.admit`` by a member of one founding cell and a ``cell.endorse``
        by a member of the next (the federation's k = 2 backing cells), in
        turn over the founding cells. Deterministic (signatures are), and
        authored at the genesis's time: the federation grew before the run."""
        ops: list[Op] = []
        for index in range(founding, len(bodies)):
            turn = index - founding
            proposer = self.members[(turn % founding) * size].key
            endorser = self.members[((turn + 1) % founding) * size].key
            admit = site.author(proposer, "cell.admit", bodies[index], self.now_ms)
            ops.append(admit)
            ops.append(site.author(endorser, "cell.endorse", {"admission": admit.id}, self.now_ms))
        return ops

    def sync(self) -> None:
        """Bring two random sites to the same ops (a partial heal)."""
        a, b = self.rng.sample(self.sites, 2) if len(self.sites) > 1 else (self.sites[0],) * 2
        for src, dst in ((a, b), (b, a)):
            for op in src.graph.topological():
                dst.receive(op, self.now_ms)

    def _author(self, site: Replica, who: int, kind: str, body: Mapping[str, Value]) -> Op:
        return site.author(self.members[who].key, kind, body, self.now_ms)

    # -- actions --------------------------------------------------------------

    def _proposal(self, site: Replica, who: int) -> Op:
        options = self.rng.randint(2, 4)
        circles = self.circles
        seated: frozenset[str] | None = None
        if len(circles) > PROPOSAL_CIRCLES_MAX:
            # Only in a federation larger than a proposal may seat (so smaller
            # runs draw exactly what they drew before this existed).
            picked = sorted(self.rng.sample(range(len(circles)), PROPOSAL_CIRCLES_MAX))
            circles = tuple(circles[i] for i in picked)
            seated = frozenset(f"circle-{i}" for i in picked)
        body: dict[str, Value] = {
            "title": f"proposal {len(self.ops)}",
            "text": "Shall we? " * self.rng.randint(1, 20),
            "options": tuple(f"option {i}" for i in range(options)),
            "ballot": self.rng.choice(("single", "approval")),
            "circles": circles,
            "window_ms": PROPOSAL_WINDOW_MS,
            "quorum": self.rng.choice((0, 25, 50)),
        }
        op = self._author(site, who, "proposal.open", body)
        self._open.proposals.append((op.id, self.now_ms + PROPOSAL_WINDOW_MS, options))
        if seated is not None:
            self._seated[op.id] = seated
        return op

    def _vote(self, site: Replica, who: int) -> Op:
        circle = self._circle_of[self.members[who].public]
        seated = self._seated
        live = [
            p
            for p in self._open.proposals
            if p[1] > self.now_ms
            and p[0] in site.graph
            and (p[0] not in seated or circle in seated[p[0]])
        ]
        proposal, _, options = self.rng.choice(live)
        body: dict[str, Value] = {
            "proposal": proposal,
            "version": proposal,
            "choices": (self.rng.randrange(options),),
            "reasoning": "because " * self.rng.randint(0, 10),
            "circle": circle,
        }
        return self._author(site, who, "vote.cast", body)

    def _seal(self, site: Replica, who: int) -> Op:
        closed = [p for p in self._open.proposals if p[1] < self.now_ms and p[0] in site.graph]
        proposal = self.rng.choice(closed)[0]
        op = self._author(site, who, "proposal.seal", {"proposal": proposal})
        self._open.proposals = [p for p in self._open.proposals if p[0] != proposal]
        return op

    def _offer(self, site: Replica, who: int) -> Op:
        body: dict[str, Value] = {
            "what": self.rng.choice(("rice", "tents", "rides", "bread", "blankets")),
            "quantity": self.rng.randint(5, 50),
            "unit": "units",
            "location": "the usual place",
            "until": self.now_ms + 24 * 3600 * 1000,
        }
        op = self._author(site, who, "aid.offer", body)
        self._open.offers.append((op.id, self.members[who].cell))
        return op

    def _claim(self, site: Replica, who: int) -> Op:
        cell = self.members[who].cell
        offers = [o for o in self._open.offers if o[1] != cell and o[0] in site.graph]
        offer = self.rng.choice(offers)[0]
        body: dict[str, Value] = {"offer": offer, "quantity": self.rng.randint(1, 5)}
        return self._author(site, who, "aid.claim", body)

    def _ledger(self, site: Replica, who: int) -> Op:
        body: dict[str, Value] = {
            "type": self.rng.choice(("contribution", "use", "gift_returned")),
            "resource": self.rng.choice(("kitchen", "van", "printer")),
            "quantity": self.rng.randint(1, 100),
            "unit": "hours",
            "note": "logged",
        }
        return self._author(site, who, "ledger.entry", body)

    def _grant(self, site: Replica, who: int) -> Op:
        cell = self.members[who].cell
        delegate = self.rng.choice([i for i, m in enumerate(self.members) if m.cell == cell])
        body: dict[str, Value] = {
            "delegate": self.members[delegate].public,
            "instructions": "Speak for us at the assembly.",
            "acts": ("speak", "sign"),
            "expires": self.now_ms + 7 * 24 * 3600 * 1000,
        }
        op = self._author(site, who, "mandate.grant", body)
        self._open.mandates.append((op.id, delegate))
        return op

    def _act(self, site: Replica, who: int) -> Op:
        mandates = [m for m in self._open.mandates if m[0] in site.graph and self._may_author(m[1])]
        mandate, delegate = self.rng.choice(mandates)
        body: dict[str, Value] = {
            "mandate": mandate,
            "act": self.rng.choice(("speak", "sign")),
            "text": "done",
        }
        return self._author(site, delegate, "mandate.act", body)

    def _recall(self, site: Replica, who: int) -> Op:
        cell = self.members[who].cell
        mine = [
            m for m in self._open.mandates if self.members[m[1]].cell == cell and m[0] in site.graph
        ]
        mandate = self.rng.choice(mine)[0]
        op = self._author(site, who, "mandate.recall", {"mandate": mandate})
        self._open.mandates = [m for m in self._open.mandates if m[0] != mandate]
        return op

    def _note(self, site: Replica, who: int) -> Op:
        return self._author(site, who, "note", {"text": "minutes " * self.rng.randint(1, 30)})

    def _alert(self, site: Replica, who: int) -> Op:
        body: dict[str, Value] = {
            "text": "Police at the square",
            "area": "centre",
            "expires": self.now_ms + 3600_000,
        }
        return self._author(site, who, "alert.raise", body)


def _anyone(_member: int) -> bool:
    return True


def _key(seed: int, index: int) -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey(
        hashlib.blake2b(b"workload-%d-%d" % (seed, index), digest_size=32).digest()
    )


def _chunks(members: list[Member], size: int) -> list[list[Member]]:
    """Groups of ``size`` members; a remainder of 1-2 joins the last group (3-5)."""
    groups = [members[i : i + size] for i in range(0, len(members), size)]
    if len(groups) > 1 and len(groups[-1]) < size:
        groups[-2].extend(groups.pop())
    return groups
