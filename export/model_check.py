"""Is `--model` a model this data can train? Answered in seconds, before any work starts.

A zoo name must be known and its pools must fit the data's input; a user's `package.module:factory`
must import, be callable, return an `nn.Module` and map one sample of the data's shape to one score
per class. Whatever the user's code raises becomes one line naming the model, the data and the
first line of the error: a traceback from inside someone's factory helps nobody at a terminal.

The cloud side (the user's own machine, the user's own command) also finds a module in the current
folder, as `python -m` would: the `pqsu` console script's path does not hold it. A device does not:
it imports only the architectures it was told to allow, from its path or its `model_code_dir`.
"""
from __future__ import annotations

import importlib.util
import os
import sys

from pqsu.protocol.errors import PqsuError


class ModelCheckError(PqsuError):
    """A model that cannot be built for the data it is meant to train on."""


def check_custom_name(arch: str) -> None:
    """`package.module:factory` in form (no import): what a settings file or a flag may name."""
    module, sep, attr = arch.partition(":")
    parts = module.split(".")
    if not sep or not attr.isidentifier() or not all(p.isidentifier() for p in parts):
        raise ModelCheckError(f"model code {arch!r} is not package.module:factory")


def find_module_in_cwd(arch: str) -> None:
    """Put the current folder last on the import path when it holds `arch`'s top-level package or
    module and nothing on the path does (the console script runs without the folder on its path)."""
    top = arch.partition(":")[0].split(".")[0]
    cwd = os.getcwd()
    if cwd in sys.path or "" in sys.path or importlib.util.find_spec(top) is not None:
        return
    if os.path.isfile(os.path.join(cwd, top + ".py")) or os.path.isdir(os.path.join(cwd, top)):
        sys.path.append(cwd)


def check_importable(arch: str) -> None:
    """The module of a custom architecture imports and names a callable (no model is built)."""
    from pqsu.export.custom import load_factory  # torch: only when a custom model is named

    check_custom_name(arch)
    try:
        load_factory(arch)
    except PqsuError:
        raise
    except Exception as exc:  # the module's own code raised while being imported
        raise ModelCheckError(f"importing {arch.partition(':')[0]} for model {arch} failed: {_first_line(exc)}") \
            from None


def check_model(arch: str, in_shape: tuple[int, ...], num_classes: int, data_name: str) -> None:
    """A ModelCheckError (one line) unless `arch` builds for samples of `in_shape` and `num_classes` classes."""
    from pqsu.export.custom import custom_model, is_custom
    from pqsu.export.zoo import ZooError, build_model, default_spec

    if not is_custom(arch):
        spec = default_spec(arch)  # an unknown name fails here with the zoo's list
        try:
            build_model(default_spec(spec.arch, tuple(in_shape), num_classes))
        except ZooError as exc:
            raise ModelCheckError(f"model {arch} does not fit data set {data_name}: {exc}") from None
        return
    check_custom_name(arch)
    find_module_in_cwd(arch)
    check_importable(arch)
    try:
        model = custom_model(arch, tuple(in_shape), num_classes)
    except PqsuError as exc:  # not a module, or the wrong number of outputs: the message names both
        raise ModelCheckError(f"{exc} (data set {data_name})") from None
    except Exception as exc:  # the user's factory or forward raised
        raise ModelCheckError(f"model {arch} cannot be built for data set {data_name} (input {tuple(in_shape)}, "
                              f"{num_classes} classes): {_first_line(exc)}") from None
    check_trainable(model, arch, tuple(in_shape), data_name)


def check_trainable(model, arch: str, in_shape: tuple[int, ...], data_name: str) -> None:
    """One training-mode forward and backward pass on two blank samples: a forward that differs in training
    (an extra head's outputs, a branch that raises) fails here, not minutes into round 0's pre-training.
    `model` is a throw-away copy: its BatchNorm statistics move."""
    import torch
    import torch.nn.functional as F

    try:
        logits = model.train()(torch.zeros(2, *in_shape))
        F.cross_entropy(logits, torch.zeros(2, dtype=torch.long)).backward()
    except Exception as exc:  # the user's forward in training mode can raise anything
        raise ModelCheckError(f"model {arch} cannot be trained on data set {data_name} (input {in_shape}): in "
                              f"training mode {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__
