"""The ``archipel`` commands that script a running node through its local RPC.

Every command here is a thin client of one or a few RPC methods
(docs/rpc.md): it turns friendly arguments (cell names, id prefixes, ``48h``,
``+2d``) into a method's params, calls it, and prints the result as tables, or
as the raw result with ``--json``. This module holds the shared machinery
(:class:`Session`, parameter types, output) and the node-level commands; the
record commands (proposals, mandates, councils, aid, ledger, lots, pulse,
alerts) are in :mod:`archipel.cli.records`. :func:`register` adds them all.

Exit statuses (docs/scripting.md): 0 ok; 1 the node refused or failed; 2 bad
input (usage); 3 no node running in the directory.
"""

from __future__ import annotations

import collections
import contextlib
import json
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import click
from rich import box
from rich.console import Console, RenderableType
from rich.table import Table

from archipel.client import Client, NodeUnreachable, RpcError
from archipel.crdt import ArchipelError, cell_id, ts_ms
from archipel.daemon.paths import Home

from ._common import home_option, resolve_home

F = TypeVar("F", bound=Callable[..., Any])

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_NO_NODE = 3

USAGE_CODES = frozenset({-32600, -32601, -32602})
"""JSON-RPC codes that mean the request itself was wrong: exit status 2."""
SHORT = 12
"""Hex digits shown for ids and keys in tables (give any unique prefix back)."""
PIPE_WIDTH = 200
"""Columns of table output that does not go to a terminal."""
MAX_PAGES = 100_000
"""Bound on pages read by one command (1,000 ops each)."""


class NoNode(click.ClickException):
    """No node answers in the directory: exit status 3."""

    exit_code = EXIT_NO_NODE


class BadInput(click.ClickException):
    """The input cannot be used (an unknown id prefix, a choice that does not exist): status 2."""

    exit_code = EXIT_USAGE


# -- parameter types ------------------------------------------------------------

_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "min": 60_000, "h": 3_600_000,
             "d": 86_400_000, "w": 7 * 86_400_000}  # fmt: skip
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|min|s|m|h|d|w)")


def parse_duration_ms(text: str) -> int:
    """``48h``, ``7d``, ``29.5d``, ``90m``, ``1d12h`` to milliseconds; ValueError otherwise."""
    text = text.strip().lower()
    pos, total = 0, 0.0
    for match in _DURATION.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS_MS[match.group(2)]
        pos = match.end()
    if not text or pos != len(text) or total <= 0:
        raise ValueError(f"{text!r} is not a duration: write 48h, 7d, 29.5d, 90m or 1d12h")
    return round(total)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def parse_time_ms(text: str, now: int | None = None) -> int:
    """An absolute time in wall ms: ``+2d`` or ``2d`` (from now), ``now``, or ISO-8601
    (``2025-06-01``, ``2025-06-01T18:00``, ``2025-06-01T18:00Z``; no zone means local time)."""
    now = now_ms() if now is None else now
    value = text.strip()
    if value.lower() == "now":
        return now
    with contextlib.suppress(ValueError):
        return now + parse_duration_ms(value.removeprefix("+"))
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: write +2d (from now), 2025-06-01 or 2025-06-01T18:00"
        ) from None
    if when.tzinfo is None:
        when = when.astimezone()  # local time, as a person typing it means it
    return round(when.timestamp() * 1000)


class Duration(click.ParamType[int]):
    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_duration_ms(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class When(click.ParamType[int]):
    """A point in time, converted to wall ms when the command line is read."""

    name = "time"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_time_ms(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class HexId(click.ParamType[str]):
    """An id or key in hex, or a unique prefix of one (resolved against the node)."""

    name = "id"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value).strip().lower()
        if not re.fullmatch(r"[0-9a-f]{1,64}", text):
            self.fail(f"{value!r} is not an id: hex digits (a unique prefix is enough)", param, ctx)
        return text


DURATION = Duration()
WHEN = When()
HEX = HexId()
QUANTITY = click.IntRange(1, 1_000_000_000)

json_option = click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the raw RPC result as JSON (stable, for scripts).",
)


def node_options(fn: F) -> F:
    """``--home`` and ``--json``, which every node command takes."""
    return home_option(json_option(fn))


# -- output ---------------------------------------------------------------------


def short(value: Any) -> str:
    return str(value)[:SHORT] if value else "-"


