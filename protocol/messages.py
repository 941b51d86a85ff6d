"""Control messages between coordinator and devices (JSON, small, versioned).

Model files and updates are binary (see `model_id`, `codec`); everything else a round
needs to say fits in a few hundred bytes of JSON, which any MQTT tool can read.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import secrets
from dataclasses import asdict, dataclass, field, fields

from pqsu.protocol.errors import PqsuError

VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024


class MessageError(PqsuError):
    """A control message that is not valid JSON of the expected shape."""


class _JsonMessage:
    """to_json / from_json for a frozen dataclass message: {"v", "type", fields...}; unknown keys ignored."""

    KIND = ""   # the message's "type"
    WHAT = ""   # how errors name it

    def to_json(self) -> bytes:
        return json.dumps({"v": VERSION, "type": self.KIND, **asdict(self)}, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes):
        body = _load(data, cls.KIND)
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in body.items() if k in known})
        except TypeError as exc:
            raise MessageError(f"invalid {cls.WHAT}: {exc}") from None


@dataclass(frozen=True)
class RoundTask(_JsonMessage):
    """A round as announced to devices: which model, and how to train on it."""

    KIND, WHAT = "round", "round task"

    round: int
    model_id: str
    epochs: float = 1.0
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.0
    time_budget_s: float | None = None
    seed: int = 0
    devices: tuple[str, ...] = ()   # the devices asked this round; empty = every device
    deadline: float | None = None   # the coordinator's unix time at the deadline: informational only
    model_bytes: int = 0            # size of the model file (its chunks are on the model topics)
    job: str = ""                   # the coordinator run this round belongs to (new_job_id)
    # Seconds left when the coordinator published this message. Boards have no real-time clock, so a
    # receiver adds it to its own monotonic clock at receipt (local_deadline) and never reads `deadline`.
    remaining_s: float | None = None
    # Aggregator workers (docs/protocol.md, "Aggregator workers"): when > 0, a device publishes its update on
    # update/<crc32(device id) % partitions>/<device>, the partition one worker reads. 0: update/<device>.
    partitions: int = 0
    # The bases a patch to `model_id` is retained for (on the patch topics): {"base": model id,
    # "bytes": patch length, "sha256": hex digest of the patch}. A device holding one of them downloads
    # that patch; any other device downloads the full model.
    patches: tuple[dict, ...] = ()
    # FedProx: mu of the proximal term mu/2 ||w - w_received||^2 in the local fine-tune; 0 is plain SGD.
    prox: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.devices, (list, tuple)):  # a bare string would become one id per letter
            raise MessageError("invalid round task: devices must be a list of device ids")
        object.__setattr__(self, "devices", tuple(self.devices))
        object.__setattr__(self, "patches", check_patch_offers(self.patches, "round task"))
        checks = [
            (_int(self.round) and 0 <= self.round < 2**32, "round must be an int in [0, 2**32)"),
            (isinstance(self.model_id, str) and 0 < len(self.model_id) <= 64, "model_id must be a short string"),
            (_num(self.epochs) and self.epochs > 0, "epochs must be > 0"),
            (_int(self.batch_size) and 0 < self.batch_size <= 65536, "batch_size out of range"),
            (_num(self.lr) and self.lr > 0, "lr must be > 0"),
            (_num(self.momentum) and 0 <= self.momentum < 1, "momentum must be in [0, 1)"),
            (_num(self.prox) and 0 <= self.prox <= 1000, "prox must be a number in [0, 1000]"),
            (self.time_budget_s is None or (_num(self.time_budget_s) and self.time_budget_s > 0), "bad time budget"),
            (_int(self.seed), "seed must be an int"),
            (all(isinstance(d, str) and 0 < len(d) <= 64 for d in self.devices), "devices must be short strings"),
            (self.deadline is None or _num(self.deadline), "deadline must be a number"),
            (_int(self.model_bytes) and self.model_bytes >= 0, "model_bytes must be an int >= 0"),
            (_job(self.job), "job must be a string of at most 64 characters"),
            (self.remaining_s is None or (_num(self.remaining_s) and self.remaining_s >= 0), "remaining_s must be >= 0"),
            (_int(self.partitions) and 0 <= self.partitions <= 4096, "partitions must be an int in [0, 4096]"),
        ]
        for ok, why in checks:
            if not ok:
                raise MessageError(f"invalid round task: {why}")

    def patch_for(self, base_id: str) -> dict | None:
        """The announced patch from `base_id` to this round's model, if one is retained."""
        return next((p for p in self.patches if p["base"] == base_id), None)

    def asks(self, device_id: str) -> bool:
        return not self.devices or device_id in self.devices

    def local_deadline(self, received_at: float) -> float | None:
        """The deadline on the receiver's clock, given that clock's reading when the message arrived."""
        return None if self.remaining_s is None else received_at + self.remaining_s



DOWNLOADS = ("", "patch", "full")
STATES = ("online", "offline", "training", "uploaded", "skipped", "failed")


