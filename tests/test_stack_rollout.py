"""`bluegreen rollout` on real hosts: three network namespaces with their own dockerd, sshd and nginx behind
haproxy (tests/fleet.py), reached with the system ssh client and strict host keys."""

from __future__ import annotations

import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bluegreen import init
from bluegreen import nginx as ngx
from fleet import fleet_fixture  # noqa: F401  (the module-scoped `fleet` fixture)

HOOK = str(Path(__file__).parent / "bench" / "haproxy_hook.py")
BLUE, GREEN = 20101, 20102


class App:
    """One project on every host of the fleet, configured as `init` would (env file, upstream, server block)."""

    def __init__(self, fleet, stack) -> None:
        self.fleet, self.stack = fleet, stack
        self.name = "fa" + secrets.token_hex(3)
        for h in fleet.hosts:
            projects = Path(h.deploy_root, "projects")
            (projects / f"{self.name}.env").write_text(
                f"IMAGE={fleet.image_repo}\nBLUE_PORT={BLUE}\nGREEN_PORT={GREEN}\nHEALTH_TIMEOUT=20\n"
                f"NGINX_URL=http://{h.addr}\nSTOP_TIMEOUT=2\nDB_PASSWORD=fleet-s3cret\n")
            # init's placeholder upstream (routes nowhere yet, defines the route variable)
            Path(h.conf_d, f"{self.name}-upstream.conf").write_text(init.render_placeholder_upstream(
                project=self.name, upstream=self.name, blue_port=BLUE, token=ngx.new_token()))
            h.proxy_app(self.name, extra=f"add_header X-Bluegreen-Upstream $bluegreen_route_{self.name} always;")

    def rollout(self, tag: str, *args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
        hosts = ",".join(h.name for h in self.fleet.hosts)
        argv = [sys.executable, self.stack.pyz, "rollout", self.name, tag, "--hosts", hosts,
                "--ssh-config", self.fleet.ssh_config, *args]
        env = {k: v for k, v in {**os.environ, **(env or {})}.items() if not k.startswith("BLUEGREEN_")}
        return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout, env=env)

    def start(self, tag: str, *args: str):
        """The rollout in the background, its stderr collected line by line (to send it signals mid-way)."""
        from test_stack_deploy import LineWatcher

        hosts = ",".join(h.name for h in self.fleet.hosts)
        argv = [sys.executable, self.stack.pyz, "rollout", self.name, tag, "--hosts", hosts, "--ssh-config",
                self.fleet.ssh_config, *args]
        env = {k: v for k, v in os.environ.items() if not k.startswith("BLUEGREEN_")}
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        return proc, LineWatcher(proc)

    def versions(self) -> list:
        return [h.get("/version")[1] if h.get("/version")[0] == 200 else None for h in self.fleet.hosts]

    def journal(self, h) -> list:
        path = Path(h.deploy_root, "projects", f"{self.name}.journal")
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

    def remove(self) -> None:
        for h in self.fleet.hosts:
            h.docker("rm", "-f", f"{self.name}-blue", f"{self.name}-green", check=False)
            h.remove_site("default", reload=False)
            for f in Path(h.deploy_root, "projects").glob(f"{self.name}.*"):
                f.unlink()
            Path(h.conf_d, f"{self.name}-upstream.conf").unlink(missing_ok=True)
            h.nginx.reload()


@pytest.fixture
def app(fleet, stack):
    a = App(fleet, stack)
    try:
        yield a
    finally:
        a.remove()


def test_a_three_host_rollout_deploys_everywhere_between_the_load_balancer_hooks(app):
    first = app.rollout("v1", "--json")
    assert first.returncode == 0, first.stdout + first.stderr
    assert app.versions() == ["v1", "v1", "v1"]
    # The tool itself went to every host; the secret never reached the controller's output.
    for h in app.fleet.hosts:
        assert Path(h.deploy_root, "bluegreen.pyz").read_bytes() == Path(app.stack.pyz).read_bytes()
    assert "fleet-s3cret" not in first.stdout + first.stderr
    sock = app.fleet.lb.socket
    second = app.rollout("v2", "--before-host", f"{sys.executable} {HOOK} {sock} app out",
                         "--after-host", f"{sys.executable} {HOOK} {sock} app in", "--json")
    assert second.returncode == 0, second.stdout + second.stderr
    assert app.versions() == ["v2", "v2", "v2"]
    table = json.loads(second.stdout)
    assert [(r["target"], r["result"], r["before"], r["after"]) for r in table["hosts"]] == [
        (h.name, "deployed", "v1", "v2") for h in app.fleet.hosts]
    for h in app.fleet.hosts:
        assert [e["tag"] for e in app.journal(h) if e["result"] == "deployed"] == ["v1", "v2"]
        assert app.fleet.lb.status(h).startswith("UP")
    # Live output, each line with its host; the hooks ran around each host, in order.
    err = second.stderr
    assert "[h1] [1/6] pull" in err or "[h1] " in err
    order = [err.index(f"[{h.name}] before-host") for h in app.fleet.hosts]
    assert order == sorted(order) and all(f"[{h.name}] after-host" in err for h in app.fleet.hosts)


