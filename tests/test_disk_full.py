"""A full disk (issue #8): local writes refused with a clear error, reads and
sync go on, peers' ops kept and written when space returns.

The disk is a real tmpfs of a few MiB, mounted for the test and filled with a
filler file until the kernel says ENOSPC; mounting needs root (CAP_SYS_ADMIN),
and the tests that need it skip, saying so, where it is not permitted. One
test fills the "disk" with SQLite's ``max_page_count`` instead, so the
retention rule is also checked where nothing can be mounted.

SQLite runs in worker threads and the nodes use real sockets: the tests run on
the real clock under ``trio.fail_after`` and wait on conditions (the store's
``next_write``, the nodes' op arrivals), never on time.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from helpers import T0, cells_federation, key, member
from nodes import CAP_S, converged, federation_on_disk, running, until
from test_storage import open_store, writer

from archipel.client import AsyncClient, RpcError
from archipel.crdt import Op, Replica
from archipel.daemon import storage
from archipel.daemon.paths import Home
from archipel.daemon.rpc import UNAVAILABLE
from archipel.daemon.storage import DiskFull, StorageError, Store

LATER = T0 + 10**9
DISK_BYTES = 4 * 1024 * 1024


# -- the small disk -------------------------------------------------------------------


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of :data:`DISK_BYTES` mounted for the test, unmounted after it."""
    if not sys.platform.startswith("linux"):
        pytest.skip("a tmpfs mount needs Linux")
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN) and mount(8)")
    where = tmp_path / "disk"
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES},mode=0700", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        done = subprocess.run(["umount", str(where)], capture_output=True, check=False, timeout=30)
        if done.returncode != 0:  # something still holds a file there: detach it anyway
            subprocess.run(["umount", "-l", str(where)], check=False, timeout=30)


