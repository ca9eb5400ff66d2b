"""`bluegreen backup-logs`: the seed's two cron lines (gzip rolled logs into the backup directory; delete
backups past the retention) as one command that loses nothing: an original is removed only once its
compressed copy is complete, verified and on disk, and every file it could not handle is reported."""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import gzip
import os
import secrets
import stat
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TextIO

from bluegreen import safefs
from bluegreen.errors import BluegreenError, LockedError, UsageError

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
#
# LOG_DIR is written by the app container and the backup directory by the deploy user, while this may run
# as root: both are opened once without following a link, and every entry is then listed, opened, compared
# and removed relative to those fds, never by path again. A log is opened O_NOFOLLOW|O_NONBLOCK (a FIFO or
# symlink swapped in after the listing never blocks nor leads elsewhere), must still be the regular file that
# was listed, and is read only up to the size it had when opened.

MAX_ENTRIES = 100_000  # one run looks at this many directory entries at most; the rest wait for the next run
MAX_PROBLEMS = 50  # shown in the message; the count says how many there were
SPARSE_MIN = 64 << 20  # a log this long that is mostly holes was not appended to: it is not read (see _holes)
TEMP_PREFIX = ".bluegreen-backup."


class DestinationError(Exception):
    """Writing into the backup directory failed: every further file would fail the same way."""

    def __init__(self, cause: OSError) -> None:
        super().__init__(str(cause))
        self.cause = cause


class _SourceError(Exception):
    def __init__(self, cause: OSError) -> None:
        super().__init__(str(cause))
        self.cause = cause


@dataclass(frozen=True)
class Listed:
    """A regular file as listed: what it must still be when it is opened and when it is removed."""

    name: str
    ino: int
    dev: int


shown = safefs.shown


def _entries_fd(dir_fd: int, problems: list[str], where: Path) -> tuple[list[Entry], dict[str, Listed]]:
    found: list[Entry] = []
    ids: dict[str, Listed] = {}
    entries, more = safefs.scan(dir_fd, MAX_ENTRIES)
    if more:
        problems.append(f"{shown(where)} has more than {MAX_ENTRIES} entries; the rest wait for the next run")
    for name, st in entries:
        regular = stat.S_ISREG(st.st_mode)
        found.append(Entry(name, st.st_mtime, regular))
        if regular:
            ids[name] = Listed(name, st.st_ino, st.st_dev)
    return found, ids


def _entries(directory: Path) -> list[Entry]:
    fd = safefs.open_dir(directory, check_owner=False)
    if fd is None:
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(directory))
    try:
        return _entries_fd(fd, [], directory)[0]
    finally:
        os.close(fd)


def _gunzip_fd(fd: int, limit: int) -> Iterator[bytes]:
    """The decompressed content of the open gzip file `fd`, at most `limit` + 1 bytes (a bomb stops there)."""
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.fdopen(os.dup(fd), "rb")
    with raw, gzip.GzipFile(fileobj=raw, mode="rb") as fh:  # gzip checks its own CRC-32 and length at the end
        total = 0
        while total <= limit:
            chunk = fh.read(min(CHUNK, limit + 1 - total))
            if not chunk:
                return
            total += len(chunk)
            yield chunk


def _digest(chunks: Iterator[bytes]) -> tuple[int, int]:
    crc, size = 0, 0
    for chunk in chunks:
        crc = zlib.crc32(chunk, crc)
        size += len(chunk)
    return crc, size


