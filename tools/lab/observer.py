"""The one topic observer: a plain MQTT client that records what arrives on its filters.

Scenarios and tests wait on it with predicates over (topic, payload). Given a fleet, it also keeps
what a scenario checks afterwards: each round announcement, each model by its id and each device's
updates. Updates are reassembled without memory of earlier ones, so a re-sent update is seen again.
"""
from __future__ import annotations

import itertools
import os
import queue
import time
from typing import Callable

from pqsu.protocol import chunking, model_id
from pqsu.protocol.errors import PqsuError
from pqsu.protocol.messages import MessageError, RoundTask, Status, message_type
from pqsu.protocol.mqtt import MqttClient
from pqsu.protocol.topics import Topics

Predicate = Callable[[str, bytes], bool]
_ids = itertools.count()


class Observer:
    """Subscribes `filters` (with `fleet` and no filters: its status, round, model and update topics)
    on `client`, an MqttClient or a broker URL, and connects."""

    def __init__(self, client: MqttClient | str, *filters: str, fleet: str | None = None, watch_updates: bool = True):
        if isinstance(client, str):
            client = MqttClient(client, f"pqsu-lab-observer-{os.getpid()}-{next(_ids)}", persistent_session=False)
        self.client = client
        self.topics = Topics(fleet) if fleet else None
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.models: dict[str, bytes] = {}
        self.rounds: dict[int, RoundTask] = {}
        self.updates: dict[str, list[bytes]] = {}
        self._models = chunking.Reassembler(max_messages=8, max_bytes=1 << 30)
        self._updates = chunking.Reassembler(max_messages=64, max_bytes=1 << 28, remember=0)
        if self.topics and not filters:
            t = self.topics
            # no updates when the scenario itself floods the update topics with garbage
            filters = (t.status_filter, t.round, t.model_filter) + ((t.update_filter,) if watch_updates else ())
        self.client.connect(timeout_s=15)
        for f in filters:
            self.client.subscribe(f, self._on_message)

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        if self.topics:
            self._keep(topic, payload)
        self.messages.put((topic, payload))

    def _keep(self, topic: str, payload: bytes) -> None:
        t, last = self.topics, topic.rsplit("/", 1)[-1]
        try:
            if topic == t.round and message_type(payload) == "round":
                task = RoundTask.from_json(payload)
                self.rounds[task.round] = task
            elif topic.startswith(t.prefix + "/model/") and payload:
                if (data := self._models.add(payload, "model")) is not None:
                    self.models[model_id.verify(data)] = data
            elif topic == f"{t.prefix}/update/{last}" and (data := self._updates.add(payload, last)) is not None:
                self.updates.setdefault(last, []).append(data)
        except (MessageError, ValueError, PqsuError):  # garbage is for the coordinator to refuse, not for us
            pass

    def collect(self, predicate: Predicate, timeout_s: float,
                alive: Callable[[], bool] = lambda: True) -> tuple[list[tuple[str, bytes]], tuple[str, bytes] | None]:
        """(every message received before, the first (topic, payload) for which predicate holds or None
        after timeout_s or once `alive` says the process it waits on has died)."""
        before, deadline = [], time.monotonic() + timeout_s
        while time.monotonic() < deadline and alive():
            try:
                item = self.messages.get(timeout=0.1)
            except queue.Empty:
                continue
            try:
                if predicate(*item):
                    return before, item
            except (MessageError, ValueError):
                pass
            before.append(item)
        return before, None

    def wait_for(self, predicate: Predicate, timeout_s: float,
                 alive: Callable[[], bool] = lambda: True) -> tuple[str, bytes] | None:
        """The first (topic, payload) for which predicate holds, or None."""
        return self.collect(predicate, timeout_s, alive)[1]

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "Observer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def status_is(device: str, *states: str, round_: int | None = None) -> Predicate:
    def check(topic: str, payload: bytes) -> bool:
        if not topic.endswith("/status/" + device) or not payload:
            return False
        s = Status.from_json(payload)
        return s.state in states and (round_ is None or s.round == round_)
    return check


def round_announced(n: int) -> Predicate:
    return lambda topic, payload: (topic.split("/")[2:] == ["round"] and message_type(payload) == "round"
                                   and RoundTask.from_json(payload).round == n)


def message_is(topic: str, payload: bytes = b"") -> Predicate:
    """This topic (and, if given, exactly this payload)."""
    return lambda t, p: t == topic and (not payload or p == payload)


def wait_until(condition: Callable[[], bool], timeout_s: float, every_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every_s)
    return condition()
