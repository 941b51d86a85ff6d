"""edge/agent.py: how the agent decides to train, skip or ignore a round, with the broker and the
learner faked. A fake MQTT client hands the agent its messages through the callbacks it
subscribed (as the network thread does) and records what the agent publishes; a fake learner
records the rounds it is asked to run and answers with a payload or a skip. The model is a real
int8 file (tests/support/edge_models.py), so the agent verifies and loads it as on a board.

What an operator would check: a round is trained once the device holds both the task and its
model; a round for other devices, an expired one, or one already answered is not trained again
(a re-announced one re-sends the saved update); a skip publishes a `skipped` status and nothing on
the update topic; a failure publishes `failed`; `done` ends a training agent."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
from tests.support.edge_models import int8_models

from pqsu.edge.agent import AgentConfig, EdgeAgent
from pqsu.edge.learner import RoundOutcome
from pqsu.edge.state import DeviceState
from pqsu.protocol import chunking, model_id
from pqsu.protocol.errors import PqsuError
from pqsu.protocol.messages import RoundTask, Status, done_message
from pqsu.protocol.topics import Topics

DEVICE, FLEET = "pi-agent-01", "agents"
TOPICS = Topics(FLEET)
WAIT_S = 20.0


@pytest.fixture(scope="module")
def model() -> tuple[bytes, str]:
    data = int8_models().a.read_bytes()
    return data, model_id.verify(data)


class FakeClient:
    """The part of MqttClient the agent uses; publishes are recorded, messages delivered by the test."""

    def __init__(self):
        self.handlers: dict[str, object] = {}
        self.published: list[tuple[str, bytes]] = []
        self.connected = False
        self.handler_errors = 0
        self.lock = threading.Lock()

    def connect(self, timeout_s: float = 30.0) -> None:
        self.connected = True

    def close(self) -> None:
        self.connected = False

    def subscribe(self, topic_filter, handler, qos=1, **_):
        self.handlers[topic_filter] = handler

    def unsubscribe(self, topic_filter) -> None:
        self.handlers.pop(topic_filter, None)

    def publish(self, topic, payload, qos=1, retain=False, **_):
        with self.lock:
            self.published.append((topic, bytes(payload)))

    def publish_chunked(self, topic, payload, limit, retain=False, **_):
        self.publish(topic, payload)

    # -- the test's side -------------------------------------------------------------------
    def deliver(self, topic_filter: str, topic: str, payload: bytes) -> None:
        wait_for(lambda: topic_filter in self.handlers, "the agent's subscription")
        self.handlers[topic_filter](topic, payload, True)

    def send_round(self, payload: bytes) -> None:
        self.deliver(TOPICS.round, TOPICS.round, payload)

    def send_model(self, data: bytes) -> None:
        for i, frame in enumerate(chunking.split(data, 32 * 1024, message_id=bytes.fromhex(model_id.verify(data)))):
            self.deliver(TOPICS.model_filter, TOPICS.model_chunk(i), frame)

    def statuses(self) -> list[Status]:
        with self.lock:
            return [Status.from_json(p) for t, p in self.published if t == TOPICS.status(DEVICE)]

    def updates(self) -> list[bytes]:
        with self.lock:
            return [p for t, p in self.published if t == TOPICS.update(DEVICE)]


@dataclass
class FakeLearner:
    """Answers each round with `payload` (None: a skip) or raises `error`; commits like EdgeLearner."""

    payload: bytes | None = b"update"
    error: Exception | None = None
    state: DeviceState = field(default_factory=DeviceState)
    rounds: list[int] = field(default_factory=list)
    saved: list[int] = field(default_factory=list)

    def run_round(self, task: RoundTask, model_bytes: bytes, downloaded: int | None = None) -> RoundOutcome:
        self.rounds.append(task.round)
        if self.error is not None:
            raise self.error
        self.state.last_round = task.round
        return RoundOutcome(task.round, self.payload, "policy says skip" if self.payload is None else "always",
                            0.5, 10, 0.01, 0 if self.payload is None else 3)

    def save(self) -> None:
        self.saved.append(self.state.last_round)


def wait_for(predicate, what: str, timeout_s: float = WAIT_S):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")


class Running:
    """An agent running on a thread with a fake client, stopped (and checked stopped) on exit."""

    def __init__(self, tmp_path, learner=None):
        self.client, self.learner = FakeClient(), learner
        cfg = AgentConfig("mqtt://127.0.0.1:1", DEVICE, fleet=FLEET, state_dir=str(tmp_path / "device"))
        self.agent = EdgeAgent(cfg, learner, client=self.client)
        self.stop = threading.Event()
        self.result: list[int] = []
        self.thread = threading.Thread(target=lambda: self.result.append(self.agent.run(self.stop)), daemon=True)

    def __enter__(self) -> "Running":
        self.thread.start()
        wait_for(lambda: any(s.state == "online" for s in self.client.statuses()), "status online")
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=WAIT_S)
        assert not self.thread.is_alive(), "the agent did not stop"

    def state_of(self, round_: int) -> list[str]:
        return [s.state for s in self.client.statuses() if s.round == round_]

    def settle(self) -> None:
        """Give the agent's loop time to act on what it was sent (it polls its queue every 0.2 s)."""
        time.sleep(0.6)


