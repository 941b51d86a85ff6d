"""Identity and access scenarios: attacks on a fleet behind a TLS Mosquitto with per-device
credentials and the fleet ACL (`pqsu.tools.lab.secure_broker`), and a real coordinator that checks
every update's signature (`pqsu cloud --keys`).

Three scenarios, each returning what it measured (tests/e2e/test_security.py asserts on them, the
reliability report tabulates them: `pqsu.tools.reliability.security`):

- `connection_checks`: who can connect at all (plain TCP, no or a foreign certificate, a wrong
  password, against a device's real credentials);
- `acl_checks`: what a connected device can publish and read (another device's update and status
  topics, the coordinator's round and model topics, other devices' updates);
- `fleet_run`: `pqsu cloud` and a `pqsu edge run` agent over TLS, plus two devices scripted here:
  updates forged as another device under the strict ACL and under a deliberately permissive
  one, then a device removed from the keys file and from the broker while the run goes on.

Every process is stopped and every wait is bounded.
"""
from __future__ import annotations

import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pqsu.protocol import chunking, codec
from pqsu.protocol.codec import TensorBlock, Update
from pqsu.protocol.errors import PqsuError
from pqsu.protocol.messages import RoundTask, Status
from pqsu.protocol.mqtt import MqttClient, MqttError
from pqsu.protocol.topics import Topics
from pqsu.tools.lab.fleet_lab import TINY, flags, pqsu, read_metrics, write_shards
from pqsu.tools.lab.observer import Observer, message_is, round_announced
from pqsu.tools.lab.pki import make_pki
from pqsu.protocol.process import reap
from pqsu.tools.lab.secure_broker import COORDINATOR, MONITOR, SecureBroker

FLEET = "secure"
AGENT, REMOVED, HOLDER = "dev-000", "dev-001", "dev-002"  # a real agent; two devices scripted here
LIMIT = 128 * 1024


def row(check: str, layer: str, attempts: int, through: int, **extra) -> dict:
    return {"check": check, "layer": layer, "attempts": attempts, "through": through, **extra}


# -- who can connect ----------------------------------------------------------------------------
def connection_checks(folder: Path, repeats: int = 1, timeout_s: float = 1.5) -> list[dict]:
    """Connection attempts per kind of credentials: `through` = how many got a CONNACK."""
    with SecureBroker(folder / "conn", FLEET, ["dev-a", "dev-b"]) as sb:
        rogue = make_pki(folder / "rogue", ["dev-a"])
        plain = f"mqtt://127.0.0.1:{sb.port}"
        cases = {
            "device certificate and password over TLS (control)": lambda i: sb.client("dev-a", f"ok-{i}"),
            "plain TCP, no TLS": lambda i: sb.client("dev-a", f"plain-{i}", url=plain),
            "TLS without a client certificate": lambda i: sb.client("dev-a", f"nocert-{i}", cert=False),
            "certificate from another CA": lambda i: MqttClient(
                sb.url, f"rogue-{i}", tls_ca=str(sb.pki.ca.cert), tls_cert=str(rogue.clients["dev-a"].cert),
                tls_key=str(rogue.clients["dev-a"].key), username="dev-a", password=sb.identities["dev-a"].password,
                persistent_session=False),
            "wrong password": lambda i: sb.client("dev-a", f"badpw-{i}", password="not-the-password"),
            # Certificate and user name are not bound to each other: the password picks the identity.
            "device A's certificate with device B's user and password": lambda i: MqttClient(
                sb.url, f"mixed-{i}", tls_ca=str(sb.pki.ca.cert), tls_cert=str(sb.identities["dev-a"].cert),
                tls_key=str(sb.identities["dev-a"].key), username="dev-b",
                password=sb.identities["dev-b"].password, persistent_session=False),
        }

        def attempt(make) -> tuple[bool, str]:
            client = make()
            try:
                client.connect(timeout_s=timeout_s)
                return True, ""
            except MqttError as exc:
                return False, str(exc).split(": ")[-1]
            finally:
                client.close()

        jobs = [(name, i) for name in cases for i in range(repeats)]
        with ThreadPoolExecutor(max_workers=min(8, len(jobs))) as pool:  # refusals wait out the timeout: overlap them
            outcomes = list(pool.map(lambda job: attempt(lambda: cases[job[0]](job[1])), jobs))
    rows = []
    for name in cases:
        mine = [o for (n, _), o in zip(jobs, outcomes) if n == name]
        errors = sorted({e for ok, e in mine if not ok})
        rows.append(row(name, "broker", repeats, sum(ok for ok, _ in mine), error="; ".join(errors)))
    return rows


