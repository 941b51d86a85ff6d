"""One tensor block's bytes inside an encoded update (docs/protocol.md, "Update codec").

Its own module because two sides need the same layout: the codec writes and reads blocks,
and `TensorBlock.nbytes_on_wire` sizes one without encoding a whole update. Kept apart,
`update` and `codec` each import this and neither imports the other's module back.
"""
from __future__ import annotations

import struct

U8, U16 = struct.Struct("<B"), struct.Struct("<H")
SPARSE_HEAD = struct.Struct("<IfB")  # nnz, scale, index coding
DIMS = [struct.Struct(f"<{n}I") for n in range(256)]
KIND_CODE = {"skip": 0, "dense": 1, "sparse": 2, "dense32": 3}
SCALE_PER_TENSOR, SCALE_PER_CHANNEL = 0, 1
MIN_BLOCK_BYTES = 5  # u16 name length + 1 name byte + ndim + kind


def encode_block(b) -> list[bytes]:
    """The parts of block `b` (a `TensorBlock`) in wire order; joined, they are its bytes."""
    name = b.name.encode("utf-8")
    parts = [U16.pack(len(name)), name, U8.pack(len(b.shape)),
             DIMS[len(b.shape)].pack(*b.shape), U8.pack(KIND_CODE[b.kind])]
    if b.kind == "dense":
        mode = SCALE_PER_TENSOR if b.scale.size == 1 else SCALE_PER_CHANNEL
        parts += [U8.pack(mode), b.scale.astype("<f4").tobytes(), b.q.tobytes()]
    elif b.kind == "sparse":
        coding, index_data = b._index_data
        parts += [SPARSE_HEAD.pack(b.q.size, b.scale[0], coding), index_data, b.q.tobytes()]
    elif b.kind == "dense32":
        parts.append(b.q.astype("<f4").tobytes())
    return parts


def encoded_block_size(b) -> int:
    """Exact size of `b` inside an encoded update."""
    return sum(len(p) for p in encode_block(b))
