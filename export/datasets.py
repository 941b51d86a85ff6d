"""Labelled data sets as plain numpy arrays, images or any other input shape.

Built in: Fashion-MNIST, MNIST (IDX files), CIFAR-10 (python batches) and the sensor recordings
that time-series packages ship (`pqsu.export.sensors`). A user's own data is a labelled-array
.npz file (`pqsu.export.labelled`), named wherever a data set name goes.
numpy + stdlib only, so a board without torch can load and normalize data too.
"""

from __future__ import annotations

import gzip
import importlib
import math
import os
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pqsu.export.labelled import channel_stats, is_labelled_file, read_labelled
from pqsu.export.sensors import SENSOR_SETS, load_sensor_splits
from pqsu.protocol.errors import PqsuError

__all__ = ["DATASETS", "ArrayDataset", "DatasetError", "load_dataset", "read_idx"]


class DatasetError(PqsuError):
    """A data set that is missing, corrupt or asked for by a wrong name/split."""


IMAGE_DATASETS: tuple[str, ...] = ("fashion-mnist", "mnist", "cifar10")
DATASETS: tuple[str, ...] = IMAGE_DATASETS + tuple(SENSOR_SETS)
SPLITS: tuple[str, ...] = ("train", "test")

_CLASSES: dict[str, list[str]] = {
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
    "mnist": [str(d) for d in range(10)],
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer",
                "dog", "frog", "horse", "ship", "truck"],
}
# Per-channel mean/std of the training split in [0, 1]. For CIFAR-10 these are the true
# pixel std (0.247...), not the often-copied (0.2023, 0.1994, 0.2010), which are std of means.
_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
_DEFAULT_ROOTS: dict[str, str] = {
    "fashion-mnist": "/usr/share/datasets/fashion-mnist",
    "mnist": "/usr/share/datasets/mnist",
    "cifar10": "~/.cache/pqsu/cifar-10-batches-py",
}


# --------------------------------------------------------------------------- container

