"""The node's storage: one SQLite file holding the ops, the state snapshot and known peers.

Theory of operation. The ops are the source of truth: the ``ops`` table is
the node's write-ahead log, every op the replica applied, in the order they
were stored (the *cursor*, SQLite's rowid). The record state is a
materialised view of it: a snapshot of the replica (:mod:`.snapshot`) written
with the cursor it covers. Start-up loads the snapshot and replays only the
ops stored after its cursor; with no usable snapshot (none, another format, a
bad MAC) it replays every op. Nothing else is derived, so nothing else can
disagree with the ops.

Durability. SQLite in WAL mode with ``synchronous=FULL``: every commit
fsyncs the WAL before it returns, so a committed transaction survives a crash
of the process or of the machine. (``NORMAL``, the usual WAL setting, syncs
the WAL only at checkpoints: a power cut can lose the last commits. FULL is
the weakest setting that makes each commit durable; ``EXTRA`` only adds a
directory sync that matters for rollback journals, not for WAL.)

One writer. Every write to the ``ops`` table goes through one trio task,
:meth:`Store.run`, fed by a bounded channel. It takes everything queued (up
to a batch bound) and commits it as one transaction in one hop to a worker
thread, so the event loop only ever queues and wakes. Ops authored here
(:meth:`Store.append_local`) return once their transaction is committed and
fsynced; concurrent calls share one transaction (group commit). Ops from
peers (:meth:`Store.append_remote`) are queued and written in the same
batches; when the queue is full, callers wait (backpressure). A duplicate op
(same id) is ignored. The write connection is also used, under the same
lock, by the few other writers (snapshot, peers, start-up repair).

A full disk. A write that fails because the disk (or the user's quota) is
full raises :class:`DiskFull`, and the store says it is full
(:meth:`Store.status`) until a write succeeds. An op authored here is then
refused (``append_local`` raises; the daemon applied nothing). Ops from peers
in a failed transaction are *retained* (references: the replica holds them
anyway), up to :data:`MAX_RETAINED_OPS`, and written before anything else by
the next transaction that succeeds: the writer retries on a backoff
(:data:`RETRY_FIRST_S` doubling up to :data:`RETRY_MAX_S`), so they are
written when space returns even if nothing new comes. Ops beyond the cap are
not retained (logged): the replica holds them, the log does not; a snapshot
saved later writes them back at the next start, else peers send them again.
Reads go on as before. A snapshot or the peers that cannot be saved on a full
disk are logged and skipped, the previous ones stay valid.

What the daemon must do: append every op the replica applies, in the order
it applied them, and nothing it did not apply; call :meth:`load_replica`
before :meth:`run`; run :meth:`run` once; call :meth:`close` after it returned.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Final

import trio

from archipel.crdt import ArchipelError, CapacityError, InvalidOp, Op, Replica, decode_op, op_id

from . import snapshot
from .logs import fields
from .snapshot import SnapshotError

if TYPE_CHECKING:
    # py-libp2p pulls in trio-typing, whose trio-stubs shadow trio's own annotations;
    # TaskStatus lives in trio_typing there.
    from trio_typing import TaskStatus

log = logging.getLogger("archipel.storage")

SCHEMA_VERSION: Final = 2
APPLICATION_ID: Final = 0x41524348  # "ARCH" in the SQLite header: this file is ours
MAX_BATCH_OPS = 4096  # ops per transaction
MAX_ITEM_OPS = 256  # ops per queued item (append_remote splits larger batches)
QUEUE_ITEMS = 16  # queued items (<= 4096 ops) before append_remote / append_local wait
MAX_OPS_SINCE = 10_000
SNAPSHOT_CHUNK_BYTES = 4 * 1024 * 1024  # SQLite refuses blobs over 1e9 bytes: store chunks
REPLAY_FETCH = 4096
MAX_PEERS = 4096
MAX_PEER_ADDRS = 32
MAX_ADDR_CHARS = 512
BUSY_TIMEOUT_S = 30.0
MAX_RETAINED_OPS = 65_536  # peers' ops kept for a retry after a failed write (16 batches)
RETRY_FIRST_S = 1.0  # first retry of retained ops after a failed write; doubles each time
RETRY_MAX_S = 16.0
SPACE_PROBE_BYTES = 64 * 1024  # after an I/O error: can this much still be allocated there?
_SQLITE_MAGIC = b"SQLite format 3\x00"
_FULL_ERRNOS = frozenset(
    code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if code is not None
)


class StorageError(ArchipelError):
    """The database cannot be opened, read or written: damaged, not ours, full
    disk, closed store. The message says which, and what to do."""


class DiskFull(StorageError):
    """A write failed because the disk holding the database (or the user's
    quota there) is full. That write changed nothing: free space on that disk."""


class SchemaTooNew(StorageError):
    """The database was written by a newer Archipel (a newer schema). It was
    left unchanged: run that version, or restore a backup made for this one."""


@dataclass(frozen=True, slots=True)
class Migration:
    """One step of the schema: from ``version - 1`` to ``version``."""

    version: int
    summary: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "ops log and meta",
        (
            f"PRAGMA application_id = {APPLICATION_ID}",
            "CREATE TABLE meta (name TEXT PRIMARY KEY, value NOT NULL)",
            "CREATE TABLE ops (cursor INTEGER PRIMARY KEY, id BLOB NOT NULL UNIQUE,"
            " data BLOB NOT NULL)",
        ),
    ),
    Migration(
        2,
        "state snapshot and remembered peers",
        (
            "CREATE TABLE snapshot (slot INTEGER PRIMARY KEY CHECK (slot = 0),"
            " format TEXT NOT NULL, cursor INTEGER NOT NULL, size INTEGER NOT NULL,"
            " mac BLOB NOT NULL, created_ms INTEGER NOT NULL)",
            "CREATE TABLE snapshot_chunk (seq INTEGER PRIMARY KEY, data BLOB NOT NULL)",
            "CREATE TABLE peers (position INTEGER PRIMARY KEY, peer BLOB NOT NULL UNIQUE,"
            " addrs TEXT NOT NULL)",
        ),
    ),
)
assert [m.version for m in MIGRATIONS] == list(range(1, SCHEMA_VERSION + 1))


@dataclass(slots=True)
class StoreStats:
    """Counters of the writer, for logs, tests and benchmarks."""

    transactions: int = 0  # committed write transactions of ops
    ops_written: int = 0  # ops inserted (duplicates not counted)
    duplicates: int = 0
    failed_transactions: int = 0
    snapshots: int = 0
    snapshot_bytes: int = 0
    snapshot_serialise_s: float = 0.0  # time the last save_snapshot held the event loop
    snapshot_write_s: float = 0.0  # time the last snapshot took in the writer's thread
    disk_full_errors: int = 0  # writes of any kind refused for lack of space
    retries: int = 0  # attempts to write retained ops
    ops_retained: int = 0  # peers' ops kept after a failed write (written later or dropped)
    ops_dropped: int = 0  # peers' ops not kept for a retry: over MAX_RETAINED_OPS
    snapshots_failed: int = 0  # snapshots not saved for lack of space


@dataclass(frozen=True, slots=True)
class StorageStatus:
    """What :meth:`Store.status` tells: whether the disk is full and what waits for it."""

    disk_full: bool  # the last write failed for lack of space (cleared by the next that succeeds)
    full_since_ms: int | None  # wall ms of the first failure of this episode
    retained_ops: int  # peers' ops applied in memory, waiting to be written
    dropped_ops: int  # peers' ops over the cap, never written (since start)
    stored_ops: int  # ops committed to the database
    last_error: str  # the last write error, or ""


@dataclass(slots=True)
class LoadReport:
    """How :meth:`Store.load_replica` built the replica, and how long each step took."""

    source: str = "rebuild"  # "snapshot" or "rebuild"
    reason: str = ""  # why the snapshot was not used
    snapshot_cursor: int = 0
    snapshot_bytes: int = 0
    replayed: int = 0  # ops replayed after the snapshot (or all of them)
    refused: int = 0  # stored ops the replica refused on replay (logged)
    pending: int = 0  # ops still waiting for missing deps after replay
    repaired: int = 0  # ops the snapshot held that the log lacked, written back
    read_s: float = 0.0
    mac_s: float = 0.0
    unpickle_s: float = 0.0
    replay_s: float = 0.0
    total_s: float = 0.0


@dataclass(slots=True)
class _Ticket:
    """A caller waiting for its item to be committed."""

    done: trio.Event = field(default_factory=trio.Event)
    cursor: int = 0
    error: StorageError | None = None


@dataclass(frozen=True, slots=True)
class _Item:
    ops: tuple[Op, ...]
    ticket: _Ticket | None


class Store:
    """One node's database. Build it with :meth:`open`."""

    def __init__(self, path: Path, key: bytes, write: sqlite3.Connection) -> None:
        self.path = path
        self._key = key
        self._write = write
        self._write_lock = threading.Lock()
        self._read = _connect(path, query_only=True)
        self._read_lock = threading.Lock()
        self._send, self._receive = trio.open_memory_channel[_Item](QUEUE_ITEMS)
        self._closed = False
        self._started = False
        self._stopped = False
        self.stats = StoreStats()
        self.last_load: LoadReport | None = None
        # Peers' ops whose transaction failed, in the order they came: written
        # first by the next transaction. Only the writer task touches them
        # (and load_replica's repair, before the writer runs).
        self._retained: list[Op] = []
        self._retry_s = 0.0
        self._retry_at: float | None = None  # trio time of the next retry; None: at once
        self._dropping = False
        self._full = False
        self._full_since_ms: int | None = None
        self._last_error = ""
        self._written_lot = trio.lowlevel.ParkingLot()
        try:
            with _errors("reading the ops log", path):
                row = write.execute("SELECT coalesce(max(cursor), 0) FROM ops").fetchone()
        except StorageError:
            self._read.close()
            raise
        # Ops are never deleted and a cursor is the next rowid, so cursors run
        # 1..n without gaps: the last one is the count (count(*) reads the
        # whole index: most of a second per million ops).
        self._count: int = row[0]
        self._last_cursor: int = row[0]

    # -- opening ------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path, *, snapshot_key: bytes) -> Store:
        """Open the database at ``path``, creating or migrating it.

        Raises :class:`SchemaTooNew` (the file is left unchanged) or
        :class:`StorageError`. Blocking: call it before trio work begins or
        through ``trio.to_thread``.
        """
        if len(snapshot_key) < snapshot.MIN_KEY_BYTES:
            raise StorageError(f"the snapshot key must be at least {snapshot.MIN_KEY_BYTES} bytes")
        path = Path(path)
        created = _create_file(path)
        conn = _connect(path)
        try:
            _prepare(conn, path)
            return cls(path, bytes(snapshot_key), conn)
        except BaseException:
            conn.close()
            if created:
                for suffix in ("", "-wal", "-shm"):
                    with contextlib.suppress(OSError):
                        Path(f"{path}{suffix}").unlink()
            raise

    def close(self) -> None:
        """Close the database (after :meth:`run` has returned). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._receive.close()
        with self._write_lock:
            self._write.close()
        with self._read_lock:
            self._read.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- reading ------------------------------------------------------------------

    def stored_count(self) -> int:
        """How many ops are committed to the database."""
        return self._count

    @property
    def disk_full(self) -> bool:
        """Whether the last write failed for lack of space (until one succeeds)."""
        return self._full

    def retained_count(self) -> int:
        """How many peers' ops wait, in memory, to be written after a failed write."""
        return len(self._retained)

    def status(self) -> StorageStatus:
        """Whether the disk is full, and what waits for space (for ``node.status``)."""
        return StorageStatus(
            disk_full=self._full,
            full_since_ms=self._full_since_ms,
            retained_ops=len(self._retained),
            dropped_ops=self.stats.ops_dropped,
            stored_ops=self._count,
            last_error=self._last_error,
        )

    async def next_write(self) -> None:
        """Return once the writer has handled its next batch (committed it, or
        failed, or retained it) or retried: for waiting on a condition, e.g.
        ``while store.retained_count(): await store.next_write()``."""
        await self._written_lot.park()

    def has(self, op_id: bytes) -> bool:
        """Whether an op with this id is committed to the database."""
        with self._reading("looking up an op") as conn:
            return conn.execute("SELECT 1 FROM ops WHERE id = ?", (op_id,)).fetchone() is not None

    def ops_since(self, cursor: int, limit: int) -> list[tuple[int, bytes]]:
        """Up to ``limit`` (capped at :data:`MAX_OPS_SINCE`) committed ops stored
        after ``cursor``, as ``(cursor, op bytes)`` in storage order. Blocking:
        the daemon calls it through ``trio.to_thread``."""
        if not isinstance(cursor, int) or cursor < 0:
            raise StorageError(f"a cursor is an integer from 0, not {cursor!r}")
        if not isinstance(limit, int) or limit < 1:
            raise StorageError(f"a limit is a positive integer, not {limit!r}")
        with self._reading("reading ops") as conn:
            rows = conn.execute(
                "SELECT cursor, data FROM ops WHERE cursor > ? ORDER BY cursor LIMIT ?",
                (cursor, min(limit, MAX_OPS_SINCE)),
            ).fetchall()
        return [(c, bytes(d)) for c, d in rows]

    def load_peers(self) -> list[tuple[bytes, tuple[str, ...]]]:
        """The peers remembered by :meth:`save_peers`, in the order they were given."""
        with self._reading("reading peers") as conn:
            rows = conn.execute("SELECT peer, addrs FROM peers ORDER BY position").fetchall()
        peers = []
        for peer, addrs in rows:
            try:
                decoded = json.loads(addrs)
            except ValueError:
                continue
            if isinstance(decoded, list) and all(isinstance(a, str) for a in decoded):
                peers.append((bytes(peer), tuple(decoded)))
        return peers

    def save_peers(self, peers: Sequence[tuple[bytes, tuple[str, ...]]]) -> bool:
        """Remember these peers (key, multiaddrs), replacing those remembered
        before. On a full disk nothing changes and it returns False (logged):
        remembered peers are a convenience."""
        rows = _peer_rows(peers)
        try:
            with self._writing("saving peers") as conn:
                conn.execute("DELETE FROM peers")
                conn.executemany("INSERT INTO peers (position, peer, addrs) VALUES (?, ?, ?)", rows)
        except DiskFull as exc:
            log.warning("peers not saved: the previous list stays", **fields(error=str(exc)))
            return False
        return True

    # -- loading the replica ------------------------------------------------------

    def load_replica(
        self, federation: bytes, now_ms: int, *, verify: bool = False, freeze_gc: bool = True
    ) -> Replica:
        """The replica: the newest valid snapshot plus the ops stored after it,
        or every op replayed if there is no usable snapshot (logged, with why).

        Stored ops are this node's own log of ops it checked before storing:
        they are decoded and their bytes checked against their id, but their
        signatures are checked again only with ``verify`` (slow: ~80 µs/op).
        ``freeze_gc`` moves everything loaded out of the garbage collector's
        reach (``gc.freeze``): a full collection would otherwise walk every op
        of the replica, a pause of 2 to 4 s per million ops. Blocking: call
        it before :meth:`run`, through ``trio.to_thread``.
        """
        started = time.perf_counter()
        report = LoadReport()
        self._check_federation(federation)
        replica: Replica | None = None
        # The collector stays off until everything is loaded, then the heap is
        # frozen: re-enabling it in between would make the next allocation
        # walk every object just loaded (seconds per million ops), for no garbage.
        enabled = gc.isenabled()
        gc.disable()
        try:
            try:
                replica = self._load_snapshot(federation, report)
                report.source = "snapshot"
            except SnapshotError as exc:
                report.reason = str(exc)
            if replica is None:
                replica = Replica(federation)
                report.snapshot_cursor = 0
            self._replay(replica, report, now_ms, verify=verify)
            self._repair(replica, report)
        finally:
            if freeze_gc:
                gc.freeze()
            if enabled:
                gc.enable()
        report.total_s = time.perf_counter() - started
        self.last_load = report
        level = logging.INFO if report.source == "snapshot" or not self._count else logging.WARNING
        log.log(
            level,
            "replica loaded" if report.source == "snapshot" else "replica rebuilt from the ops",
            **fields(
                source=report.source,
                reason=report.reason,
                ops=len(replica.graph),
                replayed=report.replayed,
                refused=report.refused,
                pending=report.pending,
                repaired=report.repaired,
                seconds=round(report.total_s, 3),
            ),
        )
        return replica

    def _check_federation(self, federation: bytes) -> None:
        with self._writing("checking the federation") as conn:
            row = conn.execute("SELECT value FROM meta WHERE name = 'federation'").fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO meta (name, value) VALUES ('federation', ?)", (federation,)
                )
            elif bytes(row[0]) != federation:
                raise StorageError(
                    f"this database holds federation {bytes(row[0]).hex()[:16]}, not"
                    f" {federation.hex()[:16]}: use the node's own home directory"
                )

    def _load_snapshot(self, federation: bytes, report: LoadReport) -> Replica:
        started = time.perf_counter()
        with self._reading("reading the snapshot") as conn:
            row = conn.execute("SELECT format, cursor, size, mac FROM snapshot").fetchone()
            if row is None:
                raise SnapshotError("there is no snapshot")
            tag, cursor, size, expected = row
            if tag != snapshot.format_tag():
                raise SnapshotError(f"the snapshot was written by another version ({tag})")
            if cursor > self._last_cursor:
                raise SnapshotError(
                    f"the snapshot covers ops up to {cursor}, the log ends at {self._last_cursor}"
                )
            chunks = [c for (c,) in conn.execute("SELECT data FROM snapshot_chunk ORDER BY seq")]
        report.read_s = time.perf_counter() - started
        length = sum(len(c) for c in chunks)
        if length != size:
            raise SnapshotError(f"the snapshot is {length} bytes, it was written as {size}")
        started = time.perf_counter()
        snapshot.check_mac(self._key, tag, cursor, chunks, bytes(expected))
        report.mac_s = time.perf_counter() - started
        started = time.perf_counter()
        replica = snapshot.load(chunks)
        del chunks
        report.unpickle_s = time.perf_counter() - started
        if replica.federation != federation:
            raise SnapshotError("the snapshot is of another federation")
        report.snapshot_cursor = cursor
        report.snapshot_bytes = size
        return replica

    def _replay(self, replica: Replica, report: LoadReport, now_ms: int, *, verify: bool) -> None:
        """Feed the replica every op stored after the snapshot's cursor, in storage order."""
        started = time.perf_counter()
        for cursor, stored_id, data in self._stored_after(report.snapshot_cursor):
            ident = op_id(data)
            if ident != stored_id:
                raise StorageError(
                    f"the op stored at cursor {cursor} does not match its id: the"
                    " database is damaged (restore a backup, or move it aside and let"
                    " the node fetch the ops again from its peers)"
                )
            try:
                op = decode_op(data, expected_id=ident) if verify else _stored_op(data, ident)
                replica.receive(op, now_ms)
            except (InvalidOp, CapacityError) as exc:
                report.refused += 1
                log.warning("stored op refused on replay", **fields(cursor=cursor, reason=str(exc)))
            report.replayed += 1
        report.pending = replica.graph.pending_count()
        report.replay_s = time.perf_counter() - started

    def _stored_after(self, cursor: int) -> Iterator[tuple[int, bytes, bytes]]:
        while True:
            with self._reading("replaying the ops") as conn:
                rows = conn.execute(
                    "SELECT cursor, id, data FROM ops WHERE cursor > ? ORDER BY cursor LIMIT ?",
                    (cursor, REPLAY_FETCH),
                ).fetchall()
            yield from rows
            if len(rows) < REPLAY_FETCH:
                return
            cursor = rows[-1][0]

    def _repair(self, replica: Replica, report: LoadReport) -> None:
        """Write back applied ops the snapshot holds but the log lacks.

        A snapshot taken while ops were still queued holds them; if the node
        died before they were committed, the view would hold ops the log
        lacks. Counting tells (every stored op is in the replica after the
        replay); only then are the ids compared.
        """
        if len(replica.graph) <= self._count:
            return
        with self._reading("comparing the snapshot with the log") as conn:
            stored = {bytes(i) for (i,) in conn.execute("SELECT id FROM ops")}
        missing = [op for op in replica.graph.topological() if op.id not in stored]
        if missing:
            try:
                inserted, last = self._insert_ops(missing)
            except DiskFull as exc:
                # The replica holds them: the writer writes them once there is room.
                self._retain(missing)
                log.warning(
                    "ops of the snapshot missing from the log kept for the writer",
                    **fields(ops=len(missing), error=str(exc)),
                )
                return
            self._count += inserted
            self._last_cursor = max(self._last_cursor, last)
            report.repaired = inserted
            log.warning(
                "ops of the snapshot missing from the log written back", **fields(ops=inserted)
            )

    # -- the writer ---------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The single writer: commit what is queued, batch by batch, until
        cancelled; then commit what is still queued and return. While ops are
        retained after a failed write, it also wakes on its retry timer."""
        if self._started:
            raise StorageError("the store's writer runs once")
        self._started = True
        task_status.started()
        try:
            while True:
                batch: list[_Item] = []
                with trio.move_on_after(self._until_retry()):
                    try:
                        batch.append(await self._receive.receive())
                    except trio.ClosedResourceError:  # close() was called: nothing more to write
                        return
                self._take_queued(batch)
                with trio.CancelScope(shield=True):  # a batch taken is a batch written
                    await self._commit(batch)
        finally:
            with trio.CancelScope(shield=True):
                await self._drain()

    def write_now(self, ops: Sequence[Op]) -> int:
        """Store ``ops`` in one fsynced transaction, from the calling thread: for
        setting a node up before it runs (``archipel init``, tests, benchmarks),
        never while the writer task runs. Returns how many were new."""
        if self._started:
            raise StorageError("write_now() is for a store whose writer is not running")
        inserted, _ = self._insert_ops(list(ops))
        return inserted

    async def append_local(self, op: Op) -> int:
        """Store an op authored here; return its cursor once it is committed and
        fsynced. Raises :class:`DiskFull` if the disk is full, :class:`StorageError`
        if it could not be written for another reason: either way it is not stored."""
        ticket = _Ticket()
        await self._enqueue(_Item((op,), ticket))
        await ticket.done.wait()
        if ticket.error is not None:
            raise ticket.error
        return ticket.cursor

    async def append_remote(self, ops: Sequence[Op]) -> None:
        """Queue ops received from peers; they are written in batches. Waits
        while the queue is full. If their transaction fails (a full disk), they
        are retained and written later (see :data:`MAX_RETAINED_OPS`)."""
        for start in range(0, len(ops), MAX_ITEM_OPS):
            await self._enqueue(_Item(tuple(ops[start : start + MAX_ITEM_OPS]), None))

    async def flush(self) -> None:
        """Return once everything queued before the call is committed, or
        retained for a retry after a failed write (:meth:`retained_count`)."""
        ticket = _Ticket()
        try:
            await self._enqueue(_Item((), ticket))
        except StorageError:
            if self._stopped:  # the writer committed everything queued as it stopped
                return
            raise
        await ticket.done.wait()

    async def save_snapshot(self, replica: Replica) -> bool:
        """Write a snapshot of ``replica`` covering every op committed so far.

        Serialising runs on the calling (trio) thread, since the replica must
        not change meanwhile: it holds the event loop about 15 µs per op (15 to
        17 s for a million ops, see docs/storage.md). Writing runs in the
        writer's thread. On a full disk nothing is written and it returns
        False (logged): the previous snapshot stays valid, and the ops, the
        source of truth, are all there is to replay.
        """
        await self.flush()
        started = time.perf_counter()
        pieces = snapshot.dump(replica)
        cursor = self._last_cursor  # every op up to here is in the replica
        self.stats.snapshot_serialise_s = time.perf_counter() - started
        try:
            await trio.to_thread.run_sync(self._write_snapshot, pieces, cursor)
        except DiskFull as exc:
            self.stats.snapshots_failed += 1
            log.error("snapshot not saved: the previous one stays valid", **fields(error=str(exc)))
            return False
        return True

    async def _enqueue(self, item: _Item) -> None:
        if self._closed:
            raise StorageError("the store is closed")
        try:
            await self._send.send(item)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise StorageError("the store's writer has stopped: nothing more is written") from None

    def _take_queued(self, batch: list[_Item]) -> None:
        count = sum(len(item.ops) for item in batch)
        while count < MAX_BATCH_OPS:
            try:
                item = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.ClosedResourceError):
                return
            batch.append(item)
            count += len(item.ops)

    def _until_retry(self) -> float:
        """Seconds until the writer retries the retained ops (inf: none retained)."""
        if not self._retained:
            return math.inf
        if self._retry_at is None:
            return 0.0
        return max(0.0, self._retry_at - trio.current_time())

    async def _commit(self, batch: list[_Item], *, force: bool = False) -> None:
        """Write ``batch``, after the retained ops if any. Peers' ops of a failed
        transaction are retained; ops authored here fail with its error."""
        try:
            await self._write_items(batch, force=force)
        finally:
            self._written_lot.unpark_all()

    async def _write_items(self, batch: list[_Item], *, force: bool) -> None:
        if self._retained:
            local = any(item.ticket is not None and item.ops for item in batch)
            due = self._retry_at is None or trio.current_time() >= self._retry_at
            if not (local or due or force):
                # The last write failed moments ago: queue up behind, without a try.
                self._settle_failed(batch, None)
                return
            error = await self._write_retained()
            if error is not None:
                self._settle_failed(batch, error)
                return
        ops: list[Op] = []
        locals_: list[int] = []  # indices in batch of the items of append_local
        offsets: list[int] = []  # and of their op in ops
        for i, item in enumerate(batch):
            if item.ticket is not None and item.ops:
                locals_.append(i)
                offsets.append(len(ops))
            ops.extend(item.ops)
        if ops:
            try:
                inserted, last, cursors = await trio.to_thread.run_sync(
                    self._write_batch, ops, offsets
                )
            except StorageError as exc:
                self._settle_failed(batch, exc)
                self._failed(len(ops), exc)
                return
            self._written(len(ops), inserted, last)
            for i, cursor in zip(locals_, cursors, strict=True):
                ticket = batch[i].ticket
                assert ticket is not None
                ticket.cursor = cursor
        for item in batch:
            if item.ticket is not None:
                item.ticket.done.set()

    async def _write_retained(self) -> StorageError | None:
        """Write the retained ops, in order, a batch per transaction; the error
        of the first transaction that fails (the rest stay retained), or None."""
        total = len(self._retained)
        while self._retained:  # bounded: MAX_RETAINED_OPS / MAX_BATCH_OPS rounds
            chunk = self._retained[:MAX_BATCH_OPS]
            self.stats.retries += 1
            try:
                inserted, last, _ = await trio.to_thread.run_sync(self._write_batch, chunk, [])
            except StorageError as exc:
                self._failed(len(chunk), exc)
                return exc
            del self._retained[: len(chunk)]
            self._written(len(chunk), inserted, last)
        log.warning("ops kept after a failed write are now stored", **fields(ops=total))
        self._dropping = False
        return None

    def _settle_failed(self, batch: list[_Item], error: StorageError | None) -> None:
        """After a failed write (or none tried, ``error`` None, while retained ops
        wait): peers' ops join the retained ones, callers are told."""
        for item in batch:
            if item.ticket is None:
                self._retain(item.ops)
                continue
            if item.ops:
                assert error is not None  # an op authored here always gets a try
                item.ticket.error = error
            item.ticket.done.set()

    def _retain(self, ops: Sequence[Op]) -> None:
        room = MAX_RETAINED_OPS - len(self._retained)
        kept = ops[: max(room, 0)]
        self._retained.extend(kept)
        self.stats.ops_retained += len(kept)
        dropped = len(ops) - len(kept)
        if dropped:
            self.stats.ops_dropped += dropped
            if not self._dropping:
                self._dropping = True
                log.error(
                    "ops from peers not kept for a retry: over the cap; the replica holds"
                    " them, the log does not: a snapshot saved later writes them back at"
                    " the next start, else peers send them again after a restart",
                    **fields(cap=MAX_RETAINED_OPS, dropped=dropped),
                )

    def _failed(self, count: int, exc: StorageError) -> None:
        """A transaction of ``count`` ops failed: back off the next retry."""
        self.stats.failed_transactions += 1
        self._retry_s = min(max(2 * self._retry_s, RETRY_FIRST_S), RETRY_MAX_S)
        self._retry_at = trio.current_time() + self._retry_s
        log.error(
            "ops not stored",
            **fields(
                ops=count,
                retained=len(self._retained),
                retry_s=self._retry_s,
                disk_full=isinstance(exc, DiskFull),
                error=str(exc),
            ),
        )

    def _written(self, count: int, inserted: int, last: int) -> None:
        """A transaction of ``count`` ops committed."""
        self._count += inserted
        self._last_cursor = max(self._last_cursor, last)
        self.stats.transactions += 1
        self.stats.ops_written += inserted
        self.stats.duplicates += count - inserted
        if not self._retained:
            self._retry_s = 0.0
            self._retry_at = None

    async def _drain(self) -> None:
        """Commit what is still queued (retained ops first: one last try), then
        refuse more (bounded: a task that keeps queueing while the store stops
        cannot hold it open)."""
        for round_ in range(QUEUE_ITEMS + 1):
            batch: list[_Item] = []
            self._take_queued(batch)
            if not batch and (round_ or not self._retained):
                break
            await self._commit(batch, force=round_ == 0)
        if self._retained:
            log.error(
                "ops from peers not stored as the store stopped: the replica held them;"
                " a snapshot saved before writes them back at the next start, else peers"
                " send them again",
                **fields(ops=len(self._retained)),
            )
        self._stopped = True
        leftovers: list[_Item] = []
        self._take_queued(leftovers)
        self._receive.close()
        stopped = StorageError("the store stopped before this op was written")
        for item in leftovers:
            if item.ticket is not None:
                item.ticket.error = stopped
                item.ticket.done.set()

    # -- in the writer's thread ---------------------------------------------------

    def _write_batch(self, ops: list[Op], wanted: list[int]) -> tuple[int, int, list[int]]:
        """Insert ``ops`` in one transaction. Returns (inserted, last cursor,
        the cursor of each op whose index is in ``wanted``)."""
        want = set(wanted)
        cursors: dict[int, int] = {}
        with self._writing("storing ops") as conn:
            before = conn.total_changes
            insert = "INSERT OR IGNORE INTO ops (id, data) VALUES (?, ?)"
            start = 0
            for index in sorted(want):
                if index > start:
                    conn.executemany(insert, [(o.id, o.data) for o in ops[start:index]])
                op = ops[index]
                cur = conn.execute(insert, (op.id, op.data))
                if cur.rowcount == 1 and cur.lastrowid is not None:
                    cursors[index] = cur.lastrowid
                else:  # a duplicate: the cursor it was stored at
                    cursors[index] = conn.execute(
                        "SELECT cursor FROM ops WHERE id = ?", (op.id,)
                    ).fetchone()[0]
                start = index + 1
            if start < len(ops):
                conn.executemany(insert, [(o.id, o.data) for o in ops[start:]])
            inserted = conn.total_changes - before
            last = conn.execute("SELECT coalesce(max(cursor), 0) FROM ops").fetchone()[0]
        return inserted, last, [cursors[i] for i in wanted]

    def _insert_ops(self, ops: list[Op]) -> tuple[int, int]:
        inserted, last, _ = self._write_batch(ops, [])
        return inserted, last

    def _write_snapshot(self, pieces: list[bytes], cursor: int) -> None:
        started = time.perf_counter()
        tag = snapshot.format_tag()
        size = sum(len(p) for p in pieces)
        digest = snapshot.mac(self._key, tag, cursor, pieces)
        with self._writing("writing the snapshot") as conn:
            conn.execute("DELETE FROM snapshot_chunk")
            conn.execute("DELETE FROM snapshot")
            conn.executemany(
                "INSERT INTO snapshot_chunk (seq, data) VALUES (?, ?)",
                enumerate(_chunks(pieces, SNAPSHOT_CHUNK_BYTES)),
            )
            conn.execute(
                "INSERT INTO snapshot (slot, format, cursor, size, mac, created_ms)"
                " VALUES (0, ?, ?, ?, ?, ?)",
                (tag, cursor, size, digest, time.time_ns() // 1_000_000),
            )
        with self._write_lock, contextlib.suppress(sqlite3.Error):
            # Fold the snapshot's pages into the database now, and truncate the WAL.
            self._write.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.stats.snapshots += 1
        self.stats.snapshot_bytes = size
        self.stats.snapshot_write_s = time.perf_counter() - started
        log.info(
            "snapshot saved",
            **fields(cursor=cursor, bytes=size, seconds=round(self.stats.snapshot_write_s, 3)),
        )

    # -- connections --------------------------------------------------------------

    @contextlib.contextmanager
    def _writing(self, what: str) -> Iterator[sqlite3.Connection]:
        """One write transaction on the write connection (committed on exit).
        Notes whether the disk is full: set by a :class:`DiskFull`, cleared by
        a commit."""
        try:
            with self._write_lock, _errors(what, self.path):
                if self._closed:
                    raise StorageError("the store is closed")
                conn = self._write
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    # Also when COMMIT itself failed (a full disk): leave no
                    # transaction open for the next one to trip on.
                    if conn.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            conn.execute("ROLLBACK")
                    raise
        except StorageError as exc:
            self._last_error = str(exc)
            if isinstance(exc, DiskFull):
                self.stats.disk_full_errors += 1
                if not self._full:
                    self._full = True
                    self._full_since_ms = time.time_ns() // 1_000_000
            raise
        if self._full:
            log.warning("the disk has room again: writes succeed", **fields(path=str(self.path)))
        self._full = False
        self._full_since_ms = None

    @contextlib.contextmanager
    def _reading(self, what: str) -> Iterator[sqlite3.Connection]:
        with self._read_lock, _errors(what, self.path):
            if self._closed:
                raise StorageError("the store is closed")
            yield self._read


# -- helpers ----------------------------------------------------------------------


def _stored_op(data: bytes, ident: bytes) -> Op:
    try:
        return snapshot.stored_op(data, ident)
    except SnapshotError as exc:
        raise StorageError(
            f"a stored op does not decode ({exc}): the database is damaged"
        ) from None


@contextlib.contextmanager
def _errors(what: str, path: Path | None = None) -> Iterator[None]:
    """Turn SQLite's errors into :class:`StorageError` saying what failed, and
    :class:`DiskFull` when the disk holding ``path`` is full."""
    try:
        yield
    except (sqlite3.Error, OSError) as exc:
        if path is not None and _is_full(exc, path):
            raise DiskFull(
                f"{what}: the disk holding {path} is full ({exc}): free space on it;"
                " nothing was written"
            ) from None
        if isinstance(exc, OSError):
            raise StorageError(f"{what}: {exc}") from None
        text = str(exc)
        if not isinstance(exc, sqlite3.DatabaseError):
            raise StorageError(f"{what}: {text}") from None
        if "malformed" in text or "not a database" in text or "corrupt" in text:
            raise StorageError(
                f"{what}: the database file is damaged ({text}); restore a backup, or move"
                " it aside and let the node fetch the ops again from its peers"
            ) from None
        raise StorageError(f"{what}: {text}") from None


def _is_full(exc: BaseException, path: Path) -> bool:
    """Whether ``exc`` means that the disk holding ``path`` is full.

    SQLite says SQLITE_FULL when a write comes up short (ENOSPC). Other
    failures to allocate show as I/O errors: a quota (EDQUOT) is
    SQLITE_IOERR_WRITE, a wal-index that cannot grow SQLITE_IOERR_SHMSIZE, and
    Python does not expose the errno behind them. So after an I/O error the
    store tries to allocate :data:`SPACE_PROBE_BYTES` beside the database.
    """
    if isinstance(exc, OSError):
        return exc.errno in _FULL_ERRNOS
    code = getattr(exc, "sqlite_errorcode", None)
    if not isinstance(code, int):
        return "database or disk is full" in str(exc)
    if code & 0xFF == sqlite3.SQLITE_FULL:
        return True
    return code & 0xFF == sqlite3.SQLITE_IOERR and not _has_room(path)


def _has_room(path: Path) -> bool:
    """Whether :data:`SPACE_PROBE_BYTES` can be allocated beside ``path`` (a
    probe file, removed at once). False only when the system says ENOSPC or EDQUOT."""
    probe = Path(f"{path}-space")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as exc:
        return exc.errno not in _FULL_ERRNOS
    try:
        os.posix_fallocate(fd, 0, SPACE_PROBE_BYTES)
    except OSError as exc:
        if exc.errno in _FULL_ERRNOS:
            return False
        # No fallocate on this file system: what statvfs says is left.
        with contextlib.suppress(OSError):
            st = os.statvfs(probe.parent)
            return st.f_bavail * st.f_frsize >= SPACE_PROBE_BYTES
        return True
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            probe.unlink()
    return True


def _create_file(path: Path) -> bool:
    """Create an empty, owner-only database file if there is none; True if created."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        fd = None
    except OSError as exc:
        if exc.errno in _FULL_ERRNOS:
            raise DiskFull(
                f"cannot create the database {path}: the disk holding it is full ({exc}):"
                " free space on it"
            ) from None
        raise StorageError(f"cannot create the database {path}: {exc}") from None
    if fd is not None:
        os.close(fd)
        _sync_directory(path.parent)
        return True
    try:
        with path.open("rb") as f:
            head = f.read(len(_SQLITE_MAGIC))
    except OSError as exc:
        raise StorageError(f"cannot read the database {path}: {exc}") from None
    if head and head != _SQLITE_MAGIC:
        raise StorageError(f"{path} is not a SQLite database (damaged, or another file)")
    return False


def _sync_directory(directory: Path) -> None:
    """Make a new file's directory entry durable (POSIX; elsewhere a no-op)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _connect(path: Path, *, query_only: bool = False) -> sqlite3.Connection:
    with _errors(f"opening {path}", path):
        conn = sqlite3.connect(
            path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        if query_only:
            conn.execute("PRAGMA query_only = ON")
    return conn


def _prepare(conn: sqlite3.Connection, path: Path) -> None:
    """Check that the file is ours and not newer, then set it up and migrate it.

    Nothing is written before the version check: a newer database is left as it was.
    """
    with _errors(f"opening {path}", path):
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_schema")}
        if tables:
            (app_id,) = conn.execute("PRAGMA application_id").fetchone()
            if app_id != APPLICATION_ID or "meta" not in tables:
                raise StorageError(f"{path} is a SQLite database, but not an Archipel one")
            row = conn.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
            version = row[0] if row is not None else 0
            if not isinstance(version, int) or version < 1:
                raise StorageError(f"{path} has no valid schema version: it is damaged")
            if version > SCHEMA_VERSION:
                raise SchemaTooNew(
                    f"{path} was written by a newer Archipel (schema {version}; this one"
                    f" reads up to {SCHEMA_VERSION}); it was left unchanged: run the newer"
                    " version"
                )
        else:
            version = 0
        (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        if mode != "wal":
            raise StorageError(f"{path}: SQLite cannot use WAL mode here (it said {mode!r})")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA journal_size_limit = 67108864")  # truncate the WAL past 64 MiB
        conn.execute("PRAGMA secure_delete = FAST")  # no extra I/O to zero deleted snapshots
        for migration in MIGRATIONS[version:]:
            _migrate(conn, migration)


def _migrate(conn: sqlite3.Connection, migration: Migration) -> None:
    """Apply one migration in one transaction (SQLite's DDL is transactional)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in migration.statements:
            conn.execute(statement)
        conn.execute(
            "INSERT INTO meta (name, value) VALUES ('schema', ?)"
            " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            (migration.version,),
        )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise
    log.info(
        "database migrated",
        **fields(schema=migration.version, summary=migration.summary),
    )


def _chunks(pieces: list[bytes], size: int) -> Iterator[bytes]:
    """``pieces`` regrouped into blobs of about ``size`` bytes (at most one piece over)."""
    group: list[bytes] = []
    length = 0
    for piece in pieces:
        group.append(piece)
        length += len(piece)
        if length >= size:
            yield b"".join(group)
            group, length = [], 0
    if group:
        yield b"".join(group)


def _peer_rows(peers: Sequence[tuple[bytes, tuple[str, ...]]]) -> list[tuple[int, bytes, str]]:
    if len(peers) > MAX_PEERS:
        raise StorageError(f"{len(peers)} peers to remember, over the limit of {MAX_PEERS}")
    rows = []
    seen: set[bytes] = set()
    for position, entry in enumerate(peers):
        try:
            peer, addrs = entry
        except (TypeError, ValueError):
            raise StorageError("a peer is a (key, addresses) pair") from None
        if not isinstance(peer, bytes) or not 1 <= len(peer) <= 64:
            raise StorageError("a peer key is 1 to 64 bytes")
        if peer in seen:
            continue
        seen.add(peer)
        if not isinstance(addrs, tuple | list) or len(addrs) > MAX_PEER_ADDRS:
            raise StorageError(f"a peer has a tuple of at most {MAX_PEER_ADDRS} addresses")
        for addr in addrs:
            if not isinstance(addr, str) or not 1 <= len(addr) <= MAX_ADDR_CHARS:
                raise StorageError(
                    f"a peer address is a string of 1 to {MAX_ADDR_CHARS} characters"
                )
        rows.append((position, peer, json.dumps(list(addrs))))
    return rows
