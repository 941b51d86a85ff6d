"""The coordinator's round logic with a real pruned int8 cnn, real codec payloads and real
Fashion-MNIST: what is accepted moves the master, everything else is counted and changes nothing.

The master is prepared once per module (exporting takes seconds); every test opens and closes
its own round and compares against a snapshot taken at its start.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pytest

from pqsu.cloud.prepare import PrepareConfig, prepare_master
from pqsu.cloud.server import FederatedServer, ServerConfig
from pqsu.edge.learner import EdgeLearner
from pqsu.edge.selective import SelectivePolicy
from pqsu.export.datasets import ArrayDataset
from pqsu.export.pipeline import model_info
from pqsu.protocol import model_id as model_ids
from pqsu.protocol.codec import TensorBlock, Update, decode, encode
from pqsu.protocol.errors import CodecError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KEYS = {"dev-a": b"secret-of-device-a", "dev-b": b"secret-of-device-b"}
# The codec names its rejection reasons (CodecError subclasses with `.reason`); before that split
# every codec rejection counted as "corrupt".
NAMED = hasattr(CodecError, "reason")


def _reason(named: str) -> str:
    return named if NAMED else "corrupt"


@dataclass
class World:
    server: FederatedServer
    keyed: FederatedServer
    device_data: ArrayDataset


@pytest.fixture(scope="module")
def world(fmnist, one_torch_thread) -> World:
    train_set, test_set = fmnist
    proxy = train_set.sample(200, seed=0)
    master = prepare_master(PrepareConfig("cnn", prune=0.5, pretrain_epochs=0.5, finetune_epochs=0.0, seed=0), proxy)
    info = model_info(master, proxy)
    calib = proxy.sample(32, seed=1).normalized()
    evals = test_set.sample(200, seed=0)
    keyed_master = copy.deepcopy(master)  # the servers write into their models: one each
    server = FederatedServer(master, info, calib, evals.normalized(), evals.y, ServerConfig(seed=3))
    keyed = FederatedServer(keyed_master, info, calib, evals.normalized(), evals.y, ServerConfig(seed=3), keys=KEYS)
    return World(server, keyed, train_set.sample(64, seed=5))


@pytest.fixture
def server(world) -> FederatedServer:
    return world.server


def _snapshot(server: FederatedServer) -> dict[str, bytes]:
    return {k: v.tobytes() for k, v in server.master.items()}


def _torch_snapshot(server: FederatedServer) -> dict[str, bytes]:
    return {k: v.detach().numpy().tobytes() for k, v in server.model.state_dict().items()}


def _craft(server, task, device, *, samples=10, seed=0, round_=None, model_id=None, blocks=None, key=None,
           fraction=0.05, size=0.01) -> bytes:
    """A sparse int8 update over the server's tensors, as a device would send it."""
    if blocks is None:
        rng = np.random.default_rng(seed)
        blocks = []
        for name, shape in server.shapes.items():
            n = int(np.prod(shape))
            idx = np.sort(rng.choice(n, max(1, int(fraction * n)), replace=False))
            blocks.append(TensorBlock.sparse(name, shape, idx, rng.normal(0, size, idx.size)))
    u = Update(task.round if round_ is None else round_, device, task.model_id if model_id is None else model_id,
               samples, 0.7, tuple(blocks))
    return encode(u, key=key)


def _codec_verdict(payload: bytes) -> str:
    """The reason the codec itself gives for a payload it refuses."""
    try:
        decode(payload)
    except CodecError as exc:
        reason = getattr(exc, "reason", "corrupt")
        assert reason in ({"truncated", "bad-checksum"} if NAMED else {"corrupt"})
        return reason
    raise AssertionError("the codec accepted a truncated payload")


def _dense(payload: bytes, shapes) -> dict[str, np.ndarray]:
    out = {k: np.zeros(s, np.float64) for k, s in shapes.items()}
    for k, v in decode(payload).to_dense().items():
        out[k] += v
    return out


# ------------------------------------------------------------------------ downlink

def test_open_round_announces_the_model_devices_download(server):
    data, info = server.model_message()
    task = server.open_round(101, ["dev-a", "dev-b"])
    try:
        assert task.round == 101
        assert task.model_id == info.model_id == model_ids.verify(data)
        c = server.cfg
        assert (task.epochs, task.batch_size, task.lr, task.momentum, task.time_budget_s, task.seed) == \
            (c.epochs, c.batch_size, c.lr, c.momentum, c.time_budget_s, 3)
        assert server.model_message()[0] is data  # exported once per master version
    finally:
        server.close_round()


