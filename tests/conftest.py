"""pytest fixtures for real-stack tests (docker + local registries + nginx).

* ``stack``   (session) -- registries, private nginx, BLUEGREEN_ROOT, the
                           built ``bluegreen.pyz`` and the pushed test images.
* ``project`` (function) -- a fresh project name with free ports, env-file
                           writer and helpers to run the pyz / query nginx;
                           everything it created is removed afterwards.

Tests that use ``stack``/``project`` get the ``stack`` marker automatically
(so ``-m "not stack"`` deselects them). They are never skipped: when docker,
the registry or nginx cannot be brought up they FAIL with the reason, so a
CI run cannot pass silently.

Environment knobs (debugging only):
  BLUEGREEN_TEST_PYZ=PATH   use this prebuilt pyz instead of running build.py
  BLUEGREEN_TEST_KEEP=1     keep the session work dir (logs, configs) at exit
"""

from __future__ import annotations

import glob
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)

import stack as stacklib  # noqa: E402  (tests/stack.py, shared with `make demo`)

REQUIRED_TOOLS = ("docker", "docker-registry", "nginx", "htpasswd")
IMAGE_SPECS = (
    # tag, behaviour, boot_delay   (version == tag)
    ("v1", "ok", 0),
    ("v2", "ok", 0),
    ("v3", "ok", 0),
    ("slow", "ok", 3),
    ("unhealthy", "unhealthy", 0),
    ("crash", "crash", 1),
    ("failing", "failing", 0),
)


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "stack: real-stack test (dockerd, local registries, private nginx); "
        "fails, never skips, when the stack cannot be started")


def pytest_collection_modifyitems(config, items):
    for item in items:
        names = getattr(item, "fixturenames", ())
        if ("stack" in names or "project" in names) and \
                item.get_closest_marker("stack") is None:
            item.add_marker(pytest.mark.stack)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    timings = getattr(config, "_bluegreen_stack_timings", None)
    if timings:
        terminalreporter.write_line(
            "bluegreen stack setup: " + ", ".join(
                "%s %.2fs" % (k, v) for k, v in timings.items()))


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "_bg_rep_" + rep.when, rep)


# --------------------------------------------------------------------------
# session stack
# --------------------------------------------------------------------------

class Stack:
    """What the ``stack`` fixture returns.

    registry   stacklib.Registry (open_addr, auth_addr, user, password,
               docker_config_with(password))
    nginx      stacklib.Nginx    (cmd, reload(), add_server(), ...)
    root       BLUEGREEN_ROOT (has projects/ and nginx/conf.d/)
    pyz        path of the bluegreen.pyz built for this session
    images     {"v1","v2","v3","slow","unhealthy","crash": OPEN/bg/app:TAG,
                "auth_v1": AUTH/bg/app:v1}
    image_repo / auth_image_repo   OPEN/bg/app, AUTH/bg/app
    workdir    session scratch dir (registry, nginx, docker configs)
    timings    {"step": seconds} of the session setup
    """

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.root = os.path.join(workdir, "root")
        self.projects_dir = os.path.join(self.root, "projects")
        self.conf_d = os.path.join(self.root, "nginx", "conf.d")
        self.registry: Optional[stacklib.Registry] = None
        self.nginx: Optional[stacklib.Nginx] = None
        self.pyz = ""
        self.images: Dict[str, str] = {}
        self.image_repo = ""
        self.auth_image_repo = ""
        self.timings: Dict[str, float] = {}

    @property
    def nginx_cmd(self) -> str:
        """The BLUEGREEN_NGINX value (shell-quoted nginx command prefix)."""
        return shlex.join(self.nginx.cmd)

    def base_env(self) -> Dict[str, str]:
        """os.environ + BLUEGREEN_ROOT + BLUEGREEN_NGINX."""
        env = dict(os.environ)
        env["BLUEGREEN_ROOT"] = self.root
        env["BLUEGREEN_NGINX"] = self.nginx_cmd
        return env

    def docker_config(self, good: bool = True) -> str:
        """A DOCKER_CONFIG dir with right (or wrong) creds for the auth registry."""
        reg = self.registry
        return reg.docker_config_with(reg.password if good else
                                      "wrong-" + reg.password)


