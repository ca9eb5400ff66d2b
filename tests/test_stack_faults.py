"""Real-stack fault matrix: kill -9, SIGTERM and Ctrl-C at every step of a deploy.

Each case deploys one version over a serving one, lands a signal inside one step (the product's
test-only fault point BLUEGREEN_FAULT_PAUSE=STEP pauses at the start of STEP and prints its pid),
and then proves the core promise:

1. a healthy version answers through nginx (which one depends on how far the deploy got), and nginx
   routes to a running, healthy container;
2. `bluegreen status PROJECT --json` tells the truth: its serving colour and tag are what answers,
   every drift it lists is real, and what is left over is named;
3. no file under /tmp, $TMPDIR, the deploy root or /dev/shm holds the app's secret, and no new
   /tmp/bluegreen-*.env exists;
4. the next deploy (no fault) succeeds, serves its version, and leaves status clean.

Signals, as they arrive in real life:
* SIGKILL (kill -9, OOM killer, power cut of the process): only the python process; its children
  (docker, nginx) live on, as they would. A killed deploy cannot journal itself.
* SIGTERM (CI cancel, systemd stop): only the python process.
* SIGINT: Ctrl-C in a terminal, which the kernel sends to the whole foreground process group, so
  the deploy runs in its own session (start_new_session) and the group gets it (os.killpg).

Faults no pause point reaches have their own tests: a signal while `docker run` holds the secrets,
a crash between writing the upstream file and reloading nginx, and SIGTERM during the drain while
a long request is in flight.

The cases share one project: after each case's recovery deploy the project is clean and serves,
which is where the next case starts (a case that fails leaves a mess the next one first repairs).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import stack as stacklib
from conftest import Project

STEPS = ("pull", "start", "health", "switch", "drain", "verify", "retire", "record")
# Steps that run after `nginx -s reload`: a kill -9 there leaves nginx routing to the new container.
AFTER_RELOAD = ("drain", "verify", "retire", "record")
# Steps after the switch is committed: SIGTERM/SIGINT there leave the new version serving (exit 4).
AFTER_COMMIT = ("retire", "record")
SIGNALS = ("SIGKILL", "SIGTERM", "SIGINT")
VERSIONS = ("v1", "v2", "v3")

EXIT_FAILED = 1
EXIT_ATTENTION = 4
# A CI cancel kills a few seconds after its first signal (GitHub Actions: SIGINT, SIGTERM 7.5 s later,
# SIGKILL 2.5 s after that): the undo must be done well inside that.
UNDO_BOUND = 6.0
SCAN_CAP = 8 << 20  # bytes read per file by the secret scan; a leaked env file is tiny

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --------------------------------------------------------------------------
# the shared project
# --------------------------------------------------------------------------

class Faults:
    """The project every case deploys, its app secret, and the version serving between cases."""

    def __init__(self, project: Project, secret: str) -> None:
        self.project = project
        self.secret = secret
        self.serving = ""  # the version a clean project serves between cases
        self.clean = False  # True right after a recovery deploy passed every check

    @property
    def name(self) -> str:
        return self.project.name

    def write_env(self, **keys) -> None:
        values = dict(DB_PASSWORD=self.secret, DRAIN_TIMEOUT="2", STOP_TIMEOUT="2", VERIFY_TIMEOUT="3",
                      HEALTH_TIMEOUT="20")
        values.update(keys)
        self.project.write_env(**values)


@pytest.fixture(scope="module")
def faults(stack):
    project = Project(stack, "t-faults-%s" % secrets.token_hex(2))
    ctx = Faults(project, "s3cret-" + secrets.token_hex(16))
    try:
        ctx.write_env()
        project.run(project.name, "v1", check=True)
        project.serve()  # with the route header line, so every deploy below proves its routing
        ctx.serving = "v1"
        yield ctx
    finally:
        for proc in list(project._popens):
            _kill_group(proc)
        project.teardown()


def _next(version: str) -> str:
    return VERSIONS[(VERSIONS.index(version) + 1) % len(VERSIONS)]


# --------------------------------------------------------------------------
# running a deploy and landing a signal
# --------------------------------------------------------------------------

class Deploy:
    """A background deploy in its own session, with its stderr collected line by line."""

    def __init__(self, ctx: Faults, tag: str, env: dict) -> None:
        argv = [sys.executable, ctx.project.stack.pyz, ctx.name, tag]
        self.proc = subprocess.Popen(argv, env=ctx.project._env(env), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        ctx.project._popens.append(self.proc)  # killed at teardown if still running
        self.lines: list = []
        self.out: list = []
        self._err = threading.Thread(target=self._drain, args=(self.proc.stderr, self.lines), daemon=True)
        self._out = threading.Thread(target=self._drain, args=(self.proc.stdout, self.out), daemon=True)
        self._err.start()
        self._out.start()

    @staticmethod
    def _drain(stream, into: list) -> None:
        for line in stream:
            into.append(line)

    def wait_for_pause(self, step: str, timeout: float = 60) -> int:
        """Wait for the fault point's line; returns the pid it names."""
        pattern = re.compile(r"fault-pause: %s \(pid (\d+)," % re.escape(step))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                found = pattern.search(line)
                if found:
                    return int(found.group(1))
            if self.proc.poll() is not None:
                break
            time.sleep(0.01)
        raise AssertionError("no `fault-pause: %s` line (exit %s); stderr:\n%s"
                             % (step, self.proc.poll(), self.stderr()))

    def stderr(self) -> str:
        if self.proc.poll() is not None:
            self._err.join(timeout=5)
        return "".join(self.lines)

    def stdout(self) -> str:
        if self.proc.poll() is not None:
            self._out.join(timeout=5)
        return "".join(self.out)


