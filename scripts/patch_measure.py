"""Measure model patches on a real federated run (docs/patches.md quotes this script's output).

    OMP_NUM_THREADS=1 python scripts/patch_measure.py --clients 3 --rounds 3

Builds the cnn (pruned 50%, int8) server as every run does, drives it through
`pqsu.tools.fleet.simulate.simulate` and, after each round, takes the server's fp32 master
and measures against the int8 model devices hold:

- the exact patch: the master requantized with the keyframe's scales held (round 0's file),
  its bytes against the full int8 file the server exports this round, the int8 weights it
  changes and the weights the held scales clip;
- the patched model's accuracy with the fresh export's activation scales spliced in, which
  tells whether held weight scales or stale activation calibration cost more;
- how far a generic compressor (zlib, stdlib) would shrink the exact patch;
- capped patches (largest changes first, at most N bytes), each following its own chain of
  files, so what a cap leaves out stays pending toward the devices' model; their accuracy
  against the exact chain and the fresh export shows what a cap costs;
- coordinator time: a full `export_int8` of the master against `requantize`, both timed in
  this run, several repeats each, medians compared.

Nothing is typed by hand: every number printed is measured here.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

from pqsu.cloud.bootstrap import build_server
from pqsu.cloud.config import FederatedConfig
from pqsu.export import measure
from pqsu.export.pipeline import export_int8
from pqsu.export.requantize import QdqLayout, capped_requantize, requantize
from pqsu.export.training import evaluate_logits
from pqsu.protocol import model_id
from pqsu.protocol.onnx_wire import spans
from pqsu.protocol.patch import apply_patch, make_patch
from pqsu.tools.fleet.simulate import simulate


def accuracy(server, data: bytes) -> float:
    return evaluate_logits(measure.ort_logits(measure.ort_session(data, threads=1), server.eval_x),
                           server.eval_y).accuracy


def with_activation_scales(data: bytes, source: bytes, layout: QdqLayout) -> bytes:
    """`data` with the activation scales and zero points of `source` (same graph), re-stamped:
    held weight scales with a fresh calibration, to tell which of the two a keyframe fixes."""
    weights = {n + s for n in layout.tensors for s in ("_scale", "_zero_point", "_quantized_scale",
                                                       "_quantized_zero_point", "_quantized")}
    out = bytearray(data)
    src = {s.key: s for s in spans(source) if s.kind == "tensor"}
    for s in spans(data):
        if s.kind == "tensor" and s.key not in weights and s.key in src:
            t = src[s.key]
            out[s.start:s.end] = source[t.start:t.end]
    return model_id.stamp(bytes(out))[0]


def measure_speed(server, held: bytes, repeats: int) -> dict:
    """Median seconds of a full int8 export and of requantizing the same master, one run."""
    master = {k: v.copy() for k, v in server.master.items()}
    export_s, requant_s, cold_s = [], [], []
    layout = QdqLayout.of(held)
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            t = time.perf_counter()
            export_int8(server.model, server.info, server.calibration, Path(tmp) / "m.onnx")
            export_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            requantize(held, master, layout=layout)
            requant_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            requantize(held, master)  # layout parsed again: what a coordinator without a cache pays
            cold_s.append(time.perf_counter() - t)
    e, r, c = (statistics.median(x) for x in (export_s, requant_s, cold_s))
    return {"export_s": e, "requantize_s": r, "requantize_uncached_s": c,
            "ratio": e / r, "ratio_uncached": e / c, "repeats": repeats}


def measure_rounds(cfg: FederatedConfig, caps: list[int], repeats: int) -> tuple[list[dict], dict]:
    server, _ = build_server(cfg)
    keyframe = server.model_message()[0]
    layout = QdqLayout.of(keyframe)
    exact = keyframe
    chains = {cap: keyframe for cap in caps}
    rows: list[dict] = []

    def on_round(rep) -> None:
        nonlocal exact
        fresh = server.model_message()[0]  # close_round already exported the new master
        nxt = requantize(exact, server.master, layout=layout)
        patch = make_patch(exact, nxt.data)
        assert apply_patch(exact, patch) == nxt.data
        row = {"round": rep.round, "full_bytes": len(fresh), "patch_bytes": len(patch),
               "patch_zlib": len(zlib.compress(patch, 9)),
               "weights": nxt.weight_entries, "changed": nxt.weights_changed,
               "clipped": nxt.weights_clipped, "acc_fresh": accuracy(server, fresh),
               "acc_exact": accuracy(server, nxt.data),
               "acc_fresh_act": accuracy(server, with_activation_scales(nxt.data, fresh, layout)), "capped": {}}
        for cap in caps:
            capped, left = capped_requantize(chains[cap], server.master, cap, layout=layout)
            cpatch = make_patch(chains[cap], capped.data)
            assert apply_patch(chains[cap], cpatch) == capped.data
            pending = requantize(capped.data, server.master, layout=layout).weights_changed
            row["capped"][cap] = {"bytes": len(cpatch), "left_out": left, "pending": pending,
                                  "acc": accuracy(server, capped.data)}
            chains[cap] = capped.data
        rows.append(row)
        exact = nxt.data

    simulate(cfg, on_round, server=server)
    return rows, measure_speed(server, exact, repeats)


def table(rows: list[dict], caps: list[int], speed: dict) -> str:
    head = ["round", "full int8 file B", "patch B", "full/patch", "patch zlib -9 B", "int8 weights changed", "clipped",
            "acc fresh export", "acc patched", "acc patched, fresh activation scales"]
    for cap in caps:
        head += [f"cap {cap} B: patch B", "left out", "acc"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["round"], r["full_bytes"], r["patch_bytes"], f"{r['full_bytes'] / r['patch_bytes']:.1f}x",
                 r["patch_zlib"],
                 f"{r['changed']} of {r['weights']} ({100 * r['changed'] / r['weights']:.2f}%)", r["clipped"],
                 f"{r['acc_fresh']:.4f}", f"{r['acc_exact']:.4f}", f"{r['acc_fresh_act']:.4f}"]
        for cap in caps:
            c = r["capped"][cap]
            cells += [c["bytes"], c["pending"], f"{c['acc']:.4f}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines.append("")
    lines.append(f"coordinator, median of {speed['repeats']}: export_int8 {speed['export_s'] * 1e3:.0f} ms, "
                 f"requantize {speed['requantize_s'] * 1e3:.2f} ms with the keyframe's layout cached "
                 f"({speed['ratio']:.0f}x faster), {speed['requantize_uncached_s'] * 1e3:.2f} ms parsing it "
                 f"again ({speed['ratio_uncached']:.0f}x faster)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--scheme", default="ours")
    p.add_argument("--caps", default="1024,4096", help="patch size caps in bytes, comma separated")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    caps = [int(c) for c in args.caps.split(",") if c]
    cfg = FederatedConfig.for_scheme(args.scheme, clients=args.clients, rounds=args.rounds, seed=args.seed)
    rows, speed = measure_rounds(cfg, caps, args.repeats)
    print(f"scheme {args.scheme}, cnn pruned {cfg.prune}, {args.clients} clients, {args.rounds} rounds, seed {args.seed}")
    print(table(rows, caps, speed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
