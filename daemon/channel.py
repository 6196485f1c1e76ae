"""A flow-controlled byte channel over one libp2p stream (the transport's records).

Each ``/archipel/sync/1`` stream is wrapped in a :class:`Channel`, whose bytes
are framed in records of our own (five-byte header, big-endian)::

    DATA  0x00 | u32 n | n bytes      (1 <= n <= MAX_RECORD_DATA)
    ACK   0x01 | u32 n                (n >= 1: "you may send n more bytes")
    PING  0x02 | u32 0                (keepalive; ignored by the receiver)

Each side opens with ``ACK(window_bytes)``; after that, the receiver acks the
bytes its application has consumed (in batches of a quarter window). A sender
never has more bytes in flight than it was granted; a peer that sends more is
cut off. So every buffer is bounded by the window, and Yamux never sees a
writer blocked long enough to reset the stream (see docs/transport.md).

A side that has written nothing for ``keepalive_s`` sends a PING; a channel
on which nothing at all arrived for ``dead_after_s`` is a dead route (a peer
frozen or gone without a FIN, a black-holed path: TCP alone would notice
only after many minutes, if ever) and is reset.
:mod:`archipel.daemon.transport` opens the streams and hands out channels.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio
from libp2p.abc import (
    INetStream,
)
from libp2p.network.stream.exceptions import StreamEOF

from archipel.crdt import ArchipelError

from .logs import fields

if TYPE_CHECKING:
    # py-libp2p pulls in trio-typing, whose trio-stubs shadow trio's own annotations;
    # TaskStatus lives in trio_typing there.
    pass

if TYPE_CHECKING:
    from .transport import TransportConfig

log = logging.getLogger("archipel.transport")

MAX_RECORD_DATA = 64 * 1024  # largest DATA record a receiver accepts (protocol constant)
_DATA, _ACK, _PING = 0x00, 0x01, 0x02
_HEADER = struct.Struct(">BI")
_READ_BYTES = 64 * 1024
_WRITE_TIMEOUT_S = 10.0  # one record write; longer means the peer stopped reading
_CLOSE_TIMEOUT_S = 2.0


class TransportError(ArchipelError):
    """Something about the network layer failed: bad configuration, a bad peer id,
    a host that could not start. Base of the transport's errors."""


class ChannelClosed(TransportError):
    """The channel is closed: the peer finished or reset it, broke the framing or the
    window, or we closed it. Nothing more can be sent or received."""


class _Violation(Exception):
    """The peer broke the channel's framing or flow control (internal)."""


class _Signal:
    """Wake every waiter; waiters re-check their condition (no lost wake-ups)."""

    def __init__(self) -> None:
        self._event = trio.Event()

    async def wait(self) -> None:
        await self._event.wait()

    def fire(self) -> None:
        self._event.set()
        self._event = trio.Event()


