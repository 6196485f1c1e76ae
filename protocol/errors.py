"""Errors of the sync protocol, split at the receive boundary (as h11 does).

:class:`RemoteProtocolError`: the peer sent something wrong (bad frame,
unknown message, a message not allowed in the session's state, over a limit,
over its misbehaviour budget). The session closes; only that session.

:class:`LocalProtocolError`: our own code asked a session for something its
state does not allow (a bug, or a caller misusing the API).
"""

from __future__ import annotations

from archipel.crdt import ArchipelError


class ProtocolError(ArchipelError):
    """Root of the sync protocol's errors; ``reason`` is shown in logs and sent
    to the peer in a Goodbye."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol; close this session (and only this one)."""


class LocalProtocolError(ProtocolError):
    """This node asked a session to do what its state does not allow."""
