"""`bluegreen doctor [PROJECT]`: a checklist of everything a deploy relies on, each failing item with its fix.

Facts are gathered through read-only commands and `lstat`; each `judge_*` function decides one item from facts
alone. A FAIL is something that would make a deploy fail, or that hands root to someone the trust model
(docs/security.md) does not; a WARN needs a look but does not stop a deploy; an info line states a fact.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import shlex
import shutil
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, TextIO

from bluegreen import docker as dk
from bluegreen import hooks as hooks_mod
from bluegreen import nginx as ngx
from bluegreen import state
from bluegreen.config import ProjectConfig, Settings, load_project, registry_host, validate_project
from bluegreen.deploy import port_in_use
from bluegreen.errors import EXIT_FAILED, EXIT_OK, BluegreenError, CommandError
from bluegreen.host import include_line, includes_dir, invocation, nginx_conf_path, read_config_file, running_pyz, upstream_dir
from bluegreen.lock import current_holder, read_freeze
from bluegreen.runner import Runner

OK, WARN, FAIL, INFO = "ok", "WARN", "FAIL", "info"
MIN_PYTHON = (3, 9)


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""
    # What a program reading `doctor --json` may use beside the verdict (the serving check: tag and colour).
    facts: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)


# -- pure: judging ----------------------------------------------------------------------------------------

def judge_python(version: tuple) -> Check:
    text = ".".join(map(str, version[:3]))
    if tuple(version[:2]) >= MIN_PYTHON:
        return Check("python", OK, f"Python {text}")
    return Check("python", FAIL, f"Python {text} is older than 3.9", "sudo dnf install -y python3 (Amazon Linux 2023 ships 3.9)")


def judge_upstream(project: str, upstream: ngx.Upstream | None, active: str | None, cfg: ProjectConfig, upstream_path: Path, active_path: Path) -> Check:
    """Does the upstream file (what nginx routes to) agree with PROJECT.active?"""
    name = "upstream"
    if upstream is None:
        return Check(name, WARN, f"{upstream_path} is missing or not an upstream file",
                     f"{invocation()} init {project} --image {cfg.image} writes it (a deploy also does)")
    if upstream.port == 0:
        if active:
            return Check(name, WARN, f"{upstream_path} is a placeholder (routes nowhere) but {active_path.name} says {active}",
                         f"deploy to route traffic again: {invocation()} deploy {project} TAG")
        return Check(name, OK, "not deployed yet (placeholder upstream); the first deploy goes blue")
    routed = cfg.colour_of_port(upstream.port)
    if routed is None:
        return Check(name, WARN, f"{upstream_path} routes to port {upstream.port}, neither BLUE_PORT ({cfg.blue_port}) nor GREEN_PORT ({cfg.green_port})",
                     f"check BLUE_PORT/GREEN_PORT in {cfg.source}: change one colour's port at a time (the idle one first), deploying in between")
    if active is None:
        return Check(name, WARN, f"nginx routes to {routed} (127.0.0.1:{upstream.port}) but {active_path} is missing",
                     f"echo {routed} > {active_path}")
    if active != routed:
        return Check(name, WARN, f"nginx routes to {routed} (127.0.0.1:{upstream.port}) but {active_path.name} says {active}",
                     f"nginx is what serves: echo {routed} > {active_path}")
    return Check(name, OK, f"nginx routes to {routed} (127.0.0.1:{upstream.port}); {active_path.name} agrees")


def judge_port(project: str, colour: str, port: int, busy: bool, holders: list[str]) -> Check:
    name = f"{colour} port"
    ours = {dk.container_name(project, c) for c in ("blue", "green")}
    if not busy:
        return Check(name, OK, f"127.0.0.1:{port} is free")
    if holders and set(holders) <= ours:
        return Check(name, OK, f"127.0.0.1:{port} is held by {', '.join(holders)} (ours)")
    who = f"container {', '.join(holders)}" if holders else "another process"
    return Check(name, FAIL, f"127.0.0.1:{port} ({colour.upper()}_PORT) is taken by {who}, not by {project}",
                 f"free it (`ss -ltnp 'sport = :{port}'`, `docker rm -f NAME`) or change {colour.upper()}_PORT in {project}.env")


def _registry_key(key: str) -> str:
    key = key.split("://", 1)[-1]
    key = key.split("/", 1)[0]
    return "docker.io" if key in ("index.docker.io", "registry-1.docker.io", "docker.io") else key


def judge_credentials(image: str, config: dict | None, config_path: str, open_registry: bool | None = None,
                      answer: str = "") -> Check:
    """Is there a login for the image's registry in the docker client config of the deploying user?

    `open_registry`: True when the registry answered an anonymous `/v2/` (`answer`) without asking for
    credentials, False when it asked (401), None when not known: only a registry that asks needs a login."""
    registry = registry_host(image)
    name = "registry login"
    fix = f"docker login {registry} (as the user that deploys; for GHCR a PAT with read:packages)"
    if open_registry and not _has_login(registry, config):
        return Check(name, OK, f"{registry} answers pulls without credentials ({answer}): no login needed")
    asks = f" ({registry} asks for credentials: {answer})" if open_registry is False else ""
    if config is None:
        return Check(name, WARN, f"no docker client config at {config_path}: a private image of {registry} will not pull{asks}", fix)
    # The file is the user's, but any shape of JSON must give an answer, not a crash.
    helpers = config.get("credHelpers") if isinstance(config.get("credHelpers"), dict) else {}
    auths = config.get("auths") if isinstance(config.get("auths"), dict) else {}
    if any(_registry_key(k) == registry for k in helpers):
        return Check(name, OK, f"{registry}: credential helper {helpers.get(registry, '?')} ({config_path})")
    if any(_registry_key(k) == registry for k in auths):
        return Check(name, OK, f"{registry}: logged in ({config_path})")
    if config.get("credsStore"):
        return Check(name, OK, f"{registry}: credentials, if any, are in the {config['credsStore']} store ({config_path})")
    return Check(name, WARN, f"no login for {registry} in {config_path}: a private image will not pull{asks}", fix)


def _has_login(registry: str, config: dict | None) -> bool:
    if not isinstance(config, dict):
        return False
    helpers = config.get("credHelpers") if isinstance(config.get("credHelpers"), dict) else {}
    auths = config.get("auths") if isinstance(config.get("auths"), dict) else {}
    return any(_registry_key(k) == registry for k in [*helpers, *auths]) or bool(config.get("credsStore"))


def registry_url(registry: str) -> str:
    """The `/v2/` URL docker would use: https, or http for a registry on the loopback (docker's default
    insecure range)."""
    host = "registry-1.docker.io" if registry == "docker.io" else registry
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    local = name in ("localhost", "[::1]") or name.startswith("127.")
    return f"{'http' if local else 'https'}://{host}/v2/"


def registry_is_open(registry: str, timeout: float = 3.0) -> tuple[bool | None, str]:
    """An anonymous, bounded GET of the registry's `/v2/`: (True: answered 200, False: asked for
    credentials with 401, None: no answer or anything else) and what it answered."""
    from bluegreen import http_client

    url = registry_url(registry)
    try:
        answer = http_client.request("GET", url, timeout=timeout, max_bytes=4096)
    except http_client.HttpError as exc:
        return None, f"GET {url}: {exc.detail}"
    except (OSError, ValueError) as exc:  # a name http_client cannot use: say so, decide nothing
        return None, f"GET {url}: {exc}"
    verdict = True if answer.status == 200 else False if answer.status == 401 else None
    return verdict, f"GET {url} answered HTTP {answer.status}"


def judge_disk(label: str, path: str, free: int | None, min_free: int) -> Check:
    name = f"disk {label}"
    if free is None:
        return Check(name, WARN, f"cannot measure free space under {path}")
    gib = free / 2**30
    if free < min_free:
        return Check(name, FAIL, f"{gib:.1f} GiB free under {path}, less than {min_free / 2**30:.1f} GiB",
                     f"free space: `docker image prune -a --filter until=168h`, `{invocation()} backup-logs`, or grow the volume")
    return Check(name, OK, f"{gib:.1f} GiB free under {path}")


def server_block_state(dump: str, upstream: str, project: str) -> tuple[bool, bool]:
    """(a server block proxies to the upstream, one adds the route header) in `nginx -T` output.

    Comments are dropped first: the managed upstream file quotes the header line in a comment.
    """
    text = re.sub(r"#[^\n]*", "", dump)
    proxies = re.search(r"\bproxy_pass\s+http://" + re.escape(upstream) + r"\s*[;/]", text) is not None
    reports = re.search(r"\badd_header\s+" + re.escape(ngx.ROUTE_HEADER) + r"\s+" + re.escape(ngx.route_variable(project)) + r"\b", text) is not None
    return proxies, reports


def verdict(checks: list[Check]) -> int:
    return EXIT_FAILED if any(c.status == FAIL for c in checks) else EXIT_OK


# -- pure: the trust model (docs/security.md) -------------------------------------------------------------

@dataclass(frozen=True)
class Node:
    """One path as `lstat` saw it, owner and group resolved to names."""

    path: str
    kind: str  # dir | file | symlink | fifo | socket | device | missing | unreadable
    uid: int = -1
    gid: int = -1
    mode: int = 0  # permission bits, sticky bit included
    nlink: int = 1
    owner: str = ""
    group: str = ""
    group_members: tuple[str, ...] = ()  # every user in the group (secondary and primary members)
    target: str = ""  # where a symlink points


_ODD_KINDS = ("symlink", "fifo", "socket", "device")


def untrusted_writers(node: Node, trusted: frozenset, *, ancestor: bool = False, any_group: bool = False) -> list[str]:
    """Who beyond `trusted` can change `node`: its owner (who can always chmod it), then group and others by mode.

    For an ancestor directory with the sticky bit (/tmp) only its owner can replace the entry below it.
    `any_group`: a group write bit counts whoever is in the group (hooks: what a deploy as root refuses).
    """
    if node.kind in ("missing", "unreadable"):
        return []
    who = [f"{node.owner} (owner)"] if node.owner not in trusted else []
    if node.kind == "symlink" or (ancestor and node.mode & stat.S_ISVTX):
        return who  # a symlink's own mode means nothing; replacing it takes write access to its directory
    if node.mode & stat.S_IWGRP:
        members = [m for m in node.group_members if m not in trusted]
        if members or any_group:
            who.append(f"group {node.group} ({', '.join(members or node.group_members) or 'no members'})")
    if node.mode & stat.S_IWOTH:
        who.append("everyone")
    return who


def untrusted_readers(node: Node, trusted: frozenset) -> list[str]:
    """Who beyond `trusted` can read the file `node`."""
    who = [f"{node.owner} (owner)"] if node.owner not in trusted else []
    if node.mode & stat.S_IRGRP:
        members = [m for m in node.group_members if m not in trusted]
        if members:
            who.append(f"group {node.group} ({', '.join(members)})")
    if node.mode & stat.S_IROTH:
        who.append("everyone")
    return who


def shown(path: str) -> str:
    """A path for the terminal: a planted name may hold escape sequences or line breaks."""
    return path if path.isprintable() else ascii(path)[1:-1]


def _q(path: str) -> str:
    """A path inside a command the user may paste as root: a planted name may hold `; rm -rf /`."""
    return shlex.quote(shown(path))


def _tighten(node: Node, trusted: frozenset, owner: str) -> str:
    """The commands that leave `node` to root and `owner` only."""
    steps = []
    if node.owner not in trusted:
        steps.append(f"sudo chown {_q(owner)} {_q(node.path)}")
    if node.kind != "symlink" and node.mode & (stat.S_IWGRP | stat.S_IWOTH):
        steps.append(f"sudo chmod go-w {_q(node.path)}")
    return " && ".join(steps)


def _listing(items: list[str], limit: int = 4) -> str:
    shown = items[:limit] + ([f"and {len(items) - limit} more"] if len(items) > limit else [])
    return "; ".join(shown)


def judge_writers(name: str, what: str, nodes: list[tuple[Node, bool]], trusted: frozenset, owner: str, why: str,
                  *, any_group: bool = False) -> Check:
    """FAIL when anyone beyond `trusted` can change one of `nodes` ((node, is_ancestor) pairs): `why` says what that gives them."""
    problems, fixes = [], []
    for node, ancestor in nodes:
        who = untrusted_writers(node, trusted, ancestor=ancestor, any_group=any_group)
        if who:
            problems.append(f"{shown(node.path)} by {', '.join(who)}")
            # A directory above the root is root's; what is below it may be the deploy user's.
            fixes.append(_tighten(node, trusted, "root" if ancestor else owner))
    if not problems:
        return Check(name, OK, f"{what}: writable only by {', '.join(sorted(trusted))}")
    fix = "; ".join(f for f in dict.fromkeys(fixes) if f)
    return Check(name, FAIL, f"{what} can be changed by others: {_listing(problems)}. {why}",
                 f"{fix or 'remove the extra write access'} (docs/security.md)")


def judge_odd_files(found: list[Node], where: str) -> Check:
    """FAIL for a symlink, FIFO, socket, device or hard-linked file below ROOT: bluegreen never reads or writes through one."""
    name = "planted files"
    if not found:
        return Check(name, OK, f"no symlink, FIFO or hard link below {where}")
    items = []
    for node in found:
        if node.kind == "symlink":
            items.append(f"{shown(node.path)} is a symlink to {shown(node.target)}")
        elif node.kind == "file":
            items.append(f"{shown(node.path)} has {node.nlink} hard links")
        else:
            items.append(f"{shown(node.path)} is a {'FIFO' if node.kind == 'fifo' else node.kind}")
    return Check(name, FAIL, f"{_listing(items)}: bluegreen refuses to read or write through these, and a link planted "
                             f"here could turn root against another file",
                 f"remove {'it' if len(found) == 1 else 'them'} (`sudo rm {_q(found[0].path)}`, which removes a link, not its "
                 f"target) and find out who can write {shown(os.path.dirname(found[0].path))} (docs/security.md)")


def judge_env_secrets(node: Node, trusted: frozenset, owner: str) -> Check:
    """The env file: changing it is root-equivalent (IMAGE, DOCKER_ARGS); reading it gives the app's secrets."""
    name = "env secrets"
    writers = untrusted_writers(node, trusted)
    if writers:
        return Check(name, FAIL, f"{node.path} can be changed by {', '.join(writers)}: IMAGE and DOCKER_ARGS decide what "
                                 f"runs, with which mounts and privileges, so that is root-equivalent",
                     f"{_tighten(node, trusted, owner)} && sudo chmod 600 {node.path}")
    readers = untrusted_readers(node, trusted)
    if readers:
        return Check(name, WARN, f"{node.path} holds the app's secrets and is readable by {', '.join(readers)}",
                     f"sudo chmod 600 {node.path}")
    return Check(name, OK, f"{node.path} is readable only by {', '.join(sorted(trusted))} (mode {node.mode & 0o777:03o})")


