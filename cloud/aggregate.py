"""Aggregation: many decoded updates in, one model delta out, then a server step.

`FedAvg` streams: each update is added into one float32 accumulator per tensor as it
arrives and then dropped, so memory is O(model size) however many devices report; a
sparse update touches only its entries. The robust aggregators (`Median`,
`TrimmedMean`) need every value of a coordinate at once, so they hold the round's
updates densely: O(updates x model). Norm clipping (`clip_norm`) works with all three:
an absolute bound, or `median:F`, F times the median norm of the round's updates.

With sparse top-k updates most coordinates are sent by one or two devices of ten. The
robust aggregators therefore reduce each coordinate over the devices that sent it (an
entry not sent is no vote, not a vote for 0) and weight the result by the fraction that
sent it, as FedAvg does; counting unsent entries as zeros made the median of a round of
top-2% updates nearly zero, and training stalled.

The server step (a strategy of pqsu.cloud.strategies: FedAvgM, FedAdam, FedYogi) applies the
aggregated delta to the fp32 master weights.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from pqsu.cloud.strategies import AggregationError, FedAvgM
from pqsu.protocol.codec import Update
from pqsu.protocol.update_batch import FlatBatch, ModelLayout


# The server step lives in pqsu.cloud.strategies; plain FedAvg / FedAvgM keeps its old name here.
ServerOptimizer = FedAvgM


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
    """Sample-weighted mean of the updates, streamed into O(model) memory.

    An `Update` is added at once, block by block. A `FlatBatch` (`pqsu.protocol.update_batch`: the
    server's fast path, many updates decoded together) waits until about one model's worth of entries
    is pending, which is then scatter-added in one `np.add.at` over the flat model vector: no Python
    per update or per tensor on the hot path. The weighted sums, weight total and count are also what an aggregator worker hands
    over (`partial` / `add_partial`, cloud/workers.py), so N workers' partials reduce to this same sum.
    """

    shapes: dict[str, tuple[int, ...]]
    clip_norm: float | None = None
    count: int = 0
    weight: float = 0.0
    _acc: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.layout = ModelLayout(self.shapes)
        self._flat = np.zeros(self.layout.total, np.float32)  # every tensor's accumulator is a view of it
        self._acc = {k: self._flat[off:off + self.layout.numels[k]].reshape(self.shapes[k])
                     for k, off in self.layout.offsets.items()}
        self._pending: list[tuple[FlatBatch, np.ndarray]] = []  # batches and their updates' weights
        self._pending_entries = 0
        self._fold_at = max(self.layout.total, 1 << 14)  # entries held before a scatter-add: O(model)

    def add(self, update: Update | FlatBatch) -> None:
        if isinstance(update, FlatBatch):
            samples = update.num_samples
            weights = samples
            if self.clip_norm is not None:
                norms = update.norms()
                weights = samples * np.where(norms > self.clip_norm, self.clip_norm / np.maximum(norms, 1e-300), 1.0)
            self._pending.append((update, weights))
            self._pending_entries += update.q.size
            self.count += len(update)
            self.weight += float(samples.sum())
            if self._pending_entries >= self._fold_at:
                self._fold()
            return
        w = float(update.num_samples) * _clip_factor(update, self.clip_norm)
        for b in update.blocks:
            b.add_to(self._acc[b.name], w)
        self.count += 1
        self.weight += float(update.num_samples)

    def _fold(self) -> None:
        """Scatter-add the pending batches, one add.at each."""
        pending, self._pending, self._pending_entries = self._pending, [], 0
        pending = [(b, w) for b, w in pending if b.index.size]
        if not pending:
            return
        for batch, w in pending:  # each batch is already large: one pass of numpy calls per batch
            values = batch.q.astype(np.float32)
            values *= np.repeat(batch.scale * w[batch.owner].astype(np.float32), batch.nnz)
            # Unbuffered: positions repeat across updates. numpy >= 2 runs add.at on 1-D arrays as a plain
            # loop, faster here than bincount (a float64 pass over the whole model) or sorting.
            np.add.at(self._flat, batch.index, values)

    def partial(self) -> tuple[np.ndarray, float, int]:
        """(flat weighted sums, weight total, count) so far: what a worker hands over."""
        self._fold()
        return self._flat, self.weight, self.count

    def add_partial(self, sums: np.ndarray, weight: float, count: int) -> None:
        """Fold another aggregator's `partial()` in (the coordinator reducing its workers' partials)."""
        self._fold()
        self._flat += sums
        self.weight += float(weight)
        self.count += int(count)

    def result(self) -> dict[str, np.ndarray] | None:
        self._fold()
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
        held = {k: np.full(s, np.nan, np.float32) for k, s in self.shapes.items()}  # NaN: not sent
        for b in update.blocks:
            if b.kind == "sparse":
                held[b.name].reshape(-1)[b.indices] = 0
            elif b.kind != "skip":
                held[b.name][...] = 0
            b.add_to(held[b.name], factor)
        self._held.append(held)
        self.count += 1

    def result(self) -> dict[str, np.ndarray] | None:
        if not self._held:
            return None
        out = {}
        for k in self.shapes:
            ordered = np.sort(np.stack([h[k] for h in self._held]), axis=0)  # NaN (not sent) sorts last
            sent = np.count_nonzero(~np.isnan(ordered), axis=0)
            value = np.where(sent > 0, self._reduce(ordered, sent), 0.0)
            out[k] = (sent / len(self._held) * value).astype(np.float32)
        return out

    @abstractmethod
    def _reduce(self, ordered: np.ndarray, sent: np.ndarray) -> np.ndarray:
        """Reduce (updates, *shape), sorted along axis 0 with the `sent` values of each coordinate
        first, to (*shape); coordinates with sent == 0 are ignored."""


@dataclass
class Median(_Holding):
    """Coordinate-wise median: robust to a minority of arbitrary updates."""

    def _reduce(self, ordered: np.ndarray, sent: np.ndarray) -> np.ndarray:
        low = _take(ordered, np.maximum(sent - 1, 0) // 2)
        high = _take(ordered, sent // 2)
        return (low.astype(np.float64) + high) / 2


@dataclass
class TrimmedMean(_Holding):
    """Coordinate-wise mean after dropping the `trim` fraction of largest and smallest values."""

    trim: float = 0.1

    def _reduce(self, ordered: np.ndarray, sent: np.ndarray) -> np.ndarray:
        # Trim as many values as the assumed number of attackers among all updates, but keep at
        # least the middle one: a coordinate few devices sent is not trimmed to nothing.
        k = np.minimum(int(self.trim * len(ordered)), np.maximum(sent - 1, 0) // 2)
        sums = np.cumsum(np.nan_to_num(ordered, nan=0.0), axis=0, dtype=np.float64)
        sums = np.concatenate([np.zeros((1, *sums.shape[1:])), sums])
        kept = sent - 2 * k
        return (_take(sums, sent - k) - _take(sums, k)) / np.maximum(kept, 1)


def _take(stacked: np.ndarray, index: np.ndarray) -> np.ndarray:
    """stacked[index[c], c] for every coordinate c."""
    return np.take_along_axis(stacked, index[None], axis=0)[0]


@dataclass
class MedianNormClip:
    """Clips each update to `factor` x the median norm of the round's updates, then aggregates
    with `inner`. A fixed bound fits neither early rounds (large updates) nor late ones; the
    median norm follows the honest majority. It is known only once the round is complete, so
    the decoded updates are held until `result` (a sparse update costs its sent entries)."""

    inner: FedAvg | _Holding
    factor: float = 1.0
    bound: float | None = None     # the last round's clip bound, once computed
    _pending: list[Update] = field(default_factory=list, repr=False)

    @property
    def count(self) -> int:
        return self.inner.count + len(self._pending)

    def add(self, update: Update) -> None:
        self._pending.append(update)

    def result(self) -> dict[str, np.ndarray] | None:
        if self._pending:
            self.bound = self.factor * float(np.median([update_norm(u) for u in self._pending]))
            self.inner.clip_norm = self.bound
            for u in self._pending:
                self.inner.add(u)
            self._pending.clear()
        return self.inner.result()


def parse_clip(clip: float | str | None) -> tuple[float | None, float | None]:
    """(absolute bound, relative factor) from a clip_norm setting: a number, or `median[:F]`."""
    if clip is None:
        return None, None
    if isinstance(clip, str):
        name, _, arg = clip.strip().partition(":")
        if name == "median":
            factor = _positive(arg or "1", clip)
            return None, factor
        if arg:
            raise AggregationError(f"clip norm must be a number or median[:FACTOR], got {clip!r}")
        return _positive(clip, clip), None
    return _positive(clip, clip), None


def _positive(value: object, spec: object) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = math.nan
    if isinstance(value, bool) or not (math.isfinite(x) and x > 0):
        raise AggregationError(f"clip norm must be a number > 0 or median[:FACTOR > 0], got {spec!r}")
    return x


def _clip_factor(update: Update, clip_norm: float | None) -> float:
    if clip_norm is None:
        return 1.0
    norm = update_norm(update)
    return 1.0 if norm <= clip_norm or norm == 0 else clip_norm / norm


def make_aggregator(spec: str, shapes: dict[str, tuple[int, ...]], clip_norm: float | str | None = None):
    """`fedavg`, `median` or `trimmed:FRACTION` (e.g. trimmed:0.1); `clip_norm` a number or `median[:F]`."""
    bound, relative = parse_clip(clip_norm)
    agg = _aggregator(spec, shapes, bound)
    return MedianNormClip(agg, relative) if relative is not None else agg


def _aggregator(spec: str, shapes: dict[str, tuple[int, ...]], clip_norm: float | None):
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
