"""Real-stack tests of nginx's keep-alive connections to the app, and of ports held by outgoing connections.

The busybox test app closes every connection after one answer, so it cannot show upstream keep-alive. The app
here is the host's own /usr/bin/python3 (an HTTP/1.1 server that keeps connections open and counts them), run
inside a FROM-scratch busybox image by `chroot /host` over a read-only bind mount of / (DOCKER_ARGS).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

import stack as stacklib
from bluegreen import init, nginx, settings

HOST_PYTHON = "/usr/bin/python3"

APP = r'''
import os, signal, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

VERSION = os.environ.get("VERSION", "?")
lock = threading.Lock()
stats = {"connections": 0, "requests": 0}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep the connection open after an answer

    def setup(self):
        super().setup()
        with lock:
            stats["connections"] += 1

    def do_GET(self):
        with lock:
            stats["requests"] += 1
            body = {"/version": VERSION, "/api/health": "ok " + VERSION,
                    "/stats": "%(connections)d %(requests)d" % stats}.get(self.path.split("?")[0])
        if body is None:
            self.send_error(404)
            return
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


ThreadingHTTPServer.daemon_threads = True
server = ThreadingHTTPServer(("0.0.0.0", 8080), Handler)
# PID 1 of the container: without a handler SIGTERM is ignored. Exit at once, cutting every open connection,
# so that any request still reaching a stopped container fails visibly.
signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
server.serve_forever()
'''

DOCKERFILE = """\
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
ENV VERSION={version}
EXPOSE 8080
ENTRYPOINT ["/bin/sh", "-c", "exec chroot /host {python} {script}"]
"""


@pytest.fixture
def keepalive_app(project):
    """Images v1..v3 of the keep-alive app in the test registry (the script lives on the host); removed after."""
    if not os.access(HOST_PYTHON, os.X_OK):
        pytest.skip(f"{HOST_PYTHON} is needed inside the app container")
    work = tempfile.mkdtemp(prefix="bg-keepalive-")
    repo = f"{project.stack.registry.open_addr}/bg/keepalive-{project.name}"
    tags = ("v1", "v2", "v3")
    try:
        script = Path(work) / "app.py"
        script.write_text(APP)
        script.chmod(0o644)
        os.chmod(work, 0o755)
        for tag in tags:
            ctx = Path(work) / tag
            ctx.mkdir()
            shutil.copy2(stacklib.BUSYBOX, ctx / "busybox")
            (ctx / "Dockerfile").write_text(DOCKERFILE.format(version=tag, python=HOST_PYTHON, script=script))
            stacklib.docker("build", "-q", "-t", f"{repo}:{tag}", str(ctx), env={"DOCKER_BUILDKIT": "0"})
            stacklib.push_image(f"{repo}:{tag}")
        yield repo
    finally:
        for tag in tags:
            stacklib.docker("rmi", "-f", f"{repo}:{tag}", check=False)
        shutil.rmtree(work, ignore_errors=True)


def serve_init_block(project) -> Path:
    """The server block exactly as `bluegreen init` renders it, on the project's private nginx port."""
    site = Path(project.stack.nginx.site_path(project.name))
    site.write_text(init.render_server_block(
        project=project.name, upstream=project.name, upstream_file=project.upstream_file,
        listen=f"127.0.0.1:{project.nginx_port}", server_name="_",
    ))
    project.stack.nginx.reload()
    return site


def app_stats(port: int) -> tuple[int, int]:
    status, body = stacklib.http_get(f"http://127.0.0.1:{port}/stats")
    assert status == 200, body
    connections, requests = map(int, body.split())
    return connections, requests


