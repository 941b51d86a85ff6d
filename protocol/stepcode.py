"""Step coding: the changed entries of an integer tensor as a bit stream of gaps and steps.

Between keyframes most int8 weights that change move by one quantization step, at indices
a few dozen entries apart. Bytes per change (a value byte and a varint gap byte) are then
mostly wasted; this coding spends about 8 bits per ±1 change at 5% density instead of 16:

- the index gap (``index - previous index - 1``, the first index itself) in a Rice code of
  parameter ``k``: ``gap >> k`` one-bits, a zero-bit, then the low ``k`` bits of the gap;
- the step ``d = B - A`` (signed, in the tensor's own integer type): ``0`` and a sign bit
  for ±1 (``00`` is +1, ``01`` is -1); otherwise ``1`` and an order-0 Exp-Golomb code of
  ``zigzag(d) - 3`` (``zigzag(d)`` is ``2d`` for d > 0, ``-2d - 1`` for d < 0, and is >= 3
  once ±1 is excluded).

Bits are written most significant first within each byte (np.packbits order); the stream
is padded with zero bits to a whole byte. The encoder picks the ``k`` that gives the
shortest stream. Decoding needs A's values (a step is relative to them) and refuses, with
`StepCodeError`, a stream that runs short, leaves bits over, pads with ones, points past
the tensor, or steps a value out of its type's range. Specified in docs/patches.md.
"""
from __future__ import annotations

import numpy as np

from pqsu.protocol.errors import CodecError

MAX_RICE_K = 24          # gaps are < 2**32; a larger k never pays
MAX_GOLOMB_PREFIX = 40   # zigzag of an int32 step is < 2**33: 34 leading zeros at most
_WINDOW = 24             # bits read at once for a Rice remainder (k <= MAX_RICE_K)

# Integer ONNX element types the step coding is defined for, with their numpy dtype.
STEP_TYPES = {3: np.dtype("<i1"), 5: np.dtype("<i2"), 6: np.dtype("<i4")}


class StepCodeError(CodecError):
    """A step-coded stream that does not decode to valid values."""


def _zigzag(d: np.ndarray) -> np.ndarray:
    return np.where(d > 0, 2 * d, -2 * d - 1).astype(np.uint64)


def _rice_bits(gaps: np.ndarray, k: int) -> int:
    return int((gaps >> np.uint64(k)).sum(dtype=np.uint64)) + gaps.size * (k + 1)


def best_k(gaps: np.ndarray) -> int:
    """The Rice parameter giving the fewest bits for these gaps."""
    if gaps.size == 0:
        return 0
    return min(range(MAX_RICE_K + 1), key=lambda k: _rice_bits(gaps, k))


def _golomb_lengths(n: np.ndarray) -> np.ndarray:
    """Bits of the order-0 Exp-Golomb code of each n >= 0: 2 * bit_length(n + 1) - 1."""
    m = n + np.uint64(1)
    length = np.zeros(m.shape, np.int64)
    for b in range(64):
        length[(m >> np.uint64(b)) > 0] = b + 1
    return 2 * length - 1


def encode(indices: np.ndarray, old: np.ndarray, new: np.ndarray) -> tuple[int, bytes]:
    """(Rice k, packed stream) for the changes old -> new at sorted unique `indices`."""
    indices = np.asarray(indices, np.int64)
    d = new.astype(np.int64) - old.astype(np.int64)
    if np.any(d == 0):
        raise ValueError("a step-coded change cannot be zero")
    gaps = (np.diff(indices, prepend=np.int64(-1)) - 1).astype(np.uint64)
    k = best_k(gaps)
    q = (gaps >> np.uint64(k)).astype(np.int64)
    small = np.abs(d) == 1
    golomb = np.where(small, np.uint64(0), _zigzag(d) - np.uint64(3))
    glen = np.where(small, 0, _golomb_lengths(golomb))
    lengths = q + 1 + k + np.where(small, 2, 1 + glen)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    total = int(lengths.sum())
    bits = np.zeros(total, np.uint8)
    # unary quotient: q ones from each start (the terminating zero is already there)
    ones = np.repeat(starts, q) + (np.arange(int(q.sum())) - np.repeat(np.cumsum(q) - q, q))
    bits[ones] = 1
    at = starts + q + 1
    for j in range(k):
        bits[at + j] = ((gaps >> np.uint64(k - 1 - j)) & np.uint64(1)).astype(np.uint8)
    at = at + k
    bits[at[~small]] = 1                                    # escape flag; ±1 keeps its 0
    bits[at[small] + 1] = (d[small] < 0).astype(np.uint8)   # sign of a ±1 step
    # Exp-Golomb of n: (len(n+1) - 1) zeros, then n + 1 in binary, most significant first
    big = np.flatnonzero(~small)
    m = golomb[big] + np.uint64(1)
    nbits = (glen[big] + 1) // 2
    first = at[big] + 1 + nbits - 1
    for j in range(int(nbits.max()) if big.size else 0):
        live = nbits > j
        bits[first[live] + j] = ((m[live] >> np.uint64(nbits[live] - 1 - j)) & np.uint64(1)).astype(np.uint8)
    return k, np.packbits(bits).tobytes()


