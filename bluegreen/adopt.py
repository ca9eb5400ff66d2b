"""`bluegreen adopt`: take over, in place, a host the guide's `deploy.sh` set up (its env file, a hand-written
upstream file and server block, a running container without bluegreen's labels) without moving traffic.

Deciding is pure (`plan_adopt`, `server_edits`); `adopt_project` reads the host, applies the plan with an undo
for every file, checks `nginx -t`, reloads, and checks through nginx that it still routes where it did."""

from __future__ import annotations

import fnmatch
import os
import re
import socket
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, TextIO

from bluegreen import docker as dk
from bluegreen import health, host, nginxconf, safefs, state
from bluegreen import nginx as ngx
from bluegreen import settings as table
from bluegreen.config import COLOURS, ProjectConfig, Settings, load_project, parse_env, validate_project
from bluegreen.errors import BluegreenError, CommandError, DeployFailed, Interrupted, NeedsAttention, UsageError, os_problem
from bluegreen.lock import Holder, project_lock
from bluegreen.runner import Runner, indent, proc_stat

BACKUP_DIR = "adopt-backup"  # ROOT/adopt-backup/PROJECT/: the upstream file and server block before the first adoption
ADDED_HEAD = "# --- added by `bluegreen adopt`: the settings this file did not mention, at their defaults"
KEEPALIVE_LINES = ("proxy_http_version 1.1;", 'proxy_set_header Connection "";')
VERIFY_SECONDS = 5.0  # how long the probe through nginx waits for the reloaded workers to answer with the route


# -- pure: what changes -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Change:
    """One file adopt writes: its path, the text before (None: new) and after, and why."""

    path: Path
    before: str | None
    after: str
    what: str
    root: Path | None  # the deploy root for files below it (safefs never follows links there); None: nginx's own
    mode: int = 0o644
    owner: tuple[int, int] | None = None  # kept as it was: a file the deploy user owns stays theirs under sudo
    backup: str = ""  # name in ROOT/adopt-backup/PROJECT/ for the original, "" for none


@dataclass
class Plan:
    changes: list[Change] = field(default_factory=list)
    ok: list[str] = field(default_factory=list)  # what already is as bluegreen wants it
    manual: list[str] = field(default_factory=list)  # what adopt leaves to the user, with the line to add
    needs_force: list[str] = field(default_factory=list)  # server-block edits made only with --force
    warnings: list[str] = field(default_factory=list)


def mentioned_keys(text: str) -> set[str]:
    """Keys an env file sets, or names in a commented `#KEY=...` line (so an added default is not added twice)."""
    found = {e.key for e in parse_env(text, "env")}
    found |= set(re.findall(r"^[ \t]*#[ \t]*([A-Z][A-Z0-9_]*)=", text, re.MULTILINE))
    return found


def env_additions(text: str, *, set_values: Mapping[str, str]) -> tuple[str, list[str]]:
    """What adopt appends to an env file, and the keys it adds commented: `set_values` as KEY=VALUE (for the
    probe through nginx to reach the user's server block), then every bluegreen setting the file does not
    mention, commented out at its default, with its doc (as the env template has them)."""
    present = mentioned_keys(text)
    lines: list[str] = []
    for key, value in set_values.items():
        if key not in present:
            lines += ["# From the server block adopt found, so that bluegreen's probe through nginx reaches it:",
                      f"{key}={value}"]
    missing = [s for s in table.TABLE if s.key not in present and s.key not in set_values]
    for setting in missing:
        lines += table.setting_lines(setting, filled=False)
    if not lines:
        return "", []
    head = [ADDED_HEAD + " (uncomment to change); your own lines above are unchanged."]
    return ("" if text.endswith("\n") or not text else "\n") + "\n" + "\n".join(head + lines) + "\n", [s.key for s in missing]


@dataclass(frozen=True)
class Insert:
    offset: int
    line: str
    indent: str


class NginxFiles:
    """The files of `nginx -T`, parsed, with the includes resolved against them (bounded), to tell which level
    of a server block really sets `add_header` or `proxy_set_header` (nginx inherits those only into a level
    that sets none of its own)."""

    def __init__(self, dump: str, conf_dir: str = "/etc/nginx") -> None:
        self.files: dict[str, nginxconf.Directive] = {}
        self.texts: dict[str, str] = {}
        parts = split_dump(dump)
        for path, text in parts:
            try:
                self.files[path] = nginxconf.parse(text)
                self.texts[path] = text
            except nginxconf.ConfSyntax:
                continue  # nginx loaded it, so it is valid; a file this reader cannot follow is skipped
        self.main = parts[0][0] if parts else ""  # nginx.conf, even when this reader could not follow it
        self.conf_dir = os.path.dirname(self.main) or conf_dir

    def included(self, node: nginxconf.Directive) -> list[nginxconf.Directive]:
        """The top-level directives of the files an `include` directive loads."""
        if node.name != "include" or len(node.args) != 1:
            return []
        pattern = node.args[0] if os.path.isabs(node.args[0]) else os.path.join(self.conf_dir, node.args[0])
        out: list[nginxconf.Directive] = []
        for path, root in self.files.items():
            if fnmatch.fnmatchcase(path, pattern) and path.count("/") == pattern.count("/"):  # `*` stops at `/`
                out.extend(root.children)
        return out

    def sets(self, level: nginxconf.Directive, name: str, first: str | None = None) -> list[nginxconf.Directive]:
        """The children of `level` that set `name` (with `first` as its first argument, any case, if given): the
        directive itself, or an include that brings it."""
        return [c for c in level.children
                if _is(c, name, first) or (c.name == "include" and self._brings(c, name, first, 0))]

    def _brings(self, include: nginxconf.Directive, name: str, first: str | None, depth: int) -> bool:
        return depth < 8 and any(_is(d, name, first) or (d.name == "include" and self._brings(d, name, first, depth + 1))
                                 for d in self.included(include))

    def http_sets(self, name: str, first: str | None = None) -> bool:
        """Whether nginx.conf's http block itself sets `name` (outside every server block)."""
        root = self.files.get(self.main)
        if root is None:
            return first is None  # unknown: as if it did (adopt then leaves the line to the user)
        return any(self.sets(block, name, first) for block in root.children if block.name == "http")

    def proxying(self, upstream: str, *, in_server: bool = True) -> list[str]:
        """The files with a server block whose proxy_pass names `upstream` (`in_server` False: the files with
        such a proxy_pass outside any server block, in a snippet that a server block includes)."""
        return [path for path, root in self.files.items() if any(
            nginxconf.proxies_to(d, upstream) and (_server_of(d) is not None) == in_server for d in root.walk())]


