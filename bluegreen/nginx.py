"""The managed upstream file (pure render/parse) and the nginx commands that test and reload it."""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, Sequence

from bluegreen import settings
from bluegreen.errors import CommandError
from bluegreen.runner import Runner, proc_stat

_UPSTREAM_RE = re.compile(r"^\s*upstream\s+([^\s{]+)\s*\{", re.MULTILINE)
# `server` first on its line, or right after `{` or `;` (the guide's one-line `upstream u { server ...; }`).
_SERVER_RE = re.compile(r"(?:^|[{;])[ \t]*server\s+(?:[^\s;:]+):([0-9]+)\b([^;]*);", re.MULTILINE)
_TOKEN_RE = re.compile(r'^\s*"([0-9a-f]{32})"\s+\$upstream_addr;', re.MULTILINE)
_PID_RE = re.compile(r"^\s*pid\s+([^;\s]+)\s*;", re.MULTILINE)

PROBE_HEADER = "X-Bluegreen-Probe"  # request header carrying the project's probe token
ROUTE_HEADER = "X-Bluegreen-Upstream"  # response header the server block adds for probes only
DEFAULT_PID_FILE = "/run/nginx.pid"


@dataclass(frozen=True)
class Upstream:
    name: str
    port: int  # 0: a placeholder (`server ... down;`) that routes nowhere yet
    token: str = ""  # the probe token of a managed file; "" for hand-written ones
    ports: tuple[int, ...] = field(default=(), compare=False)  # every server's port: two in bluegreen's file is a canary step's


def route_variable(project: str) -> str:
    """The nginx variable a server block sends as ROUTE_HEADER (maps are global: one per project)."""
    return "$bluegreen_route_" + re.sub(r"[^A-Za-z0-9_]", "_", project)


def route_clash(project: str, others: Sequence[str]) -> str | None:
    """Another project whose route variable is this one's (user-api and user.api share one nginx map)."""
    # nginx variable names are case-insensitive: $bluegreen_route_User_API is $bluegreen_route_user_api.
    mine = route_variable(project).lower()
    return next((o for o in others if o != project and route_variable(o).lower() == mine), None)


def route_clash_message(project: str, other: str, where: str) -> str:
    return (
        f"{project} and {other} both map to the nginx variable {route_variable(project)} (nginx variable names "
        f"allow only letters, digits and '_'), so their route proofs would clash. Nothing was changed. Rename one "
        f"of the projects (its env file under {where})."
    )


def add_header_line(project: str) -> str:
    """The line a server block needs so that bluegreen can prove where nginx routes."""
    return f"add_header {ROUTE_HEADER} {route_variable(project)} always;"


def route_port(value: str) -> int | None:
    """The port of a route header value `127.0.0.1:PORT` (what the managed map answers); None otherwise.

    Anything else (empty, several addresses, a name) proves nothing about where nginx routes."""
    match = re.fullmatch(r"127\.0\.0\.1:([0-9]{1,5})", value.strip())
    return int(match.group(1)) if match and 0 < int(match.group(1)) < 65536 else None


def new_token() -> str:
    import secrets  # here, not at the top: read-only commands (status) never load it, nor its random and hmac

    return secrets.token_hex(16)


@dataclass(frozen=True)
class UpstreamOptions:
    """What the managed upstream block carries besides its one server (the UPSTREAM_* settings)."""

    keepalive: int = 0  # idle keep-alive connections to the app kept per worker; 0: no `keepalive` line
    keepalive_timeout: float = 4.0  # seconds an idle one is kept (nginx >= 1.15.3)
    max_fails: int = 1  # nginx's defaults: rendered only when they differ
    fail_timeout: float = 10.0


def nginx_time(seconds: float) -> str:
    """Seconds as an nginx time: `60s`, or `1500ms` when not whole."""
    ms = int(round(seconds * 1000))
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def _server_params(options: UpstreamOptions) -> str:
    params = ""
    if options.max_fails != 1:
        params += f" max_fails={options.max_fails}"
    if nginx_time(options.fail_timeout) != "10s":
        params += f" fail_timeout={nginx_time(options.fail_timeout)}"
    return params


