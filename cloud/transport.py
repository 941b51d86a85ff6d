"""How the round runner reaches devices: the transport interface and its in-process implementation.

`RoundRunner` (cloud/rounds.py) holds all round logic and talks to devices only through a
`Transport`. Two implement it: `InProcessTransport` here (devices are learners called
directly: `pqsu simulate` and the benchmarks) and `MqttTransport` in cloud/coordinator.py
(`pqsu cloud`). A transport moves bytes and says who is there; it never judges an update
(the runner hands every payload to `FederatedServer.submit`).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from pqsu.protocol.errors import PqsuError
from pqsu.protocol.messages import RoundTask
from pqsu.protocol.model_follow import ModelFollower

DEFAULT_CHUNK_LIMIT = 128 * 1024  # the MQTT coordinator's default (the AWS IoT cap)

# What a device's answer can say: an update (payload), or its status after being asked.
UPDATE = "update"
ANSWERS = ("skipped", "failed", "offline")  # statuses that answer a round without an update
COUNTED = "counted"  # an update an aggregator worker accepted (cloud/workers.py): the device answered


@dataclass(frozen=True)
class Message:
    """One thing a device sent: an update payload, or a status (`kind` is its state, e.g. "skipped",
    "failed", "offline", "online", "training"; `round` the round it refers to)."""

    device: str             # the device the transport vouches for (its topic, its learner)
    kind: str
    payload: bytes = b""
    round: int | None = None


class Transport(Protocol):
    """What the round runner needs from the way devices are reached. Called from one thread."""

    def start(self) -> None:
        """Connect (or nothing): called once before the first round."""

    def stop(self) -> None:
        """Disconnect: called once at the end, also after an error."""

    def wait_for_devices(self, needed: int, wait_s: float | None, stop: threading.Event,
                         admits: Callable[[str], bool]) -> list[str]:
        """The devices that may be asked now (admitted ones that train and are online), once at
        least `needed` are; raise PqsuError when they are not there within `wait_s`."""

    chunk_limit: int  # the frame size models and patches are split to (their bytes on the wire)

    def publish_model(self, data: bytes, model_id: str, patches: Mapping[str, bytes]) -> None:
        """Make the model file available to devices (a transport may skip an unchanged model), and the
        patches to it from each base in `patches` (base model id -> patch bytes)."""

    def announce(self, task: RoundTask) -> None:
        """Ask `task.devices` to train `task` on the published model."""

    def backlog(self) -> list[Message]:
        """Messages that arrived before the round opened and may belong to it (handled first)."""

    def poll(self, timeout_s: float) -> Message | None:
        """The next message, or None when none came within `timeout_s`."""

    def quiet(self) -> bool:
        """True when no answer can come any more this round (the runner stops waiting)."""

    def close_round(self, task: RoundTask) -> None:
        """The round is over: tell devices, so one that joins late does not train for it."""

    def take_refused(self) -> dict[str, int]:
        """Messages refused before reaching the server since the last call, by reason."""

    def downloads(self) -> dict[str, dict]:
        """What each device that took part in the round downloaded for its model, as the device
        counted it: {"kind": "patch" | "full" | "", "bytes": on the wire, "first": its first model}."""

    def evaluations(self) -> dict[str, dict]:
        """Federated evaluation: each device's report of the round's model on its held-out samples, before it
        trained ({"accuracy", "loss", "samples"}, from its "uploaded" or "skipped" status), by device."""

    def round_extras(self) -> dict:
        """Transport-specific keys for the round's report (e.g. per-device timings)."""

    def publish_report(self, report: dict) -> None:
        """Publish a closed round's report (or nothing)."""

    def finish(self, data: bytes, model_id: str, rounds: int, patches: Mapping[str, bytes]) -> None:
        """Training is over: publish the final model (and the patches to it) and say so."""

    def state(self) -> dict:
        """What a checkpoint must carry for this transport to resume (merged into its meta)."""

    def summary(self) -> dict:
        """Transport-specific keys for the run's summary."""


