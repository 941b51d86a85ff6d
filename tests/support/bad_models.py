"""Factories a user might get wrong, for the checks that `--model` runs before any work.

Named as `tests.support.bad_models:<factory>`; each fails one check of `pqsu.export.model_check`.
"""
from __future__ import annotations

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