def send(deploy: Deploy, signame: str) -> None:
    """kill -9 / SIGTERM to the python process; SIGINT to the process group, as a terminal's Ctrl-C."""
    if signame == "SIGINT":
        os.killpg(deploy.proc.pid, signal.SIGINT)
    else:
        os.kill(deploy.proc.pid, getattr(signal, signame))


def _group_members(pgid: int) -> list:
    """Live (non-zombie) processes in process group pgid."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry, "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != b"Z" and int(fields[2]) == pgid:
            members.append(int(entry))
    return members


def _cmdline(pid: int) -> list:
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as fh:
            return fh.read().split(b"\0")
    except OSError:
        return []


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def finish(deploy: Deploy, signame: str, timeout: float) -> tuple:
    """Wait for the signalled deploy; then for the children a kill -9 orphaned (a `docker run` goes on
    and creates its container, as on a real host), bounded, so the checks see a settled host.
    Returns (exit code, seconds from now to exit)."""
    sent = time.monotonic()
    try:
        code = deploy.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(deploy.proc)
        raise AssertionError("the deploy did not exit within %ss of %s; stderr:\n%s"
                             % (timeout, signame, deploy.stderr()))
    took = time.monotonic() - sent
    deadline = time.monotonic() + 30
    while _group_members(deploy.proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    leftover = _group_members(deploy.proc.pid)
    if leftover:
        os.killpg(deploy.proc.pid, signal.SIGKILL)
    return code, took


# --------------------------------------------------------------------------
# what is true on the host
# --------------------------------------------------------------------------

def _shutting_down(pid: int) -> bool:
    return b"shutting down" in b" ".join(_cmdline(pid))


def nginx_quiet(ctx: Faults, timeout: float = 10) -> None:
    """Wait until a reload the faulted deploy sent has taken effect: the same workers for 0.3 s and
    none of them shutting down (after a reload, the old workers accept for about 100 ms more)."""
    ngx = ctx.project.stack.nginx
    deadline = time.monotonic() + timeout
    seen, since = None, time.monotonic()
    while time.monotonic() < deadline:
        workers = ngx.worker_pids()
        if workers != seen or any(_shutting_down(pid) for pid in workers):
            seen, since = workers, time.monotonic()
        elif time.monotonic() - since >= 0.3:
            return
        time.sleep(0.02)
    raise AssertionError("nginx workers did not settle within %ss: %r" % (timeout, ngx.worker_pids()))


def nginx_version(ctx: Faults) -> str:
    """The version nginx answers with: five requests, all 200 and the same."""
    nginx_quiet(ctx)
    answers = {ctx.project.get("/version") for _ in range(5)}
    assert len(answers) == 1 and next(iter(answers))[0] == 200, "nginx answered %r" % answers
    return next(iter(answers))[1].strip()


def routed_port(ctx: Faults) -> int:
    """Where nginx routes now, from the route header a probe with the project's token gets back."""
    text = Path(ctx.project.upstream_file).read_text()
    token = re.search(r'"([0-9a-f]{32})" \$upstream_addr', text)
    assert token, "no probe token in the upstream file:\n" + text
    req = urllib.request.Request(ctx.project.url("/version"), headers={"X-Bluegreen-Probe": token.group(1)})
    try:
        with _NO_PROXY.open(req, timeout=5) as resp:
            route = resp.headers.get("X-Bluegreen-Upstream", "")
    except urllib.error.HTTPError as err:
        route = err.headers.get("X-Bluegreen-Upstream", "")
    found = re.fullmatch(r"127\.0\.0\.1:(\d+)", route.strip())
    assert found, "nginx did not say where it routed: %r" % route
    return int(found.group(1))


