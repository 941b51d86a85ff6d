"""Server strategies by name: FedAvgM, FedAdam and FedYogi steps as the papers define them, the state a
checkpoint carries, and a bad name refused in one line before any work."""
from __future__ import annotations

import numpy as np
import pytest

from pqsu.cloud.config import FederatedConfig
from pqsu.cloud.strategies import AggregationError, FedAdam, FedAvgM, FedYogi, StrategyError, make_strategy
from pqsu.protocol.errors import PqsuError


def _master():
    return {"w": np.array([1.0, -2.0, 0.5], np.float32)}


def test_fedadam_follows_reddi_et_al():
    opt, master = FedAdam(lr=0.1, tau=1e-3), _master()
    d1, d2 = np.array([0.2, -0.1, 0.0], np.float32), np.array([-0.1, -0.1, 0.3], np.float32)
    opt.step(master, {"w": d1})
    m, v = 0.1 * d1, 0.01 * d1 ** 2
    np.testing.assert_allclose(master["w"], _master()["w"] + 0.1 * m / (np.sqrt(v) + 1e-3), rtol=1e-5)
    w1 = master["w"].copy()
    opt.step(master, {"w": d2})
    m, v = 0.9 * m + 0.1 * d2, 0.99 * v + 0.01 * d2 ** 2
    np.testing.assert_allclose(master["w"], w1 + 0.1 * m / (np.sqrt(v) + 1e-3), rtol=1e-5)
    np.testing.assert_allclose(opt.state["m/w"], m, rtol=1e-5)
    # the step is about lr whatever the delta's scale: per-coordinate normalization
    big, small = FedAdam(lr=0.1), FedAdam(lr=0.1)
    a, b = _master(), _master()
    big.step(a, {"w": np.full(3, 10.0, np.float32)})
    small.step(b, {"w": np.full(3, 0.01, np.float32)})
    np.testing.assert_allclose(a["w"] - _master()["w"], 0.1, rtol=1e-3)
    np.testing.assert_allclose(b["w"] - _master()["w"], 0.1 * 0.001 / (0.001 + 1e-3), rtol=1e-3)


def test_fedyogi_grows_its_second_moment_additively():
    opt, master = FedYogi(lr=0.1), _master()
    d = np.array([0.2, -0.1, 0.0], np.float32)
    opt.step(master, {"w": d})
    v = 0 - 0.01 * d ** 2 * np.sign(0 - d ** 2)
    np.testing.assert_allclose(opt.state["v/w"], v, rtol=1e-5)
    opt.step(master, {"w": d})
    np.testing.assert_allclose(opt.state["v/w"], v - 0.01 * d ** 2 * np.sign(v - d ** 2), rtol=1e-5)


@pytest.mark.parametrize("spec", ["fedadam", "fedyogi"])
def test_a_non_finite_step_leaves_master_and_state_alone(spec):
    opt, master = make_strategy(spec, 0.1), _master()
    opt.step(master, {"w": np.ones(3, np.float32)})
    before, state = master["w"].copy(), {k: v.copy() for k, v in opt.state.items()}
    with pytest.raises(AggregationError):
        opt.step(master, {"w": np.array([np.nan, 0, 0], np.float32)})
    assert master["w"].tobytes() == before.tobytes()
    assert {k: v.tobytes() for k, v in opt.state.items()} == {k: v.tobytes() for k, v in state.items()}


def test_strategies_are_chosen_by_name():
    assert isinstance(make_strategy("fedavgm", 1.0, 0.5), FedAvgM) and make_strategy("fedavgm", 1.0, 0.5).momentum == 0.5
    assert make_strategy("fedadam:0.01", 0.02).tau == 0.01
    assert type(make_strategy("fedyogi")) is FedYogi


@pytest.mark.parametrize("spec, message", [("adam", "unknown server strategy 'adam'"), ("fedadam:0", "tau > 0"),
                                           ("fedadam:x", "tau > 0"), ("fedavgm:2", "takes no option")])
def test_a_bad_strategy_is_refused_by_the_config(spec, message):
    with pytest.raises(StrategyError, match=message):
        make_strategy(spec)
    with pytest.raises(PqsuError, match=message):
        FederatedConfig(server_opt=spec)


def test_the_adaptive_state_survives_a_checkpoint(tmp_path):
    from pqsu.cloud import checkpoint
    from pqsu.cloud.checkpoint import Checkpoint

    opt, master = FedAdam(lr=0.1), _master()
    opt.step(master, {"w": np.array([0.2, -0.1, 0.0], np.float32)})
    checkpoint.save(tmp_path, Checkpoint(1, master, opt.velocity, {"config": {}}))
    resumed = FedAdam(lr=0.1)
    resumed.velocity = checkpoint.load_latest(tmp_path).velocity
    a, b = {k: v.copy() for k, v in master.items()}, {k: v.copy() for k, v in master.items()}
    d = {"w": np.array([0.1, 0.1, 0.1], np.float32)}
    opt.step(a, d)
    resumed.step(b, d)
    np.testing.assert_array_equal(a["w"], b["w"])
