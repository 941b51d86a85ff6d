"""The labelled-array file: a user's own data of any input shape, as one .npz.

Arrays (numpy's `np.savez`, no pickled objects):
- `x`: the samples, batch first: (N, C, H, W) images, (N, C, L) sensor windows, (N, F)
  feature vectors. uint8 is read as pixels (scaled by 1/255 before normalizing), any float
  dtype as readings in their own units.
- `y`: N integer labels in 0..K-1.
- `classes` (optional): K class names; default "0".."K-1" for the labels seen.
- `mean`, `std` (optional): one value per channel (x.shape[1]), in the units of the scaled
  values, so the model normalizes (x - mean) / std; computed from the training samples if absent.
- `x_test`, `y_test` (optional): the test split. Without them a fifth of the samples, picked by
  a fixed permutation, is held out as the test split, so train and test never overlap.

The same file serves `pqsu export --data`, the cloud's proxy and evaluation data (give its path
as the data set name) and a device's local store; calibration data (`--calib-data`) needs `x` only.
numpy + stdlib only.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pqsu.protocol.errors import PqsuError

HOLDOUT_FRACTION = 0.2
HOLDOUT_SEED = 0


class LabelledDataError(PqsuError):
    """A labelled-array file that is missing, unreadable or inconsistent."""


def is_labelled_file(name: str | Path) -> bool:
    return str(name).lower().endswith(".npz")


def read_npz(path: str | Path, required: tuple[str, ...] = ("x", "y")) -> dict[str, np.ndarray]:
    """Every array of an .npz file (pickled objects refused), with `required` ones present."""
    path = Path(path)
    if not path.is_file():
        raise LabelledDataError(f"data file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except ValueError as exc:  # object arrays need pickle, which is refused
        raise LabelledDataError(f"{path}: holds pickled objects, which are refused ({exc})") from None
    except Exception as exc:  # a damaged zip raises zipfile, OSError, EOFError...
        raise LabelledDataError(f"{path} is not a readable .npz file: {exc}") from None
    missing = [k for k in required if k not in arrays]
    if missing:
        raise LabelledDataError(f"{path} lacks array(s) {', '.join(missing)} (it has {', '.join(arrays) or 'none'}); "
                                "a labelled-array file holds x (samples, batch first) and y (labels)")
    return arrays


def checked_samples(x: np.ndarray, where: str) -> np.ndarray:
    """`x` as uint8 pixels or float32 readings, batch first with a channel axis, or a one-line error."""
    x = np.asarray(x)
    if np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32, copy=False)
        if not np.isfinite(x).all():
            raise LabelledDataError(f"{where}: x holds NaN or infinite values")
    elif x.dtype != np.uint8:
        raise LabelledDataError(f"{where}: x is {x.dtype}; give uint8 pixels or float readings")
    if x.ndim < 2 or len(x) == 0:
        raise LabelledDataError(f"{where}: x of shape {x.shape} is not a batch of samples (N, C, ...) with N >= 1")
    return x


def checked_labels(y: np.ndarray, n: int, where: str, num_classes: int | None = None) -> np.ndarray:
    y = np.asarray(y)
    if y.shape != (n,) or not (np.issubdtype(y.dtype, np.integer) or (y.size == 0)):
        raise LabelledDataError(f"{where}: y must be {n} integer labels, got {y.dtype} {y.shape}")
    if y.size and (y.min() < 0 or (num_classes is not None and y.max() >= num_classes)):
        bound = f"0..{num_classes - 1}" if num_classes is not None else ">= 0"
        raise LabelledDataError(f"{where}: labels must be in {bound}, found {y.min()}..{y.max()}")
    return y.astype(np.int64)


def channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of the scaled values (x/255 for pixels); a constant channel gets std 1."""
    axes = (0, *range(2, x.ndim))
    values = x.astype(np.float64) / (255.0 if x.dtype == np.uint8 else 1.0)
    mean, std = values.mean(axis=axes), values.std(axis=axes)
    return tuple(float(m) for m in mean), tuple(float(s) if s > 1e-12 else 1.0 for s in std)


def read_labelled(path: str | Path, split: str = "train"):
    """The `split` ("train", "test", or "all": x and y whole) of a labelled-array file, as an ArrayDataset."""
    from pqsu.export.datasets import ArrayDataset  # datasets imports this module to dispatch on file names

    path = Path(path)
    a = read_npz(path)
    where = str(path)
    x = checked_samples(a["x"], where)
    names = [str(c) for c in a["classes"].reshape(-1)] if "classes" in a else None
    y = checked_labels(a["y"], len(x), where, len(names) if names else None)
    if ("x_test" in a) != ("y_test" in a):
        raise LabelledDataError(f"{where}: x_test and y_test come together")
    if split == "all":
        train, test = (x, y), (x[:0], y[:0])
    elif "x_test" in a:
        x_test = checked_samples(a["x_test"], f"{where} (x_test)")
        if x_test.shape[1:] != x.shape[1:] or x_test.dtype != x.dtype:
            raise LabelledDataError(f"{where}: x_test is {x_test.dtype} {x_test.shape[1:]}, "
                                    f"x is {x.dtype} {x.shape[1:]}")
        y_test = checked_labels(a["y_test"], len(x_test), f"{where} (y_test)", len(names) if names else None)
        train, test = (x, y), (x_test, y_test)
    else:
        order = np.random.default_rng(HOLDOUT_SEED).permutation(len(y))
        held = np.sort(order[:int(round(HOLDOUT_FRACTION * len(y)))])
        kept = np.sort(order[int(round(HOLDOUT_FRACTION * len(y))):])
        train, test = (x[kept], y[kept]), (x[held], y[held])
    if names is None:
        names = [str(i) for i in range(int(max(train[1].max(initial=0), test[1].max(initial=0))) + 1)]
    channels = x.shape[1]
    if ("mean" in a) != ("std" in a):
        raise LabelledDataError(f"{where}: mean and std come together")
    if "mean" in a:
        mean, std = (tuple(float(v) for v in np.asarray(a[k], np.float64).reshape(-1)) for k in ("mean", "std"))
        if len(mean) != channels or len(std) != channels:
            raise LabelledDataError(f"{where}: mean and std need one value per channel ({channels}), "
                                    f"got {len(mean)} and {len(std)}")
        if min(std) <= 0:
            raise LabelledDataError(f"{where}: std must be positive")
    else:
        mean, std = channel_stats(train[0])
    xs, ys = train if split in ("train", "all") else test
    return ArrayDataset(xs, ys, path.name, names, mean, std)
