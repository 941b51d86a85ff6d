"""A device and a model of a user's own architecture: it serves it for inference whatever it is told (no
torch needed), and rebuilds it for training only when allowed to import that code."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")

from tests.support.custom_int8 import ARCH, custom_int8  # noqa: E402
from tests.support.nets import FMNIST_ROOT, single_torch_thread  # noqa: E402

from pqsu.edge.learner import EdgeLearner  # noqa: E402
from pqsu.edge.selective import SelectivePolicy  # noqa: E402
from pqsu.protocol import model_id  # noqa: E402
from pqsu.protocol.codec import decode  # noqa: E402
from pqsu.protocol.errors import PqsuError  # noqa: E402
from pqsu.protocol.messages import RoundTask  # noqa: E402
from pqsu.tools import cli  # noqa: E402

pytestmark = pytest.mark.skipif(not FMNIST_ROOT.is_dir(), reason="dataset-fashion-mnist is not installed")


@pytest.fixture(scope="module")
def custom():
    return custom_int8()


def _round(custom, allow) -> tuple:
    data = custom.path.read_bytes()
    lrn = EdgeLearner("pi-own-01", custom.x[:48], custom.y[:48], SelectivePolicy.from_spec("always", "topk:0.05"),
                      allow_custom=allow)
    task = RoundTask(round=1, model_id=model_id.verify(data), epochs=1, batch_size=16, lr=0.05, seed=3)
    with single_torch_thread():
        return lrn.run_round(task, data), task


@pytest.mark.parametrize("allow", [False, (), ("tests.support.user_models:groupnorm_resnet",)],
                         ids=["not-allowed", "empty-list", "another-architecture"])
def test_a_device_not_allowed_that_code_refuses_to_rebuild_it_in_one_line(custom, allow):
    with pytest.raises(PqsuError) as exc:
        _round(custom, allow)
    message = str(exc.value)
    assert "\n" not in message
    assert message == (f"cannot rebuild the model the file declares: custom architecture {ARCH}: imported (its "
                       f"code run) only with --allow-model-code {ARCH}")
    assert len(message) <= 200  # what an agent's status message carries to the coordinator


def test_an_allowed_device_fine_tunes_the_custom_model_and_uploads(custom):
    outcome, task = _round(custom, (ARCH,))
    assert outcome.payload is not None and np.isfinite(outcome.loss) and outcome.nnz > 0
    update = decode(outcome.payload)
    assert (update.round, update.model_id, update.device_id) == (1, task.model_id, "pi-own-01")
    assert any(b.name.startswith("features.") for b in update.blocks)  # the user's own layer names


# A board without torch: serve the custom model, and say that torch never came in.
_NO_TORCH = """
import json, sys
import numpy as np
from pqsu.edge.inference import InferenceModel
model = InferenceModel.from_file(sys.argv[1])
pred = model.classify(np.load(sys.argv[2]))
print(json.dumps({"arch": model.info.spec["arch"], "n": len(pred.predictions), "torch": "torch" in sys.modules}))
"""


def test_an_inference_only_board_serves_a_custom_model_without_torch(custom, tmp_path):
    np.save(tmp_path / "x.npy", custom.x[:5])
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH, str(custom.path), str(tmp_path / "x.npy")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"arch": ARCH, "n": 5, "torch": False}


@pytest.mark.parametrize("allow, message", [
    ("tests.support.no_such_module:net", "cannot import architecture 'tests.support.no_such_module:net'"),
    ("tests.support.bad_models:no_such_factory", "has no attribute 'no_such_factory'"),
    ("not a name", "model code 'not a name' is not package.module:factory"),
    ("nowhere_pkg.nets:net", "an agent imports model code from its path or from --model-code-dir DIR, the folder "
                             "that holds nowhere_pkg"),
])
def test_edge_run_checks_the_allowed_code_at_start_before_connecting(allow, message, tmp_path, capsys):
    np.savez(tmp_path / "data.npz", x=np.zeros((4, 1, 28, 28), np.uint8), y=np.zeros(4, np.int64))
    code = cli.main(["edge", "run", "--broker", "mqtt://127.0.0.1:1", "--device-id", "pi-own-02", "--no-http",
                     "--data", str(tmp_path / "data.npz"), "--state-dir", str(tmp_path / "state"),
                     "--allow-model-code", allow])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_doctor_names_a_saved_custom_model_the_device_may_not_import(custom, capsys, tmp_path):
    from tests.edge.test_doctor import doctor
    from tests.support.mosquitto import free_port

    (tmp_path / "state").mkdir()
    shutil.copy(custom.path, tmp_path / "state" / "model.onnx")
    _, checks, out = doctor(capsys, "--broker", f"mqtt://127.0.0.1:{free_port()}", "--device-id", "pi-own-03",
                            "--state-dir", str(tmp_path / "state"), "--http-port", "0")
    assert checks["model"][0] == "PASS" and ARCH in checks["model"][1]
    level, text = checks["model-code"]
    assert level == "WARN" and f"custom architecture {ARCH}, which this device may not import" in text
    assert f"hint: --allow-model-code {ARCH}" in text
