"""The coordinator over MQTT: drives `FederatedServer` rounds through a broker.

Per round: choose devices among those online, publish the model (retained chunks, only
when it changed), announce the round (retained), collect updates until every asked
device has answered (uploaded, skipped, failed or gone offline) or the deadline passes,
close the round, publish metrics, checkpoint. Restarted, it resumes after the last
checkpointed round.

MQTT callbacks run on paho's network thread; they only reassemble chunks and queue
complete messages. All round logic runs on the caller's thread, so `FederatedServer`
needs no locking.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pqsu.cloud import checkpoint, report
from pqsu.cloud.device_keys import DeviceKeys
from pqsu.cloud.server import FederatedServer, choose_devices
from pqsu.protocol import chunking
from pqsu.protocol.atomic import atomic_write
from pqsu.protocol.errors import PqsuError
from pqsu.protocol.messages import MessageError, Status, done_message
from pqsu.protocol.mqtt import MqttClient
from pqsu.protocol.topics import TopicError, Topics

log = logging.getLogger(__name__)
REPUBLISH_GRACE_S = 2.0  # after a reconnect, how long the retained announcement has to come back
RESUME_GRACE_S = 5.0     # how long a resumed coordinator waits for the devices it knew to show up again
# Bounds on incomplete chunked updates held at once (the fuzzer replays them to predict what is counted).
REASSEMBLY_MESSAGES, REASSEMBLY_BYTES = 256, 512 * 1024 * 1024


@dataclass(frozen=True)
class CoordinatorConfig:
    broker: str = "mqtt://127.0.0.1:1883"
    fleet: str = "default"
    rounds: int = 10
    min_devices: int = 1
    join_timeout_s: float = 300.0     # how long round 1 waits for min_devices to come online
    round_timeout_s: float = 300.0    # a round's deadline
    fraction: float = 1.0
    chunk_limit: int = 128 * 1024     # the AWS IoT cap; EMQX allows 1 MB by default
    seed: int = 0
    protocol: str = "auto"
    client_id: str = "pqsu-coordinator"
    out: str = "runs/cloud"
    tls_ca: str | None = None         # the coordinator's own broker identity, like an agent's
    tls_cert: str | None = None
    tls_key: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)


@dataclass
class _Event:
    kind: str         # "update" or "status"
    device: str
    payload: bytes


class Coordinator:
    def __init__(self, cfg: CoordinatorConfig, server: FederatedServer, *, meta: dict | None = None,
                 client: MqttClient | None = None):
        self.cfg, self.server = cfg, server
        self.meta = meta or {}
        self.out = Path(cfg.out)
        self.topics = Topics(cfg.fleet)
        self.client = client or MqttClient(cfg.broker, cfg.client_id, protocol=cfg.protocol, tls_ca=cfg.tls_ca,
                                           tls_cert=cfg.tls_cert, tls_key=cfg.tls_key, username=cfg.username,
                                           password=cfg.password)
        self.events: queue.Queue[_Event] = queue.Queue(maxsize=10_000)
        self.reassembler = chunking.Reassembler(max_messages=REASSEMBLY_MESSAGES, max_bytes=REASSEMBLY_BYTES)
        self._incomplete_dropped = 0  # the reassembler's evicted + expired, as far as already counted
        # The device registry: every device seen, with its last status. A restarted coordinator gets it
        # back from the checkpoint as "offline" until the broker's retained statuses say otherwise.
        self.devices: dict[str, Status] = {
            d: Status(d, "offline", st.get("round", -1), trains=st.get("trains", True))
            for d, st in self.meta.pop("devices", {}).items()}
        self.rounds: list[dict] = list(self.meta.pop("reports", []))
        self._known = {d for d, st in self.devices.items() if st.trains}  # resumed: whom to give a moment
        self._early: collections.deque[_Event] = collections.deque(maxlen=1024)  # updates before a round opened
        self.dropped = 0   # complete messages refused because the queue was full
        self.foreign = 0   # messages on topics that are not ours, and undecodable chunks
        self._published_model: tuple[str, int] | None = None  # (model id, chunk count)
        # Refusals before a message reaches the server (bad frames, foreign topics, a full queue, no round
        # open), counted by reason on the network thread and merged into the next round's `rejected`.
        self._refused: collections.Counter = collections.Counter()
        self._refused_lock = threading.Lock()
        # A broker restarted without its state has lost the retained model and round: after a reconnect
        # the coordinator waits for its own announcement to come back and publishes both again if it does not.
        self._announced: bytes | None = None
        self._echo: bytes | None = None
        self._reconnected_at: float | None = None
        self.client.on_connect.append(self._on_connect)

    # -- network thread --------------------------------------------------------------
    def _on_update(self, topic: str, payload: bytes, retained: bool) -> None:
        device = self._device_of(topic)
        if device is None:
            return
        try:
            message = self.reassembler.add(payload, source=device)
        except chunking.ChunkError as exc:
            self.foreign += 1
            self._count("chunk-" + exc.reason)
            log.info("bad update chunk from %s: %s", device, exc)
            return
        finally:
            self._count_incomplete()
        if message is not None:
            self._enqueue(_Event("update", device, message))

    def _on_status(self, topic: str, payload: bytes, retained: bool) -> None:
        device = self._device_of(topic)
        if device is not None:
            self._enqueue(_Event("status", device, payload))

    def _device_of(self, topic: str) -> str | None:
        """The device a topic belongs to, or None (counted, one log line) for a topic that is not ours."""
        try:
            return str(self.topics.parse(topic)[1])
        except TopicError as exc:
            self.foreign += 1
            self._count("foreign-topic")
            log.info("ignored message on %r: %s", topic, exc)
            return None

    def _enqueue(self, event: _Event) -> None:
        try:
            self.events.put_nowait(event)
        except queue.Full:  # a flood must not grow memory without bound; a lost update is re-sent on re-announcement
            self.dropped += 1
            self._count("queue-full")
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("event queue full: %d messages dropped so far (%s from %s)", self.dropped, event.kind,
                            event.device)

    def _count(self, reason: str, n: int = 1) -> None:
        with self._refused_lock:
            self._refused[reason] += n

    def _count_incomplete(self) -> None:
        """An update whose frames never all came is a refusal too: counted when the reassembler drops it
        (evicted to make room for newer ones, or idle past its ttl), not silently forgotten."""
        dropped = self.reassembler.evicted + self.reassembler.expired
        if dropped > self._incomplete_dropped:
            self._count("chunk-incomplete", dropped - self._incomplete_dropped)
            self._incomplete_dropped = dropped

    def _take_refused(self) -> dict[str, int]:
        with self._refused_lock:
            taken, self._refused = dict(self._refused), collections.Counter()
        return taken

    def _on_connect(self, client: MqttClient) -> None:
        self._echo, self._reconnected_at = None, time.monotonic()

    def _on_round_echo(self, topic: str, payload: bytes, retained: bool) -> None:
        self._echo = payload

    # -- round logic (caller's thread) ------------------------------------------------
    def run(self, stop: threading.Event | None = None) -> dict:
        stop = stop or threading.Event()
        start = time.time()
        # Subscribed before connecting: what the broker queued in our session while we were away
        # arrives right after CONNACK and needs its handler.
        self.client.subscribe(self.topics.status_filter, self._on_status)
        self.client.subscribe(self.topics.update_filter, self._on_update)
        self.client.subscribe(self.topics.round, self._on_round_echo)
        self.client.connect(timeout_s=30)
        try:
            self._rewrite_metrics()
            first = self.server.rounds_done + 1
            if "initial_accuracy" not in self.meta:
                self.meta["initial_accuracy"] = self.server.evaluate().accuracy
            for r in range(first, self.cfg.rounds + 1):
                if stop.is_set():
                    break
                self._run_round(r, stop, wait_s=self.cfg.join_timeout_s if r == first else self.cfg.round_timeout_s)
            data, info = self.server.model_message()
            self._publish_model(data, info.model_id)  # the final model, for every device that serves predictions
            self.client.publish(self.topics.round, done_message(len(self.rounds), info.model_id), retain=True)
        finally:
            self.client.close()
        summary = report.summarize(self.rounds, arch=self.server.info.spec["arch"], in_shape=self.server.info.in_shape,
                                   num_classes=len(self.server.info.classes), seconds=time.time() - start,
                                   initial_accuracy=self.meta.get("initial_accuracy"))
        summary["dropped_messages"], summary["foreign_messages"] = self.dropped, self.foreign
        summary["completed"] = len(self.rounds) >= self.cfg.rounds
        report.write_outputs(self.out, config={**self.meta.get("config", {}), "precision": self.server.cfg.precision},
                             rounds=self.rounds, summary=summary, model=data)
        return summary

    def _rewrite_metrics(self) -> None:
        """metrics.jsonl as the checkpoint has it: a run killed after appending a round's line but before
        checkpointing it redoes that round, and must not list it twice."""
        path = self.out / "metrics.jsonl"
        lines = "".join(json.dumps(rep) + "\n" for rep in self.rounds)
        if path.exists() and path.read_text() != lines:
            log.info("metrics.jsonl rewritten from the checkpoint (%d rounds)", len(self.rounds))
            atomic_write(path, lines.encode())

    def _republish_if_lost(self, data: bytes, model_id: str) -> None:
        """After a reconnect, publish the model and the announcement again if the broker lost them."""
        since = self._reconnected_at
        if since is None or self._announced is None or time.monotonic() - since < REPUBLISH_GRACE_S:
            return
        self._reconnected_at = None
        if self._echo == self._announced:
            return
        log.warning("the broker lost the retained round announcement: publishing the model and round again")
        self._published_model = None
        self._publish_model(data, model_id)
        self.client.publish(self.topics.round, self._announced, retain=True)

    def _online(self) -> list[str]:
        return sorted(d for d, s in self.devices.items()
                      if s.state != "offline" and s.trains and self.server.admits(d))

    def _wait_for_devices(self, needed: int, wait_s: float, stop: threading.Event) -> list[str]:
        """The devices online once `needed` of them are (or raise after `wait_s`)."""
        deadline = time.time() + wait_s
        while len(self._online()) < needed and time.time() < deadline and not stop.is_set():
            self._handle(self._next(0.2), None)
        while (event := self._next(0)) is not None:  # statuses already queued count too
            self._handle(event, None)
        online = self._online()
        if len(online) < needed and not stop.is_set():
            raise PqsuError(f"only {len(online)} of the {needed} devices needed came online "
                            f"within {wait_s:.0f}s (broker {self.cfg.broker}, fleet {self.cfg.fleet!r})")
        return online

    def _run_round(self, r: int, stop: threading.Event, wait_s: float) -> None:
        # --min-devices gates the start of training; later rounds go on with whoever is online,
        # so a board that dies does not stop the fleet.
        needed = self.cfg.min_devices if not self.rounds else 1
        if isinstance(self.server.keys, DeviceKeys):
            self.server.keys.refresh()  # a device removed from the keys file is neither asked nor counted from now on
        if self._known:  # resumed: their retained statuses arrive right after subscribing; do not start without them
            grace = time.time() + RESUME_GRACE_S
            while not self._known <= set(self._online()) and time.time() < grace and not stop.is_set():
                self._handle(self._next(0.2), None)
            self._known = set()
        online = self._wait_for_devices(needed, wait_s, stop)
        if stop.is_set():
            return
        selected = choose_devices(online, self.cfg.fraction, self.cfg.seed, r)
        task = self.server.open_round(r, selected)
        data, info = self.server.model_message()
        self._publish_model(data, info.model_id)
        deadline = time.time() + self.cfg.round_timeout_s
        task = dataclasses.replace(task, devices=tuple(selected), deadline=deadline, model_bytes=len(data))
        self._announced, self._reconnected_at = task.to_json(), None
        self.client.publish(self.topics.round, self._announced, retain=True)
        announced = time.perf_counter()
        log.info("round %d: %d devices, model %s (%d bytes)", r, len(selected), info.model_id[:12], len(data))
        answered: dict[str, str] = {}
        while self._early:  # updates that arrived between rounds: a resent one may belong to this round
            self._handle(self._early.popleft(), (r, set(selected), answered))
        while not set(selected) <= answered.keys() and time.time() < deadline and not stop.is_set():
            self._handle(self._next(0.05), (r, set(selected), answered))
            self._republish_if_lost(data, info.model_id)
        collected = time.perf_counter()
        if missing := set(selected) - answered.keys():
            log.warning("round %d: deadline passed without %s", r, ", ".join(sorted(missing)))
        rep = self.server.close_round(skipped=sum(v == "skipped" for v in answered.values())).to_dict()
        self._announced = None
        try:  # the retained announcement now says the round is over, so a device joining later does not train for it
            self.client.publish(self.topics.round, dataclasses.replace(task, deadline=time.time()).to_json(), retain=True)
        except PqsuError as exc:
            log.warning("round %d: closing announcement not published: %s", r, exc)
        rep["missing"] = len(set(selected) - answered.keys())
        for reason, n in self._take_refused().items():
            rep["rejected"][reason] = rep["rejected"].get(reason, 0) + n
        # Announcement to last answer, and the cloud's own work after it (aggregate, export, evaluate):
        # `pqsu bench fleet` subtracts the slowest device's compute from the first to get the overhead.
        rep["collect_seconds"] = collected - announced
        rep["server_seconds"] = time.perf_counter() - collected
        self.rounds.append(rep)
        o = self.server.optimizer
        try:  # a full disk keeps the previous checkpoint valid; the run goes on and tries again next round
            checkpoint.save(self.out / "checkpoints", checkpoint.Checkpoint(
                r, {k: v.copy() for k, v in self.server.master.items()}, o.velocity,
                {**self.meta, "reports": self.rounds,
                 "devices": {d: dataclasses.asdict(st) for d, st in self.devices.items()}}))
        except OSError as exc:
            log.error("round %d: checkpoint not written (%s); a restart resumes from the previous one", r, exc)
        report.append_metrics(self.out, rep)
        try:  # metrics.jsonl has the report already; the retained copy is for dashboards
            self.client.publish(self.topics.metrics, _json(rep), retain=True)
        except PqsuError as exc:
            log.warning("round %d: metrics not published: %s", r, exc)
        log.info("round %d: accuracy %.4f, %d/%d uploads, %d bytes up", r, rep["accuracy"], rep["uploads"],
                 rep["selected"], rep["bytes_up"])

    def _publish_model(self, data: bytes, model_id: str) -> None:
        if self._published_model and self._published_model[0] == model_id:
            return
        frames = chunking.split(data, self.cfg.chunk_limit, message_id=bytes.fromhex(model_id))
        for i, frame in enumerate(frames):
            self.client.publish(self.topics.model_chunk(i), frame, retain=True)
        old_count = self._published_model[1] if self._published_model else 0
        for i in range(len(frames), old_count):  # clear stale retained chunks of a longer old model
            self.client.publish(self.topics.model_chunk(i), b"", retain=True)
        self._published_model = (model_id, len(frames))

    def _next(self, timeout: float) -> _Event | None:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None

    def _handle(self, event: _Event | None, current: tuple[int, set, dict] | None) -> None:
        if event is None:
            return
        if event.kind == "status":
            try:
                status = Status.from_json(event.payload)
            except MessageError as exc:
                log.info("bad status from %s: %s", event.device, exc)
                return
            if status.device != event.device:
                log.info("status on %s's topic names %s: ignored", event.device, status.device)
                return
            self.devices[event.device] = status
            if current:
                r, selected, answered = current
                if event.device in selected and event.device not in answered:
                    if status.state in ("skipped", "failed") and status.round == r:
                        answered[event.device] = status.state
                    elif status.state == "offline":
                        answered[event.device] = "offline"
            return
        if current is None:  # between rounds (e.g. what our session queued while we restarted): kept for the next
            if len(self._early) == self._early.maxlen:
                self._count("no-round")  # the oldest one falls out
            self._early.append(event)
            return
        verdict = self.server.submit(event.payload, sender=event.device)
        r, selected, answered = current
        if verdict.accepted:
            answered[event.device] = "uploaded"


def _json(obj: dict) -> bytes:
    return json.dumps(obj).encode()
