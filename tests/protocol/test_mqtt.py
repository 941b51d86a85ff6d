"""MqttClient against real brokers: a private Mosquitto per test (tests/support/mosquitto.py), and amqtt
in-process for the MQTT 3.1.1 fallback. Loopback only; every wait is bounded."""
from __future__ import annotations

import asyncio
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support.mosquitto import Mosquitto, free_port, port_open, require_mosquitto  # noqa: E402

from pqsu.protocol import chunking  # noqa: E402
from pqsu.protocol.errors import PqsuError  # noqa: E402
from pqsu.protocol.mqtt import BrokerURL, MqttClient, MqttError  # noqa: E402
from pqsu.protocol.topics import Topics  # noqa: E402


def wait_until(predicate, timeout_s: float = 5.0, step_s: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step_s)
    return predicate()


class Inbox:
    """A handler that records (topic, payload, retained) from paho's thread."""

    def __init__(self):
        self.items: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()

    def __call__(self, topic, payload, retained):
        with self.lock:
            self.items.append((topic, payload, retained))

    def payloads(self) -> list[bytes]:
        with self.lock:
            return [p for _, p, _ in self.items]

    def wait_for(self, payload: bytes, timeout_s: float = 5.0) -> bool:
        return wait_until(lambda: payload in self.payloads(), timeout_s)


@pytest.fixture
def mosquitto():
    require_mosquitto()
    with Mosquitto(persistence=False) as broker:
        yield broker


@pytest.fixture
def clients():
    """make(url, client_id, **kw) -> MqttClient, all closed at teardown."""
    made: list[MqttClient] = []

    def make(url, client_id, **kw):
        c = MqttClient(url, client_id, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


# -- URLs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("url,expected", [
    ("mqtt://127.0.0.1:1883", BrokerURL("127.0.0.1", 1883, False, None, None)),
    ("mqtt://broker", BrokerURL("broker", 1883)),
    ("mqtts://broker.example.com", BrokerURL("broker.example.com", 8883, True)),
    ("mqtts://u:p%40ss@h:9000/", BrokerURL("h", 9000, True, "u", "p@ss")),
    ("mqtt://user@[::1]:1884", BrokerURL("::1", 1884, False, "user", None)),
])
def test_broker_url_parse(url, expected):
    assert BrokerURL.parse(url) == expected


@pytest.mark.parametrize("url", ["", "127.0.0.1:1883", "http://h", "mqtt://", "mqtt://h:99999",
                                 "mqtt://h:port", "mqtt://h/path", "mqtt://h?x=1", "tcp://h:1883"])
def test_broker_url_invalid(url):
    with pytest.raises(MqttError) as e:
        BrokerURL.parse(url)
    assert isinstance(e.value, PqsuError)
    assert repr(url)[1:-1] in str(e.value) or url in str(e.value)


def test_broker_url_never_shows_password():
    u = BrokerURL.parse("mqtt://alice:s3cret@h:1")
    assert "s3cret" not in str(u) and "alice" in str(u)
    with pytest.raises(MqttError) as e:
        BrokerURL.parse("mqtt://alice:s3cret@h:1/x")
    assert "s3cret" not in str(e.value) and "alice" in str(e.value)


def test_client_argument_errors():
    with pytest.raises(MqttError, match="protocol"):
        MqttClient("mqtt://h", "c", protocol="4")
    with pytest.raises(MqttError, match="client id"):
        MqttClient("mqtt://h", "")
    with pytest.raises(MqttError, match="mqtts"):
        MqttClient("mqtt://h", "c", tls_ca="/ca.pem")
    with pytest.raises(MqttError, match="connect"):
        MqttClient("mqtt://h", "c").publish("t", b"x")


# -- against Mosquitto -------------------------------------------------------------------------

def test_unreachable_broker_fails_within_timeout():
    port = free_port()
    assert not port_open(port)
    c = MqttClient(f"mqtt://127.0.0.1:{port}", "lonely")
    t0 = time.monotonic()
    with pytest.raises(MqttError) as e:
        c.connect(timeout_s=1.5)
    elapsed = time.monotonic() - t0
    assert f"mqtt://127.0.0.1:{port}" in str(e.value)
    assert 1.0 < elapsed < 6.0  # waited out its 1.5 s timeout, and not much longer (CI may be loaded)
    c.close()  # nothing to close: must not raise


