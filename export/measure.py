"""Size and speed figures for the export report: params, MACs, bytes, latency.

onnxruntime figures come from `pqsu.export.runtime.OrtModel`, the session a board serves with."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from pqsu.export.runtime import OrtModel
from pqsu.protocol.model_id import VerifiedModel


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, in_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one sample's forward pass."""
    macs, _ = tp.utils.count_ops_and_params(model.eval(), torch.zeros(1, *in_shape))
    return int(macs)


def median_ms(fn: Callable[[], object], *, repeats: int, warmup: int = 3, max_seconds: float = 20.0) -> float:
    """Median wall time of `fn` in milliseconds; stops early past `max_seconds`."""
    for _ in range(warmup):
        fn()
    times, start = [], time.perf_counter()
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
        if time.perf_counter() - start > max_seconds and len(times) >= 5:
            break
    return statistics.median(times)


def torch_latency_ms(model: nn.Module, x: np.ndarray, repeats: int = 50) -> float:
    model.eval()
    xt = torch.from_numpy(x)

    def run() -> None:
        with torch.no_grad():
            model(xt)
    return median_ms(run, repeats=repeats)


def ort_session(model: VerifiedModel | bytes, threads: int | None = None) -> OrtModel:
    """The session boards serve with (`pqsu.export.runtime`), so the report times what a board runs."""
    return OrtModel(model, threads=threads)


def ort_latency_ms(model: OrtModel, x: np.ndarray, repeats: int = 50) -> float:
    batch = model.prepare(x)
    return median_ms(lambda: model.run(batch), repeats=repeats)
