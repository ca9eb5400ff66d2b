"""The one place that runs external programs: argv lists only, never a shell."""

from __future__ import annotations

import errno
import os
import selectors
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from bluegreen.errors import CommandError, ExecutableNotFound


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    truncated: bool = False  # output was larger than output_limit: the middle was dropped, never held in memory
    note: str = ""  # what the runner did besides running it (e.g. killed processes the command left behind)

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def display(argv: Sequence[str]) -> str:
    """Shell-quoted form of argv, for messages and --dry-run output."""
    return " ".join(shlex.quote(a) for a in argv)


def indent(text: str) -> str:
    """Every line indented by four spaces, for command output inside a message."""
    return "\n".join("    " + line for line in text.splitlines())


# Per stream (stdout, stderr): enough for any `nginx -T` or `docker inspect` of a real host, and a bound on
# what a chatty or hostile command can make bluegreen hold in memory. Callers reading untrusted output
# (container logs, hooks) pass a much smaller limit.
OUTPUT_LIMIT = 16 * 1024 * 1024
KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL (sudo relays SIGTERM to its command, not SIGKILL)
PIPE_GRACE = 0.5  # seconds to keep reading after the command exited, for output still in the pipe


class Runner:
    """Runs a command; `mutates=False` marks read-only queries that a dry run may still make.

    `new_session=True` runs it in its own session and process group: at the timeout (or an interrupt) the
    whole group is killed, and so are processes it leaves behind when it exits (hooks). `output_limit`
    bounds the bytes kept per stream (its first and last halves).
    """

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float | None = None,
        mutates: bool = True,
        env: Mapping[str, str] | None = None,
        input: bytes | None = None,
        new_session: bool = False,
        output_limit: int = OUTPUT_LIMIT,
    ) -> Result:
        raise NotImplementedError

    def stream(self, argv: Sequence[str]) -> int:
        """Run with the terminal's stdin/stdout/stderr (docker logs -f); returns the exit code."""
        raise NotImplementedError


