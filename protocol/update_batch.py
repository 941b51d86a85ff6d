"""Updates to one known model decoded straight into flat (position, int8 value) arrays, many at once.

The aggregator's fast path (issue 16: 2,000 updates/s/core). `codec.decode` builds one
`TensorBlock` per tensor, with several numpy calls each; at thousands of updates a second
that per-block Python is the cost. Here the receiver knows the model (`ModelLayout`: every
tensor's name, shape and offset in one flat vector). `scan` walks one payload's bytes in plain
Python (header, CRC, HMAC, each block's name and dims checked with one byte comparison);
`decode_batch` then decodes the varint index streams and values of a whole batch of scanned
payloads in one numpy pass each, into one `FlatBatch`: positions in the flat model vector,
int8 values, one scale per block. Summing the batch is one `np.add.at`
(`pqsu.cloud.aggregate.FedAvg`).

The fast path takes only what `codec.decode` accepts, and nothing it refuses: whenever a
payload is anything but the common case (a dense block, a tensor outside the layout, any
check failing), `scan` or `decode_batch` says None and the caller asks `codec.decode`, so
every refusal keeps its exact reason and a valid payload of another shape still decodes.
tests/protocol/test_update_batch.py checks both sides on valid, fuzzed and truncated payloads.
"""
from __future__ import annotations

import hashlib
import hmac
import math
import zlib
from dataclasses import dataclass

import numpy as np

from pqsu.protocol import block_wire as bw
from pqsu.protocol import codec, varint
from pqsu.protocol.update import _MAX_SCALE, Limits, Update, UpdateHeader

_KIND_SKIP, _KIND_SPARSE = bw.KIND_CODE["skip"], bw.KIND_CODE["sparse"]
_U32 = codec._U32


@dataclass(frozen=True)
class ModelLayout:
    """Tensors of a model in one flat vector: name -> (offset, numel), in the given order."""

    shapes: dict[str, tuple[int, ...]]

    def __post_init__(self) -> None:
        offsets, numels, prefixes, off = {}, {}, {}, 0
        for name, shape in self.shapes.items():
            shape = tuple(int(d) for d in shape)
            n = math.prod(shape)
            raw = name.encode("utf-8")
            # A block's bytes up to its kind: u16 name length, name, ndim, dims (block_wire.encode_block).
            prefixes[raw] = (bw.U16.pack(len(raw)) + raw + bw.U8.pack(len(shape)) + bw.DIMS[len(shape)].pack(*shape),
                             len(offsets))
            offsets[name], numels[name] = off, n
            off += n
        object.__setattr__(self, "offsets", offsets)
        object.__setattr__(self, "numels", numels)
        object.__setattr__(self, "total", off)
        object.__setattr__(self, "_prefixes", prefixes)
        object.__setattr__(self, "_numel", np.array(list(numels.values()) or [0], np.int64))
        object.__setattr__(self, "_offset", np.array(list(offsets.values()) or [0], np.int64))
        object.__setattr__(self, "_numel_list", list(numels.values()))
        object.__setattr__(self, "_maxlen", [varint.max_uvarint_bytes(n) for n in numels.values()])

    def fits(self, limits: Limits) -> bool:
        """Whether every tensor of the layout is within `limits` (else the fast path never applies)."""
        return self.total <= limits.max_total_elements and all(
            0 < len(name.encode("utf-8")) <= limits.max_name_bytes and len(shape) <= limits.max_ndim
            and self.numels[name] <= limits.max_elements_per_tensor for name, shape in self.shapes.items())


@dataclass(frozen=True)
class Scanned:
    """One payload after the byte walk (pure Python, no numpy): its header and where each sent block's
    index data lies. `blocks` entries are (tensor, nnz, scale, index start, index end, coding)."""

    header: UpdateHeader
    buf: bytes
    blocks: tuple[tuple[int, int, float, int, int, int], ...]


