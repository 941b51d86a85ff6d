"""Judging a round's updates and folding the accepted ones: the one place an update is checked.

`RoundIntake` holds one open round (who was asked, who is counted, totals, refusals by reason)
and its aggregator. `FederatedServer` (cloud/server.py) keeps one for its rounds; an aggregator
worker (cloud/workers.py) keeps one for its partition of the devices, with no torch in the
process. Both therefore refuse the same payloads for the same reasons.

`submit_many` judges a batch of payloads: the header checks run per payload in Python (cheap),
then every payload that passed is decoded in one vectorized pass (`protocol.update_batch`) and
folded with one scatter-add per batch. The verdicts are those of submitting the payloads one by
one, in order: a payload that fails the batch decode is decoded alone by `codec.decode` for its
reason, and a second update of a device already in the batch waits for the first's verdict.
"""
from __future__ import annotations

import bisect
import collections
import dataclasses
import math
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from pqsu.cloud.aggregate import FedAvg, make_aggregator
from pqsu.protocol import codec
from pqsu.protocol.errors import CodecError
from pqsu.protocol.messages import RoundTask
from pqsu.protocol.update_batch import ModelLayout, decode_batch, scan

log = logging.getLogger(__name__)
# Payload bytes decoded together: enough that numpy's per-call cost is small beside the work, few enough
# that the batch's arrays stay in a core's L2 cache (a batch of 256 cnn updates was ~1.5x slower per update).
_DECODE_BYTES = 1 << 18


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    reason: str   # "accepted" or a short rejection key (counted in the round report)
    detail: str = ""


ACCEPTED = Verdict(True, "accepted")


