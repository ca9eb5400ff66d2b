"""`bluegreen prune`: remove stopped containers and old images, keeping what serves and the rollback targets."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Mapping, Sequence, TextIO

from bluegreen import docker as dk
from bluegreen import journal
from bluegreen.attempt import now_iso, user_name
from bluegreen.config import COLOURS, Settings, load_project, validate_project
from bluegreen.deploy import read_current
from bluegreen.errors import EXIT_FAILED, EXIT_OK, BluegreenError, UsageError
from bluegreen.health import http_probe
from bluegreen.lock import Holder, project_lock
from bluegreen.runner import RecordingRunner, Runner, SubprocessRunner, display


DEFAULT_KEEP = 3  # successful tags kept besides the serving one (prune --keep)


@dataclass(frozen=True)
class PrunePlan:
    containers: list[str]  # stopped containers to remove
    images: list[str]  # IMAGE:TAG references to remove
    kept: list[str]  # tags kept, with why


def plan_prune(*, image: str, containers: Sequence[dk.Container], serving: str | None, image_tags: Sequence[str],
               successful: Sequence[str], keep: int, others: Mapping[str, Sequence[str]] | None = None,
               keep_all_images: str = "") -> PrunePlan:
    """Decide what goes (pure): never the serving container or its tag, never the newest `keep` other rollback
    targets (`successful`: journal.rollback_candidates, newest first), never a tag another project with the same
    IMAGE may serve or roll back to (`others`: project -> tags)."""
    # The routed container's tag is kept even if it is stopped: `docker start` must still work. A container
    # without bluegreen's labels (the guide's deploy.sh started it) has its tag in its image reference.
    serving_tag = next((c.tag_in(image) for c in containers if c.name == serving), None)
    targets = [t for t in successful if t != serving_tag][:keep]
    kept = ([f"{serving_tag} (serving)"] if serving_tag else []) + [f"{t} (rollback target)" for t in targets]
    keep_tags = set(targets) | ({serving_tag} if serving_tag else set())
    for other, tags in sorted((others or {}).items()):
        mine = [t for t in tags if t not in keep_tags]
        kept += [f"{t} (used by {other})" for t in mine]
        keep_tags |= set(mine)
    doomed_containers = [c.name for c in containers if not c.running and c.name != serving]
    if keep_all_images:
        return PrunePlan(doomed_containers, [], kept + [f"every image of {image} ({keep_all_images})"])
    doomed_images = [f"{image}:{t}" for t in image_tags if t not in keep_tags and t != "<none>"]
    return PrunePlan(doomed_containers, doomed_images, kept)


def other_projects_tags(settings: Settings, project: str, image: str, keep: int,
                        docker: dk.Docker) -> tuple[dict[str, list[str]], str]:
    """Tags of `image` that the other projects under the root serve or may roll back to, and a reason to keep
    every image when another project's config cannot be read (it may use the same image)."""
    found: dict[str, list[str]] = {}
    for other in settings.projects():
        if other == project:
            continue
        try:
            other_cfg = load_project(settings, other)
        except BluegreenError:
            return found, f"{other}'s env file cannot be read, so it may use this image too"
        if other_cfg.image != image:
            continue
        containers = docker.inspect_many([dk.container_name(other, c) for c in COLOURS]).values()
        tags = [t for t in (c.tag_in(image) for c in containers) if t]
        tags += journal.rollback_candidates(journal.read(settings.journal_file(other)))[:keep]
        found[other] = list(dict.fromkeys(tags))
    return found, ""


def prune(*, settings: Settings, project: str, keep: int, dry_run: bool, stdout: TextIO, environ: dict,
          runner: Runner | None = None) -> int:
    validate_project(project)
    if keep < 0:
        raise UsageError("--keep must be zero or more.")
    cfg = load_project(settings, project)
    real = runner or SubprocessRunner()
    run = RecordingRunner(passthrough=real) if dry_run else real
    docker = dk.Docker(run, settings.docker_cmd)
    holder = Holder(pid=os.getpid(), user=user_name(environ), host=socket.gethostname(), tag="(prune)", since=now_iso())
    # Under the deploy lock: a deploy starting now must not lose the image it is about to run.
    with project_lock(settings.lock_file(project), holder, retry="then prune again"):
        colour, _, _ = read_current(settings, cfg, probe=http_probe)
        serving = dk.container_name(project, colour) if colour else None
        containers = list(docker.inspect_many([dk.container_name(project, col) for col in COLOURS]).values())
        listed = run.run([*settings.docker_cmd, "image", "ls", cfg.image, "--format", "{{.Tag}}"], mutates=False, timeout=60)
        tags = sorted(set(listed.stdout.split()))
        # Another project's rollback targets are kept as its own prune would keep them.
        others, keep_all = other_projects_tags(settings, project, cfg.image, DEFAULT_KEEP, docker)
        plan = plan_prune(image=cfg.image, containers=containers, serving=serving, image_tags=tags,
                          successful=journal.rollback_candidates(journal.read(settings.journal_file(project))), keep=keep,
                          others=others, keep_all_images=keep_all)
        print(f"keeping: {', '.join(plan.kept) or 'nothing'}", file=stdout)
        failures = []
        for name in plan.containers:
            failures += _do(run, dk.rm_argv(settings.docker_cmd, name), dry_run, stdout)
        for ref in plan.images:
            failures += _do(run, [*settings.docker_cmd, "image", "rm", ref], dry_run, stdout)
    if not plan.containers and not plan.images:
        print("nothing to prune", file=stdout)
    if failures:
        print("some removals failed (the rest were done):\n" + "\n".join(failures), file=stdout)
        return EXIT_FAILED
    return EXIT_OK


def _do(runner: Runner, argv: list[str], dry_run: bool, stdout: TextIO) -> list[str]:
    result = runner.run(argv, check=False, timeout=120)
    print(f"{'would run' if dry_run else 'removed'}: {display(argv)}" if result.ok else f"failed: {display(argv)}", file=stdout)
    return [] if result.ok else [f"  {display(argv)}: {(result.stderr or result.stdout).strip()}"]
