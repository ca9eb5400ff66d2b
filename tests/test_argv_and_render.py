"""Pure tests: docker argv, the upstream file, planning and the dry-run plan."""

from __future__ import annotations

from pathlib import Path

from bluegreen import docker as dk
from bluegreen.config import load_settings, parse_env, project_from_entries
from bluegreen.deploy import plan_deploy
from bluegreen.nginx import (
    Upstream,
    add_header_line,
    alive,
    children,
    parse_upstream,
    pid_file_from_dump,
    render_upstream,
    route_variable,
)


def make_cfg(extra: str = ""):
    text = "IMAGE=ghcr.io/acme/user-api\nDB_PASSWORD=s3cret\nSPRING_PROFILES=prod\n" + extra
    return project_from_entries("user-api", "user-api.env", parse_env(text, "user-api.env"))


SETTINGS = load_settings("/opt/deploy", {}, euid=0)


def test_run_argv_is_exact_and_carries_no_secret():
    cfg = make_cfg("DOCKER_ARGS=--memory 1g\n")
    argv = dk.run_argv(("docker",), cfg, colour="green", tag="abc1234", ref="ghcr.io/acme/user-api:abc1234", env_file="/tmp/e.env")
    assert argv == [
        "docker", "run", "--detach",
        "--name", "user-api-green",
        "--publish", "127.0.0.1:8082:8080",
        "--restart", "unless-stopped",
        "--label", "bluegreen.project=user-api",
        "--label", "bluegreen.color=green",
        "--label", "bluegreen.tag=abc1234",
        "--volume", "/app/logs:/app/logs",
        "--env-file", "/tmp/e.env",
        "--memory", "1g",
        "ghcr.io/acme/user-api:abc1234",
    ]
    assert not any("s3cret" in a or "prod" in a for a in argv)


def test_run_argv_without_log_dir_or_env():
    cfg = project_from_entries("p", "p.env", parse_env("IMAGE=acme/p\nLOG_DIR=\n", "p.env"))
    argv = dk.run_argv(("sudo", "docker"), cfg, colour="blue", tag="v1", ref="acme/p:v1", env_file=None)
    assert argv[:3] == ["sudo", "docker", "run"] and "--volume" not in argv and "--env-file" not in argv
    assert "127.0.0.1:8081:8080" in argv and argv[-1] == "acme/p:v1"


def test_env_file_text_is_docker_env_file_format():
    assert dk.env_file_text([("A", "x y"), ("B", "p#ss=1")]) == "A=x y\nB=p#ss=1\n"


def test_other_docker_argv():
    assert dk.pull_argv(("docker",), "a/b:v1") == ["docker", "pull", "a/b:v1"]
    assert dk.stop_argv(("docker",), "p-blue", 30) == ["docker", "stop", "--time", "30", "p-blue"]
    assert dk.rm_argv(("docker",), "p-blue") == ["docker", "rm", "--force", "p-blue"]
    assert dk.logs_argv(("docker",), "p-blue", 20) == ["docker", "logs", "--tail", "20", "p-blue"]


def test_parse_inspect():
    text = '[{"Id": "abc", "Name": "/p-blue", "State": {"Status": "exited", "ExitCode": 3, "StartedAt": "t"},' \
           ' "Config": {"Image": "a/b:v1", "Labels": {"bluegreen.tag": "v1"}}}]'
    (c,) = dk.parse_inspect(text)
    assert (c.name, c.status, c.exit_code, c.running, c.labels["bluegreen.tag"]) == ("p-blue", "exited", 3, False, "v1")


TOKEN = "0123456789abcdef0123456789abcdef"


def test_upstream_render_and_parse_round_trip():
    text = render_upstream(name="user-api", port=8082, project="user-api", colour="green", tag="v2", token=TOKEN)
    assert "upstream user-api {\n    server 127.0.0.1:8082;\n}\n" in text
    assert (
        "map $http_x_bluegreen_probe $bluegreen_route_user_api {\n"
        f'    "{TOKEN}" $upstream_addr;\n'
        '    default "";\n}\n'
    ) in text
    assert parse_upstream(text) == Upstream("user-api", 8082, TOKEN)


