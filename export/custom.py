"""Users' own architectures, named `package.module:factory`.

`factory()` returns the unpruned `nn.Module`; a factory that takes keyword arguments
`in_shape` and/or `num_classes` is told the data's, so one factory serves any input. A
pruned copy is rebuilt by building it and shrinking it to the recorded per-layer widths
through the dependency graph, so no widths-aware constructor is needed. Importing a module named in a file is code
execution, so a model that came over the network is only rebuilt this way when the
receiver explicitly allows custom architectures.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Collection
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from pqsu.export.folding import FoldError, check_foldable, fold_batchnorm
from pqsu.export.pruning import layer_widths, shrink_to_widths
from pqsu.export.zoo import ARCHS, ModelSpec, ZooError, build_model


class CustomModelRefused(ZooError):
    """A custom architecture this receiver was not allowed to import."""


def is_custom(arch: str) -> bool:
    return ":" in arch


def load_factory(arch: str):
    module_name, _, attr = arch.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ZooError(f"cannot import architecture {arch!r} ({exc}); give a zoo name "
                       f"({', '.join(ARCHS)}) or package.module:factory on the PYTHONPATH") from None
    if not callable(factory):
        raise ZooError(f"{arch!r} is not callable")
    return factory


def custom_model(arch: str, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The user's unpruned model, with a spec attached so it flows through the pipeline.

    Everything that would fail later is checked here, before any training: the output shape
    for this input, and that every BatchNorm can be folded for export."""
    factory = load_factory(arch)
    try:
        model = factory(**_shape_arguments(factory, tuple(in_shape), num_classes))
    except Exception as exc:  # the user's code: any exception, shown as one line
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ZooError(f"{arch}() failed: {type(exc).__name__}: {first}") from None
    if not isinstance(model, nn.Module):
        raise ZooError(f"{arch}() returned {type(model).__name__}, not an nn.Module")
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(1, *in_shape))
    except Exception as exc:  # a shape mismatch inside the user's forward raises many types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ZooError(f"{arch}() cannot take input of shape {tuple(in_shape)}: {first}") from None
    if not isinstance(out, torch.Tensor) or out.shape != (1, num_classes):
        got = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ZooError(f"{arch}() maps input {tuple(in_shape)} to {got}, expected ({num_classes},)")
    try:
        check_foldable(model)
    except FoldError as exc:
        raise ZooError(f"{arch}: {exc}") from None
    has_bn = any(isinstance(m, _BatchNorm) for m in model.modules())
    model.spec = ModelSpec(arch, layer_widths(model), tuple(in_shape), num_classes, has_bn)  # type: ignore[arg-type]
    return model


def _shape_arguments(factory, in_shape: tuple[int, ...], num_classes: int) -> dict:
    """The keyword arguments `in_shape` / `num_classes` that `factory` takes, with the data's values."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return {}
    wanted = {"in_shape": in_shape, "num_classes": num_classes}
    return {k: v for k, v in wanted.items() if k in params
            and params[k].kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)}


def build_any(spec: ModelSpec, *, allow_custom: bool | Collection[str] = False) -> nn.Module:
    """A fresh model for `spec`: a zoo architecture, or a user's own when `allow_custom` is True or
    names it (the architectures a device was told it may import)."""
    if not is_custom(spec.arch):
        return build_model(spec)
    if not (allow_custom is True or (not isinstance(allow_custom, bool) and spec.arch in allow_custom)):
        # Short, the flag early: an agent's status message carries the first 200 characters.
        raise CustomModelRefused(f"custom architecture {spec.arch}: imported (its code run) only with "
                                 f"--allow-model-code {spec.arch}")
    model = custom_model(spec.arch, spec.in_shape, spec.num_classes)
    shrink_to_widths(model.eval(), spec.widths, torch.zeros(1, *spec.in_shape))
    if not spec.batchnorm:
        fold_batchnorm(model)
    model.spec = spec
    return model


def load_state_dict_file(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a user's state_dict (a local .pt file) safely: tensors only, shapes checked."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ZooError(f"weights file {path} does not exist") from None
    except Exception as exc:  # a corrupt or non-torch file raises many types, with long advice
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ZooError(f"{path} is not a PyTorch state_dict file (torch.save): {first}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ZooError(f"{path} holds a {type(state).__name__}, not a state_dict")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in own.items()
             if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        parts = [f"missing {missing[:5]}" if missing else "", f"unexpected {unexpected[:5]}" if unexpected else "",
                 f"wrong shapes {wrong[:5]}" if wrong else ""]
        raise ZooError(f"{path} does not match architecture {model.spec.arch}: " + "; ".join(p for p in parts if p))
    model.load_state_dict(state)
    return model


def spec_of(model: nn.Module) -> ModelSpec:
    """The spec of a zoo or custom model as it is now (after pruning or BN folding)."""
    widths = model.widths() if hasattr(model, "widths") else layer_widths(model)
    has_bn = any(isinstance(m, _BatchNorm) for m in model.modules())
    return dataclasses.replace(model.spec, widths=tuple(widths), batchnorm=has_bn)
