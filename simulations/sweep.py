"""Sweeps: one scenario over a range of seeds and a grid of parameters, on
every local core; each metric's distribution per parameter combination.

Theory of operation. A sweep is (scenario, seeds ``a..b``, a grid of dotted
scenario fields to lists of values, fixed overrides). Every combination of
the grid is checked first (a bad field fails before any run starts), then
every (combination, seed) pair is one job, run in a
:class:`~concurrent.futures.ProcessPoolExecutor` of ``jobs`` processes
(spawned, so nothing of the parent's state leaks in), or in this process
when ``jobs`` is 1. A job returns the metrics of its report (:data:`METRICS`).
Results are put back in (combination, seed) order, so ``sweep.json`` is the
same whatever the number of jobs or the order they finished in; it holds
every run's metrics and, per combination, each metric's count, min, median,
p90 and max. Wall time and events per second go to ``sweep.md`` only.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import json
import math
import multiprocessing
import os
import statistics
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import run, scenario
from .scenario import ScenarioError

METRICS = (
    "messages.msgs_per_op",
    "messages.payload_per_write",
    "messages.control_per_write",
    "messages.bytes_per_write",
    "latency_ms.delivery.p50",
    "latency_ms.delivery.p99",
    "latency_ms.delivery.max",
    "latency_ms.stable.p50",
    "latency_ms.stable.max",
    "convergence.converged_ms_after_workload",
    "convergence.caught_up_ms_max",
    "convergence.heals_not_caught_up",
    "acknowledged_ops_lost",
    "peak_pending",
    "operations.writes",
    "events",
)
"""What a sweep summarises, named by their place in ``report.json``
(``caught_up_ms_max`` and ``heals_not_caught_up`` are derived from
``convergence.heals``)."""

MAX_RUNS = 100_000
"""A sweep larger than this is refused (a typo in ``--seeds`` is likely)."""


class SweepError(ScenarioError):
    """A sweep's seeds, parameters or jobs are malformed: the message says which."""


@dataclass(frozen=True, slots=True)
class Sweep:
    """What to run: ``source`` (a file or library name) for ``seeds`` (first,
    last, inclusive) over the grid ``params``, with ``overrides`` in every run."""

    source: str
    seeds: tuple[int, int]
    params: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def combinations(self) -> list[dict[str, Any]]:
        """Every combination of the grid, the first parameter varying slowest."""
        keys = list(self.params)
        return [dict(zip(keys, values, strict=True)) for values in self._product()]

    def _product(self) -> list[tuple[Any, ...]]:
        return list(itertools.product(*(self.params[k] for k in self.params)))


@dataclass(frozen=True, slots=True)
class Outcome:
    """A sweep's summary (deterministic) and how long it took (not)."""

    summary: dict[str, Any]
    wall_s: float
    events: int
    cpu_s: float = 0.0  # the runs' CPU time, summed over the processes

    def json(self) -> str:
        return json.dumps(self.summary, sort_keys=True, indent=1) + "\n"

    def markdown(self) -> str:
        return markdown(self.summary, self.wall_s, self.events, self.cpu_s)


# -- parsing the command line's forms -----------------------------------------------


def parse_seeds(text: str) -> tuple[int, int]:
    """``"1..100"`` (inclusive) or ``"7"``."""
    first, sep, last = text.strip().partition("..")
    try:
        seeds = (int(first), int(last) if sep else int(first))
    except ValueError:
        raise SweepError(f"--seeds {text!r}: expected FIRST..LAST, e.g. 1..100") from None
    if seeds[0] > seeds[1] or seeds[0] < 0:
        raise SweepError(f"--seeds {text!r}: expected 0 <= FIRST <= LAST")
    return seeds


