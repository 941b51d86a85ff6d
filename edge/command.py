"""The edge agent: join a fleet through an MQTT broker, train when asked, serve the model.

  pqsu edge run --broker mqtt://broker.local:1883 --device-id pi-kitchen-01 --data /var/lib/pqsu/data

The device id is the MQTT client id (with a persistent session) and the name the
coordinator knows it by. --data is an .npz shard (arrays x uint8 N,C,H,W and y), a
folder of shards, or a folder with train-images/train-labels IDX files. Without torch
installed (or with --inference-only) the agent only follows model versions.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import signal
import threading
from pathlib import Path

from pqsu.protocol.errors import PqsuError
from pqsu.protocol.settings import read_settings

log = logging.getLogger(__name__)

DEFAULTS = {"fleet": "default", "state_dir": "pqsu-device", "upload": "norm:0.0001", "select": "topk:0.02",
            "error_feedback": True, "chunk_limit": 128 * 1024, "protocol": "auto", "torch_threads": 0}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    r = sub.add_parser("run", help="run the agent", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--config", metavar="FILE", help="settings file (TOML or JSON); flags win")
    r.add_argument("--broker", help="broker URL, mqtt:// or mqtts://")
    r.add_argument("--device-id", help="this device's id (letters, digits, . _ -)")
    r.add_argument("--fleet", help=f"fleet name (default: {DEFAULTS['fleet']})")
    r.add_argument("--data", help="local training data: .npz shard, folder of shards, or IDX folder")
    r.add_argument("--state-dir", help=f"where the device keeps its state and outbox (default: {DEFAULTS['state_dir']})")
    r.add_argument("--upload", help=f"upload rule(s): always, loss, norm:T, relevance:T joined by + (default: {DEFAULTS['upload']})")
    r.add_argument("--select", help=f"entries to send: topk:F, threshold:T, dense or fp32 (default: {DEFAULTS['select']})")
    r.add_argument("--no-error-feedback", dest="error_feedback", action="store_const", const=False,
                   help="drop what is not sent instead of keeping it for later")
    r.add_argument("--key-file", help="file with this device's HMAC key (hex) for signing updates")
    r.add_argument("--chunk-limit", type=int, help="largest MQTT payload in bytes (default: 131072)")
    r.add_argument("--protocol", choices=["auto", "5", "3.1.1"], help="MQTT version (default: auto)")
    r.add_argument("--inference-only", action="store_true", default=None, help="follow models, never train")
    r.add_argument("--allow-custom", action="store_true", default=None,
                   help="rebuild user architectures named in the model file (imports that code)")
    r.add_argument("--torch-threads", type=int, help="torch CPU threads for training (default: torch's choice)")
    r.add_argument("--stay", action="store_true", default=None, help="keep running after the coordinator says done")


def _settings(args: argparse.Namespace) -> dict:
    s = dict(DEFAULTS)
    if args.config:
        s.update(read_settings(args.config))
    s.update({k: v for k, v in vars(args).items() if v is not None and k not in ("config", "action", "command", "verbose", "_module")})
    for required in ("broker", "device_id"):
        if not s.get(required):
            raise PqsuError(f"--{required.replace('_', '-')} is required (flag or settings file)")
    return s


def run(args: argparse.Namespace) -> int:
    from pqsu.edge.agent import AgentConfig, EdgeAgent

    s = _settings(args)
    trains = not s.get("inference_only") and importlib.util.find_spec("torch") is not None
    learner = None
    if trains:
        learner = _learner(s)
    elif not s.get("inference_only"):
        log.warning("torch is not installed: running as an inference-only device")
    cfg = AgentConfig(broker=s["broker"], device_id=s["device_id"], fleet=s["fleet"], state_dir=s["state_dir"],
                      chunk_limit=int(s["chunk_limit"]), protocol=s["protocol"], exit_when_done=not s.get("stay"))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    agent = EdgeAgent(cfg, learner)
    try:
        joined = agent.run(stop)
    except KeyboardInterrupt:
        stop.set()
        raise
    log.info("%s: joined %d rounds", cfg.device_id, joined)
    return 0


def _learner(s: dict):
    import torch

    from pqsu.edge.datastore import load_local_data
    from pqsu.edge.learner import EdgeLearner
    from pqsu.edge.selective import SelectivePolicy

    if int(s.get("torch_threads") or 0) > 0:
        torch.set_num_threads(int(s["torch_threads"]))
    if not s.get("data"):
        raise PqsuError("--data is required on a training device (or pass --inference-only)")
    x, y = load_local_data(s["data"])
    key = None
    if s.get("key_file"):
        try:
            key = bytes.fromhex(Path(s["key_file"]).read_text().strip())
        except (OSError, ValueError) as exc:
            raise PqsuError(f"key file {s['key_file']} must hold a hex key: {exc}") from None
    policy = SelectivePolicy.from_spec(s["upload"], s["select"], bool(s["error_feedback"]))
    return EdgeLearner(s["device_id"], x, y, policy, state_path=Path(s["state_dir"]) / "state.npz", key=key,
                       allow_custom=bool(s.get("allow_custom")))
