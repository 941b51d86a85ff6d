"""The round runner over a scripted in-memory transport: who is asked, when a round closes
(every asked device answered, the deadline, nothing more can come), what each message counts
for, the report's keys, checkpoints and resume. A fake server judges payloads (tests/support)."""
from __future__ import annotations

import dataclasses
import json
import threading
import time

import pytest

from pqsu.cloud import checkpoint
from pqsu.cloud.rounds import RoundRunner, RunnerConfig
from pqsu.cloud.server import RoundReport
from pqsu.cloud.transport import UPDATE, InProcessTransport, Message
from pqsu.protocol.errors import PqsuError
from tests.support.round_fakes import FakeServer, update

DEVICES = ["dev-a", "dev-b", "dev-c"]
REPORT_KEYS = {f.name for f in dataclasses.fields(RoundReport)} | {"missing", "collect_seconds", "server_seconds"}


class ScriptedTransport:
    """Devices as a script: `answers(round, task)` gives the messages of a round, delivered one per poll."""

    def __init__(self, devices=DEVICES, answers=None, *, quiet_when_empty=False, refused=None, backlog=(),
                 evaluated=None):
        self.devices, self.answers = list(devices), answers or (lambda r, task: [])
        self.evaluated = evaluated  # round -> {device: evaluation}, what the devices' statuses reported
        self.quiet_when_empty, self.refused = quiet_when_empty, dict(refused or {})
        self.calls: list[tuple] = []
        self.pending: list[Message] = []
        self._backlog = list(backlog)
        self.models: list[bytes] = []
        self.tasks, self.closed, self.reports = [], [], []

    def start(self):
        self.calls.append(("start",))

    def stop(self):
        self.calls.append(("stop",))

    def wait_for_devices(self, needed, wait_s, stop, admits):
        self.calls.append(("wait", needed, wait_s))
        online = [d for d in self.devices if admits(d)]
        if len(online) < needed:
            raise PqsuError(f"only {len(online)} of {needed}")
        return online

    chunk_limit = 128 * 1024

    def publish_model(self, data, model_id, patches=None):
        self.models.append(data)

    def downloads(self):
        return {}

    def evaluations(self):
        return self.evaluated(self.tasks[-1].round) if self.evaluated else {}

    def announce(self, task):
        self.tasks.append(task)
        self.pending = list(self.answers(task.round, task))

    def backlog(self):
        taken, self._backlog = self._backlog, []
        return taken

    def poll(self, timeout_s):
        if self.pending:
            return self.pending.pop(0)
        time.sleep(timeout_s)
        return None

    def quiet(self):
        return self.quiet_when_empty and not self.pending

    def close_round(self, task):
        self.closed.append(task.round)

    def take_refused(self):
        taken, self.refused = self.refused, {}
        return taken

    def round_extras(self):
        return {"scripted": True}

    def publish_report(self, report):
        self.reports.append(report)

    def finish(self, data, model_id, rounds, patches=None):
        self.calls.append(("finish", rounds))

    def state(self):
        return {"devices": {"dev-a": {"state": "online"}}}

    def summary(self):
        return {"transport": "scripted"}


def up(device, r):
    return Message(device, UPDATE, update(device, r), r)


def status(device, state, r):
    return Message(device, state, round=r)


def run(transport, server=None, **cfg):
    server = server or FakeServer()
    runner = RoundRunner(RunnerConfig(**{"rounds": 2, "round_timeout_s": 10.0, **cfg}), server, transport)
    summary = runner.run()
    return runner, server, summary


def test_every_device_answers_the_round_closes_at_once_with_every_report_key():
    transport = ScriptedTransport(answers=lambda r, t: [up("dev-a", r), status("dev-b", "skipped", r),
                                                       status("dev-c", "failed", r)])
    t0 = time.monotonic()
    runner, server, summary = run(transport)
    assert time.monotonic() - t0 < 3  # nobody waited for the 10 s deadline
    assert [r["round"] for r in runner.rounds] == [1, 2]
    for rep in runner.rounds:
        assert REPORT_KEYS | {"scripted"} <= rep.keys()
        assert (rep["selected"], rep["uploads"], rep["skipped"], rep["missing"]) == (3, 1, 1, 0)
        assert rep["rejected"] == {} and rep["collect_seconds"] >= 0 and rep["server_seconds"] >= 0
    assert transport.closed == [1, 2] and transport.reports == runner.rounds
    assert summary["rounds"] == 2 and summary["uploads"] == 2 and summary["skipped"] == 2
    assert summary["completed"] is True and summary["transport"] == "scripted"
    assert summary["initial_accuracy"] == 0.5 and summary["final_accuracy"] == runner.rounds[-1]["accuracy"]
    assert transport.calls[0] == ("start",) and transport.calls[-2:] == [("finish", 2), ("stop",)]


