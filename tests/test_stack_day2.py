"""Real-stack tests of the day-2 commands: status, history, rollback, prune, lock, logs, notifications, hooks."""

from __future__ import annotations

import http.server
import json
import threading
import time
from pathlib import Path

import stack as stacklib
from test_stack_deploy import deploy_ok, inspect, serving


def status_json(project, check=True) -> dict:
    proc = project.run("status", project.name, "--json", check=check)
    (item,) = json.loads(proc.stdout)
    return item


def test_status_reports_serving_version_and_no_drift(project):
    project.write_env()
    deploy_ok(project, "v1")
    project.serve()
    deploy_ok(project, "v2")
    item = status_json(project)
    assert (item["serving"], item["tag"], item["active_file"], item["upstream_port"]) == ("green", "v2", "green", project.green_port)
    assert item["digest"].startswith("sha256:")
    states = {c["colour"]: (c["state"], c["tag"], c["healthy"]) for c in item["colours"]}
    assert states == {"blue": ("exited", "v1", None), "green": ("running", "v2", True)}
    assert item["drift"] == [] and item["lock"] is None and item["freeze"] is None
    assert item["last_deploy"]["result"] == "deployed" and item["last_deploy"]["tag"] == "v2"
    text = project.run("status", project.name, check=True).stdout
    assert "no drift" in text and f"{project.name}-green 127.0.0.1:{project.green_port} running, health HTTP 200" in text
    overview = project.run("status", check=True).stdout
    line = [ln for ln in overview.splitlines() if ln.startswith(project.name)]
    assert line and f"green :{project.green_port} v2" in line[0] and line[0].endswith("ok")


def test_status_names_drift_and_the_fix(project):
    project.write_env()
    deploy_ok(project, "v1")
    project.serve()
    deploy_ok(project, "v2")
    # Someone points the upstream file back at blue by hand and does not reload nginx: nginx still routes
    # to green, which runs. The service is up; what is wrong is the file (a reload would take it down).
    # (Before, status trusted the file and said "the service is down".)
    upstream = Path(project.upstream_file)
    upstream.write_text(upstream.read_text().replace(f"127.0.0.1:{project.green_port}", f"127.0.0.1:{project.blue_port}"))
    item = status_json(project, check=1)  # degraded: exit 1 (docs/exit-codes.md)
    assert item["serving"] == "green" and item["nginx_route"] == project.green_port and item["tag"] == "v2"
    problems = {d["problem"]: d["fix"] for d in item["drift"]}
    assert not any("service is down" in p for p in problems), problems
    pending = [p for p in problems if f"nginx routes to {project.name}-green (127.0.0.1:{project.green_port}, seen "
               f"through nginx), but the upstream file routes to 127.0.0.1:{project.blue_port}: nginx has not loaded" in p]
    assert pending and f"would switch traffic to {project.name}-blue, which is exited" in pending[0], problems
    # The fix names the command the way it was run (here `python3 …/bluegreen.pyz`; `bluegreen` through the launcher).
    assert problems[pending[0]].startswith(f"python3 {project.stack.pyz} deploy {project.name} <tag>")
    overview = project.run("status", check=1).stdout
    assert "problem(s)" in [ln for ln in overview.splitlines() if ln.startswith(project.name)][0]

    # Restore the file, then stop the serving container.
    upstream.write_text(upstream.read_text().replace(f"127.0.0.1:{project.blue_port}", f"127.0.0.1:{project.green_port}"))
    stacklib.docker("stop", "-t", "1", f"{project.name}-green")
    item = status_json(project, check=1)  # down: exit 1
    assert [d["fix"] for d in item["drift"]] == [f"docker start {project.name}-green"]


def test_history_lists_every_attempt_newest_first_and_survives_a_torn_line(project):
    project.write_env(HEALTH_TIMEOUT="2")
    deploy_ok(project, "v1")
    project.serve()
    project.run(project.name, "unhealthy", check=1)
    project.run("lock", project.name, "-m", "db migration", check=True)
    project.run(project.name, "v2", check=3)
    project.run("unlock", project.name, check=True)
    journal = Path(project.env_file).with_suffix(".journal")
    with journal.open("a") as fh:
        fh.write('{"time": "2026-11-26T00:00:00+00:00", "proj')  # a crash mid-write
    proc = project.run("history", project.name, "--json", check=True)
    entries = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(e["tag"], e["result"], e["exit_code"]) for e in entries] == [
        ("v2", "refused", 3), ("unhealthy", "failed", 1), ("v1", "deployed", 0)]
    failed = entries[1]
    assert failed["failed_step"] == "health" and failed["from_colour"] == "blue" and failed["to_colour"] == "green"
    assert set(entries[2]["steps"]) >= {"pull", "start", "health", "switch", "drain", "verify", "retire", "record"}
    assert entries[2]["digest"].startswith("sha256:") and entries[2]["user"] and entries[2]["host"]
    text = project.run("history", project.name, "-n", "2", check=True).stdout
    assert text.splitlines()[0].split()[2] == "v2" and "frozen by" in text and "v1" not in text


