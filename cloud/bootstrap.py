"""The master model and server for a run: fresh from round 0, or resumed from a checkpoint."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pqsu.cloud import checkpoint
from pqsu.cloud.config import FederatedConfig
from pqsu.cloud.prepare import prepare_master
from pqsu.cloud.server import FederatedServer
from pqsu.export.bridge import load_weights
from pqsu.export.datasets import ArrayDataset, load_dataset
from pqsu.export.partition import federated_split
from pqsu.export.pipeline import model_info
from pqsu.export.zoo import ModelSpec, build_model
from pqsu.protocol.model_info import ModelInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CloudData:
    """What the cloud holds: the proxy split (pre-training, pruning), calibration samples for int8
    export, and the held-out test sample each round is evaluated on."""

    proxy: ArrayDataset
    calibration: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def cloud_data(cfg: FederatedConfig) -> CloudData:
    train = load_dataset(cfg.dataset, "train", cfg.data_root)
    test = load_dataset(cfg.dataset, "test", cfg.data_root)
    if cfg.eval_samples:
        test = test.sample(min(cfg.eval_samples, len(test)), seed=cfg.seed)
    proxy_idx, _ = federated_split(train.y, cfg.proxy_samples, cfg.clients, cfg.partition, cfg.seed)
    proxy = train.subset(proxy_idx)
    return CloudData(proxy, proxy.sample(min(256, len(proxy)), seed=cfg.seed + 1).normalized(), test.normalized(),
                     test.y)


def build_server(cfg: FederatedConfig, *, checkpoint_dir: str | Path | None = None,
                 keys: dict[str, bytes] | None = None) -> tuple[FederatedServer, dict]:
    """(server, meta). meta holds what a checkpoint must carry to rebuild the server."""
    data = cloud_data(cfg)
    proxy = data.proxy
    resumed = checkpoint.load_latest(checkpoint_dir) if checkpoint_dir else None
    if resumed is not None:
        info = ModelInfo.from_metadata(resumed.meta["model_info"])
        master = build_model(ModelSpec.from_dict(info.spec))
        load_weights(master, resumed.master)
        log.info("resuming after round %d from %s", resumed.round, checkpoint_dir)
    else:
        torch.manual_seed(cfg.seed)
        master = prepare_master(cfg.prepare_config(), proxy)
        info = model_info(master, proxy)
    server = FederatedServer(master, info, data.calibration, data.test_x, data.test_y, cfg.server_config(), keys=keys)
    meta = {"config": cfg.to_dict(), "model_info": info.to_metadata()}
    if resumed is not None:
        server.rounds_done = resumed.round
        server.optimizer.velocity = {k: np.asarray(v) for k, v in resumed.velocity.items()}
        meta["reports"] = resumed.meta.get("reports", [])
        meta["devices"] = resumed.meta.get("devices", {})
        if "initial_accuracy" in resumed.meta:
            meta["initial_accuracy"] = resumed.meta["initial_accuracy"]
    return server, meta
