"""The step coding of a patch's integer changes: exact round trips, sizes, and hostile streams refused."""
from __future__ import annotations

import re

import numpy as np
import pytest

from pqsu.protocol import stepcode
from pqsu.protocol.patch import apply_patch, make_patch
from pqsu.protocol.stepcode import StepCodeError, decode, encode, stepped

from tests.protocol.test_patch import W, reason, reseal, tiny_model


def _changes(rng, numel: int, density: float, dtype, big: float = 0.05):
    info = np.iinfo(dtype)
    old = rng.integers(info.min + 1, info.max, numel).astype(dtype)
    idx = np.sort(rng.choice(numel, max(1, int(density * numel)), replace=False))
    steps = rng.choice([-1, 1], idx.size).astype(np.int64)
    wide = rng.random(idx.size) < big
    steps[wide] = rng.integers(-300, 300, int(wide.sum()))
    steps[steps == 0] = 2
    new = np.clip(old[idx].astype(np.int64) + steps, info.min + 1, info.max).astype(dtype)
    keep = new != old[idx]
    return old, idx[keep], new[keep]


@pytest.mark.parametrize("dtype,density", [(np.int8, 0.05), (np.int8, 0.5), (np.int8, 0.001), (np.int32, 0.3)])
def test_a_stream_decodes_to_the_exact_indices_and_values(dtype, density):
    rng = np.random.default_rng(7)
    old, idx, new = _changes(rng, 20_000, density, dtype)
    k, stream = encode(idx, old[idx], new)
    got_idx, steps = decode(stream, idx.size, k, old.size)
    assert np.array_equal(got_idx, idx)
    assert np.array_equal(stepped(old[got_idx], steps), new)


def test_unit_steps_at_five_percent_take_about_a_byte_each():
    rng = np.random.default_rng(1)
    idx = np.sort(rng.choice(100_000, 5_000, replace=False))
    old = np.zeros(idx.size, np.int8)
    new = rng.choice(np.array([-1, 1], np.int8), idx.size)
    k, stream = encode(idx, old, new)
    assert k == 4  # mean gap ~19: 16 per unary one-bit
    assert len(stream) < 1.05 * idx.size  # against 2 bytes a change (a value byte and a varint gap)


def test_the_chosen_rice_parameter_is_the_shortest():
    rng = np.random.default_rng(2)
    old, idx, new = _changes(rng, 5_000, 0.02, np.int8)
    k, stream = encode(idx, old[idx], new)
    gaps = (np.diff(idx, prepend=-1) - 1).astype(np.uint64)
    assert all(stepcode._rice_bits(gaps, k) <= stepcode._rice_bits(gaps, j) for j in range(stepcode.MAX_RICE_K + 1))


def test_a_zero_step_cannot_be_encoded():
    with pytest.raises(ValueError):
        encode(np.array([1]), np.array([3], np.int8), np.array([3], np.int8))


def _stream():
    idx = np.array([3, 40, 41])
    k, stream = encode(idx, np.array([-29, 8, 9], np.int8), np.array([-28, 7, 100], np.int8))
    return idx, k, stream


def test_hostile_streams_are_refused_with_a_reason():
    idx, k, stream = _stream()
    with pytest.raises(StepCodeError, match="past the stream"):
        decode(stream[:-1], 3, k, 64)                   # cut short inside the escaped step
    with pytest.raises(StepCodeError, match="at least"):
        decode(stream[:1], 3, k, 64)                    # too short for three changes
    with pytest.raises(StepCodeError, match="left over"):
        decode(stream + b"\x00", 3, k, 64)              # a byte too many
    with pytest.raises(StepCodeError, match="left over"):
        decode(stream[:-1] + bytes([stream[-1] | 1]), 3, k, 64)  # padding bits set
    with pytest.raises(StepCodeError, match="index"):
        decode(stream, 3, k, 41)                        # index 41 in a 41-entry tensor
    with pytest.raises(StepCodeError, match="at least"):
        decode(stream, 1000, k, 10_000)                 # more changes than the stream can hold
    with pytest.raises(StepCodeError, match="Rice parameter"):
        decode(stream, 3, stepcode.MAX_RICE_K + 1, 64)
    with pytest.raises(StepCodeError, match="escaped step"):
        decode(b"\x40" + b"\x00" * 8, 1, 0, 64)  # gap 0, the escape flag, then 70 zero bits
    with pytest.raises(StepCodeError, match="range"):
        stepped(np.array([127], np.int8), np.array([1]))


def test_a_patch_of_unit_steps_is_step_coded_and_rebuilds_the_target():
    w = W.copy()
    w[::4] += 1
    a, b = tiny_model(W), tiny_model(w)
    patch = make_patch(a, b)
    assert apply_patch(a, patch) == b
    assert b"w_quantized\x03" in patch and patch[patch.index(b"w_quantized") + 11 + 9] == 2  # coding 2: steps


def test_a_step_past_int8_in_a_resealed_patch_is_refused():
    w0 = W.copy()
    w0[62] = 127
    w1 = w0.copy()
    w1[62:] = (126, 30)  # -1 steps, the first at the top of the range
    a = tiny_model(w0)
    patch = bytearray(make_patch(a, tiny_model(w1)))
    at = patch.index(b"w_quantized") + 11 + 9  # the coding byte
    assert patch[at] == 2
    k = patch[at + 5]
    sign = (62 >> k) + 1 + k + 1  # the bit after the unary quotient, its end and the remainder, and the 0 flag
    patch[at + 10 + sign // 8] ^= 0x80 >> (sign % 8)  # -1 becomes +1: 127 + 1 leaves int8
    assert reason(a, reseal(patch)) == "bad-index"


def test_the_fast_decoder_and_the_word_by_word_one_agree_on_any_stream():
    """decode reads every word's end at once; _decode_words hops one word at a time: same answer,
    on good streams and on damaged ones (where the word-by-word path names the reason)."""
    rng = np.random.default_rng(11)
    for trial in range(200):
        old, idx, new = _changes(rng, 3_000, rng.choice([0.001, 0.05, 0.5]), np.int8)
        k, stream = encode(idx, old[idx], new)
        if trial % 2:  # flip a few bits, or cut the stream
            raw = bytearray(stream)
            for at in rng.integers(0, len(raw), rng.integers(1, 4)):
                raw[at] ^= 1 << int(rng.integers(0, 8))
            stream = bytes(raw[: len(raw) - int(rng.integers(0, 2))])
        bits = np.unpackbits(np.frombuffer(stream, np.uint8))
        try:
            fast = decode(stream, idx.size, k, old.size)
        except StepCodeError as exc:
            if "need at least" in str(exc):  # refused on its length, before either path reads a word
                continue
            with pytest.raises(StepCodeError, match=re.escape(str(exc))):
                stepcode._decode_words(bits, idx.size, k, old.size, *stepcode._next_bits(bits))
            continue
        slow = stepcode._decode_words(bits, idx.size, k, old.size, *stepcode._next_bits(bits))
        assert np.array_equal(fast[0], slow[0]) and np.array_equal(fast[1], slow[1])
        if trial % 2 == 0:
            assert np.array_equal(fast[0], idx) and np.array_equal(stepped(old[idx], fast[1]), new)
