"""Deciding-code tests of the instant rollback: the `bluegreen.config` fingerprint, the rule (instant.decide) and the
exact commands of both paths, with a recording runner standing in for docker and nginx.

The real-stack test (test_stack_instant_rollback.py) proves the same against real docker, nginx and a stopped registry.
"""

from __future__ import annotations

import io
import json
from dataclasses import replace

import pytest

from bluegreen import docker as dk
from bluegreen import instant, journal, status
from bluegreen.config import load_project, load_settings, parse_env, project_from_entries
from bluegreen.deploy import Deployer, Progress, plan_deploy, read_plan
from bluegreen.errors import DeployFailed
from bluegreen.health import Probe
from bluegreen.nginx import parse_upstream
from bluegreen.runner import RecordingRunner, Result

REPO = "reg.local/acme/api"
D1 = "sha256:" + "1" * 64  # registry digests of v1 and v2
D2 = "sha256:" + "2" * 64
I1 = "sha256:" + "a" * 64  # image IDs of v1 and v2
I2 = "sha256:" + "b" * 64
ENV_TEXT = "IMAGE=reg.local/acme/api\nHEALTH_TIMEOUT=5\nPULL=missing\nDB_PASSWORD=s3cret\n"


def make_cfg(text: str = ENV_TEXT):
    return project_from_entries("api", "api.env", parse_env(text, "api.env"))


SETTINGS = load_settings("/opt/deploy", {}, euid=0)


# -- the fingerprint ------------------------------------------------------------------------------------------------

def test_the_fingerprint_has_two_parts_and_never_the_secret():
    cfg = make_cfg()
    label = dk.config_fingerprint(cfg, colour="blue", tag="v1")
    assert dk.parse_config_fingerprint(label) is not None and label.startswith("1:")
    assert "s3cret" not in label and label == dk.config_fingerprint(cfg, colour="blue", tag="v1")  # deterministic
    argv_part, env_part = dk.parse_config_fingerprint(label)
    other_env = dk.parse_config_fingerprint(dk.config_fingerprint(make_cfg(ENV_TEXT.replace("s3cret", "s3cret2")),
                                                                  colour="blue", tag="v1"))
    assert other_env[0] == argv_part and other_env[1] != env_part  # a secret changed: only the env part
    other_args = dk.parse_config_fingerprint(dk.config_fingerprint(make_cfg(ENV_TEXT + "DOCKER_ARGS=--memory 1g\n"),
                                                                   colour="blue", tag="v1"))
    assert other_args[0] != argv_part and other_args[1] == env_part  # DOCKER_ARGS: only the argv part
    # A setting that docker never sees (HEALTH_TIMEOUT) does not change how the container is created.
    assert dk.config_fingerprint(make_cfg(ENV_TEXT.replace("HEALTH_TIMEOUT=5", "HEALTH_TIMEOUT=9")),
                                 colour="blue", tag="v1") == label
    for changed in ("BLUE_PORT=9001\n", "APP_PORT=9000\n", "LOG_DIR=/srv/logs\n", "SPRING_PROFILES=staging\n"):
        assert dk.config_fingerprint(make_cfg(ENV_TEXT + changed), colour="blue", tag="v1") != label, changed
    assert dk.config_fingerprint(cfg, colour="blue", tag="v2") != label
    assert dk.config_fingerprint(cfg, colour="green", tag="v1") != label


def test_the_fingerprint_of_another_project_with_the_same_environment_differs():
    other = project_from_entries("web", "web.env", parse_env(ENV_TEXT, "web.env"))
    label, theirs = dk.config_fingerprint(make_cfg(), colour="blue", tag="v1"), dk.config_fingerprint(other, colour="blue", tag="v1")
    assert dk.parse_config_fingerprint(label)[1] != dk.parse_config_fingerprint(theirs)[1]  # salted with the project


@pytest.mark.parametrize("value", [None, "", "1:abc:def", "2:" + "a" * 64 + ":" + "b" * 64, "1:" + "A" * 64 + ":" + "b" * 64,
                                   "1:" + "a" * 64 + ":" + "b" * 64 + "\n", 7, "1:" + "a" * 64 + ":" + "b" * 65])
