"""Round 0's file is checked the way devices will use it, before any device is asked to train on it."""
from __future__ import annotations

import pytest

from pqsu.tools.cli import main
from tests.support.nets import FMNIST_ROOT

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not FMNIST_ROOT.is_dir(), reason=f"{FMNIST_ROOT} missing")]

SMALL_RUN = ["--clients", "2", "--rounds", "1", "--proxy-samples", "100", "--samples-per-client", "20",
             "--prune", "none", "--pretrain-epochs", "0", "--finetune-epochs", "0", "--eval-samples", "50"]


def test_a_model_the_devices_cannot_rebuild_stops_the_run_at_round_0(capsys, tmp_path):
    code = main(["simulate", "--model", "tests.support.bad_models:changing_net", *SMALL_RUN, "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("pqsu simulate: error: round 0: the devices could not rebuild and "
                                               "fine-tune tests.support.bad_models:changing_net from its int8 file")
    assert not (tmp_path / "metrics.jsonl").exists()  # no round ran


def test_a_model_that_cannot_train_once_rebuilt_stops_the_run_at_round_0():
    from pqsu.cloud.bootstrap import Round0Error, build_server
    from pqsu.cloud.config import FederatedConfig

    cfg = FederatedConfig.for_scheme("ours", model="tests.support.bad_models:eval_only_net", rounds=1, clients=2,
                                     proxy_samples=100, pretrain_epochs=0.0, finetune_epochs=0.0, prune=None,
                                     eval_samples=50)
    with pytest.raises(Round0Error, match=r"round 0: .* cannot take a fine-tune step: RuntimeError: eval only"):
        build_server(cfg)