@pytest.mark.parametrize("protocol", ["auto", "3.1.1"])
def test_refused_connection_fails_at_once(protocol):
    require_mosquitto()
    with Mosquitto(anonymous=False) as broker:   # no password file: every client is refused
        c = MqttClient(broker.url, "intruder", protocol=protocol)
        t0 = time.monotonic()
        with pytest.raises(MqttError, match="refused") as e:
            c.connect(timeout_s=10)
        assert broker.url in str(e.value) and time.monotonic() - t0 < 8  # refused, not timed out (10 s)
        assert not c.connected


def test_connect_reports_mqtt5_and_pub_sub_qos1(mosquitto, clients):
    sub = clients(mosquitto.url, "sub")
    sub.connect(timeout_s=10)
    assert sub.is_mqtt5 and sub.connected
    inbox = Inbox()
    sub.subscribe("pqsu/f/update/+", inbox, qos=1)
    pub = clients(mosquitto.url, "pub", protocol="3.1.1")
    pub.connect(timeout_s=10)
    assert not pub.is_mqtt5
    pub.publish("pqsu/f/update/d1", b"\x00\x01payload", qos=1)
    pub.publish("pqsu/f/other/d1", b"not for us", qos=1)
    assert inbox.wait_for(b"\x00\x01payload")
    assert inbox.items[0] == ("pqsu/f/update/d1", b"\x00\x01payload", False)
    time.sleep(0.1)
    assert inbox.payloads() == [b"\x00\x01payload"]
    sub.close()
    sub.close()  # idempotent
    assert not sub.connected


def test_retained_message_reaches_late_subscriber(mosquitto, clients):
    with MqttClient(mosquitto.url, "coordinator") as pub:
        pub.publish("pqsu/f/round", b'{"round": 1}', retain=True)
    late = clients(mosquitto.url, "late-device")
    inbox = Inbox()
    late.subscribe("pqsu/f/round", inbox)
    late.connect(timeout_s=10)
    assert inbox.wait_for(b'{"round": 1}')
    assert inbox.items[0] == ("pqsu/f/round", b'{"round": 1}', True)


def test_chunked_1mb_payload_reassembled(mosquitto, clients):
    topics = Topics("f")
    payload = os.urandom(1024 * 1024)
    received: list[bytes] = []
    r = chunking.Reassembler()

    def on_update(topic, frame, retained):
        kind, device = topics.parse(topic)
        if (m := r.add(frame, source=device)) is not None:
            received.append(m)

    coord = clients(mosquitto.url, "coord")
    coord.subscribe(topics.update_filter, on_update)
    coord.connect(timeout_s=10)
    dev = clients(mosquitto.url, "dev1")
    dev.connect(timeout_s=10)
    n = dev.publish_chunked(topics.update("dev1"), payload, limit=128 * 1024)
    assert n == 9
    assert wait_until(lambda: received, 10)
    assert received == [payload]

    # the model path: one retained topic per chunk, fetched by a device that subscribes afterwards
    model = os.urandom(300_000)
    n = coord.publish_chunked(topics.model_chunk, model, limit=128 * 1024, retain=True)
    assert n == 3
    models: list[bytes] = []
    rm = chunking.Reassembler()
    late = clients(mosquitto.url, "dev2")
    late.subscribe(topics.model_filter, lambda t, f, ret: (m := rm.add(f)) is not None and models.append(m))
    late.connect(timeout_s=10)
    assert wait_until(lambda: models, 10)
    assert models == [model]


def test_handler_exception_does_not_stop_later_messages(mosquitto, clients, caplog):
    seen = Inbox()

    def fragile(topic, payload, retained):
        if payload == b"bad":
            raise ValueError("malformed message")
        seen(topic, payload, retained)

    c = clients(mosquitto.url, "fragile")
    c.subscribe("t/#", fragile)
    c.connect(timeout_s=10)
    with caplog.at_level(logging.ERROR, logger="pqsu.protocol.mqtt"):
        c.publish("t/1", b"bad")
        c.publish("t/1", b"good")
        assert seen.wait_for(b"good")
    assert c.handler_errors == 1
    assert "malformed message" in caplog.text
    c.publish("t/1", b"still alive")
    assert seen.wait_for(b"still alive")


