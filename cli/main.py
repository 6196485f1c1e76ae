"""The ``archipel`` command: set up a node, run it, and (soon) script it."""

from __future__ import annotations

import dataclasses
import os
import signal
from typing import TYPE_CHECKING

import click
import trio
from rich.console import Console

from archipel.crdt import Value, found_federation
from archipel.crdt.genesis import Params
from archipel.daemon import config as config_mod
from archipel.daemon import identity as identity_mod
from archipel.daemon import logs
from archipel.daemon.invite import CellCard, encode_card
from archipel.daemon.join import join as join_federation
from archipel.daemon.node import Node, wall_ms
from archipel.daemon.paths import HomeError, NodeLock
from archipel.daemon.storage import Store

from ._common import friendly_errors, home_option, ready_line, resolve_home
from .cluster.command import cluster
from .commands import register
from .demo import demo
from .sim import sim

if TYPE_CHECKING:
    # py-libp2p pulls in trio-typing, whose trio-stubs shadow trio's own annotations;
    # TaskStatus lives in trio_typing there.
    from trio_typing import TaskStatus


@click.group()
@click.version_option(package_name="archipel")
def main() -> None:
    """Archipel: a peer-to-peer federation daemon.

    A cell runs 'archipel init --cell NAME' once, then 'archipel run'.
    """


@main.command()
@click.option("--cell", required=True, help="Your cell's name, as other cells will see it.")
@click.option(
    "--new-federation",
    "federation",
    metavar="NAME",
    default=None,
    help="Found a new federation with this cell as its only founding cell.",
)
@click.option(
    "--admission-endorsements",
    type=click.IntRange(1, 100),
    default=1,
    show_default=True,
    help="With --new-federation: cells that must back the admission of a new cell"
    " (the inviting cell included). Raise it once the federation has grown.",
)
@home_option
@friendly_errors
def init(cell: str, federation: str | None, admission_endorsements: int, home: str | None) -> None:
    """Create this node's keys (and, with --new-federation, a federation).

    Without --new-federation, prints a cell card: give it to a member of the
    federation you are joining; they answer with an invite code for
    'archipel join'.
    """
    where = resolve_home(home)
    if where.exists():
        raise HomeError(f"{where.root} already holds a node (identity.json): nothing changed")
    where.create()
    with NodeLock(where):
        ident = identity_mod.Identity.generate(cell)
        if federation is not None:
            body: dict[str, Value] = {
                "name": cell,
                "members": [ident.member_public],
                "devices": [ident.device_public],
            }
            now = wall_ms()
            params = Params(admission_endorsements=admission_endorsements)
            _, genesis = found_federation(ident.member, federation, [body], now, params=params)
            with Store.open(where.database, snapshot_key=ident.snapshot_key()) as store:
                store.write_now([genesis])
            ident = ident.with_federation(genesis.federation, federation, os.urandom(32))
        if not where.config.exists():
            where.config.write_text(config_mod.TEMPLATE, encoding="utf-8")
        identity_mod.save(where.identity, ident)
    click.echo(f"Node created in {where.root}")
    click.echo(f"  cell:        {cell}")
    click.echo(f"  member key:  {ident.member_public.hex()}")
    click.echo(f"  device key:  {ident.device_public.hex()}")
    if federation is not None:
        assert ident.federation is not None
        click.echo(f"  federation:  {federation} ({ident.federation.hex()})")
        click.echo("Next: 'archipel run' starts the node.")
    else:
        card = CellCard(cell, (ident.member_public,), (ident.device_public,))
        click.echo("Cell card (send it to a member of the federation you are joining):")
        click.echo(encode_card(card))
        click.echo("They answer with an invite code: then run 'archipel join CODE'.")


@main.command()
@click.argument("code")
@home_option
@friendly_errors
def join(code: str, home: str | None) -> None:
    """Join the federation of an invite CODE (from 'archipel invite CARD')."""
    where = resolve_home(home)
    ident, invite = join_federation(where, code, wall_ms())
    click.echo(f"Joined the federation {invite.federation_name!r} ({invite.federation.hex()}).")
    click.echo(f"  bootstrap:  {len(ident.bootstrap)} address(es) of the inviting node")
    click.echo(f"  admission:  {invite.admission.hex()}")
    click.echo(
        "Next: 'archipel run'. Your cell may act once enough cells back its admission"
        " ('cell.endorse')."
    )


@main.command()
@home_option
@click.option(
    "--log-format",
    type=click.Choice(config_mod.LOG_FORMATS),
    default=None,
    help="Override [log] format from config.toml.",
)
@click.option(
    "--log-level",
    type=click.Choice(config_mod.LOG_LEVELS),
    default=None,
    help="Override [log] level from config.toml.",
)
@click.option(
    "--listen",
    multiple=True,
    metavar="MULTIADDR",
    help="Override [network] listen (repeatable), e.g. /ip4/127.0.0.1/tcp/0.",
)
@click.option("--no-mdns", is_flag=True, help="Do not use mDNS on the local network.")
@friendly_errors
def run(
    home: str | None,
    log_format: str | None,
    log_level: str | None,
    listen: tuple[str, ...],
    no_mdns: bool,
) -> None:
    """Run the node in the foreground until Ctrl-C (SIGINT) or SIGTERM."""
    where = resolve_home(home)
    ident = identity_mod.load(where.identity)
    if not ident.joined:
        raise HomeError(
            "this node belongs to no federation yet: 'archipel join CODE' with an invite code"
        )
    cfg = config_mod.load(where.config)
    network = cfg.network
    if listen:
        network = dataclasses.replace(network, listen=listen)
    if no_mdns:
        network = dataclasses.replace(network, mdns=False)
    cfg = dataclasses.replace(cfg, network=network)
    logs.setup(log_format or cfg.log.format, log_level or cfg.log.level)
    node = Node(where, cfg, ident)

    async def serve() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:

                async def run_node(task_status: TaskStatus[None]) -> None:
                    try:
                        await node.run(task_status=task_status)
                    finally:
                        nursery.cancel_scope.cancel()

                # Loading the ops (a rebuild after an upgrade can take a while) and
                # joining: a spinner on a terminal, nothing in a log file.
                console = Console(stderr=True)
                with console.status("Loading the federation's ops…", spinner="dots"):
                    await nursery.start(run_node)
                click.echo(ready_line(node.peer_id), err=True)
                for addr in node.listen_addrs:
                    click.echo(f"  {addr}", err=True)
                async for signum in signals:
                    name = signal.Signals(signum).name
                    click.echo(f"{name}: stopping (saving state)", err=True)
                    node.stop()

    trio.run(serve)


main.add_command(demo)
main.add_command(cluster)
main.add_command(sim)
register(main)

if __name__ == "__main__":
    main()
