"""Data beyond images: the built-in sensor sets, labelled-array files, device shards, and `pqsu export`
on a user's own 1-D model and data, with every bad input refused in one line before any work."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from pqsu.edge.datastore import load_local_data
from pqsu.export.bridge import torch_model_from_int8
from pqsu.export.datasets import ArrayDataset, DatasetError, load_dataset
from pqsu.export.labelled import LabelledDataError, read_labelled
from pqsu.export.onnx_export import read_info
from pqsu.export.runtime import OrtModel
from pqsu.export.sensors import SensorDataError, read_ts, sensor_folder
from pqsu.export.training import TrainConfig, train
from pqsu.tools.cli import main

from tests.support.nets import FMNIST_ROOT

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONV1D = "tests.support.user_models:conv1d_net"


# --------------------------------------------------------------------------- built-in sensor data

def test_italy_power_is_read_from_the_installed_wheel_and_split_for_a_fleet():
    assert "sktime" in sensor_folder("italy-power").parts  # the package's own files, nothing downloaded
    train_set, test_set = load_dataset("italy-power", "train"), load_dataset("italy-power", "test")
    assert (len(train_set), len(test_set)) == (822, 274)  # 1,096 days pooled, a quarter held out
    assert train_set.input_shape == test_set.input_shape == (1, 24) and train_set.x.dtype == np.float32
    assert train_set.classes == ["1", "2"] and set(train_set.y) == set(test_set.y) == {0, 1}
    x = train_set.normalized()
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-3  # readings, not pixels: no /255
    assert len(train_set) // 10 >= 60  # enough for ten devices


def test_basic_motions_keeps_the_archive_split_of_six_sensor_channels():
    train_set = load_dataset("basic-motions", "train")
    assert train_set.input_shape == (6, 100) and len(train_set) == 40
    assert train_set.classes == ["Standing", "Running", "Walking", "Badminton"]
    assert len(train_set.mean) == len(train_set.std) == 6


def test_sensor_set_outside_the_package_names_the_files(tmp_path):
    with pytest.raises(SensorDataError, match="has no ItalyPowerDemand_TRAIN.ts or ItalyPowerDemand_TEST.ts"):
        load_dataset("italy-power", "train", root=tmp_path)


def test_malformed_ts_file_names_the_line(tmp_path):
    path = tmp_path / "X_TRAIN.ts"
    path.write_text("@problemName X\n@classLabel true a b\n@data\n1,2,3:a\n1,2:b\n")
    with pytest.raises(SensorDataError, match=r"X_TRAIN.ts:5: series of unequal length"):
        read_ts(path)


# --------------------------------------------------------------------------- labelled-array files

def coded(n: int, shape=(2, 5)) -> np.ndarray:
    """Samples whose first value is their index, so a split can be checked for overlap."""
    x = np.random.default_rng(0).normal(size=(n, *shape)).astype(np.float32)
    x[:, 0, 0] = np.arange(n)
    return x


def test_labelled_file_holds_out_a_fixed_disjoint_test_split(tmp_path):
    path = tmp_path / "mine.npz"
    np.savez(path, x=coded(50), y=np.arange(50) % 3, classes=np.array(["low", "mid", "high"]))
    train_set, test_set = read_labelled(path, "train"), read_labelled(path, "test")
    assert (len(train_set), len(test_set)) == (40, 10)
    ids = lambda d: set(d.x[:, 0, 0].astype(int).tolist())  # noqa: E731
    assert ids(train_set).isdisjoint(ids(test_set)) and len(ids(train_set) | ids(test_set)) == 50
    assert ids(load_dataset(str(path), "test")) == ids(test_set)  # the same split every time, by name too
    assert train_set.classes == ["low", "mid", "high"] and train_set.input_shape == (2, 5)
    assert train_set.mean == test_set.mean  # the training samples' statistics serve both


def test_labelled_file_with_its_own_test_split_and_statistics(tmp_path):
    path = tmp_path / "pixels.npz"
    x = np.full((6, 1, 4, 4), 255, np.uint8)
    np.savez(path, x=x, y=np.zeros(6, int), x_test=x[:2], y_test=np.ones(2, int), mean=[0.5], std=[0.25])
    train_set, test_set = read_labelled(path, "train"), read_labelled(path, "test")
    assert (len(train_set), len(test_set)) == (6, 2) and test_set.classes == ["0", "1"]
    np.testing.assert_allclose(train_set.normalized(), 2.0)  # uint8 is pixels: (255/255 - 0.5) / 0.25


@pytest.mark.parametrize("arrays, match", [
    ({"x": np.zeros((4, 3), np.float32)}, r"lacks array\(s\) y"),
    ({"x": np.zeros((4, 3), np.int64), "y": np.zeros(4, int)}, "x is int64; give uint8 pixels or float readings"),
    ({"x": np.zeros(4, np.float32), "y": np.zeros(4, int)}, r"x of shape \(4,\) is not a batch"),
    ({"x": np.zeros((4, 3), np.float32), "y": np.zeros(3, int)}, "y must be 4 integer labels"),
    ({"x": np.zeros((4, 3), np.float32), "y": [0, 1, 2, 3], "classes": np.array(["a", "b"])}, r"labels must be in 0..1"),
    ({"x": np.zeros((4, 3), np.float32), "y": np.zeros(4, int), "mean": [0.0], "std": [1.0]}, "one value per channel"),
    ({"x": np.array([{"a": 1}] * 4, dtype=object), "y": np.zeros(4, int)}, "pickled objects, which are refused"),
], ids=["no-y", "int-x", "no-batch", "short-y", "label-range", "mean-length", "pickle"])
def test_bad_labelled_files_are_one_line_errors(tmp_path, arrays, match):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(LabelledDataError, match=match) as exc:
        read_labelled(path)
    assert "\n" not in str(exc.value)


def test_device_store_takes_sensor_shards_and_refuses_mixed_folders(tmp_path):
    np.savez(tmp_path / "a.npz", x=coded(8), y=np.zeros(8, int))
    x, y = load_local_data(tmp_path / "a.npz")
    assert x.shape == (8, 2, 5) and x.dtype == np.float32 and y.dtype == np.int64
    np.savez(tmp_path / "b.npz", x=np.zeros((3, 1, 4, 4), np.uint8), y=np.zeros(3, int))
    with pytest.raises(DatasetError, match="shards hold samples of different kinds"):
        load_local_data(tmp_path)


def test_float_readings_normalize_without_the_pixel_scale():
    x = np.array([[[1.0, 3.0]], [[5.0, 7.0]]], np.float32)
    data = ArrayDataset(x, np.zeros(2, int), "r", ["a"], (4.0,), (2.0,))
    np.testing.assert_allclose(data.normalized(), (x - 4.0) / 2.0)


# --------------------------------------------------------------------------- pqsu export on a user's own data

@pytest.fixture(scope="module")
def italy_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("italy")
    train_set, test_set = load_dataset("italy-power", "train"), load_dataset("italy-power", "test")
    tr, te = train_set.sample(160, seed=0), test_set.sample(64, seed=0)
    np.savez(folder / "train.npz", x=tr.x, y=tr.y, classes=np.array(train_set.classes))
    np.savez(folder / "eval.npz", x=te.x, y=te.y)
    # calibration samples three times the training range: the int8 input scale must come from these
    np.savez(folder / "calib.npz", x=3 * train_set.sample(32, seed=5).x)
    return folder


def test_export_of_a_1d_user_model_on_its_own_data_calibration_and_evaluation(italy_files, capsys):
    out = italy_files / "out" / "m.int8.onnx"
    code = main(["export", "--model", CONV1D, "--data", str(italy_files / "train.npz"),
                 "--eval-data", str(italy_files / "eval.npz"), "--calib-data", str(italy_files / "calib.npz"),
                 "--no-prune", "--pretrain-epochs", "10", "--batch-size", "16", "--lr", "0.05",
                 "--calib-samples", "32", "--latency-repeats", "1", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0
    report = json.loads((out.parent / "report.json").read_text())
    assert report["dataset"] == "train.npz" and report["eval_samples"] == 64
    assert report["acc_int8"] >= 0.7  # ItalyPowerDemand's two seasons are easy: far above chance
    # 2 Conv1d (BatchNorm1d folded in: weight and bias each) and 2 Linear layers
    assert report["bridge_parameters"] == 8 and report["bridge_worst_error_steps"] <= 0.5 + 1e-3
    assert "all 8 parameters rebuilt from the int8 file" in printed

    info = read_info(out)
    assert info.in_shape == (1, 24) and info.classes == ("1", "2") and info.spec["widths"] == [8, 12, 16, 2]
    assert info.extra == {"input": "readings"}  # raw float inputs are normalized without the pixel scale

    normalized = (np.load(italy_files / "calib.npz")["x"] - info.mean[0]) / info.std[0]  # as the calibrator saw them
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    lo, hi = min(0.0, float(normalized.min())), max(0.0, float(normalized.max()))
    assert float(inits["input_scale"]) == pytest.approx((hi - lo) / 255, rel=0.02)

    model, _ = torch_model_from_int8(out, allow_custom=True)  # a board fine-tunes the file it got
    ev = np.load(italy_files / "eval.npz")
    x = ((ev["x"] - info.mean[0]) / info.std[0]).astype(np.float32)
    stats = train(model, x, ev["y"].astype(np.int64), TrainConfig(epochs=1, batch_size=16))
    assert np.isfinite(stats.loss) and stats.steps == 4
    logits = OrtModel(out.read_bytes()).logits(x)  # onnxruntime takes the (N, 1, 24) windows as they are
    assert logits.shape == (64, 2) and (logits.argmax(1) == ev["y"]).mean() == pytest.approx(report["acc_int8"])


def bad_export(capsys, tmp_path, *args: str) -> str:
    out = tmp_path / "never.int8.onnx"
    code = main(["export", *args, "--latency-repeats", "1", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    lines = [line for line in err.splitlines() if not line[:2].isdigit()]  # log lines start with the time
    assert len(lines) == 1 and lines[0].startswith("pqsu export: error: "), err
    assert "pre-training" not in err and "Traceback" not in err  # refused before any work
    return lines[0]


def test_calibration_data_of_another_shape(italy_files, capsys, tmp_path):
    np.savez(tmp_path / "c.npz", x=np.zeros((8, 1, 20), np.float32))
    line = bad_export(capsys, tmp_path, "--model", CONV1D, "--data", str(italy_files / "train.npz"),
                      "--calib-data", str(tmp_path / "c.npz"))
    assert "samples are float32 (1, 20), the training data's float32 (1, 24)" in line


def test_calibration_data_with_another_channel_count(italy_files, capsys, tmp_path):
    np.savez(tmp_path / "c.npz", x=np.zeros((8, 3, 24), np.float32))
    line = bad_export(capsys, tmp_path, "--model", CONV1D, "--data", str(italy_files / "train.npz"),
                      "--calib-data", str(tmp_path / "c.npz"))
    assert f"{tmp_path / 'c.npz'}: samples are float32 (3, 24), the training data's float32 (1, 24)" in line


def test_export_finds_the_users_module_in_the_current_folder(italy_files, capsys, tmp_path, monkeypatch):
    """As `pqsu simulate` does: the console script's import path does not hold the folder it runs in."""
    (tmp_path / "my_folder_nets.py").write_text("def small_net():\n    raise NotImplementedError\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))])
    line = bad_export(capsys, tmp_path, "--model", "my_folder_nets:smal_net", "--data", str(italy_files / "train.npz"))
    assert "module 'my_folder_nets' has no attribute 'smal_net'" in line  # found the module, named the typo


def test_a_model_that_cannot_train_is_refused_before_pre_training(italy_files, capsys, tmp_path):
    line = bad_export(capsys, tmp_path, "--model", "tests.support.bad_models:eval_only_net",
                      "--data", str(italy_files / "train.npz"))
    assert "cannot be trained on data set" in line and "in training mode RuntimeError: eval only" in line


def test_a_module_that_raises_on_import_is_one_line(italy_files, capsys, tmp_path):
    line = bad_export(capsys, tmp_path, "--model", "tests.support.broken_model_module:net",
                      "--data", str(italy_files / "train.npz"))
    assert "importing tests.support.broken_model_module for model tests.support.broken_model_module:net failed: " \
           "RuntimeError: this module is broken at import" in line


@pytest.mark.parametrize("name, match", [("c.txt", "give an .npz file"), ("nope.npz", "does not exist")])
def test_calibration_file_that_is_not_one(italy_files, capsys, tmp_path, name, match):
    (tmp_path / "c.txt").write_text("x")
    line = bad_export(capsys, tmp_path, "--model", CONV1D, "--data", str(italy_files / "train.npz"),
                      "--calib-data", str(tmp_path / name))
    assert match in line


def test_evaluation_labels_beyond_the_training_classes(italy_files, capsys, tmp_path):
    np.savez(tmp_path / "e.npz", x=np.zeros((4, 1, 24), np.float32), y=np.array([0, 1, 5, 0]))
    line = bad_export(capsys, tmp_path, "--model", CONV1D, "--data", str(italy_files / "train.npz"),
                      "--eval-data", str(tmp_path / "e.npz"))
    assert "label 5 is out of range for 2 classes" in line


def test_data_file_without_labels(capsys, tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 1, 24), np.float32))
    assert "lacks array(s) y" in bad_export(capsys, tmp_path, "--model", CONV1D, "--data", str(tmp_path / "d.npz"))


