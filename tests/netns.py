"""Network namespaces for multi-host tests: private LANs that never touch the host's network.

    with netns.lan(3) as net:            # three hosts on one bridge, 10.77.0.1-3/24
        argv = net.exec(0, [sys.executable, "-c", "..."])   # run a command on host 0

Every host is a namespace with ``lo`` up and one interface ``eth0`` (multicast
on). ``lan(2, bridge=False)`` joins two hosts by a bare veth pair; otherwise a
switch namespace holds a bridge ``br0`` with one port per host (multicast
snooping off, so mDNS floods like on a dumb switch). Nothing is created in the
host's own namespace: links are created straight inside the namespaces.

Namespace names carry the pid and a counter, so parallel runs do not collide.
Teardown deletes every namespace it created (which removes their links) in all
cases; processes still running inside are the caller's to stop first. A run
that was killed leaves its namespaces behind: the next :func:`lan` deletes
those whose pid is gone (:func:`remove_stale`).

Needs root (or CAP_SYS_ADMIN and CAP_NET_ADMIN) and iproute2's ``ip``;
:func:`unavailable` says why not, for ``pytest.skip``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

_counter = itertools.count()
_TIMEOUT_S = 10


class NetnsError(Exception):
    """An ``ip`` command failed while building or tearing down a test network."""


def _ip(*args: str) -> None:
    done = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=_TIMEOUT_S, check=False
    )
    if done.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")


_PREFIX = "archtest"
_STALE = re.compile(rf"{_PREFIX}(\d+)-")


def _unique(label: str) -> str:
    return f"{_PREFIX}{os.getpid()}-{next(_counter)}-{label}"


def remove_stale() -> list[str]:
    """Delete namespaces left by test runs that died (their pid is gone); return their names."""
    listed = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, timeout=_TIMEOUT_S, check=False
    )
    removed = []
    for line in listed.stdout.splitlines():
        name = line.split(" ", 1)[0]
        match = _STALE.match(name)
        if match is None or _alive(int(match.group(1))):
            continue
        with contextlib.suppress(NetnsError, OSError, subprocess.TimeoutExpired):
            _ip("netns", "del", name)
            removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's process
        return True
    return True


def unavailable() -> str | None:
    """Why namespaces cannot be used here, or ``None`` if they can (a probe
    namespace is created and deleted)."""
    if shutil.which("ip") is None:
        return "iproute2's 'ip' command is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = _unique("probe")
    try:
        _ip("netns", "add", probe)
    except (NetnsError, OSError, subprocess.TimeoutExpired) as exc:
        return f"'ip netns add' failed: {exc}"
    try:
        _ip("netns", "del", probe)
    except (NetnsError, OSError, subprocess.TimeoutExpired) as exc:  # pragma: no cover
        return f"'ip netns del' failed: {exc}"
    return None


@dataclass
class Lan:
    """A test LAN: ``hosts[i]`` is a namespace name, ``addrs[i]`` its IPv4 address."""

    hosts: list[str] = field(default_factory=list)
    addrs: list[str] = field(default_factory=list)
    switch: str | None = None

    def exec(self, host: int, argv: Sequence[str]) -> list[str]:
        """The command line that runs ``argv`` inside host ``host``'s namespace.

        ``ip netns exec`` execs the command in place, so the pid of the process
        started from it is the command's own.
        """
        return ["ip", "netns", "exec", self.hosts[host], *argv]

    def run(self, host: int, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` to completion inside host ``host`` (bounded by a timeout)."""
        return subprocess.run(
            self.exec(host, argv), capture_output=True, text=True, timeout=_TIMEOUT_S, check=False
        )


@contextlib.contextmanager
def lan(count: int, *, bridge: bool = True, subnet: str = "10.77.0") -> Iterator[Lan]:
    """``count`` hosts on a private LAN (``subnet``.1 to ``subnet``.count, /24).

    Raises :class:`NetnsError` if the network cannot be built (after cleaning up
    what was built). ``bridge=False`` needs exactly two hosts.
    """
    if not 1 <= count <= 200:
        raise ValueError("a test LAN has 1 to 200 hosts")
    if not bridge and count != 2:
        raise ValueError("a bare veth pair joins exactly two hosts")
    remove_stale()
    net = Lan()
    try:
        for i in range(count):
            name = _unique(f"h{i}")
            _ip("netns", "add", name)
            net.hosts.append(name)
            net.addrs.append(f"{subnet}.{i + 1}")
            _ip("-n", name, "link", "set", "lo", "up")
        if bridge:
            net.switch = _unique("sw")
            _ip("netns", "add", net.switch)
            _ip("-n", net.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", net.switch, "link", "set", "br0", "type", "bridge", "mcast_snooping", "0")
            _ip("-n", net.switch, "link", "set", "br0", "up")
            for i, host in enumerate(net.hosts):
                port = f"p{i}"
                _ip("link", "add", "eth0", "netns", host, "type", "veth",
                    "peer", "name", port, "netns", net.switch)  # fmt: skip
                _ip("-n", net.switch, "link", "set", port, "master", "br0")
                _ip("-n", net.switch, "link", "set", port, "up")
        else:
            a, b = net.hosts
            _ip(
                "link",
                "add",
                "eth0",
                "netns",
                a,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                b,
            )
        for host, addr in zip(net.hosts, net.addrs, strict=True):
            _ip("-n", host, "addr", "add", f"{addr}/24", "dev", "eth0")
            _ip("-n", host, "link", "set", "eth0", "multicast", "on")
            _ip("-n", host, "link", "set", "eth0", "up")
        yield net
    finally:
        _teardown(net)


def _teardown(net: Lan) -> None:
    errors = []
    for name in [*net.hosts, *([net.switch] if net.switch else [])]:
        try:
            _ip("netns", "del", name)
        except (NetnsError, OSError, subprocess.TimeoutExpired) as exc:
            errors.append(str(exc))
    if errors:
        raise NetnsError("teardown left namespaces behind: " + "; ".join(errors))
