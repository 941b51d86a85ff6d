"""torch -> ONNX: one self-contained file, dynamic batch, fl-pqsu metadata, stamped id."""
from __future__ import annotations

import dataclasses
import logging
import tempfile
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from pqsu.protocol import model_id
from pqsu.protocol.atomic import atomic_write
from pqsu.protocol.errors import PqsuError
from pqsu.protocol.model_info import ModelInfo

log = logging.getLogger(__name__)
OPSET = 18
INPUT_NAME = "input"


class OnnxExportError(PqsuError):
    """The model could not be exported or the ONNX file could not be written."""


def export_onnx(model: nn.Module, path: str | Path, info: ModelInfo) -> ModelInfo:
    """Export `model` (eval mode, batch dimension dynamic) to `path`; returns the stamped info."""
    path = Path(path)
    model = model.eval()
    example = torch.zeros(2, *info.in_shape)  # batch 2: a batch of 1 would be specialised as a constant
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter is chatty about internals we do not control
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        raw = Path(tmp) / "model.onnx"
        try:
            torch.onnx.export(model, (example,), str(raw), input_names=[INPUT_NAME], output_names=["logits"],
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
                              opset_version=OPSET, external_data=False, verbose=False)
        except Exception as exc:  # torch.export raises many types; the user needs the message
            raise OnnxExportError(f"torch.onnx.export failed for {info.spec.get('arch')}: {exc}") from exc
        proto = onnx.load(str(raw))
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return write_with_info(proto, path, dataclasses.replace(info, opset=opset, input_name=INPUT_NAME))


def write_with_info(proto: onnx.ModelProto, path: str | Path, info: ModelInfo) -> ModelInfo:
    """Replace the fl-pqsu metadata of `proto`, stamp its model id and write it atomically."""
    keep = [p for p in proto.metadata_props if not p.key.startswith("pqsu.")]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    meta = dataclasses.replace(info, model_id=model_id.PLACEHOLDER).to_metadata()
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    data, stamped = model_id.stamp(proto.SerializeToString())
    atomic_write(Path(path), data)
    return dataclasses.replace(info, model_id=stamped)


def read_info(source: str | Path | bytes) -> ModelInfo:
    """The fl-pqsu metadata of an ONNX file, after verifying its model id."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    model_id.verify(data)
    proto = onnx.load_from_string(data)
    return ModelInfo.from_metadata({p.key: p.value for p in proto.metadata_props})
