"""Update codec: round trips, quantization error bounds, signing, limits and malformed input.

Malformed messages are crafted byte by byte from docs/protocol.md with `struct`, not with the
codec's own encoder, so these tests also pin the documented wire format. Every rejection also
pins its reason (`CodecError.reason`), which the coordinator counts.
"""

from __future__ import annotations

import math
import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pqsu.protocol import varint
from pqsu.protocol.codec import Limits, TensorBlock, Update, decode, encode, peek_header
from pqsu.protocol.errors import (ChecksumError, CodecError, OversizeError, PqsuError,
                                  SignatureError, TruncatedError, UnsupportedError)

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
KEY = b"device-7-secret"

# Values are 0 or comfortably normal: a scale in float32's subnormal range loses precision,
# which no real weight delta comes near.
_value = st.floats(-1e4, 1e4, width=32).map(lambda x: 0.0 if abs(x) < 1e-20 else x)


def _update(*blocks: TensorBlock, round: int = 3) -> Update:
    return Update(round, "dev-7", "vgg16-c10@ab12", 128, 0.25, tuple(blocks))


def _frame(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def _header(count: int, *, magic=b"PQSU", version=1, kind=1, flags=0, loss=0.5,
            dev=b"d", model=b"m") -> bytes:
    return (struct.pack("<4sBBBIIf", magic, version, kind, flags, 1, 10, loss)
            + bytes([len(dev)]) + dev + bytes([len(model)]) + model + struct.pack("<I", count))


def _block(name: bytes, dims: tuple[int, ...], kind: int) -> bytes:
    return (struct.pack("<H", len(name)) + name + bytes([len(dims)])
            + struct.pack(f"<{len(dims)}I", *dims) + bytes([kind]))


def _sparse_varint(name: bytes, dims, nnz: int, stream: bytes, values: bytes,
                   scale: float = 0.1) -> bytes:
    return (_block(name, dims, 2) + struct.pack("<IfB", nnz, scale, 0)
            + struct.pack("<I", len(stream)) + stream + values)


def _rejects(payload: bytes, reason: str, match: str = "", **kwargs) -> CodecError:
    """decode(payload) raises a CodecError with this reason (and message), returned."""
    with pytest.raises(CodecError, match=match) as info:
        decode(payload, **kwargs)
    assert info.value.reason == reason, f"{info.value!r} is {info.value.reason!r}, not {reason!r}"
    return info.value


def _varint_cost(indices: np.ndarray) -> int:
    prev, total = -1, 4
    for i in indices.tolist():
        gap = i - prev - 1
        total += max(1, math.ceil(gap.bit_length() / 7))
        prev = i
    return total


def _within_half_step(original: np.ndarray, decoded: np.ndarray, step: np.ndarray) -> bool:
    # scale/2 exactly, plus float32 rounding of the division and the product (~1e-5 of a step).
    return bool(np.all(np.abs(original.astype(np.float64) - decoded) <= step * (0.5 + 1e-4)))


# ------------------------------------------------------------------------- round trips

@SETTINGS
@given(values=hnp.arrays(np.float32, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0,
                                                      max_side=6), elements=_value),
       per_channel=st.booleans())
def test_dense_round_trip_is_bit_exact_and_within_half_step(values, per_channel):
    block = TensorBlock.dense("w", values, per_channel=per_channel)
    got = decode(encode(_update(block))).block("w")
    assert got == block
    assert got.q.dtype == np.int8 and got.scale.dtype == np.float32
    if per_channel and values.ndim >= 2:
        assert got.scale.shape == (values.shape[0],)
        step = np.broadcast_to(got.scale.reshape((-1,) + (1,) * (values.ndim - 1)), values.shape)
    else:
        assert got.scale.shape == (1,)
        step = np.full(values.shape, got.scale[0])
    deq = got.dequantize()
    assert deq.dtype == np.float32 and deq.shape == values.shape
    assert _within_half_step(values, deq, step)