def _is(node: nginxconf.Directive, name: str, first: str | None = None) -> bool:
    return node.name == name and (first is None or (bool(node.args) and node.args[0].lower() == first.lower()))


def split_dump(dump: str) -> list[tuple[str, str]]:
    """`nginx -T` output as (path, text) per file, in nginx's order (nginx.conf first)."""
    parts = re.split(r"^# configuration file (.+):\n", dump, flags=re.MULTILINE)
    return [(parts[i].strip(), parts[i + 1]) for i in range(1, len(parts) - 1, 2)]


def _server_of(node: nginxconf.Directive) -> nginxconf.Directive | None:
    return next((n for n in node.chain()[1:] if n.name == "server" and n.is_block), None)


def _levels(proxy_pass: nginxconf.Directive) -> list[nginxconf.Directive]:
    """The blocks from the one holding `proxy_pass` out to its server block, innermost first."""
    out = []
    for node in proxy_pass.chain()[1:]:
        out.append(node)
        if node.name == "server":
            break
    return out


def _after_block_open(text: str, block: nginxconf.Directive) -> Insert:
    first = block.children[0] if block.children else None
    pad = nginxconf.line_indent(text, first.start) if first else nginxconf.line_indent(text, block.start) + "    "
    return Insert(block.body, "", pad)


def _after(text: str, node: nginxconf.Directive) -> Insert:
    return Insert(node.end, "", nginxconf.line_indent(text, node.start))


# Blocks inside a location that take proxy_pass but not proxy_http_version or proxy_set_header (nginx refuses
# those there); they inherit both from the location around them.
_NOT_PROXY_LEVELS = ("if", "limit_except")


def _home(pp: nginxconf.Directive, levels: list[nginxconf.Directive]) -> tuple[nginxconf.Directive, nginxconf.Directive]:
    """The innermost level where proxy_* lines may go (the location, past `if` and `limit_except`), and its
    child that holds the proxy_pass (the proxy_pass itself, or the `if` around it)."""
    inner = pp
    for level in levels:
        if level.name not in _NOT_PROXY_LEVELS:
            return level, inner
        inner = level
    return levels[-1], inner


def server_edits(text: str, *, upstream: str, project: str, conf: NginxFiles) -> tuple[list[Insert], list[str]]:
    """Lines to insert into a server-block file so that bluegreen can prove the route (the add_header line) and
    nginx keeps connections to the app alive (HTTP/1.1, an empty Connection header); and, for what cannot be
    inserted without changing which headers nginx sends, the line to add by hand. Nothing else is touched."""
    root = nginxconf.parse(text)
    route = ngx.add_header_line(project)
    inserts: dict[tuple[int, str], Insert] = {}
    manual: list[str] = []
    memo: dict[tuple, object] = {}  # per level (alive as long as `root`): a file with thousands of locations

    def sets(level: nginxconf.Directive, name: str, first: str | None = None) -> list[nginxconf.Directive]:
        key = (id(level), name, first)
        if key not in memo:
            memo[key] = conf.sets(level, name, first)
        return memo[key]  # type: ignore[return-value]

    def has_route(levels: list[nginxconf.Directive]) -> bool:
        """Whether the route line is in effect there: in the innermost level that sets add_header lines (nginx
        inherits them only into a level without its own), or in the http block when no level sets any."""
        for level in levels:
            if sets(level, "add_header"):
                return bool(sets(level, "add_header", ngx.ROUTE_HEADER))
        return conf.http_sets("add_header", ngx.ROUTE_HEADER)

    def place(spot: Insert, line: str) -> None:
        inserts.setdefault((spot.offset, line), Insert(spot.offset, line, spot.indent))

    http_sets = {name: conf.http_sets(name) for name in ("add_header", "proxy_set_header", "proxy_http_version")}
    for pp in (d for d in root.walk() if nginxconf.proxies_to(d, upstream)):
        levels = _levels(pp)
        server = levels[-1] if levels and levels[-1].name == "server" else None
        if server is None:
            continue
        home, anchor = _home(pp, levels)
        at_line = lambda: text.count("\n", 0, pp.start) + 1  # noqa: E731  (only for a line to add by hand)
        if not has_route(levels):
            spot = _level_for(text, levels, "add_header", sets, http_sets["add_header"], default=server)
            if spot is None:
                manual.append(f"add `{route}` next to the add_header lines that apply to line {at_line()} (nginx.conf's "
                              f"http block sets add_header, and a new one in the server block would stop those)")
            else:
                place(spot, route)
        if not any(sets(level, "proxy_http_version") for level in levels) and not http_sets["proxy_http_version"]:
            place(_after(text, anchor), KEEPALIVE_LINES[0])
        if not any(sets(level, "proxy_set_header", "connection") for level in levels):
            spot = _level_for(text, levels, "proxy_set_header", sets, http_sets["proxy_set_header"], default=home,
                              after_node=anchor)
            if spot is None:
                manual.append(f"add `{KEEPALIVE_LINES[1]}` next to the proxy_set_header lines that apply to line "
                              f"{at_line()} (upstream keep-alive needs it; a new one where none are set would stop "
                              f"the inherited ones)")
            else:
                place(spot, KEEPALIVE_LINES[1])
    return sorted(inserts.values(), key=lambda i: i.offset), manual


