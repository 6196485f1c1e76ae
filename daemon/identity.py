"""The node's keys and its federation's secret: ``identity.json``, mode 0600.

A node holds two Ed25519 keys:

- the **member key** of the person running it, which signs member acts
  (proposals, votes, grants, ...);
- the **device key**, which signs what the node does on its own (notes,
  alerts) and is also its libp2p peer identity (Noise signs with it under
  libp2p's own domain, ops under ``archipel/op/v1``; see docs/transport.md).

With them: the cell's name and, once the node belongs to one, the
federation's id, name and secret (the secret derives the private-network key
that keeps outsiders from connecting). The file is written atomically (a
temporary file, fsync, rename) so a crash leaves either the old or the new
version. It is not encrypted at rest yet (see docs/node.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import nacl.signing

from archipel.crdt import ArchipelError

FORMAT = 1
SECRET_BYTES = 32


class IdentityError(ArchipelError):
    """``identity.json`` is missing, unreadable, malformed or exposed."""


@dataclass(frozen=True, slots=True)
class Identity:
    cell: str
    member: nacl.signing.SigningKey
    device: nacl.signing.SigningKey
    federation: bytes | None = None
    federation_name: str | None = None
    secret: bytes | None = None
    bootstrap: tuple[str, ...] = ()
    """Addresses learnt from an invite (multiaddrs with /p2p/)."""
    admission: bytes | None = None
    """The ``cell.admit`` op that admits this cell, if it joined by invite."""

    def __repr__(self) -> str:
        # Never the keys nor the secret: the dataclass repr would print the secret's bytes,
        # and str() of a nacl SigningKey is its seed (tests/test_secrets.py checks).
        return (
            f"Identity(cell={self.cell!r}, member={self.member_public.hex()[:16]}, "
            f"device={self.device_public.hex()[:16]}, "
            f"federation={self.federation.hex()[:16] if self.federation else None}, "
            f"federation_name={self.federation_name!r}, "
            f"secret={'<hidden>' if self.secret is not None else None}, "
            f"bootstrap={len(self.bootstrap)} addresses, "
            f"admission={self.admission.hex()[:16] if self.admission else None})"
        )

    @classmethod
    def generate(cls, cell: str) -> Identity:
        return cls(
            cell=cell,
            member=nacl.signing.SigningKey.generate(),
            device=nacl.signing.SigningKey.generate(),
        )

    @property
    def member_public(self) -> bytes:
        return bytes(self.member.verify_key)

    @property
    def device_public(self) -> bytes:
        return bytes(self.device.verify_key)

    @property
    def joined(self) -> bool:
        return self.federation is not None and self.secret is not None

    def snapshot_key(self) -> bytes:
        """The MAC key of the state snapshot: tied to this device, unrelated to its signatures."""
        return hashlib.blake2b(
            bytes(self.device), digest_size=32, person=b"archipel-snap-v1"
        ).digest()

    def with_federation(
        self,
        federation: bytes,
        name: str,
        secret: bytes,
        *,
        bootstrap: tuple[str, ...] = (),
        admission: bytes | None = None,
    ) -> Identity:
        return replace(
            self,
            federation=federation,
            federation_name=name,
            secret=secret,
            bootstrap=bootstrap,
            admission=admission,
        )

    def to_json(self) -> str:
        data: dict[str, Any] = {
            "format": FORMAT,
            "cell": self.cell,
            "member_seed": bytes(self.member).hex(),
            "device_seed": bytes(self.device).hex(),
            "federation": self.federation.hex() if self.federation else None,
            "federation_name": self.federation_name,
            "secret": self.secret.hex() if self.secret else None,
            "bootstrap": list(self.bootstrap),
            "admission": self.admission.hex() if self.admission else None,
        }
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "identity.json") -> Identity:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise IdentityError(f"{where}: not JSON: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise IdentityError(f"{where}: not an Archipel identity of format {FORMAT}")
        try:
            cell = data["cell"]
            if not isinstance(cell, str) or not cell:
                raise ValueError("cell must be a name")
            member = nacl.signing.SigningKey(_hex(data["member_seed"], 32))
            device = nacl.signing.SigningKey(_hex(data["device_seed"], 32))
            federation = _opt_hex(data.get("federation"), 32)
            name = data.get("federation_name")
            if name is not None and not isinstance(name, str):
                raise ValueError("federation_name must be a string")
            secret = _opt_hex(data.get("secret"), SECRET_BYTES)
            bootstrap = data.get("bootstrap", [])
            if not isinstance(bootstrap, list) or not all(isinstance(a, str) for a in bootstrap):
                raise ValueError("bootstrap must be a list of strings")
            admission = _opt_hex(data.get("admission"), 32)
        except (KeyError, ValueError, TypeError) as exc:
            raise IdentityError(f"{where}: malformed: {exc}") from None
        return cls(cell, member, device, federation, name, secret, tuple(bootstrap), admission)


def _hex(value: object, size: int) -> bytes:
    if not isinstance(value, str):
        raise ValueError("expected a hex string")
    raw = bytes.fromhex(value)
    if len(raw) != size:
        raise ValueError(f"expected {size} bytes, got {len(raw)}")
    return raw


def _opt_hex(value: object, size: int) -> bytes | None:
    return None if value is None else _hex(value, size)


def save(path: Path, identity: Identity) -> None:
    """Write atomically, readable by this user only."""
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, identity.to_json().encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load(path: Path) -> Identity:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise IdentityError(
            f"no identity at {path}: run 'archipel init --cell NAME' first"
        ) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise IdentityError(
            f"{path} is readable by other users (mode {stat.S_IMODE(mode):o}); it holds"
            f" private keys: run 'chmod 600 {path}' and check who may have read it"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise IdentityError(f"{path}: cannot read: {exc}") from None
    return Identity.from_json(text, where=str(path))
