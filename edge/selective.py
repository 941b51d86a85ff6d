"""Selective updating: whether a device uploads this round, and which entries it sends.

A policy is three small swappable parts, configured by name:

- upload rules (all must agree): `always`; `loss` (the FL-PQSU paper's rule: upload only
  when the local loss improved on the last uploaded one); `norm:T` (the update's norm
  relative to the weights' above T); `relevance:T` (CMFL: the fraction of entries whose
  sign agrees with the last global update at least T). Combine with `+`: `loss+norm:0.01`.
- entry selection: `topk:F` (the largest fraction F of each tensor), `tcs:F[:L]` (time-
  correlated top-k: the same F, but only a share L of it, default 0.25, chosen freely; the
  rest from the entries the last global change touched, so the fleet's updates land on a
  common support and the next model patch stays small), `threshold:T` (entries with
  |v| >= T), `dense` (every entry, int8) or `fp32` (every entry, float32: the FedAvg
  baseline).
- error feedback: what is not sent (entries not selected, quantization error, whole skipped
  rounds) is kept in a residual and added to the next round's update, so nothing is lost,
  only delayed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from pqsu.protocol.codec import TensorBlock
from pqsu.protocol.errors import PqsuError


class PolicyError(PqsuError):
    """A policy spec that does not parse."""


@dataclass(frozen=True)
class Decision:
    upload: bool
    reason: str


@dataclass(frozen=True)
class RoundContext:
    update: dict[str, np.ndarray]         # what would be sent: this round's delta plus the residual
    delta: dict[str, np.ndarray]          # this round's delta alone
    weights: dict[str, np.ndarray]        # the global weights received this round
    loss: float                           # local training loss this round
    last_uploaded_loss: float | None
    global_update: dict[str, np.ndarray] | None  # received weights minus the previous round's


class UploadRule(Protocol):
    def decide(self, ctx: RoundContext) -> Decision: ...


def _norm(tensors: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.dot(v.ravel(), v.ravel())) for v in tensors.values()))


@dataclass(frozen=True)
class Always:
    def decide(self, ctx: RoundContext) -> Decision:
        return Decision(True, "always")


@dataclass(frozen=True)
class LossImproved:
    def decide(self, ctx: RoundContext) -> Decision:
        if ctx.last_uploaded_loss is None or ctx.loss < ctx.last_uploaded_loss:
            return Decision(True, "loss improved")
        return Decision(False, f"loss {ctx.loss:.4f} did not improve on {ctx.last_uploaded_loss:.4f}")


@dataclass(frozen=True)
class NormAbove:
    threshold: float

    def decide(self, ctx: RoundContext) -> Decision:
        rel = _norm(ctx.update) / max(_norm(ctx.weights), 1e-12)
        return Decision(rel > self.threshold, f"relative norm {rel:.2e} vs {self.threshold:.2e}")


@dataclass(frozen=True)
class Relevance:
    threshold: float

    def decide(self, ctx: RoundContext) -> Decision:
        if not ctx.global_update:
            return Decision(True, "no global update yet")
        agree = total = 0
        for name, d in ctx.delta.items():
            g = ctx.global_update.get(name)
            if g is None or g.shape != d.shape:
                continue
            both = (d != 0) & (g != 0)
            agree += int(np.count_nonzero(np.sign(d[both]) == np.sign(g[both])))
            total += int(np.count_nonzero(both))
        score = agree / total if total else 1.0
        return Decision(score >= self.threshold, f"sign agreement {score:.3f} vs {self.threshold:.3f}")


class Selector(Protocol):
    needs_previous: bool  # whether blocks() reads the last global change (a device then keeps last round's weights)

    def blocks(self, update: dict[str, np.ndarray],
               last_change: dict[str, np.ndarray] | None = None) -> list[TensorBlock]: ...


def _k_of(fraction: float, size: int) -> int:
    # round() first: 0.07 * 100 is 7.000000000000001 in floating point, and must send 7, not 8.
    return min(size, max(1, math.ceil(round(fraction * size, 6))))


def _largest(magnitude: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries of a flat array, unsorted."""
    if k <= 0:
        return np.empty(0, np.int64)
    if k >= magnitude.size:
        return np.arange(magnitude.size)
    return np.argpartition(magnitude, magnitude.size - k)[magnitude.size - k:]


@dataclass(frozen=True)
class Dense:
    fp32: bool = False
    needs_previous = False

    def blocks(self, update: dict[str, np.ndarray], last_change=None) -> list[TensorBlock]:
        if self.fp32:
            return [TensorBlock.dense_fp32(n, v) for n, v in update.items()]
        return [TensorBlock.dense(n, v, per_channel=True) for n, v in update.items()]


@dataclass(frozen=True)
class TopK:
    fraction: float
    needs_previous = False

    def blocks(self, update: dict[str, np.ndarray], last_change=None) -> list[TensorBlock]:
        out = []
        for name, v in update.items():
            flat = v.ravel()
            idx = np.sort(_largest(np.abs(flat), _k_of(self.fraction, flat.size)))
            out.append(TensorBlock.sparse(name, v.shape, idx, flat[idx]))
        return out


