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

if TYPE_CHECKING:
    from pqsu.cloud.server import FederatedServer, RoundReport


@dataclass
class SimResult:
    config: dict
    rounds: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    model: bytes = b""   # the model file devices would receive after the last round


def device_ids(n: int) -> list[str]:
    return [f"dev-{i:03d}" for i in range(n)]


def simulate(cfg: FederatedConfig, on_round: Callable[[RoundReport], None] | None = None, *,
             tamper: Callable[[str, bytes], bytes] | None = None,
             server: FederatedServer | None = None) -> SimResult:
    """`tamper(device_id, payload)`, if given, replaces each payload before the server sees it
    (a misbehaving device, for the reliability measurements). `server`, if given, is a fresh
    server built for `cfg` (benchmarks share one round-0 pre-training between rows).

    Each round's record also lists every selected device's measured `run_round` wall time and
    upload bytes (`devices`), which the radio model turns into simulated round times."""
    # Here, not at the top: they import torch and onnx, which `pqsu simulate --help` must not wait for.
    from pqsu.cloud import report
    from pqsu.cloud.bootstrap import build_server
    from pqsu.cloud.server import choose_devices
    from pqsu.edge.learner import EdgeLearner
    from pqsu.edge.selective import SelectivePolicy
    from pqsu.export.datasets import load_dataset
    from pqsu.export.partition import federated_split

    start = time.perf_counter()
    if server is None:
        server, _ = build_server(cfg)
    train = load_dataset(cfg.dataset, "train", cfg.data_root)
    _, parts = federated_split(train.y, cfg.proxy_samples, cfg.clients, cfg.partition, cfg.seed, cfg.samples_per_client)
    policy = SelectivePolicy.from_spec(cfg.upload, cfg.select, cfg.error_feedback)
    devices = {d: EdgeLearner(d, train.x[p], train.y[p], policy) for d, p in zip(device_ids(cfg.clients), parts)}

    result = SimResult(config=cfg.to_dict())
    initial = server.evaluate().accuracy
    for r in range(1, cfg.rounds + 1):
        chosen = choose_devices(list(devices), cfg.fraction, cfg.seed, r)
        task = server.open_round(r, chosen)
        model_bytes, _ = server.model_message()
        skipped, per_device = 0, {}
        for device_id in chosen:
            t0 = time.perf_counter()
            outcome = devices[device_id].run_round(task, model_bytes)
            per_device[device_id] = {"seconds": time.perf_counter() - t0,
                                     "bytes_up": len(outcome.payload) if outcome.payload else 0}
            if outcome.payload is None:
                skipped += 1
            else:
                payload = tamper(device_id, outcome.payload) if tamper else outcome.payload
                server.submit(payload, sender=device_id)
        rep = server.close_round(skipped)
        result.rounds.append({**rep.to_dict(), "devices": per_device})
        if on_round:
            on_round(rep)
    result.model = server.model_message()[0]
    result.summary = report.summarize(result.rounds, arch=cfg.model, in_shape=train.input_shape,
                                      num_classes=train.num_classes, seconds=time.perf_counter() - start,
                                      initial_accuracy=initial)
    return result


# -- command line ----------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    p.add_argument("--out", help="write config.json, metrics.jsonl, summary.json and plots to this folder")


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)  # bad input fails here, before torch is imported
    from pqsu.cloud import report

    out = Path(args.out) if args.out else None

    def show(r: RoundReport) -> None:
        print(f"round {r.round:3d}  acc {r.accuracy:.4f}  uploads {r.uploads}/{r.selected}  "
              f"up {r.bytes_up:,} B  down {r.bytes_down:,} B  {r.seconds:.1f}s", flush=True)
        if out:
            report.append_metrics(out, r.to_dict())
    result = simulate(cfg, show)
    print(json.dumps(result.summary, indent=2))
    if out:
        report.write_outputs(out, config=result.config, rounds=result.rounds, summary=result.summary, model=None)
    return 0
