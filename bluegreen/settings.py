"""The table of project settings: the one source the env-file parser validates from, and from which the env
template and docs/env-reference.md are generated (`python3 -m bluegreen.settings --write`; `--check` says
whether the committed files are current)."""

from __future__ import annotations

import ipaddress
import re
import shlex
import sys
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from bluegreen import dockerargs
from bluegreen.errors import ConfigError

# A day: longer is a typo, and a bounded value keeps every deadline, sleep and timeout computable.
DAY = 86400
# docker reads --env-file with Go's bufio.Scanner: a line of 64 KiB or more fails `docker run`.
ENV_LINE_MAX = 65535
# The container gets all of it in one execve (limit about 2 MiB with an 8 MiB stack): stay well inside.
APP_ENV_MAX = 1 << 20

PORT = r"(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})"
HOST = r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9.])?"
_IPV6 = r"\[[0-9A-Fa-f:.]{2,45}\]"
_HOST_CHARS = r"A-Za-z0-9.:-"
_URL_CHARS = r"A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%"  # RFC 3986: unreserved, reserved and '%'
_PATH_CHARS = r"A-Za-z0-9\-._~!$&'()*+,;=:@/%?"  # a URL path and query: no space, no '#', no control
# Anything printable, Unicode included, that survives argv: no control characters, line separators or surrogates.
_TEXT_CHARS = r"\x20-\x7e\xa0-\u2027\u202a-\ud7ff\ue000-\U0010ffff"
_IMAGE_RE = (
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?::[0-9]+)?/)?"  # optional registry host[:port]/
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
    r"(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
)
_DECIMAL = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")
_WHOLE = re.compile(r"[0-9]+")
_NUMBER_MAX_LEN = 16  # "86400.000000001": no digit string long enough to be slow (or refused) by int()


@dataclass(frozen=True)
class Setting:
    """One key of the project env file: its type, default, bounds, allowed characters and documentation."""

    key: str
    field: str  # the ProjectConfig field
    kind: str  # "seconds" (float), "integer", "text", "url" (text, trailing '/' dropped), "docker-args"
    default: object  # None: required
    doc: str  # one line: what it does
    section: str
    low: float = 0
    high: float = DAY
    zero: bool = True  # seconds: whether 0 is allowed
    unit: str = ""  # integers: "a port number", ...
    chars: str = ""  # a regex character class (without brackets) of the allowed characters
    chars_doc: str = ""
    max_len: int = 0
    pattern: str = ""  # the whole value must match it (after the characters and the length)
    pattern_doc: str = ""  # what the pattern means, in words: the messages and the reference use it
    refuse: tuple[tuple[str, str], ...] = ()  # (regex, why): a common mistake with its own message
    empty: str = ""  # what an empty value means; "" = an empty value is refused
    secret: bool = False
    template: str = ""  # "@NAME@": written uncommented in the env template with this placeholder
    note: str = ""  # extra text for the reference's "accepted values"
    hint: str = ""  # one more sentence for the env template and the reference's "meaning"
    url: bool = False  # also checked the way urllib will read it (host, port, bracketed IPv6 address)

    @property
    def required(self) -> bool:
        return self.default is None

    def default_text(self) -> str:
        """The default as it is written in an env file ('' for none)."""
        if self.default is None:
            return ""
        if isinstance(self.default, float):
            return f"{self.default:g}"
        if isinstance(self.default, tuple):
            return shlex.join(self.default)
        return str(self.default)

    def accepted(self) -> str:
        """The accepted values in words, for messages and the reference."""
        if self.kind == "seconds":
            low = "more than 0" if not self.zero else f"{self.low:g} or more"
            return f"a number of seconds like 30 or 0.5, {low} and at most {self.high:g}"
        if self.kind == "integer":
            return f"{self.unit} from {self.low:g} to {self.high:g}"
        parts = [self.pattern_doc] if self.pattern_doc else []
        if self.chars_doc:
            parts.append(self.chars_doc)
        parts.append(f"at most {self.max_len} characters")
        if self.empty:
            parts.append(f"empty for {self.empty}")
        return "; ".join(parts)


