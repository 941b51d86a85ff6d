"""Round 0 on the cloud: the export pipeline's round 0 (`pqsu.export.pipeline`) on the proxy split.

The paper prunes the global model once, before federated training, on data the server
holds; the pruned, BN-folded model is the fp32 master from then on. `pqsu export` runs the
same steps, so a model exported by hand and the coordinator's first model agree for the
same settings and seed.
"""
from __future__ import annotations

import logging

from torch import nn

from pqsu.export.datasets import ArrayDataset
from pqsu.export.pipeline import PrepareConfig, prepare

__all__ = ["PrepareConfig", "prepare_master"]
log = logging.getLogger(__name__)


def prepare_master(cfg: PrepareConfig, proxy: ArrayDataset, *, progress: bool = False) -> nn.Module:
    """The initial global model: pre-trained on `proxy`, pruned, fine-tuned, BN folded."""
    log.info("round 0: %s pre-trained %g epoch(s) on %d proxy samples, %s", cfg.arch, cfg.pretrain_epochs, len(proxy),
             f"pruned {cfg.prune:.0%} and fine-tuned {cfg.finetune_epochs:g} epoch(s)" if cfg.prune is not None
             else "not pruned")
    return prepare(cfg, proxy, progress=progress)