def _name_max(dir_fd: int) -> int:
    try:
        return os.fpathconf(dir_fd, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def compress(src_fd: int, name: str, backup_fd: int, backup_dir: Path) -> str:
    """Write NAME.gz from the open log `src_fd` into the opened backup directory (temp file, fsync, verify,
    link into place) and return the backup's name.

    Reads at most the size the log had when opened. Raises OSError for trouble reading the log,
    DestinationError for trouble writing the backup. The log is not touched here."""
    st = os.fstat(src_fd)
    remaining = st.st_size

    def read() -> bytes:
        nonlocal remaining
        if remaining <= 0:
            return b""
        try:
            chunk = os.read(src_fd, min(CHUNK, remaining))
        except OSError as exc:
            raise _SourceError(exc) from None
        remaining -= len(chunk)
        return chunk

    # The temp name is ours alone (O_EXCL, never a link) and never longer than the log's name allows.
    tmp = f"{TEMP_PREFIX}{secrets.token_hex(8)}.gz.tmp"
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=backup_fd)
    except OSError as exc:
        raise DestinationError(exc) from None
    try:
        crc, size = 0, 0
        try:
            # Buffered writes surface ENOSPC late (at a flush or at close), so the whole block counts as writing.
            with os.fdopen(os.dup(fd), "wb") as raw:
                os.fchmod(raw.fileno(), st.st_mode & 0o644)  # never group- or world-writable
                # The header holds an unsigned 32-bit time: a date before 1970 or after 2106 (anyone writing
                # LOG_DIR can set one) is left out rather than crash the run.
                header_mtime = int(st.st_mtime) if 0 <= st.st_mtime < 2 ** 32 else 0
                with gzip.GzipFile(filename=name, mode="wb", fileobj=raw, mtime=header_mtime) as gz:
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
            ok = _digest(_gunzip_fd(fd, size)) == (crc, size)
        except (OSError, EOFError, zlib.error, gzip.BadGzipFile):
            ok = False
        if not ok:
            raise DestinationError(OSError(errno.EIO, "the compressed copy did not read back intact", str(backup_dir / tmp)))
        try:
            os.utime(fd, (st.st_atime, st.st_mtime))  # retention counts from the log's own date
        except OSError as exc:
            raise DestinationError(exc) from None
        return _place(tmp, backup_fd, backup_dir, name + ".gz", (crc, size))
    finally:
        os.close(fd)
        try:
            os.unlink(tmp, dir_fd=backup_fd)
        except OSError:
            pass


def _holes(fd: int, size: int) -> int:
    """Bytes of `fd` that are holes (never written). A log is appended to and has none; a file made with
    `truncate -s 1T` is all holes and would cost hours of reading zeros. Bounded number of lseeks."""
    holes, pos = 0, 0
    try:
        for _ in range(10000):
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
            if hole >= size:
                break
            try:
                pos = os.lseek(fd, hole, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                pos = size  # a hole up to the end
            holes += pos - hole
    except (OSError, AttributeError):  # a filesystem (or platform) that cannot say: trust the file
        pass
    finally:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
        except OSError:
            pass
    return holes


def _remove_stale_temps(backup_fd: int) -> None:
    """Temp files of a run that was killed: this run holds the lock, so no live run owns one."""
    try:
        names = [n for n in os.listdir(backup_fd)[:MAX_ENTRIES] if n.startswith(TEMP_PREFIX) and n.endswith(".gz.tmp")]
    except OSError:
        return
    for name in names:
        try:
            if stat.S_ISREG(os.stat(name, dir_fd=backup_fd, follow_symlinks=False).st_mode):
                os.unlink(name, dir_fd=backup_fd)
        except OSError:
            pass


def _write(gz: gzip.GzipFile, chunk: bytes) -> None:
    gz.write(chunk)


def _same_backup(backup_fd: int, name: str, digest: tuple[int, int]) -> bool:
    """Is `name` in the backup directory a regular file holding exactly `digest`? Never through a link."""
    try:
        fd = safefs.open_in(backup_fd, name, os.O_RDONLY)
    except (OSError, BluegreenError):
        return False
    try:
        return _digest(_gunzip_fd(fd, digest[1])) == digest
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile):
        return False
    finally:
        os.close(fd)


def _place(tmp: str, backup_fd: int, backup_dir: Path, name: str, digest: tuple[int, int]) -> str:
    """Hard-link the finished temp file to NAME (or NAME.1.gz, ... if taken by other content) in the opened
    backup directory, and return the name used.

    A link never replaces an existing entry (a planted symlink included: it is neither written through nor
    removed); an identical existing backup (a run that stopped before removing the original) counts as done.
    """
    stem = name[: -len(".gz")]
    for n in range(1000):
        dest = name if n == 0 else f"{stem}.{n}.gz"
        try:
            os.link(tmp, dest, src_dir_fd=backup_fd, dst_dir_fd=backup_fd, follow_symlinks=False)
        except FileExistsError:
            if _same_backup(backup_fd, dest, digest):
                return dest
            continue
        except OSError as exc:
            raise DestinationError(exc) from None
        try:
            os.fsync(backup_fd)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EROFS, errno.EBADF):  # filesystems that refuse a directory fsync
                raise DestinationError(exc) from None
        return dest
    raise DestinationError(OSError(errno.EEXIST, "too many backups with this name", str(backup_dir / name)))


