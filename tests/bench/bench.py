#!/usr/bin/env python3
"""`make bench`: K consecutive deploys under load, bluegreen against the seed-style deploy.sh.

A benchmark, not a test (pytest does not collect it). For every mode it deploys K times with
dist/bluegreen.pyz and K times with tests/bench/deploy.sh (the guide's six steps in plain bash),
each against its own project, ports and nginx server block on one private stack, while

  * hey keeps ~200 req/s of keep-alive GET /version going through nginx,
  * a thread keeps one GET /cgi-bin/slow?1 in flight at all times (a new connection each; --slow S
    makes it take S seconds instead of 1),
  * nginx logs every answer of that server block to its own access log,

and prints one table (docs/bench.md explains the columns). Modes:

  graceful         the app finishes its in-flight requests on SIGTERM
  drops-in-flight  the app exits at once on SIGTERM, cutting what it was serving
  broken           every other deploy is an image that never becomes healthy (HEALTH_TIMEOUT=3)

Everything is private and on 127.0.0.1: a local docker-registry, a private nginx, a throwaway deploy
root; all of it is removed at the end, also on Ctrl-C. Exits non-zero only when the bench itself
broke (the stack did not come up, a warm-up deploy failed, hey misbehaved), never on the numbers.

    python3 tests/bench/bench.py [--deploys K] [--modes graceful,drops-in-flight,broken] [--slow S] [--json PATH] [--pyz PATH]
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import math
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
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))

import stack  # noqa: E402  (tests/stack.py, the harness shared with the tests and the demo)

sys.path.insert(0, str(REPO))
from bluegreen.nginx import add_header_line, new_token, render_upstream  # noqa: E402

PYZ = REPO / "dist" / "bluegreen.pyz"
BASELINE = HERE / "deploy.sh"
DEFAULT_JSON = REPO / "dist" / "bench.json"

MODES = ("graceful", "drops-in-flight", "broken")
TOOLS = ("bluegreen", "baseline")
SHORT = {"bluegreen": "bg", "baseline": "sh"}
STEPS = ("pull", "start", "health", "switch", "drain", "verify", "retire", "record")

BOOT_DELAY = 2  # "a busybox app that boots in 2 s": the images' default, used by the warm-up deploy
# Each measured deploy boots in its own time, drawn from this range with a seed per (mode, deploy), the
# same for bluegreen and the baseline: a real app's boot time is not a whole number of seconds, so a
# fixed 2.0 s would line up exactly with the baseline's once-a-second curl and hide what it costs.
BOOT_RANGE = (1.5, 2.5)


def boot_delay(mode: str, index: int) -> float:
    return round(random.Random(f"{mode}-{index}").uniform(*BOOT_RANGE), 2)
HEY_WORKERS, HEY_QPS = 4, 50  # hey -c 4 -q 50: ~200 req/s in all
SLOW_SECONDS = 1.0  # default length of the request kept in flight across every switch (--slow)
SETTLE = 1.0  # seconds of load before the first and after the last deploy of a series
GAP_RANGE = (0.5, 1.5)  # seconds between two deploys, drawn per deploy (see gap())


def gap(mode: str, index: int) -> float:
    """The pause after deploy `index`, seeded like boot_delay.

    A fixed pause phase-locks the deploys to the slow client's back-to-back requests: bluegreen's
    drain ends when the in-flight slow request does, so every deploy would then find that request
    at the same point of its life, decided by the boot time. Real deploys start at random moments.
    """
    return round(random.Random(f"gap-{mode}-{index}").uniform(*GAP_RANGE), 2)
DEPLOY_TIMEOUT = 120  # one deploy; it is recorded as failed past this
HEALTH_TIMEOUT = {"graceful": 30, "drops-in-flight": 30, "broken": 3}
APP = {"graceful": "graceful", "drops-in-flight": "ok", "broken": "graceful"}
STOP_TIMEOUT = 10

STEP_RE = re.compile(r"^\[(\d)/6\] (\S+) .*: (FAILED after )?([0-9]+(?:\.[0-9]+)?)s$")


class BenchError(Exception):
    """The bench itself broke (not a bad number)."""


def log(text: str) -> None:
    print(text, flush=True)


# --------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------

class SlowClient(threading.Thread):
    """Keeps one slow request in flight through nginx at all times, a new connection each."""

    def __init__(self, url: str, bound: float) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.bound = bound
        self.stop = threading.Event()
        self.ok = 0
        self.bodies: collections.Counter = collections.Counter()
        self.failures: collections.Counter = collections.Counter()

    def run(self) -> None:
        deadline = time.monotonic() + self.bound  # bounded even if nobody stops us
        while not self.stop.is_set() and time.monotonic() < deadline:
            status, body = stack.http_get(self.url, timeout=15)
            if status == 200:
                self.ok += 1
                self.bodies[body.strip()] += 1
            else:
                self.failures[f"HTTP {status}" if status else body[:80]] += 1
                time.sleep(0.05)  # no busy loop while nothing answers

    def result(self) -> dict:
        return {"ok": self.ok, "failed": sum(self.failures.values()), "failures": dict(self.failures),
                "bodies": dict(self.bodies)}


class Hey:
    """`hey` as the steady keep-alive client; stopped with SIGINT, after which it prints its report."""

    def __init__(self, url: str, bound: int, out: Path) -> None:
        self.argv = ["hey", "-z", f"{bound}s", "-c", str(HEY_WORKERS), "-q", str(HEY_QPS), "-t", "10", url]
        self.out = out
        with open(out, "wb") as fh:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT)
        self.started = time.monotonic()
        self.ended_early = False

    def stop(self) -> None:
        if self.proc.poll() is not None:
            self.ended_early = True
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise BenchError(f"hey did not stop within 20 s of SIGINT ({shlex.join(self.argv)})")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def result(self) -> dict:
        text = self.out.read_text(errors="replace")
        if "Summary:" not in text:
            raise BenchError(f"hey printed no report ({shlex.join(self.argv)}):\n{text[-2000:]}")
        statuses: collections.Counter = collections.Counter()
        errors: collections.Counter = collections.Counter()
        section = None
        for line in text.splitlines():
            if line.startswith("Status code distribution:"):
                section = statuses
                continue
            if line.startswith("Error distribution:"):
                section = errors
                continue
            if section is None:
                continue
            match = re.match(r"^\s+\[(\d+)\]\s+(.*)$", line)
            if not match:
                if line.strip():
                    section = None
                continue
            count, what = int(match.group(1)), match.group(2).strip()
            if section is statuses:
                code = re.match(r"^(\d+) responses$", what)
                if not code:
                    raise BenchError(f"cannot read hey's status line {line!r}")
                statuses[match.group(1)] += int(code.group(1))  # "[200]\t400 responses"
            else:
                errors[re.sub(r'^Get "[^"]*": ', "", what)] += count
        rps = re.search(r"Requests/sec:\s+([0-9.]+)", text)
        ok = sum(n for code, n in statuses.items() if code.startswith("2"))
        return {
            "statuses": dict(statuses),
            "errors": dict(errors),
            "requests": sum(statuses.values()) + sum(errors.values()),
            "non_2xx": sum(statuses.values()) - ok,
            "error_count": sum(errors.values()),
            "rps": float(rps.group(1)) if rps else None,
            "ended_early": self.ended_early,
        }


def nginx_statuses(path: Path, offset: int) -> dict:
    """Status counts (and non-2xx by path) of the access-log lines written after `offset`."""
    statuses: collections.Counter = collections.Counter()
    bad: collections.Counter = collections.Counter()
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read().decode("utf-8", "replace")
    except FileNotFoundError:
        data = ""
    for line in data.splitlines():
        match = re.search(r'"[A-Z]+ (\S+) [^"]*" (\d{3}) ', line)
        if not match:
            continue
        path_, code = match.groups()
        statuses[code] += 1
        if not code.startswith("2"):
            bad[f"{code} {path_}"] += 1
    return {"statuses": dict(statuses), "non_2xx": sum(bad.values()), "non_2xx_by_path": dict(bad)}


# --------------------------------------------------------------------------
# the stack and the projects
# --------------------------------------------------------------------------

class Project:
    def __init__(self, mode: str, tool: str, ports: List[int], image: str, work: Path) -> None:
        self.mode, self.tool = mode, tool
        self.name = f"bench-{SHORT[tool]}-{'drops' if mode == 'drops-in-flight' else mode}"
        self.blue, self.green, self.listen = ports
        self.image = image
        self.access_log = work / "nginx" / f"access-{self.name}.log"

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.listen}{path}"

    def env_text(self) -> str:
        return (
            f"IMAGE={self.image}\nBLUE_PORT={self.blue}\nGREEN_PORT={self.green}\nAPP_PORT=8080\n"
            f"HEALTH_PATH=/api/health\nHEALTH_TIMEOUT={HEALTH_TIMEOUT[self.mode]}\nSTOP_TIMEOUT={STOP_TIMEOUT}\n"
            f"LOG_DIR=\nNGINX_URL=http://127.0.0.1:{self.listen}\n"
        )


def percentile(values: List[float], pct: float) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def median(values: List[float]) -> Optional[float]:
    return statistics.median(values) if values else None


def parse_steps(stderr: str) -> Dict[str, float]:
    steps: Dict[str, float] = {}
    for line in stderr.splitlines():
        match = STEP_RE.match(line.strip())
        if match:
            steps[match.group(2)] = float(match.group(4))
    return steps


class Bench:
    def __init__(self, deploys: int, modes: List[str], slow_path: str, pyz: Path = PYZ) -> None:
        self.deploys = deploys
        self.modes = modes
        self.slow_path = slow_path
        self.work = Path(tempfile.mkdtemp(prefix="bluegreen-bench-"))
        self.work.chmod(0o755)  # nginx workers run as nobody
        self.root = self.work / "root"
        # A snapshot: a `make build` while the bench runs must not change what is measured.
        self.pyz = self.work / "bluegreen.pyz"
        shutil.copyfile(pyz, self.pyz)
        self.registry: Optional[stack.Registry] = None
        self.nginx: Optional[stack.Nginx] = None
        self.images: List[str] = []
        self.projects: Dict[tuple, Project] = {}
        self.load: list = []  # running Hey / SlowClient, for the cleanup
        self.results: Dict[str, Dict[str, dict]] = {}

    # -- set-up ------------------------------------------------------------
    def setup(self) -> None:
        start_private_stack(self)
        t0 = time.monotonic()
        repos = self.build_images()
        log(f"bench: images built and pushed to {self.registry.open_addr} in {time.monotonic() - t0:.1f}s")
        ports: set = set()
        while len(ports) < 3 * len(self.modes) * len(TOOLS):
            ports.add(stack.free_port())
        free = sorted(ports)
        for mode in self.modes:
            for tool in TOOLS:
                proj = Project(mode, tool, [free.pop(0) for _ in range(3)], repos[mode], self.work)
                self.projects[(mode, tool)] = proj
                self.add_project(proj)

    def build_images(self) -> Dict[str, str]:
        """One repository per mode: v1 and v2 of the mode's app, and `bad` (never healthy) for broken."""
        reg = self.registry.open_addr
        repos = {mode: f"{reg}/bluegreen-bench/{mode}" for mode in self.modes}
        built: Dict[tuple, str] = {}  # (behaviour, version) -> first ref built
        wanted = []
        for mode in self.modes:
            wanted += [(mode, "v1", APP[mode]), (mode, "v2", APP[mode])]
            if mode == "broken":
                wanted.append((mode, "bad", "unhealthy"))
        for mode, version, behaviour in wanted:
            ref = f"{repos[mode]}:{version}"
            first = built.get((behaviour, version))
            if first is None:
                stack.build_app_image(ref, version, behaviour, boot_delay=BOOT_DELAY)
                built[(behaviour, version)] = ref
            else:
                stack.docker("tag", first, ref)
                stack.push_image(ref)
            self.images.append(ref)
        return repos

    def add_project(self, proj: Project) -> None:
        """What a server's one-time set-up leaves: the env file, a placeholder upstream, the server block."""
        (self.root / "projects" / f"{proj.name}.env").write_text(proj.env_text())
        (self.root / "nginx" / "conf.d" / f"{proj.name}-upstream.conf").write_text(
            render_upstream(name=proj.name, port=proj.blue, project=proj.name, colour="-", tag="-",
                            token=new_token(), down=True)
        )
        extra = f"{add_header_line(proj.name)}\n    access_log {proj.access_log};"
        self.nginx.add_server(proj.name, proj.listen, proj.name, extra=extra)

    # -- deploys -------------------------------------------------------------
    def deploy(self, proj: Project, tag: str, boot: Optional[float] = None) -> dict:
        # The app's boot time travels as app environment in the project env file, read by both tools.
        (self.root / "projects" / f"{proj.name}.env").write_text(
            proj.env_text() + (f"BOOT_DELAY={boot}\n" if boot is not None else ""))
        env = dict(os.environ)
        if proj.tool == "bluegreen":
            argv = [sys.executable, str(self.pyz), proj.name, tag]
            env.update(BLUEGREEN_ROOT=str(self.root), BLUEGREEN_NGINX=shlex.join(self.nginx.cmd))
        else:
            argv = ["bash", str(BASELINE), proj.name, tag]
            env.update(DEPLOY_ROOT=str(self.root), NGINX=shlex.join(self.nginx.cmd))
        start = time.monotonic()
        try:
            proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, timeout=DEPLOY_TIMEOUT)
            rc, out, err = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as exc:
            rc = None
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            err = (exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")) + \
                f"\n(bench: killed after {DEPLOY_TIMEOUT}s)"
        wall = time.monotonic() - start
        steps = parse_steps(err)
        # What the deploy spends outside the steps it times: interpreter start-up, imports, config, lock, checks.
        return {"tag": tag, "rc": rc, "ok": rc == 0, "wall": round(wall, 3), "steps": steps,
                "outside_steps": round(wall - sum(steps.values()), 3),
                "stderr": err.strip().splitlines()[-30:], "stdout": out.strip().splitlines()[-3:]}

    def serving(self, proj: Project) -> str:
        status, body = stack.http_get(proj.url("/version"), timeout=5)
        return body.strip() if status == 200 else (f"HTTP {status}" if status else "no answer")

    def plan(self, mode: str) -> List[str]:
        tags = []
        good = ["v2", "v1"]
        for i in range(self.deploys):
            if mode == "broken" and i % 2 == 1:
                tags.append("bad")
            else:
                tags.append(good[len([t for t in tags if t != "bad"]) % 2])
        return tags

    def series(self, mode: str, tool: str) -> dict:
        proj = self.projects[(mode, tool)]
        log(f"\n== {mode} / {tool}: {proj.name} on 127.0.0.1:{proj.listen}, {self.deploys} deploys ==")
        warm = self.deploy(proj, "v1")
        if not warm["ok"]:
            raise BenchError(f"the warm-up deploy of {proj.name} v1 failed (exit {warm['rc']}):\n"
                             + "\n".join(warm["stderr"][-8:]))
        deadline = time.monotonic() + 15
        while self.serving(proj) != "v1":
            if time.monotonic() > deadline:
                raise BenchError(f"after the warm-up deploy nginx does not serve v1 on {proj.url('/version')} "
                                 f"(answer: {self.serving(proj)})")
            time.sleep(0.1)

        offset = proj.access_log.stat().st_size if proj.access_log.exists() else 0
        bound = int(self.deploys * 30 + 120)  # the load's own bound, far above a normal series
        hey = Hey(proj.url("/version"), bound, self.work / f"hey-{proj.name}.txt")
        slow = SlowClient(proj.url(self.slow_path), bound)
        self.load = [hey, slow]
        slow.start()
        series_start = time.monotonic()
        deploys = []
        last_good = "v1"
        try:
            time.sleep(SETTLE)
            for i, tag in enumerate(self.plan(mode)):
                d = self.deploy(proj, tag, boot_delay(mode, i))
                d["boot_delay"] = boot_delay(mode, i)
                d["expected_ok"] = tag != "bad"
                d["serving_after"] = self.serving(proj)
                if d["ok"]:
                    last_good = tag
                d["serving_expected"] = last_good
                deploys.append(d)
                flag = "" if d["ok"] == d["expected_ok"] and d["serving_after"] == last_good else "  <-- unexpected"
                log(f"  {i + 1:>3}/{self.deploys} {tag:<4} {'ok' if d['ok'] else 'FAILED (exit %s)' % d['rc']:<16} "
                    f"{d['wall']:6.2f}s  serving {d['serving_after']}{flag}")
                time.sleep(gap(mode, i))
            time.sleep(SETTLE)
        finally:
            slow.stop.set()
            slow.join(timeout=20)
            hey.stop()
            self.load = []
        if slow.is_alive():
            raise BenchError("the slow-request client did not stop within 20 s")
        series_wall = time.monotonic() - series_start
        result = {
            "project": proj.name,
            "deploys": deploys,
            "hey": hey.result(),
            "slow": slow.result(),
            "nginx": nginx_statuses(proj.access_log, offset),
            "series_wall": round(series_wall, 1),
            "warmup": warm,
        }
        if result["hey"]["ended_early"]:
            log(f"  warning: hey ended before the series did (its bound was {bound}s)")
        stack.cleanup_project(proj.name)
        return result

    def run(self) -> None:
        for mode in self.modes:
            self.results[mode] = {}
            for tool in TOOLS:
                self.results[mode][tool] = self.series(mode, tool)

    # -- clean-up ------------------------------------------------------------
    def close(self) -> None:
        for item in self.load:
            try:
                if isinstance(item, Hey):
                    item.kill()
                else:
                    item.stop.set()
            except Exception as exc:  # keep cleaning
                log(f"bench: cleanup: {exc}")
        for proj in self.projects.values():
            try:
                stack.cleanup_project(proj.name)
            except Exception as exc:
                log(f"bench: cleanup of {proj.name}: {exc}")
        for stop in (self.nginx and self.nginx.stop, self.registry and self.registry.stop):
            if stop:
                try:
                    stop()
                except Exception as exc:
                    log(f"bench: cleanup: {exc}")
        if self.images:
            stack.docker("rmi", *self.images, check=False)
        shutil.rmtree(self.work, ignore_errors=True)


# --------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------

def fmt(value: Optional[float], digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summarise(mode: str, tool: str, res: dict) -> dict:
    deploys = res["deploys"]
    ok = [d for d in deploys if d["ok"]]
    failed = [d for d in deploys if not d["ok"]]
    walls = [d["wall"] for d in ok]
    steps = {s: median([d["steps"][s] for d in ok if s in d["steps"]]) for s in STEPS}
    hey, slow, ngx = res["hey"], res["slow"], res["nginx"]
    return {
        "mode": mode,
        "tool": tool,
        "deploys_ok": len(ok),
        "deploys_failed": len(failed),
        "unexpected_deploys": sum(1 for d in deploys if d["ok"] != d["expected_ok"]),
        "failed_deploys_left_old_serving": sum(1 for d in failed if d["serving_after"] == d["serving_expected"]),
        "serving_mismatches": sum(1 for d in deploys if d["serving_after"] != d["serving_expected"]),
        "requests_hey": hey["requests"],
        "requests_slow": slow["ok"] + slow["failed"],
        "failed_hey_non_2xx": hey["non_2xx"],
        "failed_hey_errors": hey["error_count"],
        "failed_slow": slow["failed"],
        "failed_requests": hey["non_2xx"] + hey["error_count"] + slow["failed"],
        "nginx_non_2xx": ngx["non_2xx"],
        "wall_median": median(walls),
        "wall_mean": sum(walls) / len(walls) if walls else None,
        "wall_p90": percentile(walls, 90),
        "failed_wall_median": median([d["wall"] for d in failed]),
        "step_median": steps,
        "outside_steps_median": median([d["outside_steps"] for d in ok if "outside_steps" in d]),
    }


def table(rows: List[dict]) -> str:
    head = ["mode", "tool", "deploys ok/failed", "requests hey+slow", "failed requests (hey non-2xx+hey err+slow)",
            "nginx non-2xx", "deploy s median", "mean", "p90", "bg/base median", "bg/base mean", *STEPS, "outside steps"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    base = {r["mode"]: r for r in rows if r["tool"] == "baseline"}
    for r in rows:
        deploys = f"{r['deploys_ok']}/{r['deploys_failed']}"
        if r["unexpected_deploys"]:
            deploys += f" ({r['unexpected_deploys']} unexpected)"
        ratios = []
        for key in ("wall_median", "wall_mean"):
            theirs = base[r["mode"]][key] if r["mode"] in base else None
            ok = r["tool"] == "bluegreen" and r[key] and theirs
            ratios.append(f"{r[key] / theirs:.2f}" if ok else "-")
        cells = [
            r["mode"], r["tool"], deploys, f"{r['requests_hey']}+{r['requests_slow']}",
            f"{r['failed_requests']} ({r['failed_hey_non_2xx']}+{r['failed_hey_errors']}+{r['failed_slow']})",
            str(r["nginx_non_2xx"]), fmt(r["wall_median"]), fmt(r["wall_mean"]), fmt(r["wall_p90"]), *ratios,
            *(fmt(r["step_median"][s]) for s in STEPS), fmt(r["outside_steps_median"], 3),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def notes(rows: List[dict], results: dict) -> List[str]:
    out = []
    for r in rows:
        res = results[r["mode"]][r["tool"]]
        where = f"{r['mode']}/{r['tool']}"
        if r["mode"] == "broken":
            out.append(f"{where}: {r['deploys_failed']} failed deploys, the old version kept serving after "
                       f"{r['failed_deploys_left_old_serving']}; time to fail median {fmt(r['failed_wall_median'])}s")
        if r["serving_mismatches"]:
            out.append(f"{where}: {r['serving_mismatches']} deploys left nginx serving something unexpected")
        if r["failed_requests"] or r["nginx_non_2xx"]:
            what = dict(res["hey"]["statuses"])
            what = {k: v for k, v in what.items() if not k.startswith("2")}
            details = []
            if what:
                details.append(f"hey statuses {what}")
            if res["hey"]["errors"]:
                details.append(f"hey errors {res['hey']['errors']}")
            if res["slow"]["failures"]:
                details.append(f"slow {res['slow']['failures']}")
            if res["nginx"]["non_2xx_by_path"]:
                details.append(f"nginx {res['nginx']['non_2xx_by_path']}")
            out.append(f"{where}: " + "; ".join(details))
        if res["hey"]["ended_early"]:
            out.append(f"{where}: hey stopped before the series ended (bench bound too low)")
    return out


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------

def start_private_stack(bench) -> None:
    """dockerd, then a local registry and a private nginx that includes ROOT/nginx/conf.d, under `bench.work`:
    the stack every bench deploys on. Each is set on `bench` before it starts, so its close() stops what did."""
    stack.ensure_dockerd()
    (bench.root / "projects").mkdir(parents=True)
    (bench.root / "nginx" / "conf.d").mkdir(parents=True)
    (bench.work / "registry").mkdir()
    (bench.work / "nginx").mkdir()
    bench.registry = stack.Registry(str(bench.work / "registry"))
    bench.nginx = stack.Nginx(str(bench.work / "nginx"), includes=[str(bench.root / "nginx" / "conf.d" / "*.conf")])
    bench.registry.start()
    bench.nginx.start()


def guarded(name: str, body: Callable[[], None], close: Callable[[], None]) -> int:
    """Run a bench's measuring part: 0; 130 on Ctrl-C or SIGTERM; 1 when the bench itself broke (one line, and
    the traceback of an unexpected error). The clean-up always runs, and a second Ctrl-C cannot cut it short
    (each of its steps is bounded)."""
    rc = 0
    try:
        body()
    except KeyboardInterrupt:
        log(f"\n{name}: interrupted; cleaning up")
        rc = 130
    except BenchError as exc:
        log(f"\n{name}: broke: {exc}")
        rc = 1
    except Exception as exc:  # the stack did not come up, docker failed, ...
        log(f"\n{name}: broke: {type(exc).__name__}: {exc}")
        traceback.print_exc()
        rc = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        close()
        signal.signal(signal.SIGINT, signal.default_int_handler)
    return rc


def measured_build(pyz: Path) -> dict:
    """Which bluegreen was measured: the pyz's sha256 and the commit (dirty if bluegreen/ has local edits)."""
    def git(*args: str) -> str:
        proc = subprocess.run(["git", "-C", str(REPO), *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True, check=False)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    return {"pyz_sha256": hashlib.sha256(pyz.read_bytes()).hexdigest(), "commit": git("rev-parse", "HEAD"),
            "bluegreen_dirty": bool(git("status", "--porcelain", "--", "bluegreen", "build.py"))}


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deploys", type=int, default=20, metavar="K", help="deploys per series (default 20)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated, from {', '.join(MODES)} (default: all)")
    parser.add_argument("--json", default=str(DEFAULT_JSON), metavar="PATH",
                        help="where to write the table and raw numbers (default dist/bench.json)")
    parser.add_argument("--pyz", type=Path, default=PYZ, metavar="PATH",
                        help="the bluegreen.pyz to measure (default dist/bluegreen.pyz; another build to compare)")
    parser.add_argument("--slow", type=float, default=SLOW_SECONDS, metavar="SECONDS",
                        help=f"how long the request kept in flight across every switch takes (default {SLOW_SECONDS:g})")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        parser.error(f"--modes: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(MODES)}")
    if args.deploys < 1:
        parser.error("--deploys must be at least 1")
    if not 0.2 <= args.slow <= 10:
        parser.error("--slow must be between 0.2 and 10 seconds (it must outlast nginx's 0.1 s switch)")
    slow_path = f"/cgi-bin/slow?{args.slow:g}"
    missing = [t for t in ("docker", "docker-registry", "nginx", "hey", "curl", "bash", "htpasswd")
               if shutil.which(t) is None and not os.path.exists(f"/usr/sbin/{t}")]
    if not os.path.exists(stack.BUSYBOX):
        missing.append(stack.BUSYBOX)
    if not args.pyz.exists():
        missing.append(f"{args.pyz} (run `make build`)")
    if missing:
        log(f"bench: missing {', '.join(missing)}; `make bench` installs and builds them")
        return 2

    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    started = time.monotonic()
    load_before = os.getloadavg()
    bench = Bench(args.deploys, modes, slow_path, args.pyz)
    measured = measured_build(bench.pyz)  # before anything runs: the snapshot and the commit it came from
    if args.pyz.resolve() != PYZ.resolve():
        measured["pyz"] = str(args.pyz)  # another build: the commit is the bench's, not necessarily the pyz's
    def body() -> None:
        log(f"bench: {args.deploys} deploys per series, modes {', '.join(modes)}; work dir {bench.work}")
        bench.setup()
        bench.run()

    rc = guarded("bench", body, bench.close)
    if rc:
        return rc

    rows = [summarise(mode, tool, bench.results[mode][tool]) for mode in modes for tool in TOOLS]
    text = table(rows)
    extra = notes(rows, bench.results)
    wall = time.monotonic() - started
    load_after = os.getloadavg()
    log(f"\n== bench: {args.deploys} deploys per series; load: hey -c {HEY_WORKERS} -q {HEY_QPS} GET /version "
        f"+ one GET {slow_path} always in flight ==\n")
    log(text)
    log("")
    for line in extra:
        log(f"- {line}")
    log("- outside steps (median of the successful deploys: wall time minus the sum of the step times the tool prints): "
        + ", ".join(f"{r['mode']}/{r['tool']} {fmt(r['outside_steps_median'], 3)}s" for r in rows))
    log(f"- wall time {wall:.0f}s; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "deploys_per_series": args.deploys,
        "modes": modes,
        "settings": {"boot_delay": BOOT_DELAY, "boot_range": BOOT_RANGE, "hey_workers": HEY_WORKERS, "hey_qps_per_worker": HEY_QPS,
                     "slow_path": slow_path, "gap_range": GAP_RANGE, "health_timeout": HEALTH_TIMEOUT, "app": APP,
                     "stop_timeout": STOP_TIMEOUT},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_before": load_before, "loadavg_after": load_after},
        "measured": measured,
        "wall_seconds": round(wall, 1),
        "table": text,
        "notes": extra,
        "rows": rows,
        "raw": bench.results,
    }, indent=2) + "\n")
    log(f"- raw numbers: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
