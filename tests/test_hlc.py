"""The hybrid logical clock: monotonic, follows wall time, stays ahead of deps."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from archipel.crdt import HybridClock, ts_from_ms, ts_ms


def test_follows_wall_time_when_it_moves_forward() -> None:
    clock = HybridClock()
    assert clock.tick(1000) == ts_from_ms(1000)
    assert clock.tick(2000) == ts_from_ms(2000)
    assert ts_ms(clock.tick(3000)) == 3000


def test_ticks_logically_when_wall_time_stalls_or_goes_back() -> None:
    clock = HybridClock()
    first = clock.tick(1000)
    assert clock.tick(1000) == first + 1
    assert clock.tick(500) == first + 2  # the wall clock went back; we do not


def test_stays_ahead_of_deps_and_observed_timestamps() -> None:
    clock = HybridClock()
    remote = ts_from_ms(9000) + 7
    assert clock.tick(1000, after=remote) == remote + 1
    clock.observe(ts_from_ms(20_000))
    assert clock.tick(1000) == ts_from_ms(20_000) + 1


@given(st.lists(st.tuples(st.integers(0, 2**40), st.integers(0, 2**56)), min_size=1))
def test_strictly_increasing(steps: list[tuple[int, int]]) -> None:
    clock = HybridClock()
    last = -1
    for now, after in steps:
        ts = clock.tick(now, after)
        assert ts > last
        assert ts > after
        assert ts >= ts_from_ms(now)
        last = ts
