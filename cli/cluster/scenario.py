"""Cluster scenarios: TOML files naming the daemons, the workload and the faults.

A scenario is checked completely before any daemon starts: an unknown key, a
value of the wrong type or a fault naming a node that does not exist is a
:class:`ClusterScenarioError` that says where. Fields and their defaults are
documented in docs/cluster.md; the library lives in ``scenarios/`` beside this
file.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from archipel.crdt import ArchipelError

MAX_NODES = 32
MAX_DURATION_S = 3600.0
MAX_RATE = 200.0
KINDS = ("note", "ledger", "aid", "mandate", "vote")
FAULTS = {
    # kind: (needs "nodes", needs "groups", needs "ms")
    "partition": (False, True, False),
    "heal": (False, False, False),
    "kill": (True, False, False),
    "restart": (True, False, False),
    "stop": (True, False, False),
    "cont": (True, False, False),
    "delay": (True, False, True),
    "drop": (True, False, False),
    "undrop": (True, False, False),
    "disk_full": (True, False, False),
    "disk_free": (True, False, False),
}


class ClusterScenarioError(ArchipelError, ValueError):
    """A cluster scenario file is unreadable or holds a bad value."""


@dataclass(frozen=True, slots=True)
class Fault:
    at_s: float
    kind: str
    nodes: tuple[int, ...] = ()
    groups: tuple[tuple[int, ...], ...] = ()
    ms: int = 0


@dataclass(frozen=True, slots=True)
class Workload:
    rate: float = 2.0
    """Ops per second, per node, authored through its RPC."""
    mix: tuple[tuple[str, float], ...] = (("note", 1.0),)
    """Weights of each kind of work (see KINDS)."""


@dataclass(frozen=True, slots=True)
class ClusterScenario:
    name: str
    description: str = ""
    nodes: int = 5
    duration_s: float = 30.0
    """How long the workload runs; faults happen inside this window."""
    settle_s: float = 60.0
    """After the workload: how long the nodes have to agree before the run fails."""
    seed: int = 1
    workload: Workload = field(default_factory=Workload)
    faults: tuple[Fault, ...] = ()
    clock_offsets_ms: tuple[tuple[int, int], ...] = ()
    """(node, ms): a node whose clock runs ahead (or behind)."""
    disk_nodes: tuple[int, ...] = ()
    """Nodes whose home lives on a small tmpfs (for disk_full faults; needs root)."""
    disk_mb: int = 16


def library() -> list[str]:
    folder = resources.files("archipel.cli.cluster") / "scenarios"
    return sorted(
        p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml")
    )


def load(source: str | Path) -> ClusterScenario:
    """A scenario from a file path, or by name from the library."""
    path = Path(source)
    if path.suffix != ".toml" and str(source) in library():
        text = (resources.files("archipel.cli.cluster") / "scenarios" / f"{source}.toml").read_text(
            encoding="utf-8"
        )
        where = f"library scenario {source}"
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            known = ", ".join(library())
            raise ClusterScenarioError(
                f"{source}: cannot read ({exc.__class__.__name__}); library scenarios: {known}"
            ) from None
        where = str(path)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ClusterScenarioError(f"{where}: not valid TOML: {exc}") from None
    return parse(raw, where)


def parse(raw: dict[str, Any], where: str = "scenario") -> ClusterScenario:
    _only(
        raw,
        {"name", "description", "nodes", "duration_s", "settle_s", "seed", "workload",
         "faults", "clock", "disk"},
        where, "",
    )  # fmt: skip
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise ClusterScenarioError(f"{where}: 'name' is required (a non-empty string)")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise ClusterScenarioError(f"{where}: 'description' must be a string")
    nodes = _int(raw.get("nodes", 5), where, "nodes", 2, MAX_NODES)
    duration = _number(raw.get("duration_s", 30.0), where, "duration_s", 1.0, MAX_DURATION_S)
    settle = _number(raw.get("settle_s", 60.0), where, "settle_s", 1.0, MAX_DURATION_S)
    seed = _int(raw.get("seed", 1), where, "seed", 0, 2**63 - 1)
    workload = _workload(_table(raw.get("workload", {}), where, "workload"), where)
    faults_raw = raw.get("faults", [])
    if not isinstance(faults_raw, list):
        raise ClusterScenarioError(f"{where}: 'faults' must be an array of tables ([[faults]])")
    faults = tuple(
        sorted(
            (_fault(f, where, i, nodes, duration) for i, f in enumerate(faults_raw)),
            key=lambda f: f.at_s,
        )
    )
    clock = _table(raw.get("clock", {}), where, "clock")
    _only(clock, {"offsets_ms"}, where, "clock.")
    offsets = []
    for key, value in sorted(
        _table(clock.get("offsets_ms", {}), where, "clock.offsets_ms").items()
    ):
        node = _node_key(key, where, "clock.offsets_ms", nodes)
        offsets.append(
            (node, _int(value, where, f"clock.offsets_ms.{key}", -86_400_000, 86_400_000))
        )
    disk = _table(raw.get("disk", {}), where, "disk")
    _only(disk, {"nodes", "size_mb"}, where, "disk.")
    disk_nodes = _nodes(disk.get("nodes", []), where, "disk.nodes", nodes)
    disk_mb = _int(disk.get("size_mb", 16), where, "disk.size_mb", 4, 1024)
    for fault in faults:
        if fault.kind in ("disk_full", "disk_free"):
            outside = sorted(set(fault.nodes) - set(disk_nodes))
            if outside:
                raise ClusterScenarioError(
                    f"{where}: a {fault.kind} fault names node {outside[0]}, which is not in"
                    " disk.nodes (only those live on a tmpfs that can fill up)"
                )
    return ClusterScenario(
        name=name,
        description=description,
        nodes=nodes,
        duration_s=duration,
        settle_s=settle,
        seed=seed,
        workload=workload,
        faults=faults,
        clock_offsets_ms=tuple(offsets),
        disk_nodes=disk_nodes,
        disk_mb=disk_mb,
    )


def with_nodes(scenario: ClusterScenario, nodes: int) -> ClusterScenario:
    """The scenario with another number of daemons (``--nodes``), if its faults allow."""
    raw_faults = [f for f in scenario.faults if any(n >= nodes for n in f.nodes)]
    raw_groups = [f for f in scenario.faults if any(n >= nodes for g in f.groups for n in g)]
    if raw_faults or raw_groups or any(n >= nodes for n in scenario.disk_nodes):
        raise ClusterScenarioError(
            f"{scenario.name}: its faults name nodes beyond {nodes - 1}: run it with more nodes"
        )
    if not 2 <= nodes <= MAX_NODES:
        raise ClusterScenarioError(f"--nodes must be in [2, {MAX_NODES}]")
    return replace(scenario, nodes=nodes)


def _workload(raw: dict[str, Any], where: str) -> Workload:
    _only(raw, {"rate", "mix"}, where, "workload.")
    rate = _number(raw.get("rate", 2.0), where, "workload.rate", 0.0, MAX_RATE)
    mix_raw = _table(raw.get("mix", {"note": 1.0}), where, "workload.mix")
    _only(mix_raw, set(KINDS), where, "workload.mix.")
    mix = tuple(
        (kind, _number(w, where, f"workload.mix.{kind}", 0.0, 1e6))
        for kind, w in sorted(mix_raw.items())
    )
    if rate > 0 and not any(w > 0 for _, w in mix):
        raise ClusterScenarioError(f"{where}: workload.mix needs one kind with a weight above 0")
    return Workload(rate=rate, mix=mix)


def _fault(raw: Any, where: str, index: int, nodes: int, duration: float) -> Fault:
    at = f"faults[{index}]"
    table = _table(raw, where, at)
    _only(table, {"at_s", "kind", "nodes", "groups", "ms"}, where, f"{at}.")
    kind = table.get("kind")
    if kind not in FAULTS:
        raise ClusterScenarioError(f"{where}: {at}.kind must be one of {', '.join(FAULTS)}")
    at_s = _number(table.get("at_s"), where, f"{at}.at_s", 0.0, duration)
    needs_nodes, needs_groups, needs_ms = FAULTS[kind]
    fault_nodes = _nodes(table.get("nodes", []), where, f"{at}.nodes", nodes)
    if needs_nodes and not fault_nodes:
        raise ClusterScenarioError(f"{where}: {at} ({kind}) needs 'nodes'")
    groups: tuple[tuple[int, ...], ...] = ()
    if needs_groups:
        groups_raw = table.get("groups")
        if not isinstance(groups_raw, list) or len(groups_raw) < 2:
            raise ClusterScenarioError(
                f"{where}: {at} (partition) needs 'groups': 2 or more arrays"
            )
        groups = tuple(_nodes(g, where, f"{at}.groups", nodes) for g in groups_raw)
        flat = [n for g in groups for n in g]
        if len(flat) != len(set(flat)) or any(not g for g in groups):
            raise ClusterScenarioError(f"{where}: {at}.groups must be disjoint, non-empty groups")
    ms = _int(table.get("ms", 0), where, f"{at}.ms", 0, 60_000) if needs_ms else 0
    if needs_ms and ms == 0 and "ms" not in table:
        raise ClusterScenarioError(f"{where}: {at} (delay) needs 'ms'")
    return Fault(at_s=at_s, kind=kind, nodes=fault_nodes, groups=groups, ms=ms)


def _nodes(value: Any, where: str, name: str, nodes: int) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise ClusterScenarioError(f"{where}: {name} must be an array of node numbers")
    for v in value:
        if not 0 <= v < nodes:
            raise ClusterScenarioError(f"{where}: {name} names node {v}; nodes are 0..{nodes - 1}")
    return tuple(dict.fromkeys(value))


def _node_key(key: str, where: str, name: str, nodes: int) -> int:
    if not key.isdigit() or not 0 <= int(key) < nodes:
        raise ClusterScenarioError(f"{where}: {name}: {key!r} is not a node number 0..{nodes - 1}")
    return int(key)


def _table(value: Any, where: str, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ClusterScenarioError(f"{where}: {name} must be a table")
    return value


def _only(table: dict[str, Any], allowed: set[str], where: str, prefix: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        known = ", ".join(prefix + k for k in sorted(allowed))
        raise ClusterScenarioError(f"{where}: unknown key {prefix}{unknown[0]} (known: {known})")


def _int(value: Any, where: str, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ClusterScenarioError(f"{where}: {name} must be an integer in [{low}, {high}]")
    return value


def _number(value: Any, where: str, name: str, low: float, high: float) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not low <= value <= high:
        raise ClusterScenarioError(f"{where}: {name} must be a number in [{low:g}, {high:g}]")
    return float(value)
