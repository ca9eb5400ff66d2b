"""The managed upstream file (pure render/parse) and the nginx commands that test and reload it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from bluegreen.errors import CommandError
from bluegreen.runner import Runner

_UPSTREAM_RE = re.compile(r"^\s*upstream\s+([^\s{]+)\s*\{", re.MULTILINE)
_SERVER_RE = re.compile(r"^\s*server\s+(?:[^\s;:]+):([0-9]+)\b", re.MULTILINE)


@dataclass(frozen=True)
class Upstream:
    name: str
    port: int


def render_upstream(*, name: str, port: int, project: str, colour: str, tag: str) -> str:
    """The whole upstream file for one project, pointing at one local port."""
    return (
        "# Managed by bluegreen: rewritten on every deploy; edits here are lost.\n"
        f"# project={project} colour={colour} tag={tag}\n"
        f"upstream {name} {{\n"
        f"    server 127.0.0.1:{port};\n"
        "}\n"
    )


def parse_upstream(text: str | None) -> Upstream | None:
    """Upstream name and port from a managed (or seed-style hand-written) upstream file."""
    if not text:
        return None
    name = _UPSTREAM_RE.search(text)
    server = _SERVER_RE.search(text)
    if not name or not server:
        return None
    return Upstream(name.group(1), int(server.group(1)))


def test_argv(nginx: Sequence[str]) -> list[str]:
    return [*nginx, "-t"]


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

    def reload(self) -> None:
        self.runner.run(reload_argv(self.cmd), timeout=60)

    @staticmethod
    def error_text(exc: CommandError) -> str:
        """nginx's complaint without the noise lines `-t` always prints."""
        lines = [ln for ln in (exc.stderr + "\n" + exc.stdout).splitlines() if ln.strip()]
        useful = [ln for ln in lines if "test failed" not in ln and "syntax is ok" not in ln]
        return "\n".join(useful or lines) or "(nginx printed nothing)"