S_IMAGE = "image"
S_PORTS = "ports: the two colours, published on 127.0.0.1 only"
S_HEALTH = "health check of the new container (before any traffic reaches it)"
S_SWITCH = "the switch: how bluegreen proves nginx routes to the new container"
S_OLD = "the old container"
S_EXTRAS = "container extras"
S_AFTER = "after a deploy"
S_UPSTREAM = "nginx's connections to the app (the managed upstream file)"
S_WATCH = "the watch window: real traffic judged after the switch, the old container kept running meanwhile"
SECTIONS = (S_IMAGE, S_PORTS, S_HEALTH, S_SWITCH, S_UPSTREAM, S_WATCH, S_OLD, S_EXTRAS, S_AFTER)

_PORT_KW = dict(kind="integer", low=1, high=65535, unit="a port number", section=S_PORTS)
_HOST_KW = dict(
    kind="text", chars=_HOST_CHARS, chars_doc="letters, digits, '.', '-' and ':'", max_len=259,
    pattern=rf"{HOST}(?::{PORT})?", pattern_doc="a host name, optionally with :port",
)

TABLE: tuple[Setting, ...] = (
    Setting(
        "IMAGE", "image", "text", None, "image repository without a tag; the tag is the deploy command's second argument",
        S_IMAGE, chars=r"A-Za-z0-9._/:-", chars_doc="letters, digits, '.', '_', '-', '/' and ':'", max_len=255,
        pattern=_IMAGE_RE, pattern_doc="a docker repository name such as ghcr.io/acme/mono/user-api",
        refuse=((r"(?s).*@.*|(?:.*/)?[^/]*:[^/]*", "give the repository without a tag or digest; the tag is the deploy "
                 "command's second argument"),),
        template="@IMAGE@",
    ),
    Setting(
        "SPRING_PROFILES", "spring_profiles", "text", "", "given to the container as SPRING_PROFILES_ACTIVE (prod, staging, ...)",
        S_IMAGE, chars=r"A-Za-z0-9._, -", chars_doc="letters, digits, '.', '_', '-', ',' and spaces", max_len=256,
        empty="none",
    ),
    Setting(
        "PULL", "pull", "text", "always", "when a deploy runs `docker pull`: always, missing (only if this host lacks "
        "the image) or never", S_IMAGE, chars="a-z", chars_doc="lowercase letters", max_len=16,
        pattern="always|missing|never", pattern_doc="always, missing or never",
        hint=("an image loaded with `docker load` or built on this host has no registry to pull from: deploy it with "
              "missing or never (air-gapped hosts); a digest (sha256:...) is a registry digest, found locally only "
              "for an image once pulled from a registry"),
    ),
    Setting("BLUE_PORT", "blue_port", default=8081, doc="host port of the blue container, published on 127.0.0.1 only",
            template="@BLUE_PORT@", note="different from GREEN_PORT", **_PORT_KW),
    Setting("GREEN_PORT", "green_port", default=8082, doc="host port of the green container, published on 127.0.0.1 only",
            template="@GREEN_PORT@", note="different from BLUE_PORT", **_PORT_KW),
    Setting("APP_PORT", "app_port", default=8080, doc="the port the app listens on inside the container", **_PORT_KW),
    Setting(
        "HEALTH_PATH", "health_path", "text", "/api/health", "path (and query) polled on the new container",
        S_HEALTH, chars=_PATH_CHARS, chars_doc="printable ASCII URL characters: no spaces, no '#', no control characters",
        max_len=1024, pattern=r"/(?:[^%]|%[0-9A-Fa-f]{2})*", pattern_doc="a path that starts with '/' ('%' only as %XX)",
    ),
    Setting("HEALTH_TIMEOUT", "health_timeout", "seconds", 120.0,
            "seconds the new container has to answer HEALTH_EXPECT (raise it for a slow boot)", S_HEALTH, zero=False,
            note="at least HEALTH_INTERVAL"),
    Setting("HEALTH_INTERVAL", "health_interval", "seconds", 0.1,
            "seconds between health requests (a deploy waits at most this long past readiness)", S_HEALTH,
            low=0.01, note="at most HEALTH_TIMEOUT"),
    Setting("HEALTH_INITIAL_DELAY", "health_initial_delay", "seconds", 0.0,
            "seconds to wait before the first health request", S_HEALTH),
    Setting("HEALTH_REQUEST_TIMEOUT", "health_request_timeout", "seconds", 2.0,
            "seconds one health request may take", S_HEALTH, zero=False),
    Setting("HEALTH_HOST", "health_host", default="", doc="Host header of the health requests, if the app needs one",
            section=S_HEALTH, empty="none", **_HOST_KW),
    Setting("HEALTH_EXPECT", "health_expect", "integer", 200, "the HTTP status that means healthy", S_HEALTH,
            low=100, high=599, unit="an HTTP status code"),
    Setting(
        "NGINX_URL", "nginx_url", "url", "http://127.0.0.1:80",
        "where this host's nginx answers, for the probe of HEALTH_PATH after the switch (init sets it from --listen)",
        S_SWITCH, chars=r"A-Za-z0-9.:/\[\]-", chars_doc="letters, digits, '.', '-', ':', '/', '[' and ']'", max_len=300,
        pattern=rf"https?://(?:{HOST}|{_IPV6})(?::{PORT})?/?", pattern_doc="http(s)://host:port (no path)",
        template="@NGINX_URL@", url=True,
    ),
    Setting("SERVER_NAME", "server_name", default="",
            doc="Host header of that probe, so it reaches this project's server block (init sets it from --server-name)",
            section=S_SWITCH, empty="nginx's default server for NGINX_URL", template="@SERVER_NAME@", **_HOST_KW),
    Setting("VERIFY_TIMEOUT", "verify_timeout", "seconds", 5.0,
            "seconds the probe through nginx may take to see the new container", S_SWITCH, zero=False),
    Setting("DRAIN_TIMEOUT", "drain_timeout", "seconds", 60.0,
            "seconds to wait for nginx workers from before the reload to finish their requests", S_SWITCH),
    Setting("WATCH_SECONDS", "watch_seconds", "seconds", 0.0,
            "after the switch, watch what nginx serves from the new container this long before the old one is "
            "stopped; the share of 5xx above WATCH_MAX_ERROR_RATE, a failing health check or a crash switches back "
            "at once", S_WATCH, high=3600.0, empty="",
            hint="needs the server block's `log_format bluegreen_watch_PROJECT` and `access_log` lines (init writes them); 0: no watch"),
    Setting("WATCH_MAX_ERROR_RATE", "watch_max_error_rate", "integer", 5,
            "percent of the requests nginx sent to the new container that may answer 5xx during the watch",
            S_WATCH, low=0, high=100, unit="a whole percentage"),
    Setting("WATCH_MIN_REQUESTS", "watch_min_requests", "integer", 20,
            "fewer requests than this in the watch: judged by health and crashes only (too few to judge a share); "
            "a canary step stops early on strong evidence from its share of this number (at least 3, or this number if smaller)",
            S_WATCH, low=0, high=10000, unit="a number of requests"),
    Setting("CANARY_STEPS", "canary_steps", "text", "",
            "before the full switch, send this percentage of requests to the new container, step by step (e.g. "
            "10,50), each judged like the watch for CANARY_STEP_SECONDS; each step is one nginx reload",
            S_WATCH, chars=r"0-9,", chars_doc="digits and commas", max_len=40, empty="no canary steps",
            pattern=r"[0-9]{1,2}(?:,[0-9]{1,2}){0,4}", pattern_doc="up to 5 percentages from 1 to 99, rising, comma-separated",
            hint="needs the watch's access_log line, like WATCH_SECONDS"),
    Setting("CANARY_STEP_SECONDS", "canary_step_seconds", "seconds", 30.0,
            "how long each canary step is judged", S_WATCH, high=3600.0, zero=False),
    Setting("STOP_TIMEOUT", "stop_timeout", "integer", 30,
            "seconds `docker stop` gives the old container to shut down before killing it", S_OLD,
            low=0, high=DAY, unit="a whole number of seconds"),
    Setting(
        "LOG_DIR", "log_dir", "text", "/app/logs",
        "host directory mounted at the same path in the container; `bluegreen backup-logs` compresses its rolled files",
        S_EXTRAS, chars=r"A-Za-z0-9._/@+-", chars_doc="letters, digits, '.', '_', '-', '@', '+' and '/'", max_len=1024,
        hint="`bluegreen setup` schedules that daily",
        pattern=r"(?!.*//)(?!/$)(?!(?:.*/)?\.\.?(?:/|$))/.*", pattern_doc="an absolute path, not '/', without '.' or '..' parts",
        empty="no log volume",
    ),
    Setting(
        "DOCKER_ARGS", "docker_args", "docker-args", (), "extra `docker run` options, e.g. --memory 1g --cpus 1.5",
        S_EXTRAS, chars=_TEXT_CHARS, chars_doc="no control characters", max_len=4096, empty="none",
        pattern_doc="`docker run` options as shell words",
        hint=("refused: bluegreen's own options (--name, --publish, --restart, --env, its labels, ...), host networking and "
              "anything that is not a `docker run` option (docs/env-reference.md says which and why)"),
        note=("refused: anything that is not an option (it would become the image), unknown options, "
              "--name, -p/--publish, -P/--publish-all, -d/--detach, -a/--attach, --rm, --restart, -e/--env, "
              "--env-file, --label-file, -l/--label with a bluegreen.* key, --cidfile, --pull, --help, and "
              "--network/--net host, none or container:NAME"),
    ),
    Setting(
        "NOTIFY_WEBHOOK_URL", "notify_webhook_url", "text", "",
        "URL that gets a JSON POST after every deploy, success or failure (Slack/Teams incoming webhook)", S_AFTER,
        chars=_URL_CHARS, chars_doc="printable ASCII URL characters, no spaces", max_len=2048,
        pattern=rf"https?://(?:[^@/?#]*@)?(?:{HOST}|{_IPV6})(?::{PORT})?(?:[/?#].*)?", pattern_doc="an http:// or https:// URL",
        empty="none", secret=True, url=True,
    ),
    Setting("HOOK_TIMEOUT", "hook_timeout", "seconds", 60.0,
            "seconds a hook in ROOT/hooks/PROJECT/ (pre-deploy, post-deploy, on-failure) may run", S_AFTER, zero=False),
)
# The managed upstream file's settings. They join TABLE once ProjectConfig (bluegreen/config.py) has their
# fields (upstream_keepalive: int = 16, upstream_keepalive_timeout: int = 4, upstream_max_fails: int = 1,
# upstream_fail_timeout: int = 10); until then every deploy writes their defaults (upstream_options).
UPSTREAM_ROWS: tuple[Setting, ...] = (
    Setting("UPSTREAM_KEEPALIVE", "upstream_keepalive", "integer", 16,
            "idle keep-alive connections to the app that each nginx worker keeps open (nginx's `keepalive`); 0: "
            "a new TCP connection per request", S_UPSTREAM, low=0, high=1024, unit="a number of connections",
            hint=("it takes effect with `proxy_http_version 1.1;` and `proxy_set_header Connection \"\";` in the "
                  "server block (init writes both); old workers close theirs before the old container stops")),
    Setting("UPSTREAM_KEEPALIVE_TIMEOUT", "upstream_keepalive_timeout", "integer", 4,
            "seconds nginx keeps an idle connection to the app (nginx's `keepalive_timeout`, nginx 1.15.3 or later)",
            S_UPSTREAM, low=1, high=3600, unit="a whole number of seconds",
            hint=("keep it below the app's own idle timeout (Node.js: 5 s), or nginx may send a request on a "
                  "connection the app is closing and answer 502 to a POST")),
    Setting("UPSTREAM_MAX_FAILS", "upstream_max_fails", "integer", 1,
            "failed attempts within UPSTREAM_FAIL_TIMEOUT after which nginx stops sending to the server (nginx's "
            "`max_fails`; 0: never)", S_UPSTREAM, low=0, high=1000, unit="a number of attempts",
            hint="nginx ignores it while the upstream has one server, as bluegreen's has; written only when not 1"),
    Setting("UPSTREAM_FAIL_TIMEOUT", "upstream_fail_timeout", "integer", 10,
            "seconds for UPSTREAM_MAX_FAILS, and how long the server then counts as unavailable (nginx's "
            "`fail_timeout`)", S_UPSTREAM, low=1, high=3600, unit="a whole number of seconds",
            hint="ignored by nginx with one server, like UPSTREAM_MAX_FAILS; written only when not 10"),
)


