"""Prune a model, export it to ONNX, quantize it to int8 and report what that bought.

The model is a zoo name (cnn, alexnet, vgg16, resnet18 for images; cnn1d for sensor
windows) or your own architecture as package.module:factory (a callable returning the
unpruned nn.Module; it is passed in_shape= and num_classes= if it takes them), optionally
with trained weights (--weights, a torch state_dict file). Without weights the model is
pre-trained briefly on the data set first. The input shape comes from the data.

Data: a built-in data set (--dataset: fashion-mnist, mnist, cifar10, and the sensor sets
italy-power, basic-motions) or your own labelled-array file (--data FILE.npz: arrays x,
samples batch first, uint8 pixels or float readings of any shape, and y, integer labels;
optional classes, per-channel mean and std, x_test and y_test).

examples:
  pqsu export --model cnn --prune 0.5 --out cnn.int8.onnx
  pqsu export --model vgg16 --weights vgg16.pt --prune 0.5 --calib-samples 512
  pqsu export --model cnn1d --dataset italy-power --pretrain-epochs 5 --out italy.int8.onnx
  pqsu export --model mypkg.nets:small_net --data train.npz --calib-data calib.npz --no-prune
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from pqsu.export.prune_spec import IMPORTANCE_NAMES, RANKINGS
from pqsu.protocol.errors import PqsuError


def _ratio(text: str) -> float | str:
    from pqsu.export.prune_spec import parse_prune

    try:
        ratio, _ = parse_prune(text)
    except PqsuError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text.strip() if ratio is None else ratio


def _choice(names: tuple[str, ...]):
    def parse(text: str) -> str:
        if text not in names:
            raise argparse.ArgumentTypeError(f"{text!r}: choose one of {', '.join(names)}")
        return text
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="cnn", help="zoo name or package.module:factory (default: cnn)")
    p.add_argument("--weights", help="trained state_dict (.pt) for --model; without it the model is pre-trained")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--dataset", help="fashion-mnist, mnist, cifar10, italy-power or basic-motions "
                      "(default: fashion-mnist)")
    data.add_argument("--data", metavar="FILE.npz", help="your own labelled-array file (x, y; see above): training "
                      "and, unless --eval-data is given, evaluation data")
    p.add_argument("--data-root", help="folder with the data set files (default: the data set's standard place)")
    p.add_argument("--eval-data", metavar="FILE.npz", help="labelled-array file whose x, y are the evaluation samples "
                   "(default: the data set's test split)")
    p.add_argument("--calib-data", metavar="FILE.npz", help="file with array x (the model's input shape) to calibrate "
                   "int8 on (default: samples of the training data)")
    prune = p.add_mutually_exclusive_group()
    prune.add_argument("--prune", type=_ratio, default=0.5, metavar="RATIO",
                       help="fraction of channels to remove from every prunable layer, or auto:PT for the largest "
                       "ratio whose fine-tuned accuracy on held-out training data stays within PT points of the "
                       "unpruned model (default: 0.5)")
    prune.add_argument("--no-prune", action="store_true", help="export without pruning")
    p.add_argument("--importance", type=_choice(IMPORTANCE_NAMES), default="l1",
                   help="which channels go: l1 (weight magnitude, the paper's), l2, taylor (gradient x weight on "
                   "the training data), bn-scale (BatchNorm scale; l1 where a layer has none) or random "
                   "(default: l1)")
    p.add_argument("--ranking", type=_choice(RANKINGS), default="uniform",
                   help="uniform: every layer loses the same fraction; global: least important channels "
                   "model-wide, at uniform's parameter count (default: uniform)")
    p.add_argument("--distill", type=float, default=0.0, metavar="W",
                   help="weight in [0, 1) of the unpruned model's soft targets in the fine-tune loss (default: 0)")
    p.add_argument("--prune-steps", type=int, default=1, metavar="K",
                   help="prune in K steps, the fine-tune epochs split between them (default: 1)")
    p.add_argument("--same-budget", action="store_true",
                   help="also fine-tune the unpruned model for --finetune-epochs and report its accuracy: the "
                   "reference that gives pruning's cost at the same training budget")
    p.add_argument("--round-to", type=int, help="keep pruned widths multiples of this (e.g. 8 for int8 kernels)")
    p.add_argument("--pretrain-epochs", type=float, help="epochs of pre-training (default: 1 without --weights, else 0)")
    p.add_argument("--finetune-epochs", type=float, default=0.5, help="epochs of fine-tuning after pruning (default: 0.5)")
    p.add_argument("--train-samples", type=int, help="train on a random subset of this size (default: all)")
    p.add_argument("--batch-size", type=int, default=64, help="mini-batch size of pre-training and fine-tuning "
                   "(default: 64)")
    p.add_argument("--lr", type=float, default=0.01, help="SGD learning rate of pre-training and fine-tuning "
                   "(default: 0.01)")
    p.add_argument("--calib-samples", type=int, default=256, help="training samples used to calibrate int8 (default: 256)")
    p.add_argument("--calib-method", default="minmax", choices=["minmax", "entropy", "percentile"],
                   help="how int8 activation ranges are chosen from the calibration samples (default: minmax)")
    p.add_argument("--eval-samples", type=int, help="test samples for the accuracy figures (default: the whole test split)")
    p.add_argument("--latency-repeats", type=int, default=30,
                   help="timed runs per latency figure; the median is reported (default: 30)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the sampled subsets, initialization and "
                   "training (default: 0)")
    p.add_argument("--out", default="runs/export/model.int8.onnx", help="int8 ONNX file to write (default: %(default)s)")
    p.add_argument("--fp32-out", help="also keep the pruned fp32 ONNX file here")
    p.add_argument("--report", help="JSON report path (default: report.json next to --out)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")


def run(args: argparse.Namespace) -> int:
    if ":" in args.model:  # the user's own architecture: found in the current folder too, as `pqsu simulate` finds it
        from pqsu.export.model_check import check_importable, find_module_in_cwd

        find_module_in_cwd(args.model)
        check_importable(args.model)  # one line for a name that is not there, or a module that raises on import
    from pqsu.export.report import ExportConfig, run_export  # torch is imported only when exporting

    for name in ("calib_samples", "latency_repeats", "batch_size"):
        if getattr(args, name) < 1:
            raise PqsuError(f"--{name.replace('_', '-')} must be at least 1")
    from pqsu.export.prune_spec import check

    check(None if args.no_prune else args.prune, args.importance, args.ranking, args.distill, args.prune_steps)
    out = Path(args.out)
    report_path = Path(args.report) if args.report else out.with_name("report.json")
    cfg = ExportConfig(model=args.model, weights=args.weights, dataset=args.data or args.dataset or "fashion-mnist",
                       data_root=args.data_root, eval_data=args.eval_data, calib_data=args.calib_data,
                       prune=None if args.no_prune else args.prune, round_to=args.round_to,
                       importance=args.importance, ranking=args.ranking, distill=args.distill,
                       prune_steps=args.prune_steps, same_budget=args.same_budget,
                       pretrain_epochs=args.pretrain_epochs, finetune_epochs=args.finetune_epochs,
                       train_samples=args.train_samples, batch_size=args.batch_size, lr=args.lr,
                       calib_samples=args.calib_samples, calib_method=args.calib_method,
                       eval_samples=args.eval_samples, latency_repeats=args.latency_repeats, seed=args.seed,
                       out=str(out), fp32_out=args.fp32_out, progress=not args.no_progress)
    report = run_export(cfg)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    print(format_report(report.to_dict()))
    print(f"\nint8 model: {out}  (model id {report.model_id})\nreport:     {report_path}")
    return 0


def format_report(r: dict) -> str:
    """The report as a plain-text table a person reads in the terminal."""
    lat = r["latency_ms"]
    rows = [
        ("", "unpruned fp32", f"pruned {r['prune_ratio']:.0%} fp32", f"pruned {r['prune_ratio']:.0%} int8"),
        ("parameters", f"{r['params_fp32']:,}", f"{r['params_pruned']:,}", f"{r['params_pruned']:,}"),
        ("MACs / sample", f"{r['macs_fp32']:,}", f"{r['macs_pruned']:,}", f"{r['macs_pruned']:,}"),
        ("ONNX bytes", f"{r['bytes_fp32_onnx']:,}", f"{r['bytes_pruned_fp32_onnx']:,}", f"{r['bytes_int8_onnx']:,}"),
        ("accuracy", f"{r['acc_unpruned_fp32']:.2%}", f"{r['acc_fp32']:.2%}", f"{r['acc_int8']:.2%}"),
        ("latency b1 ms", f"{lat['torch_fp32_unpruned_b1']:.2f} (torch)", f"{lat['ort_fp32_pruned_b1']:.2f} (ort)",
         f"{lat['ort_int8_pruned_b1']:.2f} (ort)"),
        ("latency b64 ms", f"{lat['torch_fp32_unpruned_b64']:.2f} (torch)", f"{lat['ort_fp32_pruned_b64']:.2f} (ort)",
         f"{lat['ort_int8_pruned_b64']:.2f} (ort)"),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [f"{r['model']} on {r['dataset']} ({r['eval_samples']} test samples)"]
    lines += ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
              for row in rows]
    ratios = r["ratios"]
    if r.get("acc_unpruned_same_budget") is not None:
        lines.append(f"unpruned fp32 after the same fine-tune epochs: {r['acc_unpruned_same_budget']:.2%} "
                     f"(pruned int8 {100 * (r['acc_int8'] - r['acc_unpruned_same_budget']):+.2f} pt at the same budget)")
    search = r.get("round0") or {}
    if search.get("tolerance_pt") is not None:
        probes = ", ".join(f"{p['ratio']:.0%}: {p['val_accuracy']:.2%}" for p in search["probes"])
        lines.append(f"{search['prune']}: chose {_pct(search['ratio'])} (unpruned {search['unpruned_val_accuracy']:.2%} "
                     f"on {search['val_samples']} held-out samples; probes {probes})")
    lines.append(f"size {ratios['size_fp32_over_int8']:.1f}x smaller, batch-1 {ratios['speedup_b1_int8_ort_vs_torch_fp32']:.1f}x "
                 f"faster than unpruned fp32 torch; int8/fp32 argmax agreement {r['argmax_agreement']:.2%}; "
                 f"bridge: all {r['bridge_parameters']} parameters rebuilt from the int8 file, worst error "
                 f"{r['bridge_worst_error_steps']:.3f} quantization steps")
    return "\n".join(lines)


def _pct(ratio: float | None) -> str:
    return "no pruning" if ratio is None else f"{ratio:.0%}"