def judge_log_dir(node: Node, trusted: frozenset, owner: str) -> Check:
    """LOG_DIR is written by the app container: untrusted content, but the directory itself should be a plain one of ours."""
    name = "LOG_DIR"
    if node.kind == "missing":
        return Check(name, OK, f"{shown(node.path)} does not exist yet (docker creates it at the first deploy)")
    if node.kind == "symlink":
        return Check(name, WARN, f"{shown(node.path)} is a symlink to {shown(node.target)}: the app's log volume and backup-logs follow it "
                                 f"to wherever it points now",
                     f"replace the link by a directory (`sudo rm {_q(node.path)} && sudo mkdir {_q(node.path)}`, then chown it to "
                     f"the deploy user), or set LOG_DIR to the real directory once you know who owns it")
    if node.kind != "dir":
        return Check(name, WARN, f"{shown(node.path)} is a {node.kind}, not a directory: docker cannot mount it as the log volume",
                     f"move it away and `sudo mkdir {_q(node.path)}`")
    if node.owner not in trusted:
        return Check(name, WARN, f"{shown(node.path)} is owned by {node.owner}, neither root nor the deploy root's owner: that user "
                                 f"decides what backup-logs finds there",
                     f"sudo chown {_q(owner)} {_q(node.path)}")
    if node.mode & stat.S_IWOTH and not node.mode & stat.S_ISVTX:
        return Check(name, WARN, f"{shown(node.path)} is writable by everyone: any user of this host can plant files that "
                                 f"backup-logs reads", f"sudo chmod o-w {_q(node.path)}")
    return Check(name, OK, f"{shown(node.path)} is a directory owned by {node.owner} (what the app writes there is untrusted)")


