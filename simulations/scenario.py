"""Scenarios: what a simulation run does, read from a TOML file.

A scenario names the network (nodes, topology, latency, bandwidth), the
workload (op rate per node, the mix, the share of reads), the faults (a
schedule, or random arrivals at a rate) and the protocol's tuning. Every
field is documented in ``docs/simulations.md``; unknown fields and values of
the wrong type are refused with the field named, so a typo cannot silently
change a run. Fault times are fractions of the workload's duration, so a
shortened run (fewer nodes, less time: :func:`load` takes ``overrides``)
keeps its shape.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from archipel.crdt import ArchipelError
from archipel.protocol.node import SyncConfig
from archipel.protocol.plumtree import PushLimits

from .workload import GENESIS_CELLS_MAX

LIBRARY = Path(__file__).resolve().parent / "scenarios"
"""The scenario library shipped with the simulator."""

LATENCY_KINDS = ("fixed", "uniform", "lognormal", "exponential")
TOPOLOGIES = ("full-mesh", "random-regular", "clusters", "small-world")
LINKS = ("any", "topology")
FAULT_KINDS = ("partition", "crash", "lose", "churn", "skew")
PARTITION_SHAPES = ("halves", "islands", "bridge")
MIX_ACTIONS = (
    "vote",
    "claim",
    "ledger",
    "act",
    "note",
    "proposal",
    "offer",
    "grant",
    "seal",
    "recall",
    "alert",
)


class ScenarioError(ArchipelError, ValueError):
    """A scenario file or override is malformed, or names no scenario: the
    message says which field (or which name) and what is expected."""


@dataclass(frozen=True, slots=True)
class Latency:
    """A distribution of delays (ms), drawn per message; also the duration of
    faults that arrive at random."""

    kind: str = "fixed"
    ms: int = 100  # fixed; exponential: the mean
    low_ms: int = 50  # uniform
    high_ms: int = 150  # uniform
    median_ms: int = 100  # lognormal
    sigma: float = 0.5  # lognormal


@dataclass(frozen=True, slots=True)
class Topology:
    """Whom each node knows when it starts (its bootstrap addresses), and
    whether other links exist at all."""

    kind: str = "full-mesh"
    degree: int = 6  # random-regular, small-world: addresses each node knows
    rewire: float = 0.1  # small-world: probability that a ring link is rewired
    clusters: int = 4  # clusters: nodes in contiguous groups ...
    bridge: Latency = field(default_factory=lambda: Latency(ms=300))  # ... joined by slower links
    links: str = "any"  # "topology": only the topology's links exist


@dataclass(frozen=True, slots=True)
class Bandwidth:
    """Bytes per second of each link direction (0: unlimited)."""

    bytes_per_s: int = 0
    bridge_bytes_per_s: int = 0  # clusters: links between groups (0: as bytes_per_s)


@dataclass(frozen=True, slots=True)
class Workload:
    """Ops authored on the nodes' own replicas while the workload runs."""

    rate: float = 1.0  # operations per second per node (reads included)
    reads: float = 0.0  # share of operations that are reads
    mix: Mapping[str, int] = field(default_factory=lambda: {"note": 1})
    warmup_ms: int = 3_000  # joining and settling before the first op
    genesis_cells: int = GENESIS_CELLS_MAX  # cells founded in the genesis; the others admitted


@dataclass(frozen=True, slots=True)
class Fault:
    """One fault: scheduled at ``at`` (a fraction of the duration), or, with
    ``rate_per_min``, arriving at random between ``at`` and ``until``."""

    kind: str
    at: float = 0.0
    until: float | None = None  # partition: heal; crash: restart; churn: stop; rate: window
    shape: str = "halves"  # partition
    islands: int = 3  # partition shape "islands" / "bridge"
    fraction: float = 0.0  # crash / lose: share of the nodes (node 0 is spared)
    interval_ms: int = 1_000  # churn: one node leaves and one rejoins this often
    max_ms: int = 0  # skew: offsets drawn in [-max_ms, max_ms]
    rate_per_min: float = 0.0  # > 0: Poisson arrivals at this rate (per minute, in all)
    duration: Latency | None = None  # rate: how long each partition or crash lasts


@dataclass(frozen=True, slots=True)
class Protocol:
    """Overrides of the protocol's timers (``SyncConfig``, ``PushLimits``)."""

    sync: Mapping[str, int] = field(default_factory=dict)
    push: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    description: str = ""
    seed: int = 1
    nodes: int = 10
    duration_ms: int = 10_000
    settle_ms: int = 30_000  # at most this long after the workload to converge
    sample_ms: int = 100  # how often convergence is checked and the series sampled
    topology: Topology = field(default_factory=Topology)
    latency: Latency = field(default_factory=Latency)
    bandwidth: Bandwidth = field(default_factory=Bandwidth)
    workload: Workload = field(default_factory=Workload)
    faults: tuple[Fault, ...] = ()
    protocol: Protocol = field(default_factory=Protocol)

    @property
    def summary(self) -> str:
        """The description's first line (what ``archipel sim list`` shows)."""
        return self.description.strip().split("\n", 1)[0].strip()