def _level_for(text: str, levels: list[nginxconf.Directive], name: str, sets: Callable[..., list], http_sets: bool, *,
               default: nginxconf.Directive | None, after_node: nginxconf.Directive | None = None) -> Insert | None:
    """Where a new `name` line goes without changing what nginx inherits: beside the innermost level's own
    `name` lines; else at `default` when no level and not the http block sets any (None: by hand)."""
    for level in levels:
        found = sets(level, name)
        if found:
            return _after(text, found[-1])
    if http_sets or default is None:
        return None
    if after_node is not None and after_node.parent is default:
        return _after(text, after_node)
    return _after_block_open(text, default)


def apply_inserts(text: str, inserts: list[Insert]) -> str:
    """`text` with each line inserted; every character of `text` stays, in order. After the end of a directive
    or a `{` that ends its line (a comment may follow), the line goes on a line of its own below, with the
    file's line ending; where more follows on the same line (a one-line block), it goes there, after a space.
    Lines at one spot keep the order given."""
    pieces: list[tuple[int, int, str]] = []
    for n, ins in enumerate(inserts):
        eol = text.find("\n", ins.offset)
        rest = text[ins.offset:len(text) if eol < 0 else eol]
        if rest.strip(" \t\r") and not rest.lstrip(" \t").startswith("#"):
            pieces.append((ins.offset, n, " " + ins.line))
        elif eol < 0:
            pieces.append((len(text), n, "\n" + ins.indent + ins.line))
        else:
            pieces.append((eol + 1, n, ins.indent + ins.line + ("\r\n" if rest.endswith("\r") else "\n")))
    out, at = [], 0
    for offset, _, piece in sorted(pieces):
        out += [text[at:offset], piece]
        at = offset
    return "".join(out) + text[at:]


def listen_url(server: nginxconf.Directive) -> str | None:
    """The NGINX_URL that reaches a server block from this host: its first plain-HTTP `listen`."""
    for d in server.children:
        if d.name != "listen" or not d.args or any(a in ("ssl", "quic", "http2") for a in d.args[1:]):
            continue
        match = re.fullmatch(r"(?:(\*|[0-9.]+|\[[0-9a-fA-F:]+\]|localhost):)?([0-9]{1,5})", d.args[0])
        if not match or not 0 < int(match.group(2)) < 65536:
            continue
        addr = match.group(1)
        hostpart = "127.0.0.1" if addr in (None, "*", "0.0.0.0", "[::]", "localhost") else addr
        return f"http://{hostpart}:{int(match.group(2))}"
    return None


def probe_name(server: nginxconf.Directive) -> str:
    """The Host that reaches a server block: its first plain `server_name` ("" for `_`, wildcards, regexes)."""
    for d in server.children:
        if d.name == "server_name":
            for name in d.args:
                if re.fullmatch(table.HOST, name) and name != "_":
                    return name
    return ""


def probe_settings(text: str, upstream: str, cfg: ProjectConfig) -> dict[str, str]:
    """NGINX_URL and SERVER_NAME for the env file when the user's server block needs other values than now."""
    root = nginxconf.parse(text)
    servers = [d for d in root.walk() if d.name == "server" and d.is_block
               and any(nginxconf.proxies_to(x, upstream) for x in d.walk())]
    for server in servers:
        url = listen_url(server)
        if url is None:
            continue
        out = {}
        if url != cfg.nginx_url:
            out["NGINX_URL"] = url
        name = probe_name(server)
        if name and name != cfg.server_name:
            out["SERVER_NAME"] = name
        return out
    return {}


