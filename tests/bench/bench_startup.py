#!/usr/bin/env python3
"""`make bench-startup`: what `--version`, `--help`, `status PROJECT` and `deploy PROJECT TAG --dry-run` cost against a
bare `python -c pass` on the same interpreter, in paired runs, on Python 3.9 and the newest Python here.

A benchmark, not a test (pytest does not collect it, CI does not run it). On a private stack (tests/stack.py: a local
docker-registry, a private nginx, a throwaway deploy root, the busybox test app) it deploys v1 of one project, so
`status` reads a serving container, nginx and a journal, and the dry run plans v2 against them. Then, for each Python
and each build of this tree (made here with build.py by the Pythons measured):

  own bytecode     built by this Python: zipimport runs the .pyc beside each .py
  other bytecode   built by the other Python: the magic number differs, so every module is compiled from source
  no bytecode      build.py --no-bytecode: the same, without the .pyc in the archive

it times N pairs per command, each pair `PYTHON -c pass` and `PYTHON PYZ COMMAND...` back to back, the order
alternating, and prints the medians (seconds) and the median of the paired ratios. The machine may be shared:
pairing keeps a load change inside one pair. Everything is removed at the end, also on Ctrl-C. Exits non-zero only
when the bench itself broke (a command failed, the stack did not come up), never on the numbers.

`--compare PYZ` measures another archive too (an earlier commit's build), on every Python as it is.

    python3 tests/bench/bench_startup.py [--runs N] [--pythons OLDEST,NEWEST] [--compare PYZ] [--json PATH]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

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

DEFAULT_JSON = REPO / "dist" / "bench-startup.json"
PROJECT = "subg"
COMMANDS: Dict[str, List[str]] = {
    "--version": ["--version"],
    "--help": ["--help"],
    "status": ["status", PROJECT],
    "deploy --dry-run": ["deploy", PROJECT, "v2", "--dry-run"],
}
BUILDS = ("own bytecode", "other bytecode", "no bytecode")
# The bar, on Python 3.9 with the build the hosts run (its own bytecode): ratio to `python -c pass`.
TARGETS = {"--version": 3.0, "--help": 4.0}


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def version_of(python: str) -> Tuple[int, int]:
    out = subprocess.run([python, "-c", "import sys; print(*sys.version_info[:2])"], stdout=subprocess.PIPE, text=True,
                         check=True, timeout=60).stdout.split()
    return int(out[0]), int(out[1])


def find_pythons() -> List[str]:
    """3.9 and the newest CPython here: pyenv's versions first, then python3.N on PATH."""
    found: Dict[Tuple[int, int], str] = {}
    for path in sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.*/bin/python3"))):
        match = re.search(r"/versions/3\.(\d+)\.\d+/", path)
        if match and int(match.group(1)) >= 9:
            found.setdefault((3, int(match.group(1))), path)
    for minor in range(9, 30):
        path = shutil.which(f"python3.{minor}")
        if path and (3, minor) not in found:
            found[(3, minor)] = path
    if (3, 9) not in found:
        raise BenchError("no Python 3.9 found (pyenv or python3.9 on PATH); pass --pythons")
    newest = max(found)
    return [found[(3, 9)]] + ([found[newest]] if newest != (3, 9) else [])


