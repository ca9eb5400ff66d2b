"""The safe-file layer: no symlink (last or intermediate component), FIFO, device, hard link, stranger's
file or oversized file is ever followed, opened blocking or read unbounded."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bluegreen import safefs
from bluegreen.errors import EXIT_USAGE
from bluegreen.safefs import UnsafePath

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tree(tmp_path):
    """ROOT/projects/ with one state file, and a decoy 'root-only' file outside ROOT."""
    root = tmp_path / "root"
    (root / "projects").mkdir(parents=True)
    (root / "projects" / "app.active").write_text("blue\n")
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir(mode=0o700)
    decoy = secret_dir / "shadow"
    decoy.write_text("root:secret-hash\n")
    decoy.chmod(0o600)
    return root, decoy


def _in_subprocess(code: str, timeout: float = 10) -> subprocess.CompletedProcess:
    """Run `code` with bluegreen importable; a hang (a blocking FIFO open) fails the test, never the suite."""
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)


def test_reads_a_regular_file_and_none_when_missing(tree):
    root, _ = tree
    assert safefs.read_text(root / "projects" / "app.active", root=root) == "blue\n"
    assert safefs.read_text(root / "projects" / "nope", root=root) is None
    assert safefs.read_text(root / "missing-dir" / "nope", root=root) is None


def test_symlink_at_the_last_component_is_refused(tree):
    root, decoy = tree
    link = root / "projects" / "app.freeze"
    link.symlink_to(decoy)
    with pytest.raises(UnsafePath) as info:
        safefs.read_text(link, root=root)
    assert info.value.exit_code == EXIT_USAGE
    assert str(link) in info.value.message and "symlink" in info.value.message and str(decoy) in info.value.message
    assert "nothing was changed" in info.value.message and "docs/security.md" in info.value.message
    assert "secret-hash" not in info.value.message
    # Without an explicit root the parent is trusted, the last component is still guarded.
    with pytest.raises(UnsafePath):
        safefs.read_text(link)


def test_symlink_at_an_intermediate_component_is_refused(tree):
    root, decoy = tree
    (root / "nginx").symlink_to(decoy.parent)
    target = root / "nginx" / "shadow"
    with pytest.raises(UnsafePath) as info:
        safefs.read_text(target, root=root)
    assert str(root / "nginx") in info.value.message and "symlink" in info.value.message
    with pytest.raises(UnsafePath):
        safefs.atomic_write(target, "owned\n", root=root)
    with pytest.raises(UnsafePath):
        safefs.append(target, b"owned\n", root=root)
    with pytest.raises(UnsafePath):
        safefs.open_dir(root / "nginx" / "conf.d", root=root)
    assert decoy.read_text() == "root:secret-hash\n"
    assert sorted(os.listdir(decoy.parent)) == ["shadow"]


def test_the_trusted_root_itself_may_be_a_symlink(tmp_path):
    real = tmp_path / "real"
    (real / "projects").mkdir(parents=True)
    (real / "projects" / "a.active").write_text("green\n")
    (tmp_path / "deploy").symlink_to(real)
    root = tmp_path / "deploy"
    assert safefs.read_text(root / "projects" / "a.active", root=root) == "green\n"


def test_fifo_never_blocks(tree):
    root, _ = tree
    fifo = root / "projects" / "app.active"
    fifo.unlink()
    os.mkfifo(fifo)
    code = (
        "from bluegreen import safefs\n"
        "for fn in (lambda p: safefs.read_text(p, root=%r), lambda p: safefs.append(p, b'x', root=%r),\n"
        "           lambda p: safefs.read_tail(p, root=%r)):\n"
        "    try:\n"
        "        fn(%r)\n"
        "        print('READ')\n"
        "    except safefs.UnsafePath as exc:\n"
        "        print('REFUSED', exc.message)\n"
    ) % (str(root), str(root), str(root), str(fifo))
    proc = _in_subprocess(code)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, proc.stderr
    assert len(lines) == 3 and all(line.startswith("REFUSED") and "FIFO" in line for line in lines), proc.stdout


def test_device_through_a_symlink_is_refused(tree):
    root, _ = tree
    link = root / "projects" / "app.journal"
    link.symlink_to("/dev/zero")
    with pytest.raises(UnsafePath) as info:
        safefs.read_tail(link, root=root)
    assert "/dev/zero" in info.value.message
    with pytest.raises(UnsafePath):
        safefs.read_bytes(link, root=root)


def test_device_opened_directly_is_refused():
    # A trusted parent (/dev) with a device as the last component: refused by fstat, not read.
    with pytest.raises(UnsafePath) as info:
        safefs.read_bytes("/dev/zero")
    assert "character device" in info.value.message


def test_too_large_is_refused_and_the_tail_is_bounded(tree):
    root, _ = tree
    big = root / "projects" / "app.env"
    big.write_bytes(b"A" * 5000)
    with pytest.raises(UnsafePath) as info:
        safefs.read_bytes(big, root=root, max_bytes=4096)
    assert "larger than 4096 bytes" in info.value.message
    data, cut = safefs.read_tail(big, root=root, max_bytes=100)
    assert data == b"A" * 100 and cut
    data, cut = safefs.read_tail(big, root=root, max_bytes=10000)
    assert len(data) == 5000 and not cut


def test_hard_link_is_refused_for_reads_appends_and_opens(tree):
    root, _ = tree
    outside = root.parent / "secret" / "hl-target"
    outside.write_text("precious\n")
    link = root / "projects" / "app.lock"
    os.link(outside, link)
    with pytest.raises(UnsafePath) as info:
        safefs.read_text(link, root=root)
    assert "hard link" in info.value.message
    with pytest.raises(UnsafePath):
        safefs.append(link, b"junk\n", root=root)
    with pytest.raises(UnsafePath):
        safefs.open_regular(link, os.O_RDWR | os.O_CREAT, root=root)
    assert outside.read_text() == "precious\n"
    assert safefs.read_text(link, root=root, allow_links=True) == "precious\n"


def test_non_utf8_is_replaced_or_refused_never_a_crash(tree):
    root, _ = tree
    path = root / "projects" / "app.active"
    path.write_bytes(b"bl\xffue\n")
    assert safefs.read_text(path, root=root) == "bl\ufffdue\n"
    with pytest.raises(UnsafePath) as info:
        safefs.read_text(path, root=root, errors="strict")
    assert "not UTF-8" in info.value.message


def test_atomic_write_replaces_a_symlink_and_never_writes_through_it(tree):
    root, decoy = tree
    link = root / "projects" / "app.active"
    link.unlink()
    link.symlink_to(decoy)
    safefs.atomic_write(link, "green\n", root=root, mode=0o640)
    assert not link.is_symlink() and link.read_text() == "green\n"
    assert (link.stat().st_mode & 0o777) == 0o640
    assert decoy.read_text() == "root:secret-hash\n"
    assert [n for n in os.listdir(link.parent) if n.endswith(".tmp")] == []


def test_atomic_write_makes_missing_directories_without_following_links(tree):
    root, decoy = tree
    target = root / "nginx" / "conf.d" / "x-upstream.conf"
    with pytest.raises(FileNotFoundError):
        safefs.atomic_write(target, "x", root=root)
    safefs.atomic_write(target, "upstream x {}\n", root=root, make_dirs=True)
    assert target.read_text() == "upstream x {}\n"


def test_append_creates_and_appends_and_refuses_a_symlink(tree):
    root, decoy = tree
    journal = root / "projects" / "app.journal"
    safefs.append(journal, b"one\n", root=root)
    safefs.append(journal, b"two\n", root=root)
    assert journal.read_bytes() == b"one\ntwo\n"
    journal.unlink()
    journal.symlink_to(decoy)
    with pytest.raises(UnsafePath):
        safefs.append(journal, b"three\n", root=root)
    assert decoy.read_text() == "root:secret-hash\n"


def test_dangling_symlink_is_refused_not_created_through(tree):
    root, decoy = tree
    lock = root / "projects" / "app.lock"
    planted = decoy.parent / "created-by-us"
    lock.symlink_to(planted)
    with pytest.raises(UnsafePath):
        safefs.open_regular(lock, os.O_RDWR | os.O_CREAT, root=root)
    assert not planted.exists()


def test_create_exclusive_never_replaces_or_follows(tree):
    root, decoy = tree
    bak = root / "projects" / "app.env.bak"
    safefs.create_exclusive(bak, "IMAGE=x\n", root=root, mode=0o640)
    assert bak.read_text() == "IMAGE=x\n" and (bak.stat().st_mode & 0o777) == 0o640
    bak.unlink()
    bak.symlink_to(decoy.parent / "cron-job")
    with pytest.raises(FileExistsError):
        safefs.create_exclusive(bak, "IMAGE=x\n", root=root)
    assert not (decoy.parent / "cron-job").exists()


def test_chown_nofollow_refuses_symlinks_and_fifos(tree):
    root, decoy = tree
    link = root / "projects" / "link"
    link.symlink_to(decoy)
    with pytest.raises(UnsafePath):
        safefs.chown_nofollow(link, os.getuid(), os.getgid(), root=root)
    fifo = root / "projects" / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(UnsafePath):
        safefs.chown_nofollow(fifo, os.getuid(), os.getgid(), root=root)
    safefs.chown_nofollow(root / "projects", os.getuid(), os.getgid(), root=root)
    safefs.chown_nofollow(root, os.getuid(), os.getgid(), root=root)


def test_unlink_removes_the_link_not_the_target(tree):
    root, decoy = tree
    link = root / "projects" / "app.active"
    link.unlink()
    link.symlink_to(decoy)
    safefs.unlink(link, root=root)
    assert not os.path.lexists(link) and decoy.exists()
    safefs.unlink(link, root=root)  # missing is fine


@pytest.mark.skipif(os.geteuid() != 0, reason="the owner check applies only when running as root")
def test_a_strangers_file_in_a_root_owned_directory_is_refused(tree):
    root, _ = tree
    path = root / "projects" / "app.active"
    os.chown(path, 54321, 54321)
    with pytest.raises(UnsafePath) as info:
        safefs.read_text(path, root=root)
    assert "uid 54321" in info.value.message
    # A stranger's directory below ROOT is refused the same way.
    os.chown(root / "projects", 54321, 54321)
    with pytest.raises(UnsafePath) as info:
        safefs.read_text(path, root=root)
    assert str(root / "projects") + " is owned by uid 54321" in info.value.message
    # The owner of ROOT (the deploy user) is trusted, and controls the entries of its directories anyway.
    os.chown(root, 54321, 54321)
    assert safefs.read_text(path, root=root) == "blue\n"
    # Any owner is fine when the check is off (LOG_DIR: the container writes as any uid).
    os.chown(root, 0, 0)
    assert safefs.read_text(path, root=root, check_owner=False) == "blue\n"


def test_paths_outside_root_are_a_programming_error(tree):
    root, _ = tree
    with pytest.raises(ValueError):
        safefs.read_text(root.parent / "elsewhere", root=root)
