"""`bluegreen doctor`: the pure judgements, then each fault seeded on the real stack and found, with its fix
and the right exit code (non-zero only for what would make a deploy fail)."""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
from pathlib import Path

import pytest

from bluegreen import doctor
from bluegreen.config import ProjectConfig
from bluegreen.nginx import Upstream

CFG = ProjectConfig(project="api", source="api.env", image="ghcr.io/acme/api")
UP, ACTIVE = Path("/r/api-upstream.conf"), Path("/r/api.active")


# -- pure ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("upstream, active, status, words", [
    (Upstream("api", 0, "t"), None, doctor.OK, "not deployed yet"),
    (Upstream("api", 8082, "t"), "green", doctor.OK, "agrees"),
    (Upstream("api", 8082, "t"), "blue", doctor.WARN, "echo green > /r/api.active"),
    (Upstream("api", 8081, "t"), None, doctor.WARN, "echo blue > /r/api.active"),
    (Upstream("api", 9999, "t"), "blue", doctor.WARN, "neither BLUE_PORT"),
    (None, None, doctor.WARN, "init api --image ghcr.io/acme/api"),
])
def test_upstream_against_active(upstream, active, status, words):
    check = doctor.judge_upstream("api", upstream, active, CFG, UP, ACTIVE)
    assert check.status == status and words in check.detail + check.fix


def test_ports_are_ok_when_free_or_ours():
    assert doctor.judge_port("api", "blue", 8081, False, []).status == doctor.OK
    assert doctor.judge_port("api", "green", 8082, True, ["api-green"]).status == doctor.OK
    taken = doctor.judge_port("api", "green", 8082, True, ["other-blue"])
    assert taken.status == doctor.FAIL and "container other-blue" in taken.detail and "GREEN_PORT" in taken.fix
    assert "another process" in doctor.judge_port("api", "blue", 8081, True, []).detail


@pytest.mark.parametrize("config, status", [
    (None, doctor.WARN),
    ({"auths": {}}, doctor.WARN),
    ({"auths": {"ghcr.io": {"auth": "x"}}}, doctor.OK),
    ({"auths": {"https://ghcr.io/v2/": {}}}, doctor.OK),
    ({"credHelpers": {"ghcr.io": "gh"}}, doctor.OK),
    ({"credsStore": "pass"}, doctor.OK),
])
def test_registry_credentials(config, status):
    check = doctor.judge_credentials("ghcr.io/acme/api", config, "/home/u/.docker/config.json")
    assert check.status == status
    if status == doctor.WARN:
        assert "docker login ghcr.io" in check.fix


def test_docker_hub_images_look_for_index_docker_io():
    assert doctor.judge_credentials("acme/api", {"auths": {"https://index.docker.io/v1/": {}}}, "c").status == doctor.OK


def test_disk_and_verdict():
    low = doctor.judge_disk("docker", "/var/lib/docker", 100 * 2**20, 2**30)
    assert low.status == doctor.FAIL and "docker image prune" in low.fix
    assert doctor.judge_disk("docker", "/", 5 * 2**30, 2**30).status == doctor.OK
    assert doctor.verdict([low]) == 1 and doctor.verdict([doctor.Check("x", doctor.WARN, "")]) == 0


def test_route_header_in_a_comment_does_not_count():
    dump = "# add_header X-Bluegreen-Upstream $bluegreen_route_api always;\nlocation / { proxy_pass http://api; }\n"
    assert doctor.server_block_state(dump, "api", "api") == (True, False)
    dump += "add_header X-Bluegreen-Upstream $bluegreen_route_api always;\n"
    assert doctor.server_block_state(dump, "api", "api") == (True, True)


# -- real: each seeded fault -------------------------------------------------------------------------------------

@pytest.fixture
def deployed(project, tmp_path):
    """A project serving v1 through the stack's nginx, and a docker config with a login for its registry."""
    os.chmod(project.write_env(), 0o600)  # the app's secrets: doctor warns about a 0644 env file
    project.run(project.name, "v1", check=True)
    project.serve()
    cfg = tmp_path / "docker"
    cfg.mkdir()
    (cfg / "config.json").write_text(json.dumps({"auths": {project.stack.registry.open_addr: {"auth": "eDp5"}}}))
    project.doctor_env = {"DOCKER_CONFIG": str(cfg)}
    return project


def doctor_run(project, *extra, env=None, check=None):
    """The doctor's output with runs of spaces (the checklist's columns) squeezed to one."""
    full = dict(project.doctor_env)
    full.update(env or {})
    proc = project.run("doctor", project.name, *extra, env=full, check=check)
    proc.stdout = re.sub(r" +", " ", proc.stdout)
    return proc


