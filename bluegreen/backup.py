"""`bluegreen backup-logs`: the seed's two cron lines (gzip rolled logs into the backup directory; delete
backups past the retention) as one command that loses nothing: an original is removed only once its
compressed copy is complete, verified and on disk, and every file it could not handle is reported."""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import gzip
import os
import stat
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TextIO

from bluegreen.errors import BluegreenError, LockedError, UsageError
from bluegreen.state import fsync_dir

DAY = 86400.0
CHUNK = 1 << 20
LIVE_LOG = "app.log"


@dataclass(frozen=True)
class Entry:
    name: str
    mtime: float
    regular: bool  # a regular file, not a directory or symlink


# -- pure: choosing files ----------------------------------------------------------------------------------

def rolled_logs(entries: list[Entry], *, now: float, older_than_days: float, pattern: str, live: str = LIVE_LOG) -> list[str]:
    """Rolled log files to compress: matching `pattern`, older than the bound, never the live log."""
    cutoff = now - older_than_days * DAY
    return sorted(
        e.name for e in entries
        if e.regular and e.name != live and not e.name.startswith(".") and not e.name.endswith(".gz")
        and fnmatch.fnmatchcase(e.name, pattern) and e.mtime < cutoff
    )


def expired_backups(entries: list[Entry], *, now: float, keep_days: float) -> list[str]:
    """Compressed backups past the retention; nothing else in the directory is ever deleted."""
    cutoff = now - keep_days * DAY
    return sorted(e.name for e in entries if e.regular and e.name.endswith(".gz") and not e.name.startswith(".") and e.mtime < cutoff)


# -- doing ----------------------------------------------------------------------------------------------

class DestinationError(Exception):
    """Writing into the backup directory failed: every further file would fail the same way."""

    def __init__(self, cause: OSError) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _entries(directory: Path) -> list[Entry]:
    found = []
    with os.scandir(directory) as it:
        for item in it:
            try:
                st = item.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            found.append(Entry(item.name, st.st_mtime, stat.S_ISREG(st.st_mode)))
    return found


def _gunzip_stream(path: Path) -> Iterator[bytes]:
    with gzip.open(path, "rb") as fh:  # gzip checks its own CRC-32 and length at the end
        while True:
            chunk = fh.read(CHUNK)
            if not chunk:
                return
            yield chunk


def _digest(chunks: Iterator[bytes]) -> tuple[int, int]:
    crc, size = 0, 0
    for chunk in chunks:
        crc = zlib.crc32(chunk, crc)
        size += len(chunk)
    return crc, size


class _SourceError(Exception):
    def __init__(self, cause: OSError) -> None:
        super().__init__(str(cause))
        self.cause = cause


def compress(src: Path, backup_dir: Path) -> Path:
    """Write SRC.gz into `backup_dir` (temp file, fsync, verify, link into place) and return its path.

    Raises OSError for trouble reading `src`, DestinationError for trouble writing the backup.
    The source is not touched here.
    """
    st = src.stat()
    source = open(src, "rb")  # open first: an unreadable file fails before anything is written

    def read() -> bytes:
        try:
            return source.read(CHUNK)
        except OSError as exc:
            raise _SourceError(exc) from None

    try:
        try:
            fd, tmp_name = tempfile.mkstemp(prefix=f".{src.name}.", suffix=".gz.tmp", dir=str(backup_dir))
        except OSError as exc:
            raise DestinationError(exc) from None
        tmp = Path(tmp_name)
        try:
            crc, size = 0, 0
            try:
                # Buffered writes surface ENOSPC late (at a flush or at close), so the whole block counts as writing.
                with os.fdopen(fd, "wb") as raw:
                    os.fchmod(raw.fileno(), st.st_mode & 0o666)
                    with gzip.GzipFile(filename=src.name, mode="wb", fileobj=raw, mtime=int(st.st_mtime)) as gz:
                        for chunk in iter(read, b""):
                            crc, size = zlib.crc32(chunk, crc), size + len(chunk)
                            _write(gz, chunk)
                    raw.flush()
                    os.fsync(raw.fileno())
            except _SourceError as exc:
                raise exc.cause from None
            except OSError as exc:
                raise DestinationError(exc) from None
            try:
                ok = _digest(_gunzip_stream(tmp)) == (crc, size)
            except (OSError, EOFError, zlib.error):
                ok = False
            if not ok:
                raise DestinationError(OSError(errno.EIO, "the compressed copy did not read back intact", str(tmp)))
            os.utime(tmp, (st.st_atime, st.st_mtime))  # retention counts from the log's own date
            dest = _place(tmp, backup_dir, src.name + ".gz", (crc, size))
        finally:
            tmp.unlink(missing_ok=True)
    finally:
        source.close()
    return dest


def _write(gz: gzip.GzipFile, chunk: bytes) -> None:
    gz.write(chunk)


