"""The watch window on the real stack: a release that passes its health check and fails real traffic is
switched back while the old container still runs; one below the threshold is kept; a crash, `abort`, SIGTERM
end the watch by switching back; `promote` ends it by keeping the new version."""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from pathlib import Path

import pytest

import bluegreen.watch
import stack as stacklib
from test_stack_deploy import deploy_ok, serving


class Traffic:
    """Requests through nginx in a loop (what real clients do), counted by answer."""

    def __init__(self, project, path: str = "/version") -> None:
        self.project, self.path = project, path
        self.answers: list = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.answers.append((time.monotonic(), *self.project.get(self.path, timeout=5)))
            except Exception as exc:  # a refused connection is an answer too
                self.answers.append((time.monotonic(), 0, type(exc).__name__))
            time.sleep(0.01)

    def __enter__(self) -> "Traffic":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(10)


def with_watch_log(project, tmp_path) -> Path:
    """The server block as `init` writes it for the watch: an access_log line in the watch format."""
    log = tmp_path / "watch.log"
    project.serve(head=bluegreen.watch.log_format_line(project.name),
                  extra=f"access_log {log} {bluegreen.watch.format_name(project.name)};\n")
    return log


def watch_env(project, **keys) -> None:
    project.write_env(HEALTH_TIMEOUT="20", STOP_TIMEOUT="2", **keys)


def journal(project) -> list:
    path = Path(project.env_file).with_suffix(".journal")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_a_release_that_fails_real_traffic_is_switched_back_while_the_old_one_still_runs(project, tmp_path):
    watch_env(project)
    deploy_ok(project, "v1")
    with_watch_log(project, tmp_path)
    watch_env(project, WATCH_SECONDS="30", WATCH_MIN_REQUESTS="10")
    with Traffic(project) as traffic:
        started = time.monotonic()
        proc = project.run("deploy", project.name, "failing")
        took = time.monotonic() - started
        time.sleep(1)
    assert proc.returncode == 1, proc.stderr
    assert "The watch after the switch saw" in proc.stderr and "> WATCH_MAX_ERROR_RATE 5%" in proc.stderr
    assert f"switching back to v1 ({project.name}-blue, kept running during the watch)" in proc.stderr
    assert "[4/6] watch" in proc.stderr and "FAILED after" in proc.stderr
    assert re.search(r"request time median [0-9]+ ms, p99 [0-9]+ ms", proc.stderr), proc.stderr  # $request_time read
    assert took < 20, f"the watch should have switched back long before WATCH_SECONDS=30 ended ({took:.1f}s)"
    assert serving(project) == "v1"
    assert project.containers(all=True) == [f"{project.name}-blue"]  # the failing one is gone
    last = journal(project)[-1]
    assert (last["tag"], last["result"], last["failed_step"]) == ("failing", "failed", "watch")
    # Clients saw the bad release only while the watch gathered its evidence, then v1 again.
    bad = [t for t, status, _ in traffic.answers if status == 500]
    assert bad, "the failing release never got traffic"
    after = [(status, body) for t, status, body in traffic.answers if t > bad[-1]]
    assert after and all(a == (200, "v1") for a in after), after[:5]


def test_an_error_rate_below_the_threshold_is_kept(project, tmp_path):
    watch_env(project)
    deploy_ok(project, "v1")
    with_watch_log(project, tmp_path)
    watch_env(project, WATCH_SECONDS="6", WATCH_MIN_REQUESTS="20", FAIL_EVERY="50")  # 2% of requests fail
    with Traffic(project) as traffic:
        proc = project.run("deploy", project.name, "failing")
    assert proc.returncode == 0, proc.stderr
    watched = next(line for line in proc.stderr.splitlines() if "[4/6] watch" in line)
    assert "answered 5xx" in watched and "under WATCH_MIN_REQUESTS" not in watched, watched
    # Every 50th request of this release answers 500 (by design), so one GET may be
    # that one; the traffic has stopped, so the next one after it is a 200.
    answers = [project.get("/version") for _ in range(2)]
    assert (200, "failing") in [(status, body.strip()) for status, body in answers], answers
    assert sum(status == 500 for _, status, _ in traffic.answers) >= 1


def test_a_crash_during_the_watch_switches_back(project, tmp_path):
    watch_env(project)
    deploy_ok(project, "v1")
    with_watch_log(project, tmp_path)
    watch_env(project, WATCH_SECONDS="30")
    proc = project.popen("deploy", project.name, "v2")
    control = Path(project.stack.projects_dir, f"{project.name}.watch")
    wait_for(control.exists, 60, "the watch to start")
    stacklib.docker("kill", f"{project.name}-green")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert f"{project.name}-green stopped during the watch" in err and "switching back to v1" in err
    assert serving(project) == "v1" and not control.exists()


