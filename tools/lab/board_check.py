"""The Raspberry Pi bundle, proven on an emulated aarch64 board: flash, install offline, doctor,
follow a fleet, predict like the host.

  python -m pqsu.tools.lab.board_check [--board rpi4] [--workdir DIR] [--keep]   (scripts/board_aarch64.sh)

1. the board: the cached Debian arm64 root (pqsu.tools.lab.board, built on first use), cloned;
2. `pqsu flash --board rpi4 --wheelhouse --inference-only` into the clone, wheels fetched for the
   board's platform (checked: every wheel is aarch64 or pure Python);
3. the bundle's install.sh, inside the board as root, in a network namespace with no network;
4. `pqsu edge doctor --config /etc/pqsu/agent.toml` inside the board, as the agent's user;
5. the installed agent, as that user, against a Mosquitto on the host's loopback, while `pqsu run`
   on the host drives a fleet of one training device through the rounds: the board follows every
   model version the coordinator publishes;
6. `POST /predict` on the board for Fashion-MNIST test images, compared with the host's onnxruntime
   on the same model file and the same images.

Why inference-only: PyPI's aarch64 torch 2.13.0 is a CUDA 13 build (cuda-toolkit, cudnn, nccl,
triton: gigabytes), and the CPU build the board profiles pin comes from download.pytorch.org,
which this lab cannot reach. Every step prints one line of the run log; timings are qemu's
(user-mode emulation on x86-64), never a Pi's.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pqsu.edge.inference import InferenceModel
from pqsu.export.datasets import load_dataset
from pqsu.protocol.errors import PqsuError
from pqsu.tools.lab.board import CPUS, MACHINE, READY, Board, BoardError, build_root, check_host, default_cache
from pqsu.tools.lab.broker import Mosquitto, free_port
from pqsu.protocol.process import CLI, Process, reap

DEVICE, FLEET, USER = "pi-emu-01", "emu", "pqsu"
VENV_PQSU = "/opt/pqsu/venv/bin/pqsu"
CONFIG = "/etc/pqsu/agent.toml"
STATE = "/var/lib/pqsu/state"
SAMPLES = 64                                   # test images sent to /predict


@dataclass
class Report:
    """What the check saw, for the test to assert on and the run log to show."""
    board: str
    uname: str = ""
    board_python: str = ""
    wheels: list[str] = field(default_factory=list)
    install_output: str = ""
    venv_platform: str = ""
    doctor_code: int | None = None
    doctor_output: str = ""
    sent: list[str] = field(default_factory=list)            # model ids (12 hex) the coordinator sent, round by round
    round_models: list[str] = field(default_factory=list)    # model ids the coordinator's rounds produced
    final_model: str = ""
    followed: list[str] = field(default_factory=list)         # model ids the board's agent took, in order
    served_model: str = ""                                    # the model /predict answered with
    host_model: str = ""                                      # the board's saved model.onnx, read on the host
    agent_output: str = ""
    board_predictions: list[int] = field(default_factory=list)
    host_predictions: list[int] = field(default_factory=list)
    max_probability_diff: float = float("nan")
    seconds: dict[str, float] = field(default_factory=dict)   # emulated wall time per step


def run_check(workdir: Path, *, board_name: str = "rpi4", cache: Path | None = None, rounds: int = 2,
              say=print) -> Report:
    """The whole path; raises BoardError at the first step that fails, with what it saw."""
    check_host(build=not (cache or default_cache()).joinpath(READY).is_file())
    report = Report(board_name)
    t = time.monotonic()
    base = build_root(cache, say=say)
    board = Board.clone(base, workdir / "board", CPUS[board_name])
    report.seconds["root"] = time.monotonic() - t
    report.uname = _ok(board.run(["uname", "-m"], timeout_s=60), "uname -m").strip()
    report.board_python = _ok(board.run(["python3", "-c", "import platform; print(platform.python_version())"],
                                        timeout_s=120), "python3").strip()
    say(f"board: {board.root} (clone of {base}): uname -m {report.uname}, python3 {report.board_python}, "
        f"qemu CPU {board.cpu.qemu} x{board.cpu.cores} ({board.cpu.model or board_name})")
    if report.uname != MACHINE:
        raise BoardError(f"the board says uname -m {report.uname!r}, not {MACHINE}: is qemu's binfmt handler in use?")

    logs = workdir / "logs"
    procs: list[Process] = []
    http_port = free_port()
    with Mosquitto(workdir / "mosquitto") as broker:
        try:
            # 2. flash, with the wheelhouse for the board's platform
            t = time.monotonic()
            flashed = _host([*CLI, "flash", "--board", board_name, "--device-id", DEVICE, "--broker", broker.url,
                             "--fleet", FLEET, "--inference-only", "--wheelhouse", "--http-port", str(http_port),
                             "--user", USER, "--target", str(board.root)], timeout_s=1800)
            _ok(flashed, "pqsu flash")
            report.seconds["flash"] = time.monotonic() - t
            wheels = sorted(p.name for p in board.path("/opt/pqsu/bundle/wheels").glob("*.whl"))
            report.wheels = wheels
            foreign = [w for w in wheels if not (w.endswith("-none-any.whl") or f"_{MACHINE}." in w
                                                 or w.endswith(f"_{MACHINE}.whl"))]
            say(f"flash: {len(wheels)} wheels in {board.path('/opt/pqsu/bundle/wheels')} "
                f"({report.seconds['flash']:.0f} s): {', '.join(wheels)}")
            if foreign:
                raise BoardError(f"the wheelhouse holds wheels for another platform: {', '.join(foreign)}")

            # 3. install.sh on the board, as root, with no network at all
            t = time.monotonic()
            installed = board.run(["sh", "/opt/pqsu/bundle/install.sh"], offline=True, timeout_s=1800)
            report.install_output = installed.stdout + installed.stderr
            _ok(installed, "install.sh (offline)")
            report.seconds["install"] = time.monotonic() - t
            say("install: sh /opt/pqsu/bundle/install.sh (on the board, as root, in a network namespace without network)")
            for line in installed.stdout.splitlines():
                say(f"  {line}")
            say(f"install: exit 0 in {report.seconds['install']:.0f} s (qemu-emulated time)")
            report.venv_platform = _ok(board.run(
                ["/opt/pqsu/venv/bin/python", "-c", "import platform, numpy, onnxruntime, paho.mqtt; "
                 "print(platform.machine(), 'numpy', numpy.__version__, 'onnxruntime', onnxruntime.__version__, "
                 "'paho-mqtt', paho.mqtt.__version__)"], timeout_s=300), "the venv's imports").strip()
            say(f"venv: {report.venv_platform}")

            # 4. the doctor, as the agent's user, with the installed settings
            doctor = board.run([VENV_PQSU, "edge", "doctor", "--config", CONFIG, "--timeout", "10"], user=USER,
                               timeout_s=600)
            report.doctor_code, report.doctor_output = doctor.returncode, doctor.stdout + doctor.stderr
            say(f"doctor: {VENV_PQSU} edge doctor --config {CONFIG} (on the board, as {USER}): exit {doctor.returncode}")
            for line in doctor.stdout.splitlines():
                say(f"  {line}")
            if doctor.returncode != 0:
                raise BoardError(f"pqsu edge doctor failed on the board (exit {doctor.returncode}):\n"
                                 + report.doctor_output[-3000:])

            # 5. the agent on the board, started as its systemd unit says, then the fleet on the host
            user, command, unit_env = unit_service(board.path("/opt/pqsu/bundle/pqsu-agent.service"))
            say(f"agent: ExecStart={' '.join(command)} as User={user} with {' '.join(f'{k}={v}' for k, v in unit_env.items())}")
            agent = board.spawn(command, logs / "board-agent.log", user=user, env=unit_env, name="board-agent")
            procs.append(agent)
            url = f"http://127.0.0.1:{http_port}"
            _wait(lambda: _http(url + "/healthz")[0] == 503, 300, "the board's agent to serve /healthz", agent)
            say(f"agent: running on the board, {url}/healthz answers 503 (no model yet)")
            t = time.monotonic()
            fleet = Process([*CLI, "run", "--broker", broker.url, "--fleet", FLEET, "--clients", "1",
                             "--rounds", str(rounds), "--samples-per-client", "300", "--proxy-samples", "300",
                             "--eval-samples", "300", "--pretrain-epochs", "0.3", "--join-timeout", "120",
                             "--round-timeout", "180", "--out", str(workdir / "fleet")],
                            logs / "fleet.log", env=_host_env())
            procs.append(fleet)
            _wait(lambda: fleet.poll() is not None, 900, "pqsu run to finish its rounds", agent)
            if fleet.poll() != 0:
                raise BoardError(f"pqsu run failed (exit {fleet.poll()}):\n{fleet.tail(30)}")
            report.seconds["rounds"] = time.monotonic() - t
            metrics = [json.loads(ln) for ln in (workdir / "fleet/metrics.jsonl").read_text().splitlines() if ln]
            report.round_models = [m["model_id"] for m in metrics]
            report.final_model = InferenceModel.from_file(workdir / "fleet/model.int8.onnx").model_id
            report.sent = _sent_models(workdir / "fleet/logs/cloud.log")
            for r, model in enumerate(report.sent, 1):
                say(f"fleet: round {r} sent model {model}")
            for m in metrics:  # a round's model_id is the model it produced (the next round's, or the final one)
                say(f"fleet: round {m['round']} produced model {m['model_id'][:12]} "
                    f"(host-side accuracy {m.get('accuracy', float('nan')):.3f}: a tiny fleet, the point is the versions)")
            say(f"fleet: {len(metrics)} rounds in {report.seconds['rounds']:.0f} s; final model {report.final_model[:12]}")

            # the board must end on the model the coordinator finished with
            saved = board.path(STATE) / "model.onnx"
            last = report.final_model[:12]
            _wait(lambda: _followed(agent)[-1:] == [last], 300, f"the board to take the final model {last}", agent)
            report.followed = _followed(agent)
            say(f"agent: took {len(report.followed)} model versions, in order: {', '.join(report.followed)}")

            # 6. /predict on the board against the host's onnxruntime on the same file
            x = load_dataset("fashion-mnist", "test").head(SAMPLES).x      # (N, 1, 28, 28) uint8
            buf = io.BytesIO()
            np.save(buf, x)
            code, answer = _http(url + "/predict", buf.getvalue(), timeout_s=120)
            if code != 200:
                raise BoardError(f"POST /predict on the board answered {code}: {answer}")
            host = InferenceModel.from_file(saved).classify(x)
            report.served_model, report.host_model = answer["model_id"], host.model_id
            report.board_predictions, report.host_predictions = answer["predictions"], host.predictions
            report.max_probability_diff = float(np.abs(np.asarray(answer["probabilities"])
                                                       - np.asarray(host.probabilities)).max())
            same = sum(a == b for a, b in zip(report.board_predictions, report.host_predictions))
            say(f"predict: board model {report.served_model[:12]}, host model {host.model_id[:12]}: "
                f"{same}/{len(x)} predictions the same, largest probability difference "
                f"{report.max_probability_diff:.2e}")
        finally:
            reap(procs, grace_s=20, signal_first=True)
            report.agent_output = next((p.output for p in procs if p.name == "board-agent"), "")
    return report


def unit_service(unit: Path) -> tuple[str, list[str], dict[str, str]]:
    """User=, ExecStart= (split) and the Environment= pairs of the bundle's systemd unit."""
    user, command, env = "root", [], {}
    for line in unit.read_text().splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        if key == "User":
            user = value
        elif key == "ExecStart":
            command = shlex.split(value)
        elif key == "Environment":
            name, _, val = value.partition("=")
            env[name] = val
    if not command:
        raise BoardError(f"{unit} has no ExecStart=")
    return user, command, env