class Bench:
    def __init__(self, pythons: List[str], compare: Optional[Path] = None) -> None:
        self.pythons = pythons
        self.compare = compare
        self.versions = {py: version_of(py) for py in pythons}
        self.work = Path(tempfile.mkdtemp(prefix="bluegreen-bench-startup-"))
        self.work.chmod(0o755)  # nginx workers run as nobody
        self.root = self.work / "root"
        self.registry: Optional[stack.Registry] = None
        self.nginx: Optional[stack.Nginx] = None
        self.images: List[str] = []
        self.pyz: Dict[Tuple[str, str], Path] = {}  # (python, build) -> archive

    def name(self, python: str) -> str:
        return "%d.%d" % self.versions[python]

    def build(self) -> None:
        """Each Python's own build, and one without bytecode; `other bytecode` is the other Python's own build."""
        own: Dict[str, Path] = {}
        for py in self.pythons:
            own[py] = self.work / f"own-{self.name(py)}.pyz"
            subprocess.run([py, str(REPO / "build.py"), "-o", str(own[py])], check=True, stdout=subprocess.DEVNULL, timeout=300)
        bare = self.work / "no-bytecode.pyz"
        subprocess.run([self.pythons[0], str(REPO / "build.py"), "--no-bytecode", "-o", str(bare)], check=True,
                       stdout=subprocess.DEVNULL, timeout=300)
        for py in self.pythons:
            others = [own[o] for o in self.pythons if o != py]
            self.pyz[(py, "own bytecode")] = own[py]
            if others:
                self.pyz[(py, "other bytecode")] = others[0]
            self.pyz[(py, "no bytecode")] = bare
            if self.compare:
                self.pyz[(py, self.label())] = self.work / "compare.pyz"
        if self.compare:
            shutil.copyfile(self.compare, self.work / "compare.pyz")  # a snapshot, like the builds

    def label(self) -> str:
        return f"given: {self.compare.name}" if self.compare else ""

    def builds(self) -> List[str]:
        return list(BUILDS) + ([self.label()] if self.compare else [])

    def setup(self) -> None:
        start_private_stack(self)
        repo = f"{self.registry.open_addr}/bluegreen-bench/startup"
        for tag in ("v1", "v2"):
            self.images.append(stack.build_app_image(f"{repo}:{tag}", tag))
        ports: set = set()
        while len(ports) < 2:
            ports.add(stack.free_low_port())
        blue, green = sorted(ports)
        listen = stack.free_port()
        (self.root / "projects" / f"{PROJECT}.env").write_text(
            f"IMAGE={repo}\nBLUE_PORT={blue}\nGREEN_PORT={green}\nNGINX_URL=http://127.0.0.1:{listen}\n"
            f"HEALTH_TIMEOUT=60\nSTOP_TIMEOUT=5\nLOG_DIR=\n")
        (self.root / "nginx" / "conf.d" / f"{PROJECT}-upstream.conf").write_text(render_placeholder_upstream(
            project=PROJECT, upstream=PROJECT, blue_port=blue, token=new_token()))
        self.nginx.add_server(PROJECT, listen, PROJECT, extra=add_header_line(PROJECT))
        proc = self.run(self.pythons[0], self.pyz[(self.pythons[0], "own bytecode")], ["deploy", PROJECT, "v1"])
        if proc.returncode != 0:
            raise BenchError(f"deploy v1 exited {proc.returncode}: {proc.stderr[-800:]}")

    def env(self) -> Dict[str, str]:
        env = dict(os.environ, BLUEGREEN_ROOT=str(self.root), BLUEGREEN_NGINX=shlex.join(self.nginx.cmd) if self.nginx else "")
        env.pop("BLUEGREEN_DOCKER", None)
        return env

    def run(self, python: str, pyz: Optional[Path], args: List[str]) -> subprocess.CompletedProcess:
        argv = [python, "-c", "pass"] if pyz is None else [python, str(pyz), *args]
        return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120, env=self.env())

    def timed(self, python: str, pyz: Optional[Path], args: List[str]) -> float:
        started = time.perf_counter()
        proc = self.run(python, pyz, args)
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            raise BenchError(f"{python} {pyz or '-c pass'} {' '.join(args)} exited {proc.returncode}: "
                             f"{(proc.stdout + proc.stderr)[-800:]}")
        return wall

    def pairs(self, python: str, build: str, command: str, runs: int) -> dict:
        pyz, args = self.pyz[(python, build)], COMMANDS[command]
        self.timed(python, pyz, args)  # warm-up (page cache), unmeasured
        bare: List[float] = []
        cmd: List[float] = []
        for i in range(runs):
            if i % 2 == 0:
                bare.append(self.timed(python, None, []))
                cmd.append(self.timed(python, pyz, args))
            else:
                cmd.append(self.timed(python, pyz, args))
                bare.append(self.timed(python, None, []))
        return {"bare": bare, "command": cmd, "bare_median": statistics.median(bare),
                "command_median": statistics.median(cmd), "ratio": statistics.median(c / b for c, b in zip(cmd, bare))}

    def close(self) -> None:
        try:
            stack.cleanup_project(PROJECT)
        except Exception as exc:  # keep cleaning
            log(f"bench-startup: cleanup: {exc}")
        for stop in (self.nginx and self.nginx.stop, self.registry and self.registry.stop):
            if stop:
                try:
                    stop()
                except Exception as exc:
                    log(f"bench-startup: cleanup: {exc}")
        if self.images:
            stack.docker("rmi", *self.images, check=False)
        shutil.rmtree(self.work, ignore_errors=True)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=25, metavar="N", help="paired runs per command and build (default 25; at least 20)")
    parser.add_argument("--pythons", metavar="PY,PY", default="",
                        help="the interpreters, oldest first (default: 3.9 and the newest found)")
    parser.add_argument("--compare", type=Path, metavar="PYZ", help="also measure this archive (e.g. the base commit's build)")
    parser.add_argument("--json", default=str(DEFAULT_JSON), metavar="PATH")
    args = parser.parse_args(argv)
    if args.compare and not args.compare.is_file():
        parser.error(f"--compare: {args.compare} is not a file")
    if args.runs < 20:
        parser.error("--runs must be at least 20 (a median of fewer says little on a shared machine)")
    try:
        pythons = [p for p in args.pythons.split(",") if p] or find_pythons()
    except BenchError as exc:  # no Python 3.9 on this machine (a fresh Debian 12): say so, no traceback
        print(f"bench-startup: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    started = time.monotonic()
    load_before = os.getloadavg()
    bench = Bench(pythons, args.compare)
    results: Dict[str, Dict[str, Dict[str, dict]]] = {}
    measured: dict = {}

    def body() -> None:
        bench.build()
        measured.update(measured_build(bench.pyz[(pythons[0], "own bytecode")]))
        bench.setup()
        for py in pythons:
            results[bench.name(py)] = {}
            for build in bench.builds():
                if (py, build) not in bench.pyz:
                    continue
                results[bench.name(py)][build] = {}
                for command in COMMANDS:
                    res = bench.pairs(py, build, command, args.runs)
                    results[bench.name(py)][build][command] = res
                    log(f"  {bench.name(py):>5} {build:<18} {command:<17} {res['command_median']:.3f}s against "
                        f"{res['bare_median']:.3f}s: {res['ratio']:.2f}x")

    rc = guarded("bench-startup", body, bench.close)
    if rc:
        return rc

    load_after = os.getloadavg()
    print(f"\n== bench-startup: {args.runs} paired runs each, medians in seconds, ratio = median of the paired "
          f"(command / `python -c pass`) ==\n")
    print("| python | build | command | `-c pass` | command | ratio |\n|---|---|---|---|---|---|")
    for py, builds in results.items():
        for build, commands in builds.items():
            for command, res in commands.items():
                print(f"| {py} | {build} | `{command}` | {res['bare_median']:.3f} | {res['command_median']:.3f} | "
                      f"{res['ratio']:.2f}x |")
    oldest = bench.name(pythons[0])
    print()
    for command, bar in TARGETS.items():
        ratio = results[oldest]["own bytecode"][command]["ratio"]
        print(f"- {oldest}, own bytecode, `{command}`: {ratio:.2f}x, bar {bar:g}x: {'met' if ratio <= bar else 'NOT met'}")
    for py, builds in results.items():
        if "other bytecode" in builds:
            gains = ", ".join(f"`{c}` {builds['other bytecode'][c]['command_median'] - builds['own bytecode'][c]['command_median']:+.3f}s"
                              for c in COMMANDS)
            print(f"- {py}: another Python's bytecode instead of its own costs {gains}")
    print(f"- wall time {time.monotonic() - started:.0f}s; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; "
          f"{os.cpu_count()} CPUs; commit {measured['commit'][:12]}{' (dirty)' if measured['bluegreen_dirty'] else ''}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runs": args.runs, "pythons": {bench.name(p): p for p in pythons}, "measured": measured,
                               "loadavg_before": load_before, "loadavg_after": load_after, "results": results}, indent=2) + "\n")
    print(f"- raw numbers: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
