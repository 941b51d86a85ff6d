"""Run the coordinator: prepare the model (or resume), then drive rounds through an MQTT broker.

Every option can also come from a settings file (--config run.toml, keys named like the
flags with underscores); flags on the command line win. Restarted with the same --out,
the coordinator resumes after its last checkpointed round.

example:
  pqsu cloud --broker mqtt://broker.local:1883 --fleet farm --rounds 20 --min-devices 8 \\
             --round-timeout 600 --out runs/farm
  pqsu cloud --broker mqtts://broker.local:8883 --tls-ca ca.crt --tls-cert coordinator.crt \\
             --tls-key coordinator.key --username pqsu-coordinator --password-file coordinator.password \\
             --keys device-keys.json --fleet farm --out runs/farm

Removing a device from the fleet (docs/protocol.md, "Security"): delete its entry from the
--keys file (the coordinator re-reads the file at every round start when it changed: from the
next round the device is not asked and its updates are refused as unknown-device, no restart),
and on the broker remove its user from the password file and reload Mosquitto (kill -HUP):
its connection is closed and refused from then on.
"""
from __future__ import annotations

import argparse
import json
import signal
import socket
import threading
from pathlib import Path

from pqsu.cloud.config import add_config_arguments, config_from_args
from pqsu.cloud.device_keys import DeviceKeys
from pqsu.protocol.errors import PqsuError
from pqsu.protocol.identity_args import add_identity_arguments, read_password_file
from pqsu.protocol.messages import new_job_id
from pqsu.protocol.mqtt import BrokerURL
from pqsu.protocol.topics import MAX_PARTITIONS, Topics