def _start_pyz_build(out_dir: str):
    prebuilt = os.environ.get("BLUEGREEN_TEST_PYZ")
    if prebuilt:
        if not os.path.isfile(prebuilt):
            pytest.fail("BLUEGREEN_TEST_PYZ=%s does not exist" % prebuilt,
                        pytrace=False)
        return os.path.abspath(prebuilt), None
    build_py = os.path.join(REPO_ROOT, "build.py")
    if not os.path.isfile(build_py):
        pytest.fail("cannot build the pyz: %s is missing" % build_py, pytrace=False)
    pyz = os.path.join(out_dir, "bluegreen.pyz")
    proc = subprocess.Popen([sys.executable, build_py, "--output", pyz],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    return pyz, proc


def _finish_pyz_build(pyz: str, proc) -> None:
    if proc is not None:
        try:
            out, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            pytest.fail("build.py timed out:\n%s" % out, pytrace=False)
        if proc.returncode != 0:
            pytest.fail("`%s build.py --output %s` failed (exit %d):\n%s"
                        % (sys.executable, pyz, proc.returncode, out),
                        pytrace=False)
    if not os.path.isfile(pyz):
        pytest.fail("build.py succeeded but %s does not exist" % pyz,
                    pytrace=False)


@pytest.fixture(scope="session")
def stack(request):
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if not os.path.exists(stacklib.BUSYBOX):
        missing.append(stacklib.BUSYBOX)
    if missing:
        pytest.fail("real-stack tests need: %s (missing)" % ", ".join(missing),
                    pytrace=False)

    t_all = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="bg-stack-")
    os.chmod(workdir, 0o755)  # nginx workers run as nobody
    st = Stack(workdir)
    os.makedirs(st.projects_dir)
    os.makedirs(st.conf_d)
    build_proc = None
    try:
        t = time.monotonic()
        try:
            stacklib.ensure_dockerd()
        except Exception as err:
            pytest.fail("real-stack tests need a working docker daemon, and "
                        "none could be started: %s" % err, pytrace=False)
        st.timings["dockerd"] = time.monotonic() - t

        # the pyz builds in the background while we set up the rest
        st.pyz, build_proc = _start_pyz_build(workdir)

        t = time.monotonic()
        os.makedirs(os.path.join(workdir, "registry"))
        st.registry = stacklib.Registry(os.path.join(workdir, "registry"))
        st.registry.start()
        os.makedirs(os.path.join(workdir, "nginx"))
        st.nginx = stacklib.Nginx(os.path.join(workdir, "nginx"),
                                  includes=[os.path.join(st.conf_d, "*.conf")])
        st.nginx.start()
        st.timings["registry+nginx"] = time.monotonic() - t

        t = time.monotonic()
        st.image_repo = st.registry.open_addr + "/bg/app"
        st.auth_image_repo = st.registry.auth_addr + "/bg/app"
        for tag, behaviour, delay in IMAGE_SPECS:
            st.images[tag] = stacklib.build_app_image(
                "%s:%s" % (st.image_repo, tag), tag, behaviour, boot_delay=delay)
        auth_ref = st.auth_image_repo + ":v1"
        stacklib.docker("tag", st.images["v1"], auth_ref)
        stacklib.push_image(auth_ref, st.docker_config(good=True))
        st.images["auth_v1"] = auth_ref
        st.timings["images"] = time.monotonic() - t

        t = time.monotonic()
        _finish_pyz_build(st.pyz, build_proc)
        build_proc = None
        st.timings["pyz(wait)"] = time.monotonic() - t
        st.timings["total"] = time.monotonic() - t_all
        request.config._bluegreen_stack_timings = st.timings
    except BaseException as err:
        if build_proc is not None and build_proc.poll() is None:
            build_proc.kill()
            build_proc.wait()
        _stop_stack(st)
        if isinstance(err, (pytest.fail.Exception, KeyboardInterrupt)):
            raise
        pytest.fail("could not bring up the real stack: %s: %s"
                    % (type(err).__name__, err), pytrace=False)

    try:
        yield st
    finally:
        _stop_stack(st)


CACHE_TAG = "bluegreen-test/app:layer-cache"


