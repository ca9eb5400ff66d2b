"""The one safe-file layer for everything under the deploy root, LOG_DIR, the backup and hooks directories.

Rules (see docs/security.md):
- A trusted top directory (`root`: the deploy root, LOG_DIR, ...) is chosen by the admin and opened
  normally; every directory below it is opened relative to its parent's fd with O_NOFOLLOW|O_DIRECTORY.
  Without `root`, the path's parent directory is the trusted one and only the last component is guarded.
- A file is opened with O_NOFOLLOW|O_NONBLOCK (a FIFO never blocks the open), then fstat'd: regular
  files only, and (unless allowed) a single link, so a hard link to a root-only file is refused too.
- Running as root, an entry owned by neither root, this user, the owner of `root` nor the owner of its
  own directory is refused (`check_owner`): only a directory writable by a stranger lets one appear.
- Reads are bounded (`max_bytes`); writes are atomic (O_EXCL temp in the opened directory, fsync, rename
  by dir fd, fsync the directory); appends and in-place updates go through `open_regular`.
- Every refusal is an `UnsafePath` (exit 2) naming the path and what was found; nothing was changed.
"""

from __future__ import annotations

import errno
import os
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

from bluegreen.errors import EXIT_USAGE, BluegreenError

PathLike = Union[str, Path]

DEFAULT_MAX_BYTES = 1 << 20  # state, env, lock and freeze files are tiny; 1 MiB is generous
TAIL_BYTES = 65536  # what the journal readers look at

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class UnsafePath(BluegreenError):
    """A path under a guarded directory is a symlink, FIFO, device, hard link, stranger's file or too large."""

    exit_code = EXIT_USAGE

    def __init__(self, path: PathLike, found: str, *, hint: str = "") -> None:
        self.path = str(path)
        self.found = found
        parent = os.path.dirname(self.path) or "."
        advice = hint or (
            f"If you did not put it there, remove it (`rm {self.path}`) and check who can write {parent}"
        )
        super().__init__(
            f"{self.path} is {found}: bluegreen refuses to follow or use it, and nothing was changed through "
            f"it. {advice} (see docs/security.md)."
        )


# -- describing what is there ---------------------------------------------------------------------------

