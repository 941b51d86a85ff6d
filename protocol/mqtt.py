"""A thin paho-mqtt 2.x wrapper for the coordinator and the agents (docs/protocol.md): a blocking
`connect()` with a clear error, MQTT 5 with a 3.1.1 fallback (amqtt); persistent sessions, so a
board back from a radio gap gets the QoS 1 messages it missed; subscriptions re-issued on every
reconnect, so a broker that lost its state costs only the reconnect; handler exceptions logged
and counted instead of killing paho's thread; publishes that return once acknowledged."""
from __future__ import annotations

import contextlib
import functools
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Callable
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from pqsu.protocol import chunking
from pqsu.protocol.errors import PqsuError

log = logging.getLogger(__name__)
_VERSIONS = {"auto": (paho.MQTTv5, paho.MQTTv311), "5": (paho.MQTTv5,), "3.1.1": (paho.MQTTv311,)}


class MqttError(PqsuError):
    """The broker cannot be reached, refused us, or did not acknowledge in time."""


@dataclass(frozen=True)
class BrokerURL:
    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> "BrokerURL":
        """mqtt://[user[:password]@]host[:port] (default 1883) or mqtts://... (TLS, default 8883)."""
        shown = re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", str(url))  # never echo a password
        try:
            u = urlsplit(url)
            port = u.port
        except (ValueError, TypeError, AttributeError) as exc:
            raise MqttError(f"invalid broker URL {shown!r}: {exc}") from None
        if u.scheme not in ("mqtt", "mqtts") or not u.hostname or u.path not in ("", "/") or u.query or u.fragment:
            raise MqttError(f"invalid broker URL {shown!r}: expected mqtt://[user:password@]host[:port] or mqtts://")
        user, password = (None if v is None else unquote(v) for v in (u.username, u.password))
        return cls(u.hostname, port or (8883 if u.scheme == "mqtts" else 1883), u.scheme == "mqtts", user, password)

    def __str__(self) -> str:  # for messages and logs: no password
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mqtt{'s' if self.tls else ''}://{self.username + '@' if self.username else ''}{host}:{self.port}"


def publish_overhead(topic: str) -> int:
    """Bytes a QoS 1 PUBLISH adds to its payload at most: fixed header with a 4-byte remaining length,
    the topic, the packet id, and MQTT 5 properties (a message expiry interval and their length)."""
    return 1 + 4 + 2 + len(topic.encode()) + 2 + 1 + 5


