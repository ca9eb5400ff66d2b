"""`bluegreen rollout`: deploy one project to a fleet of hosts over the system OpenSSH client.

Preflight on every host in parallel (the tool itself sent where its copy differs), pull everywhere in
parallel, then the ordinary `deploy` host by host (or batch by batch) between the load balancer hooks; on a
failure no later host is touched, and `--revert-on-failure` rolls the switched hosts back. Deciding is in
`bluegreen.fleet`; this module runs ssh and the hooks and reports."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence, TextIO

from bluegreen import fleet, host
from bluegreen.config import Settings, is_tag, validate_project, validate_tag
from bluegreen.errors import (EXIT_ATTENTION, EXIT_FAILED, EXIT_LOCKED, EXIT_OK, EXIT_USAGE, BluegreenError, CommandError,
                              UsageError)
from bluegreen.fleet import HostResult, SshOptions, Target
from bluegreen.journal import parse_line
from bluegreen.runner import Result, Runner, SubprocessRunner

REMOTE_MIN_PYTHON = (3, 9)
SSH_UNREACHABLE = 255  # ssh's own exit code for a connection or authentication failure
PARALLEL = 16  # hosts preflighted and pulled at once
HOOK_NAMES = ("rollout-before-host", "rollout-after-host")
LINE_MAX = 2000  # a remote line shown at most this long (the host's output is untrusted)
OUTPUT_LIMIT = 1 << 20  # what is kept of one remote command's output (doctor --json is a few KiB)
HOOK_OUTPUT_LIMIT = 64 * 1024
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")

# Where the tool lives on a host: --remote-pyz, else ROOT/bluegreen.pyz with the host's BLUEGREEN_ROOT (as
# `setup` installs it), else /opt/deploy/bluegreen.pyz. Resolved on the host by each snippet's first lines.
_WHERE = """import sys, os
p = sys.argv[1] or os.path.join(os.environ.get("BLUEGREEN_ROOT") or "/opt/deploy", "bluegreen.pyz")
"""

# Starts the tool on the host without a shell expanding anything.
BOOT = _WHERE + """os.execv(sys.executable, [sys.executable, p] + sys.argv[2:])
"""

# Runs on any python3 the host may have (2.7 included): a marker (a login script may print before it), its
# version and the sha256 of the tool there; when
# that is the controller's tool (argv[2]) on a new enough python, it goes on as the tool with the rest of argv
# (`doctor PROJECT --json`), so that a host already up to date is checked with one command and one start.
PROBE = _WHERE + """import hashlib
print("BLUEGREEN-PROBE")
print("%d.%d" % tuple(sys.version_info[:2]))
h = "-"
if os.path.isfile(p):
    d = hashlib.sha256()
    with open(p, "rb") as f:
        for b in iter(lambda: f.read(65536), b""):
            d.update(b)
    h = d.hexdigest()
print(h)
if sys.argv[2:3] == [h] and sys.version_info >= (3, 9) and sys.argv[3:]:
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, p] + sys.argv[3:])
"""

# Receives the tool on stdin into a temporary file next to its place, checks size and sha256, then renames it
# into place: a host never sees a half-written tool, and no sftp/scp subsystem is needed.
UPLOAD = _WHERE + """import hashlib, tempfile
dest, want, size = p, sys.argv[2], int(sys.argv[3])
fd, tmp = tempfile.mkstemp(prefix=".bluegreen.pyz.", dir=os.path.dirname(dest) or ".")
try:
    h, n = hashlib.sha256(), 0
    with os.fdopen(fd, "wb") as f:
        while n < size:
            b = sys.stdin.buffer.read(min(65536, size - n))
            if not b:
                break
            f.write(b)
            h.update(b)
            n += len(b)
        f.flush()
        os.fsync(f.fileno())
    if n != size or h.hexdigest() != want:
        sys.stderr.write("incomplete upload: %d of %d bytes, sha256 %s; the tool in place was kept\\n" % (n, size, h.hexdigest()))
        sys.exit(3)
    os.chmod(tmp, 0o644)
    os.replace(tmp, dest)
finally:
    if os.path.exists(tmp):
        os.unlink(tmp)
