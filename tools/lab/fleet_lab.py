"""A lab for fleet scenarios: a private Mosquitto, `pqsu` processes, an observer on the fleet's topics,
and the tiny per-device shards the scenarios train on.

Built on the one process wrapper (`process.py`) and the one topic observer (`observer.py`). Used by
`pqsu reliability` (faults, fuzz, security scenarios) and by the tests, which run the same scenarios and
assert on what they return. Everything talks to 127.0.0.1 only; every wait is bounded; `Lab.close()`
stops every process the lab started (by its own pid and process group, never by name) and the broker.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from pqsu.tools.lab.broker import Mosquitto
from pqsu.tools.lab.observer import Observer
from pqsu.protocol.process import CLI, Process, pqsu_env, reap, wait_all

log = logging.getLogger(__name__)
# Small and quick: what the scenarios check does not depend on accuracy.
TINY = dict(samples_per_client=120, proxy_samples=300, eval_samples=200, pretrain_epochs=0.3, finetune_epochs=0)


def flags(**options) -> list[str]:
    return [x for k, v in options.items() for x in ("--" + k.replace("_", "-"), str(v))]


def pqsu(args: list[str], logdir: Path, name: str, *, split_stderr: bool = False) -> Process:
    """`pqsu ARGS` on one torch thread, unbuffered; output to <logdir>/<name>.log (or .stdout and .stderr)."""
    env = {**pqsu_env(threads=1), "PYTHONUNBUFFERED": "1"}
    if split_stderr:
        return Process(CLI + args, logdir / f"{name}.stdout", name=name, stderr_log=logdir / f"{name}.stderr", env=env)
    return Process(CLI + args, logdir / f"{name}.log", name=name, env=env, append=True)


class Lab:
    """One scenario's world: a folder, a Mosquitto, the processes started and an observer."""

    def __init__(self, folder: Path, fleet: str, watch_updates: bool = True):
        self.folder, self.fleet = Path(folder), fleet
        self.folder.mkdir(parents=True, exist_ok=True)
        self.broker = Mosquitto(self.folder / "broker").start()
        self.procs: list[Process] = []
        self.logs = self.folder / "logs"
        try:
            self.observer = Observer(self.broker.url, fleet=fleet, watch_updates=watch_updates)
        except BaseException:
            self.broker.close()
            raise

    def cloud(self, out: Path, *, rounds: int, clients: int, min_devices: int, round_timeout: float,
              name: str = "cloud") -> Process:
        args = ["cloud", "--broker", self.broker.url, "--fleet", self.fleet, "--min-devices", str(min_devices),
                "--round-timeout", str(round_timeout), "--join-timeout", "120", "--out", str(out)]
        return self.start(args + flags(clients=clients, rounds=rounds, **TINY), name)

    def agent(self, device: str, data: Path, name: str | None = None) -> Process:
        return self.start(["edge", "run", "--broker", self.broker.url, "--fleet", self.fleet, "--device-id", device,
                           "--data", str(data), "--state-dir", str(data.parent), "--torch-threads", "1", "--no-http"],
                          name or device)

    def start_fleet(self, out: Path, shards: list[Path], *, rounds: int,
                    round_timeout: float = 120) -> tuple[Process, list[Process]]:
        """A coordinator waiting for every shard's device, and an agent per shard (named by its folder)."""
        cloud = self.cloud(out, rounds=rounds, clients=len(shards), min_devices=len(shards),
                           round_timeout=round_timeout)
        return cloud, [self.agent(shard.parent.name, shard) for shard in shards]

    def start(self, args: list[str], name: str) -> Process:
        proc = pqsu(args, self.logs, name)
        self.procs.append(proc)
        return proc

    def tails(self) -> str:
        return "\n".join(p.tail() for p in self.procs)

    def close(self) -> None:
        try:
            self.observer.close()
        finally:
            reap(self.procs, grace_s=5, signal_first=True)
            self.broker.close()

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_shards(folder: Path, clients: int, samples: int = TINY["samples_per_client"],
                 proxy: int = TINY["proxy_samples"], seed: int = 0) -> list[Path]:
    """Per-device .npz shards split as every driver splits them (`pqsu.cloud.data`), small ones by default."""
    from pqsu.cloud.config import FederatedConfig
    from pqsu.cloud.data import device_shards

    cfg = FederatedConfig(clients=clients, samples_per_client=samples, proxy_samples=proxy, seed=seed)
    paths = []
    for device, shard in device_shards(cfg).items():
        path = folder / device / "data.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, x=shard.x, y=shard.y)
        paths.append(path)
    return paths


def slow_down(shard: Path, factor: int) -> None:
    """Make a device train `factor` times longer (its shard repeated), so a fault surely lands mid-training."""
    with np.load(shard) as z:
        x, y = z["x"], z["y"]
    np.savez(shard, x=np.tile(x, (factor, 1, 1, 1)), y=np.tile(y, factor))


def read_metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


class ScenarioFailed(AssertionError):
    """A scenario could not reach the state it needed (a process died, a wait ran out)."""


def expect(ok, message: str, lab: Lab | None = None) -> None:
    if not ok:
        raise ScenarioFailed(message + ("\n" + lab.tails() if lab else ""))


shutdown = wait_all  # the scenarios' name for: exit codes once each ended by itself
