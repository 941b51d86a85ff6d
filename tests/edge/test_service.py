"""The agent's local inference API (pqsu.edge.service) against real int8 models, over real HTTP.

Part 1 runs the service without an agent (a holder whose model the test swaps); part 2 runs an
inference-only EdgeAgent against a private Mosquitto, fed by a test "coordinator" that publishes
retained model chunks. Loopback only; every wait is bounded.
"""
from __future__ import annotations

import http.client
import io
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from tests.support.edge_models import int8_models
from tests.support.mosquitto import Mosquitto, free_port, require_mosquitto

from pqsu.edge.agent import MODEL_FILE, AgentConfig, EdgeAgent
from pqsu.edge.inference import InferenceModel, softmax
from pqsu.edge.service import InferenceService, ServiceError
from pqsu.protocol import chunking
from pqsu.protocol.messages import RoundTask, Status, done_message
from pqsu.protocol.mqtt import MqttClient
from pqsu.protocol.topics import Topics

TIMEOUT_S = 10.0


# -- helpers -----------------------------------------------------------------------------
def call(url: str, body: bytes | None = None, content_type: str | None = None, method: str | None = None,
         timeout: float = TIMEOUT_S) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one request; HTTP errors are answers too."""
    req = urllib.request.Request(url, data=body, method=method)
    if content_type is not None:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def npy(x: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=allow_pickle)
    return buf.getvalue()


def npy_header(shape: tuple, descr: str = "|u1") -> bytes:
    """Just the .npy magic and header, for bodies that lie about their size."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def predict(url: str, body: bytes, content_type: str = "application/x-npy") -> dict:
    code, _, raw = call(url + "/predict", body, content_type)
    assert code == 200, raw
    return json.loads(raw)


