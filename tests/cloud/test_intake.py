"""The round's checks and FedAvg through the batch fast path against the one-by-one path they replace:
the same verdicts, the same refusals by reason, the same aggregate up to float summation order."""
from __future__ import annotations

import numpy as np

from pqsu.cloud.intake import Round, RoundIntake
from pqsu.protocol.codec import Limits, TensorBlock, Update, encode
from pqsu.protocol.messages import RoundTask
from tests.protocol.test_update_batch import SHAPES, sparse_update


def intake(fast: bool, devices) -> RoundIntake:
    it = RoundIntake(SHAPES, Limits())
    it.fast = fast
    it.open(Round(RoundTask(round=3, model_id="m1"), tuple(sorted(devices)), 0.0))
    return it


def traffic(rng):
    """Valid updates, duplicates (in the same batch and later), garbage, a wrong model, a dense update."""
    devices = [f"d{i:03d}" for i in range(40)]
    items = [(encode(sparse_update(rng, d, 0.03)), d) for d in devices[:30]]
    items.insert(5, items[2])                                   # a duplicate inside the first batch
    items.append(items[7])                                      # one long after
    items.append((b"garbage", "d031"))
    items.append((encode(Update(3, "d032", "other-model", 5, 0.1, ())), "d032"))
    items.append((encode(Update(3, "d033", "m1", 5, 0.1, (TensorBlock.dense("fc.w", rng.normal(size=(10, 300))),))),
                  "d033"))
    items.append((items[9][0], "d034"))                          # names d009 on d034's topic
    return devices, items


def test_batches_give_the_verdicts_counts_and_aggregate_of_one_by_one():
    rng = np.random.default_rng(0)
    devices, items = traffic(rng)
    old = intake(False, devices)
    want = [old.submit(p, s) for p, s in items]
    new = intake(True, devices)
    got = []
    for j in range(0, len(items), 16):
        got += new.submit_many(items[j:j + 16])
    assert [(v.accepted, v.reason) for v in got] == [(v.accepted, v.reason) for v in want]
    assert new.round.rejected == old.round.rejected and new.round.rejected["duplicate"] == 2
    assert (new.round.uploads, new.round.bytes_up) == (old.round.uploads, old.round.bytes_up) == (31, new.round.bytes_up)
    a, b = old.aggregator.result(), new.aggregator.result()
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in SHAPES)
    assert worst <= 1e-6 * max(float(np.abs(a[k]).max()) for k in SHAPES)


def test_a_corrupt_update_in_a_batch_is_refused_alone():
    rng = np.random.default_rng(1)
    devices = [f"d{i}" for i in range(6)]
    items = [(encode(sparse_update(rng, d)), d) for d in devices]
    bad = bytearray(items[3][0])
    bad[-5] = 0x80  # int8 -128 (last value byte), CRC fixed: only the batch decode sees it
    import zlib
    bad[-4:] = zlib.crc32(bytes(bad[:-4])).to_bytes(4, "little")
    items[3] = (bytes(bad), "d3")
    it = intake(True, devices)
    verdicts = it.submit_many(items)
    assert [v.accepted for v in verdicts] == [True, True, True, False, True, True]
    assert verdicts[3].reason == "corrupt" and it.aggregator.count == 5
    items[3] = (encode(sparse_update(rng, "d3")), "d3")  # its device may still send a good one
    assert it.submit(*items[3]).accepted
