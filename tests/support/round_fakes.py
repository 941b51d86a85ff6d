"""Stand-ins for the round runner's partners: a server that judges payloads by a simple rule, and
an MQTT client that records what is published. Round logic is tested with them in milliseconds;
the real `FederatedServer` has its own tests (tests/cloud/test_server.py), the real broker its e2e ones.

A payload the fake server accepts is `update(device, round)`; anything else is refused as "corrupt".
"""
from __future__ import annotations

import collections
from types import SimpleNamespace

import numpy as np

from pqsu.cloud.server import RoundReport, Verdict
from pqsu.protocol import model_id
from pqsu.protocol.messages import RoundTask
from pqsu.protocol.model_follow import wire_bytes

MODEL = b"model-v0"
MODEL_ID = "ab" * 16


def update(device: str, round_: int) -> bytes:
    return f"update {device} {round_}".encode()


class FakeServer:
    """`FederatedServer`'s surface as the runner uses it. Each accepted update changes the model."""

    def __init__(self, keys=None):
        self.keys = keys
        self.rounds_done = 0
        self.info = SimpleNamespace(spec={"arch": "fake:net"}, in_shape=(1, 4, 4), classes=list("ab"))
        self.cfg = SimpleNamespace(precision="int8")
        self.master = {"w": np.zeros(2, np.float32)}
        self.optimizer = SimpleNamespace(velocity={})
        self.version = 0
        self.evaluations = 0
        self._asked: tuple[str, ...] | None = None
        self.opened: list[tuple[int, list[str]]] = []
        self.downlink = FakeDownlink(self)

    def model_message(self):
        # a file with a model id slot, stamped: devices verify what they hold, as they do a real model's
        data, mid = model_id.stamp(MODEL + model_id._PREFIX + model_id.PLACEHOLDER.encode() + bytes([self.version]))
        return data, SimpleNamespace(model_id=mid)

    def evaluate(self):
        self.evaluations += 1
        return SimpleNamespace(accuracy=0.5 + 0.01 * self.version, loss=1.0)

    def admits(self, device: str) -> bool:
        return self.keys is None or device in self.keys

    def open_round(self, round_: int, devices: list[str]) -> RoundTask:
        self.opened.append((round_, list(devices)))
        self._round, self._asked = round_, tuple(sorted(devices))
        self._counted: set[str] = set()
        self._rejected: collections.Counter = collections.Counter()
        self._bytes = 0
        return RoundTask(round=round_, model_id=self.model_message()[1].model_id)

    def submit(self, payload: bytes, sender: str | None = None) -> Verdict:
        if self._asked is None:
            return Verdict(False, "no-round")
        for device in self._asked:
            if payload == update(device, self._round) and device == sender:
                if device in self._counted:
                    break
                self._counted.add(device)
                self._bytes += len(payload)
                return Verdict(True, "accepted")
        reason = "duplicate" if sender in self._counted and payload == update(sender, self._round) else "corrupt"
        self._rejected[reason] += 1
        return Verdict(False, reason)

    def close_round(self, skipped: int = 0) -> RoundReport:
        old, _ = self.model_message()
        if self._counted:
            self.version += 1
        data, info = self.model_message()
        ev = self.evaluate()
        rep = RoundReport(round=self._round, model_id=info.model_id, accuracy=ev.accuracy, loss=ev.loss,
                          selected=len(self._asked), uploads=len(self._counted), skipped=skipped,
                          rejected=dict(self._rejected), bytes_up=self._bytes, bytes_down=len(old) * len(self._asked),
                          model_bytes=len(data), seconds=0.0)
        self._asked, self.rounds_done = None, self.rounds_done + 1
        return rep


class FakeDownlink:
    """`Downlink`'s surface as the runner uses it: no patches, every device downloads the file."""

    def __init__(self, server):
        self.server, self.origin = server, None
        self.step = SimpleNamespace(to_dict=lambda: {"kind": "keyframe"})

    def patches(self) -> dict:
        return {}

    def offers(self) -> tuple:
        return ()

    def state(self) -> tuple[dict, dict]:
        return {}, {}  # nothing to checkpoint: the full file every round

    def wire_cost(self, base, limit) -> int:
        data, info = self.server.model_message()
        return 0 if base == info.model_id else wire_bytes(len(data), limit)


class FakeClient:
    """`MqttClient`'s surface as the MQTT transport uses it; `on_publish(topic, payload)` may answer
    as devices would, through the handlers the transport subscribed."""

    def __init__(self, on_publish=None, on_connected=None):
        self.on_connect: list = []
        self.handlers: dict[str, object] = {}
        self.published: list[tuple[str, bytes, bool]] = []
        self.on_publish, self.on_connected = on_publish, on_connected
        self.connected = self.closed = False

    def subscribe(self, topic_filter, handler, qos: int = 1) -> None:
        self.handlers[topic_filter] = handler

    def unsubscribe(self, topic_filter) -> None:
        self.handlers.pop(topic_filter, None)

    def connect(self, timeout_s: float = 30.0) -> None:
        self.connected = True
        for callback in self.on_connect:
            callback(self)
        if self.on_connected:
            self.on_connected(self)

    def publish(self, topic: str, payload: bytes, retain: bool = False, **kwargs) -> None:
        self.published.append((topic, payload, retain))
        if self.on_publish:
            self.on_publish(topic, payload)

    def close(self) -> None:
        self.closed = True

    def deliver(self, topic_filter: str, topic: str, payload: bytes, retained: bool = False) -> None:
        """What paho's thread does when a message arrives on a subscribed filter."""
        self.handlers[topic_filter](topic, payload, retained)
