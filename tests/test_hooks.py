"""Hooks and the runner with real processes: a hook cannot hang a deploy, outlive it, or flood its memory.

And, as root, bluegreen runs no hook that someone besides root and the deploy root's owner can change.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bluegreen import hooks
from bluegreen.errors import CommandError, Interrupted
from bluegreen.runner import KILL_GRACE, RecordingRunner, Result, SubprocessRunner

REPO = Path(__file__).resolve().parent.parent
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="the owner and mode rules apply when bluegreen runs as root")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


@pytest.fixture
def pids():
    """pid files the test's processes write; whatever is still alive at the end is killed (by pid)."""
    files: list = []
    yield files
    for f in files:
        try:
            pid = int(Path(f).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def read_pid(path: Path, wait: float = 3.0) -> int:
    end = time.monotonic() + wait
    while time.monotonic() < end:
        try:
            return int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            time.sleep(0.02)
    raise AssertionError(f"{path} was not written")


def gone_soon(pid: int, wait: float = 1.0) -> bool:
    end = time.monotonic() + wait
    while alive(pid) and time.monotonic() < end:
        time.sleep(0.02)
    return not alive(pid)


@pytest.fixture
def root(tmp_path):
    """A deploy root with ROOT/hooks/api/, laid out as bluegreen expects, all root-owned and 0755."""
    r = tmp_path / "deploy"
    (r / "hooks" / "api").mkdir(parents=True)
    for d in (r, r / "hooks", r / "hooks" / "api"):
        d.chmod(0o755)
    return r


def hook(root: Path, name: str, body: str, mode: int = 0o755) -> Path:
    path = root / "hooks" / "api" / name
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(mode)
    return path


def timed(fn):
    t0 = time.monotonic()
    result = fn()
    return result, time.monotonic() - t0


# --- a hook cannot hang or outlive the deploy --------------------------------------------------------------

def test_a_hook_that_exits_0_leaving_a_child_on_its_output_is_ok_at_once_and_the_child_is_killed(root, pids):
    pidfile = root / "bg.pid"
    pids.append(pidfile)
    path = hook(root, "post-deploy", f"""\
        sleep 60 &
        echo $! > {pidfile}
        echo cache warmed
        exit 0
        """)
    result, elapsed = timed(lambda: hooks.run(SubprocessRunner(), path, dict(os.environ), timeout=20))
    assert result.ok and elapsed < 2, (result, elapsed)  # the old runner waited for the pipe: timed out at 20 s
    assert "cache warmed" in result.stdout
    assert gone_soon(read_pid(pidfile)), "the background child outlived the hook"
    assert "left processes running" in result.stderr and "killed" in hooks.output(result)


def test_a_hook_past_its_timeout_is_killed_with_its_whole_group(root, pids):
    files = [root / n for n in ("child.pid", "grandchild.pid", "stubborn.pid")]
    pids.extend(files)
    path = hook(root, "pre-deploy", f"""\
        sh -c 'sleep 60 & echo $! > {files[1]}; wait' &
        echo $! > {files[0]}
        sh -c "trap '' TERM; sleep 60 & echo \\$! > {files[2]}; wait" &
        echo working
        sleep 60
        """)
    result, elapsed = timed(lambda: hooks.run(SubprocessRunner(), path, dict(os.environ), timeout=1))
    assert result.returncode == hooks.TIMED_OUT and elapsed < 1 + KILL_GRACE + 1, (result, elapsed)
    assert "working" in result.stdout and "longer than HOOK_TIMEOUT (1s)" in hooks.output(result)
    for f in files:  # the stubborn one ignores SIGTERM: SIGKILL after the grace
        assert gone_soon(read_pid(f)), f"{f.name} survived the hook's timeout"


def test_a_hook_printing_100_mb_is_capped_without_holding_it_in_memory(root):
    path = hook(root, "post-deploy", "yes 'a line of hook output' | head -c 100000000\necho the end\n")
    # Peak memory is VmHWM of this new process image: ru_maxrss would also count the pytest process it was
    # forked from (Linux keeps ru_maxrss across exec).
    probe = (
        "import re, sys; from pathlib import Path; from bluegreen import hooks; "
        "from bluegreen.runner import SubprocessRunner; "
        "r = hooks.run(SubprocessRunner(), Path(sys.argv[1]), {'PATH': '/usr/bin:/bin'}, 60); "
        "hwm = re.search(r'VmHWM:\\s*(\\d+)', open('/proc/self/status').read()).group(1); "
        "print(r.returncode, len(r.stdout), getattr(r, 'truncated', None), hwm); "
        "print(r.stdout[-200:])"
    )
    done = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, timeout=60,
                          cwd=str(REPO))
    first, tail = done.stdout.split("\n", 1)
    code, length, truncated, max_rss_kib = first.split()
    assert int(max_rss_kib) < 60 * 1024, f"peak memory {int(max_rss_kib) // 1024} MiB for 100 MB of output"
    assert code == "0" and truncated == "True"
    assert int(length) <= hooks.OUTPUT_LIMIT + 200
    assert "the end" in tail  # the last part is kept: where a failure usually shows


