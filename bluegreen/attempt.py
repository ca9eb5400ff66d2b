"""One deploy attempt with its bookkeeping: lock, freeze, hooks, journal, notification, rollback target."""

from __future__ import annotations

import datetime
import getpass
import os
import socket
import time
from dataclasses import replace
from typing import Callable, Mapping, TextIO

from bluegreen.host import invocation
from bluegreen import health, hooks, instant, journal, notify
from bluegreen import docker as dk
from bluegreen.config import ProjectConfig, Settings, load_project, validate_project, validate_tag
from bluegreen.deploy import Deployer, Plan, Progress, read_current, read_plan
from bluegreen.errors import (
    EXIT_ATTENTION,
    EXIT_FAILED,
    EXIT_OK,
    BluegreenError,
    CommandError,
    ConfigError,
    DeployFailed,
    Interrupted,
    LockedError,
    NeedsAttention,
    UsageError,
    os_problem,
    say,
)
from bluegreen.journal import recorded_digest
from bluegreen.lock import Holder, project_lock, read_freeze
from bluegreen.nginx import route_clash, route_clash_message
from bluegreen.runner import Runner, SubprocessRunner


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def user_name(environ: Mapping[str, str]) -> str:
    """Who deploys; `SUDO_USER` names the person behind a sudo."""
    sudo_user = environ.get("SUDO_USER")
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry and no USER variable (env -i in a container)
        user = str(os.getuid())
    return f"{sudo_user} (via sudo as {user})" if sudo_user and sudo_user != user else user


def _result_for(code: int) -> str:
    if code == EXIT_OK:
        return journal.RESULT_DEPLOYED
    if code == EXIT_FAILED:
        return journal.RESULT_FAILED
    if code == EXIT_ATTENTION:
        return journal.RESULT_ATTENTION
    return journal.RESULT_REFUSED


def deploy_project(
    *,
    settings: Settings,
    project: str,
    tag: str,
    wait: float,
    dry_run: bool,
    stdout: TextIO,
    stderr: TextIO,
    environ: Mapping[str, str],
    action: str = "deploy",
    digest: str = "",
    runner: Runner | None = None,
    clock: Callable[[], float] = time.monotonic,
    rollback_note: str = "",
) -> int:
    """Validate, lock, check the freeze, run hooks around the deploy, journal and notify the outcome."""
    validate_project(project)
    validate_tag(tag)
    if wait < 0:
        raise UsageError("--wait must be zero or more seconds.")
    entry = journal.Entry(time=now_iso(), host=socket.gethostname(), user=user_name(environ), project=project,
                          action=action, tag=tag)
    try:
        cfg = load_project(settings, project)
    except ConfigError as exc:
        if not dry_run and settings.env_file(project).exists():  # a refused attempt, not a typo'd name
            journal.append(settings.journal_file(project), replace(entry, result=journal.RESULT_REFUSED,
                                                                   exit_code=exc.exit_code, message=exc.message))
        raise
    for warning in cfg.warnings:
        say(stderr, f"warning: {warning}")
    if dry_run:
        if rollback_note:
            say(stderr, rollback_note)
        retained = (runner or SubprocessRunner()) if action == "rollback" else None
        return _print_plan(settings, cfg, tag, stdout, stderr, digest, retained_runner=retained)

    runner = runner or SubprocessRunner()
    progress = Progress(stderr, clock, pause_at=environ.get("BLUEGREEN_FAULT_PAUSE", ""))
    started = clock()
    holder = Holder(pid=os.getpid(), user=entry.user, host=entry.host, tag=tag, since=entry.time)
    inside = [False]
    try:
        with project_lock(settings.lock_file(project), holder, wait=wait):
            inside[0] = True
            # Everything about this attempt, its journal entry, hooks and notification included, happens
            # while it holds the lock: the next deploy never sees a half-reported one.
            summary = _attempt(settings=settings, cfg=cfg, tag=tag, digest=digest, entry=entry, runner=runner,
                               progress=progress, started=started, clock=clock, environ=environ, stderr=stderr,
                               action=action, rollback_note=rollback_note)
    except LockedError as exc:
        if inside[0]:
            raise
        # Another deploy holds the lock: a refused attempt, journaled without touching anything else.
        entry = _finish(entry, None, progress, clock() - started, exc.exit_code, exc.message)
        _record(settings, cfg, entry, stderr)
        _notify(cfg, entry, stderr)
        raise
    say(stdout, summary)
    return EXIT_OK