class SubprocessRunner(Runner):
    """Runs commands for real, capturing text output (bounded), and never leaves one running past its timeout."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self.env = dict(env) if env is not None else None

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float | None = None,
        mutates: bool = True,
        env: Mapping[str, str] | None = None,
        input: bytes | None = None,
        new_session: bool = False,
        output_limit: int = OUTPUT_LIMIT,
    ) -> Result:
        argv = [str(a) for a in argv]
        try:
            # `input` goes through a pipe (secrets for `docker run --env-file /dev/stdin`): never a file.
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=dict(env) if env is not None else self.env,
                start_new_session=new_session,
            )
        except (FileNotFoundError, PermissionError) as exc:
            raise _not_runnable(argv[0], exc) from None
        out, err = _Capture(output_limit), _Capture(output_limit)
        note = ""
        try:
            timed_out = _collect(proc, out, err, input, timeout)
            if timed_out:
                _stop(proc, new_session)
            elif new_session and _group_alive(proc.pid):
                _stop(proc, True, grace=PIPE_GRACE)
                note = "it left processes running when it exited; bluegreen killed them"
        except BaseException:  # an interrupt (SIGTERM/SIGINT) while it runs: it must not outlive us
            _stop(proc, new_session)
            raise
        finally:
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    try:
                        pipe.close()
                    except OSError:
                        pass
        if timed_out:
            raise CommandError(argv, -1, out.text(), f"timed out after {timeout:g}s\n{err.text()}")
        result = Result(tuple(argv), proc.returncode if proc.returncode is not None else -1, out.text(), err.text(),
                         out.dropped > 0 or err.dropped > 0, note)
        if check and not result.ok:
            raise CommandError(argv, result.returncode, result.stdout, result.stderr)
        return result

    def stream(self, argv: Sequence[str]) -> int:
        argv = [str(a) for a in argv]
        try:
            return subprocess.call(argv, env=self.env)
        except (FileNotFoundError, PermissionError) as exc:
            raise _not_runnable(argv[0], exc) from None


def _not_runnable(exe: str, exc: OSError) -> ExecutableNotFound:
    if isinstance(exc, PermissionError):
        return ExecutableNotFound(f"Executable `{exe}` exists but may not be run by this user.")
    return ExecutableNotFound(
        f"Executable `{exe}` not found on PATH. Install it, or point bluegreen at it "
        f"(BLUEGREEN_DOCKER / BLUEGREEN_NGINX). Nothing was changed."
    )


class _Capture:
    """Keeps the first and the last `limit // 2` bytes of a stream; counts what it drops."""

    def __init__(self, limit: int) -> None:
        self.head_limit = max(0, limit) // 2
        self.tail_limit = max(0, limit) - self.head_limit
        self.head = bytearray()
        self.tail = bytearray()
        self.dropped = 0

    def add(self, data: bytes) -> None:
        room = self.head_limit - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        self.tail += data
        if len(self.tail) > 2 * self.tail_limit + 65536:
            self._trim()

    def _trim(self) -> None:
        extra = len(self.tail) - self.tail_limit
        if extra > 0:
            self.dropped += extra
            del self.tail[:extra]

    def text(self) -> str:
        self._trim()
        if not self.dropped:
            return _text(bytes(self.head + self.tail))
        return f"{_text(bytes(self.head))}\n[... {self.dropped} bytes of output not kept ...]\n{_text(bytes(self.tail))}"


def _collect(proc: subprocess.Popen, out: _Capture, err: _Capture, data: bytes | None, timeout: float | None) -> bool:
    """Feed stdin and read output until the command exits (plus PIPE_GRACE) or the timeout; True if timed out.

    The end is the command's own exit, not the end of its output: a background child that inherited the
    pipe would otherwise hold the read (and the deploy) until the timeout.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    captures = {proc.stdout: out, proc.stderr: err}
    sel = selectors.DefaultSelector()
    pending = memoryview(data or b"")
    try:
        for pipe in captures:
            sel.register(pipe, selectors.EVENT_READ)
        if proc.stdin is not None:
            if pending:
                os.set_blocking(proc.stdin.fileno(), False)
                sel.register(proc.stdin, selectors.EVENT_WRITE)
            else:
                proc.stdin.close()
        exited_at: float | None = None
        while True:
            now = time.monotonic()
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            reading = [k for k in sel.get_map().values() if k.fileobj is not proc.stdin]
            if exited_at is not None and not reading:
                return False
            if exited_at is not None and now - exited_at >= PIPE_GRACE:
                # What is already in the pipes is the command's last words (a busy host may have kept us
                # from reading during the grace): take it, but never wait for more.
                _drain(sel, captures, proc.stdin)
                return False
            if deadline is not None and now >= deadline:
                return True
            wait = 0.05 if exited_at is None else PIPE_GRACE - (now - exited_at)
            if deadline is not None:
                wait = min(wait, deadline - now)
            if not sel.get_map():
                # Every pipe is closed: only the exit is left to wait for, and waiting on it (not polling
                # every 50 ms) returns the moment it comes; a deploy runs dozens of commands.
                try:
                    proc.wait(timeout=None if deadline is None else max(0.0, deadline - now))
                except subprocess.TimeoutExpired:
                    return True
                continue
            for key, _events in sel.select(max(0.0, wait)):
                if key.fileobj is proc.stdin:
                    pending = _feed(proc, sel, pending)
                    continue
                chunk = os.read(key.fd, 65536)
                if chunk:
                    captures[key.fileobj].add(chunk)
                else:
                    sel.unregister(key.fileobj)
    finally:
        sel.close()


def _drain(sel: selectors.BaseSelector, captures: dict, stdin: object, limit: int = 1024 * 1024) -> None:
    """Read what the pipes hold right now, up to `limit` bytes; never blocks."""
    taken = 0
    while taken < limit:
        ready = [key for key, _ in sel.select(0) if key.fileobj is not stdin]
        if not ready:
            return
        for key in ready:
            chunk = os.read(key.fd, 65536)
            if chunk:
                captures[key.fileobj].add(chunk)
                taken += len(chunk)
            else:
                sel.unregister(key.fileobj)


