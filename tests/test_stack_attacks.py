"""The real attack, as root against an unprivileged deploy user: the user owns a deploy root (as setup
makes it), plants symlinks and FIFOs in it, and root runs the real `bluegreen` against it. Whatever it
pointed at (a decoy root-only file in a root-owned 0700 directory, never a real /etc file) must stay as
it was, nothing may be created or written through a link, and the exit code and message are the
documented ones.

Hard links are not attacked here: with fs.protected_hardlinks=1 (this host, and every current distro) an
unprivileged user cannot link a root-only file; tests/test_safefs.py and test_health_lock_state.py cover
the refusal with links root makes.
"""

from __future__ import annotations

import http.server
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DECOY_TEXT = "root:$6$decoy-secret-hash:19000:0:99999:7:::\n"

pytestmark = [
    pytest.mark.stack,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("useradd") is None,
                       reason="the attack needs root (to create the attacker) and useradd"),
]


class Arena:
    """An attacker user owning a deploy root, and a root-only decoy outside it."""

    def __init__(self, base: Path, name: str, uid: int, gid: int) -> None:
        self.base = base
        self.name = name
        self.uid = uid
        self.gid = gid
        self.root = base / "deploy"
        self.projects = self.root / "projects"
        self.vault = base / "vault"  # root-owned 0700: the attacker cannot even look inside
        self.decoy = self.vault / "shadow"
        self.conf_d = base / "nginx-conf.d"

    def as_attacker(self, *argv: str) -> None:
        """Run argv as the attacker (setuid in the child), e.g. to plant a symlink or a FIFO."""

        def drop() -> None:
            os.setgroups([])
            os.setgid(self.gid)
            os.setuid(self.uid)

        subprocess.run(list(argv), preexec_fn=drop, check=True, timeout=30, cwd="/")

    def write_env(self, project: str, extra: str = "") -> None:
        path = self.projects / f"{project}.env"
        path.write_text(f"IMAGE=registry.invalid/acme/{project}\nLOG_DIR=\n{extra}")
        os.chown(path, self.uid, self.gid)

    def bluegreen(self, *args: str, timeout: float = 60, nginx: str = "false") -> subprocess.CompletedProcess:
        """The real program, as root, against the attacker's deploy root. docker and nginx are `false`:
        every case here must be refused before either would run (init's `nginx -t` gets `true`)."""
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(REPO),
            "BLUEGREEN_ROOT": str(self.root),
            "BLUEGREEN_DOCKER": "false",
            "BLUEGREEN_NGINX": nginx,
            "BLUEGREEN_NGINX_CONF_DIR": str(self.conf_d),
            "HOME": str(self.base),
        }
        return subprocess.run([sys.executable, "-m", "bluegreen", *args], env=env, capture_output=True, text=True,
                              timeout=timeout, cwd="/")

    def vault_state(self) -> dict:
        return {p.name: p.read_bytes() for p in sorted(self.vault.iterdir())}


@pytest.fixture
def arena():
    name = f"bgatk{secrets.randbelow(10 ** 6)}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                   check=True, capture_output=True, timeout=30)
    base = Path(tempfile.mkdtemp(prefix="bg-attack-"))
    try:
        import pwd

        entry = pwd.getpwnam(name)
        os.chmod(base, 0o755)
        a = Arena(base, name, entry.pw_uid, entry.pw_gid)
        a.projects.mkdir(parents=True)
        for d in (a.root, a.projects):
            os.chown(d, a.uid, a.gid)  # what `setup --owner` makes of the deploy root
        a.vault.mkdir(mode=0o700)
        a.decoy.write_text(DECOY_TEXT)
        a.decoy.chmod(0o600)
        a.conf_d.mkdir()
        yield a
    finally:
        shutil.rmtree(base, ignore_errors=True)
        subprocess.run(["userdel", name], capture_output=True, timeout=30)


class Webhook:
    """A local Slack-compatible endpoint that keeps every body it receives."""

    def __init__(self) -> None:
        bodies = self.bodies = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length") or 0)
                bodies.append(self.rfile.read(length).decode("utf-8", errors="replace"))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook():
    hook = Webhook()
    try:
        yield hook
    finally:
        hook.close()


def test_a_lock_symlink_never_truncates_its_target_deploy_and_prune(arena):
    arena.write_env("app")
    lock = arena.projects / "app.lock"
    arena.as_attacker("ln", "-s", str(arena.decoy), str(lock))
    before = arena.vault_state()
    for argv in (("deploy", "app", "v1"), ("prune", "app")):
        proc = arena.bluegreen(*argv)
        assert arena.vault_state() == before, argv  # first: before the fix, the decoy was emptied here
        assert proc.returncode == 2, (argv, proc.stdout, proc.stderr)
        assert f"{lock} is a symlink (to {arena.decoy})" in proc.stderr
        assert "nothing was changed" in proc.stderr and "docs/security.md" in proc.stderr
        assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
        assert arena.vault_state() == before, argv
        assert lock.is_symlink()
    assert arena.decoy.read_text() == DECOY_TEXT


