"""The deploy journal: one JSON line per deploy attempt, appended, never rewritten."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from bluegreen import safefs
from bluegreen.config import is_tag
from bluegreen.safefs import UnsafePath

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
    instant: bool = False  # an instant rollback: the retained container was started, nothing pulled or created

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))


READ_BYTES = 1 << 20  # history, rollback and prune look at the last MiB (thousands of attempts)
TAIL_BYTES = 65536  # status looks at the last 64 KiB
_BAD_JSON = (ValueError, TypeError, OverflowError, RecursionError)


def _journal_root(path: Path, root: Path | None) -> Path:
    # ROOT/projects/PROJECT.journal: ROOT is trusted, `projects` is never followed.
    return root if root is not None else Path(path).parent.parent


def append(path: Path, entry: Entry, *, root: Path | None = None) -> str | None:
    """Append one line; returns None, or why it could not be written (it never raises).

    A journal that is a symlink, FIFO, device or hard link is never written through: that is reported."""
    try:
        line = (entry.to_json() + "\n").encode("utf-8")
        # One write() of one line with O_APPEND: concurrent writers never interleave inside a
        # line, and a crash can at worst leave a torn last line, which read() skips.
        safefs.append(path, line, root=_journal_root(path, root), mode=0o644, make_dirs=True)
        return None
    except UnsafePath as exc:
        return f"could not append to the journal (nothing was written through it): {exc.message}"
    except OSError as exc:
        return f"could not append to {path}: {exc.strerror or exc}"
    except _BAD_JSON as exc:
        return f"could not append to {path}: {exc}"


def read(path: Path, *, root: Path | None = None, max_bytes: int = READ_BYTES) -> list[Entry]:
    """Readable entries of the journal's last `max_bytes`, oldest first; torn or foreign lines are skipped.

    Raises safefs.UnsafePath (exit 2) when the journal is a symlink, FIFO, device or hard link."""
    found = safefs.read_tail(path, root=_journal_root(path, root), max_bytes=max_bytes)
    if found is None:
        return []
    data, cut = found
    lines = data.decode("utf-8", errors="replace").split("\n")
    if cut:
        lines = lines[1:]  # the first line is probably cut
    return list(parse_lines(lines))


def read_tail(path: Path, *, root: Path | None = None, max_bytes: int = TAIL_BYTES) -> list[Entry]:
    """Like read() over the last `max_bytes`, but never raises: an unsafe or unreadable journal is empty."""
    try:
        return read(path, root=root, max_bytes=max_bytes)
    except (UnsafePath, OSError):
        return []


def _str(value: object) -> bool:
    return isinstance(value, str)


def _opt_str(value: object) -> bool:
    return value is None or isinstance(value, str)


def _number(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value) and abs(value) < 1e12
    except OverflowError:
        return False


def _tag(value: object) -> bool:
    # What deploy accepts as TAG: rollback and prune act on journaled tags, so no other shape may come back.
    return is_tag(value)


def _opt_tag(value: object) -> bool:
    return value is None or _tag(value)


def _duration(value: object) -> bool:
    return _number(value) and value >= 0


def _exit_code(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -1024 < value < 1024


def _bool(value: object) -> bool:
    return isinstance(value, bool)


def _steps(value: object) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and _number(v) for k, v in value.items())


_CHECKS = {
    "time": _str, "host": _str, "user": _str, "project": _str, "action": _str, "tag": _tag,
    "image": _str, "digest": _str, "from_colour": _opt_str, "to_colour": _opt_str, "from_tag": _opt_tag,
    "result": _str, "exit_code": _exit_code, "failed_step": _opt_str, "message": _str,
    "duration": _duration, "steps": _steps, "instant": _bool,
}
_REQUIRED = ("time", "host", "user", "project", "action", "tag")


def parse_line(line: object) -> Entry | None:
    """One journal line as an Entry, or None when it is not one (any shape, any bytes): never raises."""
    try:
        if not isinstance(line, str):
            return None
        data = json.loads(line)
        if not isinstance(data, dict) or not all(k in data for k in _REQUIRED):
            return None
        fields = {}
        for key, check in _CHECKS.items():
            if key in data:
                if not check(data[key]):
                    return None
                fields[key] = data[key]
        if "duration" in fields:
            fields["duration"] = float(fields["duration"])
        return Entry(**fields)
    except _BAD_JSON:
        return None


def parse_lines(lines: Iterable[str]) -> Iterable[Entry]:
    """The entries among `lines`; lines of any other shape are skipped."""
    for line in lines:
        entry = parse_line(line)
        if entry is not None:
            yield entry


def successful_tags(entries: list[Entry]) -> list[str]:
    """Tags of successful deploys, newest first, each once."""
    seen: list[str] = []
    for entry in reversed(entries):
        if entry.result == RESULT_DEPLOYED and entry.tag not in seen:
            seen.append(entry.tag)
    return seen


def rollback_candidates(entries: list[Entry]) -> list[str]:
    """What a rollback may go to, newest first, each once: the tags of successful deploys, then what served
    before them (their `from_tag`), which is the only record of a version deployed before bluegreen took over
    (by the guide's deploy.sh, or by hand)."""
    tags = successful_tags(entries)
    for entry in reversed(entries):
        if entry.result == RESULT_DEPLOYED and entry.from_tag and entry.from_tag not in tags:
            tags.append(entry.from_tag)
    return tags


def rollback_target(entries: list[Entry], serving_tag: str | None) -> str | None:
    """The tag of the newest successful deploy that is not what serves now; when there is none, what served
    before the newest successful deploy that replaced something else (its `from_tag`): after `deploy.sh` ran v1
    and bluegreen deployed v2, that is v1."""
    for tag in rollback_candidates(entries):
        if tag != serving_tag:
            return tag
    return None


_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")


def recorded_digest(entries: list[Entry], tag: str) -> str:
    """The registry digest the newest successful deploy of `tag` recorded ("" if none)."""
    for entry in reversed(entries):
        if entry.result == RESULT_DEPLOYED and entry.tag == tag:
            digest = entry.digest if isinstance(entry.digest, str) else ""
            return digest if _DIGEST_RE.fullmatch(digest) else ""
    return ""


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _clean(text: str | None, limit: int = 200) -> str:
    """A journal field fit for a terminal line: no control characters (escape sequences), bounded length."""
    return _CONTROL.sub("?", (text or "")[:limit])


def render(entries: list[Entry]) -> str:
    """Newest first, one line each, readable at a glance."""
    lines = []
    for e in reversed(entries):
        move = f"{_clean(e.from_colour, 20) or '-'}->{_clean(e.to_colour, 20) or '-'}"
        head = (f"{_clean(e.time, 40)}  {_clean(e.action, 20):<8} {_clean(e.tag, 140):<16} {_clean(e.result, 20):<9} "
                f"{move:<11} {e.duration:6.1f}s  {_clean(e.user, 64)}@{_clean(e.host, 128)}")
        if e.instant and e.result == RESULT_DEPLOYED:  # a failed one may have stopped before its start step
            head += "  instant (the retained container started, nothing pulled)"
        if e.result != RESULT_DEPLOYED:
            first = e.message.splitlines()[0] if e.message.splitlines() else ""
            step = f"step {_clean(e.failed_step, 40)}: " if e.failed_step else ""
            head += f"\n    {step}{_clean(first)}"
        lines.append(head)
    return "\n".join(lines)
