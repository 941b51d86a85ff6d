"""A broker shared by many jobs, against a real Mosquitto and real `pqsu cloud` / `pqsu edge run` processes:
a second job on the same fleet, a second coordinator on a live fleet, a broker's packet limit on MQTT 5
and on 3.1.1, and an agent whose wall clock is hours off. Every wait is bounded; every process the lab
starts is stopped by its lab (by pid and process group)."""
from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest

from pqsu.protocol.messages import Lease
from pqsu.protocol.mqtt import MqttClient
from pqsu.protocol.topics import Topics
from pqsu.tools.lab.broker import Mosquitto, mosquitto_path
from pqsu.tools.lab.fleet_lab import CLI, TINY, Lab, flags, pqsu, read_metrics, write_shards
from pqsu.tools.lab.observer import wait_until
from pqsu.protocol.process import Process, pqsu_env, reap

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    mosquitto_path() is None or not Path("/usr/share/datasets/fashion-mnist").is_dir(),
    reason="needs mosquitto and the Fashion-MNIST package")]
FLEET = "shared"
ROUNDS_HELD = 40  # the first job's rounds in the second-coordinator test: it must outlast the second's start


def _exit(proc: Process, timeout_s: float, lab: Lab | None = None) -> int:
    code = proc.wait(timeout_s)
    assert code is not None, f"{proc.name} still running after {timeout_s:.0f}s\n" + (lab.tails() if lab else proc.tail())
    return code


def _retained(url: str, topic_filter: str, wait_s: float = 1.5) -> dict[str, bytes]:
    """The retained messages under a filter, as a device connecting now would get them."""
    seen: dict[str, bytes] = {}
    with MqttClient(url, "pqsu-test-retained", persistent_session=False) as c:
        c.subscribe(topic_filter, lambda t, p, r: seen.__setitem__(t, p) if r and p else None)
        time.sleep(wait_s)
    return seen


