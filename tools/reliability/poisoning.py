"""Poisoning, measured: one enrolled device of ten sends scaled or sign-flipped updates.

Every cell of the table is one `simulate` run of our default scheme on Fashion-MNIST (the
real server, real learners, real encoded messages), with the same data, seed and rounds;
only the attack (applied to the attacker's payloads through the simulator's tamper hook)
and the defence (the server's aggregator and norm clip) change. The attacker trains like
the others and then multiplies its update before sending it, so it keeps its own error
feedback honest and its uploads stay well-formed: nothing about it can be rejected.
`pqsu reliability` calls `measure` and `markdown` for the "Poisoning" section of
docs/reliability.md.
"""
from __future__ import annotations

import dataclasses
import logging
import time

from pqsu.cloud.config import FederatedConfig
from pqsu.tools.reliability.attacks import tamper_hook
from pqsu.tools.fleet.simulate import device_ids, simulate

log = logging.getLogger(__name__)

TARGET_PT = 2.0  # the target: robust final accuracy within 2 points of the clean run
ATTACKS = ("none", "scale:10", "scale:-10", "flip")
DEFENCES = {
    "none": dict(aggregator="fedavg", clip_norm=None),
    "clip+median": dict(aggregator="median", clip_norm="median"),
    "clip+trimmed": dict(aggregator="trimmed:0.1", clip_norm="median"),
}
# Quick mode (the test suite's smoke run): the clean reference, the attack undefended and defended.
QUICK_CELLS = (("none", "none"), ("scale:-10", "none"), ("scale:-10", "clip+median"))


def base_config(quick: bool) -> FederatedConfig:
    """Our default scheme ("ours") on the cnn, sized to a few minutes (or seconds when quick)."""
    if quick:
        return FederatedConfig.for_scheme("ours", clients=4, rounds=1, samples_per_client=100, proxy_samples=300,
                                          pretrain_epochs=0.5, finetune_epochs=0.2, eval_samples=300)
    return FederatedConfig.for_scheme("ours", clients=10, rounds=15, samples_per_client=500, proxy_samples=2000,
                                      eval_samples=None)


def measure(quick: bool) -> dict:
    """Run every (attack, defence) cell; accuracies, deltas against the clean undefended run."""
    start = time.perf_counter()
    base = base_config(quick)
    attacker = device_ids(base.clients)[0]
    grid = QUICK_CELLS if quick else tuple((a, d) for a in ATTACKS for d in DEFENCES)
    cells = [_run_cell(base, attack, defence, attacker) for attack, defence in grid]
    clean = next(c for c in cells if c["attack"] == "none" and c["defence"] == "none")
    for c in cells:
        c["delta_pt_vs_clean"] = 100 * (c["final_accuracy"] - clean["final_accuracy"])
        c["last3_delta_pt_vs_clean"] = 100 * (c["last3_accuracy"] - clean["last3_accuracy"])
        c["lowest_delta_pt_vs_clean"] = 100 * (c["lowest_accuracy"] - clean["lowest_accuracy"])
    attacks, defences = dict.fromkeys(a for a, _ in grid), dict.fromkeys(d for _, d in grid)
    return {"quick": quick, "config": base.to_dict(), "attacker": attacker, "attackers": 1, "clients": base.clients,
            "attacks": list(attacks), "defences": {d: DEFENCES[d] for d in defences}, "target_pt": TARGET_PT,
            "clean_final_accuracy": clean["final_accuracy"], "clean_last3_accuracy": clean["last3_accuracy"],
            "cells": cells, "seconds": round(time.perf_counter() - start, 1)}


def _run_cell(base: FederatedConfig, attack: str, defence: str, attacker: str) -> dict:
    cfg = dataclasses.replace(base, **DEFENCES[defence])
    poison = None if attack == "none" else tamper_hook(attack, {attacker})
    poisoned = 0

    def hook(device_id: str, payload: bytes) -> bytes:
        nonlocal poisoned
        if poison is None or device_id != attacker:
            return payload
        poisoned += 1  # counted so a report shows the attack reached the server, not just that it was set up
        return poison(device_id, payload)
    log.info("poisoning: attack %s, defence %s (%s, clip %s)", attack, defence, cfg.aggregator, cfg.clip_norm)
    start = time.perf_counter()
    result = simulate(cfg, lambda r: log.info("  round %d acc %.4f", r.round, r.accuracy), tamper=hook)
    accuracy = [r["accuracy"] for r in result.rounds]
    return {"attack": attack, "defence": defence, "aggregator": cfg.aggregator, "clip_norm": cfg.clip_norm,
            "final_accuracy": accuracy[-1], "last3_accuracy": sum(accuracy[-3:]) / len(accuracy[-3:]),
            "lowest_accuracy": min(accuracy),
            "accuracy_per_round": accuracy, "initial_accuracy": result.summary["initial_accuracy"],
            "uploads": result.summary["uploads"], "poisoned_uploads": poisoned,
            "rejected": result.summary["rejected"], "final_model_id": result.rounds[-1]["model_id"],
            "seconds": round(time.perf_counter() - start, 1)}


