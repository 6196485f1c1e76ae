"""Cell cards and invite codes: what a new cell hands over, and what it gets back.

Theory of operation. Joining is two messages between people:

1. The new cell runs ``archipel init --cell NAME``, which prints a **cell card**
   (``archipel-card1-...``): the cell's name and its members' and devices'
   public keys. Nothing secret. A checksum catches copy/paste damage.
2. A member of the federation runs ``archipel invite CARD``: their node authors
   the ``cell.admit`` op for those keys and prints an **invite code**
   (``archipel-invite1-...``): the federation's id, name and **secret**, a few
   bootstrap peers, the id of the ``cell.admit`` op (the admission token), an
   expiry, and the inviter's public key, signed by the inviter (Ed25519 over
   ``archipel/invite/v1\\0`` and the body). ``archipel join CODE`` reads it.

The code carries the federation secret: it must travel by a channel both people
trust (in person, an end-to-end encrypted chat), and it expires.

Text form: a prefix, then base32 (RFC 4648, lower case, no padding) of the
canonical msgpack body followed by its checksum or signature. Base32 survives
chats that eat ``_`` or change case, and terminals that wrap lines: decoding
ignores whitespace and case. Each value has exactly one text (canonical msgpack,
canonical base32), so a changed character never decodes to the same code. Every
size is bounded before anything is decoded.

Pure: no I/O, no clock (``now_ms`` is an argument), no randomness.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import nacl.exceptions
import nacl.signing

from archipel.crdt import ArchipelError, InvalidOp, Limits, Value, decode, encode

CARD_PREFIX = "archipel-card1-"
INVITE_PREFIX = "archipel-invite1-"
INVITE_DOMAIN = b"archipel/invite/v1\x00"
CARD_DOMAIN = b"archipel/card/v1\x00"
DEFAULT_LIFETIME_MS = 7 * 24 * 3600 * 1000
"""How long an invite is valid by default (the CLI computes ``expires_ms`` from it)."""

KEY_BYTES = 32
ID_BYTES = 32
SECRET_BYTES = 32
SIGNATURE_BYTES = 64
CHECKSUM_BYTES = 8
MAX_NAME_CHARS = 100
"""Cell names (as in the genesis)."""
MAX_FEDERATION_NAME_CHARS = 200
MAX_KEYS = 256
"""Members, and devices, of one cell (as in the genesis)."""
MAX_BOOTSTRAP = 8
MAX_BOOTSTRAP_ADDRS = 8
MAX_ADDR_CHARS = 128
MAX_EXPIRES_MS = 2**63 - 1

MAX_CARD_BYTES = 20 * 1024  # 512 keys of 33 bytes, a name, headers
MAX_INVITE_BYTES = 10 * 1024  # 8 peers x 8 addresses of 128 characters, keys, names
_MAX_TEXT_CHARS = 64 * 1024  # before whitespace is removed: bounds all the work that follows

_CARD_LIMITS = Limits(
    max_op_bytes=MAX_CARD_BYTES,
    max_depth=2,
    max_items=MAX_KEYS,
    max_str_bytes=4 * MAX_NAME_CHARS,
    max_bin_bytes=KEY_BYTES,
)
_INVITE_LIMITS = Limits(
    max_op_bytes=MAX_INVITE_BYTES,
    max_depth=4,
    max_items=max(MAX_BOOTSTRAP, MAX_BOOTSTRAP_ADDRS, 8),
    max_str_bytes=4 * MAX_FEDERATION_NAME_CHARS,
    max_bin_bytes=KEY_BYTES,
)
_B32_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyz234567")
_CARD_FIELDS = frozenset({"name", "members", "devices"})
_INVITE_FIELDS = frozenset({"fed", "name", "secret", "boot", "admission", "expires", "by"})


class InvalidCode(ArchipelError):
    """A cell card or invite code cannot be used; ``reason`` says why, in words an
    organiser can act on (wrong kind of code, damaged in copying, expired, ...).

    Raised by the decoders for every problem, and by the encoders for values that
    cannot be put in a code.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True, slots=True)
