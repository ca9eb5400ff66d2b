"""Property tests (hypothesis) of the input side: env files, names and tags, DOCKER_ARGS, and `deploy --dry-run`.

Thousands of generated inputs: each is either accepted with its invariants intact or refused with a
ConfigError/UsageError (exit 2) whose message never quotes a secret; nothing else, and nothing changes.
"""

from __future__ import annotations

import http.client
import io
import os
import re
import shlex
import shutil
import string
import tempfile
import urllib.parse
import urllib.request

from hypothesis import HealthCheck, given, settings, strategies as st

from bluegreen import dockerargs
from bluegreen import docker as dk
from bluegreen import settings as table
from bluegreen.cli import main
from bluegreen.config import EnvEntry, parse_env, project_from_entries, validate_project, validate_tag
from bluegreen.errors import ConfigError, UsageError

SECRET = "S3cr3tT0k"  # planted in values that must never be echoed
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# -- strategies -------------------------------------------------------------------------------------------

interesting_values = st.sampled_from([
    "", "0", "1", "-1", "0.5", ".5", "5.", "1e308", "1e-308", "inf", "nan", "86400", "86401", "65535", "65536",
    "9" * 5000, "0" * 5000 + "1", "1_000", "\uff11", "/api/health", "/api/h\u00e9alth", "/a\x01b", "/a b", "/%zz",
    "http://127.0.0.1:80", "http://[::1]:8080/", "http://h:99999", "http://[", "https://hooks.example/x",
    "acme/app", "acme/app:v1", "Acme/App", "--name x", "-tp 0.0.0.0:80:80", "-te A=b", "--network=host",
    "--label bluegreen.tag=x", "--memory 1g", "'unclosed", "a\u2028b", "a\x85b", "x" * 70000, "/app/../etc", "/",
    "http://[::::]:80", "http://[1.2.3.4]", "https://[::1]:8443/", "http://h:0", "https://u:p@h.example:1/x?y#z",
    "https://a[b@h/", "http://h.example.:65535", "/a?b=%41&c=d", "h.example:443", "h:0",
])
any_value = st.one_of(interesting_values, st.text(max_size=40), st.text(alphabet=string.printable, max_size=40))
app_keys = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,12}", fullmatch=True).filter(lambda k: k not in table.BY_KEY)
reserved_keys = st.sampled_from(table.KEYS)


def _line(key: str, value: str, style: int) -> str:
    if style == 1:
        return f"export {key}={value}"
    if style == 2:
        return f"{key}='{value}'"
    if style == 3:
        return f'  {key} = "{value}"  # note'
    return f"{key}={value}"


env_lines = st.one_of(
    st.builds(_line, st.one_of(reserved_keys, app_keys), any_value, st.integers(0, 3)),
    st.text(max_size=30),  # anything at all on a line
    st.sampled_from(["", "# comment", "=x", "1BAD=x", "IMAGE", "export", "A='x' y", "\r", "\ufeffIMAGE=a/b"]),
)
env_texts = st.builds(lambda ls, nl: nl.join(ls), st.lists(env_lines, max_size=12), st.sampled_from(["\n", "\r\n"]))


def _check_config(cfg) -> None:
    """The invariants of an accepted ProjectConfig: everything later code does with it cannot fail on input."""
    for s in table.TABLE:
        value = getattr(cfg, s.field)
        if s.kind in ("seconds", "integer"):
            assert s.low <= value <= s.high and value == value
        elif s.kind == "docker-args":
            assert dockerargs.problem(value) is None
        else:
            assert len(value) <= s.max_len and "\n" not in value and "\0" not in value
            value.encode("utf-8")
    assert cfg.health_path.isascii() and cfg.health_path.isprintable() and " " not in cfg.health_path
    assert cfg.blue_port != cfg.green_port and cfg.health_interval <= cfg.health_timeout
    text = dk.env_file_text(cfg.container_env())
    lines = text.encode("utf-8").split(b"\n")[:-1]
    assert len(lines) == len(cfg.container_env())  # docker reads exactly one line per variable
    assert all(len(line) <= table.ENV_LINE_MAX for line in lines)
    assert all(_KEY.fullmatch(k) for k, _ in cfg.container_env())
    dk.run_argv(["docker"], cfg, colour="blue", tag="v1", ref=f"{cfg.image}:v1", env_file="/proc/self/fd/3")
    # The requests health, verify and notify will make: urllib and http.client accept them (no connection).
    probes = [(f"http://127.0.0.1:{cfg.blue_port}{cfg.health_path}", cfg.health_host),
              (f"{cfg.nginx_url}{cfg.health_path}", cfg.server_name)]
    if cfg.notify_webhook_url:
        probes.append((cfg.notify_webhook_url, ""))
    for url, host in probes:
        req = urllib.request.Request(url, method="GET")
        parts = urllib.parse.urlsplit(url)
        assert parts.hostname and parts.port != 0
        conn = http.client.HTTPConnection(req.host)
        conn.putrequest("GET", req.selector, skip_host=bool(host))
        if host:
            conn.putheader("Host", host)