def upstream_options(cfg: object) -> dict[str, int]:
    """The UPSTREAM_* values of a ProjectConfig (their defaults while it has no such fields), by option name."""
    return {row.field[len("upstream_"):]: getattr(cfg, row.field, row.default) for row in UPSTREAM_ROWS}  # type: ignore[misc]


TABLE = TABLE + UPSTREAM_ROWS
BY_KEY: dict[str, Setting] = {s.key: s for s in TABLE}
KEYS: tuple[str, ...] = tuple(s.key for s in TABLE)


def defaults() -> dict[str, object]:
    """ProjectConfig field -> default, for the fields that have one."""
    return {s.field: s.default for s in TABLE if s.default is not None}


# -- validation ------------------------------------------------------------------------------------------

def _fail(source: str, key: str, line: int | None, text: str) -> ConfigError:
    # "FILE: KEY: what is wrong" first (what people grep for), the line number last.
    return ConfigError(f"{source}: {key}: {text}" + (f" (line {line})." if line else "."))


def _shown(setting: Setting, raw: str) -> str:
    # Only a short, printable, non-secret value is quoted back; never a secret, never part of one.
    if setting.secret or len(raw) > 60 or not all(" " <= c <= "~" for c in raw):
        return ""
    return f", got {raw!r}"