def library() -> list[str]:
    """The names of the library's scenarios, sorted."""
    return sorted(p.stem for p in LIBRARY.glob("*.toml"))


def load(source: str | Path, overrides: Mapping[str, Any] | None = None) -> Scenario:
    """A scenario from a file path, or a library name (``"churn"``), with
    ``overrides`` applied: dotted keys (``"workload.rate"``, ``"faults.0.at"``)
    to values. Raises :class:`ScenarioError` for anything malformed."""
    path = Path(source)
    if not path.suffix and not path.exists():
        path = LIBRARY / f"{source}.toml"
        if not path.is_file():
            raise ScenarioError(
                f"no scenario {str(source)!r}: not a file, and not one of the library's"
                f" ({', '.join(library())})"
            )
    try:
        with path.open("rb") as file:
            raw = tomllib.load(file)
    except OSError as exc:
        raise ScenarioError(f"cannot read scenario {str(source)!r}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: not valid TOML: {exc}") from exc
    return parse(raw, overrides)


def parse(raw: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> Scenario:
    """A scenario from TOML data (and ``overrides``, as for :func:`load`)."""
    data: dict[str, Any] = _copy(raw)
    for key, value in (overrides or {}).items():
        _override(data, key, value)
    faults_raw = data.pop("faults", [])
    if not isinstance(faults_raw, list) or not all(isinstance(f, dict) for f in faults_raw):
        raise ScenarioError("faults: expected an array of tables ([[faults]])")
    faults = tuple(_fault(f, f"faults.{i}") for i, f in enumerate(faults_raw))
    topology = _table(data.pop("topology", {}), "topology")
    bridge = _build(
        Latency, _table(topology.pop("bridge", {}), "topology.bridge"), "topology.bridge"
    )
    scenario = Scenario(
        topology=_build(Topology, {**topology, "bridge": bridge}, "topology"),
        latency=_build(Latency, _table(data.pop("latency", {}), "latency"), "latency"),
        bandwidth=_build(Bandwidth, _table(data.pop("bandwidth", {}), "bandwidth"), "bandwidth"),
        workload=_build(Workload, _table(data.pop("workload", {}), "workload"), "workload"),
        faults=faults,
        protocol=_build(Protocol, _table(data.pop("protocol", {}), "protocol"), "protocol"),
        **_checked(Scenario, data, ""),
    )
    _validate(scenario)
    return scenario


def _copy(raw: Any) -> Any:
    if isinstance(raw, Mapping):
        return {k: _copy(v) for k, v in raw.items()}
    if isinstance(raw, list):
        return [_copy(v) for v in raw]
    return raw


def _override(data: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted ``key`` in ``data``; a number indexes an array of tables."""
    *parents, last = key.split(".")
    table: Any = data
    for part in parents:
        if isinstance(table, list):
            if not part.isdigit() or int(part) >= len(table):
                raise ScenarioError(f"override {key}: no entry {part} in that array")
            table = table[int(part)]
        else:
            table = table.setdefault(part, {})
        if not isinstance(table, dict | list):
            raise ScenarioError(f"override {key}: {part} is not a table")
    if isinstance(table, list):
        raise ScenarioError(f"override {key}: name a field of one entry ({key}.FIELD)")
    table[last] = _copy(value)


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ScenarioError(f"[{where}]: expected a table, got {value!r}")
    return value


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _is_int_table(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and _is_int(x) for k, x in v.items())


_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "int": (_is_int, "an integer"),
    "float": (_is_number, "a number"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "float | None": (_is_number, "a number"),
    "Mapping[str, int]": (_is_int_table, "a table of integers"),
    "Latency": (lambda v: isinstance(v, Latency), "a table"),
    "Latency | None": (lambda v: isinstance(v, Latency), "a table"),
}


def _checked(cls: type, values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``values`` if every field is known, present when required and of its type."""
    spec = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(spec))
    if unknown:
        raise ScenarioError(f"unknown field(s) {', '.join(unknown)} in [{where or 'top level'}]")
    out: dict[str, Any] = {}
    for name, f in spec.items():
        if name not in values:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ScenarioError(f"[{where or 'top level'}]: field {name} is required")
            continue
        value = values[name]
        check = _TYPES.get(str(f.type))
        if check is not None and not check[0](value):
            place = f"{where}.{name}" if where else name
            raise ScenarioError(f"{place}: expected {check[1]}, got {value!r}")
        out[name] = float(value) if f.type in ("float", "float | None") else value
    return out


def _build(cls: type[Any], values: Mapping[str, Any], where: str) -> Any:
    return cls(**_checked(cls, values, where))


def _fault(raw: dict[str, Any], where: str) -> Fault:
    raw = dict(raw)
    if "duration" in raw:
        duration = _table(raw["duration"], f"{where}.duration")
        raw["duration"] = _build(Latency, duration, f"{where}.duration")
    fault: Fault = _build(Fault, raw, where)
    if fault.kind not in FAULT_KINDS:
        raise ScenarioError(f"fault kind {fault.kind!r} is not one of {FAULT_KINDS}")
    if fault.shape not in PARTITION_SHAPES:
        raise ScenarioError(f"partition shape {fault.shape!r} is not one of {PARTITION_SHAPES}")
    if not 0 <= fault.at <= 1 or (fault.until is not None and not fault.at <= fault.until <= 1):
        raise ScenarioError(
            f"{where}: fault times are fractions of the duration: 0 <= at <= until <= 1"
        )
    if not 0 <= fault.fraction <= 1 or fault.islands < 2 or fault.max_ms < 0:
        raise ScenarioError(f"{where}: fraction is in [0, 1], islands >= 2, max_ms >= 0")
    if fault.kind == "churn" and fault.interval_ms <= 0:
        raise ScenarioError(f"{where}: churn needs interval_ms > 0")
    if fault.rate_per_min < 0:
        raise ScenarioError(f"{where}: rate_per_min is not negative")
    if fault.rate_per_min > 0:
        if fault.kind == "churn":
            raise ScenarioError(
                f"{where}: churn has no rate_per_min (use kind = 'crash' with rate_per_min"
                " and a duration: nodes leaving and coming back at random)"
            )
        if fault.kind in ("partition", "crash") and fault.duration is None:
            raise ScenarioError(
                f"{where}: a {fault.kind} at a rate needs a duration table"
                " (e.g. duration = {{ kind = 'exponential', ms = 3000 }})"
            )
    if fault.duration is not None:
        _check_latency(fault.duration, f"{where}.duration")
    return fault


def _check_latency(latency: Latency, where: str) -> None:
    if latency.kind not in LATENCY_KINDS:
        raise ScenarioError(f"{where}: kind {latency.kind!r} is not one of {LATENCY_KINDS}")
    if min(latency.ms, latency.low_ms, latency.median_ms) < 0 or latency.sigma < 0:
        raise ScenarioError(f"{where}: delays and sigma are not negative")
    if latency.low_ms > latency.high_ms:
        raise ScenarioError(f"{where}: low_ms <= high_ms")


def _validate(scenario: Scenario) -> None:
    if scenario.nodes < 2:
        raise ScenarioError("a scenario needs at least 2 nodes")
    _check_latency(scenario.latency, "latency")
    _check_latency(scenario.topology.bridge, "topology.bridge")
    topology = scenario.topology
    if topology.kind not in TOPOLOGIES:
        raise ScenarioError(f"topology {topology.kind!r} is not one of {TOPOLOGIES}")
    if topology.links not in LINKS:
        raise ScenarioError(f"topology.links {topology.links!r} is not one of {LINKS}")
    if topology.degree < 2 or topology.clusters < 1 or not 0 <= topology.rewire <= 1:
        raise ScenarioError("topology: degree >= 2, clusters >= 1, rewire in [0, 1]")
    bandwidth = scenario.bandwidth
    if bandwidth.bytes_per_s < 0 or bandwidth.bridge_bytes_per_s < 0:
        raise ScenarioError("bandwidth: bytes per second are not negative (0: unlimited)")
    workload = scenario.workload
    if not 0 <= workload.reads <= 1 or workload.rate < 0 or workload.warmup_ms < 0:
        raise ScenarioError(
            "workload.reads is a share in [0, 1]; the rate and warmup_ms are not negative"
        )
    if not 2 <= workload.genesis_cells <= GENESIS_CELLS_MAX:
        raise ScenarioError(
            f"workload.genesis_cells is 2 to {GENESIS_CELLS_MAX} (an admission needs two"
            " founding cells to back it)"
        )
    unknown = sorted(set(workload.mix) - set(MIX_ACTIONS))
    if unknown:
        raise ScenarioError(f"workload.mix: unknown action(s) {', '.join(unknown)}")
    if any(w < 0 for w in workload.mix.values()) or sum(workload.mix.values()) <= 0:
        raise ScenarioError("workload.mix: weights are not negative, and not all zero")
    if scenario.duration_ms <= 0 or scenario.sample_ms <= 0 or scenario.settle_ms < 0:
        raise ScenarioError("duration_ms and sample_ms are positive, settle_ms not negative")
    for where, given, cls in (
        ("protocol.sync", scenario.protocol.sync, SyncConfig),
        ("protocol.push", scenario.protocol.push, PushLimits),
    ):
        unknown = sorted(set(given) - {f.name for f in fields(cls)})
        if unknown:
            raise ScenarioError(f"{where}: unknown field(s) {', '.join(unknown)}")
