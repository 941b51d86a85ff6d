"""`pqsu flash --model-file / --model-from-broker`: the fleet's current model goes into the bundle,
install-model.sh puts it where the agent loads it at start, and a freshly flashed board serves it
without a single download. Bad models are refused before anything is written.

One private Mosquitto for the module; each test uses its own fleet, so nothing retained by one test
reaches another. The agent is the real `pqsu edge run` reading the bundle's own agent.toml.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pqsu.protocol import chunking, model_id
from pqsu.protocol.mqtt import MqttClient
from pqsu.protocol.topics import Topics
from pqsu.tools.cli import main
from pqsu.tools.flash import model as model_mod
from pqsu.tools.flash.request import STATE_MODEL_FILE
from pqsu.tools.lab.broker import Mosquitto, free_port
from pqsu.protocol.process import CLI, Process, reap
from tests.support.edge_models import int8_models
from tests.support.mosquitto import require_mosquitto

STATE = "var/lib/pqsu/state"
BUNDLE = "opt/pqsu/bundle"


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    require_mosquitto()
    with Mosquitto(tmp_path_factory.mktemp("mosquitto")) as b:
        yield b


@pytest.fixture(scope="module")
def models():
    return int8_models()


def flash(capsys, root: Path, wheel: Path, broker_url: str, fleet: str, *extra: str,
          inference_only: bool = True) -> tuple[int, str, str]:
    root.mkdir(exist_ok=True)
    code = main(["flash", "--board", "rpi4", "--device-id", "pi-flashed", "--broker", broker_url, "--fleet", fleet,
                 *(["--inference-only"] if inference_only else []), "--target", str(root), "--project-wheel",
                 str(wheel), *extra])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def install_model(root: Path, **env: str) -> subprocess.CompletedProcess:
    """The bundle's install-model.sh, as install.sh runs it, with this Python's fl-pqsu to verify."""
    return subprocess.run(["sh", str(root / BUNDLE / "install-model.sh")], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PQSU_ROOT": str(root), "PQSU_AGENT_PYTHON": sys.executable, **env})


def publish_retained(url: str, fleet: str, data: bytes, frames: slice = slice(None)) -> int:
    """What the coordinator does with its model (cloud/coordinator.py): retained chunks, framed and hashed."""
    topics = Topics(fleet)
    split = chunking.split(data, 32 * 1024)
    with MqttClient(url, f"test-coordinator-{fleet}", persistent_session=False) as c:
        for i, frame in list(enumerate(split))[frames]:
            c.publish(topics.model_chunk(i), frame, retain=True)
    return len(split)


def healthz(port: int) -> dict:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            return json.loads(r.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
        return {}


def test_a_flashed_board_serves_the_model_at_once_without_a_download(capsys, tmp_path, wheel, broker, models):
    fleet, port, root = "flashed", free_port(), tmp_path / "root"
    data = models.a.read_bytes()
    want = model_id.verify(data)
    code, out, err = flash(capsys, root, wheel, broker.url, fleet, "--model-file", str(models.a),
                           "--http-port", str(port))
    assert code == 0, err
    assert f"with model {want}" in out and f"/{STATE}/{STATE_MODEL_FILE}" in out
    bundle = root / BUNDLE
    assert (bundle / "model.onnx").read_bytes() == data
    assert (bundle / "install-model.sh").stat().st_mode & 0o777 == 0o755
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert manifest["model"]["model_id"] == want and manifest["model"]["bytes"] == len(data)
    assert manifest["model"]["installed_to"] == f"/{STATE}/model.onnx"
    assert 'sh "$BUNDLE/install-model.sh"' in (bundle / "install.sh").read_text()   # install.sh runs it

    done = install_model(root)
    assert done.returncode == 0, done.stderr
    assert (root / STATE / STATE_MODEL_FILE).read_bytes() == data

    # The broker holds no model for this fleet: whatever the agent serves came from the flash.
    assert publish_retained_count(broker.url, fleet) == 0
    agent = Process([*CLI, "edge", "run", "--config", str(bundle / "etc/agent.toml"), "--state-dir",
                     str(root / STATE)], tmp_path / "agent.log", env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline, health = time.monotonic() + 30, {}
        while time.monotonic() < deadline and not (health.get("model_id") and health.get("connected")):
            assert agent.popen.poll() is None, agent.tail()
            time.sleep(0.2)
            health = healthz(port)
        assert health.get("model_id") == want, (health, agent.tail())
        assert health["connected"] is True and health["rounds_joined"] == 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            metrics = r.read().decode().splitlines()
        assert "pqsu_bytes_down_total 0" in metrics                # nothing crossed the radio
        assert f"serving saved model {want[:12]}" in agent.tail()
    finally:
        reap([agent], grace_s=10, signal_first=True)


def publish_retained_count(url: str, fleet: str) -> int:
    """Retained model chunks of `fleet` on the broker (a fresh subscription gets them all at once)."""
    got: list[str] = []
    with MqttClient(url, f"test-probe-{fleet}", persistent_session=False) as c:
        c.subscribe(Topics(fleet).model_filter, lambda t, p, r: got.append(t) if p and r else None)
        time.sleep(0.5)
    return len(got)


def test_install_model_keeps_a_verified_model_and_refuses_a_corrupt_copy(capsys, tmp_path, wheel, broker, models):
    root, state = tmp_path / "root", tmp_path / "root" / STATE
    want, other = model_id.verify(models.a.read_bytes()), models.b.read_bytes()
    assert flash(capsys, root, wheel, broker.url, "keep", "--model-file", str(models.a))[0] == 0
    state.mkdir(parents=True)
    (state / STATE_MODEL_FILE).write_bytes(other)     # a board that has been following its fleet
    kept = install_model(root)
    assert kept.returncode == 0 and "kept" in kept.stdout, kept
    assert (state / STATE_MODEL_FILE).read_bytes() == other
    replaced = install_model(root, PQSU_REPLACE_MODEL="1")
    assert replaced.returncode == 0 and f"model {want} installed" in replaced.stdout, replaced
    assert (state / STATE_MODEL_FILE).read_bytes() == models.a.read_bytes()
    assert install_model(root).stdout.strip().endswith(f"already holds model {want}")

    (state / STATE_MODEL_FILE).write_bytes(other)
    bundled = root / BUNDLE / "model.onnx"
    corrupt = bytearray(bundled.read_bytes())
    corrupt[len(corrupt) // 2] ^= 0x01                 # a bad SD card copy
    bundled.write_bytes(bytes(corrupt))
    refused = install_model(root, PQSU_REPLACE_MODEL="1")
    assert refused.returncode != 0 and "does not verify" in refused.stderr, refused
    assert (state / STATE_MODEL_FILE).read_bytes() == other   # untouched
    assert sorted(p.name for p in state.iterdir()) == [STATE_MODEL_FILE]


@pytest.mark.parametrize("damage, message", [
    (lambda d: d[:len(d) // 2] + bytes([d[len(d) // 2] ^ 1]) + d[len(d) // 2 + 1:], "does not match its id"),
    (lambda d: b"\x08\x07" + os.urandom(200), "not an fl-pqsu model"),
], ids=["one-bit-flipped", "not-a-model"])
def test_a_model_file_that_does_not_verify_is_refused_before_anything_is_written(capsys, tmp_path, wheel, models,
                                                                                damage, message):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(damage(models.a.read_bytes()))
    root = tmp_path / "root"
    code, _, err = flash(capsys, root, wheel, "mqtt://127.0.0.1:1", "f", "--model-file", str(bad))
    assert code == 2 and err.count("\n") == 1 and err.startswith("pqsu flash: error: --model-file "), err
    assert message in err, err
    assert list(root.iterdir()) == []


def test_the_model_retained_on_the_broker_goes_into_the_bundle(capsys, tmp_path, wheel, broker, models):
    data = models.b.read_bytes()
    assert publish_retained(broker.url, "retained", data) > 1            # several chunks, as over a capped broker
    code, out, err = flash(capsys, tmp_path / "root", wheel, broker.url, "retained", "--model-from-broker")
    assert code == 0, err
    bundle = tmp_path / "root" / BUNDLE
    assert (bundle / "model.onnx").read_bytes() == data
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert manifest["model"]["model_id"] == model_id.verify(data)
    assert manifest["model"]["source"] == f"broker {broker.url} fleet retained"


def test_no_incomplete_or_unverifiable_retained_model_and_broker_down_are_one_line_errors(
        capsys, tmp_path, wheel, broker, models, monkeypatch):
    monkeypatch.setattr(model_mod, "IDLE_WAIT_S", 0.5)
    data = models.a.read_bytes()
    count = publish_retained(broker.url, "partial", data, slice(0, 2))  # the coordinator stopped mid-model
    forged = bytearray(data)
    forged[100] ^= 0x01
    publish_retained(broker.url, "forged", bytes(forged))
    closed = f"mqtt://127.0.0.1:{free_port()}"
    for url, fleet, message in (
            (broker.url, "empty", f"no model is retained on {broker.url} fleet 'empty'"),
            (broker.url, "partial", f"is incomplete (2 of {count} chunks, then none for 0.5 s)"),
            (broker.url, "forged", "does not verify"),
            (closed, "empty", f"cannot connect to MQTT broker {closed} within 1s")):
        root = tmp_path / fleet / url.rsplit(":", 1)[1]
        root.parent.mkdir(exist_ok=True)
        t0 = time.monotonic()
        wait = "1" if url == closed else "3"
        code, _, err = flash(capsys, root, wheel, url, fleet, "--model-from-broker", "--model-wait", wait)
        errors = [line for line in err.splitlines() if "error" in line.lower()]   # (log lines may come first)
        assert code == 2 and errors == err.splitlines()[-1:], err
        assert errors[0].startswith("pqsu flash: error: --model-from-broker: ") and message in errors[0], err
        assert time.monotonic() - t0 < 8, f"{fleet}: not bounded"
        assert list(root.iterdir()) == []


def test_the_bundle_puts_the_model_where_the_agent_loads_it():
    from pqsu.edge.agent import MODEL_FILE

    assert STATE_MODEL_FILE == MODEL_FILE


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="dataset-fashion-mnist is missing")
def test_a_board_flashed_from_a_running_fleet_never_downloads_the_whole_model(capsys, tmp_path, wheel, broker):
    """A fleet runs (one board that got its first model over the radio); a new board is flashed with the model
    retained on the broker, joins, and trains: from then on no device downloads a full file, only patches."""
    import numpy as np

    from pqsu.export.datasets import load_dataset

    fleet, root, out = "flash-e2e", tmp_path / "root", tmp_path / "cloud"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    shard = tmp_path / "shard.npz"
    ds = load_dataset("fashion-mnist").head(1500)  # rounds of a few seconds: the new board joins within a few
    np.savez(shard, x=ds.x, y=ds.y)
    metrics_file = out / "metrics.jsonl"

    def metrics() -> list[dict]:
        text = metrics_file.read_text() if metrics_file.exists() else ""
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    procs: list[Process] = []
    try:
        # patches from the last 8 versions: the flashed board is a few rounds behind when it joins
        procs.append(Process([*CLI, "cloud", "--broker", broker.url, "--fleet", fleet, "--rounds", "8",
                              "--patch-bases", "8", "--epochs", "1",
                              "--min-devices", "1", "--clients", "2", "--samples-per-client", "200",
                              "--proxy-samples", "300", "--eval-samples", "300", "--pretrain-epochs", "0.3",
                              "--join-timeout", "240", "--round-timeout", "120", "--out", str(out)],
                             tmp_path / "cloud.log", env=env))
        procs.append(Process([*CLI, "edge", "run", "--broker", broker.url, "--fleet", fleet, "--device-id", "box-a",
                              "--state-dir", str(tmp_path / "box-a"), "--data", str(shard)], tmp_path / "a.log", env=env))
        cloud = procs[0]
        deadline = time.monotonic() + 300                   # pre-training, round 1 with box-a
        while not metrics():
            assert cloud.popen.poll() is None and time.monotonic() < deadline, cloud.tail()
            time.sleep(0.5)
        code, _, err = flash(capsys, root, wheel, broker.url, fleet, "--model-from-broker", inference_only=False)
        assert code == 0, err
        assert install_model(root).returncode == 0
        procs.append(Process([*CLI, "edge", "run", "--config", str(root / BUNDLE / "etc/agent.toml"), "--state-dir",
                              str(root / STATE), "--data", str(shard)], tmp_path / "b.log", env=env))
        deadline = time.monotonic() + 400
        while cloud.popen.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert cloud.popen.poll() == 0, f"{cloud.tail()}\n{procs[2].tail()}"
        rounds = metrics()
        joined = next((m["round"] for m in rounds if m["selected"] == 2), None)
        assert joined is not None and rounds[joined - 1]["uploads"] == 2, rounds   # the flashed board trained
        assert rounds[0]["downloads"] == {"patch": 0, "full": 1}                    # box-a's first model: the radio
        after = rounds[1:]
        assert sum(m["downloads"]["full"] for m in after) == 0, [m["downloads"] for m in rounds]
        assert sum(m["downloads"]["patch"] for m in after) >= len(after), [m["downloads"] for m in rounds]
        assert rounds[joined - 1]["downloads"]["patch"] >= 1 or rounds[joined - 1]["bytes_down"] < 10_000
    finally:
        reap(procs, grace_s=15, signal_first=True)