def test_per_channel_scales_follow_rows_of_axis_0():
    w = np.stack([np.full((3, 3), 1.0), np.full((3, 3), 100.0), np.zeros((3, 3))])
    w = w.astype(np.float32)
    block = TensorBlock.dense("conv", w)
    np.testing.assert_array_equal(block.scale, np.float32([1 / 127, 100 / 127, 0]))
    np.testing.assert_allclose(decode(encode(_update(block))).block("conv").dequantize(), w,
                               rtol=1e-6)
    assert TensorBlock.dense("conv", w, per_channel=False).scale.shape == (1,)
    assert TensorBlock.dense("bias", w[0, 0]).scale.shape == (1,)  # 1-D: per-tensor


@SETTINGS
@given(data=st.data())
def test_sparse_round_trip_and_smaller_index_coding(data):
    numel = data.draw(st.integers(1, 600))
    chosen = data.draw(st.sets(st.integers(0, numel - 1), max_size=numel))
    indices = np.array(sorted(chosen), dtype=np.int64)
    values = np.array(data.draw(st.lists(_value, min_size=indices.size, max_size=indices.size)),
                      dtype=np.float32)
    shape = (numel,) if numel % 4 else (4, numel // 4)
    perm = np.random.default_rng(numel).permutation(indices.size)  # any input order
    block = TensorBlock.sparse("fc", shape, indices[perm], values[perm])
    got = decode(encode(_update(block))).block("fc")
    assert got == block
    np.testing.assert_array_equal(got.indices, indices)
    deq = got.dequantize().reshape(-1)
    assert _within_half_step(values, deq[indices], got.scale[0])
    assert not np.delete(deq, indices).any()
    varint_cost, bitmap_cost = _varint_cost(indices), (numel + 7) // 8
    assert got.index_coding == ("bitmap" if bitmap_cost < varint_cost else "varint")
    assert block.nbytes_on_wire == 2 + 2 + 1 + 4 * len(shape) + 1 + 9 \
        + min(varint_cost, bitmap_cost) + indices.size


@pytest.mark.parametrize("density, coding", [(0.002, 0), (0.5, 1)])
def test_both_index_codings_appear_on_the_wire(density, coding):
    rng = np.random.default_rng(1)
    numel = 20_000
    idx = np.flatnonzero(rng.random(numel) < density)
    block = TensorBlock.sparse("t", (numel,), idx, rng.normal(size=idx.size))
    payload = encode(_update(block))
    # header 19 + ids (1+5, 1+14) + count 4, then name (2+1), ndim 1, dim 4, kind 1, nnz 4, scale 4
    offset = 19 + 6 + 15 + 4 + 3 + 1 + 4 + 1 + 4 + 4
    assert payload[offset] == coding
    np.testing.assert_array_equal(decode(payload).block("t").indices, idx)


def test_skip_scalar_empty_and_zero_tensors_round_trip():
    update = _update(TensorBlock.skip("frozen", (3, 4)),
                     TensorBlock.dense("scalar", np.float32(2.5)),
                     TensorBlock.dense("empty", np.zeros((0, 5), np.float32)),
                     TensorBlock.dense("zero", np.zeros((2, 3), np.float32)),
                     TensorBlock.sparse("none", (7,), [], []))
    got = decode(encode(update))
    assert got == update
    dense = got.to_dense()
    assert dense["frozen"].shape == (3, 4) and not dense["frozen"].any()
    assert dense["scalar"] == np.float32(2.5)
    assert got.block("zero").scale.tolist() == [0.0, 0.0] and not dense["zero"].any()
    assert [b.nnz for b in got.blocks] == [0, 1, 0, 6, 0]


@SETTINGS
@given(values=hnp.arrays(np.float32, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0,
                                                      max_side=6),
                         elements=st.floats(allow_nan=False, allow_infinity=False, width=32)))
def test_dense32_round_trip_is_bit_exact(values):
    # Any finite float32 (subnormals, -0.0, the extremes) travels unchanged, bit for bit.
    block = TensorBlock.dense_fp32("fc.w", values)
    payload = encode(_update(block))
    got = decode(payload).block("fc.w")
    assert got == block and got.kind == "dense32" and got.scale is None and got.indices is None
    assert got.q.dtype == np.float32 and got.q.tobytes() == values.astype("<f4").tobytes()
    deq = got.dequantize()
    assert deq.dtype == np.float32 and deq.shape == values.shape
    assert deq.tobytes() == values.tobytes()
    assert got.nnz == values.size
    assert block.nbytes_on_wire == 2 + 4 + 1 + 4 * values.ndim + 1 + 4 * values.size
    assert len(payload) == 19 + 6 + 15 + 4 + block.nbytes_on_wire + 4


