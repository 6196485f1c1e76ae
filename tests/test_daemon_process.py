"""``archipel init`` and ``archipel run`` as a cell uses them: real processes, real signals."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from archipel.cli._common import READY

ARCHIPEL = [sys.executable, "-m", "archipel.cli.main"]
CAP_S = 60


def archipel(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*ARCHIPEL, *args], capture_output=True, text=True, timeout=CAP_S, check=False
    )


def start(home: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    """Start a daemon; return it once it says where it listens (and what it said)."""
    process = subprocess.Popen(
        [*ARCHIPEL, "run", "--home", str(home), "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns",
         *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    assert process.stderr is not None
    said = b""
    deadline = time.monotonic() + CAP_S
    while not READY.search(said):
        left = deadline - time.monotonic()
        assert left > 0, said
        assert process.poll() is None, said
        ready, _, _ = select.select([process.stderr], [], [], left)
        if ready:
            said += os.read(process.stderr.fileno(), 65536)
    return process, said.decode()


def stop(process: subprocess.Popen[bytes], how: signal.Signals) -> tuple[int, str]:
    process.send_signal(how)
    _, err = process.communicate(timeout=CAP_S)
    return process.returncode, err.decode()


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM])
def test_run_stops_cleanly_on_a_signal_and_keeps_its_ops(
    tmp_path: Path, how: signal.Signals
) -> None:
    home = tmp_path / "node"
    made = archipel("init", "--cell", "Les Tilleuls", "--new-federation", "F", "--home", str(home))
    assert made.returncode == 0, made.stderr
    assert "archipel run" in made.stdout
    assert (home / "identity.json").stat().st_mode & 0o777 == 0o600
    assert (home / "config.toml").exists()

    process, said = start(home)
    assert "/ip4/127.0.0.1/tcp/" in said
    # one node per directory: a second one is refused with a clear message
    second = archipel("run", "--home", str(home), "--no-mdns")
    assert second.returncode == 1
    assert "another Archipel node" in second.stderr
    assert "Traceback" not in second.stderr
    code, err = stop(process, how)
    assert code == 0, err
    assert "stopping" in err
    assert "Traceback" not in err
    assert not (home / "rpc.sock").exists()

    # it starts again from its files, with JSON logs on request
    process, said = start(home, "--log-format", "json", "--log-level", "info")
    code, err = stop(process, signal.SIGTERM)
    assert code == 0, err
    records = [json.loads(line) for line in (said + err).splitlines() if line.startswith("{")]
    ready = [r for r in records if r["msg"] == "node ready"]
    assert ready, said + err
    assert ready[0]["ops"] == 1  # the genesis, from disk
    assert {"ts", "level", "logger", "peer_id"} <= set(ready[0])


def test_init_refuses_to_overwrite_a_node(tmp_path: Path) -> None:
    home = tmp_path / "node"
    assert archipel("init", "--cell", "A", "--home", str(home)).returncode == 0
    before = (home / "identity.json").read_bytes()
    again = archipel("init", "--cell", "B", "--new-federation", "F", "--home", str(home))
    assert again.returncode == 1
    assert "already holds a node" in again.stderr
    assert (home / "identity.json").read_bytes() == before


def test_run_without_a_federation_says_what_to_do(tmp_path: Path) -> None:
    home = tmp_path / "node"
    made = archipel("init", "--cell", "A", "--home", str(home))
    assert "archipel-card1-" in made.stdout
    ran = archipel("run", "--home", str(home))
    assert ran.returncode == 1
    assert "archipel join" in ran.stderr


def test_a_bad_config_is_named_and_nothing_starts(tmp_path: Path) -> None:
    home = tmp_path / "node"
    archipel("init", "--cell", "A", "--new-federation", "F", "--home", str(home))
    (home / "config.toml").write_text("[network]\nlisen = []\n")
    ran = archipel("run", "--home", str(home))
    assert ran.returncode == 1
    assert "unknown setting network.lisen" in ran.stderr
