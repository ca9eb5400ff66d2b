"""A fleet of hosts reached with the system OpenSSH client (pure): parsing `--hosts`/`--hosts-file`, the ssh argv
for one remote command, the batches of a rollout, its table and exit code."""

from __future__ import annotations

import json
import math
import re
import shlex
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from bluegreen.config import is_tag
from bluegreen.errors import EXIT_ATTENTION, EXIT_FAILED, EXIT_LOCKED, EXIT_OK, EXIT_USAGE, UsageError
from bluegreen.journal import RESULT_DEPLOYED, Entry, rollback_candidates

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


# -- host text on this terminal and in CI logs -----------------------------------------------------------
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# A CI runner reads workflow commands in what we print: GitHub's `::cmd::` at the start of a line (leading
# blanks ignored) and its older `##[cmd]` anywhere. A host must never issue one through its text.
_WORKFLOW_COMMAND = re.compile(r"^(\s*)::|##\[")


def _clean(value: object, limit: int = 300) -> str:
    """A host's answer fit for one line of a table: untrusted, so no control characters (line breaks
    included), bounded, and no CI workflow command."""
    return defuse(_CONTROL.sub("?", str(value if value is not None else "")[:limit]))


def one_line(value: object, limit: int = 300) -> str:
    """Host text for one line: see _clean."""
    return _clean(value, limit)


def defuse(line: str) -> str:
    """`line` with any CI workflow command broken up by a zero-width space (it reads the same)."""
    return _WORKFLOW_COMMAND.sub(lambda m: f"{m.group(1)}\u200b::" if m.group(0).endswith("::") else "##\u200b[", line)


# -- the result table --------------------------------------------------------------------------------------

OK, FAILED, SKIPPED, REVERTED, REFUSED, INTERRUPTED = "deployed", "failed", "not started", "reverted", "refused", "interrupted"
UNCHANGED = "unchanged"  # a fleet rollback's host that already serves the target tag


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
    if all(r.result in (OK, UNCHANGED) for r in results):
        return EXIT_OK
    return EXIT_FAILED


def table(results: Sequence[HostResult]) -> list[str]:
    """One line per host: host, result, tag before -> after, seconds, and the failed step with its message."""
    width = max([len("host")] + [len(r.target) for r in results])
    lines = [f"{'host':<{width}}  {'result':<11}  {'tag':<24}  {'time':>7}  detail"]
    for r in results:
        tags = f"{_clean(r.before, 140) or '?'} -> {_clean(r.after, 140) or '?'}"
        detail = f"{r.step}: {r.message}" if r.step else r.message
        first = _clean(detail.splitlines()[0] if detail.splitlines() else "")
        lines.append(f"{r.target:<{width}}  {r.result:<11}  {tags:<24}  {r.seconds:>6.1f}s  {first}")
    return lines


_MARKDOWN = set("\\`*_[](){}<>!#|~&")


def markdown_table(project: str, tag: str, code: int, results: Sequence[HostResult]) -> str:
    """The rollout's table for a GitHub Actions job summary ($GITHUB_STEP_SUMMARY)."""
    def cell(text: str) -> str:
        # Markdown a host cannot use: no links, images, HTML or emphasis from its text, and no column break.
        return "".join("\\" + c if c in _MARKDOWN else c for c in _clean(text))[:400] or " "

    lines = [f"### bluegreen: {cell(project)} {cell(tag)}: exit {code}", "",
             "| host | result | tag before → after | time | detail |", "|---|---|---|---|---|"]
    for r in results:
        detail = f"{r.step}: {r.message}" if r.step else r.message
        lines.append(f"| {cell(r.target)} | {cell(r.result)} | {cell(r.before or '?')} → {cell(r.after or '?')} | "
                     f"{r.seconds:.1f}s | {cell(detail.splitlines()[0] if detail else '')} |")
    return "\n".join(lines) + "\n"


# -- the fleet's day-2 questions ---------------------------------------------------------------------------


@dataclass
class HostStatus:
    """One host's answer to `status PROJECT --json`, or why there was none."""

    target: str
    error: str = ""  # unreachable, no tool, no answer: the host's state is unknown
    tag: str = ""
    digest: str = ""  # the registry digest its journal recorded for the serving tag ("" : unknown)
    colour: str = ""
    verdict: str = ""  # ok, degraded, down (status's)
    reason: str = ""  # why not ok, from the first failed check
    lock: str = ""  # a deploy in progress
    freeze: str = ""
    drift: int = 0
    exit_code: int = 0


