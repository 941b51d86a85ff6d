"""The one round-0 pipeline and the one way a model becomes its file.

Round 0 (pre-train -> prune -> fine-tune -> fold BatchNorm) is the same for `pqsu export` and
for the coordinator, which calls it on its proxy split: `pretrain` then `finish` (or both at
once, `prepare`). Pre-training and fine-tuning are SGD with momentum 0.9; the initial weights
and the pre-training shuffle come from `seed`, the fine-tuning shuffle from `seed + 1`.

`export_model` turns the BN-folded model into the file devices get, in memory: ONNX proto
from the exporter, int8 through onnxruntime's quantizer (which alone needs a few temporary
files), fl-pqsu metadata added and the model id hashed and stamped once.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pqsu.export.custom import custom_model, is_custom, load_factory, load_state_dict_file, spec_of
from pqsu.export.datasets import ArrayDataset
from pqsu.export.onnx_export import stamp_with_info, to_onnx
from pqsu.export.pruning import fold_batchnorm, prune_model
from pqsu.export.quantize import ArrayCalibrationReader, quantize
from pqsu.export.training import TrainConfig, train
from pqsu.export.zoo import build_model, default_spec
from pqsu.protocol.atomic import atomic_write
from pqsu.protocol.model_id import VerifiedModel
from pqsu.protocol.model_info import ModelInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrepareConfig:
    arch: str = "cnn"               # zoo name, or package.module:factory for a user's own model
    prune: float | None = 0.5       # None: no pruning (the FedAvg baseline)
    pretrain_epochs: float = 1.0
    finetune_epochs: float = 0.5    # after pruning; `finish` can be told otherwise
    batch_size: int = 32
    lr: float = 0.01
    seed: int = 0
    momentum: float = 0.9
    round_to: int | None = None     # keep pruned widths multiples of this
    weights: str | None = None      # a trained state_dict to start from


def check_arch(arch: str) -> None:
    """A PqsuError for an unknown zoo name or an unloadable factory, before any data is read."""
    if is_custom(arch):
        load_factory(arch)
    else:
        default_spec(arch)


def initial_model(cfg: PrepareConfig, data: ArrayDataset) -> nn.Module:
    """The architecture for `data`'s shape and classes, its initial weights seeded (or `cfg.weights`)."""
    torch.manual_seed(cfg.seed)
    if is_custom(cfg.arch):
        model = custom_model(cfg.arch, data.input_shape, data.num_classes)
    else:
        model = build_model(default_spec(cfg.arch, data.input_shape, data.num_classes))
    if cfg.weights:
        load_state_dict_file(model, cfg.weights)
    return model.eval()


def pretrain(cfg: PrepareConfig, data: ArrayDataset, *, progress: bool = False) -> nn.Module:
    """The initial model pre-trained `cfg.pretrain_epochs` on `data` (`pqsu bench paper` shares one between rows)."""
    model = initial_model(cfg, data)
    if cfg.pretrain_epochs > 0 and len(data):
        log.debug("pre-training %s on %d samples for %g epoch(s)", cfg.arch, len(data), cfg.pretrain_epochs)
        train(model, data.normalized(), data.y, _train_config(cfg, cfg.pretrain_epochs, cfg.seed),
              progress=progress, desc="pre-train")
    return model.eval()


def finish(model: nn.Module, cfg: PrepareConfig, data: ArrayDataset, finetune_epochs: float | None = None, *,
           progress: bool = False) -> nn.Module:
    """`model` pruned by `cfg.prune` if set, fine-tuned on `data`, BN folded (changed in place, and returned).

    `finetune_epochs` defaults to `cfg.finetune_epochs` when pruning and to none otherwise."""
    if finetune_epochs is None:
        finetune_epochs = cfg.finetune_epochs if cfg.prune is not None else 0.0
    if cfg.prune is not None:
        log.debug("pruning %.0f%% of channels (L1 group importance)", 100 * cfg.prune)
        model = prune_model(model, cfg.prune, torch.zeros(1, *data.input_shape), round_to=cfg.round_to).model
    if finetune_epochs > 0 and len(data):
        train(model, data.normalized(), data.y, _train_config(cfg, finetune_epochs, cfg.seed + 1),
              progress=progress, desc="fine-tune")
    return fold_batchnorm(model.eval())


def prepare(cfg: PrepareConfig, data: ArrayDataset, *, progress: bool = False) -> nn.Module:
    """Round 0 whole: the BN-folded (pruned) model that is exported, or the cloud's fp32 master."""
    return finish(pretrain(cfg, data, progress=progress), cfg, data, progress=progress)


def _train_config(cfg: PrepareConfig, epochs: float, seed: int) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum, seed=seed)


# -- the file ------------------------------------------------------------------------------------
def model_info(model: nn.Module, data: ArrayDataset, precision: str = "fp32") -> ModelInfo:
    """The metadata a board needs, for a (pruned, folded) model trained on `data`.

    A model of float readings (sensor windows) says so in `extra["input"]`: its raw inputs are
    normalized by (x - mean) / std, not (x/255 - mean) / std, and a float input alone cannot tell."""
    return ModelInfo(spec=spec_of(model).to_dict(), input_name="input", mean=tuple(data.mean),
                     std=tuple(data.std), classes=tuple(data.classes), precision=precision, opset=0,
                     extra={} if data.pixels else {"input": "readings"})


@dataclass(frozen=True)
class Exported:
    """A model file made in memory: its bytes (id stamped, so verified by construction) and metadata."""

    file: VerifiedModel
    info: ModelInfo

    @property
    def data(self) -> bytes:
        return self.file.data


def export_model(model: nn.Module, info: ModelInfo, calibration: np.ndarray | None = None, *,
                 method: str = "minmax") -> Exported:
    """A BN-folded model as the file devices get: int8 calibrated on `calibration`, or fp32 without it."""
    proto, info = to_onnx(model, info)
    if calibration is None:
        return Exported(*stamp_with_info(proto, info))
    reader = ArrayCalibrationReader(calibration)
    return Exported(*stamp_with_info(*quantize(proto.SerializeToString(), info, reader, method=method)))


def export_pair(model: nn.Module, info: ModelInfo, calibration: np.ndarray, *,
                method: str = "minmax") -> tuple[Exported, Exported]:
    """(fp32, int8) files of one BN-folded model, from one export: the int8 file is quantized from the fp32 one."""
    proto, info = to_onnx(model, info)
    fp32 = Exported(*stamp_with_info(proto, info))
    reader = ArrayCalibrationReader(calibration)
    return fp32, Exported(*stamp_with_info(*quantize(fp32.data, fp32.info, reader, method=method)))


def export_int8(model: nn.Module, info: ModelInfo, calibration: np.ndarray, path: str | Path, *,
                fp32_path: str | Path | None = None, method: str = "minmax") -> ModelInfo:
    """Export a BN-folded model to an int8 ONNX file at `path` (and fp32 at `fp32_path` if given)."""
    if fp32_path is None:
        int8 = export_model(model, info, calibration, method=method)
    else:
        fp32, int8 = export_pair(model, info, calibration, method=method)
        atomic_write(Path(fp32_path), fp32.data)
    atomic_write(Path(path), int8.data)
    return int8.info
