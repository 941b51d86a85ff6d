"""Factories a user might get wrong, for the checks that `--model` runs before any work.

Named as `tests.support.bad_models:<factory>`; each fails one check of `pqsu.export.model_check`.
"""
from __future__ import annotations

import itertools
import math

from torch import nn

NOT_CALLABLE = 42


def returns_a_dict():
    return {"conv": nn.Conv2d(1, 4, 3)}


def raises_inside():
    raise ValueError("width must be even")


def flat_input_net():
    """Takes 10 features, not a 1x28x28 image: the forward fails on Fashion-MNIST."""
    return nn.Sequential(nn.Linear(10, 4), nn.ReLU(), nn.Linear(4, 10))


def three_classes():
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 3))


_builds = itertools.count()


def changing_net(in_shape=(1, 28, 28), num_classes=10):
    """One conv layer at one call, two at the next: an architecture that is not a function of the factory's
    arguments (it reads a setting that changed, or samples a search space), so the model a board rebuilds
    does not fit the file round 0 exported. It builds, trains and exports fine on the cloud."""
    extra = [nn.Conv2d(6, 6, 3, padding=1), nn.ReLU()] if next(_builds) % 2 else []
    return nn.Sequential(nn.Conv2d(in_shape[0], 6, 3, padding=1), nn.ReLU(), *extra, nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(6, num_classes))


class _EvalOnly(nn.Module):
    def __init__(self, in_shape, num_classes):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), num_classes))

    def forward(self, x):
        if self.training:
            raise RuntimeError("eval only: this model was written for inference")
        return self.body(x)


def eval_only_net(in_shape=(1, 28, 28), num_classes=10):
    """Answers in eval mode, raises in training mode: inference code that was never trained in."""
    return _EvalOnly(tuple(in_shape), num_classes)
