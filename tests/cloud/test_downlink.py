"""The downlink in the round loop: versions made by requantizing in place, patches from the last
versions, devices that follow them (the in-process transport's followers, as MQTT agents do), and
bytes counted as the devices downloaded them.

The server is the round-logic stand-in of tests/support/round_fakes.py with the real `Downlink`
over a real int8 cnn (tests/conftest.py); its master moves each round as a training round would
move it, so no torch training runs here."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pqsu.cloud.downlink import Downlink, DownlinkConfig
from pqsu.cloud.rounds import RoundRunner, RunnerConfig
from pqsu.cloud.transport import InProcessTransport
from pqsu.export.pipeline import Exported
from pqsu.export.requantize import QdqLayout, requantize
from pqsu.protocol import model_id
from pqsu.protocol.model_follow import wire_bytes
from pqsu.protocol.patch import apply_patch
from tests.support.round_fakes import FakeServer, update

LIMIT = 128 * 1024


class PatchingServer(FakeServer):
    """FakeServer's judging, a real Downlink; `offline[device]` are the rounds it is not there."""

    def __init__(self, trained_cnn, cfg: DownlinkConfig, offline=None):
        super().__init__()
        self.master = {k: v.detach().numpy().copy() for k, v in trained_cnn.model.state_dict().items()}
        base = trained_cnn.int8_path.read_bytes()
        info = dataclasses.replace(trained_cnn.int8_info, model_id=model_id.verify(base))
        self.base, self.layout = base, QdqLayout.of(base)
        self.downlink = Downlink(cfg, self.export, self.master)
        self.info = info
        self.offline = offline or {}
        self.rng = np.random.default_rng(0)

    def export(self) -> Exported:
        """A keyframe: the master in the base file with the base's scales (a real export recalibrates)."""
        file = model_id.verified(requantize(self.base, self.master, layout=self.layout).data)
        return Exported(file, dataclasses.replace(self.info, model_id=file.model_id))

    def model_message(self):
        m = self.downlink.model()
        return m.data, m.info

    def admits(self, device: str) -> bool:
        return self.rounds_done + 1 not in self.offline.get(device, ())

    def close_round(self, skipped: int = 0):
        if self._counted:  # a round's training: about a tenth of the entries move by a step or more
            for k, v in self.master.items():
                t = self.layout.tensors.get(k)
                step = t.scale if t is not None and t.kind == "weight" else 1e-3
                v += (self.rng.normal(0, 0.25, v.shape) * step).astype(np.float32)
            self.downlink.advance()
        return super().close_round(skipped)


class Learner:
    def __init__(self, device):
        self.device, self.seen = device, []

    def run_round(self, task, model_file, downloaded=None):
        assert model_file.model_id == task.model_id  # never trains on another model than announced
        self.seen.append(task.round)
        return type("Outcome", (), {"payload": update(self.device, task.round)})()


def run(server, devices, rounds, **kw):
    learners = {d: Learner(d) for d in devices}
    transport = InProcessTransport(learners, **kw)
    runner = RoundRunner(RunnerConfig(rounds=rounds, round_timeout_s=None), server, transport)
    runner.run()
    return runner, transport, learners


def test_patches_follow_the_chain_byte_for_byte_and_are_what_devices_download(trained_cnn):
    server = PatchingServer(trained_cnn, DownlinkConfig(policy="soft", patch_bases=2, headroom=1.5))
    runner, transport, _ = run(server, ["dev-a", "dev-b"], rounds=3)
    first, *later = runner.rounds
    assert first["downloads"] == {"patch": 0, "full": 2} and first["bytes_down_flashed"] == 0
    for rep in later:
        assert rep["downloads"] == {"patch": 2, "full": 0}
        assert 0 < rep["bytes_down"] == rep["bytes_down_flashed"] < 2 * rep["model_bytes"] // 3
        assert rep["downlink"]["kind"] in ("patch", "soft") and rep["downlink"]["seconds"] < 1.0
    # every retained patch rebuilds the current file from its base, byte for byte
    current = server.downlink.model()
    assert server.downlink.patches()
    for base, patch in server.downlink.patches().items():
        assert apply_patch(server.downlink.versions[base], patch) == current.data
    trained_on = server.downlink.versions[runner.rounds[-2]["model_id"]]  # the last round's model
    assert all(f.held.data == trained_on for f in transport.followers.values())


