"""Real sensor recordings that time-series packages ship inside their wheels, as data sets.

sktime (and aeon) carry a few data sets of the UCR/UEA archive as `.ts` files in
`<package>/datasets/data/<Problem>/<Problem>_TRAIN.ts` and `_TEST.ts`. They are read from the
installed package's folder (found without importing the package, which is slow and pulls in
pandas): nothing is downloaded at run time. `pip install 'fl-pqsu[sensors]' -c constraints.txt`
installs sktime; a folder holding the two `.ts` files works as well (`--data-root`).

- `italy-power`: ItalyPowerDemand, 1,096 days of one Italian smart meter's 24 hourly power
  readings; class 1 or 2 is the half of the year the day falls in (Oct-Mar or Apr-Sep).
  The archive splits it 67 train / 1,029 test, far too few training samples for a fleet, so
  the two files are pooled and split again, a quarter for test, by a fixed permutation.
- `basic-motions`: BasicMotions, 80 recordings of a wrist-worn smartwatch's 3-axis
  accelerometer and gyroscope (6 x 100 at 10 Hz) while standing, walking, running or playing
  badminton; kept as the archive splits it (40 / 40): enough for tests, not for a fleet.

numpy + stdlib only, like `pqsu.export.datasets`.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pqsu.protocol.errors import PqsuError

PACKAGES = ("sktime", "aeon")  # either ships the files under <package>/datasets/data
RESPLIT_SEED = 0


class SensorDataError(PqsuError):
    """A sensor data set whose package is missing or whose .ts file is malformed."""


@dataclass(frozen=True)
class SensorSet:
    problem: str                 # the archive's name, as in the file names
    test_fraction: float | None  # pool both files and split again; None keeps the archive's split
    about: str


SENSOR_SETS: dict[str, SensorSet] = {
    "italy-power": SensorSet("ItalyPowerDemand", 0.25, "smart-meter power, 1 x 24, 2 classes, 1,096 samples"),
    "basic-motions": SensorSet("BasicMotions", None, "smartwatch accelerometer + gyroscope, 6 x 100, 4 classes, "
                                                     "80 samples"),
}


@dataclass(frozen=True)
class SensorSplits:
    train_x: np.ndarray  # float32 (N, C, L)
    train_y: np.ndarray  # int64, indices into `classes`
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str]


def sensor_folder(name: str, root: str | Path | None = None) -> Path:
    """The folder with `name`'s two .ts files: `root` if given, else inside an installed package."""
    problem = SENSOR_SETS[name].problem
    if root is not None:
        return Path(root).expanduser()
    for package in PACKAGES:
        spec = importlib.util.find_spec(package)  # a top-level name: found without importing it
        for location in (spec.submodule_search_locations or []) if spec else []:
            folder = Path(location) / "datasets" / "data" / problem
            if (folder / f"{problem}_TRAIN.ts").is_file():
                return folder
    raise SensorDataError(f"{name} ({problem}) is read from the files the sktime package ships, and no installed "
                          f"package has them: pip install 'fl-pqsu[sensors]' -c constraints.txt (or give "
                          f"--data-root, a folder with {problem}_TRAIN.ts and {problem}_TEST.ts)")


def load_sensor_splits(name: str, root: str | Path | None = None) -> SensorSplits:
    """Both splits of built-in sensor data set `name`, labels mapped to the archive's class order."""
    entry = SENSOR_SETS[name]
    folder = sensor_folder(name, root)
    files = [folder / f"{entry.problem}_{part}.ts" for part in ("TRAIN", "TEST")]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise SensorDataError(f"{name}: {folder} has no {' or '.join(missing)}")
    (x_train, labels_train, classes), (x_test, labels_test, _) = (read_ts(f) for f in files)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise SensorDataError(f"{name}: train series are {x_train.shape[1:]}, test series {x_test.shape[1:]}")
    index = {c: i for i, c in enumerate(classes)}
    y_train = np.array([index[c] for c in labels_train], np.int64)
    y_test = np.array([index[c] for c in labels_test], np.int64)
    if entry.test_fraction is None:
        return SensorSplits(x_train, y_train, x_test, y_test, classes)
    x, y = np.concatenate([x_train, x_test]), np.concatenate([y_train, y_test])
    order = np.random.default_rng(RESPLIT_SEED).permutation(len(y))
    n_test = int(round(entry.test_fraction * len(y)))
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    return SensorSplits(x[train], y[train], x[test], y[test], classes)


def read_ts(path: Path) -> tuple[np.ndarray, list[str], list[str]]:
    """(series float32 (N, C, L), each series' class label, the header's class labels) of a .ts file.

    Only what the shipped classification sets use: equal-length series, no timestamps, no
    missing values; each data line is C comma-separated dimensions joined by ':' and the label.
    """
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise SensorDataError(f"cannot read {path}: {exc.strerror}") from None
    classes: list[str] | None = None
    series: list[list[list[float]]] = []
    labels: list[str] = []
    in_data = False
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not in_data:
            key, _, rest = line.partition(" ")
            key = key.lower()
            if key == "@classlabel":
                words = rest.split()
                if not words or words[0].lower() != "true":
                    raise SensorDataError(f"{path}: not a classification data set (@classLabel {rest})")
                classes = words[1:]
            elif key == "@timestamps" and rest.strip().lower() == "true":
                raise SensorDataError(f"{path}: series with timestamps are not supported")
            elif key == "@data":
                in_data = True
            continue
        *dims, label = line.split(":")
        try:
            values = [[float(v) for v in d.split(",")] for d in dims]
        except ValueError:
            raise SensorDataError(f"{path}:{number}: not a list of numbers (missing values are not supported)") from None
        shape = (len(values), len(values[0])) if dims else (0, 0)
        if not dims or len({len(v) for v in values}) != 1 or (series and shape != (len(series[0]), len(series[0][0]))):
            raise SensorDataError(f"{path}:{number}: series of unequal length or dimension count are not supported")
        series.append(values)
        labels.append(label.strip())
    if classes is None or not series:
        raise SensorDataError(f"{path}: not a .ts classification file (no @classLabel header or no @data lines)")
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise SensorDataError(f"{path}: labels {unknown[:5]} are not among the header's classes {classes}")
    return np.asarray(series, np.float32), labels, classes
