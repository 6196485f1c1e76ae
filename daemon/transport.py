"""The hardened py-libp2p 0.8.1 adapter: authenticated, flow-controlled byte channels.

Theory of operation. A :class:`Transport` runs one libp2p host restricted to
TCP + private-network PSK + Noise + Yamux, and serves one stream protocol,
``/archipel/sync/1``. Each stream is wrapped in a :class:`Channel`
(:mod:`archipel.daemon.channel`), whose bytes are framed in records of our own
(five-byte header, big-endian)::

    DATA  0x00 | u32 n | n bytes      (1 <= n <= MAX_RECORD_DATA)
    ACK   0x01 | u32 n                (n >= 1: "you may send n more bytes")

Each side opens with ``ACK(window_bytes)``; after that, the receiver acks the
bytes its application has consumed (in batches of a quarter window). A sender
never has more bytes in flight than it was granted; a peer that sends more is
cut off. So every buffer is bounded by the window, and Yamux never sees a
writer blocked long enough to reset the stream (see docs/transport.md).

The defects of py-libp2p 0.8.1 this module works around (each has a test in
tests/test_transport.py or tests/test_security.py, and an entry in
docs/transport.md): plaintext/secio/TLS offered by default; a raising stream
handler kills the host; one leaked task and inbound slot per accepted
connection; a fixed 250 ms wait in connect(); dials that hang on a wrong PSK;
Yamux's 5 s writer reset and unbounded receive buffer; logs that do not
propagate; an auto-connector that redials every peer it ever saw; socket reads
as large as a peer's length prefix claims, before any authentication; a task
per stream a peer opens, without a per-connection bound; dials retried after a
deterministic refusal (docs/transport.md, "Abusive peers"). Private internals
are touched in three places, each marked ``libp2p 0.8.1 internal``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import multiaddr  # type: ignore[import-untyped]
import nacl.signing
import trio
from libp2p import new_host
from libp2p.abc import (
    IHost,
    IListener,
    IMuxedConn,
    INetConn,
    INetStream,
    IRawConnection,
    ISecureConn,
)
from libp2p.connection_types import ConnectionType
from libp2p.crypto.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.io.abc import ReadWriteCloser
from libp2p.io.exceptions import IOException
from libp2p.network.config import ConnectionConfig, RetryConfig
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.network.swarm import Swarm
from libp2p.peer.id import ID
from libp2p.protocol_muxer.multiselect_client import MultiselectClient
from libp2p.protocol_muxer.multiselect_communicator import MultiselectCommunicator
from libp2p.security.exceptions import HandshakeFailure
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.security.pnet.psk_conn import PskConn
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.transport.tcp.tcp import TCP
from libp2p.utils import logging as libp2p_logging

from .channel import (
    _CLOSE_TIMEOUT_S,
    MAX_RECORD_DATA,
    Channel,
    ChannelClosed,
    TransportError,
    _describe,
)
from .guard import LogLimiter
from .logs import fields

if TYPE_CHECKING:
    # py-libp2p pulls in trio-typing, whose trio-stubs shadow trio's own annotations;
    # TaskStatus lives in trio_typing there.
    from trio_typing import TaskStatus

__all__ = [
    "PROTOCOL_ID",
    "Channel",
    "ChannelClosed",
    "DialError",
    "Transport",
    "TransportConfig",
    "TransportError",
    "peer_id_of",
    "pnet_key",
    "public_key_of",
    "route_libp2p_logs",
]

log = logging.getLogger("archipel.transport")

PROTOCOL_ID = TProtocol("/archipel/sync/1")
MAX_WINDOW = 16 * 1024 * 1024  # largest window_bytes a config may ask for
PNET_PERSONALISATION = b"archipel/pnet/v1"  # 16 bytes, BLAKE2b's personalisation size
_MAX_DIAL_ADDRS = 8
_MAX_READ = 64 * 1024  # bytes asked of an accepted socket per read (see _CappedStream)
MAX_INBOUND_STREAMS = 8
"""Streams a peer may have open (or negotiating) towards us on one connection:
ours is one channel, plus libp2p's identify, identify-push and ping."""
HANDSHAKE_BYTES = 64 * 1024
"""What an inbound connection may send before its handshake is done (pnet
nonce, multistream, Noise, muxer selection: about 1 KiB when honest)."""
_DIAL_HOSTS = ("ip4", "ip6", "dns", "dns4", "dns6")
# An Ed25519 peer id is an identity multihash (0x00, length 36) of the protobuf
# PublicKey{Type: Ed25519 (1), Data: 32 bytes}.
_ED25519_PEER_ID_PREFIX = bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20])


