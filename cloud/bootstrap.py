"""The master model and server for a run: fresh from round 0, or resumed from a checkpoint."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from pqsu.cloud import checkpoint
from pqsu.cloud.config import FederatedConfig
from pqsu.cloud.data import CloudData, cloud_data  # noqa: F401  (CloudData re-exported for callers)
from pqsu.cloud.prepare import prepare_master_with_report
from pqsu.cloud.server import FederatedServer
from pqsu.export.bridge import BridgeError, check_bridge, load_weights
from pqsu.export.pipeline import model_info
from pqsu.export.custom import build_any
from pqsu.export.zoo import ModelSpec
from pqsu.protocol.errors import PqsuError
from pqsu.protocol.model_info import ModelInfo

log = logging.getLogger(__name__)


def build_server(cfg: FederatedConfig, *, checkpoint_dir: str | Path | None = None,
                 keys: dict[str, bytes] | None = None, data: CloudData | None = None) -> tuple[FederatedServer, dict]:
    """(server, meta). meta holds what a checkpoint must carry to rebuild the server. `data`, if
    given, is `cloud_data(cfg)` already loaded (the simulator loads it with the shards)."""
    data = data or cloud_data(cfg)
    proxy = data.proxy
    resumed = checkpoint.load_latest(checkpoint_dir) if checkpoint_dir else None
    if resumed is not None:
        info = ModelInfo.from_metadata(resumed.meta["model_info"])
        # The checkpoint's architecture is this coordinator's own configured model: a custom one is trusted.
        master = build_any(ModelSpec.from_dict(info.spec), allow_custom=True)
        load_weights(master, resumed.master)
        log.info("resuming after round %d from %s", resumed.round, checkpoint_dir)
    else:
        torch.manual_seed(cfg.seed)
        master, round0 = prepare_master_with_report(cfg.prepare_config(), proxy)
        info = model_info(master, proxy)
    server = FederatedServer(master, info, data.calibration, data.test_x, data.test_y, cfg.server_config(), keys=keys)
    if resumed is None:
        check_devices_can_train(server, proxy.head(FINE_TUNE_CHECK_SAMPLES))
    meta = {"config": cfg.to_dict(), "model_info": info.to_metadata()}
    if resumed is None:
        # What round 0 pruned: for prune = auto:PT the ratio it chose, in the run's config.json and checkpoints.
        meta["config"]["prune_chosen"] = round0.ratio
        meta["round0"] = round0.to_dict()
    else:
        meta["config"] = {**resumed.meta.get("config", {}), **meta["config"]}
        meta["round0"] = resumed.meta.get("round0")
        server.rounds_done = resumed.round
        server.optimizer.velocity = {k: np.asarray(v) for k, v in resumed.velocity.items()}
        server.downlink.resume(resumed.files, resumed.meta.get("downlink") or {})
        meta["reports"] = resumed.meta.get("reports", [])
        meta["devices"] = resumed.meta.get("devices", {})
        if "initial_accuracy" in resumed.meta:
            meta["initial_accuracy"] = resumed.meta["initial_accuracy"]
    return server, meta


FINE_TUNE_CHECK_SAMPLES = 8


class Round0Error(PqsuError):
    """Round 0's model is one the devices could not rebuild or fine-tune."""


def check_devices_can_train(server: FederatedServer, samples) -> None:
    """Round 0's int8 file rebuilt as a device rebuilds it, checked against the master and stepped once on
    `samples` (an ArrayDataset of the proxy's), before any device is asked to train on it: a model the
    devices cannot train fails the run here, in one line, not every round on every device."""
    if server.cfg.precision != "int8":
        return  # the FedAvg baseline's fp32 file: no quantizer between the master and the devices' tensors
    exported = server.downlink.model()  # the first version devices get (made now, not at the first round)
    try:
        check_bridge(server.master, exported.file, fine_tune_on=(samples.normalized(), samples.y))
    except BridgeError as exc:
        raise Round0Error(f"round 0: the devices could not rebuild and fine-tune {server.info.spec.get('arch')} "
                          f"from its int8 file: {exc}") from None
    log.info("round 0: devices can rebuild %s from its int8 file and fine-tune it", server.info.spec.get("arch"))
