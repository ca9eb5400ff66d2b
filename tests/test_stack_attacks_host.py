"""Real attacks on `setup` and `backup-logs` run as root: an unprivileged owner (a user created for the test)
plants symlinks, FIFOs, hard links and long names in the directories it may write, and the real command
(`python3 -m bluegreen`, as root) must refuse or skip them: no decoy changes, nothing blocks, nothing fills
the disk, every other log is still backed up.

BGATK_REPO=DIR runs the commands from another checkout (how the tests were seen failing on the old code)."""

from __future__ import annotations

import gzip
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import pytest

REPO = os.environ.get("BGATK_REPO") or str(Path(__file__).resolve().parent.parent)
DAY = 86400
pytestmark = pytest.mark.stack  # real users, real root: deselected with -m "not stack" like the other real tests


class User(NamedTuple):
    name: str
    uid: int
    gid: int


@pytest.fixture
def attacker():
    assert os.geteuid() == 0, "these tests run the attack for real: they need root (as CI runs them)"
    name = f"bgatk{secrets.randbelow(10 ** 6)}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                   check=True, capture_output=True, timeout=30)
    try:
        entry = pwd.getpwnam(name)
        yield User(name, entry.pw_uid, entry.pw_gid)
    finally:
        subprocess.run(["userdel", name], capture_output=True, timeout=30)
        subprocess.run(["groupdel", name], capture_output=True, timeout=30)  # gone already on most systems


@pytest.fixture
def work():
    path = Path(tempfile.mkdtemp(prefix="bgatk-", dir="/tmp"))  # pytest's tmp_path is private to root
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)  # never follows the planted links


