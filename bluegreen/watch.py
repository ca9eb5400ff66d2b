"""The watch window after a switch (pure, plus a bounded log reader): what nginx really served from the new
container, read from a per-project access log, judged against WATCH_MAX_ERROR_RATE.

The project's server block file defines the log format (an http-level line before `server {`: nginx must read
a format before an access_log uses it, and the upstream directory may be included after the server blocks)
and logs with it; `init` writes both lines. A server block without them deploys as before, without a watch."""

from __future__ import annotations

import errno
import math
import os
import re
import stat
from dataclasses import dataclass, field
from typing import Dict, Iterable, NamedTuple, Optional

# $request_time last, optional when read: server blocks written before it was added log without it.
LOG_FORMAT = '$msec $status "$upstream_addr" $request_time'
READ_MAX = 4 << 20  # bytes read from the log per poll: a flood cannot make one poll slow
LINE_MAX = 4096


def format_name(project: str) -> str:
    """The log_format's name (formats are global in nginx: one per project)."""
    return "bluegreen_watch_" + re.sub(r"[^A-Za-z0-9_]", "_", project)


def log_format_line(project: str) -> str:
    return f"log_format {format_name(project)} '{LOG_FORMAT}';"


def default_log_path(project: str) -> str:
    """Where `init` points the watch log: a directory Debian's and Amazon Linux's logrotate rotate."""
    return f"/var/log/nginx/bluegreen-{project}.log"


def access_log_line(project: str, path: str | None = None) -> str:
    return f"access_log {path or default_log_path(project)} {format_name(project)};"


def find_log_path(dump: str, project: str) -> str | None:
    """The file the project's server block logs to with its watch format, as `nginx -T` shows the config."""
    pattern = re.compile(r"^\s*access_log\s+(\"[^\"]+\"|'[^']+'|[^\s;]+)\s+" + re.escape(format_name(project)) + r"\b([^;]*);",
                         re.MULTILINE | re.IGNORECASE)
    match = pattern.search(dump)
    if not match:
        return None
    path = match.group(1).strip("\"'")
    # A path with variables names many files; gzip, buffer= and flush= hold lines back: the watch would be blind.
    if not path.startswith("/") or "\x00" in path or "$" in path or re.search(r"\b(gzip|buffer|flush)\b", match.group(2)):
        return None
    return path


_LINE = re.compile(r'([0-9]{1,12}\.[0-9]{3}) ([0-9]{3}) "([^"]{0,512})"(?: ([0-9]{1,7}\.[0-9]{3}|-))?')


class LogLine(NamedTuple):
    time: float  # $msec: when the request ended
    status: int
    upstream: str  # $upstream_addr: every server tried
    seconds: Optional[float]  # $request_time; None in the older format


def parse_line(line: str) -> LogLine | None:
    """One log line in LOG_FORMAT (or the older one without $request_time); None for any other line."""
    match = _LINE.fullmatch(line.strip())
    if not match:
        return None
    took = match.group(4)
    return LogLine(float(match.group(1)), int(match.group(2)), match.group(3),
                   float(took) if took and took != "-" else None)


def routed_port(addr: str) -> int | None:
    """The local port that finally answered (`$upstream_addr` lists every server tried: the last one)."""
    last = re.split(r"\s*[,:]\s+", addr.strip())[-1] if addr.strip() else ""
    match = re.fullmatch(r"127\.0\.0\.1:([0-9]{1,5})", last)
    return int(match.group(1)) if match else None


@dataclass
class Tally:
    requests: int = 0  # requests nginx sent to the new container
    errors: int = 0  # of those, answered 5xx
    # $request_time of those, counted per value rounded to two significant digits: bounded however long the window.
    times: Dict[float, int] = field(default_factory=dict, compare=False, repr=False)

    def add(self, lines: Iterable[str], port: int) -> None:
        for line in lines:
            found = parse_line(line)
            if found is None or routed_port(found.upstream) != port:
                continue
            self.requests += 1
            self.errors += 500 <= found.status <= 599
            if found.seconds is not None:
                key = float(f"{found.seconds:.2g}")
                self.times[key] = self.times.get(key, 0) + 1

    @property
    def percent(self) -> float:
        return 100.0 * self.errors / self.requests if self.requests else 0.0

    def quantile(self, q: float) -> float | None:
        """The request time (s, two significant digits) that a share q of the timed requests did not exceed."""
        total = sum(self.times.values())
        if not total:
            return None
        rank, seen = max(1, math.ceil(q * total)), 0
        for value in sorted(self.times):
            seen += self.times[value]
            if seen >= rank:
                return value
        return max(self.times)


def judge(tally: Tally, *, max_rate: int, min_requests: int) -> bool:
    """At the end of a window: whether the new container failed real traffic (enough requests, and a 5xx
    share above the limit)."""
    return tally.requests >= max(1, min_requests) and tally.errors * 100 > max_rate * tally.requests


EARLY_Z = 2.576  # 99%: judged on every poll, a release below the limit must not be switched back by chance
STEP_MIN_FLOOR = 3  # a canary step's early rule never judges fewer requests than this (or WATCH_MIN_REQUESTS)


