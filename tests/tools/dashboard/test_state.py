"""The dashboard's state model: the fleet's messages in, what the page shows out (pure logic, no broker)."""
from __future__ import annotations

import json

from pqsu.protocol import chunking
from pqsu.protocol.messages import Lease, RoundTask, Status, done_message
from pqsu.tools.dashboard.state import FleetState

JOB, OLD_JOB = "20261202T010000Z-aaaaaa", "20261201T230000Z-bbbbbb"
MODEL = "ab" * 16


def status(device: str, state: str, round_: int = -1, job: str = JOB, **kw) -> bytes:
    return Status(device, state, round_, job=job, **kw).to_json()


def task(round_: int, devices=("pi-1", "pi-2"), remaining_s=60.0, job=JOB, model_bytes=1000) -> bytes:
    return RoundTask(round_, MODEL, devices=devices, remaining_s=remaining_s, job=job, model_bytes=model_bytes).to_json()


def metrics(round_: int, job: str = JOB, **fields) -> bytes:
    body = {"round": round_, "model_id": MODEL, "accuracy": 0.5 + 0.1 * round_, "selected": 2, "uploads": 2,
            "skipped": 0, "rejected": {}, "bytes_up": 100, "bytes_down": 2000, "job": job, **fields}
    return json.dumps(body).encode()


def fleet(*messages) -> FleetState:
    s = FleetState("farm")
    for i, (kind, arg, payload, *retained) in enumerate(messages):
        s.on_message(kind, arg, payload, now=float(i), retained=bool(retained and retained[0]))
    return s


def devices(view: dict) -> dict[str, dict]:
    return {d["device"]: d for d in view["devices"]}


def test_a_round_in_progress_counts_asked_answered_and_time_left():
    s = fleet(("round", None, task(3, remaining_s=60.0)),                      # t = 0
              ("status", "pi-1", status("pi-1", "uploaded", 3)),               # t = 1
              ("status", "pi-2", status("pi-2", "training", 3)))               # t = 2
    r = s.view(now=10.0)["round"]
    assert (r["round"], r["asked"], r["answered"], r["open"]) == (3, 2, 1, True)
    assert r["answered_devices"] == ["pi-1"] and r["waiting_devices"] == ["pi-2"]
    assert r["time_left_s"] == 50.0  # counted on the dashboard's own clock from receipt, never from `deadline`


def test_skipped_failed_and_offline_answer_a_round_but_a_status_of_another_round_does_not():
    s = fleet(("round", None, task(2, devices=("a", "b", "c", "d"))),
              ("status", "a", status("a", "skipped", 2)), ("status", "b", status("b", "failed", 2)),
              ("status", "c", status("c", "offline")), ("status", "d", status("d", "uploaded", 1)))
    r = s.view(now=5.0)["round"]
    assert r["answered_devices"] == ["a", "b", "c"] and r["waiting_devices"] == ["d"]


def test_the_closing_re_announcement_and_the_metrics_close_the_round():
    closed = fleet(("round", None, task(1)), ("round", None, task(1, remaining_s=0.0)))
    assert closed.view(5.0)["round"]["open"] is False and closed.view(5.0)["round"]["time_left_s"] == 0.0
    reported = fleet(("round", None, task(1)), ("metrics", None, metrics(1)))
    assert reported.view(5.0)["round"]["open"] is False


def test_devices_show_link_role_last_round_model_and_counts():
    s = fleet(("status", "pi-1", status("pi-1", "online"), True),  # retained: seen before the dashboard started
              ("status", "cam", status("cam", "online", trains=False, job="")),
              ("round", None, task(1)),
              ("status", "pi-1", status("pi-1", "uploaded", 1)),
              ("status", "pi-1", status("pi-1", "uploaded", 1)),  # the same status again (a re-publish): once
              ("status", "pi-2", status("pi-2", "skipped", 1, detail="loss did not improve")),
              ("status", "pi-2", status("pi-2", "offline")))
    d = devices(s.view(now=10.0))
    assert d["pi-1"]["online"] and d["pi-1"]["round"] == 1 and d["pi-1"]["model_id"] == MODEL
    assert (d["pi-1"]["uploaded"], d["pi-1"]["skipped"], d["pi-1"]["last_seen_s"]) == (1, 0, 6.0)
    assert d["pi-2"]["online"] is False and d["pi-2"]["skipped"] == 1 and d["pi-2"]["round"] is None
    assert d["cam"]["trains"] is False and d["cam"]["model_id"] == MODEL  # inference-only: follows every model
    assert d["cam"]["last_seen_s"] == 9.0


def test_a_retained_status_has_no_last_seen_time():
    d = devices(fleet(("status", "pi-1", status("pi-1", "online"), True)).view(100.0))
    assert d["pi-1"]["last_seen_s"] is None


