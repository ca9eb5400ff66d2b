"""`bluegreen setup`: the seed's host set-up as one idempotent command: directories and their owner, the
nginx.conf include of the managed upstream directory (tested, put back if nginx refuses it), the
daily log backup (one cron.d file, or a systemd timer) and the `bluegreen` launcher on the PATH. Facts are read first, the plan is decided from
them alone, then carried out; a second run finds nothing to do."""

from __future__ import annotations

import getpass
import os
import pwd
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TextIO

from bluegreen import nginx as ngx
from bluegreen import safefs, state, template
from bluegreen.config import Settings
from bluegreen.errors import BluegreenError, CommandError, ExecutableNotFound, UsageError
from bluegreen.host import (INVOKED_AS, STABLE_PYTHONS, add_include, include_line, includes_dir, invocation, nginx_conf_path, pyz_path,
                            read_config_file, self_command, stable_python, upstream_dir)
from bluegreen.runner import Runner, display, indent

CRON_FILE = "bluegreen"
TIMER_UNIT = "bluegreen-backup-logs.timer"
SERVICE_UNIT = "bluegreen-backup-logs.service"
SCHEDULES = ("auto", "cron", "systemd", "none")
SYSTEMD_RUNNING = Path("/run/systemd/system")  # what sd_booted() checks
# /etc/cron.d exists without any cron (Debian's e2fsprogs ships a file there): the daemon must be installed.
CRON_DAEMONS = ("/usr/sbin/cron", "/usr/sbin/crond", "/sbin/cron", "/sbin/crond", "/usr/bin/crond")
DEFAULT_CRON_DIR = Path("/etc/cron.d")
# Test-only: colon-separated paths that stand in for CRON_DAEMONS (the test machine has no cron).
TEST_CRON_DAEMONS = "BLUEGREEN_TEST_CRON_DAEMONS"
# Where the launcher goes: a directory on root's and sudo's PATH.
LAUNCHER_DIR = "BLUEGREEN_LAUNCHER_DIR"
DEFAULT_LAUNCHER_DIR = "/usr/local/bin"
LAUNCHER_NAME = "bluegreen"
LAUNCHER_MARK = "# Managed by `bluegreen setup`"
_ON_PATH = ("/usr/local/bin", "/usr/bin", "/bin", "/usr/local/sbin", "/usr/sbin", "/sbin")
INSTALL_CRON = ("`sudo apt-get install -y cron` on Debian/Ubuntu, `sudo dnf install -y cronie && sudo systemctl "
                "enable --now crond` on Amazon Linux/RHEL")
INSTALL_PYTHON = "`sudo apt-get install -y python3` on Debian/Ubuntu, `sudo dnf install -y python3` on Amazon Linux/RHEL"


@dataclass(frozen=True)
class Owner:
    name: str
    uid: int
    gid: int


@dataclass(frozen=True)
class DirFact:
    path: Path
    exists: bool
    uid: int = -1
    gid: int = -1


@dataclass(frozen=True)
class Facts:
    """What setup reads from the host before deciding anything."""

    owner: Owner
    dirs: tuple[DirFact, ...]
    files: tuple[DirFact, ...]  # the files directly in ROOT/projects and the upstream dir (init may have run as root)
    nginx_conf: Path
    nginx_conf_text: str | None  # None: missing or unreadable
    include_in_dump: bool  # `nginx -T` shows the include (maybe in another file than nginx.conf)
    schedule: str  # "cron", "systemd" or "none", already resolved from "auto"
    schedule_files: tuple[tuple[Path, str | None], ...]  # current content of the files the schedule needs
    timer_enabled: bool
    seed_crontab_lines: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()  # what setup found and leaves alone (hard-linked files, odd names)
    launcher: Path | None = None  # where the launcher goes (None: not installed, the pyz is missing)
    launcher_text: str | None = None  # what is there now (None: nothing)
    launcher_mode: int = 0


@dataclass(frozen=True)
class Step:
    """One change setup will make; `kind` selects how it is carried out."""

    kind: str  # mkdir | chown | include | write | systemctl
    text: str  # what the user reads
    path: Path | None = None
    data: str = ""
    argv: tuple[str, ...] = ()
    mode: int = 0o644  # of a written file


@dataclass
class Wanted:
    """What the host should look like, from the options."""

    include: str
    upstream_dir: str
    schedule_files: dict = field(default_factory=dict)  # Path -> text
    launcher: str = ""  # the launcher script ("" = none)


