"""Circuit relay v2 on loopback with py-libp2p 0.8.1: does A (behind "NAT") reach B via R?

Three bare py-libp2p hosts (Noise + Yamux, like the adapter): R runs the relay
(hop) service; A runs the stop side and reserves a slot on R; B dials A only via
``/ip4/127.0.0.1/tcp/<R>/p2p/<R>/p2p-circuit/p2p/<A>`` and echoes a few bytes.
Run once without and once with the federation's private-network key (PSK).
Findings are recorded in docs/transport.md. Loopback only; every step capped.

    .venv/bin/python benchmarks/relay_probe.py
"""

from __future__ import annotations

import logging
import time
from contextlib import AsyncExitStack
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as x25519
from libp2p.custom_types import TProtocol
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_ID
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
from libp2p.security.noise.transport import Transport as Noise
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service
from libp2p.transport.tcp.tcp import TCP

from archipel.daemon.transport import pnet_key

ECHO = TProtocol("/probe/echo/1")
LOOPBACK = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")


def host(psk: str | None) -> Any:
    kp = create_new_key_pair()
    return new_host(
        key_pair=kp,
        sec_opt={NOISE_ID: Noise(kp, noise_privkey=x25519().private_key)},
        muxer_opt={TProtocol(YAMUX_ID): Yamux},
        transports=[TCP()],
        psk=psk,
    )


def leaf(exc: BaseException) -> str:
    chain = []
    seen: BaseException | None = exc
    while seen is not None and len(chain) < 4:
        while isinstance(seen, BaseExceptionGroup) and seen.exceptions:
            seen = seen.exceptions[0]
        chain.append(f"{type(seen).__name__}: {str(seen)[:90]}")
        seen = seen.__cause__ or seen.__context__
    return " <- ".join(chain)


async def echo(stream: Any) -> None:
    try:
        await stream.write(await stream.read(100))
        await stream.close()
    except Exception as exc:
        print("   echo handler failed:", leaf(exc))


async def attempt(label: str, psk: str | None) -> None:
    r, a, b = host(psk), host(psk), host(psk)
    a.set_stream_handler(ECHO, echo)
    relay = CircuitV2Protocol(r, allow_hop=True)
    stop_a = CircuitV2Protocol(a, allow_hop=False)
    client_b = CircuitV2Protocol(b, allow_hop=False)
    cfg = RelayConfig(roles=RelayRole.STOP | RelayRole.CLIENT)
    transport_a = CircuitV2Transport(a, stop_a, cfg)
    transport_b = CircuitV2Transport(b, client_b, cfg)
    t0 = time.perf_counter()
    step = "start"
    try:
        with trio.fail_after(30):
            async with AsyncExitStack() as stack:
                for h in (r, a, b):
                    await stack.enter_async_context(h.run([LOOPBACK]))
                for service in (relay, stop_a, client_b):
                    await stack.enter_async_context(background_trio_service(service))
                r_addr = r.get_addrs()[0]
                r_info = PeerInfo(r.get_id(), [r_addr])
                step = "A connects to R and reserves"
                await a.connect(r_info)
                stream = await a.new_stream(r.get_id(), [HOP_ID])
                async with trio.open_nursery() as nursery:
                    reserved = await transport_a.reserve(stream, r.get_id(), nursery)
                    nursery.cancel_scope.cancel()
                print(f"   reservation on R: {reserved}")
                step = "B dials A through R"
                circuit = multiaddr.Multiaddr(f"{r_addr}/p2p-circuit/p2p/{a.get_id()}")
                conn = await transport_b.dial(circuit)
                print(f"   B -> A relayed connection: {type(conn).__name__}")
                step = "B opens an echo stream to A"
                s = await b.new_stream(a.get_id(), [ECHO])
                await s.write(b"hello through the relay")
                got = await s.read(100)
                print(f"   echo over the circuit: {got!r} ({time.perf_counter() - t0:.2f} s)")
                direct = [c for c in b.get_network().get_connections(a.get_id())]
                print(f"   B's connections to A: {len(direct)}")
    except BaseException as exc:
        print(f"   FAILED at '{step}' after {time.perf_counter() - t0:.2f} s: {leaf(exc)}")


async def main() -> None:
    print(f"HopMessage types: RESERVE={HopMessage.RESERVE} CONNECT={HopMessage.CONNECT}")
    print("1) relay v2, no private network")
    await attempt("no psk", None)
    print("2) relay v2, with the federation PSK on all three hosts")
    await attempt("psk", pnet_key(b"relay probe federation secret!!").hex())


if __name__ == "__main__":
    logging.basicConfig(level=logging.CRITICAL)
    trio.run(main)
