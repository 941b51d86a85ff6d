"""`pqsu bench` smoke runs (--quick): structure, and numbers consistent with what was recorded.

The paper suite runs every row of the table on a tiny cnn for 2 rounds; the figures checked
here are recomputed from the bytes and times the run itself recorded, not typed in.
"""
from __future__ import annotations

import argparse
import json

import pytest

from pqsu.protocol.errors import PqsuError
from pqsu.tools.bench import command as bench
from pqsu.tools.bench import paper as bench_paper
from pqsu.tools.bench import report as bench_report
from pqsu.tools.bench import radio

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _args(out, *suites: str, docs: bool = False, render: bool = False) -> argparse.Namespace:
    return argparse.Namespace(suites=list(suites), quick=True, out=str(out), docs=docs, render=render, mnist=None,
                              cifar10=None, seeds=1)


@pytest.fixture(scope="module")
def quick(tmp_path_factory, one_torch_thread):
    out = tmp_path_factory.mktemp("bench")
    assert bench.run(_args(out, "paper", "codec")) == 0
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.long
def test_paper_quick_has_every_row_and_consistent_bytes(quick):
    out, results = quick
    table = results["paper"]["tables"]["cnn/fashion-mnist"]
    rows = table["rows"]
    assert list(rows) == list(bench_paper.ROWS)
    rounds = table["config"]["rounds"]
    for label, row in rows.items():
        assert len(row["accuracy_per_round"]) == rounds and all(0 <= a <= 1 for a in row["accuracy_per_round"])
        sent = sum(v["bytes_up"] for r in row["round_records"] for v in r["devices"].values())
        assert sent == row["bytes_up_total"]  # what each device sent adds up to what the server accepted
        assert row["up_bytes_per_client_round"] == pytest.approx(sent / row["selected"])
        assert row["down_bytes_per_client_round"] == pytest.approx(row["bytes_down_total"] / row["selected"])
        assert row["down_flashed_bytes_per_client_round"] == pytest.approx(row["bytes_down_flashed_total"] / row["selected"])
        assert row["bytes_down_flashed_total"] < row["bytes_down_total"]  # round 1 needs no download once flashed
        assert row["edge_round_s_median"] > 0 and row["inference_b1_ms"] > 0 and row["model_bytes"] > 0
        assert row["uplink_ratio_vs_fedavg"] == pytest.approx(
            rows["fedavg"]["up_bytes_per_client_round"] / row["up_bytes_per_client_round"])
    # one technique at a time: more pruning ships fewer bytes; int8 fewer than fp32; top-k far fewer again
    size = {k: rows[k]["model_bytes"] for k in rows}
    assert size["fedavg"] > size["prune30"] > size["prune50"] > size["prune70"]
    assert size["prune50"] > 3 * size["prune50+int8"] and size["prune50+int8"] == size["ours"]
    assert rows["ours"]["uplink_ratio_vs_fedavg"] > 10 * rows["prune50+int8"]["uplink_ratio_vs_fedavg"]
    assert rows["paper"]["uploads"] + rows["paper"]["skipped"] == rows["paper"]["selected"]
    assert table["target_accuracy"] == pytest.approx(bench_paper.TARGET_FRACTION * rows["fedavg"]["last3_accuracy"])
    assert rows["fedavg"]["rounds_to_target"] is not None  # the target rule guarantees FedAvg reaches it


