"""One deploy per project at a time (an fcntl lock the kernel drops when the holder dies), and the
deliberate freeze an operator sets during an incident (a file that stays until `unlock`)."""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from contextlib import contextmanager
from typing import Callable, Iterator

from bluegreen.errors import LockedError


@dataclass(frozen=True)
class Holder:
    pid: int
    user: str
    host: str
    tag: str
    since: str  # ISO 8601, UTC

    def describe(self) -> str:
        return f"pid {self.pid} (user {self.user} on {self.host}, deploying tag {self.tag}, since {self.since})"


def read_holder(path: Path) -> Holder | None:
    """Who wrote the lock file last; None if empty or unreadable (e.g. mid-write)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8") or "null")
        return Holder(int(data["pid"]), str(data["user"]), str(data["host"]), str(data["tag"]), str(data["since"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


@contextmanager
def project_lock(
    path: Path,
    holder: Holder,
    *,
    wait: float = 0.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[None]:
    """Hold an exclusive flock on `path`; wait up to `wait` seconds for it, else raise LockedError."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(path), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        start = clock()
        deadline = start + max(0.0, wait)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                # A holder that never wrote its name is a reader (`status`, `doctor` peeking with a
                # shared lock for a moment) or a deploy in its first instant: give it half a second.
                grace = start + 0.5 if read_holder(path) is None else start
                if clock() >= max(deadline, grace):
                    raise LockedError(_locked_message(path, wait)) from None
                sleep(min(0.2, max(0.01, deadline - clock())))
        # The file's content is informational only: the flock is the lock. Written after
        # acquiring so a reader sees the current holder (or nothing while we write).
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(asdict(holder)).encode() + b"\n", 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing drops the flock


def _locked_message(path: Path, wait: float) -> str:
    holder = read_holder(path)
    who = holder.describe() if holder else "another process (it has not said who yet)"
    waited = f" after waiting {wait:g}s" if wait > 0 else ""
    return (
        f"Another deploy of this project is running{waited}: {who}. Nothing was changed; the version "
        f"that was serving still serves. Wait for it to finish, or retry with --wait SECONDS to queue "
        f"behind it. The lock is released automatically when that process exits, even if it is killed."
    )


def current_holder(path: Path) -> Holder | None:
    """Who holds the deploy lock right now, without taking it; None when it is free."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return read_holder(path) or Holder(0, "?", "?", "?", "?")
    finally:
        os.close(fd)  # also drops the shared lock if we got it
    return None


@dataclass(frozen=True)
class Freeze:
    message: str
    user: str
    since: str  # ISO 8601, UTC

    def describe(self) -> str:
        return f"frozen by {self.user} since {self.since}: {self.message}"


def read_freeze(path: Path) -> Freeze | None:
    """The freeze on a project, or None. An unreadable freeze file still freezes."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        return Freeze(f"(freeze file unreadable: {exc.strerror})", "?", "?")
    try:
        data = json.loads(text)
        return Freeze(str(data["message"]), str(data["user"]), str(data["since"]))
    except (ValueError, KeyError, TypeError):
        return Freeze(text.strip() or "(no message)", "?", "?")


def freeze_json(freeze: Freeze) -> str:
    return json.dumps(asdict(freeze)) + "\n"