def test_route_variable_is_a_valid_nginx_name_per_project():
    assert route_variable("svc.v2-api") == "$bluegreen_route_svc_v2_api"
    assert add_header_line("user-api") == "add_header X-Bluegreen-Upstream $bluegreen_route_user_api always;"


def test_pid_file_from_nginx_dump():
    assert pid_file_from_dump("# configuration file /etc/nginx/nginx.conf:\nuser www-data;\npid /run/nginx.pid;\n", ["nginx"]) == "/run/nginx.pid"
    assert pid_file_from_dump("events {}\n", ["nginx"]) == "/run/nginx.pid"
    assert pid_file_from_dump("pid logs/nginx.pid;\n", ["nginx", "-p", "/srv/ng", "-c", "x"]) == "/srv/ng/logs/nginx.pid"
    assert pid_file_from_dump("  pid   '/tmp/a.pid' ;\n", ["nginx"]) == "/tmp/a.pid"


def test_children_and_alive_read_proc(tmp_path):
    def proc(pid, ppid, comm="nginx"):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "stat").write_text(f"{pid} ({comm}) S {ppid} 1 1 0 -1\n")

    proc(10, 1)
    proc(11, 10, "nginx: worker process")  # spaces and ')' in comm are handled
    proc(12, 10, "weird ) name")
    proc(13, 99)
    (tmp_path / "self").mkdir()
    assert children(10, tmp_path) == {11, 12}
    assert alive({11, 12, 14}, 10, tmp_path) == {11, 12}
    proc(14, 1)  # pid reused by an unrelated process
    assert alive({14}, 10, tmp_path) == set()


def test_parse_seed_style_hand_written_upstream():
    seed = "upstream user_api_backend {\n    server 127.0.0.1:8081;\n    keepalive 16;\n}\n"
    assert parse_upstream(seed) == Upstream("user_api_backend", 8081, "")
    assert parse_upstream("") is None and parse_upstream("# nothing\n") is None and parse_upstream(None) is None


def test_plan_first_deploy_is_blue():
    plan, warnings = plan_deploy(SETTINGS, make_cfg(), "v1", active=None, upstream=None, token_factory=lambda: TOKEN)
    assert plan.token == TOKEN
    assert (plan.current, plan.target, plan.target_name, plan.target_port) == (None, "blue", "user-api-blue", 8081)
    assert plan.upstream_name == "user-api" and plan.ref == "ghcr.io/acme/user-api:v1" and warnings == []


def test_plan_alternates_and_keeps_hand_written_upstream_name():
    plan, _ = plan_deploy(SETTINGS, make_cfg(), "v2", active="blue", upstream=Upstream("backend", 8081, "f" * 32))
    assert (plan.current, plan.target, plan.upstream_name, plan.token) == ("blue", "green", "backend", "f" * 32)
    assert "upstream backend {" in plan.upstream_text() and "127.0.0.1:8082" in plan.upstream_text()
    plan, _ = plan_deploy(SETTINGS, make_cfg(), "v3", active="green", upstream=Upstream("user-api", 8082))
    assert (plan.current, plan.target) == ("green", "blue")


def test_plan_trusts_nginx_over_a_stale_active_file():
    plan, warnings = plan_deploy(SETTINGS, make_cfg(), "v2", active="green", upstream=Upstream("user-api", 8081))
    assert (plan.current, plan.target) == ("blue", "green")
    assert "trusting nginx" in warnings[0]


def test_plan_digest_reference():
    digest = "sha256:" + "ab" * 32
    plan, _ = plan_deploy(SETTINGS, make_cfg(), digest, active=None, upstream=None)
    assert plan.ref == f"ghcr.io/acme/user-api@{digest}"


def test_plan_upstream_on_unknown_port_warns():
    plan, warnings = plan_deploy(SETTINGS, make_cfg(), "v2", active="blue", upstream=Upstream("user-api", 9999))
    assert plan.current is None and plan.target == "blue" and "neither BLUE_PORT" in warnings[0]