@pytest.mark.slow
@pytest.mark.long
def test_paper_quick_radio_times_recompute_from_the_recorded_round(quick):
    _, results = quick
    table = results["paper"]["tables"]["cnn/fashion-mnist"]
    row = table["rows"]["ours"]
    record = row["round_records"][0]
    factors = radio.device_factors(sorted(record["devices"]), table["config"]["seed"])
    link = radio.PROFILES["nbiot"]
    share = record["bytes_down"] // record["selected"]   # round 1: every device's first model, over the radio
    first = max(radio.device_seconds(radio.DeviceRound(v["seconds"], v.get("bytes_down", share), v["bytes_up"]), link,
                                     factors[d]) for d, v in record["devices"].items())
    assert row["radio"]["nbiot"]["round_s"][0] == pytest.approx(first)
    # flashed with the round-0 model, round 1 downloads nothing: compute and upload alone
    alone = max(radio.device_seconds(radio.DeviceRound(v["seconds"], 0, v["bytes_up"]), link, factors[d])
                for d, v in record["devices"].items())
    assert record.get("bytes_down_flashed", 0) == 0 and row["radio_flashed"]["nbiot"]["round_s"][0] == pytest.approx(alone)
    # NB-IoT rounds of the 14x smaller int8 model take longer on Wi-Fi's rates? No: every profile is faster than NB-IoT
    for key in ("ltem", "wifi"):
        assert all(a < b for a, b in zip(row["radio"][key]["round_s"], row["radio"]["nbiot"]["round_s"]))
    fed = table["rows"]["fedavg"]["radio"]["nbiot"]
    assert fed["speedup_vs_fedavg"] == {"value": 1.0, "bound": "exact"}
    assert sum(fed["round_s"]) == pytest.approx(fed["total_s"])