def _stop_stack(st: Stack) -> None:
    # Untag this session's image refs (their registry ports die with the
    # session) but keep one stable tag so the busybox layers stay cached and
    # the next session's builds are fast.
    if "v1" in st.images:
        stacklib.docker("tag", st.images["v1"], CACHE_TAG, check=False)
    if st.images:
        stacklib.docker("rmi", *st.images.values(), check=False)
    for stop in (st.nginx and st.nginx.stop, st.registry and st.registry.stop):
        if stop:
            try:
                stop()
            except Exception as err:  # keep tearing down
                sys.stderr.write("bluegreen tests: teardown error: %s\n" % err)
    if os.environ.get("BLUEGREEN_TEST_KEEP"):
        sys.stderr.write("bluegreen tests: kept %s\n" % st.workdir)
    else:
        shutil.rmtree(st.workdir, ignore_errors=True)


# --------------------------------------------------------------------------
# per-test project
# --------------------------------------------------------------------------

class Project:
    """What the ``project`` fixture returns (see attributes / methods)."""

    def __init__(self, stack: Stack, name: str):
        self.stack = stack
        self.name = name
        # BLUE/GREEN_PORT below the kernel's ephemeral range, as `init` and `doctor` advise (an outgoing
        # connection can never hold them); nginx's own port anywhere free.
        colours = set()
        while len(colours) < 2:
            colours.add(stacklib.free_low_port())
        self.blue_port, self.green_port = sorted(colours)
        self.nginx_port = stacklib.free_port()
        self.env_file = os.path.join(stack.projects_dir, name + ".env")
        self.upstream_file = os.path.join(stack.conf_d, name + "-upstream.conf")
        self._popens: List[subprocess.Popen] = []

    # -- configuration -----------------------------------------------------
    def env_defaults(self) -> Dict[str, str]:
        return {
            "IMAGE": self.stack.image_repo,
            "BLUE_PORT": str(self.blue_port),
            "GREEN_PORT": str(self.green_port),
            "APP_PORT": "8080",
            "HEALTH_TIMEOUT": "20",
            "LOG_DIR": "",
            "NGINX_URL": "http://127.0.0.1:%d" % self.nginx_port,
        }

    def write_env(self, **keys) -> str:
        """Write ROOT/projects/NAME.env: defaults merged with ``keys``.

        Values are written verbatim as KEY=VALUE; a value of None drops the
        key (e.g. ``write_env(IMAGE=None)``). Returns the file path.
        """
        values = self.env_defaults()
        values.update(keys)
        lines = []
        for key, value in values.items():
            if value is None:
                continue
            value = str(value)
            if "\n" in value:
                raise ValueError("newline in env value for %s" % key)
            lines.append("%s=%s" % (key, value))
        with open(self.env_file, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        return self.env_file

    # -- nginx -------------------------------------------------------------
    def serve(self, extra: str = "", probe: bool = True, head: str = "") -> None:
        """Add nginx server ``NAME`` on nginx_port -> upstream ``NAME``.

        With ``probe`` the block carries bluegreen's route header line (as
        `bluegreen init` writes it); without, it is a hand-written block.
        Call only after the first deploy wrote the upstream file, otherwise
        nginx -t fails ("host not found in upstream").
        """
        if probe:
            extra = "add_header X-Bluegreen-Upstream $bluegreen_route_%s always;\n%s" % (
                re.sub(r"[^A-Za-z0-9_]", "_", self.name), extra)
        self.stack.nginx.add_server(self.name, self.nginx_port, self.name,
                                    extra=extra, head=head)

    def url(self, path: str = "/") -> str:
        return "http://127.0.0.1:%d/%s" % (self.nginx_port, path.lstrip("/"))

    def get(self, path: str = "/", timeout: float = 5,
            headers: Optional[Dict[str, str]] = None):
        """http_get through nginx -> (status, body); status 0 = no connection."""
        return stacklib.http_get(self.url(path), timeout=timeout, headers=headers)

    # -- running the product ------------------------------------------------
    def _env(self, env: Optional[Dict[str, str]]) -> Dict[str, str]:
        full = self.stack.base_env()
        if env:
            full.update({k: str(v) for k, v in env.items()})
        return full

    def run(self, *args, env: Optional[Dict[str, str]] = None,
            timeout: float = 120, check=None) -> subprocess.CompletedProcess:
        """Run ``python bluegreen.pyz ARGS`` (text output captured).

        check: None/False -> no check; True -> exit status must be 0;
        an int -> exit status must equal it. Failures raise AssertionError
        showing stdout and stderr.
        """
        argv = [sys.executable, self.stack.pyz, *[str(a) for a in args]]
        proc = subprocess.run(argv, env=self._env(env), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, timeout=timeout)
        if check is not None and check is not False:
            want = 0 if check is True else int(check)
            if proc.returncode != want:
                raise AssertionError(
                    "%s exited %d (expected %d)\n--- stdout ---\n%s"
                    "--- stderr ---\n%s"
                    % (shlex.join(["bluegreen.pyz", *argv[2:]]),
                       proc.returncode, want, proc.stdout, proc.stderr))
        return proc

    def popen(self, *args, env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
        """Start ``python bluegreen.pyz ARGS`` in the background (text pipes
        on stdout/stderr). Still running at teardown -> killed."""
        argv = [sys.executable, self.stack.pyz, *[str(a) for a in args]]
        proc = subprocess.Popen(argv, env=self._env(env), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        self._popens.append(proc)
        return proc

    # -- docker helpers ---------------------------------------------------
    def containers(self, all: bool = True) -> List[str]:
        """Names of containers labelled bluegreen.project=NAME."""
        args = ["ps", "--format", "{{.Names}}",
                "--filter", "label=bluegreen.project=%s" % self.name]
        if all:
            args.insert(1, "-a")
        return sorted(stacklib.docker(*args).stdout.split())

    # -- teardown ---------------------------------------------------------
    def diagnostics(self) -> str:
        out = []
        ps = stacklib.docker("ps", "-a", "--filter",
                             "label=bluegreen.project=%s" % self.name,
                             "--format", "{{.Names}} {{.Image}} {{.Status}} {{.Ports}}",
                             check=False)
        out.append("containers:\n" + (ps.stdout or "(none)\n"))
        for cname in ps.stdout.split("\n"):
            cname = cname.split(" ")[0]
            if cname:
                logs = stacklib.docker("logs", "--tail", "20", cname, check=False)
                out.append("logs %s:\n%s%s" % (cname, logs.stdout, logs.stderr))
        for path in [self.upstream_file, self.stack.nginx.site_path(self.name)] + \
                sorted(glob.glob(os.path.join(self.stack.projects_dir,
                                              self.name + ".*"))):
            if os.path.isfile(path):
                with open(path, errors="replace") as fh:
                    out.append("%s:\n%s" % (path, fh.read()[-2000:]))
        out.append("nginx error.log tail:\n" +
                   stacklib.tail(self.stack.nginx.error_log, 15))
        return "\n".join(out)

    def teardown(self) -> None:
        for proc in self._popens:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            # pipes are deliberately not closed here: a test's reader thread
            # may still be draining them (it gets EOF now that proc is gone)
        stacklib.cleanup_project(self.name)
        ngx = self.stack.nginx
        try:
            os.unlink(ngx.site_path(self.name))
        except FileNotFoundError:
            pass
        doomed = glob.glob(os.path.join(self.stack.projects_dir, self.name + ".*"))
        doomed += glob.glob(self.upstream_file + "*")
        # The watch log of a server block `init` wrote for this project (nginx created it where init points it).
        doomed += glob.glob("/var/log/nginx/bluegreen-%s.log*" % self.name)
        for path in doomed:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        if ngx.master_pid() is not None:
            ngx.reload()


def _project_name(request) -> str:
    short = request.node.name
    if short.startswith("test_"):
        short = short[len("test_"):]
    short = re.sub(r"[^a-z0-9]+", "-", short.lower()).strip("-")[:20].strip("-")
    return "t-%s-%s" % (short or "x", secrets.token_hex(2))


@pytest.fixture
def project(stack, request):
    proj = Project(stack, _project_name(request))
    try:
        yield proj
    finally:
        rep = getattr(request.node, "_bg_rep_call", None)
        if rep is not None and rep.failed:
            try:
                print("\n==== bluegreen diagnostics for %s ====\n%s"
                      % (proj.name, proj.diagnostics()))
            except Exception as err:
                print("diagnostics failed: %s" % err)
        proj.teardown()
