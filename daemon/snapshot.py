"""The state snapshot: the replica, serialised, so that start-up need not replay every op.

Theory of operation. Ops are the source of truth (see :mod:`.storage`); the
snapshot is a materialised view of the :class:`Replica` they build, written
with the storage cursor it covers. Loading it and replaying only the ops
stored after that cursor gives the same replica as replaying every op.

The bytes are a pickle (protocol 5) of the whole replica: op graph, record
state, clock. Pickle runs code while it loads, so a snapshot is only ever
unpickled after its MAC checks out: HMAC-SHA256, keyed by the node's
``snapshot_key`` (derived from its device key), over the format tag, the
cursor and the bytes. A snapshot with a bad MAC, another format tag, or that
fails to load is discarded, never trusted, and the state is rebuilt from the
ops. The unpickler also refuses any global outside the few this module's
reducers and the crdt classes need, and rebuilds bound methods only as
public methods of records (defence in depth, it costs nothing: globals are
looked up once each).

The format tag changes whenever the layout of the pickled objects may have:
it holds :data:`SNAPSHOT_FORMAT` (bump it by hand for a change this module
cannot see), the archipel version, the Python minor version and a digest of
the source of ``archipel.crdt`` and of this module. Any edit there, even a
comment, makes old snapshots stale: one slow start-up (a rebuild) instead of
a state silently built from another version's objects.

Speed. Default pickling of crdt values goes through dataclasses' generic
``__getstate__``/``__setstate__`` (two Python calls per object, each walking
``dataclasses.fields``). This module registers, in a private dispatch table
(never the global ``copyreg`` one), cheaper reducers: an :class:`Op` is
rebuilt from its fields by one call setting its slots directly, with the
federation id, author key and kind shared between ops, and each dep the very
id object of the op it names; other frozen slotted dataclasses of
``archipel.crdt`` by one call with their field values. The result holds
exactly the values that were pickled; no ``__init__`` or ``__post_init__``
runs. The garbage collector is paused while loading (the objects loaded form
no garbage; collecting midway only costs time).

Cost. Loading is bound by the number of Python objects built: about 12 per
op for notes and 18 for the workload's mix, besides integers (the op, its
fields, the record's value, index entries). That is 8 to 10 µs per op here,
10 to 12 s for a million ops: see docs/storage.md.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import hashlib
import hmac
import importlib
import importlib.metadata
import operator
import pickle
import pkgutil
import sys
import types
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import msgpack

from archipel import crdt
from archipel.crdt import ArchipelError, Op, Record, Replica

SNAPSHOT_FORMAT = 1
"""Bump when the snapshot's layout changes in a way the format tag cannot see."""

MIN_KEY_BYTES = 16
PICKLE_PROTOCOL = 5
_MAC_DOMAIN = b"archipel/snapshot/v1\x00"

# The only globals a snapshot may name, besides classes of archipel.crdt.
_ALLOWED_GLOBALS = {
    ("functools", "partial"),  # one builder per frozen dataclass
    (__name__, "_op"),
    (__name__, "_frozen"),
    (__name__, "_method"),
}


class SnapshotError(ArchipelError):
    """A snapshot cannot be used: another format, a bad MAC, or bytes that do
    not load into a replica. The caller discards it and rebuilds from the ops."""


# -- the format tag ------------------------------------------------------------


@functools.cache
def format_tag() -> str:
    """What a snapshot must have been written with to be loaded by this code."""
    digest = hashlib.blake2b(digest_size=8)
    crdt_dir = Path(crdt.__file__).parent
    for path in sorted(crdt_dir.glob("*.py")):
        digest.update(path.name.encode() + b"\x00" + path.read_bytes() + b"\x00")
    digest.update(Path(__file__).read_bytes())
    try:
        version = importlib.metadata.version("archipel")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - always installed
        version = "unknown"
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    return f"{SNAPSHOT_FORMAT}/archipel-{version}/py{python}/src-{digest.hexdigest()}"


# -- the MAC -------------------------------------------------------------------


def mac(key: bytes, tag: str, cursor: int, pieces: Iterable[bytes | memoryview]) -> bytes:
    """HMAC-SHA256 over the format tag, the cursor and the snapshot bytes."""
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"a snapshot key must be at least {MIN_KEY_BYTES} bytes")
    h = hmac.new(key, digestmod=hashlib.sha256)
    h.update(_MAC_DOMAIN + tag.encode() + b"\x00" + cursor.to_bytes(8, "big"))
    for piece in pieces:
        h.update(piece)
    return h.digest()


