"""A fleet of 10,000-100,000 devices in one process: their updates, over a few MQTT connections.

Each device is only its update here (no training, no status): `FleetUpdates` pre-encodes K
distinct sparse int8 updates of the model and splices each device's own header (its id, the
round, the model id, its sample count) in front of one of them, with a fresh CRC, so every
device's payload is a distinct, valid update that costs microseconds to make and nothing to
keep. `LoadGenerator` publishes them as real devices would (chunk framing, QoS 1, on
`update/<p>/<device>` when the round has partitions), spread over `connections` clients, with a
window of unacknowledged messages per connection.

Because the bodies repeat every K devices, the exact FedAvg of a round is known cheaply
(`expected_fedavg`), which is how `pqsu bench scale` checks a 100,000-device round.
"""
from __future__ import annotations

import collections
import math
import threading
import time
import zlib
from dataclasses import dataclass

import numpy as np

from pqsu.protocol import chunking, codec
from pqsu.protocol.codec import TensorBlock, Update
from pqsu.protocol.mqtt import MqttClient
from pqsu.protocol.topics import Topics


def device_ids(n: int, prefix: str = "rpi4") -> list[str]:
    """Realistic ids: board, site, serial (e.g. rpi4-s017-00a3f1), sorted as a coordinator sorts them."""
    return sorted(f"{prefix}-s{i % 997:03d}-{i:06x}" for i in range(n))


@dataclass
class FleetUpdates:
    shapes: dict[str, tuple[int, ...]]
    round: int
    model_id: str
    density: float = 0.01
    templates: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        self.bodies, self.blocks = [], []  # sparse blocks, not dense tensors: O(templates x nnz) memory
        for _ in range(self.templates):
            blocks = []
            for name, shape in self.shapes.items():
                numel = math.prod(shape)
                idx = np.unique(rng.integers(0, numel, max(1, int(numel * self.density))))
                blocks.append(TensorBlock.sparse(name, shape, idx, rng.normal(0, 1e-3, idx.size)))
            payload = codec.encode(Update(self.round, "x", self.model_id, 1, 0.5, tuple(blocks)))
            _, start = codec._read_header(payload)
            self.bodies.append(payload[start:-codec._CRC_BYTES])  # the blocks, after the tensor count
            self.blocks.append(blocks)
        self.count = len(self.shapes)

    def samples(self, i: int) -> int:
        return 20 + (i * 7919) % 480  # deterministic, varied: FedAvg weights differ per device

    def payload(self, i: int, device: str) -> bytes:
        dev, model = device.encode(), self.model_id.encode()
        head = codec._HEAD.pack(codec.MAGIC, codec.FORMAT_VERSION, codec.MSG_UPDATE, 0, self.round,
                                self.samples(i), 0.5)
        msg = b"".join([head, bytes([len(dev)]), dev, bytes([len(model)]), model,
                        codec._U32.pack(self.count), self.bodies[i % self.templates]])
        return msg + codec._U32.pack(zlib.crc32(msg))

    def expected_fedavg(self, n: int) -> dict[str, np.ndarray]:
        """The FedAvg of devices 0..n-1 (float64), from the templates and the per-device weights."""
        weights = np.zeros(self.templates)
        np.add.at(weights, np.arange(n) % self.templates, [self.samples(i) for i in range(n)])
        return self.weighted_mean(weights)

    def weighted_mean(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        """sum_j weights[j] x template j / sum(weights), in float64."""
        out = {k: np.zeros(s, np.float64) for k, s in self.shapes.items()}
        for w, blocks in zip(weights, self.blocks):
            for b in blocks:
                if w:
                    out[b.name].reshape(-1)[b.indices] += w * (b.q.astype(np.float64) * float(b.scale[0]))
        total = float(np.sum(weights))
        return {k: v / total for k, v in out.items()}


class LoadGenerator:
    """Publishes (device, payload) pairs over `connections` MQTT clients, at most `window` unacknowledged
    publishes each; `play` returns the updates sent and the seconds it took."""

    def __init__(self, broker: str, fleet: str, *, connections: int = 4, chunk_limit: int = 128 * 1024,
                 window: int = 512, name: str = "loadgen"):
        self.topics, self.chunk_limit, self.window = Topics(fleet), chunk_limit, window
        self.clients = [MqttClient(broker, f"pqsu-{name}-{i}", persistent_session=False) for i in range(connections)]

    def __enter__(self) -> "LoadGenerator":
        for c in self.clients:
            c.connect(timeout_s=30)
        return self

    def __exit__(self, *exc) -> None:
        for c in self.clients:
            c.close()

    def play(self, devices: list[str], payload_of, partitions: int = 0) -> dict:
        """Send `payload_of(i, device)` for every device, device i on connection i % connections."""
        errors: list[BaseException] = []
        t0 = time.perf_counter()

        def send(k: int) -> None:
            client, pending = self.clients[k], collections.deque()
            try:
                for i in range(k, len(devices), len(self.clients)):
                    topic = self.topics.update(devices[i], partitions)
                    for frame in chunking.split(payload_of(i, devices[i]), self.chunk_limit):
                        pending.append(client._send(topic, frame, 1, False, 30.0, None))
                    while len(pending) > self.window:
                        client._wait([pending.popleft()], topic, 30.0)
                client._wait(list(pending), topic, 30.0)
            except BaseException as exc:  # reported by play(), not lost on a thread
                errors.append(exc)
        threads = [threading.Thread(target=send, args=(k,), daemon=True) for k in range(len(self.clients))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return {"updates": len(devices), "seconds": time.perf_counter() - t0}