# -- the env parser and project_from_entries ---------------------------------------------------------------

@FAST
@given(env_texts)
def test_env_text_is_parsed_or_refused_with_a_config_error(text):
    try:
        entries = parse_env(text, "p.env")
    except ConfigError as exc:
        assert exc.exit_code == 2 and exc.message.startswith("p.env:")
        return
    assert all(_KEY.fullmatch(e.key) for e in entries)
    try:
        cfg = project_from_entries("p", "p.env", entries)
    except ConfigError as exc:
        assert exc.exit_code == 2 and exc.message.startswith("p.env")
        return
    _check_config(cfg)


@FAST
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_give_anything_but_a_config_error(data):
    text = data.decode("utf-8", errors="replace")
    try:
        project_from_entries("p", "p.env", parse_env(text, "p.env"))
    except ConfigError:
        pass


@FAST
@given(st.lists(st.tuples(st.one_of(reserved_keys, app_keys, st.text(max_size=8)), any_value, st.integers(-5, 10**9)),
                max_size=10))
def test_project_from_entries_raises_only_config_error(items):
    entries = [EnvEntry("IMAGE", "acme/app", 0)] + [EnvEntry(k, v, n) for k, v, n in items]
    try:
        cfg = project_from_entries("p", "p.env", entries)
    except ConfigError as exc:
        assert exc.exit_code == 2
        return
    _check_config(cfg)


@FAST
@given(st.lists(st.one_of(app_keys, st.just("NOTIFY_WEBHOOK_URL")), min_size=1, max_size=4, unique=True),
       st.lists(st.sampled_from(["", "\x00", "\r", "\n", "\x0b", "\u2028", " #", "'", '"', "=", "\ud800", "%", "x" * 40]),
                max_size=4),
       st.sampled_from(["plain", "no-equals", "bad-name", "quoted-open", "duplicate"]))
def test_no_error_message_ever_quotes_a_secret(keys, noise, shape):
    value = SECRET + "".join(noise) + SECRET
    lines = ["IMAGE=acme/app"]
    for key in keys:
        if shape == "no-equals":  # (with an '=' the text before it is the key, which messages do name)
            lines.append(f"{key}{SECRET}{value}".replace("=", ""))
        elif shape == "bad-name":
            lines.append(f"{SECRET}+{key}={value}")
        elif shape == "quoted-open":
            lines.append(f"{key}='{value}")
        elif shape == "duplicate":
            lines += [f"{key}={value}", f"{key}={value}"]
        else:
            lines.append(f"{key}={value}")
    try:
        project_from_entries("p", "p.env", parse_env("\n".join(lines) + "\n", "p.env"))
    except ConfigError as exc:
        assert SECRET[:4] not in exc.message, exc.message


# -- names and tags ----------------------------------------------------------------------------------------

names = st.one_of(st.text(max_size=70), st.from_regex(r"[A-Za-z0-9._-]{1,70}", fullmatch=True),
                  st.sampled_from(["..", "a..b", "-x", ".x", "a/b", "a b", "x\n", "sha256:" + "a" * 64]))


@FAST
@given(names)
def test_accepted_project_names_are_safe_everywhere(name):
    try:
        validate_project(name)
    except UsageError as exc:
        assert exc.exit_code == 2
        return
    assert "/" not in name and ".." not in name and not name.startswith(("-", ".")) and len(name) <= 64
    assert name.isascii() and name.isprintable() and not any(c.isspace() for c in name)


@FAST
@given(names)
def test_accepted_tags_are_safe_everywhere(tag):
    try:
        validate_tag(tag)
    except UsageError as exc:
        assert exc.exit_code == 2
        return
    assert "/" not in tag and ".." not in tag and not tag.startswith(("-", ".")) and len(tag) <= 128 + 7
    assert tag.isascii() and tag.isprintable() and not any(c.isspace() for c in tag)


# -- DOCKER_ARGS ---------------------------------------------------------------------------------------------

