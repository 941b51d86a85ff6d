"""`pqsu bench scale`: updates per second per core before vs after the batch path, 1 vs 2 aggregator
workers through Mosquitto, and a 100,000-device round aggregated by workers (issue 16).

Every figure is measured in this run, side by side; on a shared machine the ratios are what counts.

1. One core, no broker: the same encoded updates judged, decoded and aggregated by the one-by-one path
   (`codec.decode`, a block at a time: the code before issue 16, still the fallback) and by the batch
   path (`submit_many`: scan, one vectorized decode per batch, one scatter-add), for the cnn through
   `FederatedServer` and for a ~1M-parameter model at 1% density through `RoundIntake`. The two
   aggregates are compared (largest difference, and relative to the largest entry). Rates per CPU second
   of this process (the per-core rate) and per wall second.
2. Workers: the round's updates are queued in Mosquitto for `pqsu aggregator` processes (persistent
   sessions primed beforehand), then 1 or 2 workers, one pinned per core, drain them; the rate is devices
   granted per second between the first and the last grant (the coordinator's clock), broker delivery
   included. A warm-up round, then alternated repeats (median and range), with the CPU share of every
   process of the drain (workers, Mosquitto, coordinator) from /proc, to say which one is the limit.
3. A 100,000-device round (or --quick: 5,000) of a small model through 2 workers, checked against the
   exact FedAvg of the updates sent (tools/lab/loadgen.py), with each worker's peak RSS.
"""
from __future__ import annotations

import datetime as dt
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pqsu.cloud.aggregate import FedAvg
from pqsu.cloud.intake import Round, RoundIntake, limits_for
from pqsu.cloud.workers import WorkerPool
from pqsu.protocol.codec import encode
from pqsu.protocol.messages import RoundTask
from pqsu.protocol.mqtt import MqttClient
from pqsu.protocol.topics import Topics
from pqsu.tools.bench.codec import MODEL_SHAPES as MODEL_1M
from pqsu.tools.lab.broker import Mosquitto
from pqsu.tools.lab.loadgen import FleetUpdates, LoadGenerator, device_ids
from pqsu.protocol.process import CLI, Process, pqsu_env, reap

log = logging.getLogger(__name__)
JOB = "20261202T000000Z-bench0"
SMALL = {"conv1.weight": (16, 1, 3, 3), "conv1.bias": (16,), "conv2.weight": (32, 16, 3, 3), "conv2.bias": (32,),
         "fc1.weight": (64, 1568), "fc1.bias": (64,), "fc2.weight": (10, 64), "fc2.bias": (10,)}  # ~106k params


# Broker vendors' own published figures (not measured here): what a cluster is reported to carry.
VENDOR_FIGURES = [
    ("EMQX 4.3, 5 nodes x 32 cores", 500_000, 50, "QoS 1, 50-byte payloads",
     "https://www.emqx.com/en/resources/emqx-v-4-3-0-ten-million-connections-performance-test-report"),
    ("EMQX 5.0, 23 nodes", 1_000_000, None, "1-to-1 publish/subscribe, 100 M connections",
     "https://www.emqx.com/en/blog/reaching-100m-mqtt-connections-with-emqx-5-0"),
    ("EMQX Cloud, 100k CONN / 100k TPS plan", 100_000, 10_240, "QoS 0, 10 KB payloads",
     "https://www.emqx.com/en/resources/performance-test-report-for-emqx-cloud-100000-connection"),
    ("HiveMQ, 200 M connections benchmark", 1_000_000, None, "peak PUBLISH messages/s",
     "https://www.hivemq.com/benchmark-200-million/"),
]


def _worst(a: dict, b: dict) -> tuple[float, float]:
    diff = max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)
    return diff, diff / max(float(np.abs(b[k]).max()) for k in a)


