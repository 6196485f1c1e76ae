"""``archipel sim``: run the protocol in the deterministic simulator.

``list`` shows the scenario library, ``run`` plays one scenario with one
seed and writes its report (``report.json``, ``summary.md``, PNG plots),
``sweep`` plays one over a range of seeds and a parameter grid on every core
and writes each metric's distribution (``sweep.json``, ``sweep.md``, box
plots). Bad input (an unknown scenario, a malformed field, a bad range) is
one line on stderr and exit status 2. The simulator lives in
``archipel.simulations``; this module only parses and prints.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import click

from archipel.simulations import plots, run, scenario, sweep
from archipel.simulations.progress import terminal_bar
from archipel.simulations.scenario import ScenarioError

P = ParamSpec("P")
T = TypeVar("T")

DEFAULT_OUT = Path("sim-out")


class BadInput(click.ClickException):
    """Bad input on the command line or in a scenario file: one line, status 2."""

    exit_code = 2


def _bad_input_exits_2(fn: Callable[P, T]) -> Callable[P, T]:
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except ScenarioError as exc:
            raise BadInput(str(exc)) from None

    return wrapper


def _overrides(settings: Sequence[str], duration_ms: int | None) -> dict[str, Any]:
    out = dict(sweep.parse_setting(s) for s in settings)
    if duration_ms is not None:
        out["duration_ms"] = duration_ms
    return out


def _plots_wanted(no_plots: bool) -> bool:
    if no_plots:
        return False
    if not plots.available():
        click.echo(plots.INSTALL_HINT, err=True)
        return False
    return True


_set_option = click.option(
    "--set",
    "settings",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override one scenario field, named with dots (e.g. nodes=8, workload.rate=2.0,"
    " faults.0.until=0.5). Repeatable.",
)
_duration_option = click.option(
    "--duration-ms",
    type=int,
    default=None,
    metavar="MS",
    help="How long the workload runs (virtual ms; fault times scale with it).",
)
_no_plots_option = click.option(
    "--no-plots", is_flag=True, help="Write no PNG plots (they need the archipel[sim] extra)."
)
_progress_option = click.option(
    "--progress/--no-progress",
    default=None,
    help="Show a progress bar on stderr (default: when stderr is a terminal).",
)


@click.group(name="sim")
def sim() -> None:
    """Run the sync protocol in the deterministic simulator.

    SCENARIO is a path to a TOML file or the name of a library scenario
    ('archipel sim list'). A run is reproducible from (scenario, seed, code
    version). Fields and reports: docs/simulations.md.
    """


@sim.command("list")
def list_scenarios() -> None:
    """List the library's scenarios with a one-line description each."""
    names = scenario.library()
    width = max(len(n) for n in names)
    for name in names:
        click.echo(f"{name.ljust(width)}  {scenario.load(name).summary}")


@sim.command("run")
@click.argument("scenario_name", metavar="SCENARIO")
@click.option("--seed", type=int, default=None, help="The seed (default: the scenario's own).")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help=f"Directory for the report (default: {DEFAULT_OUT}/NAME-seedN).",
)
@_duration_option
@_set_option
@_no_plots_option
@_progress_option
@_bad_input_exits_2
def run_command(
    *,
    scenario_name: str,
    seed: int | None,
    out: Path | None,
    duration_ms: int | None,
    settings: tuple[str, ...],
    no_plots: bool,
    progress: bool | None,
) -> None:
    """Play SCENARIO once; write report.json, summary.md and plots.

    Prints the summary (messages per op, latencies, convergence, events per
    second) on stdout. Examples:

    \b
      archipel sim run maelstrom-broadcast --seed 3
      archipel sim run my.toml --duration-ms 5000 --set nodes=12 --no-plots
    """
    spec = scenario.load(scenario_name, _overrides(settings, duration_ms))
    seed = spec.seed if seed is None else seed
    out = out if out is not None else DEFAULT_OUT / f"{spec.name}-seed{seed}"
    with terminal_bar(f"{spec.name} seed {seed}", force=progress) as bar:
        result = run.run(spec, seed, progress=bar)
    written = run.write(result, out)
    if _plots_wanted(no_plots):
        written += plots.plot_run(result.report, out)
    click.echo(result.markdown(), nl=False)
    click.echo(f"\nwrote {', '.join(str(p) for p in written)}")


@sim.command("sweep")
@click.argument("scenario_name", metavar="SCENARIO")
@click.option(
    "--seeds", required=True, metavar="FIRST..LAST", help="The seeds, inclusive (e.g. 1..100)."
)
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="KEY=V1,V2,...",
    help="A scenario field (dotted) and the values to try (e.g. latency.ms=50,100);"
    " several --param make a grid. Repeatable.",
)
@click.option(
    "--jobs",
    type=int,
    default=None,
    metavar="N",
    help="Processes to run in parallel (default: every core).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help=f"Directory for the results (default: {DEFAULT_OUT}/NAME-sweep).",
)
@_duration_option
@_set_option
@_no_plots_option
@_progress_option
@_bad_input_exits_2
def sweep_command(
    *,
    scenario_name: str,
    seeds: str,
    params: tuple[str, ...],
    jobs: int | None,
    out: Path | None,
    duration_ms: int | None,
    settings: tuple[str, ...],
    no_plots: bool,
    progress: bool | None,
) -> None:
    """Play SCENARIO for every seed and parameter combination, on every core.

    Writes sweep.json (every run's metrics, and per combination each metric's
    count, min, median, p90 and max), sweep.md and a box plot per metric.
    sweep.json is the same whatever --jobs. Example:

    \b
      archipel sim sweep churn --seeds 1..20 --param latency.high_ms=80,300
    """
    if jobs is not None and jobs < 1:
        raise BadInput(f"--jobs {jobs}: expected at least 1")
    grid = dict(sweep.parse_param(p) for p in params)
    spec = sweep.Sweep(
        scenario_name, sweep.parse_seeds(seeds), grid, _overrides(settings, duration_ms)
    )
    name = sweep.check(spec)[0].name
    out = out if out is not None else DEFAULT_OUT / f"{name}-sweep"
    with terminal_bar(f"{name} sweep", force=progress, unit="runs", scale=1.0, delay_s=0.0) as bar:
        outcome = sweep.execute(spec, jobs or os.cpu_count(), progress=bar)
    written = sweep.write(outcome, out)
    if _plots_wanted(no_plots):
        written += plots.plot_sweep(outcome.summary, out)
    click.echo(outcome.markdown().split("\n## ", 1)[0].rstrip())
    click.echo(f"\nwrote {', '.join(str(p) for p in written)}")
