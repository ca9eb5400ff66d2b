"""The managed upstream file (pure render/parse) and the nginx commands that test and reload it."""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from bluegreen.errors import CommandError
from bluegreen.runner import Runner

_UPSTREAM_RE = re.compile(r"^\s*upstream\s+([^\s{]+)\s*\{", re.MULTILINE)
_SERVER_RE = re.compile(r"^\s*server\s+(?:[^\s;:]+):([0-9]+)\b([^;]*);", re.MULTILINE)
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
    return secrets.token_hex(16)


def render_upstream(*, name: str, port: int, project: str, colour: str, tag: str, token: str, down: bool = False) -> str:
    """The whole upstream file for one project, pointing at one local port.

    The map answers the route (the upstream address nginx used) only to requests carrying the
    project's token, so ordinary clients never see internal addresses. The token is kept across
    deploys so that old and new workers both answer a probe, and the answer says which one it was.
    With `down`, a placeholder for a project not deployed yet: valid for `nginx -t`, routes nowhere.
    """
    return (
        "# Managed by bluegreen: rewritten on every deploy; edits here are lost.\n"
        f"# project={project} colour={colour} tag={tag}\n"
        f"upstream {name} {{\n"
        f"    server 127.0.0.1:{port}{' down' if down else ''};\n"
        "}\n"
        f"# For bluegreen's post-switch probe; the server block adds: {add_header_line(project)}\n"
        f"map $http_{PROBE_HEADER.lower().replace('-', '_')} {route_variable(project)} {{\n"
        f'    "{token}" $upstream_addr;\n'
        '    default "";\n'
        "}\n"
    )


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
    return Upstream(name.group(1), port, token.group(1) if token else "")


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
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def parent_pid(pid: int | str, proc: Path = Path("/proc")) -> int | None:
    """The parent of `pid` from /proc/PID/stat; None once it has exited.

    Read as bytes: field 2 is the command name, which any local user can make any bytes (even ones that
    are not UTF-8) and which may hold spaces and ')': everything after the last ')' is ours to split."""
    try:
        with open(proc / str(pid) / "stat", "rb") as fh:
            data = fh.read(4096)
    except OSError:
        return None
    fields = data.rsplit(b")", 1)[-1].split()
    return int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else None


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
        return self.runner.run(dump_argv(self.cmd), timeout=60).stdout

    def reload(self) -> None:
        self.runner.run(reload_argv(self.cmd), timeout=60)

    @staticmethod
    def error_text(exc: CommandError) -> str:
        """nginx's complaint without the noise lines `-t` always prints."""
        lines = [ln for ln in (exc.stderr + "\n" + exc.stdout).splitlines() if ln.strip()]
        useful = [ln for ln in lines if "test failed" not in ln and "syntax is ok" not in ln]
        return "\n".join(useful or lines) or "(nginx printed nothing)"
