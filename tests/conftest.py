"""Shared fixtures for the export tests: real Fashion-MNIST and one briefly trained cnn, exported once.

Torch runs on one thread inside these fixtures and the modules that use `one_torch_thread`:
on a busy 2-core machine, two OpenMP threads competing with other processes make training
up to 10x slower, and the results do not depend on the thread count.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pqsu.export.datasets import ArrayDataset, load_dataset
from pqsu.export.onnx_export import export_onnx
from pqsu.export.pruning import fold_batchnorm, prune_model
from pqsu.export.quantize import ArrayCalibrationReader, quantize_int8
from pqsu.export.training import TrainConfig, train
from pqsu.export.zoo import build_model, default_spec
from pqsu.protocol.model_info import ModelInfo

from tests.support.nets import FIXTURES, FMNIST_ROOT, USER_ARCH, info_for, single_torch_thread  # noqa: F401


@pytest.fixture(scope="module")
def one_torch_thread():
    with single_torch_thread():
        yield


@pytest.fixture
def user_models(monkeypatch):
    """tests/fixtures on sys.path, so `user_models:residual_net` imports as a user's package would."""
    monkeypatch.syspath_prepend(str(FIXTURES))
    return importlib.import_module("user_models")


@pytest.fixture(scope="session")
def fmnist() -> tuple[ArrayDataset, ArrayDataset]:
    if not FMNIST_ROOT.is_dir():
        pytest.skip(f"{FMNIST_ROOT} missing (install the Debian package dataset-fashion-mnist)")
    return load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")


@dataclass
class TrainedCnn:
    model: nn.Module          # pruned 50%, trained, BN-folded (cnn has no BN): what gets exported
    train_set: ArrayDataset
    x_test: np.ndarray        # 1000 normalized test samples
    y_test: np.ndarray
    folder: Path
    fp32_path: Path
    int8_path: Path
    info_in: ModelInfo        # what was handed to export_onnx
    fp32_info: ModelInfo      # what export_onnx returned
    int8_info: ModelInfo      # what quantize_int8 returned


@pytest.fixture(scope="session")
def trained_cnn(fmnist, tmp_path_factory) -> TrainedCnn:
    """A cnn pruned by half, trained 1 epoch on 5000 real samples, exported to fp32 and int8 ONNX."""
    train_set, test_set = fmnist
    with single_torch_thread():
        torch.manual_seed(0)
        model = prune_model(build_model(default_spec("cnn")), 0.5, torch.zeros(1, 1, 28, 28)).model
        sub = train_set.sample(5000, seed=0)
        train(model, sub.normalized(), sub.y, TrainConfig(epochs=1, batch_size=64, lr=0.05, seed=0))
        fold_batchnorm(model.eval())
        folder = tmp_path_factory.mktemp("cnn_onnx")
        fp32_path, int8_path = folder / "cnn.fp32.onnx", folder / "cnn.int8.onnx"
        info_in = info_for(model, train_set)
        fp32_info = export_onnx(model, fp32_path, info_in)
        calib = train_set.sample(128, seed=1).normalized()
        int8_info = quantize_int8(fp32_path, int8_path, ArrayCalibrationReader(calib))
    test = test_set.sample(1000, seed=0)
    return TrainedCnn(model, train_set, test.normalized(), test.y, folder, fp32_path, int8_path,
                      info_in, fp32_info, int8_info)
