"""The edge agent: join a fleet through an MQTT broker, train when asked, serve the model.

  pqsu edge run --broker mqtt://broker.local:1883 --device-id pi-kitchen-01 --data /var/lib/pqsu/data
  pqsu edge predict image.npy --state-dir /var/lib/pqsu      # one-off, with the agent's saved model
  pqsu edge doctor --config /etc/pqsu/agent.toml             # check a board's setup, line by line

The device id is the MQTT client id (with a persistent session) and the name the
coordinator knows it by. --data is an .npz shard (arrays x uint8 N,C,H,W and y), a
folder of shards, or a folder with train-images/train-labels IDX files. Without torch
installed (or with --inference-only) the agent only follows model versions and serves them.

While it runs, the agent answers local applications on http://127.0.0.1:8780 (loopback
only): POST /predict (.npy or JSON {"inputs": [...]}), GET /healthz, GET /metrics
(Prometheus). --http-port 0 picks a free port; --no-http (or --http-port -1) turns it off.
It keeps the current model in <state-dir>/model.onnx and serves it at start, before the
broker is reachable.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from pqsu.protocol.errors import PqsuError
from pqsu.protocol.identity_args import add_identity_arguments, read_password_file
from pqsu.protocol.settings import read_settings

log = logging.getLogger(__name__)

DEFAULT_HTTP_PORT = 8780
DEFAULTS = {"fleet": "default", "state_dir": "pqsu-device", "upload": "norm:0.0001", "select": "topk:0.02",
            "error_feedback": True, "chunk_limit": 128 * 1024, "protocol": "auto", "torch_threads": 0}
_NOT_SETTINGS = ("config", "action", "command", "verbose", "_module", "file", "json", "model", "timeout")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    r = sub.add_parser("run", help="run the agent", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings_arguments(r)
    d = sub.add_parser("doctor", help="check this board's settings, broker, TLS, data, runtime, disk and clock",
                       description="Check what `pqsu edge run` with the same flags (or --config) needs: one "
                       "PASS/WARN/FAIL line per check, with a hint on what to do. Exit status 0 when nothing "
                       "failed, 1 otherwise.")
    add_settings_arguments(d)
    d.add_argument("--timeout", type=float, default=5.0, help="seconds for each network check (default: 5)")
    pr = sub.add_parser("predict", help="classify inputs with a saved model (one-off, no broker)",
                        description="Classify FILE with an fl-pqsu int8 model: a .npy array (one image C,H,W "
                        "or a batch N,C,H,W; uint8 pixels or normalized floats), a .json file {\"inputs\": ...}, "
                        "or an 8-bit PNG or binary PGM/PPM image of the model's size. Prints one line per "
                        "sample: index, label, probability.")
    pr.add_argument("file", metavar="FILE", help=".npy, .json, .png or .pgm/.ppm input")
    pr.add_argument("--model", metavar="PATH", help="the int8 ONNX model (default: <state-dir>/model.onnx)")
    pr.add_argument("--state-dir", help=f"an agent's state folder holding model.onnx (default: {DEFAULTS['state_dir']})")
    pr.add_argument("--config", metavar="FILE", help="the agent's settings file (for its state_dir)")
    pr.add_argument("--json", action="store_true", help="print the /predict JSON answer instead")
    pr.add_argument("--providers", help="onnxruntime execution providers by preference, comma separated")


def add_settings_arguments(r: argparse.ArgumentParser) -> None:
    """The agent's settings, shared by `run` and `doctor` (a settings file takes the same keys)."""
    r.add_argument("--config", metavar="FILE", help="settings file (TOML or JSON); flags win")
    r.add_argument("--broker", help="broker URL, mqtt:// or mqtts://")
    r.add_argument("--device-id", help="this device's id (letters, digits, . _ -)")
    r.add_argument("--fleet", help=f"fleet name (default: {DEFAULTS['fleet']})")
    r.add_argument("--data", help="local training data: .npz shard, folder of shards, or IDX folder")
    r.add_argument("--state-dir", help=f"where the device keeps its state and outbox (default: {DEFAULTS['state_dir']})")
    r.add_argument("--upload", help=f"upload rule(s): always, loss, norm:T, relevance:T joined by + (default: {DEFAULTS['upload']})")
    r.add_argument("--select", help=f"entries to send: topk:F, threshold:T, dense or fp32 (default: {DEFAULTS['select']})")
    r.add_argument("--no-error-feedback", dest="error_feedback", action="store_const", const=False,
                   help="drop what is not sent instead of keeping it for later")
    r.add_argument("--key-file", help="file with this device's HMAC key (hex) for signing updates")
    r.add_argument("--chunk-limit", type=int, help="largest MQTT payload in bytes (default: 131072)")
    r.add_argument("--protocol", choices=["auto", "5", "3.1.1"], help="MQTT version (default: auto)")
    r.add_argument("--inference-only", action="store_true", default=None, help="follow models, never train")
    r.add_argument("--allow-custom", action="store_true", default=None,
                   help="rebuild user architectures named in the model file (imports that code)")
    r.add_argument("--torch-threads", type=int, help="torch CPU threads for training (default: torch's choice)")
    r.add_argument("--stay", action="store_true", default=None,
                   help="keep running after the coordinator says done (inference-only devices always stay)")
    add_identity_arguments(r.add_argument_group("broker security"), "this device's")
    h = r.add_argument_group("local inference API (127.0.0.1 only)")
    h.add_argument("--http-port", type=int, metavar="PORT",
                   help=f"port of POST /predict, GET /healthz, GET /metrics (default: {DEFAULT_HTTP_PORT}; "
                        "0: any free port; -1: off)")
    h.add_argument("--no-http", dest="http_port", action="store_const", const=-1, help="no local inference API")
    h.add_argument("--providers", help="onnxruntime execution providers by preference, comma separated "
                                       "(e.g. TensorrtExecutionProvider,CUDAExecutionProvider); CPU is the fallback")
    h.add_argument("--inference-threads", type=int, help="onnxruntime threads (default: onnxruntime's choice)")


