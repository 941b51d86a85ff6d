"""A live, read-only web page of a fleet, fed from the fleet's own MQTT messages.

It subscribes to the fleet's retained statuses, round announcements, metrics and lease, and
counts the update frames going by; it never publishes, so it works against any running fleet
without touching the coordinator. The page shows every device (online or offline, training or
inference-only, last round, last seen, bytes up and down, model), the round in progress (asked,
answered, time left), accuracy and bytes per round and refusals by reason, updated live
(server-sent events). Everything it serves ships in the package: no CDN, works offline.

Bound to 127.0.0.1 by default. On any other address it needs a token (--token-file FILE, or
the PQSU_DASHBOARD_TOKEN environment variable): browsers ask for it as a password (any user
name); scripts send `Authorization: Bearer TOKEN`.

examples:
  pqsu dashboard --broker mqtt://127.0.0.1:1883 --fleet local      # then open the URL it prints
  pqsu dashboard --broker mqtts://broker.site:8883 --fleet farm --tls-ca ca.pem \\
      --bind 0.0.0.0 --port 8790 --token-file /etc/pqsu/dashboard.token
  pqsu run --dashboard                                             # beside a one-machine fleet
"""
from __future__ import annotations

import argparse
import os
import signal
import threading
from pathlib import Path

from pqsu.protocol.errors import PqsuError
from pqsu.protocol.identity_args import add_identity_arguments, read_password_file

DEFAULT_PORT = 8790  # not the agent HTTP API's 8780: a dashboard may run on a board beside its agent
TOKEN_ENV = "PQSU_DASHBOARD_TOKEN"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", required=True, metavar="URL", help="the fleet's broker: mqtt://host[:port] or mqtts://")
    p.add_argument("--fleet", required=True, help="the fleet to show (topics pqsu/<fleet>/...)")
    p.add_argument("--bind", default="127.0.0.1", metavar="ADDRESS",
                   help="address to serve on (default: 127.0.0.1; any other needs a token)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to serve on; 0 = any free one (default: {DEFAULT_PORT})")
    p.add_argument("--token-file", metavar="FILE", help=f"file holding the access token (default: ${TOKEN_ENV}, if set)")
    p.add_argument("--connect-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="give up when the broker cannot be reached within this long (default: 10)")
    add_identity_arguments(p.add_argument_group("broker identity"), "the dashboard's")


def read_token(path: str | None) -> str | None:
    """The token from --token-file (stripped), else from the environment, else None."""
    if path:
        try:
            token = Path(path).read_text().strip()
        except OSError as exc:
            raise PqsuError(f"cannot read the token file {path}: {exc.strerror or exc}") from None
        if not token:
            raise PqsuError(f"the token file {path} is empty")
        return token
    return os.environ.get(TOKEN_ENV) or None


class Dashboard:
    """The listener and the web server together: `url` from construction, serving until `close()`."""

    def __init__(self, broker: str, fleet: str, *, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 connect_timeout_s: float = 15.0, **identity):
        from pqsu.protocol.topics import check_fleet
        from pqsu.tools.dashboard.listener import Listener
        from pqsu.tools.dashboard.server import DashboardServer, check_bind
        from pqsu.tools.dashboard.state import FleetState

        check_fleet(fleet)
        check_bind(host, token)  # before connecting: a refused bind costs no broker round trip
        self.state = FleetState(fleet)
        self.listener = Listener(broker, self.state, **identity).start(connect_timeout_s)
        try:
            self.server = DashboardServer(self.state, host, port, token).start()
        except BaseException:
            self.listener.close()
            raise

    @property
    def url(self) -> str:
        return self.server.url

    def close(self) -> None:
        self.server.close()
        self.listener.close()


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise PqsuError(f"--port {args.port}: expected 0..65535")
    token = read_token(args.token_file)
    dash = Dashboard(args.broker, args.fleet, host=args.bind, port=args.port, token=token,
                     connect_timeout_s=args.connect_timeout, tls_ca=args.tls_ca,
                     tls_cert=args.tls_cert, tls_key=args.tls_key, username=args.username,
                     password=read_password_file(args.password_file))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"pqsu dashboard: fleet {args.fleet!r} on {dash.url}" + (" (token required)" if token else ""), flush=True)
    try:
        stop.wait()
    finally:
        dash.close()
    return 0
