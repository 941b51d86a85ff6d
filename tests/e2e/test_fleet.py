"""End to end: `pqsu run` (broker + coordinator + agents as real processes talking MQTT).

What a user checks after `pqsu run`: it exits 0, the run folder holds every promised file, the
global model improved, the final model is a real int8 ONNX file that verifies, the numbers are
those of the in-process simulator for the same seed, large messages are chunked under a broker
that really caps the packet size, Ctrl-C stops everything, and no process is left behind.

Every process runs in its own process group with OMP_NUM_THREADS=1, every wait is bounded, and a
finalizer kills whatever is left (by pid, found through the run's unique folder in its cmdline).
"""
from __future__ import annotations

import json
import os
import signal
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from pqsu.cloud.config import FederatedConfig
from pqsu.protocol import model_id
from pqsu.protocol.errors import PqsuError
from pqsu.protocol.mqtt import MqttClient
from pqsu.protocol.process import Process
from tests.support.procs import flags, kill_mentioning, logs_tail, processes_mentioning, start_pqsu

from pqsu.tools.lab.broker import Mosquitto, mosquitto_path

RUN_TIMEOUT_S = 240.0   # a tiny run takes ~40 s on a loaded 2-core machine

# A weak starting model (0.3 epoch of pre-training) and lr 0.05: 3 rounds of 3 devices lift
# accuracy from ~0.11 to ~0.29, far beyond run-to-run noise.
QUALITY = dict(clients=3, rounds=3, samples_per_client=300, proxy_samples=500, eval_samples=500,
               pretrain_epochs=0.3, finetune_epochs=0.2, lr=0.05)
SUMMARY_KEYS = {"final_accuracy", "initial_accuracy", "rounds", "bytes_up_total", "bytes_down_total",
                "bytes_up_dense_fp32", "wall_seconds"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

needs_mosquitto = pytest.mark.skipif(mosquitto_path() is None, reason="mosquitto is not installed")
needs_fmnist = pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                                  reason="dataset-fashion-mnist is not installed")
pytestmark = needs_fmnist


@dataclass
class RunResult:
    code: int | None
    out: Path
    proc: Process
    seconds: float
    left_behind: list[tuple[int, str]]   # processes still mentioning the run folder right after exit

    def explain(self) -> str:
        return f"pqsu run exit {self.code} after {self.seconds:.0f}s\n{self.proc.tail()}\n{logs_tail(self.out)}"


def pqsu_run(tmp: Path, args: list[str], name: str = "x", timeout_s: float = RUN_TIMEOUT_S) -> RunResult:
    """`pqsu run ... --runs-dir tmp --name x` to completion (killed after timeout_s)."""
    runs = tmp / "runs"
    start = time.monotonic()
    proc = start_pqsu(["run", *args, "--runs-dir", str(runs), "--name", name], tmp, "pqsu-run")
    try:
        code = proc.wait(timeout_s)
        left = processes_mentioning(str(runs)) if code is not None else []
    finally:
        proc.stop()
        kill_mentioning(str(runs))
    return RunResult(code, runs / name, proc, time.monotonic() - start, left)


