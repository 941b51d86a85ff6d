"""The coordinator over MQTT: the round runner (cloud/rounds.py) over an MQTT transport.

`MqttTransport` is how rounds reach a fleet through a broker: the model as retained chunks
(published only when it changed), the round announcement (retained; re-announced with its
deadline passed when the round closes), the device registry from the retained statuses,
updates reassembled from chunks, updates that arrive between rounds kept for the next one,
the model and round published again when a restarted broker lost them, and the metrics of
each round retained for dashboards. `Coordinator` runs `RoundRunner` over it.

MQTT callbacks run on paho's network thread; they only reassemble chunks and queue
complete messages. All round logic runs on the caller's thread, so `FederatedServer`
needs no locking.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pqsu.cloud.lease import LeaseWatch
from pqsu.cloud.rounds import RoundRunner, RunnerConfig
from pqsu.cloud.server import FederatedServer
from pqsu.cloud.transport import COUNTED, UPDATE, Message
from pqsu.cloud.workers import WorkerPool
from pqsu.protocol import chunking
from pqsu.protocol.errors import PqsuError
from pqsu.protocol.messages import Lease, MessageError, RoundTask, Status, done_message
from pqsu.protocol.model_follow import offers_of
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
    client_id: str | None = None      # None: pqsu-coordinator-<fleet>-<job suffix>, one per job
    job: str = ""                     # this run's job id (protocol.messages.new_job_id), kept on resume
    stale_model_chunks: int = 0       # retained model frames of an earlier job, cleared with our first model
    partitions: int = 0               # > 0: aggregator workers read update/<p>/<device> (cloud/workers.py)
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


class MqttTransport:
    """The `Transport` (cloud/transport.py) of a fleet behind an MQTT broker."""

    def __init__(self, cfg: CoordinatorConfig, *, devices: dict | None = None, client: MqttClient | None = None):
        """`devices` is the registry a checkpoint carries (`state()`), to resume with."""
        self.cfg = cfg
        self.topics = Topics(cfg.fleet)
        # Unique per job, stable across a resume: two coordinators never kick each other off the broker, and a
        # restarted one gets back the session that queued its devices' updates while it was down.
        self.client_id = cfg.client_id or f"pqsu-coordinator-{cfg.fleet}-{cfg.job.rsplit('-', 1)[-1] or 'nojob'}"
        self.client = client or MqttClient(cfg.broker, self.client_id, protocol=cfg.protocol, tls_ca=cfg.tls_ca,
                                           tls_cert=cfg.tls_cert, tls_key=cfg.tls_key, username=cfg.username,
                                           password=cfg.password, will=LeaseWatch.will(self.topics))
        self.lease: LeaseWatch | None = None
        self.events: queue.Queue[_Event] = queue.Queue(maxsize=10_000)
        self.reassembler = chunking.Reassembler(max_messages=REASSEMBLY_MESSAGES, max_bytes=REASSEMBLY_BYTES)
        self._incomplete_dropped = 0  # the reassembler's evicted + expired, as far as already counted
        # The device registry: every device seen, with its last status. A restarted coordinator gets it
        # back from the checkpoint as "offline" until the broker's retained statuses say otherwise.
        self.devices: dict[str, Status] = {
            d: Status(d, "offline", st.get("round", -1), trains=st.get("trains", True))
            for d, st in (devices or {}).items()}
        self._known = {d for d, st in self.devices.items() if st.trains}  # resumed: whom to give a moment
        self._early: collections.deque[_Event] = collections.deque(maxlen=1024)  # updates before a round opened
        self._round: RoundTask | None = None  # the open round, between announce and close_round
        self.workers = WorkerPool(self.client, self.topics, cfg.job) if cfg.partitions else None
        self._counted: collections.deque[Message] = collections.deque()  # devices a worker counted, to answer
        self.dropped = 0   # complete messages refused because the queue was full
        self.foreign = 0   # messages on topics that are not ours, and undecodable chunks
        # (model id, chunk count) of what is retained; an earlier job's frames count, to be cleared
        self._published_model: tuple[str, int] | None = ("", cfg.stale_model_chunks) if cfg.stale_model_chunks else None
        # Refusals before a message reaches the server (bad frames, foreign topics, a full queue, no round
        # open), counted by reason on the network thread and merged into the next round's `rejected`.
        self._refused: collections.Counter = collections.Counter()
        self._refused_lock = threading.Lock()
        # A broker restarted without its state has lost the retained model and round: after a reconnect
        # the coordinator waits for its own announcement to come back and publishes both again if it does not.
        self._announced: bytes | None = None
        self._echo: bytes | None = None
        self._reconnected_at: float | None = None
        self._model: tuple[bytes, str] = (b"", "")  # the round's model, to publish again if the broker lost it
        self._patches: dict[str, bytes] = {}        # and the patches to it, by base
        self._published_patches: dict[str, tuple[str, int]] = {}  # base -> (target id, frames) retained
        self._downloads: dict[str, dict] = {}       # this round's, from the devices' "training" statuses
        self._evaluations: dict[str, dict] = {}     # this round's, from their "uploaded" / "skipped" statuses
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

    def take_refused(self) -> dict[str, int]:
        with self._refused_lock:
            taken, self._refused = dict(self._refused), collections.Counter()
        return taken

    _take_refused = take_refused  # the fuzz test's name for it

    def _on_connect(self, client: MqttClient) -> None:
        self._echo, self._reconnected_at = None, time.monotonic()

    def _on_round_echo(self, topic: str, payload: bytes, retained: bool) -> None:
        self._echo = payload

    # -- the transport (caller's thread) ----------------------------------------------
    def start(self) -> None:
        # Subscribed before connecting: what the broker queued in our session while we were away
        # arrives right after CONNACK and needs its handler.
        self.client.subscribe(self.topics.status_filter, self._on_status)
        if self.workers is None:
            self.client.subscribe(self.topics.update_filter, self._on_update)
        else:  # the workers read the updates; we grant their claims and reduce their partials
            self.workers.subscribe()
        self.client.subscribe(self.topics.round, self._on_round_echo)
        self.client.connect(timeout_s=30)
        # Published before watching, so the retained lease the watch first sees is ours, not the one replaced.
        self.lease = LeaseWatch(self.client, self.topics, Lease(job=self.cfg.job or "nojob", coordinator=self.client_id,
                                                                host=socket.gethostname(), pid=os.getpid(),
                                                                started=time.time()))
        self.lease.publish()
        self.lease.watch()

    def stop(self) -> None:
        self.client.close()

    def clear_earlier_job(self) -> None:
        """A new job starts on a broker that may hold an earlier job's retained round and metrics (its model
        frames go when ours are published): cleared, so nobody reads them as this job's."""
        for topic in (self.topics.round, self.topics.metrics):
            self.client.publish(topic, b"", retain=True)

    def _check_lease(self) -> None:
        if self.lease is not None and self.lease.taken.is_set():
            raise PqsuError(f"another coordinator took over fleet {self.cfg.fleet!r}: {self.lease.by.describe()}")

    def wait_for_devices(self, needed: int, wait_s: float | None, stop: threading.Event,
                         admits: Callable[[str], bool]) -> list[str]:
        """The devices online once `needed` of them are (or raise after `wait_s`)."""
        if self._known:  # resumed: their retained statuses arrive right after subscribing; do not start without them
            grace = time.time() + RESUME_GRACE_S
            while not self._known <= set(self._online(admits)) and time.time() < grace and not stop.is_set():
                self._handle(self._next(0.2))
            self._known = set()
        wait_s = self.cfg.round_timeout_s if wait_s is None else wait_s
        deadline = time.time() + wait_s
        while len(self._online(admits)) < needed and time.time() < deadline and not stop.is_set():
            self._handle(self._next(0.2))
            self._check_lease()
        while (event := self._next(0)) is not None:  # statuses already queued count too
            self._handle(event)
        online = self._online(admits)
        if len(online) < needed and not stop.is_set():
            raise PqsuError(f"only {len(online)} of the {needed} devices needed came online "
                            f"within {wait_s:.0f}s (broker {self.cfg.broker}, fleet {self.cfg.fleet!r})")
        return online

    @property
    def chunk_limit(self) -> int:
        return self.cfg.chunk_limit

    def publish_model(self, data: bytes, model_id: str, patches=None) -> None:
        self._model, self._patches = (data, model_id), dict(patches or {})
        self._publish_model(data, model_id)
        self._publish_patches(model_id, self._patches)

    def downloads(self) -> dict[str, dict]:
        return dict(self._downloads)

    def evaluations(self) -> dict[str, dict]:
        return dict(self._evaluations)

    def announce(self, task: RoundTask) -> None:
        if self.workers is not None:
            task = dataclasses.replace(task, partitions=self.cfg.partitions)
        self._round, self._downloads, self._evaluations = task, {}, {}
        self._announced, self._reconnected_at = self._round_message(task), None
        self.client.publish(self.topics.round, self._announced, retain=True)

    def _round_message(self, task: RoundTask, closing: bool = False) -> bytes:
        """The announcement with this job's id and the seconds left now, which a device counts on its own
        clock; `deadline` stays for people and older devices."""
        now = time.time()
        left = 0.0 if closing or task.deadline is None else max(0.0, task.deadline - now)
        return dataclasses.replace(task, job=self.cfg.job, deadline=now if closing else task.deadline,
                                   remaining_s=left).to_json()

    def backlog(self) -> list[Message]:
        taken = []
        while self._early:
            taken.append(self._message(self._early.popleft()))
        return taken

    def poll(self, timeout_s: float) -> Message | None:
        if self.workers is not None:  # what the workers counted and handed over
            self.workers.apply()
            self._counted.extend(Message(d, COUNTED) for d in self.workers.take_counted())
            if self._counted:
                return self._counted.popleft()
        message = self._handle(self._next(timeout_s))
        self._republish_if_lost(*self._model)
        self._check_lease()
        return message

    def quiet(self) -> bool:
        return False  # a device may always still answer before the deadline

    def hand_over(self, task: RoundTask) -> None:
        """Before the server closes the round: the workers' last partials, reduced (nothing without workers)."""
        if self.workers is not None:
            self.workers.hand_over()
            self._counted.clear()

    def close_round(self, task: RoundTask) -> None:
        self._round, self._announced = None, None
        try:  # the retained announcement now says the round is over, so a device joining later does not train for it
            self.client.publish(self.topics.round, self._round_message(task, closing=True), retain=True)
        except PqsuError as exc:
            log.warning("round %d: closing announcement not published: %s", task.round, exc)

    def round_extras(self) -> dict:
        return {"job": self.cfg.job}

    def publish_report(self, report: dict) -> None:
        try:  # metrics.jsonl has the report already; the retained copy is for dashboards
            self.client.publish(self.topics.metrics, _json(report), retain=True)
        except PqsuError as exc:
            log.warning("round %d: metrics not published: %s", report["round"], exc)

    def finish(self, data: bytes, model_id: str, rounds: int, patches=None) -> None:
        self._publish_model(data, model_id)  # the final model, for every device that serves predictions
        self._publish_patches(model_id, dict(patches or {}))
        self.client.publish(self.topics.round, done_message(rounds, model_id, self.cfg.job,
                                                            offers_of(patches or {})), retain=True)
        self.lease.release()

    def state(self) -> dict:
        return {"devices": {d: dataclasses.asdict(st) for d, st in self.devices.items()}}

    def summary(self) -> dict:
        return {"dropped_messages": self.dropped, "foreign_messages": self.foreign}

    def _republish_if_lost(self, data: bytes, model_id: str) -> None:
        """After a reconnect, publish the model and the announcement again if the broker lost them."""
        since = self._reconnected_at
        if since is None or self._announced is None or time.monotonic() - since < REPUBLISH_GRACE_S:
            return
        self._reconnected_at = None
        if self._echo == self._announced:
            return
        log.warning("the broker lost the retained round announcement: publishing the model and round again")
        self._published_model, self._published_patches = None, {}
        self._publish_model(data, model_id)
        self._publish_patches(model_id, self._patches)
        self.lease.publish()
        self._announced = self._round_message(self._round)
        self.client.publish(self.topics.round, self._announced, retain=True)

    def _online(self, admits: Callable[[str], bool]) -> list[str]:
        return sorted(d for d, s in self.devices.items() if s.state != "offline" and s.trains and admits(d))

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

    def _publish_patches(self, model_id: str, patches: dict[str, bytes]) -> None:
        """Retain the patch from each base to `model_id` on its own topics; clear what is retained for
        bases that have no patch any more (left the window, or a keyframe came)."""
        for base, patch in patches.items():
            if self._published_patches.get(base, ("", 0))[0] == model_id:
                continue
            frames = chunking.split(patch, self.cfg.chunk_limit)
            for i, frame in enumerate(frames):
                self.client.publish(self.topics.patch_chunk(base, i), frame, retain=True)
            for i in range(len(frames), self._published_patches.get(base, ("", 0))[1]):
                self.client.publish(self.topics.patch_chunk(base, i), b"", retain=True)
            self._published_patches[base] = (model_id, len(frames))
        for base in [b for b in self._published_patches if b not in patches]:
            for i in range(self._published_patches.pop(base)[1]):
                self.client.publish(self.topics.patch_chunk(base, i), b"", retain=True)

    def _next(self, timeout: float) -> _Event | None:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None

    def _handle(self, event: _Event | None) -> Message | None:
        """A status updates the registry and is passed on; an update is passed on while a round is
        open, and kept for the next round otherwise (e.g. what our session queued while we restarted)."""
        if event is None:
            return None
        if event.kind == "status":
            try:
                status = Status.from_json(event.payload)
            except MessageError as exc:
                log.info("bad status from %s: %s", event.device, exc)
                return None
            if status.device != event.device:
                log.info("status on %s's topic names %s: ignored", event.device, status.device)
                return None
            self.devices[event.device] = status
            # A status about another job's round says the device is there, not that it answered ours.
            ours = not status.job or status.job == self.cfg.job
            if ours and status.state == "training" and self._round is not None and status.round == self._round.round:
                self._downloads[event.device] = {"kind": status.download, "bytes": status.download_bytes,
                                                 "first": status.first_download}
            if ours and status.evaluation and self._round is not None and status.round == self._round.round:
                self._evaluations[event.device] = status.evaluation
            return Message(event.device, status.state, round=status.round if ours else -1)
        if self._round is None:
            if len(self._early) == self._early.maxlen:
                self._count("no-round")  # the oldest one falls out
            self._early.append(event)
            return None
        return self._message(event)

    @staticmethod
    def _message(event: _Event) -> Message:
        return Message(event.device, UPDATE, event.payload)


