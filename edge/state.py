"""What a device remembers between rounds and across restarts.

The error-feedback residual is part of the model's training signal: losing it on a
reboot silently drops everything the device chose not to send. So the state is written
atomically (`pqsu.protocol.atomic`) after every round, as a plain `.npz` read back with
`allow_pickle=False`; nothing in it can execute code.
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pqsu.protocol.atomic import atomic_file
from pqsu.protocol.errors import PqsuError

_RESIDUAL, _PREVIOUS = "residual/", "previous/"


class StateError(PqsuError):
    """The device state file is unreadable."""


@dataclass
class DeviceState:
    residual: dict[str, np.ndarray] = field(default_factory=dict)  # what was not sent yet, per tensor
    previous: dict[str, np.ndarray] = field(default_factory=dict)  # last received global weights
    last_uploaded_loss: float | None = None
    last_round: int = -1
    rounds_joined: int = 0
    uploads: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    job: str = ""  # the coordinator job `last_round` belongs to: round numbers start again with every job

    def start_job(self, job: str) -> bool:
        """Follow `job` from now on; True when that is a change. The residual and previous weights belong
        to the old job's model and its rounds are not this job's, so they go; the device's totals stay."""
        if job == self.job:
            return False
        self.job, self.last_round, self.last_uploaded_loss = job, -1, None
        self.reset_tensors()
        return True

    def fits(self, shapes: dict[str, tuple[int, ...]]) -> bool:
        """True when the stored tensors belong to a model of these shapes."""
        return all(name in shapes and arr.shape == shapes[name]
                   for part in (self.residual, self.previous) for name, arr in part.items())

    def reset_tensors(self) -> None:
        """Forget residual and previous weights: the model's architecture changed (re-pruned)."""
        self.residual, self.previous = {}, {}

    def save(self, path: str | Path) -> None:
        meta = {k: getattr(self, k) for k in ("last_uploaded_loss", "last_round", "rounds_joined",
                                              "uploads", "bytes_up", "bytes_down", "job")}
        arrays = {_RESIDUAL + k: v for k, v in self.residual.items()}
        arrays.update({_PREVIOUS + k: v for k, v in self.previous.items()})
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        with atomic_file(path) as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> "DeviceState":
        """The saved state, or a fresh one when there is no file yet."""
        path = Path(path)
        if not path.exists():
            return cls()
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]).decode())
                state = cls(**meta)
                for key in z.files:
                    if key.startswith(_RESIDUAL):
                        state.residual[key[len(_RESIDUAL):]] = z[key]
                    elif key.startswith(_PREVIOUS):
                        state.previous[key[len(_PREVIOUS):]] = z[key]
                return state
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
            raise StateError(f"device state {path} is unreadable ({exc}); move it away to start fresh "
                             "(the unsent residual in it would be lost)") from None
