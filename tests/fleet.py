"""A fleet of real hosts on one machine, for tests and benchmarks of fleet deploys.

Plain stdlib Python (3.9+); pytest is optional (only the ``fleet`` fixture at the end needs it).
Must run as root on Linux with iproute2, util-linux (nsenter, unshare), docker.io's dockerd,
docker-registry, nginx, OpenSSH (sshd, ssh, ssh-keygen) and haproxy (``.ci/install-deps``).

What ``Fleet(n=3).start()`` builds (``RUN`` is a random 6-hex run id)::

    root namespace                                   netns bgf-RUN-hN (one per host)
    ------------------------------------------       -------------------------------------------
    bridge bgf-RUN   10.231.X.1/24  <-- veth bgf-RUN-hN --> eth0 10.231.X.(10+N)/24, lo up,
    docker-registry  10.231.X.1:5000 (pull side)          default route via 10.231.X.1
    docker-registry  127.0.0.1:P (push side, same         dockerd (own data-root, exec-root, pidfile,
                     storage; or the stack fixture's)       socket, cgroup parent /bgf-RUN-hN,
    haproxy          127.0.0.1:LB -> every hN:80,           --insecure-registry 10.231.X.1:5000;
                     admin socket                           its iptables rules stay in the netns)
    ssh client       ssh -F WORKDIR/ctl/ssh_config hN     sshd on 10.231.X.(10+N):22 (own UTS ns,
                                                            hostname hN, key auth only)
                                                          nginx on 10.231.X.(10+N):80 (own prefix)

* The /24 is picked under a lock so that it overlaps no route of the machine (``ip route``); every
  address the harness uses is that /24 or loopback, and only the namespaces it made use them.
  No iptables rule is added in the root namespace (a host's dockerd adds its own, in its netns).
* A host's containers publish on 127.0.0.1 of its namespace (``-p 127.0.0.1:PORT:8080``); its
  nginx, in the same namespace, proxies to them.
* An ssh session on hN (the way ``bluegreen rollout`` reaches a host) gets, from sshd's SetEnv:
  ``DOCKER_HOST`` (the host's dockerd), ``BLUEGREEN_ROOT`` (its deploy root, WORKDIR/hN/opt-deploy),
  ``BLUEGREEN_NGINX`` (its nginx command), ``BLUEGREEN_LAUNCHER_DIR`` and a ``PATH`` that starts
  with WORKDIR/hN/bin (so ``bluegreen setup`` on hN installs hN's own ``bluegreen`` command).
  The file system is the machine's (no mount namespace): a path means the same thing on every host
  and in the test, which keeps docker volume paths and assertions simple.
* ``stop()`` (also run at exit and on SIGTERM/SIGHUP) and ``cleanup_stale()`` (run by every
  ``start()``) SIGKILL every process of a run (found by network namespace, by cgroup and by command
  line, with descendants), detach every mount under its workdir, remove cgroups, namespaces, links,
  workdir and state file. A run whose owner process is gone (a SIGKILLed pytest) is stale; live
  runs of other processes are never touched.
* Hosts reach the bridge address (registry, controller) but not each other, nor anything beyond:
  the machine's FORWARD policy (docker's DROP, with bridge netfilter on) is left as it is.

Usage::

    from fleet import Fleet
    with Fleet(n=3) as fleet:                 # or Fleet(..., registry_storage=..., push_addr=...)
        fleet.publish_images()                # v1, v2 (busybox test app) into the fleet registry
        h1 = fleet.hosts[0]
        h1.docker("run", "-d", "-p", "127.0.0.1:20001:8080", fleet.image("v1"))
        h1.write_upstream("app", 20001); h1.proxy_app("app")
        fleet.ssh("h1", ["hostname"]).stdout  # 'h1\\n'
        fleet.lb.set_state("h1", "drain"); fleet.lb.wait_no_sessions("h1")

``python3 tests/fleet.py cleanup`` removes what crashed runs left; ``python3 tests/fleet.py up``
starts a fleet and keeps it until Ctrl-C (prints how to reach it).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import fcntl
import glob
import ipaddress
import json
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)

import stack as stacklib  # noqa: E402  (tests/stack.py: registry config, image builder, nginx, http_get)

__all__ = ["Fleet", "Host", "Haproxy", "cleanup_stale", "fleet_fixture", "leftovers"]

PREFIX = "bgf-"
STATE_DIR = "/run/bgf-fleet"
LOCK_FILE = "/run/lock/bgf-fleet.lock"
REGISTRY_PORT = 5000
# 10.231.X.0/24 first; the later /16s only if every /24 of 10.231 overlaps a route.
SUBNET_POOLS = ("10.231.0.0/16", "10.232.0.0/16", "10.233.0.0/16")
REQUIRED = ("ip", "nsenter", "unshare", "dockerd", "docker", "docker-registry", "nginx",
            "ssh", "ssh-keygen", "haproxy")
SSHD = "/usr/sbin/sshd"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"
HOST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_IMAGES = (("v1", "ok", 0), ("v2", "ok", 0))

Argv = Union[str, Sequence[str]]

# Every daemon runs under this tiny subreaper (``python3 -c REAPER bgf-reaper ARGV...``): this
# machine's PID 1 does not reap orphans, so without it each containerd-shim start, and every daemon
# killed at cleanup, would leave a zombie. It forwards TERM/INT/HUP to ARGV, reaps whatever is
# reparented to it, and exits (with ARGV's status) once it has no child left.
REAPER_MARK = "bgf-reaper"
REAPER = """\
import ctypes, os, signal, sys
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
main = os.fork()
if main == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, lambda s, f: os.kill(main, s))
code = 0
while True:
    try:
        pid, status = os.wait()
    except ChildProcessError:
        break
    except InterruptedError:
        continue
    if pid == main:
        code = os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode") else 1
sys.exit(code if code >= 0 else 128 - code)
"""


def _reaped(argv: Sequence[str]) -> List[str]:
    """argv run under the subreaper (the same process id: nsenter/unshare/sh exec into it)."""
    return [sys.executable, "-c", REAPER, REAPER_MARK, *argv]


# --------------------------------------------------------------------------
# small utilities
# --------------------------------------------------------------------------

def _run(argv: Sequence[str], check: bool = True, timeout: float = 30,
         env: Optional[Dict[str, str]] = None, input: Optional[str] = None
         ) -> subprocess.CompletedProcess:
    """Run argv with captured text output; with ``check`` a non-zero exit raises RuntimeError."""
    proc = subprocess.run(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=timeout, env=env, input=input,
                          stdin=None if input is not None else subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise RuntimeError("%s failed (exit %d)\nstdout:\n%s\nstderr:\n%s"
                           % (shlex.join(argv), proc.returncode, proc.stdout, proc.stderr))
    return proc


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run(["ip", *args], check=check)


def _write(path: str, text: str, mode: int = 0o644) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(text)
    os.chmod(path, mode)
    return path


def _wait(what: str, ok: Callable[[], bool], timeout: float, diag: Callable[[], str] = lambda: "",
          interval: float = 0.05) -> None:
    """Poll ``ok()`` until true; RuntimeError naming ``what`` (and ``diag()``) after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            raise RuntimeError("%s: not ready after %ss\n%s" % (what, timeout, diag()))
        time.sleep(interval)


