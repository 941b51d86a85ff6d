"""The values an update codec carries: `TensorBlock`, `Update`, `UpdateHeader`, `Limits`.

These dataclasses validate themselves (raising `CodecError`), so an `Update` that exists can
always be encoded, and one that was decoded satisfies the same invariants as one built
locally. The byte layout lives in `pqsu.protocol.codec` (specified in docs/protocol.md,
"Update codec"), which re-exports everything here; a block's own layout, which
`nbytes_on_wire` needs too, lives in `pqsu.protocol.block_wire`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from pqsu.protocol import varint
from pqsu.protocol.block_wire import encoded_block_size
from pqsu.protocol.errors import CodecError

__all__ = ["TensorBlock", "Update", "UpdateHeader", "Limits", "KINDS"]

KINDS = ("skip", "dense", "sparse", "dense32")

_U32_MAX = 2**32 - 1
_F32_MAX = float(np.finfo(np.float32).max)
# Largest scale whose 127 * scale is still finite: a bigger one would dequantize to inf and
# poison the aggregate, and no encoder can produce it (scale = max|v| / 127).
_MAX_SCALE = float(np.nextafter(np.float32(_F32_MAX / 127), np.float32(0)))


def _frozen(a: np.ndarray) -> np.ndarray:
    # A read-only view: the block is immutable without copying or touching the caller's flags.
    v = a.view()
    v.flags.writeable = False
    return v


def _utf8(text: object, what: str, max_bytes: int) -> bytes:
    if not isinstance(text, str):
        raise CodecError(f"{what} must be a str, got {type(text).__name__}")
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise CodecError(f"{what} is not encodable as UTF-8: {e.reason}") from None
    if len(raw) > max_bytes:
        raise CodecError(f"{what} is {len(raw)} bytes in UTF-8, at most {max_bytes} allowed")
    return raw


def _uint(value: object, what: str, bits: int = 32) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise CodecError(f"{what} must be an int, got {type(value).__name__}")
    if not 0 <= int(value) < 1 << bits:
        raise CodecError(f"{what} {int(value)} out of range for u{bits}")
    return int(value)


def _check_finite(values: np.ndarray, where: str) -> None:
    if not np.isfinite(values).all():
        raise CodecError(f"{where}: values contain NaN or Inf")


def _quantize(rows: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row: scale = max|row|/127, q = round(row/scale) in [-127, 127]."""
    if rows.size == 0:
        return np.zeros(rows.size, np.int8), np.zeros(rows.shape[0], np.float32)
    _check_finite(rows, where)
    amax = np.abs(rows).max(axis=1)
    if amax.max() > _F32_MAX:
        raise CodecError(f"{where}: values exceed the float32 range")
    scale = np.minimum((amax / 127).astype(np.float32), np.float32(_MAX_SCALE))
    # An all-zero row (or one whose scale underflows to 0) quantizes to zeros, never to inf.
    safe = np.where(scale > 0, scale, 1).astype(rows.dtype)
    q = np.rint(rows / safe[:, None])
    np.clip(q, -127, 127, out=q)
    return q.astype(np.int8).reshape(-1), scale


def _scales_ok(scale: np.ndarray) -> bool:
    return bool(np.all((scale >= 0) & (scale <= _MAX_SCALE)))  # NaN compares False


def _as_float(values: object) -> np.ndarray:
    v = np.asarray(values)
    return v if v.dtype in (np.float32, np.float64) else v.astype(np.float64)


