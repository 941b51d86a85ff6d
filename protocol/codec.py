"""Binary codec for model updates: tensor blocks, compact sparse indices, CRC, HMAC.

The byte layout is specified in docs/protocol.md ("Update codec"); the values it carries
(`TensorBlock`, `Update`, `UpdateHeader`, `Limits`) live in `pqsu.protocol.update` and are
re-exported here; one tensor block's layout lives in `pqsu.protocol.block_wire`, shared with
`TensorBlock.nbytes_on_wire`. Never pickle: `decode` treats every byte as hostile and either
returns a valid `Update` or raises `CodecError`, checking each declared size against `Limits`
and against the bytes actually left before it allocates anything. The subclass raised names the
reason (`CodecError.reason`: "truncated", "oversize", "bad-checksum", ...).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import struct
import zlib

import numpy as np

from pqsu.protocol import block_wire as bw
from pqsu.protocol import varint
from pqsu.protocol.errors import (ChecksumError, CodecError, OversizeError, SignatureError,
                                  TruncatedError, UnsupportedError)
from pqsu.protocol.update import (_MAX_SCALE, Limits, TensorBlock, Update, UpdateHeader,
                                  _frozen, _scales_ok)

__all__ = ["TensorBlock", "Update", "UpdateHeader", "Limits", "encode", "decode", "peek_header", "read_header"]

MAGIC = b"PQSU"
FORMAT_VERSION = 1
MSG_UPDATE = 1
FLAG_SIGNED = 0x01

_HEAD = struct.Struct("<4sBBBIIf")  # magic, version, kind, flags, round, num_samples, loss
_U32 = struct.Struct("<I")
_I8, _U8_ARRAY, _F32 = np.dtype("i1"), np.dtype("u1"), np.dtype("<f4")
_CRC_BYTES, _MAC_BYTES = 4, 32


# ---------------------------------------------------------------------------- encode

def encode(update: Update, *, key: bytes | None = None) -> bytes:
    """Serialize `update`; with `key`, append an HMAC-SHA256 and set the signed flag."""
    if not isinstance(update, Update):
        raise CodecError(f"encode expects an Update, got {type(update).__name__}")
    _check_key(key)
    dev, model = update.device_id.encode("utf-8"), update.model_id.encode("utf-8")
    flags = FLAG_SIGNED if key is not None else 0
    parts = [_HEAD.pack(MAGIC, FORMAT_VERSION, MSG_UPDATE, flags, update.round,
                        update.num_samples, update.loss),
             bw.U8.pack(len(dev)), dev, bw.U8.pack(len(model)), model, _U32.pack(len(update.blocks))]
    for b in update.blocks:
        parts += bw.encode_block(b)
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
            raise TruncatedError(f"truncated: {what} needs {n} bytes, {self.end - self.pos} left")

    def unpack(self, st: struct.Struct, what: str) -> tuple:
        self.need(st.size, what)
        out = st.unpack_from(self.buf, self.pos)
        self.pos += st.size
        return out

    def array(self, dtype: np.dtype, count: int, what: str) -> np.ndarray:
        self.need(count * dtype.itemsize, what)
        a = np.frombuffer(self.buf, dtype, count, self.pos) if count else np.empty(0, dtype)
        self.pos += count * dtype.itemsize
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
        raise TruncatedError(
            f"truncated: {len(buf)} bytes, the fixed header alone is {_HEAD.size}")
    magic, version, kind, flags, rnd, samples, loss = _HEAD.unpack_from(buf, 0)
    if magic != MAGIC:
        raise UnsupportedError(f"bad magic {magic!r}, not an fl-pqsu message")
    if version != FORMAT_VERSION:
        raise UnsupportedError(
            f"unsupported codec version {version} (this build reads {FORMAT_VERSION})")
    if kind != MSG_UPDATE:
        raise UnsupportedError(f"message kind {kind} is not an update ({MSG_UPDATE})")
    if flags & ~FLAG_SIGNED:
        raise UnsupportedError(f"unknown flag bits 0x{flags & ~FLAG_SIGNED:02x}")
    r = _Reader(buf, _HEAD.size, len(buf))
    dev = r.text(r.unpack(bw.U8, "device_id length")[0], "device_id")
    model = r.text(r.unpack(bw.U8, "model_id length")[0], "model_id")
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


def read_header(payload: bytes) -> tuple[UpdateHeader, int]:
    """`peek_header`'s header and the offset of the first tensor block (the batch decoder starts there)."""
    return _read_header(_as_bytes(payload))


