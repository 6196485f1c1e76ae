"""The workload: real record ops authored through each daemon's RPC, at a steady rate.

Each node has its own task and its own seeded RNG. A task picks a kind of work
by the scenario's weights and does the next sensible thing of that kind with
what the cluster has acknowledged so far: claim a known offer or make one;
act under a mandate delegated to this node, recall one it issued, or grant a
new one; vote on an open proposal, seal one whose window has closed, or open
one. Calls that fail are counted by reason (a node that is paused, killed, cut
off from the op it refers to, or out of disk space refuses or does not answer);
only ops whose call returned an id count as acknowledged.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import trio

from archipel.client import NodeUnreachable, RpcError

from .daemons import Daemon
from .scenario import Workload

WINDOW_MS = 60_000  # the shortest voting window a proposal may have
MANDATE_MS = 3_600_000
RECALL_AFTER_S = 3.0


@dataclass(frozen=True, slots=True)
class Ack:
    id: str
    kind: str
    node: int
    sent_s: float
    """Seconds into the run when the call was made."""
    acked_s: float


@dataclass
class Knowledge:
    """What the harness has seen acknowledged: the records the workload builds on."""

    members: list[str]
    circles: list[tuple[str, list[int]]]
    acks: list[Ack] = field(default_factory=list)
    refused: Counter[str] = field(default_factory=Counter)
    skipped: int = 0
    examples: dict[str, str] = field(default_factory=dict)
    """One error message for each reason a call failed."""
    offers: dict[str, tuple[int, int]] = field(default_factory=dict)
    """offer id -> (units not yet claimed as far as the harness knows, offering node)."""
    mandates: dict[str, tuple[int, int, float]] = field(default_factory=dict)
    """live mandate id -> (issuing node, delegate node, granted at s)."""
    recalled: set[str] = field(default_factory=set)
    proposals: dict[str, float] = field(default_factory=dict)
    """proposal id -> seconds into the run when its window closes."""
    sealed: dict[str, set[int]] = field(default_factory=dict)
    voted: set[tuple[str, int]] = field(default_factory=set)


def circles_of(nodes: int) -> list[tuple[str, list[int]]]:
    """Members grouped in circles of 3 to 5 (none below 3 nodes)."""
    if nodes < 3:
        return []
    count = -(-nodes // 5)
    groups: list[list[int]] = [[] for _ in range(count)]
    for i in range(nodes):
        groups[i % count].append(i)
    return [(f"circle {k}", g) for k, g in enumerate(groups)]


class Driver:
    """One node's share of the workload."""

    def __init__(
        self,
        *,
        daemon: Daemon,
        knowledge: Knowledge,
        workload: Workload,
        rng: random.Random,
        started: float,
        nodes: int,
    ) -> None:
        self.daemon = daemon
        self.k = knowledge
        self.workload = workload
        self.rng = rng
        self.started = started
        self.nodes = nodes
        kinds = [(kind, w) for kind, w in workload.mix if w > 0]
        if nodes < 3:
            kinds = [(kind, w) for kind, w in kinds if kind != "vote"] or [("note", 1.0)]
        self.kinds = [kind for kind, _ in kinds]
        self.weights = [w for _, w in kinds]

    def now_s(self) -> float:
        return trio.current_time() - self.started

    def now_ms(self) -> int:
        return int(time.time() * 1000) + self.daemon.offset_ms

    async def run(self, until_s: float) -> None:
        """Author ops at the scenario's rate until ``until_s`` into the run."""
        if self.workload.rate <= 0:
            return
        interval = 1.0 / self.workload.rate
        next_s = self.now_s() + self.rng.uniform(0, interval)
        while next_s < until_s:
            await trio.sleep_until(self.started + next_s)
            next_s += interval * self.rng.uniform(0.5, 1.5)
            if self.daemon.state != "up":
                self.k.skipped += 1
                continue
            kind = self.rng.choices(self.kinds, self.weights)[0]
            method, params, then = self._next(kind)
            await self._call(method, params, then)

    # -- choosing the next op ------------------------------------------------

    def _next(self, kind: str) -> tuple[str, dict[str, Any], Any]:
        """The next op of ``kind``: (RPC method, params, what to remember of its ack)."""
        return {
            "note": self._note,
            "ledger": self._ledger,
            "aid": self._aid,
            "mandate": self._mandate,
            "vote": self._vote,
        }[kind]()

    def _note(self) -> tuple[str, dict[str, Any], Any]:
        me = self.daemon.index
        return "note", {"text": f"note from node {me} at {self.now_s():.1f} s"}, None

    def _ledger(self) -> tuple[str, dict[str, Any], Any]:
        rng = self.rng
        params = {
            "type": rng.choice(["contribution", "use"]),
            "resource": rng.choice(["bread", "rice", "van hours"]),
            "quantity": rng.randint(1, 5),
            "unit": "units",
        }
        return "ledger.entry", params, None

    def _aid(self) -> tuple[str, dict[str, Any], Any]:
        me = self.daemon.index
        open_offers = [o for o, (left, node) in self.k.offers.items() if left > 0 and node != me]
        if open_offers and self.rng.random() < 0.7:
            offer = self.rng.choice(sorted(open_offers))
            return "aid.claim", {"offer": offer, "quantity": 1}, ("claim", offer)
        params = {
            "what": "loaves",
            "quantity": 3,
            "unit": "loaf",
            "location": f"cell {me}",
            "until": self.now_ms() + MANDATE_MS,
        }
        return "aid.offer", params, ("offer", 3)

    def _mandate(self) -> tuple[str, dict[str, Any], Any]:
        me, rng, k = self.daemon.index, self.rng, self.k
        mine = sorted(m for m, (_, d, _) in k.mandates.items() if d == me)
        if mine and rng.random() < 0.6:
            mandate = rng.choice(mine)
            text = f"act by node {me} at {self.now_s():.1f} s"
            return "mandate.act", {"mandate": mandate, "act": "act", "text": text}, None
        now = self.now_s()
        issued = sorted(
            m for m, (i, _, t) in k.mandates.items() if i == me and now - t > RECALL_AFTER_S
        )
        if issued and rng.random() < 0.5:
            mandate = rng.choice(issued)
            recall = {"mandate": mandate, "reason": "recalled"}
            return "mandate.recall", recall, ("recall", mandate)
        delegate = (me + rng.randint(1, self.nodes - 1)) % self.nodes
        params: dict[str, Any] = {
            "delegate": k.members[delegate],
            "instructions": f"act for node {me}",
            "expires": self.now_ms() + MANDATE_MS,
            "acts": ["act"],
        }
        return "mandate.grant", params, ("grant", delegate)

    def _vote(self) -> tuple[str, dict[str, Any], Any]:
        me, rng, k = self.daemon.index, self.rng, self.k
        circle = next(name for name, group in k.circles if me in group)
        now = self.now_s()
        to_vote = sorted(
            p for p, closes in k.proposals.items() if closes > now + 1 and (p, me) not in k.voted
        )
        if to_vote:
            proposal = rng.choice(to_vote)
            vote = {
                "proposal": proposal,
                "version": proposal,
                "choices": [rng.randint(0, 1)],
                "reasoning": f"node {me}'s reasons",
                "circle": circle,
            }
            return "vote.cast", vote, ("vote", proposal)
        to_seal = sorted(
            p for p, closes in k.proposals.items() if closes < now and me not in k.sealed[p]
        )
        if to_seal:
            proposal = rng.choice(to_seal)
            return "proposal.seal", {"proposal": proposal}, ("seal", proposal)
        params: dict[str, Any] = {
            "title": f"proposal of node {me}",
            "text": "Shall we?",
            "options": ["yes", "no"],
            "ballot": "single",
            "circles": [
                {"name": name, "members": sorted(k.members[i] for i in group)}
                for name, group in k.circles
            ],
            "window_ms": WINDOW_MS,
        }
        return "proposal.open", params, ("open", None)

    # -- calling ---------------------------------------------------------------

    async def _call(self, method: str, params: dict[str, Any], then: Any) -> None:
        sent = self.now_s()
        try:
            result = await self.daemon.rpc.call(method, **params)
        except RpcError as exc:
            why = f"{method}: {exc.reason}"
            self.k.refused[why] += 1
            self.k.examples.setdefault(why, str(exc)[:300])
            return
        except (NodeUnreachable, OSError):
            self.k.refused[f"{method}: unreachable"] += 1
            return
        ident = result["id"]
        k = self.k
        k.acks.append(Ack(ident, method, self.daemon.index, sent, self.now_s()))
        if then is None:
            return
        what, arg = then
        if what == "offer":
            k.offers[ident] = (arg, self.daemon.index)
        elif what == "claim":
            left, node = k.offers[arg]
            k.offers[arg] = (max(0, left - 1), node)
        elif what == "grant":
            k.mandates[ident] = (self.daemon.index, arg, self.now_s())
        elif what == "recall":
            k.mandates.pop(arg, None)
            k.recalled.add(arg)
        elif what == "vote":
            k.voted.add((arg, self.daemon.index))
        elif what == "seal":
            k.sealed[arg].add(self.daemon.index)
        elif what == "open":
            k.proposals[ident] = self.now_s() + WINDOW_MS / 1000
            k.sealed[ident] = set()