def read_run(out: Path) -> tuple[dict, list[dict], dict]:
    config = json.loads((out / "config.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((out / "summary.json").read_text())
    return config, metrics, summary


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def check_finished_run(res: RunResult, rounds: int, clients: int) -> tuple[dict, list[dict], dict]:
    """Everything `pqsu run` promises in runs/<name>/ after a successful run."""
    assert res.code == 0, res.explain()
    assert res.left_behind == [], f"processes left behind after pqsu run exited: {res.left_behind}"
    out = res.out
    for name in ("config.json", "metrics.jsonl", "summary.json", "model.int8.onnx", "accuracy.png",
                 "accuracy_vs_uplink.png"):
        assert (out / name).is_file(), f"{name} missing from {sorted(p.name for p in out.iterdir())}"
    config, metrics, summary = read_run(out)

    assert [m["round"] for m in metrics] == list(range(1, rounds + 1))
    for m in metrics:
        assert m["selected"] == clients and m["uploads"] + m["skipped"] == clients, m
        assert m["missing"] == 0 and m["rejected"] == {}, m
        assert 0.0 <= m["accuracy"] <= 1.0
    assert SUMMARY_KEYS <= summary.keys(), sorted(summary)
    assert summary["rounds"] == rounds
    assert summary["final_accuracy"] == metrics[-1]["accuracy"]
    assert summary["bytes_up_total"] == sum(m["bytes_up"] for m in metrics) > 0
    assert summary["bytes_down_total"] == sum(m["bytes_down"] for m in metrics) > 0
    assert summary["bytes_up_dense_fp32"] > summary["bytes_up_total"]
    assert 0 < summary["wall_seconds"] < res.seconds + 1
    assert summary["final_accuracy"] > summary["initial_accuracy"], \
        f"the global model did not improve: {summary['initial_accuracy']} -> {summary['final_accuracy']}"

    # The final model: a real int8 ONNX file whose content matches its id, the last round's model.
    import onnxruntime as ort

    data = (out / "model.int8.onnx").read_bytes()
    assert model_id.verify(data) == metrics[-1]["model_id"]
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    logits = session.run(None, {inp.name: np.zeros((1, 1, 28, 28), np.float32)})[0]
    assert logits.shape == (1, 10) and np.isfinite(logits).all()
    assert any("QuantizeLinear" in n.op_type or "QLinear" in n.op_type
               for n in _onnx_nodes(data)), "model.int8.onnx holds no quantized op"

    for plot in ("accuracy.png", "accuracy_vs_uplink.png"):
        w, h = png_size(out / plot)
        assert w >= 100 and h >= 100 and (out / plot).stat().st_size > 2000
    return config, metrics, summary


def _onnx_nodes(data: bytes):
    import onnx

    return onnx.load_from_string(data).graph.node


# -- 1 and 4: the default embedded broker (Mosquitto), and the same numbers as the simulator ----
@pytest.fixture(scope="module")
def mosquitto_run(tmp_path_factory) -> RunResult:
    if mosquitto_path() is None:
        pytest.skip("mosquitto is not installed")
    return pqsu_run(tmp_path_factory.mktemp("fleet-mosquitto"), flags(**QUALITY))


@needs_mosquitto
@pytest.mark.slow
def test_run_with_embedded_mosquitto_trains_and_leaves_every_output(mosquitto_run):
    config, metrics, summary = check_finished_run(mosquitto_run, rounds=3, clients=3)
    assert (mosquitto_run.out / "broker" / "mosquitto.conf").is_file()  # the default broker was Mosquitto
    assert config["precision"] == "int8" and config["clients"] == 3
    assert summary["uploads"] + summary["skipped"] == 9 and summary["rejected"] == 0
    assert "pqsu run: finished" in mosquitto_run.proc.stdout
    # Federated evaluation: every device reported its held-out accuracy of the model it received, over MQTT
    for m in metrics:
        ev = m["device_eval"]
        assert ev["devices"] == 3 and ev["samples"] > 0, ev
        assert 0 <= ev["accuracy_min"] <= ev["accuracy"] <= ev["accuracy_max"] <= 1 and ev["loss"] > 0, ev
    assert summary["final_device_eval"] == metrics[-1]["device_eval"]
    printed = [line for line in mosquitto_run.proc.stdout.splitlines() if line.startswith("round ")]
    assert len(printed) == 3 and all("devices acc" in line and "3 devices" in line for line in printed), printed


@needs_mosquitto
@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_mqtt_run_gives_the_numbers_of_the_in_process_simulator(mosquitto_run):
    from pqsu.tools.fleet.simulate import simulate

    assert mosquitto_run.code == 0, mosquitto_run.explain()
    config, metrics, _ = read_run(mosquitto_run.out)
    cfg = FederatedConfig.for_scheme("ours", **QUALITY)
    assert {k: v for k, v in config.items() if k in cfg.to_dict()} == cfg.to_dict()  # same config, same seed

    sim = simulate(cfg)
    assert [r["bytes_up"] for r in metrics] == [r["bytes_up"] for r in sim.rounds]
    assert [r["uploads"] for r in metrics] == [r["uploads"] for r in sim.rounds]
    assert [r["skipped"] for r in metrics] == [r["skipped"] for r in sim.rounds]
    # what each device downloaded (patches after its first model), counted by the devices over MQTT
    # and by the in-process followers alike
    assert [r["bytes_down"] for r in metrics] == [r["bytes_down"] for r in sim.rounds]
    assert [r["bytes_down_flashed"] for r in metrics] == [r["bytes_down_flashed"] for r in sim.rounds]
    assert [r["downloads"] for r in metrics] == [r["downloads"] for r in sim.rounds]
    assert [r["downloads"]["patch"] for r in metrics[1:]] == [3] * (len(metrics) - 1)
    for mqtt_round, sim_round in zip(metrics, sim.rounds):
        assert mqtt_round["accuracy"] == pytest.approx(sim_round["accuracy"], abs=0.02)
        # the devices' own evaluation: the same held-out samples and received model, through the same code
        mqtt_ev, sim_ev = mqtt_round["device_eval"], sim_round["device_eval"]
        assert (mqtt_ev["devices"], mqtt_ev["samples"]) == (sim_ev["devices"], sim_ev["samples"]) == (3, sim_ev["samples"])
        assert mqtt_ev["accuracy"] == pytest.approx(sim_ev["accuracy"], abs=0.02)


# -- 2: the in-process amqtt broker (MQTT 3.1.1) -----------------------------------------------
@pytest.mark.slow
@pytest.mark.long
def test_run_with_embedded_amqtt_broker(tmp_path):
    pytest.importorskip("amqtt")
    res = pqsu_run(tmp_path, flags(**QUALITY) + ["--broker-kind", "amqtt"])
    check_finished_run(res, rounds=3, clients=3)
    assert not (res.out / "broker").exists()  # no Mosquitto was started
    assert "MQTT 3.1.1" in (res.out / "logs" / "cloud.log").read_text()


# -- 3: chunking under a broker that refuses any packet over ~137 KB ----------------------------
CHUNK_LIMIT = 128 * 1024


@dataclass
class CappedRun:
    big_publish_refused: bool
    res: RunResult
    broker_log: str


@pytest.fixture(scope="module")
def capped_fedavg_run(tmp_path_factory) -> CappedRun:
    """`pqsu run --scheme fedavg` (fp32 model down, dense fp32 updates up) through a Mosquitto
    configured with max_packet_size 140000: any publish over ~137 KB is refused by the broker."""
    if mosquitto_path() is None:
        pytest.skip("mosquitto is not installed")
    tmp = tmp_path_factory.mktemp("fleet-capped")
    with Mosquitto(tmp / "broker", extra_config="max_packet_size 140000\n") as broker:
        probe = MqttClient(broker.url, "pqsu-test-probe", persistent_session=False)
        probe.connect(timeout_s=10)
        try:
            probe.publish("pqsu/probe/big", b"\0" * 200_000, timeout_s=5)
            refused = False
        except PqsuError:
            refused = True
        finally:
            probe.close()
        res = pqsu_run(tmp, ["--broker", broker.url, "--chunk-limit", str(CHUNK_LIMIT), "--scheme", "fedavg"]
                       + flags(clients=2, rounds=2, samples_per_client=200, proxy_samples=300, eval_samples=300,
                               pretrain_epochs=0.3, finetune_epochs=0))
        return CappedRun(refused, res, broker.log_text())


@needs_mosquitto
@pytest.mark.slow
def test_fedavg_run_is_chunked_under_a_broker_packet_cap(capped_fedavg_run):
    run = capped_fedavg_run
    assert run.big_publish_refused, "the broker accepted a 200 KB publish: the cap is not in force"
    res = run.res
    assert res.code == 0, res.explain() + "\n--- broker log\n" + run.broker_log[-2000:]
    assert res.left_behind == []
    config, metrics, summary = read_run(res.out)
    assert config["precision"] == "fp32"
    assert summary["rounds"] == 2 and summary["uploads"] == 4 and summary["rejected"] == 0
    for m in metrics:
        assert m["model_bytes"] > 3 * CHUNK_LIMIT       # the fp32 model went down in several chunks
        assert m["bytes_up"] > 2 * 3 * CHUNK_LIMIT      # two dense fp32 updates went up in several chunks
        assert m["uploads"] == m["selected"] == 2 and m["rejected"] == {}
    assert "Packet too large" not in "".join(p.read_text() for p in (res.out / "logs").glob("*.log"))
    model_id.verify((res.out / "model.fp32.onnx").read_bytes())


@needs_mosquitto
@pytest.mark.slow
def test_run_fedavg_scheme_trains_the_unpruned_model(capped_fedavg_run):
    res = capped_fedavg_run.res
    assert res.code == 0, res.explain()
    config, metrics, summary = read_run(res.out)
    dense_upload = summary["bytes_up_dense_fp32"] // sum(m["selected"] for m in metrics)  # 4 B a parameter
    assert config["prune"] is None, f"config.json of a fedavg run says prune={config['prune']}"
    for m in metrics:
        assert m["model_bytes"] > dense_upload                        # the unpruned fp32 ONNX file
        assert m["bytes_up"] / m["uploads"] > 0.99 * dense_upload     # a dense fp32 update of it


# -- 6: Ctrl-C, kill, kill -9 ----------------------------------------------------------------------
STOPS = {"terminal": signal.SIGINT, "parent": signal.SIGINT, "sigterm": signal.SIGTERM, "sigkill": signal.SIGKILL}


@needs_mosquitto
@pytest.mark.slow
@pytest.mark.parametrize("target", [t if t in ("sigterm", "sigkill") else pytest.param(t, marks=pytest.mark.long)
                                    for t in STOPS])  # both SIGINTs take the path SIGTERM takes
def test_a_stopped_run_leaves_no_process_behind(tmp_path, target):
    """terminal: SIGINT to the whole foreground process group (what Ctrl-C in a shell does);
    parent: SIGINT to the `pqsu run` process alone (kill -INT), which must stop its children itself;
    sigterm: kill, as systemd or a CI timeout stops it: the same as Ctrl-C, and it says so;
    sigkill: kill -9, mid-start-up: `pqsu run` can do nothing, the kernel ends its children."""
    runs = tmp_path / "runs"
    out = runs / "x"
    proc = start_pqsu(["run", "--runs-dir", str(runs), "--name", "x", "--broker-kind", "mosquitto"]
                      + flags(clients=2, rounds=50, samples_per_client=150, proxy_samples=300, eval_samples=300,
                              pretrain_epochs=0.3, finetune_epochs=0),
                      tmp_path, "pqsu-run")
    try:
        cloud_log = out / "logs" / "cloud.log"
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and proc.poll() is None:
            if target == "sigkill" and len(processes_mentioning(str(runs))) >= 4:
                break  # the broker, the coordinator and both agents are there
            if cloud_log.exists() and "round 1:" in cloud_log.read_text(errors="replace"):
                break
            time.sleep(0.3)
        assert proc.poll() is None, proc.tail()
        if target != "sigkill":
            assert "round 1:" in cloud_log.read_text(errors="replace"), "round 1 never started\n" + logs_tail(out)
        started = processes_mentioning(str(runs))
        assert any("mosquitto" in cmd for _, cmd in started) and len(started) >= 4, started

        t0 = time.monotonic()
        if target == "terminal":
            proc.signal_group(signal.SIGINT)
        else:
            os.kill(proc.pid, STOPS[target])
        code = proc.wait(25)
        took = time.monotonic() - t0
        assert code is not None, f"pqsu run still running 25 s after {STOPS[target].name}\n{proc.tail()}"
        assert code != 0, proc.tail()
        assert took < 20, f"pqsu run took {took:.0f}s to stop"
        left_deadline = time.monotonic() + 5  # reaped children can take a moment to vanish from /proc
        while processes_mentioning(str(runs)) and time.monotonic() < left_deadline:
            time.sleep(0.2)
        assert processes_mentioning(str(runs)) == [], f"left behind after {STOPS[target].name}"
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        if target == "sigterm":
            assert "pqsu run: stopped by SIGTERM, stopping every process" in proc.stderr, proc.stderr[-3000:]
    finally:
        proc.stop()
        kill_mentioning(str(runs))
