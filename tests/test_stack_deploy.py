"""Real-stack tests: the built pyz against real dockerd, docker-registry and nginx.

Each failure row of the seed's table is provoked for real, and each test proves that afterwards a
request through nginx is still answered by the old version.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path


import stack as stacklib

PYENV_PY39 = sorted((Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions").glob("3.9*/bin/python3"))


def inspect(name: str) -> dict | None:
    proc = stacklib.docker("container", "inspect", name, check=False)
    return json.loads(proc.stdout)[0] if proc.returncode == 0 else None


def serving(project) -> str:
    """The version nginx answers with right now (asserts a 200)."""
    status, body = project.get("/version")
    assert status == 200, f"nginx answered {status}: {body}"
    return body.strip()


def assert_old_still_serves(project) -> None:
    """After a failed deploy: v1 answers through nginx and the only container is the old blue one."""
    assert serving(project) == "v1"
    assert project.containers() == [f"{project.name}-blue"]


def deploy_ok(project, tag: str, *extra, **kw) -> subprocess.CompletedProcess:
    return project.run(project.name, tag, *extra, check=True, **kw)


class LineWatcher:
    """Collects a Popen's stderr lines in a thread, so a test can wait for a step to start."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(proc.stderr,), daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in self.lines):
                return
            time.sleep(0.02)
        raise AssertionError(f"{text!r} not seen within {timeout}s; got: {''.join(self.lines)}")

    def text(self) -> str:
        self.thread.join(timeout=10)
        return "".join(self.lines)


def start_slow_deploy(project) -> tuple[subprocess.Popen, LineWatcher]:
    """A deploy of the image that boots in 3 s, in the background, once it is health-checking."""
    slow = project.popen(project.name, "slow")
    watcher = LineWatcher(slow)
    watcher.wait_for("[2/6] start")
    return slow, watcher


