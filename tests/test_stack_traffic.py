"""Real-stack tests of what happens to traffic around the switch: drain and post-switch verification."""

from __future__ import annotations

import re
import signal
import threading
import time
from pathlib import Path

from test_stack_deploy import deploy_ok, serving


def in_flight(project, path: str) -> tuple[threading.Thread, dict]:
    """Start a GET through nginx in a thread and give nginx 0.5 s to take it in; result gets
    "answer" (status, body) and "done_at" (monotonic) when it ends."""
    result: dict = {}

    def request() -> None:
        result["answer"] = project.get(path, timeout=60)
        result["done_at"] = time.monotonic()

    client = threading.Thread(target=request)
    client.start()
    time.sleep(0.5)
    return client, result


def test_old_container_outlives_every_old_nginx_worker(project):
    """A request in flight on an old worker when nginx reloads must still be answered by the old container.

    If bluegreen stopped the old container as soon as `nginx -s reload` returned, this request
    (held 5 s by the app, which exits at once on SIGTERM) would be cut and nginx would answer 502.
    """
    project.write_env(STOP_TIMEOUT="10")
    deploy_ok(project, "v1")
    project.serve()
    client, result = in_flight(project, "/cgi-bin/slow?5")  # now held by an old worker, routed to blue
    proc = deploy_ok(project, "v2")
    retired_at = time.monotonic()
    client.join(timeout=30)
    assert result["answer"] == (200, "slow v1")  # the proof: the old container outlived the old worker
    assert result["done_at"] <= retired_at
    drain = re.search(r"\[4/6\] drain .*all exited\): ([0-9.]+)s", proc.stderr)
    assert drain, proc.stderr
    # A drain with no request in flight takes about 0.1 s; this one waited for the slow request.
    assert float(drain.group(1)) >= 1.0, "the drain did not wait for the worker holding the slow request"
    assert serving(project) == "v2"


def test_post_switch_verification_reverts_when_nginx_routes_elsewhere(project):
    project.write_env(VERIFY_TIMEOUT="1")
    deploy_ok(project, "v1")
    # A server block that ignores the managed upstream: it always proxies to the blue port.
    route = "$bluegreen_route_" + re.sub(r"[^A-Za-z0-9_]", "_", project.name)
    site = Path(project.stack.nginx.site_path(project.name))
    site.write_text(
        "server {\n    listen 127.0.0.1:%d;\n    add_header X-Bluegreen-Upstream %s always;\n"
        "    location / { proxy_pass http://127.0.0.1:%d; }\n}\n" % (project.nginx_port, route, project.blue_port)
    )
    project.stack.nginx.reload()
    upstream = Path(project.upstream_file).read_bytes()
    proc = project.run(project.name, "v2", check=1)
    assert f"was routed to 127.0.0.1:{project.blue_port} instead of reaching {project.name}-green" in proc.stderr
    assert "The previous upstream was put back" in proc.stderr and "still serves" in proc.stderr
    assert Path(project.upstream_file).read_bytes() == upstream
    assert project.containers() == [f"{project.name}-blue"]
    assert serving(project) == "v1"
    # Ordinary clients never see the internal address.
    status, _ = project.get("/version")
    headers = stacklib_headers(project.url("/version"))
    assert status == 200 and "X-Bluegreen-Upstream" not in headers


def stacklib_headers(url: str) -> dict:
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=5) as resp:
        return dict(resp.headers.items())


def test_hand_written_server_block_without_the_probe_header_still_deploys(project):
    project.write_env()
    deploy_ok(project, "v1")
    project.serve(probe=False)
    proc = deploy_ok(project, "v2")
    assert "could not prove the new container serves" in proc.stderr
    assert "add_header X-Bluegreen-Upstream" in proc.stderr
    assert serving(project) == "v2"


def test_probe_route_is_proven_with_the_managed_header(project):
    project.write_env()
    deploy_ok(project, "v1")
    project.serve()
    proc = deploy_ok(project, "v2")
    assert f"(routed to 127.0.0.1:{project.green_port})" in proc.stderr
    assert "could not prove" not in proc.stderr
    # The token is kept across deploys, so old and new workers both answer probes.
    first_token = re.search(r'"([0-9a-f]{32})" \$upstream_addr', Path(project.upstream_file).read_text()).group(1)
    deploy_ok(project, "v3")
    assert first_token in Path(project.upstream_file).read_text()
    assert serving(project) == "v3"


def test_drain_is_bounded_by_drain_timeout_and_says_so(project):
    """A connection that outlives DRAIN_TIMEOUT (a long poll here) must not hold the deploy: it ends
    at the bound, with a warning that names the fix."""
    project.write_env(DRAIN_TIMEOUT="1")
    deploy_ok(project, "v1")
    project.serve()
    client, result = in_flight(project, "/cgi-bin/slow?30")  # a long poll, held by an old worker
    started = time.monotonic()
    proc = deploy_ok(project, "v2")
    took = time.monotonic() - started
    client.join(timeout=60)
    drain = re.search(r"\[4/6\] drain .*\(1 still alive after DRAIN_TIMEOUT=1s\): ([0-9.]+)s", proc.stderr)
    assert drain, proc.stderr
    assert 1.0 <= float(drain.group(1)) < 3.0
    assert "worker_shutdown_timeout" in proc.stderr and f"go to {project.name}-blue may be cut" in proc.stderr
    assert took < 20, "the deploy waited for the long poll instead of stopping at DRAIN_TIMEOUT"
    # The price of the bound, as the warning says: this app exits at once on SIGTERM, so the long
    # poll to the old container was cut (a 502 from nginx), long before its 30 s.
    assert result.get("answer", (None,))[0] == 502, result
    assert serving(project) == "v2"


def test_sigterm_during_the_drain_undoes_within_seconds_and_the_old_request_is_answered(project):
    """SIGTERM while the drain waits for an old worker holding a long request: the undo reloads back to the old
    container, which stays, so it must not wait for that worker again (it used to wait the whole request,
    30 s, past any CI kill grace). The request itself is answered by the old container."""
    project.write_env(DRAIN_TIMEOUT="60")
    deploy_ok(project, "v1")
    project.serve()
    client, result = in_flight(project, "/cgi-bin/slow?20")  # held by an old worker, routed to blue
    proc = project.popen(project.name, "v2", env={"BLUEGREEN_FAULT_PAUSE": "drain:5"})
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("fault-pause: drain"):
            break
    assert lines and lines[-1].startswith("fault-pause: drain"), "".join(lines)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    proc.wait(timeout=60)
    took = time.monotonic() - signalled
    assert proc.returncode == 1, "".join(lines) + rest
    assert took < 8, f"the undo took {took:.1f}s after SIGTERM\n{rest}"
    assert "interrupted by SIGTERM" in rest
    client.join(timeout=60)
    assert result["answer"] == (200, "slow v1")  # the old container kept serving the request it had
    assert serving(project) == "v1" and project.containers() == [f"{project.name}-blue"]