def test_dense32_block_layout_is_byte_exact():
    # docs/protocol.md, "Dense float32 (kind 3)": the block header, then the raw f32 values.
    block = TensorBlock.dense_fp32("f", np.array([1.0, -0.0]))
    payload = encode(_update(block))
    assert payload[44:-4].hex(" ") == "01 00 66 01 02 00 00 00 03 00 00 80 3f 00 00 00 80"


def test_dense_fp32_validates_and_copies():
    src = np.array([[1.5, -2.0], [0.0, 3.0]])
    block = TensorBlock.dense_fp32("w", src)
    src[0, 0] = 99.0  # the block owns its values
    assert block.q.tolist() == [1.5, -2.0, 0.0, 3.0] and block.shape == (2, 2)
    assert not block.q.flags.writeable
    assert TensorBlock.dense_fp32("i", np.arange(3)).q.dtype == np.float32
    assert TensorBlock.dense_fp32("s", np.float32(2.5)).dequantize() == np.float32(2.5)
    assert TensorBlock.dense_fp32("e", np.zeros((0, 4))).nnz == 0
    for bad in (np.array([1.0, np.nan]), np.array([np.inf]), np.float32([-np.inf])):
        with pytest.raises(CodecError, match="NaN or Inf"):
            TensorBlock.dense_fp32("w", bad)
    with pytest.raises(CodecError, match="float32 range"):
        TensorBlock.dense_fp32("w", np.array([1e39]))  # finite in float64, Inf in float32
    with pytest.raises(CodecError, match="no scale"):
        TensorBlock("w", (1,), "dense32", q=np.float32([1]), scale=np.float32([1]))
    with pytest.raises(CodecError, match="float32"):
        TensorBlock("w", (1,), "dense32", q=np.float64([1]))
    with pytest.raises(CodecError, match="2 values for 3"):
        TensorBlock("w", (3,), "dense32", q=np.float32([1, 2]))
    with pytest.raises(CodecError, match="NaN"):
        TensorBlock("w", (1,), "dense32", q=np.float32([np.nan]))


def test_update_metadata_round_trips_and_loss_is_float32():
    update = Update(2**32 - 1, "böard-ü", "", 2**32 - 1, 0.1, ())
    assert update.loss == float(np.float32(0.1))
    assert decode(encode(update)) == update


def test_worked_example_in_docs_is_byte_exact():
    update = Update(3, "d1", "m", 10, 0.5, (
        TensorBlock.sparse("w", (2, 100), [1, 9, 150], [0.5, -1.0, 0.25]),
        TensorBlock.dense("b", np.array([0.1, -0.2])),
        TensorBlock.skip("s", (3,))))
    assert encode(update).hex(" ") == (  # docs/protocol.md, "Worked example"
        "50 51 53 55 01 01 00 03 00 00 00 0a 00 00 00 00 00 00 3f 02 64 31 01 6d 03 00 00 00 "
        "01 00 77 02 02 00 00 00 64 00 00 00 02 03 00 00 00 04 02 01 3c 00 04 00 00 00 "
        "01 07 8c 01 40 81 20 01 00 62 01 02 00 00 00 01 00 a0 69 ce 3a 40 81 "
        "01 00 73 01 03 00 00 00 00 9a 30 d3 2c")
    assert len(encode(update, key=b"secret")) == 122


@SETTINGS
@given(values=st.lists(st.integers(0, 2**63 - 1), max_size=300))
def test_varints_round_trip_and_match_leb128(values):
    arr = np.array(values, dtype=np.uint64)
    stream = varint.encode_uvarints(arr)
    expected = bytearray()  # the textbook, one-value-at-a-time LEB128
    for v in values:
        while v >= 0x80:
            expected += bytes([v & 0x7F | 0x80])
            v >>= 7
        expected += bytes([v])
    assert stream.tobytes() == bytes(expected)
    assert varint.uvarint_sizes(arr).sum() == len(expected)
    np.testing.assert_array_equal(varint.decode_uvarints(stream, len(values), 9), arr)