@dataclass(frozen=True)
class FlatBatch:
    """Decoded sparse updates to one layout: `q[j]` (int8) times its block's scale is the value at flat
    position `index[j]`. Blocks (`nnz`, `scale`, `owner`: which update of `headers`) are in the order of
    the entries."""

    headers: tuple[UpdateHeader, ...]
    index: np.ndarray   # int64
    q: np.ndarray       # int8
    nnz: np.ndarray     # int64, per block
    scale: np.ndarray   # float32, per block
    owner: np.ndarray   # int64, per block: its update's position in `headers`

    def __len__(self) -> int:
        return len(self.headers)

    @property
    def num_samples(self) -> np.ndarray:
        return np.array([h.num_samples for h in self.headers], np.float64)

    def norms(self) -> np.ndarray:
        """L2 norm of each dequantized update (as `aggregate.update_norm`)."""
        sq = np.square(self.q.astype(np.float32) * np.repeat(self.scale, self.nnz)).astype(np.float64)
        return np.sqrt(np.bincount(np.repeat(self.owner, self.nnz), weights=sq, minlength=len(self)))


def decode_flat(payload: bytes, layout: ModelLayout, *, key: bytes | None = None,
                limits: Limits = Limits()) -> FlatBatch | Update:
    """`payload` as a `FlatBatch` of one when it is a sparse/skip update to `layout`, else `codec.decode`'s
    answer (an `Update`, or the `CodecError` it raises). Accepts and refuses exactly what `codec.decode` does."""
    scanned = scan(payload, layout, key=key, limits=limits)
    batch = decode_batch([scanned], layout) if scanned is not None else None
    return batch if batch is not None else codec.decode(payload, key=key, limits=limits)


def scan(buf: bytes, layout: ModelLayout, *, key: bytes | None = None, limits: Limits = Limits(),
         head: tuple[UpdateHeader, int] | None = None) -> Scanned | None:
    """Header, trailer (CRC, HMAC) and block table of a sparse/skip update to `layout`. None whenever
    anything is unusual: the caller then asks `codec.decode`, which says why. `head`: the header and where
    the blocks start, when the caller has already read them (`codec.read_header(buf)`)."""
    if not isinstance(buf, bytes) or len(buf) > limits.max_payload_bytes \
            or (key is not None and (not isinstance(key, bytes) or not key)):
        return None
    if head is None:
        try:
            head = codec.read_header(buf)
        except codec.CodecError:
            return None
    header, pos = head
    if not math.isfinite(header.loss):
        return None
    body_end = len(buf) - codec._CRC_BYTES - (codec._MAC_BYTES if header.signed else 0)
    if body_end < pos or header.num_tensors > len(layout._prefixes) or header.num_tensors > limits.max_tensors:
        return None
    view = memoryview(buf)
    if zlib.crc32(view[:body_end]) != _U32.unpack_from(buf, body_end)[0]:
        return None
    if key is not None:
        if not header.signed:
            return None
        mac = hmac.new(key, view[:body_end + codec._CRC_BYTES], hashlib.sha256).digest()
        if not hmac.compare_digest(mac, buf[body_end + codec._CRC_BYTES:]):
            return None
    prefixes, numel_of, maxlen_of = layout._prefixes, layout._numel_list, layout._maxlen
    seen, blocks = set(), []
    sparse_head, u32 = bw.SPARSE_HEAD, _U32
    for _ in range(header.num_tensors):
        if pos + 2 > body_end:
            return None
        nlen = buf[pos] | buf[pos + 1] << 8
        entry = prefixes.get(buf[pos + 2:pos + 2 + nlen])
        if entry is None or entry[1] in seen or not buf.startswith(entry[0], pos):
            return None
        t = entry[1]
        seen.add(t)
        pos += len(entry[0])
        if pos >= body_end:
            return None
        kind = buf[pos]
        pos += 1
        if kind == _KIND_SKIP:
            continue
        if kind != _KIND_SPARSE or pos + 9 > body_end:
            return None
        nnz, scale, coding = sparse_head.unpack_from(buf, pos)
        pos += 9
        numel = numel_of[t]
        if nnz > numel or not 0 <= scale <= _MAX_SCALE:
            return None
        if coding == varint.INDEX_VARINT:
            if pos + 4 > body_end:
                return None
            (nbytes,) = u32.unpack_from(buf, pos)
            pos += 4
            if not nnz <= nbytes <= nnz * maxlen_of[t]:
                return None
        elif coding == varint.INDEX_BITMAP:
            nbytes = (numel + 7) // 8
        else:
            return None
        if pos + nbytes + nnz > body_end:
            return None
        blocks.append((t, nnz, scale, pos, pos + nbytes, coding))
        pos += nbytes + nnz
    if pos != body_end:
        return None
    return Scanned(header, buf, tuple(blocks))


