#!/usr/bin/env python3
"""nimflow's front proxy: the stable endpoint of a deployment (stdlib only, Python >= 3.8).

A threaded HTTP/1.1 reverse proxy. Clients keep their connections alive; each request opens one
connection to the upstream named by the route file, so a switch takes effect at the next request
and a request already running finishes on the container it started on. Request and response
bodies are streamed piece by piece as they arrive (Content-Length, chunked and server-sent-event
bodies alike), never held whole: memory stays bounded whatever clients send.

Two limits keep hostile or broken clients contained (nimflow passes both; the defaults are for
running it by hand): a request body larger than ``--max-body-bytes`` is answered
``413`` (at once when its Content-Length says so, else when the streamed chunks pass it; the
upstream connection is then cut, so the upstream discards the partial body; the body is counted
even after the upstream has failed, so that answer never depends on the upstream), and a client
connection beyond ``--max-connections`` open at once is answered ``503`` and closed.

The route file (``<route-dir>/route.json``, written atomically by nimflow)::

    {"generation": 3, "upstream": "nimflow-demo-green:8000"}

is read at start (so after a reboot the last route is served) and re-read whenever its inode,
size or mtime changes: checked at every request and every ``--poll`` seconds. What the proxy
applies is reported in ``<state-dir>/applied.json`` (rewritten atomically, throttled)::

    {"generation": 3, "upstream": "...", "inflight": {"nimflow-demo-blue:8000": 1}}

nimflow waits for ``generation`` to reach what it wrote, then for the old upstream's in-flight
count to reach 0, before it stops the old container.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import select
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Hop-by-hop headers (RFC 9110 §7.6.1) describe one connection and are never forwarded.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade",
})
# Not forwarded either: the proxy answered `Expect: 100-continue` itself and sends its own length.
NOT_FORWARDED = HOP_BY_HOP | {"expect", "content-length"}
CHUNK = 65536
CONNECT_TIMEOUT = 10.0
#: A generation may run for minutes; only a silent upstream this long is given up on.
READ_TIMEOUT = 3600.0
#: Idle keep-alive client connections are closed after this long (frees their threads).
CLIENT_IDLE_TIMEOUT = 300.0
#: At most this often is applied.json rewritten for in-flight changes alone.
WRITE_INTERVAL = 0.05
#: Defaults of --max-body-bytes and --max-connections (nimflow passes its own settings).
DEFAULT_MAX_BODY_BYTES = 16 << 20
DEFAULT_MAX_CONNECTIONS = 256
#: A chunk-size line is a hex number (at most 16 digits) and optional extensions: longer is malformed.
CHUNK_LINE_LIMIT = 1024
CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
#: Trailer lines of a chunked body are read and dropped, at most this many.
TRAILER_LINES_LIMIT = 100
#: After refusing a request whose body is still arriving, the proxy reads and drops what the
#: client sends for at most this long before closing, so the client reads the answer instead of a
#: reset (a lingering close, as Apache does it).
LINGER_SECONDS = 2.0
#: At most this many refusals (503, too many connections) linger at once; beyond that, closed at once.
LINGERING_REFUSALS = 32


def log(message: str) -> None:
    """One line on stderr (docker logs)."""
    sys.stderr.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} front-proxy: {message}\n")
    sys.stderr.flush()


def error_body(status: int, message: str, kind: str) -> bytes:
    """The OpenAI-style JSON error body every answer of the proxy's own carries."""
    return (json.dumps({"object": "error", "error": {"message": message, "type": kind, "param": None,
                                                     "code": status}}) + "\n").encode()


def linger_and_close(sock: socket.socket) -> None:
    """Close after a refusal: stop sending, drop what the client still sends (bounded), then close."""
    try:
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + LINGER_SECONDS
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([sock], [], [], left)[0] or not sock.recv(CHUNK):
                break
    except OSError:
        pass
    finally:
        sock.close()


