"""The deploy: the seed's six steps, each with its undo, so the failure table reads off the code.

| step | does                         | on failure                                   |
| 1    | pull IMAGE:TAG               | stop; the old container is untouched         |
| 2    | start the idle colour        | remove it; the old container is untouched    |
| 3    | health-check it              | remove it; the old keeps serving             |
| 4    | point nginx at it            | put the upstream back; remove it             |
| 5    | stop the old container       | exit 4: new serves, old still runs           |
| 6    | record the active colour     | exit 4: new serves, state file is stale      |
"""

from __future__ import annotations

import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TextIO

from bluegreen import docker as dk
from bluegreen import health, instant, ports, safefs, state
from bluegreen import watch as wt
from bluegreen.config import ProjectConfig, Settings, image_ref, registry_host
from bluegreen.errors import BluegreenError, CommandError, DeployFailed, Interrupted, NeedsAttention, UsageError
from bluegreen.errors import os_problem, say
from bluegreen.judge import Judge
from bluegreen import nginx as ngx
from bluegreen.nginx import Nginx, Upstream, new_token, parse_upstream, render_upstream
from bluegreen.runner import Runner, display, indent
from bluegreen.settings import canary_steps, upstream_options

# Seconds the undo after a signal waits for nginx workers that may route to the new container.
UNDO_DRAIN_ON_INTERRUPT = 3.0
# Seconds the probe through nginx before a deploy may take to show where nginx routes.
OBSERVE_TIMEOUT = 2.0


@dataclass(frozen=True)
class Plan:
    """Everything a deploy will do, decided from the config and the host's current state."""

    cfg: ProjectConfig
    tag: str
    ref: str
    current: str | None  # colour nginx routes to now (None on a first deploy)
    target: str
    upstream_name: str
    token: str  # the probe token in the upstream file's map (kept across deploys)
    routed_port: int  # the port nginx routes to now (0: nowhere yet)
    upstream_path: Path
    active_path: Path
    docker_cmd: tuple[str, ...]
    nginx_cmd: tuple[str, ...]
    route_seen: bool = False  # `current` is what a probe through nginx showed, not only what the files say

    @property
    def target_name(self) -> str:
        return dk.container_name(self.cfg.project, self.target)

    @property
    def current_name(self) -> str | None:
        return dk.container_name(self.cfg.project, self.current) if self.current else None

    @property
    def target_port(self) -> int:
        return self.cfg.port(self.target)

    def run_argv(self, env_file: str | None) -> list[str]:
        return dk.run_argv(self.docker_cmd, self.cfg, colour=self.target, tag=self.tag, ref=self.ref, env_file=env_file,
                           config=dk.config_fingerprint(self.cfg, colour=self.target, tag=self.tag))

    def upstream_text(self, canary: int | None = None) -> str:
        """The managed upstream file for the new colour; a canary step sends it `canary` percent only."""
        return render_upstream(
            name=self.upstream_name, port=self.target_port, project=self.cfg.project, colour=self.target,
            tag=self.tag, token=self.token, options=ngx.UpstreamOptions(**upstream_options(self.cfg)),
            canary=(self.routed_port or self.cfg.port(self.current), canary) if canary and self.current else None,
        )

    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.target_port}{self.cfg.health_path}"

    def verify_url(self) -> str:
        return f"{self.cfg.nginx_url}{self.cfg.health_path}"

    def judged_lines(self) -> tuple[list[str], list[str]]:
        """--dry-run: the canary steps before the full switch and the watch after it (a deploy, not a rollback)."""
        cfg = self.cfg
        steps = canary_steps(cfg.canary_steps) or ()
        if not (steps or cfg.watch_seconds > 0):
            return [], []
        if self.current is None:
            return [], ["[4/6] watch   none: WATCH_SECONDS/CANARY_STEPS are set, but no container of this project "
                        "serves now, so there is nothing to switch back to (the switch is at once)"]
        old = self.routed_port or cfg.port(self.current)
        back = f"a failure switches back to 127.0.0.1:{old} ({self.current_name}, kept running)"
        log = (f"              only if {self.current_name} still runs and the server block has an `access_log ... "
               f"{wt.format_name(cfg.project)}` line (`nginx -T`); else no canary and no watch: a note, and the "
               f"switch at once")
        canary: list[str] = []
        for percent in steps:
            rule = wt.rule_text(cfg.watch_min_requests, wt.early_min_requests(cfg.watch_min_requests, percent))
            canary += [
                f"[4/6] switch  write {self.upstream_path}: {percent}% of requests (weight) to "
                f"127.0.0.1:{self.target_port}, the rest to 127.0.0.1:{old}; then `nginx -T` and reload",
                f"[4/6] canary  {cfg.canary_step_seconds:g}s: at most {cfg.watch_max_error_rate}% 5xx ({rule}), "
                f"health, crashes; {back}",
            ]
        watch = [f"[4/6] watch   {cfg.watch_seconds:g}s of real traffic to 127.0.0.1:{self.target_port}: at most "
                 f"{cfg.watch_max_error_rate}% 5xx ({wt.rule_text(cfg.watch_min_requests, cfg.watch_min_requests)}), "
                 f"health, crashes; {back}; `bluegreen promote|abort {cfg.project}` ends it"] if cfg.watch_seconds > 0 else []
        return (canary + [log] if canary else []), (watch + ([] if canary else [log]) if watch else [])

    def describe(self, retained: instant.Decision | None = None) -> list[str]:
        """Human-readable steps with the exact commands, for --dry-run; `retained`: a rollback's decision."""
        cfg, d, n = self.cfg, self.docker_cmd, self.nginx_cmd
        retire = f"{display(dk.stop_argv(d, self.current_name, cfg.stop_timeout))}" if self.current_name else "(nothing was serving)"
        env_note = " (app environment piped to docker's stdin: never in argv or a file)" if cfg.container_env() else ""
        if retained is not None and retained.instant:
            fetch_and_start = [
                f"[1/6] pull    nothing: instant rollback, {retained.name} still holds {retained.tag} and its image",
                f"[2/6] start   {display(retained.argv(d))}  (the retained container, as it was created)",
            ]
        else:
            fetch_and_start = [
                f"[1/6] pull    {display(dk.pull_argv(d, self.ref))}" if cfg.pull == "always" else
                f"[1/6] pull    {display(dk.image_inspect_argv(d, self.ref))}  then "
                + (f"{display(dk.pull_argv(d, self.ref))} only if this host lacks it (PULL=missing)" if cfg.pull == "missing"
                   else "no pull at all: the image must be on this host (PULL=never)"),
                f"[2/6] start   {display(dk.rm_argv(d, self.target_name))}  (only if a leftover exists)",
                f"              {display(self.run_argv(dk.ENV_STDIN if cfg.container_env() else None))}{env_note}",
            ]
        canary, watch = self.judged_lines() if retained is None else ([], [])  # a rollback neither steps nor watches
        return [
            *fetch_and_start,
            f"[3/6] health  GET {self.health_url()} until HTTP {cfg.health_expect}, at most {cfg.health_timeout:g}s",
            *canary,
            f"[4/6] switch  write {self.upstream_path}:",
            *("                " + line for line in self.upstream_text().splitlines()),
            f"              {display([*n, '-T'])}  then  {display([*n, '-s', 'reload'])}",
            f"              wait for the nginx workers that predate the reload to exit (at most {cfg.drain_timeout:g}s)",
            f"              GET {self.verify_url()} must be routed to 127.0.0.1:{self.target_port}",
            *watch,
            f"[5/6] retire  {retire}",
            f"[6/6] record  write {self.active_path}: {self.target}",
        ]


