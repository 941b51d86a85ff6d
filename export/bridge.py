"""int8 ONNX -> torch: the board's way from the downlinked model to fine-tuning.

Each weight in a QDQ model is an int8 initializer feeding a DequantizeLinear node with
its scale and zero point; dequantizing it gives back the fp32 weight within half a
quantization step (round-to-nearest, symmetric, no clipping since the scale is set by
the largest magnitude). Biases are int32 with scale = input scale x weight scale, far
finer. BatchNorm was folded into the convs before export, so the rebuilt model is the
architecture with `batchnorm=False`, whose parameters are exactly the initializers (a few
under a reshaped shape, GroupNorm's (C, 1, 1) for its (C,): see `pqsu.export.param_names`).

`check_bridge` is the export's own proof that a board can do this: it rebuilds the model from
the file as a board would, accounts for every initializer and fails above the half-step bound.
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
from pqsu.export.training import TrainConfig, train  # the board's own fine-tune loop
from pqsu.export.zoo import ModelSpec
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
    """Largest |reference - dequantized| in quantization steps, over all quantized weights.

    float32 rounding of the reference itself (2 ulp) is allowed for: int32 bias steps
    are so fine that they reach it. The design bound is 0.5. A reference weight the file
    does not hold is a BridgeError, never skipped.
    """
    missing = sorted(set(reference) - set(weights.values))
    if missing:
        raise BridgeError(f"the file does not hold {missing[:5]}: it was not exported from this model")
    worst = 0.0
    for name, ref in reference.items():
        step = weights.steps[name]
        if not step.any():
            continue
        ref = np.asarray(ref, np.float32).reshape(step.shape)
        slack = 2 * np.finfo(np.float32).eps * np.abs(ref)
        err = np.maximum(np.abs(ref - weights.values[name]) - slack, 0.0)
        worst = max(worst, float((err / np.maximum(step, np.finfo(np.float32).tiny)).max()))
    return worst


BOUND_STEPS = 0.5
ROUNDING_SLACK_STEPS = 1e-3  # the float32 division inside the quantizer's rounding


@dataclasses.dataclass(frozen=True)
class BridgeCheck:
    """What the int8 file holds and how close the model rebuilt from it is to the exported one."""

    worst_steps: float       # largest |exported - rebuilt| of a quantized parameter, in its quantization steps
    worst_fp32_abs: float    # largest |exported - rebuilt| of a parameter the file keeps in fp32
    parameters: int          # parameters of the rebuilt model, every one found in the file
    quantized: int           # of which stored as int8 / int32
    quantization: int        # scale and zero-point initializers
    constants: tuple[str, ...]  # initializers of the graph's own (shapes, InstanceNorm's ones), no parameter


def check_bridge(reference: dict[str, np.ndarray], source: Source, *, allow_custom: bool = True,
                 fine_tune_on: tuple[np.ndarray, np.ndarray] | None = None) -> BridgeCheck:
    """Rebuild the model from an int8 file as a board does and compare it with `reference` (the state
    dict it was exported from). A BridgeError, one line, when the file cannot be loaded back, when
    a parameter is missing on either side, or when an error exceeds half a quantization step.

    With `fine_tune_on` (normalized samples, labels), the rebuilt model also takes one SGD step on them,
    as a board's fine-tune does: a BridgeError if that raises or its loss is not finite."""
    file = as_verified(source if isinstance(source, (bytes, VerifiedModel)) else _read(source))
    weights = read_int8_weights(file)
    model, _ = _rebuild(weights, allow_custom)
    rebuilt = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    extra, absent = sorted(set(reference) - set(rebuilt)), sorted(set(rebuilt) - set(reference))
    if extra or absent:
        raise BridgeError("the model rebuilt from the int8 file does not have the exported model's parameters: "
                          + "; ".join(([f"not rebuilt {extra[:5]}"] if extra else []) +
                                      ([f"not exported {absent[:5]}"] if absent else [])))
    worst_steps, worst_abs, where, quantized = 0.0, 0.0, "", 0
    for name, ref in reference.items():
        got, step = rebuilt[name], weights.steps[name].reshape(rebuilt[name].shape)
        ref = np.asarray(ref, np.float32).reshape(got.shape)
        err = np.maximum(np.abs(ref - got) - 2 * np.finfo(np.float32).eps * np.abs(ref), 0.0)
        if step.any():
            quantized += 1
            e = float((err / np.maximum(step, np.finfo(np.float32).tiny)).max()) if err.size else 0.0
            if e > worst_steps:
                worst_steps, where = e, name
        elif err.size:
            worst_abs = max(worst_abs, float(err.max()))
    if worst_steps > BOUND_STEPS + ROUNDING_SLACK_STEPS:
        raise BridgeError(f"bridge check failed: {where} rebuilt from the int8 file is {worst_steps:.3f} quantization "
                          f"steps from the exported weights (bound {BOUND_STEPS}): the file does not hold this model")
    if worst_abs > 0:
        raise BridgeError(f"bridge check failed: a parameter the file keeps in fp32 differs from the exported one "
                          f"by {worst_abs:.3g}")
    if fine_tune_on is not None:
        _check_fine_tune_step(model, *fine_tune_on)
    inits = _initializer_roles(file.data, set(reference))
    return BridgeCheck(worst_steps, worst_abs, len(reference), quantized, inits["quantization"],
                       tuple(sorted(inits["constants"])))


