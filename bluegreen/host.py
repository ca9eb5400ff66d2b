"""Facts about this host's set-up that init, setup and doctor share: where nginx.conf is, whether it
includes the managed upstream directory, and how this very program is invoked."""

from __future__ import annotations

import errno
import os
import re
import shlex
import stat
from pathlib import Path

import bluegreen
from bluegreen import safefs
from bluegreen.config import Settings
from bluegreen.errors import BluegreenError
from bluegreen.runner import Runner

DEFAULT_NGINX_CONF = "/etc/nginx/nginx.conf"
_CONF_PATH_RE = re.compile(r"--conf-path=(\S+)")
_PREFIX_RE = re.compile(r"--prefix=(\S+)")
_HTTP_OPEN_RE = re.compile(r"^([ \t]*)http\s*\{", re.MULTILINE)
_COMMENT_RE = re.compile(r"#[^\n]*")


def upstream_dir(settings: Settings) -> str:
    """The managed upstream directory as nginx must name it (absolute: nginx resolves relative paths
    against its own prefix, not against our working directory)."""
    return os.path.abspath(str(settings.root / "nginx" / "conf.d"))


def include_line(settings: Settings) -> str:
    return f"include {upstream_dir(settings)}/*.conf;"


def includes_dir(config: str, directory: str) -> bool:
    """True if an uncommented `include` directive in `config` loads files from `directory`."""
    text = _COMMENT_RE.sub("", config)
    directory = directory.rstrip("/")
    pattern = r"\binclude\s+([\"']?)" + re.escape(directory) + r"/[^;\s\"']*\1\s*;"
    return re.search(pattern, text) is not None


def add_include(config: str, line: str, source: str) -> str:
    """nginx.conf with `line` as the first directive of its http block (what the seed's sed did, once)."""
    for match in _HTTP_OPEN_RE.finditer(config):
        line_start = config.rfind("\n", 0, match.start()) + 1
        if "#" in config[line_start:match.start()]:
            continue  # `# http {` in a comment
        indent = match.group(1) + "    "
        end = match.end()
        return config[:end] + "\n" + indent + line + config[end:]
    raise BluegreenError(
        f"{source} has no `http {{` block to add `{line}` to; nginx.conf was not changed. Add the line inside "
        f"the http block by hand (or point BLUEGREEN_NGINX_CONF at the file that holds the http block), then "
        f"run setup again."
    )


MAX_CONFIG_BYTES = 8 << 20
_HOST_HINT = "Check the path (BLUEGREEN_NGINX_CONF, or the -c of BLUEGREEN_NGINX): it must name nginx's real configuration file"


def read_config_file(path: Path, *, max_bytes: int = MAX_CONFIG_BYTES) -> str | None:
    """A root-owned host file the admin chose (nginx.conf, a cron file): None when missing.

    Symlinks are followed (the admin's own, e.g. a config-managed nginx.conf), but a FIFO never blocks,
    only regular files are read, at most `max_bytes`; bytes that are not UTF-8 survive a write-back
    (surrogateescape). Raises safefs.UnsafePath for anything else."""
    try:
        fd = os.open(str(path), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a socket
            raise safefs.UnsafePath(path, "a socket, not a regular file", hint=_HOST_HINT) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise safefs.UnsafePath(path, safefs.describe_stat(st), hint=_HOST_HINT)
        return safefs.read_fd(fd, max_bytes, path).decode("utf-8", errors="surrogateescape")
    finally:
        os.close(fd)


def nginx_conf_path(settings: Settings, runner: Runner) -> Path:
    """BLUEGREEN_NGINX_CONF, else the nginx command's `-c FILE`, else nginx's compiled-in --conf-path."""
    if settings.nginx_conf:
        return Path(settings.nginx_conf)
    cmd = list(settings.nginx_cmd)
    prefix = cmd[cmd.index("-p") + 1] if "-p" in cmd[:-1] else None
    if "-c" in cmd[:-1]:
        conf = cmd[cmd.index("-c") + 1]
        return Path(conf if os.path.isabs(conf) else os.path.join(prefix or "/etc/nginx", conf))
    result = runner.run([*settings.nginx_cmd, "-V"], check=False, mutates=False, timeout=30)
    out = result.stderr + result.stdout  # nginx -V prints to stderr
    found = _CONF_PATH_RE.search(out)
    if not found:
        return Path(DEFAULT_NGINX_CONF)
    conf = found.group(1)
    if not os.path.isabs(conf):
        base = _PREFIX_RE.search(out)
        conf = os.path.join(prefix or (base.group(1) if base else "/etc/nginx"), conf)
    return Path(conf)


def running_pyz() -> Path | None:
    """The bluegreen.pyz this code runs from, or None when it runs from a source tree."""
    here = Path(bluegreen.__file__).resolve()
    for parent in here.parents:
        if parent.is_file():
            return parent
    return None


# Interpreters a root-run schedule and the launcher may name: the distribution's, which outlive any one
# login's pyenv/virtualenv (a cron line naming /root/.pyenv/... breaks when that version is removed).
STABLE_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3")


def stable_python(candidates: tuple[str, ...] = STABLE_PYTHONS, is_file=os.path.isfile) -> str | None:
    """The first system python3 of `candidates` that exists, or None."""
    for path in candidates:
        if is_file(path):
            return path
    return None


def self_command(settings: Settings, pyz: str | None = None, python: str | None = None) -> list[str]:
    """argv that runs this program from cron or systemd: a stable interpreter and the pyz, both absolute."""
    interpreter = python or stable_python() or "/usr/bin/python3"
    return [interpreter, pyz_path(settings, pyz)]


def pyz_path(settings: Settings, pyz: str | None = None) -> str:
    """The pyz the schedule and the launcher run: --pyz, else this one, else ROOT/bluegreen.pyz."""
    return os.path.abspath(pyz or str(running_pyz() or settings.root / "bluegreen.pyz"))


# The launcher exports this so that messages name the command the user typed; only a plain word or path is
# believed (it is our own environment, but it ends up in messages).
INVOKED_AS = "BLUEGREEN_INVOKED_AS"
_INVOKED_RE = re.compile(r"[A-Za-z0-9_./+-]{1,256}\Z")


def invocation(environ: "dict | None" = None) -> str:
    """How the user ran us, for 'Next: ...' hints: `bluegreen` through the launcher setup installs, else
    `python3 /opt/deploy/bluegreen.pyz`."""
    named = (os.environ if environ is None else environ).get(INVOKED_AS, "")
    if isinstance(named, str) and _INVOKED_RE.match(named):
        return named
    pyz = running_pyz()
    return f"python3 {shlex.quote(str(pyz))}" if pyz else "bluegreen"