@dataclass(eq=False)  # identity equality: comparing image arrays elementwise is never meant
class ArrayDataset:
    """Samples `x` (N, C, ...) and labels `y` int64 (N,), with class names and per-channel norm stats.

    `x` is uint8 pixels (images, scaled by 1/255 before normalizing) or float32 readings (any
    shape after the channel axis: (N, C, L) sensor windows, (N, F) feature vectors); channel
    means and stds are in the units of the scaled values. Arrays loaded from IDX files are
    zero-copy views of the decompressed file and therefore read-only; `subset`/`sample` return
    copies you may modify.
    """

    x: np.ndarray
    y: np.ndarray
    name: str
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        self.y = np.asarray(self.y, dtype=np.int64)
        if np.issubdtype(self.x.dtype, np.floating) and self.x.dtype != np.float32:
            self.x = self.x.astype(np.float32)
        if self.x.ndim < 2 or self.x.dtype not in (np.uint8, np.float32):
            raise DatasetError(f"{self.name}: samples must be uint8 pixels or float readings, batch first "
                               f"(N, C, ...), got {self.x.dtype} {self.x.shape}")
        if self.y.shape != (len(self.x),):
            raise DatasetError(f"{self.name}: {len(self.x)} samples but labels of shape {self.y.shape}")
        if not len(self.mean) == len(self.std) == self.x.shape[1]:
            raise DatasetError(f"{self.name}: mean/std need one value per channel ({self.x.shape[1]}), "
                               f"got {len(self.mean)} and {len(self.std)}")

    def __len__(self) -> int:
        return len(self.y)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one sample: (C, H, W) for images, (C, L) for sensor windows."""
        return tuple(int(d) for d in self.x.shape[1:])

    @property
    def pixels(self) -> bool:
        """True for uint8 images (scaled by 1/255 before normalizing), False for float readings."""
        return self.x.dtype == np.uint8

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, indices: Sequence[int] | np.ndarray) -> ArrayDataset:
        """A new data set holding the samples at `indices` (copied), same names and stats."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return ArrayDataset(self.x[idx], self.y[idx], self.name, list(self.classes),
                            self.mean, self.std)

    def head(self, n: int) -> ArrayDataset:
        """The first `n` samples (all of them if `n` >= len)."""
        return self.subset(np.arange(min(max(n, 0), len(self))))

    def sample(self, n: int, seed: int = 0) -> ArrayDataset:
        """`n` distinct samples drawn with `seed`, kept in data-set order (all if `n` >= len)."""
        if n >= len(self):
            return self.subset(np.arange(len(self)))
        picked = np.random.default_rng(seed).choice(len(self), size=max(n, 0), replace=False)
        return self.subset(np.sort(picked))

    def normalized(self, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """float32 of (x/255 - mean)/std (pixels) or (x - mean)/std (readings), per channel, for all
        samples or the given `indices`."""
        x = self.x if indices is None else self.x[np.asarray(indices, dtype=np.int64)]
        out = x.astype(np.float32, copy=True)
        unit = 255.0 if self.pixels else 1.0
        for c, (m, s) in enumerate(zip(self.mean, self.std)):
            # (x/unit - m)/s folded into one scale and one shift, in place: no float64 temporaries.
            out[:, c] *= np.float32(1.0 / (unit * s))
            out[:, c] -= np.float32(m / s)
        return out


# --------------------------------------------------------------------------- IDX

# IDX type code -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT").
_IDX_DTYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file, gzipped or raw (told apart by the gzip magic, not the name).

    Multi-byte types come back in native byte order. Raises DatasetError naming the file
    when it is unreadable, not IDX, or its data length does not match its dimensions.
    """
    path = Path(path)
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"cannot read {path}: {e.strerror or e}") from e
    if blob[:2] == b"\x1f\x8b":
        try:
            blob = gzip.decompress(blob)
        except (OSError, EOFError, zlib.error) as e:
            raise DatasetError(f"{path}: corrupt or truncated gzip data ({e})") from e
    if len(blob) < 4 or blob[:2] != b"\x00\x00":
        raise DatasetError(f"{path}: not an IDX file (bad magic {blob[:4].hex() or 'empty'}; "
                           "expected 0000 + type + ndim)")
    code, ndim = blob[2], blob[3]
    if code not in _IDX_DTYPES:
        raise DatasetError(f"{path}: unknown IDX data type 0x{code:02x}")
    header = 4 + 4 * ndim
    if ndim == 0 or len(blob) < header:
        raise DatasetError(f"{path}: IDX header truncated or ndim={ndim} invalid")
    dims = tuple(int(d) for d in np.frombuffer(blob, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = math.prod(dims) * dtype.itemsize
    have = len(blob) - header
    if have != expected:
        problem = "truncated" if have < expected else "trailing bytes"
        raise DatasetError(f"{path}: dims {dims} need {expected} data bytes, file has {have} ({problem})")
    arr = np.frombuffer(blob, dtype, offset=header).reshape(dims)
    return arr if dtype.itemsize == 1 else arr.astype(dtype.newbyteorder("="))


def _idx_file(root: Path, stem: str) -> Path | None:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _load_idx_pair(name: str, root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    files = [_idx_file(root, s) for s in stems]
    missing = [s for s, f in zip(stems, files) if f is None]
    if missing:
        raise DatasetError(_missing_message(name, root, f"no {' or '.join(missing)}[.gz]"))
    images, labels = read_idx(files[0]), read_idx(files[1])
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DatasetError(f"{files[0]}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DatasetError(f"{files[1]}: expected {len(images)} labels, got shape {labels.shape}")
    if labels.size and labels.max() >= len(_CLASSES[name]):
        raise DatasetError(f"{files[1]}: label {labels.max()} out of range for {name}")
    return images[:, None], labels


# --------------------------------------------------------------------------- CIFAR-10

def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Python 3 pickles bytes at protocol < 3 as _codecs.encode(str, "latin1"); allow only that codec.
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r} is not allowed")
    return text.encode("latin1")


def _numpy_attr(name: str) -> Any:
    for module in ("numpy._core.multiarray", "numpy._core.numeric", "numpy.core.multiarray",
                   "numpy.core.numeric"):
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise AttributeError(name)


def _allowed_globals() -> dict[tuple[str, str], Any]:
    # Map every module path numpy 1.x and 2.x write into pickles to the live object, looked
    # up once here, so old paths resolve without importing numpy.core shims (and their warnings).
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                                           ("_codecs", "encode"): _latin1_encode}
    for name, modules in (("_reconstruct", ("multiarray",)), ("scalar", ("multiarray",)),
                          ("_frombuffer", ("numeric",))):
        obj = _numpy_attr(name)
        for pkg in ("numpy.core", "numpy._core"):
            for mod in modules:
                allowed[(f"{pkg}.{mod}", name)] = obj
    return allowed


class _BatchUnpickler(pickle.Unpickler):
    """Unpickler that can only build numpy arrays, dicts, lists, strings and numbers.

    A pickle can name any importable callable (os.system, builtins.eval, ...) and the stock
    unpickler would call it: loading a downloaded "CIFAR batch" would be arbitrary code
    execution. Every global goes through find_class, so an allowlist closes that door.
    """

    _ALLOWED: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if _BatchUnpickler._ALLOWED is None:
            _BatchUnpickler._ALLOWED = _allowed_globals()
        try:
            return _BatchUnpickler._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing {module}.{name}") from None


def _get(batch: dict, key: str) -> Any:
    # The original batches were pickled by Python 2: with encoding="bytes" their keys are bytes.
    return batch[key.encode()] if key.encode() in batch else batch[key]


def _load_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as f:
            batch = _BatchUnpickler(f, encoding="bytes").load()
        data, labels = _get(batch, "data"), np.asarray(_get(batch, "labels"), dtype=np.int64)
    except pickle.UnpicklingError as e:
        raise DatasetError(f"{path}: not a CIFAR-10 python batch ({e}); refused to load it") from e
    except (OSError, EOFError, KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise DatasetError(f"{path}: unreadable CIFAR-10 batch ({type(e).__name__}: {e})") from e
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DatasetError(f"{path}: b'data' must be uint8 (N, 3072), got "
                           f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}")
    if labels.shape != (len(data),) or (labels.size and (labels.min() < 0 or labels.max() > 9)):
        raise DatasetError(f"{path}: need {len(data)} labels in 0..9, got shape {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar10(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise DatasetError(_missing_message("cifar10", root, f"no {', '.join(missing)}"))
    parts = [_load_cifar_batch(root / n) for n in names]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


# --------------------------------------------------------------------------- entry point

def _env_var(name: str) -> str:
    return "PQSU_DATA_" + name.upper().replace("-", "_")


def _missing_message(name: str, root: Path, what: str) -> str:
    how = {
        "fashion-mnist": "install it with `apt-get install dataset-fashion-mnist`, or put the four "
                         "IDX files (train/t10k-images-idx3-ubyte, train/t10k-labels-idx1-ubyte, .gz or raw) "
                         "in a folder and pass --data-root",
        "mnist": f"put the four MNIST IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                 f"t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, .gz or raw) in {root} or pass --data-root",
        "cifar10": f"download the CIFAR-10 python version (cifar-10-python.tar.gz from "
                   f"https://www.cs.toronto.edu/~kriz/cifar.html), extract it and put the "
                   f"`cifar-10-batches-py` folder (data_batch_1..5, test_batch) at {root} or pass --data-root",
    }[name]
    return f"{name} not found in {root} ({what}): {how} (or set {_env_var(name)})"


def load_dataset(name: str, split: str = "train", root: str | Path | None = None) -> ArrayDataset:
    """Load `split` ("train" or "test") of data set `name`: one of DATASETS, or a labelled-array
    .npz file's path (`pqsu.export.labelled`).

    The folder is `root`, else env var PQSU_DATA_<NAME> (e.g. PQSU_DATA_FASHION_MNIST), else
    the standard place (Debian package for Fashion-MNIST, ~/.cache/pqsu for CIFAR-10, the
    installed sktime package for the sensor sets).
    """
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r} for {name}; choose one of: {', '.join(SPLITS)}")
    if is_labelled_file(name):
        return read_labelled(Path(name).expanduser(), split)
    key = name.strip().lower().replace("_", "-")
    if key not in DATASETS:
        raise DatasetError(f"unknown data set {name!r}; choose one of: {', '.join(DATASETS)}, "
                           "or a labelled-array .npz file")
    if key in SENSOR_SETS:
        return _load_sensor_set(key, split, root if root is not None else os.environ.get(_env_var(key)))
    folder = Path(root if root is not None else os.environ.get(_env_var(key)) or _DEFAULT_ROOTS[key]).expanduser()
    if not folder.is_dir():
        raise DatasetError(_missing_message(key, folder, "no such folder"))
    x, y = _load_cifar10(folder, split) if key == "cifar10" else _load_idx_pair(key, folder, split)
    mean, std = _STATS[key]
    return ArrayDataset(x, y, key, list(_CLASSES[key]), mean, std)


def _load_sensor_set(key: str, split: str, root: str | Path | None) -> ArrayDataset:
    parts = load_sensor_splits(key, root)
    mean, std = channel_stats(parts.train_x)  # the training split's own, as the image sets' are
    x, y = (parts.train_x, parts.train_y) if split == "train" else (parts.test_x, parts.test_y)
    return ArrayDataset(x, y, key, list(parts.classes), mean, std)
