"""Model poisoning by a legitimate device: it trains like the others, then scales or flips
its update before sending it, re-encoded (and signed with its own key) by the real codec.

Attacks are pure functions over payloads, named by specs the reliability report uses:
`scale:F` (multiply the update by F, e.g. scale:10 or scale:-10) and `flip` (scale:-1, the
sign-flip attack). `tamper_hook` turns one into the hook `simulate(..., tamper=)` applies to
every payload before the server sees it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from pqsu.protocol import codec
from pqsu.protocol.codec import TensorBlock
from pqsu.protocol.errors import PqsuError


class AttackError(PqsuError):
    """An attack spec that does not parse."""


def scaled_block(block: TensorBlock, factor: float) -> TensorBlock:
    """The block with every dequantized value multiplied by `factor`.

    int8 blocks keep their codes and scale the scales (a negative factor negates the codes,
    which stay in [-127, 127]), so the values are exactly `factor` times the originals up to
    float32 rounding of the scale; dense32 blocks multiply their values.
    """
    if block.kind == "skip" or block.q is None:
        return block
    if block.kind == "dense32":
        return TensorBlock(block.name, block.shape, "dense32", q=(block.q * np.float32(factor)).astype(np.float32))
    q = block.q if factor >= 0 else -block.q
    scale = (block.scale * np.float32(abs(factor))).astype(np.float32)
    return TensorBlock(block.name, block.shape, block.kind, q=q.astype(np.int8), scale=scale, indices=block.indices)


def scaled_payload(payload: bytes, factor: float, *, key: bytes | None = None,
                   limits: codec.Limits = codec.Limits()) -> bytes:
    """Decode an update, multiply it by `factor`, encode it again (signed with `key` if given:
    the attacker is an enrolled device and holds its own key)."""
    update = codec.decode(payload, key=key, limits=limits)
    blocks = tuple(scaled_block(b, factor) for b in update.blocks)
    return codec.encode(dataclasses.replace(update, blocks=blocks), key=key)


def attack_factor(spec: str) -> float:
    """The multiplier an attack spec applies: `scale:F` gives F, `flip` gives -1."""
    name, _, arg = spec.strip().partition(":")
    if name == "flip" and not arg:
        return -1.0
    if name == "scale":
        try:
            factor = float(arg)
        except ValueError:
            factor = math.nan
        if math.isfinite(factor):
            return factor
    raise AttackError(f"unknown attack {spec!r}; use scale:FACTOR (e.g. scale:10, scale:-10) or flip")


def tamper_hook(attack: str, attackers: set[str] | frozenset[str], *, keys: dict[str, bytes] | None = None,
                limits: codec.Limits = codec.Limits()) -> Callable[[str, bytes], bytes]:
    """`hook(device_id, payload)`: the attackers' payloads poisoned, everyone else's untouched."""
    factor = attack_factor(attack)
    keys = keys or {}

    def hook(device_id: str, payload: bytes) -> bytes:
        if device_id not in attackers:
            return payload
        return scaled_payload(payload, factor, key=keys.get(device_id), limits=limits)
    return hook
