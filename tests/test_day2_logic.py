"""Pure tests of the day-2 deciding code: journal, rollback target, prune plan, drift, notification payload."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from bluegreen import docker as dk
from bluegreen import journal, notify, status
from bluegreen.config import load_settings, parse_env, project_from_entries
from bluegreen.prune import plan_prune
from bluegreen.runner import RecordingRunner, Result

CFG = project_from_entries("api", "api.env", parse_env("IMAGE=reg/acme/api\n", "api.env"))
SETTINGS = load_settings("/opt/deploy", {}, euid=0)


def entry(tag, result="deployed", **kw):
    return journal.Entry(time="2026-11-26T00:00:00+00:00", host="h", user="u", project="api", action="deploy",
                         tag=tag, result=result, exit_code=0 if result == "deployed" else 1, **kw)


def test_journal_lines_round_trip_and_skip_torn_or_foreign_lines(tmp_path):
    path = tmp_path / "api.journal"
    assert journal.append(path, entry("v1")) is None
    assert journal.append(path, entry("v2", "failed", failed_step="health")) is None
    with path.open("a") as fh:
        fh.write("[1, 2]\n{\"time\": \"x\", \"unknown_key\": 1, \"tag\": \"z\"}\n{\"time\": \"2026")
    got = journal.read(path)
    assert [(e.tag, e.result, e.failed_step) for e in got] == [("v1", "deployed", None), ("v2", "failed", "health")]


def test_journal_append_never_raises(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    problem = journal.append(blocker / "sub" / "api.journal", entry("v1"))
    assert problem and "could not append" in problem


def test_rollback_target_skips_failures_and_the_serving_tag():
    entries = [entry("v1"), entry("v2"), entry("v3"), entry("v4", "failed")]
    assert journal.successful_tags(entries) == ["v3", "v2", "v1"]
    assert journal.rollback_target(entries, "v3") == "v2"
    assert journal.rollback_target(entries + [entry("v2")], "v2") == "v3"
    assert journal.rollback_target([entry("v1")], "v1") is None
    assert journal.rollback_target([], None) is None


def test_history_render_is_newest_first_with_the_failure_reason():
    text = journal.render([entry("v1"), entry("v2", "failed", failed_step="health", message="did not answer\nlogs...")])
    first, second, third = text.splitlines()
    assert " v2 " in first and "failed" in first and second.strip() == "step health: did not answer"
    assert " v1 " in third and "deployed" in third and "instant" not in text
    back = journal.render([replace(entry("v1"), action="rollback", instant=True)])
    assert " rollback " in back and back.endswith("  instant (the retained container started, nothing pulled)")
    failed = journal.render([replace(entry("v1", "failed", failed_step="pre-deploy hook", message="x"),
                                     action="rollback", instant=True)])
    assert "instant" not in failed  # it may have stopped before starting anything


def container(name, status="running", tag="v1"):
    return dk.Container(name=name, id=name, status=status, exit_code=0, image="x", labels={dk.LABEL_TAG: tag})


def test_prune_plan_keeps_serving_and_newest_targets():
    plan = plan_prune(
        image="reg/acme/api",
        containers=[container("api-blue", "exited", "v3"), container("api-green", "running", "v4")],
        serving="api-green",
        image_tags=["v1", "v2", "v3", "v4", "<none>", "latest"],
        successful=["v4", "v3", "v2", "v1"],
        keep=2,
    )
    assert plan.containers == ["api-blue"]
    assert plan.images == ["reg/acme/api:v1", "reg/acme/api:latest"]
    assert plan.kept == ["v4 (serving)", "v3 (rollback target)", "v2 (rollback target)"]


def test_prune_never_removes_the_routed_container_even_when_stopped():
    plan = plan_prune(image="r/a", containers=[container("api-blue", "exited", "v1")], serving="api-blue",
                      image_tags=["v1"], successful=["v1"], keep=0)
    assert plan.containers == [] and plan.images == [] and plan.kept == ["v1 (serving)"]


def colours(blue, green, healthy=True):
    return [status.ColourState("blue", "api-blue", 8081, blue, healthy=healthy if blue == "running" else None),
            status.ColourState("green", "api-green", 8082, green, healthy=healthy if green == "running" else None)]


def test_drift_none_when_everything_agrees():
    assert status.find_drift(CFG, SETTINGS, serving="green", active="green", upstream_port=8082, colours=colours("exited", "running")) == []


def test_drift_serving_container_stopped_and_active_mismatch():
    found = status.find_drift(CFG, SETTINGS, serving="blue", active="green", upstream_port=8081, colours=colours("exited", "running"),
                              nginx_route=8081)
    problems = [d.problem for d in found]
    assert any("nginx routes to api-blue (127.0.0.1:8081), but that container is exited: the service is down" in p for p in problems)
    assert any("api-green still runs although nginx does not route to it" in p for p in problems)
    assert any("api.active says green but nginx routes to blue" in p for p in problems)
    assert found[0].fix == "docker start api-blue"


def test_drift_without_a_seen_route_never_claims_where_nginx_routes_nor_advises_a_stop():
    """The issue's state without the route header line: the file names blue (exited), green runs and may be
    what nginx routes to. Status must not say the service is down for sure, nor advise `docker stop api-green`."""
    found = status.find_drift(CFG, SETTINGS, serving="blue", active="green", upstream_port=8081, colours=colours("exited", "running"))
    problems = [d.problem for d in found]
    assert any("the upstream file routes to api-blue (127.0.0.1:8081), but that container is exited: if nginx has "
               "loaded that file, the service is down" in p for p in problems), problems
    assert not any(d.fix.startswith("docker stop") for d in found)
    assert any("cannot tell which of the two serves" in p for p in problems)


def test_drift_unhealthy_absent_unknown_port_and_unrouted():
    unhealthy = status.find_drift(CFG, SETTINGS, serving="green", active="green", upstream_port=8082,
                                  colours=colours("absent", "running", healthy=False))
    assert unhealthy[0].fix == "bluegreen logs api --tail 100"
    absent = status.find_drift(CFG, SETTINGS, serving="green", active="green", upstream_port=8082, colours=colours("absent", "absent"))
    assert "does not exist" in absent[0].problem and absent[0].fix == "bluegreen deploy api <tag>"
    odd = status.find_drift(CFG, SETTINGS, serving=None, active=None, upstream_port=9999, colours=colours("absent", "absent"))
    assert "neither BLUE_PORT" in odd[0].problem
    unrouted = status.find_drift(CFG, SETTINGS, serving=None, active=None, upstream_port=None, colours=colours("running", "absent"))
    assert "nginx routes to neither colour" in unrouted[0].problem


def test_status_uses_one_docker_call_for_all_projects(tmp_path):
    (tmp_path / "projects").mkdir()
    for name in ("a", "b", "c"):
        (tmp_path / "projects" / f"{name}.env").write_text("IMAGE=reg/x\n")
    (tmp_path / "projects" / "broken.env").write_text("NOPE\n")
    settings = load_settings(str(tmp_path), {}, euid=0)
    found = json.dumps([{"Name": "/a-blue", "State": {"Status": "exited"}, "Config": {"Labels": {}}}])
    runner = RecordingRunner(responder=lambda argv: Result(tuple(argv), 1, found, "Error: No such container: a-green"))
    result = status.collect(settings, settings.projects(), runner, live_health=False)
    assert len(runner.calls) == 1 and runner.calls[0][:3] == ("docker", "container", "inspect")
    by_name = {s.project: s for s in result}
    assert by_name["broken"].error and "expected KEY=VALUE" in by_name["broken"].error
    assert [c.state for c in by_name["a"].colours] == ["exited", "absent"]
    assert "ERROR" in status.render_line(by_name["broken"])


def test_notification_payload_is_slack_compatible_and_has_the_facts():
    e = entry("v2", "failed", failed_step="health", message="did not answer\nmore", from_colour="blue", to_colour="green", from_tag="v1")
    body = notify.payload(e)
    assert set(body) == {"text", "bluegreen"}
    assert "api deploy of v2 on h: FAILED" in body["text"] and "failed step: health; did not answer" in body["text"]
    assert body["bluegreen"]["from"] == "blue" and body["bluegreen"]["from_tag"] == "v1"
    ok = notify.payload(entry("v3"))
    assert ok["text"].startswith(":white_check_mark: api deployed v3 on h")


def test_notification_failure_never_shows_the_url():
    problem = notify.send("http://127.0.0.1:9/services/SECRET-PATH", {"text": "x"}, timeout=1)
    assert problem and "SECRET" not in problem and "127.0.0.1:9" not in problem


def test_a_webhook_that_answers_garbage_is_a_warning_not_a_crash():
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def answer_garbage():
        conn, _ = server.accept()
        conn.recv(65536)
        conn.sendall(b"NOT-HTTP garbage\r\n\r\n")
        conn.close()

    threading.Thread(target=answer_garbage, daemon=True).start()
    try:
        problem = notify.send(f"http://127.0.0.1:{server.getsockname()[1]}/hook/SECRET", {"text": "x"}, timeout=2)
    finally:
        server.close()
    assert problem and "SECRET" not in problem


def test_status_survives_planted_journals_and_reports_a_planted_lock_per_project(tmp_path):
    """A journal symlinked to /dev/zero (status ran out of memory: exit 4) or replaced by a FIFO (status hung),
    and a lock symlink (the whole status exited 2): each project is reported on its own, quickly."""
    import os
    import threading

    (tmp_path / "projects").mkdir()
    for name in ("a", "b", "c", "d"):
        (tmp_path / "projects" / f"{name}.env").write_text("IMAGE=reg/x\n")
    os.symlink("/dev/zero", tmp_path / "projects" / "a.journal")
    os.mkfifo(tmp_path / "projects" / "b.journal")
    decoy = tmp_path / "decoy"
    decoy.write_text("root-only\n")
    os.symlink(decoy, tmp_path / "projects" / "c.lock")
    settings = load_settings(str(tmp_path), {}, euid=0)
    runner = RecordingRunner(responder=lambda argv: Result(tuple(argv), 0, "[]", ""))
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(found=status.collect(settings, settings.projects(), runner,
                                                                              live_health=False)), daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive(), "status blocked on a planted journal"
    by_name = {s.project: s for s in result["found"]}
    assert by_name["a"].error is None and by_name["a"].last_deploy is None
    assert by_name["b"].error is None and by_name["b"].last_deploy is None
    assert by_name["c"].error and "symlink" in by_name["c"].error
    assert by_name["d"].error is None
    assert decoy.read_text() == "root-only\n"


def test_drift_never_advises_stopping_the_colour_a_pending_reload_would_route_to():
    # nginx routes to blue (seen), the file (not loaded) names green, which runs: `docker stop` would make the
    # next reload of nginx route to a stopped container.
    found = status.find_drift(CFG, SETTINGS, serving="blue", active="blue", upstream_port=8082,
                              colours=colours("running", "running"), nginx_route=8081)
    assert not any(d.fix.startswith("docker stop") for d in found), found
    assert any("nginx has not loaded that file" in d.problem for d in found)
    # Loaded and agreeing: a running idle colour is worth stopping.
    plain = status.find_drift(CFG, SETTINGS, serving="blue", active="blue", upstream_port=8081,
                              colours=colours("running", "running"), nginx_route=8081)
    assert [d.fix for d in plain] == ["docker stop api-green"]


def test_an_interrupt_while_recording_is_not_reported_as_retiring(tmp_path, monkeypatch):
    import io

    from bluegreen.deploy import Deployer, Progress, read_plan
    from bluegreen.errors import Interrupted, NeedsAttention
    from bluegreen.health import Probe
    from test_deploy_logic import FakeHost

    (tmp_path / "projects").mkdir()
    (tmp_path / "projects" / "api.env").write_text("IMAGE=reg.local/acme/api\nHEALTH_TIMEOUT=5\n")
    settings = load_settings(str(tmp_path), {"BLUEGREEN_NGINX_PID_FILE": str(tmp_path / "none.pid")}, euid=0)
    from bluegreen.config import load_project

    cfg = load_project(settings, "api")
    runner = RecordingRunner(responder=FakeHost())

    def probe(url, timeout, host="", headers=None):
        return Probe(200, "HTTP 200", {"X-Bluegreen-Upstream": "127.0.0.1:8081"} if headers else {})

    def interrupted(*a, **k):
        raise Interrupted("SIGINT")

    monkeypatch.setattr("bluegreen.state.write_active", interrupted)
    plan, _ = read_plan(settings, cfg, "v1")
    d = Deployer(settings=settings, runner=runner, progress=Progress(io.StringIO()), probe=probe,
                 port_busy=lambda p: False, clock=lambda: 0.0, sleep=lambda s: None)
    with pytest.raises(NeedsAttention) as exc:
        d.run(plan)
    assert "while recording it" in exc.value.message and "retiring" not in exc.value.message


def test_journal_lines_with_tags_deploy_would_refuse_or_a_negative_duration_are_skipped():
    good = {"time": "t", "host": "h", "user": "u", "project": "api", "action": "deploy", "tag": "v1",
            "result": "deployed", "exit_code": 0, "duration": 1.0}
    lines = [json.dumps(good)]
    for bad in ({"tag": "../../etc"}, {"tag": "x" * 10000}, {"tag": "--privileged"}, {"from_tag": "a b"},
                {"duration": -5}):
        lines.append(json.dumps({**good, **bad}))
    entries = list(journal.parse_lines(lines))
    assert len(entries) == 1 and entries[0].tag == "v1"
    assert journal.rollback_target(entries + list(journal.parse_lines(lines[1:])), "v2") == "v1"
