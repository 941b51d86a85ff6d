"""Size and speed figures for the export report: params, MACs, bytes, latency."""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort
import torch
import torch_pruning as tp
from torch import nn


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


def ort_session(path: str | Path | bytes, threads: int | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    source = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def ort_latency_ms(session: ort.InferenceSession, x: np.ndarray, repeats: int = 50) -> float:
    name = session.get_inputs()[0].name
    return median_ms(lambda: session.run(None, {name: x}), repeats=repeats)


def ort_logits(session: ort.InferenceSession, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + batch_size]})[0] for i in range(0, len(x), batch_size)])