def test_hook_output_shows_bluegreen_notes_even_after_many_lines():
    r = Result(("h",), 124, "\n".join(f"line {i}" for i in range(100)), "[bluegreen] the hook ran longer than X")
    shown = hooks.output(r).splitlines()
    assert len(shown) == 42 and shown[-1].strip().startswith("[bluegreen] the hook ran longer")
    assert len(hooks.output(Result(("h",), 0, "x" * 100000, ""))) < 600


# --- which hooks run as root --------------------------------------------------------------------------------

def ran(root: Path) -> bool:
    return (root / "ran").exists()


def marker_hook(root: Path, name: str = "pre-deploy", mode: int = 0o755) -> Path:
    return hook(root, name, f"touch {root / 'ran'}\n", mode)


def test_a_good_hook_runs_by_its_path_with_its_variables(root):
    out = root / "env.txt"
    path = hook(root, "pre-deploy", f'echo "$0 $BLUEGREEN_TAG" > {out}\n')
    result = hooks.run(SubprocessRunner(), path, hooks.hook_env({"PATH": "/usr/bin:/bin"}, {"tag": "v2"}), 5)
    assert result.ok and out.read_text().strip() == f"{path} v2"
    assert hooks.find(root / "hooks" / "api", "pre-deploy") == path
    assert hooks.find(root / "hooks" / "api", "post-deploy") is None


@as_root
def test_a_symlinked_hook_is_refused_not_followed(root):
    real = root / "elsewhere.sh"
    real.write_text(f"#!/bin/sh\ntouch {root / 'ran'}\n")
    real.chmod(0o755)
    link = root / "hooks" / "api" / "pre-deploy"
    link.symlink_to(real)
    assert hooks.find(root / "hooks" / "api", "pre-deploy") == link  # found, so that it is reported, not skipped
    result = hooks.run(SubprocessRunner(), link, {}, 5)
    assert result.returncode == 126 and "symlink" in result.stderr and not ran(root)


@as_root
def test_a_symlinked_hooks_directory_is_refused(root, tmp_path):
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "pre-deploy").write_text(f"#!/bin/sh\ntouch {root / 'ran'}\n")
    (planted / "pre-deploy").chmod(0o755)
    shutil.rmtree(root / "hooks" / "api")
    (root / "hooks" / "api").symlink_to(planted)
    path = hooks.find(root / "hooks" / "api", "pre-deploy")
    result = hooks.run(SubprocessRunner(), path, {}, 5)
    assert result.returncode == 126 and "symlink" in result.stderr and not ran(root)


@as_root
@pytest.mark.parametrize("where", ["hook", "project dir", "hooks dir"])
@pytest.mark.parametrize("bits", [0o020, 0o002])
def test_a_hook_others_can_change_is_refused_as_root(root, where, bits):
    path = marker_hook(root)
    target = {"hook": path, "project dir": path.parent, "hooks dir": path.parent.parent}[where]
    target.chmod(0o755 | bits)
    result = hooks.run(SubprocessRunner(), path, {}, 5)
    assert result.returncode == 126 and not ran(root)
    assert f"chmod go-w {target}" in result.stderr and "writable by its group or by everyone" in result.stderr


@as_root
def test_a_hook_owned_by_someone_else_is_refused_as_root_and_the_root_owner_is_trusted(root):
    deploy_uid, stranger_uid = 4242, 4343  # uids with no account are enough: the rule is about numbers
    os.chown(root, deploy_uid, deploy_uid)
    path = marker_hook(root)
    os.chown(path, stranger_uid, stranger_uid)
    result = hooks.run(SubprocessRunner(), path, {}, 5)
    assert result.returncode == 126 and f"chown root {path}" in result.stderr and not ran(root)
    os.chown(path, deploy_uid, deploy_uid)  # the deploy root's owner may own hooks (they own the env file too)
    assert hooks.run(SubprocessRunner(), path, {}, 5).ok and ran(root)


