"""Structured pruning: the model really shrinks, stays rebuildable from its spec, and BN folds exactly."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.support.nets import USER_ARCH, set_bn_stats
from pqsu.export.custom import build_any, custom_model, spec_of
from pqsu.export.measure import count_params
from pqsu.export.folding import FoldError
from pqsu.export.pruning import PruneError, classifier_of, fold_batchnorm, layer_widths, prune_model
from pqsu.export.zoo import ZooError, build_model, default_spec
from pqsu.protocol.errors import PqsuError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ALL_ARCHS = ["cnn", "alexnet", "vgg16", "resnet18"]
IN = (1, 28, 28)


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def unpruned():
    """One fresh model per arch, shared: prune_model must not touch it (it copies by default)."""
    torch.manual_seed(0)
    return {arch: build_model(default_spec(arch, IN)).eval() for arch in ALL_ARCHS}


@pytest.mark.parametrize("ratio", [0.3, 0.5])
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_prune_shrinks_every_arch_and_keeps_it_rebuildable(unpruned, arch, ratio):
    model = unpruned[arch]
    widths_before = layer_widths(model)
    result = prune_model(model, ratio, torch.zeros(1, *IN))
    pruned = result.model

    # the original is untouched (prune copies unless inplace=True)
    assert layer_widths(model) == widths_before
    assert result.widths_before == widths_before
    assert result.widths_after == layer_widths(pruned)

    # conv params scale with (1-r)^2: both in and out channels go (first conv input and logits stay)
    kept = count_params(pruned) / count_params(model)
    assert kept == pytest.approx((1 - ratio) ** 2, abs=0.03)

    # every hidden layer lost about `ratio` of its outputs, the classifier kept one per class
    for before, after in zip(result.widths_before[:-1], result.widths_after[:-1]):
        assert after == pytest.approx(before * (1 - ratio), abs=1)
    assert classifier_of(pruned).out_features == 10
    assert result.widths_after[-1] == 10

    # the pruned model still runs
    with torch.no_grad():
        out = pruned.eval()(torch.randn(2, *IN))
    assert out.shape == (2, 10)

    # a board rebuilds exactly this structure from the spec alone, and the weights load into it
    spec = spec_of(pruned)
    assert spec.widths == tuple(pruned.widths())
    rebuilt = build_model(spec).eval()
    assert shapes(rebuilt) == shapes(pruned)
    rebuilt.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        x = torch.randn(2, *IN)
        torch.testing.assert_close(rebuilt(x), pruned(x))


@pytest.mark.parametrize("arch", ["cnn", "resnet18"])
def test_prune_works_on_colour_inputs(arch):
    model = build_model(default_spec(arch, (3, 32, 32)))
    pruned = prune_model(model, 0.5, torch.zeros(1, 3, 32, 32)).model
    assert shapes(build_model(spec_of(pruned))) == shapes(pruned)
    with torch.no_grad():
        assert pruned(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_inplace_prune_changes_the_given_model():
    model = build_model(default_spec("cnn"))
    result = prune_model(model, 0.5, torch.zeros(1, *IN), inplace=True)
    assert result.model is model
    assert layer_widths(model) == (16, 32, 64, 10)


def test_round_to_keeps_pruned_widths_multiples():
    result = prune_model(build_model(default_spec("cnn")), 0.3, torch.zeros(1, *IN), round_to=8)
    assert all(w % 8 == 0 for w in result.widths_after[:-1]), result.widths_after
    assert result.widths_after[-1] == 10


def test_keep_protects_a_layer_from_pruning_inplace():
    model = build_model(default_spec("cnn"))
    result = prune_model(model, 0.5, torch.zeros(1, *IN), keep=[model.features[0]], inplace=True)
    assert result.widths_after[0] == 32  # the kept conv
    assert result.widths_after[1] == 32  # the next conv was still pruned (64 -> 32)


def test_keep_protects_a_layer_from_pruning():
    model = build_model(default_spec("cnn"))
    result = prune_model(model, 0.5, torch.zeros(1, *IN), keep=[model.features[0]])
    assert result.widths_after[0] == 32  # the kept conv
    assert result.widths_after[1] == 32  # the next conv was still pruned (64 -> 32)


@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.5, -0.1])
def test_ratio_outside_open_unit_interval_is_a_prune_error(ratio):
    with pytest.raises(PruneError, match="prune ratio must be in") as exc:
        prune_model(build_model(default_spec("cnn")), ratio, torch.zeros(1, *IN))
    assert isinstance(exc.value, PqsuError)


# --------------------------------------------------------------------------- BatchNorm folding

@pytest.mark.parametrize("arch", ["vgg16", "resnet18"])
def test_fold_batchnorm_preserves_eval_outputs(unpruned, arch):
    model = prune_model(unpruned[arch], 0.5, torch.zeros(1, *IN)).model
    set_bn_stats(model, IN)
    x = torch.randn(4, *IN)
    with torch.no_grad():
        reference = model(x)
    assert reference.abs().max() > 1e-2  # the check below is not vacuous

    folded = fold_batchnorm(copy.deepcopy(model))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded.eval()(x), reference, atol=1e-5, rtol=1e-4)

    # the folded model is the architecture without BN: same keys and shapes, so ONNX names map back
    spec = spec_of(folded)
    assert spec.batchnorm is False
    assert shapes(build_model(spec)) == shapes(folded)


def test_fold_batchnorm_folds_bn_held_as_attributes():
    class Loose(nn.Module):  # torchvision's layout: the wiring is only in forward
        def __init__(self):
            super().__init__()
            self.bn, self.conv = nn.BatchNorm2d(4), nn.Conv2d(1, 4, 3, bias=False)  # registered out of order

        def forward(self, x):
            return self.bn(self.conv(x))

    model = set_bn_stats(Loose(), (1, 8, 8))
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        reference = model(x)
        folded = fold_batchnorm(model)
        torch.testing.assert_close(folded(x), reference, atol=1e-5, rtol=1e-4)
    assert isinstance(folded.bn, nn.Identity) and folded.conv.bias is not None


def test_fold_batchnorm_refuses_bn_that_follows_no_conv():
    class PreNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.conv = nn.BatchNorm2d(1), nn.Conv2d(1, 4, 3)

        def forward(self, x):
            return self.conv(self.bn(x))

    with pytest.raises(FoldError, match="BatchNorm layer.s. bn do not directly follow a conv") as exc:
        fold_batchnorm(PreNorm())
    assert isinstance(exc.value, PqsuError)


# --------------------------------------------------------------------------- a user's own model

def user_model_with_stats():
    torch.manual_seed(0)
    return set_bn_stats(custom_model(USER_ARCH, IN, 10), IN)


def test_user_model_prunes_with_its_skip_connection(user_models):
    model = user_model_with_stats()
    assert isinstance(model, user_models.ResidualNet)
    assert model.spec.arch == USER_ARCH and model.spec.batchnorm is True

    pruned = prune_model(model, 0.5, torch.zeros(1, *IN)).model
    assert count_params(pruned) < 0.35 * count_params(model)
    # the add couples the stem and the block's last conv: they shrink together
    assert pruned.stem[0].out_channels == pruned.body[3].out_channels == 8
    assert pruned.head[-1].out_features == 10
    with torch.no_grad():
        assert pruned(torch.randn(2, *IN)).shape == (2, 10)

    # with BN still in, build_any rebuilds the unfolded pruned structure
    rebuilt_bn = build_any(spec_of(pruned), allow_custom=True)
    assert shapes(rebuilt_bn) == shapes(pruned)


def test_user_model_rebuilds_from_its_folded_spec(user_models):
    pruned = prune_model(user_model_with_stats(), 0.5, torch.zeros(1, *IN)).model
    x = torch.randn(3, *IN)
    with torch.no_grad():
        reference = pruned(x)
    folded = fold_batchnorm(pruned)
    spec = spec_of(folded)
    assert spec.arch == USER_ARCH and spec.batchnorm is False

    rebuilt = build_any(spec, allow_custom=True)
    assert shapes(rebuilt) == shapes(folded)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in rebuilt.modules())
    rebuilt.load_state_dict(folded.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), reference, atol=1e-5, rtol=1e-4)


def test_custom_arch_is_refused_unless_allowed(user_models):
    folded = fold_batchnorm(prune_model(user_model_with_stats(), 0.5, torch.zeros(1, *IN)).model)
    with pytest.raises(ZooError, match="custom architecture user_models:residual_net: imported") as exc:
        build_any(spec_of(folded), allow_custom=False)
    assert isinstance(exc.value, PqsuError)


def test_zoo_arch_through_build_any_needs_no_permission():
    spec = spec_of(prune_model(build_model(default_spec("cnn")), 0.5, torch.zeros(1, *IN)).model)
    assert tuple(build_any(spec).widths()) == spec.widths


@pytest.mark.parametrize("arch, match", [
    ("user_models:no_such_factory", "cannot import architecture"),
    ("no_such_pkg.nets:net", "cannot import architecture"),
    ("user_models:not_a_model", "not an nn.Module"),
])
def test_bad_custom_arch_names_are_zoo_errors(user_models, arch, match):
    with pytest.raises(ZooError, match=match):
        custom_model(arch, IN, 10)


def test_custom_model_with_wrong_class_count_is_a_zoo_error(user_models):
    with pytest.raises(ZooError, match=r"expected \(5,\)"):
        custom_model(USER_ARCH, IN, 5)
