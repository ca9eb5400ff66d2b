"""Pure tests: the health poller (fake clock), the lock, atomic state files, the journal; planted links,
FIFOs, hard links and bad bytes in all of them."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading

import pytest

from bluegreen import journal, state
from bluegreen.errors import LockedError
from bluegreen.health import Probe, http_probe, wait_healthy
from bluegreen.lock import Holder, current_holder, project_lock, read_freeze, read_holder
from bluegreen.safefs import UnsafePath

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.sleeps.append(seconds)
        self.now += seconds


def test_healthy_after_a_few_polls():
    clock = FakeClock()
    answers = iter([Probe(None, "connection refused"), Probe(503, "HTTP 503"), Probe(200, "HTTP 200")])
    result = wait_healthy(lambda t: next(answers), expect=200, timeout=10, interval=0.25, clock=clock, sleep=clock.sleep)
    assert result.healthy and result.attempts == 3 and result.elapsed == pytest.approx(0.5)


def test_times_out_at_the_deadline_and_keeps_last_answer():
    clock = FakeClock()
    timeouts = []

    def probe(t):
        timeouts.append(t)
        clock.now += 0.1  # each request takes 100 ms
        return Probe(500, "HTTP 500")

    result = wait_healthy(probe, expect=200, timeout=5, interval=1, request_timeout=2, clock=clock, sleep=clock.sleep)
    assert not result.healthy and result.last.detail == "HTTP 500"
    assert result.elapsed == pytest.approx(5.0, abs=0.11)
    assert result.attempts == 5 and max(timeouts) <= 2


def test_container_death_ends_the_wait_at_once():
    clock = FakeClock()
    checks = []

    def alive():
        checks.append(clock.now - 1000.0)
        return None if len(checks) < 2 else "the container stopped (exited, exit code 3)"

    result = wait_healthy(
        lambda t: Probe(None, "connection refused"), expect=200, timeout=120, interval=0.5,
        alive=alive, alive_every=1.0, clock=clock, sleep=clock.sleep,
    )
    assert not result.healthy and "exit code 3" in result.died
    # Checked once a second, the first time a second after the start (docker run has just said
    # it started), so a death is noticed within alive_every + interval.
    assert checks == [pytest.approx(1.0), pytest.approx(2.0)] and result.elapsed <= 2.5


def test_a_death_before_the_first_liveness_check_is_still_reported_as_a_death():
    clock = FakeClock()
    result = wait_healthy(
        lambda t: Probe(None, "connection refused"), expect=200, timeout=0.5, interval=0.1,
        alive=lambda: "the container stopped (exited, exit code 1)", alive_every=1.0, clock=clock, sleep=clock.sleep,
    )
    assert not result.healthy and result.died == "the container stopped (exited, exit code 1)"


def test_a_plain_timeout_checks_liveness_once_more_and_stays_a_timeout():
    clock = FakeClock()
    calls = []
    result = wait_healthy(lambda t: Probe(503, "HTTP 503"), expect=200, timeout=0.5, interval=0.1,
                          alive=lambda: calls.append(clock.now) or None, alive_every=1.0, clock=clock, sleep=clock.sleep)
    assert not result.healthy and result.died is None and result.last.detail == "HTTP 503" and len(calls) == 1


def test_a_quick_app_costs_no_liveness_check():
    clock = FakeClock()
    calls = []
    answers = iter([Probe(None, "connection refused"), Probe(200, "HTTP 200")])
    result = wait_healthy(lambda t: next(answers), expect=200, timeout=10, interval=0.1,
                          alive=lambda: calls.append(1), alive_every=1.0, clock=clock, sleep=clock.sleep)
    assert result.healthy and calls == []


def test_initial_delay_and_custom_expected_status():
    clock = FakeClock()
    result = wait_healthy(lambda t: Probe(204, "HTTP 204"), expect=204, timeout=10, interval=1, initial_delay=3,
                          clock=clock, sleep=clock.sleep)
    assert result.healthy and clock.sleeps[0] == 3


def test_http_probe_against_a_real_local_server():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            code = {"/ok": 200, "/bad": 503, "/moved": 302}[self.path]
            self.send_response(code)
            if code == 302:
                self.send_header("Location", "/login")
            self.send_header("X-Host-Seen", self.headers.get("Host", ""))
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        ok = http_probe(f"http://127.0.0.1:{port}/ok", timeout=2, host="api.example.com")
        assert ok.status == 200 and ok.headers["X-Host-Seen"] == "api.example.com"
        assert http_probe(f"http://127.0.0.1:{port}/bad", timeout=2).status == 503
        assert http_probe(f"http://127.0.0.1:{port}/moved", timeout=2).status == 302  # not followed
    finally:
        server.shutdown()
        server.server_close()
    refused = http_probe(f"http://127.0.0.1:{port}/ok", timeout=1)
    assert refused.status is None and "refused" in refused.detail


def test_http_probe_ignores_proxy_variables(monkeypatch):
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # would refuse every request
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert http_probe(f"http://127.0.0.1:{server.server_address[1]}/", timeout=2).status == 200
    finally:
        server.shutdown()
        server.server_close()


HOLDER = Holder(pid=os.getpid(), user="ci", host="h1", tag="v2", since="2026-11-26T00:00:00+00:00")


def test_lock_names_the_holder_and_is_released(tmp_path):
    path = tmp_path / "p.lock"
    with project_lock(path, HOLDER):
        assert read_holder(path) == HOLDER
        with pytest.raises(LockedError) as exc:
            with project_lock(path, HOLDER):
                pass
        assert f"pid {os.getpid()}" in exc.value.message and "user ci" in exc.value.message and "tag v2" in exc.value.message
        assert exc.value.exit_code == 3
    with project_lock(path, HOLDER):  # free again
        pass


def test_lock_wait_gives_up_after_the_bound(tmp_path):
    path = tmp_path / "p.lock"
    clock = FakeClock()
    with project_lock(path, HOLDER):
        with pytest.raises(LockedError) as exc:
            with project_lock(path, HOLDER, wait=2, clock=clock, sleep=clock.sleep):
                pass
    assert "after waiting 2s" in exc.value.message and sum(clock.sleeps) == pytest.approx(2)


def test_lock_held_by_a_killed_process_is_free(tmp_path):
    path = tmp_path / "p.lock"
    code = (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)"
    )
    child = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(LockedError):
            with project_lock(path, HOLDER):
                pass
        child.kill()
        child.wait()
        with project_lock(path, HOLDER):
            pass
    finally:
        child.kill()
        child.wait()
        child.stdout.close()


def test_atomic_write_replaces_whole_and_leaves_no_temp(tmp_path):
    path = tmp_path / "x.active"
    state.write_active(path, "blue")
    state.write_active(path, "green")
    assert state.read_active(path) == "green"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.active"]
    assert state.read_active(tmp_path / "missing") is None
    (tmp_path / "junk.active").write_text("purple\n")
    assert state.read_active(tmp_path / "junk.active") is None


def test_atomic_write_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "x.conf"
    path.write_text("old\n")

    def boom(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        state.atomic_write(path, "new\n")
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["x.conf"]


# -- planted symlinks, FIFOs, hard links and bad bytes in the lock, freeze and state files -------------------

@pytest.fixture
def planted(tmp_path):
    """ROOT/projects and a decoy 'root-only' file in a 0700 directory outside ROOT."""
    root = tmp_path / "root"
    (root / "projects").mkdir(parents=True)
    secret = tmp_path / "secret"
    secret.mkdir(mode=0o700)
    decoy = secret / "shadow"
    decoy.write_text("root:secret-hash:19000::::::\n")
    decoy.chmod(0o600)
    return root, decoy


def test_a_lock_symlink_is_refused_and_its_target_never_truncated(planted):
    root, decoy = planted
    lock = root / "projects" / "p.lock"
    lock.symlink_to(decoy)
    with pytest.raises(UnsafePath) as exc:
        with project_lock(lock, HOLDER):
            pytest.fail("the lock was taken through a symlink")
    assert exc.value.exit_code == 2
    assert str(lock) in exc.value.message and f"a symlink (to {decoy})" in exc.value.message
    assert "still serves" in exc.value.message
    assert decoy.read_text() == "root:secret-hash:19000::::::\n"
    with pytest.raises(UnsafePath):
        current_holder(lock)
    assert read_holder(lock) is None


def test_a_dangling_lock_symlink_creates_nothing(planted):
    root, decoy = planted
    lock = root / "projects" / "p.lock"
    lock.symlink_to(decoy.parent / "new-cron-file")
    with pytest.raises(UnsafePath):
        with project_lock(lock, HOLDER):
            pass
    assert not (decoy.parent / "new-cron-file").exists()


def test_a_projects_directory_symlink_is_refused_for_the_lock(planted):
    root, decoy = planted
    (root / "projects").rmdir()
    (root / "projects").symlink_to(decoy.parent)
    with pytest.raises(UnsafePath) as exc:
        with project_lock(root / "projects" / "shadow", HOLDER):
            pass
    assert str(root / "projects") in exc.value.message
    assert decoy.read_text() == "root:secret-hash:19000::::::\n"


def test_a_hard_linked_lock_is_refused(planted):
    root, decoy = planted
    lock = root / "projects" / "p.lock"
    os.link(decoy, lock)
    with pytest.raises(UnsafePath) as exc:
        with project_lock(lock, HOLDER):
            pass
    assert "hard link" in exc.value.message
    assert decoy.read_text() == "root:secret-hash:19000::::::\n"


def test_a_fifo_lock_or_freeze_never_blocks(planted):
    root, _ = planted
    os.mkfifo(root / "projects" / "p.lock")
    os.mkfifo(root / "projects" / "p.freeze")
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from bluegreen.lock import Holder, project_lock, read_freeze\n"
        "from bluegreen.safefs import UnsafePath\n"
        "d = Path(sys.argv[1])\n"
        "print('freeze', read_freeze(d / 'p.freeze').message)\n"
        "try:\n"
        "    with project_lock(d / 'p.lock', Holder(1, 'u', 'h', 't', 's')):\n"
        "        print('locked')\n"
        "except UnsafePath as exc:\n"
        "    print('refused', exc.found)\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", code, str(root / "projects")], env=env, capture_output=True,
                          text=True, timeout=10)
    assert proc.returncode == 0, proc.stderr
    assert "freeze (the freeze file" in proc.stdout and "FIFO" in proc.stdout
    assert "refused a FIFO" in proc.stdout


def test_a_freeze_symlink_still_freezes_but_is_never_read(planted):
    root, decoy = planted
    freeze = root / "projects" / "p.freeze"
    freeze.symlink_to(decoy)
    found = read_freeze(freeze)
    assert found is not None  # a planted freeze still refuses deploys (exit 3), ...
    assert "secret-hash" not in found.describe()  # ... but what it points at is never printed
    assert str(freeze) in found.message and "symlink" in found.message


def test_a_freeze_file_is_read_bounded_and_any_json_shape_is_text(planted):
    root, _ = planted
    freeze = root / "projects" / "p.freeze"
    for raw in (b'{"message": null, "user": 1, "since": []}', b"[" * 100000, b"\xff\xfe oops", b'{"message": 1e999}'):
        freeze.write_bytes(raw)
        assert read_freeze(freeze) is not None
    freeze.write_bytes(b'{"message": "db migration", "user": "ops", "since": "2026-01-01"}')
    assert read_freeze(freeze).describe() == "frozen by ops since 2026-01-01: db migration"
    freeze.write_bytes(b"x" * (10 << 20))
    assert "larger than" in read_freeze(freeze).message


def test_a_lock_file_of_any_shape_never_breaks_the_holder_reader(planted):
    root, _ = planted
    lock = root / "projects" / "p.lock"
    for raw in (b'{"pid": 1e999, "user": "u", "host": "h", "tag": "t", "since": "s"}', b"[" * 100000,
                b'{"pid": "1", "user": null}', b"\xff", b'{"pid": true, "user": "u", "host": "h", "tag": "t", "since": "s"}'):
        lock.write_bytes(raw)
        assert read_holder(lock) is None


def test_state_files_with_bad_bytes_or_planted_links_never_crash(planted):
    root, decoy = planted
    active = root / "projects" / "p.active"
    active.write_bytes(b"\xff\xfeblue\n")
    assert state.read_active(active) is None
    assert state.read_text(active) == "\ufffd\ufffdblue\n"
    active.write_bytes(b"blue" + b" " * (5 << 20))
    assert state.read_active(active) is None  # huge: not a colour, read only its first bytes
    active.unlink()
    active.symlink_to(decoy)
    with pytest.raises(UnsafePath):
        state.read_active(active)
    with pytest.raises(UnsafePath):
        state.read_text(active)
    active.unlink()
    os.mkfifo(active)
    with pytest.raises(UnsafePath):
        state.read_active(active)  # returns at once: O_NONBLOCK, then fstat refuses the FIFO
    active.unlink()
    active.symlink_to(decoy)
    state.write_active(active, "green")  # the link is replaced, its target untouched
    assert state.read_active(active) == "green" and decoy.read_text() == "root:secret-hash:19000::::::\n"


def test_state_root_guards_intermediate_directories(planted):
    root, decoy = planted
    (root / "nginx").symlink_to(decoy.parent)
    with pytest.raises(UnsafePath):
        state.read_text(root / "nginx" / "shadow", root=root)
    with pytest.raises(UnsafePath):
        state.atomic_write(root / "nginx" / "new.conf", "x", root=root)
    assert sorted(os.listdir(decoy.parent)) == ["shadow"]


# -- the journal: planted links, any shape of line, bounded reads ---------------------------------------------

GOOD = {"time": "2026-01-01T00:00:00+00:00", "host": "h", "user": "ci", "project": "p", "action": "deploy",
        "tag": "v1", "result": "deployed", "exit_code": 0, "duration": 1.5, "steps": {"pull": 0.5}}

WRONG_SHAPES = [
    {**GOOD, "tag": None},
    {**GOOD, "tag": 7},
    {**GOOD, "message": None},
    {**GOOD, "message": ["a"]},
    {**GOOD, "duration": "fast"},
    {**GOOD, "duration": 10 ** 400},
    {**GOOD, "duration": None},
    {**GOOD, "exit_code": 10 ** 30},
    {**GOOD, "exit_code": True},
    {**GOOD, "steps": {"pull": "x"}},
    {**GOOD, "steps": [1]},
    {**GOOD, "failed_step": 3, "result": "failed"},
    {**GOOD, "from_colour": {"x": 1}},
    {k: v for k, v in GOOD.items() if k != "time"},
]
WRONG_TEXT = ["[" * 100000, '{"time": ' * 50000, "1e999", '{"duration": 1e999}', json.dumps({**GOOD, "tag": "v9"}).replace("1.5", "1e999"),
              "\ud800", "null", "[]", '"str"', "\x00", "9" * 5000]


def _journal_lines():
    return [json.dumps(GOOD)] + [json.dumps(bad) for bad in WRONG_SHAPES] + WRONG_TEXT + [json.dumps({**GOOD, "tag": "v2"})]


def test_journal_lines_of_the_wrong_shape_are_skipped_never_raised():
    entries = list(journal.parse_lines(_journal_lines()))
    assert [e.tag for e in entries] == ["v1", "v2"]
    assert journal.rollback_target(entries, "v2") == "v1"
    assert "v1" in journal.render(entries) and "v2" in journal.render(entries)


def test_history_and_status_survive_a_journal_of_the_wrong_shape(tmp_path):
    root = tmp_path / "root"
    (root / "projects").mkdir(parents=True)
    (root / "projects" / "p.env").write_text("IMAGE=registry.example/p\nLOG_DIR=\n")
    raw = "\n".join(_journal_lines()).encode("utf-8", "surrogatepass") + b"\n\xff\xfe not utf-8\n"
    (root / "projects" / "p.journal").write_bytes(raw)
    env = dict(os.environ, PYTHONPATH=REPO, BLUEGREEN_ROOT=str(root))
    proc = subprocess.run([sys.executable, "-m", "bluegreen", "history", "p"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "internal error" not in proc.stderr and "v1" in proc.stdout and "v2" in proc.stdout


def test_render_never_prints_terminal_escapes_from_the_journal():
    entry = journal.Entry(time="t", host="h\x1b]0;pwned\x07", user="u", project="p", action="deploy", tag="v1",
                          result="failed", message="boom \x1b[2J cleared")
    out = journal.render([entry])
    assert "\x1b" not in out and "\x07" not in out and "boom ? cleared"[:5] in out


def test_a_journal_symlink_is_never_appended_through(planted):
    root, decoy = planted
    path = root / "projects" / "p.journal"
    path.symlink_to(decoy)
    entry = journal.Entry(time="t", host="h", user="u", project="p", action="deploy", tag="v1")
    problem = journal.append(path, entry)
    assert problem is not None and "symlink" in problem and str(path) in problem
    assert decoy.read_text() == "root:secret-hash:19000::::::\n"
    with pytest.raises(UnsafePath):
        journal.read(path)
    assert journal.read_tail(path) == []


def test_a_hard_linked_journal_is_never_appended_to(planted):
    root, decoy = planted
    path = root / "projects" / "p.journal"
    os.link(decoy, path)
    entry = journal.Entry(time="t", host="h", user="u", project="p", action="deploy", tag="v1")
    assert "hard link" in (journal.append(path, entry) or "")
    assert decoy.read_text() == "root:secret-hash:19000::::::\n"


def test_journal_reads_are_bounded_and_never_block(planted):
    root, _ = planted
    path = root / "projects" / "p.journal"
    path.symlink_to("/dev/zero")
    code = (
        "import sys\nfrom bluegreen import journal\n"
        "print(journal.read_tail(sys.argv[1]))\n"
        "try:\n    journal.read(sys.argv[1])\nexcept Exception as exc:\n    print(type(exc).__name__)\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True, text=True, timeout=20)
    assert proc.stdout.split() == ["[]", "UnsafePath"], proc.stderr
    path.unlink()
    lines = [json.dumps({**GOOD, "tag": f"v{i}"}) for i in range(3000)]
    path.write_text("\n".join(lines) + "\n")
    tail = journal.read(path, max_bytes=4096)
    assert 0 < len(tail) < 40 and tail[-1].tag == "v2999"
    assert len(journal.read(path)) == 3000


def test_freeze_and_holder_fields_are_printable_and_bounded(planted):
    root, _ = planted
    freeze = root / "projects" / "p.freeze"
    freeze.write_text(json.dumps({"message": "db\x1b[2J migration" + "x" * 5000, "user": "ops\x07", "since": "now"}))
    found = read_freeze(freeze)
    assert "\x1b" not in found.describe() and "\x07" not in found.describe() and len(found.message) < 2100
    lock_path = root / "projects" / "p.lock"
    lock_path.write_text(json.dumps({"pid": 1, "user": "u\x1b]0;x\x07", "host": "h", "tag": "t", "since": "s"}))
    assert "\x1b" not in read_holder(lock_path).describe()
