"""``make demo`` in CI, shortened: three real daemons (processes), a partition, a heal.

The demo itself checks what it narrates — every node's state hash, the
recall winning over the cut-off delegate's act, one claim on the last loaf
waitlisted — and exits 1 if any of it fails; ``--quick`` skips waiting out
the one-minute voting window.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_the_demo_converges(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "archipel.cli.main", "demo", "--quick", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Every node converged" in done.stdout
    assert "the recall wins" in done.stdout
    assert "waiting: La Forge" in done.stdout
    for node in ("tilleuls", "forge", "jardin"):
        assert not (tmp_path / node / "node.lock").read_text().strip()  # stopped, lock released
