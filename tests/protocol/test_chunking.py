import hashlib
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pqsu.protocol.chunking import HEADER_SIZE, MAGIC, ChunkError, Reassembler, parse_header, split
from pqsu.protocol.errors import PqsuError

KB = 1024


def reassemble(frames, r=None, source=""):
    r = r or Reassembler()
    out = [m for f in frames if (m := r.add(f, source)) is not None]
    assert len(out) == 1
    return out[0]


def forge(payload_or_fields, **override):
    """A frame with header fields overridden (data taken from `data`, default empty)."""
    f = dict(magic=MAGIC, version=1, mid=b"m" * 16, index=0, count=1, total=0,
             sha=hashlib.sha256(b"").digest(), data=b"")
    f.update(payload_or_fields, **override)
    return struct.pack("<4sB16sIIQ32s", f["magic"], f["version"], f["mid"], f["index"], f["count"], f["total"],
                       f["sha"]) + f["data"]


def test_header_layout_is_byte_exact():
    payload = b"hello world"
    [frame] = split(payload, 1000, message_id=bytes(range(16)))
    assert HEADER_SIZE == 69
    assert frame[:4] == b"PQCK" and frame[4] == 1
    assert frame[5:21] == bytes(range(16))
    assert frame[21:25] == b"\x00\x00\x00\x00"               # index 0
    assert frame[25:29] == b"\x01\x00\x00\x00"               # count 1
    assert frame[29:37] == (11).to_bytes(8, "little")         # total length
    assert frame[37:69] == hashlib.sha256(payload).digest()
    assert frame[69:] == payload


def test_default_message_id_is_hash_prefix():
    frames = split(b"abc", 100)
    assert parse_header(frames[0]).message_id == hashlib.sha256(b"abc").digest()[:16]


@pytest.mark.parametrize("size,limit,count", [
    (0, HEADER_SIZE + 1, 1),
    (1, HEADER_SIZE + 1, 1),
    (100, HEADER_SIZE + 100, 1),       # exactly at the limit
    (101, HEADER_SIZE + 100, 2),       # one byte over
    (200, HEADER_SIZE + 100, 2),
    (201, HEADER_SIZE + 100, 3),
    (5 * 1024 * 1024, 128 * KB, 41),
])
def test_round_trip(size, limit, count):
    payload = random.Random(size).randbytes(size)
    frames = split(payload, limit)
    assert len(frames) == count
    assert all(len(f) <= limit for f in frames)
    assert reassemble(frames) == payload


def test_empty_payload_is_one_frame():
    [frame] = split(b"", 128 * KB)
    assert len(frame) == HEADER_SIZE
    assert Reassembler().add(frame) == b""


def test_balanced_chunk_sizes():
    # 10 bytes at 6 per frame: two frames of 5, not 6 + 4 (every frame but the last holds ceil(total/count))
    frames = split(b"0123456789", HEADER_SIZE + 6)
    assert [len(f) - HEADER_SIZE for f in frames] == [5, 5]
    frames = split(bytes(10), HEADER_SIZE + 3)
    assert [len(f) - HEADER_SIZE for f in frames] == [3, 3, 3, 1]


def test_random_order_and_duplicates():
    payload = random.Random(1).randbytes(50_000)
    frames = split(payload, 1000)
    rng = random.Random(2)
    stream = frames + rng.sample(frames, 20)
    rng.shuffle(stream)
    r = Reassembler()
    results = [r.add(f) for f in stream]
    done = [m for m in results if m is not None]
    assert done == [payload]
    assert r.completed == 1 and r.pending == 0 and r.buffered_bytes == 0


def test_interleaved_sources_and_messages():
    rng = random.Random(3)
    a, b = rng.randbytes(10_000), rng.randbytes(7_000)
    fa, fb = split(a, 700), split(b, 900)
    # the same message from two devices (same id) must not mix either
    stream = [("d1", f) for f in fa] + [("d2", f) for f in fb] + [("d3", f) for f in fa]
    rng.shuffle(stream)
    r = Reassembler()
    got = {}
    for src, f in stream:
        m = r.add(f, source=src)
        if m is not None:
            assert src not in got
            got[src] = m
    assert got == {"d1": a, "d2": b, "d3": a}


