"""Smoke tests of the fleet harness (tests/fleet.py): three hosts in network namespaces, each with its
own dockerd, nginx and sshd, pulling from one registry, behind haproxy; and its cleanup.

They test the harness, not the product: the product's fleet tests build on the ``fleet`` fixture.
"""

from __future__ import annotations

import http.client
import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import Dict, Optional, Tuple

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)

import fleet as fleetlib  # noqa: E402
from fleet import fleet_fixture  # noqa: E402,F401  (the module-scoped `fleet` fixture)

APP_PORT = 20001  # published on 127.0.0.1 inside every host's namespace


def _get(port: int, path: str, timeout: float = 10) -> Tuple[int, str, Optional[str]]:
    """GET http://127.0.0.1:PORT/path on a new connection -> (status, body, X-Fleet-Host)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode(), resp.getheader("X-Fleet-Host")
    finally:
        conn.close()


@pytest.fixture(scope="module")
def app_everywhere(fleet):
    """v1 running on every host (pulled from the fleet registry), behind each host's nginx."""
    for h in fleet.hosts:
        h.docker("rm", "-f", "smoke", check=False)
        h.docker("run", "-d", "--name", "smoke", "-p", "127.0.0.1:%d:8080" % APP_PORT,
                 fleet.image("v1"))
        h.write_upstream("smoke", APP_PORT)
        h.proxy_app("smoke")
    for h in fleet.hosts:
        fleet.lb.wait_up(h)
    return fleet


