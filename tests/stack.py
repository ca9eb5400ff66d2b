"""Real-stack helpers for the bluegreen test-suite and the demo.

Plain stdlib Python (3.9+), no pytest imports: this module is used both by
``tests/conftest.py`` and by the ``make demo`` script.

Everything here talks to 127.0.0.1 only and never pulls from Docker Hub:

* ``ensure_dockerd``   -- make sure a docker daemon answers ``docker info``.
* ``Registry``         -- two ``docker-registry`` processes sharing one storage
                          directory: an open one and one behind htpasswd auth.
* ``build_app_image``  -- a tiny FROM-scratch busybox "app" image whose
                          behaviour (ok / unhealthy / crash) is chosen at build
                          time.
* ``Nginx``            -- a private nginx instance (own prefix, pid file,
                          logs, temp dirs) that includes the product's
                          upstream files.
* ``http_get``, ``free_port``, ``wait_port``, ``cleanup_project``, ``docker``.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = [
    "APP_BEHAVIOURS",
    "FATAL_LINE",
    "Nginx",
    "Registry",
    "build_app_image",
    "cleanup_project",
    "docker",
    "ensure_dockerd",
    "free_port",
    "http_get",
    "push_image",
    "tail",
    "wait_port",
]

BUSYBOX = "/bin/busybox"
DOCKERD_LOG = "/tmp/bluegreen-test-dockerd.log"
APP_BEHAVIOURS = ("ok", "unhealthy", "crash", "graceful", "failing")
FATAL_LINE = "FATAL: cannot connect to database db:5432"


# --------------------------------------------------------------------------
# small utilities
# --------------------------------------------------------------------------

def tail(path: str, lines: int = 40) -> str:
    """Last ``lines`` lines of a text file ('' if it does not exist)."""
    try:
        with open(path, "r", errors="replace") as fh:
            return "".join(fh.readlines()[-lines:])
    except OSError:
        return ""


def docker(*args: str, env: Optional[Dict[str, str]] = None, check: bool = True,
           timeout: float = 300, input: Optional[str] = None
           ) -> subprocess.CompletedProcess:
    """Run ``docker ARGS`` with captured text output.

    ``env`` entries are added to (not replacing) the current environment.
    With ``check`` a non-zero exit raises RuntimeError carrying the output.
    """
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    proc = subprocess.run(["docker", *args], env=full_env, input=input,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(
            "docker %s failed (exit %d)\nstdout:\n%s\nstderr:\n%s"
            % (shlex.join(args), proc.returncode, proc.stdout, proc.stderr))
    return proc


def _docker_info_ok() -> bool:
    try:
        proc = subprocess.run(["docker", "info"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def ensure_dockerd(timeout: float = 60) -> None:
    """Make sure ``docker info`` works, starting ``dockerd`` if it does not.

    The daemon is started detached (own session, output appended to
    DOCKERD_LOG) and is left running afterwards. Raises RuntimeError with
    the log tail when it does not come up within ``timeout`` seconds.
    """
    if _docker_info_ok():
        return
    host = os.environ.get("DOCKER_HOST", "")
    if host and host not in ("unix:///var/run/docker.sock",
                             "unix:///run/docker.sock"):
        raise RuntimeError("`docker info` fails for DOCKER_HOST=%s; not starting "
                           "a local dockerd for a non-default daemon" % host)
    if shutil.which("dockerd") is None:
        raise RuntimeError("`docker info` fails and there is no dockerd binary")
    with open(DOCKERD_LOG, "ab") as log:
        subprocess.Popen(["dockerd"], stdin=subprocess.DEVNULL, stdout=log,
                         stderr=subprocess.STDOUT, start_new_session=True,
                         close_fds=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _docker_info_ok():
            return
        time.sleep(0.5)
    raise RuntimeError("dockerd did not become ready within %ss; tail of %s:\n%s"
                       % (timeout, DOCKERD_LOG, tail(DOCKERD_LOG)))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_low_port(low: int = 20000, high: int = 32000) -> int:
    """A free port below the kernel's default ephemeral range (32768-60999), as `init` advises for BLUE/GREEN_PORT,
    so that no outgoing connection can hold it."""
    import random

    for port in random.sample(range(low, high), 200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()


def wait_port(port: int, timeout: float = 10, host: str = "127.0.0.1") -> None:
    """Wait until something accepts TCP connections on host:port.

    Raises TimeoutError after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise TimeoutError("nothing listening on %s:%s after %ss (%s)"
                                   % (host, port, timeout, err)) from None
        time.sleep(0.05)


