"""Split a labelled data set among simulated clients: IID, Dirichlet label skew, McMahan shards.

Every partitioner returns one sorted int64 index array per client; the arrays are disjoint
and together cover every sample. Results depend only on the arguments and `seed`
(np.random.default_rng), so a run can be reproduced exactly. numpy only.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from pqsu.protocol.errors import PqsuError

__all__ = ["PartitionError", "SPEC_FORMS", "dirichlet", "iid", "label_histogram", "partition", "shards"]


class PartitionError(PqsuError):
    """A partition that cannot be made: bad spec, too many clients, impossible minimum size."""


SPEC_FORMS = "iid | dirichlet[:ALPHA] (ALPHA > 0, default 0.5) | shards[:K] (K >= 1 shards per client, default 2)"


def _labels(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise PartitionError(f"labels must be a 1-D integer array, got {arr.dtype} {arr.shape}")
    if arr.size and arr.min() < 0:
        raise PartitionError("labels must be non-negative class indices")
    return arr.astype(np.int64, copy=False)


def _check_clients(n_clients: int, n_samples: int) -> None:
    if isinstance(n_clients, bool) or not isinstance(n_clients, (int, np.integer)):
        raise PartitionError(f"n_clients must be an integer, got {n_clients!r}")
    if not 1 <= n_clients <= n_samples:
        raise PartitionError(f"n_clients must be between 1 and the number of samples ({n_samples}), "
                             f"got {n_clients}")


def _finish(parts: list[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def iid(labels: Sequence[int] | np.ndarray, n_clients: int, seed: int = 0) -> list[np.ndarray]:
    """Shuffle and deal: client sizes differ by at most one, label mix ~ the global one."""
    y = _labels(labels)
    _check_clients(n_clients, len(y))
    perm = np.random.default_rng(seed).permutation(len(y))
    return _finish(np.array_split(perm, n_clients))


def dirichlet(labels: Sequence[int] | np.ndarray, n_clients: int, alpha: float = 0.5,
              seed: int = 0, min_size: int = 1, max_tries: int = 100) -> list[np.ndarray]:
    """Label skew: for each class, client shares ~ Dir(alpha) (Hsu et al. 2019).

    Small alpha -> each client sees few classes; large alpha -> close to IID. Draws are
    repeated (up to `max_tries`) until every client holds at least `min_size` samples; if
    that never happens (tiny alpha, many clients) the smallest clients are topped up with
    random samples taken from the largest, which keeps the skew of everyone else intact.
    """
    y = _labels(labels)
    _check_clients(n_clients, len(y))
    if not (isinstance(alpha, (int, float, np.floating)) and math.isfinite(alpha) and alpha > 0):
        raise PartitionError(f"dirichlet alpha must be a finite number > 0, got {alpha!r}")
    if min_size < 0 or n_clients * min_size > len(y):
        raise PartitionError(f"cannot give {n_clients} clients at least {min_size} samples each "
                             f"from {len(y)} samples")
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    for _ in range(max(1, max_tries)):
        buckets: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
        for idx in by_class:
            idx = rng.permutation(idx)
            share = rng.dirichlet(np.full(n_clients, float(alpha)))
            cuts = np.round(np.cumsum(share)[:-1] * len(idx)).astype(np.int64)
            for client, piece in enumerate(np.split(idx, cuts)):
                buckets[client].append(piece)
        parts = [np.concatenate(b) for b in buckets]
        if min(len(p) for p in parts) >= min_size:
            return _finish(parts)
    return _finish(_top_up(parts, min_size, rng))


def _top_up(parts: list[np.ndarray], min_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Move random samples from the largest clients to those below `min_size`."""
    parts = list(parts)
    while True:
        sizes = np.array([len(p) for p in parts])
        small = int(np.argmin(sizes))
        if sizes[small] >= min_size:
            return parts
        big = int(np.argmax(sizes))  # holds > min_size, since the total is >= n_clients * min_size
        moved = min(min_size - sizes[small], sizes[big] - min_size)
        donor = rng.permutation(parts[big])
        parts[small] = np.concatenate([parts[small], donor[:moved]])
        parts[big] = donor[moved:]