def containers(ctx: Faults) -> dict:
    """colour -> (state, tag label) as docker sees it; state "absent" when there is none."""
    names = ["%s-%s" % (ctx.name, colour) for colour in ("blue", "green")]
    # One call for both; it exits 1 when one is missing and still prints the other.
    proc = stacklib.docker("container", "inspect", *names, check=False)
    found = {info["Name"].lstrip("/"): info for info in json.loads(proc.stdout or "[]")}
    if proc.returncode != 0 and "no such" not in proc.stderr.lower():  # not "absent": docker failed
        raise AssertionError("docker container inspect failed: %s" % proc.stderr)
    out = {}
    for colour, name in zip(("blue", "green"), names):
        info = found.get(name)
        out[colour] = ("absent", None) if info is None else (
            info["State"]["Status"], (info["Config"]["Labels"] or {}).get("bluegreen.tag"))
    return out


def read_active(ctx: Faults) -> str:
    try:
        return Path(ctx.project.stack.projects_dir, ctx.name + ".active").read_text().strip()
    except FileNotFoundError:
        return ""


def journal(ctx: Faults) -> list:
    try:
        text = Path(ctx.project.stack.projects_dir, ctx.name + ".journal").read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def status(ctx: Faults) -> dict:
    proc = ctx.project.run("status", ctx.name, "--json", timeout=60)
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr, proc.stderr
    try:
        found = json.loads(proc.stdout)
    except ValueError:
        raise AssertionError("status --json exited %d with no JSON:\n%s\n%s"
                             % (proc.returncode, proc.stdout, proc.stderr))
    assert len(found) == 1 and found[0]["project"] == ctx.name, proc.stdout
    return found[0]


def serves_truthfully(ctx: Faults, expect_version: str, also_real: tuple = ()) -> dict:
    """Checks 1 and 2: nginx answers `expect_version` from a running, healthy container, and status
    says so; every drift item is real and every leftover is named. `also_real` lists words of drift
    that is real in a case's own state (beyond a running leftover and a stale active file)."""
    answered = nginx_version(ctx)
    assert answered == expect_version, "nginx answers %s, expected %s" % (answered, expect_version)
    port = routed_port(ctx)
    cfg_ports = {ctx.project.blue_port: "blue", ctx.project.green_port: "green"}
    assert port in cfg_ports, "nginx routes to 127.0.0.1:%d, which is neither colour's port" % port
    routed = cfg_ports[port]
    other = "green" if routed == "blue" else "blue"
    real = containers(ctx)
    assert real[routed] == ("running", answered), "nginx routes to %s, which docker shows as %r" % (routed, real[routed])
    code, body = stacklib.http_get("http://127.0.0.1:%d/api/health" % port)
    assert code == 200, "the container nginx routes to is not healthy: %s %s" % (code, body)

    st = status(ctx)
    assert st["serving"] == routed, "status says %s serves, but nginx routes to %s (answering %s)" % (
        st["serving"], routed, answered)
    assert st["tag"] == answered, "status says tag %s serves, but nginx answers %s" % (st["tag"], answered)
    assert st["lock"] is None, "no deploy runs, yet status shows a lock: %r" % st["lock"]
    by_colour = {c["colour"]: c for c in st["colours"]}
    for colour, (state, tag) in real.items():
        assert by_colour[colour]["state"] == state, "status: %s is %s, docker: %s" % (
            colour, by_colour[colour]["state"], state)
        if state != "absent":
            assert by_colour[colour]["tag"] == tag
    assert by_colour[routed]["healthy"] is True, by_colour[routed]

    problems = [d["problem"] for d in st["drift"]]
    leftover = real[other][0] == "running"
    stale_active = read_active(ctx) != routed
    other_name = "%s-%s" % (ctx.name, other)
    for problem in problems:
        assert "is down" not in problem, "status says the service is down while %s answers: %s" % (answered, problem)
        explained = (leftover and other_name in problem) or (stale_active and ".active" in problem) or \
            any(word in problem for word in also_real)
        assert explained, "status lists drift that is not real: %r (all: %r)" % (problem, problems)
    if leftover:
        assert any(other_name in p for p in problems), \
            "%s still runs (%s) but status does not name it: %r" % (other_name, real[other][1], problems)
    if stale_active:
        assert any(".active" in p for p in problems), \
            "%s.active says %r but nginx routes to %s, and status does not say so: %r" % (
                ctx.name, read_active(ctx), routed, problems)
    return st