# never use a proxy from the environment: everything is on 127.0.0.1
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, timeout: float = 5,
             headers: Optional[Dict[str, str]] = None) -> Tuple[int, str]:
    """GET ``url`` -> (status, body_text).

    HTTP error statuses are returned, not raised. Connection-level errors
    (refused, reset, timeout, ...) give ``(0, str(err))``.
    """
    req = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as err:
        try:
            body = err.read().decode("utf-8", "replace")
        except Exception:  # body may be unreadable after a reset
            body = ""
        return err.code, body
    except Exception as err:  # URLError, socket.timeout, RemoteDisconnected...
        return 0, str(err)


def cleanup_project(project: str) -> None:
    """``docker rm -f`` every container of ``project``.

    That is every container labelled ``bluegreen.project=PROJECT`` plus the
    containers named PROJECT-blue / PROJECT-green. Missing containers are
    not an error.
    """
    proc = docker("ps", "-aq", "--filter", "label=bluegreen.project=%s" % project,
                  check=False, timeout=60)
    ids = proc.stdout.split()
    for name in ("%s-blue" % project, "%s-green" % project):
        probe = docker("container", "inspect", "--format", "{{.Id}}", name,
                       check=False, timeout=60)
        if probe.returncode == 0:
            ids.append(probe.stdout.strip())
    ids = sorted(set(i for i in ids if i))
    if ids:
        docker("rm", "-f", *ids, check=False, timeout=120)


# --------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------