def _unix_http_ok(sock_path: str, path: str = "/_ping") -> bool:
    """True when an HTTP server on unix socket ``sock_path`` answers ``GET path`` with 200."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            sock.connect(sock_path)
            sock.sendall(("GET %s HTTP/1.0\r\nHost: docker\r\n\r\n" % path).encode())
            return sock.recv(64).startswith(b"HTTP/1.0 200") or False
    except OSError:
        return False


def _proc_stat(pid: int) -> Optional[List[str]]:
    """Fields of /proc/PID/stat after the command name (state is [0], ppid [1], starttime [19])."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].decode().split()
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    """The process exists and is no zombie."""
    st = _proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def _start_time(pid: int) -> str:
    st = _proc_stat(pid)
    return st[19] if st else ""


def _all_pids() -> List[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit()]


def _own_lineage() -> Set[int]:
    """This process and its ancestors: never killed by a sweep."""
    keep, pid = set(), os.getpid()
    while pid > 1 and pid not in keep:
        keep.add(pid)
        st = _proc_stat(pid)
        pid = int(st[1]) if st else 0
    return keep


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError:
        return b""


def _read(path: str) -> str:
    """The text of a file ('' when it cannot be read)."""
    return _read_bytes(path).decode("utf-8", "replace")


def _ns_inode(path: str) -> Optional[Tuple[int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _mounts_under(prefix: str) -> List[str]:
    """Mount points at or below ``prefix`` in this mount namespace, deepest first."""
    out = []
    prefix = prefix.rstrip("/")
    for line in _read("/proc/self/mountinfo").splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        point = fields[4].encode().decode("unicode_escape")  # \040 etc.
        if point == prefix or point.startswith(prefix + "/"):
            out.append(point)
    return sorted(set(out), key=lambda p: (-p.count("/"), p))


_libc = None


def _umount_lazy(path: str) -> None:
    """umount2(path, MNT_DETACH); falls back to ``umount -l``."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        if _libc.umount2(path.encode(), 2) == 0:
            return
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):  # not (or no longer) a mount point
            return
    except (OSError, AttributeError):
        pass
    subprocess.run(["umount", "-l", path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _cgroup_roots() -> List[str]:
    """Every mounted cgroup hierarchy root (v1 controllers, the unified one, or a pure v2 root)."""
    roots = []
    for line in _read("/proc/self/mountinfo").splitlines():
        left, _, right = line.partition(" - ")
        if right.split(" ", 1)[0] in ("cgroup", "cgroup2"):
            roots.append(left.split()[4])
    return roots


_NAME_RE = re.compile(r"^%s([0-9a-z]{1,8})(?:-h[0-9]{1,2})?$" % re.escape(PREFIX))


def _run_id_of(name: str) -> Optional[str]:
    """'bgf-RUN' / 'bgf-RUN-h3' -> 'RUN'; None for any other name."""
    m = _NAME_RE.match(name)
    return m.group(1) if m else None


# --------------------------------------------------------------------------
# discovering and removing a run's resources (used by stop() and cleanup_stale())
# --------------------------------------------------------------------------

def _netns_names(run: str) -> List[str]:
    try:
        names = os.listdir("/run/netns")
    except OSError:
        return []
    return sorted(n for n in names if n.startswith("%s%s-" % (PREFIX, run)))


def _link_names(run: str) -> List[str]:
    out = _ip("-o", "link", "show", check=False).stdout
    names = []
    for line in out.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            name = parts[1].strip().split("@", 1)[0]
            if name == PREFIX + run or name.startswith("%s%s-" % (PREFIX, run)):
                names.append(name)
    return sorted(names)


def _cgroup_dirs(run: str) -> List[str]:
    dirs = []
    for root in _cgroup_roots():
        dirs += glob.glob(os.path.join(root, "%s%s-*" % (PREFIX, run)))
    return sorted(d for d in dirs if os.path.isdir(d))


def _run_pids(run: str, workdir: Optional[str]) -> List[int]:
    """Live processes of run ``run``: in its network namespaces, in its cgroups, or naming its
    workdir on their command line, plus all their descendants. Never this process or its ancestors."""
    ns_ids = set()
    for name in _netns_names(run):
        ident = _ns_inode("/run/netns/" + name)
        if ident:
            ns_ids.add(ident)
    cg_mark = "/%s%s-" % (PREFIX, run)
    wd = (workdir.rstrip("/") + "/").encode() if workdir else None
    wd_exact = workdir.rstrip("/").encode() if workdir else None
    keep = _own_lineage()
    found: Set[int] = set()
    parents: Dict[int, int] = {}
    for pid in _all_pids():
        st = _proc_stat(pid)
        if st is None:
            continue
        parents[pid] = int(st[1])
        if pid in keep or st[0] in ("Z", "X"):
            continue
        if ns_ids and _ns_inode("/proc/%d/ns/net" % pid) in ns_ids:
            found.add(pid)
        elif cg_mark in _read("/proc/%d/cgroup" % pid):
            found.add(pid)
        elif wd:
            args = _read_bytes("/proc/%d/cmdline" % pid).split(b"\0")
            if any(a.startswith(wd) or a == wd_exact or (b"=" + wd) in a for a in args):
                found.add(pid)
    # descendants (nginx workers, shims' children, ...)
    grew = True
    while grew:
        grew = False
        for pid, ppid in parents.items():
            if ppid in found and pid not in found and pid not in keep and _alive(pid):
                found.add(pid)
                grew = True
    return sorted(found)


def _is_reaper(pid: int) -> bool:
    args = _read_bytes("/proc/%d/cmdline" % pid).split(b"\0")
    return len(args) > 3 and args[3] == REAPER_MARK.encode()


def _kill_run_processes(run: str, workdir: Optional[str], timeout: float = 10) -> List[int]:
    """SIGKILL every process of the run until none is left; returns the survivors (normally []).

    The subreapers go last: they reap what dies below them and then exit by themselves, so the
    machine's PID 1 (which reaps nothing here) inherits no zombie.
    """
    deadline = time.monotonic() + timeout
    spare_reapers = time.monotonic() + timeout / 2
    while True:
        pids = [p for p in _run_pids(run, workdir) if _alive(p)]
        if not pids or time.monotonic() > deadline:
            return pids
        doomed = [p for p in pids if not _is_reaper(p)]
        if not doomed and time.monotonic() > spare_reapers:
            doomed = pids
        for pid in doomed:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)


def _remove_cgroups(run: str) -> None:
    for top in _cgroup_dirs(run):
        for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda t: -t[0].count("/")):
            for _ in range(20):
                try:
                    os.rmdir(dirpath)
                    break
                except FileNotFoundError:
                    break
                except OSError:  # EBUSY while the kernel finishes killed tasks
                    time.sleep(0.05)


def _state_path(run: str) -> str:
    return os.path.join(STATE_DIR, run + ".json")


def _read_state(run: str) -> Dict[str, str]:
    """The run's state file: run, workdir, owner_pid, owner_start (all strings; {} if unreadable)."""
    try:
        with open(_state_path(run)) as fh:
            return {str(k): str(v) for k, v in json.load(fh).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def _owner_alive(state: Dict[str, str]) -> bool:
    pid = int(state.get("owner_pid") or 0)
    return pid > 0 and _alive(pid) and _start_time(pid) == state.get("owner_start")


def _destroy_run(run: str, workdir: Optional[str]) -> None:
    """Remove everything of run ``run`` (processes, mounts, cgroups, netns, links, workdir, state)."""
    _kill_run_processes(run, workdir)
    if workdir:
        for point in _mounts_under(workdir):
            _umount_lazy(point)
    _remove_cgroups(run)
    for name in _netns_names(run):
        _ip("netns", "delete", name, check=False)
    for name in _link_names(run):
        _ip("link", "delete", name, check=False)
    if workdir and os.path.isdir(workdir):
        for _ in range(3):
            shutil.rmtree(workdir, ignore_errors=True)
            if not os.path.exists(workdir):
                break
            for point in _mounts_under(workdir):
                _umount_lazy(point)
            time.sleep(0.1)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_state_path(run))


def leftovers(run: str, workdir: Optional[str] = None) -> Dict[str, List[str]]:
    """What is still there of run ``run`` (all lists empty after a clean stop)."""
    return {
        "netns": _netns_names(run),
        "links": _link_names(run),
        "processes": ["%d %s" % (p, _read("/proc/%d/cmdline" % p).replace("\0", " ").strip())
                      for p in _run_pids(run, workdir) if _alive(p)],
        "mounts": _mounts_under(workdir) if workdir else [],
        "cgroups": _cgroup_dirs(run),
        "files": [p for p in (workdir, _state_path(run)) if p and os.path.exists(p)],
    }


def _known_runs() -> Dict[str, Optional[str]]:
    """run id -> workdir (or None) of every run with a state file, a namespace, a link, a cgroup or
    a default workdir (/tmp/bgf-RUN) on this machine."""
    runs: Dict[str, Optional[str]] = {}
    for path in glob.glob(os.path.join(STATE_DIR, "*.json")):
        run = os.path.basename(path)[:-5]
        runs[run] = _read_state(run).get("workdir") or None
    names = []
    with contextlib.suppress(OSError):
        names += os.listdir("/run/netns")
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@", 1)[0])
    for root in _cgroup_roots():
        names += [os.path.basename(p) for p in glob.glob(os.path.join(root, PREFIX + "*"))]
    names += [os.path.basename(p) for p in glob.glob("/tmp/%s*" % PREFIX) if os.path.isdir(p)]
    for name in names:
        found = _run_id_of(name)
        if found and found not in runs:
            run = found
            default = "/tmp/%s%s" % (PREFIX, run)
            runs[run] = default if os.path.isdir(default) else None
    return runs


def cleanup_stale(log: Callable[[str], None] = lambda msg: None) -> List[str]:
    """Remove every run whose owner process is gone (crashed or killed test runs); returns their ids.

    A run whose owner is alive (another pytest or benchmark on this machine) is left alone.
    """
    removed = []
    for run, workdir in sorted(_known_runs().items()):
        if _owner_alive(_read_state(run)):
            continue
        log("fleet: removing leftovers of run %s (%s)" % (run, workdir or "no workdir"))
        _destroy_run(run, workdir)
        removed.append(run)
    return removed


@contextlib.contextmanager
def _machine_lock() -> Iterator[None]:
    """Serialises subnet choice and stale cleanup between concurrent fleets on this machine."""
    os.makedirs(os.path.dirname(LOCK_FILE), exist_ok=True)
    with open(LOCK_FILE, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _pick_subnet() -> ipaddress.IPv4Network:
    """A /24 from SUBNET_POOLS that overlaps no IPv4 route or address of the root namespace."""
    taken: List[Union[ipaddress.IPv4Network, ipaddress.IPv6Network]] = []
    for args in (("-4", "route", "show", "table", "all"), ("-4", "-o", "addr", "show")):
        for line in _ip(*args, check=False).stdout.splitlines():
            for word in line.split():
                if word[:1].isdigit() and "." in word:
                    with contextlib.suppress(ValueError):
                        taken.append(ipaddress.ip_network(word, strict=False))
    for pool in SUBNET_POOLS:
        subnets = list(ipaddress.IPv4Network(pool).subnets(new_prefix=24))[1:-1]
        random.shuffle(subnets)
        for net in subnets:
            if not any(net.overlaps(t) for t in taken):
                return net
    raise RuntimeError("no free /24 in %s (ip route overlaps all)" % ", ".join(SUBNET_POOLS))


# --------------------------------------------------------------------------
# hosts
# --------------------------------------------------------------------------

class HostNginx(stacklib.Nginx):
    """stacklib.Nginx whose own commands run in the host's network namespace (so it binds there).

    ``cmd`` stays the plain nginx command line: that is what a process on the host (an ssh session
    already in the namespace) uses, e.g. as BLUEGREEN_NGINX.
    """

    def __init__(self, workdir: str, includes: Sequence[str], netns: str):
        super().__init__(workdir, includes=includes)
        self.netns = netns
        self.proc: Optional[subprocess.Popen] = None

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        argv = ["nsenter", "--net=/run/netns/" + self.netns, "--"] + self.cmd + list(args)
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=30, stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise RuntimeError("%s failed (exit %d):\n%s\nerror.log tail:\n%s"
                               % (shlex.join(argv), proc.returncode, proc.stdout,
                                  stacklib.tail(self.error_log, 15)))
        return proc

    def start(self, timeout: float = 10, keep_config: bool = False) -> "HostNginx":
        """Start the master in the foreground (``daemon off``) under the subreaper, in the netns."""
        if self.master_pid() is not None:
            raise RuntimeError("nginx in %s is already running" % self.workdir)
        if not keep_config:
            self.write_config()
        self.test_config()
        argv = ["nsenter", "--net=/run/netns/" + self.netns, "--"] + _reaped(
            self.cmd + ["-g", "daemon off;"])
        with open(os.path.join(self.workdir, "stderr.log"), "ab") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

        proc = self.proc

        def ok() -> bool:
            if proc.poll() is not None:
                raise RuntimeError("nginx exited %s; error.log:\n%s"
                                   % (proc.returncode, stacklib.tail(self.error_log)))
            return bool(self.master_pid() and self.worker_pids())
        _wait("nginx in %s" % self.workdir, ok, timeout, lambda: stacklib.tail(self.error_log))
        return self


class Host:
    """One simulated host: a network namespace with its own dockerd, sshd and nginx.

    name          'h1', 'h2', ... (the ssh alias and its hostname)
    addr          its address on the fleet bridge (sshd :22, nginx :80)
    netns         network namespace name (``/run/netns/NAME``)
    dir           WORKDIR/hN (everything of the host lives below it)
    deploy_root   WORKDIR/hN/opt-deploy (its BLUEGREEN_ROOT: projects/, nginx/conf.d/)
    docker_host   'unix://WORKDIR/hN/docker.sock'
    nginx         HostNginx (cmd, reload(), site_path(), error_log, ...)
    env           what an ssh session on it gets (DOCKER_HOST, BLUEGREEN_*, PATH); root's shell
                  start-up files may still prepend to PATH (on this machine: pyenv's shims), so
                  run the product as ``/usr/bin/python3 PYZ`` or through its launcher
    """

    def __init__(self, fleet: "Fleet", index: int, addr: str):
        self.fleet = fleet
        self.index = index
        self.name = "h%d" % index
        self.addr = addr
        self.netns = "%s%s-%s" % (PREFIX, fleet.run, self.name)
        self.dir = os.path.join(fleet.workdir, self.name)
        self.deploy_root = os.path.join(self.dir, "opt-deploy")
        self.conf_d = os.path.join(self.deploy_root, "nginx", "conf.d")
        self.bin_dir = os.path.join(self.dir, "bin")
        self.docker_sock = os.path.join(self.dir, "docker.sock")
        self.docker_host = "unix://" + self.docker_sock
        self.dockerd_pidfile = os.path.join(self.dir, "dockerd.pid")
        self.dockerd_log = os.path.join(self.dir, "dockerd.log")
        self.ssh_dir = os.path.join(self.dir, "ssh")
        self.host_key = os.path.join(self.ssh_dir, "ssh_host_ed25519_key")
        self.sshd_config = os.path.join(self.ssh_dir, "sshd_config")
        self.sshd_pidfile = os.path.join(self.ssh_dir, "sshd.pid")
        self.sshd_log = os.path.join(self.ssh_dir, "sshd.log")
        self.authorized_keys = os.path.join(self.ssh_dir, "authorized_keys")
        self.nginx = HostNginx(os.path.join(self.dir, "nginx"),
                               includes=[os.path.join(self.conf_d, "*.conf")], netns=self.netns)
        self._sshd: Optional[subprocess.Popen] = None
        self._dockerd: Optional[subprocess.Popen] = None

    def __repr__(self) -> str:
        return "<Host %s %s>" % (self.name, self.addr)

    @property
    def env(self) -> Dict[str, str]:
        """The environment an ssh session on this host gets (set by sshd's SetEnv)."""
        return {
            "DOCKER_HOST": self.docker_host,
            "BLUEGREEN_ROOT": self.deploy_root,
            "BLUEGREEN_NGINX": shlex.join(self.nginx.cmd),
            "BLUEGREEN_LAUNCHER_DIR": self.bin_dir,
            "PATH": self.bin_dir + ":" + HOST_PATH,
        }

    # -- running things on the host ----------------------------------------
    def nsenter_argv(self) -> List[str]:
        """``nsenter`` prefix entering the host's network (and, while sshd runs, UTS) namespace."""
        argv = ["nsenter", "--net=/run/netns/" + self.netns]
        if self._sshd is not None and self._sshd.poll() is None:
            argv.append("--uts=/proc/%d/ns/uts" % self._sshd.pid)
        return argv + ["--"]

    def run(self, argv: Argv, check: bool = True, timeout: float = 60,
            input: Optional[str] = None) -> subprocess.CompletedProcess:
        """Run argv (a list, or a string for ``sh -c``) directly in the host's namespaces, with the
        environment an ssh session gets (for assertions; the product goes through ``ssh``)."""
        if isinstance(argv, str):
            argv = ["sh", "-c", argv]
        env = dict(os.environ)
        env.update(self.env)
        return _run(self.nsenter_argv() + list(argv), check=check, timeout=timeout, env=env,
                    input=input)

    def ssh(self, argv: Argv, **kw) -> subprocess.CompletedProcess:
        """``fleet.ssh(self.name, argv, ...)``."""
        return self.fleet.ssh(self.name, argv, **kw)

    def docker(self, *args: str, check: bool = True, timeout: float = 120
               ) -> subprocess.CompletedProcess:
        """``docker ARGS`` against this host's dockerd."""
        return stacklib.docker(*args, env={"DOCKER_HOST": self.docker_host}, check=check,
                               timeout=timeout)

    # -- nginx ------------------------------------------------------------
    def url(self, path: str = "/") -> str:
        """http://ADDR/path: the host's nginx, reachable from the root namespace."""
        return "http://%s/%s" % (self.addr, path.lstrip("/"))

    def get(self, path: str = "/", timeout: float = 5,
            headers: Optional[Dict[str, str]] = None) -> Tuple[int, str]:
        """stacklib.http_get of ``url(path)`` -> (status, body); 0 = no connection."""
        return stacklib.http_get(self.url(path), timeout=timeout, headers=headers)

    def write_site(self, name: str, text: str, reload: bool = True) -> str:
        """Write nginx ``sites/NAME.conf`` (a whole server block) and reload; returns the path."""
        path = _write(self.nginx.site_path(name), text)
        if reload:
            self.nginx.reload()
        return path

    def remove_site(self, name: str, reload: bool = True) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.nginx.site_path(name))
        if reload:
            self.nginx.reload()

    def default_site(self, upstream: Optional[str] = None, extra: str = "") -> str:
        """The host's default server block on ADDR:80: answers ``/fleet/host`` with the host name,
        adds ``X-Fleet-Host: hN`` to every answer, and proxies ``/`` to ``http://UPSTREAM`` (503
        'no app' without one). ``extra`` is pasted into the server block."""
        if upstream:
            root = ("        proxy_pass http://%s;\n"
                    "        proxy_set_header Host $host;\n"
                    "        proxy_http_version 1.1;\n"
                    "        proxy_set_header Connection \"\";\n" % upstream)
        else:
            root = "        return 503 \"no app on %s\\n\";\n" % self.name
        return ("server {\n"
                "    listen %s:80 default_server;\n"
                "    add_header X-Fleet-Host %s always;\n"
                "%s"
                "    location = /fleet/host { return 200 \"%s\\n\"; }\n"
                "    location / {\n%s    }\n"
                "}\n") % (self.addr, self.name, ("    %s\n" % extra) if extra else "",
                          self.name, root)

    def proxy_app(self, upstream: str, extra: str = "", reload: bool = True) -> str:
        """Make the default server proxy to upstream ``UPSTREAM`` (defined first, e.g. by the product's
        deploy or ``write_upstream``; nginx -t fails on an unknown upstream)."""
        return self.write_site("default", self.default_site(upstream, extra), reload=reload)

    def write_upstream(self, name: str, port: int) -> str:
        """Write DEPLOY_ROOT/nginx/conf.d/NAME-upstream.conf (``upstream NAME`` -> 127.0.0.1:PORT),
        as a deploy would; no reload."""
        return _write(os.path.join(self.conf_d, "%s-upstream.conf" % name),
                      "upstream %s {\n    server 127.0.0.1:%d;\n}\n" % (name, port))

    # -- start -------------------------------------------------------------
    def _prepare(self) -> None:
        for d in (self.dir, self.bin_dir, os.path.join(self.deploy_root, "projects"), self.conf_d,
                  self.ssh_dir, os.path.join(self.dir, "docker"), os.path.join(self.dir, "exec")):
            os.makedirs(d, exist_ok=True)
        os.chmod(self.dir, 0o755)  # nginx workers (nobody) read below it
        _write(os.path.join(self.dir, "daemon.json"), "{}\n")  # never /etc/docker/daemon.json

    def _start_dockerd(self) -> None:
        fl = self.fleet
        argv = ["nsenter", "--net=/run/netns/" + self.netns, "--"] + _reaped([
                "dockerd",
                "--config-file", os.path.join(self.dir, "daemon.json"),
                "--data-root", os.path.join(self.dir, "docker"),
                "--exec-root", os.path.join(self.dir, "exec"),
                "--pidfile", self.dockerd_pidfile,
                "-H", self.docker_host,
                "--cgroup-parent", "/" + self.netns,
                "--insecure-registry", fl.registry_addr])
        with open(self.dockerd_log, "ab") as log:
            self._dockerd = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT, start_new_session=True)

    def _wait_dockerd(self, timeout: float) -> None:
        def ok() -> bool:
            if self._dockerd is not None and self._dockerd.poll() is not None:
                raise RuntimeError("dockerd of %s exited %s:\n%s" % (
                    self.name, self._dockerd.returncode, stacklib.tail(self.dockerd_log)))
            return _unix_http_ok(self.docker_sock)
        _wait("dockerd of %s" % self.name, ok, timeout, lambda: stacklib.tail(self.dockerd_log))

    def _write_sshd_config(self) -> None:
        def q(value: str) -> str:
            return '"%s"' % value
        env = " ".join(q("%s=%s" % kv) for kv in sorted(self.env.items()))
        _write(self.sshd_config, "\n".join([
            "# generated by tests/fleet.py for %s" % self.name,
            "ListenAddress %s:22" % self.addr,
            "HostKey %s" % self.host_key,
            "PidFile %s" % self.sshd_pidfile,
            "AuthorizedKeysFile %s" % self.authorized_keys,
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            # the workdir sits below /tmp (mode 1777), which StrictModes rejects for key files
            "StrictModes no",
            "UseDNS no",
            "PrintMotd no",
            "MaxStartups 100:30:200",
            "MaxSessions 50",
            "SetEnv %s" % env,
            "Subsystem sftp %s" % SFTP_SERVER,
            "",
        ]))

    def _start_sshd(self) -> None:
        self._write_sshd_config()
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation dir, as Debian's
        _run([SSHD, "-t", "-f", self.sshd_config])
        # own UTS namespace: `hostname` on the host says hN
        argv = ["nsenter", "--net=/run/netns/" + self.netns, "--",
                "unshare", "--uts", "--", "sh", "-c",
                'hostname "$0" && exec "$@"', self.name] + _reaped(
                    [SSHD, "-D", "-f", self.sshd_config, "-E", self.sshd_log])
        self._sshd = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True)

    def _wait_sshd(self, timeout: float) -> None:
        def ok() -> bool:
            if self._sshd is not None and self._sshd.poll() is not None:
                raise RuntimeError("sshd of %s exited %s:\n%s"
                                   % (self.name, self._sshd.returncode, stacklib.tail(self.sshd_log)))
            try:
                with socket.create_connection((self.addr, 22), timeout=1) as sock:
                    return sock.recv(8).startswith(b"SSH-")
            except OSError:
                return False
        _wait("sshd of %s" % self.name, ok, timeout, lambda: stacklib.tail(self.sshd_log))

    def _start_nginx(self) -> None:
        self.nginx.write_config()
        _write(self.nginx.site_path("default"), self.default_site())
        self.nginx.start(keep_config=True)

    def diagnostics(self) -> str:
        parts = ["== %s (%s, netns %s)" % (self.name, self.addr, self.netns)]
        for label, path in (("dockerd.log", self.dockerd_log), ("sshd.log", self.sshd_log),
                            ("nginx error.log", self.nginx.error_log)):
            parts.append("-- %s:\n%s" % (label, stacklib.tail(path, 15)))
        ps = self.docker("ps", "-a", "--format", "{{.Names}} {{.Image}} {{.Status}} {{.Ports}}",
                         check=False, timeout=10)
        parts.append("-- containers:\n%s%s" % (ps.stdout, ps.stderr))
        return "\n".join(parts)