def shards(labels: Sequence[int] | np.ndarray, n_clients: int, shards_per_client: int = 2,
           seed: int = 0) -> list[np.ndarray]:
    """McMahan et al. 2017 pathological non-IID: sort by label, cut n*k equal shards, deal k each.

    With balanced classes and n*k a multiple of the class count, each client sees at most k labels.
    """
    y = _labels(labels)
    _check_clients(n_clients, len(y))
    k = shards_per_client
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise PartitionError(f"shards_per_client must be an integer >= 1, got {k!r}")
    if n_clients * k > len(y):
        raise PartitionError(f"{n_clients} clients x {k} shards = {n_clients * k} shards, "
                             f"more than the {len(y)} samples")
    rng = np.random.default_rng(seed)
    # Shuffle first so the order inside each class (and thus each shard's content) depends on seed.
    perm = rng.permutation(len(y))
    ordered = perm[np.argsort(y[perm], kind="stable")]
    pieces = np.array_split(ordered, n_clients * k)
    deal = rng.permutation(n_clients * k).reshape(n_clients, k)
    return _finish([np.concatenate([pieces[s] for s in row]) for row in deal])


def _parse_spec(spec: str) -> tuple[str, float | int | None]:
    kind, colon, arg = spec.strip().lower().partition(":")
    kind, arg = kind.strip(), arg.strip()
    bad = PartitionError(f"bad partition spec {spec!r}; accepted forms: {SPEC_FORMS}")
    if colon and not arg:  # "dirichlet:" is a forgotten value, not a request for the default
        raise bad
    if kind == "iid" and not colon:
        return kind, None
    try:
        if kind == "dirichlet":
            alpha = float(arg) if arg else 0.5
            if not (math.isfinite(alpha) and alpha > 0):
                raise ValueError
            return kind, alpha
        if kind == "shards":
            k = int(arg) if arg else 2
            if k < 1:
                raise ValueError
            return kind, k
    except ValueError:
        raise bad from None
    raise bad


def partition(spec: str, labels: Sequence[int] | np.ndarray, n_clients: int,
              seed: int = 0) -> list[np.ndarray]:
    """Partition by a spec string: "iid", "dirichlet", "dirichlet:0.1", "shards", "shards:2"."""
    if not isinstance(spec, str):
        raise PartitionError(f"partition spec must be a string ({SPEC_FORMS}), got {spec!r}")
    kind, arg = _parse_spec(spec)
    if kind == "iid":
        return iid(labels, n_clients, seed)
    if kind == "dirichlet":
        return dirichlet(labels, n_clients, alpha=float(arg), seed=seed)  # type: ignore[arg-type]
    return shards(labels, n_clients, shards_per_client=int(arg), seed=seed)  # type: ignore[arg-type]


def label_histogram(labels: Sequence[int] | np.ndarray, parts: Sequence[np.ndarray],
                    num_classes: int | None = None) -> np.ndarray:
    """(n_clients, num_classes) int64 sample counts per client and class, for reports."""
    y = _labels(labels)
    n = int(num_classes) if num_classes is not None else (int(y.max()) + 1 if y.size else 0)
    if y.size and y.max() >= n:
        raise PartitionError(f"label {int(y.max())} does not fit num_classes={n}")
    hist = np.zeros((len(parts), n), dtype=np.int64)
    for i, p in enumerate(parts):
        hist[i] = np.bincount(y[np.asarray(p, dtype=np.int64)], minlength=n)
    return hist


def federated_split(labels: np.ndarray, proxy_samples: int, clients: int, spec: str, seed: int = 0,
                    samples_per_client: int | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """(proxy indices, per-client indices) of a training set: the cloud's proxy split is taken
    first from a seeded permutation, the rest is partitioned among the clients by `spec`.

    Every driver of a federated run (in-process, MQTT) splits through here, so the same seed
    gives every device the same data whichever way the run travels.
    """
    order = np.random.default_rng(seed).permutation(len(labels))
    proxy, pool = order[:proxy_samples], order[proxy_samples:]
    parts = [pool[p] for p in partition(spec, np.asarray(labels)[pool], clients, seed=seed)]
    if samples_per_client:
        parts = [p[:samples_per_client] for p in parts]
    return np.sort(proxy), [np.sort(p) for p in parts]
