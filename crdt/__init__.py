"""The signed op graph and the federation's records (pure: no I/O, no clocks).

Ops are immutable, signed, canonically encoded records linked by their deps
into a causal graph; every replica that holds the same ops derives the same
state. Time comes in as ``now_ms`` arguments, keys as arguments.
"""

from ._canonical import DEFAULT_LIMITS, Limits, Value, decode, encode
from ._errors import (
    ArchipelError,
    BadSignature,
    CapacityError,
    CausalityViolation,
    HeldSetFull,
    IdMismatch,
    InvalidOp,
    LimitExceeded,
    MalformedOp,
    NonCanonical,
    PendingSetFull,
    RuleViolation,
)
from ._graph import (
    AddResult,
    Admission,
    Equivocation,
    GraphLimits,
    OpGraph,
    Rejection,
    Status,
)
from ._hlc import HybridClock, ts_from_ms, ts_ms
from ._op import FORMAT_VERSION, OP_SIGNING_DOMAIN, Op, decode_op, op_id, sign_op
from ._record import Record
from ._replica import DEFAULT_RECORDS, Replica, found_federation
from .authority import DEVICE, MEMBER, Authority, Cell, Grant
from .genesis import Federation, Params, cell_id, federation_id, make_genesis
from .note import Note, Notes

__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_RECORDS",
    "DEVICE",
    "FORMAT_VERSION",
    "MEMBER",
    "OP_SIGNING_DOMAIN",
    "AddResult",
    "Admission",
    "ArchipelError",
    "Authority",
    "BadSignature",
    "CapacityError",
    "CausalityViolation",
    "Cell",
    "Equivocation",
    "Federation",
    "Grant",
    "GraphLimits",
    "HeldSetFull",
    "HybridClock",
    "IdMismatch",
    "InvalidOp",
    "LimitExceeded",
    "Limits",
    "MalformedOp",
    "NonCanonical",
    "Note",
    "Notes",
    "Op",
    "OpGraph",
    "Params",
    "PendingSetFull",
    "Record",
    "Rejection",
    "Replica",
    "RuleViolation",
    "Status",
    "Value",
    "cell_id",
    "decode",
    "decode_op",
    "encode",
    "federation_id",
    "found_federation",
    "make_genesis",
    "op_id",
    "sign_op",
    "ts_from_ms",
    "ts_ms",
]