def test_publish_from_a_handler_does_not_deadlock(mosquitto, clients):
    replies = Inbox()
    c = clients(mosquitto.url, "echo")

    def echo(topic, payload, retained):  # runs on paho's thread: publish must not wait for the PUBACK
        c.publish("reply", payload.upper(), timeout_s=30)
        c.subscribe("late/#", replies)     # nor wait for the SUBACK

    c.subscribe("ask", echo)
    c.subscribe("reply", replies)
    c.connect(timeout_s=10)
    t0 = time.monotonic()
    c.publish("ask", b"ping")
    assert replies.wait_for(b"PING", timeout_s=15)  # a handler that publishes does not deadlock paho's thread
    c.publish("late/x", b"late")
    assert replies.wait_for(b"late")
    assert c.handler_errors == 0


def test_shared_subscription_delivers_each_message_once(mosquitto, clients):
    topics = Topics("f")
    inboxes = [Inbox(), Inbox()]
    for i, inbox in enumerate(inboxes):
        w = clients(mosquitto.url, f"worker{i}")
        w.subscribe(topics.shared_update_filter("aggregators"), inbox)
        w.connect(timeout_s=10)
    pub = clients(mosquitto.url, "dev")
    pub.connect(timeout_s=10)
    sent = [b"u%d" % i for i in range(20)]
    for p in sent:
        pub.publish(topics.update("dev"), p)
    assert wait_until(lambda: sum(len(i.items) for i in inboxes) == 20)
    time.sleep(0.1)
    got = inboxes[0].payloads() + inboxes[1].payloads()
    assert sorted(got) == sorted(sent)                 # each once, across the group
    assert all(i.items for i in inboxes)               # and actually shared (Mosquitto: round robin)


_DYING_CLIENT = """
import sys, time
from pqsu.protocol.mqtt import MqttClient
c = MqttClient(sys.argv[1], "dying-device", will=(sys.argv[2], b"offline", 1, True))
c.connect(timeout_s=10)
c.publish(sys.argv[2], b"online", retain=True)
print("ready", flush=True)
time.sleep(60)
"""