def _place(tmp: Path, backup_dir: Path, name: str, digest: tuple[int, int]) -> Path:
    """Hard-link the finished temp file to NAME (or NAME.1.gz, ... if taken by other content).

    A link never replaces an existing backup; an identical existing one (a run that stopped between
    writing the backup and removing the original) counts as done.
    """
    stem = name[: -len(".gz")]
    for n in range(1000):
        dest = backup_dir / (name if n == 0 else f"{stem}.{n}.gz")
        try:
            os.link(str(tmp), str(dest))
        except FileExistsError:
            try:
                if _digest(_gunzip_stream(dest)) == digest:
                    return dest
            except (OSError, EOFError, zlib.error):
                pass
            continue
        except OSError as exc:
            raise DestinationError(exc) from None
        try:
            fsync_dir(backup_dir)
        except OSError as exc:
            raise DestinationError(exc) from None
        return dest
    raise DestinationError(OSError(errno.EEXIST, "too many backups with this name", str(backup_dir / name)))


def _lock(backup_dir: Path) -> int:
    """An exclusive flock on the backup directory, so a manual run and the daily one never overlap."""
    fd = os.open(str(backup_dir), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LockedError(
            f"Another backup-logs is already working on {backup_dir}; nothing was changed. It releases the lock "
            f"when it exits; run again afterwards."
        ) from None
    return fd


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def backup_logs(
    *,
    logs: str,
    backup: str,
    older_than: float,
    keep_days: float,
    pattern: str,
    stdout: TextIO,
    now: Callable[[], float] = time.time,
) -> int:
    """Compress rolled logs into `backup`, remove each original once its copy is safe, prune old backups."""
    if older_than < 0 or keep_days <= 0:
        raise UsageError("--older-than must be zero or more days and --keep-days more than zero. Nothing was changed.")
    if "/" in pattern or pattern in ("", LIVE_LOG):
        raise UsageError(f"--pattern: a file name pattern such as app-*.log, got {pattern!r}. Nothing was changed.")
    logs_dir, backup_dir = Path(logs), Path(backup)
    for name, d in (("--logs", logs_dir), ("--backup", backup_dir)):
        if not d.is_dir():
            raise UsageError(f"{name} {d}: no such directory. `bluegreen setup` creates it. Nothing was changed.")
    if logs_dir.resolve() == backup_dir.resolve():
        raise UsageError("--logs and --backup are the same directory; nothing was changed.")
    lock = _lock(backup_dir)
    try:
        return _run(logs_dir, backup_dir, older_than, keep_days, pattern, stdout, now())
    finally:
        os.close(lock)


def _run(logs_dir: Path, backup_dir: Path, older_than: float, keep_days: float, pattern: str, stdout: TextIO, now: float) -> int:
    problems: list[str] = []
    compressed = deleted = 0
    try:
        todo = rolled_logs(_entries(logs_dir), now=now, older_than_days=older_than, pattern=pattern)
    except OSError as exc:
        todo = []
        problems.append(f"cannot list {logs_dir} ({exc.strerror or exc})")
    stopped = ""
    for i, name in enumerate(todo):
        src = logs_dir / name
        try:
            before = src.stat()
            dest = compress(src, backup_dir)
        except DestinationError as exc:
            full = exc.cause.errno in (errno.ENOSPC, errno.EDQUOT)
            what = "the disk is full" if full else (exc.cause.strerror or str(exc.cause))
            stopped = (f"stopped at {name}: cannot write into {backup_dir} ({what}); it and the {len(todo) - i - 1} "
                       f"file(s) after it were left in {logs_dir}")
            break
        except FileNotFoundError:
            continue  # removed meanwhile (logback's own cleanup): nothing to keep
        except OSError as exc:
            problems.append(f"{src}: cannot read it ({exc.strerror or exc}); left in place")
            continue
        after = src.stat()
        if (after.st_size, after.st_mtime) != (before.st_size, before.st_mtime):
            problems.append(f"{src} changed while it was compressed (still written to?); left in place, its copy is {dest}")
            continue
        try:
            src.unlink()
        except OSError as exc:
            problems.append(f"{src}: backed up to {dest} but cannot be removed ({exc.strerror or exc}); remove it by hand")
            continue
        compressed += 1
        print(f"backed up {src} -> {dest} ({_size(before.st_size)} -> {_size(dest.stat().st_size)})", file=stdout)
    try:
        expired = expired_backups(_entries(backup_dir), now=now, keep_days=keep_days)
    except OSError as exc:
        expired = []
        problems.append(f"cannot list {backup_dir} ({exc.strerror or exc}); no old backup was deleted")
    for name in expired:
        try:
            (backup_dir / name).unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            problems.append(f"{backup_dir / name}: cannot delete it ({exc.strerror or exc})")
            continue
        deleted += 1
        print(f"deleted   {backup_dir / name} (older than {keep_days:g} days)", file=stdout)
    if stopped:
        problems.insert(0, stopped)
    print(f"backup-logs: {compressed} log(s) compressed into {backup_dir}, {deleted} old backup(s) deleted, "
          f"{len(problems)} problem(s).", file=stdout)
    if problems:
        raise BluegreenError(
            "backup-logs could not finish; no log was lost (an original is removed only after its compressed "
            "copy is complete on disk):\n" + "\n".join(f"  - {p}" for p in problems) +
            f"\nFix the cause (free disk space, or make {backup_dir} writable and the logs readable for this "
            f"user), then run `backup-logs` again: it picks up what is left."
        )
    return 0
