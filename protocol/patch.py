"""Model patches: from one int8 ONNX file (A) to the next (B) in a few hundred bytes.

Between keyframes the cloud requantizes its master with the keyframe's scales held, so B
is A with some int8 weights, the int32 biases and the model id changed, every other byte
equal (pqsu.export.requantize writes B into A's bytes, so this holds by construction). A
patch lists those changes as operations on A's bytes at absolute offsets:

- "tensor": new element values of one initializer, dense, sparse (the update codec's index
  coding, `varint.encode_index_set`, then B's values) or, for integer tensors, step-coded
  (`pqsu.protocol.stepcode`: Rice-coded gaps and mostly ±1 steps from A's values, about one
  byte per change), whichever is smallest;
- "splice": a byte range of A replaced by new bytes of any length (a changed metadata entry).

Applying is splicing and hashing, no protobuf parsing, so a board without the onnx package
can do it: copy A, write the values, then `model_id.stamp` the result and require that the
id it hashes to is the announced target. A wrong offset, a stale base or any corruption the
CRC misses therefore cannot produce a model that is accepted. The layout is specified byte
for byte in docs/patches.md. Every refusal raises `PatchError` with a short `reason` key.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

from pqsu.protocol import model_id, stepcode, varint
from pqsu.protocol.errors import CodecError, PqsuError
from pqsu.protocol.onnx_wire import ITEMSIZE, WireError, spans

MAGIC = b"PQSP"
FORMAT_VERSION = 2  # 2: the step coding (version 1 patches are refused, never misread)
OP_TENSOR, OP_SPLICE = 1, 2
CODING_DENSE, CODING_SPARSE, CODING_STEPS = 0, 1, 2

_HEAD = struct.Struct("<4sBB32s32sIII")  # magic, version, flags, base id, target id, base len, target len, ops
_TENSOR = struct.Struct("<BIIB")          # data type, offset, numel, coding (after kind + name)
_SPLICE = struct.Struct("<III")           # offset, old length, new length (after kind + key)
_STEPS = struct.Struct("<IBI")            # nnz, Rice parameter, stream length (step coding)
_U8, _U16, _U32 = struct.Struct("<B"), struct.Struct("<H"), struct.Struct("<I")
_CRC_BYTES = 4

REASONS = ("truncated", "bad-magic", "unsupported", "bad-checksum", "wrong-base", "bad-op",
           "bad-offset", "bad-index", "trailing", "target-mismatch", "not-patchable")


class PatchError(PqsuError):
    """A patch that cannot be made or must be refused; `reason` is a short key to count by."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class PatchInfo:
    """What a patch header says (cheap to read: no checksum or base check)."""

    version: int
    base_id: str
    target_id: str
    base_length: int
    target_length: int
    num_ops: int
    nbytes: int


@dataclass(frozen=True)
class TensorChange:
    """One "tensor" operation: `values` (raw element bytes) at flat `indices` (None: dense), or
    `steps` (B - A, int64) at `indices` for the step coding."""

    name: str
    data_type: int
    offset: int
    numel: int
    indices: np.ndarray | None
    values: bytes  # B's bytes of the changed elements (all of them when dense)
    full: bytes = b""  # B's bytes of the whole tensor, for the dense coding
    old: bytes = b""   # A's bytes of the changed elements, for the step coding
    steps: np.ndarray | None = None

    @property
    def changed(self) -> int:
        return self.numel if self.indices is None else int(self.indices.size)


# ---------------------------------------------------------------------------- make