def test_a_second_job_on_the_same_broker_and_fleet_completes(tmp_path):
    """The same boards (same state folders) through two jobs: the second job's agents start while the first
    job's `done` is still retained, and train its rounds from round 1 again."""
    with Lab(tmp_path, FLEET) as lab:
        shards = write_shards(tmp_path / "devices", 2)
        first, _ = lab.start_fleet(tmp_path / "job1", shards, rounds=1)
        assert _exit(first, 240, lab) == 0, lab.tails()
        second, _ = lab.start_fleet(tmp_path / "job2", shards, rounds=2)
        assert _exit(second, 240, lab) == 0, lab.tails()
        one, two = read_metrics(tmp_path / "job1"), read_metrics(tmp_path / "job2")
        assert [(m["round"], m["uploads"]) for m in two] == [(1, 2), (2, 2)]
        assert one[0]["job"] != two[0]["job"] and {m["job"] for m in two} == {two[0]["job"]}
        frames = _retained(lab.broker.url, Topics(FLEET).model_filter)
        model_bytes = two[-1]["model_bytes"]
        assert len(frames) == -(-model_bytes // (128 * 1024 - 69))  # no frame of the first job's model is left
        assert _retained(lab.broker.url, Topics(FLEET).lease) == {}  # both ended cleanly: the fleet is free


def test_a_second_coordinator_refuses_within_seconds_and_the_first_is_undisturbed(tmp_path):
    with Lab(tmp_path, FLEET) as lab:
        shards = write_shards(tmp_path / "devices", 2)
        # Rounds between keyframes take milliseconds to prepare: enough of them that the first job is still
        # holding the fleet while the second coordinator's interpreter starts and checks (12 rounds were
        # over in about 7 s once patches decoded faster, and on a loaded machine that lost the race).
        first, _ = lab.start_fleet(tmp_path / "job1", shards, rounds=ROUNDS_HELD)
        assert wait_until(lambda: _retained(lab.broker.url, Topics(FLEET).lease, 0.5), 120), lab.tails()
        holder = Lease.from_json(next(iter(_retained(lab.broker.url, Topics(FLEET).lease).values())))
        t0 = time.monotonic()
        second = lab.start(["cloud", "--broker", lab.broker.url, "--fleet", FLEET, "--out", str(tmp_path / "job2")]
                           + flags(clients=2, rounds=1, **TINY), "cloud2")
        assert _exit(second, 30, lab) == 2
        took = time.monotonic() - t0
        assert took < 15, f"the second coordinator took {took:.1f}s to refuse"  # interpreter start included
        assert f"driven by another coordinator: {holder.coordinator}" in second.output
        assert not (tmp_path / "job2" / "checkpoints").exists()  # refused before any work
        assert _exit(first, 300, lab) == 0, lab.tails()
        metrics = read_metrics(tmp_path / "job1")
        assert [(m["uploads"], m["rejected"]) for m in metrics] == [(2, {})] * ROUNDS_HELD
        assert "disconnected" not in first.output  # nobody kicked it off the broker


def test_an_mqtt5_broker_with_a_64k_packet_limit_gets_frames_that_fit(tmp_path):
    with Mosquitto(tmp_path / "broker", extra_config="max_packet_size 65536") as broker:
        run = pqsu(["run", "--broker", broker.url, "--fleet", FLEET, "--out", str(tmp_path / "run")]
                   + flags(clients=2, rounds=1, **TINY), tmp_path / "logs", "run")
        try:
            assert _exit(run, 300) == 0, run.tail(30)
        finally:
            reap([run], grace_s=5, signal_first=True)
        assert read_metrics(tmp_path / "run")[0]["uploads"] == 2
        assert read_metrics(tmp_path / "run")[0]["model_bytes"] > 65536  # it really needed smaller frames
        assert "allows packets of at most 65536 bytes" in (tmp_path / "run" / "logs" / "cloud.log").read_text()


def test_an_mqtt311_broker_that_drops_large_messages_is_named_before_any_work(tmp_path):
    with Mosquitto(tmp_path / "broker", extra_config="message_size_limit 4096") as broker:
        cloud = pqsu(["cloud", "--broker", broker.url, "--fleet", FLEET, "--protocol", "3.1.1",
                      "--out", str(tmp_path / "out")] + flags(clients=2, rounds=1, **TINY),
                     tmp_path / "logs", "cloud", split_stderr=True)
        try:
            assert _exit(cloud, 60) == 2
        finally:
            reap([cloud], grace_s=5, signal_first=True)
        errors = [line for line in cloud.stderr.splitlines() if line.startswith("pqsu cloud: error:")]
        assert len(errors) == 1 and "did not pass a 131,072-byte message" in errors[0] and "use --chunk-limit 40" in errors[0]
        assert cloud.stderr.strip().splitlines()[-1] == errors[0]
        assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.skipif(shutil.which("faketime") is None, reason="needs libfaketime (Debian package faketime)")
def test_an_agent_whose_wall_clock_is_three_hours_ahead_joins_every_round(tmp_path):
    """A board without a real-time clock: its wall clock is off, its monotonic clock is right. The deadline
    it gets is the time remaining, so it trains every round; the coordinator's absolute deadline would have
    looked three hours past to it."""
    with Lab(tmp_path, FLEET) as lab:
        shards = write_shards(tmp_path / "devices", 2)
        cloud = lab.cloud(tmp_path / "out", rounds=2, clients=2, min_devices=2, round_timeout=120)
        lab.agent("dev-000", shards[0])
        ahead = Process(["faketime", "-f", "+3h"] + CLI + ["edge", "run", "--broker", lab.broker.url, "--fleet", FLEET,
                                                           "--device-id", "dev-001", "--data", str(shards[1]),
                                                           "--state-dir", str(shards[1].parent), "--no-http"],
                        lab.logs / "dev-001.log", env={**pqsu_env(1), "PYTHONUNBUFFERED": "1",
                                                       "FAKETIME_DONT_FAKE_MONOTONIC": "1"})
        lab.procs.append(ahead)
        assert _exit(cloud, 300, lab) == 0, lab.tails()
        assert [m["uploads"] for m in read_metrics(tmp_path / "out")] == [2, 2]
        # its log lines carry its own wall clock: three hours ahead of ours
        stamps = re.findall(r"^(\d\d):(\d\d):\d\d ", ahead.output, re.M)
        assert stamps, ahead.tail()
        hour = int(stamps[0][0])
        assert (hour - time.gmtime().tm_hour) % 24 in (2, 3, 4)
