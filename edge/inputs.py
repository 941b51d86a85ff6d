"""Inputs for inference, from bytes or files: numpy only (no torch, no image library).

- `.npy` (never pickle: `allow_pickle=False`): one sample of the shape the model declares (an image
  (C, H, W), a sensor window (C, L), a feature vector (F,)) or a batch of them, batch axis first;
  uint8 pixels (normalized by the model's own statistics) or already normalized floats;
- JSON `{"inputs": nested list}` (or a bare nested list): integers are 0-255 pixels (uint8),
  any float makes the whole array float32 and passes as is; an optional `"dtype"`
  ("uint8" or "float32") says it explicitly;
- images for `pqsu edge predict`, for image models only: binary PGM/PPM (P5/P6, 8-bit) and 8-bit
  PNG (grey, grey + alpha, RGB, RGBA; not interlaced, no palette), one sample each. Sizes must
  match the model (no resizing); grey <-> RGB is converted to the model's channel count.

Whether an array is one sample or a batch is decided against the model's input shape, where the
model is known (`pqsu.export.runtime.OrtModel.prepare`); here an array only has to be numbers of
a rank some model could take. Every failure is an `InputError` (a `PqsuError`) with a one-line message.
"""
from __future__ import annotations

import io
import json
import struct
import threading
import zlib
from pathlib import Path

import numpy as np

from pqsu.protocol.errors import PqsuError

# numpy parses a .npy header with ast.literal_eval, which on CPython 3.11 can fail with "AST constructor
# recursion depth mismatch" when threads (the HTTP API's) parse at once: one header at a time.
_HEADER_LOCK = threading.Lock()

NPY_MAGIC = b"\x93NUMPY"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAX_DIMS = 6  # a batch of samples of up to 5 axes (video clips, volumes): the model's shape decides
_JSON_DTYPES = {"uint8": np.uint8, "float32": np.float32}


class InputError(PqsuError):
    """Bytes or a file that are not an input the model can take."""


def from_npy(data: bytes) -> np.ndarray:
    """An array from `.npy` bytes; pickled (object) arrays and `.npz` archives are refused."""
    if not data.startswith(NPY_MAGIC):
        raise InputError("not a .npy array (no \\x93NUMPY magic)")
    # The header is checked against the body before anything is allocated: np.load would first
    # allocate whatever shape a (hostile) header declares, then find the data missing.
    buf = io.BytesIO(data)
    try:
        with _HEADER_LOCK:
            version = np.lib.format.read_magic(buf)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(buf)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(buf)
            else:
                raise InputError(f"unsupported .npy format version {version[0]}.{version[1]}")
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as exc:
        raise InputError(f"unreadable .npy header: {str(exc)[:160]}") from None
    if dtype.hasobject:
        raise InputError(".npy arrays of Python objects (pickle) are refused: send numbers")
    if not 1 <= len(shape) <= MAX_DIMS:
        raise InputError(f"input of shape {shape}: give one sample of the model's input shape, or a batch of them")
    count = 1
    for n in shape:
        count *= n
    body = len(data) - buf.tell()
    if count * dtype.itemsize != body:
        raise InputError(f".npy header declares {shape} {dtype} ({count * dtype.itemsize} bytes) "
                         f"but {body} bytes follow: truncated or corrupt")
    x = np.frombuffer(data, dtype=dtype, count=count, offset=buf.tell()).reshape(shape, order="F" if fortran else "C")
    return _checked(x)


def from_json(data: bytes | str | object) -> np.ndarray:
    """An array from JSON text (or an already parsed body): `{"inputs": [...]}` or a bare list."""
    if isinstance(data, (bytes, str)):
        try:
            body = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise InputError(f"body is not valid JSON: {str(exc)[:120]}") from None
    else:
        body = data
    dtype = None
    if isinstance(body, dict):
        if "inputs" not in body:
            raise InputError('JSON body needs an "inputs" key holding a nested list of numbers')
        if (name := body.get("dtype")) is not None:
            if name not in _JSON_DTYPES:
                raise InputError(f"unsupported dtype {name!r}: uint8 or float32")
            dtype = _JSON_DTYPES[name]
        body = body["inputs"]
    if not isinstance(body, list):
        raise InputError('"inputs" must be a nested list of numbers (one sample of the model\'s input shape, '
                         'or a batch of them)')
    try:
        x = np.asarray(body)
    except (ValueError, TypeError, RecursionError) as exc:  # ragged lists
        raise InputError(f'"inputs" is not a rectangular array of numbers: {str(exc)[:120]}') from None
    if x.dtype == np.bool_ or not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise InputError(f'"inputs" must hold numbers only (got {x.dtype})')
    if dtype is np.uint8 or (dtype is None and np.issubdtype(x.dtype, np.integer)):
        if x.size and (x.min() < 0 or x.max() > 255 or not np.all(np.equal(np.mod(x, 1), 0))):
            raise InputError("uint8 pixel values must be integers in 0..255 (give floats for normalized inputs)")
        x = x.astype(np.uint8)
    else:
        x = x.astype(np.float32)
    return _checked(x)


def _checked(x: np.ndarray) -> np.ndarray:
    if not (x.dtype == np.uint8 or np.issubdtype(x.dtype, np.floating)):
        raise InputError(f"dtype {x.dtype}: give uint8 images or normalized floats")
    if not 1 <= x.ndim <= MAX_DIMS:
        raise InputError(f"input of shape {x.shape}: give one sample of the model's input shape, or a batch of them")
    if x.size == 0:
        raise InputError(f"empty input {x.shape}")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        raise InputError("input holds NaN or infinite values")
    return x


