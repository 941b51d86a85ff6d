"""Model patches on hand-built ONNX bytes: exact rebuild, and every malformed patch refused.

The models here are written with the protobuf wire format by hand (stdlib only), as a board
sees them: the patch must work without the onnx package. Real int8 models from the export
are patched in tests/export/test_requantize.py.
"""
from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from pqsu.protocol import model_id
from pqsu.protocol.errors import PqsuError
from pqsu.protocol.patch import REASONS, PatchError, apply_patch, changed_entries, make_patch, read_header

DOCS = Path(__file__).resolve().parents[2] / "docs" / "patches.md"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _int_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def tiny_model(weights: np.ndarray, extra: str = "{}", bias: np.ndarray | None = None) -> bytes:
    """A ModelProto: graph with an int8 initializer (and an int32 one), two metadata entries, stamped."""
    def tensor(name: str, data_type: int, values: np.ndarray) -> bytes:
        return _len_field(5, _int_field(1, values.size) + _int_field(2, data_type)
                          + _len_field(8, name.encode()) + _len_field(9, values.tobytes()))

    graph = tensor("w_quantized", 3, np.asarray(weights, np.int8))
    if bias is not None:
        graph += tensor("b_quantized", 6, np.asarray(bias, "<i4"))
    meta = b"".join(_len_field(14, _len_field(1, k.encode()) + _len_field(2, v.encode()))
                    for k, v in (("pqsu.extra", extra), (model_id.KEY, model_id.PLACEHOLDER)))
    return model_id.stamp(_len_field(7, _len_field(2, b"g") + graph) + meta)[0]


def reseal(patch: bytes | bytearray) -> bytes:
    """A new CRC over an edited patch: what a hostile or buggy sender can always produce."""
    body = bytes(patch[:-4])
    return body + struct.pack("<I", zlib.crc32(body))


def reason(a: bytes, patch: bytes) -> str:
    with pytest.raises(PatchError) as exc:
        apply_patch(a, patch)
    return exc.value.reason


W = np.arange(64, dtype=np.int8) - 32


@pytest.fixture
def pair() -> tuple[bytes, bytes]:
    w = W.copy()
    w[[3, 40]] = (100, -100)
    return tiny_model(W, bias=np.arange(4)), tiny_model(w, bias=np.array([0, 1, 2, 9]))


def test_patch_rebuilds_the_target_byte_for_byte_and_is_smaller(pair):
    a, b = pair
    patch = make_patch(a, b)
    assert apply_patch(a, patch) == b
    assert model_id.verify(apply_patch(a, patch)) == model_id.verify(b)
    assert len(patch) < len(b)
    assert changed_entries(patch) == {"w_quantized": 2, "b_quantized": 1}
    info = read_header(patch)
    assert (info.base_id, info.target_id) == (model_id.verify(a), model_id.verify(b))
    assert (info.base_length, info.target_length, info.nbytes) == (len(a), len(b), len(patch))


def test_identical_files_give_an_empty_patch():
    a = tiny_model(W)
    patch = make_patch(a, a)
    assert read_header(patch).num_ops == 0 and apply_patch(a, patch) == a


def test_a_tensor_that_changes_everywhere_goes_dense_and_few_changes_go_sparse():
    a = tiny_model(W)
    dense = make_patch(a, tiny_model(-W))
    sparse = make_patch(a, tiny_model(np.where(np.arange(64) == 7, 0, W)))
    assert apply_patch(a, dense) == tiny_model(-W)
    # 63 of 64 change (W[32] is 0): dense carries the 64 values, cheaper than a bitmap and 63;
    # sparse carries nnz (u32), index coding (u8), stream length (u32), one gap byte, one value
    assert len(dense) - len(sparse) == 64 - (4 + 1 + 4 + 1 + 1)
    assert changed_entries(dense) == {"w_quantized": 64} and changed_entries(sparse) == {"w_quantized": 1}


def test_a_changed_metadata_value_of_another_length_is_spliced():
    a, b = tiny_model(W), tiny_model(W, extra='{"round": 12}')
    assert len(a) != len(b)
    patch = make_patch(a, b)
    assert apply_patch(a, patch) == b
    assert changed_entries(patch) == {}


def test_a_file_with_another_layout_is_not_patchable():
    with pytest.raises(PatchError) as exc:
        make_patch(tiny_model(W), tiny_model(np.arange(65, dtype=np.int8)))
    assert exc.value.reason == "not-patchable"
    with pytest.raises(PatchError) as exc:
        make_patch(tiny_model(W), b"not a model")
    assert exc.value.reason == "not-patchable"


# ---------------------------------------------------------------------------- refusals

def test_every_cut_of_a_patch_is_refused(pair):
    a, b = pair
    patch = make_patch(a, b)
    for n in range(len(patch)):
        assert reason(a, patch[:n]) in ("truncated", "bad-checksum"), n
    assert reason(a, patch[:10]) == "truncated"


def test_wrong_magic_and_unknown_version_are_refused(pair):
    a, b = pair
    patch = bytearray(make_patch(a, b))
    assert reason(a, b"PQSU" + bytes(patch[4:])) == "bad-magic"
    assert reason(a, b) == "bad-magic"  # a full model file is not a patch
    for version in (1, 3):  # 1: the format before the step coding, never misread as this one
        patch[4] = version
        assert reason(a, reseal(patch)) == "unsupported"