def test_late_duplicates_after_completion_ignored():
    payload = bytes(range(256)) * 10
    frames = split(payload, 300)
    r = Reassembler()
    assert reassemble(frames, r) == payload
    for f in frames:                      # e.g. retained model chunks redelivered on reconnect
        assert r.add(f) is None
    assert r.pending == 0 and r.completed == 1
    assert r.add(frames[0], source="other") is None and r.pending == 1  # another source is another message


def test_completed_memory_is_bounded():
    r = Reassembler(remember=2)
    payloads = [bytes([i]) * 10 for i in range(3)]
    for p in payloads:
        assert r.add(split(p, 100)[0]) == p
    assert r.add(split(payloads[2], 100)[0]) is None     # remembered
    assert r.add(split(payloads[0], 100)[0]) == payloads[0]  # forgotten (LRU of 2): delivered again


# -- errors -------------------------------------------------------------------------------

def rejected(r, frame, reason, source=""):
    with pytest.raises(ChunkError) as e:
        r.add(frame, source)
    assert e.value.reason == reason
    assert isinstance(e.value, PqsuError)
    return e.value


@pytest.mark.parametrize("frame", [
    b"",
    b"PQCK",
    b"XXXX" + bytes(65),                                   # bad magic
    forge({}, version=2),                                  # unknown version
    forge({}, count=0),
    forge({}, index=1, count=1),                           # index out of range
    forge({}, index=5, count=3, total=10, data=b"x"),
    forge({}, total=0, count=2),                           # an empty message is one frame
    forge({}, total=3, count=4, data=b"x"),                # more frames than bytes
    forge({}, total=10, count=6, data=b"xx"),              # last frame would be empty
    forge({}, total=10, count=2, data=b"1234"),            # 4 bytes where 5 are due
    forge({}, total=10, count=2, data=b"123456"),
    forge({}, total=0, count=1, data=b"x"),                # trailing data
])
def test_malformed(frame):
    r = Reassembler()
    rejected(r, frame, "malformed")
    assert r.rejected == {"malformed": 1} and r.pending == 0


def test_malformed_frame_drops_its_partial():
    frames = split(bytes(1000), 300)
    r = Reassembler()
    assert r.add(frames[0]) is None and r.pending == 1
    rejected(r, frames[1][:-1], "malformed")              # truncated frame of the same message
    assert r.pending == 0 and r.buffered_bytes == 0


def test_oversize():
    r = Reassembler(max_bytes=1000)
    rejected(r, split(bytes(1001), 500)[0], "oversize")
    # the declared total is checked on the first frame, before any allocation
    rejected(r, forge({}, total=2**63, count=1), "malformed")   # data size mismatch caught first
    rejected(r, forge({}, total=2**40, count=2**24, data=bytes(2**16)), "oversize")  # a valid 1 TiB header
    assert r.buffered_bytes == 0 and r.rejected == {"oversize": 2, "malformed": 1}


@pytest.mark.parametrize("change", [
    dict(count=4, data=bytes(250)),                        # each valid alone (4 x 250 = 1000) ...
    dict(total=1001, data=bytes(201)),                     # (5 frames of 201, the last 197)
    dict(sha=b"\x01" * 32),
])
def test_inconsistent(change):
    payload = bytes(1000)
    frames = split(payload, 300)  # 5 frames of 200
    assert len(frames) == 5
    r = Reassembler()
    assert r.add(frames[0]) is None
    h = parse_header(frames[1])
    fields = dict(mid=h.message_id, index=1, count=h.count, total=h.total, sha=h.sha256, data=frames[1][69:])
    rejected(r, forge({**fields, **change}), "inconsistent")  # ... but not with frame 0
    assert r.pending == 0 and r.buffered_bytes == 0
    # the message can still arrive afterwards, from scratch
    assert reassemble(frames, r) == payload


def test_hash_mismatch():
    payload = bytes(range(200))
    frames = split(payload, 120)
    bad = bytearray(frames[1])
    bad[-1] ^= 0xFF
    r = Reassembler()
    assert all(r.add(f) is None for f in frames[:1] + frames[2:])
    e = rejected(r, bytes(bad), "hash-mismatch")
    assert "SHA-256" in str(e)
    assert r.pending == 0 and r.completed == 0 and r.buffered_bytes == 0
    assert reassemble(frames, r) == payload               # not remembered as done: a good copy still works


