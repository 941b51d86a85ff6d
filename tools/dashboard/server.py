"""The dashboard's web server: the page, its assets, the state as JSON and a server-sent event stream.

The standard library's `ThreadingHTTPServer`, on purpose: a dashboard runs on a site's laptop or
a gateway next to the boards, often offline, so it must come with the package and not pull a web
framework and its dependencies onto the machine; it serves a handful of operators, one thread per
connection is what a long-lived event stream needs, and it has five read-only routes.

Read-only: GET and HEAD only. Bound to a loopback address by default; anywhere else it requires a
token (HTTP basic auth, any user name, the token as password; or `Authorization: Bearer`), and
`check_bind` refuses to start without one. Every response forbids framing and outside sources
(Content-Security-Policy: nothing but this server).
"""
from __future__ import annotations

import base64
import hmac
import ipaddress
import json
import logging
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources

from pqsu.protocol.errors import PqsuError
from pqsu.tools.dashboard.state import FleetState

log = logging.getLogger(__name__)
ASSETS = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/style.css": ("style.css", "text/css; charset=utf-8")}
EVENT_EVERY_S = 1.0      # the stream sends the state at least this often (the time left counts down)
MIN_TOKEN_CHARS = 16
HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
           "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


def is_loopback(host: str) -> bool:
    """True when every address `host` names is a loopback one (127.0.0.0/8, ::1)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror as exc:
        raise PqsuError(f"cannot bind the dashboard to {host!r}: {exc.strerror}") from None
    return all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def check_bind(host: str, token: str | None) -> None:
    """Refuse a bind that would show the fleet to the network without authentication."""
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise PqsuError(f"the dashboard token has {len(token)} characters; use at least {MIN_TOKEN_CHARS} "
                        "(e.g. openssl rand -hex 16)")
    if token is None and not is_loopback(host):
        raise PqsuError(f"--bind {host} is not a loopback address: the dashboard needs a token there "
                        "(--token-file FILE or PQSU_DASHBOARD_TOKEN)")


class DashboardServer:
    """Serves `state` on http://host:port/ (port 0: a free one) from `start()` to `close()`."""

    def __init__(self, state: FleetState, host: str = "127.0.0.1", port: int = 0, token: str | None = None):
        check_bind(host, token)
        self.state, self.token, self.stopping = state, token, threading.Event()
        self.assets = {path: (resources.files("pqsu.tools.dashboard").joinpath("assets", name).read_bytes(), kind)
                       for path, (name, kind) in ASSETS.items()}
        handler = type("Handler", (_Handler,), {"dashboard": self})
        try:
            self.httpd = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise PqsuError(f"cannot serve the dashboard on {host}:{port}: {exc.strerror or exc}") from None
        self.httpd.daemon_threads = True  # an open event stream must not keep the process alive
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        if ipaddress.ip_address(host).is_unspecified:  # bound to every address: name one a browser can reach
            host = socket.gethostname()
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/"

    def start(self) -> "DashboardServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="pqsu-dashboard", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self.stopping.set()
        with self.state.changed:
            self.state.changed.notify_all()  # event streams waiting for a change end now
        self.httpd.shutdown()
        self.httpd.server_close()

    def authorized(self, header: str | None) -> bool:
        if self.token is None:
            return True
        if not header:
            return False
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer":
            given = value.strip()
        elif scheme.lower() == "basic":
            try:
                given = base64.b64decode(value.strip(), validate=True).decode().partition(":")[2]
            except (ValueError, UnicodeDecodeError):
                return False
        else:
            return False
        return hmac.compare_digest(given.encode(), self.token.encode())


class _Handler(BaseHTTPRequestHandler):
    dashboard: DashboardServer
    server_version = "pqsu-dashboard"
    sys_version = ""

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def _refuse_write(self) -> None:
        self._plain(HTTPStatus.METHOD_NOT_ALLOWED, "the dashboard is read-only\n", {"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse_write

    def _serve(self, body: bool) -> None:
        d = self.dashboard
        if not d.authorized(self.headers.get("Authorization")):
            self._plain(HTTPStatus.UNAUTHORIZED, "authentication required\n",
                        {"WWW-Authenticate": 'Basic realm="pqsu dashboard", charset="UTF-8"'})
            return
        path = self.path.split("?", 1)[0]
        if path in d.assets:
            data, kind = d.assets[path]
            self._send(HTTPStatus.OK, data if body else b"", kind, len(data))
        elif path == "/api/state":
            data = json.dumps(d.state.view(time.monotonic()), allow_nan=False).encode()
            self._send(HTTPStatus.OK, data if body else b"", "application/json", len(data))
        elif path == "/api/events" and body:
            self._stream()
        else:
            self._plain(HTTPStatus.NOT_FOUND, "not found\n")

    def _stream(self) -> None:
        """Server-sent events: the whole state on every change, and at least every EVENT_EVERY_S."""
        d, state = self.dashboard, self.dashboard.state
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        for k, v in HEADERS.items():
            self.send_header(k, v)
        self.end_headers()
        seen = -1
        try:
            while not d.stopping.is_set():
                with state.changed:
                    if state.version == seen:
                        state.changed.wait(EVENT_EVERY_S)
                    seen = state.version
                view = json.dumps(state.view(time.monotonic()), allow_nan=False)
                self.wfile.write(f"data: {view}\n\n".encode())
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the page was closed

    def _plain(self, status: HTTPStatus, text: str, headers: dict | None = None) -> None:
        data = text.encode()
        self._send(status, data, "text/plain; charset=utf-8", len(data), headers)

    def _send(self, status: HTTPStatus, data: bytes, kind: str, length: int, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(length))
        for k, v in {**HEADERS, **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if data:
            self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:
        log.debug("%s %s", self.address_string(), format % args)