def _through(judge, items: list, batch: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) to judge `items` in batches."""
    t0, c0 = time.perf_counter(), time.process_time()
    for j in range(0, len(items), batch):
        judge(items[j:j + batch])
    return time.perf_counter() - t0, time.process_time() - c0


def one_core(quick: bool) -> dict:
    """Before vs after on the same payloads, alternated (best of `passes` each)."""
    from pqsu.tools.bench.aggregate import make_server, sparse_update

    out, passes = {}, 1 if quick else 3
    server = make_server("cnn")
    n = 200 if quick else 2000
    ids = [f"sim-{i:05d}" for i in range(n)]
    task = server.open_round(1, ids)
    rng = np.random.default_rng(0)
    cnn_items = [(encode(sparse_update(rng, server.shapes, 1, d, task.model_id)), d) for d in ids]

    def cnn(fast: bool) -> tuple[float, dict]:
        server.open_round(1, ids)
        server.intake.fast = fast
        if fast:
            s = _through(server.submit_many, cnn_items, 256)
        else:
            s = _through(lambda chunk: [server.submit(p, d) for p, d in chunk], cnn_items, 256)
        assert server.intake.round.uploads == n
        return s, server.intake.aggregator.result()
    out["cnn"] = _compare(cnn, passes, n, "cnn (unpruned), 2% sparse int8, FederatedServer.submit",
                          sum(math.prod(s) for s in server.shapes.values()), np.mean([len(p) for p, _ in cnn_items]))

    n = 200 if quick else 1500
    fleet = FleetUpdates(MODEL_1M, 1, "m1", density=0.01, templates=n)  # every update distinct
    ids = device_ids(n)
    items = [(fleet.payload(i, d), d) for i, d in enumerate(ids)]
    intake = RoundIntake(MODEL_1M, limits_for(MODEL_1M))

    def big(fast: bool) -> tuple[float, dict]:
        intake.open(Round(RoundTask(round=1, model_id="m1"), tuple(ids), 0.0))
        intake.fast = fast
        if fast:
            s = _through(intake.submit_many, items, 256)
        else:
            s = _through(lambda chunk: [intake.submit(p, d) for p, d in chunk], items, 256)
        assert intake.round.uploads == n
        return s, intake.aggregator.result()
    out["model_1m"] = _compare(big, passes, n, "~1M params (tools/bench/codec.py), 1% sparse int8, RoundIntake",
                               sum(math.prod(s) for s in MODEL_1M.values()), np.mean([len(p) for p, _ in items]))
    return out


def _compare(run, passes: int, n: int, what: str, params: int, update_bytes: float) -> dict:
    """Rates per wall second and per CPU second of the one process (= per core: the path is single-threaded,
    and on a shared machine the CPU clock does not count the time other jobs held the core)."""
    before, after = [], []
    for _ in range(passes):  # alternated, so both see the same machine load
        s, old = run(False)
        before.append(s)
        s, new = run(True)
        after.append(s)
    diff, rel = _worst(new, {k: v.astype(np.float64) for k, v in old.items()})
    rate = lambda runs, i: sorted(n / r[i] for r in runs)  # noqa: E731
    b, a, bc, ac = rate(before, 0), rate(after, 0), rate(before, 1), rate(after, 1)
    return {"what": what, "params": params, "updates": n, "update_bytes": round(update_bytes), "passes": passes,
            "before_per_s": b[-1], "after_per_s": a[-1], "speedup": a[-1] / b[-1],
            "before_per_cpu_s": bc[-1], "after_per_cpu_s": ac[-1], "cpu_speedup": ac[-1] / bc[-1],
            "after_per_cpu_s_median": float(np.median(ac)), "after_per_cpu_s_range": [ac[0], ac[-1]],
            "after_per_s_range": [a[0], a[-1]], "max_abs_diff": diff, "max_rel_diff": rel,
            "load_average": os.getloadavg()}


class _Fleet:
    """Mosquitto, the coordinator's WorkerPool, and worker processes; updates queued before workers run."""

    def __init__(self, folder: Path, shapes: dict, partitions: int):
        self.folder, self.shapes, self.partitions = folder, shapes, partitions
        # Unbounded queues: the round's updates wait in the workers' sessions until they start.
        self.broker = Mosquitto(folder / "broker", persistence=False,
                                extra_config="max_queued_messages 0\nmax_queued_bytes 0\nmax_inflight_messages 0\n")

    def __enter__(self) -> "_Fleet":
        self.broker.start()
        self.url, self.topics = self.broker.url, Topics("bench")
        self.client = MqttClient(self.url, "bench-coordinator")
        self.pool = WorkerPool(self.client, self.topics, JOB)
        self.pool.subscribe()
        self.client.connect()
        self.pool.publish_plan(self.shapes, partitions=self.partitions, clip_norm=None)
        return self

    def __exit__(self, *exc) -> None:
        self.client.close()
        self.broker.close()

    def workers(self, n: int, tag: str) -> list[Process]:
        procs = []
        for i in range(n):
            parts = ",".join(str(p) for p in range(i, self.partitions, n))
            procs.append(Process(CLI + ["aggregator", "--broker", self.url, "--fleet", "bench", "--worker",
                                        f"{tag}-w{i}", "--partitions", parts, "--flush", "2"],
                                 self.folder / f"{tag}-w{i}.log", env=pqsu_env(1)))
            _pin(procs[-1].pid, i)
        deadline = time.monotonic() + 60
        while not all(self.pool.status.get(f"{tag}-w{i}", {}).get("state") == "online" for i in range(n)):
            if time.monotonic() > deadline or any(not p.running for p in procs):
                raise RuntimeError("workers did not come online:\n" + "\n".join(p.tail() for p in procs))
            time.sleep(0.05)
        return procs

    def round(self, n_workers: int, devices: list[str], fleet: FleetUpdates, round_: int, tag: str) -> dict:
        """Prime the workers' sessions, queue every update, start the workers and time the round."""
        fleet.round = round_
        reap(self.workers(n_workers, tag), 10.0, signal_first=True)  # sessions (and subscriptions) now exist
        task = RoundTask(round=round_, model_id=fleet.model_id, devices=(), job=JOB, partitions=self.partitions)
        rnd, agg = Round(task, tuple(devices), 0.0), FedAvg(self.shapes)
        self.pool.open(rnd, agg)
        with LoadGenerator(self.url, "bench", connections=4, name=f"load-{tag}") as lg:
            sent = lg.play(devices, fleet.payload, self.partitions)
        self.client.publish(self.topics.round, task.to_json(), retain=True)
        procs = self.workers(n_workers, tag)
        counted, first, last, cpu_first, cpu_last = 0, None, None, None, None
        deadline = time.monotonic() + max(120.0, len(devices) / 200)
        peak = {}
        pids = {"broker": self.broker.proc.pid, **{p.name: p.pid for p in procs}}
        while counted < len(devices) and time.monotonic() < deadline:
            if not all(p.running for p in procs):
                raise RuntimeError("a worker died:\n" + "\n".join(p.tail() for p in procs))
            self.pool.apply()
            got = len(self.pool.take_counted())
            if got:
                now = time.perf_counter()
                cpu = {k: _cpu_s(pid) for k, pid in pids.items()} | {"coordinator": time.process_time()}
                first, cpu_first = first or now, cpu_first or cpu
                last, cpu_last, counted = now, cpu, counted + got
            peak.update({p.name: _peak_rss(p.pid) for p in procs})
            time.sleep(0.01)
        # CPU seconds each process used between the first and the last grant, and its share of that time
        cpu_used = {k: cpu_last[k] - cpu_first[k] for k in cpu_last} if cpu_first else {}
        span = (last - first) if counted > 1 else 0.0
        lost = self.pool.hand_over(timeout_s=30)
        peak.update({p.name: _peak_rss(p.pid) for p in procs})
        reap(procs, 10.0, signal_first=True)
        diff, rel = _worst(agg.result() or {k: np.zeros(s) for k, s in self.shapes.items()},
                           fleet.expected_fedavg(len(devices)))
        return {"workers": n_workers, "devices": len(devices), "counted": counted, "aggregated": agg.count,
                "lost": sum(lost.values()), "rejected": dict(rnd.rejected),
                "updates_per_s": (counted - 1) / (last - first) if counted > 1 else 0.0,
                "publish_per_s": len(devices) / sent["seconds"], "publish_mb_per_s":
                    sum(len(fleet.payload(i, d)) for i, d in enumerate(devices[:200])) / 200 * len(devices)
                    / sent["seconds"] / 1e6,
                "max_abs_diff": diff, "max_rel_diff": rel, "worker_peak_rss_bytes": peak,
                "cpu_s": cpu_used, "cpu_share": {k: v / span for k, v in cpu_used.items()} if span else {},
                "per_worker_cpu_s": (counted - 1) / sum(v for k, v in cpu_used.items() if k.startswith(tag))
                if counted > 1 and any(v for k, v in cpu_used.items() if k.startswith(tag)) else 0.0,
                "load_average": os.getloadavg()}