@dataclass(frozen=True, eq=False)
class TensorBlock:
    """One tensor of an update, as sent: `q` holds the entries carried on the wire.

    kind "dense": `q` is int8, all entries (C order); `scale` is (1,) or (shape[0],) per-channel.
    kind "sparse": int8 `q[i]` is the value at flat index `indices[i]`, one per-tensor `scale`.
    kind "dense32": `q` is float32, all entries (C order), sent as they are; `scale` is None
      (dequantization is the identity). The FedAvg baseline: no quantization, no sparsity.
    kind "skip": nothing is sent (`q` is None); the receiver treats the tensor as unchanged.
    Build blocks with `dense`, `sparse`, `dense_fp32` and `skip`; the constructor validates
    everything (raising `CodecError`), and arrays are stored read-only.
    """

    name: str
    shape: tuple[int, ...]
    kind: str
    q: np.ndarray | None = None
    scale: np.ndarray | None = None
    indices: np.ndarray | None = None

    def __post_init__(self) -> None:
        _utf8(self.name, "tensor name", 0xFFFF)
        if not self.name:
            raise CodecError("tensor name is empty")
        where = f"tensor {self.name!r}"
        try:
            shape = tuple(_uint(d, f"{where} dim") for d in self.shape)
        except TypeError:
            raise CodecError(f"{where}: shape must be a sequence of ints") from None
        if len(shape) > 255:
            raise CodecError(f"{where}: {len(shape)} dims, at most 255")
        object.__setattr__(self, "shape", shape)
        if self.kind not in KINDS:
            raise CodecError(f"{where}: unknown kind {self.kind!r}")
        if self.kind == "skip":
            if any(a is not None for a in (self.q, self.scale, self.indices)):
                raise CodecError(f"{where}: a skip block carries no arrays")
        elif self.kind == "dense32":
            self._validate_dense32(where)
        else:
            self._validate_int8(where)

    def _validate_dense32(self, where: str) -> None:
        if self.scale is not None or self.indices is not None:
            raise CodecError(f"{where}: a dense32 block has no scale and no indices")
        q = np.asarray(self.q)
        if q.dtype != np.float32:
            raise CodecError(f"{where}: dense32 values must be float32, got {q.dtype}")
        q = q.reshape(-1)
        if q.size != self.numel:
            raise CodecError(f"{where}: {q.size} values for {self.numel} elements")
        _check_finite(q, where)
        object.__setattr__(self, "q", _frozen(q))

    def _validate_int8(self, where: str) -> None:
        q, scale, shape = np.asarray(self.q), np.asarray(self.scale), self.shape
        if q.dtype != np.int8:
            raise CodecError(f"{where}: q must be int8, got {q.dtype}")
        if not np.issubdtype(scale.dtype, np.floating):
            raise CodecError(f"{where}: scale must be float, got {scale.dtype}")
        q, scale = q.reshape(-1), scale.astype(np.float32, copy=False).reshape(-1)
        if (q == -128).any():
            raise CodecError(f"{where}: int8 value -128 is outside the symmetric range")
        if not _scales_ok(scale):
            raise CodecError(f"{where}: scale must be finite and in [0, {_MAX_SCALE:.3g}]")
        if self.kind == "dense":
            if self.indices is not None:
                raise CodecError(f"{where}: a dense block has no indices")
            if q.size != self.numel:
                raise CodecError(f"{where}: {q.size} values for {self.numel} elements")
            if scale.size != 1 and not (shape and scale.size == shape[0]):
                raise CodecError(f"{where}: {scale.size} scales, need 1 or shape[0]")
        else:
            idx = np.asarray(self.indices)
            if not np.issubdtype(idx.dtype, np.integer) and idx.size:
                raise CodecError(f"{where}: indices must be integers, got {idx.dtype}")
            idx = idx.astype(np.int64, copy=False).reshape(-1)
            if idx.size != q.size or scale.size != 1:
                raise CodecError(f"{where}: need one value per index and one scale")
            if idx.size and (idx[0] < 0 or idx[-1] >= self.numel or (np.diff(idx) <= 0).any()):
                raise CodecError(
                    f"{where}: indices must be strictly increasing within [0, {self.numel})")
            object.__setattr__(self, "indices", _frozen(idx))
        object.__setattr__(self, "q", _frozen(q))
        object.__setattr__(self, "scale", _frozen(scale))

    @classmethod
    def _from_wire(cls, name: str, shape: tuple[int, ...], kind: str,
                   q: np.ndarray | None = None, scale: np.ndarray | None = None,
                   indices: np.ndarray | None = None) -> TensorBlock:
        # The decoder establishes every invariant of __post_init__ by construction (sizes from
        # the header, indices rebuilt increasing and range-checked, read-only buffers) and
        # checks the value ranges itself; skipping the re-check halves aggregator decode time.
        # tests/protocol/test_codec_fuzz.py re-validates every decoded block through __post_init__.
        self = object.__new__(cls)
        vars(self).update(name=name, shape=shape, kind=kind, q=q, scale=scale, indices=indices)
        return self

    @classmethod
    def dense(cls, name: str, values: np.ndarray, per_channel: bool = True) -> TensorBlock:
        """Quantize every entry; per-channel (one scale per row of axis 0) when ndim >= 2."""
        v = _as_float(values)
        # Explicit row length: reshape(-1) cannot infer it when shape[0] == 0.
        if per_channel and v.ndim >= 2:
            rows = v.reshape(v.shape[0], math.prod(v.shape[1:]))
        else:
            rows = v.reshape(1, v.size)
        q, scale = _quantize(rows, f"tensor {name!r}")
        return cls(name, v.shape, "dense", q=q, scale=scale)

    @classmethod
    def sparse(cls, name: str, shape: tuple[int, ...], indices: np.ndarray,
               values: np.ndarray) -> TensorBlock:
        """Quantize `values` at flat `indices` (any order, unique) with one per-tensor scale."""
        idx = np.asarray(indices).reshape(-1)
        vals = _as_float(values).reshape(-1)
        if idx.size != vals.size:
            raise CodecError(f"tensor {name!r}: {idx.size} indices but {vals.size} values")
        if idx.size and not np.issubdtype(idx.dtype, np.integer):
            raise CodecError(f"tensor {name!r}: indices must be integers, got {idx.dtype}")
        idx = idx.astype(np.int64)
        if idx.size > 1 and (np.diff(idx) <= 0).any():
            order = np.argsort(idx, kind="stable")
            idx, vals = idx[order], vals[order]
        q, scale = _quantize(vals.reshape(1, -1), f"tensor {name!r}")
        return cls(name, shape, "sparse", q=q, scale=scale[:1], indices=idx)

    @classmethod
    def dense_fp32(cls, name: str, values: np.ndarray) -> TensorBlock:
        """Every entry as float32, unquantized (plain FedAvg). Values must be finite float32."""
        v, where = _as_float(values), f"tensor {name!r}"
        _check_finite(v, where)
        if v.dtype != np.float32 and v.size and np.abs(v).max() > _F32_MAX:
            raise CodecError(f"{where}: values exceed the float32 range")  # the cast makes Inf
        return cls(name, v.shape, "dense32", q=np.array(v, dtype=np.float32))  # a copy

    @classmethod
    def skip(cls, name: str, shape: tuple[int, ...]) -> TensorBlock:
        """A tensor the device chose not to send this round."""
        return cls(name, shape, "skip")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nnz(self) -> int:
        """Entries carried on the wire: numel if dense(32), len(indices) if sparse, 0 if skip."""
        return 0 if self.q is None else int(self.q.size)

    @property
    def index_coding(self) -> str | None:
        """"varint" or "bitmap" (whichever is smaller) for sparse blocks, else None."""
        if self.kind != "sparse":
            return None
        return "bitmap" if self._index_data[0] == varint.INDEX_BITMAP else "varint"

    @property
    def nbytes_on_wire(self) -> int:
        """Exact size of this block inside an encoded update."""
        return encoded_block_size(self)

    @cached_property
    def _index_data(self) -> tuple[int, bytes]:
        # Cached: encode and nbytes_on_wire both need it, and sizing both codings is not free.
        return varint.encode_index_set(self.indices, self.numel)

    def dequantize(self) -> np.ndarray:
        """The float32 tensor the receiver reconstructs (zeros where nothing was sent)."""
        if self.kind == "dense32":
            return self.q.reshape(self.shape).copy()  # bit-exact, -0.0 included
        out = np.zeros(self.shape, dtype=np.float32)
        self.add_to(out)
        return out

    def add_to(self, out: np.ndarray, weight: float = 1.0) -> None:
        """``out += weight * dequantize()`` in place; sparse blocks touch only their indices.

        For int8 blocks the weight is folded into the float32 scale (one pass over the values
        instead of two); either way, with weight 1 this adds exactly `dequantize()`.
        """
        if not isinstance(out, np.ndarray) or out.shape != self.shape:
            raise ValueError(f"tensor {self.name!r}: out must be an ndarray of shape {self.shape}")
        if out.dtype.kind != "f" or not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError(
                f"tensor {self.name!r}: out must be a writable C-contiguous float array")
        if self.q is None or self.q.size == 0:  # skip, or nothing to add
            return
        flat = out.reshape(-1)  # a view, since out is C-contiguous
        if self.kind == "dense32":
            flat += self.q * np.float32(weight)
            return
        factor = self.scale * np.float32(weight)
        if self.kind == "sparse":
            vals = self.q.astype(np.float32)
            vals *= factor[0]
            flat[self.indices] += vals  # indices are unique, so no np.add.at needed
            return
        vals = self.q.reshape(factor.size, -1).astype(np.float32)
        vals *= factor[:, None]
        flat += vals.reshape(-1)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TensorBlock):
            return NotImplemented
        same = lambda a, b: (a is None and b is None) or (  # noqa: E731
            a is not None and b is not None and np.array_equal(a, b))
        return (self.name, self.shape, self.kind) == (other.name, other.shape, other.kind) \
            and same(self.q, other.q) and same(self.scale, other.scale) \
            and same(self.indices, other.indices)

    __hash__ = None  # type: ignore[assignment]  # mutable-looking arrays inside


