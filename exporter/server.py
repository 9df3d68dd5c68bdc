"""The HTTP endpoints (docs/endpoints.md), on a threaded server: scrapes are served during polls."""

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
from exporter.logs import scrub
from exporter.views import ProjectView, RecentSummary, StartNote
from exporter.webconfig import WebConfig

# A client that connects and sends nothing must not hold a thread for long.
REQUEST_TIMEOUT = 10.0
# The landing page reloads itself this often (seconds): a poll is every 30 s by default.
LANDING_REFRESH = 30
DOCUMENTATION = "https://github.com/signalwire-exporter/signalwire-exporter#readme"


class ExporterServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default backlog of 5 drops connections when many scrapers arrive at once.
    request_queue_size = 128

    def __init__(
        self,
        address: ListenAddress,
        registry: CollectorRegistry,
        views: Callable[[], Sequence[ProjectView]],
        ready: Callable[[], bool],
        web: WebConfig | None = None,
        demo: bool = False,
    ) -> None:
        self.web = web or WebConfig()
        self.demo = demo  # the landing page says the data is simulated
        self.registry = registry
        self.views = views
        self.ready = ready
        if ":" in address.host:
            self.address_family = socket.AF_INET6
        super().__init__((address.host, address.port), _Handler)
        self._thread: threading.Thread | None = None

    @property
    def bound(self) -> str:
        """The address really listened on, as HOST:PORT (0.0.0.0: every interface)."""
        host, port = str(self.server_address[0]), self.server_address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

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
            page = _landing(self.server.views(), self.server.demo)
            self._send(200, "text/html; charset=utf-8", page, head)
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


