"""Poisoning: the attacks (pure functions over real payloads), robust aggregation of one round of
real device updates with one attacker, and a quick end-to-end run of the reliability measurement."""
from __future__ import annotations

import argparse

import numpy as np
import pytest

from pqsu.cloud.aggregate import make_aggregator
from pqsu.cloud.bootstrap import build_server
from pqsu.cloud.config import FederatedConfig, add_config_arguments, config_from_args
from pqsu.edge.learner import EdgeLearner
from pqsu.edge.selective import SelectivePolicy
from pqsu.export.partition import federated_split
from pqsu.protocol import codec
from pqsu.protocol.codec import TensorBlock, Update
from pqsu.protocol.errors import PqsuError, SignatureError
from pqsu.tools.reliability import poisoning as reliability_poisoning
from pqsu.tools.reliability.attacks import AttackError, attack_factor, scaled_payload, tamper_hook
from pqsu.tools.fleet.simulate import device_ids

KEY = b"attacker-own-key"


def _mixed_update() -> Update:
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.1, (4, 3)).astype(np.float32)
    return Update(7, "dev-000", "model-a", 123, 0.25, (
        TensorBlock.dense("conv.w", w),
        TensorBlock.sparse("fc.w", (5, 6), np.array([1, 7, 29]), np.array([0.5, -0.02, 0.3])),
        TensorBlock.dense_fp32("fc.b", rng.normal(0, 1, 6).astype(np.float32)),
        TensorBlock.skip("bn.b", (3,))))


@pytest.mark.parametrize("factor", [10.0, -10.0, -1.0, 0.5])
def test_scaled_payload_decodes_to_factor_times_the_original(factor):
    original = _mixed_update()
    payload = codec.encode(original, key=KEY)
    poisoned = codec.decode(scaled_payload(payload, factor, key=KEY), key=KEY)  # still signed with its own key
    assert (poisoned.round, poisoned.device_id, poisoned.model_id, poisoned.num_samples, poisoned.loss) == \
        (original.round, original.device_id, original.model_id, original.num_samples, original.loss)
    want, got = original.to_dense(), poisoned.to_dense()
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(got[name], factor * want[name], rtol=1e-6, atol=0, err_msg=name)
    assert [b.kind for b in poisoned.blocks] == [b.kind for b in original.blocks]
    assert np.array_equal(poisoned.block("fc.w").indices, original.block("fc.w").indices)  # same entries sent


def test_flip_negates_every_value_exactly_and_keeps_the_size():
    payload = codec.encode(_mixed_update(), key=KEY)
    flipped = scaled_payload(payload, attack_factor("flip"), key=KEY)
    assert len(flipped) == len(payload)
    want, got = codec.decode(payload, key=KEY).to_dense(), codec.decode(flipped, key=KEY).to_dense()
    for name in want:
        assert np.array_equal(got[name], -want[name]), name


def test_a_poisoned_payload_only_verifies_with_the_attackers_key():
    payload = scaled_payload(codec.encode(_mixed_update(), key=KEY), 10, key=KEY)
    with pytest.raises(SignatureError):
        codec.decode(payload, key=b"someone else's key")


def test_attack_specs():
    assert attack_factor("flip") == -1.0
    assert attack_factor("scale:10") == 10.0
    assert attack_factor("scale:-10") == -10.0
    for bad in ("", "flip:2", "scale", "scale:x", "scale:nan", "scale:inf", "negate"):
        with pytest.raises(AttackError) as info:
            attack_factor(bad)
        assert isinstance(info.value, PqsuError) and bad in str(info.value)


def test_tamper_hook_rewrites_only_the_attackers_payloads():
    honest = codec.encode(_mixed_update())
    hook = tamper_hook("scale:10", {"dev-000"})
    assert hook("dev-001", honest) is honest
    poisoned = hook("dev-000", honest)
    np.testing.assert_allclose(codec.decode(poisoned).block("conv.w").dequantize(),
                               10 * codec.decode(honest).block("conv.w").dequantize(), rtol=1e-6)


@pytest.mark.parametrize("argv, want", [
    (["--aggregator", "median", "--clip-norm", "median"], ("median", "median")),
    (["--aggregator", "trimmed:0.1", "--clip-norm", "median:2"], ("trimmed:0.1", "median:2")),
    (["--clip-norm", "0.5"], ("fedavg", 0.5))])
def test_the_robust_options_reach_the_server_from_the_command_line(argv, want):
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    cfg = config_from_args(p.parse_args(argv))
    assert (cfg.aggregator, cfg.clip_norm) == want
    server_cfg = cfg.server_config()
    assert (server_cfg.aggregator, server_cfg.clip_norm) == want
    help_text = p.format_help()
    assert "Against poisoning" in help_text and "median[:F]" in help_text


@pytest.mark.parametrize("argv", [["--clip-norm", "medain"], ["--clip-norm", "-1"], ["--aggregator", "mean"]])
def test_a_bad_robust_option_is_a_clear_error_before_any_work(argv):
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    with pytest.raises(PqsuError, match="clip norm|aggregator"):
        config_from_args(p.parse_args(argv))


