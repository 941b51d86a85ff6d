"""Users' own architectures the zoo lacks, each through round 0, int8 export, the bridge and a fine-tune step.

The models are `tests.support.user_models` (tiny widths); the data is real: Fashion-MNIST for the
image nets, ItalyPowerDemand (smart-meter readings from the sktime wheel) for the 1-D ones.
Each model is exported once per module and the tests read that export.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from pqsu.export.bridge import BridgeError, check_bridge, torch_model_from_int8
from pqsu.export.custom import build_any, custom_model, spec_of
from pqsu.export.datasets import load_dataset
from pqsu.export.folding import fold_batchnorm
from pqsu.export.pipeline import PrepareConfig, export_model, finish, model_info, pretrain
from pqsu.export.pruning import layer_widths, prune_model
from pqsu.export.runtime import OrtModel
from pqsu.export.training import TrainConfig, predict_logits, train
from pqsu.export.zoo import ZooError
from pqsu.protocol.model_id import stamped

from tests.support import user_models
from tests.support.nets import FMNIST_ROOT, set_bn_stats

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODULE = "tests.support.user_models"
IMAGE_NETS = ["mobilenet_net", "groupnorm_resnet", "attribute_bn_net"]


@dataclasses.dataclass
class Exported:
    model: nn.Module        # the pruned, BN-folded model that was exported
    data: object            # the ArrayDataset it was trained on
    int8: bytes


def export_user_model(factory: str, data) -> Exported:
    cfg = PrepareConfig(arch=f"{MODULE}:{factory}", prune=0.5, pretrain_epochs=1, finetune_epochs=1, batch_size=16)
    model = finish(pretrain(cfg, data), cfg, data)
    int8 = export_model(model, model_info(model, data), data.normalized()[:32])
    return Exported(model, data, int8.data)


@pytest.fixture(scope="module")
def images():
    if not FMNIST_ROOT.is_dir():
        pytest.skip(f"{FMNIST_ROOT} missing")
    return load_dataset("fashion-mnist", "train").sample(64, seed=0)


@pytest.fixture(scope="module")
def exported(images):
    cache: dict[str, Exported] = {}

    def get(factory: str) -> Exported:
        if factory not in cache:
            cache[factory] = export_user_model(factory, images)
        return cache[factory]
    return get


def state(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("factory", IMAGE_NETS)
def test_user_model_survives_export_bridge_and_a_fine_tune_step(exported, factory):
    e = exported(factory)
    check = check_bridge(state(e.model), e.int8)
    assert check.parameters == len(e.model.state_dict()) and check.quantized == check.parameters
    assert check.worst_steps <= 0.5 + 1e-3

    rebuilt, info = torch_model_from_int8(e.int8, allow_custom=True)
    assert type(rebuilt) is type(e.model) and info.spec["widths"] == list(spec_of(e.model).widths)
    x = e.data.normalized()[:16]
    ref, got = predict_logits(e.model, x), predict_logits(rebuilt, x)
    assert np.abs(got - ref).max() <= 0.05 * np.abs(ref).max()  # the dequantized weights give the same model
    ort = OrtModel(e.int8).logits(x)
    assert (ort.argmax(1) == ref.argmax(1)).mean() >= 0.75      # and onnxruntime runs the same model in int8

    before = state(rebuilt)
    stats = train(rebuilt, x, e.data.y[:16], TrainConfig(epochs=1, batch_size=16, lr=0.05))
    after = state(rebuilt)
    assert np.isfinite(stats.loss) and stats.steps == 1
    moved = [k for k in before if not np.array_equal(before[k], after[k])]
    assert len(moved) == len(before)  # every parameter, normalization ones included, is trainable on the board


def test_groupnorm_parameters_are_in_the_file_under_their_names(exported):
    e = exported("groupnorm_resnet")
    names = {t.name.removesuffix("_quantized") for t in onnx.load_from_string(e.int8).graph.initializer}
    for key in ("stem.1.weight", "stem.1.bias", "gn1.weight", "gn1.bias", "gn2.weight", "gn2.bias"):
        assert key in names, key


def test_mobilenet_depthwise_convs_stay_depthwise_after_pruning(exported):
    e = exported("mobilenet_net")
    depthwise = [m for m in e.model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 2
    assert all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    assert e.model.classifier.out_features == 10 and e.model.classifier.in_features < 24  # pruned, classifier kept


def test_a_file_that_does_not_hold_the_model_fails_the_bridge_check(exported):
    e = exported("attribute_bn_net")
    proto = onnx.load_from_string(e.int8)
    weight = next(t for t in proto.graph.initializer if t.name == "conv2.weight_quantized")
    q = numpy_helper.to_array(weight).copy()
    q.flat[0] = np.int8(-q.flat[0] if q.flat[0] else 5)  # one int8 entry moved by several steps
    weight.CopyFrom(numpy_helper.from_array(q, weight.name))
    tampered = stamped(proto.SerializeToString()).data
    with pytest.raises(BridgeError, match=r"bridge check failed: conv2.weight .* quantization steps .*bound 0.5"):
        check_bridge(state(e.model), tampered)

    lacking = state(e.model)
    lacking["extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(BridgeError, match=r"does not have the exported model's parameters: not rebuilt \['extra.weight'\]"):
        check_bridge(lacking, e.int8)


def test_attribute_batchnorm_folds_through_the_graph():
    model = set_bn_stats(custom_model(f"{MODULE}:attribute_bn_net", (1, 28, 28), 10), (1, 28, 28))
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        reference = model(x)
        folded = fold_batchnorm(model)
        torch.testing.assert_close(folded(x), reference, atol=1e-4, rtol=1e-4)
    assert all(isinstance(getattr(folded, f"bn{i}"), nn.Identity) for i in (1, 2, 3))


def test_batchnorm1d_folds_into_conv1d_and_linear():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4)
            self.fc, self.bn_fc, self.out = nn.Linear(4 * 14, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)

        def forward(self, x):
            return self.out(torch.relu(self.bn_fc(self.fc(torch.flatten(torch.relu(self.bn(self.conv(x))), 1)))))

    model = Net()
    gen = torch.Generator().manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 2, 16, generator=gen) * 2 + 1)
    model.eval()
    x = torch.randn(5, 2, 16, generator=gen)
    with torch.no_grad():
        reference = model(x)
        torch.testing.assert_close(fold_batchnorm(model)(x), reference, atol=1e-4, rtol=1e-4)
    assert isinstance(model.bn, nn.Identity) and isinstance(model.bn_fc, nn.Identity)


def test_batchnorm_that_cannot_fold_is_refused_before_training():
    with pytest.raises(ZooError, match=r"prenorm_net: BatchNorm layer\(s\) bn do not directly follow a conv"):
        custom_model(f"{MODULE}:prenorm_net", (1, 28, 28), 10)


def test_factories_are_told_the_input_shape_and_class_count():
    model = custom_model(f"{MODULE}:conv1d_net", (6, 100), 4)
    assert model.spec.in_shape == (6, 100) and model.spec.num_classes == 4
    assert isinstance(model, user_models.Conv1dNet)
    assert model.spec.widths == (8, 12, 16, 4)  # Conv1d widths are recorded too


@pytest.mark.long
@pytest.mark.parametrize("factory", ["layernorm_mlp", "conv1d_net"])
def test_sensor_user_models_through_export_bridge_and_fine_tune(factory):
    data = load_dataset("italy-power", "train").sample(64, seed=0)
    e = export_user_model(factory, data)
    check = check_bridge(state(e.model), e.int8)
    assert check.parameters == len(e.model.state_dict()) and check.worst_steps <= 0.5 + 1e-3
    rebuilt, _ = torch_model_from_int8(e.int8, allow_custom=True)
    stats = train(rebuilt, data.normalized()[:16], data.y[:16], TrainConfig(epochs=1, batch_size=16))
    assert np.isfinite(stats.loss)


def test_conv1d_net_prunes_and_rebuilds_from_its_recorded_widths():
    model = set_bn_stats(custom_model(f"{MODULE}:conv1d_net", (1, 24), 2), (1, 24))
    pruned = prune_model(model, 0.5, torch.zeros(1, 1, 24)).model
    assert layer_widths(pruned) == (4, 6, 8, 2)  # Conv1d widths halved with the hidden Linear, logits kept
    folded = fold_batchnorm(pruned)
    spec = spec_of(folded)
    assert spec.widths == (4, 6, 8, 2) and spec.batchnorm is False
    rebuilt = build_any(spec, allow_custom=True)
    rebuilt.load_state_dict(folded.state_dict())  # same names and shapes: what the bridge relies on
    x = torch.randn(3, 1, 24)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), folded(x))


@pytest.mark.long
def test_fresh_groupnorms_with_equal_values_each_get_their_own_tensor():
    """Two untrained GroupNorms hold the same values (ones, zeros): only the probe export tells their tensors apart."""
    from pqsu.export.onnx_export import to_onnx

    model = fold_batchnorm(custom_model(f"{MODULE}:groupnorm_resnet", (1, 28, 28), 10).eval())
    data = load_dataset("fashion-mnist", "train").head(8)
    proto, _ = to_onnx(model, model_info(model, data))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for key in ("stem.1.weight", "gn1.weight", "gn2.weight", "gn1.bias"):
        assert key in inits and inits[key].size == 8, key
    consumers = {name: [n.op_type for n in proto.graph.node if name in n.input] for name in ("gn1.weight", "gn2.weight")}
    assert consumers["gn1.weight"] and consumers["gn2.weight"]  # each feeds its own node
    x = data.normalized()
    import onnxruntime as ort
    logits = ort.InferenceSession(proto.SerializeToString()).run(None, {"input": x})[0]
    np.testing.assert_allclose(logits, predict_logits(model, x), atol=1e-4, rtol=1e-4)  # real values went back in


@pytest.mark.parametrize("factory", ["mobilenet_net", "groupnorm_resnet"])
def test_an_untrained_model_with_equal_parameters_rebuilds_from_its_int8_file(factory):
    """Freshly initialized: the folded conv biases are all zeros, GroupNorms all ones and zeros, so several
    parameters hold the same small tensor. onnxruntime's optimizer would make them one initializer; each
    must stay its own, or the board cannot rebuild the model to fine-tune it."""
    if not FMNIST_ROOT.is_dir():
        pytest.skip(f"{FMNIST_ROOT} missing")
    torch.manual_seed(0)
    model = fold_batchnorm(custom_model(f"{MODULE}:{factory}", (1, 28, 28), 10).eval())
    data = load_dataset("fashion-mnist", "train").head(16)
    int8 = export_model(model, model_info(model, data), data.normalized()).data
    check = check_bridge(state(model), int8)
    assert check.parameters == len(model.state_dict()) and check.worst_steps <= 0.5 + 1e-3
    rebuilt, _ = torch_model_from_int8(int8, allow_custom=True)
    x = torch.from_numpy(data.normalized())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), atol=0.05, rtol=0.05)
