"""Pure tests of issue 10's "truth about the service": status's verdict on the path a client takes, doctor's
serving and registry items, the deploy's preflight and what a failure message may claim serves."""

from __future__ import annotations

import io

import pytest

from bluegreen import doctor, status
from bluegreen.config import load_project, load_settings
from bluegreen.deploy import Deployer, Progress, read_plan
from bluegreen.errors import DeployFailed, UsageError
from bluegreen.health import Probe
from bluegreen.runner import RecordingRunner, Result
from test_deploy_logic import FakeHost


@pytest.fixture
def cfg(tmp_path):
    (tmp_path / "projects").mkdir()
    (tmp_path / "projects" / "api.env").write_text("IMAGE=reg.local/acme/api\n")
    settings = load_settings(str(tmp_path), {}, euid=0)
    return load_project(settings, "api")


def colours(blue: str, green: str, healthy=True):
    return [status.ColourState("blue", "api-blue", 8081, blue, "v1", None, "HTTP 200" if blue == "running" else None,
                               healthy if blue == "running" else None),
            status.ColourState("green", "api-green", 8082, green, "v2")]


UP = status.NginxState(True, 42, "/run/nginx.pid")
NGINX_DOWN = status.NginxState(False, None, "/run/nginx.pid")
ANSWERED = Probe(200, "HTTP 200", {"X-Bluegreen-Upstream": "127.0.0.1:8081"})


def test_ok_only_when_every_step_of_the_client_path_holds(cfg):
    verdict, checks = status.judge(cfg, nginx=UP, answer=ANSWERED, nginx_route=8081, serving="blue",
                                   colours=colours("running", "exited"), drift=[])
    assert verdict == status.OK and all(c.ok for c in checks)
    assert [c.name for c in checks] == ["nginx", "through nginx", "route", "container", "health"]


def test_nginx_down_is_down_even_when_the_container_is_healthy(cfg):
    refused = Probe(None, "connection refused")
    verdict, checks = status.judge(cfg, nginx=NGINX_DOWN, answer=refused, nginx_route=None, serving="blue",
                                   colours=colours("running", "exited"), drift=[])
    assert verdict == status.DOWN
    assert status.first_failed(checks).name == "nginx" and "systemctl start nginx" in status.first_failed(checks).fix


def test_a_stopped_serving_container_is_down_and_named_before_the_502(cfg):
    verdict, checks = status.judge(cfg, nginx=UP, answer=Probe(502, "HTTP 502"), nginx_route=None, serving="blue",
                                   colours=colours("exited", "exited"), drift=[])
    assert verdict == status.DOWN
    cause = status.first_failed(checks)
    assert (cause.name, cause.detail, cause.fix) == ("container", "api-blue is exited", "docker start api-blue")


def test_unproven_route_or_drift_is_degraded_not_ok(cfg):
    plain = Probe(200, "HTTP 200", {})
    verdict, checks = status.judge(cfg, nginx=UP, answer=plain, nginx_route=None, serving="blue",
                                   colours=colours("running", "exited"), drift=[])
    assert verdict == status.DEGRADED and status.first_failed(checks).name == "route"
    verdict, _ = status.judge(cfg, nginx=UP, answer=ANSWERED, nginx_route=8081, serving="blue",
                              colours=colours("running", "running"), drift=[status.Drift("api-green still runs", "x")])
    assert verdict == status.DEGRADED


def test_nothing_serving_is_down(cfg):
    verdict, checks = status.judge(cfg, nginx=UP, answer=Probe(502, "HTTP 502"), nginx_route=None, serving=None,
                                   colours=colours("absent", "absent"), drift=[])
    assert verdict == status.DOWN


def test_doctor_serving_item_follows_the_verdict():
    base = dict(project="api", serving="blue", active_file="blue", upstream_port=8081, tag="v1", digest=None,
                colours=colours("exited", "absent"))
    down = status.ProjectStatus(**base, verdict=status.DOWN,
                                checks=[status.Check("container", False, "api-blue is exited", "docker start api-blue")])
    item = doctor.judge_serving(down)
    assert item.status == doctor.FAIL and "the service is down: api-blue is exited" in item.detail
    assert item.fix == "docker start api-blue"
    fresh = status.ProjectStatus(**{**base, "serving": None, "colours": colours("absent", "absent")}, verdict=status.DOWN)
    assert doctor.judge_serving(fresh).status == doctor.OK  # before the first deploy: nothing to serve yet


