"""`pqsu export` as a user runs it: help, one real end-to-end export, and clean errors for user mistakes."""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from tests.support.nets import FMNIST_ROOT
from pqsu.export.onnx_export import read_info
from pqsu.export.zoo import ModelSpec, build_model
from pqsu.tools.cli import main

PQSU = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "pqsu")
ZOO = ("cnn", "alexnet", "vgg16", "resnet18")
LATENCY_KEYS = {"torch_fp32_unpruned_b1", "torch_fp32_unpruned_b64", "ort_fp32_pruned_b1",
                "ort_fp32_pruned_b64", "ort_int8_pruned_b1", "ort_int8_pruned_b64"}
REPORT_KEYS = {"params_fp32", "params_pruned", "macs_fp32", "macs_pruned", "bytes_fp32_onnx", "bytes_int8_onnx",
               "acc_fp32", "acc_int8", "argmax_agreement", "latency_ms"}
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING) pqsu\.")

needs_fmnist = pytest.mark.skipif(not FMNIST_ROOT.is_dir(), reason=f"{FMNIST_ROOT} missing")


def pqsu(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    # One OpenMP thread: on a busy 2-core machine two threads run several times slower; output is the same.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([PQSU, *args], capture_output=True, text=True, timeout=timeout, env=env)


# --------------------------------------------------------------------------- help

def test_pqsu_help_lists_the_export_command():
    proc = pqsu("--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: pqsu")
    assert "export" in proc.stdout and "int8" in proc.stdout


def test_pqsu_export_help_describes_the_options():
    proc = pqsu("export", "--help")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for option in ("--model", "--weights", "--dataset", "--data-root", "--prune", "--no-prune", "--round-to",
                   "--finetune-epochs", "--train-samples", "--calib-samples", "--calib-method", "--eval-samples",
                   "--latency-repeats", "--out", "--fp32-out", "--report", "--no-progress"):
        assert option in out, option
    for word in ZOO + ("package.module:factory", "examples:"):
        assert word in out, word


def test_pqsu_without_a_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: pqsu") and "Traceback" not in err


# --------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def export_run(tmp_path_factory):
    if not FMNIST_ROOT.is_dir():
        pytest.skip(f"{FMNIST_ROOT} missing")
    out = tmp_path_factory.mktemp("cli") / "m.int8.onnx"
    proc = pqsu("export", "--model", "cnn", "--train-samples", "2000", "--eval-samples", "500",
                "--latency-repeats", "3", "--calib-samples", "64", "--finetune-epochs", "0.2",
                "--out", str(out), "--no-progress", timeout=300)
    return proc, out


def test_export_succeeds_and_prints_the_table(export_run):
    proc, out = export_run
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    for row in ("unpruned fp32", "pruned 50% fp32", "pruned 50% int8", "parameters", "MACs / sample",
                "ONNX bytes", "accuracy", "latency b1 ms", "latency b64 ms"):
        assert row in proc.stdout, row
    report = json.loads((out.parent / "report.json").read_text())
    assert f"{report['params_fp32']:,}" in proc.stdout and f"{report['bytes_int8_onnx']:,}" in proc.stdout
    assert str(out) in proc.stdout and report["model_id"] in proc.stdout


def test_export_report_has_every_figure_and_they_are_consistent(export_run):
    proc, out = export_run
    assert proc.returncode == 0, proc.stderr
    r = json.loads((out.parent / "report.json").read_text())
    assert REPORT_KEYS <= set(r)
    assert set(r["latency_ms"]) == LATENCY_KEYS
    assert all(v > 0 for v in r["latency_ms"].values())

    assert r["model"] == "cnn" and r["prune_ratio"] == 0.5 and r["eval_samples"] == 500
    assert r["widths_fp32"] == [32, 64, 128] and r["widths_pruned"] == [16, 32, 64]
    assert 0 < r["params_pruned"] < 0.35 * r["params_fp32"]
    assert 0 < r["macs_pruned"] < 0.35 * r["macs_fp32"]
    assert r["bytes_int8_onnx"] < r["bytes_pruned_fp32_onnx"] < r["bytes_fp32_onnx"]
    assert r["bytes_int8_onnx"] == out.stat().st_size
    for key in ("acc_unpruned_fp32", "acc_fp32", "acc_int8"):
        assert 0.5 < r[key] <= 1.0, (key, r[key])  # well above chance (0.1) after brief training
    assert 0.9 <= r["argmax_agreement"] <= 1.0
    assert r["bridge_worst_error_steps"] <= 0.5 + 1e-3


def test_export_writes_a_valid_int8_model(export_run):
    proc, out = export_run
    assert proc.returncode == 0, proc.stderr
    r = json.loads((out.parent / "report.json").read_text())
    info = read_info(out)
    assert info.precision == "int8"
    assert info.model_id == r["model_id"]
    assert ModelSpec.from_dict(info.spec).widths == tuple(r["widths_pruned"])
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert sess.run(None, {info.input_name: torch.zeros(3, 1, 28, 28).numpy()})[0].shape == (3, 10)


# --------------------------------------------------------------------------- user mistakes

def run_export(capsys, tmp_path: Path, *args: str) -> tuple[int, str, Path]:
    out = tmp_path / "m.int8.onnx"
    argv = ["export", "--train-samples", "100", "--eval-samples", "50", "--latency-repeats", "1",
            "--calib-samples", "8", "--no-progress", "--out", str(out), *args]
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err, out


def assert_one_line_error(code: int, err: str, out: Path) -> str:
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("pqsu export: error: ")
    assert not out.exists()
    return lines[0]


def assert_usage_error(code: int, err: str, out: Path) -> str:
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0].startswith("usage: pqsu export")
    assert lines[-1].startswith("pqsu export: error: ")
    assert all(not line.startswith("pqsu") for line in lines[:-1])
    assert not out.exists()
    return lines[-1]


