#!/usr/bin/env python3
"""`make bench-watch`: a bad release under steady load, caught by bluegreen's watch or rolled back by hand.

A benchmark, not a test (pytest does not collect it). On one private stack (tests/stack.py: dockerd, a
local registry, a private nginx) one project serves v1 while a client keeps 160 req/s of GET /version going
through nginx on one keep-alive connection (--qps, --connections), recording every answer with its time.
Then, for each bad release (an image whose health check passes and whose other answers fail: every request
with FAIL_EVERY=1, every 10th with FAIL_EVERY=10, given as app environment in the env file) and each tool,
K times, in alternating order:

  watch  `bluegreen deploy PROJECT bad` with WATCH_SECONDS / WATCH_MAX_ERROR_RATE / WATCH_MIN_REQUESTS:
         the deploy switches, judges what nginx served from the new container and switches back by itself
         to v1, which kept running
  seed   the seed's flow: `bluegreen deploy PROJECT bad` without a watch, a fixed detection delay
         (--detect-delay, 60 s) counted from the first answer of the bad release, then the manual rollback:
         `bluegreen deploy PROJECT v1`, which pulls and boots v1 again

It prints one table (failed requests, time from the switch to recovery, time from the watch's threshold being
crossed in nginx's log to the last answer of the bad release, the recovery action's wall time) with the
watch/seed ratios, and writes every raw number as JSON. Everything is removed at the end, also on Ctrl-C or
SIGTERM. Exits non-zero only when the bench itself broke, never because of a number.

    python3 tests/bench/bench_watch.py [--runs K] [--detect-delay S] [--fail-every 1,10] [--tools watch,seed]
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import platform
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
from pathlib import Path
from typing import Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(HERE))

import stack  # noqa: E402  (tests/stack.py)
from bench import BenchError, guarded, measured_build, start_private_stack  # noqa: E402

sys.path.insert(0, str(REPO))
from bluegreen.nginx import add_header_line, new_token, render_upstream  # noqa: E402

PYZ = REPO / "dist" / "bluegreen.pyz"
DEFAULT_JSON = REPO / "dist" / "bench-watch.json"

GOOD, BAD = "v1", "bad"  # the image tags (and the versions their /version answers)
# The load by default: one keep-alive connection paced to 160 req/s. One, because the test app's `failing`
# behaviour counts its requests in a file without a lock: requests in flight at once lose and reset counts, and
# FAIL_EVERY=10 then fails only 4 to 7% of them (4 connections; docs/bench.md). On one connection nginx hands the
# app one request at a time and FAIL_EVERY=N fails exactly 1 in N.
CONNECTIONS, QPS = 1, 160
REQUEST_TIMEOUT = 5.0
SETTLE = 2.0  # seconds of v1 under load before each run, and of load after its recovery
BOOT = 2.0  # the app's boot time (BOOT_DELAY in the env file), as in `make bench`
STOP_TIMEOUT = 10
HEALTH_TIMEOUT = 30
WATCH = {"WATCH_SECONDS": 30, "WATCH_MAX_ERROR_RATE": 5, "WATCH_MIN_REQUESTS": 20}

START_RE = re.compile(r"^\[2/6\] start\s+\S+ on 127\.0\.0\.1:(\d+)")
WATCH_FAILED_RE = re.compile(r"^\[4/6\] (?:watch|canary)\s.*: FAILED after ([0-9.]+)s$")
WATCH_SAW_RE = re.compile(r"(?:The watch after the switch|A canary step) saw (\d+) request\(s\) in \S+ s, (\d+) answered 5xx")
CANARY = {"CANARY_STEPS": "10,50", "CANARY_STEP_SECONDS": 30}
EARLY_Z = 2.576  # the documented early rule: the 99% Wilson lower bound of the 5xx share above the limit
NGINX_LINE_RE = re.compile(r'^([0-9]+\.[0-9]{3}) ([0-9]{3}) "([^"]*)"(?: ([0-9]+\.[0-9]{3}|-))?$')  # then $request_time
# A canary step's early rule needs WATCH_MIN_REQUESTS scaled to its share, at least 3 (docs/watch.md).
STEP_MIN_FLOOR = 3
STEP_SWITCH_RE = re.compile(r"^\[4/6\] switch  nginx -> ")  # a deploy's line as each canary step or the full switch begins


def log(text: str) -> None:
    print(text, flush=True)


def median(values: List[float]) -> Optional[float]:
    return statistics.median(values) if values else None


# --------------------------------------------------------------------------
# the load: every request recorded with its time
# --------------------------------------------------------------------------

class Load:
    """`connections` threads, each with one keep-alive `http.client` connection paced to qps/connections req/s.

    Every answer is recorded as (sent, answered, status, body, retried) with wall-clock times (time.time(), the
    clock nginx's $msec uses); status 0 is a connection error, the body then its exception's name. Like hey
    (Go's net/http) and browsers, a request that fails on a reused connection before any answer arrived is
    retried once on a fresh connection (`retried`): every nginx reload closes idle keep-alive connections
    (docs/bench.md, "Known limit"), which is no failure of the release being measured.
    """

    def __init__(self, port: int, path: str, qps: int, connections: int) -> None:
        self.port, self.path = port, path
        self.interval = connections / qps
        self.stop = threading.Event()
        self.records: List[tuple] = []  # list.append is atomic under the GIL
        self.threads = [threading.Thread(target=self.worker, args=(i, connections), daemon=True)
                        for i in range(connections)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=REQUEST_TIMEOUT * 2 + 2)

    def alive(self) -> bool:
        return all(t.is_alive() for t in self.threads)

    def worker(self, index: int, connections: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT)
        due = time.monotonic() + self.interval * index / connections  # spread the connections' phases
        while not self.stop.is_set():
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            elif now - due > self.interval:
                due = now  # late (a slow answer): skip the lost slots instead of bursting to catch up
            due += self.interval
            sent = time.time()
            status, body, retried = self.get(conn)
            self.records.append((sent, time.time(), status, body, retried))
            if status == 0:
                conn.close()
        conn.close()

    def get(self, conn: http.client.HTTPConnection) -> Tuple[int, str, bool]:
        for attempt in (0, 1):
            reused = conn.sock is not None
            try:
                conn.request("GET", self.path)
                resp = conn.getresponse()
                body = resp.read().decode("utf-8", "replace").strip()[:60]
                return resp.status, body, attempt == 1
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                conn.close()
                if reused and attempt == 0:
                    continue  # a closed keep-alive connection: retry once on a fresh one
                return 0, type(exc).__name__, attempt == 1
            except (OSError, http.client.HTTPException) as exc:  # refused, timeout, bad answer
                conn.close()
                return 0, type(exc).__name__, attempt == 1
        raise AssertionError("unreachable")

    def between(self, t0: float, t1: float) -> List[tuple]:
        return [r for r in list(self.records) if t0 <= r[1] < t1]


def release_of(record: tuple) -> str:
    """Which release answered: 'good' (v1), 'bad' (its 200 body is `bad`, its 500 body `failing bad`) or
    'none' (nginx's own error page, a connection error)."""
    status, body = record[2], record[3]
    if body == GOOD and status == 200:
        return "good"
    if body in (BAD, f"failing {BAD}"):
        return "bad"
    return "none"


def failed(record: tuple) -> bool:
    return not 200 <= record[2] <= 299


def failure_kind(record: tuple) -> str:
    if record[2] == 0:
        return f"error {record[3]}"
    return f"{record[2]} from the bad release" if release_of(record) == "bad" else f"{record[2]} {record[3][:30]!r}"


# --------------------------------------------------------------------------
# bluegreen, run with every output line time-stamped
# --------------------------------------------------------------------------

class Stamped:
    """A command whose stdout and stderr lines are kept with the wall-clock time they arrived."""

    def __init__(self, argv: List[str], env: Dict[str, str]) -> None:
        self.argv = argv
        self.started = time.time()
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1)
        self.lines: List[Tuple[float, str, str]] = []  # (time, stream, line)
        self.readers = [threading.Thread(target=self.read, args=(self.proc.stdout, "out"), daemon=True),
                        threading.Thread(target=self.read, args=(self.proc.stderr, "err"), daemon=True)]
        for reader in self.readers:
            reader.start()

    def read(self, pipe, name: str) -> None:
        for line in pipe:
            self.lines.append((time.time(), name, line.rstrip("\n")))

    def wait(self, timeout: float) -> dict:
        try:
            rc: Optional[int] = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
            rc = None
        ended = time.time()
        for reader in self.readers:
            reader.join(timeout=10)
        return {"argv": self.argv[2:], "rc": rc, "started": self.started, "ended": ended,
                "wall": round(ended - self.started, 3),
                "lines": [(round(t, 3), stream, text) for t, stream, text in self.lines]}

    def terminate(self) -> None:
        """On an interrupt: SIGTERM lets bluegreen switch back and undo, as a cancelled CI job would."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def first_line(deploy: dict, pattern: "re.Pattern[str]") -> Optional[Tuple[float, "re.Match[str]"]]:
    for t, _stream, text in deploy["lines"]:
        match = pattern.search(text.strip())
        if match:
            return t, match
    return None


def stderr_tail(deploy: dict, n: int = 12) -> str:
    return "\n".join([text for _t, stream, text in deploy["lines"] if stream == "err"][-n:])


# --------------------------------------------------------------------------
# nginx's view: the watch log bluegreen reads
# --------------------------------------------------------------------------

def nginx_lines(path: Path, offset: int) -> List[Tuple[float, int, Optional[int]]]:
    """(time, status, port that answered) of every line logged after `offset`, in the log's order."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return []
    out = []
    for line in data.splitlines():
        match = NGINX_LINE_RE.match(line.strip())
        if not match:
            continue
        last = re.split(r"\s*[,:]\s+", match.group(3).strip())[-1]  # the last server tried answered
        port = re.fullmatch(r"127\.0\.0\.1:(\d+)", last)
        out.append((float(match.group(1)), int(match.group(2)), int(port.group(1)) if port else None))
    return out


def threshold_crossed(lines: List[Tuple[float, int, Optional[int]]], port: int, max_rate: int,
                      min_requests: int) -> Optional[Tuple[float, int, int]]:
    """When the watch's early rule (docs/watch.md: at least `min_requests` requests to the new container --
    WATCH_MIN_REQUESTS, or a canary step's share of it --, at least two 5xx, and even the lower bound of the 5xx
    share's 99% Wilson interval above WATCH_MAX_ERROR_RATE) first holds over nginx's log, read in order: (time,
    requests, 5xx) of that line. Computed here from the documented rule, not with bluegreen's code."""
    requests = errors = 0
    z2 = EARLY_Z * EARLY_Z
    for t, status, answered in lines:
        if answered != port:
            continue
        requests += 1
        errors += 500 <= status <= 599
        if requests < max(1, min_requests):
            continue
        p = errors / requests
        low = (p + z2 / (2 * requests) - EARLY_Z * ((p * (1 - p) + z2 / (4 * requests)) / requests) ** 0.5) / (1 + z2 / requests)
        if (errors > 0 if max_rate <= 0 else errors >= 2 and low * 100 > max_rate):
            return t, requests, errors
    return None


# --------------------------------------------------------------------------
# the stack
# --------------------------------------------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="bluegreen-bench-watch-"))
        self.work.chmod(0o755)  # nginx workers run as nobody
        self.root = self.work / "root"
        self.pyz = self.work / "bluegreen.pyz"
        shutil.copyfile(PYZ, self.pyz)  # a `make build` while the bench runs must not change what is measured
        self.project = f"bench-watch-{os.getpid()}"  # other engineers' runs share this dockerd
        self.registry: Optional[stack.Registry] = None
        self.nginx: Optional[stack.Nginx] = None
        self.images: List[str] = []
        self.image = ""
        self.load: Optional[Load] = None
        self.running: Optional[Stamped] = None
        self.watch_log = self.work / "nginx" / "watch.log"
        self.ports: Tuple[int, int] = (0, 0)
        self.listen = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.listen}{path}"

    def setup(self) -> None:
        start_private_stack(self)
        t0 = time.monotonic()
        self.image = f"{self.registry.open_addr}/bluegreen-bench/watch"
        for tag, behaviour in ((GOOD, "graceful"), (BAD, "failing")):
            self.images.append(stack.build_app_image(f"{self.image}:{tag}", tag, behaviour, boot_delay=BOOT))
        log(f"bench-watch: images built and pushed to {self.registry.open_addr} in {time.monotonic() - t0:.1f}s")
        blue = stack.free_low_port()
        green = stack.free_low_port()
        while green == blue:
            green = stack.free_low_port()
        self.ports, self.listen = (blue, green), stack.free_port()
        # What `init` leaves: the env file, a placeholder upstream, and a server block file with the watch's
        # log format above the block, the route header and the watch's access_log line.
        self.write_env()
        (self.root / "nginx" / "conf.d" / f"{self.project}-upstream.conf").write_text(
            render_upstream(name=self.project, port=blue, project=self.project, colour="-", tag="-",
                            token=new_token(), down=True))
        fmt = "bluegreen_watch_" + re.sub(r"[^A-Za-z0-9_]", "_", self.project)
        self.nginx.add_server(self.project, self.listen, self.project,
                              head=f"log_format {fmt} '$msec $status \"$upstream_addr\" $request_time';",
                              extra=f"{add_header_line(self.project)}\n    access_log {self.watch_log} {fmt};")

    def write_env(self, **app: object) -> None:
        lines = [f"IMAGE={self.image}", f"BLUE_PORT={self.ports[0]}", f"GREEN_PORT={self.ports[1]}", "APP_PORT=8080",
                 "HEALTH_PATH=/api/health", f"HEALTH_TIMEOUT={HEALTH_TIMEOUT}", f"STOP_TIMEOUT={STOP_TIMEOUT}",
                 "LOG_DIR=", f"NGINX_URL=http://127.0.0.1:{self.listen}", f"BOOT_DELAY={self.args.boot:g}"]
        lines += [f"{key}={value}" for key, value in app.items()]
        (self.root / "projects" / f"{self.project}.env").write_text("\n".join(lines) + "\n")

    def deploy(self, tag: str, timeout: float) -> dict:
        env = dict(os.environ)
        env.update(BLUEGREEN_ROOT=str(self.root), BLUEGREEN_NGINX=shlex.join(self.nginx.cmd))
        # Kept in self.running until it has exited: on Ctrl-C or SIGTERM, close() sends it SIGTERM (it undoes
        # what it started, as for a cancelled CI job) and waits for it before removing anything.
        self.running = Stamped([sys.executable, str(self.pyz), "deploy", self.project, tag], env)
        result = self.running.wait(timeout)
        self.running = None
        return result

    def serving(self) -> str:
        status, body = stack.http_get(self.url("/version"), timeout=5)
        return body.strip() if status == 200 else (f"HTTP {status}" if status else "no answer")

    def ensure_v1(self) -> None:
        """Every run starts from v1 serving (after a run the watch did not end, the bench puts it back)."""
        if self.serving() == GOOD:
            return
        self.write_env(WATCH_SECONDS=0)
        d = self.deploy(GOOD, 120)
        if d["rc"] != 0 or self.serving() != GOOD:
            raise BenchError(f"cannot bring v1 back (exit {d['rc']}, serving {self.serving()}):\n{stderr_tail(d)}")

    def close(self) -> None:
        if self.running is not None:
            try:
                self.running.terminate()
            except Exception as exc:  # keep cleaning
                log(f"bench-watch: cleanup: {exc}")
        if self.load is not None:
            self.load.close()
        try:
            stack.cleanup_project(self.project)
        except Exception as exc:
            log(f"bench-watch: cleanup of {self.project}: {exc}")
        for stop in (self.nginx and self.nginx.stop, self.registry and self.registry.stop):
            if stop:
                try:
                    stop()
                except Exception as exc:
                    log(f"bench-watch: cleanup: {exc}")
        if self.images:
            stack.docker("rmi", *self.images, check=False)
        shutil.rmtree(self.work, ignore_errors=True)


# --------------------------------------------------------------------------
# the tools: each exposes clients to the bad release and recovers in its own way
# --------------------------------------------------------------------------

class Tool:
    name = ""
    min_requests = WATCH["WATCH_MIN_REQUESTS"]  # what the early rule needs in the window the bad release first meets
    what = ""  # one line for the table's notes
    action = ""  # what its recovery action is

    def expose_and_recover(self, bench: Bench, fail_every: int) -> dict:
        raise NotImplementedError


class WatchTool(Tool):
    name = "watch"
    action = "switch back"

    @property
    def what(self) -> str:
        return ("`bluegreen deploy PROJECT bad` with "
                + ", ".join(f"{k}={v}" for k, v in WATCH.items()) + ": it switches back to v1 by itself")

    extra: Dict[str, object] = {}

    def expose_and_recover(self, bench: Bench, fail_every: int) -> dict:
        bench.write_env(FAIL_EVERY=fail_every, **WATCH, **self.extra)
        steps = len(str(self.extra.get("CANARY_STEPS", "")).split(",")) if self.extra else 0
        d = bench.deploy(BAD, WATCH["WATCH_SECONDS"] + steps * CANARY["CANARY_STEP_SECONDS"] + HEALTH_TIMEOUT + 120)
        text = "\n".join(line for _t, _s, line in d["lines"])
        caught = d["rc"] == 1 and WATCH_SAW_RE.search(text) is not None
        events: dict = {"deploys": [d], "caught": caught, "kept": False}
        failed_at = first_line(d, WATCH_FAILED_RE)
        put_back = first_line(d, re.compile(r"^undo: put back "))
        removed = first_line(d, re.compile(r"^undo: remove "))
        saw = WATCH_SAW_RE.search(text)
        if caught and failed_at and put_back:
            # The verdict line is printed as the watch step fails, the undo line once nginx routes to v1 again
            # and every worker that could route to the bad release has exited.
            events.update(verdict_at=failed_at[0], action_start=failed_at[0], action_end=put_back[0],
                          removed_at=removed[0] if removed else None)
        if saw:
            events["watch_saw"] = {"requests": int(saw.group(1)), "errors": int(saw.group(2))}
        if not caught:
            events["kept"] = d["rc"] == 0 and bench.serving() in (BAD, f"failing {BAD}")
            bench.ensure_v1()  # the next run starts from v1; this run's recovery is not the tool's
        return events


class CanaryTool(WatchTool):
    name = "canary"
    extra = dict(CANARY)
    first_step = int(str(CANARY["CANARY_STEPS"]).split(",")[0])
    min_requests = min(WATCH["WATCH_MIN_REQUESTS"], max(STEP_MIN_FLOOR, -(-WATCH["WATCH_MIN_REQUESTS"] * first_step // 100)))

    @property
    def what(self) -> str:
        return ("`bluegreen deploy PROJECT bad` with " + ", ".join(f"{k}={v}" for k, v in {**CANARY, **WATCH}.items())
                + ": each step and then the watch judged; a failed step switches everything back to v1")


class SeedTool(Tool):
    name = "seed"
    action = "redeploy v1"

    @property
    def what(self) -> str:
        return (f"the seed's flow: `bluegreen deploy PROJECT bad` (no watch), {self.detect_delay:g} s of detection "
                "delay from the first answer of the bad release, then `bluegreen deploy PROJECT v1` (pull, boot)")

    def __init__(self, detect_delay: float) -> None:
        self.detect_delay = detect_delay

    def expose_and_recover(self, bench: Bench, fail_every: int) -> dict:
        bench.write_env(FAIL_EVERY=fail_every, WATCH_SECONDS=0)
        started = time.time()
        d = bench.deploy(BAD, HEALTH_TIMEOUT + 120)
        if d["rc"] != 0:
            raise BenchError(f"the seed-style deploy of the bad release failed (exit {d['rc']}):\n{stderr_tail(d)}")
        deadline = time.time() + 10
        switch = None
        while switch is None:
            bad = [r[1] for r in bench.load.between(started, time.time() + 1) if release_of(r) == "bad"]
            switch = min(bad) if bad else None
            if switch is None:
                if time.time() > deadline:
                    raise BenchError("the bad release was deployed, but no client got an answer from it in 10 s")
                time.sleep(0.05)
        time.sleep(max(0.0, switch + self.detect_delay - time.time()))
        bench.write_env(WATCH_SECONDS=0)
        r = bench.deploy(GOOD, HEALTH_TIMEOUT + 120)
        if r["rc"] != 0:
            raise BenchError(f"the manual rollback (deploy v1) failed (exit {r['rc']}):\n{stderr_tail(r)}")
        return {"deploys": [d, r], "caught": None, "kept": False, "detected_at": switch + self.detect_delay,
                "action_start": r["started"], "action_end": r["ended"]}


# Tools measured side by side in one run.
def make_tools(detect_delay: float) -> Dict[str, Tool]:
    return {"watch": WatchTool(), "canary": CanaryTool(), "seed": SeedTool(detect_delay)}


# --------------------------------------------------------------------------
# one run and its numbers
# --------------------------------------------------------------------------

def analyse(records: List[tuple], lines: list, events: dict, bad_port: Optional[int], t0: float,
            min_requests: int, window_end: Optional[float] = None) -> dict:
    def rel(t: Optional[float]) -> Optional[float]:
        return None if t is None else round(t - t0, 3)

    bad = [r for r in records if release_of(r) == "bad"]
    first_bad = min((r[1] for r in bad), default=None)
    last_bad = max((r[1] for r in bad), default=None)
    good_after = [r[1] for r in records if last_bad is not None and r[1] > last_bad and release_of(r) == "good"]
    kinds = collections.Counter(failure_kind(r) for r in records if failed(r))
    to_bad = [x for x in lines if bad_port is not None and x[2] == bad_port]
    crossed = threshold_crossed([x for x in lines if window_end is None or x[0] < window_end], bad_port,
                                WATCH["WATCH_MAX_ERROR_RATE"], min_requests) \
        if bad_port is not None else None
    nginx_last = max((x[0] for x in to_bad), default=None)
    out = {
        "t0": t0,
        "requests": len(records),
        "failed": sum(1 for r in records if failed(r)),
        "failed_by_kind": dict(kinds),
        "retried": sum(1 for r in records if r[4]),
        "answers_from_bad": len(bad),
        "failed_from_bad": sum(1 for r in bad if failed(r)),
        "first_bad": rel(first_bad),
        "last_bad": rel(last_bad),
        "first_good_after": rel(min(good_after)) if good_after else None,
        "switch_to_recovery": round(last_bad - first_bad, 3) if bad else None,
        "nginx": {
            "bad_port": bad_port,
            "requests_to_bad": len(to_bad),
            "5xx_from_bad": sum(1 for x in to_bad if 500 <= x[1] <= 599),
            "first": rel(min((x[0] for x in to_bad), default=None)),
            "last": rel(nginx_last),
            "threshold_at": rel(crossed[0]) if crossed else None,
            "threshold_requests": crossed[1] if crossed else None,
            "threshold_5xx": crossed[2] if crossed else None,
        },
        "threshold_to_stop": round(nginx_last - crossed[0], 3) if crossed and nginx_last else None,
        # The last request the bad release answered was sent (routed) this long after the threshold: an answer
        # that took long (in flight across the switch back) ends later than the routing to the bad release did.
        "threshold_to_last_routed": (round(max(r[0] for r in bad) - crossed[0], 3) if crossed and bad else None),
        "recovery_action": (round(events["action_end"] - events["action_start"], 3)
                            if events.get("action_start") and events.get("action_end") else None),
    }
    if bad:
        # Around the switch and around the recovery, every answer and every nginx line, times relative to t0:
        # (sent, answered, status, body, retried) and (logged, status, port that answered).
        def near(t: float) -> bool:
            return first_bad - 1 <= t <= first_bad + 2 or last_bad - 2 <= t <= last_bad + 1

        out["answers_near"] = [(rel(r[0]), rel(r[1]), r[2], r[3], r[4]) for r in records if near(r[1])]
        out["nginx_near"] = [(rel(x[0]), x[1], x[2]) for x in lines if near(x[0])]
    for key in ("verdict_at", "action_start", "action_end", "removed_at", "detected_at"):
        if events.get(key) is not None:
            out[key] = rel(events[key])
    if crossed and events.get("verdict_at"):
        out["threshold_to_verdict"] = round(events["verdict_at"] - crossed[0], 3)
    return out


def run_one(bench: Bench, tool: Tool, fail_every: int, index: int) -> dict:
    bench.ensure_v1()
    time.sleep(SETTLE)
    if bench.serving() != GOOD:
        raise BenchError(f"before the run nginx does not serve v1 ({bench.serving()})")
    offset = bench.watch_log.stat().st_size if bench.watch_log.exists() else 0
    load_avg = os.getloadavg()[0]
    t0 = time.time()
    events = tool.expose_and_recover(bench, fail_every)
    time.sleep(SETTLE)
    t1 = time.time()
    if not bench.load.alive():
        raise BenchError("a load thread died")
    start = first_line(events["deploys"][0], START_RE)
    bad_port = int(start[1].group(1)) if start else None
    lines = nginx_lines(bench.watch_log, offset)
    # The canary's rule is its first step's: the deploy counts each window afresh, so lines after the second
    # switch line (the next step, or the full switch) are not that window's. Every bad release here fails step 1.
    switches = [t for t, _s, text in events["deploys"][0]["lines"] if STEP_SWITCH_RE.match(text.strip())]
    window_end = switches[1] if tool.name == "canary" and len(switches) > 1 else None
    result = analyse(bench.load.between(t0, t1), lines, events, bad_port, t0, tool.min_requests, window_end)
    result["window"] = round(t1 - t0, 3)
    result.update(tool=tool.name, fail_every=fail_every, index=index, loadavg=round(load_avg, 2),
                  caught=events["caught"], kept=events["kept"], watch_saw=events.get("watch_saw"),
                  deploys=[{k: v for k, v in d.items() if k not in ("started", "ended")} for d in events["deploys"]])
    for d in result["deploys"]:
        d["lines"] = [(round(t - t0, 3), stream, text) for t, stream, text in d["lines"]]
    return result


def release_label(fail_every: int) -> str:
    return f"FAIL_EVERY={fail_every}"


# --------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------

def fmt(value: Optional[float], digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summarise(runs: List[dict]) -> dict:
    def values(key: str) -> List[float]:
        return [r[key] for r in runs if r.get(key) is not None]

    failed = values("failed")
    return {
        "runs": len(runs),
        "failed_median": median(failed),
        "failed_min": min(failed) if failed else None,
        "failed_max": max(failed) if failed else None,
        "failed_total": sum(failed),
        "bad_answers_median": median(values("answers_from_bad")),
        "bad_share": (sum(values("failed_from_bad")) / sum(values("answers_from_bad"))
                      if sum(values("answers_from_bad")) else None),
        "rate": median([r["requests"] / r["window"] for r in runs if r.get("window")]),
        "switch_to_recovery_median": median(values("switch_to_recovery")),
        "threshold_to_stop_median": median(values("threshold_to_stop")),
        "threshold_to_stop_max": max(values("threshold_to_stop"), default=None),
        "recovery_action_median": median(values("recovery_action")),
        "threshold_to_verdict_median": median(values("threshold_to_verdict")),
        "not_caught": sum(1 for r in runs if r.get("caught") is False),
        "retried": sum(values("retried")),
    }


def table(summary: Dict[str, Dict[str, dict]], tools: Dict[str, Tool]) -> str:
    head = ["release", "tool", "runs", "failed requests per run, median (min-max)", "answers from the bad release, median",
            "5xx share of them",
            "switch → recovery s, median", "threshold → stop s, median (max)", "recovery action", "recovery action s, median"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for release, by_tool in summary.items():
        for name, s in by_tool.items():
            failed = f"{fmt(s['failed_median'], 0)} ({fmt(s['failed_min'], 0)}-{fmt(s['failed_max'], 0)})"
            stop = f"{fmt(s['threshold_to_stop_median'])} ({fmt(s['threshold_to_stop_max'])})"
            runs = str(s["runs"]) + (f" ({s['not_caught']} not caught)" if s["not_caught"] else "")
            share = "-" if s["bad_share"] is None else f"{100 * s['bad_share']:.1f}%"
            lines.append("| " + " | ".join([release, name, runs, failed, fmt(s["bad_answers_median"], 0), share,
                                              fmt(s["switch_to_recovery_median"]), stop, tools[name].action,
                                              fmt(s["recovery_action_median"])]) + " |")
    return "\n".join(lines)


def ratios(summary: Dict[str, Dict[str, dict]]) -> List[str]:
    out = []
    for release, by_tool in summary.items():
        if "watch" not in by_tool or "seed" not in by_tool:
            continue
        w, s = by_tool["watch"], by_tool["seed"]
        parts = []
        for key, what in (("failed_median", "failed requests"), ("switch_to_recovery_median", "switch → recovery"),
                          ("recovery_action_median", "recovery action")):
            parts.append(f"{what} {w[key] / s[key]:.3f}" if w[key] is not None and s[key] else f"{what} -")
        out.append(f"{release}: watch/seed " + ", ".join(parts))
    return out


def notes(runs: List[dict], summary: Dict[str, Dict[str, dict]]) -> List[str]:
    out = []
    for release, by_tool in summary.items():
        w = by_tool.get("watch")
        if w:
            mine = [r for r in runs if r["tool"] == "watch" and release_label(r["fail_every"]) == release]
            held = [r["threshold_to_stop"] for r in mine if r["threshold_to_stop"] is not None]
            verdict = [r["threshold_to_verdict"] for r in mine if r.get("threshold_to_verdict") is not None]
            saw = [r["watch_saw"]["requests"] for r in mine if r.get("watch_saw")]
            routed = [r["threshold_to_last_routed"] for r in mine if r.get("threshold_to_last_routed") is not None]
            crossed = [r["nginx"]["threshold_requests"] for r in mine if r["nginx"]["threshold_requests"]]
            crossed_runs = [r for r in mine if r["nginx"]["threshold_at"] is not None]
            if not crossed_runs:
                target = "not applicable (the rule never held in nginx's log)"
            elif len(held) == len(crossed_runs) and max(held) <= 3:
                target = "met"
            else:
                target = "NOT met"
            out.append(f"{release}/watch: threshold → stop {', '.join(f'{x:.2f}' for x in held) or '-'} s: 3 s target "
                       f"{target}; the last request it answered was sent {fmt(max(routed, default=None))} s after the "
                       f"threshold at most; threshold → the watch's verdict line median {fmt(median(verdict))} s, verdict → "
                       f"switched back (recovery action) median {fmt(w['recovery_action_median'])} s; the rule held in "
                       f"nginx's log after {crossed} requests to the new container, the watch said it saw {saw}")
        for name in by_tool:
            mine = [r for r in runs if r["tool"] == name and release_label(r["fail_every"]) == release]
            kinds: collections.Counter = collections.Counter()
            for r in mine:
                kinds.update(r["failed_by_kind"])
            retried = sum(r["retried"] for r in mine)
            if kinds or retried:
                out.append(f"{release}/{name}: failures {dict(kinds)}; retried on a fresh connection {retried}")
            for r in mine:
                if r.get("caught") is False:
                    out.append(f"{release}/{name} run {r['index'] + 1}: the watch did not switch back (exit "
                               f"{r['deploys'][0]['rc']}, kept={r['kept']}); the bench redeployed v1")
    return out


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------

def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, metavar="K", help="runs per release and tool (default 3)")
    parser.add_argument("--detect-delay", type=float, default=60.0, metavar="S",
                        help="seed flow: seconds from the bad release's first answer to the manual rollback (default 60)")
    parser.add_argument("--fail-every", default="1,10", metavar="LIST",
                        help="the bad releases, by FAIL_EVERY (1: every request fails, 10: every 10th; default 1,10)")
    parser.add_argument("--tools", default="watch,canary,seed", metavar="LIST", help="comma-separated subset of watch,canary,seed")
    parser.add_argument("--connections", type=int, default=CONNECTIONS, metavar="N",
                        help=f"keep-alive client connections (default {CONNECTIONS})")
    parser.add_argument("--qps", type=int, default=QPS, metavar="R", help=f"requests per second in all (default {QPS})")
    parser.add_argument("--boot", type=float, default=BOOT, metavar="S", help=f"the app's boot time (default {BOOT:g})")
    parser.add_argument("--json", default=str(DEFAULT_JSON), metavar="PATH",
                        help="where the table, the notes and every raw number go (default dist/bench-watch.json)")
    args = parser.parse_args(argv)
    try:
        releases = [int(x) for x in args.fail_every.split(",") if x.strip()]
    except ValueError:
        parser.error("--fail-every: comma-separated whole numbers")
    if not releases or any(not 1 <= x <= 100 for x in releases):
        parser.error("--fail-every: numbers from 1 to 100")
    all_tools = make_tools(args.detect_delay)
    chosen = [t.strip() for t in args.tools.split(",") if t.strip()]
    if not chosen or any(t not in all_tools for t in chosen):
        parser.error(f"--tools: choose from {', '.join(all_tools)}")
    tools = {name: all_tools[name] for name in all_tools if name in chosen}
    if not 1 <= args.connections <= 32 or not 1 <= args.qps <= 2000:
        parser.error("--connections 1 to 32, --qps 1 to 2000")
    if args.runs < 1 or not 0 <= args.detect_delay <= 600 or not 0 <= args.boot <= 60:
        parser.error("--runs at least 1, --detect-delay 0 to 600, --boot 0 to 60")
    missing = [t for t in ("docker", "docker-registry", "nginx", "htpasswd")
               if shutil.which(t) is None and not os.path.exists(f"/usr/sbin/{t}")]
    if not os.path.exists(stack.BUSYBOX):
        missing.append(stack.BUSYBOX)
    if not PYZ.exists():
        missing.append(f"{PYZ} (run `make build`)")
    if missing:
        log(f"bench-watch: missing {', '.join(missing)}; `make bench-watch` installs and builds them")
        return 2

    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    started = time.monotonic()
    load_before = os.getloadavg()
    bench = Bench(args)
    measured = measured_build(bench.pyz)
    runs: List[dict] = []

    def body() -> None:
        log(f"bench-watch: {args.runs} runs per release and tool; releases FAIL_EVERY={releases}; tools "
            f"{', '.join(tools)}; work dir {bench.work}")
        bench.setup()
        bench.write_env(WATCH_SECONDS=0)
        first = bench.deploy(GOOD, 120)
        if first["rc"] != 0:
            raise BenchError(f"the first deploy of v1 failed (exit {first['rc']}):\n{stderr_tail(first)}")
        bench.load = Load(bench.listen, "/version", args.qps, args.connections)
        bench.load.start()
        for index in range(args.runs):
            for fail_every in releases:
                order = list(tools) if index % 2 == 0 else list(reversed(tools))
                for name in order:
                    r = run_one(bench, tools[name], fail_every, index)
                    runs.append(r)
                    log(f"  {release_label(fail_every):<11} {name:<6} run {index + 1}/{args.runs}: failed {r['failed']:>5}"
                        f" of {r['requests']:>5}; switch → recovery {fmt(r['switch_to_recovery'])} s; threshold → stop "
                        f"{fmt(r['threshold_to_stop'])} s; recovery action {fmt(r['recovery_action'])} s"
                        + ("" if r["caught"] is not False else "  <-- the watch did not switch back"))
        bench.load.close()

    rc = guarded("bench-watch", body, bench.close)
    if rc:
        return rc

    summary: Dict[str, Dict[str, dict]] = {}
    for fail_every in releases:
        label = release_label(fail_every)
        summary[label] = {name: summarise([r for r in runs if r["tool"] == name and r["fail_every"] == fail_every])
                          for name in tools}
    text = table(summary, tools)
    extra = ratios(summary) + notes(runs, summary)
    wall = time.monotonic() - started
    load_after = os.getloadavg()
    log(f"\n== bench-watch: {args.runs} runs per release and tool; load: {args.connections} keep-alive connection(s), "
        f"{args.qps} req/s GET /version; detection delay {args.detect_delay:g} s ==\n")
    log(text)
    log("")
    for name, tool in tools.items():
        log(f"- {name}: {tool.what}")
    for line in extra:
        log(f"- {line}")
    rates = [r["requests"] / r["window"] for r in runs if r.get("window")]
    log(f"- the load got {fmt(median(rates), 0)} answers/s (median over the runs; asked {args.qps})")
    log(f"- wall time {wall:.0f}s; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; "
        f"{os.cpu_count()} CPUs; python {platform.python_version()}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "runs_per_release_and_tool": args.runs,
        "settings": {"fail_every": releases, "tools": {n: t.what for n, t in tools.items()},
                     "detect_delay": args.detect_delay, "boot": args.boot, "watch": WATCH, "qps": args.qps,
                     "connections": args.connections, "request_timeout": REQUEST_TIMEOUT, "settle": SETTLE,
                     "health_timeout": HEALTH_TIMEOUT, "stop_timeout": STOP_TIMEOUT},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_before": load_before, "loadavg_after": load_after},
        "measured": measured,
        "wall_seconds": round(wall, 1),
        "table": text,
        "notes": extra,
        "summary": summary,
        "raw": runs,
    }, indent=1) + "\n")
    log(f"- raw numbers: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
