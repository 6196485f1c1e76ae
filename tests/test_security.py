"""Security and bad input against a running node (issue #8, the wire part).

Two honest nodes of one federation run in this process on loopback: **A**
(cell North), the target, and **C** (cell South), bootstrapped to A. An
attacker then goes at A, one layer at a time:

- before any authentication: junk bytes on a raw TCP socket, junk after the
  private-network (pnet) nonce with the right key (multistream level), junk
  in place of the Noise handshake, and a stranger's key that passes the pnet
  but not the allowlist;
- as an admitted-but-malicious device (cell Evil): junk Yamux frames and a
  flood of Yamux streams, junk on our channel records, and on the sync
  protocol garbage frames, oversize frames, non-canonical encodings, forged
  signatures, non-canonical ops, ops by a revoked key and by an expelled cell,
  equivocation, a flood of valid ops at 10k ops/s, invalid ops in bulk over
  several connections, a peer that reads nothing, connection churn.

Each test checks what the issue asks: A stays up, memory stays bounded (a
tracemalloc peak or a count of tasks and connections, against a bound argued
from the limits, not measured), honest ops still cross between A and C, the
offender is disconnected where it misbehaved, and a warning names the peer
and the reason.

Real sockets: the real clock, every wait on a condition under ``fail_after``.
Counts are scaled down by default; ``ARCHIPEL_SECURITY_FULL=1`` runs the full
ones (1,000 churns, 10 s of flood).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import struct
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import multiaddr
import nacl.signing
import pytest
import trio
from Crypto.Cipher import Salsa20
from libp2p.crypto.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.protocol_muxer.multiselect_client import MultiselectClient
from libp2p.protocol_muxer.multiselect_communicator import MultiselectCommunicator
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
from libp2p.security.noise.transport import Transport as Noise
from libp2p.security.pnet.psk_conn import PskConn
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_ID
from libp2p.transport.tcp.tcp import TCP
from nodes import CAP_S, config, seed_store, serving

from archipel.crdt import (
    ArchipelError,
    Notes,
    Op,
    Params,
    Replica,
    Value,
    encode,
    found_federation,
    make_genesis,
    sign_op,
    ts_from_ms,
)
from archipel.daemon import identity as identity_mod
from archipel.daemon.channel import Channel, ChannelClosed
from archipel.daemon.guard import (
    EquivocationWatch,
    GuardError,
    GuardLimits,
    LogLimiter,
    PeerGuard,
)
from archipel.daemon.identity import Identity
from archipel.daemon.node import Node, wall_ms
from archipel.daemon.paths import Home
from archipel.daemon.transport import (
    DialError,
    Transport,
    TransportConfig,
    peer_id_of,
    pnet_key,
)
from archipel.protocol.errors import RemoteProtocolError
from archipel.protocol.messages import Goodbye, Hello, Message, Push, Want
from archipel.protocol.session import SyncSession
from archipel.protocol.wire import FrameReader, encode_message

log = logging.getLogger("test_security")
FULL = os.environ.get("ARCHIPEL_SECURITY_FULL", "") not in ("", "0")
MINUTE_MS = 60_000


# -- the federation -----------------------------------------------------------------


def _key() -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey.generate()


def _pub(sk: nacl.signing.SigningKey) -> bytes:
    return bytes(sk.verify_key)


@dataclass
class World:
    """Four founding cells, and the ops every node starts with.

    North (node A) and South (node C) are honest. Evil is an admitted cell
    whose devices attack; one of its members and one of its devices are
    revoked. Gone is a cell the federation expelled (by a sealed decision).
    """

    root: Path
    secret: bytes
    genesis: Op
    replica: Replica  # holds every op below: where attack ops are built
    north: Identity
    south: Identity
    evil_member: nacl.signing.SigningKey
    evil_devices: list[nacl.signing.SigningKey]
    revoked_member: nacl.signing.SigningKey
    revoked_device: nacl.signing.SigningKey
    gone_member: nacl.signing.SigningKey
    gone_device: nacl.signing.SigningKey
    revocation: Op
    expulsion: Op
    ops: list[Op]
    changed: trio.Event = field(default_factory=trio.Event)

    @property
    def federation(self) -> bytes:
        return self.genesis.federation

    @property
    def evil(self) -> nacl.signing.SigningKey:
        return self.evil_devices[0]

    def head(self) -> Op:
        """The newest op everyone holds (attack ops build on it)."""
        return max(self.replica.graph.topological(), key=lambda op: (op.ts, op.id))


def build_world(root: Path, evil_devices: int = 1, big_notes: int = 0) -> World:
    """The world, with ``evil_devices`` devices for Evil and ``big_notes`` notes of
    4,000 characters (about 4 KiB each) by South's member."""
    north = Identity.generate("North")
    south = Identity.generate("South")
    evil_member, revoked_member, gone_member = _key(), _key(), _key()
    devices = [_key() for _ in range(evil_devices)]
    revoked_device, gone_device = _key(), _key()
    cells: list[dict[str, Value]] = [
        {"name": "North", "members": [north.member_public], "devices": [north.device_public]},
        {"name": "South", "members": [south.member_public], "devices": [south.device_public]},
        {
            "name": "Evil",
            "members": [_pub(evil_member), _pub(revoked_member)],
            "devices": [*map(_pub, devices), _pub(revoked_device)],
        },
        {"name": "Gone", "members": [_pub(gone_member)], "devices": [_pub(gone_device)]},
    ]
    t0 = wall_ms() - 30 * MINUTE_MS
    genesis = make_genesis(
        north.member, name="Target federation", cells=cells, ts=ts_from_ms(t0),
        params=Params(admission_endorsements=1),
    )  # fmt: skip
    replica = Replica(genesis.federation)
    replica.receive(genesis, t0)
    ops = [genesis]

    def author(sk: nacl.signing.SigningKey, kind: str, body: dict[str, Any], at: int) -> Op:
        op = replica.author(sk, kind, body, t0 + at)
        ops.append(op)
        return op

    revocation = author(evil_member, "key.revoke", {"key": _pub(revoked_member)}, 1_000)
    author(evil_member, "key.revoke", {"key": _pub(revoked_device)}, 2_000)
    gone_cell = replica.authority.cell_of(_pub(gone_member))
    assert gone_cell is not None
    circle = sorted([north.member_public, south.member_public, _pub(evil_member)])
    proposal = author(
        north.member,
        "proposal.open",
        {
            "title": "Expel Gone", "text": "They broke the agreements.",
            "options": ("yes", "no"), "ballot": "single", "quorum": 50,
            "window_ms": MINUTE_MS, "action": {"expel": gone_cell},
            "circles": ({"name": "all", "members": tuple(circle)},),
        },
        3_000,
    )  # fmt: skip
    for i, voter in enumerate((north.member, south.member)):
        ballot = {"proposal": proposal.id, "version": proposal.id, "choices": (0,),
                  "reasoning": "yes", "circle": "all"}  # fmt: skip
        author(voter, "vote.cast", ballot, 4_000 + i)
    expulsion = author(north.member, "proposal.seal", {"proposal": proposal.id}, 5 * MINUTE_MS)
    for i in range(big_notes):
        author(south.member, "note", {"text": f"{i:04} " + "b" * 3995}, 6 * MINUTE_MS + i)
    assert list(replica.authority.expulsions(gone_cell)) == [expulsion.id]
    assert replica.authority.is_revoked(_pub(revoked_member))

    secret = os.urandom(32)
    world = World(
        root, secret, genesis, replica,
        north.with_federation(genesis.federation, "Target federation", secret),
        south.with_federation(genesis.federation, "Target federation", secret),
        evil_member, devices, revoked_member, revoked_device, gone_member, gone_device,
        revocation, expulsion, ops,
    )  # fmt: skip
    for ident in (world.north, world.south):
        home = Home(root / ident.cell)
        home.create()
        identity_mod.save(home.identity, ident)
        seed_store(home, ident, ops)
    return world


