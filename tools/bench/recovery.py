"""Round 0's pruning levers side by side: which channels go, how the pruned model recovers.

Per model and seed the cloud's proxy split is pre-trained once; every row then starts from a copy
of that model and runs `finish_with_report` (the coordinator's and `pqsu export`'s round 0) with its
own levers, with the same fine-tune budget. The unpruned row gets the same fine-tune epochs, so the
comparison is at equal cloud training. Accuracy is the BN-folded fp32 torch model on held-out test
samples (int8 costs are measured by the export suite); parameters are counted on the pruned model,
so rows at one ratio are compared at the same parameter budget (global ranking is bisected to it).
"""
from __future__ import annotations

import copy
import datetime as dt
import json
import logging
import statistics
import time
from pathlib import Path

from pqsu.export.datasets import load_dataset
from pqsu.export.measure import count_macs, count_params
from pqsu.export.pipeline import PrepareConfig, finish_with_report, pretrain
from pqsu.export.training import evaluate

log = logging.getLogger(__name__)

# label -> PrepareConfig overrides (prune given per row, so one lever at a time is visible)
ROWS: dict[str, dict] = {
    "unpruned": dict(prune=None),
    "l1 uniform": dict(),
    "random uniform": dict(importance="random"),
    "taylor uniform": dict(importance="taylor"),
    "l1 global": dict(ranking="global"),
    "taylor global": dict(importance="taylor", ranking="global"),
    "l1 uniform +kd": dict(distill=0.7),
    "l1 uniform 3 steps": dict(prune_steps=3),
}

PLANS = {  # model -> proxy samples, pre-train epochs, fine-tune epochs (paper.py's alexnet round 0)
    "cnn": dict(proxy=2000, pretrain_epochs=1.0, finetune_epochs=1.0),
    "alexnet": dict(proxy=2000, pretrain_epochs=3.0, finetune_epochs=1.0),
}
QUICK = {"cnn": dict(proxy=300, pretrain_epochs=0.5, finetune_epochs=0.5)}


def run_model(model: str, plan: dict, ratios: tuple[float, ...], seeds: tuple[int, ...], rows: dict[str, dict],
              dataset: str = "fashion-mnist", eval_samples: int = 2000) -> dict:
    train_all = load_dataset(dataset, "train")
    test = load_dataset(dataset, "test").sample(eval_samples, seed=0)
    x_test = test.normalized()
    out: dict = {"plan": plan, "ratios": list(ratios), "seeds": list(seeds), "eval_samples": eval_samples, "rows": {}}
    for seed in seeds:
        proxy = train_all.sample(plan["proxy"], seed=seed)
        base = PrepareConfig(arch=model, prune=None, pretrain_epochs=plan["pretrain_epochs"],
                             finetune_epochs=plan["finetune_epochs"], seed=seed)
        pretrained = pretrain(base, proxy)
        in_shape = tuple(proxy.input_shape)
        for ratio in ratios:
            for label, extra in rows.items():
                if label == "unpruned" and ratio != ratios[0]:
                    continue
                key = label if label == "unpruned" else f"{label} @{ratio:.0%}"
                cfg = PrepareConfig(**{**base.__dict__, "prune": ratio, **extra})
                start = time.perf_counter()
                m, report = finish_with_report(copy.deepcopy(pretrained), cfg, proxy, plan["finetune_epochs"])
                acc = evaluate(m, x_test, test.y).accuracy
                row = out["rows"].setdefault(key, {"label": label, "ratio": None if extra.get("prune", 0) is None
                                                   else ratio, "accuracy": [], "params": count_params(m),
                                                   "macs": count_macs(m, in_shape), "seconds": []})
                row["accuracy"].append(acc)
                row["seconds"].append(time.perf_counter() - start)
                row["chosen_ratio"] = report.ratio
                log.info("recovery %s seed %d %s: %.2f%% (%d params, %.0fs)", model, seed, key, 100 * acc,
                         row["params"], row["seconds"][-1])
    out["measured_at"] = dt.datetime.now().isoformat(timespec="minutes")
    return summarize(out)


def summarize(out: dict) -> dict:
    """Means, spreads and gaps to the unpruned row (paired by seed) from the per-seed accuracies."""
    ref = out["rows"].get("unpruned", {}).get("accuracy")
    for row in out["rows"].values():
        row["mean"] = statistics.mean(row["accuracy"])
        row["stdev"] = statistics.stdev(row["accuracy"]) if len(row["accuracy"]) > 1 else 0.0
        # paired by seed: the same split and pre-trained model on both sides, so what differs is the lever
        gaps = [100 * (a - b) for a, b in zip(row["accuracy"], ref)] if ref else []
        row["delta_pt_vs_unpruned"] = statistics.mean(gaps) if gaps else None
        row["delta_pt_spread"] = statistics.stdev(gaps) if len(gaps) > 1 else 0.0
    return out


def run(quick: bool = False, seeds: int = 1, models: tuple[str, ...] | None = None,
        ratios: tuple[float, ...] = (0.5, 0.7), out: Path | None = None) -> dict:
    """Every model's table; each is kept in `out` as soon as it is measured and reused from there (with its
    summary statistics recomputed) by a later run (delete the file to measure again)."""
    plans = QUICK if quick else {m: p for m, p in PLANS.items() if models is None or m in models}
    rows = {k: ROWS[k] for k in ("unpruned", "l1 uniform", "l1 global")} if quick else ROWS
    tables = {}
    for name, plan in plans.items():
        saved = out / f"recovery-{name}{'-quick' if quick else ''}-{seeds}seeds.json" if out else None
        if saved and saved.exists():
            tables[name] = summarize(json.loads(saved.read_text()))
            continue
        tables[name] = run_model(name, plan, (0.5,) if quick else ratios, tuple(range(seeds)), rows,
                                 eval_samples=300 if quick else 2000)
        if saved:
            saved.write_text(json.dumps(tables[name], indent=2) + "\n")
    return tables


def to_markdown(results: dict) -> str:
    lines = ["## Round 0: pruning levers at the same fine-tune budget", "",
             "Each row starts from the same pre-trained model (per seed) and gets the same fine-tune epochs on the "
             "proxy split; accuracy is fp32 on held-out test samples, mean ± spread (sample stdev) over seeds; the gap "
             "to the unpruned row is paired by seed (same split, same pre-trained model). "
             "Generated by `pqsu bench recovery`.", ""]
    for model, r in results.items():
        if not isinstance(r, dict) or "rows" not in r:
            continue
        p = r["plan"]
        lines += [f"### {model}: {p['proxy']} proxy samples, pre-train {p['pretrain_epochs']:g} epochs, fine-tune "
                  f"{p['finetune_epochs']:g} epochs, {len(r['seeds'])} seed(s), {r['eval_samples']} test samples "
                  f"(measured {r.get('measured_at', '?')})", "",
                  "| row | params | MACs | accuracy | spread | vs unpruned (paired by seed) |", "|---|---|---|---|---|---|"]
        for key, row in r["rows"].items():
            delta = row["delta_pt_vs_unpruned"]
            gap = "" if delta is None else f"{delta:+.2f} ± {row.get('delta_pt_spread', 0.0):.2f} pt"
            lines.append(f"| {key} | {row['params']:,} | {row['macs']:,} | {row['mean']:.2%} | "
                         f"±{100 * row['stdev']:.2f} pt | {gap} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m pqsu.tools.bench.recovery MODEL [SEEDS]
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    res = run(models=(sys.argv[1],), seeds=int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    print(json.dumps(res, indent=2))
    print(to_markdown(res))
