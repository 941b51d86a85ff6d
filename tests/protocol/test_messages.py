"""Control messages (JSON): a round task survives the trip, and anything malformed is a MessageError."""
from __future__ import annotations

import json

import pytest

from pqsu.protocol.errors import PqsuError
from pqsu.protocol.messages import (MAX_MESSAGE_BYTES, VERSION, Lease, MessageError, RoundTask, Status, done_message,
                                    message_job, new_job_id)

GOOD = {"v": VERSION, "type": "round", "round": 4, "model_id": "3024e2da0ac44ccbcc8b94050ef94e77", "epochs": 0.5,
        "batch_size": 16, "lr": 0.05, "momentum": 0.9, "time_budget_s": 30.0, "seed": 7}


def _raw(**changes) -> bytes:
    body = {**GOOD, **changes}
    return json.dumps({k: v for k, v in body.items() if v is not _DROP}).encode()


_DROP = object()


@pytest.mark.parametrize("task", [
    RoundTask(round=4, model_id="3024e2da0ac44ccbcc8b94050ef94e77", epochs=0.5, batch_size=16, lr=0.05,
              momentum=0.9, time_budget_s=30.0, seed=7),
    RoundTask(round=0, model_id="m"),  # defaults, no time budget
])
def test_round_task_json_round_trip(task):
    data = task.to_json()
    assert RoundTask.from_json(data) == task
    body = json.loads(data)  # plain JSON any MQTT tool can read
    assert body["v"] == VERSION and body["type"] == "round" and body["model_id"] == task.model_id
    assert len(data) < 512


FIELDS = set(RoundTask.__dataclass_fields__)
needs_devices = pytest.mark.skipif("devices" not in FIELDS, reason="RoundTask has no devices field in this build")


@needs_devices
def test_round_trip_with_device_list_and_deadline():
    task = RoundTask(round=9, model_id="m", devices=("dev-000", "dev-007"), deadline=1.7e9, model_bytes=124_927)
    back = RoundTask.from_json(task.to_json())
    assert back == task and back.devices == ("dev-000", "dev-007")
    assert back.asks("dev-007") and not back.asks("dev-001")
    assert RoundTask(round=1, model_id="m").asks("anyone")  # empty list: every device


@needs_devices
@pytest.mark.parametrize("changes", [{"devices": [1, 2]}, {"devices": [""]}, {"devices": ["x" * 65]},
                                     {"devices": None}, {"devices": 3}, {"deadline": "later"},
                                     {"model_bytes": -1}, {"model_bytes": 1.5}])
def test_bad_device_list_deadline_or_size_raises_message_error(changes):
    with pytest.raises(MessageError):
        RoundTask.from_json(_raw(**changes))


@needs_devices
def test_a_device_string_instead_of_a_list_is_refused():
    try:
        task = RoundTask.from_json(_raw(devices="dev-001"))
    except MessageError:
        return
    raise AssertionError(f"accepted as devices={task.devices!r}")


def test_parses_what_another_implementation_would_send():
    task = RoundTask.from_json(_raw())
    assert (task.round, task.epochs, task.batch_size, task.lr, task.momentum, task.time_budget_s, task.seed) == \
        (4, 0.5, 16, 0.05, 0.9, 30.0, 7)
    # optional fields may be left out; an int where a float is expected is fine
    minimal = RoundTask.from_json(json.dumps({"v": 1, "type": "round", "round": 2, "model_id": "x", "lr": 1}).encode())
    assert minimal == RoundTask(round=2, model_id="x", lr=1)
    # a newer coordinator may add fields: they are ignored
    assert RoundTask.from_json(_raw(priority="high")).round == 4


@pytest.mark.parametrize("data", [
    b"", b"{", b"not json at all", b"\xff\xfe\x00garbage", b"null", b"[1, 2]", b'"round"', b"42",
    json.dumps({"v": 1, "round": 1, "model_id": "m"}).encode(),           # no type
], ids=["empty", "open-brace", "text", "binary", "null", "list", "string", "number", "no-type"])
def test_malformed_json_raises_message_error(data):
    with pytest.raises(MessageError):
        RoundTask.from_json(data)


@pytest.mark.parametrize("changes", [
    {"type": "update"}, {"type": "Round"}, {"type": None},
    {"v": 2}, {"v": 0}, {"v": "1"}, {"v": _DROP},
], ids=["type-update", "type-case", "type-null", "v2", "v0", "v-string", "no-version"])
def test_wrong_type_or_version_raises_message_error(changes):
    with pytest.raises(MessageError):
        RoundTask.from_json(_raw(**changes))


