"""What the dashboard shows, built only from the fleet's own messages: messages in, view state out.

Pure logic, no network: `FleetState` is fed (topic kind, payload, the dashboard's monotonic clock)
by the broker listener and turned into one JSON-able dict by `view()`. Everything is decoded
with the protocol's own messages (`pqsu.protocol.messages`); a payload that does not decode is
counted and ignored, so one bad publisher cannot stop the page.

What the messages can and cannot tell (docs/protocol.md):
- bytes up per device: the update frames seen on `update/<device>` since the dashboard started,
  less the chunk header (what the coordinator counts as `bytes_up`, re-sends included);
- bytes down per device: what the device says it downloaded (`download_bytes` of its statuses: a
  patch or the full file, chunk headers included); from a device that does not say, the model file
  of every round that asked it, as an older coordinator counted `bytes_down`;
- refusals: the coordinator reports updates it refused by reason only (metrics `rejected`), never by
  device; a device reports the patches it refused (status `refusals`), shown in its row.
Metrics keys are read defensively: a key an older or newer coordinator does not write is None
(shown as "-").
"""
from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass, field
from typing import Callable

from pqsu.protocol.chunking import HEADER_SIZE, ChunkError, parse_header
from pqsu.protocol.messages import Lease, MessageError, RoundTask, Status, message_type

ANSWERS = ("uploaded", "skipped", "failed")  # a status for the open round that answers it (offline does too)
# Round report keys copied into the view as they are (None when a coordinator does not write one).
ROUND_KEYS = ("round", "model_id", "accuracy", "loss", "train_loss", "selected", "uploads", "skipped", "missing",
              "bytes_up", "bytes_down", "bytes_down_flashed", "downloads", "model_bytes", "seconds")


@dataclass
class Device:
    status: Status
    seen_at: float | None          # dashboard clock of the last status; None: a retained one from before we started
    bytes_up: int = 0
    bytes_down: int = 0
    updates: int = 0               # update messages seen (frame index 0)
    counts: dict = field(default_factory=lambda: {"uploaded": 0, "skipped": 0, "failed": 0})
    counted: set = field(default_factory=set)  # (round, state) already counted: a retained repeat is not new
    downloaded: dict = field(default_factory=dict)  # (job, round) -> bytes the device said it downloaded
    refusals: dict = field(default_factory=dict)    # patches it refused, by reason (its own running count)


@dataclass
class OpenRound:
    task: RoundTask
    received_at: float
    closed: bool = False