def test_the_announced_task_names_the_asked_devices_the_deadline_and_the_model_size():
    transport = ScriptedTransport(answers=lambda r, t: [up(d, r) for d in t.devices])
    before = time.time()
    run(transport, rounds=1, round_timeout_s=30.0)
    task = transport.tasks[0]
    assert task.devices == tuple(DEVICES) and task.model_bytes == len(transport.models[0])
    assert before + 30 <= task.deadline <= time.time() + 30


def test_a_silent_device_holds_the_round_until_the_deadline_and_is_reported_missing():
    transport = ScriptedTransport(answers=lambda r, t: [up("dev-a", r), up("dev-b", r)])
    t0 = time.monotonic()
    runner, _, _ = run(transport, rounds=1, round_timeout_s=0.5)
    took = time.monotonic() - t0
    rep = runner.rounds[0]
    assert 0.5 <= took < 3
    assert (rep["uploads"], rep["missing"], rep["skipped"]) == (2, 1, 0)
    assert rep["collect_seconds"] >= 0.45


def test_a_device_that_goes_offline_answers_for_the_round_whatever_round_its_status_names():
    transport = ScriptedTransport(answers=lambda r, t: [up("dev-a", r), up("dev-b", r), status("dev-c", "offline", -1)])
    t0 = time.monotonic()
    runner, _, _ = run(transport, rounds=1)
    assert time.monotonic() - t0 < 3
    assert (runner.rounds[0]["uploads"], runner.rounds[0]["missing"], runner.rounds[0]["skipped"]) == (2, 0, 0)


def test_statuses_of_another_round_or_that_do_not_answer_do_not_close_it():
    # dev-c's "skipped" is for the previous round, and "training"/"online" are not answers
    transport = ScriptedTransport(answers=lambda r, t: [up("dev-a", r), up("dev-b", r), status("dev-c", "skipped", r - 1),
                                                       status("dev-c", "training", r), status("dev-c", "online", r)])
    runner, _, _ = run(transport, rounds=1, round_timeout_s=0.4)
    assert runner.rounds[0]["missing"] == 1 and runner.rounds[0]["skipped"] == 0


def test_duplicates_garbage_and_foreign_updates_are_counted_and_change_nothing():
    def answers(r, t):
        return [up("dev-a", r), up("dev-a", r),                           # a duplicate
                Message("dev-b", UPDATE, b"\x00garbage", r),               # garbage: refused, dev-b not answered yet
                Message("dev-b", UPDATE, update("dev-c", r), r),           # dev-c's bytes on dev-b's topic
                Message("dev-x", UPDATE, update("dev-x", r), r),           # a device not asked
                up("dev-b", r), status("dev-c", "skipped", r)]
    transport = ScriptedTransport(answers=answers, refused={"chunk-malformed": 2})
    runner, server, summary = run(transport, rounds=1)
    rep = runner.rounds[0]
    assert (rep["uploads"], rep["skipped"], rep["missing"]) == (2, 1, 0)
    # the server's refusals and the transport's (before the server) in one count
    assert rep["rejected"] == {"duplicate": 1, "corrupt": 3, "chunk-malformed": 2}
    assert summary["rejected"] == 6


def test_updates_that_arrived_between_rounds_count_in_the_next_one():
    transport = ScriptedTransport(answers=lambda r, t: [up("dev-b", r), up("dev-c", r)],
                                  backlog=[up("dev-a", 1), up("dev-a", 0)])
    runner, _, _ = run(transport, rounds=1)
    assert runner.rounds[0]["uploads"] == 3 and runner.rounds[0]["rejected"] == {"corrupt": 1}