class CellCard:
    """A cell asking to join: its name and its members' and devices' public keys.

    Keys are kept sorted, so two cards with the same keys are equal. Raises
    :class:`InvalidCode` if a field is out of bounds or a key repeats.
    """

    name: str
    members: tuple[bytes, ...]
    devices: tuple[bytes, ...]

    def __post_init__(self) -> None:
        _check_name(self.name, "the cell name", MAX_NAME_CHARS)
        members = _check_keys(self.members, "members", min_count=1)
        devices = _check_keys(self.devices, "devices", min_count=0)
        if set(members) & set(devices):
            raise InvalidCode("a key cannot be both a member's and a device's")
        object.__setattr__(self, "members", members)
        object.__setattr__(self, "devices", devices)


@dataclass(frozen=True, slots=True)
class Invite:
    """What a new cell needs to join a federation (see the module docstring).

    ``bootstrap``: ``(peer public key, multiaddrs)`` pairs to dial first.
    ``admission``: id of the ``cell.admit`` op. ``inviter``: the key that signed.
    """

    federation: bytes
    federation_name: str
    secret: bytes
    bootstrap: tuple[tuple[bytes, tuple[str, ...]], ...]
    admission: bytes
    expires_ms: int
    inviter: bytes

    def __repr__(self) -> str:  # never print the secret by accident
        return (
            f"Invite(federation={self.federation.hex()[:16]}, "
            f"federation_name={self.federation_name!r}, secret=<hidden>, "
            f"bootstrap={len(self.bootstrap)} peers, admission={self.admission.hex()[:16]}, "
            f"expires_ms={self.expires_ms}, inviter={self.inviter.hex()[:16]})"
        )


# -- cards ----------------------------------------------------------------------------------


def encode_card(card: CellCard) -> str:
    """The text form of ``card``: ``archipel-card1-`` and base32."""
    body = encode({"name": card.name, "members": card.members, "devices": card.devices})
    return CARD_PREFIX + _b32(body + _checksum(body))


def decode_card(text: str) -> CellCard:
    """The card in ``text`` (surrounding whitespace, line breaks and case ignored).

    Raises :class:`InvalidCode` with the reason for anything else.
    """
    raw = _unwrap(text, CARD_PREFIX, "cell card", MAX_CARD_BYTES + CHECKSUM_BYTES)
    if len(raw) <= CHECKSUM_BYTES:
        raise InvalidCode("the cell card is too short: was it cut off while copying?")
    body, checksum = raw[:-CHECKSUM_BYTES], raw[-CHECKSUM_BYTES:]
    if _checksum(body) != checksum:
        raise InvalidCode("the cell card is damaged (checksum mismatch): copy it again")
    value = _decode(body, _CARD_LIMITS, "cell card")
    fields = _fields(value, _CARD_FIELDS, "cell card")
    members, devices = fields["members"], fields["devices"]
    card = CellCard(
        _check_name(fields["name"], "the cell name", MAX_NAME_CHARS),
        _check_keys(members, "members", min_count=1),
        _check_keys(devices, "devices", min_count=0),
    )
    if card.members != members or card.devices != devices:
        raise InvalidCode("the cell card's keys are not in canonical (sorted) order")
    return card


def _checksum(body: bytes) -> bytes:
    return hashlib.blake2b(CARD_DOMAIN + body, digest_size=CHECKSUM_BYTES).digest()


# -- invites --------------------------------------------------------------------------------


def make_invite(
    signing_key: nacl.signing.SigningKey,
    *,
    federation: bytes,
    federation_name: str,
    secret: bytes,
    bootstrap: Sequence[tuple[bytes, Sequence[str]]],
    admission: bytes,
    expires_ms: int,
) -> str:
    """Sign an invite with ``signing_key`` (a member's or device's key) and return
    its text form, ``archipel-invite1-...``. Raises :class:`InvalidCode` if a value
    is out of bounds. The caller picks ``expires_ms`` (e.g. now plus
    :data:`DEFAULT_LIFETIME_MS`).
    """
    if not isinstance(signing_key, nacl.signing.SigningKey):
        raise InvalidCode("an invite is signed with an Ed25519 signing key")
    boot = tuple((peer, tuple(addrs)) for peer, addrs in bootstrap)
    invite = Invite(
        federation=federation,
        federation_name=federation_name,
        secret=secret,
        bootstrap=boot,
        admission=admission,
        expires_ms=expires_ms,
        inviter=bytes(signing_key.verify_key),
    )
    _check_invite(invite)
    body = encode(
        {
            "fed": invite.federation,
            "name": invite.federation_name,
            "secret": invite.secret,
            "boot": [[peer, list(addrs)] for peer, addrs in invite.bootstrap],
            "admission": invite.admission,
            "expires": invite.expires_ms,
            "by": invite.inviter,
        }
    )
    if len(body) > MAX_INVITE_BYTES:  # pragma: no cover - the field bounds keep it smaller
        raise InvalidCode("the invite would be too large")
    signature = signing_key.sign(INVITE_DOMAIN + body).signature
    return INVITE_PREFIX + _b32(body + signature)