# -- pure: deciding -------------------------------------------------------------------------------------

def choose_schedule(requested: str, *, cron_dir_exists: bool, systemd_running: bool, cron_daemon: bool = True) -> str:
    """cron when the host has it (a cron.d directory and a cron daemon to read it), else a systemd timer,
    else a clear error."""
    if requested == "none":
        return "none"
    if requested == "cron" or (requested == "auto" and cron_dir_exists and cron_daemon):
        if not cron_dir_exists:
            raise UsageError(
                f"--schedule cron: this host has no cron directory (/etc/cron.d): install cron first ({INSTALL_CRON}), "
                f"or use --schedule systemd. Nothing was changed."
            )
        if not cron_daemon:
            raise UsageError(
                f"--schedule cron: the cron directory exists but no cron daemon is installed ({', '.join(CRON_DAEMONS)} "
                f"are all missing), so nothing would ever run the daily log backup written there. Install cron "
                f"({INSTALL_CRON}), or use --schedule systemd. Nothing was changed."
            )
        return "cron"
    if systemd_running:
        return "systemd"
    what = "cron (/etc/cron.d)" if not cron_dir_exists else "a cron daemon (only its /etc/cron.d directory)"
    raise UsageError(
        f"This host has neither {what} nor a running systemd, so the daily log backup cannot be scheduled: install "
        f"cron ({INSTALL_CRON}) or rerun with --schedule none and run `backup-logs` some other way. Nothing was changed."
    )


def launcher_text(python: str, pyz: str, invoked_as: str) -> str:
    """The `bluegreen` launcher: a stable python3 running the pyz, telling it how the user calls it."""
    return (f"#!/bin/sh\n{LAUNCHER_MARK}: runs {pyz} with {python}; rewritten when set-up runs "
            f"again.\n{INVOKED_AS}={_sh_word(invoked_as)}\nexport {INVOKED_AS}\n"
            f"exec {_sh_word(python)} {_sh_word(pyz)} \"$@\"\n")


def launcher_invoked_as(path: Path) -> str:
    """`bluegreen` when the launcher's directory is on every PATH root and sudo use, else its full path."""
    return LAUNCHER_NAME if str(path.parent) in _ON_PATH and path.name == LAUNCHER_NAME else str(path)


# -- pure: the schedule files, written as root, so every value is validated and escaped for its format --------

# Characters that need no quoting in /bin/sh or in a systemd command line (shlex's set without `%`).
_PLAIN_WORD = re.compile(r"[A-Za-z0-9_@+=:,./-]+\Z")
# What useradd accepts: the cron user field and systemd's User= must be one plain word.
_USER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\$?\Z")
# Debian's cron (vixie 3.0) cuts a command at 1000 bytes, which could cut a path short: stay well below.
MAX_CRON_COMMAND = 900
MAX_PATH = 1024


def check_value(option: str, value: str, *, absolute: bool = True) -> str:
    """`value` if it is safe to write into a root-run schedule (printable, absolute, bounded); else UsageError."""
    shown = ascii(value)[:200]
    if not value or not value.isprintable():
        raise UsageError(
            f"{option}: {shown} contains a line break, a control character or bytes that are not valid text. It "
            f"would be written into the daily backup schedule (a file cron or systemd reads as root), so setup refuses it: give a plain "
            f"path. Nothing was changed."
        )
    if absolute and not os.path.isabs(value):
        raise UsageError(f"{option}: give an absolute path, got {shown}. Nothing was changed.")
    if len(value.encode("utf-8")) > MAX_PATH:
        raise UsageError(f"{option}: a path of at most {MAX_PATH} bytes, got {len(value.encode('utf-8'))}. Nothing was changed.")
    return value


def check_user(name: str) -> str:
    """A user name that is one plain word in a cron line and in systemd's User=."""
    if not _USER_NAME.match(name):
        raise UsageError(f"--owner: {ascii(name)[:100]} cannot be written as the user of a cron job or a systemd "
                         f"unit; use a plain user name (letters, digits, `_ . -`). Nothing was changed.")
    return name


def _sh_word(text: str) -> str:
    return text if _PLAIN_WORD.match(text) else "'" + text.replace("'", "'\"'\"'") + "'"


