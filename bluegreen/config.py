"""Host settings and project env files, loaded once into frozen dataclasses and validated eagerly."""

from __future__ import annotations

import difflib
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from bluegreen.errors import ConfigError, UsageError

DEFAULT_ROOT = "/opt/deploy"
COLOURS = ("blue", "green")

# Names end up in file paths, container names, nginx config and docker argv: allow only
# what is safe in all four (no path separators, no leading dot or dash, no whitespace).
_PROJECT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST_RE = re.compile(r"sha256:[a-f0-9]{64}")
_IMAGE_RE = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?::[0-9]+)?/)?"  # optional registry host[:port]/
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
    r"(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
)
_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# Keys bluegreen reads itself; every other key is application environment.
RESERVED_KEYS = (
    "IMAGE",
    "SPRING_PROFILES",
    "HEALTH_PATH",
    "HEALTH_TIMEOUT",
    "HEALTH_INTERVAL",
    "HEALTH_INITIAL_DELAY",
    "HEALTH_REQUEST_TIMEOUT",
    "HEALTH_HOST",
    "HEALTH_EXPECT",
    "BLUE_PORT",
    "GREEN_PORT",
    "APP_PORT",
    "STOP_TIMEOUT",
    "LOG_DIR",
    "DOCKER_ARGS",
    "DRAIN_TIMEOUT",
    "VERIFY_TIMEOUT",
    "NGINX_URL",
    "SERVER_NAME",
    "NOTIFY_WEBHOOK_URL",
    "HOOK_TIMEOUT",
)
# App keys that look like a reserved key but are legitimate application settings.
_NOT_MISSPELLINGS = {"SPRING_PROFILES_ACTIVE"}
# docker run options that would break how bluegreen names, publishes or keeps containers.
# docker run options bluegreen manages itself (name, published port, environment, lifetime).
_MANAGED_LONG = ("--name", "--publish", "--publish-all", "--rm", "--env-file", "--env", "--detach")
_MANAGED_SHORT = ("-p", "-P", "-e", "-d")  # also when glued to their value (-p8080:80, -eKEY=x)


def docker_args_problem(args: Sequence[str]) -> str | None:
    """Why DOCKER_ARGS may not be used as given, or None."""
    for i, arg in enumerate(args):
        name = arg.split("=", 1)[0]
        if name in _MANAGED_LONG or any(arg.startswith(short) for short in _MANAGED_SHORT):
            what = "app environment belongs in the env file itself (as KEY=VALUE lines), never in argv" \
                if name in ("--env", "--env-file") or arg.startswith("-e") else \
                "bluegreen manages the container's name, published port and lifetime"
            return f"{name if name.startswith('--') else arg[:2]} may not be set here: {what}."
        value = arg.split("=", 1)[1] if "=" in arg else (args[i + 1] if i + 1 < len(args) else "")
        if name in ("--network", "--net") and value == "host":
            return "host networking would bypass the loopback-only port that nginx proxies to."
    return None


def validate_project(name: str) -> str:
    """Refuse project names that could escape the root or break nginx/docker."""
    if not _PROJECT_RE.fullmatch(name or ""):
        raise UsageError(
            f"Invalid project name {name!r}: use letters, digits, '-', '_' and '.', starting with a "
            f"letter or digit, at most 64 characters (e.g. user-api). Nothing was changed."
        )
    return name


def validate_tag(tag: str) -> str:
    """Accept a docker tag or a sha256 digest; refuse anything that could act as an option."""
    if _TAG_RE.fullmatch(tag or "") or _DIGEST_RE.fullmatch(tag or ""):
        return tag
    raise UsageError(
        f"Invalid tag {tag!r}: a tag is letters, digits, '_', '.' and '-' (not starting with '.' or '-', "
        f"at most 128 characters), or a digest sha256:<64 hex>. Nothing was changed."
    )


def registry_host(image: str) -> str:
    """The registry an image repository is pulled from (docker.io when the first part is no host)."""
    first = image.split("/", 1)[0]
    return first if "/" in image and ("." in first or ":" in first or first == "localhost") else "docker.io"


def image_ref(image: str, tag: str) -> str:
    """IMAGE:TAG, or IMAGE@sha256:... for a digest."""
    return f"{image}@{tag}" if tag.startswith("sha256:") else f"{image}:{tag}"


