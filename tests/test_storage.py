"""The node's storage (daemon/storage.py) and state snapshot (daemon/snapshot.py).

Tests that run the writer use threads (SQLite runs in trio worker threads),
so they run on the real clock with a ``trio.fail_after`` cap, and wait on
events, never on time.
"""

from __future__ import annotations

import pickle
import random
import sqlite3
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import MethodType
from typing import Any

import pytest
import trio
import trio.testing
from helpers import T0, cells_federation, key, member

from archipel.crdt import Op, Replica, decode_op
from archipel.daemon import snapshot
from archipel.daemon.storage import (
    MIGRATIONS,
    SCHEMA_VERSION,
    SchemaTooNew,
    StorageError,
    Store,
)
from archipel.simulations.workload import Workload

KEY = b"snapshot key for the tests, 32 B"
LATER = T0 + 10**9
CAP_S = 60  # a cap on each threaded test, far above what it needs
REPO = Path(__file__).resolve().parent.parent


# -- helpers ------------------------------------------------------------------------


def open_store(path: Path, key: bytes = KEY) -> Store:
    return Store.open(path / "node.db", snapshot_key=key)


@asynccontextmanager
async def writer(store: Store) -> AsyncIterator[None]:
    """The store's writer task runs inside the block, and is stopped after it."""
    with trio.fail_after(CAP_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            yield
            nursery.cancel_scope.cancel()


def notes(replica: Replica, count: int, start_ms: int = T0) -> list[Op]:
    """``count`` notes by North's first member, authored on ``replica``."""
    return [
        replica.author(key(member(0)), "note", {"text": f"note {i}"}, start_ms + i + 1)
        for i in range(count)
    ]


def workload_ops(count: int, seed: int = 7) -> tuple[Op, list[Op]]:
    """A mix of record ops (votes, claims, mandates...) in an order they can apply in."""
    workload = Workload(random.Random(seed))
    ops = workload.run(count)
    return workload.genesis, list(ops)


def replica_of(genesis: Op, ops: list[Op]) -> Replica:
    replica = Replica(genesis.federation)
    for op in ops:
        replica.receive(op, LATER)
    return replica


def assert_same_state(a: object, b: object, *, ignore: frozenset[str] = frozenset()) -> None:
    """Two object graphs hold the same values: same types, same fields, same
    contents (dicts and sets compared as such), ops with the same fields."""
    seen: set[tuple[int, int]] = set()
    stack: list[tuple[object, object, str]] = [(a, b, "replica")]
    while stack:
        x, y, path = stack.pop()
        assert type(x) is type(y), f"{path}: {type(x).__name__} vs {type(y).__name__}"
        if x is None or isinstance(x, bool | int | str | bytes | float):
            assert x == y, f"{path}: {x!r} != {y!r}"
            continue
        if (id(x), id(y)) in seen:
            continue
        seen.add((id(x), id(y)))
        if isinstance(x, Op):
            assert isinstance(y, Op)
            for name in snapshot._OP_FIELDS:
                assert getattr(x, name) == getattr(y, name), f"{path}.{name}"
        elif isinstance(x, tuple | list):
            assert isinstance(y, tuple | list)
            assert len(x) == len(y), f"{path}: {len(x)} items vs {len(y)}"
            stack += [(u, v, f"{path}[{i}]") for i, (u, v) in enumerate(zip(x, y, strict=True))]
        elif isinstance(x, dict):
            assert isinstance(y, dict)
            assert x.keys() == y.keys(), f"{path}: other keys"
            stack += [(x[k], y[k], f"{path}[{k!r}]") for k in x]
        elif isinstance(x, set | frozenset):
            assert x == y, f"{path}: other members"
        elif isinstance(x, MethodType):
            assert isinstance(y, MethodType)
            assert x.__func__ is y.__func__, path
            stack.append((x.__self__, y.__self__, f"{path}.__self__"))
        else:
            names = [n for c in type(x).__mro__ for n in getattr(c, "__slots__", ())]
            names += list(getattr(x, "__dict__", {}))
            assert names, f"{path}: cannot compare a {type(x).__name__}"
            for name in names:
                if name not in ignore and name not in ("__weakref__", "__dict__"):
                    stack.append((getattr(x, name), getattr(y, name), f"{path}.{name}"))


def stored_ids(path: Path) -> list[bytes]:
    """The op ids in the database, in storage order, read by another connection."""
    conn = sqlite3.connect(path / "node.db")
    try:
        return [bytes(i) for (i,) in conn.execute("SELECT id FROM ops ORDER BY cursor")]
    finally:
        conn.close()


def sql(path: Path, *statements: str) -> None:
    conn = sqlite3.connect(path / "node.db", isolation_level=None)
    try:
        for statement in statements:
            conn.execute(statement)
    finally:
        conn.close()


# -- round trip -----------------------------------------------------------------------


async def test_ops_round_trip_in_storage_order(tmp_path: Path) -> None:
    replica, genesis = cells_federation()
    ops = notes(replica, 30)
    with open_store(tmp_path) as store:
        empty = store.load_replica(genesis.federation, LATER)
        assert len(empty.graph) == 0
        assert store.last_load is not None
        assert store.last_load.reason == "there is no snapshot"
        async with writer(store):
            assert await store.append_local(genesis) == 1
            await store.append_remote(ops[:20])
            cursors = [await store.append_local(op) for op in ops[20:]]
            await store.flush()
        assert cursors == list(range(22, 32))
        assert store.stored_count() == 31
        assert store.has(genesis.id)
        assert not store.has(b"\x00" * 32)
        rows = store.ops_since(0, 1000)
        assert rows == [(i + 1, op.data) for i, op in enumerate([genesis, *ops])]
        assert store.ops_since(29, 1000) == [(30, ops[28].data), (31, ops[29].data)]
        assert [c for c, _ in store.ops_since(5, 3)] == [6, 7, 8]
        assert store.ops_since(31, 10) == []
    with open_store(tmp_path) as store:
        loaded = store.load_replica(genesis.federation, LATER)
        assert store.last_load is not None
        assert store.last_load.source == "rebuild"  # no snapshot was saved
        assert loaded.state_hash() == replica.state_hash()
        # The same state, but for the clock: only authoring moves it.
        assert_same_state(loaded, replica, ignore=frozenset({"clock"}))


async def test_write_now_sets_a_store_up_before_its_writer_runs(tmp_path: Path) -> None:
    replica, genesis = cells_federation()
    ops = notes(replica, 3)
    with open_store(tmp_path) as store:
        assert store.write_now([genesis, *ops, genesis]) == 4  # the duplicate is ignored
        async with writer(store):
            with pytest.raises(StorageError, match="writer is not running"):
                store.write_now(ops)
    with open_store(tmp_path) as store:
        assert stored_ids(tmp_path) == [genesis.id, *(op.id for op in ops)]
        assert store.load_replica(genesis.federation, LATER).state_hash() == replica.state_hash()


async def test_peers_round_trip(tmp_path: Path) -> None:
    peers = [(b"\x01" * 32, ("/ip4/127.0.0.1/tcp/4001",)), (b"\x02" * 32, ())]
    with open_store(tmp_path) as store:
        assert store.load_peers() == []
        store.save_peers(peers)
        store.save_peers(peers[::-1])  # replaces what was remembered
    with open_store(tmp_path) as store:
        assert store.load_peers() == peers[::-1]


# -- duplicates ---------------------------------------------------------------------


async def test_duplicates_are_ignored(tmp_path: Path) -> None:
    replica, genesis = cells_federation()
    ops = notes(replica, 5)
    with open_store(tmp_path) as store:
        async with writer(store):
            first = await store.append_local(genesis)
            await store.append_remote([*ops, *ops, genesis])
            again = await store.append_local(genesis)
            await store.flush()
        assert again == first
        assert store.stored_count() == 6
        assert store.stats.ops_written == 6
        assert store.stats.duplicates == 7
    assert stored_ids(tmp_path) == [genesis.id, *(op.id for op in ops)]


# -- durability and batching --------------------------------------------------------


async def test_local_op_is_committed_and_synced_when_append_returns(tmp_path: Path) -> None:
    replica, genesis = cells_federation()
    (op,) = notes(replica, 1)
    store = open_store(tmp_path)
    mode = store._write.execute("PRAGMA journal_mode").fetchone()[0]
    synchronous = store._write.execute("PRAGMA synchronous").fetchone()[0]
    assert (mode, synchronous) == ("wal", 2)  # WAL, FULL: each commit fsyncs the WAL
    async with writer(store):
        await store.append_local(genesis)
        cursor = await store.append_local(op)
        # Before any close or flush, another connection sees the op committed.
        assert stored_ids(tmp_path) == [genesis.id, op.id]
        assert cursor == 2
    store.close()


async def test_concurrent_local_appends_share_one_transaction(tmp_path: Path) -> None:
    replica, genesis = cells_federation()
    ops = [genesis, *notes(replica, 49)]
    cursors: dict[bytes, int] = {}

    async def append(op: Op) -> None:
        cursors[op.id] = await store.append_local(op)

    with open_store(tmp_path) as store, trio.fail_after(CAP_S):
        async with trio.open_nursery() as outer:
            async with trio.open_nursery() as appends:
                for op in ops:
                    appends.start_soon(append, op)
                await trio.testing.wait_all_tasks_blocked()  # all 50 queued, none written
                await outer.start(store.run)
            outer.cancel_scope.cancel()
        assert store.stats.transactions == 1
        assert sorted(cursors.values()) == list(range(1, 51))
        assert {c: i for c, i in store.ops_since(0, 100)} == {cursors[op.id]: op.data for op in ops}


async def test_event_loop_runs_while_a_transaction_commits(tmp_path: Path) -> None:
    """The commit runs on a worker thread: while it is held inside the
    transaction, a trio task still runs and releases it."""
    replica, genesis = cells_federation()
    ops = notes(replica, 2000)
    inside = trio.Event()
    release = threading.Event()
    released: list[bool] = []
    token = trio.lowlevel.current_trio_token()
    with open_store(tmp_path) as store:
        original = store._write_batch

        def held(self: Store, *args: Any) -> Any:
            token.run_sync_soon(inside.set)
            released.append(release.wait(timeout=CAP_S))
            return original(*args)

        store._write_batch = MethodType(held, store)  # type: ignore[method-assign]
        async with writer(store):
            await store.append_remote([genesis, *ops])
            await inside.wait()
            release.set()  # only possible if the event loop is free during the commit
            await store.flush()
        assert released
        assert all(released)
        assert store.stored_count() == 2001


async def test_stopping_the_writer_commits_what_is_queued(tmp_path: Path) -> None:
    replica, genesis = cells_federation()
    ops = notes(replica, 600)
    with open_store(tmp_path) as store:
        with trio.fail_after(CAP_S):
            async with trio.open_nursery() as nursery:
                await nursery.start(store.run)
                await store.append_remote([genesis, *ops])
                nursery.cancel_scope.cancel()
        assert store.stored_count() == 601
        with pytest.raises(StorageError, match="writer has stopped"):
            await store.append_local(ops[0])
        await store.flush()  # nothing is queued: returns at once


async def test_a_batch_the_writer_took_is_written_even_if_cancelled(tmp_path: Path) -> None:
    """An item sent to the waiting writer is handed to it directly; whether the
    writer or the cancellation runs next is up to trio's scheduler (random
    order). Either way, the op is written. 16 rounds: a writer that dropped
    the batch it had taken would fail one with probability 1 - 2**-16."""
    _, genesis = cells_federation()
    for round_ in range(16):
        with open_store(tmp_path / str(round_)) as store:
            with trio.fail_after(CAP_S):
                async with trio.open_nursery() as nursery:
                    await nursery.start(store.run)
                    await trio.testing.wait_all_tasks_blocked()  # the writer waits for work
                    await store.append_remote([genesis])
                    nursery.cancel_scope.cancel()
            assert store.stored_count() == 1, f"round {round_}"


# -- schema and migrations ------------------------------------------------------------


def make_v1_database(path: Path, ops: list[Op]) -> None:
    """A database as the first schema wrote it (kept here verbatim, not taken
    from MIGRATIONS, so that an edit to the migrations cannot hide a break)."""
    conn = sqlite3.connect(path / "node.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA application_id = 1095910216")
    conn.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value NOT NULL)")
    conn.execute(
        "CREATE TABLE ops (cursor INTEGER PRIMARY KEY, id BLOB NOT NULL UNIQUE, data BLOB NOT NULL)"
    )
    conn.execute("INSERT INTO meta VALUES ('schema', 1)")
    conn.executemany("INSERT INTO ops (id, data) VALUES (?, ?)", [(o.id, o.data) for o in ops])
    conn.close()