def test_without_a_deadline_a_round_ends_when_the_transport_says_nothing_more_can_come():
    transport = ScriptedTransport(answers=lambda r, t: [up("dev-a", r), Message("dev-b", UPDATE, b"bad", r)],
                                  quiet_when_empty=True)
    t0 = time.monotonic()
    runner, _, _ = run(transport, rounds=1, round_timeout_s=None)
    assert time.monotonic() - t0 < 2
    assert transport.tasks[0].deadline is None
    assert (runner.rounds[0]["uploads"], runner.rounds[0]["missing"]) == (1, 2)


def test_min_devices_gates_round_one_only_and_fraction_picks_a_seeded_sample():
    transport = ScriptedTransport(answers=lambda r, t: [up(d, r) for d in t.devices])
    runner, server, _ = run(transport, rounds=3, min_devices=3, fraction=0.34, join_timeout_s=7.0, round_timeout_s=5.0)
    waits = [c for c in transport.calls if c[0] == "wait"]
    assert waits == [("wait", 3, 7.0), ("wait", 1, 5.0), ("wait", 1, 5.0)]
    assert [len(devices) for _, devices in server.opened] == [2, 2, 2]  # ceil(0.34 * 3)
    again = ScriptedTransport(answers=lambda r, t: [up(d, r) for d in t.devices])
    _, server2, _ = run(again, rounds=3, min_devices=3, fraction=0.34)
    assert server2.opened == server.opened  # same seed, same choice


def test_too_few_devices_is_a_clear_error_and_the_transport_is_stopped():
    transport = ScriptedTransport(devices=["dev-a"])
    with pytest.raises(PqsuError, match="only 1 of 2"):
        run(transport, min_devices=2)
    assert transport.calls[-1] == ("stop",)


def test_devices_without_a_key_are_not_asked():
    transport = ScriptedTransport(answers=lambda r, t: [up(d, r) for d in t.devices])
    _, server, _ = run(transport, FakeServer(keys={"dev-a": b"k", "dev-c": b"k"}), rounds=1)
    assert server.opened == [(1, ["dev-a", "dev-c"])]


def test_stop_ends_the_run_after_the_current_round():
    stop = threading.Event()
    transport = ScriptedTransport(answers=lambda r, t: [up(d, r) for d in t.devices])
    server = FakeServer()
    runner = RoundRunner(RunnerConfig(rounds=5), server, transport, on_round=lambda rep: stop.set())
    summary = runner.run(stop)
    assert len(runner.rounds) == 1 and summary["completed"] is False


def test_on_round_sees_each_closed_round():
    seen = []
    transport = ScriptedTransport(answers=lambda r, t: [up(d, r) for d in t.devices])
    RoundRunner(RunnerConfig(rounds=2), FakeServer(), transport, on_round=seen.append).run()
    assert [r.round for r in seen] == [1, 2] and all(isinstance(r, RoundReport) for r in seen)


def test_with_an_out_folder_each_round_is_checkpointed_and_appended_and_a_resume_goes_on(tmp_path):
    answers = lambda r, t: [up(d, r) for d in t.devices]  # noqa: E731
    meta = {"config": {"rounds": 3}}
    server = FakeServer()
    runner = RoundRunner(RunnerConfig(rounds=2, out=str(tmp_path)), server, ScriptedTransport(answers=answers),
                         meta=meta)
    runner.run()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in lines] == [1, 2] and lines == json.loads(json.dumps(runner.rounds))
    ckpt = checkpoint.load_latest(tmp_path / "checkpoints")
    assert ckpt.round == 2 and [r["round"] for r in ckpt.meta["reports"]] == [1, 2]
    assert ckpt.meta["devices"] == {"dev-a": {"state": "online"}}  # the transport's state rides along
    assert ckpt.meta["config"] == {"rounds": 3} and "initial_accuracy" in ckpt.meta
    assert json.loads((tmp_path / "summary.json").read_text())["rounds"] == 2
    assert json.loads((tmp_path / "config.json").read_text())["precision"] == "int8"

    # Resumed (as build_server gives it): round 3 only, the history kept, metrics.jsonl not doubled.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"round": 3, "killed": "before its checkpoint"}) + "\n")
    server.rounds_done = 2
    evaluations = server.evaluations
    resumed = RoundRunner(RunnerConfig(rounds=3, out=str(tmp_path)), server, ScriptedTransport(answers=answers),
                          meta={**ckpt.meta, "reports": ckpt.meta["reports"]})
    summary = resumed.run()
    assert [r["round"] for r in resumed.rounds] == [1, 2, 3] and summary["rounds"] == 3
    assert server.evaluations == evaluations + 1  # round 3's evaluation; the initial accuracy came from meta
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in lines] == [1, 2, 3] and "killed" not in lines[2]


