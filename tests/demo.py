"""`make demo`: deploy a demo app v1, then v2 while a client keeps requesting, and show what it saw.

Everything is private and on loopback: a local docker-registry, a private nginx on a free port, a
throwaway deploy root. The real dist/bluegreen.pyz does the deploys, exactly as on a server.
"""

from __future__ import annotations

import collections
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import stack  # noqa: E402

sys.path.insert(0, str(HERE.parent))
from bluegreen.nginx import add_header_line, new_token, render_upstream  # noqa: E402

PYZ = HERE.parent / "dist" / "bluegreen.pyz"
PROJECT = "demo"


class Client(threading.Thread):
    """Requests /version through nginx back to back and tallies the answers."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.stop = threading.Event()
        self.answers: collections.Counter = collections.Counter()
        self.failures: collections.Counter = collections.Counter()

    def run(self) -> None:
        deadline = time.monotonic() + 300  # bounded even if nobody stops us
        while not self.stop.is_set() and time.monotonic() < deadline:
            status, body = stack.http_get(self.url, timeout=5)
            if status == 200:
                self.answers[body.strip()] += 1
            else:
                self.failures[f"HTTP {status}" if status else body[:60]] += 1


def deploy(env: dict, tag: str) -> None:
    argv = [sys.executable, str(PYZ), PROJECT, tag]
    print(f"\n$ BLUEGREEN_ROOT=... BLUEGREEN_NGINX=... python3 dist/bluegreen.pyz {PROJECT} {tag}", flush=True)
    proc = subprocess.run(argv, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"demo: the deploy of {tag} failed with exit code {proc.returncode}")


def main() -> int:
    if not PYZ.exists():
        print("demo: dist/bluegreen.pyz is missing; run `make build` first", file=sys.stderr)
        return 2
    stack.ensure_dockerd()
    work = Path(tempfile.mkdtemp(prefix="bluegreen-demo-"))
    work.chmod(0o755)  # nginx workers run as nobody
    root = work / "root"
    (root / "projects").mkdir(parents=True)
    (root / "nginx" / "conf.d").mkdir(parents=True)
    (work / "registry").mkdir()
    (work / "nginx").mkdir()
    registry = stack.Registry(str(work / "registry"))
    nginx = stack.Nginx(str(work / "nginx"), includes=[str(root / "nginx" / "conf.d" / "*.conf")])
    try:
        registry.start()
        nginx.start()
        repo = f"{registry.open_addr}/bluegreen-demo/app"
        print(f"demo: building the demo app v1 and v2 (busybox, boots in 2 s) and pushing them to {registry.open_addr}", flush=True)
        for version in ("v1", "v2"):
            stack.build_app_image(f"{repo}:{version}", version, "ok", boot_delay=2)
        blue, green, listen = stack.free_low_port(), stack.free_low_port(), stack.free_port()
        while green == blue:
            green = stack.free_low_port()
        (root / "projects" / f"{PROJECT}.env").write_text(
            f"IMAGE={repo}\nBLUE_PORT={blue}\nGREEN_PORT={green}\nAPP_PORT=8080\nHEALTH_TIMEOUT=30\n"
            f"STOP_TIMEOUT=5\nLOG_DIR=\nDB_PASSWORD=demo-secret\n"
        )
        # What a server's one-time set-up leaves behind: a placeholder upstream (routes nowhere
        # yet) and the project's server block, with the line that lets bluegreen prove its routing.
        (root / "nginx" / "conf.d" / f"{PROJECT}-upstream.conf").write_text(
            render_upstream(name=PROJECT, port=blue, project=PROJECT, colour="-", tag="-", token=new_token(), down=True)
        )
        nginx.add_server(PROJECT, listen, PROJECT, extra=add_header_line(PROJECT))
        with (root / "projects" / f"{PROJECT}.env").open("a") as fh:
            fh.write(f"NGINX_URL=http://127.0.0.1:{listen}\n")
        env = dict(os.environ, BLUEGREEN_ROOT=str(root), BLUEGREEN_NGINX=shlex.join(nginx.cmd))
        deploy(env, "v1")
        url = f"http://127.0.0.1:{listen}/version"
        print(f"\ndemo: nginx serves {url}; a client now requests it back to back", flush=True)
        client = Client(url)
        client.start()
        time.sleep(1)
        deploy(env, "v2")
        time.sleep(1)
        client.stop.set()
        client.join()
        status, now = stack.http_get(url)
        total = sum(client.answers.values()) + sum(client.failures.values())
        failed = sum(client.failures.values())
        print("\n== demo result ==")
        print(f"requests during the deploy: {total}, failed: {failed}" + (f" {dict(client.failures)}" if failed else ""))
        print("answers by version: " + ", ".join(f"{v}: {n}" for v, n in sorted(client.answers.items())))
        print(f"now serving: {now.strip() if status == 200 else f'HTTP {status}'} "
              f"(active colour: {(root / 'projects' / f'{PROJECT}.active').read_text().strip()})")
        return 0 if failed == 0 and now.strip() == "v2" else 1
    finally:
        nginx.stop()
        registry.stop()
        stack.cleanup_project(PROJECT)
        subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    sys.exit(main())