@pytest.fixture
def world(tmp_path: Path) -> World:
    return build_world(tmp_path)


@asynccontextmanager
async def running(
    world: World, ident: Identity, bootstrap: Sequence[str] = ()
) -> AsyncIterator[Node]:
    node = Node(Home(world.root / ident.cell), config(bootstrap), ident)
    node.on_op(lambda op: world.changed.set())
    async with serving(node):
        yield node


@asynccontextmanager
async def honest_pair(world: World) -> AsyncIterator[tuple[Node, Node]]:
    """A and C, neighbours of each other (so that their pushes go eagerly)."""
    async with running(world, world.north) as a, running(world, world.south, a.listen_addrs) as c:
        assert a.sync is not None
        assert c.sync is not None
        sa, sc = a.sync, c.sync
        await a.wait_until(lambda: c.device in sa.push.peers)
        await c.wait_until(lambda: a.device in sc.push.peers)
        yield a, c


async def honest_ops_cross(a: Node, c: Node, text: str) -> None:
    """An op authored on each honest node reaches the other."""
    assert a.replica is not None
    assert c.replica is not None
    from_c = await c.author("note", {"text": f"{text} (from C)"})
    from_a = await a.author("note", {"text": f"{text} (from A)"})
    ra, rc = a.replica, c.replica
    await a.wait_until(lambda: from_c.id in ra.graph)
    await c.wait_until(lambda: from_a.id in rc.graph)


# -- attackers ------------------------------------------------------------------------


async def _ignore(_: Channel) -> None:
    return None


@asynccontextmanager
async def device(
    world: World, sk: nacl.signing.SigningKey | None = None
) -> AsyncIterator[Transport]:
    """A transport with a device key (Evil's by default) and the federation's secret."""
    t = Transport(sk or world.evil, world.secret, lambda _: True, TransportConfig(dial_timeout_s=5))
    async with trio.open_nursery() as nursery:
        await nursery.start(t.run, _ignore)
        yield t
        nursery.cancel_scope.cancel()


class Wire:
    """The attacker's end of a channel to the node, speaking the sync protocol
    (or not). Reads what the node says, so the test can see its Goodbye."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.reader = FrameReader()
        self.heard: list[Message] = []
        self.closed = trio.Event()
        self.why = ""

    async def send(self, *messages: Message) -> None:
        await self.channel.send(b"".join(encode_message(m) for m in messages))

    async def send_raw(self, data: bytes) -> None:
        await self.channel.send(data)

    async def listen(self) -> None:
        try:
            while True:
                self.reader.feed(await self.channel.receive())
                while (message := self.reader.next_message()) is not None:
                    self.heard.append(message)
        except ChannelClosed as exc:
            self.why = str(exc)
        except RemoteProtocolError as exc:
            self.why = f"the node spoke garbage: {exc}"
        finally:
            self.closed.set()

    @property
    def goodbye(self) -> str | None:
        reasons = [m.reason for m in self.heard if isinstance(m, Goodbye)]
        return reasons[-1] if reasons else None


@asynccontextmanager
async def attack(
    world: World,
    node: Node,
    sk: nacl.signing.SigningKey | None = None,
    *,
    hello: bool = True,
    listen: bool = True,
) -> AsyncIterator[Wire]:
    """A channel from an Evil device to ``node``; Hello sent unless ``hello=False``;
    the node's messages read unless ``listen=False`` (a peer that reads nothing)."""
    async with device(world, sk) as t, trio.open_nursery() as nursery:
        wire = Wire(await t.dial(node.listen_addrs, node.device))
        if listen:
            nursery.start_soon(wire.listen)
        if hello:
            await wire.send(Hello(1, 1, world.federation))
        try:
            yield wire
        finally:
            await wire.channel.aclose()
            nursery.cancel_scope.cancel()