def _attempt(*, settings: Settings, cfg: ProjectConfig, tag: str, digest: str, entry: journal.Entry, runner: Runner,
             progress: Progress, started: float, clock: Callable[[], float], environ: Mapping[str, str], stderr: TextIO,
             action: str, rollback_note: str = "") -> str:
    """The attempt under the lock: freeze, plan, pre-deploy hook, deploy; then journal, hooks and notify."""
    project = cfg.project
    deployer: Deployer | None = None
    plan: Plan | None = None
    stepping = False  # whether the deploy's steps (pull onwards) have begun
    try:
        freeze = read_freeze(settings.freeze_file(project))
        if freeze is not None:
            raise LockedError(
                f"{project} is {freeze.describe()}. Nothing was changed; the serving version keeps serving. "
                f"When the freeze is over: `{invocation()} unlock {project}`."
            )
        refuse_route_clash(settings, project)
        # Plan under the lock (the previous deploy may have just switched colours), from where nginx
        # really routes now when a probe through it can tell.
        seen: list[health.Probe] = []  # the probe through nginx, so that messages say what it answered

        def probe(url: str, **kwargs) -> health.Probe:
            answer = health.http_probe(url, **kwargs)
            seen.append(answer)
            return answer

        plan, warnings = read_plan(settings, cfg, tag, probe=probe, digest=digest)
        for warning in warnings:
            say(stderr, f"warning: {warning}")
        entry = replace(entry, image=plan.ref, from_colour=plan.current, to_colour=plan.target)
        if rollback_note:  # only now: a frozen or locked project refuses before any plan is announced
            say(stderr, rollback_note)
        # check_nginx_first: before the pre-deploy hook (which may migrate a database) and the pull, a deploy
        # that could not switch (nginx down, `nginx -t` failing, the include missing) fails at once with the cause.
        # A rollback may start the retained container of its tag instead (instant.decide, in check()).
        deployer = Deployer(settings=settings, runner=runner, progress=progress, clock=clock,
                            seen_before=seen[0] if seen else None, check_nginx_first=True,
                            judge_release=action != "rollback", instant_ok=action == "rollback")
        deployer.check(plan)
        _pre_deploy(settings, cfg, plan, runner, environ, stderr, action)
        verb = "Rolling back" if action == "rollback" else "Deploying"
        progress.say(f"{verb} {plan.ref} to {project} as {plan.target_name} (127.0.0.1:{plan.target_port})")
        stepping = True
        summary = deployer.run(plan)
    except BaseException as exc:
        error = _as_error(exc, stepping)
        entry = _finish(entry, deployer, progress, clock() - started, error.exit_code, error.message)
        _record(settings, cfg, entry, stderr)
        try:
            if plan is not None and not isinstance(error, LockedError):
                _hook(settings, cfg, "on-failure", runner, environ, stderr, entry)
            _notify(cfg, entry, stderr)
        except Interrupted as again:  # a signal that came only now (earlier ones are ignored once one fired)
            say(stderr, f"warning: interrupted by {again.signame} during the on-failure hook or notification.")
        if error is exc:
            raise
        raise error from exc
    entry = _finish(entry, deployer, progress, clock() - started, EXIT_OK, summary)
    _record(settings, cfg, entry, stderr)
    try:
        _hook(settings, cfg, "post-deploy", runner, environ, stderr, entry)
        _notify(cfg, entry, stderr)
    except Interrupted as exc:  # the deploy itself is done and recorded: say so, do not fail it
        say(stderr, f"warning: interrupted by {exc.signame} during the post-deploy hook or notification.")
    return summary


