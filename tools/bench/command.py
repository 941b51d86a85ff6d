"""Run measured benchmarks and print the ratios that fl-pqsu's targets are stated in.

Every figure is measured in this run on this machine; the JSON and markdown written
under runs/bench-<date>/ are generated from those measurements, never edited by hand.

suites:
  export     zoo models pruned and quantized: size, latency, accuracy fp32 vs int8, bridge error
  codec      update codec: bytes of a top-1% update vs dense fp32, encode/decode/aggregate speed, and
             coordinator memory with 100 / 1,000 / 10,000 devices' updates through FederatedServer.submit
  paper      the FL-PQSU paper's table (alexnet, vgg16; FedAvg, pruning, int8, the paper's scheme, ours) with
             simulated time to target accuracy over NB-IoT, LTE-M and Wi-Fi, and the Targets verdicts
  strategies ours with one lever changed at a time (FedAvgM / FedAdam / FedYogi, global ranking, a longer
             round-0 fine-tune) beside dense FedAvg on cnn and alexnet, over --seeds seeds
  recovery   round 0's pruning levers (importance, global ranking, distillation, iterative steps) at one
             fine-tune budget, over --seeds seeds
  federated  (earlier table) FedAvg vs the paper's scheme vs ours on Fashion-MNIST (cnn 20 rounds, alexnet)
  sensors    the same three schemes on a sensor time series: cnn1d on ItalyPowerDemand (smart-meter days)
  fleet      real MQTT rounds through Mosquitto: round latency and coordination overhead with 100 agents
  scale      updates/s/core before vs after the batch path, 1 vs 2 aggregator workers through Mosquitto, and a
             100,000-device round aggregated by workers (peak worker memory)

With --docs, this run's suites replace theirs in docs/results.json (the committed measurements, so
one suite can be remeasured without rerunning the others), and docs/results.md, the plots in
docs/img/ and README.md's generated results block (between its results markers) are rendered
from that file; the page names the default suites it holds no measurements of.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from pathlib import Path

from pqsu.protocol.errors import PqsuError
from pqsu.tools.bench import plots as bench_plots
from pqsu.tools.bench import report as bench_report
from pqsu.tools.lab import results as results_runner

log = logging.getLogger(__name__)
README_BEGIN, README_END = "<!-- results:begin -->", "<!-- results:end -->"
DOCS_RESULTS = Path("docs/results.json")
# the default suites; docs/results.md names those it has no measurements of
DOCS_SUITES = ("export", "codec", "paper", "fleet", "scale")
MODEL_PLANS = {"paper": ("alexnet", "vgg16"), "recovery": ("cnn", "alexnet"), "strategies": ("cnn", "alexnet")}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("suites", nargs="*", default=list(DOCS_SUITES),
                   help="suites to run (default: all)")
    p.add_argument("--quick", action="store_true", help="small smoke version (used by the tests)")
    p.add_argument("--out", help="output folder (default: runs/bench-<date>); suites run into the same folder "
                   "are merged into one results.json")
    p.add_argument("--docs", action="store_true", help="also lay this run's suites over docs/results.json and "
                   "regenerate docs/results.md, docs/img/ and README.md's results block from it")
    p.add_argument("--render", action="store_true", help="run nothing: re-render results.md (and --docs) from "
                   "the results.json in --out (with --docs and no results there: docs/results.json alone)")
    p.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="paper suite: run every table over N seeds and report the mean and spread (default: 1)")
    p.add_argument("--models", metavar="NAMES", help="paper, recovery and strategies suites: only these models, comma "
                   "separated (default: every model of the suite: paper alexnet,vgg16; recovery and strategies cnn,alexnet)")
    p.add_argument("--rows", metavar="LABELS", help="paper and strategies suites: only these rows (comma separated, "
                   "of tools/bench/paper.py ROWS or STRATEGY_ROWS; fedavg, and in the paper suite the paper's scheme, "
                   "always run as the references)")
    p.add_argument("--mnist", metavar="DIR", default=os.environ.get("PQSU_DATA_MNIST"),
                   help="paper suite: also run alexnet on MNIST from these IDX files (default: $PQSU_DATA_MNIST)")
    p.add_argument("--cifar10", metavar="DIR", default=os.environ.get("PQSU_DATA_CIFAR10"),
                   help="paper suite: run vgg16 on CIFAR-10 from this cifar-10-batches-py folder instead of "
                   "Fashion-MNIST (default: $PQSU_DATA_CIFAR10)")


def run(args: argparse.Namespace) -> int:
    suites = {"export": _export_suite, "codec": _codec_suite, "federated": _federated_suite, "fleet": _fleet_suite,
              "scale": _scale_suite,
              "sensors": _sensors_suite,
              "paper": lambda quick, out: _paper_suite(quick, out, args.mnist, args.cifar10, args.seeds, rows,
                                                        models),
              "recovery": lambda quick, out: _recovery_suite(quick, out, args.seeds, models),
              "strategies": lambda quick, out: _strategies_suite(quick, out, args.seeds, models, rows)}
    models = tuple(m.strip() for m in args.models.split(",")) if getattr(args, "models", None) else None
    rows = tuple(r.strip() for r in args.rows.split(",")) if getattr(args, "rows", None) else None
    _check_rows(rows, [n for n in args.suites if n in ("paper", "strategies")])
    for suite, known in MODEL_PLANS.items():
        unknown = [m for m in models or () if m not in known]
        if suite in args.suites and unknown:
            raise PqsuError(f"--models: {', '.join(unknown)} not in the {suite} plans ({', '.join(known)})")
    if args.seeds < 1:
        raise PqsuError("--seeds must be at least 1")
    names = results_runner.choose(args.suites, suites, "suite")
    out = results_runner.out_folder(args.out, "bench")
    merged = out / "results.json"
    results = results_runner.load(merged)
    out.mkdir(parents=True, exist_ok=True)
    results.update({"machine": results_runner.machine(), "quick": args.quick})
    results_runner.run_sections(merged, results, [] if args.render else names,
                                lambda name: suites[name](args.quick, out), what="suite")
    plots = bench_plots.all_plots(results, out)
    (out / "results.md").write_text(to_markdown(results, {p.name: p.name for p in plots}))
    if args.docs:
        documented = merge_into_docs(results, DOCS_RESULTS)
        write_docs(documented, bench_plots.all_plots(documented, out / "docs-img"))
    print(to_markdown(results))
    print(f"written: {out / 'results.json'}, {out / 'results.md'}")
    return 0


def _export_suite(quick: bool, out: Path) -> dict:
    from pqsu.export.report import ExportConfig, run_export
    from pqsu.tools.bench.export import bridge_errors

    # (model, samples to pre-train on, pre-train epochs, fine-tune epochs); CPU-sized "brief" training.
    # AlexNet (no BatchNorm) on 10k samples stayed at 66% with many near-tied logits, where int8 noise flipped
    # 1.4% of argmaxes; on 20k it reaches ~76% and agrees on 99.4%.
    plans = [("vgg16", 3000, 1.0, 0.3), ("cnn", 60000, 1.0, 0.5), ("alexnet", 20000, 1.0, 0.5)]
    if quick:
        plans = [("cnn", 2000, 1.0, 0.2)]
    reports = {}
    for model, samples, pre, ft in plans:
        cfg = ExportConfig(model=model, prune=0.5, pretrain_epochs=pre, finetune_epochs=ft, train_samples=samples,
                           eval_samples=1000 if quick else None, latency_repeats=5 if quick else 30,
                           out=str(out / f"{model}.int8.onnx"), progress=False)
        r = run_export(cfg).to_dict()
        r["train_samples"] = samples
        reports[model] = r
        log.info("%s: int8 acc %.4f fp32 acc %.4f unpruned %.4f", model, r["acc_int8"], r["acc_fp32"], r["acc_unpruned_fp32"])
    return {"reports": reports, "bridge_worst_error_steps": bridge_errors(["cnn"] if quick else None)}


def _codec_suite(quick: bool, out: Path) -> dict:
    from pqsu.tools.bench import codec as bench_codec

    from pqsu.tools.bench import aggregate as bench_aggregate

    result = bench_codec.run(quick=quick)
    result["scaling"] = bench_aggregate.run(quick=quick)
    return result


def _federated_suite(quick: bool, out: Path) -> dict:
    from pqsu.tools.bench.federated import run_table

    common = dict(clients=10, partition="dirichlet:0.5", seed=0, eval_samples=None)
    if quick:
        return {"cnn": run_table("cnn", rounds=2, clients=3, samples_per_client=200, proxy_samples=500,
                                 eval_samples=500)}
    # CPU-sized: every client trains on a fixed share so that unpruned fp32 FedAvg stays affordable.
    plans = {"cnn": dict(rounds=20, samples_per_client=1000),
             # unpruned fp32 AlexNet trains at ~60 samples/s here: a smaller share and fewer rounds keep it affordable
             # and without BatchNorm it needs a few proxy epochs before round 1 to leave chance level; after
             # pruning, half an epoch of fine-tuning left the pruned rows 7 points behind at round 0, 2 do not
             "alexnet": dict(rounds=8, samples_per_client=200, eval_samples=2000, pretrain_epochs=3.0,
                             finetune_epochs=2.0)}
    tables = {}
    for model, plan in plans.items():
        saved = out / f"federated-{model}.json"  # each table is kept as soon as it is measured
        if saved.exists():
            tables[model] = json.loads(saved.read_text())
            log.info("federated %s: reusing %s (delete it to measure again)", model, saved)
            continue
        tables[model] = run_table(model, **{**common, **plan})
        saved.write_text(json.dumps(tables[model], indent=2) + "\n")
    return tables


def _sensors_suite(quick: bool, out: Path) -> dict:
    """Not an image: 24 hourly smart-meter readings a day (822 training days), split over the devices."""
    from pqsu.tools.bench.federated import run_table

    # 822 days over 10 devices is ~70 each: a few local epochs in small batches, and the cloud keeps only 120
    # days for round 0 (pre-training 10 epochs takes the 1-D net off chance level).
    plan = dict(model="cnn1d", dataset="italy-power", clients=10, partition="iid", proxy_samples=120,
                pretrain_epochs=10.0, epochs=3.0, lr=0.05, batch_size=16, seed=0, eval_samples=None)
    if quick:
        plan.update(clients=3, pretrain_epochs=2.0, epochs=1.0)
    table = run_table(plan.pop("model"), rounds=2 if quick else 10, **plan)
    return {"cnn1d/italy-power": table}


def _paper_suite(quick: bool, out: Path, mnist: str | None, cifar10: str | None, seeds: int = 1,
                 rows: tuple[str, ...] | None = None, models: tuple[str, ...] | None = None) -> dict:
    from pqsu.tools.bench import paper as bench_paper

    return bench_paper.run(quick, mnist, cifar10, out=out, seeds=seeds, rows=rows, models=models)


def _check_rows(rows: tuple[str, ...] | None, suites: list[str]) -> None:
    """--rows names rows of every suite it applies to, before anything runs."""
    if not rows:
        return
    from pqsu.tools.bench.paper import ROWS, STRATEGY_ROWS

    if not suites:
        raise PqsuError("--rows applies to the paper and strategies suites only")
    for suite, known in (("paper", ROWS), ("strategies", STRATEGY_ROWS)):
        unknown = [r for r in rows if r not in known]
        if suite in suites and unknown:
            raise PqsuError(f"--rows: {', '.join(unknown)} not a {suite} row; choose among {', '.join(known)}")


def _strategies_suite(quick: bool, out: Path, seeds: int = 1, models: tuple[str, ...] | None = None,
                      rows: tuple[str, ...] | None = None) -> dict:
    from pqsu.tools.bench import paper as bench_paper

    return bench_paper.run_strategies(quick, models=models or ("cnn", "alexnet"), out=out, seeds=seeds, rows=rows)


def _recovery_suite(quick: bool, out: Path, seeds: int = 1, models: tuple[str, ...] | None = None) -> dict:
    from pqsu.tools.bench import recovery

    return recovery.run(quick, seeds=seeds, models=models, out=out)


def _fleet_suite(quick: bool, out: Path) -> dict:
    from pqsu.tools.bench.fleet import run_fleet

    if quick:
        return run_fleet(agents=2, rounds=1, model="cnn", prune=0.5)
    # Coordination overhead with 20 agents and a ~1 MB model (resnet18 pruned 70%, int8, 9 chunks of 128 KB);
    # then the fleet at 100 agents with a small model (cnn pruned 50%): there the figure is round latency.
    result = run_fleet(agents=20, rounds=3)
    result["scale"] = run_fleet(agents=100, rounds=2, model="cnn", prune=0.5, timeout_s=900.0)
    return result


def _scale_suite(quick: bool, out: Path) -> dict:
    from pqsu.tools.bench import scale as bench_scale

    return bench_scale.run(quick=quick, out=out)


def merge_into_docs(results: dict, docs_json: Path) -> dict:
    """docs_json's suites with the suites of `results` laid over them, saved back. A --quick run is a
    smoke test of the code, not a measurement, so it is refused before anything is written."""
    suites = {k: v for k, v in results.items() if k not in ("machine", "quick")}
    if results.get("quick") and suites:
        raise PqsuError("--docs: a --quick run is a smoke test; its figures do not go into docs/results.json")
    documented = results_runner.load(docs_json)
    documented.update(suites, machine=results["machine"], quick=False)
    docs_json.parent.mkdir(parents=True, exist_ok=True)
    results_runner.save(docs_json, documented)
    return documented


def write_docs(results: dict, plots: list[Path], docs: Path = Path("docs"), readme: Path = Path("README.md")) -> None:
    """docs/results.md, the plots in docs/img/ and README.md's generated block (only between its markers)."""
    img = docs / "img"
    img.mkdir(parents=True, exist_ok=True)
    for p in plots:
        shutil.copyfile(p, img / p.name)
    headline = next((p for p in plots if p.name.startswith("accuracy-vs-nbiot-")), None)
    block = bench_report.readme_block(results, f"docs/img/{headline.name}" if headline else None)
    results_runner.write_docs(docs / "results.md", to_markdown(results, {p.name: f"img/{p.name}" for p in plots}),
                              readme, block, (README_BEGIN, README_END))