def read_invite(code: str, now_ms: int) -> Invite:
    """The invite in ``code``, checked: well-formed, signed by its inviter's key,
    not expired at ``now_ms``. Whitespace, line breaks and case are ignored.

    The signature proves the code is intact and was made by the holder of
    ``inviter``; that this key belongs to a member of the federation is checked
    once the genesis and authority ops have synced. Raises :class:`InvalidCode`.
    """
    if not isinstance(now_ms, int) or isinstance(now_ms, bool):
        raise TypeError("now_ms must be an int (milliseconds since the epoch)")
    raw = _unwrap(code, INVITE_PREFIX, "invite code", MAX_INVITE_BYTES + SIGNATURE_BYTES)
    if len(raw) <= SIGNATURE_BYTES:
        raise InvalidCode("the invite code is too short: was it cut off while copying?")
    body, signature = raw[:-SIGNATURE_BYTES], raw[-SIGNATURE_BYTES:]
    value = _decode(body, _INVITE_LIMITS, "invite code")
    fields = _fields(value, _INVITE_FIELDS, "invite code")
    invite = _invite_from_fields(fields)
    try:
        nacl.signing.VerifyKey(invite.inviter).verify(INVITE_DOMAIN + body, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError):
        raise InvalidCode(
            "the invite code's signature does not match: it was damaged or altered; "
            "ask for it again"
        ) from None
    if now_ms >= invite.expires_ms:
        when = datetime.fromtimestamp(invite.expires_ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M")
        raise InvalidCode(f"the invite code expired on {when} UTC: ask for a new one")
    return invite


def _invite_from_fields(fields: Mapping[str, Value]) -> Invite:
    boot = fields["boot"]
    if not isinstance(boot, tuple):
        raise InvalidCode("the invite code's bootstrap peers are not a list")
    peers: list[tuple[bytes, tuple[str, ...]]] = []
    for entry in boot:
        if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], tuple)):
            raise InvalidCode("a bootstrap peer in the invite code is not [key, addresses]")
        peer = _check_bytes(entry[0], KEY_BYTES, "a bootstrap peer's key")
        peers.append((peer, tuple(_check_addr(addr) for addr in entry[1])))
    invite = Invite(
        federation=_check_bytes(fields["fed"], ID_BYTES, "the federation id"),
        federation_name=_check_name(
            fields["name"], "the federation name", MAX_FEDERATION_NAME_CHARS
        ),
        secret=_check_bytes(fields["secret"], SECRET_BYTES, "the federation secret"),
        bootstrap=tuple(peers),
        admission=_check_bytes(fields["admission"], ID_BYTES, "the admission token"),
        expires_ms=_check_expiry(fields["expires"]),
        inviter=_check_bytes(fields["by"], KEY_BYTES, "the inviter's key"),
    )
    _check_invite(invite)
    return invite


def _check_invite(invite: Invite) -> None:
    _check_bytes(invite.federation, ID_BYTES, "the federation id")
    _check_name(invite.federation_name, "the federation name", MAX_FEDERATION_NAME_CHARS)
    _check_bytes(invite.secret, SECRET_BYTES, "the federation secret")
    _check_bytes(invite.admission, ID_BYTES, "the admission token")
    _check_bytes(invite.inviter, KEY_BYTES, "the inviter's key")
    _check_expiry(invite.expires_ms)
    if len(invite.bootstrap) > MAX_BOOTSTRAP:
        raise InvalidCode(f"an invite names at most {MAX_BOOTSTRAP} bootstrap peers")
    seen: set[bytes] = set()
    for peer, addrs in invite.bootstrap:
        _check_bytes(peer, KEY_BYTES, "a bootstrap peer's key")
        if peer in seen:
            raise InvalidCode("a bootstrap peer is named twice")
        seen.add(peer)
        if not 1 <= len(addrs) <= MAX_BOOTSTRAP_ADDRS:
            raise InvalidCode(f"a bootstrap peer has 1 to {MAX_BOOTSTRAP_ADDRS} addresses")
        for addr in addrs:
            _check_addr(addr)
        if len(set(addrs)) != len(addrs):
            raise InvalidCode("a bootstrap peer's address is repeated")