def _as_error(exc: BaseException, stepping: bool) -> BaseException:
    """Any failure of an attempt as a BluegreenError, so that it is journaled, notified and reported alike."""
    if isinstance(exc, BluegreenError):
        return exc
    if not stepping:  # before the first step: nothing of this deploy was changed
        if isinstance(exc, Interrupted):
            return DeployFailed(f"Interrupted by {exc.signame} before the deploy started. Nothing was changed.")
        if isinstance(exc, OSError):
            return DeployFailed(f"{os_problem(exc)} This happened before the deploy started: nothing was changed. "
                                f"Fix the cause (free space, permissions), then deploy again.")
    if isinstance(exc, Exception):
        return NeedsAttention(
            f"bluegreen failed unexpectedly ({type(exc).__name__}: {exc}). The step in progress was undone where "
            f"possible; check what serves with `{invocation()} status` and report this with the output of --verbose."
        )
    return exc  # SystemExit, a second KeyboardInterrupt: let it through as it is


def pull_project(*, settings: Settings, project: str, tag: str, stdout: TextIO, stderr: TextIO,
                 environ: Mapping[str, str], runner: Runner | None = None,
                 clock: Callable[[], float] = time.monotonic, rollback: bool = False) -> int:
    """`bluegreen pull`: the deploy's first step alone (its PULL policy and messages), so that a rollout can
    fetch the image on every host before any host switches. Changes nothing that serves. With `rollback`, the
    image `rollback --to TAG` would deploy: the digest the journal recorded for TAG, if any; nothing at all when
    that rollback would be instant (the retained container holds the image)."""
    validate_project(project)
    validate_tag(tag)
    cfg = load_project(settings, project)
    digest = recorded_digest(journal.read(settings.journal_file(project)), tag) if rollback else ""
    for warning in cfg.warnings:
        say(stderr, f"warning: {warning}")
    progress = Progress(stderr, clock)
    holder = Holder(pid=os.getpid(), user=user_name(environ), host=socket.gethostname(), tag=f"(pull {tag})",
                    since=now_iso())
    # Under the project lock, like a deploy: a prune running now must not remove what is being pulled.
    with project_lock(settings.lock_file(project), holder, retry="then pull again"):
        plan, _ = read_plan(settings, cfg, tag, digest=digest)
        deployer = Deployer(settings=settings, runner=runner or SubprocessRunner(), progress=progress, clock=clock)
        retained = _retained(deployer.docker, plan) if rollback else None
        if retained is not None:
            say(stderr, retained.say())
            if retained.instant:  # a fleet rollback's pull phase: nothing to fetch, no registry call
                say(stdout, f"{plan.ref} needs no pull: the rollback to {tag} is instant ({retained.name} is retained "
                            f"with that image); nothing that serves was changed.")
                return EXIT_OK
        deployer.pull_only(plan)
    found = f" (registry digest {deployer.digest})" if deployer.digest else ""
    say(stdout, f"{plan.ref} is on this host{found}; nothing that serves was changed.")
    return EXIT_OK


def _retained(docker: dk.Docker, plan: Plan) -> instant.Decision | None:
    """Whether `rollback` would start the retained container of plan's tag (instant.look); None when docker cannot
    say (the pull that follows reports docker's trouble itself)."""
    try:
        return instant.look(docker, plan, docker.inspect(plan.target_name))
    except CommandError:
        return None


def refuse_route_clash(settings: Settings, project: str) -> None:
    """Two projects whose names map to one nginx route variable (user-api, user.api) would share one route map."""
    other = route_clash(project, settings.projects())
    if other is not None:
        raise UsageError(route_clash_message(project, other, str(settings.root / "projects")))