def test_dry_run_description_lists_exact_commands_without_secrets():
    plan, _ = plan_deploy(SETTINGS, make_cfg(), "v2", active="blue", upstream=Upstream("user-api", 8081))
    text = "\n".join(plan.describe())
    assert "docker pull ghcr.io/acme/user-api:v2" in text
    assert "docker stop --time 30 user-api-blue" in text
    assert "nginx -T" in text and "nginx -s reload" in text and "routed to 127.0.0.1:8082" in text
    assert str(Path("/opt/deploy/projects/user-api.active")) in text
    assert "s3cret" not in text


def test_crash_note_treats_a_docker_restart_as_a_crash():
    def c(status, restarts, code=0):
        return dk.Container(name="p", id="i", status=status, exit_code=code, image="x", restart_count=restarts)

    assert c("running", 0).crash_note() is None
    # Running again: docker's ExitCode is the new run's 0, so no code is claimed.
    assert c("running", 2, 0).crash_note() == "the container exited and docker restarted it 2 time(s)"
    assert "exited with code 3" in c("restarting", 1, 3).crash_note()
    assert c("exited", 0, 3).crash_note() == "the container stopped (exited, exit code 3)"
    (parsed,) = dk.parse_inspect('[{"Name": "/p", "RestartCount": 4, "State": {"Status": "restarting", "ExitCode": 3}}]')
    assert parsed.restart_count == 4 and parsed.crash_note() is not None


def test_placeholder_upstream_routes_nowhere_and_keeps_its_token():
    text = render_upstream(name="api", port=8081, project="api", colour="-", tag="-", token=TOKEN, down=True)
    assert "server 127.0.0.1:8081 down;" in text
    assert parse_upstream(text) == Upstream("api", 0, TOKEN)
    plan, warnings = plan_deploy(SETTINGS, make_cfg(), "v1", active=None, upstream=parse_upstream(text))
    assert (plan.current, plan.target, plan.token, warnings) == (None, "blue", TOKEN, [])


# -- the upstream settings (issue 10) -------------------------------------------------------------------

def test_upstream_options_render_keepalive_and_nginx_defaults_stay_unwritten():
    from bluegreen.nginx import UpstreamOptions, nginx_time

    text = render_upstream(name="api", port=8081, project="api", colour="blue", tag="v1", token=TOKEN,
                           options=UpstreamOptions(keepalive=32, keepalive_timeout=4, max_fails=1, fail_timeout=10))
    assert "upstream api {\n    server 127.0.0.1:8081;\n    keepalive 32;\n    keepalive_timeout 4s;\n}\n" in text
    text = render_upstream(name="api", port=8081, project="api", colour="-", tag="-", token=TOKEN, down=True,
                           options=UpstreamOptions(keepalive=0, max_fails=3, fail_timeout=30))
    assert "    server 127.0.0.1:8081 max_fails=3 fail_timeout=30s down;\n}\n" in text and "keepalive" not in text
    assert parse_upstream(text) == Upstream("api", 0, TOKEN)
    assert (nginx_time(60), nginx_time(1.5)) == ("60s", "1500ms")


def test_every_deploy_writes_upstream_keepalive_by_default():
    """The managed file lost a hand-added `keepalive 16;` on every deploy and had no setting for it (issue 10)."""
    plan, _ = plan_deploy(SETTINGS, make_cfg(), "v2", active="blue", upstream=Upstream("user-api", 8081, TOKEN))
    text = plan.upstream_text()
    assert "    server 127.0.0.1:8082;\n    keepalive 16;\n    keepalive_timeout 4s;\n}\n" in text
    assert parse_upstream(text) == Upstream("user-api", 8082, TOKEN)


def test_upstream_settings_rows_have_nginx_bounds():
    from bluegreen import settings
    from bluegreen.errors import ConfigError
    import pytest

    rows = {row.key: row for row in settings.UPSTREAM_ROWS}
    assert settings.parse_value(rows["UPSTREAM_KEEPALIVE"], "0", "a.env") == 0
    assert settings.parse_value(rows["UPSTREAM_KEEPALIVE_TIMEOUT"], "60", "a.env") == 60
    for key, bad in (("UPSTREAM_KEEPALIVE", "-1"), ("UPSTREAM_KEEPALIVE", "1025"), ("UPSTREAM_KEEPALIVE_TIMEOUT", "0"),
                     ("UPSTREAM_KEEPALIVE_TIMEOUT", "1.5"), ("UPSTREAM_MAX_FAILS", "x"), ("UPSTREAM_FAIL_TIMEOUT", "3601")):
        with pytest.raises(ConfigError):
            settings.parse_value(rows[key], bad, "a.env")
    assert settings.upstream_options(None) == {"keepalive": 16, "keepalive_timeout": 4, "max_fails": 1, "fail_timeout": 10}


