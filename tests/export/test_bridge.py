"""int8 ONNX -> torch: the board rebuilds the model it received and can fine-tune it."""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.support.nets import USER_ARCH, info_for, set_bn_stats
from pqsu.export.bridge import (BridgeError, Int8Weights, read_int8_weights, torch_model_from_int8,
                                worst_error_in_steps)
from pqsu.export.custom import custom_model, spec_of
from pqsu.export.onnx_export import export_onnx, read_info, write_with_info
from pqsu.export.pruning import fold_batchnorm, prune_model
from pqsu.export.quantize import ArrayCalibrationReader, quantize_int8
from pqsu.export.zoo import build_model, default_spec
from pqsu.protocol.errors import PqsuError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IN = (1, 28, 28)
HALF_STEP = 0.5 + 1e-3


@dataclasses.dataclass
class Exported:
    reference: nn.Module        # the BN-folded fp32 model that was exported
    original: nn.Module         # the same before folding (equal to reference for cnn)
    int8_path: Path
    x: np.ndarray               # real test images, normalized


def export_int8_file(model: nn.Module, folder: Path, train_set, calib_samples: int = 32) -> Path:
    export_onnx(model, folder / "m.fp32.onnx", info_for(model, train_set))
    calib = ArrayCalibrationReader(train_set.sample(calib_samples, seed=1).normalized())
    quantize_int8(folder / "m.fp32.onnx", folder / "m.int8.onnx", calib)
    return folder / "m.int8.onnx"


@pytest.fixture(scope="module")
def cnn_exported(trained_cnn) -> Exported:
    return Exported(trained_cnn.model, trained_cnn.model, trained_cnn.int8_path, trained_cnn.x_test[:200])


@pytest.fixture(scope="module")
def resnet_exported(fmnist, tmp_path_factory, one_torch_thread) -> Exported:
    """resnet18 with BatchNorm (non-trivial stats), pruned by half, folded, int8."""
    train_set, test_set = fmnist
    torch.manual_seed(0)
    model = prune_model(build_model(default_spec("resnet18", IN)), 0.5, torch.zeros(1, *IN)).model
    original = copy.deepcopy(set_bn_stats(model, IN))
    fold_batchnorm(model)
    path = export_int8_file(model, tmp_path_factory.mktemp("resnet18"), train_set)
    return Exported(model, original, path, test_set.sample(64, seed=0).normalized())


@pytest.fixture(params=["cnn", "resnet18"])
def exported(request) -> Exported:
    return request.getfixturevalue(f"{'cnn' if request.param == 'cnn' else 'resnet'}_exported")