@pytest.mark.slow
def test_quick_run_writes_report_plots_and_targets(quick, tmp_path):
    out, results = quick
    md = (out / "results.md").read_text()
    assert "## Targets" in md and "## The paper's table" in md and "Coordinator memory" in md
    for name in ("accuracy-vs-nbiot-cnn-fashion-mnist.png", "bytes-cnn-fashion-mnist.png", "aggregator-memory.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    verdicts = bench_report.verdicts(results)
    # six per row of ours, one per patched row against ours@full, and the coordinator's memory
    assert len(verdicts) == 6 * len(bench_report.OUR_ROWS) + len(bench_report.PATCHED_ROWS) + 1
    patches = next(v for v in verdicts if v.target.startswith("model patches") and " ours vs" in v.where)
    rows = results["paper"]["tables"]["cnn/fashion-mnist"]["rows"]
    delta = 100 * (rows["ours"]["last3_accuracy"] - rows["ours@full"]["last3_accuracy"])
    assert patches.measured == f"{delta:+.2f} pt" and patches.met == (delta >= -bench_report.PATCH_PT)
    assert rows["ours@full"]["downlink"] == "full" and rows["ours"]["downlink"] != "full"
    ours = results["paper"]["tables"]["cnn/fashion-mnist"]["rows"]["ours"]
    down = next(v for v in verdicts if v.where.endswith(" ours") and v.target.startswith("downlink"))
    assert down.met == (ours["downlink_flashed_ratio_vs_fedavg"] >= bench_report.DOWNLINK_X)
    assert f"first model over the radio: {bench_report._x(ours['downlink_ratio_vs_fedavg'])}" in down.measured

    # --docs: results.md, plots and only the README's marked block are rewritten
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:begin -->\nold\n<!-- results:end -->\nlayout\n")
    plots = sorted(out.glob("*.png"))
    bench.write_docs(results, plots, docs=tmp_path / "docs", readme=readme)
    text = readme.read_text()
    assert text.startswith("intro\n<!-- results:begin -->\n") and text.endswith("<!-- results:end -->\nlayout\n")
    assert "old" not in text and f"{ours['uplink_ratio_vs_fedavg']:,.0f}x" in text
    assert "docs/img/accuracy-vs-nbiot-cnn-fashion-mnist.png" in text
    assert (tmp_path / "docs" / "img" / "aggregator-memory.png").exists()
    assert "(img/bytes-cnn-fashion-mnist.png)" in (tmp_path / "docs" / "results.md").read_text()
    with pytest.raises(PqsuError, match="results:begin"):
        bench.replace_block("no markers here", "x")


@pytest.mark.slow
def test_codec_quick_memory_stays_flat_in_devices(quick):
    _, results = quick
    s = results["codec"]["scaling"]
    assert [p["devices"] for p in s["points"]] == [100, 1000]
    assert all(p["accepted"] == p["devices"] for p in s["points"])  # real updates, all through submit
    # FedAvg streams: ten times the devices must not mean ten times the memory
    assert s["peak_growth"] < 2 and all(0.5 < p["peak_vs_model"] < 5 for p in s["points"])
    assert results["codec"]["aggregate_peak_vs_model"] < 3


def test_unknown_suite_is_a_clear_error(tmp_path):
    with pytest.raises(PqsuError, match="unknown suite"):
        bench.run(_args(tmp_path, "nope"))


@pytest.mark.slow
@pytest.mark.long  # a timing comparison (device compute < collect time) that a loaded machine can trip
def test_fleet_quick_round_over_mosquitto(tmp_path):
    from pqsu.tools.bench.fleet import run_fleet

    f = run_fleet(agents=2, rounds=1, model="cnn", prune=0.5, timeout_s=300)
    (row,) = f["per_round"]
    assert row["selected"] == 2 and row["uploads"] >= 1
    assert f["round_latency_median_s"] == row["collect_s"] > 0
    assert 0 < row["slowest_device_compute_s"] < row["collect_s"]
    assert f["overhead_median_s"] == pytest.approx(row["collect_s"] - row["slowest_device_compute_s"])
    assert 0 < f["model_bytes"] < 500_000


def test_fleet_section_lists_both_fleet_sizes_and_the_overhead_verdict():
    def run(agents: int, model: str, overheads: list[float]) -> dict:
        rows = [{"round": i + 1, "collect_s": 2.0 + o, "overhead_s": o, "uploads": agents, "selected": agents}
                for i, o in enumerate(overheads)]
        return {"agents": agents, "rounds": len(rows), "model": model, "prune": 0.5, "model_bytes": 1_000_000,
                "per_round": rows, "round_latency_median_s": 2.1, "round_latency_max_s": 2.6,
                "overhead_median_s": sorted(overheads)[len(overheads) // 2], "overhead_max_s": max(overheads),
                "target_s": 0.5}
    fleet = {**run(20, "resnet18", [0.1, 0.2, 0.6]), "scale": run(100, "cnn", [0.3, 0.4])}
    md = bench.to_markdown({"machine": {"cores": 2, "python": "3"}, "fleet": fleet})
    assert "| 20 | resnet18 pruned 50% int8 | 1,000,000 | 3 | 2.10 / 2.60 | 0.200 / 0.600 | 60/60 |" in md
    assert "| 100 | cnn pruned 50% int8 |" in md and "200/200" in md
    assert "met (median 0.200 s)" in md
    fleet["overhead_median_s"] = 0.7
    assert "missed (median 0.700 s)" in bench.to_markdown({"machine": {"cores": 2, "python": "3"}, "fleet": fleet})


def test_docs_keep_the_suites_a_run_did_not_remeasure(tmp_path):
    docs_json = tmp_path / "docs" / "results.json"
    machine = {"python": "3.11", "cpu": "x", "cores": 2}
    first = bench.merge_into_docs({"machine": machine, "quick": False, "paper": {"v": 1}, "fleet": {"v": 1}}, docs_json)
    assert first["paper"] == {"v": 1} and first["fleet"] == {"v": 1}
    # a later run of one suite replaces that suite only, and the file on disk says the same
    second = bench.merge_into_docs({"machine": machine, "quick": False, "fleet": {"v": 2}}, docs_json)
    assert second["paper"] == {"v": 1} and second["fleet"] == {"v": 2}
    assert json.loads(docs_json.read_text()) == second
    # a smoke run is refused before anything is written
    with pytest.raises(PqsuError, match="--quick"):
        bench.merge_into_docs({"machine": machine, "quick": True, "fleet": {"v": 3}}, docs_json)
    assert json.loads(docs_json.read_text())["fleet"] == {"v": 2}


def test_docs_page_names_the_default_suites_it_has_no_measurements_of(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # --docs writes docs/ and README.md under the working directory
    out = tmp_path / "b"
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"codec": {"measured_at": "2026-12-02T06:00"}}))
    args = _args(tmp_path, "codec")
    args.out, args.render, args.docs, args.quick = str(out), True, True, False
    assert bench.run(args) == 0
    assert json.loads((tmp_path / "docs" / "results.json").read_text())["codec"]["measured_at"] == "2026-12-02T06:00"
    page = (tmp_path / "docs" / "results.md").read_text()
    assert "## Update codec (measured 2026-12-02T06:00)" in page
    assert "Not measured on this code yet: export, paper, fleet, scale" in page
