"""Binary codec for model updates: int8 tensor blocks, compact sparse indices, CRC, HMAC.

The byte layout is specified in docs/protocol.md ("Update codec"). Never pickle: `decode`
treats every byte as hostile and either returns a valid `Update` or raises `CodecError`,
checking each declared size against `Limits` and against the bytes actually left before it
allocates anything. The dataclasses validate themselves, so an `Update` that exists can always
be encoded, and one that was decoded satisfies the same invariants as one built locally.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import struct
import zlib
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from pqsu.protocol import varint
from pqsu.protocol.errors import CodecError

__all__ = ["TensorBlock", "Update", "UpdateHeader", "Limits", "encode", "decode", "peek_header"]

MAGIC = b"PQSU"
FORMAT_VERSION = 1
MSG_UPDATE = 1
FLAG_SIGNED = 0x01

_HEAD = struct.Struct("<4sBBBIIf")  # magic, version, kind, flags, round, num_samples, loss
_U8, _U16, _U32 = struct.Struct("<B"), struct.Struct("<H"), struct.Struct("<I")
_SPARSE_HEAD = struct.Struct("<IfB")  # nnz, scale, index coding
_DIMS = [struct.Struct(f"<{n}I") for n in range(256)]
_CRC_BYTES, _MAC_BYTES = 4, 32
_MIN_BLOCK_BYTES = 5  # u16 name length + 1 name byte + ndim + kind
_U32_MAX = 2**32 - 1
_F32_MAX = float(np.finfo(np.float32).max)
# Largest scale whose 127 * scale is still finite: a bigger one would dequantize to inf and
# poison the aggregate, and no encoder can produce it (scale = max|v| / 127).
_MAX_SCALE = float(np.nextafter(np.float32(_F32_MAX / 127), np.float32(0)))

_KIND_CODE = {"skip": 0, "dense": 1, "sparse": 2}
_SCALE_PER_TENSOR, _SCALE_PER_CHANNEL = 0, 1
_INDEX_VARINT, _INDEX_BITMAP = 0, 1


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


def _quantize(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row: scale = max|row|/127, q = round(row/scale) in [-127, 127]."""
    if rows.size == 0:
        return np.zeros(rows.size, np.int8), np.zeros(rows.shape[0], np.float32)
    if not np.isfinite(rows).all():
        raise CodecError("values contain NaN or Inf")
    amax = np.abs(rows).max(axis=1)
    if amax.max() > _F32_MAX:
        raise CodecError("values exceed the float32 range")
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
    """One tensor of an update, as sent: int8 values plus float32 scale(s).

    kind "dense": `q` holds all entries (C order), `scale` is (1,) or (shape[0],) per-channel.
    kind "sparse": `q[i]` is the value at flat index `indices[i]`, one per-tensor `scale`.
    kind "skip": nothing is sent; the receiver treats the tensor as unchanged (zero delta).
    Build blocks with `dense`, `sparse` and `skip`; the constructor validates everything
    (raising `CodecError`), and arrays are stored read-only.
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
        numel = math.prod(shape)
        if self.kind == "skip":
            if any(a is not None for a in (self.q, self.scale, self.indices)):
                raise CodecError(f"{where}: a skip block carries no arrays")
            return
        if self.kind not in ("dense", "sparse"):
            raise CodecError(f"{where}: unknown kind {self.kind!r}")
        q, scale = np.asarray(self.q), np.asarray(self.scale)
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
            if q.size != numel:
                raise CodecError(f"{where}: {q.size} values for {numel} elements")
            if scale.size != 1 and not (shape and scale.size == shape[0]):
                raise CodecError(f"{where}: {scale.size} scales, need 1 or shape[0]")
        else:
            idx = np.asarray(self.indices)
            if not np.issubdtype(idx.dtype, np.integer) and idx.size:
                raise CodecError(f"{where}: indices must be integers, got {idx.dtype}")
            idx = idx.astype(np.int64, copy=False).reshape(-1)
            if idx.size != q.size or scale.size != 1:
                raise CodecError(f"{where}: need one value per index and one scale")
            if idx.size and (idx[0] < 0 or idx[-1] >= numel or (np.diff(idx) <= 0).any()):
                raise CodecError(
                    f"{where}: indices must be strictly increasing within [0, {numel})")
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
        # tests/test_codec_fuzz.py re-validates every decoded block through __post_init__.
        self = object.__new__(cls)
        for attr, value in zip(("name", "shape", "kind", "q", "scale", "indices"),
                               (name, shape, kind, q, scale, indices)):
            object.__setattr__(self, attr, value)
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
        q, scale = _quantize(rows)
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
        q, scale = _quantize(vals.reshape(1, -1))
        return cls(name, shape, "sparse", q=q, scale=scale[:1], indices=idx)

    @classmethod
    def skip(cls, name: str, shape: tuple[int, ...]) -> TensorBlock:
        """A tensor the device chose not to send this round."""
        return cls(name, shape, "skip")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nnz(self) -> int:
        """Entries carried on the wire: numel for dense, len(indices) for sparse, 0 for skip."""
        return 0 if self.q is None else int(self.q.size)

    @property
    def index_coding(self) -> str | None:
        """"varint" or "bitmap" (whichever is smaller) for sparse blocks, else None."""
        if self.kind != "sparse":
            return None
        return "bitmap" if self._index_payload[0] == _INDEX_BITMAP else "varint"

    @property
    def nbytes_on_wire(self) -> int:
        """Exact size of this block inside an encoded update."""
        return sum(len(p) for p in _encode_block(self))

    @cached_property
    def _index_payload(self) -> tuple[int, bytes]:
        # Both codings are sized up front; ties go to varint. Cached: encode and
        # nbytes_on_wire both need it.
        gaps = varint.gaps_from_indices(self.indices)
        varint_bytes = _U32.size + int(varint.uvarint_sizes(gaps).sum(dtype=np.int64))
        if (self.numel + 7) // 8 < varint_bytes:
            return _INDEX_BITMAP, varint.encode_bitmap(self.indices, self.numel).tobytes()
        stream = varint.encode_uvarints(gaps).tobytes()
        return _INDEX_VARINT, _U32.pack(len(stream)) + stream

    def dequantize(self) -> np.ndarray:
        """The float32 tensor the receiver reconstructs (zeros where nothing was sent)."""
        out = np.zeros(self.shape, dtype=np.float32)
        self.add_to(out)
        return out

    def add_to(self, out: np.ndarray, weight: float = 1.0) -> None:
        """``out += weight * dequantize()`` in place; sparse blocks touch only their indices.

        The weight is folded into the float32 scale (one pass over the values instead of two),
        so with weight 1 this adds exactly `dequantize()`.
        """
        if not isinstance(out, np.ndarray) or out.shape != self.shape:
            raise ValueError(f"tensor {self.name!r}: out must be an ndarray of shape {self.shape}")
        if out.dtype.kind != "f" or not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError(
                f"tensor {self.name!r}: out must be a writable C-contiguous float array")
        if self.kind == "skip" or self.q.size == 0:
            return
        flat = out.reshape(-1)  # a view, since out is C-contiguous
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
    """What a device uploads after local training: per-tensor int8 deltas plus metadata.

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
    """The cheap-to-read front of an encoded update (see `peek_header`)."""

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