def _lock(backup_fd: int, backup_dir: Path) -> None:
    """An exclusive flock on the backup directory, so a manual run and the daily one never overlap."""
    try:
        fcntl.flock(backup_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise LockedError(
            f"Another backup-logs is already working on {shown(backup_dir)}; nothing was changed. It releases the lock "
            f"when it exits; run again afterwards."
        ) from None


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _open_dir(option: str, d: Path) -> int:
    """The directory, opened once; a link at its last component (or anything but a directory) is refused."""
    try:
        fd = safefs.open_dir(d, check_owner=False)
    except safefs.UnsafePath as exc:
        raise UsageError(f"{option}: {exc.message} If you made that link yourself, give the directory it points to "
                         f"instead.") from None
    except OSError as exc:
        raise UsageError(f"{option} {shown(d)}: cannot open it ({exc.strerror or exc}). Nothing was changed.") from None
    if fd is None:
        from bluegreen.host import invocation

        raise UsageError(f"{option} {shown(d)}: no such directory. `sudo {invocation()} setup` creates it. Nothing was changed.")
    return fd


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
    if not (0 <= older_than < 1e6) or not (0 < keep_days < 1e6):  # NaN fails both; a huge bound is a typo
        raise UsageError("--older-than must be zero or more days and --keep-days more than zero (both under a "
                         "million). Nothing was changed.")
    if "/" in pattern or pattern in ("", LIVE_LOG) or not pattern.isprintable() or len(pattern) > 255:
        raise UsageError(f"--pattern: a file name pattern such as app-*.log, got {ascii(pattern)[:100]}. Nothing was changed.")
    logs_dir, backup_dir = Path(logs), Path(backup)
    logs_fd = _open_dir("--logs", logs_dir)
    try:
        backup_fd = _open_dir("--backup", backup_dir)
        try:
            a, b = os.fstat(logs_fd), os.fstat(backup_fd)
            if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
                raise UsageError("--logs and --backup are the same directory; nothing was changed.")
            _lock(backup_fd, backup_dir)
            return _run(logs_fd, backup_fd, logs_dir, backup_dir, older_than, keep_days, pattern, stdout, now())
        finally:
            os.close(backup_fd)  # closing the last fd releases the flock
    finally:
        os.close(logs_fd)


def _open_log(logs_fd: int, item: Listed, src: Path) -> int:
    """The listed log, opened without following a link or blocking; UnsafePath if it is no longer that file."""
    fd = safefs.open_in(logs_fd, item.name, os.O_RDONLY, display=src)
    st = os.fstat(fd)
    if (st.st_ino, st.st_dev) != (item.ino, item.dev):
        os.close(fd)
        raise safefs.UnsafePath(src, "another file than the one listed a moment before (replaced meanwhile)",
                                hint="It was left in place for the next run")
    return fd


def _run(logs_fd: int, backup_fd: int, logs_dir: Path, backup_dir: Path, older_than: float, keep_days: float,
         pattern: str, stdout: TextIO, now: float) -> int:
    problems: list[str] = []
    compressed = deleted = 0
    try:
        entries, ids = _entries_fd(logs_fd, problems, logs_dir)
        todo = rolled_logs(entries, now=now, older_than_days=older_than, pattern=pattern)
    except OSError as exc:
        todo, ids = [], {}
        problems.append(f"cannot list {shown(logs_dir)} ({exc.strerror or exc})")
    name_max = _name_max(backup_fd)
    _remove_stale_temps(backup_fd)
    stopped = ""
    for i, name in enumerate(todo):
        src = logs_dir / name
        if len(name.encode("utf-8", "surrogateescape")) + len(".999.gz") > name_max:
            problems.append(f"{shown(src)}: its name is too long to add .gz within this filesystem's limit of {name_max} "
                            f"bytes; left in place (rename it to back it up)")
            continue
        try:
            fd = _open_log(logs_fd, ids[name], src)
        except FileNotFoundError:
            continue  # removed meanwhile (logback's own cleanup): nothing to keep
        except safefs.UnsafePath as exc:
            problems.append(f"{shown(src)} is {exc.found}, not the regular file listed; left in place, never read")
            continue
        except OSError as exc:
            problems.append(f"{shown(src)}: cannot read it ({exc.strerror or exc}); left in place")
            continue
        try:
            before = os.fstat(fd)
            if before.st_size >= SPARSE_MIN and _holes(fd, before.st_size) * 10 > before.st_size * 9:
                problems.append(f"{shown(src)} is {_size(before.st_size)} long but mostly holes (a sparse file, not an "
                                f"appended log); left in place, not read")
                continue
            try:
                dest = compress(fd, name, backup_fd, backup_dir)
            except DestinationError as exc:
                full = exc.cause.errno in (errno.ENOSPC, errno.EDQUOT)
                what = "the disk is full" if full else (exc.cause.strerror or str(exc.cause))
                stopped = (f"stopped at {shown(name)}: cannot write into {shown(backup_dir)} ({what}); it and the "
                           f"{len(todo) - i - 1} file(s) after it were left in {shown(logs_dir)}")
                break
            except OSError as exc:
                problems.append(f"{shown(src)}: cannot read it ({exc.strerror or exc}); left in place")
                continue
            after = os.fstat(fd)
        finally:
            os.close(fd)
        if (after.st_size, after.st_mtime) != (before.st_size, before.st_mtime):
            problems.append(f"{shown(src)} changed while it was compressed (still written to?); left in place, its "
                            f"copy is {shown(backup_dir / dest)}")
            continue
        try:
            # Remove the name only if it still is the file that was copied (the directory is the container's).
            now_there = os.stat(name, dir_fd=logs_fd, follow_symlinks=False)
            if (now_there.st_ino, now_there.st_dev) != (before.st_ino, before.st_dev):
                problems.append(f"{shown(src)} was replaced while it was compressed; left in place, the copy of the "
                                f"original is {shown(backup_dir / dest)}")
                continue
            os.unlink(name, dir_fd=logs_fd)
        except OSError as exc:
            problems.append(f"{shown(src)}: backed up to {shown(backup_dir / dest)} but cannot be removed "
                            f"({exc.strerror or exc}); remove it by hand")
            continue
        compressed += 1
        try:
            packed = _size(os.stat(dest, dir_fd=backup_fd, follow_symlinks=False).st_size)
        except OSError:
            packed = "?"
        print(f"backed up {shown(src)} -> {shown(backup_dir / dest)} ({_size(before.st_size)} -> {packed})", file=stdout)
    try:
        listed, backups = _entries_fd(backup_fd, problems, backup_dir)
        expired = expired_backups(listed, now=now, keep_days=keep_days)
    except OSError as exc:
        expired, backups = [], {}
        problems.append(f"cannot list {shown(backup_dir)} ({exc.strerror or exc}); no old backup was deleted")
    for name in expired:
        # unlink by the directory fd removes that name only: a symlink put there meanwhile is removed itself,
        # its target never (and a symlink is never listed as a backup to begin with).
        try:
            st = os.stat(name, dir_fd=backup_fd, follow_symlinks=False)
            if (st.st_ino, st.st_dev) != (backups[name].ino, backups[name].dev):
                continue  # replaced since the listing: not the expired backup any more
            os.unlink(name, dir_fd=backup_fd)
        except FileNotFoundError:
            continue
        except OSError as exc:
            problems.append(f"{shown(backup_dir / name)}: cannot delete it ({exc.strerror or exc})")
            continue
        deleted += 1
        print(f"deleted   {shown(backup_dir / name)} (older than {keep_days:g} days)", file=stdout)
    if stopped:
        problems.insert(0, stopped)
    print(f"backup-logs: {compressed} log(s) compressed into {shown(backup_dir)}, {deleted} old backup(s) deleted, "
          f"{len(problems)} problem(s).", file=stdout)
    if problems:
        listed = problems[:MAX_PROBLEMS]
        if len(problems) > MAX_PROBLEMS:
            listed.append(f"... and {len(problems) - MAX_PROBLEMS} more")
        raise BluegreenError(
            "backup-logs could not finish; no log was lost (an original is removed only after its compressed "
            "copy is complete on disk):\n" + "\n".join(f"  - {p}" for p in listed) +
            f"\nFix the cause (free disk space, or make {shown(backup_dir)} writable and the logs readable for this "
            f"user), then run `backup-logs` again: it picks up what is left."
        )
    return 0