def _pin(pid: int, i: int) -> None:
    """Worker i on core i (mod the cores this process may use): two workers never share a core, and a
    worker is not moved between cores mid-measurement. Mosquitto and this process are left unpinned."""
    cores = sorted(os.sched_getaffinity(0))
    try:
        os.sched_setaffinity(pid, {cores[i % len(cores)]})
    except OSError as exc:  # not allowed here: measured unpinned, and the log says so
        log.warning("could not pin worker %d: %s", i, exc)


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _peak_rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def workers(quick: bool, folder: Path) -> dict:
    from pqsu.tools.bench.aggregate import make_server

    shapes = make_server("cnn").shapes
    n, repeats = (1000, 1) if quick else (10_000, 3)
    fleet = FleetUpdates(shapes, 1, "cnn", density=0.02, templates=64)
    devices = device_ids(n)
    runs = {"one": [], "two": []}
    with _Fleet(folder / "workers", shapes, partitions=8) as f:
        f.round(1, devices[:n // 5], fleet, 1, "warm")  # first start-up: page cache, imports, broker warm
        for r in range(repeats):  # alternated, so both see the same load
            runs["one"].append(f.round(1, devices, fleet, 2 + 2 * r, f"one{r}"))
            runs["two"].append(f.round(2, devices, fleet, 3 + 2 * r, f"two{r}"))
    out = {"model": "cnn (unpruned), 2% sparse int8", "params": sum(math.prod(s) for s in shapes.values()),
           "repeats": repeats, "runs": runs}
    for k, rs in runs.items():  # the median run of each (by rate) stands for it in the tables
        rates = [x["updates_per_s"] for x in rs]
        out[k] = sorted(rs, key=lambda x: x["updates_per_s"])[len(rs) // 2]
        out[k + "_range"] = [min(rates), max(rates)]
    ratios = [t["updates_per_s"] / o["updates_per_s"] for o, t in zip(runs["one"], runs["two"]) if o["updates_per_s"]]
    out["speedup"] = out["two"]["updates_per_s"] / out["one"]["updates_per_s"] if out["one"]["updates_per_s"] else 0
    out["speedup_range"] = [min(ratios), max(ratios)] if ratios else [0, 0]
    # What 2 workers would give with a whole core each: their rate per worker CPU second against one worker's
    # (the machine's other jobs decide how much CPU a worker gets, not the workers).
    one_cpu, two_cpu = out["one"]["per_worker_cpu_s"], out["two"]["per_worker_cpu_s"]
    out["cpu_speedup"] = 2 * two_cpu / one_cpu if one_cpu else 0.0
    return out


def big_round(quick: bool, folder: Path) -> dict:
    n = 5_000 if quick else 100_000
    fleet = FleetUpdates(SMALL, 1, "small", density=0.01, templates=512)
    with _Fleet(folder / "round", SMALL, partitions=16) as f:
        r = f.round(2, device_ids(n), fleet, 1, "big")
    r["model"] = "small cnn (~106k params), 1% sparse int8"
    r["params"] = sum(math.prod(s) for s in SMALL.values())
    r["model_fp32_bytes"] = 4 * r["params"]
    return r


def run(quick: bool = False, out: Path | None = None) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="pqsu-bench-scale-")) if out is None else out / "scale"
    folder.mkdir(parents=True, exist_ok=True)
    result = {"measured_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "load_average": os.getloadavg(), "python": sys.version.split()[0]}
    log.info("scale: one core, before vs after")
    result["one_core"] = one_core(quick)
    log.info("scale: 1 vs 2 workers through Mosquitto")
    result["workers"] = workers(quick, folder)
    log.info("scale: a %s-device round", "5,000" if quick else "100,000")
    result["round"] = big_round(quick, folder)
    result["load_average_after"] = os.getloadavg()
    return result


def _projection(r: dict) -> list[str]:
    """Aggregation capacity of N worker machines from the measured per-worker rate, beside what the broker
    must then carry and what vendors report their clusters carry."""
    w = r["workers"]
    per_worker = w["one"]["updates_per_s"]
    update_bytes = r["one_core"]["cnn"]["update_bytes"]
    lines = ["### Projection to N machines (from the 1-worker rate above; broker figures are the vendors')", "",
             f"One worker drained {per_worker:,.0f} updates/s of {update_bytes:,} bytes here (one core; the "
             "load average is in the table above). Workers share nothing but the broker, so N machines of C cores run N x C workers; the "
             "coordinator only grants claims and adds one partial per worker per flush. What then bounds a round "
             "is the broker, which must carry every update once in and once out:", "",
             f"| machines x cores | workers | updates/s, linear | at the measured 2-worker efficiency "
             f"({w['speedup'] / 2:.0%}) | broker MB/s in (linear) | 100,000-device round (linear) |",
             "|---|---|---|---|---|---|"]
    for machines, cores in ((1, 2), (4, 8), (16, 16), (64, 16)):
        n = machines * cores
        rate = n * per_worker
        lines.append(f"| {machines} x {cores} | {n} | {rate:,.0f} | {rate * w['speedup'] / 2:,.0f} | "
                     f"{rate * update_bytes / 1e6:,.0f} | {100_000 / rate:,.1f} s |")
    lines += ["", "Published broker figures (vendors' own benchmarks, small messages unless stated; not measured "
              "here):", ""]
    for name, rate, size, note, url in VENDOR_FIGURES:
        mb = f", {rate * size / 1e6:,.0f} MB/s" if size else ""
        lines.append(f"- [{name}]({url}): {rate:,} messages/s ({note}{mb})")
    lines.append("")
    return lines


def _load(x) -> str:
    return "/".join(f"{v:.1f}" for v in x)


def to_markdown(r: dict) -> str:
    """The scale section of docs/results.md, from the measurements (nothing typed by hand)."""
    cores = os.cpu_count() or 0
    lines = [f"## Scale: updates per second per core, aggregator workers (measured {r['measured_at']})", "",
             f"Load average (1/5/15 min) at the start: {_load(r['load_average'])}, at the end: "
             f"{_load(r.get('load_average_after', r['load_average']))}, on this {cores}-core machine shared with "
             "other jobs while measured. Wall-clock rates move with that load; the per-core rate is updates per CPU "
             "second of the one single-threaded process (the CPU clock does not run while other jobs hold the "
             "core), and ratios were measured side by side (alternated passes).", "",
             "### One core: the one-by-one path (before) vs the batch path (after)", "",
             "| model | params | update bytes | updates | before /CPU s | after /CPU s (median; range) | speed-up "
             "(CPU) | before /s wall | after /s wall | load avg | largest difference (relative) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in r["one_core"].values():
        lo, hi = c.get("after_per_cpu_s_range", [c["after_per_s"]] * 2)
        lines.append(f"| {c['what']} | {c['params']:,} | {c['update_bytes']:,} | {c['updates']:,} x {c.get('passes', 1)} "
                     f"| {c.get('before_per_cpu_s', 0):,.0f} | **{c.get('after_per_cpu_s', 0):,.0f}** "
                     f"({c.get('after_per_cpu_s_median', 0):,.0f}; {lo:,.0f}-{hi:,.0f}) | {c.get('cpu_speedup', 0):.2f}x | "
                     f"{c['before_per_s']:,.0f} | {c['after_per_s']:,.0f} | {_load(c.get('load_average', ()))} | "
                     f"{c['max_abs_diff']:.2e} ({c['max_rel_diff']:.1e}) |")
    lines += ["", "Best of the passes per column (median and range for the batch path); target 2,000 updates per "
              "CPU second: " + ", ".join(f"{c['what'].split(',')[0]} "
                                         f"{'met' if c.get('after_per_cpu_s', 0) >= 2000 else 'missed'}"
                                         for c in r["one_core"].values()) + ".", ""]
    w = r["workers"]
    lines += ["", f"### Aggregator workers through Mosquitto ({w['model']}, {w['params']:,} params)", "",
              "The round's updates are queued in the workers' sessions first (the load generator is idle during the "
              "drain), then `pqsu aggregator` processes, each pinned to its own core, drain them: devices granted "
              "per second between the first and the last grant, broker delivery included. A warm-up round first, then "
              f"{w.get('repeats', 1)} alternated repeats of each; the median run is shown, with the range. CPU share: "
              "CPU seconds each process used over the drain, per second of it (1.0 = a whole core). Publish rate: how "
              "fast 4 load-generator connections got the updates acknowledged by Mosquitto.", "",
              "| workers | devices | lost | updates/s (range) | per worker CPU s | CPU share: workers / broker / "
              "coordinator | publish /s (MB/s) | largest relative difference vs exact FedAvg | peak RSS per worker | "
              "load avg |", "|---|---|---|---|---|---|---|---|---|---|"]
    for k in ("one", "two"):
        x = w[k]
        rss = ", ".join(f"{v / 1e6:.0f} MB" for v in x["worker_peak_rss_bytes"].values())
        lo, hi = w.get(k + "_range", [x["updates_per_s"]] * 2)
        share = x.get("cpu_share", {})
        ws = " + ".join(f"{v:.2f}" for n, v in share.items() if n not in ("broker", "coordinator"))
        lines.append(f"| {x['workers']} | {x['devices']:,} | {x['lost']} | {x['updates_per_s']:,.0f} ({lo:,.0f}-{hi:,.0f}) | "
                     f"{x.get('per_worker_cpu_s', 0):,.0f} | {ws or '-'} / {share.get('broker', 0):.2f} / "
                     f"{share.get('coordinator', 0):.2f} | {x['publish_per_s']:,.0f} ({x['publish_mb_per_s']:.1f}) | "
                     f"{x['max_rel_diff']:.1e} | {rss} | {_load(x.get('load_average', ()))} |")
    lo, hi = w.get("speedup_range", [w["speedup"]] * 2)
    two = w["two"].get("cpu_share", {})
    busy = sum(two.values())
    lines += ["", f"2 workers vs 1 (medians): **{w['speedup']:.2f}x**, {lo:.2f}x-{hi:.2f}x over the repeats (target 1.7x: "
              f"{'met' if w['speedup'] >= 1.7 else 'missed'}). With 2 workers the processes of the drain used "
              f"{busy:.2f} of the {cores} cores (the rest went to other jobs on the machine); the broker "
              f"{two.get('broker', 0):.2f} of them. Per CPU second a worker of two folded "
              f"{w['two'].get('per_worker_cpu_s', 0):,.0f} updates and a lone worker {w['one'].get('per_worker_cpu_s', 0):,.0f}: "
              f"with a whole core each, 2 workers would give **{w.get('cpu_speedup', 0):.2f}x** one worker.", ""]
    b = r["round"]
    rss = max(b["worker_peak_rss_bytes"].values())
    lines += _projection(r)
    lines += [f"### A {b['devices']:,}-device round ({b['model']})", "",
              f"{b['workers']} workers, {b['counted']:,} devices granted, {b['aggregated']:,} aggregated, "
              f"{b['lost']} lost, refusals {b['rejected'] or 'none'}; {b['updates_per_s']:,.0f} updates/s; largest "
              f"difference from the exact FedAvg {b['max_abs_diff']:.2e} (relative {b['max_rel_diff']:.1e}); worker "
              f"peak RSS {rss / 1e6:.0f} MB (the model is {b['model_fp32_bytes'] / 1e6:.2f} MB fp32; the rest is the "
              "Python process and its queue).", ""]
    return "\n".join(lines)
