"""`bluegreen init`: a project's env file, placeholder upstream and nginx server block, or its CI files,
from the templates in the package. Rendering is pure; writing (never over a file without --force) is separate."""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from bluegreen import nginx as ngx
from bluegreen import state, template
from bluegreen.config import Settings, parse_env, project_from_entries, validate_project
from bluegreen.errors import BluegreenError, CommandError, ConfigError, ExecutableNotFound, UsageError
from bluegreen.host import invocation, upstream_dir
from bluegreen.runner import Runner, indent

_SERVER_NAME_RE = re.compile(r"_|(?:\*\.)?[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")
_LISTEN_RE = re.compile(r"(?:(\d{1,3}(?:\.\d{1,3}){3}|\[[0-9a-fA-F:]+\]|\*):)?(\d{1,5})")
CI_WORKFLOWS = ".github/workflows"
CI_DOCKERFILE = "infra/docker/backend.Dockerfile"


@dataclass(frozen=True)
class FileSpec:
    """One file init writes: where, what, and how."""

    path: Path
    text: str
    note: str
    mode: int = 0o644
    keep_existing: bool = False  # deploy-managed state (the upstream file): written only when missing


# -- pure: parsing options and rendering ------------------------------------------------------------

def parse_ports(text: str) -> tuple[int, int]:
    """`8081,8082` -> (8081, 8082): BLUE_PORT and GREEN_PORT."""
    parts = [p.strip() for p in (text or "").split(",")]
    if len(parts) != 2 or not all(p.isdigit() and 1 <= int(p) <= 65535 for p in parts) or parts[0] == parts[1]:
        raise UsageError(f"--ports: give two different port numbers as BLUE,GREEN (e.g. 8081,8082), got {text!r}.")
    return int(parts[0]), int(parts[1])


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


def render_env(*, project: str, image: str, blue_port: int, green_port: int, nginx_url: str, server_name: str, server_conf: str) -> str:
    return template.render(
        "project.env", PROJECT=project, IMAGE=image, BLUE_PORT=blue_port, GREEN_PORT=green_port,
        NGINX_URL=nginx_url, SERVER_NAME=probe_host(server_name), SERVER_CONF=server_conf,
    )


def render_server_block(*, project: str, upstream: str, upstream_file: str, listen: str, server_name: str) -> str:
    return template.render(
        "server.conf", PROJECT=project, UPSTREAM=upstream, UPSTREAM_FILE=upstream_file, LISTEN=listen,
        SERVER_NAME=server_name, ADD_HEADER=ngx.add_header_line(project),
    )


def render_placeholder_upstream(*, project: str, upstream: str, blue_port: int, token: str) -> str:
    """The upstream of a project not deployed yet: valid for `nginx -t`, routes nowhere, keeps its token."""
    return ngx.render_upstream(name=upstream, port=blue_port, project=project, colour="-", tag="-", token=token, down=True)


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
) -> list[FileSpec]:
    """The three server-side files of a project; the env file is checked with the real loader."""
    validate_project(project)
    validate_server_name(server_name)
    listen, nginx_url = parse_listen(listen)
    upstream_path = settings.upstream_file(project)
    server_path = settings.nginx_conf_dir / f"{project}.conf"
    # A hand-written upstream keeps its name, as deploy does; the server block must proxy to that name.
    upstream = existing_upstream.name if existing_upstream else project
    env = render_env(
        project=project, image=image, blue_port=ports[0], green_port=ports[1], nginx_url=nginx_url,
        server_name=server_name, server_conf=str(server_path),
    )
    env_path = settings.env_file(project)
    try:
        project_from_entries(project, env_path.name, parse_env(env, env_path.name))
    except ConfigError as exc:
        raise UsageError(f"{exc.message} (from the options given to init; nothing was written)") from None
    return [
        FileSpec(env_path, env, f"IMAGE={image}, ports {ports[0]}/{ports[1]}; add SPRING_PROFILES and the app's settings here", mode=0o640),
        FileSpec(
            upstream_path,
            render_placeholder_upstream(project=project, upstream=upstream, blue_port=ports[0], token=token),
            "placeholder that routes nowhere until the first deploy; deploys rewrite it",
            keep_existing=True,
        ),
        FileSpec(
            server_path,
            render_server_block(project=project, upstream=upstream, upstream_file=str(upstream_path), listen=listen, server_name=server_name),
            f"listen {listen}, server_name {server_name}, proxy_pass http://{upstream}",
        ),
    ]


def secret_prefix(project: str) -> str:
    """user-api -> USER_API, the prefix of the project's SERVER_HOST secret (as in the seed)."""
    return re.sub(r"[^A-Z0-9]", "_", project.upper())