def cron_word(arg: str) -> str:
    """`arg` as one /bin/sh word in a cron command: shell-quoted, each `%` as `\\%` outside any quotes.

    cron turns a bare `%` into a newline (the rest becomes stdin) and `\\%` into `%`; splitting at `%` and
    quoting the pieces keeps a `\\` of the value from ever standing right before a `%`."""
    if arg == "":
        return "''"
    return "\\%".join(_sh_word(piece) if piece else "" for piece in arg.split("%"))


def cron_command(argv: list[str]) -> str:
    return " ".join(cron_word(a) for a in argv)


def systemd_word(arg: str) -> str:
    """`arg` as one word of a systemd Exec line: `%` is a specifier (`%%`), `$` expands (`$$`), and inside
    double quotes `\\` and `"` are C-escaped."""
    if _PLAIN_WORD.match(arg):
        return arg
    escaped = arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return f'"{escaped}"'


def systemd_command(argv: list[str]) -> str:
    return " ".join(systemd_word(a) for a in argv)


def schedule_texts(settings: Settings, schedule: str, *, owner: Owner, command: list[str], logs: str, backup: str, older_than: float, keep_days: float) -> dict:
    """The file(s) the schedule needs, keyed by path; every value validated, then escaped for its format."""
    check_user(owner.name)
    for option, value in (("--logs", logs), ("--backup", backup), ("the backup command", command[0] if command else "")):
        check_value(option, value)
    for arg in command[1:]:
        check_value("the backup command", arg, absolute=False)
    common = dict(USER=owner.name, OLDER_THAN=f"{older_than:g}", KEEP_DAYS=f"{keep_days:g}")
    if schedule == "cron":
        line = cron_command(command)
        if len(line.encode("utf-8")) > MAX_CRON_COMMAND:
            raise UsageError(
                f"The backup command would be {len(line.encode('utf-8'))} bytes long; cron cuts commands at 1000 "
                f"bytes, which could cut a path short. Use shorter --logs, --backup and --pyz paths. Nothing was changed."
            )
        # Comment lines: cron ignores them whole, and the values hold no line break.
        return {settings.cron_dir / CRON_FILE: template.render("cron", COMMAND=line, LOGS=logs, BACKUP=backup, **common)}
    if schedule == "systemd":
        values = dict(COMMAND=systemd_command(command), LOGS=logs.replace("%", "%%"), BACKUP=backup.replace("%", "%%"), **common)
        return {
            settings.systemd_dir / SERVICE_UNIT: template.render("backup-logs.service", **values),
            settings.systemd_dir / TIMER_UNIT: template.render("backup-logs.timer", **values),
        }
    return {}


def plan_setup(facts: Facts, wanted: Wanted) -> tuple[list[Step], list[str]]:
    """The changes to make, and what is already in place (for the user's reading)."""
    steps: list[Step] = []
    ok: list[str] = []
    owner = facts.owner
    for d in facts.dirs:
        if not d.exists:
            steps.append(Step("mkdir", f"create {d.path} (owner {owner.name})", path=d.path))
        elif (d.uid, d.gid) != (owner.uid, owner.gid):
            steps.append(Step("chown", f"give {d.path} to {owner.name} (now uid {d.uid}, gid {d.gid})", path=d.path))
        else:
            ok.append(f"{d.path} exists, owned by {owner.name}")
    for f in facts.files:
        if (f.uid, f.gid) != (owner.uid, owner.gid):
            steps.append(Step("chown", f"give {f.path} to {owner.name} (now uid {f.uid}, gid {f.gid})", path=f.path))
    if facts.include_in_dump or (facts.nginx_conf_text is not None and includes_dir(facts.nginx_conf_text, wanted.upstream_dir)):
        ok.append(f"nginx includes {wanted.upstream_dir}")
    elif facts.nginx_conf_text is None:
        raise BluegreenError(
            f"Cannot read {facts.nginx_conf}, so the include of {wanted.upstream_dir} cannot be added. Is nginx "
            f"installed (`sudo dnf install -y nginx`)? If nginx.conf lives elsewhere, set BLUEGREEN_NGINX_CONF. "
            f"Nothing was changed.",
            exit_code=2,
        )
    else:
        steps.append(Step("include", f"add `{wanted.include}` to the http block of {facts.nginx_conf}, then `nginx -t`",
                          path=facts.nginx_conf, data=wanted.include))
    current = dict(facts.schedule_files)
    changed_units = False
    for path, text in wanted.schedule_files.items():
        if current.get(path) == text:
            ok.append(f"log backup schedule {path} is up to date")
        else:
            verb = "write" if current.get(path) is None else "update"
            steps.append(Step("write", f"{verb} {path} (daily log backup at 02:00 as {owner.name})", path=path, data=text))
            changed_units = True
    if facts.schedule == "systemd":
        if changed_units:
            steps.append(Step("systemctl", "systemctl daemon-reload", argv=("systemctl", "daemon-reload")))
        if changed_units or not facts.timer_enabled:
            steps.append(Step("systemctl", f"systemctl enable --now {TIMER_UNIT}", argv=("systemctl", "enable", "--now", TIMER_UNIT)))
        else:
            ok.append(f"{TIMER_UNIT} is enabled")
    if facts.schedule == "none":
        ok.append("log backup not scheduled (--schedule none)")
    if wanted.launcher and facts.launcher is not None:
        if facts.launcher_text == wanted.launcher and facts.launcher_mode == 0o755:
            ok.append(f"launcher {facts.launcher} is up to date")
        elif facts.launcher_text is None or facts.launcher_text.startswith(f"#!/bin/sh\n{LAUNCHER_MARK}"):
            verb = "install" if facts.launcher_text is None else "update"
            steps.append(Step("write", f"{verb} the launcher {facts.launcher} (`{wanted.launcher.splitlines()[-1]}`)",
                              path=facts.launcher, data=wanted.launcher, mode=0o755))
        # else: someone else's file of that name, left alone (read_facts warned)
    return steps, ok


