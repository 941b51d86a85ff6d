"""Selective updating: whether a device uploads this round, and which entries it sends.

A policy is three small swappable parts, configured by name:

- upload rules (all must agree): `always`; `loss` (the FL-PQSU paper's rule: upload only
  when the local loss improved on the last uploaded one); `norm:T` (the update's norm
  relative to the weights' above T); `relevance:T` (CMFL: the fraction of entries whose
  sign agrees with the last global update at least T). Combine with `+`: `loss+norm:0.01`.
- entry selection: `topk:F` (the largest fraction F of each tensor), `threshold:T` (entries
  with |v| >= T), `dense` (every entry, int8) or `fp32` (every entry, float32: the FedAvg
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
    def blocks(self, update: dict[str, np.ndarray]) -> list[TensorBlock]: ...


@dataclass(frozen=True)
class Dense:
    fp32: bool = False

    def blocks(self, update: dict[str, np.ndarray]) -> list[TensorBlock]:
        if self.fp32:
            return [TensorBlock.dense_fp32(n, v) for n, v in update.items()]
        return [TensorBlock.dense(n, v, per_channel=True) for n, v in update.items()]


@dataclass(frozen=True)
class TopK:
    fraction: float

    def blocks(self, update: dict[str, np.ndarray]) -> list[TensorBlock]:
        out = []
        for name, v in update.items():
            flat = v.ravel()
            # round() first: 0.07 * 100 is 7.000000000000001 in floating point, and must send 7, not 8.
            k = min(flat.size, max(1, math.ceil(round(self.fraction * flat.size, 6))))
            idx = np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k:]) if k < flat.size \
                else np.arange(flat.size)
            out.append(TensorBlock.sparse(name, v.shape, idx, flat[idx]))
        return out


@dataclass(frozen=True)
class Threshold:
    threshold: float

    def blocks(self, update: dict[str, np.ndarray]) -> list[TensorBlock]:
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
        """Whether a device must keep last round's weights (only the relevance rule reads them)."""
        return any(isinstance(r, Relevance) for r in self.rules)

    def prepare(self, ctx: RoundContext) -> Prepared:
        """Decide, select and quantize; return what to send and the residual to keep."""
        decisions = []
        for rule in self.rules:
            decisions.append(rule.decide(ctx))
            if not decisions[-1].upload:
                return Prepared(decisions[-1], None, dict(ctx.update) if self.error_feedback else {})
        blocks = self.selector.blocks(ctx.update)
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
    if name == "threshold":
        return Threshold(_number(arg, "threshold:T"))
    if name in ("dense", "fp32") and not arg:
        return Dense(fp32=name == "fp32")
    raise PolicyError(f"unknown entry selection {spec!r}; use topk:F, threshold:T, dense or fp32")
