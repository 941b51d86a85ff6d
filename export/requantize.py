"""Next int8 model between keyframes: the master requantized in place with the held scales.

A keyframe is a full `export_int8` (fresh weight scales, fresh activation calibration). Until
the next one, the coordinator only rewrites the values of the QDQ initializers of the file
devices hold: each int8 weight `q = clip(rint(w / s) + z, -127, 127)` with the keyframe's
per-channel `s` and `z`, each int32 bias `rint(b / s_b)` with its own held scale. No ONNX
export, no calibration, no re-serialization: the new values are written into a copy of the
base file's bytes at the offsets `pqsu.protocol.onnx_wire` finds, so the next file is the
base byte for byte except those values and the model id (stamped by `model_id.stamp`, as the
export stamps it). That is what makes `pqsu.protocol.patch` exact and small.

Rounding follows onnxruntime's quantizer (float32 division, round half to even; biases in
float64), so requantizing the weights a file was exported from gives back the same file.
Weights clip to [-127, 127], the symmetric range the quantizer uses for them, so a model
never holds -128 (the update codec refuses it, and dequantization stays symmetric).
Entries that clip are counted: held scales that are too small for the master is the drift
a keyframe policy acts on.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from pqsu.protocol import model_id
from pqsu.protocol.errors import PqsuError
from pqsu.protocol.onnx_wire import WireError, spans

QUANTIZED_SUFFIX = "_quantized"
EXPORTER_CONSTANT = re.compile(r"val_\d+")  # the exporter's anonymous constants; parameters keep torch names
WEIGHT_RANGE = (-127, 127)
_I32 = np.iinfo(np.int32)
CAP_SEARCH_STEPS = 5  # interpolation steps of capped_requantize: within a few changes of the most that fit


class RequantizeError(PqsuError):
    """The file is not an fl-pqsu QDQ model, or the master does not fit it."""


@dataclass(frozen=True)
class QdqTensor:
    """One quantized initializer: where its values sit in the file and how to requantize them."""

    name: str            # the torch parameter name (the initializer without "_quantized")
    kind: str            # "weight" (int8) or "bias" (int32)
    offset: int          # first byte of the values in the serialized file
    shape: tuple[int, ...]
    scale: np.ndarray    # held scale, shaped to broadcast against the tensor
    zero_point: np.ndarray
    scale_offset: int | None = None  # first byte of the float32 scale values in the file (None: not raw data)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype("i1") if self.kind == "weight" else np.dtype("<i4")

    def quantize(self, values: np.ndarray) -> tuple[np.ndarray, int]:
        """(quantized values, how many entries the held scale clipped)."""
        values = np.asarray(values)
        if values.shape != self.shape and values.size == int(np.prod(self.shape)) and \
                [d for d in values.shape if d != 1] == [d for d in self.shape if d != 1]:
            values = values.reshape(self.shape)  # a parameter the graph holds reshaped (GroupNorm's (C, 1, 1))
        if values.shape != self.shape:
            raise RequantizeError(f"{self.name}: master has shape {values.shape}, the model {self.shape}")
        if self.kind == "weight":  # as onnxruntime's quantize_nparray: float32 division, np.round
            q = np.round(values.astype(np.float32) / self.scale) + self.zero_point
            lo, hi = WEIGHT_RANGE
        else:  # as onnxruntime's quantize_bias_static_impl: float64 division
            q = np.round(values.astype(np.float64) / self.scale.astype(np.float64)) + self.zero_point
            lo, hi = _I32.min, _I32.max
        if not np.isfinite(q).all():
            raise RequantizeError(f"{self.name}: master values are not finite (or a held scale is 0)")
        clipped = int(np.count_nonzero((q < lo) | (q > hi)))
        return np.clip(q, lo, hi).astype(self.dtype), clipped

    def read(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, self.dtype, int(np.prod(self.shape)), self.offset).reshape(self.shape)


@dataclass(frozen=True)
class QdqLayout:
    """The quantized initializers of one keyframe's file; valid for every file patched from it."""

    tensors: dict[str, QdqTensor]
    length: int

    @classmethod
    def of(cls, data: bytes) -> "QdqLayout":
        try:
            proto = onnx.load_from_string(data)
            where = {s.key: s for s in spans(data) if s.kind == "tensor"}
        except WireError as exc:
            raise RequantizeError(f"not a readable ONNX file: {exc}") from None
        except Exception as exc:  # protobuf decode errors have no common public type
            raise RequantizeError(f"not a readable ONNX file: {exc}") from None
        inits = {t.name: t for t in proto.graph.initializer}
        tensors: dict[str, QdqTensor] = {}
        for node in proto.graph.node:
            if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
                continue  # activations: their DQ input is a QuantizeLinear output
            qname = node.input[0]
            init, span = inits[qname], where.get(qname)
            kind = {onnx.TensorProto.INT8: "weight", onnx.TensorProto.INT32: "bias"}.get(init.data_type)
            if kind is None or span is None or not init.HasField("raw_data"):
                raise RequantizeError(f"{qname}: not an int8 weight or int32 bias stored as raw bytes")
            shape = tuple(init.dims)
            scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
            zero = (numpy_helper.to_array(inits[node.input[2]]).astype(np.int64) if len(node.input) > 2
                    else np.zeros_like(scale, np.int64))
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            if scale.ndim == 1 and len(shape) > 1:  # per-channel along `axis`
                bshape = [1] * len(shape)
                bshape[axis] = -1
                scale, zero = scale.reshape(bshape), zero.reshape(bshape)
            name = qname.removesuffix(QUANTIZED_SUFFIX)
            s_span = where.get(node.input[1])
            s_at = s_span.start if s_span is not None and s_span.end - s_span.start == 4 * scale.size else None
            tensors[name] = QdqTensor(name, kind, span.start, shape, scale, zero, s_at)
        if not any(t.kind == "weight" for t in tensors.values()):
            raise RequantizeError("not an int8 QDQ model: no int8 weight initializers")
        return cls(tensors, len(data))