def _catch_up(view: ProjectView) -> str:
    """How far a catch-up has come, or "none" when the cursor is current."""
    progress = view.catch_up
    if progress is None:
        return "none"
    eta = progress.eta_seconds
    left = "" if eta is None else f", about {format_duration(round(eta))} left"
    span = format_duration(round(progress.target - progress.began))
    rate = f"{progress.messages_per_second:,.0f} messages/s"
    return f"catching up: {progress.share:.0%} of {span}, {rate}{left}"


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em 2em;color:#222}
h1{margin:0 0 .2em}
p{margin:.4em 0}
.demo{background:#fff3cd;border:1px solid #d9a400;border-radius:4px;padding:.6em 1em;
font-weight:600;max-width:60em}
table{border-collapse:collapse;margin:1em 0}
th,td{padding:.35em .6em;text-align:left;vertical-align:top}
th{border-bottom:2px solid #bbb;font-weight:600;font-size:.9em}
tbody{border-bottom:1px solid #ddd}
.n{text-align:right;font-variant-numeric:tabular-nums}
td.n,td.w,th{white-space:nowrap}
td.c{min-width:11em}
th small{display:block;font-weight:normal;color:#555}
tr.up td:nth-child(2){color:#080;font-weight:600}
tr.down td:nth-child(2){color:#b00;font-weight:600}
tr.not td:nth-child(2){color:#777;white-space:nowrap}
tr.detail td{padding-top:0;font-size:.9em}
tr.detail .what{color:#555}
tr.error td{color:#b00}
code{background:#f2f2f2;padding:.1em .3em;border-radius:3px;overflow-wrap:anywhere}
.quiet{color:#555;font-size:.9em;max-width:60em}
"""
# (heading, its second line, class: "n" a number, right-aligned, "w" a short text, unwrapped, "c"
# the catch-up's progress, wide enough for it)
_HEADINGS = (
    ("project", "", ""),  # plain cells: names without spaces, and the status (styled by row)
    ("status", "", ""),
    ("polled", "last success", "w"),
    ("settled", "last hour*", "n"),
    ("settled", "last 24 h*", "n"),
    ("outbound failed", "last hour*", "n"),
    ("spend (USD)", "today, UTC*", "n"),
    ("spend (USD)", "last 24 h*", "n"),
    ("pending", "now", "n"),
    ("catch-up", "", "c"),
)


def _ago(now: float, moment: float | None) -> str:
    if moment is None:
        return "never"
    return f"{format_duration(max(0, round(now - moment)))} ago"


def _usd(nano: int) -> str:
    """US dollars from nano-dollars: cents from $1 up (and for none), hundredths of a cent below."""
    usd = nano / 1e9
    return f"${usd:,.2f}" if usd >= 1 or not nano else f"${usd:.4f}"


def _ratio(recent: RecentSummary) -> str:
    ratio = recent.failure_ratio_hour
    if ratio is None:
        return "no outbound"
    return f"{ratio:.1%} ({recent.outbound_failed_hour:,} of {recent.outbound_hour:,})"


def _figures(recent: RecentSummary | None) -> list[str]:
    """Settled last hour and 24 h, outbound failure ratio, spend today and over 24 h."""
    if recent is None:
        return ["n/a"] * 5
    return [
        f"{recent.settled_hour:,}",
        f"{recent.settled_day:,}",
        _ratio(recent),
        _usd(recent.charge_nano_today),
        _usd(recent.charge_nano_day),
    ]


def _detail(kind: str, what: str, body: str) -> str:
    """A full-width line under a project's row; `body` is HTML already escaped."""
    return (
        f'<tr class="detail {kind}"><td></td><td colspan="{len(_HEADINGS) - 1}">'
        f'<span class="what">{html.escape(what)}:</span> {body}</td></tr>'
    )


def _start_note(note: StartNote) -> str:
    return f"{html.escape(note.text)}<br><code>{html.escape(note.command)}</code>"


def _project(s: ProjectView, now: float) -> str:
    up = "not polled yet" if not s.polled else "up" if s.up else "down"
    cells = [
        s.name,
        up,
        _ago(now, s.last_success),
        *_figures(s.recent),
        f"{s.pending_total:,}",
        _catch_up(s),
    ]
    row = "".join(
        f'<td class="{align}">{html.escape(c)}</td>' if align else f"<td>{html.escape(c)}</td>"
        for c, (_, _, align) in zip(cells, _HEADINGS, strict=True)
    )
    lines = [f'<tr class="{html.escape(up.split()[0])}">{row}</tr>']
    if s.last_error:
        # Tokens never reach an error text; scrubbed all the same, as the logs are.
        lines.append(_detail("error", "last error", html.escape(scrub(s.last_error))))
    if s.start_note is not None:
        lines.append(_detail("note", "history not counted", _start_note(s.start_note)))
    return "<tbody>" + "".join(lines) + "</tbody>"


def _since(views: Sequence[ProjectView]) -> str:
    starts = [v.recent.since for v in views if v.recent is not None]
    if not starts:
        return ""
    return f" (started {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(min(starts)))})"


def _landing(views: Sequence[ProjectView], demo: bool = False, now: float | None = None) -> bytes:
    now = time.time() if now is None else now
    banner = (
        '<p class="demo">Demo: simulated data from the built-in SignalWire simulator, '
        "not from a SignalWire account.</p>\n"
        if demo
        else ""
    )
    headings = "".join(
        (f'<th class="{align}">' if align else "<th>")
        + html.escape(h)
        + (f"<small>{html.escape(sub)}</small>" if sub else "")
        + "</th>"
        for h, sub, align in _HEADINGS
    )
    projects = "\n".join(_project(v, now) for v in views)
    shown = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now))
    since = html.escape(_since(views))
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{LANDING_REFRESH}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>SignalWire Exporter</title>
<style>{_STYLE}</style></head>
<body><h1>SignalWire Exporter</h1>
{banner}<p>Version {html.escape(__version__)}. Metrics: <a href="metrics">/metrics</a>.
Health: <a href="-/healthy">/-/healthy</a>, <a href="-/ready">/-/ready</a>.
See the <a href="{html.escape(DOCUMENTATION)}">documentation</a>.</p>
<table><thead><tr>{headings}</tr></thead>
{projects}
</table>
<p class="quiet">* Counted in memory since the exporter started, up to 24 h{since}:
a restart starts these figures again from zero. A message counts when it settles, as in /metrics.
Outbound failed: failed or undelivered among the outbound messages settled.</p>
<p class="quiet">As of {html.escape(shown)}; this page reloads every {LANDING_REFRESH} s.</p>
</body></html>
"""
    return page.encode("utf-8")
