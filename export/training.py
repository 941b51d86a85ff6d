"""Train and evaluate in torch: cloud pre-training, post-pruning fine-tune, board fine-tune.

Data are numpy arrays already normalized (float32, N x C x H, W) and int64 labels, the
form `pqsu.export.datasets` produces, so the same helpers serve every caller.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm


@dataclass(frozen=True)
class TrainConfig:
    epochs: float = 1.0          # fractional epochs are allowed: 0.5 = half the samples once
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    time_budget_s: float | None = None  # stop early when a board's budget runs out
    seed: int = 0
    distill: float = 0.0         # weight of the teacher's soft targets in the loss (with `teacher`)
    temperature: float = 4.0     # softens both distributions, so the teacher's ranking of wrong classes shows
    # FedProx (Li et al. 2020): mu/2 ||w - w_start||^2 added to the loss holds a non-IID device's
    # fine-tune near the model it received, so its update drifts less towards its own labels.
    prox: float = 0.0


@dataclass(frozen=True)
class TrainStats:
    loss: float      # mean training loss over the steps taken
    samples: int     # samples seen (with repeats across epochs)
    steps: int
    seconds: float


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    loss: float
    samples: int


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, cfg: TrainConfig = TrainConfig(), *,
          progress: bool = False, desc: str = "train", teacher: nn.Module | None = None) -> TrainStats:
    """SGD with momentum over shuffled mini-batches; deterministic for `cfg.seed`.

    With a `teacher` and `cfg.distill` > 0 the loss is knowledge distillation (Hinton et al.):
    (1 - distill) x cross-entropy + distill x T^2 x KL(teacher || model) at temperature T. A pruned
    model recovers from its unpruned self this way: the soft targets carry more than the labels of
    a small proxy set."""
    if len(x) == 0:
        return TrainStats(float("nan"), 0, 0, 0.0)
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    anchor = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad] if cfg.prox > 0 else []
    steps_total = max(1, math.ceil(cfg.epochs * len(x) / cfg.batch_size))
    order = np.concatenate([rng.permutation(len(x)) for _ in range(math.ceil(cfg.epochs) or 1)])
    model.train()
    start, loss_sum, steps, seen = time.perf_counter(), 0.0, 0, 0
    bar = tqdm(total=steps_total, desc=desc, disable=not progress, unit="batch", leave=False)
    for step in range(steps_total):
        idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        if len(idx) == 0:
            break
        xb, yb = torch.from_numpy(x[idx]), torch.from_numpy(y[idx])
        opt.zero_grad(set_to_none=True)
        logits = model(xb)
        loss = F.cross_entropy(logits, yb)
        if teacher is not None and cfg.distill > 0:
            loss = (1 - cfg.distill) * loss + cfg.distill * distillation_loss(logits, teacher, xb, cfg.temperature)
        loss.backward()
        # the proximal term's gradient, mu (w - w_start), added directly (no graph over every weight); it is
        # not in the reported loss: the loss gate (upload=loss) compares data losses
        with torch.no_grad():
            for p, p0 in anchor:
                if p.grad is not None:
                    p.grad.add_(p - p0, alpha=cfg.prox)
        opt.step()
        loss_sum, steps, seen = loss_sum + loss.item(), steps + 1, seen + len(idx)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum / steps:.3f}")
        if cfg.time_budget_s is not None and time.perf_counter() - start > cfg.time_budget_s:
            break
    bar.close()
    model.eval()
    return TrainStats(loss_sum / max(steps, 1), seen, steps, time.perf_counter() - start)


def distillation_loss(logits: torch.Tensor, teacher: nn.Module, xb: torch.Tensor, temperature: float) -> torch.Tensor:
    with torch.no_grad():
        soft = F.softmax(teacher.eval()(xb) / temperature, dim=1)
    return F.kl_div(F.log_softmax(logits / temperature, dim=1), soft, reduction="batchmean") * temperature ** 2


@torch.no_grad()
def predict_logits(model: nn.Module, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    model.eval()
    return np.concatenate([model(torch.from_numpy(x[i:i + batch_size])).numpy()
                           for i in range(0, len(x), batch_size)]) if len(x) else np.zeros((0, 0), np.float32)


def evaluate_logits(logits: np.ndarray, y: np.ndarray) -> Evaluation:
    """Accuracy and mean cross-entropy of logits from any runtime (torch or onnxruntime)."""
    if len(y) == 0:
        return Evaluation(float("nan"), float("nan"), 0)
    t = torch.from_numpy(np.asarray(logits, dtype=np.float32))
    loss = float(F.cross_entropy(t, torch.from_numpy(y)))
    return Evaluation(float((logits.argmax(1) == y).mean()), loss, len(y))


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 512) -> Evaluation:
    return evaluate_logits(predict_logits(model, x, batch_size), y)
