"""The fault-injecting TCP proxy (archipel.cli.cluster.proxy) over real loopback sockets.

These run on the real clock (the kernel moves the bytes), each under a
``trio.fail_after`` cap. Nothing sleeps to synchronise: the tests wait on the
proxy's own counters (``FaultProxy.wait_for``) or on bytes arriving. The only
timing assertion is a lower bound on the delay.
"""

from __future__ import annotations

import hashlib
import random
import socket
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from archipel.cli.cluster.proxy import (
    DuplicateLink,
    FaultProxy,
    LinkStats,
    ProxyError,
    ProxyNotRunning,
    UnknownLink,
)
from archipel.crdt import ArchipelError

CAP = 10.0  # seconds; a generous cap per test on a loaded 2-core machine
WAIT = 5.0  # seconds; timeout for FaultProxy.wait_for


class Target:
    """A TCP server on 127.0.0.1 that hands every accepted stream to the test."""

    def __init__(self, port: int, accepted: trio.MemoryReceiveChannel[trio.SocketStream]) -> None:
        self.port = port
        self.addr = ("127.0.0.1", port)
        self._accepted = accepted

    async def next(self) -> trio.SocketStream:
        return await self._accepted.receive()


async def start_target(nursery: trio.Nursery, *, rcvbuf: int | None = None) -> Target:
    send, recv = trio.open_memory_channel[trio.SocketStream](16)

    async def handler(stream: trio.SocketStream) -> None:
        await send.send(stream)
        await trio.sleep_forever()  # the test owns the stream; cancellation closes it

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    if rcvbuf is not None:
        listeners[0].socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    nursery.start_soon(trio.serve_listeners, handler, listeners)
    return Target(listeners[0].socket.getsockname()[1], recv)


@asynccontextmanager
async def running_proxy(**options: Any) -> AsyncIterator[tuple[FaultProxy, trio.Nursery]]:
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            proxy = FaultProxy(**options)
            await nursery.start(proxy.run)
            yield proxy, nursery
            nursery.cancel_scope.cancel()


async def dial(port: int) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", port)


async def connect_pair(port: int, target: Target) -> tuple[trio.SocketStream, trio.SocketStream]:
    """A client through the proxy and the target's end of it, proven connected by a ping."""
    client = await dial(port)
    server = await target.next()
    await client.send_all(b"ping")
    assert await recv_exactly(server, 4) == b"ping"
    await server.send_all(b"pong")
    assert await recv_exactly(client, 4) == b"pong"
    return client, server