def test_rollback_after_a_good_deploy_and_after_a_failed_one(project):
    project.write_env(HEALTH_TIMEOUT="2")
    deploy_ok(project, "v1")
    project.serve()
    nothing = project.run("rollback", project.name, check=2)
    assert "Nothing to roll back to" in nothing.stderr and "only v1, which is what serves now" in nothing.stderr
    deploy_ok(project, "v2")
    back = project.run("rollback", project.name, check=True)
    assert f"Rolling back {project.name} from v2 to v1" in back.stderr
    assert serving(project) == "v1"
    # A failed deploy leaves v1 serving; rolling back then goes to the deploy before v1's.
    deploy_ok(project, "v3")
    project.run(project.name, "unhealthy", check=1)
    assert serving(project) == "v3"
    back = project.run("rollback", project.name, check=True)
    assert "from v3 to v1" in back.stderr and serving(project) == "v1"
    explicit = project.run("rollback", project.name, "--to", "v2", check=True)
    assert "to v2" in explicit.stderr and serving(project) == "v2"
    history = project.run("history", project.name, "--json", check=True).stdout.splitlines()
    assert json.loads(history[0])["action"] == "rollback"


def test_prune_keeps_exactly_the_serving_tag_and_the_rollback_targets(project):
    repo = f"{project.stack.registry.open_addr}/bg/prune-{project.name}"
    for tag in ("v1", "v2", "v3", "v4"):
        stacklib.docker("tag", project.stack.images["v1"], f"{repo}:{tag}")
        stacklib.push_image(f"{repo}:{tag}")
    try:
        project.write_env(IMAGE=repo)
        deploy_ok(project, "v1")
        project.serve()
        for tag in ("v2", "v3", "v4"):
            deploy_ok(project, tag)
        # Serving v4 (green); successful tags newest first: v4, v3, v2, v1. --keep 2 keeps v3 and v2.
        dry = project.run("prune", project.name, "--keep", "2", "--dry-run", check=True)
        assert f"would run: docker image rm {repo}:v1" in dry.stdout
        assert f"would run: docker rm --force {project.name}-blue" in dry.stdout
        assert "v4 (serving), v3 (rollback target), v2 (rollback target)" in dry.stdout
        assert inspect(f"{project.name}-blue") is not None
        assert stacklib.docker("image", "inspect", f"{repo}:v1", check=False).returncode == 0

        done = project.run("prune", project.name, "--keep", "2", check=True)
        assert f"removed: docker image rm {repo}:v1" in done.stdout
        left = sorted(stacklib.docker("image", "ls", repo, "--format", "{{.Tag}}").stdout.split())
        assert left == ["v2", "v3", "v4"]
        assert project.containers() == [f"{project.name}-green"]
        assert serving(project) == "v1"  # all four tags are the v1 app; what matters is it still serves
        back = project.run("rollback", project.name, check=True)
        assert "to v3" in back.stderr
    finally:
        for tag in ("v1", "v2", "v3", "v4"):
            stacklib.docker("image", "rm", f"{repo}:{tag}", check=False)


def test_freeze_refuses_deploys_until_unlocked(project):
    project.write_env()
    deploy_ok(project, "v1")
    project.serve()
    dry = project.run("lock", project.name, "-m", "incident 42: payments down", "--dry-run", check=True)
    assert "would write" in dry.stdout and not Path(project.env_file).with_suffix(".freeze").exists()
    project.run("lock", project.name, "-m", "incident 42: payments down", check=True)
    refused = project.run(project.name, "v2", check=3)
    assert "frozen by" in refused.stderr and "incident 42: payments down" in refused.stderr
    assert f"python3 {project.stack.pyz} unlock {project.name}" in refused.stderr
    assert project.run("rollback", project.name, "--to", "v2", check=3)
    assert status_json(project)["freeze"]["message"] == "incident 42: payments down"
    assert serving(project) == "v1"
    project.run("unlock", project.name, check=True)
    deploy_ok(project, "v2")
    assert serving(project) == "v2"


def test_logs_of_the_serving_or_named_container(project):
    project.write_env()
    deploy_ok(project, "v1")
    project.serve()
    deploy_ok(project, "v2")
    assert "app v2 starting" in project.run("logs", project.name, "--tail", "5", check=True).stdout
    assert "app v1 starting" in project.run("logs", project.name, "--color", "blue", check=True).stdout