def _as_uint(buf: bytes, span) -> np.ndarray:
    # Elements compared as unsigned ints of their width: bit-exact, so NaN or -0.0 never hide a change.
    return np.frombuffer(buf, f"<u{span.itemsize}", (span.end - span.start) // span.itemsize, span.start)


def _ids(a: bytes, b: bytes) -> tuple[str, str]:
    try:
        return model_id.verify(a), model_id.verify(b)
    except model_id.ModelIdError as exc:
        raise PatchError("not-patchable", str(exc)) from None


def diff(a: bytes, b: bytes) -> tuple[list[TensorChange], list[tuple[str, int, int, bytes]]]:
    """The tensor changes and metadata splices that turn A into B, or PatchError "not-patchable"."""
    try:
        sa, sb = spans(a), spans(b)
    except WireError as exc:
        raise PatchError("not-patchable", f"not a readable ONNX file: {exc}") from None
    shape = lambda s: (s.kind, s.key, s.data_type, s.end - s.start if s.kind == "tensor" else 0)  # noqa: E731
    if [shape(s) for s in sa] != [shape(s) for s in sb]:
        raise PatchError("not-patchable", "B has other tensors, types or sizes than A (send a keyframe)")
    tensors, splices = [], []
    pa = pb = 0
    for x, y in zip(sa + [None], sb + [None]):
        ea, eb = (x.start, y.start) if x else (len(a), len(b))
        if a[pa:ea] != b[pb:eb]:
            raise PatchError("not-patchable", f"bytes outside tensor values differ before byte {ea} of A")
        if x is None:
            break
        pa, pb = x.end, y.end
        if x.kind == "meta":
            if x.key != model_id.KEY and a[x.start:x.end] != b[y.start:y.end]:
                splices.append((x.key, x.start, x.end - x.start, b[y.start:y.end]))
            continue  # the id entry is rewritten by stamping, never carried
        ua, ub = _as_uint(a, x), _as_uint(b, y)
        idx = np.flatnonzero(ua != ub)
        if idx.size:
            tensors.append(TensorChange(x.key, x.data_type, x.start, ua.size, idx, ub[idx].tobytes(),
                                        b[y.start:y.end], ua[idx].tobytes()))
    return tensors, splices


def make_patch(a: bytes, b: bytes) -> bytes:
    """The patch that turns file A into file B, checked by applying it before it is returned."""
    base, target = _ids(a, b)
    tensors, splices = diff(a, b)
    ops = [(c.offset, _encode_tensor(c)) for c in tensors]
    ops += [(off, _encode_splice(key, off, old, new)) for key, off, old, new in splices]
    ops.sort(key=lambda op: op[0])
    head = _HEAD.pack(MAGIC, FORMAT_VERSION, 0, base.encode(), target.encode(), len(a), len(b), len(ops))
    body = b"".join([head] + [op for _, op in ops])
    patch = body + _U32.pack(zlib.crc32(body))
    if apply_patch(a, patch) != b:  # cannot happen unless this module has a bug: never ship one
        raise PatchError("target-mismatch", "the patch does not rebuild B")
    return patch


def _name(text: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > 0xFFFF:
        raise PatchError("not-patchable", f"name {text[:40]!r}... is over 65535 bytes")
    return _U16.pack(len(raw)) + raw


def _encode_tensor(c: TensorChange) -> bytes:
    head = [_U8.pack(OP_TENSOR), _name(c.name)]
    coding, index_data = varint.encode_index_set(c.indices, c.numel)
    candidates = [(CODING_DENSE, [c.full]),
                  (CODING_SPARSE, [_U32.pack(c.indices.size), _U8.pack(coding), index_data, c.values])]
    signed = stepcode.STEP_TYPES.get(c.data_type)
    if signed is not None:
        k, stream = stepcode.encode(c.indices, np.frombuffer(c.old, signed), np.frombuffer(c.values, signed))
        candidates.append((CODING_STEPS, [_STEPS.pack(c.indices.size, k, len(stream)), stream]))
    # the smallest; ties go to the simpler coding (dense, then sparse)
    coding, body = min(candidates, key=lambda cand: (sum(map(len, cand[1])), cand[0]))
    return b"".join(head + [_TENSOR.pack(c.data_type, c.offset, c.numel, coding)] + body)


def _encode_splice(key: str, offset: int, old: int, new: bytes) -> bytes:
    return b"".join([_U8.pack(OP_SPLICE), _name(key), _SPLICE.pack(offset, old, len(new)), new])


# ---------------------------------------------------------------------------- read and apply

class _Reader:
    """Bounds-checked cursor: every read names what it was for, so a truncation says where."""

    def __init__(self, buf: bytes, pos: int, end: int) -> None:
        self.buf, self.pos, self.end = buf, pos, end

    def take(self, n: int, what: str) -> bytes:
        if n > self.end - self.pos:
            raise PatchError("truncated", f"{what} needs {n} bytes, {self.end - self.pos} left")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, st: struct.Struct, what: str) -> tuple:
        return st.unpack(self.take(st.size, what))

    def name(self, what: str) -> str:
        raw = self.take(self.unpack(_U16, f"{what} length")[0], what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise PatchError("bad-op", f"{what} is not UTF-8") from None


def _header(patch: bytes) -> PatchInfo:
    if not isinstance(patch, (bytes, bytearray, memoryview)):
        raise PatchError("bad-op", f"a patch is bytes, got {type(patch).__name__}")
    patch = bytes(patch)
    if len(patch) < 4 or patch[:4] != MAGIC:
        if len(patch) < 4 and MAGIC.startswith(patch):
            raise PatchError("truncated", f"{len(patch)} bytes, the header alone is {_HEAD.size}")
        raise PatchError("bad-magic", f"starts with {patch[:4]!r}, not {MAGIC!r}: not an fl-pqsu patch")
    if len(patch) < _HEAD.size + _CRC_BYTES:
        raise PatchError("truncated", f"{len(patch)} bytes, header and checksum alone are {_HEAD.size + 4}")
    _, version, flags, base, target, base_len, target_len, count = _HEAD.unpack_from(patch)
    if version != FORMAT_VERSION or flags:
        raise PatchError("unsupported", f"patch version {version} flags 0x{flags:02x} "
                                        f"(this build reads version {FORMAT_VERSION}, no flags)")
    try:
        ids = base.decode("ascii"), target.decode("ascii")
    except UnicodeDecodeError:
        raise PatchError("bad-op", "model ids are not ASCII") from None
    return PatchInfo(version, ids[0], ids[1], base_len, target_len, count, len(patch))


def read_header(patch: bytes) -> PatchInfo:
    """Base and target ids and sizes, for a device deciding whether a patch is for it."""
    return _header(patch)


def _read_tensor(r: _Reader, i: int, base_len: int) -> TensorChange:
    name = r.name(f"op #{i} tensor name")
    data_type, offset, numel, coding = r.unpack(_TENSOR, f"tensor {name!r} header")
    size = ITEMSIZE.get(data_type, 1)
    if offset + numel * size > base_len:
        raise PatchError("bad-offset", f"tensor {name!r} at {offset}+{numel * size} runs past A ({base_len} bytes)")
    if coding == CODING_DENSE:
        return TensorChange(name, data_type, offset, numel, None, r.take(numel * size, f"tensor {name!r} values"))
    if coding == CODING_STEPS:
        if data_type not in stepcode.STEP_TYPES:
            raise PatchError("bad-op", f"tensor {name!r}: the step coding is for integer tensors, not type {data_type}")
        nnz, k, nbytes = r.unpack(_STEPS, f"tensor {name!r} step header")
        stream = r.take(nbytes, f"tensor {name!r} step stream")
        try:
            indices, steps = stepcode.decode(stream, nnz, k, numel)
        except CodecError as exc:
            raise PatchError("bad-index", f"tensor {name!r}: {exc}") from None
        return TensorChange(name, data_type, offset, numel, indices, b"", steps=steps)
    if coding != CODING_SPARSE:
        raise PatchError("bad-op", f"tensor {name!r}: unknown coding {coding}")
    nnz, index_coding = r.unpack(struct.Struct("<IB"), f"tensor {name!r} sparse header")
    if nnz > numel:
        raise PatchError("bad-index", f"tensor {name!r}: {nnz} changes for {numel} elements")
    try:  # the update codec's index coding (docs/protocol.md, "Update codec")
        if index_coding == varint.INDEX_VARINT:
            (nbytes,) = r.unpack(_U32, f"tensor {name!r} index stream length")
            stream = np.frombuffer(r.take(nbytes, f"tensor {name!r} indices"), np.uint8)
            gaps = varint.decode_uvarints(stream, nnz, varint.max_uvarint_bytes(numel))
            indices = varint.indices_from_gaps(gaps, numel)
        elif index_coding == varint.INDEX_BITMAP:
            bitmap = np.frombuffer(r.take((numel + 7) // 8, f"tensor {name!r} bitmap"), np.uint8)
            indices = varint.decode_bitmap(bitmap, nnz, numel)
        else:
            raise PatchError("bad-op", f"tensor {name!r}: unknown index coding {index_coding}")
    except CodecError as exc:
        raise PatchError("bad-index", f"tensor {name!r}: {exc}") from None
    return TensorChange(name, data_type, offset, numel, indices, r.take(nnz * size, f"tensor {name!r} values"))


def _read_ops(patch: bytes, info: PatchInfo) -> list:
    r = _Reader(patch, _HEAD.size, len(patch) - _CRC_BYTES)
    ops, last_end = [], 0
    for i in range(info.num_ops):
        (kind,) = r.unpack(_U8, f"op #{i} kind")
        if kind == OP_TENSOR:
            op = _read_tensor(r, i, info.base_length)
            start, end = op.offset, op.offset + op.numel * ITEMSIZE.get(op.data_type, 1)
        elif kind == OP_SPLICE:
            key = r.name(f"op #{i} metadata key")
            offset, old, new = r.unpack(_SPLICE, f"splice {key!r} header")
            if offset + old > info.base_length:
                raise PatchError("bad-offset", f"splice {key!r} at {offset}+{old} runs past A")
            op = (offset, old, r.take(new, f"splice {key!r} bytes"))
            start, end = offset, offset + old
        else:
            raise PatchError("bad-op", f"op #{i}: unknown kind {kind}")
        if start < last_end:  # sorted and disjoint: one well-defined result, linear work
            raise PatchError("bad-offset", f"op #{i} at byte {start} overlaps or precedes the previous op")
        last_end = end
        ops.append(op)
    if r.pos != r.end:
        raise PatchError("trailing", f"{r.end - r.pos} bytes after the last op")
    return ops


def apply_patch(a: bytes, patch: bytes) -> bytes:
    """File B from file A and the patch A -> B, verified to hash to B's id; else PatchError."""
    info = _header(patch)
    patch = bytes(patch)
    (crc,) = _U32.unpack_from(patch, len(patch) - _CRC_BYTES)
    if zlib.crc32(memoryview(patch)[:-_CRC_BYTES]) != crc:
        raise PatchError("bad-checksum", "CRC32 mismatch: the patch is corrupt, truncated or extended")
    a = bytes(a)
    try:
        held = model_id.verify(a)
    except model_id.ModelIdError as exc:
        raise PatchError("wrong-base", f"the model held is not intact: {exc}") from None
    if held != info.base_id or len(a) != info.base_length:
        raise PatchError("wrong-base", f"patch is for {info.base_id}, the model held is {held}")
    ops = _read_ops(patch, info)
    out = bytearray(a)
    pieces, at = [], 0
    for op in ops:
        if isinstance(op, TensorChange):
            if op.steps is not None:
                view = np.frombuffer(out, stepcode.STEP_TYPES[op.data_type], op.numel, op.offset)
                try:
                    view[op.indices] = stepcode.stepped(view[op.indices], op.steps)
                except CodecError as exc:
                    raise PatchError("bad-index", f"tensor {op.name!r}: {exc}") from None
                del view
                continue
            view = np.frombuffer(out, f"<u{ITEMSIZE.get(op.data_type, 1)}", op.numel, op.offset)
            new = np.frombuffer(op.values, view.dtype)
            if op.indices is None:
                view[:] = new
            else:
                view[op.indices] = new
            del view  # release the buffer export before `out` is sliced below
        else:
            offset, old, new = op
            pieces += [out[at:offset], new]
            at = offset + old
    pieces.append(out[at:])
    result = b"".join(pieces)
    if len(result) != info.target_length:
        raise PatchError("target-mismatch", f"result is {len(result)} bytes, target is {info.target_length}")
    try:
        result, got = model_id.stamp(result)
    except model_id.ModelIdError as exc:
        raise PatchError("target-mismatch", str(exc)) from None
    if got != info.target_id:
        raise PatchError("target-mismatch", f"result hashes to {got}, the patch promised {info.target_id}")
    return result


def changed_entries(patch: bytes) -> dict[str, int]:
    """Elements each tensor op of a (valid) patch rewrites, by initializer name."""
    info = _header(patch)
    return {op.name: op.changed for op in _read_ops(bytes(patch), info) if isinstance(op, TensorChange)}
