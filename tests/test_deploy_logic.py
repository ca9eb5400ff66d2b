"""Deciding-code tests of the deploy's failure table, with a recording runner standing in for docker/nginx.

The real-stack tests (test_stack_deploy.py) prove the same rows against real docker and nginx;
these pin the exact order of commands and the undo of every step, in milliseconds.
"""

from __future__ import annotations

import io
import json

import pytest

from bluegreen.config import load_project, load_settings
from bluegreen.deploy import Deployer, Progress, read_plan
from bluegreen.errors import DeployFailed, Interrupted, NeedsAttention
from bluegreen.health import Probe
from bluegreen.nginx import parse_upstream
from bluegreen.runner import RecordingRunner, Result


class FakeHost:
    """Answers docker/nginx argv like a tiny host: containers by name, nginx -t pass/fail."""

    def __init__(self) -> None:
        self.containers: dict[str, dict] = {}
        self.fail: dict[str, str] = {}  # verb -> stderr
        self.env_files: list[str] = []

    def __call__(self, argv):
        verb = argv[1] if argv[0] == "docker" else " ".join(argv[1:])
        if verb in self.fail:
            # A failing `docker container inspect` still prints "[]" (checked with docker 28.2).
            return Result(tuple(argv), 1, "[]\n" if verb == "container" else "", self.fail[verb])
        if argv[:3] == ("docker", "container", "inspect"):
            # Like docker: the ones that exist on stdout, exit 1 naming each missing one.
            found = [self.containers[n] for n in argv[3:] if n in self.containers]
            missing = [f"Error: No such container: {n}" for n in argv[3:] if n not in self.containers]
            return Result(tuple(argv), 1 if missing else 0, json.dumps(found), "\n".join(missing))
        if verb == "run":
            name = argv[argv.index("--name") + 1]
            tag = [a for a in argv if a.startswith("bluegreen.tag=")][0].split("=", 1)[1]
            if "--env-file" in argv:
                self.env_files.append(argv[argv.index("--env-file") + 1])
            self.add(name, tag)
        if verb == "rm":
            self.containers.pop(argv[-1], None)
        if verb == "stop":
            self.containers[argv[-1]]["State"]["Status"] = "exited"
        return None

    def add(self, name, tag, status="running"):
        self.containers[name] = {"Id": name, "Name": "/" + name, "State": {"Status": status, "ExitCode": 0},
                                 "Config": {"Image": "x", "Labels": {"bluegreen.tag": tag}}}


@pytest.fixture
def env(tmp_path):
    (tmp_path / "projects").mkdir()
    (tmp_path / "projects" / "api.env").write_text("IMAGE=reg.local/acme/api\nHEALTH_TIMEOUT=5\nDB_PASSWORD=s3cret\n")
    # No nginx master here: the drain falls back to its fixed wait, on the fake clock.
    settings = load_settings(str(tmp_path), {"BLUEGREEN_NGINX_PID_FILE": str(tmp_path / "none.pid")}, euid=0)
    cfg = load_project(settings, "api")
    host = FakeHost()
    runner = RecordingRunner(responder=host)
    err = io.StringIO()
    probes = []

    def probe(url, timeout, host="", headers=None):
        probes.append(url)
        if headers:  # the post-switch probe through "nginx": route to what the upstream file says
            upstream = parse_upstream((tmp_path / "nginx" / "conf.d" / "api-upstream.conf").read_text())
            port = env.route_to or upstream.port
            return Probe(200, "HTTP 200", {"X-Bluegreen-Upstream": f"127.0.0.1:{port}"})
        return Probe(200, "HTTP 200") if env.healthy else Probe(503, "HTTP 503")

    class Env:
        pass

    env = Env()
    env.__dict__.update(settings=settings, cfg=cfg, host=host, runner=runner, err=err, probes=probes, healthy=True,
                        root=tmp_path, route_to=None)
    now = [0.0]

    def sleep(s):
        now[0] += s

    def deploy(tag):
        plan, _ = read_plan(settings, cfg, tag)
        d = Deployer(settings=settings, runner=runner, progress=Progress(err), probe=probe,
                     port_busy=lambda p: False, clock=lambda: now[0], sleep=sleep)
        return d.run(plan)

    env.deploy = deploy
    return env