def replace_block(text: str, block: str) -> str:
    """`text` with what lies between the results markers replaced by `block`."""
    return results_runner.replace_block(text, block, README_BEGIN, README_END)


def to_markdown(results: dict, images: dict[str, str] | None = None) -> str:
    """results.md; `images` maps plot file names to the links to use (none: no images)."""
    lines = ["# fl-pqsu benchmarks", "",
             f"Generated by `pqsu bench` from measurements on this machine ({results['machine']['cores']} cores, "
             f"Python {results['machine']['python']}); each suite says when it was measured. Do not edit by hand: "
             "rerun `pqsu bench SUITE --out DIR --docs`.", ""]
    images = images or {}

    missing = [name for name in DOCS_SUITES if name not in results]
    if missing:
        lines += [f"Not measured on this code yet: {', '.join(missing)} (`pqsu bench {' '.join(missing)} --docs`). "
                  "Pages generated from earlier code, with their figures and Targets verdicts, are kept in "
                  "[docs/archive/](archive/).", ""]

    def image(name: str, alt: str) -> list[str]:
        return [f"![{alt}]({images[name]})", ""] if name in images else []
    if "paper" in results:
        lines += [bench_report.targets_markdown(results)]
        lines += [bench_report.paper_markdown(results["paper"])]
        for name in results["paper"]["tables"]:
            slug = name.replace("/", "-")
            lines += image(f"accuracy-per-round-{slug}.png", f"accuracy per round from round 0, FedAvg as reference, {name}")
            lines += image(f"accuracy-vs-nbiot-{slug}.png", f"accuracy vs simulated NB-IoT time, {name}")
            lines += image(f"bytes-{slug}.png", f"bytes per client per round, {name}")
    if "strategies" in results:
        lines += [bench_report.paper_markdown(results["strategies"], "Inside ours: server strategies and round-0 "
                                              "levers, one at a time (pqsu bench strategies)")]
    if "recovery" in results:
        from pqsu.tools.bench.recovery import to_markdown as recovery_markdown

        lines += [recovery_markdown(results["recovery"])]
    if "export" in results:
        lines += ["## Export: pruned 50% + int8 ONNX vs unpruned fp32", "",
                  "| model | trained on | acc unpruned fp32 | acc pruned fp32 | acc pruned int8 | int8 vs fp32 | "
                  "argmax agree | ONNX size ratio | b1 speed-up vs torch fp32 | b64 speed-up |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in results["export"]["reports"].items():
            ratios = r["ratios"]
            lines.append(
                f"| {name} | {r['train_samples']} | {r['acc_unpruned_fp32']:.2%} | {r['acc_fp32']:.2%} | "
                f"{r['acc_int8']:.2%} | {100 * (r['acc_int8'] - r['acc_fp32']):+.2f} pt | {r['argmax_agreement']:.2%} | "
                f"{ratios['size_fp32_over_int8']:.1f}x | {ratios['speedup_b1_int8_ort_vs_torch_fp32']:.1f}x | "
                f"{ratios['speedup_b64_int8_ort_vs_torch_fp32']:.1f}x |")
        lines += ["", "Bridge (int8 ONNX -> torch) worst weight error, in quantization steps (bound 0.5):", ""]
        lines += [f"- {k}: {v:.4f}" for k, v in results["export"]["bridge_worst_error_steps"].items()]
        lines.append("")
    if "federated" in results:
        from pqsu.tools.bench.federated import to_markdown as table

        # alexnet is in the paper table now (every row, radio times); the 20-round cnn table adds a longer run
        tables = {m: rows for m, rows in results["federated"].items() if isinstance(rows, dict) and "fedavg" in rows
                  and not ("paper" in results and m == "alexnet")}
        if tables:
            lines += [f"## Federated: same data, rounds and seed for every row (measured "
                      f"{results['federated'].get('measured_at', '?')})", ""]
            lines += [table(model, rows) for model, rows in tables.items()]
    if "sensors" in results:
        from pqsu.tools.bench.federated import to_markdown as table

        lines += [f"## Sensor data: a 1-D net on smart-meter readings (measured "
                  f"{results['sensors'].get('measured_at', '?')})", ""]
        lines += [table(name, rows) for name, rows in results["sensors"].items()
                  if isinstance(rows, dict) and "fedavg" in rows]
    if "fleet" in results:
        f = results["fleet"]
        lines += [f"## Fleet over Mosquitto (loopback, measured {f.get('measured_at', '?')})", "",
                  "Agents are threads of one process, each a real `EdgeAgent` with its own MQTT connection; the "
                  "coordinator is a `pqsu cloud` process. Round latency is announcement to last answer; coordination "
                  "overhead is that minus the slowest device's own compute (from holding task and model to its "
                  "upload confirmed). On 2 cores the agents' training is serialized, so latency grows with the "
                  "fleet while the overhead should not.", "",
                  "| agents | model | model bytes | rounds | round latency median / max s | overhead median / max s "
                  "| uploads |", "|---|---|---|---|---|---|---|"]
        for run in (f, f.get("scale")):
            if not run:
                continue
            latency = (f"{run['round_latency_median_s']:.2f} / {run['round_latency_max_s']:.2f}"
                       if "round_latency_median_s" in run else "-")
            uploads = f"{sum(r['uploads'] for r in run['per_round'])}/{sum(r['selected'] for r in run['per_round'])}"
            lines.append(f"| {run['agents']} | {run['model']} pruned {run.get('prune') or 0:.0%} int8 | "
                         f"{run['model_bytes']:,} | {run['rounds']} | {latency} | {run['overhead_median_s']:.3f} / "
                         f"{run['overhead_max_s']:.3f} | {uploads} |")
        lines += ["", f"Target: coordination overhead below {f['target_s']} s per round with 20 agents and a ~1 MB model: "
                  + ("met" if f["overhead_median_s"] < f["target_s"] else "missed") + f" (median {f['overhead_median_s']:.3f} s).", ""]
    if "scale" in results:
        from pqsu.tools.bench.scale import to_markdown as scale_markdown

        lines += [scale_markdown(results["scale"])]
    if "codec" in results:
        codec = {k: v for k, v in results["codec"].items() if k != "scaling"}
        lines += [f"## Update codec (measured {codec.get('measured_at', '?')})", "", "```", json.dumps(codec, indent=2),
                  "```", ""]
        scaling = results["codec"].get("scaling")
        if scaling:
            lines += ["### Coordinator memory against fleet size", "",
                      f"One round, every device's top-{scaling['density']:.0%} int8 update of the {scaling['model']} "
                      f"model ({scaling['params']:,} params, {scaling['model_fp32_bytes']:,} B fp32) encoded and "
                      "passed through `FederatedServer.submit`; peak traced memory (tracemalloc) of the round:", "",
                      "| devices | peak bytes | x model fp32 | submits/s |", "|---|---|---|---|"]
            lines += [f"| {q['devices']:,} | {q['peak_bytes']:,} | {q['peak_vs_model']:.2f} | {q['submits_per_s']:,.0f} |"
                      for q in scaling["points"]]
            lines += ["", f"Growth {scaling['peak_growth']:.2f}x over the range; "
                      f"{scaling['bytes_per_extra_device']:,.0f} bytes per extra device (which devices were asked and "
                      "answered).", ""]
            lines += image("aggregator-memory.png", "coordinator memory against devices")
    return "\n".join(lines)
