"""The data of a federated run, loaded and split in one place for every driver.

The training split is cut once (`federated_split`: the cloud's proxy part first, then one
shard per device) and the test split sampled once, so `pqsu simulate`, `pqsu cloud` and the
shards `pqsu run` writes for its agents all see the same samples for the same config.
numpy only: no torch is imported here.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pqsu.export.datasets import ArrayDataset, load_dataset
from pqsu.export.partition import federated_split

CALIBRATION_SAMPLES = 256  # int8 export's calibration set, drawn from the proxy split


@dataclass(frozen=True)
class CloudData:
    """What the cloud holds: the proxy split (pre-training, pruning), calibration samples for int8
    export, and the held-out test sample each round is evaluated on."""

    proxy: ArrayDataset
    calibration: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


@dataclass(frozen=True)
class Shard:
    """One device's local data: raw samples (uint8 images (N, C, H, W), float windows (N, C, L)...) and labels."""

    x: np.ndarray
    y: np.ndarray


@dataclass(frozen=True)
class FederatedData:
    cloud: CloudData | None            # None when only the shards were asked for
    shards: dict[str, Shard]           # by device id, in device order (empty when not asked for)


def device_ids(n: int) -> list[str]:
    """The ids of a local fleet's devices, as every driver names them."""
    return [f"dev-{i:03d}" for i in range(n)]


def federated_data(cfg, *, cloud: bool = True, shards: bool = True) -> FederatedData:
    """The cloud's data and/or the devices' shards for a `FederatedConfig`, the training split loaded once."""
    train = load_dataset(cfg.dataset, "train", cfg.data_root)
    proxy_idx, parts = federated_split(train.y, cfg.proxy_samples, cfg.clients, cfg.partition, cfg.seed,
                                       cfg.samples_per_client)
    held = None
    if cloud:
        test = load_dataset(cfg.dataset, "test", cfg.data_root)
        if cfg.eval_samples:
            test = test.sample(min(cfg.eval_samples, len(test)), seed=cfg.seed)
        proxy = train.subset(proxy_idx)
        calibration = proxy.sample(min(CALIBRATION_SAMPLES, len(proxy)), seed=cfg.seed + 1).normalized()
        held = CloudData(proxy, calibration, test.normalized(), test.y)
    local = {d: Shard(train.x[p], train.y[p]) for d, p in zip(device_ids(cfg.clients), parts)} if shards else {}
    return FederatedData(held, local)


def cloud_data(cfg) -> CloudData:
    return federated_data(cfg, shards=False).cloud


def device_shards(cfg) -> dict[str, Shard]:
    return federated_data(cfg, cloud=False).shards