async def test_migration_from_schema_1(tmp_path: Path) -> None:
    replica, genesis = cells_federation()
    ops = [genesis, *notes(replica, 20)]
    make_v1_database(tmp_path, ops)
    assert SCHEMA_VERSION == len(MIGRATIONS) > 1
    with open_store(tmp_path) as store:
        assert store._write.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone() == (
            SCHEMA_VERSION,
        )
        loaded = store.load_replica(genesis.federation, LATER)
        assert loaded.state_hash() == replica.state_hash()
        store.save_peers([(b"\x01" * 32, ("/ip4/127.0.0.1/tcp/1",))])  # v2's table
        async with writer(store):
            await store.save_snapshot(loaded)
    with open_store(tmp_path) as store:
        store.load_replica(genesis.federation, LATER)
        assert store.last_load is not None
        assert store.last_load.source == "snapshot"
        assert store.ops_since(0, 100) == [(i + 1, op.data) for i, op in enumerate(ops)]


async def test_newer_schema_is_refused_and_left_unchanged(tmp_path: Path) -> None:
    _, genesis = cells_federation()
    with open_store(tmp_path) as store:
        async with writer(store):
            await store.append_local(genesis)
    sql(tmp_path, f"UPDATE meta SET value = {SCHEMA_VERSION + 1} WHERE name = 'schema'")
    before = (tmp_path / "node.db").read_bytes()
    with pytest.raises(SchemaTooNew, match="newer Archipel"):
        open_store(tmp_path)
    assert (tmp_path / "node.db").read_bytes() == before
    assert issubclass(SchemaTooNew, StorageError)


