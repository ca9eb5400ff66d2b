"""docker argv builders (pure) and the few docker operations a deploy needs."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Sequence

from bluegreen.config import ProjectConfig
from bluegreen.errors import CommandError
from bluegreen.runner import Runner

LABEL_PROJECT = "bluegreen.project"
LABEL_COLOUR = "bluegreen.color"
LABEL_TAG = "bluegreen.tag"
# `docker run --env-file` reads the app environment from its stdin, which bluegreen feeds through a pipe.
ENV_STDIN = "/dev/stdin"


def container_name(project: str, colour: str) -> str:
    return f"{project}-{colour}"


def pull_argv(docker: Sequence[str], ref: str) -> list[str]:
    return [*docker, "pull", ref]


# The PULL setting: `always` pulls (a registry is the source of truth), `missing` pulls only what this host
# does not have, `never` deploys only what is already here (air-gapped hosts: `docker load`, local builds).
PULL_POLICIES = ("always", "missing", "never")


_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")


def image_inspect_argv(docker: Sequence[str], ref: str) -> list[str]:
    return [*docker, "image", "inspect", "--format", "{{json .Id}} {{json .RepoDigests}}", ref]


@dataclass(frozen=True)
class LocalImage:
    """What `docker image inspect` says about an image this host already has."""

    id: str  # sha256:... of the image config (what `docker load` and `docker build` give)
    repo_digests: tuple[str, ...] = ()  # REPOSITORY@sha256:... of registries it was pulled from or pushed to

    def digest_for(self, repository: str) -> str:
        """The registry digest under which `repository@digest` finds this image ("" if it has none)."""
        for item in self.repo_digests:
            repo, _, digest = item.rpartition("@")
            if repo == repository and _DIGEST_RE.fullmatch(digest):
                return digest
        return ""


def parse_image_inspect(text: str) -> LocalImage | None:
    """The `{{json .Id}} {{json .RepoDigests}}` line of image_inspect_argv, or None if it is not that."""
    first, _, rest = text.strip().partition(" ")
    try:
        image_id, digests = json.loads(first), json.loads(rest or "null")
    except ValueError:
        return None
    if not isinstance(image_id, str) or not _DIGEST_RE.fullmatch(image_id):
        return None
    if not isinstance(digests, list):
        digests = []
    return LocalImage(image_id, tuple(d for d in digests if isinstance(d, str) and len(d) <= 1024))


def pull_policy_problem(image: str, policy: str, local: Sequence[LocalImage]) -> str | None:
    """What a deploy of `image` under `policy` would trip over, given this host's images of that repository
    (for doctor); None when nothing. Pure."""
    if policy == "always" and local and not any(i.digest_for(image) for i in local):
        return (f"this host has {image} only as images loaded with `docker load` or built here (none came from a "
                f"registry), but PULL=always pulls on every deploy, which fails for them: set PULL=missing (or never) "
                f"in the env file")
    if policy == "never" and not local:
        return (f"PULL=never, but this host has no image of {image}: every deploy fails until it is loaded "
                f"(`docker load -i FILE.tar`) or built here")
    return None


def pull_needed(policy: str, local: LocalImage | None) -> bool | None:
    """Whether to pull under `policy` given what the host has: True pull, False use the local image,
    None the image is missing and the policy forbids pulling it."""
    if policy == "always":
        return True
    if local is not None:
        return False
    return True if policy == "missing" else None


def run_argv(
    docker: Sequence[str],
    cfg: ProjectConfig,
    *,
    colour: str,
    tag: str,
    ref: str,
    env_file: str | None,
) -> list[str]:
    """`docker run` for one colour; app environment only ever travels in `env_file`."""
    argv = [
        *docker, "run", "--detach",
        "--name", container_name(cfg.project, colour),
        # Published on loopback only: nginx is the one way in.
        "--publish", f"127.0.0.1:{cfg.port(colour)}:{cfg.app_port}",
        "--restart", "unless-stopped",
        "--label", f"{LABEL_PROJECT}={cfg.project}",
        "--label", f"{LABEL_COLOUR}={colour}",
        "--label", f"{LABEL_TAG}={tag}",
    ]
    if cfg.log_dir:
        argv += ["--volume", f"{cfg.log_dir}:{cfg.log_dir}"]
    if env_file:
        argv += ["--env-file", env_file]
    argv += list(cfg.docker_args)
    argv.append(ref)
    return argv


def parse_pull_digest(output: str) -> str:
    """The `Digest: sha256:...` line of `docker pull` output."""
    match = re.search(r"^Digest:\s*(sha256:[0-9a-f]{64})\s*$", output, re.MULTILINE)
    return match.group(1) if match else ""


def env_file_text(env: Sequence[tuple[str, str]]) -> str:
    """docker's --env-file format: KEY=VALUE per line, taken literally (no quotes, no expansion)."""
    return "".join(f"{k}={v}\n" for k, v in env)


