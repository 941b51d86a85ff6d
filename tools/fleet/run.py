"""The one-machine fleet: a broker, the coordinator and N edge agents as separate processes.

Fashion-MNIST is split as every driver splits it (the cloud's proxy part, then one
shard per device), each device gets its shard as an .npz file, and the processes talk
only through MQTT, as on real boards. Without --broker a private Mosquitto is started
on a free loopback port (in-process amqtt when Mosquitto is not installed).

Everything lands in --out DIR (default: runs/<name>/): config.json, metrics.jsonl (a line
per round), summary.json, model.int8.onnx, accuracy.png, accuracy_vs_uplink.png,
checkpoints/, devices/<id>/ (shard and device state) and logs/.

examples:
  pqsu run                                   # the default: cnn, 10 devices, 10 rounds
  pqsu run --scheme paper --rounds 5 --clients 4 --out runs/paper-small
  pqsu run --broker mqtt://127.0.0.1:1883    # use a broker that is already running
  pqsu run --dashboard                       # and watch it live in a browser (prints the URL)
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import sys
import time
from pathlib import Path

from pqsu.cloud.config import add_config_arguments, config_from_args
from pqsu.protocol.errors import PqsuError
from pqsu.protocol.process import Process, pqsu_env, reap


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    g = p.add_argument_group("results")
    g.add_argument("--out", metavar="DIR", help="write the results directly in DIR, as every other command does "
                   "(default: <runs-dir>/<name>)")
    g.add_argument("--name", help="run name: results go to <runs-dir>/<name> (default: run-<date>-<time>)")
    g.add_argument("--runs-dir", metavar="DIR", help=f"folder that holds the named runs (default: {RUNS_DIR})")
    g = p.add_argument_group("fleet")
    g.add_argument("--broker", metavar="URL", help="use the broker already running at this mqtt:// URL instead "
                   "of starting one")
    g.add_argument("--broker-kind", choices=["auto", "mosquitto", "amqtt"], default="auto",
                   help="embedded broker: mosquitto when installed, else amqtt (default: auto)")
    g.add_argument("--fleet", default="local", help="fleet name: topics live under pqsu/<fleet>/ (default: local)")
    g.add_argument("--round-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="a round's deadline: devices that have not answered by then are left out (default: 300)")
    g.add_argument("--join-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="seconds the first round waits for every agent to come online (default: 300)")
    g.add_argument("--chunk-limit", type=int, default=128 * 1024, metavar="BYTES",
                   help="largest MQTT payload; bigger messages are chunked (default: 131072, the AWS IoT cap)")
    g.add_argument("--workers", type=int, default=0, metavar="N", help="aggregator worker processes that read the "
                   "updates instead of the coordinator (pqsu cloud --workers; docs/scale.md). 0: none (default)")
    g.add_argument("--agent-threads", type=int, default=1, metavar="N",
                   help="torch threads per agent process (default: 1)")
    g.add_argument("--force", action="store_true", help="start --clients agents even when this machine's free "
                   f"memory cannot hold them (about {AGENT_MB} MB each)")
    g = p.add_argument_group("dashboard")
    g.add_argument("--dashboard", action="store_true", help="serve the live dashboard of this fleet on 127.0.0.1 "
                   "while it runs (pqsu dashboard) and print its URL")
    g.add_argument("--dashboard-port", type=int, default=0, metavar="PORT",
                   help="the dashboard's port on 127.0.0.1 (default: 0, any free one)")


RUNS_DIR = "runs"
# An agent process holds torch, onnxruntime, its model and its shard: 356 MB unique memory measured for the cnn
# (psutil USS of `pqsu edge run` during a round, 2026-12-01); rounded up for bigger zoo models.
AGENT_MB, COORDINATOR_MB = 400, 1000


def check_capacity(clients: int, force: bool) -> str | None:
    """Refuse a fleet this machine cannot hold (hundreds of processes swapping help nobody); a note when the
    agents share few cores, since every round then takes longer than it would on real boards."""
    available = _available_mb()
    needed = clients * AGENT_MB + COORDINATOR_MB
    if available is not None and needed > available and not force:
        raise PqsuError(f"--clients {clients} needs about {needed:,} MB ({AGENT_MB} MB an agent), this machine has "
                        f"{available:,} MB free: use fewer clients, or --force")
    cores = os.cpu_count() or 1
    if clients > cores:
        return f"pqsu run: note: {clients} agents share {cores} cores, so rounds take longer than on real boards"
    return None


def _available_mb() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) // 1024
    except (OSError, KeyError, ValueError):
        return None  # not Linux: no check rather than a wrong one


def check_fleet_args(args: argparse.Namespace) -> None:
    """With --broker, what the coordinator's preflight would find, before shards are written and agents
    started: agents of a second run would otherwise connect under the first run's device ids."""
    from pqsu.cloud.preflight import check_chunk_limit, preflight
    from pqsu.edge.settings import MIN_CHUNK_LIMIT

    check_chunk_limit(args.chunk_limit)
    if not 0 <= args.dashboard_port <= 65535:
        raise PqsuError(f"--dashboard-port {args.dashboard_port}: expected 0..65535")
    if args.chunk_limit < MIN_CHUNK_LIMIT:  # the agents' own bound, or they would all exit at start
        raise PqsuError(f"--chunk-limit {args.chunk_limit} is below the agents' minimum of {MIN_CHUNK_LIMIT} bytes")
    if not args.broker:
        return
    from pqsu.cloud.command import check_broker
    from pqsu.protocol.messages import new_job_id
    from pqsu.protocol.topics import Topics

    check_broker(args.broker)
    preflight(Topics(args.fleet), args.chunk_limit, job=new_job_id(), url=args.broker)


