"""Real-stack tests of issue 10's "truth about the service": status and doctor check the path a client takes
(nginx running and answering, routed to the serving container, which runs and is healthy) and exit so;
a deploy that could not switch fails before the pull with the real cause; rollback announces its plan only
once the checks let it go ahead; doctor asks for a registry login only where the registry asks for one."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

import stack as stacklib
from test_stack_deploy import deploy_ok


@pytest.fixture
def nginx_stopped(stack):
    """Stops the session's nginx for the test and starts it again afterwards, whatever happens."""
    ngx = stack.nginx
    ngx.stop()
    assert ngx.master_pid() is None
    try:
        yield ngx
    finally:
        if ngx.master_pid() is None:
            ngx.start()


@pytest.fixture
def served(project):
    """A project serving v1 through the session's nginx, with the route header line."""
    project.write_env()
    deploy_ok(project, "v1")
    project.serve()
    return project


def status(project, *args):
    proc = project.run("status", *args)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def journal(project) -> list:
    path = Path(project.stack.projects_dir, project.name + ".journal")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_status_exits_0_only_when_nginx_routes_to_a_running_healthy_container(served):
    proc = status(served, served.name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "verdict     OK" in proc.stdout
    (item,) = json.loads(status(served, served.name, "--json").stdout)
    assert item["verdict"] == "ok" and item["nginx_answer"] == "HTTP 200"
    assert {c["name"]: c["ok"] for c in item["checks"]} == {"nginx": True, "through nginx": True, "route": True,
                                                             "container": True, "health": True}
    line = [ln for ln in status(served).stdout.splitlines() if ln.startswith(served.name)]
    assert line and line[0].endswith("ok")


def test_status_with_the_serving_container_stopped_exits_1_and_says_down(served):
    stacklib.docker("stop", "-t", "1", f"{served.name}-blue")
    proc = status(served, served.name)
    assert proc.returncode == 1, proc.stdout
    assert "verdict     DOWN" in proc.stdout and f"{served.name}-blue is exited" in proc.stdout
    assert f"fix: docker start {served.name}-blue" in proc.stdout
    (item,) = json.loads(status(served, served.name, "--json").stdout)
    assert item["verdict"] == "down" and item["nginx_answer"] == "HTTP 502"
    overview = status(served)
    assert overview.returncode == 1
    line = [ln for ln in overview.stdout.splitlines() if ln.startswith(served.name)][0]
    assert "DOWN:" in line and not line.endswith("ok"), line
    # The same facts in doctor: a service that is down is no "Ready to deploy".
    doctor = served.run("doctor", served.name)
    assert doctor.returncode == 1, doctor.stdout
    assert "Ready to deploy" not in doctor.stdout
    assert re.search(r"FAIL\s+serving\s+the service is down", doctor.stdout), doctor.stdout
    assert f"docker start {served.name}-blue" in doctor.stdout


def test_status_with_nginx_stopped_exits_1_and_never_says_ok(served, nginx_stopped):
    proc = status(served, served.name)
    assert proc.returncode == 1, proc.stdout
    assert "verdict     DOWN: nginx is not running" in proc.stdout, proc.stdout
    assert "systemctl start nginx" in proc.stdout
    (item,) = json.loads(status(served, served.name, "--json").stdout)
    assert item["verdict"] == "down"
    assert [c["name"] for c in item["checks"] if not c["ok"]] == ["nginx", "through nginx"]
    overview = status(served)
    line = [ln for ln in overview.stdout.splitlines() if ln.startswith(served.name)][0]
    assert overview.returncode == 1 and "DOWN: nginx is not running" in line and not line.endswith("ok"), line


def test_a_deploy_while_nginx_is_down_fails_before_the_pull(served, nginx_stopped):
    # A pre-deploy hook (a database migration, say) must not run for a deploy that cannot switch.
    hooks = Path(served.stack.root) / "hooks" / served.name
    hooks.mkdir(parents=True, exist_ok=True)
    marker = hooks / "pre-deploy-ran"
    hook = hooks / "pre-deploy"
    hook.write_text(f"#!/bin/sh\ntouch {marker}\n")
    hook.chmod(0o700)
    started = time.monotonic()
    proc = served.run(served.name, "v2")
    took = time.monotonic() - started
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "nginx is not running" in proc.stderr and "systemctl start nginx" in proc.stderr, proc.stderr
    assert "[1/6] pull" not in proc.stderr and "Traceback" not in proc.stderr
    assert "still serves" not in proc.stderr
    entry = journal(served)[-1]
    assert entry["result"] == "failed" and entry["steps"] == {} and entry["tag"] == "v2"
    assert entry["duration"] < 1.0, entry
    assert took < 10, took  # the interpreter's start included; the deploy itself is the journal's duration
    assert served.containers() == [f"{served.name}-blue"]
    assert "hook pre-deploy" not in proc.stderr and not marker.exists()


def test_a_deploy_without_the_upstream_include_points_at_setup(project, tmp_path):
    """A private nginx (the session's one includes ROOT/nginx/conf.d) whose nginx.conf lacks the include."""
    ngx = stacklib.Nginx(str(tmp_path / "nginx"), includes=[])
    ngx.start()
    try:
        project.write_env()
        env = {"BLUEGREEN_NGINX": " ".join(ngx.cmd)}
        proc = project.run(project.name, "v1", env=env)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "does not load bluegreen's upstream directory" in proc.stderr
        assert f"include {project.stack.conf_d}/*.conf;" in proc.stderr and " setup`" in proc.stderr, proc.stderr
        assert "[1/6] pull" not in proc.stderr and project.containers() == []
        # A server block that proxies to the project's upstream: nginx -t now fails with "host not found in
        # upstream", and the message still points at setup, not only at "the nginx error above".
        Path(ngx.site_path(project.name)).write_text(
            "server { listen 127.0.0.1:%d; location / { proxy_pass http://%s; } }\n" % (project.nginx_port, project.name))
        proc = project.run(project.name, "v1", env=env)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "host not found in upstream" in proc.stderr and " setup`" in proc.stderr, proc.stderr
        assert "[1/6] pull" not in proc.stderr and project.containers() == []
    finally:
        ngx.stop()


def test_a_failed_deploy_says_what_it_saw_answer_through_nginx(served):
    served.write_env(HEALTH_TIMEOUT="1")
    proc = served.run(served.name, "unhealthy")
    assert proc.returncode == 1, proc.stderr
    assert (f"The previous version (v1, container {served.name}-blue, 127.0.0.1:{served.blue_port}) still serves: just "
            f"before this deploy, a probe through nginx was routed to it and answered HTTP 200.") in proc.stderr


def test_a_failed_deploy_without_the_route_header_does_not_claim_it_serves(project):
    project.write_env(HEALTH_TIMEOUT="1")
    deploy_ok(project, "v1")
    project.serve(probe=False)
    proc = project.run(project.name, "unhealthy")
    assert proc.returncode == 1, proc.stderr
    assert "still serves" not in proc.stderr
    assert (f"(v1, container {project.name}-blue, 127.0.0.1:{project.blue_port}) was running and was left as it was; "
            f"bluegreen did not see it answer through nginx") in proc.stderr


def test_rollback_of_a_frozen_project_refuses_before_announcing_a_plan(served):
    deploy_ok(served, "v2")
    served.run("lock", served.name, "-m", "release freeze", check=True)
    proc = served.run("rollback", served.name)
    assert proc.returncode == 3, proc.stderr
    assert "release freeze" in proc.stderr and "Rolling back" not in proc.stderr, proc.stderr
    served.run("unlock", served.name, check=True)
    proc = served.run("rollback", served.name, check=True)
    assert f"Rolling back {served.name} from v2 to v1" in proc.stderr


@pytest.mark.parametrize("which, warned", [("open", False), ("auth", True)])
def test_doctor_asks_for_a_registry_login_only_where_the_registry_asks(project, tmp_path, which, warned):
    reg = project.stack.registry
    repo = project.stack.image_repo if which == "open" else project.stack.auth_image_repo
    project.write_env(IMAGE=repo)
    config = tmp_path / "docker"
    config.mkdir()
    (config / "config.json").write_text("{}")
    proc = project.run("doctor", project.name, env={"DOCKER_CONFIG": str(config)})
    line = [ln for ln in proc.stdout.splitlines() if "registry login" in ln]
    assert line, proc.stdout
    if warned:
        assert line[0].split()[0] == "WARN" and "asks for credentials" in line[0] and "401" in line[0], line
        assert f"docker login {reg.auth_addr}" in proc.stdout
    else:
        assert line[0].split()[0] == "ok" and "no login needed" in line[0], line


def test_doctor_names_the_pull_policy_and_a_shared_log_dir(project, stack, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    other = Path(stack.projects_dir, project.name + "-other.env")
    try:
        project.write_env(PULL="never", IMAGE=stack.image_repo + "-never-loaded", LOG_DIR=str(logs))
        other.write_text(f"IMAGE={stack.image_repo}\nLOG_DIR={logs}\nBLUE_PORT=1081\nGREEN_PORT=1082\n")
        proc = project.run("doctor", project.name)
        out = re.sub(r" +", " ", proc.stdout)
        assert proc.returncode == 1, out
        assert "FAIL pull policy PULL=never, but this host has no image of" in out, out
        assert "ok registry login PULL=never" in out
        assert f"WARN shared LOG_DIR {logs} is also the LOG_DIR of {project.name}-other" in out, out
        assert f"LOG_DIR={logs}/{project.name} in {project.env_file}" in out
    finally:
        other.unlink(missing_ok=True)
