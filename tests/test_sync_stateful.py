"""Stateful property: N nodes under any sequence of writes, deliveries, drops,
duplicates, reordering, partitions, heals, crashes, restarts and ticks. After
the network heals and goes quiet, every replica holds the same ops (the same
state hash), and every op a node acknowledged (authored) is among them."""

from __future__ import annotations

import contextlib
import random

from helpers import key
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from test_sync_node import AUTHORS, cluster, peer_id

from archipel.crdt import CapacityError, InvalidOp, Op

NODES = 5


class SyncMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.net, self.replicas, _ = cluster(NODES, seed=11)
        self.down: set[int] = set()
        self.acknowledged: list[Op] = []
        self.rng = random.Random(0)

    @rule(node=st.integers(0, NODES - 1), text=st.text(min_size=1, max_size=20))
    def local_op(self, node: int, text: str) -> None:
        """A member writes on a node that is up; the op is acknowledged."""
        if node in self.down:
            return
        who = AUTHORS[node % len(AUTHORS)]
        op = self.replicas[node].author(key(who), "note", {"text": text}, self.net.now_ms)
        self.net.publish(peer_id(node), op)
        self.acknowledged.append(op)

    @rule(ms=st.integers(1, 2_000))
    def tick(self, ms: int) -> None:
        """Time passes: messages are delivered, timers fire."""
        self.net.run_for(ms)

    @precondition(lambda self: bool(self.acknowledged))
    @rule(data=st.data())
    def duplicate_or_reorder(self, data: st.DataObject) -> None:
        """An op reaches a replica again, or out of order (as a carried copy or a
        retried push would): it changes nothing it should not."""
        op = data.draw(st.sampled_from(self.acknowledged))
        node = data.draw(st.integers(0, NODES - 1))
        with contextlib.suppress(InvalidOp, CapacityError):
            self.replicas[node].receive(op, self.net.now_ms)

    @rule(side=st.sets(st.integers(0, NODES - 1), min_size=1, max_size=NODES - 1))
    def partition(self, side: set[int]) -> None:
        """The network splits (connections across break: in-flight frames drop)."""
        self.net.partition([[peer_id(i) for i in side]])

    @rule()
    def heal(self) -> None:
        self.net.heal()

    @precondition(lambda self: len(self.down) < NODES - 2)
    @rule(node=st.integers(1, NODES - 1))
    def crash(self, node: int) -> None:
        """A node dies: its session state is lost, its stored ops are kept."""
        if node not in self.down:
            self.net.crash(peer_id(node))
            self.down.add(node)

    @precondition(lambda self: bool(self.down))
    @rule(data=st.data())
    def restart(self, data: st.DataObject) -> None:
        node = data.draw(st.sampled_from(sorted(self.down)))
        self.down.discard(node)
        self.net.restart(peer_id(node), contact=peer_id(0))

    @invariant()
    def bounded(self) -> None:
        for replica in self.replicas:
            assert replica.graph.pending_count() <= replica.graph.limits.max_pending

    def teardown(self) -> None:
        """Heal, restart everyone, wait: every replica converges, nothing lost."""
        self.net.heal()
        for node in sorted(self.down):
            self.net.restart(peer_id(node), contact=peer_id(0))
        self.net.run_for(150_000)
        hashes = {replica.state_hash() for replica in self.replicas}
        assert len(hashes) == 1, "replicas differ after heal and quiet"
        held = {op.id for op in self.replicas[0].graph.topological()}
        assert {op.id for op in self.acknowledged} <= held, "an acknowledged op was lost"


TestSync = SyncMachine.TestCase
TestSync.settings = settings(max_examples=20, stateful_step_count=25, deadline=None)
