"""Structured pruning: whole filters and neurons go, so the model really shrinks.

torch-pruning builds the dependency graph, so coupled channels (a residual add, a
conv feeding a BatchNorm and the next conv) are removed together; that is what makes
this work for any `nn.Module`, not only the zoo. Importance is chosen by name
(pqsu.export.importance; L1 norm of each channel group, as in the FL-PQSU paper, by
default), ranked per layer (every layer loses the same ratio) or across layers. The final classifier is never pruned: its
width is the number of classes.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
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
                inplace: bool = False, importance: str = "l1", ranking: str = "uniform",
                data: tuple[np.ndarray, np.ndarray] | None = None, target_params: int | None = None) -> PruneResult:
    """Remove channels by `importance` (pqsu.export.importance): `ratio` of every prunable group
    (`ranking="uniform"`), or the least important channels model-wide (`ranking="global"`) until the
    model has as many parameters as uniform `ratio` would leave (or `target_params`).

    `keep` lists layers whose outputs must not shrink (the classifier is always kept).
    `round_to` makes widths multiples of it, which int8 kernels like. `data` (normalized x, y) is
    what a gradient-based criterion ranks on.
    """
    from pqsu.export.importance import accumulate_gradients, needs_gradients
    from pqsu.export.prune_spec import check_importance, check_ranking

    if not 0.0 < ratio < 1.0:
        raise PruneError(f"prune ratio must be in (0, 1), got {ratio}")
    check_importance(importance)
    check_ranking(ranking)
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
    model.eval()
    if needs_gradients(importance):
        if data is None:
            raise PruneError(f"importance {importance!r} needs data to take gradients on")
        accumulate_gradients(model, *data)
    before = layer_widths(model)
    if ranking == "global":
        ratio = global_ratio(model, ratio, example_input, keep, round_to, importance, target_params)
    make_pruner(model, ratio, example_input, keep=keep, round_to=round_to, importance=importance,
                global_pruning=ranking == "global").step()
    model.zero_grad(set_to_none=True)
    return PruneResult(model, before, layer_widths(model))


def make_pruner(model: nn.Module, ratio: float, example_input: torch.Tensor, *, keep: list[nn.Module] | None = None,
                round_to: int | None = None, importance: str = "l1", global_pruning: bool = False, steps: int = 1):
    """A Torch-Pruning MetaPruner over `model` (pruned in place by each `.step()`): with `steps` > 1 each
    step removes a further 1/steps of `ratio`, counted on the widths at creation, so K steps end
    where one would."""
    import torch_pruning as tp  # only pruning needs it; a board rebuilding a model (fold, widths) does not

    from pqsu.export.importance import make_importance

    ignored = [classifier_of(model)] + list(keep or [])
    # A global threshold may empty a layer whose channels all rank low: no layer loses more than 90%.
    pruner = tp.pruner.MetaPruner(model, example_input, importance=make_importance(importance),
                                  global_pruning=global_pruning, pruning_ratio=ratio,
                                  max_pruning_ratio=0.9 if global_pruning else 1.0,
                                  ignored_layers=ignored, round_to=round_to, iterative_steps=steps)
    return pruner


def global_ratio(model: nn.Module, ratio: float, example_input: torch.Tensor, keep: list[nn.Module] | None = None,
                 round_to: int | None = None, importance: str = "l1", target_params: int | None = None) -> float:
    """The model-wide channel ratio at which global pruning leaves the parameters uniform `ratio` would
    (or `target_params`), by bisection. `model` is not changed; gradient criteria read its `.grad`.

    A global channel ratio is not a parameter ratio (a channel of a wide fc costs more than one of
    the first conv), so comparing the two rankings at the same channel ratio would not be fair."""
    def params(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    keep = list(keep or [])
    if target_params is None:
        uniform = copy.deepcopy(model)
        make_pruner(uniform, ratio, example_input, keep=_same_layers(model, uniform, keep), round_to=round_to).step()
        target_params = params(uniform)
    # Never more parameters than uniform: the largest model at or under the budget. One channel of a layer
    # feeding a wide fc costs a few percent of a small model, so the budget is met to within that step.
    lo, hi, best = 0.0, 0.95, None
    while hi - lo > 0.005:
        mid = (lo + hi) / 2
        trial = _copy_with_grads(model)
        make_pruner(trial, mid, example_input, keep=_same_layers(model, trial, keep), round_to=round_to,
                    importance=importance, global_pruning=True).step()
        if params(trial) <= target_params:
            best, hi = mid, mid
        else:
            lo = mid
    if best is None:
        raise PruneError(f"global ranking cannot reach {target_params:,} parameters")
    return best


def _same_layers(model: nn.Module, copied: nn.Module, layers: list[nn.Module]) -> list[nn.Module]:
    names = {id(m): n for n, m in model.named_modules()}
    mods = dict(copied.named_modules())
    return [mods[names[id(m)]] for m in layers]


def _copy_with_grads(model: nn.Module) -> nn.Module:
    """deepcopy drops `.grad`; a gradient-based criterion needs it on the copy too."""
    out = copy.deepcopy(model)
    grads = {n: p.grad for n, p in model.named_parameters()}
    for n, p in out.named_parameters():
        if grads[n] is not None:
            p.grad = grads[n].clone()
    return out


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


