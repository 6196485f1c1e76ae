"""``archipel cluster``: run real daemons on loopback under a scenario's faults."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import click
import trio

from .._common import friendly_errors
from . import report as report_mod
from .harness import run_cluster
from .scenario import ClusterScenario, library, load, with_nodes


@click.group()
def cluster() -> None:
    """Real daemons on loopback under faults: the node's reliability harness (docs/cluster.md)."""


@cluster.command("list")
def list_() -> None:
    """List the library's scenarios."""
    for name in library():
        scenario = load(name)
        click.echo(f"{name:<20} {scenario.nodes:>2} nodes, {scenario.duration_s:>5g} s  "
                   f"{scenario.description}")  # fmt: skip


@cluster.command()
@click.argument("scenario")
@click.option("--nodes", type=int, default=None, help="Run this many daemons instead.")
@click.option("--seed", type=int, default=None, help="Workload seed (default: the scenario's).")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory for report.json, summary.md, plots, logs and the nodes' homes"
    " (default: a new temporary directory, kept and printed).",
)
@friendly_errors
def run(scenario: str, nodes: int | None, seed: int | None, out: Path | None) -> None:
    """Run SCENARIO (a library name or a TOML file) with real daemons and check invariants.

    Exit status 0 when every check passes and the nodes settle, 1 otherwise.
    """
    loaded: ClusterScenario = load(scenario)
    if nodes is not None:
        loaded = with_nodes(loaded, nodes)
    if seed is not None:
        loaded = replace(loaded, seed=seed)
    if out is None:
        out = Path(tempfile.mkdtemp(prefix=f"archipel-cluster-{loaded.name}-"))
    elif out.exists() and any(out.iterdir()):
        raise click.UsageError(f"{out} is not empty: give a new or empty --out directory")
    click.echo(f"cluster run {loaded.name}: {loaded.nodes} daemons, seed {loaded.seed}, out {out}")
    result = trio.run(run_cluster, loaded, out, click.echo)
    written = report_mod.write(result, out)
    click.echo(f"report: {written[0]}  summary: {written[1]}")
    if not result["ok"]:
        raise SystemExit(1)
