"""An embedded MQTT broker for `pqsu run` and the tests.

`pqsu run` prefers a private Mosquitto on a free loopback port: a real broker that speaks
MQTT 5 and 3.1.1, the one the tests run against, and a separate process that a run can
restart or kill like a real one. Where Mosquitto is not installed it falls back to amqtt
in this process (MQTT 3.1.1 only, which the protocol supports as well).
"""
from __future__ import annotations

import abc
import asyncio
import logging
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from pqsu.protocol.errors import PqsuError
from pqsu.protocol.process import popen  # its own process group, and it dies with us

log = logging.getLogger(__name__)
MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/bin/mosquitto")


class BrokerError(PqsuError):
    """The embedded broker could not start."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def mosquitto_path() -> str | None:
    return next((p for p in MOSQUITTO_PATHS if Path(p).exists()), None) or shutil.which("mosquitto")


class Service(abc.ABC):
    """`with broker:` starts it and closes it on the way out, also when starting failed half-way."""

    @abc.abstractmethod
    def start(self):
        """Start the service and return it."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop it and release what it holds; safe to call twice."""

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()


class Mosquitto(Service):
    """A private Mosquitto on 127.0.0.1:<free port>; `restart()` keeps the port and its persistence."""

    def __init__(self, workdir: str | Path | None = None, *, persistence: bool = True, anonymous: bool = True,
                 port: int | None = None, extra_config: str = ""):
        binary = mosquitto_path()
        if binary is None:
            raise BrokerError("mosquitto is not installed (apt-get install mosquitto)")
        self.binary, self.port = binary, port or free_port()
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="pqsu-mosquitto-")
        self.workdir = Path(workdir or self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config = self.workdir / "mosquitto.conf"
        lines = [f"listener {self.port} 127.0.0.1", f"allow_anonymous {'true' if anonymous else 'false'}",
                 # Started as root, mosquitto drops to user `mosquitto`, which cannot write our
                 # folder (log, persistence); naming the current user keeps it (no effect otherwise).
                 f"user {pwd.getpwuid(os.getuid()).pw_name}",
                 f"log_dest file {self.workdir / 'mosquitto.log'}", "log_type all", "log_timestamp true",
                 "max_queued_messages 10000", f"persistence {'true' if persistence else 'false'}"]
        if persistence:
            lines.append(f"persistence_location {self.workdir}/")
        self.config.write_text("\n".join(lines) + "\n" + extra_config + "\n")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> "Mosquitto":
        if self.proc is not None:
            return self
        self.proc = popen([self.binary, "-c", str(self.config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10.0
        while not wait_for_port(self.port, 0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.stop()
                raise BrokerError(f"mosquitto did not start on port {self.port}: {err.strip()[-500:]}\n"
                                  f"{self.log_text()[-1000:]}")
        return self

    def stop(self, kill: bool = False) -> str:
        """Stop (SIGTERM, or SIGKILL with kill=True) and reap; returns what it printed on stderr."""
        if self.proc is None:
            return ""
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.kill() if kill else proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.stderr.read().decode(errors="replace") if proc.stderr else ""

    def restart(self, kill: bool = False) -> None:
        self.stop(kill=kill)
        self.start()

    def log_text(self) -> str:
        path = self.workdir / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        self.stop()
        if self._tmp:
            self._tmp.cleanup()


class Amqtt(Service):
    """amqtt's broker on a background thread of this process (MQTT 3.1.1 only)."""

    def __init__(self) -> None:
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="amqtt", daemon=True)
        self._broker = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> "Amqtt":
        from amqtt.broker import Broker

        config = {"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
                  "auth": {"allow-anonymous": True}, "topic-check": {"enabled": False}}
        self._thread.start()

        async def start() -> None:
            self._broker = Broker(config)
            await self._broker.start()
        asyncio.run_coroutine_threadsafe(start(), self._loop).result(timeout=15)
        if not wait_for_port(self.port, 10.0):
            raise BrokerError(f"amqtt did not start on port {self.port}")
        return self

    def close(self) -> None:
        if self._broker is not None:
            asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop).result(timeout=15)
            self._broker = None
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)


def embedded_broker(kind: str = "auto", workdir: str | Path | None = None):
    """A started broker: "mosquitto", "amqtt", or "auto" (Mosquitto when installed)."""
    if kind == "mosquitto" or (kind == "auto" and mosquitto_path()):
        return Mosquitto(workdir).start()
    if kind in ("amqtt", "auto"):
        log.info("mosquitto not found: using the in-process amqtt broker (MQTT 3.1.1)")
        return Amqtt().start()
    raise BrokerError(f"unknown broker kind {kind!r}; use auto, mosquitto or amqtt")