# -- the in-process transport --------------------------------------------------------------------------
class FakeLearner:
    def __init__(self, device, skip_rounds=()):
        self.device, self.skip_rounds, self.seen = device, set(skip_rounds), []

    def run_round(self, task, model_file, downloaded=None):
        self.seen.append((task.round, model_file.data))
        payload = None if task.round in self.skip_rounds else update(self.device, task.round)
        return type("Outcome", (), {"payload": payload})()


def test_in_process_devices_train_on_the_published_model_and_report_their_timings():
    learners = {"dev-a": FakeLearner("dev-a"), "dev-b": FakeLearner("dev-b", skip_rounds={2})}
    runner = RoundRunner(RunnerConfig(rounds=2, round_timeout_s=None), FakeServer(), InProcessTransport(learners))
    summary = runner.run()
    assert [(r["uploads"], r["skipped"], r["missing"]) for r in runner.rounds] == [(2, 0, 0), (1, 1, 0)]
    # round 2 trains on the model round 1 closed with
    assert learners["dev-a"].seen[0][1] != learners["dev-a"].seen[1][1]
    for rep in runner.rounds:
        assert set(rep["devices"]) == {"dev-a", "dev-b"}
        assert all(v["seconds"] >= 0 for v in rep["devices"].values())
    assert runner.rounds[1]["devices"]["dev-b"]["bytes_up"] == 0
    assert runner.rounds[0]["devices"]["dev-b"]["bytes_up"] == len(update("dev-b", 1))
    assert summary["rounds"] == 2 and runner.model


def test_in_process_tamper_replaces_the_payload_before_the_server_sees_it():
    learners = {d: FakeLearner(d) for d in ("dev-a", "dev-b")}
    transport = InProcessTransport(learners, tamper=lambda d, p: p if d == "dev-a" else b"poisoned")
    runner = RoundRunner(RunnerConfig(rounds=1, round_timeout_s=None), FakeServer(), transport)
    runner.run()
    rep = runner.rounds[0]
    assert (rep["uploads"], rep["missing"], rep["rejected"]) == (1, 1, {"corrupt": 1})
    assert rep["devices"]["dev-b"]["bytes_up"] == len(update("dev-b", 1))  # what the device sent, not the tampered


def test_the_devices_evaluations_are_summarized_in_the_report_weighted_by_their_samples():
    def evaluated(r):
        return {"dev-a": {"accuracy": 0.5, "loss": 1.0, "samples": 10},
                "dev-b": {"accuracy": 0.8, "loss": 0.5, "samples": 30}} if r == 1 else {}
    transport = ScriptedTransport(answers=lambda r, t: [up(d, r) for d in DEVICES], evaluated=evaluated)
    runner, _, summary = run(transport)
    ev = runner.rounds[0]["device_eval"]
    assert ev == {"devices": 2, "samples": 40, "accuracy": pytest.approx(0.725), "loss": pytest.approx(0.625),
                  "accuracy_min": 0.5, "accuracy_max": 0.8, "accuracy_std": pytest.approx(0.15)}
    assert runner.rounds[1]["device_eval"] is None  # nobody reported: nothing made up
    assert summary["final_device_eval"] == ev       # the last round any device evaluated
    assert transport.reports[0]["device_eval"] == ev  # what the metrics topic gets


def test_in_process_devices_evaluations_reach_the_report():
    class Evaluating(FakeLearner):
        def run_round(self, task, model_file, downloaded=None):
            out = super().run_round(task, model_file, downloaded)
            out.evaluation = {"accuracy": 0.25, "loss": 2.0, "samples": 4}
            return out
    learners = {d: Evaluating(d) for d in ("dev-a", "dev-b")}
    runner = RoundRunner(RunnerConfig(rounds=1, round_timeout_s=None), FakeServer(), InProcessTransport(learners))
    runner.run()
    assert runner.rounds[0]["device_eval"]["devices"] == 2 and runner.rounds[0]["device_eval"]["samples"] == 8
