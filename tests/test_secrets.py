"""Secrets never leak: not in logs, RPC answers, error messages, crash reports or files.

The secrets: each node's member and device private keys (``identity.json``),
the federation secret, what is derived from them (the snapshot MAC key, the
libp2p private-network key, the mDNS tag, the X25519 form of each key), and the
RPC token. The scanner below looks for any 8 consecutive bytes of any of them in
every encoding they might take: raw, hex (any case), base64 (standard or
URL-safe, padded or not, at any alignment inside a longer encoding), base32
(likewise: invite codes are base32), Python's ``bytes`` repr (what ``str()`` of
a nacl key prints), that repr escaped in JSON, and base58 (whole keys, and the
libp2p private-key protobuf). Tests prove it finds each form.

The sweep runs two real daemons, a founder and a cell that joined it by invite,
at ``--log-level debug`` in both log formats; drives the founder through every
RPC method (good, bad and unknown calls, over the socket and over TCP with good
and bad tokens), failing ``archipel`` commands, start-up failures (bad config,
corrupt identity, damaged database, directory locked) and a crash (an exception
that reaches the top of a running node); stops them with SIGTERM; then scans
everything they produced. The only place a secret may appear is an invite code,
which carries the federation secret by design: the scan must find it there.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import json
import logging
import os
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import base58
import pytest
from click.testing import CliRunner
from nacl.signing import SigningKey

from archipel.cli._common import READY
from archipel.cli.main import main as cli
from archipel.daemon import identity as identity_mod
from archipel.daemon import logs, rpc
from archipel.daemon.config import Config
from archipel.daemon.identity import Identity
from archipel.daemon.invite import CellCard, Invite, encode_card, make_invite
from archipel.daemon.mdns import federation_tag
from archipel.daemon.node import Node
from archipel.daemon.paths import Home, HomeError
from archipel.daemon.storage import Store
from archipel.daemon.transport import Transport, pnet_key

CAP_S = 60
WINDOW = 8
"""Bytes: any run this long of a secret, in any encoding, is a leak."""

# -- the scanner -------------------------------------------------------------------------


class Secret(NamedTuple):
    name: str
    raw: bytes
    whole: tuple[str, ...] = ()
    """Strings looked for whole (encodings with no fixed alignment: base58)."""


def _core(encoded: str, before_bits: int, bits: int, per_char: int) -> str:
    """The characters of ``encoded`` that depend on the secret's bits only."""
    first = -(-before_bits // per_char)
    return encoded[first : (before_bits + bits) // per_char]


_B64_CHARS = -(-WINDOW * 8 // 6)
_B32_CHARS = -(-WINDOW * 8 // 5)
_HEX_RUN = re.compile(rf"[0-9a-f]{{{2 * WINDOW},}}")
_B64_RUN = re.compile(rf"[A-Za-z0-9+/]{{{_B64_CHARS},}}")
_B32_RUN = re.compile(rf"[a-z2-7]{{{_B32_CHARS},}}")
_URLSAFE = str.maketrans("-_", "+/")


class Scanner:
    """Finds any :data:`WINDOW` bytes of any secret, in any of the encodings above."""

    def __init__(self, secrets: Sequence[Secret]) -> None:
        self.raw: dict[bytes, str] = {}
        self.hex: dict[str, str] = {}
        self.b64: dict[str, str] = {}
        self.b32: dict[str, str] = {}
        self.literal: dict[str, str] = {}
        for secret in secrets:
            name, raw = secret.name, secret.raw
            assert len(raw) >= WINDOW, name
            for i in range(len(raw) - WINDOW + 1):
                window = raw[i : i + WINDOW]
                self.raw[window] = f"{name} (raw bytes)"
                self.hex[window.hex()] = f"{name} (hex)"
                shown = repr(window)[2:-1]
                self.literal[shown] = f"{name} (bytes repr)"
                self.literal[json.dumps(shown)[1:-1]] = f"{name} (bytes repr in JSON)"
            for shift in range(3):
                encoded = base64.b64encode(bytes(shift) + raw).decode()
                core = _core(encoded, 8 * shift, 8 * len(raw), 6)
                for i in range(len(core) - _B64_CHARS + 1):
                    self.b64[core[i : i + _B64_CHARS]] = f"{name} (base64)"
            for shift in range(5):
                encoded = base64.b32encode(bytes(shift) + raw).decode().lower()
                core = _core(encoded, 8 * shift, 8 * len(raw), 5)
                for i in range(len(core) - _B32_CHARS + 1):
                    self.b32[core[i : i + _B32_CHARS]] = f"{name} (base32)"
            for text in (base58.b58encode(raw).decode(), *secret.whole):
                self.literal[text] = f"{name} (whole, e.g. base58)"

    def find(self, data: str | bytes) -> set[str]:
        """What leaks in ``data``: a set of "secret (encoding)" descriptions."""
        if isinstance(data, bytes):
            blobs = [data]
            text = data.decode("latin-1")  # one char per byte: the text encodings survive
        else:
            text = data
            blobs = [data.encode("utf-8", "surrogatepass"), data.encode("latin-1", "replace")]
        found: set[str] = set()
        for blob in blobs:
            for i in range(len(blob) - WINDOW + 1):
                hit = self.raw.get(blob[i : i + WINDOW])
                if hit is not None:
                    found.add(hit)
        lower = text.lower()
        for table, pattern, haystack, size in (
            (self.hex, _HEX_RUN, lower, 2 * WINDOW),
            (self.b64, _B64_RUN, text.translate(_URLSAFE), _B64_CHARS),
            (self.b32, _B32_RUN, lower, _B32_CHARS),
        ):
            for match in pattern.finditer(haystack):
                run = match.group()
                for i in range(len(run) - size + 1):
                    hit = table.get(run[i : i + size])
                    if hit is not None:
                        found.add(hit)
        found.update(name for needle, name in self.literal.items() if needle in text)
        return found


def key_secrets(name: str, key: SigningKey) -> list[Secret]:
    seed, public = bytes(key), bytes(key.verify_key)
    protobuf = bytes([0x08, 0x01, 0x12, 0x40]) + seed + public  # libp2p's PrivateKey message
    return [
        Secret(
            name,
            seed,
            whole=(
                base58.b58encode(seed + public).decode(),
                base58.b58encode(protobuf).decode(),
            ),
        ),
        Secret(f"{name}, X25519 form", bytes(key.to_curve25519_private_key())),
    ]


def node_secrets(label: str, ident: Identity) -> list[Secret]:
    out = [
        *key_secrets(f"{label} member key", ident.member),
        *key_secrets(f"{label} device key", ident.device),
        Secret(f"{label} snapshot key", ident.snapshot_key()),
    ]
    if ident.secret is not None:
        out += [
            Secret("federation secret", ident.secret),
            Secret("pnet key", pnet_key(ident.secret)),
            Secret("mDNS tag", bytes.fromhex(federation_tag(ident.secret))),
        ]
    return out


def token_secret(token: str) -> Secret:
    return Secret("RPC token", base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))


# -- the scanner finds what it must, and only that ------------------------------------------


def _identity() -> Identity:
    return Identity.generate("Les Tilleuls").with_federation(os.urandom(32), "F", os.urandom(32))


def test_the_scanner_finds_a_secret_in_every_encoding() -> None:
    ident = _identity()
    assert ident.secret is not None
    secret, seed = ident.secret, bytes(ident.member)
    scanner = Scanner(node_secrets("a", ident))
    padding = os.urandom(5)
    leaks: dict[str, str | bytes] = {
        "raw": b"\x00junk" + secret + b"junk",
        "raw, 8 bytes of it": b"junk" + secret[10:18] + b"junk",
        "latin-1 text": "x" + secret.decode("latin-1"),
        "hex": f"secret={secret.hex()}",
        "HEX": f"secret={secret.hex().upper()}",
        "hex, first 16 digits (the human log's bytes field)": f"key={seed.hex()[:16]}",
        "bytes repr": f"{secret!r}",
        "str() of a SigningKey": f"key: {ident.member}",
        "bytes repr in a JSON log": json.dumps({"msg": str(ident.device)}),
        "base58 of the libp2p private key": base58.b58encode(
            bytes([8, 1, 18, 64]) + seed + bytes(ident.member.verify_key)
        ).decode(),
        "base58 of the seed": base58.b58encode(seed).decode(),
        "pnet key as libp2p's hex psk": pnet_key(secret).hex(),
        "snapshot key": ident.snapshot_key().hex(),
        "mDNS tag": federation_tag(secret),
        "X25519 key": bytes(ident.device.to_curve25519_private_key()).hex(),
    }
    for shift in range(6):  # at every alignment inside a longer encoding
        blob = padding[:shift] + secret + padding
        leaks[f"base64 +{shift}"] = base64.b64encode(blob).decode()
        leaks[f"base64 url +{shift}"] = base64.urlsafe_b64encode(blob).decode().rstrip("=")
        leaks[f"base32 +{shift}"] = base64.b32encode(blob).decode().lower().rstrip("=")
        leaks[f"BASE32 +{shift}"] = base64.b32encode(blob).decode()
    invite = make_invite(
        ident.member, federation=bytes(32), federation_name="F", secret=secret,
        bootstrap=(), admission=bytes(32), expires_ms=2**40,
    )  # fmt: skip
    leaks["an invite code"] = invite
    leaks["an invite code, wrapped and upper case"] = "\n".join(
        invite.upper()[i : i + 60] for i in range(0, len(invite), 60)
    )
    missed = [what for what, data in leaks.items() if not scanner.find(data)]
    assert not missed


def test_the_scanner_finds_nothing_in_public_data() -> None:
    ident = _identity()
    scanner = Scanner(node_secrets("a", ident))
    assert ident.federation is not None
    public = [
        ident.member_public.hex(),
        ident.device_public.hex(),
        ident.federation.hex(),
        base64.b64encode(ident.member_public).decode(),
        base58.b58encode(ident.device_public).decode(),
        repr(ident),
        encode_card(CellCard("a", (ident.member_public,), (ident.device_public,))),
        os.urandom(1 << 16),
        base64.b64encode(os.urandom(1 << 16)).decode(),
        os.urandom(1 << 15).hex(),
    ]
    assert [scanner.find(data) for data in public] == [set()] * len(public)


# -- objects that hold secrets print none --------------------------------------------------


def test_objects_that_hold_secrets_do_not_print_them(tmp_path: Path) -> None:
    ident = _identity()
    assert ident.secret is not None
    assert ident.federation is not None
    scanner = Scanner(node_secrets("a", ident))
    home = Home(tmp_path / "node")
    home.create()
    invite = Invite(
        federation=ident.federation, federation_name="F", secret=ident.secret, bootstrap=(),
        admission=bytes(32), expires_ms=1, inviter=ident.member_public,
    )  # fmt: skip
    with Store.open(home.database, snapshot_key=ident.snapshot_key()) as store:
        holders: list[object] = [
            ident,
            invite,
            store,
            Transport(ident.device, ident.secret, lambda key: True),
            Node(home, Config(), ident),
        ]
        for holder in holders:
            for shown in (repr(holder), str(holder), f"{holder}", f"{holder!r}"):
                assert not scanner.find(shown), (type(holder).__name__, shown)
    assert "secret=<hidden>" in repr(ident)
    assert ident.cell in repr(ident)


def test_logs_show_no_private_key_even_when_handed_one() -> None:
    """str() of a nacl SigningKey is its seed: a field or %s argument must not print it."""
    ident = _identity()
    scanner = Scanner(node_secrets("a", ident))
    assert scanner.find(str(ident.member))  # the trap this test is about
    log = logging.getLogger("archipel.test_secrets")
    for fmt in ("human", "json"):
        out = io.StringIO()
        handler = logging.StreamHandler(out)
        handler.setFormatter(logs.JsonFormatter() if fmt == "json" else logs.HumanFormatter())
        log.addHandler(handler)
        log.propagate = False
        try:
            log.warning("identity %s key %s", ident, ident.device)
            log.warning("by name %(key)s", {"key": ident.member})
            log.warning(
                "fields",
                **logs.fields(
                    key=ident.member, box=[ident.device], ident=ident, pub=ident.member.verify_key
                ),
            )
        finally:
            log.removeHandler(handler)
            log.propagate = True
        written = out.getvalue()
        assert written.count("<secret>") >= 3, written
        assert ident.member_public.hex()[:16] in written  # the public key is still shown
        assert not scanner.find(written), (fmt, written)


def test_a_token_file_others_can_read_is_replaced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "rpc.token"
    token = rpc.load_or_create_token(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert rpc.load_or_create_token(path) == token  # kept while it is private
    path.chmod(0o644)
    fresh = rpc.load_or_create_token(path)
    assert fresh != token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "rpc.token replaced" in caplog.text
    assert token not in caplog.text
    assert fresh not in caplog.text
    for junk in (b"short", b"\xff" * 64, b"x" * 40 + b"\x00" + b"y" * 40):
        path.write_bytes(junk)
        path.chmod(0o600)
        made = rpc.load_or_create_token(path)
        assert len(made) >= 32
        assert path.read_text().strip() == made
    path.unlink()
    path.symlink_to(tmp_path / "elsewhere")
    made = rpc.load_or_create_token(path)
    assert not path.is_symlink()
    assert path.read_text().strip() == made
    path.unlink()
    path.mkdir()
    with pytest.raises(HomeError, match="is a directory"):
        rpc.load_or_create_token(path)


# -- the sweep: two daemons, everything they produce ----------------------------------------

ARCHIPEL = [sys.executable, "-m", "archipel.cli.main"]
FAULTY = [
    sys.executable,
    "-c",
    """
import logging
import sys
from archipel.daemon import methods

_register = methods.Methods._register


def _with_faults(self):
    '''More queries: one that fails (an internal error), one that crashes the node, one
    that logs the device key (a leak planted on purpose).'''
    _register(self)
    node = self.node

    async def fail(params):
        identity = node.identity  # a frame that holds every secret
        raise RuntimeError(f"injected failure (cell {identity.cell})")

    async def crash(params):
        async def boom():
            transport = node.transport  # holds the pnet key
            raise RuntimeError(f"injected crash ({type(transport).__name__})")

        node._nursery.start_soon(boom)
        return "crashing"

    async def plant(params):
        # a leak on purpose, through the real log pipeline: the scan must catch it
        seed = node.identity.device.encode().hex()
        logging.getLogger("archipel.planted").debug("planted %s", seed)
        return "planted"

    self.queries["test.fail"] = (frozenset(), fail)
    self.queries["test.crash"] = (frozenset(), crash)
    self.queries["test.plant"] = (frozenset(), plant)


methods.Methods._register = _with_faults
from archipel.cli.main import main
main(sys.argv[1:], prog_name="archipel")
""",
]
"""``archipel`` with more RPC queries: ``test.fail``, ``test.crash`` and ``test.plant``."""


@dataclasses.dataclass
class Sweep:
    artifacts: list[tuple[str, bytes]] = dataclasses.field(default_factory=list)
    """Everything produced that must hold no secret."""
    invites: list[tuple[str, bytes]] = dataclasses.field(default_factory=list)
    """What carries an invite code, hence the federation secret, by design."""
    planted: list[tuple[str, bytes]] = dataclasses.field(default_factory=list)
    """The log lines of ``test.plant``: a leak on purpose, taken out of the artifacts."""
    seen: dict[str, tuple[int, str]] = dataclasses.field(default_factory=dict)
    """What the user saw of each failing command: (exit status, stderr and stdout)."""
    secrets: list[Secret] = dataclasses.field(default_factory=list)
    connected: bool = False
    root: Path = Path()

    def add(self, name: str, data: str | bytes) -> None:
        self.artifacts.append(
            (name, data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)
        )

    def ran(self, name: str, done: subprocess.CompletedProcess[bytes]) -> None:
        out = done.stdout + b"\n" + done.stderr
        self.add(name, out)
        self.seen[name] = (done.returncode, out.decode(errors="replace"))


def archipel(*args: str, cmd: Sequence[str] = ARCHIPEL) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*cmd, *args], capture_output=True, timeout=CAP_S, check=False)


class Daemon:
    """``archipel run`` in a process; all it prints collected, by a thread."""

    def __init__(
        self, home: Path, fmt: str, cmd: Sequence[str] = ARCHIPEL, *, port: int = 0
    ) -> None:
        self.home = home
        self.process = subprocess.Popen(
            [*cmd, "run", "--home", str(home), "--listen", f"/ip4/127.0.0.1/tcp/{port}",
             "--no-mdns", "--log-level", "debug", "--log-format", fmt],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        assert self.process.stdout is not None
        self.said = bytearray()
        deadline = time.monotonic() + CAP_S
        while not READY.search(self.said):
            left = deadline - time.monotonic()
            assert left > 0, bytes(self.said)
            assert self.process.poll() is None, bytes(self.said)
            ready, _, _ = select.select([self.process.stdout], [], [], left)
            if ready:
                self.said += os.read(self.process.stdout.fileno(), 65536)
        self._drain = threading.Thread(target=self._read_rest, daemon=True)
        self._drain.start()

    def _read_rest(self) -> None:
        out = self.process.stdout
        assert out is not None
        with contextlib.suppress(OSError, ValueError):
            for chunk in iter(lambda: os.read(out.fileno(), 65536), b""):
                self.said += chunk

    def stop(self, how: signal.Signals | None = signal.SIGTERM) -> tuple[int, bytes]:
        """Send ``how`` (or nothing: the process ends on its own); its status and all it said."""
        if how is not None:
            self.process.send_signal(how)
        code = self.process.wait(timeout=CAP_S)
        self._drain.join(timeout=CAP_S)
        return code, bytes(self.said)


def rpc_raw(home: Path, body: bytes, *, port: int | None = None, headers: str = "") -> bytes:
    """One HTTP request to a node's RPC, the whole raw answer (status line, headers, body)."""
    if port is None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address: Any = str(home / "rpc.sock")
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        address = ("127.0.0.1", port)
    with sock:
        sock.settimeout(CAP_S)
        sock.connect(address)
        head = f"POST / HTTP/1.1\r\nHost: n\r\nConnection: close\r\n{headers}"
        sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        answer = bytearray()
        while chunk := sock.recv(65536):
            answer += chunk
    return bytes(answer)


def call(method: str, **params: Any) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode()


def result_of(raw: bytes) -> Any:
    return json.loads(raw.partition(b"\r\n\r\n")[2])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


NOT_FOUND_IDS = {
    "ops.get": "id", "ops.history": "id", "proposal.show": "proposal", "mandate.show": "mandate",
    "mandates.history": "delegate", "council.show": "council", "aid.allocation": "offer",
    "aid.coverage": "request", "lot.show": "lot", "ledger.balances": "cell",
}  # fmt: skip


def sweep_rpc(sweep: Sweep, home: Path, port: int, token: str, fmt: str, card: str) -> None:
    """Every method, well and badly called; the socket and TCP; one invite made."""
    node = f"rpc {fmt}"
    soon = time.time_ns() // 1_000_000 + 3_600_000
    for method, params in [
        ("note", {"text": f"hello in {fmt}"}),
        ("alert.raise", {"text": "police at the square", "area": "centre", "expires": soon}),
        ("pulse.frustration", {"text": "meetings run late"}),  # signed by the device key
        (
            "ledger.entry",
            {"type": "contribution", "resource": "flour", "quantity": 5, "unit": "kg"},
        ),
    ]:
        raw = rpc_raw(home, call(method, **params))
        assert "result" in result_of(raw), raw
        sweep.add(f"{node} {method}", raw)
    methods = result_of(rpc_raw(home, call("rpc.methods")))["result"]
    for method in methods["queries"]:
        if method in ("test.crash", "test.plant", "node.offline", "events.poll"):
            continue
        sweep.add(f"{node} {method}", rpc_raw(home, call(method)))
        sweep.add(f"{node} {method} bad", rpc_raw(home, call(method, bogus="x" * 40)))
        if method in NOT_FOUND_IDS:
            wrong = {NOT_FOUND_IDS[method]: "ab" * 32}
            sweep.add(f"{node} {method} not found", rpc_raw(home, call(method, **wrong)))
            wrong = {NOT_FOUND_IDS[method]: 12}
            sweep.add(f"{node} {method} wrong type", rpc_raw(home, call(method, **wrong)))
    for method in methods["actions"]:
        sweep.add(f"{node} {method} empty", rpc_raw(home, call(method)))
    events = result_of(rpc_raw(home, call("events.poll", cursor=0, limit=1000)))["result"]
    sweep.add(f"{node} events", json.dumps(events))
    for event in events["events"]:
        sweep.add(f"{node} ops.get", rpc_raw(home, call("ops.get", id=event["id"])))
    for body in (
        b"{not json", b"[" * 5000, b"[]", b'{"jsonrpc":"2.0","id":1,"method":"no.such"}',
        b'{"jsonrpc":"2.0","id":1,"method":"node.offline","params":{"offline":"no"}}',
        call("invite.create", card="archipel-card1-garbage"),
        call("invite.create", card=card),  # that cell was admitted already: refused
        call("events.poll", cursor=-1), call("note", text=1.5),
    ):  # fmt: skip
        sweep.add(f"{node} bad body {body[:30]!r}", rpc_raw(home, body))
    sweep.add(f"{node} tcp, no token", rpc_raw(home, call("node.info"), port=port))
    wrong = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    for headers in (f"Authorization: Bearer {wrong}\r\n", f"Authorization: {token}\r\n"):
        sweep.add(
            f"{node} tcp, wrong token",
            rpc_raw(home, call("note", text="no"), port=port, headers=headers),
        )
    sweep.add(f"{node} test.plant", rpc_raw(home, call("test.plant")))
    good = f"Authorization: Bearer {token}\r\n"
    sweep.add(f"{node} tcp, token", rpc_raw(home, call("node.status"), port=port, headers=good))
    # an invite for a new cell: the one answer that carries the federation secret
    newcomer = CellCard(fmt, (bytes(SigningKey.generate().verify_key),), ())
    made = rpc_raw(home, call("invite.create", card=encode_card(newcomer)))
    assert "code" in result_of(made)["result"], made
    sweep.invites.append((f"{node} invite.create", made))


def sweep_cli(sweep: Sweep, home_a: Path, home_b: Path, code: str, fmt: str) -> None:
    """Failing (and a few working) ``archipel`` commands, in-process as click runs them."""
    ident = identity_mod.load(home_a / "identity.json")
    assert ident.federation is not None
    assert ident.secret is not None
    expired = make_invite(
        ident.member, federation=ident.federation, federation_name="F", secret=ident.secret,
        bootstrap=(), admission=bytes(32), expires_ms=1,
    )  # fmt: skip
    middle = len(code) // 2
    damaged = code[:middle] + ("a" if code[middle] != "a" else "b") + code[middle + 1 :]
    missing = str(home_a.parent / "nowhere")
    commands = [
        ["status", "--home", str(home_a)],
        ["peers", "--home", str(home_a)],
        ["log", "--home", str(home_a)],
        ["call", "no.such", "--home", str(home_a)],
        ["call", "ops.get", "id=zz", "--home", str(home_a)],
        ["call", "ops.get", "id=" + "00" * 32, "--home", str(home_a)],
        ["call", "test.fail", "--home", str(home_a)],
        ["call", "invite.create", "card=archipel-card1-garbage", "--home", str(home_a)],
        ["show", "00", "--home", str(home_a)],
        ["vote", "00", "x", "--home", str(home_a)],
        ["mandate", "show", "zz", "--home", str(home_a)],
        ["invite", "archipel-card1-garbage", "--home", str(home_a)],
        ["status", "--home", missing],
        ["init", "--cell", "again", "--home", str(home_a)],
        ["join", "garbage", "--home", str(home_b)],
        ["join", damaged, "--home", str(home_b)],
        ["join", code[:-9], "--home", str(home_b)],
        ["join", expired, "--home", str(home_b)],
        ["join", code, "--home", str(home_b)],  # already a member
        ["join", code, "--home", missing],
    ]
    runner = CliRunner()
    for i, args in enumerate(commands):
        result = runner.invoke(cli, args)
        name = f"cli {fmt} #{i} {' '.join(a[:40] for a in args)}"
        text = result.output
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            text += "".join(traceback.format_exception(result.exception))
        sweep.add(name, text)
        sweep.seen[name] = (result.exit_code, text)


def write_config(home: Path, port: int) -> None:
    (home / "config.toml").write_text(f"[rpc]\ntcp_port = {port}\n\n[network]\nmdns = false\n")


def startup_failures(sweep: Sweep, home: Path, root: Path) -> None:
    """``archipel run`` where it cannot start: what the user sees, all at once (in parallel)."""
    cases: dict[str, Path] = {}

    def broken(name: str) -> Path:
        copy = root / name
        shutil.copytree(home, copy, ignore=shutil.ignore_patterns("rpc.sock", "node.lock"))
        cases[name] = copy
        return copy

    (broken("bad config") / "config.toml").write_text("[network]\nlisen = []\n")
    ident = broken("truncated identity") / "identity.json"
    ident.write_bytes(ident.read_bytes()[:200])
    ident = broken("identity with a bad seed") / "identity.json"
    data = json.loads(ident.read_text())
    data["member_seed"] = data["member_seed"] + "00"  # the real seed, one byte longer
    data["secret"] = "zz" + data["secret"][2:]
    ident.write_text(json.dumps(data))
    ident = broken("identity readable by others") / "identity.json"
    ident.chmod(0o644)
    db = broken("damaged database") / "node.db"
    for extra in ("node.db-wal", "node.db-shm"):
        (db.parent / extra).unlink(missing_ok=True)
    db.write_bytes(db.read_bytes()[:5000])
    run = ["run", "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns", "--log-level", "debug"]
    started = {
        name: subprocess.Popen(
            [*ARCHIPEL, *run, "--home", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for name, path in cases.items()
    }
    for name, process in started.items():
        out, err = process.communicate(timeout=CAP_S)
        sweep.ran(
            f"run, {name}", subprocess.CompletedProcess(process.args, process.returncode, out, err)
        )


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Sweep:
    root = tmp_path_factory.mktemp("secrets")
    home_a, home_b = root / "a", root / "b"
    found = Sweep(root=root)
    done = archipel("init", "--cell", "A", "--new-federation", "F", "--home", str(home_a))
    assert done.returncode == 0, done.stderr
    found.ran("init a", done)
    done = archipel("init", "--cell", "B", "--home", str(home_b))
    assert done.returncode == 0, done.stderr
    found.ran("init b", done)
    card = next(w for w in done.stdout.decode().split() if w.startswith("archipel-card1-"))
    port, p2p_port = free_port(), free_port()  # A keeps its address: B finds it after restarts
    write_config(home_a, port)
    write_config(home_b, 0)

    # human logs; the founder invites B, which joins and syncs
    a = Daemon(home_a, "human", FAULTY, port=p2p_port)
    b: Daemon | None = None
    try:
        token = (home_a / "rpc.token").read_text().strip()
        done = archipel("invite", card, "--json", "--home", str(home_a))
        assert done.returncode == 0, done.stderr
        found.invites.append(("cli invite", done.stdout + done.stderr))
        code = json.loads(done.stdout)["code"]
        done = archipel("join", code, "--home", str(home_b))
        assert done.returncode == 0, done.stderr
        found.ran("join b", done)
        b = Daemon(home_b, "human")
        # B syncs from A over libp2p (pnet, Noise, Yamux): wait for it by a long poll
        page = result_of(rpc_raw(home_b, call("events.poll", cursor=0, timeout_s=30)))
        found.connected = bool(page["result"]["events"])
        sweep_rpc(found, home_a, port, token, "human", card)
        sweep_cli(found, home_a, home_b, code, "human")
        locked = archipel("run", "--home", str(home_a), "--no-mdns")
        found.ran("run, directory locked", locked)
        cursor = page["result"]["cursor"]
        rpc_raw(home_a, call("note", text="to B"))
        page = result_of(rpc_raw(home_b, call("events.poll", cursor=cursor, timeout_s=30)))
        found.connected &= bool(page["result"]["events"])
    finally:
        for name, daemon in (("a human", a), ("b human", b)):
            if daemon is not None:
                status, said = daemon.stop()
                found.add(f"daemon {name}", said)
                found.seen[f"daemon {name}"] = (status, said.decode(errors="replace"))

    # JSON logs; A ends with a crash instead of a signal
    a = Daemon(home_a, "json", FAULTY, port=p2p_port)
    b = None
    try:
        b = Daemon(home_b, "json")
        cursor = result_of(rpc_raw(home_b, call("events.poll", cursor=0, limit=1000)))["result"][
            "cursor"
        ]
        rpc_raw(home_a, call("note", text="to B again"))
        page = result_of(rpc_raw(home_b, call("events.poll", cursor=cursor, timeout_s=30)))
        found.connected &= bool(page["result"]["events"])
        sweep_rpc(found, home_a, port, token, "json", card)
        sweep_cli(found, home_a, home_b, code, "json")
        found.add("rpc test.crash", rpc_raw(home_a, call("test.crash")))
        status, said = a.stop(None)  # it crashes by itself
        found.add("daemon a crashed", said)
        found.seen["daemon a crashed"] = (status, said.decode(errors="replace"))
    finally:
        if a.process.poll() is None:
            a.stop(signal.SIGKILL)
        if b is not None:
            status, said = b.stop()
            found.add("daemon b json", said)
            found.seen["daemon b json"] = (status, said.decode(errors="replace"))

    for i, (name, data) in enumerate(found.artifacts):
        if name.startswith("daemon a"):
            lines = data.split(b"\n")
            found.planted += [(name, line) for line in lines if b"planted" in line]
            found.artifacts[i] = (name, b"\n".join(ln for ln in lines if b"planted" not in ln))
    startup_failures(found, home_a, root)
    # what is left on disk, but the files that hold the secrets on purpose
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name not in ("identity.json", "rpc.token"):
            found.add(f"file {path.relative_to(root)}", path.read_bytes())
    found.secrets = [
        *node_secrets("A", identity_mod.load(home_a / "identity.json")),
        *node_secrets("B", identity_mod.load(home_b / "identity.json")),
        token_secret(token),
    ]
    return found


def test_the_sweep_covered_what_it_claims(sweep: Sweep) -> None:
    assert sweep.connected, "B never synced from A: libp2p was not exercised"
    names = " | ".join(name for name, _ in sweep.artifacts)
    for expected in ("daemon a human", "daemon b json", "daemon a crashed", "tcp, wrong token",
                     "file a/node.db", "test.fail", "run, damaged database"):  # fmt: skip
        assert expected in names
    said = dict(sweep.artifacts)
    debug = said["daemon a human"].decode(errors="replace")
    assert " DEBUG " in debug
    assert "libp2p" in debug
    assert '"level": "debug"' in said["daemon b json"].decode(errors="replace")
    assert sum(len(data) for _, data in sweep.artifacts) > 100_000


def test_no_secret_appears_anywhere(sweep: Sweep) -> None:
    scanner = Scanner(sweep.secrets)
    leaks = {name: sorted(found) for name, data in sweep.artifacts if (found := scanner.find(data))}
    assert not leaks


def test_the_scan_sees_the_secrets_where_they_are_meant_to_be(sweep: Sweep) -> None:
    """The same scan, on real output: an invite code carries the federation secret (base32),
    identity.json every key (hex), rpc.token the token. A scan that missed them proves nothing."""
    scanner = Scanner(sweep.secrets)
    assert len(sweep.invites) == 3
    for name, data in sweep.invites:
        assert "federation secret (base32)" in scanner.find(data), name
    assert len(sweep.planted) == 2, [(n, ln[:120]) for n, ln in sweep.planted]  # one per format
    for name, line in sweep.planted:
        assert "A device key (hex)" in scanner.find(line), (name, line)
    found = scanner.find((sweep.root / "a" / "identity.json").read_bytes())
    assert {"A member key (hex)", "A device key (hex)", "federation secret (hex)"} <= found
    assert "RPC token (base64)" in scanner.find((sweep.root / "a" / "rpc.token").read_bytes())


def test_each_failure_says_what_happened_in_one_line(sweep: Sweep) -> None:
    expect = {
        "run, bad config": "unknown setting network.lisen",
        "run, truncated identity": "not JSON",
        "run, identity with a bad seed": "expected 32 bytes, got 33",
        "run, identity readable by others": "chmod 600",
        "run, damaged database": "damaged",
        "run, directory locked": "another Archipel node",
    }
    for name, message in expect.items():
        status, text = sweep.seen[name]
        assert status == 1, (name, text)
        assert message in text, (name, text)
        assert "Traceback" not in text, (name, text)
    for name, (status, text) in sweep.seen.items():
        if name.startswith("cli "):
            assert status in (0, 1, 2, 3), (name, status, text)
            assert "Traceback" not in text, (name, text)
    assert sweep.seen["daemon a human"][0] == 0
    assert sweep.seen["daemon b json"][0] == 0


def test_a_crash_is_logged_in_the_log_format_and_ends_in_one_line(sweep: Sweep) -> None:
    status, text = sweep.seen["daemon a crashed"]
    assert status == 1
    records = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    crash = [r for r in records if r["level"] == "critical"]
    assert crash, text[-3000:]
    assert "injected crash" in crash[0]["exc"]
    assert any(r["msg"] == "node stopped" for r in records)  # it shut down cleanly first
    assert "the node stopped on an unexpected error" in text
    outside = [line for line in text.splitlines() if not line.startswith("{")]
    assert not any("Traceback" in line for line in outside), outside
