"""The deploy step that `bluegreen init --ci github` writes, run as GitHub's runner would run it (tests/gha.py)
against three real hosts (tests/fleet.py: network namespaces with their own sshd, dockerd and nginx): the
vendored pyz rolls the project out with the host keys pinned by SSH_KNOWN_HOSTS and nothing else."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

import gha
from bluegreen import init
from fleet import fleet_fixture  # noqa: F401  (the module-scoped `fleet` fixture)
from test_stack_deploy import LineWatcher
from test_stack_rollout import App, app  # noqa: F401  (`app`: one project on every host, removed after)

# Logs each call (its argv and the host) to hooks.log in the workspace: the hooks run on the runner, from there.
HOOK = """import os, sys
with open("hooks.log", "a") as log:
    log.write(" ".join([os.environ["BLUEGREEN_HOST"], os.environ["BLUEGREEN_TAG"]] + sys.argv[1:]) + "\\n")
"""
# Sleeps SECONDS before the host HOST (argv 1 and 2), so that a test can cancel the run while it is there.
SLOW = """import os, sys, time
if os.environ["BLUEGREEN_HOST"] == sys.argv[1]:
    time.sleep(float(sys.argv[2]))
"""


class Runner:
    """A checked-out application repository with what `init --ci github` wrote, and a runner's HOME."""

    def __init__(self, tmp_path: Path, app: App) -> None:
        self.app, self.fleet = app, app.fleet
        self.repo, self.home = tmp_path / "repo", tmp_path / "home"
        self.repo.mkdir()
        self.home.mkdir()
        self.summary = tmp_path / "step-summary.md"
        self.summary.touch()
        proc = subprocess.run([sys.executable, app.stack.pyz, "init", "--ci", "github", app.name, "--repo", str(self.repo)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert (self.repo / init.CI_PYZ).read_bytes() == Path(app.stack.pyz).read_bytes()
        (self.repo / "deploy").mkdir()
        (self.repo / "deploy" / "hook.py").write_text(HOOK)
        (self.repo / "deploy" / "slow.py").write_text(SLOW)
        # The runner's python3 (an image's, not this machine's pyenv shim, which would look in HOME).
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        (self.bin / "python3").symlink_to(sys.executable)
        self.key = Path(self.fleet.client_key).read_text()
        self.secrets = {
            f"{init.secret_prefix(app.name)}_SERVER_HOST": ",".join(h.addr for h in self.fleet.hosts),
            "SERVER_USER": "root",
            "SSH_PRIVATE_KEY": self.key,
            "SSH_KNOWN_HOSTS": Path(self.fleet.known_hosts).read_text(),
        }

    @property
    def path(self) -> str:
        return f"{self.bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

    def deploy(self, tag: str, secrets: dict | None = None, inputs: dict | None = None) -> subprocess.CompletedProcess:
        """The deploy step, then the step that always follows it."""
        return gha.run_deploy_step(self.repo, self.app.name, home=self.home, summary=self.summary, tag=tag,
                                   secrets={**self.secrets, **(secrets or {})}, inputs=inputs, path=self.path)

    def start(self, tag: str, inputs: dict | None = None) -> subprocess.Popen:
        return gha.start_deploy_step(self.repo, self.app.name, home=self.home, summary=self.summary, tag=tag,
                                     secrets=self.secrets, inputs=inputs, path=self.path)

    def leftovers(self) -> list:
        """What the step left in the runner's temp directory (its key directory must be gone)."""
        return sorted(p.name for p in (self.home / "runner-temp").iterdir())


@pytest.fixture
def runner(tmp_path, app):
    return Runner(tmp_path, app)


def test_the_generated_step_rolls_v1_then_v2_out_to_every_host(runner, app, tmp_path):
    for line in Path(runner.fleet.known_hosts).read_text().splitlines():  # pinned by name and by address
        name, addr = line.split()[0].split(",")
        assert runner.fleet.host(name).addr == addr
    first = runner.deploy("v1")
    assert first.returncode == 0, first.stdout
    assert app.versions() == ["v1", "v1", "v1"]
    marker = tmp_path / "PWNED"
    hook = f"python3 deploy/hook.py in \"$(touch {marker})\""
    second = runner.deploy("v2", inputs={"before-host": hook.replace(" in ", " out "), "after-host": hook})
    assert second.returncode == 0, second.stdout
    assert app.versions() == ["v2", "v2", "v2"]
    for h in runner.fleet.hosts:
        assert [e["tag"] for e in app.journal(h) if e["result"] == "deployed"] == ["v1", "v2"], h.name
        # The rollout sent the vendored tool to every host.
        assert Path(h.deploy_root, "bluegreen.pyz").read_bytes() == (runner.repo / init.CI_PYZ).read_bytes()
    out = second.stdout
    assert out.count("::group::") == 3 and out.count("::endgroup::") == 3 and "::error" not in out
    # The hooks ran on the runner, in the workspace, around each host in turn; the input was never shell code.
    assert (runner.repo / "hooks.log").read_text().splitlines() == [
        f"{h.addr} v2 {side} $(touch {marker})" for h in runner.fleet.hosts for side in ("out", "in")]
    assert not marker.exists()
    # Each rollout's table is on the job's summary page.
    summary = runner.summary.read_text()
    assert summary.count("### bluegreen: ") == 2
    assert all(f"| {h.addr} | deployed | v1 → v2 |" in summary for h in runner.fleet.hosts), summary
    # The key is in no output, and its file is gone once the step has ended.
    for text in (first.stdout, second.stdout, runner.summary.read_text()):
        assert "PRIVATE KEY" not in text and runner.key.splitlines()[1] not in text
    assert runner.leftovers() == []


def test_without_known_hosts_the_step_refuses_before_any_ssh(runner, app):
    proc = runner.deploy("v1", secrets={"SSH_KNOWN_HOSTS": ""})
    assert proc.returncode != 0, proc.stdout
    assert "::error title=SSH_KNOWN_HOSTS is required::" in proc.stdout and "ssh-keyscan HOST" in proc.stdout
    assert app.versions() == [None, None, None]
    assert all(app.journal(h) == [] for h in runner.fleet.hosts)
    assert not (runner.home / ".ssh").exists()  # nothing was scanned or learned either


def test_a_host_whose_key_is_not_the_pinned_one_is_refused_and_nothing_changes(runner, app):
    # h1's address pinned to h2's key: as if h1 had been replaced by another machine (or someone in the middle).
    lines = Path(runner.fleet.known_hosts).read_text().splitlines()
    keys = [line.split(None, 1)[1] for line in lines]
    swapped = "\n".join([f"{lines[0].split()[0]} {keys[1]}"] + lines[1:]) + "\n"
    proc = runner.deploy("v1", secrets={"SSH_KNOWN_HOSTS": swapped})
    assert proc.returncode == 2, proc.stdout
    assert "nothing was changed on any host" in proc.stdout
    rows = {line.split()[0]: line for line in proc.stdout.splitlines() if line.startswith("10.")}
    h1, h2, h3 = (rows[h.addr] for h in runner.fleet.hosts)
    # ssh's own words: the offending line of the pinned file (the rollout's table keeps the end of its message).
    assert " refused " in h1 and "cannot reach" in h1 and "known_hosts:1" in h1, h1
    assert " not started " in h2 and " not started " in h3
    assert app.versions() == [None, None, None]
    assert all(app.journal(h) == [] for h in runner.fleet.hosts)
    assert runner.leftovers() == []
    assert not (runner.home / ".ssh").exists()  # no key was learned on the way


def test_cancelling_the_run_reaches_the_rollout_which_starts_no_new_host(runner, app):
    assert runner.deploy("v1").returncode == 0
    h1, h2, h3 = runner.fleet.hosts
    proc = runner.start("v2", inputs={"before-host": f"python3 deploy/slow.py {h2.addr} 2"})
    watcher = LineWatcher(types.SimpleNamespace(stderr=proc.stdout))
    try:
        watcher.wait_for(f"[{h2.addr}] before-host", timeout=120)
        # What GitHub does to a cancelled step: SIGINT to its process, SIGTERM 7.5 s later, then SIGKILL.
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=7.5)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=2.5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        gha.cleanup(runner.repo, home=runner.home, summary=runner.summary, path=runner.path)
    out = watcher.text()
    assert "SIGINT: no new host is started" in out, out
    assert proc.returncode in (1, 4), out  # 1: h2 finished within the 7.5 s; 4: the SIGTERM named it as in progress
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("10.")}
    assert " deployed " in rows[h1.addr] and " interrupted " in rows[h3.addr], out
    if proc.returncode == 4:  # h2's deploy was cut off here; on the host it runs to its end (no terminal, no signal)
        deadline = time.monotonic() + 120
        while not [e for e in app.journal(h2) if e["tag"] == "v2"] and time.monotonic() < deadline:
            time.sleep(0.5)
    assert app.versions() == ["v2", "v2", "v1"]
    assert [e["tag"] for e in app.journal(h3)] == ["v1"]
    assert runner.leftovers() == []
