"""Real-stack tests of the instant rollback (issue #14): a rollback to the tag the idle colour's retained, stopped
container holds starts that container (`docker start`) instead of pulling and creating it, and says so; a rollback
whose container is gone, or whose env file changed since it was created, takes the pull path and says why; `status`
shows which it would be. The instant path makes no registry call at all: it succeeds with the registry stopped.

The pure rule and the exact commands of both paths: test_instant_logic.py.
"""

from __future__ import annotations

import json
import os
import stat
from contextlib import contextmanager

import pytest

import stack as stacklib
from test_stack_deploy import deploy_ok, inspect, serving


@contextmanager
def registry_stopped(stack):
    """The session's registries stopped (an outage: `connection refused`), started again on the same ports at the
    end whatever happens, so that the tests after this one find them as before."""
    registry = stack.registry
    registry.stop()
    try:
        status, _ = stacklib.http_get("http://%s/v2/" % registry.open_addr, timeout=2)
        assert status == 0, "the registry still answers after stop(): HTTP %s" % status
        yield registry
    finally:
        registry.restart()


@pytest.fixture
def docker_log(tmp_path):
    """BLUEGREEN_DOCKER through a shim that logs every docker command bluegreen runs (argv only: the app's
    environment goes to docker on stdin, which the shim passes through untouched)."""
    log = tmp_path / "docker-calls.log"
    shim = tmp_path / "docker-shim"
    shim.write_text('#!/bin/sh\nprintf "%%s\\n" "$*" >> %s\nexec docker "$@"\n' % log)
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return {"BLUEGREEN_DOCKER": str(shim)}, log


def history(project) -> list:
    return [json.loads(line) for line in project.run("history", project.name, "--json", check=True).stdout.splitlines()]


def status_json(project) -> dict:
    (item,) = json.loads(project.run("status", project.name, "--json", check=True).stdout)
    return item


def rollback_line(project) -> str:
    text = project.run("status", project.name, check=True).stdout
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("rollback ")]
    assert len(lines) == 1, text
    return lines[0].split(None, 1)[1]


def v1_then_v2(project, **env) -> None:
    project.write_env(STOP_TIMEOUT="5", **env)
    deploy_ok(project, "v1")
    project.serve()
    deploy_ok(project, "v2")
    assert serving(project) == "v2"


def test_instant_rollback_starts_the_retained_container_with_the_registry_stopped(project, docker_log):
    v1_then_v2(project)
    blue, green = f"{project.name}-blue", f"{project.name}-green"
    assert rollback_line(project) == f"instant to v1 ({blue} retained, stopped)"
    assert status_json(project)["rollback"] == {"tag": "v1", "instant": True, "container": blue, "state": "exited",
                                                "reason": None}
    labels = inspect(blue)["Config"]["Labels"]
    assert labels["bluegreen.config"].startswith("1:") and labels["bluegreen.tag"] == "v1"
    blue_id = inspect(blue)["Id"]
    v1_digest = history(project)[-1]["digest"]
    shim_env, log = docker_log

    with registry_stopped(project.stack):
        # The outage is real for docker too: the pull path cannot work now.
        assert project.run("pull", project.name, "v3", check=1)
        # A fleet rollback's pull phase (`pull --rollback` on every host) fetches nothing for an instant rollback.
        pre = project.run("pull", project.name, "v1", "--rollback", check=True)
        assert "needs no pull: the rollback to v1 is instant" in pre.stdout
        back = project.run("rollback", project.name, env=shim_env, check=True)
    assert serving(project) == "v1"
    assert f"instant rollback: {blue} still holds v1" in back.stderr
    assert f"(instant rollback: started the retained {blue} (v1))" in back.stderr
    assert "[1/6] pull    nothing to pull" in back.stderr and "instant rollback in" in back.stdout
    calls = log.read_text().splitlines()
    assert f"start {blue}" in calls
    assert not any(c.startswith(("pull", "run", "rm", "image pull", "login")) for c in calls), calls
    # The only image question was local: docker image inspect of the digest the journal recorded for v1.
    assert [c for c in calls if c.startswith("image")] == [
        f"image inspect --format {{{{json .Id}}}} {{{{json .RepoDigests}}}} {project.stack.image_repo}@{v1_digest}"]
    assert inspect(blue)["Id"] == blue_id and inspect(blue)["State"]["Status"] == "running"  # the same container
    assert inspect(green)["State"]["Status"] == "exited"  # retired as usual: kept, stopped

    last = history(project)[0]
    assert (last["action"], last["tag"], last["result"], last["instant"]) == ("rollback", "v1", "deployed", True)
    assert "pull" not in last["steps"] and {"start", "health", "switch", "drain", "verify", "retire", "record"} <= set(last["steps"])
    assert last["digest"] == v1_digest and last["image"] == f"{project.stack.image_repo}@{v1_digest}"
    newest = project.run("history", project.name, check=True).stdout.splitlines()[0]
    assert " rollback " in newest and newest.endswith("instant (the retained container started, nothing pulled)")
    # v2's container was retained by this rollback: going back to v2 is instant too.
    assert rollback_line(project) == f"instant to v2 ({green} retained, stopped)"


