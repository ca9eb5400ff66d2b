#!/usr/bin/env python3
"""`make bench-fleet`: K full rollouts over 3 hosts behind haproxy, three tools in one run, under load.

A benchmark, not a test (pytest does not collect it). It brings up the fleet harness (tests/fleet.py:
three hosts h1..h3 in network namespaces, each with its own dockerd, sshd and nginx, haproxy in front
on 127.0.0.1, a registry the hosts pull from) and rolls a project out K times with each of

  bluegreen+hooks  `bluegreen rollout` with the haproxy hooks (tests/bench/haproxy_hook.py: drain the
                   host before its deploy, ready it after)
  bluegreen        `bluegreen rollout` without hooks
  baseline         the seed guide's way: `ssh hN deploy.sh PROJECT TAG` on each host in turn
                   (tests/bench/deploy.sh, the guide's script; what its GitHub ssh-action does)

while two clients keep requesting GET /version through haproxy for the whole of each tool's series:

  wrk  -c 8 -t 2, each connection paced to one request every 40 ms (~200 req/s); keep-alive, never
       retries: a connection error or a non-2xx/3xx answer is a failed request
  hey  -c 4 -q 50 (~200 req/s); Go's HTTP client, which retries an idempotent request on a fresh
       connection when a reused one was closed; errors and non-2xx answers are failed requests

Every rollout deploys a fresh tag that no host has yet (r1, r2, ...: the busybox test app plus a layer
of --layer-mb MiB of random bytes, built offline and pushed to the fleet's registry), so each one
really pulls. The app boots in 1.5 to 2.5 s (seeded per rollout and host, the same sequence for every
tool). It prints one table (failed requests per client, rollout wall time median and its parts:
preflight, pull, per-host switch) and writes every raw number as JSON. docs/bench.md explains it.

Everything is private (namespaces, a /24 of its own, its own registry, images removed from the
machine's dockerd after the push) and removed at the end, also on Ctrl-C or SIGTERM. Exits non-zero
only when the bench itself broke, never because of a number.

    python3 tests/bench/bench_fleet.py [--rollouts K] [--layer-mb MB] [--tools LIST] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(HERE))

import stack  # noqa: E402  (tests/stack.py: image builder, docker, http_get)
from bench import BenchError, Hey, HEY_QPS, HEY_WORKERS, guarded, measured_build  # noqa: E402  (tests/bench/bench.py)
from fleet import Fleet  # noqa: E402  (tests/fleet.py: the hosts, haproxy, the registry)

sys.path.insert(0, str(REPO))
from bluegreen.init import render_placeholder_upstream  # noqa: E402
from bluegreen.nginx import add_header_line, new_token, render_upstream  # noqa: E402

PYZ = REPO / "dist" / "bluegreen.pyz"
BASELINE = HERE / "deploy.sh"
HOOK = HERE / "haproxy_hook.py"
DEFAULT_JSON = REPO / "dist" / "bench-fleet.json"

TOOLS = ("bluegreen+hooks", "bluegreen", "baseline")
HOSTS = 3
BG_PROJECT, SH_PROJECT = "fbbg", "fbsh"  # bluegreen's (both series) and the baseline's project on every host
PORTS = {BG_PROJECT: (20301, 20302), SH_PROJECT: (20311, 20312)}
APP = "graceful"  # the test app that answers its in-flight requests on SIGTERM (tests/stack.py)
LAYER_MB = 48  # the random layer of every measured tag (incompressible: the registry stores it gzipped)
# What each host can download from the registry, in Mbit/s (0: no limit). The hosts share this machine's CPUs, so an
# unlimited pull is bound by CPU (decompressing, hashing, unpacking), and three hosts pulling at once compete for
# the same cores, which real hosts never do. A per-host link limit makes most of the pull wait on its own link,
# as a real host's pull waits on its network and the registry, so three pulls overlap the way they would.
PULL_MBIT = 200
BOOT_RANGE = (1.5, 2.5)  # the app's boot time, drawn per (rollout, host); the same for every tool
GAP_RANGE = (1.0, 2.0)  # pause between two rollouts of a series, drawn per rollout
SETTLE = 2.0  # seconds of load before the first and after the last rollout of a series
HEALTH_TIMEOUT, STOP_TIMEOUT = 30, 10
ROLLOUT_TIMEOUT = 300  # one rollout (all three hosts); recorded as failed past this
WRK_CONNECTIONS, WRK_THREADS, WRK_DELAY_MS = 8, 2, 40  # each connection: one request, then 40 ms of pause
BUDGET = 15 * 60  # the whole run must stay below this; the bench refuses a K that would not fit

# wrk has no rate option: delay() paces every connection; done() prints the error counts as one JSON line.
WRK_SCRIPT = """\
function init(args) delay_ms = tonumber(args[1]) or 40 end
function delay() return delay_ms end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRK-JSON {"requests":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}\\n',
    summary.requests, e.connect, e.read, e.write, e.status, e.timeout))