def judge_root_equivalent(root: str, root_owner: str, docker_members: list[str] | None) -> Check:
    """Who is root-equivalent on this host by design (informational: the trust model, not a problem)."""
    parts = []
    if root_owner and root_owner != "root":
        parts.append(f"{root_owner} (owns {root}, whose nginx/conf.d nginx loads as root)")
    if docker_members:
        parts.append(f"the docker group: {', '.join(docker_members)}")
    if not parts:
        return Check("root-equiv", INFO, "only root can change what root runs here")
    return Check("root-equiv", INFO, f"by design, root-equivalent: {'; '.join(parts)} (docs/security.md)")


_COMMENT_RE = re.compile(r"#[^\n]*")
_CONF_FILE_RE = re.compile(r"^# configuration file (/[^\n]*):[ \t]*$", re.MULTILINE)
_INCLUDE_RE = re.compile(r"\binclude\s+([\"']?)([^;\"'\s]+)\1\s*;")
_GLOB_CHARS = re.compile(r"[*?\[]")


def nginx_loaded_paths(dump: str) -> tuple[list[str], list[str]]:
    """(every file `nginx -T` says it loaded, every directory an `include` reads) from its output.

    A glob that matches nothing loads no file today but loads whatever appears there later: its directory counts.
    Relative includes are relative to nginx.conf's directory (the first file of the dump).
    """
    files = list(dict.fromkeys(_CONF_FILE_RE.findall(dump)))
    base = os.path.dirname(files[0]) if files else "/etc/nginx"
    dirs = []
    for match in _INCLUDE_RE.finditer(_COMMENT_RE.sub("", dump)):
        pattern = match.group(2)
        directory = os.path.dirname(os.path.join(base, pattern))
        if directory and not _GLOB_CHARS.search(directory):
            dirs.append(os.path.normpath(directory))
    dirs += [os.path.dirname(f) for f in files]
    return files, list(dict.fromkeys(dirs))


