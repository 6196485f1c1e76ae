"""The local RPC under abuse: junk JSON, wrong types, floods, slow clients, smuggling, bad tokens.

What tests/test_rpc.py already covers is not repeated here (an unparsable body,
a missing ``jsonrpc``, positional params, a declared body over the limit, a
batch over the limit, a missing or wrong token). For every case below: a clear
JSON-RPC or HTTP error (never a dropped connection without an answer, never an
``internal`` error), the node keeps serving, and its op graph does not change.

Most tests run a real node in-process and talk raw HTTP/1.1 to its Unix socket
or TCP port (real clock, capped by ``fail_after``, no sleeps). The tests of
time limits (slowloris, idle and slow-reading clients) drive the HTTP server
over in-memory streams on trio's mock clock, so that minutes pass instantly
and deterministically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NamedTuple

import psutil
import pytest
import trio
import trio.testing
from nacl.signing import SigningKey
from nodes import CAP_S, config, federation_on_disk, serving

from archipel.client import AsyncClient
from archipel.daemon import rpc
from archipel.daemon.config import RpcConfig
from archipel.daemon.invite import CellCard, encode_card
from archipel.daemon.node import Node

MIB = 1 << 20


# -- a node, and raw HTTP to it -----------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@asynccontextmanager
async def running_node(tmp_path: Path, *, tcp: bool = False) -> AsyncIterator[Node]:
    fed = federation_on_disk(tmp_path, 2)
    rpc_config = RpcConfig(tcp_port=_free_port() if tcp else 0)
    node = Node(fed.homes[0], dataclasses.replace(config(), rpc=rpc_config), fed.identities[0])
    async with serving(node):
        yield node


class Reply(NamedTuple):
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Conn:
    """One raw HTTP/1.1 connection: send any bytes, read the replies one by one."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _more(self) -> bytes:
        try:
            return bytes(await self.stream.receive_some(65536))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return b""  # a reset counts as closed

    async def reply(self) -> Reply:
        while b"\r\n\r\n" not in self.buf:
            data = await self._more()
            assert data, f"the connection closed without an answer (had {bytes(self.buf)!r})"
            self.buf += data
        head, _, rest = bytes(self.buf).partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        body = bytearray(rest)
        while len(body) < length:
            data = await self._more()
            assert data, "the connection closed in the middle of an answer"
            body += data
        self.buf = bytearray(body[length:])
        return Reply(status, headers, bytes(body[:length]))

    async def closed(self) -> bool:
        """True once the server closed its end (waits for it; the test's cap bounds the wait)."""
        while True:
            data = await self._more()
            if not data:
                return True
            self.buf += data

    async def aclose(self) -> None:
        await self.stream.aclose()


async def unix(node: Node) -> Conn:
    return Conn(await trio.open_unix_socket(str(node.home.rpc_socket)))


async def tcp(node: Node) -> Conn:
    return Conn(await trio.open_tcp_stream("127.0.0.1", node.config.rpc.tcp_port))


def http(
    body: bytes,
    *,
    headers: Sequence[tuple[str, str]] = (),
    length: bool = True,
    method: str = "POST",
) -> bytes:
    lines = [f"{method} / HTTP/1.1", "Host: node", "Content-Type: application/json"]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def call(method: Any, params: Any = None, ident: Any = 1) -> bytes:
    request: dict[str, Any] = {"jsonrpc": "2.0", "id": ident, "method": method}
    if params is not None:
        request["params"] = params
    return json.dumps(request).encode()


def graph_state(node: Node) -> tuple[int, bytes]:
    replica = node.replica
    assert replica is not None
    return len(replica.graph), replica.state_hash()


async def assert_unharmed(node: Node, before: tuple[int, bytes]) -> None:
    """The node answers a fresh client, and its op graph is what it was."""
    assert graph_state(node) == before
    async with AsyncClient(node.home.root) as client:
        assert (await client.call("node.info"))["peer_id"] == node.peer_id