class DialError(TransportError):
    """A dial failed: unreachable, timed out, wrong private-network key, peer not in
    the allowlist, or the remote key is not the one we asked for."""


@dataclass(frozen=True)
class TransportConfig:
    """How the transport listens, dials and bounds its buffers."""

    listen: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)  # multiaddr strings; tcp/0 = any port
    dial_timeout_s: float = 10.0
    max_connections: int = 64  # concurrent, inbound + outbound; beyond: refused (closed)
    chunk_bytes: int = 16 * 1024  # largest DATA record we send
    window_bytes: int = 256 * 1024  # bytes we let a peer have unacknowledged towards us
    handshake_timeout_s: float = 10.0
    keepalive_s: float = 5.0  # a channel silent this long on our side sends a PING
    dead_after_s: float = 30.0  # nothing at all from the peer this long: a dead route, closed

    def __post_init__(self) -> None:
        if not self.listen:
            raise TransportError("TransportConfig.listen: give at least one address")
        if not 0 < self.dial_timeout_s <= 3600 or not 0 < self.handshake_timeout_s <= 3600:
            raise TransportError("TransportConfig: timeouts must be in (0, 3600] seconds")
        if not 1 <= self.max_connections <= 100_000:
            raise TransportError("TransportConfig.max_connections must be in 1..100000")
        if not 1 <= self.chunk_bytes <= MAX_RECORD_DATA:
            raise TransportError(f"TransportConfig.chunk_bytes must be in 1..{MAX_RECORD_DATA}")
        if not 0 < self.keepalive_s < self.dead_after_s <= 3600:
            raise TransportError(
                "TransportConfig: need 0 < keepalive_s < dead_after_s <= 3600 seconds"
            )
        if not 1024 <= self.window_bytes <= MAX_WINDOW:
            raise TransportError(f"TransportConfig.window_bytes must be in 1024..{MAX_WINDOW}")


def peer_id_of(public_key: bytes) -> str:
    """The libp2p peer id (base58) of a 32-byte Ed25519 public key."""
    if not isinstance(public_key, bytes) or len(public_key) != 32:
        raise TransportError("an Ed25519 public key is 32 bytes")
    return ID(_ED25519_PEER_ID_PREFIX + public_key).to_base58()


def public_key_of(peer_id: str) -> bytes:
    """The 32-byte Ed25519 public key inside a peer id; TransportError if it has none."""
    try:
        raw = ID.from_base58(peer_id).to_bytes()
    except Exception as exc:  # base58 raises ValueError; a non-str raises TypeError
        raise TransportError(f"not a peer id: {peer_id!r:.80}") from exc
    if len(raw) != 38 or not raw.startswith(_ED25519_PEER_ID_PREFIX):
        raise TransportError(f"not an Ed25519 identity peer id: {peer_id!r:.80}")
    return raw[len(_ED25519_PEER_ID_PREFIX) :]


def pnet_key(federation_secret: bytes) -> bytes:
    """The 32-byte libp2p private-network key of a federation (domain-separated BLAKE2b)."""
    if not isinstance(federation_secret, bytes) or len(federation_secret) < 16:
        raise TransportError("the federation secret must be at least 16 bytes")
    return hashlib.blake2b(federation_secret, digest_size=32, person=PNET_PERSONALISATION).digest()