def warned(caplog: pytest.LogCaptureFixture, peer: bytes, *words: str) -> None:
    """A warning names ``peer`` and says why (every word appears)."""
    who = peer_id_of(peer)
    for record in caplog.records:
        if record.levelno < logging.WARNING:
            continue
        values = getattr(record, "fields", {}).values()
        text = record.getMessage() + " " + " ".join(map(str, values))
        if who in text and all(w in text for w in words):
            return
    raise AssertionError(f"no warning names {who} with {words}")


def session_of(node: Node, peer: bytes) -> SyncSession | None:
    """The node's sync session with ``peer``, if connected (a look inside)."""
    assert node.sync is not None
    link = node.sync._links.get(peer)
    return link.session if link is not None else None


async def cut_off(node: Node, wire: Wire, peer: bytes) -> None:
    """The node hung up on the attacker and forgot it."""
    await wire.closed.wait()
    await node.wait_until(lambda: peer not in node.connected_peers())


def note(sk: nacl.signing.SigningKey, world: World, seq: int, deps: Iterable[bytes], text: str,
         at_ms: int | None = None) -> Op:  # fmt: skip
    return sign_op(
        sk, federation=world.federation, seq=seq, deps=list(deps),
        ts=ts_from_ms(at_ms if at_ms is not None else wall_ms()), kind="note", body={"text": text},
    )  # fmt: skip


# -- the sync protocol (/archipel/sync/1), from an admitted device ---------------------


