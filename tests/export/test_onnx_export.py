"""torch -> ONNX fp32 -> ONNX int8: one file, dynamic batch, metadata, model id, real int8 weights."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from pqsu.export.custom import spec_of
from pqsu.export.onnx_export import read_info, write_with_info
from pqsu.export.quantize import ArrayCalibrationReader, CalibrationDataReader, QuantizeError, quantize_int8
from pqsu.export.zoo import ModelSpec
from pqsu.protocol import model_id
from pqsu.protocol.errors import PqsuError
from pqsu.protocol.model_id import ModelIdError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
PQSU_KEYS = {"pqsu.format", "pqsu.spec", "pqsu.input_name", "pqsu.normalization", "pqsu.classes",
             "pqsu.precision", "pqsu.opset", "pqsu.model_id"}


def session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run(sess: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


# --------------------------------------------------------------------------- fp32 export

def test_export_writes_one_self_contained_file(trained_cnn):
    # nothing else in the folder: no external-data side files, no temp leftovers
    assert sorted(os.listdir(trained_cnn.folder)) == ["cnn.fp32.onnx", "cnn.int8.onnx"]
    proto = onnx.load(str(trained_cnn.fp32_path))
    onnx.checker.check_model(proto)
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


def test_onnx_runs_any_batch_size_and_matches_torch(trained_cnn):
    sess = session(trained_cnn.fp32_path)
    batch_dim = sess.get_inputs()[0].shape[0]
    assert not isinstance(batch_dim, int), f"batch dimension is fixed to {batch_dim}"
    for n in (1, 7):
        x = trained_cnn.x_test[:n]
        with torch.no_grad():
            expected = trained_cnn.model.eval()(torch.from_numpy(x)).numpy()
        got = run(sess, x)
        assert got.shape == (n, 10)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-5)


def test_metadata_round_trips(trained_cnn):
    info = read_info(trained_cnn.fp32_path)
    assert info == trained_cnn.fp32_info
    assert info.spec == trained_cnn.info_in.spec
    assert ModelSpec.from_dict(info.spec) == spec_of(trained_cnn.model)
    assert info.classes == FMNIST_CLASSES
    assert info.mean == pytest.approx((0.2860,)) and info.std == pytest.approx((0.3530,))
    assert info.precision == "fp32"
    assert info.opset >= 13
    assert info.input_name == session(trained_cnn.fp32_path).get_inputs()[0].name
    assert info.in_shape == (1, 28, 28)


def test_int8_file_keeps_the_metadata_and_gets_its_own_id(trained_cnn):
    fp32, int8 = read_info(trained_cnn.fp32_path), read_info(trained_cnn.int8_path)
    assert int8 == trained_cnn.int8_info
    assert int8.precision == "int8"
    assert (int8.spec, int8.classes, int8.mean, int8.std, int8.input_name) == \
        (fp32.spec, fp32.classes, fp32.mean, fp32.std, fp32.input_name)
    assert int8.model_id != fp32.model_id


# --------------------------------------------------------------------------- model id

@pytest.mark.parametrize("which", ["fp32", "int8"])
def test_model_id_verifies_with_hashlib_alone(trained_cnn, which):
    path, info = {"fp32": (trained_cnn.fp32_path, trained_cnn.fp32_info),
                  "int8": (trained_cnn.int8_path, trained_cnn.int8_info)}[which]
    data = path.read_bytes()
    assert model_id.verify(data) == info.model_id
    assert len(info.model_id) == 32 and int(info.model_id, 16) >= 0
    assert info.model_id != model_id.PLACEHOLDER


def weight_region(data: bytes, proto: onnx.ModelProto, name: str) -> tuple[int, int]:
    raw = numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == name)).tobytes()
    at = data.find(raw)
    assert at >= 0 and data.find(raw, at + 1) < 0
    return at, len(raw)


@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("which, weight", [("fp32", "classifier.0.weight"), ("int8", "features.4.weight_quantized")])
def test_flipping_a_weight_byte_breaks_the_model_id(trained_cnn, which, weight, where):
    path = trained_cnn.fp32_path if which == "fp32" else trained_cnn.int8_path
    data = path.read_bytes()
    at, size = weight_region(data, onnx.load_from_string(data), weight)
    i = {"first": at, "middle": at + size // 2, "last": at + size - 1}[where]
    altered = bytearray(data)
    altered[i] ^= 0x01
    with pytest.raises(ModelIdError, match="does not match its id"):
        model_id.verify(bytes(altered))
    with pytest.raises(ModelIdError):
        read_info(bytes(altered))


def test_model_id_covers_the_metadata_and_is_reproducible(trained_cnn, tmp_path):
    proto = onnx.load(str(trained_cnn.fp32_path))
    same = write_with_info(proto, tmp_path / "same.onnx", trained_cnn.fp32_info)
    assert same.model_id == trained_cnn.fp32_info.model_id  # same content, same id
    renamed = dataclasses.replace(trained_cnn.fp32_info, classes=tuple(f"c{i}" for i in range(10)))
    other = write_with_info(proto, tmp_path / "other.onnx", renamed)
    assert other.model_id != same.model_id
    assert read_info(tmp_path / "other.onnx").classes == renamed.classes


def test_a_file_without_fl_pqsu_metadata_has_no_model_id(trained_cnn):
    proto = onnx.load(str(trained_cnn.fp32_path))
    del proto.metadata_props[:]
    with pytest.raises(ModelIdError, match="not an fl-pqsu model") as exc:
        read_info(proto.SerializeToString())
    assert isinstance(exc.value, PqsuError)


# --------------------------------------------------------------------------- metadata on a board

@pytest.mark.parametrize("which", ["fp32", "int8"])
def test_onnxruntime_exposes_the_pqsu_metadata(trained_cnn, which):
    path, info = {"fp32": (trained_cnn.fp32_path, trained_cnn.fp32_info),
                  "int8": (trained_cnn.int8_path, trained_cnn.int8_info)}[which]
    meta = session(path).get_modelmeta().custom_metadata_map
    assert PQSU_KEYS <= set(meta)
    assert meta["pqsu.model_id"] == info.model_id
    assert json.loads(meta["pqsu.spec"]) == info.spec
    assert tuple(json.loads(meta["pqsu.classes"])) == FMNIST_CLASSES
    assert meta["pqsu.precision"] == which


BOARD_SCRIPT = r"""
import json, sys
sys.modules["onnx"] = None   # a board has neither: importing them must fail
sys.modules["torch"] = None
import numpy as np
import onnxruntime as ort
from pqsu.protocol import model_id