class FleetState:
    """The dashboard's picture of fleet `fleet`. Thread-safe: the listener writes, the web server reads."""

    def __init__(self, fleet: str):
        self.fleet = fleet
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.version = 0
        self.job = ""
        self.lease: Lease | None = None
        self.link_up: Callable[[], bool] = lambda: False  # the listener's: is the broker connection up now?
        self.devices: dict[str, Device] = {}
        self.round: OpenRound | None = None
        self.tasks: dict[int, RoundTask] = {}   # every round of this job seen announced: models by round
        self.reports: dict[int, dict] = {}      # the closed rounds' metrics, this job's
        self.done: dict | None = None
        self.bad_messages = 0

    # -- input (the listener's thread) -------------------------------------------------
    def on_message(self, kind: str, arg: str | int | None, payload: bytes, now: float, retained: bool = False) -> None:
        """One message of the fleet, `kind` and `arg` as `Topics.parse` returns them."""
        with self.changed:
            try:
                handler = {"status": self._status, "round": self._round, "metrics": self._metrics,
                           "update": self._update, "lease": self._lease}.get(kind)
                if handler is None:
                    return
                handler(arg, payload, now, retained)
            except (MessageError, ChunkError, ValueError, TypeError, KeyError):
                self.bad_messages += 1
            self.version += 1
            self.changed.notify_all()

    def _status(self, device: str, payload: bytes, now: float, retained: bool) -> None:
        if not payload:  # an empty retained status deletes the device's
            self.devices.pop(device, None)
            return
        status = Status.from_json(payload)
        if status.device != device:
            raise MessageError(f"status on {device}'s topic names {status.device}")
        entry = self.devices.get(device)
        seen = None if retained else now
        if entry is None:
            entry = self.devices[device] = Device(status, seen)
        else:
            entry.status, entry.seen_at = status, seen if seen is not None else entry.seen_at
        if status.download and (not self.job or status.job == self.job):
            entry.downloaded[(status.job, status.round)] = status.download_bytes
        if status.refusals:
            entry.refusals = dict(status.refusals)
        key = (status.job, status.round, status.state)
        if status.state in entry.counts and key not in entry.counted and (not self.job or status.job == self.job):
            entry.counted.add(key)
            entry.counts[status.state] += 1

    def _round(self, _arg, payload: bytes, now: float, retained: bool) -> None:
        if not payload:  # a new job cleared the last one's retained round
            self.round = None
            return
        kind = message_type(payload)
        if kind == "done":
            body = json.loads(payload)
            if self._adopt(body.get("job", "")):
                self.done = {"rounds": body.get("rounds"), "model_id": body.get("model_id")}
                if self.round is not None:
                    self.round.closed = True
            return
        if kind != "round":
            raise MessageError(f"a {kind!r} message on the round topic")
        task = RoundTask.from_json(payload)
        if not self._adopt(task.job):
            return
        fresh = task.round not in self.tasks
        self.tasks[task.round] = task
        if fresh:  # the coordinator's count: the model file once per device asked
            for d in self._asked(task):
                self.devices[d].bytes_down += task.model_bytes
        self.done = None
        closing = task.remaining_s == 0
        if self.round is None or self.round.task.round != task.round:
            self.round = OpenRound(task, now, closed=closing)
        else:
            self.round.task, self.round.received_at = task, now
            self.round.closed = self.round.closed or closing

    def _metrics(self, _arg, payload: bytes, now: float, retained: bool) -> None:
        if not payload:
            return
        body = json.loads(payload)  # Python's json takes the NaN the coordinator writes for "no accuracy"
        if not isinstance(body, dict) or not isinstance(body.get("round"), int):
            raise MessageError("metrics without a round")
        if not self._adopt(body.get("job", "") if isinstance(body.get("job", ""), str) else "", switch=False):
            return
        self.reports[body["round"]] = body
        if self.round is not None and self.round.task.round == body["round"]:
            self.round.closed = True

    def _update(self, device: str, payload: bytes, now: float, retained: bool) -> None:
        header = parse_header(payload)  # a frame that is not one is counted as bad: it carried no update
        entry = self.devices.get(device)
        if entry is None:  # an update before any status: keep its bytes all the same
            entry = self.devices[device] = Device(Status(device, "online"), now)
        entry.bytes_up += len(payload) - HEADER_SIZE
        entry.seen_at = now
        if header.index == 0:  # one per update, however many frames it takes
            entry.updates += 1

    def _lease(self, _arg, payload: bytes, now: float, retained: bool) -> None:
        lease = Lease.from_json(payload) if payload else None
        if lease is not None:
            self._adopt(lease.job, switch=False)  # the holder's job, before its first round is announced
        self.lease = lease

    def _adopt(self, job: str, switch: bool = True) -> bool:
        """False for a message of another job than ours. The round topic (`switch`) is the one a new
        coordinator takes over, so a new job there starts the picture afresh (devices stay); the lease
        and metrics only name the job when none is known yet."""
        if not job or job == self.job:
            return True
        if self.job and not switch:
            return False
        self.job, self.round, self.tasks, self.reports, self.done = job, None, {}, {}, None
        for d in self.devices.values():
            d.bytes_up = d.bytes_down = d.updates = 0
            d.counts = {k: 0 for k in d.counts}
            d.counted = set()
        return True

    def _asked(self, task: RoundTask) -> list[str]:
        if task.devices:
            for d in task.devices:
                self.devices.setdefault(d, Device(Status(d, "online"), None))
            return list(task.devices)
        return [d for d, e in self.devices.items() if e.status.trains and e.status.state != "offline"]

    # -- output (the web server's threads) ----------------------------------------------
    def view(self, now: float) -> dict:
        """Everything the page draws, JSON-able (NaN becomes None, since browsers' JSON has no NaN)."""
        with self.lock:
            latest = max(self.tasks.values(), key=lambda t: t.round).model_id if self.tasks else None
            if self.done:
                latest = self.done.get("model_id") or latest
            devices = [self._device_view(d, e, now, latest) for d, e in sorted(self.devices.items())]
            refusals: dict[str, int] = {}
            rounds = []
            for r in sorted(self.reports):
                rep = self.reports[r]
                row = {k: rep.get(k) for k in ROUND_KEYS}
                row["rejected"] = rep.get("rejected") if isinstance(rep.get("rejected"), dict) else {}
                for reason, n in row["rejected"].items():
                    if isinstance(n, int):
                        refusals[reason] = refusals.get(reason, 0) + n
                rounds.append(row)
            return _finite({
                "fleet": self.fleet, "job": self.job or None,
                "coordinator": self.lease.coordinator if self.lease else None,
                "coordinator_detail": self.lease.describe() if self.lease else None,
                "connected": self.link_up(), "version": self.version, "devices": devices,
                "round": self._round_view(now), "rounds": rounds, "refusals": refusals, "done": self.done,
                "bad_messages": self.bad_messages,
            })

    def _device_view(self, device: str, e: Device, now: float, latest: str | None) -> dict:
        s = e.status
        task = self.tasks.get(s.round)
        online = s.state != "offline"
        return {
            "device": device, "online": online, "state": s.state, "trains": s.trains,
            "round": s.round if s.round >= 0 else None, "detail": s.detail,
            "last_seen_s": None if e.seen_at is None else max(0.0, now - e.seen_at),
            "bytes_up": e.bytes_up, "bytes_down": sum(e.downloaded.values()) if e.downloaded else e.bytes_down,
            "updates": e.updates, "patch_refusals": sum(e.refusals.values()), "refusal_reasons": e.refusals,
            # a training device holds the model of the round it last worked on; an inference-only one follows them all
            "model_id": task.model_id if task else (latest if online and not s.trains else None),
            "uploaded": e.counts["uploaded"], "skipped": e.counts["skipped"], "failed": e.counts["failed"],
        }

    def _round_view(self, now: float) -> dict | None:
        if self.round is None:
            return None
        task, closed = self.round.task, self.round.closed or self.done is not None
        asked = self._asked(task)
        answered = sorted(d for d in asked if d in self.devices and self._answers(self.devices[d].status, task))
        left = None
        if task.remaining_s is not None:
            left = 0.0 if closed else max(0.0, task.remaining_s - (now - self.round.received_at))
        return {"round": task.round, "model_id": task.model_id, "asked": len(asked), "answered": len(answered),
                "answered_devices": answered, "waiting_devices": sorted(set(asked) - set(answered)),
                "time_left_s": left, "open": not closed, "model_bytes": task.model_bytes}

    @staticmethod
    def _answers(status: Status, task: RoundTask) -> bool:
        same_job = not task.job or not status.job or status.job == task.job
        return status.state == "offline" or (same_job and status.round == task.round and status.state in ANSWERS)


def _finite(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x