def test_a_config_label_bluegreen_did_not_write_is_refused(value):
    assert dk.parse_config_fingerprint(value) is None


def test_every_docker_run_carries_the_fingerprint_label_and_no_secret():
    cfg = make_cfg()
    plan, _ = plan_deploy(SETTINGS, cfg, "v1", active=None, upstream=None, token_factory=lambda: "t" * 32)
    argv = plan.run_argv(dk.ENV_STDIN)
    label = dk.config_fingerprint(cfg, colour="blue", tag="v1")
    assert argv == [
        "docker", "run", "--detach", "--name", "api-blue", "--publish", "127.0.0.1:8081:8080",
        "--restart", "unless-stopped", "--label", "bluegreen.project=api", "--label", "bluegreen.color=blue",
        "--label", "bluegreen.tag=v1", "--label", f"bluegreen.config={label}", "--volume", "/app/logs:/app/logs",
        "--env-file", "/dev/stdin", "reg.local/acme/api:v1",
    ]
    assert not any("s3cret" in a for a in argv)
    # A rollback names the image by digest; the label is the same, so the container it replaces can still match.
    pinned, _ = plan_deploy(SETTINGS, cfg, "v1", active=None, upstream=None, digest=D1, token_factory=lambda: "t" * 32)
    assert pinned.run_argv(dk.ENV_STDIN)[-1] == f"{REPO}@{D1}" and f"bluegreen.config={label}" in pinned.run_argv(None)


def test_start_argv_is_exact():
    assert dk.start_argv(("docker",), "api-blue") == ["docker", "start", "api-blue"]
    assert dk.start_argv(("sudo", "docker"), "api-blue") == ["sudo", "docker", "start", "api-blue"]


def test_parse_inspect_reads_the_image_id_and_refuses_anything_else():
    item = {"Id": "c1", "Name": "/api-blue", "Image": I1, "State": {"Status": "exited"}, "Config": {"Image": "x"}}
    (c,) = dk.parse_inspect(json.dumps([item]))
    assert c.image_id == I1
    for bad in ("abc", 12, None, "sha256:" + "a" * 63, I1 + "\n"):
        (c,) = dk.parse_inspect(json.dumps([{**item, "Image": bad}]))
        assert c.image_id == ""


# -- the rule ---------------------------------------------------------------------------------------------------------

def container(cfg, *, colour="blue", tag="v1", status_="exited", image_id=I1, label=True, **labels) -> dk.Container:
    values = {dk.LABEL_PROJECT: cfg.project, dk.LABEL_COLOUR: colour, dk.LABEL_TAG: tag}
    if label is True:
        values[dk.LABEL_CONFIG] = dk.config_fingerprint(cfg, colour=colour, tag=tag)
    elif isinstance(label, str):
        values[dk.LABEL_CONFIG] = label
    values.update(labels)
    return dk.Container(name=f"{cfg.project}-{colour}", id="c1", status=status_, exit_code=0, image=f"{REPO}:{tag}",
                        labels={k: v for k, v in values.items() if v is not None}, image_id=image_id)


def rollback_plan(cfg, tag="v1", digest=D1, serving="green"):
    plan, _ = plan_deploy(SETTINGS, cfg, tag, active=serving, upstream=None, digest=digest, token_factory=lambda: "t" * 32)
    return plan


LOCAL_V1 = dk.LocalImage(I1, (f"{REPO}@{D1}",))


def test_the_retained_container_of_the_tag_is_instant():
    cfg = make_cfg()
    plan = rollback_plan(cfg)
    decision = instant.decide(plan, container(cfg), LOCAL_V1)
    assert decision == instant.Decision(True, "api-blue", "v1", state="exited", image_id=I1, digest=D1)
    assert decision.argv(("docker",)) == ["docker", "start", "api-blue"]
    assert decision.status_line() == "instant to v1 (api-blue retained, stopped)"
    assert decision.say().startswith("instant rollback: api-blue still holds v1 (image sha256:aaaaaaaaaaaa)")
    # A container created and never started (`docker run` failed to start it) is stopped too.
    assert instant.decide(plan, container(cfg, status_="created"), LOCAL_V1).instant


