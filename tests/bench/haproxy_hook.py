#!/usr/bin/env python3
"""A rollout load-balancer hook for haproxy's runtime API (tests and `make bench-fleet`; also a recipe).

    haproxy_hook.py SOCKET BACKEND out   # before-host: drain $BLUEGREEN_HOST, wait until it has no session
    haproxy_hook.py SOCKET BACKEND in    # after-host: ready, wait until its health check says UP

The server is named as the rollout names the host (BLUEGREEN_HOST). Exits non-zero, saying why, when haproxy
refuses or the wait times out (HOOK_WAIT seconds, default 30)."""

from __future__ import annotations

import os
import socket
import sys
import time


def command(path: str, text: str) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(path)
        sock.sendall(text.encode() + b"\n")
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                return b"".join(chunks).decode("utf-8", "replace")
            chunks.append(data)


def row(path: str, backend: str, server: str) -> dict:
    lines = [ln for ln in command(path, "show stat").splitlines() if ln.strip()]
    keys = lines[0][2:].split(",")
    for line in lines[1:]:
        found = dict(zip(keys, line.split(",")))
        if found.get("pxname") == backend and found.get("svname") == server:
            return found
    raise SystemExit(f"haproxy has no server {backend}/{server}")


def main(argv: list) -> int:
    path, backend, action = argv[1:4]
    server = os.environ["BLUEGREEN_HOST"]
    deadline = time.monotonic() + float(os.environ.get("HOOK_WAIT", "30"))
    state = "drain" if action == "out" else "ready"
    answer = command(path, f"set server {backend}/{server} state {state}").strip()
    if answer:
        print(f"haproxy refused `set server {backend}/{server} state {state}`: {answer}", file=sys.stderr)
        return 1
    while True:
        now = row(path, backend, server)
        done = int(now.get("scur") or 0) == 0 if action == "out" else now.get("status", "").startswith("UP")
        if done:
            print(f"{backend}/{server}: {now.get('status')}, {now.get('scur')} session(s)")
            return 0
        if time.monotonic() > deadline:
            print(f"{backend}/{server} still {now.get('status')} with {now.get('scur')} session(s)", file=sys.stderr)
            return 1
        time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
