"""The bad input `pqsu reliability fuzz` sends a coordinator, and what the coordinator must count for it.

A corpus is a list of `Case`s, each one payload sequence on one update topic: a mutated update in
valid chunk frames (so it reaches the codec and the round checks), a broken chunk sequence, or a
frame on a topic that is not a device's. Every case must be refused exactly once:

- a mutated update is judged here by `Referee`, the coordinator's own `FederatedServer.submit` on the
  round and model it announced; a mutant it would accept is dropped from the corpus;
- the chunk layer is replayed by `Replay`, a `chunking.Reassembler` with the coordinator's bounds fed
  the same frames in the same order, so it predicts each chunk refusal, which incomplete sets get
  evicted (counted as `chunk-incomplete`) and how many are still held when the storm ends.

Mutation ideas follow tests/protocol/test_codec_fuzz.py; here they are aimed at one real model's update.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import struct
import zlib
from collections import Counter
from dataclasses import dataclass

import numpy as np

from pqsu.cloud.coordinator import REASSEMBLY_BYTES, REASSEMBLY_MESSAGES
from pqsu.cloud.server import FederatedServer
from pqsu.protocol import chunking, codec
from pqsu.protocol.codec import TensorBlock, Update
from pqsu.protocol.messages import RoundTask
from pqsu.protocol.topics import TopicError, check_device

FRAME = struct.Struct("<4sB16sIIQ32s")  # docs/protocol.md, "Chunk framing"
assert FRAME.size == chunking.HEADER_SIZE
U32_MAX = 2**32 - 1
# Topic levels `update/+` delivers that are not device ids (no "/", "+", "#" or NUL: those never arrive).
FOREIGN_LEVELS = ("", " ", "dev 000", "x" * 65, "dev$0", "dév-000", "dev:0", "dev*", "dev%2F0", "dev,0", "dev@0")


@dataclass
class Case:
    family: str             # "update:bitflip", "chunk:incomplete", "topic:foreign", ...
    topic_level: str        # the last level of pqsu/<fleet>/update/<level>
    frames: list[bytes]
    verdict: str | None     # for a whole update in valid frames: the reason the coordinator must give

    @property
    def device(self) -> str | None:
        """The device the coordinator reads from the topic (None: a foreign topic)."""
        try:
            return check_device(self.topic_level)
        except TopicError:
            return None


def model_shapes(model_bytes: bytes) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of the model file, as an agent rebuilds it (the names updates use)."""
    from pqsu.export.bridge import torch_model_from_onnx

    model, _ = torch_model_from_onnx(model_bytes)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def honest_update(task: RoundTask, device: str, shapes: dict[str, tuple[int, ...]], seed: int) -> Update:
    """A small update of the kind an agent sends: a few top entries of the large tensors (one set
    bitmap-coded), the small tensors dense, every fourth skipped; values ~1e-4, so it barely moves the model."""
    rng = np.random.default_rng(seed)
    blocks, bitmap_done = [], False
    for i, (name, shape) in enumerate(sorted(shapes.items())):
        numel = math.prod(shape)
        if i % 4 == 2:
            blocks.append(TensorBlock.skip(name, shape))
        elif numel <= 256:
            blocks.append(TensorBlock.dense(name, rng.normal(0, 1e-4, shape)))
        else:
            k = numel // 4 if not bitmap_done and numel <= 8192 else min(64, max(1, numel // 100))
            bitmap_done |= k == numel // 4
            idx = rng.choice(numel, size=k, replace=False)
            blocks.append(TensorBlock.sparse(name, shape, idx, rng.normal(0, 1e-4, k)))
    return Update(task.round, device, task.model_id, 120, float(rng.uniform(0.5, 2.0)), tuple(blocks))