def test_submit_without_an_open_round_is_refused(server):
    task = server.open_round(102, ["dev-a"])
    server.close_round()
    verdict = server.submit(_craft(server, task, "dev-a"))
    assert not verdict.accepted and verdict.reason == "no-round"
    with pytest.raises(RuntimeError):
        server.close_round()


# ------------------------------------------------------------------------ uplink

def test_update_from_a_real_edge_learner_is_accepted_and_moves_the_master(world, server):
    data, _ = server.model_message()
    task = server.open_round(103, ["dev-a"])
    x = world.device_data
    learner = EdgeLearner("dev-a", x.x, x.y, SelectivePolicy.from_spec("always", "topk:0.05"))
    outcome = learner.run_round(task, data)
    assert outcome.payload is not None
    before = {k: v.astype(np.float64) for k, v in server.master.items()}

    verdict = server.submit(outcome.payload)
    assert verdict.accepted and verdict.reason == "accepted"
    report = server.close_round()

    # one update, FedAvg, server lr 1: the master moved by exactly the decoded update
    sent = _dense(outcome.payload, server.shapes)
    assert any(np.abs(v).max() > 0 for v in sent.values())
    for k in server.shapes:
        np.testing.assert_allclose(server.master[k] - before[k], sent[k], rtol=0, atol=1e-6, err_msg=k)
    # the torch master is the same memory, and the next download is the new model
    assert _torch_snapshot(server) == _snapshot(server)
    new_data, new_info = server.model_message()
    assert report.model_id == new_info.model_id == model_ids.verify(new_data) != task.model_id
    assert 0.0 <= report.accuracy <= 1.0
    assert (report.uploads, report.selected, report.rejected) == (1, 1, {})
    assert report.bytes_up == len(outcome.payload)
    assert report.bytes_down == len(data)


