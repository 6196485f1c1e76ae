"""Channel keepalive: a dead route is noticed, an idle live one is kept.

TCP alone notices a peer that vanished without a FIN (a frozen process, a
laptop lid closed, a path that black-holes packets) only after many minutes,
if ever. Each channel PINGs when it has been silent for ``keepalive_s`` and is
reset when nothing at all has come from the peer for ``dead_after_s``. Real
loopback sockets through the fault proxy, on the real clock, capped.
"""

from __future__ import annotations

import pytest
import trio
from test_transport import CAP_S, ignore, key, pub, running, transport

from archipel.cli.cluster.proxy import FaultProxy
from archipel.daemon.transport import Channel, ChannelClosed

FAST = {"keepalive_s": 0.2, "dead_after_s": 1.0}


async def test_an_idle_channel_stays_open_on_pings_alone() -> None:
    server_key = key()
    got: list[bytes] = []
    received = trio.Event()

    async def read(channel: Channel) -> None:
        got.append(await channel.receive())
        received.set()

    server, client = transport(server_key, **FAST), transport(**FAST)
    with trio.fail_after(CAP_S):
        async with running((server, read), (client, ignore)):
            channel = await client.dial(server.listen_addrs, pub(server_key))
            await trio.sleep(3 * FAST["dead_after_s"])  # idle three times the dead line
            assert not channel.closed
            await channel.send(b"still here")
            await received.wait()
            await channel.aclose()
    assert got == [b"still here"]


async def test_a_black_holed_route_is_reset_on_both_ends() -> None:
    server_key = key()
    server_closed = trio.Event()
    why: list[str] = []

    async def hold(channel: Channel) -> None:
        try:
            while True:
                await channel.receive()
        except ChannelClosed as exc:
            why.append(str(exc))
            server_closed.set()

    server, client = transport(server_key, **FAST), transport(**FAST)
    proxy = FaultProxy()
    with trio.fail_after(CAP_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.run)
            async with running((server, hold), (client, ignore)):
                port = server.listen_addrs[0].rsplit("/tcp/", 1)[1].split("/")[0]
                link = await proxy.add("c>s", ("127.0.0.1", int(port)))
                channel = await client.dial([f"/ip4/127.0.0.1/tcp/{link}"], pub(server_key))
                await channel.send(b"hello")
                proxy.drop("c>s", True)  # the connection stays up; nothing gets through
                started = trio.current_time()
                with pytest.raises(ChannelClosed, match="dead route"):
                    while True:
                        await channel.receive()
                assert trio.current_time() - started >= FAST["dead_after_s"] - 0.3
                await server_closed.wait()
                assert "dead route" in why[0]
            nursery.cancel_scope.cancel()