def files_holding(secret: bytes, roots: list, skip: set) -> list:
    """Regular files under roots whose bytes contain secret (no symlink followed, no FIFO opened)."""
    hits = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            for fname in filenames:
                path = os.path.join(dirpath, fname)
                if path in skip:
                    continue
                try:
                    if not stat.S_ISREG(os.lstat(path).st_mode):
                        continue
                    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
                except OSError:
                    continue
                try:
                    if not stat.S_ISREG(os.fstat(fd).st_mode):
                        continue
                    data = b""
                    while len(data) < SCAN_CAP:
                        chunk = os.read(fd, 1 << 20)
                        if not chunk:
                            break
                        data += chunk
                    if secret in data:
                        hits.append(path)
                except OSError:
                    pass
                finally:
                    os.close(fd)
    return hits


def env_files() -> set:
    return {name for name in os.listdir("/tmp") if name.startswith("bluegreen-") and name.endswith(".env")}


def no_secret_left(ctx: Faults, env_files_before: set) -> None:
    """Check 3: the app secret is in no file but the project's own env file."""
    roots = ["/tmp", "/dev/shm", str(ctx.project.stack.root)]
    if os.environ.get("TMPDIR"):
        roots.append(os.environ["TMPDIR"])
    hits = files_holding(ctx.secret.encode(), roots, skip={ctx.project.env_file})
    new_env_files = sorted(env_files() - env_files_before)
    for path in hits:  # never leave the leak behind for the next case to trip on
        os.unlink(path)
    assert not hits, "the app secret outlived the deploy in: %s" % ", ".join(hits)
    assert not new_env_files, "left in /tmp: %s" % ", ".join(new_env_files)


def recover(ctx: Faults, version: str) -> None:
    """Check 4: a deploy with no fault succeeds, serves its version, and status is clean."""
    proc = ctx.project.run(ctx.name, version, timeout=120)
    assert proc.returncode == 0, "the recovery deploy of %s exited %d:\n%s%s" % (
        version, proc.returncode, proc.stdout, proc.stderr)
    st = serves_truthfully(ctx, version)
    assert st["drift"] == [], "after a clean deploy, status lists drift: %r" % st["drift"]
    ctx.serving = version
    ctx.clean = True


def settled(ctx: Faults) -> str:
    """The version a clean project serves; after a failed case, a deploy first brings it back."""
    if ctx.clean:  # the previous case's recovery deploy proved it
        ctx.clean = False
        return ctx.serving
    try:
        st = serves_truthfully(ctx, ctx.serving)
        if not st["drift"]:
            return ctx.serving
    except AssertionError:
        pass
    recover(ctx, _next(ctx.serving))
    return ctx.serving


def check_journal(ctx: Faults, before: int, signame: str, tag: str, step: str, code: int) -> None:
    entries = journal(ctx)
    if signame == "SIGKILL":
        # A kill -9'd process runs no code at all: it cannot journal its own attempt.
        assert len(entries) == before, entries[before:]
        return
    assert len(entries) == before + 1, "the %s'd attempt was not journaled once: %r" % (signame, entries[before:])
    last = entries[-1]
    want = {EXIT_FAILED: "failed", EXIT_ATTENTION: "attention"}[code]
    assert (last["tag"], last["result"], last["exit_code"], last["failed_step"]) == (tag, want, code, step), last


def after_fault(ctx: Faults, expect: str, next_version: str, env_before: set, also_real: tuple = ()) -> None:
    """Checks 1 to 4 after a faulted deploy."""
    serves_truthfully(ctx, expect, also_real)
    no_secret_left(ctx, env_before)
    recover(ctx, next_version)