def check_mac(key: bytes, tag: str, cursor: int, pieces: Sequence[bytes], expected: bytes) -> None:
    """Raise :class:`SnapshotError` unless ``expected`` is the MAC of the rest."""
    if not hmac.compare_digest(mac(key, tag, cursor, pieces), expected):
        raise SnapshotError("the snapshot's MAC does not check out (tampered, or another node's)")


# -- serialising ---------------------------------------------------------------


def dump(replica: Replica) -> list[bytes]:
    """The replica as pickle bytes, in pieces of at most about 64 KiB (pickle's
    frames) plus any large value whole: no copy of the whole snapshot is made."""
    out = _Pieces()
    pickler = pickle.Pickler(out, protocol=PICKLE_PROTOCOL)
    pickler.dispatch_table = _dispatch_table(_Interned())
    pickler.dump(replica)
    return out.pieces


def load(pieces: Sequence[bytes]) -> Replica:
    """The replica held in the concatenation of ``pieces`` (whose MAC the
    caller has checked). The pieces are read in place, never joined: a
    snapshot of a million ops is hundreds of MiB.

    Raises :class:`SnapshotError` if the bytes do not load into a replica.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        value = _Unpickler(_Reader(pieces)).load()
    except SnapshotError:
        raise
    except Exception as exc:  # whatever the bytes were, they are not a snapshot of ours
        raise SnapshotError(f"the snapshot does not load: {type(exc).__name__}: {exc}") from None
    finally:
        if enabled:
            gc.enable()
    if not isinstance(value, Replica):
        raise SnapshotError(f"the snapshot holds a {type(value).__name__}, not a replica")
    return value


class _Pieces:
    """A write-only file that keeps what the pickler writes."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.pieces.append(bytes(data))
        return len(data)


class _Reader:
    """A read-only file over a list of byte strings, for the unpickler (which
    reads a frame of about 64 KiB at a time)."""

    def __init__(self, pieces: Sequence[bytes]) -> None:
        self._pieces = [memoryview(p) for p in pieces if p]
        self._index = 0
        self._offset = 0

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = sum(len(p) for p in self._pieces)
        parts = []
        while size > 0 and self._index < len(self._pieces):
            piece = self._pieces[self._index]
            part = piece[self._offset : self._offset + size]
            parts.append(part)
            size -= len(part)
            self._offset += len(part)
            if self._offset == len(piece):
                self._index += 1
                self._offset = 0
        return parts[0].tobytes() if len(parts) == 1 else b"".join(parts)

    def readinto(self, buffer: memoryview) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def readline(self) -> bytes:  # pickle protocols 0-1 only: never in a snapshot
        raise SnapshotError("the snapshot is not in pickle protocol 5")


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "archipel.crdt" or module.startswith("archipel.crdt."):
            value = super().find_class(module, name)
            if isinstance(value, type):
                return value
        raise SnapshotError(f"the snapshot names {module}.{name}, which no snapshot needs")


class _Interned(dict[object, object]):
    """Equal values shared between ops while pickling (federation, authors,
    kinds, and op ids with the deps that name them): one object each after
    loading instead of one per use."""

    def __missing__(self, key: object) -> object:
        self[key] = key
        return key


# -- reducers ------------------------------------------------------------------

_OP_FIELDS = (
    "version",
    "federation",
    "author",
    "seq",
    "deps",
    "ts",
    "kind",
    "body",
    "signature",
    "id",
    "data",
)
_OP_SETTERS = tuple(getattr(Op, name).__set__ for name in _OP_FIELDS)
assert {f.name for f in dataclasses.fields(Op)} == set(_OP_FIELDS), "Op's fields changed"


def _op(  # noqa: PLR0917 (pickle calls it with the fields, positionally)
    version: int,
    federation: bytes,
    author: bytes,
    seq: int,
    deps: tuple[bytes, ...],
    ts: int,
    kind: str,
    body: dict[str, Any],
    signature: bytes,
    ident: bytes,
    data: bytes,
) -> Op:
    """An :class:`Op` holding exactly these field values (no checks: they come
    from an op that was checked before it was stored or pickled)."""
    op: Op = object.__new__(Op)
    s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10 = _OP_SETTERS
    s0(op, version)
    s1(op, federation)
    s2(op, author)
    s3(op, seq)
    s4(op, deps)
    s5(op, ts)
    s6(op, kind)
    s7(op, body)
    s8(op, signature)
    s9(op, ident)
    s10(op, data)
    return op


