"""Real daemons as child processes: start, kill, pause, resume, stop; and what they use.

Each daemon is ``archipel run`` in its own process, listening on a fixed
loopback port (so that a restart comes back where its peers' proxies point)
and logging JSON lines to ``logs/nodeN.log`` beside the homes. Its RPC is reached
through the Unix socket in its home.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import trio

from archipel.client import AsyncClient, NodeUnreachable, RpcError
from archipel.crdt import ArchipelError
from archipel.daemon.identity import Identity
from archipel.daemon.paths import Home

from .._common import READY

READY_S = 60.0
STOP_S = 30.0
CALL_TIMEOUT_S = 10.0


class ClusterError(ArchipelError):
    """The cluster could not be set up or driven (a daemon that does not start, say)."""


@dataclass(eq=False)
class Daemon:
    index: int
    home: Home
    identity: Identity
    port: int
    offset_ms: int = 0
    process: trio.Process | None = None
    client: AsyncClient | None = None
    state: str = "down"
    """down (never started, killed or stopped cleanly), up, or paused (SIGSTOP)."""
    starts: int = 0
    samples: list[tuple[float, int, int]] = field(default_factory=list)
    """(seconds into the run, RSS in KiB, open file descriptors)."""

    @property
    def name(self) -> str:
        return f"node{self.index}"

    @property
    def log_path(self) -> Path:
        """Outside the home, which may be a tmpfs made to fill up."""
        return self.home.root.parent.parent / "logs" / f"{self.name}.log"

    @property
    def rpc(self) -> AsyncClient:
        if self.client is None:
            raise ClusterError(f"{self.name} is not running")
        return self.client

    @property
    def listen(self) -> str:
        return f"/ip4/127.0.0.1/tcp/{self.port}"

    async def start(self, nursery: trio.Nursery) -> None:
        """Start the daemon and return once it listens; its stderr goes to its log."""
        if self.state != "down":
            raise ClusterError(f"{self.name} is already running")
        command = [
            sys.executable, "-m", "archipel.cli.main", "run", "--home", str(self.home.root),
            "--listen", self.listen, "--no-mdns", "--log-format", "json",
        ]  # fmt: skip
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        process = await trio.lowlevel.open_process(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        assert process.stderr is not None
        seen = b""
        try:
            with trio.fail_after(READY_S):
                while not READY.search(seen):
                    chunk = await process.stderr.receive_some(65536)
                    if not chunk:
                        break
                    seen += chunk
                    log.write(chunk)
        except trio.TooSlowError:
            pass
        if not READY.search(seen):
            with contextlib.suppress(OSError):
                process.kill()
            await process.wait()
            log.close()
            tail = seen.decode(errors="replace").strip().splitlines()[-5:]
            raise ClusterError(f"{self.name} did not start: " + (" | ".join(tail) or "no output"))
        self.process = process
        self.state = "up"
        self.starts += 1
        self.client = AsyncClient(self.home.root, timeout_s=CALL_TIMEOUT_S)
        nursery.start_soon(_drain, process.stderr, log)

    @contextlib.contextmanager
    def blame(self, what: str) -> Iterator[None]:
        """Turn a failed RPC call into a :class:`ClusterError` naming this daemon
        and its log, for the calls whose failure ends the run."""
        try:
            yield
        except (RpcError, NodeUnreachable) as exc:
            where = f"its log: {self.log_path}"
            raise ClusterError(f"{self.name}: {what} failed: {exc} ({where})") from exc

    def kill(self) -> None:
        """SIGKILL: no chance to save anything; what was acknowledged must survive."""
        self._signal(signal.SIGKILL)
        self.state = "down"

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)
        self.state = "paused"

    def resume(self) -> None:
        self._signal(signal.SIGCONT)
        self.state = "up"

    async def reap(self) -> None:
        """Wait for a killed daemon's process and let go of its client."""
        if self.process is not None:
            await self.process.wait()
            self.process = None
        if self.client is not None:
            with trio.CancelScope(shield=True):
                await self.client.aclose()
            self.client = None

    async def stop(self) -> None:
        """SIGTERM and wait (SIGKILL after STOP_S): a clean shutdown."""
        process = self.process
        if process is not None and process.returncode is None:
            if self.state == "paused":
                self._signal(signal.SIGCONT)
            self._signal(signal.SIGTERM)
            with trio.move_on_after(STOP_S):
                await process.wait()
            if process.returncode is None:
                self._signal(signal.SIGKILL)
        self.state = "down"
        await self.reap()

    def sample(self, t: float) -> None:
        """Record RSS and open descriptors (Linux /proc) of a running daemon."""
        process = self.process
        if process is None or process.returncode is not None:
            return
        try:
            rss = _rss_kib(process.pid)
            fds = len(os.listdir(f"/proc/{process.pid}/fd"))
        except OSError:
            return
        self.samples.append((round(t, 3), rss, fds))

    def _signal(self, signum: signal.Signals) -> None:
        process = self.process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signum)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _drain(stream: trio.abc.ReceiveStream, log: BinaryIO) -> None:
    """Copy a daemon's stderr to its log; keep reading (so that the daemon never
    blocks on a full pipe) even if the log cannot be written."""
    try:
        while chunk := await stream.receive_some(65536):
            with contextlib.suppress(OSError):
                log.write(chunk)
                log.flush()
    except (trio.ClosedResourceError, trio.BrokenResourceError, OSError):
        pass
    finally:
        with contextlib.suppress(OSError):
            log.close()


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0