def test_devices_offline_for_1_3_and_10_rounds_and_one_joining_late_end_on_the_model_and_keep_training(trained_cnn):
    offline = {"off-1": {3}, "off-3": {3, 4, 5}, "off-10": set(range(2, 12)), "late": {1, 2, 3, 4}}
    server = PatchingServer(trained_cnn, DownlinkConfig(policy="soft", patch_bases=4, headroom=1.5), offline)
    devices = ["steady", *offline]
    runner, transport, learners = run(server, devices, rounds=13)
    final = server.downlink.versions[runner.rounds[-2]["model_id"]]  # what round 13 announced
    for d in devices:
        assert transport.followers[d].held.data == final, d
        assert learners[d].seen[-1] == 13, d  # trained in the last round
    by_round = {rep["round"]: rep for rep in runner.rounds}
    # off-1 and off-3 come back within the 4 versions patches are kept for: a patch; off-10 does not: the file
    assert by_round[4]["downloads"] == {"patch": 2, "full": 0}       # steady, off-1 back
    assert by_round[6]["downloads"] == {"patch": 4, "full": 0}       # off-3 back after 4 versions, late
    assert by_round[12]["downloads"] == {"patch": 4, "full": 1}      # off-10 back after 11 versions
    # the late device's first model: the file over the radio; flashed with round 0's, a patch from it
    r5 = by_round[5]
    assert r5["downloads"] == {"patch": 2, "full": 1}
    saved = r5["bytes_down"] - r5["bytes_down_flashed"]
    assert 0 < saved < wire_bytes(r5["model_bytes"], LIMIT)


def test_a_tampered_patch_in_the_loop_falls_back_to_the_full_model_and_is_counted(trained_cnn):
    server = PatchingServer(trained_cnn, DownlinkConfig(policy="soft", headroom=1.5))
    bad = lambda device, patch: patch[:-1] + bytes([patch[-1] ^ 1]) if device == "dev-b" else patch  # noqa: E731
    runner, transport, learners = run(server, ["dev-a", "dev-b"], rounds=3, tamper_patch=bad)
    for rep in runner.rounds[1:]:
        assert rep["downloads"] == {"patch": 1, "full": 1}
    assert transport.followers["dev-b"].refusals == {"not-announced": 2}
    assert transport.followers["dev-b"].held.data == server.downlink.versions[runner.rounds[-2]["model_id"]]
    assert learners["dev-b"].seen == [1, 2, 3]


def test_the_full_policy_exports_every_version_and_offers_no_patch(trained_cnn):
    server = PatchingServer(trained_cnn, DownlinkConfig(policy="full"))
    runner, _, _ = run(server, ["dev-a"], rounds=2)
    assert server.downlink.patches() == {} and server.downlink.offers() == ()
    assert [r["downloads"] for r in runner.rounds] == [{"patch": 0, "full": 1}] * 2


@pytest.mark.parametrize("cap", [1024, 3000, 0.02])
def test_a_capped_patch_fits_its_cap_and_the_rest_follows_later(trained_cnn, cap):
    """A cap is bytes, or a fraction of the int8 file (0.02: 2 in 100 of its bytes)."""
    server = PatchingServer(trained_cnn, DownlinkConfig(policy="soft", patch_cap=cap, headroom=1.5))
    runner, _, _ = run(server, ["dev-a"], rounds=3)
    limit = cap if isinstance(cap, int) else int(cap * runner.rounds[0]["model_bytes"])
    for rep in runner.rounds[1:]:
        assert rep["bytes_down"] <= wire_bytes(limit, LIMIT)
    assert runner.rounds[-1]["downlink"]["left_out"] > 0  # the master is ahead of the devices' model


def test_a_checkpointed_chain_resumes_on_the_same_file_with_its_patches(trained_cnn):
    """A coordinator killed mid-round announces the same file again once resumed: updates made on it count."""
    server = PatchingServer(trained_cnn, DownlinkConfig(policy="hard", patch_bases=2))
    run(server, ["dev-a"], rounds=3)
    files, chain = server.downlink.state()
    before = server.downlink.model()
    resumed = Downlink(server.downlink.cfg, server.export, server.master)
    resumed.resume(files, chain)
    assert resumed.model().info.model_id == before.info.model_id and resumed.model().data == before.data
    assert resumed.patches() == server.downlink.patches() and resumed.patches()
    damaged = bytearray(files[chain["order"][-1]])
    damaged[len(damaged) // 2] ^= 0xFF
    files[chain["order"][-1]] = bytes(damaged)  # a damaged file: start over with a keyframe, never serve it
    fresh = Downlink(server.downlink.cfg, server.export, server.master)
    fresh.resume(files, chain)
    assert fresh.current is None and not fresh.versions


def test_a_saturating_downlink_keeps_the_master_what_the_devices_hold_and_keyframes_on_pressure(trained_cnn):
    """With saturate, a weight past the held scales stays at the range's end in the master too, so the master
    is the devices' model; the weights pressed past the scales are the drift that calls a keyframe."""
    server = PatchingServer(trained_cnn, DownlinkConfig(policy="hard", saturate=True, keyframe_clip=0.001))
    for v in server.master.values():
        v *= np.float32(1.3)  # the master grew past the base file's scales
    runner, _, _ = run(server, ["dev-a"], rounds=3)
    kinds = [r["downlink"]["kind"] for r in runner.rounds]
    assert kinds[0] == "keyframe" and runner.rounds[0]["downlink"]["clipped"] > 0.001  # pressure: a keyframe
    assert kinds[-1] == "patch"  # the pressure relieved: patches again, from a master within the held scales
    layout = server.downlink.layout
    for name, t in layout.tensors.items():
        if t.kind == "weight" and name in server.master:
            q = np.round(server.master[name].reshape(t.shape) / t.scale) + t.zero_point
            assert q.min() >= -127 and q.max() <= 127, name