def numpy_state(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------- rebuilding

def test_bridge_weights_are_within_half_a_quantization_step(exported):
    model, info = torch_model_from_int8(exported.int8_path)
    assert info == read_info(exported.int8_path)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert tuple(model.widths()) == tuple(info.spec["widths"]) == spec_of(exported.reference).widths

    reference = numpy_state(exported.reference)
    assert set(model.state_dict()) == set(reference)
    weights = read_int8_weights(exported.int8_path)
    assert worst_error_in_steps(reference, weights) <= HALF_STEP

    # the same bound for the weights that actually sit in the returned torch model
    in_model = Int8Weights(info, numpy_state(model), weights.steps)
    worst = worst_error_in_steps(reference, in_model)
    assert worst <= HALF_STEP
    assert worst > 0.2, "the weights should have gone through int8 rounding"


def test_bridge_outputs_are_close_to_the_fp32_model(exported):
    model, _ = torch_model_from_int8(exported.int8_path)
    x = torch.from_numpy(exported.x)
    with torch.no_grad():
        ref, orig, got = exported.reference.eval()(x), exported.original.eval()(x), model(x)
    assert rel_error(got, ref) < 0.02
    assert rel_error(got, orig) < 0.02  # and to the model before BN folding
    assert (got.argmax(1) == ref.argmax(1)).float().mean() >= 0.95


def test_bridge_model_of_a_trained_cnn_predicts_like_it(cnn_exported, trained_cnn):
    model, _ = torch_model_from_int8(cnn_exported.int8_path)
    x = torch.from_numpy(trained_cnn.x_test)
    with torch.no_grad():
        ref, got = trained_cnn.model(x).argmax(1), model(x).argmax(1)
    assert (got == ref).float().mean() >= 0.98
    assert abs((got.numpy() == trained_cnn.y_test).mean() - (ref.numpy() == trained_cnn.y_test).mean()) <= 0.02


def test_bridge_model_can_be_fine_tuned(cnn_exported, trained_cnn):
    model, _ = torch_model_from_int8(cnn_exported.int8_path.read_bytes())  # from bytes, as downloaded
    batch = trained_cnn.train_set.sample(64, seed=7)
    x, y = torch.from_numpy(batch.normalized()), torch.from_numpy(batch.y)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(p.requires_grad for p in model.parameters())

    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert set(changed) == set(before), "every parameter should receive a gradient step"
    with torch.no_grad():
        assert float(F.cross_entropy(model(x), y)) < losses[0]


def test_bridge_rebuilds_a_users_own_architecture(user_models, fmnist, tmp_path):
    torch.manual_seed(0)
    model = set_bn_stats(custom_model(USER_ARCH, IN, 10), IN)
    folded = fold_batchnorm(prune_model(model, 0.5, torch.zeros(1, *IN)).model)
    path = export_int8_file(folded, tmp_path, fmnist[0])

    with pytest.raises(BridgeError, match=f"only with --allow-model-code {USER_ARCH}"):
        torch_model_from_int8(path)  # importing code named in a downloaded file needs consent

    rebuilt, info = torch_model_from_int8(path, allow_custom=True)
    assert isinstance(rebuilt, user_models.ResidualNet)
    assert info.spec["arch"] == USER_ARCH
    assert worst_error_in_steps(numpy_state(folded), read_int8_weights(path)) <= HALF_STEP
    assert worst_error_in_steps(numpy_state(folded),
                                Int8Weights(info, numpy_state(rebuilt), read_int8_weights(path).steps)) <= HALF_STEP


# --------------------------------------------------------------------------- refusing bad files

def expect_bridge_error(source, match: str | None) -> BridgeError:
    with pytest.raises(BridgeError, match=match) as exc:
        torch_model_from_int8(source)
    assert isinstance(exc.value, PqsuError)
    assert "\n" not in str(exc.value)
    return exc.value


def test_missing_file(tmp_path):
    expect_bridge_error(tmp_path / "nope.int8.onnx", r"cannot read .*nope\.int8\.onnx: No such file")


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.onnx"
    path.write_bytes(np.random.default_rng(0).bytes(5000))
    expect_bridge_error(path, "not an fl-pqsu model")


@pytest.mark.parametrize("keep", [0.5, 0.999, 100], ids=["half", "all-but-the-tail", "first-100-bytes"])
def test_truncated_file(cnn_exported, tmp_path, keep):
    data = cnn_exported.int8_path.read_bytes()
    cut = int(len(data) * keep) if keep < 1 else keep
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[:cut])
    expect_bridge_error(path, "not an fl-pqsu model|does not match its id")


def test_fp32_fl_pqsu_file(trained_cnn):
    expect_bridge_error(trained_cnn.fp32_path, "not an int8 model")


def test_fp32_file_claiming_to_be_int8(trained_cnn, tmp_path):
    forged = dataclasses.replace(read_info(trained_cnn.fp32_path), precision="int8")
    write_with_info(onnx.load(str(trained_cnn.fp32_path)), tmp_path / "forged.onnx", forged)
    expect_bridge_error(tmp_path / "forged.onnx", "not an int8 model")


def test_onnx_file_without_pqsu_metadata(cnn_exported, tmp_path):
    proto = onnx.load(str(cnn_exported.int8_path))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "plain.onnx"))
    expect_bridge_error(tmp_path / "plain.onnx", "not an fl-pqsu model")


def test_altered_content_fails_the_model_id(cnn_exported, tmp_path):
    data = bytearray(cnn_exported.int8_path.read_bytes())
    proto = onnx.load_from_string(bytes(data))
    q = next(t for t in proto.graph.initializer if t.name == "classifier.0.weight_quantized")
    at = bytes(data).find(q.raw_data)
    assert at > 0
    data[at + 10] ^= 0x40  # one weight changed, as a bit flip on a radio link would
    path = tmp_path / "altered.onnx"
    path.write_bytes(bytes(data))
    expect_bridge_error(path, "does not match its id")


def with_spec(src: Path, dst: Path, **changes) -> Path:
    info = read_info(src)
    write_with_info(onnx.load(str(src)), dst, dataclasses.replace(info, spec=dict(info.spec, **changes)))
    return dst


def test_spec_widths_that_do_not_fit_the_weights(cnn_exported, tmp_path):
    widths = read_info(cnn_exported.int8_path).spec["widths"]
    path = with_spec(cnn_exported.int8_path, tmp_path / "w.onnx", widths=[w + 1 for w in widths])
    err = expect_bridge_error(path, "do not fit the declared architecture")
    assert "features.0.weight" in str(err)


@pytest.mark.parametrize("changes", [{"widths": [16, 32]}, {"arch": "lenet"}], ids=["widths-count", "unknown-arch"])
def test_spec_that_cannot_be_built_is_a_bridge_error(cnn_exported, tmp_path, changes):
    path = with_spec(cnn_exported.int8_path, tmp_path / "w.onnx", **changes)
    expect_bridge_error(path, None)