# -- doing: reading facts, carrying out the plan ----------------------------------------------------------

def resolve_owner(name: str | None, environ: dict) -> Owner:
    """--owner, else the user behind sudo, else whoever runs setup."""
    if not name:
        sudo_user = environ.get("SUDO_USER", "")
        name = sudo_user if sudo_user and sudo_user != "root" else _current_user()
    try:
        entry = pwd.getpwnam(name)
    except (KeyError, ValueError, UnicodeError):
        raise UsageError(f"--owner: there is no user {name!r} on this host. Nothing was changed.") from None
    return Owner(entry.pw_name, entry.pw_uid, entry.pw_gid)


def _current_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return pwd.getpwuid(os.geteuid()).pw_name


MAX_FILES = 10000  # entries looked at in one directory: the owner can fill it with anything


shown = safefs.shown


def guarded_top(path: Path, root: Path) -> Path | None:
    """The trusted directory `path` is reached from: the deploy root when `path` is in it (every directory
    below it is opened without following links), else None (its parent is the admin's choice; the last
    component is still never followed)."""
    full, top = os.path.abspath(str(path)), os.path.abspath(str(root))
    return Path(top) if full == top or full.startswith(top.rstrip("/") + "/") else None


def _refused(exc: safefs.UnsafePath) -> UsageError:
    return UsageError(f"{exc.message} setup changed nothing; run it again once that is fixed.")


def _dir_fact(path: Path, top: Path | None = None) -> DirFact:
    """Owner of directory `path`, reached without following a link below `top`; refuses a link or a file."""
    try:
        fd = safefs.open_dir(path, root=top)
    except safefs.UnsafePath as exc:
        raise _refused(exc) from None
    except OSError as exc:
        raise BluegreenError(f"setup cannot read {shown(path)} ({exc.strerror or exc}). Nothing was changed; run setup "
                             f"as root (`sudo {invocation()} setup`).", exit_code=2) from None
    if fd is None:
        return DirFact(path, False)
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    return DirFact(path, True, st.st_uid, st.st_gid)


def _file_facts(directory: Path, top: Path | None) -> tuple[list[DirFact], list[str]]:
    """The regular files directly in `directory` (listed through its fd), and warnings for those setup leaves."""
    try:
        fd = safefs.open_dir(directory, root=top)
    except safefs.UnsafePath as exc:
        raise _refused(exc) from None
    if fd is None:
        return [], []
    files: list[DirFact] = []
    warnings: list[str] = []
    try:
        entries, more = safefs.scan(fd, MAX_FILES)
        if more:
            warnings.append(f"{shown(directory)} has more than {MAX_FILES} entries; only the first were looked at")
        for name, st in entries:
            if not stat.S_ISREG(st.st_mode):
                continue  # symlinks, FIFOs, devices: never given away, never followed
            path = directory / name
            if st.st_nlink > 1:
                warnings.append(f"left {shown(path)} as it is: it has {st.st_nlink} hard links, and giving it to "
                                f"the owner would give away every other name of that file too; remove it if you did "
                                f"not make it")
            elif not name.isprintable():
                warnings.append(f"left {shown(path)} as it is: its name has control characters; remove it if you "
                                f"did not make it")
            else:
                files.append(DirFact(path, True, st.st_uid, st.st_gid))
    except OSError as exc:
        raise BluegreenError(f"setup cannot list {shown(directory)} ({exc.strerror or exc}). Nothing was changed.", exit_code=2) from None
    finally:
        os.close(fd)
    return sorted(files, key=lambda f: str(f.path)), warnings


