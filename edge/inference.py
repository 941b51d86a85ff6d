"""Int8 ONNX inference on a board: onnxruntime and numpy only (no torch, no onnx).

An `InferenceModel` is immutable; the agent builds a new one for each model version and
swaps the reference, so a request in flight finishes on the model it started with and
the next one uses the new model: no gap, no lock on the hot path.
"""
from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort

from pqsu.protocol import model_id
from pqsu.protocol.errors import PqsuError
from pqsu.protocol.model_info import ModelInfo


class InferenceError(PqsuError):
    """An input the model cannot take."""


class InferenceModel:
    def __init__(self, data: bytes, *, providers: list[str] | None = None, threads: int | None = None):
        model_id.verify(data)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        available = ort.get_available_providers()
        chosen = [p for p in (providers or ["CPUExecutionProvider"]) if p in available] or ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(data, opts, providers=chosen)
        self.info = ModelInfo.from_metadata(self.session.get_modelmeta().custom_metadata_map)
        self.nbytes = len(data)
        self._input = self.session.get_inputs()[0].name

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
        logits = self.session.run(None, {self._input: batch})[0]
        return logits, (time.perf_counter() - start) * 1e3