# --------------------------------------------------------------------------
# haproxy (the load balancer in front of the hosts)
# --------------------------------------------------------------------------

class Haproxy:
    """haproxy in the root namespace: frontend on 127.0.0.1:port, backend ``app`` with one server per
    host (its nginx on ADDR:80, health-checked with ``GET health_path``), admin socket.

    set_state(host, 'drain'|'maint'|'ready'), status(host), sessions(host), wait_up(host),
    wait_down(host), wait_no_sessions(host), stat() (``show stat`` rows), command(text).
    """

    BACKEND = "app"

    def __init__(self, workdir: str, hosts: Sequence[Host], health_path: str):
        self.workdir = workdir
        self.hosts = list(hosts)
        self.health_path = health_path
        self.port = 0
        self.config = os.path.join(workdir, "haproxy.cfg")
        self.socket = os.path.join(workdir, "admin.sock")
        self.pidfile = os.path.join(workdir, "haproxy.pid")
        self.log = os.path.join(workdir, "haproxy.log")
        self._proc: Optional[subprocess.Popen] = None

    @property
    def addr(self) -> str:
        return "127.0.0.1:%d" % self.port

    def url(self, path: str = "/") -> str:
        return "http://127.0.0.1:%d/%s" % (self.port, path.lstrip("/"))

    def get(self, path: str = "/", timeout: float = 5,
            headers: Optional[Dict[str, str]] = None) -> Tuple[int, str]:
        """stacklib.http_get through the load balancer -> (status, body)."""
        return stacklib.http_get(self.url(path), timeout=timeout, headers=headers)

    def write_config(self) -> None:
        lines = [
            "# generated by tests/fleet.py",
            "global",
            "    stats socket %s mode 600 level admin" % self.socket,
            "    pidfile %s" % self.pidfile,
            "    log stderr format short local0 notice",
            "defaults",
            "    mode http",
            "    log global",
            "    option httplog",
            "    timeout connect 2s",
            "    timeout client 60s",
            "    timeout server 60s",
            "    timeout http-keep-alive 10s",
            "    retries 2",
            "    option redispatch",
            "frontend fe",
            "    bind 127.0.0.1:%d" % self.port,
            "    default_backend %s" % self.BACKEND,
            "backend %s" % self.BACKEND,
            "    balance roundrobin",
            "    option httpchk GET %s" % self.health_path,
            "    http-check expect status 200",
            "    default-server inter 300ms fastinter 200ms downinter 300ms rise 2 fall 2",
        ]
        for host in self.hosts:
            lines.append("    server %s %s:80 check" % (host.name, host.addr))
        _write(self.config, "\n".join(lines) + "\n")

    def start(self, timeout: float = 10) -> None:
        self.port = stacklib.free_port()
        self.write_config()
        _run(["haproxy", "-c", "-q", "-f", self.config])
        with open(self.log, "ab") as log:
            self._proc = subprocess.Popen(["haproxy", "-db", "-f", self.config],
                                          stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True)

        def ok() -> bool:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError("haproxy exited %s:\n%s"
                                   % (self._proc.returncode, stacklib.tail(self.log)))
            try:
                return "pxname" in self.command("show stat")
            except OSError:
                return False
        _wait("haproxy", ok, timeout, lambda: stacklib.tail(self.log))
        stacklib.wait_port(self.port, timeout=timeout)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=10)

    # -- runtime API ---------------------------------------------------------
    def command(self, text: str, timeout: float = 5) -> str:
        """One command on the admin socket; returns haproxy's answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(self.socket)
            sock.sendall(text.rstrip("\n").encode() + b"\n")
            chunks = []
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                chunks.append(data)
        return b"".join(chunks).decode("utf-8", "replace")

    def stat(self) -> List[Dict[str, str]]:
        """``show stat`` as dicts (keys: pxname, svname, scur, status, ...)."""
        text = self.command("show stat")
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if not lines or not lines[0].startswith("# "):
            raise RuntimeError("unexpected `show stat` answer: %r" % text[:200])
        keys = lines[0][2:].split(",")
        return [dict(zip(keys, ln.split(","))) for ln in lines[1:]]

    def _row(self, host: Union[str, Host]) -> Dict[str, str]:
        name = host.name if isinstance(host, Host) else host
        for row in self.stat():
            if row.get("pxname") == self.BACKEND and row.get("svname") == name:
                return row
        raise KeyError("no server %s in backend %s" % (name, self.BACKEND))

    def set_state(self, host: Union[str, Host], state: str) -> None:
        """``set server app/HOST state drain|maint|ready``."""
        if state not in ("drain", "maint", "ready"):
            raise ValueError("state must be drain, maint or ready")
        name = host.name if isinstance(host, Host) else host
        answer = self.command("set server %s/%s state %s" % (self.BACKEND, name, state)).strip()
        if answer:
            raise RuntimeError("haproxy refused `set server %s/%s state %s`: %s"
                               % (self.BACKEND, name, state, answer))

    def status(self, host: Union[str, Host]) -> str:
        """'UP', 'DOWN', 'DRAIN', 'MAINT', 'UP 1/2', 'no check', ... (``show stat`` status)."""
        return self._row(host)["status"]

    def sessions(self, host: Union[str, Host]) -> int:
        """Current sessions (``scur``) on the host's server."""
        return int(self._row(host)["scur"] or 0)

    def wait_up(self, host: Union[str, Host], timeout: float = 15) -> None:
        _wait("haproxy server %s UP" % host, lambda: self.status(host) == "UP", timeout,
              lambda: "status %s" % self.status(host))

    def wait_down(self, host: Union[str, Host], timeout: float = 15) -> None:
        _wait("haproxy server %s DOWN" % host, lambda: self.status(host).startswith("DOWN"),
              timeout, lambda: "status %s" % self.status(host))

    def wait_no_sessions(self, host: Union[str, Host], timeout: float = 30) -> None:
        _wait("haproxy server %s without sessions" % host, lambda: self.sessions(host) == 0,
              timeout, lambda: "scur %d" % self.sessions(host))