class Webhook:
    """A local HTTP server that records the JSON bodies POSTed to it."""

    def __init__(self) -> None:
        bodies = self.bodies = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                bodies.append((self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/services/T000/B000/s3cr3t-hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_webhook_on_success_and_failure_and_unreachable(project):
    hook = Webhook()
    try:
        project.write_env(NOTIFY_WEBHOOK_URL=hook.url, HEALTH_TIMEOUT="2")
        ok = deploy_ok(project, "v1")
        project.serve()
        project.run(project.name, "unhealthy", check=1)
    finally:
        hook.close()
    assert [path for path, _ in hook.bodies] == ["/services/T000/B000/s3cr3t-hook"] * 2
    success, failure = hook.bodies[0][1], hook.bodies[1][1]
    assert success["bluegreen"]["result"] == "deployed" and success["bluegreen"]["tag"] == "v1"
    assert f"{project.name} deployed v1" in success["text"]
    assert failure["bluegreen"]["result"] == "failed" and failure["bluegreen"]["failed_step"] == "health"
    assert failure["bluegreen"]["from"] == "blue" and failure["bluegreen"]["to"] == "green"
    assert "s3cr3t" not in ok.stdout + ok.stderr

    # The server is gone now: the deploy still succeeds, says so, and never prints the URL.
    done = deploy_ok(project, "v2")
    assert "notification was not delivered" in done.stderr
    assert "s3cr3t" not in done.stdout + done.stderr
    journal = Path(project.env_file).with_suffix(".journal").read_text()
    assert "s3cr3t" not in journal


def test_failing_pre_deploy_hook_changes_nothing_and_hooks_get_variables(project):
    project.write_env()
    deploy_ok(project, "v1")
    project.serve()
    hooks = Path(project.stack.root) / "hooks" / project.name
    hooks.mkdir(parents=True)
    record = hooks / "seen.env"
    (hooks / "pre-deploy").write_text("#!/bin/sh\necho 'migrations pending: refusing' >&2\nexit 7\n")
    (hooks / "on-failure").write_text(f"#!/bin/sh\nenv | grep ^BLUEGREEN_ | sort > {record}\n")
    for f in ("pre-deploy", "on-failure"):
        (hooks / f).chmod(0o755)
    upstream = Path(project.upstream_file).read_bytes()
    try:
        proc = project.run(project.name, "v2", check=1)
        assert "hook pre-deploy: FAILED (exit 7)" in proc.stderr and "migrations pending: refusing" in proc.stderr
        assert "did not start. Nothing was changed" in proc.stderr
        assert "[1/6]" not in proc.stderr
        assert Path(project.upstream_file).read_bytes() == upstream
        assert project.containers() == [f"{project.name}-blue"] and serving(project) == "v1"
        seen = dict(line.split("=", 1) for line in record.read_text().splitlines())
        assert seen["BLUEGREEN_PROJECT"] == project.name and seen["BLUEGREEN_TAG"] == "v2"
        assert seen["BLUEGREEN_RESULT"] == "failed" and seen["BLUEGREEN_TO_COLOR"] == "green"
        assert seen["BLUEGREEN_FROM_PORT"] == str(project.blue_port)

        (hooks / "pre-deploy").write_text("#!/bin/sh\necho checks passed\n")
        (hooks / "post-deploy").write_text(f"#!/bin/sh\necho \"$BLUEGREEN_RESULT $BLUEGREEN_FROM_TAG->$BLUEGREEN_TAG\" > {record}\n")
        (hooks / "post-deploy").chmod(0o755)
        ok = deploy_ok(project, "v2")
        assert "hook pre-deploy: ok" in ok.stderr and "checks passed" in ok.stderr
        assert record.read_text().strip() == "deployed v1->v2"
    finally:
        import shutil

        shutil.rmtree(hooks)


def test_a_deploy_never_removes_the_container_nginx_still_routes_to(project):
    """The upstream file names blue's port but nginx was not reloaded, so it still routes to green (a hand
    edit, or a deploy killed between writing the file and reloading). Before, the deploy trusted the file,
    took green for the idle slot's leftover and removed it while it served: clients got 502s."""
    project.write_env()
    deploy_ok(project, "v1")
    project.serve()
    deploy_ok(project, "v2")  # green serves v2, blue (v1) is stopped
    stacklib.docker("start", f"{project.name}-blue")  # both run, as after an interrupted retire
    upstream = Path(project.upstream_file)
    upstream.write_text(upstream.read_text().replace(f"127.0.0.1:{project.green_port}", f"127.0.0.1:{project.blue_port}"))

    answers: list = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            answers.append(project.get("/version", timeout=5))
            time.sleep(0.02)

    thread = threading.Thread(target=client)
    thread.start()
    try:
        proc = project.run(project.name, "v3", check=True)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert "nginx has not loaded that file" in proc.stderr
    # Going by what nginx really routes to: green served, so blue was the slot to replace.
    assert f"{project.name} v3 now serves from {project.name}-blue" in proc.stdout
    assert answers and all(status == 200 for status, _ in answers), [a for a in answers if a[0] != 200][:5]
    assert {body for _, body in answers} <= {"v2", "v3"}
    assert project.get("/version") == (200, "v3")
    item = status_json(project)
    assert item["serving"] == "blue" and item["drift"] == [], item["drift"]


def test_without_a_visible_route_a_running_idle_container_is_never_removed(project):
    """When a probe through nginx cannot show the route (a server block without the route header line),
    a running container in the idle slot may be what nginx routes to: the deploy refuses, changing nothing."""
    project.write_env()
    deploy_ok(project, "v1")
    project.serve(probe=False)
    deploy_ok(project, "v2")
    stacklib.docker("start", f"{project.name}-blue")
    proc = project.run(project.name, "v3", check=1)
    assert f"{project.name}-blue is running, and bluegreen could not see where nginx routes" in proc.stderr
    assert "Nothing was changed" in proc.stderr and "Traceback" not in proc.stderr
    states = {c: stacklib.docker("inspect", "-f", "{{.State.Status}}", c).stdout.strip()
              for c in (f"{project.name}-blue", f"{project.name}-green")}
    assert states == {f"{project.name}-blue": "running", f"{project.name}-green": "running"}
    assert project.get("/version") == (200, "v2")


def test_rollback_goes_to_the_digest_the_journal_recorded_even_if_the_tag_moved(project):
    """Rolling back to a moving tag (`rel`, like `latest`) must deploy the image it deployed then, not what the
    tag means today."""
    repo = f"{project.stack.registry.open_addr}/bg/moving-{project.name}"
    stacklib.docker("tag", project.stack.images["v1"], f"{repo}:rel")
    stacklib.push_image(f"{repo}:rel")
    stacklib.docker("tag", project.stack.images["v2"], f"{repo}:v2")
    stacklib.push_image(f"{repo}:v2")
    try:
        project.write_env(IMAGE=repo)
        deploy_ok(project, "rel")
        project.serve()
        assert serving(project) == "v1"
        first = json.loads(project.run("history", project.name, "--json", "-n", "1", check=True).stdout)
        assert first["digest"].startswith("sha256:")
        deploy_ok(project, "v2")
        # `rel` moves on to another image; the local copy moves too (as a later pull would).
        stacklib.docker("tag", project.stack.images["v3"], f"{repo}:rel")
        stacklib.push_image(f"{repo}:rel")
        back = project.run("rollback", project.name, check=True)
        assert f"to rel (the image it deployed then: {repo}@{first['digest']})" in back.stderr
        assert serving(project) == "v1"  # not v3, which `rel` means now
        last = json.loads(project.run("history", project.name, "--json", "-n", "1", check=True).stdout)
        assert (last["action"], last["tag"], last["image"]) == ("rollback", "rel", f"{repo}@{first['digest']}")
        status = status_json(project)
        assert status["tag"] == "rel"
    finally:
        stacklib.cleanup_project(project.name)
        for tag in ("rel", "v2"):
            stacklib.docker("image", "rm", f"{repo}:{tag}", check=False)


def test_prune_keeps_what_another_project_with_the_same_image_may_roll_back_to(project):
    from conftest import Project

    repo = f"{project.stack.registry.open_addr}/bg/shared-{project.name}"
    for tag in ("a1", "a2", "b1", "b2"):
        stacklib.docker("tag", project.stack.images["v1"], f"{repo}:{tag}")
        stacklib.push_image(f"{repo}:{tag}")
    other = Project(project.stack, project.name + "-b")
    try:
        other.write_env(IMAGE=repo)
        deploy_ok(other, "b1")
        other.serve()
        deploy_ok(other, "b2")  # the other project serves b2 and may roll back to b1
        project.write_env(IMAGE=repo)
        deploy_ok(project, "a1")
        project.serve()
        deploy_ok(project, "a2")
        done = project.run("prune", project.name, "--keep", "0", check=True)
        assert f"b2 (used by {other.name})" in done.stdout and f"b1 (used by {other.name})" in done.stdout
        left = sorted(stacklib.docker("image", "ls", repo, "--format", "{{.Tag}}").stdout.split())
        assert left == ["a2", "b1", "b2"]  # a1 went (--keep 0); the other project's rollback target stayed
        back = other.run("rollback", other.name, check=True)
        assert "to b1" in back.stderr
    finally:
        other.teardown()
        for tag in ("a1", "a2", "b1", "b2"):
            stacklib.docker("image", "rm", f"{repo}:{tag}", check=False)
