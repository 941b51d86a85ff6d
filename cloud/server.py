"""The coordinator's round logic, independent of how messages travel.

open_round -> submit (any number of payloads, any order, duplicates, garbage) ->
close_round. The in-process simulator and the MQTT coordinator both drive this one
object, so both give the same numbers for the same seed.

Nothing a device sends can corrupt the master model: every payload is decoded,
authenticated and checked against the round before it reaches the aggregator, and the
aggregated step is applied only if every resulting weight is finite. Those checks and the
round's aggregator live in cloud/intake.py, which aggregator workers (cloud/workers.py) run
too; with workers the server's round is fed their partial sums instead of payloads.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from torch import nn

from pqsu.cloud.aggregate import AggregationError
from pqsu.cloud.downlink import Downlink, DownlinkConfig
from pqsu.cloud.intake import Round, RoundIntake, Verdict, limits_for  # noqa: F401  (part of this module's API)
from pqsu.cloud.strategies import make_strategy
from pqsu.export.pipeline import Exported, export_model
from pqsu.export.runtime import OrtModel
from pqsu.export.training import evaluate_logits
from pqsu.protocol import codec
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
    local_prox: float = 0.0             # FedProx mu, sent in every round task
    time_budget_s: float | None = None
    seed: int = 0
    limits: codec.Limits | None = None  # None: sized to the model (a dense fp32 update fits, nothing much larger)
    downlink: DownlinkConfig = DownlinkConfig()  # keyframes and patches (the default: a full export every round)


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
    train_loss: float | None = None  # None: no upload carried a loss (JSON has no NaN)
    # federated evaluation: the devices' own held-out accuracy of this round's model (cloud/report.py
    # device_evaluation); None when no device reported one. Set by the round runner.
    device_eval: dict | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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
        self.intake = RoundIntake(self.shapes, self.limits, aggregator=cfg.aggregator, clip_norm=cfg.clip_norm,
                                  keys=keys)  # validates the aggregator spec early
        downlink = cfg.downlink if cfg.precision == "int8" else DownlinkConfig()  # patches need int8 QDQ
        self.downlink = Downlink(downlink, self._export, self.master)
        self._runtime: OrtModel | None = None  # a session over the current model, for evaluation
        self._runtime_id = ""
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
                         momentum=c.momentum, time_budget_s=c.time_budget_s, seed=c.seed, prox=c.local_prox)
        self.intake.open(Round(task, tuple(sorted(set(devices))), time.perf_counter()))
        return task

    # -- uplink ------------------------------------------------------------------------
    def submit(self, payload: bytes, sender: str | None = None) -> Verdict:
        """Check one update and fold it into the round; never raises for bad input (cloud/intake.py).

        `sender` is the device the transport vouches for (its topic, bound to its broker
        identity by ACL); an update naming another device is refused.
        """
        return self.intake.submit(payload, sender)

    def submit_many(self, items: list[tuple[bytes, str | None]]) -> list[Verdict]:
        """`submit` for each (payload, sender) in order, decoded and folded as one batch."""
        return self.intake.submit_many(items)

    def admits(self, device: str) -> bool:
        """Whether `device` may be asked to train: any device without keys, else one that has a key."""
        return self.keys is None or device in self.keys

    def close_round(self, skipped: int = 0) -> RoundReport:
        """Aggregate what was accepted, step the master, evaluate the model devices get next."""
        rnd = self.intake.round
        if rnd is None:
            raise RuntimeError("close_round without open_round")
        old_bytes, _ = self.model_message()
        delta = self.intake.aggregator.result()
        if delta is not None:
            try:
                self.optimizer.step(self.master, delta)
                self.downlink.advance()  # the master changed: the next version of the devices' file
            except AggregationError as exc:
                rnd.rejected["non-finite-aggregate"] += 1
                log.warning("round %d: %s", rnd.task.round, exc)
        data, info = self.model_message()
        ev = self.evaluate()
        self.intake.round, self.rounds_done = None, self.rounds_done + 1
        return RoundReport(
            round=rnd.task.round, model_id=info.model_id, accuracy=ev.accuracy, loss=ev.loss,
            selected=len(rnd.devices), uploads=rnd.uploads, skipped=skipped, rejected=dict(rnd.rejected),
            bytes_up=rnd.bytes_up, bytes_down=len(old_bytes) * len(rnd.devices),
            model_bytes=len(data), seconds=time.perf_counter() - rnd.started,
            train_loss=rnd.loss_sum / rnd.uploads if rnd.uploads else None)

def choose_devices(devices: list[str], fraction: float, seed: int, round_: int) -> list[str]:
    """The devices asked in a round: a seeded sample of `fraction` of them, the same for every driver."""
    pool = sorted(devices)
    if not pool:
        return []
    k = min(len(pool), max(1, int(np.ceil(fraction * len(pool)))))
    picked = np.random.default_rng([seed, round_]).choice(len(pool), size=k, replace=False)
    return [pool[i] for i in sorted(picked.tolist())]



