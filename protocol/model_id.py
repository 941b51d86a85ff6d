"""Model ids: a content hash that an ONNX file carries inside itself.

The id is SHA-256 (first 32 hex digits) of the serialized ONNX file in which the
value of the metadata entry `pqsu.model_id` is a fixed placeholder. Because the
placeholder and the id have the same length, stamping the id in never changes a
protobuf length prefix, so a board can verify a downloaded model with hashlib alone:
no onnx package, no torch. Every update names the model id it is relative to.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from pqsu.protocol.errors import PqsuError

KEY = "pqsu.model_id"
ID_LENGTH = 32
PLACEHOLDER = "0" * ID_LENGTH
# A protobuf StringStringEntryProto: field 1 (key) then field 2 (value), both length-delimited.
_PREFIX = b"\x0a" + bytes([len(KEY)]) + KEY.encode() + b"\x12" + bytes([ID_LENGTH])


class ModelIdError(PqsuError):
    """The file has no model id slot, or its content does not match its id."""


def _slot(data: bytes) -> int:
    at = data.find(_PREFIX)
    if at < 0 or data.find(_PREFIX, at + 1) >= 0:
        raise ModelIdError("not an fl-pqsu model: no single pqsu.model_id metadata entry")
    return at + len(_PREFIX)


def _digest(data: bytes, slot: int) -> str:
    blank = data[:slot] + PLACEHOLDER.encode() + data[slot + ID_LENGTH:]
    return hashlib.sha256(blank).hexdigest()[:ID_LENGTH]


def stamp(data: bytes) -> tuple[bytes, str]:
    """Fill the model id slot of serialized ONNX `data`; returns (stamped bytes, id)."""
    slot = _slot(data)
    model_id = _digest(data, slot)
    return data[:slot] + model_id.encode() + data[slot + ID_LENGTH:], model_id


def verify(data: bytes) -> str:
    """The model id of serialized ONNX `data`, after checking the content matches it."""
    slot = _slot(data)
    claimed = data[slot:slot + ID_LENGTH].decode("ascii", errors="replace")
    actual = _digest(data, slot)
    if claimed != actual:
        raise ModelIdError(f"model content does not match its id (claims {claimed}, hashes to {actual}): "
                           "the file is corrupt or was altered")
    return actual


@dataclass(frozen=True, eq=False)
class VerifiedModel:
    """Serialized ONNX bytes whose content matches the id they carry.

    Make one with `verified` (a received file: hashed once) or `stamped` (a file being
    written: hashed once to fill its slot); then pass it along instead of the bytes, so
    no later step hashes the same content again.
    """

    data: bytes
    model_id: str

    def __len__(self) -> int:
        return len(self.data)


def verified(data: bytes) -> VerifiedModel:
    """`data` checked against its own id (ModelIdError if it does not match)."""
    return VerifiedModel(bytes(data), verify(data))


def stamped(data: bytes) -> VerifiedModel:
    """`data` with its id slot filled (see `stamp`)."""
    return VerifiedModel(*stamp(data))


def as_verified(source: "bytes | VerifiedModel") -> VerifiedModel:
    """A VerifiedModel as it is; bytes verified first."""
    return source if isinstance(source, VerifiedModel) else verified(source)
