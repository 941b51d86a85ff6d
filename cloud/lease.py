"""The fleet's lease, one coordinator at a time: how a retained lease message is read, and the holder's
side (publish it, clear it at a clean end, and notice a coordinator started with --take-over)."""
from __future__ import annotations

import logging
import threading

from pqsu.protocol.messages import Lease, MessageError
from pqsu.protocol.mqtt import MqttClient
from pqsu.protocol.topics import Topics

log = logging.getLogger(__name__)


def read_lease(payloads: list[bytes]) -> Lease | None:
    if not payloads or not payloads[-1]:
        return None
    try:
        return Lease.from_json(payloads[-1])
    except MessageError as exc:
        log.warning("ignored an unreadable lease on the broker: %s", exc)
        return None


class LeaseWatch:
    """The coordinator's side of the lease: published retained at start (the last will clears it), cleared
    at a clean end, and watched, so that a coordinator started with --take-over makes this one stop."""

    def __init__(self, client: MqttClient, topics: Topics, lease: Lease):
        self.client, self.topics, self.lease = client, topics, lease
        self.taken = threading.Event()
        self.by: Lease | None = None

    def watch(self) -> None:
        """From now on, another coordinator's lease on the topic sets `taken` (call after publish())."""
        self.client.subscribe(self.topics.lease, self._on_lease)

    @staticmethod
    def will(topics: Topics) -> tuple[str, bytes, int, bool]:
        """An empty retained message deletes the lease when the coordinator dies without a word."""
        return topics.lease, b"", 1, True

    def publish(self) -> None:
        self.client.publish(self.topics.lease, self.lease.to_json(), retain=True)

    def release(self) -> None:
        if not self.taken.is_set():
            self.client.publish(self.topics.lease, b"", retain=True)

    def _on_lease(self, topic: str, payload: bytes, retained: bool) -> None:
        other = read_lease([payload])
        if other is not None and other.coordinator != self.lease.coordinator:
            self.by = other
            self.taken.set()