def verbs(runner):
    """The commands run, without the read-only `docker container inspect` queries."""
    out = [" ".join(c[1:3]) if c[0] == "docker" else " ".join(c[1:]) for c in runner.calls]
    return [v for v in out if v != "container inspect"]


def test_first_deploy_runs_the_six_steps_in_order(env):
    summary = env.deploy("v1")
    assert verbs(env.runner) == ["pull reg.local/acme/api:v1", "run --detach", "-T", "-s reload"]
    assert "api v1 now serves from api-blue on 127.0.0.1:8081" in summary
    assert (env.root / "projects" / "api.active").read_text() == "blue\n"
    assert "server 127.0.0.1:8081;" in (env.root / "nginx" / "conf.d" / "api-upstream.conf").read_text()
    # The secrets reach docker through its stdin (a pipe), never through a file that could outlive us.
    assert env.host.env_files == ["/dev/stdin"]
    run_index = next(i for i, c in enumerate(env.runner.calls) if c[1] == "run")
    assert env.runner.inputs == {run_index: b"DB_PASSWORD=s3cret\n"}
    assert not any("s3cret" in a for call in env.runner.calls for a in call)
    steps = [ln.split()[:2] for ln in env.err.getvalue().splitlines() if ln.startswith("[")]
    assert steps == [["[1/6]", "pull"], ["[2/6]", "start"], ["[3/6]", "health"], ["[4/6]", "switch"],
                     ["[4/6]", "drain"], ["[4/6]", "verify"], ["[5/6]", "retire"], ["[6/6]", "record"]]


def test_second_deploy_goes_green_and_stops_blue_last(env):
    env.deploy("v1")
    env.runner.calls.clear()
    summary = env.deploy("v2")
    assert verbs(env.runner) == ["pull reg.local/acme/api:v2", "run --detach", "-T", "-s reload", "stop --time"]
    assert env.runner.calls[-1][-1] == "api-blue"
    # One docker query in all: both colours at once, before the pull (a quick app needs no liveness check).
    assert [c for c in env.runner.calls if c[1] == "container"] == [("docker", "container", "inspect", "api-blue", "api-green")]
    assert env.runner.calls[0][1] == "container"
    assert "from api-green" in summary and "(was v1 in api-blue)" in summary
    assert (env.root / "projects" / "api.active").read_text() == "green\n"


def test_pull_failure_changes_nothing(env):
    env.deploy("v1")
    upstream_before = (env.root / "nginx" / "conf.d" / "api-upstream.conf").read_text()
    env.host.fail["pull"] = "manifest unknown"
    env.runner.calls.clear()
    with pytest.raises(DeployFailed) as exc:
        env.deploy("nope")
    assert verbs(env.runner) == ["pull reg.local/acme/api:nope"]
    assert "manifest unknown" in exc.value.message and "(v1, container api-blue, 127.0.0.1:8081) was running and was left as it was; bluegreen did not see it answer through nginx" in exc.value.message
    assert (env.root / "nginx" / "conf.d" / "api-upstream.conf").read_text() == upstream_before


def test_unhealthy_new_container_is_removed_and_nginx_untouched(env):
    env.deploy("v1")
    env.healthy = False
    env.runner.calls.clear()
    with pytest.raises(DeployFailed) as exc:
        env.deploy("v2")
    assert verbs(env.runner) == ["pull reg.local/acme/api:v2", "run --detach", "logs --tail", "rm --force"]
    assert "did not answer HTTP 200" in exc.value.message and "last answer: HTTP 503" in exc.value.message
    assert "api-green" not in env.host.containers and env.host.containers["api-blue"]["State"]["Status"] == "running"
    assert (env.root / "projects" / "api.active").read_text() == "blue\n"


def test_nginx_test_failure_restores_the_upstream_file(env):
    env.deploy("v1")
    path = env.root / "nginx" / "conf.d" / "api-upstream.conf"
    before = path.read_text()
    env.host.fail["-T"] = 'nginx: [emerg] unknown directive "oops" in /etc/nginx/conf.d/x.conf:1\nnginx: configuration file test failed'
    with pytest.raises(DeployFailed) as exc:
        env.deploy("v2")
    assert 'unknown directive "oops"' in exc.value.message and "test failed" not in exc.value.message
    assert path.read_text() == before
    assert "api-green" not in env.host.containers
    assert "reload" not in verbs(env.runner)[-2:]


