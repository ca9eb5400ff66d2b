#!/usr/bin/env python3
"""`make bench-instant`: the wall time of a rollback through the retained container (instant) against one that pulls
and creates the container (the pull path), in paired runs.

A benchmark, not a test (pytest does not collect it, CI does not run it). On a private stack (tests/stack.py: a
local docker-registry, a private nginx, a throwaway deploy root, the busybox test app), it deploys v1 then v2 of one
project, then times N pairs of `bluegreen rollback PROJECT --to OTHER`, each pair one of each path, the order
alternating:

  instant     the idle colour's container is retained (stopped) with the other tag: `docker start`, no registry call
  pull path   that container removed first (`docker rm`, not timed): `docker pull` (PULL=always, the default: the
              image is still on the host, as `prune` keeps rollback targets, so docker only asks the registry for
              the manifest) and `docker run`

Each rollback flips the serving colour and leaves the one it replaced retained, so the pairs chain. Every run must
say which path it took (`instant rollback in` / `deployed in` on stdout), else the bench stops. It prints the medians,
their ratio and the median of the paired ratios, and writes the raw numbers as JSON. `--boot-delay S` makes the app
take S seconds to boot (app environment BOOT_DELAY): both paths wait for the app, so a real app's boot time dilutes
the gain. `--rtt MS` puts the registry behind a local TCP proxy that delays every connection and every chunk by
that round-trip time, as a registry across a network would (the local one answers in well under a millisecond).
Everything is removed at the end, also on Ctrl-C. Exits non-zero only when the bench itself broke.

    python3 tests/bench/bench_instant_rollback.py [--runs N] [--boot-delay S] [--rtt MS] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(HERE))

import stack  # noqa: E402
from bench import BenchError, guarded, measured_build, start_private_stack  # noqa: E402

sys.path.insert(0, str(REPO))
from bluegreen.init import render_placeholder_upstream  # noqa: E402
from bluegreen.nginx import add_header_line, new_token  # noqa: E402

PYZ = REPO / "dist" / "bluegreen.pyz"
DEFAULT_JSON = REPO / "dist" / "bench-instant-rollback.json"
PROJECT = "ibbg"
PATHS = ("instant", "pull path")


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class DelayProxy(threading.Thread):
    """127.0.0.1:PORT -> the registry, each connection accepted after one round trip and each chunk forwarded after
    half of one in each direction: a registry `rtt` seconds away."""

    def __init__(self, upstream_port: int, rtt: float) -> None:
        super().__init__(daemon=True)
        self.upstream_port, self.rtt = upstream_port, rtt
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.closed = threading.Event()

    def run(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(client,), daemon=True).start()

    def serve(self, client: socket.socket) -> None:
        time.sleep(self.rtt)  # the TCP handshake
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=30)
        except OSError:
            client.close()
            return
        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(target=self.pump, args=(src, dst), daemon=True).start()

    def pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                time.sleep(self.rtt / 2)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.closed.set()
        self.listener.close()


class Bench:
    def __init__(self, boot_delay: float, rtt: float) -> None:
        self.boot_delay = boot_delay
        self.rtt = rtt
        self.proxy: Optional[DelayProxy] = None
        self.work = Path(tempfile.mkdtemp(prefix="bluegreen-bench-instant-"))
        self.work.chmod(0o755)  # nginx workers run as nobody
        self.root = self.work / "root"
        self.pyz = self.work / "bluegreen.pyz"
        shutil.copyfile(PYZ, self.pyz)  # a `make build` while the bench runs must not change what is measured
        self.registry: Optional[stack.Registry] = None
        self.nginx: Optional[stack.Nginx] = None
        self.images: List[str] = []
        self.serving = ""  # the tag that serves now
        self.colour = ""  # and its colour

    def setup(self) -> None:
        start_private_stack(self)
        registry = self.registry.open_addr
        if self.rtt:
            self.proxy = DelayProxy(self.registry.open_port, self.rtt)
            self.proxy.start()
            registry = f"127.0.0.1:{self.proxy.port}"
        repo = f"{registry}/bluegreen-bench/instant"
        for tag in ("v1", "v2"):
            self.images.append(stack.build_app_image(f"{repo}:{tag}", tag))
        ports: set = set()
        while len(ports) < 2:
            ports.add(stack.free_low_port())
        blue, green = sorted(ports)
        listen = stack.free_port()
        env = (f"IMAGE={repo}\nBLUE_PORT={blue}\nGREEN_PORT={green}\nNGINX_URL=http://127.0.0.1:{listen}\n"
               f"HEALTH_TIMEOUT=60\nSTOP_TIMEOUT=5\nLOG_DIR=\n")
        if self.boot_delay:
            env += f"BOOT_DELAY={self.boot_delay:g}\n"
        (self.root / "projects" / f"{PROJECT}.env").write_text(env)
        (self.root / "nginx" / "conf.d" / f"{PROJECT}-upstream.conf").write_text(render_placeholder_upstream(
            project=PROJECT, upstream=PROJECT, blue_port=blue, token=new_token()))
        self.nginx.add_server(PROJECT, listen, PROJECT, extra=add_header_line(PROJECT))

    def bluegreen(self, *args: str) -> subprocess.CompletedProcess:
        env = dict(os.environ, BLUEGREEN_ROOT=str(self.root), BLUEGREEN_NGINX=shlex.join(self.nginx.cmd))
        env.pop("BLUEGREEN_DOCKER", None)
        return subprocess.run([sys.executable, str(self.pyz), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, timeout=600, env=env)

    def deploy(self, tag: str) -> None:
        proc = self.bluegreen("deploy", PROJECT, tag)
        if proc.returncode != 0:
            raise BenchError(f"deploy {tag} exited {proc.returncode}: {proc.stderr[-800:]}")
        self.serving, self.colour = tag, "green" if self.colour == "blue" else "blue"

    def rollback(self, path: str) -> dict:
        """One timed rollback to the tag that does not serve, by `path`; returns its numbers."""
        other = "v1" if self.serving == "v2" else "v2"
        retained = f"{PROJECT}-{'green' if self.colour == 'blue' else 'blue'}"
        if path == "pull path":
            stack.docker("rm", "--force", retained)
        started = time.perf_counter()
        proc = self.bluegreen("rollback", PROJECT, "--to", other)
        wall = time.perf_counter() - started
        said = "instant rollback in" if path == "instant" else "deployed in"
        if proc.returncode != 0 or said not in proc.stdout:
            raise BenchError(f"rollback to {other} ({path}) exited {proc.returncode} without `{said}`:\n"
                             f"{(proc.stdout + proc.stderr)[-1200:]}")
        self.serving, self.colour = other, "green" if self.colour == "blue" else "blue"
        entry = json.loads(self.bluegreen("history", PROJECT, "--json", "-n", "1").stdout)
        if entry.get("instant") is not (path == "instant"):
            raise BenchError(f"the journal says instant={entry.get('instant')} for a {path} rollback")
        return {"wall": wall, "duration": entry["duration"], "steps": entry["steps"]}

    def close(self) -> None:
        try:
            stack.cleanup_project(PROJECT)
        except Exception as exc:  # keep cleaning
            log(f"bench-instant: cleanup: {exc}")
        for stop in (self.nginx and self.nginx.stop, self.registry and self.registry.stop, self.proxy and self.proxy.close):
            if stop:
                try:
                    stop()
                except Exception as exc:
                    log(f"bench-instant: cleanup: {exc}")
        if self.images:
            stack.docker("rmi", *self.images, check=False)
        shutil.rmtree(self.work, ignore_errors=True)


def med(values: List[float]) -> float:
    return statistics.median(values)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15, metavar="N", help="paired runs (default 15; at least 10)")
    parser.add_argument("--boot-delay", type=float, default=0.0, metavar="S", help="the app's boot time (default 0)")
    parser.add_argument("--rtt", type=float, default=0.0, metavar="MS",
                        help="the registry's round-trip time, through a delaying proxy (default 0: none)")
    parser.add_argument("--json", default=str(DEFAULT_JSON), metavar="PATH")
    args = parser.parse_args(argv)
    if args.runs < 10:
        parser.error("--runs must be at least 10 (a median of fewer says little)")
    if not 0 <= args.boot_delay <= 30:
        parser.error("--boot-delay must be between 0 and 30 seconds")
    if not 0 <= args.rtt <= 2000:
        parser.error("--rtt must be between 0 and 2000 ms")
    if not PYZ.exists():
        log(f"bench-instant: {PYZ} is missing: run `make build`")
        return 2
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    started = time.monotonic()
    bench = Bench(args.boot_delay, args.rtt / 1000)
    measured = measured_build(bench.pyz)
    runs: Dict[str, List[dict]] = {path: [] for path in PATHS}

    def body() -> None:
        bench.setup()
        bench.deploy("v1")
        bench.deploy("v2")
        for path in PATHS:  # warm-up, unmeasured
            bench.rollback(path)
        for i in range(args.runs):
            for path in (PATHS if i % 2 == 0 else tuple(reversed(PATHS))):
                runs[path].append(bench.rollback(path))

    rc = guarded("bench-instant", body, bench.close)
    if rc:
        return rc

    wall = {p: [r["wall"] for r in runs[p]] for p in PATHS}
    step = {p: {s: [r["steps"].get(s, 0.0) for r in runs[p]] for s in ("pull", "start", "health")} for p in PATHS}
    paired = [i / p for i, p in zip(wall["instant"], wall["pull path"])]
    print(f"\n== bench-instant: {args.runs} paired rollbacks, boot delay {args.boot_delay:g}s, registry round trip "
          f"{args.rtt:g} ms, medians (seconds) ==\n")
    print("| path | wall | min | max | pull step | start step | health step |\n|---|---|---|---|---|---|---|")
    for p in PATHS:
        print(f"| {p} | {med(wall[p]):.3f} | {min(wall[p]):.3f} | {max(wall[p]):.3f} | {med(step[p]['pull']):.3f} | "
              f"{med(step[p]['start']):.3f} | {med(step[p]['health']):.3f} |")
    ratio = med(wall["instant"]) / med(wall["pull path"])
    print(f"\n- instant / pull path (medians): **{ratio:.2f}x** the wall time; median of the paired ratios "
          f"{med(paired):.2f}x; saved {med(wall['pull path']) - med(wall['instant']):.3f}s per rollback")
    load = os.getloadavg()
    print(f"- wall time {time.monotonic() - started:.0f}s; load average {load[0]:.2f}; python {platform.python_version()}; "
          f"{os.cpu_count()} CPUs")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"runs": args.runs, "boot_delay": args.boot_delay, "rtt_ms": args.rtt, "ratio": ratio,
                                           "paired_ratio_median": med(paired), "raw": runs, "measured": measured,
                                           "loadavg": load}, indent=2))
    print(f"- raw numbers: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
