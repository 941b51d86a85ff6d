"""Coordinator checkpoints: atomic, two kept, damaged ones skipped, and a resumed server."""
from __future__ import annotations

import errno

import numpy as np
import pytest

from pqsu.cloud import checkpoint
from pqsu.cloud.checkpoint import Checkpoint, CheckpointError


def _ckpt(round_: int, value: float = 1.0) -> Checkpoint:
    return Checkpoint(round_, {"w": np.full((3, 2), value, np.float32), "b": np.arange(3, dtype=np.float32)},
                      {"w": np.full((3, 2), -value, np.float32)}, {"note": "x", "reports": [{"round": round_}]})


def test_round_trip(tmp_path):
    checkpoint.save(tmp_path, _ckpt(4, 2.5))
    got = checkpoint.load_latest(tmp_path)
    assert got.round == 4 and got.meta["note"] == "x" and got.meta["reports"] == [{"round": 4}]
    np.testing.assert_array_equal(got.master["w"], np.full((3, 2), 2.5, np.float32))
    np.testing.assert_array_equal(got.velocity["w"], np.full((3, 2), -2.5, np.float32))


def test_no_checkpoint_is_none(tmp_path):
    assert checkpoint.load_latest(tmp_path / "missing") is None


def test_keeps_the_newest_two(tmp_path):
    for r in range(1, 5):
        checkpoint.save(tmp_path, _ckpt(r))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-000003.npz", "round-000004.npz"]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, damage):
    checkpoint.save(tmp_path, _ckpt(1, 1.0))
    newest = checkpoint.save(tmp_path, _ckpt(2, 2.0))
    data = newest.read_bytes()
    newest.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"not a zip" * 10, "empty": b""}[damage])
    got = checkpoint.load_latest(tmp_path)
    assert got.round == 1 and got.master["w"][0, 0] == 1.0
    with pytest.raises(CheckpointError, match="unreadable"):
        checkpoint.load(newest)


def test_all_damaged_is_a_clear_error(tmp_path):
    (tmp_path / "round-000001.npz").write_bytes(b"broken")
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        checkpoint.load_latest(tmp_path)


def test_a_full_disk_while_writing_leaves_the_previous_checkpoint_valid(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, _ckpt(1, 1.0))
    before = sorted(p.name for p in tmp_path.iterdir())

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(OSError):
        checkpoint.save(tmp_path, _ckpt(2, 2.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temp file, no new checkpoint
    assert checkpoint.load_latest(tmp_path).round == 1


@pytest.mark.slow
def test_build_server_resumes_master_round_and_momentum(tmp_path):
    from pqsu.cloud.bootstrap import build_server
    from pqsu.cloud.config import FederatedConfig

    cfg = FederatedConfig.for_scheme("ours", rounds=3, clients=2, proxy_samples=300, pretrain_epochs=0.2,
                                     finetune_epochs=0.0, eval_samples=200)
    server, meta = build_server(cfg)
    master = {k: v + 0.25 for k, v in server.master.items()}
    velocity = {k: np.full_like(v, 0.5) for k, v in server.master.items()}
    checkpoint.save(tmp_path, Checkpoint(2, master, velocity, {**meta, "reports": [{"round": 1}, {"round": 2}],
                                                                 "initial_accuracy": 0.5}))
    resumed, rmeta = build_server(cfg, checkpoint_dir=tmp_path)
    assert resumed.rounds_done == 2
    assert rmeta["reports"] == [{"round": 1}, {"round": 2}] and rmeta["initial_accuracy"] == 0.5
    for k in master:
        np.testing.assert_array_equal(resumed.master[k], master[k])
        np.testing.assert_array_equal(resumed.optimizer.velocity[k], velocity[k])
    # the resumed master is what devices get next: its model differs from the fresh one
    assert resumed.model_message()[1].model_id != server.model_message()[1].model_id


def test_a_coordinator_of_a_custom_architecture_resumes_it(tmp_path):
    """The checkpoint names the run's own custom model; the coordinator rebuilds it (its own configured code)."""
    from pqsu.cloud.bootstrap import build_server
    from pqsu.cloud.config import FederatedConfig

    cfg = FederatedConfig.for_scheme("ours", model="tests.support.user_models:mobilenet_net", rounds=3, clients=2,
                                     proxy_samples=200, pretrain_epochs=0.2, finetune_epochs=0.0, eval_samples=100)
    server, meta = build_server(cfg)
    master = {k: v + 0.25 for k, v in server.master.items()}
    checkpoint.save(tmp_path, Checkpoint(1, master, {}, {**meta, "reports": [{"round": 1}]}))
    resumed, _ = build_server(cfg, checkpoint_dir=tmp_path)
    assert resumed.rounds_done == 1 and resumed.info.spec["arch"] == cfg.model
    assert set(resumed.master) == set(master)
    for k in master:
        np.testing.assert_array_equal(resumed.master[k], master[k])
