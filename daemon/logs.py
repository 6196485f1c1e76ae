"""Structured logs: a message plus named fields, for people or for machines.

Code logs with fields in ``extra={"fields": {...}}`` (see :func:`fields`)::

    log.info("connected", **fields(peer=peer_id, via="mdns"))

``human`` (the default) prints ``12:03:04 INFO  archipel.node  connected peer=12D3.. via=mdns``;
``json`` prints one object per line (``ts``, ``level``, ``logger``, ``msg`` and
the fields). libp2p's logger is routed into the same handler.

A private key never reaches a log line through a field or a ``%s`` argument:
``str()`` of a nacl ``SigningKey``, ``PrivateKey``, ``SecretBox`` or ``Box`` is
the raw key, so such objects are shown as ``<secret>`` (public keys as hex).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

import nacl.public
import nacl.signing
import nacl.utils

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
LEVELS["error"] = logging.ERROR


def fields(**values: object) -> dict[str, Any]:
    """Keyword arguments for a logging call that carry structured fields."""
    return {"extra": {"fields": values}}


def _fields_of(record: logging.LogRecord) -> Mapping[str, object]:
    values = getattr(record, "fields", None)
    return values if isinstance(values, Mapping) else {}


def _shown(value: object) -> object:
    """What a log may show of ``value``: a key object's public half, never its private one."""
    if isinstance(value, nacl.signing.VerifyKey | nacl.public.PublicKey):
        return bytes(value)
    if isinstance(value, nacl.utils.StringFixer):  # str() of these is the raw private key
        return "<secret>"
    return value


def _text(value: object) -> str:
    value = _shown(value)
    if isinstance(value, bytes):
        return value.hex()[:16]
    return str(value)


def _message(record: logging.LogRecord) -> str:
    """``record.getMessage()``, with key objects in its arguments shown safely."""
    args = record.args
    if isinstance(args, tuple):
        args = tuple(_shown(a) for a in args)
    elif isinstance(args, Mapping):
        args = {k: _shown(v) for k, v in args.items()}
    message = str(record.msg)
    return message % args if args else message


def _json_default(value: object) -> str:
    return str(_shown(value))


class HumanFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        parts = [f"{stamp} {record.levelname:<7} {record.name:<18} {_message(record)}"]
        parts += [f"{k}={_text(v)}" for k, v in _fields_of(record).items()]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": _message(record),
        }
        for key, raw in _fields_of(record).items():
            value = _shown(raw)
            data.setdefault(key, _text(value) if isinstance(value, bytes) else value)
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, default=_json_default)


_configured = False


def configured() -> bool:
    """Whether :func:`setup` ran in this process (a running node logs; a client command not)."""
    return _configured


def setup(fmt: str = "human", level: str = "info", stream: TextIO | None = None) -> None:
    """Send every log record (ours and libp2p's) to ``stream`` in ``fmt``."""
    global _configured  # noqa: PLW0603 (one switch per process, set once)
    _configured = True
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else HumanFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(LEVELS.get(level, logging.INFO))
    # py-libp2p's import installs its own handlers and stops propagation; it is
    # chatty at INFO, so it speaks at WARNING unless we debug.
    lib = logging.getLogger("libp2p")
    for old in list(lib.handlers):
        lib.removeHandler(old)
    lib.propagate = True
    lib.setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
