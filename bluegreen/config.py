"""Host settings and project env files, loaded once into frozen dataclasses and validated eagerly."""

from __future__ import annotations

import difflib
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from bluegreen import dockerargs, safefs
from bluegreen.colours import COLOURS  # noqa: F401  (defined in a leaf for the parser; importers of config read it here)
from bluegreen import settings as table
from bluegreen.errors import ConfigError, UsageError

DEFAULT_ROOT = "/opt/deploy"

# Names end up in file paths, container names, nginx config and docker argv: allow only
# what is safe in all four (no path separators, no leading dot or dash, no whitespace).
_PROJECT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST_RE = re.compile(r"sha256:[a-f0-9]{64}")
_IMAGE_RE = re.compile(table._IMAGE_RE)
_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# Keys bluegreen reads itself (the table in bluegreen/settings.py); every other key is application environment.
RESERVED_KEYS = table.KEYS
# App keys that look like a reserved key but are legitimate application settings.
_NOT_MISSPELLINGS = {"SPRING_PROFILES_ACTIVE"}


def docker_args_problem(args: Sequence[str]) -> str | None:
    """Why DOCKER_ARGS may not be used as given, or None (docker's own flag grammar: see dockerargs)."""
    return dockerargs.problem(args)


def _quoted(text: str) -> str:
    # A name from the command line, quoted back escaped and bounded (it can be anything a shell passes).
    return repr(text) if len(text) <= 80 else f"{text[:40]!r}... ({len(text)} characters)"


def validate_project(name: str) -> str:
    """Refuse project names that could escape the root or break nginx/docker."""
    if not isinstance(name, str) or not _PROJECT_RE.fullmatch(name) or ".." in name:
        raise UsageError(
            f"Invalid project name {_quoted(str(name))}: use letters, digits, '-', '_' and '.', starting with a "
            f"letter or digit, no '..', at most 64 characters (e.g. user-api). Nothing was changed."
        )
    return name


def is_tag(tag: object) -> bool:
    """A docker tag or a sha256 digest that cannot act as an option or escape a path."""
    return isinstance(tag, str) and bool((_TAG_RE.fullmatch(tag) and ".." not in tag) or _DIGEST_RE.fullmatch(tag))


