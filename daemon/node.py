"""The node: the sans-I/O sync protocol driven over libp2p, its ops kept in SQLite.

Theory of operation. :class:`Node` owns, for one federation:

- the :class:`Store` (SQLite; its single writer task) and the replica loaded
  from it (snapshot plus the ops stored after it);
- the :class:`Transport` (py-libp2p behind our adapter), which hands us one
  authenticated, flow-controlled :class:`Channel` per connection;
- a :class:`SyncNode` (``protocol/``), fed by the channels and a timer task,
  whose actions (dial, transmit, hang up) the node carries out;
- LAN discovery (mDNS) and the bootstrap addresses, which feed peer selection.

Every input to the sync protocol happens on the trio thread, one at a time.
Each channel has a reader task (bytes in) and a writer task draining a
bounded queue (bytes out): a peer that reads too slowly to keep up is cut off
rather than buffered without bound. Ops applied from peers are written to the
store in batches; an op authored here is on disk before :meth:`Node.author`
returns and only then offered to peers, so a crash can never make this node
sign two different ops with one sequence number.

Connections: one per peer. When two appear (both ends dialled at once), the
one dialled by the peer with the smaller key is kept on both ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ifaddr
import trio

from archipel.crdt import Op, Replica, Value
from archipel.crdt.authority import DEVICE
from archipel.protocol.messages import PeerInfo
from archipel.protocol.node import Dial, Hangup, SyncNode, Transmit

from . import rpc
from .channel import Channel, ChannelClosed
from .config import Config, ConfigError
from .guard import SEND_QUEUE_BYTES, EquivocationWatch, PeerGuard, report, report_equivocation
from .identity import Identity
from .logs import fields
from .mdns import LanDiscovery, federation_tag
from .methods import Methods
from .paths import Home, NodeLock
from .storage import StorageError, Store
from .transport import (
    DialError,
    Transport,
    TransportConfig,
    peer_id_of,
    public_key_of,
)

if TYPE_CHECKING:
    # py-libp2p pulls in trio-typing, whose trio-stubs shadow trio's own annotations;
    # TaskStatus lives in trio_typing there.
    from trio_typing import TaskStatus

log = logging.getLogger("archipel.node")

SEND_QUEUE = 1024
"""Messages waiting for one peer; beyond this the peer is too slow and is cut off."""
WRITE_BATCH_BYTES = 64 * 1024
"""Messages queued for one peer go out in one channel write, up to about this many bytes."""
SHUTDOWN_GRACE_S = 30.0
ARRIVALS_KEPT = 10_000
"""Arrival stamps kept (the newest), for `events.poll`'s `received_ms`: about 2 MB."""
SYNC_PROGRESS_EVERY = 1_000


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


class _Sync(SyncNode):
    """The sync protocol, telling the node about every op it applies."""

    applied: list[Op]

    def _applied(self, op: Op, now_ms: int, *args: Any, **kwargs: Any) -> None:
        super()._applied(op, now_ms, *args, **kwargs)
        self.applied.append(op)


_HANGUP = object()


@dataclass(eq=False, slots=True)
class _Link:
    channel: Channel
    send: trio.MemorySendChannel[object]
    receive: trio.MemoryReceiveChannel[object]
    hung_up: bool = False
    queued: int = 0  # bytes in the send queue


@dataclass(slots=True)
class NodeStats:
    connections_refused: int = 0
    slow_peers_cut: int = 0
    ops_stored: int = 0
    started_ms: int = 0
    ready_ms: int = 0
    dials: int = 0
    dial_failures: int = 0
    errors: list[str] = field(default_factory=list)


