"""The MQTT transport's own logic without a broker (a client that records what is published and
delivers what devices would send, on the test's thread): the device registry, updates before a
round, the model's retained chunks, the round announcements, refusals before the server, the
republish after a broker lost its state, and one whole `Coordinator.run` (the real broker is in
tests/e2e)."""
from __future__ import annotations

import dataclasses
import json
import threading
import time

import pytest

from pqsu.cloud import coordinator as coord
from pqsu.cloud.coordinator import Coordinator, CoordinatorConfig, MqttTransport
from pqsu.cloud.transport import UPDATE
from pqsu.protocol import chunking
from pqsu.protocol.errors import PqsuError
from pqsu.protocol.messages import Lease, RoundTask, Status, message_type
from pqsu.protocol.topics import Topics
from tests.support.round_fakes import FakeClient, FakeServer, update

TOPICS = Topics("t")
ALL = lambda device: True  # noqa: E731
NEVER = threading.Event()


def transport(client=None, **cfg) -> tuple[MqttTransport, FakeClient]:
    client = client or FakeClient()
    t = MqttTransport(CoordinatorConfig(fleet="t", **{"job": "20261201T000000Z-abc123", **cfg}), client=client)
    t.start()
    client.published.clear()  # the lease: see test_start_takes_the_lease_under_a_client_id_of_its_own
    return t, client


def send_status(client, device, state, round_=-1, trains=True, topic_device=None):
    client.deliver(TOPICS.status_filter, TOPICS.status(topic_device or device),
                   Status(device, state, round_, trains=trains).to_json())


def send_update(client, device, payload, chunk_limit=128 * 1024, message_id=None):
    for frame in chunking.split(payload, chunk_limit, message_id=message_id):
        client.deliver(TOPICS.update_filter, TOPICS.update(device), frame)


def drain(t: MqttTransport):
    out = []
    while (m := t.poll(0)) is not None:
        out.append(m)
    return out


def test_start_subscribes_before_connecting_and_stop_closes():
    t, client = transport()
    assert {TOPICS.status_filter, TOPICS.update_filter, TOPICS.round} <= client.handlers.keys() and client.connected
    t.stop()
    assert client.closed


def test_the_registry_lists_online_training_admitted_devices_only():
    t, client = transport()
    send_status(client, "dev-a", "online")
    send_status(client, "dev-b", "training", 3)
    send_status(client, "dev-c", "offline")
    send_status(client, "viewer", "online", trains=False)   # an inference-only device is never asked
    send_status(client, "dev-d", "online", topic_device="dev-e")  # a status naming another device: ignored
    client.deliver(TOPICS.status_filter, TOPICS.status("dev-f"), b"{not json")
    assert t.wait_for_devices(1, 1.0, NEVER, ALL) == ["dev-a", "dev-b"]
    assert t.wait_for_devices(1, 1.0, NEVER, lambda d: d != "dev-a") == ["dev-b"]
    assert set(t.devices) == {"dev-a", "dev-b", "dev-c", "viewer"}


def test_too_few_devices_within_the_wait_is_one_clear_error():
    t, client = transport(broker="mqtt://127.0.0.1:1")
    send_status(client, "dev-a", "online")
    t0 = time.monotonic()
    with pytest.raises(PqsuError, match=r"only 1 of the 2 devices needed came online within 0s .*fleet 't'"):
        t.wait_for_devices(2, 0.3, NEVER, ALL)
    assert time.monotonic() - t0 < 2


def test_a_device_coming_online_while_waiting_is_seen():
    t, client = transport()
    timer = threading.Timer(0.3, send_status, (client, "dev-a", "online"))
    timer.start()
    try:
        assert t.wait_for_devices(1, 5.0, NEVER, ALL) == ["dev-a"]
    finally:
        timer.cancel()


def test_a_resumed_transport_waits_for_the_devices_it_knew_and_checkpoints_its_registry(monkeypatch):
    monkeypatch.setattr(coord, "RESUME_GRACE_S", 1.0)
    client = FakeClient(on_connected=lambda c: send_status(c, "dev-a", "online"))
    t = MqttTransport(CoordinatorConfig(fleet="t"), client=client,
                      devices={"dev-a": {"state": "online", "round": 2}, "dev-b": {"state": "training", "round": 2}})
    assert {d: s.state for d, s in t.devices.items()} == {"dev-a": "offline", "dev-b": "offline"}
    t.start()
    timer = threading.Timer(0.2, send_status, (client, "dev-b", "online"))
    timer.start()
    try:
        assert t.wait_for_devices(1, 5.0, NEVER, ALL) == ["dev-a", "dev-b"]  # dev-b's status came within the grace
    finally:
        timer.cancel()
    assert t.state()["devices"]["dev-b"]["state"] == "online"
    assert json.loads(json.dumps(t.state()))  # it goes into the checkpoint's JSON


