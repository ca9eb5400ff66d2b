"""The deploy journal: one JSON line per deploy attempt, appended, never rewritten."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

RESULT_DEPLOYED = "deployed"  # exit 0
RESULT_FAILED = "failed"  # exit 1: the previous version still serves
RESULT_REFUSED = "refused"  # exit 2/3: nothing was attempted (config, lock, freeze)
RESULT_ATTENTION = "attention"  # exit 4


@dataclass(frozen=True)
class Entry:
    time: str  # ISO 8601 UTC, when the attempt started
    host: str
    user: str
    project: str
    action: str  # deploy | rollback
    tag: str
    image: str = ""  # IMAGE:TAG or IMAGE@digest as deployed
    digest: str = ""  # the registry digest docker pull reported
    from_colour: str | None = None
    to_colour: str | None = None
    from_tag: str | None = None
    result: str = RESULT_FAILED
    exit_code: int = 1
    failed_step: str | None = None
    message: str = ""
    duration: float = 0.0
    steps: dict = field(default_factory=dict)  # step name -> seconds

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))


def append(path: Path, entry: Entry) -> str | None:
    """Append one line; returns None, or why it could not be written (it never raises)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # One write() of one line with O_APPEND: concurrent writers never interleave inside a
        # line, and a crash can at worst leave a torn last line, which read() skips.
        fd = os.open(str(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (entry.to_json() + "\n").encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        return None
    except OSError as exc:
        return f"could not append to {path}: {exc.strerror or exc}"


def read(path: Path) -> list[Entry]:
    """Every readable entry, oldest first; torn or foreign lines are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    return list(parse_lines(text.splitlines()))


def parse_lines(lines: Iterable[str]) -> Iterable[Entry]:
    known = set(Entry.__dataclass_fields__)
    for line in lines:
        try:
            data = json.loads(line)
            if not isinstance(data, dict):
                continue
            yield Entry(**{k: v for k, v in data.items() if k in known})
        except (ValueError, TypeError):
            continue


def successful_tags(entries: list[Entry]) -> list[str]:
    """Tags of successful deploys, newest first, each once."""
    seen: list[str] = []
    for entry in reversed(entries):
        if entry.result == RESULT_DEPLOYED and entry.tag not in seen:
            seen.append(entry.tag)
    return seen


def rollback_target(entries: list[Entry], serving_tag: str | None) -> str | None:
    """The tag of the newest successful deploy that is not what serves now."""
    for tag in successful_tags(entries):
        if tag != serving_tag:
            return tag
    return None


def render(entries: list[Entry]) -> str:
    """Newest first, one line each, readable at a glance."""
    lines = []
    for e in reversed(entries):
        move = f"{e.from_colour or '-'}->{e.to_colour or '-'}"
        head = f"{e.time}  {e.action:<8} {e.tag:<16} {e.result:<9} {move:<11} {e.duration:6.1f}s  {e.user}@{e.host}"
        if e.result != RESULT_DEPLOYED:
            first = e.message.splitlines()[0] if e.message else ""
            head += f"\n    {('step ' + e.failed_step + ': ') if e.failed_step else ''}{first[:200]}"
        lines.append(head)
    return "\n".join(lines)