def render_upstream(*, name: str, port: int, project: str, colour: str, tag: str, token: str, down: bool = False,
                    options: UpstreamOptions = UpstreamOptions(), canary: tuple[int, int] | None = None) -> str:
    """The whole upstream file for one project, pointing at one local port.

    The map answers the route (the upstream address nginx used) only to requests carrying the
    project's token, so ordinary clients never see internal addresses. The token is kept across
    deploys so that old and new workers both answer a probe, and the answer says which one it was.
    With `down`, a placeholder for a project not deployed yet: valid for `nginx -t`, routes nowhere.
    """
    keepalive = ""
    if options.keepalive:
        # Idle connections live in each worker; an old worker closes its own when it exits, and a deploy
        # stops the old container only after every old worker has exited (the drain).
        keepalive = (f"    keepalive {options.keepalive};\n"
                     f"    keepalive_timeout {nginx_time(options.keepalive_timeout)};\n")
    # A canary step: (the old port, the percentage of requests for `port`); both servers, weighted.
    servers = f"    server 127.0.0.1:{port}{_server_params(options)}{' down' if down else ''};\n" if canary is None else (
        f"    server 127.0.0.1:{port} weight={canary[1]}{_server_params(options)};\n"
        f"    server 127.0.0.1:{canary[0]} weight={100 - canary[1]}{_server_params(options)};\n")
    body = (
        f"upstream {name} {{\n"
        f"{servers}"
        f"{keepalive}"
        "}\n"
        f"# For bluegreen's post-switch probe; the server block adds: {add_header_line(project)}\n"
        f"map $http_{PROBE_HEADER.lower().replace('-', '_')} {route_variable(project)} {{\n"
        f'    "{token}" $upstream_addr;\n'
        '    default "";\n'
        "}\n"
    )
    return (
        "# Managed by bluegreen: rewritten on every deploy; edits here are lost (UPSTREAM_* settings in the env file).\n"
        f"# project={project} colour={colour} tag={tag} sum={_checksum(body)}\n" + body
    )


def _checksum(text: str) -> str:
    """A short digest of the directives, so that a deploy can tell a file it wrote from one edited since."""
    return hashlib.sha256("\n".join(_directives(text)).encode("utf-8", "surrogateescape")).hexdigest()[:16]


_SUM_RE = re.compile(r"\A# Managed by bluegreen[^\n]*\n# project=[^\n]* sum=([0-9a-f]{16})\n")


# The lines of a managed file that change from deploy to deploy (address, colour, tag, token): never foreign.
_OURS_RE = re.compile(
    r"#.*|\}|upstream\s+[^\s{]+\s*\{|map\s+\$http_x_bluegreen_probe\s+\$bluegreen_route_[A-Za-z0-9_]+\s*\{|"
    r'"[0-9a-f]{32}"\s+\$upstream_addr;|default\s+"";'
)
_OWN_SHAPES_RE = re.compile(r"keepalive [0-9]+;|keepalive_timeout [0-9]+m?s;")
_OWN_PARAMS_RE = re.compile(r"(?:weight=[0-9]{1,2} ?)?(?:max_fails=[0-9]+)?(?: ?fail_timeout=[0-9]+m?s)?")
_SERVER_LINE_RE = re.compile(r"server\s+127\.0\.0\.1:[0-9]{1,5}((?:\s+[^;\s]+)*)\s*;")


def _directives(text: str) -> list[str]:
    # One directive per line, whitespace collapsed, a trailing comment dropped (as bluegreen writes them).
    out = []
    for raw in text.splitlines():
        line = " ".join(raw.split("#", 1)[0].split()) if not raw.lstrip().startswith("#") else ""
        if line:
            out.append(line)
    return out


