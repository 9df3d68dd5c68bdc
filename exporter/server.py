"""The HTTP endpoints of contract §5, on a threaded server so scrapes are served during polls."""

from __future__ import annotations

import contextlib
import gzip
import html
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

from exporter import __version__
from exporter.config import ListenAddress, format_duration
from exporter.poller import ProjectStatus
from exporter.webconfig import WebConfig

# A client that connects and sends nothing must not hold a thread for long.
REQUEST_TIMEOUT = 10.0


class ExporterServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default backlog of 5 drops connections when many scrapers arrive at once.
    request_queue_size = 128

    def __init__(
        self,
        address: ListenAddress,
        registry: CollectorRegistry,
        statuses: Callable[[], Sequence[ProjectStatus]],
        ready: Callable[[], bool],
        web: WebConfig | None = None,
    ) -> None:
        self.web = web or WebConfig()
        self.registry = registry
        self.statuses = statuses
        self.ready = ready
        if ":" in address.host:
            self.address_family = socket.AF_INET6
        super().__init__((address.host, address.port), _Handler)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        shown = "localhost" if host in ("0.0.0.0", "::") else str(host)
        if ":" in shown:
            shown = f"[{shown}]"
        scheme = "https" if self.web.tls else "http"
        return f"{scheme}://{shown}:{port}"

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        # Headers and body go out in separate writes: without this, Nagle's algorithm holds the
        # body back until the scraper's delayed ACK, some 40 ms on every kept-alive scrape.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.web.tls is not None:
            # The handshake happens in the connection's own thread (finish_request), so a client
            # that stalls it cannot hold up the accept loop.
            sock = self.web.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up is business as usual; anything else is one log line."""
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError | TimeoutError | ssl.SSLError):
            return
        structlog.get_logger().error("http request failed", error=repr(error))

    def finish_request(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            request.settimeout(REQUEST_TIMEOUT)
            try:
                request.do_handshake()
            except (OSError, ssl.SSLError):
                return  # not TLS (e.g. plain HTTP), a bad certificate, or too slow: refused
        super().finish_request(request, client_address)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name="http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: ExporterServer
    timeout = REQUEST_TIMEOUT
    server_version = f"signalwire-exporter/{__version__}"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Access logs are noise for an exporter; errors are reported by the code that sees them."""

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    def _route(self, head: bool) -> None:
        auth = self.server.web.auth
        if auth is not None and not auth.check(self.headers.get("Authorization")):
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="signalwire-exporter"')
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            body = b"Unauthorized.\n"
            self.send_header("Content-Length", str(len(body)))
            self._extra_headers()
            self.end_headers()
            if not head:
                self.wfile.write(body)
            return
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._metrics(head)
        elif path == "/":
            self._send(200, "text/html; charset=utf-8", _landing(self.server.statuses()), head)
        elif path == "/-/healthy":
            self._send(200, "text/plain; charset=utf-8", b"Healthy.\n", head)
        elif path == "/-/ready":
            if self.server.ready():
                self._send(200, "text/plain; charset=utf-8", b"Ready.\n", head)
            else:
                body = b"Not ready: loading state or waiting for the first poll of each project.\n"
                self._send(503, "text/plain; charset=utf-8", body, head)
        else:
            self._send(404, "text/plain; charset=utf-8", b"Not found.\n", head)

    def _metrics(self, head: bool) -> None:
        encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
        body = encoder(self.server.registry)
        gzipped = "gzip" in self.headers.get("Accept-Encoding", "")
        if gzipped:
            body = gzip.compress(body, compresslevel=6)
        self._send(200, content_type, body, head, gzipped)

    def _send(
        self, code: int, content_type: str, body: bytes, head: bool, gzipped: bool = False
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if gzipped:
            self.send_header("Content-Encoding", "gzip")
        self._extra_headers()
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _extra_headers(self) -> None:
        for name, value in self.server.web.headers.items():
            self.send_header(name, value)


def _catch_up(status: ProjectStatus) -> str:
    """How far a catch-up has come, or "none" when the cursor is current."""
    progress = status.catch_up
    if progress is None:
        return "none"
    eta = progress.eta_seconds
    left = "" if eta is None else f", about {format_duration(round(eta))} left"
    span = format_duration(round(progress.target - progress.began))
    rate = f"{progress.messages_per_second:,.0f} messages/s"
    return f"catching up: {progress.share:.0%} of {span}, {rate}{left}"


def _landing(statuses: Sequence[ProjectStatus]) -> bytes:
    now = time.time()
    rows = []
    for s in statuses:
        up = "not polled yet" if not s.polled else "up" if s.up else "down"
        age = (
            "never"
            if s.last_success is None
            else f"{format_duration(round(now - s.last_success))} ago"
        )
        cursor = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(s.cursor))
        cells = [s.name, up, age, cursor, _catch_up(s), str(s.pending_total), s.last_error or ""]
        rows.append(
            f'<tr class="{html.escape(up.split()[0])}">'
            + "".join(f"<td>{html.escape(c)}</td>" for c in cells)
            + "</tr>"
        )
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>SignalWire Exporter</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:.3em .8em;text-align:left}}
tr.up td:nth-child(2){{color:green}}tr.down td:nth-child(2){{color:#b00}}</style></head>
<body><h1>SignalWire Exporter</h1>
<p>Version {html.escape(__version__)}. Metrics: <a href="metrics">/metrics</a>.
Health: <a href="-/healthy">/-/healthy</a>, <a href="-/ready">/-/ready</a>.</p>
<table><tr><th>project</th><th>status</th><th>last successful poll</th><th>cursor</th>
<th>backlog</th><th>pending messages</th><th>last error</th></tr>
{"".join(rows)}
</table></body></html>
"""
    return page.encode("utf-8")