def test_bytes_down_are_the_model_of_each_round_a_device_was_asked_and_bytes_up_its_update_frames():
    update = b"u" * 3000
    frames = chunking.split(update, 1024, message_id=b"\x01" * 16)
    s = fleet(("round", None, task(1, devices=("pi-1",), model_bytes=700)),
              ("round", None, task(1, devices=("pi-1",), model_bytes=700, remaining_s=0.0)),  # same round: not twice
              ("round", None, task(2, devices=("pi-1", "pi-2"), model_bytes=800)),
              *[("update", "pi-1", f) for f in frames])
    d = devices(s.view(10.0))
    assert len(frames) > 1
    assert d["pi-1"]["bytes_down"] == 1500 and d["pi-2"]["bytes_down"] == 800
    assert d["pi-1"]["bytes_up"] == len(update) and d["pi-1"]["updates"] == 1


def test_a_device_that_reports_its_downloads_shows_them_and_the_patches_it_refused():
    s = fleet(("status", "pi-1", status("pi-1", "online")),
              ("round", None, task(1, devices=("pi-1",), model_bytes=700)),
              ("status", "pi-1", status("pi-1", "training", 1, download="full", download_bytes=760)),
              ("status", "pi-1", status("pi-1", "uploaded", 1)),
              ("round", None, task(2, devices=("pi-1",), model_bytes=700)),
              ("status", "pi-1", status("pi-1", "training", 2, download="full", download_bytes=760,
                                        refusals={"target-mismatch": 1})),
              ("status", "pi-1", status("pi-1", "training", 2, download="full", download_bytes=760,  # a repeat
                                        refusals={"target-mismatch": 1})),
              ("round", None, task(3, devices=("pi-1",), model_bytes=700)),
              ("status", "pi-1", status("pi-1", "training", 3, download="patch", download_bytes=90,
                                        refusals={"target-mismatch": 1})))
    d = devices(s.view(20.0))["pi-1"]
    assert d["bytes_down"] == 760 + 760 + 90  # what it downloaded, not 3 x the file
    assert d["patch_refusals"] == 1 and d["refusal_reasons"] == {"target-mismatch": 1}


def test_rounds_keep_missing_metric_keys_as_none_and_the_new_ones_as_they_come():
    old = metrics(1)
    new = metrics(2, bytes_down_flashed=5000, downloads={"patch": 2, "full": 1}, rejected={"late": 2, "forged": 1})
    view = fleet(("round", None, task(2)), ("metrics", None, old), ("metrics", None, new)).view(5.0)
    r1, r2 = view["rounds"]
    assert r1["bytes_down_flashed"] is None and r1["downloads"] is None and r1["missing"] is None
    assert r2["bytes_down_flashed"] == 5000 and r2["downloads"] == {"patch": 2, "full": 1}
    assert view["refusals"] == {"late": 2, "forged": 1}
    assert [r["accuracy"] for r in view["rounds"]] == [0.6, 0.7]


def test_nan_accuracy_becomes_null_so_browsers_can_parse_the_state():
    view = fleet(("metrics", None, b'{"round": 1, "accuracy": NaN, "rejected": {}}')).view(1.0)
    assert view["rounds"][0]["accuracy"] is None
    json.dumps(view, allow_nan=False)


def test_a_new_job_on_the_round_topic_starts_afresh_and_the_old_jobs_metrics_are_ignored():
    s = fleet(("round", None, task(5, job=OLD_JOB)), ("metrics", None, metrics(5, job=OLD_JOB)),
              ("round", None, task(1, job=JOB)), ("metrics", None, metrics(4, job=OLD_JOB)),
              ("metrics", None, metrics(1, job=JOB)))
    view = s.view(10.0)
    assert view["job"] == JOB and [r["round"] for r in view["rounds"]] == [1]


def test_the_lease_names_the_coordinator_and_its_job():
    lease = Lease(job=JOB, coordinator="pqsu-coordinator-farm-aaaaaa", host="cloud-1", pid=42, started=0.0)
    view = fleet(("lease", None, lease.to_json())).view(1.0)
    assert view["coordinator"] == "pqsu-coordinator-farm-aaaaaa" and view["job"] == JOB
    assert "cloud-1" in view["coordinator_detail"]
    assert fleet(("lease", None, lease.to_json()), ("lease", None, b"")).view(1.0)["coordinator"] is None


def test_done_ends_the_round_and_says_so():
    view = fleet(("round", None, task(3)), ("round", None, done_message(3, MODEL, JOB))).view(1.0)
    assert view["done"] == {"rounds": 3, "model_id": MODEL} and view["round"]["open"] is False


def test_malformed_messages_are_counted_and_change_nothing_else():
    s = fleet(("status", "pi-1", status("pi-1", "online")),
              ("status", "pi-1", b"{not json"), ("status", "pi-1", status("pi-9", "offline")),  # names another device
              ("round", None, b'{"v": 1, "type": "round", "round": -1}'), ("metrics", None, b"[]"),
              ("update", "pi-1", b"short"), ("lease", None, b'{"type": "lease"}'))
    view = s.view(10.0)
    assert view["bad_messages"] == 6
    assert devices(view)["pi-1"]["state"] == "online" and view["round"] is None and view["rounds"] == []


def test_an_empty_retained_status_removes_the_device():
    s = fleet(("status", "pi-1", status("pi-1", "online")), ("status", "pi-1", b""))
    assert s.view(1.0)["devices"] == []