# ---------------------------------------------------------------- one real round, one attacker

@pytest.fixture(scope="module")
def real_round(one_torch_thread, fmnist):
    """One round of our scheme (cnn, int8 model, top-2% int8 updates): 10 devices' real payloads."""
    train, _ = fmnist
    cfg = FederatedConfig.for_scheme("ours", clients=10, samples_per_client=150, proxy_samples=500, eval_samples=100)
    server, _ = build_server(cfg)
    _, parts = federated_split(train.y, cfg.proxy_samples, cfg.clients, cfg.partition, cfg.seed, cfg.samples_per_client)
    policy = SelectivePolicy.from_spec(cfg.upload, cfg.select, cfg.error_feedback)
    ids = device_ids(cfg.clients)
    task = server.open_round(1, ids)
    model_bytes, _ = server.model_message()
    payloads = {d: EdgeLearner(d, train.x[p], train.y[p], policy).run_round(task, model_bytes).payload
                for d, p in zip(ids, parts)}
    assert all(payloads.values())
    return server.shapes, payloads


def _aggregate(shapes, payloads, aggregator="fedavg", clip=None) -> np.ndarray:
    agg = make_aggregator(aggregator, shapes, clip)
    for p in payloads:
        agg.add(codec.decode(p))
    result = agg.result()
    return np.concatenate([result[k].ravel() for k in sorted(result)]).astype(np.float64)


def _distance(a: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(a - reference) / np.linalg.norm(reference))


@pytest.mark.parametrize("attack", ["scale:10", "scale:-10"])
def test_clipped_robust_aggregates_stay_near_the_clean_one_and_fedavg_does_not(real_round, attack):
    shapes, payloads = real_round
    sparse = [b for b in codec.decode(payloads["dev-001"]).blocks if b.kind == "sparse"]
    assert sparse and sum(b.nnz for b in sparse) < 0.05 * sum(b.numel for b in sparse)  # really top-k updates
    clean = _aggregate(shapes, payloads.values())
    attacked = dict(payloads, **{"dev-000": scaled_payload(payloads["dev-000"], attack_factor(attack))})

    fedavg = _distance(_aggregate(shapes, attacked.values()), clean)
    median = _distance(_aggregate(shapes, attacked.values(), "median", "median"), clean)
    trimmed = _distance(_aggregate(shapes, attacked.values(), "trimmed:0.1", "median"), clean)
    # one device of ten moves FedAvg by more than the clean aggregate's own length
    assert fedavg > 1.0, fedavg
    assert median < 0.6 and trimmed < 0.6, (median, trimmed)
    assert max(median, trimmed) < fedavg / 3


def test_without_a_clip_the_median_of_sparse_updates_does_not_stop_a_scaled_attacker(real_round):
    # Most entries are sent by one device only, so there is nothing to take a median against:
    # the clip is what bounds a scaled update (docs/reliability.md).
    shapes, payloads = real_round
    clean = _aggregate(shapes, payloads.values())
    attacked = dict(payloads, **{"dev-000": scaled_payload(payloads["dev-000"], 10)})
    assert _distance(_aggregate(shapes, attacked.values(), "median"), clean) > 1.0


# ---------------------------------------------------------------- end to end, quick

def test_quick_measurement_runs_every_cell_and_reports_it(one_torch_thread, fmnist):
    result = reliability_poisoning.measure(quick=True)
    cfg = result["config"]
    grid = {(c["attack"], c["defence"]) for c in result["cells"]}
    assert grid == set(reliability_poisoning.QUICK_CELLS)
    cells = {(c["attack"], c["defence"]): c for c in result["cells"]}
    for (attack, defence), c in cells.items():
        assert len(c["accuracy_per_round"]) == cfg["rounds"]
        assert all(0.0 <= a <= 1.0 for a in c["accuracy_per_round"])
        assert c["uploads"] == cfg["clients"] * cfg["rounds"]
        assert c["rejected"] == 0  # a poisoned update is well-formed and signed: nothing refuses it
        assert c["poisoned_uploads"] == (0 if attack == "none" else cfg["rounds"])
        assert (c["aggregator"], c["clip_norm"]) == tuple(reliability_poisoning.DEFENCES[defence].values())
    clean = cells[("none", "none")]
    assert clean["delta_pt_vs_clean"] == 0
    # the attack reached the master model in both attacked runs, and the defence changed what it became
    ids = {c["final_model_id"] for c in cells.values()}
    assert len(ids) == 3

    lines = reliability_poisoning.markdown(result)
    text = "\n".join(lines)
    assert lines[0] == "## Poisoning"
    assert "| attack | none | clip+median |" in text
    assert sum(line.startswith("| scale:-10 |") for line in lines) == 3  # final, last-3 and lowest tables
    assert f"{cells[('scale:-10', 'clip+median')]['final_accuracy']:.2%}" in text
    assert "Quick mode" in text
