"""The extension point for record kinds.

A record kind is one module holding one :class:`Record` subclass: the op kinds
it owns, how it validates them, how it folds them into its state, and its
queries. Adding a record kind is adding such a module and listing its class in
:data:`archipel.crdt.DEFAULT_RECORDS` (or passing it to the replica).

Contract for subclasses (the convergence tests check it):

- ``validate`` is a pure function of the op and its causal past. The record's
  state may hold effects of ops concurrent with the op being validated (they
  were applied first on this replica, perhaps not on others); a rule that looks
  at state must only count entries whose op :meth:`OpGraph.precedes` this one.
- ``apply`` is called once per op, in an order that respects causality but
  otherwise varies between replicas; the state it builds must not depend on
  the order of concurrent ops (concurrent applies commute). Ordering decisions
  (who got the last unit, which seal counts) belong in queries, computed from
  the whole set with a fixed tie-break.
- queries that depend on time take ``now_ms``; nothing reads a clock.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, ClassVar, TypeVar

from ._canonical import Value
from ._errors import RuleViolation
from ._op import Op

if TYPE_CHECKING:
    from ._graph import OpGraph
    from ._replica import Replica

T = TypeVar("T")


class Record(ABC):
    """Base of every record kind. One instance per replica holds its state."""

    op_kinds: ClassVar[tuple[str, ...]]
    """The op kinds this record owns; each op kind has exactly one owner."""

    ref_fields: ClassVar[Mapping[str, tuple[str, ...]]] = {}
    """Per op kind, the body fields that hold ids of other ops. Every such id
    must be among the op's deps (so "is it in the causal past" is O(1)); the
    replica checks it before ``validate`` and adds them when authoring."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self._parsed: tuple[Op, object] | None = None

    def parse_once(self, op: Op, parse: Callable[[Op], T]) -> T:
        """``parse(op)``, computed once for ``validate`` and reused by the
        ``apply`` that follows it (the replica always applies an op right after
        validating it). Parsing a body twice was a large share of ingest time."""
        cached = self._parsed
        if cached is not None and cached[0] is op:
            return cached[1]  # type: ignore[return-value]
        value = parse(op)
        self._parsed = (op, value)
        return value

    @property
    def graph(self) -> OpGraph:
        return self.replica.graph

    @abstractmethod
    def validate(self, op: Op) -> None:
        """Raise :class:`RuleViolation` if ``op`` is not allowed by its causal past."""

    @abstractmethod
    def apply(self, op: Op) -> None:
        """Fold a validated op into this record's state."""


# -- helpers for parsing op bodies into typed values ------------------------


def field_str(
    body: Mapping[str, Value], name: str, *, min_len: int = 0, max_len: int = 4096
) -> str:
    """The str field ``name`` of ``body``, of ``min_len`` to ``max_len`` characters."""
    value = body.get(name)
    if not isinstance(value, str):
        raise RuleViolation(f"field {name!r} must be a string")
    if not min_len <= len(value) <= max_len:
        raise RuleViolation(f"field {name!r} must be {min_len} to {max_len} characters long")
    return value


def field_ids(
    body: Mapping[str, Value],
    name: str,
    *,
    noun: str,
    min_count: int = 1,
    max_count: int = 256,
    optional: bool = False,
) -> tuple[bytes, ...]:
    """The field ``name``: a sorted array of distinct 32-byte values (keys, cell
    ids); ``noun`` names them in errors. An optional field may be absent."""
    if optional and name not in body:
        return ()
    value = body.get(name)
    if not isinstance(value, tuple) or not min_count <= len(value) <= max_count:
        count = f"at most {max_count}" if min_count == 0 else f"{min_count} to {max_count}"
        raise RuleViolation(f"field {name!r} must be an array of {count} {noun}")
    previous = b""
    for item in value:
        if not isinstance(item, bytes) or len(item) != 32:
            raise RuleViolation(f"field {name!r} must hold 32-byte {noun}")
        if item <= previous:
            raise RuleViolation(f"field {name!r} must be sorted without repeats")
        previous = item
    return value


def field_keys(
    body: Mapping[str, Value], name: str, *, min_count: int = 1, max_count: int = 256
) -> tuple[bytes, ...]:
    """The field ``name``: a sorted array of distinct 32-byte public keys."""
    return field_ids(body, name, noun="public keys", min_count=min_count, max_count=max_count)


def only_fields(body: Mapping[str, Value], allowed: frozenset[str]) -> None:
    """Refuse fields the kind does not define: a typo must not pass silently."""
    if body.keys() <= allowed:
        return
    extra = set(body) - allowed
    raise RuleViolation(f"unknown field(s): {', '.join(sorted(extra))}")


def field_int(
    body: Mapping[str, Value], name: str, low: int, high: int, *, default: int | None = None
) -> int:
    """The integer field ``name``, from ``low`` to ``high``; ``default`` if absent
    (and a default is given)."""
    if name not in body and default is not None:
        return default
    value = body.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise RuleViolation(f"field {name!r} must be an integer")
    if not low <= value <= high:
        raise RuleViolation(f"field {name!r} must be from {low} to {high}, not {value}")
    return value


def field_bytes(body: Mapping[str, Value], name: str, size: int = 32) -> bytes:
    """The field ``name``: exactly ``size`` bytes (an op id, a cell id, a key)."""
    value = body.get(name)
    if not isinstance(value, bytes) or len(value) != size:
        raise RuleViolation(f"field {name!r} must be {size} bytes")
    return value


def field_map(body: Mapping[str, Value], name: str) -> Mapping[str, Value]:
    value = body.get(name)
    if not isinstance(value, dict):
        raise RuleViolation(f"field {name!r} must be a map")
    return value


def field_choice(body: Mapping[str, Value], name: str, choices: tuple[str, ...]) -> str:
    value = body.get(name)
    if value not in choices:
        raise RuleViolation(f"field {name!r} must be one of {', '.join(choices)}")
    assert isinstance(value, str)
    return value


def field_strs(
    body: Mapping[str, Value], name: str, *, min_count: int, max_count: int, max_len: int = 200
) -> tuple[str, ...]:
    """The field ``name``: an array of non-empty strings."""
    value = body.get(name)
    if not isinstance(value, tuple) or not min_count <= len(value) <= max_count:
        raise RuleViolation(f"field {name!r} must be an array of {min_count} to {max_count} items")
    for item in value:
        if not isinstance(item, str) or not 1 <= len(item) <= max_len:
            raise RuleViolation(f"field {name!r} must hold strings of 1 to {max_len} characters")
    return value
