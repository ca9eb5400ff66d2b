"""Health polling: bounded by a deadline, with the clock and sleep injected so tests take no time."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Mapping

from bluegreen import http_client


@dataclass(frozen=True)
class Probe:
    """One health request: the HTTP status (None when no answer) and a short description."""

    status: int | None
    detail: str
    headers: Mapping[str, str] | None = None


@dataclass(frozen=True)
class HealthResult:
    healthy: bool
    elapsed: float
    attempts: int
    last: Probe | None
    died: str | None = None  # set when the container stopped while we waited


def http_probe(url: str, *, timeout: float, host: str = "", headers: Mapping[str, str] | None = None) -> Probe:
    """GET `url` once, all of it (connect, headers, body) within `timeout`; never raises for network or HTTP errors.

    No proxy, no redirect followed (a 3xx is an answer: often a login page), at most 64 KiB read.
    """
    sent = dict(headers or {})
    if host:
        sent["Host"] = host
    try:
        resp = http_client.request("GET", url, timeout=timeout, headers=sent)
    except http_client.HttpError as exc:
        return Probe(None, exc.detail)
    except Exception as exc:  # noqa: BLE001 - a probe must never break the step that polls it
        return Probe(None, f"the request failed ({type(exc).__name__})")
    detail = f"HTTP {resp.status}"
    if resp.truncated:
        detail += f" (answer larger than {http_client.MAX_ANSWER // 1024} KiB: cut there, not read further)"
    return Probe(resp.status, detail, resp.headers)


def wait_healthy(
    probe: Callable[[float], Probe],
    *,
    expect: int,
    timeout: float,
    interval: float,
    initial_delay: float = 0.0,
    request_timeout: float = 2.0,
    alive: Callable[[], str | None] | None = None,
    alive_every: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> HealthResult:
    """Probe until the status is `expect`, the deadline passes, or `alive()` reports a death.

    `probe(t)` makes one request with a timeout of t seconds; `alive()` returns None while the
    container runs, else a description of how it ended (checked every `alive_every` s, first after
    `alive_every`: the caller has just started the container, and each check is a docker call).
    """
    start = clock()
    deadline = start + timeout
    if initial_delay > 0:
        sleep(min(initial_delay, timeout))
    attempts = 0
    last: Probe | None = None
    next_alive_check = clock() + alive_every
    while True:
        now = clock()
        if alive is not None and now >= next_alive_check:
            died = alive()
            if died is not None:
                return HealthResult(False, now - start, attempts, last, died)
            next_alive_check = now + alive_every
        remaining = deadline - now
        if remaining <= 0:
            # One last look, so a container that died (even in the last partial second, or with a
            # HEALTH_TIMEOUT under alive_every) is reported as a crash, not as slow.
            died = alive() if alive is not None else None
            return HealthResult(False, now - start, attempts, last, died)
        attempts += 1
        last = probe(max(0.05, min(request_timeout, remaining)))
        if last.status == expect:
            return HealthResult(True, clock() - start, attempts, last)
        pause = min(interval, deadline - clock())
        if pause > 0:
            sleep(pause)