def _host_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _host(cmd: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=_host_env(),
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise BoardError(f"{' '.join(cmd[:4])} did not finish within {timeout_s:.0f} s") from None


def _ok(proc, what: str) -> str:
    if proc.returncode != 0:
        raise BoardError(f"{what} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc.stdout


def _wait(predicate, timeout_s: float, what: str, agent: Process) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        if not agent.running:
            raise BoardError(f"the board's agent exited while waiting for {what}:\n{agent.tail(30)}")
        time.sleep(0.5)
    raise BoardError(f"timed out after {timeout_s:.0f} s waiting for {what}:\n{agent.tail(30)}")


def _followed(agent: Process) -> list[str]:
    """Model ids (12 hex digits) the agent swapped to, from its log lines `<device>: model <id> (<n> bytes)`."""
    out = []
    for line in agent.output.splitlines():
        head, sep, rest = line.partition(f"{DEVICE}: model ")
        if sep and rest.endswith(" bytes)"):
            out.append(rest.split()[0])
    return out


def _sent_models(cloud_log: Path) -> list[str]:
    """The model (12 hex digits) of each round, from the coordinator's `round N: K devices, model <id>` lines."""
    out = []
    for line in cloud_log.read_text(errors="replace").splitlines():
        m = re.search(r"round (\d+): \d+ devices?, model ([0-9a-f]{12})", line)
        if m:
            out.append(m.group(2))
    return out


def _http(url: str, body: bytes | None = None, timeout_s: float = 5.0) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/x-npy"} if body else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read())
        except ValueError:
            return exc.code, {}
    except (OSError, ValueError):
        return 0, {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="board_aarch64", description=__doc__.split("\n\n")[0])
    p.add_argument("--board", default="rpi4", choices=["rpi4", "rpi5", "generic-aarch64"],
                   help="an aarch64 board profile whose OS is Debian bookworm (default: %(default)s)")
    p.add_argument("--workdir", type=Path, help="where the board's clone, logs and fleet go (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (the clone is about 500 MB)")
    p.add_argument("--cache", type=Path, help=f"the cached board root (default: {default_cache()})")
    args = p.parse_args(argv)
    if args.workdir and args.workdir.exists() and (not args.workdir.is_dir() or any(args.workdir.iterdir())):
        print(f"board_aarch64: error: --workdir {args.workdir} is not an empty folder", file=sys.stderr)
        return 2
    cache = args.cache or default_cache()
    try:  # before anything is written: not root, no qemu, no binfmt handler
        check_host(build=not (cache / READY).is_file())
    except BoardError as exc:
        print(f"board_aarch64: error: {exc}", file=sys.stderr)
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="pqsu-board-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        report = run_check(workdir, board_name=args.board, cache=cache,
                           say=lambda line: print(line, flush=True))
    except PqsuError as exc:
        print(f"board_aarch64: error: {exc}", file=sys.stderr)
        print(f"board_aarch64: logs kept in {workdir}", file=sys.stderr)
        return 1
    versions = report.sent + [report.final_model[:12]]
    same = report.board_predictions == report.host_predictions
    ok = same and report.followed == versions and len(set(versions)) >= 2
    print(f"board_aarch64: {'PASS' if ok else 'FAIL'}: {report.board} bundle on emulated {report.uname}: "
          f"{len(report.followed)} of the fleet's {len(versions)} model versions followed, predictions "
          f"{'identical to' if same else 'DIFFERENT from'} "
          "the host's onnxruntime (timings above are qemu's, not a Pi's)")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"board_aarch64: work folder kept: {workdir}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