def _merged(args: argparse.Namespace) -> dict:
    """Defaults, then the settings file, then the flags given."""
    s = dict(DEFAULTS)
    if getattr(args, "config", None):
        s.update(read_settings(args.config))
    s.update({k: v for k, v in vars(args).items() if v is not None and k not in _NOT_SETTINGS})
    return s


def _settings(args: argparse.Namespace) -> dict:
    s = _merged(args)
    for required in ("broker", "device_id"):
        if not s.get(required):
            raise PqsuError(f"--{required.replace('_', '-')} is required (flag or settings file)")
    return s


def providers(s: dict) -> tuple[str, ...]:
    """Execution providers from a comma-separated string or a list (settings files)."""
    value = s.get("providers") or ()
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise PqsuError("providers must be a comma-separated string or a list of onnxruntime provider names")
    return tuple(v.strip() for v in value if v.strip())


def password(s: dict) -> str | None:
    """The MQTT password from --password-file (first line, without its newline)."""
    return read_password_file(s.get("password_file"))


def http_port(s: dict) -> tuple[int | None, bool]:
    """(port or None for off, required): a port chosen explicitly must be free; the default may be busy."""
    value = s.get("http_port")
    if value is None:
        return DEFAULT_HTTP_PORT, False
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise PqsuError(f"http_port must be an integer, got {value!r}") from None
    if port < -1 or port > 65535:
        raise PqsuError(f"http_port {port} out of range: 0-65535, 0 for any free port, -1 for none")
    return (None if port < 0 else port), True


