"""The downlink's two views (first model over the radio / first model flashed) over synthetic round
records: the radio model's reading of them, the paper table's analysis and its markdown. Pure logic."""
from __future__ import annotations

import pytest

from pqsu.tools.bench import paper, radio, report

NB = radio.PROFILES["nbiot"]
F, M, P = 1_000_000, 250_000, 1_000  # a dense fp32 model, an int8 one, a patch between two int8 versions


def rec(seconds: float, downs: dict[str, int], flashed: dict[str, int] | None, kinds: dict[str, str] | None = None,
        up: int = 500, per_device: bool = True) -> dict:
    """One round record as the round loop writes it (metrics.jsonl), with per-device bytes or without."""
    devices = {d: {"seconds": seconds, "bytes_up": up} for d in downs}
    if per_device:
        for d in downs:
            devices[d]["bytes_down"] = downs[d]
            if flashed is not None:
                devices[d]["bytes_down_flashed"] = flashed[d]
    r = {"selected": len(downs), "bytes_down": sum(downs.values()), "devices": devices}
    if flashed is not None:
        r["bytes_down_flashed"] = sum(flashed.values())
    if kinds is not None:
        r["downloads"] = {k: sum(v == k for v in kinds.values()) for k in ("patch", "full")}
    return r


DEVS = ("dev-000", "dev-001")  # device_ids(2), as the simulator names them


def each(n: int) -> dict[str, int]:
    return {d: n for d in DEVS}


def full_every_round(model: int, rounds: int = 3) -> list[dict]:
    """A scheme that ships the whole model each round: flashed, round 1's download (the round-0 model) is none."""
    return [rec(1.0, each(model), each(0 if r == 0 else model), {d: "full" for d in DEVS}) for r in range(rounds)]


def patches_after_first(rounds: int = 3) -> list[dict]:
    """`ours`: the whole int8 file first, patches after it; flashed, the first download is none."""
    out = [rec(1.0, each(M), each(0), {d: "full" for d in DEVS})]
    return out + [rec(1.0, each(P), each(P), {d: "patch" for d in DEVS}) for _ in range(rounds - 1)]


def test_flashed_falls_back_to_bytes_down_where_a_record_has_no_flashed_count():
    old = {"selected": 2, "bytes_down": 2 * M, "devices": {d: {"seconds": 1.0, "bytes_up": 9} for d in DEVS}}
    assert radio.bytes_down(old, "radio") == radio.bytes_down(old, "flashed") == 2 * M
    assert radio.device_parts(old, "flashed") == {d: radio.DeviceRound(1.0, M, 9) for d in DEVS}  # shared evenly
    assert radio.downloads([old]) is None
    with pytest.raises(ValueError, match="unknown downlink view"):
        radio.bytes_down(old, "cable")


