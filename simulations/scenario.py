"""Scenarios: what a simulation run does, read from a TOML file.

A scenario names the network (nodes, topology, latency), the workload (op
rate per node, the mix, the share of reads), the faults (a schedule) and
the protocol's tuning. Every field is documented in ``docs/simulations.md``;
unknown fields are refused, so a typo cannot silently change a run. Fault
times are fractions of the workload's duration, so a shortened run (fewer
nodes, less time: :func:`load` takes ``overrides``) keeps its shape.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LIBRARY = Path(__file__).resolve().parent / "scenarios"
"""The scenario library shipped with the simulator."""

LATENCY_KINDS = ("fixed", "uniform", "lognormal")
TOPOLOGIES = ("full-mesh", "random-regular", "clusters")
FAULT_KINDS = ("partition", "crash", "lose", "churn", "skew")
PARTITION_SHAPES = ("halves", "islands", "bridge")


class ScenarioError(ValueError):
    """A scenario file or override is malformed: the message says which field."""


@dataclass(frozen=True, slots=True)
class Latency:
    """One-way delay of a message on a link, drawn per message."""

    kind: str = "fixed"
    ms: int = 100  # fixed
    low_ms: int = 50  # uniform
    high_ms: int = 150  # uniform
    median_ms: int = 100  # lognormal
    sigma: float = 0.5  # lognormal


@dataclass(frozen=True, slots=True)
class Topology:
    """Whom each node knows when it starts (its bootstrap addresses)."""

    kind: str = "full-mesh"
    degree: int = 6  # random-regular: addresses each node knows
    clusters: int = 4  # clusters: nodes in contiguous groups ...
    bridge: Latency = field(default_factory=lambda: Latency(ms=300))  # ... joined by slower links


@dataclass(frozen=True, slots=True)
class Workload:
    """Ops authored on the nodes' own replicas while the workload runs."""

    rate: float = 1.0  # operations per second per node (reads included)
    reads: float = 0.0  # share of operations that are reads
    mix: Mapping[str, int] = field(default_factory=lambda: {"note": 1})
    warmup_ms: int = 3_000  # joining and settling before the first op


@dataclass(frozen=True, slots=True)
class Fault:
    """One scheduled fault; ``at`` and ``until`` are fractions of the duration."""

    kind: str
    at: float
    until: float | None = None  # partition: heal; crash: restart; churn: stop
    shape: str = "halves"  # partition
    islands: int = 3  # partition shape "islands" / "bridge"
    fraction: float = 0.0  # crash / lose: share of the nodes (node 0 is spared)
    interval_ms: int = 1_000  # churn: one node leaves and one rejoins this often
    max_ms: int = 0  # skew: offsets drawn in [-max_ms, max_ms]


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
    sample_ms: int = 100  # how often convergence is checked
    topology: Topology = field(default_factory=Topology)
    latency: Latency = field(default_factory=Latency)
    workload: Workload = field(default_factory=Workload)
    faults: tuple[Fault, ...] = ()
    protocol: Protocol = field(default_factory=Protocol)


def load(source: str | Path, overrides: Mapping[str, Any] | None = None) -> Scenario:
    """A scenario from a file path, or a library name (``"churn"``), with
    ``overrides`` applied: dotted keys (``"workload.rate"``) to values."""
    path = Path(source)
    if not path.suffix:
        path = LIBRARY / f"{source}.toml"
    with path.open("rb") as file:
        raw = tomllib.load(file)
    return parse(raw, overrides)


def parse(raw: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> Scenario:
    data: dict[str, Any] = _copy(raw)
    for key, value in (overrides or {}).items():
        *parents, last = key.split(".")
        table = data
        for part in parents:
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise ScenarioError(f"override {key}: {part} is not a table")
        table[last] = value
    faults = tuple(_fault(f) for f in data.pop("faults", ()))
    topology = dict(data.pop("topology", {}))
    bridge = _build(Latency, topology.pop("bridge", {}), "topology.bridge")
    protocol = data.pop("protocol", {})
    scenario = Scenario(
        topology=_build(Topology, {**topology, "bridge": bridge}, "topology"),
        latency=_build(Latency, data.pop("latency", {}), "latency"),
        workload=_build(Workload, data.pop("workload", {}), "workload"),
        faults=faults,
        protocol=_build(Protocol, protocol, "protocol"),
        **_checked(Scenario, data, ""),
    )
    _validate(scenario)
    return scenario


def _copy(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _copy(v) if isinstance(v, Mapping) else v for k, v in raw.items()}


def _checked(cls: type, values: Mapping[str, Any], where: str) -> dict[str, Any]:
    known = set(cls.__dataclass_fields__)  # type: ignore[attr-defined]
    unknown = sorted(set(values) - known)
    if unknown:
        raise ScenarioError(f"unknown field(s) {', '.join(unknown)} in [{where or 'top level'}]")
    return dict(values)


def _build(cls: type[Any], values: Mapping[str, Any], where: str) -> Any:
    return cls(**_checked(cls, values, where))


def _fault(raw: Mapping[str, Any]) -> Fault:
    fault: Fault = _build(Fault, raw, "faults")
    if fault.kind not in FAULT_KINDS:
        raise ScenarioError(f"fault kind {fault.kind!r} is not one of {FAULT_KINDS}")
    if fault.shape not in PARTITION_SHAPES:
        raise ScenarioError(f"partition shape {fault.shape!r} is not one of {PARTITION_SHAPES}")
    if not 0 <= fault.at <= 1 or (fault.until is not None and not fault.at <= fault.until <= 1):
        raise ScenarioError("fault times are fractions of the duration: 0 <= at <= until <= 1")
    return fault


def _validate(scenario: Scenario) -> None:
    if scenario.nodes < 2:
        raise ScenarioError("a scenario needs at least 2 nodes")
    if scenario.latency.kind not in LATENCY_KINDS:
        raise ScenarioError(f"latency kind {scenario.latency.kind!r} not in {LATENCY_KINDS}")
    if scenario.topology.kind not in TOPOLOGIES:
        raise ScenarioError(f"topology {scenario.topology.kind!r} is not one of {TOPOLOGIES}")
    if not 0 <= scenario.workload.reads <= 1 or scenario.workload.rate < 0:
        raise ScenarioError("workload.reads is a share in [0, 1] and the rate is not negative")
    if scenario.duration_ms <= 0 or scenario.sample_ms <= 0 or scenario.settle_ms < 0:
        raise ScenarioError("duration_ms and sample_ms are positive, settle_ms not negative")
