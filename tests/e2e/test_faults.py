"""Fault tolerance, against real processes and a real Mosquitto: the scenarios of
`pqsu.tools.reliability.faults` (also the "Faults" section of the reliability report), each run once,
asserting that every check it measured passed and the figures that prove it.

tests/e2e/test_mqtt_faults.py covers the neighbouring faults (an agent killed mid-round with the
coordinator untouched, a broker that is not there at start); these kill the broker and the
coordinator mid-round, an agent mid-training with its residual checked byte for byte, and damage
checkpoints. Every process a scenario starts is stopped by its lab; every wait is bounded.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pqsu.tools.reliability import faults as reliability_faults
from pqsu.tools.lab.broker import mosquitto_path

needs_lab = pytest.mark.skipif(mosquitto_path() is None or not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                               reason="mosquitto or dataset-fashion-mnist is not installed")


def _passed(result: dict) -> dict:
    assert result["checks"].get("ran") is not False, result.get("error")  # how measure() records a crash
    assert result["checks"] and all(result["checks"].values()), result["checks"]
    json.dumps(result)  # the report stores it as JSON
    return result


@needs_lab
def test_broker_killed_mid_round_loses_no_update_and_counts_none_twice(tmp_path):
    r = _passed(reliability_faults.broker_restart(tmp_path))
    assert r["rounds"] == [1, 2] and r["uploads_per_round"] == [2, 2]
    assert r["updates_accepted"] == r["updates_made_by_agents"] == 4
    assert r["agent_exit_codes"] == [0, 0]


@needs_lab
def test_coordinator_killed_mid_round_resumes_from_its_checkpoint(tmp_path):
    r = _passed(reliability_faults.coordinator_restart(tmp_path))
    assert r["checkpoints_at_kill"] == ["round-000001.npz"] and r["resumed_after_round"] == 1
    assert r["rounds"] == [1, 2] and r["summary_rounds"] == 2 and r["completed"]
    assert sum(r["uploads_per_round"]) == r["updates_made_by_agents"] == 4  # the killed round's updates resent


@needs_lab
def test_agent_killed_mid_training_resumes_with_the_residual_it_left_on_disk(tmp_path):
    r = _passed(reliability_faults.agent_restart(tmp_path))
    assert r["round2"]["uploads"] == 0 and r["round2"]["seconds"] < 120  # its last will answered: no deadline wait
    assert r["state_unchanged_between_kill_and_restart"]
    assert r["update_equals_recomputed_with_residual"] and not r["update_equals_recomputed_without_residual"]
    assert r["round3_uploads"] == 1 and r["agent_exit_code"] == 0


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    pytest.importorskip("torch")
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("dataset-fashion-mnist is not installed")
    r = _passed(reliability_faults.damaged_checkpoint(tmp_path))
    for damage in ("truncated", "garbage"):
        assert r[damage]["resumed_after_round"] == 1 and r[damage]["master_is_previous"]
        assert "round-000002.npz is unreadable" in r[damage]["error_logged"]
    assert r["all_damaged_error"].startswith("no readable checkpoint")


def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path):
    r = _passed(reliability_faults.failed_checkpoint_write(tmp_path))
    assert r["error"].startswith("EFBIG")
    assert r["files_unchanged"] and r["loaded_round"] == 1


def test_a_scenario_that_raises_is_reported_and_the_others_still_run(monkeypatch):
    def broken(folder: Path) -> dict:
        raise RuntimeError("the broker never came up")
    monkeypatch.setattr(reliability_faults, "SCENARIOS", {
        "broken": broken, "fine": lambda folder: {"figure": 1, "checks": {"it worked": True}}})
    results = reliability_faults.measure(quick=True)
    assert results["broken"]["checks"] == {"ran": False}
    assert results["broken"]["error"] == "RuntimeError: the broker never came up"
    assert results["fine"]["checks"] == {"it worked": True}
    table = "\n".join(reliability_faults.markdown(results))
    assert "| broken | ran | **FAIL** | RuntimeError: the broker never came up |" in table
    assert "| fine | it worked | pass | figure=1 |" in table
