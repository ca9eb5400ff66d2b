"""Health polling: bounded by a deadline, with the clock and sleep injected so tests take no time."""

from __future__ import annotations

import http.client
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable, Mapping


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


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # A redirect is an answer in itself (often to a login page): report it, do not follow it.
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[override]
        return None


# No proxy: an http_proxy in a CI environment must never intercept requests to 127.0.0.1.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())


def http_probe(url: str, *, timeout: float, host: str = "", headers: Mapping[str, str] | None = None) -> Probe:
    """GET `url` once; never raises for network or HTTP errors."""
    req = urllib.request.Request(url, method="GET")
    if host:
        req.add_header("Host", host)
    for key, value in (headers or {}).items():
        req.add_header(key, value)
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            resp.read(65536)
            return Probe(resp.status, f"HTTP {resp.status}", dict(resp.headers.items()))
    except urllib.error.HTTPError as exc:
        hdrs = dict(exc.headers.items()) if exc.headers else {}
        exc.close()
        return Probe(exc.code, f"HTTP {exc.code}", hdrs)
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, ConnectionRefusedError):
            return Probe(None, "connection refused")
        if isinstance(reason, socket.timeout):
            return Probe(None, f"no answer within {timeout:g}s")
        return Probe(None, str(reason))
    except (socket.timeout, TimeoutError):
        return Probe(None, f"no answer within {timeout:g}s")
    except (ConnectionResetError, http.client.RemoteDisconnected):
        # Typical while an app (or docker's port proxy in front of it) is still starting.
        return Probe(None, "connection closed without an answer")
    except (ConnectionError, http.client.HTTPException, OSError) as exc:
        return Probe(None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)


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