def direct_logits(path: Path, x: np.ndarray) -> np.ndarray:
    """onnxruntime on the file itself, on inputs normalized by the test (not by our code)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


METRIC_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*",?)*\})? '
                         r'(-?[0-9.eE+-]+|\+Inf|-Inf|NaN)$')


def parse_prometheus(text: str) -> tuple[dict[str, float], dict[str, str], dict[str, list[tuple[str, float]]]]:
    """(unlabelled samples, TYPE per family, labelled samples) of a text exposition; asserts its syntax."""
    plain, types, labelled = {}, {}, {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            assert len(line.split(" ", 3)) == 4, line
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped")
            types[name] = kind
            continue
        m = METRIC_LINE.match(line)
        assert m, f"not a Prometheus sample line: {line!r}"
        name, labels, value = m.group(1), m.group(2), float(m.group(4))
        if labels:
            labelled.setdefault(name, []).append((labels, value))
        else:
            plain[name] = value
    return plain, types, labelled


# -- fixtures ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models():
    return int8_models()


@pytest.fixture(scope="module")
def model_a(models):
    return InferenceModel(models.a.read_bytes())


@pytest.fixture(scope="module")
def model_b(models):
    return InferenceModel(models.b.read_bytes())


class Holder:
    """Stands in for the agent: a current model the test swaps, and its status."""

    def __init__(self, model):
        self.model = model
        self.status = {"rounds_joined": 3, "bytes_up": 1234, "bytes_down": 56789, "bad_messages": 2,
                       "connected": True, "device": "bench-01"}


@pytest.fixture
def holder(model_a):
    return Holder(model_a)


@pytest.fixture
def service(holder):
    with InferenceService(lambda: holder.model, port=0, status=lambda: holder.status) as svc:
        yield svc


# -- part 1: the service on its own ------------------------------------------------------
def test_predict_npy_batch_agrees_with_onnxruntime(service, models, model_a):
    x = models.x_test[:16]
    answer = predict(service.url, npy(x))
    logits = direct_logits(models.a, models.normalized(x))
    assert answer["model_id"] == model_a.model_id
    assert answer["predictions"] == logits.argmax(1).tolist()
    assert answer["labels"] == [model_a.info.classes[i] for i in answer["predictions"]]
    probs = np.asarray(answer["probabilities"])
    assert probs.shape == (16, 10)
    np.testing.assert_allclose(probs, softmax(logits), atol=1e-6)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-9)
    assert answer["latency_ms"] >= 0
    assert (np.asarray(answer["predictions"]) == models.y_test[:16]).mean() > 0.4  # trained, not random


def test_predict_single_image_and_octet_stream(service, models):
    one = predict(service.url, npy(models.x_test[3]), "application/octet-stream")  # (C, H, W)
    batch = predict(service.url, npy(models.x_test[:5]))
    assert len(one["predictions"]) == 1
    assert one["predictions"][0] == batch["predictions"][3]
    np.testing.assert_allclose(one["probabilities"][0], batch["probabilities"][3], atol=1e-6)


def test_predict_json_uint8_and_float(service, models):
    x = models.x_test[:4]
    as_npy = predict(service.url, npy(x))
    as_uint8 = predict(service.url, json.dumps({"inputs": x.tolist()}).encode(), "application/json")
    floats = models.normalized(x)
    as_float = predict(service.url, json.dumps({"inputs": floats.tolist()}).encode(), "application/json; charset=utf-8")
    assert as_uint8["predictions"] == as_npy["predictions"] == as_float["predictions"]
    np.testing.assert_allclose(as_uint8["probabilities"], as_npy["probabilities"], atol=1e-6)
    np.testing.assert_allclose(as_float["probabilities"], as_npy["probabilities"], atol=1e-4)
    # floats are passed as they are: the same pixels NOT normalized give a different answer
    raw = predict(service.url, json.dumps({"inputs": x.astype(np.float32).tolist()}).encode(), "application/json")
    assert not np.allclose(raw["probabilities"], as_npy["probabilities"], atol=1e-3)
    # the explicit dtype and a body without Content-Type (sniffed)
    typed = predict(service.url, json.dumps({"inputs": x[0].tolist(), "dtype": "uint8"}).encode(), "")
    assert typed["predictions"] == as_npy["predictions"][:1]


def test_healthz_with_and_without_a_model(service, holder, model_a):
    code, headers, raw = call(service.url + "/healthz")
    assert code == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(raw) == {"status": "ok", "model_id": model_a.model_id, "rounds_joined": 3,
                               "connected": True, "device": "bench-01"}
    holder.model = None
    code, _, raw = call(service.url + "/healthz")
    assert code == 503 and json.loads(raw)["status"] == "no model" and json.loads(raw)["model_id"] is None
    code, _, raw = call(service.url + "/predict", npy(np.zeros((1, 28, 28), np.uint8)), "application/x-npy")
    assert code == 503 and "no model" in json.loads(raw)["error"]


def test_metrics_are_prometheus_text(service, models, model_a):
    for _ in range(3):
        predict(service.url, npy(models.x_test[:2]))
    call(service.url + "/predict", b"nonsense", "text/plain")
    code, headers, raw = call(service.url + "/metrics")
    assert code == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    plain, types, labelled = parse_prometheus(raw.decode())
    assert plain["pqsu_rounds_joined_total"] == 3 and types["pqsu_rounds_joined_total"] == "counter"
    assert plain["pqsu_bytes_up_total"] == 1234 and plain["pqsu_bytes_down_total"] == 56789
    assert plain["pqsu_bad_messages_total"] == 2 and plain["pqsu_mqtt_connected"] == 1
    assert plain["pqsu_inference_requests_total"] == 4 and plain["pqsu_inference_errors_total"] == 1
    assert plain["pqsu_inference_samples_total"] == 6
    assert types["pqsu_model_info"] == "gauge"
    [(labels, value)] = labelled["pqsu_model_info"]
    assert f'model_id="{model_a.model_id}"' in labels and value == 1
    assert types["pqsu_inference_latency_ms"] == "histogram"
    buckets = labelled["pqsu_inference_latency_ms_bucket"]
    counts = [v for _, v in buckets]
    assert counts == sorted(counts) and buckets[-1][0] == '{le="+Inf"}' and counts[-1] == 3
    assert plain["pqsu_inference_latency_ms_count"] == 3 and plain["pqsu_inference_latency_ms_sum"] > 0
    for name in ("pqsu_rounds_joined_total", "pqsu_bytes_up_total", "pqsu_bytes_down_total", "pqsu_model_info",
                 "pqsu_inference_requests_total", "pqsu_inference_errors_total", "pqsu_inference_latency_ms",
                 "pqsu_bad_messages_total", "pqsu_mqtt_connected"):
        assert f"# HELP {name} " in raw.decode() and name in types, name


def raw_http(port: int, data: bytes) -> tuple[int, dict]:
    """Send raw bytes, read one HTTP answer (status, JSON body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as s:
        s.sendall(data)
        buf = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
            head, sep, body = buf.partition(b"\r\n\r\n")
            m = re.search(rb"Content-Length: (\d+)", head)
            if sep and m and len(body) >= int(m.group(1)):
                break
    if not buf.startswith(b"HTTP/"):  # an HTTP/0.9-style request gets a bare body
        return 0, json.loads(buf)
    status = int(buf.split(b" ", 2)[1])
    return status, json.loads(buf.partition(b"\r\n\r\n")[2])


def test_bad_requests_get_4xx_json_and_the_server_keeps_serving(service, models):
    x = models.x_test[:2]
    zip_bytes = io.BytesIO()
    np.savez(zip_bytes, x=x)
    deep = b"[" * 100_000 + b"]" * 100_000
    cases = [
        ("text body", "/predict", b"hello", "text/plain", 415),
        ("garbage, no type", "/predict", b"\x00\x01garbage", "", 415),
        ("pickled object array", "/predict", npy(np.array([{"a": 1}, None], dtype=object), allow_pickle=True),
         "application/x-npy", 400),
        (".npz, not .npy", "/predict", zip_bytes.getvalue(), "application/x-npy", 400),
        ("truncated .npy", "/predict", npy(x)[:200], "application/x-npy", 400),
        ("huge declared shape", "/predict", npy_header((10**12, 1, 28, 28)) + b"\0" * 64, "application/x-npy", 400),
        ("wrong shape", "/predict", npy(np.zeros((2, 1, 27, 28), np.uint8)), "application/x-npy", 400),
        ("wrong rank", "/predict", npy(np.zeros((28, 28), np.uint8)), "application/x-npy", 400),
        ("int32 dtype", "/predict", npy(x.astype(np.int32)), "application/x-npy", 400),
        ("NaN input", "/predict", npy(np.full((1, 1, 28, 28), np.nan, np.float32)), "application/x-npy", 400),
        ("empty batch", "/predict", npy(np.zeros((0, 1, 28, 28), np.uint8)), "application/x-npy", 400),
        ("empty body", "/predict", b"", "application/x-npy", 400),
        ("invalid JSON", "/predict", b"{\"inputs\": [1, 2", "application/json", 400),
        ("JSON without inputs", "/predict", b"{\"x\": []}", "application/json", 400),
        ("ragged JSON", "/predict", b"{\"inputs\": [[1, 2], [3]]}", "application/json", 400),
        ("strings in JSON", "/predict", b"{\"inputs\": [[\"a\"]]}", "application/json", 400),
        ("pixel 300", "/predict", json.dumps({"inputs": np.full((1, 28, 28), 300).tolist()}).encode(),
         "application/json", 400),
        ("deeply nested JSON", "/predict", deep, "application/json", 400),
        ("GET-only path", "/metrics", npy(x), "application/x-npy", 405),
        ("unknown path", "/nope", b"{}", "application/json", 404),
    ]
    for what, path, body, ctype, expected in cases:
        code, headers, raw = call(service.url + path, body, ctype, method="POST")
        assert code == expected, (what, code, raw[:200])
        assert headers["Content-Type"] == "application/json" and json.loads(raw)["error"], what
    for what, method, path, expected in [("GET /predict", "GET", "/predict", 405), ("GET /nope", "GET", "/nope", 404),
                                         ("DELETE", "DELETE", "/predict", 405), ("PUT", "PUT", "/healthz", 405)]:
        code, _, raw = call(service.url + path, None, None, method=method)
        assert code == expected and json.loads(raw)["error"], what
    # a body over the limit is refused from its Content-Length, before it is read
    conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=TIMEOUT_S)
    conn.putrequest("POST", "/predict")
    conn.putheader("Content-Type", "application/x-npy")
    conn.putheader("Content-Length", str(service.max_body + 1))
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413 and "limit" in json.loads(r.read())["error"]
    conn.close()
    # protocol garbage and an unknown method, on a raw socket
    assert "Bad request" in raw_http(service.port, b"GARBAGE\r\n\r\n")[1]["error"]
    assert raw_http(service.port, b"GET /healthz HTTP/1.1\r\n" + b"X-A: b\r\n" * 150 + b"\r\n")[0] == 431
    assert raw_http(service.port, b"FROB /predict HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 405
    assert raw_http(service.port, b"POST /predict HTTP/1.1\r\nContent-Length: -5\r\n\r\n")[0] == 400
    # still serving, and the failures were counted
    assert predict(service.url, npy(x))["predictions"]
    plain, _, _ = parse_prometheus(call(service.url + "/metrics")[2].decode())
    assert plain["pqsu_inference_errors_total"] >= 19 and plain["pqsu_inference_latency_ms_count"] == 1


def test_binds_loopback_only(service):
    host, port = service._server.socket.getsockname()[:2]
    assert (host, port) == ("127.0.0.1", service.port)
    with pytest.raises(OSError):  # another loopback address of this machine: nothing listens there
        socket.create_connection(("127.0.0.2", port), timeout=2).close()


def test_busy_port_is_a_clear_error(service, holder):
    with pytest.raises(ServiceError, match="--http-port"):
        InferenceService(lambda: holder.model, port=service.port).start()


def test_model_swap_while_requests_run(service, holder, models, model_a, model_b):
    x = models.x_test[:8]
    body = npy(x)
    expected = {model_a.model_id: model_a.classify(x).predictions, model_b.model_id: model_b.classify(x).predictions}
    assert expected[model_a.model_id] != expected[model_b.model_id]
    seen: list[list[str]] = [[], []]
    errors: list[str] = []
    stop = threading.Event()

    def hammer(k: int) -> None:
        deadline = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < deadline and len(seen[k]) < 2000:
            try:
                code, _, raw = call(service.url + "/predict", body, "application/x-npy")
            except OSError as exc:
                errors.append(repr(exc))
                continue
            if code != 200:
                errors.append(f"{code} {raw[:100]!r}")
                continue
            answer = json.loads(raw)
            if answer["predictions"] != expected.get(answer["model_id"]):
                errors.append(f"predictions of {answer['model_id']} do not match that model")
            seen[k].append(answer["model_id"])

    threads = [threading.Thread(target=hammer, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while min(len(s) for s in seen) < 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    holder.model = model_b  # what the agent does: one reference swap
    at_swap = [len(s) for s in seen]
    while min(len(s) - n for s, n in zip(seen, at_swap)) < 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    for t in threads:
        t.join(timeout=TIMEOUT_S)
    assert not errors, errors[:5]
    for ids in seen:
        assert ids[0] == model_a.model_id and ids[-1] == model_b.model_id
        first_b = ids.index(model_b.model_id)
        assert set(ids[first_b:]) == {model_b.model_id}  # once switched, never back
    assert predict(service.url, body)["model_id"] == model_b.model_id


# -- part 2: an inference-only agent over a real broker -----------------------------------
def publish_model(client: MqttClient, topics: Topics, data: bytes, limit: int = 32 * 1024) -> int:
    """What the coordinator does: the model file as retained chunks, framed and hashed."""
    frames = chunking.split(data, limit, message_id=bytes.fromhex(InferenceModel(data).model_id))
    for i, frame in enumerate(frames):
        client.publish(topics.model_chunk(i), frame, retain=True)
    return len(frames)


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")


def healthz(agent: EdgeAgent) -> dict | None:
    if agent.service is None:
        return None
    code, _, raw = call(agent.service.url + "/healthz", timeout=2)
    return json.loads(raw) if code == 200 else None


class AgentThread:
    def __init__(self, cfg: AgentConfig):
        self.agent = EdgeAgent(cfg, learner=None)
        self.stop = threading.Event()
        self.result: list = []
        self.thread = threading.Thread(target=lambda: self.result.append(self.agent.run(self.stop)), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the agent did not stop"


def test_inference_only_agent_follows_models_and_serves_them(tmp_path, models):
    require_mosquitto()
    fleet, device = "svc", "pi-infer-01"
    topics = Topics(fleet)
    data_a, data_b = models.a.read_bytes(), models.b.read_bytes()
    id_a, id_b = InferenceModel(data_a).model_id, InferenceModel(data_b).model_id
    statuses: dict[str, Status] = {}
    with Mosquitto(tmp_path / "broker") as broker:
        cfg = AgentConfig(broker.url, device, fleet=fleet, state_dir=str(tmp_path / "device"), http_port=0,
                          chunk_limit=32 * 1024, connect_timeout_s=3, max_backoff_s=1)
        coordinator = MqttClient(broker.url, "test-coordinator", persistent_session=False)
        coordinator.connect(timeout_s=TIMEOUT_S)
        coordinator.subscribe(topics.status_filter,
                              lambda t, p, r: statuses.__setitem__(topics.parse(t)[1], Status.from_json(p)))
        agent = None
        try:
            agent = AgentThread(cfg)
            wait_for(lambda: statuses.get(device) and statuses[device].state == "online", TIMEOUT_S, "status online")
            assert statuses[device].trains is False
            call_url = lambda: agent.agent.service.url  # noqa: E731
            code, _, raw = call(call_url() + "/healthz")
            assert code == 503  # no model yet
            publish_model(coordinator, topics, data_a)
            coordinator.publish(topics.round, RoundTask(round=1, model_id=id_a, model_bytes=len(data_a)).to_json(),
                                retain=True)
            wait_for(lambda: (healthz(agent.agent) or {}).get("model_id") == id_a, 20, "model A served")
            x = models.x_test[:6]
            answer = predict(call_url(), npy(x))
            assert answer["model_id"] == id_a
            assert answer["predictions"] == direct_logits(models.a, models.normalized(x)).argmax(1).tolist()
            assert (tmp_path / "device" / MODEL_FILE).read_bytes() == data_a
            assert healthz(agent.agent)["connected"] is True

            publish_model(coordinator, topics, data_b)  # a new version (same chunk count: nothing stale)
            coordinator.publish(topics.round, RoundTask(round=2, model_id=id_b, model_bytes=len(data_b)).to_json(),
                                retain=True)
            wait_for(lambda: (healthz(agent.agent) or {}).get("model_id") == id_b, 20, "model B served")
            answer = predict(call_url(), npy(x))
            assert answer["model_id"] == id_b
            assert answer["predictions"] == direct_logits(models.b, models.normalized(x)).argmax(1).tolist()
            assert (tmp_path / "device" / MODEL_FILE).read_bytes() == data_b
            plain, _, labelled = parse_prometheus(call(call_url() + "/metrics")[2].decode())
            assert plain["pqsu_mqtt_connected"] == 1 and plain["pqsu_bytes_down_total"] == \
                len(data_a) + len(data_b) + 2 * chunking.HEADER_SIZE * len(chunking.split(data_a, 32 * 1024))
            assert id_b in labelled["pqsu_model_info"][0][0]

            # training is over: a training agent leaves, an inference-only one keeps serving
            coordinator.publish(topics.round, done_message(2, id_b), retain=True)
            time.sleep(1.0)
            assert agent.thread.is_alive() and predict(call_url(), npy(x))["model_id"] == id_b
            assert statuses[device].trains is False and statuses[device].state == "online"
            agent.close()
            agent = None
            wait_for(lambda: statuses[device].state == "offline", TIMEOUT_S, "status offline")
        finally:
            if agent is not None:
                agent.close()
            coordinator.close()

    # rebooted with no broker reachable: it serves the saved model B at once
    dead = AgentConfig(f"mqtt://127.0.0.1:{free_port()}", device, fleet=fleet, state_dir=str(tmp_path / "device"),
                       http_port=0, connect_timeout_s=1, max_backoff_s=1)
    agent = AgentThread(dead)
    try:
        assert agent.agent.model is not None and agent.agent.model.model_id == id_b  # loaded before run()
        health = wait_for(lambda: healthz(agent.agent), TIMEOUT_S, "healthz after restart")
        assert health["model_id"] == id_b and health["connected"] is False
        assert predict(agent.agent.service.url, npy(models.x_test[:2]))["model_id"] == id_b
    finally:
        started = time.monotonic()
        agent.close()
    assert time.monotonic() - started < 10  # a stop while the broker is away ends the backoff promptly


def test_agent_ignores_a_corrupt_saved_model(tmp_path, models):
    folder = tmp_path / "device"
    folder.mkdir()
    data = bytearray(models.a.read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / MODEL_FILE).write_bytes(bytes(data))
    agent = EdgeAgent(AgentConfig("mqtt://127.0.0.1:1", "pi-x", state_dir=str(folder)), learner=None)
    assert agent.model is None  # logged and ignored: the broker's retained model replaces it


# -- inputs from files (pqsu edge predict) -------------------------------------------------
def png_bytes(img: np.ndarray, colour: int, filters: list[int]) -> bytes:
    """A PNG of (H, W, samples) uint8 written with the given filter type per row (0-4)."""
    import struct
    import zlib

    h, w, spp = img.shape
    rows, prev = [], np.zeros(w * spp, np.int32)
    for y in range(h):
        cur = img[y].reshape(-1).astype(np.int32)
        left = np.concatenate([np.zeros(spp, np.int32), cur[:-spp]])
        up_left = np.concatenate([np.zeros(spp, np.int32), prev[:-spp]])
        f = filters[y % len(filters)]
        if f == 0:
            out = cur
        elif f == 1:
            out = cur - left
        elif f == 2:
            out = cur - prev
        elif f == 3:
            out = cur - (left + prev) // 2
        else:
            p = left + prev - up_left
            pa, pb, pc = abs(p - left), abs(p - prev), abs(p - up_left)
            out = cur - np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, up_left))
        rows.append(bytes([f]) + (out & 0xFF).astype(np.uint8).tobytes())
        prev = cur

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))