async def recv_exactly(stream: trio.SocketStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        assert chunk, f"EOF after {len(buf)} of {n} bytes"
        buf += chunk
    return bytes(buf)


async def recv_until_eof(stream: trio.SocketStream, limit: int) -> bytes:
    buf = bytearray()
    while chunk := await stream.receive_some(65536):
        buf += chunk
        assert len(buf) <= limit, "more bytes than were sent"
    return bytes(buf)


async def how_closed(stream: trio.SocketStream) -> str:
    """Read until the stream ends: 'reset' (RST), or 'eof' (FIN). Data is a failure."""
    try:
        chunk = await stream.receive_some(65536)
    except trio.BrokenResourceError:
        return "reset"
    assert chunk == b"", f"unexpected bytes {chunk[:20]!r}"
    return "eof"


async def assert_reset_at_once(port: int) -> None:
    """A dial through a link that resets it: connect() or the first read sees the RST."""
    try:
        client = await dial(port)
    except OSError as exc:  # the RST beat trio's check of the finished connect()
        causes = exc.__cause__.exceptions if isinstance(exc.__cause__, ExceptionGroup) else ()
        if not causes or not all(isinstance(e, ConnectionResetError) for e in causes):
            raise
        return
    assert await how_closed(client) == "reset"


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- forwarding --------------------------------------------------------------


async def test_bytes_pass_both_ways_in_order_through_large_transfers() -> None:
    data = random.Random(8).randbytes(4 * 2**20)
    async with running_proxy() as (proxy, nursery):
        target = await start_target(nursery)
        port = await proxy.add("a->b", target.addr)
        client = await dial(port)
        server = await target.next()

        async def echo() -> None:
            while chunk := await server.receive_some(65536):
                await server.send_all(chunk)
            await server.send_eof()

        async def upload() -> None:
            await client.send_all(data)
            await client.send_eof()

        async with trio.open_nursery() as inner:
            inner.start_soon(echo)
            inner.start_soon(upload)
            echoed = await recv_until_eof(client, len(data))
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(data).digest()
        stats = await proxy.wait_for(
            "a->b", lambda s: s.open_connections == 0 and s.bytes_down == len(data), timeout=WAIT
        )
        assert (stats.accepted, stats.refused, stats.failed) == (1, 0, 0)
        assert stats.bytes_up == len(data)
        assert stats.dropped_up == stats.dropped_down == 0
        assert 0 < stats.peak_buffered <= (16 + 2) * 65536


async def test_fin_is_passed_on_so_half_close_works() -> None:
    async with running_proxy() as (proxy, nursery):
        target = await start_target(nursery)
        port = await proxy.add("l", target.addr)
        client, server = await connect_pair(port, target)
        await client.send_all(b"question")
        await client.send_eof()
        assert await recv_until_eof(server, 100) == b"question"
        await server.send_all(b"answer")
        await server.aclose()
        assert await recv_until_eof(client, 100) == b"answer"
        stats = await proxy.wait_for("l", lambda s: s.open_connections == 0, timeout=WAIT)
        assert stats.bytes_up == 4 + 8


async def test_links_are_independent_and_can_be_added_while_running() -> None:
    async with running_proxy() as (proxy, nursery):
        target = await start_target(nursery)
        p1 = await proxy.add("1->2", target.addr)
        await connect_pair(p1, target)
        p2 = await proxy.add("2->1", target.addr)
        assert p1 != p2
        assert proxy.links() == {"1->2": p1, "2->1": p2}
        proxy.cut("2->1")
        proxy.drop("2->1", True)
        proxy.delay("2->1", 10_000)
        c1, s1 = await connect_pair(p1, target)  # a new connection through the other link
        await c1.send_all(b"still")
        assert await recv_exactly(s1, 5) == b"still"
        assert not proxy.stats()["1->2"].cut
        assert proxy.stats()["2->1"].cut


# -- cut and heal ------------------------------------------------------------


async def test_cut_resets_open_connections_on_both_sides() -> None:
    async with running_proxy() as (proxy, nursery):
        target = await start_target(nursery)
        port = await proxy.add("l", target.addr)
        client, server = await connect_pair(port, target)
        proxy.cut("l")
        assert await how_closed(client) == "reset"
        assert await how_closed(server) == "reset"
        stats = await proxy.wait_for("l", lambda s: s.open_connections == 0, timeout=WAIT)
        assert stats.cut


async def test_cut_link_refuses_new_connections_fast_and_heal_restores_them() -> None:
    async with running_proxy() as (proxy, nursery):
        target = await start_target(nursery)
        port = await proxy.add("l", target.addr)
        proxy.cut("l")
        for _ in range(3):
            await assert_reset_at_once(port)
        stats = proxy.stats("l")["l"]
        assert (stats.accepted, stats.refused) == (0, 3)  # the target was never dialled

        proxy.heal("l")
        client, server = await connect_pair(port, target)
        await server.send_all(b"healed")
        assert await recv_exactly(client, 6) == b"healed"
        assert proxy.stats()["l"].accepted == 1


async def test_cut_many_and_heal_many_check_every_name_first() -> None:
    async with running_proxy() as (proxy, nursery):
        target = await start_target(nursery)
        for name in ("a", "b", "c"):
            await proxy.add(name, target.addr)
        with pytest.raises(UnknownLink):
            proxy.cut_many(["a", "nope"])
        assert not any(s.cut for s in proxy.stats().values())
        proxy.cut_many(["a", "b"])
        assert {n: s.cut for n, s in proxy.stats().items()} == {"a": True, "b": True, "c": False}
        proxy.heal_many(["a", "b"])
        assert not any(s.cut for s in proxy.stats().values())


# -- drop (black hole) -------------------------------------------------------


async def test_drop_keeps_connections_open_and_discards_bytes_both_ways() -> None:
    async with running_proxy() as (proxy, nursery):
        target = await start_target(nursery)
        port = await proxy.add("l", target.addr)
        client, server = await connect_pair(port, target)
        idle_client, idle_server = await connect_pair(port, target)  # idle during the drop
        proxy.drop("l", True)
        await client.send_all(b"u" * 1000)
        await server.send_all(b"d" * 500)
        stats = await proxy.wait_for(
            "l", lambda s: s.dropped_up == 1000 and s.dropped_down == 500, timeout=WAIT
        )
        assert (stats.bytes_up, stats.bytes_down) == (8, 8)  # only the pings and pongs
        assert stats.dropped
        assert stats.open_connections == 2

        # Lifted: the connection that lost bytes is reset (its stream has a gap);
        # nothing that was dropped ever arrives.
        proxy.drop("l", False)
        assert await how_closed(client) == "reset"
        assert await how_closed(server) == "reset"
        # The idle one carries bytes again, and new connections work too.
        await idle_client.send_all(b"after")
        assert await recv_exactly(idle_server, 5) == b"after"
        await idle_server.send_all(b"back")
        assert await recv_exactly(idle_client, 4) == b"back"
        await connect_pair(port, target)
        assert proxy.stats()["l"].open_connections == 2


async def test_connections_opened_during_drop_reach_the_target_silently() -> None:
    async with running_proxy() as (proxy, nursery):
        target = await start_target(nursery)
        port = await proxy.add("l", target.addr)
        proxy.drop("l", True)
        lossy = await dial(port)
        lossy_server = await target.next()  # dialled to the target as usual
        quiet = await dial(port)
        quiet_server = await target.next()
        await lossy.send_all(b"lost")
        await lossy_server.send_all(b"lost too")
        await proxy.wait_for("l", lambda s: s.dropped_up + s.dropped_down == 12, timeout=WAIT)
        proxy.drop("l", False)
        assert await how_closed(lossy) == "reset"
        assert await how_closed(lossy_server) == "reset"
        await quiet.send_all(b"found")
        assert await recv_exactly(quiet_server, 5) == b"found"


async def test_fin_during_drop_is_withheld_until_the_drop_is_lifted() -> None:
    async with running_proxy() as (proxy, nursery):
        target = await start_target(nursery)
        port = await proxy.add("l", target.addr)
        client, server = await connect_pair(port, target)
        proxy.drop("l", True)
        await client.send_eof()
        held = await proxy.wait_for("l", lambda s: s.held_ends == 1, timeout=WAIT)
        assert held.open_connections == 1
        proxy.drop("l", False)
        assert await how_closed(server) == "eof"
        await server.send_all(b"late reply")
        assert await recv_exactly(client, 10) == b"late reply"
        assert proxy.stats()["l"].held_ends == 0


async def test_reset_during_drop_is_withheld_until_the_drop_is_lifted() -> None:
    async with running_proxy() as (proxy, nursery):
        target = await start_target(nursery)
        port = await proxy.add("l", target.addr)
        client, server = await connect_pair(port, target)
        proxy.drop("l", True)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await server.aclose()
        await proxy.wait_for("l", lambda s: s.held_ends == 1, timeout=WAIT)
        await client.send_all(b"into the void")  # the client still sees an open connection
        await proxy.wait_for("l", lambda s: s.dropped_up == 13, timeout=WAIT)
        proxy.drop("l", False)
        assert await how_closed(client) == "reset"


async def test_both_ends_closing_during_a_drop_resets_the_connection_at_once() -> None:
    async with running_proxy() as (proxy, nursery):
        target = await start_target(nursery)
        port = await proxy.add("l", target.addr)
        client, server = await connect_pair(port, target)
        proxy.drop("l", True)
        await client.send_eof()
        await server.send_eof()
        assert await how_closed(client) == "reset"
        assert await how_closed(server) == "reset"
        stats = await proxy.wait_for("l", lambda s: s.open_connections == 0, timeout=WAIT)
        assert stats.dropped


async def test_cut_during_drop_still_resets_both_sides() -> None:
    async with running_proxy() as (proxy, nursery):
        target = await start_target(nursery)
        port = await proxy.add("l", target.addr)
        client, server = await connect_pair(port, target)
        proxy.drop("l", True)
        proxy.cut("l")
        assert await how_closed(client) == "reset"
        assert await how_closed(server) == "reset"


# -- delay -------------------------------------------------------------------


async def test_delay_adds_at_least_the_delay_each_way() -> None:
    async with running_proxy() as (proxy, nursery):
        target = await start_target(nursery)
        port = await proxy.add("l", target.addr)
        client, server = await connect_pair(port, target)
        proxy.delay("l", 100)
        assert proxy.stats()["l"].delay_ms == pytest.approx(100)
        start = trio.current_time()
        await client.send_all(b"marco")
        assert await recv_exactly(server, 5) == b"marco"
        one_way = trio.current_time() - start
        await server.send_all(b"polo")
        assert await recv_exactly(client, 4) == b"polo"
        round_trip = trio.current_time() - start
        assert one_way >= 0.1 - 1e-6
        assert round_trip >= 0.2 - 1e-6


async def test_delayed_link_keeps_order_of_many_chunks() -> None:
    data = random.Random(9).randbytes(512 * 1024)
    async with running_proxy(chunk_size=4096, queue_chunks=8) as (proxy, nursery):
        target = await start_target(nursery)
        port = await proxy.add("l", target.addr)
        proxy.delay("l", 2)
        client = await dial(port)
        server = await target.next()
        async with trio.open_nursery() as inner:

            async def upload() -> None:
                await client.send_all(data)
                await client.send_eof()

            inner.start_soon(upload)
            assert await recv_until_eof(server, len(data)) == data
        assert proxy.stats()["l"].peak_buffered <= (8 + 2) * 4096


async def test_buffering_is_bounded_when_the_target_does_not_read() -> None:
    # More than the kernel can hold between the proxy and a target that does
    # not read (tcp_wmem max is 4 MiB here; the target's buffer is small), so
    # the proxy's queue must fill; an unbounded proxy would then hold megabytes.
    chunk, queue = 16384, 4
    data = random.Random(10).randbytes(12 * 2**20)
    async with running_proxy(chunk_size=chunk, queue_chunks=queue) as (proxy, nursery):
        target = await start_target(nursery, rcvbuf=4096)
        port = await proxy.add("l", target.addr)
        client = await dial(port)
        server = await target.next()
        async with trio.open_nursery() as inner:

            async def upload() -> None:
                await client.send_all(data)
                await client.send_eof()

            inner.start_soon(upload)
            # Two chunks held means the writer is blocked: the kernel path is full.
            full = await proxy.wait_for("l", lambda s: s.buffered >= 2 * chunk, timeout=WAIT)
            assert full.buffered <= (queue + 2) * chunk
            received = await recv_until_eof(server, len(data))
        assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()
        assert proxy.stats()["l"].peak_buffered <= (queue + 2) * chunk


# -- retargeting and unreachable targets -------------------------------------


async def test_set_target_sends_new_connections_to_the_new_server() -> None:
    async with running_proxy() as (proxy, nursery):
        old = await start_target(nursery)
        new = await start_target(nursery)
        port = await proxy.add("l", old.addr)
        c_old, s_old = await connect_pair(port, old)
        proxy.set_target("l", new.addr)
        assert proxy.stats()["l"].target == new.addr
        c_new, s_new = await connect_pair(port, new)
        # The open connection still reaches the old server.
        await c_old.send_all(b"old")
        assert await recv_exactly(s_old, 3) == b"old"
        await c_new.send_all(b"new")
        assert await recv_exactly(s_new, 3) == b"new"


async def test_unreachable_target_resets_the_client_and_other_links_keep_working() -> None:
    async with running_proxy(connect_timeout=5.0) as (proxy, nursery):
        target = await start_target(nursery)
        dead = await proxy.add("dead", ("127.0.0.1", unused_port()))
        live = await proxy.add("live", target.addr)
        for _ in range(3):
            await assert_reset_at_once(dead)
        stats = await proxy.wait_for("dead", lambda s: s.failed == 3, timeout=WAIT)
        assert (stats.accepted, stats.open_connections) == (3, 0)
        await connect_pair(live, target)
        # A retarget brings the dead link back.
        proxy.set_target("dead", target.addr)
        await connect_pair(dead, target)


async def test_target_reset_is_passed_on_as_a_reset() -> None:
    async with running_proxy() as (proxy, nursery):
        target = await start_target(nursery)
        port = await proxy.add("l", target.addr)
        client, server = await connect_pair(port, target)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await server.aclose()
        assert await how_closed(client) == "reset"
        await proxy.wait_for("l", lambda s: s.open_connections == 0, timeout=WAIT)


async def test_a_full_link_refuses_extra_connections() -> None:
    async with running_proxy(max_connections=2) as (proxy, nursery):
        target = await start_target(nursery)
        port = await proxy.add("l", target.addr)
        await connect_pair(port, target)
        await connect_pair(port, target)
        await assert_reset_at_once(port)
        stats = proxy.stats()["l"]
        assert (stats.accepted, stats.refused, stats.open_connections) == (2, 1, 2)


# -- misuse --------------------------------------------------------------------

MISUSES: list[tuple[str, Callable[[FaultProxy], object], type[ProxyError]]] = [
    ("cut", lambda p: p.cut("nope"), UnknownLink),
    ("heal", lambda p: p.heal("nope"), UnknownLink),
    ("delay", lambda p: p.delay("nope", 5), UnknownLink),
    ("drop", lambda p: p.drop("nope", True), UnknownLink),
    ("set_target", lambda p: p.set_target("nope", ("127.0.0.1", 1)), UnknownLink),
    ("stats", lambda p: p.stats("nope"), UnknownLink),
    ("remove", lambda p: p.remove("nope"), UnknownLink),
    ("heal_many", lambda p: p.heal_many(["l", "nope"]), UnknownLink),
    ("negative delay", lambda p: p.delay("l", -1), ProxyError),
    ("nan delay", lambda p: p.delay("l", float("nan")), ProxyError),
    ("bad port", lambda p: p.set_target("l", ("127.0.0.1", 70000)), ProxyError),
    ("bad host", lambda p: p.set_target("l", ("", 80)), ProxyError),
    ("not a pair", lambda p: p.set_target("l", ("127.0.0.1",)), ProxyError),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(("what", "misuse", "error"), MISUSES, ids=[m[0] for m in MISUSES])
async def test_misuse_raises_a_proxy_error_and_changes_nothing(
    what: str, misuse: Callable[[FaultProxy], object], error: type[ProxyError]
) -> None:
    async with running_proxy() as (proxy, nursery):
        target = await start_target(nursery)
        await proxy.add("l", target.addr)
        before = proxy.stats()
        with pytest.raises(error) as caught:
            misuse(proxy)
        assert isinstance(caught.value, ArchipelError)
        assert proxy.stats() == before


async def test_add_misuse() -> None:
    proxy = FaultProxy()
    with pytest.raises(ProxyNotRunning):
        await proxy.add("l", ("127.0.0.1", 1))
    async with running_proxy() as (proxy, nursery):
        target = await start_target(nursery)
        port = await proxy.add("l", target.addr)
        with pytest.raises(DuplicateLink):
            await proxy.add("l", target.addr)
        with pytest.raises(ProxyError):
            await proxy.add("m", ("127.0.0.1", 0))
        assert proxy.links() == {"l": port}
        with pytest.raises(ProxyError):
            await proxy.run()
    with pytest.raises(ProxyError):
        FaultProxy(chunk_size=0)


async def test_wait_for_times_out_with_a_proxy_error() -> None:
    async with running_proxy() as (proxy, nursery):
        target = await start_target(nursery)
        await proxy.add("l", target.addr)
        with pytest.raises(ProxyError, match="not met"):
            await proxy.wait_for("l", lambda s: s.accepted > 0, timeout=0.01)


# -- shutdown ----------------------------------------------------------------


async def assert_refused(port: int) -> None:
    with pytest.raises(OSError, match="onnect"):
        await dial(port)


async def test_remove_closes_the_listener_and_its_connections() -> None:
    async with running_proxy() as (proxy, nursery):
        target = await start_target(nursery)
        port = await proxy.add("l", target.addr)
        client, server = await connect_pair(port, target)
        proxy.remove("l")
        assert await how_closed(client) == "reset"
        assert await how_closed(server) == "reset"
        await assert_refused(port)
        assert proxy.links() == {}
        assert await proxy.add("l", target.addr) > 0  # the name is free again


async def test_cancelling_run_closes_every_listener_and_connection() -> None:
    with trio.fail_after(CAP):
        async with trio.open_nursery() as outer:
            target = await start_target(outer)
            proxy = FaultProxy()
            async with trio.open_nursery() as proxy_nursery:
                await proxy_nursery.start(proxy.run)
                ports = [await proxy.add(name, target.addr) for name in ("a", "b")]
                pairs = [await connect_pair(port, target) for port in ports]
                proxy.delay("a", 5000)  # bytes stay queued in the proxy
                await pairs[0][0].send_all(b"in flight")
                proxy_nursery.cancel_scope.cancel()
            # The proxy's nursery has exited: every task it started is done.
            for client, server in pairs:
                assert await how_closed(client) == "reset"
                assert await how_closed(server) == "reset"
            for port in ports:
                await assert_refused(port)
            with pytest.raises(ProxyNotRunning):
                await proxy.add("c", target.addr)
            final: dict[str, LinkStats] = proxy.stats()
            assert set(final) == {"a", "b"}
            assert all(s.open_connections == 0 for s in final.values())
            outer.cancel_scope.cancel()
