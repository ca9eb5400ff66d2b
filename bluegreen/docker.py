"""docker argv builders (pure) and the few docker operations a deploy needs."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from dataclasses import dataclass, field
from typing import Sequence

from bluegreen.config import ProjectConfig, is_tag
from bluegreen.errors import CommandError
from bluegreen.runner import Runner

LABEL_PROJECT = "bluegreen.project"
LABEL_COLOUR = "bluegreen.color"
LABEL_TAG = "bluegreen.tag"
# A fingerprint of how the container was created (config_fingerprint): what an instant rollback compares with
# how it would be created now. Never the app environment in clear: a label is readable by anything that reads
# docker's metadata (`docker inspect`, monitoring agents that collect labels).
LABEL_CONFIG = "bluegreen.config"
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
_TAG_ONLY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")  # a docker tag (not a digest: `IMAGE:sha256:...` is no reference)


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
    config: str | None = None,
) -> list[str]:
    """`docker run` for one colour; app environment only ever travels in `env_file`. `config`: the
    config_fingerprint label (every deploy sets it; without it, the argv the fingerprint is taken over)."""
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
    if config is not None:
        argv += ["--label", f"{LABEL_CONFIG}={config}"]
    if cfg.log_dir:
        argv += ["--volume", f"{cfg.log_dir}:{cfg.log_dir}"]
    if env_file:
        argv += ["--env-file", env_file]
    argv += list(cfg.docker_args)
    argv.append(ref)
    return argv


CONFIG_VERSION = "1"
# PBKDF2 rounds over the app environment: about 50 ms once per deploy, and as many times slower a guess at a
# short secret from a label that leaked (an agent shipping container labels to a monitoring service).
CONFIG_ROUNDS = 100_000
_CONFIG_RE = re.compile(r"1:[0-9a-f]{64}:[0-9a-f]{64}")


def config_fingerprint(cfg: ProjectConfig, *, colour: str, tag: str) -> str:
    """The `bluegreen.config` label: how `docker run` creates this colour from `cfg` (pure).

    `1:ARGV:ENV`: ARGV is the sha256 of the run argv without the docker command and with the repository in
    place of the image reference (which image runs is compared by image ID, not by how it was named: a rollback
    names it by digest, the deploy by tag), so IMAGE, the ports, LOG_DIR, DOCKER_ARGS, the tag label and
    bluegreen's own options are in it; ENV is PBKDF2-HMAC-SHA256 of the app environment as docker reads it
    (salted with the project's name), so that equal environments give equal labels and none gives a secret
    back. Two parts, so that the reason for a difference can be named.
    """
    env = cfg.container_env()
    argv = run_argv((), cfg, colour=colour, tag=tag, ref=cfg.image, env_file=ENV_STDIN if env else None)
    argv_hash = hashlib.sha256(json.dumps(argv, separators=(",", ":")).encode("utf-8")).hexdigest()
    env_hash = hashlib.pbkdf2_hmac("sha256", env_file_text(env).encode("utf-8"),
                                   f"{LABEL_CONFIG}/{CONFIG_VERSION}/{cfg.project}".encode("utf-8"), CONFIG_ROUNDS).hex()
    return f"{CONFIG_VERSION}:{argv_hash}:{env_hash}"


def parse_config_fingerprint(value: object) -> tuple[str, str] | None:
    """(ARGV, ENV) of a `bluegreen.config` label bluegreen wrote, or None for any other value (untrusted)."""
    if not isinstance(value, str) or not _CONFIG_RE.fullmatch(value):
        return None
    _, argv_hash, env_hash = value.split(":")
    return argv_hash, env_hash


def parse_pull_digest(output: str) -> str:
    """The `Digest: sha256:...` line of `docker pull` output."""
    match = re.search(r"^Digest:\s*(sha256:[0-9a-f]{64})\s*$", output, re.MULTILINE)
    return match.group(1) if match else ""


def env_file_text(env: Sequence[tuple[str, str]]) -> str:
    """docker's --env-file format: KEY=VALUE per line, taken literally (no quotes, no expansion)."""
    return "".join(f"{k}={v}\n" for k, v in env)


def rm_argv(docker: Sequence[str], name: str) -> list[str]:
    return [*docker, "rm", "--force", name]


def start_argv(docker: Sequence[str], name: str) -> list[str]:
    """Start a stopped container as it was created (an instant rollback's retained container)."""
    return [*docker, "start", name]


def stop_argv(docker: Sequence[str], name: str, timeout: int) -> list[str]:
    return [*docker, "stop", "--time", str(timeout), name]


def inspect_argv(docker: Sequence[str], names: Sequence[str]) -> list[str]:
    return [*docker, "container", "inspect", *names]


def logs_argv(docker: Sequence[str], name: str, tail: int) -> list[str]:
    return [*docker, "logs", "--tail", str(tail), name]


def on_all_addresses(host_ip: str) -> bool:
    """Whether a published port's HostIp means every address of the host (pure): docker's empty HostIp (what
    `-p 8081:8080` configures), `0.0.0.0` or `::` (any spelling of the unspecified address). Such a port is
    reachable from anything that reaches the host, not only from nginx on it."""
    if not isinstance(host_ip, str):
        return False
    if host_ip == "":
        return True
    try:
        return ipaddress.ip_address(host_ip.strip("[]")).is_unspecified
    except ValueError:
        return False


@dataclass(frozen=True)
class Binding:
    """One published port: docker forwards HOST_IP:HOST_PORT to the container's `container_port`."""

    container_port: str  # "8080/tcp"
    host_ip: str  # "" (every address), "0.0.0.0", "::", "127.0.0.1", ...
    host_port: int | None  # None: a port docker picks when the container starts

    @property
    def all_addresses(self) -> bool:
        return on_all_addresses(self.host_ip)

    def address(self) -> str:
        """`0.0.0.0:8081`, `[::]:8081`, `127.0.0.1:8081` (`*` for docker's empty HostIp, `?` for a port it picks)."""
        host = self.host_ip or "*"
        if ":" in host:
            host = f"[{host}]"
        return f"{host}:{self.host_port if self.host_port is not None else '?'}"


MAX_BINDINGS = 256  # more than any real container publishes: the rest of a hostile list is ignored


def _port_number(value: object) -> int | None | bool:
    """A HostPort as docker writes it ("8081"; "" or "0": docker picks one) -> int, None (picked), or False (not
    a port at all)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, str):
        if value in ("", "0"):
            return None
        if not value.isdigit() or not value.isascii() or len(value) > 5:
            return False
        value = int(value)
    if not isinstance(value, int):
        return False
    if value == 0:
        return None
    return value if 0 < value < 65536 else False


def parse_bindings(ports: object) -> tuple[Binding, ...]:
    """Bindings from a `{"8080/tcp": [{"HostIp": "", "HostPort": "8081"}, ...]}` map, the shape of both
    `HostConfig.PortBindings` and `NetworkSettings.Ports` (pure). Untrusted: an item of any other shape is
    skipped, never raised about; a missing HostIp is docker's default, every address."""
    out: list[Binding] = []
    if not isinstance(ports, dict):
        return ()
    for container_port, items in ports.items():
        if not isinstance(container_port, str) or not isinstance(items, list):
            continue
        for item in items:
            if len(out) >= MAX_BINDINGS:
                return tuple(out)
            if not isinstance(item, dict):
                continue
            host_ip = item.get("HostIp", "")
            port = _port_number(item.get("HostPort", ""))
            if not isinstance(host_ip, str) or len(host_ip) > 64 or port is False:
                continue
            binding = Binding(container_port[:32], host_ip, port)
            if binding not in out:
                out.append(binding)
    return tuple(out)


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
    # Its published ports: what docker forwards now (NetworkSettings.Ports) while it runs, else what it
    # publishes when started (HostConfig.PortBindings).
    bindings: tuple = ()  # Binding
    image_id: str = ""  # the ID (sha256:...) of the image it was created from ("" if docker said none)

    @property
    def running(self) -> bool:
        return self.status in ("running", "restarting")

    @property
    def managed(self) -> bool:
        """Whether bluegreen started it (its labels); a container started by the guide's deploy.sh or by hand
        under the same name has none."""
        return LABEL_PROJECT in self.labels

    def tag_in(self, image: str) -> str | None:
        """The tag of `image` this container runs, or None when that is unknown (pure).

        Its `bluegreen.tag` label when it has one (bluegreen's containers; a label that is no valid tag gives
        None). Without labels (deploy.sh's `docker run IMAGE:TAG`), its image reference as `docker run` was
        given it (`Config.Image`): `IMAGE:TAG` gives TAG; a bare `IMAGE` gives `latest`, as docker reads it;
        `IMAGE@sha256:...` (or `IMAGE:TAG@sha256:...`, where docker ignores the tag) gives the digest, which is
        what runs, and which deploy and rollback accept as TAG. Another repository, or a reference that is no
        valid tag, gives None: a tag is never guessed.
        """
        if LABEL_TAG in self.labels:
            label = self.labels[LABEL_TAG]
            return label if is_tag(label) else None
        ref = self.image
        if not isinstance(ref, str) or not isinstance(image, str) or not image:
            return None
        name, at, digest = ref.partition("@")
        if at:
            repo_ok = name == image or (name.startswith(image + ":") and _TAG_ONLY.fullmatch(name[len(image) + 1:]))
            return digest if repo_ok and _DIGEST_RE.fullmatch(digest) else None
        if ref == image:
            return "latest"
        if ref.startswith(image + ":"):
            tag = ref[len(image) + 1:]
            return tag if _TAG_ONLY.fullmatch(tag) and is_tag(tag) else None
        return None

    def exposed(self) -> tuple[Binding, ...]:
        """Its published ports on every address (0.0.0.0, ::), while it runs: reachable around nginx."""
        if not self.running:
            return ()
        return tuple(b for b in self.bindings if b.all_addresses)

    def crash_note(self) -> str | None:
        """How the container ended, or None while it runs as first started.

        With `--restart unless-stopped` a crashing app is never `exited`: docker restarts it,
        so a restart (or a pending one) counts as a crash too.
        """
        if self.status == "running" and self.restart_count == 0:
            return None
        if self.status == "running":
            # Running again after a restart: State.ExitCode is this run's (0), the code it exited with is gone.
            return f"the container exited and docker restarted it {self.restart_count} time(s)"
        if self.status == "restarting":
            return f"the container exited with code {self.exit_code} and docker restarted it {self.restart_count} time(s)"
        return f"the container stopped ({self.status}, exit code {self.exit_code})"


def _dict(value: object) -> dict:
    return value if isinstance(value, dict) else {}


def _text(value: object, limit: int = 4096) -> str:
    return value[:limit] if isinstance(value, str) else ""


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and -(1 << 31) <= value < (1 << 31) else 0


def parse_inspect(text: str) -> list[Container]:
    """Containers from `docker container inspect` JSON output. Raises ValueError when it is not a JSON list;
    a field of any other type than docker's is read as absent, never raised about."""
    try:
        items = json.loads(text or "[]")
    except RecursionError as exc:
        raise ValueError("nested too deeply") from exc
    if not isinstance(items, list):
        raise ValueError("not a list of containers")
    out = []
    for item in items:
        if not isinstance(item, dict):
            continue
        state = _dict(item.get("State"))
        config = _dict(item.get("Config"))
        labels = {k: v for k, v in _dict(config.get("Labels")).items() if isinstance(k, str) and isinstance(v, str)}
        status = _text(state.get("Status"), 64)
        live = parse_bindings(_dict(item.get("NetworkSettings")).get("Ports"))
        configured = parse_bindings(_dict(item.get("HostConfig")).get("PortBindings"))
        image_id = _text(item.get("Image"), 128)
        out.append(
            Container(
                name=_text(item.get("Name"), 256).lstrip("/"),
                id=_text(item.get("Id"), 256),
                status=status,
                exit_code=_count(state.get("ExitCode")),
                image=_text(config.get("Image"), 1024),
                labels=labels,
                started_at=_text(state.get("StartedAt"), 64),
                restart_count=_count(item.get("RestartCount")),
                bindings=live if live and status in ("running", "restarting") else configured,
                image_id=image_id if _DIGEST_RE.fullmatch(image_id) else "",
            )
        )
    return out


def exposed_addresses(container: Container | None) -> str:
    """The every-address bindings of a running container, as `0.0.0.0:8081, [::]:8081` ("" : none)."""
    exposed = container.exposed() if container is not None else ()
    return ", ".join(dict.fromkeys(b.address() for b in exposed))


def exposed_note(container: Container) -> str | None:
    """Why a running container that publishes a port on every address is a problem, and what ends it, for
    status and doctor (pure); None when it publishes nothing there (bluegreen's containers never do) or does
    not run. The guide's deploy.sh published with `-p PORT:8080`, which is every address."""
    addresses = exposed_addresses(container)
    if not addresses:
        return None
    return (
        f"{container.name} publishes its port on every address of this host ({addresses}), not on 127.0.0.1 "
        f"only as bluegreen does: the app is reachable directly, around nginx and bypassing it (its access "
        f"rules, TLS, rate limits), from anything that can reach this host, e.g. other hosts in the VPC. The next "
        f"bluegreen deploy of this project replaces it with a container published on 127.0.0.1 only (deploying the "
        f"tag that serves now is enough)."
    )


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

    def start(self, name: str) -> None:
        """`docker start NAME`: the container as it was created (its image, options and environment)."""
        self.runner.run(start_argv(self.cmd, name), timeout=120)

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
