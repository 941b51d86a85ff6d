"""Aggregation against dense numpy references, norm clipping, spec parsing, the server step,
and FedAvg's O(model) memory. Updates are real codec blocks that went through encode/decode."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pqsu.cloud.aggregate import (AggregationError, FedAvg, Median, MedianNormClip, ServerOptimizer, TrimmedMean,
                                  make_aggregator, parse_clip, update_norm)
from pqsu.protocol.codec import TensorBlock, Update, decode, encode
from pqsu.protocol.errors import PqsuError

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SHAPES = {"conv.w": (4, 2, 3), "conv.b": (4,), "fc.w": (3, 5)}


@st.composite
def updates(draw, shapes=SHAPES, max_updates=6):
    """A list of decoded updates, each tensor dense, sparse, skipped or left out, with random sample counts."""
    n = draw(st.integers(1, max_updates))
    seed = draw(st.integers(0, 2**32 - 1))
    kinds = draw(st.lists(st.lists(st.sampled_from(["dense", "sparse", "skip", "absent"]),
                                   min_size=len(shapes), max_size=len(shapes)), min_size=n, max_size=n))
    samples = draw(st.lists(st.integers(1, 5000), min_size=n, max_size=n))
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        blocks = []
        for (name, shape), kind in zip(shapes.items(), kinds[i]):
            values = (rng.normal(0, 1, shape) * 10.0 ** rng.uniform(-3, 1)).astype(np.float32)
            if kind == "dense":
                blocks.append(TensorBlock.dense(name, values))
            elif kind == "sparse":
                idx = np.sort(rng.choice(values.size, rng.integers(0, values.size + 1), replace=False))
                blocks.append(TensorBlock.sparse(name, shape, idx, values.ravel()[idx]))
            elif kind == "skip":
                blocks.append(TensorBlock.skip(name, shape))
        u = Update(1, f"dev-{i}", "model", samples[i], 0.5, tuple(blocks))
        out.append(decode(encode(u)))
    return out


def _dense(u: Update, shapes=SHAPES) -> dict[str, np.ndarray]:
    d = {k: np.zeros(s, np.float64) for k, s in shapes.items()}
    for k, v in u.to_dense().items():
        d[k] += v
    return d


def _close(got, want, what=""):
    for k in want:
        scale = max(float(np.abs(want[k]).max()), 1e-12)
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5 * scale, err_msg=f"{what} {k}")


@SETTINGS
@given(ups=updates())
def test_fedavg_is_the_sample_weighted_mean_of_dequantized_updates(ups):
    agg = FedAvg(SHAPES)
    for u in ups:
        agg.add(u)
    total = sum(u.num_samples for u in ups)
    want = {k: sum(u.num_samples * _dense(u)[k] for u in ups) / total for k in SHAPES}
    got = agg.result()
    assert agg.count == len(ups)
    assert {k: v.shape for k, v in got.items()} == SHAPES
    _close(got, want, "fedavg")


def _sent(u: Update, shapes=SHAPES) -> dict[str, np.ndarray]:
    """Dequantized values, NaN where the update sent nothing (skipped, left out, or not selected)."""
    d = {k: np.full(s, np.nan) for k, s in shapes.items()}
    for b in u.blocks:
        if b.kind == "sparse":
            d[b.name].reshape(-1)[b.indices] = b.dequantize().reshape(-1)[b.indices]
        elif b.kind != "skip":
            d[b.name] = b.dequantize().astype(np.float64)
    return d


def _per_coordinate(ups, reduce, shapes=SHAPES) -> dict[str, np.ndarray]:
    """Each coordinate: reduce(the values sent there, number of updates) x the fraction of updates that sent it."""
    held = [_sent(u, shapes) for u in ups]
    out = {}
    for k, s in shapes.items():
        columns = np.stack([h[k].reshape(-1) for h in held]).T
        out[k] = np.array([reduce(np.sort(c[~np.isnan(c)]), len(held)) * np.count_nonzero(~np.isnan(c)) / len(held)
                           if not np.isnan(c).all() else 0.0 for c in columns]).reshape(s)
    return out


def _median_reference(values: np.ndarray, n: int) -> float:
    return float(np.median(values))


def _trimmed_reference(trim: float):
    def reduce(values: np.ndarray, n: int) -> float:
        k = min(int(math.floor(trim * n)), (len(values) - 1) // 2)
        return float(values[k:len(values) - k].mean())
    return reduce


@SETTINGS
@given(ups=updates(max_updates=7))
def test_median_is_taken_over_the_devices_that_sent_each_coordinate(ups):
    agg = Median(SHAPES)
    for u in ups:
        agg.add(u)
    _close(agg.result(), _per_coordinate(ups, _median_reference), "median")


@SETTINGS
@given(ups=updates(max_updates=8), trim=st.sampled_from([0.0, 0.1, 0.2, 0.25, 0.34, 0.49]))
def test_trimmed_mean_is_taken_over_the_devices_that_sent_each_coordinate(ups, trim):
    agg = make_aggregator(f"trimmed:{trim}", SHAPES)
    assert isinstance(agg, TrimmedMean)
    for u in ups:
        agg.add(u)
    _close(agg.result(), _per_coordinate(ups, _trimmed_reference(trim)), "trimmed")


@pytest.mark.parametrize("spec, numpy_reduce", [
    ("median", lambda s: np.median(s, axis=0)),
    ("trimmed:0.2", lambda s: np.sort(s, axis=0)[1:len(s) - 1].mean(axis=0))])
def test_on_dense_updates_the_robust_aggregators_are_the_plain_numpy_statistics(spec, numpy_reduce):
    rng = np.random.default_rng(3)
    ups = [_one({k: rng.normal(0, 1, s).astype(np.float32) for k, s in SHAPES.items()}, device=f"d{i}")
           for i in range(7)]
    agg = make_aggregator(spec, SHAPES)
    for u in ups:
        agg.add(u)
    _close(agg.result(), {k: numpy_reduce(np.stack([_dense(u)[k] for u in ups])) for k in SHAPES}, spec)


@pytest.mark.parametrize("spec", ["median", "trimmed:0.1"])
def test_robust_aggregators_keep_the_signal_of_sparse_top_k_updates(spec):
    # Ten devices agree on a direction but each sends its own top 2% of it plus noise: few
    # coordinates are sent by more than one device. Counting unsent entries as 0-votes made the
    # median of such a round almost 0; reduced over the senders it stays close to FedAvg.
    shapes = {"w": (50, 100)}
    rng = np.random.default_rng(7)
    direction = rng.normal(0, 1, shapes["w"])
    ups = []
    for i in range(10):
        values = (direction + rng.normal(0, 1, shapes["w"])).ravel()
        idx = np.sort(np.argpartition(np.abs(values), -100)[-100:])
        ups.append(Update(1, f"d{i}", "m", 10, 0.0, (TensorBlock.sparse("w", shapes["w"], idx, values[idx]),)))
    robust, avg = make_aggregator(spec, shapes), FedAvg(shapes)
    for u in ups:
        robust.add(u)
        avg.add(u)
    r, a = robust.result()["w"].ravel(), avg.result()["w"].ravel()
    assert float(r @ a) / (np.linalg.norm(r) * np.linalg.norm(a)) > 0.95
    assert 0.8 < np.linalg.norm(r) / np.linalg.norm(a) <= 1.0 + 1e-6


def test_trimmed_mean_drops_an_outlier_that_the_mean_would_follow():
    shapes = {"w": (3,)}
    agg, avg = TrimmedMean(shapes, trim=0.2), FedAvg(shapes)
    for i, v in enumerate([[1.0, 1, 1], [1.1, 1, 1], [0.9, 1, 1], [1.0, 1, 1], [1000.0, -1000, 1]]):
        u = Update(1, f"d{i}", "m", 1, 0.0, (TensorBlock.dense("w", np.array(v, np.float32), per_channel=False),))
        agg.add(u)
        avg.add(u)
    assert np.abs(agg.result()["w"] - 1).max() < 0.1
    assert np.abs(avg.result()["w"] - 1).max() > 100


@SETTINGS
@given(ups=updates())
def test_update_norm_is_the_norm_of_the_dequantized_update(ups):
    for u in ups:
        want = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in u.to_dense().values()))
        assert update_norm(u) == pytest.approx(want, rel=1e-5, abs=1e-12)


def _one(values: dict[str, np.ndarray], samples: int = 10, device: str = "d") -> Update:
    return Update(1, device, "m", samples, 0.0, tuple(TensorBlock.dense(k, v) for k, v in values.items()))


@pytest.mark.parametrize("spec", ["fedavg", "median", "trimmed:0.2"])
def test_clip_norm_scales_an_oversized_update_to_the_clip_norm(spec):
    rng = np.random.default_rng(0)
    big = _one({k: rng.normal(0, 5, s).astype(np.float32) for k, s in SHAPES.items()})
    norm = update_norm(big)
    assert norm > 10
    agg = make_aggregator(spec, SHAPES, clip_norm=2.0)
    agg.add(big)
    got = agg.result()
    assert math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in got.values())) == pytest.approx(2.0, rel=1e-5)
    _close(got, {k: v * (2.0 / norm) for k, v in _dense(big).items()}, "clipped")


def test_clip_norm_leaves_a_small_update_alone_and_keeps_sample_weights():
    rng = np.random.default_rng(1)
    small = _one({k: rng.normal(0, 0.01, s).astype(np.float32) for k, s in SHAPES.items()}, samples=30, device="a")
    big = _one({k: rng.normal(0, 5, s).astype(np.float32) for k, s in SHAPES.items()}, samples=10, device="b")
    assert update_norm(small) < 1 < update_norm(big)
    agg = FedAvg(SHAPES, clip_norm=1.0)
    agg.add(small)
    agg.add(big)
    f = 1.0 / update_norm(big)
    want = {k: (30 * _dense(small)[k] + 10 * f * _dense(big)[k]) / 40 for k in SHAPES}
    _close(agg.result(), want, "mixed")


def test_no_updates_gives_no_result():
    for spec in ("fedavg", "median", "trimmed:0.1"):
        assert make_aggregator(spec, SHAPES).result() is None
        assert make_aggregator(spec, SHAPES, clip_norm="median").result() is None


def _of_norm(norm: float, rng, device: str) -> Update:
    values = {k: rng.normal(0, 1, s) for k, s in SHAPES.items()}
    total = math.sqrt(sum(float(np.sum(v ** 2)) for v in values.values()))
    return _one({k: (v * norm / total).astype(np.float32) for k, v in values.items()}, device=device)


@pytest.mark.parametrize("spec", ["fedavg", "median", "trimmed:0.2"])
@pytest.mark.parametrize("factor", [1.0, 2.0])
def test_median_norm_clip_bounds_each_update_by_the_rounds_median_norm(spec, factor):
    rng = np.random.default_rng(4)
    ups = [_of_norm(n, rng, f"d{i}") for i, n in enumerate([1.0, 2.0, 3.0, 4.0, 100.0])]  # one scaled attacker
    bound = factor * float(np.median([update_norm(u) for u in ups]))
    assert bound == pytest.approx(3.0 * factor, rel=1e-2)
    agg = make_aggregator(spec, SHAPES, clip_norm=f"median:{factor:g}")
    assert isinstance(agg, MedianNormClip)
    fixed = make_aggregator(spec, SHAPES, clip_norm=bound)  # what the median norm works out to this round
    for u in ups:
        agg.add(u)
        fixed.add(u)
    assert agg.count == 5
    _close(agg.result(), fixed.result(), f"median:{factor}")
    assert agg.bound == pytest.approx(bound)
    _close(agg.result(), fixed.result(), "a second call")  # result() is idempotent


def test_median_norm_clip_follows_the_round_as_updates_shrink():
    rng = np.random.default_rng(5)
    agg = make_aggregator("fedavg", SHAPES, clip_norm="median")
    for i, n in enumerate([0.1, 0.2, 0.3, 50.0]):
        agg.add(_of_norm(n, rng, f"d{i}"))
    got = agg.result()
    assert agg.bound == pytest.approx(0.25, rel=1e-2)
    # clipped norms 0.1, 0.2, 0.25, 0.25: their mean has norm <= 0.2 (unclipped, the outlier alone gives 12.5)
    assert math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in got.values())) <= 0.2 + 1e-6


@pytest.mark.parametrize("clip, want", [(None, (None, None)), (1.5, (1.5, None)), ("1.5", (1.5, None)), (2, (2.0, None)),
                                        ("median", (None, 1.0)), ("median:2", (None, 2.0)), (" median:0.5", (None, 0.5))])
def test_parse_clip(clip, want):
    assert parse_clip(clip) == want


@pytest.mark.parametrize("clip", [0, -1.0, "-1", "0", "nan", "inf", float("nan"), True, "foo", "median:0", "median:-2",
                                  "median:x", "mean:2", "1.5:2", ""])
def test_bad_clip_norms_are_refused(clip):
    with pytest.raises(AggregationError) as info:
        make_aggregator("fedavg", SHAPES, clip_norm=clip)
    assert isinstance(info.value, PqsuError) and "clip norm" in str(info.value)


def test_make_aggregator_builds_each_kind():
    assert type(make_aggregator("fedavg", SHAPES)) is FedAvg
    assert type(make_aggregator("median", SHAPES)) is Median
    t = make_aggregator("trimmed:0.25", SHAPES, clip_norm=3.0)
    assert type(t) is TrimmedMean and t.trim == 0.25 and t.clip_norm == 3.0
    assert make_aggregator("trimmed", SHAPES).trim == 0.1


@pytest.mark.parametrize("spec", ["foo", "", "fedavg:1", "median:2", "trimmed:0.5", "trimmed:-0.1", "trimmed:abc",
                                  "trimmed:nan", "FedAvg"])
def test_make_aggregator_rejects_bad_specs(spec):
    with pytest.raises(AggregationError) as info:
        make_aggregator(spec, SHAPES)
    assert isinstance(info.value, PqsuError) and str(info.value)


# ------------------------------------------------------------------------ server step

def _master():
    return {"w": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32), "b": np.array([0.5, -0.5], np.float32)}


def test_server_step_applies_lr_times_delta():
    master = _master()
    ServerOptimizer(lr=0.5).step(master, {"w": np.array([[2.0, -2.0], [0.0, 4.0]], np.float32),
                                          "b": np.array([1.0, 1.0], np.float32)})
    np.testing.assert_array_equal(master["w"], [[2.0, 1.0], [3.0, 6.0]])
    np.testing.assert_array_equal(master["b"], [1.0, 0.0])
    assert master["w"].dtype == np.float32


def test_server_momentum_accumulates_velocity():
    master = _master()
    opt = ServerOptimizer(lr=0.5, momentum=0.9)
    d1 = {"w": np.full((2, 2), 1.0, np.float32), "b": np.array([2.0, 0.0], np.float32)}
    d2 = {"w": np.full((2, 2), -1.0, np.float32), "b": np.array([0.0, 2.0], np.float32)}
    opt.step(master, d1)                                   # v1 = d1;            w1 = w0 + 0.5 v1
    np.testing.assert_allclose(master["w"], _master()["w"] + 0.5)
    opt.step(master, d2)                                   # v2 = 0.9 v1 + d2;   w2 = w1 + 0.5 v2
    v2 = {k: 0.9 * d1[k] + d2[k] for k in d1}
    np.testing.assert_allclose(opt.velocity["w"], v2["w"], rtol=1e-6)
    np.testing.assert_allclose(master["w"], _master()["w"] + 0.5 * d1["w"] + 0.5 * v2["w"], rtol=1e-6)
    np.testing.assert_allclose(master["b"], _master()["b"] + 0.5 * d1["b"] + 0.5 * v2["b"], rtol=1e-6)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("bad", [np.nan, np.inf, 3e38])  # 3e38 overflows float32 when added to the master
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_non_finite_step_is_refused_and_master_untouched(bad, momentum):
    master = _master()
    master["w"][0, 0] = 3e38
    opt = ServerOptimizer(lr=1.0, momentum=momentum)
    opt.step(master, {"w": np.zeros((2, 2), np.float32), "b": np.ones(2, np.float32)})
    before = {k: v.copy() for k, v in master.items()}
    velocity = {k: v.copy() for k, v in opt.velocity.items()}
    delta = {"w": np.array([[bad, 0.0], [0.0, 0.0]], np.float32), "b": np.ones(2, np.float32)}
    with pytest.raises(AggregationError):
        opt.step(master, delta)
    for k in before:
        assert master[k].tobytes() == before[k].tobytes(), k
    assert {k: v.tobytes() for k, v in opt.velocity.items()} == {k: v.tobytes() for k, v in velocity.items()}


# ------------------------------------------------------------------------ memory

def _arrays(obj, seen=None) -> list[np.ndarray]:
    """Every numpy array reachable from an aggregator's attributes."""
    seen = seen if seen is not None else set()
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):  # a view counts as the buffer it views, once
        base = obj if obj.base is None or not isinstance(obj.base, np.ndarray) else obj.base
        return [] if id(base) in seen and base is not obj else (seen.add(id(base)) or [base])
    if isinstance(obj, dict):
        return [a for v in obj.values() for a in _arrays(v, seen)]
    if isinstance(obj, (list, tuple, set)):
        return [a for v in obj for a in _arrays(v, seen)]
    if hasattr(obj, "__dict__"):
        return _arrays(vars(obj), seen)
    return []


