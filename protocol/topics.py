"""MQTT topic names of one fleet: every topic lives under `pqsu/<fleet>/`.

One place builds and parses them, so the coordinator and the agents cannot drift apart
(docs/protocol.md, "MQTT topics"). Ids are validated against a conservative character set:
no `/`, `+`, `#` or `$` can reach a topic, so an id can never widen a subscription or
escape its fleet.
"""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

from pqsu.protocol.errors import PqsuError

ROOT = "pqsu"
_FLEET = re.compile(r"[A-Za-z0-9_-]{1,64}")
_DEVICE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_INDEX = re.compile(r"0|[1-9][0-9]{0,9}")  # canonical decimal: one topic per chunk, never two spellings
MAX_INDEX = 2**32 - 1                       # chunk indices are u32 in the frame header
MAX_PARTITIONS = 4096                       # update partitions (aggregator workers own some each)


AGG_KINDS = ("claim", "grant", "partial", "status")


class TopicError(PqsuError):
    """An invalid fleet, device or group id, or a topic that is not one of this fleet's."""


def check_fleet(fleet: str) -> str:
    if not isinstance(fleet, str) or not _FLEET.fullmatch(fleet):
        raise TopicError(f"invalid fleet id {fleet!r}: 1-64 characters of A-Z a-z 0-9 _ -")
    return fleet


def check_device(device: str) -> str:
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise TopicError(f"invalid device id {device!r}: 1-64 characters of A-Z a-z 0-9 _ . -")
    return device


def partition_of(device: str, partitions: int) -> int:
    """The update partition of `device` among `partitions`: CRC32 of its id, so every side agrees."""
    return zlib.crc32(check_device(device).encode()) % partitions


def check_partitions(partitions: int) -> int:
    if not isinstance(partitions, int) or isinstance(partitions, bool) or not 0 <= partitions <= MAX_PARTITIONS:
        raise TopicError(f"invalid partition count {partitions!r}: an int in [0, {MAX_PARTITIONS}] (0: none)")
    return partitions


_MODEL_ID = re.compile(r"[0-9a-f]{32}")


def check_model_id(model_id: str) -> str:
    if not isinstance(model_id, str) or not _MODEL_ID.fullmatch(model_id):
        raise TopicError(f"invalid model id {model_id!r}: 32 lowercase hex digits")
    return model_id


def _check_index(index: int) -> int:
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index <= MAX_INDEX:
        raise TopicError(f"invalid model chunk index {index!r}: an int in [0, 2^32)")
    return index


