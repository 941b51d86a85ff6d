"""Markdown for the paper suite: the table, the radio table, the Targets verdicts, the README block.

Everything here formats measured figures from results.json; nothing is typed by hand. The
targets are the issue's (uplink, downlink, NB-IoT time to target, coordinator memory); each
verdict and gap is computed from the measurements.
"""
from __future__ import annotations

from dataclasses import dataclass

# The downlink target is per device per round after a device's first model (every device flashed with the
# round-0 model: the "flashed" view); the whole run with the first model over the radio is reported beside it.
UPLINK_X, ACC_PT, DOWNLINK_X, NBIOT_VS_FEDAVG_X, NBIOT_VS_PAPER_X = 150.0, 1.0, 150.0, 30.0, 3.0
PATCH_PT = 0.3             # patches against the same run with the whole model downloaded every round
MEMORY_FLAT_GROWTH = 1.5   # peak at the most devices / peak at the fewest, for "flat in the number of devices"
OUR_ROWS = ("ours", "ours@m0", "ours@70%", "ours@cap5%")
PATCHED_ROWS = ("ours", "ours@cap5%")  # judged against "ours@full", the same run with full downloads
ACC_PT_BY_ROW = {"ours@70%": 3.0}  # the accuracy allowance where it is not ACC_PT: 70% pruning may cost 3 points


@dataclass(frozen=True)
class Verdict:
    target: str
    where: str
    measured: str
    met: bool
    gap: str


def _x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:,.1f}x" if v < 100 else f"{v:,.0f}x"


def _speed(s: dict | None) -> str:
    if not s or s["value"] is None:
        return "not reached"
    return ("≥ " if s["bound"] == "at least" else "") + _x(s["value"])


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "not reached"
    return f"{seconds:,.1f} s" if seconds < 120 else f"{seconds / 60:,.1f} min" if seconds < 7200 else \
        f"{seconds / 3600:,.1f} h"


def _ratio_verdict(target: str, where: str, value: float | None, need: float, bound: str = "exact",
                   beside: str = "") -> Verdict:
    """`beside`: the same figure in another view, shown after the measured one (not judged)."""
    beside = f" ({beside})" if beside else ""
    if value is None:
        return Verdict(target, where, "not reached" + beside, False, "target accuracy not reached")
    prefix = "≥ " if bound == "at least" else ""
    met = value >= need
    gap = f"+{value / need - 1:.0%} margin" if met else f"{value:.1f}x of {need:g}x: short by {need / value:.2f}x"
    if bound == "at least" and not met:
        gap += " (a lower bound: the reference never reached the target)"
    return Verdict(target, where, prefix + _x(value) + beside, met, gap)


