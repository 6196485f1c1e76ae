"""The node's files: config.toml, identity.json, the lock, the logs."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
from pathlib import Path

import pytest
from nodes import federation_on_disk

from archipel.daemon import config, identity, logs
from archipel.daemon.node import Node
from archipel.daemon.paths import AlreadyRunning, Home, NodeLock
from archipel.daemon.transport import peer_id_of

# -- config.toml ---------------------------------------------------------------


def test_the_template_parses_to_the_defaults() -> None:
    assert config.parse(config.TEMPLATE) == config.Config()


def test_settings_are_read() -> None:
    cfg = config.parse(
        '[network]\nlisten = ["/ip4/127.0.0.1/tcp/0"]\nmdns = false\ndial_timeout_s = 3\n'
        '[log]\nformat = "json"\nlevel = "debug"\n[rpc]\ntcp_port = 7718\n'
    )
    assert cfg.network.listen == ("/ip4/127.0.0.1/tcp/0",)
    assert cfg.network.mdns is False
    assert cfg.network.dial_timeout_s == 3.0
    assert cfg.log == config.LogConfig("json", "debug")
    assert cfg.rpc.tcp_port == 7718


PEER = peer_id_of(bytes(range(32)))


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("[network\n", "not valid TOML"),
        ("[netwrok]\n", "unknown setting netwrok"),
        ("[network]\nlisen = []\n", "unknown setting network.lisen"),
        ("[network]\nlisten = []\n", "network.listen needs at least 1"),
        ("[network]\nlisten = [1]\n", "network.listen must be a list"),
        ("[network]\nmdns = 1\n", "network.mdns must be true or false"),
        ("[network]\ndial_timeout_s = 0\n", "dial_timeout_s must be seconds"),
        ("[network]\nmax_connections = true\n", "max_connections must be an integer"),
        ('[log]\nformat = "xml"\n', "log.format must be one of human, json"),
        ("[rpc]\ntcp_port = 70000\n", "rpc.tcp_port must be an integer"),
        ("network = 3\n", "[network] must be a table"),
        ("[network]\npeer_addresses = 3\n", "peer_addresses must be a table"),
        ('[network.peer_addresses]\nQmFoo = ["/ip4/1.2.3.4/tcp/1"]\n', "not an Ed25519 peer id"),
        (f'[network.peer_addresses]\n"{PEER}" = []\n', "needs at least 1"),
        ("[clock]\noffset_ms = 1.5\n", "clock.offset_ms must be an integer"),
        ("[clock]\noffset_ms = 999999999999\n", "clock.offset_ms must be an integer"),
        ("[clock]\nskew = 1\n", "unknown setting clock.skew"),
    ],
)
def test_bad_settings_are_named(text: str, complaint: str) -> None:
    with pytest.raises(config.ConfigError, match=complaint.replace("[", r"\[")):
        config.parse(text)


def test_peer_addresses_and_clock_offset_are_read() -> None:
    cfg = config.parse(
        f'[network.peer_addresses]\n"{PEER}" = ["/ip4/10.0.0.2/tcp/7717"]\n'
        "[clock]\noffset_ms = -2500\n"
    )
    assert cfg.network.peer_addresses == ((PEER, ("/ip4/10.0.0.2/tcp/7717",)),)
    assert cfg.clock.offset_ms == -2500
    assert "[network.peer_addresses]" in config.TEMPLATE
    assert config.parse(config.TEMPLATE) == config.Config()


def test_the_clock_offset_shifts_every_timestamp_the_node_takes(tmp_path: Path) -> None:
    fed = federation_on_disk(tmp_path, 1)
    shifted = config.Config(clock=config.ClockConfig(offset_ms=60_000))
    node = Node(fed.homes[0], shifted, fed.identities[0], clock_ms=lambda: 1_000)
    assert node.now_ms() == 61_000
    assert Node(fed.homes[0], config.Config(), fed.identities[0], clock_ms=lambda: 5).now_ms() == 5


def test_a_missing_file_means_defaults(tmp_path: Path) -> None:
    assert config.load(tmp_path / "nope.toml") == config.Config()


# -- identity.json -------------------------------------------------------------


def test_identity_round_trips_with_mode_0600(tmp_path: Path) -> None:
    ident = identity.Identity.generate("Les Tilleuls").with_federation(
        b"f" * 32, "Fédé", b"s" * 32, bootstrap=("/ip4/1.2.3.4/tcp/1/p2p/x",), admission=b"a" * 32
    )
    path = tmp_path / "identity.json"
    identity.save(path, ident)
    assert path.stat().st_mode & 0o777 == 0o600
    back = identity.load(path)
    assert back.to_json() == ident.to_json()
    assert back.device_public == ident.device_public
    assert back.joined


def test_an_identity_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "identity.json"
    identity.save(path, identity.Identity.generate("c"))
    path.chmod(0o644)
    with pytest.raises(identity.IdentityError, match="readable by other users"):
        identity.load(path)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.pop("member_seed"),
        lambda d: d.update(device_seed="00"),
        lambda d: d.update(format=99),
        lambda d: d.update(cell=""),
        lambda d: d.update(secret="zz"),
        lambda d: d.update(bootstrap="x"),
    ],
)
def test_a_malformed_identity_is_refused(tmp_path: Path, mutate: object) -> None:
    data = json.loads(identity.Identity.generate("c").to_json())
    assert callable(mutate)
    mutate(data)
    path = tmp_path / "identity.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, json.dumps(data).encode())
    os.close(fd)
    with pytest.raises(identity.IdentityError, match="identity"):
        identity.load(path)


def test_no_identity_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(identity.IdentityError, match="archipel init"):
        identity.load(tmp_path / "identity.json")


def test_the_snapshot_key_differs_from_the_signing_key() -> None:
    ident = identity.Identity.generate("c")
    assert ident.snapshot_key() not in (bytes(ident.device), bytes(ident.member))
    assert len(ident.snapshot_key()) == 32


# -- the lock ------------------------------------------------------------------


def test_one_node_per_directory(tmp_path: Path) -> None:
    home = Home(tmp_path)
    home.create()
    with NodeLock(home), pytest.raises(AlreadyRunning, match=f"pid {os.getpid()}"):
        NodeLock(home).acquire()
    with NodeLock(home):  # released: can be taken again
        pass


def test_the_lock_holds_on_a_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A node must start on a full disk (it keeps serving reads and sync):
    # writing its pid into the lock file fails there, the lock itself does not.
    home = Home(tmp_path)
    home.create()

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(os, "write", full)
        lock = NodeLock(home)
        lock.acquire()
    try:
        with pytest.raises(AlreadyRunning, match="pid unknown"):
            NodeLock(home).acquire()
    finally:
        lock.release()


def test_home_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARCHIPEL_HOME", str(tmp_path / "env"))
    assert Home.resolve().root == tmp_path / "env"
    assert Home.resolve(tmp_path / "given").root == tmp_path / "given"
    monkeypatch.delenv("ARCHIPEL_HOME")
    assert "archipel" in str(Home.resolve().root)


def test_home_is_private(tmp_path: Path) -> None:
    home = Home(tmp_path / "node")
    home.create()
    assert home.root.stat().st_mode & 0o777 == 0o700


# -- logs ----------------------------------------------------------------------


def test_json_logs_carry_fields() -> None:
    out = io.StringIO()
    logs.setup("json", "info", stream=out)
    try:
        logging.getLogger("archipel.test").info("hello", **logs.fields(peer=b"\x01\x02", n=3))
        record = json.loads(out.getvalue().strip())
        assert record["msg"] == "hello"
        assert record["peer"] == "0102"
        assert record["n"] == 3
        assert record["level"] == "info"
    finally:
        logging.getLogger().handlers.clear()


def test_libp2p_logs_reach_our_handler() -> None:
    import libp2p  # noqa: F401  (its import turns propagation off)

    out = io.StringIO()
    logs.setup("human", "info", stream=out)
    try:
        logging.getLogger("libp2p.swarm").warning("something odd")
        assert "something odd" in out.getvalue()
        assert "WARNING" in out.getvalue()
    finally:
        logging.getLogger().handlers.clear()
