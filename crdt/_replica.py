"""A replica: one node's copy of a federation, its op graph plus record state.

The daemon and the simulator both drive this object. It is pure: the caller
passes ``now_ms`` and signing keys, and gets back what was applied.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

import nacl.signing

from ._canonical import DEFAULT_LIMITS, Limits, Value
from ._errors import CausalityViolation, RuleViolation
from ._graph import DEFAULT_GRAPH_LIMITS, AddResult, GraphLimits, OpGraph
from ._hlc import HybridClock, ts_from_ms, ts_ms
from ._op import Op, decode_op, sign_op
from ._record import Record
from .aid import Aid
from .alerts import Alerts
from .authority import Authority
from .councils import Councils
from .decisions import Decisions
from .genesis import KIND as GENESIS
from .genesis import Params, make_genesis
from .ledger import Ledger
from .lots import Lots
from .mandates import Mandates
from .note import Notes
from .pulse import Pulse

R = TypeVar("R", bound=Record)

DEFAULT_RECORDS: tuple[type[Record], ...] = (
    Authority,
    Decisions,
    Mandates,
    Councils,
    Lots,
    Aid,
    Ledger,
    Alerts,
    Notes,
    Pulse,
)
"""The record kinds every replica runs."""


class Replica:
    """One node's state of one federation."""

    def __init__(
        self,
        federation: bytes,
        *,
        records: Iterable[type[Record]] = DEFAULT_RECORDS,
        limits: Limits = DEFAULT_LIMITS,
        graph_limits: GraphLimits = DEFAULT_GRAPH_LIMITS,
    ) -> None:
        self.limits = limits
        self.graph = OpGraph(federation, graph_limits)
        self.clock = HybridClock()
        self._records: dict[type[Record], Record] = {}
        self._owners: dict[str, Record] = {}
        for cls in dict.fromkeys(records):  # a class listed twice runs once
            record = cls(self)
            self._records[cls] = record
            for kind in cls.op_kinds:
                if kind in self._owners:
                    raise ValueError(f"op kind {kind!r} has two records")
                self._owners[kind] = record
        if Authority not in self._records:
            raise ValueError("a replica needs the Authority record: it judges every op")
        self._authority = self.record(Authority)

    @property
    def federation(self) -> bytes:
        return self.graph.federation

    @property
    def authority(self) -> Authority:
        return self._authority

    @property
    def record_classes(self) -> tuple[type[Record], ...]:
        """The record kinds this replica runs (to build another like it)."""
        return tuple(self._records)

    def record(self, cls: type[R]) -> R:
        """This replica's instance of a record kind, for its queries."""
        record = self._records[cls]
        assert isinstance(record, cls)
        return record

    # -- taking ops ---------------------------------------------------------

    def receive(self, op: Op, now_ms: int) -> AddResult:
        """Take an op from anywhere. Raises :class:`InvalidOp` if it is refused
        (nothing changes) or :class:`CapacityError` if it cannot wait.

        The clock does not observe received timestamps: a held or refused op
        dated far ahead must not drag this node's own timestamps into the
        future. :meth:`author` builds on the newest applied dep instead.
        """
        return self.graph.add(op, now_ms, self)

    def receive_bytes(
        self, data: bytes, now_ms: int, expected_id: bytes | None = None
    ) -> AddResult:
        """Decode, authenticate and take op bytes (from the wire or the disk)."""
        return self.receive(decode_op(data, expected_id=expected_id, limits=self.limits), now_ms)

    def tick(self, now_ms: int) -> AddResult:
        """Release held ops whose time has come; call at :meth:`next_deadline_ms`."""
        return self.graph.release_due(now_ms, self)

    def next_deadline_ms(self) -> int | None:
        return self.graph.next_release_ms()

    def author(
        self, key: nacl.signing.SigningKey, kind: str, body: Mapping[str, Value], now_ms: int
    ) -> Op:
        """Sign a new op on top of everything this replica holds, and apply it.

        Raises :class:`InvalidOp` (nothing changes) if the op is not allowed.
        """
        op = self.prepare(key, kind, body, now_ms)
        self.receive(op, now_ms)
        return op

    def prepare(
        self, key: nacl.signing.SigningKey, kind: str, body: Mapping[str, Value], now_ms: int
    ) -> Op:
        """Sign a new op on top of everything this replica holds, and check it,
        without applying it: for a node that stores an op durably before it
        counts (then :meth:`receive` applies it). Raises :class:`InvalidOp` if
        the op is not allowed. Two ops prepared one after the other without
        the first being received name the same previous op: one of them must
        be dropped unseen.
        """
        author = bytes(key.verify_key)
        own = self.graph.author_head(author)
        # Required deps first: the author's previous op (the author chain) and
        # the ops the body refers to (Record.ref_fields). Then the newest heads,
        # as many as fit; the rest stay heads and are named by a later op.
        required = [own] if own is not None else []
        record = self._owners.get(kind)
        for name in record.ref_fields.get(kind, ()) if record is not None else ():
            ref = body.get(name)
            if isinstance(ref, bytes) and ref not in self.graph:
                raise RuleViolation(
                    f"field {name!r} must name an op among the deps, but this replica does not"
                    f" hold op {ref.hex()[:16]}… (no such op, or not received yet)"
                )
            if isinstance(ref, bytes):
                required.append(self.graph[ref])
        heads = sorted((self.graph[h] for h in self.graph.heads()), key=_newest_first)
        deps = list(dict.fromkeys(required))
        room = self.limits.max_deps - len(deps)
        deps += [op for op in heads if op not in deps][: max(room, 0)]
        if not deps:
            raise RuleViolation("this replica holds no genesis yet: nothing to build on")
        ts = self.clock.tick(now_ms, max(op.ts for op in deps))
        if ts_ms(ts) > now_ms + self.graph.limits.max_skew_ms:
            raise CausalityViolation(
                f"this node's clock ({now_ms} ms) is behind the ops it builds on by more than"
                f" {self.graph.limits.max_skew_ms} ms; its op would be held: check the clock"
            )
        op = sign_op(
            key,
            federation=self.federation,
            seq=own.seq + 1 if own is not None else 1,
            deps=[op.id for op in deps],
            ts=ts,
            kind=kind,
            body=body,
            limits=self.limits,
        )
        self.graph.check(op, self)
        return op

    # -- Admission, called by the graph -------------------------------------

    def check(self, op: Op) -> None:
        record = self._owners.get(op.kind)
        if record is None:
            raise RuleViolation(f"unknown op kind {op.kind!r}", op_id=op.id)
        try:
            if not op.deps and op.kind != GENESIS:
                raise RuleViolation("only the genesis may have no deps")
            for name in record.ref_fields.get(op.kind, ()):
                ref = op.body.get(name)
                if name in op.body and (not isinstance(ref, bytes) or ref not in op.deps):
                    raise RuleViolation(f"field {name!r} must name an op among the deps")
            if op.kind != GENESIS:
                self.authority.check_author(op)
            record.validate(op)
        except RuleViolation as exc:
            if exc.op_id is None:
                raise RuleViolation(exc.reason, op_id=op.id) from None
            raise

    def apply(self, op: Op) -> None:
        self._owners[op.kind].apply(op)

    # -- queries ------------------------------------------------------------

    def state_hash(self) -> bytes:
        return self.graph.state_hash()

    def heads(self) -> frozenset[bytes]:
        return self.graph.heads()


def _newest_first(op: Op) -> tuple[int, bytes]:
    return (-op.ts, op.id)


def found_federation(
    key: nacl.signing.SigningKey,
    name: str,
    cells: Sequence[Mapping[str, Value]],
    now_ms: int,
    *,
    params: Params | None = None,
    records: Iterable[type[Record]] = DEFAULT_RECORDS,
) -> tuple[Replica, Op]:
    """Create a new federation: its genesis op and a replica holding it.

    ``cells`` are the founding cells: maps with ``name``, ``members`` and
    optionally ``devices`` (public keys). ``key`` must be one of those keys.
    """
    genesis = make_genesis(key, name=name, cells=cells, ts=ts_from_ms(now_ms), params=params)
    replica = Replica(genesis.federation, records=records)
    replica.receive(genesis, now_ms)
    return replica, genesis
