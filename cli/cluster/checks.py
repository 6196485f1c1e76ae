"""Invariant checkers, run against every live daemon once the cluster has settled.

The checks take each node's word only for what it counts (a mandate's acts,
an offer's allocation, a tally's ballots) and judge it against the op graph
the harness rebuilds from the ops the node stores (their ids and deps, read
through ``events.poll``): an act counted although it is not in the causal
past of its mandate's recall is a failure, whatever the node's records say.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from archipel.client import AsyncClient

from .workload import Ack

PAGE = 1000


@dataclass
class NodeOps:
    """The ops one node stores, as the harness read them."""

    cursor: int = 0
    ops: dict[str, dict[str, Any]] = field(default_factory=dict)

    async def refresh(self, client: AsyncClient, wait_s: float = 0.0) -> int:
        """Read what the node stored since the last call; returns how many ops were new."""
        new = 0
        while True:
            page = await client.call(
                "events.poll", cursor=self.cursor, limit=PAGE, timeout_s=wait_s
            )
            wait_s = 0.0
            for event in page["events"]:
                if event["id"] not in self.ops:
                    new += 1
                self.ops[event["id"]] = event
            self.cursor = page["cursor"]
            if len(page["events"]) < PAGE:
                return new


@dataclass
class Check:
    name: str
    ok: bool
    checked: int
    problems: list[str] = field(default_factory=list)

    def json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checked": self.checked,
            "problems": self.problems[:20],
            "problem_count": len(self.problems),
        }


class Ancestry:
    """Causal pasts over one node's ops (memoised walks of the deps)."""

    def __init__(self, ops: Mapping[str, Mapping[str, Any]]) -> None:
        self.ops = ops
        self._past: dict[str, frozenset[str]] = {}

    def past(self, ident: str) -> frozenset[str]:
        """Every op ``ident`` depends on, directly or not (not itself)."""
        found = self._past.get(ident)
        if found is not None:
            return found
        seen: set[str] = set()
        stack = list(self.ops[ident]["deps"]) if ident in self.ops else []
        while stack:
            dep = stack.pop()
            if dep in seen:
                continue
            seen.add(dep)
            cached = self._past.get(dep)
            if cached is not None:
                seen |= cached
                continue
            event = self.ops.get(dep)
            if event is not None:
                stack.extend(event["deps"])
        result = frozenset(seen)
        self._past[ident] = result
        return result


def same_state(statuses: Mapping[str, Mapping[str, Any]]) -> Check:
    hashes = {name: s["state_hash"] for name, s in statuses.items()}
    ok = len(set(hashes.values())) == 1
    problems = (
        [] if ok else [f"{n}: {h[:16]}… ({statuses[n]['ops']} ops)" for n, h in hashes.items()]
    )
    return Check("one state hash", ok, len(hashes), problems)


def acknowledged_present(acks: Iterable[Ack], nodes: Mapping[str, NodeOps]) -> Check:
    problems, checked = [], 0
    for ack in acks:
        for name, held in nodes.items():
            checked += 1
            if ack.id not in held.ops:
                problems.append(
                    f"{ack.kind} {ack.id[:16]}… acked by node{ack.node} missing on {name}"
                )
    return Check("every acknowledged op on every node", not problems, checked, problems)


def work_was_done(
    acks: Iterable[Ack], refused: Mapping[str, int], examples: Mapping[str, str]
) -> Check:
    """Every RPC method the workload called was acknowledged at least once: a
    kind of work that is always refused (a workload bug, or a node refusing
    what it should take) would leave the other checks nothing to judge."""
    acked = {ack.kind for ack in acks}
    calls: dict[str, int] = {}
    for why, count in refused.items():
        method = why.split(":", 1)[0]
        calls[method] = calls.get(method, 0) + count
    problems = [
        f"{method}: called {count} times, never acknowledged"
        + "".join(f" ({examples[why]})" for why in sorted(examples) if why.startswith(method + ":"))
        for method, count in sorted(calls.items())
        if method not in acked
    ]
    return Check(
        "every kind of work acknowledged at least once", not problems, len(acked | set(calls)),
        problems,
    )  # fmt: skip


async def no_act_after_recall(nodes: Mapping[str, tuple[AsyncClient, NodeOps]]) -> Check:
    problems, checked = [], 0
    for name, (client, held) in nodes.items():
        ancestry = Ancestry(held.ops)
        recalls: dict[str, list[str]] = {}
        for ident, op in held.ops.items():
            if op["kind"] == "mandate.recall":
                recalls.setdefault(op["body"]["mandate"], []).append(ident)
        for mandate, recall_ids in sorted(recalls.items()):
            shown = await client.call("mandate.show", mandate=mandate)
            for entry in shown["acts"]:
                if entry["kind"] != "mandate.act" or not entry["counted"]:
                    continue
                checked += 1
                for recall in recall_ids:
                    if entry["op"] not in ancestry.past(recall):
                        problems.append(
                            f"{name}: act {entry['op'][:16]}… counted under mandate"
                            f" {mandate[:16]}… but not before its recall {recall[:16]}…"
                        )
    return Check("no act counted after its mandate's recall", not problems, checked, problems)


async def no_offer_over_allocated(nodes: Mapping[str, tuple[AsyncClient, NodeOps]]) -> Check:
    problems, checked = [], 0
    for name, (client, held) in nodes.items():
        for ident, op in sorted(held.ops.items()):
            if op["kind"] != "aid.offer":
                continue
            checked += 1
            shown = await client.call("aid.allocation", offer=ident)
            allocation = shown["allocation"]
            quantity = shown["offer"]["quantity"]
            given = sum(c["quantity"] for c in allocation["allocated"])
            if given > quantity:
                problems.append(f"{name}: offer {ident[:16]}… of {quantity} allocates {given}")
    return Check("no offer over-allocated", not problems, checked, problems)


async def no_vote_outside_cut(nodes: Mapping[str, tuple[AsyncClient, NodeOps]]) -> Check:
    problems, checked = [], 0
    for name, (client, held) in nodes.items():
        ancestry = Ancestry(held.ops)
        for ident, op in sorted(held.ops.items()):
            if op["kind"] != "proposal.open":
                continue
            shown = await client.call("proposal.show", proposal=ident)
            tally = shown["tally"]
            if not tally["final"]:
                continue
            cut: set[str] = set()
            for seal in tally["seals"]:
                cut |= ancestry.past(seal)
            for ballots in tally["circles"].values():
                for ballot in ballots:
                    checked += 1
                    if ballot["op"] not in cut:
                        problems.append(
                            f"{name}: vote {ballot['op'][:16]}… counted in {ident[:16]}…"
                            " but not in its seals' causal past"
                        )
    return Check("no vote counted outside its seal's cut", not problems, checked, problems)