def fill(disk: Path) -> Path:
    """Fill ``disk`` until the kernel refuses a byte more; return the filler file."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (65536, 4096, 1):
            for _ in range(DISK_BYTES // size + 1):  # bounded by the disk's size
                try:
                    os.write(fd, b"\0" * size)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    free = os.statvfs(disk)
    assert free.f_bavail == 0, "the disk still has room"
    return filler


# -- helpers --------------------------------------------------------------------------


def notes(replica: Replica, count: int, start_ms: int = T0, size: int = 10) -> list[Op]:
    return [
        replica.author(key(member(0)), "note", {"text": f"{i}" * size}, start_ms + i + 1)
        for i in range(count)
    ]


def stored_ids(where: Path) -> list[bytes]:
    """The op ids in the database, in storage order, read by another connection."""
    conn = sqlite3.connect(where / "node.db")
    try:
        return [bytes(i) for (i,) in conn.execute("SELECT id FROM ops ORDER BY cursor")]
    finally:
        conn.close()


async def until_written(store: Store) -> None:
    """Wait (on the writer's attempts) until no retained op is left."""
    while store.retained_count():
        await store.next_write()


async def until_retained(store: Store, count: int) -> None:
    """Wait (on the writer's attempts) until ``count`` ops are retained."""
    while store.retained_count() != count:
        await store.next_write()


@pytest.fixture
def quick_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries every 20 to 100 ms instead of 1 to 16 s: the tests wait on them."""
    monkeypatch.setattr(storage, "RETRY_FIRST_S", 0.02)
    monkeypatch.setattr(storage, "RETRY_MAX_S", 0.1)


# -- the store ------------------------------------------------------------------------


async def test_a_local_write_on_a_full_disk_raises_disk_full_and_stores_nothing(
    disk: Path,
) -> None:
    replica, genesis = cells_federation()
    before = notes(replica, 5)
    (refused,) = notes(replica, 1, start_ms=T0 + 100)
    with open_store(disk) as store:
        store.load_replica(genesis.federation, LATER)
        async with writer(store):
            await store.append_local(genesis)
            for op in before:
                await store.append_local(op)
            assert not store.disk_full
            fill(disk)
            with pytest.raises(DiskFull) as raised:
                await store.append_local(refused)
            message = str(raised.value)
            assert f"the disk holding {disk / 'node.db'} is full" in message
            assert "free space" in message
            assert "nothing was written" in message
            assert isinstance(raised.value, StorageError)
            status = store.status()
            assert status.disk_full
            assert status.full_since_ms is not None
            assert status.stored_ops == 6
            assert status.retained_ops == 0  # an op authored here is refused, not kept
            assert "is full" in status.last_error
            assert store.stats.disk_full_errors == 1
            # Reads go on.
            assert not store.has(refused.id)
            assert [c for c, _ in store.ops_since(0, 100)] == list(range(1, 7))
            assert store.load_peers() == []
        assert store.stored_count() == 6
    # Still full: the database opens, and holds exactly what was acknowledged.
    assert stored_ids(disk) == [genesis.id, *(op.id for op in before)]
    with open_store(disk) as store:
        loaded = store.load_replica(genesis.federation, LATER)
        assert len(loaded.graph) == 6
        assert refused.id not in loaded.graph
    check = sqlite3.connect(disk / "node.db")
    try:
        assert check.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        check.close()


async def test_peers_ops_are_kept_and_written_by_the_retry_timer(
    disk: Path, quick_retry: None
) -> None:
    replica, genesis = cells_federation()
    first = notes(replica, 40)
    second = notes(replica, 10, start_ms=T0 + 100)
    (mine,) = notes(replica, 1, start_ms=T0 + 200)
    with open_store(disk) as store:
        store.load_replica(genesis.federation, LATER)
        async with writer(store):
            await store.append_local(genesis)
            filler = fill(disk)
            await store.append_remote(first)
            await store.flush()  # the write was tried, and failed
            assert store.retained_count() == 40
            assert store.disk_full
            # A local op waits behind the retained ones: refused while they cannot go.
            with pytest.raises(DiskFull):
                await store.append_local(mine)
            await store.append_remote(second)
            await store.flush()
            assert store.retained_count() == 50
            assert store.stored_count() == 1
            failed = store.stats.failed_transactions
            assert failed >= 2
            filler.unlink()  # space returns; nothing new is written: the timer retries
            await until_written(store)
            assert not store.status().disk_full
            assert store.stats.retries >= 1
            assert store.stats.ops_dropped == 0
            # Retained ops got their cursors first, in the order they came.
            assert await store.append_local(mine) == 52
        assert store.stored_count() == 52
    expected = [genesis, *first, *second, mine]
    assert stored_ids(disk) == [op.id for op in expected]
    with open_store(disk) as store:
        loaded = store.load_replica(genesis.federation, LATER)
        assert store.last_load is not None
        assert store.last_load.pending == 0
        assert store.last_load.refused == 0
    assert loaded.state_hash() == replica.state_hash()


async def test_retention_is_capped_and_the_rest_is_counted(
    disk: Path, quick_retry: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage, "MAX_RETAINED_OPS", 10)
    replica, genesis = cells_federation()
    ops = notes(replica, 25)
    with open_store(disk) as store:
        store.load_replica(genesis.federation, LATER)
        async with writer(store):
            await store.append_local(genesis)
            filler = fill(disk)
            await store.append_remote(ops)
            await store.flush()
            status = store.status()
            assert (status.retained_ops, status.dropped_ops) == (10, 15)
            filler.unlink()
            await until_written(store)
            assert store.status().dropped_ops == 15
    # The oldest ten were kept and written; the rest are for peers to send again.
    assert stored_ids(disk) == [genesis.id, *(op.id for op in ops[:10])]


async def test_a_snapshot_on_a_full_disk_is_skipped_and_the_old_one_stays(
    disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    replica, genesis = cells_federation()
    early = notes(replica, 10)
    late = notes(replica, 5, start_ms=T0 + 100)
    peers = [(b"\x01" * 32, ("/ip4/127.0.0.1/tcp/4001",))]
    with open_store(disk) as store:
        store.load_replica(genesis.federation, LATER)
        async with writer(store):
            await store.append_remote([genesis, *early])
            assert store.save_peers(peers)
            assert await store.save_snapshot(replica_of(genesis, early))
            for op in late:
                await store.append_local(op)
            fill(disk)
            with caplog.at_level(logging.WARNING, logger="archipel.storage"):
                assert not await store.save_snapshot(replica)
                assert not store.save_peers([])
            assert store.stats.snapshots_failed == 1
            assert store.disk_full
            assert any("snapshot not saved" in r.getMessage() for r in caplog.records)
            assert any("peers not saved" in r.getMessage() for r in caplog.records)
    # Still full: the database opens, from the previous snapshot plus the tail.
    with open_store(disk) as store:
        loaded = store.load_replica(genesis.federation, LATER)
        assert store.last_load is not None
        assert store.last_load.source == "snapshot"
        assert store.last_load.snapshot_cursor == 11
        assert store.last_load.replayed == 5
        assert store.load_peers() == peers
    assert loaded.state_hash() == replica.state_hash()


def replica_of(genesis: Op, ops: list[Op]) -> Replica:
    replica = Replica(genesis.federation)
    for op in [genesis, *ops]:
        replica.receive(op, LATER)
    return replica


async def test_ops_the_start_up_repair_cannot_write_are_kept_for_the_writer(
    disk: Path, quick_retry: None
) -> None:
    replica, genesis = cells_federation()
    stored = notes(replica, 10)
    with open_store(disk) as store:
        store.load_replica(genesis.federation, LATER)
        async with writer(store):
            await store.append_remote([genesis, *stored])
            await store.flush()
            # Applied but not yet stored when the snapshot is taken, then lost.
            unstored = notes(replica, 5, start_ms=T0 + 100)
            assert await store.save_snapshot(replica)
            await store.append_local(notes(replica, 1, start_ms=T0 + 200)[0])
            filler = fill(disk)  # the WAL holds a commit: it stays, with its index
    with open_store(disk) as store:
        loaded = store.load_replica(genesis.federation, LATER)  # the repair fails: kept
        assert store.last_load is not None
        assert store.last_load.repaired == 0
        assert store.retained_count() == 5
        assert store.disk_full
        async with writer(store):
            filler.unlink()
            await until_written(store)
        assert all(store.has(op.id) for op in unstored)
        assert store.stored_count() == 17
    assert loaded.state_hash() == replica.state_hash()


async def test_opening_a_database_on_a_disk_with_no_room_says_the_disk_is_full(
    disk: Path,
) -> None:
    """A cleanly closed database has no wal-index (-shm): SQLite must create one
    (32 KiB) and reports a bare I/O error; the store finds out that it is the disk."""
    _, genesis = cells_federation()
    with open_store(disk) as store:
        store.write_now([genesis])
    assert sorted(p.name for p in disk.iterdir()) == ["node.db"]
    filler = fill(disk)
    with pytest.raises(DiskFull, match="is full.*free space"):
        open_store(disk)
    assert not Path(f"{disk / 'node.db'}-space").exists()  # the probe cleaned up
    filler.unlink()
    with open_store(disk) as store:
        assert store.stored_count() == 1


async def test_a_failed_write_keeps_peers_ops_without_a_mount(tmp_path: Path) -> None:
    """The same rule where nothing can be mounted: SQLite's max_page_count
    makes the file unable to grow, which SQLite reports as SQLITE_FULL."""
    replica, genesis = cells_federation()
    big = [
        replica.author(key(member(0)), "note", {"text": "x" * 4000}, T0 + i + 1) for i in range(20)
    ]
    with open_store(tmp_path) as store:
        async with writer(store):
            await store.append_local(genesis)
            with store._write_lock:  # a full disk: the file may not grow
                (pages,) = store._write.execute("PRAGMA page_count").fetchone()
                store._write.execute(f"PRAGMA max_page_count = {pages}")
            with pytest.raises(DiskFull, match="full"):
                await store.append_local(big[0])
            await store.append_remote(big[1:])  # kept for a retry
            await store.flush()
            assert store.stats.failed_transactions == 2
            assert store.retained_count() == 19
            with store._write_lock:
                store._write.execute("PRAGMA max_page_count = 1073741823")
            # The next transaction writes the retained ops first.
            assert await store.append_local(big[0]) == 21
            assert store.retained_count() == 0
            assert not store.disk_full
        assert store.stored_count() == 21
    assert stored_ids(tmp_path) == [genesis.id, *(op.id for op in big[1:]), big[0].id]


# -- a node -----------------------------------------------------------------------------


def home_on(disk: Path, home: Home) -> Home:
    """A copy of ``home`` on the small disk."""
    moved = Home(disk / home.root.name)
    shutil.copytree(home.root, moved.root)
    moved.create()
    return moved


async def test_a_node_on_a_full_disk_refuses_actions_and_keeps_syncing(
    tmp_path: Path, disk: Path, quick_retry: None
) -> None:
    fed = federation_on_disk(tmp_path, 2)
    fed.homes[1] = home_on(disk, fed.homes[1])
    with trio.fail_after(CAP_S):
        async with (
            running(fed, 0) as a,
            running(fed, 1, a.listen_addrs) as b,
            AsyncClient(b.home.root) as rpc,
        ):
            first = await rpc.call("note", text="written while there was room")
            await until(fed, lambda: converged([a, b], 2))
            filler = fill(disk)
            status = await rpc.call("node.status")

            with pytest.raises(RpcError) as refused:
                await rpc.call("note", text="no room for this one")
            assert refused.value.code == UNAVAILABLE
            assert refused.value.reason == "disk_full"
            assert "is full" in refused.value.message
            assert "free space" in refused.value.message
            after = await rpc.call("node.status")
            assert (after["ops"], after["state_hash"]) == (2, status["state_hash"])
            assert after["disk_full"] is True
            assert after["storage"]["disk_full"] is True
            assert b.stats.ops_stored == 1  # the refused op was never applied

            # Queries and the event stream still answer.
            assert [n["text"] for n in await rpc.call("notes.list")] == [
                "written while there was room"
            ]
            page = await rpc.call("events.poll", cursor=0)
            assert [e["id"] for e in page["events"]] == [fed.genesis.id.hex(), first["id"]]

            # Sync goes on: an op authored on the other node is applied here.
            theirs = await a.author("note", {"text": "from a, while b is full"})
            assert b.replica is not None
            await until(fed, lambda: converged([a, b], 3))
            assert b.store is not None
            await until_retained(b.store, 1)  # its write was tried, and failed
            assert not b.store.has(theirs.id)
            status = await rpc.call("node.status")
            assert status["storage"]["retained_ops"] == 1
            assert a.replica is not None
            assert status["state_hash"] == a.replica.state_hash().hex()

            # Space returns: the retry timer writes the kept op, actions work again.
            filler.unlink()
            await until_written(b.store)
            assert b.store.has(theirs.id)
            mine = await rpc.call("note", text="room again")
            assert (await rpc.call("node.status"))["disk_full"] is False
            await until(fed, lambda: converged([a, b], 4))
        # Restarted alone (no peer to fetch from), b has everything from its disk.
        async with running(fed, 1) as b2:
            assert b2.replica is not None
            ids = {fed.genesis.id.hex(), first["id"], theirs.id.hex(), mine["id"]}
            assert {op.id.hex() for op in b2.replica.graph.topological()} == ids


async def test_a_node_stops_and_starts_on_a_full_disk(
    tmp_path: Path, disk: Path, quick_retry: None, caplog: pytest.LogCaptureFixture
) -> None:
    fed = federation_on_disk(tmp_path, 2)
    fed.homes[1] = home_on(disk, fed.homes[1])
    with trio.fail_after(CAP_S), caplog.at_level(logging.WARNING):
        async with running(fed, 0) as a:
            boot = a.listen_addrs
            async with running(fed, 1, boot) as b:
                await b.author("note", {"text": "before"})
                await until(fed, lambda: converged([a, b], 2))
                filler = fill(disk)
                theirs = await a.author("note", {"text": "while b is full"})
                await until(fed, lambda: converged([a, b], 3))
                assert b.store is not None
                await until_retained(b.store, 1)
            # b stopped cleanly on the full disk (the block ended without an error).
            assert any("snapshot not saved" in r.getMessage() for r in caplog.records)
            async with running(fed, 1, boot) as b:
                assert b.store is not None
                assert b.store.last_load is not None
                assert b.store.last_load.replayed == 2  # genesis and its own note, from disk
                assert not b.store.has(theirs.id)  # never written: a peer sends it again
                await until(fed, lambda: converged([a, b], 3))
                filler.unlink()
                await b.store.flush()  # its write was tried (kept) or done
                await until_written(b.store)
                assert b.store.has(theirs.id)
                await b.author("note", {"text": "after"})
                await until(fed, lambda: converged([a, b], 4))