def route_libp2p_logs() -> None:
    """Send libp2p's log records to our handlers (called once at import).

    ``import libp2p`` runs ``libp2p.utils.logging.setup_logging()``, which clears
    the ``libp2p`` logger's handlers and stops propagation, so its records only
    reach Python's last-resort stderr handler. We turn propagation back on at
    WARNING (libp2p is chatty at INFO), unless ``LIBP2P_DEBUG`` asks for more.
    """
    # libp2p 0.8.1 internal: with LIBP2P_DEBUG set, setup_logging() also starts a
    # QueueListener thread writing to a temp file; stop it so records go one way.
    listener = getattr(libp2p_logging, "_current_listener", None)
    if listener is not None:
        listener.stop()
        libp2p_logging._current_listener = None
    debugging = bool(os.environ.get("LIBP2P_DEBUG"))
    names = [n for n in logging.Logger.manager.loggerDict if n.split(".")[0] == "libp2p"]
    for name in ["libp2p", *names]:
        lib = logging.getLogger(name)
        for handler in list(lib.handlers):
            lib.removeHandler(handler)
        lib.propagate = True
        if not debugging and name != "libp2p":
            lib.setLevel(logging.NOTSET)  # e.g. auto_connector forces itself to INFO
    if not debugging:
        logging.getLogger("libp2p").setLevel(logging.WARNING)


def _patch_psk_conn() -> None:
    """Give pnet connections the attributes RawConnection.__init__ would have set.

    libp2p 0.8.1 internal: PskConn subclasses RawConnection without calling its
    __init__, so get_transport_addresses() and get_connection_type() raise
    AttributeError; every pnet connection then logs a root-logger warning
    ("Error getting transport addresses") from identify. Class-level defaults
    equal to RawConnection's own defaults fix that; a fixed libp2p is left alone.
    """
    if not hasattr(PskConn, "_actual_addresses"):
        PskConn._actual_addresses = None
    if not hasattr(PskConn, "_connection_type"):
        PskConn._connection_type = ConnectionType.DIRECT


route_libp2p_logs()
_patch_psk_conn()


class _GatedNoise(NoiseTransport):
    """Noise that refuses, right after the handshake, a peer outside the allowlist."""

    def __init__(self, key_pair: KeyPair, admit: Callable[[ID], bool]) -> None:
        super().__init__(key_pair, noise_privkey=new_x25519_key_pair().private_key)
        self._admit = admit

    async def secure_inbound(self, conn: IRawConnection) -> ISecureConn:
        return await self._gate(await super().secure_inbound(conn))

    async def secure_outbound(self, conn: IRawConnection, peer_id: ID) -> ISecureConn:
        return await self._gate(await super().secure_outbound(conn, peer_id))

    async def _gate(self, secure: ISecureConn) -> ISecureConn:
        remote = secure.get_remote_peer()
        if self._admit(remote):
            return secure
        with trio.move_on_after(_CLOSE_TIMEOUT_S):
            try:
                await secure.close()
            except Exception:
                log.debug("closing a refused connection failed", exc_info=True)
        raise HandshakeFailure(f"peer {remote} is not in the federation's allowlist")


@dataclass
class _Conn:
    """Our bookkeeping of one libp2p connection."""

    channels: int = 0
    used: trio.Event = field(default_factory=trio.Event)  # set by its first channel


