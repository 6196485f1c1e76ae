"""The op envelope: an immutable, signed, content-addressed record.

Wire form: the canonical msgpack array

    [version, federation, author, seq, deps, ts, kind, body, signature]

The signature is Ed25519 over ``OP_SIGNING_DOMAIN`` followed by the canonical
encoding of the first eight fields (the same array without the signature). The
op's id is BLAKE2b-256 of the whole signed encoding. Because the encoding is
canonical and the decoder rejects anything else, one op has exactly one id.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import nacl.exceptions
import nacl.signing

from ._canonical import DEFAULT_LIMITS, Limits, Value, decode, encode
from ._errors import BadSignature, IdMismatch, LimitExceeded, MalformedOp

FORMAT_VERSION = 1
OP_SIGNING_DOMAIN = b"archipel/op/v1\x00"
ID_BYTES = 32
KEY_BYTES = 32
SIGNATURE_BYTES = 64
SEQ_MAX = 2**63 - 1
TS_MAX = 2**64 - 1
_KIND_RE = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
# The signature is the last field: a bin8 header (0xc4 0x40) and 64 bytes.
_SIG_TAIL = 2 + SIGNATURE_BYTES


def op_id(signed: bytes) -> bytes:
    """The id of an op: BLAKE2b-256 of its signed canonical bytes."""
    return hashlib.blake2b(signed, digest_size=ID_BYTES).digest()


@dataclass(frozen=True, slots=True, eq=False)
class Op:
    """A signed op. Build one with :func:`sign_op`, or :func:`decode_op` bytes.

    Ops compare and hash by id. ``body`` is the decoded kind-specific map; it is
    never mutated (record kinds parse it into their own frozen values).
    """

    federation: bytes
    author: bytes
    seq: int
    deps: tuple[bytes, ...]
    ts: int
    kind: str
    body: Mapping[str, Value]
    signature: bytes
    id: bytes = field(repr=False)
    data: bytes = field(repr=False)
    version: int = FORMAT_VERSION

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Op) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return (
            f"Op({self.kind}, id={self.id.hex()[:12]}, author={self.author.hex()[:8]},"
            f" seq={self.seq}, ts={self.ts}, deps={len(self.deps)})"
        )


def sign_op(
    key: nacl.signing.SigningKey,
    *,
    federation: bytes,
    seq: int,
    deps: Sequence[bytes],
    ts: int,
    kind: str,
    body: Mapping[str, Value],
    limits: Limits = DEFAULT_LIMITS,
) -> Op:
    """Sign a new op. ``deps`` may come in any order; they are stored sorted.

    Raises :class:`MalformedOp` (or a subclass) if the fields break the format,
    so a node never signs an op its peers would refuse as malformed.
    """
    author = bytes(key.verify_key)
    fields: list[Value] = [
        FORMAT_VERSION,
        federation,
        author,
        seq,
        tuple(sorted(set(deps))),
        ts,
        kind,
        dict(body),
    ]
    unsigned = encode(fields)
    signature = key.sign(OP_SIGNING_DOMAIN + unsigned).signature
    signed = encode([*fields, signature])
    # Decoding what we just built runs every format check in one place.
    return decode_op(signed, limits=limits)


def decode_op(
    data: bytes, *, expected_id: bytes | None = None, limits: Limits = DEFAULT_LIMITS
) -> Op:
    """Decode and authenticate op bytes from anywhere (wire, disk, RPC).

    Checks, in order: size and structure limits, canonical encoding, field
    types, the id (if ``expected_id`` is given) and the signature. Raises an
    :class:`InvalidOp` subclass saying what is wrong; never anything else.
    """
    value = decode(data, limits)
    if not isinstance(value, tuple) or len(value) != 9:
        raise MalformedOp("an op is an array of 9 fields")
    version, federation, author, seq, deps, ts, kind, body, signature = value
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise MalformedOp(f"unsupported op format version {version!r} (this node reads 1)")
    _check_bytes("federation", federation, ID_BYTES)
    _check_bytes("author", author, KEY_BYTES)
    _check_bytes("signature", signature, SIGNATURE_BYTES)
    if not isinstance(seq, int) or isinstance(seq, bool) or not 1 <= seq <= SEQ_MAX:
        raise MalformedOp("seq must be an integer from 1 to 2**63-1")
    if not isinstance(ts, int) or isinstance(ts, bool) or not 0 <= ts <= TS_MAX:
        raise MalformedOp("ts must be an unsigned 64-bit integer")
    if not isinstance(kind, str) or not _KIND_RE.fullmatch(kind):
        raise MalformedOp("kind must be 1-64 characters of a-z, 0-9, '_', '.', '-'")
    if not isinstance(body, dict):
        raise MalformedOp("body must be a map")
    if not isinstance(deps, tuple):
        raise MalformedOp("deps must be an array")
    if len(deps) > limits.max_deps:
        raise LimitExceeded(f"op has {len(deps)} deps, over the limit of {limits.max_deps}")
    previous = b""
    for dep in deps:
        _check_bytes("each dep", dep, ID_BYTES)
        if dep <= previous:
            raise MalformedOp("deps must be sorted ascending without repeats")
        previous = dep
    assert isinstance(federation, bytes) and isinstance(author, bytes)  # noqa: PT018
    assert isinstance(signature, bytes)
    ident = op_id(data)
    if expected_id is not None and ident != expected_id:
        raise IdMismatch(
            f"bytes hash to {ident.hex()[:16]}, expected {expected_id.hex()[:16]}", op_id=ident
        )
    # The unsigned encoding is the signed one with a 9-element array header
    # (0x99) replaced by an 8-element one (0x98) and the signature cut off.
    unsigned = b"\x98" + data[1:-_SIG_TAIL]
    try:
        nacl.signing.VerifyKey(author).verify(OP_SIGNING_DOMAIN + unsigned, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError):
        raise BadSignature(
            "signature does not verify against the author's key", op_id=ident
        ) from None
    return Op(
        federation=federation,
        author=author,
        seq=seq,
        deps=deps,
        ts=ts,
        kind=kind,
        body=body,
        signature=signature,
        id=ident,
        data=data,
    )


def _check_bytes(name: str, value: object, size: int) -> None:
    if not isinstance(value, bytes) or len(value) != size:
        raise MalformedOp(f"{name} must be {size} bytes")