def parse_value(setting: Setting, raw: str, source: str, line: int | None = None) -> object:
    """The typed value of one setting, or a ConfigError saying what is accepted (never echoing a secret)."""
    key = setting.key

    def fail(text: str) -> ConfigError:
        return _fail(source, key, line, text)

    if raw == "":
        if setting.required:
            raise fail(f"required, e.g. {key}=ghcr.io/owner/app (without a tag)")
        if setting.kind in ("seconds", "integer"):
            return setting.default
        if not setting.empty:
            raise fail(f"may not be empty; it must be {setting.accepted()} (default {setting.default_text()})")
        return () if setting.kind == "docker-args" else ""
    shown = _shown(setting, raw)
    if setting.kind == "seconds":
        if len(raw) > _NUMBER_MAX_LEN or not _DECIMAL.fullmatch(raw):
            raise fail(f"must be {setting.accepted()}{shown}")
        value = float(raw)
        if value < setting.low or value > setting.high or (value == 0 and not setting.zero):
            raise fail(f"must be {setting.accepted()}{shown}")
        return value
    if setting.kind == "integer":
        if len(raw) > _NUMBER_MAX_LEN or not _WHOLE.fullmatch(raw) or not setting.low <= int(raw) <= setting.high:
            raise fail(f"must be {setting.accepted()}{shown}")
        return int(raw)
    if len(raw) > setting.max_len:
        raise fail(f"the value is {len(raw)} characters long; at most {setting.max_len} are allowed")
    for regex, why in setting.refuse:
        if re.fullmatch(regex, raw):
            raise fail(f"{why}{shown}")
    bad = re.search(f"[^{setting.chars}]", raw)
    if bad:
        char = bad.group()
        what = "a space" if char == " " else (
            "a control character" if char < " " or "\x7f" <= char <= "\x9f" else "a character that is not allowed here")
        raise fail(f"character {bad.start() + 1} of the value is {what}; allowed are {setting.chars_doc}{shown}")
    if setting.pattern and not re.fullmatch(setting.pattern, raw):
        raise fail(f"must be {setting.pattern_doc}{shown}")
    if setting.url and not _url_ok(raw):
        raise fail(f"must be {setting.pattern_doc}, with a valid host and port{shown}")
    if setting.kind == "url":
        return raw.rstrip("/")
    if setting.kind == "docker-args":
        try:
            words = tuple(shlex.split(raw))
        except ValueError as exc:
            raise fail(f"cannot parse it as shell words ({exc})") from None
        problem = dockerargs.problem(words)
        if problem:
            raise fail(problem.rstrip("."))
        return words
    return raw


