"""A cluster run's outputs: ``report.json``, ``summary.md`` and PNG plots.

The plots are drawn from ``report.json`` alone (matplotlib, the
``archipel[sim]`` extra, with the Agg canvas, as the simulator's): acknowledged
ops not yet on each node over time with the fault windows shaded (the
convergence picture), the delivery-latency CDF, and each daemon's RSS and open
descriptors over the run.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from archipel.simulations import plots

_OPENS = {"partition": "heal", "kill": "restart", "stop": "cont", "drop": "undrop",
          "disk_full": "disk_free"}  # fmt: skip
_COLOURS = {"partition": "tab:orange", "kill": "tab:red", "stop": "tab:purple",
            "drop": "tab:brown", "disk_full": "tab:gray", "delay": "tab:olive"}  # fmt: skip


def write(report: Mapping[str, Any], out: Path) -> list[Path]:
    """Write the report, its summary and (with matplotlib) its plots; return the files."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.json", out / "summary.md"]
    paths[0].write_text(json.dumps(report, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    paths[1].write_text(summary(report), encoding="utf-8")
    if plots.available():
        paths += [
            _missing(report, out / "convergence.png"),
            _latency(report, out / "latency_cdf.png"),
            _resources(report, out / "resources.png"),
        ]
    return paths


def windows(report: Mapping[str, Any]) -> list[tuple[str, float, float | None]]:
    """(kind, from s, to s or None) for each fault that lasts until its undo."""
    closers = {v: k for k, v in _OPENS.items()}
    out: list[tuple[str, float, float | None]] = []
    open_: dict[tuple[str, int], float] = {}
    for fault in report["faults"]:
        kind, at = fault["kind"], fault["at_s"]
        nodes = fault.get("nodes", [-1]) if kind != "partition" else [-1]
        if kind in _OPENS or (kind == "delay" and fault.get("ms", 0) > 0):
            for n in nodes:
                open_.setdefault((kind, n), at)
            continue
        opener = "delay" if kind == "delay" else closers.get(kind)
        if opener is None:
            continue
        closing = [-1] if opener == "partition" else nodes
        for n in closing:
            if (opener, n) in open_:
                out.append((opener, open_.pop((opener, n)), at))
    out += [(kind, at, None) for (kind, _), at in open_.items()]
    return sorted(out, key=lambda w: (w[1], w[0]))


def summary(report: Mapping[str, Any]) -> str:
    ops = report["ops"]
    lat = report["latency_ms"]
    calm = report["latency_calm_ms"]
    lines = [
        f"# Cluster run: {report['scenario']} (seed {report['seed']})",
        "",
        report.get("description", "") or "",
        "",
        f"- Result: **{'all checks passed' if report['ok'] else 'FAILED'}**",
        f"- {report['nodes']} daemons, workload {report['duration_s']:g} s;"
        f" wall time {report.get('wall_s', '?')} s",
        f"- Ops acknowledged: {ops['acknowledged']} ({ops['acknowledged_per_s']} ops/s);"
        f" refused or unanswered: {sum(ops['refused'].values())};"
        f" skipped while the node was down: {ops['skipped_node_down']}",
        f"- Delivery latency to other nodes (ms): p50 {lat['p50']}, p90 {lat['p90']},"
        f" p99 {lat['p99']}, max {lat['max']} ({report['latency_samples']} deliveries)",
        f"- Of ops sent away from any fault (and {2:g} s after one): p50 {calm['p50']},"
        f" p90 {calm['p90']}, p99 {calm['p99']}, max {calm['max']} ({calm['count']} deliveries)",
        f"- Settled after the workload (all nodes one state hash) in {report['settle_s']} s",
        "",
        "## Faults",
        "",
        "| at (s) | fault |",
        "|---:|---|",
    ]
    for fault in report["faults"]:
        detail = {k: v for k, v in fault.items() if k not in ("at_s", "kind")}
        lines.append(f"| {fault['at_s']:.1f} | {fault['kind']} {detail or ''} |")
    lines += ["", "## Convergence after each heal", "",
              "| at (s) | heal | ops acknowledged before | all on every node after (ms) |",
              "|---:|---|---:|---:|"]  # fmt: skip
    for heal in report["heals"]:
        lines.append(f"| {heal['at_s']:.1f} | {heal['kind']} | {heal['ops_before']} |"
                     f" {heal['convergence_ms']} |")  # fmt: skip
    lines += ["", "## Checks", "", "| check | result | checked |", "|---|---|---:|"]
    for name, check in report["checks"].items():
        lines.append(f"| {name} | {'ok' if check['ok'] else 'FAILED'} | {check['checked']} |")
    for name, check in report["checks"].items():
        for problem in check["problems"]:
            lines.append(f"- {name}: {problem}")
    lines += [
        "",
        "## Resources (first and last sample)",
        "",
        "| daemon | starts | RSS first → last (MiB) | fds first → last |",
        "|---|---:|---:|---:|",
    ]
    for name, res in report["resources"].items():
        samples = res["samples"]
        if samples:
            (_, r0, f0), (_, r1, f1) = samples[0], samples[-1]
            lines.append(f"| {name} | {res['starts']} | {r0 / 1024:.0f} → {r1 / 1024:.0f} |"
                         f" {f0} → {f1} |")  # fmt: skip
    if report["ops"]["refused"]:
        lines += ["", "## Calls refused or unanswered", ""]
        examples = report["ops"].get("refused_examples", {})
        for why, count in report["ops"]["refused"].items():
            lines.append(
                f"- {why}: {count}" + (f" (e.g. {examples[why]})" if why in examples else "")
            )
    return "\n".join(lines) + "\n"


def _shade(ax: Any, report: Mapping[str, Any]) -> None:
    seen: set[str] = set()
    end = report["duration_s"]
    for kind, start, stop in windows(report):
        label = kind if kind not in seen else None
        seen.add(kind)
        colour = _COLOURS.get(kind, "tab:gray")
        ax.axvspan(start, stop if stop is not None else end, color=colour, alpha=0.15, label=label)
    ax.axvline(end, color="black", linestyle="--", linewidth=0.8, label="workload ends")


def _missing(report: Mapping[str, Any], path: Path) -> Path:
    fig, ax = plots.figure()
    series = report["missing_over_time"]
    for name, counts in series["missing"].items():
        ax.plot(series["t_s"], counts, linewidth=1, label=name)
    _shade(ax, report)
    ax.set_xlabel("seconds into the run")
    ax.set_ylabel("acknowledged ops not yet on the node")
    ax.set_title(f"{report['scenario']} (seed {report['seed']}): convergence")
    ax.legend(fontsize=7, ncol=2)
    return plots.save_png(fig, path)


def _latency(report: Mapping[str, Any], path: Path) -> Path:
    fig, ax = plots.figure()
    cdf = report["latency_percentiles_ms"]
    if cdf:
        ax.plot(cdf, [i / (len(cdf) - 1) for i in range(len(cdf))])
        ax.set_xscale("symlog")
    ax.set_xlabel("delivery latency to another node (ms)")
    ax.set_ylabel("fraction of deliveries")
    ax.set_title(f"{report['scenario']} (seed {report['seed']}): delivery latency")
    ax.grid(alpha=0.3)
    return plots.save_png(fig, path)


def _resources(report: Mapping[str, Any], path: Path) -> Path:
    fig, ax = plots.figure()
    other = ax.twinx()
    for name, res in report["resources"].items():
        samples = res["samples"]
        if samples:
            ax.plot(
                [s[0] for s in samples], [s[1] / 1024 for s in samples], linewidth=1, label=name
            )
            other.plot(
                [s[0] for s in samples], [s[2] for s in samples], linewidth=0.6, linestyle=":"
            )
    _shade(ax, report)
    ax.set_xlabel("seconds into the run")
    ax.set_ylabel("RSS (MiB, solid)")
    other.set_ylabel("open descriptors (dotted)")
    ax.set_title(f"{report['scenario']} (seed {report['seed']}): daemon resources")
    ax.legend(fontsize=7, ncol=2)
    return plots.save_png(fig, path)
