"""A fault-injecting HTTP/1.1 reverse proxy, to test retries against real servers (moto, the hub).

Requests are forwarded to ``upstream`` with request and response bodies streamed in chunks, until a
fault matches. Each fault applies to the next ``count`` requests matching a method and a path pattern:

* :meth:`FaultProxy.add_fault`: answer with a status, body and headers instead of forwarding (a burst
  of ``count`` 503s, say), or drop the connection without an answer;
* :meth:`FaultProxy.add_latency`: forward, but only after a delay;
* :meth:`FaultProxy.add_reset`: cut the connection (TCP reset) after N bytes of the response body,
  or after N bytes of the request body (a reset in the middle of an upload);
* :meth:`FaultProxy.add_hang`: read the request and never answer, until the client gives up
  (its own read timeout) or the proxy stops;
* :meth:`FaultProxy.add_hold`: hold the request (unread) until the test releases it, then forward
  it: a client paused at one exact request, to interleave another actor there.

:meth:`FaultProxy.strip_headers` lasts until changed: it drops named request headers before
forwarding (an S3-compatible store that ignores ``If-None-Match`` / ``If-Match``) and named response
headers before relaying (an answer without ``Date``).

``requests`` logs ``(method, path, status, injected)``; ``exchanges`` logs the same with the fault's
kind and the body bytes read from the client and sent back, so a test can tell what was transferred.

**S3 SigV4 and the Host header.** A client signs the ``Host`` it connects to, i.e. the proxy's
``host:port``. The proxy forwards the ``Host`` header unchanged, so the upstream sees the signed value;
moto does not verify signatures, so this is fine for moto. (Real S3 behind this proxy would need the
client to sign the upstream's host instead.) botocore signs every request header but a few hop-by-hop
ones, ``If-None-Match`` and ``If-Match`` included, so a stripped request header also breaks the
signature: again only moto, which does not check it, accepts such a request.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import socket
import struct
import threading
import time
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler
from typing import Any, Literal, NamedTuple
from urllib.parse import urlsplit

from nimflow.testbed import TestbedError
from nimflow.testbed.background_server import BackgroundServer

__all__ = ["Exchange", "FaultProxy", "FaultResponse", "hub_error", "s3_error"]

log = logging.getLogger(__name__)

_CHUNK = 1024 * 1024
# RFC 9110 §7.6.1 hop-by-hop headers, plus Expect: the proxy answers 100-continue itself.
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
               "te", "trailer", "transfer-encoding", "upgrade", "expect"}
_S3_STATUS = {"ServiceUnavailable": 503, "SlowDown": 503, "InternalError": 500, "RequestTimeout": 400,
              "AccessDenied": 403, "NoSuchKey": 404, "NoSuchBucket": 404, "PreconditionFailed": 412,
              "ConditionalRequestConflict": 409}


class FaultResponse(NamedTuple):
    """A canned answer: unpacks as ``status, body, headers`` or spreads as ``add_fault(**r._asdict())``."""

    status: int
    body: bytes
    headers: dict[str, str]


def s3_error(code: str = "ServiceUnavailable", message: str = "Please reduce your request rate.",
             status: int | None = None) -> FaultResponse:
    """An S3-style XML error (status from ``code`` unless given), e.g. ``ServiceUnavailable`` → 503."""
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f"<RequestId>FAULTPROXY</RequestId></Error>").encode()
    return FaultResponse(status or _S3_STATUS.get(code, 500), body, {"Content-Type": "application/xml"})


def hub_error(status: int = 503, message: str = "Service Unavailable", error_code: str | None = None) -> FaultResponse:
    """A Hugging Face Hub-style JSON error ``{"error": message}``, optionally with ``X-Error-Code``."""
    headers = {"Content-Type": "application/json"}
    if error_code:
        headers["X-Error-Code"] = error_code
    return FaultResponse(status, json.dumps({"error": message}).encode(), headers)


class Exchange(NamedTuple):
    """One request through the proxy: what was asked, how it ended, and the body bytes moved.

    ``status`` is 0 when no answer was given (a drop, a reset before the headers, a hang);
    ``fault`` is None for a plain forward, else ``answer``, ``drop``, ``latency``, ``reset``, ``hang``.
    ``request_bytes`` counts the request body read from the client (forwarded to the upstream unless
    the fault answered instead), ``response_bytes`` the response body sent to the client.
    """

    method: str
    path: str
    status: int
    fault: str | None
    request_bytes: int
    response_bytes: int


FaultKind = Literal["answer", "drop", "latency", "reset", "hang", "hold"]


class _ClientGone(Exception):
    """The client closed its connection while sending the request body."""


class _Fault:
    def __init__(self, kind: FaultKind, method: str | None, pattern: str, count: int, *, status: int = 0,
                 body: bytes = b"", headers: dict[str, str] | None = None, delay: float = 0.0,
                 after_bytes: int = 0, of: str = "response") -> None:
        self.kind, self.method = kind, method.upper() if method else None
        self.pattern = re.compile(pattern)
        self.status, self.remaining, self.body = status, count, body
        self.headers, self.delay = dict(headers or {}), delay
        self.after_bytes, self.of = after_bytes, of
        self.gate = threading.Event()  # a hold: set to let the held requests through

    @property
    def drop(self) -> bool:
        return self.kind == "drop"

    def matches(self, method: str, path: str) -> bool:
        return self.remaining > 0 and self.method in (None, method) and self.pattern.search(path) is not None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: boto3 and httpx reuse connections
    server: Any  # QuietHTTPServer carrying .proxy

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("proxy %s - %s", self.address_string(), format % args)  # request line only

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # recorded explicitly, with the injected flag

    # --- request body ---------------------------------------------------------------------------
    def _body_chunks(self) -> Any:
        """Yield the request body in pieces, de-chunking ``Transfer-Encoding: chunked``."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size_line = self.rfile.readline(65537)
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                yield from self._read_exactly(size)
                self.rfile.readline(3)  # CRLF after the chunk
        else:
            yield from self._read_exactly(int(self.headers.get("Content-Length") or 0))

    def _read_exactly(self, size: int) -> Any:
        """Yield exactly ``size`` bytes of the request body, in pieces."""
        left = size
        while left:
            piece = self.rfile.read(min(left, _CHUNK))
            if not piece:
                raise _ClientGone("client closed mid-body")
            left -= len(piece)
            self._request_bytes += len(piece)
            yield piece

    # --- dispatch -------------------------------------------------------------------------------
    def _handle(self) -> None:
        proxy = self.server.proxy
        fault = proxy._take_fault(self.command, self.path)
        with proxy._lock:
            proxy._busy += 1
        self._request_bytes = self._response_bytes = 0
        self._status = 0
        try:
            if fault is None:
                self._forward()
            elif fault.kind == "latency":
                time.sleep(fault.delay)
                self._forward()
            elif fault.kind == "reset" and fault.of == "response":
                self._forward(cut_after=fault.after_bytes)
            elif fault.kind == "reset":
                self._reset_request(fault.after_bytes)
            elif fault.kind == "hang":
                self._hang()
            elif fault.kind == "hold":
                with proxy._lock:
                    proxy._holding += 1
                try:
                    fault.gate.wait()
                finally:
                    with proxy._lock:
                        proxy._holding -= 1
                self._forward()
            else:
                self._inject(fault)
        except (_ClientGone, OSError, http.client.HTTPException):
            # The client left, or the upstream died mid-response after our headers went out:
            # the only honest signal left is closing the connection.
            self.close_connection = True
        finally:
            proxy._exchange(Exchange(self.command, self.path, self._status, fault.kind if fault else None,
                                     self._request_bytes, self._response_bytes))

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = do_OPTIONS = _handle

    def _inject(self, fault: _Fault) -> None:
        for _ in self._body_chunks():
            pass  # drain, so the keep-alive connection stays in sync
        if fault.delay:
            time.sleep(fault.delay)
        self.server.proxy._record(self.command, self.path, 0 if fault.drop else fault.status, True)
        if fault.drop:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self._status = fault.status
        self.send_response(fault.status)
        for k, v in fault.headers.items():
            if k.lower() != "content-length":
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(fault.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(fault.body)
            self._response_bytes = len(fault.body)

    def _abort(self) -> None:
        """Reset the client's connection (RST, not an orderly FIN): SO_LINGER 0, then close."""
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()  # the fd closes (with RST) once the handler's files are closed too

    def _reset_request(self, after_bytes: int) -> None:
        """Read ``after_bytes`` of the request body (forwarding nothing), then reset the connection."""
        self.server.proxy._record(self.command, self.path, 0, True)
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            for _ in self._body_chunks():  # about after_bytes: whole pieces, never waiting past the body's end
                if self._request_bytes >= after_bytes:
                    break
        else:
            for _ in self._read_exactly(min(after_bytes, int(self.headers.get("Content-Length") or 0))):
                pass
        self._abort()

    def _hang(self) -> None:
        """Read the request, never answer; return once the client hangs up or the proxy stops."""
        proxy = self.server.proxy
        for _ in self._body_chunks():
            pass
        proxy._record(self.command, self.path, 0, True)
        with proxy._lock:
            proxy._hanging += 1
        try:
            self.connection.settimeout(0.2)
            while not proxy._released.is_set():
                try:
                    if not self.connection.recv(_CHUNK):
                        break  # the client gave up (its read timeout) and closed
                except TimeoutError:
                    continue
        finally:
            with proxy._lock:
                proxy._hanging -= 1
        self.close_connection = True

    def _forward(self, cut_after: int | None = None) -> None:
        proxy = self.server.proxy
        conn = http.client.HTTPConnection(proxy._up_host, proxy._up_port, timeout=proxy.timeout)
        try:
            chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
            try:
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                stripped = proxy._stripped_request
                for k, v in self.headers.items():
                    if k.lower() not in _HOP_BY_HOP and k.lower() not in stripped:
                        conn.putheader(k, v)  # Host included unchanged (see module docstring)
                if chunked:
                    conn.putheader("Transfer-Encoding", "chunked")
                conn.endheaders()
                for piece in self._body_chunks():
                    conn.send(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                if chunked:
                    conn.send(b"0\r\n\r\n")
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as e:  # upstream down or hung up: 502
                return self._bad_gateway(e)
            self._relay(resp, cut_after)
        finally:
            conn.close()

    def _bad_gateway(self, err: Exception) -> None:
        body = f"fault proxy: upstream error: {err}\n".encode()
        self.server.proxy._record(self.command, self.path, 502, False)
        self._status = 502
        self.close_connection = True  # the request body may be half-read
        self.send_response(502)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _relay(self, resp: http.client.HTTPResponse, cut_after: int | None = None) -> None:
        """Send the upstream's answer on; with ``cut_after``, reset the connection after that many body bytes."""
        self.server.proxy._record(self.command, self.path, resp.status, cut_after is not None)
        self._status = resp.status
        self.send_response_only(resp.status, resp.reason)
        length = resp.getheader("Content-Length")
        no_body = self.command == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200
        stripped = self.server.proxy._stripped_response
        for k, v in resp.getheaders():
            if k.lower() not in _HOP_BY_HOP and k.lower() not in stripped:
                self.send_header(k, v)
        rechunk = not no_body and length is None
        if rechunk:  # unknown length: chunk it, so the client connection can stay alive
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if no_body:
            return
        while piece := resp.read1(_CHUNK):
            if cut_after is not None and self._response_bytes + len(piece) >= cut_after:
                piece = piece[: cut_after - self._response_bytes]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if rechunk and piece else piece)
                self._response_bytes += len(piece)
                self._abort()
                return
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if rechunk else piece)
            self._response_bytes += len(piece)
        if rechunk:
            self.wfile.write(b"0\r\n\r\n")