def _url_ok(url: str) -> bool:
    # What urllib and http.client will do with it later, where a ValueError would be an internal error.
    try:
        parts = urllib.parse.urlsplit(url)
        port, host = parts.port, parts.hostname
        if host and ":" in host:
            ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return bool(host) and port != 0


def check_app_value(key: str, value: str, source: str, line: int | None = None) -> None:
    """An application environment value must reach the container intact through docker's --env-file."""
    if "\n" in value or "\r" in value or "\0" in value:
        raise _fail(source, key, line, "values may not contain line breaks or NUL bytes (docker's env file is one "
                                       "line per variable); nothing was changed")
    if re.search("[\ud800-\udfff]", value):
        raise _fail(source, key, line, "the value is not valid Unicode text; nothing was changed")
    size = len(key.encode()) + 1 + len(value.encode())
    if size > ENV_LINE_MAX:
        raise _fail(source, key, line, f"KEY=VALUE is {size} bytes, and docker's env file takes at most "
                                       f"{ENV_LINE_MAX} bytes per line; put large data in a file the app reads "
                                       f"(a volume) instead. Nothing was changed")


def cross_check(values: Mapping[str, object], source: str) -> None:
    """The rules between settings (each value already valid on its own)."""
    if values["BLUE_PORT"] == values["GREEN_PORT"]:
        raise ConfigError(f"{source}: BLUE_PORT and GREEN_PORT must differ (both are {values['BLUE_PORT']}).")
    if values["HEALTH_INTERVAL"] > values["HEALTH_TIMEOUT"]:  # type: ignore[operator]
        raise ConfigError(
            f"{source}: HEALTH_INTERVAL ({values['HEALTH_INTERVAL']:g}s) is longer than HEALTH_TIMEOUT "
            f"({values['HEALTH_TIMEOUT']:g}s)."
        )
    steps = canary_steps(str(values.get("CANARY_STEPS") or ""))
    if steps is None:
        raise ConfigError(f"{source}: CANARY_STEPS={values['CANARY_STEPS']} must be percentages from 1 to 99, each "
                          f"higher than the one before (e.g. 10,50). Nothing was changed.")


