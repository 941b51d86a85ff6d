"""One real int8 file of a user's own architecture (tests.support.user_models:mobilenet_net), exported
once per test session the way the coordinator exports its master: round 0 (pruned by half, BatchNorm
folded) on a few hundred real Fashion-MNIST images, int8 calibrated on them."""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ARCH = "tests.support.user_models:mobilenet_net"


@dataclass(frozen=True)
class CustomInt8:
    path: Path
    x: np.ndarray   # uint8 (N, 1, 28, 28) images the model was prepared on
    y: np.ndarray


@functools.lru_cache(maxsize=1)
def custom_int8() -> CustomInt8:
    from pqsu.export.datasets import load_dataset
    from pqsu.export.pipeline import PrepareConfig, export_int8, model_info, prepare

    from tests.support.nets import single_torch_thread

    data = load_dataset("fashion-mnist", "test").sample(128, seed=0)
    folder = Path(tempfile.mkdtemp(prefix="pqsu-custom-int8-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    path = folder / "mobilenet.int8.onnx"
    with single_torch_thread():
        model = prepare(PrepareConfig(arch=ARCH, prune=0.5, pretrain_epochs=0.5, finetune_epochs=0), data)
        export_int8(model, model_info(model, data), data.normalized()[:64], path)
    return CustomInt8(path, data.x.copy(), data.y.copy())
