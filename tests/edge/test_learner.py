"""edge/learner.py: one device's round on a tiny real int8 model (the zoo cnn, pruned and quantized by
tests/support/edge_models.py) and a few dozen local images, on one torch thread.

What a user of the fleet would check: the update the board uploads names its round, model and
device, and decodes (signed with the device's key when it has one); a policy that says skip sends
nothing; error feedback keeps what was not sent (a twin learner sending its exact fp32 delta tells
what the whole delta was); the device state survives a restart; the board's budget caps a round."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from tests.support.edge_models import int8_models  # noqa: E402
from tests.support.nets import single_torch_thread  # noqa: E402

from pqsu.edge.learner import EdgeLearner, TrainingBudget, held_out_mask  # noqa: E402
from pqsu.export.bridge import torch_model_from_onnx  # noqa: E402
from pqsu.export.training import evaluate  # noqa: E402
from pqsu.edge.selective import SelectivePolicy  # noqa: E402
from pqsu.protocol import model_id  # noqa: E402
from pqsu.protocol.codec import SignatureError, decode  # noqa: E402
from pqsu.protocol.errors import PqsuError  # noqa: E402
from pqsu.protocol.messages import RoundTask  # noqa: E402

DEVICE = "pi-learn-01"


@pytest.fixture(scope="module")
def model():
    models = int8_models()
    data = models.a.read_bytes()
    return data, model_id.verify(data), models.x_test[:48], models.y_test[:48]


def learner(model, upload="always", select="topk:0.05", error_feedback=True, **kw) -> EdgeLearner:
    _, _, x, y = model
    return EdgeLearner(DEVICE, x, y, SelectivePolicy.from_spec(upload, select, error_feedback), **kw)


def task(model, round_=1, **kw) -> RoundTask:
    return RoundTask(round=round_, model_id=model[1], epochs=1, batch_size=16, lr=0.05, seed=7, **kw)


def run(lrn: EdgeLearner, model, round_=1, **kw):
    with single_torch_thread():
        return lrn.run_round(task(model, round_, **kw), model[0])


def exact_delta(model, round_=1) -> dict[str, np.ndarray]:
    """This round's whole delta, from a twin device (same id, data and seed) that sends it in fp32."""
    out = run(learner(model, "always", "fp32", False), model, round_)
    return {b.name: b.dequantize() for b in decode(out.payload).blocks}


def test_the_uploaded_update_names_round_model_and_device(model):
    lrn = learner(model)
    out = run(lrn, model, round_=3)
    assert out.payload is not None and out.round == 3 and np.isfinite(out.loss)
    update = decode(out.payload)
    assert (update.round, update.model_id, update.device_id) == (3, model[1], DEVICE)
    assert update.num_samples == 48 - 5 and out.samples > 0  # the FedAvg weight: the samples it trains on
    assert out.nnz == sum(b.nnz for b in update.blocks) > 0
    names = {b.name for b in update.blocks}
    assert names and names == set(lrn.state.residual)  # one block per tensor of the model
    assert lrn.state.last_round == 3 and lrn.state.uploads == 1 and lrn.state.bytes_up == len(out.payload)
    assert lrn.state.bytes_down == len(model[0])


def test_a_device_key_signs_the_update(model):
    key = bytes(range(32))
    out = run(learner(model, key=key), model)
    assert decode(out.payload, key=key).device_id == DEVICE
    with pytest.raises(SignatureError):
        decode(out.payload, key=bytes(32))


def test_a_skipping_policy_sends_nothing_and_keeps_the_whole_delta(model):
    delta = exact_delta(model)
    lrn = learner(model, upload="norm:1000000")  # no update is that large: skip
    out = run(lrn, model)
    assert out.payload is None and out.nnz == 0 and "relative norm" in out.reason
    assert lrn.state.uploads == 0 and lrn.state.bytes_up == 0 and lrn.state.last_round == 1
    assert set(lrn.state.residual) == set(delta)
    for name, d in delta.items():
        np.testing.assert_allclose(lrn.state.residual[name], d, rtol=1e-5, atol=1e-7)
    dropped = learner(model, upload="norm:1000000", error_feedback=False)
    assert run(dropped, model).payload is None and dropped.state.residual == {}


