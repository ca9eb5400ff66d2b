"""Project hooks: executables in ROOT/hooks/PROJECT/, run with BLUEGREEN_* variables and a time limit."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from bluegreen.errors import BluegreenError, CommandError
from bluegreen.runner import Result, Runner

HOOK_NAMES = ("pre-deploy", "post-deploy", "on-failure")


def hook_env(base: Mapping[str, str], values: Mapping[str, object]) -> dict[str, str]:
    """`base` plus BLUEGREEN_<KEY> for each value (None becomes empty)."""
    env = dict(base)
    for key, value in values.items():
        env[f"BLUEGREEN_{key.upper()}"] = "" if value is None else str(value)
    return env


def find(hooks_dir: Path, name: str) -> Path | None:
    """The hook file if present (`run` reports one that is not executable)."""
    path = hooks_dir / name
    return path if path.is_file() else None


def run(runner: Runner, path: Path, env: Mapping[str, str], timeout: float) -> Result:
    """Run one hook; returns its Result (never raises for the hook's own failure)."""
    if not os.access(str(path), os.X_OK):
        return Result((str(path),), 126, "", f"{path} is not executable (chmod +x it)")
    try:
        return runner.run([str(path)], check=False, timeout=timeout, env=env)
    except CommandError as exc:  # timed out
        return Result((str(path),), exc.returncode, exc.stdout, exc.stderr)
    except (BluegreenError, OSError) as exc:  # bad shebang, no shebang (ENOEXEC), CRLF line ends
        return Result((str(path),), 126, "", f"{path} could not be executed: {getattr(exc, 'message', None) or exc}")


def output(result: Result, limit: int = 40) -> str:
    """What the hook printed, indented, at most `limit` lines."""
    lines = (result.stdout + result.stderr).strip().splitlines()
    if len(lines) > limit:
        lines = lines[:limit] + [f"... ({len(lines) - limit} more lines)"]
    return "\n".join("    " + ln for ln in lines)
