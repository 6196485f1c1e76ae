"""The federation genesis: the one root of a federation's op graph.

The federation id is derived from the genesis (its author, timestamp and body),
so the genesis is self-certifying: a replica that knows the federation id
accepts exactly one genesis, and every other op descends from it (only the
genesis may have no deps). The founders named in it are the federation's first
members; the records issue replaces this flat list with cells and admission.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import nacl.signing

from ._canonical import Value, encode
from ._errors import RuleViolation
from ._op import Op, sign_op
from ._record import Record, field_keys, field_str, only_fields

KIND = "genesis"
FEDERATION_ID_DOMAIN = b"archipel/federation/v1\x00"
_FIELDS = frozenset({"name", "founders"})


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
    founders: frozenset[bytes]
    genesis: bytes  # op id
    created_ts: int


def make_genesis(
    key: nacl.signing.SigningKey, *, name: str, founders: Sequence[bytes], ts: int
) -> Op:
    """Sign the genesis of a new federation; its federation id is ``op.federation``.

    The signer is always a founder.
    """
    body: dict[str, Value] = {
        "name": name,
        "founders": tuple(sorted({bytes(key.verify_key), *founders})),
    }
    fed = federation_id(bytes(key.verify_key), ts, body)
    return sign_op(key, federation=fed, seq=1, deps=(), ts=ts, kind=KIND, body=body)


class Genesis(Record):
    """Holds the federation's founding facts once its genesis is applied."""

    op_kinds = (KIND,)
    federation: Federation | None = None

    def validate(self, op: Op) -> None:
        if op.deps or op.seq != 1:
            raise RuleViolation("a genesis has no deps and seq 1")
        only_fields(op.body, _FIELDS)
        field_str(op.body, "name", min_len=1, max_len=200)
        founders = field_keys(op.body, "founders")
        if op.author not in founders:
            raise RuleViolation("the genesis author must be among the founders")
        if federation_id(op.author, op.ts, op.body) != op.federation:
            raise RuleViolation("this genesis does not found this federation")

    def apply(self, op: Op) -> None:
        self.federation = Federation(
            id=op.federation,
            name=field_str(op.body, "name", max_len=200),
            founders=frozenset(field_keys(op.body, "founders")),
            genesis=op.id,
            created_ts=op.ts,
        )

    def is_member(self, key: bytes) -> bool:
        """Whether ``key`` may author ops (for now: the founders)."""
        return self.federation is not None and key in self.federation.founders