def test_nginx_test_failure_on_first_deploy_removes_the_new_upstream_file(env):
    env.host.fail["-T"] = "nginx: [emerg] broken"
    with pytest.raises(DeployFailed) as exc:
        env.deploy("v1")
    assert "Nothing was serving before" in exc.value.message
    assert not (env.root / "nginx" / "conf.d" / "api-upstream.conf").exists()


def test_failed_undo_escalates_to_needs_attention(env):
    env.deploy("v1")
    env.healthy = False
    env.host.fail["rm"] = "daemon not responding"
    with pytest.raises(NeedsAttention) as exc:
        env.deploy("v2")
    assert exc.value.exit_code == 4 and "putting things back failed too" in exc.value.message


def test_interrupt_during_health_check_undoes(env, monkeypatch):
    env.deploy("v1")

    def interrupted(*a, **k):
        raise Interrupted("SIGTERM")

    monkeypatch.setattr("bluegreen.health.wait_healthy", interrupted)
    with pytest.raises(DeployFailed) as exc:
        env.deploy("v2")
    assert "interrupted by SIGTERM" in exc.value.message and "api-green" not in env.host.containers


def test_stop_failure_after_switch_needs_attention(env):
    env.deploy("v1")
    env.host.fail["stop"] = "permission denied"
    with pytest.raises(NeedsAttention) as exc:
        env.deploy("v2")
    msg = exc.value.message
    assert msg.startswith("api v2 now serves from api-green") and "docker stop api-blue" in msg


def test_route_elsewhere_after_the_switch_reverts(env):
    env.deploy("v1")
    path = env.root / "nginx" / "conf.d" / "api-upstream.conf"
    before = path.read_text()
    env.route_to = 8081  # nginx keeps sending traffic to blue whatever the upstream says
    env.runner.calls.clear()
    with pytest.raises(DeployFailed) as exc:
        env.deploy("v2")
    assert "was routed to 127.0.0.1:8081 instead of reaching api-green" in exc.value.message
    assert "(v1, container api-blue, 127.0.0.1:8081) was running and was left as it was; bluegreen did not see it answer through nginx" in exc.value.message
    assert path.read_text() == before
    assert verbs(env.runner) == ["pull reg.local/acme/api:v2", "run --detach", "-T", "-s reload", "-T", "-s reload", "rm --force"]
    assert "api-green" not in env.host.containers


def test_first_deploy_keeps_an_unproven_route_with_a_warning(env):
    env.route_to = 9999
    summary = env.deploy("v1")
    assert "now serves from api-blue" in summary
    assert "Nothing served before, so the deploy stands" in env.err.getvalue()


def test_drain_waits_for_real_child_processes(env):
    import os
    import subprocess
    import time

    from bluegreen.deploy import Deployer, Progress
    from bluegreen.nginx import children

    kids = [subprocess.Popen(["sleep", "0.4"]) for _ in range(2)]
    try:
        workers = children(os.getpid()) & {k.pid for k in kids}
        assert len(workers) == 2
        d = Deployer(settings=env.settings, runner=env.runner, progress=Progress(env.err))
        start = time.monotonic()
        # Reap in the background so the exited children do not linger as zombies of ours.
        import threading
        for k in kids:
            threading.Thread(target=k.wait, daemon=True).start()
        drained, waited = d._wait_for_workers(os.getpid(), workers, timeout=5)
        assert drained and 0.3 < time.monotonic() - start < 3
        kids2 = [subprocess.Popen(["sleep", "5"])]
        drained, waited = d._wait_for_workers(os.getpid(), {kids2[0].pid}, timeout=0.3)
        assert not drained and waited == pytest.approx(0.3, abs=0.2)
        kids += kids2
    finally:
        for k in kids:
            k.kill()
            k.wait()