@dataclass(frozen=True)
class Settings:
    """Where things are on this host, and how to call docker and nginx."""

    root: Path
    docker_cmd: tuple[str, ...]
    nginx_cmd: tuple[str, ...]
    nginx_pid_file: str = ""  # "" = read the `pid` directive from `nginx -T`
    # Host set-up (init, setup, doctor): where nginx and the schedulers keep their files.
    nginx_conf_dir: Path = Path("/etc/nginx/conf.d")  # server blocks
    nginx_conf: str = ""  # "" = `-c` of the nginx command, else nginx's compiled-in --conf-path
    cron_dir: Path = Path("/etc/cron.d")
    systemd_dir: Path = Path("/etc/systemd/system")

    def env_file(self, project: str) -> Path:
        return self.root / "projects" / f"{project}.env"

    def active_file(self, project: str) -> Path:
        return self.root / "projects" / f"{project}.active"

    def lock_file(self, project: str) -> Path:
        return self.root / "projects" / f"{project}.lock"

    def upstream_file(self, project: str) -> Path:
        return self.root / "nginx" / "conf.d" / f"{project}-upstream.conf"

    def freeze_file(self, project: str) -> Path:
        return self.root / "projects" / f"{project}.freeze"

    def journal_file(self, project: str) -> Path:
        return self.root / "projects" / f"{project}.journal"

    def hooks_dir(self, project: str) -> Path:
        return self.root / "hooks" / project

    def projects(self) -> list[str]:
        """Every project with an env file under the root, sorted."""
        found = []
        for path in sorted((self.root / "projects").glob("*.env")):
            if _PROJECT_RE.fullmatch(path.stem):
                found.append(path.stem)
        return found


def _command_prefix(environ: Mapping[str, str], var: str, default: list[str]) -> tuple[str, ...]:
    raw = environ.get(var, "").strip()
    if not raw:
        return tuple(default)
    try:
        parts = shlex.split(raw)
    except ValueError as exc:
        raise UsageError(f"{var}: cannot parse {raw!r} as a command ({exc}).") from None
    if not parts:
        raise UsageError(f"{var} is set but holds no command.")
    return tuple(parts)


def load_settings(root: str | None, environ: Mapping[str, str], *, euid: int | None = None) -> Settings:
    """Resolve --root / BLUEGREEN_ROOT, BLUEGREEN_DOCKER, BLUEGREEN_NGINX and the host set-up paths."""
    root_path = Path(root or environ.get("BLUEGREEN_ROOT") or DEFAULT_ROOT)
    if euid is None:
        euid = os.geteuid()
    # Non-root deploys (CI over SSH as ec2-user) reach nginx through sudo; -n so that a
    # missing sudoers rule fails at once instead of hanging on a password prompt.
    nginx_default = ["nginx"] if euid == 0 else ["sudo", "-n", "nginx"]
    return Settings(
        root=root_path,
        docker_cmd=_command_prefix(environ, "BLUEGREEN_DOCKER", ["docker"]),
        nginx_cmd=_command_prefix(environ, "BLUEGREEN_NGINX", nginx_default),
        nginx_pid_file=environ.get("BLUEGREEN_NGINX_PID_FILE", "").strip(),
        nginx_conf_dir=Path(environ.get("BLUEGREEN_NGINX_CONF_DIR", "").strip() or "/etc/nginx/conf.d"),
        nginx_conf=environ.get("BLUEGREEN_NGINX_CONF", "").strip(),
        cron_dir=Path(environ.get("BLUEGREEN_CRON_DIR", "").strip() or "/etc/cron.d"),
        systemd_dir=Path(environ.get("BLUEGREEN_SYSTEMD_DIR", "").strip() or "/etc/systemd/system"),
    )


@dataclass(frozen=True)
class EnvEntry:
    key: str
    value: str
    line: int


def parse_env(text: str, source: str) -> list[EnvEntry]:
    """Parse KEY=VALUE lines: `#` comments, blank lines, optional `export `, optional quotes."""
    entries: list[EnvEntry] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"{source}:{lineno}: expected KEY=VALUE, got {_redact_line(raw)!r}.")
        if not _KEY_RE.fullmatch(key):
            # The "key" may be a stray line of a multi-line secret (a PEM body): show only its start.
            raise ConfigError(f"{source}:{lineno}: {_redact_line(key)!r} is not a valid variable name (letters, digits, '_').")
        entries.append(EnvEntry(key, _unquote(value.strip(), source, lineno, key), lineno))
    return entries


def _redact_line(raw: str) -> str:
    # A malformed line may still hold a secret: show only its first characters.
    raw = raw.strip()
    return raw if len(raw) <= 12 else raw[:12] + "..."