def test_updates_before_a_round_wait_in_the_backlog_and_during_it_come_out_of_poll():
    t, client = transport()
    send_update(client, "dev-a", b"early", chunk_limit=chunking.HEADER_SIZE + 2)  # reassembled from 3 frames
    send_status(client, "dev-a", "online")
    assert t.wait_for_devices(1, 1.0, NEVER, ALL) == ["dev-a"]  # handles the queued events
    t.announce(RoundTask(round=1, model_id="ab" * 16, devices=("dev-a",)))
    backlog = t.backlog()
    assert [(m.device, m.kind, m.payload) for m in backlog] == [("dev-a", UPDATE, b"early")]
    send_update(client, "dev-a", b"late")
    send_status(client, "dev-a", "skipped", 1)
    got = drain(t)
    assert [(m.kind, m.payload) for m in got] == [(UPDATE, b"late"), ("skipped", b"")] and got[1].round == 1
    t.close_round(RoundTask(round=1, model_id="ab" * 16))
    send_update(client, "dev-a", b"after")
    assert drain(t) == [] and [m.payload for m in t.backlog()] == [b"after"]


def test_the_backlog_is_bounded_and_what_falls_out_is_counted():
    t, client = transport()
    for i in range(t._early.maxlen + 5):
        send_update(client, "dev-a", b"u%d" % i)
        t.poll(0)
    assert len(t._early) == t._early.maxlen and t.take_refused() == {"no-round": 5}


def test_refusals_before_the_server_are_counted_by_reason_and_taken_once():
    t, client = transport()
    client.deliver(TOPICS.update_filter, "pqsu/other/update/dev-a", b"x")  # a topic not ours
    client.deliver(TOPICS.update_filter, TOPICS.update("dev-a"), b"not a frame")
    assert t.take_refused() == {"foreign-topic": 1, "chunk-malformed": 1}
    assert t.take_refused() == {}
    assert t.summary() == {"dropped_messages": 0, "foreign_messages": 2}


def test_a_full_queue_drops_and_counts_instead_of_growing(monkeypatch):
    t, client = transport()
    monkeypatch.setattr(t, "events", __import__("queue").Queue(maxsize=2))
    for _ in range(5):
        send_status(client, "dev-a", "online")
    assert t.dropped == 3 and t.take_refused() == {"queue-full": 3}


def test_the_model_goes_out_as_retained_chunks_once_per_version_and_stale_chunks_are_cleared():
    t, client = transport(chunk_limit=chunking.HEADER_SIZE + 100)
    big, small = bytes(range(256)) * 2, b"s" * 150  # 6 chunks, then 2
    t.publish_model(big, "11" * 16)
    t.publish_model(big, "11" * 16)  # unchanged: nothing published again
    assert [(topic, retain) for topic, _, retain in client.published] == [(TOPICS.model_chunk(i), True) for i in range(6)]
    r = chunking.Reassembler()
    assert [r.add(p, source="m") for _, p, _ in client.published][-1] == big
    client.published.clear()
    t.publish_model(small, "22" * 16)
    assert [(topic, payload == b"") for topic, payload, _ in client.published] == \
        [(TOPICS.model_chunk(0), False), (TOPICS.model_chunk(1), False)] + \
        [(TOPICS.model_chunk(i), True) for i in range(2, 6)]


def test_the_round_is_announced_retained_and_closed_with_its_deadline_passed():
    t, client = transport()
    task = RoundTask(round=4, model_id="ab" * 16, devices=("dev-a",), deadline=time.time() + 300)
    t.announce(task)
    topic, payload, retain = client.published[-1]
    sent = RoundTask.from_json(payload)
    assert (topic, retain) == (TOPICS.round, True) and sent.job == "20261201T000000Z-abc123"
    assert dataclasses.replace(sent, job="", remaining_s=None) == task and 299 < sent.remaining_s <= 300
    t.close_round(task)
    topic, payload, retain = client.published[-1]
    closed = RoundTask.from_json(payload)
    assert topic == TOPICS.round and retain and closed.round == 4 and closed.deadline <= time.time()
    assert closed.remaining_s == 0
    t.publish_report({"round": 4, "accuracy": 0.5})
    assert client.published[-1] == (TOPICS.metrics, json.dumps({"round": 4, "accuracy": 0.5}).encode(), True)
    t.finish(b"final", "cd" * 16, 4)
    topic, payload, retain = client.published[-2]
    assert topic == TOPICS.round and retain and message_type(payload) == "done" and json.loads(payload)["rounds"] == 4
    assert json.loads(payload)["job"] == "20261201T000000Z-abc123"
    assert client.published[-1] == (TOPICS.lease, b"", True)


