"""A fault-injecting TCP proxy for the live-cluster harness (``archipel cluster run``).

Theory of operation. A :class:`FaultProxy` owns named *links*. A link is one
listening socket on ``127.0.0.1`` (an ephemeral port) that forwards every
connection it accepts to a *target* ``(host, port)``. The harness gives every
ordered pair of daemons ``(i, j)`` its own link, so that a fault on ``i -> j``
touches nothing else. The proxy never parses the bytes (for Archipel they are
libp2p: TCP + pnet + Noise + Yamux); it moves opaque chunks.

Each accepted connection is dialled to the link's target (with a timeout) and
then served by four tasks: for each direction, a reader that takes chunks of
at most ``chunk_size`` bytes from one socket into a bounded queue
(``queue_chunks`` chunks), and a writer that takes them out in order and
sends them on. "Up" is dialer -> target, "down" is target -> dialer. A full
queue stops the reader, so the sender's TCP window closes: backpressure, never
unbounded buffering. At most ``(queue_chunks + 2) * chunk_size`` bytes per
direction of a connection are held by the proxy (``peak_buffered`` in the
stats shows the high-water mark).

What the faults do at TCP level:

- **cut** aborts every open connection of the link at once, on both sides, with
  an RST (``SO_LINGER`` 0 then close): the daemons' next (or pending) read or
  write fails with ``ECONNRESET`` at once. While a link is cut, the listener
  keeps accepting but resets each new connection immediately, without
  dialling the target. The kernel completes the TCP handshake before the proxy
  sees the connection, so the dialer gets ``ECONNRESET`` within a loopback
  round trip, either from ``connect()`` itself (trio reports it as an
  ``OSError``) or from its first read or write: a fast failure, never a hang.
  **heal** lets new connections through again; connections cut earlier stay
  dead (TCP cannot resurrect them).
- **drop** (a black hole) keeps every connection open but discards, at the
  moment it would be delivered, every chunk in both directions, including
  chunks already queued. The proxy keeps reading, so senders do not block:
  the bytes simply vanish, and the daemons must notice by their own timeouts.
  End-of-stream is withheld too: a FIN that arrives while dropped is passed on
  when the drop is lifted (or never, if the connection is cut), and an RST is
  held the same way. If both ends of a connection go away during a drop,
  nobody is left to notice anything, and the proxy resets the connection at
  once. Connections opened during a drop are dialled to the target as usual
  (the target sees a connection that stays silent). Lifting the drop
  (``drop(name, False)``) resets every connection that lost at least one byte:
  its stream has a gap that no protocol can recover from, and a real TCP
  connection never has one (it would have retransmitted, or died). Left open,
  such a connection hangs: a Noise reader takes the bytes after the gap for a
  frame length and waits for a frame that never comes. Connections that lost
  nothing (idle during the drop) carry on, FINs withheld during the drop are
  passed on, and new connections work normally.
- **delay** adds a one-way latency of ``ms`` to every chunk in each direction
  (a round trip gets twice the delay). Each chunk is stamped with
  ``now + delay`` when it is read and is sent no earlier than that, in order.
  A change of delay applies to chunks read after it. Because the queue is
  bounded, a delayed link has a bandwidth of at most
  ``queue_chunks * chunk_size`` bytes per delay period per connection
  direction, like a TCP window. Resets are not delayed.
- **set_target** changes where *future* connections go (a daemon restarted on a
  new port); open connections keep their old upstream.

Every close the proxy decides on is abortive (RST): a cut, a reset seen on the
other side, an unreachable target, a full link (``max_connections``), or the
end of :meth:`FaultProxy.run`. An orderly FIN from one end is passed on as a
FIN (``shutdown(SHUT_WR)``) to the other end, so half-closed streams work, and
a connection whose two directions both ended with a FIN is closed normally.

Errors on one connection are logged at debug level and never reach the link
or the proxy. Misuse (an unknown link name, a name added twice, a proxy that
is not running) raises a :class:`ProxyError`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import socket
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from archipel.crdt import ArchipelError

if TYPE_CHECKING:
    # trio's own annotations are shadowed by the trio-stubs package that py-libp2p
    # pulls in (trio-typing), where TaskStatus lives in trio_typing.
    from trio_typing import TaskStatus

__all__ = [
    "DuplicateLink",
    "FaultProxy",
    "LinkStats",
    "ProxyError",
    "ProxyNotRunning",
    "ProxyTimeout",
    "UnknownLink",
]

logger = logging.getLogger(__name__)

_UP = 0  # dialer -> target
_DOWN = 1  # target -> dialer

# accept() fails with these when the process or the kernel runs out of
# sockets or memory; the listener is fine and a later accept may succeed.
_ACCEPT_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
# A back-off before accepting again after such an error (as trio's own
# serve_listeners does): without it the accept loop would spin.
_ACCEPT_BACKOFF_S = 0.1


class ProxyError(ArchipelError):
    """The proxy was misused: see the subclasses. Nothing was changed."""


class UnknownLink(ProxyError):
    """Raised by every per-link method when no link has the given name."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no proxy link named {name!r}; add it first with FaultProxy.add")
        self.name = name