def upstream_change(cfg: ProjectConfig, path: Path, text: str | None, containers: Mapping[str, dk.Container],
                    root: Path, owner: tuple[int, int] | None = None) -> tuple[Change | None, str]:
    """The managed file replacing a hand-written one (same name, same port), or None with why it stays."""
    if text is None:
        raise UsageError(
            f"{path} does not exist, so this host has no upstream for {cfg.project} to adopt: nothing was changed. A "
            f"new project is set up with `{host.invocation()} init {cfg.project} --image {cfg.image}`."
        )
    found = ngx.parse_upstream(text)
    if found is None:
        raise UsageError(
            f"{path} has no `upstream NAME {{ server 127.0.0.1:PORT; }}` that bluegreen can read, so adopt cannot "
            f"tell where nginx routes {cfg.project}; nothing was changed. Write it as the guide does (one server line "
            f"pointing at BLUE_PORT or GREEN_PORT), then run adopt again."
        )
    if not found.name.isprintable():  # bytes that are not UTF-8, control characters: nothing to show or write
        raise UsageError(
            f"{path}: the upstream's name is not plain text (bytes that are not UTF-8, or control characters), so "
            f"adopt cannot show or rewrite it; nothing was changed. Rename the upstream (and its proxy_pass) in "
            f"letters, digits, '-', '_' and '.', then run adopt again."
        )
    if text.startswith("# Managed by bluegreen") and found.token:
        return None, f"{path} is bluegreen's managed file already (upstream {found.name})"
    colour = cfg.colour_of_port(found.port) if found.port else "-"
    if colour is None:
        raise UsageError(
            f"{path} routes upstream {found.name} to 127.0.0.1:{found.port}, which is neither BLUE_PORT "
            f"({cfg.blue_port}) nor GREEN_PORT ({cfg.green_port}) in {cfg.source}; nothing was changed. Set the port "
            f"nginx routes to as BLUE_PORT or GREEN_PORT in the env file, then run adopt again."
        )
    serving = containers.get(dk.container_name(cfg.project, colour)) if colour != "-" else None
    after = ngx.render_upstream(
        name=found.name, port=found.port or cfg.blue_port, project=cfg.project, colour=colour,
        tag=(serving.tag_in(cfg.image) if serving is not None else None) or "-", token=found.token or ngx.new_token(), down=not found.port,
        options=ngx.UpstreamOptions(**table.upstream_options(cfg)))
    dropped = dropped_lines(text, after, found)
    if dropped:
        shown = "; ".join(f"`{line}`" + (f" (set {ngx.setting_for(line)} in {cfg.source})" if ngx.setting_for(line) else "")
                          for line in dropped[:6]) + ("; ..." if len(dropped) > 6 else "")
        raise UsageError(
            f"{path} holds more than bluegreen's managed upstream file, which replaces it, would keep: {shown}. "
            f"Nothing was changed. Set the settings named in the env file; move anything else (a server block, "
            f"another upstream) to a file of its own next to it; then run adopt again."
        )
    where = f"127.0.0.1:{found.port}" if found.port else "nowhere (down)"
    return (Change(path, text, after, f"upstream {found.name} as bluegreen's managed file, still routing to {where}, "
                                      f"with the route map and keepalive", root, owner=owner, backup="upstream.conf"), "")


def dropped_lines(text: str, after: str, found: ngx.Upstream) -> list[str]:
    """The directives of a hand-written upstream file that the managed file `after` would not have (comments
    aside; the server line's address is the managed one by design, only its port and parameters count): a
    second upstream, a server block, `keepalive 32;` where the settings give 16."""
    try:
        old, new = nginxconf.parse(text), nginxconf.parse(after)
    except nginxconf.ConfSyntax as exc:
        return [f"text adopt cannot read ({exc})"]

    def key(d: nginxconf.Directive) -> str:
        if d.name == "server" and not d.is_block and d.args and d.parent is not None and d.parent.name == "upstream":
            port = "down" if "down" in d.args[1:] else d.args[0].rpartition(":")[2]  # a placeholder: no port
            return " ".join(["server", port, *(a for a in d.args[1:] if a != "down")])
        return " ".join([d.name, *d.args]) + (" {" if d.is_block else "")

    def shown(d: nginxconf.Directive) -> str:
        line = " ".join([d.name, *d.args]) + (" { ... }" if d.is_block else ";")
        return "".join(c if c.isprintable() else "?" for c in line[:200])  # the deploy user's file, on a terminal

    ours = {key(d) for d in new.walk()}
    out = []
    for block in old.children:
        if block.name != "upstream" or block.args != [found.name]:
            out.append(shown(block))
            continue
        servers = [d for d in block.children if d.name == "server"]
        out += [shown(d) for d in block.children if key(d) not in ours or (d.name == "server" and d is not servers[0])]
    return out


# -- doing ----------------------------------------------------------------------------------------------------

@dataclass
class Facts:
    cfg: ProjectConfig
    env_path: Path
    env_text: str
    env_mode: int
    env_owner: tuple[int, int] | None
    upstream_owner: tuple[int, int] | None
    upstream_path: Path
    upstream_text: str | None
    containers: dict
    dump: str
    server_files: dict  # path -> text on disk, for each file with a server block proxying to the upstream
    server_modes: dict = field(default_factory=dict)  # path -> (mode, owner) of that file
    server_targets: dict = field(default_factory=dict)  # path -> (the file to write, the deploy root it is under or None)
    master: int = 0  # the nginx master's pid
    mtimes: dict = field(default_factory=dict)  # path -> st_mtime of the upstream file and each server file
    unread: dict = field(default_factory=dict)  # path -> why a file nginx -T lists as proxying is left alone


