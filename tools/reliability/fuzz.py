"""Bad input through the broker, for `pqsu reliability fuzz`: thousands of malformed or mutated updates and
broken chunk sequences published at a real `pqsu cloud` through a real Mosquitto.

A fuzzing MQTT client poses as the only device, dev-000: it says it is online, waits for round 1, builds a
valid update for that round's model, and publishes the corpus of `pqsu.tools.reliability.corpus` (every case one
the coordinator must refuse, with the reason it must give) at QoS 1, one case after another. Then it
reports `failed` for round 1, which ends it, and sends an honest update in round 2, which must be accepted.
The figures come from the coordinator's metrics.jsonl, exit code and log; the expected ones from replaying
the same frames through the coordinator's own checks here.
"""
from __future__ import annotations

import logging
import tempfile
import time
from collections import Counter
from pathlib import Path

from pqsu.protocol import chunking, codec
from pqsu.protocol.messages import RoundTask, Status
from pqsu.protocol.mqtt import MqttClient
from pqsu.tools.reliability import corpus as fuzz_corpus
from pqsu.tools.lab.fleet_lab import Lab, expect, read_metrics, shutdown
from pqsu.tools.lab.observer import round_announced, wait_until

log = logging.getLogger(__name__)
DEVICE, OTHERS = "dev-000", ["dev-001", "dev-002", "dev-017", "pi-07"]
JOIN_S, STALL_S, RUN_S = 240.0, 90.0, 300.0
ROUND_TIMEOUT_S = 1800  # round 1 ends when the fuzzer reports `failed`, never at this deadline
# Cases published ahead of what the coordinator has logged handling: the broker queues at most 10,000
# messages for a slow subscriber and drops the rest silently, which would look like uncounted refusals.
WINDOW = 500
# The coordinator logs one line for each refusal but an incomplete set's (counted when it is dropped).
REFUSAL_LINES = (b"rejected update (", b"bad update chunk from ", b"ignored message on ")


def bad_input(folder: Path, cases: int, seed: int = 0) -> dict:
    """One coordinator, `cases` bad payload sequences in round 1, an honest update in round 2."""
    out = folder / "out"
    # The lab's observer needs only rounds and models: the storm of bad frames is for the coordinator.
    with Lab(folder, "fuzz", watch_updates=False) as lab:
        cloud = lab.cloud(out, rounds=2, clients=1, min_devices=1, round_timeout=ROUND_TIMEOUT_S)
        alive = lambda: cloud.poll() is None  # noqa: E731
        topics = lab.observer.topics
        fuzzer = MqttClient(lab.broker.url, "pqsu-fuzzer", persistent_session=False,
                            will=(topics.status(DEVICE), Status(DEVICE, "offline").to_json(), 1, True))
        fuzzer.connect(timeout_s=15)
        try:
            fuzzer.publish(topics.status(DEVICE), Status(DEVICE, "online").to_json(), retain=True)
            task1, model1 = _round(lab, 1, JOIN_S, alive)
            start = time.perf_counter()
            shapes = fuzz_corpus.model_shapes(model1)
            referee = fuzz_corpus.Referee(model1, task1, [DEVICE])
            seeds = [fuzz_corpus.honest_update(task1, DEVICE, shapes, seed + i) for i in (0, 1)]
            corpus, replay, dropped = fuzz_corpus.build(seeds, referee, OTHERS, cases, seed)
            built = time.perf_counter()
            log.info("fuzz: %d cases (%d frames) built in %.1f s, %d acceptable mutants dropped", len(corpus),
                     sum(len(c.frames) for c in corpus), built - start, dropped)
            _publish(fuzzer, lab, cloud, corpus)
            sent = time.perf_counter()
            fuzzer.publish(topics.status(DEVICE), Status(DEVICE, "failed", 1, "fuzzing done").to_json(), retain=True)
            task2, model2 = _round(lab, 2, RUN_S, alive)
            honest = codec.encode(fuzz_corpus.honest_update(task2, DEVICE, fuzz_corpus.model_shapes(model2),
                                                            seed + 2))
            predicted, held = dict(replay.counted), replay.held
            _, accepted = replay.feed(fuzz_corpus.Case("honest", DEVICE, _frames(honest), "accepted"))
            expect(accepted == [honest], "the honest update would not reach the coordinator's server", lab)
            fuzzer.publish_chunked(topics.update(DEVICE), honest, limit=128 * 1024)
            codes = shutdown([cloud], RUN_S)
            cloud_log = cloud.output
        finally:
            fuzzer.close()
        expect(codes["cloud"] is not None, "the coordinator did not finish round 2", lab)
    metrics = read_metrics(out)
    expect(len(metrics) >= 1, f"no round finished (coordinator exit {codes['cloud']}):\n{cloud_log[-3000:]}")
    r1, r2 = metrics[0], metrics[1] if len(metrics) > 1 else {}
    counted = r1["rejected"]
    result = {
        "cases": len(corpus), "frames": sum(len(c.frames) for c in corpus),
        "bytes": sum(len(f) for c in corpus for f in c.frames),
        "families": dict(sorted(Counter(c.family for c in corpus).items())),
        "acceptable_mutants_dropped": dropped,
        "predicted": dict(sorted(predicted.items())), "counted": dict(sorted(counted.items())),
        "counted_total": sum(counted.values()), "held_at_round_end": held,
        "unaccounted": len(corpus) - sum(counted.values()) - held,
        "round1": {k: r1[k] for k in ("uploads", "selected", "missing", "model_id")},
        "announced_model_id": task1.model_id, "round2_model_id": task2.model_id,
        "round2": {k: r2.get(k) for k in ("uploads", "selected", "rejected", "model_id")},
        "round2_predicted_rejected": {k: n - predicted.get(k, 0) for k, n in replay.counted.items()
                                      if n > predicted.get(k, 0)},
        "cloud_exit": codes["cloud"], "tracebacks": cloud_log.count("Traceback"),
        "rounds": [m["round"] for m in metrics],
        "build_seconds": round(built - start, 1), "storm_seconds": round(sent - built, 1),
        "cases_per_s": round(len(corpus) / max(sent - built, 1e-9)),
    }
    result["checks"] = checks(result)
    return result