def read_facts(
    settings: Settings,
    runner: Runner,
    *,
    owner: Owner,
    dirs: tuple[Path, ...],
    schedule: str,
    schedule_files: Callable[[str], dict],
    systemd_running: bool,
    cron_daemon: bool = True,
    launcher: Path | None = None,
) -> tuple[Facts, dict]:
    """Read the host (read-only commands only); returns the facts and the wanted schedule files."""
    conf = nginx_conf_path(settings, runner)
    try:
        conf_text: str | None = read_config_file(conf)  # the admin's file: bounded, a FIFO never blocks
    except safefs.UnsafePath as exc:
        raise _refused(exc) from None
    except OSError:
        conf_text = None
    in_dump = False
    if conf_text is not None and not includes_dir(conf_text, upstream_dir(settings)):
        # The include may live in another file nginx loads; -T fails while a server block lacks its upstream.
        dump = runner.run(ngx.dump_argv(settings.nginx_cmd), check=False, mutates=False, timeout=60)
        in_dump = dump.ok and includes_dir(dump.stdout, upstream_dir(settings))
    resolved = choose_schedule(schedule, cron_dir_exists=settings.cron_dir.is_dir(), systemd_running=systemd_running,
                               cron_daemon=cron_daemon)
    wanted_files = schedule_files(resolved)
    timer_enabled = False
    if resolved == "systemd":
        enabled = runner.run(["systemctl", "is-enabled", TIMER_UNIT], check=False, mutates=False, timeout=30)
        timer_enabled = enabled.ok and enabled.stdout.strip() == "enabled"
    root = Path(os.path.abspath(str(settings.root)))
    dir_facts = tuple(_dir_fact(d, guarded_top(d, root)) for d in dirs)
    files: list[DirFact] = []
    warnings: list[str] = []
    for d in (root / "projects", root / "nginx" / "conf.d"):
        found, notes = _file_facts(d, root)
        files.extend(found)
        warnings.extend(notes)
    launcher_now, launcher_mode = _launcher_fact(launcher) if launcher is not None else (None, 0)
    if launcher_now is not None and not launcher_now.startswith(f"#!/bin/sh\n{LAUNCHER_MARK}"):
        warnings.append(f"left {shown(launcher)} as it is: setup did not write it; remove it (or set {LAUNCHER_DIR} "
                        f"to install the launcher in another directory) and run setup again")
    facts = Facts(
        owner=owner,
        dirs=dir_facts,
        files=tuple(files),
        warnings=tuple(warnings),
        nginx_conf=conf,
        nginx_conf_text=conf_text,
        include_in_dump=in_dump,
        schedule=resolved,
        schedule_files=tuple((p, _current(p)) for p in wanted_files),
        timer_enabled=timer_enabled,
        seed_crontab_lines=_seed_crontab_lines(runner, owner),
        launcher=launcher,
        launcher_text=launcher_now,
        launcher_mode=launcher_mode,
    )
    return facts, wanted_files


def _launcher_fact(path: Path) -> tuple[str | None, int]:
    """What the launcher path holds now and its mode; a link or anything but a small file reads as someone
    else's ("")."""
    try:
        st = os.lstat(str(path))
    except FileNotFoundError:
        return None, 0
    except OSError:
        return "", 0
    if not stat.S_ISREG(st.st_mode) or st.st_size > 64 * 1024:
        return "", 0
    try:
        return read_config_file(path, max_bytes=64 * 1024) or "", stat.S_IMODE(st.st_mode)
    except (OSError, safefs.UnsafePath):
        return "", 0