def ancestors(path: str) -> list[str]:
    """`path`'s parent directories, outermost first ("/" included), not `path` itself."""
    out = []
    parent = os.path.dirname(path)
    while parent and parent != path:
        out.append(parent)
        path, parent = parent, os.path.dirname(parent)
    return out[::-1]


# -- doing: gathering facts -------------------------------------------------------------------------------

def _free_bytes(path: str) -> int | None:
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent  # LOG_DIR may not exist yet: docker creates it on the same filesystem as its parent
    try:
        return shutil.disk_usage(str(p)).free
    except OSError:
        return None


def _run(runner: Runner, argv: list[str]):
    """A read-only command; None when its executable is missing."""
    try:
        return runner.run(argv, check=False, mutates=False, timeout=30)
    except BluegreenError:
        return None


MAX_DOCKER_CONFIG = 1 << 20


def _docker_config(environ: Mapping[str, str]) -> tuple[dict | None, str]:
    base = environ.get("DOCKER_CONFIG") or os.path.join(environ.get("HOME") or os.path.expanduser("~"), ".docker")
    path = os.path.join(base, "config.json")
    try:
        # The user's own file (it may be a dotfiles symlink), but never block on a FIFO or read a huge file.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None, path
            raw = os.read(fd, MAX_DOCKER_CONFIG + 1)
        finally:
            os.close(fd)
        if len(raw) > MAX_DOCKER_CONFIG:
            return None, path
        data = json.loads(raw.decode("utf-8"))
        return (data if isinstance(data, dict) else {}), path
    except (OSError, ValueError, RecursionError):
        return None, path


@dataclass
class HostFacts:
    nginx_dump: str | None  # `nginx -T` output when it passed


def host_checks(settings: Settings, runner: Runner, *, min_free: int) -> tuple[list[Check], HostFacts]:
    checks = [judge_python(tuple(sys.version_info))]
    me = invocation()

    version = _run(runner, [*settings.docker_cmd, "version", "--format", "{{.Server.Version}}"])
    docker_ok = bool(version and version.ok and version.stdout.strip())
    if version is None:
        checks.append(Check("docker", FAIL, f"`{settings.docker_cmd[0]}` not found",
                            "sudo dnf install -y docker && sudo systemctl enable --now docker"))
    elif not docker_ok:
        tail = (version.stderr or version.stdout).strip().splitlines()[-1:] or ["no answer"]
        checks.append(Check("docker", FAIL, f"the docker daemon does not answer: {tail[0]}",
                            "sudo systemctl enable --now docker; a non-root deploy user also needs "
                            "`sudo usermod -aG docker USER` and a new login"))
    else:
        checks.append(Check("docker", OK, f"docker {version.stdout.strip()} reachable"))

    dump = _run(runner, ngx.dump_argv(settings.nginx_cmd))
    nginx_dump = dump.stdout if dump is not None and dump.ok else None
    if dump is None:
        checks.append(Check("nginx", FAIL, f"`{settings.nginx_cmd[0]}` not found (or sudo refused)",
                            "sudo dnf install -y nginx && sudo systemctl enable --now nginx; a non-root deploy user "
                            "needs a sudoers rule for nginx"))
    elif not dump.ok:
        error = ngx.Nginx.error_text(_as_error(dump))
        checks.append(Check("nginx -t", FAIL, f"nginx rejects its configuration: {error}",
                            "fix the error shown (it names file and line), then check with `sudo nginx -t`"))
    else:
        checks.append(Check("nginx -t", OK, "configuration is valid"))

    if dump is not None:
        conf = nginx_conf_path(settings, runner)
        try:  # the admin's nginx.conf: a symlink to it is fine, a FIFO never blocks
            text = nginx_dump if nginx_dump is not None else read_config_file(conf) or ""
        except (BluegreenError, OSError):  # unreadable: nginx -t has failed already and says why
            text = ""
        if includes_dir(text, upstream_dir(settings)):
            checks.append(Check("include", OK, f"nginx includes {upstream_dir(settings)}"))
        else:
            checks.append(Check("include", FAIL, f"nginx does not include {upstream_dir(settings)} ({conf})",
                                f"sudo {me} setup (adds `{include_line(settings)}` to the http block)"))
    if nginx_dump is not None:
        pid, pid_file = ngx.master_pid(nginx_dump, settings.nginx_cmd, settings.nginx_pid_file)
        if pid is not None:
            checks.append(Check("nginx running", OK, f"master pid {pid} ({pid_file})"))
        else:
            checks.append(Check("nginx running", FAIL, f"no nginx master runs (pid file {pid_file}), so a deploy's reload would fail",
                                "sudo systemctl enable --now nginx"))

    if docker_ok:
        info = _run(runner, [*settings.docker_cmd, "info", "--format", "{{.DockerRootDir}}"])
        data_dir = info.stdout.strip() if info is not None and info.ok and info.stdout.strip() else "/var/lib/docker"
        checks.append(judge_disk("docker", data_dir, _free_bytes(data_dir), min_free))
    return checks, HostFacts(nginx_dump)


def _as_error(result) -> CommandError:
    return CommandError(list(result.argv), result.returncode, result.stdout, result.stderr)