def current_colour(cfg: ProjectConfig, *, active: str | None, upstream: Upstream | None, upstream_path: Path,
                   observed: int | None = None) -> tuple[str | None, list[str]]:
    """Which colour serves: where a probe through nginx was routed (`observed`), else what the upstream
    file routes to, else the .active file."""
    warnings: list[str] = []
    seen = cfg.colour_of_port(observed) if observed else None
    if seen is not None:
        if upstream is None or upstream.port != observed:
            warnings.append(
                f"nginx routes {cfg.project} to {seen} (127.0.0.1:{observed}, seen through nginx), but {upstream_path} "
                f"{'routes to 127.0.0.1:' + str(upstream.port) if upstream and upstream.port else 'routes nowhere'}: "
                f"nginx has not loaded that file (a deploy was interrupted between writing it and reloading nginx, "
                f"or it was edited by hand). Going by what nginx really routes to: {seen} keeps serving until the switch."
            )
        if active and active != seen:
            warnings.append(f"{cfg.project}.active says {active} but nginx routes to {seen}; trusting nginx.")
        return seen, warnings
    routed = cfg.colour_of_port(upstream.port) if upstream else None
    if upstream and upstream.port and routed is None:
        warnings.append(
            f"{upstream_path} points at port {upstream.port}, which is neither BLUE_PORT "
            f"({cfg.blue_port}) nor GREEN_PORT ({cfg.green_port}); deploying as if nothing were active."
        )
    if routed and active and routed != active:
        warnings.append(
            f"{cfg.project}.active says {active} but nginx routes to {routed}; trusting nginx, so {routed} keeps "
            f"serving until the switch."
        )
    return routed or (active if not upstream else None), warnings


def observe_route(cfg: ProjectConfig, upstream: Upstream | None, probe: Callable[..., health.Probe]) -> int | None:
    """The port nginx routes the project to right now, from the route header of a probe through nginx;
    None when it cannot tell (no token yet, a server block without the header line, nginx down)."""
    if upstream is None or not upstream.token:
        return None
    url, timeout = f"{cfg.nginx_url}{cfg.health_path}", min(cfg.health_request_timeout, OBSERVE_TIMEOUT)
    answer = probe(url, timeout=timeout, host=cfg.server_name, headers={ngx.PROBE_HEADER: upstream.token})
    port = ngx.route_port(_header(answer, ngx.ROUTE_HEADER))
    if port is None:
        return None
    # The header must come from nginx's map, which answers only to the token: if it also comes back without
    # the token, the app behind nginx sends it itself, and it proves nothing (what bluegreen removes hangs on it).
    plain = probe(url, timeout=timeout, host=cfg.server_name)
    return None if any(key.lower() == ngx.ROUTE_HEADER.lower() for key in (plain.headers or {})) else port


def read_current(settings: Settings, cfg: ProjectConfig,
                 probe: Callable[..., health.Probe] | None = None) -> tuple[str | None, Upstream | None, list[str]]:
    """current_colour from the files on disk (and, given a probe, from where nginx really routes)."""
    path = settings.upstream_file(cfg.project)
    upstream = parse_upstream(state.read_text(path, root=settings.root))
    observed = observe_route(cfg, upstream, probe) if probe else None
    colour, warnings = current_colour(cfg, active=state.read_active(settings.active_file(cfg.project)), upstream=upstream,
                                      upstream_path=path, observed=observed)
    return colour, upstream, warnings


def plan_deploy(
    settings: Settings,
    cfg: ProjectConfig,
    tag: str,
    *,
    active: str | None,
    upstream: Upstream | None,
    observed: int | None = None,
    digest: str = "",
    token_factory: Callable[[], str] = new_token,
    upstream_text: str | None = None,
    ephemeral: tuple[int, int] | None = None,
) -> tuple[Plan, list[str]]:
    """Decide the target colour and everything the deploy will write and run.

    `observed`: the port a probe through nginx was routed to; `digest`: deploy IMAGE@digest, labelled `tag`;
    `upstream_text`: the upstream file as found (its hand-added lines are warned about); `ephemeral`: the kernel's
    ephemeral port range (ports inside it are warned about).
    """
    if upstream is not None and upstream.token and len(set(upstream.ports)) > 1:
        # A canary step's file, left by a deploy that was killed (SIGKILL, a crash): nginx may route to both
        # containers, so neither may be replaced until a person says which one serves.
        path = settings.upstream_file(cfg.project)
        both = " and ".join(f"127.0.0.1:{p}" for p in sorted(set(upstream.ports)))
        raise UsageError(
            f"{path} routes to {both}: a canary step of a deploy that was killed before it ended. nginx may be "
            f"sending requests to both containers, so nothing was changed. Keep the server line of the version that "
            f"should serve (`{cfg.project}.active` names the colour of the last complete deploy), delete the other, "
            f"run `nginx -t && nginx -s reload`, then deploy again.")
    current, warnings = current_colour(cfg, active=active, upstream=upstream, upstream_path=settings.upstream_file(cfg.project),
                                       observed=observed)
    seen = current is not None and observed is not None and cfg.colour_of_port(observed) == current
    target = "green" if current == "blue" else "blue"
    plan = Plan(
        cfg=cfg,
        tag=tag,
        ref=f"{cfg.image}@{digest}" if digest else image_ref(cfg.image, tag),
        current=current,
        target=target,
        upstream_name=upstream.name if upstream else cfg.project,
        token=upstream.token if upstream and upstream.token else token_factory(),
        routed_port=observed if seen else (upstream.port if upstream else 0),
        upstream_path=settings.upstream_file(cfg.project),
        active_path=settings.active_file(cfg.project),
        docker_cmd=settings.docker_cmd,
        nginx_cmd=settings.nginx_cmd,
        route_seen=seen,
    )
    path = str(settings.upstream_file(cfg.project))
    warnings += ngx.foreign_warning(ngx.foreign_directives(upstream_text, plan.upstream_text()), path, cfg.source)
    if ephemeral is not None:
        note = ports.ephemeral_warning([("BLUE_PORT", cfg.blue_port), ("GREEN_PORT", cfg.green_port)], ephemeral, cfg.source)
        if note:
            warnings.append(note)
    return plan, warnings