class UpstreamBody:
    """Where the request body goes: the upstream connection until a write to it fails, then nowhere.

    The client's body is read, framed and counted against the limit the same way whether the upstream
    takes it or has gone (crashed, restarted, closed early), so the answer to a body past the limit is
    413 whenever the upstream fails, and the client connection stays in step with the request.
    """

    def __init__(self, connection: http.client.HTTPConnection) -> None:
        self.connection = connection
        self.error: OSError | None = None

    def send(self, data: bytes) -> None:
        """Forward ``data``, or drop it once the upstream has failed (the first failure is kept)."""
        if self.error is not None:
            return
        try:
            self.connection.send(data)
        except OSError as exc:
            self.error = exc


class BodyTooLarge(Exception):
    """The request body passed --max-body-bytes."""


class BadBody(Exception):
    """The client's request body is malformed or ended early."""


def write_atomically(path: str, data: dict) -> None:
    """Write JSON to ``path`` by rename, so a reader never sees half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, sort_keys=True)
    os.replace(tmp, path)


class Router:
    """The current route and the requests in flight per upstream, shared by all handler threads."""

    def __init__(self, route_dir: str, state_dir: str) -> None:
        self.route_path = os.path.join(route_dir, "route.json")
        self.applied_path = os.path.join(state_dir, "applied.json")
        self.lock = threading.Lock()
        self.generation = 0
        self.upstream: str | None = None
        self.inflight: dict[str, int] = {}
        self.error: str | None = None
        self.refused_generation: int | None = None
        self._signature: tuple[int, int, int] | None = None
        self._dirty = True
        self._last_write = 0.0

    def _reload_locked(self) -> None:
        """Re-read the route file if it changed (a stat per call: cheap enough per request)."""
        try:
            st = os.stat(self.route_path)
        except FileNotFoundError:
            return  # no route yet (or removed): keep serving the last one
        except OSError as exc:
            self.error = f"cannot stat {self.route_path}: {exc}"
            return
        signature = (st.st_ino, st.st_size, st.st_mtime_ns)
        if signature == self._signature:
            return
        self._signature = signature
        route = None
        try:
            with open(self.route_path, encoding="utf-8") as handle:
                route = json.load(handle)
            generation, upstream = int(route["generation"]), str(route["upstream"])
            host, _, port = upstream.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"upstream {upstream!r} is not host:port")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # A bad route is refused; the last good one keeps serving, and nimflow sees the error.
            self.error = f"route file {self.route_path} refused: {exc}"
            generation = route.get("generation") if isinstance(route, dict) else None
            self.refused_generation = generation if isinstance(generation, int) else None
            log(self.error)
            self._dirty = True
            return
        if generation != self.generation or upstream != self.upstream:
            log(f"route generation {generation}: upstream {upstream} (was {self.upstream})")
        self.generation, self.upstream, self.error, self.refused_generation = generation, upstream, None, None
        self._dirty = True

    def acquire(self) -> tuple[int, str | None]:
        """Pick the upstream for one request and count it in flight."""
        with self.lock:
            self._reload_locked()
            upstream = self.upstream
            if upstream is not None:
                self.inflight[upstream] = self.inflight.get(upstream, 0) + 1
                self._dirty = True
            return self.generation, upstream

    def release(self, upstream: str) -> None:
        """The request to ``upstream`` has ended (its response fully sent, or failed)."""
        with self.lock:
            left = self.inflight.get(upstream, 0) - 1
            if left > 0:
                self.inflight[upstream] = left
            else:
                self.inflight.pop(upstream, None)
            self._dirty = True

    def tick(self, force: bool = False) -> None:
        """Reload a changed route and rewrite applied.json if anything changed (throttled)."""
        with self.lock:
            self._reload_locked()
            now = time.monotonic()
            if not (self._dirty and (force or now - self._last_write >= WRITE_INTERVAL)):
                return
            snapshot = {"generation": self.generation, "upstream": self.upstream,
                        "inflight": dict(self.inflight), "error": self.error,
                        "refused_generation": self.refused_generation, "pid": os.getpid()}
            self._dirty, self._last_write = False, now
        try:
            write_atomically(self.applied_path, snapshot)
        except OSError as exc:
            log(f"cannot write {self.applied_path}: {exc}")
            with self.lock:
                self._dirty = True

    def watch(self, poll_seconds: float, stop: threading.Event) -> None:
        """Background loop: a route switch is applied even when no request arrives."""
        while not stop.wait(min(poll_seconds, WRITE_INTERVAL)):
            self.tick()


class ProxyHandler(BaseHTTPRequestHandler):
    """Forwards every method to the current upstream, streaming the bodies both ways."""

    protocol_version = "HTTP/1.1"
    server_version = "nimflow-front-proxy"
    timeout = CLIENT_IDLE_TIMEOUT
    router: Router  # set on the subclass made in main()
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # likewise

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass  # one line per request would drown the route changes; errors are logged below

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._proxy()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_GET

    # --- client side --------------------------------------------------------------------------

    def _framing(self) -> tuple[bool, int | None]:
        """(chunked, declared length) of the request body; (False, None) when it has none.

        Raises:
            BadBody: a Content-Length that is not one decimal number, or a transfer coding other than chunked.
        """
        coding = self.headers.get("Transfer-Encoding")
        if coding is not None:  # it overrides any Content-Length (RFC 9112 §6.3)
            if coding.strip().lower() != "chunked":
                raise BadBody(f"transfer coding {coding!r} is not supported (only chunked)")
            return True, None
        length = self.headers.get_all("Content-Length") or []
        if not length:
            return False, None
        if len(set(length)) != 1 or not length[0].strip().isdigit() or not length[0].strip().isascii():
            raise BadBody(f"Content-Length {', '.join(length)!r} is not one decimal number")
        return False, int(length[0])

    def handle_expect_100(self) -> bool:
        """``Expect: 100-continue`` with a body declared too large: 413 before the client sends it."""
        try:
            _, length = self._framing()
        except BadBody:
            length = None  # answered as a malformed request once the handler runs
        if length is not None and length > self.max_body_bytes:
            self._too_large(f"{length} bytes (Content-Length)", linger=False)
            return False
        return super().handle_expect_100()

    def _read_client(self, size: int) -> bytes:
        """Up to ``size`` bytes of the body as they arrive (at least one).

        Raises:
            BadBody: the client closed the connection or stopped sending (idle timeout) mid-body.
        """
        try:
            piece = self.rfile.read1(size)
        except OSError as exc:
            raise BadBody(f"the request body broke off ({type(exc).__name__})") from None
        if not piece:
            raise BadBody("the client closed the connection before the end of the request body")
        return piece

    def _read_line(self, limit: int) -> bytes:
        try:
            line = self.rfile.readline(limit + 1)
        except OSError as exc:
            raise BadBody(f"the request body broke off ({type(exc).__name__})") from None
        if not line.endswith(b"\n") or len(line) > limit:
            raise BadBody("a chunk line of the request body is too long or cut off")
        return line

    def _pipe(self, upstream: UpstreamBody, size: int) -> None:
        """Pass ``size`` bytes of the client's body to the upstream, piece by piece."""
        while size > 0:
            piece = self._read_client(min(CHUNK, size))
            upstream.send(piece)
            size -= len(piece)

    def _send_body(self, upstream: UpstreamBody, chunked: bool, length: int | None) -> None:
        """Read the request body to its end, counting it against the limit, and stream it to the upstream
        (chunked stays chunked) for as long as the upstream takes it.

        Raises:
            BodyTooLarge: the chunks passed --max-body-bytes (what was sent is cut off with the upstream connection).
            BadBody: malformed chunks, or the client stopped mid-body.
        """
        if not chunked:
            self._pipe(upstream, length or 0)
            return
        total = 0
        while True:
            size_text = self._read_line(CHUNK_LINE_LIMIT).split(b";", 1)[0].strip()
            if not CHUNK_SIZE.fullmatch(size_text):
                raise BadBody(f"chunk size {size_text[:40]!r} is not a hexadecimal number")
            size = int(size_text, 16)
            if size == 0:
                for _ in range(TRAILER_LINES_LIMIT):  # trailers are dropped, like every other hop's header
                    if self._read_line(CHUNK_LINE_LIMIT * 8) in (b"\r\n", b"\n"):
                        upstream.send(b"0\r\n\r\n")
                        return
                raise BadBody(f"more than {TRAILER_LINES_LIMIT} trailer lines")
            total += size
            if total > self.max_body_bytes:
                raise BodyTooLarge(f"at least {total} bytes, chunked")
            upstream.send(b"%x\r\n" % size)
            self._pipe(upstream, size)
            if self._read_line(2) not in (b"\r\n", b"\n"):
                raise BadBody("a chunk of the request body is longer than its size says")
            upstream.send(b"\r\n")

    def _send_json(self, status: int, message: str, kind: str, *, close: bool = False) -> None:
        body = error_body(status, message, kind)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.close_connection = True
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _too_large(self, seen: str, *, linger: bool) -> None:
        """413, and the connection closed: the rest of the body is never read."""
        self._send_json(413, f"nimflow front proxy: the request body ({seen}) is larger than the limit of "
                             f"{self.max_body_bytes} bytes (--max-body-bytes)", "RequestEntityTooLargeError", close=True)
        if linger:  # the client may still be sending: let it read the answer, not a reset
            self.wfile.flush()
            linger_and_close(self.connection)

    def _malformed(self, exc: BadBody) -> None:
        try:
            self._send_json(400, f"nimflow front proxy: malformed request body: {exc}", "BadRequestError", close=True)
        except OSError:
            self.close_connection = True  # the client is gone

    # --- one request --------------------------------------------------------------------------

    def _proxy(self) -> None:
        try:
            chunked, length = self._framing()
        except BadBody as exc:
            self._malformed(exc)
            return
        if length is not None and length > self.max_body_bytes:
            self._too_large(f"{length} bytes (Content-Length)", linger=True)
            return
        generation, upstream = self.router.acquire()
        if upstream is None:
            # The body (if any) is left unread, so the connection cannot carry another request.
            self._send_json(503, "nimflow front proxy: no route yet (no backend has been promoted)",
                            "ServiceUnavailableError", close=chunked or bool(length))
            return
        try:
            self._forward(upstream, chunked, length)
        finally:
            self.router.release(upstream)

    def _forward(self, upstream: str, chunked: bool, length: int | None) -> None:
        host, _, port = upstream.rpartition(":")
        # One connection per request: the name is resolved again each time (Docker DNS), so a
        # backend restarted with a new address is found, and a switch needs no connection draining.
        connection = http.client.HTTPConnection(host, int(port), timeout=CONNECT_TIMEOUT)
        body = UpstreamBody(connection)
        try:
            try:
                try:
                    self._send_head(connection, upstream, chunked, length)
                except OSError as exc:
                    body.error = exc
                # The client's body decides first (413, 400), whatever the upstream did meanwhile: read to
                # its end, it also leaves the client connection ready for its next request.
                self._send_body(body, chunked, length)
                if body.error is not None:
                    raise body.error
                response = connection.getresponse()
            except BodyTooLarge as exc:
                log(f"request body refused ({exc}, over {self.max_body_bytes} bytes); the request to {upstream} was cut off")
                connection.close()  # the upstream sees the body break off and discards it
                self._too_large(str(exc), linger=True)
                return
            except BadBody as exc:
                connection.close()
                self._malformed(exc)
                return
            except (OSError, http.client.HTTPException) as exc:
                log(f"upstream {upstream} unreachable: {type(exc).__name__}: {exc}")
                # The client's body was read to its end: its connection can carry the next request.
                self._send_json(502, f"nimflow front proxy: upstream {upstream} unreachable ({type(exc).__name__}: {exc})",
                                "BadGatewayError")
                return
            self._relay(response)
        finally:
            connection.close()

    def _send_head(self, connection: http.client.HTTPConnection, upstream: str, chunked: bool,
                   length: int | None) -> None:
        """Connect to the upstream and send the request line and headers (the body's framing kept).

        Raises:
            OSError: the upstream cannot be reached or closed the connection.
        """
        connection.connect()
        connection.sock.settimeout(READ_TIMEOUT)
        connection.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        for key, value in self.headers.items():
            if key.lower() not in NOT_FORWARDED:
                connection.putheader(key, value)
        if "host" not in {k.lower() for k in self.headers.keys()}:
            connection.putheader("Host", upstream)
        connection.putheader("X-Forwarded-For", self.client_address[0])
        if chunked:
            connection.putheader("Transfer-Encoding", "chunked")
        elif length is not None:
            connection.putheader("Content-Length", str(length))
        connection.endheaders()

    def _relay(self, response: http.client.HTTPResponse) -> None:
        """Send the upstream's status, headers and body on, the body piece by piece as it arrives."""
        self.send_response_only(response.status, response.reason)
        no_body = self.command == "HEAD" or response.status in (204, 304) or 100 <= response.status < 200
        length = response.getheader("Content-Length")
        chunked = not no_body and length is None
        for key, value in response.getheaders():
            if key.lower() not in HOP_BY_HOP:
                self.send_header(key, value)
        if chunked:  # unknown length (chunked or read-to-close upstream): chunked to the client
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if no_body:
            return
        try:
            while True:
                piece = response.read1(CHUNK)
                if not piece:
                    break
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                self.wfile.flush()
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
        except (OSError, http.client.HTTPException) as exc:
            # Mid-body the status is sent: the only honest signal left is to cut the connection.
            log(f"response body from upstream interrupted: {type(exc).__name__}: {exc}")
            self.close_connection = True