def _check_expiry(expires: object) -> int:
    if (
        not isinstance(expires, int)
        or isinstance(expires, bool)
        or not 0 < expires <= MAX_EXPIRES_MS
    ):
        raise InvalidCode("the expiry must be a positive time in milliseconds")
    return expires


def _check_addr(addr: object) -> str:
    if (
        not isinstance(addr, str)
        or not 2 <= len(addr) <= MAX_ADDR_CHARS
        or not addr.startswith("/")
        or not addr.isascii()
        or not addr.isprintable()
        or any(c.isspace() for c in addr)
    ):
        raise InvalidCode(
            f"a bootstrap address must be a multiaddr (/ip4/.../tcp/...) of at most "
            f"{MAX_ADDR_CHARS} characters"
        )
    return addr


# -- shared pieces --------------------------------------------------------------------------


def _check_name(name: object, what: str, max_chars: int) -> str:
    if not isinstance(name, str) or not 1 <= len(name) <= max_chars:
        raise InvalidCode(f"{what} must be text of 1 to {max_chars} characters")
    if not name.isprintable():
        raise InvalidCode(f"{what} must not hold control characters")
    return name


def _check_bytes(value: object, size: int, what: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != size:
        raise InvalidCode(f"{what} must be {size} bytes")
    return value


def _check_keys(keys: object, role: str, *, min_count: int) -> tuple[bytes, ...]:
    if not isinstance(keys, tuple | list) or not min_count <= len(keys) <= MAX_KEYS:
        raise InvalidCode(f"a cell card lists {min_count} to {MAX_KEYS} {role}")
    checked = [_check_bytes(key, KEY_BYTES, f"each of the {role}' keys") for key in keys]
    if len(set(checked)) != len(checked):
        raise InvalidCode(f"a key is repeated among the {role}")
    return tuple(sorted(checked))


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


def _unwrap(text: str, prefix: str, what: str, max_bytes: int) -> bytes:
    """The bytes under ``prefix`` in ``text``: whitespace and case ignored, canonical base32."""
    if not isinstance(text, str):
        raise InvalidCode(f"{_A[what]} is text")
    if len(text) > _MAX_TEXT_CHARS:
        raise InvalidCode(f"this is far too long to be {_A[what]}")
    compact = "".join(text.split()).lower()
    if not compact.startswith(prefix):
        other = CARD_PREFIX if prefix == INVITE_PREFIX else INVITE_PREFIX
        if compact.startswith(other):
            raise InvalidCode(f"this is {_A[_KIND_OF[other]]}, not {_A[what]}")
        raise InvalidCode(f"this is not {_A[what]}: it should start with {prefix!r}")
    payload = compact[len(prefix) :]
    if len(payload) > (max_bytes * 8 + 4) // 5:
        raise InvalidCode(f"the {what} is too long")
    if not set(payload) <= _B32_ALPHABET:
        raise InvalidCode(f"the {what} holds characters that do not belong: copy it again")
    if len(payload) % 8 in (1, 3, 6):
        raise InvalidCode(f"the {what} has a wrong length: was it cut off while copying?")
    try:
        raw = base64.b32decode(payload.upper() + "=" * (-len(payload) % 8))
    except (binascii.Error, ValueError):  # pragma: no cover - alphabet and length checked
        raise InvalidCode(f"the {what} is not valid base32: copy it again") from None
    if _b32(raw) != payload:
        raise InvalidCode(f"the {what} was altered (its last character is not canonical)")
    return raw


_KIND_OF = {CARD_PREFIX: "cell card", INVITE_PREFIX: "invite code"}
_A = {"cell card": "a cell card", "invite code": "an invite code"}


def _decode(body: bytes, limits: Limits, what: str) -> Value:
    try:
        return decode(body, limits)
    except InvalidOp as exc:
        raise InvalidCode(f"the {what} is damaged ({exc.reason})") from None


def _fields(value: Value, expected: frozenset[str], what: str) -> Mapping[str, Value]:
    if not isinstance(value, dict) or set(value) != expected:
        raise InvalidCode(
            f"the {what} does not hold the expected fields: is it from another version?"
        )
    return value
