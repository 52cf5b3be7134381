#!/usr/bin/env python3
"""nimflow's front proxy: the stable endpoint of a deployment (stdlib only, Python >= 3.8).

A threaded HTTP/1.1 reverse proxy. Clients keep their connections alive; each request opens one
connection to the upstream named by the route file, so a switch takes effect at the next request
and a request already running finishes on the container it started on. Response bodies are
streamed as they arrive (Content-Length, chunked and server-sent-event bodies alike).

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


def log(message: str) -> None:
    """One line on stderr (docker logs)."""
    sys.stderr.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} front-proxy: {message}\n")
    sys.stderr.flush()


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
    """Forwards every method to the current upstream."""

    protocol_version = "HTTP/1.1"
    server_version = "nimflow-front-proxy"
    timeout = CLIENT_IDLE_TIMEOUT
    router: Router  # set on the subclass made in main()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass  # one line per request would drown the route changes; errors are logged below

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._proxy()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_GET

    # --- client side --------------------------------------------------------------------------

    def _read_request_body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = self.headers.get("Content-Length")
        return self.rfile.read(int(length)) if length else None

    def _send_json(self, status: int, message: str, kind: str) -> None:
        body = (json.dumps({"object": "error", "error": {"message": message, "type": kind, "param": None,
                                                          "code": status}}) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    # --- one request --------------------------------------------------------------------------

    def _proxy(self) -> None:
        try:
            body = self._read_request_body()
        except (ValueError, OSError):
            self.close_connection = True
            self._send_json(400, "malformed request body", "BadRequestError")
            return
        generation, upstream = self.router.acquire()
        if upstream is None:
            self._send_json(503, "nimflow front proxy: no route yet (no backend has been promoted)", "ServiceUnavailableError")
            return
        try:
            self._forward(upstream, body)
        finally:
            self.router.release(upstream)

    def _forward(self, upstream: str, body: bytes | None) -> None:
        host, _, port = upstream.rpartition(":")
        # One connection per request: the name is resolved again each time (Docker DNS), so a
        # backend restarted with a new address is found, and a switch needs no connection draining.
        connection = http.client.HTTPConnection(host, int(port), timeout=CONNECT_TIMEOUT)
        try:
            try:
                connection.connect()
                connection.sock.settimeout(READ_TIMEOUT)
                connection.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for key, value in self.headers.items():
                    if key.lower() not in NOT_FORWARDED:
                        connection.putheader(key, value)
                if "host" not in {k.lower() for k in self.headers.keys()}:
                    connection.putheader("Host", upstream)
                connection.putheader("X-Forwarded-For", self.client_address[0])
                if body is not None:
                    connection.putheader("Content-Length", str(len(body)))
                connection.endheaders(body)
                response = connection.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                log(f"upstream {upstream} unreachable: {type(exc).__name__}: {exc}")
                self._send_json(502, f"nimflow front proxy: upstream {upstream} unreachable ({type(exc).__name__}: {exc})",
                                "BadGatewayError")
                return
            self._relay(response)
        finally:
            connection.close()

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
    daemon_threads = True
    allow_reuse_address = True


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--route-dir", default="/run/nimflow/route")
    parser.add_argument("--state-dir", default="/run/nimflow/state")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--poll", type=float, default=0.2, help="seconds between route file checks without requests")
    args = parser.parse_args(argv)

    router = Router(args.route_dir, args.state_dir)
    handler = type("BoundProxyHandler", (ProxyHandler,), {"router": router})
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    server_class = type("BoundServer", (Server,), {"address_family": family})
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
    log(f"listening on {args.host}:{args.port}; route generation {router.generation}: {router.upstream}")
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        stop.set()
        server.server_close()
    log("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
