"""`bluegreen backup-logs` on real trees of aged files (ages set with os.utime): exactly the right files are
moved and pruned, and a backup directory that is not writable, a full disk or an unreadable log loses nothing."""

from __future__ import annotations

import errno
import fcntl
import gzip
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from bluegreen import backup
from bluegreen.backup import Entry, expired_backups, rolled_logs
from bluegreen.cli import main

REPO = Path(__file__).resolve().parent.parent
DAY = 86400
NOW = time.time()


def run(*argv: str):
    out, err = io.StringIO(), io.StringIO()
    code = main(["backup-logs", *argv], environ={}, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def aged(path: Path, days: float, content: bytes | None = None) -> Path:
    path.write_bytes(content if content is not None else f"{path.name}\n".encode() * 500)
    t = NOW - days * DAY
    os.utime(path, (t, t))
    return path


def tree(base: Path) -> tuple[Path, Path]:
    logs, bk = base / "logs", base / "backup"
    logs.mkdir()
    bk.mkdir()
    return logs, bk


def listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


# -- pure ---------------------------------------------------------------------------------------------------

def test_selection_of_rolled_logs_and_expired_backups():
    entries = [
        Entry("app.log", NOW - 10 * DAY, True),  # the live log, however old
        Entry("app-2026-03-01.0.log", NOW - 3 * DAY, True),
        Entry("app-2026-03-04.0.log", NOW - 0.5 * DAY, True),  # too recent
        Entry("app-2026-03-02.0.log.gz", NOW - 3 * DAY, True),  # already compressed
        Entry("gc.log", NOW - 3 * DAY, True),  # not a rolled app log
        Entry("app-dir.log", NOW - 3 * DAY, False),  # a directory
        Entry(".app-x.log", NOW - 3 * DAY, True),
    ]
    assert rolled_logs(entries, now=NOW, older_than_days=1, pattern="app-*.log") == ["app-2026-03-01.0.log"]
    backups = [Entry("a.log.gz", NOW - 91 * DAY, True), Entry("b.log.gz", NOW - 89 * DAY, True),
               Entry("notes.txt", NOW - 400 * DAY, True), Entry(".c.log.gz.tmp", NOW - 400 * DAY, True),
               Entry("d.gz", NOW - 400 * DAY, False)]
    assert expired_backups(backups, now=NOW, keep_days=90) == ["a.log.gz"]


# -- real trees ------------------------------------------------------------------------------------------------

def test_moves_and_prunes_exactly_the_right_files(tmp_path):
    logs, bk = tree(tmp_path)
    live = aged(logs / "app.log", 5)
    old1 = aged(logs / "app-2026-03-01.0.log", 3, os.urandom(300_000))
    old2 = aged(logs / "app-2026-03-02.0.log", 2)
    recent = aged(logs / "app-2026-03-04.0.log", 0.5)
    other = aged(logs / "gc.log", 30)
    contents = {p.name: p.read_bytes() for p in (old1, old2)}
    mtimes = {p.name: p.stat().st_mtime for p in (old1, old2)}
    expired = aged(bk / "app-2025-11-01.0.log.gz", 91, gzip.compress(b"x"))
    kept = aged(bk / "app-2025-12-20.0.log.gz", 89, gzip.compress(b"y"))
    notes = aged(bk / "README.txt", 400)

    code, out, err = run("--logs", str(logs), "--backup", str(bk), "--older-than", "1", "--keep-days", "90")
    assert code == 0, err
    assert listing(logs) == ["app-2026-03-04.0.log", "app.log", "gc.log"]
    assert listing(bk) == ["README.txt", "app-2025-12-20.0.log.gz", "app-2026-03-01.0.log.gz", "app-2026-03-02.0.log.gz"]
    for name, data in contents.items():
        gz = bk / f"{name}.gz"
        assert gzip.decompress(gz.read_bytes()) == data
        assert gz.stat().st_mtime == pytest.approx(mtimes[name], abs=1)  # retention counts from the log's date
    assert live.exists() and recent.exists() and other.exists() and kept.exists() and notes.exists()
    assert not expired.exists()
    assert "2 log(s) compressed" in out and "1 old backup(s) deleted" in out and "0 problem(s)" in out

    # Run again: nothing left to do, nothing changes.
    before = {p.name: p.stat().st_mtime_ns for p in list(logs.iterdir()) + list(bk.iterdir())}
    code, out, _ = run("--logs", str(logs), "--backup", str(bk))
    assert code == 0 and "0 log(s) compressed" in out
    assert {p.name: p.stat().st_mtime_ns for p in list(logs.iterdir()) + list(bk.iterdir())} == before


def test_a_backup_already_there_is_never_overwritten(tmp_path):
    logs, bk = tree(tmp_path)
    same = aged(logs / "app-1.log", 3, b"same content\n")
    (bk / "app-1.log.gz").write_bytes(gzip.compress(b"same content\n"))  # a run that stopped before removing the original
    other = aged(logs / "app-2.log", 3, b"new content\n")
    (bk / "app-2.log.gz").write_bytes(gzip.compress(b"an older file of the same name\n"))
    code, _, err = run("--logs", str(logs), "--backup", str(bk))
    assert code == 0, err
    assert not same.exists() and not other.exists()
    assert listing(bk) == ["app-1.log.gz", "app-2.log.1.gz", "app-2.log.gz"]
    assert gzip.decompress((bk / "app-2.log.gz").read_bytes()) == b"an older file of the same name\n"
    assert gzip.decompress((bk / "app-2.log.1.gz").read_bytes()) == b"new content\n"


def _unprivileged(argv: list[str]) -> subprocess.CompletedProcess:
    """Run as nobody when we are root (root ignores permission bits), else as ourselves."""
    if os.geteuid() == 0:
        assert shutil.which("setpriv"), "setpriv (util-linux) is needed to drop to nobody"
        argv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_unwritable_backup_dir_and_unreadable_log_lose_nothing():
    work = Path(tempfile.mkdtemp(prefix="bluegreen-backup-"))  # pytest's tmp_path is private to root
    try:
        work.chmod(0o755)
        pyz = work / "bluegreen.pyz"
        subprocess.run([sys.executable, str(REPO / "build.py"), "--output", str(pyz)], check=True, capture_output=True)
        logs, bk = tree(work)
        logs.chmod(0o777)
        bk.chmod(0o555)  # not writable for the job's user
        files = [aged(logs / f"app-2026-03-0{i}.0.log", 3) for i in (1, 2, 3)]
        for f in files:
            f.chmod(0o666)
        before = {f: f.read_bytes() for f in files}
        proc = _unprivileged([sys.executable, str(pyz), "backup-logs", "--logs", str(logs), "--backup", str(bk)])
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert f"cannot write into {bk} (Permission denied)" in proc.stderr and "no log was lost" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert {f: f.read_bytes() for f in files} == before and listing(bk) == []

        # A writable backup dir, but one log the job's user cannot read: the others go, it stays.
        bk.chmod(0o777)
        files[1].chmod(0o600 if os.geteuid() == 0 else 0o000)  # root-owned 0600: unreadable for nobody
        proc = _unprivileged([sys.executable, str(pyz), "backup-logs", "--logs", str(logs), "--backup", str(bk)])
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert f"{files[1]}: cannot read it (Permission denied); left in place" in proc.stderr
        assert listing(logs) == [files[1].name] and files[1].read_bytes() == before[files[1]]
        assert listing(bk) == [files[0].name + ".gz", files[2].name + ".gz"]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_a_full_disk_loses_nothing(tmp_path):
    logs, bk = tree(tmp_path)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(bk)], capture_output=True).returncode != 0:
        pytest.skip("needs root and a tmpfs mount for a real full disk (test_simulated_full_disk covers the logic)")
    try:
        small = aged(logs / "app-2026-03-01.0.log", 3, b"small\n")
        big = [aged(logs / f"app-2026-03-0{i}.0.log", 3, os.urandom(200_000)) for i in (2, 3)]  # incompressible
        before = {f: f.read_bytes() for f in [small, *big]}
        code, out, err = run("--logs", str(logs), "--backup", str(bk))
        assert code == 1
        assert f"stopped at {big[0].name}: cannot write into {bk} (the disk is full)" in err and "no log was lost" in err
        assert "1 file(s) after it were left" in err
        assert listing(bk) == [small.name + ".gz"]  # no partial temp file left behind
        assert gzip.decompress((bk / (small.name + ".gz")).read_bytes()) == before[small]
        assert all(f.read_bytes() == before[f] for f in big)
    finally:
        subprocess.run(["umount", str(bk)], check=True)


