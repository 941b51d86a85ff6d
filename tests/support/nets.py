"""Helpers for tests that build, prune and export torch models (the fixtures are in tests/conftest.py)."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from pqsu.export.custom import spec_of
from pqsu.export.datasets import ArrayDataset
from pqsu.protocol.model_info import ModelInfo

FMNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
USER_ARCH = "user_models:residual_net"


@contextlib.contextmanager
def single_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def info_for(model: nn.Module, data: ArrayDataset) -> ModelInfo:
    """The metadata a caller hands to export_onnx (opset and id are filled in by the exporter)."""
    return ModelInfo(spec=spec_of(model).to_dict(), input_name="input", mean=tuple(data.mean), std=tuple(data.std),
                     classes=tuple(data.classes), precision="fp32", opset=0)


def set_bn_stats(model: nn.Module, in_shape: tuple[int, ...], seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running stats and affine parameters, then switch to eval."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))
        model.train()
        for _ in range(3):
            model(1.5 * torch.randn(8, *in_shape, generator=gen) + 0.3)
    return model.eval()
