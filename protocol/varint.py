"""Compact codings of sorted index sets: LEB128 varint gaps and bitmaps, vectorized.

A sparse update of a 1M-entry tensor carries ~10^4 indices; at thousands of updates per
second on the coordinator a Python loop per index is not affordable, so every function here
works on whole arrays (one numpy pass per varint byte position, at most 5 for u32 indices).

Gap coding stores ``indices[0]`` and then ``indices[i] - indices[i-1] - 1``: every decoded
sequence is strictly increasing by construction, so duplicates and unsorted indices cannot be
expressed on the wire at all; only the upper bound needs checking.

Decoders treat their input as hostile and raise `CodecError` with the reason.
"""

from __future__ import annotations

import numpy as np

from pqsu.protocol.errors import CodecError

__all__ = [
    "INDEX_VARINT",
    "INDEX_BITMAP",
    "encode_index_set",
    "uvarint_sizes",
    "encode_uvarints",
    "decode_uvarints",
    "max_uvarint_bytes",
    "gaps_from_indices",
    "indices_from_gaps",
    "encode_bitmap",
    "decode_bitmap",
]

INDEX_VARINT, INDEX_BITMAP = 0, 1  # the "index coding" byte of a sparse block


def encode_index_set(indices: np.ndarray, numel: int) -> tuple[int, bytes]:
    """The smaller wire coding of sorted unique `indices` in [0, numel): (coding, index data).

    Varint data is a u32 (little-endian) byte length followed by the gap stream; bitmap data
    is ceil(numel / 8) bytes. Both are sized before either is built; ties go to varint.
    """
    gaps = gaps_from_indices(indices)
    varint_bytes = 4 + int(uvarint_sizes(gaps).sum(dtype=np.int64))
    if (numel + 7) // 8 < varint_bytes:
        return INDEX_BITMAP, encode_bitmap(indices, numel).tobytes()
    stream = encode_uvarints(gaps).tobytes()
    return INDEX_VARINT, len(stream).to_bytes(4, "little") + stream