def test_reload_failure_restores_the_file_and_the_retry_failing_too_is_not_an_alarm(env):
    env.deploy("v1")
    path = env.root / "nginx" / "conf.d" / "api-upstream.conf"
    before = path.read_text()
    env.host.fail["-s reload"] = 'nginx: [error] open() "/run/nginx.pid" failed (2: No such file or directory)'
    env.runner.calls.clear()
    with pytest.raises(DeployFailed) as exc:
        env.deploy("v2")
    assert exc.value.exit_code == 1 and "`nginx -s reload` failed" in exc.value.message
    assert path.read_text() == before
    # The undo tries the reload again (it may have reached the master); its failure is no alarm.
    assert verbs(env.runner) == ["pull reg.local/acme/api:v2", "run --detach", "-T", "-s reload", "-T", "-s reload", "rm --force"]


def test_docker_daemon_down_before_anything_changes(env):
    env.deploy("v1")
    env.host.fail["container"] = "Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker daemon running?"
    env.runner.calls.clear()
    with pytest.raises(DeployFailed) as exc:
        env.deploy("v2")
    assert "Cannot connect to the Docker daemon" in exc.value.message and "Nothing was changed" in exc.value.message
    assert verbs(env.runner) == []


def test_after_a_port_change_a_running_container_nginx_may_use_is_never_removed(env):
    env.deploy("v1")  # blue serves on 8081
    (env.root / "projects" / "api.env").write_text("IMAGE=reg.local/acme/api\nBLUE_PORT=9081\nGREEN_PORT=9082\n")
    from bluegreen.config import load_project
    from bluegreen.errors import UsageError

    cfg = load_project(env.settings, "api")
    plan, warnings = read_plan(env.settings, cfg, "v2")
    assert plan.current is None and plan.target == "blue" and plan.routed_port == 8081
    env.runner.calls.clear()
    d = Deployer(settings=env.settings, runner=env.runner, progress=Progress(env.err), port_busy=lambda p: False)
    with pytest.raises(UsageError) as exc:
        d.run(plan)
    assert exc.value.exit_code == 2 and "change one colour's port at a time" in exc.value.message
    assert env.host.containers["api-blue"]["State"]["Status"] == "running"
    assert verbs(env.runner) == []  # refused before even the pull


def test_a_hook_that_cannot_execute_is_reported_not_raised(tmp_path):
    from bluegreen import hooks
    from bluegreen.runner import SubprocessRunner

    bad = tmp_path / "post-deploy"
    bad.write_text("#!/nonexistent/interpreter\n")
    bad.chmod(0o755)
    result = hooks.run(SubprocessRunner(), bad, {}, timeout=5)
    assert result.returncode == 126 and "could not be executed" in result.stderr
    no_shebang = tmp_path / "on-failure"
    no_shebang.write_bytes(b"\x7fELF garbage")
    no_shebang.chmod(0o755)
    assert hooks.run(SubprocessRunner(), no_shebang, {}, timeout=5).returncode == 126


@pytest.mark.parametrize("stdout,stderr,expect", [
    ("[]\n", "Error: No such container: a-blue\nError: No such container: a-green", set()),
    (json.dumps([{"Name": "/a-blue", "State": {"Status": "running"}, "Config": {}}]), "Error: No such container: a-green",
     {"a-blue"}),
    # What docker prints when it cannot reach the daemon: "[]" and exit 1. That is not "absent".
    ("[]\n", "Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker daemon running?", None),
    ("[]\n", "", None),
    ("not json", "Error: No such container: a-green", None),
])
def test_inspect_many_tells_absent_from_docker_failing(stdout, stderr, expect):
    from bluegreen.docker import Docker
    from bluegreen.errors import CommandError

    runner = RecordingRunner(responder=lambda argv: Result(tuple(argv), 1, stdout, stderr))
    docker = Docker(runner, ["docker"])
    if expect is None:
        with pytest.raises(CommandError):
            docker.inspect_many(["a-blue", "a-green"])
    else:
        assert set(docker.inspect_many(["a-blue", "a-green"])) == expect


