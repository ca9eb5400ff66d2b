#!/usr/bin/env python3
"""`make bench-fleet-status`: `bluegreen status PROJECT --hosts h1,h2,h3` against one host's status over ssh.

A benchmark, not a test (pytest does not collect it). It brings up the fleet harness (tests/fleet.py: hosts h1..h3
in network namespaces, each with its own dockerd, sshd and nginx), deploys one project on the three hosts with
`bluegreen rollout`, then times, in paired runs (the order alternating), what a person or a monitoring job runs:

  one host     ssh -F CFG h1 'python3 "$BLUEGREEN_ROOT/bluegreen.pyz" status PROJECT'   (a fresh connection)
  fleet of 1   python3 bluegreen.pyz status PROJECT --hosts h1 --ssh-config CFG         (the controller's cost)
  fleet of 3   python3 bluegreen.pyz status PROJECT --hosts h1,h2,h3 --ssh-config CFG

Every run must exit 0 (the fleet serves one healthy version), else the bench stops. It prints the medians and
the ratios against `one host`, and writes the raw numbers as JSON. Everything is removed at the end, also on
Ctrl-C. Exits non-zero only when the bench itself broke, never because of a number.

    python3 tests/bench/bench_fleet_status.py [--runs N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(HERE))

import stack  # noqa: E402
from bench import BenchError, measured_build  # noqa: E402
from fleet import Fleet  # noqa: E402

sys.path.insert(0, str(REPO))
from bluegreen.init import render_placeholder_upstream  # noqa: E402
from bluegreen.nginx import add_header_line, new_token  # noqa: E402

PYZ = REPO / "dist" / "bluegreen.pyz"
DEFAULT_JSON = REPO / "dist" / "bench-fleet-status.json"
PROJECT, PORTS = "fsbg", (20401, 20402)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def timed(argv: List[str], env: Dict[str, str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120, env=env)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(argv[:6])} ... exited {proc.returncode}: {(proc.stdout + proc.stderr)[-800:]}")
    return seconds


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, metavar="N", help="paired runs (default 20)")
    parser.add_argument("--json", default=str(DEFAULT_JSON), metavar="PATH")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    work = Path(tempfile.mkdtemp(prefix="bluegreen-bench-status-"))
    work.chmod(0o755)
    pyz = work / "bluegreen.pyz"
    shutil.copyfile(PYZ, pyz)  # a `make build` while the bench runs must not change what is measured
    fleet = None
    started = time.monotonic()
    try:
        stack.ensure_dockerd()
        fleet = Fleet(n=3, image_repo="bench/status")
        fleet.start()
        fleet.publish_images()
        for h in fleet.hosts:
            Path(h.deploy_root, "projects", f"{PROJECT}.env").write_text(
                f"IMAGE={fleet.image_repo}\nBLUE_PORT={PORTS[0]}\nGREEN_PORT={PORTS[1]}\nNGINX_URL=http://{h.addr}\n"
                f"HEALTH_TIMEOUT=30\nSTOP_TIMEOUT=2\n")
            Path(h.conf_d, f"{PROJECT}-upstream.conf").write_text(render_placeholder_upstream(
                project=PROJECT, upstream=PROJECT, blue_port=PORTS[0], token=new_token()))
            h.proxy_app(PROJECT, extra=add_header_line(PROJECT))
        env = {k: v for k, v in os.environ.items() if not k.startswith("BLUEGREEN_")}
        names = [h.name for h in fleet.hosts]
        base = [sys.executable, str(pyz)]
        cfg = ["--ssh-config", fleet.ssh_config]
        timed(base + ["rollout", PROJECT, "v1", "--hosts", ",".join(names)] + cfg, env)
        cases = {
            "one host": ["ssh", "-F", fleet.ssh_config, "h1", f'python3 "$BLUEGREEN_ROOT/bluegreen.pyz" status {PROJECT}'],
            "fleet of 1": base + ["status", PROJECT, "--hosts", "h1"] + cfg,
            "fleet of 3": base + ["status", PROJECT, "--hosts", ",".join(names)] + cfg,
        }
        for argv_ in cases.values():  # warm-up, unmeasured
            timed(argv_, env)
        times: Dict[str, List[float]] = {name: [] for name in cases}
        for i in range(args.runs):
            order = list(cases) if i % 2 == 0 else list(reversed(cases))
            for name in order:
                times[name].append(timed(cases[name], env))
        med = {name: statistics.median(v) for name, v in times.items()}
        rows = [f"| {name} | {med[name]:.3f} | {med[name] / med['one host']:.2f} |" for name in cases]
        print(f"\n== bench-fleet-status: {args.runs} paired runs, medians ==\n")
        print("| command | seconds | vs one host |\n|---|---|---|\n" + "\n".join(rows))
        print(f"\n- fleet of 3 / one host: **{med['fleet of 3'] / med['one host']:.2f}** (target: below 2)")
        print(f"- fleet of 3 / fleet of 1: {med['fleet of 3'] / med['fleet of 1']:.2f}")
        load = os.getloadavg()
        print(f"- wall time {time.monotonic() - started:.0f}s; load average {load[0]:.2f}; python {platform.python_version()}")
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"runs": args.runs, "medians": med, "times": times,
                                               "measured": measured_build(pyz), "cases": {k: v for k, v in cases.items()},
                                               "loadavg": load}, indent=2, default=str))
        print(f"- raw numbers: {args.json}")
        return 0
    except BenchError as exc:
        log(f"bench-fleet-status: {exc}")
        return 1
    except KeyboardInterrupt:
        log("bench-fleet-status: interrupted; cleaning up")
        return 130
    finally:
        if fleet is not None:
            fleet.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
