"""The aggregator workers' messages: claims, grants and partial aggregates (docs/protocol.md, "Aggregator workers").

A worker claims the devices whose updates it has validated before folding them; the coordinator grants
each device to the first worker that claims it in a round, so an update that reaches two workers (a
retransmission after a reconnect, a partition that moved) is counted once. A partial hands over what a
worker folded since its last partial: FedAvg's weighted sums (flat, in the model's tensor order),
weight total, counts and refusals by reason; the coordinator compares its counts with what it granted
that worker, so what a dead worker never handed over is counted as lost.

Little-endian binary, a CRC32 trailer, no pickle; `decode_*` treat every byte as hostile and raise
`PartialError` (a `CodecError`, reason "corrupt" / "truncated" / "unsupported").
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

import numpy as np

from pqsu.protocol.errors import CodecError

CLAIM, GRANT, PARTIAL = b"PQCL", b"PQGR", b"PQPA"
VERSION = 1
FLAG_FINAL = 0x01
_CLAIM_HEAD = struct.Struct("<4sBII")          # magic, version, round, seq
_PARTIAL_HEAD = struct.Struct("<4sBBIIIIddQ")  # magic, version, flags, round, seq, count, uploads, weight, loss_sum, bytes_up
_U8, _U16, _U32 = struct.Struct("<B"), struct.Struct("<H"), struct.Struct("<I")


class PartialError(CodecError):
    """A claim, grant or partial that does not parse."""

    reason = "corrupt"


@dataclass(frozen=True)
class Claim:
    """Devices whose valid updates a worker is about to count; the `Grant` of the same `seq` answers with
    one code per device (GRANTED, or why not)."""

    round: int
    seq: int
    worker: str
    job: str
    devices: tuple[str, ...]


GRANTED, TAKEN, NOT_ASKED, CLOSED = 0, 1, 2, 3  # grant codes: count it; counted elsewhere; not asked; round over
GRANT_REASONS = {TAKEN: "duplicate", NOT_ASKED: "not-selected", CLOSED: "wrong-round"}


@dataclass(frozen=True)
class Grant:
    round: int
    seq: int
    worker: str
    job: str
    codes: bytes  # one per device of the claim, in its order


@dataclass(frozen=True)
class Partial:
    round: int
    seq: int
    worker: str
    job: str
    model_id: str
    final: bool
    count: int            # updates folded into `sums`
    uploads: int          # accepted updates (equals count for FedAvg)
    weight: float         # sum of their sample counts
    loss_sum: float
    bytes_up: int
    refused: dict[str, int] = field(default_factory=dict)
    sums: np.ndarray = field(default_factory=lambda: np.empty(0, np.float32))  # flat weighted sums


def _text(s: str) -> bytes:
    raw = s.encode("utf-8")
    if len(raw) > 255:
        raise PartialError(f"{s[:20]!r}... is longer than 255 bytes")
    return _U8.pack(len(raw)) + raw


def _seal(body: bytes) -> bytes:
    return body + _U32.pack(zlib.crc32(body))


class _Reader:
    def __init__(self, buf: bytes, magic: bytes):
        if not isinstance(buf, (bytes, bytearray, memoryview)):
            raise PartialError(f"payload must be bytes, got {type(buf).__name__}")
        buf = bytes(buf)
        if len(buf) < 9 or buf[:4] != magic:
            raise PartialError(f"not a {magic.decode()} message")
        if zlib.crc32(memoryview(buf)[:-4]) != _U32.unpack_from(buf, len(buf) - 4)[0]:
            raise PartialError("CRC32 mismatch")
        if buf[4] != VERSION:
            raise PartialError(f"unsupported version {buf[4]}")
        self.buf, self.pos, self.end = buf, 0, len(buf) - 4

    def unpack(self, st: struct.Struct) -> tuple:
        if self.pos + st.size > self.end:
            raise PartialError("truncated")
        out = st.unpack_from(self.buf, self.pos)
        self.pos += st.size
        return out

    def text(self) -> str:
        (n,) = self.unpack(_U8)
        if self.pos + n > self.end:
            raise PartialError("truncated")
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise PartialError("text is not UTF-8") from None

    def array(self, dtype: str) -> np.ndarray:
        (n,) = self.unpack(_U32)
        size = n * np.dtype(dtype).itemsize
        if self.pos + size > self.end:
            raise PartialError("truncated")
        a = np.frombuffer(self.buf, dtype, n, self.pos).copy()
        self.pos += size
        return a

    def done(self) -> None:
        if self.pos != self.end:
            raise PartialError(f"{self.end - self.pos} trailing bytes")


def _head(magic: bytes, rnd: int, seq: int, worker: str, job: str) -> bytes:
    return _CLAIM_HEAD.pack(magic, VERSION, rnd, seq) + _text(worker) + _text(job)


def encode_claim(c: Claim) -> bytes:
    return _seal(b"".join([_head(CLAIM, c.round, c.seq, c.worker, c.job), _U32.pack(len(c.devices))]
                          + [_text(d) for d in c.devices]))


def decode_claim(buf: bytes) -> Claim:
    r = _Reader(buf, CLAIM)
    _, _, rnd, seq = r.unpack(_CLAIM_HEAD)
    worker, job = r.text(), r.text()
    (n,) = r.unpack(_U32)
    if n > r.end - r.pos:
        raise PartialError("truncated")
    devices = tuple(r.text() for _ in range(n))
    r.done()
    return Claim(rnd, seq, worker, job, devices)


def encode_grant(g: Grant) -> bytes:
    return _seal(_head(GRANT, g.round, g.seq, g.worker, g.job) + _U32.pack(len(g.codes)) + bytes(g.codes))


def decode_grant(buf: bytes) -> Grant:
    r = _Reader(buf, GRANT)
    _, _, rnd, seq = r.unpack(_CLAIM_HEAD)
    worker, job = r.text(), r.text()
    (n,) = r.unpack(_U32)
    if r.pos + n > r.end:
        raise PartialError("truncated")
    codes = r.buf[r.pos:r.pos + n]
    r.pos += n
    r.done()
    return Grant(rnd, seq, worker, job, codes)


def encode_partial(p: Partial) -> bytes:
    parts = [_PARTIAL_HEAD.pack(PARTIAL, VERSION, FLAG_FINAL if p.final else 0, p.round, p.seq, p.count, p.uploads,
                                p.weight, p.loss_sum, p.bytes_up),
             _text(p.worker), _text(p.job), _text(p.model_id), _U16.pack(len(p.refused))]
    for reason, n in sorted(p.refused.items()):
        parts += [_text(reason), _U32.pack(n)]
    sums = np.asarray(p.sums, "<f4")
    parts += [_U32.pack(sums.size), sums.tobytes()]
    return _seal(b"".join(parts))


def decode_partial(buf: bytes) -> Partial:
    r = _Reader(buf, PARTIAL)
    _, _, flags, rnd, seq, count, uploads, weight, loss_sum, bytes_up = r.unpack(_PARTIAL_HEAD)
    if flags & ~FLAG_FINAL:
        raise PartialError(f"unknown flag bits 0x{flags:02x}")
    worker, job, model_id = r.text(), r.text(), r.text()
    (n,) = r.unpack(_U16)
    refused = {}
    for _ in range(n):
        reason = r.text()
        refused[reason] = r.unpack(_U32)[0]
    sums = r.array("<f4")
    r.done()
    if not np.isfinite(sums).all() or not (np.isfinite(weight) and weight >= 0 and np.isfinite(loss_sum)):
        raise PartialError("sums, weight or loss are not finite")
    return Partial(rnd, seq, worker, job, model_id, bool(flags & FLAG_FINAL), count, uploads, weight, loss_sum,
                   bytes_up, refused, sums)