def ci_files(repo: Path, project: str) -> list[FileSpec]:
    """The GitHub Actions workflows and the Spring Boot Dockerfile, at the seed's paths in `repo`."""
    validate_project(project)
    workflows = repo / CI_WORKFLOWS
    return [
        FileSpec(workflows / "deploy-backend.yml", template.render("deploy-backend.yml"),
                 "reusable: build the jar and image, push to GHCR, deploy over SSH host by host"),
        FileSpec(workflows / f"deploy-{project}.yml",
                 template.render("deploy-project.yml", PROJECT=project, SECRET_PREFIX=secret_prefix(project)),
                 f"runs on every push to deploy/{project}; secrets {secret_prefix(project)}_SERVER_HOST, SERVER_USER, SSH_PRIVATE_KEY"),
        FileSpec(repo / CI_DOCKERFILE, template.render("backend.Dockerfile"), "Spring Boot on eclipse-temurin, graceful shutdown"),
    ]


def conflicts(files: list[FileSpec], read=state.read_text) -> list[Path]:
    """Existing files that init would replace with different content."""
    found = []
    for spec in files:
        current = read(spec.path)
        if current is not None and current != spec.text and not spec.keep_existing:
            found.append(spec.path)
    return found


# -- doing: writing, checking with nginx, undoing -----------------------------------------------------

@dataclass
class Written:
    spec: FileSpec
    previous: str | None  # content before, None if the file did not exist
    status: str


def write_files(files: list[FileSpec], *, force: bool) -> list[Written]:
    """Write each file atomically; refuse (before writing anything) to replace a file without force."""
    clashes = conflicts(files)
    if clashes and not force:
        raise UsageError(
            f"{', '.join(map(str, clashes))} already exist{'s' if len(clashes) == 1 else ''} with other content; "
            f"nothing was written. Rerun with --force to replace {'it' if len(clashes) == 1 else 'them'} (the "
            f"previous content is kept as FILE.bak)."
        )
    done: list[Written] = []
    try:
        for spec in files:
            previous = state.read_text(spec.path)
            if previous is not None and (previous == spec.text or spec.keep_existing):
                done.append(Written(spec, previous, "kept" if previous != spec.text else "unchanged"))
                continue
            spec.path.parent.mkdir(parents=True, exist_ok=True)
            status = "wrote"
            if previous is not None:
                backup = spec.path.with_name(spec.path.name + ".bak")
                shutil.copy2(str(spec.path), str(backup))
                status = f"replaced (previous kept as {backup.name})"
            state.atomic_write(spec.path, spec.text, mode=spec.mode)
            _own_like_parent(spec.path)
            done.append(Written(spec, previous, status))
    except OSError as exc:
        undo(done)
        raise BluegreenError(
            f"Could not write {exc.filename or spec.path} ({exc.strerror or exc}); what init had written so far "
            f"was removed again. Run init as a user who may write there (sudo for {spec.path.parent}), or "
            f"point BLUEGREEN_ROOT / BLUEGREEN_NGINX_CONF_DIR elsewhere."
        ) from None
    return done


def _own_like_parent(path: Path) -> None:
    """As root, give a new file its directory's owner, so the deploy user (who owns ROOT) can use it."""
    if os.geteuid() != 0:
        return
    parent = path.parent.stat()
    if parent.st_uid != 0 or parent.st_gid != 0:
        os.chown(str(path), parent.st_uid, parent.st_gid)


def undo(done: list[Written]) -> None:
    for item in reversed(done):
        if item.status in ("kept", "unchanged"):
            continue
        if item.previous is None:
            item.spec.path.unlink(missing_ok=True)
        else:
            state.atomic_write(item.spec.path, item.previous, mode=item.spec.mode)


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
    blue_green = parse_ports(ports)
    existing = ngx.parse_upstream(state.read_text(settings.upstream_file(project)))
    token = existing.token if existing and existing.token else ngx.new_token()
    files = project_files(
        settings, project=project, image=image, ports=blue_green, listen=listen, server_name=server_name,
        existing_upstream=existing, token=token,
    )
    done = write_files(files, force=force)
    upstream = existing.name if existing else project
    nginx_note, setup_needed = _check_nginx(runner, settings, done, upstream)
    for item in done:
        print(f"{item.status:<8} {item.spec.path}: {item.spec.note}", file=stdout)
    print(nginx_note, file=stdout)
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
    """Write the workflows and the Dockerfile into the repository at `repo`."""
    files = ci_files(Path(repo), project)
    for item in write_files(files, force=force):
        print(f"{item.status:<8} {item.spec.path}: {item.spec.note}", file=stdout)
    print(
        f"Next: add the repository secrets {secret_prefix(project)}_SERVER_HOST (comma-separated hosts, deployed in "
        f"order), SERVER_USER, SSH_PRIVATE_KEY and optionally SSH_KNOWN_HOSTS; commit; then "
        f"`git push origin HEAD:deploy/{project}` deploys.",
        file=stdout,
    )
    return 0