def table_of(proc) -> list:
    return [(r["target"], r["result"], r["before"], r["after"]) for r in json.loads(proc.stdout)["hosts"]]


def break_image_on(app, h) -> None:
    """h deploys its tags from a repository whose v2 is the unhealthy test image (its health check answers 500)."""
    import stack as stacklib

    broken = f"{app.stack.registry.open_addr}/bg/broken:v2"
    stacklib.docker("tag", app.stack.images["unhealthy"], broken)
    stacklib.push_image(broken)
    env = Path(h.deploy_root, "projects", f"{app.name}.env")
    text = env.read_text().replace(f"IMAGE={app.fleet.image_repo}\n", f"IMAGE={app.fleet.image_repo.rsplit('/', 1)[0]}/broken\n")
    env.write_text(text.replace("HEALTH_TIMEOUT=20", "HEALTH_TIMEOUT=3"))


def test_a_host_that_fails_stops_the_rollout_there(app):
    assert app.rollout("v1").returncode == 0
    break_image_on(app, app.fleet.hosts[1])
    proc = app.rollout("v2", "--json")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert table_of(proc) == [("h1", "deployed", "v1", "v2"), ("h2", "failed", "v1", "v1"), ("h3", "not started", "v1", "v1")]
    assert app.versions() == ["v2", "v1", "v1"]
    assert "the fleet now runs 2 versions" in proc.stderr and "rollback" in proc.stderr
    failed = json.loads(proc.stdout)["hosts"][1]
    assert failed["step"] == "health" and failed["message"], failed


def test_revert_on_failure_brings_every_host_back(app):
    assert app.rollout("v1").returncode == 0
    break_image_on(app, app.fleet.hosts[2])
    proc = app.rollout("v2", "--revert-on-failure", "--json")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert table_of(proc) == [("h1", "reverted", "v1", "v1"), ("h2", "reverted", "v1", "v1"), ("h3", "failed", "v1", "v1")]
    assert app.versions() == ["v1", "v1", "v1"]
    assert proc.stderr.index("[h2] Rolling back") < proc.stderr.index("[h1] Rolling back")  # newest first


@pytest.mark.parametrize("fault", ["unreachable", "no project", "frozen"])
def test_a_host_that_fails_preflight_changes_nothing_anywhere(app, fault):
    assert app.rollout("v1").returncode == 0
    h3 = app.fleet.hosts[2]
    hosts = ",".join(h.name for h in app.fleet.hosts)
    extra = []
    if fault == "unreachable":
        hosts = hosts.replace("h3", f"root@{app.fleet.gateway}:1")  # nothing listens there (the bridge's own address)
        extra = ["--ssh-option", "StrictHostKeyChecking=no"]
    elif fault == "no project":
        Path(h3.deploy_root, "projects", f"{app.name}.env").rename(Path(h3.deploy_root, "projects", "moved.env.off"))
    else:
        assert app.fleet.ssh("h3", f'python3 "$BLUEGREEN_ROOT/bluegreen.pyz" lock {app.name} -m "incident 42"').returncode == 0
    argv = [sys.executable, app.stack.pyz, "rollout", app.name, "v2", "--hosts", hosts, "--ssh-config",
            app.fleet.ssh_config, "--json", *extra]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLUEGREEN_")}
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300, env=env)
    try:
        assert proc.returncode == (3 if fault == "frozen" else 2), proc.stdout + proc.stderr
        rows = json.loads(proc.stdout)["hosts"]
        assert [r["result"] for r in rows] == ["not started", "not started", "refused"], rows
        assert rows[2]["message"] and ("incident 42" in rows[2]["message"] if fault == "frozen" else True)
        assert "nothing was changed on any host" in proc.stderr
        assert app.versions()[:2] == ["v1", "v1"]
        for h in app.fleet.hosts[:2]:
            assert [e["tag"] for e in app.journal(h)] == ["v1"]  # not even a pull was journaled; nothing deployed
    finally:
        if fault == "no project":
            Path(h3.deploy_root, "projects", "moved.env.off").rename(Path(h3.deploy_root, "projects", f"{app.name}.env"))


