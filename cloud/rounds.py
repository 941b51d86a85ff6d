"""The one round loop, whatever carries the messages.

For each round: choose devices among those available, publish the model, announce the round,
collect answers until every asked device has answered (uploaded, skipped, failed or gone
offline), the deadline passes or the transport says nothing more can come, close the round
(aggregate, evaluate), report and checkpoint. `pqsu simulate` runs it over
`InProcessTransport`, `pqsu cloud` over `MqttTransport`: the rounds differ only in transport.
Restarted with a checkpoint's meta, it resumes after the last checkpointed round.

Every payload goes to `FederatedServer.submit`, which judges it; the transport only moves it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pqsu.cloud import checkpoint, report
from pqsu.cloud.device_keys import DeviceKeys
from pqsu.cloud.server import FederatedServer, RoundReport, choose_devices
from pqsu.cloud.transport import ANSWERS, COUNTED, UPDATE, Message, Transport
from pqsu.protocol.atomic import atomic_write

log = logging.getLogger(__name__)
POLL_S = 0.05  # how long one wait for a message lasts: the deadline and stop are checked between waits


@dataclass(frozen=True)
class RunnerConfig:
    rounds: int = 10
    min_devices: int = 1               # round 1 starts once this many devices are available
    join_timeout_s: float | None = 300.0   # how long round 1 waits for them
    round_timeout_s: float | None = 300.0  # a round's deadline; None: no deadline (in-process)
    fraction: float = 1.0
    seed: int = 0
    out: str | None = None             # metrics.jsonl, checkpoints/ and the final outputs; None: nothing written


class RoundRunner:
    def __init__(self, cfg: RunnerConfig, server: FederatedServer, transport: Transport, *,
                 meta: dict | None = None, on_round: Callable[[RoundReport], None] | None = None):
        """`meta` is what `build_server` returned (config, model info and, resumed, the reports so far)."""
        self.cfg, self.server, self.transport, self.on_round = cfg, server, transport, on_round
        self.meta = meta if meta is not None else {}
        self.rounds: list[dict] = list(self.meta.pop("reports", []))
        self.out = Path(cfg.out) if cfg.out else None
        self.model = b""  # the model file after the last round, once run() returned

    def run(self, stop: threading.Event | None = None, *, started: float | None = None) -> dict:
        """Every remaining round, then the summary. `started` (perf_counter) is when the run began,
        if that was before this call (loading data and preparing the model count too)."""
        stop = stop or threading.Event()
        started = time.perf_counter() if started is None else started
        self.transport.start()
        try:
            self._rewrite_metrics()
            first = self.server.rounds_done + 1
            if "initial_accuracy" not in self.meta:
                self.meta["initial_accuracy"] = self.server.evaluate().accuracy
            for r in range(first, self.cfg.rounds + 1):
                if stop.is_set():
                    break
                self.run_round(r, stop, wait_s=self.cfg.join_timeout_s if r == first else self.cfg.round_timeout_s)
            data, info = self.server.model_message()
            self.model = data
            self.transport.finish(data, info.model_id, len(self.rounds), self.server.downlink.patches())
        finally:
            self.transport.stop()
        info = self.server.info
        summary = report.summarize(self.rounds, arch=info.spec["arch"], in_shape=info.in_shape,
                                   num_classes=len(info.classes), seconds=time.perf_counter() - started,
                                   initial_accuracy=self.meta.get("initial_accuracy"))
        summary.update(self.transport.summary())
        summary["completed"] = len(self.rounds) >= self.cfg.rounds
        if self.out:
            report.write_outputs(self.out, config={**self.meta.get("config", {}), "precision": self.server.cfg.precision},
                                 rounds=self.rounds, summary=summary, model=data)
        return summary

    def run_round(self, r: int, stop: threading.Event, wait_s: float | None) -> dict | None:
        """One round; its report, or None when `stop` was set before it opened."""
        server, transport = self.server, self.transport
        # min_devices gates the start of training; later rounds go on with whoever is there,
        # so a board that dies does not stop the fleet.
        needed = self.cfg.min_devices if not self.rounds else 1
        if isinstance(server.keys, DeviceKeys):
            server.keys.refresh()  # a device removed from the keys file is neither asked nor counted from now on
        online = transport.wait_for_devices(needed, wait_s, stop, server.admits)
        if stop.is_set():
            return None
        selected = choose_devices(online, self.cfg.fraction, self.cfg.seed, r)
        task = server.open_round(r, selected)
        data, info = server.model_message()
        transport.publish_model(data, info.model_id, server.downlink.patches())
        deadline = None if self.cfg.round_timeout_s is None else time.time() + self.cfg.round_timeout_s
        task = dataclasses.replace(task, devices=tuple(selected), deadline=deadline, model_bytes=len(data),
                                   patches=server.downlink.offers())
        transport.announce(task)
        announced = time.perf_counter()
        log.info("round %d: %d devices, model %s (%d bytes)", r, len(selected), info.model_id[:12], len(data))

        asked, answered = set(selected), {}
        for message in transport.backlog():  # arrived between rounds: a resent update may belong to this one
            self.take(message, r, asked, answered)
        while (not asked <= answered.keys() and not transport.quiet() and not stop.is_set()
               and (deadline is None or time.time() < deadline)):
            message = transport.poll(POLL_S)
            if message is not None:
                self.take(message, r, asked, answered)
        collected = time.perf_counter()
        if missing := asked - answered.keys():
            why = "stopped" if stop.is_set() else "deadline passed" if deadline is not None else "closed"
            log.warning("round %d: %s without %s", r, why, ", ".join(sorted(missing)))

        if hand_over := getattr(transport, "hand_over", None):  # aggregator workers' last partials
            hand_over(task)
        downlink = self._downlink_bytes(transport.downloads())  # before close_round makes the next version
        closed = server.close_round(skipped=sum(v == "skipped" for v in answered.values()))
        closed.bytes_down = downlink["bytes_down"]  # what the devices downloaded, not file x devices
        # the devices' evaluation of the model they received this round (the one before this close's step)
        closed.device_eval = report.device_evaluation(transport.evaluations())
        transport.close_round(task)
        rep = closed.to_dict()
        rep.update(downlink)
        rep["downlink"] = server.downlink.step.to_dict()  # how the next version was made, and how long it took
        rep["missing"] = len(missing)
        for reason, n in transport.take_refused().items():
            rep["rejected"][reason] = rep["rejected"].get(reason, 0) + n
        # Announcement to last answer, and the cloud's own work after it (aggregate, export, evaluate):
        # `pqsu bench fleet` subtracts the slowest device's compute from the first to get the overhead.
        rep["collect_seconds"] = collected - announced
        rep["server_seconds"] = time.perf_counter() - collected
        rep.update(transport.round_extras())
        self.rounds.append(rep)
        self._save(r, rep)
        transport.publish_report(rep)
        log.info("round %d: accuracy %.4f, %d/%d uploads, %d bytes up%s", r, rep["accuracy"], rep["uploads"],
                 rep["selected"], rep["bytes_up"], report.device_eval_text(rep.get("device_eval"), ", "))
        if self.on_round:
            self.on_round(closed)
        return rep

    def _downlink_bytes(self, downloads: dict[str, dict]) -> dict:
        """The round's downlink as the devices counted it: `bytes_down` (what they downloaded, first model
        over the radio), `bytes_down_flashed` (the same, had every device been flashed with the round-0
        model: a device's first download would have been the patch from it, or nothing) and `downloads`."""
        downlink, limit = self.server.downlink, self.transport.chunk_limit
        flashed = sum(downlink.wire_cost(downlink.origin, limit) if d["first"] else d["bytes"]
                      for d in downloads.values())
        return {"bytes_down": sum(d["bytes"] for d in downloads.values()), "bytes_down_flashed": flashed,
                "downloads": {k: sum(d["kind"] == k for d in downloads.values()) for k in ("patch", "full")}}

    def take(self, message: Message, r: int, asked: set[str], answered: dict[str, str]) -> None:
        """Fold one message into round `r`: an update goes to the server (counted as the device's
        answer if accepted); a skipped or failed status for this round, or an offline one, answers too."""
        if message.kind == UPDATE:
            if self.server.submit(message.payload, sender=message.device).accepted:
                answered[message.device] = "uploaded"
            return
        if message.kind == COUNTED:  # accepted by an aggregator worker
            answered[message.device] = "uploaded"
            return
        if message.device not in asked or message.device in answered or message.kind not in ANSWERS:
            return
        if message.kind == "offline" or message.round == r:
            answered[message.device] = message.kind

    def _save(self, r: int, rep: dict) -> None:
        if self.out is None:
            return
        o = self.server.optimizer
        files, chain = self.server.downlink.state()
        try:  # a full disk keeps the previous checkpoint valid; the run goes on and tries again next round
            checkpoint.save(self.out / "checkpoints", checkpoint.Checkpoint(
                r, {k: v.copy() for k, v in self.server.master.items()}, o.velocity,
                {**self.meta, "reports": self.rounds, **self.transport.state(), "downlink": chain}, files))
        except OSError as exc:
            log.error("round %d: checkpoint not written (%s); a restart resumes from the previous one", r, exc)
        report.append_metrics(self.out, rep)

    def _rewrite_metrics(self) -> None:
        """metrics.jsonl as the checkpoint has it: a run killed after appending a round's line but before
        checkpointing it redoes that round, and must not list it twice."""
        if self.out is None:
            return
        path = self.out / "metrics.jsonl"
        lines = "".join(json.dumps(rep) + "\n" for rep in self.rounds)
        if path.exists() and path.read_text() != lines:
            log.info("metrics.jsonl rewritten from the checkpoint (%d rounds)", len(self.rounds))
            atomic_write(path, lines.encode())