# ---------------------------------------------------------------------------- encode

def _encode_block(b: TensorBlock) -> list[bytes]:
    name = b.name.encode("utf-8")
    parts = [_U16.pack(len(name)), name, _U8.pack(len(b.shape)),
             _DIMS[len(b.shape)].pack(*b.shape), _U8.pack(_KIND_CODE[b.kind])]
    if b.kind == "dense":
        mode = _SCALE_PER_TENSOR if b.scale.size == 1 else _SCALE_PER_CHANNEL
        parts += [_U8.pack(mode), b.scale.astype("<f4").tobytes(), b.q.tobytes()]
    elif b.kind == "sparse":
        coding, index_bytes = b._index_payload
        parts += [_SPARSE_HEAD.pack(b.q.size, b.scale[0], coding), index_bytes, b.q.tobytes()]
    return parts


def encode(update: Update, *, key: bytes | None = None) -> bytes:
    """Serialize `update`; with `key`, append an HMAC-SHA256 and set the signed flag."""
    if not isinstance(update, Update):
        raise CodecError(f"encode expects an Update, got {type(update).__name__}")
    _check_key(key)
    dev, model = update.device_id.encode("utf-8"), update.model_id.encode("utf-8")
    flags = FLAG_SIGNED if key is not None else 0
    parts = [_HEAD.pack(MAGIC, FORMAT_VERSION, MSG_UPDATE, flags, update.round,
                        update.num_samples, update.loss),
             _U8.pack(len(dev)), dev, _U8.pack(len(model)), model, _U32.pack(len(update.blocks))]
    for b in update.blocks:
        parts += _encode_block(b)
    msg = b"".join(parts)
    msg += _U32.pack(zlib.crc32(msg))
    if key is not None:
        msg += hmac.new(key, msg, hashlib.sha256).digest()
    return msg


def _check_key(key: object) -> None:
    if key is not None and (not isinstance(key, (bytes, bytearray)) or not key):
        raise CodecError("key must be non-empty bytes (or None)")