"""


def clean(text: str) -> str:
    """A line from a host, fit for this terminal and a CI log: no control characters, bounded, no CI workflow
    command."""
    return fleet.defuse(_CONTROL.sub("?", text[:LINE_MAX]))


@dataclass(frozen=True)
class Remote:
    """How the tool is run on every host."""

    pyz: str = ""  # "" : ROOT/bluegreen.pyz there (the host's BLUEGREEN_ROOT, else /opt/deploy)
    root: str = ""  # BLUEGREEN_ROOT there ("" : the host's own)

    def python(self, code: str, *args: str) -> list[str]:
        env = ["env", f"BLUEGREEN_ROOT={self.root}"] if self.root else []
        return [*env, "python3", "-c", code, self.pyz, *args]

    def argv(self, *args: str) -> list[str]:
        return self.python(BOOT, *args)

    def shown(self, *args: str) -> str:
        """The same command as a user would type it on the host."""
        root = f"BLUEGREEN_ROOT={self.root} " if self.root else ""
        return f"{root}python3 {self.pyz or '$BLUEGREEN_ROOT/bluegreen.pyz'} {' '.join(args)}"


@dataclass
class Host:
    target: Target
    result: HostResult
    before: str = ""
    lines: list = field(default_factory=list)


class Stop:
    """The controller's signals: the first stops new hosts from starting, the second aborts."""

    def __init__(self) -> None:
        self.requested = ""
        self.aborted = False
        self.current: list[str] = []

    def handle(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            self.aborted = True
            raise KeyboardInterrupt(name)
        self.requested = name


class Rollout:
    """One rollout: hosts, ssh, hooks, output."""

    def __init__(self, *, settings: Settings, project: str, tag: str, targets: Sequence[Target], ssh: SshOptions,
                 remote: Remote, pyz: Path | None, stdout: TextIO, stderr: TextIO, environ: Mapping[str, str],
                 before_host: Sequence[str] = (), after_host: Sequence[str] = (), hook_timeout: float = 600.0,
                 github: bool = False, ssh_cmd: str = "ssh", action: str = "deploy") -> None:
        self.settings, self.project, self.tag = settings, project, tag
        self.action = action  # deploy TAG, or rollback --to TAG (a fleet rollback)
        self.hosts = [Host(t, HostResult(str(t))) for t in targets]
        self.ssh, self.remote, self.pyz = ssh, remote, pyz
        self.stdout, self.stderr, self.environ = stdout, stderr, environ
        self.before_host, self.after_host, self.hook_timeout = list(before_host), list(after_host), hook_timeout
        self.github, self.ssh_cmd = github, ssh_cmd
        self.runner: Runner = SubprocessRunner()
        self.stop = Stop()
        self._print_lock = threading.Lock()
        # The tool sent to the hosts (none for a command that only reads what the hosts have).
        self.data = pyz.read_bytes() if pyz is not None else b""
        self.sha = hashlib.sha256(self.data).hexdigest() if pyz is not None else ""

    # -- output ------------------------------------------------------------------------------------------
    def say(self, text: str, host: Target | None = None) -> None:
        """Lines on stderr, each with the host it comes from; a host's text never issues a CI workflow command."""
        with self._print_lock:
            for line in text.splitlines() or [""]:
                line = fleet.defuse(line)
                print(f"[{host}] {line}" if host else line, file=self.stderr, flush=True)

    def workflow(self, command: str) -> None:
        """One GitHub Actions workflow command of our own (`::group::...`); its text is cleaned by the caller."""
        with self._print_lock:
            print(command, file=self.stderr, flush=True)

    # -- ssh -----------------------------------------------------------------------------------------------
    def ssh_run(self, target: Target, remote: Sequence[str], *, input: bytes | None = None,
                timeout: float = 120) -> Result:
        """One remote command through the project's runner: bounded in time and in output (a host's output is
        untrusted); ssh is killed when the time is up (the remote side then loses its connection)."""
        argv = fleet.ssh_argv(target, self.ssh, remote, ssh=self.ssh_cmd)
        try:
            # Not a session of its own: the ControlPersist master ssh leaves behind must outlive this command.
            return self.runner.run(argv, check=False, timeout=timeout, input=input if input is not None else b"",
                                   output_limit=OUTPUT_LIMIT)
        except CommandError as exc:  # timed out
            return Result(tuple(argv), 124, exc.stdout, exc.stderr)

    def ssh_stream(self, target: Target, remote: Sequence[str], keep: list[str]) -> int:
        """Run `remote` on `target`, every line shown live with the host as prefix; the last lines kept."""
        argv = fleet.ssh_argv(target, self.ssh, remote, ssh=self.ssh_cmd)
        # No terminal on the remote side: a signal here never reaches the remote deploy, which finishes.
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        assert proc.stdout is not None
        # Line by line, each read bounded: a host that prints one endless line costs no memory.
        for raw in iter(lambda: proc.stdout.readline(LINE_MAX), b""):  # type: ignore[union-attr]
            line = clean(raw.decode("utf-8", "replace").rstrip("\n"))
            keep.append(line)
            del keep[:-60]
            self.say(line, target)
        return proc.wait()

    @staticmethod
    def _text(data: str) -> str:
        """A host's output (the runner bounded it) without control characters, line breaks kept."""
        return _CONTROL.sub("?", data).strip()

    # -- preflight -----------------------------------------------------------------------------------------
    def preflight_one(self, h: Host) -> None:
        r = h.result
        started = time.monotonic()
        try:
            self._preflight(h)
        except (ValueError, TypeError, AttributeError, KeyError, IndexError, RecursionError) as exc:
            # A host's answer of a shape nothing here expected: that host is refused, the rollout goes on deciding.
            self._refuse(r, "preflight", f"{h.target} gave an answer that could not be read ({type(exc).__name__}); "
                                         f"run `{self.remote.shown('doctor', self.project)}` there")
        finally:
            r.seconds = round(time.monotonic() - started, 2)

    def _preflight(self, h: Host) -> None:
        t, r = h.target, h.result
        doctor_args = ("doctor", self.project, "--json")
        probe = self.ssh_run(t, self.remote.python(PROBE, self.sha, *doctor_args), timeout=180)
        if probe.returncode in (SSH_UNREACHABLE, 127):
            return self._refuse(r, "ssh", self._unreachable(t, probe))
        out = self._text(probe.stdout)
        marker = out.find("BLUEGREEN-PROBE\n")
        if marker < 0:
            first = out.splitlines()[0][:200] if out.splitlines() else ""
            return self._refuse(r, "ssh", f"unexpected output instead of the probe's answer: {first!r}" if first and probe.returncode == 0
                                else self._unreachable(t, probe))
        version_line, sha_line, report = (out[marker:].split("\n", 3)[1:] + ["", "", ""])[:3]
        version = tuple(int(x) for x in version_line.split(".")) if re.fullmatch(r"[0-9]{1,3}\.[0-9]{1,3}", version_line) else ()
        if not version:
            return self._refuse(r, "ssh", self._unreachable(t, probe))
        if version < REMOTE_MIN_PYTHON:
            return self._refuse(r, "python", f"python3 on {t} is {version_line}; bluegreen needs "
                                             f"3.9 or newer there (Amazon Linux 2023 and Debian 12 have it).")
        doctor = probe
        if sha_line != self.sha:  # the probe stopped after its two lines: send the tool, then ask doctor
            self.say(f"sending bluegreen ({len(self.data)} bytes, sha256 {self.sha[:12]}) to {self.remote.pyz or 'ROOT/bluegreen.pyz'}", t)
            sent = self.ssh_run(t, self.remote.python(UPLOAD, self.sha, str(len(self.data))), input=self.data, timeout=300)
            if sent.returncode != 0:
                return self._refuse(r, "upload", f"could not install the tool at {self.remote.pyz or 'ROOT/bluegreen.pyz'} on {t}: "
                                                 f"{self._text(sent.stderr)[-500:] or 'exit ' + str(sent.returncode)}")
            doctor = self.ssh_run(t, self.remote.argv(*doctor_args), timeout=180)
            report = self._text(doctor.stdout)
        try:
            found = json.loads(report or "null")
        except (ValueError, RecursionError):
            found = None
        if not isinstance(found, dict):
            return self._refuse(r, "doctor", f"`doctor {self.project}` on {t} gave no report (exit {doctor.returncode}): "
                                             f"{self._text(doctor.stderr)[-500:]}")
        if found.get("frozen") or found.get("locked"):
            r.exit_code = EXIT_LOCKED
            return self._refuse(r, "lock", fleet.one_line(f"{self.project} on {t} is {found.get('frozen') or 'locked: ' + str(found.get('locked'))}", 600),
                                code=EXIT_LOCKED)
        sections = found.get("sections") if isinstance(found.get("sections"), list) else []
        checks = [c for s in sections if isinstance(s, dict) and isinstance(s.get("checks"), list)
                  for c in s["checks"] if isinstance(c, dict)]
        # What would make the deploy fail; a service that is down (`serving`) is what a deploy may fix.
        fails = [c for c in checks if c.get("status") == "FAIL" and c.get("name") not in ("serving", "lock")]
        if fails:
            first = fails[0]
            more = f" (and {len(fails) - 1} more)" if len(fails) > 1 else ""
            return self._refuse(r, "doctor", fleet.one_line(f"{first.get('name')}: {first.get('detail')}{more}; fix: {first.get('fix')}", 600))
        # The tag that serves now, as doctor's serving check saw it (the same facts `status` reads).
        facts = next((c.get("facts") for c in checks if c.get("name") == "serving" and isinstance(c.get("facts"), dict)), {})
        tag = facts.get("tag")
        h.before = tag if is_tag(tag) else ""  # "" : unknown (a fleet rollback then never counts this host as serving it)
        r.before = r.after = h.before
        r.result = "ready"

    def _unreachable(self, t: Target, proc: Result) -> str:
        err = self._text(proc.stderr)[-400:]
        if proc.returncode == SSH_UNREACHABLE:
            return f"cannot reach {t} over ssh: {err or 'no message'}"
        if proc.returncode == 127:
            return f"{t} has no python3 on the PATH: install it (dnf install python3 / apt-get install python3-minimal)"
        return f"on {t}: {err or 'exit ' + str(proc.returncode)}"

    @staticmethod
    def _refuse(r: HostResult, step: str, message: str, code: int = EXIT_USAGE) -> None:
        r.result, r.step, r.message = fleet.REFUSED, step, message
        r.exit_code = code

    # -- pull, deploy, revert ------------------------------------------------------------------------------
    def choose_rollback_tag(self) -> bool:
        """Read every host's journal and pick the fleet's rollback tag; False (with every host told why) when
        there is none."""
        journals: dict[str, list] = {}
        problems: dict[str, str] = {}

        def read(h: Host) -> None:
            proc = self.ssh_run(h.target, self.remote.argv("history", self.project, "-n", "500", "--json"), timeout=120)
            if proc.returncode != 0:
                problems[str(h.target)] = fleet.one_line(f"could not read its history (exit {proc.returncode}): "
                                                         f"{self._text(proc.stderr)[-300:]}", 400)
            journals[str(h.target)] = [e for e in map(parse_line, self._text(proc.stdout).splitlines()[:500]) if e]
            journals[str(h.target)].reverse()  # history prints newest first

        _each(read, self.hosts, PARALLEL)
        tag = None if problems else fleet.rollback_target({str(h.target): (h.before, journals[str(h.target)]) for h in self.hosts})
        if tag is None:
            why = "; ".join(f"{t}: {m}" for t, m in problems.items()) or (
                "no tag that every host has deployed before (or serves now) besides what they all serve: "
                + ", ".join(f"{h.target} serves {h.before or 'nothing'}" for h in self.hosts))
            for h in self.hosts:
                self._refuse(h.result, "rollback", problems.get(str(h.target), "no common tag to roll back to"))
            self.say(f"Nothing to roll back to for {self.project} on every host: {why}. Nothing was changed; name "
                     f"the tag with --to TAG.")
            return False
        self.tag = tag
        self.say(f"rolling {self.project} back to {tag} on every host that does not serve it: "
                 + ", ".join(f"{h.target} ({h.before or 'nothing'})" for h in self.hosts))
        return True

    def unchanged(self, h: Host) -> bool:
        """A fleet rollback leaves a host alone that already serves the target tag."""
        return self.action == "rollback" and bool(h.before) and h.before == self.tag

    def command(self, *extra: str) -> list[str]:
        """The remote command that switches one host."""
        if self.action == "rollback":
            return self.remote.argv("rollback", self.project, "--to", self.tag, *extra)
        return self.remote.argv("deploy", self.project, self.tag, *extra)

    def pull_one(self, h: Host) -> None:
        if self.unchanged(h):
            return
        # A fleet rollback pulls what each host's rollback deploys: the digest its journal recorded for the tag.
        extra = ("--rollback",) if self.action == "rollback" else ()
        proc = self.ssh_run(h.target, self.remote.argv("pull", self.project, self.tag, *extra), timeout=1800)
        for line in self._text(proc.stderr).splitlines()[-3:] + self._text(proc.stdout).splitlines()[-1:]:
            self.say(line, h.target)
        if proc.returncode != 0:
            h.result.result, h.result.step = fleet.FAILED, "pull"
            h.result.message = _message(self._text(proc.stderr).splitlines()) or f"exit {proc.returncode}"
            h.result.exit_code = proc.returncode if proc.returncode in (EXIT_FAILED, EXIT_USAGE, EXIT_LOCKED) else EXIT_FAILED

    def hook(self, which: str, argv: Sequence[str], h: Host, batch: int) -> str | None:
        """Run a load-balancer hook locally; None when it passed, else why it failed."""
        if not argv:
            return None
        env = dict(self.environ, BLUEGREEN_HOST=h.target.host, BLUEGREEN_TARGET=str(h.target),
                   BLUEGREEN_PROJECT=self.project, BLUEGREEN_TAG=self.tag, BLUEGREEN_BATCH=str(batch))
        self.say(f"{which}: {' '.join(shlex.quote(a) for a in argv)}", h.target)
        try:
            proc = self.runner.run(list(argv), check=False, env=env, timeout=self.hook_timeout, new_session=True,
                                   output_limit=HOOK_OUTPUT_LIMIT)
        except CommandError:  # timed out: the runner stopped it with every process it started
            return f"{which} ran longer than {self.hook_timeout:g}s and was stopped"
        except (BluegreenError, OSError) as exc:  # not found, not executable
            return f"{which} could not run: {getattr(exc, 'message', None) or exc}"
        for line in self._text(proc.stdout + proc.stderr).splitlines()[-20:]:
            self.say(f"  {line}", h.target)
        return None if proc.returncode == 0 else f"{which} exited {proc.returncode}"

    def deploy_one(self, h: Host, batch: int) -> None:
        r, started = h.result, time.monotonic()
        r.batch = batch
        if self.unchanged(h):
            r.result, r.after, r.message = fleet.UNCHANGED, h.before, f"already serves {self.tag}"
            return
        if self.github:
            self.workflow(f"::group::{h.target}: {self.action} {self.project} {self.tag}")
        try:
            problem = self.hook("before-host", self.before_host, h, batch)
            if problem:
                r.result, r.step, r.message, r.exit_code = fleet.FAILED, "before-host", f"{problem}; {h.target} was not touched", EXIT_FAILED
                return
            code = self.ssh_stream(h.target, self.command(), h.lines)
            r.exit_code = code if code in (EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_LOCKED, EXIT_ATTENTION) else EXIT_FAILED
            if code == EXIT_OK:
                r.result, r.after = fleet.OK, self.tag
            else:
                r.result = fleet.FAILED
                r.step = _failed_step(h.lines) or ("ssh" if code == SSH_UNREACHABLE else "deploy")
                r.message = _message(h.lines) or f"exit {code}"
                if code == SSH_UNREACHABLE:  # the connection broke: what the host did is unknown
                    r.exit_code = EXIT_ATTENTION
                    r.message = f"the ssh connection failed during the {self.action}; check `bluegreen status {self.project}` on {h.target}"
            problem = self.hook("after-host", self.after_host, h, batch)
            if problem and r.result == fleet.OK:
                r.result, r.step, r.message, r.exit_code = fleet.FAILED, "after-host", f"{problem} (the deploy itself succeeded)", EXIT_FAILED
                r.after = self.tag
        finally:
            r.seconds = round(time.monotonic() - started, 2)
            if self.github:
                self.workflow("::endgroup::")
                if r.result != fleet.OK:
                    first = r.message.splitlines()[0] if r.message.splitlines() else ""
                    self.workflow(f"::error title=bluegreen {self.action}::{h.target}: {r.step}: {fleet.one_line(first)}")

    def revert_one(self, h: Host) -> bool:
        if not h.before:
            h.result.message = f"cannot revert {h.target}: the tag it served before is unknown"
            return False
        code = self.ssh_stream(h.target, self.remote.argv("rollback", self.project, "--to", h.before), h.lines)
        if code == EXIT_OK:
            h.result.result, h.result.after = fleet.REVERTED, h.before
            return True
        h.result.message = f"revert to {h.before} failed (exit {code}): {_message(h.lines)}"
        h.result.exit_code = EXIT_ATTENTION
        return False


def _failed_step(lines: Sequence[str]) -> str:
    for line in reversed(lines):
        match = re.search(r"\[[0-9]/6\] (\S+)\s.*FAILED after", line)
        if match:
            return match.group(1)
    return ""


def _message(lines: Sequence[str]) -> str:
    """The host's one-paragraph error (`bluegreen: ...` onwards), else its last line."""
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("bluegreen: "):
            return " ".join(ln.strip() for ln in lines[i:i + 6])[len("bluegreen: "):][:600]
    return lines[-1][:600] if lines else ""


def hook_argv(option: str, settings: Settings, project: str, name: str) -> list[str]:
    """--before-host/--after-host as argv (split like a shell would, run without one), else the project's
    rollout hook file on this controller, else nothing."""
    if option:
        try:
            argv = shlex.split(option)
        except ValueError as exc:
            raise UsageError(f"--{name.split('-', 1)[1]}: cannot split {option!r} into words ({exc}). Nothing was changed.") from None
        if not argv:
            raise UsageError(f"--{name.split('-', 1)[1]}: empty command. Nothing was changed.")
        return argv
    from bluegreen import hooks
    path = hooks.find(settings.hooks_dir(project), name)
    if path is None:
        return []
    problem = hooks.check(path)
    if problem:
        raise UsageError(f"{path} would be refused: {problem}. Nothing was changed.")
    return [str(path)]


def read_targets(hosts: str | None, hosts_file: str | None, command: str = "rollout") -> list[Target]:
    """The fleet from --hosts or --hosts-file (exactly one of them; given but empty is an error)."""
    if (hosts is None) == (hosts_file is None):
        raise UsageError(f"{command} needs the hosts: --hosts HOST[,HOST...] or --hosts-file FILE (one of them). "
                         f"Nothing was changed.")
    if hosts_file == "":
        raise UsageError("--hosts-file: empty file name. Nothing was changed.")
    if hosts_file:
        text = host.read_config_file(Path(hosts_file), max_bytes=1 << 20)  # regular files only; a FIFO never blocks
        if text is None:
            raise UsageError(f"--hosts-file: {hosts_file} does not exist. Nothing was changed.")
        return fleet.parse_hosts(text, "--hosts-file")
    return fleet.parse_hosts(hosts)


@contextmanager
def connections(targets: Sequence[Target], ssh: SshOptions, ssh_cmd: str = "ssh", multiplex: bool = True) -> Iterator[SshOptions]:
    """`ssh` with one multiplexed connection per host in a private directory; the connections are closed and
    the directory removed at the end (their masters would outlive us otherwise). Without `multiplex` (one
    command per host: a fleet status), each command is its own connection and there is nothing to close."""
    if not multiplex:
        yield ssh
        return
    control = tempfile.mkdtemp(prefix="bg-ssh-")  # 0700: the multiplexed connections' sockets
    opts = SshOptions(user=ssh.user, identity=ssh.identity, options=ssh.options, config=ssh.config, control_dir=control,
                      connect_timeout=ssh.connect_timeout)
    try:
        yield opts
    finally:
        closing = []
        for t in targets:  # all at once: a fleet of many hosts must not wait for them one by one
            try:
                closing.append(subprocess.Popen(fleet.ssh_argv(t, opts, [], ssh=ssh_cmd)[:-3] + ["-O", "exit", "--", t.host],
                                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            except OSError:
                pass
        deadline = time.monotonic() + 10
        for proc in closing:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(control, ignore_errors=True)


def run_rollout(*, settings: Settings, project: str, tag: str, hosts: str | None, hosts_file: str | None, ssh: SshOptions,
                remote: Remote, batch: str, pause: float, before_host: str, after_host: str, revert: bool,
                skip_preflight: bool, dry_run: bool, json_out: bool, stdout: TextIO, stderr: TextIO,
                environ: Mapping[str, str], ssh_cmd: str = "ssh", pyz: str | None = None, action: str = "deploy") -> int:
    """`rollout PROJECT TAG`, or with action "rollback" `rollback PROJECT --hosts ... [--to TAG]` (tag "": the
    newest tag every host can go back to, chosen after the preflight)."""
    command = "rollout" if action == "deploy" else "rollback"
    validate_project(project)
    if tag or action == "deploy":
        validate_tag(tag)
    targets = read_targets(hosts, hosts_file, command)
    size = fleet.parse_batch(batch, len(targets))
    if not 0 <= pause <= 86400:
        raise UsageError("--pause: seconds between batches, 0 to 86400. Nothing was changed.")
    if action == "rollback" and not tag and skip_preflight:
        raise UsageError("a fleet rollback finds its tag from what every host serves, which the preflight reads: "
                         "name the tag with --to TAG to skip the preflight. Nothing was changed.")
    me = Path(pyz) if pyz else host.running_pyz()
    if me is None or not me.is_file():
        raise UsageError(f"{command} sends the tool itself to every host, so run it from bluegreen.pyz "
                         f"(`python3 dist/bluegreen.pyz {command} ...`, or the `bluegreen` launcher). Nothing was changed.")
    with connections(targets, ssh, ssh_cmd) as opts:
        ro = Rollout(settings=settings, project=project, tag=tag, targets=targets, ssh=opts, remote=remote, pyz=me,
                     stdout=stdout, stderr=stderr, environ=environ,
                     before_host=hook_argv(before_host, settings, project, HOOK_NAMES[0]),
                     after_host=hook_argv(after_host, settings, project, HOOK_NAMES[1]),
                     github=environ.get("GITHUB_ACTIONS") == "true", ssh_cmd=ssh_cmd, action=action)
        old = {s: signal.signal(s, ro.stop.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            code = _run(ro, size=size, pause=pause, revert=revert, skip_preflight=skip_preflight, dry_run=dry_run)
        except KeyboardInterrupt:
            busy = ", ".join(ro.stop.current) or "none"
            for h in ro.hosts:
                if str(h.target) in ro.stop.current and h.result.result == fleet.SKIPPED:
                    h.result.result, h.result.exit_code = fleet.INTERRUPTED, EXIT_ATTENTION
                    h.result.message = "aborted while this host was in progress: check what it serves"
                elif h.result.result == fleet.SKIPPED:
                    h.result.result, h.result.message = fleet.INTERRUPTED, "not started (aborted)"
            ro.say(f"{command} aborted by a second {ro.stop.requested or 'signal'}: a {action} may still be running on: "
                   f"{busy}. Check each with `ssh HOST {remote.shown('status', project)}`.")
            code = EXIT_ATTENTION
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
    results = [h.result for h in ro.hosts]
    if json_out:
        print(json.dumps({"project": project, "tag": ro.tag, "action": action, "exit_code": code,
                          "hosts": [asdict(r) for r in results]}, sort_keys=True), file=stdout)
    else:
        for line in fleet.table(results):
            print(line, file=stdout)
    write_summary(environ, fleet.markdown_table(project, f"{command} {ro.tag or '(no tag)'}", code, results), ro)
    return code


def write_summary(environ: Mapping[str, str], text: str, ro: Rollout) -> None:
    """In a GitHub Actions job, the table goes to the job's summary page too ($GITHUB_STEP_SUMMARY)."""
    path = environ.get("GITHUB_STEP_SUMMARY", "")
    if environ.get("GITHUB_ACTIONS") != "true" or not path:
        return
    try:
        # The runner's own file (not under a deploy root): appended to, never followed if it is not a file.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(f"{path} is not a regular file")
            os.write(fd, text.encode("utf-8"))
        finally:
            os.close(fd)
    except OSError as exc:
        ro.say(f"could not write the job summary to {path}: {getattr(exc, 'strerror', None) or exc}")


def _each(fn: Callable[[Host], None], items: Sequence[Host], workers: int) -> None:
    """`fn` on every item, `workers` at a time; the main thread waits interruptibly. The workers are daemon
    threads: a signal that ends the command never waits for them (their ssh commands end on their own)."""
    if len(items) == 1:
        fn(items[0])
        return
    todo = list(items)
    errors: list[BaseException] = []
    guard = threading.Lock()

    def work() -> None:
        while True:
            with guard:
                if not todo or errors:
                    return
                item = todo.pop(0)
            try:
                fn(item)
            except Exception as exc:  # re-raised in the main thread, as the pool's future.result() did
                with guard:
                    errors.append(exc)

    threads = [threading.Thread(target=work, daemon=True) for _ in range(max(1, min(workers, len(items))))]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(0.2)
    if errors:
        raise errors[0]


def _mark_others(hosts: Sequence[Host], bad: str, message: str) -> bool:
    """When a host ended a phase as `bad`, every other host is marked not started with `message`."""
    if not any(h.result.result == bad for h in hosts):
        return False
    for h in hosts:
        if h.result.result != bad:
            h.result.result, h.result.message = fleet.SKIPPED, message
    return True


def _run(ro: Rollout, *, size: int, pause: float, revert: bool, skip_preflight: bool, dry_run: bool) -> int:
    hosts = ro.hosts
    if not skip_preflight:
        ro.say(f"preflight on {len(hosts)} host(s)")
        _each(ro.preflight_one, hosts, PARALLEL)
        if _mark_others(hosts, fleet.REFUSED, "preflight passed; not deployed (another host failed preflight)"):
            ro.say("preflight failed: nothing was changed on any host (the tool itself may have been updated).")
            return fleet.exit_code([h.result for h in hosts], preflight_failed=True)
    if not ro.tag:  # a fleet rollback without --to: one tag that every host can go back to
        if not ro.choose_rollback_tag():
            return EXIT_USAGE
    if dry_run:
        for h in hosts:
            if ro.unchanged(h):
                h.result.result, h.result.message = fleet.UNCHANGED, f"already serves {ro.tag}"
                continue
            proc = ro.ssh_run(h.target, ro.command("--dry-run"))
            ro.say(ro._text(proc.stdout + proc.stderr), h.target)
            h.result.result = fleet.SKIPPED
            h.result.message = "dry run"
        return EXIT_OK
    ro.say(f"pull {ro.project} {ro.tag} on {len(hosts)} host(s)")
    _each(ro.pull_one, hosts, PARALLEL)
    if _mark_others(hosts, fleet.FAILED, "not deployed: a pull failed on another host"):
        ro.say("a pull failed: no host was switched (none ran a deploy); `bluegreen status` on a host shows what it serves.")
        return fleet.exit_code([h.result for h in hosts])
    for h in hosts:
        h.result.result, h.result.message = fleet.SKIPPED, ""
    groups = fleet.batches([h.target for h in hosts], size)
    by_target = {h.target: h for h in hosts}
    failed = False
    for number, group in enumerate(groups, start=1):
        if ro.stop.requested:
            ro.say(f"{ro.stop.requested}: no new host is started; stopping the rollout.")
            for h in hosts:
                if h.result.result == fleet.SKIPPED:
                    h.result.result, h.result.message = fleet.INTERRUPTED, f"not started ({ro.stop.requested})"
            failed = True
            break
        if number > 1 and pause:
            time.sleep(pause)
        members = [by_target[t] for t in group]
        ro.stop.current = [str(h.target) for h in members]
        _each(lambda h, n=number: ro.deploy_one(h, n), members, len(members))
        ro.stop.current = []
        if any(h.result.result not in (fleet.OK, fleet.UNCHANGED) for h in members):
            failed = True
            break
    if not failed:
        return EXIT_OK
    switched = [h for h in hosts if h.result.result == fleet.OK]
    revert_failed = False
    if revert and switched:
        ro.say(f"--revert-on-failure: rolling back {len(switched)} host(s), newest first")
        for h in reversed(switched):
            revert_failed |= not ro.revert_one(h)
    elif switched:
        versions = sorted({h.result.after or "?" for h in hosts if h.result.after} | {h.before or "?" for h in hosts})
        ro.say(f"the fleet now runs {len(versions)} versions ({', '.join(versions)}): "
               + "; ".join(f"revert {h.target}: {ro.remote.shown('rollback', ro.project, '--to', h.before or 'TAG')}"
                           for h in switched))
    return fleet.exit_code([h.result for h in hosts], revert_failed=revert_failed)