def host_status(target: str, text: str, returncode: int) -> HostStatus | None:
    """Read a host's `status PROJECT --json` (untrusted: any shape) into a HostStatus; None when it is none."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, list) or len(data) != 1 or not isinstance(data[0], dict):
        return None
    item = data[0]
    if not isinstance(item.get("checks") or [], list) or not isinstance(item.get("drift") or [], list):
        return None
    failed = next((c for c in item.get("checks") or [] if isinstance(c, dict) and not c.get("ok")), None)
    digest = item.get("digest")
    lock, freeze = item.get("lock"), item.get("freeze")
    return HostStatus(
        target,
        error=_clean(item.get("error") or ""),
        tag=_clean(item.get("tag") or "", 140) if is_tag(item.get("tag")) else "",
        digest=digest if isinstance(digest, str) and _DIGEST.fullmatch(digest) else "",
        colour=_clean(item.get("serving") or "", 20),
        verdict=_clean(item.get("verdict") or "", 20),
        reason=_clean(failed.get("detail") or failed.get("name") or "") if failed else "",
        lock=_clean(f"deploy of {lock.get('tag')} by {lock.get('user')} since {lock.get('since')}") if isinstance(lock, dict) else "",
        freeze=_clean(f"by {freeze.get('user')}: {freeze.get('message')}") if isinstance(freeze, dict) else "",
        drift=len(item.get("drift") or []),
        exit_code=returncode,
    )


def status_verdict(statuses: Sequence[HostStatus]) -> tuple[bool, list[str]]:
    """Whether the fleet is in order (every host answers and serves the same version, healthy), and what is
    wrong with it otherwise: version skew, unreachable hosts, hosts down or degraded, freezes."""
    problems = []
    unknown = [s.target for s in statuses if s.error]
    if unknown:
        problems.append(f"unreachable or unknown: {', '.join(unknown)}")
    tags: dict[str, list[str]] = {}
    for s in statuses:
        if not s.error:
            tags.setdefault(s.tag or "nothing", []).append(s.target)
    if len(tags) > 1:
        problems.append("version skew: " + "; ".join(f"{tag} on {', '.join(hosts)}" for tag, hosts in sorted(tags.items())))
    for tag, hosts in sorted(tags.items()):
        # One tag, several images (`latest` moved between two deploys): skew all the same.
        images: dict[str, list[str]] = {}
        for s in statuses:
            if not s.error and (s.tag or "nothing") == tag and s.digest:
                images.setdefault(s.digest, []).append(s.target)
        if len(images) > 1:
            problems.append(f"version skew: {tag} is {len(images)} different images: "
                            + "; ".join(f"{d[:19]}... on {', '.join(h)}" for d, h in sorted(images.items())))
    unnamed = [s.target for s in statuses if not s.error and not s.tag and s.verdict == "ok"]
    if unnamed:
        problems.append(f"version unknown on {', '.join(unnamed)}: the serving container's image names no tag of IMAGE")
    for s in statuses:
        if not s.error and s.verdict != "ok":
            problems.append(f"{s.target} is {s.verdict or 'not ok'}: {s.reason or 'see its status'}")
    frozen = [s.target for s in statuses if s.freeze]
    if frozen and len(frozen) < len(statuses):
        problems.append(f"frozen on {', '.join(frozen)} only")
    return not problems, problems


def status_table(statuses: Sequence[HostStatus]) -> list[str]:
    """One line per host: serving tag and colour, health, lock, freeze, drift."""
    width = max([len("host")] + [len(s.target) for s in statuses])
    lines = [f"{'host':<{width}}  {'serving':<28}  {'health':<9}  detail"]
    for s in statuses:
        if s.error:
            lines.append(f"{s.target:<{width}}  {'?':<28}  {'unknown':<9}  {_clean(s.error)}")
            continue
        serving = f"{s.tag or 'nothing'} ({s.colour})" if s.colour else (s.tag or "nothing")
        flags = [f"{s.verdict}: {s.reason}"] if s.verdict != "ok" and s.reason else []
        flags += [f"DEPLOYING ({s.lock})"] if s.lock else []
        flags += [f"FROZEN {s.freeze}"] if s.freeze else []
        flags += [f"{s.drift} drift problem(s)"] if s.drift else []
        lines.append(f"{s.target:<{width}}  {_clean(serving, 60):<28}  {_clean(s.verdict, 20) or '?':<9}  {_clean('; '.join(flags))}")
    return lines


def rollback_target(hosts: Mapping[str, tuple[str, Sequence[Entry]]]) -> str | None:
    """One tag for the whole fleet to go back to: the newest tag that every host either serves or can roll back
    to (journal.rollback_candidates), leaving out a tag that every host whose serving tag is known serves
    already. `hosts` maps each host to (its serving tag, "" when unknown; its journal, oldest first). None
    when no tag fits, or no host's serving tag is known. Newest: the latest successful deploy of the tag."""
    allowed: set[str] | None = None
    serving = {tag for tag, _ in hosts.values() if tag}
    if not serving:
        return None
    last: dict[str, str] = {}
    for tag, entries in hosts.values():
        ok = set(rollback_candidates(list(entries))) | ({tag} if tag else set())
        allowed = ok if allowed is None else allowed & ok
        for e in entries:
            when = e.time if _TIME.match(e.time) else ""  # a host's journal: only a real time orders it
            if e.result == RESULT_DEPLOYED:
                last[e.tag] = max(last.get(e.tag, ""), when)
            if e.result == RESULT_DEPLOYED and e.from_tag:
                last.setdefault(e.from_tag, "")
    choices = [t for t in allowed or () if serving != {t}]
    if not choices:
        return None
    return max(choices, key=lambda t: (last.get(t, ""), t))


_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\+00:00|Z)?$")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def merge_history(hosts: Mapping[str, Sequence[Entry]]) -> list[tuple[str, Entry]]:
    """Every host's journal entries in one list, newest first, each with its host."""
    merged = [(target, e) for target, entries in hosts.items() for e in entries]
    merged.sort(key=lambda pair: (pair[1].time if _TIME.match(pair[1].time) else "", pair[0]), reverse=True)
    return merged