def as_user(user: User, code: str, timeout: float = 60) -> subprocess.Popen:
    """Start `python3 -c code` as the attacker, with no group but its own."""
    return subprocess.Popen(["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups",
                             sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def attack(user: User, code: str) -> None:
    proc = as_user(user, code)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err


def bluegreen(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """The real command as root. A hang fails the test (the process is killed), never the suite."""
    full = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": REPO, **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "bluegreen", *args], env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"bluegreen {' '.join(args)} still ran after {timeout}s (blocked?)\n{out}\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def snapshot(top: Path) -> dict:
    """Owner, mode and content of `top` and everything below it, links not followed."""
    found = {}
    for path in [top, *sorted(top.rglob("*"))]:
        st = path.lstat()
        content = path.read_bytes() if path.is_file() and not path.is_symlink() else (
            os.readlink(path) if path.is_symlink() else None)
        found[str(path)] = (st.st_uid, st.st_gid, st.st_mode, content)
    return found


def make_decoy(work: Path) -> Path:
    """A root-only directory standing for /etc: a file, a subdirectory, a rolled-log-looking file."""
    decoy = work / "decoy"
    decoy.mkdir(mode=0o700)
    (decoy / "shadow").write_text("root:secret-hash\n")
    (decoy / "shadow").chmod(0o600)
    (decoy / "sub").mkdir(mode=0o700)
    old = decoy / "app-2020-01-01.0.log"
    old.write_text("root's own rolled log\n")
    os.utime(old, (time.time() - 30 * DAY,) * 2)
    return decoy


# -- setup ---------------------------------------------------------------------------------------------------

class Host(NamedTuple):
    root: Path
    env: dict
    args: list


def setup_host(work: Path, user: User, logs: Path | None = None) -> Host:
    """A deploy root already given to the owner (as the guide does), an nginx.conf that already includes the
    upstream directory (so setup never runs nginx), a private cron directory."""
    root = work / "root"
    root.mkdir()
    os.chown(root, user.uid, user.gid)
    conf = work / "nginx.conf"
    conf.write_text(f"events {{}}\nhttp {{\n    include {root}/nginx/conf.d/*.conf;\n}}\n")
    cron = work / "cron.d"
    cron.mkdir()
    env = {"BLUEGREEN_ROOT": str(root), "BLUEGREEN_NGINX_CONF": str(conf), "BLUEGREEN_CRON_DIR": str(cron)}
    args = ["setup", "--owner", user.name, "--logs", str(logs or work / "logs"), "--backup", str(work / "backup"),
            "--schedule", "cron"]
    return Host(root, env, args)


@pytest.mark.parametrize("where", ["projects", "nginx/conf.d", "logs"])
def test_setup_never_chowns_mkdirs_or_lists_through_a_planted_symlink(attacker, work, where):
    decoy = make_decoy(work)
    app = work / "app"  # like the guide's /app: given to the deploy user
    app.mkdir()
    os.chown(app, attacker.uid, attacker.gid)
    host = setup_host(work, attacker, logs=app / "logs")
    link = {"projects": host.root / "projects", "nginx/conf.d": host.root / "nginx" / "conf.d", "logs": app / "logs"}[where]
    attack(attacker, f"import os; os.makedirs({str(link.parent)!r}, exist_ok=True); os.symlink({str(decoy)!r}, {str(link)!r})")
    decoy_before, all_before = snapshot(decoy), snapshot(work)

    proc = bluegreen(*host.args, env=host.env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{link} is a symlink (to {decoy})" in proc.stderr and "setup changed nothing" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert snapshot(decoy) == decoy_before  # owner, mode and content of /etc's stand-in
    assert snapshot(work) == all_before  # refused before any change: nothing created, nothing given away


def test_setup_never_gives_away_a_hard_link_to_a_root_file(attacker, work):
    decoy = make_decoy(work)
    host = setup_host(work, attacker)
    projects = host.root / "projects"
    projects.mkdir()
    os.chown(projects, attacker.uid, attacker.gid)
    # The link is made by root here because this machine has fs.protected_hardlinks=1, which stops the owner
    # from linking a file it cannot write; a host with protected_hardlinks=0 lets the owner do exactly this.
    os.link(decoy / "shadow", projects / "app.env")
    (projects / "ok.env").write_text("IMAGE=x\n")  # init ran as root: a root file that setup gives the owner
    before = snapshot(decoy)

    proc = bluegreen(*host.args, env=host.env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"left {projects / 'app.env'} as it is: it has 2 hard links" in proc.stderr
    assert snapshot(decoy) == before and (decoy / "shadow").stat().st_uid == 0
    assert (projects / "ok.env").stat().st_uid == attacker.uid


def test_setup_writes_a_hostile_backup_path_as_one_cron_line_and_refuses_a_newline(attacker, work):
    host = setup_host(work, attacker)
    evil = str(work / "logs\n* * * * * root touch /tmp/bgatk-pwned")
    proc = bluegreen("setup", "--owner", attacker.name, "--logs", evil, "--backup", str(work / "backup"),
                     "--schedule", "cron", env=host.env)
    assert proc.returncode == 2 and "line break" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert list((work / "cron.d").iterdir()) == [] and not host.root.joinpath("projects").exists()

    backup = str(work / "bk%H 'x'")
    proc = bluegreen("setup", "--owner", attacker.name, "--logs", str(work / "logs"), "--backup", backup,
                     "--schedule", "cron", env=host.env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert Path(backup).is_dir() and Path(backup).stat().st_uid == attacker.uid
    text = (work / "cron.d" / "bluegreen").read_text()
    jobs = [ln for ln in text.splitlines() if ln.startswith("0 2 ")]
    assert len(jobs) == 1, text
    command = jobs[0].split(None, 6)[6]
    # What cron hands to /bin/sh: `\%` becomes `%` (a bare % would end the command there).
    assert "%" not in command.replace("\\%", "")
    sh_command = command.replace("\\%", "%")
    out = subprocess.run(["/bin/sh", "-c", "printf '%s\\0'" + sh_command[sh_command.index(" "):]],
                         capture_output=True, timeout=10, check=True).stdout.decode().split("\0")[:-1]
    assert out[out.index("--backup") + 1] == backup


# -- backup-logs ----------------------------------------------------------------------------------------------

def log_tree(work: Path, user: User) -> tuple[Path, Path]:
    """LOG_DIR owned by the attacker (the container writes it), a backup directory owned by root."""
    logs, backup = work / "logs", work / "backup"
    logs.mkdir()
    backup.mkdir()
    os.chown(logs, user.uid, user.gid)
    return logs, backup


def aged(path: Path, data: bytes, user: User, days: float = 3) -> Path:
    path.write_bytes(data)
    os.chown(path, user.uid, user.gid)
    os.utime(path, (time.time() - days * DAY,) * 2)
    return path


SWAP = """
import os, sys, time
logs, backup, kind, target = sys.argv[1:5]
deadline = time.time() + 50
while not any(n.endswith(".gz.tmp") for n in os.listdir(backup)):  # the first log is being compressed
    if time.time() > deadline:
        sys.exit("backup-logs never started compressing")
    time.sleep(0.0005)
tmp = os.path.join(logs, ".swap")
if kind == "fifo":
    os.mkfifo(tmp)
else:
    os.symlink(target, tmp)
os.rename(tmp, os.path.join(logs, "app-2.log"))  # listed as a regular file a moment ago
print("swapped", flush=True)
"""


@pytest.mark.parametrize("kind", ["fifo", "devzero"])
def test_a_log_swapped_after_the_listing_never_blocks_nor_fills_the_disk(attacker, work, kind):
    logs, backup = log_tree(work, attacker)
    big = os.urandom(48 << 20)  # incompressible: long enough to swap the next file while it is compressed
    aged(logs / "app-1.log", big, attacker)
    aged(logs / "app-2.log", b"second\n" * 100, attacker)
    aged(logs / "app-3.log", b"third\n" * 100, attacker)
    swapper = subprocess.Popen(["setpriv", f"--reuid={attacker.uid}", f"--regid={attacker.gid}", "--clear-groups",
                                sys.executable, "-c", SWAP, str(logs), str(backup), kind, "/dev/zero"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        started = time.monotonic()
        proc = bluegreen("backup-logs", "--logs", str(logs), "--backup", str(backup), timeout=60)
        took = time.monotonic() - started
        out, err = swapper.communicate(timeout=60)
        assert swapper.returncode == 0 and "swapped" in out, err
    finally:
        if swapper.poll() is None:
            swapper.kill()
    found = "a FIFO (named pipe)" if kind == "fifo" else "a symlink (to /dev/zero)"
    assert proc.returncode == 1 and f"{logs / 'app-2.log'} is {found}" in proc.stderr, proc.stdout + proc.stderr
    assert "left in place, never read" in proc.stderr and "Traceback" not in proc.stderr
    assert took < 45
    # The others were backed up; nothing big was written besides the real log's copy.
    assert sorted(p.name for p in backup.iterdir()) == ["app-1.log.gz", "app-3.log.gz"]
    assert gzip.decompress((backup / "app-3.log.gz").read_bytes()) == b"third\n" * 100
    assert (backup / "app-1.log.gz").stat().st_size < len(big) + (1 << 20)
    assert sorted(p.name for p in logs.iterdir()) == ["app-2.log"]

    # The next run is not locked out and ends at once (what is not a regular file when listed is not a log).
    again = bluegreen("backup-logs", "--logs", str(logs), "--backup", str(backup), timeout=20)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "0 log(s) compressed" in again.stdout


def test_long_names_are_reported_and_the_other_logs_still_backed_up(attacker, work):
    logs, backup = log_tree(work, attacker)
    fits = "app-" + "0" * 232 + ".log"  # 240 characters: its .gz fits in 255
    too_long = "app-" + "9" * 246 + ".log"  # 254: no room for .gz
    for name in (fits, "app-1.log", too_long, "app-z.log"):
        aged(logs / name, name.encode() * 10, attacker)
    proc = bluegreen("backup-logs", "--logs", str(logs), "--backup", str(backup))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"{logs / too_long}: its name is too long" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in backup.iterdir()) == sorted([fits + ".gz", "app-1.log.gz", "app-z.log.gz"])
    assert [p.name for p in logs.iterdir()] == [too_long]
    assert "3 log(s) compressed" in proc.stdout


def test_links_and_fifos_planted_in_the_backup_dir_are_never_read_written_or_deleted(attacker, work):
    decoy = make_decoy(work)
    logs, backup = log_tree(work, attacker)
    os.chown(backup, attacker.uid, attacker.gid)  # the deploy user's backup directory (setup gives it)
    aged(logs / "app-1.log", b"one\n" * 100, attacker)
    aged(logs / "app-2.log", b"two\n" * 100, attacker)
    # A root-only file that happens to hold the compressed log: a run that reads through the planted link
    # takes it for a finished backup and deletes the original.
    (decoy / "copy.gz").write_bytes(gzip.compress(b"two\n" * 100))
    attack(attacker, f"""
import os
os.mkfifo({str(backup / 'app-1.log.gz')!r})
os.symlink({str(decoy / 'copy.gz')!r}, {str(backup / 'app-2.log.gz')!r})
os.symlink({str(decoy / 'shadow')!r}, {str(backup / 'app-2019.log.gz')!r})
os.utime({str(backup / 'app-2019.log.gz')!r}, (0, 0), follow_symlinks=False)  # 'expired' for years
""")
    os.utime(decoy / "shadow", (0, 0))
    before = snapshot(decoy)

    proc = bluegreen("backup-logs", "--logs", str(logs), "--backup", str(backup), "--keep-days", "10", timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert snapshot(decoy) == before
    assert sorted(p.name for p in backup.iterdir()) == ["app-1.log.1.gz", "app-1.log.gz", "app-2.log.1.gz",
                                                       "app-2.log.gz", "app-2019.log.gz"]
    assert (backup / "app-2019.log.gz").is_symlink() and (backup / "app-2.log.gz").is_symlink()
    assert gzip.decompress((backup / "app-2.log.1.gz").read_bytes()) == b"two\n" * 100
    assert list(logs.iterdir()) == []


@pytest.mark.parametrize("which", ["--logs", "--backup"])
def test_a_log_or_backup_dir_that_is_a_planted_symlink_is_refused(attacker, work, which):
    decoy = make_decoy(work)
    app = work / "app"
    app.mkdir()
    os.chown(app, attacker.uid, attacker.gid)
    real = app / "real"
    real.mkdir()
    os.chown(real, attacker.uid, attacker.gid)
    link = app / "link"
    attack(attacker, f"import os; os.symlink({str(decoy)!r}, {str(link)!r})")
    logs, backup = (link, real) if which == "--logs" else (real, link)
    if which == "--backup":
        aged(real / "app-1.log", b"x\n", attacker)
    before = snapshot(work)

    proc = bluegreen("backup-logs", "--logs", str(logs), "--backup", str(backup), "--older-than", "1")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{which}: {link} is a symlink (to {decoy})" in proc.stderr and "Traceback" not in proc.stderr
    assert snapshot(work) == before


def test_setup_never_blocks_on_a_fifo_where_nginx_conf_or_the_cron_file_should_be(attacker, work):
    host = setup_host(work, attacker)
    conf = Path(host.env["BLUEGREEN_NGINX_CONF"])
    conf.unlink()
    os.mkfifo(conf)
    proc = bluegreen(*host.args, env=host.env, timeout=20)
    assert proc.returncode == 2 and f"{conf} is a FIFO" in proc.stderr and "setup changed nothing" in proc.stderr, proc.stderr
    assert not (work / "logs").exists()

    conf.unlink()
    conf.write_text(f"events {{}}\nhttp {{\n    include {host.root}/nginx/conf.d/*.conf;\n}}\n")
    os.mkfifo(work / "cron.d" / "bluegreen")
    proc = bluegreen(*host.args, env=host.env, timeout=20)
    assert proc.returncode == 2 and "bluegreen is a FIFO" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
