"""The coordinator's round logic, independent of how messages travel.

open_round -> submit (any number of payloads, any order, duplicates, garbage) ->
close_round. The in-process simulator and the MQTT coordinator both drive this one
object, so both give the same numbers for the same seed.

Nothing a device sends can corrupt the master model: every payload is decoded,
authenticated and checked against the round before it reaches the aggregator, and the
aggregated step is applied only if every resulting weight is finite.
"""
from __future__ import annotations

import bisect
import collections
import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from pqsu.cloud.aggregate import AggregationError, make_aggregator
from pqsu.cloud.downlink import Downlink, DownlinkConfig
from pqsu.cloud.strategies import make_strategy
from pqsu.export.pipeline import Exported, export_model
from pqsu.export.runtime import OrtModel
from pqsu.export.training import evaluate_logits
from pqsu.protocol import codec
from pqsu.protocol.errors import CodecError
from pqsu.protocol.messages import RoundTask
from pqsu.protocol.model_info import ModelInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerConfig:
    aggregator: str = "fedavg"          # fedavg | median | trimmed:F
    clip_norm: float | None = None
    server_lr: float = 1.0
    server_momentum: float = 0.0
    server_opt: str = "fedavgm"         # pqsu.cloud.strategies
    precision: str = "int8"             # downlink: int8 (ours, the paper's) or fp32 (FedAvg baseline)
    epochs: float = 1.0                 # what devices are asked to do each round
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.0
    time_budget_s: float | None = None
    seed: int = 0
    limits: codec.Limits | None = None  # None: sized to the model (a dense fp32 update fits, nothing much larger)
    downlink: DownlinkConfig = DownlinkConfig()  # keyframes and patches (the default: a full export every round)


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    reason: str   # "accepted" or a short rejection key (counted in the round report)
    detail: str = ""