@as_root
def test_a_hard_linked_or_special_hook_is_refused(root):
    target = root / "elsewhere"
    target.write_text(f"#!/bin/sh\ntouch {root / 'ran'}\n")
    target.chmod(0o755)
    path = root / "hooks" / "api" / "pre-deploy"
    os.link(target, path)
    result = hooks.run(SubprocessRunner(), path, {}, 5)
    assert result.returncode == 126 and "hard link" in result.stderr and not ran(root)
    path.unlink()
    os.mkfifo(path)
    result, elapsed = timed(lambda: hooks.run(SubprocessRunner(), path, {}, 5))
    assert result.returncode == 126 and "FIFO" in result.stderr and elapsed < 1


def test_a_hook_that_is_not_executable_says_chmod(root):
    path = marker_hook(root, mode=0o644)
    result = hooks.run(SubprocessRunner(), path, {}, 5)
    assert result.returncode == 126 and "chmod +x" in result.stderr and not ran(root)


# --- the runner itself ---------------------------------------------------------------------------------------

def test_a_command_that_exits_is_done_even_if_a_child_keeps_its_output_open(tmp_path, pids):
    pidfile = tmp_path / "bg.pid"
    pids.append(pidfile)
    result, elapsed = timed(lambda: SubprocessRunner().run(
        ["sh", "-c", f"sleep 30 & echo $! > {pidfile}; echo done"], timeout=20))
    assert result.ok and result.stdout.strip() == "done" and elapsed < 2


def test_timeout_reaches_a_command_behind_a_relay_like_sudo(tmp_path, pids):
    # sudo relays SIGTERM to its command but cannot relay SIGKILL: the old runner's SIGKILL left the command
    # running. This shell relays SIGTERM the same way.
    pidfile = tmp_path / "cmd.pid"
    pids.append(pidfile)
    script = f"trap 'kill $c; exit 143' TERM; sleep 60 & c=$!; echo $c > {pidfile}; wait"
    with pytest.raises(CommandError) as exc:
        SubprocessRunner().run(["sh", "-c", script], timeout=1)
    assert "timed out after 1s" in exc.value.message
    assert gone_soon(read_pid(pidfile)), "the relayed command survived the timeout"


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("sudo") is None, reason="needs sudo, run as root")
def test_timeout_leaves_nothing_of_a_sudo_command(tmp_path, pids):
    pidfile = tmp_path / "cmd.pid"
    pids.append(pidfile)
    with pytest.raises(CommandError):
        SubprocessRunner().run(["sudo", "-n", "sh", "-c", f"echo $$ > {pidfile}; exec sleep 60"], timeout=1)
    assert gone_soon(read_pid(pidfile))


def test_an_interrupt_while_a_command_runs_kills_it(tmp_path, pids):
    pidfile = tmp_path / "cmd.pid"
    pids.append(pidfile)

    def interrupt(signum, frame):
        raise Interrupted("SIGTERM")

    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with pytest.raises(Interrupted):
            SubprocessRunner().run(["sh", "-c", f"echo $$ > {pidfile}; exec sleep 60"], timeout=30)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert gone_soon(read_pid(pidfile))


def test_output_limit_keeps_the_first_and_last_parts():
    result = SubprocessRunner().run(["sh", "-c", "echo FIRST; yes middle | head -c 5000000; echo; echo LAST"],
                                    output_limit=1000)
    assert result.truncated and len(result.stdout) < 1200
    assert result.stdout.startswith("FIRST") and result.stdout.rstrip().endswith("LAST") and "not kept" in result.stdout


def test_input_and_large_output_do_not_deadlock():
    data = os.urandom(3_000_000).hex().encode()
    result = SubprocessRunner().run(["cat"], input=data, timeout=20)
    assert result.stdout.encode() == data and not result.truncated
    assert SubprocessRunner().run(["head", "-c", "3"], input=data, timeout=5).stdout == data[:3].decode()


def test_recording_runner_accepts_the_new_options():
    rec = RecordingRunner(passthrough=SubprocessRunner())
    assert rec.run(["echo", "hi"], mutates=False, new_session=True, output_limit=10).stdout == "hi\n"
    assert rec.run(["rm", "-rf", "/nonexistent"], new_session=True, output_limit=10).ok and rec.calls
