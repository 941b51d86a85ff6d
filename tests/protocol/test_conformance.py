"""The conformance kit (docs/conformance/) against the reference code, as a third party would use it:
every golden file decodes to its stored expectation, every documented corruption is refused with
the documented reason, and regenerating the kit gives the same bytes."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from pqsu.protocol import chunking, codec, model_id
from pqsu.protocol.errors import CodecError
from pqsu.protocol.messages import Lease, MessageError, RoundTask, Status, message_type
from pqsu.protocol.model_info import ModelInfo

KIT = Path(__file__).resolve().parents[2] / "docs" / "conformance"
INDEX = json.loads((KIT / "index.json").read_text())
KEY = bytes.fromhex((KIT / "demo.key").read_text().strip())  # the documented encoding: hex, one line


def expected(rel: str) -> dict:
    return json.loads((KIT / rel).read_text())


def flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0xFF]) + data[offset + 1:]


def test_demo_key_is_the_documented_one_in_both_encodings():
    assert KEY == bytes(range(32))
    assert {d: bytes.fromhex(k) for d, k in json.loads((KIT / "keys.json").read_text()).items()} == {"demo-device": KEY}


def test_the_kit_has_every_block_kind_signed_and_unsigned():
    exps = [expected(f"updates/{n}.expected.json") for n in INDEX["updates"]]
    kinds = {b["kind"] for e in exps for b in e["blocks"]}
    codings = {b.get("index_coding") for e in exps for b in e["blocks"]} - {None}
    assert kinds == {"skip", "dense", "sparse", "dense32"} and codings == {"varint", "bitmap"}
    assert {e["header"]["signed"] for e in exps} == {True, False}


@pytest.mark.parametrize("name", INDEX["updates"])
def test_golden_update_decodes_to_its_expectation(name):
    exp = expected(f"updates/{name}.expected.json")
    payload = (KIT / exp["file"]).read_bytes()
    assert len(payload) == exp["size"]
    key = KEY if exp["key_file"] else None
    upd = codec.decode(payload, key=key)
    head = codec.peek_header(payload)
    h = exp["header"]
    assert (head.version, head.signed, head.num_tensors) == (h["version"], h["signed"], h["num_tensors"])
    assert (upd.round, upd.num_samples, upd.loss, upd.device_id, upd.model_id) == \
        (h["round"], h["num_samples"], h["loss"], h["device_id"], h["model_id"])
    assert len(upd.blocks) == len(exp["blocks"])
    for blk, e in zip(upd.blocks, exp["blocks"]):
        assert (blk.name, list(blk.shape), blk.kind) == (e["name"], e["shape"], e["kind"])
        assert blk.dequantize().reshape(-1).tolist() == e["dequantized"]  # exact: float32 values in JSON doubles
        if blk.kind in ("dense", "sparse"):
            assert blk.scale.tolist() == e["scales"] and blk.q.tolist() == e["q"]
        if blk.kind == "sparse":
            assert blk.indices.tolist() == e["indices"] and blk.index_coding == e["index_coding"]
        if blk.kind == "dense32":
            assert [v.tobytes().hex() for v in blk.q.astype("<f4")] == e["values_f32_hex"]
    at = exp["crc32_of_bytes"][1]
    assert payload[at:at + 4].hex() == exp["crc32"]
    # Re-encoding what was decoded gives the golden bytes back: the encoding is canonical.
    assert codec.encode(upd, key=key) == payload


@pytest.mark.parametrize("name", INDEX["updates"])
def test_documented_corruptions_are_refused_with_their_reason(name):
    exp = expected(f"updates/{name}.expected.json")
    payload = (KIT / exp["file"]).read_bytes()
    assert exp["corruptions"]
    for case in exp["corruptions"]:
        bad = flip(payload, case["offset"])
        with pytest.raises(CodecError) as err:
            codec.decode(bad, key=KEY if case["with_key"] else None)
        assert err.value.reason == case["reason"], case
        if case.get("accepted_without_key"):  # documented: no key, no signature check
            assert codec.decode(bad) == codec.decode(payload)


@pytest.mark.parametrize("name", INDEX["updates"])
def test_every_single_byte_corruption_is_refused(name):
    """Not only the listed offsets: XOR 0xff at any byte makes the receiver refuse (CRC32 catches any
    single-byte error in the body; header bytes fail their own checks first; the HMAC guards the rest)."""
    exp = expected(f"updates/{name}.expected.json")
    payload = (KIT / exp["file"]).read_bytes()
    key = KEY if exp["key_file"] else None
    for offset in range(len(payload)):
        with pytest.raises(CodecError):
            codec.decode(flip(payload, offset), key=key)


def test_unsigned_golden_update_is_refused_when_a_key_is_required():
    with pytest.raises(CodecError) as err:
        codec.decode((KIT / "updates/mixed-unsigned.bin").read_bytes(), key=KEY)
    assert err.value.reason == "bad-signature"


@pytest.mark.parametrize("name", INDEX["chunks"])
def test_chunk_set_reassembles_in_any_order_to_its_message(name):
    exp = expected(f"chunks/{name}.expected.json")
    frames = [(KIT / f).read_bytes() for f in exp["frames"]]
    message = (KIT / exp["message_file"]).read_bytes()
    assert [len(f) for f in frames] == exp["frame_sizes"] and len(frames) == exp["count"] > 1
    for f, size in zip(frames, exp["data_sizes"]):
        assert f[:4] == b"PQCK" and f[5:21].hex() == exp["message_id"] and len(f) - chunking.HEADER_SIZE == size
        assert int.from_bytes(f[29:37], "little") == exp["total_length"] and f[37:69].hex() == exp["sha256"]
    order = list(range(len(frames)))
    random.Random(0).shuffle(order)
    r = chunking.Reassembler()
    results = [r.add(frames[i], source="x") for i in order]
    assert results[:-1] == [None] * (len(frames) - 1) and results[-1] == message
    assert r.add(frames[0], source="x") is None  # a retained frame delivered again is not a new message
    # Regenerating the frames from the message gives the same bytes.
    assert chunking.split(message, exp["limit"], message_id=bytes.fromhex(exp["message_id"])) == frames


@pytest.mark.parametrize("name", INDEX["chunks"])
def test_corrupted_chunk_set_is_refused_with_its_reason(name):
    exp = expected(f"chunks/{name}.expected.json")
    frames = [(KIT / f).read_bytes() for f in exp["frames"]]
    c = exp["corruption"]
    frames[c["frame"]] = flip(frames[c["frame"]], c["offset"])
    r = chunking.Reassembler()
    with pytest.raises(chunking.ChunkError) as err:
        for f in frames:
            r.add(f, source="x")
    assert err.value.reason == c["reason"]


DECODERS = {"round": RoundTask.from_json, "status": Status.from_json, "lease": Lease.from_json}


@pytest.mark.parametrize("name", INDEX["messages"])
def test_control_message_decodes_to_its_expectation(name):
    exp = expected(f"messages/{name}.expected.json")
    data = (KIT / f"messages/{name}.json").read_bytes()
    assert message_type(data) == exp["type"]
    if exp["type"] == "done":
        body = json.loads(data)
        assert {k: body.get(k, "") for k in ("rounds", "model_id", "job")} == exp["decoded"]
        return
    msg = DECODERS[exp["type"]](data)
    as_dict = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(msg).items()}
    assert as_dict == exp["decoded"]
    if not name.endswith(("minimal", "unknown-keys")):
        assert msg.to_json() == data  # the reference encoder writes exactly the golden bytes


def test_round_messages_say_how_much_time_is_left_on_the_receivers_clock():
    open_ = RoundTask.from_json((KIT / "messages/round.json").read_bytes())
    closed = RoundTask.from_json((KIT / "messages/round-closed.json").read_bytes())
    assert open_.local_deadline(100.0) == 400.0 and closed.local_deadline(100.0) == 100.0
    assert RoundTask.from_json((KIT / "messages/round-minimal.json").read_bytes()).local_deadline(5.0) is None


@pytest.mark.parametrize("case", INDEX["bad_messages"], ids=lambda c: c["name"])
def test_bad_control_message_is_refused(case):
    data = (KIT / f"messages/bad/{case['name']}.json").read_bytes()
    with pytest.raises(MessageError):
        {"round": RoundTask.from_json, "status": Status.from_json, "lease": Lease.from_json}[case["type"]](data)


def test_golden_model_verifies_and_carries_its_metadata():
    exp = expected("model/model.expected.json")
    data = (KIT / exp["file"]).read_bytes()
    assert len(data) == exp["size"] and model_id.verify(data) == exp["model_id"]
    with pytest.raises(model_id.ModelIdError):
        model_id.verify(flip(data, exp["corruption"]["offset"]))
    onnx = pytest.importorskip("onnx")
    proto = onnx.load_from_string(data)
    assert {p.key: p.value for p in proto.metadata_props} == exp["metadata_props"]
    info = ModelInfo.from_props(proto.metadata_props)
    assert info.model_id == exp["model_id"] and info.precision == "int8"
    inits = {t.name: t for t in proto.graph.initializer}
    for param, t in exp["tensors"].items():
        q = inits[t["quantized"]]
        assert list(q.dims) == t["shape"] and t["scale"] in inits and t["zero_point"] in inits
    # The golden update for this model names it and carries exactly its parameters, by torch name.
    upd = codec.decode((KIT / "updates/model-update-signed.bin").read_bytes(), key=KEY)
    assert upd.model_id == exp["model_id"]
    assert {b.name: list(b.shape) for b in upd.blocks} == {p: t["shape"] for p, t in exp["tensors"].items()}


def test_golden_model_runs_and_rebuilds_in_torch():
    pytest.importorskip("torch")
    import onnxruntime as ort

    from pqsu.export.bridge import read_int8_weights, torch_model_from_int8

    data = (KIT / "model/model.int8.onnx").read_bytes()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": np.zeros((2, 1, 8, 8), np.float32)})[0]
    assert logits.shape == (2, 3)
    model, info = torch_model_from_int8(data)
    weights = read_int8_weights(data)
    tensors = expected("model/model.expected.json")["tensors"]
    assert set(model.state_dict()) == set(tensors) <= set(weights.values)
    for name, t in tensors.items():  # int8 weights dequantize within their step; int32 biases far finer
        assert list(weights.values[name].shape) == t["shape"] and weights.steps[name].max() > 0


def test_regenerating_the_kit_gives_the_same_bytes():
    """The generator is the source of the golden files: none was typed or edited by hand. Compares
    every file, the int8 model included (its export is deterministic for a fixed torch and onnxruntime)."""
    pytest.importorskip("torch")
    from pqsu.tools.lab.conformance import build

    files = build()
    on_disk = {str(p.relative_to(KIT)) for p in KIT.rglob("*") if p.is_file() and p.name != "README.md"}
    assert on_disk == set(files)
    changed = sorted(rel for rel, data in files.items() if (KIT / rel).read_bytes() != data)
    assert changed == [], f"regenerated files differ: {changed}"


def test_the_examples_in_protocol_md_are_the_kits_files():
    """The JSON examples in docs/protocol.md are copies of golden files: they must not drift."""
    doc = (KIT.parent / "protocol.md").read_text()
    for name in ("round", "status-uploaded"):
        assert "\n" + (KIT / f"messages/{name}.json").read_text() + "\n```" in doc, name
    worked = (KIT / "updates/worked-example.bin").read_bytes()
    assert worked[-4:].hex(" ") in doc and len(worked) == 90  # the CRC line of the worked example
