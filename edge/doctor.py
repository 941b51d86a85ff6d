"""`pqsu edge doctor`: is this board ready to run `pqsu edge run` with these settings?

One line per check, PASS, WARN or FAIL, with a hint on what to do when it is not a PASS:

  settings    device id, fleet, broker URL, protocol, upload rules, ports: complete and valid
  broker-tcp  the broker's host and port accept a TCP connection
  broker-mqtt a real MQTT connect (TLS and credentials as configured), MQTT 5 or 3.1.1
  tls         CA, certificate and key files readable and parseable (ssl), CA not expired
  key-file    the update-signing key is readable hex
  data        the local training data loads (samples, image shape) unless inference-only
  onnxruntime version and execution providers (CUDA/TensorRT when preferred or on a Jetson)
  model       the saved model (<state-dir>/model.onnx) verifies and runs
  torch       installed (fine-tuning) or not (inference-only)
  model-code  each --allow-model-code module is on the path or in model_code_dir (found, not run); a
              saved model of a custom architecture the device may not import is named
  state-dir   writable; free disk space
  http        the local inference API's port is free (or an agent already serves on it)
  clock       the year is plausible (TLS certificates and round deadlines need it)

Exit status 0 when no check failed, 1 otherwise. A setting of the wrong type or an unknown key
never gets here: reading the settings stops the command with one line (exit status 2).
Nothing here needs torch or onnx, and the broker check connects with its own client id
(`<device>-doctor`, clean session) so a running agent keeps its session.
"""
from __future__ import annotations

import datetime as dt
import errno
import importlib.metadata
import importlib.util
import json
import os
import shutil
import socket
import ssl
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from pqsu.edge.settings import AgentSettings
from pqsu.protocol.errors import PqsuError

MIN_FREE_BYTES = 500 * 1024 * 1024
MIN_YEAR = 2024
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


@dataclass(frozen=True)
class Check:
    level: str  # PASS, WARN or FAIL
    name: str
    message: str
    hint: str = ""

    def line(self) -> str:
        text = f"{self.level:<4}  {self.name:<11} {self.message}"
        return text + (f"  (hint: {self.hint})" if self.hint and self.level != "PASS" else "")


def doctor(settings: AgentSettings, *, timeout_s: float = 5.0, out: TextIO | None = None) -> int:
    """Run every check on `settings` (the flags and settings file of `pqsu edge run`), print
    the lines, return the exit status (0: no FAIL)."""
    out = out or sys.stdout
    checks = []
    for check in Doctor(settings, timeout_s).checks():
        checks.append(check)
        print(check.line(), file=out, flush=True)
    counts = {level: sum(c.level == level for c in checks) for level in ("PASS", "WARN", "FAIL")}
    print(f"doctor: {counts['PASS']} pass, {counts['WARN']} warn, {counts['FAIL']} fail", file=out)
    return 1 if counts["FAIL"] else 0