def _decode_block(r: _Reader, i: int, limits: Limits, total: int) -> tuple[TensorBlock, int]:
    (nlen,) = r.unpack(bw.U16, f"tensor #{i} name length")
    if nlen == 0:
        raise CodecError(f"tensor #{i}: name length 0, names are not empty")
    if nlen > limits.max_name_bytes:
        raise OversizeError(f"tensor #{i}: name length {nlen}, limit is {limits.max_name_bytes}")
    name = r.text(nlen, f"tensor #{i} name")
    where = f"tensor {name!r}"
    (ndim,) = r.unpack(bw.U8, f"{where} ndim")
    if ndim > limits.max_ndim:
        raise OversizeError(f"{where}: {ndim} dims, limit is {limits.max_ndim}")
    shape = r.unpack(bw.DIMS[ndim], f"{where} dims")
    numel = math.prod(shape)  # Python int: no overflow however large the claim
    if numel > limits.max_elements_per_tensor:
        raise OversizeError(f"{where}: shape {shape} has {numel} elements, "
                            f"limit is {limits.max_elements_per_tensor}")
    if total + numel > limits.max_total_elements:
        raise OversizeError(f"{where}: update declares over {limits.max_total_elements} "
                            "elements in total")
    (kind,) = r.unpack(bw.U8, f"{where} kind")
    if kind == bw.KIND_CODE["skip"]:
        block = TensorBlock._from_wire(name, shape, "skip")
    elif kind == bw.KIND_CODE["dense"]:
        block = _decode_dense(r, where, name, shape, numel)
    elif kind == bw.KIND_CODE["sparse"]:
        block = _decode_sparse(r, where, name, shape, numel)
    elif kind == bw.KIND_CODE["dense32"]:
        # astype: a no-op on little-endian hosts, a native-order copy elsewhere.
        q = r.array(_F32, numel, f"{where} float32 values").astype(np.float32, copy=False)
        if not np.isfinite(q).all():
            raise CodecError(f"{where}: float32 values contain NaN or Inf")
        block = TensorBlock._from_wire(name, shape, "dense32", q)
    else:
        raise UnsupportedError(f"{where}: unknown block kind {kind}")
    return block, numel


def _decode_dense(r: _Reader, where: str, name: str, shape: tuple[int, ...],
                  numel: int) -> TensorBlock:
    (mode,) = r.unpack(bw.U8, f"{where} scale mode")
    if mode == bw.SCALE_PER_TENSOR:
        nscale = 1
    elif mode == bw.SCALE_PER_CHANNEL and shape:
        nscale = shape[0]
    elif mode == bw.SCALE_PER_CHANNEL:
        raise CodecError(f"{where}: per-channel scale mode for a scalar")
    else:
        raise UnsupportedError(f"{where}: unknown scale mode {mode}")
    scale = r.array(_F32, nscale, f"{where} scales")
    if not _scales_ok(scale):
        raise CodecError(f"{where}: scale must be finite and in [0, {_MAX_SCALE:.3g}]")
    q = _check_q(r.array(_I8, numel, f"{where} dense values"), where)
    return TensorBlock._from_wire(name, shape, "dense", q, scale)