class Node:
    """One running node of one federation."""

    def __init__(
        self,
        home: Home,
        config: Config,
        identity: Identity,
        *,
        clock_ms: Callable[[], int] = wall_ms,
        rng: random.Random | None = None,
    ) -> None:
        if not identity.joined:
            raise ValueError("this node belongs to no federation yet: init or join first")
        assert identity.federation is not None
        assert identity.secret is not None
        self.home = home
        self.config = config
        self.identity = identity
        self.federation = identity.federation
        offset = config.clock.offset_ms
        self.now_ms = clock_ms if not offset else (lambda: clock_ms() + offset)
        self._rng = rng if rng is not None else random.Random(os.urandom(16))  # noqa: S311 (peer sampling, not secrets)
        self.stats = NodeStats()
        self.ready = trio.Event()
        self.store: Store | None = None
        self.replica: Replica | None = None
        self.sync: _Sync | None = None
        self.transport = Transport(
            identity.device,
            identity.secret,
            self.is_allowed,
            TransportConfig(
                listen=config.network.listen,
                dial_timeout_s=config.network.dial_timeout_s,
                max_connections=config.network.max_connections,
            ),
        )
        self._links: dict[bytes, _Link] = {}
        self.guard = PeerGuard()
        self._equivocations = EquivocationWatch()
        self._dialling: set[bytes] = set()
        self._bootstrap_keys = {_key_of(a) for a in identity.bootstrap} - {None}
        self._pinned: dict[bytes, tuple[str, ...]] = {}
        for peer, addrs in config.network.peer_addresses:
            try:
                self._pinned[public_key_of(peer)] = addrs
            except Exception:
                raise ConfigError(f"network.peer_addresses: {peer!r} is not a peer id") from None
        self._wake = trio.Event()
        self._timer_at: int | None = None  # the deadline the timer task sleeps until
        self._authoring = trio.Lock()
        self._nursery: trio.Nursery | None = None
        self._net_scope: trio.CancelScope | None = None
        self._listeners: list[Callable[[Op], None]] = []
        self._progress = trio.lowlevel.ParkingLot()
        self._new_ops = trio.lowlevel.ParkingLot()
        self.offline = False
        self.arrivals: OrderedDict[bytes, int] = OrderedDict()
        """When (wall ms) each of the latest ops was applied here: for latency figures."""

    # -- public -------------------------------------------------------------

    @property
    def device(self) -> bytes:
        return self.identity.device_public

    @property
    def peer_id(self) -> str:
        return peer_id_of(self.device)

    @property
    def listen_addrs(self) -> tuple[str, ...]:
        return self.transport.listen_addrs

    def connected_peers(self) -> list[bytes]:
        return sorted(self._links)

    def on_op(self, listener: Callable[[Op], None]) -> None:
        """Call ``listener`` with every op this node applies (authored or received)."""
        self._listeners.append(listener)

    def is_allowed(self, key: bytes) -> bool:
        """May this device key connect? A device of a cell that is admitted
        (or being admitted) and not expelled, whose key is not revoked."""
        if key == self.device or self.offline or self.guard.banned(key, self.now_ms()):
            return False
        replica = self.replica
        if replica is None or replica.authority.federation is None:
            return key in self._bootstrap_keys
        authority = replica.authority
        grant = authority.grant(key)
        if grant is None or grant.role != DEVICE or authority.is_revoked(key):
            return False
        return not any(True for _ in authority.expulsions(grant.cell))

    async def author(self, kind: str, body: Mapping[str, Value], *, as_device: bool = False) -> Op:
        """Sign and check, store durably, apply, then spread a new op.

        Raises ``InvalidOp`` if the op is not allowed, ``StorageError`` if it
        could not be written (a full disk): either way nothing changed.
        """
        assert self.replica is not None
        assert self.store is not None
        assert self.sync is not None
        key = self.identity.device if as_device else self.identity.member
        async with self._authoring:
            # Stored before applied: an op that cannot be written (a full disk)
            # was never applied nor seen, and the next one reuses its place in
            # the author chain. Hence one op at a time.
            op = self.replica.prepare(key, kind, body, self.now_ms())
            self._stamp(op)  # before the await: an event reader may see the op once stored
            try:
                await self.store.append_local(op)
            except BaseException:
                self.arrivals.pop(op.id, None)
                raise
            self.replica.receive(op, self.now_ms())
        self.stats.ops_stored += 1
        self._notify(op)
        self.sync.publish(op, self.now_ms())
        await self._after()
        return op

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Return once ``condition()`` holds; it is looked at after every input the node handles."""
        while not condition():
            await self._progress.park()

    async def wait_for_ops(self) -> None:
        """Return once this node applies another op."""
        await self._new_ops.park()

    def set_offline(self, offline: bool) -> None:
        """Go dark (hang up on every peer, refuse and make no connection) or come back."""
        self.offline = offline
        if offline:
            for peer, link in list(self._links.items()):
                self._hang_up(peer, link)
                if self.sync is not None:
                    self.sync.connection_lost(peer, self.now_ms())
        elif self.sync is not None:
            self._bootstrap(self.sync)
        self._act()
        self._wake.set()
        self._progress.unpark_all()

    def stop(self) -> None:
        """Begin a clean shutdown (what SIGINT and SIGTERM do)."""
        if self._net_scope is not None:
            self._net_scope.cancel()

    # -- running ------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until :meth:`stop` or cancellation; ``started`` once listening and synced up."""
        self.stats.started_ms = self.now_ms()
        lock = NodeLock(self.home)
        lock.acquire()
        try:
            store = await trio.to_thread.run_sync(
                lambda: Store.open(self.home.database, snapshot_key=self.identity.snapshot_key())
            )
            try:
                self.store = store
                self.replica = await trio.to_thread.run_sync(
                    store.load_replica, self.federation, self.now_ms()
                )
                await self._run(store, task_status)
            finally:
                store.close()
        finally:
            lock.release()

    async def _run(self, store: Store, task_status: TaskStatus[None]) -> None:
        assert self.replica is not None
        async with trio.open_nursery() as outer:
            await outer.start(store.run)
            try:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    self._net_scope = nursery.cancel_scope
                    await nursery.start(self.transport.run, self._inbound)
                    me = PeerInfo(self.device, _concrete(self.transport.listen_addrs))
                    sync = _Sync(
                        self.replica, me, self._rng, self.now_ms(), is_allowed=self.is_allowed
                    )
                    sync.applied = []
                    self.sync = sync
                    self._bootstrap(sync)
                    for peer, addrs in await trio.to_thread.run_sync(store.load_peers):
                        sync.add_known([PeerInfo(peer, addrs)])
                    nursery.start_soon(self._timer)
                    await nursery.start(self._rpc)
                    if self.config.network.mdns:
                        nursery.start_soon(self._mdns, me.addrs)
                    await self._after()
                    self.stats.ready_ms = self.now_ms()
                    log.info(
                        "node ready",
                        **fields(
                            peer_id=self.peer_id,
                            listen=" ".join(self.listen_addrs),
                            ops=len(self.replica.graph),
                            startup_ms=self.stats.ready_ms - self.stats.started_ms,
                        ),
                    )
                    self.ready.set()
                    task_status.started()
            finally:
                with trio.move_on_after(SHUTDOWN_GRACE_S) as grace:
                    grace.shield = True
                    await self._shutdown(store)
                outer.cancel_scope.cancel()

    async def _shutdown(self, store: Store) -> None:
        for link in self._links.values():
            link.send.close()
        self._links.clear()
        # Each step on its own: a failure (a damaged disk) is logged and the
        # stop goes on; the ops on disk are the source of truth either way.
        try:
            if self.sync is not None:
                await self._persist()
                views = {**self.sync.peers.passive, **self.sync.peers.active}
                remembered = [(i.id, i.addrs) for i in views.values()][:256]
                await trio.to_thread.run_sync(store.save_peers, remembered)
            await store.flush()
        except StorageError as exc:
            log.error("stopping: ops or peers not saved", **fields(error=str(exc)))
        if self.replica is not None:
            try:
                await store.save_snapshot(self.replica)
            except StorageError as exc:
                log.error("stopping: snapshot not saved", **fields(error=str(exc)))
        log.info("node stopped", **fields(peer_id=self.peer_id))

    def _bootstrap(self, sync: SyncNode) -> None:
        infos = []
        for addr in (*self.config.network.bootstrap, *self.identity.bootstrap):
            key = _key_of(addr)
            if key is None:
                log.warning("bootstrap address without /p2p/<peer id> ignored", **fields(addr=addr))
                continue
            if key != self.device:
                infos.append(PeerInfo(key, (addr,)))
        pinned = [PeerInfo(k, a) for k, a in self._pinned.items() if k != self.device]
        if pinned:
            sync.add_known(pinned)
        infos = infos or pinned
        if infos:
            sync.add_known(infos)
            sync.join(infos[0], self.now_ms())

    async def _rpc(self, *, task_status: TaskStatus[None]) -> None:
        listeners: list[tuple[trio.SocketListener, str | None]] = [
            (await rpc.open_unix_listener(self.home.rpc_socket), None)
        ]
        port = self.config.rpc.tcp_port
        if port:
            token = rpc.load_or_create_token(self.home.rpc_token)
            tcp = await trio.open_tcp_listeners(port, host="127.0.0.1")
            listeners += [(listener, token) for listener in tcp]
        self.methods = Methods(self)
        try:
            await rpc.serve(listeners, self.methods.dispatch, task_status=task_status)
        finally:
            with contextlib.suppress(OSError):
                self.home.rpc_socket.unlink()

    async def _mdns(self, addrs: tuple[str, ...]) -> None:
        assert self.identity.secret is not None
        secret = self.identity.secret

        def found(peer: bytes, peer_addrs: tuple[str, ...]) -> None:
            if self.sync is not None and self.is_allowed(peer):
                self.sync.add_known([PeerInfo(peer, peer_addrs)])
                self._wake.set()

        try:
            # A node listening on loopback only advertises there only.
            local = all("/ip4/127." in a or "/ip6/::1/" in a for a in addrs)
            interfaces = ["127.0.0.1"] if local else None
            discovery = LanDiscovery(
                federation_tag(secret), self.device, addrs, interfaces=interfaces
            )
            await discovery.run(found)
        except Exception as exc:  # LAN discovery is a convenience: the node runs on without it
            log.warning("mDNS discovery stopped", **fields(error=repr(exc)))

    async def _timer(self) -> None:
        """Call the sync protocol's timer when its next deadline comes.

        Inputs move that deadline; they wake this task only when they bring it
        before the one it sleeps until (:meth:`_poke_timer`), and the deadline
        is looked at again after every wake-up."""
        sync = self.sync
        assert sync is not None
        while True:
            self._wake = trio.Event()
            deadline = self._timer_at = sync.next_deadline()
            if deadline is None:
                await self._wake.wait()
                continue
            delay = (deadline - self.now_ms()) / 1000
            if delay > 0:
                with trio.move_on_after(delay):
                    await self._wake.wait()
                continue
            self._timer_at = None  # running: no need to wake it
            sync.handle_timer(self.now_ms())
            await self._after()

    def _poke_timer(self) -> None:
        """Wake the timer task if the sync protocol's next deadline is now before
        the one it sleeps until (waking it on every input costs a task switch)."""
        sync = self.sync
        if sync is None or self._wake.is_set():
            return
        deadline = sync.next_deadline()
        sleeping_until = self._timer_at
        if deadline is not None and (sleeping_until is None or deadline < sleeping_until):
            self._wake.set()

    # -- connections --------------------------------------------------------

    async def _inbound(self, channel: Channel) -> None:
        await self._serve(channel)

    async def _dial(self, info: PeerInfo) -> None:
        sync = self.sync
        assert sync is not None
        self.stats.dials += 1
        try:
            channel = await self.transport.dial(self._pinned.get(info.id, info.addrs), info.id)
        except DialError as exc:
            self.stats.dial_failures += 1
            log.debug("dial failed", **fields(peer=peer_id_of(info.id), error=str(exc)))
            sync.connection_failed(info.id, self.now_ms())
            await self._after()
            return
        finally:
            self._dialling.discard(info.id)
        await self._serve(channel)

    def _adopt(self, channel: Channel) -> _Link | None:
        """Make ``channel`` the peer's connection, or refuse it as a duplicate."""
        sync = self.sync
        assert sync is not None
        peer, now = channel.peer, self.now_ms()
        current = self._links.get(peer)
        if current is not None:
            dialer = self.device if channel.initiator else peer
            if dialer != min(self.device, peer):
                if channel.initiator:
                    sync.connection_failed(peer, now)
                return None
            del self._links[peer]
            current.hung_up = True
            current.send.close()
            sync.connection_lost(peer, now)
        send, receive = trio.open_memory_channel[object](SEND_QUEUE)
        link = _Link(channel, send, receive)
        self._links[peer] = link
        sync.connection_made(peer, now, initiator=channel.initiator)
        return link

    async def _serve(self, channel: Channel) -> None:
        """Carry one channel until it closes."""
        sync = self.sync
        if sync is None:
            await channel.aclose()
            return
        link = self._adopt(channel)
        if link is None:
            await channel.aclose()
            await self._after()
            return
        log.info("connected", **fields(peer=peer_id_of(channel.peer), initiator=channel.initiator))
        await self._after()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, link, nursery.cancel_scope)
                try:
                    while True:
                        data = await channel.receive()
                        if link.hung_up:
                            break
                        try:
                            sync.data_received(channel.peer, data, self.now_ms())
                        except Exception as exc:  # our bug, not the peer's: drop only this peer
                            log.exception("sync failed on a peer's data: hanging up")
                            self.stats.errors.append(f"{type(exc).__name__}: {exc}"[:200])
                            del self.stats.errors[:-20]
                            break
                        await self._after()
                except ChannelClosed as closed:
                    if str(closed).startswith("protocol violation"):
                        self._strike(channel.peer, str(closed))
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await channel.aclose()
            if self._links.get(channel.peer) is link:
                del self._links[channel.peer]
                if not link.hung_up:
                    sync.connection_lost(channel.peer, self.now_ms())
                    self._after_nowait()
            log.info("disconnected", **fields(peer=peer_id_of(channel.peer)))

    async def _writer(self, link: _Link, scope: trio.CancelScope) -> None:
        """Write what is queued for the peer. The messages waiting behind the
        first go in the same channel write: each write costs a record, a Yamux
        frame, a Noise message and a system call, and several tasks steps,
        whatever its size."""
        try:
            async for item in link.receive:
                if item is _HANGUP:
                    break
                assert isinstance(item, bytes)
                data, hang_up = _queued_behind(link.receive, item)
                await link.channel.send(data)
                if hang_up:
                    break
                link.queued -= len(item)
        except ChannelClosed:
            pass
        await link.channel.aclose()
        scope.cancel()

    # -- actions ------------------------------------------------------------

    async def _after(self) -> None:
        """Carry out what the sync protocol asked for, store what it applied."""
        self._act()
        await self._persist()
        self._poke_timer()
        self._progress.unpark_all()

    def _after_nowait(self) -> None:
        self._act()
        self._poke_timer()
        self._progress.unpark_all()
        if self.sync is not None and self.sync.applied and self._nursery is not None:
            self._nursery.start_soon(self._persist)

    def _act(self) -> None:
        sync = self.sync
        if sync is None:
            return
        for action in sync.actions():
            if isinstance(action, Transmit):
                link = self._links.get(action.peer)
                if link is None or link.hung_up:
                    continue
                try:
                    if link.queued + len(action.data) > SEND_QUEUE_BYTES:
                        raise trio.WouldBlock
                    link.send.send_nowait(action.data)
                    link.queued += len(action.data)
                except trio.WouldBlock:
                    self.stats.slow_peers_cut += 1
                    log.warning("peer too slow: cut off", **fields(peer=peer_id_of(action.peer)))
                    self._hang_up(action.peer, link)
                    sync.connection_lost(action.peer, self.now_ms())
                except trio.ClosedResourceError:
                    continue
            elif isinstance(action, Hangup):
                if action.offence:
                    self._strike(action.peer, action.reason)
                link = self._links.get(action.peer)
                if link is not None:
                    log.debug("hang up", **fields(peer=peer_id_of(action.peer), why=action.reason))
                    self._hang_up(action.peer, link)
            elif isinstance(action, Dial):
                peer = action.peer.id
                busy = peer in self._links or peer in self._dialling
                if busy or self.offline or self._nursery is None:
                    sync.connection_failed(peer, self.now_ms())
                    continue
                self._dialling.add(peer)
                self._nursery.start_soon(self._dial, action.peer)

    def _strike(self, peer: bytes, why: str) -> None:
        """The peer misbehaved: count it against the peer (a ban after repeats)."""
        now = self.now_ms()
        report(self.guard.strike(peer, why, now), peer_id_of(peer), now)

    def _hang_up(self, peer: bytes, link: _Link) -> None:
        link.hung_up = True
        del self._links[peer]
        try:
            link.send.send_nowait(_HANGUP)
        except (trio.WouldBlock, trio.ClosedResourceError):
            link.send.close()
            if self._nursery is not None:
                self._nursery.start_soon(link.channel.aclose)

    async def _persist(self) -> None:
        sync, store = self.sync, self.store
        if sync is None or store is None or not sync.applied:
            return
        batch, sync.applied = sync.applied, []
        if self.replica is not None:
            report_equivocation(self._equivocations.new(self.replica.graph))
        for op in batch:
            self._notify(op)
        before = self.stats.ops_stored
        self.stats.ops_stored += len(batch)
        if self.stats.ops_stored // SYNC_PROGRESS_EVERY > before // SYNC_PROGRESS_EVERY:
            # progress of a catch-up (a first sync after joining, a long absence)
            assert self.replica is not None
            log.info("syncing", **fields(stored=self.stats.ops_stored, ops=len(self.replica.graph)))
        await store.append_remote(batch)

    def _stamp(self, op: Op) -> None:
        if op.id not in self.arrivals:
            self.arrivals[op.id] = self.now_ms()
            if len(self.arrivals) > ARRIVALS_KEPT:
                self.arrivals.popitem(last=False)

    def _notify(self, op: Op) -> None:
        self._stamp(op)
        self._new_ops.unpark_all()
        for listener in self._listeners:
            try:
                listener(op)
            except Exception:  # a listener's bug must not stop the node
                log.exception("op listener failed")