@dataclass
class Requantized:
    """The next model file, and what changed on the way from its base."""

    data: bytes
    model_id: str
    changed: dict[str, int] = field(default_factory=dict)   # entries that differ from the base
    clipped: dict[str, int] = field(default_factory=dict)   # weight entries the held scale clipped
    entries: dict[str, int] = field(default_factory=dict)   # entries per tensor

    @property
    def weights_changed(self) -> int:  # `clipped` has one key per int8 weight
        return sum(self.changed[k] for k in self.clipped)

    @property
    def weights_clipped(self) -> int:
        return sum(self.clipped.values())

    @property
    def weight_entries(self) -> int:
        return sum(self.entries[k] for k in self.clipped)


def saturate(master: Mapping[str, np.ndarray], layout: QdqLayout) -> int:
    """Clip the master's weights, in place, to what the held int8 scales represent; returns how many
    entries were beyond them. Devices only ever see a clipped weight at the range's end, and train from
    there; without this the master's own copy keeps moving outward on their updates, unseen, until a
    keyframe ships it (docs/design.md, "Downlink")."""
    lo, hi = WEIGHT_RANGE
    beyond = 0
    for name, t in layout.tensors.items():
        if t.kind != "weight" or name not in master:
            continue
        values = master[name]
        view = values.reshape(t.shape)
        if not np.shares_memory(view, values):
            raise RequantizeError(f"{name}: the master's array cannot be clipped in place")
        low = ((lo - t.zero_point) * t.scale).astype(view.dtype)
        high = ((hi - t.zero_point) * t.scale).astype(view.dtype)
        q = np.round(view.astype(np.float32) / t.scale) + t.zero_point  # counted as `quantize` counts clipping
        beyond += int(np.count_nonzero((q < lo) | (q > hi)))
        np.clip(view, low, high, out=view)
    return beyond