def test_simulated_full_disk_loses_nothing(tmp_path, monkeypatch):
    logs, bk = tree(tmp_path)
    files = [aged(logs / f"app-{i}.log", 3) for i in (1, 2)]

    def full(gz, chunk):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(backup, "_write", full)
    code, _, err = run("--logs", str(logs), "--backup", str(bk))
    assert code == 1 and "(the disk is full)" in err
    assert all(f.exists() for f in files) and listing(bk) == []


def test_a_second_run_at_the_same_time_is_refused(tmp_path):
    logs, bk = tree(tmp_path)
    aged(logs / "app-1.log", 3)
    fd = os.open(str(bk), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        code, _, err = run("--logs", str(logs), "--backup", str(bk))
    finally:
        os.close(fd)
    assert code == 3 and "Another backup-logs is already working" in err
    assert listing(logs) == ["app-1.log"]


def test_missing_directories_and_bad_options_are_usage_errors(tmp_path):
    logs, bk = tree(tmp_path)
    assert run("--logs", str(tmp_path / "nope"), "--backup", str(bk))[0] == 2
    assert run("--logs", str(logs), "--backup", str(logs))[0] == 2
    assert run("--logs", str(logs), "--backup", str(bk), "--pattern", "app.log")[0] == 2
    assert run("--logs", str(logs), "--backup", str(bk), "--keep-days", "0")[0] == 2


# -- hostile names and killed runs (the directories belong to the app container and the deploy user) ----------

def _cli(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """backup-logs as its own process, with a strict UTF-8 stdout as on a real host."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": os.environ.get("BG_REPO", str(REPO)),
           "LC_ALL": "C.UTF-8"}
    return subprocess.run([sys.executable, "-m", "bluegreen", "backup-logs", *argv], env=env, capture_output=True,
                          timeout=timeout)


def test_names_with_control_characters_or_bytes_that_are_not_utf8_are_backed_up_and_shown_escaped(tmp_path):
    logs, bk = tree(tmp_path)
    odd = [b"app-\xff\xfe.log", b"app-\x1b[2J.log", b"app-a\nb.log"]
    for name in odd:
        aged(logs / os.fsdecode(name), 3, b"odd\n" * 100)
    aged(logs / "app-plain.log", 3)
    proc = _cli("--logs", str(logs), "--backup", str(bk))
    out, err = proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8")  # strict: only valid UTF-8 was printed
    assert proc.returncode == 0, out + err
    assert "4 log(s) compressed" in out and "Traceback" not in err
    assert "\x1b" not in out and "\\x1b[2J" in out and "\\udcff\\udcfe" in out
    assert sorted(os.listdir(os.fsencode(bk))) == sorted(n + b".gz" for n in [*odd, b"app-plain.log"])
    assert os.listdir(logs) == []


def test_a_run_killed_while_compressing_leaves_no_temp_file_after_the_next_run(tmp_path):
    logs, bk = tree(tmp_path)
    aged(logs / "app-1.log", 3, os.urandom(48 << 20))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": os.environ.get("BG_REPO", str(REPO))}
    proc = subprocess.Popen([sys.executable, "-m", "bluegreen", "backup-logs", "--logs", str(logs), "--backup", str(bk)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not any(n.endswith(".gz.tmp") for n in os.listdir(bk)):
            assert time.monotonic() < deadline and proc.poll() is None, "never started compressing"
            time.sleep(0.001)
        proc.kill()  # kill -9 in the middle of the copy
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert any(n.endswith(".gz.tmp") for n in os.listdir(bk))  # what kill -9 leaves

    again = _cli("--logs", str(logs), "--backup", str(bk))
    assert again.returncode == 0, again.stdout + again.stderr
    assert sorted(os.listdir(bk)) == ["app-1.log.gz"] and os.listdir(logs) == []


def test_a_hard_link_in_the_log_dir_is_never_copied_nor_unlinked(tmp_path):
    """A second name for another user's file (possible where fs.protected_hardlinks=0): copying it would put
    that file's content in the backup directory."""
    logs, bk = tree(tmp_path)
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    secret = aged(private / "secret", 3, b"root:secret-hash\n")
    os.link(secret, logs / "app-1.log")
    aged(logs / "app-2.log", 3)
    code, out, err = run("--logs", str(logs), "--backup", str(bk))
    assert code == 1 and f"{logs / 'app-1.log'} is a hard link" in err and "never read" in err, err
    assert listing(bk) == ["app-2.log.gz"] and listing(logs) == ["app-1.log"]
    assert secret.read_bytes() == b"root:secret-hash\n" and secret.stat().st_nlink == 2


def test_a_log_dated_before_1970_is_backed_up_not_a_crash(tmp_path):
    logs, bk = tree(tmp_path)
    old = aged(logs / "app-1.log", 3, b"old\n")
    os.utime(old, (-1e9, -1e9))  # 1938: anyone who writes LOG_DIR can set this
    aged(logs / "app-2.log", 3)
    code, out, err = run("--logs", str(logs), "--backup", str(bk), "--keep-days", "100000")  # keep it, for the check
    assert code == 0, err
    assert listing(bk) == ["app-1.log.gz", "app-2.log.gz"] and gzip.decompress((bk / "app-1.log.gz").read_bytes()) == b"old\n"


def test_a_sparse_file_posing_as_a_huge_log_is_not_read(tmp_path):
    """`truncate -s 1T` in LOG_DIR costs nothing to make and hours of reading zeros to back up."""
    logs, bk = tree(tmp_path)
    sparse = logs / "app-1.log"
    with sparse.open("wb") as fh:
        fh.truncate(8 << 30)  # 8 GiB, no block on disk
    t = NOW - 3 * DAY
    os.utime(sparse, (t, t))
    aged(logs / "app-2.log", 3)
    started = time.monotonic()
    code, out, err = run("--logs", str(logs), "--backup", str(bk))
    assert time.monotonic() - started < 10
    assert code == 1 and f"{sparse} is 8.0 GB long but mostly holes" in err and "left in place, not read" in err, err
    assert listing(bk) == ["app-2.log.gz"] and listing(logs) == ["app-1.log"]
