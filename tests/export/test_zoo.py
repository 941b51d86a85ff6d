"""The model zoo: every architecture builds from a widths spec, for grey 28x28 and colour 32x32 inputs."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from pqsu.export.zoo import ARCHS, ModelSpec, ZooError, build_model, default_spec
from pqsu.protocol.errors import PqsuError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ALL_ARCHS = ["cnn", "alexnet", "vgg16", "resnet18"]  # image archs
SENSOR_ARCHS = ["cnn1d"]
SHAPES = [(1, 28, 28), (3, 32, 32)]


def test_the_zoo_has_the_documented_architectures():
    assert sorted(ARCHS) == sorted(ALL_ARCHS + SENSOR_ARCHS)


@pytest.mark.parametrize("in_shape", [(1, 24), (6, 100), (3, 128)], ids=["italy-power", "basic-motions", "accel"])
def test_cnn1d_maps_sensor_windows_of_any_length_to_logits(in_shape):
    spec = default_spec("cnn1d", in_shape, num_classes=4)
    model = build_model(spec).eval()
    with torch.no_grad():
        out = model(torch.randn(3, *in_shape))
    assert out.shape == (3, 4) and torch.isfinite(out).all()
    assert model.widths() == spec.widths == (32, 64, 64, 64)
    assert any(isinstance(m, nn.BatchNorm1d) for m in model.modules())
    folded_layout = build_model(default_spec("cnn1d", in_shape, 4, batchnorm=False))
    assert not any(isinstance(m, nn.BatchNorm1d) for m in folded_layout.modules())
    assert all(m.bias is not None for m in folded_layout.modules() if isinstance(m, nn.Conv1d))


def test_image_and_window_archs_refuse_the_other_input_kind():
    with pytest.raises(ZooError, match=r"cnn takes images \(C, H, W\), not input \(1, 24\); .*choose cnn1d"):
        build_model(default_spec("cnn", (1, 24)))
    with pytest.raises(ZooError, match=r"cnn1d takes sensor windows \(C, L\), not input \(1, 28, 28\)"):
        build_model(default_spec("cnn1d", (1, 28, 28)))


@pytest.mark.parametrize("in_shape", SHAPES, ids=["28x28x1", "32x32x3"])
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_every_arch_builds_and_maps_a_batch_to_class_logits(arch, in_shape):
    spec = default_spec(arch, in_shape)
    model = build_model(spec).eval()
    with torch.no_grad():
        out = model(torch.randn(3, *in_shape))
    assert out.shape == (3, 10)
    assert torch.isfinite(out).all()
    assert model.spec == spec
    assert tuple(model.widths()) == spec.widths


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_num_classes_sets_the_logits_width(arch):
    model = build_model(default_spec(arch, (1, 28, 28), num_classes=3)).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 3)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_a_built_model_has_the_widths_of_its_spec(arch):
    default = default_spec(arch)
    # every width different from the default, and different from each other where possible
    widths = tuple(max(1, w // 4) + i for i, w in enumerate(default.widths))
    spec = ModelSpec(arch, widths, (1, 28, 28), 10, default.batchnorm)
    model = build_model(spec).eval()
    assert tuple(model.widths()) == widths
    # the widths are real layer sizes, not just a label: the first conv has widths[0] filters
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.out_channels == widths[0]
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_batchnorm_flag_controls_batchnorm_and_conv_bias(arch):
    with_bn = build_model(default_spec(arch, batchnorm=True))
    without = build_model(default_spec(arch, batchnorm=False))
    assert any(isinstance(m, nn.BatchNorm2d) for m in with_bn.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in without.modules())
    assert all(m.bias is not None for m in without.modules() if isinstance(m, nn.Conv2d))


def test_default_batchnorm_matches_the_papers_models():
    assert {a: default_spec(a).batchnorm for a in ALL_ARCHS} == {
        "cnn": False, "alexnet": False, "vgg16": True, "resnet18": True}


def test_spec_round_trips_through_a_dict_and_json():
    spec = ModelSpec("vgg16", tuple(range(1, 16)), (3, 32, 32), 7, True)
    d = spec.to_dict()
    assert d == {"arch": "vgg16", "widths": list(range(1, 16)), "in_shape": [3, 32, 32],
                 "num_classes": 7, "batchnorm": True}
    assert ModelSpec.from_dict(d) == spec
    assert ModelSpec.from_dict(json.loads(json.dumps(d))) == spec  # it travels as JSON in ONNX metadata


def test_incomplete_spec_dict_is_a_zoo_error():
    d = default_spec("cnn").to_dict()
    del d["widths"]
    with pytest.raises(ZooError, match="widths"):
        ModelSpec.from_dict(d)


@pytest.mark.parametrize("call", [lambda: default_spec("lenet"),
                                  lambda: build_model(ModelSpec("lenet", (8, 8)))], ids=["default_spec", "build_model"])
def test_unknown_arch_error_lists_the_choices(call):
    with pytest.raises(ZooError) as exc:
        call()
    assert isinstance(exc.value, PqsuError)
    msg = str(exc.value)
    assert "lenet" in msg
    for arch in ALL_ARCHS:
        assert arch in msg


@pytest.mark.parametrize("widths", [(32, 64), (32, 64, 128, 256), ()], ids=["short", "long", "empty"])
def test_wrong_number_of_widths_is_a_zoo_error(widths):
    with pytest.raises(ZooError, match="cnn takes 3 positive widths") as exc:
        build_model(ModelSpec("cnn", widths))
    assert isinstance(exc.value, PqsuError)


def test_zero_width_is_a_zoo_error():
    with pytest.raises(ZooError, match="positive"):
        build_model(ModelSpec("cnn", (32, 0, 128)))


def test_input_too_small_for_the_pools_is_a_zoo_error():
    with pytest.raises(ZooError, match=r"cannot build cnn for input \(1, 2, 2\)"):
        build_model(default_spec("cnn", (1, 2, 2)))