def stored_op(data: bytes, ident: bytes) -> Op:
    """Decode the bytes of an op this node checked and stored before.

    The fields are a function of the bytes alone, and are taken from them the
    way :func:`archipel.crdt.decode_op` does (the same ``msgpack.unpackb``
    options), so the op is the one ``decode_op(data)`` returned when it was
    first accepted. What is skipped is only what cannot fail again on the
    same bytes: the signature, the canonical-form and limit checks. The caller
    passes the id it computed from ``data`` (so corrupted bytes are caught by
    comparing it with the id stored beside them).

    Raises :class:`SnapshotError` if the bytes are not an op's array of fields.
    """
    try:
        value = msgpack.unpackb(data, raw=False, use_list=False, strict_map_key=True)
        version, federation, author, seq, deps, ts, kind, body, signature = value
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise SnapshotError(f"stored op bytes do not decode: {exc}") from None
    return _op(version, federation, author, seq, deps, ts, kind, body, signature, ident, data)


_SETTERS: dict[type, tuple[Callable[[object, object], None], ...]] = {}


def _frozen(cls: type, *values: object) -> object:
    """An instance of a frozen slotted dataclass holding exactly ``values``."""
    obj: object = object.__new__(cls)
    for setter, value in zip(_SETTERS[cls], values, strict=True):
        setter(obj, value)
    return obj


def _frozen_dataclasses() -> list[type]:
    """Every frozen dataclass with slots defined in archipel.crdt, but Op."""
    found: dict[type, None] = {}
    for info in pkgutil.iter_modules(crdt.__path__):
        module = importlib.import_module(f"{crdt.__name__}.{info.name}")
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and value is not Op
                and dataclasses.is_dataclass(value)
                and value.__dataclass_params__.frozen  # type: ignore[attr-defined]
                and "__slots__" in value.__dict__
                and value.__module__ == module.__name__
            ):
                found[value] = None
    return list(found)


def _register_frozen() -> dict[type, Callable[[Any], tuple[object, ...]]]:
    reducers: dict[type, Callable[[Any], tuple[object, ...]]] = {}
    for cls in _frozen_dataclasses():
        names = [f.name for f in dataclasses.fields(cls)]
        _SETTERS[cls] = tuple(getattr(cls, name).__set__ for name in names)
        reducers[cls] = _frozen_reducer(cls, names)
    return reducers


def _frozen_reducer(cls: type, names: list[str]) -> Callable[[Any], tuple[object, ...]]:
    # One builder per class, pickled once and then referred to: each instance
    # costs one tuple of its values and one call.
    build = functools.partial(_frozen, cls)
    if len(names) == 1:
        name = names[0]

        def reduce_one(obj: Any) -> tuple[object, ...]:
            return (build, (getattr(obj, name),))

        return reduce_one
    get = operator.attrgetter(*names)

    def reduce(obj: Any) -> tuple[object, ...]:
        return (build, get(obj))

    return reduce


_FROZEN_REDUCERS = _register_frozen()


def _method(owner: object, name: str) -> object:
    """A record's public bound method (a record keeps one of another record's).

    Pickle's default for a bound method is ``getattr(owner, name)``: with
    ``builtins.getattr`` allowed, a pickle could walk from any class to any
    global. This reaches only public methods of records."""
    if not isinstance(owner, Record) or name.startswith("_"):
        raise SnapshotError(f"the snapshot names a method {name!r} of a {type(owner).__name__}")
    value = getattr(owner, name)
    if not isinstance(value, types.MethodType):
        raise SnapshotError(f"{type(owner).__name__}.{name} is not a method")
    return value


def _reduce_method(method: types.MethodType) -> tuple[object, ...]:
    return (_method, (method.__self__, method.__func__.__name__))


def _dispatch_table(interned: _Interned) -> dict[type, Callable[[Any], Any]]:
    def reduce_op(op: Op) -> tuple[object, ...]:
        return (
            _op,
            (
                op.version,
                interned[op.federation],
                interned[op.author],
                op.seq,
                tuple([interned[dep] for dep in op.deps]),
                op.ts,
                interned[op.kind],
                op.body,
                op.signature,
                interned[op.id],
                op.data,
            ),
        )

    return {**_FROZEN_REDUCERS, Op: reduce_op, types.MethodType: _reduce_method}