def max_uvarint_bytes(bound: int) -> int:
    """Longest canonical LEB128 encoding of a value < `bound` (at least 1 byte)."""
    return max(1, -(-max(bound - 1, 0).bit_length() // 7))


def uvarint_sizes(values: np.ndarray) -> np.ndarray:
    """Bytes each value takes as LEB128 (uint8 array, same length as `values`)."""
    v = np.asarray(values, dtype=np.uint64)
    sizes = np.ones(v.shape, dtype=np.uint8)
    if v.size == 0:
        return sizes
    top = int(v.max())
    shift = 7
    while shift < 64 and top >> shift:
        sizes += v >= np.uint64(1 << shift)
        shift += 7
    return sizes


def encode_uvarints(values: np.ndarray) -> np.ndarray:
    """LEB128-encode unsigned values; returns the concatenated bytes as a uint8 array."""
    v = np.asarray(values, dtype=np.uint64).reshape(-1)
    sizes = uvarint_sizes(v)
    ends = np.cumsum(sizes, dtype=np.int64)
    out = np.empty(int(ends[-1]) if v.size else 0, dtype=np.uint8)
    starts = ends - sizes
    for k in range(int(sizes.max()) if v.size else 0):
        sel = np.flatnonzero(sizes > k)
        byte = (v[sel] >> np.uint64(7 * k)) & np.uint64(0x7F)
        byte |= np.where(sizes[sel] > k + 1, np.uint64(0x80), np.uint64(0))
        out[starts[sel] + k] = byte
    return out


def decode_uvarints(buf: np.ndarray, count: int, max_bytes: int) -> np.ndarray:
    """Decode exactly `count` canonical LEB128 values filling all of `buf` (uint8).

    Rejects: a stream that holds more or fewer values, one that ends inside a varint, any
    varint longer than `max_bytes` (callers pass what their value bound needs), and
    non-canonical encodings (a redundant trailing 0x00 byte), so one index set has exactly one
    wire form.
    """
    max_bytes = min(max_bytes, 9)  # 9 x 7 = 63 bits: every shift stays inside uint64
    if count == 0:
        if buf.size:
            raise CodecError(f"index stream has {buf.size} bytes but nnz is 0")
        return np.empty(0, dtype=np.uint64)
    if buf.size == count:  # the common case at low density: every gap < 128
        if buf.max() >= 0x80:
            raise CodecError("index stream ends inside a varint")
        return buf.astype(np.uint64)
    ends = (buf < 0x80).nonzero()[0]  # the last byte of every varint
    if ends.size == 0 or ends[-1] != buf.size - 1:
        raise CodecError("index stream ends inside a varint")
    if ends.size != count:
        raise CodecError(f"index stream holds {ends.size} varints, nnz says {count}")
    starts = np.empty_like(ends)  # (np.diff with prepend= would cost more than all the rest)
    starts[0] = 0
    np.add(ends[:-1], 1, out=starts[1:])
    extra = ends - starts  # continuation bytes of each varint
    longest = int(extra.max()) + 1
    if longest > max_bytes:
        raise CodecError(f"varint longer than {max_bytes} bytes (value out of range)")
    multi = extra.nonzero()[0]
    if np.count_nonzero(buf[ends[multi]]) < multi.size:  # a last byte 0x00 after others
        raise CodecError("non-canonical varint (redundant trailing zero byte)")
    # One pass per byte position, each over only the varints that long: cheaper than a
    # segmented reduction because almost all gaps take one or two bytes.
    values = (buf[starts] & 0x7F).astype(np.uint64)
    for k in range(1, longest):
        if k > 1:
            multi = multi[extra[multi] >= k]
        values[multi] |= (buf[starts[multi] + k] & 0x7F).astype(np.uint64) << np.uint64(7 * k)
    return values


def gaps_from_indices(indices: np.ndarray) -> np.ndarray:
    """Sorted unique int64 indices -> uint64 gaps (first index, then distance - 1)."""
    gaps = np.diff(indices, prepend=np.int64(-1)) - 1
    return gaps.astype(np.uint64)


def indices_from_gaps(gaps: np.ndarray, numel: int) -> np.ndarray:
    """Inverse of `gaps_from_indices`, checking every index is < `numel`.

    Each gap is checked < numel first, so the running sum stays below nnz * numel, which
    fits uint64 as long as numel < 2**32 (`Limits` enforces that).
    """
    if gaps.size == 0:
        return np.empty(0, dtype=np.int64)
    if int(gaps.max()) >= numel:
        raise CodecError(f"index gap {int(gaps.max())} out of range for {numel} elements")
    idx = (gaps + np.uint64(1)).cumsum()  # uint64 in, uint64 out
    idx -= np.uint64(1)
    if int(idx[-1]) >= numel:
        raise CodecError(f"index {int(idx[-1])} out of range for {numel} elements")
    return idx.view(np.int64)  # every index < numel < 2**63: the same bits


def encode_bitmap(indices: np.ndarray, numel: int) -> np.ndarray:
    """One bit per element, MSB first within each byte (np.packbits order)."""
    bits = np.zeros(numel, dtype=bool)
    bits[indices] = True
    return np.packbits(bits)


def decode_bitmap(buf: np.ndarray, nnz: int, numel: int) -> np.ndarray:
    """Set bits of a ceil(numel/8)-byte bitmap -> sorted int64 indices.

    Only the non-zero bytes are unpacked, so memory is O(nnz), not O(numel): a tiny bitmap
    claiming a huge tensor costs no more than the bytes actually sent.
    """
    if np.count_nonzero(buf) > nnz:
        raise CodecError(f"bitmap has more set bits than nnz={nnz}")
    hot = np.flatnonzero(buf)
    bits = np.unpackbits(buf[hot]).reshape(-1, 8)
    row, col = np.nonzero(bits)
    if row.size != nnz:
        raise CodecError(f"bitmap has {row.size} set bits, nnz says {nnz}")
    idx = hot[row].astype(np.int64) * 8 + col
    if nnz and int(idx[-1]) >= numel:
        raise CodecError(f"bitmap sets bit {int(idx[-1])} beyond {numel} elements (padding)")
    return idx