def checks(r: dict) -> dict[str, bool]:
    """What a user checks: nothing crashed, nothing got in, the model did not move, every refusal is
    counted under its reason, and the coordinator still takes an honest update afterwards."""
    counted, predicted = r["counted"], r["predicted"]
    shortfall = sum(max(0, n - counted.get(k, 0)) for k, n in predicted.items())
    unexpected = [k for k, n in counted.items() if k != "queue-full" and n > predicted.get(k, 0)]
    return {
        "no crash (exit 0, both rounds, no traceback)": r["cloud_exit"] == 0 and r["rounds"] == [1, 2]
        and r["tracebacks"] == 0,
        "nothing accepted from the storm": r["round1"]["uploads"] == 0,
        "global model unchanged": r["round1"]["model_id"] == r["announced_model_id"] == r["round2_model_id"],
        "every refusal counted (counted + still held == sent)": r["counted_total"] + r["held_at_round_end"]
        == r["cases"],
        # a refusal the coordinator's full queue dropped is counted as queue-full instead of its own reason
        "each counted under its predicted reason": not unexpected and shortfall == counted.get("queue-full", 0),
        "honest update accepted afterwards": r["round2"]["uploads"] == 1,
    }


def _round(lab: Lab, n: int, timeout_s: float, alive) -> tuple[RoundTask, bytes]:
    """Round n's announcement and its model file, as the observer saw them."""
    expect(lab.observer.wait_for(round_announced(n), timeout_s, alive) or n in lab.observer.rounds,
           f"round {n} was never announced", lab)
    task = lab.observer.rounds[n]
    expect(wait_until(lambda: task.model_id in lab.observer.models, 60), f"round {n}'s model never arrived", lab)
    return task, lab.observer.models[task.model_id]


def _frames(payload: bytes) -> list[bytes]:
    return chunking.split(payload, 128 * 1024)  # as publish_chunked frames it


def _publish(client: MqttClient, lab: Lab, cloud, corpus: list[fuzz_corpus.Case]) -> None:
    """Each case's frames at QoS 1 (each acknowledged by the broker before the next), never more than
    WINDOW logged refusals ahead of the coordinator; then until it has logged them all."""
    prefix = f"{lab.observer.topics.prefix}/update/"
    lines, expected = _LineCounter(cloud.log_path), 0
    replay = fuzz_corpus.Replay()  # counts the lines expected so far, case by case
    for i, case in enumerate(corpus):
        for frame in case.frames:
            client.publish(prefix + case.topic_level, frame, qos=1)
        replay.feed(case)
        expected = replay.lines
        if i % 50 == 49:
            _wait_lines(lines, expected - WINDOW, lab, cloud)
        if i % 1000 == 999:
            log.info("fuzz: %d of %d cases sent, %d refusals logged by the coordinator", i + 1, len(corpus),
                     lines.count)
    _wait_lines(lines, expected, lab, cloud)


def _wait_lines(lines: "_LineCounter", target: int, lab: Lab, cloud) -> None:
    last, since = lines.update(), time.monotonic()
    while last < target:
        expect(cloud.poll() is None, "the coordinator exited during the storm", lab)
        expect(time.monotonic() - since < STALL_S, f"the coordinator logged no refusal for {STALL_S:.0f} s "
               f"({last} of {target} expected)", lab)
        time.sleep(0.05)
        if (now := lines.update()) > last:
            last, since = now, time.monotonic()


