"""The one place that runs external programs: argv lists only, never a shell."""

from __future__ import annotations

import shlex
import subprocess
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from bluegreen.errors import CommandError, ExecutableNotFound


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def display(argv: Sequence[str]) -> str:
    """Shell-quoted form of argv, for messages and --dry-run output."""
    return " ".join(shlex.quote(a) for a in argv)


def indent(text: str) -> str:
    """Every line indented by four spaces, for command output inside a message."""
    return "\n".join("    " + line for line in text.splitlines())


class Runner:
    """Runs a command; `mutates=False` marks read-only queries that a dry run may still make."""

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float | None = None,
        mutates: bool = True,
        env: Mapping[str, str] | None = None,
        input: bytes | None = None,
    ) -> Result:
        raise NotImplementedError

    def stream(self, argv: Sequence[str]) -> int:
        """Run with the terminal's stdin/stdout/stderr (docker logs -f); returns the exit code."""
        raise NotImplementedError


class SubprocessRunner(Runner):
    """Runs commands for real, capturing text output."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self.env = dict(env) if env is not None else None

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float | None = None,
        mutates: bool = True,
        env: Mapping[str, str] | None = None,
        input: bytes | None = None,
    ) -> Result:
        argv = [str(a) for a in argv]
        try:
            # `input` goes through a pipe (secrets for `docker run --env-file /dev/stdin`): never a file.
            proc = subprocess.run(
                argv,
                input=input,
                stdin=None if input is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                timeout=timeout,
                env=dict(env) if env is not None else self.env,
                check=False,
            )
        except (FileNotFoundError, PermissionError) as exc:
            raise _not_runnable(argv[0], exc) from None
        except subprocess.TimeoutExpired as exc:
            raise CommandError(argv, -1, _text(exc.stdout), f"timed out after {timeout:g}s\n{_text(exc.stderr)}") from None
        result = Result(tuple(argv), proc.returncode, _text(proc.stdout), _text(proc.stderr))
        if check and not result.ok:
            raise CommandError(argv, result.returncode, result.stdout, result.stderr)
        return result


    def stream(self, argv: Sequence[str]) -> int:
        argv = [str(a) for a in argv]
        try:
            return subprocess.call(argv, env=self.env)
        except (FileNotFoundError, PermissionError) as exc:
            raise _not_runnable(argv[0], exc) from None


def _not_runnable(exe: str, exc: OSError) -> ExecutableNotFound:
    if isinstance(exc, PermissionError):
        return ExecutableNotFound(f"Executable `{exe}` exists but may not be run by this user.")
    return ExecutableNotFound(
        f"Executable `{exe}` not found on PATH. Install it, or point bluegreen at it "
        f"(BLUEGREEN_DOCKER / BLUEGREEN_NGINX). Nothing was changed."
    )


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    if isinstance(data, bytes):
        return data.decode("utf-8", errors="replace")
    return data


Responder = Callable[[Sequence[str]], "Result | None"]


@dataclass
class RecordingRunner(Runner):
    """Records every argv; answers from `responder` (tests) or with success (dry runs).

    With `passthrough` set, read-only commands (`mutates=False`) really run, so a dry run
    plans from the host's true state while changing nothing.
    """

    responder: Responder | None = None
    passthrough: Runner | None = None
    calls: list[tuple[str, ...]] = field(default_factory=list)
    inputs: dict[int, bytes] = field(default_factory=dict)  # index in `calls` -> what went to its stdin

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float | None = None,
        mutates: bool = True,
        env: Mapping[str, str] | None = None,
        input: bytes | None = None,
    ) -> Result:
        argv = tuple(str(a) for a in argv)
        if self.passthrough is not None and not mutates:
            return self.passthrough.run(argv, check=check, timeout=timeout, mutates=False, env=env, input=input)
        self.calls.append(argv)
        if input is not None:
            self.inputs[len(self.calls) - 1] = input
        result = self.responder(argv) if self.responder else None
        if result is None:
            result = Result(argv, 0, "", "")
        if check and not result.ok:
            raise CommandError(list(argv), result.returncode, result.stdout, result.stderr)
        return result

    def stream(self, argv: Sequence[str]) -> int:
        self.calls.append(tuple(str(a) for a in argv))
        return 0
