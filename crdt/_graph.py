"""The causal op graph: which ops a replica holds, and in what order they apply.

Theory of operation. Ops arrive in any order, any number of times. An op is
*applied* once all its deps are applied and it passes the graph's rules and the
record kind's validation; until then it waits:

- in the *held* set if its timestamp is more than ``max_skew_ms`` ahead of
  ``now`` (released when ``now`` reaches its timestamp);
- in the *pending* set if some deps are missing (released, in the same call,
  as soon as the last missing dep is applied).

Both sets are bounded; a full set refuses the op with a :class:`CapacityError`,
so no input can make memory grow without bound. An op that fails validation
is remembered (in a bounded set) as rejected, and so is everything pending on
it: an op whose causal past holds an invalid op can never become valid.

Rules the graph itself enforces, judged only against the op's deps:

1. the op belongs to this graph's federation;
2. its timestamp is strictly greater than each dep's;
3. an author's op with ``seq > 1`` lists that author's op ``seq - 1`` among its
   deps, so each author's ops form a chain.

Rule 2 makes ``(ts, id)`` order a topological order. Two different applied ops
with the same author and seq are an *equivocation*: both are kept and applied,
and the pair is kept as evidence that anyone can check.

The graph does not know record kinds; an :class:`Admission` passed to
:meth:`OpGraph.add` validates each op against its causal past and applies it
to the record state, one op at a time, in the order the graph applies them.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from ._errors import CausalityViolation, HeldSetFull, InvalidOp, PendingSetFull
from ._hlc import ts_ms
from ._op import Op

STATE_HASH_DOMAIN = b"archipel/state/v1\x00"
_MASK = 2**256 - 1  # sums of ids are kept modulo 2**256


class Admission(Protocol):
    """What the graph asks of the records when an op's deps are all applied."""

    def check(self, op: Op) -> None:
        """Raise :class:`InvalidOp` if ``op`` is not allowed by its causal past."""

    def apply(self, op: Op) -> None:
        """Fold ``op`` into the record state; called right after the graph applies it."""


class Status(Enum):
    """What became of the op passed to :meth:`OpGraph.add`."""

    APPLIED = "applied"
    PENDING = "pending"  # waiting for missing deps
    HELD = "held"  # dated in the future
    DUPLICATE = "duplicate"  # already applied, pending or held


@dataclass(frozen=True, slots=True)
class Rejection:
    """An op that was refused while being released from the pending or held set."""

    op_id: bytes
    reason: str


@dataclass(frozen=True, slots=True)
class AddResult:
    """The outcome of one :meth:`OpGraph.add` or :meth:`OpGraph.release_due` call."""

    status: Status
    applied: tuple[Op, ...] = ()  # every op applied by the call, in application order
    rejected: tuple[Rejection, ...] = ()  # released ops that failed validation


@dataclass(frozen=True, slots=True)
class Equivocation:
    """Evidence that ``author`` signed several different ops with one ``seq``.

    ``ops`` are the signed bytes, so a third party can verify it alone.
    """

    author: bytes
    seq: int
    ops: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class GraphLimits:
    """Bounds of the waiting sets and the tolerated clock skew."""

    max_pending: int = 10_000
    max_held: int = 1_000
    max_rejected: int = 10_000
    max_skew_ms: int = 60_000


DEFAULT_GRAPH_LIMITS = GraphLimits()
_DUPLICATE = AddResult(Status.DUPLICATE)


@dataclass(slots=True)
class _Waiting:
    """Ops waiting for missing deps, indexed both ways."""

    ops: dict[bytes, Op] = field(default_factory=dict)
    missing: dict[bytes, set[bytes]] = field(default_factory=dict)  # op id -> missing dep ids
    waiters: dict[bytes, set[bytes]] = field(default_factory=dict)  # dep id -> waiting op ids

    def add(self, op: Op, missing: set[bytes]) -> None:
        self.ops[op.id] = op
        self.missing[op.id] = missing
        for dep in missing:
            self.waiters.setdefault(dep, set()).add(op.id)

    def remove(self, op_id: bytes) -> Op:
        op = self.ops.pop(op_id)
        for dep in self.missing.pop(op_id):
            ids = self.waiters[dep]
            ids.discard(op_id)
            if not ids:
                del self.waiters[dep]
        return op

    def satisfied_by(self, dep: bytes) -> list[Op]:
        """Note that ``dep`` was applied; return (and remove) the ops it completes."""
        ready = []
        for op_id in sorted(self.waiters.pop(dep, ())):
            missing = self.missing[op_id]
            missing.discard(dep)
            if not missing:
                del self.missing[op_id]
                ready.append(self.ops.pop(op_id))
        return ready


