"""Deterministic fuzzing of `decode`: any byte string gives an Update or a CodecError.

Most random mutations die at the CRC check, which would leave the parser untested, so most
mutants get their CRC recomputed and travel all the way through block parsing. The test also
asserts that a good share of mutants really reach the parser, and that every rejection carries
one of the documented reasons (each of which the mutants produce).
"""

from __future__ import annotations

import random
import struct
import zlib
from collections import Counter

import numpy as np

from pqsu.protocol.codec import Limits, TensorBlock, Update, decode, encode
from pqsu.protocol.errors import CodecError

REASONS = {"corrupt", "bad-checksum", "bad-signature", "oversize", "truncated", "unsupported"}

SEED = 0x5EED_C0DE
RUNS = 12_000
KEY = b"fuzz-key"
SMALL = Limits(max_payload_bytes=1 << 16, max_tensors=16, max_elements_per_tensor=1 << 16,
               max_total_elements=1 << 18, max_name_bytes=32, max_ndim=4)


def _seed_payloads() -> list[bytes]:
    rng = np.random.default_rng(SEED)
    dense = TensorBlock.dense("conv.w", rng.normal(size=(4, 2, 3, 3)))
    bias = TensorBlock.dense("conv.b", rng.normal(size=4))
    sparse = TensorBlock.sparse("fc.w", (40, 30), rng.choice(1200, 25, replace=False),
                                rng.normal(size=25))
    wide = TensorBlock.sparse("fc.w2", (300, 100), [0, 127, 128, 16_511, 29_999],
                              rng.normal(size=5))  # multi-byte varints
    bitmap = TensorBlock.sparse("fc.b", (64,), np.arange(0, 64, 2), rng.normal(size=32))
    skip = TensorBlock.skip("frozen", (8, 8))
    scalar = TensorBlock.dense("temp", np.float32(0.7))
    fp32 = TensorBlock.dense_fp32("fc.w3", rng.normal(size=(3, 5)))
    fp32_edges = TensorBlock.dense_fp32("edge", np.float32([0.0, -0.0, 1e-45, -3.4e38, 3.4e38]))
    updates = [Update(1, "dev-a", "m1", 10, 0.5, (dense, bias, sparse, skip)),
               Update(7, "dev-ü", "m2", 3, 1.5, (wide, bitmap, scalar)),
               Update(0, "", "", 0, 0.0, ()),
               Update(2, "dev-b", "m1", 8, 0.25, (fp32, fp32_edges, skip))]
    payloads = [encode(u) for u in updates]
    assert sum(b.index_coding == "bitmap" for b in (sparse, wide, bitmap)) == 1
    return payloads + [encode(u, key=KEY) for u in (updates[0], updates[1], updates[3])]


def _refresh_crc(p: bytes) -> bytes:
    # Puts a correct CRC where the (possibly mutated) flags byte says the trailer starts.
    signed = len(p) > 6 and p[6] & 1
    end = len(p) - 4 - (32 if signed else 0)
    if end < 0:
        return p
    return p[:end] + struct.pack("<I", zlib.crc32(p[:end])) + p[end + 4:]


def _mutate(rnd: random.Random, p: bytes, seeds: list[bytes]) -> bytes:
    b = bytearray(p)
    op = rnd.randrange(9)
    if op == 0 and b:  # bit flips
        for _ in range(rnd.randint(1, 4)):
            i = rnd.randrange(len(b))
            b[i] ^= 1 << rnd.randrange(8)
    elif op == 1 and b:  # byte overwrites, biased toward boundary values
        for _ in range(rnd.randint(1, 4)):
            b[rnd.randrange(len(b))] = rnd.choice([0, 1, 0x7F, 0x80, 0xFF, rnd.randrange(256)])
    elif op == 2 and len(b) >= 4:  # a 32-bit field set to an extreme (counts, dims, nnz)
        i = rnd.randrange(len(b) - 3)
        b[i:i + 4] = struct.pack("<I", rnd.choice([0, 1, 2**31, 2**32 - 1, rnd.randrange(2**32)]))
    elif op == 3:  # truncation
        del b[rnd.randrange(len(b) + 1):]
    elif op == 4:  # insertion
        i = rnd.randrange(len(b) + 1)
        b[i:i] = rnd.randbytes(rnd.randint(1, 16))
    elif op == 5:  # deletion of a span
        i = rnd.randrange(len(b) + 1)
        del b[i:i + rnd.randint(1, 16)]
    elif op == 6:  # splice of two valid payloads
        other = rnd.choice(seeds)
        b = b[:rnd.randrange(len(b) + 1)] + other[rnd.randrange(len(other) + 1):]
    elif op == 7:  # duplicated span
        i = rnd.randrange(len(b) + 1)
        b[i:i] = b[i:i + rnd.randint(1, 32)]
    else:  # random bytes, sometimes behind a valid magic/version/kind
        b = bytearray(rnd.randbytes(rnd.randint(0, 80)))
        if rnd.random() < 0.5:
            b[:7] = b"PQSU\x01\x01" + bytes([rnd.randrange(2)])
    return bytes(b)


def _check_decoded(update: Update) -> None:
    # The decoder builds blocks without re-running __post_init__: prove it upholds the same
    # invariants, and that what it accepted re-encodes to the same update.
    assert isinstance(update, Update)
    for b in update.blocks:
        assert TensorBlock(b.name, b.shape, b.kind, b.q, b.scale, b.indices) == b
        if b.numel <= 1 << 16:
            assert b.dequantize().shape == b.shape
    assert decode(encode(update)) == update


def test_decode_never_raises_anything_but_codec_error():
    rnd = random.Random(SEED)
    seeds = _seed_payloads()
    outcomes: Counter[str] = Counter()
    foreign: list[tuple[bytes, BaseException]] = []
    for _ in range(RUNS):
        payload = _mutate(rnd, rnd.choice(seeds), seeds)
        if rnd.random() < 0.2:  # stack a second mutation now and then
            payload = _mutate(rnd, payload, seeds)
        if rnd.random() < 0.75:
            payload = _refresh_crc(payload)
        key = KEY if rnd.random() < 0.1 else None
        limits = SMALL if rnd.random() < 0.3 else Limits()
        try:
            update = decode(payload, key=key, limits=limits)
        except CodecError as e:
            assert str(e), "a CodecError must say what was wrong"
            assert e.reason in REASONS, f"undocumented reason {e.reason!r}: {e}"
            outcomes[e.reason] += 1
            continue
        except Exception as e:  # noqa: BLE001 - exactly what this test hunts
            foreign.append((payload, e))
            continue
        outcomes["ok"] += 1
        _check_decoded(update)
    assert not foreign, f"{len(foreign)} foreign exceptions, first: {foreign[0][1]!r} " \
                        f"on {foreign[0][0].hex()}"
    assert sum(outcomes.values()) == RUNS
    # The parser itself was exercised, not just the checksum, and every reason came up.
    assert RUNS - outcomes["bad-checksum"] - outcomes["ok"] > RUNS * 0.4, outcomes
    assert outcomes["ok"] > RUNS * 0.01, outcomes
    assert set(outcomes) == REASONS | {"ok"}, outcomes
