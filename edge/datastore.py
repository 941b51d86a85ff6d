"""A device's local training data: an .npz shard, a folder of shards, or IDX files.

A shard is a labelled-array file (`pqsu.export.labelled`: arrays x and y): uint8 images
(N, C, H, W), float sensor windows (N, C, L) or any other input shape. Samples stay raw
until a model says how to normalize them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pqsu.export.datasets import DatasetError, read_idx
from pqsu.export.labelled import LabelledDataError, checked_labels, checked_samples, read_npz


def load_local_data(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(samples uint8 or float32 (N, C, ...), labels int64) from `path`.

    - `shard.npz` with arrays `x` and `y` (what `pqsu run` writes for each device);
    - a folder of such shards (concatenated in name order);
    - a folder with IDX files `train-images-idx3-ubyte[.gz]` and `train-labels-idx1-ubyte[.gz]`.
    """
    path = Path(path)
    if path.is_file():
        return _npz(path)
    if not path.is_dir():
        raise DatasetError(f"local data {path} does not exist (give an .npz shard or a folder)")
    shards = sorted(path.glob("*.npz"))
    if shards:
        parts = [_npz(p) for p in shards]
        kinds = {(x.dtype, x.shape[1:]) for x, _ in parts}
        if len(kinds) > 1:
            raise DatasetError(f"{path}: its shards hold samples of different kinds {sorted(map(str, kinds))}")
        return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])
    images = next((p for p in (path / "train-images-idx3-ubyte", path / "train-images-idx3-ubyte.gz") if p.exists()), None)
    labels = next((p for p in (path / "train-labels-idx1-ubyte", path / "train-labels-idx1-ubyte.gz") if p.exists()), None)
    if images is None or labels is None:
        raise DatasetError(f"{path} holds neither .npz shards nor train-images/train-labels IDX files")
    x, y = read_idx(images), read_idx(labels).astype(np.int64)
    if x.ndim == 3:
        x = x[:, None]
    return _checked(x, y, path)


def _npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        arrays = read_npz(path)
    except LabelledDataError as exc:
        raise DatasetError(f"local data shard {exc}") from None
    return _checked(arrays["x"], arrays["y"], path)


def _checked(x: np.ndarray, y: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        x = checked_samples(x, str(path))
        return x, checked_labels(y, len(x), str(path))
    except LabelledDataError as exc:
        raise DatasetError(str(exc)) from None