# -- what a connected device may do -----------------------------------------------------------------
def acl_checks(folder: Path, repeats: int = 1) -> list[dict]:
    """What device A can publish where others read it, and what it can read of others:
    `through` = messages delivered to the reader."""
    t = Topics(FLEET)
    with SecureBroker(folder / "acl", FLEET, ["dev-a", "dev-b"]) as sb:
        coord = Observer(sb.client(COORDINATOR, "acl-coordinator", persistent_session=False),
                        t.update_filter, t.status_filter, t.round)
        b = Observer(sb.client("dev-b", persistent_session=False), t.round, t.model_filter)
        a = Observer(sb.client("dev-a", persistent_session=False), t.update_filter, t.status_filter, t.round)
        try:
            offline_b = Status("dev-b", "offline").to_json()
            for i in range(repeats):
                a.client.publish_chunked(t.update("dev-b"), b"forged update %d" % i, LIMIT)
                a.client.publish(t.status("dev-b"), offline_b, retain=True)
                a.client.publish(t.round, b'{"v": 1, "type": "done", "rounds": 0, "model_id": "forged"}', retain=True)
                a.client.publish(t.model_chunk(0), b"forged model chunk", retain=True)
            for i in range(repeats):  # the control, last: once the coordinator has these, it has all of A's
                a.client.publish_chunked(t.update("dev-a"), b"own update %d" % i, LIMIT)
            for i in range(repeats):
                b.client.publish_chunked(t.update("dev-b"), b"b's update %d" % i, LIMIT)
                b.client.publish(t.status("dev-b"), Status("dev-b", "online").to_json(), retain=True)
            barrier = b"barrier"  # the coordinator's, after everything above was acknowledged by the broker
            coord.client.publish(t.round, barrier)
            at_coord, _ = coord.collect(message_is(t.round, barrier), 10)
            at_b, _ = b.collect(message_is(t.round, barrier), 10)
            at_a, _ = a.collect(message_is(t.round, barrier), 10)
        finally:
            for w in (a, b, coord):
                w.close()

    def n(seen: list, topic: str) -> int:
        return sum(tp == topic for tp, _ in seen)
    own = n(at_coord, t.update("dev-a"))
    return [
        row("publish on its own update topic (control)", "broker", repeats, own),
        row("publish on another device's update topic", "broker", repeats,
             sum(tp == t.update("dev-b") and b"forged update" in p for tp, p in at_coord)),
        row("publish another device's status (offline)", "broker", repeats,
             sum(tp == t.status("dev-b") and p == offline_b for tp, p in at_coord)),
        row("publish a round announcement (retained)", "broker", repeats, n(at_b, t.round)),
        row("publish a model chunk (retained)", "broker", repeats, n(at_b, t.model_chunk(0))),
        row("read another device's updates", "broker", repeats, n(at_a, t.update("dev-b"))),
        row("read another device's statuses", "broker", repeats, n(at_a, t.status("dev-b"))),
    ]


# -- a real fleet under attack ----------------------------------------------------------------------
def forged(device: str, round_: int, model_id: str, key: bytes | None, n: int) -> bytes:
    """An update that names `device`, signed with `key` (None: unsigned); `n` makes each one distinct."""
    block = TensorBlock.sparse("forged.weight", (8,), [n % 8], [1.0])
    return codec.encode(Update(round=round_, device_id=device, model_id=model_id, num_samples=100 + n, loss=0.5,
                               blocks=(block,)), key=key)


def _claims(seen: list, topic: str) -> list[str]:
    """The device ids named by the updates among `seen` frames on `topic`."""
    reassembler, named = chunking.Reassembler(), []
    for tp, payload in seen:
        if tp == topic and (message := reassembler.add(payload, source=tp)) is not None:
            named.append(codec.peek_header(message).device_id)
    return named


def _device(sb: SecureBroker, device: str) -> MqttClient:
    """A device scripted here: connected with its credentials and last will, online."""
    t = Topics(FLEET)
    client = sb.client(device, will=(t.status(device), Status(device, "offline").to_json(), 1, True),
                       persistent_session=False)
    client.connect(timeout_s=15)
    client.publish(t.status(device), Status(device, "online").to_json(), retain=True)
    return client


