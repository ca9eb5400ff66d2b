"""`bluegreen status`: what serves, whether the files and containers agree, and how to fix drift."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from bluegreen.host import invocation
from bluegreen import docker as dk
from bluegreen import instant, journal, state
from bluegreen.config import COLOURS, ProjectConfig, Settings, load_project
from bluegreen import nginx as ngx
from bluegreen.deploy import OBSERVE_TIMEOUT, current_colour, observe_route, plan_deploy
from bluegreen.errors import BluegreenError
from bluegreen.health import Probe, http_probe
from bluegreen.lock import current_holder, read_freeze
from bluegreen.nginx import add_header_line, parse_upstream

# The verdict of one project: what a client gets (docs/exit-codes.md: `status` exits 0 only when all are OK).
OK = "ok"
DEGRADED = "degraded"  # clients are served, but something on the path is wrong or unproven
DOWN = "down"  # a client's request does not reach a running, healthy serving container
from bluegreen.runner import Runner


@dataclass(frozen=True)
class ColourState:
    colour: str
    container: str
    port: int
    state: str  # running, exited, ..., or "absent"
    tag: str | None = None
    started_at: str | None = None
    health: str | None = None  # "HTTP 200", "connection refused", ... (running containers only)
    healthy: bool | None = None
    managed: bool | None = None  # bluegreen started it (its labels); False: deploy.sh or a hand-run `docker run`
    # Informational, never part of the verdict: it runs with its port published on every address (docker.exposed_note).
    exposed: str | None = None


@dataclass(frozen=True)
class Drift:
    problem: str
    fix: str


@dataclass(frozen=True)
class ProjectStatus:
    project: str
    serving: str | None  # colour nginx routes to
    active_file: str | None  # colour in PROJECT.active
    upstream_port: int | None
    tag: str | None
    digest: str | None
    colours: list = field(default_factory=list)  # ColourState for blue and green
    lock: dict | None = None  # the running deploy holding the lock
    freeze: dict | None = None
    last_deploy: dict | None = None
    drift: list = field(default_factory=list)  # Drift
    error: str | None = None  # the env file could not be loaded
    nginx_route: int | None = None  # the port a probe through nginx was routed to (None: could not tell)
    verdict: str | None = None  # OK, DEGRADED or DOWN (None: the env file could not be loaded)
    checks: list = field(default_factory=list)  # Check: the path a client takes, step by step
    nginx_answer: str | None = None  # what NGINX_URL + HEALTH_PATH answered ("HTTP 200", "connection refused")
    # What `rollback` would do now (instant.Decision.to_dict: tag, instant, container, state, reason); None: there
    # is nothing to roll back to.
    rollback: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Check:
    name: str  # nginx, through nginx, route, container, health
    ok: bool
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class NginxState:
    """Whether the nginx master runs (its pid file, as `nginx -T` names it, and /proc) and whether -t passes."""

    running: bool
    pid: int | None
    pid_file: str
    error: str | None = None  # `nginx -t` failed: nginx's own words


def nginx_state(settings: Settings, runner: Runner) -> NginxState:
    """One `nginx -T` for all projects: the pid file it names, and the master behind it."""
    error = None
    dump = ""
    try:
        result = runner.run(ngx.dump_argv(settings.nginx_cmd), check=False, mutates=False, timeout=30)
        if result.returncode == 0:
            dump = result.stdout
        else:
            lines = [ln for ln in (result.stderr + "\n" + result.stdout).splitlines() if ln.strip()]
            error = "\n".join(ln for ln in lines if "test failed" not in ln)[-2000:] or "(nginx printed nothing)"
    except BluegreenError as exc:  # nginx (or sudo) not installed
        error = exc.message
    pid, pid_file = ngx.master_pid(dump, settings.nginx_cmd, settings.nginx_pid_file)
    return NginxState(pid is not None, pid, pid_file, error)


def route_line_fix(project: str, managed_upstream: bool) -> str:
    """How a server block gets the route line: by hand once the managed upstream file defines its variable;
    on a deploy.sh host (a hand-written upstream file, no map) only through adopt, as the line alone fails nginx -t."""
    if managed_upstream:
        return (f"add `{add_header_line(project)}` to the server block (or `{invocation()} adopt {project} --force` "
                f"adds it)")
    return (f"`{invocation()} adopt {project} --force`: it adds the route map to the upstream file and this line to "
            f"the server block (the line alone would fail `nginx -t` while the upstream file is hand-written)")


def judge(cfg: ProjectConfig, *, nginx: NginxState | None, answer: Probe | None, nginx_route: int | None,
          serving: str | None, colours: Sequence[ColourState], drift: Sequence[Drift],
          managed_upstream: bool = True) -> tuple[str, list[Check]]:
    """The verdict on the path a client takes (pure): nginx runs, answers NGINX_URL, routes to the serving
    container, which runs and is healthy. `nginx`/`answer` None: not looked at (no live checks)."""
    checks: list[Check] = []
    down = False
    if nginx is not None:
        if nginx.running:
            checks.append(Check("nginx", True, f"master pid {nginx.pid} ({nginx.pid_file})"))
        else:
            down = True
            checks.append(Check("nginx", False, f"nginx is not running (no live master process in {nginx.pid_file})",
                                "systemctl start nginx  (and `systemctl enable nginx` so that it starts at boot); if "
                                "nginx runs with another pid file, set BLUEGREEN_NGINX_PID_FILE"))
        if nginx.error:
            checks.append(Check("nginx -t", False, f"nginx rejects its configuration: {nginx.error.splitlines()[-1]}",
                                "fix the error `nginx -t` shows, then `systemctl reload nginx`"))
    url = f"{cfg.nginx_url}{cfg.health_path}"
    if answer is not None:
        if answer.status == cfg.health_expect:
            checks.append(Check("through nginx", True, f"{url} answered {answer.detail}"))
        else:
            down = True
            checks.append(Check("through nginx", False, f"{url} answered {answer.detail}, not HTTP {cfg.health_expect}",
                                f"see the checks below; `curl -sv {url}` shows what a client gets"))
    live = next((c for c in colours if c.colour == serving), None)
    if live is None:
        down = True
        checks.append(Check("container", False, "nothing serves: neither colour is routed to",
                            f"{invocation()} deploy {cfg.project} <tag>"))
        return DOWN, checks
    if answer is not None and answer.status is not None:  # no answer at all: nothing to say about the route
        if nginx_route == live.port:
            checks.append(Check("route", True, f"nginx routes to {live.container} (127.0.0.1:{live.port}), seen through nginx"))
        else:
            checks.append(Check("route", False, f"bluegreen could not see where nginx routes {cfg.project} (no route "
                                                f"header in nginx's answer), so it cannot prove {live.container} serves",
                                route_line_fix(cfg.project, managed_upstream)))
    if live.state == "running":
        checks.append(Check("container", True, f"{live.container} runs"))
    else:
        down = True
        what = "does not exist" if live.state == "absent" else f"is {live.state}"
        checks.append(Check("container", False, f"{live.container} {what}",
                            f"docker start {live.container}" if live.state != "absent" else f"{invocation()} deploy {cfg.project} <tag>"))
    if live.healthy is True:
        checks.append(Check("health", True, f"{live.container} answers {live.health} on 127.0.0.1:{live.port}{cfg.health_path}"))
    elif live.healthy is False:
        checks.append(Check("health", False, f"{live.container} answers {live.health} on 127.0.0.1:{live.port}{cfg.health_path}",
                            f"{invocation()} logs {cfg.project} --tail 100"))
    if down:
        return DOWN, checks
    if any(not c.ok for c in checks) or drift:
        return DEGRADED, checks
    return OK, checks


# The cause before its symptom: a stopped container is why nginx answers 502.
_CAUSES = ("nginx", "nginx -t", "container", "health", "route", "through nginx")


def first_failed(checks: Sequence[Check]) -> Check | None:
    failed = sorted((c for c in checks if not c.ok), key=lambda c: _CAUSES.index(c.name) if c.name in _CAUSES else 99)
    return failed[0] if failed else None


def reason(ps: ProjectStatus) -> str:
    """Why the verdict is not OK, in a few words (the failed check nearest the cause, else the first drift)."""
    failed = first_failed(ps.checks)
    if failed is not None:
        return failed.detail
    return ps.drift[0].problem if ps.drift else ""


def find_drift(cfg: ProjectConfig, settings: Settings, *, serving: str | None, active: str | None,
               upstream_port: int | None, colours: Sequence[ColourState], nginx_route: int | None = None,
               managed_upstream: bool = True) -> list[Drift]:
    """Plain-words disagreements between nginx's live route, the active file, the upstream file and the
    containers (pure). `serving` is the colour nginx routes to (seen through nginx when `nginx_route` is set)."""
    by_colour = {c.colour: c for c in colours}
    out: list[Drift] = []
    p = cfg.project
    if nginx_route and serving and upstream_port != nginx_route:
        live = by_colour[serving]
        pending = cfg.colour_of_port(upstream_port) if upstream_port else None
        after = (f"{by_colour[pending].container}, which is {by_colour[pending].state}" if pending
                 else "a port neither colour has" if upstream_port else "nowhere")
        out.append(Drift(
            f"nginx routes to {live.container} (127.0.0.1:{nginx_route}, seen through nginx), but the upstream file "
            f"routes {'to 127.0.0.1:' + str(upstream_port) if upstream_port else 'nowhere'}: nginx has not loaded that "
            f"file (a deploy was interrupted between writing it and reloading nginx, or it was edited by hand); a "
            f"reload of nginx would switch traffic to {after}",
            f"{invocation()} deploy {p} <tag>  (deploys from what nginx really routes to and rewrites the file)",
        ))
    if upstream_port and serving is None:
        out.append(Drift(
            f"the upstream file points at port {upstream_port}, which is neither BLUE_PORT ({cfg.blue_port}) nor GREEN_PORT ({cfg.green_port})",
            f"{invocation()} deploy {p} <tag>  (rewrites the upstream file)",
        ))
    # Without a route seen through nginx (a server block without the route header line, nginx not answering)
    # only the upstream file speaks: say so, and never advise stopping a container that may be serving.
    routes = "nginx routes" if nginx_route else "the upstream file routes"
    if serving:
        live = by_colour[serving]
        if live.state != "running":
            what = "does not exist" if live.state == "absent" else f"is {live.state}"
            fix = f"docker start {live.container}" if live.state != "absent" else f"{invocation()} deploy {p} <tag>"
            down = "the service is down" if nginx_route else "if nginx has loaded that file, the service is down"
            out.append(Drift(f"{routes} to {live.container} (127.0.0.1:{live.port}), but that container {what}: {down}", fix))
        elif live.healthy is False:
            out.append(Drift(f"{live.container} runs but its health check answers {live.health}", f"{invocation()} logs {p} --tail 100"))
        other = by_colour["green" if serving == "blue" else "blue"]
        # When the upstream file (not loaded yet) names the other colour, the next reload of nginx sends
        # traffic there: stopping it would take the service down. The drift above says what to do instead.
        pending_other = bool(nginx_route) and upstream_port == other.port and upstream_port != nginx_route
        if other.state == "running" and not pending_other:
            if nginx_route:
                out.append(Drift(f"{other.container} still runs although nginx does not route to it",
                                 f"docker stop {other.container}"))
            else:
                out.append(Drift(
                    f"{other.container} also runs, and the route through nginx could not be seen, so bluegreen cannot "
                    f"tell which of the two serves (the upstream file names {live.container})",
                    f"{route_line_fix(p, managed_upstream)} (then status can tell), or check `nginx -T`",
                ))
    if active and serving and active != serving:
        out.append(Drift(
            f"{p}.active says {active} but {routes} to {serving} (the upstream file was edited, or a deploy was interrupted)",
            f"echo {serving} > {settings.active_file(p)}  (the next deploy also corrects it)",
        ))
    if serving is None and not upstream_port:
        running = [c for c in colours if c.state == "running"]
        if running:
            out.append(Drift(
                f"{', '.join(c.container for c in running)} runs but nginx routes to neither colour (no upstream file)",
                f"{invocation()} deploy {p} <tag>",
            ))
    return out


def collect(settings: Settings, projects: Sequence[str], runner: Runner,
            probe: Callable[..., Probe] = http_probe, live_health: bool = True) -> list[ProjectStatus]:
    """Status of `projects` with one docker call in all."""
    configs: dict[str, ProjectConfig | str] = {}
    for name in projects:
        try:
            configs[name] = load_project(settings, name)
        except Exception as exc:  # report a broken env file, keep going with the others
            configs[name] = getattr(exc, "message", str(exc))
    names = [dk.container_name(n, c) for n, cfg in configs.items() if not isinstance(cfg, str) for c in COLOURS]
    docker = dk.Docker(runner, settings.docker_cmd)
    containers = docker.inspect_many(names)
    # nginx once for all projects, and only when status looks live (the master process, `nginx -t`).
    nginx = nginx_state(settings, runner) if live_health and any(not isinstance(c, str) for c in configs.values()) else None
    out = []
    for name, cfg in configs.items():
        if not isinstance(cfg, str):
            try:
                out.append(_one(settings, name, cfg, containers, probe, live_health, nginx, docker))
                continue
            except BluegreenError as exc:  # a planted link or FIFO among this project's files: report it, go on
                cfg = exc.message
        out.append(ProjectStatus(project=name, serving=None, active_file=None, upstream_port=None, tag=None,
                                 digest=None, error=cfg))
    return out


def through_nginx(cfg: ProjectConfig, upstream, probe: Callable[..., Probe]) -> tuple[int | None, Probe]:
    """Where nginx routes the project (observe_route's proof) and what it answered: the request a client makes."""
    answers: list[Probe] = []

    def recording(url: str, **kwargs) -> Probe:
        got = probe(url, **kwargs)
        answers.append(got)
        return got

    route = observe_route(cfg, upstream, recording)
    if not answers:  # no probe token yet (hand-written upstream): the status of a plain request
        recording(f"{cfg.nginx_url}{cfg.health_path}", timeout=min(cfg.health_request_timeout, OBSERVE_TIMEOUT),
                  host=cfg.server_name)
    return route, answers[0]


def rollback_path(settings: Settings, cfg: ProjectConfig, entries: Sequence[journal.Entry], serving_tag: str | None, *,
                  active: str | None, upstream, observed: int | None, containers: dict,
                  docker: dk.Docker) -> instant.Decision | None:
    """What `rollback` would do now: its tag (as rollback_project picks it) and whether it is instant, by the
    rollback's own rule (instant.look on the plan it would make). None: nothing to roll back to."""
    tag = journal.rollback_target(list(entries), serving_tag)
    if tag is None:
        return None
    plan, _ = plan_deploy(settings, cfg, tag, active=active, upstream=upstream, observed=observed,
                          digest=journal.recorded_digest(list(entries), tag), token_factory=lambda: "")
    return instant.look(docker, plan, containers.get(plan.target_name))


def _one(settings: Settings, name: str, cfg: ProjectConfig, containers: dict, probe: Callable[..., Probe],
         live_health: bool, nginx: NginxState | None = None, docker: dk.Docker | None = None) -> ProjectStatus:
    path = settings.upstream_file(name)
    upstream = parse_upstream(state.read_text(path, root=settings.root))
    active = state.read_active(settings.active_file(name))
    # What nginx really routes to (a probe through it), not only what the upstream file says it will.
    nginx_route, via_nginx = through_nginx(cfg, upstream, probe) if live_health else (None, None)
    serving, _ = current_colour(cfg, active=active, upstream=upstream, upstream_path=path, observed=nginx_route)
    if nginx_route is not None and cfg.colour_of_port(nginx_route) is None:
        nginx_route = None
    colours = []
    for colour in COLOURS:
        cname = dk.container_name(name, colour)
        found = containers.get(cname)
        port = cfg.port(colour)
        if found is None:
            colours.append(ColourState(colour, cname, port, "absent"))
            continue
        health = healthy = None
        if found.status == "running" and live_health:
            answer = probe(f"http://127.0.0.1:{port}{cfg.health_path}", timeout=cfg.health_request_timeout, host=cfg.health_host)
            health, healthy = answer.detail, answer.status == cfg.health_expect
        colours.append(ColourState(colour, cname, port, found.status, found.tag_in(cfg.image),
                                   found.started_at or None, health, healthy, found.managed, dk.exposed_note(found)))
    # As much of the journal as rollback reads, so that the rollback target is the one it would pick.
    entries = journal.read_tail(settings.journal_file(name), root=settings.root, max_bytes=journal.READ_BYTES)
    last = entries[-1] if entries else None
    live = next((c for c in colours if c.colour == serving), None)
    tag = live.tag if live is not None and live.tag else None
    running_tag = tag if live is not None and live.state in ("running", "restarting") else None
    rollback = None
    if docker is not None:
        rollback = rollback_path(settings, cfg, entries, running_tag, active=active, upstream=upstream,
                                 observed=nginx_route, containers=containers, docker=docker)
    digest = next((e.digest for e in reversed(entries) if e.result == journal.RESULT_DEPLOYED and e.tag == tag and e.digest), None)
    holder = current_holder(settings.lock_file(name))
    freeze = read_freeze(settings.freeze_file(name))
    managed = upstream is None or bool(upstream.token)  # a hand-written one (deploy.sh's) has no route map yet
    drift = find_drift(cfg, settings, serving=serving, active=active, upstream_port=upstream.port if upstream else None,
                       colours=colours, nginx_route=nginx_route, managed_upstream=managed)
    verdict, checks = judge(cfg, nginx=nginx, answer=via_nginx, nginx_route=nginx_route, serving=serving, colours=colours,
                            drift=drift, managed_upstream=managed)
    return ProjectStatus(
        project=name,
        serving=serving,
        active_file=active,
        upstream_port=upstream.port if upstream and upstream.port else None,
        tag=tag,
        digest=digest,
        colours=colours,
        lock=asdict(holder) if holder else None,
        freeze=asdict(freeze) if freeze else None,
        last_deploy=asdict(last) if last else None,
        drift=drift,
        nginx_route=nginx_route,
        verdict=verdict,
        checks=checks,
        nginx_answer=via_nginx.detail if via_nginx is not None else None,
        rollback=rollback.to_dict() if rollback is not None else None,
    )


def render_line(ps: ProjectStatus) -> str:
    """One line per project, for `bluegreen status` without a project."""
    if ps.error:
        return f"{ps.project:<20} ERROR {ps.error.splitlines()[0]}"
    live = next((c for c in ps.colours if c.colour == ps.serving), None)
    where = f"{ps.serving} :{live.port} {ps.tag or '?'} ({live.state}{', ' + live.health if live and live.health else ''})" if live else "nothing serving"
    flags = []
    if ps.lock:
        flags.append(f"DEPLOYING {ps.lock['tag']}")
    if ps.freeze:
        flags.append("FROZEN")
    if ps.drift:
        flags.append(f"{len(ps.drift)} problem(s)")
    flags += [f"warning: {c.container} published on every address" for c in ps.colours if c.exposed]
    if ps.verdict in (DOWN, DEGRADED):
        flags.insert(0, f"{ps.verdict.upper()}: {reason(ps)}")
    return f"{ps.project:<20} {where}" + (f"  [{', '.join(flags)}]" if flags else "  ok")


def render(ps: ProjectStatus, settings: Settings) -> str:
    """The detailed view of one project."""
    if ps.error:
        return f"{ps.project}: {ps.error}"
    lines = [f"{ps.project}"]
    if ps.verdict:
        lines.append(f"  verdict     {ps.verdict.upper()}" + (f": {reason(ps)}" if ps.verdict != OK else
                                                            ": nginx answers and routes to a running, healthy container"))
    for c in ps.checks:
        lines.append(f"  {'ok' if c.ok else 'FAIL':<4} {c.name:<14} {c.detail}" + ("" if c.ok or not c.fix else f"\n       fix: {c.fix}"))
    lines.append(f"  serving     {ps.serving or 'nothing'}" + (f" (tag {ps.tag}, digest {ps.digest or 'unknown'})" if ps.serving else ""))
    lines.append(f"  upstream    {settings.upstream_file(ps.project)} -> " + (f"127.0.0.1:{ps.upstream_port}" if ps.upstream_port else "nowhere"))
    lines.append("  nginx route " + (f"127.0.0.1:{ps.nginx_route} (seen through nginx)" if ps.nginx_route else
                                     "not seen (nginx did not answer with the route header; see doctor)"))
    lines.append(f"  active file {ps.active_file or '(none)'}")
    for c in ps.colours:
        extra = f" tag {c.tag}, started {c.started_at}" if c.tag else ""
        health = f", health {c.health}" if c.health else ""
        foreign = (f" (no bluegreen labels: started by deploy.sh or by hand; "
                   f"{'tag read from its image' if c.tag else 'its image names no tag of IMAGE'})" if c.managed is False else "")
        lines.append(f"  {c.colour:<6}      {c.container} 127.0.0.1:{c.port} {c.state}{health}{extra}{foreign}")
        if c.exposed:
            lines.append(f"              warning: {c.exposed}")
    lines.append(f"  rollback    {rollback_line(ps.rollback)}")
    if ps.lock:
        lines.append(f"  lock        deploy of {ps.lock['tag']} running: pid {ps.lock['pid']}, {ps.lock['user']}, since {ps.lock['since']}")
    if ps.freeze:
        lines.append(f"  freeze      by {ps.freeze['user']} since {ps.freeze['since']}: {ps.freeze['message']}")
    if ps.last_deploy:
        d = ps.last_deploy
        lines.append(f"  last deploy {d['time']} {d['action']} {d['tag']} {d['result']} by {d['user']} ({d['duration']:.1f}s)")
    if ps.drift:
        lines.append("  problems:")
        for item in ps.drift:
            lines.append(f"    - {item.problem}\n      fix: {item.fix}")
    else:
        lines.append("  no drift: the active file, the upstream and the containers agree")
    return "\n".join(lines)


def rollback_line(rollback: dict | None) -> str:
    """`instant to v1 (api-blue retained, stopped)`, `v1 needs a pull (its container is gone)`."""
    if not rollback:
        return "nothing to roll back to (the journal has no other successful deploy)"
    decision = instant.Decision(bool(rollback.get("instant")), str(rollback.get("container") or ""),
                                str(rollback.get("tag") or ""), str(rollback.get("reason") or ""))
    return decision.status_line()


def to_json(statuses: Sequence[ProjectStatus]) -> str:
    return json.dumps([s.to_dict() for s in statuses], indent=2, sort_keys=True)
