"""Benchmark of the update codec: bytes on the wire, encode/decode speed, streaming aggregation.

    python -m pqsu.tools.bench.codec [--quick]

Every figure is measured in this run on a ~1M-parameter CNN-shaped model (4-D convs, 2-D
linears, biases) whose update keeps the top 1% of entries, as a selective uploader sends it.
Its size is compared with the FedAvg baseline as it really travels: the same delta as a
`dense32` update (every entry float32, headers and trailer included).
The aggregation figure decodes many such updates (different index sets) and streams them into
one float32 accumulator with sample weights, the coordinator's hot path; its peak memory is
traced with tracemalloc and reported relative to the model's fp32 size.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from pqsu.protocol.codec import TensorBlock, Update, decode, encode

MODEL_SHAPES: dict[str, tuple[int, ...]] = {
    "conv1.weight": (64, 3, 3, 3), "conv1.bias": (64,),
    "conv2.weight": (128, 64, 3, 3), "conv2.bias": (128,),
    "conv3.weight": (256, 128, 3, 3), "conv3.bias": (256,),
    "conv4.weight": (256, 256, 3, 3), "conv4.bias": (256,),
    "fc1.weight": (128, 256), "fc1.bias": (128,),
    "fc2.weight": (10, 128), "fc2.bias": (10,),
}
DENSITY = 0.01


def _numel(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64))


def top_k_update(rng: np.random.Generator, device: int = 0) -> Update:
    """A true global top-1% (by magnitude) of a Gaussian weight delta: the size reference."""
    deltas = {k: rng.normal(0, 1e-3, size=s).astype(np.float32) for k, s in MODEL_SHAPES.items()}
    flat = np.concatenate([np.abs(d).reshape(-1) for d in deltas.values()])
    k = int(flat.size * DENSITY)
    threshold = np.partition(flat, flat.size - k)[flat.size - k]
    blocks = []
    for name, d in deltas.items():
        idx = np.flatnonzero(np.abs(d) >= threshold)
        blocks.append(TensorBlock.sparse(name, d.shape, idx, d.reshape(-1)[idx]) if idx.size
                      else TensorBlock.skip(name, d.shape))
    return Update(1, f"dev-{device}", "bench-cnn", 200, 0.5, tuple(blocks))


def fedavg_update(rng: np.random.Generator) -> Update:
    """The baseline: the whole delta, unquantized, as plain FedAvg uploads it."""
    blocks = tuple(TensorBlock.dense_fp32(name, rng.normal(0, 1e-3, size=shape))
                   for name, shape in MODEL_SHAPES.items())
    return Update(1, "dev-0", "bench-cnn", 200, 0.5, blocks)


def random_update(rng: np.random.Generator, device: int) -> Update:
    # Top-k positions of a random delta are a uniform random 1% of each tensor; drawing them
    # directly is ~50x cheaper than a full top-k, which matters when building 1,000 updates.
    blocks = []
    for name, shape in MODEL_SHAPES.items():
        numel = _numel(shape)
        idx = np.sort(rng.choice(numel, max(1, int(numel * DENSITY)), replace=False))
        blocks.append(TensorBlock.sparse(name, shape, idx, rng.normal(0, 1e-3, idx.size)))
    return Update(1, f"dev-{device}", "bench-cnn", int(rng.integers(50, 500)), 0.5, tuple(blocks))


def _aggregate(payloads: list[bytes]) -> dict[str, np.ndarray]:
    """Sample-weighted FedAvg of the deltas, one payload at a time (the coordinator loop)."""
    acc = {k: np.zeros(s, np.float32) for k, s in MODEL_SHAPES.items()}
    total = 0
    for p in payloads:
        update = decode(p)
        for block in update.blocks:
            block.add_to(acc[block.name], float(update.num_samples))
        total += update.num_samples
    for a in acc.values():
        a /= total
    return acc


def _best_of(passes: int, fn) -> float:
    times = []
    for _ in range(passes):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def run(quick: bool = False) -> dict:
    """Measure everything; returns the figures (also what `main` prints)."""
    rng = np.random.default_rng(2021)
    params = sum(_numel(s) for s in MODEL_SHAPES.values())
    dense_bytes = 4 * params

    ref = encode(top_k_update(rng))
    baseline = encode(fedavg_update(np.random.default_rng(0)))  # own stream: `rng` feeds the rest
    assert decode(baseline).blocks[0].kind == "dense32"
    n_codec = 50 if quick else 300
    n_agg = 100 if quick else 1000

    # Fresh updates for every encode: blocks cache their index coding, so re-encoding one
    # object would time a cache hit.
    updates = [random_update(rng, i) for i in range(max(n_codec, n_agg))]
    t0 = time.perf_counter()
    payloads = [encode(u) for u in updates]
    enc_s = time.perf_counter() - t0
    wire = sum(len(p) for p in payloads)

    # Best of a few passes: the figure is what the code can do, not what a busy machine let it.
    passes = 1 if quick else 3
    dec_s = _best_of(passes, lambda: [decode(p) for p in payloads[:n_codec]])
    dec_wire = sum(len(p) for p in payloads[:n_codec])
    agg_payloads = payloads[:n_agg]
    agg_s = _best_of(passes, lambda: _aggregate(agg_payloads))

    # The fast path must also be right: compare against plain dense sums on a few updates.
    few = agg_payloads[:20]
    ref_sum = {k: np.zeros(s, np.float64) for k, s in MODEL_SHAPES.items()}
    for u in map(decode, few):
        for name, dense in u.to_dense().items():
            ref_sum[name] += u.num_samples * dense.astype(np.float64)
    total = sum(decode(p).num_samples for p in few)
    for name, got in _aggregate(few).items():
        np.testing.assert_allclose(got, ref_sum[name] / total, rtol=1e-4, atol=1e-9)

    # Traced separately: tracemalloc slows allocation down, so it must not skew the timing.
    tracemalloc.start()
    tracemalloc.reset_peak()
    _aggregate(agg_payloads)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()

    mb = 1e6
    return {
        "params": params,
        "dense_fp32_bytes": dense_bytes,
        "update_bytes": len(ref),
        "compression_ratio": dense_bytes / len(ref),
        "dense32_update_bytes": len(baseline),
        "ratio_vs_dense32_update": len(baseline) / len(ref),
        "encode_updates_per_s": len(payloads) / enc_s,
        "encode_wire_mb_per_s": wire / enc_s / mb,
        "decode_updates_per_s": n_codec / dec_s,
        "decode_wire_mb_per_s": dec_wire / dec_s / mb,
        "aggregate_updates": n_agg,
        "aggregate_updates_per_s": n_agg / agg_s,
        "aggregate_peak_bytes": peak,
        "aggregate_peak_vs_model": peak / dense_bytes,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pqsu.tools.bench.codec",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer updates (smoke run)")
    r = run(quick=parser.parse_args(argv).quick)
    print(f"model: {r['params']:,} params over {len(MODEL_SHAPES)} tensors, "
          f"top-{DENSITY:.0%} sparse int8 update")
    print(f"  update size      {r['update_bytes']:>12,} B   dense fp32 {r['dense_fp32_bytes']:,} B"
          f"   ratio {r['compression_ratio']:.1f}x")
    print(f"  vs FedAvg        {r['dense32_update_bytes']:>12,} B   dense32 update on the wire"
          f"   ratio {r['ratio_vs_dense32_update']:.1f}x")
    print(f"  encode           {r['encode_updates_per_s']:>12,.0f} updates/s   "
          f"{r['encode_wire_mb_per_s']:.1f} MB/s (wire)")
    print(f"  decode           {r['decode_updates_per_s']:>12,.0f} updates/s   "
          f"{r['decode_wire_mb_per_s']:.1f} MB/s (wire)")
    print(f"  decode + add_to  {r['aggregate_updates_per_s']:>12,.0f} updates/s   "
          f"over {r['aggregate_updates']:,} updates into one fp32 accumulator")
    print(f"  peak memory      {r['aggregate_peak_bytes']:>12,} B   "
          f"{r['aggregate_peak_vs_model']:.2f}x the fp32 model (tracemalloc)")


if __name__ == "__main__":
    main()