def test_without_a_recorded_digest_the_image_the_tag_names_here_is_compared():
    cfg = make_cfg()  # PULL=missing: the host's image of the tag is what a deploy would use
    plan = rollback_plan(cfg, digest="")
    assert plan.ref == f"{REPO}:v1"
    assert instant.decide(plan, container(cfg), dk.LocalImage(I1)).instant  # a loaded image: no RepoDigests at all
    moved = instant.decide(plan, container(cfg), dk.LocalImage(I2))
    assert moved.reason == f"api-blue was created from another image than {REPO}:v1, the image v1 deployed"


def env_without_pull_missing():
    return make_cfg(ENV_TEXT.replace("PULL=missing\n", ""))


@pytest.mark.parametrize("case, reason", [
    ("gone", "its container is gone"),
    ("foreign", "api-blue was not created by bluegreen as api's blue container (no such labels: deploy.sh's, or run by hand)"),
    ("other project", "api-blue was not created by bluegreen as api's blue container (no such labels: deploy.sh's, or run by hand)"),
    ("running", "api-blue is running, not a stopped, retained container"),
    ("restarting", "api-blue is restarting, not a stopped, retained container"),
    ("paused", "api-blue is paused, not a stopped, retained container"),
    ("other tag", "api-blue holds v3, not v1"),
    ("older bluegreen", "api-blue was created by an older bluegreen, without the bluegreen.config label that shows how it was created"),
    ("forged label", "api-blue's bluegreen.config label is not one bluegreen writes"),
    ("no image id", "docker does not say which image api-blue was created from"),
    ("no digest, PULL=always", "no registry digest was recorded for v1, and with PULL=always the registry says what v1 is now"),
    ("image gone", f"this host does not have {REPO}@{D1}, the image v1 deployed"),
    ("other image", f"api-blue was created from another image than {REPO}@{D1}, the image v1 deployed"),
    ("digest not its", f"api-blue was created from another image than {REPO}@{D1}, the image v1 deployed"),
    ("ports changed", "the docker run options (IMAGE, APP_PORT, BLUE_PORT, LOG_DIR, DOCKER_ARGS, or bluegreen's own) "
                      "changed since v1's container was created"),
    ("env changed", "the env file's app environment changed since v1's container was created"),
    ("IMAGE changed", "the docker run options (IMAGE, APP_PORT, BLUE_PORT, LOG_DIR, DOCKER_ARGS, or bluegreen's own) "
                      "changed since v1's container was created"),
])
def test_every_reason_not_to_start_the_retained_container(case, reason):
    cfg, then = make_cfg(), make_cfg()
    plan, local, found = rollback_plan(cfg), LOCAL_V1, container(then)
    if case == "gone":
        found = None
    elif case == "foreign":
        found = replace(found, labels={})
    elif case == "other project":
        found = container(then, **{dk.LABEL_PROJECT: "web"})
    elif case in ("running", "restarting", "paused"):
        found = container(then, status_=case)
    elif case == "other tag":
        found = container(then, tag="v3")
    elif case == "older bluegreen":
        found = container(then, label=None)
    elif case == "forged label":
        found = container(then, label="1:deadbeef")
    elif case == "no image id":
        found = container(then, image_id="")
    elif case == "no digest, PULL=always":
        cfg = env_without_pull_missing()
        plan, found = rollback_plan(cfg, digest=""), container(cfg)
    elif case == "image gone":
        local = None
    elif case == "other image":
        local = dk.LocalImage(I2, (f"{REPO}@{D1}",))
    elif case == "digest not its":
        local = dk.LocalImage(I1, (f"{REPO}@{D2}",))
    elif case == "ports changed":
        plan = rollback_plan(make_cfg(ENV_TEXT + "BLUE_PORT=9001\n"))
    elif case == "env changed":
        plan = rollback_plan(make_cfg(ENV_TEXT.replace("s3cret", "rotated")))
    elif case == "IMAGE changed":  # decided before any image lookup: the new repository is not asked about
        plan, local = rollback_plan(make_cfg(ENV_TEXT.replace(f"IMAGE={REPO}", f"IMAGE={REPO}2"))), None
    decision = instant.decide(plan, found, local)
    assert not decision.instant and decision.reason == reason
    assert decision.say() == f"not an instant rollback: {reason}: pulling and creating it again."
    assert decision.status_line() == f"v1 needs a pull ({reason})"
    assert "s3cret" not in decision.say() and "rotated" not in decision.say()


