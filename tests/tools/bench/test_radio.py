"""The radio model: exact round times from bytes, rates and compute; time to a target accuracy."""
from __future__ import annotations

import math

import numpy as np
import pytest

from pqsu.tools.bench import radio

NB = radio.PROFILES["nbiot"]


def test_profiles_are_the_documented_rates():
    assert (NB.up_bps, NB.down_bps) == (62_500.0, 26_200.0)
    assert radio.PROFILES["ltem"].up_bps == radio.PROFILES["ltem"].down_bps == 1_000_000.0
    assert radio.PROFILES["wifi"].up_bps == 20_000_000.0


def test_transfer_is_bits_over_rate():
    assert radio.transfer_seconds(1000, 8000.0) == 1.0
    assert radio.transfer_seconds(0, 8000.0) == 0.0


def test_device_round_is_compute_plus_down_plus_up_at_its_own_rate():
    # 3,275 B at 26.2 kbit/s is 1 s down; 15,625 B at 62.5 kbit/s is 2 s up
    part = radio.DeviceRound(compute_s=1.5, bytes_down=3275, bytes_up=15625)
    assert radio.device_seconds(part, NB) == pytest.approx(4.5, abs=1e-12)
    # twice the rate halves both transfers; three times the compute factor triples compute
    assert radio.device_seconds(part, NB, radio.DeviceFactors(rate=2.0, compute=3.0)) == pytest.approx(6.0, abs=1e-12)
    assert radio.device_seconds(radio.DeviceRound(1.5, 3275, 0), NB) == pytest.approx(2.5, abs=1e-12)  # skipped upload


def test_round_waits_for_the_slowest_device():
    parts = {"a": radio.DeviceRound(1.0, 3275, 0), "b": radio.DeviceRound(0.5, 3275, 15625)}
    assert radio.round_seconds(parts, NB) == pytest.approx(3.5, abs=1e-12)
    slow_a = {"a": radio.DeviceFactors(0.5, 1.0), "b": radio.DeviceFactors(1.0, 1.0)}
    assert radio.round_seconds(parts, NB, slow_a) == pytest.approx(3.5, abs=1e-12)  # a: 1 + 2 = 3 < b: 3.5
    slow_a["a"] = radio.DeviceFactors(0.25, 1.0)
    assert radio.round_seconds(parts, NB, slow_a) == pytest.approx(5.0, abs=1e-12)  # a: 1 + 4
    assert radio.round_seconds({}, NB) == 0.0


def test_time_to_target_sums_rounds_up_to_the_first_one_reaching_it():
    acc, times = [0.5, 0.71, 0.65, 0.8], [10.0, 20.0, 30.0, 40.0]
    assert radio.rounds_to_target(acc, 0.7) == 2
    assert radio.time_to_target(times, acc, 0.7) == 30.0
    assert radio.time_to_target(times, acc, 0.8) == 100.0
    assert radio.rounds_to_target(acc, 0.9) is None and radio.time_to_target(times, acc, 0.9) is None
    assert radio.cumulative(times) == [10.0, 30.0, 60.0, 100.0]


def test_device_factors_are_seeded_per_device_and_log_normal_with_median_one():
    ids = [f"dev-{i:04d}" for i in range(4000)]
    f = radio.device_factors(ids, seed=3)
    assert radio.device_factors(ids[:5], seed=3) == {d: f[d] for d in ids[:5]}  # independent of the others
    assert radio.device_factors(ids[:5], seed=4) != {d: f[d] for d in ids[:5]}
    log_rate = np.log([f[d].rate for d in ids])
    log_compute = np.log([f[d].compute for d in ids])
    assert abs(np.median(log_rate)) < 0.03 and abs(np.std(log_rate) - 0.5) < 0.03
    assert abs(np.median(log_compute)) < 0.02 and abs(np.std(log_compute) - 0.3) < 0.02
    flat = radio.device_factors(ids[:3], seed=3, rate_sigma=0.0, compute_sigma=0.0)
    assert all(math.isclose(v.rate, 1.0) and math.isclose(v.compute, 1.0) for v in flat.values())