def read_facts(settings: Settings, runner: Runner, project: str, dump: str | None = None) -> Facts:
    """Everything adopt decides from (`dump`: `nginx -T` output the caller already has)."""
    cfg = load_project(settings, project)
    env_path = settings.env_file(project)
    env_text = safefs.read_bytes(env_path, root=settings.root).decode("utf-8", "surrogateescape")
    st = safefs.lstat(env_path, root=settings.root)
    upstream_path = settings.upstream_file(project)
    ust = safefs.lstat(upstream_path, root=settings.root)
    # Bytes as they are (not U+FFFD for what is not UTF-8): the backup and the undo write them back unchanged.
    raw = safefs.read_bytes(upstream_path, root=settings.root, max_bytes=state.MAX_STATE_BYTES)
    upstream_text = None if raw is None else raw.decode("utf-8", "surrogateescape")
    docker = dk.Docker(runner, settings.docker_cmd)
    try:
        containers = docker.inspect_many([dk.container_name(project, c) for c in COLOURS])
    except CommandError as exc:
        raise DeployFailed(f"Cannot ask docker about {project}'s containers: {exc.output_tail(3)}\nNothing was "
                           f"changed. Check that dockerd runs and this user may use it (`docker info`).") from exc
    nginx = ngx.Nginx(runner, settings.nginx_cmd)
    try:
        dump = nginx.test_and_dump() if dump is None else dump
    except CommandError as exc:
        raise UsageError(f"nginx rejects its configuration as it is now (`nginx -T`):\n{indent(ngx.Nginx.error_text(exc))}\n"
                         f"Nothing was changed. Fix that first (it names file and line), then run adopt.") from exc
    master, pid_file = ngx.master_pid(dump, settings.nginx_cmd, settings.nginx_pid_file)
    if master is None:
        raise DeployFailed(f"nginx is not running (no live master process in {pid_file}); adopt reloads nginx and "
                           f"checks through it that nothing moved. Nothing was changed. Start nginx (`systemctl start "
                           f"nginx`), then run adopt again.")
    upstream = ngx.parse_upstream(upstream_text)
    files: dict[str, str] = {}
    modes: dict[str, tuple] = {}
    targets: dict[str, tuple] = {}
    mtimes = {str(upstream_path): ust.st_mtime} if ust is not None else {}
    unread: dict[str, str] = {}
    shown: dict[str, set] = {}  # what nginx -T printed for each path (a file below the root can forge a header)
    for path, chunk in split_dump(dump):
        shown.setdefault(path, set()).add(chunk)
    if upstream is not None:
        for path in NginxFiles(dump).proxying(upstream.name):
            target, under = server_file_target(path, settings.root)
            if under is not None:  # below the deploy root: every byte there is untrusted, no link followed
                data = safefs.read_bytes(target, root=under, max_bytes=host.MAX_CONFIG_BYTES)
                text = None if data is None else data.decode("utf-8", "surrogateescape")
                sst = safefs.lstat(target, root=under)
            else:
                text = host.read_config_file(Path(path))
                sst = os.stat(path) if text is not None else None  # not `st`: that is the env file's
            if text is not None and shown.get(path) != {_as_dumped(text)}:
                unread[path] = ("what nginx -T showed of it differs from the file on disk (it changed while adopt "
                                "read it, or another file's text imitates nginx -T's file headers): left as it is; "
                                "run adopt again")
            elif text is not None and sst is not None:
                files[path] = text
                modes[path] = (sst.st_mode & 0o777, _owner(sst))
                targets[path] = (target, under)
                mtimes[path] = sst.st_mtime
    return Facts(cfg, env_path, env_text, (st.st_mode & 0o777) if st else 0o640, _owner(st), _owner(ust),
                 upstream_path, upstream_text, containers, dump, files, modes, targets, master, mtimes, unread)


