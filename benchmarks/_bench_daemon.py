"""``archipel run`` with counters and experimental patches, for benchmarks/profile_loopback.py.

    python benchmarks/_bench_daemon.py run --home DIR

With ``COUNT_DIR`` set, it wraps, in this process only, the functions each
layer calls once per unit of work (socket writes, Noise messages, Yamux frames
by type, our channel records by kind, sync messages by type, SQLite
transactions, trio.to_thread hops, log records, RPC requests by method,
signature checks by caller, trio task steps per task, ops applied) and counts
the calls. On SIGUSR1 it writes the counters and the process's CPU times to
``$COUNT_DIR/<pid>.<n>.json`` (n = 1, 2, ...); the driver diffs two snapshots
taken around a load. The wrappers cost CPU themselves: time figures come from
uncounted runs.

``BENCH_PATCHES`` (comma-separated) applies changes proposed for other modules,
to measure them before anyone edits those modules (see docs/benchmarks.md):

- ``node-before``: daemon/node.py's writer and timer as they were before the
  profiling (one channel write per message, the timer woken on every input);
- ``acker``: a channel's acker wakes only when an ACK is due, not on every record;
- ``readahead``: libp2p's TCP stream reads up to 64 KiB per system call and
  serves the Noise layer's small reads (2-byte length, then body) from that;
- ``yamux-batch``: a Yamux window update once half the window was read (as
  go-yamux does), instead of one after (nearly) every read;
- ``thread-batch``: trio's worker threads (SQLite) under SCHED_BATCH, so that
  waking one does not preempt the event loop;
- ``push-delay=N``: Plumtree's push_delay_ms (40 by default) set to N.

(py-libp2p's own switch ``PY_YAMUX_RELEASE_ON_READ=0``, which ``--env`` can
set, removes only about a third of those window updates: another branch of
its window logic credits every partial read too.)

With ``CPROFILE_OUT`` set, SIGUSR2 starts, and then stops and writes, a
cProfile of the event loop's thread (timed by that thread's CPU clock).
"""

from __future__ import annotations

import collections
import cProfile
import dataclasses
import functools
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nacl.signing
import trio
from libp2p.io.trio import TrioTCPStream
from libp2p.security.noise.io import BaseNoiseMsgReadWriter
from libp2p.stream_muxer.yamux.yamux import DEFAULT_WINDOW_SIZE, Yamux, YamuxStream
from trio._core import _thread_cache

from archipel.cli.main import main
from archipel.daemon import channel as ch
from archipel.daemon import node as node_mod
from archipel.daemon import rpc
from archipel.daemon.channel import Channel
from archipel.daemon.methods import Methods
from archipel.daemon.node import Node
from archipel.daemon.storage import Store
from archipel.protocol.plumtree import PushLimits
from archipel.protocol.session import SyncSession

COUNTS: collections.Counter[str] = collections.Counter()
_YAMUX_TYPES = {0: "data", 1: "window_update", 2: "ping", 3: "go_away"}
_RECORD_KINDS = {0: "DATA", 1: "ACK", 2: "PING"}


def _count_async(cls: Any, name: str, key: Callable[..., str]) -> None:
    original = getattr(cls, name)

    @functools.wraps(original)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        COUNTS[key(*args, **kwargs)] += 1
        return await original(*args, **kwargs)

    setattr(cls, name, wrapper)


def _count_sync(cls: Any, name: str, key: Callable[..., str]) -> None:
    original = getattr(cls, name)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        COUNTS[key(*args, **kwargs)] += 1
        return original(*args, **kwargs)

    setattr(cls, name, wrapper)


def _where(stream: trio.SocketStream) -> str:
    return "rpc" if stream.socket.family == socket.AF_UNIX else "tcp"


def _send(stream: trio.SocketStream, data: bytes) -> str:
    COUNTS[f"socket.{_where(stream)}.send.bytes"] += len(data)
    return f"socket.{_where(stream)}.send"


def _recv(stream: trio.SocketStream, *_args: Any) -> str:
    return f"socket.{_where(stream)}.recv"


def _frame(_self: Any, data: bytes) -> str:
    kind = _YAMUX_TYPES.get(data[1], "?") if len(data) > 1 else "?"
    return f"yamux.frame.{kind}"


def _record(_self: Any, record: bytes) -> str:
    return f"channel.record.{_RECORD_KINDS.get(record[0], '?')}"


def _batch(_self: Any, ops: list[Any], _wanted: list[int]) -> str:
    COUNTS["sqlite.ops_in_transactions"] += len(ops)
    return "sqlite.transaction"


def _hop(fn: Any, *_args: Any, **_kwargs: Any) -> str:
    return f"to_thread.{getattr(fn, '__qualname__', type(fn).__name__)}"


def _log(_self: logging.Logger, record: logging.LogRecord) -> str:
    return f"log.{record.levelname}.{record.name}"