class _Decoder:
    """Incremental parser of the channel's records; raises _Violation on bad framing."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        buf = self._buffer
        buf += data
        records: list[tuple[int, int, bytes]] = []
        pos = 0
        while len(buf) - pos >= _HEADER.size:
            kind, value = _HEADER.unpack_from(buf, pos)
            if kind == _ACK:
                if value == 0:
                    raise _Violation("ACK of zero bytes")
                records.append((kind, value, b""))
                pos += _HEADER.size
            elif kind == _PING:
                pos += _HEADER.size
            elif kind == _DATA:
                if not 1 <= value <= MAX_RECORD_DATA:
                    raise _Violation(f"DATA record of {value} bytes")
                end = pos + _HEADER.size + value
                if end > len(buf):
                    break
                records.append((kind, value, bytes(buf[pos + _HEADER.size : end])))
                pos = end
            else:
                raise _Violation(f"unknown record kind {kind}")
        del buf[:pos]
        return records


class Channel:
    """One bidirectional byte stream with one peer, on ``/archipel/sync/1``.

    Bytes arrive in order and complete, split anyhow. ``send`` waits while the
    peer has not acknowledged what it may hold; cancelling it while it waits is
    harmless, cancelling it in the middle of writing a record closes the channel
    (the framing would be lost). Inbound channels are closed when ``on_channel``
    returns; a dialled channel must be closed by its owner with :meth:`aclose`.
    """

    peer: bytes
    initiator: bool
    remote_addr: str

    def __init__(
        self,
        stream: INetStream,
        peer: bytes,
        *,
        initiator: bool,
        label: str,
        config: TransportConfig,
        released: Callable[[Channel, bool], None],
    ) -> None:
        self.peer = peer
        self.label = label
        """How logs name the peer (its libp2p peer id)."""
        self.initiator = initiator
        self.remote_addr = _remote_addr(stream)
        self._stream = stream
        self._config = config
        self._released = released
        self._tasks = trio.CancelScope()
        self._write_lock = trio.Lock()
        self._decoder = _Decoder()
        self._inbox: list[bytes] = []
        self._recv_credit = config.window_bytes  # what the peer may still send us
        self._unacked_consumed = 0
        self._send_credit = 0  # what we may still send; the peer's first ACK opens it
        self._changed = _Signal()  # data, credit, ack wanted or closed
        self._reason: str | None = None  # why the channel stopped, once it has
        self._eof = False
        self._closed_by_us = False
        self._hostile = False  # the peer broke the protocol: drop its connection too
        self._torn_down = False
        self._reader_done = trio.Event()
        self._done = trio.Event()  # the stream is closed and released
        self._last_heard = self._last_written = trio.current_time()

    @property
    def closed(self) -> bool:
        """True once the channel can no longer send (it may still hold bytes to read)."""
        return self._reason is not None

    async def send(self, data: bytes) -> None:
        """Send ``data`` (any size) in records of at most ``chunk_bytes``."""
        view = memoryview(data)
        while view:
            while self._send_credit == 0 and self._reason is None:
                await self._changed.wait()
            if self._reason is not None:
                raise ChannelClosed(self._reason)
            n = min(self._send_credit, self._config.chunk_bytes, len(view))
            self._send_credit -= n
            await self._write(_HEADER.pack(_DATA, n) + view[:n])
            view = view[n:]

    async def receive(self) -> bytes:
        """The next bytes from the peer; ChannelClosed once it has finished."""
        while True:
            if self._closed_by_us:
                raise ChannelClosed(self._reason or "closed")
            if self._inbox:
                data = b"".join(self._inbox)
                self._inbox.clear()
                self._unacked_consumed += len(data)
                if self._unacked_consumed >= max(1, self._config.window_bytes // 4):
                    self._changed.fire()
                return data
            if self._reason is not None:
                raise ChannelClosed(self._reason)
            await self._changed.wait()

    async def aclose(self) -> None:
        """Close the channel (idempotent, never raises).

        Sends our FIN, waits (up to two seconds) for the peer's, then releases
        the stream; the stream is reset instead if the peer does not finish.
        """
        if self._closed_by_us:
            return
        self._closed_by_us = True
        self._stop("closed by us")
        with trio.CancelScope(shield=True):
            await self._teardown(graceful=True)

    # -- inside ------------------------------------------------------------

    def _stop(self, reason: str) -> None:
        """No more sending: wake every waiter. The reader runs on until the peer's FIN."""
        if self._reason is None:
            self._reason = reason
        self._changed.fire()

    async def _run(self) -> None:
        """The channel's reader and acker; runs in the transport's nursery."""
        try:
            with self._tasks:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._acker)
                    nursery.start_soon(self._keepalive)
                    await self._reader()
                    nursery.cancel_scope.cancel()
        finally:
            self._stop("the transport stopped")  # no-op unless cancelled from outside
            self._reader_done.set()

    async def _reader(self) -> None:
        try:
            while True:
                try:
                    data = await self._stream.read(_READ_BYTES)
                except StreamEOF:
                    data = b""
                if not data:
                    if self._decoder.pending:
                        raise _Violation("stream ended inside a record")
                    self._eof = True
                    self._stop("the peer closed the channel")
                    return
                self._last_heard = trio.current_time()
                for kind, value, payload in self._decoder.feed(data):
                    self._on_record(kind, value, payload)
        except _Violation as violation:
            log.warning(
                "peer broke the channel protocol: cut off",
                **fields(peer=self.label, why=str(violation)),
            )
            self._hostile = True
            self._stop(f"protocol violation: {violation}")
            with trio.CancelScope(shield=True):
                await self._teardown(graceful=False)
        except Exception as exc:  # the stream was reset or the connection dropped
            self._stop(f"stream failed: {_describe(exc)}")
        finally:
            self._reader_done.set()

    def _on_record(self, kind: int, value: int, payload: bytes) -> None:
        if kind == _ACK:
            self._send_credit += value
            if self._send_credit > 1 << 40:
                raise _Violation("absurd window")
        else:
            if value > self._recv_credit:
                raise _Violation(f"sent {value} bytes with only {self._recv_credit} allowed")
            self._recv_credit -= value
            if not self._closed_by_us:  # after aclose, bytes are read and dropped
                self._inbox.append(payload)
        self._changed.fire()

    async def _acker(self) -> None:
        """Grant the window, then acknowledge what the application consumed."""
        threshold = max(1, self._config.window_bytes // 4)
        try:
            await self._write(_HEADER.pack(_ACK, self._config.window_bytes))
            while True:
                while self._unacked_consumed < threshold and self._reason is None:
                    await self._changed.wait()
                if self._reason is not None:
                    return
                n, self._unacked_consumed = self._unacked_consumed, 0
                self._recv_credit += n
                await self._write(_HEADER.pack(_ACK, n))
        except ChannelClosed:
            pass

    async def _keepalive(self) -> None:
        """PING when we have been silent; reset the channel when the peer has."""
        config = self._config
        while self._reason is None:
            now = trio.current_time()
            silent = now - self._last_heard
            if silent >= config.dead_after_s:
                log.info(
                    "no word from the peer: dead route, channel reset",
                    **fields(peer=self.label, silent_s=round(silent, 1)),
                )
                self._stop(f"nothing heard for {silent:.0f} s: a dead route")
                with trio.CancelScope(shield=True):
                    await self._teardown(graceful=False)
                return
            if now - self._last_written >= config.keepalive_s:
                try:
                    await self._write(_HEADER.pack(_PING, 0))
                except ChannelClosed:
                    return
                continue
            await trio.sleep_until(
                min(
                    self._last_written + config.keepalive_s,
                    self._last_heard + config.dead_after_s,
                )
            )

    async def _write(self, record: bytes) -> None:
        """Write one record; on failure, timeout or cancellation the channel is done."""
        async with self._write_lock:
            if self._reason is not None:
                raise ChannelClosed(self._reason)
            done = False
            try:
                with trio.fail_after(_WRITE_TIMEOUT_S):
                    await self._stream.write(record)
                done = True
                self._last_written = trio.current_time()
            except trio.TooSlowError:
                self._stop("the peer stopped reading")
            except Exception as exc:
                self._stop(f"stream failed: {_describe(exc)}")
            finally:
                if not done:  # includes cancellation half-way through a record
                    self._stop("interrupted while writing")
            if not done:
                raise ChannelClosed(self._reason or "closed")

    async def _teardown(self, *, graceful: bool) -> None:
        """Once: FIN and wait for the peer's FIN (graceful), else reset; then release."""
        if self._torn_down:
            return
        self._torn_down = True
        clean = False
        if graceful:
            with trio.move_on_after(_CLOSE_TIMEOUT_S):
                try:
                    async with self._write_lock:
                        await self._stream.close()
                    await self._reader_done.wait()
                    clean = self._eof
                except Exception:
                    log.debug("closing a stream failed", exc_info=True)
        self._tasks.cancel()
        if not clean:
            with trio.move_on_after(_CLOSE_TIMEOUT_S):
                try:
                    await self._stream.reset()
                except Exception:
                    log.debug("resetting a stream failed", exc_info=True)
        self._done.set()
        self._released(self, self._hostile)


def _remote_addr(stream: INetStream) -> str:
    try:
        remote: Any = getattr(stream.muxed_conn, "get_remote_address", lambda: None)()
        host, port = remote[:2]  # IPv6 sockets give (host, port, flowinfo, scope)
    except Exception:  # not known
        return ""
    return f"/{'ip6' if ':' in host else 'ip4'}/{host}/tcp/{port}"


def _describe(exc: BaseException) -> str:
    """A one-line account of an exception and its first causes."""
    parts: list[str] = []
    seen: BaseException | None = exc
    while seen is not None and len(parts) < 3:
        if isinstance(seen, BaseExceptionGroup) and seen.exceptions:
            seen = seen.exceptions[0]
            continue
        parts.append(f"{type(seen).__name__}: {str(seen)[:100]}")
        seen = seen.__cause__ or seen.__context__
    return " <- ".join(parts)
