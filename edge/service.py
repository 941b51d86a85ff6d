"""The agent's local inference API: stdlib HTTP on 127.0.0.1 only, for applications on the board.

  POST /predict   body: .npy (Content-Type application/x-npy or application/octet-stream) or
                  JSON {"inputs": nested list} (application/json); one sample of the shape the
                  model declares (an image (C, H, W), a sensor window (C, L)...) or a batch of
                  them, batch axis first; uint8 pixels are normalized with the model's own
                  statistics, floats pass as they are. POST /predict?raw=1: readings as measured,
                  normalized here with the model's statistics (a model of sensor readings).
                  -> 200 {"model_id", "predictions": [int], "labels": [str],
                          "probabilities": [[float]] (softmax), "latency_ms"}
  GET  /healthz   -> 200 {"status": "ok", "model_id", "rounds_joined", "connected"} with a model,
                     503 {"status": "no model", ...} before the first one arrives
  GET  /metrics   -> Prometheus text exposition format 0.0.4

The current model is read through a callable (`lambda: agent.model`) once per request:
the agent swaps an immutable `InferenceModel` as a whole, so a request in flight finishes
on the model it started with. Every bad request (not .npy/JSON, pickled arrays, wrong shape
or dtype, a body over `max_body` bytes, an unknown path or method) gets a 4xx with a JSON
`{"error": ...}`; nothing a client sends can stop the server. The port is bound on the
loopback address only: the API has no authentication, so it must not face the network.
"""
from __future__ import annotations

import bisect
import errno
import http.server
import json
import logging
import threading
import urllib.parse
from typing import Callable

import numpy as np

from pqsu.edge import inputs
from pqsu.edge.inference import InferenceModel
from pqsu.protocol.errors import PqsuError

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
DEFAULT_PORT = 8780
MAX_BODY = 16 * 1024 * 1024
LATENCY_BUCKETS_MS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)
PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_NPY_TYPES = ("application/x-npy", "application/octet-stream", "application/npy")
_JSON_TYPES = ("application/json", "text/json")


class ServiceError(PqsuError):
    """The inference API cannot start (port in use, no permission)."""


