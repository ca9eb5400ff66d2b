"""A fleet of hosts reached with the system OpenSSH client (pure): parsing `--hosts`/`--hosts-file`, the ssh argv
for one remote command, the batches of a rollout, its table and exit code."""

from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass, field
from typing import Sequence

from bluegreen.errors import EXIT_ATTENTION, EXIT_FAILED, EXIT_LOCKED, EXIT_OK, EXIT_USAGE, UsageError

# A host name or IPv4 address; IPv6 in brackets. Never starting with '-': ssh would read it as an option.
_NAME = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?"
_HOST_RE = re.compile(r"(?:(?P<user>[A-Za-z_][A-Za-z0-9_.-]{0,31})@)?"
                      r"(?P<host>" + _NAME + r"|\[[0-9A-Fa-f:.]{2,45}\])"
                      r"(?::(?P<port>[0-9]{1,5}))?")
_OPTION_RE = re.compile(r"[A-Za-z][A-Za-z0-9]{0,63}=[^\x00-\x1f\x7f]{0,1024}")
MAX_HOSTS = 1000


@dataclass(frozen=True)
class Target:
    """One host of the fleet as the user named it."""

    host: str
    user: str = ""
    port: int = 0  # 0: ssh's own (the user's ssh config, else 22)

    def __str__(self) -> str:
        text = f"{self.user}@{self.host}" if self.user else self.host
        return f"{text}:{self.port}" if self.port else text


def parse_target(word: str, where: str = "--hosts") -> Target:
    match = _HOST_RE.fullmatch(word)
    if not match or (match.group("port") and not 0 < int(match.group("port")) < 65536):
        shown = "".join(c if c.isprintable() else "?" for c in word[:80])
        raise UsageError(f"{where}: {shown!r} is not a host: give HOST, USER@HOST or HOST:PORT (an IPv6 address in "
                         f"brackets, [2001:db8::1]:22). Nothing was changed.")
    host = match.group("host")
    return Target(host[1:-1] if host.startswith("[") else host, match.group("user") or "",
                  int(match.group("port") or 0))


def parse_hosts(text: str, where: str = "--hosts") -> list[Target]:
    """Hosts from a comma list (the guide's SERVER_HOST secret) or a file's lines (`#` comments), in order,
    each once."""
    words: list[str] = []
    for line in text.splitlines() or [text]:
        line = line.split("#", 1)[0]
        words.extend(w.strip() for w in re.split(r"[,\s]+", line) if w.strip())
    targets: list[Target] = []
    for word in words:
        target = parse_target(word, where)
        if target not in targets:
            targets.append(target)
    if not targets:
        raise UsageError(f"{where}: no host given. Nothing was changed.")
    if len(targets) > MAX_HOSTS:
        raise UsageError(f"{where}: {len(targets)} hosts; at most {MAX_HOSTS} in one rollout. Nothing was changed.")
    return targets


def parse_batch(spec: str, hosts: int) -> int:
    """`--batch N` or `N%` of `hosts` (at least 1) as a number of hosts per batch."""
    match = re.fullmatch(r"([0-9]{1,4})(%?)", spec.strip())
    if not match or int(match.group(1)) == 0 or (match.group(2) and int(match.group(1)) > 100):
        raise UsageError(f"--batch: give a number of hosts (1, 2, ...) or a percentage (25%), got {spec!r}. "
                         f"Nothing was changed.")
    n = int(match.group(1))
    return max(1, math.floor(hosts * n / 100)) if match.group(2) else min(n, hosts)


def batches(targets: Sequence[Target], size: int) -> list[list[Target]]:
    return [list(targets[i:i + size]) for i in range(0, len(targets), size)]


@dataclass(frozen=True)
class SshOptions:
    """How to reach the hosts: whatever the user's ssh config says, plus these."""

    user: str = ""
    identity: str = ""
    options: tuple[str, ...] = ()  # KEY=VALUE, each passed as -o
    config: str = ""  # -F FILE ("" : the user's own ~/.ssh/config)
    control_dir: str = ""  # a private directory for the multiplexed connections ("" : none)
    connect_timeout: int = 10


def check_option(text: str) -> str:
    if not _OPTION_RE.fullmatch(text):
        shown = "".join(c if c.isprintable() else "?" for c in text[:80])
        raise UsageError(f"--ssh-option: give KEY=VALUE as ssh's -o takes it (StrictHostKeyChecking=yes), got "
                         f"{shown!r}. Nothing was changed.")
    return text


def ssh_argv(target: Target, opts: SshOptions, remote: Sequence[str], *, ssh: str = "ssh") -> list[str]:
    """The argv that runs `remote` on `target`: never a prompt (BatchMode), bounded connect, keepalives, one
    multiplexed connection per host. The remote command goes as one string, each word quoted for the remote
    shell (ssh joins its arguments with spaces and hands them to the login shell)."""
    argv = [ssh]
    if opts.config:
        argv += ["-F", opts.config]
    argv += ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={opts.connect_timeout}",
             "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=3"]
    if opts.control_dir:
        argv += ["-o", "ControlMaster=auto", "-o", f"ControlPath={opts.control_dir}/%C", "-o", "ControlPersist=120"]
    for option in opts.options:
        argv += ["-o", option]
    if opts.identity:
        argv += ["-i", opts.identity]
    user = target.user or opts.user
    if user:
        argv += ["-l", user]
    if target.port:
        argv += ["-p", str(target.port)]
    argv += ["--", target.host, " ".join(shlex.quote(word) for word in remote)]
    return argv


# -- the result table --------------------------------------------------------------------------------------

OK, FAILED, SKIPPED, REVERTED, REFUSED, INTERRUPTED = "deployed", "failed", "not started", "reverted", "refused", "interrupted"


@dataclass
class HostResult:
    target: str
    result: str = SKIPPED
    before: str = ""  # the tag that served before the rollout ("" : unknown)
    after: str = ""  # the tag that serves after it, as far as was seen
    seconds: float = 0.0
    step: str = ""  # the phase or deploy step that failed
    message: str = ""
    exit_code: int = 0
    batch: int = 0
    extra: dict = field(default_factory=dict)


def exit_code(results: Sequence[HostResult], *, preflight_failed: bool = False, revert_failed: bool = False) -> int:
    """The rollout's exit code from its hosts, with the single-host meanings: 0 all deployed; 2 nothing changed
    (preflight); 3 a host was locked or frozen; 4 attention (a revert or a host's deploy needs a human);
    1 a host failed and every host serves a working version."""
    if revert_failed or any(r.exit_code == EXIT_ATTENTION for r in results):
        return EXIT_ATTENTION
    if preflight_failed:
        return EXIT_LOCKED if any(r.exit_code == EXIT_LOCKED for r in results) else EXIT_USAGE
    if any(r.exit_code == EXIT_LOCKED for r in results):
        return EXIT_LOCKED
    if all(r.result == OK for r in results):
        return EXIT_OK
    return EXIT_FAILED


def table(results: Sequence[HostResult]) -> list[str]:
    """One line per host: host, result, tag before -> after, seconds, and the failed step with its message."""
    width = max([len("host")] + [len(r.target) for r in results])
    lines = [f"{'host':<{width}}  {'result':<11}  {'tag':<24}  {'time':>7}  detail"]
    for r in results:
        tags = f"{r.before or '?'} -> {r.after or '?'}"
        detail = f"{r.step}: {r.message}" if r.step else r.message
        first = detail.splitlines()[0] if detail else ""
        lines.append(f"{r.target:<{width}}  {r.result:<11}  {tags:<24}  {r.seconds:>6.1f}s  {first[:300]}")
    return lines