def parse_value(text: str) -> Any:
    """A TOML value (``50``, ``0.5``, ``true``, ``"x"``), or else the bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_param(text: str) -> tuple[str, list[Any]]:
    """``"latency.ms=50,100"`` -> ``("latency.ms", [50, 100])``."""
    key, sep, values = text.partition("=")
    key = key.strip()
    if not sep or not key or not values.strip():
        raise SweepError(f"--param {text!r}: expected KEY=V1,V2,... (e.g. latency.ms=50,100)")
    return key, [parse_value(v.strip()) for v in values.split(",")]


def parse_setting(text: str) -> tuple[str, Any]:
    """``"nodes=8"`` -> ``("nodes", 8)``."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise SweepError(f"--set {text!r}: expected KEY=VALUE (e.g. nodes=8)")
    return key.strip(), parse_value(value.strip())


# -- running --------------------------------------------------------------------------


def check(sweep: Sweep) -> list[scenario.Scenario]:
    """Every combination's scenario (raises :class:`ScenarioError` for a bad one)."""
    first, last = sweep.seeds
    runs = (last - first + 1) * max(1, len(sweep._product()))
    if runs > MAX_RUNS:
        raise SweepError(f"{runs} runs is more than {MAX_RUNS}: narrow the seeds or the grid")
    if any(not values for values in sweep.params.values()):
        raise SweepError("every --param needs at least one value")
    return [scenario.load(sweep.source, {**sweep.overrides, **c}) for c in sweep.combinations()]


def execute(
    sweep: Sweep, jobs: int | None = None, progress: Callable[[int, int], None] | None = None
) -> Outcome:
    """Run every (combination, seed) on ``jobs`` processes (default: every core)."""
    began = time.perf_counter()
    scenarios = check(sweep)
    seeds = range(sweep.seeds[0], sweep.seeds[1] + 1)
    work = [
        (k, sweep.source, {**sweep.overrides, **combo}, seed)
        for k, combo in enumerate(sweep.combinations())
        for seed in seeds
    ]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(work)))
    results: dict[tuple[int, int], dict[str, Any]] = {}
    if progress is not None:
        progress(0, len(work))
    if jobs == 1:
        for k, source, overrides, seed in work:
            results[(k, seed)] = one_run(source, overrides, seed)
            if progress is not None:
                progress(len(results), len(work))
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            futures: dict[Future[dict[str, Any]], tuple[int, int]] = {
                pool.submit(one_run, source, overrides, seed): (k, seed)
                for k, source, overrides, seed in work
            }
            try:
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
                    if progress is not None:
                        progress(len(results), len(work))
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise
    combos = sweep.combinations()
    summary = {
        "scenario": scenarios[0].name,
        "source": sweep.source,
        "version": importlib.metadata.version("archipel"),
        "seeds": list(sweep.seeds),
        "params": {k: list(v) for k, v in sweep.params.items()},
        "overrides": dict(sweep.overrides),
        "metrics": list(METRICS),
        "combinations": [
            _combination(combo, [results[(k, seed)] for seed in seeds])
            for k, combo in enumerate(combos)
        ],
    }
    events = sum(r.get("events", 0) for r in results.values())
    cpu_s = sum(r.get("cpu_s", 0.0) for r in results.values())
    return Outcome(summary, time.perf_counter() - began, events, cpu_s)