def task(model, round_=1, **kw) -> bytes:
    return RoundTask(round=round_, model_id=model[1], model_bytes=len(model[0]), **kw).to_json()


def test_a_round_is_trained_once_both_task_and_model_are_there(tmp_path, model):
    learner = FakeLearner()
    with Running(tmp_path, learner) as run:
        run.client.send_round(task(model, 1))
        run.settle()
        assert learner.rounds == []  # the task alone: waiting for its model
        run.client.send_model(model[0])
        wait_for(lambda: "uploaded" in run.state_of(1), "status uploaded")
        assert learner.rounds == [1] and learner.saved == [1]
        assert run.client.updates() == [b"update"]
        assert run.state_of(1)[:2] == ["training", "uploaded"]
        assert (tmp_path / "device" / "outbox-000001.bin").read_bytes() == b"update"  # kept until a later round
        assert (tmp_path / "device" / "model.onnx").read_bytes() == model[0]


def test_rounds_for_others_expired_rounds_and_bad_messages_are_not_trained(tmp_path, model):
    learner = FakeLearner()
    with Running(tmp_path, learner) as run:
        run.client.send_model(model[0])
        run.client.send_round(task(model, 1, devices=("pi-other",)))
        run.client.send_round(task(model, 2, deadline=time.time() - 60, remaining_s=0.0))
        run.client.send_round(b"{not json")
        run.settle()
        assert learner.rounds == [] and run.client.updates() == []
        assert run.agent.metrics()["bad_messages"] == 1
        run.client.send_round(task(model, 3, devices=(DEVICE, "pi-other")))
        wait_for(lambda: "uploaded" in run.state_of(3), "round 3 uploaded")
        assert learner.rounds == [3]


def test_a_round_already_answered_is_not_trained_again_but_its_update_is_resent(tmp_path, model):
    learner = FakeLearner()
    with Running(tmp_path, learner) as run:
        run.client.send_model(model[0])
        run.client.send_round(task(model, 1))
        wait_for(lambda: "uploaded" in run.state_of(1), "round 1 uploaded")
        run.client.send_round(task(model, 1))  # the retained announcement again (a reconnect)
        wait_for(lambda: len(run.client.updates()) == 2, "the update sent again")
        assert learner.rounds == [1] and run.client.updates() == [b"update", b"update"]
        learner.state.last_round = 5  # answered long ago: nothing saved to send again
        run.client.send_round(task(model, 4))
        run.settle()
        assert learner.rounds == [1] and len(run.client.updates()) == 2


def test_a_new_round_clears_older_outboxes(tmp_path, model):
    learner = FakeLearner()
    with Running(tmp_path, learner) as run:
        run.client.send_model(model[0])
        for r in (1, 2):
            run.client.send_round(task(model, r))
            wait_for(lambda: "uploaded" in run.state_of(r), f"round {r} uploaded")
        assert sorted(p.name for p in (tmp_path / "device").glob("outbox-*.bin")) == ["outbox-000002.bin"]


def test_a_skip_sends_no_update_and_says_why(tmp_path, model):
    learner = FakeLearner(payload=None)
    with Running(tmp_path, learner) as run:
        run.client.send_model(model[0])
        run.client.send_round(task(model, 1))
        wait_for(lambda: "skipped" in run.state_of(1), "status skipped")
        skipped = [s for s in run.client.statuses() if s.state == "skipped"][0]
        assert skipped.detail == "policy says skip" and skipped.trains is True
        assert run.client.updates() == [] and learner.saved == [1]  # the residual is still committed
        assert list((tmp_path / "device").glob("outbox-*.bin")) == []


def test_a_failed_round_is_reported_and_not_committed(tmp_path, model):
    learner = FakeLearner(error=PqsuError("local images are (3, 28, 28), the model takes (1, 28, 28)"))
    with Running(tmp_path, learner) as run:
        run.client.send_model(model[0])
        run.client.send_round(task(model, 1))
        wait_for(lambda: "failed" in run.state_of(1), "status failed")
        failed = [s for s in run.client.statuses() if s.state == "failed"][0]
        assert "local images are" in failed.detail
        assert learner.saved == [] and run.client.updates() == [] and run.agent.rounds_joined == 0


