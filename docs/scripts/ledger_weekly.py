"""A weekly summary of the commons ledger: balances, and what moved this week.

    python docs/scripts/ledger_weekly.py                 # print it
    python docs/scripts/ledger_weekly.py --days 30 --home ~/nodes/north
    python docs/scripts/ledger_weekly.py --post https://chat.example.org/hooks/XYZ

Run it from cron (``0 9 * * 1``) or a systemd timer. It reads
``ledger.balances`` for the balances and ``ledger.entries`` for each resource,
keeps the entries logged in the last ``--days`` days (corrected quantities;
voided entries left out) and writes a plain-text report, or posts it as
``{"text": ...}`` to a chat webhook.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict

import httpx

from archipel.client import Client, NodeUnreachable, RpcError

SIGN = {"contribution": 1, "use": -1, "gift_returned": 1}


def report(node: Client, days: int, now_ms: int) -> str:
    names = {c["id"]: c["name"] for c in node.call("cells.list")}
    balances = node.call("ledger.balances")
    since = now_ms - days * 86_400_000
    moved: dict[tuple[str, str, str], int] = defaultdict(int)
    entries = 0
    for resource in sorted({b["resource"] for b in balances}):
        for status in node.call("ledger.entries", resource=resource):
            entry = status["entry"]
            if not status["counts"] or (entry["ts"] >> 16) < since:
                continue
            key = (names.get(entry["cell"], entry["cell"][:12]), resource, entry["unit"])
            moved[key] += SIGN[entry["type"]] * status["quantity"]
            entries += 1
    lines = [f"Commons ledger: {entries} entries in the last {days} days"]
    for (cell, resource, unit), delta in sorted(moved.items()):
        lines.append(f"  {cell:<16} {resource:<20} {delta:+d} {unit}")
    lines.append("Balances:")
    for b in sorted(balances, key=lambda b: (names.get(b["cell"], ""), b["resource"])):
        total = b["contributions"] + b["gifts_returned"] - b["uses"]
        cell = names.get(b["cell"], b["cell"][:12])
        lines.append(f"  {cell:<16} {b['resource']:<20} {total} {b['unit']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", help="the node's directory (default: $ARCHIPEL_HOME)")
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--post", metavar="URL", help="post to this chat webhook instead")
    args = parser.parse_args(argv)
    try:
        with Client(args.home) as node:
            text = report(node, args.days, time.time_ns() // 1_000_000)
        if args.post:
            httpx.post(args.post, json={"text": text}, timeout=10.0).raise_for_status()
        else:
            sys.stdout.write(text + "\n")
    except (NodeUnreachable, RpcError) as exc:
        sys.stderr.write(f"{exc}\n")
        return 3 if isinstance(exc, NodeUnreachable) else 1
    except httpx.HTTPError as exc:
        sys.stderr.write(f"the webhook failed: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