# -- the snapshot ---------------------------------------------------------------------


def test_snapshot_round_trip_holds_the_same_state() -> None:
    genesis, ops = workload_ops(400)
    replica = replica_of(genesis, ops)
    pieces = snapshot.dump(replica)
    assert len(pieces) > 3  # the reader crosses pieces
    loaded = snapshot.load(pieces)
    assert_same_state(loaded, replica)
    assert loaded.state_hash() == replica.state_hash()


def test_stored_op_is_what_decode_op_returns() -> None:
    _, ops = workload_ops(300)
    assert len({op.kind for op in ops}) >= 8
    for op in ops:
        decoded = decode_op(op.data)
        again = snapshot.stored_op(op.data, op.id)
        for name in snapshot._OP_FIELDS:
            assert getattr(again, name) == getattr(decoded, name)
            assert type(getattr(again, name)) is type(getattr(decoded, name))


async def test_snapshot_plus_tail_equals_a_full_replay(tmp_path: Path) -> None:
    genesis, ops = workload_ops(500)
    original = replica_of(genesis, ops)
    head, tail = ops[:350], ops[350:]
    with open_store(tmp_path) as store:
        async with writer(store):
            await store.append_remote(head)
            await store.save_snapshot(replica_of(genesis, head))
            await store.append_remote(tail)
    with open_store(tmp_path) as store:
        fast = store.load_replica(genesis.federation, LATER)
        assert store.last_load is not None
        assert (store.last_load.source, store.last_load.snapshot_cursor) == ("snapshot", 350)
        assert store.last_load.replayed == len(tail)
    sql(tmp_path, "DELETE FROM snapshot")
    with open_store(tmp_path) as store:
        full = store.load_replica(genesis.federation, LATER, verify=True)
        assert store.last_load is not None
        assert store.last_load.source == "rebuild"
    assert fast.state_hash() == full.state_hash() == original.state_hash()
    assert_same_state(fast, full)
    assert_same_state(fast, original)