class Referee(FederatedServer):
    """`FederatedServer`'s acceptance rules on the announced model and round, without its export step:
    a payload is judged by the very code the coordinator runs."""

    def __init__(self, model_bytes: bytes, task: RoundTask, devices: list[str]):
        from pqsu.export.bridge import torch_model_from_onnx

        model, info = torch_model_from_onnx(model_bytes)
        super().__init__(model, info, None, None, None)
        self._announced, self.round_no, self.devices = (model_bytes, info), task.round, list(devices)
        if info.model_id != task.model_id:
            raise ValueError(f"model file {info.model_id} is not the announced {task.model_id}")
        self.open_round(self.round_no, self.devices)

    def model_message(self):
        return self._announced

    def verdict(self, payload: bytes, sender: str) -> str:
        # Quiet: its log lines are the coordinator's job; an accepted mutant with an extreme scale may overflow
        # the aggregate here (the real server refuses to step on a non-finite one), and it is dropped anyway.
        with _quiet("pqsu.cloud.server"), np.errstate(all="ignore"):
            reason = self.submit(payload, sender=sender).reason
        if reason == "accepted":  # a fresh round, so the next payload is not refused as a duplicate
            self.open_round(self.round_no, self.devices)
        return reason


class Replay:
    """The coordinator's chunk handling for the cases sent so far: the same reassembler bounds, the same
    frames in the same order. `counted` is what it must count; `lines` the refusals it logs one line each."""

    def __init__(self):
        self.reassembler = chunking.Reassembler(max_messages=REASSEMBLY_MESSAGES, max_bytes=REASSEMBLY_BYTES)
        self.counted: Counter = Counter()
        self.lines = 0
        self._dropped = 0

    @property
    def held(self) -> int:
        """Incomplete sets still held: not refused yet (counted when evicted, or after 10 idle minutes)."""
        return self.reassembler.pending

    def feed(self, case: Case) -> tuple[int, list[bytes]]:
        """(refusals the case itself causes, messages it completes that the server would accept)."""
        if case.device is None:
            self.counted["foreign-topic"] += len(case.frames)
            self.lines += len(case.frames)
            return len(case.frames), []
        direct, accepted = 0, []
        for frame in case.frames:
            try:
                message = self.reassembler.add(frame, source=case.device)
            except chunking.ChunkError as exc:
                self.counted["chunk-" + exc.reason] += 1
                self.lines += 1
                direct += 1
                continue
            finally:
                dropped = self.reassembler.evicted + self.reassembler.expired
                self.counted["chunk-incomplete"] += dropped - self._dropped
                self._dropped = dropped
            if message is None:
                continue
            if case.verdict is None:
                raise AssertionError(f"{case.family}: the broken chunk sequence reassembled into a message")
            if case.verdict == "accepted":
                accepted.append(message)
            else:
                self.counted[case.verdict] += 1
                self.lines += 1
                direct += 1
        return direct, accepted


def build(seeds: list[Update], referee: Referee, others: list[str], n: int,
          seed: int) -> tuple[list[Case], Replay, int]:
    """n cases (about 60% update, 35% chunk, 5% foreign topics) mutated from the honest `seeds` (the first
    one's device is the fuzzer's), the replay after them, and how many mutants were dropped because the
    referee would have accepted them."""
    rng = np.random.default_rng(seed)
    payloads = [codec.encode(u) for u in seeds]
    valid, device = payloads[0], seeds[0].device_id
    cases, seen, dropped, replay = [], set(), 0, Replay()
    while len(cases) < n:
        pick = rng.random()
        if pick < 0.6:
            family, level, payload = _update_mutant(rng, valid, payloads, seeds[0], device, others)
            if (level, payload) in seen:
                continue
            seen.add((level, payload))
            verdict = referee.verdict(payload, sender=level)
            if verdict == "accepted":
                dropped += 1
                continue
            case = Case(family, level, chunking.split(payload, _limit(rng, payload)), verdict)
        elif pick < 0.95:
            family, frames = _chunk_mutant(rng, valid)
            case = Case(family, device if rng.random() < 0.9 else str(rng.choice(others)), frames, None)
        else:
            level = str(rng.choice(FOREIGN_LEVELS))
            case = Case("topic:foreign", level, [chunking.split(valid, 1 << 17, rng.bytes(16))[0]], None)
        direct, accepted = replay.feed(case)
        held = case.family in ("chunk:incomplete", "chunk:huge-held")  # refused later, when dropped
        if accepted or direct != (0 if held else 1):
            raise AssertionError(f"{case.family}: {direct} refusals, {len(accepted)} accepted; "
                                 f"{0 if held else 1} expected")
        cases.append(case)
    return cases, replay, dropped