class Server(ThreadingHTTPServer):
    """One thread per client connection, at most ``max_connections`` at once; more are answered 503."""

    daemon_threads = True
    allow_reuse_address = True
    # A burst of connections waits in the kernel's queue instead of being refused by it.
    request_queue_size = 128
    max_connections: int = DEFAULT_MAX_CONNECTIONS  # set on the subclass made in main()

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._open = 0
        self._open_lock = threading.Lock()
        self._refusals = threading.BoundedSemaphore(LINGERING_REFUSALS)

    def process_request(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        """Serve the connection in its own thread, or refuse it with a 503 when the cap is reached."""
        with self._open_lock:
            admitted = self._open < self.max_connections
            if admitted:
                self._open += 1
        if admitted:
            super().process_request(request, client_address)  # type: ignore[arg-type]
            return
        if not self._refusals.acquire(blocking=False):  # a flood: no thread per refusal either
            request.close()
            return
        threading.Thread(target=self._refuse, args=(request,), daemon=True).start()

    def process_request_thread(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        try:
            super().process_request_thread(request, client_address)  # type: ignore[arg-type]
        finally:
            with self._open_lock:
                self._open -= 1

    def _refuse(self, request: socket.socket) -> None:
        """503 on a connection over the cap, before reading anything from it, then a lingering close."""
        body = error_body(503, f"nimflow front proxy: too many connections (the limit is {self.max_connections}, "
                               "--max-connections); retry later", "ServiceUnavailableError")
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\nRetry-After: 1\r\n\r\n").encode()
        try:
            request.settimeout(LINGER_SECONDS)
            request.sendall(head + body)
        except OSError:
            pass
        finally:
            linger_and_close(request)
            self._refusals.release()


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--route-dir", default="/run/nimflow/route")
    parser.add_argument("--state-dir", default="/run/nimflow/state")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--poll", type=float, default=0.2, help="seconds between route file checks without requests")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                        help="larger request bodies are answered 413 (default %(default)s)")
    parser.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                        help="client connections open at once; more are answered 503 (default %(default)s)")
    args = parser.parse_args(argv)
    if args.max_body_bytes < 0 or args.max_connections < 1:
        parser.error("--max-body-bytes must be >= 0 and --max-connections >= 1")

    router = Router(args.route_dir, args.state_dir)
    handler = type("BoundProxyHandler", (ProxyHandler,), {"router": router, "max_body_bytes": args.max_body_bytes})
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    server_class = type("BoundServer", (Server,), {"address_family": family, "max_connections": args.max_connections})
    # Listen first, then report: nimflow takes applied.json as "the endpoint serves this route",
    # and a client arriving through Docker's port forwarding before the socket listens is reset.
    # Connections that arrive meanwhile wait in the backlog until the route is loaded.
    server = server_class((args.host, args.port), handler)
    router.tick(force=True)  # the last route, before the first connection is accepted
    stop = threading.Event()
    watcher = threading.Thread(target=router.watch, args=(args.poll, stop), daemon=True)
    watcher.start()

    def on_signal(signum: int, _frame: object) -> None:
        # PID 1 in a container has no default SIGTERM action: without this `docker stop` waits.
        stop.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log(f"listening on {args.host}:{args.port} (request bodies up to {args.max_body_bytes} bytes, "
        f"{args.max_connections} connections); route generation {router.generation}: {router.upstream}")
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        stop.set()
        server.server_close()
    log("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