# -- files (pqsu edge predict) --------------------------------------------------------------
def load_file(path: str | Path, channels: int | None = None, in_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Inputs from a file: .npy, .json, .pgm/.ppm/.pnm or .png (by content, then by suffix). An image file
    is refused when `in_shape`, the model's, is not an image's (C, H, W)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"input file {path} does not exist") from None
    except IsADirectoryError:
        raise InputError(f"input {path} is a folder, not a file") from None
    except OSError as exc:
        raise InputError(f"cannot read input file {path}: {exc.strerror}") from None
    try:
        if data.startswith(NPY_MAGIC):
            return from_npy(data)
        if data.startswith(PNG_MAGIC) or data[:2] in (b"P5", b"P6"):
            if in_shape is not None and len(in_shape) != 3:
                raise InputError(f"an image file fits image models only; this model takes samples of shape "
                                 f"{tuple(in_shape)}: give a .npy array or JSON inputs")
            return _channels(read_png(data) if data.startswith(PNG_MAGIC) else read_pnm(data), channels)
        if path.suffix.lower() == ".json" or data.lstrip()[:1] in (b"{", b"["):
            return from_json(data)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None
    raise InputError(f"{path}: not a .npy array, JSON inputs, PNG or binary PGM/PPM image")


def _channels(img: np.ndarray, channels: int | None) -> np.ndarray:
    """(C, H, W) uint8 with the model's channel count: grey -> RGB repeats, RGB -> grey by luma."""
    if channels is None or img.shape[0] == channels:
        return img
    if img.shape[0] == 1 and channels == 3:
        return np.repeat(img, 3, axis=0)
    if img.shape[0] == 3 and channels == 1:
        luma = 0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]
        return np.clip(np.rint(luma), 0, 255).astype(np.uint8)[None]
    raise InputError(f"image has {img.shape[0]} channels, the model takes {channels}")


def read_pnm(data: bytes) -> np.ndarray:
    """Binary 8-bit PGM (P5) or PPM (P6) -> (C, H, W) uint8."""
    fields, pos = [], 2
    while len(fields) < 3:
        while pos < len(data) and data[pos:pos + 1].isspace():
            pos += 1
        if data[pos:pos + 1] == b"#":
            while pos < len(data) and data[pos:pos + 1] not in (b"\n", b"\r"):
                pos += 1
            continue
        start = pos
        while pos < len(data) and data[pos:pos + 1].isdigit():
            pos += 1
        if start == pos:
            raise InputError("malformed PGM/PPM header")
        fields.append(int(data[start:pos]))
    width, height, maxval = fields
    pos += 1  # the single whitespace after maxval
    if not 1 <= maxval <= 255:
        raise InputError(f"only 8-bit PGM/PPM images are supported (maxval {maxval})")
    c = 1 if data[:2] == b"P5" else 3
    need = width * height * c
    pixels = np.frombuffer(data, np.uint8, count=need, offset=pos) if len(data) - pos >= need else None
    if pixels is None or width < 1 or height < 1:
        raise InputError("truncated PGM/PPM image")
    img = pixels.reshape(height, width, c).transpose(2, 0, 1)
    if maxval != 255:
        img = np.clip(np.rint(img.astype(np.float32) * (255.0 / maxval)), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(img)


_PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # colour type -> samples per pixel


def read_png(data: bytes) -> np.ndarray:
    """8-bit, non-interlaced grey / grey+alpha / RGB / RGBA PNG -> (C, H, W) uint8 (alpha dropped)."""
    pos, header, idat = len(PNG_MAGIC), None, []
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if len(body) != length:
            raise InputError("truncated PNG image")
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    if header is None or not idat:
        raise InputError("PNG image without IHDR or IDAT")
    width, height, depth, colour, _, _, interlace = header
    if depth != 8 or colour not in _PNG_CHANNELS or interlace:
        raise InputError("only 8-bit, non-interlaced grey/RGB(A) PNG images are supported")
    spp = _PNG_CHANNELS[colour]
    stride = width * spp
    if width * height > 1 << 26:
        raise InputError("PNG image too large")
    try:
        raw = zlib.decompressobj().decompress(b"".join(idat), height * (stride + 1))
    except zlib.error as exc:
        raise InputError(f"corrupt PNG image data: {exc}") from None
    if len(raw) < height * (stride + 1):
        raise InputError("truncated PNG image data")
    rows = np.frombuffer(raw, np.uint8, count=height * (stride + 1)).reshape(height, stride + 1)
    out = np.zeros((height, stride), np.int32)
    prev = np.zeros(stride, np.int32)
    for y in range(height):
        f, line = rows[y, 0], rows[y, 1:].astype(np.int32)
        if f == 0:
            cur = line
        elif f == 1:  # Sub: depends on the reconstructed left neighbour
            cur = line.copy()
            for i in range(spp, stride):
                cur[i] = (cur[i] + cur[i - spp]) & 0xFF
        elif f == 2:
            cur = (line + prev) & 0xFF
        elif f == 3:
            cur = line.copy()
            for i in range(stride):
                left = cur[i - spp] if i >= spp else 0
                cur[i] = (cur[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif f == 4:
            cur = line.copy()
            for i in range(stride):
                a = cur[i - spp] if i >= spp else 0
                b, c = prev[i], prev[i - spp] if i >= spp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                cur[i] = (cur[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        else:
            raise InputError(f"corrupt PNG image: filter type {f}")
        out[y], prev = cur, cur
    img = out.astype(np.uint8).reshape(height, width, spp).transpose(2, 0, 1)
    if spp in (2, 4):  # drop alpha
        img = img[:spp - 1]
    return np.ascontiguousarray(img)