# -- the update layer: the payload changes, its frames are valid ----------------------------------------------
def _update_mutant(rng, valid: bytes, payloads: list[bytes], base: Update, device: str,
                   others: list[str]) -> tuple[str, str, bytes]:
    """(family, topic level, payload)."""
    op = int(rng.integers(12))
    if op < 8:
        name, p = _byte_mutation(rng, valid if rng.random() < 0.7 else payloads[int(rng.integers(len(payloads)))],
                                 payloads)
        if rng.random() < 0.2:
            p = _byte_mutation(rng, p, payloads)[1]
        return f"update:{name}", device, _refresh_crc(p) if rng.random() < 0.75 else p
    if op < 10:  # of the valid update with a fresh loss: a field's few values still give new payloads
        fresh = codec.encode(dataclasses.replace(base, loss=float(rng.uniform(0.1, 9.0))))
        name, p = _header_rewrite(rng, fresh)
        return f"update:header-{name}", device, p
    name, level, update = _semantic(rng, base, device, others)
    return f"update:{name}", level, codec.encode(update)


def _byte_mutation(rng, p: bytes, payloads: list[bytes]) -> tuple[str, bytes]:
    b = bytearray(p)
    op = int(rng.integers(9)) if len(b) >= 4 else 4  # a stacked mutation may start from a few bytes
    if op == 0:
        for _ in range(int(rng.integers(1, 5))):
            b[int(rng.integers(len(b)))] ^= 1 << int(rng.integers(8))
        return "bit-flip", bytes(b)
    if op == 1:
        for _ in range(int(rng.integers(1, 5))):
            b[int(rng.integers(len(b)))] = int(rng.choice([0, 1, 0x7F, 0x80, 0xFF, int(rng.integers(256))]))
        return "byte-overwrite", bytes(b)
    if op == 2:  # a 32-bit field (a count, a dim, nnz, a length) set to an extreme
        i = int(rng.integers(len(b) - 3))
        b[i:i + 4] = struct.pack("<I", int(rng.choice([0, 1, 2**31, U32_MAX, int(rng.integers(U32_MAX))])))
        return "u32-extreme", bytes(b)
    if op == 3:
        return "truncation", bytes(b[:int(rng.integers(len(b)))])
    if op == 4:
        i = int(rng.integers(len(b) + 1))
        return "insertion", bytes(b[:i] + rng.bytes(int(rng.integers(1, 17))) + b[i:])
    if op == 5:
        i = int(rng.integers(len(b)))
        return "deletion", bytes(b[:i] + b[i + int(rng.integers(1, 17)):])
    if op == 6:
        other = payloads[int(rng.integers(len(payloads)))]
        return "splice", bytes(b[:int(rng.integers(len(b) + 1))] + other[int(rng.integers(len(other) + 1)):])
    if op == 7:
        i = int(rng.integers(len(b)))
        return "duplicated-span", bytes(b[:i] + b[i:i + int(rng.integers(1, 33))] + b[i:])
    junk = bytearray(rng.bytes(int(rng.integers(0, 81))))
    if rng.random() < 0.5:
        junk[:7] = b"PQSU\x01\x01" + bytes([int(rng.integers(2))])
    return "random-bytes", bytes(junk)