@dataclass(frozen=True)
class Topics:
    """The topics of fleet `fleet`. Properties are fixed topics/filters; methods take an id."""

    fleet: str

    def __post_init__(self) -> None:
        check_fleet(self.fleet)

    @property
    def prefix(self) -> str:
        return f"{ROOT}/{self.fleet}"

    @property
    def round(self) -> str:
        """Retained: the current RoundTask JSON, or the "done" message after the last round."""
        return f"{self.prefix}/round"

    def model_chunk(self, index: int) -> str:
        """Retained: frame `index` of the current model file (chunk framing, docs/protocol.md)."""
        return f"{self.prefix}/model/{_check_index(index)}"

    @property
    def model_filter(self) -> str:
        return f"{self.prefix}/model/+"

    def patch_chunk(self, base: str, index: int) -> str:
        """Retained: frame `index` of the patch from model `base` to the current model."""
        return f"{self.prefix}/patch/{check_model_id(base)}/{_check_index(index)}"

    def patch_filter(self, base: str) -> str:
        return f"{self.prefix}/patch/{check_model_id(base)}/+"

    def update(self, device: str, partitions: int = 0) -> str:
        """Not retained: every frame of `device`'s update; with `partitions` (the round announcement's),
        under its partition, `update/<p>/<device>`, which one aggregator worker reads."""
        if check_partitions(partitions):
            return f"{self.prefix}/update/{partition_of(device, partitions)}/{device}"
        return f"{self.prefix}/update/{check_device(device)}"

    def partition_filter(self, partition: int) -> str:
        """What the aggregator worker owning `partition` subscribes to."""
        if not isinstance(partition, int) or isinstance(partition, bool) or not 0 <= partition < MAX_PARTITIONS:
            raise TopicError(f"invalid partition {partition!r}: an int in [0, {MAX_PARTITIONS})")
        return f"{self.prefix}/update/{partition}/+"

    def agg(self, worker: str, kind: str) -> str:
        """An aggregator worker's topics: `claim`, `partial` (worker -> coordinator), `grant` (back) and
        `status` (retained; last will: offline). docs/protocol.md, "Aggregator workers"."""
        if kind not in AGG_KINDS:
            raise TopicError(f"unknown aggregator topic {kind!r}: one of {', '.join(AGG_KINDS)}")
        return f"{self.prefix}/agg/{check_device(worker)}/{kind}"

    def agg_filter(self, kind: str) -> str:
        return f"{self.prefix}/agg/+/{kind}"

    @property
    def agg_plan(self) -> str:
        """Retained: what workers need to judge updates (model shapes, aggregator, partitions, job)."""
        return f"{self.prefix}/agg/plan"

    @property
    def agg_close(self) -> str:
        """Not retained: the coordinator asks every worker for its last partial of a round."""
        return f"{self.prefix}/agg/close"

    @property
    def update_filter(self) -> str:
        return f"{self.prefix}/update/+"

    def shared_update_filter(self, group: str) -> str:
        """MQTT 5 shared subscription: the broker spreads updates over a group's subscribers.

        Caveat: brokers pick a subscriber per *message* (Mosquitto: round robin), so the frames
        of a multi-frame update can land on different workers and never reassemble. Use it
        only when updates fit one frame (chunk limit above the largest update) or with a
        broker whose shared-subscription strategy is sticky per publishing client.
        """
        if not isinstance(group, str) or not _FLEET.fullmatch(group):
            raise TopicError(f"invalid shared subscription group {group!r}: 1-64 characters of A-Z a-z 0-9 _ -")
        return f"$share/{group}/{self.update_filter}"

    def status(self, device: str) -> str:
        """Retained: `device`'s Status JSON; its last will sets state "offline"."""
        return f"{self.prefix}/status/{check_device(device)}"

    @property
    def status_filter(self) -> str:
        return f"{self.prefix}/status/+"

    @property
    def lease(self) -> str:
        """Retained: the Lease of the coordinator driving the fleet; its last will clears it."""
        return f"{self.prefix}/lease"

    def probe(self, client_id: str) -> str:
        """Not retained: a client's own echo test (does the broker pass a publish this large?)."""
        return f"{self.prefix}/probe/{check_device(client_id)}"

    @property
    def metrics(self) -> str:
        """Retained: the last closed round's metrics JSON."""
        return f"{self.prefix}/metrics"

    def parse(self, topic: str) -> tuple[str, str | int | None]:
        """(kind, arg) of an incoming topic of this fleet.

        ("round", None), ("model", index: int), ("update", device) (also under a partition),
        ("status", device), ("metrics", None), ("lease", None), ("agg-<kind>", worker); anything else
        raises TopicError.
        """
        if not isinstance(topic, str):
            raise TopicError(f"topic must be a str, got {type(topic).__name__}")
        head = self.prefix + "/"
        if not topic.startswith(head):
            raise TopicError(f"topic {topic!r} is not under {head}")
        parts = topic[len(head):].split("/")
        if parts in (["round"], ["metrics"], ["lease"]):
            return parts[0], None
        if len(parts) == 2 and parts[0] in ("update", "status"):
            if not _DEVICE.fullmatch(parts[1]):
                raise TopicError(f"topic {topic!r}: invalid device id {parts[1]!r}")
            return parts[0], parts[1]
        if len(parts) == 3 and parts[0] == "update" and _INDEX.fullmatch(parts[1]) \
                and int(parts[1]) < MAX_PARTITIONS and _DEVICE.fullmatch(parts[2]):
            return "update", parts[2]
        if len(parts) == 3 and parts[0] == "agg" and parts[2] in AGG_KINDS and _DEVICE.fullmatch(parts[1]):
            return f"agg-{parts[2]}", parts[1]
        if len(parts) == 3 and parts[0] == "patch":
            if not _MODEL_ID.fullmatch(parts[1]) or not _INDEX.fullmatch(parts[2]) or int(parts[2]) > MAX_INDEX:
                raise TopicError(f"topic {topic!r}: invalid patch base or chunk index")
            return "patch", (parts[1], int(parts[2]))
        if len(parts) == 2 and parts[0] == "model":
            if not _INDEX.fullmatch(parts[1]) or int(parts[1]) > MAX_INDEX:
                raise TopicError(f"topic {topic!r}: invalid model chunk index {parts[1]!r}")
            return "model", int(parts[1])
        raise TopicError(f"topic {topic!r} is not an fl-pqsu topic")