def test_first_deploy_then_blue_green_blue(project):
    project.write_env(DB_PASSWORD="s3cret-pw", SPRING_PROFILES="prod")
    first = deploy_ok(project, "v1")
    assert f"{project.name} v1 now serves from {project.name}-blue on 127.0.0.1:{project.blue_port}" in first.stdout
    for n in range(1, 7):
        assert f"[{n}/6]" in first.stderr
    project.serve()
    assert serving(project) == "v1"

    blue = inspect(f"{project.name}-blue")
    assert blue["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
    assert blue["HostConfig"]["PortBindings"] == {"8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(project.blue_port)}]}
    labels = dict(blue["Config"]["Labels"])
    assert re.fullmatch(r"1:[0-9a-f]{64}:[0-9a-f]{64}", labels.pop("bluegreen.config", ""))  # how it was created (hashes)
    assert labels == {"bluegreen.project": project.name, "bluegreen.color": "blue", "bluegreen.tag": "v1"}
    # The app got its environment; the secret is nowhere in what bluegreen printed or in the container's argv.
    assert project.get("/cgi-bin/env?DB_PASSWORD") == (200, "s3cret-pw")
    assert project.get("/cgi-bin/env?SPRING_PROFILES_ACTIVE") == (200, "prod")
    assert "s3cret-pw" not in first.stdout + first.stderr
    assert "s3cret-pw" not in json.dumps(blue["Args"]) + json.dumps(blue["Config"]["Cmd"]) + json.dumps(blue["Config"]["Labels"])
    assert not list(Path("/tmp").glob("bluegreen-*.env")), "the temporary env file was left behind"

    second = deploy_ok(project, "v2")
    assert f"now serves from {project.name}-green" in second.stdout and f"(was v1 in {project.name}-blue)" in second.stdout
    assert serving(project) == "v2"
    assert inspect(f"{project.name}-blue")["State"]["Status"] == "exited"
    assert Path(project.env_file).with_suffix(".active").read_text() == "green\n"
    assert f"server 127.0.0.1:{project.green_port};" in Path(project.upstream_file).read_text()

    # The third deploy runs under Python 3.9, as on Amazon Linux 2023.
    assert PYENV_PY39, "CPython 3.9 from pyenv is needed to run the pyz as AL2023 would"
    proc = subprocess.run([str(PYENV_PY39[0]), project.stack.pyz, project.name, "v3"], env=project._env(None),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert serving(project) == "v3"
    assert inspect(f"{project.name}-blue")["Config"]["Labels"]["bluegreen.tag"] == "v3"
    assert inspect(f"{project.name}-green")["State"]["Status"] == "exited"
    assert Path(project.env_file).with_suffix(".active").read_text() == "blue\n"


def test_redeploy_of_the_same_tag(project):
    project.write_env()
    deploy_ok(project, "v1")
    project.serve()
    again = deploy_ok(project, "v1")
    assert f"now serves from {project.name}-green" in again.stdout
    assert serving(project) == "v1"


def test_missing_tag_leaves_the_old_version_serving(project):
    project.write_env()
    deploy_ok(project, "v1")
    project.serve()
    upstream = Path(project.upstream_file).read_text()
    proc = project.run(project.name, "no-such-tag", check=1)
    assert "Could not pull" in proc.stderr and "no-such-tag" in proc.stderr
    assert f"The previous version (v1, container {project.name}-blue" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert serving(project) == "v1"
    assert Path(project.upstream_file).read_text() == upstream
    assert project.containers() == [f"{project.name}-blue"]


def test_registry_refusing_login_leaves_the_old_version_serving(project):
    project.write_env(IMAGE=project.stack.auth_image_repo)
    good, bad = project.stack.docker_config(good=True), project.stack.docker_config(good=False)
    deploy_ok(project, "v1", env={"DOCKER_CONFIG": good})
    project.serve()
    proc = project.run(project.name, "v1", env={"DOCKER_CONFIG": bad}, check=1)
    assert "unauthorized" in proc.stderr.lower() and f"docker login {project.stack.registry.auth_addr}" in proc.stderr
    assert_old_still_serves(project)


def test_port_taken_by_a_foreign_process(project):
    project.write_env()
    deploy_ok(project, "v1")
    project.serve()
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", project.green_port))
    squatter.listen(1)
    try:
        proc = project.run(project.name, "v2", check=1)
    finally:
        squatter.close()
    assert f"Port 127.0.0.1:{project.green_port} (GREEN_PORT) is already taken by another process" in proc.stderr
    assert "[2/6] start" in proc.stderr and "[3/6]" not in proc.stderr
    assert_old_still_serves(project)


def test_never_healthy_image_is_removed_and_old_keeps_serving(project):
    project.write_env(HEALTH_TIMEOUT="3")
    deploy_ok(project, "v1")
    project.serve()
    started = time.monotonic()
    proc = project.run(project.name, "unhealthy", check=1)
    assert time.monotonic() - started < 15
    assert "did not answer HTTP 200" in proc.stderr and "last answer: HTTP 500" in proc.stderr
    assert "HEALTH_TIMEOUT=3s" in proc.stderr and "still serves" in proc.stderr
    assert_old_still_serves(project)


def test_image_that_exits_on_boot_fails_at_once_with_its_log(project):
    project.write_env(HEALTH_TIMEOUT="60")
    deploy_ok(project, "v1")
    project.serve()
    started = time.monotonic()
    proc = project.run(project.name, "crash", check=1)
    assert time.monotonic() - started < 20, "a crashed container must not wait for HEALTH_TIMEOUT"
    # docker restarts it (--restart unless-stopped): seen while restarting, the exit code is known; seen running
    # again, docker no longer has it, and bluegreen claims none (CI once saw "exited with code 0" here).
    assert "exited while starting" in proc.stderr and "exited with code 0" not in proc.stderr
    assert "exited with code 3" in proc.stderr or "the container exited and docker restarted it" in proc.stderr
    assert stacklib.FATAL_LINE in proc.stderr
    # The app's log lines are shown to the user but never journaled (they can hold anything).
    journal = Path(project.env_file).with_suffix(".journal").read_text()
    assert "exited while starting" in journal and stacklib.FATAL_LINE not in journal
    assert_old_still_serves(project)


def test_nginx_t_failure_restores_the_upstream_and_old_keeps_serving(project):
    project.write_env()
    deploy_ok(project, "v1")
    project.serve()
    upstream = Path(project.upstream_file).read_bytes()
    broken = Path(project.stack.conf_d) / f"{project.name}-zz-broken.conf"
    # Broken while the deploy runs (at the start of the switch): a config broken before it starts is refused
    # before the pull (tests/test_stack_truth.py).
    proc = project.popen(project.name, "v2", env={"BLUEGREEN_FAULT_PAUSE": "switch:2"})
    watch = LineWatcher(proc)
    try:
        watch.wait_for("fault-pause: switch")
        broken.write_text("this_is_not_a_directive on;\n")
        assert proc.wait(timeout=60) == 1
    finally:
        broken.unlink(missing_ok=True)
    stderr = watch.text()
    assert 'unknown directive "this_is_not_a_directive"' in stderr
    assert "The upstream file was put back" in stderr and "still serves" in stderr
    assert Path(project.upstream_file).read_bytes() == upstream
    assert_old_still_serves(project)
    # With the config fixed, the same deploy goes through.
    deploy_ok(project, "v2")
    assert serving(project) == "v2"


def test_second_deploy_is_refused_while_one_runs_then_can_wait(project):
    project.write_env()
    deploy_ok(project, "v1")
    project.serve()
    slow, watcher = start_slow_deploy(project)
    refused = project.run(project.name, "v2", check=3)
    assert f"pid {slow.pid}" in refused.stderr and "deploying tag slow" in refused.stderr
    assert "Nothing was changed" in refused.stderr
    waited = project.run(project.name, "v2", "--wait", "60", check=True)
    assert slow.wait(timeout=60) == 0, watcher.text()
    # The queued deploy ran after the slow one and planned from its result.
    assert f"now serves from {project.name}-blue" in waited.stdout and f"(was slow in {project.name}-green)" in waited.stdout
    assert serving(project) == "v2"


def test_kill_9_mid_health_check_then_a_clean_deploy(project):
    project.write_env()
    deploy_ok(project, "v1")
    project.serve()
    slow, watcher = start_slow_deploy(project)
    os.kill(slow.pid, signal.SIGKILL)
    slow.wait(timeout=10)
    assert serving(project) == "v1"
    assert f"{project.name}-green" in project.containers()  # the killed deploy's leftover
    after = deploy_ok(project, "v2")
    assert "removed leftover" in after.stderr
    assert serving(project) == "v2"


def test_sigterm_mid_health_check_undoes_the_new_container(project):
    project.write_env()
    deploy_ok(project, "v1")
    project.serve()
    slow, watcher = start_slow_deploy(project)
    slow.send_signal(signal.SIGTERM)
    assert slow.wait(timeout=30) == 1
    err = watcher.text()
    assert "interrupted by SIGTERM" in err and "still serves" in err
    assert_old_still_serves(project)
