"""Aggregator workers: the uplink spread over processes (and machines) that share the broker.

A worker (`AggregatorWorker`, `pqsu aggregator`) owns some update partitions: devices publish on
`update/<crc32(id) % P>/<device>` when the round announcement says `partitions: P`, and the worker
subscribes to its partitions only. It reassembles, judges and folds its devices' updates with the
coordinator's own checks (`cloud/intake.py`, no torch here) into a FedAvg partial: weighted sums,
weight total, counts, refusals by reason. Before counting a batch it claims the devices from the
coordinator, which grants each device of a round once, so an update that reaches two workers (a
retransmission after a reconnect, a partition that moved to another worker) counts once. Every
`flush_s` and when the coordinator closes the round, the worker hands its partial over and starts
a new one, so a worker that dies loses only what it folded since its last partial.

`WorkerPool` is the coordinator's side: it grants claims (on the MQTT thread, at once), reduces the
partials into the round's FedAvg (sums add up exactly as the updates would, up to float summation
order), and at the round's close waits for the workers' last partials; what a worker was granted but
never handed over (it died) is counted as `worker-lost`. Messages: protocol/partial.py.
"""
from __future__ import annotations

import collections
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from pqsu.cloud.aggregate import AggregationError, FedAvg
from pqsu.cloud.intake import Round, RoundIntake, limits_for
from pqsu.protocol import chunking
from pqsu.protocol import partial as wire
from pqsu.protocol.errors import PqsuError
from pqsu.protocol.messages import MessageError, RoundTask
from pqsu.protocol.mqtt import MqttClient
from pqsu.protocol.topics import TopicError, Topics

log = logging.getLogger(__name__)
PLAN_VERSION = 1


def plan_message(shapes: dict[str, tuple[int, ...]], *, job: str, partitions: int, clip_norm: float | None) -> bytes:
    """The retained plan: what a worker needs to judge updates like the coordinator does."""
    return json.dumps({"v": PLAN_VERSION, "type": "agg-plan", "job": job, "partitions": partitions,
                       "clip_norm": clip_norm, "shapes": [[k, list(s)] for k, s in shapes.items()]}).encode()


def check_workers_aggregator(aggregator: str, clip_norm: object) -> None:
    """Several workers reduce FedAvg partial sums exactly; a median or trimmed mean needs every update of a
    coordinate in one place, and `median` clipping the round's median norm: refused, with the reason."""
    if aggregator != "fedavg" or (isinstance(clip_norm, str) and clip_norm.strip().startswith("median")):
        raise AggregationError(f"aggregator workers reduce FedAvg partial sums only: {aggregator!r}"
                               f"{' with clip ' + repr(clip_norm) if clip_norm else ''} needs every update in one "
                               "process (run without --workers, or use fedavg with an absolute --clip-norm)")