def test_look_asks_docker_only_about_the_image_and_only_when_the_container_qualifies():
    cfg = make_cfg()
    plan = rollback_plan(cfg)
    runner = RecordingRunner(responder=lambda argv: Result(argv, 0, f'"{I1}" ["{REPO}@{D1}"]\n', ""))
    docker = dk.Docker(runner, ("docker",))
    assert instant.look(docker, plan, container(cfg)).instant
    assert runner.calls == [("docker", "image", "inspect", "--format", "{{json .Id}} {{json .RepoDigests}}", f"{REPO}@{D1}")]
    runner.calls.clear()
    assert instant.look(docker, plan, None).reason == "its container is gone" and runner.calls == []
    failing = dk.Docker(RecordingRunner(responder=lambda argv: Result(argv, 1, "", "Cannot connect to the Docker daemon")),
                        ("docker",))
    decision = instant.look(failing, plan, container(cfg))
    assert not decision.instant and decision.reason == (f"docker could not say whether this host has {REPO}@{D1} "
                                                        f"(Cannot connect to the Docker daemon)")


# -- the two paths, command by command -------------------------------------------------------------------------------

class Host:
    """A tiny docker + nginx: containers by name with their labels and image, images by reference."""

    def __init__(self) -> None:
        self.containers: dict[str, dict] = {}
        self.images = {f"{REPO}:v1": (I1, [f"{REPO}@{D1}"]), f"{REPO}@{D1}": (I1, [f"{REPO}@{D1}"]),
                       f"{REPO}:v2": (I2, [f"{REPO}@{D2}"]), f"{REPO}@{D2}": (I2, [f"{REPO}@{D2}"])}
        self.fail: dict[str, str] = {}
        self.crash_on_start = False

    def __call__(self, argv):
        verb = argv[1] if argv[0] == "docker" else " ".join(argv[1:])
        if verb in self.fail:
            return Result(tuple(argv), 1, "", self.fail[verb])
        if argv[1:3] == ("container", "inspect"):
            found = [self.containers[n] for n in argv[3:] if n in self.containers]
            missing = [f"Error: No such container: {n}" for n in argv[3:] if n not in self.containers]
            return Result(tuple(argv), 1 if missing else 0, json.dumps(found), "\n".join(missing))
        if argv[1:3] == ("image", "inspect"):
            if argv[-1] not in self.images:
                return Result(tuple(argv), 1, "", f"Error: No such image: {argv[-1]}")
            image_id, digests = self.images[argv[-1]]
            return Result(tuple(argv), 0, f"{json.dumps(image_id)} {json.dumps(digests)}\n", "")
        if verb == "pull":
            return Result(tuple(argv), 0, f"Digest: {self.images[argv[-1]][1][0].rpartition('@')[2]}\n", "")
        if verb == "run":
            name = argv[argv.index("--name") + 1]
            labels = dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "--label")
            self.containers[name] = {"Id": name, "Name": "/" + name, "Image": self.images[argv[-1]][0],
                                     "State": {"Status": "running", "ExitCode": 0},
                                     "Config": {"Image": argv[-1], "Labels": labels}}
        if verb == "start":
            self.containers[argv[-1]]["State"]["Status"] = "exited" if self.crash_on_start else "running"
        if verb == "rm":
            self.containers.pop(argv[-1], None)
        if verb == "stop":
            self.containers[argv[-1]]["State"]["Status"] = "exited"
        return None


