"""The local RPC: JSON-RPC 2.0 over HTTP/1.1, on a Unix socket and (optionally) localhost TCP.

Theory of operation. Scripts talk to their node the way they talk to geth or
bitcoind: a ``POST /`` whose body is a JSON-RPC 2.0 request (or a batch), the
answer a JSON-RPC response. Two doors:

- ``rpc.sock`` in the node's directory, mode 0600: whoever can open it is the
  node's user; no token. ``curl --unix-socket ~/.local/share/archipel/rpc.sock``.
- ``127.0.0.1:<rpc.tcp_port>`` when the config asks for it: every request
  needs ``Authorization: Bearer <token>``, the token being in ``rpc.token``
  (mode 0600) in the node's directory. Anything else is a 401 and reaches no
  method.

HTTP is parsed by h11; bodies are capped at :data:`MAX_BODY`, batches at
:data:`MAX_BATCH`, JSON nesting at :data:`MAX_DEPTH`. Every wait on a client
is bounded: a request must arrive whole within :data:`REQUEST_S` of its first
byte (a slowloris client is cut off), an answer must be taken within
:data:`SEND_S`, an idle connection is closed after :data:`IDLE_S`. Each door
serves at most :data:`MAX_CLIENTS` connections at once, so clients of the TCP
port, even without the token, cannot crowd out the Unix socket. A request
whose framing is ambiguous (both ``Content-Length`` and ``Transfer-Encoding``)
or unreadable is refused and its connection closed, as is one without the
token. What the methods are and what they return is
:mod:`archipel.daemon.methods`.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import secrets
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h11
import trio

from archipel.crdt import ArchipelError

from .logs import fields
from .paths import HomeError

if TYPE_CHECKING:
    # py-libp2p pulls in trio-typing, whose trio-stubs shadow trio's own annotations;
    # TaskStatus lives in trio_typing there.
    from trio_typing import TaskStatus

log = logging.getLogger("archipel.rpc")

MAX_BODY = 1 << 20
MAX_BATCH = 100
MAX_DEPTH = 32
"""JSON nesting a request may have (op bodies nest far less)."""
MAX_MESSAGE_CHARS = 1000
"""Error messages are cut there: one that quotes a huge input does not grow with it."""
IDLE_S = 300.0
"""A connection that waits for its next request is closed after this long."""
REQUEST_S = 30.0
"""A request (headers and body) must arrive whole within this long of its first byte."""
SEND_S = 30.0
"""A client must take its answer within this long, or the connection is dropped."""
MAX_CLIENTS = 64
"""Connections served at once on each door (the Unix socket; the TCP port)."""

# JSON-RPC 2.0 codes, and ours in the server range.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
OP_REFUSED = -32001
NOT_FOUND = -32002
UNAVAILABLE = -32003


class RpcError(ArchipelError):
    """An error a method returns to its caller: a code, a message and a machine-readable reason."""

    def __init__(self, code: int, message: str, reason: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.data = data

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"reason": self.reason}
        if self.data is not None:
            data["detail"] = self.data
        message = self.message
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS] + "…"
        return {"code": self.code, "message": message, "data": data}


def invalid_params(message: str) -> RpcError:
    return RpcError(INVALID_PARAMS, message, "invalid_params")


Dispatch = Callable[[str, Any], Awaitable[Any]]


async def handle_payload(body: bytes, dispatch: Dispatch) -> bytes | None:
    """One HTTP body in, the JSON-RPC answer out (``None`` for notifications only)."""
    request, problem = _parse(body)
    if problem is not None:
        return _dump(_error(None, problem))
    if isinstance(request, list):
        answers = []
        for item in request:
            answers.append(await _one(item, dispatch))
            await trio.lowlevel.checkpoint()  # a batch of heavy queries lets the node breathe
        present = [a for a in answers if a is not None]
        return _dump(present) if present else None
    answer = await _one(request, dispatch)
    return None if answer is None else _dump(answer)


def _parse(body: bytes) -> tuple[Any, RpcError | None]:
    """The request or batch in ``body``, or the error that answers it."""
    try:
        request = json.loads(body)
    except RecursionError:  # the parser's own limit: far deeper than MAX_DEPTH
        message = f"not JSON this server reads: nested deeper than {MAX_DEPTH} levels"
        return None, RpcError(PARSE_ERROR, message, "parse_error")
    except (ValueError, UnicodeDecodeError) as exc:
        return None, RpcError(PARSE_ERROR, f"not JSON: {exc}", "parse_error")
    if _nested_deeper(request, MAX_DEPTH):
        return None, _bad_request(f"the request is nested deeper than {MAX_DEPTH} levels")
    if isinstance(request, list) and not request:
        return None, _bad_request("empty batch")
    if isinstance(request, list) and len(request) > MAX_BATCH:
        return None, _bad_request(f"a batch holds at most {MAX_BATCH} calls")
    return request, None


def _nested_deeper(value: Any, limit: int) -> bool:
    """Whether ``value`` nests lists and objects deeper than ``limit`` (without recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _bad_request(message: str) -> RpcError:
    return RpcError(INVALID_REQUEST, message, "invalid_request")


async def _one(request: Any, dispatch: Dispatch) -> dict[str, Any] | None:
    if not isinstance(request, dict) or request.get("jsonrpc") != "2.0":
        return _error(None, _bad_request("not a JSON-RPC 2.0 request"))
    ident = request.get("id")
    notification = "id" not in request
    method = request.get("method")
    params = request.get("params", {})
    problem = None
    if ident is not None and (isinstance(ident, bool) or not isinstance(ident, str | int)):
        ident, problem = None, _bad_request("id must be a string or an integer")
    elif not isinstance(method, str):
        problem = _bad_request("method must be a string")
    elif not isinstance(params, dict):
        problem = invalid_params("params must be an object (named parameters)")
    if problem is not None:
        return _error(ident, problem)
    assert isinstance(method, str)
    try:
        result = await dispatch(method, params)
    except RpcError as exc:
        return None if notification else _error(ident, exc)
    except Exception:
        log.exception("RPC method failed", **fields(method=method))
        problem = RpcError(INTERNAL_ERROR, "internal error (see the node's log)", "internal")
        return None if notification else _error(ident, problem)
    return None if notification else {"jsonrpc": "2.0", "id": ident, "result": result}


def _error(ident: Any, exc: RpcError) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": ident, "error": exc.to_json()}


def _dump(value: Any) -> bytes:
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode()
    except UnicodeEncodeError:  # a lone surrogate ("\ud800" is valid JSON, not UTF-8): escape
        return json.dumps(value, separators=(",", ":")).encode()


# -- HTTP ------------------------------------------------------------------------


async def serve_http(
    stream: trio.abc.Stream, dispatch: Dispatch, token: str | None, limit: trio.CapacityLimiter
) -> None:
    """Serve one HTTP connection (keep-alive) until it closes, idles or misbehaves."""
    async with stream:
        if limit.available_tokens == 0:
            message = f"the node already serves {MAX_CLIENTS} clients here: try again"
            await _respond_last(h11.Connection(h11.SERVER), stream, 503, message)
            return
        async with limit:
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
            while True:
                try:
                    request, body = await _read_request(conn, stream)
                except _Done:
                    return
                except _Reject as rejected:
                    await _respond_last(conn, stream, rejected.status, rejected.message)
                    return
                status, answer = await _route(request, body, dispatch, token)
                try:
                    with trio.fail_after(SEND_S):
                        await _respond(conn, stream, status, answer, close=status == 401)
                except (
                    trio.TooSlowError,
                    trio.BrokenResourceError,
                    trio.ClosedResourceError,
                    h11.LocalProtocolError,
                ):
                    return
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                try:
                    conn.start_next_cycle()
                except h11.LocalProtocolError:
                    return


class _Done(Exception):
    pass


class _Reject(Exception):
    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message


async def _read_request(conn: h11.Connection, stream: trio.abc.Stream) -> tuple[h11.Request, bytes]:
    """The next request: waits up to IDLE_S for it to begin, then REQUEST_S for all of it."""
    request: h11.Request | None = None
    body = bytearray()
    deadline: float | None = None  # set by the first byte of this request
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise _Reject(exc.error_status_hint, f"bad HTTP: {exc}") from None
        if event is h11.NEED_DATA:
            data = await _receive(stream, deadline)
            if deadline is None:
                deadline = trio.current_time() + REQUEST_S
            conn.receive_data(data)
            if not data and request is None:
                raise _Done
        elif isinstance(event, h11.Request):
            _check_framing(event)
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                raise _Reject(413, f"the body may hold at most {MAX_BODY} bytes")
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            return request, bytes(body)
        elif isinstance(event, h11.ConnectionClosed | h11.PAUSED):
            raise _Done


async def _receive(stream: trio.abc.Stream, deadline: float | None) -> bytes:
    """More bytes: before ``deadline`` (408) once a request has begun, else within IDLE_S."""
    until = deadline if deadline is not None else trio.current_time() + IDLE_S
    data = b""
    with trio.move_on_at(until) as waited:
        try:
            data = bytes(await stream.receive_some(65536))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise _Done from None
    if not waited.cancelled_caught:
        return data
    if deadline is not None:
        raise _Reject(408, f"the request did not arrive whole within {REQUEST_S:g} s")
    raise _Done


def _check_framing(request: h11.Request) -> None:
    length = _header(request, b"content-length")
    if length is not None and _header(request, b"transfer-encoding") is not None:
        # RFC 9112 6.1: ambiguous framing, the classic request-smuggling vector
        raise _Reject(400, "both Content-Length and Transfer-Encoding: send one")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
        raise _Reject(413, f"the body may hold at most {MAX_BODY} bytes")


def _header(request: h11.Request, name: bytes) -> bytes | None:
    for key, value in request.headers:
        if key.lower() == name:
            return bytes(value)
    return None


async def _route(
    request: h11.Request, body: bytes, dispatch: Dispatch, token: str | None
) -> tuple[int, bytes]:
    if token is not None:
        given = _header(request, b"authorization") or b""
        expected = f"Bearer {token}".encode()
        if not hmac.compare_digest(given, expected):
            return 401, _dump({"error": "missing or wrong bearer token (see rpc.token)"})
    if request.target.split(b"?")[0] not in (b"/", b"/rpc"):
        return 404, _dump({"error": "POST JSON-RPC 2.0 requests to /"})
    if request.method != b"POST":
        return 405, _dump({"error": "use POST with a JSON-RPC 2.0 body"})
    answer = await handle_payload(body, dispatch)
    return (200, answer) if answer is not None else (204, b"")


async def _respond_last(
    conn: h11.Connection, stream: trio.abc.Stream, status: int, message: str
) -> None:
    """A last answer (an error), then the caller hangs up; a client that is gone is no error."""
    with trio.move_on_after(SEND_S), contextlib.suppress(Exception):
        await _respond(conn, stream, status, _dump({"error": message}), close=True)


async def _respond(
    conn: h11.Connection, stream: trio.abc.Stream, status: int, body: bytes, *, close: bool = False
) -> None:
    headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
    if close:
        headers.append(("connection", "close"))
    out = conn.send(h11.Response(status_code=status, headers=headers))
    out = (out or b"") + (conn.send(h11.Data(data=body)) or b"") if body else out or b""
    out += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(out)


# -- listeners -------------------------------------------------------------------


def load_or_create_token(path: Path) -> str:
    """The TCP bearer token, created on first use (mode 0600).

    A token file that other users may read (or that is not a plain file, or holds no
    usable token) is replaced by a new token: whoever read it could act as this node's
    member. The replacement is logged.
    """
    try:
        info = path.lstat()
    except FileNotFoundError:
        info = None
    if info is not None:
        token = ""
        if stat.S_ISREG(info.st_mode) and not info.st_mode & 0o077:
            token = path.read_bytes()[:1024].decode("ascii", "replace").strip()
            if len(token) >= 32 and token.isascii() and token.isprintable():
                return token
        if stat.S_ISDIR(info.st_mode):
            raise HomeError(f"{path} is a directory: the RPC token file cannot be made there")
        why = "readable by other users" if info.st_mode & 0o077 else "unusable"
        log.warning("rpc.token replaced by a new token", **fields(path=str(path), why=why))
        path.unlink()
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, (token + "\n").encode())
    finally:
        os.close(fd)
    return token