class MqttClient:
    """One broker connection (see the module docstring). Handlers and `on_connect` callbacks
    run on paho's network thread: keep them short, hand work to another thread."""

    def __init__(self, url: str | BrokerURL, client_id: str, *, will: tuple[str, bytes, int, bool] | None = None,
                 persistent_session: bool = True, protocol: str = "auto", tls_ca: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None, username: str | None = None,
                 password: str | None = None, on_connect: list[Callable[["MqttClient"], None]] | tuple = (),
                 keepalive_s: int = 30, session_expiry_s: int = 7 * 24 * 3600, v5_probe_s: float = 5.0):
        self.url = url if isinstance(url, BrokerURL) else BrokerURL.parse(url)
        if protocol not in _VERSIONS:
            raise MqttError(f"unknown MQTT protocol {protocol!r}: auto, 5 or 3.1.1")
        if persistent_session and not client_id:
            raise MqttError("a persistent session needs a stable, non-empty client id")
        if (tls_ca or tls_cert or tls_key) and not self.url.tls:
            raise MqttError(f"TLS files given for a plain broker URL {self.url}: use mqtts://")
        self.client_id, self.will, self.persistent, self.protocol = client_id, will, persistent_session, protocol
        self.tls_files = (tls_ca, tls_cert, tls_key)
        self.username = self.url.username if username is None else username
        self.password = self.url.password if password is None else password
        self.on_connect = list(on_connect)     # called with this client after every (re)connect
        self.keepalive_s, self.session_expiry_s, self.v5_probe_s = keepalive_s, session_expiry_s, v5_probe_s
        self.handler_errors = self.unhandled = 0  # handler/callback exceptions; messages nobody subscribed to
        self._client: paho.Client | None = None
        self._version: int | None = None
        self._connack: paho.ReasonCode | None = None
        self.max_packet_size: int | None = None  # what an MQTT 5 broker announced in CONNACK, else None
        self._subs: dict[str, tuple[Callable, int]] = {}
        self._acks: dict[int, list] = {}       # SUBSCRIBE mid -> [Event, reason codes]
        self._lock, self._connected = threading.RLock(), threading.Event()
        self._local = threading.local()        # .in_callback: inside user code on paho's thread

    is_mqtt5 = property(lambda self: self._version == paho.MQTTv5)
    connected = property(lambda self: self._connected.is_set())

    def connect(self, timeout_s: float = 30.0) -> None:
        """Connect within `timeout_s`, retrying while the broker is unreachable; else MqttError."""
        if self._client is not None:
            return
        deadline, pause, why = time.monotonic() + timeout_s, 0.2, "no attempt"
        while True:
            for version in _VERSIONS[self.protocol]:
                outcome, why = self._handshake(version, deadline)
                if outcome == "ok":
                    self._client.reconnect_delay_set(min_delay=1, max_delay=30)
                    self._client.loop_start()
                    log.info("connected to %s as %s (MQTT %s)", self.url, self.client_id,
                             "5" if self.is_mqtt5 else "3.1.1")
                    return
                if outcome == "refused":
                    raise MqttError(f"MQTT broker {self.url} refused the connection: {why}")
                if outcome == "network":
                    break                      # not a protocol question: pause and retry
            else:
                raise MqttError(f"MQTT broker {self.url} speaks none of the protocols tried ({self.protocol}): {why}")
            if time.monotonic() + pause >= deadline:
                raise MqttError(f"cannot connect to MQTT broker {self.url} within {timeout_s:g}s: {why}")
            time.sleep(pause)
            pause = min(2 * pause, 2.0)

    def _handshake(self, version: int, deadline: float) -> tuple[str, str]:
        """One CONNECT/CONNACK -> ("ok" | "network" | "protocol" | "refused", why). Runs paho's loop
        on this thread: with no network thread yet, paho cannot start reconnecting on its own."""
        c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=version,
                        clean_session=None if version == paho.MQTTv5 else not self.persistent)
        c.on_connect, c.on_disconnect = self._on_connect, self._on_disconnect
        c.on_message, c.on_subscribe = self._on_message, self._on_subscribe
        if self.username is not None:
            c.username_pw_set(self.username, self.password)
        if self.url.tls:
            try:  # ca_certs, certfile, keyfile; None: the system CAs, no client certificate
                c.tls_set(*self.tls_files)
            except (OSError, ValueError) as exc:
                raise MqttError(f"TLS setup for {self.url} failed: {exc}") from None
        if self.will:
            c.will_set(*self.will)
        kwargs, probing = {}, self.protocol == "auto" and version == paho.MQTTv5
        if version == paho.MQTTv5:             # v5 persistence = clean_start False AND a session expiry
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.session_expiry_s if self.persistent else 0
            kwargs = {"clean_start": not self.persistent, "properties": props}
        if probing:  # amqtt mis-parses a v5 CONNECT with properties and waits forever for more bytes
            deadline = min(deadline, time.monotonic() + self.v5_probe_s)
        c.connect_timeout = max(0.1, min(5.0, deadline - time.monotonic()))
        self._connack, self._version = None, version
        try:
            c.connect(self.url.host, self.url.port, self.keepalive_s, **kwargs)
        except OSError as exc:                 # refused, unreachable, DNS, TLS handshake
            return "network", f"{type(exc).__name__}: {exc}"
        while self._connack is None and time.monotonic() < deadline:
            if c.loop(timeout=0.05) != paho.MQTT_ERR_SUCCESS and self._connack is None:
                break
        rc = self._connack
        if rc is not None and not rc.is_failure:
            self._client = c
            return "ok", ""
        with contextlib.suppress(Exception):  # best effort: this attempt failed anyway
            c.disconnect()
            c.socket() and c.socket().close()
        if rc is None:  # no CONNACK: some 3.1.1-only brokers hang up on (or never answer) a v5 CONNECT
            return ("protocol" if probing else "network"), "no CONNACK"
        if probing and rc.value in (1, 0x84):  # paho reads a 3.1.1 "unacceptable protocol version" as 0x84
            return "protocol", str(rc)
        return "refused", str(rc)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connack = reason_code
        self.max_packet_size = getattr(properties, "MaximumPacketSize", None) if properties is not None else None
        if reason_code.is_failure:  # inside connect() the caller gets an MqttError instead
            log.log(logging.WARNING if self._client else logging.DEBUG, "MQTT broker %s refused %s: %s",
                    self.url, self.client_id, reason_code)
            return
        with self._lock:
            subs = [(f, qos) for f, (_, qos) in self._subs.items()]
        if subs:  # even with a session present: idempotent, and covers a broker that lost its state
            client.subscribe(subs)
        self._connected.set()
        for callback in self.on_connect:
            self._call(callback, self)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self._connected.is_set():
            log.warning("disconnected from %s (%s); paho reconnects with backoff", self.url, reason_code)
            self._connected.clear()
        with contextlib.suppress(RuntimeError):  # connect() may have cut it short; reconnects get 10 s
            client.connect_timeout = 10.0

    def close(self) -> None:
        """Disconnect cleanly (the broker does not publish the will) and stop the thread. Idempotent."""
        c, self._client = self._client, None
        if c is not None:
            self._connected.clear()
            c.disconnect()
            c.loop_stop()

    def __enter__(self) -> "MqttClient":
        self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def subscribe(self, topic_filter: str, handler: Callable[[str, bytes, bool], None], qos: int = 1,
                  timeout_s: float = 10.0) -> None:
        """Call `handler(topic, payload, retained)` on paho's thread for each matching message.
        Kept across reconnects. Connected, it returns once the broker acknowledged; else the
        filter is subscribed on connect. With a persistent session subscribe BEFORE connect():
        the messages queued while away arrive right after CONNACK and need their handler."""
        with self._lock:
            self._subs[topic_filter] = (handler, qos)
            if (c := self._client) is None or not self.connected:
                return
            rc, mid = c.subscribe(topic_filter, qos)
            if rc != paho.MQTT_ERR_SUCCESS or self._on_paho_thread:
                return  # link just dropped (on_connect will issue it), or cannot wait on paho's thread
            waiter = self._acks[mid] = [threading.Event(), None]
        ok = waiter[0].wait(timeout_s)
        self._acks.pop(mid, None)
        if not ok:
            raise MqttError(f"no SUBACK from {self.url} for {topic_filter!r} within {timeout_s:g}s "
                            "(kept: it is issued again on reconnect)")
        if any(code.is_failure for code in waiter[1]):
            raise MqttError(f"broker {self.url} refused the subscription {topic_filter!r}: {waiter[1]}")

    def unsubscribe(self, topic_filter: str) -> None:
        """Stop handling `topic_filter` at once (messages already in flight are dropped) and tell the
        broker, without waiting: a device subscribes to a model or patch only while it needs one."""
        with self._lock:
            if self._subs.pop(topic_filter, None) is None:
                return
            if (c := self._client) is not None and self.connected:
                c.unsubscribe(topic_filter)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self._lock:
            if waiter := self._acks.get(mid):
                waiter[1] = reason_codes
                waiter[0].set()
        if not waiter and any(code.is_failure for code in reason_codes):
            log.error("broker %s refused a re-subscription: %s", self.url, reason_codes)

    def _on_message(self, client, userdata, msg) -> None:
        try:
            topic = msg.topic                  # UTF-8 decoding fails on a hostile topic
        except UnicodeDecodeError:
            self.handler_errors += 1
            return
        levels = topic.split("/")
        with self._lock:
            handlers = [h for f, (h, _) in self._subs.items() if _matches(_filter_levels(f), levels)]
        self.unhandled += not handlers
        for handler in handlers:
            self._call(handler, topic, msg.payload, bool(msg.retain))

    def _call(self, fn: Callable, *args) -> None:
        """User code on paho's thread: exceptions are logged and counted, never propagated (paho
        would re-raise and end its loop); `in_callback` tells publish() not to wait."""
        self._local.in_callback = True
        try:
            fn(*args)
        except Exception:
            self.handler_errors += 1
            log.exception("MQTT handler %r failed", getattr(fn, "__name__", fn))
        finally:
            self._local.in_callback = False

    _on_paho_thread = property(lambda self: getattr(self._local, "in_callback", False))

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, timeout_s: float = 30.0,
                message_expiry_s: int | None = None) -> None:
        """Publish; return once the broker acknowledged (QoS 1), else MqttError. While the link is
        down it first waits up to `timeout_s` for paho's reconnect; after a timeout paho may still
        deliver later (receivers are idempotent). From a handler it returns at once: waiting on
        paho's thread would deadlock. `message_expiry_s`: MQTT 5 only, ignored on 3.1.1."""
        self._wait([self._send(topic, payload, qos, retain, timeout_s, message_expiry_s)], topic, timeout_s)

    def publish_chunked(self, topic: str | Callable[[int], str], payload: bytes, limit: int, retain: bool = False,
                        qos: int = 1, timeout_s: float = 30.0, message_expiry_s: int | None = None,
                        message_id: bytes | None = None) -> int:
        """Frame `payload` (chunking.split, frames <= `limit` bytes), publish all; returns the count.
        `topic`: one topic for all frames (updates) or a callable index -> topic (model chunks).
        Frames are pipelined; `timeout_s` bounds each acknowledgement wait (a stall, not the total)."""
        frames = chunking.split(payload, self.frame_limit(limit, topic if isinstance(topic, str) else topic(0)),
                                message_id)
        infos = [self._send(topic(i) if callable(topic) else topic, f, qos, retain, timeout_s, message_expiry_s)
                 for i, f in enumerate(frames)]
        self._wait(infos, topic if isinstance(topic, str) else topic(0), timeout_s)
        return len(frames)

    def echoes(self, topic: str, size: int, timeout_s: float = 5.0) -> bool:
        """Whether a `size`-byte publish on `topic` comes back to us within `timeout_s`. A 3.1.1 broker
        drops a publish above its message size limit without a word (it still acknowledges it), so
        this is the only way to learn that limit before real traffic is lost to it."""
        marker = secrets.token_bytes(16)
        payload = marker + bytes(max(0, size - len(marker)))
        back = threading.Event()

        def on_echo(t: str, data: bytes, retained: bool) -> None:
            if data[:16] == marker:
                back.set()
        self.subscribe(topic, on_echo, timeout_s=timeout_s)
        try:
            self.publish(topic, payload, timeout_s=timeout_s)
            return back.wait(timeout_s)
        finally:
            with self._lock:
                self._subs.pop(topic, None)
            if self._client is not None:
                self._client.unsubscribe(topic)

    def frame_limit(self, limit: int, topic: str) -> int:
        """The largest frame to publish on `topic`: `limit`, or less where the PUBLISH packet would
        exceed the Maximum Packet Size the broker announced (MQTT 5; 3.1.1 brokers announce none)."""
        if self.max_packet_size is None:
            return limit
        return min(limit, self.max_packet_size - publish_overhead(topic))

    def _send(self, topic, payload, qos, retain, timeout_s, expiry) -> paho.MQTTMessageInfo:
        if (c := self._client) is None:
            raise MqttError(f"not connected to {self.url}: call connect() first")
        if self.max_packet_size is not None and len(payload) + publish_overhead(topic) > self.max_packet_size:
            raise MqttError(f"a {len(payload):,}-byte message on {topic!r} exceeds the broker's maximum packet "
                            f"size of {self.max_packet_size:,} bytes: lower --chunk-limit")
        if not self._on_paho_thread and not self._connected.wait(timeout_s):
            raise MqttError(f"not connected to {self.url} (waited {timeout_s:g}s to publish on {topic!r})")
        props = Properties(PacketTypes.PUBLISH) if expiry is not None and self.is_mqtt5 else None
        if props is not None:
            props.MessageExpiryInterval = int(expiry)
        info = c.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if info.rc == paho.MQTT_ERR_QUEUE_SIZE:
            raise MqttError(f"paho's outgoing queue is full (publishing on {topic!r})")
        return info

    def _wait(self, infos: list[paho.MQTTMessageInfo], topic: str, timeout_s: float) -> None:
        if self._on_paho_thread:
            return
        for info in infos:
            if info.rc != paho.MQTT_ERR_SUCCESS:  # the link dropped between our check and the send
                raise MqttError(f"connection to {self.url} lost while publishing on {topic!r} "
                                f"({paho.error_string(info.rc)}); paho resends it after reconnecting")
            info.wait_for_publish(timeout_s)      # returns silently on timeout: check
            if not info.is_published():
                raise MqttError(f"no acknowledgement from {self.url} for a message on {topic!r} within {timeout_s:g}s")


@functools.lru_cache(maxsize=1024)
def _filter_levels(topic_filter: str) -> tuple[str, ...]:
    """A subscription's levels, `$share/<group>/` removed (a shared subscription delivers topics matching
    the rest). Cached: every message is matched against every subscription (paho's `topic_matches_sub`
    builds a matcher per call, about a twelfth of an aggregator worker's CPU)."""
    return tuple(re.sub(r"^\$share/[^/]+/", "", topic_filter).split("/"))


def _matches(levels: tuple[str, ...], topic: list[str]) -> bool:
    """MQTT filter matching as paho's `topic_matches_sub`: `+` one level, `#` the rest (its parent level
    included), and no wildcard at the first level matches a topic starting with `$`."""
    normal = not topic[0].startswith("$")
    for i, level in enumerate(levels):
        if level == "#":
            return normal or i > 0
        if i >= len(topic):
            return False
        if level == "+":
            if not normal and i == 0:
                return False
        elif level != topic[i]:
            return False
    return len(levels) == len(topic)
