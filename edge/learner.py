"""One device's part of a round: model bytes in, an encoded update (or a skip) out.

model (int8 ONNX) -> torch via the bridge -> evaluated on the held-out samples (federated
evaluation) -> fine-tune on the other local samples -> delta ->
selective policy with error feedback -> sparse int8 update -> bytes. The in-process
simulator and the MQTT agent both call `EdgeLearner.run_round`, so the two give the
same bytes for the same seed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pqsu.edge.selective import RoundContext, SelectivePolicy
from pqsu.edge.state import DeviceState
from pqsu.export.bridge import torch_model_from_onnx
from pqsu.export.datasets import ArrayDataset
from pqsu.export.training import Evaluation, TrainConfig, evaluate, train
from pqsu.protocol.codec import Update, encode
from pqsu.protocol.errors import PqsuError
from pqsu.protocol.messages import RoundTask
from pqsu.protocol.model_id import VerifiedModel, as_verified

log = logging.getLogger(__name__)
# Federated evaluation: the fraction of a device's samples it never trains on and evaluates each received
# model on, so the fleet reports accuracy on the devices' own data, which the cloud has no copy of.
HOLDOUT = 0.1


@dataclass(frozen=True)
class TrainingBudget:
    """What a board accepts per round, whatever a round asks (its profile's caps)."""

    max_epochs: float | None = None
    max_batch_size: int | None = None
    time_budget_s: float | None = None

    def apply(self, task: RoundTask) -> RoundTask:
        caps = {}
        if self.max_epochs is not None and task.epochs > self.max_epochs:
            caps["epochs"] = self.max_epochs
        if self.max_batch_size is not None and task.batch_size > self.max_batch_size:
            caps["batch_size"] = self.max_batch_size
        if self.time_budget_s is not None and (task.time_budget_s is None or task.time_budget_s > self.time_budget_s):
            caps["time_budget_s"] = self.time_budget_s
        return dataclasses.replace(task, **caps) if caps else task


@dataclass(frozen=True)
class RoundOutcome:
    round: int
    payload: bytes | None   # None: the device skipped this round (its update stays in the residual)
    reason: str
    loss: float
    samples: int
    train_seconds: float
    nnz: int
    # the received model on the device's held-out samples before training, as the status carries it
    # ({"accuracy", "loss", "samples"}; None: nothing held out)
    evaluation: dict | None = None


class EdgeLearner:
    """A device's learning side. `x` is raw samples, batch first (uint8 images (N, C, H, W), float
    sensor windows (N, C, L)...): they are normalized with the mean and std the model itself
    declares, so data and model can never disagree."""

    def __init__(self, device_id: str, x: np.ndarray, y: np.ndarray, policy: SelectivePolicy, *,
                 state_path: str | Path | None = None, key: bytes | None = None,
                 allow_custom: bool | Collection[str] = False, budget: TrainingBudget = TrainingBudget(),
                 holdout: float = HOLDOUT):
        # `allow_custom`: the custom architectures (package.module:factory) this device may import to
        # rebuild a model it was sent, or True for any (the in-process simulator's own configured model).
        # `holdout`: the fraction of samples kept out of training for federated evaluation (held_out_mask).
        if len(x) != len(y) or x.ndim < 2:
            raise PqsuError(f"{device_id}: local data must be samples, batch first (N, C, ...), with one label each")
        if not 0 <= holdout < 1:
            raise PqsuError(f"{device_id}: the evaluation holdout must be a fraction in [0, 1), got {holdout}")
        held = held_out_mask(device_id, len(x), holdout)
        if held.all():  # too few samples to spare any: train on all of them, evaluate nothing
            held[:] = False
        self.device_id, self.x, self.y, self.policy = device_id, x[~held], y[~held], policy
        self.held_x, self.held_y = x[held], y[held]
        self.state_path = Path(state_path) if state_path else None
        self.state = DeviceState.load(self.state_path) if self.state_path else DeviceState()
        self.key, self.allow_custom, self.budget = key, allow_custom, budget
        self._normalized: tuple[tuple, np.ndarray, np.ndarray] | None = None

    def inputs(self, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
        """The local training samples normalized for a model (cached while the normalization is unchanged)."""
        return self._normalize(mean, std)[0]

    def held_inputs(self, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
        """The held-out samples, normalized the same way."""
        return self._normalize(mean, std)[1]

    def _normalize(self, mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
        if self._normalized is None or self._normalized[0] != (mean, std):
            parts = [ArrayDataset(x, y, name="local", classes=[], mean=mean, std=std).normalized()
                     for x, y in ((self.x, self.y), (self.held_x, self.held_y))]
            self._normalized = ((mean, std), *parts)
        return self._normalized[1], self._normalized[2]

    def save(self) -> None:
        """Persist the device state; call once the round's payload is safe (sent or in the outbox)."""
        if self.state_path:
            self.state.save(self.state_path)

    def run_round(self, task: RoundTask, model_file: VerifiedModel | bytes, downloaded: int | None = None) -> RoundOutcome:
        """One round on the model file: the agent hands over the one it verified on arrival (not hashed
        again); bytes are verified here, once. `downloaded`: what getting this model cost on the wire
        (a patch, the file, or 0 when held already; None: the file's length)."""
        model_file = as_verified(model_file)
        if model_file.model_id != task.model_id:
            raise PqsuError(f"round {task.round} announced model {task.model_id} but the file is {model_file.model_id}")
        model, info = torch_model_from_onnx(model_file, allow_custom=self.allow_custom)
        received = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
        if not self.state.fits({k: v.shape for k, v in received.items()}):
            log.info("%s: model architecture changed, starting a fresh residual", self.device_id)
            self.state.reset_tensors()

        task = self.budget.apply(task)
        cfg = TrainConfig(epochs=task.epochs, batch_size=task.batch_size, lr=task.lr, momentum=task.momentum,
                          time_budget_s=task.time_budget_s, seed=_seed(task.seed, self.device_id, task.round),
                          prox=task.prox)
        x = self.inputs(info.mean, info.std)
        if x.shape[1:] != tuple(info.in_shape):
            raise PqsuError(f"{self.device_id}: local samples are {x.shape[1:]}, "
                            f"the model takes {tuple(info.in_shape)}")
        # Before training: the model as received, on samples it was never trained on here.
        evaluation = _report(evaluate(model, self.held_inputs(info.mean, info.std), self.held_y)) \
            if len(self.held_y) else None
        stats = train(model, x, self.y, cfg)
        delta = {k: v.detach().numpy() - received[k] for k, v in model.state_dict().items()}
        if not (np.isfinite(stats.loss) and all(np.isfinite(d).all() for d in delta.values())):
            # A diverged run must not reach the residual: that would poison every later round.
            log.warning("%s: local training diverged in round %d; nothing sent, residual kept", self.device_id, task.round)
            return RoundOutcome(task.round, None, "local training diverged", stats.loss, stats.samples,
                                stats.seconds, 0, evaluation)
        update = {k: d + self.state.residual[k] if k in self.state.residual else d for k, d in delta.items()}
        previous = self.state.previous
        ctx = RoundContext(update=update, delta=delta, weights=received, loss=stats.loss,
                           last_uploaded_loss=self.state.last_uploaded_loss,
                           global_update={k: received[k] - previous[k] for k in received if k in previous} or None)
        prepared = self.policy.prepare(ctx)

        payload, nnz = None, 0
        if prepared.blocks is not None:
            msg = Update(round=task.round, device_id=self.device_id, model_id=task.model_id,
                         num_samples=len(self.x), loss=stats.loss, blocks=tuple(prepared.blocks))
            payload, nnz = encode(msg, key=self.key), sum(b.nnz for b in prepared.blocks)
            self.state.last_uploaded_loss = stats.loss
            self.state.uploads += 1
            self.state.bytes_up += len(payload)
        self.state.residual = prepared.residual
        self.state.previous = received if self.policy.needs_previous else {}
        self.state.last_round, self.state.rounds_joined = task.round, self.state.rounds_joined + 1
        self.state.bytes_down += len(model_file) if downloaded is None else downloaded
        return RoundOutcome(task.round, payload, prepared.decision.reason, stats.loss, stats.samples,
                            stats.seconds, nnz, evaluation)


def _report(ev: Evaluation) -> dict | None:
    """An evaluation in the status's form; None when its loss is not finite (a diverged model), which
    JSON cannot carry."""
    if not np.isfinite(ev.loss):
        return None
    return {"accuracy": float(ev.accuracy), "loss": float(ev.loss), "samples": int(ev.samples)}


def held_out_mask(device_id: str, n: int, fraction: float) -> np.ndarray:
    """Which of a device's `n` samples are held out: a fixed seeded choice of round(fraction * n) of them
    (seeded by the device id alone, so it is the same in every round and every restart, and no held-out
    sample is ever trained on)."""
    mask = np.zeros(n, bool)
    k = int(round(fraction * n))
    if k:
        seed = int.from_bytes(hashlib.sha256(f"holdout/{device_id}".encode()).digest()[:8], "little")
        mask[np.random.default_rng(seed).choice(n, size=k, replace=False)] = True
    return mask


def _seed(base: int, device_id: str, round_: int) -> int:
    """A per-device, per-round seed that does not depend on process or hash randomization."""
    digest = hashlib.sha256(f"{base}/{device_id}/{round_}".encode()).digest()
    return int.from_bytes(digest[:4], "little")