def validate_tag(tag: str) -> str:
    """Accept a docker tag or a sha256 digest; refuse anything that could act as an option."""
    if is_tag(tag):
        return tag
    raise UsageError(
        f"Invalid tag {_quoted(str(tag))}: a tag is letters, digits, '_', '.' and '-' (not starting with '.' or '-', "
        f"no '..', at most 128 characters), or a digest sha256:<64 hex>. Nothing was changed."
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

    def watch_file(self, project: str) -> Path:
        """Present while a deploy watches the new container; `promote`/`abort` write PROJECT.watch-request."""
        return self.root / "projects" / f"{project}.watch"

    def journal_file(self, project: str) -> Path:
        return self.root / "projects" / f"{project}.journal"

    def hooks_dir(self, project: str) -> Path:
        return self.root / "hooks" / project

    def projects(self) -> list[str]:
        """Every project with an env file under the root, sorted."""
        found = []
        for path in sorted((self.root / "projects").glob("*.env")):
            if _PROJECT_RE.fullmatch(path.stem) and ".." not in path.stem:
                found.append(path.stem)
        return found


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _host_value(environ: Mapping[str, str], var: str) -> str:
    # A NUL or newline in a path or command would fail much later (ValueError from os or subprocess).
    raw = environ.get(var, "")
    if not isinstance(raw, str):
        raise UsageError(f"{var} is not text. Nothing was changed.")
    raw = raw.strip()
    bad = _CONTROL.search(raw)
    if bad:
        raise UsageError(f"{var}: character {bad.start() + 1} is a control character (a newline, NUL, ...); give a "
                         f"plain path or command. Nothing was changed.")
    return raw


def _command_prefix(environ: Mapping[str, str], var: str, default: list[str]) -> tuple[str, ...]:
    raw = _host_value(environ, var)
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
    root_text = _host_value({"--root": root or ""}, "--root") or _host_value(environ, "BLUEGREEN_ROOT") or DEFAULT_ROOT
    if euid is None:
        euid = os.geteuid()
    # Non-root deploys (CI over SSH as ec2-user) reach nginx through sudo; -n so that a
    # missing sudoers rule fails at once instead of hanging on a password prompt.
    nginx_default = ["nginx"] if euid == 0 else ["sudo", "-n", "nginx"]
    return Settings(
        root=Path(root_text),
        docker_cmd=_command_prefix(environ, "BLUEGREEN_DOCKER", ["docker"]),
        nginx_cmd=_command_prefix(environ, "BLUEGREEN_NGINX", nginx_default),
        nginx_pid_file=_host_value(environ, "BLUEGREEN_NGINX_PID_FILE"),
        nginx_conf_dir=Path(_host_value(environ, "BLUEGREEN_NGINX_CONF_DIR") or "/etc/nginx/conf.d"),
        nginx_conf=_host_value(environ, "BLUEGREEN_NGINX_CONF"),
        cron_dir=Path(_host_value(environ, "BLUEGREEN_CRON_DIR") or "/etc/cron.d"),
        systemd_dir=Path(_host_value(environ, "BLUEGREEN_SYSTEMD_DIR") or "/etc/systemd/system"),
    )


@dataclass(frozen=True)
class EnvEntry:
    key: str
    value: str
    line: int


_BLANKS = " \t"  # only these surround keys and values: other Unicode spaces may be part of a secret


def parse_env(text: str, source: str) -> list[EnvEntry]:
    """Parse KEY=VALUE lines: `#` comments, blank lines, optional `export `, optional quotes.

    Lines end at \n only (a \r before it is dropped): a value holding U+2028, \x0b or \x85 stays one value.
    Errors name the file, the line and (when it is a valid name) the key, never any part of a value.
    """
    entries: list[EnvEntry] = []
    if text.startswith("\ufeff"):  # a UTF-8 byte order mark from a Windows editor
        text = text[1:]
    for lineno, raw in enumerate(text.split("\n"), start=1):
        if raw.endswith("\r"):
            raw = raw[:-1]
        line = raw.strip(_BLANKS)
        if not line or line.startswith("#"):
            continue
        if line.startswith(("export ", "export\t")):
            line = line[len("export"):].lstrip(_BLANKS)
        key, sep, value = line.partition("=")
        key = key.strip(_BLANKS)
        if not sep:
            # Named only when it is one of ours: a line of a pasted PEM body is a valid name too.
            named = f" {key}:" if key in table.BY_KEY else ""
            raise ConfigError(
                f"{source}:{lineno}:{named} expected KEY=VALUE, but the line has no '=' (its text is not shown: it "
                f"may be part of a secret; a value cannot span lines). Nothing was changed."
            )
        if not _KEY_RE.fullmatch(key):
            raise ConfigError(
                f"{source}:{lineno}: the text before '=' is not a valid variable name (letters, digits and '_', not "
                f"starting with a digit); it is not shown, as it may be part of a secret. Nothing was changed."
            )
        entries.append(EnvEntry(key, _unquote(value.strip(_BLANKS), source, lineno, key), lineno))
    return entries


def _unquote(value: str, source: str, lineno: int, key: str) -> str:
    if value[:1] in ("'", '"'):
        quote = value[0]
        end = value.find(quote, 1)
        if end == -1:
            raise ConfigError(f"{source}:{lineno}: {key}: the value opens a {quote} quote that never closes "
                              f"(a value cannot span lines).")
        rest = value[end + 1:].strip(_BLANKS)
        if rest and not rest.startswith("#"):
            raise ConfigError(f"{source}:{lineno}: {key}: unexpected text after the closing quote.")
        return value[1:end]
    # Unquoted: ` # comment` ends the value, as in docker compose and dotenv files.
    hash_at = value.find(" #")
    if hash_at != -1:
        value = value[:hash_at]
    return value.rstrip(_BLANKS)


_DEFAULTS = table.defaults()


@dataclass(frozen=True)
class ProjectConfig:
    """One project's settings; `app_env` is the application environment (may hold secrets).

    The defaults come from the table in bluegreen/settings.py, like everything else about a setting.
    """

    project: str
    source: str
    image: str
    spring_profiles: str = _DEFAULTS["spring_profiles"]  # type: ignore[assignment]
    pull: str = _DEFAULTS["pull"]  # type: ignore[assignment]
    health_path: str = _DEFAULTS["health_path"]  # type: ignore[assignment]
    health_timeout: float = _DEFAULTS["health_timeout"]  # type: ignore[assignment]
    health_interval: float = _DEFAULTS["health_interval"]  # type: ignore[assignment]
    health_initial_delay: float = _DEFAULTS["health_initial_delay"]  # type: ignore[assignment]
    health_request_timeout: float = _DEFAULTS["health_request_timeout"]  # type: ignore[assignment]
    health_host: str = _DEFAULTS["health_host"]  # type: ignore[assignment]
    health_expect: int = _DEFAULTS["health_expect"]  # type: ignore[assignment]
    blue_port: int = _DEFAULTS["blue_port"]  # type: ignore[assignment]
    green_port: int = _DEFAULTS["green_port"]  # type: ignore[assignment]
    app_port: int = _DEFAULTS["app_port"]  # type: ignore[assignment]
    stop_timeout: int = _DEFAULTS["stop_timeout"]  # type: ignore[assignment]
    watch_seconds: float = _DEFAULTS["watch_seconds"]  # type: ignore[assignment]
    watch_max_error_rate: int = _DEFAULTS["watch_max_error_rate"]  # type: ignore[assignment]
    watch_min_requests: int = _DEFAULTS["watch_min_requests"]  # type: ignore[assignment]
    canary_steps: str = _DEFAULTS["canary_steps"]  # type: ignore[assignment]
    canary_step_seconds: float = _DEFAULTS["canary_step_seconds"]  # type: ignore[assignment]
    log_dir: str = _DEFAULTS["log_dir"]  # type: ignore[assignment]
    docker_args: tuple[str, ...] = _DEFAULTS["docker_args"]  # type: ignore[assignment]
    drain_timeout: float = _DEFAULTS["drain_timeout"]  # type: ignore[assignment]
    verify_timeout: float = _DEFAULTS["verify_timeout"]  # type: ignore[assignment]
    nginx_url: str = _DEFAULTS["nginx_url"]  # type: ignore[assignment]
    server_name: str = _DEFAULTS["server_name"]  # type: ignore[assignment]
    notify_webhook_url: str = _DEFAULTS["notify_webhook_url"]  # type: ignore[assignment]  # a secret: never printed
    hook_timeout: float = _DEFAULTS["hook_timeout"]  # type: ignore[assignment]
    upstream_keepalive: int = _DEFAULTS["upstream_keepalive"]  # type: ignore[assignment]
    upstream_keepalive_timeout: int = _DEFAULTS["upstream_keepalive_timeout"]  # type: ignore[assignment]
    upstream_max_fails: int = _DEFAULTS["upstream_max_fails"]  # type: ignore[assignment]
    upstream_fail_timeout: int = _DEFAULTS["upstream_fail_timeout"]  # type: ignore[assignment]
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
    """Read and validate ROOT/projects/PROJECT.env (no symlink, regular file, at most 1 MiB, UTF-8)."""
    path = settings.env_file(project)
    source = path.name
    try:
        data = safefs.read_bytes(path, root=settings.root, max_bytes=safefs.DEFAULT_MAX_BYTES)
    except safefs.UnsafePath as exc:
        raise ConfigError(exc.message) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror or exc}). Nothing was changed.") from None
    if data is None:
        raise ConfigError(
            f"{path}: no such file. Every project needs an env file with at least IMAGE=registry/owner/name "
            f"(see docs/env-reference.md). Nothing was changed."
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        lineno = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"{path}:{lineno}: the file is not UTF-8 text (byte {exc.start + 1} cannot be decoded); save it as "
            f"UTF-8 (docker refuses anything else too). Nothing was changed."
        ) from None
    return project_from_entries(project, source, parse_env(text, source))


