"""State files on disk, always replaced atomically so a crash leaves the old or the new, never half.

Every read and write goes through `safefs`: no symlink, FIFO, device or hard link is followed, reads are
bounded, and bytes that are not UTF-8 never crash a reader (they become U+FFFD: the file then parses as
nothing). Pass `root=settings.root` for files under the deploy root so that no directory on the way can
be a planted symlink either; without it only the file itself is guarded."""

from __future__ import annotations

import os
from pathlib import Path

from bluegreen import safefs
from bluegreen.config import COLOURS

MAX_STATE_BYTES = safefs.DEFAULT_MAX_BYTES
_MAX_ACTIVE_BYTES = 4096  # `blue\n` with room for hand edits; anything larger is garbage


def atomic_write(path: Path, data: str, *, mode: int = 0o644, root: Path | None = None) -> None:
    """Write to an O_EXCL temp file in the same directory, fsync, rename over `path`, fsync the directory."""
    safefs.atomic_write(path, data, root=root, mode=mode)


def fsync_dir(directory: Path) -> None:
    """Make a rename or link in `directory` durable (best effort where the filesystem refuses)."""
    safefs.fsync_dir(directory)


def read_text(path: Path, *, root: Path | None = None, max_bytes: int = MAX_STATE_BYTES) -> str | None:
    """File contents, or None when it does not exist; undecodable bytes become U+FFFD.

    Raises safefs.UnsafePath (exit 2) for a symlink, FIFO, device, hard link or a file over `max_bytes`."""
    return safefs.read_text(path, root=root, max_bytes=max_bytes)


def _projects_root(path: Path, root: Path | None) -> Path:
    # ROOT/projects/PROJECT.active: ROOT is the trusted directory, so `projects` itself is never followed.
    return root if root is not None else Path(path).parent.parent


def read_active(path: Path, *, root: Path | None = None) -> str | None:
    """The colour recorded in PROJECT.active, or None when missing or unreadable as a colour.

    Only its first bytes are read: a huge file is garbage, not a colour. A symlink, FIFO or device raises
    safefs.UnsafePath."""
    try:
        fd = safefs.open_regular(path, os.O_RDONLY, root=_projects_root(path, root))
    except FileNotFoundError:
        return None
    try:
        data = os.read(fd, _MAX_ACTIVE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > _MAX_ACTIVE_BYTES:
        return None
    colour = data.decode("utf-8", errors="replace").strip()
    return colour if colour in COLOURS else None


def write_active(path: Path, colour: str, *, root: Path | None = None) -> None:
    atomic_write(path, colour + "\n", root=_projects_root(path, root))
