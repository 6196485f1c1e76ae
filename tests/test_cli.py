"""The ``archipel`` RPC commands against a real node, in human and --json form.

A node runs in-process on loopback (tests/nodes.py) on trio's real clock,
shifted forward on demand (a voting window or a lot deadline passes without
waiting); the CLI runs in a worker thread (its client is synchronous), through
click's CliRunner. Every wait is capped by ``trio.fail_after``; nothing sleeps.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import stat
import sys
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import click
import pytest
import trio
from click.testing import CliRunner, Result
from nodes import CAP_S, Fed, config, converged, federation_on_disk, serving, until

from archipel.cli.commands import (
    BadInput,
    parse_duration_ms,
    parse_params,
    parse_time_ms,
    register,
)
from archipel.crdt import Replica
from archipel.daemon.identity import Identity
from archipel.daemon.invite import CellCard, encode_card
from archipel.daemon.methods import Methods
from archipel.daemon.node import Node, wall_ms

ROOT = Path(__file__).resolve().parent.parent
MINUTE = 60_000


def _cli() -> click.Group:
    group = click.Group("archipel")
    register(group)
    return group


CLI = _cli()


class Clock:
    """The wall clock, plus an offset a test can move forward."""

    def __init__(self) -> None:
        self.offset = 0

    def __call__(self) -> int:
        return wall_ms() + self.offset


@pytest.fixture
def fed(tmp_path: Path) -> Fed:
    # built outside trio: federation_on_disk runs its own trio loop to seed the stores
    return federation_on_disk(tmp_path, 3)


@asynccontextmanager
async def node_of(
    fed: Fed, index: int = 0, clock: Clock | None = None, bootstrap: Sequence[str] = ()
) -> AsyncIterator[Node]:
    """Run node ``index`` on ``clock`` until the block ends (then stop it cleanly)."""
    node = Node(
        fed.homes[index], config(bootstrap), fed.identities[index], clock_ms=clock or Clock()
    )
    node.on_op(lambda op: fed.changed.set())
    async with serving(node):
        yield node


def invoke(home: Path, *args: str) -> Result:
    return CliRunner().invoke(CLI, [*args, "--home", str(home)], catch_exceptions=False)


async def run(home: Path, *args: str, code: int = 0) -> Result:
    """Invoke the CLI in a worker thread; assert its exit status."""
    result = await trio.to_thread.run_sync(lambda: invoke(home, *args))
    assert result.exit_code == code, (args, result.exit_code, result.output)
    return result


async def run_json(home: Path, *args: str) -> Any:
    return json.loads((await run(home, *args, "--json")).stdout)


def made_id(result: Result) -> str:
    """The op id an action printed (``what: <64 hex>``)."""
    found = re.search(r": ([0-9a-f]{64})$", result.stdout.strip())
    assert found, result.output
    return found.group(1)


def member(fed: Fed, index: int) -> str:
    return fed.identities[index].member_public.hex()


# -- against a running node -----------------------------------------------------


async def test_status_peers_cells_in_both_forms(fed: Fed) -> None:
    home = fed.homes[0].root
    with trio.fail_after(CAP_S):
        async with node_of(fed):
            human = (await run(home, "status")).stdout
            assert "cell 0" in human
            assert member(fed, 0) in human
            assert "Test federation" in human
            raw = await run_json(home, "status")
            assert raw["info"]["member_key"] == member(fed, 0)
            assert raw["info"]["cell"] == "cell 0"
            assert raw["status"]["ops"] == 1  # the genesis
            assert await run_json(home, "peers") == []
            assert "No peers known yet." in (await run(home, "peers")).stdout
            cells = await run_json(home, "cells")
            assert sorted(c["name"] for c in cells) == ["cell 0", "cell 1", "cell 2"]
            human = (await run(home, "cells")).stdout
            for c in cells:
                assert c["id"][:12] in human


async def test_notes_events_and_log_resume_from_a_cursor(fed: Fed) -> None:
    home = fed.homes[0].root
    with trio.fail_after(CAP_S):
        async with node_of(fed) as node:
            first = made_id(await run(home, "note", "first words"))
            second = (await run_json(home, "note", "second words"))["id"]
            lines = (await run(home, "events", "--json")).stdout.splitlines()
            events = [json.loads(line) for line in lines]
            assert [e["kind"] for e in events] == ["genesis", "note", "note"]
            assert [e["id"] for e in events[1:]] == [first, second]
            cursor = events[1]["cursor"]
            resumed = await run(home, "events", "--json", "--cursor", str(cursor))
            assert [json.loads(x)["id"] for x in resumed.stdout.splitlines()] == [second]
            assert f"resume with --cursor {events[-1]['cursor']}" in resumed.output
            # --follow delivers the next op (written here, by the node itself: two CliRunners
            # must not run at once, they share sys.stdout) and stops at --limit
            async with trio.open_nursery() as nursery:

                async def follow() -> None:
                    result = await run(
                        home, "events", "--follow", "--json", "--limit", "1",
                        "--cursor", str(events[-1]["cursor"]),
                    )  # fmt: skip
                    assert json.loads(result.stdout)["body"] == {"text": "third words"}

                nursery.start_soon(follow)
                await node.author("note", {"text": "third words"})
            human = (await run(home, "events")).stdout
            assert "note" in human
            assert "first words" in human
            log = await run_json(home, "log", "--limit", "2")
            assert [op["body"]["text"] for op in log] == ["second words", "third words"]
            assert "third words" in (await run(home, "log")).stdout
            history = await run_json(home, "log", first[:10])
            assert [op["id"] for op in history] == [first]
            notes = (await run(home, "note", "--list")).stdout
            assert "first words" in notes
            assert "cell 0" in notes


async def test_propose_vote_seal_and_show(fed: Fed) -> None:
    home = fed.homes[0].root
    clock = Clock()
    circle = "river=" + ",".join(member(fed, i)[:10] for i in range(3))
    with trio.fail_after(CAP_S):
        async with node_of(fed, clock=clock):
            pid = made_id(await run(home, "propose", "Buy a van", "--text", "For the market.",
                                    "--option", "yes", "--option", "no", "--option", "later",
                                    "--circle", circle, "--window", "1m"))  # fmt: skip
            listing = await run_json(home, "show")
            assert [(p["id"], p["status"]) for p in listing] == [(pid, "open")]
            assert pid[:12] in (await run(home, "show")).stdout
            voted = await run_json(home, "vote", pid[:8], "later", "--reason", "not this year")
            assert voted["kind"] == "vote.cast"
            # sealing inside the window is refused by the node: exit status 1
            refused = await run(home, "seal", pid[:8], code=1)
            assert "the voting window is still open" in refused.output
            clock.offset += 2 * MINUTE
            await run(home, "seal", pid[:8])
            shown = await run_json(home, "show", pid[:8])
            assert shown["status"] == "sealed"
            assert shown["tally"]["counts"] == [0, 0, 1]
            assert shown["tally"]["passed"] is True
            human = (await run(home, "show", pid[:8])).stdout
            assert "Buy a van" in human
            assert "For the market." in human
            assert "not this year" in human
            assert "passed" in human
            assert re.search(r"winners\s+later", human)
            late = await run(home, "vote", pid[:8], "yes", code=1)
            assert "refused" in late.output


async def test_mandates_and_councils(fed: Fed) -> None:
    home = fed.homes[0].root
    with trio.fail_after(CAP_S):
        async with node_of(fed):
            delegate = member(fed, 1)
            mid = made_id(await run(home, "mandate", "grant", delegate[:10], "--instructions",
                                    "Negotiate the lease; sign below 900", "--act", "negotiate",
                                    "--act", "sign", "--expires", "+10d"))  # fmt: skip
            live = await run_json(home, "mandate", "list")
            assert [m["mandate"]["id"] for m in live] == [mid]
            assert live[0]["mandate"]["acts"] == ["negotiate", "sign"]
            assert "cell 1" in (await run(home, "mandate", "list")).stdout
            shown = await run_json(home, "mandate", "show", mid[:8])
            assert shown["state"]["status"] == "live"
            await run(home, "mandate", "recall", mid[:8], "--reason", "the price went up")
            assert await run_json(home, "mandate", "list") == []
            assert "No live mandates." in (await run(home, "mandate", "list")).stdout

            cid = made_id(await run(home, "council", "form", "Spring seed swap",
                                    "--cell", "cell 1", "--ends", "+30d"))  # fmt: skip
            await run(home, "council", "direct", cid[:8], "No GMO seeds")
            state = await run_json(home, "council", "show", cid[:8])
            assert state["status"] == "open"
            assert [d["text"] for d in state["directives"]] == ["No GMO seeds"]
            assert "Spring seed swap" in (await run(home, "council", "show")).stdout
            # acting as a delegate without a mandate: a clear usage error
            missing = await run(home, "council", "minutes", cid[:8], "notes", code=2)
            assert "no live mandate for this council" in missing.output
            sent = made_id(await run(home, "mandate", "grant", "me", "--council", cid[:8],
                                     "--instructions", "Carry our seeds"))  # fmt: skip
            await run(home, "council", "minutes", cid[:8], "We met at the hall")
            state = await run_json(home, "council", "show", cid)
            assert [(m["text"], m["mandate"]) for m in state["minutes"]] == [
                ("We met at the hall", sent)
            ]


async def test_ledger_alerts_pulse(fed: Fed) -> None:
    home = fed.homes[0].root
    with trio.fail_after(CAP_S):
        async with node_of(fed):
            eid = made_id(await run(home, "ledger", "add", "contribution", "rice", "10", "kg",
                                    "--with", "cell 2", "--note", "harvest"))  # fmt: skip
            await run(home, "ledger", "add", "use", "rice", "3", "kg")
            balances = await run_json(home, "ledger", "show")
            assert [(b["contributions"], b["uses"]) for b in balances] == [(10, 3)]
            assert re.search(
                r"rice\s+kg\s+10\s+3\s+0\s+7", (await run(home, "ledger", "show")).stdout
            )
            await run(home, "ledger", "correct", eid[:8], "12", "--note", "miscounted")
            entries = await run_json(home, "ledger", "show", "rice")
            assert sorted(e["quantity"] for e in entries) == [3, 12]
            assert "corrected" in (await run(home, "ledger", "show", "rice")).stdout

            aid_ = made_id(await run(home, "alert", "raise", "police at the door",
                                     "--area", "Rue Haute squat", "--expires", "2h"))  # fmt: skip
            assert [a["id"] for a in await run_json(home, "alert", "list")] == [aid_]
            assert "Rue Haute squat" in (await run(home, "alert", "list")).stdout
            await run(home, "alert", "withdraw", aid_[:8])
            assert await run_json(home, "alert", "list") == []

            await run(home, "pulse", "frustration", "the van again")
            cell0 = (await run_json(home, "status"))["info"]["cell_id"]
            frustrations = await run_json(home, "pulse", "frustrations")
            assert [(f["text"], f["cell"]) for f in frustrations] == [("the van again", cell0)]
            metrics = await run_json(home, "pulse", "--since", "2d", "--step", "1d")
            assert len(metrics["divergence"]) >= 2
            assert "divergence" in (await run(home, "pulse")).stdout


async def test_aid_offer_claim_withdraw(fed: Fed) -> None:
    home = fed.homes[0].root
    with trio.fail_after(CAP_S):
        async with node_of(fed):
            oid = made_id(await run(home, "aid", "offer", "bread", "2", "loaf",
                                    "--at", "Canal St kitchen", "--until", "+1d"))  # fmt: skip
            listed = await run_json(home, "aid", "list")
            assert [o["id"] for o in listed["offers"]] == [oid]
            assert "Canal St kitchen" in (await run(home, "aid", "list")).stdout
            own = await run(home, "aid", "claim", oid[:8], "1", code=1)
            assert "cannot claim its own offer" in own.output
            shown = await run_json(home, "aid", "show", oid[:8])
            assert shown["allocation"]["remaining"] == 2
            await run(home, "aid", "withdraw", oid[:8])
            assert (await run_json(home, "aid", "list"))["offers"] == []


async def test_lot_commit_reveal_close_keeps_the_secret_private(fed: Fed) -> None:
    home = fed.homes[0].root
    clock = Clock()
    with trio.fail_after(CAP_S):
        async with node_of(fed, clock=clock):
            lid = made_id(await run(home, "lot", "draw", "facilitator",
                                    "--among", member(fed, 0)[:10], "--among", member(fed, 1)[:10],
                                    "--cell", "cell 0", "--cell", "cell 1",
                                    "--commit-by", "+2m", "--reveal-by", "+4m"))  # fmt: skip
            await run(home, "lot", "commit", lid[:8])
            secret = fed.homes[0].root / "lots" / f"{lid}.json"
            assert stat.S_IMODE(secret.stat().st_mode) == 0o600
            assert stat.S_IMODE(secret.parent.stat().st_mode) == 0o700
            again = await run(home, "lot", "commit", lid[:8], code=1)
            assert "already committed" in again.output
            early = await run(home, "lot", "reveal", lid[:8], code=1)
            assert "too early" in early.output
            clock.offset += 3 * MINUTE
            await run(home, "lot", "reveal", lid[:8])
            clock.offset += 2 * MINUTE
            await run(home, "lot", "close", lid[:8])
            draw = await run_json(home, "lot", "show", lid[:8])
            assert draw["phase"] == "awaiting close"  # cell 1 has not closed
            cell0 = (await run_json(home, "status"))["info"]["cell_id"]
            assert draw["committed"] == draw["revealed"] == draw["closed_by"] == [cell0]
            human = (await run(home, "lot", "show")).stdout
            assert "facilitator" in human
            assert "awaiting close" in human


async def test_invite_prints_a_code(fed: Fed) -> None:
    home = fed.homes[0].root
    newcomer = Identity.generate("newcomer")
    card = encode_card(CellCard("newcomer", (newcomer.member_public,), (newcomer.device_public,)))
    with trio.fail_after(CAP_S):
        async with node_of(fed):
            made = await run_json(home, "invite", card, "--expires", "+2d")
            assert made["code"]
            assert len(made["admission"]) == 64
            human = (await run(home, "invite", card, code=1)).output
            assert "refused" in human  # the same keys cannot be admitted twice


async def test_raw_calls_and_bad_input(fed: Fed) -> None:
    home = fed.homes[0].root
    with trio.fail_after(CAP_S):
        async with node_of(fed):
            methods = json.loads((await run(home, "call", "rpc.methods")).stdout)
            assert "node.info" in methods["queries"]
            made = json.loads((await run(home, "call", "note", "text=raw note")).stdout)
            got = json.loads((await run(home, "call", "ops.get", f"id={made['id']}")).stdout)
            assert got["body"] == {"text": "raw note"}
            balances = json.loads(
                (await run(home, "call", "ledger.balances", "--params", "{}")).stdout
            )
            assert balances == []
            # the node refuses the request itself: usage errors, status 2
            bad = await run(home, "call", "ops.get", "id=zz", code=2)
            assert "must be hex" in bad.output
            assert "no method" in (await run(home, "call", "no.such", code=2)).output
            assert (
                "unknown parameter"
                in (await run(home, "call", "notes.list", "x:=1", code=2)).output
            )
            # the node refuses the op: status 1, with the rule
            refused = await run(home, "call", "note", "text:=5", code=1)
            assert "note refused" in refused.output
            # bad input caught before any call: status 2, and what to write instead
            checks = [
                (("propose", "t"), "Missing option '--circle'"),
                (("aid", "offer", "x", "0", "kg", "--at", "y"), "0 is not in the range"),
                (("alert", "raise", "x", "--area", "y", "--expires", "soonish"), "not a time"),
                (("propose", "t", "--circle", "a=me", "--window", "2 days"), "not a duration"),
                (("show", "zz"), "is not an id"),
                (("show", "abcdef"), "no proposal on this node has an id starting with"),
                (("propose", "t", "--circle", "oops"), "write NAME=KEY,KEY,KEY"),
                (("call", "note", "text"), "write key=text or key:=json"),
            ]
            for args, message in checks:
                result = await run(home, *args, code=2)
                assert message in result.output, (args, result.output)


# -- without a node ---------------------------------------------------------------


async def test_two_cells_draw_by_lot_and_hand_over_aid(fed: Fed) -> None:
    a, b = fed.homes[0].root, fed.homes[1].root
    clock = Clock()
    with trio.fail_after(CAP_S):
        async with node_of(fed, 0, clock) as node_a:  # noqa: SIM117 (b needs a's address)
            async with node_of(fed, 1, clock, node_a.listen_addrs) as node_b:
                nodes = [node_a, node_b]

                async def synced() -> None:
                    """Until both nodes hold the same ops."""
                    counts = lambda: {len(n.replica.graph) for n in nodes}  # type: ignore[union-attr]  # noqa: E731
                    await until(
                        fed, lambda: len(counts()) == 1 and converged(nodes, counts().pop())
                    )

                among = ("--among", "cell 0", "--among", member(fed, 1)[:9])
                cells = ("--cell", "cell 0", "--cell", "cell 1")
                deadlines = ("--commit-by", "+2m", "--reveal-by", "+4m")
                lid = made_id(
                    await run(a, "lot", "open", "facilitator", *among, *cells, *deadlines)
                )
                await synced()
                for home in (a, b):
                    await run(home, "lot", "commit", lid[:8])
                await synced()
                clock.offset += 3 * MINUTE
                for home in (a, b):
                    await run(home, "lot", "reveal", lid[:8])
                await synced()
                clock.offset += 2 * MINUTE
                for home in (a, b):
                    await run(home, "lot", "close", lid[:8])
                await synced()
                draws = [await run_json(home, "lot", "show", lid[:8]) for home in (a, b)]
                assert draws[0] == draws[1]
                assert draws[0]["phase"] == "closed"
                assert draws[0]["result"][0] in (member(fed, 0), member(fed, 1))
                assert "closed" in (await run(b, "lot", "show", lid[:8])).stdout

                oid = made_id(
                    await run(a, "aid", "offer", "bread", "2", "loaf", "--at", "Canal St")
                )
                await synced()
                claim = made_id(await run(b, "aid", "claim", oid[:8], "1"))
                await synced()
                await run(a, "aid", "fulfil", claim[:8])
                await synced()
                shown = await run_json(b, "aid", "show", oid[:8])
                assert [c["id"] for c in shown["allocation"]["fulfilled"]] == [claim]
                assert shown["allocation"]["remaining"] == 1
                assert "fulfilled" in (await run(b, "aid", "show", oid[:8])).stdout


# -- docs/scripts ----------------------------------------------------------------


class _Hook(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        length = int(self.headers["content-length"])
        self.server.posts.append(json.loads(self.rfile.read(length)))  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def webhook() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A chat webhook on loopback: its URL, and the JSON bodies posted to it."""
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    posts: list[dict[str, Any]] = []
    server.posts = posts  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", posts
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def script(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, ROOT / "docs" / "scripts" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_script_posts_each_new_proposal_once(fed: Fed, tmp_path: Path) -> None:
    home = fed.homes[0].root
    chat = script("proposals_to_chat")
    circle = "river=" + ",".join(member(fed, i)[:10] for i in range(3))
    state = tmp_path / "cursor"
    with trio.fail_after(CAP_S), webhook() as (url, posts):
        async with node_of(fed):
            for title in ("Buy a van", "Paint the hall"):
                await run(home, "propose", title, "--circle", circle)
            args = [url, "--home", str(home), "--state", str(state), "--once"]
            assert await trio.to_thread.run_sync(chat.main, args) == 0
            assert [p["text"].splitlines()[0].split("**")[1] for p in posts] == [
                "Buy a van", "Paint the hall",
            ]  # fmt: skip
            assert "Options: yes / no" in posts[0]["text"]
            assert await trio.to_thread.run_sync(chat.main, args) == 0
            assert len(posts) == 2  # nothing posted twice
            await run(home, "propose", "Plant trees", "--circle", circle)
            assert await trio.to_thread.run_sync(chat.main, args) == 0
            assert len(posts) == 3
            assert "Plant trees" in posts[2]["text"]
    bad = [url, "--home", str(home), "--state", str(state), "--once"]
    assert chat.main(bad) == 3  # the node has stopped


async def test_scripts_ledger_summary_and_alert_relay(
    fed: Fed, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = fed.homes[0].root
    relayed = tmp_path / "relayed.txt"
    command = shlex.join(
        [sys.executable, "-c", f"import sys; open({str(relayed)!r}, 'a').write(sys.argv[1])"]
    )
    with trio.fail_after(CAP_S):
        async with node_of(fed) as node:
            await run(home, "ledger", "add", "contribution", "rice", "10", "kg")
            await run(home, "ledger", "add", "use", "rice", "3", "kg")
            capsys.readouterr()
            weekly = script("ledger_weekly")
            assert await trio.to_thread.run_sync(weekly.main, ["--home", str(home)]) == 0
            report = capsys.readouterr().out
            assert "2 entries in the last 7 days" in report
            assert re.search(r"cell 0\s+rice\s+\+7 kg", report)
            assert re.search(r"cell 0\s+rice\s+7 kg", report)

            expires = wall_ms() + 3600_000
            body = {"text": "police at the door", "area": "Rue Haute", "expires": expires}
            await node.author("alert.raise", body)
            relay = script("alert_relay")
            args = ["--home", str(home), "--run", command, "--from-start", "--limit", "1"]
            assert await trio.to_thread.run_sync(relay.main, args) == 0
            assert relayed.read_text() == "ALERT from cell 0 — Rue Haute: police at the door"


def test_no_node_running_is_status_3(fed: Fed) -> None:
    home = fed.homes[0].root
    for args in (("status",), ("show", "--json"), ("events", "--follow"), ("lot", "show")):
        result = invoke(home, *args)
        assert result.exit_code == 3, result.output
        assert f"no node running in {home}" in result.output
        assert f"start one with 'archipel run --home {home}'" in result.output


def test_no_node_directory_is_status_3(tmp_path: Path) -> None:
    result = invoke(tmp_path / "nowhere", "status")
    assert result.exit_code == 3
    assert "no identity.json" in result.output
    assert "archipel init" in result.output


def test_durations_times_and_params() -> None:
    assert parse_duration_ms("48h") == 48 * 3600 * 1000
    assert parse_duration_ms("29.5d") == round(29.5 * 86_400_000)
    assert parse_duration_ms("1d12h") == 36 * 3600 * 1000
    assert parse_duration_ms("90m") == 90 * MINUTE
    for bad in ("", "5", "h", "2x", "-1d", "0d", "1d 2h"):
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration_ms(bad)
    assert parse_time_ms("+2d", now=1000) == 1000 + 2 * 86_400_000
    assert parse_time_ms("2d", now=1000) == 1000 + 2 * 86_400_000
    assert parse_time_ms("now", now=1000) == 1000
    assert parse_time_ms("2025-06-01T18:00Z") == 1_748_800_800_000
    assert parse_time_ms("2025-06-01T20:00+02:00") == 1_748_800_800_000
    with pytest.raises(ValueError, match="not a time"):
        parse_time_ms("tomorrow")
    assert parse_params(["a=1", "b:=1", "c:=[1, 2]", "d=x=y", "e:={\"k\": null}"]) == {
        "a": "1", "b": 1, "c": [1, 2], "d": "x=y", "e": {"k": None}
    }  # fmt: skip
    for bad in (["novalue"], ["=x"], ["a:=nope"]):
        with pytest.raises(BadInput):
            parse_params(bad)


# -- docs/rpc.md ----------------------------------------------------------------


def documented_methods() -> list[str]:
    text = (ROOT / "docs" / "rpc.md").read_text(encoding="utf-8")
    return re.findall(r"^### `([a-z_.]+)`$", text, flags=re.MULTILINE)


def test_rpc_doc_lists_every_method_once() -> None:
    """Fails when a method is added without its section in docs/rpc.md (or vice versa)."""
    methods = Methods(SimpleNamespace(replica=Replica(bytes(32))))  # type: ignore[arg-type]
    names = methods.names()
    assert len(names) == len(set(names)), "a query has the name of an action: it hides it"
    documented = documented_methods()
    assert len(documented) == len(set(documented)), "a method is documented twice"
    assert sorted(documented) == names
