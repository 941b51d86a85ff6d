"""Where the values sit inside a serialized ONNX file, found with the stdlib alone.

A model patch rewrites values in place, so both sides need byte offsets, not a parsed
model: protobuf's Python API exposes none, and boards may not have the onnx package at
all. This walks just enough of the protobuf wire format (ModelProto -> graph ->
initializer, and ModelProto.metadata_props) to list, in file order:

- every initializer's value bytes: `raw_data` (field 9) or packed `float_data` (field 4),
  whose length is fixed by the tensor's shape, so new values never move any other byte;
- every top-level metadata entry (field 14), whose length may change: it sits directly in
  ModelProto, so no enclosing length prefix has to change with it.

Everything else is "glue" that a patch never touches. Only the cloud side (make_patch)
calls this; applying a patch needs no parsing at all.
"""
from __future__ import annotations

from dataclasses import dataclass

from pqsu.protocol.errors import PqsuError

# ModelProto.graph, ModelProto.metadata_props, GraphProto.initializer,
# TensorProto.{data_type, float_data, name, raw_data}, StringStringEntryProto.key
_GRAPH, _METADATA, _INITIALIZER = 7, 14, 5
_DATA_TYPE, _FLOAT_DATA, _NAME, _RAW_DATA, _KEY = 2, 4, 8, 9, 1
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5

# ONNX TensorProto.DataType -> bytes per element (others are treated as opaque bytes).
ITEMSIZE = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}
FLOAT = 1


class WireError(PqsuError):
    """The bytes are not a protobuf message this walker can read."""


@dataclass(frozen=True)
class Span:
    """A region of the file: kind "tensor" (values of initializer `key`) or "meta" (entry `key`).

    For a tensor, [start, end) holds only the element bytes; for a metadata entry it is
    the whole field, tag and length prefix included, because a new value changes both.
    """

    kind: str
    key: str
    start: int
    end: int
    data_type: int = 0  # ONNX element type of a tensor span (1 float32, 3 int8, 6 int32, ...)

    @property
    def itemsize(self) -> int:
        return ITEMSIZE.get(self.data_type, 1)


def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise WireError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def fields(buf: bytes, start: int, end: int):
    """(field number, wire type, tag start, value start, value end) for each field in [start, end).

    For varint fields the value range covers the varint bytes; the decoded number is not needed.
    """
    pos = start
    while pos < end:
        tag_at = pos
        tag, pos = _varint(buf, pos, end)
        number, wire = tag >> 3, tag & 7
        if wire == _VARINT:
            _, after = _varint(buf, pos, end)
        elif wire == _I64:
            after = pos + 8
        elif wire == _I32:
            after = pos + 4
        elif wire == _LEN:
            length, pos = _varint(buf, pos, end)
            after = pos + length
        else:  # groups (3, 4) are not used by ONNX
            raise WireError(f"unsupported wire type {wire} at byte {tag_at}")
        if after > end:
            raise WireError(f"field {number} at byte {tag_at} runs past its message")
        yield number, wire, tag_at, pos, after
        pos = after


def _text(buf: bytes, start: int, end: int) -> str:
    try:
        return bytes(buf[start:end]).decode("utf-8")
    except UnicodeDecodeError:
        raise WireError(f"a name at byte {start} is not UTF-8") from None


def _tensor_span(buf: bytes, start: int, end: int) -> Span | None:
    name, data_type, values = None, 0, None
    for number, wire, _, vs, ve in fields(buf, start, end):
        if number == _NAME and wire == _LEN:
            name = _text(buf, vs, ve)
        elif number == _DATA_TYPE and wire == _VARINT:
            data_type = _varint(buf, vs, ve)[0]
        elif number == _RAW_DATA and wire == _LEN:
            values = (vs, ve, None)
        elif number == _FLOAT_DATA and wire == _LEN:  # packed: 4 bytes per float, fixed length
            values = (vs, ve, FLOAT)
    if name is None or values is None:
        return None  # an unnamed tensor or one with varint-coded data: glue, never patched
    vs, ve, forced = values
    data_type = forced or data_type
    if (ve - vs) % ITEMSIZE.get(data_type, 1):
        data_type = 0  # not a whole number of elements: patched as opaque bytes
    return Span("tensor", name, vs, ve, data_type)


def spans(buf: bytes) -> list[Span]:
    """Initializer value spans and metadata entry spans of a serialized ModelProto, in file order."""
    out: list[Span] = []
    for number, wire, tag_at, vs, ve in fields(buf, 0, len(buf)):
        if number == _GRAPH and wire == _LEN:
            for g_number, g_wire, _, ts, te in fields(buf, vs, ve):
                if g_number == _INITIALIZER and g_wire == _LEN:
                    span = _tensor_span(buf, ts, te)
                    if span is not None:
                        out.append(span)
        elif number == _METADATA and wire == _LEN:
            key = next((_text(buf, ks, ke) for n, w, _, ks, ke in fields(buf, vs, ve)
                        if n == _KEY and w == _LEN), "")
            out.append(Span("meta", key, tag_at, ve))
    return out
