"""Client partitioners: disjoint, covering, seeded, and skewed the way their parameters say."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytest

from pqsu.export.partition import (PartitionError, dirichlet, iid, label_histogram, partition,
                                   shards)
from pqsu.protocol.errors import PqsuError

Parts = list[np.ndarray]


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    """6000 samples, 10 balanced classes, shuffled (like a small Fashion-MNIST)."""
    return np.random.default_rng(123).permutation(np.repeat(np.arange(10), 600))


def check_valid(parts: Parts, n_samples: int, n_clients: int) -> None:
    assert len(parts) == n_clients
    for p in parts:
        assert p.dtype == np.int64 and p.ndim == 1
        assert np.all(np.diff(p) > 0), "indices sorted and unique within a client"
    merged = np.concatenate(parts)
    assert len(merged) == n_samples, "disjoint"
    np.testing.assert_array_equal(np.sort(merged), np.arange(n_samples))  # covering


def same(a: Parts, b: Parts) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def mean_entropy(labels: np.ndarray, parts: Parts) -> float:
    """Average per-client label entropy in bits: low = skewed, log2(10) = uniform."""
    hist = label_histogram(labels, parts, 10).astype(float)
    p = hist / hist.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.nansum(np.where(p > 0, p * np.log2(p), 0.0), axis=1)
    return float(ent.mean())


SPECS = ["iid", "dirichlet", "dirichlet:0.1", "dirichlet:10", "shards", "shards:3"]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("n_clients", [1, 7, 50])
def test_disjoint_covering_deterministic(labels: np.ndarray, spec: str, n_clients: int) -> None:
    a = partition(spec, labels, n_clients, seed=0)
    check_valid(a, len(labels), n_clients)
    assert same(a, partition(spec, labels, n_clients, seed=0))
    if n_clients > 1:
        assert not same(a, partition(spec, labels, n_clients, seed=1))


@pytest.mark.parametrize("fn", [
    lambda y, n, s: iid(y, n, seed=s),
    lambda y, n, s: dirichlet(y, n, alpha=0.3, seed=s),
    lambda y, n, s: shards(y, n, shards_per_client=2, seed=s),
])
def test_direct_calls_on_imbalanced_labels(fn: Callable[[np.ndarray, int, int], Parts]) -> None:
    y = np.random.default_rng(5).choice(4, size=997, p=[0.7, 0.2, 0.07, 0.03])
    check_valid(fn(y, 13, 0), len(y), 13)
    assert same(fn(list(y), 13, 4), fn(y, 13, 4))  # plain lists work too


def test_iid_balanced(labels: np.ndarray) -> None:
    parts = iid(labels, 7, seed=3)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert mean_entropy(labels, parts) > 3.2  # close to log2(10) = 3.32


def test_dirichlet_small_alpha_more_skewed(labels: np.ndarray) -> None:
    ent = {a: np.mean([mean_entropy(labels, dirichlet(labels, 20, a, seed=s)) for s in range(3)])
           for a in (0.05, 0.5, 100.0)}
    assert ent[0.05] < ent[0.5] < ent[100.0]
    assert ent[0.05] < 1.5 and ent[100.0] > 3.2


def test_dirichlet_min_size_by_resampling_and_top_up(labels: np.ndarray) -> None:
    for kwargs in ({}, {"max_tries": 1}):  # max_tries=1 forces the top-up repair
        parts = dirichlet(labels, 100, alpha=0.01, seed=7, min_size=30, **kwargs)
        check_valid(parts, len(labels), 100)
        assert min(len(p) for p in parts) >= 30
    assert same(partition("dirichlet", labels, 9, seed=2), dirichlet(labels, 9, 0.5, seed=2))
    with pytest.raises(PartitionError, match="at least"):
        dirichlet(labels, 100, 0.5, min_size=61)
    with pytest.raises(PartitionError, match="alpha"):
        dirichlet(labels, 10, alpha=0.0)


def test_shards_give_k_labels(labels: np.ndarray) -> None:
    for k in (1, 2, 3):
        parts = shards(labels, 100, shards_per_client=k, seed=0)
        classes_per_client = (label_histogram(labels, parts, 10) > 0).sum(axis=1)
        assert classes_per_client.max() <= k + 1 and classes_per_client.mean() <= k + 0.3
        assert {len(p) for p in parts} == {60}  # 6000 samples / 100 clients, whatever k
    # 200 shards of 30 from 6000 samples: 20 shards per class, so never more than 2 labels.
    parts = shards(labels, 100, 2, seed=9)
    assert ((label_histogram(labels, parts, 10) > 0).sum(axis=1) <= 2).all()
    with pytest.raises(PartitionError, match="shards"):
        shards(labels, 4000, 2)


@pytest.mark.parametrize("spec", ["", "foo", "IID:2", "dirichlet:", "dirichlet:0", "dirichlet:-1",
                                  "dirichlet:abc", "dirichlet:nan", "dirichlet:inf", "shards:0",
                                  "shards:1.5", "shards:x", "dirichlet:0.5:1", "shard:2", "shards:"])
def test_bad_spec_lists_forms(labels: np.ndarray, spec: str) -> None:
    with pytest.raises(PartitionError) as err:
        partition(spec, labels, 5)
    assert "iid" in str(err.value) and "dirichlet[:ALPHA]" in str(err.value) and "shards[:K]" in str(err.value)


def test_spec_is_forgiving_about_case_and_spaces(labels: np.ndarray) -> None:
    assert same(partition(" Dirichlet : 0.3 ", labels, 5, seed=1), dirichlet(labels, 5, 0.3, seed=1))
    assert same(partition("SHARDS:2", labels, 5, seed=1), shards(labels, 5, 2, seed=1))


@pytest.mark.parametrize("n_clients", [0, -1, 6001, 2.5, True])
def test_bad_client_count(labels: np.ndarray, n_clients: object) -> None:
    for spec in ("iid", "dirichlet", "shards:1"):
        with pytest.raises(PartitionError, match="n_clients"):
            partition(spec, labels, n_clients)  # type: ignore[arg-type]
    assert issubclass(PartitionError, PqsuError)


def test_bad_labels() -> None:
    with pytest.raises(PartitionError):
        iid(np.zeros((3, 2), int), 2)
    with pytest.raises(PartitionError):
        iid(np.array([0.5, 1.5]), 1)
    with pytest.raises(PartitionError):
        iid(np.array([-1, 0]), 1)


def test_label_histogram(labels: np.ndarray) -> None:
    parts = partition("dirichlet:0.2", labels, 8, seed=0)
    hist = label_histogram(labels, parts, 10)
    assert hist.shape == (8, 10) and hist.dtype == np.int64
    np.testing.assert_array_equal(hist.sum(axis=0), np.bincount(labels))
    np.testing.assert_array_equal(hist.sum(axis=1), [len(p) for p in parts])
    assert label_histogram(labels, parts).shape == (8, 10)  # num_classes inferred
    with pytest.raises(PartitionError):
        label_histogram(labels, parts, 5)
