"""Aggregator workers against a real Mosquitto: partials reduce to what one process aggregates, a
duplicate that reaches another worker counts once, a killed worker loses only what it had not handed
over (counted as worker-lost) and the round closes without it."""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pqsu.cloud.aggregate import FedAvg
from pqsu.cloud.intake import Round, RoundIntake, limits_for
from pqsu.cloud.workers import AggregatorWorker, WorkerConfig, WorkerPool, check_workers_aggregator
from pqsu.protocol.messages import RoundTask
from pqsu.protocol.mqtt import MqttClient
from pqsu.protocol.topics import Topics, partition_of
from pqsu.tools.lab.loadgen import FleetUpdates, LoadGenerator, device_ids
from pqsu.protocol.process import Process
from tests.support.mosquitto import Mosquitto, require_mosquitto

SHAPES = {"conv.w": (16, 8, 3, 3), "conv.b": (16,), "fc.w": (10, 300), "fc.b": (10,)}
P, JOB, FLEET = 4, "20261202T000000Z-abc123", "wk"


@pytest.fixture(scope="module")
def broker():
    require_mosquitto()
    with Mosquitto() as b:
        yield b


class Harness:
    """A coordinator's WorkerPool on its own connection, workers on threads, one round open."""

    def __init__(self, url: str, fleet: str, devices: list[str], round_: int = 1):
        self.url, self.fleet, self.topics = url, fleet, Topics(fleet)
        self.client = MqttClient(url, f"coord-{fleet}")
        self.pool = WorkerPool(self.client, self.topics, JOB)
        self.pool.subscribe()
        self.client.connect()
        self.pool.publish_plan(SHAPES, partitions=P, clip_norm=None)
        self.stop, self.workers = threading.Event(), []
        self.task = RoundTask(round=round_, model_id="m1", devices=(), job=JOB, partitions=P)
        self.round, self.agg = Round(self.task, tuple(devices), 0.0), FedAvg(SHAPES)

    def worker(self, name: str, partitions, flush_s: float = 0.2) -> AggregatorWorker:
        w = AggregatorWorker(WorkerConfig(self.url, self.fleet, name, tuple(partitions), flush_s=flush_s))
        w.start()
        threading.Thread(target=w.run, args=(self.stop,), daemon=True).start()
        self.workers.append(w)
        return w

    def open(self) -> None:
        self.pool.open(self.round, self.agg)
        self.client.publish(self.topics.round, self.task.to_json(), retain=True)

    def wait_counted(self, n: int, timeout_s: float = 20.0) -> int:
        counted, deadline = 0, time.monotonic() + timeout_s
        while counted < n and time.monotonic() < deadline:
            self.pool.apply()
            counted += len(self.pool.take_counted())
            time.sleep(0.02)
        return counted

    def close(self) -> None:
        self.stop.set()
        for w in self.workers:
            w.stop()
        self.client.publish(self.topics.round, b"", retain=True)
        self.client.publish(self.topics.agg_plan, b"", retain=True)
        self.client.close()


def wait_until(cond, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.02)
    return cond()


def single_process(fleet: FleetUpdates, devices, items) -> RoundIntake:
    it = RoundIntake(SHAPES, limits_for(SHAPES))
    it.open(Round(fleet_task(), tuple(devices), 0.0))
    it.submit_many(items)
    return it


def fleet_task() -> RoundTask:
    return RoundTask(round=1, model_id="m1", job=JOB)


def test_two_workers_partials_reduce_to_the_single_process_aggregate(broker):
    devices = device_ids(240)
    fleet = FleetUpdates(SHAPES, 1, "m1", density=0.05, templates=12)
    h = Harness(broker.url, "wk1", devices)
    try:
        h.worker("w0", [0, 2])
        h.worker("w1", [1, 3])
        assert wait_until(lambda: h.pool.uncovered(P) == [])  # the coordinator sees every partition read
        h.open()
        time.sleep(0.3)  # the workers see the retained announcement
        bad = {devices[5]: b"not an update", devices[9]: fleet.payload(10, devices[10])}  # garbage; names another
        payload = lambda i, d: bad.get(d) or fleet.payload(i, d)  # noqa: E731
        with LoadGenerator(broker.url, "wk1", connections=2) as lg:
            lg.play(devices, payload, P)
        assert h.wait_counted(238) == 238
        assert h.pool.hand_over(5) == {}
        ref = single_process(fleet, devices, [(payload(i, d), d) for i, d in enumerate(devices)])
        assert (h.agg.count, h.round.uploads, h.round.bytes_up) == (238, 238, ref.round.bytes_up)
        assert dict(h.round.rejected) == dict(ref.round.rejected) == {"truncated": 1, "topic-mismatch": 1}
        got, want = h.agg.result(), ref.aggregator.result()
        worst = max(float(np.abs(got[k] - want[k]).max()) for k in SHAPES)
        assert worst <= 1e-6 * max(float(np.abs(want[k]).max()) for k in SHAPES), worst
        assert sum(w.handed["updates"] for w in h.workers) == 238
    finally:
        h.close()