class Coordinator(MqttTransport):
    """`pqsu cloud`: the round runner over this MQTT transport. Restarted with a checkpoint's meta
    (`build_server`), it resumes after the last checkpointed round."""

    def __init__(self, cfg: CoordinatorConfig, server: FederatedServer, *, meta: dict | None = None,
                 client: MqttClient | None = None):
        self.meta = meta if meta is not None else {}
        self.resumed = bool(self.meta.get("reports"))
        super().__init__(cfg, devices=self.meta.pop("devices", {}), client=client)
        self.server = server

    def start(self) -> None:
        super().start()
        if not self.resumed:
            self.clear_earlier_job()
        if self.workers is not None:
            self.workers.publish_plan(self.server.shapes, partitions=self.cfg.partitions,
                                      clip_norm=self.server.cfg.clip_norm)

    def announce(self, task: RoundTask) -> None:
        if self.workers is not None:
            self.workers.open(self.server.intake.round, self.server.intake.aggregator)
            if missing := self.workers.uncovered(self.cfg.partitions):
                log.warning("round %d: no aggregator worker online reads partitions %s: their devices' updates wait "
                            "in the broker (start pqsu aggregator --partitions ...)", task.round,
                            ",".join(map(str, missing)))
        super().announce(task)

    def run(self, stop: threading.Event | None = None) -> dict:
        c = self.cfg
        runner = RoundRunner(RunnerConfig(rounds=c.rounds, min_devices=c.min_devices, join_timeout_s=c.join_timeout_s,
                                          round_timeout_s=c.round_timeout_s, fraction=c.fraction, seed=c.seed,
                                          out=c.out), self.server, self, meta=self.meta)
        self.rounds = runner.rounds
        return runner.run(stop)


def _json(obj: dict) -> bytes:
    return json.dumps(obj, allow_nan=False).encode()  # NaN is not JSON: the dashboard's browser could not parse it