def test_limit_too_small():
    with pytest.raises(ChunkError, match="too small"):
        split(b"x", HEADER_SIZE)
    with pytest.raises(ChunkError):
        split(b"x", 1000, message_id=b"short")
    assert len(split(b"xy", HEADER_SIZE + 1)) == 2


# -- memory bounds and expiry ---------------------------------------------------------------

def test_budget_evicts_least_recently_active():
    r = Reassembler(max_bytes=2500)
    a, b, c = (split(bytes([i]) * 1000, HEADER_SIZE + 334) for i in range(3))   # 3 frames each
    assert len(a) == 3
    assert r.add(a[0]) is None
    assert r.add(b[0]) is None
    assert r.add(a[1]) is None                      # a is now more recent than b
    assert r.buffered_bytes <= 2500
    assert r.add(c[0]) is None                      # needs room: b goes
    assert r.evicted == 1 and r.pending == 2 and r.buffered_bytes <= 2500
    assert r.add(a[2]) == bytes([0]) * 1000
    assert r.add(b[1]) is None                      # b starts over
    assert r.buffered_bytes <= 2500


def test_max_messages_evicts_oldest():
    r = Reassembler(max_messages=2)
    msgs = [split(bytes([i]) * 100, HEADER_SIZE + 34) for i in range(3)]  # 3 frames each
    for m in msgs:
        assert r.add(m[0]) is None
    assert r.pending == 2 and r.evicted == 1
    assert r.add(msgs[0][1]) is None and r.add(msgs[0][2]) is None  # msg 0 was evicted: incomplete again
    assert r.pending == 2 and r.evicted == 2


def test_budget_never_exceeded_under_flood():
    rng = random.Random(5)
    r = Reassembler(max_messages=8, max_bytes=64 * KB)
    for i in range(300):
        p = rng.randbytes(rng.randrange(1, 20 * KB))
        f = rng.choice(split(p, 1000))
        try:
            r.add(f, source=f"d{i % 7}")
        except ChunkError:
            pass
        assert r.buffered_bytes <= 64 * KB and r.pending <= 8
    assert r.evicted > 0


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_ttl_expiry():
    clock = FakeClock()
    r = Reassembler(ttl_s=60, clock=clock)
    a, b = split(bytes(300), HEADER_SIZE + 150), split(bytes([1]) * 300, HEADER_SIZE + 150)  # 2 frames each
    assert r.add(a[0]) is None
    clock.t += 30
    assert r.add(b[0]) is None
    clock.t += 31                                   # a idle 61 s, b 31 s
    assert r.expire() == 1 and r.pending == 1 and r.expired == 1
    assert r.add(a[1]) is None                      # a's first half is gone: starts over
    clock.t += 59
    assert r.add(b[1]) is None                      # expiry on add: b idle 90 s, expired before this frame
    assert r.expired == 2
    assert r.add(a[0]) == bytes(300)                # a restarted (a[1]) 59 s ago: still there, completes
    assert r.pending == 1 and r.buffered_bytes == 300 + 1   # b's reservation: 300 bytes + 1 bit per frame, rounded up
    clock.t += 60
    assert r.expire() == 1 and r.buffered_bytes == 0 and r.expired == 3


def test_ttl_counts_idle_time_not_age():
    clock = FakeClock()
    r = Reassembler(ttl_s=60, clock=clock)
    frames = split(bytes(1000), 100)               # 11 frames, one every 50 s: 500 s in all
    out = None
    for f in frames:
        out = r.add(f)
        clock.t += 50
    assert out == bytes(1000) and r.expired == 0


# -- property ---------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(payload=st.binary(max_size=3000), extra=st.integers(1, 400), data=st.data())
def test_property_any_payload_limit_order(payload, extra, data):
    frames = split(payload, HEADER_SIZE + extra)
    assert all(len(f) <= HEADER_SIZE + extra for f in frames)
    order = data.draw(st.permutations(frames))
    dups = data.draw(st.lists(st.sampled_from(frames), max_size=5))
    r = Reassembler()
    out = [m for f in list(order) + dups if (m := r.add(f)) is not None]
    assert out == [payload]
