"""Command line: parse, dispatch to thin adapters, and turn typed errors into messages and exit codes."""

from __future__ import annotations

import argparse
import datetime
import getpass
import os
import signal
import socket
import sys
import traceback
from dataclasses import dataclass
from contextlib import contextmanager
from typing import Iterator, Sequence, TextIO

from bluegreen import __version__
from bluegreen.config import Settings, load_project, load_settings, validate_project, validate_tag
from bluegreen.deploy import Deployer, Progress, read_plan
from bluegreen.errors import EXIT_ATTENTION, EXIT_FAILED, EXIT_OK, EXIT_USAGE, BluegreenError, Interrupted
from bluegreen.lock import Holder, project_lock
from bluegreen.runner import SubprocessRunner

EPILOG = """\
exit codes:
  0  deployed (or nothing to do)
  1  the deploy failed and the previous version still serves
  2  usage or configuration error; nothing was changed
  3  another deploy of the project holds the lock; nothing was changed
  4  failed and the service needs attention (the message says exactly what)

environment:
  BLUEGREEN_ROOT    deploy root (default /opt/deploy), same as --root
  BLUEGREEN_DOCKER  docker command prefix (default: docker)
  BLUEGREEN_NGINX   nginx command prefix (default: nginx as root, else sudo -n nginx)
"""


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", metavar="DIR", help="deploy root (default: $BLUEGREEN_ROOT or /opt/deploy)")
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks on errors")


@dataclass(frozen=True)
class Context:
    """What every command adapter gets besides its parsed arguments."""

    settings: Settings
    environ: dict
    stdout: TextIO
    stderr: TextIO


