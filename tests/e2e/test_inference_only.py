"""The inference-only path in a virtualenv WITHOUT torch (and without the onnx package).

A board installed without torch must still serve predictions and follow every model version.
This test builds a virtualenv with only what every install gets (numpy, onnxruntime, paho-mqtt,
tqdm; pinned by constraints.txt) plus our package (`pip install --no-deps`, not editable, from
a copy of the source), checks torch and onnx really are absent there, then runs in it
`pqsu edge predict` on a saved model, `pqsu edge doctor`, and `pqsu edge run` (no flag: the
missing torch makes it inference-only) against a Mosquitto started by the test, publishes a
model as the coordinator would, and sees the device's retained status (trains=false) and its
/healthz and /predict serve that model. Then it stops the agent with SIGTERM.

The dependency virtualenv is cached under /tmp/pqsu-test-venv-notorch/<hash of setup.cfg,
constraints.txt and the Python version> (a lock file serializes concurrent runs); our package
is reinstalled into it on every run. Every wait is bounded, every process stopped.
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from tests.support.edge_models import int8_models
from tests.support.mosquitto import Mosquitto, free_port, require_mosquitto

from pqsu.edge.inference import InferenceModel
from pqsu.protocol import chunking
from pqsu.protocol.messages import RoundTask, Status
from pqsu.protocol.mqtt import MqttClient
from pqsu.protocol.topics import Topics

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
PACKAGE_FILES = ("setup.cfg", "pyproject.toml", "README.md")
PACKAGE_DIRS = ("protocol", "export", "edge", "cloud", "tools")
BOARD_REQUIREMENTS = ["numpy", "onnxruntime", "paho-mqtt", "tqdm"] + (["tomli"] if sys.version_info < (3, 11) else [])
CACHE = Path(tempfile.gettempdir()) / "pqsu-test-venv-notorch"
PIP_TIMEOUT_S = 900


def _key() -> str:
    h = hashlib.sha256()
    for name in ("setup.cfg", "constraints.txt"):
        path = REPO / name
        h.update(path.read_bytes() if path.exists() else b"")
    h.update(sys.version.encode())
    return h.hexdigest()[:16]


def _env(venv: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PATH=f"{venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}", PYTHONNOUSERSITE="1",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", VIRTUAL_ENV=str(venv))
    return env


def _run(cmd: list, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """A torch-free virtualenv with our package freshly installed (held under a lock)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    key = _key()
    path = CACHE / key
    with open(CACHE / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent runs wait: they would reinstall under each other
        if not (path / ".ready").exists():
            shutil.rmtree(path, ignore_errors=True)
            out = _run([sys.executable, "-m", "venv", path], timeout=120)
            assert out.returncode == 0, out.stderr
            constraints = ["-c", REPO / "constraints.txt"] if (REPO / "constraints.txt").exists() else []
            out = _run([path / "bin" / "python", "-m", "pip", "install", "-q", *constraints, *BOARD_REQUIREMENTS],
                       timeout=PIP_TIMEOUT_S, env=_env(path))
            assert out.returncode == 0, f"installing {BOARD_REQUIREMENTS} failed:\n{out.stderr[-3000:]}"
            (path / ".ready").write_text(" ".join(BOARD_REQUIREMENTS) + "\n")
        # Our package, not editable, from a copy (pip's in-tree build must not write into the repo).
        src = tmp_path_factory.mktemp("src")
        for name in PACKAGE_FILES:
            shutil.copy(REPO / name, src / name)
        for name in PACKAGE_DIRS:
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        out = _run([path / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", src],
                   timeout=PIP_TIMEOUT_S, env=_env(path))
        assert out.returncode == 0, f"installing fl-pqsu failed:\n{out.stderr[-3000:]}"
        yield path


def pqsu(venv: Path, *args, timeout: float = 60, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return _run([venv / "bin" / "pqsu", *args], timeout=timeout, env=_env(venv), cwd=cwd)


def test_torch_and_onnx_are_absent_and_the_edge_imports_nothing_of_them(venv, tmp_path):
    py = venv / "bin" / "python"
    for module in ("torch", "onnx"):
        out = _run([py, "-c", f"import {module}"], timeout=60, env=_env(venv), cwd=tmp_path)
        assert out.returncode != 0 and f"No module named '{module}'" in out.stderr
    code = ("import sys, pqsu.edge.command, pqsu.edge.agent, pqsu.edge.service, pqsu.edge.doctor, "
            "pqsu.edge.inference, pqsu.edge.inputs, pqsu.edge.datastore, pqsu.tools.cli\n"
            "import pqsu.edge.agent as a\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx') or m.startswith('pqsu.cloud'))\n"
            "print(a.__file__); print(bad)")
    out = _run([py, "-c", code], timeout=60, env=_env(venv), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    where, bad = out.stdout.strip().splitlines()
    assert where.startswith(str(venv)), where  # the installed copy, not the repository
    assert bad == "[]"


def test_predict_without_torch(venv, tmp_path):
    models = int8_models()
    x = models.x_test[:5]
    np.save(tmp_path / "x.npy", x)
    expected = InferenceModel(models.a.read_bytes()).classify(x)
    out = pqsu(venv, "edge", "predict", tmp_path / "x.npy", "--model", models.a, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = [line.split("\t") for line in out.stdout.strip().splitlines()]
    assert [int(i) for i, _, _ in lines] == list(range(5))
    assert [label.strip() for _, label, _ in lines] == expected.labels
    probs = [max(p) for p in expected.probabilities]
    assert [float(p) for _, _, p in lines] == pytest.approx(probs, abs=1e-4)

    # the agent's state folder instead of --model, JSON out, and a PGM image of sample 0
    state = tmp_path / "state"
    state.mkdir()
    shutil.copy(models.a, state / "model.onnx")
    out = pqsu(venv, "edge", "predict", tmp_path / "x.npy", "--state-dir", state, "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["model_id"] == expected.model_id and answer["predictions"] == expected.predictions
    (tmp_path / "zero.pgm").write_bytes(b"P5\n# sample 0\n28 28\n255\n" + x[0, 0].tobytes())
    out = pqsu(venv, "edge", "predict", tmp_path / "zero.pgm", "--model", models.a, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.split("\t")[1].strip() == expected.labels[0]

    # clear one-line errors, exit status 2
    np.save(tmp_path / "bad.npy", np.zeros((3, 27, 28), np.uint8))
    (tmp_path / "not-a-model.onnx").write_bytes(b"\x08\x07 not an onnx file")
    for args, message in [
        ((tmp_path / "missing.npy", "--model", models.a), "does not exist"),
        ((tmp_path / "x.npy", "--model", tmp_path / "not-a-model.onnx"), "not an fl-pqsu model"),
        ((tmp_path / "x.npy", "--model", tmp_path / "missing.onnx"), "does not exist"),
        ((tmp_path / "bad.npy", "--model", models.a), "does not fit"),
        ((tmp_path / "x.npy", "--state-dir", tmp_path / "empty"), "no model at"),
    ]:
        out = pqsu(venv, "edge", "predict", *args, cwd=tmp_path)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert out.stderr.startswith("pqsu edge: error: ") and message in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def _get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _wait(predicate, timeout_s: float, what: str, proc: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        if proc.poll() is not None:
            raise AssertionError(f"the agent exited ({proc.returncode}) while waiting for {what}:\n"
                                 + log.read_text(errors="replace")[-3000:])
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}:\n" + log.read_text(errors="replace")[-3000:])


def test_agent_without_torch_follows_the_fleet_and_serves(venv, tmp_path):
    require_mosquitto()
    models = int8_models()
    data = models.a.read_bytes()
    model = InferenceModel(data)
    fleet, device = "notorch", "pi-notorch-01"
    topics = Topics(fleet)
    http_port = free_port()
    log = tmp_path / "agent.log"
    with Mosquitto(tmp_path / "broker") as broker:
        coordinator = MqttClient(broker.url, "test-coordinator", persistent_session=False)
        coordinator.connect(timeout_s=10)
        statuses: dict[str, Status] = {}
        coordinator.subscribe(topics.status_filter,
                              lambda t, p, r: statuses.__setitem__(topics.parse(t)[1], Status.from_json(p)))
        with open(log, "wb") as out:
            proc = subprocess.Popen([str(venv / "bin" / "pqsu"), "edge", "run", "--broker", broker.url, "--device-id",
                                     device, "--fleet", fleet, "--state-dir", str(tmp_path / "device"),
                                     "--http-port", str(http_port)],
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_env(venv),
                                    cwd=tmp_path, start_new_session=True)
        try:
            _wait(lambda: statuses.get(device) and statuses[device].state == "online", 30, "status online", proc, log)
            assert "torch is not installed: running as an inference-only device" in log.read_text()
            url = f"http://127.0.0.1:{http_port}"
            assert _get(url + "/healthz")[0] == 503  # serving, but no model yet

            frames = chunking.split(data, 32 * 1024, message_id=bytes.fromhex(model.model_id))
            for i, frame in enumerate(frames):
                coordinator.publish(topics.model_chunk(i), frame, retain=True)
            coordinator.publish(topics.round, RoundTask(round=1, model_id=model.model_id,
                                                        model_bytes=len(data)).to_json(), retain=True)
            health = _wait(lambda: (lambda c, b: json.loads(b) if c == 200 else None)(*_get(url + "/healthz")),
                           30, "/healthz with the model", proc, log)
            assert health["model_id"] == model.model_id and health["connected"] is True

            buf = io.BytesIO()
            np.save(buf, models.x_test[:4])
            req = urllib.request.Request(url + "/predict", data=buf.getvalue(),
                                         headers={"Content-Type": "application/x-npy"})
            with urllib.request.urlopen(req, timeout=10) as r:
                answer = json.loads(r.read())
            assert answer["model_id"] == model.model_id
            assert answer["predictions"] == model.classify(models.x_test[:4]).predictions
            assert (tmp_path / "device" / "model.onnx").read_bytes() == data

            # what the coordinator sees: a retained status, from a fresh subscriber, with trains=false
            seen: list[tuple[Status, bool]] = []
            late = MqttClient(broker.url, "test-late-reader", persistent_session=False)
            late.subscribe(topics.status(device), lambda t, p, r: seen.append((Status.from_json(p), r)))
            late.connect(timeout_s=10)
            try:
                _wait(lambda: seen, 10, "the retained status", proc, log)
            finally:
                late.close()
            status, retained = seen[0]
            assert retained and status.trains is False and status.state == "online"

            # the doctor of this board, in the same torch-free environment, sees the running agent
            doc = pqsu(venv, "edge", "doctor", "--broker", broker.url, "--device-id", device, "--fleet", fleet,
                       "--state-dir", tmp_path / "device", "--http-port", http_port, "--timeout", "3", cwd=tmp_path)
            assert doc.returncode == 0, doc.stdout + doc.stderr
            assert "WARN  torch       not installed" in doc.stdout
            assert f"already served by a running agent ({device}, model {model.model_id})" in doc.stdout
            assert f"PASS  model       {tmp_path / 'device' / 'model.onnx'}: model {model.model_id}" in doc.stdout

            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0, log.read_text(errors="replace")[-3000:]
            deadline = time.monotonic() + 10
            while statuses[device].state != "offline" and time.monotonic() < deadline:
                time.sleep(0.05)
            assert statuses[device].state == "offline" and statuses[device].trains is False
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            coordinator.close()
