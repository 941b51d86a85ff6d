"""The board's model path: a received file is hashed once and parsed once by onnx.

The agent verifies a model on arrival; the session it serves with and the learner it trains
with get that verified file and do not hash it again; the bridge reads the metadata and the
weights from one parse. A file that does not verify is counted and never served.
"""
from __future__ import annotations

import onnx
import pytest

from pqsu.edge.agent import AgentConfig, EdgeAgent
from pqsu.edge.inference import InferenceModel
from pqsu.edge.learner import EdgeLearner
from pqsu.edge.selective import SelectivePolicy
from pqsu.export import bridge
from pqsu.protocol import model_id
from pqsu.protocol.messages import RoundTask
from tests.support.edge_models import int8_models

pytestmark = pytest.mark.usefixtures("one_torch_thread")

class NoBroker:
    """The agent's client, never connected: these tests feed the model as the network thread would."""

    connected = False
    handler_errors = 0

@pytest.fixture(scope="module")
def models():
    return int8_models()

@pytest.fixture
def counters(monkeypatch) -> dict[str, int]:
    counts = {"hash": 0, "parse": 0}
    digest, load = model_id._digest, onnx.load_from_string

    def counting_digest(data, slot):
        counts["hash"] += 1
        return digest(data, slot)

    def counting_load(*args, **kwargs):
        counts["parse"] += 1
        return load(*args, **kwargs)
    monkeypatch.setattr(model_id, "_digest", counting_digest)
    monkeypatch.setattr(bridge.onnx, "load_from_string", counting_load)
    return counts

def test_a_received_model_is_hashed_once_and_parsed_once(models, counters, tmp_path):
    agent = EdgeAgent(AgentConfig("mqtt://unused", "dev-a", state_dir=str(tmp_path)), client=NoBroker())
    data = models.a.read_bytes()
    agent.fetch.take_full(data, len(data), agent.model)  # a full model, reassembled from its frames
    assert counters == {"hash": 1, "parse": 0}
    assert agent.model.model_id == model_id.verify(data) and (tmp_path / "model.onnx").read_bytes() == data
    counters["hash"] = 0

    learner = EdgeLearner("dev-a", models.x_test, models.y_test, SelectivePolicy.from_spec("always", "topk:0.05"))
    task = RoundTask(round=1, model_id=agent.model.model_id, epochs=0.5, batch_size=16)
    outcome = learner.run_round(task, agent.model.file)
    assert outcome.payload is not None
    assert counters == {"hash": 0, "parse": 1}  # nothing hashed again; the bridge parsed the proto once

def test_the_simulators_bytes_are_verified_once_by_the_learner(models, counters):
    data = models.b.read_bytes()
    learner = EdgeLearner("dev-b", models.x_test, models.y_test, SelectivePolicy.from_spec("always", "topk:0.05"))
    learner.run_round(RoundTask(round=1, model_id=model_id.verify(data), epochs=0.5, batch_size=16), data)
    assert counters == {"hash": 2, "parse": 1}  # one in the test's own verify, one in the learner

def test_a_model_that_does_not_verify_is_not_served(models, tmp_path):
    agent = EdgeAgent(AgentConfig("mqtt://unused", "dev-a", state_dir=str(tmp_path)), client=NoBroker())
    agent.fetch.take_full(models.a.read_bytes(), models.a.stat().st_size, agent.model)
    served = agent.model
    altered = bytearray(models.b.read_bytes())
    altered[len(altered) // 2] ^= 0xFF
    agent.fetch.take_full(bytes(altered), len(altered), agent.model)
    assert agent.model is served and agent.bad_messages == 1
    assert (tmp_path / "model.onnx").read_bytes() == models.a.read_bytes()

def test_a_saved_model_serves_after_a_restart(models, tmp_path):
    (tmp_path / "model.onnx").write_bytes(models.a.read_bytes())
    agent = EdgeAgent(AgentConfig("mqtt://unused", "dev-a", state_dir=str(tmp_path)), client=NoBroker())
    x = models.x_test[:16]
    expected = InferenceModel(models.a.read_bytes()).classify(x).predictions
    assert agent.model.classify(x).predictions == expected
    assert agent.model.file.data == models.a.read_bytes()
