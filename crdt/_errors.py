"""The project's one exception tree.

Every error Archipel raises on purpose derives from :class:`ArchipelError`, so a
caller can catch the project's errors without catching programming bugs. Each
class says when it is raised. Validation failures carry a human-readable
``reason`` that can be shown to a user or logged next to the offending peer.
"""

from __future__ import annotations


class ArchipelError(Exception):
    """Root of every error Archipel raises on purpose."""


class InvalidOp(ArchipelError):
    """An op was rejected; ``reason`` says why. Nothing was changed.

    Raised by the decoder (bad bytes), by signature and id checks, by the op
    graph (causality rules) and by record kinds (rules judged against the op's
    causal past).
    """

    def __init__(self, reason: str, *, op_id: bytes | None = None) -> None:
        self.reason = reason
        self.op_id = op_id
        where = f" (op {op_id.hex()[:16]})" if op_id is not None else ""
        super().__init__(f"{reason}{where}")


class MalformedOp(InvalidOp):
    """The bytes are not a well-formed op: not msgpack, wrong shape or types."""


class NonCanonical(MalformedOp):
    """The bytes decode, but are not the one canonical encoding of what they hold.

    Accepting them would let anyone re-encode an op into bytes with another id.
    """


class LimitExceeded(MalformedOp):
    """An op or a value inside it is over a size, count or depth limit."""


class BadSignature(InvalidOp):
    """The signature does not verify against the author's key."""


class IdMismatch(InvalidOp):
    """The bytes hash to another id than the one they were fetched or sent as."""


class CausalityViolation(InvalidOp):
    """The op breaks a rule of the graph: its timestamp does not follow its deps',
    its author's previous op is not among its deps, or it belongs to another
    federation."""


class RuleViolation(InvalidOp):
    """The op is well-formed but its record kind does not allow it, judged
    against the op's causal past (unknown kind, unauthorised author, bad body)."""


class CapacityError(ArchipelError):
    """A bounded buffer is full; the op was not taken. Retry after the buffer
    drains (for the pending set: once missing deps arrive)."""


class PendingSetFull(CapacityError):
    """The set of ops waiting for missing deps is at its bound."""


class HeldSetFull(CapacityError):
    """The set of ops held because they are dated in the future is at its bound."""