def _check_fine_tune_step(model: nn.Module, x: np.ndarray, y: np.ndarray) -> None:
    try:
        with torch.random.fork_rng(devices=[]):  # `train` seeds torch: the caller's random stream goes on as it was
            stats = train(model, x, y, TrainConfig(epochs=1, batch_size=max(len(x), 1)))
    except Exception as exc:  # the user's forward in training mode can raise anything
        first = (str(exc).strip().splitlines() or [""])[0]
        raise BridgeError(f"the model rebuilt from the int8 file cannot take a fine-tune step: "
                          f"{type(exc).__name__}: {first}"[:400]) from None
    if not np.isfinite(stats.loss):
        raise BridgeError(f"the model rebuilt from the int8 file cannot take a fine-tune step: its loss is {stats.loss}")


def _initializer_roles(data: bytes, params: set[str]) -> dict:
    """Every initializer as a parameter, a quantization parameter or a constant of the graph itself."""
    proto = onnx.load_from_string(data)
    quant = {i for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") for i in n.input[1:]}
    constants = []
    for t in proto.graph.initializer:
        if t.name in quant:
            continue
        if t.name.removesuffix(QUANTIZED_SUFFIX) not in params:
            constants.append(t.name)
    return {"quantization": len(quant), "constants": constants}


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
    except PqsuError as exc:  # the file declares an architecture this board cannot build (or shrink to its widths)
        raise BridgeError(f"cannot rebuild the model the file declares: {exc}") from None
    load_weights(model, weights.values)
    return model.eval(), weights.info


def load_weights(model: nn.Module, values: dict[str, np.ndarray]) -> None:
    """Copy named arrays into the model's parameters, refusing any mismatch."""
    own = model.state_dict()
    missing = sorted(set(own) - set(values))
    wrong = [f"{k}: file {values[k].shape} vs model {tuple(v.shape)}" for k, v in own.items()
             if k in values and not same_entries(values[k].shape, tuple(v.shape))]
    if missing or wrong:
        raise BridgeError("the int8 weights do not fit the declared architecture: "
                          + "; ".join(([f"missing {missing[:5]}"] if missing else []) + wrong[:5]))
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(values[k]).reshape(tuple(v.shape)))
                           for k, v in own.items()})


def same_entries(file_shape: tuple[int, ...], model_shape: tuple[int, ...]) -> bool:
    """True when a file tensor holds a parameter as it is or reshaped by unit axes only ((C, 1, 1) for (C,))."""
    return tuple(file_shape) == tuple(model_shape) or \
        [d for d in file_shape if d != 1] == [d for d in model_shape if d != 1]


def _read(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise BridgeError(f"cannot read {path}: {exc.strerror}") from None