@pytest.mark.parametrize("changes", [
    {"round": _DROP}, {"model_id": _DROP},
    {"round": -1}, {"round": "4"}, {"round": 4.0}, {"round": None},
    {"model_id": ""}, {"model_id": "x" * 65}, {"model_id": 12}, {"model_id": None},
    {"epochs": 0}, {"epochs": -1}, {"epochs": "1"}, {"epochs": float("nan")}, {"epochs": float("inf")},
    {"epochs": True},
    {"batch_size": 0}, {"batch_size": 65537}, {"batch_size": 1.5}, {"batch_size": "32"},
    {"lr": 0}, {"lr": -0.1}, {"lr": float("nan")}, {"lr": None},
    {"momentum": 1.0}, {"momentum": -0.1}, {"momentum": "0.9"},
    {"time_budget_s": 0}, {"time_budget_s": -5}, {"time_budget_s": "soon"}, {"time_budget_s": float("inf")},
    {"seed": 1.5}, {"seed": "7"}, {"seed": None},
], ids=lambda c: "-".join(f"{k}={'missing' if v is _DROP else v!r}" for k, v in c.items()))
def test_bad_field_values_raise_message_error(changes):
    with pytest.raises(MessageError) as info:
        RoundTask.from_json(_raw(**changes))
    assert isinstance(info.value, PqsuError) and "round" in str(info.value)


@pytest.mark.parametrize("field", ["round", "batch_size", "seed"] + (["model_bytes"] if "model_bytes" in FIELDS else []))
def test_booleans_are_not_integers(field):
    try:
        RoundTask.from_json(_raw(**{field: True}))
    except MessageError:
        return
    raise AssertionError(f"{field}=true was accepted")


def test_round_beyond_the_update_codec_range_is_refused():
    try:
        RoundTask.from_json(_raw(round=2**32))
    except MessageError:
        return
    raise AssertionError("round 2**32 was accepted")


def test_constructor_validates_too():
    with pytest.raises(MessageError):
        RoundTask(round=1, model_id="m", lr=0)
    with pytest.raises(MessageError):
        RoundTask(round=-1, model_id="m")


def test_oversize_message_raises_message_error():
    padded = _raw()[:-1] + b" " * MAX_MESSAGE_BYTES + b"}"
    assert json.loads(padded)["round"] == 4  # valid JSON, just too big
    with pytest.raises(MessageError, match=str(MAX_MESSAGE_BYTES)):
        RoundTask.from_json(padded)
    # right at the limit is still read
    at_limit = _raw()[:-1] + b" " * (MAX_MESSAGE_BYTES - len(_raw())) + b"}"
    assert len(at_limit) == MAX_MESSAGE_BYTES and RoundTask.from_json(at_limit).round == 4


def test_deeply_nested_json_raises_message_error():
    with pytest.raises(MessageError):
        RoundTask.from_json(b"[" * 60_000)  # under MAX_MESSAGE_BYTES


# -- jobs, leases and time -------------------------------------------------------------------

def test_job_and_remaining_time_travel_with_the_round_and_the_status():
    task = RoundTask(round=2, model_id="m", job="20261201T231500Z-3fa9c2", remaining_s=120.0)
    back = RoundTask.from_json(task.to_json())
    assert back.job == task.job and back.remaining_s == 120.0
    # the receiver's own monotonic reading at receipt, plus what was left at publish
    assert back.local_deadline(received_at=5000.0) == 5120.0
    assert RoundTask(round=2, model_id="m").local_deadline(5000.0) is None
    status = Status("pi-01", "skipped", round=2, job=task.job)
    assert Status.from_json(status.to_json()).job == task.job
    assert message_job(done_message(3, "m", job=task.job)) == task.job
    assert message_job(done_message(3, "m")) == ""


def test_messages_of_an_older_release_have_no_job():
    """A message without the new fields reads as job "" and no remaining time (a receiver must ignore
    keys it does not know, and default the ones it misses)."""
    body = json.loads(RoundTask(round=1, model_id="m").to_json())
    del body["job"], body["remaining_s"]
    task = RoundTask.from_json(json.dumps({**body, "future_key": 1}).encode())
    assert task.job == "" and task.remaining_s is None


@pytest.mark.parametrize("changes", [{"job": 5}, {"job": "x" * 65}, {"remaining_s": -1}, {"remaining_s": "soon"}])
def test_bad_job_or_remaining_time_is_refused(changes):
    with pytest.raises(MessageError):
        RoundTask.from_json(_raw(**changes))


def test_job_ids_are_unique_and_sort_by_start():
    ids = [new_job_id() for _ in range(50)]
    assert len(set(ids)) == 50 and all(len(i) <= 64 for i in ids)
    assert ids[0][:16] <= ids[-1][:16]


def test_lease_round_trip_and_description():
    lease = Lease(job="j1", coordinator="pqsu-coordinator-farm-ab12cd", host="cloud-1", pid=4242, started=0.0)
    assert Lease.from_json(lease.to_json()) == lease
    assert "pqsu-coordinator-farm-ab12cd" in lease.describe() and "pid 4242" in lease.describe()
    for bad in (b"", b"{}", json.dumps({"v": VERSION, "type": "lease", "job": "", "coordinator": "c"}).encode(),
                json.dumps({"v": VERSION, "type": "lease", "job": "j", "coordinator": 3}).encode()):
        with pytest.raises(MessageError):
            Lease.from_json(bad)
