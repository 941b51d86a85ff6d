"""A lab for fault scenarios: a private Mosquitto, `pqsu` processes, an observer on the fleet's topics.

Used by `pqsu reliability` (tools/reliability/faults.py, tools/reliability/fuzz.py) and by the tests,
which run the same scenarios and assert on what they return. Everything talks to 127.0.0.1 only;
every wait is bounded; `Lab.close()` stops every process the lab started (by its own pid and
process group, never by name) and the broker.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from pqsu.protocol import chunking, model_id
from pqsu.protocol.messages import MessageError, RoundTask, Status, message_type
from pqsu.protocol.mqtt import MqttClient
from pqsu.protocol.topics import Topics
from pqsu.tools.fleet.broker import Mosquitto

log = logging.getLogger(__name__)
CLI = [sys.executable, "-m", "pqsu.tools.cli"]
# Small and quick: what the scenarios check does not depend on accuracy.
TINY = dict(samples_per_client=120, proxy_samples=300, eval_samples=200, pretrain_epochs=0.3, finetune_epochs=0)


def flags(**options) -> list[str]:
    return [x for k, v in options.items() for x in ("--" + k.replace("_", "-"), str(v))]


class Proc:
    """A `pqsu` command in its own process group, one thread for torch; output to <logdir>/<name>.log."""

    def __init__(self, args: list[str], logdir: Path, name: str):
        logdir.mkdir(parents=True, exist_ok=True)
        self.args, self.name, self.log_path = args, name, logdir / f"{name}.log"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "ab") as out:
            self.popen = subprocess.Popen(CLI + args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=env, start_new_session=True)
        self.pid = self.popen.pid

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float) -> int | None:
        try:
            return self.popen.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """SIGKILL, as a power cut or the OOM killer would: no clean disconnect, no last words."""
        self._signal(signal.SIGKILL)
        self.popen.wait(timeout=10)

    def stop(self, grace_s: float = 10.0) -> None:
        if self.popen.poll() is None:
            self._signal(signal.SIGTERM)
            if self.wait(grace_s) is None:
                self._signal(signal.SIGKILL)
                self.popen.wait(timeout=10)
        self._signal(signal.SIGKILL)  # whatever is left in its process group

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def tail(self, n: int = 15) -> str:
        lines = self.output.strip().splitlines()[-n:]
        return f"--- {self.name} (exit {self.poll()})\n" + "\n".join(lines)


class Observer:
    """A plain client of the lab: keeps every status, round announcement, model and update it sees.
    Updates are reassembled without memory of earlier ones, so a re-sent update is seen again."""

    def __init__(self, url: str, fleet: str, watch_updates: bool = True):
        self.topics = Topics(fleet)
        self.events: queue.Queue[tuple[str, str, bytes]] = queue.Queue()
        self.models: dict[str, bytes] = {}
        self.rounds: dict[int, RoundTask] = {}
        self.updates: dict[str, list[bytes]] = {}
        self._models = chunking.Reassembler(max_messages=8, max_bytes=1 << 30)
        self._updates = chunking.Reassembler(max_messages=64, max_bytes=1 << 28, remember=0)
        self.client = MqttClient(url, f"pqsu-lab-observer-{os.getpid()}-{fleet}", persistent_session=False)
        t = self.topics
        watched = [(t.status_filter, self._on_status), (t.round, self._on_round), (t.model_filter, self._on_model)]
        if watch_updates:  # off when the lab itself floods the update topics with garbage
            watched.append((t.update_filter, self._on_update))
        for f, handler in watched:
            self.client.subscribe(f, handler)
        self.client.connect(timeout_s=15)

    def _on_status(self, topic: str, payload: bytes, retained: bool) -> None:
        if payload:
            self.events.put(("status", topic.rsplit("/", 1)[1], payload))

    def _on_round(self, topic: str, payload: bytes, retained: bool) -> None:
        try:
            if message_type(payload) == "round":
                task = RoundTask.from_json(payload)
                self.rounds[task.round] = task
        except MessageError:
            pass
        self.events.put(("round", "", payload))

    def _on_model(self, topic: str, payload: bytes, retained: bool) -> None:
        if payload and (data := self._models.add(payload, "model")) is not None:
            self.models[model_id.verify(data)] = data

    def _on_update(self, topic: str, payload: bytes, retained: bool) -> None:
        device = topic.rsplit("/", 1)[1]
        if (data := self._updates.add(payload, device)) is not None:
            self.updates.setdefault(device, []).append(data)

    def wait_for(self, predicate: Callable[[str, str, bytes], bool], timeout_s: float,
                 alive: Callable[[], bool] = lambda: True) -> tuple[str, str, bytes] | None:
        """The first (kind, device, payload) event for which predicate holds, or None after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and alive():
            try:
                event = self.events.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                if predicate(*event):
                    return event
            except (MessageError, ValueError):
                continue
        return None

    def close(self) -> None:
        self.client.close()