class OpGraph:
    """The applied ops of one federation, plus the ops waiting to be applied."""

    def __init__(self, federation: bytes, limits: GraphLimits = DEFAULT_GRAPH_LIMITS) -> None:
        self.federation = federation
        self.limits = limits
        self._ops: dict[bytes, Op] = {}
        self._heads: set[bytes] = set()
        self._by_author_seq: dict[tuple[bytes, int], bytes] = {}
        self._author_head: dict[bytes, Op] = {}
        self._equivocations: dict[tuple[bytes, int], list[bytes]] = {}
        self._pending = _Waiting()
        self._held: dict[bytes, Op] = {}
        self._held_queue: list[tuple[int, bytes]] = []
        self._rejected: dict[bytes, str] = {}
        self._roots: set[bytes] = set()
        self._id_sum = 0

    # -- adding -------------------------------------------------------------

    def add(self, op: Op, now_ms: int, admission: Admission) -> AddResult:
        """Take ``op``: apply it if it can be, otherwise hold it or let it wait.

        Raises :class:`InvalidOp` if ``op`` itself is refused (the graph is then
        unchanged) and :class:`CapacityError` if it would have to wait in a full
        set. Ops released by this call that fail validation are reported in
        :attr:`AddResult.rejected`.
        """
        # This is the hot path of ingest: it reads attributes into locals once.
        ops, ident, deps = self._ops, op.id, op.deps
        if ident in ops or ident in self._held or ident in self._pending.ops:
            return _DUPLICATE
        rejected = self._rejected
        if rejected:
            reason = rejected.get(ident)
            if reason is not None:
                raise InvalidOp(f"previously rejected: {reason}", op_id=ident)
            for dep in deps:
                if dep in rejected:
                    raise InvalidOp(f"depends on rejected op {dep.hex()[:16]}", op_id=ident)
        if op.federation != self.federation:
            raise CausalityViolation("op belongs to another federation", op_id=ident)
        if ts_ms(op.ts) > now_ms + self.limits.max_skew_ms:
            if len(self._held) >= self.limits.max_held:
                raise HeldSetFull(f"{len(self._held)} future-dated ops are already held")
            self._held[op.id] = op
            heapq.heappush(self._held_queue, (op.ts, op.id))
            return AddResult(Status.HELD)
        missing = {dep for dep in deps if dep not in ops}
        if missing:
            if len(self._pending.ops) >= self.limits.max_pending:
                raise PendingSetFull(
                    f"{len(self._pending.ops)} ops are already waiting for missing deps"
                )
            self._pending.add(op, missing)
            return AddResult(Status.PENDING)
        self._admit(op, admission)  # raises InvalidOp, graph unchanged
        if ident not in self._pending.waiters:
            return AddResult(Status.APPLIED, (op,))
        applied, refused = self._release_waiters(op, admission)
        return AddResult(Status.APPLIED, (op, *applied), tuple(refused))

    def release_due(self, now_ms: int, admission: Admission) -> AddResult:
        """Move held ops whose time has come (``now_ms`` reached their timestamp)
        into the graph. Call it when :meth:`next_release_ms` is reached."""
        applied: list[Op] = []
        rejected: list[Rejection] = []
        while self._held_queue and ts_ms(self._held_queue[0][0]) <= now_ms:
            _, op_id = heapq.heappop(self._held_queue)
            op = self._held.pop(op_id)
            # Re-enter through add(): its deps may be missing, or rejected by now.
            try:
                result = self.add(op, now_ms, admission)
            except InvalidOp as exc:
                self._remember_rejected(op.id, exc.reason)
                rejected.append(Rejection(op.id, exc.reason))
                continue
            except (PendingSetFull, HeldSetFull) as exc:
                rejected.append(Rejection(op.id, str(exc)))
                continue
            applied.extend(result.applied)
            rejected.extend(result.rejected)
        return AddResult(Status.APPLIED, tuple(applied), tuple(rejected))

    def next_release_ms(self) -> int | None:
        """When the earliest held op may be released, or None if none is held."""
        return ts_ms(self._held_queue[0][0]) if self._held_queue else None

    def check(self, op: Op, admission: Admission) -> None:
        """Raise :class:`InvalidOp` unless ``op``, whose deps are all applied,
        would be applied now. Changes nothing, not even the rejected set: an op
        that fails here was never seen by anyone."""
        if op.federation != self.federation:
            raise CausalityViolation("op belongs to another federation", op_id=op.id)
        absent = [dep.hex()[:16] for dep in op.deps if dep not in self._ops]
        if absent:
            raise CausalityViolation(f"deps not applied here: {', '.join(absent)}", op_id=op.id)
        self._check_rules(op)
        admission.check(op)

    def _admit(self, op: Op, admission: Admission) -> None:
        """Check ``op`` (deps all applied) and apply it, or raise and change nothing."""
        try:
            self._check_rules(op)
            admission.check(op)
        except InvalidOp as exc:
            self._remember_rejected(op.id, exc.reason)
            raise
        ident, author = op.id, op.author
        self._ops[ident] = op
        if not op.deps:
            self._roots.add(ident)
        heads = self._heads
        heads.difference_update(op.deps)
        heads.add(ident)
        self._id_sum = (self._id_sum + int.from_bytes(ident, "little")) & _MASK
        key = (author, op.seq)
        first = self._by_author_seq.setdefault(key, ident)
        if first != ident:
            self._equivocations.setdefault(key, [first]).append(ident)
        head = self._author_head.get(author)
        if head is None or (op.seq, ident) > (head.seq, head.id):
            self._author_head[author] = op
        admission.apply(op)

    def _check_rules(self, op: Op) -> None:
        ops, ts, author, previous = self._ops, op.ts, op.author, op.seq - 1
        has_previous = previous == 0
        for dep_id in op.deps:
            dep = ops[dep_id]
            if dep.ts >= ts:
                raise CausalityViolation(
                    "timestamp is not later than a dep's timestamp", op_id=op.id
                )
            if dep.seq == previous and dep.author == author:
                has_previous = True
        if not has_previous:
            raise CausalityViolation(
                f"op {op.seq} of its author does not list the author's op {op.seq - 1}"
                " among its deps",
                op_id=op.id,
            )

    def _release_waiters(self, first: Op, admission: Admission) -> tuple[list[Op], list[Rejection]]:
        """Apply every pending op that ``first`` completes, transitively."""
        applied: list[Op] = []
        rejected: list[Rejection] = []
        queue = deque(self._pending.satisfied_by(first.id))
        while queue:
            op = queue.popleft()
            try:
                self._admit(op, admission)
            except InvalidOp as exc:
                rejected.append(Rejection(op.id, exc.reason))
                rejected.extend(self._reject_waiters(op.id))
                continue
            applied.append(op)
            queue.extend(self._pending.satisfied_by(op.id))
        return applied, rejected

    def _reject_waiters(self, bad: bytes) -> list[Rejection]:
        """Reject every pending op whose causal past includes the rejected ``bad``."""
        rejected = []
        stack = [bad]
        while stack:
            dep = stack.pop()
            for op_id in sorted(self._pending.waiters.get(dep, ())):
                if op_id not in self._pending.ops:
                    continue
                self._pending.remove(op_id)
                reason = f"depends on rejected op {dep.hex()[:16]}"
                self._remember_rejected(op_id, reason)
                rejected.append(Rejection(op_id, reason))
                stack.append(op_id)
        return rejected

    def _remember_rejected(self, op_id: bytes, reason: str) -> None:
        if len(self._rejected) >= self.limits.max_rejected:
            del self._rejected[next(iter(self._rejected))]
        self._rejected[op_id] = reason

    # -- queries ------------------------------------------------------------

    def __contains__(self, op_id: object) -> bool:
        return op_id in self._ops

    def __len__(self) -> int:
        return len(self._ops)

    def __getitem__(self, op_id: bytes) -> Op:
        return self._ops[op_id]

    def get(self, op_id: bytes) -> Op | None:
        """The applied op with this id, if any."""
        return self._ops.get(op_id)

    def heads(self) -> frozenset[bytes]:
        """Ids of the applied ops that no applied op depends on."""
        return frozenset(self._heads)

    def state_hash(self) -> bytes:
        """A digest of the set of applied ops, cheap to compare between replicas.

        BLAKE2b-256 over the sum of all ids (as little-endian integers, modulo
        2**256) and their count: the same set gives the same digest whatever
        the order ops arrived in, and updating it costs O(1) per op.
        """
        payload = self._id_sum.to_bytes(32, "little") + len(self._ops).to_bytes(8, "little")
        return hashlib.blake2b(STATE_HASH_DOMAIN + payload, digest_size=32).digest()

    def pending_count(self) -> int:
        return len(self._pending.ops)

    def held_count(self) -> int:
        return len(self._held)

    def is_pending(self, op_id: bytes) -> bool:
        return op_id in self._pending.ops

    def is_held(self, op_id: bytes) -> bool:
        return op_id in self._held

    def missing(self) -> frozenset[bytes]:
        """Ids that waiting ops need and this replica has nowhere: what to fetch."""
        return frozenset(
            dep
            for dep in self._pending.waiters
            if dep not in self._pending.ops and dep not in self._held
        )

    def rejection(self, op_id: bytes) -> str | None:
        """Why the op with this id was rejected, if it was (and is still remembered)."""
        return self._rejected.get(op_id)

    def author_head(self, author: bytes) -> Op | None:
        """The author's applied op with the highest seq (ties broken by id)."""
        return self._author_head.get(author)

    def equivocations(self) -> list[Equivocation]:
        """Evidence for every (author, seq) with more than one applied op."""
        return [
            Equivocation(author, seq, tuple(self._ops[i].data for i in sorted(ids)))
            for (author, seq), ids in sorted(self._equivocations.items())
        ]

    def equivocators(self) -> frozenset[bytes]:
        """Authors flagged for equivocation."""
        return frozenset(author for author, _ in self._equivocations)

    def causal_past(self, op_id: bytes) -> frozenset[bytes]:
        """Ids of every applied op that ``op_id`` depends on, directly or not."""
        seen: set[bytes] = set()
        stack = list(self._ops[op_id].deps)
        while stack:
            dep = stack.pop()
            if dep not in seen:
                seen.add(dep)
                stack.extend(self._ops[dep].deps)
        return frozenset(seen)

    def precedes(self, earlier: bytes, later: bytes | Op) -> bool:
        """Whether ``earlier`` (applied) is in the causal past of ``later``.

        ``later`` is an applied op's id, or an op whose deps are all applied
        (one being validated). Timestamps strictly increase along deps, so the
        search skips every op older than ``earlier``: its cost is bounded by the
        ops between the two.
        """
        target = self._ops[earlier]
        deps = later.deps if isinstance(later, Op) else self._ops[later].deps
        if earlier in deps:
            return True
        if not deps:
            return False
        if len(self._roots) == 1 and earlier in self._roots:
            return True  # the one root (the genesis) is in every other op's past
        seen: set[bytes] = set()
        stack = list(deps)
        while stack:
            dep = stack.pop()
            if dep == earlier:
                return True
            if dep in seen:
                continue
            seen.add(dep)
            op = self._ops[dep]
            if op.ts > target.ts:
                stack.extend(op.deps)
        return False

    def past_since(self, op_id: bytes, floor_ts: int) -> frozenset[bytes]:
        """Ids in the causal past of ``op_id`` with a timestamp of at least
        ``floor_ts``: one search, for membership tests against many ops
        (the votes in a seal's cut)."""
        ops = self._ops
        seen: set[bytes] = set()
        stack = list(ops[op_id].deps)
        while stack:
            dep = stack.pop()
            if dep in seen:
                continue
            seen.add(dep)  # older ops too, so that no op is pushed twice
            op = ops[dep]
            if op.ts >= floor_ts:
                stack.extend(op.deps)
        return frozenset(d for d in seen if ops[d].ts >= floor_ts)

    def in_view(self, op_id: bytes, view: Op | None) -> bool:
        """Whether applied op ``op_id`` is visible from ``view``: in its causal past
        or the view itself; with no view, every applied op is visible."""
        if view is None:
            return op_id in self._ops
        return op_id == view.id or self.precedes(op_id, view)

    def concurrent(self, a: bytes, b: bytes) -> bool:
        """Whether neither op is in the other's causal past."""
        return a != b and not self.precedes(a, b) and not self.precedes(b, a)

    def topological(self) -> Iterator[Op]:
        """Every applied op, deps first, ties broken by (timestamp, id)."""
        return iter(sorted(self._ops.values(), key=lambda op: (op.ts, op.id)))
