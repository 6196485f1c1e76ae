"""A run's report: the metrics computed from what it observed, and what is
written out of it (``report.json``, ``summary.md``, PNG plots).

The metrics are pure functions of a run's observations (:func:`traffic`,
:func:`stable_latencies`, :func:`quantiles`). The plots need matplotlib,
the optional extra ``archipel[sim]``; it is imported only when a plot is
drawn (:func:`available` says whether it can be), and only its
:class:`~matplotlib.figure.Figure` with the Agg canvas is used (no pyplot
global state), so the simulator itself runs without it. Plots are drawn from
``report.json`` alone: the time series sampled every ``sample_ms``, the
fault windows, the delivery-latency percentiles.
"""

from __future__ import annotations

import json
import math
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PAYLOAD_KINDS = ("Push", "Ops")
"""Frames that carry ops; every other frame is control."""

INSTALL_HINT = "plots skipped: matplotlib is not installed (pip install 'archipel[sim]')"

_FAULT_COLOURS = {"partition": "tab:orange", "crash": "tab:red", "churn": "tab:purple"}

# -- metrics ----------------------------------------------------------------------


def traffic(
    before: Mapping[str, Any], after: Mapping[str, Any], writes: int, operations: int
) -> dict[str, Any]:
    """Frames and bytes between two network snapshots (``frames``, ``bytes``,
    ``kinds``), per operation and per write."""
    kinds = {k: v - before["kinds"].get(k, 0) for k, v in sorted(after["kinds"].items())}
    frames = after["frames"] - before["frames"]
    payload = sum(kinds.get(k, 0) for k in PAYLOAD_KINDS)
    per_write = max(writes, 1)
    return {
        "frames": frames,
        "bytes": after["bytes"] - before["bytes"],
        "by_kind": {k: v for k, v in kinds.items() if v},
        "msgs_per_op": round(frames / max(operations, 1), 3),
        "payload_per_write": round(payload / per_write, 3),
        "control_per_write": round((frames - payload) / per_write, 3),
        "bytes_per_write": round((after["bytes"] - before["bytes"]) / per_write, 1),
    }


def latencies(
    written: Mapping[bytes, tuple[int, int]],
    arrivals: Mapping[bytes, Mapping[int, int]],
    reads: Sequence[tuple[int, int]],
    live: Sequence[int],
    nodes: int,
) -> dict[str, Any]:
    """The report's ``latency_ms``: from each write (``written``: id -> (ms,
    node)) to its arrivals on other nodes (id -> node -> ms), to its arrival
    on every ``live`` node, and Maelstrom's stable latency from ``reads``."""
    delivery = [
        ms - written[i][0]
        for i, per_node in arrivals.items()
        for node, ms in per_node.items()
        if node != written[i][1]
    ]
    everywhere = [
        max(per_node.values()) - written[i][0]
        for i, per_node in arrivals.items()
        if all(n in per_node for n in live)
    ]
    stable, unstable = stable_latencies(written, arrivals, reads, nodes)
    return {
        "delivery": quantiles(delivery),
        "delivery_cdf": percentiles(delivery),
        "delivery_to_all_live": quantiles(everywhere),
        "stable": quantiles(stable),
        "never_stable": unstable,
    }


def stable_latencies(
    written: Mapping[bytes, tuple[int, int]],
    arrivals: Mapping[bytes, Mapping[int, int]],
    reads: Sequence[tuple[int, int]],
    nodes: int,
) -> tuple[list[int], int]:
    """Maelstrom's stable latency: for each written op, the time from its write
    to the first read after which every read (on any node) includes it. An op
    missing from the last read that could see it is never stable."""
    times = [t for t, _ in reads]
    stable: list[int] = []
    unstable = 0
    for op_id, (at, _) in written.items():
        seen = arrivals[op_id]
        first = bisect_right(times, at)
        last_miss = None
        done = max(seen.values())
        for k in range(first, len(reads)):
            t, node = reads[k]
            if node not in seen or seen[node] > t:
                last_miss = k
            elif t > done and len(seen) == nodes:
                break  # on every node: no later read can miss it
        if last_miss is None:
            if first < len(reads):
                stable.append(reads[first][0] - at)
        elif last_miss + 1 < len(reads):
            stable.append(reads[last_miss + 1][0] - at)
        else:
            unstable += 1
    return stable, unstable