def read_plan(settings: Settings, cfg: ProjectConfig, tag: str, *, probe: Callable[..., health.Probe] | None = None,
              digest: str = "") -> tuple[Plan, list[str]]:
    """plan_deploy from the files on disk and, given a probe, from where nginx really routes now."""
    path = settings.upstream_file(cfg.project)
    text = state.read_text(path, root=settings.root)
    upstream = parse_upstream(text)
    return plan_deploy(settings, cfg, tag, active=state.read_active(settings.active_file(cfg.project)), upstream=upstream,
                       observed=observe_route(cfg, upstream, probe) if probe else None, digest=digest,
                       upstream_text=text, ephemeral=ports.ephemeral_range())


class Progress:
    """One line per step on stderr, with its elapsed time; keeps the durations."""

    def __init__(self, stream: TextIO, clock: Callable[[], float] = time.monotonic, *, pause_at: str = "") -> None:
        self.stream = stream
        self.clock = clock
        self.durations: dict[str, float] = {}
        self.failed_step: str | None = None
        # Fault injection for the tests (BLUEGREEN_FAULT_PAUSE=STEP[:SECONDS]): pause at the start of STEP so
        # that a signal (kill -9, SIGTERM, Ctrl-C) lands inside it. It only ever waits; it changes nothing.
        step, _, seconds = pause_at.partition(":")
        self.pause_step = step.strip()
        try:
            self.pause_seconds = min(600.0, max(0.0, float(seconds))) if seconds else 30.0
        except ValueError:
            self.pause_seconds = 30.0

    def say(self, text: str) -> None:
        say(self.stream, text)

    @contextmanager
    def step(self, number: int, name: str, detail: str) -> Iterator[list[str]]:
        """Yields a list the step may append a result note to."""
        start = self.clock()
        notes: list[str] = []
        try:
            if name == self.pause_step:
                self.say(f"fault-pause: {name} (pid {os.getpid()}, {self.pause_seconds:g}s)")
                time.sleep(self.pause_seconds)
            yield notes
        except BaseException:
            self.durations[name] = self.clock() - start
            self.failed_step = self.failed_step or name
            self.say(f"[{number}/6] {name:<7} {detail}: FAILED after {self.durations[name]:.2f}s")
            raise
        self.durations[name] = self.clock() - start
        extra = f" ({'; '.join(notes)})" if notes else ""
        self.say(f"[{number}/6] {name:<7} {detail}{extra}: {self.durations[name]:.2f}s")


class Transaction:
    """Undo actions registered as steps succeed; on any failure (Ctrl-C too) they run in reverse."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.undos: list[tuple[str, Callable[[], None]]] = []
        self.committed = False
        self.failure: BaseException | None = None  # what the undos run for (an undo may act on it)

    def on_failure(self, description: str, undo: Callable[[], None]) -> None:
        self.undos.append((description, undo))

    def commit(self) -> None:
        self.committed = True
        self.undos.clear()

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None or self.committed:
            return
        self.failure = exc
        failures: list[str] = []
        for description, undo in reversed(self.undos):
            try:
                undo()
                self.progress.say(f"      undo: {description}")
            except BaseException as undo_exc:  # keep undoing the rest, then report
                failures.append(f"{description}: {_short(undo_exc)}")
        self.undos.clear()
        if failures:
            raise NeedsAttention(
                f"{_short(exc)}\nThen putting things back failed too: {'; '.join(failures)}. The service needs a "
                f"look: check `nginx -t`, the upstream file and `docker ps` for this project."
            ) from exc


def _short(exc: BaseException) -> str:
    if isinstance(exc, BluegreenError):
        return exc.message
    if isinstance(exc, Interrupted):
        return f"interrupted by {exc.signame}"
    return f"{type(exc).__name__}: {exc}"


def exposed_warning(plan: Plan, old: dk.Container | None) -> str | None:
    """What a deploy says when the container it replaces publishes its port on every address (the guide's
    deploy.sh did, `-p PORT:8080`): why that matters and that this deploy ends it (pure)."""
    addresses = dk.exposed_addresses(old)
    if not addresses or old is None:
        return None
    return (
        f"{old.name}, which serves now, publishes its port on every address of this host ({addresses}), not on "
        f"127.0.0.1 only: the app is reachable directly, around nginx and bypassing it, from anything that can "
        f"reach this host, e.g. other hosts in the VPC. This deploy replaces it: {plan.target_name} is published on "
        f"127.0.0.1:{plan.target_port} only, and {old.name} is stopped once the new version serves."
    )


def port_in_use(port: int) -> bool:
    """True if something listens on 127.0.0.1:port (a bind test, as docker itself would fail)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        return False
    except OSError:
        return True
    finally:
        sock.close()


