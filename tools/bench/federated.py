"""The federated experiment table: schemes side by side, same data, rounds and seed.

Rows: dense fp32 FedAvg; the FL-PQSU paper's scheme (prune + full int8 + loss-gated
uploads); ours (prune + int8 + top-k with error feedback + selective upload). Every
figure comes from `simulate`, i.e. from real encoded messages.
"""
from __future__ import annotations

import logging
import sys

from pqsu.cloud.config import FederatedConfig
from pqsu.tools.fleet.simulate import simulate

log = logging.getLogger(__name__)
SCHEME_ORDER = ("fedavg", "paper", "ours")


def run_table(model: str, *, rounds: int, quick: bool = False, **overrides) -> dict:
    rows = {}
    for scheme in SCHEME_ORDER:
        cfg = FederatedConfig.for_scheme(scheme, model=model, rounds=rounds, **overrides)
        log.info("federated %s / %s: %d rounds, %d clients", model, scheme, cfg.rounds, cfg.clients)
        result = simulate(cfg, lambda r: log.info("  round %d acc %.4f up %d", r.round, r.accuracy, r.bytes_up))
        rows[scheme] = {"summary": result.summary, "accuracy_per_round": [r["accuracy"] for r in result.rounds],
                        "bytes_up_per_round": [r["bytes_up"] for r in result.rounds], "config": result.config}
    base = rows["fedavg"]["summary"]
    for row in rows.values():
        s = row["summary"]
        row["uplink_ratio_vs_fedavg"] = base["bytes_up_total"] / s["bytes_up_total"] if s["bytes_up_total"] else None
        row["downlink_ratio_vs_fedavg"] = base["bytes_down_total"] / s["bytes_down_total"]
        row["accuracy_delta_pt_vs_fedavg"] = 100 * (s["final_accuracy"] - base["final_accuracy"])
        # One round's accuracy swings on non-IID data: the mean of the last three is reported beside it.
        row["last3_accuracy"] = sum(row["accuracy_per_round"][-3:]) / len(row["accuracy_per_round"][-3:])
        row["last3_delta_pt_vs_fedavg"] = 100 * (row["last3_accuracy"] - sum(rows["fedavg"]["accuracy_per_round"][-3:])
                                                 / len(rows["fedavg"]["accuracy_per_round"][-3:]))
    return rows


def to_markdown(model: str, rows: dict) -> str:
    cfg = rows["fedavg"]["config"]
    ours = rows["ours"]["config"]
    lines = [f"### {model} on {cfg['dataset']}: {cfg['clients']} clients, {cfg['partition']}, {cfg['rounds']} rounds, "
             f"seed {cfg['seed']}", "",
             f"Local training for every row: {cfg['epochs']} epoch over {cfg['samples_per_client'] or 'all its'} samples per client, "
             f"batch {cfg['batch_size']}, lr {cfg['lr']}. fedavg: unpruned, fp32 both ways, plain FedAvg. paper: pruned "
             f"{rows['paper']['config']['prune']:.0%}, int8 model, full int8 upload only when the loss improved. ours: "
             f"pruned {ours['prune']:.0%}, int8 model, {ours['select']} int8 with error feedback, upload rule "
             f"{ours['upload']}, server momentum {ours['server_momentum']} (FedAvgM).", "",
             "| scheme | final acc | vs FedAvg | last-3 mean | vs FedAvg | uplink bytes | uplink ratio | downlink bytes | "
             "downlink ratio | uploads/skipped |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for scheme, row in rows.items():
        s = row["summary"]
        up_ratio = row["uplink_ratio_vs_fedavg"]
        lines.append(f"| {scheme} | {s['final_accuracy']:.2%} | {row['accuracy_delta_pt_vs_fedavg']:+.2f} pt | "
                     f"{row['last3_accuracy']:.2%} | {row['last3_delta_pt_vs_fedavg']:+.2f} pt | "
                     f"{s['bytes_up_total']:,} | {up_ratio:.0f}x | {s['bytes_down_total']:,} | "
                     f"{row['downlink_ratio_vs_fedavg']:.1f}x | {s['uploads']}/{s['skipped']} |"
                     if up_ratio else f"| {scheme} | {s['final_accuracy']:.2%} | no uploads | | | | | | | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m pqsu.tools.bench.federated MODEL ROUNDS [key=value ...]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    opts = {}
    for kv in sys.argv[3:]:
        k, v = kv.split("=")
        opts[k] = int(v) if v.lstrip("-").isdigit() else float(v) if v.replace(".", "", 1).isdigit() else v
    print(to_markdown(sys.argv[1], run_table(sys.argv[1], rounds=int(sys.argv[2]), **opts)))
