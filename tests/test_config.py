"""Pure tests: env file parsing, project validation, settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from bluegreen.config import (
    load_project,
    load_settings,
    parse_env,
    project_from_entries,
    validate_project,
    validate_tag,
)
from bluegreen.errors import ConfigError, UsageError


def cfg_from(text: str, project: str = "user-api"):
    return project_from_entries(project, f"{project}.env", parse_env(text, f"{project}.env"))


def test_parse_env_comments_quotes_export_and_inline_comments():
    entries = parse_env(
        "# comment\n\nexport IMAGE=ghcr.io/acme/user-api\nA='single # kept'\nB=\"double\"  # note\n"
        "C=plain value # trailing comment\nD=pa#ss\nE=\n",
        "x.env",
    )
    assert [(e.key, e.value, e.line) for e in entries] == [
        ("IMAGE", "ghcr.io/acme/user-api", 3),
        ("A", "single # kept", 4),
        ("B", "double", 5),
        ("C", "plain value", 6),
        ("D", "pa#ss", 7),
        ("E", "", 8),
    ]


@pytest.mark.parametrize(
    "text, message",
    [
        ("IMAGE\n", "x.env:1: expected KEY=VALUE"),
        ("1BAD=x\n", "x.env:1: '1BAD' is not a valid variable name"),
        ("A='open\n", "x.env:1: A: the value opens a ' quote that never closes"),
        ("A='a' b\n", "x.env:1: A: unexpected text after the closing quote"),
    ],
)
def test_parse_env_errors_name_file_line_and_key(text, message):
    with pytest.raises(ConfigError) as exc:
        parse_env(text, "x.env")
    assert message in exc.value.message


def test_malformed_line_does_not_echo_a_whole_secret():
    with pytest.raises(ConfigError) as exc:
        parse_env("DB_PASSWORD hunter2-very-long-secret\n", "x.env")
    assert "very-long-secret" not in exc.value.message


def test_defaults_match_the_seed():
    cfg = cfg_from("IMAGE=ghcr.io/acme/user-api\n")
    assert (cfg.blue_port, cfg.green_port, cfg.app_port) == (8081, 8082, 8080)
    assert cfg.health_path == "/api/health" and cfg.health_timeout == 120 and cfg.stop_timeout == 30
    assert cfg.log_dir == "/app/logs" and cfg.docker_args == () and cfg.app_env == ()
    assert cfg.health_interval < 1


def test_reserved_keys_are_read_and_others_are_app_env():
    assert cfg_from("IMAGE=a/b\nDOCKER_ARGS=--network bridge --memory 1g --health-cmd true\n").docker_args[:2] == ("--network", "bridge")
    cfg = cfg_from(
        "IMAGE=127.0.0.1:5000/bg/app\nSPRING_PROFILES=prod\nHEALTH_TIMEOUT=7.5\nBLUE_PORT=9001\nGREEN_PORT=9002\n"
        "DOCKER_ARGS=--memory 1g --cpus 1.5\nDB_PASSWORD=s3cret\nSPRING_PROFILES_ACTIVE=ignored-name-check\n"
    )
    assert cfg.image == "127.0.0.1:5000/bg/app"
    assert cfg.health_timeout == 7.5 and (cfg.blue_port, cfg.green_port) == (9001, 9002)
    assert cfg.docker_args == ("--memory", "1g", "--cpus", "1.5")
    assert dict(cfg.app_env) == {"DB_PASSWORD": "s3cret", "SPRING_PROFILES_ACTIVE": "ignored-name-check"}
    assert cfg.container_env()[0] == ("SPRING_PROFILES_ACTIVE", "prod")
    assert cfg.warnings == ()


def test_misspelt_reserved_key_warns_with_the_likely_intent():
    cfg = cfg_from("IMAGE=acme/app\nHELTH_TIMEOUT=300\nDATABASE_URL=x\n")
    assert len(cfg.warnings) == 1
    assert "HELTH_TIMEOUT" in cfg.warnings[0] and "did you mean HEALTH_TIMEOUT?" in cfg.warnings[0]
    assert "user-api.env:2" in cfg.warnings[0]


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "user-api.env: IMAGE: required"),
        ("IMAGE=acme/app:v1\n", "IMAGE: give the repository without a tag"),
        ("IMAGE=acme/app@sha256:" + "a" * 64 + "\n", "IMAGE: give the repository without a tag"),
        ("IMAGE=Acme App\n", "is not a valid image repository name"),
        ("IMAGE=acme/app\nHEALTH_TIMEOUT=soon\n", "user-api.env: HEALTH_TIMEOUT: must be a number of seconds"),
        ("IMAGE=acme/app\nHEALTH_TIMEOUT=-1\n", "HEALTH_TIMEOUT: must be a positive number"),
        ("IMAGE=acme/app\nHEALTH_TIMEOUT=nan\n", "HEALTH_TIMEOUT: must be a positive number"),
        ("IMAGE=acme/app\nBLUE_PORT=99999\n", "BLUE_PORT: must be a port number"),
        ("IMAGE=acme/app\nBLUE_PORT=8082\n", "BLUE_PORT and GREEN_PORT must differ"),
        ("IMAGE=acme/app\nHEALTH_PATH=api/health\n", "HEALTH_PATH: must start with '/'"),
        ("IMAGE=acme/app\nSTOP_TIMEOUT=1.5\n", "STOP_TIMEOUT: must be a whole number"),
        ("IMAGE=acme/app\nHEALTH_INTERVAL=10\nHEALTH_TIMEOUT=5\n", "HEALTH_INTERVAL (10s) is longer"),
        ("IMAGE=acme/app\nLOG_DIR=logs\n", "LOG_DIR: must be an absolute path"),
        ("IMAGE=acme/app\nDOCKER_ARGS=--name evil\n", "DOCKER_ARGS: --name may not be set here: bluegreen manages"),
        ("IMAGE=acme/app\nDOCKER_ARGS=--publish=0.0.0.0:80:8080\n", "DOCKER_ARGS: --publish may not be set here"),
        ("IMAGE=acme/app\nDOCKER_ARGS=-p8080:80\n", "DOCKER_ARGS: -p may not be set here"),
        ("IMAGE=acme/app\nDOCKER_ARGS=-e DB_PASSWORD=x\n", "DOCKER_ARGS: -e may not be set here: app environment belongs in the env file"),
        ("IMAGE=acme/app\nDOCKER_ARGS=--env=A=b\n", "DOCKER_ARGS: --env may not be set here"),
        ("IMAGE=acme/app\nDOCKER_ARGS=--network host\n", "DOCKER_ARGS: host networking"),
        ("IMAGE=acme/app\nDOCKER_ARGS=--net=host\n", "DOCKER_ARGS: host networking"),
        ("IMAGE=acme/app\nDOCKER_ARGS='--memory \"1g'\n", "DOCKER_ARGS: cannot parse"),
        ("IMAGE=acme/app\nHEALTH_EXPECT=abc\n", "HEALTH_EXPECT: must be an HTTP status code"),
    ],
)
def test_invalid_values_name_file_and_key(text, message):
    with pytest.raises(ConfigError) as exc:
        cfg_from(text)
    assert message in exc.value.message
    assert exc.value.exit_code == 2


@pytest.mark.parametrize("name", ["user-api", "admin_api", "a", "svc.v2", "A1"])
def test_valid_project_names(name):
    assert validate_project(name) == name


@pytest.mark.parametrize("name", ["../x", "a/b", "a;b", "--privileged", "-x", ".hidden", "a b", "a\nb", "user-api\n", "", "x" * 65, "a{b}"])
def test_dangerous_project_names_are_refused(name):
    with pytest.raises(UsageError) as exc:
        validate_project(name)
    assert exc.value.exit_code == 2


@pytest.mark.parametrize("tag", ["latest", "v1.2.3", "abc1234", "1_0-rc.1", "sha256:" + "0" * 64])
def test_valid_tags(tag):
    assert validate_tag(tag) == tag


@pytest.mark.parametrize("tag", ["--privileged", "-v", ".x", "a;b", "a b", "v1\n", "x" * 129, "sha256:xyz", "a:b", "../x"])
def test_dangerous_tags_are_refused(tag):
    with pytest.raises(UsageError):
        validate_tag(tag)


def test_settings_defaults_and_overrides():
    s = load_settings(None, {}, euid=0)
    assert str(s.root) == "/opt/deploy" and s.docker_cmd == ("docker",) and s.nginx_cmd == ("nginx",)
    assert load_settings(None, {}, euid=1000).nginx_cmd == ("sudo", "-n", "nginx")
    s = load_settings(
        "/srv/x",
        {"BLUEGREEN_ROOT": "/ignored", "BLUEGREEN_DOCKER": "sudo docker", "BLUEGREEN_NGINX": "nginx -p '/tmp/a b' -c /tmp/n.conf"},
        euid=0,
    )
    assert str(s.root) == "/srv/x" and s.docker_cmd == ("sudo", "docker")
    assert s.nginx_cmd == ("nginx", "-p", "/tmp/a b", "-c", "/tmp/n.conf")
    assert str(load_settings(None, {"BLUEGREEN_ROOT": "/r"}, euid=0).root) == "/r"
    assert s.upstream_file("user-api") == Path("/srv/x/nginx/conf.d/user-api-upstream.conf")
    assert s.env_file("user-api") == Path("/srv/x/projects/user-api.env")
    assert s.active_file("user-api") == Path("/srv/x/projects/user-api.active")


def test_missing_env_file_says_what_to_write(tmp_path):
    s = load_settings(str(tmp_path), {}, euid=0)
    with pytest.raises(ConfigError) as exc:
        load_project(s, "user-api")
    assert "user-api.env: no such file" in exc.value.message and "IMAGE=" in exc.value.message