end
"""

STEP_RE = re.compile(r"^\[(\d)/6\] (\S+) .*: (FAILED after )?([0-9]+(?:\.[0-9]+)?)s$")
HOST_LINE_RE = re.compile(r"^\[(h\d+)\] (.*)$")
HAPROXY_COUNTERS = ("stot", "hrsp_2xx", "hrsp_5xx", "eresp", "econ", "wretr", "wredis", "cli_abrt", "srv_abrt")


def log(text: str) -> None:
    print(text, flush=True)


def boot_delay(index: int, host: str) -> float:
    return round(random.Random(f"fleet-boot-{index}-{host}").uniform(*BOOT_RANGE), 2)


def gap(index: int) -> float:
    return round(random.Random(f"fleet-gap-{index}").uniform(*GAP_RANGE), 2)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a process started with start_new_session and everything of its group (its ssh clients)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def median(values: List[float]) -> Optional[float]:
    return statistics.median(values) if values else None


def parse_steps(lines: List[str]) -> Dict[str, float]:
    steps: Dict[str, float] = {}
    for line in lines:
        match = STEP_RE.match(line.strip())
        if match:
            steps[match.group(2)] = float(match.group(4))
    return steps


# --------------------------------------------------------------------------
# load: wrk (no retry) and hey (retries) through haproxy
# --------------------------------------------------------------------------

class Wrk:
    """wrk as the keep-alive client that never retries; stopped with SIGINT, after which it reports."""

    def __init__(self, url: str, bound: int, work: Path) -> None:
        script = work / "wrk-pace.lua"
        script.write_text(WRK_SCRIPT)
        self.out = work / f"wrk-{time.monotonic_ns()}.txt"
        self.argv = ["wrk", "-c", str(WRK_CONNECTIONS), "-t", str(WRK_THREADS), "-d", f"{bound}s", "--timeout", "10s",
                     "-s", str(script), url, "--", str(WRK_DELAY_MS)]
        with open(self.out, "wb") as fh:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.ended_early = False

    def stop(self) -> None:
        if self.proc.poll() is not None:
            self.ended_early = True
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.kill()
            raise BenchError(f"wrk did not stop within 20 s of SIGINT ({shlex.join(self.argv)})")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def result(self) -> dict:
        text = self.out.read_text(errors="replace")
        match = re.search(r"^WRK-JSON (\{.*\})$", text, re.M)
        if not match:
            raise BenchError(f"wrk printed no report ({shlex.join(self.argv)}):\n{text[-2000:]}")
        found = json.loads(match.group(1))
        socket_errors = sum(found[k] for k in ("connect", "read", "write", "timeout"))
        rps = re.search(r"Requests/sec:\s+([0-9.]+)", text)
        return {**found, "socket_errors": socket_errors, "failed": socket_errors + found["status"],
                "rps": float(rps.group(1)) if rps else None, "ended_early": self.ended_early}


# --------------------------------------------------------------------------
# the bench
# --------------------------------------------------------------------------

class FleetBench:
    def __init__(self, rollouts: int, layer_mb: int, tools: List[str], pull_mbit: int = PULL_MBIT) -> None:
        self.rollouts = rollouts
        self.layer_mb = layer_mb
        self.pull_mbit = pull_mbit
        self.tools = tools
        self.work = Path(tempfile.mkdtemp(prefix="bluegreen-bench-fleet-"))
        self.work.chmod(0o755)
        # Snapshots: a `make build` or an edit while the bench runs must not change what is measured. The
        # file system is shared with the hosts, so the baseline's script path is the same on every host.
        self.pyz = self.work / "bluegreen.pyz"
        shutil.copyfile(PYZ, self.pyz)
        self.deploy_sh = self.work / "deploy.sh"
        shutil.copyfile(BASELINE, self.deploy_sh)
        self.fleet: Optional[Fleet] = None
        self.local_images: List[str] = []  # on the machine's dockerd, removed at the end
        self.tags: Dict[str, List[str]] = {}
        self.load: list = []
        self.running: Optional[subprocess.Popen] = None
        self.results: Dict[str, dict] = {}
        self.timings: Dict[str, float] = {}

    # -- set-up ------------------------------------------------------------
    def setup(self) -> None:
        stack.ensure_dockerd()
        t0 = time.monotonic()
        self.fleet = Fleet(n=HOSTS, image_repo="bench/app")
        self.fleet.start()
        fl = self.fleet
        self.timings["fleet_start"] = round(time.monotonic() - t0, 1)
        log(f"bench-fleet: fleet {fl.run} up in {self.timings['fleet_start']}s: hosts "
            f"{', '.join(f'{h.name} {h.addr}' for h in fl.hosts)}; haproxy {fl.lb.addr}; registry {fl.registry_addr}")
        if self.pull_mbit:
            for h in fl.hosts:
                self.limit_pulls(h)
        t0 = time.monotonic()
        n = 0
        wanted = [("w0", 0)]  # the warm-up tag: the app without the big layer
        for tool in self.tools:
            self.tags[tool] = []
            for _ in range(self.rollouts):
                n += 1
                self.tags[tool].append(f"r{n}")
                wanted.append((f"r{n}", self.layer_mb))
        with ThreadPoolExecutor(max_workers=3) as pool:
            list(pool.map(lambda item: self.build(*item), wanted))
        self.timings["images"] = round(time.monotonic() - t0, 1)
        log(f"bench-fleet: {len(wanted)} images ({len(wanted) - 1} with a {self.layer_mb} MiB random layer) built "
            f"and pushed in {self.timings['images']}s")
        for h in fl.hosts:
            self.write_env(h, BG_PROJECT, 1.0)
            self.write_env(h, SH_PROJECT, 1.0)
            Path(h.conf_d, f"{BG_PROJECT}-upstream.conf").write_text(render_placeholder_upstream(
                project=BG_PROJECT, upstream=BG_PROJECT, blue_port=PORTS[BG_PROJECT][0], token=new_token()))
            # The baseline's upstream as the guide's hand-written one would be read by deploy.sh's sed.
            Path(h.conf_d, f"{SH_PROJECT}-upstream.conf").write_text(render_upstream(
                name=SH_PROJECT, port=PORTS[SH_PROJECT][0], project=SH_PROJECT, colour="-", tag="-",
                token=new_token(), down=True))
            h.nginx.reload()

    def limit_pulls(self, h) -> None:
        """Shape what the registry sends to host h (source port 5000) to pull_mbit on the root namespace's end of
        its link; everything else (haproxy's requests, ssh) passes unshaped. The qdisc goes with the link, which
        the fleet removes."""
        dev = h.netns  # the fleet names the root end of each host's veth after the host's namespace
        rate = f"{self.pull_mbit}mbit"
        for args in (["qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "10"],
                     ["class", "add", "dev", dev, "parent", "1:", "classid", "1:10", "htb", "rate", "10gbit",
                      "quantum", "60000"],
                     ["class", "add", "dev", dev, "parent", "1:", "classid", "1:20", "htb", "rate", rate, "ceil", rate,
                      "burst", "64k", "cburst", "64k", "quantum", "60000"],
                     ["filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1", "u32",
                      "match", "ip", "sport", "5000", "0xffff", "flowid", "1:20"]):
            proc = subprocess.run(["tc", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=30)
            if proc.returncode != 0:
                raise BenchError(f"tc {shlex.join(args)} failed: {proc.stdout.strip()} (--pull-mbit 0 runs without it)")

    def build(self, tag: str, layer_mb: int) -> None:
        """The test app answering /version with `tag`, plus `layer_mb` MiB of random bytes, pushed to the fleet's
        registry; nothing of it stays on the machine's dockerd."""
        fl = self.fleet
        ref = f"{fl.push_addr}/{fl.image_path}:{tag}"
        if not layer_mb:
            self.local_images.append(ref)
            stack.build_app_image(ref, tag, APP, boot_delay=0)
            stack.docker("rmi", ref, check=False)
            return
        base = f"bench-fleet-base-{fl.run}:{tag}"
        self.local_images += [ref, base]
        stack.build_app_image(base, tag, APP, boot_delay=0, push=False)
        ctx = self.work / f"ctx-{tag}"
        ctx.mkdir()
        with open(ctx / "blob", "wb") as fh:
            for _ in range(layer_mb):
                fh.write(os.urandom(1 << 20))
        (ctx / "Dockerfile").write_text(f"FROM {base}\nCOPY blob /blob\n")
        stack.docker("build", "-q", "-t", ref, str(ctx), env={"DOCKER_BUILDKIT": "0"}, timeout=300)
        shutil.rmtree(ctx, ignore_errors=True)
        stack.push_image(ref)
        stack.docker("rmi", ref, base, check=False)

    def write_env(self, h, project: str, boot: float) -> None:
        blue, green = PORTS[project]
        text = (f"IMAGE={self.fleet.image_repo}\nBLUE_PORT={blue}\nGREEN_PORT={green}\nAPP_PORT=8080\n"
                f"HEALTH_PATH=/api/health\nHEALTH_TIMEOUT={HEALTH_TIMEOUT}\nSTOP_TIMEOUT={STOP_TIMEOUT}\nLOG_DIR=\n"
                f"BOOT_DELAY={boot}\n")
        if project == BG_PROJECT:
            text += f"NGINX_URL=http://{h.addr}\n"
        Path(h.deploy_root, "projects", f"{project}.env").write_text(text)

    def point(self, project: str) -> None:
        """Point every host's default server block (what haproxy sends to, and bluegreen's NGINX_URL) at
        `project`'s upstream; the server block carries the route header line for bluegreen's project."""
        for h in self.fleet.hosts:
            h.proxy_app(project, extra=add_header_line(project) if project == BG_PROJECT else "")

    def serve(self, project: str) -> None:
        """point() at `project`, then wait until haproxy has every host UP."""
        self.point(project)
        for h in self.fleet.hosts:
            self.fleet.lb.wait_up(h, timeout=20)

    def warm_up(self) -> None:
        """One unmeasured rollout per project (w0): the hosts run the app, bluegreen is installed on them."""
        t0 = time.monotonic()
        if any(t.startswith("bluegreen") for t in self.tools):
            self.point(BG_PROJECT)  # its deploys prove the switch through this server block
            r = self.rollout_bluegreen("w0", hooks=False, index=-1)
            if not r["ok"]:
                raise BenchError("the warm-up rollout of bluegreen failed (exit %s):\n%s"
                                 % (r["rc"], "\n".join(r["stderr"][-15:])))
        if "baseline" in self.tools:
            self.point(SH_PROJECT)
            r = self.rollout_baseline("w0", index=-1)
            if not r["ok"]:
                raise BenchError("the warm-up deploy.sh rollout failed:\n%s" % json.dumps(r["hosts"], indent=1)[-3000:])
        self.timings["warm_up"] = round(time.monotonic() - t0, 1)

    # -- one rollout ---------------------------------------------------------
    def prepare(self, project: str, tag: str, index: int) -> Dict[str, float]:
        boots = {}
        for h in self.fleet.hosts:
            boots[h.name] = boot_delay(index, h.name) if index >= 0 else 1.0
            self.write_env(h, project, boots[h.name])
            if index >= 0:
                found = h.docker("image", "inspect", self.fleet.image(tag), check=False, timeout=30)
                if found.returncode == 0:
                    raise BenchError(f"{h.name} already has {self.fleet.image(tag)}: the rollout would not pull")
        return boots

    def rollout_bluegreen(self, tag: str, hooks: bool, index: int) -> dict:
        fl = self.fleet
        boots = self.prepare(BG_PROJECT, tag, index)
        argv = [sys.executable, str(self.pyz), "rollout", BG_PROJECT, tag, "--hosts",
                ",".join(h.name for h in fl.hosts), "--ssh-config", fl.ssh_config, "--json"]
        if hooks:
            argv += ["--before-host", f"{sys.executable} {HOOK} {fl.lb.socket} app out",
                     "--after-host", f"{sys.executable} {HOOK} {fl.lb.socket} app in"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("BLUEGREEN_")}
        lines: List[tuple] = []  # (seconds since start, line)
        start = time.monotonic()
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        self.running = proc

        def read_stderr() -> None:
            for raw in proc.stderr:
                lines.append((time.monotonic() - start, raw.decode("utf-8", "replace").rstrip("\n")))

        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()
        timer = threading.Timer(ROLLOUT_TIMEOUT, kill_group, (proc,))
        timer.start()
        try:
            out = proc.stdout.read().decode("utf-8", "replace")
            rc = proc.wait()
        finally:
            timer.cancel()
        wall = time.monotonic() - start
        reader.join(timeout=10)
        self.running = None
        try:
            report = json.loads(out)
        except ValueError:
            report = {"hosts": []}
        hosts = {r["target"]: r for r in report.get("hosts", [])}
        # The phases from the controller's own lines: preflight runs from its announcement to the pull's; the pull ends
        # with the last host's "... nothing that serves was changed." (pull_one prints it when that host's pull
        # is done; the first host's deploy starts right after).
        t_pre = next((t for t, ln in lines if re.match(r"^preflight on \d+ host\(s\)$", ln)), None)
        t_pull = next((t for t, ln in lines if re.match(r"^pull \S+ \S+ on \d+ host\(s\)$", ln)), None)
        pulled = [t for t, ln in lines if HOST_LINE_RE.match(ln) and ln.endswith("nothing that serves was changed.")]
        t_pulled = pulled[len(fl.hosts) - 1] if len(pulled) >= len(fl.hosts) else None
        pull_steps: Dict[str, float] = {}
        deploy_steps: Dict[str, Dict[str, float]] = {}
        for t, ln in lines:
            m = HOST_LINE_RE.match(ln)
            if not m:
                continue
            host, rest = m.groups()
            step = parse_steps([rest])
            if not step:
                continue
            if t_pulled is not None and t <= t_pulled and "pull" in step:
                pull_steps[host] = step["pull"]
            else:
                deploy_steps.setdefault(host, {}).update(step)
        switch = {name: hosts[name]["seconds"] for name in hosts if hosts[name].get("result") == "deployed"}
        ok = rc == 0 and len(switch) == len(fl.hosts)
        return {
            "tag": tag, "rc": rc, "ok": ok, "wall": round(wall, 3), "boot_delay": boots,
            "startup": round(t_pre, 3) if t_pre is not None else None,
            "preflight": round(t_pull - t_pre, 3) if t_pull is not None and t_pre is not None else None,
            "pull": round(t_pulled - t_pull, 3) if t_pull is not None and t_pulled is not None else None,
            "pull_step": pull_steps, "switch": switch, "deploy_steps": deploy_steps,
            "hosts": report.get("hosts", []),
            "serving": self.serving(),
            "stderr": [f"{t:7.2f} {ln}" for t, ln in lines][-80:],
        }

    def rollout_baseline(self, tag: str, index: int) -> dict:
        """The guide's way: `ssh HOST deploy.sh PROJECT TAG`, one host after the other; stop at the first failure."""
        fl = self.fleet
        boots = self.prepare(SH_PROJECT, tag, index)
        remote = (f'DEPLOY_ROOT="$BLUEGREEN_ROOT" NGINX="$BLUEGREEN_NGINX" bash {shlex.quote(str(self.deploy_sh))} '
                  f"{SH_PROJECT} {tag}")
        start = time.monotonic()
        hosts = []
        for h in fl.hosts:
            t0 = time.monotonic()
            try:
                proc = subprocess.run(fl.ssh_argv(h) + ["--", remote], stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      timeout=ROLLOUT_TIMEOUT, start_new_session=True)
                rc, err = proc.returncode, proc.stderr
            except subprocess.TimeoutExpired as exc:
                rc = None
                err = (exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")) + "\n(bench: killed)"
            seconds = time.monotonic() - t0
            steps = parse_steps(err.splitlines())
            hosts.append({"target": h.name, "rc": rc, "seconds": round(seconds, 3), "steps": steps,
                          "stderr": err.strip().splitlines()[-12:]})
            if rc != 0:
                break
        wall = time.monotonic() - start
        ok = len(hosts) == len(fl.hosts) and all(x["rc"] == 0 for x in hosts)
        pull_step = {x["target"]: x["steps"]["pull"] for x in hosts if "pull" in x["steps"]}
        return {
            "tag": tag, "rc": 0 if ok else 1, "ok": ok, "wall": round(wall, 3), "boot_delay": boots,
            "preflight": None,
            # The pulls run one after another, inside each host's deploy: their sum is the rollout's pull time.
            "pull": round(sum(pull_step.values()), 3) if ok else None,
            "pull_step": pull_step,
            "switch": {x["target"]: round(x["seconds"] - x["steps"].get("pull", 0.0), 3) for x in hosts if x["rc"] == 0},
            "deploy_steps": {x["target"]: x["steps"] for x in hosts},
            "hosts": hosts,
            "serving": self.serving(),
        }

    def serving(self) -> Dict[str, str]:
        out = {}
        for h in self.fleet.hosts:
            status, body = h.get("/version")
            out[h.name] = body.strip() if status == 200 else (f"HTTP {status}" if status else "no answer")
        return out

    def haproxy_counters(self) -> Dict[str, Dict[str, int]]:
        rows = {}
        for row in self.fleet.lb.stat():
            if row.get("pxname") == "app":
                rows[row["svname"]] = {k: int(row.get(k) or 0) for k in HAPROXY_COUNTERS}
        return rows

    # -- one series ------------------------------------------------------------
    def series(self, tool: str) -> dict:
        fl = self.fleet
        project = SH_PROJECT if tool == "baseline" else BG_PROJECT
        tags = self.tags[tool]
        log(f"\n== {tool}: {self.rollouts} rollouts of {project} over {', '.join(h.name for h in fl.hosts)} ==")
        self.serve(project)
        before = self.haproxy_counters()
        bound = int(self.rollouts * 120 + 120)  # the clients' own bound, far above a normal series
        url = fl.lb.url("/version")
        wrk = Wrk(url, bound, self.work)
        self.load.append(wrk)
        hey = Hey(url, bound, self.work / f"hey-{tool}.txt")
        self.load.append(hey)
        series_start = time.monotonic()
        rollouts = []
        try:
            time.sleep(SETTLE)
            for i, tag in enumerate(tags):
                if tool == "baseline":
                    r = self.rollout_baseline(tag, i)
                else:
                    r = self.rollout_bluegreen(tag, hooks=(tool == "bluegreen+hooks"), index=i)
                r["expected"] = {h.name: tag for h in fl.hosts}
                rollouts.append(r)
                flag = "" if r["ok"] and r["serving"] == r["expected"] else "  <-- unexpected"
                switch = "/".join(f"{r['switch'].get(h.name, 0):.2f}" for h in fl.hosts)
                log(f"  {i + 1}/{self.rollouts} {tag:<4} {'ok' if r['ok'] else 'FAILED (exit %s)' % r['rc']:<16} "
                    f"{r['wall']:6.2f}s  preflight {fmt(r['preflight'])}  pull {fmt(r['pull'])}  "
                    f"hosts {switch}  serving {' '.join(r['serving'].values())}{flag}")
                time.sleep(gap(i))
            time.sleep(SETTLE)
        finally:
            wrk.stop()
            hey.stop()
            self.load = []
        after = self.haproxy_counters()
        delta = {sv: {k: after[sv][k] - before.get(sv, {}).get(k, 0) for k in HAPROXY_COUNTERS} for sv in after}
        result = {"tool": tool, "project": project, "rollouts": rollouts, "wrk": wrk.result(), "hey": hey.result(),
                  "haproxy": delta, "series_wall": round(time.monotonic() - series_start, 1)}
        for name in ("wrk", "hey"):
            if result[name]["ended_early"]:
                log(f"  warning: {name} ended before the series did (its bound was {bound}s)")
        return result

    def run(self) -> None:
        self.warm_up()
        for tool in self.tools:
            self.results[tool] = self.series(tool)

    # -- clean-up ------------------------------------------------------------
    def close(self) -> None:
        for item in self.load:
            try:
                item.kill()
            except Exception as exc:  # keep cleaning
                log(f"bench-fleet: cleanup: {exc}")
        if self.running is not None:
            kill_group(self.running)
        if self.fleet is not None:
            try:
                self.fleet.stop()
            except Exception as exc:
                log(f"bench-fleet: cleanup of the fleet: {exc}")
        if self.local_images:
            stack.docker("rmi", *self.local_images, check=False)
        shutil.rmtree(self.work, ignore_errors=True)


# --------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------

def fmt(value: Optional[float], digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summarise(tool: str, res: dict) -> dict:
    rollouts = res["rollouts"]
    ok = [r for r in rollouts if r["ok"]]
    switches = [s for r in ok for s in r["switch"].values()]
    wrk, hey = res["wrk"], res["hey"]
    return {
        "tool": tool,
        "rollouts_ok": len(ok),
        "rollouts_failed": len(rollouts) - len(ok),
        "serving_mismatches": sum(1 for r in rollouts if r["serving"] != r["expected"]),
        "requests_wrk": wrk["requests"],
        "requests_hey": hey["requests"],
        "failed_wrk": wrk["failed"],
        "failed_wrk_socket": wrk["socket_errors"],
        "failed_wrk_status": wrk["status"],
        "failed_hey": hey["non_2xx"] + hey["error_count"],
        "failed_hey_non_2xx": hey["non_2xx"],
        "failed_hey_errors": hey["error_count"],
        "wall_median": median([r["wall"] for r in ok]),
        "wall_mean": statistics.mean([r["wall"] for r in ok]) if ok else None,
        "preflight_median": median([r["preflight"] for r in ok if r["preflight"] is not None]),
        "pull_median": median([r["pull"] for r in ok if r["pull"] is not None]),
        "pull_step_median": median([s for r in ok for s in r["pull_step"].values()]),
        "switch_median": median(switches),
        "switch_sum_median": median([sum(r["switch"].values()) for r in ok]),
        # what is left of the wall time: the controller's start-up (Python, reading the pyz) before it announces
        # the preflight, and its exit after the last host (the baseline has none: its parts add up by construction)
        "other_median": median([r["wall"] - (r["preflight"] or 0) - (r["pull"] or 0) - sum(r["switch"].values())
                                for r in ok]),
        "haproxy_5xx": sum(v["hrsp_5xx"] for sv, v in res["haproxy"].items() if sv == "BACKEND"),
        "haproxy_retries": sum(v["wretr"] for sv, v in res["haproxy"].items() if sv == "BACKEND"),
        "haproxy_redispatches": sum(v["wredis"] for sv, v in res["haproxy"].items() if sv == "BACKEND"),
    }


def table(rows: List[dict]) -> str:
    head = ["tool", "rollouts ok", "requests wrk / hey", "failed wrk (socket+non-2xx)", "failed hey (err+non-2xx)",
            "rollout s median", "vs baseline", "preflight", "pull", "per-host switch median", "3 switches", "other"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    base = next((r for r in rows if r["tool"] == "baseline"), None)
    for r in rows:
        ratio = "-"
        if base and r["tool"] != "baseline" and r["wall_median"] and base["wall_median"]:
            ratio = f"{r['wall_median'] / base['wall_median']:.2f}"
        cells = [
            r["tool"], f"{r['rollouts_ok']}/{r['rollouts_ok'] + r['rollouts_failed']}",
            f"{r['requests_wrk']} / {r['requests_hey']}",
            f"{r['failed_wrk']} ({r['failed_wrk_socket']}+{r['failed_wrk_status']})",
            f"{r['failed_hey']} ({r['failed_hey_errors']}+{r['failed_hey_non_2xx']})",
            fmt(r["wall_median"]), ratio, fmt(r["preflight_median"]), fmt(r["pull_median"]),
            fmt(r["switch_median"]), fmt(r["switch_sum_median"]), fmt(r["other_median"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def notes(rows: List[dict], results: dict) -> List[str]:
    out = []
    by_tool = {r["tool"]: r for r in rows}
    for r in rows:
        res = results[r["tool"]]
        if r["rollouts_failed"]:
            failed = [x for x in res["rollouts"] if not x["ok"]]
            out.append(f"{r['tool']}: {len(failed)} rollout(s) failed: "
                       + "; ".join(f"{x['tag']} exit {x['rc']}" for x in failed))
        if r["serving_mismatches"]:
            out.append(f"{r['tool']}: {r['serving_mismatches']} rollout(s) left a host serving something unexpected")
        if r["failed_wrk"] or r["failed_hey"]:
            wrk, hey = res["wrk"], res["hey"]
            hey_bad = {k: v for k, v in hey["statuses"].items() if not k.startswith("2")}
            out.append(f"{r['tool']}: wrk connect {wrk['connect']}, read {wrk['read']}, write {wrk['write']}, "
                       f"timeout {wrk['timeout']}, non-2xx/3xx {wrk['status']}; hey statuses {hey_bad or '{}'}, "
                       f"errors {hey['errors'] or '{}'}")
        out.append(f"{r['tool']}: haproxy backend: {r['haproxy_5xx']} 5xx answers, {r['haproxy_retries']} retries, "
                   f"{r['haproxy_redispatches']} redispatches; pull step median per host {fmt(r['pull_step_median'])}s")
    base = by_tool.get("baseline")
    for tool in ("bluegreen+hooks", "bluegreen"):
        r = by_tool.get(tool)
        if r and base and r["wall_median"] and base["wall_median"]:
            out.append(f"rollout wall time {tool}/baseline: {r['wall_median'] / base['wall_median']:.2f} by median, "
                       f"{r['wall_mean'] / base['wall_mean']:.2f} by mean")
    hooks, plain = by_tool.get("bluegreen+hooks"), by_tool.get("bluegreen")
    if hooks and plain:
        out.append(f"failed requests with hooks / without: wrk {hooks['failed_wrk']} / {plain['failed_wrk']}, "
                   f"hey {hooks['failed_hey']} / {plain['failed_hey']}; per-host switch median "
                   f"{fmt(hooks['switch_median'])}s / {fmt(plain['switch_median'])}s")
    return out


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------

def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rollouts", type=int, default=3, metavar="K", help="rollouts per tool (default 3)")
    parser.add_argument("--layer-mb", type=int, default=LAYER_MB, metavar="MB",
                        help=f"MiB of random bytes in every measured image's extra layer (default {LAYER_MB})")
    parser.add_argument("--pull-mbit", type=int, default=PULL_MBIT, metavar="MBIT",
                        help=f"each host's download rate from the registry in Mbit/s, 0 for no limit (default {PULL_MBIT})")
    parser.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated, from {', '.join(TOOLS)} (default: all)")
    parser.add_argument("--json", default=str(DEFAULT_JSON), metavar="PATH",
                        help="where to write the table and raw numbers (default dist/bench-fleet.json)")
    args = parser.parse_args(argv)
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = [t for t in tools if t not in TOOLS]
    if unknown or not tools:
        parser.error(f"--tools: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(TOOLS)}")
    tools = [t for t in TOOLS if t in tools]
    if not 1 <= args.rollouts <= 10:
        parser.error("--rollouts must be 1 to 10 (the whole run must stay below 15 minutes)")
    if not 0 <= args.layer_mb <= 200:
        parser.error("--layer-mb must be 0 to 200")
    if not 0 <= args.pull_mbit <= 100000:
        parser.error("--pull-mbit must be 0 (no limit) to 100000")
    if os.geteuid() != 0:
        log("bench-fleet: must run as root (network namespaces, dockerd, sshd)")
        return 2
    missing = [t for t in ("docker", "wrk", "hey", "haproxy", "ssh", "curl", "bash", "tc")
               if shutil.which(t) is None and not os.path.exists(f"/usr/sbin/{t}")]
    if not PYZ.exists():
        missing.append(f"{PYZ} (run `make build`)")
    if missing:
        log(f"bench-fleet: missing {', '.join(missing)}; `make bench-fleet` installs and builds them")
        return 2

    # Installed before the fleet starts, so that SIGTERM/SIGHUP also run the clean-up below (the fleet keeps
    # a handler that is already there).
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    started = time.monotonic()
    load_before = os.getloadavg()
    bench = FleetBench(args.rollouts, args.layer_mb, tools, args.pull_mbit)
    measured = measured_build(bench.pyz)
    def body() -> None:
        log(f"bench-fleet: {args.rollouts} rollouts per tool ({', '.join(tools)}), {HOSTS} hosts, "
            f"{args.layer_mb} MiB layer per tag, pulls at {args.pull_mbit or 'unlimited'} Mbit/s per host; work dir {bench.work}")
        bench.setup()
        bench.run()

    def close() -> None:
        t0 = time.monotonic()
        bench.close()
        bench.timings["cleanup"] = round(time.monotonic() - t0, 1)

    rc = guarded("bench-fleet", body, close)
    if rc:
        return rc

    rows = [summarise(tool, bench.results[tool]) for tool in tools]
    text = table(rows)
    extra = notes(rows, bench.results)
    wall = time.monotonic() - started
    load_after = os.getloadavg()
    limit = f"pulls at {args.pull_mbit} Mbit/s per host" if args.pull_mbit else "pulls not rate-limited"
    log(f"\n== bench-fleet: {args.rollouts} rollouts per tool over {HOSTS} hosts behind haproxy, {args.layer_mb} MiB "
        f"layer per tag, {limit}; load through haproxy: wrk -c {WRK_CONNECTIONS} -t {WRK_THREADS} (one request per connection "
        f"every {WRK_DELAY_MS} ms) + hey -c {HEY_WORKERS} -q {HEY_QPS} GET /version ==\n")
    log(text)
    log("")
    for line in extra:
        log(f"- {line}")
    log(f"- wall time {wall:.0f}s (fleet start {bench.timings.get('fleet_start')}s, images {bench.timings.get('images')}s, "
        f"warm-up {bench.timings.get('warm_up')}s, clean-up {bench.timings.get('cleanup')}s); "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "rollouts_per_tool": args.rollouts,
        "tools": tools,
        "settings": {"hosts": HOSTS, "layer_mb": args.layer_mb, "pull_mbit": args.pull_mbit, "app": APP, "boot_range": BOOT_RANGE,
                     "gap_range": GAP_RANGE, "settle": SETTLE, "health_timeout": HEALTH_TIMEOUT,
                     "stop_timeout": STOP_TIMEOUT, "wrk": {"connections": WRK_CONNECTIONS, "threads": WRK_THREADS,
                                                           "delay_ms": WRK_DELAY_MS},
                     "hey": {"workers": HEY_WORKERS, "qps_per_worker": HEY_QPS}},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_before": load_before, "loadavg_after": load_after},
        "measured": measured,
        "wall_seconds": round(wall, 1),
        "timings": bench.timings,
        "table": text,
        "notes": extra,
        "rows": rows,
        "raw": bench.results,
    }, indent=2) + "\n")
    log(f"- raw numbers: {out}")
    if wall > BUDGET:
        log(f"- warning: the run took {wall:.0f}s, more than the {BUDGET}s budget")
    return 0


if __name__ == "__main__":
    sys.exit(main())