def describe(name: str, dir_fd: int | None) -> str:
    """What `name` (relative to `dir_fd`) is, for a message: 'a symlink to /etc/x', 'a FIFO', ..."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    return describe_stat(st, name=name, dir_fd=dir_fd)


def describe_stat(st: os.stat_result, *, name: str | None = None, dir_fd: int | None = None) -> str:
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        target = "?"
        if name is not None:
            try:
                target = os.readlink(name, dir_fd=dir_fd)
            except OSError:
                pass
        if not target.isprintable() or len(target) > 200:  # planted: keep escapes off terminals and journals
            target = ascii(target[:200])[1:-1] + ("..." if len(target) > 200 else "")
        return f"a symlink (to {target})"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe), not a regular file"
    if stat.S_ISCHR(mode):
        return "a character device, not a regular file"
    if stat.S_ISBLK(mode):
        return "a block device, not a regular file"
    if stat.S_ISSOCK(mode):
        return "a socket, not a regular file"
    if stat.S_ISDIR(mode):
        return "a directory, not a regular file"
    if stat.S_ISREG(mode):
        return "a regular file"
    return "not a regular file"


def shown(path: Path | str) -> str:
    """A path for a message: names below the root or in LOG_DIR are someone else's choice, so never raw control
    or undecodable bytes (a terminal escape, a line break that forges a second message line)."""
    text = str(path)
    return text if text.isprintable() else ascii(text)


def scan(dir_fd: int, limit: int) -> tuple[list[tuple[str, os.stat_result]], bool]:
    """The entries of an opened directory with their lstat, at most `limit` of them (and whether there were more):
    never follows a link, and an entry that vanished meanwhile is left out."""
    found: list[tuple[str, os.stat_result]] = []
    with os.scandir(dir_fd) as it:
        for n, entry in enumerate(it):
            if n >= limit:
                return found, True
            try:
                found.append((entry.name, entry.stat(follow_symlinks=False)))
            except OSError:
                continue
    return found, False


# -- the walk ---------------------------------------------------------------------------------------------

def _split(path: PathLike, root: PathLike | None) -> tuple[str, list[str], str]:
    """(trusted directory, components between it and the last one, last component)."""
    full = os.path.abspath(str(path))
    if root is None:
        parent, name = os.path.split(full)
        return parent, [], name
    top = os.path.abspath(str(root))
    rel = os.path.relpath(full, top)
    if rel == "." or rel == ".." or rel.startswith(".." + os.sep) or os.path.isabs(rel):
        raise ValueError(f"{full} is not below {top}")
    parts = rel.split(os.sep)
    return top, parts[:-1], parts[-1]


def _trusted_uids(top_fd: int) -> set[int]:
    uids = {0, os.geteuid()}
    try:
        uids.add(os.fstat(top_fd).st_uid)
    except OSError:
        pass
    return uids


def _check_owner(st: os.stat_result, display: str, trusted: set[int], parent_uid: int | None) -> None:
    if os.geteuid() != 0:
        return  # a non-root run cannot be turned against root; the kernel's permissions are the rule
    if st.st_uid in trusted or st.st_uid == parent_uid:
        return
    raise UnsafePath(
        display,
        f"owned by uid {st.st_uid}, who is neither root nor the owner of the deploy root or of its directory",
        hint=f"Someone who should not write there created it: check who can write {os.path.dirname(display)} "
             f"(it should be writable only by root and the deploy user), then remove or chown the file",
    )


def _open_top(top: str, *, create: bool, mode: int) -> int | None:
    """fd of the trusted directory (followed normally), or None when it does not exist."""
    try:
        return os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        if not create:
            return None
        os.makedirs(top, mode=mode, exist_ok=True)
        return os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    # NotADirectoryError propagates as the OSError it is: the trusted directory is the admin's choice.


def _open_sub(parent_fd: int, name: str, display: str, *, create: bool, mode: int) -> int | None:
    """fd of directory `name` in `parent_fd`, never through a symlink; None when missing and not `create`."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except FileNotFoundError:
        if not create:
            return None
        try:
            os.mkdir(name, mode, dir_fd=parent_fd)
        except FileExistsError:
            pass  # a concurrent mkdir, or something planted meanwhile: the open below decides
        return _open_sub(parent_fd, name, display, create=False, mode=mode)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
            raise UnsafePath(display, describe(name, parent_fd)) from None
        raise


def _walk(path: PathLike, root: PathLike | None, *, create: bool = False, mode: int = 0o755,
          check_owner: bool = True) -> tuple[int | None, str, set[int], int | None]:
    """(fd of the last component's directory or None when missing, last name, trusted uids, dir owner)."""
    top, middle, name = _split(path, root)
    fd = _open_top(top, create=create, mode=mode)
    if fd is None:
        return None, name, set(), None
    trusted = _trusted_uids(fd) if check_owner else set()
    display = top
    try:
        parent_uid = os.fstat(fd).st_uid
        for part in middle:
            display = os.path.join(display, part)
            sub = _open_sub(fd, part, display, create=create, mode=mode)
            if sub is None:
                os.close(fd)
                return None, name, trusted, None
            os.close(fd)
            fd = sub
            st = os.fstat(fd)
            if check_owner:
                _check_owner(st, display, trusted, parent_uid)
            parent_uid = st.st_uid
    except BaseException:
        os.close(fd)
        raise
    return fd, name, trusted, parent_uid


def open_dir(path: PathLike, *, root: PathLike | None = None, create: bool = False, mode: int = 0o755,
             check_owner: bool = True) -> int | None:
    """fd of directory `path` (every component below `root` without following symlinks), or None if missing."""
    full = os.path.abspath(str(path))
    if root is not None and os.path.abspath(str(root)) == full:
        return _open_top(full, create=create, mode=mode)
    fd, name, trusted, parent_uid = _walk(path, root, create=create, mode=mode, check_owner=check_owner)
    if fd is None:
        return None
    try:
        sub = _open_sub(fd, name, full, create=create, mode=mode)
    finally:
        os.close(fd)
    if sub is not None and check_owner and root is not None:
        try:
            _check_owner(os.fstat(sub), full, trusted, parent_uid)
        except BaseException:
            os.close(sub)
            raise
    return sub