def fmt_time(ms: int | None, now: int | None = None) -> str:
    """Local time and how far from now: ``2025-06-01 18:00 (in 2d 3h)``."""
    if ms is None:
        return "-"
    now = now_ms() if now is None else now
    stamp = datetime.fromtimestamp(ms / 1000).astimezone().strftime("%Y-%m-%d %H:%M")
    delta = ms - now
    span = fmt_duration(abs(delta))
    return f"{stamp} (in {span})" if delta >= 0 else f"{stamp} ({span} ago)"


def fmt_duration(ms: float) -> str:
    seconds = int(ms // 1000)
    days, rest = divmod(seconds, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h" if hours else f"{days}d"
    if hours:
        return f"{hours}h {minutes}m" if minutes else f"{hours}h"
    if minutes:
        return f"{minutes}m"
    return f"{secs}s" if secs else f"{int(ms)}ms"


def op_time(ts: int) -> int:
    """The wall-time (ms) part of an op's timestamp."""
    return ts_ms(ts)


def table(*columns: str, title: str | None = None) -> Table:
    return Table(
        *columns, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, title=title,
        title_justify="left",
    )  # fmt: skip


def pairs(rows: Iterable[tuple[str, Any]], title: str | None = None) -> Table:
    """A two-column table of names and values."""
    out = Table.grid(padding=(0, 2))
    out.add_column(style="bold")
    out.add_column(overflow="fold")
    if title:
        out.title = title
        out.title_justify = "left"
    for name, value in rows:
        out.add_row(name, "-" if value is None or value == "" else str(value))
    return out


def render(*items: RenderableType | str) -> None:
    """Print rich renderables to stdout (colours only on a terminal)."""
    # On a terminal, its width; into a pipe or a file, wide enough that keys never fold.
    width = None if sys.stdout.isatty() else PIPE_WIDTH
    console = Console(file=sys.stdout, highlight=False, soft_wrap=False, width=width)
    previous: RenderableType | str | None = None
    for item in items:
        if isinstance(item, Table) and isinstance(previous, Table):
            console.print()  # a blank line between two tables
        console.print(item)
        previous = item


def summary(body: dict[str, Any], width: int = 60) -> str:
    """A few words that say what an op is about."""
    for name in ("title", "role", "task", "what", "text", "instructions", "resource", "reason"):
        value = body.get(name)
        if isinstance(value, str) and value:
            line = " ".join(value.split())
            return line if len(line) <= width else line[: width - 1] + "…"
    return ""


# -- talking to the node --------------------------------------------------------


@dataclass
class Session:
    """One command's connection to its node, with the few lookups commands share."""

    client: Client
    home: Home
    as_json: bool
    _info: dict[str, Any] | None = None
    _cells: list[dict[str, Any]] | None = None
    _names: dict[str, str] = field(default_factory=dict)

    def call(self, method: str, /, **params: Any) -> Any:
        return self.client.call(method, **params)

    def act(self, kind: str, body: dict[str, Any], what: str | None = None) -> dict[str, Any]:
        """Author an op of ``kind`` and report it: the raw result, or one line."""
        made: dict[str, Any] = self.call(kind, **body)
        if self.as_json:
            self.dump(made)
        else:
            click.echo(f"{what or kind}: {made['id']}")
        return made

    def show(self, result: Any, human: Callable[[Any], Iterable[RenderableType | str]]) -> None:
        """Print ``result`` raw (``--json``) or as ``human`` renders it."""
        if self.as_json:
            self.dump(result)
        else:
            render(*human(result))

    @staticmethod
    def dump(result: Any) -> None:
        click.echo(json.dumps(result, indent=2, ensure_ascii=False))

    # -- lookups ----------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        if self._info is None:
            self._info = self.call("node.info")
        return self._info

    def cells(self) -> list[dict[str, Any]]:
        """``cells.list``, each cell with its ``devices`` (keys that are not persons)."""
        if self._cells is None:
            self._cells = self.call("cells.list")
            for cell in self._cells:
                if "devices" not in cell:
                    cell["devices"] = self._founding_devices(cell)
                for key in [*cell.get("members", []), *cell["devices"]]:
                    self._names[key] = cell["name"]
        return self._cells

    def _founding_devices(self, cell: dict[str, Any]) -> list[str]:
        """The device keys a cell was created with (genesis or ``cell.admit``), for a node
        whose ``cells.list`` does not tell members from devices."""
        body = self.call("ops.get", id=cell["created_by"])["body"]
        if "cells" in body:  # the genesis: find this cell among the founding cells
            made = bytes.fromhex(cell["created_by"])
            body = next(
                (c for i, c in enumerate(body["cells"]) if cell_id(made, i).hex() == cell["id"]),
                {},
            )
        return list(body.get("devices", []))

    def cell_name(self, cell_id: str | None) -> str:
        if not cell_id:
            return "-"
        for cell in self.cells():
            if cell["id"] == cell_id:
                return str(cell["name"])
        return short(cell_id)

    def who(self, key: str | None) -> str:
        """A key as ``cell:abcdef123456`` (the cell it belongs to, and its start)."""
        if not key:
            return "-"
        self.cells()
        cell = self._names.get(key)
        return f"{cell}:{key[:8]}" if cell else short(key)

    @staticmethod
    def member_keys(cell: dict[str, Any]) -> list[str]:
        """The member (person) keys of a ``cells.list`` entry."""
        devices = set(cell.get("devices", []))
        return [k for k in cell.get("members", []) if k not in devices]

    def resolve(self, noun: str, given: str, candidates: Callable[[], Iterable[str]]) -> str:
        """A full hex id from a unique prefix of one of ``candidates()``."""
        if len(given) == 64:
            return given
        found = sorted({c for c in candidates() if c.startswith(given)})
        if len(found) == 1:
            return found[0]
        if not found:
            raise BadInput(
                f"no {noun} on this node has an id starting with {given!r}:"
                " check the id, or give the full 64 hex digits"
            )
        raise BadInput(f"{given!r} is the start of {len(found)} {noun} ids: give more digits")

    def resolve_cell(self, given: str) -> str:
        """A cell id from the cell's name (any case) or a unique prefix of its id."""
        named = [c["id"] for c in self.cells() if str(c["name"]).lower() == given.lower()]
        if len(named) == 1:
            return str(named[0])
        if not re.fullmatch(r"[0-9a-f]{1,64}", given.lower()):
            names = ", ".join(sorted(str(c["name"]) for c in self.cells()))
            raise BadInput(f"no cell named {given!r} (cells: {names})")
        return self.resolve("cell", given.lower(), lambda: [c["id"] for c in self.cells()])

    def resolve_key(self, given: str) -> str:
        """A member key from a unique prefix, ``me``, or the name of a cell with one member."""
        if given.lower() == "me":
            return str(self.info()["member_key"])
        for cell in self.cells():
            if str(cell["name"]).lower() == given.lower():
                members = self.member_keys(cell)
                if len(members) == 1:
                    return members[0]
                raise BadInput(f"cell {cell['name']!r} has {len(members)} keys: give the key")
        if not re.fullmatch(r"[0-9a-f]{1,64}", given.lower()):
            raise BadInput(f"{given!r} is neither a key (hex), 'me', nor a cell's name")
        return self.resolve(
            "key", given.lower(), lambda: [k for c in self.cells() for k in c.get("members", [])]
        )

    def resolve_keys(self, tokens: Sequence[str]) -> list[str]:
        """Keys, where a cell's name stands for all its members' keys; sorted, no repeats."""
        keys: set[str] = set()
        for token in tokens:
            cell = next((c for c in self.cells() if str(c["name"]).lower() == token.lower()), None)
            if cell is not None:
                keys.update(self.member_keys(cell))
            else:
                keys.add(self.resolve_key(token))
        return sorted(keys)


def _transport_hint(where: Home, home: str | None) -> str:
    flag = f" --home {where.root}" if home is not None else ""
    return f"no node running in {where.root}: start one with 'archipel run{flag}'"


@contextlib.contextmanager
def session(home: str | None, as_json: bool) -> Iterator[Session]:
    """A :class:`Session` with the node of ``home``; maps every failure to its exit status."""
    where = resolve_home(home)
    if not where.exists():
        raise NoNode(
            f"no node in {where.root} (no identity.json): create one with 'archipel init',"
            " or give its directory with --home"
        )
    try:
        with Client(where.root) as client:
            yield Session(client, where, as_json)
    except NodeUnreachable as exc:
        message = str(exc)
        raise NoNode(
            _transport_hint(where, home) if message.startswith("no node running") else message
        ) from None
    except RpcError as exc:
        if exc.code in USAGE_CODES:
            raise BadInput(f"the node refused the request: {exc.message}") from None
        raise click.ClickException(exc.message) from None
    except ArchipelError as exc:
        raise click.ClickException(str(exc)) from None


# -- node-level commands --------------------------------------------------------


@click.command()
@node_options
def status(home: str | None, as_json: bool) -> None:
    """This node: its cell, keys, federation, ops and connections."""
    with session(home, as_json) as s:
        result = {"info": s.info(), "status": s.call("node.status")}

        def human(r: dict[str, Any]) -> list[RenderableType]:
            info, st = r["info"], r["status"]
            sync = st.get("sync", {})
            rows = [
                ("cell", f"{info['cell']} ({info['cell_id']})"),
                ("federation", f"{info['federation_name']} ({info['federation']})"),
                ("member key", info["member_key"]),
                ("device key", info["device_key"]),
                ("peer id", info["peer_id"]),
                ("listening on", "\n".join(info["listen"]) or "-"),
                ("home", info["home"]),
                ("version", info["version"]),
                ("ops", f"{st['ops']} ({st['pending']} pending, {st['heads']} heads)"),
                ("state hash", st["state_hash"]),
                ("connected peers", st["connected"]),
            ]
            if isinstance(sync, dict) and "ops_invalid" in sync:
                rows.append(("ops refused from peers", sync["ops_invalid"]))
            return [pairs(rows)]

        s.show(result, human)


@click.command()
@node_options
def peers(home: str | None, as_json: bool) -> None:
    """The peers this node knows and whether they are connected."""
    with session(home, as_json) as s:

        def human(rows: list[dict[str, Any]]) -> list[RenderableType | str]:
            if not rows:
                return ["No peers known yet."]
            out = table("peer id", "connected", "view", "addresses")
            for p in rows:
                out.add_row(
                    p["peer_id"], "yes" if p["connected"] else "no", p["view"] or "-",
                    "\n".join(p["addrs"]) or "-",
                )  # fmt: skip
            return [out]

        s.show(s.call("peers.list"), human)


@click.command()
@node_options
def cells(home: str | None, as_json: bool) -> None:
    """The federation's live cells, with their ids and keys."""
    with session(home, as_json) as s:

        def human(rows: list[dict[str, Any]]) -> list[RenderableType]:
            out = table("cell", "id", "founding", "keys")
            for c in rows:
                out.add_row(
                    c["name"], short(c["id"]), "yes" if c.get("founding") else "no",
                    "\n".join(short(k) for k in c.get("members", [])),
                )  # fmt: skip
            return [out]

        s.show(s.cells(), human)


@click.command()
@click.argument("card")
@click.option(
    "--expires",
    type=WHEN,
    default="7d",
    show_default=True,
    help="When the invite stops working: a time (+7d, 2025-06-01).",
)
@node_options
def invite(card: str, expires: int, home: str | None, as_json: bool) -> None:
    """Admit a new cell: CARD is the cell card it printed at 'archipel init'.

    Prints an invite code for the new cell's 'archipel join CODE'.
    """
    with session(home, as_json) as s:
        result = s.call("invite.create", card=card, expires_ms=expires)

        def human(r: dict[str, Any]) -> list[str]:
            return [
                f"Admission proposed: {r.get('admission', '-')}",
                "Invite code (give it to the new cell; it runs 'archipel join CODE'):",
                str(r["code"]),
                f"It works until {fmt_time(expires)}.",
            ]

        s.show(result, human)


def parse_params(items: Sequence[str]) -> dict[str, Any]:
    """``key=text`` (a string) and ``key:=json`` (any JSON value) into named params."""
    params: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        raw_json = name.endswith(":")
        name = name.removesuffix(":")
        if not sep or not name:
            raise BadInput(f"{item!r}: write key=text or key:=json (e.g. quantity:=3)")
        if raw_json:
            try:
                params[name] = json.loads(value)
            except ValueError as exc:
                raise BadInput(f"{item!r}: the value after := is not JSON ({exc})") from None
        else:
            params[name] = value
    return params


@click.command()
@click.argument("method")
@click.argument("params", nargs=-1)
@click.option(
    "--params",
    "params_json",
    metavar="JSON",
    help="All params as one JSON object (or - for stdin).",
)
@node_options
def call(
    method: str, params: tuple[str, ...], params_json: str | None, home: str | None, as_json: bool
) -> None:
    """Call any RPC METHOD with params key=text or key:=json; prints the JSON result.

    \b
    archipel call rpc.methods
    archipel call ops.get id=3f2a...
    archipel call aid.claim offer=3f2a... quantity:=2
    """
    named: dict[str, Any] = {}
    if params_json is not None:
        text = sys.stdin.read() if params_json == "-" else params_json
        try:
            named = json.loads(text)
        except ValueError as exc:
            raise BadInput(f"--params is not JSON: {exc}") from None
        if not isinstance(named, dict):
            raise BadInput("--params must be a JSON object of named params")
    named.update(parse_params(params))
    with session(home, as_json) as s:
        s.dump(s.call(method, **named))


def _event_line(s: Session, event: dict[str, Any]) -> str:
    return (
        f"{event['cursor']:>7}  {fmt_time(event['ts_ms']).split(' (')[0]}  {event['kind']:<18}"
        f"  {short(event['id'])}  {s.who(event['author']):<22}  {summary(event['body'])}"
    )


@click.command()
@click.option("--cursor", type=click.IntRange(0), default=0, help="Start after this cursor.")
@click.option("--follow", "-f", is_flag=True, help="Keep waiting for new ops (Ctrl-C stops).")
@click.option("--limit", type=click.IntRange(1), default=None, help="Stop after this many events.")
@node_options
def events(cursor: int, follow: bool, limit: int | None, home: str | None, as_json: bool) -> None:
    """Every op stored after --cursor, in storage order; with --follow, new ones as they come.

    With --json, one JSON object per line (JSON Lines). Each event carries its
    cursor; the last one is printed on stderr: pass it as --cursor to resume.
    """
    with session(home, as_json) as s:
        last, seen = cursor, 0
        try:
            for event in s.client.events(cursor, follow=follow):
                last = event["cursor"]
                seen += 1
                if as_json:
                    click.echo(json.dumps(event, ensure_ascii=False, separators=(",", ":")))
                else:
                    click.echo(_event_line(s, event))
                if limit is not None and seen >= limit:
                    break
        except KeyboardInterrupt:
            click.echo(f"stopped; resume with --cursor {last}", err=True)
            raise SystemExit(130) from None
        click.echo(f"cursor {last} (resume with --cursor {last})", err=True)


@click.command()
@click.argument("ident", metavar="[ID]", type=HEX, required=False)
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
@node_options
def log(ident: str | None, limit: int, home: str | None, as_json: bool) -> None:
    """The latest ops (the audit trail); with ID, the history of that record."""
    with session(home, as_json) as s:
        if ident is not None:
            full = s.resolve("op", ident, lambda: (e["id"] for e in _all_events(s)))
            ops: list[dict[str, Any]] = s.call("ops.history", id=full, limit=limit)
        else:
            ops = list(collections.deque(_all_events(s), maxlen=limit))

        def human(rows: list[dict[str, Any]]) -> list[RenderableType | str]:
            if not rows:
                return ["No ops."]
            out = table("time", "kind", "id", "author", "about")
            for op in rows:
                out.add_row(
                    fmt_time(op["ts_ms"]).split(" (")[0], op["kind"], short(op["id"]),
                    s.who(op["author"]), summary(op["body"], 40),
                )  # fmt: skip
            return [out]

        s.show(ops, human)


def _all_events(s: Session) -> Iterator[dict[str, Any]]:
    cursor = 0
    for _ in range(MAX_PAGES):
        page = s.call("events.poll", cursor=cursor, limit=1000)
        yield from page["events"]
        if not page["events"]:
            return
        cursor = page["cursor"]


@click.command()
@click.argument("text", required=False)
@click.option("--list", "listing", is_flag=True, help="List the federation's notes instead.")
@node_options
def note(text: str | None, listing: bool, home: str | None, as_json: bool) -> None:
    """Write a public note to the federation (or --list them)."""
    with session(home, as_json) as s:
        if listing or text is None:

            def human(rows: list[dict[str, Any]]) -> list[RenderableType | str]:
                if not rows:
                    return ["No notes."]
                out = table("time", "author", "note")
                for n in rows:
                    out.add_row(fmt_time(op_time(n["ts"])).split(" (")[0], s.who(n["author"]),
                                n["text"])  # fmt: skip
                return [out]

            s.show(s.call("notes.list"), human)
        else:
            s.act("note", {"text": text}, "note written")


def register(main: click.Group) -> None:
    """Add every RPC client command to the ``archipel`` group."""
    # records.py builds on this module's machinery, so it is imported here, once
    # this module is complete, rather than at the top (which would be circular).
    from . import commons, records  # noqa: PLC0415

    for command in (status, peers, cells, invite, call, events, log, note):
        main.add_command(command)
    for command in (*records.COMMANDS, *commons.COMMANDS):
        main.add_command(command)