def project_checks(settings: Settings, runner: Runner, project: str, facts: HostFacts, *, min_free: int, environ: Mapping[str, str],
                   port_busy: Callable[[int], bool] = port_in_use) -> list[Check]:
    me = invocation()
    try:
        cfg = load_project(settings, project)
    except BluegreenError as exc:  # a bad setting, or an env file that is a symlink, FIFO or too large
        return [Check("env file", FAIL, exc.message, f"edit {settings.env_file(project)} (reference: docs/env-reference.md)")] \
            + project_trust_checks(settings, project, None)
    checks = [Check("env file", OK, f"{settings.env_file(project)}: IMAGE={cfg.image}, ports {cfg.blue_port}/{cfg.green_port}")]
    for warning in cfg.warnings:
        checks.append(Check("env file", WARN, warning, f"fix the key in {settings.env_file(project)}"))

    try:
        upstream = ngx.parse_upstream(state.read_text(settings.upstream_file(project), root=settings.root))
        active = state.read_active(settings.active_file(project), root=settings.root)
        checks.append(judge_upstream(project, upstream, active, cfg, settings.upstream_file(project), settings.active_file(project)))
    except BluegreenError as exc:  # a planted symlink or FIFO: name it and go on with the other checks
        upstream = None
        checks.append(_unsafe("upstream", exc))
    name = upstream.name if upstream else project
    if facts.nginx_dump is not None:
        proxies, reports = server_block_state(facts.nginx_dump, name, project)
        if not proxies:
            checks.append(Check("server block", WARN, f"no server block nginx loads proxies to http://{name}",
                                f"{me} init {project} --image {cfg.image} --server-name NAME writes one"))
        elif not reports:
            from bluegreen.status import route_line_fix

            checks.append(Check("server block", WARN, "the server block lacks the route header line, so deploys cannot prove the switch",
                                route_line_fix(project, upstream is None or bool(upstream.token))))
        else:
            checks.append(Check("server block", OK, f"proxies to http://{name} and reports the route"))

    checks.append(adoption_check(settings, runner, project, facts.nginx_dump))

    for colour in ("blue", "green"):
        port = cfg.port(colour)
        busy = port_busy(port)
        holders: list[str] = []
        if busy:
            try:
                holders = dk.Docker(runner, settings.docker_cmd).publishers(port)
            except BluegreenError:  # docker missing: reported by its own check
                holders = []
        checks.append(judge_port(project, colour, port, busy, holders))
    checks.extend(ephemeral_and_foreign_checks(settings, cfg))

    try:
        local = dk.Docker(runner, settings.docker_cmd).local_images(cfg.image)
    except BluegreenError:  # docker missing or not answering: its own check says so
        local = None
    checks.append(judge_pull(cfg, local, settings.env_file(project)))
    if cfg.pull == "never":
        checks.append(Check("registry login", OK, "PULL=never: deploys use only images this host has, no registry"))
    else:
        config, config_path = _docker_config(environ)
        registry = registry_host(cfg.image)
        open_registry, answer = (None, "") if _has_login(registry, config) else registry_is_open(registry)
        checks.append(judge_credentials(cfg.image, config, config_path, open_registry, answer))
    checks.append(judge_log_dir_shared(project, cfg.log_dir, _other_log_dirs(settings, project), settings.env_file(project)))
    checks.append(serving_check(settings, runner, project))
    checks.append(judge_watch(cfg, facts.nginx_dump))
    if cfg.log_dir:
        checks.append(judge_disk("LOG_DIR", cfg.log_dir, _free_bytes(cfg.log_dir), min_free))
    checks.append(lock_check(settings, project))
    checks += project_trust_checks(settings, project, cfg)
    return checks


def adoption_check(settings: Settings, runner: Runner, project: str, dump: str | None) -> Check:
    """On a host the guide's deploy.sh set up (a hand-written upstream, a container bluegreen did not start):
    what `adopt` would change. A WARN: deploys work without it, but cannot prove where nginx routes."""
    from bluegreen import adopt

    try:
        changes = adopt.pending(settings, runner, project, dump)
    except BluegreenError as exc:  # nginx or docker not answering: their own checks say so
        return Check("adoption", INFO, f"cannot tell whether {project} needs adopting: {exc.message.splitlines()[0]}")
    if changes is None:
        return Check("adoption", OK, f"{project} is bluegreen's (a managed upstream file, containers it started)")
    if not changes:
        return Check("adoption", OK, f"{project} is adopted; its deploy.sh container is retired by the next deploy")
    if all(" publishes its port on every address " in line for line in changes):
        return Check("adoption", WARN, f"{project} is adopted, but: {' '.join(changes)}",
                     f"{invocation()} deploy {project} TAG (the tag that serves now is enough)")
    return Check("adoption", WARN, f"set up by the guide's deploy.sh; `adopt --force` would: {'; '.join(changes)}",
                 f"{invocation()} adopt {project} --dry-run, then {invocation()} adopt {project} --force "
                 f"(docs/migrate-from-deploy-sh.md)")


def judge_pull(cfg: ProjectConfig, local: list | None, env_file: Path) -> Check:
    """The pull policy against the images this host has (`local` None: docker could not tell)."""
    if local is None:
        return Check("pull policy", WARN, f"PULL={cfg.pull}: cannot list this host's images of {cfg.image}")
    problem = dk.pull_policy_problem(cfg.image, cfg.pull, local)
    if problem:
        return Check("pull policy", FAIL, problem, f"set PULL in {env_file} (docs/env-reference.md), or load the image")
    have = f"this host has {len(local)} image(s) of {cfg.image}" if local else f"this host has no image of {cfg.image} yet"
    return Check("pull policy", OK, f"PULL={cfg.pull}; {have}")