class _Stats:
    """Request counters and a latency histogram, shared by the handler threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = self.errors = self.samples = 0
        self.buckets = [0] * (len(LATENCY_BUCKETS_MS) + 1)  # the last one is +Inf
        self.latency_sum = 0.0

    def ok(self, samples: int, ms: float) -> None:
        with self.lock:
            self.requests += 1
            self.samples += samples
            self.buckets[bisect.bisect_left(LATENCY_BUCKETS_MS, ms)] += 1
            self.latency_sum += ms

    def failed(self) -> None:
        with self.lock:
            self.requests += 1
            self.errors += 1

    def snapshot(self) -> dict:
        with self.lock:
            return {"requests": self.requests, "errors": self.errors, "samples": self.samples,
                    "buckets": list(self.buckets), "latency_sum": self.latency_sum}


class _HttpError(Exception):
    def __init__(self, code: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.code, self.message, self.headers = code, message, headers or {}


class InferenceService:
    """The HTTP API on `127.0.0.1:port` (0 picks a free port) on a daemon thread.

    `model` returns the current `InferenceModel` or None; `status` (optional) returns the
    agent's `metrics()` dict (rounds_joined, bytes_up, bytes_down, bad_messages, connected).
    """

    def __init__(self, model: Callable[[], InferenceModel | None], *, port: int = DEFAULT_PORT,
                 status: Callable[[], dict] | None = None, max_body: int = MAX_BODY,
                 request_timeout_s: float = 30.0):
        self.model_source, self.status_source = model, status or (lambda: {})
        self.max_body, self.requested_port = max_body, port
        self.stats = _Stats()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._handler = type("Handler", (_Handler,), {"service": self, "timeout": request_timeout_s})

    @property
    def port(self) -> int:
        if self._server is None:
            raise ServiceError("the inference API is not running")
        return self._server.server_address[1]

    @property
    def address(self) -> tuple[str, int]:
        return HOST, self.port

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> "InferenceService":
        if self._server is not None:
            return self
        try:
            server = http.server.ThreadingHTTPServer((HOST, self.requested_port), self._handler)
        except OSError as exc:
            hint = ("another program (or agent) uses it: pass --http-port with another port, 0 for any free one, "
                    "or --no-http" if exc.errno == errno.EADDRINUSE else "")
            raise ServiceError(f"cannot serve the inference API on {HOST}:{self.requested_port}: "
                               f"{exc.strerror or exc}{'; ' + hint if hint else ''}") from None
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name=f"pqsu-http-{self.port}", daemon=True)
        self._thread.start()
        log.info("inference API on %s (POST /predict, GET /healthz, GET /metrics)", self.url)
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "InferenceService":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- what the endpoints answer ------------------------------------------------------
    def predict(self, body: bytes, content_type: str, *, raw: bool = False) -> dict:
        model = self.model_source()  # read once: this request finishes on this model
        if model is None:
            raise _HttpError(503, "no model yet: the agent has not received one from the broker")
        x = parse_body(body, content_type)
        try:
            pred = model.classify(x, raw=raw)
        except PqsuError as exc:
            raise _HttpError(400, str(exc)) from None
        self.stats.ok(len(pred.predictions), pred.latency_ms)
        return pred.to_dict()

    def health(self) -> tuple[int, dict]:
        model, status = self.model_source(), self.status_source()
        body = {"status": "ok" if model is not None else "no model",
                "model_id": model.model_id if model is not None else None,
                "rounds_joined": int(status.get("rounds_joined", 0)),
                "connected": bool(status.get("connected", False))}
        if status.get("device"):
            body["device"] = status["device"]
        return (200 if model is not None else 503), body

    def metrics_text(self) -> str:
        model, status, s = self.model_source(), self.status_source(), self.stats.snapshot()
        out: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(f"{name}{labels} {_number(value)}" for labels, value in samples)

        metric("pqsu_rounds_joined_total", "counter", "Training rounds this device took part in (this process).",
               [("", status.get("rounds_joined", 0))])
        metric("pqsu_bytes_up_total", "counter", "Update bytes this device uploaded.", [("", status.get("bytes_up", 0))])
        metric("pqsu_bytes_down_total", "counter", "Model bytes this device downloaded.",
               [("", status.get("bytes_down", 0))])
        info = []
        if model is not None:
            info = [(_labels(model_id=model.model_id, arch=str(model.info.spec.get("arch", "")),
                             precision=model.info.precision), 1)]
        metric("pqsu_model_info", "gauge", "The model being served (value 1; no sample before the first model).", info)
        metric("pqsu_model_bytes", "gauge", "Size of the served model file in bytes.",
               [("", model.nbytes if model is not None else 0)])
        metric("pqsu_inference_requests_total", "counter", "Requests to POST /predict (answered or failed).",
               [("", s["requests"])])
        metric("pqsu_inference_errors_total", "counter", "POST /predict requests answered with an error.",
               [("", s["errors"])])
        metric("pqsu_inference_samples_total", "counter", "Samples classified.", [("", s["samples"])])
        cumulative, hist = 0, []
        for bound, count in zip((*LATENCY_BUCKETS_MS, float("inf")), s["buckets"]):
            cumulative += count
            hist.append((_labels(le="+Inf" if bound == float("inf") else _number(bound)), cumulative))
        out.append("# HELP pqsu_inference_latency_ms Model run time of a /predict request in milliseconds.")
        out.append("# TYPE pqsu_inference_latency_ms histogram")
        out.extend(f"pqsu_inference_latency_ms_bucket{labels} {value}" for labels, value in hist)
        out.append(f"pqsu_inference_latency_ms_sum {_number(s['latency_sum'])}")
        out.append(f"pqsu_inference_latency_ms_count {cumulative}")
        metric("pqsu_bad_messages_total", "counter", "Broker messages rejected (bad chunks, rounds, models).",
               [("", status.get("bad_messages", 0))])
        metric("pqsu_mqtt_connected", "gauge", "1 while the agent is connected to the broker.",
               [("", 1 if status.get("connected") else 0)])
        return "\n".join(out) + "\n"


def parse_body(body: bytes, content_type: str) -> np.ndarray:
    """An input array from a request body, by its Content-Type (sniffed when absent)."""
    kind = (content_type or "").split(";")[0].strip().lower()
    try:
        if kind in _NPY_TYPES:
            return inputs.from_npy(body)
        if kind in _JSON_TYPES or kind.endswith("+json"):
            return inputs.from_json(body)
        if kind in ("", "application/x-www-form-urlencoded"):  # curl --data sends the latter
            if body.startswith(inputs.NPY_MAGIC):
                return inputs.from_npy(body)
            if body.lstrip()[:1] in (b"{", b"["):
                return inputs.from_json(body)
            raise _HttpError(415, "body is neither a .npy array nor JSON; set Content-Type "
                                  "application/x-npy or application/json")
    except inputs.InputError as exc:
        raise _HttpError(400, str(exc)) from None
    raise _HttpError(415, f"unsupported Content-Type {kind!r}: use application/x-npy, "
                          "application/octet-stream (.npy bytes) or application/json")


def _raw_flag(path: str) -> bool:
    """?raw=1 (or true/yes): the body holds readings as measured, for a model of sensor readings."""
    query = urllib.parse.parse_qs(path.partition("?")[2], keep_blank_values=True)
    values = query.get("raw", ["0"])
    if len(values) != 1 or values[0].lower() not in ("0", "1", "false", "true", "no", "yes"):
        raise _HttpError(400, "raw must be 1 or 0 (true/false, yes/no)")
    return values[0].lower() in ("1", "true", "yes")


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) < 1e15):
        return str(int(value))
    return repr(float(value))


def _labels(**labels: str) -> str:
    def esc(v: str) -> str:
        return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return "{" + ",".join(f'{k}="{esc(str(v))}"' for k, v in labels.items()) + "}"


class _Handler(http.server.BaseHTTPRequestHandler):
    service: InferenceService
    server_version = "pqsu-edge"
    protocol_version = "HTTP/1.1"  # keep-alive for local clients that poll

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, fmt: str, *args) -> None:  # the default writes every request to stderr
        log.debug("%s %s", self.address_string(), fmt % args)

    # -- routing -------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._discard_body()  # a GET with a body must not leave it to be read as the next request
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            code, body = self.service.health()
            self._json(code, body)
        elif path == "/metrics":
            self._send(200, self.service.metrics_text().encode(), PROMETHEUS_TYPE)
        elif path == "/predict":
            self._error(405, "use POST for /predict", {"Allow": "POST"})
        else:
            self._error(404, f"no such endpoint {path!r}: POST /predict, GET /healthz, GET /metrics")

    def do_HEAD(self) -> None:
        self._error(405, "HEAD is not supported", {"Allow": "GET, POST"})

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        if path in ("/healthz", "/metrics"):
            self._discard_body()
            self._error(405, f"use GET for {path}", {"Allow": "GET"})
            return
        if path != "/predict":
            self._discard_body()
            self._error(404, f"no such endpoint {path!r}: POST /predict, GET /healthz, GET /metrics")
            return
        try:
            body = self._read_body()  # first: an error answer must not leave the body in the connection
            raw = _raw_flag(self.path)
            answer = self.service.predict(body, self.headers.get("Content-Type", ""), raw=raw)
        except _HttpError as exc:
            self.service.stats.failed()
            self._error(exc.code, exc.message, exc.headers)
            return
        except Exception as exc:  # a bug or an onnxruntime failure: answer, count, keep serving
            self.service.stats.failed()
            log.exception("inference request failed")
            self._error(500, f"inference failed: {type(exc).__name__}: {str(exc)[:200]}")
            return
        self._json(200, answer)

    def _method_not_allowed(self) -> None:
        self._discard_body()
        self._error(405, f"method {self.command} is not supported: POST /predict, GET /healthz, GET /metrics",
                    {"Allow": "GET, POST"})

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _method_not_allowed

    # -- bodies --------------------------------------------------------------------------
    def _content_length(self) -> int:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise _HttpError(411, "chunked bodies are not supported: send Content-Length")
        raw = self.headers.get("Content-Length")
        if raw is None:
            return 0
        try:
            length = int(raw)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            raise _HttpError(400, f"invalid Content-Length {raw[:40]!r}")
        return length

    def _read_body(self) -> bytes:
        length = self._content_length()
        if length == 0:
            raise _HttpError(400, "empty body: send a .npy array or JSON {\"inputs\": [...]}")
        if length > self.service.max_body:
            self.close_connection = True  # the body is not read: the connection cannot be reused
            raise _HttpError(413, f"body of {length} bytes is larger than the limit of {self.service.max_body}")
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True
            raise _HttpError(400, f"body ended after {len(body)} of {length} bytes")
        return body

    def _discard_body(self) -> None:
        try:
            length = self._content_length()
        except _HttpError:
            return
        if 0 < length <= self.service.max_body:
            self.rfile.read(length)
        elif length:
            self.close_connection = True

    # -- answers -------------------------------------------------------------------------
    def _json(self, code: int, body: dict, headers: dict | None = None) -> None:
        self._send(code, json.dumps(body).encode(), "application/json", headers)

    def _error(self, code: int, message: str, headers: dict | None = None) -> None:
        self._json(code, {"error": message, "status": code}, headers)

    def _send(self, code: int, payload: bytes, content_type: str, headers: dict | None = None) -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("Cache-Control", "no-store")
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client went away: nothing to answer
            self.close_connection = True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (malformed request line, header too long) as JSON too."""
        self.close_connection = True
        if code == 501:  # an HTTP method we have no handler for
            code, message = 405, f"method {self.command!r} is not supported: POST /predict, GET /healthz, GET /metrics"
        self._error(code, message or explain or http.server.BaseHTTPRequestHandler.responses.get(code, ("error",))[0])
