"""Structured logs: a message plus named fields, for people or for machines.

Code logs with fields in ``extra={"fields": {...}}`` (see :func:`fields`)::

    log.info("connected", **fields(peer=peer_id, via="mdns"))

``human`` (the default) prints ``12:03:04 INFO  archipel.node  connected peer=12D3.. via=mdns``;
``json`` prints one object per line (``ts``, ``level``, ``logger``, ``msg`` and
the fields). libp2p's logger is routed into the same handler.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
LEVELS["error"] = logging.ERROR


def fields(**values: object) -> dict[str, Any]:
    """Keyword arguments for a logging call that carry structured fields."""
    return {"extra": {"fields": values}}


def _fields_of(record: logging.LogRecord) -> Mapping[str, object]:
    values = getattr(record, "fields", None)
    return values if isinstance(values, Mapping) else {}


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.hex()[:16]
    return str(value)


class HumanFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        parts = [f"{stamp} {record.levelname:<7} {record.name:<18} {record.getMessage()}"]
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
            "msg": record.getMessage(),
        }
        for key, value in _fields_of(record).items():
            data.setdefault(key, _text(value) if isinstance(value, bytes) else value)
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def setup(fmt: str = "human", level: str = "info", stream: TextIO | None = None) -> None:
    """Send every log record (ours and libp2p's) to ``stream`` in ``fmt``."""
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
