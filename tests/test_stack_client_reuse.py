"""Real-stack proof of README's known limit for clients that do not retry: each nginx reload closes the idle
keep-alive connections clients hold to nginx, so such a client fails once per idle connection per deploy,
GETs and POSTs alike; a client that checks a pooled connection before reusing it (as urllib3 does) or that
retries on a fresh connection sees no failure. This documents nginx's behaviour; nothing here is a bluegreen
defect to fix, and the test fails if the documented numbers stop being true."""

from __future__ import annotations

import http.client
import select

import pytest

from test_stack_deploy import deploy_ok

IDLE = 4  # idle keep-alive connections each client holds to nginx across the deploy


def request(conn: http.client.HTTPConnection, method: str) -> int:
    """One request on `conn` (kept open: HTTP/1.1 keep-alive); the status, or raises if the connection was closed."""
    if method == "POST":
        conn.request("POST", "/cgi-bin/env?VERSION", body=b"order=1", headers={"Content-Type": "text/plain"})
    else:
        conn.request("GET", "/version")
    resp = conn.getresponse()
    resp.read()
    assert not resp.will_close, "nginx closed the client connection after one answer: no keep-alive to test"
    return resp.status


def dropped(conn: http.client.HTTPConnection) -> bool:
    """urllib3's check before reusing a pooled connection: a readable idle socket means the peer closed it."""
    return conn.sock is None or bool(select.select([conn.sock], [], [], 0)[0])


def open_idle(project, count: int) -> list:
    conns = []
    for _ in range(count):
        conn = http.client.HTTPConnection("127.0.0.1", project.nginx_port, timeout=10)
        assert request(conn, "GET") == 200
        conns.append(conn)
    return conns


@pytest.fixture
def served(project):
    project.write_env()
    deploy_ok(project, "v1")
    project.serve()
    return project


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_a_client_that_does_not_retry_fails_once_per_idle_connection_per_deploy(served, method):
    conns = open_idle(served, IDLE)
    try:
        deploy_ok(served, "v2")  # returns once every old nginx worker has exited
        failures = 0
        for conn in conns:
            try:
                assert request(conn, method) == 200
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                failures += 1
        assert failures == IDLE, f"{failures} of {IDLE} idle connections failed"
        # A new connection is served by the new version at once.
        fresh = http.client.HTTPConnection("127.0.0.1", served.nginx_port, timeout=10)
        fresh.request("GET", "/version")
        assert fresh.getresponse().read() == b"v2"
        fresh.close()
    finally:
        for conn in conns:
            conn.close()


def test_a_client_that_checks_or_retries_sees_no_failure(served):
    checked, retried = open_idle(served, IDLE), open_idle(served, IDLE)
    try:
        deploy_ok(served, "v2")
        statuses = []
        for conn in checked:  # check before reuse, reconnect if dropped; never retry a sent request
            if dropped(conn):
                conn.close()  # http.client connects again on the next request
            statuses.append(request(conn, "POST"))
        for conn in retried:  # retry an idempotent GET once on a fresh connection
            try:
                statuses.append(request(conn, "GET"))
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                conn.close()
                statuses.append(request(conn, "GET"))
        assert statuses == [200] * (2 * IDLE)
    finally:
        for conn in checked + retried:
            conn.close()