@dataclass
class Deployer:
    """Runs a Plan against the host through one Runner."""

    settings: Settings
    runner: Runner
    progress: Progress
    probe: Callable[..., health.Probe] = health.http_probe
    port_busy: Callable[[int], bool] = port_in_use
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    # What the probe through nginx before this deploy answered (read_plan's), so that messages say what was
    # seen; and whether check() also checks nginx (attempt does; the pure tests of the steps do not).
    seen_before: health.Probe | None = None
    check_nginx_first: bool = False
    # A rollback is the way out of an incident: no canary steps keeping traffic on the release being left,
    # and no watch that could switch back to it.
    judge_release: bool = True
    # A rollback: check() decides whether the retained container of the target colour is started again instead
    # (instant.decide); a deploy always pulls and creates.
    instant_ok: bool = False

    def __post_init__(self) -> None:
        self.docker = dk.Docker(self.runner, self.settings.docker_cmd)
        self.nginx = Nginx(self.runner, self.settings.nginx_cmd)
        self.old: dk.Container | None = None  # what served before, once check() has looked
        self.old_tag: str | None = None  # the tag it runs (its label, else its image reference)
        self.leftover: dk.Container | None = None  # what sat in the idle slot
        self.serving = ""  # serving_note(): what serves now, as far as was seen
        self.checked: Plan | None = None  # the plan check() passed
        self.digest = ""  # what docker pull reported
        self.retained: instant.Decision | None = None  # check()'s decision, for a rollback (instant_ok)
        # Whether nginx was asked to route to the new container, and whether the undo routed it back: the
        # new container is removed by the undo only when nginx cannot be routing to it.
        self.reload_state = {"attempted": False, "done": False, "routed_back": False}
        self.switch_undo_registered = False  # a canary step's write registered it; the full switch does not again
        self.switch_before: dict[str, set[int]] = {"workers": set()}
        self.watch_log: str | None = None  # the file the server block logs the watch format to (preflight's dump)
        self.watch_log_known = False

    def serving_note(self, plan: Plan, old: dk.Container | None) -> str:
        """Which version serves now, for every failure message: only what was seen, never more."""
        if plan.current is None:
            return "Nothing was serving before this deploy, and nothing new serves now."
        port = plan.cfg.port(plan.current)
        if old is not None and old.running:
            tag = old.tag_in(plan.cfg.image) or "?"
            what = f"The previous version ({tag}, container {old.name}, 127.0.0.1:{port})"
            seen = self.seen_before
            routed = seen is not None and ngx.route_port(_header(seen, ngx.ROUTE_HEADER)) == port
            if routed and seen.status == plan.cfg.health_expect:
                return (f"{what} still serves: just before this deploy, a probe through nginx was routed to it and "
                        f"answered HTTP {seen.status}.")
            if routed:
                return (f"{what} was left as it was: just before this deploy, a probe through nginx was routed to it "
                        f"and answered {seen.detail}, not HTTP {plan.cfg.health_expect}.")
            answered = f" (nginx answered {seen.detail} without saying where it routed)" if seen is not None else ""
            return (f"{what} was running and was left as it was; bluegreen did not see it answer through "
                    f"nginx{answered}.")
        if plan.route_seen:
            return (
                f"nginx still routes to {plan.current_name} on 127.0.0.1:{port}, but that container is not running, "
                f"so the service is down as it was before this deploy."
            )
        return (
            f"The upstream file still routes to {plan.current_name} on 127.0.0.1:{port}, which is not running: if "
            f"nginx has loaded that file, the service is down as it was before this deploy."
        )

    def preflight(self, plan: Plan) -> None:
        """Before the pull, what would make the switch fail: nginx not running, `nginx -t` failing, the
        upstream include missing. Raises with the real cause and its fix; changes nothing."""
        from bluegreen import host  # host set-up facts; kept off the import path of the pure deploy steps

        me = host.invocation()
        nothing = f"Nothing was pulled or changed for {plan.cfg.project}."
        try:
            dump = self.nginx.test_and_dump()
        except CommandError as exc:
            text = Nginx.error_text(exc)
            if "host not found in upstream" in text:
                fix = (f"nginx loads a server block whose upstream it cannot find: most likely nginx.conf lacks "
                       f"`{host.include_line(self.settings)}`, which `sudo {me} setup` adds (it changes nothing "
                       f"else); then deploy again.")
            else:
                fix = "Fix the nginx error above (it names file and line), check with `nginx -t`, then deploy again."
            raise UsageError(f"nginx rejects its configuration (`nginx -t`), so this deploy could not switch traffic:"
                             f"\n{indent(text)}\n{nothing} {fix}") from exc
        self.watch_log, self.watch_log_known = wt.find_log_path(dump, plan.cfg.project), True
        master, pid_file = ngx.master_pid(dump, self.settings.nginx_cmd, self.settings.nginx_pid_file)
        if master is None:
            raise DeployFailed(
                f"nginx is not running (no live nginx master process in {pid_file}), so nothing answers at "
                f"{plan.cfg.nginx_url} and this deploy could not switch traffic. {nothing} Start nginx "
                f"(`systemctl start nginx`; `journalctl -u nginx` says why it stopped, and `systemctl enable nginx` "
                f"starts it at boot), then deploy again. (If nginx does run, its master writes another pid file: set "
                f"BLUEGREEN_NGINX_PID_FILE.)"
            )
        if not host.includes_dir(dump, host.upstream_dir(self.settings)):
            raise UsageError(
                f"nginx does not load bluegreen's upstream directory: its configuration (`nginx -T`) has no "
                f"`{host.include_line(self.settings)}`, so a switch would never reach nginx. {nothing} Run "
                f"`sudo {me} setup`, which adds exactly that line to nginx.conf's http block, then deploy again."
            )

    def check(self, plan: Plan) -> None:
        """What serves and what sits in the idle slot, and (check_nginx_first) whether nginx could take a
        switch: every refusal that needs no pull. Changes nothing; run() calls it unless the caller did."""
        names = [n for n in (plan.current_name, plan.target_name) if n]
        try:
            # Both colours in one docker call: what serves, and what is left in the idle slot.
            found = self.docker.inspect_many(names)
        except CommandError as exc:
            raise DeployFailed(
                f"Cannot ask docker about {' and '.join(names)}: {exc.output_tail(3)}\nNothing was changed: nginx "
                f"routes as before{' (to ' + plan.current_name + ')' if plan.current_name else ''}. Check that "
                f"dockerd runs and this user may use it (`docker info`), then deploy again."
            ) from exc
        old = found.get(plan.current_name) if plan.current_name else None
        leftover = found.get(plan.target_name)
        self.old, self.leftover = old, leftover
        self.old_tag = old.tag_in(plan.cfg.image) if old is not None else None
        self._refuse_serving_leftover(plan, leftover)
        self.serving = self.serving_note(plan, old)
        self._refuse_unproven_leftover(plan, leftover, self.serving)
        if self.check_nginx_first:
            self.preflight(plan)
        if self.instant_ok:
            self.retained = instant.look(self.docker, plan, leftover)
            self.progress.say(self.retained.say())
        note = exposed_warning(plan, old)
        if note:
            self.progress.say(f"warning: {note}")
        self.checked = plan

    def run(self, plan: Plan) -> str:
        """Deploy; returns the final one-line summary. Raises a BluegreenError on failure."""
        cfg = plan.cfg
        start = self.clock()
        if self.checked is not plan:
            self.check(plan)
        old, leftover, serving = self.old, self.leftover, self.serving
        retained = self.instant

        tail: wt.LogTail | None = None
        try:
            if retained:
                self._skip_pull(plan)
            else:
                self._pull(plan, serving)
            tail = self._watch_start(plan)
            with Transaction(self.progress) as tx:
                if retained:
                    self._start_retained(plan, tx, serving)
                else:
                    self._start(plan, tx, serving, leftover)
                self._health(plan, serving)
                promoted = False
                for percent in (canary_steps(plan.cfg.canary_steps) or ()) if tail is not None else ():
                    self._switch(plan, tx, serving, canary=percent)
                    promoted = Judge(self, plan, tail, seconds=plan.cfg.canary_step_seconds, name="canary",
                                     what=f"{percent}% of requests to {plan.target_name}", percent=percent).run()
                    if promoted:
                        break
                self._switch(plan, tx, serving)
                if tail is not None and plan.cfg.watch_seconds > 0 and not promoted:
                    Judge(self, plan, tail, seconds=plan.cfg.watch_seconds, name="watch",
                          what=f"real traffic to {plan.target_name}").run()
                tx.commit()
        except Interrupted as exc:
            raise DeployFailed(
                f"Deploy of {plan.ref} interrupted by {exc.signame} before the switch was complete"
                + (f" (during the {self.progress.failed_step})" if self.progress.failed_step in ("watch", "canary") else "")
                + f"; whatever it had started was {self.undone} and the nginx upstream put back. {serving} Deploy again when ready."
            ) from exc
        except safefs.UnsafePath as exc:  # a link or FIFO planted under the root while the deploy ran
            raise DeployFailed(
                f"{exc.message}\nEverything this deploy had changed was put back. {serving}"
            ) from exc
        except CommandError as exc:  # a docker/nginx call no step had a better message for
            raise DeployFailed(
                f"{exc.message}\nEverything this deploy had changed was put back. {serving} Check `docker info` "
                f"and `nginx -t`, then deploy again."
            ) from exc
        except OSError as exc:  # a file no step had a better message for (full disk, permissions)
            raise DeployFailed(
                f"{os_problem(exc)} Everything this deploy had changed was put back. {serving} Fix the cause (free "
                f"disk space, the file's permissions), then deploy again."
            ) from exc
        finally:
            if tail is not None:
                tail.close()

        new_desc = f"{cfg.project} {plan.tag} now serves from {plan.target_name} on 127.0.0.1:{plan.target_port}"
        try:
            self._retire(plan, old, new_desc)
            self._record(plan, new_desc)
        except Interrupted as exc:
            if self.progress.failed_step == "record":  # the old container is already stopped
                raise NeedsAttention(
                    f"{new_desc}, but the deploy was interrupted by {exc.signame} while recording it. Check that "
                    f"{plan.active_path} says {plan.target} (`echo {plan.target} > {plan.active_path}`)."
                ) from exc
            raise NeedsAttention(
                f"{new_desc}, but the deploy was interrupted by {exc.signame} while retiring the old container. "
                f"Check `docker ps` and stop {plan.current_name} if it still runs; then check {plan.active_path} "
                f"says {plan.target}."
            ) from exc
        except safefs.UnsafePath as exc:
            raise NeedsAttention(
                f"{new_desc}, but then: {exc.message} Check that {plan.active_path} says {plan.target}."
            ) from exc
        except OSError as exc:
            raise NeedsAttention(
                f"{new_desc}, but then: {os_problem(exc)} Check that {plan.current_name or 'no old container'} is "
                f"stopped (`docker ps`) and that {plan.active_path} says {plan.target}."
            ) from exc
        was = f" (was {self.old_tag or '?'} in {old.name})" if old is not None and old.running else ""
        if retained:
            return f"{new_desc}{was}; instant rollback in {self.clock() - start:.1f}s (the retained container, nothing pulled)."
        return f"{new_desc}{was}; deployed in {self.clock() - start:.1f}s."

    @property
    def instant(self) -> bool:
        """Whether this run takes the instant path: check() decided so for a rollback."""
        return self.instant_ok and self.retained is not None and self.retained.instant

    @property
    def undone(self) -> str:
        """What the undo does to the container this run started, for messages."""
        return "stopped again (kept, as the retained copy)" if self.instant else "removed"

    def pull_only(self, plan: Plan) -> None:
        """The pull step on its own (`bluegreen pull`): nothing else is looked at or changed."""
        self._pull(plan, "Nothing else was changed: what serves keeps serving.")

    def _skip_pull(self, plan: Plan) -> None:
        """The instant path's step 1: no registry call, no `docker pull`; the journal gets the digest decided."""
        retained = self.retained
        if retained is None:
            return
        self.digest = retained.digest
        self.progress.say(f"[1/6] pull    nothing to pull: {retained.name} keeps {retained.tag}'s image "
                          f"{retained.image_id[:19]} on this host (instant rollback)")

    def _pull(self, plan: Plan, serving: str) -> None:
        cfg, policy = plan.cfg, plan.cfg.pull
        env_file = self.settings.env_file(cfg.project)
        pinned = plan.ref.startswith(f"{cfg.image}@")
        with self.progress.step(1, "pull", plan.ref) as notes:
            local = None
            if policy != "always":
                try:
                    local = self.docker.local_image(plan.ref)
                except CommandError as exc:
                    raise DeployFailed(
                        f"Cannot ask docker whether this host has {plan.ref} (PULL={policy}): {exc.output_tail(3)}\n"
                        f"{serving} Check that dockerd runs and this user may use it (`docker info`), then try again."
                    ) from exc
            decision = dk.pull_needed(policy, local)
            if decision is False and local is not None:
                # Nothing pulled: the journal gets the registry digest the image is known by here, if any (an
                # image ID is no digest: `IMAGE@ID` names nothing, so a rollback could not deploy it).
                self.digest = plan.ref.rpartition("@")[2] if pinned else local.digest_for(cfg.image)
                notes.append(f"PULL={policy}: this host has it, image {local.id[:19]}; nothing pulled")
                return
            if decision is None:
                digest_note = (
                    " A digest names a registry manifest: an image loaded with `docker load` or built on this host has "
                    "none (the sha256 `docker image inspect` shows is its ID), so deploy it by its tag."
                ) if pinned else ""
                raise DeployFailed(
                    f"This host has no image {plan.ref}, and PULL=never ({env_file}) forbids pulling it, so nothing was "
                    f"started.{digest_note}\n{serving} Load it (`docker load -i FILE.tar`) or build it here under that "
                    f"name (`docker images {cfg.image}` lists what this host has), or set PULL=missing to pull it, then "
                    f"deploy again."
                )
            try:
                self.digest = self.docker.pull(plan.ref)
            except CommandError as exc:
                registry = registry_host(cfg.image)
                if registry == "docker.io" and not cfg.image.startswith("docker.io/"):
                    # A name without a registry host goes to Docker Hub: usually a loaded or locally built image.
                    hint = (f"{cfg.image} names no registry, so docker pulls it from Docker Hub. An image loaded with "
                            f"`docker load` or built on this host deploys with PULL=missing (or never) in {env_file}; "
                            f"a Docker Hub image needs the tag to exist there (and `docker login` if it is private).")
                else:
                    hint = (f"Check that the tag exists in the registry and that this host is logged in to it "
                            f"(`docker login {registry}`).")
                missing = (" This host does not have it either (PULL=missing pulls only what is not here)."
                           if policy == "missing" else "")
                raise DeployFailed(
                    f"Could not pull {plan.ref} (PULL={policy}): {exc.output_tail(4)}{missing}\n{serving} {hint} "
                    f"Then deploy again."
                ) from exc

    @staticmethod
    def _refuse_serving_leftover(plan: Plan, leftover: dk.Container | None) -> None:
        """Stop before anything changes if the idle slot's running container may be what serves."""
        cfg = plan.cfg
        if leftover is not None and leftover.running and plan.current is None and plan.routed_port:
            # nginx routes to a port neither colour has (BLUE_PORT/GREEN_PORT were changed):
            # this running container may be the one serving, so it must not be removed.
            raise UsageError(
                f"nginx routes {cfg.project} to 127.0.0.1:{plan.routed_port}, which is neither BLUE_PORT "
                f"({cfg.blue_port}) nor GREEN_PORT ({cfg.green_port}) in {cfg.source}, and {plan.target_name} "
                f"is running, so it may be what serves. Nothing was changed. To move ports, change one colour's "
                f"port at a time: first the port of the colour that is not serving, deploy, then the other."
            )

    @staticmethod
    def _refuse_unproven_leftover(plan: Plan, leftover: dk.Container | None, serving: str) -> None:
        """Never remove a running container that nginx may route to.

        The upstream file says what nginx will route to after its next reload, not what it routes to now (a
        deploy killed between writing the file and reloading, a hand edit). Only a probe through nginx shows
        the live route; without one, a running container in the idle slot is left alone.
        """
        if leftover is None or not leftover.running or plan.route_seen:
            return
        raise DeployFailed(
            f"{plan.target_name} is running, and bluegreen could not see where nginx routes {plan.cfg.project} now "
            f"(a probe of {plan.verify_url()} with the probe token got no route header: nginx is down, or the server "
            f"block lacks `{ngx.add_header_line(plan.cfg.project)}`), so it cannot rule out that nginx still routes "
            f"to {plan.target_name}. Nothing was changed. {serving} Add that line to the server block (and check "
            f"`{plan.cfg.nginx_url}` answers), or, if you are sure {plan.target_name} takes no traffic, "
            f"`docker stop {plan.target_name}`; then deploy again."
        )

    def _start(self, plan: Plan, tx: Transaction, serving: str, leftover: dk.Container | None) -> None:
        cfg = plan.cfg
        with self.progress.step(2, "start", f"{plan.target_name} on 127.0.0.1:{plan.target_port}") as notes:
            # `leftover` was inspected before the pull; the lock keeps other deploys out since, and
            # `docker rm --force` accepts a container that has gone meanwhile.
            if leftover is not None:
                self.docker.remove(plan.target_name)
                notes.append(f"removed leftover {leftover.status} container")
            self._refuse_busy_port(plan, serving)
            tx.on_failure(f"remove {plan.target_name}", lambda: self._remove_new(plan))
            env = cfg.container_env()
            try:
                # The app's environment (secrets) goes to docker through a pipe, so no file holding it
                # can outlive this process, whatever kills it.
                self.docker.run(plan.run_argv(dk.ENV_STDIN if env else None),
                                input=dk.env_file_text(env).encode("utf-8") if env else None)
            except CommandError as exc:
                raise DeployFailed(
                    f"Could not start {plan.target_name} from {plan.ref}: {exc.output_tail(4)}\n{serving} "
                    f"Check DOCKER_ARGS in {cfg.source} and `docker info`, then deploy again."
                ) from exc

    def _refuse_busy_port(self, plan: Plan, serving: str) -> None:
        """Step 2 starts nothing on a port that something else holds."""
        if not self.port_busy(plan.target_port):
            return
        holder = self._port_holder(plan.target_port)
        if holder == "another process":
            # No container publishes it: often the local end of nginx's own connections (ephemeral range).
            outgoing = ports.outgoing_states(plan.target_port)
            if outgoing:
                holder = ports.outgoing_note(plan.target_port, outgoing, ports.ephemeral_range())
        raise DeployFailed(
            f"Port 127.0.0.1:{plan.target_port} ({plan.target.upper()}_PORT) is already taken by "
            f"{holder}, not by a bluegreen container of {plan.cfg.project}. Nothing was started. {serving} "
            f"Free the port (see `ss -ltnp 'sport = :{plan.target_port}'`) or change "
            f"{plan.target.upper()}_PORT in {plan.cfg.source}, then deploy again."
        )

    def _start_retained(self, plan: Plan, tx: Transaction, serving: str) -> None:
        """The instant path's step 2: `docker start` the retained container instead of `docker run`."""
        name, tag = plan.target_name, plan.tag
        with self.progress.step(2, "start", f"{name} on 127.0.0.1:{plan.target_port}") as notes:
            self._refuse_busy_port(plan, serving)
            # Registered before the start: a start cut short (Ctrl-C) may still have started it.
            tx.on_failure(f"stop {name} again (kept, as the retained copy)", lambda: self._stop_retained(plan))
            try:
                self.docker.start(name)
            except CommandError as exc:
                raise DeployFailed(
                    f"Could not start the retained {name} ({tag}) for an instant rollback: {exc.output_tail(4)}\n"
                    f"{serving} `docker rm {name}` and roll back again: that pulls {plan.ref} and creates it afresh."
                ) from exc
            notes.append(f"instant rollback: started the retained {name} ({tag})")

    def _stop_retained(self, plan: Plan) -> None:
        """The instant path's undo of step 2: stop the retained container again, never remove it (it is still the
        retained copy of its tag), unless nginx may still route to it."""
        if self.reload_state["attempted"] and not self.reload_state["routed_back"]:
            raise NeedsAttention(
                f"kept {plan.target_name} running: the upstream could not be routed back, so nginx may route to it"
            )
        # Nothing routes to it: a short grace, so that the undo after a signal ends well before a SIGKILL.
        grace = min(plan.cfg.stop_timeout, int(UNDO_DRAIN_ON_INTERRUPT))
        try:
            self.docker.stop(plan.target_name, grace)
        except CommandError as exc:
            if "no such container" not in (exc.stderr + exc.stdout).lower():
                raise

    def _remove_new(self, plan: Plan) -> None:
        """The undo of step 2: remove the new container, unless nginx may still route to it."""
        if self.reload_state["attempted"] and not self.reload_state["routed_back"]:
            raise NeedsAttention(
                f"kept {plan.target_name} running: the upstream could not be routed back, so nginx may route to it"
            )
        self.docker.remove(plan.target_name)

    def _watch_start(self, plan: Plan) -> wt.LogTail | None:
        """Before the switch: where the watch will read what nginx served (from the end of that log as it is
        now), or None when there is no watch (WATCH_SECONDS=0, no log line, nothing to switch back to)."""
        cfg = plan.cfg
        if not self.judge_release:
            return None
        wanted = " and ".join(w for w in (f"WATCH_SECONDS={cfg.watch_seconds:g}" if cfg.watch_seconds > 0 else "",
                                          f"CANARY_STEPS={cfg.canary_steps}" if cfg.canary_steps else "") if w)
        if not wanted:
            return None
        if plan.current is None or self.old is None or not self.old.running:
            self.progress.say(f"note: {wanted}, but no running container served before this deploy, so there is "
                              f"nothing to switch back to: deploying without a watch (and switching at once).")
            return None
        if not self.watch_log_known:
            try:
                self.watch_log = wt.find_log_path(self.nginx.test_and_dump(), cfg.project)
            except CommandError:
                self.watch_log = None  # the switch step reports nginx's error
            self.watch_log_known = True
        if self.watch_log is None:
            self.progress.say(
                f"note: {wanted}, but the server block of {cfg.project} has no "
                f"`{wt.access_log_line(cfg.project)}` line, so bluegreen cannot see what nginx serves: deploying "
                f"without a watch (and switching at once). To enable it, add `{wt.log_format_line(cfg.project)}` above "
                f"the server block and that line (any absolute path) inside it (`bluegreen doctor` checks them).")
            return None
        tail = wt.LogTail(self.watch_log)
        tail.start()
        problem = tail.problem()
        if problem:
            tail.close()
            self.progress.say(f"warning: {wanted}, but the watch log {problem}, so bluegreen cannot see what nginx "
                              f"serves: deploying without a watch (and switching at once). Point the access_log line "
                              f"at a regular file.")
            return None
        return tail

    def _port_holder(self, port: int) -> str:
        names = self.docker.publishers(port)
        return f"container {', '.join(names)}" if names else "another process"

    def _health(self, plan: Plan, serving: str) -> None:
        cfg = plan.cfg
        url = plan.health_url()
        with self.progress.step(3, "health", f"GET {url}") as notes:

            def alive() -> str | None:
                found = self.docker.inspect(plan.target_name)
                return "the container disappeared" if found is None else found.crash_note()

            result = health.wait_healthy(
                lambda t: self.probe(url, timeout=t, host=cfg.health_host),
                expect=cfg.health_expect,
                timeout=cfg.health_timeout,
                interval=cfg.health_interval,
                initial_delay=cfg.health_initial_delay,
                request_timeout=cfg.health_request_timeout,
                alive=alive,
                clock=self.clock,
                sleep=self.sleep,
            )
            if result.healthy:
                notes.append(f"HTTP {cfg.health_expect} after {result.attempts} tries")
                return
            logs = self.docker.logs(plan.target_name, tail=20)
            last = result.last.detail if result.last else "no request completed"
            if result.died:
                what = f"{plan.target_name} ({plan.ref}) exited while starting: {result.died}."
                advice = "Fix the crash shown in its log, then deploy again."
                if self.instant:  # the retained container starts with the files its previous run left in it
                    advice = (f"If what its previous run left in it is the cause, `docker rm {plan.target_name}` and "
                              f"roll back again: that pulls {plan.ref} and creates it afresh.")
            else:
                what = (
                    f"{plan.target_name} ({plan.ref}) did not answer HTTP {cfg.health_expect} on {url} within "
                    f"HEALTH_TIMEOUT={cfg.health_timeout:g}s (last answer: {last})."
                )
                advice = (
                    f"If the app is just slow to boot, raise HEALTH_TIMEOUT in {cfg.source}; otherwise check "
                    f"HEALTH_PATH and the app's dependencies (database, config), then deploy again."
                )
            raise DeployFailed(
                f"{what} It was {self.undone}. {serving} {advice}",
                details=f"Last log lines of {plan.target_name}:\n{indent(logs)}",
            )

    def _switch(self, plan: Plan, tx: Transaction, serving: str, canary: int | None = None) -> None:
        """Step 4: write the upstream, `nginx -T`, reload, drain the old workers, prove the new route. A canary
        step (`canary` percent to the new container) only writes and reloads; the first write registers the
        one undo that puts the previous file back."""
        path = plan.upstream_path
        label = f"nginx -> {canary}% to 127.0.0.1:{plan.target_port}" if canary else f"nginx -> 127.0.0.1:{plan.target_port}"
        with self.progress.step(4, "switch", label):
            reload = self.reload_state
            before = self.switch_before  # the workers of the config that routes to the old one only
            if not self.switch_undo_registered:
                self._register_restore(plan, tx, serving, path, reload, before)
            try:
                safefs.atomic_write(path, plan.upstream_text(canary), root=self.settings.root, make_dirs=True)
            except OSError as exc:
                raise DeployFailed(
                    f"Could not write {path} ({exc.strerror or exc}); traffic was not switched and the new "
                    f"container was {self.undone}. {serving} Free space or make the deploy root writable for this user, "
                    f"then deploy again."
                ) from exc
            try:
                dump = self.nginx.test_and_dump()
            except CommandError as exc:
                raise DeployFailed(
                    f"nginx rejected the configuration (`nginx -t`), so traffic was not switched:\n"
                    f"{indent(Nginx.error_text(exc))}\nThe upstream file was put back and the new container "
                    f"{self.undone}. {serving} Fix the nginx error above (it may be in another file), check with "
                    f"`nginx -t`, then deploy again."
                ) from exc
            master, old_workers = self._master_and_workers(dump)
            if not reload["attempted"]:
                before["workers"] = old_workers
            try:
                # Marked before the call: a reload cut short (Ctrl-C, sudo surviving us) may
                # still have reached the master, so the undo must reload too.
                reload["attempted"] = True
                self.nginx.reload()
                reload["done"] = True
            except CommandError as exc:
                raise DeployFailed(
                    f"`nginx -s reload` failed: {Nginx.error_text(exc)}\nThe upstream file was put back. {serving} "
                    f"Check that nginx is running (`systemctl status nginx`), then deploy again."
                ) from exc
        if canary:
            return  # judged by the canary step; the full switch drains and verifies
        drained = self._drain(plan, master, old_workers)
        self._verify(plan, serving, drained)

    def _register_restore(self, plan: Plan, tx: Transaction, serving: str, path: Path, reload: dict, before: dict) -> None:
        """The switch's undo, registered once before the first write: the previous upstream file back, a
        reload, and the workers that may route to the new container drained."""
        try:
            previous = state.read_text(path, root=self.settings.root)
        except OSError as exc:
            raise DeployFailed(
                f"Could not read {path} ({exc.strerror or exc}); traffic was not switched and the new "
                f"container was {self.undone}. {serving} Check that file and its directory, then deploy again."
            ) from exc

        def restore() -> None:
            if previous is None:
                safefs.unlink(path, root=self.settings.root)
            else:
                state.atomic_write(path, previous, root=self.settings.root)
            if not reload["attempted"]:
                reload["routed_back"] = True
                return
            # Route back to the old container, then let the workers that may route to the new one
            # finish before it is removed. Workers from before the forward reload route to the old
            # container, which stays: they are not waited for.
            try:
                master, workers = self._master_and_workers(self.nginx.test_and_dump())
                self.nginx.reload()
            except CommandError:
                if reload["done"]:
                    raise
                # The forward reload failed or was cut short: nginx most likely never loaded
                # the new file, and cannot reload now either. Best effort, then go on.
                reload["routed_back"] = True
                return
            reload["routed_back"] = True
            bound = plan.cfg.drain_timeout
            if isinstance(tx.failure, Interrupted):
                # A cancelled CI job sends SIGKILL a few seconds after its first signal: the undo
                # must be over by then, so requests to the new container get a short grace only.
                bound = min(bound, UNDO_DRAIN_ON_INTERRUPT)
            self._wait_for_workers(master, workers - before["workers"], bound)

        # Registered before the write: whatever happens from here on, the previous file comes back.
        tx.on_failure(f"put back {path.name}", restore)
        self.switch_undo_registered = True

    def _master_and_workers(self, dump: str) -> tuple[int | None, set[int]]:
        """The nginx master pid (from its pid file) and its current worker pids."""
        master, pid_file = ngx.master_pid(dump, self.settings.nginx_cmd, self.settings.nginx_pid_file)
        if master is None:
            self.progress.say(
                f"warning: cannot read the nginx master pid from {pid_file}, so bluegreen cannot tell when old "
                f"workers have finished; set BLUEGREEN_NGINX_PID_FILE to the right file."
            )
            return None, set()
        return master, ngx.children(master)

    def _wait_for_workers(self, master: int | None, workers: set[int], timeout: float) -> tuple[bool, float]:
        """Wait until every one of `workers` has exited; returns (all exited, seconds waited)."""
        start = self.clock()
        if master is None:
            # Without the pid we cannot observe the workers: give nginx's 100 ms handover a
            # generous margin instead (the warning above says how to do better).
            self.sleep(min(1.0, timeout))
            return False, self.clock() - start
        deadline = start + timeout
        left = ngx.alive(workers, master)
        while left and self.clock() < deadline:
            self.sleep(0.02)
            left = ngx.alive(left, master)
        return not left, self.clock() - start

    def _drain(self, plan: Plan, master: int | None, old_workers: set[int]) -> bool:
        """Wait for the workers that predate the reload; True when all of them are known to be gone."""
        timeout = plan.cfg.drain_timeout
        detail = f"{len(old_workers)} nginx worker(s) from before the reload"
        with self.progress.step(4, "drain", detail) as notes:
            drained, _ = self._wait_for_workers(master, old_workers, timeout)
            if master is None:
                notes.append("waited a fixed 1s: master pid unknown")
            elif drained:
                notes.append("all exited")
            else:
                left = ngx.alive(old_workers, master)
                notes.append(f"{len(left)} still alive after DRAIN_TIMEOUT={timeout:g}s")
                # Whole workers are waited for, not just connections to the old port: a request
                # whose body nginx is still buffering connects upstream only later.
                cut = (
                    f" Those that go to {plan.current_name} may be cut when it stops now, unless the app finishes "
                    f"them within STOP_TIMEOUT={plan.cfg.stop_timeout}s; connections to other sites are not affected."
                    if plan.current_name else ""
                )
                self.progress.say(
                    f"warning: {len(left)} old nginx worker(s) (pid {', '.join(map(str, sorted(left)))}) still hold "
                    f"connections after DRAIN_TIMEOUT={timeout:g}s, usually websockets or long polls.{cut} Set "
                    f"`worker_shutdown_timeout` in nginx.conf (e.g. 30s) to bound them, or raise DRAIN_TIMEOUT in "
                    f"{plan.cfg.source}."
                )
            return drained and master is not None

    def _verify(self, plan: Plan, serving: str, drained: bool) -> None:
        """Prove that a request through nginx now reaches the new container, else fail (and undo).

        Once every old worker is gone each answer is final, so a few tries settle it; otherwise an
        old worker may still answer, and we retry until VERIFY_TIMEOUT.
        """
        cfg = plan.cfg
        url = plan.verify_url()
        want = f"127.0.0.1:{plan.target_port}"
        with self.progress.step(4, "verify", f"GET {url} via nginx") as notes:
            deadline = self.clock() + cfg.verify_timeout
            tries_left = 3 if drained else -1
            while True:
                tries_left -= 1
                probe = self.probe(
                    url, timeout=min(cfg.health_request_timeout, cfg.verify_timeout),
                    host=cfg.server_name, headers={ngx.PROBE_HEADER: plan.token},
                )
                route = _header(probe, ngx.ROUTE_HEADER)
                if route == want:
                    notes.append(f"routed to {want}")
                    return
                if not route and probe.status == cfg.health_expect:
                    notes.append("HTTP status only")
                    self.progress.say(
                        f"note: nginx answered {url} with HTTP {probe.status}, but the server block does not report "
                        f"where it routed, so bluegreen could not prove the new container serves. Add "
                        f"`{ngx.add_header_line(cfg.project)}` to the server block to enable the proof."
                    )
                    return
                if self.clock() >= deadline or tries_left == 0:
                    break
                self.sleep(cfg.health_interval)
            seen = f"routed to {route}" if route else f"answered {probe.detail}"
            problem = (
                f"After the switch, a probe through nginx ({url}, Host: {cfg.server_name or 'default'}) was "
                f"{seen} instead of reaching {plan.target_name} on {want}."
            )
            advice = (
                f"Check that the server block for {cfg.project} proxies to `http://{plan.upstream_name}` and that "
                f"NGINX_URL / SERVER_NAME in {cfg.source} reach it."
            )
            if plan.current is None:
                # First deploy: there is nothing to go back to, so keep the new container.
                notes.append("not proven")
                self.progress.say(f"warning: {problem} Nothing served before, so the deploy stands. {advice}")
                return
            raise DeployFailed(f"{problem} The previous upstream was put back and the new container {self.undone}. "
                               f"{serving} {advice}")

    def _retire(self, plan: Plan, old: dk.Container | None, new_desc: str) -> None:
        if old is None or not old.running:
            with self.progress.step(5, "retire", "nothing to stop"):
                return
        with self.progress.step(5, "retire", f"stop {old.name} (up to {plan.cfg.stop_timeout}s)"):
            try:
                self.docker.stop(old.name, plan.cfg.stop_timeout)
            except CommandError as exc:
                raise NeedsAttention(
                    f"{new_desc}, but stopping the old container {old.name} failed: {exc.output_tail(4)}\n"
                    f"Stop it by hand with `docker stop {old.name}`; no traffic goes to it."
                ) from exc

    def _record(self, plan: Plan, new_desc: str) -> None:
        with self.progress.step(6, "record", f"{plan.active_path.name} = {plan.target}"):
            try:
                state.write_active(plan.active_path, plan.target)
            except OSError as exc:
                raise NeedsAttention(
                    f"{new_desc}, but recording it in {plan.active_path} failed ({exc}). Write `{plan.target}` "
                    f"into that file (the upstream file already points at {plan.target})."
                ) from exc


def _header(probe: health.Probe, name: str) -> str:
    """The one value of header `name`; "" when absent or when several differ only in case (the app behind
    nginx may send its own: nginx's comes last among same-case duplicates, but case variants are ambiguous)."""
    found = [value.strip() for key, value in (probe.headers or {}).items() if key.lower() == name.lower()]
    return found[0] if len(found) == 1 else ""
