"""One deploy per project at a time (an fcntl lock the kernel drops when the holder dies), and the
deliberate freeze an operator sets during an incident (a file that stays until `unlock`)."""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from contextlib import contextmanager
from typing import Callable, Iterator

from bluegreen import safefs
from bluegreen.errors import LockedError
from bluegreen.safefs import UnsafePath


@dataclass(frozen=True)
class Holder:
    pid: int
    user: str
    host: str
    tag: str
    since: str  # ISO 8601, UTC

    def describe(self) -> str:
        return f"pid {self.pid} (user {self.user} on {self.host}, deploying tag {self.tag}, since {self.since})"


MAX_LOCK_BYTES = 4096  # one JSON line of a few fields
MAX_FREEZE_BYTES = 65536
_BAD_JSON = (ValueError, KeyError, TypeError, OverflowError, RecursionError)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def _printable(text: str, limit: int) -> str:
    """A field read from disk, fit for a message, the journal and a webhook: no escape sequences, bounded."""
    text = _CONTROL.sub("?", text)
    return text if len(text) <= limit else text[:limit] + "..."


def _state_root(path: Path, root: Path | None) -> Path:
    # The lock and freeze files live in ROOT/projects: ROOT is trusted, `projects` is never followed.
    return root if root is not None else Path(path).parent.parent


def _holder_from(data: bytes) -> Holder | None:
    try:
        obj = json.loads(data.decode("utf-8", errors="replace") or "null")
        if not isinstance(obj, dict):
            return None
        pid = obj["pid"]
        if not isinstance(pid, int) or isinstance(pid, bool):
            return None
        fields = [obj[k] for k in ("user", "host", "tag", "since")]
        if not all(isinstance(f, str) for f in fields):
            return None
        return Holder(pid, *(_printable(f, 200) for f in fields))
    except _BAD_JSON:
        return None


def read_holder(path: Path, *, root: Path | None = None) -> Holder | None:
    """Who wrote the lock file last; None if empty, unreadable (e.g. mid-write) or not a safe regular file."""
    try:
        fd = safefs.open_regular(path, os.O_RDONLY, root=_state_root(path, root))
    except (OSError, UnsafePath):
        return None
    try:
        return _holder_from(os.pread(fd, MAX_LOCK_BYTES, 0))
    except OSError:
        return None
    finally:
        os.close(fd)


def _open_lock(path: Path, root: Path | None) -> int:
    """The lock file's fd, created if missing; never through a symlink, never a FIFO or a hard link."""
    try:
        return safefs.open_regular(path, os.O_RDWR | os.O_CREAT, root=_state_root(path, root), mode=0o644, make_dirs=True)
    except UnsafePath as exc:
        if os.path.abspath(exc.path) != os.path.abspath(str(path)):
            raise  # a directory on the way (a stranger's, a symlink): its own advice, not a lock file's
        raise UnsafePath(
            exc.path, exc.found,
            hint=f"Nothing was deployed; the version that was serving still serves. The deploy lock must be a "
                 f"regular file bluegreen creates itself: if you did not put this there, remove it (`rm "
                 f"{exc.path}`) and check who can write {os.path.dirname(exc.path)}",
        ) from None


@contextmanager
def project_lock(
    path: Path,
    holder: Holder,
    *,
    wait: float = 0.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    root: Path | None = None,
    retry: str = "or retry with --wait SECONDS to queue behind it",
) -> Iterator[None]:
    """Hold an exclusive flock on `path`; wait up to `wait` seconds for it, else raise LockedError.

    A lock path that is a symlink, FIFO, device or hard link raises safefs.UnsafePath (exit 2)."""
    path = Path(path)
    fd = _open_lock(path, root)
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
                grace = start + 0.5 if _pread_holder(fd) is None else start
                if clock() >= max(deadline, grace):
                    raise LockedError(_locked_message(_pread_holder(fd), wait, retry)) from None
                sleep(min(0.2, max(0.01, deadline - clock())))
        # The file's content is informational only: the flock is the lock. Written after
        # acquiring so a reader sees the current holder (or nothing while we write). The fd is the
        # regular, single-link file checked at open: truncating it can only empty the lock file.
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(asdict(holder)).encode() + b"\n", 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing drops the flock


def _pread_holder(fd: int) -> Holder | None:
    try:
        return _holder_from(os.pread(fd, MAX_LOCK_BYTES, 0))
    except OSError:
        return None


def _locked_message(holder: Holder | None, wait: float,
                    retry: str = "or retry with --wait SECONDS to queue behind it") -> str:
    who = holder.describe() if holder else "another process (it has not said who yet)"
    waited = f" after waiting {wait:g}s" if wait > 0 else ""
    return (
        f"Another deploy of this project is running{waited}: {who}. Nothing was changed; the version "
        f"that was serving still serves. Wait for it to finish, {retry}. The lock is released automatically when that process exits, even if it is killed."
    )


def current_holder(path: Path, *, root: Path | None = None) -> Holder | None:
    """Who holds the deploy lock right now, without taking it; None when it is free or missing.

    A lock path that is a symlink, FIFO, device or hard link raises safefs.UnsafePath."""
    try:
        fd = safefs.open_regular(path, os.O_RDONLY, root=_state_root(path, root))
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _pread_holder(fd) or Holder(0, "?", "?", "?", "?")
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


def read_freeze(path: Path, *, root: Path | None = None) -> Freeze | None:
    """The freeze on a project, or None. An unreadable or unsafe freeze file still freezes, and an unsafe
    one (symlink, FIFO, device, hard link, too large) is never read: its content could be any file's."""
    try:
        data = safefs.read_bytes(path, root=_state_root(path, root), max_bytes=MAX_FREEZE_BYTES)
    except UnsafePath as exc:
        from bluegreen.host import invocation  # only for this message: lock stays below host in the layers

        return Freeze(f"(the freeze file {exc.path} is {exc.found}, so it was not read; remove it with "
                      f"`{invocation()} unlock` or `rm`, see docs/security.md)", "?", "?")
    except OSError as exc:
        return Freeze(f"(freeze file unreadable: {exc.strerror or exc})", "?", "?")
    if data is None:
        return None
    text = data.decode("utf-8", errors="replace")
    try:
        obj = json.loads(text)
        if isinstance(obj, dict) and all(isinstance(obj.get(k), str) for k in ("message", "user", "since")):
            return Freeze(_printable(obj["message"], 2000), _printable(obj["user"], 200), _printable(obj["since"], 64))
    except _BAD_JSON:
        pass
    return Freeze(_printable(text.strip(), 2000) or "(no message)", "?", "?")


def freeze_json(freeze: Freeze) -> str:
    return json.dumps(asdict(freeze)) + "\n"
