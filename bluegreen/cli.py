"""Command line: parse, dispatch to thin adapters, and turn typed errors into messages and exit codes."""

from __future__ import annotations

import os
import sys

from bluegreen import __version__
from bluegreen.colours import COLOURS
from bluegreen.errors import EXIT_ATTENTION, EXIT_FAILED, EXIT_OK, EXIT_USAGE, BluegreenError, ConfigError, Interrupted, UsageError
from bluegreen.errors import os_problem, say

# Start-up: `--version` loads only the modules above, `--help` argparse besides; each command imports what it
# runs inside its own function, so no command loads another's modules and neither loads the deploy machinery
# (tests/test_startup.py). Not even typing: annotations are strings here.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Collection, Sequence, TextIO

    from bluegreen.config import Settings

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
  BLUEGREEN_NGINX_PID_FILE   the nginx master's pid file (default: the pid directive of nginx -T)
  BLUEGREEN_NGINX_CONF, BLUEGREEN_NGINX_CONF_DIR, BLUEGREEN_CRON_DIR, BLUEGREEN_SYSTEMD_DIR
                    where setup/init/doctor find nginx.conf, server blocks and schedulers
                    (see docs/env-reference.md)
"""


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", metavar="DIR", help="deploy root (default: $BLUEGREEN_ROOT or /opt/deploy)")
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks on errors")


class Context:
    """What every command adapter gets besides its parsed arguments (a plain class: no dataclasses at start-up)."""

    __slots__ = ("settings", "environ", "stdout", "stderr")

    def __init__(self, *, settings: Settings, environ: dict, stdout: TextIO, stderr: TextIO) -> None:
        self.settings = settings
        self.environ = environ
        self.stdout = stdout
        self.stderr = stderr


def _fleet_options(p: argparse.ArgumentParser, required: bool = False) -> None:
    """--hosts and the ssh options: on rollout, and on the day-2 commands to ask or act on every host."""
    g = p.add_argument_group("fleet (run on these hosts over ssh)" if not required else "fleet")
    # None when not given: an empty --hosts (an unset CI secret) is an error, never the local command.
    g.add_argument("--hosts", metavar="HOST[,HOST...]", default=None, help="the hosts, in order (USER@HOST, HOST:PORT accepted)")
    g.add_argument("--hosts-file", metavar="FILE", default=None, help="the hosts, one a line (# comments)")
    g.add_argument("--ssh-user", metavar="USER", default="", help="ssh login user (default: your ssh config's)")
    g.add_argument("-i", "--identity", metavar="FILE", default="", help="ssh private key")
    g.add_argument("--ssh-option", metavar="KEY=VALUE", action="append", default=[], help="passed to ssh as -o (repeatable)")
    g.add_argument("--ssh-config", metavar="FILE", default="", help="ssh config file (ssh -F; default: ~/.ssh/config)")
    g.add_argument("--remote-pyz", metavar="PATH", default="",
                   help="where the tool lives on the hosts (default: ROOT/bluegreen.pyz there, ROOT being their BLUEGREEN_ROOT or /opt/deploy)")
    g.add_argument("--remote-root", metavar="DIR", default="", help="BLUEGREEN_ROOT on the hosts (default: theirs)")


def _switch_options(p: argparse.ArgumentParser) -> None:
    """How a fleet is switched host by host: rollout, and rollback with --hosts."""
    p.add_argument("--batch", metavar="N|N%", default="1", help="hosts switched at a time (default 1)")
    p.add_argument("--pause", metavar="SECONDS", type=float, default=0.0, help="wait between batches")
    p.add_argument("--before-host", metavar="CMD", default="", help="run here before each host (take it out of the load balancer)")
    p.add_argument("--after-host", metavar="CMD", default="", help="run here after each host (put it back)")
    p.add_argument("--revert-on-failure", action="store_true", help="roll the hosts switched in this run back if one fails")
    p.add_argument("--skip-preflight", action="store_true", help="do not check every host first (not recommended)")


_FLEET_ONLY = ("ssh_user", "identity", "ssh_option", "ssh_config", "remote_pyz", "remote_root", "before_host", "after_host",
               "revert_on_failure", "skip_preflight", "pause", "json")


def _fleet_mode(args: argparse.Namespace) -> bool:
    """Whether the command runs on the hosts of --hosts/--hosts-file; a fleet option without them is an error
    (never silently ignored)."""
    if getattr(args, "hosts", None) is not None or getattr(args, "hosts_file", None) is not None:
        if args.command == "rollback" and args.wait:
            raise UsageError("--wait: not with --hosts (a fleet rollback refuses a host where a deploy of the project "
                             "runs, before any host changes; run it again when that deploy is done). Nothing was changed.")
        return True
    given = [name for name in _FLEET_ONLY if hasattr(args, "hosts") and getattr(args, name, None)
             and not (name == "json" and args.command != "rollback")]
    if getattr(args, "batch", "1") != "1":
        given.append("batch")
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise UsageError(f"{flags}: only with --hosts or --hosts-file (the command then runs on those hosts over "
                         f"ssh). Nothing was changed.")
    return False


def _ssh(args: argparse.Namespace):
    from bluegreen import fleet, rollout

    opts = fleet.SshOptions(user=args.ssh_user, identity=args.identity, config=args.ssh_config,
                            options=tuple(fleet.check_option(o) for o in args.ssh_option))
    return opts, rollout.Remote(pyz=args.remote_pyz, root=args.remote_root)


def build_parser(only: Collection[str] | None = None) -> tuple[argparse.ArgumentParser, list[str]]:
    """The parser and the names of its commands (for the `bluegreen PROJECT TAG` shorthand). With `only`, just
    the commands named in it get their options: argparse enters no other, and adding them all costs start-up."""
    import argparse

    def want(name: str) -> bool:
        return only is None or name in only

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
    if want("deploy"):
        _common(p)
        p.add_argument("project", metavar="PROJECT")
        p.add_argument("tag", metavar="TAG", nargs="?", default="latest", help="image tag or sha256:digest (default: latest)")
        p.add_argument("--wait", metavar="SECONDS", type=float, default=0.0, help="queue behind a running deploy this long instead of exiting 3")
        p.add_argument("--dry-run", action="store_true", help="print the plan with its exact commands; change nothing")
        p.set_defaults(func=cmd_deploy)

    # -- day-2 commands (status, history, rollback, prune, lock, unlock, logs) --
    p = sub.add_parser("status", help="what serves, container states and health, lock, drift (with fixes)")
    if want("status"):
        _common(p)
        p.add_argument("project", metavar="PROJECT", nargs="?", help="one project in detail (default: every project, one line each)")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        _fleet_options(p)
        p.set_defaults(func=cmd_status)

    p = sub.add_parser("history", help="the deploy journal, newest first")
    if want("history"):
        _common(p)
        p.add_argument("project", metavar="PROJECT")
        p.add_argument("-n", metavar="N", type=int, default=20, help="how many entries (default 20; 0 for all)")
        p.add_argument("--json", action="store_true", help="machine-readable output (JSON lines as stored)")
        _fleet_options(p)
        p.set_defaults(func=cmd_history)

    p = sub.add_parser("rollout", help="deploy PROJECT TAG to several hosts over ssh: preflight and pull everywhere, then host by host")
    if want("rollout"):
        _common(p)
        p.add_argument("project", metavar="PROJECT")
        p.add_argument("tag", metavar="TAG")
        _fleet_options(p, required=True)
        _switch_options(p)
        p.add_argument("--dry-run", action="store_true", help="preflight, then print each host's plan; change nothing")
        p.add_argument("--json", action="store_true", help="print the final table as JSON")
        p.set_defaults(func=cmd_rollout)

    p = sub.add_parser("pull", help="fetch the image of PROJECT TAG as a deploy would (PULL policy), changing nothing that serves")
    if want("pull"):
        _common(p)
        p.add_argument("project", metavar="PROJECT")
        p.add_argument("tag", metavar="TAG")
        p.add_argument("--rollback", action="store_true",
                       help="the image `rollback --to TAG` would deploy: the digest the journal recorded for TAG")
        p.set_defaults(func=cmd_pull)

    p = sub.add_parser("rollback", help="deploy the previous successful tag (or --to TAG) through the full checks")
    if want("rollback"):
        _common(p)
        p.add_argument("project", metavar="PROJECT")
        p.add_argument("--to", metavar="TAG", help="the tag to go back to (default: the previous successful deploy's)")
        p.add_argument("--wait", metavar="SECONDS", type=float, default=0.0, help="queue behind a running deploy this long")
        p.add_argument("--dry-run", action="store_true", help="print the plan; change nothing")
        _fleet_options(p)
        _switch_options(p)
        p.add_argument("--json", action="store_true", help="with --hosts: print the final table as JSON")
        p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("prune", help="remove stopped containers and old images, keeping rollback targets")
    if want("prune"):
        _common(p)
        p.add_argument("project", metavar="PROJECT")
        p.add_argument("--keep", metavar="N", type=int, default=3, help="successful tags to keep besides the serving one (default 3)")
        p.add_argument("--dry-run", action="store_true", help="list what would be removed; remove nothing")
        _fleet_options(p)
        p.set_defaults(func=cmd_prune)

    p = sub.add_parser("lock", help="freeze deploys of a project (incident, migration) until unlock")
    if want("lock"):
        _common(p)
        p.add_argument("project", metavar="PROJECT")
        p.add_argument("-m", "--message", required=True, help="why; shown to everyone whose deploy is refused")
        p.add_argument("--dry-run", action="store_true", help="say what would be written; change nothing")
        _fleet_options(p)
        p.set_defaults(func=cmd_lock)

    p = sub.add_parser("unlock", help="lift a freeze set with lock")
    if want("unlock"):
        _common(p)
        p.add_argument("project", metavar="PROJECT")
        p.add_argument("--dry-run", action="store_true", help="say what would be removed; change nothing")
        _fleet_options(p)
        p.set_defaults(func=cmd_unlock)

    for name, text in (("promote", "end a running watch now: the new version stays, the old container is retired"),
                       ("abort", "end a running watch now: switch back to the old container, remove the new one")):
        p = sub.add_parser(name, help=text)
        if want(name):
            _common(p)
            p.add_argument("project", metavar="PROJECT")
            p.set_defaults(func=cmd_watch_request)

    p = sub.add_parser("logs", help="the serving (or named) container's logs")
    if want("logs"):
        _common(p)
        p.add_argument("project", metavar="PROJECT")
        p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
        p.add_argument("--tail", metavar="N", type=int, default=100, help="lines from the end (default 100)")
        p.add_argument("--color", choices=COLOURS, help="this colour's container instead of the serving one")
        p.set_defaults(func=cmd_logs)

    # -- host set-up commands (init, setup, doctor, backup-logs) --
    p = sub.add_parser("init", help="write a project's env file, upstream and nginx server block (or, with --ci github, its CI files)")
    if want("init"):
        _common(p)
        p.add_argument("project", metavar="PROJECT")
        p.add_argument("--image", metavar="IMAGE", help="image repository without tag, e.g. ghcr.io/acme/user-api (required without --ci)")
        p.add_argument("--server-name", metavar="NAME", default="_", help="nginx server_name (default _: the catch-all)")
        p.add_argument("--ports", metavar="BLUE,GREEN", default="8081,8082", help="host ports of the two colours (default 8081,8082)")
        p.add_argument("--listen", metavar="[ADDR:]PORT", default="80", help="nginx listen of the server block (default 80)")
        p.add_argument("--ci", choices=("github",), help="write the GitHub Actions workflows, the Dockerfile and a copy of this pyz instead")
        p.add_argument("--repo", metavar="DIR", default=".", help="with --ci: the repository to write into (default: here)")
        p.add_argument("--force", action="store_true", help="replace existing files (the previous content is kept as FILE.bak)")
        p.set_defaults(func=cmd_init)

    p = sub.add_parser("adopt", help="take over a project the guide's deploy.sh runs, in place, without moving traffic")
    if want("adopt"):
        _common(p)
        p.add_argument("project", metavar="PROJECT")
        p.add_argument("--force", action="store_true",
                       help="also add bluegreen's route line and keep-alive lines to the server block (nothing else in it changes)")
        p.add_argument("--dry-run", action="store_true", help="show what would change; change nothing")
        p.set_defaults(func=cmd_adopt)

    p = sub.add_parser("setup", help="idempotent host set-up: directories, the nginx include, the daily log backup")
    if want("setup"):
        _common(p)
        p.add_argument("--owner", metavar="USER", help="owner of the directories and user of the backup job (default: the sudo user, else you)")
        p.add_argument("--logs", metavar="DIR", default="/app/logs", help="application log directory (default /app/logs)")
        p.add_argument("--backup", metavar="DIR", default="/app/backup", help="log backup directory (default /app/backup)")
        p.add_argument("--schedule", choices=("auto", "cron", "systemd", "none"), default="auto",
                       help="how to run the daily backup (default auto: cron if the host has it, else a systemd timer)")
        p.add_argument("--older-than", metavar="DAYS", type=float, default=1.0, help="backup job: compress rolled logs older than this (default 1)")
        p.add_argument("--keep-days", metavar="DAYS", type=float, default=90.0, help="backup job: delete backups older than this (default 90)")
        p.add_argument("--pyz", metavar="PATH", help="bluegreen.pyz the backup job runs (default: this one, else ROOT/bluegreen.pyz)")
        p.add_argument("--dry-run", action="store_true", help="show what would change; change nothing")
        p.set_defaults(func=cmd_setup)

    p = sub.add_parser("doctor", help="check everything a deploy needs, with a fix for each problem")
    if want("doctor"):
        _common(p)
        p.add_argument("project", metavar="PROJECT", nargs="?", help="check this project (default: every project)")
        p.add_argument("--min-free-mb", metavar="MB", type=int, default=1024, help="free disk below this fails (default 1024)")
        p.add_argument("--json", action="store_true", help="every check as JSON, with whether the project is frozen or locked")
        p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("backup-logs", help="compress rolled logs into the backup directory and delete old backups")
    if want("backup-logs"):
        _common(p)
        p.add_argument("--logs", metavar="DIR", default="/app/logs", help="where the rolled logs are (default /app/logs)")
        p.add_argument("--backup", metavar="DIR", default="/app/backup", help="where compressed copies go (default /app/backup)")
        p.add_argument("--older-than", metavar="DAYS", type=float, default=1.0, help="compress logs last written more than DAYS ago (default 1)")
        p.add_argument("--keep-days", metavar="DAYS", type=float, default=90.0, help="delete backups older than DAYS (default 90)")
        p.add_argument("--pattern", metavar="GLOB", default="app-*.log", help="names of rolled logs (default app-*.log; never app.log)")
        p.set_defaults(func=cmd_backup_logs)

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
    from bluegreen import attempt

    return attempt.deploy_project(
        settings=ctx.settings,
        project=args.project,
        tag=args.tag,
        wait=args.wait,
        dry_run=args.dry_run,
        stdout=ctx.stdout,
        stderr=ctx.stderr,
        environ=ctx.environ,
    )


def cmd_init(args: argparse.Namespace, ctx: Context) -> int:
    from bluegreen import init  # the set-up commands' modules stay off every deploy's start-up path
    from bluegreen.runner import SubprocessRunner

    if args.ci:
        return init.init_ci(project=args.project, repo=args.repo, force=args.force, stdout=ctx.stdout)
    if not args.image:
        raise UsageError("init needs --image IMAGE (the repository without a tag, e.g. ghcr.io/acme/user-api), or --ci github.")
    return init.init_project(
        settings=ctx.settings,
        runner=SubprocessRunner(),
        project=args.project,
        image=args.image,
        ports=args.ports,
        listen=args.listen,
        server_name=args.server_name,
        force=args.force,
        stdout=ctx.stdout,
    )


def cmd_rollout(args: argparse.Namespace, ctx: Context, action: str = "deploy", tag: str | None = None) -> int:
    from bluegreen import rollout

    opts, remote = _ssh(args)
    return rollout.run_rollout(
        settings=ctx.settings, project=args.project, tag=args.tag if tag is None else tag, hosts=args.hosts,
        hosts_file=args.hosts_file, ssh=opts, remote=remote, batch=args.batch,
        pause=args.pause, before_host=args.before_host, after_host=args.after_host, revert=args.revert_on_failure,
        skip_preflight=args.skip_preflight, dry_run=args.dry_run, json_out=args.json, stdout=ctx.stdout,
        stderr=ctx.stderr, environ=ctx.environ, action=action)


def _fleet_command(args: argparse.Namespace, ctx: Context, words: Sequence[str]) -> int:
    """lock, unlock or prune on every host of --hosts."""
    from bluegreen import fleetcmd

    opts, remote = _ssh(args)
    return fleetcmd.run_fleet_each(settings=ctx.settings, project=args.project, words=words, hosts=args.hosts,
                                   hosts_file=args.hosts_file, ssh=opts, remote=remote, stdout=ctx.stdout,
                                   stderr=ctx.stderr, environ=ctx.environ)


def cmd_pull(args: argparse.Namespace, ctx: Context) -> int:
    from bluegreen import attempt

    return attempt.pull_project(settings=ctx.settings, project=args.project, tag=args.tag, stdout=ctx.stdout,
                                stderr=ctx.stderr, environ=ctx.environ, rollback=args.rollback)


def cmd_adopt(args: argparse.Namespace, ctx: Context) -> int:
    from bluegreen import adopt
    from bluegreen.runner import SubprocessRunner

    return adopt.adopt_project(settings=ctx.settings, runner=SubprocessRunner(), project=args.project, force=args.force,
                               dry_run=args.dry_run, environ=ctx.environ, stdout=ctx.stdout, stderr=ctx.stderr)


def cmd_setup(args: argparse.Namespace, ctx: Context) -> int:
    from bluegreen import setup
    from bluegreen.runner import RecordingRunner, SubprocessRunner

    # A dry run reads the host for real but records, instead of running, anything that changes it.
    runner = RecordingRunner(passthrough=SubprocessRunner()) if args.dry_run else SubprocessRunner()
    return setup.setup_host(
        settings=ctx.settings,
        runner=runner,
        owner=args.owner,
        logs=args.logs,
        backup=args.backup,
        schedule=args.schedule,
        older_than=args.older_than,
        keep_days=args.keep_days,
        pyz=args.pyz,
        dry_run=args.dry_run,
        environ=ctx.environ,
        stdout=ctx.stdout,
        stderr=ctx.stderr,
    )


def cmd_doctor(args: argparse.Namespace, ctx: Context) -> int:
    from bluegreen import doctor
    from bluegreen.runner import RecordingRunner, SubprocessRunner

    return doctor.run_doctor(
        settings=ctx.settings,
        runner=RecordingRunner(passthrough=SubprocessRunner()),  # checks only read: anything else is recorded, not run
        project=args.project,
        min_free_mb=args.min_free_mb,
        environ=ctx.environ,
        stdout=ctx.stdout,
        json_out=args.json,
    )


def cmd_backup_logs(args: argparse.Namespace, ctx: Context) -> int:
    from bluegreen import backup

    return backup.backup_logs(
        logs=args.logs,
        backup=args.backup,
        older_than=args.older_than,
        keep_days=args.keep_days,
        pattern=args.pattern,
        stdout=ctx.stdout,
    )


def cmd_status(args: argparse.Namespace, ctx: Context) -> int:
    from bluegreen import status  # imported here: off the deploy's start-up path

    if _fleet_mode(args):
        from bluegreen import fleetcmd

        if not args.project:
            raise UsageError("status --hosts needs the PROJECT to ask every host about.")
        opts, remote = _ssh(args)
        return fleetcmd.run_fleet_status(settings=ctx.settings, project=args.project, hosts=args.hosts,
                                         hosts_file=args.hosts_file, ssh=opts, remote=remote, json_out=args.json,
                                         stdout=ctx.stdout, stderr=ctx.stderr, environ=ctx.environ)
    from bluegreen.config import validate_project
    from bluegreen.runner import SubprocessRunner

    if args.project:
        validate_project(args.project)
    projects = [args.project] if args.project else ctx.settings.projects()
    found = status.collect(ctx.settings, projects, SubprocessRunner())
    if args.project and found[0].error:  # the one project asked about: its config error, exit 2
        raise ConfigError(found[0].error)
    if args.json:
        print(status.to_json(found), file=ctx.stdout)
    elif args.project:
        print(status.render(found[0], ctx.settings), file=ctx.stdout)
    elif not found:
        print(f"no projects under {ctx.settings.root / 'projects'}", file=ctx.stdout)
    else:
        for item in found:
            print(status.render_line(item), file=ctx.stdout)
    # For cron and monitoring (`bluegreen status user-api || alert`): 0 only when every project is served
    # by a running, healthy container through a running nginx (docs/exit-codes.md).
    return EXIT_OK if all(item.verdict == status.OK for item in found) else EXIT_FAILED


def cmd_history(args: argparse.Namespace, ctx: Context) -> int:
    if _fleet_mode(args):
        from bluegreen import fleetcmd

        opts, remote = _ssh(args)
        return fleetcmd.run_fleet_history(settings=ctx.settings, project=args.project, hosts=args.hosts,
                                          hosts_file=args.hosts_file, ssh=opts, remote=remote, n=args.n,
                                          json_out=args.json, stdout=ctx.stdout, stderr=ctx.stderr, environ=ctx.environ)
    from bluegreen import journal
    from bluegreen.config import validate_project

    validate_project(args.project)
    entries = journal.read(ctx.settings.journal_file(args.project))
    if args.n > 0:
        entries = entries[-args.n:]
    if args.json:
        for entry in reversed(entries):
            print(entry.to_json(), file=ctx.stdout)
    elif entries:
        print(journal.render(entries), file=ctx.stdout)
    else:
        print(f"no deploys recorded for {args.project} in {ctx.settings.journal_file(args.project)}", file=ctx.stdout)
    return EXIT_OK


def cmd_rollback(args: argparse.Namespace, ctx: Context) -> int:
    if _fleet_mode(args):
        # One tag for the whole fleet, host by host with the rollout's preflight, hooks and table.
        return cmd_rollout(args, ctx, action="rollback", tag=args.to or "")
    from bluegreen import attempt

    return attempt.rollback_project(
        settings=ctx.settings,
        project=args.project,
        to=args.to,
        wait=args.wait,
        dry_run=args.dry_run,
        stdout=ctx.stdout,
        stderr=ctx.stderr,
        environ=ctx.environ,
    )


def cmd_prune(args: argparse.Namespace, ctx: Context) -> int:
    if _fleet_mode(args):
        return _fleet_command(args, ctx, ["prune", args.project, "--keep", str(args.keep)] + (["--dry-run"] if args.dry_run else []))
    from bluegreen import prune

    return prune.prune(settings=ctx.settings, project=args.project, keep=args.keep, dry_run=args.dry_run,
                       stdout=ctx.stdout, environ=ctx.environ)


def cmd_lock(args: argparse.Namespace, ctx: Context) -> int:
    if _fleet_mode(args):  # a fleet freeze: every host's own freeze file
        if not args.message.strip():
            raise UsageError("lock needs a message (-m) saying why deploys are frozen.")
        return _fleet_command(args, ctx, ["lock", args.project, "-m", args.message.strip()] + (["--dry-run"] if args.dry_run else []))
    from bluegreen import attempt
    from bluegreen.config import load_project, validate_project
    from bluegreen.host import invocation
    from bluegreen.lock import Freeze, freeze_json, read_freeze
    from bluegreen.state import atomic_write

    validate_project(args.project)
    load_project(ctx.settings, args.project)
    path = ctx.settings.freeze_file(args.project)
    existing = read_freeze(path)
    if existing is not None:
        raise UsageError(f"{args.project} is already {existing.describe()}. Nothing was changed; `{invocation()} unlock {args.project}` lifts it.")
    if not args.message.strip():
        raise UsageError("lock needs a message (-m) saying why deploys are frozen.")
    freeze = Freeze(message=args.message.strip(), user=attempt.user_name(ctx.environ), since=attempt.now_iso())
    if args.dry_run:
        print(f"would write {path}: {freeze_json(freeze).strip()}", file=ctx.stdout)
        return EXIT_OK
    atomic_write(path, freeze_json(freeze), root=ctx.settings.root)
    print(f"{args.project} is now {freeze.describe()}. Deploys and rollbacks are refused until `{invocation()} unlock {args.project}`.", file=ctx.stdout)
    return EXIT_OK


def cmd_unlock(args: argparse.Namespace, ctx: Context) -> int:
    if _fleet_mode(args):
        return _fleet_command(args, ctx, ["unlock", args.project] + (["--dry-run"] if args.dry_run else []))
    from bluegreen import safefs
    from bluegreen.config import validate_project
    from bluegreen.lock import read_freeze

    validate_project(args.project)
    path = ctx.settings.freeze_file(args.project)
    existing = read_freeze(path)
    if existing is None:
        print(f"{args.project} is not frozen; nothing to do.", file=ctx.stdout)
        return EXIT_OK
    if args.dry_run:
        print(f"would remove {path} ({existing.describe()})", file=ctx.stdout)
        return EXIT_OK
    safefs.unlink(path, root=ctx.settings.root)
    print(f"{args.project} unfrozen (was {existing.describe()}).", file=ctx.stdout)
    return EXIT_OK


def cmd_watch_request(args: argparse.Namespace, ctx: Context) -> int:
    """`promote` / `abort`: a word for the deploy watching PROJECT, which reads it within a quarter second."""
    import json

    from bluegreen import safefs, watch
    from bluegreen.config import validate_project

    validate_project(args.project)
    control = ctx.settings.watch_file(args.project)
    try:
        found = json.loads(safefs.read_text(control, root=ctx.settings.root, max_bytes=4096) or "null")
        pid = found.get("pid") if isinstance(found, dict) else None
    except ValueError:
        pid = None
    if isinstance(pid, int) and pid > 0 and not _alive(pid):
        safefs.unlink(control, root=ctx.settings.root)  # left by a deploy that was killed: nobody reads a request
        pid = None
    if not isinstance(pid, int):
        raise UsageError(f"No watch is running for {args.project}, so there is nothing to {args.command}: a deploy "
                         f"watches only with WATCH_SECONDS set, between its switch and its retire step. Nothing was changed.")
    safefs.atomic_write(watch.request_path(control), args.command + "\n", root=ctx.settings.root)
    what = "keep the new version and retire the old container" if args.command == watch.PROMOTE else \
        "switch back to the old container and remove the new one"
    print(f"Asked the deploy watching {args.project} to {what}; its output says when it has.", file=ctx.stdout)
    return EXIT_OK


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cmd_logs(args: argparse.Namespace, ctx: Context) -> int:
    from bluegreen import docker as dk
    from bluegreen.config import load_project, validate_project
    from bluegreen.deploy import read_current
    from bluegreen.runner import SubprocessRunner

    validate_project(args.project)
    cfg = load_project(ctx.settings, args.project)
    colour = args.color
    if colour is None:
        colour, _, _ = read_current(ctx.settings, cfg)
        if colour is None:
            raise UsageError(f"Nothing serves {args.project} yet, so there is no serving container; name one with --color blue|green.")
    argv = [*ctx.settings.docker_cmd, "logs", "--tail", str(args.tail)]
    if args.follow:
        argv.append("--follow")
    try:
        code = SubprocessRunner().stream([*argv, dk.container_name(args.project, colour)])
    except Interrupted:  # Ctrl-C is how `logs -f` ends
        return EXIT_OK
    return EXIT_OK if code == 0 else EXIT_FAILED


def _signals_as_interrupts() -> dict:
    """SIGTERM/SIGHUP (CI cancelled, SSH dropped) and Ctrl-C raise Interrupted once, so undos run; returns the
    previous handlers for _restore_signals. Later signals are ignored: the deploy is then busy putting things back."""
    import signal

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
    return previous


def _restore_signals(previous: dict) -> None:
    import signal

    for sig, old in previous.items():
        signal.signal(sig, old)


def _print_traceback(stream: TextIO) -> None:
    import traceback

    traceback.print_exc(file=stream)


def main(argv: Sequence[str] | None = None, *, environ: dict | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Run the CLI; returns the exit code (the only place errors become output)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    environ = dict(os.environ if environ is None else environ)
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    if argv == ["--version"] and sys.stdout is not None:
        # What argparse's version action prints (the top parser's raw formatter never wraps it), without
        # loading argparse: scripts and fleet preflights ask this on every host. A stdout that fails to
        # write is left to argparse below, whose handling of it differs between Pythons.
        try:
            sys.stdout.write(f"bluegreen {__version__}\n")
            return EXIT_OK
        except (AttributeError, OSError):
            pass
    # Only the command argv names gets its options (deploy too: `bluegreen PROJECT TAG` is short for it).
    parser, commands = build_parser(only={*argv, "deploy"})
    try:
        args = parser.parse_args(_with_default_command(argv, commands))
    except SystemExit as exc:  # argparse prints usage itself; --help and --version exit 0
        return int(exc.code or 0) if isinstance(exc.code, int) or exc.code is None else EXIT_USAGE
    if not getattr(args, "func", None):
        parser.print_help(stderr)
        return EXIT_USAGE
    verbose = getattr(args, "verbose", False)
    try:
        # Not a `with` block: contextlib stays off the start-up path; the handlers are back before any message.
        previous = _signals_as_interrupts()
        try:
            from bluegreen.config import load_settings

            settings = load_settings(getattr(args, "root", None), environ)
            return args.func(args, Context(settings=settings, environ=environ, stdout=stdout, stderr=stderr))
        finally:
            _restore_signals(previous)
    except BluegreenError as exc:
        if verbose:
            _print_traceback(stderr)
        say(stderr, f"bluegreen: {exc.message}" + (f"\n{exc.details}" if exc.details else ""))
        return exc.exit_code
    except Interrupted as exc:
        if verbose:
            _print_traceback(stderr)
        # Deploys turn an interrupt into their own message; this is any other command, stopped.
        say(stderr, f"bluegreen: interrupted by {exc.signame}; the lines above say what was done before it.")
        return EXIT_FAILED
    except OSError as exc:
        if verbose:
            _print_traceback(stderr)
        # Deploys turn OSErrors into their own messages (what serves, what was undone); this is any other
        # command, stopped by the file system: say which file and why, and claim nothing else.
        say(stderr, f"bluegreen: {os_problem(exc)} The lines above say what was done before it. Fix the "
                    f"cause (free disk space, the file's permissions or owner), then run the command again.")
        return EXIT_FAILED
    except Exception as exc:  # a bug: say so plainly, keep the traceback for --verbose
        if verbose:
            _print_traceback(stderr)
        try:  # the one import on an error path: a bug's message must come out even if it fails
            from bluegreen.host import invocation

            command = invocation()
        except Exception:
            command = "bluegreen"
        say(stderr, f"bluegreen: internal error ({type(exc).__name__}: {exc}). Steps in progress were undone where "
                    f"possible; check `{command} status` and `nginx -t`, and rerun with --verbose to report it.")
        return EXIT_ATTENTION


if __name__ == "__main__":
    sys.exit(main())