@pytest.fixture
def env(tmp_path):
    (tmp_path / "projects").mkdir()
    env_file = tmp_path / "projects" / "api.env"
    env_file.write_text(ENV_TEXT)
    settings = load_settings(str(tmp_path), {"BLUEGREEN_NGINX_PID_FILE": str(tmp_path / "none.pid")}, euid=0)
    host = Host()
    runner = RecordingRunner(responder=host)
    err = io.StringIO()
    now = [0.0]

    class Env:
        healthy = True

    state = Env()

    def probe(url, timeout, host="", headers=None):
        if headers:  # through "nginx": routed to what the upstream file says
            upstream = parse_upstream((tmp_path / "nginx" / "conf.d" / "api-upstream.conf").read_text())
            return Probe(200, "HTTP 200", {"X-Bluegreen-Upstream": f"127.0.0.1:{upstream.port}"})
        return Probe(200, "HTTP 200") if state.healthy else Probe(503, "HTTP 503")

    def sleep(s):
        now[0] += s

    def run(tag, *, rollback=False, digest=""):
        cfg = load_project(settings, "api")
        plan, _ = read_plan(settings, cfg, tag, digest=digest)
        deployer = Deployer(settings=settings, runner=runner, progress=Progress(err), probe=probe,
                            port_busy=lambda p: False, clock=lambda: now[0], sleep=sleep, instant_ok=rollback)
        state.deployer = deployer
        return deployer.run(plan)

    state.__dict__.update(settings=settings, host=host, runner=runner, err=err, run=run, env_file=env_file, root=tmp_path)
    run("v1")
    run("v2")
    runner.calls.clear()
    err.truncate(0)
    err.seek(0)
    return state


def commands(runner):
    """Every command but the read-only `docker container inspect` of both colours."""
    return [" ".join(c) for c in runner.calls if c[1:3] != ("container", "inspect")]


def test_an_instant_rollback_starts_the_retained_container_and_pulls_nothing(env):
    summary = env.run("v1", rollback=True, digest=D1)
    assert commands(env.runner) == [
        f"docker image inspect --format {{{{json .Id}}}} {{{{json .RepoDigests}}}} {REPO}@{D1}",  # local, never a registry
        "docker start api-blue",
        "nginx -T", "nginx -s reload",
        "docker stop --time 30 api-green",
    ]
    err = env.err.getvalue()
    assert "instant rollback: api-blue still holds v1" in err
    assert f"[1/6] pull    nothing to pull: api-blue keeps v1's image {I1[:19]} on this host (instant rollback)" in err
    assert "(instant rollback: started the retained api-blue (v1)):" in err
    assert summary.startswith("api v1 now serves from api-blue on 127.0.0.1:8081 (was v2 in api-green); instant rollback in")
    assert env.deployer.instant and env.deployer.digest == D1
    assert "pull" not in env.deployer.progress.durations  # no pull step at all: the journal's steps have none
    assert env.host.containers["api-blue"]["State"]["Status"] == "running"
    # Back again: v2's container was retained by this rollback's retire step, so that is instant too.
    env.runner.calls.clear()
    env.run("v2", rollback=True, digest=D2)
    assert "docker start api-green" in commands(env.runner) and not any("pull" in c or " run " in c for c in commands(env.runner))


def test_pull_always_does_not_force_a_pull_on_the_instant_path(env):
    env.env_file.write_text(ENV_TEXT.replace("PULL=missing\n", ""))  # PULL=always (the default): same argv, same env
    env.run("v1", rollback=True, digest=D1)
    assert "docker start api-blue" in commands(env.runner)
    assert not any(c.startswith("docker pull") or " run " in c for c in commands(env.runner))


def test_a_deploy_of_an_old_tag_never_takes_the_instant_path(env):
    env.run("v1", digest=D1)
    got = commands(env.runner)
    assert got[:4] == [f"docker image inspect --format {{{{json .Id}}}} {{{{json .RepoDigests}}}} {REPO}@{D1}",  # PULL=missing
                       "docker rm --force api-blue", got[2], "nginx -T"]
    assert got[2].startswith("docker run --detach --name api-blue")
    assert "instant" not in env.err.getvalue()


