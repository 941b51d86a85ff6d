"""`pqsu` as a user meets it: --help without torch, a help line per flag, the subcommand's own
usage on a mistyped flag, and `pqsu run --out DIR`."""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pqsu.tools import cli
from pqsu.tools.fleet import run as fleet_run

HEAVY = ("torch", "onnx", "onnxruntime")
COMMANDS = [[name] for name in cli.SUBCOMMANDS] + [["edge", "run"], ["edge", "doctor"], ["edge", "predict"]]

# Runs `pqsu <argv> --help` in a fresh interpreter and reports which heavy modules it imported.
_PROBE = """
import contextlib, io, json, sys
from pqsu.tools import cli
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        cli.main(sys.argv[1:] + ["--help"])
    except SystemExit:
        pass
print(json.dumps({"help": out.getvalue(), "heavy": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


@pytest.mark.parametrize("argv", COMMANDS, ids=" ".join)
def test_help_imports_no_torch_or_onnx(argv):
    proc = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["help"].startswith(f"usage: pqsu {' '.join(argv)} ")
    assert report["heavy"] == []


def _subparser(argv: list[str]) -> argparse.ArgumentParser:
    parser = cli.build_parser(argv)
    for name in argv:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


# The edge subcommands' flags are described by the edge agent's own settings (edge/command.py).
@pytest.mark.parametrize("command", ["run", "cloud", "simulate", "export", "bench", "reliability", "flash", "dashboard",
                                     "report"])
def test_every_flag_says_what_it_does(command):
    parser = _subparser([command])
    formatter = parser._get_formatter()
    vague = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        text = formatter._expand_help(action) if action.help else ""
        what = re.sub(r"\(?\bdefault: [^)]*\)?", "", text).strip(" ;,.")
        if len(what.split()) < 3:
            vague.append(f"{'/'.join(action.option_strings) or action.dest}: {text!r}")
    assert vague == []


@pytest.mark.parametrize("argv", [["run"], ["cloud"], ["edge", "run"], ["export"]], ids=" ".join)
def test_an_unknown_flag_prints_the_subcommands_usage(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, "--bogus", "1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: pqsu {' '.join(argv)} [-h]")
    assert err.rstrip().endswith(f"pqsu {' '.join(argv)}: error: unrecognized arguments: --bogus 1")


def test_a_bad_value_prints_the_subcommands_usage(capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", "--rounds", "ten"])
    err = capsys.readouterr().err
    assert err.startswith("usage: pqsu run [-h]") and "argument --rounds: invalid int value: 'ten'" in err


def test_scheme_offers_what_a_user_would_choose():
    scheme = next(a for a in _subparser(["run"])._actions if a.dest == "scheme")
    assert scheme.choices == ["fedavg", "paper", "ours"]


# ---------------------------------------------------------------- pqsu run: where results go

def _run_args(*argv: str) -> argparse.Namespace:
    return _subparser(["run"]).parse_args(list(argv))


def test_run_out_is_the_results_folder_itself(tmp_path):
    assert fleet_run.output_folder(_run_args("--out", str(tmp_path / "r"))) == tmp_path / "r"


def test_run_name_and_runs_dir_still_work(tmp_path):
    assert fleet_run.output_folder(_run_args("--runs-dir", str(tmp_path), "--name", "a")) == tmp_path / "a"
    assert fleet_run.output_folder(_run_args("--name", "a")) == Path("runs") / "a"
    assert re.fullmatch(r"runs/run-\d{8}-\d{6}", str(fleet_run.output_folder(_run_args())))


def test_run_out_with_name_is_an_error_before_any_work(tmp_path, capsys):
    assert cli.main(["run", "--out", str(tmp_path / "r"), "--name", "a"]) == 2
    assert capsys.readouterr().err == "pqsu run: error: give --out DIR, or --name (and --runs-dir), not both\n"
    assert not (tmp_path / "r").exists()


def test_run_out_refuses_a_finished_run(tmp_path, capsys):
    (tmp_path / "summary.json").write_text(json.dumps({"completed": True}))
    assert cli.main(["run", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"pqsu run: error: {tmp_path} holds a finished run; choose another --out\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