def output_folder(args: argparse.Namespace) -> Path:
    """--out DIR as given, else <runs-dir>/<name>; both ways at once is an error, not a guess."""
    if args.out and (args.name or args.runs_dir):
        raise PqsuError("give --out DIR, or --name (and --runs-dir), not both")
    if args.out:
        return Path(args.out)
    return Path(args.runs_dir or RUNS_DIR) / (args.name or dt.datetime.now().strftime("run-%Y%m%d-%H%M%S"))


def run(args: argparse.Namespace) -> int:
    from pqsu.tools.lab.broker import embedded_broker

    cfg = config_from_args(args)
    out = output_folder(args)
    check_fleet_args(args)
    note = check_capacity(cfg.clients, args.force)
    if (out / "summary.json").exists() and json.loads((out / "summary.json").read_text()).get("completed", True):
        raise PqsuError(f"{out} holds a finished run; choose another {'--out' if args.out else '--name'}")
    cfg.check_model_and_data()  # before shards are written and processes started: seconds, not a failed run
    (out / "logs").mkdir(parents=True, exist_ok=True)
    settings = out / "settings.json"  # every field, None included: the coordinator must not fall back on a preset
    settings.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")

    if note:
        print(note, file=sys.stderr)
    devices = write_device_shards(cfg, out / "devices")
    print(f"pqsu run: {cfg.clients} devices, {cfg.rounds} rounds of {cfg.model} on {cfg.dataset} -> {out}", flush=True)

    broker = None if args.broker else embedded_broker(args.broker_kind, out / "broker")
    url = args.broker or broker.url
    procs: list[Process] = []
    dashboard = None
    start = time.time()
    stop_on_sigterm = signal.signal(signal.SIGTERM, _terminated)  # `kill`, systemd, a CI timeout: as Ctrl-C
    try:
        if args.dashboard:  # before the coordinator: the page sees the fleet from its first status on
            from pqsu.tools.dashboard.command import Dashboard

            dashboard = Dashboard(url, args.fleet, port=args.dashboard_port)
            print(f"pqsu run: dashboard on {dashboard.url}", flush=True)
        cli = [sys.executable, "-m", "pqsu.tools.cli"]
        procs.append(_spawn(cli + ["cloud", "--config", str(settings), "--broker", url, "--fleet", args.fleet,
                                   "--min-devices", str(cfg.clients), "--join-timeout", str(args.join_timeout), "--round-timeout", str(args.round_timeout),
                                   "--chunk-limit", str(args.chunk_limit), "--out", str(out)]
                            + (["--workers", str(args.workers)] if args.workers else []),
                            out / "logs" / "cloud.log", threads=None))
        for device in devices:
            procs.append(_spawn(cli + ["edge", "run", "--broker", url, "--fleet", args.fleet, "--device-id", device,
                                       "--data", str(out / "devices" / device / "data.npz"),
                                       "--state-dir", str(out / "devices" / device), "--upload", cfg.upload,
                                       "--select", cfg.select, "--chunk-limit", str(args.chunk_limit),
                                       "--torch-threads", str(args.agent_threads), "--no-http"]
                                + ([] if cfg.error_feedback else ["--no-error-feedback"]) + _model_code_flags(cfg),
                                out / "logs" / f"{device}.log", threads=args.agent_threads))
        code = _follow(procs[0], out, cfg.rounds)
        # A finished coordinator has told the agents to stop; a failed one never will: stop them now.
        reap(procs[1:], grace_s=30 if code == 0 else 5, signal_first=code != 0)
    except KeyboardInterrupt as exc:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # another SIGTERM must not cut the stopping short
        why = "stopped by SIGTERM" if isinstance(exc, Terminated) else "interrupted"
        print(f"\npqsu run: {why}, stopping every process", file=sys.stderr)
        reap(procs, grace_s=10, signal_first=True)
        raise
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        reap(procs, grace_s=5, signal_first=True)
        if dashboard is not None:
            dashboard.close()
        if broker is not None:
            broker.close()
        signal.signal(signal.SIGTERM, stop_on_sigterm)
    if code != 0:
        raise PqsuError(_coordinator_failure(code, out / "logs" / "cloud.log"))
    summary = json.loads((out / "summary.json").read_text())
    print(json.dumps(summary, indent=2))
    print(f"pqsu run: finished in {time.time() - start:.0f}s; results in {out}")
    return 0


