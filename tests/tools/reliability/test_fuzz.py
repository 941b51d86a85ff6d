"""Bad input through the broker: the quick fuzz (1,000 malformed updates and broken chunk sequences)
published at a real `pqsu cloud` through a real Mosquitto, and what a user would check afterwards:
the coordinator did not crash, nothing got into the model, every payload was refused and counted
under the reason it deserves, and an honest update is still accepted.

Also, without a broker: the coordinator counts the incomplete updates its reassembler drops.
The lab (`pqsu.tools.lab.fleet_lab`) stops every process it started; every wait is bounded.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pqsu.cloud.coordinator import REASSEMBLY_MESSAGES, Coordinator, CoordinatorConfig
from pqsu.protocol import chunking
from pqsu.tools.lab.broker import mosquitto_path
from pqsu.tools.reliability.fuzz import bad_input, markdown

CASES = 1000
CODEC = {"truncated", "bad-checksum", "corrupt", "oversize", "unsupported"}
ROUND_RULES = {"wrong-round", "wrong-model", "topic-mismatch", "not-selected", "unknown-tensor", "shape-mismatch",
               "no-samples"}
CHUNK = {"chunk-malformed", "chunk-hash-mismatch", "chunk-inconsistent", "chunk-oversize", "chunk-incomplete",
         "foreign-topic"}
needs_lab = pytest.mark.skipif(mosquitto_path() is None or not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                               reason="mosquitto or dataset-fashion-mnist is not installed")


@pytest.fixture(scope="module")
def storm(tmp_path_factory) -> dict:
    return bad_input(tmp_path_factory.mktemp("fuzz"), CASES)


@needs_lab
def test_the_coordinator_survives_the_storm_and_finishes_its_rounds(storm):
    assert storm["cloud_exit"] == 0 and storm["rounds"] == [1, 2]
    assert storm["tracebacks"] == 0


@needs_lab
def test_nothing_from_the_storm_reaches_the_global_model(storm):
    assert storm["round1"] == {**storm["round1"], "uploads": 0, "selected": 1, "missing": 0}
    assert storm["round1"]["model_id"] == storm["announced_model_id"] == storm["round2_model_id"]


@needs_lab
def test_every_payload_is_refused_and_counted_under_its_reason(storm):
    counted = storm["counted"]
    assert storm["cases"] == CASES and storm["frames"] > CASES
    # what the reassembler still holds (an incomplete set not yet evicted) is the only difference
    assert storm["counted_total"] + storm["held_at_round_end"] == CASES
    assert 0 <= storm["held_at_round_end"] <= REASSEMBLY_MESSAGES
    # the reason each payload deserves, predicted by replaying it through the same checks; no queue overflow
    assert counted == storm["predicted"]
    assert CODEC | ROUND_RULES | CHUNK <= set(counted), set(counted)  # every layer was reached
    assert storm["acceptable_mutants_dropped"] > 0  # some mutants were still valid updates: not sent
    assert all(storm["checks"].values()), storm["checks"]


@needs_lab
def test_an_honest_update_is_accepted_after_the_storm(storm):
    assert storm["round2"]["uploads"] == 1 and storm["round2"]["selected"] == 1
    assert storm["round2"]["rejected"] == storm["round2_predicted_rejected"]
    assert storm["round2"]["model_id"] != storm["announced_model_id"]  # the accepted update moved the model


@needs_lab
def test_the_report_section_tabulates_refusals_by_reason(storm):
    lines = markdown(storm)
    assert lines[0] == "## Bad input through the broker"
    rows = {line.split(" | ")[0][2:]: line for line in lines if line.startswith("| ") and " | " in line}
    for reason, n in storm["counted"].items():
        assert rows[reason].endswith(f"| {storm['predicted'][reason]:,} | {n:,} |")
    assert f"Sent {CASES:,}; counted {storm['counted_total']:,}" in "\n".join(lines)
    assert "unaccounted for: 0." in "\n".join(lines)
    json.dumps(storm)  # `pqsu reliability` stores it as JSON


# -- without a broker ---------------------------------------------------------------------------------------
class _NoBroker:
    def __init__(self):
        self.on_connect = []


def test_the_coordinator_counts_incomplete_updates_its_reassembler_drops():
    coordinator = Coordinator(CoordinatorConfig(fleet="t"), server=None, client=_NoBroker())
    topic = coordinator.topics.update("dev-000")
    for i in range(REASSEMBLY_MESSAGES + 3):  # the first frame of 2 of as many updates: 3 must be evicted
        frames = chunking.split(bytes([i % 256]) * 200, chunking.HEADER_SIZE + 100, message_id=i.to_bytes(16, "big"))
        coordinator._on_update(topic, frames[0], False)
    assert coordinator.reassembler.pending == REASSEMBLY_MESSAGES
    assert coordinator._take_refused() == {"chunk-incomplete": 3}
    coordinator._on_update(topic, b"not a frame", False)  # a refusal of its own, nothing more dropped
    assert coordinator._take_refused() == {"chunk-malformed": 1}