def test_image_zoo_model_on_sensor_windows_points_to_cnn1d(italy_files, capsys, tmp_path):
    line = bad_export(capsys, tmp_path, "--model", "cnn", "--data", str(italy_files / "train.npz"))
    assert "cnn takes images (C, H, W), not input (1, 24); for this input choose cnn1d" in line


def test_user_model_that_does_not_fit_the_data(italy_files, capsys, tmp_path):
    line = bad_export(capsys, tmp_path, "--model", "tests.support.user_models:mobilenet_net",
                      "--data", str(italy_files / "train.npz"))
    assert "mobilenet_net() cannot take input of shape (1, 24)" in line


@pytest.mark.skipif(not FMNIST_ROOT.is_dir(), reason=f"{FMNIST_ROOT} missing")
def test_batchnorm_that_cannot_be_folded_is_refused_before_pre_training(capsys, tmp_path):
    line = bad_export(capsys, tmp_path, "--model", "tests.support.user_models:prenorm_net")
    assert "BatchNorm layer(s) bn do not directly follow a conv" in line


def test_unknown_data_set_lists_the_sensor_sets_and_files(capsys, tmp_path):
    line = bad_export(capsys, tmp_path, "--dataset", "ucr-everything")
    assert "italy-power" in line and "basic-motions" in line and ".npz" in line


def test_dataset_and_data_together_is_a_usage_error(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["export", "--dataset", "italy-power", "--data", str(tmp_path / "x.npz")])
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
