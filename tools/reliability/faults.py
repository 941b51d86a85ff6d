"""Fault scenarios for `pqsu reliability faults`, run against real processes and a real Mosquitto.

- the broker SIGKILLed and restarted on its port mid-round (its retained messages, sessions and
  queues gone): no accepted update lost, none counted twice;
- the coordinator SIGKILLed mid-round and restarted: it resumes from its checkpoint and finishes
  with exactly the planned rounds;
- an agent SIGKILLed mid-training: the round completes without it; restarted, its next update is
  the one its error-feedback residual on disk gives (recomputed here byte for byte);
- a damaged newest checkpoint: a clear error, the previous one is used;
- a write that fails while checkpointing (the kernel refuses it): the previous checkpoint stays valid.

Each scenario returns its measured figures and `checks` (name -> passed); the tests call the same
functions and assert on the figures.
"""
from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pqsu.tools.lab.fleet_lab import TINY, Lab, expect, read_metrics, shutdown, slow_down, write_shards
from pqsu.tools.lab.observer import round_announced, status_is, wait_until

log = logging.getLogger(__name__)
JOIN_S, RUN_S = 240.0, 300.0  # bounds on waiting for a fleet to start and to finish, however loaded the machine


def broker_restart(folder: Path, rounds: int = 2) -> dict:
    """Two agents; dev-001 trains 10x longer. Once dev-000 has uploaded round 1, the broker is SIGKILLed
    and started again on its port with nothing retained and no sessions."""
    shards = write_shards(folder / "devices", 2)
    slow_down(shards[1], 10)
    out = folder / "out"
    with Lab(folder, "brk") as lab:
        cloud, agents = lab.start_fleet(out, shards, rounds=rounds)
        up = lab.observer.wait_for(status_is("dev-000", "uploaded", round_=1), JOIN_S, lambda: cloud.poll() is None)
        expect(up, "dev-000 never uploaded in round 1", lab)
        slow_done_before = bool(lab.observer.updates.get("dev-001"))
        lab.broker.restart(kill=True)
        codes = shutdown([cloud, *agents], RUN_S)
        expect(codes["cloud"] == 0, f"the coordinator did not finish: {codes}", lab)
        cloud_log, agent_logs = cloud.output, [a.output for a in agents]
    metrics = read_metrics(out)
    sent = _updates_made(shards)
    accepted = sum(m["uploads"] for m in metrics)
    wire = {d: len(v) for d, v in lab.observer.updates.items()}
    result = {
        "rounds": [m["round"] for m in metrics], "uploads_per_round": [m["uploads"] for m in metrics],
        "updates_made_by_agents": sent, "updates_accepted": accepted,
        "updates_seen_on_the_wire": sum(wire.values()),
        "resent_by_agents": sum(log_.count("sending its update again") for log_ in agent_logs),
        "rejected": _merged(m["rejected"] for m in metrics),
        "republished_after_restart": "lost the retained round announcement" in cloud_log,
        "slow_agent_uploaded_before_kill": slow_done_before, "agent_exit_codes": [codes[a.name] for a in agents],
    }
    result["checks"] = {
        "every round ran": result["rounds"] == list(range(1, rounds + 1)),
        "accepted == made by agents": accepted == sent == 2 * rounds,
        "no update counted twice": all(m["uploads"] <= m["selected"] for m in metrics),
        "agents finished": result["agent_exit_codes"] == [0, 0],
    }
    return result