def markdown(result: dict) -> list[str]:
    """The "## Poisoning" section: attack x defence -> final accuracy and delta vs clean, the config used."""
    cfg, cells = result["config"], result["cells"]
    lines = ["## Poisoning", ""]
    if result["quick"]:
        lines += ["*Quick mode: a smoke-sized run, not a measurement.*", ""]
    lines += [
        f"{result['attackers']} device of {result['clients']} ({result['attacker']}) is enrolled and signs its own "
        "updates; it trains like the others, then multiplies its update before sending it: `scale:F` by F, `flip` "
        "by -1, re-encoded with the real codec. Its uploads are well-formed, so the server accepts them; only the "
        "aggregation can limit them. Each cell is one run with the same data, seed and rounds; in brackets the "
        "change against the clean run without defence.", "",
        f"Config: {cfg['model']} on {cfg['dataset']}, {cfg['clients']} clients, {cfg['partition']}, {cfg['rounds']} "
        f"rounds, {cfg['samples_per_client']} samples per client, seed {cfg['seed']}; our scheme: pruned "
        f"{cfg['prune']:.0%}, {cfg['precision']} model, {cfg['select']} {cfg['precision']} updates with error "
        f"feedback, upload rule {cfg['upload']}, server momentum {cfg['server_momentum']}, local lr {cfg['lr']}, "
        f"{cfg['epochs']} epoch. Defences: " + "; ".join(
            f"{d}: aggregator {s['aggregator']}, clip norm {s['clip_norm'] or 'none'}"
            for d, s in result["defences"].items()) + ".", "",
        "Final accuracy on the test split:", "",
        *_table(result, "final_accuracy", "delta_pt_vs_clean"), "",
        "Mean of the last three rounds (one round's accuracy swings on non-IID data):", "",
        *_table(result, "last3_accuracy", "last3_delta_pt_vs_clean"), "",
        "Lowest accuracy in any round (damage the final round can hide):", "",
        *_table(result, "lowest_accuracy", "lowest_delta_pt_vs_clean"), "",
        *_verdict(result), "",
        *_how_it_works(cfg), "",
        (f"Quick run: {result['seconds']:.0f} s" if result["quick"] else f"Measured in {result['seconds']:.0f} s")
        + f" ({len(cells)} runs)."]
    return lines


def _table(result: dict, key: str, delta: str) -> list[str]:
    by = {(c["attack"], c["defence"]): c for c in result["cells"]}
    defences = list(result["defences"])
    lines = ["| attack | " + " | ".join(defences) + " |", "|---|" + "---|" * len(defences)]
    for attack in result["attacks"]:
        row = [f"{c[key]:.2%} ({c[delta]:+.2f} pt)" if (c := by.get((attack, d))) else "-" for d in defences]
        lines.append(f"| {attack} | " + " | ".join(row) + " |")
    return lines


def _how_it_works(cfg: dict) -> list[str]:
    return [
        f"How the defences meet sparse updates: a device sends only its largest entries ({cfg['select']} per "
        "tensor), and devices mostly send different ones, so most entries of a round have a single sender and "
        "nothing to take a median against. The median and trimmed mean are therefore taken over the devices that "
        "sent each entry (an entry not sent is no vote, not a vote for 0) and weighted by the fraction that sent "
        "it, as FedAvg does; counting unsent entries as zeros drove the median of a round to almost 0. Where "
        "several devices sent an entry, an outlier among them is outvoted. What bounds a scaled update is the "
        "clip: each update's norm is capped at the median norm of its round's updates, a bound the honest "
        "majority sets and that shrinks with them as training converges, so a scaled-up update counts like a "
        "typical one. A sign flip keeps a typical norm: on the entries only the attacker sent, nothing can tell it "
        f"from an honest update, and it weighs as one device of {cfg['clients']}. Server momentum "
        f"({cfg['server_momentum']}) carries any such leak into the next rounds as it carries honest progress "
        f"(at most 1/(1-{cfg['server_momentum']}) times its one-round size)."]


def _verdict(result: dict) -> list[str]:
    """Which robust cells met the target and how much damage the undefended server took, from the figures."""
    target, out = result["target_pt"], []
    attacked = [c for c in result["cells"] if c["attack"] != "none"]
    robust = [c for c in attacked if c["defence"] != "none"]
    if robust:
        missed = [c for c in robust if c["delta_pt_vs_clean"] < -target]
        worst = min(robust, key=lambda c: c["delta_pt_vs_clean"])
        out.append(f"Target (robust final accuracy within {target:g} points of clean): "
                   + ("met in every attacked cell" if not missed else
                      "missed in " + ", ".join(f"{c['attack']} / {c['defence']} ({c['delta_pt_vs_clean']:+.2f} pt)"
                                               for c in missed))
                   + f"; worst robust cell {worst['attack']} / {worst['defence']} "
                     f"({worst['delta_pt_vs_clean']:+.2f} pt).")
    undefended = [c for c in attacked if c["defence"] == "none"]
    if undefended:
        out.append("Without defence: " + "; ".join(
            f"{c['attack']} ends at {c['final_accuracy']:.2%} ({c['delta_pt_vs_clean']:+.2f} pt), lowest round "
            f"{c['lowest_accuracy']:.2%} ({c['lowest_delta_pt_vs_clean']:+.2f} pt)" for c in undefended) + ".")
    unattacked = [c for c in result["cells"] if c["attack"] == "none" and c["defence"] != "none"]
    if unattacked:
        out.append("With no attacker the defences themselves cost: " + "; ".join(
            f"{c['defence']} {c['delta_pt_vs_clean']:+.2f} pt" for c in unattacked) + ".")
    return out