def agent_config(s: dict):
    from pqsu.edge.agent import AgentConfig

    port, required = http_port(s)
    return AgentConfig(broker=s["broker"], device_id=s["device_id"], fleet=s["fleet"], state_dir=s["state_dir"],
                       chunk_limit=int(s["chunk_limit"]), protocol=s["protocol"], exit_when_done=not s.get("stay"),
                       tls_ca=s.get("tls_ca"), tls_cert=s.get("tls_cert"), tls_key=s.get("tls_key"),
                       username=s.get("username"), password=password(s), http_port=port, http_required=required,
                       providers=providers(s), inference_threads=int(s.get("inference_threads") or 0))


def trains(s: dict) -> bool:
    """Whether this device fine-tunes: not --inference-only, and torch is installed."""
    return not s.get("inference_only") and importlib.util.find_spec("torch") is not None


def run(args: argparse.Namespace) -> int:
    if args.action == "predict":
        return predict(args)
    if args.action == "doctor":
        from pqsu.edge.doctor import doctor

        return doctor(_merged(args), timeout_s=args.timeout)
    from pqsu.edge.agent import EdgeAgent

    s = _settings(args)
    cfg = agent_config(s)
    learner = None
    if trains(s):
        learner = _learner(s)
    elif not s.get("inference_only"):
        log.warning("torch is not installed: running as an inference-only device")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    agent = EdgeAgent(cfg, learner)
    try:
        joined = agent.run(stop)
    except KeyboardInterrupt:
        stop.set()
        raise
    log.info("%s: joined %d rounds", cfg.device_id, joined)
    return 0


def predict(args: argparse.Namespace) -> int:
    from pqsu.edge import inputs
    from pqsu.edge.inference import InferenceModel

    if args.model:
        path = Path(args.model)
    else:
        s = _merged(args)
        path = Path(s["state_dir"]) / "model.onnx"
        if not path.exists():
            raise PqsuError(f"no model at {path}: give --model FILE, or the --state-dir of an agent that received one")
    model = InferenceModel.from_file(path, providers=list(providers(vars(args))) or None)
    x = inputs.load_file(args.file, channels=model.info.in_shape[0])
    pred = model.classify(x)
    if args.json:
        print(json.dumps(pred.to_dict()))
        return 0
    width = max(len(label) for label in pred.labels)
    for i, (label, probs, k) in enumerate(zip(pred.labels, pred.probabilities, pred.predictions)):
        print(f"{i}\t{label:<{width}}\t{probs[k]:.4f}")
    print(f"model {pred.model_id}, {len(pred.labels)} sample(s), {pred.latency_ms:.2f} ms", file=sys.stderr)
    return 0


def _learner(s: dict):
    import torch

    from pqsu.edge.datastore import load_local_data
    from pqsu.edge.learner import EdgeLearner, TrainingBudget
    from pqsu.edge.selective import SelectivePolicy

    if int(s.get("torch_threads") or 0) > 0:
        torch.set_num_threads(int(s["torch_threads"]))
    if not s.get("data"):
        raise PqsuError("--data is required on a training device (or pass --inference-only)")
    x, y = load_local_data(s["data"])
    key = None
    if s.get("key_file"):
        try:
            key = bytes.fromhex(Path(s["key_file"]).read_text().strip())
        except (OSError, ValueError) as exc:
            raise PqsuError(f"key file {s['key_file']} must hold a hex key: {exc}") from None
    policy = SelectivePolicy.from_spec(s["upload"], s["select"], bool(s["error_feedback"]))
    board = s.get("board") if isinstance(s.get("board"), dict) else {}  # a flashed board's budget caps
    try:
        budget = TrainingBudget(max_epochs=board.get("max_epochs"), max_batch_size=board.get("max_batch_size"),
                                time_budget_s=board.get("time_budget_s"))
    except TypeError as exc:
        raise PqsuError(f"bad [board] budget in the settings: {exc}") from None
    return EdgeLearner(s["device_id"], x, y, policy, state_path=Path(s["state_dir"]) / "state.npz", key=key,
                       allow_custom=bool(s.get("allow_custom")), budget=budget)