def cron_daemon_installed(settings: Settings, environ: dict, is_file: Callable[[str], bool] = os.path.isfile) -> bool:
    """Whether a cron daemon would read the cron directory. Checked for /etc/cron.d (or when the test-only
    BLUEGREEN_TEST_CRON_DAEMONS lists stand-ins); a BLUEGREEN_CRON_DIR of the admin's is taken as read by a cron."""
    test_paths = environ.get(TEST_CRON_DAEMONS)
    if isinstance(test_paths, str):
        return any(is_file(p) for p in test_paths.split(":") if p)
    if Path(os.path.abspath(str(settings.cron_dir))) != DEFAULT_CRON_DIR:
        return True
    return any(is_file(p) for p in CRON_DAEMONS)


def check_runs_as(runner: Runner, owner: Owner, argv: list[str]) -> str | None:
    """None if `argv --version` runs as `owner` the way cron would start it, else what went wrong."""
    if os.geteuid() == owner.uid:
        prefix: list[str] = []
    elif os.geteuid() == 0:
        prefix = ["setpriv", f"--reuid={owner.uid}", f"--regid={owner.gid}", "--init-groups", "--"]
    else:
        return None  # only root can try it as another user; setup needs root for that user's files anyway
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/", "LANG": "C.UTF-8"}
    try:
        result = runner.run([*prefix, *argv, "--version"], check=False, mutates=False, timeout=60, env=env)
    except ExecutableNotFound:
        return None if prefix else f"{argv[0]} does not exist"  # with a prefix: no setpriv to check with
    except CommandError as exc:
        return exc.output_tail(2)
    if result.ok:
        return None
    tail = [ln.strip() for ln in (result.stderr + result.stdout).splitlines() if ln.strip()][-2:]
    return _printable("; ".join(tail) or f"exit status {result.returncode}", 300)


def _current(path: Path) -> str | None:
    """What a schedule file holds now (None: missing or unreadable, so it is written)."""
    try:
        return read_config_file(path)
    except safefs.UnsafePath as exc:
        raise _refused(exc) from None
    except OSError:
        return None


def _seed_crontab_lines(runner: Runner, owner: Owner) -> tuple[str, ...]:
    """The seed's `find /app/...` lines in the owner's crontab, which would now run twice."""
    try:
        result = runner.run(["crontab", "-l", "-u", owner.name], check=False, mutates=False, timeout=30)
    except BluegreenError:  # no crontab binary: nothing to warn about
        return ()
    if not result.ok:
        return ()
    # The owner wrote this crontab: show at most a few lines, bounded, without control characters.
    lines = [ln for ln in result.stdout[:1 << 20].split("\n") if "find /app/" in ln and not ln.lstrip().startswith("#")]
    return tuple(_printable(ln.strip(), 200) for ln in lines[:5])


def _printable(text: str, limit: int) -> str:
    clean = "".join(c if c.isprintable() else "?" for c in text)
    return clean if len(clean) <= limit else clean[:limit] + "..."


def apply_step(step: Step, *, runner: Runner, settings: Settings, owner: Owner) -> str:
    """Carry out one step; returns the result note. Directories and files under the deploy root, LOG_DIR
    and the backup directory are reached and chowned through fds opened without following links."""
    root = Path(os.path.abspath(str(settings.root)))
    if step.kind == "mkdir":
        fd = safefs.open_dir(step.path, root=guarded_top(step.path, root), create=True, mode=0o755)
        if fd is None:  # cannot happen with create=True; keeps the type checker and a reader honest
            raise BluegreenError(f"setup could not create {shown(step.path)}.")
        try:
            st = os.fstat(fd)
            if (st.st_uid, st.st_gid) != (owner.uid, owner.gid):  # chown needs root; skip it when already right
                os.fchown(fd, owner.uid, owner.gid)
        finally:
            os.close(fd)
        return "created"
    if step.kind == "chown":
        safefs.chown_nofollow(step.path, owner.uid, owner.gid, root=guarded_top(step.path, root))
        return "owner set"
    if step.kind == "write":
        step.path.parent.mkdir(parents=True, exist_ok=True)
        state.atomic_write(step.path, step.data, mode=step.mode)
        return "written"
    if step.kind == "systemctl":
        runner.run(list(step.argv), timeout=60)
        return "done"
    if step.kind == "include":
        return _add_include(step, runner=runner, settings=settings)
    raise ValueError(step.kind)


