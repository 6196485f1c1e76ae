"""Real nodes on loopback for tests: homes, a shared federation, waiting for convergence.

These tests run on trio's real clock (real sockets cannot autojump): every
wait is on a condition, under a ``fail_after`` cap, never a sleep.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import trio

from archipel.crdt import Op
from archipel.daemon.config import Config, NetworkConfig
from archipel.daemon.identity import Identity
from archipel.daemon.join import found_on_disk
from archipel.daemon.node import Node, wall_ms
from archipel.daemon.paths import Home
from archipel.daemon.storage import Store

CAP_S = 60
LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)


@dataclass
class Fed:
    """A federation of ``n`` founding cells, one node each, on disk."""

    genesis: Op
    secret: bytes
    identities: list[Identity]
    homes: list[Home]
    changed: trio.Event = field(default_factory=trio.Event)


def federation_on_disk(root: Path, n: int, *, secret: bytes | None = None) -> Fed:
    homes = [Home(root / f"node{i}") for i in range(n)]
    names = [f"cell {i}" for i in range(n)]
    genesis, joined = found_on_disk(homes, names, "Test federation", wall_ms(), secret=secret)
    assert joined[0].secret is not None
    return Fed(genesis, joined[0].secret, joined, homes)


def seed_store(home: Home, ident: Identity, ops: Sequence[Op]) -> None:
    """Write ops into a node's database before it runs."""
    with Store.open(home.database, snapshot_key=ident.snapshot_key()) as store:
        store.write_now(ops)


def config(bootstrap: Sequence[str] = (), **network: object) -> Config:
    net = replace(NetworkConfig(listen=LOOPBACK, mdns=False, dial_timeout_s=5.0), **network)
    return Config(network=replace(net, bootstrap=tuple(bootstrap)))


@asynccontextmanager
async def running(
    fed: Fed,
    index: int,
    bootstrap: Sequence[str] = (),
    ident: Identity | None = None,
    **network: object,
) -> AsyncIterator[Node]:
    """Run node ``index`` until the block ends (then stop it cleanly)."""
    node = Node(fed.homes[index], config(bootstrap, **network), ident or fed.identities[index])
    node.on_op(lambda op: fed.changed.set())
    async with serving(node):
        yield node


@asynccontextmanager
async def serving(node: Node) -> AsyncIterator[Node]:
    """Run ``node`` until the block ends (then stop it cleanly)."""
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        try:
            yield node
        finally:
            node.stop()


async def until(fed: Fed, condition: Callable[[], bool]) -> None:
    """Wait (on op arrivals) until ``condition`` holds."""
    while not condition():
        fed.changed = trio.Event()
        await fed.changed.wait()


def converged(nodes: Sequence[Node], count: int) -> bool:
    hashes = set()
    for node in nodes:
        assert node.replica is not None
        if len(node.replica.graph) != count:
            return False
        hashes.add(node.replica.state_hash())
    return len(hashes) == 1
