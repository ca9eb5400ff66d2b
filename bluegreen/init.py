"""`bluegreen init`: a project's env file, placeholder upstream and nginx server block, or its CI files (with
the running bluegreen.pyz vendored beside them), from the templates in the package. Rendering is pure; writing
(never over a file without --force) is separate."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, TextIO

from bluegreen import nginx as ngx
from bluegreen import watch
from bluegreen import ports as portlib
from bluegreen import safefs, state, template
from bluegreen.config import (_IMAGE_RE, RESERVED_KEYS, Settings, load_project, parse_env, project_from_entries,
                              validate_project)
from bluegreen.settings import BY_KEY, upstream_options
from bluegreen.errors import BluegreenError, CommandError, ConfigError, ExecutableNotFound, UsageError
from bluegreen.host import invocation, running_pyz, upstream_dir
from bluegreen.runner import Runner, indent

_SERVER_NAME_RE = re.compile(r"_|(?:\*\.)?[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")
_LISTEN_RE = re.compile(r"(?:([0-9]{1,3}(?:\.[0-9]{1,3}){3}|\[[0-9a-fA-F:]+\]|\*):)?([0-9]{1,5})")
_PORT_RE = re.compile(r"[0-9]{1,5}")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
CI_WORKFLOWS = ".github/workflows"
CI_DOCKERFILE = "infra/docker/backend.Dockerfile"
# The bluegreen the deploy workflow runs on the runner (and the rollout sends to the hosts), kept in the
# application repository with its sha256 beside it: the workflow checks one against the other.
CI_PYZ = ".github/bluegreen/bluegreen.pyz"
CI_PYZ_SUM = CI_PYZ + ".sha256"
# What init reads of a file it may replace (to compare and keep as .bak): the pyz is a few hundred KiB.
MAX_FILE_BYTES = 32 << 20


@dataclass(frozen=True)
class FileSpec:
    """One file init writes: where, what, and how."""

    path: Path
    content: str | bytes  # text (written as UTF-8) or bytes (the vendored pyz), compared byte for byte
    note: str
    mode: int = 0o644
    keep_existing: bool = False  # deploy-managed state (the upstream file): written only when missing
    root: Path | None = None  # trusted directory above `path`: nothing below it is followed (see safefs)

    @property
    def data(self) -> bytes:
        return self.content.encode("utf-8") if isinstance(self.content, str) else self.content


# -- pure: parsing options and rendering ------------------------------------------------------------

def parse_ports(text: str) -> tuple[int, int]:
    """`8081,8082` -> (8081, 8082): BLUE_PORT and GREEN_PORT."""
    parts = [p.strip() for p in (text or "").split(",")]
    # [0-9] and not str.isdigit(): '²' is a digit to isdigit() but not to int().
    if len(parts) != 2 or not all(_PORT_RE.fullmatch(p) and 1 <= int(p) <= 65535 for p in parts) or int(parts[0]) == int(parts[1]):
        raise UsageError(f"--ports: give two different port numbers as BLUE,GREEN (e.g. 8081,8082), got {text!r}.")
    return int(parts[0]), int(parts[1])


def validate_image(image: str) -> str:
    """--image: one repository name without tag (config's IMAGE rule), nothing that could end the env file's line."""
    if not image or _CONTROL_RE.search(image) or any(c.isspace() for c in image):
        raise UsageError(
            f"--image: give one image repository name without spaces or line breaks (ghcr.io/acme/user-api), "
            f"got {image!r}; nothing was written."
        )
    if not _IMAGE_RE.fullmatch(image):
        tagged = "@" in image or ":" in image.rsplit("/", 1)[-1]
        raise UsageError(
            f"--image: IMAGE: give the repository without a tag or digest, e.g. ghcr.io/acme/user-api (the tag is "
            f"deploy's second argument), got {image!r}; nothing was written." if tagged else
            f"--image: {image!r} is not a valid image repository name (e.g. ghcr.io/acme/user-api); nothing was written."
        )
    return image


def parse_listen(text: str) -> tuple[str, str]:
    """The nginx `listen` value and the NGINX_URL that reaches it from this host."""
    match = _LISTEN_RE.fullmatch(text or "")
    if not match or not 1 <= int(match.group(2)) <= 65535:
        raise UsageError(f"--listen: give a port or ADDRESS:PORT (80, 127.0.0.1:8080), got {text!r}.")
    address, port = match.group(1), match.group(2)
    host = address if address and address not in ("*", "0.0.0.0", "[::]") else "127.0.0.1"
    return text, f"http://{host}:{port}"


def validate_server_name(name: str) -> str:
    if not _SERVER_NAME_RE.fullmatch(name or ""):
        raise UsageError(
            f"--server-name: give one host name (api.example.com), a wildcard (*.example.com) or _ for "
            f"nginx's catch-all, got {name!r}."
        )
    return name


def probe_host(server_name: str) -> str:
    """SERVER_NAME for the env file: the Host that reaches the block ('' = nginx's default server)."""
    return "" if server_name == "_" or server_name.startswith("*.") else server_name


DEFAULT_LOG_DIR = str(BY_KEY["LOG_DIR"].default)


def log_dir_for(project: str, others: Mapping[str, str | None], default: str = DEFAULT_LOG_DIR) -> str:
    """LOG_DIR for a new project: the default (the seed's one project per server), or DEFAULT/PROJECT when
    another project on this host already logs there (None: its env file could not be read, so it may)."""
    taken = [d for name, d in others.items() if name != project]
    return f"{default}/{project}" if any(d is None or d == default for d in taken) else default


def shared_log_dirs(log_dirs: Mapping[str, str]) -> dict[str, list[str]]:
    """LOG_DIR -> the projects that share it, for every directory two or more projects use ('' = none: skipped).

    Their apps' app.log files clash and `backup-logs` mixes them (for doctor)."""
    users: dict[str, list[str]] = {}
    for project, log_dir in sorted(log_dirs.items()):
        if log_dir:
            users.setdefault(log_dir.rstrip("/") or "/", []).append(project)
    return {d: names for d, names in users.items() if len(names) > 1}


def other_log_dirs(settings: Settings, project: str) -> dict[str, str | None]:
    """Every other project's LOG_DIR under the root (None when its env file does not load)."""
    found: dict[str, str | None] = {}
    for other in settings.projects():
        if other == project:
            continue
        try:
            found[other] = load_project(settings, other).log_dir
        except BluegreenError:
            found[other] = None
    return found


def render_env(*, project: str, image: str, blue_port: int, green_port: int, nginx_url: str, server_name: str, server_conf: str,
               log_dir: str = DEFAULT_LOG_DIR) -> str:
    text = template.render(
        "project.env", PROJECT=project, IMAGE=image, BLUE_PORT=blue_port, GREEN_PORT=green_port,
        NGINX_URL=nginx_url, SERVER_NAME=probe_host(server_name), SERVER_CONF=server_conf,
    )
    if log_dir != DEFAULT_LOG_DIR:
        # Written uncommented only when it is not the default, so the seed's layout reads as before.
        text = text.replace(f"\n#LOG_DIR={DEFAULT_LOG_DIR}\n", f"\nLOG_DIR={log_dir}\n", 1)
    return text


def render_server_block(*, project: str, upstream: str, upstream_file: str, listen: str, server_name: str) -> str:
    return template.render(
        "server.conf", PROJECT=project, UPSTREAM=upstream, UPSTREAM_FILE=upstream_file, LISTEN=listen,
        SERVER_NAME=server_name, ADD_HEADER=ngx.add_header_line(project), ACCESS_LOG=watch.access_log_line(project),
        LOG_FORMAT=watch.log_format_line(project),
    )


def render_placeholder_upstream(*, project: str, upstream: str, blue_port: int, token: str) -> str:
    """The upstream of a project not deployed yet: valid for `nginx -t`, routes nowhere, keeps its token."""
    return ngx.render_upstream(name=upstream, port=blue_port, project=project, colour="-", tag="-", token=token, down=True,
                               options=ngx.UpstreamOptions(**upstream_options(None)))


def project_files(
    settings: Settings,
    *,
    project: str,
    image: str,
    ports: tuple[int, int],
    listen: str,
    server_name: str,
    existing_upstream: ngx.Upstream | None,
    token: str,
    log_dir: str = DEFAULT_LOG_DIR,
) -> list[FileSpec]:
    """The three server-side files of a project; the env file is checked with the real loader."""
    validate_project(project)
    validate_image(image)
    validate_server_name(server_name)
    listen, nginx_url = parse_listen(listen)
    upstream_path = settings.upstream_file(project)
    server_path = settings.nginx_conf_dir / f"{project}.conf"
    # A hand-written upstream keeps its name, as deploy does; the server block must proxy to that name.
    upstream = existing_upstream.name if existing_upstream else project
    env = render_env(
        project=project, image=image, blue_port=ports[0], green_port=ports[1], nginx_url=nginx_url,
        server_name=server_name, server_conf=str(server_path), log_dir=log_dir,
    )
    env_path = settings.env_file(project)
    try:
        entries = parse_env(env, env_path.name)
        project_from_entries(project, env_path.name, entries)
    except ConfigError as exc:
        raise UsageError(f"{exc.message} (from the options given to init; nothing was written)") from None
    _check_reads_back(entries, image)
    logs = "" if log_dir == DEFAULT_LOG_DIR else f", LOG_DIR={log_dir} (another project on this host logs to {DEFAULT_LOG_DIR})"
    return [
        FileSpec(env_path, env, f"IMAGE={image}, ports {ports[0]}/{ports[1]}{logs}; add SPRING_PROFILES and the app's settings here",
                 mode=0o640, root=settings.root),
        FileSpec(
            upstream_path,
            render_placeholder_upstream(project=project, upstream=upstream, blue_port=ports[0], token=token),
            "placeholder that routes nowhere until the first deploy; deploys rewrite it",
            keep_existing=True, root=settings.root,
        ),
        FileSpec(
            server_path,
            render_server_block(project=project, upstream=upstream, upstream_file=str(upstream_path), listen=listen, server_name=server_name),
            f"listen {listen}, server_name {server_name}, proxy_pass http://{upstream}",
        ),
    ]


def _check_reads_back(entries: list, image: str) -> None:
    """The rendered env file must hold bluegreen's own keys once each and IMAGE exactly as given: an option
    that smuggled a line in (a newline, a quote) is refused here even if a validator above missed it."""
    keys = [e.key for e in entries]
    images = [e.value for e in entries if e.key == "IMAGE"]
    if len(keys) != len(set(keys)) or any(k not in RESERVED_KEYS for k in keys) or images != [image]:
        raise UsageError(
            "The options given to init do not read back as given from the env file (a newline or quote in "
            "one of them?); nothing was written. Give plain values: --image REPOSITORY, --server-name HOST."
        )


def secret_prefix(project: str) -> str:
    """user-api -> USER_API, the prefix of the project's SERVER_HOST secret (as in the seed)."""
    return re.sub(r"[^A-Z0-9]", "_", project.upper())


def render_pyz_sum(pyz: bytes, version: str) -> str:
    """The vendored pyz's sha256 in `sha256sum -c` form (relative to its directory), with its version."""
    name = CI_PYZ.rsplit("/", 1)[-1]
    return (
        f"# bluegreen {version}: the tool .github/workflows/deploy-backend.yml runs (the rollout sends it to the hosts).\n"
        f"# Written by `bluegreen init --ci github`; the workflow refuses a {name} that does not match. Update both\n"
        f"# files with the new pyz: python3 NEW/bluegreen.pyz init --ci github PROJECT --force\n"
        f"{hashlib.sha256(pyz).hexdigest()}  {name}\n"
    )


def ci_files(repo: Path, project: str, pyz: bytes, version: str) -> list[FileSpec]:
    """The GitHub Actions workflows, the Spring Boot Dockerfile at the seed's paths in `repo`, and the tool
    itself (`pyz`, the bytes of the running bluegreen.pyz) with its checksum."""
    validate_project(project)
    workflows = repo / CI_WORKFLOWS
    prefix = secret_prefix(project)
    return [
        FileSpec(workflows / "deploy-backend.yml", template.render("deploy-backend.yml", PYZ=CI_PYZ),
                 f"reusable: build the jar and image, push to GHCR, then `bluegreen rollout` over SSH from {CI_PYZ}"),
        FileSpec(workflows / f"deploy-{project}.yml",
                 template.render("deploy-project.yml", PROJECT=project, SECRET_PREFIX=prefix),
                 f"runs on every push to deploy/{project}; secrets {prefix}_SERVER_HOST, SERVER_USER, SSH_PRIVATE_KEY, "
                 f"SSH_KNOWN_HOSTS"),
        FileSpec(repo / CI_DOCKERFILE, template.render("backend.Dockerfile"), "Spring Boot on eclipse-temurin, graceful shutdown"),
        FileSpec(repo / CI_PYZ, pyz, f"bluegreen {version}, the tool the workflow runs and sends to the hosts", mode=0o755),
        FileSpec(repo / CI_PYZ_SUM, render_pyz_sum(pyz, version), "its sha256, checked by the workflow before it runs it"),
    ]


def conflicts(files: list[FileSpec], read=None) -> list[Path]:
    """Existing files that init would replace with different content (compared byte for byte)."""
    found = []
    for spec in files:
        current = _read(spec.path, spec.root) if read is None else read(spec.path)
        if current is not None and current != spec.data and not spec.keep_existing:
            found.append(spec.path)
    return found


# -- doing: writing, checking with nginx, undoing -----------------------------------------------------

@dataclass
class Written:
    spec: FileSpec
    previous: bytes | None  # content before, None if the file did not exist
    status: str


def write_files(files: list[FileSpec], *, force: bool) -> list[Written]:
    """Write each file atomically; refuse (before writing anything) to replace a file without force.

    Every file goes through safefs: a planted symlink at a file, its .bak or a directory below the deploy
    root is never followed (raises safefs.UnsafePath, exit 2)."""
    clashes = conflicts(files, read=_read)
    if clashes and not force:
        raise UsageError(
            f"{', '.join(map(str, clashes))} already exist{'s' if len(clashes) == 1 else ''} with other content; "
            f"nothing was written. Rerun with --force to replace {'it' if len(clashes) == 1 else 'them'} (the "
            f"previous content is kept as FILE.bak)."
        )
    done: list[Written] = []
    try:
        for spec in files:
            previous = _read(spec.path, spec.root)
            if previous is not None and (previous == spec.data or spec.keep_existing):
                done.append(Written(spec, previous, "kept" if previous != spec.data else "unchanged"))
                continue
            if spec.root is None:
                spec.path.parent.mkdir(parents=True, exist_ok=True)  # a trusted place (--repo, nginx's conf dir)
            status = "wrote"
            owner = _parent_owner(spec)
            if previous is not None:
                backup = spec.path.with_name(spec.path.name + ".bak")
                # Replaced atomically, never written through: a planted FILE.bak symlink (to a cron
                # directory, say) is swapped for a regular file holding the previous content.
                safefs.atomic_write(backup, previous, root=spec.root, mode=_mode_of(spec) & spec.mode, owner=owner)
                status = f"replaced (previous kept as {backup.name})"
            safefs.atomic_write(spec.path, spec.data, root=spec.root, mode=spec.mode, owner=owner, make_dirs=True)
            done.append(Written(spec, previous, status))
    except OSError as exc:
        undo(done)
        raise BluegreenError(
            f"Could not write {exc.filename or spec.path} ({exc.strerror or exc}); what init had written so far "
            f"was removed again. Run init as a user who may write there (sudo for {spec.path.parent}), or "
            f"point BLUEGREEN_ROOT / BLUEGREEN_NGINX_CONF_DIR elsewhere."
        ) from None
    except safefs.UnsafePath:
        undo(done)
        raise
    return done


def _read(path: Path, root: Path | None = None) -> bytes | None:
    # Bytes, never decoded: an env file with bytes that are not UTF-8, or the vendored pyz, is compared (and
    # kept as .bak) byte for byte, not mangled.
    return safefs.read_bytes(path, root=root, max_bytes=MAX_FILE_BYTES)


def _mode_of(spec: FileSpec) -> int:
    """The permission bits of the file being replaced (the .bak of a 0600 env file stays 0600)."""
    st = safefs.lstat(spec.path, root=spec.root)
    return (st.st_mode & 0o777) if st is not None else spec.mode


def _parent_owner(spec: FileSpec) -> tuple[int, int] | None:
    """As root, a new file gets its directory's owner, so the deploy user (who owns ROOT) can use it.

    Set on the temp file before the rename (fchown), so no chown ever follows a name an attacker could swap."""
    if os.geteuid() != 0:
        return None
    fd = safefs.open_dir(spec.path.parent, root=spec.root) if spec.root is not None else None
    try:
        st = os.fstat(fd) if fd is not None else os.stat(str(spec.path.parent))
    except OSError:
        return None
    finally:
        if fd is not None:
            os.close(fd)
    return (st.st_uid, st.st_gid) if (st.st_uid, st.st_gid) != (0, 0) else None


def undo(done: list[Written]) -> None:
    for item in reversed(done):
        if item.status in ("kept", "unchanged"):
            continue
        if item.previous is None:
            safefs.unlink(item.spec.path, root=item.spec.root)
        else:
            safefs.atomic_write(item.spec.path, item.previous, root=item.spec.root, mode=item.spec.mode,
                                owner=_parent_owner(item.spec))


def _missing_upstream(error: str, upstream: str) -> bool:
    return f'host not found in upstream "{upstream}"' in error


def init_project(
    *,
    settings: Settings,
    runner: Runner,
    project: str,
    image: str,
    ports: str,
    listen: str,
    server_name: str,
    force: bool,
    stdout: TextIO,
) -> int:
    """Write the project's files, check them with `nginx -t`, print what was done and what comes next."""
    validate_project(project)
    other = ngx.route_clash(project, settings.projects())
    if other is not None:
        raise UsageError(ngx.route_clash_message(project, other, str(settings.root / "projects")))
    blue_green = parse_ports(ports)
    existing = ngx.parse_upstream(state.read_text(settings.upstream_file(project), root=settings.root))
    if existing is not None and not existing.token and settings.env_file(project).exists():
        # A host the guide's deploy.sh set up: init would keep the hand-written upstream (no route map) and
        # nginx would then reject init's server block. adopt takes such a project over in place.
        raise UsageError(
            f"{project} already runs here from a hand-written upstream file ({settings.upstream_file(project)}, "
            f"upstream {existing.name} -> 127.0.0.1:{existing.port or '(down)'}), as the guide's deploy.sh sets it up; "
            f"init writes new projects. Nothing was written. Take it over in place with `{invocation()} adopt "
            f"{project} --dry-run` (shows every change), then `{invocation()} adopt {project} --force`."
        )
    token = existing.token if existing and existing.token else ngx.new_token()
    files = project_files(
        settings, project=project, image=image, ports=blue_green, listen=listen, server_name=server_name,
        existing_upstream=existing, token=token, log_dir=log_dir_for(project, other_log_dirs(settings, project)),
    )
    done = write_files(files, force=force)
    upstream = existing.name if existing else project
    nginx_note, setup_needed = _check_nginx(runner, settings, done, upstream)
    for item in done:
        print(f"{item.status:<8} {item.spec.path}: {item.spec.note}", file=stdout)
    print(nginx_note, file=stdout)
    ephemeral = portlib.ephemeral_warning([("BLUE_PORT", blue_green[0]), ("GREEN_PORT", blue_green[1])],
                                          portlib.ephemeral_range(), settings.env_file(project).name)
    if ephemeral:
        print(f"warning: {ephemeral}", file=stdout)
    me = invocation()
    if setup_needed:
        print(f"Next: sudo {me} setup   (then: {me} deploy {project} TAG)", file=stdout)
    else:
        print(f"Next: {me} deploy {project} TAG   (check first with: {me} doctor {project})", file=stdout)
    return 0


def _check_nginx(runner: Runner, settings: Settings, done: list[Written], upstream: str) -> tuple[str, bool]:
    """`nginx -t` with the new files: (note for the user, whether setup must add the include first)."""
    nginx = ngx.Nginx(runner, settings.nginx_cmd)
    try:
        nginx.test()
    except ExecutableNotFound as exc:
        return f"nginx -t: not run ({exc.message})", True
    except CommandError as exc:
        error = ngx.Nginx.error_text(exc)
        if _missing_upstream(error, upstream):
            return (
                f"nginx -t: nginx does not load {upstream_dir(settings)} yet, so it cannot resolve the "
                f"upstream {upstream}; `setup` adds that include.", True,
            )
        undo(done)
        raise BluegreenError(
            f"nginx rejected the configuration with the new files (`nginx -t`):\n{indent(error)}\nThe files init "
            f"wrote were removed again (or put back as they were); nginx is as before. Fix the error above (for "
            f"a 'duplicate upstream' or 'conflicting server name', another file already defines it), then run "
            f"init again."
        ) from exc
    return "nginx -t: ok, the configuration with the new files is valid (nginx loads it at the next reload; every deploy reloads).", False


def init_ci(*, project: str, repo: str, force: bool, stdout: TextIO) -> int:
    """Write the workflows, the Dockerfile and the running bluegreen.pyz into the repository at `repo`."""
    validate_project(project)
    tool = running_pyz()
    if tool is None:
        raise UsageError(
            f"init --ci github copies the running bluegreen into the repository ({CI_PYZ}), where the deploy "
            f"workflow runs it, but this bluegreen runs from a source tree, not from bluegreen.pyz. Nothing was "
            f"written. Run it from the pyz: `python3 dist/bluegreen.pyz init --ci github {project}` (build it "
            f"with `python3 build.py`), or through the `bluegreen` launcher that setup installs."
        )
    try:
        data = tool.read_bytes()
    except OSError as exc:
        raise UsageError(f"Could not read {tool} ({exc.strerror or exc}), the bluegreen.pyz init copies into the "
                         f"repository. Nothing was written.") from None
    from bluegreen import __version__

    files = ci_files(Path(repo), project, data, __version__)
    done = write_files(files, force=force)
    for item in done:
        print(f"{item.status:<8} {item.spec.path}: {item.spec.note}", file=stdout)
    if any(item.status.startswith("replaced") for item in done):
        print("The previous files are kept as FILE.bak beside them: carry over any edit of yours, then delete the "
              ".bak files (do not commit them).", file=stdout)
    prefix = secret_prefix(project)
    print(
        f"Next: commit {CI_WORKFLOWS}/deploy-backend.yml, {CI_WORKFLOWS}/deploy-{project}.yml, {CI_DOCKERFILE}, "
        f"{CI_PYZ} and {CI_PYZ_SUM}. Add the repository secrets (Settings > Secrets and variables > Actions) "
        f"{prefix}_SERVER_HOST (the hosts, comma-separated, deployed in that order), SERVER_USER, SSH_PRIVATE_KEY "
        f"(the whole private key) and SSH_KNOWN_HOSTS (required: the output of `ssh-keyscan HOST` for every host, "
        f"its fingerprints checked against `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` run on the host; the "
        f"workflow never trusts a key it has not been given). Then `git push origin HEAD:deploy/{project}` deploys. "
        f"To update the bluegreen the workflow runs, run the new pyz's `init --ci github {project} --force`.",
        file=stdout,
    )
    return 0