def rm_argv(docker: Sequence[str], name: str) -> list[str]:
    return [*docker, "rm", "--force", name]


def stop_argv(docker: Sequence[str], name: str, timeout: int) -> list[str]:
    return [*docker, "stop", "--time", str(timeout), name]


def inspect_argv(docker: Sequence[str], names: Sequence[str]) -> list[str]:
    return [*docker, "container", "inspect", *names]


def logs_argv(docker: Sequence[str], name: str, tail: int) -> list[str]:
    return [*docker, "logs", "--tail", str(tail), name]


@dataclass(frozen=True)
class Container:
    """What `docker container inspect` says about one container."""

    name: str
    id: str
    status: str  # created, running, restarting, exited, ...
    exit_code: int
    image: str
    labels: dict = field(default_factory=dict)
    started_at: str = ""
    restart_count: int = 0

    @property
    def running(self) -> bool:
        return self.status in ("running", "restarting")

    def crash_note(self) -> str | None:
        """How the container ended, or None while it runs as first started.

        With `--restart unless-stopped` a crashing app is never `exited`: docker restarts it,
        so a restart (or a pending one) counts as a crash too.
        """
        if self.status == "running" and self.restart_count == 0:
            return None
        if self.status in ("running", "restarting"):
            return f"the container exited with code {self.exit_code} and docker restarted it {self.restart_count} time(s)"
        return f"the container stopped ({self.status}, exit code {self.exit_code})"


def parse_inspect(text: str) -> list[Container]:
    """Containers from `docker container inspect` JSON output."""
    out = []
    for item in json.loads(text or "[]"):
        state = item.get("State") or {}
        config = item.get("Config") or {}
        out.append(
            Container(
                name=(item.get("Name") or "").lstrip("/"),
                id=item.get("Id", ""),
                status=state.get("Status", ""),
                exit_code=int(state.get("ExitCode") or 0),
                image=config.get("Image", ""),
                labels=dict(config.get("Labels") or {}),
                started_at=state.get("StartedAt", ""),
                restart_count=int(item.get("RestartCount") or 0),
            )
        )
    return out


