"""What a federated run leaves behind: metrics.jsonl, summary.json, the final model, plots."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from pqsu.export.zoo import build_model, default_spec

log = logging.getLogger(__name__)


def dense_fp32_upload_bytes(arch: str, in_shape: tuple[int, ...], num_classes: int) -> int:
    """What one dense fp32 FedAvg upload of the unpruned model weighs (4 bytes a parameter)."""
    if ":" in arch:  # a user's architecture: no zoo default to count from
        return 0
    model = build_model(default_spec(arch, tuple(in_shape), num_classes, batchnorm=False))
    return 4 * sum(p.numel() for p in model.parameters())


def summarize(rounds: list[dict], *, arch: str, in_shape: tuple[int, ...], num_classes: int,
              seconds: float, initial_accuracy: float | None = None) -> dict:
    per_upload = dense_fp32_upload_bytes(arch, in_shape, num_classes)
    up = sum(r["bytes_up"] for r in rounds)
    dense = per_upload * sum(r["selected"] for r in rounds)
    return {
        "initial_accuracy": initial_accuracy,  # the round-0 model (pre-trained on the proxy split, pruned)
        "final_accuracy": rounds[-1]["accuracy"] if rounds else float("nan"),
        "best_accuracy": max((r["accuracy"] for r in rounds), default=float("nan")),
        "rounds": len(rounds),
        "bytes_up_total": up,
        "bytes_down_total": sum(r["bytes_down"] for r in rounds),
        "bytes_down_flashed_total": sum(r.get("bytes_down_flashed", r["bytes_down"]) for r in rounds),
        "downloads": {k: sum(r.get("downloads", {}).get(k, 0) for r in rounds) for k in ("patch", "full")},
        "bytes_up_dense_fp32": dense,
        "uplink_reduction": dense / up if up else None,
        "uploads": sum(r["uploads"] for r in rounds),
        "skipped": sum(r["skipped"] for r in rounds),
        "rejected": sum(sum(r["rejected"].values()) for r in rounds),
        "wall_seconds": round(seconds, 1),
    }


def append_metrics(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(report) + "\n")


def write_outputs(out: Path, *, config: dict, rounds: list[dict], summary: dict, model: bytes | None) -> None:
    """config.json, summary.json, model.int8.onnx (or .fp32) and the plots. metrics.jsonl is
    appended round by round (`append_metrics`) so a crash leaves every finished round on disk."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if model is not None:
        (out / f"model.{config.get('precision', 'int8')}.onnx").write_bytes(model)
    plot(out, rounds)


def plot(out: Path, rounds: list[dict]) -> list[Path]:
    """accuracy.png (per round) and accuracy_vs_uplink.png (against cumulative uplink bytes)."""
    if not rounds:
        return []
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and boards
    import matplotlib.pyplot as plt

    xs = [r["round"] for r in rounds]
    acc = [100 * r["accuracy"] for r in rounds]
    cum, total = [], 0
    for r in rounds:
        total += r["bytes_up"]
        cum.append(total)
    paths = []
    for name, x, xlabel, xlog in (("accuracy.png", xs, "round", False),
                                  ("accuracy_vs_uplink.png", cum, "cumulative uplink bytes (all devices)", True)):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        ax.plot(x, acc, marker="o", markersize=3)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%)")
        if xlog and min(x) > 0:
            ax.set_xscale("log")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)
        paths.append(out / name)
    return paths