def fleet_run(folder: Path, repeats: int = 1, timeout_s: float = 180.0) -> dict:
    """`pqsu cloud --keys` and a `pqsu edge run` agent over TLS for 2 rounds, with a device that
    forges (the agent's credentials), a device removed after round 1 (`REMOVED`) and one that
    holds each round open until the attacks are done (`HOLDER`). Returns what was measured."""
    t, out = Topics(FLEET), folder / "cloud"
    with SecureBroker(folder / "fleet", FLEET, [AGENT, REMOVED, HOLDER]) as sb:
        shard = write_shards(folder / "devices", 3)[0]  # dev-000's, split as `pqsu run` splits 3 clients
        keys = {d: sb.identities[d].hmac_key for d in (AGENT, REMOVED)}
        cloud = pqsu(["cloud", *sb.cli_flags(COORDINATOR), "--fleet", FLEET, "--keys", str(sb.keys_path),
                      "--min-devices", "3", "--join-timeout", str(timeout_s), "--round-timeout", "60",
                      "--rounds", "2", "--out", str(out), *flags(clients=3, **TINY)], folder, "cloud")
        agent = pqsu(["edge", "run", *sb.cli_flags(AGENT), "--fleet", FLEET, "--device-id", AGENT, "--data",
                      str(shard), "--state-dir", str(shard.parent), "--key-file", str(sb.identities[AGENT].key_file),
                      "--torch-threads", "1", "--no-http"], folder, AGENT)
        clients: list[MqttClient] = []
        history: list[tuple[str, bytes]] = []
        try:
            mon = Observer(sb.client(MONITOR, persistent_session=False), t.round, t.update_filter, t.status_filter)
            clients.append(mon.client)
            removed, holder = _device(sb, REMOVED), _device(sb, HOLDER)
            attacker = sb.client(AGENT, f"{AGENT}-attacker", persistent_session=False)
            attacker.connect(timeout_s=15)
            clients += [removed, holder, attacker]

            def failure(what: str) -> PqsuError:
                return PqsuError(f"{what}\n{cloud.tail()}\n{agent.tail()}")

            def announced(r: int) -> RoundTask:
                seen, hit = mon.collect(round_announced(r), timeout_s, alive=lambda: cloud.running)
                history.extend(seen)
                if hit is None:
                    raise failure(f"round {r} was never announced")
                return RoundTask.from_json(hit[1])

            def barrier(tag: str) -> list:
                """Everything the monitor got up to now: the holder's status goes last through the broker."""
                payload = Status(HOLDER, "online", detail=tag).to_json()
                holder.publish(t.status(HOLDER), payload, retain=True)
                seen, hit = mon.collect(message_is(t.status(HOLDER), payload), 15)
                history.extend(seen)
                if hit is None:
                    raise failure(f"the monitor never saw barrier {tag!r}")
                return seen

            serial = itertools.count()  # every forged payload distinct: a repeat would only count as a duplicate

            def send(client: MqttClient, topic: str, device: str, task: RoundTask, key: bytes | None) -> None:
                for _ in range(repeats):
                    client.publish_chunked(topic, forged(device, task.round, task.model_id, key, next(serial)), LIMIT)

            task1 = announced(1)
            send(attacker, t.update(REMOVED), REMOVED, task1, keys[AGENT])   # strict ACL: the broker drops these
            send(attacker, t.update(AGENT), REMOVED, task1, keys[AGENT])     # on its own topic, naming another
            strict = barrier("strict")
            sb.set_acl(permissive=True)
            send(attacker, t.update(REMOVED), REMOVED, task1, keys[AGENT])   # signed with the forger's key
            send(attacker, t.update(REMOVED), REMOVED, task1, None)          # unsigned
            permissive = barrier("permissive")
            sb.set_acl(permissive=False)
            sb.write_keys([AGENT, HOLDER])  # REMOVED leaves the fleet: effective at the next round start
            for client, device in ((removed, REMOVED), (holder, HOLDER)):
                client.publish(t.status(device), Status(device, "skipped", 1).to_json(), retain=True)

            task2 = announced(2)
            send(removed, t.update(REMOVED), REMOVED, task2, keys[REMOVED])  # its own, correctly signed
            after_keys = barrier("keys")
            sb.remove(REMOVED)
            deadline = time.monotonic() + 10
            while removed.connected and time.monotonic() < deadline:
                time.sleep(0.05)
            kicked = not removed.connected
            removed.close()
            reconnected = 0
            for i in range(repeats):
                again = sb.client(REMOVED, f"{REMOVED}-again-{i}", persistent_session=False)
                try:
                    again.connect(timeout_s=5)
                    reconnected += 1
                except MqttError:
                    pass
                finally:
                    again.close()
            holder.publish(t.status(HOLDER), Status(HOLDER, "skipped", 2).to_json(), retain=True)

            cloud_code, agent_code = cloud.wait(timeout_s), agent.wait(30)
            seen, _ = mon.collect(lambda *_: False, 0.5)
            history.extend(seen)
        finally:
            for c in clients:
                c.close()
            reap([agent, cloud], grace_s=10, signal_first=True)
        metrics = read_metrics(out)
    uploaded = {Status.from_json(p).round for tp, p in history
                if tp == t.status(AGENT) and p and Status.from_json(p).state == "uploaded"}
    return {
        "cloud_exit": cloud_code, "agent_exit": agent_code, "logs": cloud.tail() + "\n" + agent.tail(),
        "rounds": metrics, "selected": [list(task1.devices), list(task2.devices)],
        "agent_uploaded_rounds": sorted(uploaded), "repeats": repeats,
        "through": {"strict_other_topic": _claims(strict, t.update(REMOVED)),
                    "own_topic_naming_other": [d for d in _claims(strict, t.update(AGENT)) if d != AGENT],
                    "permissive_other_topic": _claims(permissive, t.update(REMOVED)),
                    "removed_signed": _claims(after_keys, t.update(REMOVED))},
        "removed_kicked": kicked, "removed_reconnected": reconnected,
        "removed_will_seen": any(tp == t.status(REMOVED) and p and Status.from_json(p).state == "offline"
                                 for tp, p in history),
    }

