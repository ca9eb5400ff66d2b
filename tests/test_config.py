"""Pure tests: env file parsing, project validation, settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bluegreen.config import (
    EnvEntry,
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
        ("IMAGE\n", "x.env:1: IMAGE: expected KEY=VALUE"),
        ("1BAD=x\n", "x.env:1: the text before '=' is not a valid variable name"),
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
        ("IMAGE=Acme App\n", "IMAGE: character 5 of the value is a space"),
        ("IMAGE=Acme/App\n", "IMAGE: must be a docker repository name"),
        ("IMAGE=acme/app\nHEALTH_TIMEOUT=soon\n", "user-api.env: HEALTH_TIMEOUT: must be a number of seconds"),
        ("IMAGE=acme/app\nHEALTH_TIMEOUT=-1\n", "HEALTH_TIMEOUT: must be a number of seconds like 30 or 0.5, more than 0"),
        ("IMAGE=acme/app\nHEALTH_TIMEOUT=nan\n", "HEALTH_TIMEOUT: must be a number of seconds"),
        ("IMAGE=acme/app\nHEALTH_TIMEOUT=0\n", "HEALTH_TIMEOUT: must be a number of seconds like 30 or 0.5, more than 0"),
        ("IMAGE=acme/app\nBLUE_PORT=99999\n", "BLUE_PORT: must be a port number from 1 to 65535, got '99999' (line 2)."),
        ("IMAGE=acme/app\nBLUE_PORT=8082\n", "BLUE_PORT and GREEN_PORT must differ"),
        ("IMAGE=acme/app\nHEALTH_PATH=api/health\n", "HEALTH_PATH: must be a path that starts with '/'"),
        ("IMAGE=acme/app\nHEALTH_PATH=\n", "HEALTH_PATH: may not be empty"),
        ("IMAGE=acme/app\nSTOP_TIMEOUT=1.5\n", "STOP_TIMEOUT: must be a whole number"),
        ("IMAGE=acme/app\nHEALTH_INTERVAL=10\nHEALTH_TIMEOUT=5\n", "HEALTH_INTERVAL (10s) is longer"),
        ("IMAGE=acme/app\nLOG_DIR=logs\n", "LOG_DIR: must be an absolute path"),
        ("IMAGE=acme/app\nDOCKER_ARGS=--name evil\n", "DOCKER_ARGS: --name may not be set here: bluegreen sets it"),
        ("IMAGE=acme/app\nDOCKER_ARGS=--publish=0.0.0.0:80:8080\n", "DOCKER_ARGS: --publish (-p) may not be set here"),
        ("IMAGE=acme/app\nDOCKER_ARGS=-p8080:80\n", "DOCKER_ARGS: -p (--publish) may not be set here"),
        ("IMAGE=acme/app\nDOCKER_ARGS=-e DB_PASSWORD=x\n", "DOCKER_ARGS: -e (--env) may not be set here: app environment belongs in the env file"),
        ("IMAGE=acme/app\nDOCKER_ARGS=--env=A=b\n", "DOCKER_ARGS: --env (-e) may not be set here"),
        ("IMAGE=acme/app\nDOCKER_ARGS=--network host\n", "DOCKER_ARGS: --network (word 1): host networking"),
        ("IMAGE=acme/app\nDOCKER_ARGS=--net=host\n", "DOCKER_ARGS: --net (word 1): host networking"),
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


# -- issue 9: every setting is validated completely at load time (exit 2), before anything runs -------------

_LOAD_TIME_CASES = [
        # Extreme numbers reached time.sleep / arithmetic as OverflowError, or int() as ValueError.
        ("HEALTH_TIMEOUT=1e308", "HEALTH_TIMEOUT"),
        ("HEALTH_TIMEOUT=86401", "HEALTH_TIMEOUT"),
        ("HEALTH_INITIAL_DELAY=1e300", "HEALTH_INITIAL_DELAY"),
        ("HEALTH_REQUEST_TIMEOUT=1e309", "HEALTH_REQUEST_TIMEOUT"),
        ("DRAIN_TIMEOUT=99999999999", "DRAIN_TIMEOUT"),
        ("VERIFY_TIMEOUT=inf", "VERIFY_TIMEOUT"),
        ("HOOK_TIMEOUT=1_000", "HOOK_TIMEOUT"),
        ("HEALTH_TIMEOUT=\uff11\uff12", "HEALTH_TIMEOUT"),  # fullwidth digits: float() takes them
        ("HEALTH_INTERVAL=0.0000001", "HEALTH_INTERVAL"),  # a busy loop against the app
        ("BLUE_PORT=" + "0" * 5000 + "8081", "BLUE_PORT"),  # int() refuses > 4300 digits with ValueError
        ("STOP_TIMEOUT=" + "9" * 30, "STOP_TIMEOUT"),
        # HEALTH_PATH: non-ASCII crashed after the container started; control characters failed after HEALTH_TIMEOUT.
        ("HEALTH_PATH=/api/h\u00e9alth", "HEALTH_PATH"),
        ("HEALTH_PATH=/api\x01health", "HEALTH_PATH"),
        ("HEALTH_PATH=/api\x7fhealth", "HEALTH_PATH"),
        ("HEALTH_PATH=/api/health#frag", "HEALTH_PATH"),
        ("HEALTH_PATH=/api/%zz", "HEALTH_PATH"),
        ("HEALTH_PATH=/" + "a" * 1024, "HEALTH_PATH"),
        ("HEALTH_HOST=h\u00f6st", "HEALTH_HOST"),
        ("HEALTH_HOST=host:99999", "HEALTH_HOST"),
        ("NGINX_URL=http://127.0.0.1:99999", "NGINX_URL"),  # a socket port out of range is an OverflowError
        ("NGINX_URL=http://[", "NGINX_URL"),  # urllib: ValueError 'Invalid IPv6 URL'
        ("NGINX_URL=http://:80", "NGINX_URL"),
        ("NGINX_URL=http://[::::]:80", "NGINX_URL"),  # urllib: ValueError, not an IPv6 address
        ("NOTIFY_WEBHOOK_URL=https://[zz]/hook", "NOTIFY_WEBHOOK_URL"),
        ("SERVER_NAME=a\x0bb", "SERVER_NAME"),
        ("NOTIFY_WEBHOOK_URL=https://h\u00f6oks.example/x", "NOTIFY_WEBHOOK_URL"),
        ("NOTIFY_WEBHOOK_URL=https://", "NOTIFY_WEBHOOK_URL"),
        ("NOTIFY_WEBHOOK_URL=https://hooks.example:0/x", "NOTIFY_WEBHOOK_URL"),
        ("LOG_DIR=/", "LOG_DIR"),
        ("LOG_DIR=/app/../etc", "LOG_DIR"),
        ("LOG_DIR=/app logs", "LOG_DIR"),
        ("LOG_DIR=/app/l\u00f6gs", "LOG_DIR"),
        ("SPRING_PROFILES=prod\x1b[31m", "SPRING_PROFILES"),
        ("IMAGE=acme/" + "a" * 300, "IMAGE"),
        ("DOCKER_ARGS=--label a=\x00b", "DOCKER_ARGS"),  # NUL in argv: subprocess raises ValueError
        ("DOCKER_ARGS=--memory " + "1" * 5000, "DOCKER_ARGS"),
]


@pytest.mark.parametrize("line, key", _LOAD_TIME_CASES, ids=[f"{k}-{i}" for i, (_, k) in enumerate(_LOAD_TIME_CASES)])
def test_every_setting_is_validated_completely_at_load_time(line, key):
    text = f"IMAGE=acme/app\n{line}\n" if not line.startswith("IMAGE=") else line + "\n"
    with pytest.raises(ConfigError) as exc:
        cfg_from(text)
    assert exc.value.message.startswith(f"user-api.env: {key}: ") and exc.value.exit_code == 2


@pytest.mark.parametrize(
    "line, field, value",
    [
        ("HEALTH_TIMEOUT=86400", "health_timeout", 86400.0),
        ("HEALTH_TIMEOUT=.5", "health_timeout", 0.5),
        ("HEALTH_INITIAL_DELAY=0", "health_initial_delay", 0.0),
        ("HEALTH_PATH=/actuator/health?probe=1&x=%2F", "health_path", "/actuator/health?probe=1&x=%2F"),
        ("HEALTH_HOST=api.example.com:8443", "health_host", "api.example.com:8443"),
        ("NGINX_URL=https://[::1]:8443/", "nginx_url", "https://[::1]:8443"),
        ("NOTIFY_WEBHOOK_URL=https://hooks.slack.com/services/T0/B0/xyz?a=b", "notify_webhook_url", "https://hooks.slack.com/services/T0/B0/xyz?a=b"),
        ("LOG_DIR=/var/log/app.d/", "log_dir", "/var/log/app.d/"),
        ("STOP_TIMEOUT=0", "stop_timeout", 0),
        ("SPRING_PROFILES=prod, eu", "spring_profiles", "prod, eu"),
        ("DOCKER_ARGS=--label desc=caf\u00e9 -t --network bridge --pid host", "docker_args", ("--label", "desc=caf\u00e9", "-t", "--network", "bridge", "--pid", "host")),
    ],
)
def test_valid_values_at_the_edges_are_accepted(line, field, value):
    assert getattr(cfg_from(f"IMAGE=acme/app\n{line}\n"), field) == value


def test_app_value_too_long_for_dockers_env_file_is_refused_at_load_time():
    from bluegreen.settings import ENV_LINE_MAX

    fits = "K=" + "x" * (ENV_LINE_MAX - 2)
    assert dict(cfg_from(f"IMAGE=acme/app\n{fits}\n").app_env)["K"] == "x" * (ENV_LINE_MAX - 2)
    with pytest.raises(ConfigError) as exc:
        cfg_from(f"IMAGE=acme/app\n{fits}x\n")
    assert "user-api.env: K: KEY=VALUE is 65536 bytes" in exc.value.message and "xxx" not in exc.value.message


def test_non_utf8_env_file_is_a_config_error_naming_the_line(tmp_path):
    (tmp_path / "projects").mkdir()
    (tmp_path / "projects" / "user-api.env").write_bytes(b"IMAGE=acme/app\nDB_PASSWORD=s3cr\xffet\n")
    with pytest.raises(ConfigError) as exc:
        load_project(load_settings(str(tmp_path), {}, euid=0), "user-api")
    assert "user-api.env:2: the file is not UTF-8 text" in exc.value.message and "s3cr" not in exc.value.message


# -- issue 9: DOCKER_ARGS is parsed with docker's own grammar --------------------------------------------

@pytest.mark.parametrize(
    "args, message",
    [
        ("-tp 0.0.0.0:8080:8080", "-p (--publish) may not be set here"),  # published on all interfaces
        ("-itp8080:80", "-p (--publish) may not be set here"),
        ("-p=0.0.0.0:80:80", "-p (--publish) may not be set here"),
        ("-te DB_PASSWORD=x", "-e (--env) may not be set here"),  # an env value in argv
        ("-tP", "-P (--publish-all) may not be set here"),
        ("-td", "-d (--detach) may not be set here"),
        ("--detach=false", "--detach (-d) may not be set here"),
        ("--label bluegreen.project=other", "may not set a bluegreen.* label"),
        ("-l bluegreen.tag=v9", "may not set a bluegreen.* label"),
        ("--label=BlueGreen.color=blue", "may not set a bluegreen.* label"),
        ("-tlbluegreen.color=green", "may not set a bluegreen.* label"),
        ("--label-file /tmp/labels", "--label-file may not be set here"),
        ("--restart no", "--restart may not be set here"),
        ("--restart=always", "--restart may not be set here"),
        ("-a stdout", "-a (--attach) may not be set here"),
        ("--rm", "--rm may not be set here"),
        ("--cidfile /tmp/cid", "--cidfile may not be set here"),
        ("--pull always", "--pull may not be set here"),
        ("--help", "--help may not be set here"),
        ("--network=host", "host networking"),
        ("--net host", "host networking"),
        ("--network name=host,alias=x", "host networking"),
        ("--network none", "host networking, no network"),
        ("--network container:db", "another container's network"),
        ("--memory 1g busybox", "a word that is not an option"),  # it would become the image
        ("--memory 1g --", "a word that is not an option (or `--`)"),
        ("--privileged=maybe", "takes true or false"),
        ("--no-such-flag", "'--no-such-flag', which is not a `docker run` option"),
        ("-Z", "'-Z', which is not a `docker run` option"),
        ("--memory", "--memory (word 1) needs a value"),
        ("-m", "-m (--memory, word 1) needs a value"),
    ],
)
def test_docker_args_refusals_cannot_be_bypassed(args, message):
    with pytest.raises(ConfigError) as exc:
        cfg_from(f"IMAGE=acme/app\nDOCKER_ARGS={args}\n")
    assert "user-api.env: DOCKER_ARGS: " in exc.value.message and message in exc.value.message


@pytest.mark.parametrize(
    "args",
    [
        "--memory 1g --cpus 1.5", "-m1g", "-m=1g", "-it", "-t=false", "--init", "--entrypoint --name",
        "--label team=api -l tier=web", "--network bridge", "--network=my-net", "--ulimit nofile=1024:2048",
        "-v /srv/data:/data:ro --tmpfs /tmp", "-h myhost", "--health-cmd 'curl -f http://localhost/ || exit 1'",
        "--expose 9090", "--user 1000:1000 -w /app", "--add-host db:10.0.0.2",
    ],
)
def test_docker_args_that_are_docker_options_are_kept(args):
    import shlex

    assert cfg_from(f"IMAGE=acme/app\nDOCKER_ARGS={args}\n").docker_args == tuple(shlex.split(args))


def test_unknown_docker_flag_is_named_but_its_value_never_shown():
    with pytest.raises(ConfigError) as exc:
        cfg_from("IMAGE=acme/app\nDOCKER_ARGS=--tokn=hunter2secret\n")
    assert "'--tokn'" in exc.value.message and "hunter2" not in exc.value.message


# -- issue 9: duplicate keys ----------------------------------------------------------------------------

@pytest.mark.parametrize("key, first, second", [("IMAGE", "acme/app", "evil/app"), ("DB_PASSWORD", "a", "b"),
                                                ("HEALTH_TIMEOUT", "5", "5")])
def test_duplicate_keys_are_refused_naming_both_lines(key, first, second):
    text = f"IMAGE=acme/app\n# note\n{key}={first}\nOTHER=1\n{key}={second}\n" if key != "IMAGE" else \
        f"IMAGE={first}\n\nOTHER=1\nexport IMAGE={second}\n"
    with pytest.raises(ConfigError) as exc:
        cfg_from(text)
    lines = (3, 5) if key != "IMAGE" else (1, 4)
    assert f"user-api.env: {key} is set twice, on line {lines[0]} and on line {lines[1]}" in exc.value.message
    assert "Keep one of the two lines" in exc.value.message and exc.value.exit_code == 2


# -- issue 9: error messages never echo any part of a value --------------------------------------------

def test_a_stray_secret_line_is_never_echoed():
    text = "IMAGE=acme/app\nTLS_KEY=-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n"
    with pytest.raises(ConfigError) as exc:
        cfg_from(text)
    assert exc.value.message.startswith("user-api.env:3: expected KEY=VALUE")
    assert "MIIE" not in exc.value.message and "BEGIN" not in exc.value.message


def test_an_invalid_name_before_equals_is_never_echoed():
    with pytest.raises(ConfigError) as exc:
        parse_env("IMAGE=acme/app\nab+cd/ef=ghij\n", "x.env")
    assert exc.value.message.startswith("x.env:2: the text before '='") and "ab+cd" not in exc.value.message


@pytest.mark.parametrize("sep", ["\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e"])
def test_unicode_line_separators_stay_inside_the_value(sep):
    # str.splitlines split these, so the rest of a secret became a "line" and was echoed in the error.
    value = f"s3cret{sep}rest-of-the-secret"
    cfg = cfg_from(f"IMAGE=acme/app\nDB_PASSWORD={value}\nOTHER=1\n")
    assert dict(cfg.app_env) == {"DB_PASSWORD": value, "OTHER": "1"}


def test_crlf_line_endings_and_a_byte_order_mark_are_read():
    cfg = cfg_from("\ufeffIMAGE=acme/app\r\nHEALTH_TIMEOUT=5\r\nDB_PASSWORD=x\r\n")
    assert cfg.image == "acme/app" and cfg.health_timeout == 5 and dict(cfg.app_env) == {"DB_PASSWORD": "x"}


def test_a_lone_carriage_return_inside_an_app_value_is_refused_without_echo():
    with pytest.raises(ConfigError) as exc:
        cfg_from("IMAGE=acme/app\nDB_PASSWORD=abc\rdef-secret\n")
    assert "DB_PASSWORD: values may not contain line breaks" in exc.value.message and "def-secret" not in exc.value.message


def test_the_webhook_url_is_never_echoed():
    with pytest.raises(ConfigError) as exc:
        cfg_from("IMAGE=acme/app\nNOTIFY_WEBHOOK_URL=ftp://hooks.example/T0/secret-token\n")
    assert "NOTIFY_WEBHOOK_URL: must be an http:// or https:// URL" in exc.value.message
    assert "secret-token" not in exc.value.message and "hooks.example" not in exc.value.message


@pytest.mark.parametrize("name", ["a..b", "x..", "user..api"])
def test_names_and_tags_with_dot_dot_are_refused(name):
    with pytest.raises(UsageError):
        validate_project(name)
    with pytest.raises(UsageError):
        validate_tag(name)


# -- issue 9: the env file is read through the safe-file layer -----------------------------------------

def _root_with(tmp_path: Path):
    (tmp_path / "projects").mkdir()
    return load_settings(str(tmp_path), {}, euid=0), tmp_path / "projects" / "user-api.env"


def _load_within(settings, seconds: int = 5):
    import signal

    def too_slow(signum, frame):
        raise AssertionError(f"load_project blocked for {seconds}s")

    old = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(seconds)
    try:
        return load_project(settings, "user-api")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_env_file_symlink_is_refused_not_followed(tmp_path):
    settings, env = _root_with(tmp_path)
    target = tmp_path / "elsewhere.env"
    target.write_text("IMAGE=acme/app\nDB_PASSWORD=from-the-link-target\n")
    env.symlink_to(target)
    with pytest.raises(ConfigError) as exc:
        _load_within(settings)
    assert "symlink" in exc.value.message and "from-the-link-target" not in exc.value.message
    assert exc.value.exit_code == 2


def test_env_file_fifo_is_refused_without_blocking(tmp_path):
    settings, env = _root_with(tmp_path)
    os.mkfifo(env)
    with pytest.raises(ConfigError) as exc:
        _load_within(settings)
    assert "FIFO" in exc.value.message and exc.value.exit_code == 2


def test_env_file_larger_than_the_cap_is_refused(tmp_path):
    settings, env = _root_with(tmp_path)
    env.write_text("IMAGE=acme/app\n" + "# padding\n" * 200_000)
    with pytest.raises(ConfigError) as exc:
        _load_within(settings)
    assert "larger than" in exc.value.message and exc.value.exit_code == 2


def test_a_value_that_is_not_unicode_text_is_refused_at_load_time():
    # A lone surrogate cannot be written to docker's env file (UnicodeEncodeError at `docker run`).
    with pytest.raises(ConfigError) as exc:
        project_from_entries("p", "p.env", [EnvEntry("IMAGE", "acme/app", 1), EnvEntry("DB_PASSWORD", "zq\ud800zq", 2)])
    assert "DB_PASSWORD: the value is not valid Unicode text" in exc.value.message and "zq" not in exc.value.message


def test_projects_lists_only_valid_names(tmp_path):
    (tmp_path / "projects").mkdir()
    for name in ("user-api", "a..b", ".hidden", "ok.v2"):
        (tmp_path / "projects" / f"{name}.env").write_text("IMAGE=acme/app\n")
    assert load_settings(str(tmp_path), {}, euid=0).projects() == ["ok.v2", "user-api"]


@pytest.mark.parametrize("line", [
    "HEALTH_TIMEOUT=1e308", "HEALTH_PATH=/api/h\u00e9alth", "HEALTH_PATH=/api\x01health", "DOCKER_ARGS=-tp 0.0.0.0:80:8080",
    "DOCKER_ARGS=--label bluegreen.project=other", "IMAGE=evil/app", "BIG=" + "x" * 70000,
], ids=lambda line: line[:40])
def test_deploy_refuses_bad_settings_with_exit_2_before_docker_runs(tmp_path, line):
    import io

    from bluegreen.cli import main

    (tmp_path / "projects").mkdir()
    (tmp_path / "projects" / "user-api.env").write_text(f"IMAGE=acme/app\nDB_PASSWORD=s3cret\n{line}\n", encoding="utf-8")
    calls = tmp_path / "docker-calls"
    # A stand-in docker that only records that it was called: the refusal must come before any docker command.
    environ = {"BLUEGREEN_ROOT": str(tmp_path), "BLUEGREEN_DOCKER": f"sh -c 'echo \"$@\" >> {calls}; exit 1' docker",
               "BLUEGREEN_NGINX": "false", "PATH": os.environ.get("PATH", "")}
    out, err = io.StringIO(), io.StringIO()
    code = main(["deploy", "user-api", "v1"], environ=environ, stdout=out, stderr=err)
    assert code == 2 and "user-api.env" in err.getvalue(), err.getvalue()
    assert "internal error" not in err.getvalue() and "s3cret" not in err.getvalue()
    assert not calls.exists(), "docker ran before the settings were refused"


@pytest.mark.parametrize("var", ["BLUEGREEN_ROOT", "BLUEGREEN_DOCKER", "BLUEGREEN_NGINX", "BLUEGREEN_NGINX_PID_FILE",
                                 "BLUEGREEN_NGINX_CONF_DIR", "BLUEGREEN_NGINX_CONF", "BLUEGREEN_CRON_DIR", "BLUEGREEN_SYSTEMD_DIR"])
def test_host_settings_with_a_control_character_are_refused(var):
    # A NUL reached os.* or subprocess as ValueError: "internal error" instead of a usage error.
    with pytest.raises(UsageError) as exc:
        load_settings(None, {var: "/srv/x\x00y"}, euid=0)
    assert exc.value.message.startswith(f"{var}: character 7 is a control character")
    with pytest.raises(UsageError):
        load_settings("/srv/a\nb", {}, euid=0)
