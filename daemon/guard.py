"""Per-peer budgets against abusive peers: strikes, bans, a send budget, quiet logs.

Theory of operation. The layers below catch each bad input where it arrives
and cut the offender off at once: the channel (framing, flow control), the
sync session (frames, encodings, message order, limits, its budget of invalid
ops), the Noise gate (the allowlist). A cut-off alone does not stop a peer that
simply reconnects: each new session starts with a fresh budget. This module
remembers offences *across* connections:

- :class:`PeerGuard` counts **strikes** per device key. Every cut-off for
  misbehaviour is one strike; ``strikes`` strikes within ``window_ms`` are
  forgiven, one more bans the key for ``ban_ms``, doubled for each ban it
  already served (up to ``max_ban_ms``). A banned key is refused by the allowlist (no connection
  either way) until the ban ends. Valid ops are never an offence, however
  many; a slow reader is not an offence either (an honest Raspberry Pi on a
  bad link is slow), it is only cut off.
- :data:`SEND_QUEUE_BYTES` bounds, in bytes, what the node may queue for one
  peer that does not read; over it the peer is cut off as too slow.
- :class:`EquivocationWatch` notices new evidence of equivocation in an op
  graph, so the node can say so once per (author, seq).
- :class:`LogLimiter` keeps warnings about unauthenticated junk (which anyone
  who can reach the port can cause) to a bounded rate per source.

Everything here is pure: the caller passes ``now_ms``; there are no tasks, no
I/O and no clock. Every table is bounded (the equivocation watch by the graph's
own evidence). :func:`report` and :func:`report_equivocation` are the logging
helpers. The rules, with their numbers, are in docs/transport.md ("Abusive
peers").
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from archipel.crdt import ArchipelError, Equivocation, OpGraph

from .logs import fields

__all__ = [
    "SEND_QUEUE_BYTES",
    "EquivocationWatch",
    "GuardError",
    "GuardLimits",
    "LogLimiter",
    "PeerGuard",
    "Verdict",
    "report",
    "report_equivocation",
]

log = logging.getLogger("archipel.guard")

SEND_QUEUE_BYTES = 8 * 1024 * 1024
"""Bytes the node may hold queued for one peer before it cuts the peer off as
too slow. What an honest peer can make us queue at once: the answers to its
Wants in flight (``SessionLimits.max_outstanding_wants`` = 4, each answer one
frame of at most ``WireLimits.max_frame_bytes`` = 1 MiB), plus pushes and
announcements of one burst (a few hundred KiB), plus one reconciliation
message; 8 MiB is twice that. A peer that asks for more and reads nothing
would otherwise make the node hold ``SEND_QUEUE`` (1,024) frames of up to
1 MiB each: a gigabyte per peer."""


class GuardError(ArchipelError):
    """A guard was configured or called with values that make no sense."""


@dataclass(frozen=True, slots=True)
class GuardLimits:
    """The strike and ban rule (see the module docstring)."""

    strikes: int = 3
    """Cut-offs forgiven within ``window_ms``; one more and the key is banned."""
    window_ms: int = 10 * 60_000
    ban_ms: int = 10 * 60_000
    """The first ban; each later one doubles, up to ``max_ban_ms``."""
    max_ban_ms: int = 24 * 3600_000
    max_peers: int = 4096
    """Keys remembered; beyond, the one struck least recently is forgotten."""

    def __post_init__(self) -> None:
        if self.strikes < 0:
            raise GuardError("GuardLimits.strikes must be >= 0")
        if self.window_ms <= 0 or not 0 < self.ban_ms <= self.max_ban_ms:
            raise GuardError("GuardLimits: window_ms > 0 and 0 < ban_ms <= max_ban_ms")
        if self.max_peers < 1:
            raise GuardError("GuardLimits.max_peers must be >= 1")


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one strike led to."""

    peer: bytes
    reason: str
    strikes: int
    """Strikes within the window, this one included (0 after a ban restarts the count)."""
    banned_until_ms: int | None
    """Set when this strike banned the key."""


@dataclass(slots=True)
class _Record:
    strikes: list[int]  # when, within the window (at most GuardLimits.strikes + 1 kept)
    bans: int = 0  # bans served or being served
    banned_until_ms: int = 0