def test_a_closing_announcement_the_broker_refuses_is_logged_not_raised(caplog):
    t, client = transport()

    def refuse(topic, payload, retain=False, **kwargs):
        raise PqsuError("broker gone")
    client.publish = refuse
    t.close_round(RoundTask(round=1, model_id="ab" * 16))
    t.publish_report({"round": 1})
    assert "closing announcement not published" in caplog.text and "metrics not published" in caplog.text


def test_after_a_reconnect_a_lost_announcement_and_model_are_published_again(monkeypatch):
    monkeypatch.setattr(coord, "REPUBLISH_GRACE_S", 0.0)
    t, client = transport()
    task = RoundTask(round=1, model_id="ab" * 16, devices=("dev-a",))
    t.publish_model(b"model", "ab" * 16)
    t.announce(task)
    announced = client.published[-1][1]
    client.deliver(TOPICS.round, TOPICS.round, announced, True)  # the broker kept it: its echo came back
    t._on_connect(client)                                       # a reconnect...
    client.deliver(TOPICS.round, TOPICS.round, announced, True)  # ...and the retained copy is still there
    client.published.clear()
    t.poll(0)
    assert client.published == []
    t._on_connect(client)  # a broker restarted without its state: no echo this time
    t.poll(0)
    assert [topic for topic, _, _ in client.published] == [TOPICS.model_chunk(0), TOPICS.lease, TOPICS.round]
    assert RoundTask.from_json(client.published[-1][1]).round == task.round


# -- the whole coordinator, devices answering through the fake client ------------------------------------
def test_a_coordinator_run_asks_the_online_devices_counts_their_answers_and_leaves_its_outputs(tmp_path):
    def devices_answer(topic, payload):
        if topic != TOPICS.round or not payload or message_type(payload) != "round":
            return
        task = RoundTask.from_json(payload)
        if task.deadline is not None and task.deadline <= time.time():
            return  # the closing re-announcement
        send_update(client, "dev-a", update("dev-a", task.round))
        send_update(client, "dev-a", update("dev-a", task.round))  # the same frames again: dropped by the reassembler
        send_update(client, "dev-a", update("dev-a", task.round), message_id=b"\x01" * 16)  # resent anew: counted once
        send_status(client, "dev-b", "skipped", task.round)

    def online(c):
        for d in ("dev-a", "dev-b"):
            send_status(c, d, "online")

    client = FakeClient(on_publish=devices_answer, on_connected=online)
    meta = {"config": {"clients": 2}, "devices": {}}
    ccfg = CoordinatorConfig(fleet="t", rounds=2, min_devices=2, join_timeout_s=5, round_timeout_s=5, out=str(tmp_path))
    t0 = time.monotonic()
    summary = Coordinator(ccfg, FakeServer(), meta=meta, client=client).run()
    assert time.monotonic() - t0 < 5  # every round closed as soon as both answered
    metrics = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(m["round"], m["uploads"], m["skipped"], m["missing"], m["rejected"]) for m in metrics] == \
        [(1, 1, 1, 0, {"duplicate": 1}), (2, 1, 1, 0, {"duplicate": 1})]
    for m in metrics:
        assert {"collect_seconds", "server_seconds", "bytes_up", "bytes_down", "model_id"} <= m.keys()
        assert "devices" not in m  # per-device timings are the in-process transport's
    assert summary["completed"] and summary["rounds"] == 2 and summary["dropped_messages"] == 0
    assert {"summary.json", "config.json", "model.int8.onnx"} <= {p.name for p in tmp_path.iterdir()}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["round-000001.npz", "round-000002.npz"]
    retained_metrics = [p for topic, p, _ in client.published if topic == TOPICS.metrics]
    assert retained_metrics[0] == b""  # a new job clears the earlier job's metrics (and round) first
    assert [json.loads(p)["round"] for p in retained_metrics[1:]] == [1, 2]
    rounds = [p for topic, p, _ in client.published if topic == TOPICS.round]
    assert rounds[0] == b"" and message_type(rounds[-1]) == "done" and client.closed
    assert client.published[-1] == (TOPICS.lease, b"", True)  # a clean end frees the fleet


def test_start_takes_the_lease_under_a_client_id_of_its_own():
    client = FakeClient()
    t = MqttTransport(CoordinatorConfig(fleet="t", job="20261201T000000Z-abc123"), client=client)
    t.start()
    assert t.client_id == "pqsu-coordinator-t-abc123"
    (topic, payload, retain), = client.published
    lease = Lease.from_json(payload)
    assert topic == TOPICS.lease and retain and lease.coordinator == t.client_id and lease.job.endswith("abc123")
    # another coordinator started with --take-over: this one stops at its next wait
    client.deliver(TOPICS.lease, TOPICS.lease, Lease(job="j2", coordinator="pqsu-coordinator-t-def456").to_json())
    with pytest.raises(PqsuError, match="another coordinator took over fleet 't': pqsu-coordinator-t-def456"):
        t.poll(0)
