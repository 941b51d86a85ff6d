"""Data loading: IDX reader, Fashion-MNIST / MNIST / CIFAR-10 loaders, the restricted unpickler."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from pqsu.export.datasets import DATASETS, ArrayDataset, DatasetError, load_dataset, read_idx
from pqsu.protocol.errors import PqsuError

FMNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(
    not FMNIST_ROOT.is_dir(),
    reason=f"{FMNIST_ROOT} missing (Debian package dataset-fashion-mnist not installed)")

_CODES = {"u1": 0x08, "i1": 0x09, ">i2": 0x0B, ">i4": 0x0C, ">f4": 0x0D, ">f8": 0x0E}


def idx_bytes(arr: np.ndarray, dtype: str = "u1") -> bytes:
    header = bytes([0, 0, _CODES[dtype], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + np.asarray(arr).astype(dtype).tobytes()


def write(path: Path, blob: bytes, gz: bool = False) -> Path:
    path.write_bytes(gzip.compress(blob) if gz else blob)
    return path


def fake_mnist(root: Path, n_train: int = 12, n_test: int = 5, gz: bool = True) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        sfx = ".gz" if gz else ""
        write(root / f"{prefix}-images-idx3-ubyte{sfx}",
              idx_bytes(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)), gz)
        write(root / f"{prefix}-labels-idx1-ubyte{sfx}", idx_bytes(np.arange(n) % 10), gz)
    return root


# ------------------------------------------------------------------ read_idx

@pytest.mark.parametrize("dtype", list(_CODES))
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip(tmp_path: Path, dtype: str, gz: bool) -> None:
    arr = np.arange(2 * 3 * 4).reshape(2, 3, 4) - (0 if dtype == "u1" else 7)
    if "f" in dtype:
        arr = arr * 0.5
    got = read_idx(write(tmp_path / "a.idx", idx_bytes(arr, dtype), gz))
    assert got.shape == (2, 3, 4)
    assert got.dtype.isnative
    np.testing.assert_array_equal(got, arr.astype(dtype))


def test_gzip_detected_by_magic_not_name(tmp_path: Path) -> None:
    arr = np.arange(10, dtype=np.uint8)
    np.testing.assert_array_equal(read_idx(write(tmp_path / "raw.gz", idx_bytes(arr))), arr)
    np.testing.assert_array_equal(read_idx(write(tmp_path / "packed", idx_bytes(arr), gz=True)), arr)


@pytest.mark.parametrize("blob, gz, what", [
    (b"\x01\x00\x08\x01" + struct.pack(">I", 3) + b"abc", False, "magic"),
    (b"\x00\x00\x07\x01" + struct.pack(">I", 3) + b"abc", False, "type"),
    (b"\x00\x00\x08\x02" + struct.pack(">I", 3), False, "header"),
    (b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"abc", False, "truncated"),
    (b"\x00\x00\x08\x01" + struct.pack(">I", 2) + b"abc", False, "trailing"),
    (b"\x00\x00\x08\x02" + struct.pack(">II", 2, 2) + b"abc", True, "truncated"),
    (b"", False, "magic"),
])
def test_corrupt_idx_names_file(tmp_path: Path, blob: bytes, gz: bool, what: str) -> None:
    path = write(tmp_path / "broken-idx1-ubyte", blob, gz)
    with pytest.raises(DatasetError, match=what) as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_truncated_gzip(tmp_path: Path) -> None:
    packed = gzip.compress(idx_bytes(np.arange(1000, dtype=np.uint8) % 7))
    path = write(tmp_path / "cut.gz", packed[: len(packed) // 2])
    with pytest.raises(DatasetError, match="gzip") as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="cannot read"):
        read_idx(tmp_path / "nope")


# ------------------------------------------------------------------ IDX data sets

@pytest.mark.parametrize("gz", [True, False])
def test_load_mnist_like_folder(tmp_path: Path, gz: bool) -> None:
    root = fake_mnist(tmp_path / "mnist", gz=gz)
    ds = load_dataset("mnist", "train", root=root)
    assert ds.x.shape == (12, 1, 28, 28) and ds.x.dtype == np.uint8
    assert ds.y.dtype == np.int64 and list(ds.y[:3]) == [0, 1, 2]
    assert ds.classes == [str(d) for d in range(10)] and ds.mean == (0.1307,)
    assert len(load_dataset("mnist", "test", root=root)) == 5


def test_env_var_overrides_default_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PQSU_DATA_FASHION_MNIST", str(fake_mnist(tmp_path / "f")))
    ds = load_dataset("fashion-mnist", "test")
    assert len(ds) == 5 and ds.classes[0] == "T-shirt/top"


def test_label_mismatch_names_file(tmp_path: Path) -> None:
    root = fake_mnist(tmp_path / "m")
    write(root / "train-labels-idx1-ubyte.gz", idx_bytes(np.zeros(3, np.uint8)), gz=True)
    with pytest.raises(DatasetError, match="train-labels-idx1-ubyte"):
        load_dataset("mnist", root=root)


@pytest.mark.parametrize("name, hint", [
    ("fashion-mnist", "apt-get install dataset-fashion-mnist"),
    ("mnist", "--data-root"),
    ("cifar10", "cifar-10-batches-py"),
])
def test_missing_dataset_says_how_to_get_it(tmp_path: Path, name: str, hint: str) -> None:
    for root in (tmp_path / "absent", tmp_path):  # no folder, and a folder without the files
        with pytest.raises(DatasetError) as err:
            load_dataset(name, root=root)
        assert hint in str(err.value) and str(root) in str(err.value)


def test_unknown_name_and_split(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as err:
        load_dataset("imagenet")
    assert all(n in str(err.value) for n in DATASETS)
    with pytest.raises(DatasetError, match="train"):
        load_dataset("mnist", "validation", root=tmp_path)
    assert issubclass(DatasetError, PqsuError)


@needs_fmnist
def test_real_fashion_mnist() -> None:
    train, test = load_dataset("fashion-mnist"), load_dataset("fashion-mnist", "test")
    assert train.x.shape == (60000, 1, 28, 28) and test.x.shape == (10000, 1, 28, 28)
    assert train.input_shape == (1, 28, 28) and train.num_classes == 10
    assert set(np.unique(train.y)) == set(range(10)) and test.y.min() >= 0 and test.y.max() <= 9
    assert train.classes == ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                             "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    z = train.normalized()
    assert z.dtype == np.float32 and z.shape == train.x.shape
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01


# ------------------------------------------------------------------ ArrayDataset

def toy(n: int = 20, channels: int = 3) -> ArrayDataset:
    x = np.arange(n * channels * 4, dtype=np.int64).reshape(n, channels, 2, 2).astype(np.uint8)
    return ArrayDataset(x, np.arange(n) % 10, "toy", [str(i) for i in range(10)],
                        (0.5,) * channels, (0.25,) * channels)


def test_subset_head_sample() -> None:
    ds = toy()
    sub = ds.subset([3, 1])
    assert list(sub.y) == [3, 1] and sub.classes == ds.classes and sub.input_shape == (3, 2, 2)
    assert list(ds.head(4).y) == [0, 1, 2, 3] and len(ds.head(100)) == 20
    a, b, c = ds.sample(6, seed=1), ds.sample(6, seed=1), ds.sample(6, seed=2)
    np.testing.assert_array_equal(a.x, b.x)
    assert not np.array_equal(a.x, c.x)
    assert len(set(a.x[:, 0, 0, 0].tolist())) == 6  # distinct samples
    assert len(ds.sample(50)) == 20


def test_normalized_matches_formula() -> None:
    ds = toy()
    want = ((ds.x[[2, 5]] / 255.0 - 0.5) / 0.25).astype(np.float32)
    np.testing.assert_allclose(ds.normalized([2, 5]), want, rtol=1e-6, atol=1e-6)
    assert ds.normalized().shape == ds.x.shape


def test_bad_arrays_rejected() -> None:
    with pytest.raises(DatasetError):
        ArrayDataset(np.zeros((4, 28, 28), np.uint8), np.zeros(4), "x", ["a"], (0.5,), (0.5,))
    with pytest.raises(DatasetError):
        ArrayDataset(np.zeros((4, 1, 2, 2), np.uint8), np.zeros(3), "x", ["a"], (0.5,), (0.5,))


# ------------------------------------------------------------------ CIFAR-10

def fake_cifar(root: Path, per_batch: int = 3, protocol: int = 2, byte_keys: bool = True) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [(i + j) % 10 for j in range(per_batch)]
        batch = {"data": data, "labels": labels, "batch_label": f"batch {i}"}
        if byte_keys:  # what Python 2 cPickle batches look like under encoding="bytes"
            batch = {k.encode(): v for k, v in batch.items()}
        with (root / name).open("wb") as f:
            pickle.dump(batch, f, protocol=protocol)
    return root


@pytest.mark.parametrize("protocol, byte_keys", [(2, True), (5, False), (pickle.DEFAULT_PROTOCOL, True)])
def test_load_fake_cifar(tmp_path: Path, protocol: int, byte_keys: bool) -> None:
    root = fake_cifar(tmp_path / "cifar-10-batches-py", protocol=protocol, byte_keys=byte_keys)
    train, test = load_dataset("cifar10", root=root), load_dataset("cifar10", "test", root=root)
    assert train.x.shape == (15, 3, 32, 32) and test.x.shape == (3, 3, 32, 32)
    assert train.classes[0] == "airplane" and len(train.mean) == 3
    with (root / "test_batch").open("rb") as f:
        raw = pickle.load(f, encoding="bytes")
    raw_data = raw[b"data"] if byte_keys else raw["data"]
    np.testing.assert_array_equal(test.x[1], raw_data[1].reshape(3, 32, 32))  # channel-major rows


class _Evil:
    def __init__(self, func: object, arg: str) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self) -> tuple:
        return self.func, (self.arg,)


@pytest.mark.parametrize("func", [os.system, eval, __import__])
def test_malicious_pickle_refused(tmp_path: Path, func: object) -> None:
    root = fake_cifar(tmp_path / "cifar-10-batches-py")
    marker = tmp_path / "pwned"
    payload = {b"data": _Evil(func, f"open({str(marker)!r}, 'w')" if func is eval else f"touch {marker}"),
               b"labels": [0]}
    with (root / "test_batch").open("wb") as f:
        pickle.dump(payload, f, protocol=2)
    with pytest.raises(DatasetError, match="refus") as err:
        load_dataset("cifar10", "test", root=root)
    assert "test_batch" in str(err.value)
    assert not marker.exists()


def test_cifar_wrong_content(tmp_path: Path) -> None:
    root = fake_cifar(tmp_path / "c")
    with (root / "test_batch").open("wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(DatasetError, match="3072"):
        load_dataset("cifar10", "test", root=root)
    (root / "test_batch").write_bytes(b"\x80\x02garbage")
    with pytest.raises(DatasetError, match="test_batch"):
        load_dataset("cifar10", "test", root=root)


def test_cifar_batch_from_numpy1_pickle(tmp_path: Path) -> None:
    """The real batches name numpy.core.multiarray (numpy 1.x); that path must load on numpy 2 too."""
    root = fake_cifar(tmp_path / "c")
    data = np.arange(2 * 3072, dtype=np.int64).reshape(2, 3072).astype(np.uint8)
    blob = pickle.dumps({b"data": data, b"labels": [4, 2]}, protocol=2)
    blob = blob.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert b"numpy.core.multiarray" in blob
    (root / "test_batch").write_bytes(blob)
    ds = load_dataset("cifar10", "test", root=root)
    assert list(ds.y) == [4, 2]
    np.testing.assert_array_equal(ds.x.reshape(2, -1), data)
