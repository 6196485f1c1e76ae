"""The record commands: proposals and votes, mandates, councils, mutual aid, the
ledger, roles by lot, the pulse and alerts.

Each command builds the op body that docs/records.md describes, from friendly
arguments (cell names, id prefixes, ``48h``, ``+2d``), and calls the RPC
action named after the op kind. Queries print tables, or the raw result with
``--json``. The machinery is in :mod:`archipel.cli.commands`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import click
from rich.console import RenderableType

from .commands import (
    DURATION,
    HEX,
    WHEN,
    BadInput,
    Session,
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


COMMANDS: tuple[click.Command, ...] = (propose, vote, seal, show, mandate, council)
"""Decisions, mandates and councils, added by :func:`archipel.cli.commands.register`."""
