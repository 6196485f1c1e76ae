"""The node's writer (queued messages in one channel write) and its timer task
(woken only when an input brings the sync protocol's deadline forward)."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing
from nodes import config, federation_on_disk

from archipel.daemon.node import _HANGUP, WRITE_BATCH_BYTES, Node, _queued_behind


async def test_messages_queued_behind_the_first_go_in_one_write() -> None:
    send, receive = trio.open_memory_channel[object](16)
    for item in (b"b", b"cc", b"ddd"):
        send.send_nowait(item)
    assert _queued_behind(receive, b"a") == (b"abccddd", False)
    assert _queued_behind(receive, b"alone") == (b"alone", False)


async def test_a_hang_up_ends_the_write_and_is_reported() -> None:
    send, receive = trio.open_memory_channel[object](16)
    for item in (b"b", _HANGUP, b"after"):
        send.send_nowait(item)
    assert _queued_behind(receive, b"a") == (b"ab", True)
    assert receive.receive_nowait() == b"after"  # left queued: the writer stops anyway


async def test_one_write_is_bounded_and_the_rest_stays_queued() -> None:
    send, receive = trio.open_memory_channel[object](16)
    big = bytes(WRITE_BATCH_BYTES // 2 + 1)
    for _ in range(3):
        send.send_nowait(big)
    data, hang_up = _queued_behind(receive, big)
    assert (len(data), hang_up) == (2 * len(big), False)  # over the bound after two
    assert receive.statistics().current_buffer_used == 2


async def test_a_closed_queue_ends_the_write() -> None:
    send, receive = trio.open_memory_channel[object](16)
    send.send_nowait(b"b")
    await send.aclose()
    assert _queued_behind(receive, b"a") == (b"ab", False)


class _Sync:
    """What the timer task uses of SyncNode: a deadline it can be told, and a record of fires."""

    def __init__(self) -> None:
        self.deadline: int | None = None
        self.fired: list[int] = []
        self.applied: list[object] = []

    def next_deadline(self) -> int | None:
        return self.deadline

    def handle_timer(self, now_ms: int) -> None:
        if self.deadline is not None and now_ms >= self.deadline:
            self.fired.append(now_ms)
            self.deadline = None
        else:
            self.fired.append(-now_ms)  # called early: recorded as a failure

    def actions(self) -> list[object]:
        return []


async def test_the_timer_fires_at_the_deadline_inputs_set(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    fed = federation_on_disk(tmp_path, 1)
    node = Node(
        fed.homes[0], config(), fed.identities[0], clock_ms=lambda: int(trio.current_time() * 1000)
    )
    sync = _Sync()
    node.sync = sync  # type: ignore[assignment]
    start = node.now_ms()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(node._timer)
        await trio.testing.wait_all_tasks_blocked()
        assert node._timer_at is None  # nothing due: it waits for an input

        sync.deadline = start + 1_000  # an input sets a deadline: the timer must wake
        node._poke_timer()
        assert node._wake.is_set()
        await trio.testing.wait_all_tasks_blocked()
        assert node._timer_at == start + 1_000

        sync.deadline = start + 5_000  # an input moves it later: no wake-up needed ...
        node._poke_timer()
        assert not node._wake.is_set()
        await trio.sleep(2)  # ... and at +1 s the timer looks again and sleeps on
        assert sync.fired == []
        assert node._timer_at == start + 5_000

        sync.deadline = start + 3_000  # an input brings it forward: woken
        node._poke_timer()
        assert node._wake.is_set()
        await trio.sleep(2)
        assert sync.fired == [start + 3_000]
        nursery.cancel_scope.cancel()
