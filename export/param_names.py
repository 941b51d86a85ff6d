"""Every parameter of the model under its own name in the exported ONNX graph.

The bridge, the requantizer and the update codec find a weight in the file by its torch name.
The exporter keeps that name for tensors it uses as they are (conv, linear, LayerNorm), but its
optimizer folds a reshape of a parameter into a new anonymous constant (`val_12`): GroupNorm's
weight and bias become (C, 1, 1) tensors of no name. Which constant came from which parameter
is found by exporting with *probe* values, distinct random numbers in every parameter: a
constant that holds exactly one parameter's probe values, in any shape, is that parameter.
It is renamed to the parameter and given the real values; the real values themselves could
not tell two freshly initialized GroupNorms (all ones) apart.
"""
from __future__ import annotations

import contextlib

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from pqsu.protocol.errors import PqsuError

PROBE_SEED = 20210601


class ParameterNameError(PqsuError):
    """A parameter the exported graph does not hold as a tensor of its own."""


@contextlib.contextmanager
def probe_values(model: nn.Module):
    """Inside: every floating parameter holds distinct random values; yields {name: (real, probe)} arrays.
    The real values are back in place on exit, whatever happened inside."""
    gen = torch.Generator().manual_seed(PROBE_SEED)
    params = {n: p for n, p in model.named_parameters() if p.dtype.is_floating_point}
    saved = {n: p.detach().clone() for n, p in params.items()}
    values: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    try:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
                values[name] = (saved[name].numpy().astype(np.float32), p.detach().numpy().astype(np.float32).copy())
        yield values
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])


def name_parameters(proto: onnx.ModelProto, values: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Rename the probe-valued constants of `proto` to their parameters and put the real values in (in place).

    Raises ParameterNameError for a parameter the graph holds nowhere (folded into another
    tensor by a computation, not a reshape), or holds more than once."""
    graph = proto.graph
    by_name = {t.name: t for t in graph.initializer}
    by_probe: dict[bytes, str] = {}
    for name, (_, probe) in values.items():
        by_probe[np.ascontiguousarray(probe.reshape(-1)).tobytes()] = name
    renames: dict[str, str] = {}
    found: dict[str, list[str]] = {name: [] for name in values}
    for init in graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT:
            continue
        array = numpy_helper.to_array(init)
        owner = by_probe.get(np.ascontiguousarray(array.reshape(-1)).tobytes())
        if owner is None:
            continue
        original = init.name
        found[owner].append(original)
        init.CopyFrom(numpy_helper.from_array(values[owner][0].reshape(array.shape), name=owner))
        if original != owner:
            renames[original] = owner
    missing = [n for n, where in found.items() if not where]
    twice = [f"{n} ({', '.join(where)})" for n, where in found.items() if len(where) > 1]
    if missing or twice:
        parts = ([f"parameter(s) {', '.join(missing[:5])} are unused by forward or folded into other tensors"]
                 if missing else []) + \
                ([f"parameter(s) {'; '.join(twice[:3])} appear more than once"] if twice else [])
        raise ParameterNameError("the exported graph does not hold every parameter once as a tensor of its own: "
                                 + "; ".join(parts) + " (fold such layers into the model before export)")
    if renames:
        taken = set(by_name) - set(renames)
        clash = sorted(set(renames.values()) & taken)
        if clash:
            raise ParameterNameError(f"the exported graph already uses the name(s) {clash[:3]} for other tensors")
        _rename_inputs(graph, renames)


def _rename_inputs(graph: onnx.GraphProto, renames: dict[str, str]) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
        for attr in node.attribute:  # subgraphs (If / Loop bodies) may read the constant too
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                _rename_inputs(sub, renames)
    for info in graph.value_info:
        if info.name in renames:
            info.name = renames[info.name]