def test_done_ends_a_training_agent_and_not_an_inference_only_one(tmp_path, model):
    with Running(tmp_path / "a", FakeLearner()) as run:
        run.client.send_round(done_message(3, model[1]))
        run.thread.join(timeout=WAIT_S)
        assert not run.thread.is_alive() and run.result == [0]
        assert run.client.statuses()[-1].state == "offline"
    with Running(tmp_path / "b", None) as run:
        run.client.send_model(model[0])
        run.client.send_round(task(model, 1))
        run.client.send_round(done_message(1, model[1]))
        run.settle()
        assert run.thread.is_alive()  # it keeps serving the final model
        assert run.agent.model is not None and run.agent.model.model_id == model[1]
        assert all(s.trains is False for s in run.client.statuses()) and run.client.updates() == []


def test_an_update_written_before_a_crash_is_sent_at_start(tmp_path, model):
    folder = tmp_path / "device"
    folder.mkdir()
    (folder / "outbox-000002.bin").write_bytes(b"from before the crash")
    (folder / "outbox-000001.bin").write_bytes(b"committed already")
    learner = FakeLearner()
    learner.state.last_round = 1
    with Running(tmp_path, learner) as run:
        wait_for(lambda: run.client.updates(), "the outbox flushed")
        assert run.client.updates() == [b"from before the crash"]


# -- jobs on a shared broker, and a board without a real-time clock ------------------------------

def test_an_earlier_jobs_done_does_not_stop_an_agent_that_came_for_the_next(tmp_path, model):
    learner = FakeLearner()
    learner.state.job = "job-a"  # this board even trained in job a, before it was restarted
    with Running(tmp_path, learner) as run:
        run.client.send_model(model[0])
        run.client.send_round(done_message(7, model[1], job="job-a"))  # retained from the job before
        run.settle()
        assert run.thread.is_alive()
        run.client.send_round(b"")  # the new coordinator clears the old retained announcement
        run.client.send_round(task(model, 1, job="job-b", remaining_s=60.0))
        wait_for(lambda: "uploaded" in run.state_of(1), "job b's round 1 uploaded")
        assert learner.state.job == "job-b"
        assert [s.job for s in run.client.statuses() if s.round == 1] == ["job-b", "job-b"]
        run.client.send_round(done_message(1, model[1], job="job-b"))  # its own job's end stops it
        run.thread.join(timeout=WAIT_S)
        assert not run.thread.is_alive()


def test_a_new_job_starts_its_rounds_afresh(tmp_path, model):
    """Round numbers start at 1 in every job: a device that did round 5 of job a trains round 1 of job b,
    with the old job's residual and outbox gone."""
    learner = FakeLearner()
    learner.state.job, learner.state.last_round = "job-a", 5
    learner.state.residual = {"w": np.ones(3, dtype=np.float32)}
    (tmp_path / "device").mkdir()
    (tmp_path / "device" / "outbox-000005.bin").write_bytes(b"job a's round 5")
    with Running(tmp_path, learner) as run:
        run.client.send_model(model[0])
        run.client.send_round(task(model, 1, job="job-b", remaining_s=60.0))
        wait_for(lambda: "uploaded" in run.state_of(1), "job b's round 1 uploaded")
        assert learner.rounds == [1] and learner.state.residual == {}
        assert sorted(p.name for p in (tmp_path / "device").glob("outbox-*.bin")) == ["outbox-000001.bin"]


def test_deadlines_follow_the_devices_own_clock_not_its_wall_clock(tmp_path, model, monkeypatch):
    """A board whose wall clock is 3 hours ahead: the coordinator's absolute deadline looks long past, but
    the time remaining at publish, counted on the board's monotonic clock, says the round is open."""
    learner = FakeLearner()
    real_time = time.time
    with Running(tmp_path, learner) as run:
        monkeypatch.setattr("pqsu.edge.agent.time.time", lambda: real_time() + 3 * 3600)
        run.client.send_model(model[0])
        run.client.send_round(task(model, 1, job="j", deadline=real_time() + 60, remaining_s=60.0))
        wait_for(lambda: "uploaded" in run.state_of(1), "round 1 uploaded")
        run.client.send_round(task(model, 2, job="j", deadline=real_time() + 3600, remaining_s=0.0))  # closed
        run.settle()
        assert learner.rounds == [1]


def test_a_model_seen_before_is_taken_again_when_it_comes_back(tmp_path, model):
    """A, B, then A again (two jobs that start from the same seed): the last one is served. Each is
    announced first: a device subscribes to the full model only while it fetches one."""
    other = int8_models().b.read_bytes()
    with Running(tmp_path, None) as run:
        for i, data in enumerate((model[0], other, model[0])):
            if i:
                run.client.send_round(task((data, model_id.verify(data)), i))
            run.client.send_model(data)
            wait_for(lambda: run.agent.model is not None and run.agent.model.model_id == model_id.verify(data),
                     "the model swapped in")
        assert run.agent.models_received == 3