def build_parser() -> tuple[argparse.ArgumentParser, list[str]]:
    """The parser and the names of its commands (for the `bluegreen PROJECT TAG` shorthand)."""
    parser = argparse.ArgumentParser(
        prog="bluegreen",
        description="Zero-downtime blue/green deploys of a Docker container behind nginx. "
        "`bluegreen PROJECT [TAG]` is short for `bluegreen deploy PROJECT [TAG]`.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"bluegreen {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "deploy",
        help="pull, start the idle colour, health-check, switch nginx, retire the old one",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(p)
    p.add_argument("project", metavar="PROJECT")
    p.add_argument("tag", metavar="TAG", nargs="?", default="latest", help="image tag or sha256:digest (default: latest)")
    p.add_argument("--wait", metavar="SECONDS", type=float, default=0.0, help="queue behind a running deploy this long instead of exiting 3")
    p.add_argument("--dry-run", action="store_true", help="print the plan with its exact commands; change nothing")
    p.set_defaults(func=cmd_deploy)

    # -- day-2 commands (status, history, rollback, prune, lock, unlock, logs) --

    # -- host set-up commands (init, setup, doctor, backup-logs) --

    return parser, list(sub.choices)


def _with_default_command(argv: list[str], commands: Sequence[str]) -> list[str]:
    """`bluegreen user-api v2` means `bluegreen deploy user-api v2`."""
    takes_value = {"--root", "--wait"}
    skip = False
    for token in argv:
        if skip:
            skip = False
            continue
        if token in takes_value:
            skip = True
            continue
        if token.startswith("-"):
            if token in ("-h", "--help", "--version"):
                return argv
            continue
        return argv if token in commands else ["deploy", *argv]
    return argv


def cmd_deploy(args: argparse.Namespace, ctx: Context) -> int:
    return deploy(
        settings=ctx.settings,
        project=args.project,
        tag=args.tag,
        wait=args.wait,
        dry_run=args.dry_run,
        stdout=ctx.stdout,
        stderr=ctx.stderr,
        environ=ctx.environ,
    )


def deploy(*, settings: Settings, project: str, tag: str, wait: float, dry_run: bool, stdout: TextIO, stderr: TextIO, environ: dict) -> int:
    validate_project(project)
    validate_tag(tag)
    if wait < 0:
        raise BluegreenError("--wait must be zero or more seconds.", exit_code=EXIT_USAGE)
    cfg = load_project(settings, project)
    for warning in cfg.warnings:
        print(f"warning: {warning}", file=stderr)
    if dry_run:
        plan, warnings = read_plan(settings, cfg, tag)
        for warning in warnings:
            print(f"warning: {warning}", file=stderr)
        print(f"Dry run: deploy {plan.ref} as {plan.target_name} (nothing will be changed)", file=stdout)
        for line in plan.describe():
            print(line, file=stdout)
        return EXIT_OK

    holder = Holder(
        pid=os.getpid(),
        user=_user(environ),
        host=socket.gethostname(),
        tag=tag,
        since=datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
    )
    progress = Progress(stderr)
    with project_lock(settings.lock_file(project), holder, wait=wait):
        # Plan under the lock: the previous deploy may have just switched colours.
        plan, warnings = read_plan(settings, cfg, tag)
        for warning in warnings:
            print(f"warning: {warning}", file=stderr)
        progress.say(f"Deploying {plan.ref} to {project} as {plan.target_name} (127.0.0.1:{plan.target_port})")
        summary = Deployer(settings=settings, runner=SubprocessRunner(), progress=progress).run(plan)
    print(summary, file=stdout)
    return EXIT_OK


def _user(environ: dict) -> str:
    sudo_user = environ.get("SUDO_USER")
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry and no USER variable (env -i in a container)
        user = str(os.getuid())
    return f"{sudo_user} (via sudo as {user})" if sudo_user and sudo_user != user else user


@contextmanager
def _signals_as_interrupts() -> Iterator[None]:
    """SIGTERM/SIGHUP (CI cancelled, SSH dropped) and Ctrl-C raise Interrupted once, so undos run.

    Later signals are ignored: the deploy is then busy putting things back.
    """
    fired = [False]

    def handler(signum: int, frame: object) -> None:
        if fired[0]:
            return
        fired[0] = True
        raise Interrupted(signal.Signals(signum).name)

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        try:
            previous[sig] = signal.signal(sig, handler)
        except (ValueError, OSError):  # not the main thread (embedded use): leave signals alone
            pass
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def main(argv: Sequence[str] | None = None, *, environ: dict | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Run the CLI; returns the exit code (the only place errors become output)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    environ = dict(os.environ if environ is None else environ)
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    parser, commands = build_parser()
    try:
        args = parser.parse_args(_with_default_command(argv, commands))
    except SystemExit as exc:  # argparse prints usage itself; --help and --version exit 0
        return int(exc.code or 0) if isinstance(exc.code, int) or exc.code is None else EXIT_USAGE
    if not getattr(args, "func", None):
        parser.print_help(stderr)
        return EXIT_USAGE
    verbose = getattr(args, "verbose", False)
    try:
        with _signals_as_interrupts():
            settings = load_settings(getattr(args, "root", None), environ)
            return args.func(args, Context(settings=settings, environ=environ, stdout=stdout, stderr=stderr))
    except BluegreenError as exc:
        if verbose:
            traceback.print_exc(file=stderr)
        print(f"bluegreen: {exc.message}", file=stderr)
        return exc.exit_code
    except Interrupted as exc:
        if verbose:
            traceback.print_exc(file=stderr)
        print(f"bluegreen: interrupted by {exc.signame} before anything was changed.", file=stderr)
        return EXIT_FAILED
    except OSError as exc:
        if verbose:
            traceback.print_exc(file=stderr)
        print(
            f"bluegreen: {exc.strerror or exc}{': ' + str(exc.filename) if exc.filename else ''}. Any deploy step "
            f"in progress was undone. Check the permissions of the deploy root (or run as its owner), then retry.",
            file=stderr,
        )
        return EXIT_FAILED
    except Exception as exc:  # a bug: say so plainly, keep the traceback for --verbose
        if verbose:
            traceback.print_exc(file=stderr)
        print(
            f"bluegreen: internal error ({type(exc).__name__}: {exc}). Steps in progress were undone where "
            f"possible; check `docker ps` and `nginx -t` for this project, and rerun with --verbose to report it.",
            file=stderr,
        )
        return EXIT_ATTENTION


if __name__ == "__main__":
    sys.exit(main())