def test_a_rollback_whose_container_is_gone_takes_the_pull_path(project):
    v1_then_v2(project)
    blue = f"{project.name}-blue"
    stacklib.docker("rm", blue)
    assert rollback_line(project) == "v1 needs a pull (its container is gone)"
    back = project.run("rollback", project.name, check=True)
    assert "not an instant rollback: its container is gone: pulling and creating it again." in back.stderr
    assert "[1/6] pull    " in back.stderr and "nothing to pull" not in back.stderr and "deployed in" in back.stdout
    assert serving(project) == "v1"
    last = history(project)[0]
    assert last["action"] == "rollback" and last["instant"] is False and "pull" in last["steps"]
    assert "instant" not in project.run("history", project.name, check=True).stdout.splitlines()[0]
    assert inspect(blue)["Config"]["Labels"]["bluegreen.config"].startswith("1:")  # created again, with the label


def test_a_changed_env_file_takes_the_pull_path_and_says_why(project):
    secret = "s3cret-" + os.urandom(4).hex()
    v1_then_v2(project, API_KEY=secret)
    blue = f"{project.name}-blue"
    assert secret not in json.dumps(inspect(blue)["Config"]["Labels"])  # the fingerprint never holds a value
    rotated = "rotated-" + os.urandom(4).hex()
    project.write_env(STOP_TIMEOUT="5", API_KEY=rotated)
    reason = "the env file's app environment changed since v1's container was created"
    assert rollback_line(project) == f"v1 needs a pull ({reason})"
    back = project.run("rollback", project.name, check=True)
    assert f"not an instant rollback: {reason}: pulling and creating it again." in back.stderr
    assert "deployed in" in back.stdout and serving(project) == "v1"
    assert history(project)[0]["instant"] is False
    assert secret not in back.stderr + back.stdout and rotated not in back.stderr + back.stdout
    # The container was created again with the new environment: a rollback to it would be instant once more.
    assert secret not in json.dumps(inspect(blue)["Config"]["Labels"]) and rotated not in json.dumps(inspect(blue)["Config"]["Labels"])


def test_a_dry_run_rollback_says_which_path_and_changes_nothing(project):
    v1_then_v2(project)
    blue = f"{project.name}-blue"
    dry = project.run("rollback", project.name, "--dry-run", check=True)
    assert f"[2/6] start   docker start {blue}" in dry.stdout and "docker pull" not in dry.stdout
    assert f"instant rollback: {blue} still holds v1" in dry.stderr
    assert inspect(blue)["State"]["Status"] == "exited" and serving(project) == "v2"