def no_rpc_failures(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing reached the server's last-resort handlers ("RPC method/connection failed")."""
    failures = [
        r for r in caplog.records if r.name == "archipel.rpc" and r.levelno >= logging.ERROR
    ]
    assert not failures, [r.getMessage() for r in failures]


# -- bodies that are not a good JSON-RPC request -------------------------------------

DEEP = 100_000


@pytest.mark.parametrize(
    ("body", "code"),
    [
        pytest.param(b'{"jsonrpc":"2.0","id":1,"method":"node.in', rpc.PARSE_ERROR, id="truncated"),
        pytest.param(
            b'{"jsonrpc":"2.0","id":1,"method":"\xff\xfe"}', rpc.PARSE_ERROR, id="bad-utf8"
        ),
        pytest.param(b"", rpc.PARSE_ERROR, id="empty"),
        pytest.param(b" \n\t ", rpc.PARSE_ERROR, id="blank"),
        pytest.param(b"[" * DEEP + b"]" * DEEP, rpc.PARSE_ERROR, id="arrays-100k-deep"),
        pytest.param(b'{"a":' * DEEP + b"1" + b"}" * DEEP, rpc.PARSE_ERROR, id="objects-100k-deep"),
        pytest.param(
            b'{"jsonrpc":"2.0","id":1,"method":"note","params":{"text":"x","n":'
            + b"[" * 900
            + b"]" * 900
            + b"}}",
            rpc.INVALID_REQUEST,
            id="params-900-deep",
        ),
        pytest.param(b"9" * 5000, rpc.PARSE_ERROR, id="int-5000-digits"),
        pytest.param(
            b'{"jsonrpc":"2.0","id":' + b"9" * 5000 + b',"method":"node.info"}',
            rpc.PARSE_ERROR,
            id="id-5000-digits",
        ),
        pytest.param(b"null", rpc.INVALID_REQUEST, id="null"),
        pytest.param(b'"node.info"', rpc.INVALID_REQUEST, id="string"),
        pytest.param(b"1e999999", rpc.INVALID_REQUEST, id="float-overflow"),
        pytest.param(b"NaN", rpc.INVALID_REQUEST, id="nan"),
        pytest.param(call("node.info", ident=1e999), rpc.INVALID_REQUEST, id="id-infinity"),
        pytest.param(
            b'{"jsonrpc":"2.0","id":NaN,"method":"node.info"}', rpc.INVALID_REQUEST, id="id-nan"
        ),
        pytest.param(call("node.info", ident=1.5), rpc.INVALID_REQUEST, id="id-float"),
        pytest.param(call("node.info", ident=True), rpc.INVALID_REQUEST, id="id-bool"),
        pytest.param(call("node.info", ident=[1]), rpc.INVALID_REQUEST, id="id-list"),
        pytest.param(call("node.info", ident={"a": 1}), rpc.INVALID_REQUEST, id="id-object"),
        pytest.param(call(7), rpc.INVALID_REQUEST, id="method-int"),
        pytest.param(call(None), rpc.INVALID_REQUEST, id="method-null"),
        pytest.param(call(["node.info"]), rpc.INVALID_REQUEST, id="method-list"),
        pytest.param(call("node.info", "x"), rpc.INVALID_PARAMS, id="params-string"),
        pytest.param(call("node.info", 5), rpc.INVALID_PARAMS, id="params-int"),
        pytest.param(
            b'{"jsonrpc":"1.0","id":1,"method":"node.info"}', rpc.INVALID_REQUEST, id="jsonrpc-1.0"
        ),
        pytest.param(
            b'{"jsonrpc":2.0,"id":1,"method":"node.info"}', rpc.INVALID_REQUEST, id="jsonrpc-number"
        ),
        pytest.param(
            b'{"jsonrpc":"2.0","id":1,"method":"\\ud800"}',
            rpc.METHOD_NOT_FOUND,
            id="lone-surrogate",
        ),
        pytest.param(call("x" * 500_000), rpc.METHOD_NOT_FOUND, id="method-500k-chars"),
    ],
)
async def test_a_bad_body_gets_a_json_rpc_error_and_the_connection_lives_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, body: bytes, code: int
) -> None:
    with trio.fail_after(CAP_S):
        async with running_node(tmp_path) as node:
            before = graph_state(node)
            conn = await unix(node)
            await conn.send(http(body))
            answer = await conn.reply()
            assert answer.status == 200, answer
            error = answer.json()["error"]
            assert error["code"] == code, error
            assert error["message"]
            assert len(answer.body) < 2000  # the error does not echo the request back
            # keep-alive: the same connection serves a good request next
            await conn.send(http(call("node.info")))
            assert (await conn.reply()).json()["result"]["peer_id"] == node.peer_id
            await conn.aclose()
            await assert_unharmed(node, before)
    no_rpc_failures(caplog)