def test_error_feedback_keeps_what_top_k_did_not_send_and_adds_it_next_round(model):
    delta1, delta2 = exact_delta(model, 1), exact_delta(model, 2)
    lrn = learner(model, select="topk:0.05")
    sent1 = {b.name: b.dequantize() for b in decode(run(lrn, model, 1).payload).blocks}
    residual1 = {k: v.copy() for k, v in lrn.state.residual.items()}
    for name, d in delta1.items():  # nothing lost: sent + kept is the whole delta
        np.testing.assert_allclose(sent1[name] + residual1[name], d, rtol=1e-4, atol=1e-6)
        assert np.count_nonzero(residual1[name]) > 0
    sent2 = {b.name: b.dequantize() for b in decode(run(lrn, model, 2).payload).blocks}
    for name, d in delta2.items():  # the next round sends from its delta plus what was kept
        np.testing.assert_allclose(sent2[name] + lrn.state.residual[name], d + residual1[name], rtol=1e-4, atol=1e-6)
    plain = learner(model, select="topk:0.05", error_feedback=False)
    run(plain, model, 1)
    assert plain.state.residual == {}


def test_the_state_survives_a_restart(model, tmp_path):
    path = tmp_path / "state.npz"
    lrn = learner(model, state_path=path)
    out = run(lrn, model, 4)
    lrn.save()
    again = learner(model, state_path=path)
    assert again.state.last_round == 4 and again.state.uploads == 1 and again.state.bytes_up == len(out.payload)
    assert set(again.state.residual) == set(lrn.state.residual)
    for name, r in lrn.state.residual.items():
        np.testing.assert_array_equal(again.state.residual[name], r)


def test_a_round_for_another_model_or_other_images_is_refused(model):
    with pytest.raises(PqsuError, match="announced model"):
        learner(model).run_round(RoundTask(round=1, model_id="0" * 64), model[0])
    _, _, x, y = model
    wrong = EdgeLearner(DEVICE, np.zeros((8, 1, 32, 32), np.uint8), y[:8], SelectivePolicy.from_spec())
    with pytest.raises(PqsuError, match="local samples are"):
        wrong.run_round(task(model), model[0])
    with pytest.raises(PqsuError, match="one label each"):
        EdgeLearner(DEVICE, x, y[:3], SelectivePolicy.from_spec())


def test_the_board_budget_caps_what_a_round_asks():
    ask = RoundTask(round=1, model_id="m", epochs=5, batch_size=128, time_budget_s=None)
    capped = TrainingBudget(max_epochs=2, max_batch_size=32, time_budget_s=60).apply(ask)
    assert (capped.epochs, capped.batch_size, capped.time_budget_s) == (2, 32, 60)
    small = RoundTask(round=1, model_id="m", epochs=1, batch_size=16, time_budget_s=30)
    assert TrainingBudget(max_epochs=2, max_batch_size=32, time_budget_s=60).apply(small) == small
    assert TrainingBudget().apply(ask) == ask


def test_the_held_out_samples_are_fixed_never_trained_on_and_evaluate_the_received_model(model):
    _, _, x, y = model
    held = held_out_mask(DEVICE, len(x), 0.1)
    assert held.sum() == 5 and (held_out_mask(DEVICE, len(x), 0.1) == held).all()  # the same in every process
    assert not (held_out_mask("pi-learn-02", len(x), 0.1) == held).all()           # each device its own
    lrn = learner(model)
    assert len(lrn.x) == 43 and (lrn.held_x == x[held]).all() and (lrn.x == x[~held]).all()
    net, info = torch_model_from_onnx(model_id.as_verified(model[0]))
    expected = evaluate(net, lrn.held_inputs(info.mean, info.std), y[held])
    first = run(lrn, model, 1).evaluation
    assert first == {"accuracy": expected.accuracy, "loss": pytest.approx(expected.loss, rel=1e-5), "samples": 5}
    # the same model again after a round of training: the same figures, so it was evaluated before training
    assert run(lrn, model, 2).evaluation["loss"] == pytest.approx(first["loss"], rel=1e-5)


def test_without_a_holdout_a_device_trains_on_everything_and_reports_no_evaluation(model):
    out = run(learner(model, holdout=0.0), model)
    assert out.evaluation is None and decode(out.payload).num_samples == 48
    with pytest.raises(PqsuError, match="holdout"):
        learner(model, holdout=1.0)


def test_fedprox_holds_the_update_near_the_received_model(model):
    def delta_norm(**kw) -> float:
        out = run(learner(model, "always", "fp32", False), model, **kw)
        return float(np.sqrt(sum((b.dequantize() ** 2).sum() for b in decode(out.payload).blocks)))
    plain, prox = delta_norm(), delta_norm(prox=10.0)
    assert prox < 0.8 * plain, (plain, prox)


def test_the_agent_settings_default_holdout_is_the_learners():
    from pqsu.edge.learner import HOLDOUT
    from pqsu.edge.settings import AgentSettings

    assert AgentSettings().eval_holdout == HOLDOUT
    assert any("eval_holdout" in msg for msg in AgentSettings(eval_holdout=1.0).problems(trains=True))
