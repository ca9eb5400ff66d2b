"""Issue 10 on the layout of a real server: nginx.conf that includes only its own server-block directory (like
/etc/nginx/conf.d), a server block written by `init`, bluegreen's upstream include added by `setup`. On that
layout, one service through its life: healthy, its container stopped, nginx stopped, a deploy while nginx is
down, the include taken out of nginx.conf; status and doctor exit as documented at every stage."""

from __future__ import annotations

import json
import re
import time
import stack as stacklib
from bluegreen.nginx import ROUTE_HEADER
from test_stack_setup import bare  # noqa: F401  (the fixture, shared with the setup tests)


def wait_until(check, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def status(project, env, *args):
    proc = project.run("status", project.name, *args, env=env)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    return proc


def verdict(project, env) -> tuple[int, str, dict]:
    proc = status(project, env, "--json")
    (item,) = json.loads(proc.stdout)
    return proc.returncode, item["verdict"], {c["name"]: c["ok"] for c in item["checks"]}


def test_status_doctor_and_deploy_tell_the_truth_on_a_system_style_layout(stack, project, bare):  # noqa: F811
    env = bare.env()
    project.run("init", project.name, "--image", stack.image_repo, "--ports", f"{project.blue_port},{project.green_port}",
                "--listen", f"127.0.0.1:{project.nginx_port}", env=env, check=True)
    env_file = bare.root / "projects" / f"{project.name}.env"
    with env_file.open("a") as fh:
        fh.write("LOG_DIR=\nHEALTH_TIMEOUT=20\n")
    site = bare.conf_dir / f"{project.name}.conf"
    block = site.read_text()
    # init's server block: HTTP/1.1 to the app with an empty Connection header (upstream keep-alive), the
    # usual forwarded headers, and the route line status and deploy prove the path with.
    for line in ("proxy_http_version 1.1;", 'proxy_set_header Connection "";', "proxy_set_header X-Real-IP",
                 "proxy_set_header X-Forwarded-For", "proxy_set_header X-Forwarded-Proto", f"add_header {ROUTE_HEADER} "):
        assert line in block, (line, block)
    original_conf = bare.conf.read_bytes()
    project.run(*bare.setup_args("--schedule", "none"), env=env, check=True)
    include = f"include {bare.root}/nginx/conf.d/*.conf;"
    assert bare.conf.read_text().count(include) == 1

    project.run(project.name, "v1", env=env, check=True)
    upstream = bare.root / "nginx" / "conf.d" / f"{project.name}-upstream.conf"
    assert "    keepalive 16;\n" in upstream.read_text()

    # Healthy: 0, every check on the client's path passes.
    code, word, checks = verdict(project, env)
    assert (code, word) == (0, "ok") and all(checks.values()), checks
    assert project.get("/version") == (200, "v1")

    # The serving container stopped: 1, "down", and doctor is no "Ready to deploy".
    stacklib.docker("stop", "-t", "1", f"{project.name}-blue")
    code, word, checks = verdict(project, env)
    assert (code, word) == (1, "down") and not checks["container"] and not checks["through nginx"], checks
    doctor = project.run("doctor", project.name, env=env)
    assert doctor.returncode == 1 and "Ready to deploy" not in doctor.stdout, doctor.stdout
    assert re.search(r"FAIL\s+serving\s+the service is down", doctor.stdout), doctor.stdout
    stacklib.docker("start", f"{project.name}-blue")
    wait_until(lambda: project.get("/version") == (200, "v1"), 20)
    assert verdict(project, env)[:2] == (0, "ok")

    # nginx stopped: 1, "down: nginx is not running"; a deploy fails before its pre-deploy hook and its pull.
    hooks = bare.root / "hooks" / project.name
    hooks.mkdir(parents=True)
    marker = bare.work / "pre-deploy-ran"
    (hooks / "pre-deploy").write_text(f"#!/bin/sh\ntouch {marker}\n")
    (hooks / "pre-deploy").chmod(0o700)
    bare.nginx.stop()
    try:
        proc = status(project, env)
        assert proc.returncode == 1 and "verdict     DOWN: nginx is not running" in proc.stdout, proc.stdout
        deploy = project.run(project.name, "v2", env=env)
        assert deploy.returncode == 1, deploy.stdout + deploy.stderr
        assert "nginx is not running" in deploy.stderr and "[1/6] pull" not in deploy.stderr, deploy.stderr
        assert "still serves" not in deploy.stderr and not marker.exists()
        assert project.containers() == [f"{project.name}-blue"]
    finally:
        bare.nginx.start(keep_config=True)  # as `systemctl start nginx` would: nginx.conf with setup's include
    assert verdict(project, env)[:2] == (0, "ok")

    # The include taken out of nginx.conf (nginx keeps running what it loaded; `nginx -t` now fails with "host
    # not found in upstream"): the deploy points at setup before pulling; setup puts the line back.
    bare.conf.write_bytes(original_conf)
    deploy = project.run(project.name, "v2", env=env)
    assert deploy.returncode == 2 and "host not found in upstream" in deploy.stderr, deploy.stderr
    assert " setup`" in deploy.stderr and "[1/6] pull" not in deploy.stderr, deploy.stderr
    assert not marker.exists()
    project.run(*bare.setup_args("--schedule", "none"), env=env, check=True)
    deploy = project.run(project.name, "v2", env=env, check=True)
    assert marker.exists() and "did not write" not in deploy.stderr
    assert project.get("/version") == (200, "v2")
    assert "    keepalive 16;\n" in upstream.read_text()  # kept across deploys
    code, word, checks = verdict(project, env)
    assert (code, word) == (0, "ok") and all(checks.values()), checks