def decode(stream: bytes, nnz: int, k: int, numel: int) -> tuple[np.ndarray, np.ndarray]:
    """(sorted indices, int64 steps) from a stream `encode` made; StepCodeError else.

    Work is bounded by the stream's length: every change takes at least k + 3 bits, so nnz
    is checked against it before anything is decoded. A code word's length depends only on
    where it starts, so the end of a word starting at every bit is computed at once with
    numpy; the one sequential part, hopping from word to word, is a loop over plain ints.
    A stream that does not decode is decoded again word by word (`_decode_words`), which
    names the first change that is wrong and why.
    """
    if k > MAX_RICE_K:
        raise StepCodeError(f"Rice parameter {k} is over {MAX_RICE_K}")
    if nnz > numel:
        raise StepCodeError(f"{nnz} changes for {numel} elements")
    if nnz * (k + 3) > 8 * len(stream):
        raise StepCodeError(f"{nnz} changes need at least {nnz * (k + 3)} bits, the stream has {8 * len(stream)}")
    bits = np.unpackbits(np.frombuffer(stream, np.uint8))
    n = bits.size
    next_zero, next_one = _next_bits(bits)
    sink = n + 1  # where a word that cannot be read "ends"; it ends there too
    flag_at = next_zero + 1 + k  # a word starting at p: unary ones up to next_zero[p], then k bits, then the flag
    ok = (next_zero < n) & (flag_at + 2 <= n)
    flag_at = np.minimum(flag_at, n - 1) if n else flag_at
    escaped = ok & (bits[flag_at] == 1) if n else ok
    o = next_one[np.minimum(flag_at + 1, n)]
    lead = o - (flag_at + 1)
    ok &= ~escaped | ((lead <= MAX_GOLOMB_PREFIX) & (o + lead < n))
    ends = np.where(ok, np.where(escaped, o + lead + 1, flag_at + 2), sink)
    hop = np.append(ends, sink).tolist()
    words = [0] * nnz
    p = 0
    for i in range(nnz):
        words[i] = p
        p = hop[p]
    if p == sink or (n - p) >= 8 or bits[p:].any():
        return _decode_words(bits, nnz, k, numel, next_zero, next_one)
    at = np.asarray(words, np.int64)
    quotient_end = next_zero[at]
    gaps = (quotient_end - at) << k
    padded = np.concatenate([bits, np.zeros(MAX_RICE_K, np.uint8)]).astype(np.int64)
    for j in range(k):
        gaps |= padded[quotient_end + 1 + j] << (k - 1 - j)
    indices = np.cumsum(gaps + 1) - 1
    if indices.size and indices[-1] >= numel:
        return _decode_words(bits, nnz, k, numel, next_zero, next_one)
    flags = quotient_end + 1 + k
    steps = np.where(padded[flags + 1] == 1, -1, 1).astype(np.int64)
    big = np.flatnonzero(padded[flags] == 1)
    if big.size:
        first = next_one[flags[big] + 1]
        width = first - (flags[big] + 1) + 1      # the Exp-Golomb value's bits, from its leading one
        m = np.zeros(big.size, np.int64)
        for j in range(int(width.max())):
            live = width > j
            m[live] = (m[live] << 1) | padded[first[live] + j]
        zz = m + 2
        steps[big] = np.where(zz % 2 == 0, zz // 2, -(zz + 1) // 2)
    return indices, steps


def _next_bits(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each position 0..n, the position of the next zero bit and of the next one bit (n: none)."""
    n = bits.size
    at = np.arange(n + 1)
    one = np.append(bits, 1) == 1  # past the end counts as both, so a search from n finds n
    zero = np.append(bits, 0) == 0
    return (np.minimum.accumulate(np.where(zero, at, n)[::-1])[::-1],
            np.minimum.accumulate(np.where(one, at, n)[::-1])[::-1])


def _decode_words(bits: np.ndarray, nnz: int, k: int, numel: int, next_zero: np.ndarray,
                  next_one: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`decode` one change at a time: slower, and the first wrong change is named with its reason."""
    n = bits.size
    padded = np.concatenate([bits, np.zeros(_WINDOW, np.uint8)]).astype(np.int64)
    window = np.zeros(n + 1, np.int64)
    for j in range(_WINDOW):
        window |= padded[j:j + n + 1] << (_WINDOW - 1 - j)
    indices = np.empty(nnz, np.int64)
    steps = np.empty(nnz, np.int64)
    p, index = 0, -1
    for i in range(nnz):
        z = int(next_zero[p])
        if z >= n:
            raise StepCodeError(f"change {i}: the stream ends inside a gap")
        gap = ((z - p) << k) | (int(window[z + 1]) >> (_WINDOW - k) if k else 0)
        p = z + 1 + k
        index += gap + 1
        if index >= numel or p + 2 > n:
            raise StepCodeError(f"change {i}: index {index} of {numel} elements, or the stream ends")
        indices[i] = index
        if not bits[p]:
            steps[i] = -1 if bits[p + 1] else 1
            p += 2
            continue
        o = int(next_one[p + 1])
        lead = o - (p + 1)
        if lead > MAX_GOLOMB_PREFIX or o + lead >= n:
            raise StepCodeError(f"change {i}: an escaped step runs past the stream or over {MAX_GOLOMB_PREFIX} bits")
        m = 0
        for b in bits[o:o + lead + 1]:
            m = (m << 1) | int(b)
        p = o + lead + 1
        zz = m - 1 + 3
        steps[i] = zz // 2 if zz % 2 == 0 else -(zz + 1) // 2
    if (n - p) >= 8 or bits[p:].any():
        raise StepCodeError(f"{n - p} bits left over after the last change (only zero padding to a byte may follow)")
    return indices, steps


def stepped(old: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """A's values `old` moved by `steps`, in old's dtype; StepCodeError if one leaves its range."""
    info = np.iinfo(old.dtype)
    values = old.astype(np.int64) + steps
    if values.size and (values.min() < info.min or values.max() > info.max):
        raise StepCodeError(f"a step takes a value out of the {old.dtype} range [{info.min}, {info.max}]")
    return values.astype(old.dtype)