def test_upstream_keepalive_connections_of_old_workers_never_reach_a_stopped_container(project, keepalive_app):
    """Steady traffic through nginx across three deploys with UPSTREAM_KEEPALIVE on (the default): nginx reuses
    connections to the app, keeps `keepalive` in the upstream file on every deploy, and no request fails: the
    idle connections an old worker holds close with it, before the old container is stopped."""
    project.write_env(IMAGE=keepalive_app, DOCKER_ARGS="-v /:/host:ro", STOP_TIMEOUT="2")
    project.run(project.name, "v1", check=True)
    serve_init_block(project)
    upstream = Path(project.upstream_file)
    assert "    keepalive 16;\n" in upstream.read_text()

    failures: list[str] = []
    answers = {"count": 0}
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            status, body = project.get("/version", timeout=10)
            if status != 200:
                failures.append(f"{status} {body[:80]}")
            answers["count"] += 1
            time.sleep(0.005)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        for tag, port in (("v2", project.green_port), ("v3", project.blue_port)):
            time.sleep(1.0)
            before = answers["count"]
            proc = project.run(project.name, tag, check=True)
            assert "did not write" not in proc.stderr, proc.stderr
            assert "    keepalive 16;\n" in upstream.read_text()  # kept on every deploy
            assert nginx.foreign_directives(upstream.read_text()) == []
            assert answers["count"] > before, "no traffic ran during the deploy"
            time.sleep(1.0)
            connections, requests = app_stats(port)
            # Keep-alive in use: the new container answered many requests over few connections.
            assert requests >= 2 * connections, (connections, requests)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=15)
    assert failures == [], f"{len(failures)} failed of {answers['count']}: {failures[:5]}"
    assert answers["count"] > 100
    assert project.get("/version") == (200, "v3")


def test_a_hand_added_upstream_line_is_named_with_the_setting_to_use(project):
    """A user adds `keepalive 32;` to the managed file: the next deploy says it drops it and names the setting."""
    project.write_env()
    project.run(project.name, "v1", check=True)
    project.serve()
    upstream = Path(project.upstream_file)
    upstream.write_text(upstream.read_text().replace("    keepalive 16;\n", "    keepalive 32;\n"))
    proc = project.run(project.name, "v2", check=True)
    assert "has `keepalive 32;`, which bluegreen did not write" in proc.stderr
    # The setting is named once the env file reads it (settings.BY_KEY); never suggested before.
    if "UPSTREAM_KEEPALIVE" in settings.BY_KEY:
        assert f"set UPSTREAM_KEEPALIVE=32 in {project.name}.env" in proc.stderr
    else:
        assert "UPSTREAM_KEEPALIVE" not in proc.stderr and "no bluegreen setting writes it" in proc.stderr
    assert "    keepalive 16;\n" in upstream.read_text()
    # The file as the deploy wrote it is not warned about again.
    proc = project.run(project.name, "v1", check=True)
    assert "did not write" not in proc.stderr


def test_a_port_held_by_an_outgoing_connection_is_named_as_such(project):
    """BLUE_PORT taken by the local end of an outgoing connection (no listener): the message says so."""
    listener = socket.socket()
    client = socket.socket()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client.bind(("127.0.0.1", project.blue_port))  # a connection's local end, as the kernel picks them
        client.connect(listener.getsockname())
        project.write_env()
        proc = project.run(project.name, "v1", check=1)
        assert f"Port 127.0.0.1:{project.blue_port} (BLUE_PORT) is already taken by the local end of 1 outgoing " \
               f"TCP connection(s) (ESTABLISHED; nothing listens on it" in proc.stderr, proc.stderr
        assert project.containers() == []
    finally:
        client.close()
        listener.close()


def test_ports_in_the_ephemeral_range_are_warned_about_by_deploy_and_doctor(project):
    """BLUE/GREEN_PORT picked from the kernel's ephemeral range (as port 0 binds get them): the deploy goes on
    with a warning naming both fixes, and doctor warns the same."""
    from bluegreen import ports

    low, high = ports.ephemeral_range()
    picked = []
    for _ in range(2):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))  # the kernel picks from the ephemeral range
            picked.append(sock.getsockname()[1])
    assert all(low <= p <= high for p in picked) and picked[0] != picked[1], (picked, low, high)
    project.write_env(BLUE_PORT=str(picked[0]), GREEN_PORT=str(picked[1]))
    proc = project.run(project.name, "v1", check=True)
    said = f"BLUE_PORT={picked[0]} and GREEN_PORT={picked[1]} in {project.name}.env are inside the kernel's " \
           f"ephemeral port range {low}-{high}"
    assert f"warning: {said}" in proc.stderr, proc.stderr
    assert f"ip_local_reserved_ports={picked[0]},{picked[1]}" in proc.stderr and f"below {low}" in proc.stderr
    doctor = project.run("doctor", project.name)
    assert re.search(r"WARN\s+ports\s+" + re.escape(said), doctor.stdout), doctor.stdout
