"""`pqsu edge doctor` through the real command line (pqsu.tools.cli.main) against real brokers:
a private Mosquitto (plain, and a TLS listener with a CA made by openssl for the test), closed
ports, missing and malformed files. Loopback only; every network check is bounded by --timeout."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from tests.support.edge_models import int8_models
from tests.support.mosquitto import Mosquitto, free_port, require_mosquitto

from pqsu.tools.cli import main

LINE = re.compile(r"^(PASS|WARN|FAIL)  (\S+)\s+(.*)$")


def doctor(capsys, *argv: str) -> tuple[int, dict[str, tuple[str, str]], str]:
    """(exit status, {check: (level, rest of line)}, output)."""
    code = main(["edge", "doctor", "--timeout", "3", *argv])
    out = capsys.readouterr().out
    checks = {}
    for line in out.splitlines():
        if m := LINE.match(line):
            checks[m.group(2)] = (m.group(1), m.group(3))
    assert out.strip().splitlines()[-1].startswith("doctor: "), out
    return code, checks, out


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    require_mosquitto()
    with Mosquitto(tmp_path_factory.mktemp("broker")) as b:
        yield b


@pytest.fixture
def shard(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "data.npz"
    np.savez(path, x=rng.integers(0, 256, (40, 1, 28, 28), dtype=np.uint8), y=np.arange(40) % 10)
    return path


def base(broker_url: str, tmp_path: Path, *extra: str) -> list[str]:
    return ["--broker", broker_url, "--device-id", "pi-doc-01", "--fleet", "doc", "--state-dir",
            str(tmp_path / "state"), "--http-port", "0", *extra]


def test_doctor_passes_against_a_live_broker(capsys, broker, tmp_path, shard):
    (tmp_path / "state").mkdir()
    shutil.copy(int8_models().a, tmp_path / "state" / "model.onnx")
    key = tmp_path / "key.hex"
    key.write_text("ab" * 32 + "\n")
    code, checks, out = doctor(capsys, *base(broker.url, tmp_path, "--data", str(shard), "--key-file", str(key)))
    assert code == 0, out
    for name in ("settings", "tls", "broker-tcp", "broker-mqtt", "key-file", "onnxruntime", "model", "torch",
                 "data", "state-dir", "http", "clock"):
        assert checks[name][0] == "PASS", (name, out)
    assert "MQTT 5" in checks["broker-mqtt"][1]
    assert "40 samples" in checks["data"][1] and "(1, 28, 28)" in checks["data"][1]
    assert "CPU" in checks["onnxruntime"][1]
    assert "hint" not in out


def test_doctor_reads_a_settings_file_and_mqtt_311(capsys, broker, tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text(f'broker = "{broker.url}"\ndevice_id = "pi-doc-02"\nfleet = "doc"\n'
                      f'state_dir = "{tmp_path / "state"}"\ninference_only = true\nprotocol = "3.1.1"\nhttp_port = 0\n')
    code, checks, out = doctor(capsys, "--config", str(config))
    assert code == 0, out
    assert "MQTT 3.1.1" in checks["broker-mqtt"][1] and "inference-only" in checks["settings"][1]
    assert "data" not in checks  # an inference-only device has no training data to check


def test_closed_port_fails_the_broker_check_with_a_hint(capsys, tmp_path, shard):
    code, checks, out = doctor(capsys, *base(f"mqtt://127.0.0.1:{free_port()}", tmp_path, "--data", str(shard)))
    assert code == 1
    level, text = checks["broker-tcp"]
    assert level == "FAIL" and "refused" in text and "hint: is the broker running?" in text
    assert "broker-mqtt" not in checks
    assert checks["data"][0] == "PASS" and checks["clock"][0] == "PASS"  # the other checks still ran


def test_missing_data_fails_the_data_check(capsys, broker, tmp_path):
    code, checks, out = doctor(capsys, *base(broker.url, tmp_path, "--data", str(tmp_path / "nope.npz")))
    assert code == 1
    assert checks["data"][0] == "FAIL" and "does not exist" in checks["data"][1] and "hint:" in checks["data"][1]
    assert checks["broker-mqtt"][0] == "PASS"
    code, checks, _ = doctor(capsys, *base(broker.url, tmp_path))  # no --data at all on a training device
    assert code == 1 and checks["data"][0] == "FAIL" and "--inference-only" in checks["data"][1]


def test_bad_settings_and_files_fail(capsys, broker, tmp_path):
    code, checks, _ = doctor(capsys, "--broker", "http://x", "--device-id", "bad/id", "--inference-only")
    assert code == 1 and checks["settings"][0] == "FAIL"
    assert "invalid device id" in checks["settings"][1] and "invalid broker URL" in checks["settings"][1]
    key = tmp_path / "key"
    key.write_text("not hex\n")
    corrupt = tmp_path / "state" / "model.onnx"
    corrupt.parent.mkdir()
    corrupt.write_bytes(b"\x08\x07garbage")
    code, checks, _ = doctor(capsys, *base(broker.url, tmp_path, "--inference-only", "--key-file", str(key)))
    assert code == 1
    assert checks["key-file"][0] == "FAIL" and "hex" in checks["key-file"][1]
    assert checks["model"][0] == "FAIL" and "not an fl-pqsu model" in checks["model"][1]


def test_missing_or_broken_tls_files_fail(capsys, tmp_path):
    port = free_port()
    code, checks, out = doctor(capsys, *base(f"mqtts://127.0.0.1:{port}", tmp_path, "--inference-only",
                                             "--tls-ca", str(tmp_path / "ca.pem"), "--tls-cert", str(tmp_path / "c.pem")))
    assert code == 1
    assert checks["tls"][0] == "FAIL" and "--tls-ca" in checks["tls"][1] and "missing" in checks["tls"][1]
    assert "hint:" in checks["tls"][1]
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\nnonsense\n-----END CERTIFICATE-----\n")
    code, checks, _ = doctor(capsys, *base(f"mqtts://127.0.0.1:{port}", tmp_path, "--inference-only",
                                           "--tls-ca", str(tmp_path / "ca.pem")))
    assert code == 1 and checks["tls"][0] == "FAIL" and "not a PEM CA" in checks["tls"][1]
    code, checks, _ = doctor(capsys, *base(f"mqtt://127.0.0.1:{port}", tmp_path, "--inference-only",
                                           "--tls-ca", str(tmp_path / "ca.pem")))
    assert code == 1 and checks["tls"][0] == "FAIL" and "mqtts://" in checks["tls"][1]


def make_pki(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all by openssl."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    p = {k: folder / f"{k}.pem" for k in ("ca", "ca_key", "server", "server_key", "client", "client_key")}

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=pqsu test CA",
        "-keyout", str(p["ca_key"]), "-out", str(p["ca"]))
    for name, subject in (("server", "/CN=127.0.0.1"), ("client", "/CN=pi-doc-01")):
        csr = folder / f"{name}.csr"
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", subject, "-keyout", str(p[f"{name}_key"]), "-out", str(csr))
        ext = folder / f"{name}.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1\n" if name == "server" else "extendedKeyUsage=clientAuth\n")
        run("x509", "-req", "-in", str(csr), "-CA", str(p["ca"]), "-CAkey", str(p["ca_key"]), "-CAcreateserial",
            "-days", "2", "-extfile", str(ext), "-out", str(p[name]))
    return p


def test_doctor_over_tls_with_a_client_certificate(capsys, tmp_path):
    require_mosquitto()
    pki = make_pki(tmp_path)
    tls_port = free_port()
    extra = (f"listener {tls_port} 127.0.0.1\ncafile {pki['ca']}\ncertfile {pki['server']}\n"
             f"keyfile {pki['server_key']}\nrequire_certificate true\n")
    with Mosquitto(tmp_path / "broker", extra_config=extra) as b:
        assert b.port != tls_port
        flags = ["--inference-only", "--tls-ca", str(pki["ca"]), "--tls-cert", str(pki["client"]),
                 "--tls-key", str(pki["client_key"])]
        code, checks, out = doctor(capsys, *base(f"mqtts://127.0.0.1:{tls_port}", tmp_path, *flags))
        assert code == 0, out
        assert checks["tls"][0] == "PASS" and "client certificate" in checks["tls"][1]
        assert checks["broker-mqtt"][0] == "PASS" and "mqtts://" in checks["broker-mqtt"][1]
        assert "validated" in checks["clock"][1]
        # the key of another certificate: caught by ssl before any connection
        flags[-1] = str(pki["server_key"])
        code, checks, _ = doctor(capsys, *base(f"mqtts://127.0.0.1:{tls_port}", tmp_path, *flags))
        assert code == 1 and checks["tls"][0] == "FAIL"
        # no client certificate: the broker (require_certificate) refuses the handshake
        code, checks, _ = doctor(capsys, *base(f"mqtts://127.0.0.1:{tls_port}", tmp_path, "--inference-only",
                                               "--tls-ca", str(pki["ca"])))
        assert code == 1 and checks["tls"][0] == "PASS" and checks["broker-mqtt"][0] == "FAIL"
