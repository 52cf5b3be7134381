"""A fault-injecting HTTP/1.1 reverse proxy, to test retries against real servers (moto, the hub).

Requests are forwarded to ``upstream`` with request and response bodies streamed in chunks, until a
fault registered with :meth:`FaultProxy.add_fault` matches: then the proxy reads and discards the
request body and answers with the fault's status, body and headers itself (or drops the connection).

**S3 SigV4 and the Host header.** A client signs the ``Host`` it connects to, i.e. the proxy's
``host:port``. The proxy forwards the ``Host`` header unchanged, so the upstream sees the signed value;
moto does not verify signatures, so this is fine for moto. (Real S3 behind this proxy would need the
client to sign the upstream's host instead.)
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import socket
import time
from http.server import BaseHTTPRequestHandler
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from nimflow.testbed import TestbedError
from nimflow.testbed.background_server import BackgroundServer

__all__ = ["FaultProxy", "FaultResponse", "hub_error", "s3_error"]

log = logging.getLogger(__name__)

_CHUNK = 1024 * 1024
# RFC 9110 §7.6.1 hop-by-hop headers, plus Expect: the proxy answers 100-continue itself.
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
               "te", "trailer", "transfer-encoding", "upgrade", "expect"}
_S3_STATUS = {"ServiceUnavailable": 503, "SlowDown": 503, "InternalError": 500, "RequestTimeout": 400,
              "AccessDenied": 403, "NoSuchKey": 404, "NoSuchBucket": 404, "PreconditionFailed": 412}


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


class _ClientGone(Exception):
    """The client closed its connection while sending the request body."""


class _Fault:
    def __init__(self, method: str | None, pattern: str, status: int, count: int, body: bytes,
                 headers: dict[str, str], delay: float, drop: bool) -> None:
        self.method = method.upper() if method else None
        self.pattern = re.compile(pattern)
        self.status, self.remaining, self.body = status, count, body
        self.headers, self.delay, self.drop = headers, delay, drop

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
            yield piece

    # --- dispatch -------------------------------------------------------------------------------
    def _handle(self) -> None:
        proxy = self.server.proxy
        fault = proxy._take_fault(self.command, self.path)
        try:
            if fault is not None:
                self._inject(fault)
            else:
                self._forward()
        except (_ClientGone, OSError, http.client.HTTPException):
            # The client left, or the upstream died mid-response after our headers went out:
            # the only honest signal left is closing the connection.
            self.close_connection = True

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
        self.send_response(fault.status)
        for k, v in fault.headers.items():
            if k.lower() != "content-length":
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(fault.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(fault.body)

    def _forward(self) -> None:
        proxy = self.server.proxy
        conn = http.client.HTTPConnection(proxy._up_host, proxy._up_port, timeout=proxy.timeout)
        try:
            chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
            try:
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for k, v in self.headers.items():
                    if k.lower() not in _HOP_BY_HOP:
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
            self._relay(resp)
        finally:
            conn.close()

    def _bad_gateway(self, err: Exception) -> None:
        body = f"fault proxy: upstream error: {err}\n".encode()
        self.server.proxy._record(self.command, self.path, 502, False)
        self.close_connection = True  # the request body may be half-read
        self.send_response(502)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _relay(self, resp: http.client.HTTPResponse) -> None:
        self.server.proxy._record(self.command, self.path, resp.status, False)
        self.send_response_only(resp.status, resp.reason)
        length = resp.getheader("Content-Length")
        no_body = self.command == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200
        for k, v in resp.getheaders():
            if k.lower() not in _HOP_BY_HOP:
                self.send_header(k, v)
        rechunk = not no_body and length is None
        if rechunk:  # unknown length: chunk it, so the client connection can stay alive
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if no_body:
            return
        while piece := resp.read1(_CHUNK):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if rechunk else piece)
        if rechunk:
            self.wfile.write(b"0\r\n\r\n")


class FaultProxy(BackgroundServer):
    """Reverse proxy to ``upstream`` (``http://host:port``) that injects faults on demand.

    ``requests`` is a snapshot of ``(method, path, status, injected)``; a dropped connection is
    logged with status 0. Usable as a context manager.
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

    def add_fault(self, *, method: str | None = None, path_pattern: str = ".*", status: int = 503,
                  count: int = 1, body: bytes = b"", headers: dict[str, str] | None = None,
                  delay: float = 0.0, drop: bool = False) -> None:
        """Answer the next ``count`` requests matching ``method`` and ``path_pattern`` (``re.search``
        on path+query) with ``status``/``body``/``headers`` after ``delay`` seconds, instead of
        forwarding them. ``drop=True`` closes the connection without any answer instead.
        Faults are tried in the order added; each request consumes at most one."""
        if count < 1:
            raise ValueError("count must be >= 1")
        with self._lock:
            self._faults.append(_Fault(method, path_pattern, status, count, body, dict(headers or {}), delay, drop))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    @property
    def pending_faults(self) -> int:
        """How many injections are still armed, over all faults."""
        with self._lock:
            return sum(f.remaining for f in self._faults)

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, path):
                    fault.remaining -= 1
                    return fault
        return None