async def open_unix_listener(path: Path) -> trio.SocketListener:
    """A Unix socket only this user may connect to (created under umask 077)."""
    if path.exists() or path.is_symlink():
        path.unlink()  # a stale socket: the node lock says no other node runs here
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o077)
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(64)
    return trio.SocketListener(sock)


async def serve(
    listeners: list[tuple[trio.SocketListener, str | None]],
    dispatch: Dispatch,
    *,
    task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve every listener (each with its token, or None) until cancelled.

    Each listener has its own :data:`MAX_CLIENTS` slots.
    """
    async with trio.open_nursery() as nursery:
        for listener, token in listeners:
            limit = trio.CapacityLimiter(MAX_CLIENTS)

            async def handler(
                stream: trio.SocketStream,
                token: str | None = token,
                limit: trio.CapacityLimiter = limit,
            ) -> None:
                try:
                    await serve_http(stream, dispatch, token, limit)
                except Exception:  # one client's trouble never stops the server
                    log.exception("RPC connection failed")

            nursery.start_soon(_accept, listener, handler)
        task_status.started()


async def _accept(
    listener: trio.SocketListener, handler: Callable[[trio.SocketStream], Awaitable[None]]
) -> None:
    async with listener:
        await trio.serve_listeners(handler, [listener])