def _print_plan(settings: Settings, cfg: ProjectConfig, tag: str, stdout: TextIO, stderr: TextIO, digest: str = "",
                retained_runner: Runner | None = None) -> int:
    """--dry-run; `retained_runner` (a rollback): look, read-only, whether it would be an instant rollback."""
    refuse_route_clash(settings, cfg.project)
    plan, warnings = read_plan(settings, cfg, tag, probe=health.http_probe, digest=digest)
    for warning in warnings:
        say(stderr, f"warning: {warning}")
    retained = None
    if retained_runner is not None:
        docker = dk.Docker(retained_runner, settings.docker_cmd)
        try:
            container = docker.inspect(plan.target_name)
        except CommandError as exc:
            raise DeployFailed(f"Cannot ask docker about {plan.target_name}: {exc.output_tail(3)}\nNothing was "
                               f"changed (a dry run). Check that dockerd runs and this user may use it (`docker info`).") from exc
        retained = instant.look(docker, plan, container)
        say(stderr, retained.say())
    freeze = read_freeze(settings.freeze_file(cfg.project))
    if freeze is not None:
        print(f"note: {cfg.project} is {freeze.describe()}; a real deploy would be refused.", file=stdout)
    print(f"Dry run: deploy {plan.ref} as {plan.target_name} (nothing will be changed)", file=stdout)
    for name in hooks.HOOK_NAMES:
        path = hooks.find(settings.hooks_dir(cfg.project), name)
        if path is not None:
            problem = hooks.check(path)
            print(f"hook    {path} would run" if problem is None else f"hook    {path} would be refused: {problem}",
                  file=stdout)
    for line in plan.describe(retained):
        print(line, file=stdout)
    return EXIT_OK


def _finish(entry: journal.Entry, deployer: Deployer | None, progress: Progress, duration: float, code: int, message: str) -> journal.Entry:
    return replace(
        entry,
        digest=deployer.digest if deployer else "",
        from_tag=deployer.old_tag if deployer else None,
        result=_result_for(code),
        exit_code=code,
        failed_step=progress.failed_step if code != EXIT_OK else None,
        message=message,
        duration=round(duration, 3),
        steps={k: round(v, 3) for k, v in progress.durations.items()},
        instant=deployer.instant if deployer else False,
    )


def _record(settings: Settings, cfg: ProjectConfig, entry: journal.Entry, stderr: TextIO) -> None:
    problem = journal.append(settings.journal_file(cfg.project), entry)
    if problem:
        say(stderr, f"warning: the deploy journal was not updated: {problem}")


def _notify(cfg: ProjectConfig, entry: journal.Entry, stderr: TextIO) -> None:
    if not cfg.notify_webhook_url:
        return
    problem = notify.send(cfg.notify_webhook_url, notify.payload(entry))
    if problem:
        say(stderr, f"warning: the {entry.result} notification was not delivered: {problem} (the deploy result stands).")


def _hook_values(settings: Settings, cfg: ProjectConfig, entry: journal.Entry) -> dict:
    return {
        "project": cfg.project,
        "tag": entry.tag,
        "image": entry.image,
        "action": entry.action,
        "from_color": entry.from_colour,
        "to_color": entry.to_colour,
        "from_port": cfg.port(entry.from_colour) if entry.from_colour else None,
        "to_port": cfg.port(entry.to_colour) if entry.to_colour else None,
        "from_tag": entry.from_tag,
        "result": entry.result,
        "exit_code": entry.exit_code,
        "failed_step": entry.failed_step,
        "root": settings.root,
    }


