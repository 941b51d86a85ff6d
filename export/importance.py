"""Channel importance criteria, chosen by name, in the Torch-Pruning style.

  l1        L1 norm of each channel group's weights (the FL-PQSU paper's criterion)
  l2        L2 norm of the same
  taylor    first-order Taylor estimate |w * dL/dw| summed over the group: what removing the
            channel would cost the loss on the proxy data (needs data to take gradients on)
  bn-scale  |gamma| of the BatchNorm after a conv (network slimming); groups without a
            BatchNorm (the zoo's linear layers, BN-free models) fall back to L1, so a model
            is pruned to the same budget whichever criterion is chosen
  random    a seeded random ranking: the floor any criterion must beat

Each is a small object built by name (`make_importance`), so a new criterion is one entry in
`IMPORTANCES`. Global ranking (one threshold across layers) compares scores between groups;
every criterion here normalizes its scores by the group mean first, as Torch-Pruning does,
so no layer wins or loses only because its weights are larger.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pqsu.export.prune_spec import IMPORTANCE_NAMES, check_importance
from pqsu.protocol.errors import PqsuError


class ImportanceError(PqsuError):
    """An unknown importance criterion, or one that lacks what it needs."""


def _tp():
    import torch_pruning as tp  # only pruning needs it (a board rebuilding a model does not)
    return tp


def _magnitude(p: int):
    return _tp().importance.GroupMagnitudeImportance(p=p)


def _taylor():
    return _tp().importance.GroupTaylorImportance()


class _BNScaleOrL1:
    """BatchNorm scale where the group has one, L1 magnitude where it does not."""

    def __init__(self):
        tp = _tp()
        self.bn, self.l1 = tp.importance.BNScaleImportance(), tp.importance.GroupMagnitudeImportance(p=1)

    def __call__(self, group):
        score = self.bn(group)
        return score if score is not None else self.l1(group)


class _Random:
    def __init__(self, seed: int = 0):
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, group):
        return torch.rand(len(group[0].idxs), generator=self.gen)


IMPORTANCES: dict[str, tuple[Callable[[], object], bool]] = {  # name -> (factory, needs gradients)
    "l1": (lambda: _magnitude(1), False),
    "l2": (lambda: _magnitude(2), False),
    "taylor": (_taylor, True),
    "bn-scale": (_BNScaleOrL1, False),
    "random": (_Random, False),
}
assert tuple(IMPORTANCES) == IMPORTANCE_NAMES  # prune_spec names them for torch-free checks


def make_importance(name: str):
    check_importance(name)
    return IMPORTANCES[name][0]()


def needs_gradients(name: str) -> bool:
    check_importance(name)
    return IMPORTANCES[name][1]


def accumulate_gradients(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 64,
                         max_samples: int = 512) -> None:
    """Leave dL/dw of the cross-entropy over (up to `max_samples` of) `x` in every `.grad`, for
    gradient-based criteria. Eval mode: the ranking must not move the BatchNorm statistics."""
    if len(x) == 0:
        raise ImportanceError("a gradient-based importance (taylor) needs data to rank channels on")
    model.eval()
    model.zero_grad(set_to_none=True)
    n = min(len(x), max_samples)
    for i in range(0, n, batch_size):
        xb, yb = torch.from_numpy(x[i:min(i + batch_size, n)]), torch.from_numpy(y[i:min(i + batch_size, n)])
        (F.cross_entropy(model(xb), yb, reduction="sum") / n).backward()
