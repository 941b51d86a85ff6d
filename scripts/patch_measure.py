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
- how far a generic compressor (zlib, stdlib) would shrink the exact patch, and how far it
  would shrink one that carried value differences instead of new values (an estimate);
- keyframe policies (every K rounds, or when the held scales clip more than a fraction of
  the weights; optionally capped patches, largest changes first, what a cap leaves out
  pending toward the devices' model), each following its own chain of files: bytes down per
  round and accuracy against the fresh export. Devices here train on the fresh export each
  round, so a policy's accuracy is that of the model it would deliver, not of a run trained
  on it (that needs the wiring into the round loop);
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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pqsu.cloud.bootstrap import build_server
from pqsu.cloud.config import FederatedConfig
from pqsu.export import measure
from pqsu.export.pipeline import export_int8
from pqsu.export.requantize import QdqLayout, capped_requantize, requantize
from pqsu.export.training import evaluate_logits
from pqsu.protocol import model_id, varint
from pqsu.protocol.onnx_wire import ITEMSIZE, spans
from pqsu.protocol.patch import PatchError, apply_patch, diff, make_patch
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


def delta_zlib_bytes(held: bytes, nxt: bytes) -> int:
    """What the patch would take if it carried value differences (new - old, wrapping) instead of
    new values and were zlib-compressed: headers and names as they are, index data and
    differences compressed together. An estimate for a possible format version 2."""
    tensors, splices = diff(held, nxt)
    streams, overhead = [], 86 + 4 + sum(len(new) + 15 + len(key) for key, _, _, new in splices)
    for c in tensors:
        width = ITEMSIZE.get(c.data_type, 1)
        old = np.frombuffer(held, f"<u{width}", c.numel, c.offset)[c.indices]
        new = np.frombuffer(c.values, f"<u{width}")
        streams += [varint.encode_index_set(c.indices, c.numel)[1], (new - old).tobytes()]
        overhead += 1 + 2 + len(c.name.encode()) + 10 + 5
    return overhead + len(zlib.compress(b"".join(streams), 9))


def keyframe_patch(held: bytes, fresh: bytes) -> int | str:
    """Bytes of a patch to the fresh export, if it is patchable: activation zero points are
    varint-coded `int32_data`, which a patch never rewrites, so a calibration that moves one is not."""
    try:
        return len(make_patch(held, fresh))
    except PatchError as exc:
        return exc.reason


@dataclass
class Chain:
    """What devices would hold under one keyframe policy: a keyframe (the fresh export, sent
    whole) every `every` rounds, or when more than `clip` of the int8 weights clip at the held
    scales; between keyframes, patches (capped at `cap` bytes if given)."""

    label: str
    every: int | None = None
    clip: float | None = None
    cap: int | None = None
    held: bytes = b""
    layout: QdqLayout | None = None
    since: int = 0
    keyframes: int = 0
    bytes_down: list = field(default_factory=list)
    acc: list = field(default_factory=list)

    def start(self, keyframe: bytes, layout: QdqLayout) -> None:
        self.held, self.layout = keyframe, layout

    def step(self, server, fresh: bytes) -> None:
        nxt = requantize(self.held, server.master, layout=self.layout)
        self.since += 1
        drift = nxt.weights_clipped / nxt.weight_entries
        if (self.every and self.since >= self.every) or (self.clip is not None and drift > self.clip):
            self.held, self.layout, self.since = fresh, QdqLayout.of(fresh), 0
            self.keyframes += 1
            self.bytes_down.append(len(fresh))
        else:
            if self.cap:
                nxt, _ = capped_requantize(self.held, server.master, self.cap, layout=self.layout)
            patch = make_patch(self.held, nxt.data)
            assert apply_patch(self.held, patch) == nxt.data
            self.held = nxt.data
            self.bytes_down.append(len(patch))
        self.acc.append(accuracy(server, self.held))


POLICIES = [Chain("no keyframe"), Chain("no keyframe, cap 4096 B", cap=4096), Chain("every 2", every=2),
            Chain("every 4", every=4), Chain("clip > 0.5%", clip=0.005), Chain("clip > 1%", clip=0.01),
            Chain("clip > 2%", clip=0.02), Chain("clip > 1%, cap 4096 B", clip=0.01, cap=4096),
            Chain("every 4 or clip > 1%", every=4, clip=0.01)]


def measure_rounds(cfg: FederatedConfig, chains: list[Chain], repeats: int) -> tuple[list[dict], list[dict], dict]:
    server, _ = build_server(cfg)
    keyframe = server.model_message()[0]
    layout = QdqLayout.of(keyframe)
    exact = keyframe
    for chain in chains:
        chain.start(keyframe, layout)
    rows: list[dict] = []
    fresh_acc: list[float] = []

    def on_round(rep) -> None:
        nonlocal exact
        fresh = server.model_message()[0]  # close_round already exported the new master
        nxt = requantize(exact, server.master, layout=layout)
        patch = make_patch(exact, nxt.data)
        assert apply_patch(exact, patch) == nxt.data
        fresh_acc.append(accuracy(server, fresh))
        rows.append({"round": rep.round, "full_bytes": len(fresh), "patch_bytes": len(patch),
                     "patch_zlib": len(zlib.compress(patch, 9)),
                     "delta_zlib": delta_zlib_bytes(exact, nxt.data), "keyframe_patch": keyframe_patch(exact, fresh),
                     "weights": nxt.weight_entries, "changed": nxt.weights_changed,
                     "clipped": nxt.weights_clipped, "acc_fresh": fresh_acc[-1],
                     "acc_exact": accuracy(server, nxt.data),
                     "acc_fresh_act": accuracy(server, with_activation_scales(nxt.data, fresh, layout))})
        for chain in chains:
            chain.step(server, fresh)
        exact = nxt.data

    simulate(cfg, on_round, server=server)
    policies = []
    for c in chains:
        gaps = [100 * (f - a) for f, a in zip(fresh_acc, c.acc)]
        policies.append({"policy": c.label, "keyframes": c.keyframes, "mean_bytes": statistics.mean(c.bytes_down),
                         "full_bytes": rows[-1]["full_bytes"], "mean_gap_pt": statistics.mean(gaps),
                         "worst_gap_pt": max(gaps), "last3_acc": statistics.mean(c.acc[-3:])})
    return rows, policies, measure_speed(server, exact, repeats)


def table(rows: list[dict], policies: list[dict], speed: dict) -> str:
    head = ["round", "full int8 file B", "patch B", "full/patch", "patch zlib -9 B",
            "differences + zlib B (estimate)", "fresh keyframe as a patch B",
            "int8 weights changed", "clipped", "acc fresh export", "acc patched", "acc patched, fresh act. scales"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["round"], r["full_bytes"], r["patch_bytes"], f"{r['full_bytes'] / r['patch_bytes']:.1f}x",
                 r["patch_zlib"], r["delta_zlib"], r["keyframe_patch"],
                 f"{r['changed']} of {r['weights']} ({100 * r['changed'] / r['weights']:.2f}%)",
                 f"{r['clipped']} ({100 * r['clipped'] / r['weights']:.2f}%)",
                 f"{r['acc_fresh']:.4f}", f"{r['acc_exact']:.4f}", f"{r['acc_fresh_act']:.4f}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "| keyframe policy | keyframes | mean bytes down per round | full file / mean | "
              "mean acc gap to fresh export (pt) | worst gap (pt) | last-3 mean acc |", "|---|---|---|---|---|---|---|"]
    for p in policies:
        lines.append(f"| {p['policy']} | {p['keyframes']} | {p['mean_bytes']:.0f} | "
                     f"{p['full_bytes'] / p['mean_bytes']:.1f}x | {p['mean_gap_pt']:.2f} | {p['worst_gap_pt']:.2f} | "
                     f"{p['last3_acc']:.4f} |")
    lines.append("")
    lines.append(f"coordinator, median of {speed['repeats']}: export_int8 {speed['export_s'] * 1e3:.0f} ms, "
                 f"requantize {speed['requantize_s'] * 1e3:.2f} ms with the keyframe's layout cached "
                 f"({speed['ratio']:.0f}x faster), {speed['requantize_uncached_s'] * 1e3:.2f} ms "
                 f"parsing it again ({speed['ratio_uncached']:.0f}x faster)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--scheme", default="ours")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-momentum", type=float, default=None, help="override the scheme's server momentum")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    extra = {} if args.server_momentum is None else {"server_momentum": args.server_momentum}
    cfg = FederatedConfig.for_scheme(args.scheme, clients=args.clients, rounds=args.rounds, seed=args.seed, **extra)
    rows, policies, speed = measure_rounds(cfg, POLICIES, args.repeats)
    print(f"scheme {args.scheme}, cnn pruned {cfg.prune}, {args.clients} clients, {args.rounds} rounds, "
          f"server momentum {cfg.server_momentum}, seed {args.seed}")
    print(table(rows, policies, speed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
