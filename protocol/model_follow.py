"""How a device follows the global model: a patch from the model it holds, else the whole file.

A round announcement (or the `done` message) names the model id and the bases a patch is
retained for. A device that holds one of those bases takes the patch; anything wrong with it
(not the announced bytes, corrupt, for another base, a result that does not hash to the
announced id: `pqsu.protocol.patch.apply_patch` decides) is refused, counted by reason, logged,
and the device falls back to the full model. Nothing unverified is ever held: `held` changes only
to a model whose content hashes to its id.

The MQTT agent (pqsu.edge.agent) and the in-process simulator (cloud/transport.py) both follow
through `ModelFollower`, so the two download the same bytes for the same run. Numpy and the
standard library only, like the patch format, so a board without onnx follows patches.
"""
from __future__ import annotations

import collections
import hashlib
import logging
from dataclasses import dataclass

from pqsu.protocol import chunking, model_id
from pqsu.protocol.errors import PqsuError
from pqsu.protocol.patch import PatchError, apply_patch, read_header

log = logging.getLogger(__name__)
# Refusal reasons beyond the patch's own (pqsu.protocol.patch.REASONS).
NOT_ANNOUNCED = "not-announced"   # the patch bytes are not the ones the announcement named (length or SHA-256)
INCOMPLETE = "incomplete"         # its frames did not all arrive in time


@dataclass(frozen=True)
class Download:
    """How a device got one model version."""

    kind: str     # "patch", "full", or "" (it held that version already)
    nbytes: int   # bytes on the wire, chunk headers included
    first: bool   # the device held no model before (its first model came over the radio)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "bytes": self.nbytes, "first": self.first}


HELD = Download("", 0, False)


def wire_bytes(nbytes: int, limit: int) -> int:
    """Bytes on the wire of an `nbytes` message framed with chunk limit `limit` (headers included)."""
    count = max(1, -(-nbytes // (limit - chunking.HEADER_SIZE)))
    return nbytes + count * chunking.HEADER_SIZE


class ModelFollower:
    """One device's current model and how it got there."""

    def __init__(self, held: model_id.VerifiedModel | None = None, name: str = "device"):
        self.held, self.name = held, name
        self.refusals: collections.Counter = collections.Counter()
        self.downloads: dict[str, Download] = {}  # model id -> how it came (the last few versions)

    @property
    def held_id(self) -> str | None:
        return self.held.model_id if self.held is not None else None

    def offer_for(self, target_id: str, offers) -> dict | None:
        """The announced patch to take toward `target_id` (None: the full model, or nothing to do)."""
        if self.held is None or self.held.model_id == target_id:
            return None
        return next((o for o in offers if o.get("base") == self.held.model_id), None)

    def take_patch(self, patch: bytes, offer: dict, target_id: str, nbytes: int) -> model_id.VerifiedModel | None:
        """The model `patch` makes from the held one, verified against `target_id`; None (refused,
        counted, logged) when anything is wrong with it: the caller then fetches the full model."""
        if self.held is None:
            return self.refuse("wrong-base", "no model held")
        if len(patch) != offer["bytes"] or hashlib.sha256(patch).hexdigest() != offer["sha256"]:
            return self.refuse(NOT_ANNOUNCED, f"{len(patch)} bytes whose length or SHA-256 is not the announced one")
        try:
            if read_header(patch).target_id != target_id:
                raise PatchError("target-mismatch", f"the patch leads to another model than {target_id}")
            data = apply_patch(self.held.data, patch)  # hashes the result against the target id
        except PatchError as exc:
            return self.refuse(exc.reason, exc.detail)
        return self._now_hold(model_id.VerifiedModel(data, target_id), Download("patch", nbytes, False))

    def take_full(self, data: bytes | model_id.VerifiedModel, nbytes: int) -> model_id.VerifiedModel:
        """The full file, verified (ModelIdError if it does not hash to its own id)."""
        file = model_id.as_verified(data)
        if self.held is not None and file.model_id == self.held.model_id:
            return self.held
        return self._now_hold(file, Download("full", nbytes, self.held is None))

    def refuse(self, reason: str, detail: str) -> None:
        self.refusals[reason] += 1
        log.warning("%s: patch refused (%s): %s; falling back to the full model", self.name, reason, detail)
        return None

    def _now_hold(self, file: model_id.VerifiedModel, how: Download) -> model_id.VerifiedModel:
        self.held = file
        self.downloads[file.model_id] = how
        while len(self.downloads) > 8:
            self.downloads.pop(next(iter(self.downloads)))
        return file

    def download_of(self, target_id: str) -> Download:
        return self.downloads.get(target_id, HELD)

    def follow(self, target_id: str, offers, fetch_patch, fetch_full,
               limit: int) -> tuple[model_id.VerifiedModel, Download]:
        """In one call (the in-process simulator): `fetch_patch(base)` -> patch bytes, `fetch_full()` ->
        the model file; each counted on the wire as framed with chunk limit `limit`."""
        if self.held_id == target_id:
            return self.held, HELD
        offer, wasted = self.offer_for(target_id, offers), 0
        if offer is not None:
            patch = fetch_patch(offer["base"])
            file = self.take_patch(patch, offer, target_id, wire_bytes(len(patch), limit))
            if file is not None:
                return file, self.downloads[target_id]
            wasted = wire_bytes(len(patch), limit)  # downloaded all the same: it counts toward the full one
        data = fetch_full()
        file = self.take_full(data, wire_bytes(len(data), limit) + wasted)
        if file.model_id != target_id:
            raise PqsuError(f"{self.name}: the full model is {file.model_id}, the round announced {target_id}")
        return file, self.downloads[target_id]


def offers_of(patches) -> tuple[dict, ...]:
    """The announcement's `patches` field for {base id: patch bytes}."""
    return tuple({"base": b, "bytes": len(p), "sha256": hashlib.sha256(p).hexdigest()} for b, p in patches.items())
