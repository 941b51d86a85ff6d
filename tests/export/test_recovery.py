"""Round 0's pruning levers: criteria chosen by name, global ranking at uniform's parameter budget,
iterative steps that end where one step does, distillation toward the unpruned model, and auto:PT."""
from __future__ import annotations

import copy

import pytest
import torch

from pqsu.export.measure import count_params
from pqsu.export.pipeline import PrepareConfig, finish_with_report, pretrain
from pqsu.export.pruning import PruneError, layer_widths, prune_model
from pqsu.export.prune_spec import PruneSpecError, check, parse_prune
from pqsu.export.training import TrainConfig, predict_logits, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")
IN = (1, 28, 28)


@pytest.fixture(scope="module")
def proxy(fmnist):
    return fmnist[0].sample(320, seed=1)


@pytest.fixture(scope="module")
def trained(proxy):
    return pretrain(PrepareConfig("cnn", prune=None, pretrain_epochs=3, seed=3), proxy)  # ~50%: a teacher worth following


@pytest.mark.parametrize("value, want", [(0.5, (0.5, None)), ("0.3", (0.3, None)), ("auto:1", (None, 1.0)),
                                         ("auto:0.5", (None, 0.5)), (None, (None, None))])
def test_prune_settings_parse(value, want):
    assert parse_prune(value) == want


@pytest.mark.parametrize("kwargs, message", [
    (dict(prune="auto:x"), "auto:PT needs a tolerance"), (dict(prune="auto"), "auto:PT needs a tolerance"),
    (dict(prune="half"), "ratio in (0, 1) or auto:PT"), (dict(prune=1.0), "ratio must be in (0, 1)"),
    (dict(prune=0.5, importance="size"), "unknown importance 'size'"),
    (dict(prune=0.5, ranking="layerwise"), "unknown ranking"), (dict(prune=0.5, distill=1.0), "distill"),
    (dict(prune=0.5, prune_steps=0), "prune_steps")])
def test_bad_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(PruneSpecError, match=message.replace("(", r"\(").replace(")", r"\)")) as exc:
        check(**kwargs)
    assert "\n" not in str(exc.value)


def test_global_ranking_sets_its_own_widths_at_uniforms_parameter_count(trained):
    uniform = prune_model(trained, 0.5, torch.zeros(1, *IN))
    ranked = prune_model(trained, 0.5, torch.zeros(1, *IN), ranking="global")
    # at most uniform's parameters, short of them by less than one channel of the conv feeding the fc (6%)
    assert 0.94 * count_params(uniform.model) <= count_params(ranked.model) <= count_params(uniform.model)
    assert ranked.widths_after != uniform.widths_after  # one threshold model-wide, not one ratio per layer
    assert layer_widths(trained) == uniform.widths_before  # the caller's model is untouched


def test_taylor_needs_data_and_ranks_by_the_loss_not_the_weights(trained, proxy):
    with pytest.raises(PruneError, match="needs data"):
        prune_model(trained, 0.5, torch.zeros(1, *IN), importance="taylor")
    x, y = proxy.normalized(), proxy.y
    taylor = prune_model(trained, 0.5, torch.zeros(1, *IN), importance="taylor", data=(x, y)).model
    l1 = prune_model(trained, 0.5, torch.zeros(1, *IN)).model
    assert layer_widths(taylor) == layer_widths(l1)  # same budget, different channels
    assert not torch.equal(taylor.features[0].weight, l1.features[0].weight)
    assert all(p.grad is None for p in taylor.parameters())  # the ranking's gradients do not ship


def test_k_steps_end_at_the_widths_of_one_step(trained, proxy):
    one = PrepareConfig("cnn", prune=0.5, finetune_epochs=0.1, seed=3)
    three = PrepareConfig("cnn", prune=0.5, finetune_epochs=0.1, seed=3, prune_steps=3)
    a, _ = finish_with_report(_copy(trained), one, proxy)
    b, _ = finish_with_report(_copy(trained), three, proxy)
    assert layer_widths(a) == layer_widths(b)


def _copy(model):
    return copy.deepcopy(model)


def test_distillation_pulls_the_student_toward_the_teacher(trained, proxy):
    """Trained on labels that disagree with the teacher, a distilled student still follows the teacher."""
    x = proxy.normalized()
    teacher_says = predict_logits(trained, x).argmax(1)
    wrong = (teacher_says + 1) % 10

    def agreement(distill: float) -> float:
        student = prune_model(trained, 0.5, torch.zeros(1, *IN)).model
        train(student, x, wrong, TrainConfig(epochs=1, lr=0.01, momentum=0.9, seed=0, distill=distill), teacher=trained)
        return float((predict_logits(student, x).argmax(1) == teacher_says).mean())

    assert agreement(0.9) > agreement(0.0) + 0.3


def test_auto_picks_the_largest_ratio_within_the_tolerance_and_reports_its_probes(trained, proxy):
    cfg = PrepareConfig("cnn", prune="auto:3", finetune_epochs=0.2, seed=3)
    model, report = finish_with_report(_copy(trained), cfg, proxy)
    probes = {p["ratio"]: p for p in report.probes}
    within = [r for r, p in probes.items() if p["within"]]
    assert report.tolerance_pt == 3 and report.val_samples == 64
    for r, p in probes.items():  # each verdict is its accuracy against the unpruned model's, within 3 points
        assert p["within"] == (100 * (report.unpruned_val_accuracy - p["val_accuracy"]) <= 3)
    if within:
        assert report.ratio == max(within)
        assert all(r > report.ratio for r, p in probes.items() if not p["within"])
        assert report.chosen_val_accuracy == probes[report.ratio]["val_accuracy"]
        assert count_params(model) < count_params(trained)
    else:
        assert report.ratio is None and count_params(model) == count_params(trained)
    assert 2 <= len(probes) <= 4  # bisection over 0.1 .. 0.9, not a scan