def open_in(dir_fd: int, name: str, flags: int = os.O_RDONLY, *, display: PathLike | None = None,
            mode: int = 0o644, allow_links: bool = False, trusted: set[int] | None = None,
            parent_uid: int | None = None) -> int:
    """fd of regular file `name` in the opened directory `dir_fd`: no symlink, FIFO, device or hard link.

    `trusted` (a set of uids) turns on the owner check; FileNotFoundError propagates when missing."""
    shown = str(display) if display is not None else name
    if os.sep in name or name in ("", ".", ".."):
        raise UnsafePath(shown, "not a plain file name")
    try:
        fd = os.open(name, flags | _FILE_FLAGS, mode, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR, errno.ENODEV, errno.ETXTBSY, errno.EMLINK):
            raise UnsafePath(shown, describe(name, dir_fd)) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePath(shown, describe_stat(st))
        if st.st_nlink > 1 and not allow_links:
            raise UnsafePath(
                shown, f"a hard link ({st.st_nlink} names for one file, owner uid {st.st_uid})",
                hint=f"A second name can point at any file on this filesystem; remove `{shown}` (the other "
                     f"names keep the file) and check who can write {os.path.dirname(shown)}",
            )
        if trusted:
            _check_owner(st, shown, trusted, parent_uid)
        if flags & os.O_NONBLOCK == 0:
            # O_NONBLOCK only guarded the open; regular files ignore it, but keep the fd as asked.
            os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


@contextmanager
def _parent(path: PathLike, root: PathLike | None, *, create: bool = False, check_owner: bool = True) -> Iterator[tuple[int | None, str, set[int], int | None]]:
    fd, name, trusted, parent_uid = _walk(path, root, create=create, check_owner=check_owner)
    try:
        yield fd, name, trusted, parent_uid
    finally:
        if fd is not None:
            os.close(fd)


def open_regular(path: PathLike, flags: int = os.O_RDONLY, *, root: PathLike | None = None, mode: int = 0o644,
                 allow_links: bool = False, check_owner: bool = True, make_dirs: bool = False) -> int:
    """fd of regular file `path` opened with `flags` (O_CREAT allowed), never through a symlink.

    Raises FileNotFoundError when it (or a directory on the way) is missing and O_CREAT is not given."""
    with _parent(path, root, create=make_dirs, check_owner=check_owner) as (dfd, name, trusted, puid):
        if dfd is None:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        if not check_owner:
            trusted = set()
        elif not trusted:
            trusted = _trusted_uids(dfd)
        return open_in(dfd, name, flags, display=path, mode=mode, allow_links=allow_links,
                       trusted=trusted, parent_uid=puid)


def read_fd(fd: int, max_bytes: int, display: PathLike) -> bytes:
    """All of an open regular file, refusing more than `max_bytes`."""
    chunks = []
    total = 0
    while True:
        chunk = os.read(fd, min(65536, max_bytes + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        if total > max_bytes:
            raise UnsafePath(display, f"larger than {max_bytes} bytes, far more than bluegreen ever writes there",
                             hint=f"Check what wrote it; move it away (`mv {display} {display}.big`) to continue")
    return b"".join(chunks)


def read_bytes(path: PathLike, *, root: PathLike | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
               allow_links: bool = False, check_owner: bool = True) -> bytes | None:
    """Contents of regular file `path`, or None when it (or its directory) does not exist."""
    try:
        fd = open_regular(path, os.O_RDONLY, root=root, allow_links=allow_links, check_owner=check_owner)
    except FileNotFoundError:
        return None
    try:
        return read_fd(fd, max_bytes, path)
    finally:
        os.close(fd)


def read_text(path: PathLike, *, root: PathLike | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
              errors: str = "replace", allow_links: bool = False, check_owner: bool = True) -> str | None:
    """Text of regular file `path` (UTF-8; bad bytes become U+FFFD unless errors='strict'), None if missing."""
    data = read_bytes(path, root=root, max_bytes=max_bytes, allow_links=allow_links, check_owner=check_owner)
    if data is None:
        return None
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as exc:
        raise UnsafePath(path, f"not UTF-8 text (byte {exc.start})",
                         hint=f"Fix or remove {path}") from None


def read_tail(path: PathLike, *, root: PathLike | None = None, max_bytes: int = TAIL_BYTES,
              allow_links: bool = False, check_owner: bool = True) -> tuple[bytes, bool] | None:
    """The last `max_bytes` of regular file `path` and whether anything before them was skipped; None if missing."""
    try:
        fd = open_regular(path, os.O_RDONLY, root=root, allow_links=allow_links, check_owner=check_owner)
    except FileNotFoundError:
        return None
    try:
        size = os.fstat(fd).st_size
        start = max(0, size - max_bytes)
        chunks = []
        total = 0
        while total < max_bytes:
            chunk = os.pread(fd, min(65536, max_bytes - total), start + total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        return b"".join(chunks), start > 0
    finally:
        os.close(fd)


def atomic_write(path: PathLike, data: str | bytes, *, root: PathLike | None = None, mode: int = 0o644,
                 owner: tuple[int, int] | None = None, make_dirs: bool = False, check_owner: bool = True) -> None:
    """Replace `path` with `data` atomically: an O_EXCL temp in the same opened directory, fsync, rename.

    The rename replaces whatever `path` was (a planted symlink is replaced, never written through)."""
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    with _parent(path, root, create=make_dirs, check_owner=check_owner) as (dfd, name, _trusted, _puid):
        if dfd is None:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", os.path.dirname(os.path.abspath(str(path))))
        import secrets  # here, not at the top: read-only commands (status) never write, nor load it

        tmp = f".{name[:200]}.{secrets.token_hex(6)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        try:
            try:
                view = memoryview(raw)
                while view:
                    view = view[os.write(fd, view):]
                if owner is not None:
                    os.fchown(fd, owner[0], owner[1])
                os.fchmod(fd, mode)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dfd)
            except OSError:
                pass
            raise
        _fsync_fd(dfd)


def create_exclusive(path: PathLike, data: str | bytes, *, root: PathLike | None = None, mode: int = 0o600,
                     check_owner: bool = True) -> None:
    """Create `path` with `data`; FileExistsError if anything (a symlink included) already has that name."""
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    with _parent(path, root, check_owner=check_owner) as (dfd, name, _trusted, _puid):
        if dfd is None:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dfd)
        try:
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view):]
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_fd(dfd)


