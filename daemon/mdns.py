"""LAN discovery: advertise and browse Archipel nodes with mDNS (zeroconf).

Theory of operation. Each node registers one DNS-SD service of type
``_archipel._tcp.local.`` under a random instance name (new on every start),
and browses for services of that type. The service's TXT record carries an
**advert**: the node's device key and its libp2p addresses, canonical msgpack
sealed with XSalsa20-Poly1305 (libsodium's secretbox) under a key derived from
the federation tag. A node reports a service only if the advert opens with its
own federation's key, so federations do not mix, and a LAN observer who does not
know the federation secret learns neither the device key, nor the addresses in
the advert, nor which nodes belong to the same federation (the sealed advert is
random-looking and changes with every start). What it does learn: that a host
runs an Archipel node, and that host's IP and MAC addresses (see docs/discovery.md).

zeroconf runs its own asyncio loop in a thread, and a browser thread that calls
our handler. The handler resolves the service (from zeroconf's cache, or by a
bounded query), opens the advert there, and hands well-formed adverts to the
trio thread through the run's :class:`trio.lowlevel.TrioToken` and a bounded
memory channel (full: the event is dropped and logged; zeroconf announces again).
The trio side keeps which service belongs to which peer, calls ``on_found``
when a peer is new or its addresses changed, and caps how many peers it reports.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import ipaddress
import logging
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, TypeVar

import ifaddr
import nacl.exceptions
import nacl.secret
import trio
from zeroconf import Error as ZeroconfError
from zeroconf import (
    InterfaceChoice,
    IPVersion,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)

from archipel.crdt import ArchipelError, InvalidOp, Limits, decode, encode

from .logs import fields

if TYPE_CHECKING:
    # trio's own annotations are shadowed by the trio-stubs package that py-libp2p
    # pulls in (trio-typing), where TaskStatus lives in trio_typing.
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)
T = TypeVar("T")

SERVICE_TYPE = "_archipel._tcp.local."
TAG_BYTES = 16
"""A federation tag is 16 bytes (32 hex digits): it keys the sealed adverts."""
MAX_PEERS = 256
"""At most this many distinct peers are reported by one run; later ones are ignored."""
MAX_SERVICES = 1024
"""At most this many of our federation's services are tracked at once."""
MAX_ADDRS = 8
"""At most this many addresses in one advert (ours or a peer's)."""
RESOLVE_TIMEOUT_MS = 2000
"""How long the browser thread waits for a service's records that are not cached."""
QUEUE_SIZE = 64
"""Adverts waiting for the trio thread; beyond this they are dropped (and logged)."""

_TAG_PERSON = b"archipel/lan/tag"  # BLAKE2b personalisation: exactly 16 bytes each
_BOX_PERSON = b"archipel/lan/box"
_CHUNK_CHARS = 200  # a TXT string holds 255 bytes: "12=" plus 200 characters fits
_MAX_CHUNKS = 8
_MAX_SEALED = 2048  # bytes of a sealed advert (nonce, ciphertext, MAC)
_ADVERT_LIMITS = Limits(
    max_op_bytes=_MAX_SEALED, max_depth=3, max_items=MAX_ADDRS, max_str_bytes=64, max_bin_bytes=32
)
_B64_ALPHABET = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