def requantize(base: bytes, master: Mapping[str, np.ndarray], *, layout: QdqLayout | None = None,
               keep: Mapping[str, np.ndarray] | None = None) -> Requantized:
    """The file that follows `base` for fp32 `master` (torch state_dict names, BN folded).

    `layout` (from `QdqLayout.of(keyframe)`) saves parsing the graph again. `keep`, if given,
    maps a weight name to a boolean mask of entries to leave at the base's value (a capped
    patch: see `capped_requantize`).
    """
    layout = layout or QdqLayout.of(base)
    if layout.length != len(base):
        raise RequantizeError("the layout is of another file (lengths differ): rebuild it from the keyframe")
    missing = sorted(n for n in set(layout.tensors) - set(master) if not EXPORTER_CONSTANT.fullmatch(n))
    if missing:
        raise RequantizeError(f"master lacks {missing[:5]}: not the model this file was exported from")
    out = bytearray(base)
    result = Requantized(b"", "")
    for name, t in layout.tensors.items():
        if name not in master:  # a constant of the graph itself (InstanceNorm's ones): no parameter moves it
            continue
        q, clipped = t.quantize(master[name])
        old = t.read(base)
        if keep is not None and name in keep:
            q = np.where(keep[name], old, q)
        result.changed[name] = int(np.count_nonzero(q != old))
        result.entries[name] = q.size
        if t.kind == "weight":
            result.clipped[name] = clipped
        if result.changed[name]:
            out[t.offset:t.offset + q.nbytes] = q.astype(t.dtype.newbyteorder("<")).tobytes()
    result.data, result.model_id = model_id.stamp(bytes(out))
    return result


def step_changes(base: bytes, master: Mapping[str, np.ndarray], layout: QdqLayout) -> dict[str, np.ndarray]:
    """Per weight, |change| of each int8 entry in fp32 units (0 where it does not change)."""
    out = {}
    for name, t in layout.tensors.items():
        if t.kind == "weight" and name in master:
            q, _ = t.quantize(master[name])
            dq = q.astype(np.int32) - t.read(base).astype(np.int32)
            out[name] = np.abs(dq * np.broadcast_to(t.scale, t.shape))
    return out


def deadband_keep(base: bytes, master: Mapping[str, np.ndarray], layout: QdqLayout,
                  band: float) -> dict[str, np.ndarray]:
    """Per int8 weight, the entries to leave at the base's value (`requantize(keep=...)`): those whose
    master value is at most `band` steps from it. 0.5 keeps none that would change; above it an entry
    has to move past the rounding boundary by a margin, so noise around a boundary does not flip it
    every round (hysteresis), and the devices' model stays within `band` steps of the master."""
    keep = {}
    for name, t in layout.tensors.items():
        if t.kind == "weight" and name in master:
            q, _ = t.quantize(master[name])  # shape checks; clipped entries move toward the range's end
            x = np.asarray(master[name], np.float32).reshape(t.shape) / t.scale + t.zero_point
            held = t.read(base)
            keep[name] = (np.abs(x - held) <= band) | (q == held)
    return keep


def capped_requantize(base: bytes, master: Mapping[str, np.ndarray], max_patch_bytes: int, *,
                      layout: QdqLayout | None = None) -> tuple[Requantized, int]:
    """The next file whose patch from `base` fits `max_patch_bytes`: the largest weight changes
    first (biases and metadata always go; if they alone exceed the cap, no weight changes).
    Returns (file, weight changes left out); what is left out stays in the master, so a later
    round sends it, as a device's error feedback does.
    """
    from pqsu.protocol.patch import make_patch

    layout = layout or QdqLayout.of(base)
    full = requantize(base, master, layout=layout)
    if len(make_patch(base, full.data)) <= max_patch_bytes:
        return full, 0
    moves = step_changes(base, master, layout)
    flat = np.concatenate([m.reshape(-1) for m in moves.values()])
    order = np.argsort(-flat, kind="stable")
    total = int(np.count_nonzero(flat))

    def attempt(k: int) -> Requantized:
        send = np.zeros(flat.size, bool)
        send[order[:k]] = True
        keep, at = {}, 0
        for name, m in moves.items():
            keep[name] = ~send[at:at + m.size].reshape(m.shape)
            at += m.size
        return requantize(base, master, layout=layout, keep=keep)

    # Patch size grows nearly linearly with the changes sent: interpolate between a k that fits and one
    # that does not (a few make_patch calls, not a bisection's dozen; the coordinator runs this each round).
    best = attempt(0)
    lo, size_lo = 0, len(make_patch(base, best.data))
    hi, size_hi = total, len(make_patch(base, full.data))
    for _ in range(CAP_SEARCH_STEPS):
        if hi - lo <= 1 or size_lo > max_patch_bytes:
            break
        target = max_patch_bytes - (max_patch_bytes - size_lo) // 64  # aim a little low: fewer misses
        mid = lo + (target - size_lo) * (hi - lo) // max(1, size_hi - size_lo)
        mid = min(max(mid, lo + 1), hi - 1)
        candidate = attempt(mid)
        size = len(make_patch(base, candidate.data))
        if size <= max_patch_bytes:
            lo, size_lo, best = mid, size, candidate
        else:
            hi, size_hi = mid, size
    return best, total - lo


