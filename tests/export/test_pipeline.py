"""The one round-0 pipeline (pre-train, prune, fine-tune, fold) and the one way a model becomes its file.

`pqsu export` and the coordinator run the same steps: for the same settings and seed they get
the same weights. The file is made in memory and its id is hashed once: the bytes handed out
hash to the id they carry, and writing them to a path gives the same bytes.
"""
from __future__ import annotations

import numpy as np
import pytest

from pqsu.cloud.prepare import prepare_master
from pqsu.export import pipeline
from pqsu.export.pipeline import PrepareConfig, export_int8, export_model, export_pair, finish, model_info, pretrain, prepare
from pqsu.export.report import ExportConfig
from pqsu.protocol import model_id
from pqsu.protocol.errors import PqsuError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = PrepareConfig("cnn", prune=0.5, pretrain_epochs=0.2, finetune_epochs=0.2, batch_size=32, seed=4)


@pytest.fixture(scope="module")
def proxy(fmnist):
    return fmnist[0].sample(320, seed=0)


def _weights(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _same(a, b) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def master(proxy):
    return prepare(SMALL, proxy)


def test_round_0_is_deterministic_for_a_seed_and_depends_on_it(proxy, master):
    assert _same(master, prepare(SMALL, proxy))
    other = prepare(PrepareConfig(**{**SMALL.__dict__, "seed": 5}), proxy)
    assert not _same(master, other)


def test_the_coordinator_and_pqsu_export_get_the_same_model(proxy, master):
    assert _same(master, prepare_master(SMALL, proxy))
    cmd = ExportConfig(model="cnn", prune=0.5, pretrain_epochs=0.2, finetune_epochs=0.2, batch_size=32, seed=4)
    assert _same(master, prepare(cmd.prepare_config(), proxy))


def test_prepare_is_pretrain_then_finish(proxy, master):
    assert _same(master, finish(pretrain(SMALL, proxy), SMALL, proxy))


def test_the_model_is_pruned_and_bn_folded(proxy, master):
    unpruned = pipeline.initial_model(SMALL, proxy)
    assert sum(p.numel() for p in master.parameters()) < 0.5 * sum(p.numel() for p in unpruned.parameters())
    assert not any("BatchNorm" in type(m).__name__ for m in master.modules())


def test_without_pruning_nothing_is_fine_tuned_unless_asked(proxy):
    cfg = PrepareConfig("cnn", prune=None, pretrain_epochs=0.0, finetune_epochs=1.0, seed=4)
    assert _same(prepare(cfg, proxy), pipeline.initial_model(cfg, proxy))
    assert not _same(finish(pipeline.initial_model(cfg, proxy), cfg, proxy, 0.2), pipeline.initial_model(cfg, proxy))


def test_an_unknown_architecture_is_one_pqsu_error():
    with pytest.raises(PqsuError, match="lenet"):
        pipeline.check_arch("lenet")


# ------------------------------------------------------------------------ the file

def _count_hashes(monkeypatch) -> list[int]:
    calls = []
    real = model_id._digest

    def counting(data, slot):
        calls.append(len(data))
        return real(data, slot)
    monkeypatch.setattr(model_id, "_digest", counting)
    return calls


@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_the_file_is_stamped_once_and_hashes_to_its_id(proxy, master, monkeypatch, precision):
    calib = proxy.sample(32, seed=1).normalized() if precision == "int8" else None
    hashes = _count_hashes(monkeypatch)
    exported = export_model(master, model_info(master, proxy), calib)
    assert len(hashes) == 1  # the id is computed once, when it is stamped
    assert exported.info.precision == precision
    assert model_id.verify(exported.data) == exported.info.model_id == exported.file.model_id


def test_the_pair_is_one_export_with_one_stamp_per_file(proxy, master, monkeypatch):
    calib = proxy.sample(32, seed=1).normalized()
    hashes = _count_hashes(monkeypatch)
    fp32, int8 = export_pair(master, model_info(master, proxy), calib)
    assert len(hashes) == 2
    assert (fp32.info.precision, int8.info.precision) == ("fp32", "int8")
    assert model_id.verify(fp32.data) == fp32.info.model_id != int8.info.model_id == model_id.verify(int8.data)
    assert len(int8.data) < len(fp32.data) / 2
    # quantizing the fp32 file of the pair, or the model straight, gives the same int8 file
    assert export_model(master, model_info(master, proxy), calib).data == int8.data


def test_writing_to_a_path_gives_the_same_bytes(proxy, master, tmp_path):
    calib = proxy.sample(32, seed=1).normalized()
    info = export_int8(master, model_info(master, proxy), calib, tmp_path / "m.int8.onnx",
                       fp32_path=tmp_path / "m.fp32.onnx")
    fp32, int8 = export_pair(master, model_info(master, proxy), calib)
    assert (tmp_path / "m.int8.onnx").read_bytes() == int8.data and info == int8.info
    assert (tmp_path / "m.fp32.onnx").read_bytes() == fp32.data