class OpenRound(Round):
    """A worker's round when the announcement lists no devices (every device; a large fleet): the worker
    counts each device once itself, and the coordinator says at claim time who was asked."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._slots: dict[str, int] = {}
        self._counted: set[int] = set()

    def index(self, device: str) -> int | None:
        if self.devices:
            return super().index(device)
        return self._slots.setdefault(device, len(self._slots))

    def was_counted(self, i: int) -> bool:
        return i in self._counted

    def count(self, i: int, nbytes: int, loss: float) -> None:
        self._counted.add(i)
        self.uploads += 1
        self.bytes_up += nbytes
        self.loss_sum += loss


# ---------------------------------------------------------------------------------------------- worker

@dataclass(frozen=True)
class WorkerConfig:
    broker: str
    fleet: str
    worker: str                       # this worker's id (a device-like id: A-Z a-z 0-9 _ . -)
    partitions: tuple[int, ...]       # the update partitions it reads
    keys: dict | None = None          # device id -> HMAC key, as the coordinator's --keys
    flush_s: float = 1.0              # hand a partial over at least this often while a round is open
    batch: int = 256                  # updates judged and folded together at most
    claim_timeout_s: float = 10.0
    chunk_limit: int = 128 * 1024
    protocol: str = "auto"
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)


QUEUE_UPDATES = 1024  # reassembled updates waiting to be judged: beyond it the data connection stops reading


class AggregatorWorker:
    """Two broker connections: the data one reads the partitions and blocks when the worker falls behind
    (TCP backpressure: the backlog stays in the broker, the worker's memory stays O(model + queue)); the
    control one carries the plan, rounds, claims, grants, partials and the status with its last will,
    so a grant is never stuck behind a backlog of updates."""

    def __init__(self, cfg: WorkerConfig, client: MqttClient | None = None, data: MqttClient | None = None):
        self.cfg, self.topics = cfg, Topics(cfg.fleet)
        status = self.topics.agg(cfg.worker, "status")
        ident = dict(protocol=cfg.protocol, tls_ca=cfg.tls_ca, tls_cert=cfg.tls_cert, tls_key=cfg.tls_key,
                     username=cfg.username, password=cfg.password)
        self.client = client or MqttClient(cfg.broker, f"pqsu-aggregator-{cfg.fleet}-{cfg.worker}-ctl",
                                           will=(status, self._status("offline"), 1, True), **ident)
        self.data = data or MqttClient(cfg.broker, f"pqsu-aggregator-{cfg.fleet}-{cfg.worker}", **ident)
        self.updates: queue.Queue[tuple[bytes, str]] = queue.Queue(maxsize=QUEUE_UPDATES)
        self.reassembler = chunking.Reassembler(max_messages=4096, max_bytes=512 * 1024 * 1024)
        self.plan: dict | None = None
        self.task: RoundTask | None = None
        self.intake: RoundIntake | None = None
        self.closing: set[int] = set()      # rounds the coordinator asked to close
        self._grants: dict[int, wire.Grant] = {}
        self._granted = threading.Condition()
        self._seq = 0
        self.refused: collections.Counter = collections.Counter()  # since the last partial
        self.handed = {"partials": 0, "updates": 0}
        self.intake_job, self.opened, self._rejected_seen = None, -1, collections.Counter()
        self._stopping = False

    def _status(self, state: str) -> bytes:
        return json.dumps({"v": 1, "type": "agg-status", "worker": self.cfg.worker, "state": state,
                           "partitions": list(self.cfg.partitions)}).encode()

    # -- paho's thread ---------------------------------------------------------------------------
    def _on_update(self, topic: str, frame: bytes, retained: bool) -> None:
        try:
            kind, device = self.topics.parse(topic)
            payload = self.reassembler.add(frame, source=device)
        except (TopicError, chunking.ChunkError) as exc:
            self.refused[f"chunk-{getattr(exc, 'reason', 'malformed')}" if isinstance(exc, chunking.ChunkError)
                         else "foreign-topic"] += 1
            return
        while payload is not None and not self._stopping:
            try:  # blocks the data connection only: backpressure, the backlog waits in the broker
                self.updates.put((payload, device), timeout=0.5)
                return
            except queue.Full:
                continue

    def _on_plan(self, topic: str, payload: bytes, retained: bool) -> None:
        try:
            plan = json.loads(payload) if payload else None
            if plan is not None and (plan.get("type") != "agg-plan" or plan.get("v") != PLAN_VERSION):
                raise ValueError("not a plan")
        except ValueError as exc:
            log.warning("bad aggregation plan: %s", exc)
            return
        self.plan = plan

    def _on_round(self, topic: str, payload: bytes, retained: bool) -> None:
        try:
            task = RoundTask.from_json(payload) if payload else None
        except MessageError:
            return  # the done message, or one this worker cannot read
        if task is not None:
            self.task = task

    def _on_close(self, topic: str, payload: bytes, retained: bool) -> None:
        try:
            msg = json.loads(payload)
            self.closing.add(int(msg["round"]))
        except (ValueError, KeyError, TypeError):
            pass

    def _on_grant(self, topic: str, payload: bytes, retained: bool) -> None:
        try:
            grant = wire.decode_grant(payload)
        except wire.PartialError:
            return
        with self._granted:
            self._grants[grant.seq] = grant
            self._granted.notify_all()

    # -- the worker's thread ---------------------------------------------------------------------
    def start(self) -> None:
        self.client.subscribe(self.topics.agg_plan, self._on_plan)
        self.client.subscribe(self.topics.round, self._on_round)
        self.client.subscribe(self.topics.agg_close, self._on_close)
        self.client.subscribe(self.topics.agg(self.cfg.worker, "grant"), self._on_grant)
        self.client.connect(timeout_s=30)
        for p in self.cfg.partitions:
            self.data.subscribe(self.topics.partition_filter(p), self._on_update)
        self.data.connect(timeout_s=30)  # what the session queued while we were away starts arriving
        self.client.publish(self.topics.agg(self.cfg.worker, "status"), self._status("online"), retain=True)

    def stop(self) -> None:
        try:
            self.client.publish(self.topics.agg(self.cfg.worker, "status"), self._status("offline"), retain=True)
        except PqsuError:
            pass
        self.client.close()
        self._stopping = True  # the data connection's thread stops waiting for room in the queue
        self.data.close()

    def run(self, stop: threading.Event) -> None:
        """Judge, claim, fold and hand over until `stop`; one round at a time, as announced."""
        last_flush = time.monotonic()
        while not stop.is_set():
            self._follow_round()
            rnd = self.intake.round if self.intake else None
            if rnd is None:  # updates wait in the queue (then in the broker) until their round opens
                stop.wait(0.02)
                continue
            if items := self._take(0.05):
                self.intake.submit_many(items)
            if rnd is not None and rnd.task.round in self.closing:
                while items := self._take(0.0):  # what already arrived still counts
                    self.intake.submit_many(items)
                self._hand_over(final=True)
                self.intake.round = None
            elif rnd is not None and time.monotonic() - last_flush >= self.cfg.flush_s:
                self._hand_over(final=False)
                last_flush = time.monotonic()

    def _follow_round(self) -> None:
        """Open the announced round once the plan for its job is known (the previous one handed over)."""
        task, plan = self.task, self.plan
        if task is None or plan is None or plan.get("job") != task.job or not task.partitions:
            return
        if self.intake is None or self.intake_job != plan["job"]:
            shapes = {k: tuple(s) for k, s in plan["shapes"]}
            self.intake = RoundIntake(shapes, limits_for(shapes), clip_norm=plan.get("clip_norm"), keys=self.cfg.keys)
            self.intake.claim = self._claim
            self.intake_job, self.opened = plan["job"], -1
        if task.round == self.opened or task.round in self.closing or task.remaining_s == 0:
            return
        if self.intake.round is not None:
            self._hand_over(final=True)
        self.intake.open(OpenRound(task, tuple(sorted(task.devices)), time.perf_counter()))
        self.opened, self._rejected_seen = task.round, collections.Counter()

    def _take(self, timeout_s: float) -> list[tuple[bytes, str]]:
        try:
            items = [self.updates.get(timeout=timeout_s)]
        except queue.Empty:
            return []
        while len(items) < self.cfg.batch:
            try:
                items.append(self.updates.get_nowait())
            except queue.Empty:
                break
        return items

    def _claim(self, devices: list[str]) -> list[str | None]:
        rnd = self.intake.round
        self._seq += 1
        seq = self._seq
        self.client.publish(self.topics.agg(self.cfg.worker, "claim"),
                            wire.encode_claim(wire.Claim(rnd.task.round, seq, self.cfg.worker, rnd.task.job,
                                                         tuple(devices))))
        with self._granted:
            ok = self._granted.wait_for(lambda: seq in self._grants, timeout=self.cfg.claim_timeout_s)
            grant = self._grants.pop(seq, None)
        if not ok or grant is None or len(grant.codes) != len(devices):
            return ["claim-timeout"] * len(devices)
        return [None if c == wire.GRANTED else wire.GRANT_REASONS.get(c, "not-granted") for c in grant.codes]

    def _hand_over(self, final: bool) -> None:
        """Publish what was folded since the last partial and start a new one (a fresh FedAvg)."""
        intake, rnd = self.intake, self.intake.round
        agg = intake.aggregator
        sums, weight, count = agg.partial()
        refused = rnd.rejected - self._rejected_seen
        refused.update(self._take_refused())
        if not final and count == 0 and not refused:
            return
        self._rejected_seen = collections.Counter(rnd.rejected)
        # The partial counts this worker's uploads since its last one: the round's totals restart with it.
        uploads, bytes_up, loss_sum = rnd.uploads, rnd.bytes_up, rnd.loss_sum
        rnd.uploads, rnd.bytes_up, rnd.loss_sum = 0, 0, 0.0
        self._seq += 1
        msg = wire.Partial(rnd.task.round, self._seq, self.cfg.worker, rnd.task.job, rnd.task.model_id, final, count,
                           uploads, weight, loss_sum, bytes_up, dict(refused), sums if count else np.empty(0, np.float32))
        self.client.publish_chunked(self.topics.agg(self.cfg.worker, "partial"), wire.encode_partial(msg),
                                    self.cfg.chunk_limit)
        intake.aggregator = FedAvg(intake.shapes, agg.clip_norm)
        self.handed["partials"] += 1
        self.handed["updates"] += count

    def _take_refused(self) -> dict[str, int]:
        taken = dict(self.refused)
        self.refused.subtract(taken)
        return {k: v for k, v in taken.items() if v}


# ---------------------------------------------------------------------------------------------- coordinator

@dataclass
class _Held:
    """What the coordinator knows of one worker in the open round."""

    granted: int = 0
    handed: int = 0
    final: bool = False
    online: bool = True


class WorkerPool:
    """The coordinator's side of the workers (see the module docstring). Claims are answered on the MQTT
    thread; partials are queued there and reduced by `apply()` on the round loop's thread."""

    def __init__(self, client: MqttClient, topics: Topics, job: str):
        self.client, self.topics, self.job = client, topics, job
        self.reassembler = chunking.Reassembler(max_messages=256, max_bytes=1 << 30)
        self.partials: queue.Queue[bytes] = queue.Queue()
        self.counted: queue.Queue[str] = queue.Queue()   # devices granted, for the round loop's answered set
        self.lock = threading.Lock()
        self.round: Round | None = None
        self.aggregator: FedAvg | None = None
        self.workers: dict[str, _Held] = {}
        self.status: dict[str, dict] = {}
        self.bad = collections.Counter()

    def subscribe(self) -> None:
        self.client.subscribe(self.topics.agg_filter("claim"), self._on_claim)
        self.client.subscribe(self.topics.agg_filter("partial"), self._on_partial)
        self.client.subscribe(self.topics.agg_filter("status"), self._on_status)

    def publish_plan(self, shapes: dict, *, partitions: int, clip_norm: float | None) -> None:
        self.client.publish(self.topics.agg_plan, plan_message(shapes, job=self.job, partitions=partitions,
                                                               clip_norm=clip_norm), retain=True)

    def open(self, rnd: Round, aggregator: FedAvg) -> None:
        with self.lock:
            self.round, self.aggregator = rnd, aggregator
            self.workers = {w: _Held(online=st.get("state") == "online") for w, st in self.status.items()}

    def uncovered(self, partitions: int) -> list[int]:
        """Partitions no online worker says it reads."""
        with self.lock:
            read = {p for st in self.status.values() if st.get("state") == "online" for p in st.get("partitions", [])
                    if isinstance(p, int)}
        return [p for p in range(partitions) if p not in read]

    def _on_status(self, topic: str, payload: bytes, retained: bool) -> None:
        try:
            _, worker = self.topics.parse(topic)
            st = json.loads(payload) if payload else {"state": "offline"}
        except (TopicError, ValueError):
            return
        with self.lock:
            self.status[worker] = st
            held = self.workers.setdefault(worker, _Held())
            held.online = st.get("state") == "online"

    def _on_claim(self, topic: str, payload: bytes, retained: bool) -> None:
        try:
            _, worker = self.topics.parse(topic)
            claim = wire.decode_claim(payload)
        except (TopicError, wire.PartialError):
            self.bad["agg-malformed"] += 1
            return
        codes = bytearray()
        with self.lock:
            rnd = self.round
            if rnd is None or claim.round != rnd.task.round or claim.job != self.job or claim.worker != worker:
                codes = bytearray([wire.CLOSED] * len(claim.devices))
            else:
                held = self.workers.setdefault(worker, _Held())
                for device in claim.devices:
                    slot = rnd.index(device)
                    if slot is None:
                        codes.append(wire.NOT_ASKED)
                    elif rnd.was_counted(slot):
                        codes.append(wire.TAKEN)
                    else:
                        rnd.counted[slot >> 3] |= 1 << (slot & 7)
                        held.granted += 1
                        codes.append(wire.GRANTED)
                        self.counted.put(device)
        self.client.publish(self.topics.agg(worker, "grant"),
                            wire.encode_grant(wire.Grant(claim.round, claim.seq, worker, claim.job, bytes(codes))))

    def _on_partial(self, topic: str, frame: bytes, retained: bool) -> None:
        try:
            _, worker = self.topics.parse(topic)
            message = self.reassembler.add(frame, source=worker)
        except (TopicError, chunking.ChunkError):
            self.bad["agg-malformed"] += 1
            return
        if message is not None:
            self.partials.put(message)

    def apply(self) -> int:
        """Reduce the partials that arrived; returns how many."""
        n = 0
        while True:
            try:
                payload = self.partials.get_nowait()
            except queue.Empty:
                return n
            n += self._reduce(payload)

    def _reduce(self, payload: bytes) -> int:
        rnd, agg = self.round, self.aggregator
        try:
            p = wire.decode_partial(payload)
        except wire.PartialError as exc:
            log.warning("aggregator partial refused: %s", exc)
            self.bad["agg-malformed"] += 1
            return 0
        if rnd is None or p.round != rnd.task.round or p.job != self.job or p.model_id != rnd.task.model_id:
            self.bad["agg-stale"] += 1  # a late partial of a closed round: its devices were counted lost then
            return 0
        with self.lock:
            held = self.workers.setdefault(p.worker, _Held())
            if p.count > held.granted - held.handed or (p.count and p.sums.size != agg.layout.total):
                log.warning("partial from %s hands over %d updates, %d granted and not handed: refused",
                            p.worker, p.count, held.granted - held.handed)
                self.bad["agg-inconsistent"] += 1
                return 0
            held.handed += p.count
            held.final = held.final or p.final
        if p.count:
            agg.add_partial(p.sums, p.weight, p.count)
        rnd.uploads += p.uploads
        rnd.bytes_up += p.bytes_up
        rnd.loss_sum += p.loss_sum
        rnd.rejected.update(p.refused)
        return 1

    def take_counted(self) -> list[str]:
        out = []
        while True:
            try:
                out.append(self.counted.get_nowait())
            except queue.Empty:
                return out

    def hand_over(self, timeout_s: float = 10.0) -> dict[str, int]:
        """Ask every worker for its last partial of the round and reduce them; what a worker was granted and
        never handed over (it died, or did not answer in `timeout_s`) is counted as `worker-lost`."""
        rnd = self.round
        self.client.publish(self.topics.agg_close, json.dumps({"round": rnd.task.round, "job": self.job}).encode())
        deadline = time.monotonic() + timeout_s

        def waiting() -> list[str]:
            with self.lock:
                return [w for w, h in self.workers.items() if h.online and not h.final]
        while waiting() and time.monotonic() < deadline:
            self.apply()
            time.sleep(0.02)
        self.apply()
        with self.lock:
            lost = {w: h.granted - h.handed for w, h in self.workers.items() if h.granted > h.handed}
            self.round = None  # later claims of this round are refused as wrong-round
        if lost:
            log.warning("round %d: %d updates lost with workers %s (granted, never handed over)",
                        rnd.task.round, sum(lost.values()), ", ".join(sorted(lost)))
            rnd.rejected["worker-lost"] += sum(lost.values())
        for reason, n in self.bad.items():
            rnd.rejected[reason] += n
        self.bad.clear()
        return lost