@contextlib.contextmanager
def diagnosed(ctx: Faults, deploy: Deploy):
    """On a failure, print the faulted deploy's output and the project's state (pytest shows it)."""
    try:
        yield
    except BaseException:
        print("==== faulted deploy (exit %s) stderr ====\n%s" % (deploy.proc.poll(), deploy.stderr()))
        try:
            print("==== project ====\n%s" % ctx.project.diagnostics())
        except Exception as err:
            print("diagnostics failed: %s" % err)
        raise


# --------------------------------------------------------------------------
# the matrix
# --------------------------------------------------------------------------

@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("signame", SIGNALS)
def test_signal_at_every_step(faults, signame, step):
    old = settled(faults)
    new = _next(old)
    env_before = env_files()
    journaled = len(journal(faults))

    deploy = Deploy(faults, new, {"BLUEGREEN_FAULT_PAUSE": "%s:30" % step})
    with diagnosed(faults, deploy):
        _signal_case(faults, deploy, signame, step, old, new, env_before, journaled)


def _signal_case(faults, deploy, signame, step, old, new, env_before, journaled):
    pid = deploy.wait_for_pause(step)
    assert pid == deploy.proc.pid, "the pause names pid %d, the deploy is pid %d" % (pid, deploy.proc.pid)
    send(deploy, signame)
    code, took = finish(deploy, signame, timeout=30)
    err = deploy.stderr()

    if signame == "SIGKILL":
        assert code == -signal.SIGKILL
        # nginx routes to the new container once the reload has been sent; before it, to the old.
        expect = new if step in AFTER_RELOAD else old
    else:
        want = EXIT_ATTENTION if step in AFTER_COMMIT else EXIT_FAILED
        assert code == want, "exit %d after %s in %s, expected %d:\n%s" % (code, signame, step, want, err)
        assert took < UNDO_BOUND, "%s in %s took %.1fs to exit" % (signame, step, took)
        assert "Traceback" not in err and "interrupted by %s" % signame in err, err
        # Up to verify the undo puts the old version back; from retire on the new one serves.
        expect = new if step in AFTER_COMMIT else old
        if step not in AFTER_COMMIT:
            assert "still serves" in err, err
            assert _running_versions(faults) == [old], \
                "after the undo, not only the old container runs: %r" % containers(faults)
    check_journal(faults, journaled, signame, new, step, code)
    after_fault(faults, expect, _next(new), env_before)



def _running_versions(ctx: Faults) -> list:
    return sorted(tag for state, tag in containers(ctx).values() if state == "running")