# --------------------------------------------------------------------------
# the fleet
# --------------------------------------------------------------------------

_LIVE: List["Fleet"] = []


def _on_fatal_signal(signum: int, _frame: object) -> None:
    """SIGTERM/SIGHUP (e.g. `timeout` ending a test run): remove the live fleets, then die of it."""
    for fl in list(_LIVE):
        with contextlib.suppress(Exception):
            fl.stop()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_signal_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) == signal.SIG_DFL:
            signal.signal(sig, _on_fatal_signal)


class Fleet:
    """N hosts behind haproxy, a registry they pull from, and an ssh controller (see module doc).

    n                  number of hosts (h1..hN)
    workdir            where everything lives (default /tmp/bgf-RUN; removed by stop())
    registry_storage   serve this docker-registry storage directory to the hosts (e.g. the stack
                       fixture's ``stack.registry.storage``); default: a fresh one of the fleet's own
    push_addr          a 127.0.0.1:PORT registry on that storage which the machine's dockerd pushes
                       to (``stack.registry.open_addr``); default: the fleet starts one on its storage
    health_path        haproxy's health check path (GET, expects 200)
    cleanup_stale      remove leftovers of crashed runs first (never another live run's fleet)

    After start(): hosts, host(name), lb (Haproxy), registry_addr (what hosts pull from),
    push_addr, image(tag), ssh(host, argv), ssh_argv(host), ssh_config, known_hosts, client_key,
    timings, diagnostics(), leftovers().
    """

    def __init__(self, n: int = 3, workdir: Optional[str] = None,
                 registry_storage: Optional[str] = None, push_addr: Optional[str] = None,
                 health_path: str = "/api/health", cleanup_stale: bool = True,
                 image_repo: str = "bg/app"):
        if n < 1 or n > 99:
            raise ValueError("n must be 1..99")
        if push_addr and not registry_storage:
            raise ValueError("push_addr needs the registry_storage it writes to")
        self.n = n
        self.run = secrets.token_hex(3)
        self.workdir = os.path.abspath(workdir or "/tmp/%s%s" % (PREFIX, self.run))
        if len(self.workdir) > 60:  # unix sockets below it (containerd's) must fit in 108 bytes
            raise ValueError("workdir %s is too long (at most 60 characters)" % self.workdir)
        self.registry_storage = registry_storage or os.path.join(self.workdir, "registry",
                                                                 "storage")
        self._own_push = not push_addr
        self.push_addr = push_addr or ""
        self.health_path = health_path
        self.image_path = image_repo
        self._cleanup_stale = cleanup_stale
        self.bridge = PREFIX + self.run
        self.subnet: Optional[ipaddress.IPv4Network] = None
        self.gateway = ""
        self.hosts: List[Host] = []
        self.lb: Optional[Haproxy] = None
        self.ctl_dir = os.path.join(self.workdir, "ctl")
        self.client_key = os.path.join(self.ctl_dir, "id_ed25519")
        self.known_hosts = os.path.join(self.ctl_dir, "known_hosts")
        self.ssh_config = os.path.join(self.ctl_dir, "ssh_config")
        self.timings: Dict[str, float] = {}
        self._registries: List[subprocess.Popen] = []
        self._started = False
        self._stopped = False
        self._lock = threading.Lock()

    # -- addresses -----------------------------------------------------------
    @property
    def registry_addr(self) -> str:
        """The registry as the hosts see it: GATEWAY:5000 (their dockerd has it as insecure)."""
        return "%s:%d" % (self.gateway, REGISTRY_PORT)

    @property
    def image_repo(self) -> str:
        """What hosts pull: GATEWAY:5000/bg/app."""
        return "%s/%s" % (self.registry_addr, self.image_path)

    def image(self, tag: str) -> str:
        return "%s:%s" % (self.image_repo, tag)

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    # -- lifecycle -------------------------------------------------------------
    def __enter__(self) -> "Fleet":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 45) -> "Fleet":
        """Bring the fleet up (hosts in parallel); on any failure everything is removed again."""
        if self._started:
            raise RuntimeError("a Fleet starts once")
        self._started = True
        if os.geteuid() != 0:
            raise RuntimeError("the fleet needs root (network namespaces, dockerd, sshd)")
        missing = [t for t in REQUIRED if shutil.which(t) is None]
        missing += [p for p in (SSHD, stacklib.BUSYBOX) if not os.path.exists(p)]
        if missing:
            raise RuntimeError("the fleet needs: %s (run .ci/install-deps)" % ", ".join(missing))
        t0 = time.monotonic()
        atexit.register(self.stop)
        _LIVE.append(self)
        _install_signal_handlers()
        try:
            self._start(timeout)
        except BaseException:
            diag = ""
            with contextlib.suppress(Exception):
                diag = self.diagnostics()
            self.stop()
            if diag:
                sys.stderr.write("fleet start failed; diagnostics:\n%s\n" % diag)
            raise
        self.timings["total"] = time.monotonic() - t0
        return self

    def _step(self, name: str, t: float) -> float:
        now = time.monotonic()
        self.timings[name] = now - t
        return now

    def _start(self, timeout: float) -> None:
        t = time.monotonic()
        os.makedirs(STATE_DIR, exist_ok=True)
        with _machine_lock():
            if self._cleanup_stale:
                cleanup_stale(lambda msg: print(msg, file=sys.stderr))
            # the state file comes first: whatever exists of this run is findable from then on
            _write(_state_path(self.run), json.dumps({
                "run": self.run, "workdir": self.workdir, "owner_pid": os.getpid(),
                "owner_start": _start_time(os.getpid()), "argv": sys.argv[:4]}) + "\n")
            os.makedirs(self.workdir, exist_ok=True)
            os.chmod(self.workdir, 0o755)
            self.subnet = _pick_subnet()
            hosts_ = list(self.subnet.hosts())
            self.gateway = str(hosts_[0])
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", "%s/%d" % (self.gateway, self.subnet.prefixlen), "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
        t = self._step("stale+bridge", t)

        self.hosts = [Host(self, i, str(hosts_[9 + i])) for i in range(1, self.n + 1)]
        for h in self.hosts:
            self._make_namespace(h)
            h._prepare()
        t = self._step("namespaces", t)

        self._start_registries()
        for h in self.hosts:  # dockerds start in parallel; the rest is done while they boot
            h._start_dockerd()
        self._make_ssh_keys()
        for h in self.hosts:
            h._start_sshd()
        for h in self.hosts:
            h._start_nginx()
        self.lb = Haproxy(os.path.join(self.workdir, "lb"), self.hosts, self.health_path)
        os.makedirs(self.lb.workdir, exist_ok=True)
        self.lb.start()
        self._wait_registries(timeout)
        for h in self.hosts:
            h._wait_sshd(timeout)
        t = self._step("registry+sshd+nginx+haproxy", t)
        for h in self.hosts:
            h._wait_dockerd(timeout)
        self._step("dockerd(wait)", t)

    def _make_namespace(self, h: Host) -> None:
        assert self.subnet is not None
        _ip("netns", "add", h.netns)
        _ip("link", "add", h.netns, "type", "veth", "peer", "name", "eth0", "netns", h.netns)
        _ip("link", "set", h.netns, "master", self.bridge, "up")
        _ip("-n", h.netns, "addr", "add", "%s/%d" % (h.addr, self.subnet.prefixlen), "dev", "eth0")
        _ip("-n", h.netns, "link", "set", "lo", "up")
        _ip("-n", h.netns, "link", "set", "eth0", "up")
        _ip("-n", h.netns, "route", "add", "default", "via", self.gateway)

    def _registry_config(self, name: str, addr: str) -> str:
        path = os.path.join(self.workdir, "registry", name + ".yml")
        return _write(path, "\n".join([
            "version: 0.1",
            "log:",
            "  level: warn",
            "storage:",
            "  filesystem:",
            "    rootdirectory: %s" % json.dumps(self.registry_storage),
            "  delete:",
            "    enabled: true",
            "http:",
            "  addr: \"%s\"" % addr,
            "",
        ]))

    def _start_registries(self) -> None:
        os.makedirs(self.registry_storage, exist_ok=True)
        wanted = [("registry-hosts", self.registry_addr)]
        if self._own_push:
            self.push_addr = "127.0.0.1:%d" % stacklib.free_port()
            wanted.append(("registry-push", self.push_addr))
        for name, addr in wanted:
            cfg = self._registry_config(name, addr)
            with open(os.path.join(self.workdir, "registry", name + ".log"), "ab") as log:
                self._registries.append(subprocess.Popen(
                    ["docker-registry", "serve", cfg], stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True))

    def _wait_registries(self, timeout: float) -> None:
        for addr in (self.registry_addr, self.push_addr):
            def ok(addr: str = addr) -> bool:
                dead = [p for p in self._registries if p.poll() is not None]
                if dead:
                    raise RuntimeError("docker-registry exited:\n%s" % "\n".join(
                        stacklib.tail(f) for f in glob.glob(
                            os.path.join(self.workdir, "registry", "*.log"))))
                return stacklib.http_get("http://%s/v2/" % addr, timeout=2)[0] == 200
            _wait("registry %s" % addr, ok, timeout)

    def _make_ssh_keys(self) -> None:
        os.makedirs(self.ctl_dir, mode=0o700, exist_ok=True)
        jobs = [["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "fleet-controller",
                 "-f", self.client_key]]
        jobs += [["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", h.name, "-f", h.host_key]
                 for h in self.hosts]
        procs = [subprocess.Popen(j, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for j in jobs]
        for j, p in zip(jobs, procs):
            out = p.communicate(timeout=30)[0]
            if p.returncode != 0:
                raise RuntimeError("%s failed: %s" % (shlex.join(j), out))
        pub = _read(self.client_key + ".pub")
        known = []
        for h in self.hosts:
            _write(h.authorized_keys, pub, 0o600)
            key = " ".join(_read(h.host_key + ".pub").split()[:2])
            known.append("%s,%s %s\n" % (h.name, h.addr, key))
        _write(self.known_hosts, "".join(known))
        cfg = []
        for h in self.hosts:
            cfg += ["Host %s %s" % (h.name, h.addr), "    HostName %s" % h.addr, ""]
        cfg += [
            "Host *",
            "    User root",
            "    IdentityFile %s" % self.client_key,
            "    IdentitiesOnly yes",
            "    UserKnownHostsFile %s" % self.known_hosts,
            "    GlobalKnownHostsFile /dev/null",
            "    StrictHostKeyChecking yes",
            "    UpdateHostKeys no",
            "    BatchMode yes",
            "    ConnectTimeout 5",
            "    LogLevel ERROR",
            "",
        ]
        _write(self.ssh_config, "\n".join(cfg))

    # -- ssh ---------------------------------------------------------------
    def ssh_argv(self, host: Union[str, Host], *options: str) -> List[str]:
        """``ssh -F CONFIG [OPTIONS] HOST``: append the remote command (one shell string)."""
        name = host.name if isinstance(host, Host) else host
        return ["ssh", "-F", self.ssh_config, *options, name]

    def ssh(self, host: Union[str, Host], argv: Argv, check: bool = True, timeout: float = 60,
            input: Optional[str] = None, options: Sequence[str] = ()) -> subprocess.CompletedProcess:
        """Run a command on a host through the system ssh (StrictHostKeyChecking=yes, key auth).

        ``argv`` is a list (quoted with shlex.join) or a shell string.
        """
        command = argv if isinstance(argv, str) else shlex.join(argv)
        return _run(self.ssh_argv(host, *options) + ["--", command], check=check, timeout=timeout,
                    input=input)

    # -- images ------------------------------------------------------------
    def publish_images(self, specs: Sequence[Tuple[str, str, float]] = DEFAULT_IMAGES) -> Dict[str, str]:
        """Build the busybox test app (tests/stack.py) for each (tag, behaviour, boot_delay) and push
        it through push_addr; returns {tag: what hosts pull}. Not needed when the storage is the
        stack fixture's (its images are there already)."""
        out = {}
        for tag, behaviour, delay in specs:
            ref = "%s/%s:%s" % (self.push_addr, self.image_path, tag)
            stacklib.build_app_image(ref, tag, behaviour, boot_delay=delay)
            stacklib.docker("rmi", ref, check=False)
            out[tag] = self.image(tag)
        return out

    # -- teardown ----------------------------------------------------------
    def stop(self) -> None:
        """Remove everything of this run; safe to call more than once and after a failed start."""
        with self._lock:
            if self._stopped or not self._started:
                return
            self._stopped = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        with contextlib.suppress(ValueError):
            _LIVE.remove(self)
        if self.lb is not None:
            self.lb.stop()
        for proc in self._registries:
            if proc.poll() is None:
                proc.kill()
        _destroy_run(self.run, self.workdir)
        # reap our own children (the sweep SIGKILLed them)
        mine: List[Optional[subprocess.Popen]] = list(self._registries)
        mine.append(self.lb._proc if self.lb else None)
        mine += [p for h in self.hosts for p in (h._sshd, h._dockerd, h.nginx.proc)]
        for child in mine:
            if child is not None:
                with contextlib.suppress(Exception):
                    child.wait(timeout=5)

    def leftovers(self) -> Dict[str, List[str]]:
        """What is left of this fleet (every list empty after stop())."""
        return leftovers(self.run, self.workdir)

    def diagnostics(self) -> str:
        parts = ["fleet %s in %s, subnet %s, registry %s, push %s, timings %s"
                 % (self.run, self.workdir, self.subnet, self.registry_addr, self.push_addr,
                    {k: round(v, 2) for k, v in self.timings.items()})]
        for h in self.hosts:
            with contextlib.suppress(Exception):
                parts.append(h.diagnostics())
        if self.lb is not None:
            parts.append("== haproxy log:\n%s" % stacklib.tail(self.lb.log, 20))
            with contextlib.suppress(Exception):
                parts.append("== show stat:\n" + "\n".join(
                    "%s/%s %s scur=%s" % (r["pxname"], r["svname"], r["status"], r["scur"])
                    for r in self.lb.stat()))
        return "\n".join(parts)


# --------------------------------------------------------------------------
# pytest fixture ``fleet``: a test module imports ``fleet_fixture`` from here (unused name: noqa F401)
# --------------------------------------------------------------------------

try:
    import pytest
except ImportError:  # a benchmark without pytest
    pytest = None  # type: ignore[assignment]

if pytest is not None:
    @pytest.fixture(scope="module", name="fleet")
    def fleet_fixture(stack):  # type: ignore[no-untyped-def]
        """Three hosts behind haproxy, pulling the stack fixture's images (``fleet.image("v1")``:
        v1, v2, v3, slow, unhealthy, crash). One fleet per test module; removed at its end (the
        module's tests share it, so each test leaves the hosts as it found them or copes)."""
        fl = Fleet(n=int(os.environ.get("BLUEGREEN_FLEET_HOSTS", "3")),
                   registry_storage=stack.registry.storage, push_addr=stack.registry.open_addr)
        try:
            fl.start()
        except Exception as err:
            pytest.fail("could not bring up the fleet: %s: %s" % (type(err).__name__, err),
                        pytrace=False)
        try:
            yield fl
        finally:
            fl.stop()
else:
    fleet_fixture = None


# --------------------------------------------------------------------------
# command line: cleanup / up
# --------------------------------------------------------------------------

def _main(argv: Sequence[str]) -> int:
    cmd = argv[0] if argv else ""
    if cmd == "cleanup":
        with _machine_lock():
            removed = cleanup_stale(print)
        print("fleet: %d stale run(s) removed" % len(removed))
        return 0
    if cmd == "up":
        n = int(argv[1]) if len(argv) > 1 else 3
        with Fleet(n=n) as fl:
            fl.publish_images()
            print("fleet %s up in %.2fs: %s" % (fl.run, fl.timings["total"],
                                                {k: round(v, 2) for k, v in fl.timings.items()}))
            for h in fl.hosts:
                print("  %s %s  ssh -F %s %s   DOCKER_HOST=%s"
                      % (h.name, h.addr, fl.ssh_config, h.name, h.docker_host))
            lb = fl.lb
            assert lb is not None
            print("  haproxy http://%s  admin socket %s" % (lb.addr, lb.socket))
            print("  images %s (push via %s)" % (fl.image_repo, fl.push_addr))
            print("Ctrl-C removes it.")
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
        return 0
    sys.stderr.write("usage: python3 tests/fleet.py cleanup | up [N]\n")
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
