"""A LAN discovery node in its own process, for tests across network namespaces.

    python tests/mdns_child.py TAG PEER_HEX ADDR [ADDR ...] [--interface IP]

Prints one JSON object per line on stdout: ``{"ready": service_name}`` once
running, ``{"found": peer_hex, "addrs": [...]}`` for each report,
``{"ignored": service_name, "reason": ...}`` for each LAN service it refused
(from the module's debug log), and ``{"stopped": true}`` after a clean shutdown.
It stops when its stdin closes (the test closes it), so no signal is needed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import trio

from archipel.daemon.mdns import LanDiscovery


def emit(**values: object) -> None:
    sys.stdout.write(json.dumps(values) + "\n")
    sys.stdout.flush()


class _Ignored(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        values = getattr(record, "fields", {})
        if record.getMessage() == "ignored LAN service":
            emit(ignored=values.get("service"), reason=values.get("reason"))


async def main(args: argparse.Namespace) -> None:
    logger = logging.getLogger("archipel.daemon.mdns")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(_Ignored())
    interfaces = args.interface or None
    discovery = LanDiscovery(args.tag, bytes.fromhex(args.peer), args.addrs, interfaces=interfaces)

    def found(peer: bytes, addrs: tuple[str, ...]) -> None:
        emit(found=peer.hex(), addrs=list(addrs))

    stdin = trio.lowlevel.FdStream(os.dup(0))
    async with trio.open_nursery() as nursery:
        await nursery.start(discovery.run, found)
        emit(ready=discovery.service_name)
        while await stdin.receive_some(4096):
            pass
        nursery.cancel_scope.cancel()
    emit(stopped=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("tag")
    parser.add_argument("peer")
    parser.add_argument("addrs", nargs="+")
    parser.add_argument("--interface", action="append")
    trio.run(main, parser.parse_args())
