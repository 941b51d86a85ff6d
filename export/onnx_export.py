"""torch -> ONNX: one self-contained file, dynamic batch, fl-pqsu metadata, stamped id.

The model stays in memory: `to_onnx` gives the ModelProto straight from the exporter, and
`stamp_with_info` serializes it with its metadata and hashes it once to fill its id. Only
callers that want a file on disk (`export_onnx`, `write_with_info`) write one.
"""
from __future__ import annotations

import dataclasses
import logging
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from pqsu.export.param_names import name_parameters, probe_values
from pqsu.protocol import model_id
from pqsu.protocol.atomic import atomic_write
from pqsu.protocol.errors import PqsuError
from pqsu.protocol.model_info import ModelInfo

log = logging.getLogger(__name__)
OPSET = 18
INPUT_NAME = "input"


class OnnxExportError(PqsuError):
    """The model could not be exported or the ONNX file could not be written."""


def to_onnx(model: nn.Module, info: ModelInfo) -> tuple[onnx.ModelProto, ModelInfo]:
    """`model` (eval mode, batch dimension dynamic) as an ONNX proto, and `info` with its opset and input name.

    The proto carries no fl-pqsu metadata yet: `stamp_with_info` adds it when the file is made. Every
    parameter is an initializer under its torch name (`pqsu.export.param_names`), which is what lets a
    board's bridge and the cloud's requantizer find it; a model with BatchNorm still in it fails here
    (its conv weights are folded into new tensors): fold it first (`pqsu.export.folding`)."""
    model = model.eval()
    example = torch.zeros(2, *info.in_shape)  # batch 2: a batch of 1 would be specialised as a constant
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter is chatty about internals we do not control
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        try:
            with probe_values(model) as values:
                program = torch.onnx.export(model, (example,), None, input_names=[INPUT_NAME], output_names=["logits"],
                                            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
                                            opset_version=OPSET, external_data=False, verbose=False)
                proto = program.model_proto  # serialized here: the program may hold the live parameters
            strip_exporter_traces(proto)
        except Exception as exc:  # torch.export raises many types; the user needs the message
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise OnnxExportError(f"torch.onnx.export failed for {info.spec.get('arch')}: {first}") from exc
    name_parameters(proto, values)
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return proto, dataclasses.replace(info, opset=opset, input_name=INPUT_NAME)


def strip_exporter_traces(proto: onnx.ModelProto) -> None:
    """Drop the per-node debugging metadata the exporter records (its Python stack with this install's source
    paths, fx node names, module scopes). It is about 5% of a small model's file, useless on a board, and it
    made the file, and so the model id, depend on where the code is installed."""
    graphs = [proto.graph, *(f for f in proto.functions)]
    while graphs:
        g = graphs.pop()
        for node in g.node:
            del node.metadata_props[:]
            graphs += [a.g for a in node.attribute if a.HasField("g")] + [s for a in node.attribute for s in a.graphs]


def export_onnx(model: nn.Module, path: str | Path, info: ModelInfo) -> ModelInfo:
    """Export `model` to an fp32 ONNX file at `path`; returns the stamped info."""
    proto, info = to_onnx(model, info)
    return write_with_info(proto, path, info)


def stamp_with_info(proto: onnx.ModelProto, info: ModelInfo) -> tuple[model_id.VerifiedModel, ModelInfo]:
    """Replace the fl-pqsu metadata of `proto` (changed in place), serialize it and stamp its id: the one hash."""
    keep = [p for p in proto.metadata_props if not p.key.startswith("pqsu.")]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in dataclasses.replace(info, model_id=model_id.PLACEHOLDER).to_metadata().items():
        proto.metadata_props.add(key=key, value=value)
    file = model_id.stamped(proto.SerializeToString())
    return file, dataclasses.replace(info, model_id=file.model_id)


def write_with_info(proto: onnx.ModelProto, path: str | Path, info: ModelInfo) -> ModelInfo:
    """`stamp_with_info`, then the file written atomically to `path`."""
    file, info = stamp_with_info(proto, info)
    atomic_write(Path(path), file.data)
    return info


def read_info(source: str | Path | bytes | model_id.VerifiedModel) -> ModelInfo:
    """The fl-pqsu metadata of an ONNX file, after verifying its model id."""
    file = source if isinstance(source, model_id.VerifiedModel) else \
        model_id.verified(source if isinstance(source, bytes) else Path(source).read_bytes())
    return ModelInfo.from_props(onnx.load_from_string(file.data).metadata_props)
