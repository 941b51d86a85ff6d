"""Round 0 on the cloud: pre-train on a proxy split, prune once, fold BatchNorm.

The paper prunes the global model once, before federated training, on data the server
holds; the pruned, BN-folded model is the fp32 master from then on.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from pqsu.export.datasets import ArrayDataset
from pqsu.export.pruning import fold_batchnorm, prune_model
from pqsu.export.training import TrainConfig, train
from pqsu.export.zoo import build_model, default_spec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrepareConfig:
    arch: str = "cnn"
    prune: float | None = 0.5       # None: no pruning (the FedAvg baseline)
    pretrain_epochs: float = 1.0
    finetune_epochs: float = 0.5    # on the proxy split, after pruning
    batch_size: int = 32
    lr: float = 0.01
    seed: int = 0


def prepare_master(cfg: PrepareConfig, proxy: ArrayDataset, *, progress: bool = False) -> nn.Module:
    """The initial global model: pre-trained on `proxy`, pruned, fine-tuned, BN folded."""
    model = pretrained_model(cfg, proxy, progress=progress)
    return finished_master(model, cfg, proxy, cfg.finetune_epochs if cfg.prune is not None else 0.0,
                           progress=progress)


def pretrained_model(cfg: PrepareConfig, proxy: ArrayDataset, *, progress: bool = False) -> nn.Module:
    """The architecture, seeded, pre-trained on `proxy` (`pqsu bench paper` shares one between its rows)."""
    torch.manual_seed(cfg.seed)
    model = build_model(default_spec(cfg.arch, proxy.input_shape, proxy.num_classes))
    if cfg.pretrain_epochs > 0 and len(proxy):
        log.info("pre-training %s on %d proxy samples for %g epoch(s)", cfg.arch, len(proxy), cfg.pretrain_epochs)
        train(model, proxy.normalized(), proxy.y, TrainConfig(epochs=cfg.pretrain_epochs, batch_size=cfg.batch_size,
                                                              lr=cfg.lr, momentum=0.9, seed=cfg.seed),
              progress=progress, desc="pre-train")
    return model.eval()


def finished_master(model: nn.Module, cfg: PrepareConfig, proxy: ArrayDataset, finetune_epochs: float, *,
                    progress: bool = False) -> nn.Module:
    """`model` (changed in place) pruned by `cfg.prune` if set, fine-tuned `finetune_epochs` on `proxy`, BN folded."""
    if cfg.prune is not None:
        log.info("pruning %.0f%% of channels", 100 * cfg.prune)
        model = prune_model(model, cfg.prune, torch.zeros(1, *proxy.input_shape)).model
    if finetune_epochs > 0 and len(proxy):
        train(model, proxy.normalized(), proxy.y, TrainConfig(epochs=finetune_epochs, batch_size=cfg.batch_size,
                                                              lr=cfg.lr, momentum=0.9, seed=cfg.seed + 1),
              progress=progress, desc="fine-tune")
    return fold_batchnorm(model.eval())