def test_image_files_decode_exactly(tmp_path):
    from pqsu.edge import inputs

    rng = np.random.default_rng(0)
    for colour, spp in ((0, 1), (2, 3), (4, 2), (6, 4)):
        img = rng.integers(0, 256, (9, 7, spp), dtype=np.uint8)
        path = tmp_path / f"c{colour}.png"
        path.write_bytes(png_bytes(img, colour, [0, 1, 2, 3, 4]))
        got = inputs.load_file(path)
        keep = 1 if spp <= 2 else 3  # alpha dropped
        np.testing.assert_array_equal(got, img[:, :, :keep].transpose(2, 0, 1))
    grey = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    (tmp_path / "g.pgm").write_bytes(b"P5 28 28 255\n" + grey.tobytes())
    np.testing.assert_array_equal(inputs.load_file(tmp_path / "g.pgm"), grey[None])
    assert inputs.load_file(tmp_path / "g.pgm", channels=3).shape == (3, 28, 28)
    rgb = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
    (tmp_path / "c.ppm").write_bytes(b"P6\n28 28\n255\n" + rgb.tobytes())
    assert inputs.load_file(tmp_path / "c.ppm", channels=1).shape == (1, 28, 28)
    (tmp_path / "x.json").write_text(json.dumps({"inputs": grey[None].tolist()}))
    np.testing.assert_array_equal(inputs.load_file(tmp_path / "x.json"), grey[None])
    for name, data in [("t.png", png_bytes(img, 6, [0])[:60]), ("t.pgm", b"P5 28 28 255\n" + b"\0" * 10),
                       ("t.txt", b"hello"), ("t16.pgm", b"P5 2 2 65535\n" + b"\0" * 8)]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(inputs.InputError):
            inputs.load_file(tmp_path / name)
