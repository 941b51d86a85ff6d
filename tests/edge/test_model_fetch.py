"""An inference-only agent follows patches over a real Mosquitto, published as the coordinator
publishes them (`MqttTransport.publish_model`); a patch that is not the announced one, or whose
frames never all arrive, is refused, counted in the device's status, and the full model taken."""
from __future__ import annotations

import numpy as np
import pytest
from tests.edge.test_service import AgentThread, wait_for
from tests.support.edge_models import int8_models
from tests.support.mosquitto import Mosquitto, require_mosquitto

from pqsu.cloud.coordinator import CoordinatorConfig, MqttTransport
from pqsu.edge.agent import AgentConfig
from pqsu.export.requantize import QdqLayout, requantize
from pqsu.protocol import model_id
from pqsu.protocol.messages import RoundTask, Status
from pqsu.protocol.model_follow import offers_of, wire_bytes
from pqsu.protocol.mqtt import MqttClient
from pqsu.protocol.patch import make_patch

LIMIT = 32 * 1024


def next_version(data: bytes, seed: int) -> bytes:
    """`data` after a round: the dequantized weights moved, requantized in place (the coordinator's way)."""
    layout, rng = QdqLayout.of(data), np.random.default_rng(seed)
    master = {}
    for name, t in layout.tensors.items():
        w = (t.read(data).astype(np.float64) - t.zero_point) * t.scale
        if t.kind == "weight":
            w = w + rng.normal(0, 0.5, w.shape) * t.scale * (rng.random(w.shape) < 0.05)
        master[name] = w.astype(np.float32)
    return requantize(data, master, layout=layout).data


@pytest.fixture(scope="module")
def chain():
    a = int8_models().a.read_bytes()
    b = next_version(a, 1)
    c = next_version(b, 2)
    d = next_version(c, 3)
    return [model_id.verified(x) for x in (a, b, c, d)]


def test_an_inference_only_agent_follows_patches_and_falls_back_on_a_bad_one(tmp_path, chain):
    require_mosquitto()
    a, b, c, d = chain
    fleet, device = "patches", "kiosk-1"
    statuses: dict[str, Status] = {}
    with Mosquitto(tmp_path / "broker") as broker:
        client = MqttClient(broker.url, "test-coordinator", persistent_session=False)
        client.connect(timeout_s=10)
        transport = MqttTransport(CoordinatorConfig(broker=broker.url, fleet=fleet, chunk_limit=LIMIT), client=client)
        client.subscribe(transport.topics.status_filter,
                         lambda t, p, r: statuses.__setitem__(transport.topics.parse(t)[1], Status.from_json(p)))
        cfg = AgentConfig(broker.url, device, fleet=fleet, state_dir=str(tmp_path / "device"), connect_timeout_s=3,
                          max_backoff_s=1, patch_timeout_s=2.0)
        agent = AgentThread(cfg)
        try:
            def publish(r, file, patches, offers=None):
                transport.publish_model(file.data, file.model_id, patches)
                client.publish(transport.topics.round, RoundTask(
                    round=r, model_id=file.model_id, patches=offers if offers is not None else offers_of(patches),
                ).to_json(), retain=True)
                wait_for(lambda: agent.agent.model is not None and agent.agent.model.model_id == file.model_id, 20,
                         f"model of round {r} served")
                return agent.agent.fetch.follower.download_of(file.model_id)

            how = publish(1, a, {})
            assert how.kind == "full" and how.first and how.nbytes == wire_bytes(len(a), LIMIT)

            ab = make_patch(a.data, b.data)
            how = publish(2, b, {a.model_id: ab})
            assert (how.kind, how.nbytes) == ("patch", wire_bytes(len(ab), LIMIT))
            assert agent.agent.model.file.data == b.data  # applied, byte for byte
            assert (tmp_path / "device" / "model.onnx").read_bytes() == b.data

            # announced with another hash than the patch retained: refused, the full model instead
            bc = make_patch(b.data, c.data)
            wrong = [{**o, "sha256": "0" * 64} for o in offers_of({b.model_id: bc})]
            how = publish(3, c, {b.model_id: bc}, offers=tuple(wrong))
            assert how.kind == "full" and how.nbytes == wire_bytes(len(bc), LIMIT) + wire_bytes(len(c), LIMIT)
            assert agent.agent.fetch.follower.refusals == {"not-announced": 1}

            # a patch whose first frame the broker lost: incomplete after patch_timeout_s, the full model
            cd = make_patch(c.data, d.data)
            transport.publish_model(d.data, d.model_id, {c.model_id: cd})
            client.publish(transport.topics.patch_chunk(c.model_id, 0), b"", retain=True)
            how = publish(4, d, {c.model_id: cd})
            assert how.kind == "full" and agent.agent.model.file.data == d.data
            assert agent.agent.fetch.follower.refusals == {"not-announced": 1, "incomplete": 1}
            assert agent.agent.metrics()["patch_refusals"] == {"not-announced": 1, "incomplete": 1}
            assert statuses[device].trains is False
        finally:
            agent.close()
            client.close()
