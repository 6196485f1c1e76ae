"""Post every new proposal of the federation to a chat room, through a webhook.

    python docs/scripts/proposals_to_chat.py https://chat.example.org/hooks/XYZ
    python docs/scripts/proposals_to_chat.py URL --home ~/nodes/north --once

Most chat systems (Mattermost, Rocket.Chat, Slack, Discord with ``/slack``,
Matrix bridges) accept a POST of ``{"text": "..."}`` on an incoming webhook.
The script follows the node's event stream and posts one message per
``proposal.open``. It keeps the last cursor it handled in a state file next to
itself (``--state``), written after each successful post: stopped and started
again, it posts every proposal exactly once, including those opened while it
was not running. A post that fails is retried a few times, then the script
stops with status 1 without moving the cursor, so nothing is lost.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from archipel.client import Client, NodeUnreachable, RpcError

RETRIES = 5
TIMEOUT_S = 10.0


def message(event: dict[str, Any], node: Client) -> str:
    body = event["body"]
    shown = node.call("proposal.show", proposal=event["id"])["proposal"]
    closes = datetime.fromtimestamp(shown["closes_ms"] / 1000).strftime("%Y-%m-%d %H:%M")
    options = " / ".join(body["options"])
    text = (body.get("text") or "").strip()
    lines = [f"New proposal: **{body['title']}** (vote until {closes})", f"Options: {options}"]
    if text:
        lines.append(text if len(text) <= 500 else text[:499] + "…")
    lines.append(f"Vote: archipel vote {event['id'][:12]} CHOICE --reason '...'")
    return "\n".join(lines)


def post(http: httpx.Client, url: str, text: str) -> None:
    """POST ``{"text": ...}``; retried with backoff; raises if it never succeeds."""
    for attempt in range(RETRIES):
        try:
            http.post(url, json={"text": text}, timeout=TIMEOUT_S).raise_for_status()
            return
        except httpx.HTTPError:
            if attempt == RETRIES - 1:
                raise
            time.sleep(2**attempt)


def run(url: str, home: str | None, state: Path, once: bool) -> int:
    cursor = int(state.read_text()) if state.exists() else 0
    posted = 0
    with Client(home) as node, httpx.Client() as http:
        for event in node.events(cursor, follow=not once):
            if event["kind"] == "proposal.open":
                post(http, url, message(event, node))
                posted += 1
            state.write_text(str(event["cursor"]))
    sys.stdout.write(f"{posted} proposal(s) posted\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the chat's incoming webhook URL")
    parser.add_argument("--home", help="the node's directory (default: $ARCHIPEL_HOME)")
    parser.add_argument("--state", type=Path, default=Path("proposals_to_chat.cursor"))
    parser.add_argument("--once", action="store_true", help="post what is new, then exit")
    args = parser.parse_args(argv)
    try:
        return run(args.url, args.home, args.state, args.once)
    except (NodeUnreachable, RpcError) as exc:
        sys.stderr.write(f"{exc}\n")
        return 3 if isinstance(exc, NodeUnreachable) else 1
    except httpx.HTTPError as exc:
        sys.stderr.write(f"the webhook failed ({exc}); the cursor was not moved\n")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
