"""`pqsu flash`: board profiles, the bundle, its bad inputs, re-flashing, and the whole path end to end.

The fast tests run the command in this process (`pqsu.tools.cli.main`) with one fl-pqsu wheel
built once for the session (conftest.py, `--project-wheel`); the dry-run test builds the wheel the normal way.
The slow test is the issue's demonstration: flash a temporary root with an offline wheelhouse,
run the bundle's install.sh into a fresh virtualenv with every network path closed, start the
installed agent against a private Mosquitto, let it join a coordinator's rounds, and ask its
/predict for an answer from the new model. Every wait is bounded and every process is stopped.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from pqsu.protocol.settings import read_settings
from pqsu.tools.flash import bundle as bundle_mod
from pqsu.tools.flash import command as flash_mod
from pqsu.tools.flash.boards import BOARDS, CPU, get_board
from pqsu.tools.lab.broker import Mosquitto, free_port, mosquitto_path
from pqsu.tools.cli import build_parser, main
from pqsu.protocol.process import CLI, Process, reap

FMNIST = Path("/usr/share/datasets/fashion-mnist")
BROKER = "mqtt://broker.example:1883"
ROW = re.compile(r"^(0[0-7]{3})\s+(\d+|-|\?)\s+(\S.*)$")


def tree(root: Path) -> dict[str, tuple[int, int, bytes | None]]:
    """Every path under `root` with its mode, size and (for files) content: to prove nothing changed."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        data = p.read_bytes() if p.is_file() and not p.is_symlink() else None
        out[p.relative_to(root).as_posix()] = (st.st_mode, st.st_size if data is not None else 0, data)
    return out