def judge_log_dir_shared(project: str, log_dir: str, others: Mapping[str, str | None], env_file: Path) -> Check:
    """Two projects writing one LOG_DIR: their apps' app.log clash and backup-logs mixes them."""
    from bluegreen.init import shared_log_dirs

    if not log_dir:
        return Check("shared LOG_DIR", OK, "no log volume (LOG_DIR is empty)")
    dirs = {name: d for name, d in others.items() if d is not None}
    dirs[project] = log_dir
    shared = shared_log_dirs(dirs).get(log_dir.rstrip("/") or "/")
    if shared:
        with_ = ", ".join(n for n in shared if n != project)
        return Check("shared LOG_DIR", WARN, f"{log_dir} is also the LOG_DIR of {with_}: the apps' app.log files clash and "
                                      f"backup-logs mixes their logs",
                     f"give {project} its own directory: LOG_DIR={log_dir.rstrip('/')}/{project} in {env_file}")
    return Check("shared LOG_DIR", OK, f"{log_dir} is {project}'s own")


def _other_log_dirs(settings: Settings, project: str) -> dict:
    from bluegreen.init import other_log_dirs

    return other_log_dirs(settings, project)


def judge_watch(cfg: ProjectConfig, dump: str | None) -> Check:
    """Whether the watch window (WATCH_SECONDS) can see what nginx serves: the server block's log line."""
    from bluegreen import watch

    path = watch.find_log_path(dump, cfg.project) if dump is not None else None
    line = watch.access_log_line(cfg.project)
    if cfg.watch_seconds <= 0 and not cfg.canary_steps:
        return Check("watch", OK if path else INFO, "WATCH_SECONDS=0: no watch" + (f" (log line ready: {path})" if path else
                     f"; to use it, add `{watch.log_format_line(cfg.project)}` above the server block and `{line}` "
                     f"inside it, then set WATCH_SECONDS"))
    if dump is None:
        return Check("watch", WARN, "cannot tell whether the server block logs for the watch: `nginx -T` failed")
    if path is None:
        return Check("watch", WARN, f"WATCH_SECONDS={cfg.watch_seconds:g}"
                                    + (f", CANARY_STEPS={cfg.canary_steps}" if cfg.canary_steps else "")
                                    + ", but no server block logs with the watch format, so deploys go ahead without "
                                      "a watch and switch at once",
                     f"add `{watch.log_format_line(cfg.project)}` above the server block of {cfg.project} and `{line}` "
                     f"inside it, then `nginx -t && nginx -s reload`")
    return Check("watch", OK, f"WATCH_SECONDS={cfg.watch_seconds:g}: deploys judge the traffic nginx logs to {path}")


def judge_serving(ps) -> Check:
    """status's verdict on the path a client takes, as a doctor item: a service that is down is a FAIL.
    Its facts name what serves (a fleet rollout's preflight reads them as the host's tag before)."""
    from bluegreen import status

    if ps.error:
        return Check("serving", WARN, f"cannot tell: {ps.error.splitlines()[0]}")
    facts = {"tag": ps.tag or "", "colour": ps.serving or "", "verdict": ps.verdict}
    if ps.serving is None and all(c.state == "absent" for c in ps.colours):
        return Check("serving", OK, "not deployed yet: nothing to check", facts=facts)
    failed = status.first_failed(ps.checks)
    fix = failed.fix if failed is not None and failed.fix else ps.drift[0].fix if ps.drift else ""
    if ps.verdict == status.DOWN:
        return Check("serving", FAIL, f"the service is down: {status.reason(ps)}", fix, facts=facts)
    if ps.verdict == status.DEGRADED:
        return Check("serving", WARN, f"degraded: {status.reason(ps)}", fix, facts=facts)
    live = next((c for c in ps.colours if c.colour == ps.serving), None)
    return Check("serving", OK, f"nginx answers {ps.nginx_answer} and routes to {live.container if live else ps.serving}, "
                                f"which runs and is healthy", facts=facts)


def serving_check(settings: Settings, runner: Runner, project: str) -> Check:
    """The same facts `bluegreen status` reads: nginx running and answering, routed to the serving container."""
    from bluegreen import status

    try:
        (ps,) = status.collect(settings, [project], runner)
    except BluegreenError as exc:  # docker missing: its own check says so
        return Check("serving", WARN, f"cannot tell: {exc.message.splitlines()[0]}")
    return judge_serving(ps)


# -- doing: the trust model's facts (lstat only: nothing is opened or followed) --------------------------

MAX_NODES = 2000  # bound the walk of a hostile or huge tree


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return f"uid {uid}"


_PASSWD: list = []


def _group(gid: int) -> tuple[str, tuple[str, ...]]:
    """The group's name and every user in it: listed members and those whose primary group it is."""
    try:
        entry = grp.getgrgid(gid)
    except (KeyError, OverflowError):
        return f"gid {gid}", ()
    if not _PASSWD:
        _PASSWD.append([(p.pw_name, p.pw_gid) for p in pwd.getpwall()])
    members = list(entry.gr_mem) + [name for name, primary in _PASSWD[0] if primary == gid]
    return entry.gr_name, tuple(dict.fromkeys(members))


