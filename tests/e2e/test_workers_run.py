"""`pqsu run --workers 2`: real agents publish under partitions, two `pqsu aggregator` processes fold their
updates, and the run gives the numbers of the same run with the coordinator reading every update itself."""
from __future__ import annotations

import json

import pytest

from tests.e2e.test_fleet import QUALITY, needs_fmnist, needs_mosquitto, pqsu_run
from tests.support.procs import flags

pytestmark = [needs_fmnist, needs_mosquitto]


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.long
def test_run_with_two_aggregator_workers_gives_the_numbers_of_the_coordinator_alone(tmp_path):
    args = flags(**{**QUALITY, "rounds": 2})
    alone = pqsu_run(tmp_path / "alone", args)
    workers = pqsu_run(tmp_path / "workers", args + ["--workers", "2"])
    assert alone.code == 0, alone.explain()
    assert workers.code == 0 and not workers.left_behind, workers.explain()
    a, w = _metrics(alone.out), _metrics(workers.out)
    keys = ("round", "uploads", "selected", "rejected", "missing", "bytes_up", "model_id")
    assert [{k: m[k] for k in keys} for m in w] == [{k: m[k] for k in keys} for m in a]
    for ma, mw in zip(a, w):  # the same model ids: the partial sums reduce to the same master, byte for byte
        assert mw["accuracy"] == pytest.approx(ma["accuracy"], abs=1e-9)
        assert mw["train_loss"] == pytest.approx(ma["train_loss"], rel=1e-6)
    logs = sorted((workers.out / "workers").glob("worker-*.log"))
    assert len(logs) == 2
    handed = sum(int(line.split("handed over ")[1].split()[0]) for p in logs for line in p.read_text().splitlines()
                 if "handed over" in line)
    assert handed == sum(m["uploads"] for m in w)