def test_fedavg_memory_is_one_accumulator_per_tensor_however_many_updates():
    shapes = {"conv.w": (32, 16, 3, 3), "conv.b": (32,), "fc.w": (64, 512), "fc.b": (64,)}
    model_nbytes = sum(4 * math.prod(s) for s in shapes.values())
    rng = np.random.default_rng(0)
    agg = FedAvg(shapes)
    reference = {k: np.zeros(s, np.float64) for k, s in shapes.items()}
    for i in range(200):
        blocks = []
        for name, s in shapes.items():
            n = math.prod(s)
            idx = np.sort(rng.choice(n, max(1, n // 100), replace=False))
            blocks.append(TensorBlock.sparse(name, s, idx, rng.normal(size=idx.size)))
        u = decode(encode(Update(1, f"dev-{i}", "m", 10, 0.1, tuple(blocks))))
        agg.add(u)
        for k, v in u.to_dense().items():
            reference[k] += v
    held = _arrays(agg)
    # the accumulator (one flat buffer, viewed per tensor) and the layout's offsets and sizes per tensor
    assert model_nbytes <= sum(a.nbytes for a in held) <= model_nbytes + 64 * len(shapes)
    assert agg.count == 200
    _close(agg.result(), {k: v / 200 for k, v in reference.items()}, "streamed")

    # the holding aggregators keep every update: the same measure sees it
    median = Median(shapes)
    for _ in range(3):
        median.add(u)
    assert sum(a.nbytes for a in _arrays(median)) == 3 * model_nbytes