class DuplicateLink(ProxyError):
    """Raised by :meth:`FaultProxy.add` when a link of that name already exists."""

    def __init__(self, name: str) -> None:
        super().__init__(f"a proxy link named {name!r} already exists; remove it first")
        self.name = name


class ProxyNotRunning(ProxyError):
    """Raised by :meth:`FaultProxy.add` before :meth:`FaultProxy.run` started or after it ended."""


class ProxyTimeout(ProxyError):
    """Raised by :meth:`FaultProxy.wait_for` when the condition did not hold in time."""


@dataclass(frozen=True, slots=True)
class LinkStats:
    """A snapshot of one link: its settings and counters since it was added.

    ``up`` is dialer -> target, ``down`` is target -> dialer. ``accepted``
    counts connections let through (then dialled to the target); ``failed``
    those of them whose target could not be reached; ``refused`` connections
    reset at once because the link was cut or full. ``buffered`` is the bytes
    the proxy holds right now (read, not yet sent or dropped) over all the
    link's connections; ``peak_buffered`` the most it ever held for one
    direction of one connection. ``held_ends`` counts the FINs and RSTs a drop
    is withholding right now.
    """

    name: str
    port: int
    target: tuple[str, int]
    cut: bool
    dropped: bool
    delay_ms: float
    open_connections: int
    accepted: int
    refused: int
    failed: int
    bytes_up: int
    bytes_down: int
    dropped_up: int
    dropped_down: int
    buffered: int
    held_ends: int
    peak_buffered: int


def _check_target(target: tuple[str, int]) -> tuple[str, int]:
    if not isinstance(target, tuple) or len(target) != 2:
        raise ProxyError(f"bad target {target!r}: give a (host, port) tuple")
    host, port = target
    if not isinstance(host, str) or not host:
        raise ProxyError(f"bad target host {host!r}: give an address such as '127.0.0.1'")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ProxyError(f"bad target port {port!r}: give an integer in 1..65535")
    return (host, port)


def _abort(stream: trio.SocketStream | None) -> None:
    """Close ``stream`` with an RST (SO_LINGER 0), at once and without blocking."""
    if stream is None:
        return
    with contextlib.suppress(OSError, trio.ClosedResourceError):
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