def test_a_duplicate_that_reaches_another_worker_counts_once(broker):
    """Both workers read partition 0 (a partition that moved after a reconnect, or a misconfiguration):
    every update of it reaches both, and the coordinator grants each device once."""
    devices = [d for d in device_ids(400) if partition_of(d, P) == 0][:60]
    fleet = FleetUpdates(SHAPES, 1, "m1", density=0.05, templates=8)
    h = Harness(broker.url, "wk2", devices)
    try:
        h.worker("w0", [0, 1])
        h.worker("w1", [0, 2, 3])
        time.sleep(0.3)
        h.open()
        time.sleep(0.3)
        with LoadGenerator(broker.url, "wk2", connections=1) as lg:
            lg.play(devices, fleet.payload, P)
            lg.play(devices[:10], fleet.payload, P)  # and ten resent after a "reconnect"
        assert h.wait_counted(60) == 60
        h.pool.hand_over(5)
        assert h.agg.count == h.round.uploads == 60
        # Each device's copy on the other worker is refused at claim time; a byte-identical resend is dropped
        # by each worker's reassembler (same message id, already delivered), as by a single coordinator's.
        assert h.round.rejected["duplicate"] == 60
        want = fleet.expected_fedavg(60)
        got = h.agg.result()
        assert max(float(np.abs(got[k] - want[k]).max()) for k in SHAPES) <= 1e-6 * max(
            float(np.abs(want[k]).max()) for k in SHAPES)
    finally:
        h.close()


def test_a_killed_worker_loses_only_what_it_had_not_handed_over(broker, tmp_path: Path):
    devices = device_ids(200)
    mine = [i for i, d in enumerate(devices) if partition_of(d, P) in (1, 3)]
    theirs = [i for i, d in enumerate(devices) if partition_of(d, P) in (0, 2)]
    fleet = FleetUpdates(SHAPES, 1, "m1", density=0.05, templates=10)
    h = Harness(broker.url, "wk3", devices)
    # The victim: a real `pqsu aggregator` process that hands over only every 60 s, killed with SIGKILL.
    victim = Process([sys.executable, "-m", "pqsu.tools.cli", "aggregator", "--broker", broker.url, "--fleet", "wk3",
                      "--worker", "victim", "--partitions", "0,2", "--flush", "60"], tmp_path / "victim.log")
    try:
        h.worker("w1", [1, 3])
        assert wait_until(lambda: h.pool.status.get("victim", {}).get("state") == "online", 20), victim.tail()
        h.open()
        time.sleep(0.5)
        with LoadGenerator(broker.url, "wk3", connections=2) as lg:
            lg.play(devices, fleet.payload, P)
        assert h.wait_counted(len(devices)) == len(devices), victim.tail()
        victim.kill()  # granted everything it read, handed nothing over
        assert wait_until(lambda: h.pool.status["victim"]["state"] == "offline", 10)  # its last will
        t0 = time.monotonic()
        lost = h.pool.hand_over(timeout_s=5)
        assert time.monotonic() - t0 < 4  # it does not wait for a dead worker
        assert lost == {"victim": len(theirs)} and h.round.rejected["worker-lost"] == len(theirs)
        assert h.agg.count == h.round.uploads == len(mine)  # nothing counted twice, nothing of the victim's
        weights = np.zeros(fleet.templates)
        np.add.at(weights, np.array(mine) % fleet.templates, [fleet.samples(i) for i in mine])
        want = fleet.weighted_mean(weights)
        got = h.agg.result()
        assert max(float(np.abs(got[k] - want[k]).max()) for k in SHAPES) <= 1e-6 * max(
            float(np.abs(want[k]).max()) for k in SHAPES)
    finally:
        victim.stop(grace_s=2)
        h.close()


@pytest.mark.parametrize("spec, clip", [("median", None), ("trimmed:0.1", None), ("fedavg", "median:2")])
def test_robust_aggregators_refuse_several_workers_in_one_line(spec, clip):
    with pytest.raises(Exception) as exc:
        check_workers_aggregator(spec, clip)
    assert "\n" not in str(exc.value) and "fedavg" in str(exc.value)
    check_workers_aggregator("fedavg", 5.0)