def _feed(proc: subprocess.Popen, sel: selectors.BaseSelector, pending: memoryview) -> memoryview:
    """Write what stdin can take now; closes it when all is written or the command stopped reading."""
    assert proc.stdin is not None
    try:
        pending = pending[os.write(proc.stdin.fileno(), pending[:65536]):]
    except BlockingIOError:
        return pending
    except OSError as exc:
        if exc.errno not in (errno.EPIPE, errno.EINVAL):
            raise
        pending = pending[:0]
    if not pending:
        sel.unregister(proc.stdin)
        proc.stdin.close()
    return pending


def _signal(proc: subprocess.Popen, group: bool, sig: int) -> None:
    try:
        if group:
            os.killpg(proc.pid, sig)
        elif proc.returncode is None:
            proc.send_signal(sig)
    except (ProcessLookupError, PermissionError):
        pass


def _gone(proc: subprocess.Popen, group: bool) -> bool:
    return proc.poll() is not None and (not group or not _group_alive(proc.pid))


def _stop(proc: subprocess.Popen, group: bool, grace: float = KILL_GRACE) -> None:
    """SIGTERM (to the whole group when it has its own), `grace` to exit, then SIGKILL; reaps the command.

    SIGTERM first because `sudo` relays it to its command (SIGKILL would leave the command running).
    """
    try:
        _signal(proc, group, signal.SIGTERM)
        end = time.monotonic() + grace
        while not _gone(proc, group) and time.monotonic() < end:
            time.sleep(0.02)
    finally:
        # Unconditional, so it also happens when a second signal interrupts the grace period above.
        _signal(proc, group, signal.SIGKILL)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def proc_stat(pid: int | str, proc: str = "/proc") -> list[bytes] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, pgrp, ...); None once it has exited.

    Read as bytes: the command name is any local user's choice (spaces, ')', bytes that are not UTF-8), so
    everything after its last ')' is split, never decoded."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as fh:
            data = fh.read(4096)
    except OSError:
        return None
    return data[data.rfind(b")") + 1:].split()


def _group_alive(pgid: int) -> bool:
    """True while any process of group `pgid` is alive (zombies waiting for their parent do not count)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        names = os.listdir("/proc")
    except OSError:
        return True
    for name in names:
        if not name.isdigit():
            continue
        fields = proc_stat(name)
        if fields is not None and len(fields) >= 3 and fields[2] == str(pgid).encode() and fields[0] not in (b"Z", b"X"):
            return True
    return False


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    if isinstance(data, bytes):
        return data.decode("utf-8", errors="replace")
    return data


Responder = Callable[[Sequence[str]], "Result | None"]


@dataclass
class RecordingRunner(Runner):
    """Records every argv; answers from `responder` (tests) or with success (dry runs).

    With `passthrough` set, read-only commands (`mutates=False`) really run, so a dry run
    plans from the host's true state while changing nothing.
    """

    responder: Responder | None = None
    passthrough: Runner | None = None
    calls: list[tuple[str, ...]] = field(default_factory=list)
    inputs: dict[int, bytes] = field(default_factory=dict)  # index in `calls` -> what went to its stdin

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float | None = None,
        mutates: bool = True,
        env: Mapping[str, str] | None = None,
        input: bytes | None = None,
        new_session: bool = False,
        output_limit: int = OUTPUT_LIMIT,
    ) -> Result:
        argv = tuple(str(a) for a in argv)
        if self.passthrough is not None and not mutates:
            return self.passthrough.run(argv, check=check, timeout=timeout, mutates=False, env=env, input=input,
                                        new_session=new_session, output_limit=output_limit)
        self.calls.append(argv)
        if input is not None:
            self.inputs[len(self.calls) - 1] = input
        result = self.responder(argv) if self.responder else None
        if result is None:
            result = Result(argv, 0, "", "")
        if check and not result.ok:
            raise CommandError(list(argv), result.returncode, result.stdout, result.stderr)
        return result

    def stream(self, argv: Sequence[str]) -> int:
        self.calls.append(tuple(str(a) for a in argv))
        return 0
