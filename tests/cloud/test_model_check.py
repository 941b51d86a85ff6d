"""`--model` is checked before any work: every way a model can be wrong is one line, exit status 2, in
seconds, and nothing is written (no shards, no agents, no round 0)."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pqsu.export.model_check import check_model
from pqsu.protocol.errors import PqsuError
from pqsu.tools import cli

from tests.support.nets import FMNIST_ROOT

pytestmark = pytest.mark.skipif(not FMNIST_ROOT.is_dir(), reason="dataset-fashion-mnist is not installed")
REPO = Path(__file__).resolve().parents[2]
BAD = "tests.support.bad_models"

# (--model, what the one line says): each is a mistake a user can make with their own factory.
BAD_MODELS = [
    ("cnnn", "unknown model 'cnnn'; choose one of: cnn, alexnet"),
    ("tests.support.no_such_module:net", "cannot import architecture 'tests.support.no_such_module:net' "
                                         "(No module named 'tests.support.no_such_module')"),
    (f"{BAD}:no_such_factory", f"has no attribute 'no_such_factory'"),
    (f"{BAD}:NOT_CALLABLE", f"'{BAD}:NOT_CALLABLE' is not callable"),
    (f"{BAD}:returns_a_dict", f"{BAD}:returns_a_dict() returned dict, not an nn.Module (data set fashion-mnist)"),
    (f"{BAD}:raises_inside", f"{BAD}:raises_inside() failed: ValueError: width must be even (data set fashion-mnist)"),
    (f"{BAD}:flat_input_net", f"{BAD}:flat_input_net() cannot take input of shape (1, 28, 28): mat1 and mat2 "
                              "shapes cannot be multiplied"),
    (f"{BAD}:three_classes", "maps input (1, 28, 28) to (3,), expected (10,) (data set fashion-mnist)"),
    ("tests.support.broken_model_module:net", "importing tests.support.broken_model_module for model "
                                              "tests.support.broken_model_module:net failed: RuntimeError: "
                                              "this module is broken at import"),
    ("tests.support:bad models", "model code 'tests.support:bad models' is not package.module:factory"),
    (f"{BAD}:eval_only_net", f"model {BAD}:eval_only_net cannot be trained on data set fashion-mnist (input "
                             "(1, 28, 28)): in training mode RuntimeError: eval only"),
]


def _fails_in_one_line(argv: list[str], capsys) -> tuple[str, float]:
    start = time.perf_counter()
    code = cli.main(argv)
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    return err, seconds


@pytest.mark.parametrize("model, message", BAD_MODELS, ids=[m for m, _ in BAD_MODELS])
def test_every_bad_model_is_one_line_naming_it(model, message):
    with pytest.raises(PqsuError) as exc:
        check_model(model, (1, 28, 28), 10, "fashion-mnist")
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_simulate_refuses_a_bad_model_in_one_line_before_any_work(capsys, tmp_path):
    err, seconds = _fails_in_one_line(["simulate", "--model", f"{BAD}:raises_inside", "--rounds", "1",
                                       "--out", str(tmp_path / "o")], capsys)
    assert err == f"pqsu simulate: error: {BAD}:raises_inside() failed: ValueError: width must be even (data set " \
                  "fashion-mnist)"
    assert seconds < 5, f"{seconds:.1f}s"  # torch is already imported here: the check itself is quick
    assert not (tmp_path / "o").exists()


def test_run_refuses_a_bad_model_before_shards_or_agents(capsys, tmp_path):
    out = tmp_path / "run"
    err, seconds = _fails_in_one_line(["run", "--model", f"{BAD}:flat_input_net", "--clients", "2",
                                       "--out", str(out)], capsys)
    assert "pqsu run: error: tests.support.bad_models:flat_input_net() cannot take input of shape (1, 28, 28)" in err
    assert seconds < 5 and not out.exists()  # no settings, no device shards, no logs


def test_cloud_refuses_a_bad_model_before_preparing_round_0(capsys, tmp_path):
    with socket.socket() as listener:  # something listens where the broker should: the broker check passes
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"mqtt://127.0.0.1:{listener.getsockname()[1]}"
        err, seconds = _fails_in_one_line(["cloud", "--model", f"{BAD}:three_classes", "--broker", url,
                                           "--out", str(tmp_path / "cloud")], capsys)
    assert "pqsu cloud: error:" in err and "expected (10,)" in err
    assert seconds < 5 and not (tmp_path / "cloud").exists()


def test_missing_data_is_one_line_before_the_model_is_built(capsys, tmp_path):
    err, _ = _fails_in_one_line(["simulate", "--model", f"{BAD}:raises_inside", "--data-root",
                                 str(tmp_path / "nowhere")], capsys)
    assert str(tmp_path / "nowhere") in err and "raises_inside" not in err


def test_the_console_script_finds_a_model_module_in_the_current_folder_and_fails_fast(tmp_path):
    """A fresh `pqsu` process (its own torch import included) as a user types it, in the folder that holds the
    package: the module is found there, as `python -m` would, and the wrong model is refused in seconds."""
    script = Path(sys.executable).with_name("pqsu")
    start = time.perf_counter()
    proc = subprocess.run([str(script), "run", "--model", f"{BAD}:three_classes", "--clients", "2",
                           "--out", str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"pqsu run: error: {BAD}:three_classes() maps input (1, 28, 28) to (3,), expected (10,) "
        "(data set fashion-mnist)"]
    assert seconds < 30, f"{seconds:.1f}s"  # measured about 6 s on a loaded 2-core machine
    assert not (tmp_path / "run").exists()


def test_a_split_that_leaves_the_clients_nothing_is_one_line_before_any_work(capsys, tmp_path):
    err, seconds = _fails_in_one_line(["simulate", "--proxy-samples", "60000", "--clients", "3",
                                       "--out", str(tmp_path / "o")], capsys)
    assert err == ("pqsu simulate: error: fashion-mnist has 60000 training samples: the cloud's 60000 "
                   "(--proxy-samples) leave 0 for 3 clients; keep fewer for the cloud")
    assert seconds < 5 and not (tmp_path / "o").exists()