def _header_rewrite(rng, p: bytes) -> tuple[str, bytes]:
    """One header field rewritten, the CRC recomputed: past the checksum, into the checks after it."""
    b = bytearray(p)
    field = str(rng.choice(["version", "kind", "flags", "round", "samples", "loss", "device-length",
                            "model-length", "tensor-count"]))
    if field == "version":
        b[4] = int(rng.choice([0, 2, 255]))
    elif field == "kind":
        b[5] = int(rng.choice([0, 2, 255]))
    elif field == "flags":
        b[6] = int(rng.choice([1, 2, 0x80, 0xFF]))
    elif field == "round":
        b[7:11] = struct.pack("<I", int(rng.choice([0, 2, 3, U32_MAX, int(rng.integers(4, U32_MAX))])))
    elif field == "samples":
        b[11:15] = struct.pack("<I", 0)
    elif field == "loss":
        # an infinity, or one of the 2^24 NaN bit patterns
        b[15:19] = struct.pack("<I", int(rng.choice([0x7F800000, 0xFF800000, 0x7F800001 + int(rng.integers(1 << 22)),
                                                     0xFFC00000 | int(rng.integers(1 << 22))])))
    elif field == "device-length":
        b[19] = int(rng.choice([0, b[19] - 1, b[19] + 1, 255]))
    elif field == "model-length":
        at = 20 + b[19]
        b[at] = int(rng.choice([0, b[at] - 1, b[at] + 1, 255]))
    else:
        at = 21 + b[19] + b[20 + b[19]]
        b[at:at + 4] = struct.pack("<I", int(rng.choice([0, 1, U32_MAX, int(rng.integers(2, 5000))])))
    return field, _refresh_crc(bytes(b))


def _semantic(rng, base: Update, device: str, others: list[str]) -> tuple[str, str, Update]:
    """A well-formed update that breaks one rule of the round: (family, topic level, update)."""
    op, loss = int(rng.integers(7)), float(rng.uniform(0.1, 9.0))  # a fresh loss: every mutant distinct

    def like(**changes) -> Update:
        fields = dict(round=base.round, device_id=base.device_id, model_id=base.model_id,
                      num_samples=base.num_samples, loss=loss, blocks=base.blocks)
        return Update(**{**fields, **changes})
    if op == 0:
        return "wrong-round", device, like(round=int(rng.choice([0, base.round + 1, base.round + 7, U32_MAX])))
    if op == 1:
        model = str(rng.choice([rng.bytes(16).hex(), base.model_id[:-1] + "0", "", "x" * 255]))
        return "wrong-model", device, like(model_id=model)
    if op == 2:
        return "other-device-named", device, like(device_id=str(rng.choice(others)))
    if op == 3:
        other = str(rng.choice(others))
        return "device-not-asked", other, like(device_id=other)
    if op == 4:
        return "no-samples", device, like(num_samples=0)
    blocks, i = list(base.blocks), int(rng.integers(len(base.blocks)))
    b = blocks[i]
    if op == 5:
        blocks[i] = TensorBlock(b.name + str(rng.choice([".x", "_", "0"])), b.shape, b.kind, b.q, b.scale, b.indices) \
            if b.kind != "skip" else TensorBlock.skip("no." + b.name, b.shape)
        return "unknown-tensor", device, like(blocks=tuple(blocks))
    shape = (1, *b.shape) if rng.random() < 0.5 or not b.shape else tuple(reversed(b.shape)) + (1,)
    blocks[i] = TensorBlock(b.name, shape, b.kind, b.q, b.scale, b.indices) if b.kind != "dense" \
        else TensorBlock.dense(b.name, np.zeros(shape))
    return "wrong-shape", device, like(blocks=tuple(blocks))


def _refresh_crc(p: bytes) -> bytes:
    """A correct CRC where the (possibly mutated) flags byte says the trailer starts."""
    signed = len(p) > 6 and p[6] & 1
    end = len(p) - 4 - (32 if signed else 0)
    return p if end < 0 else p[:end] + struct.pack("<I", zlib.crc32(p[:end])) + p[end + 4:]


