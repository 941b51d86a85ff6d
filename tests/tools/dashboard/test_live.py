"""The dashboard against a real Mosquitto: it shows what the fleet's messages say, retained ones at once,
never publishes, and `pqsu dashboard` refuses bad input with one line before any work."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import pytest

from pqsu.protocol.messages import RoundTask, Status
from pqsu.protocol.mqtt import MqttClient
from pqsu.protocol.topics import Topics
from pqsu.tools.dashboard.command import Dashboard
from pqsu.tools.lab.broker import Mosquitto, free_port, mosquitto_path
from pqsu.tools.lab.observer import wait_until

pytestmark = pytest.mark.skipif(mosquitto_path() is None, reason="mosquitto is not installed")
JOB = "20261202T010000Z-cccccc"


def state(url: str) -> dict:
    with urllib.request.urlopen(url + "api/state", timeout=10) as r:
        return json.loads(r.read())


def test_the_dashboard_shows_retained_and_live_messages_and_publishes_nothing(tmp_path):
    topics = Topics("farm")
    with Mosquitto(tmp_path / "broker") as broker:
        fleet = MqttClient(broker.url, "test-fleet", persistent_session=False)
        fleet.connect(timeout_s=10)
        seen: list[str] = []
        fleet.subscribe("pqsu/farm/#", lambda t, p, r: seen.append(t))
        fleet.publish(topics.status("pi-1"), Status("pi-1", "online").to_json(), retain=True)
        dash = Dashboard(broker.url, "farm", port=0)
        try:
            assert wait_until(lambda: [d["device"] for d in state(dash.url)["devices"]] == ["pi-1"], 10)
            fleet.publish(topics.round, RoundTask(1, "ab" * 16, devices=("pi-1",), job=JOB, remaining_s=30.0,
                                                  model_bytes=500).to_json(), retain=True)
            fleet.publish(topics.status("pi-1"), Status("pi-1", "uploaded", 1, job=JOB).to_json(), retain=True)
            assert wait_until(lambda: (state(dash.url)["round"] or {}).get("answered") == 1, 10)
            fleet.publish(topics.metrics, json.dumps({"round": 1, "accuracy": 0.42, "bytes_up": 10, "job": JOB,
                                                      "rejected": {"late": 1}}).encode(), retain=True)
            assert wait_until(lambda: [r["accuracy"] for r in state(dash.url)["rounds"]] == [0.42], 10)
            view = state(dash.url)
            assert view["connected"] and view["refusals"] == {"late": 1} and view["round"]["open"] is False
            assert view["devices"][0]["bytes_down"] == 500
        finally:
            dash.close()
        time.sleep(0.3)
        fleet.close()
    assert sorted(set(seen)) == [topics.metrics, topics.round, topics.status("pi-1")]  # only what the test sent


def _dashboard_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pqsu.tools.cli", "dashboard", *args], capture_output=True, text=True,
                          timeout=60)


def test_pqsu_dashboard_names_an_unreachable_broker_in_one_line():
    proc = _dashboard_cli("--broker", f"mqtt://127.0.0.1:{free_port()}", "--fleet", "farm", "--connect-timeout", "1")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("pqsu dashboard: error: cannot connect to MQTT broker")


@pytest.mark.parametrize("args, message", [
    (["--bind", "0.0.0.0"], "needs a token"),
    (["--fleet", "a/b"], "invalid fleet id"),
    (["--port", "70000"], "--port 70000"),
    (["--token-file", "/nonexistent/token"], "cannot read the token file"),
])
def test_pqsu_dashboard_refuses_bad_input_before_connecting(args, message):
    base = {"--broker": f"mqtt://127.0.0.1:{free_port()}", "--fleet": "farm"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    start = time.monotonic()
    proc = _dashboard_cli(*[x for kv in base.items() for x in kv])
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert time.monotonic() - start < 15  # no broker wait: refused first