@needs_fmnist
def test_unknown_model_lists_the_zoo(capsys, tmp_path):
    line = assert_one_line_error(*run_export(capsys, tmp_path, "--model", "lenet"))
    assert "lenet" in line
    for arch in ZOO:
        assert arch in line


@needs_fmnist
def test_unknown_model_from_the_real_command_line(tmp_path):
    proc = pqsu("export", "--model", "lenet", "--train-samples", "100", "--out", str(tmp_path / "m.onnx"),
                "--no-progress")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("pqsu export: error: unknown model 'lenet'; choose one of: cnn, alexnet")
    # anything before the error is a progress log record, not part of the error
    assert all(LOG_LINE.match(line) for line in lines[:-1]), proc.stderr


@pytest.mark.parametrize("ratio", ["1.5", "0", "-0.2", "abc"])
def test_bad_prune_ratio_is_a_usage_error(capsys, tmp_path, ratio):
    line = assert_usage_error(*run_export(capsys, tmp_path, "--prune", ratio))
    assert "--prune" in line


def test_prune_and_no_prune_together_is_a_usage_error(capsys, tmp_path):
    line = assert_usage_error(*run_export(capsys, tmp_path, "--prune", "0.5", "--no-prune"))
    assert "not allowed with" in line


def test_zero_calibration_samples_is_refused(capsys, tmp_path):
    line = assert_one_line_error(*run_export(capsys, tmp_path, "--calib-samples", "0"))
    assert "--calib-samples must be at least 1" in line


def test_missing_data_root_says_how_to_get_the_data(capsys, tmp_path):
    line = assert_one_line_error(*run_export(capsys, tmp_path, "--data-root", "/nonexistent"))
    assert "/nonexistent" in line
    assert "apt-get install dataset-fashion-mnist" in line
    assert "--data-root" in line


@needs_fmnist
def test_weights_of_another_architecture(capsys, tmp_path):
    weights = tmp_path / "resnet.pt"
    torch.save(build_model(ModelSpec("resnet18", (4,) * 12)).state_dict(), weights)
    line = assert_one_line_error(*run_export(capsys, tmp_path, "--model", "cnn", "--weights", str(weights)))
    assert str(weights) in line
    assert "does not match architecture cnn" in line


@needs_fmnist
def test_missing_weights_file(capsys, tmp_path):
    line = assert_one_line_error(*run_export(capsys, tmp_path, "--weights", str(tmp_path / "nope.pt")))
    assert "nope.pt does not exist" in line


@needs_fmnist
def test_weights_that_are_not_a_state_dict(capsys, tmp_path):
    weights = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), weights)
    line = assert_one_line_error(*run_export(capsys, tmp_path, "--weights", str(weights)))
    assert "not a state_dict" in line


def write_non_torch_file(path: Path, kind: str) -> Path:
    if kind == "text":
        path.write_text("these are my notes, not a checkpoint\n")
    elif kind == "json":
        path.write_text(json.dumps({"conv1": [0.1, 0.2]}))
    elif kind == "npy":
        with path.open("wb") as f:
            np.save(f, np.zeros((3, 3), np.float32))
    else:
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    return path


NON_TORCH = ["text", "json", "npy", "random"]


@needs_fmnist
@pytest.mark.parametrize("kind", NON_TORCH)
def test_weights_that_are_not_a_torch_file_exit_2_without_traceback(capsys, tmp_path, kind):
    weights = write_non_torch_file(tmp_path / f"weights.{kind}", kind)
    code, err, out = run_export(capsys, tmp_path, "--weights", str(weights))
    assert code == 2
    assert "Traceback" not in err
    assert err.startswith(f"pqsu export: error: {weights} is not a PyTorch state_dict file")
    assert not out.exists()


@needs_fmnist
@pytest.mark.parametrize("kind", NON_TORCH)
def test_weights_that_are_not_a_torch_file_give_one_line(capsys, tmp_path, kind):
    weights = write_non_torch_file(tmp_path / f"weights.{kind}", kind)
    line = assert_one_line_error(*run_export(capsys, tmp_path, "--weights", str(weights)))
    assert str(weights) in line
