"""`pqsu edge predict` and POST /predict for a model whose input is not an image: a 1-D sensor window
(1, 24). One sample or a batch, .npy or JSON; a wrong shape gets the same message either way; an image
file is for image models only."""
from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest

pytest.importorskip("torch")

from pqsu.edge.inference import InferenceModel  # noqa: E402
from pqsu.edge.service import InferenceService  # noqa: E402
from pqsu.protocol.errors import PqsuError  # noqa: E402
from pqsu.tools import cli  # noqa: E402

WINDOW = (1, 24)
WRONG = "does not fit the model's (1, 24): give one sample of that shape or a batch of them (N, 1, 24)"


@pytest.fixture(scope="module")
def sensor_model(tmp_path_factory):
    """A Conv1d net as a real fl-pqsu ONNX file, through round 0 (BatchNorm folded) on float windows with
    two named classes (fp32: the input path is what is tested here, and it skips calibration)."""
    from pqsu.export.datasets import ArrayDataset
    from pqsu.export.pipeline import PrepareConfig, export_model, model_info, prepare

    from tests.support.nets import single_torch_thread

    rng = np.random.default_rng(0)
    data = ArrayDataset(rng.normal(0.5, 0.25, (32, *WINDOW)).astype(np.float32), rng.integers(0, 2, 32), "windows",
                        ["low", "high"], (0.5,), (0.25,))
    with single_torch_thread():
        model = prepare(PrepareConfig(arch="tests.support.user_models:conv1d_net", prune=None, pretrain_epochs=0), data)
        exported = export_model(model, model_info(model, data))
    path = tmp_path_factory.mktemp("sensor") / "sensor.onnx"
    path.write_bytes(exported.data)
    return path


@pytest.fixture(scope="module")
def windows():
    return np.random.default_rng(1).normal(size=(5, *WINDOW)).astype(np.float32)


def _predict(capsys, *argv) -> tuple[int, list[str], str]:
    code = cli.main(["edge", "predict", *argv])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.strip()


def test_predict_takes_one_window_or_a_batch_from_npy_and_json(sensor_model, windows, tmp_path, capsys):
    np.save(tmp_path / "batch.npy", windows)
    np.save(tmp_path / "one.npy", windows[3])
    (tmp_path / "one.json").write_text(json.dumps({"inputs": windows[3].tolist()}))
    code, batch, _ = _predict(capsys, str(tmp_path / "batch.npy"), "--model", str(sensor_model))
    assert code == 0 and len(batch) == 5
    expected = InferenceModel.from_file(sensor_model).classify(windows).labels
    assert [line.split("\t")[1].strip() for line in batch] == expected  # the labels the model gives
    for name in ("one.npy", "one.json"):
        code, one, err = _predict(capsys, str(tmp_path / name), "--model", str(sensor_model))
        assert code == 0 and len(one) == 1 and "1 sample(s)" in err
        assert one[0].split("\t")[1:] == batch[3].split("\t")[1:]  # the same window, alone or in a batch


@pytest.mark.parametrize("shape", [(1, 25), (5, 1, 25), (24,), (2, 2, 1, 24)], ids=str)
def test_a_wrong_shape_gets_one_message_for_a_sample_and_a_batch(sensor_model, tmp_path, capsys, shape):
    np.save(tmp_path / "x.npy", np.zeros(shape, np.float32))
    code, out, err = _predict(capsys, str(tmp_path / "x.npy"), "--model", str(sensor_model))
    assert code == 2 and out == []
    assert err == f"pqsu edge: error: input of shape {shape} {WRONG}"


def test_an_image_file_is_refused_for_a_sensor_model(sensor_model, tmp_path, capsys):
    (tmp_path / "x.pgm").write_bytes(b"P5 24 1 255\n" + bytes(range(24)))
    code, _, err = _predict(capsys, str(tmp_path / "x.pgm"), "--model", str(sensor_model))
    assert code == 2
    assert err.endswith("an image file fits image models only; this model takes samples of shape (1, 24): "
                        "give a .npy array or JSON inputs")


def _post(url: str, body: bytes, content_type: str, query: str = "") -> tuple[int, dict]:
    request = urllib.request.Request(url + "/predict" + query, body, {"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_local_api_serves_windows_alone_and_in_batches(sensor_model, windows):
    import io

    model = InferenceModel.from_file(sensor_model)
    buf = io.BytesIO()
    np.save(buf, windows)
    with InferenceService(lambda: model, port=0) as service:
        code, batch = _post(service.url, buf.getvalue(), "application/x-npy")
        assert code == 200 and len(batch["predictions"]) == 5
        code, one = _post(service.url, json.dumps({"inputs": windows[0].tolist()}).encode(), "application/json")
        assert code == 200 and one["labels"] == batch["labels"][:1]
        code, bad = _post(service.url, json.dumps({"inputs": [[0.0] * 25] * 2}).encode(), "application/json")
        assert code == 400 and bad["error"] == f"input of shape (2, 25) {WRONG}"


# -- raw readings: a sensor's values as measured, normalized with the model's own statistics ----------
def test_raw_readings_are_normalized_with_the_models_statistics(sensor_model, windows, tmp_path, capsys):
    model = InferenceModel.from_file(sensor_model)
    assert model.info.extra == {"input": "readings"}
    measured = windows * np.float32(model.info.std[0]) + np.float32(model.info.mean[0])  # as the sensor read them
    np.save(tmp_path / "normalized.npy", windows)
    np.save(tmp_path / "measured.npy", measured)
    (tmp_path / "one.json").write_text(json.dumps({"inputs": measured[2].tolist()}))
    _, expected, _ = _predict(capsys, str(tmp_path / "normalized.npy"), "--model", str(sensor_model))
    code, got, _ = _predict(capsys, str(tmp_path / "measured.npy"), "--model", str(sensor_model), "--raw")
    assert code == 0 and got == expected
    code, one, _ = _predict(capsys, str(tmp_path / "one.json"), "--model", str(sensor_model), "--raw")
    assert code == 0 and one[0].split("\t")[1:] == expected[2].split("\t")[1:]
    _, unscaled, _ = _predict(capsys, str(tmp_path / "measured.npy"), "--model", str(sensor_model))
    assert unscaled != expected  # without --raw, measured values are taken as normalized: other probabilities


def test_raw_readings_over_the_local_api_and_the_flag_checked(sensor_model, windows):
    import io

    model = InferenceModel.from_file(sensor_model)
    measured = windows * np.float32(model.info.std[0]) + np.float32(model.info.mean[0])
    body = io.BytesIO()
    np.save(body, measured)
    with InferenceService(lambda: model, port=0) as service:
        code, raw = _post(service.url, body.getvalue(), "application/x-npy", "?raw=1")
        assert code == 200
        np.testing.assert_allclose(raw["probabilities"], model.classify(windows).probabilities, atol=1e-6)
        code, bad = _post(service.url, body.getvalue(), "application/x-npy", "?raw=maybe")
        assert code == 400 and bad["error"] == "raw must be 1 or 0 (true/false, yes/no)"


def test_raw_inputs_are_refused_for_a_pixel_model(sensor_model):
    import dataclasses

    model = InferenceModel.from_file(sensor_model)
    model.info = dataclasses.replace(model.info, extra={})  # what a pixel model's metadata says
    with pytest.raises(PqsuError, match="raw inputs are for models of sensor readings"):
        model.classify(np.zeros((2, *WINDOW), np.float32), raw=True)