def test_a_healthy_deployed_project_is_ready(deployed):
    proc = doctor_run(deployed, check=0)
    assert "Ready to deploy" in proc.stdout and "FAIL" not in proc.stdout and "WARN" not in proc.stdout, proc.stdout
    assert f"nginx routes to blue (127.0.0.1:{deployed.blue_port})" in proc.stdout
    assert f"held by {deployed.name}-blue (ours)" in proc.stdout
    # The trust model (docs/security.md): a root-owned stack root, nothing planted, a 0600 env file.
    for line in ("deploy root", "nginx config", "program", "planted files", "env secrets", "hooks"):
        assert re.search(rf"^ ok {line} ", proc.stdout, re.MULTILINE), (line, proc.stdout)
    assert re.search(r"^ info root-equiv ", proc.stdout, re.MULTILINE), proc.stdout


def test_finds_each_seeded_fault(deployed, tmp_path):
    p = deployed
    # 1. active file disagrees with what nginx routes to: a warning, with the exact fix.
    active = Path(p.env_file).with_suffix(".active")
    active.write_text("green\n")
    out = doctor_run(p, check=0).stdout
    assert f"WARN upstream nginx routes to blue (127.0.0.1:{p.blue_port}) but {active.name} says green\n fix: nginx is what serves: echo blue > {active}\n" in out
    active.write_text("blue\n")

    # 2. the idle colour's port held by a foreign process: a deploy would fail.
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", p.green_port))
    squatter.listen(1)
    try:
        out = doctor_run(p, check=1).stdout
    finally:
        squatter.close()
    assert f"FAIL green port 127.0.0.1:{p.green_port} (GREEN_PORT) is taken by another process" in out
    assert "1 problem(s) would make a deploy fail" in out

    # 3. no registry login: the open registry needs none; the one with a login asks (HTTP 401).
    out = doctor_run(p, env={"DOCKER_CONFIG": str(tmp_path / "empty")}, check=0).stdout
    assert "ok registry login" in out and "no login needed" in out
    p.write_env(IMAGE=p.stack.auth_image_repo)
    os.chmod(p.env_file, 0o600)
    out = doctor_run(p, env={"DOCKER_CONFIG": str(tmp_path / "empty")}).stdout
    p.write_env()
    os.chmod(p.env_file, 0o600)
    assert "WARN registry login" in out and f"docker login {p.stack.registry.auth_addr}" in out

    # 4. a deploy holds the lock.
    lock = Path(p.env_file).with_suffix(".lock")
    fd = os.open(str(lock), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.pwrite(fd, json.dumps({"pid": 4242, "user": "ci", "host": "h", "tag": "v9", "since": "now"}).encode(), 0)
        out = doctor_run(p, check=1).stdout
    finally:
        os.close(fd)
    assert "FAIL lock a deploy is running now: pid 4242 (user ci on h, deploying tag v9" in out

    # 4b. deploys frozen with `lock`.
    p.run("lock", p.name, "-m", "DB migration", check=0)
    out = doctor_run(p, check=1).stdout
    p.run("unlock", p.name, check=0)
    assert f"FAIL lock deploys of {p.name} are frozen by" in out and "DB migration" in out and f"unlock {p.name}" in out

    # 5. nginx -t fails (a broken file somewhere in the configuration).
    broken = Path(p.stack.conf_d) / f"{p.name}-zz-broken.conf"
    broken.write_text("this_is_not_a_directive on;\n")
    try:
        out = doctor_run(p, check=1).stdout
    finally:
        broken.unlink()
    assert 'FAIL nginx -t nginx rejects its configuration: nginx: [emerg] unknown directive "this_is_not_a_directive"' in out

    # 6. docker unreachable.
    out = doctor_run(p, env={"BLUEGREEN_DOCKER": "docker -H unix:///nonexistent.sock"}, check=1).stdout
    assert "FAIL docker the docker daemon does not answer" in out and "systemctl enable --now docker" in out

    # 7. too little disk (the bound raised above what any disk has).
    out = doctor_run(p, "--min-free-mb", str(2**40), check=1).stdout
    assert "FAIL disk docker" in out and "FAIL disk LOG_DIR" not in out  # LOG_DIR is empty in the test env

    # 8. a broken env file: named file and key.
    p.write_env(HEALTH_TIMEOUT="soon")
    out = doctor_run(p, check=1).stdout
    assert f"FAIL env file {p.name}.env: HEALTH_TIMEOUT: must be a number of seconds" in out


def test_a_root_nginx_does_not_include_is_found(project, tmp_path):
    other = tmp_path / "root"
    (other / "projects").mkdir(parents=True)
    proc = project.run("doctor", env={"BLUEGREEN_ROOT": str(other)}, check=1)
    proc.stdout = re.sub(r" +", " ", proc.stdout)
    assert f"FAIL include nginx does not include {other}/nginx/conf.d" in proc.stdout
    assert "setup (adds `include" in proc.stdout
    assert "WARN projects" in proc.stdout
