"""The edge agent over MQTT: follows rounds, trains when asked, uploads, reports status.

The agent connects with its device id as the MQTT client id and a persistent session,
with a last will that marks it offline. It keeps the current model (from the retained
model chunks) as an `InferenceModel`, swapped whole when a new version arrives. When a
round asks for it, it trains (`EdgeLearner`), and the update goes to the outbox on disk
*before* the device state (residual) is committed, so a crash between the two can only
repeat an upload (the coordinator counts a (round, device) once), never lose one.

Like the coordinator, MQTT callbacks only reassemble and queue; all work happens on the
caller's thread.

The device follows the model the round announcements (and the final `done` message) name,
asked or not, inference-only too: it subscribes to the patch from the model it holds when one
is announced, to the full model otherwise, and unsubscribes once it holds the announced one
(`pqsu.protocol.model_follow`: a refused patch is counted by reason and the device falls back
to the full model; nothing unverified is held, served or trained on).

The current model is also kept on disk (`<state_dir>/model.onnx`, written atomically on
every new verified version) and loaded at start, so a rebooted board serves predictions
through its local inference API (`pqsu.edge.service`, on 127.0.0.1) before the broker is
even reachable. An inference-only device (no learner, no torch) follows every model
version the same way, reports `trains=False`, and keeps serving after training is over.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pqsu.edge.inference import InferenceModel
from pqsu.protocol import model_id
from pqsu.edge.model_fetch import ModelFetch
from pqsu.protocol.atomic import atomic_write
from pqsu.protocol.errors import PqsuError
from pqsu.protocol.messages import MessageError, RoundTask, Status, message_job, message_type
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
    exit_when_done: bool = True     # leave when the coordinator says training is over (training devices)
    tls_ca: str | None = None       # CA bundle for an mqtts:// broker (None: the system CAs)
    tls_cert: str | None = None     # client certificate and key, for brokers that want one
    tls_key: str | None = None
    username: str | None = None     # None: the one in the broker URL, if any
    password: str | None = field(default=None, repr=False)
    http_port: int | None = None    # local inference API on 127.0.0.1: None = off, 0 = any free port
    http_required: bool = True      # False: a busy port only logs a warning (the agent runs without the API)
    providers: tuple[str, ...] = ()  # onnxruntime execution providers by preference (CPU is the fallback)
    inference_threads: int = 0      # onnxruntime intra-op threads (0: onnxruntime's choice)
    patch_timeout_s: float = 30.0   # a patch whose frames have not all come by then is refused: full model


MODEL_FILE = "model.onnx"


class EdgeAgent:
    def __init__(self, cfg: AgentConfig, learner=None, *, client: MqttClient | None = None):
        """`learner` is an `EdgeLearner`, or None on an inference-only device (no torch)."""
        self.cfg, self.learner = cfg, learner
        self.topics = Topics(cfg.fleet)
        self.state_dir = Path(cfg.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.fetch = ModelFetch(self.topics, cfg.device_id, cfg.patch_timeout_s, self._enqueue, self._serve)
        self._bad_messages = 0
        will = (self.topics.status(cfg.device_id), self._status("offline").to_json(), 1, True)
        self.client = client or MqttClient(cfg.broker, cfg.device_id, will=will, protocol=cfg.protocol,
                                           persistent_session=True, tls_ca=cfg.tls_ca, tls_cert=cfg.tls_cert,
                                           tls_key=cfg.tls_key, username=cfg.username, password=cfg.password)
        self.fetch.client = self.client
        self.events: queue.Queue[tuple[str, bytes, float]] = queue.Queue(maxsize=1000)
        # remember=1: late copies of the model just completed are dropped, but a model seen before may come
        # back (A, B, then A again: two jobs that start from the same seed)
        self.model: InferenceModel | None = None  # holds the verified file too (`model.file`), for training
        self.rounds_joined = 0
        self._joined_job: str | None = None  # the job this process trained in (its `done` ends the process)
        self.models_received = 0   # new model versions swapped in by this process
        self.model_bytes_down = 0  # their bytes (the downlink of an inference-only device)
        self.service = None        # the local inference API while run() runs (pqsu.edge.service)
        self._load_saved_model()

    @property
    def bad_messages(self) -> int:  # the agent's own and the model fetch's
        return self._bad_messages + self.fetch.bad_messages

    @bad_messages.setter
    def bad_messages(self, value: int) -> None:
        self._bad_messages = value - self.fetch.bad_messages

    @property
    def model_path(self) -> Path:
        return self.state_dir / MODEL_FILE

    def _load_saved_model(self) -> None:
        """The model this device had before a restart, if it is still there and verifies."""
        if not self.model_path.exists():
            return
        try:
            self.model = self._build_model(model_id.verified(self.model_path.read_bytes()))
            self.fetch.follower.held = self.model.file
        except (OSError, PqsuError) as exc:
            log.warning("%s: saved model %s not used (%s); waiting for the broker's", self.cfg.device_id,
                        self.model_path, exc)
            return
        log.info("%s: serving saved model %s from %s", self.cfg.device_id, self.model.model_id[:12], self.model_path)

    def _build_model(self, file: model_id.VerifiedModel) -> InferenceModel:
        return InferenceModel(file, providers=list(self.cfg.providers) or None,
                              threads=self.cfg.inference_threads or None)

    # -- network thread --------------------------------------------------------------
    def _on_round(self, topic: str, payload: bytes, retained: bool) -> None:
        self._enqueue(("round", payload))

    def _enqueue(self, item: tuple[str, bytes], nbytes: int = 0, base: str = "") -> None:
        try:
            self.events.put_nowait((*item, time.perf_counter(), nbytes, base))
        except queue.Full:
            self.bad_messages += 1

    # -- main loop -------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None) -> int:
        stop = stop or threading.Event()
        self._start_service()
        try:
            if self._connect_with_backoff(stop):
                self._loop(stop)
        finally:
            if self.service is not None:
                self.service.stop()
                self.service = None
        return self.rounds_joined

    def _start_service(self) -> None:
        if self.cfg.http_port is None or self.cfg.http_port < 0:
            return
        from pqsu.edge.service import InferenceService, ServiceError

        service = InferenceService(lambda: self.model, port=self.cfg.http_port, status=self.metrics)
        try:
            self.service = service.start()
        except ServiceError as exc:
            if self.cfg.http_required:
                raise
            log.warning("%s: running without the local inference API: %s", self.cfg.device_id, exc)

    def _loop(self, stop: threading.Event) -> None:
        try:
            self.client.subscribe(self.topics.round, self._on_round)
            if self.model is None:  # nothing to patch from: the full model, whichever is retained
                self.fetch.subscribe_full()
            self._publish_status("online")
            self._flush_outbox()
            pending: RoundTask | None = None
            pending_at = model_at = 0.0  # when each reached this device (queued by the network thread)
            while not stop.is_set():
                try:
                    kind, payload, received, nbytes, base = self.events.get(timeout=0.2)
                except queue.Empty:
                    self.fetch.check_timeout()
                    continue
                if kind == "model":
                    if self.fetch.take_full(payload, nbytes, self.model):
                        model_at = received
                elif kind == "patch":
                    if self.fetch.take_patch(payload, nbytes, base):
                        model_at = received
                else:
                    task = self._parse_round(payload, received)
                    if task == "done":
                        if self.cfg.exit_when_done and self.learner is not None:
                            break  # an inference-only device keeps serving the final model
                        continue
                    if task:
                        pending, pending_at = task, received
                if pending is not None and self.model is not None and self.model.model_id == pending.model_id:
                    # The device's own work starts once it holds both the task and the model.
                    self._do_round(pending, max(pending_at, model_at), pending_at)
                    pending = None
        finally:
            self._publish_status("offline")  # a clean disconnect does not send the last will
            self.client.close()

    def _connect_with_backoff(self, stop: threading.Event) -> bool:
        """True once connected; False when `stop` was set first (the saved model kept serving meanwhile)."""
        delay = 1.0
        while not stop.is_set():
            try:
                self.client.connect(timeout_s=self.cfg.connect_timeout_s)
                return True
            except MqttError as exc:
                if stop.is_set():
                    break
                log.warning("%s; retrying in %.0fs", exc, delay)
                stop.wait(delay)
                delay = min(delay * 2, self.cfg.max_backoff_s)
        return False

    def _parse_round(self, payload: bytes, received: float) -> RoundTask | str | None:
        """The task to work on, "done" when the job this device trains in is over, or None.
        `received` is this device's monotonic clock (perf_counter) when the message arrived."""
        if not payload:  # a new job cleared the previous one's retained announcement
            return None
        try:
            if message_type(payload) == "done":
                return self._parse_done(payload)
            task = RoundTask.from_json(payload)
        except MessageError as exc:
            self.bad_messages += 1
            log.info("bad round message: %s", exc)
            return None
        self.fetch.follow(task.model_id, task.patches)  # every device follows the model, asked or not
        if self.learner is None or not task.asks(self.cfg.device_id):
            return None
        self._partitions = task.partitions  # updates go under their partition when aggregator workers read them
        if self._is_over(task, received):
            return None  # a round that is over (its announcement is re-published with no time left)
        state = self.learner.state
        if task.job and task.job != state.job:
            log.info("%s: joining job %s (was %s)", self.cfg.device_id, task.job, state.job or "none")
            state.start_job(task.job)
            self._clear_outbox()
        if task.round <= state.last_round:
            # Already done: the retained announcement seen again after a reconnect, or published again by a
            # coordinator whose broker lost its state (and maybe our update with it). Send the update again;
            # the coordinator counts one per (round, device).
            if task.round == state.last_round and self._outbox(task.round).exists():
                log.info("%s: round %d announced again: sending its update again", self.cfg.device_id, task.round)
                self._send(task.round, self._outbox(task.round).read_bytes(), task.local_deadline(received))
            return None
        self._clear_outbox(before=task.round)
        return task

    def _parse_done(self, payload: bytes) -> str | None:
        """A job's end ends this agent only if this agent process trained in that job. A `done` it finds
        retained when it starts belongs to a job that was over before it came (a shared broker, a board
        rebooted after its job ended): it waits for the next job instead. A job-less `done` (an older
        coordinator) ends it as before."""
        job = message_job(payload)
        self.fetch.follow_done(payload)
        if job and job != self._joined_job:
            log.info("%s: job %s is over; waiting for the next one", self.cfg.device_id, job)
            return None
        self._clear_outbox()
        return "done"

    def _is_over(self, task: RoundTask, received: float) -> bool:
        if task.remaining_s is not None:
            return time.perf_counter() >= task.local_deadline(received)
        # An older coordinator sends only its wall-clock deadline: compare with ours, as before.
        return task.deadline is not None and time.time() > task.deadline

    def _serve(self, file: model_id.VerifiedModel) -> bool:
        """Swap `file` in (saved first); False, and the previous model kept, if onnxruntime cannot serve it."""
        try:
            model = self._build_model(file)
        except PqsuError as exc:
            self.bad_messages += 1
            log.warning("received a model that onnxruntime cannot serve: %s", exc)
            return False
        try:  # on disk first, so a reboot right after the swap serves this version
            atomic_write(self.model_path, file.data)
        except OSError as exc:
            log.warning("%s: cannot save the model to %s: %s", self.cfg.device_id, self.model_path, exc)
        self.model = model  # one reference swap: in-flight requests keep theirs
        self.models_received += 1
        how = self.fetch.follower.download_of(file.model_id)
        self.model_bytes_down += how.nbytes
        log.info("%s: model %s (%s, %d bytes)", self.cfg.device_id, model.model_id[:12], how.kind, how.nbytes)
        return True

    def _do_round(self, task: RoundTask, started: float, announced: float) -> None:
        """Train, keep the update safe, send it. `started` (perf_counter) is when the device had
        everything for this round: the status reports the device's compute from then on
        (verifying and loading the model, training, encoding), for the fleet benchmark."""
        how = self.fetch.follower.downloads.pop(task.model_id, None)  # reported once: a later round on it held it
        self._publish_status("training", task.round, download=how)
        self._joined_job = task.job
        try:  # verified on arrival: not hashed again
            outcome = self.learner.run_round(task, self.model.file, how.nbytes if how else 0)
        except PqsuError as exc:
            log.error("%s: round %d failed: %s", self.cfg.device_id, task.round, exc)
            self._publish_status("failed", task.round, str(exc)[:200])
            return
        if outcome.payload is not None:
            self._outbox(task.round).write_bytes(outcome.payload)
        self.learner.save()
        self.rounds_joined += 1
        seconds = time.perf_counter() - started
        evaluation = outcome.evaluation
        if outcome.payload is None:
            self._publish_status("skipped", task.round, outcome.reason, seconds, evaluation=evaluation)
            return
        # The status before the update: the update can close the round, and the coordinator takes the
        # device's evaluation from this status (MQTT keeps one client's messages in order).
        self._publish_status("uploaded", task.round, f"{len(outcome.payload)} bytes, {outcome.nnz} entries", seconds,
                             evaluation=evaluation)
        self._send(task.round, outcome.payload, task.local_deadline(announced))

    def _send(self, round_: int, payload: bytes, deadline: float | None = None) -> None:
        """`deadline` on the perf_counter clock. On MQTT 5 the broker drops an update still queued after its
        round's deadline (it could not count)."""
        expiry = max(1, int(deadline - time.perf_counter())) if deadline is not None else None
        try:
            # The outbox file stays until a later round is announced: a broker that restarts without its
            # state can lose an update it acknowledged, and a re-announced round sends it again.
            self.client.publish_chunked(self.topics.update(self.cfg.device_id, getattr(self, "_partitions", 0)),
                                        payload, self.cfg.chunk_limit,
                                        message_expiry_s=expiry)
        except MqttError as exc:  # stays in the outbox; sent again after reconnecting
            log.warning("%s: upload of round %d not confirmed (%s); kept in the outbox", self.cfg.device_id, round_, exc)

    def _flush_outbox(self) -> None:
        """At start: send an update written just before a crash (its round not committed to the state).
        The last committed round's update is sent again only if that round is announced again."""
        done = self.learner.state.last_round if self.learner else -1
        for path in sorted(self.state_dir.glob("outbox-*.bin")):
            if int(path.stem.split("-")[1]) > done:
                self._send(int(path.stem.split("-")[1]), path.read_bytes())

    def _clear_outbox(self, before: int | None = None) -> None:
        for path in self.state_dir.glob("outbox-*.bin"):
            if before is None or int(path.stem.split("-")[1]) < before:
                path.unlink(missing_ok=True)

    def _outbox(self, round_: int) -> Path:
        return self.state_dir / f"outbox-{round_:06d}.bin"

    def _status(self, state: str, round_: int = -1, detail: str = "", seconds: float = 0.0,
                download=None, evaluation: dict | None = None) -> Status:
        return Status(self.cfg.device_id, state, round_, detail, trains=self.learner is not None, seconds=seconds,
                      evaluation=evaluation,
                      job=self.learner.state.job if self.learner else "",
                      download=download.kind if download else "", download_bytes=download.nbytes if download else 0,
                      first_download=download.first if download else False, refusals=dict(self.fetch.follower.refusals))

    def _publish_status(self, state: str, round_: int = -1, detail: str = "", seconds: float = 0.0,
                        download=None, evaluation: dict | None = None) -> None:
        try:
            self.client.publish(self.topics.status(self.cfg.device_id),
                                self._status(state, round_, detail, seconds, download, evaluation).to_json(), retain=True)
        except MqttError as exc:
            log.warning("%s: status %s not published: %s", self.cfg.device_id, state, exc)

    def metrics(self) -> dict:
        """What `/healthz` and `/metrics` report. Bytes are the device's totals (kept in its state
        across restarts) on a training device, this process's model downloads on an inference-only one."""
        state = self.learner.state if self.learner else None
        model = self.model
        return {"device": self.cfg.device_id, "model_id": model.model_id if model else None,
                "rounds_joined": self.rounds_joined, "bad_messages": self.bad_messages + self.client.handler_errors,
                "bytes_up": state.bytes_up if state else 0,
                "bytes_down": state.bytes_down if state else self.model_bytes_down,
                "models_received": self.models_received, "connected": self.client.connected,
                "patch_refusals": dict(self.fetch.follower.refusals),
                "trains": self.learner is not None}