def _add_include(step: Step, *, runner: Runner, settings: Settings) -> str:
    """Add the include, `nginx -t`; if nginx refuses, put nginx.conf back byte for byte and say why."""
    path = step.path
    original = read_config_file(path)
    if original is None:
        raise BluegreenError(f"{path} disappeared while setup ran; nothing of it was changed. Run setup again.")
    mode = path.stat().st_mode & 0o7777
    # Bytes that are not UTF-8 (a comment in another encoding) are written back exactly as they were.
    state.atomic_write(path, add_include(original, step.data, str(path)).encode("utf-8", "surrogateescape"), mode=mode)
    nginx = ngx.Nginx(runner, settings.nginx_cmd)
    try:
        nginx.test()
    except (CommandError, ExecutableNotFound) as exc:
        state.atomic_write(path, original.encode("utf-8", "surrogateescape"), mode=mode)
        error = ngx.Nginx.error_text(exc) if isinstance(exc, CommandError) else exc.message
        # Was nginx.conf already failing without our line? Then the fault is elsewhere: say so.
        try:
            nginx.test()
            before = "nginx -t passes again without the line, so the include itself is what nginx refused."
        except (CommandError, ExecutableNotFound):
            before = "nginx -t fails without the line too, so the problem is elsewhere in the configuration."
        raise BluegreenError(
            f"nginx -t failed after adding `{step.data}` to {path}:\n{indent(error)}\n{path} was put back as it "
            f"was; {before} Fix the error above, then run setup again."
        ) from exc
    return "nginx -t ok; nginx loads it at its next reload (every deploy reloads)"


