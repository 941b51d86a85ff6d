"""The one onnxruntime session: what boards serve with, what the cloud evaluates with.

The accuracy the coordinator reports is the accuracy of the board's predictions on the same
file; the session needs neither torch nor onnx; a file already verified is not hashed again.
"""
from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest

from pqsu.cloud.server import FederatedServer, ServerConfig
from pqsu.edge.inference import InferenceModel
from pqsu.export.pipeline import model_info
from pqsu.export.runtime import InferenceError, OrtModel
from pqsu.protocol import model_id
from pqsu.protocol.errors import PqsuError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=["int8", "fp32"])
def server(request, trained_cnn) -> FederatedServer:
    t = trained_cnn
    calib = t.train_set.sample(64, seed=1).normalized()
    return FederatedServer(copy.deepcopy(t.model), model_info(t.model, t.train_set), calib, t.x_test[:600],
                           t.y_test[:600], ServerConfig(precision=request.param))


def test_the_cloud_evaluation_is_the_boards_predictions_on_the_same_file(server):
    data, info = server.model_message()
    ev = server.evaluate()
    board = InferenceModel(data)
    assert board.info.precision == server.cfg.precision and board.model_id == info.model_id
    predictions = np.asarray(board.classify(server.eval_x).predictions)
    assert ev.samples == len(server.eval_y) == 600
    assert ev.accuracy == float((predictions == server.eval_y).mean())
    assert ev.accuracy > 0.6  # a trained model, not a degenerate one


def test_batched_logits_match_one_batch(server):
    data, _ = server.model_message()
    model = OrtModel(data)
    x = server.eval_x[:300]
    np.testing.assert_allclose(model.logits(x, batch_size=128), model.predict(x)[0], rtol=1e-5, atol=1e-5)
    assert model.logits(x[:0]).shape == (0, 10)


def test_a_verified_file_is_not_hashed_again(trained_cnn, monkeypatch):
    data = trained_cnn.int8_path.read_bytes()
    file = model_id.verified(data)
    calls = []
    real = model_id._digest
    monkeypatch.setattr(model_id, "_digest", lambda d, s: calls.append(1) or real(d, s))
    assert OrtModel(file).model_id == file.model_id and calls == []
    assert InferenceModel(file).file is file and calls == []
    OrtModel(data)  # bytes are checked, once
    assert calls == [1]


def test_uint8_images_are_normalized_with_the_models_own_statistics(trained_cnn):
    model = OrtModel(trained_cnn.int8_path.read_bytes())
    raw = trained_cnn.train_set.x[:8]
    np.testing.assert_allclose(model.prepare(raw), trained_cnn.train_set.normalized()[:8], rtol=1e-6, atol=1e-6)


def test_altered_bytes_and_bad_inputs_are_one_line_errors(trained_cnn):
    data = bytearray(trained_cnn.int8_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    with pytest.raises(PqsuError, match="does not match its id"):
        OrtModel(bytes(data))
    model = OrtModel(trained_cnn.int8_path.read_bytes())
    with pytest.raises(InferenceError, match=r"does not fit the model's \(1, 28, 28\)"):
        model.predict(np.zeros((2, 3, 28, 28), np.float32))
    with pytest.raises(InferenceError, match="give uint8 images or normalized floats"):
        model.predict(np.zeros((2, 1, 28, 28), np.int32))


def test_the_session_imports_neither_torch_nor_onnx():
    code = ("import sys, pqsu.export.runtime, pqsu.edge.inference; "
            "print(sorted(m for m in ('torch', 'onnx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