class Doctor:
    def __init__(self, settings: AgentSettings, timeout_s: float = 5.0):
        self.s, self.timeout_s = settings, timeout_s
        self.url = None           # BrokerURL once the settings parse
        self.tcp_ok = self.mqtt_ok = self.tls_failed = False
        self.saved_shape: tuple[int, ...] | None = None
        self.saved_arch = ""

    def checks(self):
        """Checks in order, each yielded as soon as it is done (a slow broker shows where it waits)."""
        yield self.settings()
        if self.url is not None:
            yield self.tls()
            yield self.broker_tcp()
            if self.tcp_ok and not self.tls_failed:  # with broken TLS files it could only repeat that
                yield self.broker_mqtt()
        if self.s.key_file:
            yield self.key_file()
        yield self.onnxruntime()
        yield self.model()
        yield self.torch()
        if not self.inference_only:
            if self.s.allow_model_code or ":" in self.saved_arch:
                yield self.model_code()
            yield self.data()
        yield self.state_dir()
        yield self.http()
        yield self.clock()

    @property
    def inference_only(self) -> bool:
        return self.s.inference_only or importlib.util.find_spec("torch") is None

    # -- settings ------------------------------------------------------------------------
    def settings(self) -> Check:
        from pqsu.protocol.mqtt import BrokerURL

        problems = self.s.problems(trains=not self.inference_only)
        try:
            self.url = BrokerURL.parse(self.s.broker) if self.s.broker else None
        except PqsuError:
            self.url = None  # already among the problems
        if problems:
            return Check("FAIL", "settings", "; ".join(problems),
                         "give them as flags or in --config (TOML/JSON keys named like the flags)")
        mode = "inference-only" if self.inference_only else "training"
        return Check("PASS", "settings", f"device {self.s.device_id} in fleet {self.s.fleet}, broker {self.url}, {mode}")

    # -- broker --------------------------------------------------------------------------
    def broker_tcp(self) -> Check:
        where = f"{self.url.host}:{self.url.port}"
        start = time.perf_counter()
        try:
            with socket.create_connection((self.url.host, self.url.port), timeout=self.timeout_s):
                pass
        except socket.gaierror as exc:
            return Check("FAIL", "broker-tcp", f"cannot resolve {self.url.host}: {exc.strerror or exc}",
                         "check the host name in --broker, and DNS (/etc/resolv.conf) or /etc/hosts")
        except ConnectionRefusedError:
            return Check("FAIL", "broker-tcp", f"{where} refused the connection: nothing listens there",
                         "is the broker running? check the host and port in --broker "
                         "(mqtt:// defaults to 1883, mqtts:// to 8883)")
        except (TimeoutError, socket.timeout):
            return Check("FAIL", "broker-tcp", f"no answer from {where} within {self.timeout_s:g}s",
                         "a firewall, a wrong address, or no network: check the link (ping) and the port")
        except OSError as exc:
            return Check("FAIL", "broker-tcp", f"cannot reach {where}: {exc.strerror or exc}",
                         "check the network link and routes of this board")
        self.tcp_ok = True
        return Check("PASS", "broker-tcp", f"{where} accepts TCP connections ({(time.perf_counter() - start) * 1e3:.0f} ms)")

    def broker_mqtt(self) -> Check:
        from pqsu.protocol.mqtt import MqttClient

        client_id = f"{self.s.device_id or 'pqsu'}-doctor"
        try:
            client = MqttClient(self.url, client_id, persistent_session=False, protocol=self.s.protocol,
                                tls_ca=self.s.tls_ca, tls_cert=self.s.tls_cert, tls_key=self.s.tls_key,
                                username=self.s.username, password=self.s.password())
            start = time.perf_counter()
            client.connect(timeout_s=self.timeout_s)
        except PqsuError as exc:
            text = str(exc)
            if "refused" in text:
                hint = ("check --username/--password-file (or user:password in the URL) and the broker's ACL; "
                        f"a broker policy may also restrict client ids (this check uses {client_id!r})")
            elif "TLS" in text or "SSL" in text or "certificate" in text.lower():
                hint = "check that --tls-ca signed the broker's certificate, the host name in --broker, and the clock"
            elif self.url.tls and not self.s.tls_cert:
                hint = ("no MQTT answer over TLS: the broker may require a client certificate (--tls-cert, --tls-key), "
                        "or the port is not a TLS listener")
            else:
                hint = "the port answers but not as an MQTT broker in time: check the port, mqtt:// vs mqtts://, --protocol"
            return Check("FAIL", "broker-mqtt", text, hint)
        ms = (time.perf_counter() - start) * 1e3
        version = "MQTT 5" if client.is_mqtt5 else "MQTT 3.1.1"
        client.close()
        self.mqtt_ok = True
        return Check("PASS", "broker-mqtt", f"{version} connect to {self.url} as {client_id} ({ms:.0f} ms)")

    def tls(self) -> Check:
        ca, cert, key = self.s.tls_ca, self.s.tls_cert, self.s.tls_key
        if not self.url.tls:
            if ca or cert or key:
                self.tls_failed = True
                return Check("FAIL", "tls", f"TLS files given but the broker URL {self.url} is plain mqtt://",
                             "use mqtts://host:8883 to connect with TLS, or drop the --tls-* settings")
            if self.url.host in ("localhost", "::1") or self.url.host.startswith("127."):
                return Check("PASS", "tls", "not used (broker on this machine)")
            return Check("WARN", "tls", f"not used: traffic to {self.url.host} (and any password) is not encrypted",
                         "use mqtts:// with --tls-ca for a broker reached over a network")
        problems, notes = [], []
        for name, path in (("--tls-ca", ca), ("--tls-cert", cert), ("--tls-key", key)):
            if path and (why := _unreadable(path)):
                problems.append(f"{name} {path}: {why}")
        if key and not cert:
            problems.append("--tls-key without --tls-cert")
        if problems:
            self.tls_failed = True
            return Check("FAIL", "tls", "; ".join(problems), "copy the files onto the board (pqsu flash does) and "
                                                            "make them readable by the agent's user")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # no system CAs: get_ca_certs() lists only --tls-ca's
        if ca:
            try:
                ctx.load_verify_locations(cafile=ca)
            except (ssl.SSLError, ValueError) as exc:
                self.tls_failed = True
                return Check("FAIL", "tls", f"--tls-ca {ca} is not a PEM CA certificate: {exc}",
                             "give the CA certificate (PEM) that signed the broker's certificate")
            certs = ctx.get_ca_certs()
            expired = [c for c in certs if "notAfter" in c and ssl.cert_time_to_seconds(c["notAfter"]) < time.time()]
            if expired:
                self.tls_failed = True
                return Check("FAIL", "tls", f"CA certificate in {ca} expired on {expired[0]['notAfter']}",
                             "renew the CA certificate (or check the clock)")
            notes.append(f"CA {ca} ({len(certs)} certificate{'s' if len(certs) != 1 else ''})")
        else:
            notes.append("system CA store")
        if cert:
            try:
                ctx.load_cert_chain(certfile=cert, keyfile=key or None)
            except (ssl.SSLError, ValueError) as exc:
                self.tls_failed = True
                return Check("FAIL", "tls", f"client certificate {cert} / key {key or '(in the certificate file)'}: {exc}",
                             "the key must be the PEM private key of that certificate, unencrypted")
            notes.append(f"client certificate {cert}")
        return Check("PASS", "tls", ", ".join(notes))

    # -- device files --------------------------------------------------------------------
    def key_file(self) -> Check:
        path = self.s.key_file
        if why := _unreadable(path):
            return Check("FAIL", "key-file", f"{path}: {why}", "the update-signing key comes with the board's bundle")
        text = Path(path).read_text(errors="replace").strip()
        try:
            key = bytes.fromhex(text)
        except ValueError:
            return Check("FAIL", "key-file", f"{path} does not hold a hex key",
                         "write the key as hex digits only, e.g. `openssl rand -hex 32 > key`")
        if not key:
            return Check("FAIL", "key-file", f"{path} is empty", "write the key as hex digits")
        if len(key) < 16:
            return Check("WARN", "key-file", f"{path}: a {len(key)}-byte key is weak", "use at least 32 bytes")
        return Check("PASS", "key-file", f"{path}: {len(key)}-byte signing key")

    def data(self) -> Check:
        if not self.s.data:
            return Check("FAIL", "data", "no --data on a training device",
                         "give --data (an .npz shard, a folder of shards or IDX files), or --inference-only")
        from pqsu.edge.datastore import load_local_data

        try:
            x, y = load_local_data(self.s.data)
        except PqsuError as exc:
            return Check("FAIL", "data", str(exc), "check the --data path; `pqsu run` writes data.npz shards (x, y)")
        shape = tuple(x.shape[1:])
        if self.saved_shape is not None and shape != self.saved_shape:
            return Check("FAIL", "data", f"{len(x)} samples of {shape}, but the saved model takes {self.saved_shape}",
                         "this data belongs to another model or data set")
        classes = len(set(y.tolist()))
        return Check("PASS", "data", f"{self.s.data}: {len(x)} samples of {shape} {x.dtype}, {classes} classes")

    # -- runtime -------------------------------------------------------------------------
    def onnxruntime(self) -> Check:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            return Check("FAIL", "onnxruntime", f"not importable: {exc}", "pip install onnxruntime (onnxruntime-gpu on Jetson)")
        available = ort.get_available_providers()
        short = ", ".join(p.replace("ExecutionProvider", "") for p in available)
        wanted = self.s.providers
        missing = [p for p in wanted if p not in available]
        if missing:
            return Check("WARN", "onnxruntime", f"{ort.__version__}; preferred {', '.join(missing)} not available "
                                                f"(have {short}): runs on the next one, CPU at worst",
                         "install the onnxruntime build with that provider (Jetson: NVIDIA's onnxruntime-gpu wheel)")
        accel = [p for p in PREFERRED_PROVIDERS if p in available]
        if Path("/etc/nv_tegra_release").exists() and not accel:
            return Check("WARN", "onnxruntime", f"{ort.__version__} on a Jetson without CUDA/TensorRT providers (have {short})",
                         "install NVIDIA's onnxruntime-gpu wheel for your JetPack to use the GPU")
        return Check("PASS", "onnxruntime", f"{ort.__version__}, providers {short}"
                                            + (f" (accelerated: {', '.join(accel)})" if accel else ""))

    def model(self) -> Check:
        path = Path(self.s.state_dir) / "model.onnx"
        if not path.exists():
            return Check("PASS", "model", f"none saved yet in {path.parent} (the agent gets it from the broker)")
        from pqsu.edge.inference import InferenceModel

        try:
            model = InferenceModel.from_file(path)
            import numpy as np

            model.predict(np.zeros((1, *model.info.in_shape), np.float32))
        except PqsuError as exc:
            return Check("FAIL", "model", str(exc), f"delete {path}: the agent fetches the current model from the broker")
        self.saved_shape = tuple(model.info.in_shape)
        self.saved_arch = str(model.info.spec.get("arch", ""))
        return Check("PASS", "model", f"{path}: model {model.model_id}, {model.info.spec.get('arch')} "
                                      f"{model.info.precision}, input {self.saved_shape}, {len(model.info.classes)} classes")

    def model_code(self) -> Check:
        """Where each allowed module is, found the way an import would find it but without running it
        (importing is running the module's code, which the doctor never does)."""
        extra = [str(Path(self.s.model_code_dir).resolve())] if self.s.model_code_dir else []
        found, missing = [], []
        for arch in self.s.allow_model_code:
            where = _module_file(arch.partition(":")[0], sys.path + extra)
            (found if where else missing).append(f"{arch} in {where}" if where else arch)
        if missing:
            return Check("FAIL", "model-code", f"not found on the path{' or in ' + extra[0] if extra else ''}: "
                         f"{', '.join(missing)}", "copy the module onto the board (pqsu flash --model-code PATH) "
                         "or set model_code_dir to the folder that holds it")
        if ":" in self.saved_arch and self.saved_arch not in self.s.allow_model_code:
            return Check("WARN", "model-code", f"the saved model is custom architecture {self.saved_arch}, which this "
                         "device may not import: it serves it, and fails every round it is asked to train on it",
                         f"--allow-model-code {self.saved_arch} if you trust that code")
        return Check("PASS", "model-code", "; ".join(found) + " (imported, its code run, when a model of it arrives)")

    def torch(self) -> Check:
        if importlib.util.find_spec("torch") is None:
            if self.s.inference_only:
                return Check("PASS", "torch", "not installed; not needed (inference-only)")
            return Check("WARN", "torch", "not installed: this device runs inference-only (serves, never trains)",
                         "install fl-pqsu[edge] (Jetson: NVIDIA's torch wheel) to fine-tune, or pass --inference-only")
        version = _version("torch")
        if self.s.inference_only:
            return Check("PASS", "torch", f"{version} installed; unused (--inference-only)")
        if importlib.util.find_spec("onnx") is None:
            return Check("FAIL", "torch", f"torch {version} is installed but onnx is not: training cannot read the model",
                         "pip install 'fl-pqsu[edge]' (adds onnx), or pass --inference-only")
        return Check("PASS", "torch", f"{version} (fine-tuning), onnx {_version('onnx')}")

    # -- machine -------------------------------------------------------------------------
    def state_dir(self) -> Check:
        folder = Path(self.s.state_dir).absolute()
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            return Check("FAIL", "state-dir", f"{existing} is not a folder", "choose another --state-dir")
        try:
            with tempfile.NamedTemporaryFile(dir=existing, prefix=".pqsu-doctor-"):
                pass
        except OSError as exc:
            return Check("FAIL", "state-dir", f"{existing} is not writable: {exc.strerror or exc}",
                         "give the agent's user write access, or choose another --state-dir")
        free = shutil.disk_usage(existing).free
        what = str(folder) + ("" if existing == folder else " (will be created)")
        if free < MIN_FREE_BYTES:
            return Check("WARN", "state-dir", f"{what}: only {free / 2**20:.0f} MiB free",
                         f"free some space: models, state and the outbox need room (>= {MIN_FREE_BYTES // 2**20} MiB)")
        return Check("PASS", "state-dir", f"{what} writable, {free / 2**30:.1f} GiB free")

    def http(self) -> Check:
        try:
            port, required = self.s.http_endpoint()
        except PqsuError as exc:
            return Check("FAIL", "http", str(exc), "--http-port 0-65535, or --no-http")
        if port is None:
            return Check("PASS", "http", "local inference API off (--no-http)")
        if port == 0:
            return Check("PASS", "http", "local inference API on a free port chosen at start")
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                return Check("FAIL", "http", f"cannot bind 127.0.0.1:{port}: {exc.strerror or exc}",
                             "ports below 1024 need privileges: use --http-port above 1024")
            served = _healthz(port, self.timeout_s)
            if served is not None:
                return Check("PASS", "http", f"127.0.0.1:{port} is already served by a running agent "
                                             f"({served.get('device') or 'device ?'}, model {served.get('model_id')})")
            return Check("FAIL" if required else "WARN", "http", f"127.0.0.1:{port} is used by another program",
                         "choose another --http-port (0: any free port) or --no-http")
        return Check("PASS", "http", f"http://127.0.0.1:{port} is free for the local inference API")

    def clock(self) -> Check:
        now = dt.datetime.now(dt.timezone.utc)
        shown = now.strftime("%Y-%m-%d %H:%M UTC")
        if now.year < MIN_YEAR:
            return Check("FAIL", "clock", f"the clock says {shown}",
                         "set the time (timedatectl set-ntp true, or an RTC): TLS certificates and round "
                         "deadlines need it")
        if self.mqtt_ok and self.url is not None and self.url.tls:
            return Check("PASS", "clock", f"{shown} (the broker's TLS certificate validated against it)")
        return Check("PASS", "clock", shown)


def _unreadable(path: str) -> str | None:
    p = Path(path)
    if not p.exists():
        return "missing"
    if not p.is_file():
        return "not a file"
    if not os.access(p, os.R_OK):
        return "not readable by this user"
    return None


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"


def _healthz(port: int, timeout_s: float) -> dict | None:
    """The /healthz answer of an agent already on `port`, or None when something else is there."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=timeout_s) as r:
            body = json.loads(r.read())
    except urllib.error.HTTPError as exc:  # 503: an agent without a model yet
        try:
            body = json.loads(exc.read())
        except (ValueError, OSError):
            return None
    except (OSError, ValueError):
        return None
    return body if isinstance(body, dict) and "status" in body and "model_id" in body else None


def _module_file(name: str, path: list[str]) -> str | None:
    """The file `import name` would load from `path`, found without importing anything: find_spec of a
    dotted name would run its parent packages' __init__.py."""
    import importlib.machinery

    search: list[str] | None = path
    origin = None
    for part in name.split("."):
        spec = importlib.machinery.PathFinder.find_spec(part, search)
        if spec is None:
            return None
        origin, search = spec.origin, list(spec.submodule_search_locations or [])
    return origin
