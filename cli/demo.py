"""``archipel demo`` (what ``make demo`` runs): three real daemons, a partition, a heal.

Three cells found a federation on loopback, each running its own daemon (a
separate process, as ``archipel run`` would). Through the RPC they propose and
vote, grant a mandate, offer and claim aid. Then one node is cut off and both
sides act at once: the cut-off delegate acts under a mandate that the other
side recalls, and both sides claim the last unit of an offer. After the heal
every node holds the same ops, shows the same state hash and the same
outcome: the recall wins, one claim gets the loaf and the other waits.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from archipel.client import Client
from archipel.crdt import ArchipelError

from ._common import READY

READY_S = 30.0
CONVERGE_S = 60.0
WINDOW_MS = 60_000  # the shortest voting window a proposal may have


class DemoFailed(click.ClickException):
    exit_code = 1


@dataclass
class Daemon:
    name: str
    home: Path
    process: subprocess.Popen[bytes] | None = None
    client: Client | None = None

    @property
    def rpc(self) -> Client:
        assert self.client is not None
        return self.client


def _archipel(*args: str) -> str:
    done = subprocess.run(  # noqa: S603 (our own interpreter and arguments)
        [sys.executable, "-m", "archipel.cli.main", *args],
        capture_output=True,
        check=False,
        text=True,
    )
    if done.returncode != 0:
        raise DemoFailed(f"archipel {args[0]} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def _start(daemon: Daemon) -> None:
    log = (daemon.home / "daemon.log").open("wb")
    process = subprocess.Popen(  # noqa: S603 (our own interpreter and arguments)
        [sys.executable, "-m", "archipel.cli.main", "run", "--home", str(daemon.home),
         "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns", "--log-level", "warning"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    daemon.process = process
    assert process.stderr is not None
    deadline = time.monotonic() + READY_S
    seen = b""
    while not READY.search(seen):
        left = deadline - time.monotonic()
        if left <= 0 or process.poll() is not None:
            said = seen.decode(errors="replace")
            raise DemoFailed(f"{daemon.name}'s daemon did not start: {said}")
        ready, _, _ = select.select([process.stderr], [], [], left)
        if ready:
            chunk = os.read(process.stderr.fileno(), 4096)
            seen += chunk
            log.write(chunk)
    threading.Thread(target=_drain, args=(process.stderr, log), daemon=True).start()
    daemon.client = Client(daemon.home)


def _drain(pipe: Any, log: Any) -> None:
    with contextlib.suppress(OSError, ValueError):
        for chunk in iter(lambda: os.read(pipe.fileno(), 4096), b""):
            log.write(chunk)
            log.flush()


def _stop(daemon: Daemon) -> None:
    if daemon.client is not None:
        daemon.client.close()
    process = daemon.process
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _converge(nodes: list[Daemon], say: bool = True) -> str:
    """Wait (on new ops, by long polls) until every node shows one state hash."""
    deadline = time.monotonic() + CONVERGE_S
    while True:
        status = [n.rpc.call("node.status") for n in nodes]
        hashes = {s["state_hash"] for s in status}
        if len(hashes) == 1:
            if say:
                click.echo(f"    all {len(nodes)} nodes: {status[0]['ops']} ops, state hash "
                           f"{status[0]['state_hash'][:16]}…")  # fmt: skip
            return str(hashes.pop())
        if time.monotonic() > deadline:
            seen = [f"{n.name}={s['ops']} ops" for n, s in zip(nodes, status, strict=True)]
            raise DemoFailed("the nodes did not converge: " + ", ".join(seen))
        fewest = min(range(len(nodes)), key=lambda i: status[i]["ops"])
        lagging = nodes[fewest].rpc
        lagging.call("events.poll", cursor=_last_cursor(lagging), timeout_s=1.0)


def _last_cursor(client: Client) -> int:
    cursor = 0
    while True:
        page = client.call("events.poll", cursor=cursor, limit=1000)
        if not page["events"]:
            return cursor
        cursor = page["cursor"]


def _say(text: str) -> None:
    click.secho(text, bold=True)


@click.command()
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the three nodes live (default: a temporary directory, removed afterwards).",
)
@click.option(
    "--quick",
    is_flag=True,
    help="Skip waiting out the one-minute voting window (no seal, no tally).",
)
def demo(directory: Path | None, quick: bool) -> None:
    """Three cells, three daemons on loopback: decide, delegate, share, split, heal, agree."""
    with _workdir(directory) as root:
        nodes = [
            Daemon("Les Tilleuls", root / "tilleuls"),
            Daemon("La Forge", root / "forge"),
            Daemon("Le Jardin", root / "jardin"),
        ]
        try:
            _run(nodes, quick)
        except ArchipelError as exc:
            raise DemoFailed(f"{type(exc).__name__}: {exc}") from None
        finally:
            for node in nodes:
                _stop(node)


@contextlib.contextmanager
def _workdir(directory: Path | None) -> Iterator[Path]:
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        yield directory
        return
    with tempfile.TemporaryDirectory(prefix="archipel-demo-") as tmp:
        yield Path(tmp)


def _card_of(output: str) -> str:
    match = re.search(r"archipel-card1-\S+", output)
    if match is None:
        raise DemoFailed(f"no cell card in 'archipel init' output: {output}")
    return match.group(0)


def _run(nodes: list[Daemon], quick: bool) -> None:  # noqa: PLR0915 (a script)
    a, b, c = nodes
    _say("1. Three cells set up their nodes")
    _archipel("init", "--cell", a.name, "--new-federation", "Fédération des Communs",
              "--home", str(a.home))  # fmt: skip
    cards = {
        n.name: _card_of(_archipel("init", "--cell", n.name, "--home", str(n.home))) for n in (b, c)
    }
    _start(a)
    click.echo(f"    {a.name} founded the federation; its daemon runs")
    for n in (b, c):
        invite = a.rpc.call("invite.create", card=cards[n.name])
        _archipel("join", invite["code"], "--home", str(n.home))
        _start(n)
        click.echo(f"    {n.name} was admitted by {a.name} and joined with its invite code")
    _converge(nodes)
    members = {n.name: n.rpc.call("node.info")["member_key"] for n in nodes}

    _say("2. A proposal, and everyone votes")
    opened = a.rpc.call(
        "proposal.open",
        title="Share a van between the three cells",
        text="We buy a second-hand van together and keep a shared calendar.",
        options=["yes", "no"],
        ballot="single",
        circles=[{"name": "everyone", "members": sorted(members.values())}],
        window_ms=WINDOW_MS,
    )
    proposal = opened["id"]
    _converge(nodes, say=False)
    for n, choice, why in ((a, 0, "we need it for the market"), (b, 0, "fine by us"),
                           (c, 1, "too expensive this year")):  # fmt: skip
        n.rpc.call("vote.cast", proposal=proposal, version=proposal, choices=[choice],
                   reasoning=why, circle="everyone")  # fmt: skip
        click.echo(f"    {n.name} votes {'yes' if choice == 0 else 'no'}: “{why}”")
    _converge(nodes)

    _say("3. A mandate and an offer")
    now = int(time.time() * 1000)
    granted = a.rpc.call(
        "mandate.grant",
        delegate=members[b.name],
        instructions="Negotiate the van's price with the garage, up to 4,000 €.",
        expires=now + 7 * 24 * 3600 * 1000,
        acts=["negotiate"],
    )
    mandate = granted["id"]
    click.echo(f"    {a.name} gives {b.name} a mandate to negotiate")
    offered = c.rpc.call(
        "aid.offer", what="sourdough loaf", quantity=2, unit="loaf",
        location="Le Jardin's kitchen", until=now + 2 * 24 * 3600 * 1000,
    )  # fmt: skip
    offer = offered["id"]
    click.echo(f"    {c.name} offers 2 loaves")
    _converge(nodes, say=False)
    a.rpc.call("aid.claim", offer=offer, quantity=1)
    click.echo(f"    {a.name} claims 1 loaf: 1 left")
    _converge(nodes)

    _say(f"4. {b.name} is cut off; both sides act at once")
    b.rpc.call("node.offline", offline=True)
    a.rpc.call("mandate.recall", mandate=mandate, reason="we found a cheaper van ourselves")
    click.echo(f"    {a.name} recalls {b.name}'s mandate")
    b.rpc.call("mandate.act", mandate=mandate, act="negotiate",
               text="Agreed 3,900 € with the garage.")  # fmt: skip
    click.echo(f"    {b.name}, not knowing, acts under it: “Agreed 3,900 € with the garage.”")
    a.rpc.call("aid.claim", offer=offer, quantity=1)
    b.rpc.call("aid.claim", offer=offer, quantity=1)
    click.echo(f"    {a.name} (again) and {b.name} both claim the last loaf")
    state_b = b.rpc.call("node.status")["state_hash"]
    state_a = a.rpc.call("node.status")["state_hash"]
    click.echo(f"    the two sides now differ: {state_a[:12]}… vs {state_b[:12]}…")

    _say("5. The network heals")
    b.rpc.call("node.offline", offline=False)
    final = _converge(nodes)
    outcomes = []
    for n in nodes:
        shown = n.rpc.call("mandate.show", mandate=mandate)
        allocation = n.rpc.call("aid.allocation", offer=offer)["allocation"]
        outcome = (
            shown["state"]["status"],
            tuple((e["kind"], e["counted"]) for e in shown["acts"]),
            tuple(x["author"] for x in allocation["allocated"]),
            tuple(x["author"] for x in allocation["waitlist"]),
        )
        outcomes.append(outcome)
    if len(set(outcomes)) != 1:
        raise DemoFailed(f"the nodes disagree on the outcome: {outcomes}")
    status, acts, allocated, waitlist = outcomes[0]
    act = next((counted for kind, counted in acts if kind == "mandate.act"), None)
    by_key = {v: k for k, v in members.items()}
    click.echo(f"    mandate: {status}; {b.name}'s act counts: {act} (the recall wins)")
    click.echo("    loaves to: " + ", ".join(by_key.get(k, k[:8]) for k in allocated)
               + "; waiting: " + ", ".join(by_key.get(k, k[:8]) for k in waitlist))  # fmt: skip
    if act is not False or len(allocated) != 2 or len(waitlist) != 1:
        raise DemoFailed(f"unexpected outcome: {outcomes[0]}")

    if not quick:
        _say("6. The voting window closes; anyone can seal and recount")
        left = opened["ts_ms"] + WINDOW_MS - int(time.time() * 1000) + 1500
        if left > 0:
            click.echo(f"    waiting {left / 1000:.0f} s for the one-minute window to close…")
            time.sleep(left / 1000)
        c.rpc.call("proposal.seal", proposal=proposal)
        final = _converge(nodes)
        tallies = [n.rpc.call("proposal.show", proposal=proposal)["tally"] for n in nodes]
        if any(t != tallies[0] for t in tallies):
            raise DemoFailed("the nodes count the vote differently")
        options = ["yes", "no"]
        click.echo(f"    every node counts the same: {_tally_line(tallies[0], options)}")
    click.secho(f"Every node converged: state hash {final[:16]}…", fg="green", bold=True)


def _tally_line(tally: Any, options: list[str]) -> str:
    counts = ", ".join(f"{o} {n}" for o, n in zip(options, tally["counts"], strict=False))
    winner = " and ".join(options[w] for w in tally["winners"])
    reasons = [b["reasoning"] for ballots in tally["circles"].values() for b in ballots]
    return f"{counts}: {winner} ({tally['voters']} voters, reasons published: {len(reasons)})"


if __name__ == "__main__":
    demo()
