"""Aggregation: many decoded updates in, one model delta out, then a server step.

`FedAvg` streams: each update is added into one float32 accumulator per tensor as it
arrives and then dropped, so memory is O(model size) however many devices report; a
sparse update touches only its entries. The robust aggregators (`Median`,
`TrimmedMean`) need every value of a coordinate at once, so they hold the round's
updates densely: O(updates x model). Norm clipping (`clip_norm`) works with all three.

The server step (`ServerOptimizer`) applies the aggregated delta to the fp32 master
weights with a server learning rate and optional momentum (FedAvgM).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from pqsu.protocol.codec import Update
from pqsu.protocol.errors import PqsuError


class AggregationError(PqsuError):
    """A bad aggregator name or option."""


def update_norm(update: Update) -> float:
    """L2 norm of the dequantized update, computed from the sent entries only."""
    total = 0.0
    for b in update.blocks:
        if b.kind == "skip" or b.q is None:
            continue
        if b.kind == "sparse":
            total += float(np.sum(np.square(b.q.astype(np.float32) * b.scale[0])))
        else:
            total += float(np.sum(np.square(b.dequantize())))
    return math.sqrt(total)


@dataclass
class FedAvg:
    """Sample-weighted mean of the updates, streamed into O(model) memory."""

    shapes: dict[str, tuple[int, ...]]
    clip_norm: float | None = None
    count: int = 0
    weight: float = 0.0
    _acc: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._acc = {k: np.zeros(s, np.float32) for k, s in self.shapes.items()}

    def add(self, update: Update) -> None:
        w = float(update.num_samples) * _clip_factor(update, self.clip_norm)
        for b in update.blocks:
            b.add_to(self._acc[b.name], w)
        self.count += 1
        self.weight += float(update.num_samples)

    def result(self) -> dict[str, np.ndarray] | None:
        if self.count == 0 or self.weight <= 0:
            return None
        return {k: v / self.weight for k, v in self._acc.items()}


@dataclass
class _Holding(ABC):
    """Keeps every update densely; subclasses reduce them coordinate-wise."""

    shapes: dict[str, tuple[int, ...]]
    clip_norm: float | None = None
    count: int = 0
    _held: list[dict[str, np.ndarray]] = field(default_factory=list, repr=False)

    def add(self, update: Update) -> None:
        factor = _clip_factor(update, self.clip_norm)
        dense = {k: np.zeros(s, np.float32) for k, s in self.shapes.items()}
        for b in update.blocks:
            b.add_to(dense[b.name], factor)
        self._held.append(dense)
        self.count += 1

    def result(self) -> dict[str, np.ndarray] | None:
        if not self._held:
            return None
        return {k: self._reduce(np.stack([h[k] for h in self._held])) for k in self.shapes}

    @abstractmethod
    def _reduce(self, stacked: np.ndarray) -> np.ndarray:
        """Reduce (updates, *shape) to (*shape)."""


@dataclass
class Median(_Holding):
    """Coordinate-wise median: robust to a minority of arbitrary updates."""

    def _reduce(self, stacked: np.ndarray) -> np.ndarray:
        return np.median(stacked, axis=0).astype(np.float32)


@dataclass
class TrimmedMean(_Holding):
    """Coordinate-wise mean after dropping the `trim` fraction of largest and smallest values."""

    trim: float = 0.1

    def _reduce(self, stacked: np.ndarray) -> np.ndarray:
        k = int(self.trim * len(stacked))
        if k == 0 or len(stacked) - 2 * k < 1:
            return stacked.mean(axis=0).astype(np.float32)
        return np.sort(stacked, axis=0)[k:len(stacked) - k].mean(axis=0).astype(np.float32)


def _clip_factor(update: Update, clip_norm: float | None) -> float:
    if clip_norm is None:
        return 1.0
    norm = update_norm(update)
    return 1.0 if norm <= clip_norm or norm == 0 else clip_norm / norm


def make_aggregator(spec: str, shapes: dict[str, tuple[int, ...]], clip_norm: float | None = None):
    """`fedavg`, `median` or `trimmed:FRACTION` (e.g. trimmed:0.1)."""
    name, _, arg = spec.partition(":")
    if name == "fedavg" and not arg:
        return FedAvg(shapes, clip_norm)
    if name == "median" and not arg:
        return Median(shapes, clip_norm)
    if name == "trimmed":
        try:
            trim = float(arg or "0.1")
        except ValueError:
            trim = -1.0
        if not 0 <= trim < 0.5:
            raise AggregationError(f"trimmed mean needs a fraction in [0, 0.5), got {arg!r}")
        return TrimmedMean(shapes, clip_norm, trim=trim)
    raise AggregationError(f"unknown aggregator {spec!r}; use fedavg, median or trimmed:FRACTION")


@dataclass
class ServerOptimizer:
    """master += lr * v, with v = momentum * v + delta (FedAvgM); plain FedAvg is lr=1, momentum=0."""

    lr: float = 1.0
    momentum: float = 0.0
    velocity: dict[str, np.ndarray] = field(default_factory=dict)

    def step(self, master: dict[str, np.ndarray], delta: dict[str, np.ndarray]) -> None:
        """Update `master` in place. Non-finite results are refused before anything is written."""
        if self.momentum:
            new_v = {k: self.momentum * self.velocity.get(k, 0.0) + d for k, d in delta.items()}
        else:
            new_v = delta
        new_w = {k: master[k] + self.lr * v for k, v in new_v.items()}
        if not all(np.isfinite(w).all() for w in new_w.values()):
            raise AggregationError("aggregated update is not finite; the master model is left unchanged")
        for k, w in new_w.items():
            master[k][...] = w
        if self.momentum:
            self.velocity = {k: np.asarray(v, np.float32) for k, v in new_v.items()}