def decode_batch(scanned: list[Scanned], layout: ModelLayout) -> FlatBatch | None:
    """Every scanned update's indices and values, decoded together (one numpy pass per step for the whole
    batch); None if any of them is invalid (the caller then finds which, one by one)."""
    varints = [(u, b) for u, s in enumerate(scanned) for b in s.blocks if b[5] == varint.INDEX_VARINT]
    bitmaps = [(u, b) for u, s in enumerate(scanned) for b in s.blocks if b[5] == varint.INDEX_BITMAP]
    blocks = varints + bitmaps  # the order of index, q, nnz, scale and owner below
    headers = tuple(s.header for s in scanned)
    if not blocks:
        empty = np.empty(0, np.int64)
        return FlatBatch(headers, empty, np.empty(0, np.int8), empty, np.empty(0, np.float32), empty)
    parts = []
    for group, decode in ((varints, _indices), (bitmaps, _bitmap_indices)):
        if group:
            got = decode(scanned, group, layout)
            if got is None:
                return None
            parts.append(got)
    index = np.concatenate(parts) if len(parts) > 1 else parts[0]
    q = np.frombuffer(b"".join([memoryview(scanned[u].buf)[b[4]:b[4] + b[1]] for u, b in blocks]), np.int8)
    if q.size and q.min() == -128:
        return None
    return FlatBatch(headers, index, q, np.array([b[1] for _, b in blocks], np.int64),
                     np.array([b[2] for _, b in blocks], np.float32), np.array([u for u, _ in blocks], np.int64))


def _joined(scanned: list[Scanned], group: list[tuple]) -> np.ndarray:
    """The index data of `group`'s blocks, back to back."""
    return np.frombuffer(b"".join([memoryview(scanned[u].buf)[b[3]:b[4]] for u, b in group]), np.uint8)


def _bitmap_indices(scanned: list[Scanned], group: list[tuple], layout: ModelLayout) -> np.ndarray | None:
    """Flat positions from the blocks' bitmaps (small tensors: biases), unpacked together; None if a
    block sets other than nnz bits or a padding bit."""
    tensors = np.array([b[0] for _, b in group], np.int64)
    nnz = np.array([b[1] for _, b in group], np.int64)
    nbytes = np.array([b[4] - b[3] for _, b in group], np.int64)
    bits = np.flatnonzero(np.unpackbits(_joined(scanned, group)))
    bit_start = 8 * (np.cumsum(nbytes) - nbytes)
    block = np.searchsorted(bit_start, bits, side="right") - 1
    if bits.size != int(nnz.sum()) or (np.bincount(block, minlength=len(group)) != nnz).any():
        return None
    local = bits - bit_start[block]
    if (local >= layout._numel[tensors[block]]).any():
        return None
    return local + layout._offset[tensors[block]]