@pytest.mark.parametrize(
    ("junk", "why"),
    [
        pytest.param(b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1", "", id="garbage-body"),
        pytest.param(struct.pack(">I", 2 << 20) + b"\x00" * 64, "over the limit", id="oversize"),
        pytest.param(b"\x00\x00\x00\x00", "empty frame", id="empty-frame"),
        # Hello(1, 1, fed) with min_version as uint8 (0xcc 0x01): not the shortest form
        pytest.param(None, "not canonically encoded", id="non-canonical"),
        pytest.param(encode_message(Hello(1, 1, b"\x00" * 32)), "Hello after", id="second-hello"),
    ],
)
async def test_bad_frames_cut_off_only_the_sender(
    world: World, caplog: pytest.LogCaptureFixture, junk: bytes | None, why: str
) -> None:
    if junk is None:
        body = encode([0, 1, 1, world.federation])
        body = body[:2] + b"\xcc\x01" + body[3:]
        junk = len(body).to_bytes(4, "big") + body
    with trio.fail_after(CAP_S):
        async with honest_pair(world) as (a, c):
            async with attack(world, a) as wire:
                await wire.send_raw(junk)
                await cut_off(a, wire, _pub(world.evil))
                assert wire.goodbye is not None
                assert "protocol error" in wire.goodbye
                assert why in wire.goodbye
            await honest_ops_cross(a, c, "after the garbage")
            assert c.device in a.connected_peers()
    warned(caplog, _pub(world.evil), why)


def _forged(world: World, i: int) -> bytes:
    op = note(world.evil_member, world, 1, [world.head().id], f"forged {i}")
    return op.data[:-1] + bytes([op.data[-1] ^ 1])  # one bit of the signature flipped


def _non_canonical(world: World, i: int) -> bytes:
    op = note(world.evil_member, world, 1, [world.head().id], f"non-canonical {i}")
    seq_at = 1 + 1 + 34 + 34  # array, version, federation, author: then seq, a fixint
    assert op.data[seq_at] == 1
    return op.data[:seq_at] + b"\xcc\x01" + op.data[seq_at + 1 :]  # seq as a uint8: too long


def _outsider(world: World, i: int) -> bytes:
    return note(_key(), world, 1, [world.head().id], f"not a member {i}").data


def _revoked(world: World, i: int) -> bytes:
    return note(world.revoked_member, world, 1, [world.head().id], f"revoked {i}").data


def _expelled(world: World, i: int) -> bytes:
    return note(world.gone_member, world, 1, [world.head().id], f"expelled {i}").data


def _backdated(world: World, i: int) -> bytes:
    head = world.head()
    return note(world.evil_member, world, 1, [head.id], f"before its dep {i}", at_ms=0).data


BUDGET = 16  # SessionLimits.misbehaviour_budget: invalid ops forgiven at once


@pytest.mark.parametrize(
    ("make", "why"),
    [
        pytest.param(_forged, "signature", id="forged-signature"),
        pytest.param(_non_canonical, "canonical", id="non-canonical-op"),
        pytest.param(_outsider, "not authorised", id="outsider"),
        pytest.param(_revoked, "revoked", id="revoked-key"),
        pytest.param(_expelled, "expelled", id="expelled-cell"),
        pytest.param(_backdated, "timestamp", id="backdated"),
    ],
)
async def test_invalid_ops_are_refused_and_their_sender_cut_off_after_the_budget(
    world: World, caplog: pytest.LogCaptureFixture, make: Callable[[World, int], bytes], why: str
) -> None:
    bad = [make(world, i) for i in range(BUDGET + 4)]
    with trio.fail_after(CAP_S):
        async with honest_pair(world) as (a, c):
            assert a.sync is not None
            assert a.replica is not None
            assert c.replica is not None
            sync = a.sync
            async with attack(world, a) as wire:
                await wire.send(Push(tuple(bad[:BUDGET])))
                await a.wait_until(lambda: sync.counters.ops_invalid >= BUDGET)
                assert _pub(world.evil) in a.connected_peers()  # forgiven so far
                await wire.send(Push(tuple(bad[BUDGET:])))
                await cut_off(a, wire, _pub(world.evil))
            assert wire.goodbye is not None
            assert "too many invalid ops" in wire.goodbye
            assert why in wire.goodbye
            assert sync.counters.ops_invalid == BUDGET + 1  # the rest of the frame is dropped
            await honest_ops_cross(a, c, "after the invalid ops")
            held = {op.data for n in (a, c) for op in n.replica.graph.topological()}  # type: ignore[union-attr]
            assert held.isdisjoint(bad)
    warned(caplog, _pub(world.evil), "too many invalid ops", why)


async def test_a_revoked_key_that_does_not_see_its_revocation_writes_ops_that_do_not_count(
    world: World,
) -> None:
    """Remove wins, by design (crdt/authority.py): an op whose causal past lacks
    the revocation is valid, so it is applied, stored and forwarded, but it does
    not count. Nothing limits how many such ops a revoked key writes but the
    session's rate bucket: a cost the federation carries (see docs/transport.md)."""
    late = note(world.revoked_member, world, 1, [world.genesis.id], "I never saw my revocation")
    with trio.fail_after(CAP_S):
        async with honest_pair(world) as (a, c):
            assert a.replica is not None
            assert c.replica is not None
            ra, rc = a.replica, c.replica
            async with attack(world, a) as wire:
                await wire.send(Push((late.data,)))
                await a.wait_until(lambda: late.id in ra.graph)
                await honest_ops_cross(a, c, "after the late op")  # A's op pulls it to C
                assert late.id in rc.graph
                assert not wire.closed.is_set()
            for replica in (ra, rc):
                assert not replica.authority.counts(late.id)
                texts = [n.text for n in replica.record(Notes).all()]
                assert "I never saw my revocation" not in texts


async def test_equivocation_is_kept_as_evidence_on_every_honest_node(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """Two different ops with one (author, seq), one given to A, the other to C.

    What crdt/_graph.py does (and the node keeps): both are valid, so both are
    applied and forwarded; the graph records the pair as evidence and flags the
    author. The relaying device is not cut off: it cannot be told from an honest
    node relaying what it received. The warning names the author.
    """
    author = _pub(world.evil_member)
    previous = world.replica.graph.author_head(author)
    assert previous is not None
    deps = [previous.id, world.head().id]
    left = note(world.evil_member, world, previous.seq + 1, deps, "left")
    right = note(world.evil_member, world, previous.seq + 1, deps, "right")
    with trio.fail_after(CAP_S):
        async with honest_pair(world) as (a, c):
            assert a.replica is not None
            assert c.replica is not None
            ra, rc = a.replica, c.replica
            async with attack(world, a) as to_a, attack(world, c) as to_c:
                await to_a.send(Push((left.data,)))
                await to_c.send(Push((right.data,)))
                await a.wait_until(lambda: left.id in ra.graph)
                await c.wait_until(lambda: right.id in rc.graph)
                # Honest ops written now build on what each node holds, so each
                # pulls the other half of the equivocation as a dep. (Left to
                # push alone, C would not send `right` to A, its parent on the
                # author's tree: A learns of it at the 10 s re-announcement.)
                await honest_ops_cross(a, c, "after the equivocation")
                for replica in (ra, rc):
                    assert left.id in replica.graph
                    assert right.id in replica.graph
                assert _pub(world.evil) in a.connected_peers()
                assert _pub(world.evil) in c.connected_peers()
            for replica in (ra, rc):
                assert replica.graph.equivocators() == {author}
                (evidence,) = replica.graph.equivocations()
                assert (evidence.seq, set(evidence.ops)) == (left.seq, {left.data, right.data})
            assert ra.state_hash() == rc.state_hash()
    for record in caplog.records:
        if record.getMessage().startswith("equivocation") and author.hex() in str(
            getattr(record, "fields", {})
        ):
            return
    raise AssertionError("no warning names the equivocating author")


SEND_BOUND = 16 * 2**20
"""What a peer that reads nothing may make the node hold, at most: the send
budget (``guard.SEND_QUEUE_BYTES``, 8 MiB), plus the frame being built and its
copies on the way out (3 x 1 MiB), plus the channel's window each way (2 x 256
KiB), with room to spare for everything else the node allocates meanwhile."""


async def test_a_peer_that_reads_nothing_is_cut_off_with_bounded_memory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The attacker asks for ~1 MiB of ops per Want and never reads the answers.

    The session's lazy answering (an answer is built only while its outbox is
    short) does not help: the node drains the outbox into its per-peer send
    queue at once, and that queue is bounded in messages (1,024), not bytes.
    Forty Wants of 240 four-KiB notes would make it hold 40 MiB (a thousand, a
    gigabyte). With the byte budget the peer is cut off as too slow instead.
    """
    world = build_world(tmp_path, big_notes=240)
    big = tuple(op.id for op in world.ops[-240:])
    wants = 40
    tracemalloc.start()
    try:
        with trio.fail_after(CAP_S):
            async with honest_pair(world) as (a, c):
                evil = _pub(world.evil)
                async with attack(world, a, listen=False) as wire:
                    await a.wait_until(lambda: session_of(a, evil) is not None)
                    session = session_of(a, evil)
                    assert session is not None
                    base = tracemalloc.get_traced_memory()[0]
                    tracemalloc.reset_peak()
                    for sent in range(1, wants + 1):
                        if wire.channel.closed or evil not in a.connected_peers():
                            break
                        await wire.send(Want(big))

                        def answered(n: int = sent) -> bool:
                            served = session.stats.wants_served >= n
                            return served or evil not in a.connected_peers()

                        await a.wait_until(answered)
                    peak = tracemalloc.get_traced_memory()[1] - base
                    await honest_ops_cross(a, c, "while a peer reads nothing")
                    still_there = evil in a.connected_peers()
    finally:
        tracemalloc.stop()
    log.info("slow reader: %d Wants sent, peak %.1f MiB over the base", sent, peak / 2**20)
    if peak > SEND_BOUND or still_there:
        raise AssertionError(f"held {peak / 2**20:.1f} MiB for a peer that reads nothing")
    assert sent < wants  # cut off before it asked for everything
    warned(caplog, evil, "too slow")


FLOOD_RATE = 10_000  # ops per second
FLOOD_OPS = 100_000 if FULL else 6_000
OP_BURST, OP_RATE = 4096, 2000  # SessionLimits.op_burst, op_rate_per_s: unsolicited ops


def flood_ops(world: World, count: int) -> list[Op]:
    """A chain of valid notes by an Evil device, dated from now on."""
    sk, start = world.evil, ts_from_ms(wall_ms())
    ops: list[Op] = []
    deps = [world.head().id]
    for i in range(count):
        op = sign_op(
            sk, federation=world.federation, seq=i + 1, deps=deps, ts=start + i, kind="note",
            body={"text": f"flood {i}"},
        )  # fmt: skip
        ops.append(op)
        deps = [op.id]
    return ops


async def test_a_flood_of_valid_ops_is_rate_limited_and_starves_no_one(world: World) -> None:
    """Valid ops pushed unasked by one admitted device, at up to 10,000 per second.

    Valid ops are no offence: the peer stays connected. Two limits hold it:
    the channel's window, so it cannot send faster than the node reads (about
    3,000 ops/s here, the node validating, storing and forwarding each), and
    the session's bucket, which admits unsolicited ops at most at OP_RATE per
    second after a burst of OP_BURST and drops the rest (reconciliation fetches
    them later, at the node's pace; the chain's later ops wait for their deps in
    the bounded pending set). Meanwhile honest ops cross both ways. The default
    run (6,000 ops) stays within the burst; ARCHIPEL_SECURITY_FULL=1 sends
    100,000 and shows the bucket dropping.
    """
    flood = flood_ops(world, FLOOD_OPS)
    batch = 50
    half_sent = trio.Event()
    sent = 0

    async def flooder(wire: Wire) -> None:
        nonlocal sent
        start = trio.current_time()
        for i in range(0, len(flood), batch):
            await trio.sleep_until(start + i / FLOOD_RATE)  # the attacker's pace
            await wire.send(Push(tuple(op.data for op in flood[i : i + batch])))
            sent = i + batch
            if sent >= len(flood) // 2:
                half_sent.set()

    with trio.fail_after(CAP_S * (4 if FULL else 1)):
        async with honest_pair(world) as (a, c):
            assert a.replica is not None
            evil = _pub(world.evil)
            async with attack(world, a) as wire:
                await a.wait_until(lambda: session_of(a, evil) is not None)
                session = session_of(a, evil)
                assert session is not None
                start = trio.current_time()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(flooder, wire)
                    await half_sent.wait()
                    before = trio.current_time()
                    await honest_ops_cross(a, c, "during the flood")
                    crossed_at, crossing = sent, trio.current_time() - before
                elapsed = trio.current_time() - start
                assert not wire.closed.is_set(), wire.why  # not cut off
                assert evil in a.connected_peers()
            await honest_ops_cross(a, c, "after the flood")
    stats = session.stats
    log.info(
        f"flood: {len(flood)} ops in {elapsed:.2f} s ({len(flood) / elapsed:.0f}/s); "
        f"admitted {stats.ops_received}, dropped {stats.ops_dropped}; honest ops crossed "
        f"in {crossing:.2f} s with {crossed_at} sent; "
        f"applied {sum(op.id in a.replica.graph for op in flood)}"
    )
    # The sender cannot go faster than the node takes its bytes (the channel's
    # window), and of what it sends the node admits no more than the bucket allows.
    assert stats.ops_received + stats.ops_dropped == len(flood)
    assert stats.ops_received <= OP_BURST + OP_RATE * elapsed
    pending = sum(a.replica.graph.is_pending(op.id) for op in flood)
    assert pending <= a.replica.graph.limits.max_pending


STRIKES = 3  # GuardLimits.strikes: cut-offs forgiven within the window


async def test_a_peer_that_keeps_coming_back_with_invalid_ops_is_banned(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """Each session forgives BUDGET invalid ops; the guard remembers the cut-offs.

    After STRIKES + 1 cut-offs the device is banned: refused at the Noise
    handshake, so the invalid ops it can make the node check are bounded by
    (STRIKES + 1) x (BUDGET + 1) per ban, and bans double.
    """
    evil = _pub(world.evil)
    bad = [_forged(world, i) for i in range((STRIKES + 2) * (BUDGET + 1))]
    sessions = 0
    with trio.fail_after(CAP_S):
        async with honest_pair(world) as (a, c):
            assert a.sync is not None
            sync = a.sync
            refused = False
            for attempt in range(STRIKES + 2):
                try:
                    async with attack(world, a) as wire:
                        sessions += 1
                        start = attempt * (BUDGET + 1)
                        await wire.send(Push(tuple(bad[start : start + BUDGET + 1])))
                        await cut_off(a, wire, evil)
                        assert wire.goodbye is not None
                        assert "too many invalid" in wire.goodbye
                except* DialError:
                    refused = True
                if refused:
                    break
            checked = sync.counters.ops_invalid
            await honest_ops_cross(a, c, "after the ban")
    log.info("ban: %d sessions, %d invalid ops checked before the ban", sessions, checked)
    if not refused:
        raise AssertionError(f"{sessions} sessions of invalid ops and still admitted")
    assert sessions == STRIKES + 1
    assert checked == sessions * (BUDGET + 1)
    warned(caplog, evil, "banned")


# -- before authentication: raw TCP, pnet, multistream, Noise ---------------------------


def tcp_address(node: Node) -> tuple[str, int]:
    parts = node.listen_addrs[0].split("/")
    return parts[2], int(parts[4])


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _multistream(*protocols: str) -> bytes:
    lines = ("/multistream/1.0.0", *protocols)
    return b"".join(_varint(len(p) + 1) + p.encode() + b"\n" for p in lines)


class PnetWriter:
    """Encrypts like libp2p's PskConn: an 8-byte nonce, then Salsa20 with the PSK."""

    def __init__(self, secret: bytes) -> None:
        self.nonce = os.urandom(8)
        self.cipher = Salsa20.new(key=pnet_key(secret), nonce=self.nonce)
        self.started = False

    def wrap(self, data: bytes) -> bytes:
        head = b"" if self.started else self.nonce
        self.started = True
        return head + self.cipher.encrypt(data)