def test_foreign_directives_names_hand_added_lines_and_the_setting_to_use():
    from bluegreen.nginx import foreign_directives, foreign_warning, setting_for

    plan, _ = plan_deploy(SETTINGS, make_cfg(), "v2", active="blue", upstream=Upstream("user-api", 8081, TOKEN))
    written = plan.upstream_text()
    assert foreign_directives(written, written) == [] and foreign_directives(None, written) == []
    edited = written.replace("    keepalive 16;\n", "    keepalive 32;\n    least_conn;\n").replace(
        "8082;", "8082 weight=5;")
    assert foreign_directives(edited, written) == ["server 127.0.0.1:8082 weight=5;", "keepalive 32;", "least_conn;"]
    # The guide's hand-written file: its `keepalive 16;` is what the deploy writes too, so nothing is lost.
    seed = "upstream user-api {\n    server 127.0.0.1:8081;\n    keepalive 16;\n}\n"
    assert foreign_directives(seed, written) == []
    assert foreign_directives(seed.replace("16", "64"), written) == ["keepalive 64;"]
    assert setting_for("keepalive 64;") == "UPSTREAM_KEEPALIVE=64"
    assert setting_for("keepalive_timeout 1m;") == "UPSTREAM_KEEPALIVE_TIMEOUT=60"
    assert setting_for("server 127.0.0.1:8081 max_fails=3 fail_timeout=30s;") == \
        "UPSTREAM_MAX_FAILS=3 and UPSTREAM_FAIL_TIMEOUT=30"
    (warning,) = foreign_warning(["keepalive 64;"], "/x/user-api-upstream.conf", "user-api.env", known={"UPSTREAM_KEEPALIVE"})
    assert "has `keepalive 64;`, which bluegreen did not write" in warning and "UPSTREAM_KEEPALIVE=64 in user-api.env" in warning
    # A setting the env file does not know yet is never suggested (it would only reach the app as environment).
    (warning,) = foreign_warning(["keepalive 64;"], "/x/user-api-upstream.conf", "user-api.env", known=set())
    assert "UPSTREAM_KEEPALIVE" not in warning and "no bluegreen setting writes it" in warning


def test_a_file_a_deploy_wrote_is_not_foreign_after_a_setting_changed():
    from bluegreen.nginx import UpstreamOptions, foreign_directives

    old = render_upstream(name="api", port=8081, project="api", colour="blue", tag="v1", token=TOKEN,
                          options=UpstreamOptions(keepalive=16))
    new = render_upstream(name="api", port=8082, project="api", colour="green", tag="v2", token=TOKEN,
                          options=UpstreamOptions(keepalive=64))
    assert foreign_directives(old, new) == []
    assert foreign_directives(old.replace("keepalive 16;", "keepalive 32;"), new) == ["keepalive 32;"]


def test_plan_deploy_warns_about_foreign_lines_and_ports_in_the_ephemeral_range():
    seed = "upstream user-api {\n    server 127.0.0.1:8081;\n    keepalive 32;\n}\n"
    _, warnings = plan_deploy(SETTINGS, make_cfg(), "v2", active="blue", upstream=parse_upstream(seed),
                              upstream_text=seed, ephemeral=(32768, 60999))
    assert len(warnings) == 1 and "has `keepalive 32;`, which bluegreen did not write" in warnings[0]
    _, warnings = plan_deploy(SETTINGS, make_cfg(), "v2", active="blue", upstream=parse_upstream(seed),
                              ephemeral=(8000, 8081))
    assert len(warnings) == 1 and warnings[0].startswith("BLUE_PORT=8081 in ") and "ip_local_reserved_ports=8081" in warnings[0]