def test_upstream_restore_is_registered_before_the_write(env, monkeypatch):
    """A signal that lands inside the write (after the rename) still gets the previous upstream back."""
    env.deploy("v1")
    path = env.root / "nginx" / "conf.d" / "api-upstream.conf"
    before = path.read_text()
    from bluegreen import safefs

    real_write = safefs.atomic_write
    calls = []

    def write_then_interrupt(p, data, **kw):
        real_write(p, data, **kw)
        calls.append(str(p))
        if len(calls) == 1 and str(p) == str(path):
            raise Interrupted("SIGTERM")  # the new file is in place, the write has not returned yet

    monkeypatch.setattr(safefs, "atomic_write", write_then_interrupt)
    with pytest.raises(DeployFailed) as exc:
        env.deploy("v2")
    assert "interrupted by SIGTERM" in exc.value.message
    assert path.read_text() == before  # blue's upstream, not green's
    assert "api-green" not in env.host.containers


def test_undo_after_a_signal_waits_only_for_new_workers_and_briefly(env, monkeypatch):
    """SIGTERM during the drain: the undo does not wait again for the old workers (they route to the kept
    container), and gives the new ones a bounded grace, so it ends well inside a CI's kill grace."""
    from bluegreen import deploy as dp

    env.deploy("v1")
    old, new = {101, 102}, {201}
    dumps = iter([(1, set(old)), (1, old | new)])  # at the forward reload, then in the undo
    monkeypatch.setattr(dp.Deployer, "_master_and_workers", lambda self, dump: next(dumps))
    waited_for = []
    drain_calls = [0]

    def wait_for_workers(self, master, workers, timeout):
        waited_for.append((set(workers), timeout))
        drain_calls[0] += 1
        if drain_calls[0] == 1:  # the forward drain: the signal arrives while it waits
            raise Interrupted("SIGTERM")
        return False, timeout

    monkeypatch.setattr(dp.Deployer, "_wait_for_workers", wait_for_workers)
    with pytest.raises(DeployFailed) as exc:
        env.deploy("v2")
    assert "interrupted by SIGTERM" in exc.value.message
    assert waited_for[0] == (old, env.cfg.drain_timeout)
    assert waited_for[1] == (new, dp.UNDO_DRAIN_ON_INTERRUPT)  # not the old workers, not DRAIN_TIMEOUT=60
    assert dp.UNDO_DRAIN_ON_INTERRUPT <= 5
    assert "api-green" not in env.host.containers


def test_undo_after_a_failed_verify_waits_the_full_drain_for_new_workers(env, monkeypatch):
    from bluegreen import deploy as dp

    env.deploy("v1")
    old, new = {101}, {201, 202}
    dumps = iter([(1, set(old)), (1, old | new)])
    monkeypatch.setattr(dp.Deployer, "_master_and_workers", lambda self, dump: next(dumps))
    waited_for = []
    monkeypatch.setattr(dp.Deployer, "_wait_for_workers",
                        lambda self, master, workers, timeout: waited_for.append((set(workers), timeout)) or (True, 0.0))
    env.route_to = 8081  # verify fails: nginx still routes to blue
    with pytest.raises(DeployFailed):
        env.deploy("v2")
    assert waited_for[-1] == (new, env.cfg.drain_timeout)


def test_a_route_header_the_app_sends_itself_proves_nothing():
    from bluegreen.deploy import _header
    from bluegreen.nginx import route_port

    spoofed = Probe(200, "HTTP 200", {"x-bluegreen-upstream": "127.0.0.1:8082", "X-Bluegreen-Upstream": "127.0.0.1:8081"})
    assert _header(spoofed, "X-Bluegreen-Upstream") == ""
    assert _header(Probe(200, "HTTP 200", {"X-Bluegreen-Upstream": "127.0.0.1:8081"}), "X-Bluegreen-Upstream") == "127.0.0.1:8081"
    assert route_port("127.0.0.1:8081") == 8081
    assert route_port("127.0.0.1:8081, 127.0.0.1:8082") is None and route_port("user-api") is None
    assert route_port("127.0.0.1:99999") is None and route_port("") is None


