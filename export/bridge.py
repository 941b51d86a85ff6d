"""int8 ONNX -> torch: the board's way from the downlinked model to fine-tuning.

Each weight in a QDQ model is an int8 initializer feeding a DequantizeLinear node with
its scale and zero point; dequantizing it gives back the fp32 weight within half a
quantization step (round-to-nearest, symmetric, no clipping since the scale is set by
the largest magnitude). Biases are int32 with scale = input scale x weight scale, far
finer. BatchNorm was folded into the convs before export, so the rebuilt model is the
architecture with `batchnorm=False`, whose parameters are exactly the initializers.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Collection
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from pqsu.export.custom import build_any
from pqsu.export.zoo import ModelSpec, ZooError
from pqsu.protocol.errors import PqsuError
from pqsu.protocol.model_id import ModelIdError, VerifiedModel, as_verified
from pqsu.protocol.model_info import ModelInfo, ModelInfoError

QUANTIZED_SUFFIX = "_quantized"


class BridgeError(PqsuError):
    """The file is not an fl-pqsu int8 model, or does not fit its declared architecture."""


@dataclasses.dataclass
class Int8Weights:
    info: ModelInfo
    values: dict[str, np.ndarray]  # dequantized float32, by torch parameter name
    steps: dict[str, np.ndarray]   # quantization step of each entry (broadcastable), for error bounds


Source = str | Path | bytes | VerifiedModel  # a VerifiedModel is not hashed again


def read_int8_weights(source: Source) -> Int8Weights:
    """Dequantize every weight initializer of an fl-pqsu int8 ONNX file."""
    weights = read_weights(source)
    if weights.info.precision != "int8" or not any(s.any() for s in weights.steps.values()):
        raise BridgeError("not an int8 model: it has no int8 weights (quantize it with `pqsu export`)")
    return weights


def read_weights(source: Source) -> Int8Weights:
    """The weights of an fl-pqsu ONNX file, int8 (dequantized) or fp32 (steps are zero).

    The file is parsed once: its metadata and its initializers come from the same proto."""
    data = source if isinstance(source, (bytes, VerifiedModel)) else _read(source)
    try:
        proto = onnx.load_from_string(as_verified(data).data)
        info = ModelInfo.from_props(proto.metadata_props)
    except (ModelIdError, ModelInfoError) as exc:
        raise BridgeError(str(exc)) from None
    except Exception as exc:  # protobuf decode errors have no common public type
        raise BridgeError(f"not a readable ONNX file: {exc}") from None
    inits = {t.name: t for t in proto.graph.initializer}
    values: dict[str, np.ndarray] = {}
    steps: dict[str, np.ndarray] = {}
    for node in proto.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        q = numpy_helper.to_array(inits[node.input[0]])
        scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        zero = numpy_helper.to_array(inits[node.input[2]]).astype(np.int64) if len(node.input) > 2 else 0
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if scale.ndim == 1 and q.ndim > 1:  # per-channel: broadcast along `axis`
            shape = [1] * q.ndim
            shape[axis] = -1
            scale, zero = scale.reshape(shape), np.reshape(zero, shape) if np.ndim(zero) else zero
        name = node.input[0].removesuffix(QUANTIZED_SUFFIX)
        values[name] = ((q.astype(np.int64) - zero) * scale).astype(np.float32)
        steps[name] = np.broadcast_to(scale, q.shape)
    for name, tensor in inits.items():  # fp32 models, and weights the quantizer left in fp32
        if tensor.data_type == onnx.TensorProto.FLOAT and name not in values and "." in name:
            values[name] = numpy_helper.to_array(tensor).astype(np.float32)
            steps[name] = np.zeros(values[name].shape, np.float32)
    return Int8Weights(info, values, steps)


def worst_error_in_steps(reference: dict[str, np.ndarray], weights: Int8Weights) -> float:
    """Largest |reference - dequantized| in quantization steps, over all weights.

    float32 rounding of the reference itself (2 ulp) is allowed for: int32 bias steps
    are so fine that they reach it. The design bound is 0.5.
    """
    worst = 0.0
    for name, ref in reference.items():
        if name not in weights.values or not weights.steps[name].any():
            continue
        slack = 2 * np.finfo(np.float32).eps * np.abs(ref)
        err = np.maximum(np.abs(ref - weights.values[name]) - slack, 0.0)
        worst = max(worst, float((err / np.maximum(weights.steps[name], np.finfo(np.float32).tiny)).max()))
    return worst


def torch_model_from_int8(source: Source, *,
                          allow_custom: bool | Collection[str] = False) -> tuple[nn.Module, ModelInfo]:
    """Rebuild the torch model an int8 ONNX file was exported from, with its dequantized weights."""
    return _rebuild(read_int8_weights(source), allow_custom)


def torch_model_from_onnx(source: Source, *,
                          allow_custom: bool | Collection[str] = False) -> tuple[nn.Module, ModelInfo]:
    """Like `torch_model_from_int8`, but fp32 fl-pqsu files are accepted too (the FedAvg baseline)."""
    return _rebuild(read_weights(source), allow_custom)


def _rebuild(weights: Int8Weights, allow_custom: bool | Collection[str]) -> tuple[nn.Module, ModelInfo]:
    try:
        spec = dataclasses.replace(ModelSpec.from_dict(weights.info.spec), batchnorm=False)
        model = build_any(spec, allow_custom=allow_custom)
    except ZooError as exc:  # the file declares an architecture this board cannot build
        raise BridgeError(f"cannot rebuild the model the file declares: {exc}") from None
    load_weights(model, weights.values)
    return model.eval(), weights.info


def load_weights(model: nn.Module, values: dict[str, np.ndarray]) -> None:
    """Copy named arrays into the model's parameters, refusing any mismatch."""
    own = model.state_dict()
    missing = sorted(set(own) - set(values))
    wrong = [f"{k}: file {values[k].shape} vs model {tuple(v.shape)}" for k, v in own.items()
             if k in values and values[k].shape != tuple(v.shape)]
    if missing or wrong:
        raise BridgeError("the int8 weights do not fit the declared architecture: "
                          + "; ".join(([f"missing {missing[:5]}"] if missing else []) + wrong[:5]))
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(values[k])) for k in own})


def _read(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise BridgeError(f"cannot read {path}: {exc.strerror}") from None