@dataclass(frozen=True)
class Status(_JsonMessage):
    """A device's state, retained on its status topic (the last will sets "offline")."""

    KIND, WHAT = "status", "status"

    device: str
    state: str
    round: int = -1
    detail: str = ""
    trains: bool = True  # False for inference-only devices
    seconds: float = 0.0  # the device's compute for this round (rebuild, train, encode)
    job: str = ""         # the job whose round `round` is ("" before the device saw any)
    # How the device got this round's model (on its "training" status): "patch", "full" or "" (held it
    # already), its bytes on the wire (chunk headers included), and whether it was the device's first model.
    download: str = ""
    download_bytes: int = 0
    first_download: bool = False
    refusals: dict = field(default_factory=dict)  # patches refused since the device started, by reason
    # Federated evaluation (on "uploaded" and "skipped"): the round's model as received, before training,
    # on the device's held-out samples: {"accuracy": [0, 1], "loss": >= 0, "samples": int >= 1}; None: none.
    evaluation: dict | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.device, str) and 0 < len(self.device) <= 64):
            raise MessageError("invalid status: bad device id")
        if self.evaluation is not None and not _evaluation(self.evaluation):
            raise MessageError("invalid status: evaluation must be {accuracy in [0, 1], loss >= 0, samples >= 1}")
        if (self.download not in DOWNLOADS or not (_int(self.download_bytes) and self.download_bytes >= 0)
                or not isinstance(self.first_download, bool) or not isinstance(self.refusals, dict)
                or not all(isinstance(k, str) and _int(v) for k, v in self.refusals.items())):
            raise MessageError("invalid status: bad download fields")
        if self.state not in STATES:
            raise MessageError(f"invalid status: state must be one of {', '.join(STATES)}")
        if not _int(self.round) or not isinstance(self.detail, str) or not isinstance(self.trains, bool) \
                or not (_num(self.seconds) and self.seconds >= 0) or not _job(self.job):
            raise MessageError("invalid status: bad field types")



def done_message(rounds: int, model_id: str, job: str = "", patches: tuple[dict, ...] = ()) -> bytes:
    """Retained on the round topic when training ends: agents stop, inference devices keep the model
    (fetched as a patch from one of `patches`' bases, as in a round task, or whole)."""
    return json.dumps({"v": VERSION, "type": "done", "rounds": rounds, "model_id": model_id, "job": job,
                       "patches": list(patches)}).encode()


def check_patch_offers(offers: object, what: str) -> tuple[dict, ...]:
    """`offers` as a tuple of {"base", "bytes", "sha256"} dicts, or MessageError naming `what`."""
    if not isinstance(offers, (list, tuple)) or len(offers) > 64:
        raise MessageError(f"invalid {what}: patches must be a list of at most 64 entries")
    out = []
    for o in offers:
        if not (isinstance(o, dict) and isinstance(o.get("base"), str) and 0 < len(o["base"]) <= 64
                and _int(o.get("bytes")) and 0 < o["bytes"] < 2**32 and isinstance(o.get("sha256"), str)
                and len(o["sha256"]) == 64):
            raise MessageError(f"invalid {what}: a patch entry needs base (model id), bytes (int > 0) "
                               "and sha256 (64 hex digits)")
        out.append({"base": o["base"], "bytes": o["bytes"], "sha256": o["sha256"]})
    return tuple(out)


def message_job(data: bytes) -> str:
    """The `job` of a JSON control message ("" for one that names none), or MessageError."""
    message_type(data)
    job = json.loads(data).get("job", "")
    if not _job(job):
        raise MessageError("control message with a bad job id")
    return job


def new_job_id() -> str:
    """A job id that sorts by start time and does not repeat: 20261201T231500Z-3fa9c2."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + secrets.token_hex(3)


@dataclass(frozen=True)
class Lease(_JsonMessage):
    """Retained on the lease topic while a coordinator drives the fleet. Its last will clears it, so a
    crashed coordinator frees the fleet; a second coordinator that finds another's lease refuses."""

    KIND, WHAT = "lease", "lease"

    job: str
    coordinator: str      # the holder's MQTT client id (unique per coordinator instance)
    host: str = ""
    pid: int = 0
    started: float = 0.0  # the holder's unix time at start: for people, never compared across clocks

    def __post_init__(self) -> None:
        if not (_job(self.job) and self.job and isinstance(self.coordinator, str) and 0 < len(self.coordinator) <= 128
                and isinstance(self.host, str) and len(self.host) <= 255 and _int(self.pid) and _num(self.started)):
            raise MessageError("invalid lease: bad field types")


    def describe(self) -> str:
        when = dt.datetime.fromtimestamp(self.started, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"{self.coordinator} (host {self.host or '?'}, pid {self.pid}, job {self.job}, since {when})"


def message_type(data: bytes) -> str:
    """The `type` of a JSON control message, or MessageError."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageError("control message too large")
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # b'[[[...' recurses
        raise MessageError(f"control message is not JSON: {exc}") from None
    if not isinstance(body, dict) or not isinstance(body.get("type"), str):
        raise MessageError("control message without a type")
    return body["type"]


def _int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)  # JSON true is not a round number


def _evaluation(x: object) -> bool:
    return (isinstance(x, dict) and _num(x.get("accuracy")) and 0 <= x["accuracy"] <= 1
            and _num(x.get("loss")) and x["loss"] >= 0 and _int(x.get("samples")) and x["samples"] >= 1)


def _job(x: object) -> bool:
    return isinstance(x, str) and len(x) <= 64


def _num(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _load(data: bytes, kind: str) -> dict:
    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageError(f"{kind} message of {len(data)} bytes is larger than {MAX_MESSAGE_BYTES}")
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # b'[[[...' recurses
        raise MessageError(f"{kind} message is not JSON: {exc}") from None
    if not isinstance(body, dict) or body.get("type") != kind:
        raise MessageError(f"not a {kind} message")
    if body.get("v") != VERSION:
        raise MessageError(f"unsupported {kind} message version {body.get('v')!r}")
    return body
