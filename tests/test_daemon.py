"""Several real nodes in one process, on loopback: libp2p, SQLite and the sync protocol together."""

from __future__ import annotations

import os
from pathlib import Path

import nacl.signing
import trio
from nodes import CAP_S, converged, federation_on_disk, running, until

from archipel.crdt import sign_op
from archipel.crdt._hlc import ts_from_ms
from archipel.daemon.node import wall_ms


async def test_three_nodes_converge_and_survive_a_restart(tmp_path: Path) -> None:
    fed = federation_on_disk(tmp_path, 3)
    with trio.fail_after(CAP_S):
        async with running(fed, 0) as a:
            boot = a.listen_addrs
            async with running(fed, 1, boot) as b, running(fed, 2, boot) as c:
                nodes = [a, b, c]
                for i, node in enumerate(nodes):
                    for j in range(5):
                        await node.author("note", {"text": f"from {i}, #{j}"})
                await until(fed, lambda: converged(nodes, 1 + 15))
            # b and c stopped cleanly; a writes while they are down
            for j in range(7):
                await a.author("note", {"text": f"while they were away, #{j}"})
            async with running(fed, 1, boot) as b2:
                assert b2.replica is not None
                assert len(b2.replica.graph) == 16  # its own ops survived the restart
                await until(fed, lambda: converged([a, b2], 1 + 15 + 7))


async def test_a_node_with_the_wrong_secret_cannot_connect(tmp_path: Path) -> None:
    fed = federation_on_disk(tmp_path, 2)
    intruder = fed.identities[1].with_federation(
        fed.genesis.federation, "Test federation", os.urandom(32)
    )
    with trio.fail_after(CAP_S):
        async with running(fed, 0) as a, running(fed, 1, a.listen_addrs, ident=intruder) as b:
            # b's bootstrap dial fails (private network key); a never lets it in
            await b.wait_until(lambda: b.stats.dial_failures > 0)
            assert b.connected_peers() == []
            assert a.connected_peers() == []


async def test_forged_ops_are_rejected_and_not_forwarded(tmp_path: Path) -> None:
    fed = federation_on_disk(tmp_path, 3)
    outsider = nacl.signing.SigningKey.generate()
    with trio.fail_after(CAP_S):
        async with running(fed, 0) as a:
            boot = a.listen_addrs
            async with running(fed, 1, boot) as evil, running(fed, 2, boot) as c:
                await a.author("note", {"text": "hello"})
                await until(fed, lambda: converged([a, evil, c], 2))
                assert evil.replica is not None
                assert evil.sync is not None
                forged = sign_op(
                    outsider,
                    federation=fed.genesis.federation,
                    seq=1,
                    deps=[fed.genesis.id],
                    ts=ts_from_ms(wall_ms()),
                    kind="note",
                    body={"text": "I am not a member"},
                )
                # evil pushes an op its own replica never accepted
                evil.sync.publish(forged, wall_ms())
                await evil._after()
                assert a.sync is not None
                sync = a.sync
                await a.wait_until(lambda: sync.counters.ops_invalid > 0)
                # a real op written after the forgery reaches c; the forgery does not
                await evil.author("note", {"text": "an honest op"})
                assert c.replica is not None
                await until(fed, lambda: converged([a, c], 3))
                assert forged.id not in c.replica.graph
                assert forged.id not in a.replica.graph


async def test_nodes_find_each_other_on_the_lan_by_mdns(tmp_path: Path) -> None:
    """No bootstrap address: two nodes listening on loopback meet through mDNS there."""
    fed = federation_on_disk(tmp_path, 2)
    with trio.fail_after(CAP_S):
        async with running(fed, 0, mdns=True) as a, running(fed, 1, mdns=True) as b:
            await a.author("note", {"text": "found you"})
            await until(fed, lambda: converged([a, b], 2))
