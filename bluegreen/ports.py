"""The kernel's ephemeral port range and who holds a local port: pure judges over /proc text, and bounded reads."""

from __future__ import annotations

import os
from typing import Iterable, Sequence

RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
TCP_FILES = ("/proc/net/tcp", "/proc/net/tcp6")
DEFAULT_RANGE = (32768, 60999)  # Linux's default, used when the file cannot be read
# /proc/net/tcp is about 150 bytes a socket: 16 MiB is some 100,000 sockets, far more than a deploy host has.
TCP_MAX_BYTES = 16 << 20
_STATES = {
    "01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1", "05": "FIN_WAIT2",
    "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT", "09": "LAST_ACK", "0A": "LISTEN", "0B": "CLOSING",
}


def _read_proc(path: str, max_bytes: int) -> bytes | None:
    """At most max_bytes of a /proc file (never blocks: O_NONBLOCK), None if it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        chunks, size = [], 0
        while size < max_bytes:
            chunk = os.read(fd, min(65536, max_bytes - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def parse_range(text: str) -> tuple[int, int] | None:
    """`32768\\t60999` -> (32768, 60999); None for anything else."""
    parts = text.split()
    if len(parts) != 2 or not all(p.isascii() and p.isdigit() and len(p) <= 5 for p in parts):
        return None
    low, high = int(parts[0]), int(parts[1])
    return (low, high) if 1 <= low <= high <= 65535 else None


def ephemeral_range(path: str = RANGE_FILE) -> tuple[int, int]:
    """The local ports the kernel picks for outgoing connections (Linux's default if unreadable)."""
    data = _read_proc(path, 256)
    parsed = parse_range(data.decode("ascii", "replace")) if data else None
    return parsed or DEFAULT_RANGE


def in_ephemeral_range(port: int, span: tuple[int, int] | None = None) -> bool:
    low, high = span or ephemeral_range()
    return low <= port <= high


def ephemeral_warning(ports: Sequence[tuple[str, int]], span: tuple[int, int], where: str) -> str | None:
    """A warning when any of (name, port) lies in the ephemeral range, with the two ways to fix it; else None."""
    inside = [(name, port) for name, port in ports if span[0] <= port <= span[1]]
    if not inside:
        return None
    named = " and ".join(f"{name}={port}" for name, port in inside)
    return (
        f"{named} in {where} {'is' if len(inside) == 1 else 'are'} inside the kernel's ephemeral port range "
        f"{span[0]}-{span[1]} (/proc/sys/net/ipv4/ip_local_port_range), where nginx's own connections to the app "
        f"get their local ports: under load such a port is often taken when a deploy starts a container on it. "
        f"Use ports below {span[0]} (e.g. 8081 and 8082), or reserve these with "
        f"`sysctl -w net.ipv4.ip_local_reserved_ports={','.join(str(p) for _, p in inside)}` (and the same line "
        f"in /etc/sysctl.d/ to keep it after a reboot)."
    )


def local_holders(text: str, port: int) -> list[str]:
    """The TCP states of sockets whose local end is `port`, from /proc/net/tcp or tcp6 text (header skipped)."""
    found = []
    want = f"{port:04X}"
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4 or ":" not in fields[1]:
            continue
        if fields[1].rsplit(":", 1)[1].upper() == want:
            found.append(_STATES.get(fields[3].upper(), "UNKNOWN"))
    return found


def outgoing_states(port: int, files: Iterable[str] = TCP_FILES) -> list[str]:
    """States of the TCP sockets with local port `port` when none of them listens (then they are the local
    ends of outgoing connections); [] when something listens there or nothing holds it. Bounded reads."""
    states: list[str] = []
    for path in files:
        data = _read_proc(path, TCP_MAX_BYTES)
        if data:
            states += local_holders(data.decode("ascii", "replace"), port)
    # Connections accepted by a listener share its local port: those are not outgoing.
    return [] if "LISTEN" in states else states


def outgoing_note(port: int, states: Sequence[str], span: tuple[int, int]) -> str:
    """Why a port without a listener is taken: the local end of outgoing connections, and what to do about it."""
    kinds = ", ".join(sorted(set(states)))
    inside = span[0] <= port <= span[1]
    return (
        f"the local end of {len(states)} outgoing TCP connection(s) ({kinds}; nothing listens on it: see `ss -tan "
        f"'sport = :{port}'`)" + (
            f": the port is inside the kernel's ephemeral range {span[0]}-{span[1]}, so nginx's (or any "
            f"process's) connections can take it at any moment; use ports below {span[0]} or reserve them with "
            f"net.ipv4.ip_local_reserved_ports" if inside else "")
    )
