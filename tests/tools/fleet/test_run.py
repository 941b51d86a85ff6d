"""`pqsu run`'s report of a coordinator that stopped: its own one-line error, else its log's tail."""
from __future__ import annotations

from pqsu.tools.fleet.run import _coordinator_failure


def test_the_coordinators_own_error_is_the_one_line_run_reports(tmp_path):
    log = tmp_path / "cloud.log"
    log.write_text("05:27:07 INFO pqsu.protocol.mqtt: connected\n05:27:12 INFO pqsu.cloud.prepare: round 0: ...\n"
                   "pqsu cloud: error: round 0: the devices could not rebuild and fine-tune m:f from its int8 file\n")
    message = _coordinator_failure(2, log)
    assert message == f"the coordinator stopped: round 0: the devices could not rebuild and fine-tune m:f from " \
                      f"its int8 file (log: {log})"


def test_a_coordinator_that_died_without_a_word_shows_its_logs_tail(tmp_path):
    log = tmp_path / "cloud.log"
    log.write_text("".join(f"line {i}\n" for i in range(8)) + "Traceback (most recent call last):\n")
    message = _coordinator_failure(-9, log)
    assert message.startswith(f"the coordinator exited with status -9; see {log}:")
    assert message.splitlines()[1:] == ["  line 4", "  line 5", "  line 6", "  line 7",
                                        "  Traceback (most recent call last):"]
    assert _coordinator_failure(1, tmp_path / "absent.log").startswith("the coordinator exited with status 1")
