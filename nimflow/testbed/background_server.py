"""An HTTP server on a daemon thread with a request log: the base of the hub and the fault proxy."""

from __future__ import annotations

import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from nimflow.testbed import TestbedError


class QuietHTTPServer(ThreadingHTTPServer):
    """A threading server that does not print a traceback when a client hangs up."""

    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], (ConnectionError, socket.timeout)):
            return  # a client hanging up is not a server error
        super().handle_error(request, client_address)


class BackgroundServer:
    """Serve ``handler`` on ``host:port`` (0 = free port) in a daemon thread.

    Handlers reach this object as ``self.server.<owner_attr>``. ``requests`` is a snapshot of the
    tuples subclasses log with :meth:`_record`. Usable as a context manager.
    """

    owner_attr = "owner"
    handler: type[BaseHTTPRequestHandler]

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port
        self._lock = threading.Lock()
        self._log: list[tuple[Any, ...]] = []
        self._server: QuietHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``http://host:port`` of the running server."""
        if self._server is None:
            raise TestbedError(f"{type(self).__name__} is not started")
        return f"http://{self.host}:{self._server.server_address[1]}"

    @property
    def requests(self) -> list[Any]:
        """A snapshot of the request log."""
        with self._lock:
            return list(self._log)

    def clear_requests(self) -> None:
        """Forget the requests logged so far."""
        with self._lock:
            self._log.clear()

    def _record(self, *fields: Any) -> None:
        with self._lock:
            self._log.append(tuple(fields))

    def _prepare(self) -> None:
        """Hook run before binding (e.g. create a root directory)."""

    def start(self) -> None:
        """Bind and serve in a daemon thread."""
        if self._server is not None:
            return
        self._prepare()
        try:
            server = QuietHTTPServer((self.host, self.port), self.handler)
        except OSError as e:
            raise TestbedError(f"{type(self).__name__} cannot listen on {self.host}:{self.port}: {e}") from e
        setattr(server, self.owner_attr, self)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1}, name=type(self).__name__, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Any:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