class _LineCounter:
    """Refusal lines in the coordinator's log, read as it grows."""

    def __init__(self, path: Path):
        self.path, self.offset, self.rest, self.count = path, 0, b"", 0

    def update(self) -> int:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        *complete, self.rest = (self.rest + data).split(b"\n")
        self.count += sum(any(p in line for p in REFUSAL_LINES) for line in complete)
        return self.count


def measure(quick: bool) -> dict:
    """Quick: 1,000 cases (the test suite's run); else 10,000."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pqsu-fuzz-") as tmp:
        result = bad_input(Path(tmp), 1000 if quick else 10_000)
    result["quick"], result["seconds"] = quick, round(time.perf_counter() - start, 1)
    return result


LAYERS = {"chunk-": "chunk framing", "foreign-topic": "topic", "queue-full": "coordinator queue"}
CODEC = {"truncated", "bad-checksum", "corrupt", "oversize", "unsupported", "bad-signature"}


def markdown(result: dict) -> list[str]:
    """The "## Bad input through the broker" section: what was sent, refusals by reason, the checks."""
    r, lines = result, ["## Bad input through the broker", ""]
    if r.get("quick"):
        lines += ["*Quick mode: a smoke-sized run, not the measurement.*", ""]
    by_layer: dict[str, list[str]] = {}
    for family, n in r["families"].items():
        layer, name = family.split(":", 1)
        by_layer.setdefault(layer, []).append(f"{name} {n:,}")
    lines += [
        f"A real `pqsu cloud` behind a private Mosquitto on 127.0.0.1, one MQTT client posing as its only device "
        f"(`{DEVICE}`): once round 1 was announced it built a valid update for that round's model and published "
        f"{r['cases']:,} bad payload sequences at QoS 1 ({r['frames']:,} frames, {r['bytes']:,} bytes, in "
        f"{r['storm_seconds']:.0f} s: {r['cases_per_s']:,} per second), then reported `failed` for round 1 and "
        "sent an honest update in round 2. Every sequence is one the coordinator must refuse: mutants the "
        "coordinator's own checks (`FederatedServer.submit`, run here on the announced model) would accept were "
        f"dropped before sending ({r['acceptable_mutants_dropped']:,} of them). `pqsu.tools.reliability.fuzz`, "
        f"{r.get('seconds', 0):.0f} s in all.", "",
        "- Update layer (a mutated update in valid chunk frames, so it reaches the codec and the round checks; "
        "CRC recomputed for three mutants in four and for every header rewrite): "
        + ", ".join(by_layer.get("update", [])) + ".",
        "- Chunk layer (broken frames of the valid update, each set under a fresh message id): "
        + ", ".join(by_layer.get("chunk", [])) + ".",
        "- Topics that are not a device's (`update/<not an id>`): " + ", ".join(by_layer.get("topic", [])) + ".", "",
        "Refusals by reason in round 1 (`rejected` in metrics.jsonl) against those predicted by replaying the "
        "same frames through the coordinator's reassembler bounds and server checks:", "",
        "| reason | layer | predicted | counted |", "|---|---|---:|---:|"]
    for reason in sorted(set(r["predicted"]) | set(r["counted"])):
        layer = next((v for k, v in LAYERS.items() if reason.startswith(k)),
                     "codec" if reason in CODEC else "round checks")
        lines.append(f"| {reason} | {layer} | {r['predicted'].get(reason, 0):,} | {r['counted'].get(reason, 0):,} |")
    lines += [f"| **total** | | {sum(r['predicted'].values()):,} | {r['counted_total']:,} |", "", *_outcome(r), "",
              "| check | result |", "|---|---|"]
    lines += [f"| {check} | {'pass' if ok else '**FAIL**'} |" for check, ok in r["checks"].items()]
    return lines + [""]


def _outcome(r: dict) -> list[str]:
    unaccounted = r["cases"] - r["counted_total"] - r["held_at_round_end"]
    model = "unchanged" if r["round1"]["model_id"] == r["announced_model_id"] else "CHANGED"
    honest = "accepted" if r["round2"]["uploads"] == 1 else "NOT accepted"
    return [f"Sent {r['cases']:,}; counted {r['counted_total']:,}; incomplete sets still held by the reassembler "
            f"when round 1 closed: {r['held_at_round_end']:,} (counted as `chunk-incomplete` once evicted by newer "
            f"ones or idle for 10 minutes); unaccounted for: {unaccounted:,}.",
            f"Round 1: {r['round1']['uploads']} updates accepted; global model {r['round1']['model_id'][:12]} "
            f"after it, {r['announced_model_id'][:12]} announced ({model}). Coordinator exit code "
            f"{r['cloud_exit']}, rounds {r['rounds']}, tracebacks in its log: {r['tracebacks']}. Round 2: the "
            f"honest update {honest} ({r['round2']['uploads']} upload; refusals {r['round2']['rejected'] or 'none'})."]
