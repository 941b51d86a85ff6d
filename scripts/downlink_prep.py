"""The coordinator's model preparation per round: a keyframe (full export) against a version made
between keyframes (requantized in place, plus the patches from the last versions), side by side in
one run on the same server and master. Medians of --repeats.

    OMP_NUM_THREADS=1 python scripts/downlink_prep.py
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cnn")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    from pqsu.cloud.bootstrap import build_server
    from pqsu.cloud.config import FederatedConfig

    cfg = FederatedConfig.for_scheme("ours", model=args.model, clients=2, rounds=1, proxy_samples=500,
                                     eval_samples=200, pretrain_epochs=0.2, finetune_epochs=0.1)
    server, _ = build_server(cfg)
    downlink, rng = server.downlink, np.random.default_rng(0)
    downlink.model()
    keyframe, between = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        downlink.keyframe()
        downlink.patches()
        keyframe.append(time.perf_counter() - t0)
        for v in server.master.values():  # a round's step: a small move of every entry
            v += rng.normal(0, 1e-3, v.shape).astype(v.dtype)
        t0 = time.perf_counter()
        step = downlink.advance()
        downlink.patches()
        between.append(time.perf_counter() - t0)
    k, b = statistics.median(keyframe), statistics.median(between)
    print(f"{args.model}, median of {args.repeats}: keyframe (export_model + quantize_static) {1000 * k:.0f} ms, "
          f"between keyframes ({step.kind}: requantize in place + {len(downlink.patches())} patches, "
          f"{step.changed:,} int8 weights of {sum(v.size for v in server.master.values()):,} parameters changed) "
          f"{1000 * b:.1f} ms: "
          f"{k / b:.0f}x faster")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