def _server_key(line: str) -> str | None:
    match = _SERVER_LINE_RE.fullmatch(line)
    if not match:
        return None
    return " ".join(p for p in match.group(1).split() if p != "down")


def foreign_directives(text: str | None, expected: str = "") -> list[str]:
    """Lines of an upstream file that bluegreen did not write, or (given `expected`, the text a deploy will
    write) that the next write would drop or change: a hand-added `keepalive 32;`, `least_conn;`, a weight."""
    if not text:
        return []
    recorded = _SUM_RE.match(text)
    if recorded and recorded.group(1) == _checksum(text[recorded.end():]):
        return []  # exactly as a deploy wrote it: a changed setting is not a hand edit
    wanted = set(_directives(expected))
    wanted_server = {_server_key(line) for line in wanted} - {None}
    managed = text.startswith("# Managed by bluegreen")
    found = []
    for line in _directives(text):
        if _OURS_RE.fullmatch(line) or line in wanted:
            continue
        key = _server_key(line)
        if key is not None and (key in wanted_server or (not expected and key == "")):
            continue
        if not expected and managed and (_OWN_SHAPES_RE.fullmatch(line) or (key is not None and _OWN_PARAMS_RE.fullmatch(key))):
            continue  # without an expected text, any value bluegreen itself could have written
        # Shown in a warning: the file is the deploy user's, so no escape sequence reaches the terminal.
        found.append("".join(c if c.isprintable() else "?" for c in line[:200]))
    return found[:20]


def setting_for(line: str) -> str:
    """The env-file setting that replaces a hand-written upstream line, e.g. `UPSTREAM_KEEPALIVE=32`; "" if none."""
    match = re.fullmatch(r"keepalive\s+([0-9]+)\s*;", line)
    if match:
        return f"UPSTREAM_KEEPALIVE={int(match.group(1))}"
    match = re.fullmatch(r"keepalive_timeout\s+([0-9]+)(ms|s|m)?\s*;", line)
    if match:
        value = int(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60, None: 1}[match.group(2)]
        return f"UPSTREAM_KEEPALIVE_TIMEOUT={value:g}"
    wanted = []
    for param in line.rstrip(";").split()[2:] if line.startswith("server ") else []:
        key, _, value = param.partition("=")
        if key == "max_fails" and value.isdigit():
            wanted.append(f"UPSTREAM_MAX_FAILS={int(value)}")
        elif key == "fail_timeout":
            match = re.fullmatch(r"([0-9]+)(ms|s|m)?", value)
            if match:
                seconds = int(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60, None: 1}[match.group(2)]
                wanted.append(f"UPSTREAM_FAIL_TIMEOUT={seconds:g}")
    return " and ".join(wanted)


def foreign_warning(lines: list[str], path: str, source: str, known: Collection[str] | None = None) -> list[str]:
    """One warning per foreign line: what the deploy does to it and which setting to use instead.

    `known`: the env-file keys bluegreen reads (default: the settings table); a setting not among them is
    never suggested, since it would only reach the app as environment."""
    if known is None:
        known = settings.BY_KEY
    out = []
    for line in lines:
        setting = setting_for(line)
        if setting and not all(part.split("=")[0] in known for part in setting.split(" and ")):
            setting = ""
        fix = (f"set {setting} in {source} instead" if setting else
               "no bluegreen setting writes it: put it in the server block (a `proxy_*` directive) or ask for a setting")
        out.append(f"{path} has `{line}`, which bluegreen did not write; this deploy rewrites the file without it. "
                   f"To keep it, {fix}.")
    return out


def parse_upstream(text: str | None) -> Upstream | None:
    """Upstream name, port and probe token from a managed (or seed-style hand-written) upstream file."""
    if not text:
        return None
    name = _UPSTREAM_RE.search(text)
    server = _SERVER_RE.search(text)
    if not name or not server:
        return None
    token = _TOKEN_RE.search(text)
    port = 0 if re.search(r"\bdown\b", server.group(2)) else int(server.group(1))
    ports = tuple(int(m.group(1)) for m in _SERVER_RE.finditer(text))
    return Upstream(name.group(1), port, token.group(1) if token else "", ports)