@dataclass(frozen=True)
class TimeCorrelated:
    """Time-correlated top-k (Ozfatura et al. 2021): each tensor sends as many entries as `topk:F`, a
    share `own` of them its own largest anywhere, the rest its largest among the entries the last global
    change touched (the model it received minus the one before: no extra message). Devices that agree on
    most of their support make an aggregate, and so a model patch, on few entries; what a device does
    not send stays in its residual. Without a last change (the first round, a new architecture) it is
    plain top-k."""

    fraction: float
    own: float = 0.25
    needs_previous = True

    def blocks(self, update: dict[str, np.ndarray],
               last_change: dict[str, np.ndarray] | None = None) -> list[TensorBlock]:
        out = []
        for name, v in update.items():
            flat = v.ravel()
            magnitude = np.abs(flat)
            k = _k_of(self.fraction, flat.size)
            change = (last_change or {}).get(name)
            if change is None or change.shape != v.shape:
                idx = _largest(magnitude, k)
            else:
                free = _largest(magnitude, min(k, math.ceil(round(self.own * k, 6))))
                on_support = np.flatnonzero(change.ravel())
                on_support = on_support[~np.isin(on_support, free)]
                picked = on_support[_largest(magnitude[on_support], k - free.size)]
                idx = np.concatenate([free, picked])
                if idx.size < k:  # a small support: fill with the next largest anywhere
                    rest = np.setdiff1d(np.arange(flat.size), idx, assume_unique=True)
                    idx = np.concatenate([idx, rest[_largest(magnitude[rest], k - idx.size)]])
            idx = np.sort(idx)
            out.append(TensorBlock.sparse(name, v.shape, idx, flat[idx]))
        return out


@dataclass(frozen=True)
class Threshold:
    threshold: float
    needs_previous = False

    def blocks(self, update: dict[str, np.ndarray], last_change=None) -> list[TensorBlock]:
        out = []
        for name, v in update.items():
            idx = np.flatnonzero(np.abs(v.ravel()) >= self.threshold)
            out.append(TensorBlock.sparse(name, v.shape, idx, v.ravel()[idx]) if idx.size
                       else TensorBlock.skip(name, v.shape))
        return out


@dataclass(frozen=True)
class Prepared:
    decision: Decision
    blocks: list[TensorBlock] | None   # None when the device skips this round
    residual: dict[str, np.ndarray]    # what stays on the device for later


@dataclass(frozen=True)
class SelectivePolicy:
    rules: tuple = field(default_factory=lambda: (Always(),))
    selector: Selector = field(default_factory=lambda: TopK(0.01))
    error_feedback: bool = True

    @classmethod
    def from_spec(cls, upload: str = "always", select: str = "topk:0.01", error_feedback: bool = True) -> "SelectivePolicy":
        return cls(tuple(_parse_rule(part) for part in upload.split("+")), _parse_selector(select), error_feedback)

    @property
    def needs_previous(self) -> bool:
        """Whether a device must keep last round's weights (the relevance rule and the tcs selection read them)."""
        return any(isinstance(r, Relevance) for r in self.rules) or self.selector.needs_previous

    def prepare(self, ctx: RoundContext) -> Prepared:
        """Decide, select and quantize; return what to send and the residual to keep."""
        decisions = []
        for rule in self.rules:
            decisions.append(rule.decide(ctx))
            if not decisions[-1].upload:
                return Prepared(decisions[-1], None, dict(ctx.update) if self.error_feedback else {})
        blocks = self.selector.blocks(ctx.update, ctx.global_update)
        residual = {b.name: ctx.update[b.name] - b.dequantize() for b in blocks} if self.error_feedback else {}
        return Prepared(Decision(True, "; ".join(d.reason for d in decisions)), blocks, residual)


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise PolicyError(f"{what} needs a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise PolicyError(f"{what} must be a finite number >= 0, got {text!r}")
    return value


def _parse_rule(spec: str) -> UploadRule:
    name, _, arg = spec.strip().partition(":")
    if name == "always" and not arg:
        return Always()
    if name == "loss" and not arg:
        return LossImproved()
    if name == "norm":
        return NormAbove(_number(arg or "0.0", "norm:T"))
    if name == "relevance":
        return Relevance(_number(arg or "0.5", "relevance:T"))
    raise PolicyError(f"unknown upload rule {spec!r}; use always, loss, norm:T, relevance:T, joined with +")


def _parse_selector(spec: str) -> Selector:
    name, _, arg = spec.strip().partition(":")
    if name == "topk":
        fraction = _number(arg, "topk:F")
        if not 0 < fraction <= 1:
            raise PolicyError(f"topk fraction must be in (0, 1], got {fraction}")
        return TopK(fraction)
    if name == "tcs":
        fraction, _, own = arg.partition(":")
        fraction, own = _number(fraction, "tcs:F"), _number(own or "0.25", "tcs:F:L")
        if not 0 < fraction <= 1 or not 0 <= own <= 1:
            raise PolicyError(f"tcs needs a fraction F in (0, 1] and an own share L in [0, 1], got {arg!r}")
        return TimeCorrelated(fraction, own)
    if name == "threshold":
        return Threshold(_number(arg, "threshold:T"))
    if name in ("dense", "fp32") and not arg:
        return Dense(fp32=name == "fp32")
    raise PolicyError(f"unknown entry selection {spec!r}; use topk:F, tcs:F[:L], threshold:T, dense or fp32")