def test_a_dangling_lock_symlink_creates_nothing(arena):
    arena.write_env("app")
    target = arena.vault / "cron-job"
    arena.as_attacker("ln", "-s", str(target), str(arena.projects / "app.lock"))
    proc = arena.bluegreen("deploy", "app", "v1")
    assert proc.returncode == 2, proc.stderr
    assert not target.exists() and arena.vault_state() == {"shadow": DECOY_TEXT.encode()}


def test_a_fifo_lock_refuses_at_once(arena):
    arena.write_env("app")
    arena.as_attacker("mkfifo", str(arena.projects / "app.lock"))
    proc = arena.bluegreen("deploy", "app", "v1", timeout=30)  # a blocking open would hang until the timeout
    assert proc.returncode == 2 and "FIFO" in proc.stderr, proc.stderr


def test_a_freeze_symlink_still_freezes_but_is_never_printed_journaled_or_sent(arena, webhook):
    arena.write_env("app", f"NOTIFY_WEBHOOK_URL={webhook.url}\n")
    freeze = arena.projects / "app.freeze"
    arena.as_attacker("ln", "-s", str(arena.decoy), str(freeze))
    proc = arena.bluegreen("deploy", "app", "v1")
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    assert f"the freeze file {freeze} is a symlink" in proc.stderr
    journal = (arena.projects / "app.journal").read_text()
    everything = proc.stdout + proc.stderr + journal + "".join(webhook.bodies)
    assert "decoy-secret-hash" not in everything
    assert json.loads(journal.splitlines()[-1])["result"] == "refused"
    assert webhook.bodies, "the refused attempt is still notified"
    status = arena.bluegreen("status", "app", "--json")
    assert "decoy-secret-hash" not in status.stdout + status.stderr
    assert arena.decoy.read_text() == DECOY_TEXT


def test_a_journal_symlink_is_never_appended_through(arena):
    arena.write_env("app")
    # A freeze written by the attacker (its own project: allowed) makes the deploy a refused attempt, which
    # is journaled before docker would run.
    freeze = arena.projects / "app.freeze"
    freeze.write_text(json.dumps({"message": "incident", "user": "ops", "since": "2026-01-01"}))
    os.chown(freeze, arena.uid, arena.gid)
    arena.as_attacker("ln", "-s", str(arena.decoy), str(arena.projects / "app.journal"))
    dangling = arena.vault / "new-file"
    arena.as_attacker("ln", "-s", str(dangling), str(arena.projects / "other.journal"))
    arena.write_env("other")
    other_freeze = arena.projects / "other.freeze"
    other_freeze.write_text("frozen")
    for project in ("app", "other"):
        proc = arena.bluegreen("deploy", project, "v1")
        assert proc.returncode == 3, (proc.stdout, proc.stderr)
        assert "warning" in proc.stderr and "could not append to the journal" in proc.stderr and "symlink" in proc.stderr
    assert arena.vault_state() == {"shadow": DECOY_TEXT.encode()} and not dangling.exists()
    history = arena.bluegreen("history", "app")
    assert history.returncode == 2 and "symlink" in history.stderr and "decoy-secret-hash" not in history.stdout


def test_init_force_never_writes_the_bak_through_a_symlink(arena):
    proc = arena.bluegreen("init", "app", "--image", "registry.invalid/acme/app", nginx="true")
    assert proc.returncode == 0, proc.stderr
    env_file = arena.projects / "app.env"
    assert os.stat(env_file).st_uid == arena.uid  # given to the deploy user, who owns the directory
    cron_file = arena.vault / "cron-job"
    for target in (cron_file, arena.decoy):
        # The deploy user adds the app's secret, then plants the .bak: a root cron job, a root-only file.
        arena.as_attacker("sh", "-c", f"echo 'DB_PASSWORD=hunter2' >> {env_file}")
        bak = arena.projects / "app.env.bak"
        arena.as_attacker("rm", "-f", str(bak))
        arena.as_attacker("ln", "-s", str(target), str(bak))
        proc = arena.bluegreen("init", "app", "--image", f"registry.invalid/acme/app{secrets.token_hex(2)}", "--force", nginx="true")
        assert proc.returncode == 0, proc.stderr
        assert not bak.is_symlink() and "DB_PASSWORD=hunter2" in bak.read_text()
        assert os.stat(bak).st_uid == arena.uid and (os.stat(bak).st_mode & 0o777) == 0o640
    assert not cron_file.exists() and arena.vault_state() == {"shadow": DECOY_TEXT.encode()}