class Learner(Protocol):
    """A device's learning side as the in-process transport calls it (`pqsu.edge.learner.EdgeLearner`)."""

    def run_round(self, task: RoundTask, model_file, downloaded: int | None = None): ...  # -> an outcome with `.payload` (None: skipped)


class InProcessTransport:
    """Devices are learners in this process, run one after another when polled.

    `tamper(device_id, payload)`, if given, replaces each payload before the server sees it
    (a misbehaving device, for the reliability measurements). Each round's report gets
    `devices`: every asked device's measured `run_round` wall time and upload bytes, which the
    radio model turns into simulated round times.

    Each device follows the model as an MQTT agent does (`ModelFollower`): the patch from the
    version it holds when one is published, else the full file, counted as framed with
    `chunk_limit`. `tamper_patch(device_id, patch)`, if given, replaces a patch on its way to a
    device (the refusal tests).
    """

    def __init__(self, learners: Mapping[str, Learner], *,
                 tamper: Callable[[str, bytes], bytes] | None = None,
                 tamper_patch: Callable[[str, bytes], bytes] | None = None,
                 chunk_limit: int = DEFAULT_CHUNK_LIMIT):
        self.learners, self.tamper, self.tamper_patch = dict(learners), tamper, tamper_patch
        self.chunk_limit = chunk_limit
        self.followers = {d: ModelFollower(name=d) for d in self.learners}
        self._model = b""
        self._patches: dict[str, bytes] = {}
        self._downloads: dict[str, dict] = {}
        self._evaluations: dict[str, dict] = {}
        self._task: RoundTask | None = None
        self._queue: list[str] = []
        self._timings: dict[str, dict] = {}

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def wait_for_devices(self, needed, wait_s, stop, admits) -> list[str]:
        online = sorted(d for d in self.learners if admits(d))
        if len(online) < needed:
            raise PqsuError(f"only {len(online)} of the {needed} devices needed are admitted")
        return online

    def publish_model(self, data: bytes, model_id: str, patches: Mapping[str, bytes] = {}) -> None:
        self._model, self._patches = data, dict(patches)

    def announce(self, task: RoundTask) -> None:
        self._task, self._queue, self._timings = task, [d for d in task.devices if d in self.learners], {}
        self._downloads, self._evaluations = {}, {}

    def backlog(self) -> list[Message]:
        return []

    def poll(self, timeout_s: float) -> Message | None:
        if not self._queue:
            return None
        device = self._queue.pop(0)
        t0 = time.perf_counter()
        file, how = self.followers[device].follow(self._task.model_id, self._task.patches, self._patch_for(device),
                                                  lambda: self._model, self.chunk_limit)
        self._downloads[device] = how.to_dict()
        outcome = self.learners[device].run_round(self._task, file, how.nbytes)
        self._timings[device] = {"seconds": time.perf_counter() - t0,
                                 "bytes_up": len(outcome.payload) if outcome.payload else 0}
        if getattr(outcome, "evaluation", None):
            self._evaluations[device] = outcome.evaluation
        if outcome.payload is None:
            return Message(device, "skipped", round=self._task.round)
        payload = self.tamper(device, outcome.payload) if self.tamper else outcome.payload
        return Message(device, UPDATE, payload, self._task.round)

    def _patch_for(self, device: str) -> Callable[[str], bytes]:
        def fetch(base: str) -> bytes:
            patch = self._patches[base]
            return self.tamper_patch(device, patch) if self.tamper_patch else patch
        return fetch

    def quiet(self) -> bool:
        return not self._queue

    def downloads(self) -> dict[str, dict]:
        return dict(self._downloads)

    def evaluations(self) -> dict[str, dict]:
        return dict(self._evaluations)

    def close_round(self, task: RoundTask) -> None:
        self._task = None

    def take_refused(self) -> dict[str, int]:
        return {}

    def round_extras(self) -> dict:
        return {"devices": self._timings}

    def publish_report(self, report: dict) -> None:
        pass

    def finish(self, data: bytes, model_id: str, rounds: int, patches: Mapping[str, bytes]) -> None:
        self._model, self._patches = data, dict(patches)

    def state(self) -> dict:
        return {}

    def summary(self) -> dict:
        return {}