def _as_dumped(text: str) -> str:
    """A file's text as `nginx -T` prints it (and the runner decodes it): with one more line feed."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace") + "\n"


def server_file_target(path: str, root: Path) -> tuple[Path, Path | None]:
    """The file to edit for a server-block file nginx names, and the deploy root (as given, or resolved) when it
    lies below it. Outside the root (root's own directories), a symlink such as Debian's sites-enabled/X ->
    sites-available/X is followed and stays a link; below the root nothing is followed: the name nginx uses
    must itself be the file, and safefs refuses anything else."""
    tops = [Path(os.path.abspath(root)), Path(os.path.realpath(root))]
    for candidate in (Path(os.path.abspath(path)), Path(os.path.realpath(path))):
        for top in tops:
            if top in candidate.parents:
                return candidate, top
    return Path(os.path.realpath(path)), None


LOAD_SLACK = 1.0  # seconds: a file written just before the reload that started the workers is not "changed since"


def loaded_at(master: int, proc: str = "/proc") -> float | None:
    """When nginx last loaded its configuration (epoch seconds): when its newest worker started, since a reload
    starts new workers; None when that cannot be told (no workers seen, no /proc)."""
    try:
        hz = os.sysconf("SC_CLK_TCK")
        since_boot = time.clock_gettime(time.CLOCK_BOOTTIME)  # what /proc/PID/stat's start time counts from
    except (ValueError, OSError, AttributeError):
        return None
    now = time.time()
    starts = []
    for pid in ngx.children(master, Path(proc)) if master > 0 else ():
        fields = proc_stat(pid, proc)
        if fields is not None and len(fields) > 19 and fields[19].isdigit():
            starts.append(now - (since_boot - int(fields[19]) / hz))
    return max(starts) if starts else None


def changed_since_load(facts: Facts, proc: str = "/proc") -> str:
    """A paragraph naming the files adopt reads and rewrites that changed after nginx last loaded them ("" when
    none did, or when that cannot be told): nginx routes by what it loaded, and adopt's reload would put the
    change live."""
    loaded = loaded_at(facts.master, proc)
    if loaded is None:
        return ""
    changed = [path for path, mtime in facts.mtimes.items() if mtime > loaded + LOAD_SLACK]
    if not changed:
        return ""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(loaded))
    return (f"{', '.join(changed)} changed after nginx last loaded its configuration ({when}): nginx routes by "
            f"what it loaded, so adopt cannot take the port from the file, and its reload would put the change "
            f"live. Nothing was changed. If the change is meant to be live, check and load it (`sudo nginx -t && "
            f"sudo nginx -s reload`); otherwise undo it. Then run adopt again.")


def _owner(st: os.stat_result | None) -> tuple[int, int] | None:
    return (st.st_uid, st.st_gid) if st is not None and os.geteuid() == 0 else None


def plan_adopt(facts: Facts, settings: Settings, *, force: bool) -> Plan:
    """Every change adopt would make on this host, and what it leaves alone (pure over the facts)."""
    cfg, plan = facts.cfg, Plan()
    upstream_new, why = upstream_change(cfg, facts.upstream_path, facts.upstream_text, facts.containers, settings.root,
                                        facts.upstream_owner)
    if upstream_new is None:
        plan.ok.append(why)
    else:
        plan.changes.append(upstream_new)
    name = ngx.parse_upstream(facts.upstream_text).name  # type: ignore[union-attr]  # upstream_change checked it
    conf = NginxFiles(facts.dump)
    probe: dict[str, str] = {}
    plan.manual.extend(f"{path}: {why}" for path, why in sorted(facts.unread.items()))
    snippets = [path for path in conf.proxying(name, in_server=False) if path not in facts.server_files]
    plan.manual.extend(f"{path}: its proxy_pass to {name} is outside a server block (a file a server block includes), "
                       f"so adopt leaves it alone: add `{ngx.add_header_line(cfg.project)}`, "
                       f"`{KEEPALIVE_LINES[0]}` and `{KEEPALIVE_LINES[1]}` by hand where they apply to it"
                       for path in snippets)
    if not facts.server_files and not facts.unread and not snippets:
        plan.manual.append(f"no server block that nginx loads proxies to upstream {name}: write one (e.g. "
                           f"`{host.invocation()} init {cfg.project} --image {cfg.image}` on a host without one), "
                           f"with `{ngx.add_header_line(cfg.project)}`")
    for path, text in sorted(facts.server_files.items()):
        try:
            inserts, manual = server_edits(text, upstream=name, project=cfg.project, conf=conf)
            probe = probe or probe_settings(text, name, cfg)
        except nginxconf.ConfSyntax as exc:
            plan.manual.append(f"{path}: adopt cannot read it ({exc}); add `{ngx.add_header_line(cfg.project)}` to "
                               f"its server block by hand")
            continue
        plan.manual.extend(f"{path}: {line}" for line in manual)
        if not inserts:
            plan.ok.append(f"{path} has the route line and keep-alive to the app")
            continue
        added = ", ".join(f"`{i.line}`" for i in inserts)
        if force:
            real, under = facts.server_targets.get(path, (Path(os.path.realpath(path)), None))
            mode, owner = facts.server_modes.get(path, (0o644, None))
            backup = "server-" + os.path.basename(path)
            while any(c.backup == backup for c in plan.changes):  # two blocks named alike in two directories
                backup = "server-" + str(len(plan.changes)) + "-" + os.path.basename(path)
            plan.changes.append(Change(real, text, apply_inserts(text, inserts),
                                       f"{path}: add {added} (nothing else in it changes)", under,
                                       mode=mode, owner=owner, backup=backup))
        else:
            plan.needs_force.append(f"{path}: add {added} (nothing else in it changes); without the route line "
                                    f"deploys work but cannot prove where nginx routes")
    probe = {k: v for k, v in probe.items() if k not in mentioned_keys(facts.env_text)}
    addition, commented = env_additions(facts.env_text, set_values=probe)
    foreign = [c for c in facts.containers.values() if c.running and not c.managed]
    if upstream_new is None and not foreign:
        # bluegreen's project already (init wrote it, or it was adopted and deployed since): its env file is
        # the user's as it is; only a server block without the route line is still worth a --force.
        plan.ok.append(f"{cfg.project} is bluegreen's already: its env file stays as it is")
    elif addition:
        set_now = f"sets {', '.join(f'{k}={v}' for k, v in probe.items())}; " if probe else ""
        plan.changes.append(Change(facts.env_path, facts.env_text, facts.env_text + addition,
                                   f"{facts.env_path.name}: {set_now}adds {len(commented)} setting(s) it did not "
                                   f"mention, commented out at their defaults; every line it had stays as it was",
                                   # No copy of the env file: it holds the app's secrets, and adopt only appends
                                   # below the user's lines (deleting the added block gives the original back).
                                   settings.root, mode=facts.env_mode, owner=facts.env_owner))
    else:
        plan.ok.append(f"{facts.env_path.name} mentions every setting")
    for colour in COLOURS:
        found = facts.containers.get(dk.container_name(cfg.project, colour))
        if found is not None and found.running and not found.managed:
            plan.warnings.append(
                f"{found.name} ({found.image}) was not started by bluegreen; it keeps running, and the next deploy "
                f"starts its replacement and retires it as usual")
            exposed = dk.exposed_note(found)
            if exposed:
                plan.warnings.append(exposed.rstrip("."))
    return plan


def pending(settings: Settings, runner: Runner, project: str, dump: str | None = None) -> list[str] | None:
    """What `adopt --force` would change here, for doctor; None when the project is bluegreen's already
    (a managed upstream file and no running container bluegreen did not start)."""
    facts = read_facts(settings, runner, project, dump)
    upstream = ngx.parse_upstream(facts.upstream_text)
    foreign = [c for c in facts.containers.values() if c.running and not c.managed]
    if upstream is not None and upstream.token and not foreign:
        return None
    plan = plan_adopt(facts, settings, force=True)
    exposed = [note for note in (dk.exposed_note(c) for c in foreign) if note]
    return [c.what for c in plan.changes] + [f"by hand: {line}" for line in plan.manual] + exposed


def adopt_project(*, settings: Settings, runner: Runner, project: str, force: bool, dry_run: bool,
                  environ: Mapping[str, str], stdout: TextIO, stderr: TextIO,
                  probe: Callable[..., health.Probe] = health.http_probe) -> int:
    """Adopt one project; prints each change (or what would change), then checks nginx and what it routes."""
    validate_project(project)
    if safefs.lstat(settings.env_file(project), root=settings.root) is None:  # a dangling link is there: load says what
        raise UsageError(f"{settings.env_file(project)} does not exist: adopt takes over a project the guide's "
                         f"deploy.sh runs, from its env file. Nothing was changed. A new project is set up with "
                         f"`{host.invocation()} init {project} --image IMAGE`.")
    holder = Holder(pid=os.getpid(), user=environ.get("SUDO_USER") or environ.get("USER") or "?",
                    host=socket.gethostname(), tag="(adopt)", since=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    with project_lock(settings.lock_file(project), holder, root=settings.root, retry="then run adopt again"):
        facts = read_facts(settings, runner, project)
        stale = changed_since_load(facts)
        if stale and not dry_run:
            raise UsageError(stale)
        plan = plan_adopt(facts, settings, force=force)
        if stale:
            print(f"warning: {stale}", file=stderr)
        for line in plan.warnings:
            print(f"warning: {line}.", file=stderr)
        head = "Dry run: adopt would" if dry_run else "Adopt"
        print(f"{head} {project} (upstream {facts.upstream_path}):", file=stdout)
        for line in plan.ok:
            print(f"  ok       {line}", file=stdout)
        for line in plan.manual:
            print(f"  by hand  {line}", file=stdout)
        for line in plan.needs_force:
            print(f"  --force  {line}", file=stdout)
        if not plan.changes:
            print(f"Nothing to change: {project} is adopted already." if not (plan.manual or plan.needs_force) else
                  f"Nothing to change{'; rerun with --force for the lines marked --force' if plan.needs_force else ''}"
                  f"{'; the lines marked `by hand` are yours to do' if plan.manual else ''}.", file=stdout)
            return 0
        if dry_run:
            for change in plan.changes:
                print(f"  would    {change.what}", file=stdout)
            print(f"Dry run: {len(plan.changes)} change(s) listed, nothing was changed.", file=stdout)
            return 0
        _apply(settings, runner, facts, plan)
        for change in plan.changes:
            print(f"  changed  {change.what}", file=stdout)
        print(_verify(facts, settings, probe), file=stdout)
    me = host.invocation()
    retires = " (it retires the container deploy.sh started)" if plan.warnings else ""
    copies = (f"; the originals are in {settings.root / BACKUP_DIR / project}" if any(c.backup for c in plan.changes)
              else "")  # the env file is never copied (its secrets): adopt only appended to it
    print(f"Done: {len(plan.changes)} change(s){copies}. Next: "
          f"`{me} status {project}`, then `{me} deploy {project} TAG`{retires}.", file=stdout)
    return 0


def _apply(settings: Settings, runner: Runner, facts: Facts, plan: Plan) -> None:
    """Write every change (each with its undo registered first), `nginx -t`, reload; all put back on failure."""
    backup_dir = settings.root / BACKUP_DIR / facts.cfg.project
    undo: list[tuple[Path, Callable[[], None]]] = []  # (the file, how to put it back)
    nginx = ngx.Nginx(runner, settings.nginx_cmd)
    reloading = False
    fresh = set()  # the copies to write: a copy kept from an earlier adoption is the first original, kept as it is
    for change in plan.changes:
        if change.backup:
            # Before anything is written: a link planted on the way, or in place of a copy, is refused (exit 2).
            found = safefs.lstat(backup_dir / change.backup, root=settings.root)
            if found is None:
                fresh.add(change.backup)
            elif not stat.S_ISREG(found.st_mode):
                raise safefs.UnsafePath(backup_dir / change.backup, safefs.describe_stat(found))
    try:
        for change in plan.changes:
            if change.backup in fresh:
                target = backup_dir / change.backup
                undo.append((target, lambda t=target: safefs.unlink(t, root=settings.root)))
                safefs.atomic_write(target, (change.before or "").encode("utf-8", "surrogateescape"),
                                    root=settings.root, mode=0o600, make_dirs=True)
            undo.append((change.path, lambda c=change: _restore(c)))
            safefs.atomic_write(change.path, change.after.encode("utf-8", "surrogateescape"), root=change.root,
                                mode=change.mode, owner=change.owner)
        nginx.test()
        reloading = True
        nginx.reload()
    except BaseException as exc:
        problems = []
        for path, step in reversed(undo):
            try:
                step()
            except safefs.UnsafePath as again:
                problems.append(again.message)
            except OSError as again:
                problems.append(f"{path}: {again.strerror or again}")
        put_back = ("Every file adopt had written was put back as it was" if not problems else
                    f"Putting the files back failed too ({'; '.join(problems)}): check them by hand")
        failed = NeedsAttention if problems else DeployFailed  # a file not put back: a human must look (exit 4)
        if isinstance(exc, (Interrupted, KeyboardInterrupt)):
            signame = exc.signame if isinstance(exc, Interrupted) else "SIGINT"
            if not reloading:
                nginx_now = "nginx was not reloaded and routes as before"
            elif problems:
                nginx_now = ("nginx may have loaded the adopted files when it was stopped; reload it once the files "
                             "are right (`sudo nginx -t && sudo nginx -s reload`)")
            else:
                # The reload's signal may have reached nginx already: load the files as they are again.
                try:
                    nginx.test()
                    nginx.reload()
                    nginx_now = ("nginx may have loaded the adopted files when it was stopped, so adopt reloaded "
                                 "nginx again with them")
                except BluegreenError as again:
                    nginx_now = (f"nginx may have loaded the adopted files when it was stopped, and reloading it "
                                 f"with the files put back failed ({again.message.splitlines()[0]}): run `sudo "
                                 f"nginx -t && sudo nginx -s reload`")
            raise failed(f"adopt was interrupted ({signame}) {'while nginx reloaded' if reloading else 'before nginx was reloaded'}. "
                        f"{put_back}; {nginx_now}. Run adopt again when it may run to the end.") from None
        if isinstance(exc, CommandError) and reloading:
            raise failed(f"nginx -t passed, but `nginx -s reload` failed:\n{indent(ngx.Nginx.error_text(exc))}\n"
                         f"{put_back}; nginx was not signalled, so it still runs the configuration it had. Check "
                         f"that nginx runs and its pid file (`systemctl status nginx`), then run adopt again.") from exc
        if isinstance(exc, CommandError):
            raise failed(f"nginx rejected the adopted configuration:\n{indent(ngx.Nginx.error_text(exc))}\n"
                         f"{put_back}; nginx was not reloaded and routes as before. Fix what nginx names, then "
                         f"run adopt again.") from exc
        if isinstance(exc, (OSError, safefs.UnsafePath)):
            what = exc.message if isinstance(exc, safefs.UnsafePath) else os_problem(exc)
            raise failed(f"adopt could not write its files: {what} {put_back}; nginx was not reloaded and routes as "
                         f"before. Fix the cause (the server block and the files nginx loads are root's: run adopt "
                         f"with sudo; or free disk space), then run adopt again.") from exc
        raise


def _restore(change: Change) -> None:
    if change.before is None:
        safefs.unlink(change.path, root=change.root)
        return
    before = change.before.encode("utf-8", "surrogateescape")
    try:
        now = safefs.read_bytes(change.path, root=change.root, max_bytes=host.MAX_CONFIG_BYTES)
    except (OSError, safefs.UnsafePath):
        now = None
    if now == before:
        return  # never written (its write failed, or the interrupt came first): nothing to put back
    safefs.atomic_write(change.path, before, root=change.root, mode=change.mode, owner=change.owner)


def _verify(facts: Facts, settings: Settings, probe: Callable[..., health.Probe]) -> str:
    """After the reload: does nginx still route where the upstream file said, seen through nginx?"""
    from bluegreen.deploy import observe_route  # the deploy's own proof, not a second one

    cfg = load_project(settings, facts.cfg.project)  # NGINX_URL / SERVER_NAME as adopt may have just set them
    upstream = ngx.parse_upstream(state.read_text(facts.upstream_path, root=settings.root))
    deadline = time.monotonic() + VERIFY_SECONDS
    while True:
        port = observe_route(cfg, upstream, probe)
        if port is not None or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if upstream is None or not upstream.port:
        return "nginx -t ok, reloaded; the upstream routes nowhere yet (the first deploy gives it a container)."
    if port == upstream.port:
        return f"nginx -t ok, reloaded; seen through nginx: it routes {cfg.project} to 127.0.0.1:{port}, as before."
    if port is None:
        return (f"nginx -t ok, reloaded; the route could not be seen through nginx at {cfg.nginx_url} (its server "
                f"block lacks the route line, or NGINX_URL/SERVER_NAME do not reach it): deploys trust the upstream "
                f"file, which routes to 127.0.0.1:{upstream.port} as before.")
    return (f"nginx -t ok, reloaded; but through nginx the route is 127.0.0.1:{port}, not 127.0.0.1:{upstream.port}: "
            f"check `nginx -T` for a second upstream {upstream.name}.")