# ------------------------------------------------------------------------- signing

def test_signed_round_trip_and_verification_rules():
    update = _update(TensorBlock.sparse("a", (100,), [3, 50], [1.0, -2.0]))
    signed = encode(update, key=KEY)
    assert decode(signed, key=KEY) == update
    assert decode(signed) == update  # no key: accepted, signature unchecked (documented)
    _rejects(signed, "bad-signature", "HMAC mismatch", key=b"another-device")
    _rejects(encode(update), "bad-signature", "unsigned", key=KEY)
    # A forger who fixes the CRC still cannot fix the HMAC.
    body = bytearray(signed[:-36])
    body[14] ^= 0x01  # num_samples
    forged = bytes(body) + struct.pack("<I", zlib.crc32(body)) + signed[-32:]
    assert decode(forged).num_samples != update.num_samples
    _rejects(forged, "bad-signature", "HMAC mismatch", key=KEY)
    with pytest.raises(CodecError, match="key"):
        encode(update, key=b"")


# ------------------------------------------------------------------------- aggregation

@SETTINGS
@given(values=hnp.arrays(np.float32, (6, 5), elements=_value),
       mask=hnp.arrays(bool, (6, 5)), weight=st.floats(-10, 10),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_add_to_equals_dense_addition(values, mask, weight, dtype):
    base = np.random.default_rng(0).normal(size=(6, 5)).astype(dtype)
    for block in (TensorBlock.dense("w", values),
                  TensorBlock.sparse("w", (6, 5), np.flatnonzero(mask), values[mask]),
                  TensorBlock.dense_fp32("w", values),
                  TensorBlock.skip("w", (6, 5))):
        out = base.copy()
        block.add_to(out, weight)
        np.testing.assert_allclose(out, base + weight * block.dequantize().astype(dtype),
                                   rtol=1e-6, atol=1e-6 * max(1.0, float(np.abs(values).max())))


def test_sparse_add_to_allocates_no_dense_temporary():
    numel = 1 << 20
    block = TensorBlock.sparse("big", (numel,), np.arange(0, numel, 10_000), np.ones(105))
    out = np.zeros(numel, np.float32)
    tracemalloc.start()
    block.add_to(out, 2.0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < numel  # far below one float32 copy (4 MiB)
    assert out.sum() == pytest.approx(210.0, rel=1e-6)
    with pytest.raises(ValueError, match="shape"):
        block.add_to(np.zeros(10, np.float32))


# ------------------------------------------------------------------------- header

def test_peek_header_reads_only_the_header():
    payload = encode(_update(TensorBlock.skip("a", (2,)), round=9), key=KEY)
    h = peek_header(payload)
    assert (h.version, h.round, h.device_id, h.model_id, h.num_samples, h.signed,
            h.num_tensors) == (1, 9, "dev-7", "vgg16-c10@ab12", 128, True, 1)
    assert h.loss == 0.25
    assert peek_header(payload[:44]) == h  # body and trailer not needed
    with pytest.raises(UnsupportedError, match="magic"):
        peek_header(b"JUNK" + payload[4:])
    with pytest.raises(TruncatedError, match="truncated"):
        peek_header(payload[:30])


# ------------------------------------------------------------------------- compression

MODEL = {"conv1.w": (64, 3, 3, 3), "conv1.b": (64,), "conv2.w": (128, 64, 3, 3),
         "conv2.b": (128,), "conv3.w": (256, 128, 3, 3), "conv3.b": (256,),
         "conv4.w": (256, 256, 3, 3), "conv4.b": (256,), "fc1.w": (128, 256), "fc1.b": (128,),
         "fc2.w": (10, 128), "fc2.b": (10,)}


def test_top1_percent_update_is_150x_smaller_than_dense_fp32():
    rng = np.random.default_rng(7)
    deltas = {k: rng.normal(size=s).astype(np.float32) for k, s in MODEL.items()}
    numel = sum(d.size for d in deltas.values())
    assert 900_000 < numel < 1_100_000
    flat = np.concatenate([np.abs(d).reshape(-1) for d in deltas.values()])
    threshold = np.partition(flat, flat.size - numel // 100)[flat.size - numel // 100]
    blocks = []
    for name, d in deltas.items():
        idx = np.flatnonzero(np.abs(d) >= threshold)
        blocks.append(TensorBlock.sparse(name, d.shape, idx, d.reshape(-1)[idx]) if idx.size
                      else TensorBlock.skip(name, d.shape))
    payload = encode(_update(*blocks))
    ratio = 4 * numel / len(payload)
    assert ratio >= 150, f"{len(payload)} bytes, only {ratio:.1f}x below dense fp32"
    assert decode(payload) == _update(*blocks)


# ------------------------------------------------------------------------- limits

def test_header_claiming_1e12_elements_is_rejected_fast_without_allocating():
    payload = _frame(_header(1) + _block(b"huge", (1_000_000, 1_000_000), 1) + b"\x00")
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(OversizeError, match="1000000000000 elements"):
        decode(payload)
    elapsed = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 * 1024 and elapsed < 0.5  # refused from the header: no allocation, no scan


@pytest.mark.parametrize("payload, limits, message, reason", [
    (b"x" * 101, Limits(max_payload_bytes=100), "limit is 100", "oversize"),
    (_frame(_header(5000) + b"\x00" * 30000), Limits(), "5000 tensors", "oversize"),
    (_frame(_header(4000) + b"\x00" * 100), Limits(), "cannot fit", "truncated"),
    (_frame(_header(1) + _block(b"n" * 300, (1,), 0)), Limits(), "name length 300", "oversize"),
    (_frame(_header(1) + _block(b"d", (1,) * 9, 0)), Limits(), "9 dims", "oversize"),
    (_frame(_header(2) + _block(b"a", (1 << 25, 5), 0) + _block(b"b", (1 << 25, 5), 0)),
     Limits(max_total_elements=1 << 28), "in total", "oversize"),
    (_frame(_header(1) + _block(b"a", (1 << 16, 1 << 16), 0)), Limits(), "elements, limit",
     "oversize"),
    # A full bitmap claiming 2^20 entries but carrying no values: refused before decoding it.
    (_frame(_header(1) + _block(b"s", (1 << 20,), 2) + struct.pack("<IfB", 1 << 20, 0.1, 1)
            + b"\xff" * (1 << 17)), Limits(), "bitmap and values", "truncated"),
    # The same for float32 values: 2^20 claimed, 4 bytes present.
    (_frame(_header(1) + _block(b"f", (1 << 20,), 3) + b"\x00" * 4), Limits(),
     "float32 values needs 4194304 bytes", "truncated"),
    (_frame(_header(1) + _block(b"f", (1 << 20,), 3)), Limits(max_elements_per_tensor=1 << 19),
     "elements, limit", "oversize"),
], ids=["payload", "tensors", "count-vs-bytes", "name", "ndim", "total", "per-tensor",
        "bitmap-claim", "dense32-claim", "dense32-elements"])
def test_limits_are_enforced(payload, limits, message, reason):
    _rejects(payload, reason, message, limits=limits)


# ------------------------------------------------------------------------- malformed

_SPARSE_OK = _sparse_varint(b"s", (10,), 2, b"\x01\x03", b"\x05\x07")
_C, _T, _U = "corrupt", "truncated", "unsupported"
_BAD_BODIES = {
    "nnz > numel": (_sparse_varint(b"s", (3,), 4, b"\x00" * 4, b"\x01" * 4), "exceeds", _C),
    "index out of range": (_sparse_varint(b"s", (10,), 2, b"\x05\x05", b"\x01\x01"),
                           "out of range", _C),
    "varint past end": (_sparse_varint(b"s", (300,), 2, b"\x01\x81", b"\x01\x01"),
                        "inside a varint", _C),
    "varint count": (_sparse_varint(b"s", (300,), 2, b"\x01\x01\x01", b"\x01\x01"),
                     "3 varints", _C),
    "stream too long": (_sparse_varint(b"s", (10,), 1, b"\x81\x00", b"\x01"), "cannot hold", _C),
    "overlong varint": (_sparse_varint(b"s", (300,), 2, b"\x81\x80\x01\x00", b"\x01\x01"),
                        "longer than 2", _C),
    "non-canonical varint": (_sparse_varint(b"s", (300,), 1, b"\x81\x00", b"\x01"),
                             "non-canonical", _C),
    "stream length lies": (_block(b"s", (10,), 2) + struct.pack("<IfBI", 2, 0.1, 0, 9)
                           + b"\x01\x01\x01\x01", "cannot hold", _C),
    "sparse values cut": (_sparse_varint(b"s", (10,), 2, b"\x01\x03", b"\x05"),
                          "indices and values", _T),
    "bitmap popcount": (_block(b"s", (10,), 2) + struct.pack("<IfB", 1, 0.1, 1) + b"\xc0\x00"
                        + b"\x01", "set bits", _C),
    "bitmap padding": (_block(b"s", (10,), 2) + struct.pack("<IfB", 1, 0.1, 1) + b"\x00\x01"
                       + b"\x01", "padding", _C),
    "NaN scale": (_sparse_varint(b"s", (10,), 2, b"\x01\x03", b"\x05\x07", math.nan),
                  "finite", _C),
    "Inf dense scale": (_block(b"d", (2,), 1) + b"\x00" + struct.pack("<f", math.inf)
                        + b"\x01\x02", "finite", _C),
    "negative scale": (_block(b"d", (2,), 1) + b"\x00" + struct.pack("<f", -1.0)
                       + b"\x01\x02", "finite", _C),
    "int8 -128": (_block(b"d", (2,), 1) + b"\x00" + struct.pack("<f", 1.0) + b"\x80\x00",
                  "-128", _C),
    "dense truncated": (_block(b"d", (4,), 1) + b"\x00" + struct.pack("<f", 1.0) + b"\x01",
                        "truncated", _T),
    "bad scale mode": (_block(b"d", (2,), 1) + b"\x07", "scale mode", _U),
    "per-channel scalar": (_block(b"d", (), 1) + b"\x01", "scale mode", _C),
    "unknown kind": (_block(b"k", (2,), 9), "unknown block kind", _U),
    "unknown coding": (_block(b"s", (10,), 2) + struct.pack("<IfB", 0, 0.1, 5),
                       "index coding", _U),
    "empty name": (_block(b"", (2,), 0), "name length 0", _C),
    "bad utf-8 name": (_block(b"\xff\xfe", (2,), 0), "UTF-8", _C),
    "trailing bytes": (_SPARSE_OK + b"\x00\x00", "2 trailing bytes", _C),
    "dense32 NaN": (_block(b"f", (2,), 3) + struct.pack("<2f", 1.0, math.nan), "NaN or Inf", _C),
    "dense32 -Inf": (_block(b"f", (2,), 3) + struct.pack("<2f", -math.inf, 1.0), "NaN or Inf", _C),
    "dense32 truncated": (_block(b"f", (2,), 3) + struct.pack("<f", 1.0), "float32 values", _T),
}


@pytest.mark.parametrize("case", sorted(_BAD_BODIES))
def test_malformed_block_is_rejected_with_reason(case):
    body, message, reason = _BAD_BODIES[case]
    _rejects(_frame(_header(1) + body), reason, message)


def test_crafted_valid_block_decodes():  # the crafting helpers themselves are right
    got = decode(_frame(_header(1) + _SPARSE_OK)).block("s")
    assert got.indices.tolist() == [1, 5] and got.q.tolist() == [5, 7]


@pytest.mark.parametrize("payload, message, reason", [
    (_frame(_header(2) + _block(b"a", (1,), 0) * 2), "duplicate", "corrupt"),
    (_frame(_header(0, magic=b"PQSV")), "magic", "unsupported"),
    (_frame(_header(0, version=2)), "version 2", "unsupported"),
    (_frame(_header(0, kind=7)), "kind 7", "unsupported"),
    (_frame(_header(0, flags=0x82)), "flag", "unsupported"),
    (_frame(_header(0, loss=math.nan)), "loss", "corrupt"),
    (_frame(_header(0, dev=b"\xc3")), "device_id", "corrupt"),
    (_frame(_header(0))[:-1] + b"\x00", "CRC32", "bad-checksum"),
    (_frame(_header(0)) + b"\x00", "CRC32", "bad-checksum"),
    (_frame(_header(0, flags=1)), "trailer", "truncated"),
    (b"", "truncated", "truncated"),
], ids=["dup-names", "magic", "version", "msg-kind", "flags", "nan-loss", "utf8-id",
        "crc", "appended", "no-trailer", "empty"])
def test_malformed_message_is_rejected_with_reason(payload, message, reason):
    _rejects(payload, reason, message)


def test_each_rejection_reason_has_its_class():
    update = _update(TensorBlock.dense("a", np.ones((3, 4))),
                     TensorBlock.sparse("b", (50,), [1, 2, 40], [1, 2, 3]))
    payload, signed = encode(update), encode(update, key=KEY)
    flipped = bytearray(payload)
    flipped[60] ^= 0x10  # inside block "a", CRC left as it was
    cases = [
        (ChecksumError, "bad-checksum", bytes(flipped), {}),
        (SignatureError, "bad-signature", signed, {"key": b"not-the-device-key"}),
        (SignatureError, "bad-signature", payload, {"key": KEY}),  # unsigned, key required
        (OversizeError, "oversize", payload, {"limits": Limits(max_payload_bytes=64)}),
        (OversizeError, "oversize", payload, {"limits": Limits(max_tensors=1)}),
        (TruncatedError, "truncated", payload[:30], {}),  # cut inside the header
        (TruncatedError, "truncated", payload[:46], {}),  # header whole, no room for a trailer
        (UnsupportedError, "unsupported", b"MQTT" + payload[4:], {}),
    ]
    for cls, reason, bad, kwargs in cases:
        with pytest.raises(CodecError) as info:
            decode(bad, **kwargs)
        assert type(info.value) is cls and info.value.reason == reason, (reason, info.value)
    assert CodecError.reason == "corrupt"
    assert all(issubclass(cls, CodecError) and issubclass(cls, PqsuError) for cls, *_ in cases)


def test_every_truncation_is_a_codec_error():
    payload = encode(_update(TensorBlock.dense("a", np.ones((3, 4))),
                             TensorBlock.sparse("b", (50,), [1, 2, 40], [1, 2, 3])), key=KEY)
    reasons = set()
    for n in range(len(payload)):
        for key in (None, KEY):
            with pytest.raises(CodecError) as info:
                decode(payload[:n], key=key)
            reasons.add(info.value.reason)
    # Cut inside the header: "truncated". Cut after it: the last 4 bytes left are not the CRC
    # of the rest, and a CRC cannot tell a cut from a flip, so "bad-checksum" (documented).
    assert reasons == {"truncated", "bad-checksum"}


def test_decode_rejects_non_bytes_and_errors_are_pqsu_errors():
    with pytest.raises(CodecError, match="bytes"):
        decode("PQSU")  # type: ignore[arg-type]
    assert issubclass(CodecError, PqsuError)
    assert decode(bytearray(encode(_update()))) == _update()


# ------------------------------------------------------------------------- constructors

def test_constructors_validate():
    block = TensorBlock.sparse("s", (10,), [7, 2, 5], [0.7, 0.2, 0.5])
    assert block.indices.tolist() == [2, 5, 7] and block.q.tolist() == [36, 91, 127]
    with pytest.raises(CodecError, match="strictly increasing"):
        TensorBlock.sparse("s", (10,), [2, 2], [1.0, 1.0])
    with pytest.raises(CodecError, match="strictly increasing"):
        TensorBlock.sparse("s", (10,), [10], [1.0])
    with pytest.raises(CodecError, match="NaN"):
        TensorBlock.dense("d", np.array([1.0, np.nan]))
    with pytest.raises(CodecError, match="-128"):
        TensorBlock("d", (1,), "dense", q=np.int8([-128]), scale=np.float32([1]))
    with pytest.raises(CodecError, match="duplicate"):
        _update(TensorBlock.skip("a", (1,)), TensorBlock.skip("a", (2,)))
    with pytest.raises(CodecError, match="round"):
        Update(-1, "d", "m", 1, 0.0, ())
    with pytest.raises(CodecError, match="device_id"):
        Update(0, "d" * 256, "m", 1, 0.0, ())
    with pytest.raises(KeyError):
        _update().block("missing")
    assert not block.q.flags.writeable  # frozen means frozen
