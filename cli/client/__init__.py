"""Talk to a running node from Python: ``archipel.client``.

::

    from archipel.client import Client

    with Client() as node:                      # the node of $ARCHIPEL_HOME or the default home
        print(node.call("node.info")["cell"])
        made = node.call("proposal.open", title="Buy a van", text="...", options=["yes", "no"])
        for event in node.events():             # every op, from the start, then live
            print(event["kind"], event["id"])

:class:`Client` is synchronous; :class:`AsyncClient` is the same for trio or
asyncio code. Both speak JSON-RPC 2.0 over HTTP to the node's Unix socket
(or to ``http://127.0.0.1:PORT`` with the token, see docs/rpc.md). A method's
error arrives as :class:`RpcError` with ``code``, ``message`` and ``reason``;
no node to talk to is :class:`NodeUnreachable`.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx

from archipel.crdt import ArchipelError
from archipel.daemon.paths import Home

__all__ = ["AsyncClient", "Client", "NodeUnreachable", "RpcError"]

DEFAULT_TIMEOUT_S = 30.0
POLL_WAIT_S = 25.0


class NodeUnreachable(ArchipelError):
    """No node answers at the address (not running, or another directory)."""


class RpcError(ArchipelError):
    """The node answered the call with an error."""

    def __init__(self, code: int, message: str, reason: str, detail: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.detail = detail


def _target(home: str | Path | None, url: str | None) -> tuple[str, Path | None, str]:
    """(base url, unix socket or None, where: for messages)."""
    if url is not None:
        return url.rstrip("/") + "/", None, url
    where = Home.resolve(home)
    return "http://archipel/", where.rpc_socket, str(where.root)


def _wait_of(params: dict[str, Any]) -> float:
    """How long the node may hold the call (a long poll): added to the HTTP timeout."""
    wait = params.get("timeout_s", 0)
    return float(wait) if isinstance(wait, int | float) and 0 < wait < 3600 else 0.0


def _request(method: str, params: dict[str, Any], ident: int) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": ident, "method": method, "params": params}


def _result(response: httpx.Response, where: str) -> Any:
    if response.status_code == 401:
        raise NodeUnreachable(f"the node at {where} refused the token (see rpc.token)")
    if response.status_code != 200:
        raise NodeUnreachable(f"the node at {where} answered HTTP {response.status_code}")
    answer = response.json()
    error = answer.get("error")
    if error is not None:
        data = error.get("data") or {}
        raise RpcError(
            error.get("code", 0),
            error.get("message", ""),
            data.get("reason", ""),
            data.get("detail"),
        )
    return answer.get("result")


def _unreachable(where: str, exc: Exception) -> NodeUnreachable:
    return NodeUnreachable(
        f"no node running in {where} ({type(exc).__name__}): start one with 'archipel run'"
    )


class Client:
    """A synchronous client of one node."""

    def __init__(
        self,
        home: str | Path | None = None,
        *,
        url: str | None = None,
        token: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self._url, uds, self.where = _target(home, url)
        headers = {"authorization": f"Bearer {token}"} if token else {}
        transport = httpx.HTTPTransport(uds=str(uds)) if uds is not None else None
        self._http = httpx.Client(transport=transport, headers=headers, timeout=timeout_s)
        self._ids = itertools.count(1)

    def call(self, method: str, /, **params: Any) -> Any:
        """Call ``method`` with named params; returns its result or raises :class:`RpcError`."""
        body = _request(method, params, next(self._ids))
        wait = _wait_of(params)
        try:
            response = self._http.post(self._url, json=body, timeout=DEFAULT_TIMEOUT_S + wait)
        except httpx.TransportError as exc:
            raise _unreachable(self.where, exc) from None
        return _result(response, self.where)

    def events(self, cursor: int = 0, *, follow: bool = True) -> Iterator[dict[str, Any]]:
        """Every op stored after ``cursor``; with ``follow``, then new ones as they come.

        Each event carries its ``cursor``: keep the last one to resume later."""
        while True:
            page = self.call("events.poll", cursor=cursor, timeout_s=POLL_WAIT_S if follow else 0)
            yield from page["events"]
            cursor = page["cursor"]
            if not follow and not page["events"]:
                return

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """The same as :class:`Client`, for async code (trio or asyncio)."""

    def __init__(
        self,
        home: str | Path | None = None,
        *,
        url: str | None = None,
        token: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self._url, uds, self.where = _target(home, url)
        headers = {"authorization": f"Bearer {token}"} if token else {}
        transport = httpx.AsyncHTTPTransport(uds=str(uds)) if uds is not None else None
        self._http = httpx.AsyncClient(transport=transport, headers=headers, timeout=timeout_s)
        self._ids = itertools.count(1)

    async def call(self, method: str, /, **params: Any) -> Any:
        body = _request(method, params, next(self._ids))
        wait = _wait_of(params)
        try:
            response = await self._http.post(self._url, json=body, timeout=DEFAULT_TIMEOUT_S + wait)
        except httpx.TransportError as exc:
            raise _unreachable(self.where, exc) from None
        return _result(response, self.where)

    async def events(
        self, cursor: int = 0, *, follow: bool = True
    ) -> AsyncIterator[dict[str, Any]]:
        while True:
            wait = POLL_WAIT_S if follow else 0
            page = await self.call("events.poll", cursor=cursor, timeout_s=wait)
            for event in page["events"]:
                yield event
            cursor = page["cursor"]
            if not follow and not page["events"]:
                return

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
