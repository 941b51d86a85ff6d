"""The dashboard's broker subscriber: a read-only MQTT client that feeds `FleetState`.

It subscribes to the fleet's retained status, round, metrics and lease topics (so a dashboard
started mid-run sees the fleet at once) and counts the update frames going by. It never
publishes: it works against any running fleet without touching the coordinator or a device.
A clean session and its own client id (`pqsu-dashboard-<8 hex>`), as tools use (docs/protocol.md).
"""
from __future__ import annotations

import logging
import secrets
import time

from pqsu.protocol.mqtt import MqttClient
from pqsu.protocol.topics import TopicError, Topics
from pqsu.tools.dashboard.state import FleetState

log = logging.getLogger(__name__)


class Listener:
    """Connects to `broker` and keeps `state` up to date until `close()`."""

    def __init__(self, broker: str, state: FleetState, *, tls_ca: str | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None, username: str | None = None, password: str | None = None):
        self.state = state
        self.topics = Topics(state.fleet)
        self.client = MqttClient(broker, f"pqsu-dashboard-{secrets.token_hex(4)}", persistent_session=False,
                                 tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, username=username,
                                 password=password)
        state.link_up = lambda: self.client.connected
        t = self.topics
        for topic_filter in (t.lease, t.round, t.metrics, t.status_filter, t.update_filter):
            self.client.subscribe(topic_filter, self._on_message)

    def start(self, timeout_s: float = 15.0) -> "Listener":
        """Connect (MqttError, one clear line, when the broker cannot be reached)."""
        self.client.connect(timeout_s=timeout_s)
        return self

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        try:
            kind, arg = self.topics.parse(topic)
        except TopicError:
            return
        self.state.on_message(kind, arg, payload, time.monotonic(), retained)

    def close(self) -> None:
        self.client.close()