def setup_host(
    *,
    settings: Settings,
    runner: Runner,
    owner: str | None,
    logs: str,
    backup: str,
    schedule: str,
    older_than: float,
    keep_days: float,
    pyz: str | None,
    dry_run: bool,
    environ: dict,
    stdout: TextIO,
    stderr: TextIO,
    systemd_running: bool | None = None,
) -> int:
    """Bring the host to the seed's layout; print each change, or that there was nothing to change."""
    if schedule not in SCHEDULES:
        raise UsageError(f"--schedule: one of {', '.join(SCHEDULES)}, got {schedule!r}.")
    for name, value in (("--logs", logs), ("--backup", backup)) + ((("--pyz", pyz),) if pyz else ()):
        check_value(name, value, absolute=name != "--pyz")
    if not (0 <= older_than < 1e6) or not (0 < keep_days < 1e6):  # NaN fails both; a huge bound is a typo
        raise UsageError("--older-than must be zero or more days and --keep-days more than zero (both under a "
                         "million). Nothing was changed.")
    who = resolve_owner(owner, environ)
    check_user(who.name)
    root = Path(os.path.abspath(str(settings.root)))
    dirs = (root, root / "projects", root / "nginx", root / "nginx" / "conf.d", Path(logs), Path(backup))
    # The schedule and the launcher name the system python3, never the one setup happens to run with
    # (a pyenv or virtualenv path of one login, which an upgrade removes).
    python = stable_python()
    if python is None:
        raise UsageError(f"This host has no system python3 ({' or '.join(STABLE_PYTHONS)}), which the daily log backup "
                         f"and the `bluegreen` launcher run with: install it ({INSTALL_PYTHON}). Nothing was changed.")
    archive = pyz_path(settings, pyz)
    pyz_there = os.path.isfile(archive)
    launcher, launcher_data, invoked_as = None, "", ""
    if pyz_there:
        launcher_dir = check_value(LAUNCHER_DIR, environ.get(LAUNCHER_DIR) or DEFAULT_LAUNCHER_DIR)
        launcher = Path(os.path.abspath(launcher_dir)) / LAUNCHER_NAME
        invoked_as = launcher_invoked_as(launcher)
        launcher_data = launcher_text(python, archive, invoked_as)
    command = [*self_command(settings, archive, python), "backup-logs", "--logs", logs, "--backup", backup,
               "--older-than", f"{older_than:g}", "--keep-days", f"{keep_days:g}"]
    facts, wanted_files = read_facts(
        settings, runner, owner=who, dirs=dirs, schedule=schedule,
        schedule_files=lambda s: schedule_texts(settings, s, owner=who, command=command, logs=logs, backup=backup,
                                                older_than=older_than, keep_days=keep_days),
        systemd_running=SYSTEMD_RUNNING.is_dir() if systemd_running is None else systemd_running,
        cron_daemon=cron_daemon_installed(settings, environ),
        launcher=launcher,
    )
    wanted = Wanted(include=include_line(settings), upstream_dir=upstream_dir(settings), schedule_files=wanted_files,
                    launcher=launcher_data)
    steps, ok = plan_setup(facts, wanted)
    warnings = list(facts.warnings)
    if not pyz_there:
        warnings.append(f"{shown(archive)} does not exist, so no `bluegreen` launcher was installed"
                        f"{' and the daily log backup would fail' if facts.schedule != 'none' else ''}: copy "
                        f"bluegreen.pyz there (or give its path with --pyz) and run setup again")
    elif facts.schedule != "none":
        problem = check_runs_as(runner, who, [python, archive])
        if problem:
            warnings.append(f"the daily log backup runs `{python} {shown(archive)}` as {who.name}, but that fails here "
                            f"({problem}): make the pyz and its directories readable by {who.name} (e.g. chmod 644 "
                            f"the pyz, 755 its directories) or give another one with --pyz, then run setup again")
    for line in warnings:
        print(f"warning: {line}.", file=stderr)
    for line in facts.seed_crontab_lines if facts.schedule != "none" else ():  # with none, the seed's line is the backup
        print(f"warning: {who.name}'s crontab still has the seed's line `{line.strip()}`; the backup now runs from "
              f"{settings.cron_dir / CRON_FILE if facts.schedule == 'cron' else 'the systemd timer ' + TIMER_UNIT}, so remove it "
              f"(`crontab -e -u {who.name}`) to avoid doing it twice.", file=stderr)
    head = "Dry run: setup would" if dry_run else "Setup"
    print(f"{head} (root {root}, owner {who.name}, logs {logs} -> {backup}, schedule {facts.schedule}):", file=stdout)
    for line in ok:
        print(f"  ok       {line}", file=stdout)
    if not steps:
        print("Nothing to change: this host is already set up.", file=stdout)
        return 0
    if dry_run:
        for step in steps:
            print(f"  would    {step.text}", file=stdout)
        print(f"Dry run: {len(steps)} change(s) listed, nothing was changed.", file=stdout)
        return 0
    done: list[str] = []
    for step in steps:
        try:
            note = apply_step(step, runner=runner, settings=settings, owner=who)
        except PermissionError as exc:
            raise BluegreenError(
                f"setup could not {step.text}: {exc.strerror or exc}. {_done_note(done)} Run setup as root "
                f"(`sudo {invocation()} setup`); it picks up where it stopped."
            ) from None
        except CommandError as exc:
            raise BluegreenError(
                f"setup could not {step.text}: `{display(exc.argv)}` failed: {exc.output_tail(4)}. {_done_note(done)} "
                f"Fix that, then run setup again."
            ) from None
        except BluegreenError as exc:
            raise BluegreenError(f"{exc.message} {_done_note(done)}", exit_code=exc.exit_code) from None
        except OSError as exc:
            where = f" ({shown(exc.filename)})" if exc.filename else ""
            raise BluegreenError(
                f"setup could not {step.text}: {exc.strerror or exc}{where}. {_done_note(done)} Fix that (a full disk, "
                f"a read-only filesystem), then run setup again; it picks up where it stopped."
            ) from None
        done.append(step.text)
        print(f"  changed  {step.text}: {note}", file=stdout)
    ours = launcher is not None and (facts.launcher_text is None or facts.launcher_text.startswith(f"#!/bin/sh\n{LAUNCHER_MARK}"))
    me = invoked_as if ours else invocation()
    guide = guide_projects(settings)
    if guide:  # a host the guide's deploy.sh set up: its projects are adopted, not init'ed
        print(f"Done: {len(done)} change(s). Next: {me} adopt {guide[0]} --dry-run, then {me} adopt {guide[0]} --force "
              f"(takes over what deploy.sh set up; docs/migrate-from-deploy-sh.md).", file=stdout)
        return 0
    print(f"Done: {len(done)} change(s). Next: {me} init PROJECT --image IMAGE, then {me} deploy PROJECT TAG "
          f"({me} doctor checks everything).", file=stdout)
    return 0


def guide_projects(settings: Settings) -> list[str]:
    """Projects with an env file and a hand-written upstream file (no probe token): the guide's deploy.sh layout."""
    found = []
    for project in settings.projects():
        try:
            upstream = ngx.parse_upstream(state.read_text(settings.upstream_file(project), root=settings.root))
        except BluegreenError:  # a planted file: doctor names it
            continue
        if upstream is not None and not upstream.token:
            found.append(project)
    return found


def _done_note(done: list[str]) -> str:
    return f"Already done: {'; '.join(done)}." if done else "Nothing was changed."
