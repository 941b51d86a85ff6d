"""Structured pruning: whole filters and neurons go, so the model really shrinks.

torch-pruning builds the dependency graph, so coupled channels (a residual add, a
conv feeding a BatchNorm and the next conv) are removed together; that is what makes
this work for any `nn.Module`, not only the zoo. Importance is the L1 norm of each
channel group, as in the FL-PQSU paper. The final classifier is never pruned: its
width is the number of classes.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from pqsu.export.folding import fold_batchnorm  # noqa: F401  (its home before it moved; callers import it here)
from pqsu.protocol.errors import PqsuError

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class PruneError(PqsuError):
    """A prune request that cannot be carried out (bad ratio, no prunable layer)."""


@dataclass
class PruneResult:
    model: nn.Module
    widths_before: tuple[int, ...]
    widths_after: tuple[int, ...]


def layer_widths(model: nn.Module) -> tuple[int, ...]:
    """Output width of every conv (1-, 2- or 3-D) and linear layer, in registration order.

    This is the widths spec of any module; zoo models also have a compact one of their own.
    """
    return tuple(m.out_channels if isinstance(m, CONVS) else m.out_features
                 for m in model.modules() if isinstance(m, (*CONVS, nn.Linear)))


def classifier_of(model: nn.Module) -> nn.Module:
    """The layer that produces the logits: the last linear (or conv) registered."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, *CONVS))]
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    if not layers:
        raise PruneError("the model has no conv or linear layer to prune")
    return (linears or layers)[-1]


def prune_model(model: nn.Module, ratio: float, example_input: torch.Tensor, *,
                keep: list[nn.Module] | None = None, round_to: int | None = None,
                inplace: bool = False) -> PruneResult:
    """Remove `ratio` of the channels of every prunable group by L1 importance.

    `keep` lists layers whose outputs must not shrink (the classifier is always kept).
    `round_to` makes widths multiples of it, which int8 kernels like.
    """
    if not 0.0 < ratio < 1.0:
        raise PruneError(f"prune ratio must be in (0, 1), got {ratio}")
    keep = list(keep or [])
    if not inplace:
        # `keep` names layers of the caller's model: find their counterparts in the copy.
        names = {id(m): n for n, m in model.named_modules()}
        missing = [m for m in keep if id(m) not in names]
        if missing:
            raise PruneError(f"{len(missing)} layer(s) in `keep` are not part of the model")
        model = copy.deepcopy(model)
        copied = dict(model.named_modules())
        keep = [copied[names[id(m)]] for m in keep]
    import torch_pruning as tp  # only pruning needs it; a board rebuilding a model (fold, widths) does not

    model.eval()
    before = layer_widths(model)
    ignored = [classifier_of(model)] + keep
    pruner = tp.pruner.MetaPruner(
        model, example_input,
        importance=tp.importance.GroupMagnitudeImportance(p=1),
        pruning_ratio=ratio, ignored_layers=ignored, round_to=round_to,
    )
    pruner.step()
    return PruneResult(model, before, layer_widths(model))


def shrink_to_widths(model: nn.Module, widths: tuple[int, ...] | list[int],
                     example_input: torch.Tensor) -> nn.Module:
    """Structurally shrink a fresh model so `layer_widths(model) == widths`.

    Which channels go does not matter (the weights are loaded afterwards); only the
    shapes do. The dependency graph keeps coupled layers consistent, exactly as the
    pruner did when it produced `widths`. This rebuilds a user's own pruned module.
    """
    import torch_pruning as tp  # as in prune_model: imported where it is needed

    current = layer_widths(model)
    if len(current) != len(widths):
        raise PruneError(f"widths spec has {len(widths)} entries, the model has {len(current)} conv/linear layers")
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
    layers = [m for m in model.modules() if isinstance(m, (*CONVS, nn.Linear))]
    for layer, target in zip(layers, widths):
        width = layer.out_channels if isinstance(layer, CONVS) else layer.out_features
        if target > width:
            raise PruneError(f"widths spec asks for {target} channels where the model has {width}")
        if target < width:
            fn = tp.prune_conv_out_channels if isinstance(layer, CONVS) else tp.prune_linear_out_channels
            graph.get_pruning_group(layer, fn, idxs=list(range(target, width))).prune()
    if layer_widths(model) != tuple(widths):
        raise PruneError(f"could not shrink the model to {list(widths)}: got {list(layer_widths(model))}")
    return model


