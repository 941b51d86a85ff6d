"""One small end-to-end federated run in one process (real data, real int8 ONNX, real codec).

This is the slow test of the cloud/edge suite: two runs of 2 rounds x 3 devices.
"""
from __future__ import annotations

import math

import pytest

from pqsu.tools.fleet import simulate as sim

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SUMMARY_KEYS = {"final_accuracy", "rounds", "bytes_up_total", "bytes_down_total", "bytes_up_dense_fp32",
                "wall_seconds"}


def _config():
    config_cls = getattr(sim, "SimConfig", None)
    if config_cls is None:  # the run configuration moved to the cloud package, shared by every driver
        from pqsu.cloud.config import FederatedConfig as config_cls
    return config_cls.for_scheme("ours", rounds=2, clients=3, samples_per_client=200, proxy_samples=300,
                                 eval_samples=300)


@pytest.mark.slow
def test_small_run_reports_rounds_saves_uplink_and_is_deterministic(fmnist):
    cfg = _config()
    seen = []
    first = sim.simulate(cfg, on_round=seen.append)

    assert [r["round"] for r in first.rounds] == [1, 2]
    assert [r.round for r in seen] == [1, 2]  # the callback saw each round as it closed
    for r in first.rounds:
        # the keys the benches read: per-device timings (radio model) beside what the coordinator reports
        assert {"devices", "missing", "collect_seconds", "server_seconds", "seconds"} <= r.keys()
        assert set(r["devices"]) == set(sim.device_ids(3)) and r["missing"] == 0
        assert sum(d["bytes_up"] for d in r["devices"].values()) == r["bytes_up"]
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["selected"] == 3 and r["uploads"] + r["skipped"] == 3
        assert r["rejected"] == {}
    # every selected device downloads its first model whole (framed: 69 header bytes a frame), then the
    # patch from it to the model round 1 closed with; flashed with round 0's, round 1 downloads nothing
    from pqsu.protocol.model_follow import wire_bytes

    assert first.rounds[0]["downloads"] == {"patch": 0, "full": 3} and first.rounds[0]["bytes_down_flashed"] == 0
    assert first.rounds[0]["bytes_down"] == 3 * wire_bytes(first.rounds[0]["model_bytes"], 128 * 1024)
    assert first.rounds[1]["downloads"] == {"patch": 3, "full": 0}
    assert 0 < first.rounds[1]["bytes_down"] == first.rounds[1]["bytes_down_flashed"] < first.rounds[0]["bytes_down"]
    s = first.summary
    assert SUMMARY_KEYS <= set(s)
    assert s["rounds"] == 2 and s["final_accuracy"] == first.rounds[-1]["accuracy"]
    assert s["bytes_up_total"] == sum(r["bytes_up"] for r in first.rounds) > 0
    assert s["bytes_down_total"] == sum(r["bytes_down"] for r in first.rounds)
    assert s["uplink_reduction"] > 50
    assert s["uplink_reduction"] == pytest.approx(s["bytes_up_dense_fp32"] / s["bytes_up_total"])
    assert math.isfinite(s["wall_seconds"]) and s["wall_seconds"] > 0

    second = sim.simulate(cfg)
    assert [r["bytes_up"] for r in second.rounds] == [r["bytes_up"] for r in first.rounds]
    assert [r["bytes_down"] for r in second.rounds] == [r["bytes_down"] for r in first.rounds]
    assert [(r["uploads"], r["skipped"], r["model_id"]) for r in second.rounds] == \
        [(r["uploads"], r["skipped"], r["model_id"]) for r in first.rounds]


def test_every_driver_gets_the_same_split_the_cloud_holds_its_own_part(fmnist, tmp_path):
    """The devices' shards `pqsu run` writes are those the simulator trains on: one split, in cloud/data.py."""
    import numpy as np

    from pqsu.cloud.data import federated_data
    from pqsu.export.partition import federated_split
    from pqsu.tools.fleet.run import write_device_shards

    cfg = _config()
    train, _ = fmnist
    data = federated_data(cfg)
    proxy_idx, parts = federated_split(train.y, cfg.proxy_samples, cfg.clients, cfg.partition, cfg.seed,
                                       cfg.samples_per_client)
    assert list(data.shards) == sim.device_ids(3)
    for shard, idx in zip(data.shards.values(), parts):
        np.testing.assert_array_equal(shard.x, train.x[idx])
        np.testing.assert_array_equal(shard.y, train.y[idx])
        assert len(np.intersect1d(idx, proxy_idx)) == 0  # the cloud's proxy part is never a device's
    np.testing.assert_array_equal(data.cloud.proxy.y, train.y[proxy_idx])
    assert len(data.cloud.test_y) == cfg.eval_samples and len(data.cloud.calibration) == 256

    assert write_device_shards(cfg, tmp_path) == sim.device_ids(3)
    for device, shard in data.shards.items():
        with np.load(tmp_path / device / "data.npz") as z:
            np.testing.assert_array_equal(z["x"], shard.x)
            np.testing.assert_array_equal(z["y"], shard.y)
