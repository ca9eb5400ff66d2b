"""`bluegreen doctor [PROJECT]`: a checklist of everything a deploy relies on, each failing item with its fix.

Facts are gathered through read-only commands; each `judge_*` function decides one item from facts alone.
A FAIL is something that would make a deploy fail; a WARN needs a look but does not stop a deploy.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, TextIO

from bluegreen import docker as dk
from bluegreen import nginx as ngx
from bluegreen import state
from bluegreen.config import ProjectConfig, Settings, load_project, registry_host, validate_project
from bluegreen.deploy import port_in_use
from bluegreen.errors import EXIT_FAILED, EXIT_OK, BluegreenError, CommandError, ConfigError
from bluegreen.host import include_line, includes_dir, invocation, nginx_conf_path, upstream_dir
from bluegreen.lock import current_holder, read_freeze
from bluegreen.runner import Runner

OK, WARN, FAIL = "ok", "WARN", "FAIL"
MIN_PYTHON = (3, 9)


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""


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


def judge_credentials(image: str, config: dict | None, config_path: str) -> Check:
    """Is there a login for the image's registry in the docker client config of the deploying user?"""
    registry = registry_host(image)
    name = "registry login"
    fix = f"docker login {registry} (as the user that deploys; for GHCR a PAT with read:packages)"
    if config is None:
        return Check(name, WARN, f"no docker client config at {config_path}: a private image of {registry} will not pull", fix)
    helpers = config.get("credHelpers") or {}
    if any(_registry_key(k) == registry for k in helpers):
        return Check(name, OK, f"{registry}: credential helper {helpers.get(registry, '?')} ({config_path})")
    if any(_registry_key(k) == registry for k in (config.get("auths") or {})):
        return Check(name, OK, f"{registry}: logged in ({config_path})")
    if config.get("credsStore"):
        return Check(name, OK, f"{registry}: credentials, if any, are in the {config['credsStore']} store ({config_path})")
    return Check(name, WARN, f"no login for {registry} in {config_path}: a private image will not pull", fix)


def judge_disk(label: str, path: str, free: int | None, min_free: int) -> Check:
    name = f"disk {label}"
    if free is None:
        return Check(name, WARN, f"cannot measure free space under {path}")
    gib = free / 2**30
    if free < min_free:
        return Check(name, FAIL, f"{gib:.1f} GiB free under {path}, less than {min_free / 2**30:.1f} GiB",
                     "free space: `docker image prune -a --filter until=168h`, `bluegreen backup-logs`, or grow the volume")
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


def _docker_config(environ: Mapping[str, str]) -> tuple[dict | None, str]:
    base = environ.get("DOCKER_CONFIG") or os.path.join(environ.get("HOME") or os.path.expanduser("~"), ".docker")
    path = os.path.join(base, "config.json")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        return (data if isinstance(data, dict) else {}), path
    except (OSError, ValueError):
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
        text = nginx_dump if nginx_dump is not None else (state.read_text(conf) if conf.exists() else None) or ""
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
    except ConfigError as exc:
        return [Check("env file", FAIL, exc.message, f"edit {settings.env_file(project)} (reference: docs/env-reference.md)")]
    checks = [Check("env file", OK, f"{settings.env_file(project)}: IMAGE={cfg.image}, ports {cfg.blue_port}/{cfg.green_port}")]
    for warning in cfg.warnings:
        checks.append(Check("env file", WARN, warning, f"fix the key in {settings.env_file(project)}"))

    upstream = ngx.parse_upstream(state.read_text(settings.upstream_file(project)))
    active = state.read_active(settings.active_file(project))
    checks.append(judge_upstream(project, upstream, active, cfg, settings.upstream_file(project), settings.active_file(project)))
    name = upstream.name if upstream else project
    if facts.nginx_dump is not None:
        proxies, reports = server_block_state(facts.nginx_dump, name, project)
        if not proxies:
            checks.append(Check("server block", WARN, f"no server block nginx loads proxies to http://{name}",
                                f"{me} init {project} --image {cfg.image} --server-name NAME writes one"))
        elif not reports:
            checks.append(Check("server block", WARN, "the server block lacks the route header line, so deploys cannot prove the switch",
                                f"add `{ngx.add_header_line(project)}` to it"))
        else:
            checks.append(Check("server block", OK, f"proxies to http://{name} and reports the route"))

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

    config, config_path = _docker_config(environ)
    checks.append(judge_credentials(cfg.image, config, config_path))
    if cfg.log_dir:
        checks.append(judge_disk("LOG_DIR", cfg.log_dir, _free_bytes(cfg.log_dir), min_free))
    checks.append(lock_check(settings, project))
    return checks


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
    holder = current_holder(lock)
    if holder is not None:
        return Check("lock", FAIL, f"a deploy is running now: {holder.describe()}",
                     "wait for it to finish, or deploy with --wait SECONDS to queue behind it")
    return Check("lock", OK, "no deploy running")


def render(sections: list[tuple[str, list[Check]]]) -> list[str]:
    lines = []
    for title, checks in sections:
        lines.append(title)
        for c in checks:
            lines.append(f"  {c.status:<4}  {c.name:<15}{c.detail}")
            if c.fix and c.status != OK:
                lines.append(f"  {'':<4}  {'':<15}fix: {c.fix}")
    all_checks = [c for _, checks in sections for c in checks]
    fails = sum(c.status == FAIL for c in all_checks)
    warns = sum(c.status == WARN for c in all_checks)
    if fails:
        lines.append(f"{fails} problem(s) would make a deploy fail; {warns} warning(s).")
    else:
        lines.append(f"Ready to deploy: {len(all_checks)} checks, {warns} warning(s).")
    return lines


def run_doctor(*, settings: Settings, runner: Runner, project: str | None, min_free_mb: int, environ: Mapping[str, str], stdout: TextIO) -> int:
    min_free = min_free_mb * 2**20
    host, facts = host_checks(settings, runner, min_free=min_free)
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
    for line in render(sections):
        print(line, file=stdout)
    return verdict([c for _, checks in sections for c in checks])