def test_rejections_are_counted_by_reason_and_leave_the_master_bit_identical(server):
    data, info = server.model_message()
    task = server.open_round(104, ["dev-a", "dev-b", "dev-c"])
    before, torch_before = _snapshot(server), _torch_snapshot(server)
    good = _craft(server, task, "dev-a")
    name, shape = next(iter(server.shapes.items()))
    wrong_shape = (shape[0] + 1,) + tuple(shape[1:])
    bad = {
        "garbage": (b"not an update at all", _reason("unsupported")),
        "header cut": (good[:10], _reason("truncated")),
        "half": (good[:len(good) // 2], _codec_verdict(good[:len(good) // 2])),
        "last byte cut": (good[:-1], _reason("bad-checksum")),
        "wrong round": (_craft(server, task, "dev-a", round_=task.round + 1), "wrong-round"),
        "old round": (_craft(server, task, "dev-a", round_=task.round - 1), "wrong-round"),
        "not selected": (_craft(server, task, "dev-z"), "not-selected"),
        "wrong model": (_craft(server, task, "dev-a", model_id="f" * 32), "wrong-model"),
        "unknown tensor": (_craft(server, task, "dev-b", blocks=[TensorBlock.sparse("nope.weight", (3,), [1], [0.5])]),
                           "unknown-tensor"),
        "wrong shape": (_craft(server, task, "dev-b", blocks=[TensorBlock.skip(n, s) for n, s in server.shapes.items()
                                                               if n != name] +
                               [TensorBlock.sparse(name, wrong_shape, [0], [0.5])]), "shape-mismatch"),
        "no samples": (_craft(server, task, "dev-c", samples=0), "no-samples"),
    }
    for what, (payload, reason) in bad.items():
        verdict = server.submit(payload)
        assert (verdict.accepted, verdict.reason) == (False, reason), what
        assert verdict.detail, what
    report = server.close_round()

    assert _snapshot(server) == before and _torch_snapshot(server) == torch_before
    assert report.rejected == dict(Counter(reason for _, reason in bad.values()))
    assert (report.uploads, report.bytes_up, report.selected) == (0, 0, 3)
    assert report.bytes_down == 3 * len(data)
    assert report.model_id == info.model_id and server.model_message()[0] is data  # nothing to re-export
    # no upload, no training loss: null in the metrics, which a strict JSON reader (the browser's) must parse
    assert report.train_loss is None and '"train_loss": null' in json.dumps(report.to_dict(), allow_nan=False)


def test_submit_never_raises_for_payloads_of_the_wrong_type(server):
    task = server.open_round(108, ["dev-a"])
    before = _snapshot(server)
    verdicts = [server.submit(p) for p in (None, "a string", 123, [1, 2])]
    good = bytearray(_craft(server, task, "dev-a", seed=5))  # a transport may hand over a bytearray
    accepted = server.submit(good)
    report = server.close_round()
    assert all(not v.accepted for v in verdicts)
    assert report.rejected == {_reason("corrupt"): 4}
    assert accepted.accepted and report.bytes_up == len(good) and _snapshot(server) != before


def test_update_naming_another_device_than_its_sender_is_refused(server):
    if "sender" not in FederatedServer.submit.__code__.co_varnames:
        pytest.skip("FederatedServer.submit has no sender check in this build")
    task = server.open_round(105, ["dev-a", "dev-b"])
    before = _snapshot(server)
    verdict = server.submit(_craft(server, task, "dev-a"), sender="dev-b")
    report = server.close_round()
    assert (verdict.accepted, verdict.reason) == (False, "topic-mismatch")
    assert report.rejected == {"topic-mismatch": 1} and _snapshot(server) == before


def test_duplicates_are_counted_once_and_the_report_adds_up(server):
    data, _ = server.model_message()
    task = server.open_round(106, ["dev-a", "dev-b", "dev-c"])   # dev-c never reports
    before = {k: v.astype(np.float64) for k, v in server.master.items()}
    pa = _craft(server, task, "dev-a", samples=10, seed=1)
    pb = _craft(server, task, "dev-b", samples=30, seed=2)
    assert server.submit(pa).accepted
    again = server.submit(pa)                                       # the same bytes after a reconnect
    other = server.submit(_craft(server, task, "dev-a", samples=1000, seed=9))  # a second, different one
    assert server.submit(pb).accepted
    assert not server.submit(b"\x00" * 50).accepted
    assert (again.reason, other.reason) == ("duplicate", "duplicate")
    report = server.close_round(skipped=1)

    ua, ub = _dense(pa, server.shapes), _dense(pb, server.shapes)
    for k in server.shapes:  # a's update weighs 10 samples, once
        np.testing.assert_allclose(server.master[k] - before[k], (10 * ua[k] + 30 * ub[k]) / 40, rtol=0, atol=1e-6,
                                   err_msg=k)
    assert (report.round, report.selected, report.uploads, report.skipped) == (106, 3, 2, 1)
    assert report.bytes_up == len(pa) + len(pb)
    assert report.bytes_down == 3 * len(data) and report.model_bytes == len(server.model_message()[0])
    assert report.rejected == {"duplicate": 2, _reason("unsupported"): 1}
    assert 0.0 <= report.accuracy <= 1.0 and np.isfinite(report.loss)
    assert report.train_loss == pytest.approx(0.7)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_an_aggregate_that_overflows_is_refused_and_master_kept(server):
    task = server.open_round(107, ["dev-a", "dev-b"])
    before = _snapshot(server)
    huge = [TensorBlock.dense(n, np.full(s, 3e38, np.float32)) for n, s in server.shapes.items()]
    for device in ("dev-a", "dev-b"):  # each is finite; their sum overflows float32
        assert server.submit(_craft(server, task, device, samples=1, blocks=huge)).accepted
    report = server.close_round()
    assert report.rejected == {"non-finite-aggregate": 1}
    assert _snapshot(server) == before


# ------------------------------------------------------------------------ signed updates

def test_with_keys_only_correctly_signed_updates_from_known_devices_count(world):
    server = world.keyed
    data, _ = server.model_message()
    task = server.open_round(201, ["dev-a", "dev-b", "dev-c"])  # dev-c is selected but has no key
    before = _snapshot(server)
    bad = {
        "wrong key": (_craft(server, task, "dev-a", key=b"not-the-key"), _reason("bad-signature")),
        "b's key for a": (_craft(server, task, "dev-a", key=KEYS["dev-b"]), _reason("bad-signature")),
        "unsigned": (_craft(server, task, "dev-a"), _reason("bad-signature")),
        "unknown device": (_craft(server, task, "dev-c", key=b"whatever"), "unknown-device"),
    }
    for what, (payload, reason) in bad.items():
        verdict = server.submit(payload)
        assert (verdict.accepted, verdict.reason) == (False, reason), what
    assert _snapshot(server) == before

    good = _craft(server, task, "dev-a", key=KEYS["dev-a"], seed=4)
    assert server.submit(good).accepted   # forged attempts before it did not block the real device
    report = server.close_round()
    assert report.rejected == dict(Counter(reason for _, reason in bad.values()))
    assert (report.uploads, report.bytes_up) == (1, len(good))
    assert _snapshot(server) != before


def test_the_round_task_carries_the_fleet_wide_fedprox_mu(server):
    cfg = server.cfg
    try:
        server.cfg = dataclasses.replace(cfg, local_prox=0.5)
        assert server.open_round(1, ["dev-a"]).prox == 0.5
    finally:
        server.cfg = cfg
        server.close_round()
    assert server.open_round(2, ["dev-a"]).prox == 0.0  # off by default
    server.close_round()
