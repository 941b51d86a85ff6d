"""The workers' messages: what is encoded decodes to the same values; anything damaged is refused."""
from __future__ import annotations

import numpy as np
import pytest

from pqsu.protocol import partial as wire


def test_claim_grant_and_partial_round_trip():
    c = wire.Claim(7, 3, "w-0", "job-1", ("rpi4-s001-000001", "pi-β"))
    assert wire.decode_claim(wire.encode_claim(c)) == c
    g = wire.Grant(7, 3, "w-0", "job-1", bytes([wire.GRANTED, wire.TAKEN]))
    assert wire.decode_grant(wire.encode_grant(g)) == g
    p = wire.Partial(7, 4, "w-0", "job-1", "m1", True, 2, 2, 300.0, 1.25, 4096, {"corrupt": 1, "duplicate": 3},
                     np.linspace(-1, 1, 11, dtype=np.float32))
    q = wire.decode_partial(wire.encode_partial(p))
    assert (q.round, q.seq, q.worker, q.final, q.count, q.weight, q.refused) == (7, 4, "w-0", True, 2, 300.0, p.refused)
    assert q.sums.tobytes() == p.sums.tobytes()


def test_damaged_or_foreign_messages_are_refused():
    p = wire.encode_partial(wire.Partial(1, 1, "w", "j", "m", False, 1, 1, 5.0, 0.5, 10, {}, np.ones(4, np.float32)))
    for bad in (p[:-1], p[:10], b"PQCL" + p[4:], p[:-5] + bytes([p[-5] ^ 1]) + p[-4:], b""):
        with pytest.raises(wire.PartialError):
            wire.decode_partial(bad)
    inf = wire.Partial(1, 1, "w", "j", "m", False, 1, 1, 5.0, 0.5, 10, {}, np.array([np.inf], np.float32))
    with pytest.raises(wire.PartialError):
        wire.decode_partial(wire.encode_partial(inf))
    with pytest.raises(wire.PartialError):
        wire.decode_claim(wire.encode_grant(wire.Grant(1, 1, "w", "j", b"\x00")))