def _unquote(value: str, source: str, lineno: int, key: str) -> str:
    if value[:1] in ("'", '"'):
        quote = value[0]
        end = value.find(quote, 1)
        if end == -1:
            raise ConfigError(f"{source}:{lineno}: {key}: the value opens a {quote} quote that never closes.")
        rest = value[end + 1:].strip()
        if rest and not rest.startswith("#"):
            raise ConfigError(f"{source}:{lineno}: {key}: unexpected text after the closing quote.")
        return value[1:end]
    # Unquoted: ` # comment` ends the value, as in docker compose and dotenv files.
    hash_at = value.find(" #")
    if hash_at != -1:
        value = value[:hash_at]
    return value.rstrip()


@dataclass(frozen=True)
class ProjectConfig:
    """One project's settings; `app_env` is the application environment (may hold secrets)."""

    project: str
    source: str
    image: str
    spring_profiles: str = ""
    health_path: str = "/api/health"
    health_timeout: float = 120.0
    health_interval: float = 0.1
    health_initial_delay: float = 0.0
    health_request_timeout: float = 2.0
    health_host: str = ""
    health_expect: int = 200
    blue_port: int = 8081
    green_port: int = 8082
    app_port: int = 8080
    stop_timeout: int = 30
    log_dir: str = "/app/logs"
    docker_args: tuple[str, ...] = ()
    drain_timeout: float = 60.0
    verify_timeout: float = 5.0
    nginx_url: str = "http://127.0.0.1:80"
    server_name: str = ""
    notify_webhook_url: str = ""  # a secret: never printed
    hook_timeout: float = 60.0
    app_env: tuple[tuple[str, str], ...] = ()
    warnings: tuple[str, ...] = ()

    def port(self, colour: str) -> int:
        return self.blue_port if colour == "blue" else self.green_port

    def colour_of_port(self, port: int) -> str | None:
        if port == self.blue_port:
            return "blue"
        if port == self.green_port:
            return "green"
        return None

    def container_env(self) -> list[tuple[str, str]]:
        """Everything the container gets as environment, SPRING_PROFILES_ACTIVE first."""
        env = [("SPRING_PROFILES_ACTIVE", self.spring_profiles)] if self.spring_profiles else []
        return env + list(self.app_env)


def load_project(settings: Settings, project: str) -> ProjectConfig:
    """Read and validate ROOT/projects/PROJECT.env; errors name the file and the key."""
    path = settings.env_file(project)
    source = path.name
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such file. Every project needs an env file with at least IMAGE=registry/owner/name "
            f"(see README, 'Project env file'). Nothing was changed."
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read it ({exc}). Nothing was changed.") from None
    return project_from_entries(project, source, parse_env(text, source))


