"""Int8 ONNX inference on a board: onnxruntime and numpy only (no torch, no onnx).

The session itself is `pqsu.export.runtime.OrtModel`, the one the cloud evaluates with, so
the accuracy the coordinator reports comes from the code path boards serve with. This module
adds what the board's API answers: class names and softmax probabilities.

An `InferenceModel` is immutable; the agent builds a new one for each model version and
swaps the reference, so a request in flight finishes on the model it started with and
the next one uses the new model: no gap, no lock on the hot path.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pqsu.export.runtime import InferenceError, OrtModel
from pqsu.protocol.errors import PqsuError

__all__ = ["InferenceError", "InferenceModel", "Prediction", "softmax"]


@dataclass(frozen=True)
class Prediction:
    """Classes, their names and softmax probabilities for a batch, as `/predict` answers."""

    model_id: str
    predictions: list[int]
    labels: list[str]
    probabilities: list[list[float]]
    latency_ms: float

    def to_dict(self) -> dict:
        return {"model_id": self.model_id, "predictions": self.predictions, "labels": self.labels,
                "probabilities": self.probabilities, "latency_ms": round(self.latency_ms, 3)}


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class InferenceModel(OrtModel):
    """A model a board serves: built from bytes (verified here) or a `VerifiedModel` (not hashed again)."""

    @classmethod
    def from_file(cls, path: str | Path, **kwargs) -> "InferenceModel":
        """A model file on disk; every problem (missing, not an fl-pqsu model, corrupt) is a PqsuError."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise InferenceError(f"model file {path} does not exist") from None
        except OSError as exc:
            raise InferenceError(f"cannot read model file {path}: {exc.strerror or exc}") from None
        try:
            return cls(data, **kwargs)
        except PqsuError as exc:
            raise type(exc)(f"{path}: {exc}") from None

    def classify(self, x: np.ndarray, *, raw: bool = False) -> Prediction:
        """Predicted class, its name and the softmax probabilities of every sample of `x` (`raw`: readings
        as measured, see `from_raw`)."""
        logits, ms = self.predict(self.from_raw(x) if raw else x)
        probs = softmax(logits)
        top = probs.argmax(axis=1)
        names = self.info.classes
        return Prediction(self.model_id, [int(i) for i in top],
                          [names[i] if i < len(names) else str(int(i)) for i in top],
                          [[float(p) for p in row] for row in probs], ms)

    def from_raw(self, x: np.ndarray) -> np.ndarray:
        """Readings as a sensor measured them, normalized as the model's training data was: (x - mean) / std
        per channel with the file's own statistics. Only for a model of float readings (its metadata says
        input = readings); a pixel model normalizes uint8 images itself."""
        if self.info.extra.get("input") != "readings":
            raise InferenceError("raw inputs are for models of sensor readings; this model takes uint8 pixels or "
                                 "normalized floats")
        x = np.asarray(x)
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise InferenceError(f"input dtype {x.dtype}: give numbers")
        shape = tuple(self.info.in_shape)
        batch = x[None] if x.shape == shape else x
        if batch.ndim != len(shape) + 1:
            return x  # not a sample nor a batch: `prepare` says so, in the words it uses for every input
        stats = (1, -1) + (1,) * (len(shape) - 1)
        mean = np.asarray(self.info.mean, np.float32).reshape(stats)
        std = np.asarray(self.info.std, np.float32).reshape(stats)
        return ((batch.astype(np.float32) - mean) / std).astype(np.float32)