class Transport:
    """The node's libp2p host, behind an interface of authenticated channels."""

    def __init__(
        self,
        signing_key: nacl.signing.SigningKey,
        federation_secret: bytes,
        is_allowed: Callable[[bytes], bool],
        config: TransportConfig = TransportConfig(),
    ) -> None:
        if not isinstance(signing_key, nacl.signing.SigningKey):
            raise TransportError("the device key must be a nacl.signing.SigningKey")
        self._key_pair = KeyPair(
            Ed25519PrivateKey(signing_key), Ed25519PublicKey(signing_key.verify_key)
        )
        self._public_key = bytes(signing_key.verify_key)
        self._psk = pnet_key(federation_secret).hex()
        self._is_allowed = is_allowed
        self._config = config
        self._listen = tuple(_tcp_multiaddr(a) for a in config.listen)
        self._host: IHost | None = None
        self._swarm: Swarm | None = None
        self._nursery: trio.Nursery | None = None
        self._on_channel: Callable[[Channel], Awaitable[None]] | None = None
        self._conns: dict[IMuxedConn, _Conn] = {}
        self._closing: set[IMuxedConn] = set()
        self._inbound_streams: dict[IMuxedConn, int] = {}  # open or negotiating, per connection
        self._handshakes = 0
        self._quiet = LogLimiter()  # warnings about unauthenticated peers, per remote host
        self._running = False
        self._listen_addrs: tuple[str, ...] = ()

    @property
    def peer_id(self) -> str:
        return peer_id_of(self._public_key)

    @property
    def listen_addrs(self) -> tuple[str, ...]:
        """Our listen multiaddrs with ``/p2p/<peer id>``, once :meth:`run` has started."""
        return self._listen_addrs

    @property
    def connection_count(self) -> int:
        return self._swarm.get_total_connections() if self._swarm is not None else 0

    def _allowed(self, peer: bytes) -> bool:
        """The allowlist, made total: a raising ``is_allowed`` refuses."""
        try:
            return bool(self._is_allowed(peer))
        except Exception:
            log.exception("is_allowed raised: refusing the peer")
            return False

    async def run(
        self,
        on_channel: Callable[[Channel], Awaitable[None]],
        *,
        task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen and serve inbound channels until cancelled."""
        if self._running:
            raise TransportError("this transport is already running")
        for addr in self._listen:
            _check_port_free(addr)
        host = new_host(
            key_pair=self._key_pair,
            sec_opt={NOISE_PROTOCOL_ID: _GatedNoise(self._key_pair, self._admit_peer_id)},
            muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
            transports=[TCP()],
            psk=self._psk,
            connection_config=self._connection_config(),
        )
        swarm = host.get_network()
        if not isinstance(swarm, Swarm):
            raise TransportError(f"unexpected libp2p network {type(swarm).__name__}")
        # A failed dial is not retried inside libp2p (3 retries with backoff by
        # default): a refusal by the allowlist or a wrong private-network key
        # is not transient, each retry is a full handshake for both ends, and
        # the daemon's peer selection redials anyway.
        swarm.retry_config = RetryConfig(max_retries=0)
        # Every stream, whatever its protocol (ours, identify, ping), goes through
        # this handler: a raising one would take the whole host down.
        swarm.set_stream_handler(self._limited(_guarded(swarm.common_stream_handler)))
        # libp2p 0.8.1 internal: Swarm._handle_inbound_connection keeps a task and
        # an inbound-limiter slot per accepted connection until the swarm stops.
        # Ours holds them for the connection's lifetime only (listen() looks the
        # method up on the instance when a connection arrives).
        setattr(swarm, "_handle_inbound_connection", self._accept)  # noqa: B010
        host.set_stream_handler(PROTOCOL_ID, self._on_stream)
        self._running = True
        try:
            async with host.run(list(self._listen)):
                try:
                    async with trio.open_nursery() as nursery:
                        addrs = host.get_addrs()
                        if not addrs:
                            listen = ", ".join(self._config.listen)
                            raise TransportError(f"could not listen on {listen}")
                        self._host, self._swarm, self._nursery = host, swarm, nursery
                        self._on_channel = on_channel
                        self._listen_addrs = tuple(str(a) for a in addrs)
                        log.info("listening", **fields(addrs=" ".join(self._listen_addrs)))
                        task_status.started()
                        await trio.sleep_forever()
                finally:
                    self._nursery = None
                    with trio.CancelScope(shield=True):
                        await _close_all(swarm)
        finally:
            self._host = self._swarm = self._nursery = self._on_channel = None
            self._conns.clear()
            self._closing.clear()
            self._inbound_streams.clear()
            self._running = False

    async def dial(self, addrs: Sequence[str], peer: bytes) -> Channel:
        """Open a channel to ``peer`` at one of ``addrs``; DialError on any failure."""
        swarm = self._swarm
        if swarm is None or self._nursery is None:
            raise DialError("the transport is not running")
        if not isinstance(peer, bytes) or len(peer) != 32:
            raise DialError("a peer is a 32-byte Ed25519 public key")
        target = ID(_ED25519_PEER_ID_PREFIX + peer)
        if not self._allowed(peer):
            raise DialError(f"peer {target} is not in the federation's allowlist")
        targets = _dial_addrs(addrs, target)
        stream: INetStream | None = None
        try:
            with trio.fail_after(self._config.dial_timeout_s):
                reused = self._live_connection(swarm, target)
                if reused is not None:
                    try:
                        stream = await self._open_stream(reused)
                    except Exception as exc:  # e.g. the peer was closing it: dial afresh
                        log.debug("reusing a connection failed: %s", _describe(exc))
                        self._close_connection(reused.muxed_conn)
                if stream is None:
                    stream = await self._open_stream(await self._connect(swarm, target, targets))
        except trio.TooSlowError:
            self._close_unused(target)
            raise DialError(f"dialling {target} timed out") from None
        except DialError:
            self._close_unused(target)
            raise
        except Exception as exc:
            self._close_unused(target)
            raise DialError(f"dialling {target} failed: {_describe(exc)}") from exc
        assert stream is not None
        if stream.muxed_conn.peer_id != target:  # the upgrader checks this; we do too
            with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT_S):
                await stream.reset()
            raise DialError(f"the peer at {addrs!r:.80} is not {target}")
        return self._open_channel(stream, peer, initiator=True)

    # -- inside ------------------------------------------------------------

    def _connection_config(self) -> ConnectionConfig:
        cfg = self._config
        return ConnectionConfig(
            max_connections=cfg.max_connections,
            # min/low/high watermarks at 0 switch off the AutoConnector (it would
            # redial every peer in the peerstore); an infinite grace period then
            # keeps the pruner and the per-peer trimmer from closing anything.
            min_connections=0,
            low_watermark=0,
            high_watermark=0,
            grace_period=math.inf,
            # With more than one connection per peer allowed, connect() waits a
            # fixed 250 ms (happy eyeballs) even after it succeeded.
            max_connections_per_peer=1,
            dial_timeout=cfg.dial_timeout_s,
            inbound_upgrade_timeout=cfg.handshake_timeout_s,
            outbound_upgrade_timeout=cfg.handshake_timeout_s,
            inbound_stream_protocol_negotiation_timeout=cfg.handshake_timeout_s,
            outbound_stream_protocol_negotiation_timeout=cfg.handshake_timeout_s,
        )

    def _admit_peer_id(self, peer_id: ID) -> bool:
        try:
            key = public_key_of(peer_id.to_base58())
        except TransportError:
            return False
        return self._allowed(key)

    def _live_connection(self, swarm: Swarm, target: ID) -> INetConn | None:
        """A connection to ``target`` that nobody is closing, if there is one."""
        for conn in swarm.get_connections(target):
            muxed = conn.muxed_conn
            shutting = isinstance(muxed, Yamux) and muxed.event_shutting_down.is_set()
            if not conn.is_closed and not shutting and muxed not in self._closing:
                return conn
        return None

    async def _open_stream(self, conn: INetConn) -> INetStream:
        """Open a /archipel/sync/1 stream on this very connection."""
        stream = await conn.new_stream()
        try:
            await MultiselectClient().select_one_of(
                [PROTOCOL_ID],
                MultiselectCommunicator(stream),
                math.ceil(self._config.handshake_timeout_s),
            )
        except BaseException:
            with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT_S):
                await stream.reset()
            raise
        stream.set_protocol(PROTOCOL_ID)
        return stream

    async def _connect(
        self, swarm: Swarm, target: ID, addrs: list[multiaddr.Multiaddr]
    ) -> INetConn:
        """A new connection: each address in turn, with a fair share of the time left."""
        failures: list[str] = []
        for i, addr in enumerate(addrs):
            share = (trio.current_effective_deadline() - trio.current_time()) / (len(addrs) - i)
            outcome = f"{addr}: timed out"
            with trio.move_on_after(share):
                try:
                    # dial_addr: no peerstore, no negative cache, no happy-eyeballs wait
                    return await swarm.dial_addr(addr, target)
                except Exception as exc:
                    outcome = f"{addr}: {_describe(exc)}"
            failures.append(outcome)
        raise DialError(f"could not reach {target}: " + "; ".join(failures))

    async def _accept(self, read_write_closer: ReadWriteCloser, maddr: multiaddr.Multiaddr) -> None:
        """One inbound connection, from TCP accept to close (replaces the swarm's)."""
        swarm = self._swarm
        busy = self._handshakes + (swarm.get_total_connections() if swarm else 0)
        if swarm is None or busy >= self._config.max_connections:
            log.debug("refusing an inbound connection: at max_connections")
            await _close_quietly(read_write_closer)
            return
        self._handshakes += 1
        capped = _CappedStream(read_write_closer, HANDSHAKE_BYTES)
        raw = RawConnection(capped, False)
        try:
            with trio.fail_after(self._config.handshake_timeout_s):
                muxed = await swarm.upgrade_inbound_raw_conn(raw, maddr)
        except Exception as exc:  # wrong PSK, not allowed, not Noise, timeout...
            self._refused(read_write_closer, exc)
            await _close_quietly(raw)
            return
        finally:
            self._handshakes -= 1
        capped.budget = None  # authenticated: Yamux and our channels bound the rest
        if not isinstance(muxed, Yamux):
            await _close_quietly(muxed)
            return
        entry = self._conns.setdefault(muxed, _Conn())
        try:
            # A connection that carries no channel is closed after the handshake
            # timeout, so that it cannot hold one of max_connections forever.
            with trio.move_on_after(self._config.handshake_timeout_s):
                await entry.used.wait()
            if not entry.used.is_set():
                log.debug("closing an inbound connection that opened no channel")
                self._close_connection(muxed)
            await muxed.event_closed.wait()
        finally:
            if entry.channels == 0:
                self._conns.pop(muxed, None)

    def _limited(
        self, handler: Callable[[INetStream], Awaitable[None]]
    ) -> Callable[[INetStream], Awaitable[None]]:
        """At most MAX_INBOUND_STREAMS streams at once per connection, negotiating
        included; a peer that opens more is cut off (its connection closed).

        libp2p 0.8.1 spawns a task for every stream a peer opens (a 12-byte Yamux
        frame) and holds it up to the negotiation timeout: 20,000 frames from one
        admitted device left 5,000 tasks alive and 50 MB more RSS. One channel per
        connection, plus identify, identify-push and ping, never needs that many.
        """

        async def limited(stream: INetStream) -> None:
            muxed = stream.muxed_conn
            count = self._inbound_streams.get(muxed, 0)
            if count >= MAX_INBOUND_STREAMS:
                if muxed not in self._closing:
                    log.warning(
                        "peer opened too many streams: cut off",
                        **fields(peer=str(muxed.peer_id), streams=count + 1),
                    )
                with trio.move_on_after(_CLOSE_TIMEOUT_S):
                    with contextlib.suppress(Exception):
                        await stream.reset()
                self._close_connection(muxed)
                return
            self._inbound_streams[muxed] = count + 1
            try:
                await handler(stream)
            finally:
                left = self._inbound_streams.pop(muxed, 1) - 1
                if left > 0:
                    self._inbound_streams[muxed] = left

        return limited

    def _refused(self, conn: ReadWriteCloser, exc: Exception) -> None:
        """Say why an inbound connection failed its handshake (junk, a wrong
        private-network key, a key outside the allowlist, a timeout): a warning
        with the remote address, at most a few per remote host and then one every
        ten seconds (anyone who reaches the port can cause these)."""
        remote = _remote_of(conn)
        why = _describe(exc)
        root: BaseException = exc
        for _ in range(16):  # libp2p wraps the cause in several layers: name the first one too
            inner = root.__cause__ or root.__context__
            if inner is None:
                break
            root = inner
        if root is not exc and type(root).__name__ not in why:
            why += f" <- ... <- {_describe(root)}"
        if type(root).__name__ == "InvalidTag":  # cryptography's AEAD failure, inside Noise
            why = f"a Noise handshake message failed to decrypt ({why})"
        host = remote.rsplit(":", 1)[0]
        suppressed = self._quiet.allow(host, int(trio.current_time() * 1000))
        if suppressed < 0:
            log.debug("inbound handshake failed", **fields(remote=remote, why=why))
        elif suppressed:
            log.warning(
                "inbound handshake failed: closed",
                **fields(remote=remote, why=why, similar_not_logged=suppressed),
            )
        else:
            log.warning("inbound handshake failed: closed", **fields(remote=remote, why=why))

    async def _on_stream(self, stream: INetStream) -> None:
        """libp2p's handler for /archipel/sync/1: admit, then serve in our nursery."""
        nursery, on_channel = self._nursery, self._on_channel
        try:
            peer = public_key_of(stream.muxed_conn.peer_id.to_base58())
        except TransportError:
            peer = b""
        if nursery is None or on_channel is None or not peer or not self._allowed(peer):
            with trio.move_on_after(_CLOSE_TIMEOUT_S):
                await stream.reset()
            await _close_quietly(stream.muxed_conn)
            return
        channel = self._open_channel(stream, peer, initiator=False)
        nursery.start_soon(self._serve, on_channel, channel)
        # Hold libp2p's stream task (and its stream accounting) until the channel is done.
        await channel._done.wait()

    async def _serve(self, on_channel: Callable[[Channel], Awaitable[None]], ch: Channel) -> None:
        try:
            await on_channel(ch)
        except Exception:
            log.exception("on_channel failed", **fields(peer=peer_id_of(ch.peer)))
        finally:
            await ch.aclose()

    def _open_channel(self, stream: INetStream, peer: bytes, *, initiator: bool) -> Channel:
        assert self._nursery is not None
        channel = Channel(
            stream,
            peer,
            initiator=initiator,
            label=peer_id_of(peer),
            config=self._config,
            released=self._released,
        )
        entry = self._conns.setdefault(stream.muxed_conn, _Conn())
        entry.channels += 1
        entry.used.set()
        self._nursery.start_soon(channel._run)
        return channel

    def _released(self, channel: Channel, hostile: bool) -> None:
        """A channel's stream is closed: close its connection if it was the last one."""
        muxed = channel._stream.muxed_conn
        entry = self._conns.get(muxed)
        if entry is not None:
            entry.channels -= 1
        if hostile or entry is None or entry.channels <= 0:
            self._conns.pop(muxed, None)
            self._close_connection(muxed)

    def _close_unused(self, target: ID) -> None:
        """After a failed dial: close connections to ``target`` that carry no channel."""
        if self._swarm is None:
            return
        for conn in self._swarm.get_connections(target):
            entry = self._conns.get(conn.muxed_conn)
            if entry is None or entry.channels == 0:
                self._close_connection(conn.muxed_conn)

    def _close_connection(self, muxed: IMuxedConn) -> None:
        """Close a connection in the background; dial() no longer reuses it."""
        if self._nursery is None or muxed in self._closing:
            return
        self._closing.add(muxed)

        async def close() -> None:
            try:
                await _close_quietly(muxed)
            finally:
                self._closing.discard(muxed)

        # RuntimeError: the nursery is closing, and the host closes everything anyway.
        with contextlib.suppress(RuntimeError):
            self._nursery.start_soon(close)


class _CappedStream(ReadWriteCloser):
    """An accepted TCP stream as libp2p reads it: at most ``_MAX_READ`` bytes per
    read, and at most ``budget`` bytes until the handshake is done.

    libp2p 0.8.1 reads a multistream message by asking the socket for as many
    bytes as the peer's varint length prefix claims, and Python's ``recv(n)``
    allocates ``n`` bytes first: a claim of 1 GiB allocated 1 GiB per read, and
    the node buffered ~13 MB per connection before giving up (a pnet stream is
    not authenticated, so junk decrypts to such a length one time in sixteen).
    """

    def __init__(self, inner: ReadWriteCloser, budget: int) -> None:
        self._inner = inner
        self.budget: int | None = budget

    async def read(self, n: int | None = None) -> bytes:
        n = _MAX_READ if n is None else min(n, _MAX_READ)
        if self.budget is not None:
            if self.budget <= 0:
                raise IOException(f"handshake longer than {HANDSHAKE_BYTES} bytes")
            n = min(n, self.budget)
        data = await self._inner.read(n)
        if self.budget is not None:
            self.budget -= len(data)
        return data

    async def write(self, data: bytes) -> None:
        await self._inner.write(data)

    async def close(self) -> None:
        await self._inner.close()

    def get_remote_address(self) -> tuple[str, int] | None:
        return self._inner.get_remote_address()


def _guarded(
    handler: Callable[[INetStream], Awaitable[None]],
) -> Callable[[INetStream], Awaitable[None]]:
    """A stream handler that cannot raise: a failure resets that stream only."""

    async def guarded(stream: INetStream) -> None:
        try:
            await handler(stream)
        except Exception as exc:
            log.warning(
                "a stream handler failed: resetting the stream",
                **fields(protocol=stream.get_protocol(), error=_describe(exc)),
            )
            with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT_S):
                try:
                    await stream.reset()
                except Exception:
                    log.debug("resetting a failed stream failed", exc_info=True)

    return guarded


async def _close_all(swarm: Swarm) -> None:
    """Close the listeners, then every connection, bounded in time.

    Swarm.run() means to do this when it stops, but it awaits inside a cancelled
    scope, so in 0.8.1 the listening socket outlives the host, still accepting.
    """
    with trio.move_on_after(2 * _CLOSE_TIMEOUT_S):
        for listener in list(swarm.listeners.values()):
            await _close_quietly(listener)
        async with trio.open_nursery() as nursery:
            for conn in swarm.get_connections():
                nursery.start_soon(_close_quietly, conn)


async def _close_quietly(
    closable: ReadWriteCloser | IRawConnection | IMuxedConn | INetConn | IListener,
) -> None:
    """Close anything of libp2p's, bounded in time, ignoring errors."""
    with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT_S):
        try:
            await closable.close()
        except Exception:
            log.debug("closing %s failed", type(closable).__name__, exc_info=True)


