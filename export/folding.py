"""BatchNorm folded into the conv or linear layer that feeds it, found through the traced graph.

Which layer feeds a BatchNorm is a fact of `forward`, not of the order modules were registered
in: torchvision-style models hold `self.conv1` and `self.bn1` as attributes and wire them in
`forward`. So the model is traced (torch.fx) and a BatchNorm is folded into its input's layer
when that input is a Conv1d/2d/3d or Linear called once, whose output goes nowhere else.

The BatchNorm becomes an `nn.Identity` and the layer keeps its name (it gains a bias if it had
none), so parameter names match the ONNX initializers (exporters fold BN into the conv under
the conv's name). The cloud keeps its master model in this folded form after pruning, so the
weights that boards fine-tune and send back are the very parameters the master holds.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from pqsu.protocol.errors import PqsuError

FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class FoldError(PqsuError):
    """A BatchNorm the model cannot lose: its input is not a conv or linear layer of its own."""


def batchnorm_pairs(model: nn.Module) -> tuple[list[tuple[str, str]], list[str]]:
    """([(layer name, batchnorm name)] that fold, [names of batchnorms that do not]), from the traced graph.

    A model torch.fx cannot trace (data-dependent control flow) falls back to registration order
    inside nn.Sequential containers, the layout of the zoo and of most hand-written nets."""
    bns = [name for name, m in model.named_modules() if isinstance(m, _BatchNorm)]
    if not bns:
        return [], []
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # tracing fails in many ways (control flow on tensors, unsupported ops)
        return _sequential_pairs(model, bns)
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs, unpaired = [], []
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in bns:
            continue
        src = node.args[0] if node.args else None
        ok = (isinstance(src, torch.fx.Node) and src.op == "call_module" and len(src.users) == 1
              and calls[src.target] == 1 and calls[node.target] == 1
              and isinstance(model.get_submodule(src.target), FOLDABLE))
        bn = model.get_submodule(node.target)
        if ok and bn.running_var is not None and _width(model.get_submodule(src.target)) == bn.num_features:
            pairs.append((src.target, node.target))
        else:
            unpaired.append(node.target)
    called = {bn for _, bn in pairs} | set(unpaired)
    unpaired += [bn for bn in bns if bn not in called]  # registered but never called: cannot tell what it follows
    return pairs, unpaired


def check_foldable(model: nn.Module) -> None:
    """A FoldError naming every BatchNorm that cannot be folded, before any training is spent on the model."""
    _, unpaired = batchnorm_pairs(model)
    if unpaired:
        raise FoldError(f"BatchNorm layer(s) {', '.join(unpaired[:5])} do not directly follow a conv or linear layer "
                        "whose output they alone take, so they cannot be folded for export; move each BatchNorm right "
                        "after its conv, or fold it into the model yourself")


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm into the layer feeding it (changed in place, and returned)."""
    pairs, unpaired = batchnorm_pairs(model)
    if unpaired:
        check_foldable(model)
    for layer_name, bn_name in pairs:
        layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
        inv_std = 1.0 / torch.sqrt(bn.running_var + bn.eps)
        scale = bn.weight * inv_std if bn.affine else inv_std
        shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        bias = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
        layer.weight.mul_(scale.reshape(-1, *[1] * (layer.weight.ndim - 1)))
        folded_bias = (bias - bn.running_mean) * scale + shift
        if layer.bias is None:
            layer.bias = nn.Parameter(folded_bias.clone())
        else:
            layer.bias.copy_(folded_bias)
        _replace(model, bn_name, nn.Identity())
    return model


def _width(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def _sequential_pairs(model: nn.Module, bns: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    pairs = []
    for seq_name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            layer, bn = seq._modules[a], seq._modules[b]
            if isinstance(layer, FOLDABLE) and isinstance(bn, _BatchNorm) and _width(layer) == bn.num_features:
                prefix = f"{seq_name}." if seq_name else ""
                pairs.append((prefix + a, prefix + b))
    folded = {bn for _, bn in pairs}
    return pairs, [bn for bn in bns if bn not in folded]
