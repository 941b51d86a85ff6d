"""Chunk framing: payloads of any size over brokers that cap a publish (AWS IoT 128 KB, EMQX 1 MB).

EVERY payload on the model and update topics is framed, a single-frame message too, so a
receiver has one code path. A frame (little-endian; docs/protocol.md, "Chunk framing"):

    magic b"PQCK" | version u8 = 1 | message id 16 B | index u32 | count u32 |
    total length u64 | SHA-256 of the whole message 32 B | data

Every frame but the last carries exactly ceil(total / count) data bytes, the last one the
rest (at least one byte; an empty message is one frame with no data). This rule puts each
frame's data at a known offset without trusting a per-frame offset field, and lets the
receiver reject a frame of the wrong size on sight.

`Reassembler` is fed untrusted frames from the network thread: a message's declared size is
reserved against a fixed byte budget on its first frame, and memory is then taken only for
the frames that actually arrive, so a peer can never make it hold more than `max_bytes` (nor
make a 69-byte frame cost megabytes); every failure is a `ChunkError` with a countable `reason`.
"""
from __future__ import annotations

import hashlib
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from pqsu.protocol.errors import PqsuError

MAGIC = b"PQCK"
VERSION = 1
_HEADER = struct.Struct("<4sB16sIIQ32s")
HEADER_SIZE = _HEADER.size  # 69
ID_SIZE = 16
MAX_COUNT = 2**32 - 1
REASONS = ("malformed", "oversize", "hash-mismatch", "inconsistent")


