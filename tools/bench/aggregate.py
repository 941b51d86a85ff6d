"""Coordinator memory against fleet size: real encoded top-k updates through FederatedServer.submit.

One round open for N devices; each device's update (top-2% entries of a random delta, int8,
as `ours` sends it) is encoded, then handed to `FederatedServer.submit` (header checks,
decode under the model's limits, streaming FedAvg) and dropped, as the MQTT coordinator does
with each message. Peak traced memory (tracemalloc) over the whole loop, above what the open
round already held, is reported for N = 100, 1,000 and 10,000 and as a ratio to the model's
fp32 size: FedAvg's accumulator is O(model); what grows with N is the round's per-device
bookkeeping (who sent what), reported as bytes per device.
"""
from __future__ import annotations

import time
import tracemalloc

import numpy as np
import torch

from pqsu.cloud.server import FederatedServer, ServerConfig
from pqsu.export.datasets import load_dataset
from pqsu.export.pipeline import model_info
from pqsu.export.pruning import fold_batchnorm, prune_model
from pqsu.export.zoo import build_model, default_spec
from pqsu.protocol.codec import TensorBlock, Update, encode

DENSITY = 0.02


def make_server(arch: str = "cnn", prune: float | None = None) -> FederatedServer:
    """A server for the (pruned) zoo model; its weights are irrelevant to memory and never trained."""
    data = load_dataset("fashion-mnist", "test").head(64)
    torch.manual_seed(0)
    model = build_model(default_spec(arch, data.input_shape, data.num_classes))
    if prune:
        model = prune_model(model, prune, torch.zeros(1, *data.input_shape)).model
    model = fold_batchnorm(model.eval())
    x = data.normalized()
    return FederatedServer(model, model_info(model, data), x[:16], x, data.y, ServerConfig())


def sparse_update(rng: np.random.Generator, shapes: dict[str, tuple[int, ...]], round_: int, device: str,
                  model_id: str) -> Update:
    blocks = []
    for name, shape in shapes.items():
        numel = int(np.prod(shape))
        # distinct sorted positions; drawing k of numel this way is O(k), not O(numel) as rng.choice is
        idx = np.unique(rng.integers(0, numel, max(1, int(numel * DENSITY))))
        blocks.append(TensorBlock.sparse(name, shape, idx, rng.normal(0, 1e-3, idx.size)))
    return Update(round_, device, model_id, int(rng.integers(50, 500)), 0.5, tuple(blocks))


def feed(server: FederatedServer, devices: int, round_: int, seed: int = 0) -> dict:
    """Open a round for `devices` devices and submit one update from each; memory and speed."""
    ids = [f"sim-{i:05d}" for i in range(devices)]
    server.model_message()  # the downlink file is exported once per model version, not per round
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    task = server.open_round(round_, ids)  # traced: the round's accumulator is part of what it holds
    rng = np.random.default_rng(seed)
    accepted, wire, submit_s = 0, 0, 0.0
    for d in ids:
        payload = encode(sparse_update(rng, server.shapes, round_, d, task.model_id))
        t0 = time.perf_counter()
        accepted += server.submit(payload, sender=d).accepted
        submit_s += time.perf_counter() - t0
        wire += len(payload)
        del payload
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    server.close_round()
    return {"devices": devices, "accepted": accepted, "update_bytes_mean": wire / devices, "peak_bytes": peak,
            "submits_per_s": devices / submit_s}


def run(quick: bool = False) -> dict:
    server = make_server("cnn", None)
    # From 100 up: below that the round's batch buffers are still filling (bounded, not per device)
    counts = (100, 1_000) if quick else (100, 1_000, 10_000)
    model_bytes = 4 * sum(int(np.prod(s)) for s in server.shapes.values())
    feed(server, 5, 1)  # warm-up: one-off lazy initialisations are not per-round memory
    points = [feed(server, n, i + 2) for i, n in enumerate(counts)]
    for p in points:
        p["peak_vs_model"] = p["peak_bytes"] / model_bytes
    first, last = points[0], points[-1]
    return {"model": "cnn (unpruned)", "params": model_bytes // 4, "model_fp32_bytes": model_bytes,
            "density": DENSITY, "points": points,
            "peak_growth": last["peak_bytes"] / first["peak_bytes"],
            "bytes_per_extra_device": (last["peak_bytes"] - first["peak_bytes"]) / (last["devices"] - first["devices"])}