@dataclass
class Round:
    """One open round. Per asked device it keeps one bit (counted or not) beside the sorted device
    list, and running totals otherwise, so the server holds O(model) + a few bytes per asked device
    however many updates arrive (`pqsu bench codec` measures it up to 10,000 devices)."""

    task: RoundTask
    devices: tuple[str, ...]   # sorted: a device's index is found by bisection
    started: float
    counted: bytearray = field(default_factory=bytearray)  # bit i set once devices[i]'s update is accepted
    uploads: int = 0
    bytes_up: int = 0
    loss_sum: float = 0.0
    rejected: collections.Counter = field(default_factory=collections.Counter)

    def __post_init__(self) -> None:
        self.counted = bytearray((len(self.devices) + 7) // 8)

    def index(self, device: str) -> int | None:
        """The device's position among those asked, None if it was not asked."""
        i = bisect.bisect_left(self.devices, device)
        return i if i < len(self.devices) and self.devices[i] == device else None

    def was_counted(self, i: int) -> bool:
        return bool(self.counted[i >> 3] & (1 << (i & 7)))

    def count(self, i: int, nbytes: int, loss: float) -> None:
        self.counted[i >> 3] |= 1 << (i & 7)
        self.uploads += 1
        self.bytes_up += nbytes
        self.loss_sum += loss


class RoundIntake:
    """The checks of docs/protocol.md ("Coordinator rules") and the aggregator of the open round."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], limits: codec.Limits, *, aggregator: str = "fedavg",
                 clip_norm: float | str | None = None, keys: Mapping[str, bytes] | None = None):
        self.shapes, self.limits, self.keys = shapes, limits, keys
        self.spec, self.clip_norm = aggregator, clip_norm
        self.aggregator = make_aggregator(aggregator, shapes, clip_norm)  # validates the spec early
        self.layout = ModelLayout(shapes)
        self.fast = self.layout.fits(limits)  # else every payload takes codec.decode
        self.round: Round | None = None
        # An aggregator worker asks the coordinator before counting (cloud/workers.py): device ids in, one
        # refusal reason (or None: count it) per device out. None: this intake decides alone.
        self.claim: Callable[[list[str]], list[str | None]] | None = None

    def open(self, rnd: Round) -> None:
        self.round = rnd
        self.aggregator = make_aggregator(self.spec, self.shapes, self.clip_norm)

    def submit(self, payload: bytes, sender: str | None = None) -> Verdict:
        """Check one update and fold it into the round; never raises for bad input.

        `sender` is the device the transport vouches for (its topic, bound to its broker
        identity by ACL); an update naming another device is refused.
        """
        return self.submit_many([(payload, sender)])[0]

    def submit_many(self, items: list[tuple[bytes, str | None]]) -> list[Verdict]:
        """The verdicts of submitting each (payload, sender) in order, decoded and folded as one batch."""
        verdicts: list[Verdict | None] = [None] * len(items)
        ready, taken, later = [], set(), []  # (item, slot, scanned, key); slots in this batch; second updates
        rnd = self.round
        batched = self.fast and type(self.aggregator) is FedAvg  # the robust aggregators need whole blocks
        for i, (payload, sender) in enumerate(items):
            verdict, slot, key, head = self._admit(payload, sender)
            if verdict is None and slot in taken:
                later.append(i)
                continue
            if verdict is None:
                scanned = scan(payload, self.layout, key=key, limits=self.limits, head=head) if batched else None
                if scanned is None:
                    verdict = self._decode_and_add(payload, key, slot)
                else:
                    taken.add(slot)
                    ready.append((i, slot, scanned, key))
            if verdict is not None:
                verdicts[i] = verdict
        if ready:
            for i, verdict in self._add_batch(ready):
                verdicts[i] = verdict
        for v in verdicts:
            if rnd is not None and v is not None and not v.accepted:
                rnd.rejected[v.reason] += 1
                log.info("rejected update (%s): %s", v.reason, v.detail)
        if later:  # judged after the first update of their device (and counted by that call)
            for i, verdict in zip(later, self.submit_many([items[i] for i in later])):
                verdicts[i] = verdict
        return verdicts

    def _admit(self, payload: bytes, sender: str | None) -> tuple[Verdict | None, int | None, bytes | None, tuple]:
        """(refusal or None, the device's slot, its key, (header, where its blocks start)) from the header alone."""
        rnd = self.round
        if rnd is None:
            return Verdict(False, "no-round", "no round is open"), None, None, None
        try:
            head = codec.read_header(payload)
        except CodecError as exc:
            return Verdict(False, codec_reason(exc), str(exc)), None, None, None
        header = head[0]
        refusal, slot, key = self._admit_header(header, sender)
        return refusal, slot, key, head

    def _admit_header(self, header, sender: str | None) -> tuple[Verdict | None, int | None, bytes | None]:
        rnd = self.round
        if sender is not None and header.device_id != sender:
            return Verdict(False, "topic-mismatch", f"update from {sender!r} names device {header.device_id!r}"), None, None
        # Who sends before what it sends: a device removed from the keys is refused as unknown in any round.
        key = None
        if self.keys is not None:
            key = self.keys.get(header.device_id)
            if key is None:
                return Verdict(False, "unknown-device", f"no key for device {header.device_id!r}"), None, None
        if header.round != rnd.task.round:
            return Verdict(False, "wrong-round", f"update for round {header.round}, round {rnd.task.round} is open"), \
                None, None
        slot = rnd.index(header.device_id)
        if slot is None:
            return Verdict(False, "not-selected", f"device {header.device_id!r} was not asked this round"), None, None
        if rnd.was_counted(slot):
            return Verdict(False, "duplicate", f"device {header.device_id!r} already counted this round"), None, None
        return None, slot, key

    def _decode_and_add(self, payload: bytes, key: bytes | None, slot: int) -> Verdict:
        try:
            update = codec.decode(payload, key=key, limits=self.limits)
        except CodecError as exc:
            return Verdict(False, codec_reason(exc), str(exc))
        problem = self._mismatch(update.model_id, update.num_samples, update.blocks)
        if problem:
            return Verdict(False, *problem)
        if self.claim is not None and (why := self.claim([update.device_id])[0]) is not None:
            return Verdict(False, why, f"device {update.device_id!r}: not granted ({why})")
        self.aggregator.add(update)
        self.round.count(slot, len(payload), update.loss)
        return ACCEPTED

    def _add_batch(self, ready: list[tuple]) -> list[tuple[int, Verdict]]:
        """Decode `ready` (slices of about `_DECODE_BYTES`), judge it, claim what passed at once (one round
        trip to the coordinator for a worker), count and fold what was granted."""
        out, decoded = {}, []  # decoded: (entries of `ready`, their FlatBatch)
        for part in _slices(ready):
            batch = decode_batch([r[2] for r in part], self.layout)
            if batch is not None:
                decoded.append((part, batch))
                continue
            for r in part:  # someone in it is invalid: each alone, so only that one is refused
                one = decode_batch([r[2]], self.layout)
                if one is not None:
                    decoded.append(([r], one))
                else:
                    i, slot, s, key = r
                    out[i] = self._decode_and_add(s.buf, key, slot)
        keep = []  # (which decoded part, position in it)
        for d, (part, _) in enumerate(decoded):
            for j, (i, _, s, _) in enumerate(part):
                problem = self._mismatch(s.header.model_id, s.header.num_samples, ())
                if problem:
                    out[i] = Verdict(False, *problem)
                else:
                    keep.append((d, j))
        if keep and self.claim is not None:
            refusals = self.claim([decoded[d][0][j][2].header.device_id for d, j in keep])
            granted = []
            for (d, j), why in zip(keep, refusals):
                if why is None:
                    granted.append((d, j))
                else:
                    i, _, s, _ = decoded[d][0][j]
                    out[i] = Verdict(False, why, f"device {s.header.device_id!r}: not granted ({why})")
            keep = granted
        kept = collections.defaultdict(list)
        for d, j in keep:
            i, slot, s, _ = decoded[d][0][j]
            self.round.count(slot, len(s.buf), s.header.loss)
            out[i] = ACCEPTED
            kept[d].append(j)
        for d, (part, batch) in enumerate(decoded):
            if len(kept[d]) < len(part):  # some refused after decoding: fold only the others
                batch = decode_batch([part[j][2] for j in kept[d]], self.layout) if kept[d] else None
            if batch is not None:
                self.aggregator.add(batch)
        return list(out.items())

    def _mismatch(self, model_id: str, num_samples: int, blocks) -> tuple[str, str] | None:
        rnd = self.round
        if model_id != rnd.task.model_id:
            return "wrong-model", f"update is relative to model {model_id!r}, not {rnd.task.model_id}"
        if num_samples == 0:
            return "no-samples", "update claims 0 training samples"
        for b in blocks:  # a FlatBatch has only the layout's tensors, at their shapes
            if b.name not in self.shapes:
                return "unknown-tensor", f"tensor {b.name!r} is not in the model"
            if tuple(b.shape) != tuple(self.shapes[b.name]):
                return "shape-mismatch", f"tensor {b.name!r} has shape {b.shape}, model has {self.shapes[b.name]}"
        return None


def _slices(ready: list[tuple]) -> list[list[tuple]]:
    """`ready` cut into runs of about `_DECODE_BYTES` of payload (at least one update each)."""
    out, start, size = [], 0, 0
    for j, r in enumerate(ready):
        size += len(r[2].buf)
        if size >= _DECODE_BYTES or j == len(ready) - 1:
            out.append(ready[start:j + 1])
            start, size = j + 1, 0
    return out


def limits_for(shapes: dict[str, tuple[int, ...]]) -> codec.Limits:
    """Decode limits for updates to a model of these shapes: room for a dense fp32 update
    (4 bytes an entry, plus headers) and no more, whatever the codec's generic defaults."""
    numel = sum(math.prod(s) for s in shapes.values())
    default = codec.Limits()
    return dataclasses.replace(default, max_payload_bytes=max(default.max_payload_bytes, 4 * numel + (1 << 20)),
                               max_tensors=max(default.max_tensors, len(shapes)))


def codec_reason(exc: CodecError) -> str:
    return getattr(exc, "reason", "corrupt")
