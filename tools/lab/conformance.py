"""The conformance kit (docs/conformance/): golden messages and what they decode to.

`python -m pqsu.tools.lab.conformance docs/conformance` writes every file of the kit. Everything
is deterministic (fixed values, a fixed demo key, seeded torch and calibration data), so running
it again gives the same bytes; tests/protocol/test_conformance.py checks both that the stored
files decode to the stored expectations and that regenerating reproduces them byte for byte.

It lives in tools/lab and not in protocol because the int8 model file needs the export code
(torch, onnx, onnxruntime); every other file needs only `pqsu.protocol` and numpy.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import zlib
from pathlib import Path

import numpy as np

from pqsu.protocol import chunking, codec
from pqsu.protocol.codec import TensorBlock, Update
from pqsu.protocol.messages import Lease, RoundTask, Status, done_message

# The demo key: 32 bytes 00 01 .. 1f. Never use it for a real device.
DEMO_KEY = bytes(range(32))
DEMO_DEVICE = "demo-device"
DEMO_JOB = "20261201T231500Z-3fa9c2"
DEMO_COORDINATOR = "pqsu-coordinator-lab-3fa9c2"
DEMO_MODEL_ID = "0123456789abcdef0123456789abcdef"  # for updates not tied to the demo model file
MODEL_CHUNK_LIMIT = 4096
UPDATE_CHUNK_LIMIT = 128


# -- updates -----------------------------------------------------------------------------------
def _updates(model_id: str, model_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[Update, bool]]:
    """name -> (update, signed). One case per block kind, plus a mixed one signed and unsigned."""
    w = np.array([[0.5, -0.25, 0.125], [1.0, 0.0, -2.0]], np.float32)
    b = np.array([0.1, -0.2], np.float32)
    big = np.linspace(-1, 1, 64, dtype=np.float32)
    def update(blocks, round_=3, samples=10, loss=0.5, model=DEMO_MODEL_ID):
        return Update(round=round_, device_id=DEMO_DEVICE, model_id=model, num_samples=samples, loss=loss,
                      blocks=tuple(blocks))
    # The worked example of docs/protocol.md ("Update codec"), byte for byte.
    worked = Update(round=3, device_id="d1", model_id="m", num_samples=10, loss=0.5, blocks=(
        TensorBlock.sparse("w", (2, 100), np.array([1, 9, 150]), np.array([0.5, -1.0, 0.25])),
        TensorBlock.dense("b", np.array([0.1, -0.2], np.float32)), TensorBlock.skip("s", (3,))))
    mixed = [TensorBlock.dense("conv.weight", w, per_channel=True), TensorBlock.dense("conv.bias", b),
             TensorBlock.sparse("fc.weight", (4, 16), np.array([0, 5, 17, 63]), np.array([0.3, -0.6, 0.9, -1.2])),
             TensorBlock.sparse("fc.dense_sparse", (64,), np.arange(0, 64, 2), big[::2]),  # bitmap is smaller
             TensorBlock.dense_fp32("head.weight", np.array([[-0.0, 1e-40], [3.5, -7.25]], np.float32)),
             TensorBlock.skip("head.bias", (2,))]
    # An update to the demo model: every parameter, top-2 entries of each (the agent's top-k selection).
    rng = np.random.default_rng(7)
    to_model = []
    for name, shape in model_shapes.items():
        flat = rng.standard_normal(int(np.prod(shape))).astype(np.float32) * 0.01
        k = max(1, round(0.25 * flat.size))
        idx = np.sort(np.argsort(-np.abs(flat), kind="stable")[:k])
        to_model.append(TensorBlock.sparse(name, shape, idx, flat[idx]))
    return {
        "worked-example": (worked, False),
        "worked-example-signed": (worked, True),
        "dense-int8": (update([TensorBlock.dense("conv.weight", w), TensorBlock.dense("conv.bias", b),
                               TensorBlock.dense("scalar", np.array(0.75, np.float32))]), False),
        "sparse-varint": (update([TensorBlock.sparse("fc.weight", (4, 300), np.array([0, 1, 127, 128, 1000, 1199]),
                                                     np.array([0.1, -0.1, 0.5, -0.5, 1.0, 0.05]))]), False),
        "sparse-bitmap": (update([mixed[3]]), False),
        "sparse-empty": (update([TensorBlock.sparse("fc.weight", (4, 16), np.array([], np.int64),
                                                    np.array([], np.float32))]), False),
        "dense-fp32": (update([mixed[4], TensorBlock.dense_fp32("b", b)]), False),
        "skip": (update([TensorBlock.skip("conv.weight", (2, 3)), TensorBlock.skip("conv.bias", (2,))],
                        samples=1, loss=2.25), False),
        "mixed-unsigned": (update(mixed, round_=12, samples=600, loss=0.4125), False),
        "mixed-signed": (update(mixed, round_=12, samples=600, loss=0.4125), True),
        "model-update-signed": (update(to_model, round_=1, samples=300, loss=1.0625, model=model_id), True),
    }


def _block_json(blk: TensorBlock) -> dict:
    out = {"name": blk.name, "shape": list(blk.shape), "kind": blk.kind}
    if blk.kind in ("dense", "sparse"):
        out["scales"] = [float(s) for s in blk.scale]
        out["scale_mode"] = None if blk.kind == "sparse" else ("per-tensor" if blk.scale.size == 1 else "per-channel")
        out["q"] = [int(v) for v in blk.q]
    if blk.kind == "sparse":
        out["index_coding"] = blk.index_coding
        out["indices"] = [int(i) for i in blk.indices]
    if blk.kind == "dense32":
        out["values_f32_hex"] = [v.tobytes().hex() for v in blk.q.astype("<f4")]  # bit exact: -0.0, subnormals
    # What the receiver reconstructs, C order; float32 values, exact in JSON's double.
    out["dequantized"] = [float(v) for v in blk.dequantize().reshape(-1)]
    return out


def _corruptions(payload: bytes, signed: bool) -> list[dict]:
    """Single-byte corruptions (XOR 0xff at `offset`) and the reason a receiver must refuse each with."""
    trailer = 4 + (32 if signed else 0)
    crc_at = len(payload) - trailer
    cases = [{"offset": 4, "reason": "unsupported", "what": "version byte"},
             {"offset": 0, "reason": "unsupported", "what": "magic"},
             {"offset": crc_at - 1, "reason": "bad-checksum", "what": "last byte of the last tensor block"},
             {"offset": 11, "reason": "bad-checksum", "what": "num_samples"},
             {"offset": crc_at, "reason": "bad-checksum", "what": "first CRC32 byte"}]
    if signed:
        cases.append({"offset": len(payload) - 1, "reason": "bad-signature", "what": "last HMAC byte",
                      "accepted_without_key": True})
    for c in cases:
        c["with_key"] = signed
    return cases


def update_expectation(name: str, upd: Update, payload: bytes, signed: bool) -> dict:
    trailer_at = len(payload) - 4 - (32 if signed else 0)
    return {
        "file": f"updates/{name}.bin", "size": len(payload), "key_file": "demo.key" if signed else None,
        "header": {"version": 1, "kind": 1, "signed": signed, "round": upd.round, "num_samples": upd.num_samples,
                   "loss": upd.loss, "device_id": upd.device_id, "model_id": upd.model_id,
                   "num_tensors": len(upd.blocks)},
        "blocks": [_block_json(b) for b in upd.blocks],
        "crc32": payload[trailer_at:trailer_at + 4].hex(), "crc32_of_bytes": [0, trailer_at],
        "hmac_sha256": payload[trailer_at + 4:].hex() if signed else None,
        "corruptions": _corruptions(payload, signed),
    }


# -- chunk sets --------------------------------------------------------------------------------
def chunk_expectation(name: str, message_file: str, message: bytes, frames: list[bytes], message_id: bytes) -> dict:
    return {"message_file": message_file, "frames": [f"chunks/{name}/frame-{i}.bin" for i in range(len(frames))],
            "message_id": message_id.hex(), "count": len(frames), "total_length": len(message),
            "sha256": hashlib.sha256(message).hexdigest(), "frame_sizes": [len(f) for f in frames],
            "data_sizes": [len(f) - chunking.HEADER_SIZE for f in frames],
            "limit": UPDATE_CHUNK_LIMIT if name.startswith("update") else MODEL_CHUNK_LIMIT,
            "corruption": {"frame": 0, "offset": len(frames[0]) - 1, "reason": "hash-mismatch",
                           "what": "last data byte of frame 0: the set reassembles but its SHA-256 fails"}}


# -- control messages --------------------------------------------------------------------------
def control_messages(model_id: str, model_bytes: int) -> dict[str, tuple[str, bytes]]:
    """name -> (type, exact wire bytes), as the reference code writes them (plus hand-made variants
    that show what a receiver must accept: missing optional keys, unknown keys)."""
    task = RoundTask(round=3, model_id=model_id, epochs=1.0, batch_size=16, lr=0.05, momentum=0.0,
                     time_budget_s=60.0, seed=7, devices=(DEMO_DEVICE, "pi-07"), deadline=1764630300.0,
                     model_bytes=model_bytes, job=DEMO_JOB, remaining_s=300.0,
                     patches=({"base": "628505e63d622f6266833a8943fbd638", "bytes": 177,  # docs/patches.md's example
                               "sha256": hashlib.sha256(b"the example patch").hexdigest()},))
    closed = dataclasses.replace(task, deadline=1764630123.5, remaining_s=0.0)
    minimal = json.dumps({"v": 1, "type": "round", "round": 1, "model_id": model_id}).encode()
    future = json.dumps({"v": 1, "type": "round", "round": 4, "model_id": model_id, "job": DEMO_JOB,
                         "remaining_s": 120.0, "priority": "high", "x-vendor": {"a": 1}}).encode()
    st = lambda *a, **k: ("status", Status(DEMO_DEVICE, *a, job=DEMO_JOB, **k).to_json())  # noqa: E731
    return {
        "round": ("round", task.to_json()),
        "round-closed": ("round", closed.to_json()),
        "round-minimal": ("round", minimal),
        "round-unknown-keys": ("round", future),
        "status-online": ("status", Status(DEMO_DEVICE, "online").to_json()),
        "status-training": st("training", 3, download="patch", download_bytes=245, refusals={"bad-checksum": 1}),
        "status-uploaded": st("uploaded", 3, "1234 bytes, 56 entries", seconds=4.25,
                              evaluation={"accuracy": 0.75, "loss": 0.625, "samples": 20}),
        "status-skipped": st("skipped", 3, "loss 0.5000 did not improve on 0.4000", seconds=3.5),
        "status-failed": st("failed", 3, "local images are (3, 32, 32), the model takes (1, 8, 8)"),
        "status-offline": st("offline", 3),
        "status-inference-only": ("status", Status("kiosk-1", "online", trains=False).to_json()),
        "done": ("done", done_message(5, model_id, DEMO_JOB)),
        "lease": ("lease", Lease(DEMO_JOB, DEMO_COORDINATOR, "cloud-1", 4242, 1764630000.0).to_json()),
    }


# Control messages the reference code refuses (MessageError); `schema` says whether the JSON Schema
# of that type can refuse it too (a schema cannot express "at most 64 KiB" or "valid UTF-8 JSON").
BAD_MESSAGES: dict[str, tuple[str, dict | bytes, bool]] = {
    "round-no-model-id": ("round", {"v": 1, "type": "round", "round": 1}, True),
    "round-negative": ("round", {"v": 1, "type": "round", "round": -1, "model_id": "m"}, True),
    "round-bool-round": ("round", {"v": 1, "type": "round", "round": True, "model_id": "m"}, True),
    "round-zero-lr": ("round", {"v": 1, "type": "round", "round": 1, "model_id": "m", "lr": 0}, True),
    "round-momentum-1": ("round", {"v": 1, "type": "round", "round": 1, "model_id": "m", "momentum": 1.0}, True),
    "round-devices-string": ("round", {"v": 1, "type": "round", "round": 1, "model_id": "m", "devices": "pi"}, True),
    "round-negative-remaining": ("round", {"v": 1, "type": "round", "round": 1, "model_id": "m",
                                           "remaining_s": -1}, True),
    "round-long-job": ("round", {"v": 1, "type": "round", "round": 1, "model_id": "m", "job": "j" * 65}, True),
    "round-negative-prox": ("round", {"v": 1, "type": "round", "round": 1, "model_id": "m", "prox": -0.1}, True),
    "round-version-2": ("round", {"v": 2, "type": "round", "round": 1, "model_id": "m"}, True),
    "status-bad-state": ("status", {"v": 1, "type": "status", "device": "d", "state": "sleeping"}, True),
    "status-no-device": ("status", {"v": 1, "type": "status", "state": "online"}, True),
    "status-string-trains": ("status", {"v": 1, "type": "status", "device": "d", "state": "online",
                                        "trains": "yes"}, True),
    "status-negative-seconds": ("status", {"v": 1, "type": "status", "device": "d", "state": "online",
                                           "seconds": -1}, True),
    "status-bad-evaluation": ("status", {"v": 1, "type": "status", "device": "d", "state": "uploaded",
                                         "evaluation": {"accuracy": 1.5, "loss": 0.5, "samples": 20}}, True),
    "lease-empty-job": ("lease", {"v": 1, "type": "lease", "job": "", "coordinator": "c"}, True),
    "lease-no-coordinator": ("lease", {"v": 1, "type": "lease", "job": "j"}, True),
    "not-json": ("round", b"{\"v\": 1, \"type\": \"round\",", False),
    "wrong-type": ("round", {"v": 1, "type": "status", "round": 1, "model_id": "m"}, True),
}


def bad_message_bytes(body: dict | bytes) -> bytes:
    return body if isinstance(body, bytes) else json.dumps(body, sort_keys=True).encode()


def metrics_example(model_id: str, model_bytes: int) -> dict:
    """A retained round report as the coordinator publishes it (RoundReport plus the coordinator's keys)."""
    from pqsu.cloud.server import RoundReport

    rep = RoundReport(round=3, model_id=model_id, accuracy=0.8125, loss=0.53125, selected=3, uploads=2, skipped=1,
                      rejected={"duplicate": 1, "chunk-hash-mismatch": 2}, bytes_up=4096,
                      bytes_down=3 * model_bytes, model_bytes=model_bytes, seconds=12.5, train_loss=0.75,
                      device_eval={"devices": 2, "samples": 40, "accuracy": 0.75, "loss": 0.625, "accuracy_min": 0.7,
                                   "accuracy_max": 0.8, "accuracy_std": 0.05}).to_dict()
    return {**rep, "missing": 0, "collect_seconds": 9.25, "server_seconds": 3.0, "job": DEMO_JOB}


# -- the model file ----------------------------------------------------------------------------
def demo_model() -> tuple[bytes, dict[str, tuple[int, ...]]]:
    """A tiny int8 cnn (widths 4, 4, 8 on 1x8x8 inputs, 3 classes), exported as `pqsu export` does."""
    import torch

    from pqsu.export.pipeline import export_model
    from pqsu.export.zoo import ModelSpec, build_model
    from pqsu.protocol.model_info import ModelInfo

    torch.manual_seed(0)
    spec = ModelSpec("cnn", (4, 4, 8), (1, 8, 8), 3, False)
    model = build_model(spec).eval()
    info = ModelInfo(spec=spec.to_dict(), input_name="input", mean=(0.5,), std=(0.25,), classes=("a", "b", "c"),
                     precision="fp32", opset=0)
    calibration = np.random.default_rng(0).standard_normal((16, 1, 8, 8)).astype(np.float32)
    exported = export_model(model, info, calibration)
    return exported.data, {k: tuple(v.shape) for k, v in model.state_dict().items()}


def model_expectation(data: bytes) -> dict:
    import onnx
    from onnx import numpy_helper

    from pqsu.protocol import model_id

    proto = onnx.load_from_string(data)
    inits = {t.name: t for t in proto.graph.initializer}
    tensors = {}
    for node in proto.graph.node:  # each weight: an int8 (weights) or int32 (biases) initializer -> DequantizeLinear
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        q = inits[node.input[0]]
        param = node.input[0].removesuffix("_quantized")
        tensors[param] = {"quantized": node.input[0], "scale": node.input[1],
                          "zero_point": node.input[2] if len(node.input) > 2 else None,
                          "dtype": onnx.TensorProto.DataType.Name(q.data_type).lower(), "shape": list(q.dims),
                          "axis": next((a.i for a in node.attribute if a.name == "axis"), 1),
                          "zero_points_all_zero": not numpy_helper.to_array(inits[node.input[2]]).any()}
    return {"file": "model/model.int8.onnx", "size": len(data), "model_id": model_id.verify(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "metadata_props": {p.key: p.value for p in proto.metadata_props},
            "tensors": dict(sorted(tensors.items())),
            "corruption": {"offset": len(data) // 2, "error": "ModelIdError",
                           "what": "any changed byte outside the id slot makes the id not verify"}}


# -- writing -----------------------------------------------------------------------------------
def _dump(obj) -> bytes:
    """Indented JSON with every list of numbers on one line (a 200-entry tensor stays readable)."""
    inline: list[str] = []

    def collapse(x):
        if isinstance(x, dict):
            return {k: collapse(v) for k, v in x.items()}
        if isinstance(x, list) and x and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in x):
            inline.append(json.dumps(x))
            return f"@@{len(inline) - 1}@@"
        return [collapse(v) for v in x] if isinstance(x, list) else x

    text = json.dumps(collapse(obj), indent=2, sort_keys=True)
    for i, flat in enumerate(inline):
        text = text.replace(f'"@@{i}@@"', flat, 1)
    return (text + "\n").encode()


def build(with_model: bool = True) -> dict[str, bytes]:
    """Every file of the kit: relative path -> bytes."""
    files: dict[str, bytes] = {"demo.key": DEMO_KEY.hex().encode() + b"\n",
                               "keys.json": _dump({DEMO_DEVICE: DEMO_KEY.hex()})}
    if with_model:
        model, shapes = demo_model()
        files["model/model.int8.onnx"] = model
        files["model/model.expected.json"] = _dump(model_expectation(model))
        mid = json.loads(files["model/model.expected.json"])["model_id"]
    else:  # the protocol-only part, for quick checks without torch
        model, shapes, mid = b"", {"features.0.weight": (4, 1, 3, 3)}, DEMO_MODEL_ID
    index = {"updates": [], "chunks": [], "messages": [], "bad_messages": []}
    for name, (upd, signed) in _updates(mid, shapes).items():
        payload = codec.encode(upd, key=DEMO_KEY if signed else None)
        files[f"updates/{name}.bin"] = payload
        files[f"updates/{name}.expected.json"] = _dump(update_expectation(name, upd, payload, signed))
        index["updates"].append(name)
    sets = [("update-mixed-signed", "updates/mixed-signed.bin", files["updates/mixed-signed.bin"], None,
             UPDATE_CHUNK_LIMIT)]
    if with_model:
        sets.append(("model", "model/model.int8.onnx", model, bytes.fromhex(mid), MODEL_CHUNK_LIMIT))
    for name, path, message, mid_bytes, limit in sets:
        frames = chunking.split(message, limit, message_id=mid_bytes)
        for i, frame in enumerate(frames):
            files[f"chunks/{name}/frame-{i}.bin"] = frame
        message_id = mid_bytes or hashlib.sha256(message).digest()[:16]
        files[f"chunks/{name}.expected.json"] = _dump(chunk_expectation(name, path, message, frames, message_id))
        index["chunks"].append(name)
    for name, (kind, data) in control_messages(mid, len(model)).items():
        files[f"messages/{name}.json"] = data
        files[f"messages/{name}.expected.json"] = _dump({"type": kind, "decoded": _decoded(kind, data)})
        index["messages"].append(name)
    for name, (kind, body, schema) in BAD_MESSAGES.items():
        files[f"messages/bad/{name}.json"] = bad_message_bytes(body)
        index["bad_messages"].append({"name": name, "type": kind, "refused_by_schema": schema})
    files["messages/metrics.json"] = json.dumps(metrics_example(mid, len(model))).encode()
    index["messages_without_decoder"] = ["metrics"]
    files["index.json"] = _dump(index)
    return files


def _decoded(kind: str, data: bytes) -> dict:
    """What a receiver makes of a control message: every field, defaults filled in."""
    if kind == "round":
        return {**dataclasses.asdict(RoundTask.from_json(data)), "devices": list(RoundTask.from_json(data).devices)}
    if kind == "status":
        return dataclasses.asdict(Status.from_json(data))
    if kind == "lease":
        return dataclasses.asdict(Lease.from_json(data))
    body = json.loads(data)
    return {"rounds": body["rounds"], "model_id": body["model_id"], "job": body.get("job", "")}


def write(out: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m pqsu.tools.lab.conformance OUT_DIR", file=sys.stderr)
        return 2
    files = build()
    write(Path(args[0]), files)
    print(f"wrote {len(files)} files to {args[0]} (crc32 of the set {zlib.crc32(b''.join(files.values())):08x})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
