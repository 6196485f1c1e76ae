"""``archipel sim``: list, run and sweep through the click group, bad input
as one line with exit status 2, plots with and without matplotlib, sweeps
that do not depend on the number of processes."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from archipel.cli.sim import sim
from archipel.simulations import plots, scenario, sweep
from archipel.simulations.progress import terminal_bar

PNG = b"\x89PNG\r\n\x1a\n"
SMALL = ["--set", "nodes=5", "--set", "workload.warmup_ms=1000", "--duration-ms", "1500"]


def invoke(*args: str) -> Result:
    return CliRunner().invoke(sim, list(args))


def test_list_names_every_library_scenario_with_one_line() -> None:
    result = invoke("list")
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert [line.split()[0] for line in lines] == scenario.library()
    assert any("Maelstrom broadcast" in line for line in lines)


def test_run_writes_the_report_summary_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = invoke("run", "maelstrom-broadcast", "--seed", "3", "--out", str(out), *SMALL)
    assert result.exit_code == 0, result.output
    assert "events/s" in result.stdout
    assert "messages per op" in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["seed"] == 3
    assert report["parameters"]["nodes"] == 5
    assert report["parameters"]["duration_ms"] == 1_500
    assert (out / "summary.md").read_text().startswith("# maelstrom-broadcast (seed 3")
    for name in ("agreement.png", "latency_cdf.png", "messages_per_op.png"):
        assert (out / name).read_bytes().startswith(PNG)


def test_run_without_matplotlib_still_writes_the_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    assert not plots.available()
    out = tmp_path / "run"
    result = invoke("run", "churn", "--out", str(out), *SMALL)
    assert result.exit_code == 0, result.output
    assert "plots skipped" in result.stderr
    assert "archipel[sim]" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "summary.md"]


def test_the_same_run_from_a_file_gives_the_same_report(tmp_path: Path) -> None:
    source = scenario.LIBRARY / "churn.toml"
    copy = tmp_path / "mine.toml"
    copy.write_text(source.read_text())
    for name, where in (("churn", "a"), (str(copy), "b")):
        result = invoke("run", name, "--out", str(tmp_path / where), "--no-plots", *SMALL)
        assert result.exit_code == 0, result.output
    assert (tmp_path / "a" / "report.json").read_bytes() == (
        tmp_path / "b" / "report.json"
    ).read_bytes()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "no-such-scenario"], "no scenario 'no-such-scenario'"),
        (["run", "churn", "--set", "workload.rat=2"], "unknown field(s) rat in [workload]"),
        (["run", "churn", "--set", "nodes=ten"], "nodes: expected an integer, got 'ten'"),
        (["run", "churn", "--set", "nodes"], "expected KEY=VALUE"),
        (["run", "churn", "--duration-ms", "0"], "duration_ms and sample_ms are positive"),
        (["sweep", "churn", "--seeds", "5..1"], "--seeds '5..1'"),
        (["sweep", "churn", "--seeds", "one..two"], "expected FIRST..LAST"),
        (["sweep", "churn", "--seeds", "1..2", "--param", "latency.ms"], "expected KEY=V1,V2"),
        (["sweep", "churn", "--seeds", "1..2", "--param", "latency.foo=1,2"], "foo"),
        (["sweep", "churn", "--seeds", "1..2", "--jobs", "0"], "--jobs 0"),
        (["sweep", "churn", "--seeds", "1..1000000"], "more than"),
    ],
)
def test_bad_input_is_one_line_and_status_2(args: list[str], message: str) -> None:
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("Error: ")
    assert message in result.stderr
    assert "Traceback" not in result.output


def test_a_malformed_scenario_file_is_refused_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nnodes = [\n')
    result = invoke("run", str(bad))
    assert result.exit_code == 2
    assert "not valid TOML" in result.stderr
    assert result.stderr.count("\n") == 1


def test_help_texts_explain_the_commands() -> None:
    assert "library scenario" in invoke("--help").output
    run_help = invoke("run", "--help").output
    assert "--seed" in run_help
    assert "--no-plots" in run_help
    sweep_help = invoke("sweep", "--help").output
    assert "latency.ms=50,100" in sweep_help
    assert "--jobs" in sweep_help


def test_a_sweep_summarises_each_metric_per_combination(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    args = ["sweep", "churn", "--seeds", "1..2", "--param", "latency.high_ms=40,200"]
    result = invoke(*args, "--jobs", "1", "--out", str(out), *SMALL)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["seeds"] == [1, 2]
    assert summary["params"] == {"latency.high_ms": [40, 200]}
    combos = summary["combinations"]
    assert [c["params"] for c in combos] == [{"latency.high_ms": 40}, {"latency.high_ms": 200}]
    for combo in combos:
        assert [r["seed"] for r in combo["runs"]] == [1, 2]
        assert combo["errors"] == 0
        d = combo["summary"]["messages.msgs_per_op"]
        values = sorted(r["metrics"]["messages.msgs_per_op"] for r in combo["runs"])
        assert (d["count"], d["min"], d["max"]) == (2, values[0], values[1])
    slow, fast = combos[1]["summary"], combos[0]["summary"]
    assert slow["latency_ms.delivery.p50"]["median"] > fast["latency_ms.delivery.p50"]["median"]
    markdown = (out / "sweep.md").read_text()
    assert "## messages.msgs_per_op" in markdown
    assert "events/s" in markdown
    assert (out / "sweep-messages_msgs_per_op.png").read_bytes().startswith(PNG)


def test_a_sweep_gives_the_same_json_whatever_the_number_of_processes(tmp_path: Path) -> None:
    grid = ["--param", "workload.rate=2.0,4.0"]
    outputs = []
    for jobs in ("1", "2"):
        out = tmp_path / jobs
        result = invoke(
            "sweep", "maelstrom-broadcast", "--seeds", "4..5", *grid, "--jobs", jobs,
            "--out", str(out), "--no-plots", *SMALL,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        outputs.append((out / "sweep.json").read_bytes())
    assert outputs[0] == outputs[1]


def test_distributions_are_count_min_median_p90_max() -> None:
    values = [5, None, 1, 3, 2, 4, 6, 7, 8, 9, 10]
    assert sweep.distribution(values) == {"count": 10, "min": 1, "median": 5.5, "p90": 9, "max": 10}
    assert sweep.distribution([None])["count"] == 0
    assert sweep.parse_param("latency.kind=fixed,uniform") == ("latency.kind", ["fixed", "uniform"])
    assert sweep.parse_param("workload.rate=0.5,1") == ("workload.rate", [0.5, 1])
    assert sweep.parse_seeds("7") == (7, 7)


def test_the_progress_bar_renders_only_when_asked_or_on_a_terminal() -> None:
    quiet = io.StringIO()
    with terminal_bar("run", file=quiet) as bar:  # not a terminal
        assert bar is None
    shown = io.StringIO()
    with terminal_bar("run", force=True, delay_s=0.0, file=shown) as bar:
        assert bar is not None
        bar(5_000, 20_000)
        bar(20_000, 20_000)
        assert bar.shown
    assert "20 / 20 s simulated" in shown.getvalue()
    with terminal_bar("run", force=True, delay_s=3_600.0, file=io.StringIO()) as bar:
        assert bar is not None
        bar(1, 2)
        assert not bar.shown  # a short run stays quiet
