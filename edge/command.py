"""The edge agent: join a fleet through an MQTT broker, train when asked, serve the model.

  pqsu edge run --broker mqtt://broker.local:1883 --device-id pi-kitchen-01 --data /var/lib/pqsu/data
  pqsu edge predict image.npy --state-dir /var/lib/pqsu      # one-off, with the agent's saved model
  pqsu edge doctor --config /etc/pqsu/agent.toml             # check a board's setup, line by line

The device id is the MQTT client id (with a persistent session) and the name the
coordinator knows it by. --data is an .npz shard (arrays x uint8 N,C,H,W and y), a
folder of shards, or a folder with train-images/train-labels IDX files. Without torch
installed (or with --inference-only) the agent only follows model versions and serves them.
A model of a user's own architecture (its file names package.module:factory) is served either
way, but trained on only with --allow-model-code naming that factory: rebuilding it imports,
and so runs, that code (--model-code-dir adds the folder that holds it to the import path).

While it runs, the agent answers local applications on http://127.0.0.1:8780 (loopback
only): POST /predict (.npy or JSON {"inputs": [...]}), GET /healthz, GET /metrics
(Prometheus). --http-port 0 picks a free port; --no-http (or --http-port -1) turns it off.
It keeps the current model in <state-dir>/model.onnx and serves it at start, before the
broker is reachable.

--config reads the same settings from a TOML or JSON file (keys named like the flags,
chunk_limit = 65536; booleans unquoted: stay = true); flags given win. A setting of the
wrong type or an unknown key stops the command with one line naming it (exit status 2).
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

# DEFAULTS stays importable from here: tools/reliability/faults.py recomputes an agent's update with them.
from pqsu.edge.settings import DEFAULTS, AgentSettings  # noqa: F401
from pqsu.edge.settings import add_arguments as add_settings_arguments
from pqsu.protocol.errors import PqsuError

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    r = sub.add_parser("run", help="run the agent", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings_arguments(r)
    d = sub.add_parser("doctor", help="check this board's settings, broker, TLS, data, runtime, disk and clock",
                       description="Check what `pqsu edge run` with the same flags (or --config) needs: one "
                       "PASS/WARN/FAIL line per check, with a hint on what to do. Exit status 0 when nothing "
                       "failed, 1 otherwise; 2 when a setting has the wrong type (nothing is checked then).")
    add_settings_arguments(d)
    d.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                   help="how long each network check may wait (default: 5)")
    pr = sub.add_parser("predict", help="classify inputs with a saved model (one-off, no broker)",
                        description="Classify FILE with an fl-pqsu int8 model: a .npy array (one sample of the "
                        "shape the model declares, e.g. an image C,H,W or a sensor window C,L, or a batch of them, "
                        "batch axis first; uint8 pixels or normalized floats), a .json file {\"inputs\": ...}, "
                        "or, for an image model, an 8-bit PNG or binary PGM/PPM image of its size. Prints one "
                        "line per sample: index, label, probability.")
    pr.add_argument("file", metavar="FILE", help="the input: .npy, .json, .png or .pgm/.ppm")
    pr.add_argument("--model", metavar="PATH", help="the int8 ONNX model (default: <state-dir>/model.onnx)")
    pr.add_argument("--state-dir", metavar="DIR",
                    help=f"an agent's state folder holding model.onnx (default: {DEFAULTS['state_dir']})")
    pr.add_argument("--config", metavar="FILE", help="the agent's settings file, for its state_dir")
    pr.add_argument("--raw", action="store_true", help="the inputs are readings as a sensor measured them: a model "
                    "of sensor readings normalizes them with its own mean and std (without it, floats must be "
                    "normalized already)")
    pr.add_argument("--json", action="store_true", help="print the /predict JSON answer instead of one line per sample")
    pr.add_argument("--providers", metavar="LIST",
                    help="onnxruntime execution providers by preference, comma separated; CPU is the fallback")


def trains(s: AgentSettings) -> bool:
    """Whether this device fine-tunes: not --inference-only, and torch is installed."""
    return not s.inference_only and importlib.util.find_spec("torch") is not None


def run(args: argparse.Namespace) -> int:
    if args.action == "predict":
        return predict(args)
    s = AgentSettings.from_args(args)  # a mistyped setting stops here, before any check or connection
    if args.action == "doctor":
        from pqsu.edge.doctor import doctor

        return doctor(s, timeout_s=args.timeout)
    training = trains(s)
    s.check(trains=training)
    cfg = s.agent_config()
    learner = None
    if training:
        learner = _learner(s)
    elif not s.inference_only:
        log.warning("torch is not installed: running as an inference-only device")
    from pqsu.edge.agent import EdgeAgent

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
    s = AgentSettings.from_args(args)
    providers = s.providers if args.providers else ()  # a settings file's providers are the agent's, not this one-off's
    from pqsu.edge import inputs
    from pqsu.edge.inference import InferenceModel

    if args.model:
        path = Path(args.model)
    else:
        path = Path(s.state_dir) / "model.onnx"
        if not path.exists():
            raise PqsuError(f"no model at {path}: give --model FILE, or the --state-dir of an agent that received one")
    model = InferenceModel.from_file(path, providers=list(providers) or None)
    x = inputs.load_file(args.file, channels=model.info.in_shape[0], in_shape=model.info.in_shape)
    pred = model.classify(x, raw=args.raw)
    if args.json:
        print(json.dumps(pred.to_dict()))
        return 0
    width = max(len(label) for label in pred.labels)
    for i, (label, probs, k) in enumerate(zip(pred.labels, pred.probabilities, pred.predictions)):
        print(f"{i}\t{label:<{width}}\t{probs[k]:.4f}")
    print(f"model {pred.model_id}, {len(pred.labels)} sample(s), {pred.latency_ms:.2f} ms", file=sys.stderr)
    return 0


def _learner(s: AgentSettings):
    if not s.data:
        raise PqsuError("--data is required on a training device (or pass --inference-only)")
    key = None
    if s.key_file:
        try:
            key = bytes.fromhex(Path(s.key_file).read_text().strip())
        except (OSError, ValueError) as exc:
            raise PqsuError(f"key file {s.key_file} must hold a hex key: {exc}") from None
    import torch

    from pqsu.edge.datastore import load_local_data
    from pqsu.edge.learner import EdgeLearner, TrainingBudget

    if s.torch_threads > 0:
        torch.set_num_threads(s.torch_threads)
    allow_model_code(s)
    x, y = load_local_data(s.data)
    b = s.board  # a flashed board's caps on what a round asks
    budget = TrainingBudget(max_epochs=b.max_epochs, max_batch_size=b.max_batch_size, time_budget_s=b.time_budget_s)
    return EdgeLearner(s.device_id, x, y, s.policy(), state_path=Path(s.state_dir) / "state.npz", key=key,
                       allow_custom=s.allow_model_code, budget=budget, holdout=s.eval_holdout)


def allow_model_code(s: AgentSettings) -> None:
    """Make the allowed architectures importable (model_code_dir last on the path) and import each now,
    so a missing module or factory stops the agent at start, not at its first round."""
    if s.model_code_dir:
        folder = str(Path(s.model_code_dir).resolve())
        if folder not in sys.path:
            sys.path.append(folder)
    from pqsu.export.model_check import check_custom_name, check_importable

    for arch in s.allow_model_code:
        check_custom_name(arch)
        try:
            check_importable(arch)
        except PqsuError as exc:
            top = arch.partition(":")[0].split(".")[0]
            if s.model_code_dir or importlib.util.find_spec(top) is not None:
                raise
            # An agent does not look in the folder it was started from (it would run whatever is there).
            raise PqsuError(f"{exc}; an agent imports model code from its path or from --model-code-dir DIR, the "
                            f"folder that holds {top}") from None