def _verify(*_args: Any, **_kwargs: Any) -> str:
    caller = sys._getframe(3).f_code.co_name  # wrapper <- decode_op <- caller
    return f"ed25519.verify.from.{caller}"


def _dump_json(value: Any) -> str:
    return "rpc.response"


class _Steps:
    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        COUNTS["trio.task_steps"] += 1
        name = task.name.rsplit(".", 2)
        COUNTS["trio.steps." + ".".join(name[-2:])] += 1


def install() -> None:
    _count_async(trio.SocketStream, "send_all", _send)
    _count_async(trio.SocketStream, "receive_some", _recv)
    _count_async(BaseNoiseMsgReadWriter, "write_msg", lambda *_a, **_k: "noise.write_msg")
    _count_async(BaseNoiseMsgReadWriter, "read_msg", lambda *_a, **_k: "noise.read_msg")
    _count_async(Yamux, "_write_frame", _frame)
    _count_async(Channel, "_write", _record)
    _count_async(Channel, "send", lambda *_a, **_k: "channel.send")
    _count_async(Channel, "receive", lambda *_a, **_k: "channel.receive")
    _count_sync(SyncSession, "_emit", lambda _s, m: f"sync.msg_out.{type(m).__name__}")
    _count_sync(SyncSession, "receive_data", lambda *_a, **_k: "sync.receive_data")
    _count_sync(Store, "_write_batch", _batch)
    _count_sync(logging.Logger, "handle", _log)
    _count_sync(nacl.signing.VerifyKey, "verify", _verify)
    _count_sync(rpc, "_dump", _dump_json)
    _count_sync(Node, "_notify", lambda *_a, **_k: "ops.applied")
    _count_async(Node, "_persist", lambda *_a, **_k: "node.persist_calls")
    _count_async(Store, "flush", lambda *_a, **_k: "store.flush")
    _count_async(Methods, "dispatch", lambda _s, method, _p: f"rpc.method.{method}")
    original_hop = trio.to_thread.run_sync

    async def hop(fn: Any, *args: Any, **kwargs: Any) -> Any:
        name = _hop(fn)
        COUNTS[name] += 1
        spent = [0.0]

        def timed(*a: Any) -> Any:
            began = time.perf_counter()
            try:
                return fn(*a)
            finally:
                spent[0] = time.perf_counter() - began

        began = time.perf_counter()
        try:
            return await original_hop(timed, *args, **kwargs)
        finally:
            total = time.perf_counter() - began
            COUNTS[name + ".wall_us"] += int(total * 1e6)
            COUNTS[name + ".in_thread_us"] += int(spent[0] * 1e6)

    trio.to_thread.run_sync = hop  # type: ignore[assignment]
    original_run = Node.run

    async def run(self: Node, **kwargs: Any) -> None:
        trio.lowlevel.add_instrument(_Steps())
        await original_run(self, **kwargs)

    Node.run = run  # type: ignore[method-assign]


# -- experimental patches (BENCH_PATCHES) -------------------------------------------


def _node_before() -> None:
    """daemon/node.py's writer and timer as they were before the profiling."""

    async def _writer(self: Node, link: Any, scope: trio.CancelScope) -> None:
        try:
            async for item in link.receive:
                if item is node_mod._HANGUP:
                    break
                await link.channel.send(item)
        except node_mod.ChannelClosed:
            pass
        await link.channel.aclose()
        scope.cancel()

    async def _timer(self: Node) -> None:
        sync = self.sync
        assert sync is not None
        while True:
            self._wake = trio.Event()
            deadline = sync.next_deadline()
            if deadline is None:
                await self._wake.wait()
                continue
            delay = (deadline - self.now_ms()) / 1000
            if delay > 0:
                with trio.move_on_after(delay):
                    await self._wake.wait()
            if self.now_ms() >= deadline:
                sync.handle_timer(self.now_ms())
                await self._after()

    def _poke_timer(self: Node) -> None:
        self._wake.set()

    Node._writer = _writer  # type: ignore[method-assign]
    Node._timer = _timer  # type: ignore[method-assign]
    Node._poke_timer = _poke_timer  # type: ignore[method-assign]