_LONGS = sorted(dockerargs.RUN_FLAGS)
_SHORTS = sorted(dockerargs.SHORT_FLAGS)
flag_words = st.one_of(
    st.sampled_from(_LONGS).map(lambda n: f"--{n}"),
    st.tuples(st.sampled_from(_LONGS), st.sampled_from(["host", "x", "bluegreen.tag=v", "false", "0.0.0.0:1:1", ""]))
    .map(lambda t: f"--{t[0]}={t[1]}"),
    st.lists(st.sampled_from(_SHORTS + ["Z", "="]), min_size=1, max_size=4).map(lambda cs: "-" + "".join(cs)),
    st.tuples(st.sampled_from(_SHORTS), st.sampled_from(["8080:80", "=x", "=false", "bluegreen.color=blue", "A=b"]))
    .map(lambda t: f"-{t[0]}{t[1]}"),
)
value_words = st.one_of(
    st.sampled_from(["host", "none", "container:db", "name=host", "bridge", "1g", "bluegreen.project=x",
                     "BlueGreen.tag", "team=api", "0.0.0.0:80:80", "A=secret", "--", "-", "busybox", "always"]),
    st.text(max_size=10),
)
docker_words = st.lists(st.one_of(flag_words, flag_words, value_words), max_size=8)


def _check_final_argv(words) -> None:
    cfg = project_from_entries("api", "api.env", [EnvEntry("IMAGE", "acme/api", 1)])
    cfg = type(cfg)(**{**cfg.__dict__, "docker_args": tuple(words)})
    ref = "acme/api:v1"
    argv = dk.run_argv(["docker"], cfg, colour="green", tag="v1", ref=ref, env_file="/proc/self/fd/3")
    assert argv[:2] == ["docker", "run"] and argv[-1] == ref
    options, positionals = dockerargs.parse(argv[2:])
    assert positionals == [ref], "the image is the first and only word after the options"
    values = {}
    for opt in options:
        values.setdefault(opt.name, []).append(opt.value)
    assert values["name"] == ["api-green"]
    assert values["publish"] == [f"127.0.0.1:{cfg.green_port}:{cfg.app_port}"]
    assert values["restart"] == ["unless-stopped"]
    assert "publish-all" not in values and "rm" not in values and "attach" not in values
    assert values["env-file"] == ["/proc/self/fd/3"] and "env" not in values
    own = sorted(v for v in values["label"] if v.lower().startswith("bluegreen."))
    assert own == ["bluegreen.color=green", "bluegreen.project=api", "bluegreen.tag=v1"]


@settings(max_examples=800, deadline=None)
@given(docker_words)
def test_docker_args_are_refused_or_cannot_override_bluegreen(words):
    problem = dockerargs.problem(words)
    if problem is not None:
        assert isinstance(problem, str) and problem
        return
    options, positionals = dockerargs.parse(words)
    assert positionals == []
    for opt in options:
        assert opt.name not in dockerargs.REFUSED
        assert not (opt.name == "label" and opt.value and opt.value.split("=")[0].strip().lower().startswith("bluegreen."))
        assert not (opt.name in ("network", "net") and opt.value and opt.value.strip().lower() in ("host", "none"))
    _check_final_argv(words)


@FAST
@given(docker_words)
def test_docker_args_through_the_env_file(words):
    line = shlex.join(words)
    try:
        cfg = project_from_entries("api", "api.env", parse_env(f"IMAGE=acme/api\nDOCKER_ARGS={line}\n", "api.env"))
    except ConfigError as exc:
        assert exc.message.startswith("api.env")
        return
    # The unquoted-value rules (` #` comment, trailing blanks) may shorten the line: what is kept is checked.
    assert dockerargs.problem(cfg.docker_args) is None
    _check_final_argv(cfg.docker_args)


# -- the CLI: deploy --dry-run against a root with generated env files -------------------------------------

def _snapshot(root: str) -> dict:
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st_ = os.lstat(path)
            data = open(path, "rb").read() if os.path.isfile(path) and not os.path.islink(path) else None
            found[os.path.relpath(path, root)] = (st_.st_mode, data)
    return found


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(env_texts, st.sampled_from(["user-api", "a", "x..y", "-x", "svc.v2"]), st.sampled_from(["v1", "latest", "--x", "a/b", "sha256:" + "0" * 64]))
def test_deploy_dry_run_exits_0_or_2_and_changes_nothing(text, name, tag):
    root = tempfile.mkdtemp(prefix="bg-prop-")
    try:
        os.makedirs(os.path.join(root, "projects"))
        os.makedirs(os.path.join(root, "nginx", "conf.d"))
        if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) and ".." not in name:
            with open(os.path.join(root, "projects", f"{name}.env"), "w", encoding="utf-8", errors="surrogatepass") as fh:
                fh.write(text)
        before = _snapshot(root)
        out, err = io.StringIO(), io.StringIO()
        code = main(["deploy", name, tag, "--dry-run"], environ={"BLUEGREEN_ROOT": root, "PATH": os.environ.get("PATH", "")},
                    stdout=out, stderr=err)
        assert code in (0, 2), err.getvalue()
        assert "internal error" not in err.getvalue() and "Traceback" not in err.getvalue()
        assert _snapshot(root) == before
    finally:
        shutil.rmtree(root, ignore_errors=True)
