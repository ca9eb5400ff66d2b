"""The settings table (bluegreen/settings.py) is the one source: the generated files are current, ProjectConfig
and the parser agree with it, and its limits match what docker really accepts."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile
import typing
from pathlib import Path

import pytest

from bluegreen import config, init, settings, template
from bluegreen.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
INIT_PLACEHOLDERS = {"PROJECT", "IMAGE", "BLUE_PORT", "GREEN_PORT", "NGINX_URL", "SERVER_NAME", "SERVER_CONF"}


@pytest.mark.parametrize("rel", sorted(settings.generated()))
def test_generated_file_is_current(rel):
    committed = (REPO / rel).read_text(encoding="utf-8")
    assert committed == settings.generated()[rel], (
        f"{rel} is stale: it is generated from the table in bluegreen/settings.py. Run `{settings.WRITE_COMMAND}` "
        f"and commit the result."
    )


def test_check_mode_reports_a_stale_file_with_the_command(tmp_path, monkeypatch, capsys):
    fake = {settings.TEMPLATE_PATH: "not what the file holds\n"}
    monkeypatch.setattr(settings, "generated", lambda: fake)
    assert settings.main(["--check"]) == 1
    assert settings.WRITE_COMMAND in capsys.readouterr().err
    assert settings.main(["--bogus"]) == 2


def test_the_table_is_projectconfig():
    fields = {f.name: f for f in dataclasses.fields(config.ProjectConfig)}
    hints = typing.get_type_hints(config.ProjectConfig)
    own = set(fields) - {"project", "source", "app_env", "warnings"}
    assert {s.field for s in settings.TABLE} == own, "every ProjectConfig setting field has exactly one table row"
    assert config.RESERVED_KEYS == settings.KEYS
    kinds = {"seconds": float, "integer": int, "text": str, "url": str, "docker-args": tuple[str, ...]}
    for s in settings.TABLE:
        assert hints[s.field] == kinds[s.kind], s.key
        if s.default is not None:
            assert fields[s.field].default == s.default, s.key


@pytest.mark.parametrize("setting", settings.TABLE, ids=lambda s: s.key)
def test_every_default_is_valid_by_its_own_rules_and_documented(setting):
    if setting.default is not None:
        assert settings.parse_value(setting, setting.default_text(), "x.env") == setting.default
    assert setting.doc and setting.section in settings.SECTIONS
    if setting.kind not in ("seconds", "integer"):
        assert setting.chars and setting.chars_doc and setting.max_len > 0, "every string has characters and a length"
    else:
        assert setting.high <= settings.DAY, "every number has a sane upper bound"
    reference = (REPO / settings.REFERENCE_PATH).read_text(encoding="utf-8")
    assert f"| `{setting.key}` |" in reference


@pytest.mark.parametrize("setting", [s for s in settings.TABLE if s.kind not in ("seconds", "integer")], ids=lambda s: s.key)
def test_each_string_setting_is_bounded_in_length_and_characters(setting):
    with pytest.raises(ConfigError, match="characters long; at most"):
        settings.parse_value(setting, "a" * (setting.max_len + 1), "x.env")
    for bad in ("\x00", "\n", "\x1b", "\u2028"):
        with pytest.raises(ConfigError):
            settings.parse_value(setting, f"/a{bad}b", "x.env")


def test_the_template_has_only_inits_placeholders_and_every_key():
    raw = template.load("project.env")
    assert set(re.findall(r"@([A-Z][A-Z0-9_]*)@", raw)) == INIT_PLACEHOLDERS
    for key in settings.KEYS:
        assert len(re.findall(rf"^#?{key}=", raw, re.MULTILINE)) == 1, key
    text = init.render_env(project="user-api", image="ghcr.io/acme/api", blue_port=9001, green_port=9002,
                           nginx_url="http://127.0.0.1:8080", server_name="api.example.com",
                           server_conf="/etc/nginx/conf.d/user-api.conf")
    cfg = config.project_from_entries("user-api", "user-api.env", config.parse_env(text, "user-api.env"))
    assert (cfg.image, cfg.blue_port, cfg.green_port, cfg.nginx_url) == ("ghcr.io/acme/api", 9001, 9002, "http://127.0.0.1:8080")
    assert cfg.app_env == () and cfg.warnings == ()


def test_secret_values_never_appear_in_a_message():
    secret = settings.BY_KEY["NOTIFY_WEBHOOK_URL"]
    for value in ("ftp://x/T0KEN", "https://h/" + "T0KEN" * 500, "https://h/T0KEN\x01", "https://h:99999/T0KEN", "T0KEN"):
        with pytest.raises(ConfigError) as exc:
            settings.parse_value(secret, value, "x.env", 3)
        assert "T0KEN" not in exc.value.message and exc.value.message.startswith("x.env: NOTIFY_WEBHOOK_URL: ")


@pytest.mark.stack
def test_env_line_limit_is_dockers(stack):
    """The longest app line bluegreen accepts is one docker's --env-file reads; one byte more both refuse."""
    longest = "K=" + "x" * (settings.ENV_LINE_MAX - 2)
    config.project_from_entries("p", "p.env", [config.EnvEntry("IMAGE", "acme/app", 1), config.EnvEntry("K", longest[2:], 2)])
    with pytest.raises(ConfigError):
        config.project_from_entries("p", "p.env", [config.EnvEntry("IMAGE", "acme/app", 1), config.EnvEntry("K", longest[2:] + "x", 2)])

    def docker_reads(line: str) -> str:
        fd, path = tempfile.mkstemp(prefix="bg-envline-")
        try:
            os.write(fd, (line + "\n").encode())
            os.close(fd)
            # No such image: docker parses --env-file first, then asks the daemon, which creates nothing.
            proc = subprocess.run(["docker", "run", "--pull", "never", "--rm", "--env-file", path,
                                   "bluegreen-test-no-such-image:none", "true"], capture_output=True, text=True, timeout=60)
            return proc.stderr
        finally:
            os.unlink(path)

    assert "invalid env file" not in docker_reads(longest) and "No such image" in docker_reads(longest)
    assert "token too long" in docker_reads(longest + "x")


def test_the_reference_quotes_a_real_message():
    text = "IMAGE=acme/app\n" + "\n" * 5 + "HEALTH_TIMEOUT=soon\n"
    with pytest.raises(ConfigError) as exc:
        config.project_from_entries("user-api", "user-api.env", config.parse_env(text, "user-api.env"))
    assert f"`{exc.value.message}`" in (REPO / settings.REFERENCE_PATH).read_text(encoding="utf-8")


def test_every_host_variable_load_settings_reads_is_in_the_reference():
    source = (REPO / "bluegreen" / "config.py").read_text(encoding="utf-8")
    used = set(re.findall(r'"(BLUEGREEN_[A-Z_]+)"', source))
    assert used >= {"BLUEGREEN_ROOT", "BLUEGREEN_DOCKER", "BLUEGREEN_NGINX"}
    reference = (REPO / settings.REFERENCE_PATH).read_text(encoding="utf-8")
    assert {var for var in used if f"| `{var}` |" not in reference} == set()