def canary_steps(text: str) -> tuple[int, ...] | None:
    """CANARY_STEPS as percentages (() for none); None when they are not 1..99 and rising."""
    if not text:
        return ()
    steps = tuple(int(p) for p in text.split(","))
    if any(not 1 <= p <= 99 for p in steps) or any(a >= b for a, b in zip(steps, steps[1:])):
        return None
    return steps


# -- generated files ---------------------------------------------------------------------------------------

TEMPLATE_PATH = "bluegreen/templates/project.env"
REFERENCE_PATH = "docs/env-reference.md"
WRITE_COMMAND = "python3 -m bluegreen.settings --write"

_TEMPLATE_HEAD = """\
# bluegreen settings for @PROJECT@, written by `bluegreen init`; yours to edit.
# KEY=VALUE lines. The keys below are bluegreen's own (all of them, with their defaults); every other
# key is application environment for the container, e.g. DB_PASSWORD=..., piped to docker (never in
# a file or on a command line). Each key may appear once. Full reference: docs/env-reference.md.
# Check this file and the host with: bluegreen doctor @PROJECT@
"""
_TEMPLATE_SECTION_NOTES = {
    S_SWITCH: "# NGINX_URL and SERVER_NAME must reach the server block @SERVER_CONF@.",
    S_AFTER: "# Hooks live in ROOT/hooks/@PROJECT@/.",
    S_WATCH: ("# Catches a release that passes its health check but fails real requests. Try WATCH_SECONDS=60 once the\n"
              "# server block has its access_log line (`bluegreen doctor` checks it)."),
}
_TEMPLATE_TAIL = """
# --- application environment ----------------------------------------------------------------------
# Everything below is passed to the app, e.g.:
#DB_URL=jdbc:postgresql://db.internal:5432/app
#DB_PASSWORD=
"""


def _rule(title: str) -> str:
    head = f"# --- {title} "
    return head + "-" * max(3, 100 - len(head))


