"""What an fl-pqsu ONNX file says about itself, in its `metadata_props`.

A board needs this to trust the file (model id), to feed it (input name, shape and
normalization), to name its outputs (classes) and to rebuild the torch model for
fine-tuning (architecture and pruned widths). Values are strings (ONNX metadata is
string to string); structured ones are JSON. Read with onnxruntime's
`get_modelmeta().custom_metadata_map` on a board, so no onnx package is needed there.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from pqsu.protocol import model_id as model_id_mod
from pqsu.protocol.errors import PqsuError

FORMAT_VERSION = "1"
PREFIX = "pqsu."


class ModelInfoError(PqsuError):
    """Missing or malformed fl-pqsu metadata in an ONNX file."""


@dataclass(frozen=True)
class ModelInfo:
    spec: dict  # arch, widths, in_shape, num_classes, batchnorm: see pqsu.export.zoo.ModelSpec
    input_name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    precision: str  # "fp32" or "int8"
    opset: int
    model_id: str = model_id_mod.PLACEHOLDER
    extra: dict = field(default_factory=dict)

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.spec["in_shape"])

    def to_metadata(self) -> dict[str, str]:
        meta = {
            "format": FORMAT_VERSION,
            "spec": json.dumps(self.spec, sort_keys=True),
            "input_name": self.input_name,
            "normalization": json.dumps({"mean": list(self.mean), "std": list(self.std)}),
            "classes": json.dumps(list(self.classes)),
            "precision": self.precision,
            "opset": str(self.opset),
            "extra": json.dumps(self.extra, sort_keys=True),
        }
        out = {PREFIX + k: v for k, v in meta.items()}
        out[model_id_mod.KEY] = self.model_id
        return out

    @classmethod
    def from_props(cls, props) -> "ModelInfo":
        """From a parsed ONNX model's `metadata_props` (entries with .key and .value): no onnx import here."""
        return cls.from_metadata({p.key: p.value for p in props})

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> "ModelInfo":
        try:
            if meta[PREFIX + "format"] != FORMAT_VERSION:
                raise ModelInfoError(f"unsupported fl-pqsu model format {meta[PREFIX + 'format']!r}")
            norm = json.loads(meta[PREFIX + "normalization"])
            spec = json.loads(meta[PREFIX + "spec"])
            for key in ("arch", "widths", "in_shape", "num_classes", "batchnorm"):
                spec[key]
            return cls(spec=spec, input_name=meta[PREFIX + "input_name"],
                       mean=tuple(float(v) for v in norm["mean"]), std=tuple(float(v) for v in norm["std"]),
                       classes=tuple(str(c) for c in json.loads(meta[PREFIX + "classes"])),
                       precision=meta[PREFIX + "precision"], opset=int(meta[PREFIX + "opset"]),
                       model_id=meta[model_id_mod.KEY], extra=json.loads(meta.get(PREFIX + "extra", "{}")))
        except ModelInfoError:
            raise
        except KeyError as exc:
            raise ModelInfoError(f"not an fl-pqsu model: metadata {exc} is missing (export it with `pqsu export`)") from None
        except (ValueError, TypeError) as exc:
            raise ModelInfoError(f"malformed fl-pqsu metadata: {exc}") from None
