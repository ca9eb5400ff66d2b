"""A small HTTP/1.1 client: one deadline for the whole request (DNS, connect, TLS, send, answer) and a byte cap.

urllib's `timeout` bounds each socket read, so an endpoint that trickles one byte a second holds a request
forever; this client checks one deadline before every socket operation instead. Proxies are never used
(no http_proxy/https_proxy/no_proxy): probes go to 127.0.0.1, and a webhook either answers or does not.
Redirects are never followed: the caller sees the 3xx status.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

MAX_ANSWER = 64 * 1024  # status line + headers + body; more is cut and reported, never read

# Kinds of failure, so callers can word them their own way.
REFUSED = "refused"
TIMEOUT = "timeout"
CLOSED = "closed"  # the server closed the connection before a complete status line and headers
DNS = "dns"
TLS = "tls"
BAD_ANSWER = "bad-answer"
TOO_LARGE = "too-large"
BAD_URL = "bad-url"
NETWORK = "network"

Address = Sequence[object]
Resolver = Callable[[str, int], "list[tuple[int, Address]]"]


class HttpError(Exception):
    """A request that got no usable answer; `detail` never contains the URL (it can be a secret)."""

    def __init__(self, kind: str, detail: str, status: int | None = None) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.status = status  # set when a status line arrived but the rest of the answer did not


@dataclass(frozen=True)
class Response:
    status: int
    reason: str
    headers: dict = field(default_factory=dict)
    body: bytes = b""
    truncated: bool = False  # the answer was larger than the cap: cut there, the rest never read


def request(
    method: str,
    url: str,
    *,
    timeout: float,
    headers: Mapping[str, str] | None = None,
    body: bytes = b"",
    max_bytes: int = MAX_ANSWER,
    context: object | None = None,
    resolve: Resolver | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Response:
    """Send one request and read its answer, all within `timeout` seconds; raises HttpError."""
    # NaN, negative or absurdly large values never reach the socket layer (which raises OverflowError).
    timeout = min(float(timeout), 1e6) if timeout > 0 else 0.0
    deadline = clock() + timeout

    def remaining() -> float:
        left = deadline - clock()
        if left <= 0:
            raise HttpError(TIMEOUT, f"no answer within {timeout:g}s")
        return left

    scheme, host, port, target = _split(url)
    wire = _request_bytes(method, host, port, scheme, target, headers or {}, body)
    sock = _connect(host, port, remaining, resolve or _getaddrinfo, timeout)
    try:
        if scheme == "https":
            sock = _tls(sock, host, context, remaining, timeout)
        _send(sock, wire, remaining, timeout)
        return _read_answer(sock, method, max_bytes, remaining, timeout)
    finally:
        try:
            sock.close()
        except OSError:
            pass


def _split(url: str) -> tuple[str, str, int, str]:
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        raise HttpError(BAD_URL, "the URL is not valid") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise HttpError(BAD_URL, "the URL is not an http:// or https:// URL")
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    if re.search(r"[\x00-\x20\x7f]", target) or re.search(r"[\x00-\x20\x7f]", parts.hostname):
        raise HttpError(BAD_URL, "the URL contains a space or a control character")
    # Non-ASCII characters go out percent-encoded as UTF-8 (what a browser sends), never as raw bytes.
    target = urllib.parse.quote(target, safe="".join(chr(c) for c in range(0x21, 0x7F)))
    return scheme, parts.hostname, port or (443 if scheme == "https" else 80), target


def _request_bytes(method: str, host: str, port: int, scheme: str, target: str, headers: Mapping[str, str],
                   body: bytes) -> bytes:
    default_port = 443 if scheme == "https" else 80
    shown = f"[{host}]" if ":" in host else host
    lines = {"host": ("Host", shown if port == default_port else f"{shown}:{port}"),
             "user-agent": ("User-Agent", "bluegreen"), "accept": ("Accept", "*/*")}
    for key, value in headers.items():
        lines[key.lower()] = (key, value)
    lines["connection"] = ("Connection", "close")
    if body or method.upper() in ("POST", "PUT"):
        lines["content-length"] = ("Content-Length", str(len(body)))
    out = [f"{method.upper()} {target} HTTP/1.1"]
    for key, value in lines.values():
        if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", key) or re.search(r"[\x00-\x08\x0a-\x1f\x7f]", value):
            raise HttpError(BAD_URL, f"the {key} header contains a character HTTP does not allow")
        out.append(f"{key}: {value}")
    try:
        head = ("\r\n".join(out) + "\r\n\r\n").encode("latin-1")
    except UnicodeEncodeError:
        raise HttpError(BAD_URL, "a header value is not plain text (latin-1)") from None
    return head + body


def _getaddrinfo(host: str, port: int) -> list:
    return [(family, addr) for family, _t, _p, _c, addr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def _addresses(host: str, port: int, resolve: Resolver, remaining: Callable[[], float], timeout: float) -> list:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return [(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, (host, port))]
    # getaddrinfo has no timeout: resolve in a daemon thread and stop waiting at the deadline (the thread
    # ends on its own when the resolver gives up; it holds no lock and writes only its own box).
    box: dict = {}

    def lookup() -> None:
        try:
            box["found"] = list(resolve(host, port))
        except BaseException as exc:  # noqa: BLE001 - reported below, never raised in the thread
            box["error"] = exc

    worker = threading.Thread(target=lookup, name="bluegreen-dns", daemon=True)
    worker.start()
    worker.join(remaining())
    if worker.is_alive():
        raise HttpError(TIMEOUT, f"no answer within {timeout:g}s (the host name did not resolve in time)")
    if "error" in box or not box.get("found"):
        raise HttpError(DNS, "the host name does not resolve")
    return box["found"]


def _connect(host: str, port: int, remaining: Callable[[], float], resolve: Resolver, timeout: float) -> socket.socket:
    refused = False
    last: OSError | None = None
    for family, addr in _addresses(host, port, resolve, remaining, timeout):
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(remaining())
            sock.connect(tuple(addr))
            return sock
        except socket.timeout:
            sock.close()
            raise HttpError(TIMEOUT, f"no answer within {timeout:g}s") from None
        except ConnectionRefusedError as exc:
            refused, last = True, exc
        except OSError as exc:
            last = exc
        except BaseException:
            sock.close()
            raise
        sock.close()
    if refused:
        raise HttpError(REFUSED, "connection refused")
    raise HttpError(NETWORK, _os_words(last))


def _tls(sock: socket.socket, host: str, context: object | None, remaining: Callable[[], float],
         timeout: float) -> socket.socket:
    import ssl  # only when needed: a Python built without ssl still probes over plain HTTP

    ctx = context if context is not None else ssl.create_default_context()
    try:
        tls = ctx.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)  # type: ignore[attr-defined]
        # CPython bounds the whole handshake by the socket timeout (one deadline, not per read).
        tls.settimeout(remaining())
        tls.do_handshake()
        return tls
    except socket.timeout:
        sock.close()
        raise HttpError(TIMEOUT, f"no answer within {timeout:g}s (TLS handshake)") from None
    except ssl.SSLCertVerificationError as exc:
        sock.close()
        raise HttpError(TLS, f"TLS certificate not accepted: {exc.verify_message or 'verification failed'}") from None
    except (ssl.SSLError, OSError) as exc:
        sock.close()
        raise HttpError(TLS, f"TLS handshake failed ({getattr(exc, 'reason', None) or type(exc).__name__})") from None


def _send(sock: socket.socket, data: bytes, remaining: Callable[[], float], timeout: float) -> None:
    view = memoryview(data)
    while view:
        try:
            sock.settimeout(remaining())
            sent = sock.send(view[:65536])
        except socket.timeout:
            raise HttpError(TIMEOUT, f"no answer within {timeout:g}s (the request could not be sent)") from None
        except OSError as exc:
            raise HttpError(CLOSED if isinstance(exc, ConnectionError) else NETWORK,
                            "connection closed while sending the request") from None
        view = view[sent:]


_STATUS = re.compile(rb"HTTP/(\d)\.(\d) +(\d{3})(?: ([^\r\n]*))?\r?")


def _read_answer(sock: socket.socket, method: str, max_bytes: int, remaining: Callable[[], float],
                 timeout: float) -> Response:
    buf = bytearray()
    eof = False
    status: int | None = None

    def more(want: int) -> bool:
        """Read up to `want` more bytes; False at end of stream."""
        nonlocal eof
        if eof or want <= 0:
            return False
        try:
            sock.settimeout(remaining())
            chunk = sock.recv(min(want, 65536))
        except socket.timeout:
            if status is None:
                raise HttpError(TIMEOUT, f"no answer within {timeout:g}s") from None
            raise HttpError(TIMEOUT, f"HTTP {status}, but the answer did not finish within {timeout:g}s",
                            status) from None
        except HttpError as exc:
            exc.status = status
            if status is not None:
                exc.detail = f"HTTP {status}, but the answer did not finish within {timeout:g}s"
            raise
        except OSError:
            if status is None and not buf:
                raise HttpError(CLOSED, "connection closed without an answer") from None
            chunk = b""  # a reset after a complete answer is an ordinary end of stream
        if not chunk:
            eof = True
            return False
        buf.extend(chunk)
        return True

    # Status line and headers (skipping interim 1xx answers), all inside the byte cap.
    while True:
        end = _head_end(buf)
        while end < 0:
            if len(buf) >= max_bytes:
                raise HttpError(TOO_LARGE, f"the answer's headers are larger than {_size(max_bytes)} (cut, not read further)")
            if not more(max_bytes - len(buf)):
                if not buf:
                    raise HttpError(CLOSED, "connection closed without an answer")
                raise HttpError(BAD_ANSWER, "the connection closed in the middle of the answer's headers")
            end = _head_end(buf)
        head = bytes(buf[:end])
        del buf[:end]
        lines = head.split(b"\n")
        match = _STATUS.fullmatch(lines[0])
        if not match:
            raise HttpError(BAD_ANSWER, "the answer is not HTTP")
        code = int(match.group(3))
        if 100 <= code < 200 and code != 101:
            max_bytes -= len(head)
            continue
        status = code
        reason = (match.group(4) or b"").decode("latin-1").strip()
        headers = _headers(lines[1:])
        used = len(head)
        break

    cap = max(0, max_bytes - used)
    lowered = {k.lower(): v for k, v in headers.items()}
    if method.upper() == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return Response(status, reason, headers, b"", False)
    if "chunked" in lowered.get("transfer-encoding", "").lower():
        decoder = _Dechunker()
        while True:
            done = decoder.feed(buf, cap)
            if done:
                return Response(status, reason, headers, decoder.body(), False)
            if len(buf) >= cap:
                return Response(status, reason, headers, decoder.body(), True)
            if not more(cap - len(buf)):
                raise HttpError(BAD_ANSWER, f"HTTP {status}, but the connection closed in the middle of the answer",
                                status)
    length = lowered.get("content-length", "").strip()
    if length:
        # ASCII digits only, and few enough for int(): str.isdigit() takes '²', and Python 3.11+ refuses more
        # than 4300 digits; either used to escape as a ValueError.
        if not re.fullmatch(r"[0-9]{1,18}", length):
            raise HttpError(BAD_ANSWER, f"HTTP {status}, but its Content-Length is not a number", status)
        want = int(length)
        while len(buf) < min(want, cap) and more(min(want, cap) - len(buf)):
            pass
        if len(buf) < min(want, cap):
            raise HttpError(BAD_ANSWER, f"HTTP {status}, but the connection closed in the middle of the answer", status)
        return Response(status, reason, headers, bytes(buf[:want]), want > cap)
    while len(buf) < cap and more(cap - len(buf)):
        pass
    # Without a length, the answer ends when the server closes, unless the cap came first: then it is cut.
    truncated = not eof and len(buf) >= cap
    return Response(status, reason, headers, bytes(buf[:cap]), truncated)


def _head_end(buf: bytearray) -> int:
    """Index just past the blank line ending the headers, or -1."""
    crlf = buf.find(b"\r\n\r\n")
    lf = buf.find(b"\n\n")
    ends = [i + 4 for i in (crlf,) if i >= 0] + [i + 2 for i in (lf,) if i >= 0]
    return min(ends) if ends else -1


def _headers(lines: list) -> dict:
    headers: dict = {}
    for raw in lines:
        line = raw.rstrip(b"\r").decode("latin-1")
        if not line:
            continue
        name, sep, value = line.partition(":")
        if sep and name.strip() and name == name.strip():
            headers[name] = value.strip()
    return headers


class _Dechunker:
    """Incremental decoder of a chunked body: `feed` is called with the whole raw buffer each time."""

    def __init__(self) -> None:
        self.pos = 0
        self.parts: list = []
        self.trailers = False

    def feed(self, raw: bytearray, cap: int) -> bool:
        while True:
            eol = raw.find(b"\n", self.pos)
            if eol < 0:
                return False
            line = bytes(raw[self.pos:eol]).strip()
            if self.trailers:
                self.pos = eol + 1
                if not line:
                    return True
                continue
            size_text = line.split(b";", 1)[0].strip()
            if not re.fullmatch(rb"[0-9A-Fa-f]{1,16}", size_text):
                raise HttpError(BAD_ANSWER, "the answer's chunked body is malformed")
            size = int(size_text, 16)
            if size == 0:
                self.pos = eol + 1
                self.trailers = True
                continue
            start = eol + 1
            if start + size > cap and len(raw) >= cap:
                self.parts.append(bytes(raw[start:cap]))  # cut at the cap: the caller stops reading
                self.pos = len(raw)
                return False
            if start + size + 1 > len(raw):
                return False
            self.parts.append(bytes(raw[start:start + size]))
            nxt = raw.find(b"\n", start + size)
            if nxt < 0:
                return False
            self.pos = nxt + 1

    def body(self) -> bytes:
        return b"".join(self.parts)


def _size(n: int) -> str:
    return f"{n // 1024} KiB" if n >= 1024 and n % 1024 == 0 else f"{n} bytes"


def _os_words(exc: OSError | None) -> str:
    # strerror only: an OSError's str() can carry the address, never needed to act on the message.
    if exc is None:
        return "the host has no address to connect to"
    return (exc.strerror or type(exc).__name__).lower() if isinstance(exc, OSError) else "network error"
