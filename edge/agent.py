"""The edge agent over MQTT: follows rounds, trains when asked, uploads, reports status.

The agent connects with its device id as the MQTT client id and a persistent session,
with a last will that marks it offline. It keeps the current model (from the retained
model chunks) as an `InferenceModel`, swapped whole when a new version arrives. When a
round asks for it, it trains (`EdgeLearner`), and the update goes to the outbox on disk
*before* the device state (residual) is committed, so a crash between the two can only
repeat an upload (the coordinator counts a (round, device) once), never lose one.

Like the coordinator, MQTT callbacks only reassemble and queue; all work happens on the
caller's thread.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pqsu.edge.inference import InferenceModel
from pqsu.protocol import chunking
from pqsu.protocol.errors import PqsuError
from pqsu.protocol.messages import MessageError, RoundTask, Status, message_type
from pqsu.protocol.mqtt import MqttClient, MqttError
from pqsu.protocol.topics import Topics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentConfig:
    broker: str
    device_id: str
    fleet: str = "default"
    state_dir: str = "pqsu-device"
    chunk_limit: int = 128 * 1024
    protocol: str = "auto"
    connect_timeout_s: float = 10.0
    max_backoff_s: float = 30.0
    exit_when_done: bool = True     # leave when the coordinator says training is over


class EdgeAgent:
    def __init__(self, cfg: AgentConfig, learner=None, *, client: MqttClient | None = None):
        """`learner` is an `EdgeLearner`, or None on an inference-only device (no torch)."""
        self.cfg, self.learner = cfg, learner
        self.topics = Topics(cfg.fleet)
        self.state_dir = Path(cfg.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        will = (self.topics.status(cfg.device_id), self._status("offline").to_json(), 1, True)
        self.client = client or MqttClient(cfg.broker, cfg.device_id, will=will, protocol=cfg.protocol,
                                           persistent_session=True)
        self.events: queue.Queue[tuple[str, bytes]] = queue.Queue(maxsize=1000)
        self.models = chunking.Reassembler(max_messages=4, max_bytes=1 << 30)
        self.model: InferenceModel | None = None
        self._model_bytes = b""
        self.rounds_joined = 0
        self.bad_messages = 0

    # -- network thread --------------------------------------------------------------
    def _on_round(self, topic: str, payload: bytes, retained: bool) -> None:
        self._enqueue(("round", payload))

    def _on_model_chunk(self, topic: str, payload: bytes, retained: bool) -> None:
        if not payload:  # a cleared stale chunk
            return
        try:
            data = self.models.add(payload, source="model")
        except chunking.ChunkError as exc:
            self.bad_messages += 1
            log.info("bad model chunk on %s: %s", topic, exc)
            return
        if data is not None:
            self._enqueue(("model", data))

    def _enqueue(self, item: tuple[str, bytes]) -> None:
        try:
            self.events.put_nowait(item)
        except queue.Full:
            self.bad_messages += 1

    # -- main loop -------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None) -> int:
        stop = stop or threading.Event()
        self._connect_with_backoff(stop)
        try:
            self.client.subscribe(self.topics.round, self._on_round)
            self.client.subscribe(self.topics.model_filter, self._on_model_chunk)
            self._publish_status("online")
            self._flush_outbox()
            pending: RoundTask | None = None
            while not stop.is_set():
                try:
                    kind, payload = self.events.get(timeout=0.2)
                except queue.Empty:
                    continue
                if kind == "model":
                    self._swap_model(payload)
                else:
                    task = self._parse_round(payload)
                    if task == "done":
                        if self.cfg.exit_when_done:
                            break
                        continue
                    pending = task or pending
                if pending is not None and self.model is not None and self.model.model_id == pending.model_id:
                    self._do_round(pending)
                    pending = None
        finally:
            self._publish_status("offline")  # a clean disconnect does not send the last will
            self.client.close()
        return self.rounds_joined

    def _connect_with_backoff(self, stop: threading.Event) -> None:
        delay = 1.0
        while True:
            try:
                self.client.connect(timeout_s=self.cfg.connect_timeout_s)
                return
            except MqttError as exc:
                if stop.is_set():
                    raise
                log.warning("%s; retrying in %.0fs", exc, delay)
                stop.wait(delay)
                delay = min(delay * 2, self.cfg.max_backoff_s)

    def _parse_round(self, payload: bytes) -> RoundTask | str | None:
        try:
            if message_type(payload) == "done":
                return "done"
            task = RoundTask.from_json(payload)
        except MessageError as exc:
            self.bad_messages += 1
            log.info("bad round message: %s", exc)
            return None
        if self.learner is None or not task.asks(self.cfg.device_id):
            return None
        if task.round <= self.learner.state.last_round:
            return None  # already done (a retained announcement seen again after a reconnect)
        if task.deadline is not None and time.time() > task.deadline:
            return None
        return task

    def _swap_model(self, data: bytes) -> None:
        try:
            model = InferenceModel(data)
        except PqsuError as exc:
            self.bad_messages += 1
            log.warning("received a model that does not verify: %s", exc)
            return
        if self.model is None or model.model_id != self.model.model_id:
            self.model, self._model_bytes = model, data  # one reference swap: in-flight requests keep theirs
            log.info("%s: model %s (%d bytes)", self.cfg.device_id, model.model_id[:12], len(data))

    def _do_round(self, task: RoundTask) -> None:
        self._publish_status("training", task.round)
        started = time.perf_counter()
        try:
            outcome = self.learner.run_round(task, self._model_bytes)
        except PqsuError as exc:
            log.error("%s: round %d failed: %s", self.cfg.device_id, task.round, exc)
            self._publish_status("failed", task.round, str(exc)[:200])
            return
        if outcome.payload is not None:
            self._outbox(task.round).write_bytes(outcome.payload)
        self.learner.save()
        self.rounds_joined += 1
        seconds = time.perf_counter() - started
        if outcome.payload is None:
            self._publish_status("skipped", task.round, outcome.reason, seconds)
            return
        self._send(task.round, outcome.payload)
        self._publish_status("uploaded", task.round, f"{len(outcome.payload)} bytes, {outcome.nnz} entries", seconds)

    def _send(self, round_: int, payload: bytes) -> None:
        try:
            self.client.publish_chunked(self.topics.update(self.cfg.device_id), payload, self.cfg.chunk_limit)
            self._outbox(round_).unlink(missing_ok=True)
        except MqttError as exc:  # stays in the outbox; sent again after reconnecting
            log.warning("%s: upload of round %d not confirmed (%s); kept in the outbox", self.cfg.device_id, round_, exc)

    def _flush_outbox(self) -> None:
        for path in sorted(self.state_dir.glob("outbox-*.bin")):
            self._send(int(path.stem.split("-")[1]), path.read_bytes())

    def _outbox(self, round_: int) -> Path:
        return self.state_dir / f"outbox-{round_:06d}.bin"

    def _status(self, state: str, round_: int = -1, detail: str = "", seconds: float = 0.0) -> Status:
        return Status(self.cfg.device_id, state, round_, detail, trains=self.learner is not None, seconds=seconds)

    def _publish_status(self, state: str, round_: int = -1, detail: str = "", seconds: float = 0.0) -> None:
        try:
            self.client.publish(self.topics.status(self.cfg.device_id),
                                self._status(state, round_, detail, seconds).to_json(), retain=True)
        except MqttError as exc:
            log.warning("%s: status %s not published: %s", self.cfg.device_id, state, exc)

    def metrics(self) -> dict:
        state = self.learner.state if self.learner else None
        return {"device": self.cfg.device_id, "model_id": self.model.model_id if self.model else None,
                "rounds_joined": self.rounds_joined, "bad_messages": self.bad_messages,
                "bytes_up": state.bytes_up if state else 0, "bytes_down": state.bytes_down if state else 0}
