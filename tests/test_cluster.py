"""The live-cluster harness: scenarios, checkers, and a short real run (the CI version).

The real run starts three ``archipel run`` processes on loopback with the
fault proxy between them (tests run on the real clock, capped by
``trio.fail_after``). The checkers are also fed hand-made node views that
break each invariant, so that a checker that could never fail would show.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio

from archipel.cli.cluster import checks
from archipel.cli.cluster import report as report_mod
from archipel.cli.cluster.daemons import ClusterError, Daemon, free_port
from archipel.cli.cluster.harness import run_cluster
from archipel.cli.cluster.scenario import (
    ClusterScenarioError,
    library,
    load,
    parse,
    with_nodes,
)
from archipel.cli.cluster.workload import Ack, circles_of
from archipel.client import NodeUnreachable, RpcError
from archipel.daemon.identity import Identity
from archipel.daemon.paths import Home
from archipel.simulations import plots

RUN_CAP_S = 240


# -- scenarios ----------------------------------------------------------------------


def test_every_library_scenario_loads() -> None:
    names = library()
    assert {"smoke", "partition-halves", "kill-restart", "pause", "disk-full"} <= set(names)
    for name in names:
        scenario = load(name)
        assert scenario.name == name
        assert scenario.faults, f"{name} injects no fault"


@pytest.mark.parametrize(
    ("raw", "complaint"),
    [
        ({}, "'name' is required"),
        ({"name": "x", "nodes": 1}, "nodes must be an integer in"),
        ({"name": "x", "speed": 3}, "unknown key speed"),
        ({"name": "x", "workload": {"mix": {"dance": 1}}}, "unknown key workload.mix.dance"),
        ({"name": "x", "faults": [{"at_s": 1, "kind": "melt"}]}, "kind must be one of"),
        ({"name": "x", "faults": [{"at_s": 1, "kind": "kill"}]}, "needs 'nodes'"),
        ({"name": "x", "nodes": 3, "faults": [{"at_s": 1, "kind": "kill", "nodes": [3]}]},
         "names node 3"),
        ({"name": "x", "faults": [{"at_s": 99, "kind": "heal"}]}, "at_s must be a number"),
        ({"name": "x", "faults": [{"at_s": 1, "kind": "partition", "groups": [[0, 1], [1]]}]},
         "disjoint"),
        ({"name": "x", "faults": [{"at_s": 1, "kind": "disk_full", "nodes": [0]}]},
         "not in disk.nodes"),
        ({"name": "x", "clock": {"offsets_ms": {"9": 5}}}, "not a node number"),
    ],
)  # fmt: skip
def test_bad_scenarios_are_refused_with_the_key_named(raw: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ClusterScenarioError, match=complaint):
        parse(raw)


def test_nodes_override_is_checked_against_the_faults() -> None:
    smoke = load("smoke")
    assert with_nodes(smoke, 6).nodes == 6
    with pytest.raises(ClusterScenarioError, match="beyond 1"):
        with_nodes(smoke, 2)


def test_an_unknown_scenario_names_the_library(tmp_path: Path) -> None:
    with pytest.raises(ClusterScenarioError, match="library scenarios: .*smoke"):
        load(str(tmp_path / "nope.toml"))


def test_circles_have_three_to_five_members() -> None:
    assert circles_of(2) == []
    for n in range(3, 33):
        sizes = [len(group) for _, group in circles_of(n)]
        assert sum(sizes) == n
        assert all(3 <= s <= 5 for s in sizes), (n, sizes)


# -- checkers fed views that break the invariants -------------------------------------


class FakeNode:
    """Answers the queries the checkers make, from canned results."""

    def __init__(self, answers: dict[tuple[str, str], Any]) -> None:
        self.answers = answers

    async def call(self, method: str, /, **params: Any) -> Any:
        key = next(iter(params.values()))
        return self.answers[method, key]


def _op(ident: str, kind: str, deps: list[str], **body: Any) -> dict[str, Any]:
    return {"id": ident, "kind": kind, "deps": deps, "body": body, "received_ms": None}


def _view(*ops: dict[str, Any]) -> checks.NodeOps:
    view = checks.NodeOps()
    view.ops = {op["id"]: op for op in ops}
    return view


def _act(op: str, counted: bool) -> dict[str, Any]:
    return {"op": op, "kind": "mandate.act", "counted": counted}


async def test_an_act_counted_though_concurrent_with_the_recall_is_caught() -> None:
    # g <- a1 <- r (recall after a1); g <- a2 (concurrent with r)
    view = _view(
        _op("g", "mandate.grant", []),
        _op("a1", "mandate.act", ["g"], mandate="g"),
        _op("r", "mandate.recall", ["a1"], mandate="g"),
        _op("a2", "mandate.act", ["g"], mandate="g"),
    )
    honest = FakeNode({("mandate.show", "g"): {"acts": [_act("a1", True), _act("a2", False)]}})
    lying = FakeNode({("mandate.show", "g"): {"acts": [_act("a1", True), _act("a2", True)]}})
    good = await checks.no_act_after_recall({"n": (honest, view)})  # type: ignore[dict-item]
    assert good.ok
    assert good.checked == 1
    bad = await checks.no_act_after_recall({"n": (lying, view)})  # type: ignore[dict-item]
    assert not bad.ok
    assert "a2" in bad.problems[0]


async def test_an_over_allocated_offer_is_caught() -> None:
    view = _view(_op("o", "aid.offer", []))

    def answer(quantities: list[int]) -> FakeNode:
        allocated = [{"quantity": q} for q in quantities]
        return FakeNode(
            {
                ("aid.allocation", "o"): {
                    "offer": {"quantity": 3},
                    "allocation": {"allocated": allocated},
                }
            }
        )

    assert (await checks.no_offer_over_allocated({"n": (answer([1, 2]), view)})).ok  # type: ignore[dict-item]
    bad = await checks.no_offer_over_allocated({"n": (answer([2, 2]), view)})  # type: ignore[dict-item]
    assert not bad.ok
    assert "allocates 4" in bad.problems[0]


async def test_a_vote_counted_outside_the_seal_cut_is_caught() -> None:
    view = _view(
        _op("p", "proposal.open", []),
        _op("v1", "vote.cast", ["p"], proposal="p"),
        _op("s", "proposal.seal", ["v1"], proposal="p"),
        _op("v2", "vote.cast", ["p"], proposal="p"),  # concurrent with the seal: late
    )

    def answer(ballots: list[str]) -> FakeNode:
        tally = {"final": True, "seals": ["s"], "circles": {"c": [{"op": b} for b in ballots]}}
        return FakeNode({("proposal.show", "p"): {"tally": tally}})

    assert (await checks.no_vote_outside_cut({"n": (answer(["v1"]), view)})).ok  # type: ignore[dict-item]
    bad = await checks.no_vote_outside_cut({"n": (answer(["v1", "v2"]), view)})  # type: ignore[dict-item]
    assert not bad.ok
    assert "v2" in bad.problems[0]


def test_a_lost_acknowledged_op_and_a_split_state_are_caught() -> None:
    acks = [Ack("x", "note", 0, 0.0, 0.1), Ack("y", "note", 1, 0.0, 0.1)]
    views = {
        "node0": _view(_op("x", "note", []), _op("y", "note", [])),
        "node1": _view(_op("x", "note", [])),
    }
    missing = checks.acknowledged_present(acks, views)
    assert not missing.ok
    assert missing.problems == ["note y… acked by node1 missing on node1"]
    split = checks.same_state(
        {"a": {"state_hash": "aa", "ops": 1}, "b": {"state_hash": "bb", "ops": 2}}
    )
    assert not split.ok
    assert checks.same_state(
        {"a": {"state_hash": "aa", "ops": 1}, "b": {"state_hash": "aa", "ops": 1}}
    ).ok


def test_a_kind_of_work_that_is_always_refused_is_caught() -> None:
    acks = [Ack("x", "note.add", 0, 0.0, 0.1), Ack("y", "mandate.act", 1, 0.0, 0.1)]
    refused = {
        "proposal.open: op_refused": 40,  # never acknowledged: the run fails
        "mandate.act: op_refused": 3,  # some refused, some acknowledged: fine
        "note.add: unreachable": 2,
    }
    examples = {"proposal.open: op_refused": "field 'members' must be sorted without repeats"}
    check = checks.work_was_done(acks, refused, examples)
    assert not check.ok
    assert check.problems == [
        "proposal.open: called 40 times, never acknowledged"
        " (field 'members' must be sorted without repeats)"
    ]
    assert checks.work_was_done(acks, {"mandate.act: op_refused": 3}, {}).ok


def test_fault_windows_pair_each_fault_with_its_undo() -> None:
    faults = [
        {"at_s": 1.0, "kind": "partition", "groups": [[0], [1]]},
        {"at_s": 2.0, "kind": "kill", "nodes": [1]},
        {"at_s": 3.0, "kind": "heal"},
        {"at_s": 4.0, "kind": "delay", "nodes": [0], "ms": 100},
        {"at_s": 5.0, "kind": "restart", "nodes": [1]},
        {"at_s": 6.0, "kind": "delay", "nodes": [0], "ms": 0},
        {"at_s": 7.0, "kind": "stop", "nodes": [0]},
    ]
    assert report_mod.windows({"faults": faults}) == [
        ("partition", 1.0, 3.0),
        ("kill", 2.0, 5.0),
        ("delay", 4.0, 6.0),
        ("stop", 7.0, None),
    ]


# -- a real run -------------------------------------------------------------------------


async def test_the_smoke_scenario_runs_real_daemons_and_every_check_passes(tmp_path: Path) -> None:
    """Three daemons; a partition and its heal, a SIGKILL and a restart, while all
    kinds of work go on. Every acknowledged op is on every node afterwards."""
    lines: list[str] = []
    with trio.fail_after(RUN_CAP_S):
        report = await run_cluster(load("smoke"), tmp_path, lines.append)
    written = report_mod.write(report, tmp_path)
    assert report["ok"], "\n".join(lines)
    assert report["settle_s"] is not None
    assert all(c["ok"] for c in report["checks"].values())
    # The run did something worth checking: acts under mandates, claims, a restart.
    assert report["checks"]["no act counted after its mandate's recall"]["checked"] > 0
    assert report["checks"]["no offer over-allocated"]["checked"] > 0
    assert report["ops"]["acknowledged"] > 30
    assert report["resources"]["node2"]["starts"] == 2
    kinds = [f["kind"] for f in report["faults"]]
    assert kinds[:4] == ["partition", "heal", "kill", "restart"]
    assert [h["kind"] for h in report["heals"]] == ["heal", "restart"]
    assert all(h["never_arrived"] == 0 for h in report["heals"])
    assert json.loads((tmp_path / "report.json").read_text())["scenario"] == "smoke"
    assert "all checks passed" in (tmp_path / "summary.md").read_text()
    if plots.available():
        assert {p.name for p in written} >= {"convergence.png", "latency_cdf.png", "resources.png"}
    assert (tmp_path / "logs" / "node2.log").stat().st_size > 0
    # Every byte went through the proxy links (the pinned peer addresses), and the
    # partition refused connections across it.
    assert report["proxy"]["links"] == 6
    assert report["proxy"]["bytes_forwarded"] > 0
    assert report["proxy"]["connections_refused"] > 0
    # The cut-off node really was cut off: ops written on the other side did not
    # reach it until the heal (no gossiped address let it around the proxy).
    series = report["missing_over_time"]
    during = series["t_s"].index(6.5)
    assert series["missing"]["node0"][during] > 0


def test_unknown_scenario_from_the_command_line_is_a_clear_error(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from archipel.cli.main import main

    result = CliRunner().invoke(
        main, ["cluster", "run", "no-such-scenario", "--out", str(tmp_path)]
    )
    assert result.exit_code == 1
    assert "library scenarios" in result.output


def test_a_failed_call_ends_the_run_naming_the_daemon_and_its_log(tmp_path: Path) -> None:
    home = Home(tmp_path / "nodes" / "node3")
    daemon = Daemon(3, home, Identity.generate("cell 3"), free_port())
    with pytest.raises(ClusterError) as caught, daemon.blame("events.poll"):
        raise RpcError(-32603, "internal error (see the node's log)", "internal")
    message = str(caught.value)
    assert message.startswith("node3: events.poll failed: ")
    assert "internal error" in message
    assert str(daemon.log_path) in message
    with (
        pytest.raises(ClusterError, match="node3: node.status failed"),
        daemon.blame("node.status"),
    ):
        raise NodeUnreachable("no such socket")
    with pytest.raises(ValueError, match="not ours"), daemon.blame("node.status"):
        raise ValueError("not ours")  # only RPC failures are turned into ClusterError