async def test_a_batch_of_junk_gets_one_error_per_entry(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    junk = [1, "x", None, [], {}, {"jsonrpc": "2.0"}, {"jsonrpc": "2.0", "id": 7, "method": 3}]
    with trio.fail_after(CAP_S):
        async with running_node(tmp_path) as node:
            before = graph_state(node)
            conn = await unix(node)
            await conn.send(http(json.dumps(junk).encode()))
            answers = (await conn.reply()).json()
            assert [a["error"]["code"] for a in answers] == [rpc.INVALID_REQUEST] * len(junk)
            assert answers[-1]["id"] == 7
            # a batch inside a batch is one invalid entry, not a recursion
            await conn.send(http(json.dumps([[json.loads(call("note", {"text": "x"}))]]).encode()))
            assert (await conn.reply()).json()[0]["error"]["code"] == rpc.INVALID_REQUEST
            await conn.aclose()
            await assert_unharmed(node, before)
    no_rpc_failures(caplog)


async def test_text_that_utf8_cannot_encode_still_gets_an_answer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """JSON may hold lone surrogates (``"\\ud800"``); echoing one back must not crash the answer."""
    with trio.fail_after(CAP_S):
        async with running_node(tmp_path) as node:
            before = graph_state(node)
            conn = await unix(node)
            await conn.send(http(b'{"jsonrpc":"2.0","id":"\\ud800","method":"node.info"}'))
            answer = (await conn.reply()).json()
            assert answer["id"] == "\ud800"
            assert answer["result"]["peer_id"] == node.peer_id
            await conn.send(http(b'{"jsonrpc":"2.0","id":"\\udfff","method":"no.such"}'))
            answer = (await conn.reply()).json()
            assert answer["error"]["code"] == rpc.METHOD_NOT_FOUND
            await conn.aclose()
            await assert_unharmed(node, before)
    no_rpc_failures(caplog)


# -- wrong types for every kind of param ---------------------------------------------

ID = "ab" * 32
WRONG: dict[str, list[Any]] = {
    # values of every JSON type, and in-type values out of range, for each kind of param
    "id": [None, 1, 1.5, True, [], {}, "", "zz" * 32, "ab" * 31, "ab" * 33, "AB" * 32 + "!"],
    "opt_id": [1, 1.5, True, [], {}, "", "zz" * 32, "ab" * 31],
    "int": [None, "1", 1.5, True, False, [], {}, -1, 2**63, 2**200, float("inf")],
    "number": [None, "1", True, [], {}, -1, 61, 2**200, float("nan"), float("inf")],
    "str": [None, 1, 1.5, True, [], {}, ""],
    "bool": [None, 0, 1, "true", [], {}],
}
PARAMS: list[tuple[str, str, str]] = [
    ("ops.get", "id", "id"),
    ("ops.history", "id", "id"),
    ("ops.history", "limit", "int"),
    ("proposal.show", "proposal", "id"),
    ("proposal.show", "now_ms", "int"),
    ("mandate.show", "mandate", "id"),
    ("mandates.history", "delegate", "id"),
    ("council.show", "council", "id"),
    ("aid.allocation", "offer", "id"),
    ("aid.coverage", "request", "id"),
    ("lot.show", "lot", "id"),
    ("ledger.balances", "cell", "opt_id"),
    ("pulse.frustrations", "cell", "opt_id"),
    ("ledger.entries", "resource", "str"),
    ("events.poll", "cursor", "int"),
    ("events.poll", "limit", "int"),
    ("events.poll", "timeout_s", "number"),
    ("proposals.list", "now_ms", "int"),
    ("alerts.active", "now_ms", "int"),
    ("pulse.metrics", "step_ms", "int"),
    ("pulse.metrics", "end_ms", "int"),
    ("invite.create", "card", "str"),
    ("invite.create", "expires_ms", "int"),
    ("node.offline", "offline", "bool"),
]
CARD = encode_card(
    CellCard(
        "newcomer",
        (bytes(SigningKey.generate().verify_key),),
        (bytes(SigningKey.generate().verify_key),),
    )
)
"""A good card: invite.create then gets as far as its ``expires_ms``."""
REQUIRED = {
    "ops.history": {"id": ID},
    "proposal.show": {"proposal": ID},
    "invite.create": {"card": CARD},
}


def _json(value: Any) -> str:
    """JSON as Python's json module writes it, NaN and Infinity included (as a client might)."""
    return json.dumps(value)


async def test_a_wrong_type_for_any_param_is_invalid_params(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cases = [
        (method, {**REQUIRED.get(method, {}), name: value})
        for method, name, kind in PARAMS
        for value in WRONG[kind]
    ]
    with trio.fail_after(CAP_S):
        async with running_node(tmp_path) as node:
            before = graph_state(node)
            conn = await unix(node)
            for method, params in cases:
                body = f'{{"jsonrpc":"2.0","id":1,"method":"{method}","params":{_json(params)}}}'
                await conn.send(http(body.encode()))
                answer = await conn.reply()
                error = answer.json().get("error")
                assert error is not None, (method, params, answer)
                assert error["data"]["reason"] == "invalid_params", (method, params, error)
            await conn.aclose()
            assert node.offline is False
            await assert_unharmed(node, before)
    no_rpc_failures(caplog)


ACTION_BODIES: list[dict[str, Any]] = [
    {"text": 1.5},
    {"text": float("nan")},
    {"text": ["x"] * 2000},
    {"text": "x" * 200_000},
    {"text": {"nested": {"deeper": {"still": {"more": {"and": {"more": 1}}}}}}},
    {"text": 2**64},
    {"text": -(2**63) - 1},
    {"text": "x", "proposal": "not hex"},
    {"text": "x", "proposal": 5},
    {"text": "x", "cells": ["zz"]},
    {"text": "x", "": 1},
    {"text": "\ud800"},
]


async def test_actions_refuse_bodies_of_the_wrong_shape(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(CAP_S):
        async with running_node(tmp_path) as node:
            before = graph_state(node)
            conn = await unix(node)
            for method in ("note", "proposal.open", "aid.offer", "vote.cast"):
                for params in ACTION_BODIES:
                    body = json.dumps(
                        {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
                    )
                    await conn.send(http(body.encode()))
                    answer = await conn.reply()
                    assert answer.status == 200
                    error = answer.json().get("error")
                    assert error is not None, (method, params)
                    assert error["data"]["reason"] in {"invalid_params", "op_refused"}, error
            await conn.aclose()
            await assert_unharmed(node, before)
    no_rpc_failures(caplog)


# -- too big --------------------------------------------------------------------------


async def test_a_declared_huge_body_is_refused_before_it_is_sent(tmp_path: Path) -> None:
    with trio.fail_after(CAP_S):
        async with running_node(tmp_path) as node:
            before = graph_state(node)
            conn = await unix(node)
            await conn.send(http(b"", headers=[("Content-Length", str(10 << 30))], length=False))
            answer = await conn.reply()  # no byte of the body was sent: the node did not wait
            assert answer.status == 413
            assert "at most" in answer.json()["error"]
            assert await conn.closed()
            await assert_unharmed(node, before)


async def test_a_streamed_huge_body_is_cut_off_and_memory_stays_flat(tmp_path: Path) -> None:
    """64 MiB sent chunked (no length to refuse up front): the node stops reading past 1 MiB."""
    chunk = b"%x\r\n%s\r\n" % (MIB, b" " * MIB)
    process = psutil.Process()
    with trio.fail_after(CAP_S):
        async with running_node(tmp_path) as node:
            before = graph_state(node)
            rss = process.memory_info().rss
            conn = await unix(node)
            await conn.send(http(b"", headers=[("Transfer-Encoding", "chunked")], length=False))
            sent = 0
            with trio.move_on_after(CAP_S / 2):
                try:
                    while sent < 64:
                        await conn.send(chunk)
                        sent += 1
                except trio.BrokenResourceError:
                    pass
            assert sent < 64, "the node read a 64 MiB body to its end"
            answer = await conn.reply()
            assert answer.status == 413
            assert await conn.closed()
            grown = process.memory_info().rss - rss
            assert grown < 24 * MIB, f"RSS grew by {grown / MIB:.0f} MiB"
            await assert_unharmed(node, before)


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: n\r\nX-Pad: " + b"a" * (2 * MIB) + b"\r\n\r\n",
            id="2MiB-header",
        ),
        pytest.param(
            b"POST /" + b"a" * (2 * MIB) + b" HTTP/1.1\r\nHost: n\r\n\r\n", id="2MiB-target"
        ),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: n\r\n" + b"X-Many: 1\r\n" * 200_000 + b"\r\n",
            id="200k-headers",
        ),
    ],
)
async def test_oversized_headers_are_refused(tmp_path: Path, request_bytes: bytes) -> None:
    with trio.fail_after(CAP_S):
        async with running_node(tmp_path) as node:
            before = graph_state(node)
            conn = await unix(node)
            # the node may stop reading before the end (what we want): the send then breaks
            with trio.move_on_after(CAP_S / 2), contextlib.suppress(trio.BrokenResourceError):
                await conn.send(request_bytes)
            answer = await conn.reply()
            assert answer.status in (400, 431), answer
            assert await conn.closed()
            await assert_unharmed(node, before)