def bias_of(weight: str) -> str:
    """The torch name of the bias quantized with `weight`'s scales (input scale x weight scale)."""
    return weight.removesuffix(".weight") + ".bias"


def rescale(base: bytes, layout: QdqLayout, factors: Mapping[str, np.ndarray]) -> tuple[bytes, QdqLayout]:
    """`base` with the per-channel scales of each weight in `factors` multiplied by its factors (one per
    channel along the DequantizeLinear axis, or one scalar), and its bias's scale with them, so the bias
    scale stays input scale x weight scale as QLinearConv / QLinearMatMul read it. Scales are float32
    raw data: the result has `base`'s layout, so it is patchable from `base`. Values are not
    requantized here: pass the returned layout to `requantize`. The model id is not restamped."""
    out, tensors = bytearray(base), dict(layout.tensors)
    for name, factor in factors.items():
        for t in (layout.tensors[name], layout.tensors.get(bias_of(name))):
            if t is None:
                continue
            if t.scale_offset is None:
                raise RequantizeError(f"{t.name}: its scale is not stored as raw float32: cannot rescale in place")
            f, held = np.asarray(factor, np.float32).reshape(-1), t.scale.reshape(-1)
            if f.size not in (1, held.size):
                raise RequantizeError(f"{t.name}: {f.size} scale factors for {held.size} channels")
            scale = (held * f).astype(np.float32)
            if not (np.isfinite(scale).all() and (scale > 0).all()):
                raise RequantizeError(f"{t.name}: rescaled scales must be finite and > 0")
            out[t.scale_offset:t.scale_offset + scale.nbytes] = scale.astype("<f4").tobytes()
            tensors[t.name] = QdqTensor(t.name, t.kind, t.offset, t.shape, scale.reshape(t.scale.shape),
                                        t.zero_point, t.scale_offset)
    return bytes(out), QdqLayout(tensors, layout.length)


def fitting_scales(layout: QdqLayout, master: Mapping[str, np.ndarray], headroom: float = 1.0,
                   only_clipping: bool = False) -> dict[str, np.ndarray]:
    """Per weight, the factor per channel that makes its held scale max|w| / 127 x `headroom` (the
    quantizer's symmetric scale, with room to grow). `only_clipping`: only channels whose values clip
    now, and only where that widens the scale."""
    factors = {}
    for name, t in layout.tensors.items():
        if t.kind != "weight":
            continue
        w = np.asarray(master[name], np.float32)
        axes = tuple(i for i in range(w.ndim) if t.scale.ndim == 0 or t.scale.shape[i] == 1)
        reach = np.abs(w).max(axis=axes, keepdims=True) if axes else np.abs(w)
        want = np.maximum(reach / WEIGHT_RANGE[1] * headroom, np.finfo(np.float32).tiny)
        f = (want / t.scale).reshape(-1).astype(np.float32)
        if only_clipping:
            f = np.where(f > headroom, f, 1.0).astype(np.float32)  # clips now: f > headroom
            if not (f != 1.0).any():
                continue
        factors[name] = f
    return factors
