"""What a federated run leaves behind: metrics.jsonl, summary.json, the final model, plots."""
from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

from pqsu.cloud.run_plots import write_run_plots
from pqsu.export.zoo import build_model, default_spec
from pqsu.protocol.errors import PqsuError

log = logging.getLogger(__name__)


def dense_fp32_upload_bytes(arch: str, in_shape: tuple[int, ...], num_classes: int) -> int | None:
    """What one dense fp32 FedAvg upload of the unpruned model weighs (4 bytes a parameter); None when the
    run's custom architecture cannot be built here (the summary still gets written)."""
    if ":" in arch:  # the run's own custom architecture (trusted: it is this cloud's configuration), unpruned
        from pqsu.export.custom import custom_model
        from pqsu.export.pruning import fold_batchnorm

        try:
            model = custom_model(arch, tuple(in_shape), num_classes)
        except PqsuError as exc:
            log.warning("cannot count the dense fp32 upload of %s: %s", arch, exc)
            return None
        try:
            model = fold_batchnorm(model)  # the master is folded: FedAvg would send these parameters
        except PqsuError as exc:  # the summary is written at the end of a run: count unfolded, never fail it
            log.warning("counting the dense upload of %s unfolded: %s", arch, exc)
    else:
        model = build_model(default_spec(arch, tuple(in_shape), num_classes, batchnorm=False))
    return 4 * sum(p.numel() for p in model.parameters())


def summarize(rounds: list[dict], *, arch: str, in_shape: tuple[int, ...], num_classes: int,
              seconds: float, initial_accuracy: float | None = None) -> dict:
    per_upload = dense_fp32_upload_bytes(arch, in_shape, num_classes)
    up = sum(r["bytes_up"] for r in rounds)
    dense = None if per_upload is None else per_upload * sum(r["selected"] for r in rounds)
    return {
        "initial_accuracy": initial_accuracy,  # the round-0 model (pre-trained on the proxy split, pruned)
        "final_accuracy": rounds[-1]["accuracy"] if rounds else None,
        "best_accuracy": max((r["accuracy"] for r in rounds), default=None),
        # the devices' own held-out evaluation of the last round's model that any reported (federated evaluation)
        "final_device_eval": next((r["device_eval"] for r in reversed(rounds) if r.get("device_eval")), None),
        "rounds": len(rounds),
        "bytes_up_total": up,
        "bytes_down_total": sum(r["bytes_down"] for r in rounds),
        "bytes_down_flashed_total": sum(r.get("bytes_down_flashed", r["bytes_down"]) for r in rounds),
        "downloads": {k: sum(r.get("downloads", {}).get(k, 0) for r in rounds) for k in ("patch", "full")},
        "bytes_up_dense_fp32": dense,
        "uplink_reduction": dense / up if up and dense is not None else None,
        "uploads": sum(r["uploads"] for r in rounds),
        "skipped": sum(r["skipped"] for r in rounds),
        "rejected": sum(sum(r["rejected"].values()) for r in rounds),
        "wall_seconds": round(seconds, 1),
    }


def device_evaluation(evaluations: dict[str, dict]) -> dict | None:
    """A round's federated evaluation from each device's report ({"accuracy", "loss", "samples"}): the
    mean accuracy and loss weighted by the devices' held-out samples, the spread over devices (min, max
    and the unweighted standard deviation of their accuracies) and how many reported; None for none."""
    reports = list(evaluations.values())
    if not reports:
        return None
    total = sum(e["samples"] for e in reports)
    acc = [e["accuracy"] for e in reports]
    return {"devices": len(reports), "samples": total,
            "accuracy": sum(e["accuracy"] * e["samples"] for e in reports) / total,
            "loss": sum(e["loss"] * e["samples"] for e in reports) / total,
            "accuracy_min": min(acc), "accuracy_max": max(acc),
            "accuracy_std": statistics.pstdev(acc)}


def device_eval_text(ev: dict | None, lead: str = "  ") -> str:
    """`ev` (device_evaluation) for a round's line: "  devices acc 0.8123 (0.7000..0.9000, 4 devices)"."""
    if not ev:
        return ""
    return (f"{lead}devices acc {ev['accuracy']:.4f} ({ev['accuracy_min']:.4f}..{ev['accuracy_max']:.4f}, "
            f"{ev['devices']} device{'s' if ev['devices'] != 1 else ''})")


def round_line(r: dict, rounds: int | None = None) -> str:
    """What `pqsu run` and `pqsu simulate` print for a finished round (a metrics.jsonl record)."""
    of = f"/{rounds}" if rounds else ""
    return (f"round {r['round']:3d}{of}  acc {r['accuracy']:.4f}  uploads {r['uploads']}/{r['selected']}"
            f"  up {r['bytes_up']:,} B  down {r['bytes_down']:,} B  {r['seconds']:.1f}s"
            + device_eval_text(r.get("device_eval")))


def append_metrics(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(report, allow_nan=False) + "\n")  # NaN is not JSON: a reader in any language must parse it


def write_outputs(out: Path, *, config: dict, rounds: list[dict], summary: dict, model: bytes | None) -> None:
    """config.json, summary.json, model.int8.onnx (or .fp32) and the plots. metrics.jsonl is
    appended round by round (`append_metrics`) so a crash leaves every finished round on disk."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    if model is not None:
        (out / f"model.{config.get('precision', 'int8')}.onnx").write_bytes(model)
    write_run_plots(out, rounds, config, summary)