class PeerGuard:
    """Strikes and bans per device key (pure: the caller passes ``now_ms``)."""

    def __init__(self, limits: GuardLimits | None = None) -> None:
        self.limits = limits if limits is not None else GuardLimits()
        self._peers: OrderedDict[bytes, _Record] = OrderedDict()

    def __len__(self) -> int:
        return len(self._peers)

    def strike(self, peer: bytes, reason: str, now_ms: int) -> Verdict:
        """Count one cut-off of ``peer`` for ``reason``; ban it if over the limit."""
        if not isinstance(peer, bytes) or len(peer) != 32:
            raise GuardError("a peer is a 32-byte Ed25519 public key")
        limits = self.limits
        record = self._peers.get(peer)
        if record is None:
            record = self._peers[peer] = _Record([])
            while len(self._peers) > limits.max_peers:
                self._peers.popitem(last=False)
        self._peers.move_to_end(peer)
        horizon = now_ms - limits.window_ms
        record.strikes = [t for t in record.strikes if t > horizon][-limits.strikes :]
        record.strikes.append(now_ms)
        if len(record.strikes) <= limits.strikes:
            return Verdict(peer, reason, len(record.strikes), None)
        length = min(limits.ban_ms << min(record.bans, 32), limits.max_ban_ms)
        record.bans += 1
        record.banned_until_ms = now_ms + length
        record.strikes = []
        return Verdict(peer, reason, limits.strikes + 1, record.banned_until_ms)

    def banned_until(self, peer: bytes, now_ms: int) -> int | None:
        """When the ban of ``peer`` ends, if it is banned at ``now_ms``."""
        record = self._peers.get(peer)
        if record is None or record.banned_until_ms <= now_ms:
            return None
        return record.banned_until_ms

    def banned(self, peer: bytes, now_ms: int) -> bool:
        return self.banned_until(peer, now_ms) is not None


def report(verdict: Verdict, peer: str, now_ms: int) -> None:
    """Log a strike (and a ban) as warnings naming the peer (its libp2p peer id,
    ``transport.peer_id_of``) and the reason."""
    log.warning(
        "peer misbehaved: cut off",
        **fields(peer=peer, why=verdict.reason, strikes=verdict.strikes),
    )
    if verdict.banned_until_ms is not None:
        log.warning(
            "peer banned",
            **fields(peer=peer, seconds=(verdict.banned_until_ms - now_ms) // 1000),
        )


class EquivocationWatch:
    """Notices equivocations an op graph has recorded since the last look.

    Remembers the (author, seq) pairs it reported; the graph keeps the evidence
    itself, so this set is never larger than the graph's own.
    """

    def __init__(self) -> None:
        self._seen: set[tuple[bytes, int]] = set()

    def new(self, graph: OpGraph) -> list[Equivocation]:
        """Evidence not reported yet (in the common case, none: one empty set)."""
        if not graph.equivocators():
            return []
        fresh = [e for e in graph.equivocations() if (e.author, e.seq) not in self._seen]
        self._seen.update((e.author, e.seq) for e in fresh)
        return fresh


def report_equivocation(evidence: Iterable[Equivocation]) -> None:
    """One warning per (author, seq) signed twice (the author, not the relaying peer)."""
    for item in evidence:
        log.warning(
            "equivocation: an author signed different ops with one seq",
            **fields(author=item.author.hex(), seq=item.seq, ops=len(item.ops)),
        )


class LogLimiter:
    """At most ``burst`` messages per key, then one per ``interval_ms`` (pure).

    For warnings that anyone who reaches the port can cause (junk before the
    handshake): the log says why without letting a flood fill the disk.
    ``allow`` returns how many messages were suppressed since the last one
    allowed (>= 0), or -1 to suppress this one.
    """

    def __init__(self, burst: int = 5, interval_ms: int = 10_000, max_keys: int = 1024) -> None:
        if burst < 1 or interval_ms < 1 or max_keys < 1:
            raise GuardError("LogLimiter: burst, interval_ms and max_keys must be >= 1")
        self._burst, self._interval, self._max = burst, interval_ms, max_keys
        self._keys: OrderedDict[str, list[int]] = OrderedDict()  # key -> [credit, at, suppressed]

    def allow(self, key: str, now_ms: int) -> int:
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = [self._burst, now_ms, 0]
            while len(self._keys) > self._max:
                self._keys.popitem(last=False)
        self._keys.move_to_end(key)
        credit, at, suppressed = state
        gained = (now_ms - at) // self._interval
        if gained > 0:
            credit, at = min(self._burst, credit + gained), at + gained * self._interval
        if credit == 0:
            state[:] = [0, at, suppressed + 1]
            return -1
        state[:] = [credit - 1, at, 0]
        return suppressed