def project_from_entries(project: str, source: str, entries: list[EnvEntry]) -> ProjectConfig:
    """Turn parsed entries into a ProjectConfig (pure: the unit tests use it directly)."""
    values: dict[str, str] = {}
    app_env: dict[str, str] = {}
    warnings: list[str] = []
    for entry in entries:
        if entry.key in RESERVED_KEYS:
            values[entry.key] = entry.value
            continue
        if "\n" in entry.value or "\r" in entry.value or "\0" in entry.value:
            raise ConfigError(f"{source}: {entry.key}: values may not contain line breaks or NUL bytes.")
        app_env[entry.key] = entry.value
        if entry.key not in _NOT_MISSPELLINGS:
            close = difflib.get_close_matches(entry.key.upper(), RESERVED_KEYS, n=1, cutoff=0.8)
            if close:
                warnings.append(
                    f"{source}:{entry.line}: {entry.key} is not a bluegreen setting, so it is passed to the "
                    f"app as environment; did you mean {close[0]}?"
                )

    def text(key: str, default: str) -> str:
        return values.get(key, default)

    def number(key: str, default: float, *, allow_zero: bool = False) -> float:
        raw = values.get(key)
        if raw is None or raw == "":
            return default
        try:
            val = float(raw)
        except ValueError:
            raise ConfigError(f"{source}: {key}: must be a number of seconds, got {raw!r}.") from None
        if val != val or val in (float("inf"), float("-inf")) or val < 0 or (val == 0 and not allow_zero):
            raise ConfigError(f"{source}: {key}: must be a positive number of seconds, got {raw!r}.")
        return val

    def integer(key: str, default: int, *, low: int, high: int, what: str) -> int:
        raw = values.get(key)
        if raw is None or raw == "":
            return default
        if not re.fullmatch(r"[0-9]+", raw) or not (low <= int(raw) <= high):
            raise ConfigError(f"{source}: {key}: must be {what}, got {raw!r}.")
        return int(raw)

    image = values.get("IMAGE", "")
    if not image:
        raise ConfigError(f"{source}: IMAGE: required, e.g. IMAGE=ghcr.io/owner/{project} (without a tag).")
    last = image.rsplit("/", 1)[-1]
    if ":" in last or "@" in image:
        raise ConfigError(
            f"{source}: IMAGE: give the repository without a tag or digest ({image!r}); the tag is the "
            f"deploy command's second argument."
        )
    if not _IMAGE_RE.fullmatch(image):
        raise ConfigError(f"{source}: IMAGE: {image!r} is not a valid image repository name.")

    port = dict(low=1, high=65535, what="a port number from 1 to 65535")
    blue = integer("BLUE_PORT", 8081, **port)
    green = integer("GREEN_PORT", 8082, **port)
    if blue == green:
        raise ConfigError(f"{source}: BLUE_PORT and GREEN_PORT must differ (both are {blue}).")

    health_path = text("HEALTH_PATH", "/api/health")
    if not health_path.startswith("/") or re.search(r"\s", health_path):
        raise ConfigError(f"{source}: HEALTH_PATH: must start with '/' and contain no spaces, got {health_path!r}.")
    health_host = text("HEALTH_HOST", "")
    if health_host and not re.fullmatch(r"[A-Za-z0-9.-]+(?::[0-9]+)?", health_host):
        raise ConfigError(f"{source}: HEALTH_HOST: must be a host name, got {health_host!r}.")

    timeout = number("HEALTH_TIMEOUT", 120.0)
    interval = number("HEALTH_INTERVAL", 0.1)
    if interval > timeout:
        raise ConfigError(f"{source}: HEALTH_INTERVAL ({interval:g}s) is longer than HEALTH_TIMEOUT ({timeout:g}s).")

    log_dir = text("LOG_DIR", "/app/logs")
    if log_dir and (not log_dir.startswith("/") or ":" in log_dir or "," in log_dir):
        raise ConfigError(f"{source}: LOG_DIR: must be an absolute path without ':' or ',' (or empty for no log volume), got {log_dir!r}.")

    try:
        docker_args = tuple(shlex.split(text("DOCKER_ARGS", "")))
    except ValueError as exc:
        raise ConfigError(f"{source}: DOCKER_ARGS: cannot parse it ({exc}).") from None
    problem = docker_args_problem(docker_args)
    if problem:
        raise ConfigError(f"{source}: DOCKER_ARGS: {problem}")

    nginx_url = text("NGINX_URL", "http://127.0.0.1:80").rstrip("/")
    if not re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+", nginx_url):
        raise ConfigError(f"{source}: NGINX_URL: must be like http://127.0.0.1:80 (scheme, host, port; no path), got {nginx_url!r}.")
    server_name = text("SERVER_NAME", "")
    if server_name and not re.fullmatch(r"[A-Za-z0-9.-]+(?::[0-9]+)?", server_name):
        raise ConfigError(f"{source}: SERVER_NAME: must be a host name, got {server_name!r}.")

    notify_url = text("NOTIFY_WEBHOOK_URL", "")
    if notify_url and not re.fullmatch(r"https?://\S+", notify_url):
        # Do not echo the value: a webhook URL is a credential.
        raise ConfigError(f"{source}: NOTIFY_WEBHOOK_URL: must be an http:// or https:// URL.")

    return ProjectConfig(
        project=project,
        source=source,
        image=image,
        spring_profiles=text("SPRING_PROFILES", ""),
        health_path=health_path,
        health_timeout=timeout,
        health_interval=interval,
        health_initial_delay=number("HEALTH_INITIAL_DELAY", 0.0, allow_zero=True),
        health_request_timeout=number("HEALTH_REQUEST_TIMEOUT", 2.0),
        health_host=health_host,
        health_expect=integer("HEALTH_EXPECT", 200, low=100, high=599, what="an HTTP status code"),
        blue_port=blue,
        green_port=green,
        app_port=integer("APP_PORT", 8080, **port),
        stop_timeout=integer("STOP_TIMEOUT", 30, low=0, high=86400, what="a whole number of seconds"),
        log_dir=log_dir,
        docker_args=docker_args,
        drain_timeout=number("DRAIN_TIMEOUT", 60.0, allow_zero=True),
        verify_timeout=number("VERIFY_TIMEOUT", 5.0),
        nginx_url=nginx_url,
        server_name=server_name,
        notify_webhook_url=notify_url,
        hook_timeout=number("HOOK_TIMEOUT", 60.0),
        app_env=tuple(app_env.items()),
        warnings=tuple(warnings),
    )