def quantiles(samples: Sequence[int]) -> dict[str, int | None]:
    """Count, p50, p90, p99 and max (nearest rank below; None if empty)."""
    ordered = sorted(samples)
    if not ordered:
        return {"count": 0, "p50": None, "p90": None, "p99": None, "max": None}

    def q(p: float) -> int:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))]

    return {"count": len(ordered), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": ordered[-1]}


def percentiles(samples: Sequence[int]) -> list[int]:
    """The 0th to 100th percentiles (101 values; empty if no sample): a CDF."""
    ordered = sorted(samples)
    if not ordered:
        return []
    return [ordered[min(len(ordered) - 1, p * len(ordered) // 100)] for p in range(101)]


# -- report.json and summary.md ---------------------------------------------------


def report_json(report: Mapping[str, Any]) -> str:
    """The report as JSON text with sorted keys: byte-comparable between runs."""
    return json.dumps(report, sort_keys=True, indent=1) + "\n"


def summary(
    report: Mapping[str, Any], wall_s: float | None = None, cpu_s: float | None = None
) -> str:
    """A short Markdown summary of a report, with the wall time, CPU time and
    events per second when given (they are not in the report)."""
    m = report["messages"]
    lat = report["latency_ms"]
    conv = report["convergence"]
    ops = report["operations"]
    net = report.get("network", {})
    lines = [
        f"# {report['scenario']} (seed {report['seed']}, archipel {report['version']})",
        "",
        f"- operations: {ops['writes']} writes, {ops['reads']} reads;"
        f" {ops['live_nodes_at_end']} live nodes at the end",
        f"- messages per op (all frames / all operations): {m['msgs_per_op']};"
        f" per write: {m['payload_per_write']} payload, {m['control_per_write']} control,"
        f" {m['bytes_per_write']} bytes",
        f"- delivery latency ms (p50 / p99 / max): {_pq(lat['delivery'])}",
        f"- stable latency ms (p50 / p99 / max): {_pq(lat['stable'])};"
        f" never stable: {lat['never_stable']}",
        f"- converged: {'yes' if conv['converged'] else 'NO'}"
        f" ({conv['converged_ms_after_workload']} ms after the workload)",
        "- caught up after heals (ms): "
        + (", ".join(f"{h['after']} {h['caught_up_ms']}" for h in conv["heals"]) or "no heals"),
        f"- acknowledged ops lost: {report['acknowledged_ops_lost']};"
        f" peak pending set: {report['peak_pending']}",
    ]
    if net.get("queued_messages"):
        lines.append(
            f"- bandwidth: {net['queued_messages']} messages queued behind others,"
            f" {net['queued_ms_total'] / net['queued_messages']:.0f} ms on average,"
            f" {net['queued_ms_max']} ms at most"
        )
    simulated = report["simulated_ms"] / 1_000
    lines.append(f"- events: {report['events']} in {simulated:.1f} s of simulated time")
    if wall_s is not None:
        lines.append(_speed(report["events"], wall_s, cpu_s))
    return "\n".join(lines) + "\n"


def _speed(events: int, wall_s: float, cpu_s: float | None) -> str:
    """Events per second of wall time, and of CPU time (steadier on a busy machine)."""
    per_wall = events / wall_s if wall_s > 0 else 0.0
    line = f"- wall time: {wall_s:.2f} s ({per_wall:,.0f} events/s)"
    if cpu_s:
        line += f"; CPU time: {cpu_s:.2f} s ({events / cpu_s:,.0f} events/s of CPU)"
    return line


def _pq(q: Mapping[str, int | None]) -> str:
    return f"{q['p50']} / {q['p99']} / {q['max']}"


# -- plots ------------------------------------------------------------------------


def available() -> bool:
    """Whether matplotlib (the ``archipel[sim]`` extra) can be imported."""
    try:
        import matplotlib  # noqa: F401, PLC0415 (optional, imported when needed)
    except ImportError:
        return False
    return True


def plot_run(report: Mapping[str, Any], out: Path) -> list[Path]:
    """Draw a run's plots into ``out``; return the files written. Raises
    ImportError without matplotlib (check :func:`available` first)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        _agreement(report, out / "agreement.png"),
        _latency_cdf(report, out / "latency_cdf.png"),
        _messages_per_op(report, out / "messages_per_op.png"),
    ]
    return paths


def plot_sweep(sweep: Mapping[str, Any], out: Path) -> list[Path]:
    """One box plot per metric of a sweep (a box per parameter combination,
    over its seeds); return the files written."""
    out.mkdir(parents=True, exist_ok=True)
    combos = sweep["combinations"]
    labels = [_label(c["params"]) for c in combos]
    paths: list[Path] = []
    for metric in sweep["metrics"]:
        data = [[r["metrics"][metric] for r in c["runs"] if _number(r, metric)] for c in combos]
        if not any(data):
            continue
        fig, ax = _figure(max(6.0, 1.2 * len(combos) + 2), 4.0)
        ax.boxplot([d or [math.nan] for d in data], showfliers=True)
        ax.set_xticks(range(1, len(labels) + 1), labels, rotation=20, ha="right", fontsize=8)
        ax.set_title(f"{sweep['scenario']}: {metric} (seeds {_seeds(sweep)})")
        ax.set_ylabel(metric)
        ax.grid(axis="y", alpha=0.3)
        path = out / f"sweep-{metric.replace('.', '_')}.png"
        _save(fig, path)
        paths.append(path)
    return paths


def _number(run: Mapping[str, Any], metric: str) -> bool:
    value = run.get("metrics", {}).get(metric)
    return isinstance(value, int | float) and not isinstance(value, bool)


def _label(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items()) or "as the scenario"


def _seeds(sweep: Mapping[str, Any]) -> str:
    first, last = sweep["seeds"]
    return f"{first}..{last}"


def _figure(width: float = 8.0, height: float = 4.5) -> tuple[Figure, Axes]:
    from matplotlib.figure import Figure  # noqa: PLC0415 (optional dependency)

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.add_subplot()


def _save(fig: Figure, path: Path) -> Path:
    # The Agg canvas, without pyplot: no global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415

    FigureCanvasAgg(fig)
    fig.savefig(path, format="png")
    return path


def _shade_faults(ax: Axes, report: Mapping[str, Any]) -> None:
    """Fault windows as shaded spans (points as vertical lines), the
    workload's end as a dashed line; times in seconds from the workload's start."""
    labelled: set[str] = set()
    for w in report.get("fault_windows", []):
        kind = w["kind"]
        label = kind if kind not in labelled else None
        labelled.add(kind)
        start = w["from_ms"] / 1_000
        end = (w["to_ms"] if w["to_ms"] is not None else w["from_ms"]) / 1_000
        colour = _FAULT_COLOURS.get(kind, "tab:gray")
        if end > start:
            ax.axvspan(start, end, color=colour, alpha=0.15, label=label)
        else:
            ax.axvline(start, color=colour, linestyle=":", label=label)
    duration = report["parameters"]["duration_ms"] / 1_000
    ax.axvline(duration, color="black", linestyle="--", linewidth=0.8, label="workload ends")


def _title(ax: Axes, report: Mapping[str, Any], what: str) -> None:
    ax.set_title(f"{report['scenario']} (seed {report['seed']}): {what}")


def _agreement(report: Mapping[str, Any], path: Path) -> Path:
    fig, ax = _figure()
    points = report["convergence"]["hash_agreement"]
    ax.plot([t / 1_000 for t, _ in points], [f for _, f in points], drawstyle="steps-post")
    _shade_faults(ax, report)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("time since the workload's start (s)")
    ax.set_ylabel("share of live nodes with the most common state")
    _title(ax, report, "state-hash agreement")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _latency_cdf(report: Mapping[str, Any], path: Path) -> Path:
    fig, ax = _figure()
    cdf = report["latency_ms"].get("delivery_cdf", [])
    if cdf:
        ax.plot(cdf, [p / 100 for p in range(len(cdf))], drawstyle="steps-post")
    else:
        ax.text(0.5, 0.5, "no op was delivered", ha="center", transform=ax.transAxes)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("delivery latency (ms): from the write to a node's replica applying it")
    ax.set_ylabel("share of (op, node) deliveries")
    _title(ax, report, "delivery latency CDF")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _messages_per_op(report: Mapping[str, Any], path: Path) -> Path:
    series = report["series"]
    times = [t / 1_000 for t in series["t_ms"]]
    frames = series["frames"]
    ops = [w + r for w, r in zip(series["writes"], series["reads"], strict=True)]
    window = max(1, 1_000 // series["interval_ms"])
    duration = report["parameters"]["duration_ms"]
    # Over the last second of the workload only: once it ends, the few last
    # operations would be divided into all the settling traffic.
    rolling = [
        (frames[i] - frames[i - window]) / (ops[i] - ops[i - window])
        if i >= window and ops[i] > ops[i - window] and series["t_ms"][i] <= duration
        else math.nan
        for i in range(len(times))
    ]
    cumulative = [f / o if o else math.nan for f, o in zip(frames, ops, strict=True)]
    fig, ax = _figure()
    ax.plot(times, rolling, label="over the last second", linewidth=0.8)
    ax.plot(times, cumulative, label="since the workload's start", linewidth=1.6)
    _shade_faults(ax, report)
    ax.set_xlabel("time since the workload's start (s)")
    ax.set_ylabel("frames between nodes per operation")
    ax.set_ylim(bottom=0)
    _title(ax, report, "messages per operation")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


# Shared with the live-cluster harness's report (cli/cluster/report.py).
figure = _figure
save_png = _save
