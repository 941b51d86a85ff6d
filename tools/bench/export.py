"""Export benchmark helpers: the bridge's worst weight error for every zoo model."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from pqsu.export.bridge import read_int8_weights, worst_error_in_steps
from pqsu.export.datasets import load_dataset
from pqsu.export.pipeline import export_int8, model_info
from pqsu.export.pruning import fold_batchnorm, prune_model
from pqsu.export.zoo import ARCHS, build_model, default_spec


def bridge_errors(archs: list[str] | None = None, seed: int = 0) -> dict[str, float]:
    """Prune 50%, fold, export int8 and read back every zoo model; worst error in steps.

    Weights come from initialisation plus a few train-mode passes (so BatchNorm folding
    has real statistics to fold): the bound is about rounding, not about training.
    """
    data = load_dataset("fashion-mnist", "train")
    x = data.sample(128, seed=seed).normalized()
    out = {}
    for arch in archs or [a for a, entry in ARCHS.items() if entry.input_rank == len(data.input_shape)]:
        torch.manual_seed(seed)
        model = build_model(default_spec(arch, data.input_shape, data.num_classes))
        model.train()
        with torch.no_grad():
            for i in range(0, len(x), 32):
                model(torch.from_numpy(x[i:i + 32]))
        model = fold_batchnorm(prune_model(model.eval(), 0.5, torch.zeros(1, *data.input_shape)).model.eval())
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "m.int8.onnx"
            export_int8(model, model_info(model, data), x[:64], path)
            reference = {k: v.numpy() for k, v in model.state_dict().items()}
            out[arch] = worst_error_in_steps(reference, read_int8_weights(path))
    return out


if __name__ == "__main__":
    print({k: round(v, 4) for k, v in bridge_errors().items()})