async def saved_snapshot(path: Path) -> Replica:
    """A database with a genesis, notes and a snapshot of them; their replica."""
    replica, genesis = cells_federation()
    ops = notes(replica, 40)
    with open_store(path) as store:
        async with writer(store):
            await store.append_remote([genesis, *ops])
            await store.save_snapshot(replica)
    return replica


async def rebuilt(path: Path, replica: Replica, reason: str, key: bytes = KEY) -> None:
    """Opening the database rebuilds the replica from the ops, for ``reason``."""
    with open_store(path, key) as store:
        loaded = store.load_replica(replica.federation, LATER)
        assert store.last_load is not None
        assert store.last_load.source == "rebuild"
        assert reason in store.last_load.reason
    assert loaded.state_hash() == replica.state_hash()
    assert_same_state(loaded.graph, replica.graph)


async def test_tampered_snapshot_is_discarded_and_rebuilt(tmp_path: Path) -> None:
    replica = await saved_snapshot(tmp_path)
    conn = sqlite3.connect(tmp_path / "node.db", isolation_level=None)
    (chunk,) = conn.execute("SELECT data FROM snapshot_chunk WHERE seq = 0").fetchone()
    flipped = bytearray(chunk)
    flipped[len(flipped) // 2] ^= 1
    conn.execute("UPDATE snapshot_chunk SET data = ? WHERE seq = 0", (bytes(flipped),))
    conn.close()
    await rebuilt(tmp_path, replica, "MAC does not check out")


async def test_snapshot_under_another_key_is_discarded(tmp_path: Path) -> None:
    replica = await saved_snapshot(tmp_path)
    await rebuilt(
        tmp_path, replica, "MAC does not check out", key=b"another node's key, 32 bytes..."
    )


async def test_snapshot_of_another_format_is_discarded(tmp_path: Path) -> None:
    replica = await saved_snapshot(tmp_path)
    sql(tmp_path, "UPDATE snapshot SET format = '0/archipel-0.0.1'")
    await rebuilt(tmp_path, replica, "another version")


async def test_truncated_snapshot_is_discarded(tmp_path: Path) -> None:
    replica = await saved_snapshot(tmp_path)
    sql(tmp_path, "UPDATE snapshot_chunk SET data = substr(data, 1, 100)")
    await rebuilt(tmp_path, replica, "bytes")


PWNED: list[str] = []


def pwn(text: str) -> None:
    PWNED.append(text)


class Exploit:
    def __reduce__(self) -> tuple[Callable[[str], None], tuple[str]]:
        return (pwn, ("code ran",))


async def write_raw_snapshot(path: Path, payload: bytes, key: bytes) -> None:
    tag = snapshot.format_tag()
    conn = sqlite3.connect(path / "node.db", isolation_level=None)
    (cursor,) = conn.execute("SELECT cursor FROM snapshot").fetchone()
    conn.execute("UPDATE snapshot_chunk SET data = ? WHERE seq = 0", (payload,))
    conn.execute("DELETE FROM snapshot_chunk WHERE seq > 0")
    conn.execute(
        "UPDATE snapshot SET size = ?, mac = ?",
        (len(payload), snapshot.mac(key, tag, cursor, (payload,))),
    )
    conn.close()


async def test_a_forged_snapshot_is_never_unpickled(tmp_path: Path) -> None:
    replica = await saved_snapshot(tmp_path)
    payload = pickle.dumps(Exploit(), protocol=5)
    await write_raw_snapshot(tmp_path, payload, b"the attacker does not know the key")
    await rebuilt(tmp_path, replica, "MAC does not check out")
    assert PWNED == []
    # Even with the key, the unpickler refuses what no snapshot names: a
    # function of another module, or getattr (a path from a class to anything).
    await write_raw_snapshot(tmp_path, payload, KEY)
    await rebuilt(tmp_path, replica, "which no snapshot needs")
    assert PWNED == []
    await write_raw_snapshot(tmp_path, pickle.dumps(replica.authority.counts, protocol=5), KEY)
    await rebuilt(tmp_path, replica, "builtins.getattr")


async def test_snapshot_ops_missing_from_the_log_are_written_back(tmp_path: Path) -> None:
    replica, genesis = cells_federation()
    stored = notes(replica, 10)
    with open_store(tmp_path) as store:
        async with writer(store):
            await store.append_remote([genesis, *stored])
            await store.flush()
            # Applied but not yet stored when the snapshot is taken, then lost.
            unstored = notes(replica, 5, start_ms=T0 + 100)
            await store.save_snapshot(replica)
    with open_store(tmp_path) as store:
        loaded = store.load_replica(genesis.federation, LATER)
        assert store.last_load is not None
        assert (store.last_load.source, store.last_load.repaired) == ("snapshot", 5)
        assert all(store.has(op.id) for op in unstored)
        assert store.stored_count() == 16
    assert loaded.state_hash() == replica.state_hash()


async def test_another_federation_is_refused(tmp_path: Path) -> None:
    _, genesis = cells_federation()
    with open_store(tmp_path) as store:
        store.load_replica(genesis.federation, LATER)
        with pytest.raises(StorageError, match="holds federation"):
            store.load_replica(b"\x07" * 32, LATER)


# -- damage and bad input ---------------------------------------------------------------


def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    (tmp_path / "node.db").write_bytes(random.Random(1).randbytes(8192))
    with pytest.raises(StorageError, match="not a SQLite database"):
        open_store(tmp_path)


def test_another_programs_database_is_refused(tmp_path: Path) -> None:
    sql(tmp_path, "CREATE TABLE songs (title TEXT)")
    with pytest.raises(StorageError, match="not an Archipel one"):
        open_store(tmp_path)


async def test_a_damaged_database_gives_a_storage_error(tmp_path: Path) -> None:
    replica, genesis = cells_federation()
    with open_store(tmp_path) as store:
        async with writer(store):
            await store.append_remote([genesis, *notes(replica, 400)])
    path = tmp_path / "node.db"
    data = bytearray(path.read_bytes())
    assert len(data) > 8 * 4096
    data[4096:-4096] = random.Random(2).randbytes(len(data) - 8192)  # keep the header page
    path.write_bytes(bytes(data))
    with pytest.raises(StorageError, match="damaged"), open_store(tmp_path) as store:
        store.load_replica(genesis.federation, LATER)


async def test_a_corrupted_op_is_reported(tmp_path: Path) -> None:
    replica, genesis = cells_federation()
    with open_store(tmp_path) as store:
        async with writer(store):
            await store.append_remote([genesis, *notes(replica, 3)])
    conn = sqlite3.connect(tmp_path / "node.db", isolation_level=None)
    (data,) = conn.execute("SELECT data FROM ops WHERE cursor = 3").fetchone()
    conn.execute("UPDATE ops SET data = ? WHERE cursor = 3", (data[:-1] + b"\x00",))
    conn.close()
    with open_store(tmp_path) as store, pytest.raises(StorageError, match="cursor 3"):
        store.load_replica(genesis.federation, LATER)


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="at least 16 bytes"):
        open_store(tmp_path, key=b"short")
    with open_store(tmp_path) as store:
        with pytest.raises(StorageError, match="cursor"):
            store.ops_since(-1, 10)
        with pytest.raises(StorageError, match="limit"):
            store.ops_since(0, 0)
        with pytest.raises(StorageError, match="peer key"):
            store.save_peers([(b"", ("/ip4/127.0.0.1/tcp/1",))])
        with pytest.raises(StorageError, match="address"):
            store.save_peers([(b"\x01" * 32, ("",))])
    with pytest.raises(StorageError, match="closed"):
        store.has(b"\x00" * 32)


# -- crash safety ---------------------------------------------------------------------


def test_kill_9_during_writes_loses_no_acknowledged_op(tmp_path: Path) -> None:
    """The short version of benchmarks/crash.py: a few kills at random instants."""
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "crash.py"),
            "--runs",
            "3",
            "--max-delay",
            "1.0",
            "--dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "failed runs: 0" in done.stdout
    acknowledged = int(done.stdout.split("ops acknowledged")[0].split(";")[-1])
    assert acknowledged > 0
