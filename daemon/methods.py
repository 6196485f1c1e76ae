"""What the RPC offers: one method per record action, the queries, the event stream.

Conventions (docs/rpc.md lists every method):

- **Actions** are named after the op kind they author (``proposal.open``,
  ``vote.cast``, ``mandate.recall``, ``aid.claim``, ...). Their params are the
  op's body, as docs/records.md describes it; ids and keys are lowercase hex.
  The op is signed with the member key (the device key for the kinds in
  :data:`DEVICE_KINDS`), applied, and written to disk (fsync) before the call
  returns its id. A refused op changes nothing and returns ``op_refused`` with
  the rule that refused it. On a full disk nothing changes either: the action
  returns ``disk_full`` (queries, events and sync go on; ``node.status`` says
  ``disk_full``).
- **Queries** take an optional ``now_ms`` (default: the node's clock), so
  that "what was live at 9 o'clock" can be asked too.
- **Events**: ``events.poll`` returns the ops stored after a cursor (the
  audit trail in storage order), waiting up to ``timeout_s`` for the first
  one. The cursor lives in the database: a client that reconnects with the
  last cursor it saw misses nothing, even across a node restart.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.metadata
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import trio

from archipel.crdt import CapacityError, InvalidOp, Op, Value, decode_op, op_id, ts_ms
from archipel.crdt.aid import Aid
from archipel.crdt.alerts import Alerts
from archipel.crdt.authority import DEVICE, MEMBER
from archipel.crdt.councils import Councils
from archipel.crdt.decisions import Decisions
from archipel.crdt.ledger import Ledger
from archipel.crdt.lots import Lots
from archipel.crdt.mandates import Mandates
from archipel.crdt.note import Notes
from archipel.crdt.pulse import Pulse

from .invite import InvalidCode, decode_card, make_invite
from .rpc import NOT_FOUND, OP_REFUSED, UNAVAILABLE, RpcError, invalid_params
from .storage import DiskFull, StorageError
from .transport import peer_id_of

if TYPE_CHECKING:
    from .node import Node

DEVICE_KINDS = frozenset({"pulse.frustration"})
"""Signed by the device key: the frustration log names the cell, never the member."""
NOT_BY_RPC = frozenset({"genesis"})

BYTES_FIELDS = frozenset(
    {
        "admission", "cells", "claim", "commit", "council", "decision", "delegate", "devices",
        "eligible", "expel", "hash", "key", "lot", "mandate", "members", "offer", "pledge",
        "proposal", "ref", "request", "secret", "version", "counterparties", "cell",
    }
)  # fmt: skip
"""Body fields (at any depth) whose values are bytes: hex strings in JSON."""

DAY_MS = 24 * 3600 * 1000
INVITE_DEFAULT_MS = 7 * DAY_MS
MAX_LIMIT = 1000
MAX_WAIT_S = 60.0

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


def to_value(obj: Any, name: str | None = None) -> Value:
    """JSON params to an op body: hex strings become bytes under :data:`BYTES_FIELDS`."""
    if isinstance(obj, dict):
        return {str(k): to_value(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_value(v, name) for v in obj]
    if isinstance(obj, str) and name in BYTES_FIELDS:
        try:
            return bytes.fromhex(obj)
        except ValueError:
            raise invalid_params(f"field {name!r} must be hex (an id or a key)") from None
    if isinstance(obj, float):
        raise invalid_params(f"field {name!r}: numbers must be integers")
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    raise invalid_params(f"field {name!r}: unsupported JSON value")


def to_json(value: Any) -> Any:  # noqa: PLR0911 (one return per kind of value)
    """Query results to JSON: dataclasses as objects, bytes as hex, sets sorted."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, enum.Enum):
        return to_json(value.value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {(k.hex() if isinstance(k, bytes) else str(k)): to_json(v) for k, v in value.items()}
    if isinstance(value, frozenset | set):
        return sorted((to_json(v) for v in value), key=str)
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if isinstance(value, Op):
        return op_json(value)
    return value


def op_json(op: Op) -> dict[str, Any]:
    return {
        "id": op.id.hex(),
        "kind": op.kind,
        "author": op.author.hex(),
        "seq": op.seq,
        "ts_ms": ts_ms(op.ts),
        "deps": [d.hex() for d in op.deps],
        "body": to_json(op.body),
    }


class Params:
    """Typed reads of a params object; every problem is an ``invalid_params`` error."""

    def __init__(self, raw: dict[str, Any], allowed: frozenset[str]) -> None:
        unknown = sorted(set(raw) - allowed)
        if unknown:
            known = ", ".join(sorted(allowed)) or "none"
            raise invalid_params(f"unknown parameter {unknown[0]!r} (known: {known})")
        self.raw = raw

    def id(self, name: str) -> bytes:
        value = self.raw.get(name)
        if not isinstance(value, str):
            raise invalid_params(f"parameter {name!r} is required: a hex id or key")
        try:
            raw = bytes.fromhex(value)
        except ValueError:
            raise invalid_params(f"parameter {name!r} must be hex") from None
        if len(raw) != 32:
            raise invalid_params(f"parameter {name!r} must be 32 bytes (64 hex digits)")
        return raw

    def opt_id(self, name: str) -> bytes | None:
        return self.id(name) if self.raw.get(name) is not None else None

    def int(self, name: str, default: int, low: int, high: int) -> int:
        value = self.raw.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise invalid_params(f"parameter {name!r} must be an integer in [{low}, {high}]")
        return value

    def number(self, name: str, default: float, low: float, high: float) -> float:
        value = self.raw.get(name, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not low <= value <= high
        ):
            raise invalid_params(f"parameter {name!r} must be a number in [{low}, {high}]")
        return float(value)

    def str(self, name: str) -> str:
        value = self.raw.get(name)
        if not isinstance(value, str) or not value:
            raise invalid_params(f"parameter {name!r} is required: a non-empty string")
        return value


class Methods:
    """The RPC methods of one node."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.queries: dict[str, tuple[frozenset[str], Handler]] = {}
        self._register()

    @property
    def action_kinds(self) -> list[str]:
        replica = self.node.replica
        assert replica is not None
        kinds = [k for cls in replica.record_classes for k in cls.op_kinds]
        return sorted(k for k in kinds if k not in NOT_BY_RPC)

    def names(self) -> list[str]:
        """Every method; a query never shadows an action (tests/test_rpc.py checks)."""
        return sorted([*self.queries, *self.action_kinds])

    async def dispatch(self, method: str, params: dict[str, Any]) -> Any:
        if self.node.replica is None or not self.node.ready.is_set():
            raise RpcError(UNAVAILABLE, "the node is starting: try again shortly", "starting")
        entry = self.queries.get(method)
        if entry is not None:
            allowed, handler = entry
            Params(params, allowed)
            return await handler(params)
        if method in self.action_kinds:
            return await self._act(method, params)
        raise RpcError(-32601, f"no method {method!r} (rpc.methods lists them)", "method_not_found")

    async def _act(self, kind: str, params: dict[str, Any]) -> Any:
        body = to_value(params)
        assert isinstance(body, Mapping)
        return await self._author(kind, body)

    async def _author(self, kind: str, body: Mapping[str, Value]) -> Any:
        try:
            op = await self.node.author(kind, body, as_device=kind in DEVICE_KINDS)
        except InvalidOp as exc:
            raise RpcError(OP_REFUSED, f"{kind} refused: {exc.reason}", "op_refused") from None
        except CapacityError as exc:
            raise RpcError(UNAVAILABLE, f"{kind} not taken: {exc}", "busy") from None
        except DiskFull as exc:  # nothing was applied nor stored
            raise RpcError(UNAVAILABLE, f"{kind} not taken: {exc}", "disk_full") from None
        except StorageError as exc:
            raise RpcError(UNAVAILABLE, f"{kind} not taken: {exc}", "storage") from None
        return {"id": op.id.hex(), "kind": op.kind, "ts_ms": ts_ms(op.ts)}

    # -- the query table ----------------------------------------------------

    def _query(self, name: str, *params: str) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            self.queries[name] = (frozenset(params), handler)
            return handler

        return register

    def _now(self, p: dict[str, Any]) -> int:
        return Params(p, frozenset(p)).int("now_ms", self.node.now_ms(), 0, 1 << 62)

    def _record(self, cls: type[Any]) -> Any:
        replica = self.node.replica
        assert replica is not None
        return replica.record(cls)

    def _register(self) -> None:  # noqa: PLR0915 (a table)
        node = self.node
        q = self._query

        @q("rpc.methods")
        async def methods(p: dict[str, Any]) -> Any:
            return {"queries": sorted(self.queries), "actions": self.action_kinds}

        @q("node.info")
        async def info(p: dict[str, Any]) -> Any:
            ident = node.identity
            replica = node.replica
            assert replica is not None
            return {
                "version": importlib.metadata.version("archipel"),
                "peer_id": node.peer_id,
                "cell": ident.cell,
                "cell_id": to_json(replica.authority.cell_of(ident.member_public)),
                "member_key": ident.member_public.hex(),
                "device_key": ident.device_public.hex(),
                "federation": node.federation.hex(),
                "federation_name": ident.federation_name,
                "listen": list(node.listen_addrs),
                "home": str(node.home.root),
            }

        @q("node.status")
        async def status(p: dict[str, Any]) -> Any:
            replica, sync, store = node.replica, node.sync, node.store
            assert replica is not None
            assert sync is not None
            assert store is not None
            graph = replica.graph
            storage = store.status()
            return {
                "disk_full": storage.disk_full,
                "storage": to_json(storage),
                "ops": len(graph),
                "pending": graph.pending_count(),
                "heads": len(replica.heads()),
                "state_hash": replica.state_hash().hex(),
                "connected": len(node.connected_peers()),
                "sync": to_json(
                    dataclasses.replace(sync.counters, errors=sync.counters.errors[-5:])
                ),
                "node": to_json(dataclasses.replace(node.stats, errors=node.stats.errors[-5:])),
                "now_ms": node.now_ms(),
            }

        @q("node.offline", "offline")
        async def offline(p: dict[str, Any]) -> Any:
            """Cut this node off the network (``offline: true``) or bring it back."""
            value = p.get("offline")
            if not isinstance(value, bool):
                raise invalid_params("parameter 'offline' is required: true or false")
            node.set_offline(value)
            return {"offline": node.offline}

        @q("peers.list")
        async def peers(p: dict[str, Any]) -> Any:
            sync = node.sync
            assert sync is not None
            active, passive = sync.peers.active, sync.peers.passive
            out = []
            for key in sorted({*node.connected_peers(), *active, *passive}):
                info = active.get(key) or passive.get(key)
                out.append(
                    {
                        "peer_id": peer_id_of(key),
                        "device_key": key.hex(),
                        "connected": key in node.connected_peers(),
                        "view": "active" if key in active else "passive" if key in passive else "",
                        "addrs": list(info.addrs) if info is not None else [],
                    }
                )
            return out

        @q("cells.list")
        async def cells(p: dict[str, Any]) -> Any:
            Params(p, frozenset())  # no parameter: membership does not depend on the time
            replica = node.replica
            assert replica is not None
            authority = replica.authority
            return [
                {
                    **to_json(c),
                    "members": [k.hex() for k in authority.keys_of(c.id, role=MEMBER)],
                    "devices": [k.hex() for k in authority.keys_of(c.id, role=DEVICE)],
                }
                for c in authority.cells()
            ]

        @q("ops.get", "id")
        async def get(p: dict[str, Any]) -> Any:
            ident = Params(p, frozenset({"id"})).id("id")
            replica = node.replica
            assert replica is not None
            if ident not in replica.graph:
                raise RpcError(NOT_FOUND, f"no op {ident.hex()} on this node", "not_found")
            return op_json(replica.graph[ident])

        @q("ops.history", "id", "limit")
        async def history(p: dict[str, Any]) -> Any:
            """Ops whose body names ``id`` (a record's history), in causal order."""
            params = Params(p, frozenset({"id", "limit"}))
            ident, limit = params.id("id"), params.int("limit", 100, 1, MAX_LIMIT)
            replica = node.replica
            assert replica is not None
            out = []
            for op in replica.graph.topological():
                if op.id == ident or _names(op.body, ident):
                    out.append(op_json(op))
                    if len(out) >= limit:
                        break
            return out

        @q("events.poll", "cursor", "limit", "timeout_s")
        async def poll(p: dict[str, Any]) -> Any:
            params = Params(p, frozenset({"cursor", "limit", "timeout_s"}))
            cursor = params.int("cursor", 0, 0, 1 << 62)
            limit = params.int("limit", 100, 1, MAX_LIMIT)
            wait = params.number("timeout_s", 0.0, 0.0, MAX_WAIT_S)
            return await self.events(cursor, limit, wait)

        @q("proposals.list", "now_ms")
        async def proposals(p: dict[str, Any]) -> Any:
            now, decisions = self._now(p), self._record(Decisions)
            return [
                {**to_json(x), "status": decisions.status(x.id, now)} for x in decisions.proposals()
            ]

        @q("proposal.show", "proposal", "now_ms")
        async def proposal(p: dict[str, Any]) -> Any:
            ident, now = Params(p, frozenset(p)).id("proposal"), self._now(p)
            decisions = self._record(Decisions)
            found = decisions.proposal(ident)
            if found is None:
                raise RpcError(NOT_FOUND, f"no proposal {ident.hex()}", "not_found")
            status_ = decisions.status(ident, now)
            tally = decisions.tally(ident, now)  # provisional (final: false) until sealed
            return {"proposal": to_json(found), "status": status_, "tally": to_json(tally)}

        @q("mandates.live", "now_ms")
        async def live(p: dict[str, Any]) -> Any:
            return to_json(self._record(Mandates).live(self._now(p)))

        @q("mandate.show", "mandate", "now_ms")
        async def mandate(p: dict[str, Any]) -> Any:
            ident, now = Params(p, frozenset(p)).id("mandate"), self._now(p)
            mandates = self._record(Mandates)
            if mandates.mandate(ident) is None:
                raise RpcError(NOT_FOUND, f"no mandate {ident.hex()}", "not_found")
            return {
                "state": to_json(mandates.state(ident, now)),
                "acts": to_json(mandates.under(ident)),
            }

        @q("mandates.history", "delegate")
        async def delegate_history(p: dict[str, Any]) -> Any:
            ident = Params(p, frozenset(p)).id("delegate")
            return to_json(self._record(Mandates).history(ident))

        @q("councils.list", "now_ms")
        async def councils(p: dict[str, Any]) -> Any:
            return to_json(self._record(Councils).councils(self._now(p)))

        @q("council.show", "council", "now_ms")
        async def council(p: dict[str, Any]) -> Any:
            ident, now = Params(p, frozenset(p)).id("council"), self._now(p)
            record = self._record(Councils)
            if record.council(ident) is None:
                raise RpcError(NOT_FOUND, f"no council {ident.hex()}", "not_found")
            return to_json(record.state(ident, now))

        @q("aid.list", "now_ms")
        async def aid(p: dict[str, Any]) -> Any:
            now, record = self._now(p), self._record(Aid)
            return {
                "offers": to_json(record.open_offers(now)),
                "requests": to_json(record.open_requests(now)),
            }

        @q("aid.allocation", "offer")
        async def offer(p: dict[str, Any]) -> Any:
            ident, record = Params(p, frozenset(p)).id("offer"), self._record(Aid)
            found = record.offer(ident)
            if found is None:
                raise RpcError(NOT_FOUND, f"no offer {ident.hex()}", "not_found")
            return {"offer": to_json(found), "allocation": to_json(record.allocation(ident))}

        @q("aid.coverage", "request")
        async def request(p: dict[str, Any]) -> Any:
            ident, record = Params(p, frozenset(p)).id("request"), self._record(Aid)
            found = record.request(ident)
            if found is None:
                raise RpcError(NOT_FOUND, f"no request {ident.hex()}", "not_found")
            return {"request": to_json(found), "coverage": to_json(record.coverage(ident))}

        @q("ledger.balances", "cell")
        async def balances(p: dict[str, Any]) -> Any:
            cell = Params(p, frozenset(p)).opt_id("cell")
            return [
                {**to_json(b), "balance": b.balance} for b in self._record(Ledger).balances(cell)
            ]

        @q("ledger.entries", "resource")
        async def entries(p: dict[str, Any]) -> Any:
            resource = Params(p, frozenset(p)).str("resource")
            return to_json(self._record(Ledger).entries(resource))

        @q("lots.list", "now_ms")
        async def lots(p: dict[str, Any]) -> Any:
            return to_json(self._record(Lots).draws(self._now(p)))

        @q("lot.show", "lot", "now_ms")
        async def lot(p: dict[str, Any]) -> Any:
            ident, now = Params(p, frozenset(p)).id("lot"), self._now(p)
            draw = self._record(Lots).draw(ident, now)
            if draw is None:
                raise RpcError(NOT_FOUND, f"no lot {ident.hex()}", "not_found")
            return to_json(draw)

        @q("pulse.metrics", "start_ms", "end_ms", "step_ms", "now_ms")
        async def pulse(p: dict[str, Any]) -> Any:
            params, now = Params(p, frozenset(p)), self._now(p)
            day = 24 * 3600 * 1000
            end = params.int("end_ms", now, 0, 1 << 62)
            start = params.int("start_ms", end - 7 * day, 0, end)
            step = params.int("step_ms", day, 60_000, 1 << 62)
            if (end - start) // step > 10_000:
                raise invalid_params("at most 10,000 steps between start_ms and end_ms")
            record = self._record(Pulse)
            return {
                "divergence": to_json(record.divergence(start, end, step)),
                "response_times": to_json(record.response_times()),
            }

        @q("pulse.frustrations", "cell")
        async def frustrations(p: dict[str, Any]) -> Any:
            cell = Params(p, frozenset(p)).opt_id("cell")
            return to_json(self._record(Pulse).frustrations(cell))

        @q("alerts.active", "now_ms")
        async def alerts(p: dict[str, Any]) -> Any:
            return to_json(self._record(Alerts).active(self._now(p)))

        @q("invite.create", "card", "expires_ms")
        async def invite(p: dict[str, Any]) -> Any:
            """Admit the cell on ``card`` (a ``cell.admit`` op) and return its invite code."""
            params = Params(p, frozenset(p))
            try:
                card = decode_card(params.str("card"))
            except InvalidCode as exc:
                raise invalid_params(f"card: {exc}") from None
            now = node.now_ms()
            expires = params.int("expires_ms", now + INVITE_DEFAULT_MS, now + 1, now + 366 * DAY_MS)
            body: dict[str, Value] = {
                "name": card.name,
                "members": list(card.members),
                "devices": list(card.devices),
            }
            ident = node.identity
            assert ident.secret is not None
            # Reachable addresses first (loopback ones only help on this machine), at most 8.
            addrs = sorted(node.sync.me.addrs if node.sync else (), key=lambda a: "/127." in a)

            def code_for(admission: bytes) -> str:
                return make_invite(
                    ident.member,
                    federation=node.federation,
                    federation_name=ident.federation_name or "unnamed",
                    secret=ident.secret or b"",
                    bootstrap=((node.device, tuple(addrs[:8])),),
                    admission=admission,
                    expires_ms=expires,
                )

            try:
                code_for(bytes(32))  # a dry run: nothing is authored if the code cannot be made
            except InvalidCode as exc:
                raise RpcError(UNAVAILABLE, f"cannot make an invite: {exc}", "invite") from None
            admitted = await self._author("cell.admit", body)
            code = code_for(bytes.fromhex(admitted["id"]))
            return {"code": code, "admission": admitted["id"], "expires_ms": expires}

        @q("notes.list")
        async def notes(p: dict[str, Any]) -> Any:
            return to_json(self._record(Notes).all())

    # -- events -------------------------------------------------------------

    async def events(self, cursor: int, limit: int, wait_s: float) -> dict[str, Any]:
        """Ops stored after ``cursor``, waiting up to ``wait_s`` for one."""
        store = self.node.store
        assert store is not None
        rows = await trio.to_thread.run_sync(store.ops_since, cursor, limit)
        if not rows and wait_s > 0:
            with trio.move_on_after(wait_s):
                await self.node.wait_for_ops()
                await store.flush()
            rows = await trio.to_thread.run_sync(store.ops_since, cursor, limit)
        # The stored ops are the replica's: take each from its graph rather
        # than decode and verify the bytes again (a poller reads every op).
        graph = self.node.replica.graph if self.node.replica is not None else None
        events = []
        for row_cursor, data in rows:
            op = graph.get(op_id(data)) if graph is not None else None
            if op is None:  # stored but not (yet) in this replica: the bytes say
                op = decode_op(data)
            received = self.node.arrivals.get(op.id)
            events.append({"cursor": row_cursor, "received_ms": received, **op_json(op)})
            cursor = row_cursor
        return {"events": events, "cursor": cursor}


def _names(value: Value, ident: bytes) -> bool:
    if value == ident:
        return True
    if isinstance(value, Mapping):
        return any(_names(v, ident) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_names(v, ident) for v in value)
    return False