def coordinator_restart(folder: Path, rounds: int = 2) -> dict:
    """Two agents. Once dev-000 has uploaded the last round, the coordinator is SIGKILLed (its accepted
    updates die with it) and `pqsu cloud` is started again with the same --out."""
    shards = write_shards(folder / "devices", 2)
    slow_down(shards[1], 5)
    out = folder / "out"
    with Lab(folder, "crs") as lab:
        cloud, agents = lab.start_fleet(out, shards, rounds=rounds)
        up = lab.observer.wait_for(status_is("dev-000", "uploaded", round_=rounds), JOIN_S + 60 * rounds,
                                   lambda: cloud.poll() is None)
        expect(up, f"dev-000 never uploaded round {rounds}", lab)
        cloud.kill()
        rounds_before = [m["round"] for m in read_metrics(out)]
        checkpoints = sorted(p.name for p in (out / "checkpoints").glob("round-*.npz"))
        again = lab.cloud(out, rounds=rounds, clients=2, min_devices=2, round_timeout=120, name="cloud-restarted")
        codes = shutdown([again, *agents], RUN_S)
        expect(codes["cloud-restarted"] == 0, f"the restarted coordinator did not finish: {codes}", lab)
        restarted_log = again.output
    import json

    metrics = read_metrics(out)
    summary = json.loads((out / "summary.json").read_text())
    result = {
        "killed_in_round": rounds, "rounds_in_metrics_before_kill": rounds_before, "checkpoints_at_kill": checkpoints,
        "resumed_after_round": _resumed_after(restarted_log), "rounds": [m["round"] for m in metrics],
        "summary_rounds": summary["rounds"], "completed": summary.get("completed"),
        "uploads_per_round": [m["uploads"] for m in metrics], "updates_made_by_agents": _updates_made(shards),
        "agent_exit_codes": [codes[a.name] for a in agents],
    }
    result["checks"] = {
        "resumed from the last checkpoint": result["resumed_after_round"] == rounds - 1,
        "exactly the planned rounds": result["rounds"] == list(range(1, rounds + 1)) and summary["rounds"] == rounds,
        "no update lost": sum(result["uploads_per_round"]) == result["updates_made_by_agents"] == 2 * rounds,
        "agents finished": result["agent_exit_codes"] == [0, 0],
    }
    return result


def agent_restart(folder: Path) -> dict:
    """One agent, three rounds. It is SIGKILLed while training round 2; round 2 closes without it (its
    last will answers for it); restarted, it trains round 3. Its round-3 update is recomputed here from
    the round-3 model and the state file as it was at the kill: equal bytes mean the residual on disk
    was loaded intact and used. The same round without the residual gives other bytes."""
    shard = write_shards(folder / "devices", 1)[0]
    slow_down(shard, 20)
    state_file, out = shard.parent / "state.npz", folder / "out"
    with Lab(folder, "ags") as lab:
        cloud = lab.cloud(out, rounds=3, clients=1, min_devices=1, round_timeout=120)
        victim = lab.agent("dev-000", shard)
        alive = lambda: cloud.poll() is None  # noqa: E731
        expect(lab.observer.wait_for(status_is("dev-000", "training", round_=2), JOIN_S, alive),
               "dev-000 never started round 2", lab)
        victim.kill()
        on_disk = state_file.read_bytes()
        expect(wait_until(lambda: len(read_metrics(out)) >= 2 or not alive(), 120), "round 2 never closed", lab)
        round2 = read_metrics(out)[1]
        unchanged = state_file.read_bytes() == on_disk
        restarted = lab.agent("dev-000", shard, name="dev-000-restarted")
        codes = shutdown([cloud, restarted], RUN_S)
        expect(codes["cloud"] == 0, f"the coordinator did not finish: {codes}", lab)
        expect(lab.observer.wait_for(round_announced(3), 0.1) is not None or 3 in lab.observer.rounds,
               "round 3 never announced", lab)
        task3, updates = lab.observer.rounds[3], lab.observer.updates.get("dev-000", [])
        model3 = lab.observer.models.get(task3.model_id)
    from pqsu.protocol.codec import peek_header

    sent3 = [u for u in updates if peek_header(u).round == 3]
    expect(len(sent3) >= 1 and model3 is not None, f"no round-3 update or model seen ({len(sent3)} updates)")
    with_residual = _recompute(shard, on_disk, task3, model3, folder / "recompute")
    without = _recompute(shard, None, task3, model3, folder / "recompute-fresh")
    metrics = read_metrics(out)
    result = {
        "round2": {k: round2[k] for k in ("selected", "uploads", "missing", "seconds")},
        "state_unchanged_between_kill_and_restart": unchanged,
        "round3_update_bytes": len(sent3[0]), "round3_uploads": metrics[2]["uploads"] if len(metrics) > 2 else 0,
        "update_equals_recomputed_with_residual": sent3[0] == with_residual,
        "update_equals_recomputed_without_residual": sent3[0] == without,
        "agent_exit_code": codes["dev-000-restarted"],
    }
    result["checks"] = {
        "round 2 closed without the killed agent": round2["uploads"] == 0 and round2["seconds"] < 120,
        "residual on disk intact": unchanged,
        "next update uses the residual": result["update_equals_recomputed_with_residual"]
        and not result["update_equals_recomputed_without_residual"],
        "round 3 counted it": result["round3_uploads"] == 1,
    }
    return result