JUNK_LEVELS = ("tcp", "pnet", "multistream", "noise", "huge-claim")


async def junk_connection(world: World, node: Node, level: str) -> int:
    """One connection that goes as far as ``level`` correctly, then sends junk
    until the node closes it (4 MiB at most); returns how much junk it sent.

    tcp: random bytes (to the node, a wrong private-network key). pnet: the
    right key, then junk where multistream-select should start. multistream:
    its header, then junk commands. noise: Noise selected, then junk handshake
    messages. huge-claim: the right key, then a multistream message whose
    length prefix claims 1 GiB, and zeros.
    """
    pnet = PnetWriter(world.secret)
    plain = {
        "pnet": b"",
        "multistream": _multistream(),
        "noise": _multistream("/noise"),
        "huge-claim": _varint(1 << 30),
    }.get(level)
    prefix = b"" if plain is None else pnet.wrap(plain)
    stream = await trio.open_tcp_stream(*tcp_address(node))
    sent = 0
    async with stream, trio.open_nursery() as nursery:

        async def drain() -> None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                while await stream.receive_some(65536):
                    pass
            nursery.cancel_scope.cancel()  # the node closed the connection

        nursery.start_soon(drain)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(prefix)
            while sent < 4 << 20:
                junk = b"\0" * 4096 if level == "huge-claim" else os.urandom(4096)
                await stream.send_all(junk if level == "tcp" else pnet.wrap(junk))
                sent += len(junk)
        nursery.cancel_scope.cancel()
    return sent


