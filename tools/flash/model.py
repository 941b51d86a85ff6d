"""The fleet's current model for a bundle (`pqsu flash --model-file` / `--model-from-broker`).

Boards are flashed over a cable or an SD card, so the first model need not cross the radio: the
bundle carries it, install.sh puts it where the agent looks at start (`<state_dir>/model.onnx`),
and a freshly flashed board serves it at once; its first radio download can then be a patch
from it instead of the whole file.

Both sources end in `model_id.verified`, before anything is written: a model the board could not
verify must never reach it. The broker's copy is read like an agent reads it (the retained model
chunks, reassembled and hash-checked), on a short clean session that subscribes and never
publishes, and within a bounded wait: a broker with no retained model is an error, not a hang.
"""
from __future__ import annotations

import logging
import queue
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from pqsu.protocol import chunking, model_id
from pqsu.protocol.errors import PqsuError
from pqsu.protocol.mqtt import BrokerURL, MqttClient, MqttError
from pqsu.protocol.topics import Topics, TopicError
from pqsu.tools.flash.request import FlashError

log = logging.getLogger(__name__)

# A broker sends the retained messages of a subscription right after its SUBACK: this long without
# a frame means there is none (the same slack as the coordinator's preflight).
RETAINED_WAIT_S = 1.5
# Frames that stop arriving mid-model: a coordinator replacing the model, or a lost frame. Idle,
# not total, time: a large model over a slow link may take long but keeps arriving.
IDLE_WAIT_S = 5.0
MAX_MODEL_BYTES = 1 << 30          # what an agent reassembles at most (edge/agent.py)


@dataclass(frozen=True)
class FlashedModel:
    file: model_id.VerifiedModel
    source: str                    # where it came from, for the manifest and the output

    @property
    def model_id(self) -> str:
        return self.file.model_id


def model_from_file(path: Path, flag: str = "--model-file") -> FlashedModel:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise FlashError(f"{flag} {path}: cannot read it ({exc.strerror})") from None
    try:
        return FlashedModel(model_id.verified(data), f"file {Path(path).resolve()}")
    except PqsuError as exc:
        raise FlashError(f"{flag} {path}: {exc}; nothing was written") from None


def model_from_broker(url: "str | BrokerURL", fleet: str, *, wait_s: float = 60.0, connect_timeout_s: float = 10.0,
                      **client_kwargs) -> FlashedModel:
    """The model retained on the broker for `fleet`, verified; FlashError when the broker is unreachable,
    holds no model, sends an incomplete one within `wait_s`, or one that does not verify.
    `client_kwargs` are MqttClient's (protocol, TLS files, username, password)."""
    topics = Topics(fleet)
    frames: queue.Queue[bytes] = queue.Queue()

    def on_chunk(topic: str, payload: bytes, retained: bool) -> None:
        try:
            topics.parse(topic)
        except TopicError:
            return
        if payload:  # empty: a cleared chunk. Live frames too: a coordinator publishing its newest model now
            frames.put(payload)

    client = MqttClient(url, f"pqsu-flash-{secrets.token_hex(4)}", persistent_session=False, **client_kwargs)
    try:
        client.connect(timeout_s=connect_timeout_s)
        client.subscribe(topics.model_filter, on_chunk)
        data = _reassemble(frames, wait_s)
    except MqttError as exc:
        raise FlashError(f"--model-from-broker: {exc}") from None
    finally:
        client.close()
    where = f"{client.url} fleet {fleet!r}"
    if data is None:
        raise FlashError(f"--model-from-broker: no model is retained on {where} (is a coordinator running the fleet? "
                         "or pass --model-file)")
    if isinstance(data, str):
        raise FlashError(f"--model-from-broker: the retained model on {where} is incomplete ({data}); "
                         "a coordinator may be publishing a new one: try again")
    try:
        file = model_id.verified(data)
    except PqsuError as exc:
        raise FlashError(f"--model-from-broker: the retained model on {where} does not verify: {exc}") from None
    log.info("model %s (%d bytes) retained on %s", file.model_id[:12], len(file), where)
    return FlashedModel(file, f"broker {client.url} fleet {fleet}")


def _reassemble(frames: queue.Queue, wait_s: float) -> bytes | str | None:
    """The first complete model from `frames`; None when no frame came; a description of what is
    missing when frames stopped (or `wait_s` ran out) before one was complete."""
    parts = chunking.Reassembler(max_messages=4, max_bytes=MAX_MODEL_BYTES, ttl_s=max(wait_s, 1.0))
    counts: dict[bytes, tuple[int, set[int]]] = {}   # message id -> (frames declared, indices seen)
    now = time.monotonic()
    deadline, last = now + wait_s, now
    while True:
        idle = IDLE_WAIT_S if counts else RETAINED_WAIT_S
        why = f"then none for {idle:g} s" if last + idle < deadline else f"not all within {wait_s:g} s"
        timeout = min(deadline, last + idle) - time.monotonic()
        if timeout <= 0:
            break
        try:
            frame = frames.get(timeout=timeout)
        except queue.Empty:
            break
        last = time.monotonic()
        try:
            header = chunking.parse_header(frame)
            counts.setdefault(header.message_id, (header.count, set()))[1].add(header.index)
            message = parts.add(frame, source="model")
        except chunking.ChunkError as exc:
            log.info("bad retained model chunk: %s", exc)
            continue
        if message is not None:
            return message
    if not counts:
        return None
    count, seen = max(counts.values(), key=lambda c: len(c[1]) / c[0])
    return f"{len(seen)} of {count} chunks, {why}"
