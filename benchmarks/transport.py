"""The transport adapter on loopback: dial time, channel throughput, churn.

Prints a table of each figure next to its baseline measured in the same run:
a bare py-libp2p 0.8.1 host pair configured like the adapter (PSK + Noise +
Yamux, one connection per peer). Both ends live in this one process, so the
throughput is what one Python process can push through encryption and framing
twice, not what a link can carry.

    .venv/bin/python benchmarks/transport.py [--dials N] [--mib M] [--cycles C]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from contextlib import suppress
from typing import Any

import multiaddr
import nacl.signing
import trio
from _machine import describe
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as x25519
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
from libp2p.security.noise.transport import Transport as Noise
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.transport.tcp.tcp import TCP

from archipel.daemon.transport import Channel, ChannelClosed, Transport, pnet_key

SECRET = b"benchmark federation secret....."
LOOPBACK = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")
SINK = TProtocol("/bench/sink/1")
CHUNK = 64 * 1024


def raw_host() -> Any:
    kp = create_new_key_pair()
    return new_host(
        key_pair=kp,
        sec_opt={NOISE_ID: Noise(kp, noise_privkey=x25519().private_key)},
        muxer_opt={TProtocol(YAMUX_ID): Yamux},
        transports=[TCP()],
        psk=pnet_key(SECRET).hex(),
        connection_config=ConnectionConfig(max_connections_per_peer=1),
    )


def ms(xs: list[float]) -> str:
    xs = sorted(xs)
    p90 = xs[int(0.9 * (len(xs) - 1))]
    return f"median {1e3 * statistics.median(xs):6.1f} ms, p90 {1e3 * p90:6.1f} ms"


class Bench:
    """A server Transport, eight client Transports and a bare libp2p sink host."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = trio.Semaphore(0)  # released when a sink has seen a stream end
        self.key = nacl.signing.SigningKey.generate()
        self.server = Transport(self.key, SECRET, lambda _: True)
        self.clients = [
            Transport(nacl.signing.SigningKey.generate(), SECRET, lambda _: True) for _ in range(8)
        ]
        self.raw_server = raw_host()
        self.raw_server.set_stream_handler(SINK, self.sink_stream)

    async def sink_channel(self, channel: Channel) -> None:
        with suppress(ChannelClosed):
            while True:
                await channel.receive()
        self.done.release()

    async def sink_stream(self, stream: Any) -> None:
        with suppress(Exception):
            n = 0
            while n < self.total:
                data = await stream.read(CHUNK)
                if not data:
                    break
                n += len(data)
        self.done.release()

    async def dial(self, i: int) -> Channel:
        return await self.clients[i % 8].dial(self.server.listen_addrs, bytes(self.key.verify_key))

    async def dial_times(self, n: int) -> None:
        target = info_from_p2p_addr(self.raw_server.get_addrs()[0])
        ours, bare = [], []
        for i in range(n):
            t = time.perf_counter()
            channel = await self.dial(i)
            ours.append(time.perf_counter() - t)
            await channel.aclose()
            await self.done.acquire()
            raw = raw_host()
            async with raw.run([LOOPBACK]):
                t = time.perf_counter()
                await raw.connect(target)
                stream = await raw.new_stream(target.peer_id, [SINK])
                bare.append(time.perf_counter() - t)
                await stream.close()
                await self.done.acquire()
        print(f"dial + open stream   adapter: {ms(ours)}   bare libp2p: {ms(bare)}")

    async def throughput(self, mib: int) -> None:
        payload = b"x" * CHUNK
        channel = await self.dial(0)
        t = time.perf_counter()
        for _ in range(self.total // CHUNK):
            await channel.send(payload)
        await channel.aclose()
        await self.done.acquire()
        ours = mib / (time.perf_counter() - t)
        target = info_from_p2p_addr(self.raw_server.get_addrs()[0])
        raw = raw_host()
        async with raw.run([LOOPBACK]):
            await raw.connect(target)
            stream = await raw.new_stream(target.peer_id, [SINK])
            t = time.perf_counter()
            for _ in range(self.total // CHUNK):
                await stream.write(payload)
            await self.done.acquire()
            bare = mib / (time.perf_counter() - t)
        print(f"throughput {mib} MiB  adapter: {ours:6.1f} MiB/s   bare Yamux: {bare:6.1f} MiB/s")

    async def churn(self, cycles: int) -> None:
        marks: dict[int, tuple[int, int]] = {}
        t = time.perf_counter()
        for i in range(cycles):
            channel = await self.dial(i)
            await channel.send(b"%d" % i)
            await channel.aclose()
            del channel
            await self.done.acquire()
            if i + 1 in (100, cycles):
                gc.collect()
                tasks = trio.lowlevel.current_statistics().tasks_living
                marks[i + 1] = (tasks, len(gc.get_objects()))
        per = 1e3 * (time.perf_counter() - t) / cycles
        at = ", ".join(f"cycle {k}: {v[0]} tasks, {v[1]} objects" for k, v in sorted(marks.items()))
        print(f"churn {cycles} cycles  {per:5.1f} ms/cycle; {at}")


async def main(args: argparse.Namespace) -> None:
    print(f"machine: {describe()}")
    bench = Bench(args.mib * 2**20)
    async with trio.open_nursery() as nursery:
        await nursery.start(bench.server.run, bench.sink_channel)
        for c in bench.clients:
            await nursery.start(c.run, bench.sink_channel)
        async with bench.raw_server.run([LOOPBACK]):
            await bench.dial_times(args.dials)
            await bench.throughput(args.mib)
            await bench.churn(args.cycles)
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.CRITICAL)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dials", type=int, default=30)
    parser.add_argument("--mib", type=int, default=32)
    parser.add_argument("--cycles", type=int, default=300)
    trio.run(main, parser.parse_args())
