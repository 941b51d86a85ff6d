"""A device's local training data: an .npz shard, a folder of shards, or IDX files.

Images stay uint8 (N, C, H, W) until a model says how to normalize them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pqsu.export.datasets import DatasetError, read_idx


def load_local_data(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, C, H, W), labels int64) from `path`.

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
        with np.load(path, allow_pickle=False) as z:
            x, y = z["x"], z["y"]
    except (OSError, ValueError, KeyError) as exc:
        raise DatasetError(f"local data shard {path} is unreadable or lacks arrays x and y: {exc}") from None
    return _checked(x, y, path)


def _checked(x: np.ndarray, y: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray]:
    if x.dtype != np.uint8 or x.ndim != 4 or y.shape != (len(x),):
        raise DatasetError(f"{path}: need uint8 images (N, C, H, W) and N labels, got {x.dtype} {x.shape}, {y.shape}")
    return x, y.astype(np.int64)
