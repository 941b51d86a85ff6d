"""Test helpers for a private Mosquitto: the launcher itself is `pqsu.tools.lab.broker.Mosquitto`."""
from __future__ import annotations

import socket

from pqsu.tools.lab.broker import Mosquitto, free_port, mosquitto_path  # noqa: F401  (re-exported for tests)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def require_mosquitto() -> None:
    if mosquitto_path() is None:
        import pytest

        pytest.skip("mosquitto missing (install the Debian package mosquitto)")