def _queued_behind(receive: trio.MemoryReceiveChannel[object], first: bytes) -> tuple[bytes, bool]:
    """``first`` and the messages queued behind it, up to WRITE_BATCH_BYTES, as
    one write; and whether a hang-up was queued right after them."""
    parts = [first]
    size = len(first)
    while size < WRITE_BATCH_BYTES:
        try:
            item = receive.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel):
            break
        if item is _HANGUP:
            return b"".join(parts), True
        assert isinstance(item, bytes)
        parts.append(item)
        size += len(item)
    return (first if len(parts) == 1 else b"".join(parts)), False


def _key_of(addr: str) -> bytes | None:
    """The device key named by a multiaddr's ``/p2p/<peer id>``, if any."""
    parts = addr.rstrip("/").split("/")
    if len(parts) < 3 or parts[-2] != "p2p":
        return None
    try:
        return public_key_of(parts[-1])
    except Exception:
        return None


def _concrete(addrs: tuple[str, ...]) -> tuple[str, ...]:
    """Listen addresses as others can dial them: 0.0.0.0 becomes each local IPv4 address."""
    out: list[str] = []
    for addr in addrs:
        if "/ip4/0.0.0.0/" not in addr:
            out.append(addr)
            continue
        for ip in _local_ipv4():
            out.append(addr.replace("/ip4/0.0.0.0/", f"/ip4/{ip}/"))
    return tuple(dict.fromkeys(out))


def _local_ipv4() -> list[str]:
    ips = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str):
                ips.append(ip.ip)
    return sorted(ips, key=lambda ip: (ip.startswith("127."), ip)) or ["127.0.0.1"]
