"""State files on disk, always replaced atomically so a crash leaves the old or the new, never half."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from bluegreen.config import COLOURS


def atomic_write(path: Path, data: str, *, mode: int = 0o644) -> None:
    """Write to a temp file in the same directory, fsync, rename over `path`, fsync the directory."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename or link in `directory` durable (best effort where the filesystem refuses)."""
    try:
        fd = os.open(str(directory), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def read_text(path: Path) -> str | None:
    """File contents, or None when it does not exist."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


def read_active(path: Path) -> str | None:
    """The colour recorded in PROJECT.active, or None when missing or unreadable as a colour."""
    text = read_text(path)
    if text is None:
        return None
    colour = text.strip()
    return colour if colour in COLOURS else None


def write_active(path: Path, colour: str) -> None:
    atomic_write(path, colour + "\n")
