"""Instant rollback: whether a rollback may start the retained container of its target colour (`docker start`)
instead of pulling the image and creating the container again, and why not (pure, apart from look()).

After a deploy, the colour it replaced keeps its container, stopped (step 5). A rollback to the tag that
container holds can start it again: no registry call, no `docker run`. Only when that is provably the same as
what the pull path would create:

- the container is bluegreen's, of this project and colour (its labels), and stopped (exited or created: a
  running one is the leftover logic's, and is removed and created again);
- its tag label is the rollback's tag, and its image is the image that tag deployed: the image ID the rollback's
  reference (IMAGE@DIGEST the journal recorded, else IMAGE:TAG) names on this host, the digest among that
  image's RepoDigests; without a recorded digest under PULL=always, the registry decides what the tag is now,
  so it is pulled;
- it would be created the same way now: its `bluegreen.config` label (docker.config_fingerprint, set by every
  `docker run` since) equals the one computed from the env file now. A container without it (an older
  bluegreen) is never instant.

The same decide() answers `status` (whether an instant rollback is available) and the rollback itself.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from bluegreen import docker as dk
from bluegreen.errors import CommandError

if TYPE_CHECKING:  # deploy imports this module
    from bluegreen.deploy import Plan

STOPPED = ("exited", "created")  # a container docker start brings up as it was created


@dataclass(frozen=True)
class Decision:
    """Which path a rollback to `tag` takes at `name`: instant (`docker start`) or the pull path, and why."""

    instant: bool
    name: str  # PROJECT-COLOUR, the rollback's target container
    tag: str
    reason: str = ""  # why not instant: one clause, no final period ("its container is gone")
    state: str = ""  # the container's state ("exited"; "" when there is none)
    image_id: str = ""  # instant: the image it runs
    digest: str = ""  # instant: the registry digest the journal gets (the one pinned, else the one docker knows)

    def argv(self, docker: Sequence[str]) -> list[str]:
        """The command that replaces pull and `docker run` on the instant path."""
        return dk.start_argv(docker, self.name)

    def say(self) -> str:
        """The line a rollback prints once it has decided."""
        if self.instant:
            return (f"instant rollback: {self.name} still holds {self.tag} (image {self.image_id[:19]}) and would be "
                    f"created the same way now: starting it again, nothing is pulled.")
        return f"not an instant rollback: {self.reason}: pulling and creating it again."

    def status_line(self) -> str:
        """For `status`: `instant to v1 (api-blue retained, stopped)` / `v1 needs a pull (its container is gone)`."""
        if self.instant:
            return f"instant to {self.tag} ({self.name} retained, stopped)"
        return f"{self.tag} needs a pull ({self.reason})"

    def to_dict(self) -> dict:
        return {"tag": self.tag, "instant": self.instant, "container": self.name, "state": self.state or None,
                "reason": self.reason or None}


def precheck(plan: Plan, container: dk.Container | None) -> Decision | None:
    """The reasons against an instant rollback that need nothing but the container's inspect and the env file
    (pure); None when only the image is left to compare (decide)."""
    cfg, name, tag = plan.cfg, plan.target_name, plan.tag

    def no(reason: str) -> Decision:
        return Decision(False, name, tag, reason, state=container.status if container is not None else "")

    if container is None:
        return no("its container is gone")
    labels = container.labels
    if labels.get(dk.LABEL_PROJECT) != cfg.project or labels.get(dk.LABEL_COLOUR) != plan.target:
        return no(f"{name} was not created by bluegreen as {cfg.project}'s {plan.target} container (no such labels: "
                  f"deploy.sh's, or run by hand)")
    if container.status not in STOPPED:
        return no(f"{name} is {container.status or 'in an unknown state'}, not a stopped, retained container")
    held = container.tag_in(cfg.image)
    if held != tag:
        return no(f"{name} holds {held or 'no valid tag'}, not {tag}")
    label = labels.get(dk.LABEL_CONFIG)
    if label is None:
        return no(f"{name} was created by an older bluegreen, without the {dk.LABEL_CONFIG} label that shows how it "
                  f"was created")
    then = dk.parse_config_fingerprint(label)
    if then is None:
        return no(f"{name}'s {dk.LABEL_CONFIG} label is not one bluegreen writes")
    now = dk.parse_config_fingerprint(dk.config_fingerprint(cfg, colour=plan.target, tag=tag)) or ("-", "-")
    if not hmac.compare_digest(then[0], now[0]):
        return no(f"the docker run options (IMAGE, APP_PORT, {plan.target.upper()}_PORT, LOG_DIR, DOCKER_ARGS, or "
                  f"bluegreen's own) changed since {tag}'s container was created")
    if not hmac.compare_digest(then[1], now[1]):
        return no(f"the env file's app environment changed since {tag}'s container was created")
    if not container.image_id:
        return no(f"docker does not say which image {name} was created from")
    pinned = plan.ref.startswith(f"{cfg.image}@")
    if not pinned and cfg.pull == "always":
        return no(f"no registry digest was recorded for {tag}, and with PULL=always the registry says what {tag} is now")
    return None


def decide(plan: Plan, container: dk.Container | None, local: dk.LocalImage | None) -> Decision:
    """Instant or the pull path for a rollback planned as `plan` (pure).

    `container`: the inspect of the rollback's target container (plan.target_name), None when there is none;
    `local`: what `docker image inspect plan.ref` says on this host (None: no such image), a local lookup.
    """
    early = precheck(plan, container)
    if early is not None or container is None:  # (precheck says "gone" for None)
        return early or Decision(False, plan.target_name, plan.tag, "its container is gone")
    cfg, name, tag = plan.cfg, plan.target_name, plan.tag

    def no(reason: str) -> Decision:
        return Decision(False, name, tag, reason, state=container.status)

    digest = plan.ref.rpartition("@")[2] if plan.ref.startswith(f"{cfg.image}@") else ""
    if local is None:
        return no(f"this host does not have {plan.ref}, the image {tag} deployed")
    if local.id != container.image_id or (digest and f"{cfg.image}@{digest}" not in local.repo_digests):
        return no(f"{name} was created from another image than {plan.ref}, the image {tag} deployed")
    return Decision(True, name, tag, state=container.status, image_id=container.image_id,
                    digest=digest or local.digest_for(cfg.image))


def look(docker: dk.Docker, plan: Plan, container: dk.Container | None) -> Decision:
    """decide() from this host's facts: the image lookup is local (`docker image inspect`, never a registry),
    and made only when the container itself qualifies. A docker error is a reason, never raised."""
    early = precheck(plan, container)
    if early is not None:
        return early
    try:
        local = docker.local_image(plan.ref)
    except CommandError as exc:
        return Decision(False, plan.target_name, plan.tag,
                        f"docker could not say whether this host has {plan.ref} ({exc.output_tail(1)[:200]})",
                        state=container.status if container is not None else "")
    return decide(plan, container, local)