class _Link:
    """The mutable state of one link; owned by its :class:`FaultProxy`."""

    def __init__(self, name: str, target: tuple[str, int]) -> None:
        self.name = name
        self.target = target
        self.port = 0
        self.cut = False
        self.dropped = False
        self.undropped = trio.Event()
        self.undropped.set()
        self.delay_s = 0.0
        self.scope = trio.CancelScope()
        self.connections: set[_Connection] = set()
        self.accepted = 0
        self.refused = 0
        self.failed = 0
        self.forwarded = [0, 0]
        self.discarded = [0, 0]
        self.peak_buffered = 0

    def snapshot(self) -> LinkStats:
        return LinkStats(
            name=self.name,
            port=self.port,
            target=self.target,
            cut=self.cut,
            dropped=self.dropped,
            delay_ms=self.delay_s * 1000.0,
            open_connections=len(self.connections),
            accepted=self.accepted,
            refused=self.refused,
            failed=self.failed,
            bytes_up=self.forwarded[_UP],
            bytes_down=self.forwarded[_DOWN],
            dropped_up=self.discarded[_UP],
            dropped_down=self.discarded[_DOWN],
            buffered=sum(sum(conn.buffered) for conn in self.connections),
            held_ends=sum(c.fins_held + c.reset_pending for c in self.connections),
            peak_buffered=self.peak_buffered,
        )


async def _until_undropped(link: _Link) -> None:
    while link.dropped:  # a new drop may start before this task runs again
        await link.undropped.wait()


class _Connection:
    """One proxied connection: its two sockets and the scope that ends it."""

    def __init__(self, client: trio.SocketStream) -> None:
        self.client = client
        self.upstream: trio.SocketStream | None = None
        self.scope = trio.CancelScope()
        self.aborted = False
        self.ended = [False, False]  # reader of each direction saw FIN or RST
        self.reset_pending = False  # an RST arrived during a drop
        self.damaged = False  # bytes were discarded: the stream has a gap
        self.fins_held = 0  # writers holding a FIN until a drop is lifted
        self.buffered = [0, 0]

    def abort(self) -> None:
        """End the connection now; both sockets get an RST as the task unwinds."""
        self.aborted = True
        self.scope.cancel()


_Item = tuple[float, bytes] | None  # (deliver-at, chunk), or None for end of stream