def _limit(rng, payload: bytes) -> int:
    """Mostly one frame; one update in five split into 2-8 frames, so reassembly runs too."""
    if rng.random() < 0.8 or len(payload) < 2:
        return 1 << 17
    return chunking.HEADER_SIZE + max(1, -(-len(payload) // int(rng.integers(2, 9))))


# -- the chunk layer: the frames are broken (one refusal each case, or an incomplete set) ----------------------
def _chunk_mutant(rng, payload: bytes) -> tuple[str, list[bytes]]:
    mid = rng.bytes(16)  # a fresh message id: no case joins or replays another one's set
    frames = chunking.split(payload, chunking.HEADER_SIZE + -(-len(payload) // int(rng.integers(2, 7))), mid)
    count, total, digest = len(frames), len(payload), frames[0][37:69]
    assert count >= 2, "the honest update is too small to split"
    op = int(rng.integers(13))
    j = int(rng.integers(count))  # the bad frame comes after j good ones (its magic and id name the set it spoils)
    good = [frames[k] for k in rng.permutation(count)[:j]]
    bad_index = next(k for k in range(count) if frames[k] not in good)
    data = frames[bad_index][69:]
    if op == 0:
        return "chunk:bad-magic", [rng.bytes(4).replace(b"PQCK", b"PQCX") + frames[0][4:]]
    if op == 1:
        return "chunk:short-frame", [frames[0][:int(rng.integers(chunking.HEADER_SIZE))]]
    if op == 2:
        version = int(rng.choice([0, 2, 255]))
        return "chunk:bad-version", good + [FRAME.pack(b"PQCK", version, mid, bad_index, count, total, digest) + data]
    if op == 3:
        index = int(rng.choice([count, count + 1, U32_MAX]))
        return "chunk:index-out-of-range", good + [_frame(mid, index, count, total, digest, data)]
    if op == 4:
        return "chunk:count-zero", good + [_frame(mid, 0, 0, total, digest, data)]
    if op == 5:
        return "chunk:count-over-total", good + [_frame(mid, 0, total + int(rng.integers(1, 9)), total, digest, b"x")]
    if op == 6:
        bent = data + rng.bytes(int(rng.integers(1, 9))) if rng.random() < 0.5 else data[:-1]
        return "chunk:wrong-size", good + [_frame(mid, bad_index, count, total, digest, bent)]
    if op == 7:  # a total no frame of this count can carry
        return "chunk:huge-unframeable", good + [_frame(mid, 0, int(rng.integers(1, 1 << 16)), 2**64 - 1, digest, data)]
    if op == 8:  # a consistent frame declaring more than the coordinator would ever hold
        k = int(rng.choice([1, 16, 4096]))
        many = int(rng.integers(REASSEMBLY_BYTES // k + 2, U32_MAX))
        return "chunk:huge-oversize", [_frame(mid, int(rng.integers(many - 1)), many, many * k, digest, rng.bytes(k))]
    if op == 9:  # a consistent frame of a 64-500 MiB message: held, reserving its size, until evicted
        k = 1024
        many = int(rng.integers((64 << 20) // k, (500 << 20) // k))
        return "chunk:huge-held", [_frame(mid, int(rng.integers(many)), many, many * k, digest, rng.bytes(k))]
    if op == 10:  # every frame arrives (shuffled, one repeated) but a data byte was changed on the way
        order = [frames[k] for k in rng.permutation(count)]
        i = int(rng.integers(count))
        order[i] = order[i][:-1] + bytes([order[i][-1] ^ 0x01])
        order.insert(int(rng.integers(count)), order[0])  # before the last: after it, it would start a new set
        return "chunk:hash-mismatch", order
    if op == 11:  # a frame of this id declaring another message
        other = chunking.split(payload + rng.bytes(int(rng.integers(1, 64))), chunking.HEADER_SIZE + len(data), mid)
        return "chunk:inconsistent", (good or [frames[0]]) + [other[int(rng.integers(len(other)))]]
    keep = rng.permutation(count)[:int(rng.integers(1, count))]  # never all of them
    return "chunk:incomplete", [frames[k] for k in sorted(keep)]


def _frame(mid: bytes, index: int, count: int, total: int, digest: bytes, data: bytes) -> bytes:
    return FRAME.pack(chunking.MAGIC, chunking.VERSION, mid, index, count, total, digest) + data


@contextlib.contextmanager
def _quiet(name: str):
    """The referee judges thousands of payloads: its per-rejection log lines are the coordinator's job."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
