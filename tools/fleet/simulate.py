"""Federated training in one process: the coordinator's and the devices' real round logic,
with function calls where MQTT will be.

Every byte counted is a real encoded message: the int8 (or fp32) ONNX file each device
downloads and the update payload it uploads. Schemes (--scheme) are presets:
fedavg (dense fp32 FedAvg), paper (FL-PQSU as published), ours (the default).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from pqsu.cloud.config import FederatedConfig, add_config_arguments, config_from_args
from pqsu.cloud.data import device_ids

if TYPE_CHECKING:
    from pqsu.cloud.server import FederatedServer, RoundReport

__all__ = ["SimResult", "device_ids", "simulate"]  # device_ids lives in cloud/data.py; benches import it here


@dataclass
class SimResult:
    config: dict
    rounds: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    model: bytes = b""   # the model file devices would receive after the last round


def simulate(cfg: FederatedConfig, on_round: Callable[[RoundReport], None] | None = None, *,
             tamper: Callable[[str, bytes], bytes] | None = None,
             server: FederatedServer | None = None) -> SimResult:
    """The round runner over the in-process transport: `pqsu cloud`'s rounds, with learners called
    directly where MQTT would be.

    `tamper(device_id, payload)`, if given, replaces each payload before the server sees it
    (a misbehaving device, for the reliability measurements). `server`, if given, is a fresh
    server built for `cfg` (benchmarks share one round-0 pre-training between rows).

    Each round's record also lists every selected device's measured `run_round` wall time and
    upload bytes (`devices`), which the radio model turns into simulated round times."""
    # Here, not at the top: they import torch and onnx, which `pqsu simulate --help` must not wait for.
    from pqsu.cloud.bootstrap import build_server
    from pqsu.cloud.data import federated_data
    from pqsu.cloud.rounds import RoundRunner, RunnerConfig
    from pqsu.cloud.transport import InProcessTransport
    from pqsu.edge.learner import EdgeLearner
    from pqsu.edge.selective import SelectivePolicy

    start = time.perf_counter()
    data = federated_data(cfg, cloud=server is None)
    config = cfg.to_dict()
    if server is None:
        server, meta = build_server(cfg, data=data.cloud)
        config = meta["config"]  # with what round 0 chose (prune_chosen)
    policy = SelectivePolicy.from_spec(cfg.upload, cfg.select, cfg.error_feedback)
    # The devices rebuild the model this run was configured with, a custom architecture too: the same code.
    learners = {d: EdgeLearner(d, shard.x, shard.y, policy, allow_custom={cfg.model})
                for d, shard in data.shards.items()}
    runner = RoundRunner(RunnerConfig(rounds=cfg.rounds, round_timeout_s=None, fraction=cfg.fraction, seed=cfg.seed),
                         server, InProcessTransport(learners, tamper=tamper), on_round=on_round)
    summary = runner.run(started=start)
    return SimResult(config=config, rounds=runner.rounds, summary=summary, model=runner.model)


# -- command line ----------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    p.add_argument("--out", help="write config.json, metrics.jsonl, summary.json and plots to this folder")


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)  # bad input fails here, before torch is imported
    cfg.check_model_and_data()  # a model that cannot train on this data fails in seconds, before round 0
    from pqsu.cloud import report

    out = Path(args.out) if args.out else None

    def show(r: RoundReport) -> None:
        print(report.round_line(r.to_dict()), flush=True)
        if out:
            report.append_metrics(out, r.to_dict())
    result = simulate(cfg, show)
    print(json.dumps(result.summary, indent=2))
    if out:  # the runner's records: what `show` appended plus the downlink and transport keys
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in result.rounds))
        report.write_outputs(out, config=result.config, rounds=result.rounds, summary=result.summary, model=None)
    return 0
