"""Where a node keeps its files, and the lock that keeps one node per directory.

A node's home holds everything it owns::

    config.toml     settings (documented defaults; see docs/node.md)
    identity.json   keys and federation secret (mode 0600)
    node.db         the ops (SQLite, WAL) and the state snapshot
    node.lock       held while a node runs
    rpc.sock        the local RPC (mode 0600)
    rpc.token       the bearer token of the RPC's TCP port, if enabled (mode 0600)

The default home is the platform data directory (``platformdirs``), e.g.
``~/.local/share/archipel`` on Linux; ``ARCHIPEL_HOME`` or ``--home`` chooses
another, so that several nodes can run on one machine.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from archipel.crdt import ArchipelError

HOME_ENV = "ARCHIPEL_HOME"


class HomeError(ArchipelError):
    """The node's directory cannot be used (missing, locked, bad permissions)."""


class AlreadyRunning(HomeError):
    """Another node holds this directory's lock."""


@dataclass(frozen=True, slots=True)
class Home:
    """The files of one node."""

    root: Path

    @classmethod
    def resolve(cls, given: str | os.PathLike[str] | None = None) -> Home:
        """``given``, else ``$ARCHIPEL_HOME``, else the platform data directory."""
        if given is not None:
            return cls(Path(given).expanduser())
        env = os.environ.get(HOME_ENV)
        if env:
            return cls(Path(env).expanduser())
        return cls(Path(platformdirs.user_data_dir("archipel", appauthor=False)))

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def identity(self) -> Path:
        return self.root / "identity.json"

    @property
    def database(self) -> Path:
        return self.root / "node.db"

    @property
    def lock(self) -> Path:
        return self.root / "node.lock"

    @property
    def rpc_socket(self) -> Path:
        return self.root / "rpc.sock"

    @property
    def rpc_token(self) -> Path:
        return self.root / "rpc.token"

    def create(self) -> None:
        """Make the directory, readable by this user only."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.root.chmod(0o700)

    def exists(self) -> bool:
        return self.identity.exists()


class NodeLock:
    """An exclusive ``flock`` on ``node.lock``; the file names the holder's pid.

    The kernel drops the lock when the process dies, however it dies, so a
    node killed with ``kill -9`` never leaves a stale lock behind.
    """

    def __init__(self, home: Home) -> None:
        self._home = home
        self._fd: int | None = None

    def acquire(self) -> None:
        path = self._home.lock
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise HomeError(f"cannot open the lock file {path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise AlreadyRunning(
                f"another Archipel node (pid {holder}) is running with the directory"
                f" {self._home.root}; stop it first, or choose another with --home"
            ) from None
        # The pid is only for the message above; the flock is the lock. On a
        # full disk the write fails, and the node must still start (it keeps
        # serving reads and sync): without a pid, a second node says "unknown".
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing drops the flock

    def __enter__(self) -> NodeLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
