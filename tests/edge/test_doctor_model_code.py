"""`pqsu edge doctor`'s model-code check: an allowed module is found where the agent will import it, without
running it; a missing one fails with a hint. (A saved model of a custom architecture the device may not import:
tests/edge/test_custom_model.py, which exports that model.)"""
from __future__ import annotations

import pytest

from tests.edge.test_doctor import doctor
from tests.support.mosquitto import free_port

pytest.importorskip("torch")


def _args(tmp_path, *extra: str) -> list[str]:
    return ["--broker", f"mqtt://127.0.0.1:{free_port()}", "--device-id", "pi-doc-07", "--state-dir",
            str(tmp_path / "state"), "--http-port", "0", *extra]


def test_an_allowed_module_is_found_in_model_code_dir_without_being_run(capsys, tmp_path):
    pkg = tmp_path / "code" / "mynets"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise SystemExit('the doctor ran the package')\n")
    (pkg / "small.py").write_text("raise SystemExit('the doctor ran the module')\n")
    _, checks, out = doctor(capsys, *_args(tmp_path, "--allow-model-code", "mynets.small:net",
                                           "--model-code-dir", str(tmp_path / "code")))
    assert checks["model-code"] == ("PASS", f"mynets.small:net in {pkg / 'small.py'} (imported, its code run, when a "
                                            "model of it arrives)"), out


def test_a_module_the_board_lacks_fails_with_a_hint(capsys, tmp_path):
    code, checks, out = doctor(capsys, *_args(tmp_path, "--allow-model-code", "nowhere_nets.small:net"))
    level, text = checks["model-code"]
    assert code == 1 and level == "FAIL" and "not found on the path: nowhere_nets.small:net" in text
    assert "hint: copy the module onto the board (pqsu flash --model-code PATH)" in text