def append(path: PathLike, data: bytes, *, root: PathLike | None = None, mode: int = 0o644,
           make_dirs: bool = False, check_owner: bool = True) -> None:
    """Append `data` with one O_APPEND write and fsync; creates the file; refuses what open_regular refuses."""
    fd = open_regular(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, root=root, mode=mode,
                      make_dirs=make_dirs, check_owner=check_owner)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink(path: PathLike, *, root: PathLike | None = None, missing_ok: bool = True) -> None:
    """Remove the name `path` (a symlink is removed itself, never its target); directories are refused."""
    with _parent(path, root, check_owner=False) as (dfd, name, _t, _p):
        if dfd is None:
            if missing_ok:
                return
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        try:
            os.unlink(name, dir_fd=dfd)
        except FileNotFoundError:
            if not missing_ok:
                raise


def lstat(path: PathLike, *, root: PathLike | None = None) -> os.stat_result | None:
    """lstat of `path`, reached without following symlinks below `root`; None when missing."""
    with _parent(path, root, check_owner=False) as (dfd, name, _t, _p):
        if dfd is None:
            return None
        try:
            return os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return None


def chown_nofollow(path: PathLike, uid: int, gid: int, *, root: PathLike | None = None) -> None:
    """chown a regular file or directory through an fd opened without following symlinks; refuses anything else."""
    full = os.path.abspath(str(path))
    if root is not None and os.path.abspath(str(root)) == full:
        fd = _open_top(full, create=False, mode=0o755)
        if fd is None:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", full)
    else:
        with _parent(path, root, check_owner=False) as (dfd, name, _t, _p):
            if dfd is None:
                raise FileNotFoundError(errno.ENOENT, "No such file or directory", full)
            try:
                fd = os.open(name, os.O_RDONLY | _FILE_FLAGS, dir_fd=dfd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENXIO, errno.ENODEV):
                    raise UnsafePath(full, describe(name, dfd)) from None
                raise
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            raise UnsafePath(full, describe_stat(st))
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            raise UnsafePath(full, f"a hard link ({st.st_nlink} names for one file)")
        os.fchown(fd, uid, gid)
    finally:
        os.close(fd)


def fsync_dir(directory: PathLike) -> None:
    """Make a rename or link in `directory` durable (best effort where the filesystem refuses)."""
    try:
        fd = os.open(str(directory), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        _fsync_fd(fd)
    finally:
        os.close(fd)


def _fsync_fd(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename is still atomic
