"""The edge agent's typed settings (pqsu.edge.settings) as a user meets them: an agent.toml or JSON
file with a wrong type or an unknown key, boolean flags, defaults, flags over the file, and the
agent.toml that `pqsu flash` writes reading back to the same settings. Through the real command
line (pqsu.tools.cli.main) where a user would see the answer; nothing here needs a broker or torch."""
from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pqsu.edge.settings import DEFAULT_HTTP_PORT, AgentSettings, BoardBudget, SettingsError
from pqsu.protocol.settings import read_settings
from pqsu.tools.cli import build_parser, main
from pqsu.tools.flash.bundle import agent_toml
from pqsu.tools.flash.boards import BOARDS
from pqsu.tools.flash.command import request_from_args


@pytest.fixture
def listener():
    """A TCP port that accepts connections (a stand-in broker) and tells whether anything connected."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(4)
        s.setblocking(False)

        def connected() -> bool:
            try:
                s.accept()[0].close()
            except BlockingIOError:
                return False
            return True

        yield f"mqtt://127.0.0.1:{s.getsockname()[1]}", connected


def write(folder: Path, text: str, name: str = "agent.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


# -- a wrong type in the file: one line, exit 2, before any work ---------------------------------
MISTYPED = [
    ('chunk_limit = "big"', 'chunk_limit = "big": expected an integer, not a string'),
    ('torch_threads = "x"', 'torch_threads = "x": expected an integer, not a string'),
    ("upload = 5", "upload = 5: expected a string, not an integer"),
    ('stay = "no"', 'stay = "no": expected a boolean (true or false, unquoted), not a string'),
    ('inference_only = "false"', 'inference_only = "false": expected a boolean'),
    ("error_feedback = 0", "error_feedback = 0: expected a boolean (true or false, unquoted), not an integer"),
    ("chunk_limit = 65536.0", "chunk_limit = 65536.0: expected an integer, not a number"),
    ("http_port = true", "http_port = true: expected an integer, not a boolean"),
    ("providers = [1, 2]", "providers = [1, 2]: expected a list of strings or one comma-separated string"),
    ("fleet = [\"a\"]", 'fleet = ["a"]: expected a string, not a list'),
    ('board = "rpi4"', 'board = "rpi4": expected a table ([board]), not a string'),
    ('[board]\nmax_epochs = "many"', 'board.max_epochs = "many": expected a number, not a string'),
    ("[board]\nmax_batch_size = 8.5", "board.max_batch_size = 8.5: expected an integer, not a number"),
]


@pytest.mark.parametrize("line, message", MISTYPED)
def test_a_mistyped_setting_stops_the_agent_before_any_work(capsys, tmp_path, listener, line, message):
    url, connected = listener
    state = tmp_path / "state"
    config = write(tmp_path, f'broker = "{url}"\ndevice_id = "pi-1"\nstate_dir = "{state}"\n{line}\n')
    code, out, err = cli(capsys, "edge", "run", "--config", str(config), "--inference-only")
    assert code == 2
    assert err.startswith(f"pqsu edge: error: settings file {config}: {message}"), err
    assert err.count("\n") == 1, err
    assert not connected(), "the agent connected to the broker with a bad setting"
    assert not state.exists(), "the agent started (it creates its state folder) with a bad setting"


@pytest.mark.parametrize("line, message", MISTYPED[:4])
def test_a_mistyped_setting_stops_the_doctor_before_any_check(capsys, tmp_path, listener, line, message):
    url, connected = listener
    config = write(tmp_path, f'broker = "{url}"\ndevice_id = "pi-1"\n{line}\n')
    code, out, err = cli(capsys, "edge", "doctor", "--config", str(config))
    assert code == 2 and out == ""
    assert err.startswith(f"pqsu edge: error: settings file {config}: ") and err.count("\n") == 1
    assert message in err, err
    assert not connected()


def test_an_unknown_key_names_it_and_suggests_the_known_one(capsys, tmp_path):
    config = write(tmp_path, 'broker = "mqtt://127.0.0.1:1"\ndevice_id = "pi-1"\nchunk_limt = 65536\n')
    code, out, err = cli(capsys, "edge", "run", "--config", str(config))
    assert code == 2 and err.count("\n") == 1
    assert "unknown setting chunk_limt = 65536 (did you mean chunk_limit?)" in err, err
    config = write(tmp_path, "[board]\nmax_epoch = 2\n")
    with pytest.raises(SettingsError, match=r"unknown setting board\.max_epoch = 2 \(did you mean board\.max_epochs\?\)"):
        AgentSettings.from_file(config)
    config = write(tmp_path, "colour = 3\n")
    with pytest.raises(SettingsError, match="unknown setting colour = 3; known: broker, device_id, fleet"):
        AgentSettings.from_file(config)


def test_a_json_settings_file_is_typed_the_same_way(tmp_path):
    config = write(tmp_path, json.dumps({"device_id": "pi-1", "chunk_limit": "big"}), "agent.json")
    with pytest.raises(SettingsError, match=r'agent\.json: chunk_limit = "big": expected an integer, not a string'):
        AgentSettings.from_file(config)
    config = write(tmp_path, json.dumps({"device_id": "pi-1", "tls_ca": None, "stay": True,
                                         "providers": "CUDAExecutionProvider, CPUExecutionProvider"}), "agent.json")
    s = AgentSettings.from_file(config)
    assert s.tls_ca is None and s.stay is True
    assert s.providers == ("CUDAExecutionProvider", "CPUExecutionProvider")
    config = write(tmp_path, json.dumps({"stay": None}), "agent.json")
    with pytest.raises(SettingsError, match="stay = null: expected a boolean"):
        AgentSettings.from_file(config)  # only settings that may be unset take null


# -- booleans --------------------------------------------------------------------------------------
def settings_of(*argv: str) -> AgentSettings:
    return AgentSettings.from_args(build_parser(["edge", "run"]).parse_args(["edge", "run", *argv]))


@pytest.mark.parametrize("word, value", [("true", True), ("yes", True), ("1", True), ("TRUE", True),
                                         ("false", False), ("no", False), ("0", False), ("No", False)])
def test_boolean_flags_take_true_false_yes_no_1_0(word, value):
    s = settings_of("--stay", word, "--inference-only", word, "--error-feedback", word)
    assert (s.stay, s.inference_only, s.error_feedback) == (value,) * 3


def test_a_boolean_flag_alone_is_true_and_a_bad_word_is_an_argument_error(capsys):
    s = settings_of("--stay", "--inference-only", "--broker", "mqtt://b")
    assert s.stay is True and s.inference_only is True and s.broker == "mqtt://b"
    assert settings_of("--no-error-feedback").error_feedback is False
    with pytest.raises(SystemExit) as exc:
        build_parser(["edge", "run"]).parse_args(["edge", "run", "--stay", "maybe"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: pqsu edge run" in err and "argument --stay: expected true/false, yes/no or 1/0, got 'maybe'" in err


def test_stay_false_in_the_file_means_the_agent_leaves_when_training_is_over(tmp_path):
    base = 'broker = "mqtt://127.0.0.1:1"\ndevice_id = "pi-1"\n'
    assert AgentSettings.from_file(write(tmp_path, base + "stay = false\n")).agent_config().exit_when_done is True
    assert AgentSettings.from_file(write(tmp_path, base + "stay = true\n")).agent_config().exit_when_done is False


# -- defaults and sources --------------------------------------------------------------------------
def test_defaults():
    s = settings_of()
    assert s == AgentSettings()
    assert (s.fleet, s.state_dir, s.upload, s.select) == ("default", "pqsu-device", "norm:0.0001", "topk:0.02")
    assert s.error_feedback is True and s.stay is False and s.inference_only is False and s.allow_model_code == ()
    assert (s.chunk_limit, s.protocol, s.torch_threads, s.inference_threads) == (131072, "auto", 0, 0)
    assert s.providers == () and s.board == BoardBudget() and s.broker is None and s.device_id is None
    assert s.http_endpoint() == (DEFAULT_HTTP_PORT, False)  # the default port may be busy: then no API
    assert dataclasses.replace(s, http_port=0).http_endpoint() == (0, True)
    assert dataclasses.replace(s, http_port=-1).http_endpoint() == (None, True)


def test_flags_win_over_the_file_and_the_rest_of_the_file_stays(tmp_path):
    config = write(tmp_path, 'broker = "mqtt://a:1883"\ndevice_id = "pi-1"\nfleet = "farm"\nchunk_limit = 65536\n'
                             'stay = true\nproviders = ["CUDAExecutionProvider", "CPUExecutionProvider"]\n'
                             "http_port = 9000\n[board]\nname = \"rpi4\"\nmax_epochs = 2\n")
    s = settings_of("--config", str(config), "--fleet", "lab", "--stay", "no", "--providers", "CPUExecutionProvider",
                    "--no-http")
    assert (s.fleet, s.stay, s.providers, s.http_port) == ("lab", False, ("CPUExecutionProvider",), -1)
    assert (s.broker, s.device_id, s.chunk_limit) == ("mqtt://a:1883", "pi-1", 65536)
    assert s.board == BoardBudget(name="rpi4", max_epochs=2)


def test_every_setting_is_a_flag_of_run_and_doctor_and_every_flag_has_help():
    fields = {f.name for f in dataclasses.fields(AgentSettings)} - {"board"}  # [board]: settings files only
    for action in ("run", "doctor", "predict"):
        parser = build_parser(["edge", action])
        sub = parser._subparsers._group_actions[0].choices["edge"]._subparsers._group_actions[0].choices[action]
        dests = {a.dest for a in sub._actions}
        if action != "predict":
            assert fields <= dests, fields - dests
        for a in sub._actions:
            assert a.help and len(a.help) > 10, (action, a.option_strings, a.help)


def test_values_are_checked_before_any_work(capsys, tmp_path, listener):
    url, connected = listener
    state = tmp_path / "state"
    for flags, message in ((["--device-id", "bad/id"], "invalid device id 'bad/id'"),
                           (["--device-id", "pi-1", "--upload", "sometimes"], "unknown upload rule 'sometimes'"),
                           (["--device-id", "pi-1", "--http-port", "70000"], "http_port 70000 out of range"),
                           (["--device-id", "pi-1", "--chunk-limit", "100"], "chunk_limit below 1024 bytes"),
                           (["--device-id", "pi-1", "--torch-threads", "-2"], "torch_threads -2 is negative")):
        code, out, err = cli(capsys, "edge", "run", "--broker", url, "--state-dir", str(state), "--data", "x.npz",
                             *flags)
        assert code == 2 and err.count("\n") == 1 and message in err, (flags, err)
    code, _, err = cli(capsys, "edge", "run", "--device-id", "pi-1")
    assert code == 2 and "--broker is required (flag or settings file)" in err
    assert not connected() and not state.exists()


# -- the flash bundle's agent.toml -----------------------------------------------------------------
def flash_request(tmp_path: Path, *argv: str):
    target = tmp_path / "root"
    target.mkdir(exist_ok=True)
    args = build_parser(["flash"]).parse_args(["flash", "--device-id", "pi-07", "--broker", "mqtts://b.example:8883",
                                               "--target", str(target), *argv])
    return request_from_args(args)


@pytest.mark.parametrize("board", list(BOARDS))
def test_a_bundle_written_agent_toml_reads_back(tmp_path, board):
    password = write(tmp_path, "s3cret\n", "pw")
    req = flash_request(tmp_path, "--board", board, "--fleet", "farm", "--http-port", "18780", "--username", "pi",
                        "--password-file", str(password), "--set", "upload=always", "--set", 'select="topk:0.05"',
                        "--set", "chunk_limit=65536", "--set", "error_feedback=false")
    written = write(tmp_path, agent_toml(req, "2026-01-01T00:00:00+00:00"))
    s = AgentSettings.from_file(written)
    assert s == req.agent_settings()[0]
    b = BOARDS[board]
    assert (s.device_id, s.fleet, s.http_port, s.username, s.stay) == ("pi-07", "farm", 18780, "pi", True)
    assert (s.upload, s.select, s.chunk_limit, s.error_feedback) == ("always", "topk:0.05", 65536, False)
    assert s.password_file == "/etc/pqsu/credentials/password" and s.providers == b.providers
    assert s.board == BoardBudget(b.name, b.max_epochs, b.max_batch_size, b.time_budget_s)
    assert s.inference_only is (not b.trains)
    assert "s3cret" not in written.read_text()
    assert read_settings(written)["board"]["name"] == board  # a [board] table, as before


@pytest.mark.parametrize("setting, message", [
    ("stay=no", '--set: stay = "no": expected a boolean (true or false, unquoted), not a string'),
    ("chunk_limit=big", '--set: chunk_limit = "big": expected an integer, not a string'),
    ("torch_threads=x", '--set: torch_threads = "x": expected an integer'),
    ("upload=5", "--set: upload = 5: expected a string, not an integer"),
    ("chunk_limt=65536", "--set: unknown setting chunk_limt = 65536 (did you mean chunk_limit?)"),
    ("upload=sometimes", "agent settings: unknown upload rule 'sometimes'"),
])
def test_flash_refuses_a_setting_the_board_could_not_read(capsys, tmp_path, setting, message):
    target = tmp_path / "root"
    target.mkdir()
    code = main(["flash", "--board", "rpi5", "--device-id", "pi-07", "--broker", "mqtt://b.example:1883",
                 "--target", str(target), "--set", setting])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert list(target.iterdir()) == []


# -- imports ---------------------------------------------------------------------------------------
def test_the_doctor_does_not_import_the_command_and_parsers_import_no_torch():
    code = "import sys, pqsu.edge.doctor; assert 'pqsu.edge.command' not in sys.modules, 'doctor imports the command'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    code = ("import sys; from pqsu.tools.cli import build_parser\n"
            "for action in ('run', 'doctor', 'predict'): build_parser(['edge', action])\n"
            "bad = [m for m in ('torch', 'onnx', 'onnxruntime') if m in sys.modules]\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