class ChunkError(PqsuError):
    """A frame or a set of frames that does not make a valid message.

    `reason` is one of REASONS for received frames ("limit" for a `split()` call that cannot
    work), a stable key to count rejections by.
    """

    def __init__(self, message: str, reason: str = "malformed"):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class FrameHeader:
    message_id: bytes
    index: int
    count: int
    total: int
    sha256: bytes

    @property
    def chunk_size(self) -> int:
        """Data bytes in every frame but the last."""
        return -(-self.total // self.count)

    def data_size(self, index: int) -> int:
        c = self.chunk_size
        return c if index < self.count - 1 else self.total - (self.count - 1) * c


def parse_header(frame: bytes) -> FrameHeader:
    """The header of `frame`, checked on its own (not against other frames): else ChunkError."""
    if len(frame) < HEADER_SIZE:
        raise ChunkError(f"frame of {len(frame)} bytes is shorter than the {HEADER_SIZE}-byte header")
    magic, version, mid, index, count, total, digest = _HEADER.unpack_from(frame)
    if magic != MAGIC:
        raise ChunkError(f"not a chunk frame (magic {magic!r})")
    if version != VERSION:
        raise ChunkError(f"unsupported chunk frame version {version}")
    h = FrameHeader(mid, index, count, total, digest)
    if count == 0 or index >= count:
        raise ChunkError(f"chunk index {index} out of range for count {count}")
    if (total == 0 and count != 1) or (total > 0 and (count > total or h.data_size(count - 1) <= 0)):
        raise ChunkError(f"chunk count {count} does not fit total length {total}")
    if len(frame) - HEADER_SIZE != h.data_size(index):
        raise ChunkError(f"chunk {index}/{count} carries {len(frame) - HEADER_SIZE} bytes, "
                         f"expected {h.data_size(index)}")
    return h


def split(payload: bytes, limit: int, message_id: bytes | None = None) -> list[bytes]:
    """Frames of `payload`, each at most `limit` bytes including the header.

    `message_id` (16 bytes) names the message; by default the first 16 bytes of its SHA-256,
    so resending the same payload reuses the id and receivers drop it as a duplicate.
    """
    payload = bytes(payload)
    if not isinstance(limit, int) or limit < HEADER_SIZE + 1:
        raise ChunkError(f"chunk limit {limit!r} is too small: at least {HEADER_SIZE + 1} bytes "
                         f"({HEADER_SIZE} of header + 1 of data)", reason="limit")
    digest = hashlib.sha256(payload).digest()
    mid = digest[:ID_SIZE] if message_id is None else bytes(message_id)
    if len(mid) != ID_SIZE:
        raise ChunkError(f"message id must be {ID_SIZE} bytes, got {len(mid)}", reason="limit")
    total = len(payload)
    count = max(1, -(-total // (limit - HEADER_SIZE)))
    if count > MAX_COUNT:
        raise ChunkError(f"{total} bytes need {count} chunks of {limit} bytes, more than 2^32 - 1",
                         reason="limit")
    c = -(-total // count)  # balanced sizes: see the module docstring
    return [_HEADER.pack(MAGIC, VERSION, mid, i, count, total, digest) + payload[i * c:(i + 1) * c]
            for i in range(count)]


@dataclass
class _Partial:
    header: FrameHeader
    cost: int                 # bytes reserved: the declared total plus one bit per frame
    # Frames as they arrive, index -> data. Not one buffer of the declared size: a lone forged
    # 69-byte frame may declare hundreds of MB, and memory should follow the bytes that came.
    frames: dict[int, bytes]
    touched: float


class Reassembler:
    """Rebuilds framed messages from frames in any order, per (source, message id).

    `add()` returns the verified message when its last missing frame arrives, None otherwise
    (more frames needed, or a duplicate). Bounds: at most `max_messages` incomplete messages
    and `max_bytes` buffered (the declared total is reserved on a message's first frame,
    checked before anything is kept; frames are stored as they come); the least recently active incomplete message is evicted to
    make room, and one idle for `ttl_s` (no frame since) expires. Idle rather than age
    because a large model over a slow link may legitimately take longer than `ttl_s`.
    Completed ids are remembered (the `remember` most recent) so late duplicates, e.g.
    retained model chunks redelivered on reconnect, return None instead of starting over.
    Thread-safe (one lock; paho calls handlers on its network thread).
    """

    def __init__(self, max_messages: int = 64, max_bytes: int = 256 * 1024 * 1024, ttl_s: float = 600.0,
                 clock: Callable[[], float] = time.monotonic, remember: int = 1024):
        if max_messages < 1 or max_bytes < 0 or ttl_s <= 0 or remember < 0:
            raise ValueError("Reassembler bounds must be positive")
        self.max_messages, self.max_bytes, self.ttl_s = max_messages, max_bytes, ttl_s
        self.clock, self.remember = clock, remember
        self.expired = self.evicted = self.completed = 0
        self.rejected: dict[str, int] = {}
        self.buffered_bytes = 0                                      # sum of reserved costs, <= max_bytes
        self._partials: OrderedDict[tuple, _Partial] = OrderedDict()  # least recently active first
        self._done: OrderedDict[tuple, bytes] = OrderedDict()         # key -> sha256, LRU
        self._lock = threading.Lock()

    @property
    def pending(self) -> int:
        """Incomplete messages held."""
        return len(self._partials)

    def add(self, frame: bytes, source: str = "") -> bytes | None:
        with self._lock:
            now = self.clock()
            self._expire(now)
            key = None
            try:
                h = parse_header(frame)
                key = (source, h.message_id)
                return self._add(key, h, frame, now)
            except ChunkError as exc:
                self.rejected[exc.reason] = self.rejected.get(exc.reason, 0) + 1
                if key is None and len(frame) >= HEADER_SIZE and frame[:4] == MAGIC:
                    key = (source, bytes(frame[5:5 + ID_SIZE]))  # a bad frame spoils its message too
                if key is not None:
                    self._drop(key)
                raise ChunkError(f"{exc} (source {source!r}, message "
                                 f"{key[1].hex()[:12] if key else '?'})", exc.reason) from None

    def _add(self, key: tuple, h: FrameHeader, frame: bytes, now: float) -> bytes | None:
        if self._done.get(key) == h.sha256:
            self._done.move_to_end(key)
            return None  # late duplicate of a delivered message
        p = self._partials.get(key)
        if p is None:
            p = self._start(key, h)
        else:
            o = p.header
            if (o.count, o.total, o.sha256) != (h.count, h.total, h.sha256):
                raise ChunkError(f"frame declares count {h.count}, total {h.total}, hash "
                                 f"{h.sha256.hex()[:12]} but earlier frames declared {o.count}, "
                                 f"{o.total}, {o.sha256.hex()[:12]}", "inconsistent")
        p.touched = now
        self._partials.move_to_end(key)
        if h.index in p.frames:
            return None
        p.frames[h.index] = bytes(memoryview(frame)[HEADER_SIZE:])
        if len(p.frames) < h.count:
            return None
        message = b"".join(p.frames[i] for i in range(h.count))
        self._drop(key)
        if hashlib.sha256(message).digest() != h.sha256:
            raise ChunkError("reassembled message does not match its SHA-256", "hash-mismatch")
        self.completed += 1
        self._done[key] = h.sha256
        while len(self._done) > self.remember:
            self._done.popitem(last=False)
        return message

    def _start(self, key: tuple, h: FrameHeader) -> _Partial:
        cost = h.total + (h.count + 7) // 8
        if cost > self.max_bytes:
            raise ChunkError(f"message of {h.total} bytes exceeds the {self.max_bytes}-byte limit", "oversize")
        # Make room first (least recently active first), then allocate: the budget is never exceeded.
        while self._partials and (len(self._partials) >= self.max_messages
                                  or self.buffered_bytes + cost > self.max_bytes):
            self._drop(next(iter(self._partials)))
            self.evicted += 1
        p = _Partial(h, cost, {}, self.clock())
        self._partials[key] = p
        self.buffered_bytes += cost
        return p

    def _drop(self, key: tuple) -> None:
        p = self._partials.pop(key, None)
        if p is not None:
            self.buffered_bytes -= p.cost

    def _expire(self, now: float) -> None:
        while self._partials:
            key, p = next(iter(self._partials.items()))
            if now - p.touched < self.ttl_s:
                break
            self._drop(key)
            self.expired += 1

    def expire(self) -> int:
        """Drop incomplete messages idle for `ttl_s`; returns how many."""
        with self._lock:
            before = self.expired
            self._expire(self.clock())
            return self.expired - before