def test_three_hosts_start_fast_on_a_private_subnet(fleet, record_property):
    timings = {k: round(v, 2) for k, v in fleet.timings.items()}
    record_property("fleet_start", timings)
    print("\nfleet start-up: %s" % timings)
    assert fleet.timings["total"] < 30, timings

    assert [h.name for h in fleet.hosts] == ["h1", "h2", "h3"]
    net = fleet.subnet
    assert net.is_private and net.prefixlen == 24
    addrs = [ipaddress.ip_address(h.addr) for h in fleet.hosts]
    assert all(a in net for a in addrs) and len(set(addrs)) == 3
    assert ipaddress.ip_address(fleet.gateway) in net
    # the subnet overlaps no route of the machine other than the fleet's own bridge
    routes = subprocess.run(["ip", "-4", "route"], stdout=subprocess.PIPE, text=True).stdout
    for line in routes.splitlines():
        first = line.split()[0]
        if first[0].isdigit() and " dev %s " % fleet.bridge not in line + " ":
            assert not net.overlaps(ipaddress.ip_network(first, strict=False)), line
    for h in fleet.hosts:
        assert os.path.exists("/run/netns/" + h.netns)
        out = h.run(["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout
        assert "%s/24" % h.addr in out
        route = h.run(["ip", "route", "show", "default"]).stdout
        assert "via %s" % fleet.gateway in route


def test_each_host_pulls_from_the_registry_and_its_nginx_proxies(app_everywhere):
    fleet = app_everywhere
    main_ids = set(fleetlib.stacklib.docker("ps", "-aq", "--no-trunc").stdout.split())
    for h in fleet.hosts:
        info = h.docker("image", "inspect", "--format", "{{json .RepoDigests}}",
                        fleet.image("v1")).stdout
        assert fleet.registry_addr + "/bg/app@sha256:" in info, info
        cid = h.docker("inspect", "--format", "{{.Id}}", "smoke").stdout.strip()
        assert cid not in main_ids  # the host's own dockerd, not the machine's
        ports = h.docker("port", "smoke", "8080").stdout
        assert ports.strip() == "127.0.0.1:%d" % APP_PORT
        # published on 127.0.0.1 of the host's namespace ...
        body = h.run(["curl", "-sS", "-m", "5", "http://127.0.0.1:%d/version" % APP_PORT]).stdout
        assert body == "v1"
        # ... and its nginx on ADDR:80 proxies to it, reachable from the controller
        assert h.get("/version") == (200, "v1")
        assert h.get("/fleet/host") == (200, "%s\n" % h.name)
        # the published port listens on the namespace's loopback only
        listening = h.run(["ss", "-ltnH", "sport = :%d" % APP_PORT]).stdout.split()
        assert "127.0.0.1:%d" % APP_PORT in listening and "0.0.0.0:%d" % APP_PORT not in listening


def test_ssh_with_strict_host_key_checking(app_everywhere, tmp_path):
    fleet = app_everywhere
    for h in fleet.hosts:
        out = fleet.ssh(h.name, "hostname; ip -4 -o addr show dev eth0; echo $BLUEGREEN_ROOT; "
                                "docker ps --format '{{.Names}}'").stdout.split("\n")
        assert out[0] == h.name
        assert " %s/24 " % h.addr in out[1]
        assert out[2] == h.deploy_root
        assert out[3] == "smoke"  # DOCKER_HOST is the host's dockerd
    cfg = open(fleet.ssh_config).read()
    assert "StrictHostKeyChecking yes" in cfg and "BatchMode yes" in cfg

    # h1's known_hosts entry carrying h2's key: ssh refuses to connect
    lines = open(fleet.known_hosts).read().splitlines()
    key_of = {ln.split()[0].split(",")[0]: " ".join(ln.split()[1:3]) for ln in lines}
    bad = tmp_path / "known_hosts"
    bad.write_text("h1,%s %s\n" % (fleet.host("h1").addr, key_of["h2"]))
    wrong = fleet.ssh("h1", "true", check=False,
                      options=("-o", "UserKnownHostsFile=%s" % bad, "-o", "LogLevel=ERROR"))
    assert wrong.returncode == 255
    assert "Host key verification failed" in wrong.stderr, wrong.stderr
    # an unknown host is refused too (no trust on first use)
    empty = tmp_path / "empty"
    empty.write_text("")
    unknown = fleet.ssh("h1", "true", check=False, options=("-o", "UserKnownHostsFile=%s" % empty))
    assert unknown.returncode == 255 and "Host key verification failed" in unknown.stderr
    # a key that is not authorized is refused (key auth only, no password)
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    denied = subprocess.run(
        ["ssh", "-F", "/dev/null", "-i", str(other), "-o", "IdentitiesOnly=yes",
         "-o", "UserKnownHostsFile=%s" % fleet.known_hosts, "-o", "StrictHostKeyChecking=yes",
         "-o", "BatchMode=yes", "root@%s" % fleet.host("h1").addr, "true"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert denied.returncode == 255, denied
    assert "Permission denied (publickey)" in denied.stderr, denied.stderr


def test_haproxy_round_robins_and_drains(app_everywhere):
    fleet = app_everywhere
    lb = fleet.lb
    seen = Counter(_get(lb.port, "/version")[2] for _ in range(30))
    assert set(seen) == {"h1", "h2", "h3"} and max(seen.values()) - min(seen.values()) <= 1, seen
    assert all(_get(lb.port, "/version")[:2] == (200, "v1") for _ in range(3))

    # a slow request in flight on h2, then h2 drains: no new requests, wait_no_sessions waits
    lb.set_state("h1", "maint")
    lb.set_state("h3", "maint")
    slow: Dict[str, object] = {}
    t = threading.Thread(target=lambda: slow.update(r=_get(lb.port, "/cgi-bin/slow?2")))
    t.start()
    try:
        fleetlib._wait("slow request on h2", lambda: lb.sessions("h2") == 1, 5)
        lb.set_state("h1", "ready")
        lb.set_state("h3", "ready")
        lb.set_state("h2", "drain")
        assert lb.status("h2") == "DRAIN"
        assert lb.sessions("h2") == 1
        seen = Counter(_get(lb.port, "/version")[2] for _ in range(20))
        assert set(seen) == {"h1", "h3"}, seen
        t0 = time.monotonic()
        lb.wait_no_sessions("h2", timeout=10)
        assert time.monotonic() - t0 > 0.5  # it did wait for the request in flight
    finally:
        t.join(10)
    assert slow["r"] == (200, "slow v1", "h2")

    lb.set_state("h3", "maint")
    assert lb.status("h3") == "MAINT"
    lb.set_state("h2", "ready")
    lb.set_state("h3", "ready")
    lb.wait_up("h2")
    lb.wait_up("h3")
    seen = Counter(_get(lb.port, "/version")[2] for _ in range(30))
    assert set(seen) == {"h1", "h2", "h3"}, seen

    # a host whose app stops failing its health check goes DOWN by itself, and comes back
    fleet.host("h3").docker("stop", "-t", "1", "smoke")
    lb.wait_down("h3", timeout=10)
    assert {_get(lb.port, "/version")[2] for _ in range(10)} == {"h1", "h2"}
    fleet.host("h3").docker("start", "smoke")
    lb.wait_up("h3", timeout=15)


def test_bluegreen_deploys_on_a_host_over_ssh(app_everywhere, stack):
    """What `bluegreen rollout` will do per host: the pyz on the host, run over ssh, with the host's
    own docker, nginx and deploy root (from the ssh session's environment)."""
    fleet = app_everywhere
    h = fleet.host("h1")
    shutil.copy(stack.pyz, os.path.join(h.deploy_root, "bluegreen.pyz"))
    env_file = os.path.join(h.deploy_root, "projects", "fleetapp.env")
    with open(env_file, "w") as fh:
        fh.write("IMAGE=%s\nBLUE_PORT=20011\nGREEN_PORT=20012\nAPP_PORT=8080\nHEALTH_TIMEOUT=20\n"
                 "NGINX_URL=http://%s\n" % (fleet.image_repo, h.addr))
    deploy = 'python3 "$BLUEGREEN_ROOT/bluegreen.pyz" deploy fleetapp %s'
    try:
        fleet.ssh(h, deploy % "v1")
        h.proxy_app("fleetapp", extra="add_header X-Bluegreen-Upstream $bluegreen_route_fleetapp always;")
        assert h.get("/version") == (200, "v1")
        fleet.ssh(h, deploy % "v2")
        assert h.get("/version") == (200, "v2")
        assert open(os.path.join(h.deploy_root, "projects", "fleetapp.active")).read().strip() == "green"
        names = h.docker("ps", "--format", "{{.Names}}").stdout.split()
        assert "fleetapp-green" in names and "fleetapp-blue" not in names
    finally:
        h.proxy_app("smoke")
        h.docker("rm", "-f", "fleetapp-blue", "fleetapp-green", check=False)


def _assert_nothing_left(run: str, workdir: str) -> None:
    left = fleetlib.leftovers(run, workdir)
    assert left == {k: [] for k in left}, left
    assert not [n for n in os.listdir("/run/netns") if n.startswith("bgf-%s-" % run)]
    links = subprocess.run(["ip", "-o", "link"], stdout=subprocess.PIPE, text=True).stdout
    assert "bgf-%s" % run not in links
    assert "/bgf-%s" % run not in open("/proc/self/mountinfo").read()


def test_stop_leaves_nothing_behind(stack):
    fl = fleetlib.Fleet(n=3, registry_storage=stack.registry.storage,
                        push_addr=stack.registry.open_addr)
    with fl:
        # leave real state behind: containers (overlay mounts, netns, shims, cgroups), a pulled image
        for h in fl.hosts:
            h.docker("run", "-d", "-p", "127.0.0.1:%d:8080" % APP_PORT, fl.image("v1"))
        assert fleetlib._mounts_under(fl.workdir) and fleetlib._cgroup_dirs(fl.run)
        assert len(fleetlib._run_pids(fl.run, fl.workdir)) > 10
    _assert_nothing_left(fl.run, fl.workdir)


CRASHING_OWNER = """
import sys, time
sys.path.insert(0, %r)
import fleet
fl = fleet.Fleet(n=2, registry_storage=%r, push_addr=%r).start()
fl.hosts[0].docker("run", "-d", "-p", "127.0.0.1:20001:8080", fl.image("v1"))
print(fl.run, fl.workdir, flush=True)
time.sleep(300)
"""


def test_a_killed_run_is_cleaned_up_by_the_next(stack):
    code = CRASHING_OWNER % (TESTS_DIR, stack.registry.storage, stack.registry.open_addr)
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        line = owner.stdout.readline().split()
        assert len(line) == 2, "the owner did not start its fleet"
        run, workdir = line
        assert fleetlib.leftovers(run, workdir)["processes"]
        # its owner is alive: cleanup_stale leaves it alone
        assert run not in fleetlib.cleanup_stale()
        assert fleetlib.leftovers(run, workdir)["netns"]
    finally:
        owner.send_signal(signal.SIGKILL)  # no atexit, no finally: everything stays behind
        owner.wait()
    assert fleetlib.leftovers(run, workdir)["processes"]
    assert run in fleetlib.cleanup_stale()
    _assert_nothing_left(run, workdir)
