"""The emulated aarch64 board: how commands reach it (fast), and the whole rpi4 path on it (-m board).

The board check needs root, qemu-user-static with its binfmt handler, mmdebstrap and Debian's
mirror on first use (the root is cached in ~/.cache/pqsu/board-arm64 afterwards), so it is
behind the `board` marker, outside the default suite: scripts/board_aarch64.sh runs the same
check with its run log.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pqsu.tools.flash.boards import BOARDS
from pqsu.tools.lab import board as board_mod
from pqsu.tools.lab import board_check
from pqsu.tools.lab.board import CPUS, Board
from pqsu.tools.lab.broker import mosquitto_path

FMNIST = Path("/usr/share/datasets/fashion-mnist")
ARM_BOARDS = [name for name, b in BOARDS.items() if b.arch == "aarch64"]


@pytest.mark.parametrize("name", ARM_BOARDS)
def test_arm_boards_fetch_only_aarch64_manylinux_wheels(name):
    tags = BOARDS[name].platform_tags()
    assert all(t.endswith("_aarch64") for t in tags), tags
    major, minor = BOARDS[name].glibc
    assert tags[0] == f"manylinux_{major}_{minor}_aarch64" and tags[-1] == "manylinux2014_aarch64"
    assert "manylinux_2_17_aarch64" in tags and len(set(tags)) == len(tags)


def test_a_board_command_is_a_chroot_in_its_own_mount_namespace(tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\npqsu:x:999:999::/var/lib/pqsu:/usr/sbin/nologin\n")
    b = Board(root, CPUS["rpi4"])
    argv = b.argv(["sh", "/opt/pqsu/bundle/install.sh"])
    assert argv[:4] == ["unshare", "--mount", "--propagation", "private"] and "--net" not in argv
    chroot = argv.index("chroot")
    assert argv[chroot - 2:chroot] == [str(root), str(b.cpuinfo)] and argv[chroot + 1] == str(root)
    assert argv[chroot + 2:chroot + 4] == ["/usr/bin/env", "-i"]              # nothing of the host's environment
    assert {"HOME=/root", "QEMU_CPU=cortex-a72"} <= set(argv) and argv[-2:] == ["sh", "/opt/pqsu/bundle/install.sh"]
    assert not b.cpuinfo.is_relative_to(root) and b.cpuinfo.read_text().count("CPU part\t: 0xd08") == 4
    offline = b.argv(["true"], offline=True, user="pqsu", env={"X": "1"})
    assert "--net" in offline[:offline.index("sh")]                           # a network namespace with nothing in it
    assert offline[offline.index("chroot") + 1] == "--userspec=pqsu:pqsu"
    assert {"HOME=/var/lib/pqsu", "USER=pqsu", "X=1"} <= set(offline)         # as systemd's User= would set them
    assert b.path("/var/lib/pqsu/state") == root / "var/lib/pqsu/state"


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare")
def test_the_board_sees_its_own_cpu_in_proc_and_sys_and_no_mount_is_left(tmp_path):
    """The namespace wrapper on a host-architecture root: the board's cores, gone after the command."""
    root = tmp_path / "root"
    for d in ("proc", "sys"):
        (root / d).mkdir(parents=True)
    b = Board(root, CPUS["rpi4"])
    show = f'cat "{root}/proc/cpuinfo" "{root}/sys/devices/system/cpu/possible"; ls "{root}/sys/devices/system/cpu"; ' \
           f'touch "{root}/sys/x" 2>/dev/null || echo read-only'
    probe = ["unshare", "--mount", "--propagation", "private", "sh", "-c", board_mod._enter_script(b.cpu), "board",
             str(root), str(b.cpuinfo), "sh", "-c", show]
    seen = subprocess.run(probe, capture_output=True, text=True, timeout=30)
    assert seen.returncode == 0, seen.stderr
    assert seen.stdout.count("CPU part\t: 0xd08") == 4 and "Model\t\t: Raspberry Pi 4 Model B" in seen.stdout
    assert seen.stdout.split("\n").count("0-3") == 1 and "cpu3" in seen.stdout and "cpu4" not in seen.stdout
    assert seen.stdout.strip().endswith("read-only")
    assert not (root / "proc/cpuinfo").exists() and not (root / "sys/devices").exists()
    with open("/proc/self/mounts") as f:
        assert str(root) not in f.read()


def test_binfmt_handler_without_the_fix_binary_flag_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(board_mod, "BINFMT", tmp_path)
    (tmp_path / "register").write_text("")
    entry = tmp_path / "qemu-aarch64"
    entry.write_text("enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: P\noffset 0\n")
    assert "F (fix binary) flag" in board_mod._binfmt_problem()
    entry.write_text("disabled\ninterpreter /usr/bin/qemu-aarch64-static\nflags: PF\n")
    assert "update-binfmts --enable qemu-aarch64" in board_mod._binfmt_problem()
    entry.write_text("enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: PF\n")
    assert board_mod._binfmt_problem() is None


