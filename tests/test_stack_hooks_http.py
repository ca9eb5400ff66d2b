"""Real-stack tests: hooks that leave children behind or that others could change, and a webhook that redirects."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from test_stack_deploy import deploy_ok, serving


@pytest.fixture
def hooks_dir(project):
    path = Path(project.stack.root) / "hooks" / project.name
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o755)
    path.parent.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return False


def test_a_pre_deploy_hook_that_leaves_a_child_on_its_output_does_not_abort_the_deploy(project, hooks_dir):
    project.write_env(HOOK_TIMEOUT="8")
    deploy_ok(project, "v1")
    project.serve()
    pidfile = hooks_dir / "bg.pid"
    hook = hooks_dir / "pre-deploy"
    # A hook that starts a helper and forgets it: the helper keeps the hook's stdout open. The old runner
    # waited for that pipe to close, reported the hook as timed out after HOOK_TIMEOUT and aborted the deploy.
    hook.write_text(f"#!/bin/sh\nsleep 120 &\necho $! > {pidfile}\necho checks passed\nexit 0\n")
    hook.chmod(0o755)
    pid = None
    try:
        started = time.monotonic()
        done = deploy_ok(project, "v2")
        elapsed = time.monotonic() - started
        pid = int(pidfile.read_text())
        assert "hook pre-deploy: ok" in done.stderr and "checks passed" in done.stderr
        assert "left processes running" in done.stderr
        assert serving(project) == "v2" and elapsed < 8, elapsed
        assert not alive(pid), "the hook's background child outlived the hook"
    finally:
        if pid and alive(pid):
            os.kill(pid, 9)


@pytest.mark.skipif(os.geteuid() != 0, reason="the rule is for bluegreen running as root")
def test_a_group_writable_pre_deploy_hook_is_refused_and_nothing_changes(project, hooks_dir):
    project.write_env()
    deploy_ok(project, "v1")
    project.serve()
    marker = hooks_dir / "ran"
    hook = hooks_dir / "pre-deploy"
    hook.write_text(f"#!/bin/sh\ntouch {marker}\n")
    hook.chmod(0o775)
    upstream = Path(project.upstream_file).read_bytes()
    proc = project.run(project.name, "v2", check=1)
    assert f"chmod go-w {hook}" in proc.stderr and "did not start. Nothing was changed" in proc.stderr
    assert not marker.exists() and Path(project.upstream_file).read_bytes() == upstream
    assert serving(project) == "v1" and project.containers() == [f"{project.name}-blue"]
    hook.chmod(0o755)
    deploy_ok(project, "v2")
    assert marker.exists() and serving(project) == "v2"


class Redirector:
    """A webhook endpoint that answers every POST with a 302 to itself, and records request lines."""

    def __init__(self) -> None:
        self.lines: list = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(5)
                data = b""
                try:
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    self.lines.append(data.split(b"\r\n", 1)[0].decode("latin-1"))
                    if data.startswith(b"POST"):
                        conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:%d/moved/L0CATI0N-T0KEN\r\n"
                                     b"Content-Length: 0\r\nConnection: close\r\n\r\n" % self.port)
                    else:
                        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                except OSError:
                    pass

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


def test_a_webhook_that_redirects_is_reported_as_not_delivered(project):
    hook = Redirector()
    try:
        project.write_env(NOTIFY_WEBHOOK_URL=f"http://127.0.0.1:{hook.port}/services/s3cr3t-hook")
        done = deploy_ok(project, "v1")
    finally:
        hook.close()
    assert "notification was not delivered" in done.stderr and "redirect (HTTP 302)" in done.stderr
    assert "s3cr3t" not in done.stdout + done.stderr and "L0CATI0N" not in done.stdout + done.stderr
    assert hook.lines == ["POST /services/s3cr3t-hook HTTP/1.1"]  # the old client followed it with a GET
