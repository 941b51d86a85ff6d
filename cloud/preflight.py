"""What the coordinator learns from the broker before any work: it is there, it speaks MQTT, it passes
a frame of the chunk limit, and no other coordinator holds the fleet (the lease: cloud/lease.py).

Read-only and quick (one short clean-session connection): pre-training can take minutes, and a run
must not spend them only to find a wrong URL, a broker that drops its model frames, or a fleet that
another coordinator is already driving.
"""
from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass

from pqsu.cloud.lease import read_lease
from pqsu.protocol import chunking
from pqsu.protocol.errors import PqsuError
from pqsu.protocol.messages import Lease
from pqsu.protocol.mqtt import MqttClient, MqttError
from pqsu.protocol.topics import Topics, TopicError

log = logging.getLogger(__name__)
RETAINED_WAIT_S = 1.5  # retained messages follow the SUBACK at once; this is slack for a slow link
ECHO_WAIT_S = 3.0      # a round trip through the broker; a dropped probe costs all of it


@dataclass(frozen=True)
class BrokerFacts:
    mqtt5: bool
    max_packet_size: int | None   # announced by an MQTT 5 broker, else None
    chunk_limit: int              # the frame size to use: the requested limit, or less to fit the broker
    lease: Lease | None           # the retained lease found (ours from an earlier run of the same job, or None)
    model_chunks: int             # retained model frames found (an earlier job's are cleared when ours go out)


def check_chunk_limit(limit: int) -> None:
    if not isinstance(limit, int) or limit <= chunking.HEADER_SIZE:
        raise PqsuError(f"--chunk-limit {limit} is too small: a frame needs {chunking.HEADER_SIZE} bytes of header "
                        "and at least 1 of data")


def preflight(topics: Topics, chunk_limit: int, *, job: str, take_over: bool = False, **client_kwargs) -> BrokerFacts:
    """Facts about the broker, or PqsuError naming what is wrong and the flag that fixes it.
    `client_kwargs` are MqttClient's (url, protocol, TLS files, username, password)."""
    check_chunk_limit(chunk_limit)
    client_id = f"pqsu-preflight-{secrets.token_hex(4)}"
    client = MqttClient(client_id=client_id, persistent_session=False, **client_kwargs)
    leases: list[bytes] = []
    chunks: set[int] = set()

    def on_lease(topic: str, payload: bytes, retained: bool) -> None:
        leases.append(payload)

    def on_model(topic: str, payload: bytes, retained: bool) -> None:
        try:
            kind, index = topics.parse(topic)
        except TopicError:
            return
        if payload and retained:
            chunks.add(int(index))
    try:
        client.connect(timeout_s=15)
        client.subscribe(topics.lease, on_lease)
        client.subscribe(topics.model_filter, on_model)
        time.sleep(RETAINED_WAIT_S)
        probe = topics.probe(client_id)  # longer than any model topic: what passes here passes there
        limit = client.frame_limit(chunk_limit, probe)
        if limit <= chunking.HEADER_SIZE:
            raise PqsuError(f"the broker {client.url} allows packets of {client.max_packet_size} bytes, too small for "
                            f"a {chunking.HEADER_SIZE}-byte frame header")
        if limit < chunk_limit:
            log.info("broker %s allows packets of at most %d bytes: frames of %d bytes instead of --chunk-limit %d",
                     client.url, client.max_packet_size, limit, chunk_limit)
        if not client.echoes(probe, limit, timeout_s=ECHO_WAIT_S):
            bounds = _size_limit(client, probe, limit)
            if bounds is None:
                raise PqsuError(f"the broker {client.url} passed not even a small message back: is "
                                f"{topics.prefix}/probe/+ missing from the coordinator's ACL?")
            raise PqsuError(f"the broker {client.url} did not pass a {limit:,}-byte message (its message size limit "
                            f"is between {bounds[0]:,} and {bounds[1]:,} bytes): use --chunk-limit {bounds[0]}")
        facts = BrokerFacts(client.is_mqtt5, client.max_packet_size, limit, read_lease(leases), len(chunks))
    except MqttError as exc:
        raise PqsuError(str(exc)) from None
    finally:
        client.close()
    if facts.lease is not None and facts.lease.job != job and not take_over:
        raise PqsuError(f"fleet {topics.fleet!r} is driven by another coordinator: {facts.lease.describe()}; "
                        "stop it, or pass --take-over to replace it")
    return facts


def _size_limit(client: MqttClient, probe: str, limit: int, steps: int = 12) -> tuple[int, int] | None:
    """(passes, dropped): payload sizes around the broker's limit, found by bisection to within
    limit / 2**steps; None when not even a frame header's worth passes (the ACL, not the size). Only on
    the error path: a dropped probe costs its whole (short) wait."""
    lo, hi = chunking.HEADER_SIZE + 1, limit
    if not client.echoes(probe, lo, timeout_s=2):
        return None
    for _ in range(steps):
        if hi - lo <= 1:
            break
        mid = (lo + hi) // 2
        if client.echoes(probe, mid, timeout_s=0.5):
            lo = mid
        else:
            hi = mid
    return lo, hi