class Registry:
    """Two local docker registries sharing one storage directory.

    * ``open_addr``  -- no authentication;
    * ``auth_addr``  -- htpasswd auth, user ``self.user`` / ``self.password``.

    Both are "127.0.0.1:PORT" strings; docker treats 127.0.0.0/8 as an
    insecure registry so nothing needs configuring. Because storage is
    shared, a repository pushed to one address is visible on the other.
    """

    def __init__(self, workdir: str, user: str = "ci"):
        self.workdir = os.path.abspath(workdir)
        self.user = user
        self.password = secrets.token_hex(12)
        self.storage = os.path.join(self.workdir, "storage")
        self.open_port = 0
        self.auth_port = 0
        self._procs: List[subprocess.Popen] = []
        self._configs = 0

    @property
    def open_addr(self) -> str:
        return "127.0.0.1:%d" % self.open_port

    @property
    def auth_addr(self) -> str:
        return "127.0.0.1:%d" % self.auth_port

    def _write_config(self, name: str, port: int, htpasswd: Optional[str]) -> str:
        lines = [
            "version: 0.1",
            "log:",
            "  level: warn",
            "storage:",
            "  filesystem:",
            "    rootdirectory: %s" % json.dumps(self.storage),
            "  delete:",
            "    enabled: true",
            "http:",
            "  addr: \"127.0.0.1:%d\"" % port,
        ]
        if htpasswd:
            lines += [
                "auth:",
                "  htpasswd:",
                "    realm: bg",
                "    path: %s" % json.dumps(htpasswd),
            ]
        path = os.path.join(self.workdir, "%s.yml" % name)
        with open(path, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        return path

    def _spawn(self, name: str, config: str) -> subprocess.Popen:
        log = open(os.path.join(self.workdir, "%s.log" % name), "ab")
        try:
            proc = subprocess.Popen(["docker-registry", "serve", config],
                                    stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT,
                                    start_new_session=True)
        finally:
            log.close()
        self._procs.append(proc)
        return proc

    def start(self, timeout: float = 15) -> "Registry":
        os.makedirs(self.storage, exist_ok=True)
        htpasswd = os.path.join(self.workdir, "htpasswd")
        out = subprocess.run(["htpasswd", "-Bbn", self.user, self.password],
                             check=True, stdout=subprocess.PIPE, text=True).stdout
        with open(htpasswd, "w") as fh:
            fh.write(out.strip() + "\n")
        self.open_port = free_port()
        self.auth_port = free_port()
        while self.auth_port == self.open_port:
            self.auth_port = free_port()
        self._spawn("registry-open",
                    self._write_config("registry-open", self.open_port, None))
        self._spawn("registry-auth",
                    self._write_config("registry-auth", self.auth_port, htpasswd))
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        try:
            for name, port, want in (("registry-open", self.open_port, 200),
                                     ("registry-auth", self.auth_port, 401)):
                deadline = time.monotonic() + timeout
                while True:
                    status, _ = http_get("http://127.0.0.1:%d/v2/" % port, timeout=2)
                    if status == want:
                        break
                    dead = [p for p in self._procs if p.poll() is not None]
                    if dead or time.monotonic() > deadline:
                        raise RuntimeError(
                            "%s on port %d not ready (last status %s); log:\n%s"
                            % (name, port, status,
                               tail(os.path.join(self.workdir, name + ".log"))))
                    time.sleep(0.05)
        except Exception:
            self.stop()
            raise

    @property
    def running(self) -> bool:
        return bool(self._procs) and all(p.poll() is None for p in self._procs)

    def restart(self, timeout: float = 15) -> "Registry":
        """Start both registries again after stop(), on the same ports, storage and credentials, so that the
        session's image references keep working (a test's registry outage ends here)."""
        if self.running:
            return self
        self.stop()  # whatever is left of them
        self._spawn("registry-open", os.path.join(self.workdir, "registry-open.yml"))
        self._spawn("registry-auth", os.path.join(self.workdir, "registry-auth.yml"))
        self._wait_ready(timeout)
        return self

    def docker_config_with(self, password: str, user: Optional[str] = None) -> str:
        """Write a DOCKER_CONFIG directory holding credentials for auth_addr.

        Returns the directory (use as ``DOCKER_CONFIG=dir``). Pass
        ``self.password`` for a working login, anything else for a wrong one.
        """
        self._configs += 1
        path = os.path.join(self.workdir, "docker-config-%d" % self._configs)
        os.makedirs(path, exist_ok=True)
        token = base64.b64encode(("%s:%s" % (user or self.user, password))
                                 .encode()).decode()
        with open(os.path.join(path, "config.json"), "w") as fh:
            json.dump({"auths": {self.auth_addr: {"auth": token}}}, fh, indent=2)
        return path

    def stop(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self._procs = []


# --------------------------------------------------------------------------
# test application image
# --------------------------------------------------------------------------

# No LABELs on purpose: image labels are inherited by containers, and the
# product's containers must carry exactly its own bluegreen.* labels.
_DOCKERFILE = """\
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
COPY www /www
COPY start.sh front.sh /
ENV BOOT_DELAY={boot_delay}
EXPOSE 8080
ENTRYPOINT ["/start.sh"]
"""

# PID 1 of the container.
#
# busybox httpd does not install a SIGTERM handler, and PID 1 of a pid
# namespace ignores every signal it has no handler for, so `exec httpd` as
# PID 1 would make `docker stop` wait for its full timeout and then SIGKILL.
# Instead sh stays PID 1 with a TERM/INT trap, runs the server (and the boot
# sleep) in the background and `wait`s: a trapped signal interrupts `wait`
# immediately, the trap kills the child and exits 143. When PID 1 exits the
# kernel kills whatever is left in the container (e.g. running CGIs).
_START_SH = """\
#!/bin/sh
# test app {version} ({behaviour}); BOOT_DELAY comes from ENV / docker run -e
child=
on_term() {{
    if [ -n "$child" ]; then kill -TERM "$child" 2>/dev/null; fi
    exit 143
}}
trap on_term TERM INT
sleep "${{BOOT_DELAY:-0}}" & child=$!
wait "$child"
echo "app {version} starting"
{body}
wait "$child"
"""

_GRACEFUL_BODY = """\
httpd -f -p 8080 -h /www & child=$!
in_flight() {
    for stat in /proc/[0-9]*/stat; do
        line=
        read -r line < "$stat" 2>/dev/null || continue
        set -- ${line##*") "}
        if [ "$1" != Z ] && [ "$2" = "$child" ]; then return 0; fi
    done
    return 1
}
on_term() {
    tries=$(( ${GRACE_SECONDS:-5} * 20 ))
    while [ "$tries" -gt 0 ] && in_flight; do sleep 0.05; tries=$((tries - 1)); done
    kill -TERM "$child" 2>/dev/null
    exit 143
}"""

_START_BODY = {
    "ok": 'httpd -f -p 8080 -h /www & child=$!',
    # busybox httpd (this build: no proxy, no aliases) can only produce a
    # CGI-driven status under /cgi-bin/, and a bare /api/health URL can never
    # reach a CGI. So the unhealthy app puts a tiny nc front on port 8080:
    # it answers /api/health itself with a real 500 and hands every other
    # request to `httpd -i` (inetd mode, same /www, same CGIs).
    "unhealthy": 'nc -ll -p 8080 -e /front.sh & child=$!',
    "crash": 'echo "%s" >&2\nexit 3' % FATAL_LINE,
    # Like "ok", but SIGTERM is graceful: the server keeps answering until no
    # request is in flight (no child of the httpd master: busybox httpd forks
    # one per connection, and a CGI runs under it), at most GRACE_SECONDS
    # (default 5), then httpd is stopped. Redefining on_term here replaces the
    # trap's handler once the app has booted.
    "graceful": _GRACEFUL_BODY,
    # Healthy (its health check answers 200), but every FAIL_EVERY-th other request (default: every one)
    # answers 500: the release that passes its health check and fails real traffic (front.sh).
    "failing": 'mkdir -p /tmp\nexport FAIL_EVERY="${FAIL_EVERY:-1}"\nnc -ll -p 8080 -e /front.sh & child=$!',
}

# Used only by the "unhealthy" behaviour (copied into every image so the
# Dockerfile is the same). Reads the request head up to the blank line (the
# app is GET-only, no bodies), answers /api/health with 500, and replays the
# head into `httpd -i` for everything else.
_FRONT_SH = """\
#!/bin/sh
set -f
cr=$(printf '\\r')
IFS= read -r line || exit 0
head="$line"
while IFS= read -r h; do
    head="$head
$h"
    case "$h" in ""|"$cr") break ;; esac
done
set -- $line
if [ -n "$FAIL_EVERY" ]; then
    # "failing": the health check passes; every FAIL_EVERY-th other request answers 500.
    case "$2" in
    /api/health|/api/health\\?*|/api/health/) ;;
    *)
        # Written to a temporary file and renamed: a concurrent request never reads a truncated count.
        n=$(cat /tmp/count 2>/dev/null); n=$(( ${{n:-0}} + 1 )); echo "$n" > /tmp/count.$$ && mv /tmp/count.$$ /tmp/count
        if [ $(( n % FAIL_EVERY )) -eq 0 ]; then
            printf 'HTTP/1.0 500 Internal Server Error\\r\\nContent-Type: text/plain\\r\\nConnection: close\\r\\n\\r\\nfailing {version}'
            exit 0
        fi ;;
    esac
else
    case "$2" in
    /api/health|/api/health\\?*|/api/health/)
        printf 'HTTP/1.0 500 Internal Server Error\\r\\nContent-Type: text/plain\\r\\nConnection: close\\r\\n\\r\\nunhealthy {version}'
        exit 0 ;;
    esac
fi
printf '%s\\n' "$head" | httpd -i -h /www
"""

_CGI_SLOW = """\
#!/bin/sh
# /cgi-bin/slow?SECONDS -> sleeps, then 200 "slow VERSION"
s="${{QUERY_STRING:-1}}"
case "$s" in ''|*[!0-9.]*) s=1 ;; esac
sleep "$s"
printf 'Content-Type: text/plain\\n\\n'
printf 'slow %s' '{version}'
"""

_CGI_ENV = """\
#!/bin/sh
# /cgi-bin/env?NAME -> 200 with the value of env var NAME (empty if unset)
name="$QUERY_STRING"
case "$name" in ''|[!A-Za-z_]*|*[!A-Za-z0-9_]*) name=_INVALID_NAME_ ;; esac
eval "value=\\"\\${{$name-}}\\""
printf 'Content-Type: text/plain\\n\\n'
printf '%s' "$value"
"""

_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _write(path: str, text: str, mode: int = 0o644) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="\n") as fh:
        fh.write(text)
    os.chmod(path, mode)


def push_image(ref: str, docker_config: Optional[str] = None) -> None:
    """``docker push ref`` (optionally with DOCKER_CONFIG=docker_config)."""
    env = {"DOCKER_CONFIG": docker_config} if docker_config else None
    docker("push", ref, env=env)


def build_app_image(ref: str, version: str, behaviour: str = "ok",
                    boot_delay: float = 0, push: bool = True,
                    docker_config: Optional[str] = None) -> str:
    """Build the busybox test app as ``ref`` (and push it when ``push``).

    The container listens on 8080. ``/start.sh`` (the entrypoint) sleeps
    ``$BOOT_DELAY`` (image default ``boot_delay``; ``docker run -e`` wins),
    prints ``app VERSION starting`` and then, by ``behaviour``:

    * ``ok``        -- ``GET /api/health`` -> 200 ``ok VERSION``,
                       ``GET /version`` -> 200 ``VERSION`` (static files);
    * ``unhealthy`` -- the same, except ``/api/health`` -> 500 forever;
    * ``crash``     -- prints FATAL_LINE to stderr and exits 3;
    * ``failing``   -- ``/api/health`` -> 200, but every ``$FAIL_EVERY``-th
                       other request (default 1: all) -> 500;
    * ``graceful``  -- like ``ok``, but on SIGTERM it keeps serving until no
                       request is in flight (at most ``$GRACE_SECONDS``,
                       default 5), then stops (``ok`` stops at once and cuts
                       in-flight requests).

    All of them also serve ``/cgi-bin/slow?SECONDS`` (sleep, then 200
    ``slow VERSION``) and ``/cgi-bin/env?NAME`` (200, value of env var NAME).
    Bodies carry no trailing newline. SIGTERM stops the container promptly
    (``graceful``: once the requests in flight are answered).
    Returns ``ref``.
    """
    if behaviour not in APP_BEHAVIOURS:
        raise ValueError("behaviour must be one of %s" % (APP_BEHAVIOURS,))
    if not _VERSION_RE.match(version):
        raise ValueError("bad version string %r" % version)
    if float(boot_delay) < 0:
        raise ValueError("boot_delay must be >= 0")
    delay = ("%g" % float(boot_delay))
    ctx = tempfile.mkdtemp(prefix="bg-app-image-")
    try:
        shutil.copy2(BUSYBOX, os.path.join(ctx, "busybox"))
        os.chmod(os.path.join(ctx, "busybox"), 0o755)
        www = os.path.join(ctx, "www")
        _write(os.path.join(www, "index.html"), "app %s" % version)
        _write(os.path.join(www, "version"), version)
        _write(os.path.join(www, "api", "health"), "ok %s" % version)
        _write(os.path.join(www, "cgi-bin", "slow"),
               _CGI_SLOW.format(version=version), 0o755)
        _write(os.path.join(www, "cgi-bin", "env"),
               _CGI_ENV.format(version=version), 0o755)
        _write(os.path.join(ctx, "start.sh"),
               _START_SH.format(version=version, behaviour=behaviour,
                                body=_START_BODY[behaviour]), 0o755)
        _write(os.path.join(ctx, "front.sh"),
               _FRONT_SH.format(version=version), 0o755)
        _write(os.path.join(ctx, "Dockerfile"),
               _DOCKERFILE.format(boot_delay=delay))
        # legacy builder: works offline with FROM scratch (no frontend pull)
        docker("build", "-q", "-t", ref, ctx, env={"DOCKER_BUILDKIT": "0"})
    finally:
        shutil.rmtree(ctx, ignore_errors=True)
    if push:
        push_image(ref, docker_config)
    return ref


# --------------------------------------------------------------------------
# nginx
# --------------------------------------------------------------------------

def _proc_ppid(pid: int) -> Optional[int]:
    try:
        with open("/proc/%d/stat" % pid, "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    # "pid (comm) state ppid ..." -- comm may contain spaces, parens and bytes that are not UTF-8
    fields = stat.rsplit(b")", 1)[1].split()
    return int(fields[1])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not alive for our purposes
    try:
        with open("/proc/%d/stat" % pid) as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _worker_shutting_down(pid: int) -> bool:
    """True if nginx worker ``pid`` is gone or in graceful shutdown."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as fh:
            title = fh.read()
    except OSError:
        return True
    return b"shutting down" in title or not _pid_alive(pid)


class Nginx:
    """A private nginx: own prefix, config, pid file, logs and temp dirs.

    The generated ``nginx.conf`` includes every glob of ``includes`` (e.g.
    the product's ``ROOT/nginx/conf.d/*.conf``) and ``WORKDIR/sites/*.conf``
    inside ``http {}``. The master runs as root (nginx daemonizes itself);
    without a ``user`` directive workers run as ``nobody``, so the workdir
    is made world-traversable and proxy buffering never spills to temp files.

    ``cmd`` is the command prefix the product should use as BLUEGREEN_NGINX
    (callers append ``-t``, ``-s reload``, ``-T``).

    ORDER MATTERS: ``nginx -t``/reload fails when a server block proxies to
    an upstream name that no included file defines. Write the upstream file
    (``upstream NAME { server 127.0.0.1:PORT; }``, normally done by the
    product's first deploy) BEFORE calling ``add_server(..., upstream=NAME)``.
    """

    def __init__(self, workdir: str, includes: Optional[Sequence[str]] = None):
        self.workdir = os.path.abspath(workdir)
        self.includes = list(includes or [])
        self.conf = os.path.join(self.workdir, "nginx.conf")
        self.pid_file = os.path.join(self.workdir, "nginx.pid")
        self.error_log = os.path.join(self.workdir, "error.log")
        self.access_log = os.path.join(self.workdir, "access.log")
        self.sites_dir = os.path.join(self.workdir, "sites")

    @property
    def cmd(self) -> List[str]:
        return ["nginx", "-p", self.workdir, "-c", self.conf,
                "-e", self.error_log]

    def write_config(self) -> None:
        os.makedirs(self.sites_dir, exist_ok=True)
        os.chmod(self.workdir, 0o755)
        temp = os.path.join(self.workdir, "temp")
        os.makedirs(temp, exist_ok=True)
        os.chmod(temp, 0o777)

        def q(path: str) -> str:
            return '"%s"' % path.replace("\\", "\\\\").replace('"', '\\"')

        lines = [
            "# generated by tests/stack.py",
            "pid %s;" % q(self.pid_file),
            "error_log %s;" % q(self.error_log),
            "worker_processes 2;",
            "events { worker_connections 1024; }",
            "http {",
            "    access_log %s;" % q(self.access_log),
            "    client_body_temp_path %s;" % q(os.path.join(temp, "client_body")),
            "    proxy_temp_path %s;" % q(os.path.join(temp, "proxy")),
            "    fastcgi_temp_path %s;" % q(os.path.join(temp, "fastcgi")),
            "    uwsgi_temp_path %s;" % q(os.path.join(temp, "uwsgi")),
            "    scgi_temp_path %s;" % q(os.path.join(temp, "scgi")),
            "    proxy_max_temp_file_size 0;",
        ]
        for pattern in self.includes:
            lines.append("    include %s;" % q(pattern))
        lines.append("    include %s;" % q(os.path.join(self.sites_dir, "*.conf")))
        lines.append("}")
        with open(self.conf, "w") as fh:
            fh.write("\n".join(lines) + "\n")

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(self.cmd + list(args), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=30)
        if check and proc.returncode != 0:
            raise RuntimeError("%s failed (exit %d):\n%s\nerror.log tail:\n%s"
                               % (shlex.join(self.cmd + list(args)),
                                  proc.returncode, proc.stdout,
                                  tail(self.error_log, 15)))
        return proc

    def test_config(self) -> None:
        """``nginx -t``; RuntimeError with nginx's output when it fails."""
        self._run("-t")

    def master_pid(self) -> Optional[int]:
        """PID of the running master (from the pid file), or None."""
        try:
            with open(self.pid_file) as fh:
                pid = int(fh.read().strip())
        except (OSError, ValueError):
            return None
        return pid if _pid_alive(pid) else None

    def worker_pids(self) -> List[int]:
        master = self.master_pid()
        if master is None:
            return []
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                pid = int(entry)
                if _proc_ppid(pid) == master and _pid_alive(pid):
                    pids.append(pid)
        return sorted(pids)

    def start(self, timeout: float = 10, keep_config: bool = False) -> "Nginx":
        """Start the master; ``keep_config`` starts it with nginx.conf as it is now (e.g. as `setup` left it)."""
        if self.master_pid() is not None:
            raise RuntimeError("nginx in %s is already running" % self.workdir)
        if not keep_config:
            self.write_config()
        self.test_config()
        self._run()  # daemonizes; returns once the master is forked
        deadline = time.monotonic() + timeout
        while not (self.master_pid() and self.worker_pids()):
            if time.monotonic() > deadline:
                raise RuntimeError("nginx did not start; error.log:\n%s"
                                   % tail(self.error_log))
            time.sleep(0.05)
        return self

    def reload(self, timeout: float = 10) -> None:
        """Validate (``-t``), ``-s reload`` and wait until it took effect.

        "Took effect" = the master forked workers that were not there before
        AND every old worker has exited or is gracefully "shutting down"
        (nginx signals old workers ~100 ms after starting the new ones; a
        shutting-down worker has closed its listening sockets but may still
        be draining in-flight requests, which is fine). Typically ~0.1 s.
        """
        master = self.master_pid()
        if master is None:
            raise RuntimeError("nginx in %s is not running" % self.workdir)
        self.test_config()
        before = set(self.worker_pids())
        self._run("-s", "reload")
        deadline = time.monotonic() + timeout
        while True:
            now = set(self.worker_pids())
            if now - before and not [p for p in before & now
                                     if not _worker_shutting_down(p)]:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("nginx reload did not take effect in %ss; "
                                   "error.log:\n%s" % (timeout, tail(self.error_log)))
            time.sleep(0.02)

    def stop(self, timeout: float = 10) -> None:
        """Graceful ``-s quit``; SIGKILL master and workers if it hangs."""
        master = self.master_pid()
        if master is None:
            return
        workers = self.worker_pids()
        self._run("-s", "quit", check=False)
        deadline = time.monotonic() + timeout
        while _pid_alive(master) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in [master] + workers:
            if _pid_alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def site_path(self, name: str) -> str:
        return os.path.join(self.sites_dir, "%s.conf" % name)

    def add_server(self, name: str, listen_port: int, upstream: str,
                   extra: str = "", reload: bool = True, head: str = "") -> str:
        """Write ``sites/NAME.conf`` proxying 127.0.0.1:listen_port to
        ``http://UPSTREAM`` and reload. ``extra`` is pasted into the server
        block, ``head`` before it (http-level lines such as a log_format).
        The upstream must already be defined (see class docstring);
        if the reload fails the file is removed again and the error raised.
        Returns the path of the file.
        """
        path = self.site_path(name)
        text = (("%s\n" % head if head else "") + "server {\n"
                "    listen 127.0.0.1:%d;\n"
                "%s"
                "    location / {\n"
                "        proxy_pass http://%s;\n"
                "        proxy_set_header Host $host;\n"
                "    }\n"
                "}\n") % (listen_port, ("    %s\n" % extra) if extra else "",
                          upstream)
        with open(path, "w") as fh:
            fh.write(text)
        if reload:
            try:
                self.reload()
            except Exception:
                os.unlink(path)
                raise
        return path

    def remove_server(self, name: str, reload: bool = True) -> None:
        """Delete ``sites/NAME.conf`` (if present) and reload."""
        try:
            os.unlink(self.site_path(name))
        except FileNotFoundError:
            pass
        if reload and self.master_pid() is not None:
            self.reload()
