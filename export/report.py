"""`pqsu export`: the round-0 pipeline (`pqsu.export.pipeline`) on a data set, measured.

The report sets the model before and after pruning and int8 side by side: params, MACs,
ONNX bytes, accuracy (fp32 and int8 through the session boards serve with) and latency.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from pqsu.export import measure
from pqsu.export.bridge import check_bridge
from pqsu.export.custom import is_custom, spec_of
from pqsu.export.datasets import ArrayDataset, load_dataset
from pqsu.export.folding import fold_batchnorm
from pqsu.export.labelled import LabelledDataError, checked_samples, is_labelled_file, read_labelled, read_npz
from pqsu.export.model_check import check_model
from pqsu.export.pipeline import (PrepareConfig, check_arch, export_model, export_pair, finish, finish_with_report,
                                  initial_model, model_info, pretrain)
from pqsu.export.runtime import OrtModel
from pqsu.export.training import evaluate, evaluate_logits
from pqsu.protocol.atomic import atomic_write

log = logging.getLogger(__name__)


@dataclass
class ExportConfig:
    model: str = "cnn"
    weights: str | None = None
    dataset: str = "fashion-mnist"     # a built-in name or a labelled-array .npz file
    data_root: str | None = None
    eval_data: str | None = None       # labelled-array .npz evaluated on instead of the test split
    calib_data: str | None = None      # .npz with x: the int8 calibration samples
    prune: float | str | None = 0.5    # a ratio, "auto:PT", or None: export without pruning
    round_to: int | None = None
    importance: str = "l1"
    ranking: str = "uniform"
    distill: float = 0.0
    prune_steps: int = 1
    pretrain_epochs: float | None = None  # None: 1 epoch when no weights are given, else 0
    finetune_epochs: float = 0.5
    train_samples: int | None = None
    batch_size: int = 64
    lr: float = 0.01
    calib_samples: int = 256
    calib_method: str = "minmax"
    eval_samples: int | None = None
    latency_repeats: int = 30
    seed: int = 0
    same_budget: bool = False          # also fine-tune a copy of the unpruned model as long, for a fair reference
    out: str = "model.int8.onnx"
    fp32_out: str | None = None
    progress: bool = True

    def prepare_config(self) -> PrepareConfig:
        """Round 0 as the coordinator runs it, with this command's settings (1 epoch of pre-training
        when no weights are given, none when they are, unless told otherwise)."""
        pretrain = self.pretrain_epochs if self.pretrain_epochs is not None else (0.0 if self.weights else 1.0)
        return PrepareConfig(arch=self.model, prune=self.prune, pretrain_epochs=pretrain,
                             finetune_epochs=self.finetune_epochs, batch_size=self.batch_size, lr=self.lr,
                             seed=self.seed, round_to=self.round_to, weights=self.weights,
                             importance=self.importance, ranking=self.ranking, distill=self.distill,
                             prune_steps=self.prune_steps)


@dataclass
class ExportReport:
    model: str
    dataset: str
    prune_ratio: float
    model_id: str
    widths_fp32: list[int]
    widths_pruned: list[int]
    params_fp32: int
    params_pruned: int
    macs_fp32: int
    macs_pruned: int
    bytes_fp32_onnx: int
    bytes_pruned_fp32_onnx: int
    bytes_int8_onnx: int
    acc_unpruned_fp32: float
    acc_fp32: float   # the pruned model in fp32 (onnxruntime): isolates what int8 costs
    acc_int8: float
    argmax_agreement: float
    bridge_worst_error_steps: float   # every parameter rebuilt from the int8 file, as a board does
    bridge_parameters: int            # tensors the rebuilt model loaded, every one of the exported model's
    bridge_constants: list[str]       # initializers that are no parameter: the graph's own constants
    eval_samples: int
    latency_ms: dict = field(default_factory=dict)
    ratios: dict = field(default_factory=dict)
    round0: dict = field(default_factory=dict)   # the pruning levers used; for auto:PT the ratio chosen and probes
    # the unpruned model trained as many epochs as the pruned one (pre-train + fine-tune), with --same-budget
    acc_unpruned_same_budget: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def load_export_data(cfg: ExportConfig) -> tuple[ArrayDataset, ArrayDataset, np.ndarray]:
    """(training data, evaluation data, normalized calibration samples), every file checked against the
    training data's input shape and kind before any work; evaluation and calibration samples are
    normalized as the model's training data is."""
    for flag, path in (("--eval-data", cfg.eval_data), ("--calib-data", cfg.calib_data)):
        if path is not None and not is_labelled_file(path):
            raise LabelledDataError(f"{flag} {path}: give an .npz file (arrays x and y, or x alone for calibration)")
    train_data = load_dataset(cfg.dataset, "train", cfg.data_root)
    if len(train_data) == 0:
        raise LabelledDataError(f"{cfg.dataset}: no training samples")
    if cfg.eval_data:
        test_data = _like(train_data, read_labelled(cfg.eval_data, "all"), cfg.eval_data)
    else:
        test_data = load_dataset(cfg.dataset, "test", cfg.data_root)
    if len(test_data) == 0:
        raise LabelledDataError(f"{cfg.dataset}: no evaluation samples (give --eval-data FILE.npz)")
    if cfg.calib_data:
        x = checked_samples(read_npz(cfg.calib_data, required=("x",))["x"], cfg.calib_data)
        channels = x.shape[1]  # the shape is checked by `_like`, after the per-channel statistics are made
        unlabelled = ArrayDataset(x, np.zeros(len(x), np.int64), "calibration", list(train_data.classes),
                                  (0.0,) * channels, (1.0,) * channels)
        calib_set = _like(train_data, unlabelled, cfg.calib_data)
    else:
        calib_set = train_data
    if cfg.train_samples:
        train_data = train_data.sample(min(cfg.train_samples, len(train_data)), seed=cfg.seed)
    if cfg.eval_samples:
        test_data = test_data.sample(min(cfg.eval_samples, len(test_data)), seed=cfg.seed)
    calib = calib_set.sample(min(cfg.calib_samples, len(calib_set)), seed=cfg.seed + 1).normalized()
    return train_data, test_data, calib