def _indices(scanned: list[Scanned], group: list[tuple], layout: ModelLayout) -> np.ndarray | None:
    """Flat positions of every block's entries from their varint gap streams, decoded in one pass; None
    if any stream is not exactly its block's nnz canonical varints, or an index leaves its tensor."""
    buf = _joined(scanned, group)
    nnz = np.array([b[1] for _, b in group], np.int64)
    tensors = np.array([b[0] for _, b in group], np.int64)
    total = int(nnz.sum())
    if total == 0:
        return np.empty(0, np.int64)
    nonempty = nnz > 0
    block_end = np.cumsum([b[4] - b[3] for _, b in group])
    if buf.size == total:  # every gap < 128: one byte each, nothing to reassemble
        if buf.max() >= 0x80:
            return None
        steps, ends, first = buf.astype(np.int64), None, (np.cumsum(nnz) - nnz)[nonempty]
        steps += 1
    else:
        last = buf < 0x80
        ends = np.flatnonzero(last)  # the last byte of every varint
        if ends.size != total or not last[block_end[nonempty] - 1].all():
            return None  # a varint runs across a block boundary, or a stream ends inside one
        if (np.searchsorted(ends, block_end) != np.cumsum(nnz)).any():
            return None
        cont = ~last
        if (cont[:-1] & cont[1:]).any():  # a varint of 3 bytes or more (a gap of 2^14 or more): rare
            steps = _gaps(buf, cont, ends)
            ends, first = None, (np.cumsum(nnz) - nnz)[nonempty]
        else:
            steps = _two_byte_steps(buf, cont, last)
            first = np.concatenate(([0], block_end[:-1]))[nonempty]  # each block's first byte
        if steps is None:
            return None
    # out[j] = offset of its tensor + its index = a running sum of (gap + 1) restarted at each block, made
    # one cumsum by giving each block's first step what takes the sum from the last block's end to its
    # start. `steps` holds each gap + 1, or (`_two_byte_steps`) per byte, parts summing to it over each
    # varint, so that the running sum at a varint's last byte (`ends`) is its position. Gaps < 2^35 and
    # fewer than 2^26 of them per payload: no int64 overflow.
    sums = np.add.reduceat(steps, first)
    offset = layout._offset[tensors[nonempty]]
    begin = offset - 1  # the running sum just before each block's first entry
    end = begin + sums
    steps[first] += begin - np.concatenate(([0], end[:-1]))
    out = np.cumsum(steps, out=steps)
    # Indices increase within a block, so its last one bounds them all (and every gap).
    if (end >= offset + layout._numel[tensors[nonempty]]).any():
        return None
    return out if ends is None else out[ends]


def _two_byte_steps(buf: np.ndarray, cont: np.ndarray, last: np.ndarray) -> np.ndarray | None:
    """For a stream of 1- and 2-byte varints, what each byte adds to the running position: a first byte
    its low 7 bits, a last byte its bits shifted past the first byte's (by 7 if there is one) plus 1 (the
    gap's + 1). Summed over a varint, its gap + 1, with no per-varint gather. None if a 2-byte varint is not
    canonical (its last byte 0)."""
    after_cont = cont[:-1]
    if ((buf[1:] == 0) & after_cont).any():
        return None
    steps = (buf & 0x7F).astype(np.int64)
    np.left_shift(steps[1:], after_cont.view(np.uint8) * np.uint8(7), out=steps[1:])
    steps += last
    return steps


def _gaps(buf: np.ndarray, cont: np.ndarray, ends: np.ndarray) -> np.ndarray | None:
    """Each varint's gap + 1, for streams with varints of 3 to 5 bytes (gaps of 2^14 and more: rare)."""
    starts = np.empty_like(ends)
    starts[0] = 0
    np.add(ends[:-1], 1, out=starts[1:])
    multi = np.flatnonzero(cont[starts])  # varints longer than one byte (most gaps take one)
    if not buf[ends[multi]].all():
        return None  # non-canonical: a redundant trailing zero byte
    low = buf & 0x7F
    gaps = low[starts].astype(np.int64)
    k = 1
    while multi.size:  # byte k of the varints that have one; the set shrinks with k
        if k == 5:  # u32 indices: at most 5 bytes (codec.decode refuses each tensor's own bound)
            return None
        at = starts[multi] + k
        gaps[multi] |= low[at].astype(np.int64) << (7 * k)
        multi = multi[cont[at]]
        k += 1
    gaps += 1
    return gaps