def early_min_requests(min_requests: int, percent: int = 100) -> int:
    """Requests the early rule needs in a window that gets `percent` of the traffic: WATCH_MIN_REQUESTS scaled
    to the share, at least STEP_MIN_FLOOR (or WATCH_MIN_REQUESTS if smaller). A canary step exists to limit
    exposure: at 10% its requests arrive ten times slower while one client in ten meets the release, so waiting
    for the full count would expose about as many clients as the watch does. The price, simulated in
    tests/test_watch_logic.py: a release at 40% of the limit is switched back in about 1 step in 100 instead of
    1 in 500."""
    if percent >= 100 or min_requests <= STEP_MIN_FLOOR:
        return min_requests
    return max(STEP_MIN_FLOOR, -(-min_requests * percent // 100))


def rule_text(min_requests: int, early_min: int) -> str:
    """How a window judges, the same words in a deploy's step line and in --dry-run."""
    if early_min >= min_requests:
        return f"judged from {min_requests} requests"
    return f"judged from {min_requests} requests, or {early_min} on strong evidence"


def judge_early(tally: Tally, *, max_rate: int, min_requests: int) -> bool:
    """During a window, judged again on every poll: only on strong evidence, i.e. even the lower bound of the
    5xx share's 99% confidence interval (Wilson) lies above the limit. A release failing every request is
    stopped after a handful; one just under the limit is not stopped by a streak of bad luck, nor by one 5xx."""
    n = tally.requests
    if n < max(1, min_requests):
        return False
    if max_rate <= 0:
        return tally.errors > 0
    if tally.errors < 2:  # one 5xx among a canary step's first few requests would clear a 1% limit's bound
        return False
    p, z2 = tally.errors / n, EARLY_Z * EARLY_Z
    low = (p + z2 / (2 * n) - EARLY_Z * ((p * (1 - p) + z2 / (4 * n)) / n) ** 0.5) / (1 + z2 / n)
    return low * 100 > max_rate


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.0f} s"


def describe(tally: Tally, seconds: float) -> str:
    text = f"{tally.requests} request(s) in {seconds:.1f} s, {tally.errors} answered 5xx ({tally.percent:.0f}%)"
    median, p99 = tally.quantile(0.5), tally.quantile(0.99)
    if median is not None and p99 is not None:
        text += f", request time median {_ms(median)}, p99 {_ms(p99)}"
    return text


class LogTail:
    """The lines appended to a log since a point, read in bounded pieces; follows a rotation (the file
    replaced or truncated). Never follows a symlink, never blocks on a FIFO."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: int | None = None
        self.inode: tuple[int, int] | None = None
        self.offset = 0
        self.partial = b""
        self.lines_read = 0  # any line at all: none after the verify probe means the watch is blind

    def start(self) -> None:
        """From the end of the log as it is now (nothing logged before the switch is counted)."""
        self._open()
        if self.fd is not None:
            self.offset = os.fstat(self.fd).st_size

    def _open(self) -> None:
        self.close()
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ELOOP, errno.EACCES, errno.ENXIO):
                return  # not there yet (nginx creates it at the first request), or not a file to read
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return
        self.fd, self.inode, self.offset, self.partial = fd, (st.st_dev, st.st_ino), 0, b""

    def read(self) -> list[str]:
        """Complete lines appended since the last read (at most READ_MAX bytes of them)."""
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except OSError:
            st = None
        if st is not None and stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) != self.inode:
            self._open()  # rotated: the new file from its start (what the old one got since the last read is lost)
        if self.fd is None:
            return []
        size = os.fstat(self.fd).st_size
        if size < self.offset:  # truncated in place (copytruncate)
            self.offset, self.partial = 0, b""
        data = os.pread(self.fd, min(READ_MAX, max(0, size - self.offset)), self.offset)
        self.offset += len(data)
        data = self.partial + data
        lines = data.split(b"\n")
        self.partial = lines.pop()[-LINE_MAX:]
        self.lines_read += len(lines)
        return [line[:LINE_MAX].decode("utf-8", "replace") for line in lines]

    def problem(self) -> str:
        """Why the log cannot be read as the watch needs it ("" : it can, or it does not exist yet)."""
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except OSError:
            return ""
        if stat.S_ISLNK(st.st_mode):
            return f"{self.path} is a symbolic link (never followed)"
        if not stat.S_ISREG(st.st_mode):
            return f"{self.path} is not a regular file"
        return "" if self.fd is not None else f"{self.path} cannot be opened"

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# -- promote / abort from another shell --------------------------------------------------------------------
PROMOTE, ABORT = "promote", "abort"


def request_path(watch_file) -> object:
    return watch_file.with_name(watch_file.name + "-request")


def read_request(watch_file, root) -> str:
    """What `bluegreen promote|abort` asked of the running watch ("" : nothing)."""
    from bluegreen import safefs

    try:
        text = safefs.read_text(request_path(watch_file), root=root, max_bytes=256)
    except (OSError, safefs.UnsafePath):
        return ""
    word = (text or "").split()[:1]
    return word[0] if word and word[0] in (PROMOTE, ABORT) else ""
