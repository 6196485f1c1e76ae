"""Relay alerts the moment they reach this node: to a webhook, or to any command.

    python docs/scripts/alert_relay.py --post https://chat.example.org/hooks/XYZ
    python docs/scripts/alert_relay.py --run 'notify-send "Archipel alert"'
    python docs/scripts/alert_relay.py --run ./send-sms.sh --home ~/nodes/north

Alerts are flooded to every connected node at once; this script turns their
arrival into a phone notification, an SMS gateway call or a siren. It follows
the event stream from *now* (alerts raised while it was not running are not
replayed: an old alarm is not news; ``--from-start`` replays them) and, for
every ``alert.raise`` that is still active and every ``alert.withdraw``,
posts ``{"text": ...}`` to ``--post`` and/or runs ``--run`` with the message
as its last argument (no shell: the command line is split like a shell would).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from typing import Any

import httpx

from archipel.client import Client, NodeUnreachable, RpcError

TIMEOUT_S = 10.0


def describe(event: dict[str, Any], node: Client, cells: dict[str, str]) -> str | None:
    """The message for an alert event, or None if it is not one (or no longer active)."""
    if event["kind"] == "alert.withdraw":
        return f"Alert called off ({event['body']['ref'][:12]})"
    if event["kind"] != "alert.raise":
        return None
    active = {a["id"]: a for a in node.call("alerts.active")}
    alert = active.get(event["id"])
    if alert is None:
        return None  # expired or withdrawn before we saw it
    cell = cells.get(alert["cell"], alert["cell"][:12])
    return f"ALERT from {cell} — {alert['area']}: {alert['text']}"


def relay(text: str, url: str | None, command: list[str] | None) -> None:
    if url:
        try:
            httpx.post(url, json={"text": text}, timeout=TIMEOUT_S).raise_for_status()
        except httpx.HTTPError as exc:  # one failed channel must not stop the others
            sys.stderr.write(f"webhook failed: {exc}\n")
    if command:
        subprocess.run([*command, text], check=False, timeout=60)  # noqa: S603 (the user's own command)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def latest_cursor(node: Client) -> int:
    """The cursor of the newest stored op: following from it skips the past."""
    cursor = 0
    while True:
        page = node.call("events.poll", cursor=cursor, limit=1000)
        if not page["events"]:
            return cursor
        cursor = page["cursor"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", help="the node's directory (default: $ARCHIPEL_HOME)")
    parser.add_argument("--post", metavar="URL", help="a chat webhook to post to")
    parser.add_argument("--run", metavar="COMMAND", help="a command to run with the message")
    parser.add_argument("--from-start", action="store_true", help="replay past alerts too")
    parser.add_argument("--limit", type=int, default=None, help="stop after this many relays")
    args = parser.parse_args(argv)
    command = shlex.split(args.run) if args.run else None
    relayed = 0
    try:
        with Client(args.home) as node:
            cells = {c["id"]: c["name"] for c in node.call("cells.list")}
            start = 0 if args.from_start else latest_cursor(node)
            for event in node.events(start, follow=True):
                text = describe(event, node, cells)
                if text is not None:
                    relay(text, args.post, command)
                    relayed += 1
                    if args.limit is not None and relayed >= args.limit:
                        return 0
    except (NodeUnreachable, RpcError) as exc:
        sys.stderr.write(f"{exc}\n")
        return 3 if isinstance(exc, NodeUnreachable) else 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