def test_a_changed_env_file_takes_the_pull_path_and_says_why(env):
    env.env_file.write_text(ENV_TEXT.replace("s3cret", "rotated"))
    summary = env.run("v1", rollback=True, digest=D1)
    got = commands(env.runner)
    # Decided from the container's label alone (no image lookup for it); then PULL=missing's lookup, rm, run.
    assert got[:3] == [f"docker image inspect --format {{{{json .Id}}}} {{{{json .RepoDigests}}}} {REPO}@{D1}",
                       "docker rm --force api-blue", got[2]]
    assert got[2].startswith("docker run --detach --name api-blue")
    assert ("not an instant rollback: the env file's app environment changed since v1's container was created: pulling "
            "and creating it again.") in env.err.getvalue()
    assert "deployed in" in summary and not env.deployer.instant
    assert "rotated" not in env.err.getvalue() + summary and not any("rotated" in a for c in env.runner.calls for a in c)
    # The new container carries the fingerprint of the new environment: the next rollback to it is instant again.
    labels = env.host.containers["api-blue"]["Config"]["Labels"]
    assert labels[dk.LABEL_CONFIG] == dk.config_fingerprint(load_project(env.settings, "api"), colour="blue", tag="v1")


def test_a_removed_retained_container_takes_the_pull_path(env):
    del env.host.containers["api-blue"]
    env.env_file.write_text(ENV_TEXT.replace("PULL=missing\n", ""))
    env.run("v1", rollback=True, digest=D1)
    assert commands(env.runner)[:2] == [f"docker pull {REPO}@{D1}", commands(env.runner)[1]]
    assert "not an instant rollback: its container is gone: pulling and creating it again." in env.err.getvalue()


def test_a_failed_health_check_stops_the_retained_container_again_and_keeps_it(env):
    env.healthy = False
    with pytest.raises(DeployFailed) as exc:
        env.run("v1", rollback=True, digest=D1)
    assert commands(env.runner) == [
        f"docker image inspect --format {{{{json .Id}}}} {{{{json .RepoDigests}}}} {REPO}@{D1}",
        "docker start api-blue", "docker logs --tail 20 api-blue", "docker stop --time 3 api-blue",
    ]
    assert env.host.containers["api-blue"]["State"]["Status"] == "exited"  # kept: still the retained copy of v1
    assert "It was stopped again (kept, as the retained copy)." in exc.value.message
    assert "undo: stop api-blue again (kept, as the retained copy)" in env.err.getvalue()
    assert env.host.containers["api-green"]["State"]["Status"] == "running"


def test_a_retained_container_that_crashes_says_how_to_start_afresh(env):
    env.host.crash_on_start = True
    env.healthy = False  # it never answers: it exited
    with pytest.raises(DeployFailed) as exc:
        env.run("v1", rollback=True, digest=D1)
    assert "exited while starting" in exc.value.message
    assert f"`docker rm api-blue` and roll back again: that pulls {REPO}@{D1} and creates it afresh" in exc.value.message


def test_a_failed_docker_start_is_a_failed_rollback_with_the_way_out(env):
    env.host.fail["start"] = "Error response from daemon: driver failed programming external connectivity"
    with pytest.raises(DeployFailed) as exc:
        env.run("v1", rollback=True, digest=D1)
    assert "Could not start the retained api-blue (v1) for an instant rollback" in exc.value.message
    assert "`docker rm api-blue` and roll back again" in exc.value.message
    assert commands(env.runner)[-1] == "docker stop --time 3 api-blue"  # the undo, harmless on a stopped container


def test_a_route_elsewhere_after_the_switch_routes_back_and_stops_it_again(env):
    def wrong_route(url, timeout, host="", headers=None):  # nginx keeps routing to green whatever the upstream says
        return Probe(200, "HTTP 200", {"X-Bluegreen-Upstream": "127.0.0.1:8082"} if headers else {})

    cfg = load_project(env.settings, "api")
    plan, _ = read_plan(env.settings, cfg, "v1", digest=D1)
    now = [0.0]
    deployer = Deployer(settings=env.settings, runner=env.runner, progress=Progress(env.err), probe=wrong_route,
                        port_busy=lambda p: False, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s),
                        instant_ok=True)
    with pytest.raises(DeployFailed) as exc:
        deployer.run(plan)
    assert "the new container stopped again (kept, as the retained copy)" in exc.value.message
    assert commands(env.runner)[-1] == "docker stop --time 3 api-blue" and "api-blue" in env.host.containers