# ---------------------------------------------------------------------------- decode

class _Reader:
    """Bounds-checked cursor over the message body: every read says what it was for."""

    __slots__ = ("buf", "pos", "end")

    def __init__(self, buf: bytes, pos: int, end: int) -> None:
        self.buf, self.pos, self.end = buf, pos, end

    def need(self, n: int, what: str) -> None:
        if n > self.end - self.pos:
            raise CodecError(f"truncated: {what} needs {n} bytes, {self.end - self.pos} left")

    def unpack(self, st: struct.Struct, what: str) -> tuple:
        self.need(st.size, what)
        out = st.unpack_from(self.buf, self.pos)
        self.pos += st.size
        return out

    def array(self, dtype: str, count: int, what: str) -> np.ndarray:
        dt = np.dtype(dtype)
        self.need(count * dt.itemsize, what)
        a = np.frombuffer(self.buf, dt, count, self.pos) if count else np.empty(0, dt)
        self.pos += count * dt.itemsize
        return a

    def text(self, n: int, what: str) -> str:
        self.need(n, what)
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CodecError(f"{what} is not valid UTF-8") from None


def _read_header(buf: bytes) -> tuple[UpdateHeader, int]:
    if len(buf) < _HEAD.size:
        raise CodecError(f"truncated: {len(buf)} bytes, the fixed header alone is {_HEAD.size}")
    magic, version, kind, flags, rnd, samples, loss = _HEAD.unpack_from(buf, 0)
    if magic != MAGIC:
        raise CodecError(f"bad magic {magic!r}, not an fl-pqsu message")
    if version != FORMAT_VERSION:
        raise CodecError(f"unsupported codec version {version} (this build reads {FORMAT_VERSION})")
    if kind != MSG_UPDATE:
        raise CodecError(f"message kind {kind} is not an update ({MSG_UPDATE})")
    if flags & ~FLAG_SIGNED:
        raise CodecError(f"unknown flag bits 0x{flags & ~FLAG_SIGNED:02x}")
    r = _Reader(buf, _HEAD.size, len(buf))
    dev = r.text(r.unpack(_U8, "device_id length")[0], "device_id")
    model = r.text(r.unpack(_U8, "model_id length")[0], "model_id")
    (count,) = r.unpack(_U32, "tensor count")
    header = UpdateHeader(FORMAT_VERSION, rnd, dev, model, samples, loss,
                          bool(flags & FLAG_SIGNED), count)
    return header, r.pos


def _as_bytes(payload: object) -> bytes:
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, (bytearray, memoryview)):
        return bytes(payload)
    raise CodecError(f"payload must be bytes, got {type(payload).__name__}")


def peek_header(payload: bytes) -> UpdateHeader:
    """Read round, ids, samples, loss, version and signed flag; checks nothing past the header."""
    return _read_header(_as_bytes(payload))[0]