@pytest.mark.parametrize("word", ["promote", "abort"])
def test_promote_and_abort_from_another_shell(project, tmp_path, word):
    watch_env(project)
    deploy_ok(project, "v1")
    with_watch_log(project, tmp_path)
    watch_env(project, WATCH_SECONDS="120")
    none = project.run(word, project.name)
    assert none.returncode == 2 and "No watch is running" in none.stderr
    proc = project.popen("deploy", project.name, "v2")
    control = Path(project.stack.projects_dir, f"{project.name}.watch")
    wait_for(control.exists, 60, "the watch to start")
    started = time.monotonic()
    asked = project.run(word, project.name)
    assert asked.returncode == 0, asked.stderr
    out, err = proc.communicate(timeout=60)
    assert time.monotonic() - started < 10
    if word == "promote":
        assert proc.returncode == 0, err
        assert "promoted after" in err and serving(project) == "v2"
        assert "[5/6] retire" in err
    else:
        assert proc.returncode == 1, err
        assert "`abort`" in err and serving(project) == "v1"
    assert not control.exists() and not control.with_name(control.name + "-request").exists()


def test_sigterm_during_the_watch_switches_back(project, tmp_path):
    watch_env(project)
    deploy_ok(project, "v1")
    with_watch_log(project, tmp_path)
    watch_env(project, WATCH_SECONDS="120")
    proc = project.popen("deploy", project.name, "v2")
    control = Path(project.stack.projects_dir, f"{project.name}.watch")
    wait_for(control.exists, 60, "the watch to start")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert "interrupted by SIGTERM" in err and "(during the watch)" in err
    assert serving(project) == "v1"
    assert project.containers(all=True) == [f"{project.name}-blue"]


def test_without_the_log_line_a_deploy_goes_ahead_and_says_how_to_enable_the_watch(project):
    watch_env(project)
    deploy_ok(project, "v1")
    project.serve()
    watch_env(project, WATCH_SECONDS="30")
    proc = deploy_ok(project, "v2")
    assert "deploying without a watch" in proc.stderr and f"bluegreen_watch_{project.name.replace('-', '_')};" in proc.stderr
    assert "[4/6] watch" not in proc.stderr
    assert serving(project) == "v2"
    doctor = project.run("doctor", project.name)
    assert "WATCH_SECONDS=30, but no server block logs with the watch format" in doctor.stdout


def wait_for(ok, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_a_canary_step_that_fails_at_ten_percent_spares_most_clients(project, tmp_path):
    watch_env(project)
    deploy_ok(project, "v1")
    with_watch_log(project, tmp_path)
    # WATCH_MIN_REQUESTS=20 as by default: a 10% step judges strong evidence from 3 requests (its share of 20,
    # at least 3), so the step ends long before 20 requests could reach the release at a tenth of the traffic.
    watch_env(project, CANARY_STEPS="10,50", CANARY_STEP_SECONDS="30", WATCH_MIN_REQUESTS="20")
    with Traffic(project) as traffic:
        proc = project.run("deploy", project.name, "failing")
        time.sleep(0.5)
    assert proc.returncode == 1, proc.stderr
    assert "[4/6] switch  nginx -> 10% to" in proc.stderr and "50% to" not in proc.stderr
    assert "(judged from 20 requests, or 3 on strong evidence)" in proc.stderr, proc.stderr
    saw = re.search(r"A canary step saw (\d+) request\(s\)", proc.stderr)
    assert saw and 3 <= int(saw.group(1)) < 20, proc.stderr
    assert "switching back to v1" in proc.stderr
    assert journal(project)[-1]["failed_step"] == "canary"
    assert serving(project) == "v1" and project.containers(all=True) == [f"{project.name}-blue"]
    statuses = [status for _, status, _ in traffic.answers]
    bad, good = statuses.count(500), statuses.count(200)
    assert bad >= 3 and bad < 0.25 * (bad + good), (bad, good)  # the step judged from 3; about 10% of answers, then none


def test_a_good_release_goes_through_the_canary_steps_then_the_full_switch(project, tmp_path):
    watch_env(project)
    deploy_ok(project, "v1")
    with_watch_log(project, tmp_path)
    watch_env(project, CANARY_STEPS="10,50", CANARY_STEP_SECONDS="1")
    with Traffic(project) as traffic:
        proc = deploy_ok(project, "v2")
    steps = [line.split(":")[0] for line in proc.stderr.splitlines() if line.startswith("[4/6] ")]
    assert [s.split()[1] for s in steps] == ["switch", "canary", "switch", "canary", "switch", "drain", "verify"], steps
    upstream = Path(project.upstream_file).read_text()
    assert "weight=" not in upstream and f"server 127.0.0.1:{project.green_port};" in upstream
    assert serving(project) == "v2"
    versions = {body for _, status, body in traffic.answers if status == 200}
    assert versions <= {"v1", "v2"} and not [s for _, s, _ in traffic.answers if s != 200]


def test_a_rollback_neither_steps_nor_watches_and_a_stale_watch_file_is_no_watch(project, tmp_path):
    watch_env(project)
    deploy_ok(project, "v1")
    with_watch_log(project, tmp_path)
    deploy_ok(project, "v2")
    watch_env(project, WATCH_SECONDS="60", CANARY_STEPS="10,50")
    back = project.run("rollback", project.name, check=True)
    assert "[4/6] watch" not in back.stderr and "[4/6] canary" not in back.stderr and serving(project) == "v1"
    # A watch file left by a deploy that was killed (its pid is gone): nothing reads a request, so none is taken.
    control = Path(project.stack.projects_dir, f"{project.name}.watch")
    control.write_text('{"pid": 999999999, "tag": "v2", "step": "watch"}\n')
    stale = project.run("abort", project.name)
    assert stale.returncode == 2 and "No watch is running" in stale.stderr and not control.exists()