# -- status: the same rule ----------------------------------------------------------------------------------------------

def test_status_says_whether_the_rollback_is_instant_by_the_same_rule(env):
    entries = [journal.Entry(time="t", host="h", user="u", project="api", action="deploy", tag=tag, digest=digest,
                             result=journal.RESULT_DEPLOYED, exit_code=0) for tag, digest in (("v1", D1), ("v2", D2))]
    docker = dk.Docker(env.runner, ("docker",))
    cfg = load_project(env.settings, "api")
    containers = docker.inspect_many(["api-blue", "api-green"])

    def path():
        return status.rollback_path(env.settings, cfg, entries, "v2", active="green", upstream=None, observed=None,
                                    containers=docker.inspect_many(["api-blue", "api-green"]), docker=docker)

    decision = path()
    assert decision.to_dict() == {"tag": "v1", "instant": True, "container": "api-blue", "state": "exited", "reason": None}
    assert status.rollback_line(decision.to_dict()) == "instant to v1 (api-blue retained, stopped)"
    del env.host.containers["api-blue"]
    assert status.rollback_line(path().to_dict()) == "v1 needs a pull (its container is gone)"
    assert status.rollback_line(None) == "nothing to roll back to (the journal has no other successful deploy)"
    assert containers  # (inspected before the removal)
    assert status.rollback_path(env.settings, cfg, entries[:1], "v1", active="blue", upstream=None, observed=None,
                                containers={}, docker=docker) is None


def test_the_journal_keeps_the_instant_flag_and_refuses_another_type():
    entry = journal.Entry(time="t", host="h", user="u", project="api", action="rollback", tag="v1", instant=True)
    assert journal.parse_line(entry.to_json()) == entry
    assert json.loads(entry.to_json())["instant"] is True
    assert journal.parse_line(entry.to_json().replace('"instant":true', '"instant":"yes"')) is None
    older = json.loads(entry.to_json())
    del older["instant"]
    assert journal.parse_line(json.dumps(older)).instant is False  # a line an older bluegreen wrote


# -- a fleet rollback's pull phase: `pull PROJECT TAG --rollback` ------------------------------------------------------

def pull_for_rollback(env, tag="v1"):
    from bluegreen import attempt

    for entry_tag, digest in (("v1", D1), ("v2", D2)):
        journal.append(env.settings.journal_file("api"), journal.Entry(
            time="t", host="h", user="u", project="api", action="deploy", tag=entry_tag, digest=digest,
            result=journal.RESULT_DEPLOYED, exit_code=0))
    out, err = io.StringIO(), io.StringIO()
    code = attempt.pull_project(settings=env.settings, project="api", tag=tag, stdout=out, stderr=err, environ={},
                                runner=env.runner, rollback=True)
    return code, out.getvalue(), err.getvalue()


def test_pull_for_an_instant_rollback_fetches_nothing(env):
    env.env_file.write_text(ENV_TEXT.replace("PULL=missing\n", ""))  # PULL=always
    code, out, err = pull_for_rollback(env)
    assert code == 0 and commands(env.runner) == [
        f"docker image inspect --format {{{{json .Id}}}} {{{{json .RepoDigests}}}} {REPO}@{D1}"]
    assert out == (f"{REPO}@{D1} needs no pull: the rollback to v1 is instant (api-blue is retained with that image); "
                   f"nothing that serves was changed.\n")
    assert "instant rollback: api-blue still holds v1" in err


def test_pull_for_a_rollback_that_is_not_instant_pulls_and_says_why(env):
    env.env_file.write_text(ENV_TEXT.replace("PULL=missing\n", "").replace("s3cret", "rotated"))
    code, out, err = pull_for_rollback(env)
    assert code == 0 and commands(env.runner)[-1] == f"docker pull {REPO}@{D1}"
    assert "not an instant rollback: the env file's app environment changed since v1's container was created" in err
    assert out.startswith(f"{REPO}@{D1} is on this host (registry digest {D1})")