def project_from_entries(project: str, source: str, entries: Sequence[EnvEntry]) -> ProjectConfig:
    """Turn parsed entries into a ProjectConfig, validating every value from the settings table (pure)."""
    first_line: dict[str, int] = {}
    raw: dict[str, tuple[str, int]] = {}
    app_env: list[tuple[str, str]] = []
    warnings: list[str] = []
    app_size = 0
    for entry in entries:
        key, value, line = entry.key, entry.value, entry.line
        if not isinstance(key, str) or not _KEY_RE.fullmatch(key) or not isinstance(value, str):
            raise ConfigError(f"{source}:{line}: not a valid KEY=VALUE entry. Nothing was changed.")
        if key in first_line:
            raise ConfigError(
                f"{source}: {key} is set twice, on line {first_line[key]} and on line {line}. Keep one of the two "
                f"lines (bluegreen does not guess which one you meant). Nothing was changed."
            )
        first_line[key] = line
        if key in table.BY_KEY:
            raw[key] = (value, line)
            continue
        table.check_app_value(key, value, source, line)
        app_size += len(key.encode()) + 2 + len(value.encode())
        if app_size > table.APP_ENV_MAX:
            raise ConfigError(
                f"{source}: the application environment is larger than {table.APP_ENV_MAX} bytes (line {line}); "
                f"put large data in a file the app reads (a volume) instead. Nothing was changed."
            )
        app_env.append((key, value))
        if key not in _NOT_MISSPELLINGS and len(key) <= 64:
            close = difflib.get_close_matches(key.upper(), RESERVED_KEYS, n=1, cutoff=0.8)
            if close:
                warnings.append(
                    f"{source}:{line}: {key} is not a bluegreen setting, so it is passed to the "
                    f"app as environment; did you mean {close[0]}?"
                )

    if "IMAGE" not in raw:
        raise ConfigError(f"{source}: IMAGE: required, e.g. IMAGE=ghcr.io/owner/{project} (without a tag).")
    values: dict[str, object] = {}
    for setting in table.TABLE:
        given = raw.get(setting.key)
        values[setting.key] = (setting.default if given is None
                               else table.parse_value(setting, given[0], source, given[1]))
    table.cross_check(values, source)
    return ProjectConfig(
        project=project,
        source=source,
        app_env=tuple(app_env),
        warnings=tuple(warnings),
        **{setting.field: values[setting.key] for setting in table.TABLE},  # type: ignore[arg-type]
    )
