"""The batch decoder against `codec.decode`: the same values for every valid payload, the same refusal
(class and reason) for every corrupted one, and `codec.decode`'s answer for what it does not take."""
from __future__ import annotations

import numpy as np
import pytest

from pqsu.protocol.codec import TensorBlock, Update, decode, encode
from pqsu.protocol.errors import CodecError
from pqsu.protocol.update_batch import FlatBatch, ModelLayout, decode_batch, decode_flat, scan

SHAPES = {"conv.w": (16, 8, 3, 3), "conv.b": (16,), "fc.w": (10, 300), "fc.b": (10,)}
LAYOUT = ModelLayout(SHAPES)


def sparse_update(rng, device="d1", density=0.05, skip=()):
    blocks = []
    for name, shape in SHAPES.items():
        n = int(np.prod(shape))
        if name in skip:
            blocks.append(TensorBlock.skip(name, shape))
            continue
        idx = np.sort(rng.choice(n, max(1, int(n * density)), replace=False))
        blocks.append(TensorBlock.sparse(name, shape, idx, rng.normal(0, 1, idx.size)))
    return Update(3, device, "m1", int(rng.integers(1, 500)), 0.25, tuple(blocks))


def flat_values(update: Update) -> np.ndarray:
    out = np.zeros(LAYOUT.total, np.float64)
    for b in update.blocks:
        if b.q is not None:
            out[LAYOUT.offsets[b.name]:LAYOUT.offsets[b.name] + b.numel] += b.dequantize().reshape(-1)
    return out


def batch_values(batch: FlatBatch, which: int) -> np.ndarray:
    out = np.zeros(LAYOUT.total, np.float64)
    entry_owner = np.repeat(batch.owner, batch.nnz)
    mine = entry_owner == which
    vals = batch.q.astype(np.float32) * np.repeat(batch.scale, batch.nnz)
    np.add.at(out, batch.index[mine], vals[mine].astype(np.float64))
    return out


@pytest.mark.parametrize("density", [0.001, 0.05, 0.1, 0.5])  # 1-2 byte gaps, mostly 1, only 1, bitmaps
def test_a_batch_decodes_to_the_values_codec_decode_gives(density):
    rng = np.random.default_rng(1)
    updates = [sparse_update(rng, f"d{i}", density, skip=("fc.b",) if i % 3 == 0 else ()) for i in range(7)]
    payloads = [encode(u) for u in updates]
    batch = decode_batch([scan(p, LAYOUT) for p in payloads], LAYOUT)
    assert [h.device_id for h in batch.headers] == [u.device_id for u in updates]
    for i, p in enumerate(payloads):
        np.testing.assert_array_equal(batch_values(batch, i), flat_values(decode(p)))
    assert np.allclose(batch.norms(), [np.linalg.norm(flat_values(decode(p))) for p in payloads], rtol=1e-5)


def test_signed_updates_verify_and_a_wrong_key_is_refused_as_codec_decode_refuses_it():
    rng = np.random.default_rng(2)
    payload = encode(sparse_update(rng), key=b"k1")
    assert isinstance(decode_flat(payload, LAYOUT, key=b"k1"), FlatBatch)
    with pytest.raises(CodecError) as fast:
        decode_flat(payload, LAYOUT, key=b"other")
    with pytest.raises(CodecError) as slow:
        decode(payload, key=b"other")
    assert fast.value.reason == slow.value.reason == "bad-signature"


def test_what_the_layout_does_not_cover_is_codec_decodes_answer():
    rng = np.random.default_rng(3)
    dense = Update(3, "d1", "m1", 5, 0.1, (TensorBlock.dense("fc.w", rng.normal(size=(10, 300))),))
    assert isinstance(decode_flat(encode(dense), LAYOUT), Update)  # dense blocks: the general decoder
    other = Update(3, "d1", "m1", 5, 0.1, (TensorBlock.sparse("other", (4,), [1], [0.5]),))
    got = decode_flat(encode(other), LAYOUT)
    assert isinstance(got, Update) and got.blocks[0].name == "other"  # the server refuses it as unknown-tensor


def _same_answer(payload: bytes):
    try:
        want = decode(payload)
    except CodecError as exc:
        want = exc
    try:
        got = decode_flat(payload, LAYOUT)
    except CodecError as exc:
        got = exc
    if isinstance(want, CodecError):
        assert isinstance(got, CodecError) and (type(got), got.reason) == (type(want), want.reason)
    elif isinstance(got, FlatBatch):
        np.testing.assert_array_equal(batch_values(got, 0), flat_values(want))
    else:
        assert isinstance(got, Update) and got == want


def test_every_byte_flip_and_truncation_gets_codec_decodes_answer():
    """The CRC catches most flips; with it recomputed the corruption reaches the block parser."""
    import zlib

    rng = np.random.default_rng(4)
    payload = bytearray(encode(sparse_update(rng, density=0.03)))
    body = len(payload) - 4
    for pos in list(range(0, body, max(1, body // 400))) + list(range(body - 40, body)):
        for flip in (0x01, 0x80, 0xFF):
            bad = bytearray(payload)
            bad[pos] ^= flip
            bad[body:] = zlib.crc32(bytes(bad[:body])).to_bytes(4, "little")
            _same_answer(bytes(bad))
    for cut in range(0, len(payload), max(1, len(payload) // 200)):
        _same_answer(bytes(payload[:cut]))


def test_one_bad_update_makes_the_batch_none_so_the_caller_can_find_it():
    rng = np.random.default_rng(5)
    good = [encode(sparse_update(rng, f"d{i}", 0.05)) for i in range(3)]
    scanned = [scan(p, LAYOUT) for p in good]
    bad = bytearray(good[1])
    # a value of -128 (outside the symmetric int8 range): scan passes it, the batch decode does not
    bad[-5] = 0x80
    import zlib
    bad[-4:] = zlib.crc32(bytes(bad[:-4])).to_bytes(4, "little")
    scanned[1] = scan(bytes(bad), LAYOUT)
    assert scanned[1] is not None and decode_batch(scanned, LAYOUT) is None
    with pytest.raises(CodecError):
        decode(bytes(bad))


def test_gaps_of_three_bytes_and_more_decode_as_codec_decode_decodes_them():
    """Varints of 1 and 2 bytes take a per-byte path; a batch with one of 3 bytes or more takes another."""
    shapes = {"big": (3_000_000,), "small": (300,)}
    layout = ModelLayout(shapes)
    rng = np.random.default_rng(6)
    for count in (3, 40, 4000):  # gaps of ~2^20, ~2^16 and ~2^9 (then every gap has 1 or 2 bytes)
        updates = [Update(3, f"d{i}", "m1", 7, 0.1, (
            TensorBlock.sparse("big", (3_000_000,), np.sort(rng.choice(3_000_000, count, replace=False)),
                               rng.normal(0, 1, count)),
            TensorBlock.sparse("small", (300,), np.sort(rng.choice(300, 30, replace=False)), rng.normal(0, 1, 30))))
            for i in range(3)]
        batch = decode_batch([scan(encode(u), layout) for u in updates], layout)
        want = np.concatenate([np.concatenate([b.indices + layout.offsets[b.name] for b in decode(encode(u)).blocks])
                               for u in updates])
        np.testing.assert_array_equal(np.sort(batch.index), np.sort(want))