# -- HTTP that is ambiguous (request smuggling basics) -------------------------------

SMUGGLED = call("note", {"text": "smuggled"})


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: n\r\nContent-Length: 2\r\nContent-Length: 45\r\n\r\n{}",
            id="two-lengths",
        ),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: n\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0\r\n\r\n" + http(SMUGGLED),
            id="length-and-chunked",
        ),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: n\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
            b"0\r\n\r\n" + http(SMUGGLED),
            id="chunked-and-length",
        ),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: n\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            id="te-gzip-chunked",
        ),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: n\r\nTransfer-Encoding: identity\r\n\r\n", id="te-identity"
        ),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: n\r\nContent-Length: +2\r\n\r\n{}", id="length-plus"
        ),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: n\r\nContent-Length: -1\r\n\r\n", id="length-minus"
        ),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: n\r\nContent-Length: 0x2\r\n\r\n{}", id="length-hex"
        ),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: n\r\nContent-Length : 2\r\n\r\n{}", id="space-before-colon"
        ),
        pytest.param(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", id="http2-preface"),
        pytest.param(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(64), id="tls-hello"),
        pytest.param(b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", id="no-host"),
        pytest.param(b"GARBAGE\r\n\r\n", id="garbage"),
    ],
)
async def test_ambiguous_http_is_refused_and_nothing_is_smuggled(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, request_bytes: bytes
) -> None:
    with trio.fail_after(CAP_S):
        async with running_node(tmp_path) as node:
            before = graph_state(node)
            conn = await unix(node)
            await conn.send(request_bytes)
            answer = await conn.reply()
            assert 400 <= answer.status < 600, answer
            assert await conn.closed(), "after a request it could not read, the node must hang up"
            await assert_unharmed(node, before)  # the smuggled note was never authored
    no_rpc_failures(caplog)