@dataclass
class RoundReport:
    round: int
    model_id: str
    accuracy: float
    loss: float
    selected: int
    uploads: int
    skipped: int
    rejected: dict[str, int]
    bytes_up: int             # accepted update payloads
    bytes_down: int           # the model file once per selected device; the round runner counts real downloads
    model_bytes: int
    seconds: float
    train_loss: float = float("nan")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class _Round:
    """One open round. Per asked device it keeps one bit (counted or not) beside the sorted device
    list, and running totals otherwise, so the server holds O(model) + a few bytes per asked device
    however many updates arrive (`pqsu bench codec` measures it up to 10,000 devices)."""

    task: RoundTask
    devices: tuple[str, ...]   # sorted: a device's index is found by bisection
    started: float
    counted: bytearray = field(default_factory=bytearray)  # bit i set once devices[i]'s update is accepted
    uploads: int = 0
    bytes_up: int = 0
    loss_sum: float = 0.0
    rejected: collections.Counter = field(default_factory=collections.Counter)

    def __post_init__(self) -> None:
        self.counted = bytearray((len(self.devices) + 7) // 8)

    def index(self, device: str) -> int | None:
        """The device's position among those asked, None if it was not asked."""
        i = bisect.bisect_left(self.devices, device)
        return i if i < len(self.devices) and self.devices[i] == device else None

    def was_counted(self, i: int) -> bool:
        return bool(self.counted[i >> 3] & (1 << (i & 7)))

    def count(self, i: int, nbytes: int, loss: float) -> None:
        self.counted[i >> 3] |= 1 << (i & 7)
        self.uploads += 1
        self.bytes_up += nbytes
        self.loss_sum += loss


class FederatedServer:
    def __init__(self, model: nn.Module, info: ModelInfo, calibration: np.ndarray, eval_x: np.ndarray,
                 eval_y: np.ndarray, cfg: ServerConfig = ServerConfig(), *, keys: Mapping[str, bytes] | None = None):
        """`model` is the BN-folded (pruned) master; `info` carries class names and normalization."""
        self.model, self.info, self.cfg = model.eval(), info, cfg
        self.calibration, self.eval_x, self.eval_y = calibration, eval_x, eval_y
        self.keys = keys
        self.master = {k: v.detach().numpy() for k, v in self.model.state_dict().items()}  # views: updates write through
        self.shapes = {k: v.shape for k, v in self.master.items()}
        self.limits = cfg.limits or limits_for(self.shapes)
        self.optimizer = make_strategy(cfg.server_opt, cfg.server_lr, cfg.server_momentum)
        self._aggregator = make_aggregator(cfg.aggregator, self.shapes, cfg.clip_norm)  # validates the spec early
        downlink = cfg.downlink if cfg.precision == "int8" else DownlinkConfig()  # patches need int8 QDQ
        self.downlink = Downlink(downlink, self._export, self.master)
        self._runtime: OrtModel | None = None  # a session over the current model, for evaluation
        self._runtime_id = ""
        self._round: _Round | None = None
        self.rounds_done = 0

    # -- downlink ----------------------------------------------------------------------
    def model_message(self) -> tuple[bytes, ModelInfo]:
        """The current version of the file devices receive (made once per master version, in memory:
        a keyframe export or the master requantized into the held file, `Downlink`)."""
        model = self.downlink.model()
        return model.data, model.info

    def _export(self) -> Exported:
        """A keyframe: the master exported whole (int8 calibrated on the server's samples, or fp32)."""
        return export_model(self.model, self.info, self.calibration if self.cfg.precision == "int8" else None)

    def evaluate(self):
        """Accuracy and loss of the model devices get (int8 or fp32 as shipped), on held-out data,
        computed by the session boards serve with (`pqsu.export.runtime`)."""
        model = self.downlink.model()
        if self._runtime is None or self._runtime_id != model.info.model_id:
            self._runtime, self._runtime_id = OrtModel(model.file), model.info.model_id  # stamped: no second hash
        return evaluate_logits(self._runtime.logits(self.eval_x), self.eval_y)

    def open_round(self, round_: int, devices: list[str]) -> RoundTask:
        data, info = self.model_message()
        c = self.cfg
        task = RoundTask(round=round_, model_id=info.model_id, epochs=c.epochs, batch_size=c.batch_size, lr=c.lr,
                         momentum=c.momentum, time_budget_s=c.time_budget_s, seed=c.seed)
        self._round = _Round(task, tuple(sorted(set(devices))), time.perf_counter())
        self._aggregator = make_aggregator(c.aggregator, self.shapes, c.clip_norm)
        return task

    # -- uplink ------------------------------------------------------------------------
    def submit(self, payload: bytes, sender: str | None = None) -> Verdict:
        """Check one update and fold it into the round; never raises for bad input.

        `sender` is the device the transport vouches for (its topic, bound to its broker
        identity by ACL); an update naming another device is refused.
        """
        verdict = self._check_and_add(payload, sender)
        if self._round is not None and not verdict.accepted:
            self._round.rejected[verdict.reason] += 1
            log.info("rejected update (%s): %s", verdict.reason, verdict.detail)
        return verdict

    def admits(self, device: str) -> bool:
        """Whether `device` may be asked to train: any device without keys, else one that has a key."""
        return self.keys is None or device in self.keys

    def _check_and_add(self, payload: bytes, sender: str | None) -> Verdict:
        rnd = self._round
        if rnd is None:
            return Verdict(False, "no-round", "no round is open")
        try:
            header = codec.peek_header(payload)
        except CodecError as exc:
            return Verdict(False, _codec_reason(exc), str(exc))
        if sender is not None and header.device_id != sender:
            return Verdict(False, "topic-mismatch", f"update from {sender!r} names device {header.device_id!r}")
        # Who sends before what it sends: a device removed from the keys is refused as unknown in any round.
        key = None
        if self.keys is not None:
            key = self.keys.get(header.device_id)
            if key is None:
                return Verdict(False, "unknown-device", f"no key for device {header.device_id!r}")
        if header.round != rnd.task.round:
            return Verdict(False, "wrong-round", f"update for round {header.round}, round {rnd.task.round} is open")
        slot = rnd.index(header.device_id)
        if slot is None:
            return Verdict(False, "not-selected", f"device {header.device_id!r} was not asked this round")
        if rnd.was_counted(slot):
            return Verdict(False, "duplicate", f"device {header.device_id!r} already counted this round")
        try:
            update = codec.decode(payload, key=key, limits=self.limits)
        except CodecError as exc:
            return Verdict(False, _codec_reason(exc), str(exc))
        problem = self._mismatch(update)
        if problem:
            return Verdict(False, problem[0], problem[1])
        self._aggregator.add(update)
        rnd.count(slot, len(payload), update.loss)
        return Verdict(True, "accepted")

    def _mismatch(self, update: codec.Update) -> tuple[str, str] | None:
        rnd = self._round
        if update.model_id != rnd.task.model_id:
            return "wrong-model", f"update is relative to model {update.model_id!r}, not {rnd.task.model_id}"
        if update.num_samples == 0:
            return "no-samples", "update claims 0 training samples"
        for b in update.blocks:
            if b.name not in self.shapes:
                return "unknown-tensor", f"tensor {b.name!r} is not in the model"
            if tuple(b.shape) != tuple(self.shapes[b.name]):
                return "shape-mismatch", f"tensor {b.name!r} has shape {b.shape}, model has {self.shapes[b.name]}"
        return None

    def close_round(self, skipped: int = 0) -> RoundReport:
        """Aggregate what was accepted, step the master, evaluate the model devices get next."""
        rnd = self._round
        if rnd is None:
            raise RuntimeError("close_round without open_round")
        old_bytes, _ = self.model_message()
        delta = self._aggregator.result()
        if delta is not None:
            try:
                self.optimizer.step(self.master, delta)
                self.downlink.advance()  # the master changed: the next version of the devices' file
            except AggregationError as exc:
                rnd.rejected["non-finite-aggregate"] += 1
                log.warning("round %d: %s", rnd.task.round, exc)
        data, info = self.model_message()
        ev = self.evaluate()
        self._round, self.rounds_done = None, self.rounds_done + 1
        return RoundReport(
            round=rnd.task.round, model_id=info.model_id, accuracy=ev.accuracy, loss=ev.loss,
            selected=len(rnd.devices), uploads=rnd.uploads, skipped=skipped, rejected=dict(rnd.rejected),
            bytes_up=rnd.bytes_up, bytes_down=len(old_bytes) * len(rnd.devices),
            model_bytes=len(data), seconds=time.perf_counter() - rnd.started,
            train_loss=rnd.loss_sum / rnd.uploads if rnd.uploads else float("nan"))

def limits_for(shapes: dict[str, tuple[int, ...]]) -> codec.Limits:
    """Decode limits for updates to a model of these shapes: room for a dense fp32 update
    (4 bytes an entry, plus headers) and no more, whatever the codec's generic defaults."""
    numel = sum(int(np.prod(s)) for s in shapes.values())
    default = codec.Limits()
    return dataclasses.replace(default, max_payload_bytes=max(default.max_payload_bytes, 4 * numel + (1 << 20)),
                               max_tensors=max(default.max_tensors, len(shapes)))


def choose_devices(devices: list[str], fraction: float, seed: int, round_: int) -> list[str]:
    """The devices asked in a round: a seeded sample of `fraction` of them, the same for every driver."""
    pool = sorted(devices)
    if not pool:
        return []
    k = min(len(pool), max(1, int(np.ceil(fraction * len(pool)))))
    picked = np.random.default_rng([seed, round_]).choice(len(pool), size=k, replace=False)
    return [pool[i] for i in sorted(picked.tolist())]


def _codec_reason(exc: CodecError) -> str:
    return getattr(exc, "reason", "corrupt")