def one_run(source: str, overrides: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """One job: the metrics of one run (an error is reported, not raised, so
    one failing seed does not lose the sweep)."""
    try:
        result = run.run(scenario.load(source, overrides), seed)
    except Exception as exc:  # reported in sweep.json with the seed
        return {"seed": seed, "error": f"{type(exc).__name__}: {exc}"}
    return {
        "seed": seed,
        "converged": result.report["convergence"]["converged"],
        "metrics": metrics(result.report),
        "events": result.events,
        "cpu_s": result.cpu_s,
    }


def metrics(report: Mapping[str, Any]) -> dict[str, float | int | None]:
    """The values of :data:`METRICS` in one report."""
    heals = report["convergence"]["heals"]
    caught = [h["caught_up_ms"] for h in heals if h["caught_up_ms"] is not None]
    derived = {
        "convergence.caught_up_ms_max": max(caught) if caught else None,
        "convergence.heals_not_caught_up": len(heals) - len(caught),
    }
    out: dict[str, float | int | None] = {}
    for name in METRICS:
        if name in derived:
            out[name] = derived[name]
            continue
        value: Any = report
        for part in name.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        out[name] = value
    return out


def _combination(params: Mapping[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r]
    # Not the events (a metric already) nor the CPU time (not deterministic).
    per_run = [{k: v for k, v in r.items() if k not in ("events", "cpu_s")} for r in runs]
    return {
        "params": dict(params),
        "runs": per_run,
        "converged": sum(1 for r in ok if r["converged"]),
        "errors": len(runs) - len(ok),
        "summary": {name: distribution([r["metrics"][name] for r in ok]) for name in METRICS},
    }


def distribution(values: Sequence[float | int | None]) -> dict[str, float | int | None]:
    """Count, min, median, p90 (nearest rank) and max of the values that are
    numbers (None: not measured in that run)."""
    numbers = sorted(v for v in values if isinstance(v, int | float))
    if not numbers:
        return {"count": 0, "min": None, "median": None, "p90": None, "max": None}
    p90 = numbers[max(0, math.ceil(0.9 * len(numbers)) - 1)]
    return {
        "count": len(numbers),
        "min": numbers[0],
        "median": _tidy(statistics.median(numbers)),
        "p90": p90,
        "max": numbers[-1],
    }


def _tidy(value: float) -> float | int:
    return int(value) if float(value).is_integer() else round(value, 3)


# -- writing ---------------------------------------------------------------------------


def markdown(
    summary: Mapping[str, Any], wall_s: float | None = None, events: int = 0, cpu_s: float = 0.0
) -> str:
    """``sweep.md``: per metric, a table of its distribution per combination."""
    first, last = summary["seeds"]
    combos = summary["combinations"]
    runs = sum(len(c["runs"]) for c in combos)
    lines = [
        f"# Sweep: {summary['scenario']}, seeds {first}..{last} (archipel {summary['version']})",
        "",
        f"- {runs} runs: {len(combos)} parameter combination(s) x {last - first + 1} seeds",
    ]
    if summary["overrides"]:
        fixed = ", ".join(f"{k}={v}" for k, v in summary["overrides"].items())
        lines.append(f"- fixed overrides: {fixed}")
    for c in combos:
        lines.append(
            f"- {_label(c['params'])}: converged {c['converged']} / {len(c['runs'])}"
            + (f", {c['errors']} failed (see sweep.json)" if c["errors"] else "")
        )
    if wall_s is not None:
        rate = events / wall_s if wall_s > 0 else 0.0
        line = f"- wall time: {wall_s:.1f} s ({events:,} events, {rate:,.0f} events/s)"
        if cpu_s > 0:
            line += f"; CPU time in the runs: {cpu_s:.1f} s ({events / cpu_s:,.0f} events/s of CPU)"
        lines.append(line)
    for name in summary["metrics"]:
        lines += ["", f"## {name}", "", "| parameters | runs | min | median | p90 | max |"]
        lines.append("|---|---|---|---|---|---|")
        for c in combos:
            d = c["summary"][name]
            cells = [_cell(d[k]) for k in ("count", "min", "median", "p90", "max")]
            lines.append(f"| {_label(c['params'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _label(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items()) or "as the scenario"


def _cell(value: Any) -> str:
    return "—" if value is None else f"{value:,}" if isinstance(value, int) else f"{value}"


def write(outcome: Outcome, out: Path) -> list[Path]:
    """``sweep.json`` and ``sweep.md`` into the directory ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "sweep.json", out / "sweep.md"]
    paths[0].write_text(outcome.json())
    paths[1].write_text(outcome.markdown())
    return paths