def _acker() -> None:
    """A channel's acker waits for an ACK to be due, not for any change."""
    original_init, original_stop = Channel.__init__, Channel._stop

    def init(self: Channel, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self._ack_due = ch._Signal()  # type: ignore[attr-defined]

    def _stop(self: Channel, reason: str) -> None:
        original_stop(self, reason)
        self._ack_due.fire()  # type: ignore[attr-defined]

    async def receive(self: Channel) -> bytes:
        while True:
            if self._closed_by_us:
                raise ch.ChannelClosed(self._reason or "closed")
            if self._inbox:
                data = b"".join(self._inbox)
                self._inbox.clear()
                self._unacked_consumed += len(data)
                if self._unacked_consumed >= max(1, self._config.window_bytes // 4):
                    self._ack_due.fire()  # type: ignore[attr-defined]
                return data
            if self._reason is not None:
                raise ch.ChannelClosed(self._reason)
            await self._changed.wait()

    async def _acker_task(self: Channel) -> None:
        threshold = max(1, self._config.window_bytes // 4)
        try:
            await self._write(ch._HEADER.pack(ch._ACK, self._config.window_bytes))
            while True:
                while self._unacked_consumed < threshold and self._reason is None:
                    await self._ack_due.wait()  # type: ignore[attr-defined]
                if self._reason is not None:
                    return
                n, self._unacked_consumed = self._unacked_consumed, 0
                self._recv_credit += n
                await self._write(ch._HEADER.pack(ch._ACK, n))
        except ch.ChannelClosed:
            pass

    Channel.__init__ = init  # type: ignore[method-assign]
    Channel._stop = _stop  # type: ignore[method-assign]
    Channel.receive = receive  # type: ignore[method-assign]
    Channel._acker = _acker_task  # type: ignore[method-assign]


READ_AHEAD = 64 * 1024


def _readahead() -> None:
    """TCP reads of up to 64 KiB, from which libp2p's small reads are served."""
    original = TrioTCPStream.read

    async def read(self: TrioTCPStream, n: int | None = None) -> bytes:
        ahead: bytes = getattr(self, "_ahead", b"")
        if not ahead:
            ahead = await original(self, READ_AHEAD)
        if n is None or n >= len(ahead):
            self._ahead = b""  # type: ignore[attr-defined]
            return ahead
        self._ahead = ahead[n:]  # type: ignore[attr-defined]
        return ahead[:n]

    TrioTCPStream.read = read  # type: ignore[method-assign]


def _yamux_batch() -> None:
    """Yamux window updates once half the window was read (go-yamux), not after
    every read: py-libp2p 0.8.1 credits each partial read at once."""

    async def release(self: YamuxStream, *, bytes_read: int = 0) -> None:
        async with self.window_lock:
            self._pending_recv_release += bytes_read
            if self._pending_recv_release < DEFAULT_WINDOW_SIZE // 2:
                return
            delta, self._pending_recv_release = self._pending_recv_release, 0
            self.recv_window += delta
        await self.send_window_update(delta, skip_lock=True)

    YamuxStream._auto_tune_and_send_window_update = release  # type: ignore[method-assign]


def _thread_batch() -> None:
    """trio's worker threads run under SCHED_BATCH: waking one does not preempt
    the event loop's thread (Linux's wake-up preemption)."""
    original = _thread_cache.WorkerThread._work

    def _work(self: Any) -> None:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        original(self)

    _thread_cache.WorkerThread._work = _work  # type: ignore[method-assign]


def _push_delay(ms: int) -> None:
    original = node_mod._Sync.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        limits = kwargs.get("push_limits") or PushLimits()
        kwargs["push_limits"] = dataclasses.replace(limits, push_delay_ms=ms)
        original(self, *args, **kwargs)

    node_mod._Sync.__init__ = init  # type: ignore[method-assign]


def patch(names: str) -> None:
    for name in filter(None, (n.strip() for n in names.split(","))):
        if name == "node-before":
            _node_before()
        elif name == "acker":
            _acker()
        elif name == "yamux-batch":
            _yamux_batch()
        elif name == "thread-batch":
            _thread_batch()
        elif name == "readahead":
            _readahead()
        elif name.startswith("push-delay="):
            _push_delay(int(name.split("=", 1)[1]))
        else:
            raise SystemExit(f"unknown patch {name!r}")


def _snapshot(_signum: int, _frame: object) -> None:
    out = Path(os.environ["COUNT_DIR"])
    times = os.times()
    _snapshot.n += 1  # type: ignore[attr-defined]
    data = {"cpu_s": times.user + times.system, "user_s": times.user, "counts": dict(COUNTS)}
    target = out / f"{os.getpid()}.{_snapshot.n}.json"  # type: ignore[attr-defined]
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.rename(target)


_snapshot.n = 0  # type: ignore[attr-defined]


class _Profiler:
    """cProfile of the event loop's thread, timed by that thread's CPU clock:
    on at the first SIGUSR2, off and written to ``$CPROFILE_OUT`` at the second."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.profile: cProfile.Profile | None = None

    def toggle(self, _signum: int, _frame: object) -> None:
        if self.profile is None:
            self.profile = cProfile.Profile(time.thread_time)
            self.profile.enable()
        else:
            self.profile.disable()
            self.profile.dump_stats(self.out)


if __name__ == "__main__":
    patch(os.environ.get("BENCH_PATCHES", ""))
    if os.environ.get("COUNT_DIR"):
        install()
        signal.signal(signal.SIGUSR1, _snapshot)
    if os.environ.get("CPROFILE_OUT"):
        signal.signal(signal.SIGUSR2, _Profiler(os.environ["CPROFILE_OUT"]).toggle)
    main()
