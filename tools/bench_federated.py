"""The federated experiment table: schemes side by side, same data, rounds and seed.

Rows: dense fp32 FedAvg; the FL-PQSU paper's scheme (prune + full int8 + loss-gated
uploads); ours (prune + int8 + top-k with error feedback + selective upload). Every
figure comes from `simulate`, i.e. from real encoded messages.
"""
from __future__ import annotations

import logging
import sys

from pqsu.cloud.config import FederatedConfig
from pqsu.tools.simulate import simulate

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
    return rows


def to_markdown(model: str, rows: dict) -> str:
    cfg = rows["fedavg"]["config"]
    lines = [f"### {model} on {cfg['dataset']}: {cfg['clients']} clients, {cfg['partition']}, {cfg['rounds']} rounds, "
             f"seed {cfg['seed']}", "",
             "| scheme | final acc | vs FedAvg | uplink bytes | uplink ratio | downlink bytes | downlink ratio | uploads/skipped |",
             "|---|---|---|---|---|---|---|---|"]
    for scheme, row in rows.items():
        s = row["summary"]
        up_ratio = row["uplink_ratio_vs_fedavg"]
        lines.append(f"| {scheme} | {s['final_accuracy']:.2%} | {row['accuracy_delta_pt_vs_fedavg']:+.2f} pt | "
                     f"{s['bytes_up_total']:,} | {up_ratio:.0f}x | {s['bytes_down_total']:,} | "
                     f"{row['downlink_ratio_vs_fedavg']:.1f}x | {s['uploads']}/{s['skipped']} |"
                     if up_ratio else f"| {scheme} | {s['final_accuracy']:.2%} | no uploads | | | | | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m pqsu.tools.bench_federated MODEL ROUNDS [key=value ...]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    opts = {}
    for kv in sys.argv[3:]:
        k, v = kv.split("=")
        opts[k] = int(v) if v.lstrip("-").isdigit() else float(v) if v.replace(".", "", 1).isdigit() else v
    print(to_markdown(sys.argv[1], run_table(sys.argv[1], rounds=int(sys.argv[2]), **opts)))