def test_foreign_lines_are_shown_bounded_and_without_control_characters():
    from bluegreen.nginx import foreign_directives

    text = "upstream a {\n    server 127.0.0.1:8081;\n    \x1b[2Jevil" + "x" * 5000 + ";\n" + "    y;\n" * 100 + "}\n"
    found = foreign_directives(text, "")
    assert len(found) == 20 and found[0].startswith("?[2Jevil") and len(found[0]) == 200
    assert all(c.isprintable() for line in found for c in line)


def test_upstream_settings_from_the_env_file_reach_the_upstream_file():
    plan, _ = plan_deploy(SETTINGS, make_cfg("UPSTREAM_KEEPALIVE=0\nUPSTREAM_MAX_FAILS=3\nUPSTREAM_FAIL_TIMEOUT=30\n"),
                          "v2", active="blue", upstream=Upstream("user-api", 8081, TOKEN))
    assert "    server 127.0.0.1:8082 max_fails=3 fail_timeout=30s;\n}\n" in plan.upstream_text()
    plan, _ = plan_deploy(SETTINGS, make_cfg("UPSTREAM_KEEPALIVE=32\nUPSTREAM_KEEPALIVE_TIMEOUT=60\n"),
                          "v2", active="blue", upstream=Upstream("user-api", 8081, TOKEN))
    assert "    keepalive 32;\n    keepalive_timeout 60s;\n" in plan.upstream_text()


def test_dry_run_plan_shows_what_the_pull_policy_will_run():
    from dataclasses import replace

    for policy, says in (("always", "docker pull ghcr.io/acme/user-api:v1"),
                         ("missing", "only if this host lacks it (PULL=missing)"),
                         ("never", "no pull at all: the image must be on this host (PULL=never)")):
        plan, _ = plan_deploy(SETTINGS, replace(make_cfg(), pull=policy), "v1", active=None, upstream=None,
                              token_factory=lambda: TOKEN)
        first = plan.describe()[0]
        assert says in first, first
        if policy != "always":
            assert "docker image inspect" in first


def test_dry_run_plan_shows_the_canary_steps_before_the_switch_and_the_watch_after_it():
    plan, _ = plan_deploy(SETTINGS, make_cfg("CANARY_STEPS=10,50\nCANARY_STEP_SECONDS=20\nWATCH_SECONDS=60\n"),
                          "v2", active="blue", upstream=Upstream("user-api", 8081, TOKEN))
    lines = plan.describe()
    heads = [line.split()[1] for line in lines if line.startswith("[4/6]")]
    assert heads == ["switch", "canary", "switch", "canary", "switch", "watch"], lines
    text = "\n".join(lines)
    assert "10% of requests (weight) to 127.0.0.1:8082, the rest to 127.0.0.1:8081" in text
    assert "20s: at most 5% 5xx (judged from 20 requests, or 3 on strong evidence)" in text  # 10% of 20, at least 3
    assert "(judged from 20 requests, or 10 on strong evidence)" in text  # the 50% step
    assert "60s of real traffic to 127.0.0.1:8082: at most 5% 5xx (judged from 20 requests)" in text
    assert "a failure switches back to 127.0.0.1:8081 (user-api-blue, kept running)" in text
    assert text.count("access_log ... bluegreen_watch_user_api") == 1 and "else no canary and no watch" in text
    # No watch configured: the plan is as before; nothing serving: nothing to switch back to, said once.
    plain, _ = plan_deploy(SETTINGS, make_cfg(), "v2", active="blue", upstream=Upstream("user-api", 8081, TOKEN))
    assert not [line for line in plain.describe() if "canary" in line or "watch" in line]
    first, _ = plan_deploy(SETTINGS, make_cfg("WATCH_SECONDS=60\n"), "v1", active=None, upstream=None)
    assert [line for line in first.describe() if "[4/6] watch" in line] == [
        "[4/6] watch   none: WATCH_SECONDS/CANARY_STEPS are set, but no container of this project serves now, so "
        "there is nothing to switch back to (the switch is at once)"]