JUNK_CONNECTIONS = 8
JUNK_BOUND = 8 * 2**20
"""Memory all the junk connections together may cost the node: each may send
``transport.HANDSHAKE_BYTES`` (64 KiB) before it is cut off, read 64 KiB at a
time and copied a few times on the way (pnet decryption, multistream): under
1 MiB each. Unbounded, one claim of a 1 GiB message made the node allocate
1 GiB per read and buffer 13 MB."""


@pytest.mark.parametrize("level", JUNK_LEVELS)
async def test_junk_before_authentication_is_closed_and_logged(
    world: World, caplog: pytest.LogCaptureFixture, level: str
) -> None:
    with trio.fail_after(CAP_S):
        async with honest_pair(world) as (a, c):
            tasks = trio.lowlevel.current_statistics().tasks_living
            tracemalloc.start()
            try:
                base = tracemalloc.get_traced_memory()[0]
                async with trio.open_nursery() as nursery:
                    for _ in range(JUNK_CONNECTIONS):
                        nursery.start_soon(junk_connection, world, a, level)
                peak = tracemalloc.get_traced_memory()[1] - base
            finally:
                tracemalloc.stop()
            await honest_ops_cross(a, c, f"after junk at the {level} level")
            assert a.connected_peers() == [c.device]
            assert a.transport.connection_count == 1
            assert trio.lowlevel.current_statistics().tasks_living <= tasks + 2
    log.info("junk at %s: peak %.2f MiB", level, peak / 2**20)
    assert peak < JUNK_BOUND
    refusals = [
        r for r in caplog.records
        if r.levelno == logging.WARNING and r.getMessage() == "inbound handshake failed: closed"
    ]  # fmt: skip
    assert refusals
    assert all(r.fields["remote"].startswith("127.0.0.1:") for r in refusals)  # type: ignore[attr-defined]
    expected = {
        "noise": ("Noise handshake message failed", "handshake longer than"),
        "huge-claim": ("handshake longer than",),
    }.get(level, ("failed to negotiate the secure protocol",))
    whys = [r.fields["why"] for r in refusals]  # type: ignore[attr-defined]
    assert all(any(e in why for e in expected) for why in whys), whys
    assert len(refusals) <= 5  # LogLimiter: a burst of 5 per remote host, then one per 10 s