def _wait_for_child(deploy: Deploy, want, timeout: float = 60) -> list:
    """Poll the deploy's process group until a process whose argv satisfies `want` runs; its argv."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in _group_members(deploy.proc.pid):
            argv = _cmdline(pid)
            if pid != deploy.proc.pid and want(argv):
                return argv
        if deploy.proc.poll() is not None:
            break
        time.sleep(0.002)
    raise AssertionError("the awaited child never ran (exit %s); stderr:\n%s" % (deploy.proc.poll(), deploy.stderr()))


@pytest.mark.parametrize("signame", SIGNALS)
def test_signal_during_docker_run(faults, signame):
    """The one moment the app's secrets are handed to docker: a signal while `docker run` runs.

    No fault point is needed: the test watches the deploy's children and signals as soon as
    `docker run` is among them (it takes a few hundred milliseconds to create the container).
    A kill -9 leaves that `docker run` orphaned, and it goes on to create and start its container,
    as on a real host; the secrets must still not outlive the killed process in any file.
    """
    old = settled(faults)
    new = _next(old)
    env_before = env_files()
    journaled = len(journal(faults))
    prefix = (faults.name + "-").encode()
    deploy = Deploy(faults, new, {})
    with diagnosed(faults, deploy):
        _wait_for_child(deploy, lambda argv: b"run" in argv and any(a.startswith(prefix) for a in argv))
        send(deploy, signame)
        code, took = finish(deploy, signame, timeout=30)
        if signame == "SIGKILL":
            assert code == -signal.SIGKILL
        else:
            err = deploy.stderr()
            assert code == EXIT_FAILED, "exit %d after %s during docker run:\n%s" % (code, signame, err)
            assert took < UNDO_BOUND, "%s during docker run took %.1fs to exit" % (signame, took)
            assert "Traceback" not in err and "still serves" in err, err
            assert _running_versions(faults) == [old], \
                "after the undo, not only the old container runs: %r" % containers(faults)
        check_journal(faults, journaled, signame, new, "start", code)
        after_fault(faults, old, _next(new), env_before)


def _client(ctx: Faults, stop: threading.Event, answers: list) -> threading.Thread:
    """Requests through nginx back to back until `stop`, collecting (status, body)."""
    def loop() -> None:
        while not stop.is_set():
            answers.append(ctx.project.get("/version", timeout=5))

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def _crash_before_reload(ctx: Faults) -> tuple:
    """Leave the upstream file naming the new colour while nginx, never reloaded, routes to the old.

    This is what a crash between writing the upstream file and `nginx -s reload` leaves (or a hand
    edit without a reload). It is made as a kill -9 at the start of the switch, then the upstream
    file is rewritten to the new colour's port as the switch would have: no signal can be aimed
    between two lines of the product, and the state is the same. Returns (old, new, env_before).
    """
    old = settled(ctx)
    new = _next(old)
    env_before = env_files()
    deploy = Deploy(ctx, new, {"BLUEGREEN_FAULT_PAUSE": "switch:30"})
    with diagnosed(ctx, deploy):
        deploy.wait_for_pause("switch")
        send(deploy, "SIGKILL")
        finish(deploy, "SIGKILL", timeout=30)
        path = Path(ctx.project.upstream_file)
        routed = {ctx.project.blue_port: "blue", ctx.project.green_port: "green"}[routed_port(ctx)]
        target = "green" if routed == "blue" else "blue"
        target_port = ctx.project.green_port if target == "green" else ctx.project.blue_port
        text, count = re.subn(r"server 127\.0\.0\.1:\d+;", "server 127.0.0.1:%d;" % target_port, path.read_text())
        assert count == 1, text
        path.write_text(text.replace("colour=%s tag=%s" % (routed, old), "colour=%s tag=%s" % (target, new)))
        assert containers(ctx)[target] == ("running", new)
        assert routed_port(ctx) != target_port
    return old, new, env_before


def test_upstream_written_but_not_reloaded_status_says_what_nginx_routes_to(faults):
    old, new, env_before = _crash_before_reload(faults)
    # nginx still routes to the old container; the file is the only thing that changed. Drift about
    # the upstream file not being what nginx loaded is real here.
    serves_truthfully(faults, old, also_real=("upstream", "reload"))
    no_secret_left(faults, env_before)
    recover(faults, _next(new))


def test_upstream_written_but_not_reloaded_next_deploy_keeps_serving(faults):
    """The next deploy must not remove the container nginx still routes to: a client requests
    through nginx all along and must see only 200s."""
    old, new, env_before = _crash_before_reload(faults)
    answers: list = []
    stop = threading.Event()
    client = _client(faults, stop, answers)
    try:
        recover(faults, _next(new))
    finally:
        stop.set()
        client.join(timeout=10)
    bad = [a for a in answers if a[0] != 200]
    assert answers and not bad, "%d of %d requests through nginx failed during the next deploy: %r" % (
        len(bad), len(answers), sorted({a[0] for a in bad}))
    assert {a[1] for a in answers} <= {old, _next(new)}, {a[1] for a in answers}


def test_sigterm_in_drain_with_a_long_request_in_flight(faults):
    """The undo after a SIGTERM during the drain must not wait for old workers that route to the
    container it keeps: a CI cancel sends SIGKILL a few seconds after SIGTERM."""
    old = settled(faults)
    new = _next(old)
    env_before = env_files()
    faults.write_env(DRAIN_TIMEOUT="20")
    try:
        answer: dict = {}

        def long_request() -> None:
            answer["got"] = faults.project.get("/cgi-bin/slow?10", timeout=30)

        client = threading.Thread(target=long_request, daemon=True)
        client.start()
        time.sleep(0.5)  # held by a worker from before the reload, routed to the old container
        deploy = Deploy(faults, new, {"BLUEGREEN_FAULT_PAUSE": "drain:30"})
        with diagnosed(faults, deploy):
            deploy.wait_for_pause("drain")
            send(deploy, "SIGTERM")
            code, took = finish(deploy, "SIGTERM", timeout=60)
            assert code == EXIT_FAILED, deploy.stderr()
            assert took < UNDO_BOUND, "SIGTERM during the drain took %.1fs to exit; stderr:\n%s" % (
                took, deploy.stderr())
            client.join(timeout=30)
            assert answer.get("got") == (200, "slow %s" % old), answer
    finally:
        faults.write_env()
    faults.clean = False
    after_fault(faults, old, _next(new), env_before)
