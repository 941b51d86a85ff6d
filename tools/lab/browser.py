"""Headless Chromium driven over the DevTools protocol: open a page, evaluate JavaScript, screenshot.

The Debian `chromium` package, started through the one process wrapper with its own throw-away
profile and `--remote-debugging-port=0`; the port it picked is read from the DevToolsActivePort
file it writes, and one page target is driven over a websocket (`websocket-client`). No browser
is downloaded; nothing but 127.0.0.1 is contacted. Used by the dashboard's browser test and the
docs screenshots.
"""
from __future__ import annotations

import base64
import itertools
import json
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path

from pqsu.protocol.errors import PqsuError
from pqsu.protocol.process import Process, reap

NAMES = ("chromium", "chromium-browser", "google-chrome")


def chromium_path() -> str | None:
    return next((p for p in map(shutil.which, NAMES) if p), None)


class BrowserError(PqsuError):
    """Chromium did not start, or a DevTools command failed."""


class Browser:
    """One headless Chromium with one page; `close()` stops it and removes its profile."""

    def __init__(self, width: int = 1280, height: int = 900, timeout_s: float = 30.0):
        import websocket  # websocket-client (the dev extra): only the lab needs it

        exe = chromium_path()
        if exe is None:
            raise BrowserError("chromium is not installed (Debian package chromium)")
        self.profile = Path(tempfile.mkdtemp(prefix="pqsu-chromium-"))
        self.proc = Process([exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             "--disable-extensions", "--disable-background-networking", "--disable-sync",
                             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
                             f"--user-data-dir={self.profile}", f"--window-size={width},{height}", "about:blank"],
                            self.profile / "chromium.log", name="chromium")
        self._ids = itertools.count(1)
        try:
            port = self._devtools_port(timeout_s)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
                page = next(t for t in json.load(r) if t.get("type") == "page")
            self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=timeout_s,
                                                  suppress_origin=True)
            self.call("Page.enable")
            self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                      mobile=False)
        except BaseException:
            self.close()
            raise

    def _devtools_port(self, timeout_s: float) -> int:
        marker, deadline = self.profile / "DevToolsActivePort", time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrowserError(f"chromium exited with status {self.proc.poll()}:\n{self.proc.tail()}")
            if marker.is_file() and marker.read_text().strip():
                return int(marker.read_text().split()[0])
            time.sleep(0.1)
        raise BrowserError(f"chromium opened no DevTools port within {timeout_s:g}s:\n{self.proc.tail()}")

    def call(self, method: str, **params) -> dict:
        """One DevTools command's result (events that arrive meanwhile are skipped)."""
        n = next(self._ids)
        self.ws.send(json.dumps({"id": n, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == n:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error'].get('message')}")
                return reply.get("result", {})

    def open(self, url: str, timeout_s: float = 20.0) -> None:
        """Navigate and wait until the document has loaded."""
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout_s
        while self.evaluate("document.readyState") != "complete" or self.evaluate("location.href") == "about:blank":
            if time.monotonic() > deadline:
                raise BrowserError(f"{url} did not load within {timeout_s:g}s")
            time.sleep(0.1)

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (JSON-able values only)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression[:60]}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def screenshot(self, path: Path, full_page: bool = True) -> Path:
        params = {"format": "png", "captureBeyondViewport": full_page}
        if full_page:
            w, h = self.evaluate("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
            params["clip"] = {"x": 0, "y": 0, "width": w, "height": h, "scale": 1}
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", **params)["data"]))
        return path

    def close(self) -> None:
        ws = getattr(self, "ws", None)
        if ws is not None:
            ws.close()
        reap([self.proc], grace_s=5, signal_first=True)
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