def lstat_node(path: str) -> Node:
    """What is at `path` itself (a symlink is reported, never followed)."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return Node(path, "missing")
    except OSError:
        return Node(path, "unreadable")
    mode = st.st_mode
    kind = ("dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "symlink" if stat.S_ISLNK(mode)
            else "fifo" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else "device")
    target = ""
    if kind == "symlink":
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
    group, members = _group(st.st_gid)
    return Node(path, kind, st.st_uid, st.st_gid, stat.S_IMODE(mode), st.st_nlink, _user(st.st_uid), group, members, target)


def find_odd_files(tops: list[str], *, depth: int = 6) -> list[Node]:
    """Symlinks, FIFOs, sockets, devices and hard-linked files at or below `tops` (never descending through a link)."""
    found, seen = [], 0
    pending = [(top, 0) for top in tops]
    while pending and seen < MAX_NODES:
        path, level = pending.pop()
        node = lstat_node(path)
        seen += 1
        if node.kind in _ODD_KINDS or (node.kind == "file" and node.nlink > 1):
            found.append(node)
        elif node.kind == "dir" and level < depth:
            try:
                names = sorted(os.listdir(path))[:MAX_NODES]
            except OSError:
                continue
            pending.extend((os.path.join(path, n), level + 1) for n in names)
    return sorted(found, key=lambda n: n.path)


def _entries(directory: str) -> list[str]:
    try:
        return [os.path.join(directory, n) for n in sorted(os.listdir(directory))[:MAX_NODES]]
    except OSError:
        return []


def _nodes(paths: list[tuple[str, bool]]) -> list[tuple[Node, bool]]:
    """lstat each (path, is_ancestor) once; a path seen both ways is judged strictly (not as an ancestor)."""
    strict: dict[str, bool] = {}
    for path, ancestor in paths:
        strict[path] = strict.get(path, True) and ancestor
    return [(lstat_node(p), a) for p, a in list(strict.items())[:MAX_NODES]]


def trust_basis(settings: Settings) -> tuple[str, str, frozenset] | None:
    """(absolute root, its owner, the users trusted with what root runs: root and that owner); None without a root."""
    root = os.path.abspath(str(settings.root))
    try:
        owner = _user(os.stat(root).st_uid)  # the admin chose the root: a symlinked /opt/deploy is theirs to make
    except OSError:
        return None
    return root, owner, frozenset({"root", owner})


def _chain(path: str) -> list[tuple[str, bool]]:
    """`path` (strict) with its ancestors, also those of its real location when a component is a symlink."""
    out = [(a, True) for a in ancestors(path)]
    real = os.path.realpath(path)
    if real != path:
        out += [(a, True) for a in ancestors(real)] + [(real, False)]
    return out + [(path, False)]


def trust_checks(settings: Settings, facts: HostFacts) -> list[Check]:
    """The host-wide checks of docs/security.md: who can change the deploy root and what nginx loads."""
    basis = trust_basis(settings)
    if basis is None:
        return []
    root, owner, trusted = basis
    upstreams = os.path.join(root, "nginx", "conf.d")
    mine = [(p, False) for p in (os.path.join(root, "projects"), os.path.join(root, "nginx"), upstreams, os.path.join(root, "hooks"))]
    checks = [judge_writers(
        "deploy root", f"{root} (projects, nginx/conf.d, hooks)",
        _nodes(_chain(root) + mine + [(p, False) for p in _entries(upstreams)]), trusted, owner,
        "nginx loads its conf.d as root and hooks run as the user that deploys: whoever can change them is root-equivalent.")]

    files, dirs = nginx_loaded_paths(facts.nginx_dump or "")
    wanted: list[tuple[str, bool]] = []
    for d in dict.fromkeys([str(settings.nginx_conf_dir), *dirs]):
        if os.path.isabs(d):
            wanted += _chain(os.path.normpath(d))
    for f in files:
        wanted.append((f, False))
        real = os.path.realpath(f)
        if real != f:  # Debian's sites-enabled/* link to sites-available/*: judge what nginx really reads
            wanted += _chain(real)
    covered = set(ancestors(root)) | {root}
    outside = [(p, a) for p, a in wanted if p not in covered and not p.startswith(root + "/")]
    checks.append(judge_writers(
        "nginx config", f"what nginx loads ({len(files)} files; {settings.nginx_conf_dir})", _nodes(outside), trusted, "root",
        "nginx's master runs as root and opens every access_log/error_log path these files name: whoever can change "
        "them is root-equivalent."))

    pyz = running_pyz()
    if pyz is not None:  # what `sudo bluegreen` and the backup job run: whoever can replace it runs code as root
        checks.append(judge_writers(
            "program", str(pyz), _nodes(_chain(os.path.abspath(str(pyz)))), trusted, "root",
            "It runs as root under sudo and as the backup job's user: whoever can replace it is root-equivalent."))
    odd = find_odd_files([os.path.join(root, d) for d in ("projects", "nginx", "hooks")])
    checks.append(judge_odd_files(odd, f"{root}/{{projects,nginx,hooks}}"))
    try:
        docker = list(_group(grp.getgrnam("docker").gr_gid)[1])
    except KeyError:
        docker = None
    checks.append(judge_root_equivalent(root, owner, docker))
    return checks


def project_trust_checks(settings: Settings, project: str, cfg: ProjectConfig | None) -> list[Check]:
    """The project's env file (secrets, and what runs), its hooks, and LOG_DIR."""
    basis = trust_basis(settings)
    if basis is None:
        return []
    _, owner, trusted = basis
    checks = []
    env = lstat_node(str(settings.env_file(project)))
    if env.kind == "file":
        checks.append(judge_env_secrets(env, trusted, owner))
    hooks = str(settings.hooks_dir(project))
    if lstat_node(hooks).kind == "missing":
        checks.append(Check("hooks", OK, f"no hooks ({hooks} does not exist)"))
    else:
        checks.append(judge_writers(
            "hooks", f"hooks in {hooks}", _nodes([(os.path.dirname(hooks), False), (hooks, False)] + [(p, False) for p in _entries(hooks)]),
            trusted, owner,
            "Hooks run as the user that deploys (root under sudo): whoever can change them runs code as that user.",
            any_group=True))
        # The very rule a deploy applies before it runs a hook (a link, a FIFO, a foreign owner...).
        for hook_name in hooks_mod.HOOK_NAMES:
            path = hooks_mod.find(settings.hooks_dir(project), hook_name)
            problem = hooks_mod.check(path) if path is not None else None
            if problem:
                checks.append(Check("hooks", FAIL, f"{shown(problem)} A deploy refuses to run it.",
                                    "fix what it says (docs/security.md)"))
    if cfg is not None and cfg.log_dir:
        checks.append(judge_log_dir(lstat_node(cfg.log_dir), trusted, owner))
    return checks


def _unsafe(name: str, exc: BluegreenError) -> Check:
    """A state file the safe-file layer refused: a deploy would refuse it too."""
    return Check(name, FAIL, shown(exc.message.split(": bluegreen refuses", 1)[0]) + ": a deploy refuses to use it",
                 "if you did not put it there, remove it (`sudo rm PATH` removes a link, not its target; a deploy "
                 "writes the file again) and find out who can write its directory (docs/security.md)".replace(
                     "PATH", _q(getattr(exc, "path", "it"))))