def _decode_block(r: _Reader, i: int, limits: Limits, total: int) -> tuple[TensorBlock, int]:
    (nlen,) = r.unpack(_U16, f"tensor #{i} name length")
    if not 0 < nlen <= limits.max_name_bytes:
        raise CodecError(f"tensor #{i}: name length {nlen} not in [1, {limits.max_name_bytes}]")
    name = r.text(nlen, f"tensor #{i} name")
    where = f"tensor {name!r}"
    (ndim,) = r.unpack(_U8, f"{where} ndim")
    if ndim > limits.max_ndim:
        raise CodecError(f"{where}: {ndim} dims, limit is {limits.max_ndim}")
    shape = r.unpack(_DIMS[ndim], f"{where} dims")
    numel = math.prod(shape)  # Python int: no overflow however large the claim
    if numel > limits.max_elements_per_tensor:
        raise CodecError(f"{where}: shape {shape} has {numel} elements, "
                         f"limit is {limits.max_elements_per_tensor}")
    if total + numel > limits.max_total_elements:
        raise CodecError(f"{where}: update declares over {limits.max_total_elements} "
                         "elements in total")
    (kind,) = r.unpack(_U8, f"{where} kind")
    if kind == _KIND_CODE["skip"]:
        return TensorBlock._from_wire(name, shape, "skip"), numel
    if kind == _KIND_CODE["dense"]:
        (mode,) = r.unpack(_U8, f"{where} scale mode")
        if mode == _SCALE_PER_TENSOR:
            nscale = 1
        elif mode == _SCALE_PER_CHANNEL and ndim >= 1:
            nscale = shape[0]
        else:
            raise CodecError(f"{where}: bad scale mode {mode} for {ndim} dims")
        scale = r.array("<f4", nscale, f"{where} scales")
        if not _scales_ok(scale):
            raise CodecError(f"{where}: scale must be finite and in [0, {_MAX_SCALE:.3g}]")
        q = _check_q(r.array("i1", numel, f"{where} dense values"), where)
        return TensorBlock._from_wire(name, shape, "dense", q, scale), numel
    if kind != _KIND_CODE["sparse"]:
        raise CodecError(f"{where}: unknown block kind {kind}")
    nnz, scale, coding = r.unpack(_SPARSE_HEAD, f"{where} sparse header")
    if nnz > numel:
        raise CodecError(f"{where}: nnz {nnz} exceeds {numel} elements")
    if not 0 <= scale <= _MAX_SCALE:  # also False for NaN
        raise CodecError(f"{where}: scale {scale} must be finite and in [0, {_MAX_SCALE:.3g}]")
    if coding == _INDEX_VARINT:
        (nbytes,) = r.unpack(_U32, f"{where} index stream length")
        max_len = varint.max_uvarint_bytes(numel)
        if not nnz <= nbytes <= nnz * max_len:
            raise CodecError(f"{where}: {nbytes}-byte index stream cannot hold {nnz} varints")
        # Values too, before decoding: index work is then O(bytes present), not O(claims).
        r.need(nbytes + nnz, f"{where} indices and values")
        gaps = varint.decode_uvarints(r.array("u1", nbytes, f"{where} indices"), nnz, max_len)
        indices = varint.indices_from_gaps(gaps, numel)
    elif coding == _INDEX_BITMAP:
        r.need((numel + 7) // 8 + nnz, f"{where} index bitmap and values")
        bitmap = r.array("u1", (numel + 7) // 8, f"{where} index bitmap")
        indices = varint.decode_bitmap(bitmap, nnz, numel)
    else:
        raise CodecError(f"{where}: unknown index coding {coding}")
    q = _check_q(r.array("i1", nnz, f"{where} sparse values"), where)
    block = TensorBlock._from_wire(name, shape, "sparse", q, _frozen(np.array([scale], np.float32)),
                                   _frozen(indices))
    return block, numel


def _check_q(q: np.ndarray, where: str) -> np.ndarray:
    if q.size and q.min() == -128:
        raise CodecError(f"{where}: int8 value -128 is outside the symmetric range")
    return q


def decode(payload: bytes, *, key: bytes | None = None, limits: Limits = Limits()) -> Update:
    """Parse and verify an encoded update, or raise `CodecError` saying what is wrong.

    With `key`, the message must be signed and its HMAC must verify. Without `key`, a signed
    message is accepted with its signature unchecked (the cloud may not hold every device key
    at every hop); a receiver that needs authenticity must pass the key.
    """
    _check_key(key)
    if not isinstance(limits, Limits):
        raise CodecError("limits must be a Limits instance")
    buf = _as_bytes(payload)
    if len(buf) > limits.max_payload_bytes:
        raise CodecError(f"payload is {len(buf)} bytes, limit is {limits.max_payload_bytes}")
    header, pos = _read_header(buf)
    body_end = len(buf) - _CRC_BYTES - (_MAC_BYTES if header.signed else 0)
    if body_end < pos:
        raise CodecError("truncated: no room for the trailer")
    view = memoryview(buf)
    (crc,) = _U32.unpack_from(buf, body_end)
    if zlib.crc32(view[:body_end]) != crc:
        raise CodecError("CRC32 mismatch: payload corrupt, truncated or extended")
    if key is not None:
        if not header.signed:
            raise CodecError("message is unsigned but a key was given: signature required")
        mac = hmac.new(key, view[:body_end + _CRC_BYTES], hashlib.sha256).digest()
        if not hmac.compare_digest(mac, buf[body_end + _CRC_BYTES:]):
            raise CodecError(f"HMAC mismatch: not signed with this key for {header.device_id!r}")
    count = header.num_tensors
    if count > limits.max_tensors:
        raise CodecError(f"{count} tensors, limit is {limits.max_tensors}")
    if count * _MIN_BLOCK_BYTES > body_end - pos:
        raise CodecError(f"truncated: {count} tensors cannot fit in {body_end - pos} bytes")
    r, blocks, total = _Reader(buf, pos, body_end), [], 0
    for i in range(count):
        block, numel = _decode_block(r, i, limits, total)
        total += numel
        blocks.append(block)
    if r.pos != body_end:
        raise CodecError(f"{body_end - r.pos} trailing bytes after the last tensor")
    return Update(header.round, header.device_id, header.model_id, header.num_samples,
                  header.loss, tuple(blocks))
