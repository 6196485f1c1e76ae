"""The record commands: proposals and votes, mandates, councils, mutual aid, the
ledger, roles by lot, the pulse and alerts.

Each command builds the op body that docs/records.md describes, from friendly
arguments (cell names, id prefixes, ``48h``, ``+2d``), and calls the RPC
action named after the op kind. Queries print tables, or the raw result with
``--json``. The machinery is in :mod:`archipel.cli.commands`.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import click
from rich.console import RenderableType

from archipel.crdt.lots import commitment

from .commands import (
    DURATION,
    HEX,
    QUANTITY,
    WHEN,
    BadInput,
    Session,
    fmt_duration,
    fmt_time,
    node_options,
    now_ms,
    op_time,
    pairs,
    session,
    short,
    table,
)

DAY_MS = 86_400_000
MANDATE_DEFAULT_MS = round(29.5 * DAY_MS)
"""One lunar cycle: the default length of a mandate (the federation's default too)."""


def _when(ms: int | None) -> str:
    return fmt_time(ms)


# -- proposals and votes ---------------------------------------------------------


def _proposal_ids(s: Session) -> list[str]:
    return [p["id"] for p in s.call("proposals.list")]


def _version(s: Session, proposal: dict[str, Any]) -> dict[str, Any]:
    """The proposal's latest text: the original, folded with its amendments."""
    version = dict(proposal["original"])
    history = s.call("ops.history", id=proposal["id"], limit=1000)
    for op in history:
        if op["kind"] == "proposal.amend":
            version["op"] = op["id"]
            version.update(
                {k: op["body"][k] for k in ("title", "text", "options") if k in op["body"]}
            )
    return version


def _circles(s: Session, specs: Iterable[str]) -> list[dict[str, Any]]:
    out = []
    for spec in specs:
        name, sep, who = spec.partition("=")
        if not sep or not name.strip() or not who.strip():
            raise BadInput(f"--circle {spec!r}: write NAME=KEY,KEY,KEY (keys or cell names)")
        tokens = [t.strip() for t in who.split(",") if t.strip()]
        out.append({"name": name.strip(), "members": s.resolve_keys(tokens)})
    return out


@click.command()
@click.argument("title")
@click.option("--text", default="", help="What is being decided, and why.")
@click.option("--text-file", type=click.File("r"), help="Read the text from a file (- is stdin).")
@click.option("--option", "options", multiple=True, help="An option (repeat; default: yes, no).")
@click.option("--approval", is_flag=True, help="Voters may approve several options.")
@click.option(
    "--circle",
    "circles",
    multiple=True,
    required=True,
    metavar="NAME=WHO,...",
    help="A circle of 3-5 voters: keys (unique prefixes), 'me', or cell names (repeat).",
)
@click.option("--window", type=DURATION, help="Voting stays open this long (default: 48h).")
@click.option("--quorum", type=click.IntRange(0, 100), help="Percent of circle members needed.")
@click.option("--expel", metavar="CELL", help="Decide the expulsion of CELL (yes/no).")
@click.option("--mandate", "delegate", metavar="KEY", help="Decide a mandate for KEY (yes/no).")
@click.option("--act", "acts", multiple=True, help="With --mandate: an act it covers (repeat).")
@node_options
def propose(  # noqa: PLR0917 (one parameter per option)
    title: str,
    text: str,
    text_file: Any,
    options: tuple[str, ...],
    approval: bool,
    circles: tuple[str, ...],
    window: int | None,
    quorum: int | None,
    expel: str | None,
    delegate: str | None,
    acts: tuple[str, ...],
    home: str | None,
    as_json: bool,
) -> None:
    """Open a proposal titled TITLE for the circles to vote on."""
    if expel and delegate:
        raise BadInput("a proposal decides one action: --expel or --mandate, not both")
    if bool(delegate) != bool(acts):
        raise BadInput("--mandate KEY needs at least one --act (and --act needs --mandate)")
    if text_file is not None:
        text = text_file.read()
    with session(home, as_json) as s:
        body: dict[str, Any] = {
            "title": title,
            "options": list(options) or ["yes", "no"],
            "ballot": "approval" if approval else "single",
            "circles": _circles(s, circles),
        }
        if text:
            body["text"] = text
        if window is not None:
            body["window_ms"] = window
        if quorum is not None:
            body["quorum"] = quorum
        if expel:
            body["action"] = {"expel": s.resolve_cell(expel)}
        elif delegate:
            body["action"] = {"mandate": s.resolve_key(delegate), "acts": list(acts)}
        s.act("proposal.open", body, "proposal opened")


def _option_index(choice: str, options: list[str]) -> int:
    lowered = [o.lower() for o in options]
    if choice.lower() in lowered:
        return lowered.index(choice.lower())
    if choice.isdigit() and 1 <= int(choice) <= len(options):
        return int(choice) - 1
    listed = ", ".join(f"{i}. {o}" for i, o in enumerate(options, 1))
    raise BadInput(f"{choice!r} is not an option of this proposal ({listed})")


@click.command()
@click.argument("proposal", type=HEX)
@click.argument("choices", nargs=-1)
@click.option("--reason", default="", help="Your reasoning, shown with your vote.")
@node_options
def vote(
    proposal: str, choices: tuple[str, ...], reason: str, home: str | None, as_json: bool
) -> None:
    """Vote on PROPOSAL: CHOICES are options' texts or numbers (from 1, as 'show' lists them)."""
    with session(home, as_json) as s:
        pid = s.resolve("proposal", proposal, lambda: _proposal_ids(s))
        found = s.call("proposal.show", proposal=pid)["proposal"]
        me = s.info()["member_key"]
        circle = next((c["name"] for c in found["circles"] if me in c["members"]), None)
        if circle is None:
            raise BadInput("you sit in none of this proposal's circles: only its circles vote")
        version = _version(s, found)
        picked = sorted({_option_index(c, list(version["options"])) for c in choices})
        if found["ballot"] == "single" and len(picked) != 1:
            raise BadInput("this is a single-choice ballot: give exactly one choice")
        body = {"proposal": pid, "version": version["op"], "choices": picked,
                "reasoning": reason, "circle": circle}  # fmt: skip
        s.act("vote.cast", body, "vote cast")


@click.command()
@click.argument("proposal", type=HEX)
@node_options
def seal(proposal: str, home: str | None, as_json: bool) -> None:
    """Seal PROPOSAL after its window: the votes seen so far make the final count."""
    with session(home, as_json) as s:
        pid = s.resolve("proposal", proposal, lambda: _proposal_ids(s))
        s.act("proposal.seal", {"proposal": pid}, "proposal sealed")


def _proposal_rows(s: Session, rows: list[dict[str, Any]]) -> list[RenderableType | str]:
    if not rows:
        return ["No proposals."]
    out = table("id", "title", "status", "voting closes", "author")
    for p in rows:
        out.add_row(short(p["id"]), p["original"]["title"], p["status"], _when(p["closes_ms"]),
                    s.who(p["author"]))  # fmt: skip
    return [out]


def _proposal_detail(s: Session, r: dict[str, Any]) -> list[RenderableType | str]:
    p, tally = r["proposal"], r.get("tally")
    version = tally["version"] if tally else _version(s, p)
    action = "-"
    if p.get("expel"):
        action = f"expel {s.cell_name(p['expel'])}"
    elif p.get("delegate"):
        action = f"mandate {s.who(p['delegate'])} for {', '.join(p['acts'])}"
    circles = "\n".join(f"{c['name']}: {', '.join(s.who(k) for k in c['members'])}"
                        for c in p["circles"])  # fmt: skip
    head = pairs([
        ("proposal", p["id"]), ("title", version["title"]), ("status", r["status"]),
        ("author", s.who(p["author"])), ("opened", _when(p["opened_ms"])),
        ("voting closes", _when(p["closes_ms"])), ("ballot", p["ballot"]),
        ("quorum", f"{p['quorum']}%"), ("action", action), ("circles", circles),
    ])  # fmt: skip
    items: list[RenderableType | str] = [head]
    if version.get("text"):
        items += ["", version["text"], ""]
    options = table("#", "option", *(["votes"] if tally else []))
    for i, option in enumerate(version["options"]):
        options.add_row(str(i + 1), option, *([str(tally["counts"][i])] if tally else []))
    items.append(options)
    if tally:
        winners = ", ".join(version["options"][i] for i in tally["winners"]) or "-"
        items.append(pairs([
            ("result", "passed" if tally["passed"] else "not passed"), ("winners", winners),
            ("voters", f"{tally['voters']} of {tally['eligible']}"),
            ("quorum met", "yes" if tally["quorum_met"] else "no"),
            ("late votes", len(tally["late"])), ("void votes", len(tally["void"])),
        ]))  # fmt: skip
        ballots = table("circle", "voter", "choices", "reasoning")
        for circle, cast in tally["circles"].items():
            for b in cast:
                picked = ", ".join(version["options"][i] for i in b["choices"]) or "(none)"
                ballots.add_row(circle, s.who(b["voter"]), picked, b["reasoning"])
        items.append(ballots)
    return items


@click.command()
@click.argument("proposal", type=HEX, required=False)
@node_options
def show(proposal: str | None, home: str | None, as_json: bool) -> None:
    """Show PROPOSAL (its text, options, circles and, once sealed, the count); without it,
    list every proposal."""
    with session(home, as_json) as s:
        if proposal is None:
            s.show(s.call("proposals.list"), lambda rows: _proposal_rows(s, rows))
            return
        pid = s.resolve("proposal", proposal, lambda: _proposal_ids(s))
        s.show(s.call("proposal.show", proposal=pid), lambda r: _proposal_detail(s, r))


# -- mandates --------------------------------------------------------------------


@click.group()
def mandate() -> None:
    """Written, time-bound, recallable mandates for delegates."""


def _mandate_ids(s: Session) -> list[str]:
    return [m["mandate"]["id"] for m in s.call("mandates.live")]


def _council_ids(s: Session) -> list[str]:
    return [c["council"]["id"] for c in s.call("councils.list")]


@mandate.command("grant")
@click.argument("delegate", required=False)
@click.option("--instructions", help="The written mandate (with --decision: the decided text).")
@click.option("--act", "acts", multiple=True, help="A kind of act it covers, e.g. sign (repeat).")
@click.option("--scope", help="A free-text scope, e.g. 'the bakery lease'.")
@click.option("--council", metavar="COUNCIL", type=HEX, help="Send the delegate to this council.")
@click.option("--decision", metavar="PROPOSAL", type=HEX, help="The sealed proposal deciding it.")
@click.option("--expires", type=WHEN, help="Expiry (default +29.5d, or the council's end).")
@node_options
def mandate_grant(  # noqa: PLR0917 (one parameter per option)
    delegate: str | None,
    instructions: str | None,
    acts: tuple[str, ...],
    scope: str | None,
    council: str | None,
    decision: str | None,
    expires: int | None,
    home: str | None,
    as_json: bool,
) -> None:
    """Grant DELEGATE (a key, 'me' or a one-member cell's name) a mandate.

    With --decision, the delegate, acts and instructions default to what the
    proposal decided."""
    with session(home, as_json) as s:
        body: dict[str, Any] = {}
        if decision is not None:
            pid = s.resolve("proposal", decision, lambda: _proposal_ids(s))
            shown = s.call("proposal.show", proposal=pid)
            decided = shown["proposal"]
            text = (shown.get("tally") or {}).get("version", {}).get("text")
            body["decision"] = pid
            delegate = delegate or decided.get("delegate")
            acts = acts or tuple(decided.get("acts") or ())
            instructions = instructions or text or _version(s, decided).get("text")
        if not delegate or not instructions:
            raise BadInput("give the DELEGATE and --instructions (or --decision)")
        body.update({"delegate": s.resolve_key(delegate), "instructions": instructions})
        default_expiry = now_ms() + MANDATE_DEFAULT_MS
        if council is not None:
            cid = s.resolve("council", council, lambda: _council_ids(s))
            body["council"] = cid
            ends = s.call("council.show", council=cid)["council"]["ends_ms"]
            default_expiry = min(default_expiry, ends)
        elif acts:
            body["acts"] = list(acts)
        else:
            raise BadInput("a mandate covers some --act (repeat), or sends to a --council")
        if scope:
            body["scope"] = scope
        body["expires"] = expires if expires is not None else default_expiry
        s.act("mandate.grant", body, "mandate granted")


@mandate.command("renew")
@click.argument("ident", metavar="MANDATE", type=HEX)
@click.option("--expires", type=WHEN, required=True, help="The new expiry (+29.5d, a date).")
@node_options
def mandate_renew(ident: str, expires: int, home: str | None, as_json: bool) -> None:
    """Extend a live MANDATE of your cell to --expires."""
    with session(home, as_json) as s:
        mid = s.resolve("live mandate", ident, lambda: _mandate_ids(s))
        s.act("mandate.renew", {"mandate": mid, "expires": expires}, "mandate renewed")


@mandate.command("recall")
@click.argument("ident", metavar="MANDATE", type=HEX)
@click.option("--reason", help="Why (shown to everyone).")
@node_options
def mandate_recall(ident: str, reason: str | None, home: str | None, as_json: bool) -> None:
    """Recall MANDATE now: whatever the delegate does from here on does not count."""
    with session(home, as_json) as s:
        mid = s.resolve("live mandate", ident, lambda: _mandate_ids(s))
        body = {"mandate": mid, **({"reason": reason} if reason else {})}
        s.act("mandate.recall", body, "mandate recalled")


@mandate.command("act")
@click.argument("ident", metavar="MANDATE", type=HEX)
@click.argument("act")
@click.argument("text")
@node_options
def mandate_act(ident: str, act: str, text: str, home: str | None, as_json: bool) -> None:
    """As the delegate, record ACT (one the mandate covers) under MANDATE: TEXT says what."""
    with session(home, as_json) as s:
        mid = s.resolve("live mandate", ident, lambda: _mandate_ids(s))
        s.act("mandate.act", {"mandate": mid, "act": act, "text": text}, "act recorded")


def _mandate_rows(s: Session, rows: list[dict[str, Any]]) -> list[RenderableType | str]:
    if not rows:
        return ["No live mandates."]
    out = table("id", "delegate", "issued by", "covers", "expires", "status")
    for st in rows:
        m = st["mandate"]
        covers = f"council {short(m['council'])}" if m.get("council") else ", ".join(m["acts"])
        out.add_row(short(m["id"]), s.who(m["delegate"]), s.cell_name(m["issuer"]), covers,
                    _when(st["expires_ms"]), st["status"])  # fmt: skip
    return [out]


@mandate.command("list")
@node_options
def mandate_list(home: str | None, as_json: bool) -> None:
    """The mandates live now."""
    with session(home, as_json) as s:
        s.show(s.call("mandates.live"), lambda rows: _mandate_rows(s, rows))


def _entries(s: Session, rows: list[dict[str, Any]], title: str) -> RenderableType:
    if not rows:
        return f"{title}: nothing yet."
    out = table("time", "kind", "author", "text", "counts", title=title)
    for e in rows:
        out.add_row(fmt_time(op_time(e["ts"])).split(" (")[0], e["kind"], s.who(e["author"]),
                    e["text"], "yes" if e["counted"] else f"no: {e['why']}")  # fmt: skip
    return out


@mandate.command("show")
@click.argument("ident", metavar="MANDATE", type=HEX)
@node_options
def mandate_show(ident: str, home: str | None, as_json: bool) -> None:
    """MANDATE's terms, status, and everything done under it."""
    with session(home, as_json) as s:
        mid = s.resolve("live mandate", ident, lambda: _mandate_ids(s))

        def human(r: dict[str, Any]) -> list[RenderableType | str]:
            st, m = r["state"], r["state"]["mandate"]
            head = pairs([
                ("mandate", m["id"]), ("status", st["status"]), ("delegate", s.who(m["delegate"])),
                ("issued by", ", ".join(s.cell_name(c) for c in m["issuers"])),
                ("granted", _when(op_time(m["ts"]))), ("expires", _when(st["expires_ms"])),
                ("acts", ", ".join(m["acts"]) or "-"), ("scope", m["scope"]),
                ("council", m["council"]), ("decision", m["decision"]),
                ("renewals", len(st["renewals"])), ("recalls", len(st["recalls"])),
            ])  # fmt: skip
            return [head, "", m["instructions"], "", _entries(s, r["acts"], "done under it")]

        s.show(s.call("mandate.show", mandate=mid), human)


# -- councils --------------------------------------------------------------------


@click.group()
def council() -> None:
    """Time-bound councils of delegates from several cells."""


@council.command("form")
@click.argument("task")
@click.option("--cell", "cells", multiple=True, required=True, help="A member cell (repeat).")
@click.option("--ends", type=WHEN, required=True, help="When it ends: +30d, 2025-06-01.")
@node_options
def council_form(
    task: str, cells: tuple[str, ...], ends: int, home: str | None, as_json: bool
) -> None:
    """Form a council for TASK with --cell (your own cell is always in it) until --ends."""
    with session(home, as_json) as s:
        ids = {s.resolve_cell(c) for c in cells} | {s.info()["cell_id"]}
        body = {"task": task, "cells": sorted(ids), "ends": ends}
        s.act("council.form", body, "council formed")


def _address(kind: str, what: str) -> click.Command:
    @click.argument("ident", metavar="COUNCIL", type=HEX)
    @click.argument("text")
    @node_options
    def command(ident: str, text: str, home: str | None, as_json: bool) -> None:
        with session(home, as_json) as s:
            cid = s.resolve("council", ident, lambda: _council_ids(s))
            s.act(kind, {"council": cid, "text": text}, what)

    return click.command(help=f"{what.capitalize()}: TEXT, to COUNCIL.")(command)


def _delegate_act(kind: str, what: str) -> click.Command:
    @click.argument("ident", metavar="COUNCIL", type=HEX)
    @click.argument("text")
    @click.option("--mandate", "mandate_id", type=HEX, help="Your council mandate (found if one).")
    @node_options
    def command(
        ident: str, text: str, mandate_id: str | None, home: str | None, as_json: bool
    ) -> None:
        with session(home, as_json) as s:
            cid = s.resolve("council", ident, lambda: _council_ids(s))
            if mandate_id is None:
                me = s.info()["member_key"]
                mine = [
                    m["id"]
                    for m in (st["mandate"] for st in s.call("mandates.live"))
                    if m.get("council") == cid and m["delegate"] == me
                ]
                if len(mine) != 1:
                    raise BadInput(
                        "you hold no live mandate for this council (a member cell sends you:"
                        " 'archipel mandate grant KEY --council COUNCIL')"
                        if not mine
                        else "you hold several mandates for this council: give --mandate"
                    )
                mandate_id = mine[0]
            else:
                mandate_id = s.resolve("live mandate", mandate_id, lambda: _mandate_ids(s))
            s.act(kind, {"council": cid, "mandate": mandate_id, "text": text}, what)

    return click.command(help=f"As a delegate: {what}, TEXT, in COUNCIL.")(command)


council.add_command(_address("council.directive", "directive sent"), "direct")
council.add_command(_address("council.evaluation", "evaluation sent"), "evaluate")
council.add_command(_delegate_act("council.decision", "decision recorded"), "decide")
council.add_command(_delegate_act("council.minutes", "minutes recorded"), "minutes")
council.add_command(_delegate_act("council.dissolve", "council dissolved"), "dissolve")


def _council_detail(s: Session, r: dict[str, Any]) -> list[RenderableType | str]:
    c = r["council"]
    head = pairs([
        ("council", c["id"]), ("task", c["task"]), ("status", r["status"]),
        ("cells", ", ".join(s.cell_name(x) for x in c["cells"])),
        ("formed by", s.cell_name(c["formed_by"])), ("ends", _when(c["ends_ms"])),
        ("delegates", "\n".join(f"{s.who(d['mandate']['delegate'])} (mandate "
                                f"{short(d['mandate']['id'])})" for d in r["delegates"])),
    ])  # fmt: skip
    items: list[RenderableType | str] = [head]
    for name in ("directives", "evaluations", "decisions", "minutes", "dissolutions"):
        if r[name]:
            items.append(_entries(s, r[name], name))
    return items


@council.command("show")
@click.argument("ident", metavar="[COUNCIL]", type=HEX, required=False)
@node_options
def council_show(ident: str | None, home: str | None, as_json: bool) -> None:
    """Show COUNCIL: its task, delegates and record; without it, list every council."""
    with session(home, as_json) as s:
        if ident is None:

            def listing(rows: list[dict[str, Any]]) -> list[RenderableType | str]:
                if not rows:
                    return ["No councils."]
                out = table("id", "task", "cells", "ends", "status")
                for row in rows:
                    c = row["council"]
                    out.add_row(short(c["id"]), c["task"],
                                ", ".join(s.cell_name(x) for x in c["cells"]),
                                _when(c["ends_ms"]), row["status"])  # fmt: skip
                return [out]

            s.show(s.call("councils.list"), listing)
            return
        cid = s.resolve("council", ident, lambda: _council_ids(s))
        s.show(s.call("council.show", council=cid), lambda r: _council_detail(s, r))


# -- mutual aid ------------------------------------------------------------------


@click.group()
def aid() -> None:
    """Mutual aid: offers, requests, claims, pledges and handovers."""


def _open_aid(s: Session) -> tuple[list[str], list[str]]:
    listed = s.call("aid.list")
    return [o["id"] for o in listed["offers"]], [r["id"] for r in listed["requests"]]


@aid.command("offer")
@click.argument("what")
@click.argument("quantity", type=QUANTITY)
@click.argument("unit")
@click.option("--at", "location", required=True, help="Where to collect it.")
@click.option("--until", type=WHEN, default="7d", show_default=True, help="Claims close then.")
@node_options
def aid_offer(  # noqa: PLR0917 (one parameter per argument)
    what: str, quantity: int, unit: str, location: str, until: int, home: str | None, as_json: bool
) -> None:
    """Offer QUANTITY UNIT of WHAT (whole numbers: 2500 g, not 2.5 kg)."""
    with session(home, as_json) as s:
        body = {"what": what, "quantity": quantity, "unit": unit, "location": location,
                "until": until}  # fmt: skip
        s.act("aid.offer", body, "offer made")


@aid.command("request")
@click.argument("what")
@click.argument("quantity", type=QUANTITY)
@click.argument("unit")
@click.option("--by", "needed_by", type=WHEN, default="7d", show_default=True, help="Needed by.")
@node_options
def aid_request(  # noqa: PLR0917 (one parameter per argument)
    what: str, quantity: int, unit: str, needed_by: int, home: str | None, as_json: bool
) -> None:
    """Ask for QUANTITY UNIT of WHAT."""
    with session(home, as_json) as s:
        body = {"what": what, "quantity": quantity, "unit": unit, "needed_by": needed_by}
        s.act("aid.request", body, "request made")


@aid.command("claim")
@click.argument("offer", type=HEX)
@click.argument("quantity", type=QUANTITY)
@node_options
def aid_claim(offer: str, quantity: int, home: str | None, as_json: bool) -> None:
    """Claim QUANTITY of another cell's OFFER (beyond what is left, you are waitlisted)."""
    with session(home, as_json) as s:
        oid = s.resolve("open offer", offer, lambda: _open_aid(s)[0])
        s.act("aid.claim", {"offer": oid, "quantity": quantity}, "claim made")


@aid.command("pledge")
@click.argument("request", type=HEX)
@click.argument("quantity", type=QUANTITY)
@node_options
def aid_pledge(request: str, quantity: int, home: str | None, as_json: bool) -> None:
    """Pledge QUANTITY towards another cell's REQUEST."""
    with session(home, as_json) as s:
        rid = s.resolve("open request", request, lambda: _open_aid(s)[1])
        s.act("aid.pledge", {"request": rid, "quantity": quantity}, "pledge made")


def _claims_and_pledges(s: Session) -> dict[str, str]:
    """Claim and pledge ids on open offers and requests -> ``claim`` or ``pledge``."""
    offers, requests = _open_aid(s)
    found: dict[str, str] = {}
    for oid in offers:
        allocation = s.call("aid.allocation", offer=oid)["allocation"]
        for name in ("allocated", "waitlist"):
            found.update({c["id"]: "claim" for c in allocation[name]})
    for rid in requests:
        found.update(
            {p["id"]: "pledge" for p in s.call("aid.coverage", request=rid)["coverage"]["pledges"]}
        )
    return found


@aid.command("fulfil")
@click.argument("ident", metavar="CLAIM_OR_PLEDGE", type=HEX)
@node_options
def aid_fulfil(ident: str, home: str | None, as_json: bool) -> None:
    """Record that the goods of a claim (on your offer) or your pledge were handed over."""
    with session(home, as_json) as s:
        if len(ident) == 64:
            kind = s.call("ops.get", id=ident)["kind"]
            field = {"aid.claim": "claim", "aid.pledge": "pledge"}.get(kind)
            if field is None:
                raise BadInput(f"{ident} is a {kind}, not a claim or a pledge")
            s.act("aid.fulfil", {field: ident}, "handover recorded")
            return
        known = _claims_and_pledges(s)
        full = s.resolve("claim or pledge", ident, lambda: known)
        s.act("aid.fulfil", {known[full]: full}, "handover recorded")


@aid.command("withdraw")
@click.argument("ident", metavar="OFFER_OR_REQUEST", type=HEX)
@node_options
def aid_withdraw(ident: str, home: str | None, as_json: bool) -> None:
    """Withdraw your cell's offer or request (claims and pledges made so far keep their place)."""
    with session(home, as_json) as s:
        ref = s.resolve(
            "open offer or request", ident, lambda: [i for ids in _open_aid(s) for i in ids]
        )
        s.act("aid.withdraw", {"ref": ref}, "withdrawn")


def _aid_rows(s: Session, r: dict[str, Any]) -> list[RenderableType | str]:
    offers = table("id", "cell", "what", "quantity", "where", "claims close", title="offers")
    for o in r["offers"]:
        amount = f"{o['quantity']} {o['unit']}"
        offers.add_row(short(o["id"]), s.cell_name(o["cell"]), o["what"], amount, o["location"],
                       _when(o["until"]))  # fmt: skip
    requests = table("id", "cell", "what", "quantity", "needed by", title="requests")
    for q in r["requests"]:
        requests.add_row(short(q["id"]), s.cell_name(q["cell"]), q["what"],
                         f"{q['quantity']} {q['unit']}", _when(q["needed_by"]))  # fmt: skip
    return [offers if r["offers"] else "No open offers.",
            requests if r["requests"] else "No open requests."]  # fmt: skip


@aid.command("list")
@node_options
def aid_list(home: str | None, as_json: bool) -> None:
    """The open offers and requests."""
    with session(home, as_json) as s:
        s.show(s.call("aid.list"), lambda r: _aid_rows(s, r))


def _aid_detail(s: Session, r: dict[str, Any]) -> list[RenderableType | str]:
    if "offer" in r:
        o, a = r["offer"], r["allocation"]
        head = pairs([
            ("offer", o["id"]), ("cell", s.cell_name(o["cell"])), ("what", o["what"]),
            ("quantity", f"{o['quantity']} {o['unit']}"), ("where", o["location"]),
            ("claims close", _when(o["until"])), ("remaining", f"{a['remaining']} {o['unit']}"),
            ("withdrawn", "yes" if a["withdrawn"] else "no"),
            ("overfulfilled", "yes" if a["overfulfilled"] else "no"),
        ])  # fmt: skip
        fulfilled = {c["id"] for c in a["fulfilled"]}
        rows = [(c, "fulfilled" if c["id"] in fulfilled else "allocated") for c in a["allocated"]]
        rows += [(c, "waitlisted") for c in a["waitlist"]]
        rows += [(c, "cancelled") for c in a["cancelled"]]
    else:
        o, a = r["request"], r["coverage"]
        head = pairs([
            ("request", o["id"]), ("cell", s.cell_name(o["cell"])), ("what", o["what"]),
            ("quantity", f"{o['quantity']} {o['unit']}"), ("needed by", _when(o["needed_by"])),
            ("pledged", a["pledged"]), ("delivered", a["delivered"]),
            ("outstanding", a["outstanding"]), ("withdrawn", "yes" if a["withdrawn"] else "no"),
        ])  # fmt: skip
        fulfilled = {p["id"] for p in a["fulfilled"]}
        rows = [(p, "fulfilled" if p["id"] in fulfilled else "pledged") for p in a["pledges"]]
        rows += [(p, "cancelled") for p in a["cancelled"]]
    out = table("id", "cell", "quantity", "state", title="claims" if "offer" in r else "pledges")
    for item, state in rows:
        out.add_row(short(item["id"]), s.cell_name(item["cell"]), str(item["quantity"]), state)
    return [head, out]


@aid.command("show")
@click.argument("ident", metavar="OFFER_OR_REQUEST", type=HEX)
@node_options
def aid_show(ident: str, home: str | None, as_json: bool) -> None:
    """An open offer with its claims, or a request with its pledges."""
    with session(home, as_json) as s:
        offers, requests = _open_aid(s)
        full = s.resolve("open offer or request", ident, lambda: offers + requests)
        if full in requests:
            s.show(s.call("aid.coverage", request=full), lambda r: _aid_detail(s, r))
        else:
            s.show(s.call("aid.allocation", offer=full), lambda r: _aid_detail(s, r))


# -- the commons ledger ----------------------------------------------------------


@click.group()
def ledger() -> None:
    """The commons ledger: contributions, uses and gifts returned."""


@ledger.command("add")
@click.argument("entry_type", metavar="TYPE",
                type=click.Choice(["contribution", "use", "gift_returned"]))  # fmt: skip
@click.argument("resource")
@click.argument("quantity", type=QUANTITY)
@click.argument("unit")
@click.option("--with", "counterparties", multiple=True, help="A cell on the other side (repeat).")
@click.option("--note", help="A note (why, what for).")
@node_options
def ledger_add(  # noqa: PLR0917 (one parameter per argument)
    entry_type: str,
    resource: str,
    quantity: int,
    unit: str,
    counterparties: tuple[str, ...],
    note: str | None,
    home: str | None,
    as_json: bool,
) -> None:
    """Log a TYPE entry of QUANTITY UNIT of RESOURCE on your cell's account."""
    with session(home, as_json) as s:
        body: dict[str, Any] = {"type": entry_type, "resource": resource, "quantity": quantity,
                                "unit": unit}  # fmt: skip
        if counterparties:
            body["counterparties"] = sorted({s.resolve_cell(c) for c in counterparties})
        if note:
            body["note"] = note
        s.act("ledger.entry", body, "entry logged")


def _entry_ids(s: Session) -> list[str]:
    resources = {b["resource"] for b in s.call("ledger.balances")}
    return [
        e["entry"]["id"] for r in sorted(resources) for e in s.call("ledger.entries", resource=r)
    ]


@ledger.command("correct")
@click.argument("entry", type=HEX)
@click.argument("quantity", type=click.IntRange(0, 1_000_000_000))
@click.option("--note", help="Why.")
@node_options
def ledger_correct(
    entry: str, quantity: int, note: str | None, home: str | None, as_json: bool
) -> None:
    """State the quantity ENTRY should have had (0 voids it)."""
    with session(home, as_json) as s:
        ref = s.resolve("ledger entry", entry, lambda: _entry_ids(s))
        body = {"ref": ref, "quantity": quantity, **({"note": note} if note else {})}
        s.act("ledger.correct", body, "entry corrected")


def _balances(s: Session, rows: list[dict[str, Any]]) -> list[RenderableType | str]:
    if not rows:
        return ["The ledger is empty."]
    out = table("cell", "resource", "unit", "in", "used", "returned", "balance")
    for b in rows:
        total = b["contributions"] + b["gifts_returned"] - b["uses"]
        out.add_row(s.cell_name(b["cell"]), b["resource"], b["unit"], str(b["contributions"]),
                    str(b["uses"]), str(b["gifts_returned"]), str(total))  # fmt: skip
    return [out]


def _ledger_entries(s: Session, rows: list[dict[str, Any]]) -> list[RenderableType | str]:
    if not rows:
        return ["No entries for this resource."]
    out = table("id", "time", "cell", "type", "quantity", "note", "state")
    for st in rows:
        e = st["entry"]
        state = "void" if not st["counts"] else "disputed" if st["disputed"] else (
            "corrected" if st["in_effect"] else "")  # fmt: skip
        out.add_row(short(e["id"]), fmt_time(op_time(e["ts"])).split(" (")[0],
                    s.cell_name(e["cell"]), e["type"], f"{st['quantity']} {e['unit']}",
                    e["note"], state)  # fmt: skip
    return [out]


@ledger.command("show")
@click.argument("resource", required=False)
@click.option("--cell", "cell_name", help="Only this cell's balances.")
@node_options
def ledger_show(
    resource: str | None, cell_name: str | None, home: str | None, as_json: bool
) -> None:
    """Balances per cell and resource; with RESOURCE, its entries."""
    with session(home, as_json) as s:
        if resource is not None:
            s.show(s.call("ledger.entries", resource=resource), lambda r: _ledger_entries(s, r))
            return
        params = {"cell": s.resolve_cell(cell_name)} if cell_name else {}
        s.show(s.call("ledger.balances", **params), lambda r: _balances(s, r))


# -- roles by lot ----------------------------------------------------------------


@click.group()
def lot() -> None:
    """Roles by lot: a verifiable draw by commit and reveal among cells."""


def _lot_ids(s: Session) -> list[str]:
    return [d["lot"]["id"] for d in s.call("lots.list")]


def _secret_path(s: Session, lot_id: str) -> Path:
    return s.home.root / "lots" / f"{lot_id}.json"


def _write_private(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` (mode 0600, in a 0700 folder), durably and atomically."""
    path.parent.mkdir(mode=0o700, exist_ok=True)
    path.parent.chmod(0o700)
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, json.dumps(data).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@click.command("open")
@click.argument("role")
@click.option("--among", multiple=True, help="Eligible: keys, 'me' or cell names (default: "
              "every member of the participating cells).")  # fmt: skip
@click.option("--cell", "cells", multiple=True, help="A participating cell (default: all).")
@click.option("--seats", type=click.IntRange(1, 256), default=1, show_default=True)
@click.option("--commit-by", type=WHEN, default="1d", show_default=True, help="Commit deadline.")
@click.option("--reveal-by", type=WHEN, help="Reveal deadline (default: a day after commit-by).")
@node_options
def lot_open(  # noqa: PLR0917 (one parameter per option)
    role: str,
    among: tuple[str, ...],
    cells: tuple[str, ...],
    seats: int,
    commit_by: int,
    reveal_by: int | None,
    home: str | None,
    as_json: bool,
) -> None:
    """Open a draw for ROLE: each cell then runs 'lot commit', 'lot reveal' and 'lot close'."""
    with session(home, as_json) as s:
        ids = sorted({s.resolve_cell(c) for c in cells} if cells else {c["id"] for c in s.cells()})
        if among:
            eligible = s.resolve_keys(among)
        else:
            eligible = sorted({k for c in s.cells() if c["id"] in ids for k in s.member_keys(c)})
        body = {"role": role, "eligible": eligible, "seats": seats, "cells": ids,
                "commit_by": commit_by, "reveal_by": reveal_by or commit_by + DAY_MS}  # fmt: skip
        s.act("lot.open", body, "draw opened")


lot.add_command(lot_open)
lot.add_command(lot_open, "draw")


@lot.command("commit")
@click.argument("ident", metavar="LOT", type=HEX)
@node_options
def lot_commit(ident: str, home: str | None, as_json: bool) -> None:
    """Commit your cell to a fresh secret for LOT (kept in the node's lots/ folder, 0600)."""
    with session(home, as_json) as s:
        lot_id = s.resolve("draw", ident, lambda: _lot_ids(s))
        cell_id = s.info()["cell_id"]
        path = _secret_path(s, lot_id)
        if path.exists():
            saved = json.loads(path.read_text(encoding="utf-8"))
            if saved.get("commit"):
                raise click.ClickException(
                    f"this node already committed to the draw (the secret is in {path});"
                    " after the commit deadline run 'archipel lot reveal'"
                )
        else:
            saved = {"lot": lot_id, "cell": cell_id, "secret": secrets.token_bytes(32).hex()}
            _write_private(path, saved)  # on disk before anyone sees the commitment
        digest = commitment(bytes.fromhex(lot_id), bytes.fromhex(cell_id),
                            bytes.fromhex(saved["secret"]))  # fmt: skip
        made = s.act("lot.commit", {"lot": lot_id, "hash": digest.hex()}, "committed")
        _write_private(path, {**saved, "commit": made["id"]})


@lot.command("reveal")
@click.argument("ident", metavar="LOT", type=HEX)
@node_options
def lot_reveal(ident: str, home: str | None, as_json: bool) -> None:
    """Reveal the secret this node committed to for LOT (after the commit deadline)."""
    with session(home, as_json) as s:
        lot_id = s.resolve("draw", ident, lambda: _lot_ids(s))
        path = _secret_path(s, lot_id)
        if not path.exists():
            raise click.ClickException(
                f"no secret for this draw in {path}: the node that ran 'archipel lot commit'"
                " holds it"
            )
        saved = json.loads(path.read_text(encoding="utf-8"))
        commit_id = saved.get("commit")
        if not commit_id:
            digest = commitment(bytes.fromhex(lot_id), bytes.fromhex(saved["cell"]),
                                bytes.fromhex(saved["secret"])).hex()  # fmt: skip
            commit_id = next((op["id"] for op in s.call("ops.history", id=lot_id, limit=1000)
                              if op["kind"] == "lot.commit" and op["body"]["hash"] == digest),
                             None)  # fmt: skip
            if commit_id is None:
                raise click.ClickException("the commitment of this secret is not on this node")
        s.act("lot.reveal", {"commit": commit_id, "secret": saved["secret"]}, "revealed")


@lot.command("close")
@click.argument("ident", metavar="LOT", type=HEX)
@node_options
def lot_close(ident: str, home: str | None, as_json: bool) -> None:
    """Close LOT for your cell (after the reveal deadline): it attests the reveals you hold."""
    with session(home, as_json) as s:
        lot_id = s.resolve("draw", ident, lambda: _lot_ids(s))
        s.act("lot.close", {"lot": lot_id}, "closed")


def _lot_detail(s: Session, d: dict[str, Any]) -> list[RenderableType | str]:
    lt = d["lot"]

    def names(cells: list[str]) -> str:
        return ", ".join(s.cell_name(c) for c in cells) or "-"

    return [pairs([
        ("draw", lt["id"]), ("role", lt["role"]), ("phase", d["phase"]), ("seats", lt["seats"]),
        ("eligible", ", ".join(s.who(k) for k in lt["eligible"])), ("cells", names(lt["cells"])),
        ("commit by", _when(lt["commit_by"])), ("reveal by", _when(lt["reveal_by"])),
        ("committed", names(d["committed"])), ("revealed", names(d["revealed"])),
        ("closed by", names(d["closed_by"])), ("counted", names(d["counted"])),
        ("excluded", names(d["excluded"])), ("conflicting", names(d["conflicting"])),
        ("drawn", ", ".join(s.who(k) for k in d["result"]) or "-"),
        ("settled", "yes" if d["settled"] else "no"),
    ])]  # fmt: skip


@lot.command("show")
@click.argument("ident", metavar="[LOT]", type=HEX, required=False)
@node_options
def lot_show(ident: str | None, home: str | None, as_json: bool) -> None:
    """Show LOT: its phase, who committed, revealed and closed, and who was drawn; without
    it, list every draw."""
    with session(home, as_json) as s:
        if ident is None:

            def listing(rows: list[dict[str, Any]]) -> list[RenderableType | str]:
                if not rows:
                    return ["No draws."]
                out = table("id", "role", "phase", "commit by", "reveal by", "drawn")
                for d in rows:
                    out.add_row(short(d["lot"]["id"]), d["lot"]["role"], d["phase"],
                                _when(d["lot"]["commit_by"]), _when(d["lot"]["reveal_by"]),
                                ", ".join(s.who(k) for k in d["result"]) or "-")  # fmt: skip
                return [out]

            s.show(s.call("lots.list"), listing)
            return
        lot_id = s.resolve("draw", ident, lambda: _lot_ids(s))
        s.show(s.call("lot.show", lot=lot_id), lambda d: _lot_detail(s, d))


# -- pulse -----------------------------------------------------------------------


def _pulse_rows(s: Session, r: dict[str, Any]) -> list[RenderableType | str]:
    divergence = table("at", "open proposals", title="divergence")
    for at, count in r["divergence"]:
        divergence.add_row(fmt_time(at).split(" (")[0], str(count))
    replies = table("from", "answered by", "replies", "median", "max", title="response times")
    for t in r["response_times"]:
        replies.add_row(s.cell_name(t["cell"]), s.cell_name(t["by"]), str(t["count"]),
                        fmt_duration(t["median_ms"]), fmt_duration(t["max_ms"]))  # fmt: skip
    return [divergence, replies if r["response_times"] else "No replies between cells yet."]


@click.group(invoke_without_command=True)
@click.option("--since", type=DURATION, default="7d", show_default=True, help="How far back.")
@click.option("--step", type=DURATION, default="1d", show_default=True, help="One row per step.")
@node_options
@click.pass_context
def pulse(ctx: click.Context, since: int, step: int, home: str | None, as_json: bool) -> None:
    """How the federation is doing: open proposals over time and response times between
    cells. Subcommands log and list the anonymous frustrations."""
    if ctx.invoked_subcommand is not None:
        return
    with session(home, as_json) as s:
        end = now_ms()
        result = s.call("pulse.metrics", start_ms=end - since, end_ms=end, step_ms=step)
        s.show(result, lambda r: _pulse_rows(s, r))


@pulse.command("frustration")
@click.argument("text")
@node_options
def pulse_frustration(text: str, home: str | None, as_json: bool) -> None:
    """Log a frustration: signed by this node's device, it names your cell, never you."""
    with session(home, as_json) as s:
        s.act("pulse.frustration", {"text": text}, "frustration logged")


@pulse.command("frustrations")
@click.option("--cell", "cell_name", help="Only this cell's.")
@node_options
def pulse_frustrations(cell_name: str | None, home: str | None, as_json: bool) -> None:
    """The frustration log."""
    with session(home, as_json) as s:
        params = {"cell": s.resolve_cell(cell_name)} if cell_name else {}

        def human(rows: list[dict[str, Any]]) -> list[RenderableType | str]:
            if not rows:
                return ["No frustrations logged."]
            out = table("time", "cell", "frustration")
            for f in rows:
                out.add_row(fmt_time(f["at_ms"]).split(" (")[0], s.cell_name(f["cell"]), f["text"])
            return [out]

        s.show(s.call("pulse.frustrations", **params), human)


# -- alerts ----------------------------------------------------------------------


@click.group()
def alert() -> None:
    """Urgent alerts, pushed to every connected peer at once."""


@alert.command("raise")
@click.argument("text")
@click.option("--area", required=True, help="Where it applies.")
@click.option("--expires", type=WHEN, default="24h", show_default=True, help="At most 7d.")
@node_options
def alert_raise(text: str, area: str, expires: int, home: str | None, as_json: bool) -> None:
    """Raise an alert: TEXT says what is happening."""
    with session(home, as_json) as s:
        s.act("alert.raise", {"text": text, "area": area, "expires": expires}, "alert raised")


def _alert_ids(s: Session) -> list[str]:
    return [a["id"] for a in s.call("alerts.active")]


@alert.command("withdraw")
@click.argument("ident", metavar="ALERT", type=HEX)
@node_options
def alert_withdraw(ident: str, home: str | None, as_json: bool) -> None:
    """Call off your cell's ALERT (a person's judgement: devices cannot)."""
    with session(home, as_json) as s:
        ref = s.resolve("active alert", ident, lambda: _alert_ids(s))
        s.act("alert.withdraw", {"ref": ref}, "alert withdrawn")


@alert.command("list")
@node_options
def alert_list(home: str | None, as_json: bool) -> None:
    """The alerts active now, newest first."""
    with session(home, as_json) as s:

        def human(rows: list[dict[str, Any]]) -> list[RenderableType | str]:
            if not rows:
                return ["No active alerts."]
            out = table("id", "raised", "cell", "area", "alert", "expires")
            for a in rows:
                out.add_row(short(a["id"]), fmt_time(op_time(a["ts"])), s.cell_name(a["cell"]),
                            a["area"], a["text"], _when(a["expires"]))  # fmt: skip
            return [out]

        s.show(s.call("alerts.active"), human)


COMMANDS: tuple[click.Command, ...] = (
    propose, vote, seal, show, mandate, council, aid, ledger, lot, pulse, alert,
)  # fmt: skip
"""The record commands, added to ``archipel`` by :func:`archipel.cli.commands.register`."""