def add_coordinator_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("broker and rounds")
    g.add_argument("--broker", default="mqtt://127.0.0.1:1883", metavar="URL", help="broker URL, mqtt:// or mqtts:// (default: %(default)s)")
    g.add_argument("--fleet", default="default", help="fleet name: topics live under pqsu/<fleet>/ (default: %(default)s)")
    g.add_argument("--min-devices", type=int, default=1, metavar="N", help="devices that must be online before a round "
                   "starts (default: 1)")
    g.add_argument("--join-timeout", type=float, default=300.0, metavar="SECONDS", help="seconds round 1 waits for --min-devices (default: 300)")
    g.add_argument("--round-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="a round's deadline: devices that have not answered by then are left out (default: 300)")
    g.add_argument("--chunk-limit", type=int, default=128 * 1024, metavar="BYTES", help="largest MQTT payload in bytes; bigger messages are "
                   "chunked (default: 131072, the AWS IoT cap)")
    g.add_argument("--protocol", choices=["auto", "5", "3.1.1"], default="auto",
                   help="MQTT version to speak with the broker; auto tries 5, then 3.1.1 (default: auto)")
    g.add_argument("--take-over", action="store_true", help="replace the coordinator that holds the fleet's lease "
                   "(it stops when it sees this one's); without it a second coordinator on a live fleet refuses")
    g.add_argument("--keys", metavar="FILE", help="JSON file {device id: hex HMAC key}: only these devices are asked "
                   "and only their signed updates count; re-read at each round start when it changed, so deleting "
                   "a device's entry removes it from the fleet without a restart")
    add_identity_arguments(p.add_argument_group("broker security (the coordinator's own identity)"), "the coordinator's")
    w = p.add_argument_group("aggregator workers (docs/scale.md)")
    w.add_argument("--partitions", type=int, default=0, metavar="P", help="devices publish updates under P partitions "
                   "that `pqsu aggregator` workers read (each partition by one worker); the coordinator only grants "
                   "their claims and reduces their partials. 0: the coordinator reads every update (default)")
    w.add_argument("--workers", type=int, default=0, metavar="N", help="also start N local `pqsu aggregator` "
                   "processes sharing the partitions (default P = N); workers on other machines need none")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    add_coordinator_arguments(p)
    p.add_argument("--out", default="runs/cloud", metavar="DIR", help="folder for metrics, checkpoints, the final "
                   "model and plots; restarted with the same DIR, the coordinator resumes (default: %(default)s)")


def check_broker(url: str, timeout_s: float = 5.0) -> None:
    """The broker URL parses and something listens there (MQTT itself is checked on connect)."""
    broker = BrokerURL.parse(url)
    try:
        socket.create_connection((broker.host, broker.port), timeout=timeout_s).close()
    except OSError as exc:
        raise PqsuError(f"broker {broker} is unreachable ({exc.strerror or exc}); start it or pass --broker URL") from None


def check_tls_files(args: argparse.Namespace) -> None:
    """The TLS files exist and go with an mqtts:// URL."""
    files = {name: getattr(args, name) for name in ("tls_ca", "tls_cert", "tls_key") if getattr(args, name)}
    broker = BrokerURL.parse(args.broker)
    if files and not broker.tls:
        raise PqsuError(f"TLS files given for a plain broker URL {broker}: use mqtts://")
    for name, path in files.items():
        if not Path(path).is_file():
            raise PqsuError(f"--{name.replace('_', '-')} {path}: no such file")


def check_workers(args: argparse.Namespace, cfg) -> int:
    """The partition count to announce, after checking --workers/--partitions and the aggregator."""
    if args.workers < 0 or args.partitions < 0:
        raise PqsuError("--workers and --partitions must be >= 0")
    partitions = args.partitions or args.workers
    if args.workers > partitions:
        raise PqsuError(f"--workers {args.workers} needs at least as many --partitions (got {partitions})")
    if partitions > MAX_PARTITIONS:
        raise PqsuError(f"--partitions {partitions}: at most {MAX_PARTITIONS}")
    if partitions:
        from pqsu.cloud.workers import check_workers_aggregator
        check_workers_aggregator(cfg.aggregator, cfg.clip_norm)
    return partitions


def start_workers(args: argparse.Namespace, partitions: int, job: str) -> list:
    """N local `pqsu aggregator` processes, partitions dealt round robin; they die with this process."""
    # The one process wrapper (own process group, dies with its parent): the one place children are started.
    from pqsu.protocol.process import CLI, Process, pqsu_env

    out = Path(args.out) / "workers"
    procs = []
    for i in range(args.workers):
        mine = ",".join(str(p) for p in range(i, partitions, args.workers))
        cmd = CLI + ["aggregator", "--broker", args.broker, "--fleet", args.fleet, "--worker",
                     f"{job.rsplit('-', 1)[-1]}-w{i}", "--partitions", mine, "--protocol", args.protocol]
        if args.keys:
            cmd += ["--keys", args.keys]
        for flag in ("tls_ca", "tls_cert", "tls_key", "username", "password_file"):
            if getattr(args, flag):
                cmd += [f"--{flag.replace('_', '-')}", getattr(args, flag)]
        procs.append(Process(cmd, out / f"worker-{i}.log", env=pqsu_env(1)))
    return procs


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    out = Path(args.out)
    partitions = check_workers(args, cfg)
    check_broker(args.broker)  # fail before minutes of model preparation, not after
    check_tls_files(args)
    keys = DeviceKeys(args.keys) if args.keys else None  # a bad keys or password file fails here, before the model
    password = read_password_file(args.password_file)
    cfg.check_model_and_data()  # seconds (torch's import), where round 0 takes minutes
    from pqsu.cloud import checkpoint
    from pqsu.cloud.preflight import preflight

    job = checkpoint.latest_job(out / "checkpoints") or new_job_id()  # resumed, a coordinator keeps its job
    facts = preflight(Topics(args.fleet), args.chunk_limit, job=job, take_over=args.take_over, url=args.broker,
                      protocol=args.protocol, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
                      username=args.username, password=password)
    # After the checks: torch and onnx take seconds to import, and bad input should not wait for them.
    from pqsu.cloud.bootstrap import build_server
    from pqsu.cloud.coordinator import Coordinator, CoordinatorConfig

    server, meta = build_server(cfg, checkpoint_dir=out / "checkpoints", keys=keys)
    meta["job"] = job
    ccfg = CoordinatorConfig(broker=args.broker, fleet=args.fleet, rounds=cfg.rounds, min_devices=args.min_devices,
                             join_timeout_s=args.join_timeout, round_timeout_s=args.round_timeout,
                             fraction=cfg.fraction, chunk_limit=facts.chunk_limit, seed=cfg.seed, job=job,
                             stale_model_chunks=facts.model_chunks, partitions=partitions,
                             protocol=args.protocol, out=str(out), tls_ca=args.tls_ca, tls_cert=args.tls_cert,
                             tls_key=args.tls_key, username=args.username, password=password)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    workers = start_workers(args, partitions, job) if args.workers else []
    try:
        summary = Coordinator(ccfg, server, meta=meta).run(stop)
    except KeyboardInterrupt:
        stop.set()
        raise
    finally:
        if workers:
            from pqsu.protocol.process import reap
            reap(workers, 5.0, signal_first=True)
    print(json.dumps(summary, indent=2))
    return 0
