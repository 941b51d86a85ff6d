"""The coordinator's look at the broker before any work, against a real Mosquitto: the packet limit it
announces or enforces silently, and a fleet that another coordinator holds."""
from __future__ import annotations

import pytest

from pqsu.cloud.preflight import check_chunk_limit, preflight
from pqsu.protocol.errors import PqsuError
from pqsu.protocol.messages import Lease
from pqsu.protocol.mqtt import MqttClient
from pqsu.protocol.topics import Topics
from tests.support.mosquitto import Mosquitto, require_mosquitto

TOPICS = Topics("farm")


@pytest.fixture
def broker():
    require_mosquitto()
    with Mosquitto(persistence=False) as b:
        yield b


def _retain(url: str, topic: str, payload: bytes) -> None:
    with MqttClient(url, "setter", persistent_session=False) as c:
        c.publish(topic, payload, retain=True)


def test_a_free_fleet_on_a_plain_broker(broker):
    facts = preflight(TOPICS, 128 * 1024, job="j1", url=broker.url)
    assert facts.mqtt5 and facts.max_packet_size is None and facts.chunk_limit == 128 * 1024
    assert facts.lease is None and facts.model_chunks == 0


def test_frames_are_sized_under_an_mqtt5_broker_packet_limit():
    require_mosquitto()
    with Mosquitto(persistence=False, extra_config="max_packet_size 65536") as b:
        facts = preflight(TOPICS, 128 * 1024, job="j1", url=b.url, protocol="5")
    assert facts.max_packet_size == 65536 and 65_000 < facts.chunk_limit < 65536


def test_a_broker_that_silently_drops_large_publishes_is_named_with_the_flag():
    require_mosquitto()
    with Mosquitto(persistence=False, extra_config="message_size_limit 4096") as b:
        with pytest.raises(PqsuError, match=r"did not pass a 131,072-byte message \(its message size limit is "
                                            r"between 4,0\d\d and 4,\d+ bytes\): use --chunk-limit 40\d\d$"):
            preflight(TOPICS, 128 * 1024, job="j1", url=b.url, protocol="3.1.1")
        assert preflight(TOPICS, 4000, job="j1", url=b.url, protocol="3.1.1").chunk_limit == 4000


def test_another_coordinators_lease_is_refused_unless_taken_over(broker):
    other = Lease(job="j0", coordinator="pqsu-coordinator-farm-aaaaaa", host="cloud-1", pid=77, started=0.0)
    _retain(broker.url, TOPICS.lease, other.to_json())
    with pytest.raises(PqsuError, match=r"driven by another coordinator: pqsu-coordinator-farm-aaaaaa "
                                        r"\(host cloud-1, pid 77, job j0.*--take-over"):
        preflight(TOPICS, 4096, job="j1", url=broker.url)
    assert preflight(TOPICS, 4096, job="j1", url=broker.url, take_over=True).lease == other
    assert preflight(TOPICS, 4096, job="j0", url=broker.url).lease == other  # our own job, resumed


def test_an_earlier_jobs_retained_model_frames_are_counted(broker):
    for i in range(3):
        _retain(broker.url, TOPICS.model_chunk(i), b"frame")
    assert preflight(TOPICS, 4096, job="j1", url=broker.url).model_chunks == 3


@pytest.mark.parametrize("limit", [0, 60, 69])
def test_a_chunk_limit_without_room_for_data_is_refused(limit):
    with pytest.raises(PqsuError, match="too small"):
        check_chunk_limit(limit)
