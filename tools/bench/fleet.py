"""Fleet benchmark: round latency and coordination overhead of real MQTT rounds on loopback.

A private Mosquitto, the coordinator as its own process (`pqsu cloud`), and N edge agents
as threads of this process (real `EdgeAgent`s, each with its own MQTT connection). Per
round, overhead = (announcement to last answer, measured by the coordinator) minus the
slowest selected device's own compute, which each device reports in its status: from the
moment it holds both the round's task and the complete model, to its upload being confirmed
(verifying and loading the model, training, encoding). What is left is moving the model and
the updates through the broker, the coordinator's handling, and waiting. Round latency is the
coordinator's announcement-to-last-answer time itself. With 100 agents as threads on 2 cores
the devices' compute is serialized, so latency grows with the fleet while overhead should not.
"""
from __future__ import annotations

import json
import logging
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from pqsu.cloud.config import FederatedConfig
from pqsu.edge.agent import AgentConfig, EdgeAgent
from pqsu.edge.datastore import load_local_data
from pqsu.edge.learner import EdgeLearner
from pqsu.edge.selective import SelectivePolicy
from pqsu.protocol.messages import MessageError, Status
from pqsu.protocol.mqtt import MqttClient
from pqsu.protocol.topics import Topics
from pqsu.tools.lab.broker import Mosquitto
from pqsu.tools.fleet.run import write_device_shards

log = logging.getLogger(__name__)


def run_fleet(agents: int = 20, rounds: int = 3, *, model: str = "resnet18", prune: float = 0.7,
              chunk_limit: int = 128 * 1024, timeout_s: float = 600.0) -> dict:
    """~1 MB int8 model by default (resnet18 with 70% of channels pruned); one local step per device."""
    cfg = FederatedConfig.for_scheme("ours", model=model, prune=prune, clients=agents, rounds=rounds,
                                     samples_per_client=32, proxy_samples=256, pretrain_epochs=0.2,
                                     finetune_epochs=0.0, eval_samples=200, partition="iid", batch_size=32)
    with tempfile.TemporaryDirectory(prefix="pqsu-bench-fleet-") as tmp, Mosquitto(Path(tmp) / "broker") as broker:
        out = Path(tmp) / "run"
        devices = write_device_shards(cfg, out / "devices")
        settings = out / "settings.json"
        settings.write_text(json.dumps({k: v for k, v in cfg.to_dict().items() if v is not None}))
        compute: dict[tuple[str, int], float] = {}
        topics = Topics("bench")

        def on_status(topic: str, payload: bytes, retained: bool) -> None:
            try:
                st = Status.from_json(payload)
            except MessageError:
                return
            if st.state in ("uploaded", "skipped"):
                compute[(st.device, st.round)] = st.seconds

        listener = MqttClient(broker.url, "bench-listener", persistent_session=False)
        listener.connect(10)
        listener.subscribe(topics.status_filter, on_status)
        stop = threading.Event()
        threads = []
        for device in devices:
            x, y = load_local_data(out / "devices" / device / "data.npz")
            learner = EdgeLearner(device, x, y, SelectivePolicy.from_spec(cfg.upload, cfg.select, cfg.error_feedback))
            agent = EdgeAgent(AgentConfig(broker.url, device, fleet="bench", state_dir=str(out / "devices" / device),
                                          chunk_limit=chunk_limit), learner)
            t = threading.Thread(target=agent.run, args=(stop,), name=device, daemon=True)
            t.start()
            threads.append(t)
        cmd = [sys.executable, "-m", "pqsu.tools.cli", "cloud", "--config", str(settings), "--broker", broker.url,
               "--fleet", "bench", "--min-devices", str(agents), "--chunk-limit", str(chunk_limit), "--out", str(out)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=30)
            listener.close()
        if proc.returncode != 0:
            raise RuntimeError(f"coordinator failed: {proc.stderr[-2000:]}")
        reports = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        model_bytes = reports[-1]["model_bytes"]
    rows = []
    for r in reports:
        slowest = max((compute.get((d, r["round"]), 0.0) for d in devices), default=0.0)
        rows.append({"round": r["round"], "collect_s": r["collect_seconds"], "slowest_device_compute_s": slowest,
                     "overhead_s": r["collect_seconds"] - slowest, "server_s": r["server_seconds"],
                     "uploads": r["uploads"], "selected": r["selected"]})
    overheads = [row["overhead_s"] for row in rows]
    latencies = [row["collect_s"] for row in rows]
    return {"agents": agents, "rounds": rounds, "model": model, "prune": prune, "model_bytes": model_bytes,
            "per_round": rows, "round_latency_median_s": statistics.median(latencies),
            "round_latency_max_s": max(latencies), "selected_min": min(r["selected"] for r in rows),
            "overhead_median_s": statistics.median(overheads), "overhead_max_s": max(overheads), "target_s": 0.5}


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    print(json.dumps(run_fleet(agents=n), indent=2))