async def test_keys_outside_the_allowlist_are_refused_at_the_handshake_and_named(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """A stranger's key (it holds the federation secret, so it passes the pnet),
    a revoked device and a device of the expelled cell: each completes Noise,
    proving its key, and is refused right there, before any muxer or sync byte."""
    keys = {"stranger": _key(), "revoked": world.revoked_device, "expelled": world.gone_device}
    with trio.fail_after(CAP_S):
        async with honest_pair(world) as (a, c):
            for sk in keys.values():
                async with device(world, sk) as t:
                    with pytest.raises(DialError):
                        await t.dial(a.listen_addrs, a.device)
            await honest_ops_cross(a, c, "after the refusals")
            assert a.connected_peers() == [c.device]
    refusals = [str(getattr(r, "fields", {}).get("why")) for r in caplog.records]
    for name, sk in keys.items():
        who = peer_id_of(_pub(sk))
        named = [w for w in refusals if who in w and "allowlist" in w]
        assert len(named) == 1, (name, refusals)  # one handshake per dial: no retries


# -- Yamux, from an admitted device -------------------------------------------------------


async def secured(world: World, node: Node, sk: nacl.signing.SigningKey) -> Any:
    """A raw connection to ``node``: pnet, Noise with ``sk``, Yamux selected; the
    caller then writes Yamux frames of its own on the returned secure connection."""
    raw = await TCP().dial(multiaddr.Multiaddr(node.listen_addrs[0].split("/p2p/")[0]))
    conn = PskConn(raw, pnet_key(world.secret).hex())
    await MultiselectClient().select_one_of([NOISE_ID], MultiselectCommunicator(conn), 5)
    pair = KeyPair(Ed25519PrivateKey(sk), Ed25519PublicKey(sk.verify_key))
    noise = Noise(pair, noise_privkey=new_x25519_key_pair().private_key)
    secure = await noise.secure_outbound(conn, ID.from_base58(node.peer_id))
    yamux = MultiselectCommunicator(secure)
    await MultiselectClient().select_one_of([TProtocol(YAMUX_ID)], yamux, 5)
    return secure


def yamux_frame(kind: int, flags: int, stream: int, length: int, version: int = 0) -> bytes:
    return struct.pack(">BBHII", version, kind, flags, stream, length)


_SYN = 1
YAMUX_JUNK = {
    "random": lambda: os.urandom(1 << 16),
    "oversize-data": lambda: yamux_frame(0, _SYN, 1, 1 << 30) + bytes(1024),
    # a new stream (WINDOW_UPDATE + SYN) per frame: 12 bytes each, 2,000 of them
    "stream-flood": lambda: b"".join(yamux_frame(1, _SYN, 2 * i + 1, 0) for i in range(2000)),
}


@pytest.mark.parametrize("junk", list(YAMUX_JUNK))
async def test_junk_yamux_frames_from_an_admitted_device_close_its_connection(
    world: World, caplog: pytest.LogCaptureFixture, junk: str
) -> None:
    """Past Noise with an admitted key, junk where Yamux frames go.

    Random frames and a DATA frame announcing 1 GiB: py-libp2p's Yamux closes
    the connection (the second with its own warning naming the peer; the first
    silently, at debug level: a malformed header gives no reason). A flood of new
    streams: the transport allows MAX_INBOUND_STREAMS (8) per connection at once
    and cuts the peer off at the ninth (2,000 streams made 1,600 tasks before).
    """
    evil = peer_id_of(_pub(world.evil))
    with trio.fail_after(CAP_S):
        async with honest_pair(world) as (a, c):
            tasks = trio.lowlevel.current_statistics().tasks_living
            secure = await secured(world, a, world.evil)
            with contextlib.suppress(Exception):  # a reset connection raises: closed too
                await secure.write(YAMUX_JUNK[junk]())
                while await secure.read(65536):  # until the node closes the connection
                    pass
            await honest_ops_cross(a, c, f"after {junk} Yamux frames")
            assert a.connected_peers() == [c.device]
            # bound: our own tasks, plus at most one connection's streams being reset
            assert trio.lowlevel.current_statistics().tasks_living <= tasks + 2 * 8
    warnings = [
        f"{r.getMessage()} {getattr(r, 'fields', '')}"
        for r in caplog.records
        if r.levelno >= logging.WARNING
    ]
    expected = {"oversize-data": "oversized DATA frame", "stream-flood": "too many streams"}
    if junk in expected:
        assert any(evil in w and expected[junk] in w for w in warnings), warnings


# -- our channel records (/archipel/sync/1), from an admitted device -------------------------


@pytest.mark.parametrize(
    ("record", "why"),
    [
        pytest.param(struct.pack(">BI", 7, 1) + b"x", "unknown record kind 7", id="unknown-kind"),
        pytest.param(struct.pack(">BI", 0, 0), "DATA record of 0 bytes", id="empty-data"),
        pytest.param(struct.pack(">BI", 0, 1 << 20), "DATA record of 1048576", id="oversize-data"),
        pytest.param(struct.pack(">BI", 1, 0), "ACK of zero bytes", id="zero-ack"),
    ],
)
async def test_broken_channel_records_cut_off_only_the_sender(
    world: World, caplog: pytest.LogCaptureFixture, record: bytes, why: str
) -> None:
    evil = _pub(world.evil)
    with trio.fail_after(CAP_S):
        async with honest_pair(world) as (a, c):
            async with attack(world, a) as wire:
                await a.wait_until(lambda: evil in a.connected_peers())
                await wire.channel._stream.write(record)  # under the channel's framing
                await cut_off(a, wire, evil)
            await honest_ops_cross(a, c, "after the broken records")
    found = [
        r for r in caplog.records
        if r.getMessage() == "peer broke the channel protocol: cut off"
        and getattr(r, "fields", {}).get("peer") == peer_id_of(evil)
    ]  # fmt: skip
    assert found
    assert why in found[0].fields["why"]  # type: ignore[attr-defined]


CHURNS = 1000 if FULL else 100


async def test_connection_churn_against_a_node_leaves_it_bounded(tmp_path: Path) -> None:
    """Admitted devices connect, say Hello and hang up, CHURNS times (eight
    devices in turn: libp2p limits each peer to 10 new connections per second).

    A leak of one task (or one session, one peer record) per connection would
    show as CHURNS - 20 more between cycle 20 and the end; the bound allows a
    few dozen (timers, closes finishing in the background).
    """
    world = build_world(tmp_path, evil_devices=8)
    marks: dict[int, tuple[int, int]] = {}
    with trio.fail_after(max(CAP_S, CHURNS / 5)):
        async with honest_pair(world) as (a, c), contextlib.AsyncExitStack() as stack:
            keys = world.evil_devices
            devices = [await stack.enter_async_context(device(world, sk)) for sk in keys]
            for i in range(CHURNS):
                sk = world.evil_devices[i % 8]
                channel = await devices[i % 8].dial(a.listen_addrs, a.device)
                await channel.send(encode_message(Hello(1, 1, world.federation)))
                peer = _pub(sk)
                await a.wait_until(lambda: peer in a.connected_peers())  # noqa: B023
                await channel.aclose()
                await a.wait_until(lambda: peer not in a.connected_peers())  # noqa: B023
                if i + 1 in (20, CHURNS):
                    gc.collect()
                    marks[i + 1] = (
                        trio.lowlevel.current_statistics().tasks_living,
                        len(gc.get_objects()),
                    )
            assert a.connected_peers() == [c.device]
            assert a.sync is not None
            assert len(a.sync._links) == 1  # only C's session is left
            await honest_ops_cross(a, c, "after the churn")
    (tasks_20, objects_20), (tasks_end, objects_end) = marks[20], marks[CHURNS]
    log.info("churn %d: tasks and objects %s", CHURNS, marks)
    assert tasks_end - tasks_20 < 40, marks
    assert objects_end - objects_20 < 20_000, marks


# -- the guard's rules (pure) ------------------------------------------------------------------


def test_strikes_within_the_window_ban_and_bans_double() -> None:
    limits = GuardLimits(strikes=2, window_ms=1_000, ban_ms=10_000, max_ban_ms=25_000)
    guard, peer = PeerGuard(limits), b"p" * 32
    assert guard.strike(peer, "junk", 0).banned_until_ms is None
    assert guard.strike(peer, "junk", 500).strikes == 2
    verdict = guard.strike(peer, "junk", 900)
    assert verdict.banned_until_ms == 10_900
    assert guard.banned(peer, 10_899)
    assert not guard.banned(peer, 10_900)
    # strikes older than the window are forgotten
    for t in (20_000, 21_001, 22_002):
        assert guard.strike(peer, "junk", t).banned_until_ms is None
    for t in (30_000, 30_001):
        guard.strike(peer, "junk", t)
    assert guard.strike(peer, "junk", 30_002).banned_until_ms == 30_002 + 20_000  # doubled
    for t in (60_000, 60_001):
        guard.strike(peer, "junk", t)
    assert guard.strike(peer, "junk", 60_002).banned_until_ms == 60_002 + 25_000  # capped
    assert not guard.banned(b"q" * 32, 60_002)


def test_the_guard_remembers_a_bounded_number_of_peers() -> None:
    guard = PeerGuard(GuardLimits(strikes=0, max_peers=3))
    for i in range(10):
        guard.strike(bytes([i]) * 32, "junk", 0)
    assert len(guard) == 3
    assert guard.banned(bytes([9]) * 32, 1)
    assert not guard.banned(bytes([0]) * 32, 1)  # forgotten first: its ban ends early


def test_bad_guard_input_is_a_clear_error() -> None:
    bads = [{"strikes": -1}, {"window_ms": 0}, {"ban_ms": 0}, {"max_ban_ms": 1}, {"max_peers": 0}]
    for bad in bads:
        with pytest.raises(GuardError):
            GuardLimits(**bad)
    with pytest.raises(GuardError):
        PeerGuard().strike(b"short", "junk", 0)
    with pytest.raises(GuardError):
        LogLimiter(burst=0)
    assert issubclass(GuardError, ArchipelError)


def test_the_log_limiter_allows_a_burst_then_one_per_interval() -> None:
    quiet = LogLimiter(burst=2, interval_ms=1_000)
    assert [quiet.allow("h", 0) for _ in range(4)] == [0, 0, -1, -1]
    assert quiet.allow("other", 0) == 0
    assert quiet.allow("h", 999) == -1
    assert quiet.allow("h", 1_000) == 3  # allowed, and says how many were not logged
    assert quiet.allow("h", 1_001) == -1


def test_the_equivocation_watch_reports_each_pair_once() -> None:
    member = _key()
    replica, genesis = found_federation(member, "F", [{"name": "C", "members": [_pub(member)]}], 0)
    first = replica.author(member, "note", {"text": "one"}, 1)
    twin = sign_op(
        member, federation=genesis.federation, seq=first.seq, deps=first.deps, ts=first.ts,
        kind="note", body={"text": "another"},
    )  # fmt: skip
    watch = EquivocationWatch()
    assert watch.new(replica.graph) == []
    replica.receive(twin, 2)
    (evidence,) = watch.new(replica.graph)
    assert (evidence.author, evidence.seq) == (_pub(member), first.seq)
    assert watch.new(replica.graph) == []