def test_a_failed_root_build_names_mmdebstraps_last_line_and_leaves_no_cache(tmp_path, monkeypatch):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "mmdebstrap").write_text("#!/bin/sh\necho 'I: automatically chosen mode: root'\n"
                                     "echo 'E: apt-get update failed: cannot reach the mirror'\nexit 25\n")
    (fake / "mmdebstrap").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    monkeypatch.setattr(board_mod, "check_host", lambda **kw: None)
    lines: list[str] = []
    with pytest.raises(board_mod.BoardError, match=r"mmdebstrap failed \(exit 25\): E: apt-get update failed"):
        board_mod.build_root(tmp_path / "cache" / "board-arm64", say=lines.append)
    assert "  I: automatically chosen mode: root" in lines                  # the build's progress is shown
    assert list((tmp_path / "cache").iterdir()) == []                       # no half-built root is left as a cache


def test_followed_models_are_read_from_the_agent_log(tmp_path):
    class FakeAgent:
        output = ("02:01:00 INFO pqsu.edge.agent: pi-emu-01: model 0123456789ab (61234 bytes)\n"
                  "02:01:05 INFO pqsu.edge.agent: pi-emu-01: joining job j1 (was none)\n"
                  "02:01:09 INFO pqsu.edge.agent: other-dev: model ffffffffffff (61234 bytes)\n"
                  "02:02:00 INFO pqsu.edge.agent: pi-emu-01: model ba9876543210 (61240 bytes)\n")
    assert board_check._followed(FakeAgent()) == ["0123456789ab", "ba9876543210"]


def test_the_agent_starts_as_the_bundles_unit_says(tmp_path):
    unit = tmp_path / "pqsu-agent.service"
    unit.write_text("[Service]\nType=simple\nUser=pqsu\nGroup=pqsu\n"
                    "ExecStart=/opt/pqsu/venv/bin/pqsu edge run --config /etc/pqsu/agent.toml\n"
                    "Environment=PYTHONUNBUFFERED=1\nEnvironment=OMP_NUM_THREADS=3\nEnvironment=ORT_DISABLE_TELEMETRY=1\n")
    user, command, env = board_check.unit_service(unit)
    assert user == "pqsu" and command == ["/opt/pqsu/venv/bin/pqsu", "edge", "run", "--config", "/etc/pqsu/agent.toml"]
    assert env == {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "3", "ORT_DISABLE_TELEMETRY": "1"}


@pytest.mark.slow
@pytest.mark.board
@pytest.mark.skipif(mosquitto_path() is None, reason="mosquitto is not installed")
@pytest.mark.skipif(not FMNIST.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_rpi4_bundle_installs_offline_follows_the_fleet_and_predicts_on_aarch64(tmp_path):
    problems = board_mod.host_problems()
    if problems:
        pytest.skip("; ".join(problems))
    lines: list[str] = []
    report = board_check.run_check(tmp_path, board_name="rpi4", say=lambda ln: (lines.append(ln), print(ln)))

    assert report.uname == "aarch64" and report.board_python.startswith("3.11.")
    assert report.venv_platform.split()[0] == "aarch64", report.venv_platform
    names = {w.split("-")[0].lower(): w for w in report.wheels}
    assert {"fl_pqsu", "numpy", "onnxruntime", "paho_mqtt", "tqdm"} <= set(names), report.wheels
    assert "torch" not in names                                      # inference-only: no torch for this board here
    assert names["numpy"].endswith("aarch64.whl") and names["onnxruntime"].endswith("_aarch64.whl")
    assert "installing offline" in report.install_output and "creating the virtualenv" in report.install_output
    assert "creating the system user pqsu" in report.install_output  # install.sh ran as root on the board's /

    doctor = report.doctor_output
    assert report.doctor_code == 0 and "0 fail" in doctor, doctor
    for check in ("settings", "broker-tcp", "broker-mqtt", "onnxruntime", "torch", "state-dir", "http"):
        assert any(ln.startswith(f"PASS  {check} ") for ln in doctor.splitlines()), (check, doctor)

    # every model the coordinator sent (one per round, then the final one) reached the board, in order
    assert len(report.sent) == 2 and [m[:12] for m in report.round_models][:-1] == report.sent[1:], report
    versions = report.sent + [report.final_model[:12]]
    assert len(set(versions)) == 3 and report.followed == versions, (report.followed, versions)
    assert report.served_model == report.host_model == report.final_model

    assert "Error in cpuinfo" not in report.agent_output           # onnxruntime saw the board's Cortex-A72 cores
    assert "telemetry" not in report.agent_output                  # the unit's ORT_DISABLE_TELEMETRY=1 holds
    assert len(report.board_predictions) == board_check.SAMPLES
    assert report.board_predictions == report.host_predictions
    assert report.max_probability_diff < 1e-4, report.max_probability_diff
