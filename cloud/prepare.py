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
from pqsu.export.pipeline import PrepareConfig, finish_with_report, pretrain
from pqsu.export.recovery import Round0Report

__all__ = ["PrepareConfig", "prepare_master", "prepare_master_with_report"]
log = logging.getLogger(__name__)


def prepare_master(cfg: PrepareConfig, proxy: ArrayDataset, *, progress: bool = False) -> nn.Module:
    """The initial global model: pre-trained on `proxy`, pruned, fine-tuned, BN folded."""
    return prepare_master_with_report(cfg, proxy, progress=progress)[0]


def prepare_master_with_report(cfg: PrepareConfig, proxy: ArrayDataset, *,
                               progress: bool = False) -> tuple[nn.Module, Round0Report]:
    """`prepare_master`, and what round 0 did (the ratio `auto:PT` chose, with its probes)."""
    pruning = "not pruned" if cfg.prune is None else (
        f"pruned {cfg.prune} ({cfg.importance} importance, {cfg.ranking} ranking), fine-tuned "
        f"{cfg.finetune_epochs:g} epoch(s)")
    log.info("round 0: %s pre-trained %g epoch(s) on %d proxy samples, %s", cfg.arch, cfg.pretrain_epochs, len(proxy),
             pruning)
    model, report = finish_with_report(pretrain(cfg, proxy, progress=progress), cfg, proxy, progress=progress)
    if isinstance(cfg.prune, str):
        log.info("round 0: %s chose ratio %s", cfg.prune, report.ratio)
    return model, report
