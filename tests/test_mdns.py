"""LAN discovery: tags, sealed adverts, the trio bridge, and real mDNS.

Real mDNS runs twice: in one process over loopback (zeroconf multicasts on
``lo`` when told to use 127.0.0.1, MULTICAST flag or not), and between processes
in network namespaces joined by a veth pair or a bridge (skipped where namespaces
cannot be created). Both run on the real clock under ``trio.fail_after`` caps and
wait on events, never on sleeps. Other tests on this machine may run mDNS on
loopback at the same time: foreign services are expected and must be ignored.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import netns
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from archipel.crdt import encode
from archipel.daemon import mdns
from archipel.daemon.mdns import (
    MAX_ADDRS,
    MAX_PEERS,
    Advert,
    DiscoveryError,
    LanDiscovery,
    advert_box,
    expand_addrs,
    federation_tag,
    normalize_addr,
    open_advert,
    seal_advert,
)

TAG = federation_tag(b"s" * 32)
OTHER_TAG = federation_tag(b"t" * 32)
BOX = advert_box(TAG)
PEER = bytes(range(32))
CHILD = Path(__file__).with_name("mdns_child.py")


def props(advert: Advert, box: Any = BOX, nonce: bytes | None = None) -> dict[bytes, bytes | None]:
    """TXT properties as zeroconf hands them to a browser: bytes keys and values."""
    return {k.encode(): v.encode() for k, v in seal_advert(box, advert, nonce).items()}


def sealed_props(plain: bytes) -> dict[bytes, bytes | None]:
    """Properties carrying ``plain`` sealed with our box (for shape tests)."""
    text = base64.urlsafe_b64encode(bytes(BOX.encrypt(plain))).rstrip(b"=")
    out: dict[bytes, bytes | None] = {b"v": b"1"}
    for i in range(0, len(text), 200):
        out[str(i // 200).encode()] = text[i : i + 200]
    return out


# -- tags -----------------------------------------------------------------------------------


def test_tag_is_short_hex_derived_from_the_secret_with_domain_separation() -> None:
    secret = os.urandom(32)
    tag = federation_tag(secret)
    assert tag == federation_tag(secret)
    assert len(tag) == 32
    assert int(tag, 16) >= 0
    assert tag != federation_tag(os.urandom(32))
    assert tag != hashlib.blake2b(secret, digest_size=16).hexdigest()
    assert secret.hex()[:32] != tag


@pytest.mark.parametrize("secret", [b"", b"short", b"x" * 2000, "a str" * 10])
def test_tag_refuses_bad_secrets(secret: Any) -> None:
    with pytest.raises(DiscoveryError, match="secret"):
        federation_tag(secret)


@pytest.mark.parametrize("tag", ["", "zz" * 16, TAG[:-2], TAG + "00", 12])
def test_box_refuses_bad_tags(tag: Any) -> None:
    with pytest.raises(DiscoveryError, match="hex digits"):
        advert_box(tag)


# -- addresses ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("/ip4/10.0.0.1/tcp/4001", "/ip4/10.0.0.1/tcp/4001"),
        ("/ip4/10.0.0.1/tcp/4001/p2p/12D3KooWabc", "/ip4/10.0.0.1/tcp/4001"),
        ("/ip6/2001:DB8:0:0::1/tcp/80", "/ip6/2001:db8::1/tcp/80"),
        ("/ip4/0.0.0.0/tcp/7", "/ip4/0.0.0.0/tcp/7"),
        ("/ip4/127.0.0.1/tcp/0655", "/ip4/127.0.0.1/tcp/655"),
    ],
)
def test_addresses_are_normalised(given: str, canonical: str) -> None:
    assert normalize_addr(given) == canonical


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "/ip4/10.0.0.1/udp/4001",
        "/ip4/10.0.0.1/tcp/0",
        "/ip4/10.0.0.1/tcp/65536",
        "/ip4/10.0.0.1/tcp/-1",
        "/ip4/10.0.0.1/tcp/4001/p2p/",
        "/ip4/10.0.0.1/tcp/4001/ws",
        "/ip4/::1/tcp/4001",
        "/ip6/10.0.0.1/tcp/4001",
        "/ip6/fe80::1%eth0/tcp/4001",
        "/ip4/224.0.0.251/tcp/5353",
        "/dns4/example.org/tcp/4001",
        "ip4/10.0.0.1/tcp/4001",
        "/ip4/10.0.0.1/tcp/٤٠٠١",
        "/ip4/10.0.0.1/tcp/" + "1" * 300,
    ],
)
def test_bad_addresses_are_refused(bad: str) -> None:
    with pytest.raises(DiscoveryError):
        normalize_addr(bad)


def test_wildcards_expand_to_concrete_non_loopback_addresses() -> None:
    local = ["127.0.0.1", "10.77.0.1", "192.168.1.5", "::1", "fe80::1", "2001:db8::5"]
    addrs = ["/ip4/0.0.0.0/tcp/4001", "/ip6/::/tcp/4001", "/ip4/10.77.0.1/tcp/4001"]
    assert expand_addrs(addrs, local) == (
        "/ip4/10.77.0.1/tcp/4001",
        "/ip4/192.168.1.5/tcp/4001",
        "/ip6/2001:db8::5/tcp/4001",
    )
    assert expand_addrs(["/ip4/0.0.0.0/tcp/1"], ["127.0.0.1"]) == ()
    many = [f"/ip4/10.0.0.{i}/tcp/1" for i in range(1, 20)]
    assert len(expand_addrs(many, [])) == MAX_ADDRS


# -- sealed adverts -------------------------------------------------------------------------

addresses = st.builds(
    "/ip4/{}/tcp/{}".format,
    st.ip_addresses(v=4).filter(lambda ip: not ip.is_multicast and not ip.is_unspecified),
    st.integers(1, 65535),
) | st.builds(
    "/ip6/{}/tcp/{}".format,
    st.ip_addresses(v=6).filter(lambda ip: not ip.is_multicast and not ip.is_unspecified),
    st.integers(1, 65535),
)
adverts = st.builds(
    Advert,
    st.binary(min_size=32, max_size=32),
    st.lists(addresses, min_size=1, max_size=MAX_ADDRS, unique=True).map(tuple),
)


@given(adverts)
def test_adverts_round_trip_and_fit_txt_strings(advert: Advert) -> None:
    properties = props(advert)
    assert all(len(k) + 1 + len(v or b"") <= 255 for k, v in properties.items())
    assert open_advert(BOX, properties) == advert


@given(adverts)
def test_another_federation_cannot_open_an_advert(advert: Advert) -> None:
    with pytest.raises(DiscoveryError, match="federation"):
        open_advert(advert_box(OTHER_TAG), props(advert))


def test_adverts_look_different_at_every_start() -> None:
    advert = Advert(PEER, ("/ip4/10.0.0.1/tcp/1",))
    assert props(advert) != props(advert)
    assert props(advert, nonce=b"n" * 24) == props(advert, nonce=b"n" * 24)
    plain = b"".join(v or b"" for v in props(advert).values())
    assert PEER.hex().encode() not in plain
    assert b"10.0.0.1" not in plain


@given(adverts, st.data())
def test_any_damage_to_a_sealed_advert_is_refused(advert: Advert, data: st.DataObject) -> None:
    # A drawn nonce, not a random one: the draws below depend on the sealed bytes.
    properties = props(advert, nonce=data.draw(st.binary(min_size=24, max_size=24)))
    key = data.draw(st.sampled_from(sorted(k for k in properties if k != b"v")))
    value = properties[key]
    assert value is not None
    index = data.draw(st.integers(0, len(value) - 1))
    replacement = data.draw(st.sampled_from(b"AQgw-_z9").filter(lambda c: c != value[index]))
    properties[key] = value[:index] + bytes([replacement]) + value[index + 1 :]
    with pytest.raises(DiscoveryError):
        open_advert(BOX, properties)


def _good() -> dict[bytes, bytes | None]:
    return props(Advert(PEER, ("/ip4/10.0.0.1/tcp/1",)))


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda p: {k: v for k, v in p.items() if k != b"v"}, "version"),
        (lambda p: {**p, b"v": b"2"}, "version"),
        (lambda p: {**p, b"v": None}, "version"),
        (lambda p: {b"v": b"1"}, "entries"),
        (lambda p: {**p, b"2": p[b"0"]}, "entries"),  # a gap: v, 0, 2
        (lambda p: {**p, b"1": p[b"0"]}, "federation"),  # two chunks: the box does not open
        (lambda p: {b"v": b"1", b"1": p[b"0"]}, "entries"),
        (lambda p: {**p, b"x": b"y"}, "entries"),
        (lambda p: {**p, **{str(i).encode(): b"A" for i in range(9)}}, "too many"),
        (lambda p: {**p, b"0": None}, "chunk"),
        (lambda p: {**p, b"0": b""}, "chunk"),
        (lambda p: {**p, b"0": b"A" * 201}, "chunk"),
        (lambda p: {**p, b"0": b"AAAA+/=="}, "chunk"),
        (lambda p: {**p, b"0": b"AAAAA"}, "length"),
        (lambda p: {**p, b"0": b"AAAA"}, "federation"),
    ],
)
def test_malformed_txt_records_are_refused(
    mangle: Callable[[dict[bytes, bytes | None]], dict[bytes, bytes | None]], reason: str
) -> None:
    with pytest.raises(DiscoveryError, match=reason):
        open_advert(BOX, mangle(_good()))


@pytest.mark.parametrize(
    ("plain", "reason"),
    [
        (b"\xc1", "msgpack"),
        (b"\x82\xa1p\xc4\x00\xa1a\x90", "msgpack"),  # keys out of order: not canonical
        (encode([PEER]), "map"),
        (encode({"p": PEER}), "map"),
        (encode({"p": PEER, "a": ["/ip4/1.1.1.1/tcp/1"], "x": 1}), "map"),
        (encode({"p": PEER[:31], "a": ["/ip4/1.1.1.1/tcp/1"]}), "32 bytes"),
        (encode({"p": "k" * 32, "a": ["/ip4/1.1.1.1/tcp/1"]}), "32 bytes"),
        (encode({"p": PEER, "a": []}), "addresses"),
        (encode({"p": PEER, "a": "/ip4/1.1.1.1/tcp/1"}), "addresses"),
        (encode({"p": PEER, "a": [1]}), "canonical"),
        (encode({"p": PEER, "a": ["/ip4/1.1.1.1/tcp/01"]}), "canonical"),
        (encode({"p": PEER, "a": ["/ip4/1.1.1.1/tcp/1/p2p/x"]}), "canonical"),
        (encode({"p": PEER, "a": ["/ip4/0.0.0.0/tcp/1"]}), "wildcard"),
        (encode({"p": PEER, "a": ["/ip4/1.1.1.1/tcp/1"] * 2}), "repeats"),
        (encode({"p": PEER, "a": [f"/ip4/1.1.1.{i}/tcp/1" for i in range(9)]}), "msgpack"),
        (encode({"p": PEER, "a": ["/ip4/1.1.1.1/tcp/1"], "q": [[[[1]]]]}), "msgpack"),
    ],
)
def test_sealed_adverts_of_the_wrong_shape_are_refused(plain: bytes, reason: str) -> None:
    with pytest.raises(DiscoveryError, match=reason):
        open_advert(BOX, sealed_props(plain))


@given(
    st.dictionaries(
        st.sampled_from([b"v", b"0", b"1", b"2", b"9", b"x"]) | st.binary(max_size=3),
        st.none() | st.binary(max_size=300) | st.sampled_from([b"1", b"AAAA"]),
        max_size=12,
    )
)
def test_arbitrary_txt_records_raise_only_discovery_errors(
    properties: dict[bytes, bytes | None],
) -> None:
    with pytest.raises(DiscoveryError):
        open_advert(BOX, properties)


# -- construction ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"tag": "nope"}, "hex digits"),
        ({"peer": b"short"}, "32 bytes"),
        ({"peer": "k" * 32}, "32 bytes"),
        ({"addrs": []}, "addresses"),
        ({"addrs": "/ip4/10.0.0.1/tcp/1"}, "addresses"),
        ({"addrs": ["/ip4/10.0.0.1/udp/1"]}, "tcp"),
        ({"interfaces": []}, "interfaces"),
        ({"interfaces": "eth0"}, "interfaces"),
    ],
)
def test_construction_refuses_bad_arguments(kwargs: dict[str, Any], reason: str) -> None:
    args: dict[str, Any] = {"tag": TAG, "peer": PEER, "addrs": ["/ip4/10.0.0.1/tcp/1"]}
    args.update(kwargs)
    with pytest.raises(DiscoveryError, match=reason):
        LanDiscovery(args.pop("tag"), args.pop("peer"), args.pop("addrs"), **args)


def test_service_names_are_random_and_carry_nothing_about_the_node() -> None:
    a = LanDiscovery(TAG, PEER, ["/ip4/10.0.0.1/tcp/1"])
    b = LanDiscovery(TAG, PEER, ["/ip4/10.0.0.1/tcp/1"])
    assert a.service_name != b.service_name
    assert a.service_name.endswith("._archipel._tcp.local.")
    assert PEER.hex()[:8] not in a.service_name


async def test_an_unknown_interface_name_fails_before_anything_starts() -> None:
    discovery = LanDiscovery(TAG, PEER, ["/ip4/0.0.0.0/tcp/1"], interfaces=["no-such-interface0"])
    with trio.fail_after(10), pytest.raises(DiscoveryError, match="no-such-interface0"):
        await discovery.run(lambda peer, addrs: None)


# -- what the trio side reports -------------------------------------------------------------


def _peer(i: int) -> bytes:
    return i.to_bytes(32, "big")


def _reports(discovery: LanDiscovery) -> tuple[list[tuple[bytes, tuple[str, ...]]], Any]:
    out: list[tuple[bytes, tuple[str, ...]]] = []

    def on_event(event: Any) -> None:
        discovery._on_event(event, lambda peer, addrs: out.append((peer, addrs)))

    return out, on_event


def test_reports_new_peers_and_changed_addresses_once_never_ourselves() -> None:
    discovery = LanDiscovery(TAG, PEER, ["/ip4/10.0.0.1/tcp/1"])
    out, feed = _reports(discovery)
    one, two = ("/ip4/10.0.0.2/tcp/1",), ("/ip4/10.0.0.3/tcp/1",)
    feed(mdns._Seen("self", Advert(PEER, one)))
    feed(mdns._Seen("a", Advert(_peer(1), one)))
    feed(mdns._Seen("a", Advert(_peer(1), one)))  # an update that changes nothing
    feed(mdns._Seen("a", Advert(_peer(1), two)))
    feed(mdns._Seen("b", Advert(_peer(1), two)))  # same peer under a second name
    assert out == [(_peer(1), one), (_peer(1), two)]
    feed(mdns._Gone("a"))
    feed(mdns._Seen("a", Advert(_peer(1), two)))  # still known under "b"
    assert len(out) == 2
    feed(mdns._Gone("a"))
    feed(mdns._Gone("b"))
    feed(mdns._Gone("never-seen"))
    feed(mdns._Seen("c", Advert(_peer(1), two)))  # gone, then back: reported again
    assert out[-1] == (_peer(1), two)
    assert len(out) == 3


def test_reports_at_most_max_peers(caplog: pytest.LogCaptureFixture) -> None:
    discovery = LanDiscovery(TAG, PEER, ["/ip4/10.0.0.1/tcp/1"])
    out, feed = _reports(discovery)
    addrs = ("/ip4/10.0.0.2/tcp/1",)
    with caplog.at_level(logging.WARNING, logger="archipel.daemon.mdns"):
        for i in range(1, MAX_PEERS + 11):
            feed(mdns._Seen(f"s{i}", Advert(_peer(i), addrs)))
    assert len(out) == MAX_PEERS
    assert len({peer for peer, _ in out}) == MAX_PEERS
    assert sum("too many" in r.getMessage() for r in caplog.records) == 1
    feed(mdns._Seen("s1", Advert(_peer(1), ("/ip4/10.0.0.9/tcp/1",))))  # known peers still update
    assert out[-1] == (_peer(1), ("/ip4/10.0.0.9/tcp/1",))


# -- the handler in zeroconf's browser thread -----------------------------------------------


class _Info:
    def __init__(self, properties: dict[bytes, bytes | None]) -> None:
        self.properties = properties


class _FakeZeroconf:
    def __init__(self, answer: Any) -> None:
        self.answer = answer

    def get_service_info(self, service_type: str, name: str, timeout: int) -> Any:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


async def test_handler_hands_well_formed_adverts_to_trio_and_drops_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    send, receive = trio.open_memory_channel[Any](1)
    handler = mdns._Handler(BOX, trio.lowlevel.current_trio_token(), send, "us")
    advert = Advert(_peer(1), ("/ip4/10.0.0.2/tcp/1",))
    added, removed = mdns.ServiceStateChange.Added, mdns.ServiceStateChange.Removed

    def call(answer: Any, name: str, change: Any = added) -> None:
        handler(_FakeZeroconf(answer), mdns.SERVICE_TYPE, name, change)  # type: ignore[arg-type]

    with trio.fail_after(10), caplog.at_level(logging.DEBUG, logger="archipel.daemon.mdns"):
        # Each call runs in a worker thread, as zeroconf's browser thread would.
        await trio.to_thread.run_sync(call, None, "unresolved")
        await trio.to_thread.run_sync(call, _Info({b"v": b"1", b"0": b"!"}), "junk")
        await trio.to_thread.run_sync(call, _Info(props(advert, advert_box(OTHER_TAG))), "alien")
        await trio.to_thread.run_sync(call, RuntimeError("zeroconf broke"), "boom")
        await trio.to_thread.run_sync(call, _Info(props(advert)), "good")
        assert await receive.receive() == mdns._Seen("good", advert)
        # The channel holds one event: a second is dropped (and logged), not queued.
        await trio.to_thread.run_sync(call, None, "gone", removed)
        await trio.to_thread.run_sync(call, None, "gone-too", removed)
        await trio.testing.wait_all_tasks_blocked()
        assert await receive.receive() == mdns._Gone("gone")
        assert receive.statistics().current_buffer_used == 0
    messages = [(r.getMessage(), getattr(r, "fields", {})) for r in caplog.records]
    ignored = {f["service"]: f["reason"] for m, f in messages if m == "ignored LAN service"}
    assert set(ignored) == {"junk", "alien"}
    assert "federation" in ignored["alien"]
    assert any(m.startswith("LAN discovery: error") for m, _ in messages)
    assert any(m.startswith("LAN discovery queue full") for m, _ in messages)
    send.close()
    # After the run's channel is closed, a late event from zeroconf is dropped quietly.
    await trio.to_thread.run_sync(call, _Info(props(advert)), "late")
    await trio.testing.wait_all_tasks_blocked()


# -- real mDNS in one process, over loopback ------------------------------------------------


class Watch:
    """Events from threads or tasks, and a way to wait until one matches."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._changed = trio.Event()

    def add(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        self._changed.set()
        self._changed = trio.Event()

    async def until(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        while True:
            for event in self.events:
                if predicate(event):
                    return event
            await self._changed.wait()


class _ToWatch(logging.Handler):
    """Ignored-service log records (from zeroconf's threads) into a Watch."""

    def __init__(self, watch: Watch, token: trio.lowlevel.TrioToken) -> None:
        super().__init__(logging.DEBUG)
        self.watch, self.token = watch, token

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "ignored LAN service":
            values = dict(getattr(record, "fields", {}))
            self.token.run_sync_soon(self.watch.add, {"ignored": values["service"], **values})


@pytest.fixture
async def ignored_log() -> AsyncIterator[Watch]:
    watch = Watch()
    logger = logging.getLogger("archipel.daemon.mdns")
    handler = _ToWatch(watch, trio.lowlevel.current_trio_token())
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    yield watch
    logger.removeHandler(handler)
    logger.setLevel(level)


async def test_two_nodes_find_each_other_over_loopback_and_ignore_another_federation(
    ignored_log: Watch,
) -> None:
    # Fresh federations: other runs of this test may share the loopback right now.
    tag, other_tag = federation_tag(os.urandom(32)), federation_tag(os.urandom(32))
    lo = ["127.0.0.1"]
    nodes = [
        LanDiscovery(tag, _peer(1), ["/ip4/127.0.0.1/tcp/4101"], interfaces=lo),
        LanDiscovery(tag, _peer(2), ["/ip4/127.0.0.1/tcp/4102/p2p/x"], interfaces=lo),
        LanDiscovery(other_tag, _peer(3), ["/ip4/127.0.0.1/tcp/4103"], interfaces=lo),
    ]
    found = [Watch() for _ in nodes]
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            for node, watch in zip(nodes, found, strict=True):
                report = lambda p, a, w=watch: w.add({"peer": p, "addrs": a})  # noqa: E731
                await nursery.start(node.run, report)
            await found[0].until(lambda e: e["peer"] == _peer(2))
            await found[1].until(lambda e: e["peer"] == _peer(1))
            for me in (nodes[0], nodes[1]):
                await ignored_log.until(
                    lambda e, me=me: (
                        e["ignored"] == nodes[2].service_name and e["by"] == me.service_name
                    )
                )
            nursery.cancel_scope.cancel()
    assert [(e["peer"], e["addrs"]) for e in found[0].events] == [
        (_peer(2), ("/ip4/127.0.0.1/tcp/4102",))
    ]
    assert [(e["peer"], e["addrs"]) for e in found[1].events] == [
        (_peer(1), ("/ip4/127.0.0.1/tcp/4101",))
    ]
    assert _peer(1) not in [e["peer"] for e in found[2].events]
    assert _peer(2) not in [e["peer"] for e in found[2].events]


def _zeroconf_threads() -> list[str]:
    return [
        t.name
        for t in threading.enumerate()
        if t.name.startswith("zeroconf") or "_run_loop" in t.name
    ]


@pytest.mark.parametrize("after_s", [0, 0.05, 0.5, 3])
async def test_cancelling_at_any_point_leaves_no_zeroconf_thread(after_s: float) -> None:
    """Cancelled before, while and after zeroconf starts and registers (which takes
    about 1.7 s): every thread it started is gone when run() returns."""
    before = _zeroconf_threads()
    tag = federation_tag(os.urandom(32))
    discovery = LanDiscovery(tag, _peer(9), ["/ip4/127.0.0.1/tcp/4109"], interfaces=["127.0.0.1"])
    with trio.fail_after(30):
        with trio.move_on_after(after_s):
            await discovery.run(lambda peer, addrs: None)
        assert _zeroconf_threads() == before


# -- real mDNS between network namespaces ---------------------------------------------------

NETNS_UNAVAILABLE = netns.unavailable()
needs_netns = pytest.mark.skipif(
    NETNS_UNAVAILABLE is not None, reason=f"network namespaces: {NETNS_UNAVAILABLE}"
)


class Child:
    """A discovery node (tests/mdns_child.py) in a namespace; its output lines in ``watch``."""

    def __init__(self, process: trio.Process, stderr: Path) -> None:
        self.process = process
        self.stderr = stderr
        self.watch = Watch()
        self.name = ""

    async def read(self) -> None:
        assert self.process.stdout is not None
        buffer = b""
        while chunk := await self.process.stdout.receive_some(65536):
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                self.watch.add(json.loads(line))

    def found(self) -> list[tuple[str, list[str]]]:
        return [(e["found"], e["addrs"]) for e in self.watch.events if "found" in e]

    async def stop(self) -> None:
        """Close stdin (the child's signal to stop) and wait for a clean exit."""
        assert self.process.stdin is not None
        await self.process.stdin.aclose()
        with trio.fail_after(20):
            await self.watch.until(lambda e: "stopped" in e)
            assert await self.process.wait() == 0, self.stderr.read_text()


async def start_child(
    nursery: trio.Nursery, net: netns.Lan, host: int, args: list[str], tmp_path: Path
) -> Child:
    stderr = tmp_path / f"child-{len(list(tmp_path.iterdir()))}.err"
    with stderr.open("wb") as err:
        process = await trio.lowlevel.open_process(
            net.exec(host, [sys.executable, str(CHILD), *args]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
        )
    child = Child(process, stderr)
    nursery.start_soon(child.read)
    return child


async def run_children(
    net: netns.Lan, specs: list[tuple[int, list[str]]], tmp_path: Path, body: Any
) -> list[Child]:
    """Start one child per ``(host, args)``, wait until all are ready, run ``body``,
    stop them; a child that outlives a failure is killed (by its own pid)."""
    children: list[Child] = []
    try:
        async with trio.open_nursery() as nursery:
            for host, args in specs:
                children.append(await start_child(nursery, net, host, args, tmp_path))
            with trio.fail_after(40):
                for child in children:
                    ready = await child.watch.until(lambda e: "ready" in e)
                    child.name = ready["ready"]
                await body(children)
            for child in children:
                await child.stop()
    finally:
        for child in children:
            if child.process.returncode is None:
                child.process.kill()
                with trio.move_on_after(5) as scope:
                    scope.shield = True
                    await child.process.wait()
    return children


def _node_args(tag: str, peer: int, addr: str, *extra: str) -> list[str]:
    return [tag, _peer(peer).hex(), addr, *extra]


def _saw(child: Child, other: Child) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e.get("ignored") == other.name


@needs_netns
async def test_two_namespaces_on_a_veth_pair_find_each_other(tmp_path: Path) -> None:
    """A and B (same federation) on two hosts; C (another federation) beside B."""
    with netns.lan(2, bridge=False) as net:
        specs = [
            (0, _node_args(TAG, 1, "/ip4/0.0.0.0/tcp/4001")),  # every interface (the default)
            (1, _node_args(TAG, 2, "/ip4/0.0.0.0/tcp/4001")),
            (1, _node_args(OTHER_TAG, 3, "/ip4/0.0.0.0/tcp/4002")),
        ]

        async def body(children: list[Child]) -> None:
            a, b, c = children
            await a.watch.until(lambda e: e.get("found") == _peer(2).hex())
            await b.watch.until(lambda e: e.get("found") == _peer(1).hex())
            await a.watch.until(_saw(a, c))
            await b.watch.until(_saw(b, c))
            await c.watch.until(_saw(c, a))

        a, b, c = await run_children(net, specs, tmp_path, body)
    assert a.found() == [(_peer(2).hex(), [f"/ip4/{net.addrs[1]}/tcp/4001"])]
    assert b.found() == [(_peer(1).hex(), [f"/ip4/{net.addrs[0]}/tcp/4001"])]
    assert c.found() == []


@needs_netns
async def test_two_federations_share_a_bridged_lan_without_mixing(tmp_path: Path) -> None:
    """Three hosts on a bridge: A, B of one federation, C, D of another (D beside B)."""
    with netns.lan(3) as net:
        specs = [
            (0, _node_args(TAG, 1, "/ip4/0.0.0.0/tcp/4001", "--interface", "eth0")),
            (1, _node_args(TAG, 2, f"/ip4/{net.addrs[1]}/tcp/4001", "--interface", "eth0")),
            (2, _node_args(OTHER_TAG, 3, "/ip4/0.0.0.0/tcp/4001", "--interface", net.addrs[2])),
            (1, _node_args(OTHER_TAG, 4, "/ip4/0.0.0.0/tcp/4002")),
        ]

        async def body(children: list[Child]) -> None:
            a, b, c, d = children
            for x, peer in ((a, 2), (b, 1), (c, 4), (d, 3)):
                await x.watch.until(lambda e, peer=peer: e.get("found") == _peer(peer).hex())
            for x, y in ((a, c), (a, d), (b, c), (b, d), (c, a), (c, b), (d, a), (d, b)):
                await x.watch.until(_saw(x, y))

        a, b, c, d = await run_children(net, specs, tmp_path, body)
    assert a.found() == [(_peer(2).hex(), [f"/ip4/{net.addrs[1]}/tcp/4001"])]
    assert b.found() == [(_peer(1).hex(), [f"/ip4/{net.addrs[0]}/tcp/4001"])]
    assert c.found() == [(_peer(4).hex(), [f"/ip4/{net.addrs[1]}/tcp/4002"])]
    assert d.found() == [(_peer(3).hex(), [f"/ip4/{net.addrs[2]}/tcp/4001"])]


def test_netns_helper_builds_isolated_hosts_and_cleans_up() -> None:
    if NETNS_UNAVAILABLE is not None:
        pytest.skip(f"network namespaces: {NETNS_UNAVAILABLE}")
    with netns.lan(2) as net:
        names = [*net.hosts, net.switch]
        shown = net.run(0, ["ip", "-4", "-o", "addr", "show", "dev", "eth0"])
        assert f"{net.addrs[0]}/24" in shown.stdout
        links = net.run(1, ["ip", "-o", "link", "show"]).stdout
        assert "eth0" in links
        assert "MULTICAST" in links
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    assert not any(name in listed.stdout for name in names)
