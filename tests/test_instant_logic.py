"""Deciding-code tests of the instant rollback: the `bluegreen.config` fingerprint, the rule (instant.decide) and the
exact commands of both paths, with a recording runner standing in for docker and nginx.

The real-stack test (test_stack_instant_rollback.py) proves the same against real docker, nginx and a stopped registry.
"""

from __future__ import annotations

import json

import pytest

from bluegreen import docker as dk
from bluegreen.config import load_settings, parse_env, project_from_entries
from bluegreen.deploy import plan_deploy

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