def _remote_of(conn: ReadWriteCloser) -> str:
    """``host:port`` of an accepted connection, best effort."""
    try:
        remote: Any = getattr(conn, "get_remote_address", lambda: None)()
        return f"{remote[0]}:{remote[1]}"
    except Exception:  # not known
        return "unknown"


def _check_port_free(addr: multiaddr.Multiaddr) -> None:
    """Refuse a fixed listen port that something already listens on.

    libp2p's TCP listener sets SO_REUSEPORT, so a second node on the same port
    would start silently and the kernel would share the connections between them.
    """
    ip = addr.protocols()[0].name
    family = socket.AF_INET6 if ip == "ip6" else socket.AF_INET
    host, port = addr.value_for_protocol(ip), int(addr.value_for_protocol("tcp"))
    if port == 0:
        return
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise TransportError(f"cannot listen on {addr}: {exc.strerror}") from exc


def _tcp_multiaddr(text: str) -> multiaddr.Multiaddr:
    """A listen address: /ip4|ip6/<address>/tcp/<port>, nothing else (TCP only)."""
    try:
        addr = multiaddr.Multiaddr(text)
        names = [p.name for p in addr.protocols()]
    except Exception as exc:
        raise TransportError(f"not a multiaddr: {text!r:.80}") from exc
    if len(names) != 2 or names[0] not in ("ip4", "ip6") or names[1] != "tcp":
        raise TransportError(f"listen addresses are /ip4|ip6/<host>/tcp/<port>: {text!r:.80}")
    return addr


def _dial_addrs(addrs: Sequence[str], target: ID) -> list[multiaddr.Multiaddr]:
    """The TCP addresses to dial, without /p2p/ (which, if present, must name ``target``)."""
    out: list[multiaddr.Multiaddr] = []
    if isinstance(addrs, str):
        raise DialError("addrs is a sequence of multiaddr strings, not one string")
    for text in list(addrs)[:_MAX_DIAL_ADDRS]:
        try:
            addr = multiaddr.Multiaddr(text)
            names = [p.name for p in addr.protocols()]
            p2p = addr.value_for_protocol("p2p") if names[-1:] == ["p2p"] else None
        except Exception as exc:
            raise DialError(f"not a multiaddr: {text!r:.80}") from exc
        if p2p is not None:
            if p2p != target.to_base58():
                raise DialError(f"{text!r:.80} names another peer than {target}")
            names = names[:-1]
            addr = multiaddr.Multiaddr("/".join(str(addr).split("/")[:-2]))
        if len(names) == 2 and names[0] in _DIAL_HOSTS and names[1] == "tcp":
            out.append(addr)
    if not out:
        raise DialError(f"no TCP address to dial among {list(addrs)!r:.120}")
    return out