def test_per_device_bytes_win_over_the_even_share():
    r = rec(2.0, {"a": M, "b": P}, {"a": P, "b": P}, {"a": "full", "b": "patch"})
    assert radio.device_parts(r, "radio") == {"a": radio.DeviceRound(2.0, M, 500), "b": radio.DeviceRound(2.0, P, 500)}
    assert radio.device_parts(r, "flashed") == {"a": radio.DeviceRound(2.0, P, 500), "b": radio.DeviceRound(2.0, P, 500)}
    # per-device radio bytes, flashed only for the round: the round's flashed total is shared evenly
    del r["devices"]["a"]["bytes_down_flashed"], r["devices"]["b"]["bytes_down_flashed"]
    r["bytes_down_flashed"] = 4 * P
    assert {d: p.bytes_down for d, p in radio.device_parts(r, "flashed").items()} == {"a": 2 * P, "b": 2 * P}
    # neither per device: both views shared evenly
    flat = rec(2.0, {"a": M, "b": P}, {"a": P, "b": P}, per_device=False)
    assert {d: p.bytes_down for d, p in radio.device_parts(flat, "radio").items()} == {"a": (M + P) // 2,
                                                                                        "b": (M + P) // 2}


def test_round_times_and_bytes_per_device_round_in_both_views():
    records = patches_after_first()
    # 250,000 B at 26.2 kbit/s is 76.34 s down; 1,000 B is 0.305 s; 500 B up at 62.5 kbit/s is 0.064 s
    up_s, full_s, patch_s = 500 * 8 / 62_500, M * 8 / 26_200, P * 8 / 26_200
    assert radio.view_round_times(records, NB, "radio") == pytest.approx(
        [1 + full_s + up_s, 1 + patch_s + up_s, 1 + patch_s + up_s], abs=1e-9)
    assert radio.view_round_times(records, NB, "flashed") == pytest.approx(
        [1 + up_s, 1 + patch_s + up_s, 1 + patch_s + up_s], abs=1e-9)
    assert radio.down_per_device_round(records, "radio") == pytest.approx((2 * M + 4 * P) / 6)
    assert radio.down_per_device_round(records, "flashed") == pytest.approx(4 * P / 6)
    assert radio.downloads(records) == {"patch": 4, "full": 2}
    assert radio.down_per_device_round([], "radio") is None


def row(records: list[dict], accuracy: list[float], up_per_round: float = 500) -> dict:
    """A paper row as `_row` keeps it (only what the analysis reads)."""
    return {"scheme": "x", "accuracy_per_round": accuracy, "final_accuracy": accuracy[-1],
            "last3_accuracy": sum(accuracy[-3:]) / 3, "up_bytes_per_client_round": up_per_round,
            "down_bytes_per_client_round": radio.down_per_device_round(records, "radio"),
            "round_records": records}


def table() -> dict:
    acc = [0.5, 0.7, 0.8]
    # a row saved before the flashed view: per round {device: [seconds, bytes up]} and the mean download
    legacy = {"scheme": "prune50", "accuracy_per_round": acc, "final_accuracy": 0.8, "last3_accuracy": 2 / 3,
              "up_bytes_per_client_round": 500, "down_bytes_per_client_round": M,
              "devices_per_round": [{d: [1.0, 500] for d in DEVS}] * 3, "bytes_down_per_round": [M] * 3}
    return {"config": {"clients": 2, "seed": 0, "rounds": 3},
            "rows": {"fedavg": row(full_every_round(F), acc, F), "paper": row(full_every_round(M), acc),
                     "ours": row(patches_after_first(), acc, 1_000), "prune50": legacy}}


def test_the_paper_table_reports_both_views_for_every_row_alike():
    t = table()
    paper.analyze(t)
    rows = t["rows"]
    # per device per round against dense fp32 FedAvg, each view against FedAvg's own in the same view
    assert rows["ours"]["downlink_ratio_vs_fedavg"] == pytest.approx(F / ((2 * M + 4 * P) / 6))     # 11.9x
    assert rows["ours"]["downlink_flashed_ratio_vs_fedavg"] == pytest.approx((4 * F / 6) / (4 * P / 6))  # 1,000x
    assert rows["paper"]["downlink_flashed_ratio_vs_fedavg"] == pytest.approx(F / M)
    assert rows["ours"]["bytes_down_flashed_total"] == 4 * P and rows["ours"]["downloads"] == {"patch": 4, "full": 2}
    legacy = rows["prune50"]                           # no flashed count: both views the same bytes
    assert legacy["down_flashed_bytes_per_client_round"] == legacy["down_bytes_per_client_round"] == M
    assert legacy["radio_flashed"]["nbiot"]["round_s"] == legacy["radio"]["nbiot"]["round_s"]
    assert legacy["downloads"] is None
    for label, r in rows.items():
        for view in ("radio", "radio_flashed"):
            for key in radio.PROFILES:
                x = r[view][key]
                ref = rows["fedavg"][view][key]
                assert x["time_to_target_s"] == pytest.approx(sum(x["round_s"][:2]))   # 0.7 reached in round 2
                assert x["speedup_vs_fedavg"] == {"value": pytest.approx(ref["time_to_target_s"] / x["time_to_target_s"]),
                                                  "bound": "exact"}
    ours = rows["ours"]
    assert ours["radio_flashed"]["nbiot"]["time_to_target_s"] < ours["radio"]["nbiot"]["time_to_target_s"]
    assert ours["radio_flashed"]["nbiot-up"] == ours["radio"]["nbiot-up"]   # the uplink alone: the same


def test_the_report_judges_the_flashed_view_and_shows_the_radio_view_beside_it():
    t = table()
    paper.analyze(t)
    results = {"paper": {"tables": {"cnn/synthetic": t}, "target_fraction": 0.95,
                         "profiles": {k: vars(v) for k, v in radio.PROFILES.items()}}}
    by_target = {v.target: v for v in report.verdicts(results) if v.where == "cnn/synthetic ours"}
    down = by_target["downlink per device per round after its first model (flashed) ≥ 150x below FedAvg"]
    assert down.met and down.measured == "1,000x (whole run, first model over the radio: 11.9x)"
    nb = by_target["NB-IoT up+down, every download after the flashed model: time to target ≥ 30x faster than fedavg"]
    flashed = t["rows"]["ours"]["radio_flashed"]["nbiot"]["speedup_vs_fedavg"]["value"]
    over_radio = t["rows"]["ours"]["radio"]["nbiot"]["speedup_vs_fedavg"]["value"]
    assert nb.met == (flashed >= 30) and nb.measured.startswith(report._x(flashed))
    assert f"first model over the radio: {report._x(over_radio)}" in nb.measured
    text = report.downlink_markdown(t)
    ours_line = next(line for line in text.splitlines() if line.startswith("| ours |"))
    assert ours_line.startswith("| ours | 667 | 1,000x | 84,000 | 11.9x | 4 / 2 | ")
    assert next(line for line in text.splitlines() if line.startswith("| prune50 |")).split(" | ")[5] == "-"
    assert "downloads " in report.readme_block(results, None) and "flashed model" in report.readme_block(results, None)
