"""`pqsu bench paper --seeds N`: one table from N runs, means with the spread beside them, gaps paired by seed."""
from __future__ import annotations

import statistics

import pytest

from pqsu.tools.bench import paper
from pqsu.tools.bench.report import paper_markdown, verdicts


def _row(acc: list[float]) -> dict:
    """A row as run_table records it (two devices, two rounds), before `analyze` adds the derived figures."""
    return {"scheme": "x", "prune": 0.5, "precision": "int8", "upload": "always", "select": "dense",
            "error_feedback": False, "server_momentum": 0.0, "initial_accuracy": acc[0] - 0.1,
            "accuracy_per_round": acc, "final_accuracy": acc[-1], "last3_accuracy": statistics.mean(acc[-3:]),
            "uploads": 4, "skipped": 0, "selected": 4, "bytes_up_total": 400, "bytes_down_total": 800,
            "up_bytes_per_client_round": 100.0, "down_bytes_per_client_round": 200.0, "edge_round_s_median": 1.0,
            "edge_round_s_mean": 1.0, "inference_b1_ms": 1.0, "model_bytes": 100, "wall_seconds": 1.0,
            "devices_per_round": [{"dev-000": [1.0, 100], "dev-001": [1.0, 100]}] * len(acc),
            "bytes_down_per_round": [200] * len(acc)}


def _table(seed: int, fedavg: list[float], ours: list[float]) -> dict:
    return {"config": {"clients": 2, "seed": seed, "partition": "iid", "rounds": len(fedavg), "samples_per_client": 10,
                       "pretrain_epochs": 1, "proxy_samples": 10, "finetune_epochs": 1, "epochs": 1, "batch_size": 8,
                       "lr": 0.1, "eval_samples": 10},
            "torch_fp32_unpruned_b1_ms": 1.0,
            "rows": {"fedavg": {**_row(fedavg), "scheme": "fedavg", "prune": None, "select": "fp32"},
                     "ours": {**_row(ours), "scheme": "ours"}}}


def test_merged_rows_are_means_over_seeds_with_paired_spread():
    runs = [_table(0, [0.5, 0.6, 0.7], [0.5, 0.6, 0.68]), _table(1, [0.4, 0.5, 0.6], [0.4, 0.5, 0.56])]
    merged = paper.merge_seeds(runs)
    ours = merged["rows"]["ours"]
    assert merged["seeds"] == [0, 1]
    assert ours["last3_accuracy"] == pytest.approx(statistics.mean([(0.5 + 0.6 + 0.68) / 3, (0.4 + 0.5 + 0.56) / 3]))
    assert ours["last3_accuracy_spread"] == pytest.approx(statistics.stdev([(0.5 + 0.6 + 0.68) / 3,
                                                                           (0.4 + 0.5 + 0.56) / 3]))
    gaps = [100 * ((0.5 + 0.6 + 0.68) / 3 - 0.6), 100 * ((0.4 + 0.5 + 0.56) / 3 - 0.5)]
    assert ours["last3_delta_pt_vs_fedavg"] == pytest.approx(statistics.mean(gaps))
    assert ours["last3_delta_pt_spread"] == pytest.approx(statistics.stdev(gaps))
    assert ours["accuracy_per_round"] == pytest.approx([0.45, 0.55, 0.62])  # the mean curve, per round
    # the spread shows in the table, and the verdict is on the mean
    text = paper_markdown({"tables": {"t": merged}, "target_fraction": 0.95,
                           "profiles": {k: vars(v) for k, v in paper.radio.PROFILES.items()}})
    assert "seeds 0, 1" in text and f"{statistics.mean(gaps):+.2f} ± {statistics.stdev(gaps):.2f} pt" in text
    assert any(v.where == "t ours" and f"{statistics.mean(gaps):+.2f} pt" in v.measured
               for v in verdicts({"paper": {"tables": {"t": merged}}}))


@pytest.mark.parametrize("option, message", [(dict(seeds=0), "--seeds must be at least 1"),
                                             (dict(rows="ours,adam"), "--rows: adam not a strategies row"),
                                             (dict(rows="ours@fedadam", suites=["paper"]),
                                              "--rows: ours@fedadam not a paper row"),
                                             (dict(rows="ours", suites=["export"]), "--rows applies to the paper"),
                                             (dict(models="vgg"), "--models: vgg not in the strategies plans"),
                                             (dict(models="cnn", suites=["paper"]), "--models: cnn not in the paper")])
def test_bad_bench_options_fail_before_any_work(tmp_path, option, message):
    import argparse

    from pqsu.protocol.errors import PqsuError
    from pqsu.tools.bench import command

    args = argparse.Namespace(**{**dict(suites=["strategies"], quick=True, out=str(tmp_path / "b"), docs=False,
                                        render=False, mnist=None, cifar10=None, seeds=1, rows=None, models=None),
                                 **option})
    with pytest.raises(PqsuError, match=message):
        command.run(args)
    assert not (tmp_path / "b").exists()  # nothing measured, nothing written