def _coordinator_failure(code: int, log: Path) -> str:
    """The coordinator's own one-line error when it gave one (`pqsu cloud: error: ...`), else its log's tail."""
    lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    said = next((line for line in reversed(lines) if line.startswith("pqsu cloud: error: ")), None)
    if said is not None:
        return f"the coordinator stopped: {said.removeprefix('pqsu cloud: error: ')} (log: {log})"
    return f"the coordinator exited with status {code}; see {log}:\n  " + "\n  ".join(lines[-5:])


def write_device_shards(cfg, folder: Path) -> list[str]:
    """One `<folder>/<device>/data.npz` per device, split as every driver splits (`pqsu.cloud.data`)."""
    import numpy as np  # here: `pqsu run --help` should not wait for numpy

    from pqsu.cloud.data import device_shards

    shards = device_shards(cfg)
    for device, shard in shards.items():
        (folder / device).mkdir(parents=True, exist_ok=True)
        np.savez(folder / device / "data.npz", x=shard.x, y=shard.y)
    return list(shards)


def _model_code_flags(cfg) -> list[str]:
    """The agents' permission to import the run's own custom architecture. They are started with -m in
    this folder and this environment, so they find the module where the check above found it."""
    return ["--allow-model-code", cfg.model] if ":" in cfg.model else []


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is: every child stopped, a non-zero exit (130) saying so."""


def _terminated(signum, frame) -> None:
    raise Terminated()


def _spawn(cmd: list[str], log_path: Path, threads: int | None) -> Process:
    return Process(cmd, log_path, env=pqsu_env(threads), append=True)


def _follow(coordinator: Process, out: Path, rounds: int) -> int:
    """Print each round as the coordinator finishes it; return its exit status."""
    from pqsu.cloud import report  # zoo and plots: not for building the parser

    metrics, seen = out / "metrics.jsonl", 0
    while True:
        code = coordinator.poll()
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        for line in lines[seen:]:
            r = json.loads(line)
            print(report.round_line(r, rounds), flush=True)
        seen = len(lines)
        if code is not None:
            return code
        time.sleep(0.5)