@pytest.mark.parametrize("registry, url", [
    ("127.0.0.1:5000", "http://127.0.0.1:5000/v2/"),
    ("localhost:5000", "http://localhost:5000/v2/"),
    ("ghcr.io", "https://ghcr.io/v2/"),
    ("docker.io", "https://registry-1.docker.io/v2/"),
])
def test_registry_url_uses_the_scheme_docker_would(registry, url):
    assert doctor.registry_url(registry) == url


def test_an_open_registry_needs_no_login_and_one_that_asks_does():
    assert doctor.judge_credentials("127.0.0.1:5000/a", {}, "c", True, "HTTP 200").status == doctor.OK
    asks = doctor.judge_credentials("127.0.0.1:5000/a", {}, "c", False, "HTTP 401")
    assert asks.status == doctor.WARN and "asks for credentials" in asks.detail and "docker login 127.0.0.1:5000" in asks.fix
    assert doctor.judge_credentials("ghcr.io/a", None, "c", None, "").status == doctor.WARN  # unknown: as before


# -- the deploy: preflight and what a failure message may claim ------------------------------------------

@pytest.fixture
def host(tmp_path):
    (tmp_path / "projects").mkdir()
    (tmp_path / "projects" / "api.env").write_text("IMAGE=reg.local/acme/api\n")
    pid = tmp_path / "nginx.pid"
    settings = load_settings(str(tmp_path), {"BLUEGREEN_NGINX_PID_FILE": str(pid)}, euid=0)
    fake = FakeHost()
    fake.add("api-blue", "v1")
    (tmp_path / "nginx" / "conf.d").mkdir(parents=True)
    (tmp_path / "nginx" / "conf.d" / "api-upstream.conf").write_text("upstream api {\n    server 127.0.0.1:8081;\n}\n")
    dump = {"text": f"http {{\n include {tmp_path}/nginx/conf.d/*.conf;\n}}\n"}

    def respond(argv):
        if argv[-1] == "-T" and "-T" not in fake.fail:
            return Result(tuple(argv), 0, dump["text"], "")
        return fake(argv)

    runner = RecordingRunner(responder=respond)

    class Host:
        pass

    h = Host()
    h.__dict__.update(settings=settings, cfg=load_project(settings, "api"), fake=fake, runner=runner, pid=pid, dump=dump)

    def deploy(tag="v2", seen=None):
        plan, _ = read_plan(settings, h.cfg, tag)
        d = Deployer(settings=settings, runner=runner, progress=Progress(io.StringIO()), port_busy=lambda p: False,
                     seen_before=seen, check_nginx_first=True)
        return d.run(plan)

    h.deploy = deploy
    return h


def pulled(runner) -> bool:
    return any(c[:2] == ("docker", "pull") for c in runner.calls)


def test_preflight_nginx_not_running_fails_before_the_pull(host):
    with pytest.raises(DeployFailed) as exc:
        host.deploy()
    assert "nginx is not running" in exc.value.message and "systemctl start nginx" in exc.value.message
    assert "BLUEGREEN_NGINX_PID_FILE" in exc.value.message and not pulled(host.runner)


def test_preflight_missing_include_points_at_setup(host):
    import os

    host.pid.write_text(f"{os.getpid()}\n")  # a live process stands in for the master
    host.dump["text"] = "http {\n}\n"
    with pytest.raises(UsageError) as exc:
        host.deploy()
    assert "setup`" in exc.value.message and f"include {host.settings.root}/nginx/conf.d/*.conf;" in exc.value.message
    assert exc.value.exit_code == 2 and not pulled(host.runner)


def test_preflight_host_not_found_in_upstream_points_at_setup(host):
    host.fake.fail["-T"] = 'nginx: [emerg] host not found in upstream "api" in /etc/nginx/conf.d/api.conf:4'
    with pytest.raises(UsageError) as exc:
        host.deploy()
    assert "host not found in upstream" in exc.value.message and "setup`" in exc.value.message
    assert not pulled(host.runner)