data = open(sys.argv[1], "rb").read()
verified = model_id.verify(data)
sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
meta = sess.get_modelmeta().custom_metadata_map
spec = json.loads(meta["pqsu.spec"])
norm = json.loads(meta["pqsu.normalization"])
pixels = np.full((3, *spec["in_shape"]), 0.5, np.float32)
x = ((pixels - norm["mean"][0]) / norm["std"][0]).astype(np.float32)
logits = sess.run(None, {meta["pqsu.input_name"]: x})[0]
print(json.dumps({"id": verified, "meta_id": meta["pqsu.model_id"], "shape": list(logits.shape),
                  "classes": json.loads(meta["pqsu.classes"])}))
"""


def test_a_board_without_onnx_or_torch_verifies_reads_and_runs_the_int8_model(trained_cnn):
    proc = subprocess.run([sys.executable, "-c", BOARD_SCRIPT, str(trained_cnn.int8_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["id"] == out["meta_id"] == trained_cnn.int8_info.model_id
    assert out["shape"] == [3, 10]
    assert tuple(out["classes"]) == FMNIST_CLASSES


# --------------------------------------------------------------------------- int8

def test_int8_weights_are_per_channel_int8_initializers(trained_cnn):
    proto = onnx.load(str(trained_cnn.int8_path))
    inits = {t.name: t for t in proto.graph.initializer}
    producer = {out: node for node in proto.graph.node for out in node.output}
    torch_weights = {k: tuple(v.shape) for k, v in trained_cnn.model.state_dict().items() if k.endswith(".weight")}

    compute = [n for n in proto.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert len(compute) == len(torch_weights) == 4
    seen = set()
    for node in compute:
        dq = producer[node.input[1]]  # the weight input is computed by a DequantizeLinear ...
        assert dq.op_type == "DequantizeLinear"
        q = inits[dq.input[0]]         # ... from an int8 initializer
        assert q.data_type == onnx.TensorProto.INT8
        name = dq.input[0].removesuffix("_quantized")
        assert tuple(q.dims) == torch_weights[name]
        scale = numpy_helper.to_array(inits[dq.input[1]])
        zero = numpy_helper.to_array(inits[dq.input[2]])
        out_channels = q.dims[0]
        assert scale.shape == (out_channels,)  # per channel, one scale per filter / neuron
        assert (scale > 0).all()
        assert zero.shape == (out_channels,) and not zero.any()  # symmetric
        assert next(a.i for a in dq.attribute if a.name == "axis") == 0
        seen.add(name)
    assert seen == set(torch_weights)
    # no fp32 copy of any weight is left in the file
    fp32_inits = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    assert not [t.name for t in fp32_inits if np.prod(t.dims) > 64]


def test_int8_file_is_much_smaller(trained_cnn):
    fp32, int8 = trained_cnn.fp32_path.stat().st_size, trained_cnn.int8_path.stat().st_size
    assert fp32 / int8 > 3.0, (fp32, int8)


def test_int8_accuracy_is_close_to_fp32_on_fashion_mnist(trained_cnn):
    x, y = trained_cnn.x_test, trained_cnn.y_test
    logits_fp32 = run(session(trained_cnn.fp32_path), x)
    logits_int8 = run(session(trained_cnn.int8_path), x)
    acc_fp32 = float((logits_fp32.argmax(1) == y).mean())
    acc_int8 = float((logits_int8.argmax(1) == y).mean())
    agreement = float((logits_fp32.argmax(1) == logits_int8.argmax(1)).mean())
    assert acc_fp32 > 0.6, "the briefly trained cnn should be far above chance (0.1)"
    assert agreement >= 0.97, agreement
    assert abs(acc_int8 - acc_fp32) <= 0.02, (acc_fp32, acc_int8)


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_other_calibration_methods_also_work(trained_cnn, tmp_path, method):
    calib = trained_cnn.train_set.sample(32, seed=3).normalized()
    info = quantize_int8(trained_cnn.fp32_path, tmp_path / "m.onnx", ArrayCalibrationReader(calib), method=method)
    assert info.precision == "int8"
    x = trained_cnn.x_test[:200]
    agree = (run(session(tmp_path / "m.onnx"), x).argmax(1) == run(session(trained_cnn.fp32_path), x).argmax(1)).mean()
    assert agree >= 0.9


def test_unknown_calibration_method_is_a_quantize_error(trained_cnn, tmp_path):
    with pytest.raises(QuantizeError, match="unknown calibration method 'kmeans'"):
        quantize_int8(trained_cnn.fp32_path, tmp_path / "m.onnx",
                      ArrayCalibrationReader(np.zeros((2, 1, 28, 28), np.float32)), method="kmeans")
    assert not (tmp_path / "m.onnx").exists()


def test_quantizing_a_foreign_onnx_file_is_refused(trained_cnn, tmp_path):
    proto = onnx.load(str(trained_cnn.fp32_path))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "foreign.onnx"))
    with pytest.raises(PqsuError, match="not an fl-pqsu model"):
        quantize_int8(tmp_path / "foreign.onnx", tmp_path / "m.onnx",
                      ArrayCalibrationReader(np.zeros((2, 1, 28, 28), np.float32)))


# --------------------------------------------------------------------------- calibration data

def test_calibration_reader_batches_and_rewinds():
    samples = np.arange(70 * 4, dtype=np.float64).reshape(70, 1, 2, 2)
    reader = ArrayCalibrationReader(samples, input_name="pixels", batch_size=32)

    def drain():
        batches = []
        while (b := reader.get_next()) is not None:
            batches.append(b)
        return batches

    first = drain()
    assert [b["pixels"].shape[0] for b in first] == [32, 32, 6]
    assert all(set(b) == {"pixels"} and b["pixels"].dtype == np.float32 for b in first)
    np.testing.assert_array_equal(np.concatenate([b["pixels"] for b in first]), samples.astype(np.float32))
    assert reader.get_next() is None  # stays exhausted
    reader.rewind()
    second = drain()
    assert len(second) == 3
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a["pixels"], b["pixels"])


def test_empty_calibration_array_is_a_quantize_error():
    with pytest.raises(QuantizeError, match="at least one sample") as exc:
        ArrayCalibrationReader(np.zeros((0, 1, 28, 28), np.float32))
    assert isinstance(exc.value, PqsuError)


class EmptyReader(CalibrationDataReader):
    """A user's own reader whose data source turned out empty."""

    def get_next(self):
        return None


def test_a_calibration_reader_without_data_is_a_quantize_error(trained_cnn, tmp_path):
    with pytest.raises(QuantizeError):
        quantize_int8(trained_cnn.fp32_path, tmp_path / "m.onnx", EmptyReader())