class Docker:
    """docker operations through a Runner."""

    def __init__(self, runner: Runner, cmd: Sequence[str]) -> None:
        self.runner = runner
        self.cmd = tuple(cmd)

    def pull(self, ref: str) -> str:
        """Pull; returns the registry digest docker reports ("" if it printed none)."""
        result = self.runner.run(pull_argv(self.cmd, ref), timeout=1800)
        return parse_pull_digest(result.stdout)

    def local_image(self, ref: str) -> LocalImage | None:
        """The image `ref` names if this host has it, else None; a CommandError when docker cannot say."""
        result = self.runner.run(image_inspect_argv(self.cmd, ref), check=False, mutates=False, timeout=60,
                                 output_limit=64 * 1024)
        if not result.ok:
            if "no such image" in (result.stderr + result.stdout).lower():
                return None
            raise CommandError(list(result.argv), result.returncode, result.stdout, result.stderr)
        found = parse_image_inspect(result.stdout)
        if found is None:  # not the line we asked for: nothing we can trust
            raise CommandError(list(result.argv), result.returncode, result.stdout, result.stderr)
        return found

    def local_images(self, image: str) -> list[LocalImage]:
        """Every image of repository `image` this host has (any tag), in two docker calls."""
        listed = self.runner.run([*self.cmd, "images", "--no-trunc", "--format", "{{.ID}}", image], check=False,
                                 mutates=False, timeout=60, output_limit=256 * 1024)
        if not listed.ok:
            raise CommandError(list(listed.argv), listed.returncode, listed.stdout, listed.stderr)
        ids = sorted({i for i in listed.stdout.split() if _DIGEST_RE.fullmatch(i)})[:100]
        if not ids:
            return []
        found = self.runner.run(image_inspect_argv(self.cmd, ids[0])[:-1] + ids, check=False, mutates=False,
                                timeout=60, output_limit=1 << 20)
        if not found.ok:
            raise CommandError(list(found.argv), found.returncode, found.stdout, found.stderr)
        return [i for i in (parse_image_inspect(line) for line in found.stdout.splitlines()) if i is not None]

    def inspect(self, name: str) -> Container | None:
        """The named container, or None if it does not exist."""
        return self.inspect_many([name]).get(name)

    def inspect_many(self, names: Sequence[str]) -> dict[str, Container]:
        """The named containers that exist, by name, in one docker call."""
        if not names:
            return {}
        # inspect prints the containers that exist and exits 1 naming the ones that do not. It also
        # prints "[]" when the daemon cannot be reached, so only "no such" lines mean "absent".
        result = self.runner.run(inspect_argv(self.cmd, names), check=False, mutates=False, timeout=60)
        if not result.ok:
            problems = [ln for ln in result.stderr.splitlines() if ln.strip() and "no such" not in ln.lower()]
            if problems or not result.stderr.strip():
                raise CommandError(list(result.argv), result.returncode, result.stdout, result.stderr)
        try:
            return {c.name: c for c in parse_inspect(result.stdout or "[]")}
        except ValueError as exc:  # not JSON: nothing we can trust
            raise CommandError(list(result.argv), result.returncode, result.stdout, result.stderr) from exc

    def run(self, argv: Sequence[str], *, input: bytes | None = None) -> str:
        """Start a container (`input`: what docker reads on stdin, e.g. the env file); returns its id."""
        return self.runner.run(argv, timeout=300, input=input).stdout.strip()

    def remove(self, name: str) -> None:
        result = self.runner.run(rm_argv(self.cmd, name), check=False, timeout=120)
        if not result.ok and "no such container" not in (result.stderr + result.stdout).lower():
            raise CommandError(list(result.argv), result.returncode, result.stdout, result.stderr)

    def stop(self, name: str, timeout: int) -> None:
        self.runner.run(stop_argv(self.cmd, name, timeout), timeout=timeout + 60)

    def publishers(self, port: int) -> list[str]:
        """Names of the containers that publish `port` (empty if none, or if docker cannot say)."""
        result = self.runner.run([*self.cmd, "ps", "--filter", f"publish={port}", "--format", "{{.Names}}"],
                                 check=False, mutates=False, timeout=30)
        return result.stdout.split() if result.ok else []

    def logs(self, name: str, tail: int = 20) -> str:
        """Last lines the container wrote (stdout and stderr), or a note why there are none."""
        # The app writes these: untrusted and possibly huge (one endless line); only 64 KiB per stream is kept.
        result = self.runner.run(logs_argv(self.cmd, name, tail), check=False, mutates=False, timeout=30,
                                 output_limit=64 * 1024)
        text = (result.stdout + result.stderr).strip()
        return text or "(the container wrote nothing)"