@pytest.mark.parametrize("seen, says", [
    (Probe(200, "HTTP 200", {"X-Bluegreen-Upstream": "127.0.0.1:8081"}),
     "(v1, container api-blue, 127.0.0.1:8081) still serves: just before this deploy, a probe through nginx was "
     "routed to it and answered HTTP 200."),
    (Probe(500, "HTTP 500", {"X-Bluegreen-Upstream": "127.0.0.1:8081"}),
     "was left as it was: just before this deploy, a probe through nginx was routed to it and answered HTTP 500"),
    (Probe(200, "HTTP 200", {}), "was running and was left as it was; bluegreen did not see it answer through nginx "
                                 "(nginx answered HTTP 200 without saying where it routed)"),
    (None, "was running and was left as it was; bluegreen did not see it answer through nginx."),
])
def test_the_serving_note_says_only_what_was_seen(host, seen, says):
    import os

    host.pid.write_text(f"{os.getpid()}\n")
    host.fake.fail["pull"] = "manifest unknown"
    with pytest.raises(DeployFailed) as exc:
        host.deploy(seen=seen)
    assert says in exc.value.message
    if "still serves" not in says:
        assert "still serves" not in exc.value.message


def test_doctor_pull_policy_item(cfg, tmp_path):
    from dataclasses import replace

    from bluegreen.docker import LocalImage

    env = tmp_path / "projects" / "api.env"
    loaded = LocalImage("sha256:" + "a" * 64)
    assert doctor.judge_pull(replace(cfg, pull="never"), [], env).status == doctor.FAIL
    assert doctor.judge_pull(replace(cfg, pull="always"), [loaded], env).status == doctor.FAIL
    assert doctor.judge_pull(replace(cfg, pull="missing"), [loaded], env).status == doctor.OK
    assert doctor.judge_pull(cfg, None, env).status == doctor.WARN


def test_doctor_flags_two_projects_sharing_one_log_dir(tmp_path):
    env = tmp_path / "a.env"
    shared = doctor.judge_log_dir_shared("a", "/app/logs", {"b": "/app/logs/", "c": "/app/logs/c", "d": None}, env)
    assert shared.status == doctor.WARN and "also the LOG_DIR of b" in shared.detail
    assert shared.fix == f"give a its own directory: LOG_DIR=/app/logs/a in {env}"
    assert doctor.judge_log_dir_shared("a", "/app/logs", {"c": "/app/logs/c"}, env).status == doctor.OK
    assert doctor.judge_log_dir_shared("a", "", {"b": ""}, env).status == doctor.OK


def test_doctor_warns_about_ephemeral_ports_and_hand_added_upstream_lines(tmp_path):
    from bluegreen import doctor, ports
    from bluegreen.config import load_project, load_settings
    from bluegreen.deploy import read_plan

    low, high = ports.ephemeral_range()
    (tmp_path / "projects").mkdir()
    (tmp_path / "projects" / "api.env").write_text(f"IMAGE=reg/x\nBLUE_PORT={low + 10}\nGREEN_PORT={low + 11}\n")
    settings = load_settings(str(tmp_path), {}, euid=0)
    cfg = load_project(settings, "api")
    plan, _ = read_plan(settings, cfg, "v1")
    upstream = settings.upstream_file("api")
    upstream.parent.mkdir(parents=True)
    text = plan.upstream_text()
    head, brace, rest = text.partition("{\n")
    upstream.write_text(head + brace + "    least_conn;\n" + rest)  # a line bluegreen never writes
    checks = doctor.ephemeral_and_foreign_checks(settings, cfg)
    by_name = {c.name: c for c in checks}
    assert by_name["ports"].status == doctor.WARN and f"BLUE_PORT={low + 10}" in by_name["ports"].detail
    assert by_name["upstream"].status == doctor.WARN and "least_conn;" in by_name["upstream"].detail
    upstream.write_text(text)
    (tmp_path / "projects" / "api.env").write_text("IMAGE=reg/x\nBLUE_PORT=8081\nGREEN_PORT=8082\n")
    clean = doctor.ephemeral_and_foreign_checks(settings, load_project(settings, "api"))
    assert [c.status for c in clean] == [doctor.OK]
