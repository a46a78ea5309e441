"""The HTTPS plumbing the HTTP fakes share (Entra ID's token endpoint, Graph).

One job: serve a BaseHTTPRequestHandler over TLS on a background thread, on loopback, and stop
without leaking threads or connections. The fake itself (its `owner`) answers the requests;
handlers reach it as `self.server.owner`.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

_log = logging.getLogger(__name__)

POLL_INTERVAL_SECONDS = 0.05


class TLSServer(ThreadingHTTPServer):
    """Threading HTTPS server: TLS handshake in the request thread, open connections tracked
    so that :meth:`close_connections` can end idle keep-alive connections at once."""

    daemon_threads = False  # server_close() joins request threads: nothing leaks
    block_on_close = True

    def __init__(
        self,
        address: tuple[str, int],
        context: ssl.SSLContext,
        handler: type[BaseHTTPRequestHandler],
        owner: Any,
        io_timeout: float,
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.tls_context = context
        self.owner = owner
        self._io_timeout = io_timeout
        self._connections: set[ssl.SSLSocket] = set()
        self._connections_lock = threading.Lock()
        self._closing = False
        super().__init__(address, handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(self._io_timeout)
        try:
            tls = self.tls_context.wrap_socket(
                request, server_side=True, do_handshake_on_connect=False
            )
        except OSError as exc:
            _log.debug("TLS wrap for %s failed: %s", client_address, exc)
            return
        with self._connections_lock:
            if self._closing:
                tls.close()
                return
            self._connections.add(tls)
        try:
            tls.do_handshake()
            super().finish_request(tls, client_address)
        except OSError as exc:  # ssl.SSLError included; also connections closed by stop()
            _log.debug("connection from %s ended: %s", client_address, exc)
        finally:
            with self._connections_lock:
                self._connections.discard(tls)
            tls.close()

    def close_connections(self) -> None:
        with self._connections_lock:
            self._closing = True
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        _log.debug("error while serving %s", client_address, exc_info=True)


class HttpsFake:
    """Start, stop, `with` and `port` for a fake served by TLSServer. Subclasses set `name`,
    `handler` and `io_timeout`, and have `host` and `pki` (a TestPKI)."""

    name = "fake"
    handler: type[BaseHTTPRequestHandler]
    io_timeout = 5.0
    host: str
    pki: Any

    _server: TLSServer | None = None
    _thread: threading.Thread | None = None

    def start(self) -> None:
        if self._server is not None:
            raise RuntimeError(f"{self.name} already started")
        server = TLSServer(
            (self.host, 0), self.pki.server_context(), self.handler, self, self.io_timeout
        )
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": POLL_INTERVAL_SECONDS},
            name=f"{self.name}-{self.port}",
            daemon=True,
        )
        self._thread.start()
        _log.debug("%s listening on port %d", self.name, self.port)

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        server.shutdown()
        server.close_connections()
        server.server_close()  # joins the request threads
        if thread is not None:
            thread.join()
        self._server = self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError(f"{self.name} not started")
        return int(self._server.server_address[1])