def verdicts(results: dict) -> list[Verdict]:
    out = []
    for name, table in results.get("paper", {}).get("tables", {}).items():
        for label in OUR_ROWS:
            row = table["rows"].get(label)
            if row is None:
                continue
            where = f"{name} {label}"
            up, delta = row["uplink_ratio_vs_fedavg"], row["last3_delta_pt_vs_fedavg"]
            allow = ACC_PT_BY_ROW.get(label, ACC_PT)
            ok = up is not None and up >= UPLINK_X and delta >= -allow
            gaps = []
            if up is None or up < UPLINK_X:
                gaps.append(f"uplink short by {UPLINK_X / up:.2f}x" if up else "no uploads")
            if delta < -allow:
                gaps.append(f"accuracy {-allow - delta:.2f} pt beyond the {allow:g} pt allowance")
            out.append(Verdict(f"uplink ≥ {UPLINK_X:g}x below FedAvg at ≤ {allow:g} pt accuracy (last-3 mean)", where,
                               f"{_x(up)}, {delta:+.2f} pt", ok,
                               "; ".join(gaps) or f"+{up / UPLINK_X - 1:.0%} margin, {delta + allow:.2f} pt to spare"))
            out.append(_ratio_verdict(
                f"downlink per device per round after its first model (flashed) ≥ {DOWNLINK_X:g}x below FedAvg", where,
                row.get("downlink_flashed_ratio_vs_fedavg", row["downlink_ratio_vs_fedavg"]), DOWNLINK_X,
                beside=f"whole run, first model over the radio: {_x(row['downlink_ratio_vs_fedavg'])}"))
            for ref, need in (("fedavg", NBIOT_VS_FEDAVG_X), ("paper", NBIOT_VS_PAPER_X)):
                s = row["radio"].get("nbiot-up", {}).get(f"speedup_vs_{ref}")
                out.append(_ratio_verdict(f"NB-IoT uplink only: time to target ≥ {need:g}x faster than {ref}", where,
                                          s["value"] if s else None, need, s["bound"] if s else "exact"))
            for ref, need in (("fedavg", NBIOT_VS_FEDAVG_X), ("paper", NBIOT_VS_PAPER_X)):
                s = row.get("radio_flashed", row["radio"]).get("nbiot", {}).get(f"speedup_vs_{ref}")
                over_radio = row["radio"].get("nbiot", {}).get(f"speedup_vs_{ref}")
                out.append(_ratio_verdict(f"NB-IoT up+down, every download after the flashed model: time to target "
                                          f"≥ {need:g}x faster than {ref}", where, s["value"] if s else None, need,
                                          s["bound"] if s else "exact",
                                          beside=f"first model over the radio: {_speed(over_radio)}"))
        full = table["rows"].get("ours@full")
        for label in PATCHED_ROWS:
            patched = table["rows"].get(label)
            if not (patched and full):
                continue
            delta = 100 * (patched["last3_accuracy"] - full["last3_accuracy"])
            out.append(Verdict(f"model patches within {PATCH_PT:g} pt of the same run with full downloads (last-3 mean)",
                               f"{name} {label} vs ours@full", f"{delta:+.2f} pt", delta >= -PATCH_PT,
                               f"{PATCH_PT + delta:.2f} pt to spare" if delta >= -PATCH_PT
                               else f"{-PATCH_PT - delta:.2f} pt beyond the {PATCH_PT:g} pt allowance"))
    scaling = results.get("codec", {}).get("scaling")
    if scaling:
        first, last = scaling["points"][0], scaling["points"][-1]
        g = scaling["peak_growth"]
        out.append(Verdict(f"coordinator memory flat in devices (peak growth ≤ {MEMORY_FLAT_GROWTH:g}x)",
                           f"{first['devices']:,} -> {last['devices']:,} devices",
                           f"{g:.2f}x ({first['peak_vs_model']:.2f} -> {last['peak_vs_model']:.2f} x model)",
                           g <= MEMORY_FLAT_GROWTH,
                           f"{scaling['bytes_per_extra_device']:,.0f} B per extra device (round bookkeeping)"))
    return out


def targets_markdown(results: dict) -> str:
    rows = verdicts(results)
    if not rows:
        return ""
    lines = ["## Targets", "", "Each verdict and gap is computed by tools/bench/report.py from the measurements below; \"ours\" is the "
             "preset, \"ours@m0\" the preset without server momentum, \"ours@70%\" the preset with 70% of channels "
             "pruned, \"ours@full\" the preset with the whole model downloaded every round (no patches), \"ours@cap5%\" "
             "the preset with patches capped at 5% of the int8 file and weight scales widened 2x at a keyframe. The brief states the time target over a 60 kbit/s uplink: \"NB-IoT uplink only\" charges the "
             "uplink alone, \"NB-IoT up+down\" also every download at 26.2 kbit/s. Boards are flashed over a cable or "
             "an SD card (`pqsu flash --model-file`), so the downlink targets count every download after the flashed "
             "round-0 model, for every scheme alike; the view with the first model over the radio is in brackets "
             "beside each.", "",
             "| target | where | measured | verdict | gap |", "|---|---|---|---|---|"]
    lines += [f"| {v.target} | {v.where} | {v.measured} | {'met' if v.met else '**missed**'} | {v.gap} |" for v in rows]
    return "\n".join(lines) + "\n"