async def test_duplicate_equal_lengths_and_pipelined_requests_are_served_in_order(
    tmp_path: Path,
) -> None:
    with trio.fail_after(CAP_S):
        async with running_node(tmp_path) as node:
            before = graph_state(node)
            conn = await unix(node)
            body = call("node.info", ident=1)
            same = f"Content-Length: {len(body)}\r\n".encode()
            await conn.send(
                b"POST / HTTP/1.1\r\nHost: n\r\n" + same + same + b"\r\n" + body
                + http(call("rpc.methods", ident=2)) + http(call("node.status", ident=3))
            )  # fmt: skip
            ids = [(await conn.reply()).json()["id"] for _ in range(3)]
            assert ids == [1, 2, 3]
            await conn.aclose()
            await assert_unharmed(node, before)


# -- many clients ----------------------------------------------------------------------


async def test_a_second_and_a_hundredth_client_are_served(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(CAP_S):
        async with running_node(tmp_path) as node:
            before = graph_state(node)
            first = await unix(node)
            await first.send(http(call("node.info")))
            assert (await first.reply()).status == 200
            # a second client while the first keeps its connection open
            second = await unix(node)
            await second.send(http(call("node.status")))
            assert (await second.reply()).status == 200
            await second.aclose()
            await first.send(http(call("node.info")))
            assert (await first.reply()).status == 200
            await first.aclose()

            # a hundred clients, 32 at a time, each connects, calls, hangs up
            answered = []
            gate = trio.Semaphore(32)

            async def client(i: int) -> None:
                async with gate:
                    conn = await unix(node)
                    await conn.send(http(call("node.info", ident=i)))
                    answered.append((await conn.reply()).json()["id"])
                    await conn.aclose()

            async with trio.open_nursery() as nursery:
                for i in range(100):
                    nursery.start_soon(client, i)
            assert sorted(answered) == list(range(100))

            # no slot leaked: the full capacity is there, held at once
            held = []
            for i in range(rpc.MAX_CLIENTS):
                conn = await unix(node)
                await conn.send(http(call("node.info", ident=i)))
                assert (await conn.reply()).status == 200
                held.append(conn)
            extra = await unix(node)
            await extra.send(http(call("node.info")))
            busy = await extra.reply()
            assert busy.status == 503
            assert "try again" in busy.json()["error"]
            assert await extra.closed()
            # one leaves (asking to close): its slot is free when it sees the close
            leaving = held.pop()
            await leaving.send(http(call("node.info"), headers=[("Connection", "close")]))
            assert (await leaving.reply()).status == 200
            assert await leaving.closed()
            late = await unix(node)
            await late.send(http(call("node.info")))
            assert (await late.reply()).status == 200
            for conn in [*held, late]:
                await conn.aclose()
            await assert_unharmed(node, before)
    no_rpc_failures(caplog)


async def test_tcp_clients_cannot_crowd_out_the_unix_socket(tmp_path: Path) -> None:
    """Every TCP slot held by a client that never finishes its headers (and has no token)
    leaves the Unix socket, the CLI's door, open."""
    with trio.fail_after(CAP_S):
        async with running_node(tmp_path, tcp=True) as node:
            before = graph_state(node)
            crowd = []
            for _ in range(rpc.MAX_CLIENTS):
                conn = await tcp(node)
                await conn.send(b"POST / HTTP/1.1\r\nHost: n\r\n")  # ... and never the rest
                crowd.append(conn)
            await trio.testing.wait_all_tasks_blocked()  # every handler took its slot
            extra = await tcp(node)
            await extra.send(http(call("node.info")))
            assert (await extra.reply()).status == 503  # the TCP door is full indeed
            async with AsyncClient(node.home.root) as client:
                assert (await client.call("node.info"))["peer_id"] == node.peer_id
            for conn in [*crowd, extra]:
                await conn.aclose()
            await assert_unharmed(node, before)


# -- the token on TCP --------------------------------------------------------------------


async def test_tcp_refuses_every_wrong_token_before_any_method(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = rpc.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(rpc.hmac, "compare_digest", spy)
    with trio.fail_after(CAP_S):
        async with running_node(tmp_path, tcp=True) as node:
            before = graph_state(node)
            token = node.home.rpc_token.read_text().strip()
            flipped = token[:-1] + ("A" if token[-1] != "A" else "B")
            wrong: list[list[tuple[str, str]]] = [
                [],
                [("Authorization", "")],
                [("Authorization", "Bearer")],
                [("Authorization", "Bearer ")],
                [("Authorization", f"Bearer {flipped}")],
                [("Authorization", f"Bearer {token[:-1]}")],
                [("Authorization", f"Bearer {token}x")],
                [("Authorization", f"Bearer  {token}")],
                [("Authorization", f"bearer{token}")],
                [("Authorization", f"Basic {token}")],
                [("Authorization", token)],
                [("X-Token", token)],
                [("Authorization", f"Bearer {token.upper()}")],
                [("Authorization", "Bearer " + "\u00e9" * 40)],
            ]
            for headers in wrong:
                conn = await tcp(node)
                await conn.send(http(call("note", {"text": "should not exist"}), headers=headers))
                answer = await conn.reply()
                assert answer.status == 401, headers
                assert token.encode() not in answer.body
                assert "rpc.token" in answer.json()["error"]
                await conn.aclose()
            # the token in the query string is not a token
            conn = await tcp(node)
            body = call("note", {"text": "should not exist"})
            head = (
                f"POST /?token={token} HTTP/1.1\r\nHost: n\r\nContent-Length: {len(body)}\r\n\r\n"
            )
            await conn.send(head.encode() + body)
            assert (await conn.reply()).status == 401
            await conn.aclose()
            assert graph_state(node) == before
            assert compared, "the token was not compared with hmac.compare_digest"
            # the right one works, on the same kind of connection
            conn = await tcp(node)
            await conn.send(http(call("node.info"), headers=[("Authorization", f"Bearer {token}")]))
            assert (await conn.reply()).json()["result"]["peer_id"] == node.peer_id
            await conn.aclose()
            await assert_unharmed(node, before)


# -- clients that go away -----------------------------------------------------------------


async def test_clients_that_hang_up_mid_answer_do_not_hurt_the_node(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # four pulse.metrics calls of 10,000 steps each: an answer of about 0.5 MiB, more than
    # a Unix socket buffers, so the node is still writing when the client goes
    big = [
        {"jsonrpc": "2.0", "id": i, "method": "pulse.metrics",
         "params": {"start_ms": 0, "end_ms": 10_000 * 60_000, "step_ms": 60_000}}
        for i in range(4)
    ]  # fmt: skip
    body = json.dumps(big).encode()
    with trio.fail_after(CAP_S):
        async with running_node(tmp_path) as node:
            before = graph_state(node)
            for i in range(10):
                conn = await unix(node)
                await conn.send(http(body))
                if i % 2:
                    assert await conn._more()  # the answer has started
                await conn.aclose()  # ... and we are gone
            # one that stays reads it whole
            conn = await unix(node)
            await conn.send(http(body))
            answer = await conn.reply()
            assert len(answer.body) > MIB // 2
            assert [a["id"] for a in answer.json()] == list(range(4))
            await conn.aclose()
            # and one that goes away before sending its whole request
            conn = await unix(node)
            await conn.send(http(body)[: len(body) // 2])
            await conn.aclose()
            await assert_unharmed(node, before)
    no_rpc_failures(caplog)


# -- time limits, on the mock clock ------------------------------------------------------


async def _echo(method: str, params: Any) -> Any:
    if method == "big":
        return "x" * (4 * MIB)
    return {"method": method}


class Served:
    """When ``serve_http`` returned (it closed the connection), if it did."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.at = -1.0


@asynccontextmanager
async def http_server(
    pair: tuple[trio.abc.Stream, trio.abc.Stream],
) -> AsyncIterator[tuple[Conn, Served]]:
    """``serve_http`` on one end of ``pair``; yields the other end and its :class:`Served`."""
    client, server = pair
    served = Served()

    async def serve() -> None:
        await rpc.serve_http(server, _echo, None, trio.CapacityLimiter(1))
        served.at = trio.current_time()
        served.done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        yield Conn(client), served


async def test_a_slowloris_client_is_cut_off(autojump_clock: trio.testing.MockClock) -> None:
    """Headers trickled a byte at a time, each byte well within the idle timeout: the request
    as a whole still has a deadline."""
    request = http(call("node.info"))
    gap = rpc.IDLE_S / 3
    async with http_server(trio.testing.memory_stream_pair()) as (conn, served):
        start = trio.current_time()
        for byte in request[:-1]:  # never the last byte
            if served.done.is_set():
                break
            try:
                await conn.send(bytes([byte]))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                break
            await trio.sleep(gap)
        assert served.done.is_set(), "the trickle was never cut off"
        assert await conn.closed()
        await served.done.wait()
        assert served.at - start <= rpc.REQUEST_S + gap


async def test_a_request_within_its_deadline_is_served_after_a_pause(
    autojump_clock: trio.testing.MockClock,
) -> None:
    request = http(call("node.info"))
    async with http_server(trio.testing.memory_stream_pair()) as (conn, served):
        await conn.send(request[:20])
        await trio.sleep(rpc.REQUEST_S / 2)
        await conn.send(request[20:])
        assert (await conn.reply()).json()["result"] == {"method": "node.info"}
        # then idle: closed after IDLE_S, not before
        idle_from = trio.current_time()
        assert await conn.closed()
        await served.done.wait()
        assert served.at - idle_from == pytest.approx(rpc.IDLE_S, abs=1)


async def test_a_client_that_never_reads_its_answer_is_dropped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with http_server(trio.testing.lockstep_stream_pair()) as (conn, served):
        start = trio.current_time()
        await conn.send(http(call("big")))
        with trio.move_on_after(10 * rpc.IDLE_S):
            await served.done.wait()
        assert served.done.is_set(), "the server waited forever on a client that does not read"
        assert served.at - start <= rpc.SEND_S + 1
