"""The federation genesis: the one root of a federation's op graph.

The genesis names the federation, its founding cells (each with its members'
and devices' keys) and the federation's parameters. The federation id is
derived from the genesis (author, timestamp, body), so the genesis is
self-certifying: a replica that knows the federation id accepts exactly one
genesis, and every other op descends from it (only the genesis may have no
deps).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import nacl.signing

from ._canonical import Value, encode
from ._errors import RuleViolation
from ._op import Op, sign_op
from ._record import Record, field_int, field_keys, field_map, field_str, only_fields

KIND = "genesis"
FEDERATION_ID_DOMAIN = b"archipel/federation/v1\x00"
CELL_ID_DOMAIN = b"archipel/cell/v1\x00"
DAY_MS = 24 * 3600 * 1000
LUNAR_CYCLE_MS = 2_548_800_000  # 29.5 days
_FIELDS = frozenset({"name", "cells", "params"})
_CELL_FIELDS = frozenset({"name", "members", "devices"})


@dataclass(frozen=True, slots=True)
class Params:
    """The federation's rules that are numbers. Fixed at genesis."""

    admission_endorsements: int = 2
    """Cells that must back a new cell's admission (the proposing cell counts)."""
    mandate_default_ms: int = LUNAR_CYCLE_MS
    mandate_max_ms: int = 3 * LUNAR_CYCLE_MS
    council_max_ms: int = 365 * DAY_MS
    vote_window_ms: int = 2 * DAY_MS

    @classmethod
    def from_body(cls, body: Mapping[str, Value]) -> Params:
        only_fields(body, frozenset(cls.__dataclass_fields__))
        defaults = cls()
        values = {
            name: field_int(body, name, 1, 100 * 365 * DAY_MS, default=getattr(defaults, name))
            for name in cls.__dataclass_fields__
        }
        params = cls(**values)
        if params.mandate_default_ms > params.mandate_max_ms:
            raise RuleViolation("mandate_default_ms must not exceed mandate_max_ms")
        return params

    def to_body(self) -> dict[str, Value]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass(frozen=True, slots=True)
class FoundingCell:
    name: str
    members: tuple[bytes, ...]
    devices: tuple[bytes, ...]


def cell_id(creating_op: bytes, index: int) -> bytes:
    """The id of the ``index``-th cell created by op ``creating_op``."""
    return hashlib.blake2b(
        CELL_ID_DOMAIN + creating_op + index.to_bytes(2, "big"), digest_size=32
    ).digest()


def parse_cell(body: Mapping[str, Value]) -> FoundingCell:
    """A cell description: name, member keys (at least one), device keys."""
    only_fields(body, _CELL_FIELDS)
    return FoundingCell(
        name=field_str(body, "name", min_len=1, max_len=100),
        members=field_keys(body, "members"),
        devices=field_keys(body, "devices", min_count=0) if "devices" in body else (),
    )


def federation_id(author: bytes, ts: int, body: Mapping[str, Value]) -> bytes:
    """The id of the federation founded by a genesis with these fields."""
    return hashlib.blake2b(
        FEDERATION_ID_DOMAIN + encode([author, ts, dict(body)]), digest_size=32
    ).digest()


@dataclass(frozen=True, slots=True)
class Federation:
    """What the genesis established."""

    id: bytes
    name: str
    cells: tuple[FoundingCell, ...]
    params: Params
    genesis: bytes  # op id
    created_ts: int


def make_genesis(
    key: nacl.signing.SigningKey,
    *,
    name: str,
    cells: Sequence[Mapping[str, Value]],
    ts: int,
    params: Params | None = None,
) -> Op:
    """Sign the genesis of a new federation; its id is ``op.federation``.

    ``cells`` are maps with ``name``, ``members`` and optionally ``devices``
    (lists of public keys, in any order). The signer must be one of the keys.
    """
    founding: list[Value] = []
    for cell in cells:
        entry = dict(cell)
        for role in ("members", "devices"):
            keys = entry.get(role)
            if isinstance(keys, list | tuple):
                entry[role] = tuple(sorted(k for k in keys if isinstance(k, bytes)))
        founding.append(entry)
    body: dict[str, Value] = {
        "name": name,
        "cells": tuple(founding),
        "params": (params or Params()).to_body(),
    }
    fed = federation_id(bytes(key.verify_key), ts, body)
    return sign_op(key, federation=fed, seq=1, deps=(), ts=ts, kind=KIND, body=body)


def parse_genesis(op: Op) -> Federation:
    """The federation a genesis op founds; raises :class:`RuleViolation` if it is not one."""
    if op.deps or op.seq != 1:
        raise RuleViolation("a genesis has no deps and seq 1")
    only_fields(op.body, _FIELDS)
    name = field_str(op.body, "name", min_len=1, max_len=200)
    raw_cells = op.body.get("cells")
    if not isinstance(raw_cells, tuple) or not 1 <= len(raw_cells) <= 256:
        raise RuleViolation("field 'cells' must be an array of 1 to 256 cells")
    cells = tuple(parse_cell(field_map({"cell": c}, "cell")) for c in raw_cells)
    keys = [k for c in cells for k in (*c.members, *c.devices)]
    if len(set(keys)) != len(keys):
        raise RuleViolation("a key may belong to one cell only, once")
    if len({c.name for c in cells}) != len(cells):
        raise RuleViolation("founding cell names must differ")
    if op.author not in keys:
        raise RuleViolation("the genesis author must be a key of a founding cell")
    params = Params.from_body(field_map(op.body, "params")) if "params" in op.body else Params()
    if federation_id(op.author, op.ts, op.body) != op.federation:
        raise RuleViolation("this genesis does not found this federation")
    return Federation(op.federation, name, cells, params, op.id, op.ts)


class Genesis(Record):
    """Holds the federation's founding facts once its genesis is applied."""

    op_kinds = (KIND,)
    federation: Federation | None = None

    def validate(self, op: Op) -> None:
        parse_genesis(op)

    def apply(self, op: Op) -> None:
        self.federation = parse_genesis(op)

    @property
    def params(self) -> Params:
        assert self.federation is not None, "no genesis applied yet"
        return self.federation.params