def _pt(delta: float | None) -> str:
    return "-" if delta is None else f"{delta:+.2f} pt"


def _describe(row: dict) -> str:
    parts = [_pruned(row), f"{row['precision']} model"]
    if row.get("finetune_epochs") is not None:
        parts.append(f"round-0 fine-tune {row['finetune_epochs']:g} epochs")
    if row["scheme"] == "paper":
        parts.append("dense int8 upload when the loss improved")
    elif row["select"].startswith("topk"):
        opt = row.get("server_opt", "fedavgm")
        server = f"FedAvgM {row['server_momentum']}" if opt == "fedavgm" else f"{opt} lr {row.get('server_lr')}"
        prox = f", FedProx mu {row['local_prox']:g}" if row.get("local_prox") else ""
        parts.append(f"{row['select']} int8 + error feedback, {row['upload']}, {server}{prox}")
    else:
        parts.append(f"dense {row['select'] if row['select'] != 'dense' else 'int8'} upload every round")
    if row.get("downlink") == "full":
        parts.append("whole model downloaded every round")
    elif row.get("downlink"):
        cap = row.get("patch_cap")
        parts.append("exact model patches" if cap is None else
                     f"model patches capped at {cap:.0%} of the file" if isinstance(cap, float) else
                     f"model patches capped at {cap:,} B")
        if row.get("keyframe_headroom") not in (None, 1.5):
            parts.append(f"keyframe headroom {row['keyframe_headroom']:g}")
    return ", ".join(parts)


def _pruned(row: dict) -> str:
    if not row["prune"]:
        return "unpruned"
    levers = [x for x in (row.get("importance", "l1") != "l1" and row.get("importance"),
                          row.get("ranking", "uniform") != "uniform" and f"{row.get('ranking')} ranking",
                          row.get("distill") and f"distill {row['distill']}",
                          row.get("prune_steps", 1) > 1 and f"{row['prune_steps']} steps") if x]
    ratio = row.get("prune_chosen") if isinstance(row["prune"], str) else row["prune"]
    what = f"pruned {ratio:.0%}" if ratio else "unpruned"
    if isinstance(row["prune"], str):
        what += f" ({row['prune']})"
    return what + (f" ({', '.join(levers)})" if levers else "")


