import dataclasses

import pytest

from pqsu.protocol.errors import PqsuError
from pqsu.protocol.topics import Topics, TopicError


def test_builders():
    t = Topics("lab-1")
    assert t.prefix == "pqsu/lab-1"
    assert t.round == "pqsu/lab-1/round"
    assert t.model_chunk(0) == "pqsu/lab-1/model/0"
    assert t.model_chunk(17) == "pqsu/lab-1/model/17"
    assert t.model_filter == "pqsu/lab-1/model/+"
    assert t.update("pi-07.a") == "pqsu/lab-1/update/pi-07.a"
    assert t.update_filter == "pqsu/lab-1/update/+"
    assert t.shared_update_filter("agg") == "$share/agg/pqsu/lab-1/update/+"
    assert t.status("jetson_1") == "pqsu/lab-1/status/jetson_1"
    assert t.status_filter == "pqsu/lab-1/status/+"
    assert t.metrics == "pqsu/lab-1/metrics"


def test_frozen_and_equal():
    t = Topics("f")
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.fleet = "g"
    assert Topics("f") == t and hash(Topics("f")) == hash(t)


@pytest.mark.parametrize("topic,expected", [
    ("pqsu/f/round", ("round", None)),
    ("pqsu/f/metrics", ("metrics", None)),
    ("pqsu/f/model/0", ("model", 0)),
    ("pqsu/f/model/4294967295", ("model", 2**32 - 1)),
    ("pqsu/f/update/pi-1", ("update", "pi-1")),
    ("pqsu/f/status/a.b_c-D", ("status", "a.b_c-D")),
])
def test_parse(topic, expected):
    assert Topics("f").parse(topic) == expected


def test_parse_round_trips_builders():
    t = Topics("F_1")
    assert t.parse(t.update("d")) == ("update", "d")
    assert t.parse(t.status("d")) == ("status", "d")
    assert t.parse(t.model_chunk(3)) == ("model", 3)
    assert t.parse(t.round) == ("round", None)
    assert t.parse(t.metrics) == ("metrics", None)


@pytest.mark.parametrize("topic", [
    "pqsu/other/round",          # another fleet
    "pqsu/f",                    # the prefix alone
    "pqsu/f/",
    "pqsu/f/round/x",
    "pqsu/f/update",
    "pqsu/f/update/",
    "pqsu/f/update/a/b",
    "pqsu/f/update/bad+id",
    "pqsu/f/status/" + "x" * 65,
    "pqsu/f/model/01",           # non-canonical index
    "pqsu/f/model/-1",
    "pqsu/f/model/x",
    "pqsu/f/model/4294967296",   # above u32
    "pqsu/f/unknown",
    "$share/g/pqsu/f/update/d",  # a filter, never a message topic
    "other/f/round",
    "",
])
def test_parse_foreign(topic):
    with pytest.raises(TopicError):
        Topics("f").parse(topic)


def test_parse_non_str():
    with pytest.raises(TopicError):
        Topics("f").parse(b"pqsu/f/round")


@pytest.mark.parametrize("fleet", ["", "a/b", "a+", "#", "a.b", "x" * 65, "é", "a b", "a\n", None, 5])
def test_invalid_fleet(fleet):
    with pytest.raises(TopicError) as e:
        Topics(fleet)
    assert isinstance(e.value, PqsuError)


@pytest.mark.parametrize("device", ["", "a/b", "+", "#", "$sys", "x" * 65, "a b", "a\n", None])
def test_invalid_device(device):
    t = Topics("f")
    with pytest.raises(TopicError):
        t.update(device)
    with pytest.raises(TopicError):
        t.status(device)


def test_valid_limits():
    assert Topics("x" * 64).status("y" * 64).endswith("/" + "y" * 64)


@pytest.mark.parametrize("index", [-1, 2**32, 1.0, "1", True])
def test_invalid_model_index(index):
    with pytest.raises(TopicError):
        Topics("f").model_chunk(index)


@pytest.mark.parametrize("group", ["", "a/b", "+", "x" * 65])
def test_invalid_share_group(group):
    with pytest.raises(TopicError):
        Topics("f").shared_update_filter(group)


def test_update_partitions_put_a_device_under_one_partition_every_side_computes():
    from pqsu.protocol.topics import partition_of

    t = Topics("f")
    topic = t.update("pi-7", 8)
    p = partition_of("pi-7", 8)
    assert topic == f"pqsu/f/update/{p}/pi-7" and t.parse(topic) == ("update", "pi-7")
    assert t.update("pi-7", 0) == "pqsu/f/update/pi-7"
    assert t.partition_filter(p) == f"pqsu/f/update/{p}/+"
    assert sorted({partition_of(f"dev-{i}", 8) for i in range(200)}) == list(range(8))  # every partition used
    assert t.parse(t.agg("w-1", "partial")) == ("agg-partial", "w-1")
    for bad in ("pqsu/f/update/01/pi", "pqsu/f/update/4096/pi", "pqsu/f/agg/w/other"):
        with pytest.raises(TopicError):
            t.parse(bad)
    with pytest.raises(TopicError):
        t.update("pi-7", 4097)