class DiscoveryError(ArchipelError):
    """LAN discovery cannot start (bad tag, key or address; zeroconf could not open
    its sockets), or an advert read from the LAN is not one we accept (``reason``)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True, slots=True)
class Advert:
    """What a node tells its federation on the LAN: its device key and addresses."""

    peer: bytes
    addrs: tuple[str, ...]


def federation_tag(federation_secret: bytes) -> str:
    """The federation's LAN tag: BLAKE2b-128 of the secret, personalised for this use.

    Outsiders cannot compute it (it comes from the secret, not the public
    federation id), and it never appears on the network as such: it keys the
    sealed adverts. Treat it as a secret (don't log it).
    """
    if not isinstance(federation_secret, bytes) or not 16 <= len(federation_secret) <= 1024:
        raise DiscoveryError("the federation secret must be 16 to 1024 bytes")
    digest = hashlib.blake2b(federation_secret, digest_size=TAG_BYTES, person=_TAG_PERSON)
    return digest.hexdigest()


def advert_box(tag: str) -> nacl.secret.SecretBox:
    """The secretbox that seals and opens the adverts of the federation with ``tag``."""
    if not isinstance(tag, str) or len(tag) != 2 * TAG_BYTES:
        raise DiscoveryError(f"a federation tag is {2 * TAG_BYTES} hex digits")
    try:
        raw = bytes.fromhex(tag)
    except ValueError:
        raise DiscoveryError(f"a federation tag is {2 * TAG_BYTES} hex digits") from None
    key = hashlib.blake2b(raw, digest_size=nacl.secret.SecretBox.KEY_SIZE, person=_BOX_PERSON)
    return nacl.secret.SecretBox(key.digest())


def normalize_addr(text: str) -> str:
    """``text`` as a canonical ``/ip4/A/tcp/P`` or ``/ip6/A/tcp/P`` multiaddr.

    A trailing ``/p2p/<id>`` is dropped (the advert carries the peer key). The
    wildcard addresses ``0.0.0.0`` and ``::`` pass (see :func:`expand_addrs`).
    Raises :class:`DiscoveryError` for anything else.
    """
    if not isinstance(text, str) or len(text) > 200:
        raise DiscoveryError("an address must be a string of at most 200 characters")
    parts = text.split("/")
    if len(parts) == 7 and parts[5] == "p2p" and parts[6]:
        parts = parts[:5]
    if len(parts) != 5 or parts[0] != "" or parts[1] not in ("ip4", "ip6") or parts[3] != "tcp":
        raise DiscoveryError(f"{text!r} is not an /ip4/.../tcp/PORT or /ip6/.../tcp/PORT address")
    try:
        ip = ipaddress.ip_address(parts[2])
    except ValueError:
        raise DiscoveryError(f"{text!r} does not hold a valid IP address") from None
    if ip.version != (4 if parts[1] == "ip4" else 6):
        raise DiscoveryError(f"{text!r}: the address does not match {parts[1]}")
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        raise DiscoveryError(f"{text!r}: scoped (link-local zone) addresses are not supported")
    if ip.is_multicast:
        raise DiscoveryError(f"{text!r}: a multicast address cannot be dialled")
    port = parts[4]
    if not (port.isascii() and port.isdigit() and len(port) <= 5 and 1 <= int(port) <= 65535):
        raise DiscoveryError(f"{text!r}: the port must be 1 to 65535")
    return f"/{parts[1]}/{ip.compressed}/tcp/{int(port)}"


def _ip_of(addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(addr.split("/")[2])


def _port_of(addr: str) -> int:
    return int(addr.split("/")[4])


def expand_addrs(addrs: Sequence[str], local_ips: Sequence[str]) -> tuple[str, ...]:
    """Replace wildcard addresses by concrete ones, keeping order, without duplicates.

    ``/ip4/0.0.0.0/tcp/P`` becomes ``/ip4/X/tcp/P`` for every IPv4 address X in
    ``local_ips`` that is not loopback; ``/ip6/::/tcp/P`` the same for IPv6
    addresses that are neither loopback nor link-local (a multiaddr cannot carry
    the zone a link-local address needs). ``addrs`` must be normalised. At most
    :data:`MAX_ADDRS` are kept.
    """
    out: list[str] = []
    for addr in addrs:
        ip = _ip_of(addr)
        if not ip.is_unspecified:
            candidates = [addr]
        else:
            port = _port_of(addr)
            candidates = []
            for text in local_ips:
                local = ipaddress.ip_address(text)
                if local.version != ip.version or local.is_loopback or local.is_link_local:
                    continue
                candidates.append(f"/ip{local.version}/{local.compressed}/tcp/{port}")
        out.extend(c for c in candidates if c not in out)
    return tuple(out[:MAX_ADDRS])


def seal_advert(
    box: nacl.secret.SecretBox, advert: Advert, nonce: bytes | None = None
) -> dict[str, str]:
    """The TXT properties that carry ``advert`` sealed with ``box``.

    ``{"v": "1", "0": ..., "1": ...}``: the sealed bytes in base64url without
    padding, split into strings that fit a TXT entry. ``nonce`` (24 bytes) is for
    tests; by default a random one is drawn, so every start looks different.
    """
    plain = encode({"a": list(advert.addrs), "p": advert.peer})
    sealed = bytes(box.encrypt(plain, nonce))
    text = base64.urlsafe_b64encode(sealed).rstrip(b"=").decode("ascii")
    chunks = [text[i : i + _CHUNK_CHARS] for i in range(0, len(text), _CHUNK_CHARS)]
    if len(chunks) > _MAX_CHUNKS:
        raise DiscoveryError("the advert is too large (too many or too long addresses)")
    props = {"v": "1"}
    props.update({str(i): chunk for i, chunk in enumerate(chunks)})
    return props


def open_advert(box: nacl.secret.SecretBox, properties: Mapping[bytes, bytes | None]) -> Advert:
    """The advert in a service's TXT ``properties`` (as zeroconf decodes them).

    Raises :class:`DiscoveryError` with the reason if the properties are not a
    well-formed advert sealed for this federation. Never raises anything else.
    """
    if len(properties) > _MAX_CHUNKS + 1:
        raise DiscoveryError("too many TXT entries")
    if properties.get(b"v") != b"1":
        raise DiscoveryError("not a version 1 advert")
    count = len(properties) - 1
    expected = {str(i).encode() for i in range(count)} | {b"v"}
    if count < 1 or set(properties) != expected:
        raise DiscoveryError("TXT entries are not v, 0, 1, ... n")
    parts: list[bytes] = []
    for i in range(count):
        chunk = properties[str(i).encode()]
        if not chunk or len(chunk) > _CHUNK_CHARS or not set(chunk) <= _B64_ALPHABET:
            raise DiscoveryError(f"TXT entry {i} is not a base64url chunk of the advert")
        parts.append(chunk)
    text = b"".join(parts)
    if len(text) % 4 == 1:
        raise DiscoveryError("the advert's base64url has an impossible length")
    try:
        sealed = base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))
    except (binascii.Error, ValueError):  # pragma: no cover - alphabet and length checked
        raise DiscoveryError("the advert is not base64url") from None
    if base64.urlsafe_b64encode(sealed).rstrip(b"=") != text:
        raise DiscoveryError("the advert's base64url is not canonical (stray bits)")
    try:
        plain = box.decrypt(sealed)
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise DiscoveryError("not sealed with our federation's key (or damaged)") from None
    try:
        value = decode(plain, _ADVERT_LIMITS)
    except InvalidOp as exc:
        raise DiscoveryError(f"the sealed advert is not canonical msgpack: {exc.reason}") from None
    return _advert_from_value(value)


def _advert_from_value(value: object) -> Advert:
    if not isinstance(value, dict) or set(value) != {"a", "p"}:
        raise DiscoveryError("the advert must be a map with fields a and p")
    peer, addrs = value["p"], value["a"]
    if not isinstance(peer, bytes) or len(peer) != 32:
        raise DiscoveryError("the advert's peer key must be 32 bytes")
    if not isinstance(addrs, tuple) or not 1 <= len(addrs) <= MAX_ADDRS:
        raise DiscoveryError(f"the advert must carry 1 to {MAX_ADDRS} addresses")
    for addr in addrs:
        if not isinstance(addr, str) or normalize_addr(addr) != addr:
            raise DiscoveryError("the advert carries an address that is not canonical")
        if _ip_of(addr).is_unspecified:
            raise DiscoveryError("the advert carries a wildcard address")
    if len(set(addrs)) != len(addrs):
        raise DiscoveryError("the advert repeats an address")
    return Advert(peer, addrs)


def _local_ips(interfaces: Sequence[str] | None) -> list[str]:
    """The IP addresses of the chosen interfaces (all of them when ``None``).

    An entry of ``interfaces`` is an IP address or an interface name (``eth0``),
    which stands for that interface's IPv4 addresses.
    """
    adapters = ifaddr.get_adapters()
    if interfaces is None:
        return [_ifaddr_ip(ip.ip) for adapter in adapters for ip in adapter.ips]
    out: list[str] = []
    for entry in interfaces:
        try:
            out.append(ipaddress.ip_address(entry).compressed)
            continue
        except ValueError:
            pass
        found = [ip.ip for a in adapters if entry in (a.nice_name, a.name) for ip in a.ips]
        v4 = [ip for ip in found if isinstance(ip, str)]
        if not v4:
            raise DiscoveryError(f"no interface named {entry!r} with an IPv4 address")
        out.extend(v4)
    return out


def _ifaddr_ip(ip: str | tuple[str, int, int]) -> str:
    # ifaddr gives IPv6 addresses as (address, flowinfo, scope_id)
    return ip if isinstance(ip, str) else ip[0]


@dataclass(frozen=True, slots=True)
class _Seen:
    name: str
    advert: Advert


@dataclass(frozen=True, slots=True)
class _Gone:
    name: str


_Event = _Seen | _Gone


class _Handler:
    """Runs in zeroconf's browser thread: resolve, open, hand over to trio.

    ``own``: our service name, only to say in the logs who ignored a service.
    """

    def __init__(
        self,
        box: nacl.secret.SecretBox,
        token: trio.lowlevel.TrioToken,
        send: trio.MemorySendChannel[_Event],
        own: str = "",
    ) -> None:
        self._box = box
        self._own = own
        self._token = token
        self._send = send

    def __call__(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        # An exception here would end zeroconf's browser thread, and discovery with
        # it: whatever a LAN host sends, log and carry on.
        try:
            self._handle(zeroconf, service_type, name, state_change)
        except Exception:
            log.exception("LAN discovery: error while handling a service", **fields(service=name))

    def _handle(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is ServiceStateChange.Removed:
            self._post(_Gone(name))
            return
        info = zeroconf.get_service_info(service_type, name, timeout=RESOLVE_TIMEOUT_MS)
        if info is None:
            log.debug("LAN service did not resolve", **fields(service=name))
            return
        try:
            advert = open_advert(self._box, info.properties)
        except DiscoveryError as exc:
            log.debug(
                "ignored LAN service", **fields(service=name, reason=exc.reason, by=self._own)
            )
            return
        self._post(_Seen(name, advert))

    def _post(self, event: _Event) -> None:
        with contextlib.suppress(trio.RunFinishedError):  # the run is over
            self._token.run_sync_soon(self._deliver, event)

    def _deliver(self, event: _Event) -> None:
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            log.warning("LAN discovery queue full: dropped an event", **fields(service=event.name))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # the run is over


async def _shielded(make: Callable[[], T]) -> T:
    """``make()`` in a worker thread, its result kept even if we are cancelled meanwhile
    (the cancellation is then delivered at the caller's next checkpoint)."""
    with trio.CancelScope(shield=True):
        return await trio.to_thread.run_sync(make)


def _register(zc: Zeroconf, info: ServiceInfo) -> None:
    try:
        zc.register_service(info)
    except (ZeroconfError, OSError, RuntimeError) as exc:
        raise DiscoveryError(f"cannot register our mDNS service: {exc!r}") from None


class LanDiscovery:
    """Advertise this node on the LAN and report the federation's other nodes.

    ``tag``: :func:`federation_tag` of the federation secret. ``peer``: our 32-byte
    device public key. ``addrs``: our libp2p listen addresses (``/ip4|ip6/.../tcp/P``,
    a ``/p2p/...`` suffix is dropped; ``0.0.0.0`` and ``::`` are expanded to the
    chosen interfaces' addresses when :meth:`run` starts). ``interfaces``: IP
    addresses or interface names to use for mDNS (default: every IPv4 interface).
    """

    def __init__(
        self,
        tag: str,
        peer: bytes,
        addrs: Sequence[str],
        *,
        interfaces: Sequence[str] | None = None,
    ) -> None:
        self._box = advert_box(tag)
        if not isinstance(peer, bytes) or len(peer) != 32:
            raise DiscoveryError("the peer key must be 32 bytes")
        if isinstance(addrs, str) or not 1 <= len(addrs) <= 4 * MAX_ADDRS:
            raise DiscoveryError(f"give 1 to {4 * MAX_ADDRS} addresses to advertise")
        if interfaces is not None and (isinstance(interfaces, str) or not interfaces):
            raise DiscoveryError("interfaces must be None or a non-empty list")
        self.peer = peer
        self._addrs = tuple(normalize_addr(a) for a in addrs)
        self._interfaces = None if interfaces is None else tuple(interfaces)
        label = secrets.token_hex(8)
        self.service_name = f"{label}.{SERVICE_TYPE}"
        """Our service's instance name on the LAN: random, new for every instance."""
        self._server = f"{label}.local."
        self._by_name: dict[str, bytes] = {}
        self._reported: dict[bytes, tuple[str, ...]] = {}
        self._warned_full = False

    async def run(
        self,
        on_found: Callable[[bytes, tuple[str, ...]], None],
        *,
        task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Advertise, browse, and call ``on_found(peer, addrs)`` on the trio thread
        for each peer of our federation that is new or whose addresses changed.

        Ready (``task_status.started()``) once our service is registered and the
        browser runs. Runs until cancelled; then unregisters (goodbye packets) and
        closes zeroconf. ``on_found`` must not block. Raises :class:`DiscoveryError`
        if discovery cannot start.
        """
        self._by_name.clear()
        self._reported.clear()
        local_ips = await trio.to_thread.run_sync(_local_ips, self._interfaces)
        addrs = expand_addrs(self._addrs, local_ips)
        if not addrs:
            raise DiscoveryError("no concrete address to advertise (no interface address?)")
        info = ServiceInfo(
            SERVICE_TYPE,
            self.service_name,
            port=_port_of(addrs[0]),
            properties=seal_advert(self._box, Advert(self.peer, addrs)),
            server=self._server,
            parsed_addresses=sorted({_ip_of(a).compressed for a in addrs}),
        )
        send, receive = trio.open_memory_channel[_Event](QUEUE_SIZE)
        handler = _Handler(self._box, trio.lowlevel.current_trio_token(), send, self.service_name)
        # Shielded: a cancel while a thread builds the object would lose it unclosed.
        zc = await _shielded(self._open_zeroconf)
        try:
            await trio.to_thread.run_sync(_register, zc, info)
            browser = await _shielded(partial(ServiceBrowser, zc, SERVICE_TYPE, handlers=[handler]))
            try:
                log.info("LAN discovery running", **fields(service=self.service_name, addrs=addrs))
                task_status.started()
                async with receive:
                    async for event in receive:
                        self._on_event(event, on_found)
            finally:
                with trio.CancelScope(shield=True):
                    # Bounded: the browser thread finishes its current resolve first.
                    await trio.to_thread.run_sync(browser.cancel)
        finally:
            send.close()
            with trio.CancelScope(shield=True):
                # Sends goodbye packets for our service, then stops zeroconf's thread.
                await trio.to_thread.run_sync(zc.close)

    def _open_zeroconf(self) -> Zeroconf:
        interfaces: InterfaceChoice | list[str | int]
        if self._interfaces is None:
            interfaces, version = InterfaceChoice.All, IPVersion.V4Only
        else:
            interfaces, version = list[str | int](_local_ips(self._interfaces)), None
        try:
            return Zeroconf(interfaces=interfaces, ip_version=version, use_asyncio=False)
        except (OSError, RuntimeError, ValueError) as exc:
            raise DiscoveryError(f"cannot start mDNS: {exc}") from None

    def _on_event(self, event: _Event, on_found: Callable[[bytes, tuple[str, ...]], None]) -> None:
        if isinstance(event, _Gone):
            peer = self._by_name.pop(event.name, None)
            if peer is not None and peer not in self._by_name.values():
                self._reported.pop(peer, None)  # reported again if it comes back
            return
        peer, addrs = event.advert.peer, event.advert.addrs
        if peer == self.peer:
            return
        if event.name not in self._by_name and len(self._by_name) >= MAX_SERVICES:
            self._warn_full("services")
            return
        self._by_name[event.name] = peer
        if self._reported.get(peer) == addrs:
            return
        if peer not in self._reported and len(self._reported) >= MAX_PEERS:
            self._warn_full("peers")
            return
        self._reported[peer] = addrs
        log.info("found LAN peer", **fields(peer=peer, addrs=addrs))
        on_found(peer, addrs)

    def _warn_full(self, what: str) -> None:
        if not self._warned_full:
            self._warned_full = True
            log.warning("LAN discovery: too many peers, ignoring new ones", **fields(limit=what))