def damaged_checkpoint(folder: Path) -> dict:
    """Two real checkpoints of a tiny server; the newest is truncated, then replaced by garbage: each time
    `build_server` resumes from the previous one and says why. All damaged: one clear error."""
    import numpy as np

    from pqsu.cloud import checkpoint
    from pqsu.cloud.bootstrap import build_server
    from pqsu.cloud.config import FederatedConfig

    cfg = FederatedConfig.for_scheme("ours", rounds=3, clients=2, **TINY)
    server, meta = build_server(cfg)
    ckpts = folder / "checkpoints"
    for r in (1, 2):
        master = {k: v + 0.01 * r for k, v in server.master.items()}
        checkpoint.save(ckpts, checkpoint.Checkpoint(r, master, {}, {**meta, "reports": [{"round": i} for i in range(1, r + 1)]}))
    newest = ckpts / "round-000002.npz"
    good = newest.read_bytes()
    result: dict = {}
    for damage, data in (("truncated", good[: len(good) // 2]), ("garbage", b"\x00not a checkpoint" * 64)):
        newest.write_bytes(data)
        with _captured("pqsu.cloud.checkpoint") as lines:
            resumed, _ = build_server(cfg, checkpoint_dir=ckpts)
        expected = {k: v + 0.01 for k, v in server.master.items()}
        result[damage] = {"resumed_after_round": resumed.rounds_done,
                          "master_is_previous": all(np.array_equal(resumed.master[k], expected[k]) for k in expected),
                          "error_logged": next((ln for ln in lines if "unreadable" in ln), "")}
    (ckpts / "round-000001.npz").write_bytes(b"")
    try:
        build_server(cfg, checkpoint_dir=ckpts)
        result["all_damaged_error"] = ""
    except checkpoint.CheckpointError as exc:
        result["all_damaged_error"] = str(exc).replace(str(folder), "<scenario folder>")  # no temp path in the report
    result["checks"] = {
        f"{d}: previous checkpoint used, error logged": r["resumed_after_round"] == 1 and r["master_is_previous"]
        and bool(r["error_logged"]) for d, r in result.items() if isinstance(r, dict)}
    result["checks"]["all damaged: clear error"] = "no readable checkpoint" in result["all_damaged_error"]
    return result


_FULL_DISK = r"""
import errno, json, os, resource, signal, sys
import numpy as np
from pqsu.cloud import checkpoint
folder = sys.argv[1]
w = {"w": np.ones((64, 64), np.float32)}
checkpoint.save(folder, checkpoint.Checkpoint(1, w))
before = sorted(os.listdir(folder))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)          # the write fails (EFBIG) instead of killing us
# Only the soft limit: raising a lowered hard limit again needs CAP_SYS_RESOURCE, which containers lack.
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (8192, hard))  # the next checkpoint (~16 KB) cannot be written
try:
    checkpoint.save(folder, checkpoint.Checkpoint(2, {"w": np.full((64, 64), 2, np.float32)}))
    error = ""
except OSError as exc:
    error = f"{errno.errorcode.get(exc.errno, exc.errno)}: {exc.strerror}"
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
print(json.dumps({"error": error, "files_unchanged": sorted(os.listdir(folder)) == before,
                  "loaded_round": checkpoint.load_latest(folder).round}))
"""


def failed_checkpoint_write(folder: Path) -> dict:
    """A checkpoint write the kernel refuses part-way (a file size limit: EFBIG, as ENOSPC would on a full
    disk), in a child process: the error reaches the caller, no temp file is left, round 1 still loads."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-c", _FULL_DISK, str(folder)], capture_output=True, text=True, timeout=120)
    expect(proc.returncode == 0, f"the full-disk child failed:\n{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["checks"] = {"write error raised": bool(result["error"]), "no partial file left": result["files_unchanged"],
                        "previous checkpoint loads": result["loaded_round"] == 1}
    return result


SCENARIOS = {"broker_restart": broker_restart, "coordinator_restart": coordinator_restart,
             "agent_restart": agent_restart, "damaged_checkpoint": damaged_checkpoint,
             "failed_checkpoint_write": failed_checkpoint_write}


def measure(quick: bool) -> dict:
    """Every scenario once (quick or not: they are already as small as they can be and still prove it)."""
    results = {}
    with tempfile.TemporaryDirectory(prefix="pqsu-faults-") as tmp:
        for name, scenario in SCENARIOS.items():
            start = time.perf_counter()
            log.info("faults: %s", name)
            try:
                results[name] = scenario(Path(tmp) / name)
            except Exception as exc:  # one broken scenario must not hide the others' figures
                log.error("faults: %s failed: %s", name, exc)
                results[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000], "checks": {"ran": False}}
            results[name]["seconds"] = round(time.perf_counter() - start, 1)
    return results


def markdown(result: dict) -> list[str]:
    lines = ["## Faults", "", "Real processes (`pqsu cloud`, `pqsu edge run`) and a real Mosquitto on 127.0.0.1; "
             "every process SIGKILLed, as a power cut would.", "",
             "| scenario | check | result | figures | seconds |", "|---|---|---|---|---|"]
    for name, r in result.items():
        if not isinstance(r, dict) or "checks" not in r:
            continue
        figures = r.get("error") or ", ".join(f"{k}={v}" for k, v in r.items()
                                              if k not in ("checks", "seconds") and not isinstance(v, dict))
        for i, (check, ok) in enumerate(r["checks"].items()):
            lines.append(f"| {name if i == 0 else ''} | {check} | {'pass' if ok else '**FAIL**'} | "
                         f"{figures if i == 0 else ''} | {r.get('seconds', '') if i == 0 else ''} |")
    return lines + [""]


# -- helpers -------------------------------------------------------------------------------------------------
def _updates_made(shards: list[Path]) -> int:
    """Updates the agents produced (their persistent `uploads` counter): what the coordinator should count."""
    from pqsu.edge.state import DeviceState

    return sum(DeviceState.load(s.parent / "state.npz").uploads for s in shards)


def _merged(dicts) -> dict[str, int]:
    total: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            total[k] = total.get(k, 0) + v
    return total


def _resumed_after(text: str) -> int | None:
    import re

    m = re.search(r"resuming after round (\d+)", text)
    return int(m.group(1)) if m else None


def _recompute(shard: Path, state: bytes | None, task, model: bytes, folder: Path) -> bytes | None:
    """The update `pqsu edge run` would send for `task`, given its shard and state file, on one torch thread."""
    import numpy as np
    import torch

    from pqsu.edge.command import DEFAULTS
    from pqsu.edge.learner import EdgeLearner
    from pqsu.edge.selective import SelectivePolicy

    folder.mkdir(parents=True, exist_ok=True)
    if state is not None:
        (folder / "state.npz").write_bytes(state)
    with np.load(shard) as z:
        x, y = z["x"], z["y"]
    policy = SelectivePolicy.from_spec(DEFAULTS["upload"], DEFAULTS["select"], DEFAULTS["error_feedback"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return EdgeLearner("dev-000", x, y, policy, state_path=folder / "state.npz").run_round(task, model).payload
    finally:
        torch.set_num_threads(threads)


class _captured:
    """The log lines one logger emits inside the block."""

    def __init__(self, name: str):
        self.logger, self.lines = logging.getLogger(name), []
        self.handler = logging.Handler()
        self.handler.emit = lambda record: self.lines.append(record.getMessage())

    def __enter__(self) -> list[str]:
        self.logger.addHandler(self.handler)
        return self.lines

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self.handler)
