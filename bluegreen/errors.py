"""Typed errors: each carries the message the user reads and the exit code the CLI returns."""

from __future__ import annotations

TYPE_CHECKING = False  # not typing's: cli imports this module on every start, typing costs start-up
if TYPE_CHECKING:
    from typing import TextIO

# Exit codes (documented in README.md and docs/exit-codes.md).
EXIT_OK = 0
EXIT_FAILED = 1  # the deploy failed; the previous version still serves
EXIT_USAGE = 2  # usage or configuration error; nothing was changed
EXIT_LOCKED = 3  # another deploy (or a freeze) holds the project
EXIT_ATTENTION = 4  # the service needs a human: the message says exactly what


class BluegreenError(Exception):
    """Base of every error the user can cause; `str()` is the whole user message."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str, *, exit_code: int | None = None, details: str = "") -> None:
        super().__init__(message)
        self.message = message
        # Shown to the user after the message, but never journaled or sent in a notification:
        # container log lines can hold anything, secrets included.
        self.details = details
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(BluegreenError):
    """Bad command line or configuration, detected before anything changed."""

    exit_code = EXIT_USAGE


class ConfigError(UsageError):
    """A project env file or setting is invalid; the message names file and key."""


class LockedError(BluegreenError):
    """Another deploy of the same project is running."""

    exit_code = EXIT_LOCKED


class DeployFailed(BluegreenError):
    """A deploy step failed and everything was put back: the previous version serves."""

    exit_code = EXIT_FAILED


class NeedsAttention(BluegreenError):
    """Something could not be put back or finished: a human must act."""

    exit_code = EXIT_ATTENTION


class CommandError(BluegreenError):
    """An external command failed; keeps argv, exit code and output for the caller."""

    def __init__(self, argv: list[str], returncode: int, stdout: str, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(
            f"`{' '.join(self.argv)}` failed with exit code {returncode}: {self.output_tail()}"
        )

    def output_tail(self, lines: int = 8) -> str:
        """Last lines of what the command printed, stderr preferred."""
        text = (self.stderr or self.stdout or "").strip()
        if not text:
            return "(no output)"
        return "\n".join(text.splitlines()[-lines:])


class ExecutableNotFound(BluegreenError):
    """The docker or nginx binary (or sudo) is not on PATH."""

    exit_code = EXIT_USAGE


class Interrupted(BaseException):
    """SIGTERM/SIGHUP/SIGINT during a deploy; a BaseException so it runs every undo."""

    def __init__(self, signame: str) -> None:
        super().__init__(signame)
        self.signame = signame


def os_problem(exc: OSError) -> str:
    """`No space left on device: /opt/deploy/projects/x.journal.`, for a message."""
    what = exc.strerror or str(exc) or type(exc).__name__
    return f"{what}: {exc.filename}." if exc.filename else f"{what}."


def say(stream: TextIO, text: str) -> None:
    """Print a line; a closed stderr (CI cancelled, SSH gone) must never break a deploy or its undo. Here, not
    in deploy: cli's error paths print with it, and must not import anything once a command has failed (the
    pyz may have been replaced on disk meanwhile, and an import from it would fail)."""
    try:
        print(text, file=stream, flush=True)
    except (OSError, ValueError):
        pass
