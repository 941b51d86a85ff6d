"""Real int8 fl-pqsu models for the edge tests (service, agent, doctor, inference-only venv).

`int8_models()` exports two small models once per test session (cached in a temp folder):
the zoo cnn pruned by half, trained briefly on real Fashion-MNIST with two different seeds,
calibrated and quantized to int8 by `pqsu.export.pipeline.export_int8`. Two seeds give two
model ids, for the model-swap tests. Falls back to synthetic images when the Debian
package dataset-fashion-mnist is missing (the models are then untrained but still real).
"""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FMNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@dataclass(frozen=True)
class EdgeModels:
    folder: Path
    a: Path                # model A (int8 ONNX file)
    b: Path                # model B: same architecture, other weights, other id
    x_test: np.ndarray     # uint8 (N, 1, 28, 28) test images
    y_test: np.ndarray
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def normalized(self, x: np.ndarray) -> np.ndarray:
        m = np.asarray(self.mean, np.float32).reshape(1, -1, 1, 1)
        s = np.asarray(self.std, np.float32).reshape(1, -1, 1, 1)
        return ((x.astype(np.float32) / 255.0 - m) / s).astype(np.float32)


@functools.lru_cache(maxsize=1)
def int8_models() -> EdgeModels:
    import torch

    from pqsu.export.datasets import ArrayDataset, load_dataset
    from pqsu.export.pipeline import export_int8, model_info
    from pqsu.export.pruning import prune_model
    from pqsu.export.training import TrainConfig, train
    from pqsu.export.zoo import build_model, default_spec

    folder = Path(tempfile.mkdtemp(prefix="pqsu-edge-models-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    if FMNIST_ROOT.is_dir():
        train_set, test_set = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
        train_set, test_set = train_set.sample(1500, seed=0), test_set.sample(64, seed=0)
    else:
        rng = np.random.default_rng(0)
        mk = lambda n: ArrayDataset(rng.integers(0, 256, (n, 1, 28, 28), dtype=np.uint8),  # noqa: E731
                                    rng.integers(0, 10, n), "synthetic", FMNIST_CLASSES, (0.286,), (0.353,))
        train_set, test_set = mk(300), mk(64)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        paths = []
        for seed, name in ((0, "a"), (1, "b")):
            torch.manual_seed(seed)
            model = prune_model(build_model(default_spec("cnn")), 0.5, torch.zeros(1, 1, 28, 28)).model
            train(model, train_set.normalized(), train_set.y, TrainConfig(epochs=1, batch_size=64, lr=0.05, seed=seed))
            path = folder / f"model_{name}.int8.onnx"
            export_int8(model.eval(), model_info(model, train_set), train_set.normalized()[:32], path)
            paths.append(path)
    finally:
        torch.set_num_threads(before)
    return EdgeModels(folder, paths[0], paths[1], test_set.x.copy(), test_set.y.copy(),
                      tuple(train_set.mean), tuple(train_set.std))
