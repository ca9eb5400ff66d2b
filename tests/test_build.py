"""The shipped artifact: a reproducible pyz that runs on CPython 3.9 to the newest, with `env -i`, unprivileged."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PYENV_ROOT = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")


def build(out: Path, python: str | Path = sys.executable, repo: Path = REPO) -> Path:
    subprocess.run([str(python), str(repo / "build.py"), "--output", str(out)], check=True, capture_output=True)
    return out


def pythons() -> list[Path]:
    """Every CPython >= 3.9 that pyenv has here (the machine image ships 3.9 to 3.13)."""
    found = []
    for d in sorted((PYENV_ROOT / "versions").glob("3.*")):
        parts = d.name.split(".")
        if len(parts) >= 2 and parts[1].isdigit() and int(parts[1]) >= 9 and (d / "bin" / "python3").exists():
            found.append(d / "bin" / "python3")
    return found


def test_two_builds_are_byte_identical(tmp_path):
    a = build(tmp_path / "a.pyz").read_bytes()
    b = build(tmp_path / "b.pyz").read_bytes()
    assert hashlib.sha256(a).hexdigest() == hashlib.sha256(b).hexdigest()
    assert a.startswith(b"#!/usr/bin/env python3\n")


def test_archive_holds_only_the_package_and_its_bytecode(tmp_path):
    names = zipfile.ZipFile(build(tmp_path / "x.pyz")).namelist()
    assert "__main__.py" in names and "bluegreen/cli.py" in names
    assert all(n == "__main__.py" or n.startswith("bluegreen/") for n in names)
    assert not any("__pycache__" in n for n in names)
    sources = {n for n in names if n.startswith("bluegreen/") and n.endswith(".py")}
    assert {n[:-1] for n in names if n.endswith(".pyc")} == sources  # each module's bytecode beside it, nothing else


def test_a_build_elsewhere_is_byte_identical(tmp_path):
    """The bytecode names modules by their place in the archive, not by the checkout's path."""
    other = tmp_path / "elsewhere" / "checkout"
    shutil.copytree(REPO / "bluegreen", other / "bluegreen", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(REPO / "build.py", other / "build.py")
    here = build(tmp_path / "here.pyz").read_bytes()
    assert build(tmp_path / "there.pyz", repo=other).read_bytes() == here


def _loaded_from(python: Path, pyz: Path) -> str:
    """Where the imported cli module's code says it came from: the archive-relative name when zipimport took
    the bytecode, the archive path when it compiled the source."""
    code = "import sys; sys.path.insert(0, sys.argv[1]); import bluegreen.cli as c; print(c.main.__code__.co_filename)"
    proc = subprocess.run(["env", "-i", str(python), "-c", code, str(pyz)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_bytecode_serves_the_python_that_built_it_and_every_other_compiles_the_source(tmp_path):
    found = {p.parent.parent.name.rsplit(".", 1)[0]: p for p in pythons()}
    if "3.9" not in found or len(found) < 2:
        pytest.skip("needs CPython 3.9 and a newer one (pyenv has 3.9 to 3.13 here)")
    oldest, newest = found["3.9"], found[max(found, key=lambda v: tuple(map(int, v.split("."))))]
    pyz = build(tmp_path / "built-by-3.9.pyz", python=oldest)
    assert _loaded_from(oldest, pyz) == "bluegreen.pyz/bluegreen/cli.py"  # the label compiled in, not a real path
    # On 3.9 marshal's output depends on the compiling interpreter's state: the build compiles in a fresh one,
    # so a build from a busy interpreter (the package itself imported first) gives the same bytes.
    busy = tmp_path / "busy.pyz"
    subprocess.run([str(oldest), "-c", "import sys; sys.path.insert(0, sys.argv[1]); import bluegreen.cli, bluegreen.doctor, "
                    "build; from pathlib import Path; build.build(Path(sys.argv[2]))", str(REPO), str(busy)], check=True,
                   capture_output=True, timeout=120)
    assert busy.read_bytes() == pyz.read_bytes()
    assert _loaded_from(newest, pyz) == f"{pyz}/bluegreen/cli.py"  # wrong magic number: the source, compiled
    version = subprocess.run(["env", "-i", str(newest), str(pyz), "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("bluegreen "), version.stderr


def test_pythons_from_3_9_to_newest_are_available():
    minors = {p.parent.parent.name.rsplit(".", 1)[0] for p in pythons()}
    assert "3.9" in minors, f"no CPython 3.9 under {PYENV_ROOT}/versions: the 3.9 promise is untested"


@pytest.mark.parametrize("python", pythons(), ids=lambda p: p.parent.parent.name)
def test_pyz_runs_with_empty_environment(python, tmp_path):
    pyz = build(tmp_path / "bluegreen.pyz")
    home = tmp_path / "home"
    home.mkdir()
    root = tmp_path / "root"
    (root / "projects").mkdir(parents=True)
    (root / "projects" / "api.env").write_text("IMAGE=127.0.0.1:5000/acme/api\nDB_PASSWORD=s3cret\n")
    version = subprocess.run(["env", "-i", f"HOME={home}", str(python), str(pyz), "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("bluegreen "), version.stderr
    # A dry run imports and exercises config, planning and argv building.
    dry = subprocess.run(
        ["env", "-i", f"HOME={home}", str(python), str(pyz), "api", "v1", "--dry-run", "--root", str(root)],
        capture_output=True, text=True,
    )
    assert dry.returncode == 0, dry.stderr
    assert "pull 127.0.0.1:5000/acme/api:v1" in dry.stdout and "s3cret" not in dry.stdout
    assert list(home.iterdir()) == [], "the pyz wrote into $HOME"
    bad = subprocess.run(["env", "-i", str(python), str(pyz), "../etc"], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv") or not Path("/usr/bin/python3").exists(),
                    reason="needs root (to drop to nobody), setpriv and a system python3")
def test_pyz_runs_as_a_user_whose_home_is_not_writable():
    # pytest's tmp_path is private to root; nobody needs a world-readable directory.
    work = Path(tempfile.mkdtemp(prefix="bluegreen-nobody-"))
    try:
        work.chmod(0o755)
        home = work / "home"
        home.mkdir(mode=0o555)  # owned by root: not writable for nobody
        root = work / "root"
        (root / "projects").mkdir(parents=True)
        (root / "projects" / "api.env").write_text("IMAGE=acme/api\n")
        pyz = build(work / "bluegreen.pyz")
        pyz.chmod(0o644)
        base = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "env", "-i", f"HOME={home}", "/usr/bin/python3", str(pyz)]
        result = subprocess.run([*base, "--version"], capture_output=True, text=True)
        assert result.returncode == 0 and result.stdout.startswith("bluegreen "), result.stderr
        dry = subprocess.run([*base, "api", "--dry-run", "--root", str(root)], capture_output=True, text=True)
        assert dry.returncode == 0 and "sudo -n nginx -T" in dry.stdout, dry.stderr
        assert list(home.iterdir()) == []
    finally:
        shutil.rmtree(work)