@dataclass(frozen=True)
class Update:
    """What a device uploads after local training: per-tensor deltas plus metadata.

    `loss` travels as float32 and is stored rounded to float32 here, so an update compares
    equal to its own decoded copy.
    """

    round: int
    device_id: str
    model_id: str
    num_samples: int
    loss: float
    blocks: tuple[TensorBlock, ...] = ()
    _by_name: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _uint(self.round, "round")
        _uint(self.num_samples, "num_samples")
        _utf8(self.device_id, "device_id", 255)
        _utf8(self.model_id, "model_id", 255)
        try:
            loss = float(self.loss)
        except (TypeError, ValueError):
            raise CodecError(f"loss must be a float, got {type(self.loss).__name__}") from None
        if not math.isfinite(loss) or abs(loss) > _F32_MAX:
            raise CodecError(f"loss {loss} is not a finite float32")
        object.__setattr__(self, "round", int(self.round))
        object.__setattr__(self, "num_samples", int(self.num_samples))
        object.__setattr__(self, "loss", float(np.float32(loss)))
        blocks = tuple(self.blocks)
        if len(blocks) > _U32_MAX or not all(isinstance(b, TensorBlock) for b in blocks):
            raise CodecError("blocks must be a sequence of TensorBlock")
        by_name = {b.name: b for b in blocks}
        if len(by_name) != len(blocks):
            raise CodecError("duplicate tensor names in update")
        object.__setattr__(self, "blocks", blocks)
        object.__setattr__(self, "_by_name", by_name)

    def block(self, name: str) -> TensorBlock:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"update has no tensor {name!r}") from None

    def to_dense(self) -> dict[str, np.ndarray]:
        """Dequantized float32 tensor per name (zeros for skipped ones)."""
        return {b.name: b.dequantize() for b in self.blocks}


@dataclass(frozen=True)
class UpdateHeader:
    """The cheap-to-read front of an encoded update (see `codec.peek_header`)."""

    version: int
    round: int
    device_id: str
    model_id: str
    num_samples: int
    loss: float
    signed: bool
    num_tensors: int


@dataclass(frozen=True)
class Limits:
    """Receiver policy: `decode` refuses anything larger before allocating for it."""

    max_payload_bytes: int = 64 << 20
    max_tensors: int = 4096
    max_elements_per_tensor: int = 1 << 28
    max_total_elements: int = 1 << 30
    max_name_bytes: int = 256
    max_ndim: int = 8

    def __post_init__(self) -> None:
        for f, cap in (("max_payload_bytes", None), ("max_tensors", _U32_MAX),
                       ("max_elements_per_tensor", _U32_MAX),  # keeps index sums in uint64
                       ("max_total_elements", None), ("max_name_bytes", 0xFFFF),
                       ("max_ndim", 255)):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0 or (cap and v > cap):
                raise ValueError(f"Limits.{f} must be an int in [0, {cap or 'inf'}], got {v!r}")