def test_an_old_tool_is_replaced_and_a_partial_upload_never_runs(app):
    h1 = app.fleet.hosts[0]
    remote = Path(h1.deploy_root, "bluegreen.pyz")
    remote.write_bytes(b"#!/usr/bin/env python3\nprint('old tool')\n")
    # A partial upload (the connection cut after half the bytes): the tool in place stays as it was.
    from bluegreen import rollout as ro
    data = Path(app.stack.pyz).read_bytes()
    import hashlib
    command = shlex.join(["python3", "-c", ro.UPLOAD, "", hashlib.sha256(data).hexdigest(), str(len(data))])
    cut = subprocess.run(app.fleet.ssh_argv("h1") + ["--", command], input=data[: len(data) // 2],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    assert cut.returncode == 3 and b"incomplete upload" in cut.stderr, cut.stderr
    assert remote.read_bytes().endswith(b"print('old tool')\n")
    assert not [p for p in remote.parent.iterdir() if p.name.startswith(".bluegreen.pyz.")]
    proc = app.rollout("v1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[h1] sending bluegreen" in proc.stderr and remote.read_bytes() == data


def test_a_before_host_hook_that_fails_leaves_that_host_untouched(app):
    assert app.rollout("v1").returncode == 0
    hook = f"{sys.executable} -c \"import os,sys; sys.exit(7 if os.environ['BLUEGREEN_HOST'] == 'h2' else 0)\""
    proc = app.rollout("v2", "--before-host", hook, "--json")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert table_of(proc) == [("h1", "deployed", "v1", "v2"), ("h2", "failed", "v1", "v1"), ("h3", "not started", "v1", "v1")]
    row = json.loads(proc.stdout)["hosts"][1]
    assert row["step"] == "before-host" and "exited 7" in row["message"] and "not touched" in row["message"]
    assert app.versions() == ["v2", "v1", "v1"] and [e["tag"] for e in app.journal(app.fleet.hosts[1])] == ["v1"]


def test_ctrl_c_during_the_second_host_lets_it_finish_and_starts_no_other(app):
    assert app.rollout("v1").returncode == 0
    slow_h2 = f"{sys.executable} -c \"import os,time; os.environ['BLUEGREEN_HOST'] == 'h2' and time.sleep(2)\""
    proc, watcher = app.start("v2", "--before-host", slow_h2, "--json")
    try:
        watcher.wait_for("[h2] before-host", timeout=120)
        proc.send_signal(signal.SIGINT)  # a cancelled CI job
        proc.wait(timeout=120)  # the watcher reads stderr; stdout (the JSON table) is small
        out = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    err = watcher.text()
    assert proc.returncode == 1, out + err
    assert table_of(subprocess.CompletedProcess([], 1, out, "")) == [
        ("h1", "deployed", "v1", "v2"), ("h2", "deployed", "v1", "v2"), ("h3", "interrupted", "v1", "v1")]
    assert "SIGINT: no new host is started" in err
    assert app.versions() == ["v2", "v2", "v1"]


def test_an_after_host_hook_that_fails_stops_after_that_host(app):
    assert app.rollout("v1").returncode == 0
    hook = f"{sys.executable} -c \"import os,sys; sys.exit(5 if os.environ['BLUEGREEN_HOST'] == 'h1' else 0)\""
    proc = app.rollout("v2", "--after-host", hook, "--json")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = json.loads(proc.stdout)["hosts"]
    assert [(r["result"], r["after"], r["step"]) for r in rows] == [
        ("failed", "v2", "after-host"), ("not started", "v1", ""), ("not started", "v1", "")]
    assert "(the deploy itself succeeded)" in rows[0]["message"]
    assert app.versions() == ["v2", "v1", "v1"]


def test_dry_run_then_batches_of_two_with_github_groups(app):
    assert app.rollout("v1").returncode == 0
    dry = app.rollout("v2", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert all(f"[{h.name}] Dry run: deploy {app.fleet.image_repo}:v2" in dry.stderr for h in app.fleet.hosts), dry.stderr
    assert app.versions() == ["v1", "v1", "v1"]
    assert all([e["tag"] for e in app.journal(h)] == ["v1"] for h in app.fleet.hosts)
    proc = app.rollout("v2", "--batch", "2", "--json", env={"GITHUB_ACTIONS": "true"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(proc.stdout)["hosts"]
    assert [(r["target"], r["batch"], r["result"]) for r in rows] == [("h1", 1, "deployed"), ("h2", 1, "deployed"),
                                                                      ("h3", 2, "deployed")]
    assert app.versions() == ["v2", "v2", "v2"]
    assert proc.stderr.count("::group::") == 3 and proc.stderr.count("::endgroup::") == 3
    assert "::error" not in proc.stderr


def test_a_second_signal_aborts_at_once_and_names_the_host_in_progress(app):
    assert app.rollout("v1").returncode == 0
    slow_h2 = f"{sys.executable} -c \"import os,time; os.environ['BLUEGREEN_HOST'] == 'h2' and time.sleep(30)\""
    proc, watcher = app.start("v2", "--before-host", slow_h2, "--json")
    try:
        watcher.wait_for("[h2] before-host", timeout=120)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)  # at once: not after the 30 s hook
        out = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    err = watcher.text()
    assert proc.returncode == 4, out + err
    assert "a deploy may still be running on: h2" in err
    rows = json.loads(out)["hosts"]
    assert [(r["target"], r["result"]) for r in rows] == [("h1", "deployed"), ("h2", "interrupted"), ("h3", "interrupted")]
    assert app.versions() == ["v2", "v1", "v1"]