class FaultProxy:
    """Named TCP links on loopback that forward bytes and inject faults on demand.

    Start it with ``await nursery.start(proxy.run)``; add links with
    :meth:`add` while it runs; cancel the nursery (or its scope) to close every
    listener and connection. See the module docstring for what each fault
    does on the wire.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        chunk_size: int = 65536,
        queue_chunks: int = 16,
        connect_timeout: float = 5.0,
        max_connections: int = 256,
    ) -> None:
        if chunk_size < 1 or queue_chunks < 1 or max_connections < 1:
            raise ProxyError("chunk_size, queue_chunks and max_connections must be at least 1")
        if not connect_timeout > 0:
            raise ProxyError("connect_timeout must be a positive number of seconds")
        self._host = host
        self._chunk_size = chunk_size
        self._queue_chunks = queue_chunks
        self._connect_timeout = connect_timeout
        self._max_connections = max_connections
        self._links: dict[str, _Link] = {}
        self._nursery: trio.Nursery | None = None
        self._started = False
        self._changed = trio.Event()

    # -- lifecycle ---------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve every link until cancelled; then every listener and connection is closed.

        A proxy runs once. Its links' stats stay readable after it ends.
        """
        if self._started:
            raise ProxyError("this FaultProxy has already run; make a new one")
        self._started = True
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    async def add(self, name: str, target: tuple[str, int]) -> int:
        """Open link ``name`` on ``127.0.0.1:0`` forwarding to ``target``; return its port."""
        if name in self._links:
            raise DuplicateLink(name)
        target = _check_target(target)
        if self._nursery is None:
            raise ProxyNotRunning("the proxy is not running: await nursery.start(proxy.run) first")
        link = _Link(name, target)
        self._links[name] = link
        try:
            port: int = await self._nursery.start(self._serve_link, link)
        except BaseException as exc:
            if self._links.get(name) is link:
                del self._links[name]
            if isinstance(exc, OSError):
                raise ProxyError(f"cannot listen for link {name!r} on {self._host}: {exc}") from exc
            raise
        return port

    def remove(self, name: str) -> None:
        """Close link ``name``: its listener and every connection (RST). The name is freed."""
        link = self._link(name)
        del self._links[name]
        link.scope.cancel()
        self._notify()

    # -- faults ------------------------------------------------------------

    def cut(self, name: str) -> None:
        """Reset every open connection of the link now; reset new ones until :meth:`heal`."""
        link = self._link(name)
        link.cut = True
        for conn in link.connections:
            conn.abort()
        self._notify()

    def heal(self, name: str) -> None:
        """Let new connections through link ``name`` again after :meth:`cut`."""
        self._link(name).cut = False
        self._notify()

    def cut_many(self, names: Iterable[str]) -> None:
        """Cut several links; all names are checked before any is cut."""
        for name in self._checked(names):
            self.cut(name)

    def heal_many(self, names: Iterable[str]) -> None:
        """Heal several links; all names are checked before any is healed."""
        for name in self._checked(names):
            self.heal(name)

    def delay(self, name: str, ms: float) -> None:
        """Delay every chunk read from now on by ``ms`` milliseconds, each direction."""
        link = self._link(name)
        if isinstance(ms, bool) or not isinstance(ms, int | float) or not math.isfinite(ms):
            raise ProxyError(f"bad delay {ms!r}: give a finite number of milliseconds")
        if ms < 0:
            raise ProxyError(f"bad delay {ms!r}: a delay cannot be negative")
        link.delay_s = ms / 1000.0
        self._notify()

    def drop(self, name: str, on: bool) -> None:
        """Black-hole link ``name`` (``on=True``): connections stay open, bytes vanish.

        Lifting it (``on=False``) resets the connections that lost bytes; the
        others carry on, and new connections work normally.
        """
        link = self._link(name)
        if on == link.dropped:
            return
        link.dropped = on
        if on:
            link.undropped = trio.Event()
        else:
            link.undropped.set()
            for conn in link.connections:
                if conn.damaged or conn.reset_pending:
                    conn.abort()
        self._notify()

    def set_target(self, name: str, target: tuple[str, int]) -> None:
        """Send future connections of link ``name`` to ``target``; open ones are kept."""
        link = self._link(name)
        link.target = _check_target(target)
        self._notify()

    # -- inspection --------------------------------------------------------

    def links(self) -> dict[str, int]:
        """Every link's name and listening port."""
        return {name: link.port for name, link in self._links.items()}

    def stats(self, name: str | None = None) -> dict[str, LinkStats]:
        """Snapshots of every link's counters, or of link ``name`` only."""
        if name is not None:
            return {name: self._link(name).snapshot()}
        return {n: link.snapshot() for n, link in self._links.items()}

    async def wait_for(
        self, name: str, predicate: Callable[[LinkStats], bool], *, timeout: float
    ) -> LinkStats:
        """Wait until ``predicate`` holds for link ``name``'s stats; return that snapshot.

        Woken by every change of any link (bytes, connections, settings), so it
        never polls. Raises :class:`ProxyTimeout` after ``timeout`` seconds.
        """
        with trio.move_on_after(timeout):
            while True:
                snap = self._link(name).snapshot()
                if predicate(snap):
                    return snap
                await self._changed.wait()
        raise ProxyTimeout(f"link {name!r}: condition not met within {timeout} s")

    # -- internals ---------------------------------------------------------

    def _link(self, name: str) -> _Link:
        try:
            return self._links[name]
        except KeyError:
            raise UnknownLink(name) from None

    def _checked(self, names: Iterable[str]) -> list[str]:
        names = list(names)
        for name in names:
            self._link(name)
        return names

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _serve_link(self, link: _Link, *, task_status: TaskStatus[int]) -> None:
        listeners = await trio.open_tcp_listeners(0, host=self._host)
        for extra in listeners[1:]:
            await extra.aclose()
        listener = listeners[0]
        async with listener:
            link.port = int(listener.socket.getsockname()[1])
            task_status.started(link.port)
            with link.scope:
                async with trio.open_nursery() as connections:
                    while True:
                        try:
                            client = await listener.accept()
                        except OSError as exc:
                            if exc.errno not in _ACCEPT_RESOURCE_ERRORS:
                                raise
                            logger.debug("link %s: accept failed: %s", link.name, exc)
                            await trio.sleep(_ACCEPT_BACKOFF_S)
                            continue
                        self._admit(link, client, connections)

    def _admit(self, link: _Link, client: trio.SocketStream, nursery: trio.Nursery) -> None:
        if link.cut or len(link.connections) >= self._max_connections:
            link.refused += 1
            _abort(client)
            self._notify()
            return
        conn = _Connection(client)
        link.connections.add(conn)
        link.accepted += 1
        self._notify()
        nursery.start_soon(self._serve_connection, link, conn)

    async def _serve_connection(self, link: _Link, conn: _Connection) -> None:
        target = link.target
        clean = False
        try:
            with conn.scope:
                try:
                    with trio.fail_after(self._connect_timeout):
                        conn.upstream = await trio.open_tcp_stream(*target)
                except (OSError, trio.TooSlowError) as exc:
                    link.failed += 1
                    logger.debug("link %s: cannot reach %s:%d: %r", link.name, *target, exc)
                    return
                self._notify()
                async with trio.open_nursery() as pumps:
                    for direction, src, dst in (
                        (_UP, conn.client, conn.upstream),
                        (_DOWN, conn.upstream, conn.client),
                    ):
                        send, recv = trio.open_memory_channel[_Item](self._queue_chunks)
                        pumps.start_soon(self._read, link, conn, direction, src, send)
                        pumps.start_soon(self._write, link, conn, direction, recv, dst)
                clean = not conn.aborted
        except Exception as exc:  # one connection's failure never reaches the link
            logger.debug("link %s: connection failed: %r", link.name, exc)
        finally:
            link.connections.discard(conn)
            if not clean:
                _abort(conn.client)
                _abort(conn.upstream)
            else:
                conn.client.socket.close()
                if conn.upstream is not None:
                    conn.upstream.socket.close()
            self._notify()

    async def _read(
        self,
        link: _Link,
        conn: _Connection,
        direction: int,
        src: trio.SocketStream,
        queue: trio.MemorySendChannel[_Item],
    ) -> None:
        async with queue:
            while True:
                try:
                    chunk = await src.receive_some(self._chunk_size)
                except trio.BrokenResourceError:
                    self._peer_gone(link, conn, direction, reset=True)
                    return
                if not chunk:
                    await queue.send(None)
                    self._peer_gone(link, conn, direction, reset=False)
                    return
                conn.buffered[direction] += len(chunk)
                link.peak_buffered = max(link.peak_buffered, conn.buffered[direction])
                self._notify()
                await queue.send((trio.current_time() + link.delay_s, chunk))

    def _peer_gone(self, link: _Link, conn: _Connection, direction: int, *, reset: bool) -> None:
        """One end sent FIN (``reset=False``) or RST on ``direction``'s source."""
        conn.ended[direction] = True
        if link.dropped:
            if reset:
                conn.reset_pending = True
                self._notify()
            if all(conn.ended):
                conn.abort()  # both ends gone during a drop: nobody is left to tell
        elif reset:
            conn.abort()

    async def _write(
        self,
        link: _Link,
        conn: _Connection,
        direction: int,
        queue: trio.MemoryReceiveChannel[_Item],
        dst: trio.SocketStream,
    ) -> None:
        async with queue:
            try:
                async for item in queue:
                    if item is None:
                        if link.dropped:
                            conn.fins_held += 1
                            self._notify()
                            await _until_undropped(link)
                            conn.fins_held -= 1
                        await dst.send_eof()
                        return
                    deliver_at, chunk = item
                    await trio.sleep_until(deliver_at)
                    if link.dropped:
                        link.discarded[direction] += len(chunk)
                        conn.damaged = True
                    else:
                        await dst.send_all(chunk)
                        link.forwarded[direction] += len(chunk)
                    conn.buffered[direction] -= len(chunk)
                    self._notify()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                logger.debug("link %s: send failed: %r", link.name, exc)
                conn.abort()