def _like(train: ArrayDataset, other: ArrayDataset, path: str) -> ArrayDataset:
    """`other`'s samples as the model sees them (the training data's classes and normalization), or an error."""
    if other.input_shape != train.input_shape or other.x.dtype != train.x.dtype:
        raise LabelledDataError(f"{path}: samples are {other.x.dtype} {other.input_shape}, the training data's "
                                f"{train.x.dtype} {train.input_shape}")
    if len(other) and other.y.max() >= train.num_classes:
        raise LabelledDataError(f"{path}: label {other.y.max()} is out of range for {train.num_classes} classes")
    return ArrayDataset(other.x, other.y, other.name, list(train.classes), train.mean, train.std)


def run_export(cfg: ExportConfig) -> ExportReport:
    check_arch(cfg.model)  # fail on a wrong model name before loading any data
    log.info("[1/6] loading %s", cfg.dataset)
    train_data, test_data, calib = load_export_data(cfg)
    x_test = test_data.normalized()

    prep = cfg.prepare_config()
    if is_custom(cfg.model):  # it builds for this data and trains, or one line names what it does instead
        check_model(cfg.model, train_data.input_shape, train_data.num_classes, cfg.dataset)
    initial_model(prep, train_data)  # the model is built for this data (input shape, classes, BN) before any training
    if prep.pretrain_epochs > 0:
        log.info("[2/6] pre-training %s for %g epoch(s) on %d samples", cfg.model, prep.pretrain_epochs, len(train_data))
    model = pretrain(prep, train_data, progress=cfg.progress)
    in_shape = tuple(train_data.input_shape)
    xs1, xs64 = x_test[:1].copy(), _batch(x_test, 64)
    acc_unpruned = evaluate(model, x_test, test_data.y).accuracy
    lat = {"torch_fp32_unpruned_b1": measure.torch_latency_ms(model, xs1, cfg.latency_repeats),
           "torch_fp32_unpruned_b64": measure.torch_latency_ms(model, xs64, max(3, cfg.latency_repeats // 5))}
    params_fp32, macs_fp32, widths_fp32 = measure.count_params(model), measure.count_macs(model, in_shape), spec_of(model).widths
    # the exporter folds BatchNorm as the pipeline does; folding a copy first keeps every parameter named.
    # Unpruned, the exported fp32 file below is this very model: no second export for its size.
    bytes_fp32 = None if cfg.prune is None else \
        len(export_model(fold_batchnorm(copy.deepcopy(model)), model_info(model, train_data)).data)

    same_budget = None
    if cfg.same_budget and cfg.prune is not None:
        # Pruning's cost is only what the pruned model lacks against the unpruned one trained as long.
        log.info("[3/6] fine-tuning the unpruned model %g epoch(s) too, for the same-budget reference",
                 prep.finetune_epochs)
        reference = finish(copy.deepcopy(model), replace(prep, prune=None), train_data, prep.finetune_epochs)
        same_budget = evaluate(reference, x_test, test_data.y).accuracy
    if cfg.prune is not None:
        log.info("[3/6] pruning %s of channels (%s importance, %s ranking)", cfg.prune, cfg.importance, cfg.ranking)
    model, round0 = finish_with_report(model, prep, train_data, progress=cfg.progress)

    log.info("[4/6] exporting ONNX and quantizing to int8 (%d calibration samples)", len(calib))
    fp32, int8 = export_pair(model, model_info(model, train_data), calib, method=cfg.calib_method)
    atomic_write(Path(cfg.out), int8.data)
    if cfg.fp32_out:
        atomic_write(Path(cfg.fp32_out), fp32.data)

    log.info("[5/6] evaluating fp32 and int8 in onnxruntime on %d samples", len(x_test))
    s_fp32, s_int8 = OrtModel(fp32.file), OrtModel(int8.file)
    logits_fp32, logits_int8 = s_fp32.logits(x_test), s_int8.logits(x_test)
    reference = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    bridge = check_bridge(reference, int8.file)  # fails the export rather than report a file boards cannot load

    log.info("[6/6] measuring latency")
    lat.update({"ort_fp32_pruned_b1": measure.ort_latency_ms(s_fp32, xs1, cfg.latency_repeats),
                "ort_fp32_pruned_b64": measure.ort_latency_ms(s_fp32, xs64, cfg.latency_repeats),
                "ort_int8_pruned_b1": measure.ort_latency_ms(s_int8, xs1, cfg.latency_repeats),
                "ort_int8_pruned_b64": measure.ort_latency_ms(s_int8, xs64, cfg.latency_repeats)})

    bytes_int8, macs_pruned = len(int8.data), measure.count_macs(model, in_shape)
    bytes_fp32 = len(fp32.data) if bytes_fp32 is None else bytes_fp32
    return ExportReport(
        model=cfg.model, dataset=train_data.name, prune_ratio=round0.ratio or 0.0, model_id=int8.info.model_id,
        widths_fp32=list(widths_fp32), widths_pruned=list(spec_of(model).widths),
        params_fp32=params_fp32, params_pruned=measure.count_params(model),
        macs_fp32=macs_fp32, macs_pruned=macs_pruned,
        bytes_fp32_onnx=bytes_fp32, bytes_pruned_fp32_onnx=len(fp32.data), bytes_int8_onnx=bytes_int8,
        acc_unpruned_fp32=acc_unpruned, acc_fp32=evaluate_logits(logits_fp32, test_data.y).accuracy,
        acc_int8=evaluate_logits(logits_int8, test_data.y).accuracy,
        argmax_agreement=float((logits_fp32.argmax(1) == logits_int8.argmax(1)).mean()),
        bridge_worst_error_steps=bridge.worst_steps, bridge_parameters=bridge.parameters,
        bridge_constants=list(bridge.constants), eval_samples=len(x_test), latency_ms=lat,
        ratios={"size_fp32_over_int8": bytes_fp32 / bytes_int8,
                "macs_fp32_over_pruned": macs_fp32 / max(1, macs_pruned),
                "speedup_b1_int8_ort_vs_torch_fp32": lat["torch_fp32_unpruned_b1"] / lat["ort_int8_pruned_b1"],
                "speedup_b64_int8_ort_vs_torch_fp32": lat["torch_fp32_unpruned_b64"] / lat["ort_int8_pruned_b64"]},
        round0=round0.to_dict(), acc_unpruned_same_budget=same_budget,
    )


def _batch(x: np.ndarray, n: int) -> np.ndarray:
    reps = -(-n // len(x))
    return np.ascontiguousarray(np.concatenate([x] * reps)[:n]) if reps > 1 else np.ascontiguousarray(x[:n])
