"""fp32 ONNX -> int8 ONNX: static QDQ, per-channel symmetric int8 weights, calibrated.

Static QDQ is the layout onnxruntime runs fastest on CPUs with int8 kernels, and it
keeps every weight as an (int8 initializer, scale, zero point) triple under the
original tensor name, which is what `bridge` reads back. Dynamic quantization is not
offered: it makes conv nets several times slower.
"""
from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import onnxruntime
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from pqsu.export.onnx_export import write_with_info
from pqsu.protocol import model_id
from pqsu.protocol.errors import PqsuError
from pqsu.protocol.model_info import ModelInfo

log = logging.getLogger(__name__)


METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
           "percentile": CalibrationMethod.Percentile}


class QuantizeError(PqsuError):
    """Quantization could not run (no calibration data, unsupported graph)."""


class ArrayCalibrationReader(CalibrationDataReader):
    """Feeds already-normalized samples (N, C, H, W) float32 to the calibrator in batches.

    The plug-in point for users: any `CalibrationDataReader` works in `quantize_int8`.
    """

    def __init__(self, samples: np.ndarray, input_name: str = "input", batch_size: int = 32):
        if len(samples) == 0:
            raise QuantizeError("calibration needs at least one sample")
        self.samples = np.ascontiguousarray(samples, dtype=np.float32)
        self.input_name, self.batch_size = input_name, batch_size
        self._it: Iterator[dict] | None = None

    def get_next(self) -> dict | None:
        if self._it is None:
            self._it = ({self.input_name: self.samples[i:i + self.batch_size]}
                        for i in range(0, len(self.samples), self.batch_size))
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = None


def quantize(fp32: bytes, info: ModelInfo, calibration: CalibrationDataReader, *,
             method: str = "minmax") -> tuple[onnx.ModelProto, ModelInfo]:
    """A serialized fp32 ONNX model quantized to int8, and its info (precision int8, id to be stamped).

    The one stretch on disk, because onnxruntime's tools need paths: `quant_pre_process` takes
    the model as a file (given a ModelProto it moves the weights to external data its optimizer
    then cannot read) and writes its result to one, `quantize_static` writes to a path only, and
    both make temporary files of their own (optimizer output, shape inference, calibration graph).
    """
    _check_method(method)
    with tempfile.TemporaryDirectory() as tmp:
        src, pre, out = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(fp32)
        _preprocess(src, pre, Path(tmp) / "optimized.onnx")
        try:
            quantize_static(str(pre), str(out), calibration, quant_format=QuantFormat.QDQ, per_channel=True,
                            weight_type=QuantType.QInt8, activation_type=QuantType.QInt8,
                            calibrate_method=METHODS[method],
                            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
        except ValueError as exc:  # e.g. "No data is collected." from a reader that yields nothing
            raise QuantizeError(f"calibration failed: {exc}") from None
        return onnx.load(str(out)), dataclasses.replace(info, precision="int8")


# onnxruntime's pass that makes equal small initializers one: two freshly initialized layers' zero
# biases would become a single tensor under one of their names, and the other parameter would be
# gone from the file (no bridge, no requantizer, no update codec could find it).
SHARING_PASS = "ConstantSharing"


def _preprocess(src: Path, pre: Path, optimized: Path) -> None:
    """`quant_pre_process` (graph clean-up, then shape inference: the quantizer needs shapes to pick
    per-channel axes), but its optimizer run without SHARING_PASS, so every parameter keeps its own
    initializer under its own name whatever its values."""
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(optimized)
    try:
        onnxruntime.InferenceSession(str(src), options, providers=["CPUExecutionProvider"],
                                     disabled_optimizers=[SHARING_PASS])
    except Exception as exc:  # onnxruntime's load errors have no common public type
        raise QuantizeError(f"onnxruntime cannot load the exported graph: {str(exc).strip().splitlines()[0]}") from None
    quant_pre_process(str(optimized), str(pre), skip_optimization=True, skip_symbolic_shape=True)


def quantize_int8(fp32_path: str | Path, int8_path: str | Path, calibration: CalibrationDataReader,
                  *, method: str = "minmax") -> ModelInfo:
    """Quantize an fl-pqsu fp32 ONNX file; the int8 file gets the same metadata and a new id."""
    _check_method(method)
    file = model_id.verified(Path(fp32_path).read_bytes())
    info = ModelInfo.from_props(onnx.load_from_string(file.data).metadata_props)
    int8, info = quantize(file.data, info, calibration, method=method)
    return write_with_info(int8, int8_path, info)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise QuantizeError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
