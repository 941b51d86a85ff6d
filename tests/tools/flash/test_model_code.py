"""`pqsu flash --model-code PATH --allow-model-code pkg.module:factory`: the bundle carries the user's
model package (Python sources only), agent.toml puts it on the agent's path and allows exactly that
factory, and the agent built from those settings imports it; every misuse is one line, nothing written."""
from __future__ import annotations

import dataclasses
import sys

import pytest

from pqsu.edge.settings import AgentSettings
from pqsu.protocol.settings import read_settings
from pqsu.tools.cli import main

BROKER = "mqtt://broker.example:1883"
FACTORY = "mynets.small:net"


@pytest.fixture
def package(tmp_path):
    """A user's package as it sits on a laptop: sources, a bytecode cache, an editor's hidden file, data."""
    pkg = tmp_path / "src" / "mynets"
    (pkg / "__pycache__").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "small.py").write_text("from torch import nn\n\n\ndef net():\n"
                                  "    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))\n")
    (pkg / "__pycache__" / "small.cpython-311.pyc").write_bytes(b"\0" * 16)
    (pkg / ".small.py.swp").write_bytes(b"swap")
    (pkg / "weights.bin").write_bytes(b"\1" * 32)
    return pkg


def _flash(capsys, tmp_path, *extra: str) -> tuple[int, str, object]:
    target = tmp_path / "root"
    target.mkdir(exist_ok=True)
    wheel = tmp_path / "fl_pqsu-0-py3-none-any.whl"
    wheel.write_bytes(b"PK\5\6" + b"\0" * 18)  # the bundle copies the project wheel; it is never installed here
    code = main(["flash", "--board", "rpi5", "--device-id", "pi-own", "--broker", BROKER, "--target", str(target),
                 "--project-wheel", str(wheel), "--no-install", *extra])
    return code, capsys.readouterr().err, target


def test_the_bundle_carries_the_package_and_the_agent_may_import_only_that_factory(capsys, tmp_path, package,
                                                                                     monkeypatch):
    code, err, target = _flash(capsys, tmp_path, "--model-code", str(package), "--allow-model-code", FACTORY)
    assert code == 0, err
    bundle = target / "opt/pqsu/bundle"
    shipped = sorted(p.relative_to(bundle / "model-code").as_posix() for p in (bundle / "model-code").rglob("*"))
    assert shipped == ["mynets", "mynets/__init__.py", "mynets/small.py"]
    assert (bundle / "model-code/mynets/small.py").read_text() == (package / "small.py").read_text()
    assert (bundle / "model-code/mynets/small.py").stat().st_mode & 0o777 == 0o644

    raw = read_settings(bundle / "etc/agent.toml")
    assert raw["allow_model_code"] == [FACTORY] and raw["model_code_dir"] == "/opt/pqsu/bundle/model-code"
    settings = AgentSettings.from_file(bundle / "etc/agent.toml")
    assert settings.allow_model_code == (FACTORY,)

    # The agent's start-up with these settings, the board's root being `target`: the factory imports.
    from pqsu.edge.command import allow_model_code

    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in [m for m in sys.modules if m == "mynets" or m.startswith("mynets.")]:
        monkeypatch.delitem(sys.modules, name)
    allow_model_code(dataclasses.replace(settings, model_code_dir=str(bundle / "model-code")))
    assert sys.modules["mynets.small"].__file__ == str(bundle / "model-code/mynets/small.py")


def test_a_single_module_file_is_shipped_as_is(capsys, tmp_path, package):
    code, err, target = _flash(capsys, tmp_path, "--model-code", str(package / "small.py"),
                               "--allow-model-code", "small:net")
    assert code == 0, err
    assert [p.name for p in (target / "opt/pqsu/bundle/model-code").iterdir()] == ["small.py"]


@pytest.mark.parametrize("extra, message", [
    (["--model-code", "{pkg}"], "--model-code {pkg} needs --allow-model-code package.module:factory"),
    (["--model-code", "{pkg}", "--allow-model-code", "othernets.small:net"],
     "--allow-model-code othernets.small:net is not in --model-code {pkg}, which the board imports as mynets"),
    (["--model-code", "{pkg}/weights.bin", "--allow-model-code", FACTORY],
     "give a .py file or a package folder holding .py files"),
    (["--allow-model-code", "mynets small"], "is not package.module:factory"),
    (["--model-code", "{pkg}", "--allow-model-code", "mynets.small:nett"],
     "--allow-model-code mynets.small:nett: {pkg}/small.py defines no nett"),
    (["--model-code", "{pkg}", "--allow-model-code", "mynets.big:net"],
     "--allow-model-code mynets.big:net: --model-code {pkg} has no module mynets.big"),
    (["--model-code", "{pkg}/small.py", "--allow-model-code", "small:nett"], "{pkg}/small.py defines no nett"),
    (["--model-code", "{pkg}", "--allow-model-code", FACTORY, "--inference-only"],
     "an inference-only board serves any model without its code"),
    (["--set", f"allow_model_code=['{FACTORY}']"], "use the flag --allow-model-code"),
])
def test_misuse_is_one_line_and_writes_nothing(capsys, tmp_path, package, extra, message):
    code, err, target = _flash(capsys, tmp_path, *(a.replace("{pkg}", str(package)) for a in extra))
    assert code == 2 and err.count("\n") == 1 and err.startswith("pqsu flash: error: "), err
    assert message.replace("{pkg}", str(package)) in err, err
    assert list(target.iterdir()) == []
