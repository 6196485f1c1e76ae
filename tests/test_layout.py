"""The package installs under ``archipel.*`` only, and the pure layers stay pure."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PURE_DIRS = ("crdt", "protocol")
FORBIDDEN = {"trio", "socket", "time", "random", "logging", "asyncio", "threading", "daemon"}
SUBPACKAGES = ("crdt", "protocol", "daemon", "cli", "simulations")


def forbidden_imports(source: str, package: str) -> list[str]:
    """Names of forbidden modules that ``source`` (a module of ``archipel.<package>``)
    imports, directly, through a relative import into the daemon, or via __import__."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                names = [node.module or ""]
            elif node.level >= 2:  # from ..daemon import x: resolve against archipel.<package>
                names = [f"archipel.{node.module or ''}"]
                names += [f"archipel.{alias.name}" for alias in node.names if not node.module]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name | ast.Attribute)
            and getattr(node.func, "id", getattr(node.func, "attr", ""))
            in {"__import__", "import_module"}
        ):
            found.append("dynamic import")
        for name in names:
            top = name.split(".")[0]
            if top in FORBIDDEN or name.startswith("archipel.daemon"):
                found.append(name)
    return found


def test_the_purity_check_catches_what_it_should() -> None:
    bad = (
        "import time\nfrom trio import sleep\nfrom ..daemon import x\nfrom .. import daemon\n"
        "import archipel.daemon.node\ndef f():\n    import random\n    __import__('socket')\n"
    )
    assert forbidden_imports(bad, "crdt") == [
        "time", "trio", "archipel.daemon", "archipel.daemon", "archipel.daemon.node",
        "random", "dynamic import",
    ]  # fmt: skip
    assert forbidden_imports("import hashlib\nfrom ._op import Op\n", "crdt") == []


@pytest.mark.parametrize("package", PURE_DIRS)
def test_pure_layers_import_no_io(package: str) -> None:
    modules = sorted((ROOT / package).rglob("*.py"))
    assert modules, f"no modules found under {package}/"
    offenders = {
        str(path.relative_to(ROOT)): hits
        for path in modules
        if (hits := forbidden_imports(path.read_text(), package))
    }
    assert offenders == {}, f"{package}/ must stay pure (DESIGN.md): {offenders}"


def run_python(
    code: str, cwd: Path, env_path: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin"}
    if env_path is not None:
        env["PYTHONPATH"] = env_path
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )


IMPORT_CHECK = """
import importlib, importlib.util, sys
for name in {subpackages!r}:
    importlib.import_module("archipel." + name)
generic = [n for n in ("crdt", "protocol", "daemon", "cli", "simulations")
           if importlib.util.find_spec(n) is not None]
assert not generic, f"generic top-level modules installed: {{generic}}"
import archipel.crdt
print(archipel.crdt.__file__)
"""


def test_installed_names_in_this_environment(tmp_path: Path) -> None:
    """The test environment's install (editable) exposes archipel.* and nothing generic.

    Run from an empty directory, so the repository's folders are not on sys.path.
    """
    result = run_python(IMPORT_CHECK.format(subpackages=SUBPACKAGES), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("archipel/crdt/__init__.py")


def pip(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pip", *args], capture_output=True, text=True, check=False, cwd=cwd
    )


def test_a_regular_install_has_only_archipel(tmp_path: Path) -> None:
    """``pip install .`` path: build the wheel, check its contents, import from it."""
    wheel_dir = tmp_path / "wheel"
    build = pip("wheel", "--quiet", "--no-deps", "-w", str(wheel_dir), str(ROOT), cwd=tmp_path)
    assert build.returncode == 0, build.stderr
    (wheel,) = wheel_dir.glob("archipel-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/")[0] for name in archive.namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"archipel"}
    target = tmp_path / "site"
    install = pip(
        "install", "--quiet", "--no-deps", "--target", str(target), str(wheel), cwd=tmp_path
    )
    assert install.returncode == 0, install.stderr
    # Dependencies come from this environment; archipel must come from the target.
    deps_path = str(Path(__import__("nacl").__file__).parent.parent)
    result = run_python(
        IMPORT_CHECK.format(subpackages=SUBPACKAGES), cwd=tmp_path, env_path=f"{target}:{deps_path}"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(target / "archipel" / "crdt" / "__init__.py")


def test_the_scenario_library_ships_in_the_wheel(tmp_path: Path) -> None:
    """Scenario files are package data: a regular install has them too."""
    wheel_dir = tmp_path / "wheel"
    build = pip("wheel", "--quiet", "--no-deps", "-w", str(wheel_dir), str(ROOT), cwd=tmp_path)
    assert build.returncode == 0, build.stderr
    (wheel,) = wheel_dir.glob("archipel-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert "archipel/simulations/scenarios/maelstrom-broadcast.toml" in names
