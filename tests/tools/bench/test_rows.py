"""`pqsu bench paper`: a saved table gains only the rows it lacks, and the row set names what each row is."""
from __future__ import annotations

import json

import pytest

from pqsu.tools.bench import paper
from pqsu.tools.bench.report import _describe


@pytest.mark.slow
def test_a_saved_table_gains_only_the_rows_it_lacks(tmp_path, one_torch_thread):
    first = paper.run(quick=True, out=tmp_path, rows=("ours",))["tables"]["cnn/fashion-mnist"]
    saved = next(tmp_path.glob("paper-*.json"))
    kept = json.loads(saved.read_text())
    del kept["rows"]["ours"]  # as a table measured before the row existed
    saved.write_text(json.dumps(kept))
    again = paper.run(quick=True, out=tmp_path, rows=("ours",))["tables"]["cnn/fashion-mnist"]
    assert list(again["rows"]) == ["fedavg", "paper", "ours"]
    for label in ("fedavg", "paper"):  # kept as measured, not run again
        assert again["rows"][label]["accuracy_per_round"] == first["rows"][label]["accuracy_per_round"]
        assert "measured_at" not in again["rows"][label]
    assert "measured_at" in again["rows"]["ours"]
    assert again["rows"]["ours"]["uplink_ratio_vs_fedavg"] > 10  # analyzed against the kept reference
    assert "ours" in json.loads(saved.read_text())["rows"]  # and saved


def test_each_downlink_row_says_how_the_model_reaches_devices():
    base = dict(prune=0.5, precision="int8", select="topk:0.02", upload="norm:0.0001", server_momentum=0.5,
                finetune_epochs=1.0, scheme="ours")
    rows = {label: {**base, **paper.row_config("ours", **extra).to_dict()} for label, (_, extra) in paper.ROWS.items()
            if label.startswith("ours")}
    assert "exact model patches" in _describe(rows["ours"])
    assert "whole model downloaded every round" in _describe(rows["ours@full"])
    assert "model patches capped at 5% of the file, keyframe headroom 2" in _describe(rows["ours@cap5%"])