def _hook(settings: Settings, cfg: ProjectConfig, name: str, runner: Runner, environ: Mapping[str, str],
          stderr: TextIO, entry: journal.Entry) -> int | None:
    """Run hook `name` if present; returns its exit code (None if there is no such hook)."""
    path = hooks.find(settings.hooks_dir(cfg.project), name)
    if path is None:
        return None
    result = hooks.run(runner, path, hooks.hook_env(environ, _hook_values(settings, cfg, entry)), cfg.hook_timeout)
    status = "ok" if result.ok else f"FAILED (exit {result.returncode})"
    say(stderr, f"hook {name}: {status}")
    if result.stdout.strip() or result.stderr.strip():
        say(stderr, hooks.output(result))
    if not result.ok and name != "pre-deploy":
        say(stderr, f"warning: the {name} hook failed; the deploy result stands.")
    return result.returncode


def _pre_deploy(settings: Settings, cfg: ProjectConfig, plan: Plan, runner: Runner, environ: Mapping[str, str],
                stderr: TextIO, action: str) -> None:
    entry = journal.Entry(time="", host="", user="", project=cfg.project, action=action, tag=plan.tag,
                          image=plan.ref, from_colour=plan.current, to_colour=plan.target, result="pending", exit_code=0)
    code = _hook(settings, cfg, "pre-deploy", runner, environ, stderr, entry)
    if code:
        raise DeployFailed(
            f"The pre-deploy hook {settings.hooks_dir(cfg.project) / 'pre-deploy'} failed (exit {code}), so the "
            f"deploy of {plan.ref} did not start. Nothing was changed; the serving version keeps serving. Fix "
            f"what the hook reports above, then deploy again.",
            exit_code=EXIT_FAILED,
        )


def rollback_project(
    *,
    settings: Settings,
    project: str,
    to: str | None,
    wait: float,
    dry_run: bool,
    stdout: TextIO,
    stderr: TextIO,
    environ: Mapping[str, str],
    runner: Runner | None = None,
) -> int:
    """Deploy the previous successful tag (or `to`) through the full health-checked path."""
    validate_project(project)
    if to is not None:
        validate_tag(to)
    cfg = load_project(settings, project)
    entries = journal.read(settings.journal_file(project))
    serving = serving_tag(settings, cfg, runner or SubprocessRunner())
    target = to or journal.rollback_target(entries, serving)
    if target is None:
        known = journal.rollback_candidates(entries)
        raise UsageError(
            f"Nothing to roll back to for {project}: "
            + (f"the journal knows only {', '.join(known)}, which is what serves now. " if known else
               "the deploy journal has no successful deploy (a version deployed before bluegreen, e.g. by deploy.sh, "
               "is not in it until bluegreen deploys over it). ")
            + f"Nothing was changed. Name a tag with `{invocation()} rollback {project} --to TAG`, or list the images "
            f"with `docker images {cfg.image}`."
        )
    digest = recorded_digest(entries, target)
    # A tag may have moved since (`latest`, a re-pushed v1): the rollback goes to the image that tag
    # deployed then, by the digest the journal recorded.
    pinned = f" (the image it deployed then: {cfg.image}@{digest})" if digest else (
        " (no digest was recorded for it, so it is pulled by tag as it is now)" if not target.startswith("sha256:") else "")
    # Said by the attempt once the freeze and the lock let it go ahead, never before a refusal.
    note = f"Rolling back {project} from {serving or 'nothing'} to {target}{pinned}."
    return deploy_project(settings=settings, project=project, tag=target, wait=wait, dry_run=dry_run, stdout=stdout,
                          stderr=stderr, environ=environ, action="rollback", digest=digest, runner=runner,
                          rollback_note=note)


def serving_tag(settings: Settings, cfg: ProjectConfig, runner: Runner) -> str | None:
    """The tag the container nginx routes to runs (its label, else its image reference), if it runs."""
    colour, _, _ = read_current(settings, cfg, probe=health.http_probe)
    if colour is None:
        return None
    found = dk.Docker(runner, settings.docker_cmd).inspect(dk.container_name(cfg.project, colour))
    return found.tag_in(cfg.image) if found is not None and found.running else None