class FaultProxy(BackgroundServer):
    """Reverse proxy to ``upstream`` (``http://host:port``) that injects faults on demand.

    ``requests`` is a snapshot of ``(method, path, status, injected)``; a dropped, reset or hung
    connection is logged with status 0, a response cut short with the status it had. ``exchanges``
    adds the fault's kind and the bytes moved (:class:`Exchange`). Usable as a context manager.
    """

    owner_attr = "proxy"
    handler = _Handler

    def __init__(self, upstream: str, host: str = "127.0.0.1", port: int = 0, *, timeout: float = 60.0) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise TestbedError(f"FaultProxy needs an http:// upstream, not {upstream!r}")
        super().__init__(host, port)
        self.upstream = upstream.rstrip("/")
        self._up_host, self._up_port = parts.hostname, parts.port or 80
        self.timeout = timeout
        self._faults: list[_Fault] = []
        self._exchanges: list[Exchange] = []
        self._hanging = 0
        self._holding = 0
        self._busy = 0  # requests being handled (hung ones included)
        self._settled = threading.Condition(self._lock)
        self._released = threading.Event()
        self._stripped_request: frozenset[str] = frozenset()
        self._stripped_response: frozenset[str] = frozenset()

    def add_fault(self, *, method: str | None = None, path_pattern: str = ".*", status: int = 503,
                  count: int = 1, body: bytes = b"", headers: dict[str, str] | None = None,
                  delay: float = 0.0, drop: bool = False) -> None:
        """Answer the next ``count`` requests matching ``method`` and ``path_pattern`` (``re.search``
        on path+query) with ``status``/``body``/``headers`` after ``delay`` seconds, instead of
        forwarding them (``count`` > 1: a burst). ``drop=True`` closes the connection without any
        answer instead. Faults are tried in the order added; each request consumes at most one."""
        self._arm(_Fault("drop" if drop else "answer", method, path_pattern, count, status=status, body=body,
                         headers=headers, delay=delay))

    def add_latency(self, seconds: float, *, method: str | None = None, path_pattern: str = ".*", count: int = 1) -> None:
        """Forward the next ``count`` matching requests, each only after ``seconds``."""
        if seconds < 0:
            raise ValueError("seconds must be >= 0")
        self._arm(_Fault("latency", method, path_pattern, count, delay=seconds))

    def add_reset(self, after_bytes: int, *, method: str | None = None, path_pattern: str = ".*", count: int = 1,
                  of: Literal["response", "request"] = "response") -> None:
        """Reset the connection of the next ``count`` matching requests after ``after_bytes`` bytes.

        ``of="response"``: the request is forwarded, the answer's headers and its first
        ``after_bytes`` body bytes reach the client, then the connection is reset (a download cut
        short). ``of="request"``: the proxy reads ``after_bytes`` of the request body, forwards
        nothing and resets (an upload cut short).
        """
        if after_bytes < 0:
            raise ValueError("after_bytes must be >= 0")
        if of not in ("response", "request"):
            raise ValueError("of must be 'response' or 'request'")
        self._arm(_Fault("reset", method, path_pattern, count, after_bytes=after_bytes, of=of))

    def add_hang(self, *, method: str | None = None, path_pattern: str = ".*", count: int = 1) -> None:
        """Read the next ``count`` matching requests and never answer them: the client waits until its
        own read timeout (or until the proxy stops)."""
        self._arm(_Fault("hang", method, path_pattern, count))

    def add_hold(self, *, method: str | None = None, path_pattern: str = ".*", count: int = 1) -> threading.Event:
        """Hold the next ``count`` matching requests until the returned event is set, then forward them.

        :attr:`holding` says how many are held now; :meth:`stop` releases them too.
        """
        fault = _Fault("hold", method, path_pattern, count)
        self._arm(fault)
        return fault.gate

    @property
    def holding(self) -> int:
        """How many requests a hold fault keeps waiting right now."""
        with self._lock:
            return self._holding

    def strip_headers(self, *, request: Iterable[str] = (), response: Iterable[str] = ()) -> None:
        """From now on, drop the ``request`` headers before forwarding and the ``response`` headers
        before relaying (names case-insensitive), on every forwarded request; replaces the previous
        setting (no names: strip nothing). A store that ignores conditional writes is
        ``request=("If-None-Match", "If-Match")``; an answer without a clock, ``response=("Date",)``."""
        self._stripped_request = frozenset(name.lower() for name in request)
        self._stripped_response = frozenset(name.lower() for name in response)

    def _arm(self, fault: _Fault) -> None:
        if fault.remaining < 1:
            raise ValueError("count must be >= 1")
        with self._lock:
            self._faults.append(fault)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def clear_requests(self) -> None:
        """Forget the requests (and exchanges) logged so far, once those being answered are logged."""
        with self._settled:
            self._wait_settled()
            self._log.clear()
            self._exchanges.clear()

    @property
    def pending_faults(self) -> int:
        """How many injections are still armed, over all faults."""
        with self._lock:
            return sum(f.remaining for f in self._faults)

    @property
    def exchanges(self) -> list[Exchange]:
        """A snapshot of the finished exchanges (a hung one appears once its client gave up).

        A client has its whole answer a moment before the proxy logs the exchange, so this waits
        (up to 5 s) until no request other than hung ones is still being handled.
        """
        with self._settled:
            self._wait_settled()
            return list(self._exchanges)

    def _wait_settled(self, timeout: float = 5.0) -> None:
        """Wait (holding the lock) until no request but hung ones is being handled, at most ``timeout``."""
        deadline = time.monotonic() + timeout
        while self._busy > self._hanging + self._holding and time.monotonic() < deadline:
            self._settled.wait(0.05)

    @property
    def hanging(self) -> int:
        """How many connections a hang fault holds right now."""
        with self._lock:
            return self._hanging

    def _exchange(self, exchange: Exchange) -> None:
        with self._settled:
            self._exchanges.append(exchange)
            self._busy -= 1
            self._settled.notify_all()

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, path):
                    fault.remaining -= 1
                    return fault
        return None

    def start(self) -> None:
        """Bind and serve in a daemon thread."""
        self._released.clear()
        super().start()

    def stop(self) -> None:
        """Release hung and held connections, stop serving and close the listening socket."""
        self._released.set()
        with self._lock:
            for fault in self._faults:
                fault.gate.set()
        super().stop()
