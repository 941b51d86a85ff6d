"""Int8 ONNX inference on a board: onnxruntime and numpy only (no torch, no onnx).

An `InferenceModel` is immutable; the agent builds a new one for each model version and
swaps the reference, so a request in flight finishes on the model it started with and
the next one uses the new model: no gap, no lock on the hot path.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from pqsu.protocol import model_id
from pqsu.protocol.errors import PqsuError
from pqsu.protocol.model_info import ModelInfo


class InferenceError(PqsuError):
    """An input the model cannot take."""


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


class InferenceModel:
    def __init__(self, data: bytes, *, providers: list[str] | None = None, threads: int | None = None):
        model_id.verify(data)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        available = ort.get_available_providers()
        chosen = [p for p in (providers or ["CPUExecutionProvider"]) if p in available] or ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(data, opts, providers=chosen)
        except Exception as exc:  # onnxruntime raises its own exception types for a broken graph
            raise InferenceError(f"onnxruntime cannot load the model: {str(exc).splitlines()[0][:200]}") from None
        self.info = ModelInfo.from_metadata(self.session.get_modelmeta().custom_metadata_map)
        self.nbytes = len(data)
        self._input = self.session.get_inputs()[0].name

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

    @property
    def model_id(self) -> str:
        return self.info.model_id

    def prepare(self, x: np.ndarray) -> np.ndarray:
        """uint8 images are normalized with the model's own statistics; floats pass as they are."""
        x = np.asarray(x)
        shape = tuple(self.info.in_shape)
        if x.shape == shape:
            x = x[None]
        if x.ndim != 4 or x.shape[1:] != shape:
            raise InferenceError(f"input of shape {x.shape} does not fit the model's {shape} (batch first)")
        if x.dtype == np.uint8:
            mean = np.asarray(self.info.mean, np.float32).reshape(1, -1, 1, 1)
            std = np.asarray(self.info.std, np.float32).reshape(1, -1, 1, 1)
            return ((x.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)
        if not np.issubdtype(x.dtype, np.floating):
            raise InferenceError(f"input dtype {x.dtype}: give uint8 images or normalized floats")
        return x.astype(np.float32)

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        """(logits, milliseconds) for a batch."""
        batch = self.prepare(x)
        start = time.perf_counter()
        try:
            logits = self.session.run(None, {self._input: batch})[0]
        except Exception as exc:  # onnxruntime's own exception types
            raise InferenceError(f"onnxruntime failed on this input: {str(exc).splitlines()[0][:200]}") from None
        return logits, (time.perf_counter() - start) * 1e3

    def classify(self, x: np.ndarray) -> Prediction:
        """Predicted class, its name and the softmax probabilities of every sample of `x`."""
        logits, ms = self.predict(x)
        probs = softmax(logits)
        top = probs.argmax(axis=1)
        names = self.info.classes
        return Prediction(self.model_id, [int(i) for i in top],
                          [names[i] if i < len(names) else str(int(i)) for i in top],
                          [[float(p) for p in row] for row in probs], ms)
