"""The downlink: the int8 file devices hold, how the next one is made, and the patches to it.

After each round the fp32 master moves. A *keyframe* is a full export (`export_model`: ONNX
export, fresh calibration, `quantize_static`). Between keyframes nothing is exported: the
master is requantized into the held file in place (`pqsu.export.requantize`), and a *patch*
from each of the last `patch_bases` versions to the new one is made (`pqsu.protocol.patch`),
so a device holding one of them downloads a few KB instead of the file.

Three things keep patches small and the delivered model close to the master
(docs/design.md, "Downlink", says why these and what was measured):

- `headroom`: at a keyframe the weight scales are widened by this factor, so the master can
  grow for many rounds before entries clip (and a coarser step changes fewer entries a round);
- `patch_cap`: a patch carries at most this many bytes (or this fraction of the int8 file), the
  largest changes first; the rest stays in the master, toward which the next patch moves (server-side error feedback);
- `deadband`: a held int8 weight changes only when the master is more than this many steps from
  it, so weights that sit near a rounding boundary do not flip back and forth with every round's
  noise (what is not sent stays in the master, at most `deadband` steps of it per weight);
- *soft keyframes*: when more than `keyframe_clip` of the int8 weights clip, only the scales
  of the channels that clip are widened (float32 raw data, so this is itself a patch).

Which of these happens is the keyframe policy's call, a small object chosen by name
(`KEYFRAME_POLICIES`): "full" exports every round (the paper's scheme, fedavg, and patches off),
"hard" publishes a full keyframe on drift or every `keyframe_every` rounds, "soft" widens the
clipping channels' scales on drift and exports whole only every `keyframe_every` rounds.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import numbers
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from pqsu.export.pipeline import Exported
from pqsu.export.requantize import (QdqLayout, capped_requantize, deadband_keep, fitting_scales, requantize, rescale,
                                    saturate)
from pqsu.protocol.model_follow import offers_of, wire_bytes
from pqsu.protocol.model_id import VerifiedModel, stamped
from pqsu.protocol.patch import PatchError, make_patch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DownlinkConfig:
    policy: str = "full"              # a KEYFRAME_POLICIES name
    keyframe_every: int | None = None  # a full keyframe every this many versions (None: only the first)
    keyframe_clip: float | None = 0.01  # drift: fraction of all int8 weights the held scales clip
    patch_cap: int | float | None = None  # bytes a patch from the previous version may carry, or a fraction
                                          # of the int8 file (float in (0, 1)); None: exact
    deadband: float = 0.5             # steps the master must be from a held int8 weight to change it (0.5: exact)
    patch_bases: int = 4              # patches are kept from this many earlier versions
    headroom: float = 1.0             # weight scales x this at a keyframe
    saturate: bool = False            # clip the master's weights to the held scales (drift: how many pressed past)


def cap_bytes(cap: int | float, file_bytes: int) -> int:
    """A patch cap in bytes: a fraction (float) is of the int8 file, so one setting fits every model size."""
    return int(cap) if isinstance(cap, numbers.Integral) else max(256, int(cap * file_bytes))


@dataclass(frozen=True)
class Drift:
    """What a policy decides on, measured on the master requantized with the held scales."""

    versions_since_keyframe: int  # versions made since the last full keyframe, this one included
    clipped: float                # fraction of all int8 weight entries that clip


class FullEveryRound:
    """Every version is a full export: no patches (the paper's scheme as published, and fedavg)."""

    patches = False

    def __init__(self, cfg: DownlinkConfig):
        pass

    def decide(self, drift: Drift) -> str:
        return "full"


class HardKeyframes:
    """Patches; a full keyframe when the held scales clip more than `keyframe_clip` of the weights, or
    every `keyframe_every` versions."""

    patches = True

    def __init__(self, cfg: DownlinkConfig):
        self.every, self.clip = cfg.keyframe_every, cfg.keyframe_clip

    def decide(self, drift: Drift) -> str:
        if self.every and drift.versions_since_keyframe >= self.every:
            return "full"
        return "full" if self.clip is not None and drift.clipped > self.clip else "patch"


class SoftKeyframes(HardKeyframes):
    """Patches; on drift, widen the scales of the channels that clip (a patch too); a full keyframe
    only every `keyframe_every` versions."""

    def decide(self, drift: Drift) -> str:
        if self.every and drift.versions_since_keyframe >= self.every:
            return "full"
        return "soft" if self.clip is not None and drift.clipped > self.clip else "patch"


KEYFRAME_POLICIES: dict[str, type] = {"full": FullEveryRound, "hard": HardKeyframes, "soft": SoftKeyframes}


def make_policy(cfg: DownlinkConfig):
    try:
        return KEYFRAME_POLICIES[cfg.policy](cfg)
    except KeyError:
        raise ValueError(f"unknown keyframe policy {cfg.policy!r}; choose one of {', '.join(KEYFRAME_POLICIES)}") \
            from None


@dataclass(frozen=True)
class Step:
    """How the current version was made, for the round's report."""

    kind: str           # "keyframe", "soft" or "patch"
    seconds: float      # the cloud's model preparation time
    clipped: float = 0.0
    left_out: int = 0   # weight changes a capped patch left in the master for later
    changed: int = 0    # int8 weights that changed from the previous version (0 after a keyframe: all new)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Downlink:
    """The chain of model versions devices hold, and the patches to the current one."""

    def __init__(self, cfg: DownlinkConfig, export: Callable[[], Exported], master: Mapping[str, np.ndarray]):
        """`export()` makes a keyframe of `master` (a full `export_model`); `master` is the server's fp32
        master (torch names, BN folded), read at every version."""
        self.cfg, self.policy, self._export, self.master = cfg, make_policy(cfg), export, master
        self.versions: collections.OrderedDict[str, bytes] = collections.OrderedDict()  # oldest first
        self.current: Exported | None = None
        self.layout: QdqLayout | None = None
        self.origin: str | None = None       # the first version's id (what a freshly flashed board holds)
        self.since_keyframe = 0
        self.step: Step | None = None
        self._patches: dict[str, bytes] | None = None

    @property
    def patching(self) -> bool:
        return self.policy.patches

    def model(self) -> Exported:
        if self.current is None:
            self.keyframe()
        return self.current

    def keyframe(self) -> None:
        """A full export of the master; with patches on, its weight scales widened by `headroom`."""
        t0 = time.perf_counter()
        exported = self._export()
        if self.patching:
            self.layout = QdqLayout.of(exported.data)
            if self.cfg.headroom != 1.0:
                data, self.layout = rescale(exported.data, self.layout,
                                            {n: np.float32(self.cfg.headroom) for n, t in self.layout.tensors.items()
                                             if t.kind == "weight"})
                exported = self._with(requantize(data, self.master, layout=self.layout).data, exported)
        self.since_keyframe = 0
        self._push(exported, Step("keyframe", time.perf_counter() - t0))

    def advance(self) -> Step:
        """The master changed: make the next version (and drop the patches made for the previous one)."""
        master = self.master
        if self.current is None or not self.patching:
            self.keyframe()
            return self.step
        t0 = time.perf_counter()
        base = self.current.data
        pressed = saturate(master, self.layout) if self.cfg.saturate else None
        exact = requantize(base, master, layout=self.layout)
        clipped = exact.weights_clipped if pressed is None else pressed
        drift = Drift(self.since_keyframe + 1, clipped / max(1, exact.weight_entries))
        kind = self.policy.decide(drift)
        if kind == "full":
            self.keyframe()
            self.step = dataclasses.replace(self.step, clipped=drift.clipped)
            return self.step
        left_out = 0
        if kind == "soft":  # widen the clipping channels' scales; those channels are requantized whole
            data, self.layout = rescale(base, self.layout, fitting_scales(self.layout, master, self.cfg.headroom,
                                                                          only_clipping=True))
            nxt = requantize(data, master, layout=self.layout)
        elif self.cfg.patch_cap is not None:
            nxt, left_out = capped_requantize(base, master, cap_bytes(self.cfg.patch_cap, len(base)), layout=self.layout)
        elif self.cfg.deadband > 0.5:
            nxt = requantize(base, master, layout=self.layout,
                             keep=deadband_keep(base, master, self.layout, self.cfg.deadband))
        else:
            nxt = exact
        self.since_keyframe += 1
        self._push(self._with(nxt.data, self.current),
                   Step(kind, time.perf_counter() - t0, drift.clipped, left_out, nxt.weights_changed))
        return self.step

    def _with(self, data: bytes, like: Exported) -> Exported:
        file = stamped(data)
        return Exported(file, dataclasses.replace(like.info, model_id=file.model_id))

    def _push(self, exported: Exported, step: Step) -> None:
        if self.origin is None:
            self.origin = exported.info.model_id
        self.current, self.step, self._patches = exported, step, None
        self.versions[exported.info.model_id] = exported.data
        self.versions.move_to_end(exported.info.model_id)
        while len(self.versions) > self.cfg.patch_bases + 1:
            self.versions.popitem(last=False)
        if self.patching:  # the announcement offers the patches: making them is part of preparing the version
            t0 = time.perf_counter()
            self.patches()
            self.step = dataclasses.replace(step, seconds=step.seconds + time.perf_counter() - t0)

    def state(self) -> tuple[dict[str, bytes], dict]:
        """(files by model id, chain facts) for a checkpoint: a coordinator resumed from it announces the file it
        announced before, so the updates devices made on it still count, and patches still start from theirs."""
        if not self.patching or self.current is None:
            return {}, {}  # a full export of the same master gives the same file again
        return dict(self.versions), {"order": list(self.versions), "since_keyframe": self.since_keyframe,
                                     "origin": self.origin}

    def resume(self, files: Mapping[str, bytes], state: Mapping) -> None:
        """The chain as `state()` saved it. The model info (widths, shapes) comes from one export of the
        master; the files are verified against the ids they are saved under."""
        order = [i for i in state.get("order", []) if i in files] if self.patching else []
        if not order:
            return
        like = self._export()
        for model_id_ in order:
            exported = self._with(files[model_id_], like)
            if exported.info.model_id != model_id_:
                log.warning("checkpointed model %s does not verify: starting the chain with a keyframe", model_id_[:12])
                self.versions.clear()
                return
            self.versions[model_id_] = exported.data
        self.current = exported
        self.layout = QdqLayout.of(exported.data)  # a file's held scales are in the file itself
        self.since_keyframe = int(state.get("since_keyframe", 0))
        self.origin = state.get("origin") or order[0]
        self.step, self._patches = Step("resumed", 0.0), None

    def patches(self) -> dict[str, bytes]:
        """Base id -> the patch from that version to the current one (empty after a full keyframe)."""
        if self._patches is None:
            self._patches = {}
            current = self.model()
            if self.patching:
                for base_id, data in self.versions.items():
                    if base_id == current.info.model_id:
                        continue
                    try:
                        self._patches[base_id] = make_patch(data, current.data)
                    except PatchError as exc:  # a keyframe in between: that base downloads the file
                        log.debug("no patch from %s: %s", base_id[:12], exc.reason)
        return self._patches

    def offers(self) -> tuple[dict, ...]:
        """The announcement's `patches` field."""
        return offers_of(self.patches())

    def wire_cost(self, base: str | None, limit: int) -> int:
        """What a device holding `base` downloads for the current version, chunk headers included."""
        current = self.model()
        if base == current.info.model_id:
            return 0
        patch = self.patches().get(base) if base is not None else None
        return wire_bytes(len(patch) if patch is not None else len(current.data), limit)

    def file(self) -> VerifiedModel:
        return self.model().file