def pid_file_from_dump(dump: str, nginx_cmd: Sequence[str]) -> str:
    """The master's pid file as `nginx -T` shows it (relative paths are under the -p prefix)."""
    match = _PID_RE.search(dump)
    if not match:
        return DEFAULT_PID_FILE
    path = match.group(1).strip("\"'")
    if os.path.isabs(path):
        return path
    prefix = "/usr/share/nginx"  # Debian's and Amazon Linux's compiled-in prefix
    cmd = list(nginx_cmd)
    if "-p" in cmd and cmd.index("-p") + 1 < len(cmd):
        prefix = cmd[cmd.index("-p") + 1]
    return os.path.join(prefix, path)


def master_pid(dump: str, nginx_cmd: Sequence[str], pid_file: str = "") -> tuple[int | None, str]:
    """The running master's pid (None if its pid file is unreadable or stale) and the file read."""
    path = pid_file or pid_file_from_dump(dump, nginx_cmd)
    pid = read_pid(path)
    return (pid if pid is not None and Path(f"/proc/{pid}").exists() else None), path


def read_pid(path: str | Path) -> int | None:
    """The number in a pid file; None unless it is a regular file holding one (a FIFO never blocks the open)."""
    try:
        fd = os.open(str(path), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        text = os.read(fd, 64).decode("ascii", "replace").strip()
    except OSError:
        return None
    finally:
        os.close(fd)
    return int(text) if text.isdigit() else None


def parent_pid(pid: int | str, proc: Path = Path("/proc")) -> int | None:
    """The parent of `pid` from /proc/PID/stat (bytes-safe: see runner.proc_stat); None once it has exited."""
    fields = proc_stat(pid, str(proc))
    return int(fields[1]) if fields is not None and len(fields) > 1 and fields[1].isdigit() else None


def children(pid: int, proc: Path = Path("/proc")) -> set[int]:
    """Pids whose parent is `pid` (the nginx workers of a master), from /proc."""
    return {int(entry.name) for entry in proc.iterdir() if entry.name.isdigit() and parent_pid(entry.name, proc) == pid}


def alive(pids: set[int], parent: int, proc: Path = Path("/proc")) -> set[int]:
    """Which of `pids` still exist as children of `parent` (a reused pid is not ours)."""
    return {pid for pid in pids if parent_pid(pid, proc) == parent}


def test_argv(nginx: Sequence[str]) -> list[str]:
    return [*nginx, "-t"]


def dump_argv(nginx: Sequence[str]) -> list[str]:
    return [*nginx, "-T"]


def reload_argv(nginx: Sequence[str]) -> list[str]:
    return [*nginx, "-s", "reload"]


class Nginx:
    """nginx through a Runner, with the configured command prefix."""

    def __init__(self, runner: Runner, cmd: Sequence[str]) -> None:
        self.runner = runner
        self.cmd = tuple(cmd)

    def test(self) -> None:
        """`nginx -t`; raises CommandError carrying nginx's own message."""
        self.runner.run(test_argv(self.cmd), timeout=60)

    def test_and_dump(self) -> str:
        """`nginx -T`: tests like -t and returns the whole configuration it loaded."""
        return self.runner.run(dump_argv(self.cmd), timeout=60, mutates=False).stdout

    def reload(self) -> None:
        self.runner.run(reload_argv(self.cmd), timeout=60)

    @staticmethod
    def error_text(exc: CommandError) -> str:
        """nginx's complaint without the noise lines `-t` always prints."""
        lines = [ln for ln in (exc.stderr + "\n" + exc.stdout).splitlines() if ln.strip()]
        useful = [ln for ln in lines if "test failed" not in ln and "syntax is ok" not in ln]
        return "\n".join(useful or lines) or "(nginx printed nothing)"
