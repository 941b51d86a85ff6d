"""The export pipeline: model -> pruned -> BN-folded -> ONNX fp32 -> ONNX int8, measured.

`export_int8` is the one step the cloud repeats every round; `run_export` is the whole
measured pipeline behind `pqsu export`.
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pqsu.export import measure
from pqsu.export.bridge import read_int8_weights, worst_error_in_steps
from pqsu.export.custom import custom_model, is_custom, load_factory, load_state_dict_file, spec_of
from pqsu.export.datasets import ArrayDataset, load_dataset
from pqsu.export.onnx_export import export_onnx
from pqsu.export.pruning import fold_batchnorm, prune_model
from pqsu.export.quantize import ArrayCalibrationReader, quantize_int8
from pqsu.export.training import TrainConfig, evaluate, evaluate_logits, train
from pqsu.export.zoo import build_model, default_spec
from pqsu.protocol.model_info import ModelInfo

log = logging.getLogger(__name__)


def model_info(model: nn.Module, data: ArrayDataset, precision: str = "fp32") -> ModelInfo:
    """The metadata a board needs, for a (pruned, folded) model trained on `data`."""
    return ModelInfo(spec=spec_of(model).to_dict(), input_name="input", mean=tuple(data.mean),
                     std=tuple(data.std), classes=tuple(data.classes), precision=precision, opset=0)


def export_int8(model: nn.Module, info: ModelInfo, calibration: np.ndarray, path: str | Path, *,
                fp32_path: str | Path | None = None, method: str = "minmax") -> ModelInfo:
    """Export a BN-folded model to an int8 ONNX file at `path` (and fp32 at `fp32_path` if given)."""
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(fp32_path) if fp32_path else Path(tmp) / "model.fp32.onnx"
        export_onnx(model, fp32, info)
        return quantize_int8(fp32, path, ArrayCalibrationReader(calibration), method=method)


@dataclass
class ExportConfig:
    model: str = "cnn"
    weights: str | None = None
    dataset: str = "fashion-mnist"
    data_root: str | None = None
    prune: float | None = 0.5          # None: export without pruning
    round_to: int | None = None
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
    out: str = "model.int8.onnx"
    fp32_out: str | None = None
    progress: bool = True


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
    bridge_worst_error_steps: float
    eval_samples: int
    latency_ms: dict = field(default_factory=dict)
    ratios: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def run_export(cfg: ExportConfig) -> ExportReport:
    torch.manual_seed(cfg.seed)
    if is_custom(cfg.model):  # fail on a wrong model name before loading any data
        load_factory(cfg.model)
    else:
        default_spec(cfg.model)
    log.info("[1/6] loading %s", cfg.dataset)
    train_data = load_dataset(cfg.dataset, "train", cfg.data_root)
    test_data = load_dataset(cfg.dataset, "test", cfg.data_root)
    if cfg.train_samples:
        train_data = train_data.sample(min(cfg.train_samples, len(train_data)), seed=cfg.seed)
    if cfg.eval_samples:
        test_data = test_data.sample(min(cfg.eval_samples, len(test_data)), seed=cfg.seed)
    x_train, x_test = train_data.normalized(), test_data.normalized()
    calib = train_data.sample(min(cfg.calib_samples, len(train_data)), seed=cfg.seed + 1).normalized()

    model = _initial_model(cfg, train_data)
    pretrain = cfg.pretrain_epochs if cfg.pretrain_epochs is not None else (0.0 if cfg.weights else 1.0)
    tcfg = TrainConfig(epochs=pretrain, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed)
    if pretrain > 0:
        log.info("[2/6] pre-training %s for %g epoch(s) on %d samples", cfg.model, pretrain, len(x_train))
        train(model, x_train, train_data.y, tcfg, progress=cfg.progress, desc="pre-train")
    in_shape = tuple(train_data.input_shape)
    xs1, xs64 = x_test[:1].copy(), _batch(x_test, 64)
    acc_unpruned = evaluate(model, x_test, test_data.y).accuracy
    lat = {"torch_fp32_unpruned_b1": measure.torch_latency_ms(model, xs1, cfg.latency_repeats),
           "torch_fp32_unpruned_b64": measure.torch_latency_ms(model, xs64, max(3, cfg.latency_repeats // 5))}
    params_fp32, macs_fp32, widths_fp32 = measure.count_params(model), measure.count_macs(model, in_shape), spec_of(model).widths

    with tempfile.TemporaryDirectory() as tmp:
        unpruned = Path(tmp) / "unpruned.fp32.onnx"
        export_onnx(model, unpruned, model_info(model, train_data))
        bytes_fp32 = unpruned.stat().st_size

        if cfg.prune is not None:
            log.info("[3/6] pruning %.0f%% of channels (L1 group importance)", cfg.prune * 100)
            model = prune_model(model, cfg.prune, torch.zeros(1, *in_shape), round_to=cfg.round_to).model
            if cfg.finetune_epochs > 0:
                ft = TrainConfig(epochs=cfg.finetune_epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed + 2)
                train(model, x_train, train_data.y, ft, progress=cfg.progress, desc="fine-tune")
        fold_batchnorm(model.eval())

        log.info("[4/6] exporting ONNX and quantizing to int8 (%d calibration samples)", len(calib))
        fp32_path = Path(cfg.fp32_out) if cfg.fp32_out else Path(tmp) / "pruned.fp32.onnx"
        info = export_int8(model, model_info(model, train_data), calib, cfg.out, fp32_path=fp32_path,
                           method=cfg.calib_method)

        log.info("[5/6] evaluating fp32 and int8 in onnxruntime on %d samples", len(x_test))
        s_fp32, s_int8 = measure.ort_session(fp32_path), measure.ort_session(cfg.out)
        logits_fp32, logits_int8 = measure.ort_logits(s_fp32, x_test), measure.ort_logits(s_int8, x_test)
        reference = {k: v.detach().numpy() for k, v in model.state_dict().items()}
        worst = worst_error_in_steps(reference, read_int8_weights(cfg.out))

        log.info("[6/6] measuring latency")
        lat.update({"ort_fp32_pruned_b1": measure.ort_latency_ms(s_fp32, xs1, cfg.latency_repeats),
                    "ort_fp32_pruned_b64": measure.ort_latency_ms(s_fp32, xs64, cfg.latency_repeats),
                    "ort_int8_pruned_b1": measure.ort_latency_ms(s_int8, xs1, cfg.latency_repeats),
                    "ort_int8_pruned_b64": measure.ort_latency_ms(s_int8, xs64, cfg.latency_repeats)})
        bytes_pruned_fp32 = fp32_path.stat().st_size

    bytes_int8 = Path(cfg.out).stat().st_size
    return ExportReport(
        model=cfg.model, dataset=cfg.dataset, prune_ratio=cfg.prune or 0.0, model_id=info.model_id,
        widths_fp32=list(widths_fp32), widths_pruned=list(spec_of(model).widths),
        params_fp32=params_fp32, params_pruned=measure.count_params(model),
        macs_fp32=macs_fp32, macs_pruned=measure.count_macs(model, in_shape),
        bytes_fp32_onnx=bytes_fp32, bytes_pruned_fp32_onnx=bytes_pruned_fp32, bytes_int8_onnx=bytes_int8,
        acc_unpruned_fp32=acc_unpruned, acc_fp32=evaluate_logits(logits_fp32, test_data.y).accuracy,
        acc_int8=evaluate_logits(logits_int8, test_data.y).accuracy,
        argmax_agreement=float((logits_fp32.argmax(1) == logits_int8.argmax(1)).mean()),
        bridge_worst_error_steps=worst, eval_samples=len(x_test), latency_ms=lat,
        ratios={"size_fp32_over_int8": bytes_fp32 / bytes_int8,
                "macs_fp32_over_pruned": macs_fp32 / max(1, measure.count_macs(model, in_shape)),
                "speedup_b1_int8_ort_vs_torch_fp32": lat["torch_fp32_unpruned_b1"] / lat["ort_int8_pruned_b1"],
                "speedup_b64_int8_ort_vs_torch_fp32": lat["torch_fp32_unpruned_b64"] / lat["ort_int8_pruned_b64"]},
    )


def _initial_model(cfg: ExportConfig, data: ArrayDataset) -> nn.Module:
    if is_custom(cfg.model):
        model = custom_model(cfg.model, data.input_shape, data.num_classes)
    else:
        model = build_model(default_spec(cfg.model, data.input_shape, data.num_classes))
    if cfg.weights:
        load_state_dict_file(model, cfg.weights)
    return model.eval()


def _batch(x: np.ndarray, n: int) -> np.ndarray:
    reps = -(-n // len(x))
    return np.ascontiguousarray(np.concatenate([x] * reps)[:n]) if reps > 1 else np.ascontiguousarray(x[:n])