def _wrap(text: str, prefix: str, width: int = 104) -> list[str]:
    lines, current = [], ""
    for word in text.split():
        if current and len(prefix) + len(current) + 1 + len(word) > width:
            lines.append(prefix + current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    if current:
        lines.append(prefix + current)
    return lines


def render_template() -> str:
    """templates/project.env: every setting with its default (commented out unless init fills it in)."""
    out = [_TEMPLATE_HEAD.rstrip("\n")]
    for section in SECTIONS:
        if not any(s.section == section for s in TABLE):
            continue
        out.append("")
        out.append(_rule(section))
        if section in _TEMPLATE_SECTION_NOTES:
            out.append(_TEMPLATE_SECTION_NOTES[section])
        for s in (s for s in TABLE if s.section == section):
            out.extend(setting_lines(s, filled=True))
    out.append(_TEMPLATE_TAIL.rstrip("\n"))
    return "\n".join(out) + "\n"


def setting_lines(s: Setting, *, filled: bool) -> list[str]:
    """One setting as the env template writes it: its doc as comments, then `#KEY=DEFAULT` (or, `filled`,
    `KEY=@PLACEHOLDER@` for the keys init fills in). `adopt` appends the same lines for the keys a file lacks."""
    doc = s.doc[0].upper() + s.doc[1:] + "."
    if s.hint:
        doc += f" {s.hint[0].upper()}{s.hint[1:]}."
    if s.empty and s.empty != "none":
        doc += f" Empty: {s.empty}."
    if s.secret:
        doc += " A secret: bluegreen never prints it."
    line = f"{s.key}={s.template}" if filled and s.template else f"#{s.key}={s.default_text()}"
    return [*_wrap(doc, "# "), line]


_REFERENCE_HEAD = """\
# Settings reference

<!-- Generated from the table in bluegreen/settings.py by `python3 -m bluegreen.settings --write`: edit the
table, not this file (a test fails when this file is stale). -->

## The project env file: `ROOT/projects/PROJECT.env`

`bluegreen init PROJECT --image IMAGE` writes it with every key below, the defaults commented out.
Format: `KEY=VALUE` lines (a line ends at a newline; `\\r\\n` is fine); `#` starts a comment line; `export ` and
matching single or double quotes are allowed (no escapes inside them); in an unquoted value ` #` starts a
trailing comment. Each key may appear only once: a second line for the same key is refused with both line
numbers. The file is read without following a symlink, must be a regular file of at most 1 MiB, and must be
UTF-8.

Every value is checked completely (type, range, allowed characters, length) before anything runs: an
invalid one stops the deploy with exit 2 and a message naming the file and the key, e.g.
`user-api.env: HEALTH_TIMEOUT: must be a number of seconds like 30 or 0.5, more than 0 and at most 86400, got 'soon' (line 7).`
A message quotes a value back only when it is short, printable and not a secret; it never quotes any part
of `NOTIFY_WEBHOOK_URL`, of an application value, or of a line that cannot be parsed.

| key | default | meaning | accepted values |
|---|---|---|---|
"""
_REFERENCE_APP = """
Every other key is application environment for the container (`DB_PASSWORD=...`): a name of letters, digits
and `_` not starting with a digit, and a value without line breaks or NUL bytes whose `KEY=VALUE` line is at
most {line_max} bytes (docker's `--env-file` line limit); all of them together at most {app_max} bytes. Those
values reach docker through a pipe (`--env-file /dev/stdin`): they never appear in an argv, a file, a log line or a message. A key
that looks like a misspelt setting (`HELTH_TIMEOUT`) is still passed to the app, with a warning naming the
likely intent (`doctor` shows it too).

### DOCKER_ARGS

The words are read with docker's own option grammar (`--long`, `--long=value`, `--long value`, `-x value`,
`-x=value`, and short clusters such as `-tp 80:80`, where the first option that takes a value takes the rest
of the cluster or the next word), so no spelling gets past the rules:

- Refused because bluegreen sets them itself or because they would break a deploy: `--name`,
  `-p/--publish`, `-P/--publish-all`, `-d/--detach`, `-a/--attach`, `--rm`, `--restart`, `-l/--label` with
  a `bluegreen.*` key (its labels say which container is which), `--label-file` (its keys cannot be
  checked), `--cidfile` (docker refuses to run when the file exists, so the second deploy would fail),
  `--pull` (bluegreen pulls and records the digest itself) and `--help`.
- Refused because they would carry application environment in argv: `-e/--env` and `--env-file`.
- Refused because they bypass the 127.0.0.1 port nginx proxies to: `--network`/`--net` `host`, `none` or
  `container:NAME`, in any form (`--net=host`, `--network name=host`).
- Refused because bluegreen could not parse what follows them safely: any option that is not a `docker
  run` option (the message names it), a word that is not an option (docker would take it as the image),
  and `--`.
- Allowed on purpose: privilege options such as `--privileged`, `--cap-add`, `--pid host`, `-v /:/host` or
  `--use-api-socket`. Whoever can write the env file already chooses the image bluegreen runs as root, so
  refusing them would suggest a boundary that does not exist: keep the env file writable only by people
  who may be root on the host (docs/security.md). Values of allowed options are docker's to check: a bad
  one fails the start step, and the previous version keeps serving.
"""
_REFERENCE_TAIL = """
## Host settings: environment variables

These are read by every command. Nothing here is needed on a server laid out like the seed's; they exist for
other layouts and for the tests (which never touch the machine's real `/etc`).

| variable | default | meaning |
|---|---|---|
| `BLUEGREEN_ROOT` | `/opt/deploy` | deploy root; same as `--root DIR` |
| `BLUEGREEN_DOCKER` | `docker` | docker command prefix, e.g. `sudo docker` |
| `BLUEGREEN_NGINX` | `nginx` as root, else `sudo -n nginx` (never prompts) | nginx command prefix; `-t`, `-T`, `-V`, `-s reload` are appended |
| `BLUEGREEN_NGINX_PID_FILE` | the `pid` directive in `nginx -T` | the nginx master's pid file |
| `BLUEGREEN_NGINX_CONF` | `-c FILE` of the nginx command, else nginx's compiled-in `--conf-path` (`nginx -V`) | the nginx.conf `setup` adds the include to |
| `BLUEGREEN_NGINX_CONF_DIR` | `/etc/nginx/conf.d` | where `init` writes the server block `PROJECT.conf` |
| `BLUEGREEN_CRON_DIR` | `/etc/cron.d` | where `setup` writes the backup job `bluegreen` |
| `BLUEGREEN_SYSTEMD_DIR` | `/etc/systemd/system` | where `setup --schedule systemd` writes `bluegreen-backup-logs.service` and `.timer` |

## Files bluegreen writes

| file | written by | notes |
|---|---|---|
| `ROOT/projects/PROJECT.env` | `init` (then yours) | mode 0640; never replaced without `--force` (the old one is kept as `.bak`) |
| `ROOT/nginx/conf.d/PROJECT-upstream.conf` | `init` (placeholder), `adopt` (from the guide's hand-written one, same name and port), every deploy | never edit; `init --force` keeps it |
| `NGINX_CONF_DIR/PROJECT.conf` | `init` (then yours) | the server block: `listen`, `server_name`, `proxy_pass http://PROJECT;` and the route header line |
| `ROOT/projects/PROJECT.active`, `.lock`, `.journal`, `.freeze` | deploys and the day-2 commands | |
| `ROOT/adopt-backup/PROJECT/` | `adopt`, once | the guide's upstream file and server block as they were before the first adoption (never the env file: it holds secrets, and adopt only appends to it) |
| env file, server block of a guide project | `adopt` | the env file: settings it did not mention appended, commented out; the server block (only with `--force`): the route line and keep-alive lines added, nothing else changed |
| nginx.conf | `setup`, once | one `include ROOT/nginx/conf.d/*.conf;` line at the top of the http block |
| `/etc/cron.d/bluegreen` | `setup` | one daily job; rewritten only when it differs |
| `.github/workflows/deploy-backend.yml`, `deploy-PROJECT.yml`, `infra/docker/backend.Dockerfile` | `init --ci github` | in the application repository |
| `.github/bluegreen/bluegreen.pyz`, `bluegreen.pyz.sha256` | `init --ci github` | in the application repository: the bluegreen the deploy workflow runs (and the rollout sends to the hosts), and its sha256, which the workflow checks; replaced only with `--force` (docs/github-actions.md) |
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_reference() -> str:
    """docs/env-reference.md."""
    rows = []
    for s in TABLE:
        default = "(required)" if s.required else (f"`{s.default_text()}`" if s.default_text() else "(none)")
        meaning = s.doc + (f"; {s.hint}" if s.hint else "") + (" (a secret: never printed)" if s.secret else "")
        accepted = s.accepted() + (f"; {s.note}" if s.note else "")
        rows.append(f"| `{s.key}` | {_cell(default)} | {_cell(meaning)} | {_cell(accepted)} |")
    app = _REFERENCE_APP.format(line_max=ENV_LINE_MAX, app_max=APP_ENV_MAX)
    return _REFERENCE_HEAD + "\n".join(rows) + "\n" + app + _REFERENCE_TAIL


def generated() -> dict[str, str]:
    """Repository path -> the text the generator writes there."""
    return {TEMPLATE_PATH: render_template(), REFERENCE_PATH: render_reference()}


def main(argv: Sequence[str] | None = None) -> int:
    """`--write` the generated files into the repository, or `--check` that they are current."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args not in (["--write"], ["--check"]):
        print("usage: python3 -m bluegreen.settings --write | --check", file=sys.stderr)
        return 2
    repo = Path(__file__).resolve().parent.parent
    stale = []
    for rel, text in generated().items():
        path = repo / rel
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current != text:
            stale.append(rel)
            if args == ["--write"]:
                path.write_text(text, encoding="utf-8")
    if args == ["--check"] and stale:
        print(f"stale: {', '.join(stale)}; run `{WRITE_COMMAND}`", file=sys.stderr)
        return 1
    for rel in stale:
        print(f"wrote {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
