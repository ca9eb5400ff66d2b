"""Project hooks: executables in ROOT/hooks/PROJECT/, run with BLUEGREEN_* variables and a time limit.

A hook runs in its own process group. It is done when the hook process itself exits (its output pipe gets
PIPE_GRACE more); whatever it started and left running is then killed, and at HOOK_TIMEOUT the whole group
is. Run as root, a hook must be a regular file (no symlink, also not for the directories on the way) owned
by root or the deploy root's owner and writable by nobody else: anyone who can change it runs code as root.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Mapping

from bluegreen import safefs
from bluegreen.errors import BluegreenError, CommandError
from bluegreen.runner import Result, Runner

HOOK_NAMES = ("pre-deploy", "post-deploy", "on-failure")
OUTPUT_LIMIT = 64 * 1024  # per stream; a hook printing 100 MB costs no memory, only its first and last 32 KiB
TIMED_OUT = 124  # the exit code reported for a hook killed at HOOK_TIMEOUT (as timeout(1) does)


def hook_env(base: Mapping[str, str], values: Mapping[str, object]) -> dict[str, str]:
    """`base` plus BLUEGREEN_<KEY> for each value (None becomes empty)."""
    env = dict(base)
    for key, value in values.items():
        env[f"BLUEGREEN_{key.upper()}"] = "" if value is None else str(value)
    return env


def find(hooks_dir: Path, name: str) -> Path | None:
    """The hook's path if anything has that name (`run` refuses one that is unsafe or not executable)."""
    path = hooks_dir / name
    try:
        os.lstat(str(path))
    except (OSError, ValueError):
        return None
    return path


def check(path: Path) -> str | None:
    """Why the hook at `path` (ROOT/hooks/PROJECT/NAME) must not run, or None."""
    hooks_dir = path.parent
    root = hooks_dir.parent.parent
    fds: list[int] = []
    try:
        try:
            root_owner = os.stat(str(root)).st_uid
            for directory in (hooks_dir.parent, hooks_dir):
                fd = safefs.open_dir(directory, root=root)
                if fd is None:
                    return f"{path} could not be run: {directory} disappeared"
                fds.append(fd)
            fds.append(safefs.open_in(fds[-1], path.name, display=path))
        except BluegreenError as exc:  # safefs.UnsafePath: a symlink, FIFO, hard link or foreign owner
            return exc.message
        except PermissionError:
            return f"{path} cannot be read by this user (uid {os.geteuid()}): it cannot be checked, so it does not run."
        except FileNotFoundError:
            return f"{path} disappeared before it could run."
        except OSError as exc:
            return f"{path} could not be opened: {exc.strerror or exc}."
        shown = (hooks_dir.parent, hooks_dir, path)
        for where, fd in zip(shown, fds):
            problem = _unsafe(where, os.fstat(fd), root_owner, root)
            if problem:
                return problem
        if not os.fstat(fds[-1]).st_mode & 0o111:
            return f"{path} is not executable (chmod +x it)"
        return None
    finally:
        for fd in fds:
            os.close(fd)


def _unsafe(path: Path, st: os.stat_result, root_owner: int, root: Path) -> str | None:
    """As root: a hook, or a directory holding it, that someone besides root and the deploy root's owner can change."""
    if os.geteuid() != 0:
        return None  # a hook run as the deploy user cannot be turned against root
    what = "directory" if stat.S_ISDIR(st.st_mode) else "hook"
    if st.st_uid not in (0, root_owner):
        return (f"The {what} {path} is owned by uid {st.st_uid}, who is neither root nor the owner of {root}: "
                f"bluegreen runs hooks as root and does not run code someone else can change, so the hook did not "
                f"run. If the file is what you want to run, `chown root {path}`; else remove it.")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (f"The {what} {path} is writable by its group or by everyone (mode {stat.S_IMODE(st.st_mode):04o}): "
                f"bluegreen runs hooks as root and does not run code others can change, so the hook did not run. "
                f"`chmod go-w {path}`, then deploy again.")
    return None


def run(runner: Runner, path: Path, env: Mapping[str, str], timeout: float) -> Result:
    """Run one hook by its path (never through a shell); returns its Result, never raises for the hook's failure."""
    argv = (str(path),)
    problem = check(path)
    if problem:
        return Result(argv, 126, "", problem)
    try:
        result = runner.run(list(argv), check=False, timeout=timeout, env=env, new_session=True,
                            output_limit=OUTPUT_LIMIT)
    except CommandError as exc:  # timed out: the runner killed the hook's whole process group
        err = exc.stderr.split("\n", 1)[1] if exc.stderr.startswith("timed out after") else exc.stderr
        note = (f"[bluegreen] the hook ran longer than HOOK_TIMEOUT ({timeout:g}s): it was stopped, with every "
                f"process it started.")
        return Result(argv, TIMED_OUT, exc.stdout, f"{err.rstrip()}\n{note}".lstrip("\n"))
    except (BluegreenError, OSError) as exc:  # bad shebang, no shebang (ENOEXEC), CRLF line ends
        return Result(argv, 126, "", f"{path} could not be executed: {getattr(exc, 'message', None) or exc}")
    if result.note:
        note = (f"[bluegreen] the hook exited but {result.note.replace('it left', 'left')}; a hook must finish "
                f"its work before it exits (start long-running work as a service, e.g. with systemd-run).")
        result = Result(result.argv, result.returncode, result.stdout, f"{result.stderr.rstrip()}\n{note}".lstrip("\n"),
                        result.truncated, result.note)
    return result


def output(result: Result, limit: int = 40, width: int = 500) -> str:
    """What the hook printed, indented, at most `limit` lines of at most `width` characters."""
    lines = (result.stdout.rstrip("\n") + "\n" + result.stderr).strip().splitlines()
    notes = [ln for ln in lines if ln.startswith("[bluegreen] ")]  # what bluegreen did: always shown
    lines = [ln for ln in lines if not ln.startswith("[bluegreen] ")]
    if len(lines) > limit:
        lines = lines[:limit] + [f"... ({len(lines) - limit} more lines)"]
    lines += notes
    return "\n".join("    " + (ln if len(ln) <= width else ln[:width] + " ...") for ln in lines)
