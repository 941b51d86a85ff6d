"""Real messages against docs/schemas: a tiny `pqsu run` through a real Mosquitto, with an observer that
records every control message the coordinator and the agents publish (round, done, status, lease,
metrics), live and retained. Every one must validate against its schema."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from pqsu.protocol.mqtt import MqttClient
from pqsu.tools.lab.broker import Mosquitto, mosquitto_path
from tests.support.procs import Proc, flags, kill_mentioning

jsonschema = pytest.importorskip("jsonschema")
SCHEMAS = Path(__file__).resolve().parents[2] / "docs" / "schemas"
FLEET = "schemas"
RUN_TIMEOUT_S = 240.0

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(mosquitto_path() is None, reason="mosquitto is not installed"),
              pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                                 reason="dataset-fashion-mnist is not installed")]


def validate(kind: str, body: dict) -> list[str]:
    schema = json.loads((SCHEMAS / f"{kind}.schema.json").read_text())
    return [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(body)]


class Recorder:
    """Every non-empty payload on the fleet's control topics, in arrival order (thread-safe)."""

    def __init__(self):
        self.seen: list[tuple[str, dict]] = []
        self.lock = threading.Lock()

    def __call__(self, topic: str, payload: bytes, retained: bool) -> None:
        if payload:  # an empty retained payload is a deletion, not a message
            with self.lock:
                self.seen.append((topic.split("/")[2], json.loads(payload)))

    def by_topic(self, kind: str) -> list[dict]:
        with self.lock:
            return [body for topic, body in self.seen if topic == kind]


def observe(url: str, name: str) -> tuple[MqttClient, Recorder]:
    rec = Recorder()
    client = MqttClient(url, name, persistent_session=False)
    for topic in ("round", "status/+", "metrics", "lease"):
        client.subscribe(f"pqsu/{FLEET}/{topic}", rec)
    client.connect(timeout_s=10)
    return client, rec


def test_every_message_of_a_real_run_validates(tmp_path):
    with Mosquitto(tmp_path / "broker") as broker:
        live_client, live = observe(broker.url, "pqsu-test-schemas-live")
        out = tmp_path / "out"  # in every child's command line; the broker's is not (it must outlive the run)
        proc = Proc(["run", "--broker", broker.url, "--fleet", FLEET, "--out", str(out)]
                    + flags(clients=2, rounds=2, samples_per_client=100, proxy_samples=200, eval_samples=200,
                            pretrain_epochs=0.2, finetune_epochs=0), tmp_path, "pqsu-run")
        try:
            code = proc.wait(RUN_TIMEOUT_S)
        finally:
            proc.stop()
            kill_mentioning(str(out))
        assert code == 0, proc.tail()
        time.sleep(0.5)  # the last statuses in flight
        live_client.close()
        # What a late subscriber finds retained after the run.
        late_client, retained = observe(broker.url, "pqsu-test-schemas-retained")
        deadline = time.monotonic() + 10
        while not (retained.by_topic("round") and retained.by_topic("metrics")) and time.monotonic() < deadline:
            time.sleep(0.1)
        late_client.close()

    for rec in (live, retained):
        rounds = rec.by_topic("round")
        for body in rounds:
            assert body["type"] in ("round", "done"), body
            assert validate(body["type"], body) == [], body
        for body in rec.by_topic("status"):
            assert validate("status", body) == [], body
        for body in rec.by_topic("metrics"):
            assert validate("metrics", body) == [], body
        for body in rec.by_topic("lease"):
            assert validate("lease", body) == [], body
    # Live: both rounds announced, each re-published at its close, the done message, a report per round.
    announced = [b for b in live.by_topic("round") if b["type"] == "round"]
    assert sorted({b["round"] for b in announced}) == [1, 2]
    assert {"round", "done"} <= {b["type"] for b in live.by_topic("round")}
    assert [b["round"] for b in live.by_topic("metrics")] == [1, 2]
    states = {b["state"] for b in live.by_topic("status")}
    assert {"online", "training", "uploaded", "offline"} <= states, states
    assert retained.by_topic("round")[-1]["type"] == "done" and retained.by_topic("metrics")[-1]["round"] == 2
    # Jobs: once the coordinator names its job, every message of the run names the same one.
    jobs = {b["job"] for kind in ("round", "lease") for b in live.by_topic(kind) if b.get("job")}
    assert len(jobs) <= 1, jobs
    if jobs:
        job = jobs.pop()
        assert all(b.get("job") == job for b in live.by_topic("round")), live.by_topic("round")
        assert all(b.get("job") == job for b in live.by_topic("status") if b["state"] in ("training", "uploaded"))