def paper_markdown(paper: dict, heading: str = "The paper's table (pqsu bench paper)") -> str:
    lines = [f"## {heading}", "",
             "Rows add one technique at a time; every row of a table has the same devices, data split, rounds, seed "
             "and round-0 pre-training. Uplink/downlink: bytes per selected client per round, as really encoded "
             "(skipped uploads count 0). Edge round: median wall time of one device's `run_round` on this machine "
             "(bridge + training + encoding). Inference: batch 1, onnxruntime on the shipped ONNX vs the unpruned "
             "model in eager torch fp32. Rounds to target: first round at or above the target "
             f"({paper['target_fraction']:.0%} of dense FedAvg's mean accuracy over its last three rounds). Accuracy is on a "
             "fixed test sample.", ""]
    for name, t in paper["tables"].items():
        c = t["config"]
        seeds = f"seeds {', '.join(map(str, t['seeds']))}" if t.get("seeds") else f"seed {c['seed']}"
        lines += [f"### {name}: {c['clients']} clients, {c['partition']}, {c['rounds']} rounds, "
                  f"{c['samples_per_client']} samples per client, {seeds}", "",
                  f"Round 0: {c['pretrain_epochs']} epochs on {c['proxy_samples']} proxy samples, then pruning and "
                  f"{c['finetune_epochs']} epochs of fine-tuning. Local training: {c['epochs']} epoch, batch "
                  f"{c['batch_size']}, lr {c['lr']}. Test sample: {c['eval_samples']}. Target accuracy "
                  f"{t['target_accuracy']:.2%}. Eager torch fp32 unpruned, batch 1: "
                  f"{t['torch_fp32_unpruned_b1_ms']:.2f} ms. Measured {t.get('measured_at', '?')}; the rows' runs "
                  f"took {sum(r['wall_seconds'] for r in t['rows'].values()) / 60:.0f} min of wall time." +
                  "".join(f" Row {k} added {r['measured_at']}, on the same seed and pre-training." for k, r in
                          t["rows"].items() if r.get("measured_at")), ""]
        if t.get("seeds"):  # before the header: a line between header and rows would end the table
            lines += [f"Over seeds {', '.join(map(str, t['seeds']))}: accuracies are means over the seeds, ± the "
                      "sample stdev of the row's last-3 mean, and of its gap to FedAvg on the same seed; bytes and "
                      "times are the first seed's.", ""]
        lines += ["| row | what | final acc | last-3 mean | vs FedAvg | vs prune50+int8 | rounds to target | uplink B | "
                  "uplink ratio | downlink B | downlink ratio | edge round s | inference ms (ORT) | vs torch fp32 | "
                  "model bytes |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for label, r in t["rows"].items():
            spread = f" ± {100 * r['last3_accuracy_spread']:.2f}" if "last3_accuracy_spread" in r else ""
            gap_spread = f" ± {r['last3_delta_pt_spread']:.2f}" if "last3_delta_pt_spread" in r else ""
            lines.append(
                f"| {label} | {_describe(r)} | {r['final_accuracy']:.2%} | {r['last3_accuracy']:.2%}{spread} | "
                f"{r['last3_delta_pt_vs_fedavg']:+.2f}{gap_spread} pt | "
                f"{_pt(r.get('last3_delta_pt_vs_dense_int8'))} | {r['rounds_to_target'] or 'not reached'} | "
                f"{r['up_bytes_per_client_round']:,.0f} | {_x(r['uplink_ratio_vs_fedavg'])} | "
                f"{r['down_bytes_per_client_round']:,.0f} | {_x(r['downlink_ratio_vs_fedavg'])} | "
                f"{r['edge_round_s_median']:.2f} | {r['inference_b1_ms']:.2f} | "
                f"{t['torch_fp32_unpruned_b1_ms'] / r['inference_b1_ms']:.1f}x | {r['model_bytes']:,} |")
        lines += ["", downlink_markdown(t), "", radio_markdown(t, paper["profiles"]), ""]
    return "\n".join(lines)


def _downloads(row: dict) -> str:
    d = row.get("downloads")
    return "-" if not d else f"{d['patch']:,} / {d['full']:,}"


def downlink_markdown(table: dict) -> str:
    """Both views of the downlink, for every row alike: every device flashed with the round-0 model, and
    the first model over the radio (tools/bench/radio.py VIEWS), with NB-IoT time to target in each."""
    lines = ["The downlink in both views, every row alike. Flashed: every device was flashed with the round-0 model "
             "(`pqsu flash --model-file`), so what counts is every download after it. First model over the radio: "
             "what the devices really downloaded. Bytes per selected device per round; ratios against dense fp32 "
             "FedAvg in the same view; NB-IoT up+down time to target as in the radio table below. Downloads: "
             "patches / full files, as the devices took them.", "",
             "| row | downlink B, flashed | ratio | downlink B, first over radio | ratio | downloads patch / full | "
             "NB-IoT time, flashed | vs FedAvg | vs paper | NB-IoT time, first over radio | vs FedAvg | vs paper |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in table["rows"].items():
        flashed, over_radio = r.get("radio_flashed", r["radio"])["nbiot"], r["radio"]["nbiot"]
        lines.append(
            f"| {label} | {r.get('down_flashed_bytes_per_client_round', r['down_bytes_per_client_round']):,.0f} | "
            f"{_x(r.get('downlink_flashed_ratio_vs_fedavg', r['downlink_ratio_vs_fedavg']))} | "
            f"{r['down_bytes_per_client_round']:,.0f} | {_x(r['downlink_ratio_vs_fedavg'])} | {_downloads(r)} | "
            f"{_duration(flashed['time_to_target_s'])} | {_speed(flashed['speedup_vs_fedavg'])} | "
            f"{_speed(flashed['speedup_vs_paper'])} | {_duration(over_radio['time_to_target_s'])} | "
            f"{_speed(over_radio['speedup_vs_fedavg'])} | {_speed(over_radio['speedup_vs_paper'])} |")
    return "\n".join(lines)


def radio_markdown(table: dict, profiles: dict) -> str:
    names = list(profiles)
    head = " | ".join(f"{profiles[k]['name']} time | vs FedAvg | vs paper" for k in names)
    lines = [f"Simulated time to target (tools/bench/radio.py: synchronous rounds, slowest device's compute + model down + "
             f"update up at its own rate; " + "; ".join(
                 (f"{p['name']} {p['up_bps'] / 1e3:g}/{p['down_bps'] / 1e3:g} kbit/s up/down"
              if p.get("charges_download", True) else f"{p['name']} {p['up_bps'] / 1e3:g} kbit/s, download not charged")
             for p in profiles.values())
             + "; seeded log-normal per-device rate and compute factors). \"≥\": the reference never reached the target "
             "in its rounds, so its whole run is a lower bound on its time.", "",
             f"| row | {head} |", "|---|" + "---|" * (3 * len(names))]
    for label, r in table["rows"].items():
        cells = []
        for k in names:
            x = r["radio"][k]
            cells += [_duration(x["time_to_target_s"]), _speed(x["speedup_vs_fedavg"]), _speed(x["speedup_vs_paper"])]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def readme_block(results: dict, plot: str | None) -> str:
    """The README's generated results paragraph (between the results markers)."""
    paper = results.get("paper")
    if not paper or not paper.get("tables"):
        return ("The paper bench has not been run on this code yet: `pqsu bench paper --docs` generates the headline "
                "figures here. Pages from earlier code, with their headline and Targets verdicts, are in "
                "[docs/archive/](docs/archive/).\n")
    name, t = next(iter(paper["tables"].items()))
    ours, rows = t["rows"]["ours"], t["rows"]
    nb = ours["radio"]["nbiot"]
    lines = []
    if plot:
        lines += [f"![accuracy against simulated NB-IoT time, {name}]({plot})", ""]
    up = ours["radio"].get("nbiot-up", nb)
    fl = ours.get("radio_flashed", ours["radio"])["nbiot"]
    lines += [f"Headline ({name}, {t['config']['clients']} clients, {t['config']['rounds']} rounds, measured "
              f"{t.get('measured_at', '?')[:10]}): `ours` uploads {_x(ours['uplink_ratio_vs_fedavg'])} fewer bytes "
              f"than dense fp32 FedAvg and, on boards flashed with the round-0 model, downloads "
              f"{_x(ours.get('downlink_flashed_ratio_vs_fedavg', ours['downlink_ratio_vs_fedavg']))} fewer "
              f"({_x(ours['downlink_ratio_vs_fedavg'])} with the first model over the radio), at "
              f"{ours['last3_delta_pt_vs_fedavg']:+.2f} pt accuracy (last-3 mean; "
              f"{_pt(ours.get('last3_delta_pt_vs_dense_int8'))} against the same pruned int8 model with dense "
              f"uploads). Time to the target accuracy ({t['target_accuracy']:.1%}) over NB-IoT's uplink: "
              f"{_speed(up['speedup_vs_fedavg'])} faster than FedAvg, {_speed(up['speedup_vs_paper'])} faster than the "
              f"paper's scheme; counting every download after the flashed model: {_speed(fl['speedup_vs_fedavg'])} and "
              f"{_speed(fl['speedup_vs_paper'])}; with the first model over the radio too: "
              f"{_speed(nb['speedup_vs_fedavg'])} and {_speed(nb['speedup_vs_paper'])} (paper: "
              f"{rows['paper']['last3_accuracy']:.1%} last-3 mean, uplink "
              f"{_x(rows['paper']['uplink_ratio_vs_fedavg'])}).", ""]
    met = verdicts(results)
    if met:
        lines.append(f"Targets met: {sum(v.met for v in met)} of {len(met)}; every verdict with its gap is in "
                     "[docs/results.md](docs/results.md#targets).")
    return "\n".join(lines) + "\n"
