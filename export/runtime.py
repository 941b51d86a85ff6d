"""The one onnxruntime session over an fl-pqsu model: what a board serves with, what the cloud
evaluates with and what the export report measures. onnxruntime and numpy only (no torch, no
onnx), so a board without torch imports it, and so does the cloud, which may not import the edge.

The file's id is checked once, when the `VerifiedModel` is made; a session built from one does
not hash it again. The metadata comes from onnxruntime's own parse of the file (its
`custom_metadata_map`): the board needs no onnx package to read it.
"""
from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort

from pqsu.protocol.errors import PqsuError
from pqsu.protocol.model_id import VerifiedModel, as_verified
from pqsu.protocol.model_info import ModelInfo

EVAL_BATCH = 256  # the cloud's evaluation and the export report run the held-out set in batches of this


class InferenceError(PqsuError):
    """A model onnxruntime cannot load, or an input the model cannot take."""


class OrtModel:
    """An immutable onnxruntime session with the file's fl-pqsu metadata."""

    def __init__(self, model: VerifiedModel | bytes, *, providers: list[str] | None = None,
                 threads: int | None = None):
        self.file = as_verified(model)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        available = ort.get_available_providers()
        chosen = [p for p in (providers or ["CPUExecutionProvider"]) if p in available] or ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(self.file.data, opts, providers=chosen)
        except Exception as exc:  # onnxruntime raises its own exception types for a broken graph
            raise InferenceError(f"onnxruntime cannot load the model: {str(exc).splitlines()[0][:200]}") from None
        self.info = ModelInfo.from_metadata(self.session.get_modelmeta().custom_metadata_map)
        self.nbytes = len(self.file)
        self._input = self.session.get_inputs()[0].name

    @property
    def model_id(self) -> str:
        return self.file.model_id

    def prepare(self, x: np.ndarray) -> np.ndarray:
        """A batch for the model from one sample of the shape its metadata declares (an image (C, H, W),
        a sensor window (C, L), a feature vector (F,)...) or a batch of them, the batch axis first.
        uint8 pixels are normalized with the model's own statistics; floats pass as they are."""
        x = np.asarray(x)
        shape = tuple(self.info.in_shape)
        if x.shape == shape:
            x = x[None]
        if x.ndim != len(shape) + 1 or x.shape[1:] != shape:
            raise InferenceError(f"input of shape {x.shape} does not fit the model's {shape}: give one sample of "
                                 f"that shape or a batch of them (N, {', '.join(map(str, shape))})")
        if len(x) == 0:
            raise InferenceError(f"empty batch {x.shape}: give at least one sample {shape}")
        if x.dtype == np.uint8:
            # One mean and std per channel (axis 1), broadcast over the sample's other axes, whatever their number.
            stats = (1, -1) + (1,) * (len(shape) - 1)
            mean = np.asarray(self.info.mean, np.float32).reshape(stats)
            std = np.asarray(self.info.std, np.float32).reshape(stats)
            return ((x.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)
        if not np.issubdtype(x.dtype, np.floating):
            raise InferenceError(f"input dtype {x.dtype}: give uint8 images or normalized floats")
        return x.astype(np.float32)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits of an already prepared float32 batch."""
        try:
            return self.session.run(None, {self._input: batch})[0]
        except Exception as exc:  # onnxruntime's own exception types
            raise InferenceError(f"onnxruntime failed on this input: {str(exc).splitlines()[0][:200]}") from None

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        """(logits, milliseconds) for a batch."""
        batch = self.prepare(x)
        start = time.perf_counter()
        logits = self.run(batch)
        return logits, (time.perf_counter() - start) * 1e3

    def logits(self, x: np.ndarray, batch_size: int = EVAL_BATCH) -> np.ndarray:
        """Logits of a whole data set, `predict` a batch at a time (the board's path, batched)."""
        if len(x) == 0:
            return np.zeros((0, len(self.info.classes)), np.float32)
        return np.concatenate([self.predict(x[i:i + batch_size])[0] for i in range(0, len(x), batch_size)])
