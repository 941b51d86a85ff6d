"""Identity and access, against a real Mosquitto the test configures (TLS only, a CA and
certificates made with `cryptography`, a password per identity, the fleet ACL) and a real
coordinator (`pqsu cloud --keys`, its own certificate and user) and agent (`pqsu edge run`):
who may connect, what a device may publish and read, updates forged as another device, and a
device removed from the fleet while it runs.

The scenarios live in `pqsu.tools.reliability.security_scenarios` and also feed the reliability report;
these tests assert on what they measured. Every process they start is stopped, every wait is
bounded, and the broker listens on 127.0.0.1 only.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

pytest.importorskip("cryptography")

from pqsu.cloud.command import check_tls_files  # noqa: E402
from pqsu.cloud.device_keys import DeviceKeys  # noqa: E402
from pqsu.protocol.errors import PqsuError  # noqa: E402
from pqsu.tools.lab.broker import mosquitto_path  # noqa: E402
from pqsu.tools.reliability.security import fleet_rows, forged_accepted, markdown  # noqa: E402
from pqsu.tools.reliability.security_scenarios import (AGENT, HOLDER, REMOVED, acl_checks, connection_checks,  # noqa: E402
                                           fleet_run)

needs_mosquitto = pytest.mark.skipif(mosquitto_path() is None, reason="mosquitto is not installed")
needs_fmnist = pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                                  reason="dataset-fashion-mnist is not installed")
REPEATS = 2


@pytest.fixture(scope="module")
def connections(tmp_path_factory) -> dict:
    return {r["check"]: r for r in connection_checks(tmp_path_factory.mktemp("conn"), REPEATS)}


@pytest.fixture(scope="module")
def acl(tmp_path_factory) -> dict:
    return {r["check"]: r for r in acl_checks(tmp_path_factory.mktemp("acl"), REPEATS)}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> dict:
    return fleet_run(tmp_path_factory.mktemp("fleet"), REPEATS)


# -- the broker: who connects, what they may do ----------------------------------------------------
@needs_mosquitto
def test_only_tls_with_a_fleet_certificate_and_the_right_password_connects(connections):
    assert connections["device certificate and password over TLS (control)"]["through"] == REPEATS
    for refused in ("plain TCP, no TLS", "TLS without a client certificate", "certificate from another CA",
                    "wrong password"):
        assert connections[refused]["through"] == 0, connections[refused]
    assert "Not authorized" in connections["wrong password"]["error"]


@needs_mosquitto
def test_the_acl_confines_a_device_to_its_own_topics(acl):
    assert acl["publish on its own update topic (control)"]["through"] == REPEATS  # the readers do see what passes
    for check in ("publish on another device's update topic", "publish another device's status (offline)",
                  "publish a round announcement (retained)", "publish a model chunk (retained)",
                  "read another device's updates", "read another device's statuses"):
        assert acl[check] == {**acl[check], "attempts": REPEATS, "through": 0}, acl[check]


# -- a real fleet -----------------------------------------------------------------------------------
@needs_mosquitto
@needs_fmnist
def test_an_agent_over_tls_completes_real_rounds_with_a_coordinator_that_has_its_own_identity(fleet):
    assert fleet["cloud_exit"] == 0 and fleet["agent_exit"] == 0, fleet["logs"]
    rounds = fleet["rounds"]
    assert [m["round"] for m in rounds] == [1, 2], fleet["logs"]
    assert fleet["selected"][0] == [AGENT, REMOVED, HOLDER]
    assert [m["uploads"] for m in rounds] == [1, 1] and fleet["agent_uploaded_rounds"] == [1, 2]
    assert forged_accepted(fleet) == 0
    assert all(m["missing"] == 0 for m in rounds)


@needs_mosquitto
@needs_fmnist
def test_forged_updates_are_dropped_by_the_acl_or_refused_by_the_signature_check(fleet):
    through = fleet["through"]
    assert through["strict_other_topic"] == []                          # the ACL dropped them at the broker
    assert through["own_topic_naming_other"] == [REMOVED] * REPEATS     # legal topic, another device's name
    assert through["permissive_other_topic"] == [REMOVED] * 2 * REPEATS  # the misconfigured ACL let them pass...
    # ...and the coordinator refused every one that reached it, counted by reason; none was accepted
    assert fleet["rounds"][0]["rejected"] == {"topic-mismatch": REPEATS, "bad-signature": 2 * REPEATS}
    assert forged_accepted(fleet) == 0


@needs_mosquitto
@needs_fmnist
def test_a_removed_device_is_refused_by_the_coordinator_and_by_the_broker(fleet):
    # keys file edited during round 1, coordinator not restarted: from round 2 on it is not asked...
    assert fleet["selected"][1] == [AGENT, HOLDER]
    # ...and its correctly signed updates, delivered while the broker still knew it, are refused
    assert fleet["through"]["removed_signed"] == [REMOVED] * REPEATS
    assert fleet["rounds"][1]["rejected"] == {"unknown-device": REPEATS}
    # password file edited, Mosquitto reloaded: its open connection is closed and it cannot come back
    assert fleet["removed_kicked"]
    assert fleet["removed_reconnected"] == 0


@needs_mosquitto
@needs_fmnist
def test_the_report_section_tabulates_what_was_measured(connections, acl, fleet):
    result = {"repeats": REPEATS, "connections": list(connections.values()), "acl": list(acl.values()),
              "fleet": fleet, "attacks": fleet_rows(fleet), "forged_accepted": forged_accepted(fleet), "seconds": 1.0}
    lines = markdown(result)
    assert lines[0] == "## Identity and access"
    table = [line for line in lines if line.startswith("| ") and not line.startswith("| attempt")]
    assert len(table) == len(connections) + len(acl) + len(result["attacks"])
    signature = next(line for line in table if "bad-signature" in line)
    assert signature.endswith(f"| {2 * REPEATS} | {2 * REPEATS} | {2 * REPEATS} (bad-signature) |")
    assert "Forged updates accepted by the coordinator: 0" in "\n".join(lines)
    json.dumps(result)  # the reliability driver stores it as JSON


# -- unit: the keys file and the coordinator's TLS flags ---------------------------------------------
def _write_keys(path: Path, keys: dict[str, str]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(keys))
    os.replace(tmp, path)  # as an operator should: atomically


def test_the_keys_file_is_followed_without_a_restart_and_a_bad_edit_keeps_the_last_keys(tmp_path, caplog):
    path = tmp_path / "keys.json"
    _write_keys(path, {"dev-a": "aa", "dev-b": "bb"})
    keys = DeviceKeys(path)
    assert dict(keys) == {"dev-a": b"\xaa", "dev-b": b"\xbb"} and not keys.refresh()

    _write_keys(path, {"dev-a": "aa"})
    assert keys.refresh() and "dev-b" not in keys and keys.get("dev-b") is None
    assert "removed dev-b" in caplog.text

    path.write_text('{"dev-a": "aa", ')  # a half-written edit
    assert not keys.refresh() and dict(keys) == {"dev-a": b"\xaa"}
    assert caplog.text.count("keeping the 1 keys read before") == 1
    assert not keys.refresh() and caplog.text.count("keeping the 1 keys read before") == 1  # logged once

    _write_keys(path, {"dev-a": "aa", "dev-c": "cc"})
    assert keys.refresh() and dict(keys) == {"dev-a": b"\xaa", "dev-c": b"\xcc"}


@pytest.mark.parametrize("content, problem", [('["dev-a"]', "JSON"), ('{"dev-a": "zz"}', "hex"),
                                               ('{"bad/id": "aa"}', "invalid device id"), ('{"dev-a": ""}', "empty")])
def test_a_bad_keys_file_at_start_is_a_clear_error(tmp_path, content, problem):
    path = tmp_path / "keys.json"
    path.write_text(content)
    with pytest.raises(PqsuError, match=str(path)) as err:
        DeviceKeys(path)
    assert problem.lower() in str(err.value).lower()


def test_coordinator_tls_files_need_an_mqtts_url_and_must_exist(tmp_path):
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    ns = dict(tls_ca=str(ca), tls_cert=None, tls_key=None)
    with pytest.raises(PqsuError, match="use mqtts://"):
        check_tls_files(argparse.Namespace(broker="mqtt://127.0.0.1:1883", **ns))
    check_tls_files(argparse.Namespace(broker="mqtts://127.0.0.1:8883", **ns))
    with pytest.raises(PqsuError, match="--tls-cert .*no such file"):
        check_tls_files(argparse.Namespace(broker="mqtts://127.0.0.1:8883", **{**ns, "tls_cert": str(tmp_path / "no")}))