def _decode_sparse(r: _Reader, where: str, name: str, shape: tuple[int, ...],
                   numel: int) -> TensorBlock:
    nnz, scale, coding = r.unpack(bw.SPARSE_HEAD, f"{where} sparse header")
    if nnz > numel:
        raise CodecError(f"{where}: nnz {nnz} exceeds {numel} elements")
    if not 0 <= scale <= _MAX_SCALE:  # also False for NaN
        raise CodecError(f"{where}: scale {scale} must be finite and in [0, {_MAX_SCALE:.3g}]")
    if coding == varint.INDEX_VARINT:
        (nbytes,) = r.unpack(_U32, f"{where} index stream length")
        max_len = varint.max_uvarint_bytes(numel)
        if not nnz <= nbytes <= nnz * max_len:
            raise CodecError(f"{where}: {nbytes}-byte index stream cannot hold {nnz} varints")
        # Values too, before decoding: index work is then O(bytes present), not O(claims).
        r.need(nbytes + nnz, f"{where} indices and values")
        gaps = varint.decode_uvarints(r.array(_U8_ARRAY, nbytes, f"{where} indices"),
                                      nnz, max_len)
        indices = varint.indices_from_gaps(gaps, numel)
    elif coding == varint.INDEX_BITMAP:
        r.need((numel + 7) // 8 + nnz, f"{where} index bitmap and values")
        bitmap = r.array(_U8_ARRAY, (numel + 7) // 8, f"{where} index bitmap")
        indices = varint.decode_bitmap(bitmap, nnz, numel)
    else:
        raise UnsupportedError(f"{where}: unknown index coding {coding}")
    q = _check_q(r.array(_I8, nnz, f"{where} sparse values"), where)
    return TensorBlock._from_wire(name, shape, "sparse", q,
                                  _frozen(np.array([scale], np.float32)), _frozen(indices))


def _check_q(q: np.ndarray, where: str) -> np.ndarray:
    if q.size and q.min() == -128:
        raise CodecError(f"{where}: int8 value -128 is outside the symmetric range")
    return q


def decode(payload: bytes, *, key: bytes | None = None, limits: Limits = Limits()) -> Update:
    """Parse and verify an encoded update, or raise `CodecError` saying what is wrong.

    With `key`, the message must be signed and its HMAC must verify. Without `key`, a signed
    message is accepted with its signature unchecked (the cloud may not hold every device key
    at every hop); a receiver that needs authenticity must pass the key. The error's class
    (and its `reason`) tells why a payload was rejected; see docs/protocol.md.
    """
    _check_key(key)
    if not isinstance(limits, Limits):
        raise CodecError("limits must be a Limits instance")
    buf = _as_bytes(payload)
    if len(buf) > limits.max_payload_bytes:
        raise OversizeError(f"payload is {len(buf)} bytes, limit is {limits.max_payload_bytes}")
    header, pos = _read_header(buf)
    body_end = len(buf) - _CRC_BYTES - (_MAC_BYTES if header.signed else 0)
    if body_end < pos:
        raise TruncatedError("truncated: no room for the trailer")
    view = memoryview(buf)
    (crc,) = _U32.unpack_from(buf, body_end)
    if zlib.crc32(view[:body_end]) != crc:
        raise ChecksumError("CRC32 mismatch: payload corrupt, truncated or extended")
    if key is not None:
        if not header.signed:
            raise SignatureError("message is unsigned but a key was given: signature required")
        mac = hmac.new(key, view[:body_end + _CRC_BYTES], hashlib.sha256).digest()
        if not hmac.compare_digest(mac, buf[body_end + _CRC_BYTES:]):
            raise SignatureError(
                f"HMAC mismatch: not signed with this key for {header.device_id!r}")
    count = header.num_tensors
    if count > limits.max_tensors:
        raise OversizeError(f"{count} tensors, limit is {limits.max_tensors}")
    if count * bw.MIN_BLOCK_BYTES > body_end - pos:
        raise TruncatedError(f"truncated: {count} tensors cannot fit in {body_end - pos} bytes")
    r, blocks, total = _Reader(buf, pos, body_end), [], 0
    for i in range(count):
        block, numel = _decode_block(r, i, limits, total)
        total += numel
        blocks.append(block)
    if r.pos != body_end:
        raise CodecError(f"{body_end - r.pos} trailing bytes after the last tensor")
    return Update(header.round, header.device_id, header.model_id, header.num_samples,
                  header.loss, tuple(blocks))
