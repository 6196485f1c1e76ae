"""``archipel`` commands for the commons: mutual aid, the ledger, lots, pulse and alerts.

They build on cli/commands.py's machinery, like cli/records.py.
"""

from __future__ import annotations

import json
import os
import secrets
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


COMMANDS: tuple[click.Command, ...] = (aid, ledger, lot, pulse, alert)
"""The commons commands, added to ``archipel`` by :func:`archipel.cli.commands.register`."""
