"""FederatedConfig from presets, settings files and flags; a wrong type is one line before any work."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from pqsu.cloud.config import SCHEMES, FederatedConfig, add_config_arguments, config_from_args
from pqsu.protocol.errors import PqsuError


def _config(*argv: str) -> FederatedConfig:
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    return config_from_args(p.parse_args(list(argv)))


def _toml(tmp_path, text: str) -> str:
    path = tmp_path / "run.toml"
    path.write_text(text + "\n")
    return str(path)


WRONG_TYPES = [
    ('rounds = "ten"', 'rounds = "ten": expected an integer'),
    ('prune = "half"', "prune must be a ratio in (0, 1) or auto:PT, got 'half'"),
    ("prune = [0.5]", "prune = [0.5]: expected a number or a string"),
    ('importance = "size"', "unknown importance 'size'; choose one of: l1, l2, taylor, bn-scale, random"),
    ("clients = 2.5", "clients = 2.5: expected an integer"),
    ("rounds = true", "rounds = true: expected an integer"),
    ('error_feedback = "no"', 'error_feedback = "no": expected true or false'),
    ("model = 5", "model = 5: expected a string"),
    ("clip_norm = [1, 2]", "clip_norm = [1, 2]: expected a number or a string"),
    ("scheme = 1", "scheme = 1: expected a string"),
    ("local_prox = -1", "local_prox must be in [0, 1000], got -1"),  # the right type, out of range
    ('downlink = "sometimes"', "downlink must be one of full, hard, soft, got 'sometimes'"),
    ("patch_cap = 1.5", "patch_cap must be a number of bytes >= 256 or a fraction of the model file in (0, 1), got 1.5"),
    ("patch_cap = 100", "patch_cap must be a number of bytes >= 256 or a fraction of the model file in (0, 1), got 100"),
]


@pytest.mark.parametrize("line, message", WRONG_TYPES, ids=[w[0] for w in WRONG_TYPES])
def test_a_wrong_type_in_the_settings_file_names_key_value_and_type(tmp_path, line, message):
    path = _toml(tmp_path, line)
    with pytest.raises(PqsuError) as exc:
        _config("--config", path)
    assert str(exc.value) == f"settings file {path}: {message}"


@pytest.mark.parametrize("command", ["cloud", "run", "simulate"])
def test_a_wrong_type_ends_the_command_in_one_line_before_any_work(tmp_path, command):
    path = _toml(tmp_path, 'rounds = "ten"')
    out = tmp_path / "out"
    # A fresh interpreter: the error must come before torch is even imported, and before any folder is made.
    probe = ("import sys; from pqsu.tools import cli; code = cli.main(sys.argv[1:]); "
             "print(sorted(m for m in ('torch', 'onnx') if m in sys.modules)); sys.exit(code)")
    proc = subprocess.run([sys.executable, "-c", probe, command, "--config", path, "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == f'pqsu {command}: error: settings file {path}: rounds = "ten": expected an integer\n'
    assert proc.stdout == "[]\n" and not out.exists()


def test_right_types_are_taken_with_integers_for_numbers(tmp_path):
    path = _toml(tmp_path, 'rounds = 3\nprune = 0.3\nfraction = 1\nerror_feedback = false\nclip_norm = "median"\n'
                           'scheme = "paper"')
    cfg = _config("--config", path)
    assert (cfg.rounds, cfg.prune, cfg.fraction, cfg.error_feedback, cfg.clip_norm) == (3, 0.3, 1, False, "median")
    assert (cfg.upload, cfg.select) == ("loss", "dense")  # the file's scheme, under the file's values


def test_flags_win_over_the_file(tmp_path):
    path = _toml(tmp_path, "rounds = 3\nclients = 4")
    cfg = _config("--config", path, "--rounds", "5", "--scheme", "fedavg")
    assert (cfg.rounds, cfg.clients, cfg.prune) == (5, 4, None)


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_the_settings_pqsu_run_writes_read_back_unchanged(tmp_path, scheme):
    """`pqsu run` hands the coordinator every field as JSON, nulls included."""
    cfg = FederatedConfig.for_scheme(scheme, rounds=2, samples_per_client=None, clip_norm=None)
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert _config("--config", str(path)) == cfg


def test_a_null_for_a_required_setting_is_a_type_error(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"rounds": None}))
    with pytest.raises(PqsuError, match=r"rounds = null: expected an integer$"):
        _config("--config", str(path))


def test_a_wrong_type_from_python_is_the_same_one_line_error():
    with pytest.raises(PqsuError, match=r'^epochs = "1": expected a number$'):
        FederatedConfig(epochs="1")


def test_the_schemes_are_what_a_user_chooses_between():
    assert list(SCHEMES) == ["fedavg", "paper", "ours"]
    with pytest.raises(PqsuError, match="unknown scheme 'prune30'; choose one of fedavg, paper, ours"):
        FederatedConfig.for_scheme("prune30")


def _cli(*argv):
    proc = subprocess.run([sys.executable, "-m", "pqsu.tools.cli", *map(str, argv)], capture_output=True, text=True,
                          timeout=120)
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("line, problem", [
    ("brokr = 'mqtt://x:1'", "unknown key 'brokr'; known keys: "),
    ("min_devices = 'two'", 'min_devices = "two": expected an integer'),
    ("take_over = 1", "take_over = 1: expected true or false"),
    ("protocol = 4", "protocol = 4: expected one of auto, 5, 3.1.1"),
])
def test_a_coordinator_option_in_the_settings_file_is_checked_before_any_work(tmp_path, line, problem):
    path = _toml(tmp_path, line)
    code, err = _cli("cloud", "--config", path, "--out", tmp_path / "out")
    assert code == 2 and err.startswith(f"pqsu cloud: error: settings file {path}: {problem}"), err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_a_coordinator_option_in_the_settings_file_is_used_and_a_flag_wins(tmp_path):
    # Port 1 on loopback: nothing listens, so the broker check names the file's URL, or the flag's.
    path = _toml(tmp_path, "broker = 'mqtt://127.0.0.1:1'\nrounds = 2")
    code, err = _cli("cloud", "--config", path, "--out", tmp_path / "out")
    assert code == 2 and "broker mqtt://127.0.0.1:1 is unreachable" in err, err
    code, err = _cli("cloud", "--config", path, "--broker", "mqtt://127.0.0.1:2", "--out", tmp_path / "out")
    assert code == 2 and "broker mqtt://127.0.0.1:2 is unreachable" in err, err


def test_none_on_the_command_line_overrides_the_scheme():
    """`--prune none` keeps the model unpruned, as its help says, though the scheme prunes 0.5."""
    assert _config().prune == 0.5 and _config().keyframe_clip == 0.01
    cfg = _config("--prune", "none", "--keyframe-clip", "none")
    assert cfg.prune is None and cfg.keyframe_clip is None
    assert cfg.prepare_config().prune is None


def test_local_prox_reaches_every_round_task_and_a_bad_value_is_one_line():
    from pqsu.protocol.messages import RoundTask

    args = argparse.ArgumentParser()
    add_config_arguments(args)
    cfg = config_from_args(args.parse_args(["--local-prox", "0.25"]))
    assert cfg.local_prox == 0.25 and cfg.server_config().local_prox == 0.25
    task = RoundTask(1, "m", prox=cfg.server_config().local_prox)
    assert RoundTask.from_json(task.to_json()).prox == 0.25
    assert RoundTask.from_json(RoundTask(1, "m").to_json()).prox == 0.0  # an older coordinator's task: plain SGD
    with pytest.raises(PqsuError, match="local_prox"):
        FederatedConfig(local_prox=-1.0)


def test_a_patch_cap_flag_is_bytes_or_a_fraction_of_the_model_file():
    assert _config("--patch-cap", "5800").patch_cap == 5800 and isinstance(_config("--patch-cap", "5800").patch_cap, int)
    assert _config("--patch-cap", "0.05").patch_cap == 0.05
    assert _config("--patch-cap", "none").patch_cap is None
