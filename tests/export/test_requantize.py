"""Requantizing a real int8 cnn with held scales, and patching from one version to the next."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from pqsu.export import measure
from pqsu.export.bridge import read_int8_weights
from pqsu.export.onnx_export import read_info
from pqsu.export.requantize import (QdqLayout, RequantizeError, capped_requantize, deadband_keep, requantize,
                                   saturate, step_changes)
from pqsu.protocol import model_id
from pqsu.protocol.patch import apply_patch, changed_entries, make_patch


@pytest.fixture(scope="module")
def base(trained_cnn) -> bytes:
    return trained_cnn.int8_path.read_bytes()


@pytest.fixture(scope="module")
def exported(trained_cnn) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in trained_cnn.model.state_dict().items()}


def moved(base: bytes, master: dict[str, np.ndarray], steps: float, seed: int = 0,
          shrink: float = 1.0) -> dict[str, np.ndarray]:
    """The master after a training round: every entry moved by up to `steps` of its held step."""
    rng = np.random.default_rng(seed)
    layout = QdqLayout.of(base)
    return {k: (v * shrink + rng.uniform(-steps, steps, v.shape) * layout.tensors[k].scale).astype(np.float32)
            for k, v in master.items()}


def by_hand(base: bytes, master: dict[str, np.ndarray]) -> bytes:
    """The same requantization written independently with onnx: q = clip(round(w / s)) per channel."""
    proto = onnx.load_from_string(base)
    inits = {t.name: t for t in proto.graph.initializer}
    for name, w in master.items():
        q_init = inits[name + "_quantized"]
        if w.ndim > 1:
            s = numpy_helper.to_array(inits[name + "_scale"]).reshape(-1, *[1] * (w.ndim - 1))
            q = np.clip(np.round(w / s), -127, 127).astype(np.int8)
        else:
            s = numpy_helper.to_array(inits[name + "_quantized_scale"]).astype(np.float64)
            q = np.round(w.astype(np.float64) / s).astype(np.int32)
        q_init.CopyFrom(numpy_helper.from_array(q, q_init.name))
    return model_id.stamped(proto.SerializeToString()).data  # its own id, so a board would load it too


def test_the_weights_a_file_was_exported_from_give_the_file_back(base, exported):
    out = requantize(base, exported)
    assert out.data == base and out.model_id == model_id.verify(base)
    assert out.weights_changed == 0 and out.weights_clipped == 0


def test_a_moved_master_runs_in_onnxruntime_like_a_model_requantized_by_hand(base, exported, trained_cnn):
    master = moved(base, exported, 2.0)
    out = requantize(base, master)
    assert out.model_id != model_id.verify(base)
    assert model_id.verify(out.data) == out.model_id
    ours = measure.ort_session(out.data).logits(trained_cnn.x_test[:200])
    hand = measure.ort_session(by_hand(base, master)).logits(trained_cnn.x_test[:200])
    np.testing.assert_array_equal(ours, hand)
    values = lambda data: {t.name: numpy_helper.to_array(t)  # noqa: E731
                           for t in onnx.load_from_string(data).graph.initializer}
    hand_values, our_values = values(by_hand(base, master)), values(out.data)
    for name in hand_values:
        np.testing.assert_array_equal(our_values[name], hand_values[name], err_msg=name)
    # onnx's own serializer writes the same bytes (once stamped): splicing gives the canonical file
    assert model_id.stamp(by_hand(base, master))[0] == out.data


def test_the_next_file_keeps_the_metadata_and_stays_within_half_a_step(base, exported, trained_cnn):
    master = moved(base, exported, 3.0, seed=1, shrink=0.97)  # 0.97 x 127 + 3 < 127: nothing clips
    out = requantize(base, master)
    info, held = read_info(out.data), read_info(base)
    assert (info.spec, info.classes, info.mean, info.precision) == (held.spec, held.classes, held.mean, "int8")
    assert info.model_id == out.model_id
    weights = read_int8_weights(out.data)
    for name, w in master.items():
        err = np.abs(weights.values[name] - w) / weights.steps[name]
        assert err.max() <= 0.5 + 1e-3, name
    assert out.weights_clipped == 0 and out.weights_changed > out.weight_entries // 2


def test_changes_and_clipping_are_counted(base, exported):
    master = dict(exported)
    name = "classifier.0.weight"
    master[name] = exported[name] * 1.5  # the largest entries of each row go past 127 steps
    out = requantize(base, master)
    layout = QdqLayout.of(base)
    t = layout.tensors[name]
    ratio = np.round(master[name].astype(np.float32) / t.scale)
    assert out.clipped[name] == np.count_nonzero(np.abs(ratio) > 127) > 0
    assert out.weights_clipped == out.clipped[name]
    q = t.read(out.data)
    assert q.max() == 127 and q.min() == -127  # clipped to the symmetric range, never -128
    assert out.changed[name] == np.count_nonzero(q != t.read(base))
    assert out.changed == {k: (v if k == name else 0) for k, v in out.changed.items()}


def test_a_master_that_does_not_fit_the_file_is_refused(base, exported):
    with pytest.raises(RequantizeError, match="lacks"):
        requantize(base, {k: v for k, v in exported.items() if k != "features.0.bias"})
    with pytest.raises(RequantizeError, match="shape"):
        requantize(base, {**exported, "features.0.weight": exported["features.0.weight"][:1]})
    with pytest.raises(RequantizeError, match="not finite"):
        requantize(base, {**exported, "features.0.bias": exported["features.0.bias"] * np.nan})
    with pytest.raises(RequantizeError, match="readable"):
        requantize(b"junk", exported)


def test_a_patch_from_one_version_to_the_next_rebuilds_it_exactly(base, exported):
    master = moved(base, exported, 0.7, seed=2)
    out = requantize(base, master)
    patch = make_patch(base, out.data)
    assert apply_patch(base, patch) == out.data
    assert len(patch) < len(base) // 2
    counts = changed_entries(patch)
    for name, n in out.changed.items():
        assert counts.get(name + "_quantized", 0) == n, name
    # versions chain: the next round patches from the file devices now hold
    following = requantize(out.data, moved(base, master, 0.7, seed=3))
    assert apply_patch(out.data, make_patch(out.data, following.data)) == following.data


def test_a_capped_patch_sends_the_largest_changes_and_keeps_the_rest_pending(base, exported):
    master = moved(base, exported, 1.5, seed=4)
    layout = QdqLayout.of(base)
    full = requantize(base, master, layout=layout)
    capped, left = capped_requantize(base, master, 2000, layout=layout)
    patch = make_patch(base, capped.data)
    assert len(patch) <= 2000 < len(make_patch(base, full.data))
    assert left > 0 and capped.weights_changed + left == full.weights_changed
    moves = step_changes(base, master, layout)
    sent = min(float(moves[k][layout.tensors[k].read(capped.data) != layout.tensors[k].read(base)].min())
               for k in moves if capped.changed[k])
    kept = max(float(moves[k][layout.tensors[k].read(capped.data) == layout.tensors[k].read(base)].max())
               for k in moves)
    assert sent >= kept
    # the next capped round, same master, sends more of what was left
    again, left_again = capped_requantize(capped.data, master, 2000, layout=layout)
    assert left_again < left
    assert apply_patch(capped.data, make_patch(capped.data, again.data)) == again.data


def test_a_deadband_changes_only_weights_the_master_moved_past_it(base, exported):
    layout = QdqLayout.of(base)
    master = moved(base, exported, 1.6, seed=5)
    exact = requantize(base, master, layout=layout)
    banded = requantize(base, master, layout=layout, keep=deadband_keep(base, master, layout, 1.0))
    assert 0 < banded.weights_changed < exact.weights_changed
    assert requantize(base, master, layout=layout, keep=deadband_keep(base, master, layout, 0.5)).data == exact.data
    for name, t in layout.tensors.items():
        if t.kind != "weight":
            continue
        x = master[name].reshape(t.shape) / t.scale
        held, old = t.read(banded.data), t.read(base)
        far = np.abs(x - old) > 1.0
        assert (held[~far] == old[~far]).all()  # within the band: kept
        exact_q = t.read(exact.data)
        assert (held[far] == exact_q[far]).all()  # past it: rounded as an exact patch would
        assert np.abs(x - held).max() <= 1.0 + 1e-4 or (np.abs(exact_q) == 127).any()  # never over a band away
    assert apply_patch(base, make_patch(base, banded.data)) == banded.data


def test_the_wire_walker_finds_every_initializer_value_where_onnx_reads_it(base):
    from pqsu.protocol.onnx_wire import spans

    found = {s.key: s for s in spans(base) if s.kind == "tensor"}
    proto = onnx.load_from_string(base)
    assert set(found) == {t.name for t in proto.graph.initializer if t.raw_data or t.float_data}
    for t in proto.graph.initializer:
        if t.name in found:
            s = found[t.name]
            expected = t.raw_data or np.asarray(t.float_data, "<f4").tobytes()
            assert base[s.start:s.end] == expected and s.data_type == t.data_type, t.name
    meta = [s.key for s in spans(base) if s.kind == "meta"]
    assert meta == [p.key for p in proto.metadata_props]


def test_saturating_clips_the_master_in_place_to_what_the_held_scales_represent(base, exported):
    """A weight past the held scale reaches devices at the range's end; saturated, the master holds just that,
    so requantizing it gives the same file and clips nothing."""
    master = {k: v * 3.0 for k, v in exported.items()}  # grown far past the held scales
    layout = QdqLayout.of(base)
    grown = requantize(base, master, layout=layout)
    assert grown.weights_clipped > 0
    before = {k: v.copy() for k, v in master.items()}
    pressed = saturate(master, layout)
    assert pressed == grown.weights_clipped
    after = requantize(base, master, layout=layout)
    assert after.weights_clipped == 0 and after.data == grown.data  # the devices' model is the same
    for name, t in layout.tensors.items():
        if t.kind == "weight" and name in master:
            inside = np.abs(before[name]).reshape(t.shape) <= 127 * t.scale
            assert np.array_equal(master[name].reshape(t.shape)[inside], before[name].reshape(t.shape)[inside])
    assert saturate(master, layout) == 0  # idempotent