def lock_check(settings: Settings, project: str) -> Check:
    """Is a deploy running now, and may this user take the lock and write the state files at all?"""
    lock = settings.lock_file(project)
    projects = lock.parent
    for path in (projects, settings.upstream_file(project).parent):
        if path.exists() and not os.access(str(path), os.W_OK):
            return Check("lock", FAIL, f"{path} is not writable by this user, so a deploy cannot record its state",
                         f"sudo chown -R $USER {settings.root} (or run `sudo {invocation()} setup --owner USER`)")
    if lock.exists() and not os.access(str(lock), os.W_OK):
        return Check("lock", FAIL, f"{lock} is not writable by this user", f"sudo chown $USER {lock}")
    freeze = read_freeze(settings.freeze_file(project))
    if freeze is not None:
        return Check("lock", FAIL, f"deploys of {project} are {freeze.describe()}",
                     f"when it is safe again: {invocation()} unlock {project}")
    try:
        holder = current_holder(lock, root=settings.root)
    except BluegreenError as exc:
        return _unsafe("lock", exc)
    if holder is not None:
        return Check("lock", FAIL, f"a deploy is running now: {holder.describe()}",
                     "wait for it to finish, or deploy with --wait SECONDS to queue behind it")
    return Check("lock", OK, "no deploy running")


def _clean(text: str) -> str:
    """Text for the terminal: line breaks kept, every other control character (a terminal escape in a lock
    holder's name, a planted file name, a command's output) shown escaped."""
    return "".join(ch if ch == "\n" or ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def ephemeral_and_foreign_checks(settings: Settings, cfg: ProjectConfig) -> list[Check]:
    """BLUE/GREEN_PORT inside the kernel's ephemeral range (an outgoing connection can hold them), and lines in the
    managed upstream file that bluegreen did not write (the next deploy drops them): both WARN, with the fix."""
    from bluegreen import ports
    from bluegreen.deploy import read_plan

    checks = []
    warning = ports.ephemeral_warning([("BLUE_PORT", cfg.blue_port), ("GREEN_PORT", cfg.green_port)],
                                      ports.ephemeral_range(), cfg.source)
    checks.append(Check("ports", WARN, shown(warning), "see the warning") if warning else
                  Check("ports", OK, "BLUE_PORT and GREEN_PORT are outside the kernel's ephemeral range"))
    path = settings.upstream_file(cfg.project)
    try:
        text = state.read_text(path, root=settings.root)
        plan, _ = read_plan(settings, cfg, "doctor")
    except BluegreenError:  # a planted upstream file: its own check says so
        return checks
    for line in ngx.foreign_warning(ngx.foreign_directives(text, plan.upstream_text()), str(path), cfg.source):
        checks.append(Check("upstream", WARN, shown(line), "use the setting it names; the next deploy rewrites the file"))
    return checks


def render(sections: list[tuple[str, list[Check]]]) -> list[str]:
    lines = []
    for title, checks in sections:
        lines.append(title)
        for c in checks:
            lines.append(f"  {c.status:<4}  {c.name:<15}{_clean(c.detail)}")
            if c.fix and c.status != OK:
                lines.append(f"  {'':<4}  {'':<15}fix: {_clean(c.fix)}")
    all_checks = [c for _, checks in sections for c in checks]
    fails = sum(c.status == FAIL for c in all_checks)
    warns = sum(c.status == WARN for c in all_checks)
    if fails:
        lines.append(f"{fails} problem(s) would make a deploy fail; {warns} warning(s).")
    else:
        lines.append(f"Ready to deploy: {len(all_checks)} checks, {warns} warning(s).")
    return lines


def as_json(sections: list[tuple[str, list[Check]]], *, frozen: str | None, locked: str | None) -> str:
    """doctor's findings for a program (a fleet rollout's preflight): every check, and whether the project is
    frozen or a deploy holds its lock (both: exit 3 for a rollout)."""
    return json.dumps({
        "fails": sum(c.status == FAIL for _, checks in sections for c in checks),
        "frozen": frozen,
        "locked": locked,
        "sections": [{"title": title, "checks": [{"name": c.name, "status": c.status, "detail": _clean(c.detail),
                                                   "fix": _clean(c.fix), **({"facts": {k: _clean(v) for k, v in c.facts.items()}}
                                                                            if c.facts else {})}
                                                  for c in checks]} for title, checks in sections],
    }, sort_keys=True)


def run_doctor(*, settings: Settings, runner: Runner, project: str | None, min_free_mb: int, environ: Mapping[str, str],
               stdout: TextIO, json_out: bool = False) -> int:
    min_free = min_free_mb * 2**20
    host, facts = host_checks(settings, runner, min_free=min_free)
    host += trust_checks(settings, facts)
    sections = [(f"host (root {settings.root}):", host)]
    if project is not None:
        validate_project(project)
        names = [project]
    else:
        names = settings.projects()
        if not names:
            host.append(Check("projects", WARN, f"no project in {settings.root / 'projects'} yet",
                              f"{invocation()} init PROJECT --image IMAGE"))
    for name in names:
        sections.append((f"project {name}:", project_checks(settings, runner, name, facts, min_free=min_free, environ=environ)))
    if json_out:
        frozen = locked = None
        if project is not None:
            freeze = read_freeze(settings.freeze_file(project))
            frozen = freeze.describe() if freeze is not None else None
            try:
                holder = current_holder(settings.lock_file(project), root=settings.root)
            except BluegreenError as exc:
                holder, locked = None, exc.message
            locked = holder.describe() if holder is not None else locked
        print(as_json(sections, frozen=frozen, locked=locked), file=stdout)
    else:
        for line in render(sections):
            print(line, file=stdout)
    return verdict([c for _, checks in sections for c in checks])
