"""Every HTTP request bluegreen makes (health, verify, status, webhook) ends by its deadline and reads at most 64 KiB.

The servers here are real sockets on 127.0.0.1, each misbehaving the way a broken or hostile endpoint does.
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import threading
import time

import pytest

from bluegreen import health, http_client, notify
from bluegreen.health import http_probe, wait_healthy

MARGIN = 1.0


class Hostile:
    """A TCP server on 127.0.0.1 that runs `behave(conn, stop)` for each connection, in its own thread."""

    def __init__(self, behave, wrap=None):
        self.behave = behave
        self.wrap = wrap
        self.stop = threading.Event()
        self.requests: list = []
        self.conns: list = []
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, path="/health", scheme="http", host="127.0.0.1"):
        return f"{scheme}://{host}:{self.port}{path}"

    def _accept(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        try:
            if self.wrap:
                conn = self.wrap(conn)
                self.conns.append(conn)
            self.behave(conn, self)
        except (OSError, ValueError):
            pass

    def read_request(self, conn) -> bytes:
        conn.settimeout(5)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                want = int(line.split(b":")[1])
                while len(body) < want:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    body += chunk
        self.requests.append(head + b"\r\n\r\n" + body)
        return data

    def trickle(self, conn, data: bytes, every: float = 0.5):
        for i in range(len(data)):
            if self.stop.wait(every if i else 0):
                return
            conn.sendall(data[i:i + 1])

    def close(self):
        self.stop.set()
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass
        self.sock.close()


@pytest.fixture
def hostile():
    servers = []

    def start(behave, wrap=None):
        server = Hostile(behave, wrap)
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for s in servers:
            s.close()


def within(limit, fn):
    """Run fn in a thread; (result, seconds) if it returns within `limit`, else fail (the old code hung here)."""
    box = {}

    def go():
        t0 = time.monotonic()
        box["result"] = fn()
        box["elapsed"] = time.monotonic() - t0

    worker = threading.Thread(target=go, daemon=True)
    worker.start()
    worker.join(limit + 5)
    assert "elapsed" in box, f"still running after {limit + 5:g}s (bound was {limit:g}s)"
    assert box["elapsed"] < limit, f"took {box['elapsed']:.1f}s, bound {limit:g}s"
    return box["result"]


def trickle_status(conn, srv):
    srv.read_request(conn)
    srv.trickle(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")


def trickle_headers(conn, srv):
    srv.read_request(conn)
    conn.sendall(b"HTTP/1.1 200 OK\r\n")
    srv.trickle(conn, b"X-Slow: " + b"a" * 200 + b"\r\n\r\n")


def trickle_body(conn, srv):
    srv.read_request(conn)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
    srv.trickle(conn, b"b" * 100)


def trickle_chunked(conn, srv):
    srv.read_request(conn)
    conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    srv.trickle(conn, b"64\r\n" + b"c" * 100 + b"\r\n0\r\n\r\n")


def endless_body(conn, srv):
    srv.read_request(conn)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
    while not srv.stop.is_set():
        conn.sendall(b"x" * 65536)


def silent(conn, srv):
    srv.stop.wait(30)


def huge_headers(conn, srv):
    srv.read_request(conn)
    conn.sendall(b"HTTP/1.1 200 OK\r\n")
    line = b"X-Pad: " + b"p" * 1000 + b"\r\n"
    for _ in range(10 * 1024):  # 10 MB of headers
        if srv.stop.is_set():
            return
        conn.sendall(line)


TRICKLERS = [trickle_status, trickle_headers, trickle_body, trickle_chunked, silent]


@pytest.mark.parametrize("behave", TRICKLERS, ids=lambda f: f.__name__)
def test_http_probe_ends_by_its_deadline_whatever_the_server_trickles(hostile, behave):
    srv = hostile(behave)
    probe = within(2 + MARGIN, lambda: http_probe(srv.url(), timeout=2))
    assert probe.status is None and "within 2s" in probe.detail


@pytest.mark.parametrize("behave", TRICKLERS, ids=lambda f: f.__name__)
def test_webhook_ends_by_its_deadline_whatever_the_server_trickles(hostile, behave):
    srv = hostile(behave)
    problem = within(2 + MARGIN, lambda: notify.send(srv.url("/services/SECRET"), {"text": "x"}, timeout=2))
    assert problem and "within 2s" in problem and "SECRET" not in problem


def test_wait_healthy_with_a_trickling_endpoint_ends_by_health_timeout(hostile):
    srv = hostile(trickle_body)
    result = within(3 + MARGIN, lambda: wait_healthy(lambda t: http_probe(srv.url(), timeout=t), expect=200,
                                                     timeout=3, interval=0.1, request_timeout=2))
    assert not result.healthy and result.last is not None and "did not finish" in result.last.detail


def test_an_endless_body_is_cut_at_64_kib_and_the_status_kept(hostile):
    srv = hostile(endless_body)
    probe = within(2, lambda: http_probe(srv.url(), timeout=5))
    assert probe.status == 200 and "cut" in probe.detail
    resp = http_client.request("GET", srv.url(), timeout=5)
    assert resp.truncated and len(resp.body) <= http_client.MAX_ANSWER
    assert notify.send(srv.url(), {"text": "x"}, timeout=5) is None  # a 200 is a delivery, however long


def test_ten_megabytes_of_headers_are_refused_after_64_kib(hostile):
    srv = hostile(huge_headers)
    probe = within(2, lambda: http_probe(srv.url(), timeout=5))
    assert probe.status is None and "larger than 64 KiB" in probe.detail
    problem = within(2, lambda: notify.send(srv.url(), {"text": "x"}, timeout=5))
    assert problem and "larger than 64 KiB" in problem


def ok_server(conn, srv):
    req = srv.read_request(conn)
    body = json.dumps({"path": req.split(b" ")[1].decode()}).encode()
    conn.sendall(b"HTTP/1.1 200 OK\r\nX-Bluegreen-Upstream: 127.0.0.1:8081\r\nContent-Length: %d\r\n\r\n%s"
                 % (len(body), body))


def test_probe_sends_host_and_headers_and_reads_a_normal_answer(hostile):
    srv = hostile(ok_server)
    probe = http_probe(srv.url("/api/health?x=1"), timeout=2, host="api.example.com", headers={"X-Bluegreen-Probe": "tok"})
    assert probe.status == 200 and probe.detail == "HTTP 200"
    assert probe.headers["X-Bluegreen-Upstream"] == "127.0.0.1:8081"
    sent = srv.requests[0].decode()
    assert sent.startswith("GET /api/health?x=1 HTTP/1.1\r\n")
    assert "\r\nHost: api.example.com\r\n" in sent and "\r\nX-Bluegreen-Probe: tok\r\n" in sent


def test_probe_of_an_odd_path_never_raises(hostile):
    srv = hostile(ok_server)
    probe = http_probe(srv.url("/h\u00e9alth"), timeout=2)  # sent percent-encoded, as a browser would
    assert probe.status == 200 and srv.requests[0].startswith(b"GET /h%C3%A9alth HTTP/1.1")
    for bad in ("/a b", "/a\r\nX-Injected: 1", "/\x00"):
        probe = http_probe(srv.url(bad), timeout=2)
        assert probe.status is None and "control character" in probe.detail
    assert http_probe(srv.url(), timeout=2, host="evil\r\nX-Injected: 1").status is None
    assert len(srv.requests) == 1


def test_chunked_answers_are_decoded(hostile):
    def chunked(conn, srv):
        srv.read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n")
        srv.stop.wait(30)  # keeps the connection open: the client must stop at the last chunk, not wait for EOF

    srv = hostile(chunked)
    resp = within(1, lambda: http_client.request("GET", srv.url(), timeout=5))
    assert resp.status == 200 and resp.body == b"hello world" and not resp.truncated


def test_webhook_redirect_is_a_failed_delivery_never_followed(hostile):
    def redirect(conn, srv):
        req = srv.read_request(conn)
        if req.startswith(b"POST "):
            conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:%d/landed/TOKEN-IN-LOCATION\r\n"
                         b"Content-Length: 0\r\n\r\n" % srv.port)
        else:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    srv = hostile(redirect)
    problem = notify.send(srv.url("/services/SECRET"), {"text": "deployed"}, timeout=2)
    assert problem and "redirect" in problem and "302" in problem
    assert "SECRET" not in problem and "TOKEN" not in problem and "127.0.0.1" not in problem
    time.sleep(0.2)
    assert [r.split(b" ")[0] for r in srv.requests] == [b"POST"]  # the old client then sent a bodiless GET


def test_webhook_posts_json_and_ignores_proxy_variables(hostile, monkeypatch):
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # would refuse every request
    srv = hostile(ok_server)
    assert notify.send(srv.url("/services/T/B/X"), {"text": "hi"}, timeout=2) is None
    sent = srv.requests[0]
    assert sent.startswith(b"POST /services/T/B/X HTTP/1.1\r\n") and b"Content-Type: application/json" in sent
    assert json.loads(sent.split(b"\r\n\r\n", 1)[1]) == {"text": "hi"}
    assert http_probe(srv.url(), timeout=2).status == 200


def test_webhook_error_answers_and_garbage_are_warnings(hostile):
    def answer(status_line):
        def behave(conn, srv):
            srv.read_request(conn)
            conn.sendall(status_line)
            conn.close()
        return behave

    assert notify.send(hostile(answer(b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n")).url(), {}, timeout=2) \
        == "the webhook answered HTTP 500"
    assert "not HTTP" in notify.send(hostile(answer(b"\x00\xff garbage\r\n\r\n")).url(), {}, timeout=2)
    assert "closed" in notify.send(hostile(answer(b"")).url(), {}, timeout=2)


def test_slow_dns_is_bounded_by_the_deadline(monkeypatch):
    # No resolver on loopback can be made slow from a test, so the lookup function is replaced by one that
    # takes 10 s, like a resolver that does not answer (getaddrinfo itself has no timeout).
    def slow_lookup(*args, **kwargs):
        time.sleep(10)
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", slow_lookup)
    problem = within(1 + MARGIN, lambda: notify.send("https://hooks.example.invalid/services/SECRET", {}, timeout=1))
    assert problem and "did not resolve in time" in problem and "SECRET" not in problem and "example" not in problem
    with pytest.raises(http_client.HttpError) as exc:
        http_client.request("GET", "http://slow.example/", timeout=0.5, resolve=lambda h, p: time.sleep(5))
    assert exc.value.kind == http_client.TIMEOUT


def test_a_name_that_does_not_resolve_is_reported_without_the_name():
    def nothing(host, port):
        raise socket.gaierror(-2, f"Name or service not known: {host}")

    with pytest.raises(http_client.HttpError) as exc:
        http_client.request("POST", "https://secret-host.example/x", timeout=1, resolve=nothing)
    assert exc.value.kind == http_client.DNS and "secret" not in exc.value.detail


# --- TLS ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a self-signed certificate")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")], check=True, capture_output=True)
    return d / "cert.pem", d / "key.pem"


def tls_server(hostile, cert, behave, seen_names):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    ctx.sni_callback = lambda sslsock, name, c: seen_names.append(name)

    def wrap(conn):
        conn.settimeout(5)
        return ctx.wrap_socket(conn, server_side=True)

    return hostile(behave, wrap)


def test_https_webhook_verifies_the_certificate_and_sends_sni(hostile, cert):
    names: list = []
    srv = tls_server(hostile, cert, ok_server, names)
    trusting = ssl.create_default_context(cafile=str(cert[0]))
    assert notify.send(srv.url("/services/S", scheme="https", host="localhost"), {"text": "tls"}, timeout=3,
                       context=trusting) is None
    assert names == ["localhost"] and srv.requests[0].startswith(b"POST /services/S HTTP/1.1")
    # The same server without its CA: refused, and said so without the URL.
    problem = notify.send(srv.url("/services/SECRET", scheme="https", host="localhost"), {}, timeout=3)
    assert problem and "certificate" in problem and "SECRET" not in problem
    assert len(srv.requests) == 1


@pytest.mark.parametrize("behave", ["silent", "trickled handshake"])
def test_tls_handshake_is_inside_the_deadline(hostile, behave):
    def slow_tls(conn, srv):
        # Answers the ClientHello with a TLS record header, then one byte of the record per 0.5 s.
        srv.trickle(conn, b"\x16\x03\x03\x40\x00" + b"\x02" * 400)

    srv = hostile(slow_tls if behave != "silent" else silent)
    problem = within(1.5 + MARGIN, lambda: notify.send(srv.url("/SECRET", scheme="https"), {}, timeout=1.5))
    assert problem and "within 1.5s" in problem and "SECRET" not in problem


@pytest.mark.parametrize("timeout", [float("nan"), -1.0, 0.0, 1e308, float("inf")])
def test_odd_timeouts_never_raise(hostile, timeout):
    srv = hostile(ok_server)
    probe = http_probe(srv.url(), timeout=timeout)
    assert probe.status in (200, None) and "Error" not in probe.detail


def test_status_and_deploy_use_the_bounded_probe():
    from bluegreen import deploy, status

    assert deploy.Deployer.probe is health.http_probe or deploy.Deployer.__dataclass_fields__["probe"].default is health.http_probe
    assert status.http_probe is health.http_probe


# --- any answer: a Response or an HttpError, never another exception ----------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_header_line = st.one_of(
    st.sampled_from([b"Content-Length: 5", b"Content-Length: -1", b"Content-Length: 99999999999999999999",
                     b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip, chunked", b"X-Bluegreen-Upstream: x",
                     b": empty", b"no colon", b" leading: space"]),
    st.binary(max_size=40).filter(lambda b: b"\n" not in b),
)
_answer = st.one_of(
    st.binary(max_size=400),
    st.builds(
        lambda status, headers, sep, body: status + b"".join(h + sep for h in headers) + sep + body,
        st.sampled_from([b"HTTP/1.1 200 OK\r\n", b"HTTP/1.0 503\r\n", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No\r\n",
                         b"HTTP/1.1 302 Found\r\n", b"HTTP/9.9 999 X\n", b"HTTP/1.1 20 short\r\n", b"ICY 200 OK\r\n"]),
        st.lists(_header_line, max_size=6),
        st.sampled_from([b"\r\n", b"\n"]),
        st.one_of(st.binary(max_size=200), st.sampled_from([b"5\r\nhello\r\n0\r\n\r\n", b"zz\r\n", b"ffffffffffffffffff\r\n",
                                                            b"3\r\nab", b"0\r\nTrailer: x\r\n\r\n"])),
    ),
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answer=_answer, cap=st.sampled_from([16, 64, 65536]))
def test_any_answer_bytes_give_a_response_or_an_http_error(answer, cap):
    ours, theirs = socket.socketpair()
    try:
        theirs.sendall(answer)
        theirs.close()
        try:
            resp = http_client._read_answer(ours, "GET", cap, lambda: 1.0, 1.0)
        except http_client.HttpError as exc:
            assert exc.kind and exc.detail
        else:
            assert 100 <= resp.status <= 999 and len(resp.body) <= cap
    finally:
        ours.close()


@pytest.mark.parametrize("length", ["\u00b2", "9" * 5000, "-1", "1e3"])
def test_a_content_length_that_is_not_plain_digits_is_a_bad_answer_not_a_valueerror(length):
    import socket
    import threading

    from bluegreen import http_client

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def answer():
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: " + length.encode("latin-1", "replace") + b"\r\n\r\nok")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        with pytest.raises(http_client.HttpError):
            http_client.request("GET", f"http://127.0.0.1:{server.getsockname()[1]}/", timeout=5)
    finally:
        thread.join(timeout=5)
        server.close()