def test_a_process_whose_name_is_not_utf8_never_breaks_the_drain(tmp_path):
    """Any local user can name a process with bytes that are not UTF-8 (the executable's file name). /proc/PID/stat
    then holds them, and reading it as text made every deploy fail at the switch (exit 4)."""
    import os
    import shutil
    import subprocess

    from bluegreen.nginx import alive, children, parent_pid

    odd = os.path.join(os.fsencode(str(tmp_path)), b"zz)\xff\xfe x")
    shutil.copy("/bin/sleep", odd)
    os.chmod(odd, 0o755)
    kid = subprocess.Popen([odd, "30"])
    try:
        assert kid.pid in children(os.getpid())
        assert alive({kid.pid}, os.getpid()) == {kid.pid}
        assert parent_pid(kid.pid) == os.getpid()
    finally:
        kid.kill()
        kid.wait()
    assert parent_pid(kid.pid) is None


def test_a_failed_undo_of_the_switch_keeps_the_new_container_nginx_may_route_to(env, monkeypatch):
    """SIGTERM during verify, and then the undo cannot route nginx back (`nginx -T` fails): nginx may still
    route to the new container, so it must stay (it was removed, and clients got 502s)."""
    from bluegreen import deploy as dp

    env.deploy("v1")

    def verify_then_signal(self, plan, serving, drained):
        env.host.fail["-T"] = "nginx: [emerg] open() \"/etc/nginx/x.conf\" failed (24: Too many open files)"
        raise Interrupted("SIGTERM")

    monkeypatch.setattr(dp.Deployer, "_verify", verify_then_signal)
    with pytest.raises(NeedsAttention) as exc:
        env.deploy("v2")
    assert exc.value.exit_code == 4
    assert "kept api-green running" in exc.value.message and "nginx may route to it" in exc.value.message
    assert env.host.containers["api-green"]["State"]["Status"] == "running"
    assert env.host.containers["api-blue"]["State"]["Status"] == "running"


def test_a_successful_undo_of_the_switch_removes_the_new_container(env, monkeypatch):
    from bluegreen import deploy as dp

    env.deploy("v1")
    monkeypatch.setattr(dp.Deployer, "_verify", lambda self, plan, serving, drained: (_ for _ in ()).throw(Interrupted("SIGTERM")))
    with pytest.raises(DeployFailed):
        env.deploy("v2")
    assert "api-green" not in env.host.containers


def test_a_route_header_that_comes_without_the_token_is_the_apps_and_proves_nothing():
    from bluegreen.config import project_from_entries, parse_env
    from bluegreen.deploy import observe_route
    from bluegreen.nginx import Upstream

    cfg = project_from_entries("api", "api.env", parse_env("IMAGE=reg/acme/api\n", "api.env"))
    upstream = Upstream("api", 8081, "f" * 32)

    def honest(url, timeout, host="", headers=None):  # nginx's map answers only to the token
        return Probe(200, "HTTP 200", {"X-Bluegreen-Upstream": "127.0.0.1:8081"} if headers else {})

    def spoofing(url, timeout, host="", headers=None):  # the app sends the header on every answer
        return Probe(200, "HTTP 200", {"X-Bluegreen-Upstream": "127.0.0.1:8082"})

    assert observe_route(cfg, upstream, honest) == 8081
    assert observe_route(cfg, upstream, spoofing) is None
    assert observe_route(cfg, Upstream("api", 8081, ""), honest) is None  # no token yet: nothing to ask with


def test_a_link_planted_while_the_deploy_runs_is_a_failed_deploy_or_attention_not_a_refusal(env, monkeypatch):
    import os

    from bluegreen import safefs

    env.deploy("v1")
    decoy = env.root / "decoy"
    decoy.write_text("x\n")
    active = env.root / "projects" / "api.active"
    real_write = safefs.atomic_write

    def plant_then_write(path, data, **kw):  # the active file becomes a symlink just before it is recorded
        if str(path) == str(active):
            os.unlink(active)
            os.symlink(decoy, active)
            raise safefs.UnsafePath(active, "a symlink (to %s)" % decoy)
        return real_write(path, data, **kw)

    monkeypatch.setattr(safefs, "atomic_write", plant_then_write)
    with pytest.raises(NeedsAttention) as exc:
        env.deploy("v2")
    assert exc.value.exit_code == 4 and "api v2 now serves from api-green" in exc.value.message
    assert decoy.read_text() == "x\n"
