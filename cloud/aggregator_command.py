"""Run one aggregator worker: judge and fold the updates of some partitions, hand partials to the coordinator.

Start it on any machine that reaches the broker, beside `pqsu cloud --partitions P` (docs/scale.md).
Each partition must be read by one worker; a device publishes on update/<crc32(id) % P>/<device>.
The worker takes the model shapes and the job from the coordinator's retained plan, so it needs
no model file and no torch. It stops on SIGTERM after handing over what it holds.

example (P = 8 partitions over two machines):
  pqsu aggregator --broker mqtt://broker.local:1883 --fleet farm --worker agg-a --partitions 0-3
  pqsu aggregator --broker mqtt://broker.local:1883 --fleet farm --worker agg-b --partitions 4-7
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import threading

from pqsu.protocol.errors import PqsuError
from pqsu.protocol.identity_args import add_identity_arguments, read_password_file
from pqsu.protocol.topics import MAX_PARTITIONS, TopicError, check_device


def parse_partitions(spec: str) -> tuple[int, ...]:
    """"0-3,6" -> (0, 1, 2, 3, 6); PqsuError for anything else."""
    out: set[int] = set()
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            lo_i, hi_i = int(lo), int(hi or lo)
            if not 0 <= lo_i <= hi_i < MAX_PARTITIONS:
                raise ValueError
            out.update(range(lo_i, hi_i + 1))
    except ValueError:
        raise PqsuError(f"--partitions {spec!r}: a list of partitions or ranges in [0, {MAX_PARTITIONS}), "
                        "e.g. 0-3,6") from None
    return tuple(sorted(out))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", default="mqtt://127.0.0.1:1883", metavar="URL", help="broker URL (default: %(default)s)")
    p.add_argument("--fleet", default="default", help="fleet name (default: %(default)s)")
    p.add_argument("--worker", default=f"{socket.gethostname()}-{os.getpid()}", metavar="ID",
                   help="this worker's id, unique in the fleet (default: <host>-<pid>)")
    p.add_argument("--partitions", required=True, metavar="LIST", help="update partitions this worker reads, "
                   "e.g. 0-3,6 (each partition read by one worker)")
    p.add_argument("--keys", metavar="FILE", help="the coordinator's device keys file: updates must be signed")
    p.add_argument("--flush", type=float, default=1.0, metavar="SECONDS", help="hand a partial over at least this "
                   "often during a round: a worker that dies loses at most this much (default: 1)")
    p.add_argument("--batch", type=int, default=256, metavar="N", help="updates judged and folded together "
                   "(default: 256)")
    p.add_argument("--protocol", choices=["auto", "5", "3.1.1"], default="auto", help="MQTT version (default: auto)")
    add_identity_arguments(p.add_argument_group("broker security (this worker's own identity)"), "this worker's")


def run(args: argparse.Namespace) -> int:
    from pqsu.cloud.command import check_broker, check_tls_files

    try:
        worker = check_device(args.worker)
    except TopicError as exc:
        raise PqsuError(f"--worker: {exc}") from None
    partitions = parse_partitions(args.partitions)
    if args.flush <= 0 or args.batch < 1:
        raise PqsuError("--flush must be > 0 and --batch >= 1")
    check_tls_files(args)
    check_broker(args.broker)
    keys = None
    if args.keys:
        from pqsu.cloud.device_keys import DeviceKeys
        keys = DeviceKeys(args.keys)
    from pqsu.cloud.workers import AggregatorWorker, WorkerConfig

    cfg = WorkerConfig(broker=args.broker, fleet=args.fleet, worker=worker, partitions=partitions, keys=keys,
                       flush_s=args.flush, batch=args.batch, protocol=args.protocol, tls_ca=args.tls_ca,
                       tls_cert=args.tls_cert, tls_key=args.tls_key, username=args.username,
                       password=read_password_file(args.password_file))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    w = AggregatorWorker(cfg)
    w.start()
    print(f"pqsu aggregator {worker}: partitions {args.partitions} of fleet {args.fleet} on {args.broker}", flush=True)
    try:
        w.run(stop)
    finally:
        w.stop()
    print(f"pqsu aggregator {worker}: handed over {w.handed['updates']} updates in {w.handed['partials']} partials",
          flush=True)
    return 0
