"""Pruning and its recovery, the middle of round 0: prune, fine-tune, (repeat), and the `auto:PT` search.

Recovery levers, each a PrepareConfig field so that the coordinator and `pqsu export` share them:
  importance / ranking   which channels go (pqsu.export.importance; per layer or model-wide)
  distill                knowledge distillation from the unpruned model during the fine-tune
  prune_steps            prune in K steps, fine-tuning after each; the fine-tune budget is split
                         between them, so K steps cost what one does
  prune = "auto:PT"      the largest ratio (of 0.1 ... 0.9) whose fine-tuned accuracy on a held-out
                         fifth of the proxy data stays within PT points of the unpruned model's

The search bisects over the ratios, so it assumes accuracy falls as the ratio grows; each probe is
a full prune-and-fine-tune on the other four fifths, and the winning probe's model is the one kept
(its reported accuracy is that of the model shipped).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from pqsu.export.datasets import ArrayDataset
from pqsu.export.importance import accumulate_gradients, needs_gradients
from pqsu.export.prune_spec import parse_prune  # noqa: F401  (re-exported: round 0 reads it here)
from pqsu.export.pruning import global_ratio, make_pruner
from pqsu.export.training import TrainConfig, evaluate, train
from pqsu.protocol.errors import PqsuError

log = logging.getLogger(__name__)
AUTO_GRID = tuple(round(0.1 * i, 1) for i in range(1, 10))
VALIDATION_FRACTION = 0.2


@dataclass
class Round0Report:
    """What round 0 did to the model: the ratio it pruned (chosen or given) and, for auto, every probe."""

    prune: float | str | None
    ratio: float | None
    importance: str
    ranking: str
    distill: float
    prune_steps: int
    finetune_epochs: float
    tolerance_pt: float | None = None
    unpruned_val_accuracy: float | None = None
    chosen_val_accuracy: float | None = None
    val_samples: int = 0
    probes: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def prune_and_recover(model: nn.Module, cfg, data: ArrayDataset, epochs: float, ratio: float,
                      teacher: nn.Module | None, *, progress: bool = False) -> nn.Module:
    """`model` (changed in place) pruned to `ratio` in `cfg.prune_steps` steps, fine-tuned `epochs` in all."""
    x, y = data.normalized(), data.y
    steps = max(1, cfg.prune_steps)
    example = torch.zeros(1, *data.input_shape)
    grads = needs_gradients(cfg.importance)
    if grads:
        accumulate_gradients(model, x, y)
    if cfg.ranking == "global":  # the channel ratio that leaves uniform `ratio`'s parameter count
        ratio = global_ratio(model, ratio, example, round_to=cfg.round_to, importance=cfg.importance)
    pruner = make_pruner(model, ratio, example, round_to=cfg.round_to, importance=cfg.importance,
                         global_pruning=cfg.ranking == "global", steps=steps)
    for i in range(1, steps + 1):
        if grads and i > 1:
            accumulate_gradients(model, x, y)  # the ranking of later steps sees the fine-tuned weights
        pruner.step()
        model.zero_grad(set_to_none=True)
        if epochs > 0 and len(data):
            tc = TrainConfig(epochs=epochs / steps, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
                             seed=cfg.seed + i, distill=cfg.distill)
            train(model, x, y, tc, progress=progress, desc=f"fine-tune {i}/{steps}" if steps > 1 else "fine-tune",
                  teacher=teacher)
    return model


def search_ratio(model: nn.Module, cfg, data: ArrayDataset, epochs: float, tolerance_pt: float,
                 teacher: nn.Module | None, *, progress: bool = False) -> tuple[nn.Module, Round0Report]:
    """Bisect AUTO_GRID for the largest ratio within `tolerance_pt` of the unpruned model on held-out proxy data."""
    if len(data) < 10:
        raise PqsuError(f"prune auto:PT needs proxy data to validate on, got {len(data)} samples")
    order = np.random.default_rng(cfg.seed + 7).permutation(len(data))
    n_val = max(1, int(VALIDATION_FRACTION * len(data)))
    val, fit = data.subset(order[:n_val]), data.subset(order[n_val:])
    xv, yv = val.normalized(), val.y
    base = evaluate(model, xv, yv).accuracy
    report = Round0Report(cfg.prune, None, cfg.importance, cfg.ranking, cfg.distill, cfg.prune_steps, epochs,
                          tolerance_pt, base, None, len(val))
    lo, hi, best = -1, len(AUTO_GRID), None  # AUTO_GRID[lo] passed, AUTO_GRID[hi] failed
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ratio = AUTO_GRID[mid]
        candidate = prune_and_recover(copy.deepcopy(model), cfg, fit, epochs, ratio, teacher, progress=progress)
        acc = evaluate(candidate, xv, yv).accuracy
        ok = 100 * (base - acc) <= tolerance_pt
        report.probes.append({"ratio": ratio, "val_accuracy": acc, "within": ok})
        log.info("auto prune: %.0f%% -> %.2f%% on %d held-out proxy samples (unpruned %.2f%%): %s",
                 100 * ratio, 100 * acc, len(val), 100 * base, "within" if ok else "outside")
        if ok:
            lo, best = mid, (ratio, candidate, acc)
        else:
            hi = mid
    if best is None:
        log.info("auto prune: no ratio stays within %g points; the model is not pruned", tolerance_pt)
        return model, report
    report.ratio, report.chosen_val_accuracy = best[0], best[2]
    return best[1], report


def fixed_report(cfg, ratio: float | None, epochs: float) -> Round0Report:
    return Round0Report(cfg.prune, ratio, cfg.importance, cfg.ranking, cfg.distill, cfg.prune_steps, epochs)


