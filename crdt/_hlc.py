"""Hybrid logical clock timestamps.

A timestamp is one unsigned 64-bit integer: milliseconds since the Unix epoch
in the high 48 bits, a logical counter in the low 16. Comparing two timestamps
as integers compares (wall time, counter). A node's clock never goes backwards
and always moves past the timestamps of the ops it builds on, so every op's
timestamp is greater than all of its deps' (the op graph enforces it), and
sorting by ``(ts, id)`` is a topological order of the graph.

The clock is pure: callers pass the physical time ``now_ms``.
"""

from __future__ import annotations

from dataclasses import dataclass

LOGICAL_BITS = 16


def ts_from_ms(ms: int) -> int:
    """The smallest timestamp at wall time ``ms``."""
    return ms << LOGICAL_BITS


def ts_ms(ts: int) -> int:
    """The wall-time part of a timestamp, in milliseconds since the epoch."""
    return ts >> LOGICAL_BITS


@dataclass(slots=True)
class HybridClock:
    """Issues strictly increasing timestamps that follow physical time when it
    moves forward, and stay ahead of every timestamp the node has seen."""

    last: int = 0

    def tick(self, now_ms: int, after: int = 0) -> int:
        """A new timestamp for a local op: later than the last one issued, later
        than ``after`` (the newest dep's timestamp), and at least ``now_ms``."""
        self.last = max(self.last + 1, after + 1, ts_from_ms(now_ms))
        return self.last

    def observe(self, ts: int) -> None:
        """Note a timestamp seen on a received op, so later ticks pass it."""
        self.last = max(self.last, ts)