def status_is(device: str, *states: str, round_: int | None = None):
    def check(kind: str, dev: str, payload: bytes) -> bool:
        if kind != "status" or dev != device:
            return False
        s = Status.from_json(payload)
        return s.state in states and (round_ is None or s.round == round_)
    return check


def round_announced(n: int):
    return lambda kind, dev, payload: (kind == "round" and message_type(payload) == "round"
                                       and RoundTask.from_json(payload).round == n)


class Lab:
    """One scenario's world: a folder, a Mosquitto, the processes started and an observer."""

    def __init__(self, folder: Path, fleet: str, watch_updates: bool = True):
        self.folder, self.fleet = Path(folder), fleet
        self.folder.mkdir(parents=True, exist_ok=True)
        self.broker = Mosquitto(self.folder / "broker").start()
        self.procs: list[Proc] = []
        self.observer = Observer(self.broker.url, fleet, watch_updates)
        self.logs = self.folder / "logs"

    def cloud(self, out: Path, *, rounds: int, clients: int, min_devices: int, round_timeout: float,
              name: str = "cloud") -> Proc:
        args = ["cloud", "--broker", self.broker.url, "--fleet", self.fleet, "--min-devices", str(min_devices),
                "--round-timeout", str(round_timeout), "--join-timeout", "120", "--out", str(out)]
        return self.start(args + flags(clients=clients, rounds=rounds, **TINY), name)

    def agent(self, device: str, data: Path, name: str | None = None) -> Proc:
        return self.start(["edge", "run", "--broker", self.broker.url, "--fleet", self.fleet, "--device-id", device,
                           "--data", str(data), "--state-dir", str(data.parent), "--torch-threads", "1", "--no-http"],
                          name or device)

    def start(self, args: list[str], name: str) -> Proc:
        proc = Proc(args, self.logs, name)
        self.procs.append(proc)
        return proc

    def tails(self) -> str:
        return "\n".join(p.tail() for p in self.procs)

    def close(self) -> None:
        try:
            self.observer.close()
        finally:
            for p in self.procs:
                p.stop(grace_s=5)
            self.broker.close()

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_shards(folder: Path, clients: int, samples: int = TINY["samples_per_client"],
                 proxy: int = TINY["proxy_samples"], seed: int = 0) -> list[Path]:
    """Per-device .npz shards split as `pqsu run` splits them (the cloud's proxy first, then devices)."""
    from pqsu.export.datasets import load_dataset
    from pqsu.export.partition import federated_split

    train = load_dataset("fashion-mnist", "train")
    _, parts = federated_split(train.y, proxy, clients, "dirichlet:0.5", seed, samples)
    paths = []
    for i, idx in enumerate(parts):
        path = folder / f"dev-{i:03d}" / "data.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, x=train.x[idx], y=train.y[idx])
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


def wait_until(condition: Callable[[], bool], timeout_s: float, every_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every_s)
    return condition()


class ScenarioFailed(AssertionError):
    """A scenario could not reach the state it needed (a process died, a wait ran out)."""


def expect(ok, message: str, lab: Lab | None = None) -> None:
    if not ok:
        raise ScenarioFailed(message + ("\n" + lab.tails() if lab else ""))


def shutdown(procs: list[Proc], timeout_s: float) -> dict[str, int | None]:
    """Exit codes once each process ended by itself (None: still running after timeout_s)."""
    deadline = time.monotonic() + timeout_s
    return {p.name: p.wait(deadline - time.monotonic()) for p in procs}