def test_last_will_on_abrupt_disconnect(mosquitto, clients):
    status = Topics("f").status("dying-device")
    proc = subprocess.Popen([sys.executable, "-c", _DYING_CLIENT, mosquitto.url, status],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        assert ready and proc.stdout.readline().strip() == b"ready", proc.stderr.read1(4096) if not ready else ""
        watcher = clients(mosquitto.url, "watcher")
        inbox = Inbox()
        watcher.subscribe(Topics("f").status_filter, inbox)
        watcher.connect(timeout_s=10)
        assert inbox.wait_for(b"online")
        proc.send_signal(signal.SIGKILL)  # a board losing power: no DISCONNECT packet
        assert inbox.wait_for(b"offline", timeout_s=10)
        assert inbox.items[-1] == (status, b"offline", False)
    finally:
        proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()
    # retained: whoever looks later sees the device offline
    later = Inbox()
    c = clients(mosquitto.url, "later")
    c.subscribe(status, later)
    c.connect(timeout_s=10)
    assert later.wait_for(b"offline")


def test_clean_close_does_not_fire_last_will(mosquitto, clients):
    inbox = Inbox()
    watcher = clients(mosquitto.url, "watcher")
    watcher.subscribe("s/#", inbox)
    watcher.connect(timeout_s=10)
    with MqttClient(mosquitto.url, "polite", will=("s/polite", b"offline", 1, True)) as c:
        c.publish("s/polite", b"online")
    assert inbox.wait_for(b"online")
    time.sleep(0.3)
    assert inbox.payloads() == [b"online"]


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_persistent_session_gets_messages_sent_while_away(mosquitto, clients, protocol):
    inbox = Inbox()
    dev = clients(mosquitto.url, "sleepy", protocol=protocol)
    dev.subscribe("pqsu/f/round", inbox, qos=1)
    dev.connect(timeout_s=10)
    dev.close()
    pub = clients(mosquitto.url, "coord")
    pub.connect(timeout_s=10)
    pub.publish("pqsu/f/round", b"while you were away", qos=1)
    again = clients(mosquitto.url, "sleepy", protocol=protocol)
    again.subscribe("pqsu/f/round", inbox, qos=1)  # declared before connect: queued messages need a handler
    again.connect(timeout_s=10)
    assert inbox.wait_for(b"while you were away")
    assert inbox.items == [("pqsu/f/round", b"while you were away", False)]


def test_queued_messages_survive_a_broker_restart_with_persistence(clients):
    require_mosquitto()
    with Mosquitto(persistence=True) as broker:
        inbox = Inbox()
        dev = clients(broker.url, "sleepy")
        dev.subscribe("pqsu/f/round", inbox)
        dev.connect(timeout_s=10)
        dev.close()
        with MqttClient(broker.url, "coord") as pub:
            pub.publish("pqsu/f/round", b"queued", qos=1)
        broker.restart()  # SIGTERM: Mosquitto saves sessions and queued messages to its database
        again = clients(broker.url, "sleepy")
        again.subscribe("pqsu/f/round", inbox)
        again.connect(timeout_s=10)
        assert inbox.wait_for(b"queued"), broker.log_text()[-2000:]
        again.close()  # before the broker goes: no reconnect attempts to wait out


def test_clean_session_gets_nothing_sent_while_away(mosquitto, clients):
    inbox = Inbox()
    dev = clients(mosquitto.url, "forgetful", persistent_session=False)
    dev.subscribe("t", inbox)
    dev.connect(timeout_s=10)
    dev.close()
    with MqttClient(mosquitto.url, "coord") as pub:
        pub.publish("t", b"lost")
    again = clients(mosquitto.url, "forgetful", persistent_session=False)
    again.subscribe("t", inbox)
    again.connect(timeout_s=10)
    with MqttClient(mosquitto.url, "coord") as pub:
        pub.publish("t", b"after")
    assert inbox.wait_for(b"after")
    assert inbox.payloads() == [b"after"]


def test_message_expiry_on_mqtt5(mosquitto, clients):
    inbox = Inbox()
    dev = clients(mosquitto.url, "away")
    dev.subscribe("t", inbox)
    dev.connect(timeout_s=10)
    dev.close()
    with MqttClient(mosquitto.url, "coord") as pub:
        assert pub.is_mqtt5
        pub.publish("t", b"stale", message_expiry_s=1)
        pub.publish("t", b"fresh", message_expiry_s=60)
    time.sleep(2.2)
    again = clients(mosquitto.url, "away")
    again.subscribe("t", inbox)
    again.connect(timeout_s=10)
    assert inbox.wait_for(b"fresh")
    assert inbox.payloads() == [b"fresh"]


def test_reconnects_and_resubscribes_after_broker_restart(mosquitto, clients):
    inbox = Inbox()
    reconnects = []
    dev = clients(mosquitto.url, "survivor", on_connect=[lambda c: reconnects.append(time.monotonic())])
    dev.subscribe("pqsu/f/round", inbox)
    dev.connect(timeout_s=10)
    pub = clients(mosquitto.url, "coord")
    pub.connect(timeout_s=10)
    pub.publish("pqsu/f/round", b"before")
    assert inbox.wait_for(b"before")

    mosquitto.restart()  # no persistence: the broker forgets every session and subscription
    assert wait_until(lambda: len(reconnects) >= 2 and dev.connected, 20), mosquitto.log_text()[-2000:]
    deadline = time.monotonic() + 20
    i = 0
    while time.monotonic() < deadline and b"after" not in [p[:5] for p in inbox.payloads()]:
        pub.publish("pqsu/f/round", b"after %d" % i, timeout_s=10)  # waits for pub's own reconnect
        i += 1
        inbox.wait_for(b"after %d" % (i - 1), timeout_s=0.5)
    assert any(p.startswith(b"after") for p in inbox.payloads()), mosquitto.log_text()[-2000:]
    assert dev.handler_errors == 0


# -- against amqtt (MQTT 3.1.1 only) -------------------------------------------------------------

@pytest.fixture
def amqtt_broker():
    """An amqtt broker on its own asyncio loop in a thread; yields its URL."""
    broker_mod = pytest.importorskip("amqtt.broker")
    logging.getLogger("amqtt").setLevel(logging.CRITICAL)   # it logs every connection attempt at ERROR
    logging.getLogger("transitions").setLevel(logging.WARNING)
    port = free_port()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    state: dict = {}

    async def start():
        config = {"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
                  "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}}
        state["broker"] = broker_mod.Broker(config)
        await state["broker"].start()

    def run():
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(start())
        except Exception as exc:  # reported to the test below
            state["error"] = exc
        started.set()
        if "error" not in state:
            loop.run_forever()

    thread = threading.Thread(target=run, name="amqtt", daemon=True)
    thread.start()
    try:
        assert started.wait(10) and "error" not in state, state.get("error")
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        if "broker" in state and loop.is_running():
            asyncio.run_coroutine_threadsafe(state["broker"].shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_auto_falls_back_to_mqtt311_on_amqtt(amqtt_broker, clients):
    inbox = Inbox()
    sub = clients(amqtt_broker, "agent", v5_probe_s=1.0)
    sub.subscribe("pqsu/f/update/+", inbox)
    t0 = time.monotonic()
    sub.connect(timeout_s=10)
    # Fallen back after the 1 s probe, not by running out the 10 s connect timeout (loose: CI may be loaded).
    assert not sub.is_mqtt5 and time.monotonic() - t0 < 9
    pub = clients(amqtt_broker, "coord", protocol="3.1.1")
    pub.connect(timeout_s=10)
    pub.publish("pqsu/f/update/d1", b"hello 3.1.1", message_expiry_s=5)  # expiry ignored on 3.1.1
    assert inbox.wait_for(b"hello 3.1.1")
    n = pub.publish_chunked(Topics("f").update("d1"), os.urandom(5000), limit=1000)
    assert wait_until(lambda: len(inbox.items) == 1 + n)


# -- packet size ------------------------------------------------------------------------------

def test_mqtt5_broker_packet_limit_is_read_and_chunks_fit_under_it(clients):
    """A broker with a 64 KiB Maximum Packet Size: the client reads it from CONNACK and frames a 300 kB
    message below it, though the caller asked for 128 KiB frames."""
    require_mosquitto()
    with Mosquitto(persistence=False, extra_config="max_packet_size 65536") as broker:
        sub = clients(broker.url, "sub", persistent_session=False, protocol="5")
        inbox = Inbox()
        sub.subscribe("t/big", inbox)
        sub.connect(timeout_s=10)
        pub = clients(broker.url, "pub", persistent_session=False, protocol="5")
        pub.connect(timeout_s=10)
        assert pub.max_packet_size == 65536
        payload = bytes(range(256)) * 1200
        n = pub.publish_chunked("t/big", payload, limit=128 * 1024)
        assert n == 5 and wait_until(lambda: len(inbox.items) == n, 10)
        assert all(len(p) <= 65536 for p in inbox.payloads())
        r = chunking.Reassembler()
        assert [m for p in inbox.payloads() if (m := r.add(p, source="pub")) is not None] == [payload]
        with pytest.raises(MqttError, match="maximum packet size of 65,536 bytes: lower --chunk-limit"):
            pub.publish("t/one", bytes(70_000))


def test_mqtt311_broker_that_drops_large_publishes_is_found_by_the_echo_check(clients):
    """3.1.1 announces no limit; Mosquitto's message_size_limit drops a larger publish silently (and still
    acknowledges it), so only an echo tells."""
    require_mosquitto()
    with Mosquitto(persistence=False, extra_config="message_size_limit 4096") as broker:
        c = clients(broker.url, "probe", persistent_session=False, protocol="3.1.1")
        c.connect(timeout_s=10)
        assert c.max_packet_size is None
        assert c.echoes("pqsu/f/probe/probe", 2000, timeout_s=5)
        assert not c.echoes("pqsu/f/probe/probe", 8000, timeout_s=2)


def test_topic_matching_agrees_with_paho_on_wildcards_dollar_topics_and_shared_filters():
    """The client matches each message against its subscriptions itself (cached filters); it must route
    exactly as paho's own matcher would."""
    import itertools
    import re

    import paho.mqtt.client as paho

    from pqsu.protocol.mqtt import _filter_levels, _matches

    levels = ["a", "+", "$SYS", "", "u"]
    filters = ["/".join(p) for n in (1, 2, 3) for p in itertools.product(levels, repeat=n)]
    filters = [f for f in filters for f in (f, f + "/#", "$share/g/" + f)] + ["#", "$share/g/#"]
    topics = ["/".join(p) for n in (1, 2, 3) for p in itertools.product(["a", "$SYS", "", "u"], repeat=n)]
    for f in filters:
        bare = re.sub(r"^\$share/[^/]+/", "", f)
        for t in topics:
            assert _matches(_filter_levels(f), t.split("/")) == paho.topic_matches_sub(bare, t), (f, t)
