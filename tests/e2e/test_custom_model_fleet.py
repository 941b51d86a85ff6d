"""A user's own architecture (tests.support.user_models:mobilenet_net: depthwise-separable convs and
BatchNorm) federated end to end: 2 rounds in one process (`pqsu simulate`'s rounds) and 2 rounds of
`pqsu run` over a real Mosquitto with agent processes that were allowed to import that code.

Both are `long` (minutes on a loaded 2-core machine); the default suite checks the same path in
parts: tests/cloud/test_model_check.py (every bad --model, before any work) and
tests/edge/test_custom_model.py (the allow flag, a device's fine-tune step on the custom int8 file)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pqsu.cloud.config import FederatedConfig
from pqsu.export.bridge import BridgeError, torch_model_from_int8
from pqsu.protocol import model_id
from pqsu.protocol.model_info import ModelInfo
from pqsu.tools.lab.broker import mosquitto_path

from tests.e2e.test_fleet import pqsu_run, read_run
from tests.support.procs import flags

ARCH = "tests.support.user_models:mobilenet_net"
SMALL = dict(clients=2, rounds=2, samples_per_client=300, proxy_samples=400, eval_samples=400,
             pretrain_epochs=0.5, finetune_epochs=0.2, lr=0.05)

pytestmark = [pytest.mark.long,
              pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                                 reason="dataset-fashion-mnist is not installed")]


def _metadata(data: bytes) -> ModelInfo:
    import onnx

    return ModelInfo.from_props(onnx.load_from_string(data).metadata_props)


def test_simulate_federates_a_custom_architecture_for_two_rounds(one_torch_thread):
    from pqsu.tools.fleet.simulate import simulate

    result = simulate(FederatedConfig.for_scheme("ours", model=ARCH, **SMALL))
    assert [r["round"] for r in result.rounds] == [1, 2]
    for r in result.rounds:
        assert r["selected"] == 2 and r["uploads"] == 2 and r["rejected"] == {}, r
    assert result.rounds[0]["model_id"] != result.rounds[1]["model_id"]  # round 1's updates moved the model
    s = result.summary
    assert 0 < s["bytes_up_total"] < s["bytes_up_dense_fp32"]  # FedAvg's dense fp32 of the user's own model
    assert _metadata(result.model).spec["arch"] == ARCH
    with pytest.raises(BridgeError, match=f"--allow-model-code {ARCH}"):
        torch_model_from_int8(result.model)
    rebuilt, info = torch_model_from_int8(result.model, allow_custom=[ARCH])
    assert info.spec["arch"] == ARCH and sum(p.numel() for p in rebuilt.parameters()) > 0


@pytest.mark.skipif(mosquitto_path() is None, reason="mosquitto is not installed")
def test_run_over_mosquitto_lets_its_agents_rebuild_the_custom_model(tmp_path):
    res = pqsu_run(tmp_path, ["--model", ARCH, *flags(**SMALL)])
    assert res.code == 0, res.explain()
    assert res.left_behind == []
    config, metrics, summary = read_run(res.out)
    assert config["model"] == ARCH
    assert [m["round"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["selected"] == 2 and m["uploads"] == 2 and m["missing"] == 0 and m["rejected"] == {}, m
    assert 0 < summary["bytes_up_total"] < summary["bytes_up_dense_fp32"]
    data = (res.out / "model.int8.onnx").read_bytes()
    assert model_id.verify(data) == metrics[-1]["model_id"] and _metadata(data).spec["arch"] == ARCH
    for log in (res.out / "logs").glob("dev-*.log"):  # every agent trained: none refused the architecture
        assert "failed" not in log.read_text(), log.read_text()[-2000:]
    assert json.loads((res.out / "summary.json").read_text())["rounds"] == 2