def pqsu(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["flash", *argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.fixture
def creds(tmp_path) -> dict[str, Path]:
    d = tmp_path / "creds"
    d.mkdir()
    files = {"tls-ca": ("ca.pem", b"-----BEGIN CERTIFICATE-----\nCA\n"),
             "tls-cert": ("dev.pem", b"-----BEGIN CERTIFICATE-----\nDEV\n"),
             "tls-key": ("dev.key", b"-----BEGIN PRIVATE KEY-----\nKEY\n"),
             "password-file": ("pw", b"s3cret\n"), "key-file": ("hmac.hex", b"00112233445566778899aabbccddeeff\n")}
    out = {}
    for flag, (name, data) in files.items():
        (d / name).write_bytes(data)
        os.chmod(d / name, 0o644)
        out[flag] = d / name
    return out


def base_args(target: Path | str, wheel: Path, board: str = "rpi5", device: str = "pi-01", *extra: str) -> list[str]:
    return ["--board", board, "--device-id", device, "--broker", BROKER, "--target", str(target),
            "--project-wheel", str(wheel), *extra]


# -- profiles ----------------------------------------------------------------------------------
def test_list_boards_prints_every_profile(capsys):
    code, out, err = pqsu(capsys, "--list-boards")
    assert code == 0, err
    for name in ("rpi4", "rpi5", "jetson-orin", "generic-aarch64", "x86_64"):
        assert re.search(rf"^{re.escape(name)}\s", out, re.M), f"{name} missing from\n{out}"
        b = BOARDS[name]
        assert b.memory_max in out and b.cpu_quota in out
    assert "Tensorrt>CUDA>CPU" in out                     # Jetson's provider preference
    assert "NVIDIA" in out and "jp/v61/pytorch" in out     # where Jetson's torch comes from
    assert "torch==2.13.0+cpu" in out                      # the pinned CPU torch elsewhere


def test_profiles_are_frozen_pinned_and_fall_back_to_cpu():
    for b in BOARDS.values():
        with pytest.raises(Exception):
            b.inference_threads = 1  # type: ignore[misc]
        assert b.providers[-1] == CPU
        assert all("==" in r for r in b.requirement_lines() + b.nodeps_lines()), b.requirement_lines()
        names = {r.split("==")[0] for r in b.requirement_lines()}
        assert {"numpy", "onnxruntime", "paho-mqtt", "tqdm", "onnx"} <= names
        assert b.platform_tags()[0].startswith("manylinux_2_") and b.platform_tags()[-1].endswith(b.arch)
        assert b.max_epochs > 0 and b.max_batch_size > 0 and b.time_budget_s > 0
    jetson = get_board("jetson-orin")
    assert jetson.providers == ("TensorrtExecutionProvider", "CUDAExecutionProvider", CPU)
    assert jetson.torch is None and "torch" not in {r.split("==")[0] for r in jetson.requirement_lines()}
    assert jetson.python == "3.10" and "tomli" in " ".join(jetson.requirements)
    for name in ("rpi4", "rpi5", "generic-aarch64", "x86_64"):
        assert BOARDS[name].torch == "torch==2.13.0+cpu" and BOARDS[name].providers == (CPU,)
    assert get_board("rpi4").max_batch_size < get_board("rpi5").max_batch_size  # the small budget
    assert get_board("rpi4").requirement_lines(inference_only=True) == list(get_board("rpi4").requirements)


# -- bad input: one line, exit 2, nothing written ----------------------------------------------
@pytest.mark.parametrize("extra, message", [
    (["--board", "rpi9"], "unknown board 'rpi9'; choose one of: rpi4, rpi5, jetson-orin, generic-aarch64, x86_64"),
    (["--tls-ca", "/nonexistent/ca.pem", "--broker", "mqtts://b:8883"], "--tls-ca /nonexistent/ca.pem: cannot read it"),
    (["--password-file", "/nonexistent/pw", "--username", "u"], "--password-file /nonexistent/pw: cannot read it"),
    (["--key-file", "/nonexistent/k"], "--key-file /nonexistent/k: cannot read it"),
    (["--broker", "mqtt://u:hunter2@b:1883"], "the broker URL holds a password"),
    (["--data", "data/shard.npz"], "must be an absolute path on the board"),
    (["--device-id", "bad id!"], "invalid device id"),
    (["--python", "2.7"], "--python '2.7'"),
    (["--target", "ftp://host/x"], "a folder or ssh://"),
])
def test_bad_input_is_one_line_and_writes_nothing(capsys, tmp_path, wheel, extra, message):
    target = tmp_path / "root"
    target.mkdir()
    args = base_args(target, wheel)
    for i in range(0, len(extra), 2):  # later flags win in argparse
        args += extra[i:i + 2]
    code, out, err = pqsu(capsys, *args)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("pqsu flash: error: "), err
    assert message in err, err
    assert "hunter2" not in err
    assert list(target.iterdir()) == []


def test_tls_files_need_mqtts_and_key_file_must_be_hex(capsys, tmp_path, wheel, creds):
    target = tmp_path / "root"
    target.mkdir()
    code, _, err = pqsu(capsys, *base_args(target, wheel), "--tls-ca", str(creds["tls-ca"]))
    assert code == 2 and "use mqtts://" in err
    bad = tmp_path / "notahexkey"
    bad.write_text("not hex\n")
    code, _, err = pqsu(capsys, *base_args(target, wheel), "--key-file", str(bad))
    assert code == 2 and "must hold the device's HMAC key in hex" in err
    assert list(target.iterdir()) == []


def test_missing_target_folder_is_an_error(capsys, tmp_path, wheel):
    code, _, err = pqsu(capsys, *base_args(tmp_path / "not-mounted", wheel))
    assert code == 2 and "is not a folder" in err
    assert not (tmp_path / "not-mounted").exists()


def _make_unwritable(path: Path) -> str | None:
    """Make a folder unwritable even for root (immutable flag), or by mode for other users."""
    if os.geteuid() == 0:
        if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
            return "chattr"
        return None
    os.chmod(path, 0o555)
    return "chmod"


def _make_writable(path: Path, how: str | None) -> None:
    if how == "chattr":
        subprocess.run(["chattr", "-i", str(path)], check=True)
    elif how == "chmod":
        os.chmod(path, 0o755)


def test_unwritable_target_is_an_error_and_nothing_is_written(capsys, tmp_path, wheel):
    target = tmp_path / "ro-root"
    target.mkdir()
    how = _make_unwritable(target)
    try:
        try:
            (target / "probe").mkdir()
        except OSError:
            pass
        else:
            pytest.skip("cannot make a folder unwritable here (no chattr as root)")
        code, _, err = pqsu(capsys, *base_args(target, wheel))
        assert code == 2 and err.count("\n") == 1, err
        assert f"target {target} is not writable" in err
        code, _, err = pqsu(capsys, *base_args(target, wheel), "--dry-run")
        if how == "chmod":  # a dry run checks permissions only; an immutable folder looks writable to root
            assert code == 2 and "is not writable" in err
        assert list(target.iterdir()) == []
    finally:
        _make_writable(target, how)


# -- the bundle --------------------------------------------------------------------------------
def test_dry_run_lists_every_file_with_mode_and_size_and_writes_nothing(capsys, tmp_path, creds):
    target = tmp_path / "root"
    (target / "var").mkdir(parents=True)
    before = tree(target)
    code, out, err = pqsu(capsys, "--board", "rpi4", "--device-id", "pi-02", "--broker", "mqtts://b.example:8883",
                          "--tls-ca", str(creds["tls-ca"]), "--tls-cert", str(creds["tls-cert"]),
                          "--tls-key", str(creds["tls-key"]), "--username", "pi", "--password-file",
                          str(creds["password-file"]), "--key-file", str(creds["key-file"]),
                          "--target", str(target), "--dry-run")  # builds the wheel from the source tree
    assert code == 0, err
    assert tree(target) == before
    assert "nothing written" in out
    rows = {}
    for line in out.splitlines():
        m = ROW.match(line)
        if m:
            rows[m.group(3)] = (m.group(1), m.group(2))
    bundle = f"{target}/opt/pqsu/bundle"
    expect = {"bundle.json": "0644", "install.sh": "0755", "requirements.txt": "0644",
              "requirements-nodeps.txt": "0644", "pqsu-agent.service": "0644", "etc/agent.toml": "0644",
              "etc/credentials/": "0700", "etc/credentials/ca.crt": "0600", "etc/credentials/client.crt": "0600",
              "etc/credentials/client.key": "0600", "etc/credentials/password": "0600",
              "etc/credentials/device.key": "0600"}
    for rel, mode in expect.items():
        assert f"{bundle}/{rel}" in rows, f"{rel} not listed in\n{out}"
        assert rows[f"{bundle}/{rel}"][0] == mode, (rel, rows[f"{bundle}/{rel}"])
        if not rel.endswith("/"):
            assert int(rows[f"{bundle}/{rel}"][1]) > 0
    wheels = [p for p in rows if re.search(r"/wheels/fl_pqsu-.*\.whl$", p)]
    assert len(wheels) == 1 and int(rows[wheels[0]][1]) > 50_000


def test_credentials_are_0600_and_the_config_reads_back(capsys, tmp_path, wheel, creds):
    target = tmp_path / "root"
    target.mkdir()
    port = 18780
    code, out, err = pqsu(capsys, *base_args(target, wheel, "jetson-orin", "orin-7"),
                          "--broker", "mqtts://b.example:8883", "--fleet", "farm", "--http-port", str(port),
                          "--tls-ca", str(creds["tls-ca"]), "--tls-cert", str(creds["tls-cert"]),
                          "--tls-key", str(creds["tls-key"]), "--username", "orin",
                          "--password-file", str(creds["password-file"]), "--key-file", str(creds["key-file"]),
                          "--set", "upload=always", "--set", 'select="topk:0.05"')
    assert code == 0, err
    bundle = target / "opt/pqsu/bundle"
    cred_dir = bundle / "etc/credentials"
    assert cred_dir.stat().st_mode & 0o777 == 0o700
    names = {"tls-ca": "ca.crt", "tls-cert": "client.crt", "tls-key": "client.key", "password-file": "password",
             "key-file": "device.key"}
    for flag, name in names.items():
        installed = cred_dir / name
        assert installed.stat().st_mode & 0o777 == 0o600, name
        assert installed.read_bytes() == creds[flag].read_bytes()

    s = read_settings(bundle / "etc/agent.toml")
    assert s["broker"] == "mqtts://b.example:8883" and s["device_id"] == "orin-7" and s["fleet"] == "farm"
    assert s["data"] == "/var/lib/pqsu/data" and s["state_dir"] == "/var/lib/pqsu/state"
    assert s["tls_ca"] == "/etc/pqsu/credentials/ca.crt" and s["tls_key"] == "/etc/pqsu/credentials/client.key"
    assert s["tls_cert"] == "/etc/pqsu/credentials/client.crt"
    assert s["password_file"] == "/etc/pqsu/credentials/password" and s["username"] == "orin"
    assert s["key_file"] == "/etc/pqsu/credentials/device.key" and s["http_port"] == port
    assert s["providers"] == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert s["inference_threads"] == 6 and s["torch_threads"] == 6 and s["stay"] is True
    assert s["upload"] == "always" and s["select"] == "topk:0.05"
    assert s["board"] == {"name": "jetson-orin", "max_epochs": 5, "max_batch_size": 64, "time_budget_s": 300}
    # Every agent setting is one `pqsu edge run` knows (keys named like its flags).
    run_parser = build_parser(["edge", "run"])._subparsers._group_actions[0].choices["edge"]
    run_parser = run_parser._subparsers._group_actions[0].choices["run"]
    known = {a.dest for a in run_parser._actions}
    assert set(s) - {"board"} <= known, set(s) - {"board"} - known
    assert "s3cret" not in (bundle / "etc/agent.toml").read_text()

    manifest = json.loads((bundle / "bundle.json").read_text())
    assert manifest["board"] == "jetson-orin" and manifest["device_id"] == "orin-7"
    assert manifest["files"]["etc/credentials/password"]["mode"] == "0600"
    assert set(manifest["files"]) == {p.relative_to(bundle).as_posix() for p in bundle.rglob("*")
                                      if p.is_file() and p.name != "bundle.json"}


@pytest.mark.parametrize("board", list(BOARDS))
def test_systemd_unit_and_install_script(capsys, tmp_path, wheel, board):
    target = tmp_path / "root"
    target.mkdir()
    code, out, err = pqsu(capsys, *base_args(target, wheel, board), "--user", "edge")
    assert code == 0, err
    bundle = target / "opt/pqsu/bundle"
    unit = (bundle / "pqsu-agent.service").read_text()
    lines = set(unit.splitlines())
    b = BOARDS[board]
    for line in ("Restart=always", "RestartSec=10", f"MemoryMax={b.memory_max}", f"CPUQuota={b.cpu_quota}",
                 "User=edge", "ExecStart=/opt/pqsu/venv/bin/pqsu edge run --config /etc/pqsu/agent.toml",
                 "WantedBy=multi-user.target", "ReadWritePaths=-/var/lib/pqsu/state", "Environment=ORT_DISABLE_TELEMETRY=1"):
        assert line in lines, f"{line!r} not in\n{unit}"
    assert ("SupplementaryGroups=video" in lines) == (board == "jetson-orin")
    script = bundle / "install.sh"
    assert script.stat().st_mode & 0o777 == 0o755
    assert subprocess.run(["sh", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert "--no-index" in text and "WHEELHOUSE=0" in text and "SERVICE_USER=edge" in text
    assert f"BOARD_PYTHON={b.python}" in text
    reqs = (bundle / "requirements.txt").read_text()
    for r in b.requirement_lines():
        assert r in reqs.splitlines()


def test_install_script_refuses_a_wheelhouse_for_another_python(tmp_path, wheel):
    target = tmp_path / "root"
    target.mkdir()
    assert main(["flash", *base_args(target, wheel, "jetson-orin")]) == 0
    script = target / "opt/pqsu/bundle/install.sh"
    text = script.read_text().replace("WHEELHOUSE=0", "WHEELHOUSE=1")  # as if flashed with --wheelhouse
    script.write_text(text)
    if f"{sys.version_info[0]}.{sys.version_info[1]}" == "3.10":
        pytest.skip("this Python is the Jetson's")
    proc = subprocess.run(["sh", str(script)], env={**os.environ, "PQSU_ROOT": str(target),
                          "PQSU_PYTHON": sys.executable}, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "wheelhouse holds wheels for Python 3.10" in proc.stderr
    assert not (target / "opt/pqsu/venv").exists()


def test_inference_only_bundle_has_no_torch(capsys, tmp_path, wheel):
    target = tmp_path / "root"
    target.mkdir()
    code, _, err = pqsu(capsys, *base_args(target, wheel, "rpi4"), "--inference-only")
    assert code == 0, err
    bundle = target / "opt/pqsu/bundle"
    reqs = [ln for ln in (bundle / "requirements.txt").read_text().splitlines() if not ln.startswith("#")]
    assert reqs == list(BOARDS["rpi4"].requirements)      # numpy, onnxruntime, paho-mqtt, tqdm: no torch, no onnx
    assert not (bundle / "requirements-nodeps.txt").exists()
    assert read_settings(bundle / "etc/agent.toml")["inference_only"] is True
    assert "TRAINS=0" in (bundle / "install.sh").read_text()


# -- re-flashing and failures ------------------------------------------------------------------
def test_reflash_keeps_device_state_and_replaces_the_bundle(capsys, tmp_path, wheel, creds):
    target = tmp_path / "root"
    state = target / "var/lib/pqsu/state"
    state.mkdir(parents=True)
    residual = np.arange(1000, dtype=np.float32)
    np.savez(state / "state.npz", residual=residual, round=np.int64(7))
    (state / "outbox").mkdir()
    (state / "outbox" / "round-7.bin").write_bytes(b"pending upload")
    data = target / "var/lib/pqsu/data"
    data.mkdir(parents=True)
    (data / "shard.npz").write_bytes(b"local data")
    before = tree(target / "var")

    code, _, err = pqsu(capsys, *base_args(target, wheel), "--fleet", "first", "--password-file",
                        str(creds["password-file"]), "--username", "u")
    assert code == 0, err
    bundle = target / "opt/pqsu/bundle"
    first = json.loads((bundle / "bundle.json").read_text())["flash_id"]
    (bundle / "etc" / "left-by-first-flash").write_text("x")
    code, _, err = pqsu(capsys, *base_args(target, wheel), "--fleet", "second")
    assert code == 0, err

    assert tree(target / "var") == before                 # state, outbox and data untouched
    with np.load(state / "state.npz") as z:
        assert np.array_equal(z["residual"], residual) and int(z["round"]) == 7
    assert json.loads((bundle / "bundle.json").read_text())["flash_id"] != first
    assert read_settings(bundle / "etc/agent.toml")["fleet"] == "second"
    assert not (bundle / "etc" / "left-by-first-flash").exists()
    assert not (bundle / "etc" / "credentials").exists()  # the second flash has none
    assert sorted(p.name for p in (target / "opt/pqsu").iterdir()) == ["bundle"]  # no staging left over


def test_a_failure_midway_leaves_the_target_as_it_was(capsys, tmp_path, wheel, monkeypatch):
    target = tmp_path / "root"
    target.mkdir()
    assert main(["flash", *base_args(target, wheel)]) == 0
    capsys.readouterr()
    before = tree(target)

    def broken_download(req, requirements, nodeps, dest):
        (dest / "numpy-partial.whl").write_bytes(b"half a wheel")
        raise flash_mod.FlashError("downloading the wheelhouse for board rpi5 failed: network down")

    monkeypatch.setattr(bundle_mod, "download_wheelhouse", broken_download)
    code, _, err = pqsu(capsys, *base_args(target, wheel), "--wheelhouse", "--fleet", "other")
    assert code == 2 and "network down" in err
    assert tree(target) == before                          # old bundle intact, no staging folder

    empty = tmp_path / "empty-root"
    empty.mkdir()
    code, _, err = pqsu(capsys, *base_args(empty, wheel), "--wheelhouse")
    assert code == 2 and list(empty.iterdir()) == []       # even the opt/pqsu folders it made are gone


def test_one_flash_at_a_time_and_stale_staging_is_cleared(capsys, tmp_path, wheel):
    import fcntl

    target = tmp_path / "root"
    parent = target / "opt/pqsu"
    (parent / ".staging-killed" / "bundle").mkdir(parents=True)  # a flash that was SIGKILLed
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)                   # another flash is running
        code, _, err = pqsu(capsys, *base_args(target, wheel))
        assert code == 2 and "another pqsu flash is writing" in err
        assert sorted(p.name for p in parent.iterdir()) == [".staging-killed"]
    finally:
        os.close(fd)
    code, _, err = pqsu(capsys, *base_args(target, wheel))
    assert code == 0, err
    assert sorted(p.name for p in parent.iterdir()) == ["bundle"]


# -- ssh ---------------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("ssh") is None, reason="openssh-client is not installed")
def test_ssh_to_a_closed_port_is_a_clear_error_within_the_timeout(capsys, tmp_path, wheel):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    code, out, err = pqsu(capsys, *base_args(f"ssh://pi@127.0.0.1:{port}/", wheel), "--ssh-timeout", "5")
    took = time.monotonic() - started
    assert code == 2 and took < 20, (took, err)
    assert err.count("\n") == 1, err
    assert f"ssh to pi@127.0.0.1 (port {port}) failed:" in err and "refused" in err.lower(), err


FAKE_SSH = """#!/bin/sh
# ssh stand-in: drop the options and the destination, run the command here (stdin passes through)
while [ $# -gt 0 ]; do
    case "$1" in -o|-p|-i) shift 2 ;; -*) shift ;; *) break ;; esac
done
shift
echo "$*" >> "$FAKE_SSH_LOG"
exec sh -c "$*"
"""
FAKE_SCP = """#!/bin/sh
# scp stand-in: copy SRC to the path part of HOST:PATH
for last; do :; done
src=""; prev=""
for a; do src=$prev; prev=$a; done
exec cp -Rp "$src" "${last#*:}"
"""


def test_ssh_target_copies_and_places_the_bundle(capsys, tmp_path, wheel, creds, monkeypatch):
    """ssh and scp replaced by local stand-ins: the remote shell script really runs, here."""
    bin_dir, home, remote = tmp_path / "bin", tmp_path / "home", tmp_path / "remote-root"
    for d in (bin_dir, home, remote):
        d.mkdir()
    for name, text in (("ssh", FAKE_SSH), ("scp", FAKE_SCP), ("sudo", '#!/bin/sh\n[ "$1" = -n ] && shift\nexec "$@"\n')):
        (bin_dir / name).write_text(text)
        os.chmod(bin_dir / name, 0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("FAKE_SSH_LOG", str(tmp_path / "ssh.log"))
    for fleet in ("one", "two"):
        code, out, err = pqsu(capsys, *base_args(f"ssh://pi@board.local:2222{remote}", wheel), "--fleet", fleet,
                              "--key-file", str(creds["key-file"]), "--no-install")
        assert code == 0, err
    bundle = remote / "opt/pqsu/bundle"
    assert read_settings(bundle / "etc/agent.toml")["fleet"] == "two"
    assert (bundle / "etc/credentials/device.key").stat().st_mode & 0o777 == 0o600
    assert (bundle / "install.sh").stat().st_mode & 0o777 == 0o755
    assert sorted(p.name for p in (remote / "opt/pqsu").iterdir()) == ["bundle"]
    assert list(home.iterdir()) == []                       # the upload folder was removed
    assert "not installed" in out


# -- end to end: the demonstration -----------------------------------------------------
def _http(url: str, body: bytes | None = None, timeout: float = 10.0) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"} if body else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")
    except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
        return 0, {}


def _metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


HAS_SERVICE = (Path(flash_mod.__file__).resolve().parents[2] / "edge" / "service.py").is_file()


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.skipif(mosquitto_path() is None, reason="mosquitto is not installed")
@pytest.mark.skipif(not FMNIST.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_flash_install_offline_join_a_round_and_predict(tmp_path):
    """Flash a temporary root with a wheelhouse, install it offline into a fresh virtualenv, run the
    installed agent against Mosquitto, see it upload in round 1, and get /predict from the new model."""
    from pqsu.export.datasets import load_dataset

    root, out, logs = tmp_path / "root", tmp_path / "cloud", tmp_path / "logs"
    for d in (root, logs):
        d.mkdir()
    py = f"{sys.version_info[0]}.{sys.version_info[1]}"
    http_port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs: list[Process] = []
    with Mosquitto(tmp_path / "mosquitto") as broker:
        try:
            # 1. flash: the wheel built from this tree, every pinned wheel for this platform
            t0 = time.monotonic()
            flashed = subprocess.run(
                [sys.executable, "-m", "pqsu.tools.cli", "flash", "--board", "x86_64", "--python", py,
                 "--device-id", "box-01", "--broker", broker.url, "--fleet", "e2e", "--wheelhouse",
                 "--data", "/var/lib/pqsu/data/shard.npz", "--http-port", str(http_port), "--target", str(root)],
                env=env, capture_output=True, text=True, timeout=900)
            assert flashed.returncode == 0, flashed.stderr[-3000:]
            bundle = root / "opt/pqsu/bundle"
            wheels = {p.name.split("-")[0].lower() for p in (bundle / "wheels").glob("*.whl")}
            assert {"fl_pqsu", "numpy", "onnxruntime", "paho_mqtt", "tqdm", "onnx", "torch", "torch_pruning"} <= wheels
            t_flash = time.monotonic() - t0

            # 2. install.sh: a fresh virtualenv, offline (every network path leads to a closed port)
            venv = root / "opt/pqsu/venv"
            assert not venv.exists()
            closed = f"http://127.0.0.1:{free_port()}"
            offline = {**env, "PQSU_ROOT": str(root), "PQSU_PYTHON": sys.executable, "http_proxy": closed,
                       "https_proxy": closed, "HTTP_PROXY": closed, "HTTPS_PROXY": closed, "ALL_PROXY": closed,
                       "PIP_INDEX_URL": closed + "/simple", "PIP_RETRIES": "0", "PIP_TIMEOUT": "2"}
            t0 = time.monotonic()
            installed = subprocess.run(["sh", str(bundle / "install.sh")], env=offline, capture_output=True,
                                       text=True, timeout=900)
            assert installed.returncode == 0, (installed.stdout[-3000:], installed.stderr[-3000:])
            assert "installing offline" in installed.stdout and "creating the virtualenv" in installed.stdout
            t_install = time.monotonic() - t0
            assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
            versions = subprocess.run([str(venv / "bin/python"), "-c",
                                       "import torch, onnxruntime, pqsu.edge.learner; "
                                       "print(torch.__version__, onnxruntime.__version__)"],
                                      capture_output=True, text=True, timeout=120)
            assert versions.stdout.split() == ["2.13.0+cpu", "1.32.0"], versions.stderr
            assert (root / "etc/pqsu").is_symlink() and (root / "etc/pqsu/agent.toml").is_file()

            # 3. the device's data, where the config says (under the root), and the installed agent
            shard = root / "var/lib/pqsu/data/shard.npz"
            shard.parent.mkdir(parents=True)
            ds = load_dataset("fashion-mnist").head(200)
            np.savez(shard, x=ds.x, y=ds.y)
            state = root / "var/lib/pqsu/state"
            agent = Process([str(venv / "bin/pqsu"), "edge", "run", "--config", str(root / "etc/pqsu/agent.toml"),
                             "--state-dir", str(state), "--data", str(shard)], logs / "agent.log", env=env)
            procs.append(agent)

            # 4. a coordinator: round 1 (the device trains and uploads), round 2 ships round 1's model
            t0 = time.monotonic()
            cloud = Process([*CLI, "cloud", "--broker", broker.url, "--fleet", "e2e", "--rounds", "2",
                             "--min-devices", "1", "--clients", "1", "--samples-per-client", "200",
                             "--proxy-samples", "300", "--eval-samples", "300", "--pretrain-epochs", "0.3",
                             "--join-timeout", "120", "--round-timeout", "120", "--out", str(out)],
                            logs / "cloud.log", env=env)
            procs.append(cloud)
            deadline = time.monotonic() + 300
            while cloud.popen.poll() is None and time.monotonic() < deadline:
                assert agent.popen.poll() is None, f"the agent died:\n{agent.tail()}"
                time.sleep(0.5)
            assert cloud.popen.poll() == 0, f"coordinator: exit {cloud.popen.poll()}\n{cloud.tail()}\n{agent.tail()}"
            t_rounds = time.monotonic() - t0
            metrics = _metrics(out)
            assert [m["round"] for m in metrics] == [1, 2], metrics
            assert metrics[0]["uploads"] == 1 and metrics[0]["rejected"] == {}, metrics[0]
            assert (state / "state.npz").is_file()               # the device state lives outside the bundle

            if not HAS_SERVICE:
                pytest.skip("edge/service.py (the agent's HTTP inference service) has not landed yet")
            # 5. /predict on the installed agent answers with a model a round produced
            new_models = {m["model_id"] for m in metrics}
            url = f"http://127.0.0.1:{http_port}"
            deadline, health = time.monotonic() + 60, {}
            while time.monotonic() < deadline:
                code, health = _http(url + "/healthz")
                if code == 200 and health.get("model_id") in new_models:
                    break
                assert agent.popen.poll() is None, f"the agent died:\n{agent.tail()}"
                time.sleep(0.5)
            assert health.get("model_id") in new_models, (health, new_models, agent.tail())
            image = load_dataset("fashion-mnist", "test").head(1).x[0]      # (1, 28, 28) uint8
            code, answer = _http(url + "/predict", json.dumps({"inputs": image.tolist()}).encode())
            assert code == 200, answer
            assert answer["model_id"] == health["model_id"], answer
            assert len(answer["predictions"]) == 1 and 0 <= answer["predictions"][0] < 10
            assert len(answer["probabilities"][0]) == 10 and abs(sum(answer["probabilities"][0]) - 1) < 1e-3
            print(f"flash {t_flash:.0f} s, offline install {t_install:.0f} s, 2 rounds {t_rounds:.0f} s; "
                  f"/predict from model {answer['model_id'][:12]}")
        finally:
            reap(procs, grace_s=15, signal_first=True)