def test_a_patch_for_another_base_is_refused(pair):
    a, b = pair
    patch = make_patch(a, b)
    assert reason(b, patch) == "wrong-base"
    assert reason(tiny_model(W + 1), patch) == "wrong-base"
    damaged = bytearray(a)
    damaged[-40] ^= 1  # the held file itself is corrupt: its content no longer hashes to its id
    assert reason(bytes(damaged), patch) == "wrong-base"


def test_any_flipped_byte_is_refused_by_the_checksum(pair):
    a, b = pair
    patch = make_patch(a, b)
    for i in range(4, len(patch)):
        bad = bytearray(patch)
        bad[i] ^= 0x10
        assert reason(a, bytes(bad)) == ("unsupported" if i in (4, 5) else "bad-checksum"), i


def test_a_resealed_patch_either_rebuilds_the_target_or_is_refused(pair):
    """The CRC is not the guard against a wrong model: the hash of the result is."""
    a, b = pair
    patch = make_patch(a, b)
    refused = set()
    for i in range(4, len(patch) - 4):
        for flip in (0x01, 0x80):
            bad = bytearray(patch)
            bad[i] ^= flip
            try:
                assert apply_patch(a, reseal(bad)) == b, i
            except PatchError as exc:
                refused.add(exc.reason)
    assert {"target-mismatch", "bad-offset", "bad-index", "truncated"} <= refused
    assert refused <= set(REASONS)


def _ops_start() -> int:
    return 4 + 1 + 1 + 32 + 32 + 4 + 4 + 4


def test_an_index_out_of_range_is_refused():
    a = tiny_model(W)
    w = W.copy()
    w[63] = 0
    patch = bytearray(make_patch(a, tiny_model(w)))
    # op: kind, u16 name length, name, data type, offset, numel, coding, nnz, index coding, u32 stream length, gap
    at = _ops_start() + 1 + 2 + len("w_quantized") + 1 + 4 + 4 + 1 + 4 + 1 + 4
    assert patch[at] == 63
    patch[at] = 64
    assert reason(a, reseal(patch)) == "bad-index"


def test_offsets_out_of_range_or_overlapping_are_refused(pair):
    a, b = pair
    patch = make_patch(a, b)
    # each tensor op: kind, u16 name length, name, data type, then the u32 offset into A
    first, second = (patch.find(n) + len(n) + 1 for n in (b"w_quantized", b"b_quantized"))
    assert first < second
    past = bytearray(patch)
    struct.pack_into("<I", past, first, len(a) - 10)
    assert reason(a, reseal(past)) == "bad-offset"
    overlap = bytearray(patch)
    struct.pack_into("<I", overlap, second, struct.unpack_from("<I", patch, first)[0] + 8)
    assert reason(a, reseal(overlap)) == "bad-offset"


def test_a_result_that_does_not_hash_to_the_target_is_refused(pair):
    a, b = pair
    patch = bytearray(make_patch(a, b))
    patch[-5] ^= 1  # the last value byte
    assert reason(a, reseal(patch)) == "target-mismatch"
    patch = bytearray(make_patch(a, b))
    patch[6 + 32:6 + 64] = model_id.verify(tiny_model(W + 2)).encode()  # announce another target
    assert reason(a, reseal(patch)) == "target-mismatch"


def test_trailing_bytes_and_extra_ops_are_refused(pair):
    a, b = pair
    patch = make_patch(a, b)
    assert reason(a, reseal(patch[:-4] + b"\x00" + patch[-4:])) == "trailing"
    more = bytearray(patch)
    struct.pack_into("<I", more, _ops_start() - 4, read_header(patch).num_ops + 1)
    assert reason(a, reseal(more)) == "truncated"


def test_patch_errors_are_pqsu_errors_with_a_short_reason(pair):
    a, b = pair
    with pytest.raises(PqsuError, match="^wrong-base: "):
        apply_patch(b, make_patch(a, b))
    with pytest.raises(PatchError) as exc:
        apply_patch(a, "not bytes")
    assert exc.value.reason == "bad-op"


# ---------------------------------------------------------------------------- worked example

def example_pair() -> tuple[bytes, bytes]:
    """docs/patches.md, "Worked example": 64 int8 weights, three of them change, and a metadata value."""
    w = W.copy()
    w[[3, 40, 41]] = (-28, 7, 100)  # steps +1, -1 and +91
    return tiny_model(W), tiny_model(w, extra='{"round": 1}')


def test_the_worked_example_in_the_docs_is_what_make_patch_produces():
    a, b = example_pair()
    text = DOCS.read_text()
    block = re.search(r"<!-- worked-example:patch -->\s*```\n(.*?)```", text, re.S)
    assert block, "docs/patches.md lost its worked example"
    documented = bytes.fromhex("".join(line.split("#")[0] for line in block.group(1).splitlines()))
    patch = make_patch(a, b)
    assert documented == patch
    assert apply_patch(a, documented) == b
    for key, value in (("base", model_id.verify(a)), ("target", model_id.verify(b)), ("size", str(len(patch)))):
        assert f"<!-- {key} -->{value}" in text or f"`{value}`" in text, key


def test_a_board_without_onnx_or_torch_applies_a_patch(pair, tmp_path):
    import subprocess
    import sys

    a, b = pair
    (tmp_path / "a").write_bytes(a)
    (tmp_path / "p").write_bytes(make_patch(a, b))
    code = ("import sys; sys.modules.update(onnx=None, torch=None, onnxruntime=None)\n"
            "from pathlib import Path\nfrom pqsu.protocol.patch import apply_patch\n"
            f"d = Path({str(tmp_path)!r})\n"
            "sys.stdout.buffer.write(apply_patch((d / 'a').read_bytes(), (d / 'p').read_bytes()))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True)
    assert out.stdout == b
