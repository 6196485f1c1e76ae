"""The node's settings: ``config.toml`` in its home, every field optional.

``archipel init`` writes the file with every default spelled out and
commented, so that a cell can see what it may change. Unknown tables or keys,
and values of the wrong type, are refused with the key's name: a typo must
not silently fall back to a default.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from archipel.crdt import ArchipelError

DEFAULT_PORT = 7717


class ConfigError(ArchipelError):
    """``config.toml`` is unreadable or holds a bad value."""


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    listen: tuple[str, ...] = (f"/ip4/0.0.0.0/tcp/{DEFAULT_PORT}",)
    bootstrap: tuple[str, ...] = ()
    mdns: bool = True
    dial_timeout_s: float = 10.0
    max_connections: int = 64
    peer_addresses: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """(peer id, addresses): dial these peers only there, whatever they announce."""


@dataclass(frozen=True, slots=True)
class LogConfig:
    format: str = "human"
    level: str = "info"


@dataclass(frozen=True, slots=True)
class RpcConfig:
    tcp_port: int = 0
    """0: the Unix socket only. Otherwise also a localhost TCP port, with a token."""


@dataclass(frozen=True, slots=True)
class ClockConfig:
    offset_ms: int = 0
    """Added to the system clock: for testing clock skew, or a clock known to be off."""


MAX_CLOCK_OFFSET_MS = 7 * 24 * 3600 * 1000


@dataclass(frozen=True, slots=True)
class Config:
    network: NetworkConfig = field(default_factory=NetworkConfig)
    log: LogConfig = field(default_factory=LogConfig)
    rpc: RpcConfig = field(default_factory=RpcConfig)
    clock: ClockConfig = field(default_factory=ClockConfig)


LOG_FORMATS = ("human", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")

TEMPLATE = f"""\
# Archipel node settings. Every value shown is the default; uncomment to change.
# Reference: docs/node.md.

[network]
# Addresses to listen on (libp2p multiaddrs). tcp/0 picks a free port.
# listen = ["/ip4/0.0.0.0/tcp/{DEFAULT_PORT}"]
# Nodes to contact at start-up (multiaddrs ending in /p2p/<peer id>); invites add theirs.
# bootstrap = []
# Find and advertise nodes of the federation on the local network (mDNS).
# mdns = true
# Give up a connection attempt after this many seconds.
# dial_timeout_s = 10.0
# Connections held at once, both directions.
# max_connections = 64

# Dial these peers only at these addresses, whatever they announce (a VPN
# address, a port forward; the cluster harness's fault proxy). Keys are peer ids.
# [network.peer_addresses]
# "12D3KooW..." = ["/ip4/10.8.0.2/tcp/7717"]

[log]
# "human" or "json" (one object per line, for log collectors).
# format = "human"
# "debug", "info", "warning" or "error".
# level = "info"

[rpc]
# The RPC listens on a Unix socket in the node's directory (this user only).
# A port above 0 also opens 127.0.0.1:<port>, which needs the token in rpc.token.
# tcp_port = 0

[clock]
# Milliseconds added to the system clock. Leave at 0 unless testing clock skew:
# ops dated more than 60 s ahead of their receivers wait until then.
# offset_ms = 0
"""


def load(path: Path) -> Config:
    """Read ``path``; a missing file means every default."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Config()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    return parse(text, where=str(path))


def parse(text: str, where: str = "config.toml") -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    _only(raw, {"network", "log", "rpc", "clock"}, where, "")
    network = _table(raw, "network", where)
    log = _table(raw, "log", where)
    rpc = _table(raw, "rpc", where)
    clock = _table(raw, "clock", where)
    _only(clock, set(ClockConfig.__dataclass_fields__), where, "clock.")
    _only(network, set(NetworkConfig.__dataclass_fields__), where, "network.")
    _only(log, set(LogConfig.__dataclass_fields__), where, "log.")
    _only(rpc, set(RpcConfig.__dataclass_fields__), where, "rpc.")
    net = NetworkConfig()
    if "listen" in network:
        net = replace(net, listen=_strings(network["listen"], where, "network.listen", 1))
    if "bootstrap" in network:
        net = replace(net, bootstrap=_strings(network["bootstrap"], where, "network.bootstrap", 0))
    if "mdns" in network:
        net = replace(net, mdns=_bool(network["mdns"], where, "network.mdns"))
    if "dial_timeout_s" in network:
        value = network["dial_timeout_s"]
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 600:
            raise ConfigError(f"{where}: network.dial_timeout_s must be seconds in (0, 600]")
        net = replace(net, dial_timeout_s=float(value))
    if "max_connections" in network:
        count = _int(network["max_connections"], where, "network.max_connections", 1, 10_000)
        net = replace(net, max_connections=count)
    if "peer_addresses" in network:
        net = replace(net, peer_addresses=_peer_addresses(network["peer_addresses"], where))
    logs = LogConfig(
        format=_choice(log.get("format", "human"), LOG_FORMATS, where, "log.format"),
        level=_choice(log.get("level", "info"), LOG_LEVELS, where, "log.level"),
    )
    port = _int(rpc.get("tcp_port", 0), where, "rpc.tcp_port", 0, 65535)
    bound = MAX_CLOCK_OFFSET_MS
    offset = _int(clock.get("offset_ms", 0), where, "clock.offset_ms", -bound, bound)
    return Config(
        network=net,
        log=logs,
        rpc=RpcConfig(tcp_port=port),
        clock=ClockConfig(offset_ms=offset),
    )


def _peer_addresses(value: object, where: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    name = "network.peer_addresses"
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {name} must be a table of peer id = [addresses]")
    out = []
    for peer, addrs in sorted(value.items()):
        if not peer.startswith("12D3KooW") or not 40 <= len(peer) <= 60:
            raise ConfigError(f"{where}: {name}: {peer!r} is not an Ed25519 peer id (12D3KooW…)")
        out.append((peer, _strings(addrs, where, f"{name}.{peer}", 1)))
    return tuple(out)


def _table(raw: dict[str, Any], name: str, where: str) -> dict[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: [{name}] must be a table")
    return value


def _only(table: dict[str, Any], allowed: set[str], where: str, prefix: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        known = ", ".join(prefix + k for k in sorted(allowed))
        raise ConfigError(f"{where}: unknown setting {prefix}{unknown[0]} (known: {known})")


def _strings(value: object, where: str, name: str, least: int) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where}: {name} must be a list of non-empty strings")
    if len(value) < least:
        raise ConfigError(f"{where}: {name} needs at least {least} entry")
    return tuple(value)


def _bool(value: object, where: str, name: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {name} must be true or false")
    return value


def _int(value: object, where: str, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{where}: {name} must be an integer in [{low}, {high}]")
    return value


def _choice(value: object, choices: tuple[str, ...], where: str, name: str) -> str:
    if value not in choices:
        raise ConfigError(f"{where}: {name} must be one of {', '.join(choices)}")
    assert isinstance(value, str)
    return value
