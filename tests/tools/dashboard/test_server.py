"""The dashboard's web server over real HTTP on 127.0.0.1: the page and its assets from the package,
the state as JSON, the event stream, read-only, and the token rule off loopback."""
from __future__ import annotations

import base64
import json
import re
import socket
import urllib.error
import urllib.request

import pytest

from pqsu.protocol.errors import PqsuError
from pqsu.protocol.messages import Status
from pqsu.tools.dashboard.server import DashboardServer, check_bind
from pqsu.tools.dashboard.state import FleetState

TOKEN = "s3cret-token-0123456789"


@pytest.fixture
def served():
    state = FleetState("farm")
    state.on_message("status", "pi-1", Status("pi-1", "online").to_json(), now=0.0)
    server = DashboardServer(state, "127.0.0.1", 0).start()
    yield server
    server.close()


def get(url: str, headers: dict | None = None, method: str = "GET"):
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_the_page_and_its_assets_come_from_the_package_and_name_nothing_outside(served):
    code, headers, page = get(served.url)
    assert code == 200 and headers["Content-Type"].startswith("text/html")
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    refs = re.findall(rb'(?:src|href)="([^"]+)"', page)
    assert refs and all(r.startswith(b"/") for r in refs), refs  # no CDN, no other host
    for ref in refs:
        code, _, body = get(served.url.rstrip("/") + ref.decode())
        assert code == 200 and body
        assert b"http://" not in body.replace(b"http://www.w3.org/2000/svg", b"") and b"https://" not in body


def test_the_state_is_json_with_the_fleets_devices(served):
    code, headers, body = get(served.url + "api/state")
    assert code == 200 and headers["Content-Type"] == "application/json"
    state = json.loads(body)
    assert state["fleet"] == "farm" and [d["device"] for d in state["devices"]] == ["pi-1"]


def test_the_event_stream_sends_the_state_and_then_each_change(served):
    host, port = served.httpd.server_address[:2]
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(b"GET /api/events HTTP/1.1\r\nHost: x\r\n\r\n")
        f = s.makefile("rb")
        assert b"200" in f.readline()
        while f.readline() not in (b"\r\n", b""):
            pass
        first = json.loads(f.readline().removeprefix(b"data: "))
        assert [d["device"] for d in first["devices"]] == ["pi-1"]
        served.state.on_message("status", "pi-2", Status("pi-2", "online").to_json(), now=1.0)
        for _ in range(5):  # the next events carry the change (at most a second or two away)
            line = f.readline()
            if line.startswith(b"data: ") and len(json.loads(line[6:])["devices"]) == 2:
                break
        else:
            pytest.fail("the change never reached the event stream")


def test_it_is_read_only_and_unknown_paths_are_not_found(served):
    for method in ("POST", "PUT", "DELETE"):
        code, headers, _ = get(served.url + "api/state", method=method)
        assert code == 405 and headers["Allow"] == "GET, HEAD"
    assert get(served.url + "../etc/passwd")[0] == 404
    assert get(served.url + "assets/index.html")[0] == 404


def test_with_a_token_every_route_asks_for_it():
    server = DashboardServer(FleetState("farm"), "127.0.0.1", 0, token=TOKEN).start()
    try:
        code, headers, _ = get(server.url + "api/state")
        assert code == 401 and headers["WWW-Authenticate"].startswith("Basic")
        assert get(server.url, {"Authorization": "Bearer wrong-token-0123456789"})[0] == 401
        basic = base64.b64encode(f"anyone:{TOKEN}".encode()).decode()
        assert get(server.url, {"Authorization": f"Basic {basic}"})[0] == 200
        assert get(server.url + "api/state", {"Authorization": f"Bearer {TOKEN}"})[0] == 200
    finally:
        server.close()


def test_a_non_loopback_bind_needs_a_token_and_a_token_must_be_long_enough():
    with pytest.raises(PqsuError, match="needs a token"):
        check_bind("0.0.0.0", None)
    with pytest.raises(PqsuError, match="at least 16"):
        check_bind("127.0.0.1", "short")
    check_bind("127.0.0.1", None)
    check_bind("localhost", None)
    check_bind("::1", None)
    check_bind("0.0.0.0", TOKEN)
